//! The scan itself: blocking reads of `/proc`, `/sys` and `/dev`, one pass for any number of disks.
//!
//! Files are matched by device number, never by path: `stat` of `/proc/<pid>/fd/<n>` reaches the open file itself,
//! whatever mount namespace, chroot or deleted path it lives in. A process that exits mid-scan, or one entry we may
//! not read, is skipped; it never fails the scan.

use super::procfs_parse::{MountEntry, OverlayLayer, overlay_layers, parse_mountinfo, parse_swaps};
mod processes;

use super::procfs_scan::ProcfsSource;
use super::source::{NamespaceTask, ProcessSource, SourceError};
use super::target::{Role, Target, describe_holder, holder_hint};
use crate::roots::{HostRoots, resolve_dev_path};
use crate::system::SYSTEM_MOUNTS;
use nix::fcntl::OFlag;
use nix::sys::stat::{Mode, major, makedev, minor, stat};
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::Instant;
use wukong_proto::v1::{
    Blocker, BlockerKind, HolderUse, KernelClaim, LoopUse, MountUse, StackedLayer, SwapUse, SystemUse, blocker::Detail,
};

/// The scan ran past its deadline.
#[derive(Debug, Clone, thiserror::Error)]
#[error("the usage scan did not finish within its deadline")]
pub struct DeadlineExceeded;

/// A filesystem of one of the targets, by its st_dev.
#[derive(Debug, Clone)]
struct Filesystem {
    target: usize,
    /// The device node, e.g. "/dev/sdb1".
    node: String,
    /// e.g. "/dev/sdb1 (ext4, mounted at /data)".
    label: String,
}

/// What the scan learns before looking at processes.
struct Index<'a> {
    targets: &'a [Target],
    /// Block devices (st_rdev) of the targets.
    devices: HashMap<u64, usize>,
    /// Filesystems (st_dev of their files) of the targets.
    filesystems: HashMap<u64, Filesystem>,
    /// Device numbers of every mount in every namespace: an anonymous st_dev outside this set is a btrfs
    /// subvolume that no mount names.
    mounted_devs: HashSet<u64>,
    /// btrfs filesystems (fsid) of the targets.
    btrfs_fsids: HashMap<[u8; 16], usize>,
    /// Stacked filesystems (overlays with a layer on a target), by the id of each of their mounts in any namespace.
    /// A file of an overlay whose layers span filesystems carries a per-layer device number no mount names; the
    /// mount it was opened through says which overlay it belongs to.
    stacked_mounts: HashMap<u32, Filesystem>,
}

/// One mount namespace as the scan read it: its inode, the task it was read through and its mount table.
struct Namespace {
    inode: u64,
    task: NamespaceTask,
    is_host: bool,
    mounts: Vec<MountEntry>,
}

impl Namespace {
    /// e.g. "the host mount namespace", "mount namespace 4026532 (of pid 812, containerd-shim)", "mount namespace
    /// 4026533 (of thread 905 of pid 901, mounter)".
    fn describe(&self, roots: &HostRoots) -> String {
        let NamespaceTask { pid, thread } = self.task;
        if self.is_host {
            return "the host mount namespace".to_string();
        }
        let thread = if thread == 0 { String::new() } else { format!("thread {thread} of ") };
        format!("mount namespace {} (of {thread}pid {pid}, {})", self.inode, read_comm(&roots.proc, pid))
    }

    /// Its task's directory in /proc: the mount table and root directory the namespace's paths resolve in.
    fn dir(&self, roots: &HostRoots) -> PathBuf {
        self.task.dir(&roots.proc)
    }

    fn mount_use(&self, m: &MountEntry) -> MountUse {
        MountUse {
            mount_point: m.mount_point.clone(),
            fs_type: m.fs_type.clone(),
            root: m.root.clone(),
            options: m.options.clone(),
            read_only: m.read_only(),
            mount_namespace: self.inode,
            host_namespace: self.is_host,
            namespace_pid: self.task.pid,
            namespace_thread: self.task.thread,
            mount_id: m.mount_id,
            ..MountUse::default()
        }
    }
}

