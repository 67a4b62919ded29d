//! Block-device operations of a release: flush, read-only fence, SCSI delete and rescan. Each is one system call
//! or one sysfs write; callers decide the order.

use crate::roots::HostRoots;
use nix::fcntl::OFlag;
use nix::sys::stat::Mode;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::Path;
use wukong_proto::v1::ScsiAddress;

nix::ioctl_none!(blkflsbuf, 0x12, 97);
nix::ioctl_write_ptr_bad!(blkroset, nix::request_code_none!(0x12, 93), nix::libc::c_int);
nix::ioctl_read_bad!(blkroget, nix::request_code_none!(0x12, 94), nix::libc::c_int);

/// A failed block-device operation, naming the device and what to check.
#[derive(Debug, thiserror::Error)]
pub enum FenceError {
    #[error("cannot open {path}: {source}")]
    Open { path: String, source: nix::Error },
    #[error("cannot flush {path}: {source}; the disk may have failed, check the guest's kernel log")]
    Flush { path: String, source: nix::Error },
    #[error("cannot {what} read-only mode of {path}: {source}")]
    ReadOnly { what: &'static str, path: String, source: nix::Error },
    #[error("cannot write {path}: {source}")]
    Sysfs { path: String, source: std::io::Error },
}

/// Opens a block device without claiming it and without write access: a write open would make udev re-probe
/// the disk when it is closed.
fn open(path: &Path) -> Result<OwnedFd, FenceError> {
    let flags = OFlag::O_RDONLY | OFlag::O_CLOEXEC | OFlag::O_NONBLOCK;
    nix::fcntl::open(path, flags, Mode::empty())
        .map_err(|source| FenceError::Open { path: path.display().to_string(), source })
}

/// Writes the device's dirty buffers, drops its buffer cache and makes the device flush its own write cache, so
/// everything written so far is on the hypervisor's storage.
pub fn flush(path: &Path) -> Result<(), FenceError> {
    let fd = open(path)?;
    let err = |source| FenceError::Flush { path: path.display().to_string(), source };
    // SAFETY: BLKFLSBUF takes no argument; fd is an open block device.
    unsafe { blkflsbuf(fd.as_raw_fd()) }.map_err(err)?;
    // fsync of a block device sends a cache flush to the device itself.
    nix::unistd::fsync(&fd).map_err(err)
}

/// Whether the kernel has the device read-only.
pub fn is_read_only(path: &Path) -> Result<bool, FenceError> {
    let fd = open(path)?;
    let mut ro: nix::libc::c_int = 0;
    // SAFETY: BLKROGET writes one int.
    unsafe { blkroget(fd.as_raw_fd(), &mut ro) }.map_err(|source| FenceError::ReadOnly {
        what: "read",
        path: path.display().to_string(),
        source,
    })?;
    Ok(ro != 0)
}

/// Sets or clears the device's read-only mode. Opens for writing fail with EROFS while it is set.
pub fn set_read_only(path: &Path, read_only: bool) -> Result<(), FenceError> {
    let fd = open(path)?;
    let value: nix::libc::c_int = read_only.into();
    // SAFETY: BLKROSET reads one int.
    unsafe { blkroset(fd.as_raw_fd(), &value) }.map_err(|source| FenceError::ReadOnly {
        what: if read_only { "set" } else { "clear" },
        path: path.display().to_string(),
        source,
    })?;
    Ok(())
}

/// The block-device calls of a release, a seam so tests can make one slow or fail. The provided methods are the
/// kernel's; [`Kernel`] keeps them all.
pub trait BlockDevices: Send + Sync {
    fn flush(&self, path: &Path) -> Result<(), FenceError> {
        flush(path)
    }

    fn is_read_only(&self, path: &Path) -> Result<bool, FenceError> {
        is_read_only(path)
    }

    fn set_read_only(&self, path: &Path, read_only: bool) -> Result<(), FenceError> {
        set_read_only(path, read_only)
    }

    fn scsi_delete(&self, roots: &HostRoots, kernel_name: &str) -> Result<(), FenceError> {
        scsi_delete(roots, kernel_name)
    }

    fn scsi_rescan(&self, roots: &HostRoots, address: &ScsiAddress) -> Result<bool, FenceError> {
        scsi_rescan(roots, address)
    }

