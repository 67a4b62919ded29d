//! Builds the description of one disk (bus, serial, links, size, partitions, holders) from sysfs and udev's
//! properties. Pure reads under [`HostRoots`], so it runs on fixture trees.
//!
//! The protocol's `Disk` message is the data model: defining a parallel struct would only add a copy to keep in sync.

use crate::roots::HostRoots;
use crate::udev_db::{Properties, UdevDb};
use std::collections::HashSet;
use std::fs;
use std::path::Path;
use wukong_proto::v1::{Bus, Disk, DiskState, Holder, HolderKind, Partition, ScsiAddress};

/// Deepest holder stack followed (disk → crypt → LVM → ... ); real stacks are 3 or 4 deep.
const MAX_HOLDER_DEPTH: usize = 16;

/// True for a whole disk backed by a device (SCSI, virtio, NVMe, ...), as opposed to virtual block devices such as
/// loop, dm, md, zram or ram, which have no `device` link in sysfs.
pub fn is_physical_disk(roots: &HostRoots, kernel_name: &str) -> bool {
    let dir = roots.sys_block(kernel_name);
    dir.join("device").exists() && !dir.join("partition").exists()
}

/// Describes the disk `kernel_name`, or `None` when it is gone or udev has not settled it yet: a disk with a serial
/// is reported only once its /dev/disk/by-id link exists, so callers can open it by that link at once.
pub fn describe(roots: &HostRoots, db: &dyn UdevDb, kernel_name: &str) -> Option<Disk> {
    let dir = roots.sys_block(kernel_name);
    let (major, minor) = read_devnum(&dir.join("dev"))?;
    let props = db.properties(kernel_name)?;
    let bus = bus_of(&dir, &props);
    let (serial, device_id) = serials(bus, &dir, &props);
    let links = devlinks(&props);
    let by_id_links: Vec<String> = links.iter().filter(|l| l.contains("/disk/by-id/")).cloned().collect();
    if !serial.is_empty() && by_id_links.is_empty() {
        return None;
    }
    let by_path_links = links.iter().filter(|l| l.contains("/disk/by-path/")).cloned().collect();
    let id = if serial.is_empty() { kernel_name.to_string() } else { serial.clone() };
    Some(Disk {
        serial,
        id,
        kernel_name: kernel_name.to_string(),
        dev_node: dev_node(roots, kernel_name, &props),
        major,
        minor,
        bus: bus as i32,
        by_id_links,
        by_path_links,
        size_bytes: read_u64(&dir.join("size")).unwrap_or(0) * 512,
        logical_block_size: read_u64(&dir.join("queue/logical_block_size")).unwrap_or(512) as u32,
        vendor: prop(&props, "ID_VENDOR").unwrap_or_else(|| read_trimmed(&dir.join("device/vendor"))),
        model: prop(&props, "ID_MODEL").unwrap_or_else(|| read_trimmed(&dir.join("device/model"))),
        wwn: prop(&props, "ID_WWN_WITH_EXTENSION").or_else(|| prop(&props, "ID_WWN")).unwrap_or_default(),
        device_id,
        scsi_address: scsi_address(&dir),
        partitions: partitions(roots, db, kernel_name),
        holders: holders_of(roots, db, &dir, &mut HashSet::new(), 0),
        read_only: read_u64(&dir.join("ro")) == Some(1),
        diskseq: diskseq(roots, kernel_name),
        fs_type: prop(&props, "ID_FS_TYPE").unwrap_or_default(),
        fs_uuid: prop(&props, "ID_FS_UUID").unwrap_or_default(),
        fs_label: prop(&props, "ID_FS_LABEL").unwrap_or_default(),
        state: DiskState::Present as i32,
        ..Disk::default()
    })
}

/// The kernel's sequence number of the disk named `kernel_name` (Linux 5.15 and later), or 0.
pub fn diskseq(roots: &HostRoots, kernel_name: &str) -> u64 {
    read_u64(&roots.sys_block(kernel_name).join("diskseq")).unwrap_or(0)
}

fn prop(props: &Properties, key: &str) -> Option<String> {
    props.get(key).map(|v| v.trim().to_string()).filter(|v| !v.is_empty())
}