/// Which analyses a scan runs beyond the ones every scan needs.
#[derive(Debug, Clone, Copy)]
pub struct Analyses {
    /// Filesystems stacked on a target (overlayfs layers on it) and the processes using files through them. Always
    /// on in the agent; the usage benchmark turns it off to measure what it costs.
    pub stacked_mounts: bool,
}

/// Scans for every blocker of every target, with the processes `source` finds. Returns one list per target, in
/// order.
pub fn scan(
    roots: &HostRoots,
    targets: &[Target],
    deadline: Instant,
    analyses: Analyses,
    source: &dyn ProcessSource,
) -> Result<Vec<Vec<Blocker>>, DeadlineExceeded> {
    let mut blockers = vec![Vec::new(); targets.len()];
    let mut index = Index {
        targets,
        devices: HashMap::new(),
        filesystems: HashMap::new(),
        mounted_devs: HashSet::new(),
        btrfs_fsids: HashMap::new(),
        stacked_mounts: HashMap::new(),
    };
    for (i, t) in targets.iter().enumerate() {
        for d in &t.devices {
            index.devices.insert(makedev(d.major.into(), d.minor.into()), i);
        }
    }
    let first = ask(source, |s| s.mount_namespaces(&roots.proc));
    let namespaces = scan_mounts(roots, first, &mut index, &mut blockers);
    if analyses.stacked_mounts {
        scan_stacked(roots, &namespaces, &mut index, &mut blockers);
    }
    scan_holders(targets, &mut blockers);
    scan_swaps(roots, &index, &mut blockers);
    scan_loops(roots, &index, &mut blockers);
    if !index.devices.is_empty() {
        let devices: BTreeSet<u64> = index.devices.keys().chain(index.filesystems.keys()).copied().collect();
        let candidates = ask(source, |s| s.candidates(&roots.proc, &devices));
        processes::scan_processes(roots, &candidates, &index, &mut blockers, deadline)?;
    }
    scan_kernel_claims(roots, targets, &mut blockers);
    Ok(blockers)
}

/// `source`'s answer, or /proc's when it fails mid-scan (an iterator that cannot be read): a scan never fails for
/// its source.
fn ask<T>(source: &dyn ProcessSource, question: impl Fn(&dyn ProcessSource) -> Result<T, SourceError>) -> T {
    question(source).unwrap_or_else(|e| {
        tracing::warn!(source = source.name(), error = %e, "the usage scan's process source failed; this scan reads /proc");
        question(&ProcfsSource).expect("the /proc source answers")
    })
}

fn blocker(kind: BlockerKind, device: &str, message: String, detail: Detail) -> Blocker {
    Blocker { kind: kind as i32, message, device: device.to_string(), detail: Some(detail) }
}

fn read_comm(proc_root: &Path, pid: i32) -> String {
    std::fs::read_to_string(proc_root.join(pid.to_string()).join("comm"))
        .map(|s| s.trim_end().to_string())
        .unwrap_or_else(|_| "?".into())
}

// --- mounts ----------------------------------------------------------------------------------------------------

