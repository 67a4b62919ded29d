//! The seam between the usage scan and the two ways it finds processes: every process in /proc
//! ([`super::procfs_scan::ProcfsSource`]), or only those the kernel's iterators report
//! ([`super::bpf_scan::BpfSource`]). Everything a report says about a process (its uses, paths, access modes,
//! name) comes from one /proc analysis of that process whichever found it (`scan.rs`), so the two give the same
//! report as long as a source never misses a process, nor a file or mapping of one that it says it saw.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// A source that failed mid-scan; the scan then asks /proc.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub struct SourceError(pub String);

/// Where a usage scan learns which processes to look at. Neither answer ever names the agent itself.
pub trait ProcessSource: Send + Sync {
    /// "procfs" or "bpf".
    fn name(&self) -> &'static str;

    /// Every mount namespace (by the inode of its `ns/mnt`) with the lowest pid in it: the process whose
    /// mountinfo the scan reads.
    fn mount_namespaces(&self, proc_root: &Path) -> Result<BTreeMap<u64, i32>, SourceError>;

    /// The processes, in pid order, that may hold a file or a block-device node on one of `devices` (userspace
    /// device numbers: the targets' block devices and every filesystem on or stacked on them). More is only slower;
    /// one missed is a use the report does not name.
    fn candidates(&self, proc_root: &Path, devices: &BTreeSet<u64>) -> Result<Vec<Candidate>, SourceError>;
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
