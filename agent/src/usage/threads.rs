//! Threads that hold something apart from their process's first thread (its leader): a files table of their own
//! (`unshare(CLONE_FILES)`), directories of their own (`unshare(CLONE_FS)`), or everything once the leader has
//! exited (`pthread_exit` in `main`), which takes its files, directories and memory out of `/proc/<pid>`. `/proc`
//! shows such uses under `/proc/<pid>/task/<tid>` alone: `fuser` and `lsof`, which read `/proc/<pid>`, miss them,
//! and so did this scan. The kernel says whether two tasks share a files table, directories or memory through
//! `kcmp(2)`; where it cannot (no `kcmp`, or a `/proc` of another pid namespace), every thread is read.

use nix::dir::Dir;
use nix::fcntl::{AtFlags, OFlag};
use nix::sys::stat::{Mode, fstatat};
use std::path::Path;

/// What a thread holds apart from its leader, to be read from its own `task/<tid>` directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Apart {
    pub tid: i32,
    /// Its open files: a files table other than the leader's.
    pub files: bool,
    /// Its working and root directory.
    pub dirs: bool,
    /// Its program and mappings: memory other than the leader's (the leader has exited).
    pub memory: bool,
}

/// What two tasks may share (`kcmp(2)`'s `KCMP_VM`, `KCMP_FILES` and `KCMP_FS`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resource {
    Memory = 1,
    Files = 2,
    Dirs = 3,
}

/// Whether two tasks share a resource: `Some(true)` shared, `Some(false)` not, `None` cannot tell.
pub trait Compare: Sync {
    fn shared(&self, a: i32, b: i32, what: Resource) -> Option<bool>;
}

/// The kernel's answer, for pids of `/proc` as this process sees it.
pub struct Kcmp;

impl Compare for Kcmp {
    fn shared(&self, a: i32, b: i32, what: Resource) -> Option<bool> {
        // SAFETY: kcmp(2) takes two pids, a type and two integers, and touches no memory of ours.
        let r = unsafe { nix::libc::syscall(nix::libc::SYS_kcmp, a, b, what as i32, 0, 0) };
        // 0: the same; 1, 2 or 3: ordered differently, so not the same (a task without one, e.g. an exited leader's
        // files, differs from one that has it); -1: no answer (no such pid, no kcmp, not allowed).
        (r >= 0).then_some(r == 0)
    }
}

/// No answer: every thread is read whole.
pub struct Unknown;

impl Compare for Unknown {
    fn shared(&self, _: i32, _: i32, _: Resource) -> Option<bool> {
        None
    }
}

/// The comparer for `proc_root`: the kernel's where that `/proc` names this process by its own pid (pids mean the
/// same to `kcmp` and to it), else none.
pub fn comparer_for(proc_root: &Path) -> &'static dyn Compare {
    let own = std::fs::read_link(proc_root.join("self")).ok();
    match own.and_then(|p| p.to_str()?.parse::<u32>().ok()) {
        Some(pid) if pid == std::process::id() => &Kcmp,
        _ => &Unknown,
    }
}

/// The threads of process `pid` (its `/proc` directory open as `process`) that hold something apart from it. Of
/// threads that share one files table (or directories, or memory) apart from the leader's, one is named for it.
pub fn threads_apart(process: &Dir, pid: i32, compare: &dyn Compare) -> Vec<Apart> {
    let mut apart: Vec<Apart> = Vec::new();
    for tid in other_threads(process, pid) {
        // Apart from the leader, and from every thread already named for the same resource.
        let own = |what: Resource, named: fn(&Apart) -> bool| {
            compare.shared(pid, tid, what) != Some(true)
                && apart.iter().filter(|a| named(a)).all(|a| compare.shared(a.tid, tid, what) != Some(true))
        };
        let a = Apart {
            tid,
            files: own(Resource::Files, |a| a.files),
            dirs: own(Resource::Dirs, |a| a.dirs),
            memory: own(Resource::Memory, |a| a.memory),
        };
        if a.files || a.dirs || a.memory {
            apart.push(a);
        }
    }
    apart
}