/// Reads mountinfo once per distinct mount namespace (through `first`, namespace → the task to read it through) and
/// reports mounts of the targets' devices; records their filesystems for the process scan. Returns the namespaces
/// read, for the stacked-mount analysis.
fn scan_mounts(
    roots: &HostRoots,
    first: BTreeMap<u64, NamespaceTask>,
    index: &mut Index<'_>,
    blockers: &mut [Vec<Blocker>],
) -> Vec<Namespace> {
    let host_ns = NamespaceTask { pid: 1, thread: 0 }
        .namespace(&roots.proc)
        .or_else(|| stat(&roots.proc.join("self/ns/mnt")).ok().map(|s| s.st_ino));
    let btrfs = btrfs_members(roots);
    for (fsid, members) in btrfs.values() {
        if let Some(&t) = members.iter().find_map(|m| index.devices.get(m)) {
            index.btrfs_fsids.insert(*fsid, t);
        }
    }
    let mut namespaces = Vec::new();
    for (inode, task) in first {
        let Ok(text) = std::fs::read_to_string(task.dir(&roots.proc).join("mountinfo")) else { continue };
        let ns = Namespace { inode, task, is_host: Some(inode) == host_ns, mounts: parse_mountinfo(&text) };
        // Described only for namespaces that do mount a target: reading comm for every container is wasted.
        let mut where_: Option<String> = None;
        index.mounted_devs.extend(ns.mounts.iter().map(|m| makedev(m.major.into(), m.minor.into())));
        for m in &ns.mounts {
            let Some(target) = mount_target(roots, m, index, &btrfs) else { continue };
            let device = source_label(index, target, m);
            let bind = if m.root != "/" { format!(", a bind mount of {} on it", m.root) } else { String::new() };
            let fs_dev = makedev(m.major.into(), m.minor.into());
            index.filesystems.entry(fs_dev).or_insert_with(|| Filesystem {
                target,
                node: device.clone(),
                label: format!("{device} ({}, mounted at {})", m.fs_type, m.mount_point),
            });
            if m.fs_type == "btrfs" {
                // Files on btrfs carry their subvolume's device number, not the superblock's that mountinfo
                // shows: learn it from the mount point, seen through a process of that namespace.
                let seen_from = ns.dir(roots).join("root");
                if let Ok(st) = stat(&seen_from.join(m.mount_point.trim_start_matches('/'))) {
                    index.filesystems.entry(st.st_dev).or_insert_with(|| Filesystem {
                        target,
                        node: device.clone(),
                        label: format!("{device} (btrfs, mounted at {})", m.mount_point),
                    });
                }
            }
            system_blocker(&ns, m, &device, &mut blockers[target]);
            blockers[target].push(blocker(
                BlockerKind::Mount,
                &device,
                format!(
                    "{device} is mounted at {} ({}{bind}) in {}",
                    m.mount_point,
                    m.fs_type,
                    where_.get_or_insert_with(|| ns.describe(roots))
                ),
                Detail::Mount(ns.mount_use(m)),
            ));
        }
        namespaces.push(ns);
    }
    namespaces
}

/// A disk holding `/`, `/boot`, `/usr` or `/var` of the host, directly or through a filesystem stacked on it.
fn system_blocker(ns: &Namespace, m: &MountEntry, device: &str, blockers: &mut Vec<Blocker>) {
    if ns.is_host && SYSTEM_MOUNTS.contains(&m.mount_point.as_str()) {
        blockers.push(blocker(
            BlockerKind::System,
            device,
            format!("{device} holds {} of the running system; it can never be detached", m.mount_point),
            Detail::System(SystemUse { reason: format!("{} is mounted from {device}", m.mount_point) }),
        ));
    }
}

// --- stacked filesystems ---------------------------------------------------------------------------------------

/// Overlay mounts with a layer (lower, upper, work or data directory) on a target's filesystem, in every
/// namespace. Their files carry the overlay's own device number, so they are recorded as filesystems of the
/// target: the process scan then finds who uses the disk through them. An overlay on an overlay on the disk is
/// found too (the outer one once the inner one is known).
fn scan_stacked(roots: &HostRoots, namespaces: &[Namespace], index: &mut Index<'_>, blockers: &mut [Vec<Blocker>]) {
    let mut pending: Vec<(&Namespace, &MountEntry, Vec<OverlayLayer>)> = namespaces
        .iter()
        .flat_map(|ns| ns.mounts.iter().filter(|m| m.fs_type == "overlay").map(move |m| (ns, m)))
        .map(|(ns, m)| (ns, m, overlay_layers(&m.super_options)))
        .collect();
    loop {
        let before = pending.len();
        pending.retain(|(ns, m, layers)| !report_stacked(roots, ns, m, layers, index, blockers));
        if pending.len() == before {
            break;
        }
    }
}

