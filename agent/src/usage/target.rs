//! What a usage scan looks for: every block device that belongs to one disk (the disk, its partitions, and every
//! device stacked on them), read fresh from sysfs at scan time.

use crate::disk;
use crate::roots::HostRoots;
use crate::udev_db::UdevDb;
use std::collections::HashSet;
use std::path::PathBuf;
use wukong_proto::v1::{Holder, HolderKind};

/// A device's place in the disk's stack.
#[derive(Debug, Clone, PartialEq)]
pub enum Role {
    Disk,
    Partition,
    /// A dm/md device stacked on `under` (kernel name).
    Holder {
        holder: Holder,
        under: String,
    },
}

/// One block device of the disk.
#[derive(Debug, Clone, PartialEq)]
pub struct Device {
    pub kernel_name: String,
    pub major: u32,
    pub minor: u32,
    /// The node people know it by (/dev/sdb1, /dev/mapper/vg0-data).
    pub node: String,
    pub role: Role,
}

/// A disk and everything that is part of it.
#[derive(Debug, Clone, PartialEq)]
pub struct Target {
    /// The serial (or kernel name) the report is for.
    pub key: String,
    pub devices: Vec<Device>,
}

impl Target {
    /// Reads the disk `kernel_name` and its stack from sysfs; `None` when it no longer exists.
    pub fn resolve(roots: &HostRoots, db: &dyn UdevDb, kernel_name: &str, key: &str) -> Option<Self> {
        let dir = roots.sys_block(kernel_name);
        let (major, minor) = disk::read_devnum(&dir.join("dev"))?;
        let node = |name: &str| roots.dev_node(name).to_string_lossy().into_owned();
        let mut devices =
            vec![Device { kernel_name: kernel_name.into(), major, minor, node: node(kernel_name), role: Role::Disk }];
        let mut holders = Vec::new();
        for p in disk::partitions(roots, db, kernel_name) {
            devices.push(Device {
                kernel_name: p.kernel_name.clone(),
                major: p.major,
                minor: p.minor,
                node: node(&p.kernel_name),
                role: Role::Partition,
            });
            holders.extend(p.holders.into_iter().map(|h| (h, p.kernel_name.clone())));
        }
        let whole = disk::holders_of(roots, db, &dir, &mut HashSet::new(), 0);
        holders.extend(whole.into_iter().map(|h| (h, kernel_name.to_string())));
        let mut seen = HashSet::new();
        while let Some((holder, under)) = holders.pop() {
            if !seen.insert(holder.kernel_name.clone()) {
                continue;
            }
            holders.extend(holder.holders.iter().cloned().map(|h| (h, holder.kernel_name.clone())));
            devices.push(Device {
                kernel_name: holder.kernel_name.clone(),
                major: holder.major,
                minor: holder.minor,
                node: holder.dev_node.clone(),
                role: Role::Holder { holder: Holder { holders: Vec::new(), ..holder }, under },
            });
        }
        Some(Self { key: key.to_string(), devices })
    }

    pub fn device(&self, major: u32, minor: u32) -> Option<&Device> {
        self.devices.iter().find(|d| d.major == major && d.minor == minor)
    }

    /// Device nodes a process may have opened, in the dev root.
    pub fn node_paths(&self, roots: &HostRoots) -> Vec<PathBuf> {
        self.devices.iter().map(|d| roots.dev_node(&d.kernel_name)).collect()
    }
}

/// A short description of a holder, e.g. "LVM logical volume vg0-data".
pub fn describe_holder(h: &Holder) -> String {
    let what = match h.kind() {
        HolderKind::DmCrypt => "dm-crypt mapping",
        HolderKind::Lvm => "LVM logical volume",
        HolderKind::Md => "md RAID array",
        HolderKind::Multipath => "multipath device",
        HolderKind::DmOther => "device-mapper device",
        HolderKind::Other | HolderKind::Unspecified => "stacked device",
    };
    if h.name.is_empty() {
        format!("{what} {}", h.kernel_name)
    } else {
        format!("{what} {} ({})", h.name, h.kernel_name)
    }
}

/// What to run to take a holder down.
pub fn holder_hint(h: &Holder) -> &'static str {
    match h.kind() {
        HolderKind::DmCrypt => "close it (cryptsetup close)",
        HolderKind::Lvm => "deactivate its volume group (vgchange -an)",
        HolderKind::Md => "stop the array (mdadm --stop)",
        HolderKind::Multipath => "flush it (multipath -f)",
        _ => "remove it (dmsetup remove)",
    }
}
