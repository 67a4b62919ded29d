//! A disk named the way people inside the guest think of it: a device path (`/dev/sdb`, `/dev/sdb1`,
//! `/dev/mapper/vg0-data`), a `/dev/disk/by-*` link, or a file or mount point on one of its filesystems. The agent
//! resolves it, since only it sees the guest's paths (a client may run outside the guest).

use crate::inventory::Snapshot;
use crate::roots::{HostRoots, resolve_dev_path};
use crate::usage::procfs_parse::{overlay_layers, parse_mountinfo};
use nix::sys::stat::{SFlag, major, minor, stat};
use std::path::PathBuf;
use wukong_proto::v1::{Disk, Holder};

#[derive(Debug, thiserror::Error)]
pub enum LocateError {
    #[error(
        "cannot look up '{path}' in the guest: {reason}; give a device path, a /dev/disk/by-id link, a mount point or a serial"
    )]
    Unreadable { path: String, reason: String },
    #[error(
        "'{path}' is on device {major}:{minor}, which is not part of any disk the agent knows; list the disks with \
         `wukongctl disks`"
    )]
    NoDisk { path: String, major: u32, minor: u32 },
}

/// True when a request names a disk by path rather than by serial (a serial never starts with '/').
pub fn is_path(name: &str) -> bool {
    name.starts_with('/')
}

/// The disk `path` is, or is on. Device paths are read in the dev root; other paths as the host's processes see
/// them (through PID 1's root: the agent itself may run in a sandboxed mount namespace). A path on an overlay is on
/// the disk of the first of its layers found on a disk.
pub fn disk_for_path<'s>(roots: &HostRoots, snapshot: &'s Snapshot, path: &str) -> Result<&'s Disk, LocateError> {
    disk_for_path_at(roots, snapshot, path, 0)
}

/// Overlays stacked on overlays deeper than this are not followed (a corrupt mount table must not loop).
const MAX_STACKING: u32 = 8;

fn disk_for_path_at<'s>(
    roots: &HostRoots,
    snapshot: &'s Snapshot,
    path: &str,
    depth: u32,
) -> Result<&'s Disk, LocateError> {
    let resolved: PathBuf = if path.starts_with("/dev/") {
        resolve_dev_path(roots, path)
    } else {
        roots.proc.join("1/root").join(path.trim_start_matches('/'))
    };
    let st = stat(&resolved)
        .map_err(|e| LocateError::Unreadable { path: path.to_string(), reason: e.desc().to_lowercase() })?;
    let is_block = SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT == SFlag::S_IFBLK;
    let dev = if is_block { st.st_rdev } else { st.st_dev };
    let (ma, mi) = (major(dev) as u32, minor(dev) as u32);
    let no_disk = || LocateError::NoDisk { path: path.to_string(), major: ma, minor: mi };
    if let Some(d) = snapshot.disks.values().find(|d| disk_has(d, ma, mi)) {
        return Ok(d);
    }
    if is_block || depth >= MAX_STACKING {
        return Err(no_disk());
    }
    let mountinfo = std::fs::read_to_string(roots.proc.join("1/mountinfo")).unwrap_or_default();
    let overlay = parse_mountinfo(&mountinfo)
        .into_iter()
        .find(|m| m.fs_type == "overlay" && (m.major, m.minor) == (ma, mi))
        .ok_or_else(no_disk)?;
    overlay_layers(&overlay.super_options)
        .iter()
        .filter(|l| l.path.starts_with('/'))
        .find_map(|l| disk_for_path_at(roots, snapshot, &l.path, depth + 1).ok())
        .ok_or_else(no_disk)
}