/// Reports one overlay mount if a layer is on a target; true when it was.
fn report_stacked(
    roots: &HostRoots,
    ns: &Namespace,
    m: &MountEntry,
    layers: &[OverlayLayer],
    index: &mut Index<'_>,
    blockers: &mut [Vec<Blocker>],
) -> bool {
    // Layer paths are as the mounter gave them, resolved in its namespace: seen through a process there.
    let seen_from = ns.dir(roots).join("root");
    let relative_to = relative_base(&seen_from, &m.mount_point, layers);
    let on: Vec<(&OverlayLayer, String, Filesystem)> = layers
        .iter()
        .filter_map(|l| {
            let path = match &relative_to {
                _ if l.path.starts_with('/') => l.path.clone(),
                Some(base) => Path::new(base).join(&l.path).display().to_string(),
                None => return None,
            };
            let st = stat(&seen_from.join(path.trim_start_matches('/'))).ok()?;
            Some((l, path, index.filesystems.get(&st.st_dev)?.clone()))
        })
        .collect();
    if on.is_empty() {
        return false;
    }
    let overlay_dev = makedev(m.major.into(), m.minor.into());
    let mut by_target: BTreeMap<usize, Vec<&(&OverlayLayer, String, Filesystem)>> = BTreeMap::new();
    for hit in &on {
        by_target.entry(hit.2.target).or_default().push(hit);
    }
    let where_ = ns.describe(roots);
    for (target, hits) in by_target {
        // Which layers are on which of the target's filesystems, e.g. "lowerdir /d/l and upperdir /d/u on /dev/sdb1
        // (ext4, mounted at /d)".
        let mut per_fs: BTreeMap<&str, Vec<String>> = BTreeMap::new();
        for (l, path, fs) in &hits {
            per_fs.entry(fs.label.as_str()).or_default().push(format!("{} {path}", l.option));
        }
        let layers_text: Vec<String> = per_fs.iter().map(|(fs, ls)| format!("{} on {fs}", join_and(ls))).collect();
        let label = format!("{} mounted at {} in {where_}", m.fs_type, m.mount_point);
        let device = hits[0].2.node.clone();
        let fs = Filesystem { target, node: device.clone(), label: label.clone() };
        index.filesystems.entry(overlay_dev).or_insert_with(|| fs.clone());
        index.stacked_mounts.insert(m.mount_id, fs);
        system_blocker(ns, m, &device, &mut blockers[target]);
        blockers[target].push(blocker(
            BlockerKind::StackedMount,
            &device,
            format!(
                "{label} is stacked on this disk: its {}; it must be unmounted before the disk",
                layers_text.join("; its ")
            ),
            Detail::Mount(MountUse {
                layers: hits
                    .iter()
                    .map(|(l, path, fs)| StackedLayer {
                        option: l.option.to_string(),
                        path: path.clone(),
                        on: fs.label.clone(),
                    })
                    .collect(),
                layers_relative_to: relative_to.clone().unwrap_or_default(),
                ..ns.mount_use(m)
            }),
        ));
    }
    true
}

/// The directory an overlay's relative layer paths were given against, when it has any. The kernel keeps the paths
/// as given but not the mounter's working directory. Docker and Podman give every path relative to their storage
/// driver's home and mount at `<home>/<id>/merged`; containerd makes only its lower directories relative, to the
/// snapshots directory its absolute upper one is in. So: the nearest ancestor of the mount point, else of an
/// absolute layer, under which every relative layer exists. None when there is none (they cannot be followed).
fn relative_base(seen_from: &Path, mount_point: &str, layers: &[OverlayLayer]) -> Option<String> {
    let relative: Vec<&str> = layers.iter().map(|l| l.path.as_str()).filter(|p| !p.starts_with('/')).collect();
    if relative.is_empty() {
        return None;
    }
    let absolute = layers.iter().map(|l| Path::new(&l.path)).filter(|p| p.is_absolute());
    // Each path's own directory is not a candidate: the mount point shows the overlay now, not what is beneath it.
    std::iter::once(Path::new(mount_point))
        .chain(absolute)
        .flat_map(|p| p.ancestors().skip(1))
        .find(|dir| {
            let dir = seen_from.join(dir.strip_prefix("/").unwrap_or(dir));
            relative.iter().all(|layer| dir.join(layer).exists())
        })
        .map(|dir| dir.display().to_string())
}

/// "a", "a and b", "a, b and c".
fn join_and(items: &[String]) -> String {
    match items {
        [] => String::new(),
        [one] => one.clone(),
        [rest @ .., last] => format!("{} and {last}", rest.join(", ")),
    }
}

