//! The seam between the usage scan and the two ways it finds processes: every process in /proc
//! ([`super::procfs_scan::ProcfsSource`]), or only those the kernel's iterators report
//! ([`super::bpf_scan::BpfSource`]). Everything a report says about a process (its uses, paths, access modes,
//! name) comes from one /proc analysis of that process whichever found it (`scan.rs`), so the two give the same
//! report as long as a source never misses a process.

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
    fn candidates(&self, proc_root: &Path, devices: &BTreeSet<u64>) -> Result<Vec<i32>, SourceError>;
}