/// Which bus the disk hangs off, from the subsystem its sysfs `device` belongs to.
fn bus_of(dir: &Path, props: &Properties) -> Bus {
    let subsystem = fs::read_link(dir.join("device/subsystem"))
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_default();
    match (subsystem.as_str(), props.get("ID_BUS").map(String::as_str)) {
        ("virtio", _) => Bus::VirtioBlk,
        ("nvme", _) => Bus::Nvme,
        ("scsi", Some("ata")) => Bus::Ata,
        ("scsi", Some("usb")) => Bus::Usb,
        ("scsi", _) => Bus::Scsi,
        _ if props.get("ID_BUS").is_some_and(|b| b == "scsi") => Bus::Scsi,
        _ => Bus::Other,
    }
}

/// The hypervisor-given serial and, for SCSI, the VPD 0x83 device id.
///
/// QEMU's `scsi-hd,serial=A,device_id=B` shows A in VPD 0x80 (`ID_SCSI_SERIAL`) and B in 0x83 (`ID_SERIAL_SHORT`,
/// and the by-id link); without `device_id` both are A. The serial a user configured is A.
fn serials(bus: Bus, dir: &Path, props: &Properties) -> (String, String) {
    match bus {
        Bus::Scsi | Bus::Ata | Bus::Usb => {
            let device_id = prop(props, "ID_SERIAL_SHORT").unwrap_or_default();
            let serial = prop(props, "ID_SCSI_SERIAL").unwrap_or_else(|| device_id.clone());
            (serial, device_id)
        }
        Bus::VirtioBlk => {
            let serial = prop(props, "ID_SERIAL").unwrap_or_else(|| read_trimmed(&dir.join("serial")));
            (serial, String::new())
        }
        _ => {
            let serial = prop(props, "ID_SERIAL_SHORT").or_else(|| prop(props, "ID_SERIAL")).unwrap_or_default();
            (serial, String::new())
        }
    }
}

fn devlinks(props: &Properties) -> Vec<String> {
    let mut links: Vec<String> =
        props.get("DEVLINKS").map(|v| v.split_whitespace().map(str::to_string).collect()).unwrap_or_default();
    links.sort();
    links
}

fn dev_node(roots: &HostRoots, kernel_name: &str, props: &Properties) -> String {
    prop(props, "DEVNAME").unwrap_or_else(|| roots.dev_node(kernel_name).to_string_lossy().into_owned())
}

fn scsi_address(dir: &Path) -> Option<ScsiAddress> {
    let target = fs::read_link(dir.join("device")).ok()?;
    let name = target.file_name()?.to_str()?;
    parse_scsi_address(name)
}

/// Parses `H:C:T:L`, the name of a SCSI device in sysfs.
pub fn parse_scsi_address(s: &str) -> Option<ScsiAddress> {
    let mut it = s.split(':').map(|p| p.parse::<u32>());
    let addr = ScsiAddress {
        host: it.next()?.ok()?,
        channel: it.next()?.ok()?,
        target: it.next()?.ok()?,
        lun: it.next()?.ok()?,
    };
    it.next().is_none().then_some(addr)
}

pub(crate) fn partitions(roots: &HostRoots, db: &dyn UdevDb, disk: &str) -> Vec<Partition> {
    let dir = roots.sys_block(disk);
    let mut parts: Vec<Partition> = read_dir_names(&dir)
        .into_iter()
        .filter(|name| name.starts_with(disk) && dir.join(name).join("partition").is_file())
        .filter_map(|name| {
            let pdir = dir.join(&name);
            let (major, minor) = read_devnum(&pdir.join("dev"))?;
            let props = db.properties(&name).unwrap_or_default();
            Some(Partition {
                number: read_u64(&pdir.join("partition")).unwrap_or(0) as u32,
                dev_node: dev_node(roots, &name, &props),
                major,
                minor,
                size_bytes: read_u64(&pdir.join("size")).unwrap_or(0) * 512,
                fs_type: prop(&props, "ID_FS_TYPE").unwrap_or_default(),
                fs_uuid: prop(&props, "ID_FS_UUID").unwrap_or_default(),
                fs_label: prop(&props, "ID_FS_LABEL").unwrap_or_default(),
                part_name: prop(&props, "ID_PART_ENTRY_NAME").unwrap_or_default(),
                holders: holders_of(roots, db, &pdir, &mut HashSet::new(), 0),
                kernel_name: name,
            })
        })
        .collect();
    parts.sort_by_key(|p| p.number);
    parts
}