/// Which target a mount belongs to: its device number, or for btrfs (anonymous `0:N` numbers) the devices of the
/// filesystem its source belongs to.
fn mount_target(
    roots: &HostRoots,
    m: &MountEntry,
    index: &Index<'_>,
    btrfs: &HashMap<u64, ([u8; 16], Vec<u64>)>,
) -> Option<usize> {
    if let Some(&t) = index.devices.get(&makedev(m.major.into(), m.minor.into())) {
        return Some(t);
    }
    if m.fs_type != "btrfs" || !m.source.starts_with('/') {
        return None;
    }
    let source = stat(&resolve_dev_path(roots, &m.source)).ok()?;
    let (_, members) = btrfs.get(&source.st_rdev)?;
    members.iter().find_map(|dev| index.devices.get(dev).copied())
}

/// For each btrfs member device (st_rdev): its filesystem's fsid and all member devices.
fn btrfs_members(roots: &HostRoots) -> HashMap<u64, ([u8; 16], Vec<u64>)> {
    let mut map = HashMap::new();
    let Ok(filesystems) = std::fs::read_dir(roots.sys.join("fs/btrfs")) else { return map };
    for fs in filesystems.flatten() {
        let Some(fsid) = parse_uuid(&fs.file_name().to_string_lossy()) else { continue };
        let Ok(devs) = std::fs::read_dir(fs.path().join("devices")) else { continue };
        let members: Vec<u64> = devs
            .flatten()
            .filter_map(|d| crate::disk::read_devnum(&d.path().join("dev")))
            .map(|(ma, mi)| makedev(ma.into(), mi.into()))
            .collect();
        for &m in &members {
            map.insert(m, (fsid, members.clone()));
        }
    }
    map
}

