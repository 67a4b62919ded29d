//! Where the agent finds `/proc`, `/sys`, `/dev` and `/run`. Always passed in, never assumed, so every reader of
//! kernel state runs on fixture trees in tests.

use std::path::{Path, PathBuf};

/// The kernel-provided trees the agent reads, and `/run`, where it looks for the udev daemon.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostRoots {
    pub proc: PathBuf,
    pub sys: PathBuf,
    pub dev: PathBuf,
    pub run: PathBuf,
}

impl Default for HostRoots {
    fn default() -> Self {
        Self { proc: "/proc".into(), sys: "/sys".into(), dev: "/dev".into(), run: "/run".into() }
    }
}

impl HostRoots {
    /// Roots below one directory holding `proc/`, `sys/`, `dev/` and `run/` (a fixture tree).
    pub fn under(base: &Path) -> Self {
        Self { proc: base.join("proc"), sys: base.join("sys"), dev: base.join("dev"), run: base.join("run") }
    }

    /// `/sys/block/<name>`.
    pub fn sys_block(&self, name: &str) -> PathBuf {
        self.sys.join("block").join(name)
    }

    /// `/dev/<name>`.
    pub fn dev_node(&self, name: &str) -> PathBuf {
        self.dev.join(name)
    }
}

/// Maps a path under /dev (as the kernel prints it in mountinfo or swaps) into the dev root.
pub fn resolve_dev_path(roots: &HostRoots, path: &str) -> PathBuf {
    match path.strip_prefix("/dev/") {
        Some(rest) => roots.dev.join(rest),
        None => path.into(),
    }
}