/// Devices stacked on the device whose sysfs directory is `dir`, recursively. `seen` breaks cycles, which real
/// kernels never produce but a corrupt or hostile tree could.
pub(crate) fn holders_of(
    roots: &HostRoots,
    db: &dyn UdevDb,
    dir: &Path,
    seen: &mut HashSet<String>,
    depth: usize,
) -> Vec<Holder> {
    if depth >= MAX_HOLDER_DEPTH {
        return Vec::new();
    }
    let mut holders = Vec::new();
    for name in read_dir_names(&dir.join("holders")) {
        if !seen.insert(name.clone()) {
            continue;
        }
        let hdir = roots.sys_block(&name);
        let (major, minor) = read_devnum(&hdir.join("dev")).unwrap_or((0, 0));
        let dm_name = read_trimmed(&hdir.join("dm/name"));
        let uuid = read_trimmed(&hdir.join("dm/uuid"));
        let props = db.properties(&name).unwrap_or_default();
        let kind = holder_kind(&hdir, &uuid);
        let (name_field, node) = match kind {
            HolderKind::DmCrypt | HolderKind::Lvm | HolderKind::Multipath | HolderKind::DmOther
                if !dm_name.is_empty() =>
            {
                let node = roots.dev.join("mapper").join(&dm_name).to_string_lossy().into_owned();
                (dm_name, node)
            }
            HolderKind::Md => (prop(&props, "MD_DEVNAME").unwrap_or_default(), dev_node(roots, &name, &props)),
            _ => (dm_name, dev_node(roots, &name, &props)),
        };
        holders.push(Holder {
            dev_node: node,
            major,
            minor,
            kind: kind as i32,
            name: name_field,
            uuid,
            fs_type: prop(&props, "ID_FS_TYPE").unwrap_or_default(),
            holders: holders_of(roots, db, &hdir, seen, depth + 1),
            kernel_name: name,
        });
    }
    holders
}

fn holder_kind(dir: &Path, dm_uuid: &str) -> HolderKind {
    if dir.join("dm").is_dir() {
        if dm_uuid.starts_with("CRYPT-") {
            HolderKind::DmCrypt
        } else if dm_uuid.starts_with("LVM-") {
            HolderKind::Lvm
        } else if dm_uuid.starts_with("mpath-") {
            HolderKind::Multipath
        } else {
            HolderKind::DmOther
        }
    } else if dir.join("md").is_dir() {
        HolderKind::Md
    } else {
        HolderKind::Other
    }
}

fn read_dir_names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .map(|rd| rd.filter_map(|e| e.ok()).map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default();
    names.sort();
    names
}

fn read_trimmed(path: &Path) -> String {
    fs::read_to_string(path).map(|s| s.trim().to_string()).unwrap_or_default()
}

fn read_u64(path: &Path) -> Option<u64> {
    read_trimmed(path).parse().ok()
}

