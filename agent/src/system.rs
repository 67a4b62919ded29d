//! System disks: the disk that holds `/`, `/boot`, `/usr` or `/var` of the running system, or a swap area the guest
//! had active when the agent started (the boot swap). Such a disk is marked `system` and is never released.

use crate::roots::HostRoots;
use crate::usage::procfs_parse::{parse_mountinfo, parse_swaps};
use nix::sys::stat::{makedev, stat};
use std::collections::HashSet;
use wukong_proto::v1::{Disk, Holder};

/// Mount points whose disk is the running system.
pub const SYSTEM_MOUNTS: &[&str] = &["/", "/boot", "/usr", "/var"];

/// What makes a disk a system disk, learnt once at start (boot swaps) and read fresh for mounts.
#[derive(Debug, Clone, Default)]
pub struct SystemView {
    /// Swap areas active at start: (path, device number of the partition, or of the filesystem for a swap file).
    boot_swaps: Vec<(String, u64)>,
}

impl SystemView {
    /// Records the swap areas active now.
    pub fn capture(roots: &HostRoots) -> Self {
        let text = std::fs::read_to_string(roots.proc.join("swaps")).unwrap_or_default();
        let boot_swaps = parse_swaps(&text)
            .into_iter()
            .filter_map(|s| {
                let st = stat(&crate::roots::resolve_dev_path(roots, &s.path)).ok()?;
                let dev = if s.kind == "partition" { st.st_rdev } else { st.st_dev };
                Some((s.path, dev))
            })
            .collect();
        Self { boot_swaps }
    }

    /// The system mounts as they are now, read once for any number of disks.
    pub fn now(&self, roots: &HostRoots) -> SystemNow<'_> {
        let text = open_mount_table(roots).and_then(std::io::read_to_string).unwrap_or_default();
        let mounts = parse_mountinfo(&text)
            .into_iter()
            .filter(|m| SYSTEM_MOUNTS.contains(&m.mount_point.as_str()))
            .map(|m| {
                let mut devices = vec![makedev(m.major.into(), m.minor.into())];
                // btrfs shows an anonymous device number; its source names the member device.
                if m.source.starts_with("/dev/")
                    && let Ok(st) = stat(&crate::roots::resolve_dev_path(roots, &m.source))
                {
                    devices.push(st.st_rdev);
                }
                (m.mount_point, m.source, devices)
            })
            .collect();
        SystemNow { view: self, mounts }
    }
}

/// The system's mount table. PID 1's namespace is the system's: the agent itself may run in a private one
/// (systemd's ProtectSystem). Polled for `POLLPRI`, the file reports every mount and unmount in that namespace,
/// which is how a disk mounted at `/boot` or `/var` after it was plugged becomes a system disk at once.
pub fn open_mount_table(roots: &HostRoots) -> std::io::Result<std::fs::File> {
    std::fs::File::open(roots.proc.join("1/mountinfo"))
        .or_else(|_| std::fs::File::open(roots.proc.join("self/mountinfo")))
}

/// The system mounts read at one moment, with the boot swaps.
pub struct SystemNow<'a> {
    view: &'a SystemView,
    /// (mount point, source, device numbers that mean this mount's disk).
    mounts: Vec<(String, String, Vec<u64>)>,
}

impl SystemNow<'_> {
    /// Marks `disk` as a system disk, with the reason, when it is one.
    pub fn mark(&self, disk: &mut Disk) {
        if let Some(reason) = self.reason(disk) {
            disk.system = true;
            disk.system_reason = reason;
        }
    }

    /// Why `disk` is a system disk, if it is one.
    pub fn reason(&self, disk: &Disk) -> Option<String> {
        let devices = devices_of(disk);
        if let Some((point, source, _)) =
            self.mounts.iter().find(|(_, _, devs)| devs.iter().any(|d| devices.contains(d)))
        {
            return Some(format!("{point} of the running system is mounted from {source}"));
        }
        self.view
            .boot_swaps
            .iter()
            .find(|(_, dev)| devices.contains(dev))
            .map(|(path, _)| format!("{path} is a swap area the guest had active when the agent started"))
    }
}