/// The threads of process `pid` (its `/proc` directory open as `process`) but the first, in order. A
/// single-threaded process costs one `stat` (of `task/`, whose link count in /proc is two plus its threads).
pub fn other_threads(process: &Dir, pid: i32) -> Vec<i32> {
    if fstatat(process, "task", AtFlags::empty()).is_ok_and(|st| st.st_nlink == 3) {
        return Vec::new();
    }
    let Ok(mut tasks) =
        Dir::openat(process, "task", OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC, Mode::empty())
    else {
        return Vec::new();
    };
    let mut tids: Vec<i32> = tasks
        .iter()
        .flatten()
        .filter_map(|e| e.file_name().to_str().ok()?.parse().ok())
        .filter(|&t| t != pid)
        .collect();
    tids.sort_unstable();
    tids
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    /// Tasks by the files table, directories and memory they have (0: none, as an exited leader's).
    struct Fake(HashMap<i32, [u8; 3]>);

    impl Compare for Fake {
        fn shared(&self, a: i32, b: i32, what: Resource) -> Option<bool> {
            let i = what as usize - 1;
            Some(self.0.get(&a)?[i] == self.0.get(&b)?[i] && self.0[&a][i] != 0)
        }
    }

    fn process(tids: &[i32]) -> (tempfile::TempDir, Dir) {
        let dir = tempfile::tempdir().unwrap();
        for t in tids {
            std::fs::create_dir_all(dir.path().join("task").join(t.to_string())).unwrap();
        }
        let open = Dir::open(dir.path(), OFlag::O_RDONLY | OFlag::O_DIRECTORY, Mode::empty()).unwrap();
        (dir, open)
    }

    #[test]
    fn a_single_threaded_process_has_no_thread_apart() {
        let (_d, dir) = process(&[10]);
        assert_eq!(threads_apart(&dir, 10, &Unknown), []);
        let (_d, dir) = process(&[]);
        assert_eq!(threads_apart(&dir, 10, &Unknown), [], "no task directory (a fixture, or the process exited)");
    }

    #[test]
    fn threads_sharing_everything_with_the_leader_are_not_read() {
        let (_d, dir) = process(&[10, 11, 12]);
        let fake = Fake(HashMap::from([(10, [1, 1, 1]), (11, [1, 1, 1]), (12, [1, 1, 1])]));
        assert_eq!(threads_apart(&dir, 10, &fake), []);
    }

    #[test]
    fn each_resource_apart_is_named_once_through_the_first_thread_holding_it() {
        let (_d, dir) = process(&[10, 11, 12, 13, 14]);
        // 11 and 13 share a files table of their own; 12 has its own directories; 14 shares everything.
        let fake =
            Fake(HashMap::from([(10, [1, 1, 1]), (11, [1, 2, 1]), (12, [1, 1, 3]), (13, [1, 2, 1]), (14, [1, 1, 1])]));
        assert_eq!(
            threads_apart(&dir, 10, &fake),
            [
                Apart { tid: 11, files: true, dirs: false, memory: false },
                Apart { tid: 12, files: false, dirs: true, memory: false },
            ]
        );
    }

    #[test]
    fn after_the_leader_exits_its_threads_hold_everything_and_one_is_read() {
        let (_d, dir) = process(&[10, 11, 12]);
        let fake = Fake(HashMap::from([(10, [0, 0, 0]), (11, [5, 5, 5]), (12, [5, 5, 5])]));
        assert_eq!(threads_apart(&dir, 10, &fake), [Apart { tid: 11, files: true, dirs: true, memory: true }]);
    }

    #[test]
    fn without_an_answer_every_thread_is_read_whole() {
        let (_d, dir) = process(&[10, 11, 12]);
        let whole = |tid| Apart { tid, files: true, dirs: true, memory: true };
        assert_eq!(threads_apart(&dir, 10, &Unknown), [whole(11), whole(12)]);
    }

    #[test]
    fn the_kernel_compares_tasks_of_this_machines_proc() {
        let own = std::process::id() as i32;
        assert!(comparer_for(Path::new("/proc")).shared(own, own, Resource::Files) == Some(true));
        assert_eq!(Kcmp.shared(own, own, Resource::Memory), Some(true));
        let mut child = std::process::Command::new("sleep").arg("100").spawn().unwrap();
        let other = child.id() as i32;
        let answers = [Resource::Memory, Resource::Files, Resource::Dirs].map(|r| Kcmp.shared(own, other, r));
        child.kill().unwrap();
        child.wait().unwrap();
        assert_eq!(answers, [Some(false); 3], "a child has memory, files and directories of its own");
        assert_eq!(Kcmp.shared(own, i32::MAX, Resource::Files), None, "no such pid");
        let fixture = tempfile::tempdir().unwrap();
        assert_eq!(comparer_for(fixture.path()).shared(own, own, Resource::Files), None, "not this machine's /proc");
    }
}
