//! The /proc process source: every process is a candidate, and each one's `ns/mnt` names its mount namespace.
//! It needs no privilege beyond reading /proc and works on any kernel: the fallback of the in-kernel source.

use super::source::{Candidate, ProcessSource, SourceError};
use nix::sys::stat::stat;
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Every process in /proc.
#[derive(Debug, Default, Clone, Copy)]
pub struct ProcfsSource;

impl ProcessSource for ProcfsSource {
    fn name(&self) -> &'static str {
        "procfs"
    }

    fn mount_namespaces(&self, proc_root: &Path) -> Result<BTreeMap<u64, i32>, SourceError> {
        let mut first = BTreeMap::new();
        for pid in list_pids(proc_root) {
            if let Some(inode) = ns_inode(proc_root, pid) {
                first.entry(inode).or_insert(pid);
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

/// The inode of a process's mount namespace.
pub fn ns_inode(proc_root: &Path, pid: i32) -> Option<u64> {
    stat(&proc_root.join(pid.to_string()).join("ns/mnt")).ok().map(|s| s.st_ino)
}