/// Parses a textual UUID (the name of a /sys/fs/btrfs entry) into its 16 bytes.
fn parse_uuid(s: &str) -> Option<[u8; 16]> {
    let hex: String = s.chars().filter(|c| *c != '-').collect();
    if hex.len() != 32 {
        return None;
    }
    let mut out = [0u8; 16];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

/// `struct btrfs_ioctl_fs_info_args` from <linux/btrfs.h> (1 KiB); only the fsid is read.
#[repr(C)]
struct BtrfsFsInfo {
    max_id: u64,
    num_devices: u64,
    fsid: [u8; 16],
    rest: [u8; 1024 - 32],
}

nix::ioctl_read!(btrfs_fs_info, 0x94, 31, BtrfsFsInfo);

/// The btrfs filesystem (fsid) a file belongs to, asked of the kernel through the file itself.
fn btrfs_fsid_of(path: &Path) -> Option<[u8; 16]> {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags((OFlag::O_NONBLOCK | OFlag::O_NOCTTY).bits())
        .open(path)
        .ok()?;
    let mut info = std::mem::MaybeUninit::<BtrfsFsInfo>::zeroed();
    // SAFETY: BTRFS_IOC_FS_INFO fills a btrfs_ioctl_fs_info_args, which BtrfsFsInfo mirrors in size and layout.
    unsafe { btrfs_fs_info(file.as_raw_fd(), info.as_mut_ptr()) }.ok()?;
    // SAFETY: zero-initialised, then written by the kernel.
    Some(unsafe { info.assume_init() }.fsid)
}

fn source_label(index: &Index<'_>, target: usize, m: &MountEntry) -> String {
    index.targets[target].device(m.major, m.minor).map(|d| d.node.clone()).unwrap_or_else(|| m.source.clone())
}

// --- holders, swap, loop ---------------------------------------------------------------------------------------

fn scan_holders(targets: &[Target], blockers: &mut [Vec<Blocker>]) {
    for (i, t) in targets.iter().enumerate() {
        for d in &t.devices {
            if let Role::Holder { holder, under } = &d.role {
                let on = t.devices.iter().find(|x| &x.kernel_name == under).map(|x| x.node.as_str()).unwrap_or(under);
                blockers[i].push(blocker(
                    BlockerKind::Holder,
                    &d.node,
                    format!("{} is active on {on}; {} first", describe_holder(holder), holder_hint(holder)),
                    Detail::Holder(HolderUse { holder: Some(holder.clone()) }),
                ));
            }
        }
    }
}

fn scan_swaps(roots: &HostRoots, index: &Index<'_>, blockers: &mut [Vec<Blocker>]) {
    let Ok(text) = std::fs::read_to_string(roots.proc.join("swaps")) else { return };
    for s in parse_swaps(&text) {
        let Ok(st) = stat(&resolve_dev_path(roots, &s.path)) else { continue };
        let is_file = s.kind == "file";
        let (target, device, message) = if is_file {
            let Some(fs) = index.filesystems.get(&st.st_dev) else { continue };
            (fs.target, fs.node.clone(), format!("swap file {} on {} is active; swapoff it first", s.path, fs.label))
        } else {
            let Some(&t) = index.devices.get(&st.st_rdev) else { continue };
            let node =
                index.targets[t].device(major(st.st_rdev) as u32, minor(st.st_rdev) as u32).map(|d| d.node.clone());
            let node = node.unwrap_or_else(|| s.path.clone());
            let msg =
                format!("{node} is active swap ({} KiB, {} KiB in use); swapoff it first", s.size_kib, s.used_kib);
            (t, node, msg)
        };
        blockers[target].push(blocker(
            BlockerKind::Swap,
            &device,
            message,
            Detail::Swap(SwapUse {
                path: s.path.clone(),
                is_file,
                size_bytes: s.size_kib * 1024,
                used_bytes: s.used_kib * 1024,
            }),
        ));
    }
}

/// `struct loop_info64` from <linux/loop.h>.
#[repr(C)]
struct LoopInfo64 {
    lo_device: u64,
    lo_inode: u64,
    lo_rdevice: u64,
    lo_offset: u64,
    lo_sizelimit: u64,
    lo_number: u32,
    lo_encrypt_type: u32,
    lo_encrypt_key_size: u32,
    lo_flags: u32,
    lo_file_name: [u8; 64],
    lo_crypt_name: [u8; 64],
    lo_encrypt_key: [u8; 32],
    lo_init: [u64; 2],
}

nix::ioctl_read_bad!(loop_get_status64, 0x4C05, LoopInfo64);

/// Loop devices whose backing file lives on a target's filesystem, or whose backing device is a target device.
fn scan_loops(roots: &HostRoots, index: &Index<'_>, blockers: &mut [Vec<Blocker>]) {
    let Ok(entries) = std::fs::read_dir(roots.sys.join("block")) else { return };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Ok(backing) = std::fs::read_to_string(entry.path().join("loop/backing_file")) else { continue };
        let backing = backing.trim_end().to_string();
        let Some((dev, rdev)) = loop_backing(roots, &name, &backing) else { continue };
        let node = roots.dev_node(&name).to_string_lossy().into_owned();
        let hit = index
            .filesystems
            .get(&dev)
            .map(|fs| {
                (
                    fs.target,
                    format!(
                        "{node} is backed by {backing}, a file on {}; detach it first (losetup -d {node})",
                        fs.label
                    ),
                )
            })
            .or_else(|| {
                index.devices.get(&rdev).map(|&t| {
                    (t, format!("{node} is backed directly by {backing}; detach it first (losetup -d {node})"))
                })
            });
        if let Some((target, message)) = hit {
            blockers[target].push(blocker(
                BlockerKind::Loop,
                &node,
                message,
                Detail::Loop(LoopUse { loop_device: node.clone(), backing_file: backing.clone() }),
            ));
        }
    }
}

/// (st_dev, st_rdev) of a loop device's backing file: exact from the kernel (LOOP_GET_STATUS64), or by stat of the
/// path sysfs reports when the device node cannot be opened.
fn loop_backing(roots: &HostRoots, name: &str, backing: &str) -> Option<(u64, u64)> {
    if let Ok(file) = std::fs::File::open(roots.dev_node(name)) {
        use std::os::fd::AsRawFd;
        let mut info = std::mem::MaybeUninit::<LoopInfo64>::zeroed();
        // SAFETY: the ioctl fills a loop_info64, whose layout LoopInfo64 mirrors; the fd is a loop device.
        if unsafe { loop_get_status64(file.as_raw_fd(), info.as_mut_ptr()) }.is_ok() {
            // SAFETY: initialised (zeroed, then written by the kernel).
            let info = unsafe { info.assume_init() };
            return Some((info.lo_device, info.lo_rdevice));
        }
    }
    let st = stat(backing.trim_end_matches(" (deleted)")).ok()?;
    Some((st.st_dev, st.st_rdev))
}

