//! The seam between the usage scan and the two ways it finds processes: every process in /proc
//! ([`super::procfs_scan::ProcfsSource`]), or only those the kernel's iterators report
//! ([`super::bpf_scan::BpfSource`]). Everything a report says about a process (its uses, paths, access modes,
//! name) comes from one /proc analysis of that process whichever found it (`scan.rs`), so the two give the same
//! report as long as a source never misses a process, nor a file or mapping of one that it says it saw.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// A source that failed mid-scan; the scan then asks /proc.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub struct SourceError(pub String);

/// Where a usage scan learns which processes to look at. Neither answer ever names the agent itself.
pub trait ProcessSource: Send + Sync {
    /// "procfs" or "bpf".
    fn name(&self) -> &'static str;

    /// Every mount namespace (by the inode of its `ns/mnt`) with the task whose mountinfo the scan reads: the
    /// lowest pid whose process is in it, else the lowest thread in it (by pid, then thread id). A namespace that
    /// only threads are in (one unshared by a thread, or its processes' first threads exited) is not seen through
    /// `/proc/<pid>`: `findmnt`, `fuser -m` and `lsof` miss its mounts.
    fn mount_namespaces(&self, proc_root: &Path) -> Result<BTreeMap<u64, NamespaceTask>, SourceError>;

    /// The processes, in pid order, that may hold a file or a block-device node on one of `devices` (userspace
    /// device numbers: the targets' block devices and every filesystem on or stacked on them). More is only slower;
    /// one missed is a use the report does not name.
    fn candidates(&self, proc_root: &Path, devices: &BTreeSet<u64>) -> Result<Vec<Candidate>, SourceError>;
}

/// The task a mount namespace is seen through: a process, or one of its threads (`/proc/<pid>/task/<thread>`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NamespaceTask {
    pub pid: i32,
    /// 0: the process itself (its first thread).
    pub thread: i32,
}

impl NamespaceTask {
    /// Its directory under `proc_root`.
    pub fn dir(&self, proc_root: &Path) -> PathBuf {
        let process = proc_root.join(self.pid.to_string());
        if self.thread == 0 { process } else { process.join("task").join(self.thread.to_string()) }
    }

    /// Records that namespace `inode` is seen through this task, unless through a better one: a process before a
    /// thread, then the lowest pid and thread id. Both sources choose alike, so their reports name the same task.
    pub fn see_in(self, first: &mut BTreeMap<u64, NamespaceTask>, inode: u64) {
        let rank = |t: &NamespaceTask| (t.thread != 0, t.pid, t.thread);
        let seen = first.entry(inode).or_insert(self);
        if rank(&self) < rank(seen) {
            *seen = self;
        }
    }

    /// The inode of its mount namespace.
    pub fn namespace(&self, proc_root: &Path) -> Option<u64> {
        nix::sys::stat::stat(&self.dir(proc_root).join("ns/mnt")).ok().map(|s| s.st_ino)
    }
}

/// A process that may use one of the devices, and, where the source walked it, which of its open files and whether
/// its mappings do: the /proc analysis then looks at those alone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    pub pid: i32,
    /// `None`: look at everything the process holds.
    pub seen: Option<Seen>,
}

/// What a walk of a process saw on the devices. Working and root directory and program are always looked at
/// (three stats).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Seen {
    /// The open files (by fd) on one of the devices.
    pub fds: BTreeSet<i32>,
    /// Whether a mapping is of a file on one of them.
    pub mappings: bool,
}

impl Candidate {
    /// A process to look at whole.
    pub fn whole(pid: i32) -> Self {
        Self { pid, seen: None }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_namespace_is_seen_through_a_process_before_a_thread_then_the_lowest() {
        let task = |pid, thread| NamespaceTask { pid, thread };
        let mut first = BTreeMap::new();
        for (inode, seen) in [(1, task(9, 12)), (1, task(20, 0)), (1, task(7, 8)), (2, task(5, 6)), (2, task(5, 3))] {
            seen.see_in(&mut first, inode);
        }
        assert_eq!(first, BTreeMap::from([(1, task(20, 0)), (2, task(5, 3))]));
        task(4, 0).see_in(&mut first, 1);
        assert_eq!(first[&1], task(4, 0));
        assert_eq!(task(4, 0).dir(Path::new("/proc")), Path::new("/proc/4"));
        assert_eq!(task(4, 5).dir(Path::new("/proc")), Path::new("/proc/4/task/5"));
    }
}
