//! The /proc process source: every process is a candidate, and each one's `ns/mnt` names its mount namespace
//! (and its threads' where they have their own).
//! It needs no privilege beyond reading /proc and works on any kernel: the fallback of the in-kernel source.

use super::source::{Candidate, NamespaceTask, ProcessSource, SourceError};
use super::threads::other_threads;
use nix::dir::Dir;
use nix::fcntl::OFlag;
use nix::sys::stat::{Mode, stat};
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Every process in /proc.
#[derive(Debug, Default, Clone, Copy)]
pub struct ProcfsSource;

impl ProcessSource for ProcfsSource {
    fn name(&self) -> &'static str {
        "procfs"
    }

    fn mount_namespaces(&self, proc_root: &Path) -> Result<BTreeMap<u64, NamespaceTask>, SourceError> {
        let mut first = BTreeMap::new();
        for pid in list_pids(proc_root) {
            let process = NamespaceTask { pid, thread: 0 };
            let own = process.namespace(proc_root);
            if let Some(inode) = own {
                process.see_in(&mut first, inode);
            }
            // A thread's namespace apart from its process's (its own, or the first thread has exited). A
            // single-threaded process costs this one `stat` (of `task/`, whose link count is two plus its threads).
            let dir = process.dir(proc_root);
            if stat(&dir.join("task")).is_ok_and(|st| st.st_nlink == 3) {
                continue;
            }
            let Ok(dir) = Dir::open(&dir, OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC, Mode::empty())
            else {
                continue;
            };
            for thread in other_threads(&dir, pid) {
                let task = NamespaceTask { pid, thread };
                if let Some(inode) = task.namespace(proc_root).filter(|&inode| Some(inode) != own) {
                    task.see_in(&mut first, inode);
                }
            }
        }
        Ok(first)
    }

    fn candidates(&self, proc_root: &Path, _devices: &BTreeSet<u64>) -> Result<Vec<Candidate>, SourceError> {
        Ok(list_pids(proc_root).into_iter().map(Candidate::whole).collect())
    }
}

/// Every pid in `proc_root` but the agent's own, in order.
fn list_pids(proc_root: &Path) -> Vec<i32> {
    let self_pid = std::process::id() as i32;
    let mut pids: Vec<i32> = std::fs::read_dir(proc_root)
        .map(|rd| rd.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok()).collect())
        .unwrap_or_default();
    pids.retain(|p| *p != self_pid);
    pids.sort_unstable();
    pids
}