    fn set_scsi_state(&self, roots: &HostRoots, kernel_name: &str, state: &str) -> Result<(), FenceError> {
        set_scsi_state(roots, kernel_name, state)
    }
}

/// The running kernel's block devices.
#[derive(Debug, Default, Clone, Copy)]
pub struct Kernel;

impl BlockDevices for Kernel {}

fn write_sysfs(path: &Path, value: &str) -> Result<(), FenceError> {
    std::fs::write(path, value).map_err(|source| FenceError::Sysfs { path: path.display().to_string(), source })
}

/// Deletes the SCSI device of disk `kernel_name` in the guest. The kernel detaches it before the write returns.
pub fn scsi_delete(roots: &HostRoots, kernel_name: &str) -> Result<(), FenceError> {
    write_sysfs(&roots.sys_block(kernel_name).join("device/delete"), "1")
}

/// The state of disk `kernel_name`'s SCSI device (`running`, `offline`, ...), `None` when it has none (any more).
pub fn scsi_state(roots: &HostRoots, kernel_name: &str) -> Option<String> {
    let text = std::fs::read_to_string(roots.sys_block(kernel_name).join("device/state")).ok()?;
    Some(text.trim().to_string())
}

/// Sets the state of disk `kernel_name`'s SCSI device: `offline` (from then on every open of the disk fails with
/// ENXIO, and its I/O is refused) or `running`, the two states the kernel lets one set. The kernel takes the name
/// only with a newline after it.
pub fn set_scsi_state(roots: &HostRoots, kernel_name: &str, state: &str) -> Result<(), FenceError> {
    write_sysfs(&roots.sys_block(kernel_name).join("device/state"), &format!("{state}\n"))
}

/// Asks SCSI host `address.host` to probe one channel/target/lun again. Returns whether a device answers there.
pub fn scsi_rescan(roots: &HostRoots, address: &ScsiAddress) -> Result<bool, FenceError> {
    let host = roots.sys.join(format!("class/scsi_host/host{}/scan", address.host));
    write_sysfs(&host, &format!("{} {} {}", address.channel, address.target, address.lun))?;
    let name = format!("{}:{}:{}:{}", address.host, address.channel, address.target, address.lun);
    Ok(roots.sys.join("class/scsi_device").join(name).exists())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_name_the_device() {
        let e = flush(Path::new("/nonexistent/sdz")).unwrap_err();
        assert!(e.to_string().starts_with("cannot open /nonexistent/sdz: "), "{e}");
        let dir = tempfile::tempdir().unwrap();
        let roots = HostRoots::under(dir.path());
        let e = scsi_delete(&roots, "sdz").unwrap_err();
        assert!(e.to_string().contains("sys/block/sdz/device/delete"), "{e}");
    }

    #[test]
    fn a_scsi_devices_state_is_read_and_set_in_sysfs() {
        let dir = tempfile::tempdir().unwrap();
        let roots = HostRoots::under(dir.path());
        assert_eq!(scsi_state(&roots, "sdb"), None);
        let e = set_scsi_state(&roots, "sdb", "offline").unwrap_err();
        assert!(e.to_string().starts_with("cannot write ") && e.to_string().contains("sys/block/sdb/device/state"));
        let device = roots.sys_block("sdb").join("device");
        std::fs::create_dir_all(&device).unwrap();
        std::fs::write(device.join("state"), "running\n").unwrap();
        assert_eq!(scsi_state(&roots, "sdb").as_deref(), Some("running"));
        set_scsi_state(&roots, "sdb", "offline").unwrap();
        assert_eq!(std::fs::read_to_string(device.join("state")).unwrap(), "offline\n", "as the kernel takes it");
        assert_eq!(scsi_state(&roots, "sdb").as_deref(), Some("offline"));
    }

    #[test]
    fn rescan_writes_channel_target_lun_to_the_host() {
        let dir = tempfile::tempdir().unwrap();
        let roots = HostRoots::under(dir.path());
        std::fs::create_dir_all(roots.sys.join("class/scsi_host/host2")).unwrap();
        let address = ScsiAddress { host: 2, channel: 0, target: 1, lun: 3 };
        assert!(!scsi_rescan(&roots, &address).unwrap(), "nothing answers in the fixture");
        assert_eq!(std::fs::read_to_string(roots.sys.join("class/scsi_host/host2/scan")).unwrap(), "0 1 3");
        std::fs::create_dir_all(roots.sys.join("class/scsi_device/2:0:1:3")).unwrap();
        assert!(scsi_rescan(&roots, &address).unwrap());
    }
}