// --- kernel claims ---------------------------------------------------------------------------------------------

/// A device that nothing above explains but that the kernel holds exclusively (an `O_EXCL` open fails with EBUSY).
/// Only checked for disks with no other blocker: a mount or holder makes the same open fail, and says more.
fn scan_kernel_claims(roots: &HostRoots, targets: &[Target], blockers: &mut [Vec<Blocker>]) {
    for (i, t) in targets.iter().enumerate() {
        if !blockers[i].is_empty() {
            continue;
        }
        for (d, path) in t.devices.iter().zip(t.node_paths(roots)) {
            let flags = OFlag::O_RDONLY | OFlag::O_EXCL | OFlag::O_CLOEXEC | OFlag::O_NONBLOCK;
            if let Err(nix::errno::Errno::EBUSY) = nix::fcntl::open(&path, flags, Mode::empty()) {
                blockers[i].push(blocker(
                    BlockerKind::KernelClaim,
                    &d.node,
                    format!(
                        "the kernel holds {} exclusively, though no mount, swap, holder or process explains it \
                         (a RAID assembly, a filesystem being mounted, or a kernel user such as a target driver)",
                        d.node
                    ),
                    Detail::KernelClaim(KernelClaim { device: d.node.clone() }),
                ));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Relative layers are followed only from a directory where every one of them exists: the mount point's
    /// nearest such ancestor first, then an absolute layer's; never the mount point itself; nothing for layers that
    /// exist nowhere, empty or odd paths.
    #[test]
    fn relative_layers_resolve_only_where_all_of_them_exist() {
        let root = tempfile::tempdir().unwrap();
        for d in [
            "home/l/A",
            "home/l/B",
            "home/ctr/merged/l/A",
            "home/ctr/merged/l/B",
            "home/ctr/merged/ctr",
            "snap/1/fs",
            "snap/3/fs",
        ] {
            std::fs::create_dir_all(root.path().join(d)).unwrap();
        }
        let layers = |paths: &[(&'static str, &str)]| -> Vec<OverlayLayer> {
            paths.iter().map(|(option, path)| OverlayLayer { option, path: path.to_string() }).collect()
        };
        let base =
            |mount_point: &str, paths: &[(&'static str, &str)]| relative_base(root.path(), mount_point, &layers(paths));
        let docker = [("lowerdir", "l/A"), ("lowerdir", "l/B"), ("upperdir", "ctr")];
        assert_eq!(base("/home/ctr/merged", &docker).as_deref(), Some("/home"), "not the mount point itself");
        let containerd = [("lowerdir", "1/fs"), ("upperdir", "/snap/3/fs")];
        assert_eq!(base("/run/rootfs", &containerd).as_deref(), Some("/snap"));
        assert_eq!(base("/home/ctr/merged", &[("lowerdir", "l/A"), ("lowerdir", "l/C")]), None, "one is missing");
        assert_eq!(base("/home/ctr/merged", &[("upperdir", "/home/l/A")]), None, "nothing relative");
        assert_eq!(base("", &[("lowerdir", "l/A")]), None);
        assert_eq!(base("relative/mount", &[("lowerdir", "nowhere/../..")]), None);
    }

    #[test]
    fn uuid_parser() {
        assert_eq!(
            parse_uuid("01234567-89ab-cdef-0123-456789abcdef"),
            Some([0x01, 0x23, 0x45, 0x67, 0x89, 0xab, 0xcd, 0xef, 0x01, 0x23, 0x45, 0x67, 0x89, 0xab, 0xcd, 0xef])
        );
        assert_eq!(parse_uuid("features"), None);
        assert_eq!(parse_uuid("zz234567-89ab-cdef-0123-456789abcdef"), None);
    }
}