/// Whether `major:minor` is the disk, one of its partitions or a device stacked on them.
fn disk_has(d: &Disk, ma: u32, mi: u32) -> bool {
    fn held(holders: &[Holder], ma: u32, mi: u32) -> bool {
        holders.iter().any(|h| (h.major, h.minor) == (ma, mi) || held(&h.holders, ma, mi))
    }
    (d.major, d.minor) == (ma, mi)
        || d.partitions.iter().any(|p| (p.major, p.minor) == (ma, mi) || held(&p.holders, ma, mi))
        || held(&d.holders, ma, mi)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{MetadataExt, symlink};
    use wukong_proto::v1::Partition;

    /// A snapshot whose disk's partition 1 has the device number of the fixture's filesystem, and an LVM volume
    /// on partition 2 with that of /proc.
    fn fixture() -> (tempfile::TempDir, HostRoots, Snapshot) {
        let dir = tempfile::tempdir().unwrap();
        let roots = HostRoots::under(dir.path());
        std::fs::create_dir_all(roots.proc.join("1")).unwrap();
        symlink(dir.path(), roots.proc.join("1/root")).unwrap();
        std::fs::create_dir_all(dir.path().join("srv/data dir")).unwrap();
        std::fs::create_dir_all(roots.dev.join("disk/by-id")).unwrap();
        symlink("/dev/null", roots.dev.join("null-disk")).unwrap();
        symlink("../../null-disk", roots.dev.join("disk/by-id/virtio-pg")).unwrap();
        let fs = std::fs::metadata(dir.path()).unwrap().dev();
        let proc_fs = std::fs::metadata("/proc/version").unwrap().dev();
        let null = std::fs::metadata("/dev/null").unwrap().rdev();
        let num = |d: u64| (major(d) as u32, minor(d) as u32);
        let part = |n, d: u64, holders| Partition {
            number: n,
            major: num(d).0,
            minor: num(d).1,
            holders,
            ..Partition::default()
        };
        let lv = Holder { major: num(proc_fs).0, minor: num(proc_fs).1, ..Holder::default() };
        let disk = Disk {
            id: "pg".into(),
            major: num(null).0,
            minor: num(null).1,
            partitions: vec![part(1, fs, vec![]), part(2, 0, vec![lv])],
            ..Disk::default()
        };
        let mut snapshot = Snapshot::default();
        snapshot.disks.insert("vdb".into(), disk);
        (dir, roots, snapshot)
    }

    #[test]
    fn device_links_mount_points_and_stacked_filesystems_find_their_disk() {
        let (dir, roots, snapshot) = fixture();
        for path in ["/srv/data dir", "/srv", "/"] {
            assert_eq!(disk_for_path(&roots, &snapshot, path).unwrap().id, "pg", "{path}");
        }
        // /dev paths are read in the dev root, links followed (a regular file there stands for a node on the disk).
        std::fs::write(roots.dev.join("vdb1"), b"").unwrap();
        symlink("../../vdb1", roots.dev.join("disk/by-id/virtio-pg-part1")).unwrap();
        assert_eq!(disk_for_path(&roots, &snapshot, "/dev/disk/by-id/virtio-pg-part1").unwrap().id, "pg");
        symlink("/proc/version", dir.path().join("proc-link")).unwrap();
        assert_eq!(disk_for_path(&roots, &snapshot, "/proc-link").unwrap().id, "pg", "a volume stacked on it");
    }

    /// A file on an overlay (its device number stood for by /sys's) is on the disk of the first layer found on one.
    #[test]
    fn a_path_on_an_overlay_is_on_the_disk_of_its_layers() {
        let (dir, roots, snapshot) = fixture();
        let sys = std::fs::metadata("/sys/kernel").unwrap().dev();
        symlink("/sys/kernel", dir.path().join("merged")).unwrap();
        let line =
            |layers: &str| format!("50 1 {}:{} / /merged rw - overlay overlay rw,{layers}\n", major(sys), minor(sys));
        std::fs::write(roots.proc.join("1/mountinfo"), line("lowerdir=/nowhere:/srv/data\\040dir,upperdir=/x"))
            .unwrap();
        assert_eq!(disk_for_path(&roots, &snapshot, "/merged").unwrap().id, "pg");
        std::fs::write(roots.proc.join("1/mountinfo"), line("lowerdir=/nowhere,upperdir=relative")).unwrap();
        let err = disk_for_path(&roots, &snapshot, "/merged").unwrap_err();
        assert!(matches!(err, LocateError::NoDisk { .. }), "{err}");
        // An overlay whose layer is itself: followed a bounded number of times.
        std::fs::write(roots.proc.join("1/mountinfo"), line("lowerdir=/merged")).unwrap();
        assert!(disk_for_path(&roots, &snapshot, "/merged").is_err());
    }

    #[test]
    fn paths_on_no_known_disk_are_named_errors() {
        let (_dir, roots, snapshot) = fixture();
        let err = disk_for_path(&roots, &snapshot, "/dev/disk/by-id/virtio-pg").unwrap_err();
        // /dev/null is a character device: its filesystem (devtmpfs) is no disk's.
        assert!(err.to_string().starts_with("'/dev/disk/by-id/virtio-pg' is on device "), "{err}");
        assert!(
            err.to_string().ends_with("not part of any disk the agent knows; list the disks with `wukongctl disks`"),
            "{err}"
        );
        let err = disk_for_path(&roots, &snapshot, "/no/such/dir").unwrap_err();
        assert_eq!(
            err.to_string(),
            "cannot look up '/no/such/dir' in the guest: no such file or directory; give a device path, a \
             /dev/disk/by-id link, a mount point or a serial"
        );
        assert!(is_path("/dev/sdb") && !is_path("pg-data"));
    }
}