/// Parses a sysfs `dev` file (`MAJOR:MINOR`).
pub fn read_devnum(path: &Path) -> Option<(u32, u32)> {
    let s = read_trimmed(path);
    let (ma, mi) = s.split_once(':')?;
    Some((ma.parse().ok()?, mi.parse().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::udev_db::FixtureUdevDb;
    use std::os::unix::fs::symlink;

    /// A fixture tree shaped like a guest's sysfs: devices live under /sys/devices, /sys/block has links.
    struct Tree {
        dir: tempfile::TempDir,
        db: FixtureUdevDb,
    }

    impl Tree {
        fn new() -> Self {
            Self { dir: tempfile::tempdir().unwrap(), db: FixtureUdevDb::default() }
        }
        fn roots(&self) -> HostRoots {
            HostRoots::under(self.dir.path())
        }
        fn write(&self, rel: &str, content: &str) {
            let p = self.dir.path().join(rel);
            fs::create_dir_all(p.parent().unwrap()).unwrap();
            fs::write(p, content).unwrap();
        }
        fn link(&self, rel: &str, target: &str) {
            let p = self.dir.path().join(rel);
            fs::create_dir_all(p.parent().unwrap()).unwrap();
            symlink(target, p).unwrap();
        }
        fn props(&mut self, name: &str, kv: &[(&str, &str)]) {
            self.db.0.insert(name.into(), kv.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect());
        }
        /// A virtio-scsi disk at 0:0:0:3 with the udev properties of QEMU `scsi-hd,serial=..,device_id=..`.
        fn scsi_disk(&mut self, name: &str, minor: u32, serial: &str, device_id: &str) {
            let dev = "devices/pci0000:00/virtio2/host0/target0:0:0/0:0:0:3";
            self.write(&format!("sys/{dev}/vendor"), "QEMU    \n");
            self.link(&format!("sys/{dev}/subsystem"), "../../../../../bus/scsi");
            self.write(&format!("sys/block/{name}/dev"), &format!("8:{minor}\n"));
            self.write(&format!("sys/block/{name}/size"), "2097152\n");
            self.write(&format!("sys/block/{name}/ro"), "0\n");
            self.write(&format!("sys/block/{name}/diskseq"), &format!("{}\n", 40 + minor));
            self.write(&format!("sys/block/{name}/queue/logical_block_size"), "512\n");
            self.link(&format!("sys/block/{name}/device"), &format!("../../{dev}"));
            let link = format!("/dev/disk/by-id/scsi-0QEMU_QEMU_HARDDISK_{device_id}");
            let links = format!("{link} /dev/disk/by-path/pci-0000:00:01.0-scsi-0:0:0:3");
            self.props(
                name,
                &[
                    ("DEVNAME", &format!("/dev/{name}")),
                    ("ID_BUS", "scsi"),
                    ("ID_VENDOR", "QEMU"),
                    ("ID_MODEL", "QEMU_HARDDISK"),
                    ("ID_SERIAL", &format!("0QEMU_QEMU_HARDDISK_{device_id}")),
                    ("ID_SERIAL_SHORT", device_id),
                    ("ID_SCSI_SERIAL", serial),
                    ("DEVLINKS", &links),
                ],
            );
        }
    }

    #[test]
    fn scsi_disk_with_device_id_is_keyed_by_its_vpd80_serial() {
        let mut t = Tree::new();
        t.scsi_disk("sdb", 16, "a-serial-longer-than-20", "short-id");
        let d = describe(&t.roots(), &t.db, "sdb").unwrap();
        assert_eq!(d.serial, "a-serial-longer-than-20");
        assert_eq!(d.device_id, "short-id");
        assert_eq!(d.id, "a-serial-longer-than-20");
        assert_eq!(d.bus(), Bus::Scsi);
        assert_eq!((d.major, d.minor), (8, 16));
        assert_eq!(d.diskseq, 56, "the kernel's sequence number tells a re-plugged disk from this one");
        assert_eq!(d.size_bytes, 1 << 30);
        assert_eq!(d.dev_node, "/dev/sdb");
        assert_eq!(d.by_id_links, vec!["/dev/disk/by-id/scsi-0QEMU_QEMU_HARDDISK_short-id"]);
        assert_eq!(d.by_path_links.len(), 1);
        assert_eq!(d.scsi_address, Some(ScsiAddress { host: 0, channel: 0, target: 0, lun: 3 }));
        assert_eq!((d.vendor.as_str(), d.model.as_str()), ("QEMU", "QEMU_HARDDISK"));
        assert!(is_physical_disk(&t.roots(), "sdb"));
    }

    #[test]
    fn disk_with_serial_is_not_reported_before_its_by_id_link() {
        let mut t = Tree::new();
        t.scsi_disk("sdc", 32, "data-1", "data-1");
        t.db.0.get_mut("sdc").unwrap().remove("DEVLINKS");
        assert_eq!(describe(&t.roots(), &t.db, "sdc"), None);
    }

    #[test]
    fn disk_not_yet_in_udev_db_is_not_reported() {
        let mut t = Tree::new();
        t.scsi_disk("sdc", 32, "data-1", "data-1");
        t.db.0.clear();
        assert_eq!(describe(&t.roots(), &t.db, "sdc"), None);
    }

    #[test]
    fn virtio_blk_serial_and_disk_without_serial() {
        let mut t = Tree::new();
        t.write("sys/devices/pci0000:00/0000:00:05.0/virtio3/block/vdb/dev", "254:16\n");
        t.link("sys/devices/pci0000:00/0000:00:05.0/virtio3/subsystem", "../../../../bus/virtio");
        t.link("sys/block/vdb", "../devices/pci0000:00/0000:00:05.0/virtio3/block/vdb");
        t.link("sys/devices/pci0000:00/0000:00:05.0/virtio3/block/vdb/device", "../../../virtio3");
        t.write("sys/devices/pci0000:00/0000:00:05.0/virtio3/block/vdb/serial", "vserial\n");
        t.props("vdb", &[("DEVNAME", "/dev/vdb"), ("DEVLINKS", "/dev/disk/by-id/virtio-vserial")]);
        let d = describe(&t.roots(), &t.db, "vdb").unwrap();
        assert_eq!(d.bus(), Bus::VirtioBlk);
        assert_eq!(d.serial, "vserial", "falls back to sysfs serial when udev has no ID_SERIAL");
        assert_eq!(d.id, "vserial");

        t.write("sys/block/vdc/dev", "254:32\n");
        t.link("sys/block/vdc/device", "../../devices/pci0000:00/0000:00:05.0/virtio3");
        t.props("vdc", &[("DEVNAME", "/dev/vdc")]);
        let d = describe(&t.roots(), &t.db, "vdc").unwrap();
        assert_eq!((d.serial.as_str(), d.id.as_str()), ("", "vdc"), "listed by device name");
        assert_eq!(d.diskseq, 0, "a kernel before 5.15 numbers no disks");
    }

    #[test]
    fn partitions_and_recursive_holders() {
        let mut t = Tree::new();
        t.scsi_disk("sdb", 16, "s1", "s1");
        for (n, minor) in [(1, 17), (2, 18)] {
            t.write(&format!("sys/block/sdb/sdb{n}/partition"), &format!("{n}\n"));
            t.write(&format!("sys/block/sdb/sdb{n}/dev"), &format!("8:{minor}\n"));
            t.write(&format!("sys/block/sdb/sdb{n}/size"), "2048\n");
        }
        t.props("sdb1", &[("ID_FS_TYPE", "crypto_LUKS"), ("DEVNAME", "/dev/sdb1")]);
        t.props("sdb2", &[("ID_FS_TYPE", "swap")]);
        // sdb1 -> dm-0 (crypt) -> dm-1 (LVM), and a cycle dm-1 -> dm-0 that must not loop forever.
        fs::create_dir_all(t.dir.path().join("sys/block/sdb/sdb1/holders/dm-0")).unwrap();
        t.write("sys/block/dm-0/dev", "253:0\n");
        t.write("sys/block/dm-0/dm/name", "cryptdata\n");
        t.write("sys/block/dm-0/dm/uuid", "CRYPT-LUKS2-abc-cryptdata\n");
        fs::create_dir_all(t.dir.path().join("sys/block/dm-0/holders/dm-1")).unwrap();
        t.write("sys/block/dm-1/dev", "253:1\n");
        t.write("sys/block/dm-1/dm/name", "vg0-data\n");
        t.write("sys/block/dm-1/dm/uuid", "LVM-xyz\n");
        fs::create_dir_all(t.dir.path().join("sys/block/dm-1/holders/dm-0")).unwrap();
        t.props("dm-1", &[("ID_FS_TYPE", "ext4")]);

        let d = describe(&t.roots(), &t.db, "sdb").unwrap();
        assert_eq!(d.partitions.len(), 2);
        let p1 = &d.partitions[0];
        assert_eq!((p1.number, p1.kernel_name.as_str(), p1.fs_type.as_str()), (1, "sdb1", "crypto_LUKS"));
        assert_eq!(d.partitions[1].dev_node, t.roots().dev.join("sdb2").to_string_lossy());
        let crypt = &p1.holders[0];
        assert_eq!(crypt.kind(), HolderKind::DmCrypt);
        assert_eq!(crypt.name, "cryptdata");
        assert!(crypt.dev_node.ends_with("/mapper/cryptdata"));
        let lv = &crypt.holders[0];
        assert_eq!((lv.kind(), lv.name.as_str(), lv.fs_type.as_str()), (HolderKind::Lvm, "vg0-data", "ext4"));
        assert!(lv.holders.is_empty(), "the cycle back to dm-0 is cut");
    }

    #[test]
    fn virtual_devices_are_not_physical_disks() {
        let t = Tree::new();
        t.write("sys/block/loop0/dev", "7:0\n");
        assert!(!is_physical_disk(&t.roots(), "loop0"));
    }

    #[test]
    fn scsi_address_parser_rejects_garbage() {
        assert_eq!(parse_scsi_address("2:0:1:7"), Some(ScsiAddress { host: 2, channel: 0, target: 1, lun: 7 }));
        for bad in ["", "0:0:0", "0:0:0:0:0", "a:b:c:d", "0:0:0:-1", "host0"] {
            assert_eq!(parse_scsi_address(bad), None, "{bad}");
        }
    }

    #[test]
    fn devnum_parser_rejects_garbage() {
        let t = Tree::new();
        for (content, want) in [("8:16\n", Some((8, 16))), ("8\n", None), ("x:1", None), ("", None)] {
            t.write("f", content);
            assert_eq!(read_devnum(&t.dir.path().join("f")), want, "{content:?}");
        }
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        const KEYS: &[&str] = &[
            "DEVNAME",
            "DEVLINKS",
            "ID_SERIAL",
            "ID_SERIAL_SHORT",
            "ID_SCSI_SERIAL",
            "ID_VENDOR",
            "ID_MODEL",
            "ID_WWN",
            "ID_WWN_WITH_EXTENSION",
            "ID_FS_TYPE",
            "ID_FS_UUID",
            "ID_FS_LABEL",
            "ID_BUS",
        ];

        proptest! {
            /// Whatever udev's database holds (any text, control characters included), describing a disk never
            /// panics, and what is reported comes from it faithfully: trimmed values, whitespace-free links.
            #[test]
            fn any_udev_properties_describe_safely(
                values in proptest::collection::vec((0..KEYS.len(), "\\PC*|[ \t\n\x0b\x00a-z/_-]*"), 0..12),
            ) {
                let mut t = Tree::new();
                t.scsi_disk("sdb", 16, "s", "s");
                let props: Properties = values.iter().map(|(k, v)| (KEYS[*k].to_string(), v.clone())).collect();
                t.db.0.insert("sdb".into(), props.clone());
                if let Some(d) = describe(&t.roots(), &t.db, "sdb") {
                    prop_assert!(d.by_id_links.iter().chain(&d.by_path_links).all(|l| !l.contains(char::is_whitespace)));
                    prop_assert_eq!(&d.serial, &d.serial.trim().to_string());
                    if !d.serial.is_empty() {
                        prop_assert!(!d.by_id_links.is_empty(), "a disk with a serial is reported only with its link");
                    }
                    for (key, got) in [("ID_FS_TYPE", &d.fs_type), ("ID_FS_UUID", &d.fs_uuid), ("ID_FS_LABEL", &d.fs_label)] {
                        if let Some(v) = props.get(key) {
                            prop_assert_eq!(got, &v.trim().to_string());
                        }
                    }
                }
            }

            #[test]
            fn scsi_addresses_round_trip_and_junk_is_refused(
                h in any::<u32>(), c in any::<u32>(), tg in any::<u32>(), l in any::<u32>(), junk in "\\PC*",
            ) {
                let a = parse_scsi_address(&format!("{h}:{c}:{tg}:{l}")).unwrap();
                prop_assert_eq!((a.host, a.channel, a.target, a.lun), (h, c, tg, l));
                let longer = format!("{h}:{c}:{tg}:{l}:{junk}");
                prop_assert!(parse_scsi_address(&longer).is_none());
                let _ = parse_scsi_address(&junk);
            }
        }
    }
}