/// Device numbers of the disk, its partitions and everything stacked on them.
fn devices_of(disk: &Disk) -> HashSet<u64> {
    fn holders(list: &[Holder], out: &mut HashSet<u64>) {
        for h in list {
            out.insert(makedev(h.major.into(), h.minor.into()));
            holders(&h.holders, out);
        }
    }
    let mut out = HashSet::from([makedev(disk.major.into(), disk.minor.into())]);
    holders(&disk.holders, &mut out);
    for p in &disk.partitions {
        out.insert(makedev(p.major.into(), p.minor.into()));
        holders(&p.holders, &mut out);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;
    use wukong_proto::v1::Partition;

    /// A fixture whose PID 1 mounts / from partition 8:2 and whose swap file lives on the filesystem of a real
    /// temporary file (so its st_dev is known).
    fn fixture(root_line: &str) -> (tempfile::TempDir, HostRoots, u64) {
        let dir = tempfile::tempdir().unwrap();
        let roots = HostRoots::under(dir.path());
        std::fs::create_dir_all(roots.proc.join("1")).unwrap();
        std::fs::write(
            roots.proc.join("1/mountinfo"),
            format!("{root_line}\n40 1 8:17 / /data rw - ext4 /dev/sdb1 rw\n"),
        )
        .unwrap();
        let swapfile = dir.path().join("swap file");
        std::fs::write(&swapfile, b"").unwrap();
        let escaped = swapfile.to_string_lossy().replace(' ', "\\040");
        std::fs::write(
            roots.proc.join("swaps"),
            format!("Filename Type Size Used Priority\n{escaped} file 1024 0 -2\n"),
        )
        .unwrap();
        let fs_dev = std::fs::metadata(&swapfile).unwrap().dev();
        (dir, roots, fs_dev)
    }

    fn disk(major: u32, minor: u32, partitions: &[(u32, u32)]) -> Disk {
        Disk {
            major,
            minor,
            partitions: partitions
                .iter()
                .map(|&(major, minor)| Partition { major, minor, ..Partition::default() })
                .collect(),
            ..Disk::default()
        }
    }

    #[test]
    fn root_partition_makes_its_disk_a_system_disk() {
        let (_dir, roots, _) = fixture("30 1 8:2 / / rw,relatime - ext4 /dev/sda2 rw");
        let view = SystemView::default();
        let mut sda = disk(8, 0, &[(8, 1), (8, 2)]);
        view.now(&roots).mark(&mut sda);
        assert!(sda.system);
        assert_eq!(sda.system_reason, "/ of the running system is mounted from /dev/sda2");
        let mut sdb = disk(8, 16, &[(8, 17)]);
        view.now(&roots).mark(&mut sdb);
        assert!(!sdb.system, "/data is not a system mount: {}", sdb.system_reason);
    }

    #[test]
    fn root_on_a_holder_marks_the_disk_below() {
        let (_dir, roots, _) = fixture("30 1 253:0 / / rw - xfs /dev/mapper/vg-root rw");
        let mut sda = disk(8, 0, &[(8, 2)]);
        sda.partitions[0].holders.push(Holder { major: 253, minor: 0, ..Holder::default() });
        assert!(SystemView::default().now(&roots).reason(&sda).is_some());
    }

    #[test]
    fn boot_swap_file_marks_the_disk_of_its_filesystem() {
        let (_dir, roots, fs_dev) = fixture("30 1 8:2 / / rw - ext4 /dev/sda2 rw");
        let view = SystemView::capture(&roots);
        let (ma, mi) = (nix::sys::stat::major(fs_dev) as u32, nix::sys::stat::minor(fs_dev) as u32);
        let reason = view.now(&roots).reason(&disk(ma, mi, &[])).expect("swap file's disk is a system disk");
        assert!(reason.ends_with("swap file is a swap area the guest had active when the agent started"), "{reason}");
    }
}
