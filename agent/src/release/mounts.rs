//! Unmounting a disk's filesystems in every mount namespace they appear in, and mounting them back.
//!
//! Work inside a namespace runs on a short-lived thread that leaves the agent's filesystem context
//! (`unshare(CLONE_FS)`) and enters the namespace (`setns`), so mount points are resolved exactly as the processes
//! there see them and the rest of the agent is untouched.

use crate::roots::{HostRoots, resolve_dev_path};
use crate::usage::procfs_parse::{MountEntry, parse_mountinfo, unescape_octal};
use crate::usage::target::Target;
use crate::usage::{NamespaceTask, ProcessSource, ProcfsSource};
use nix::dir::Dir;
use nix::fcntl::OFlag;
use nix::mount::{MntFlags, MsFlags};
use nix::sched::CloneFlags;
use nix::sys::stat::{Mode, makedev, stat};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::Read;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use wukong_proto::v1::MountUse;

/// One mount of the disk, with what it takes to unmount it and to mount it back.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MountRecord {
    /// Mount namespace inode, and a process that was in it (or a thread of it that was: see `namespace_thread`).
    pub namespace: u64,
    pub namespace_pid: i32,
    /// The thread of `namespace_pid` that was in it, when its process was not; 0 when it was. Absent in journals
    /// of agents before threads' namespaces.
    #[serde(default)]
    pub namespace_thread: i32,
    pub host_namespace: bool,
    pub mount_id: u32,
    pub mount_point: String,
    /// Root of the mount within its filesystem ("/" unless a bind mount of a subdirectory).
    pub root: String,
    pub fs_type: String,
    pub options: String,
    pub super_options: String,
    pub source: String,
    /// Partition number of the mounted device, 0 for the whole disk: a disk rescanned back may get a new name.
    pub partition: u32,
    /// Depth in the namespace's mount tree; deeper mounts are undone first.
    pub depth: u32,
    /// A filesystem stacked on the disk (an overlay with a layer on it), not on its device: undone before the
    /// disk's own mounts, mounted back after them. Absent in journals of agents before stacked mounts.
    #[serde(default)]
    pub stacked: bool,
    /// For a stacked mount given relative layer paths: the directory they resolve against, where it is mounted
    /// back from. Empty otherwise, and in journals of agents before it.
    #[serde(default)]
    pub layers_relative_to: String,
}

impl MountRecord {
    /// The task it was seen through.
    fn task(&self) -> NamespaceTask {
        NamespaceTask { pid: self.namespace_pid, thread: self.namespace_thread }
    }

    /// e.g. "/data (ext4) in the host mount namespace".
    pub fn place(&self) -> String {
        let ns = if self.host_namespace {
            "the host mount namespace".to_string()
        } else {
            format!("mount namespace {}", self.namespace)
        };
        format!("{} ({}) in {ns}", self.mount_point, self.fs_type)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum MountError {
    #[error(
        "{source_dev} is mounted at {mount_point} inside {place}, and it is not part of this disk; unmount it first"
    )]
    ForeignChild { source_dev: String, mount_point: String, place: String },
    #[error("no process is left in mount namespace {0} to enter it")]
    NamespaceGone(u64),
    #[error("cannot enter mount namespace {namespace}: {source}")]
    Enter { namespace: u64, source: nix::Error },
    #[error("cannot unmount {place}: {source}")]
    Unmount { place: String, source: nix::Error },
    #[error("cannot mount {place} back from {device}: {reason}")]
    Mount { place: String, device: String, reason: String },
}

impl MountError {
    /// True when the failure means something started using the filesystem.
    pub fn is_busy(&self) -> bool {
        matches!(self, MountError::Unmount { source: nix::Error::EBUSY, .. })
    }
}

/// The mounts to undo for a disk whose scan reported `uses`: filesystems stacked on the disk first (an overlay pins
/// its layers: unmounting the disk under it would succeed and leave the disk held by nothing one can name), an
/// overlay with a layer on another overlay before that one, then the disk's own; each deepest first, non-host
/// namespaces before the host's. Refuses (changing nothing) when another filesystem is mounted inside one of them.
pub fn plan(roots: &HostRoots, target: &Target, uses: &[MountUse]) -> Result<Vec<MountRecord>, MountError> {
    let mut by_ns: BTreeMap<(bool, u64), Vec<&MountUse>> = BTreeMap::new();
    for u in uses {
        by_ns.entry((u.host_namespace, u.mount_namespace)).or_default().push(u);
    }
    let devices: HashMap<u64, &str> =
        target.devices.iter().map(|d| (makedev(d.major.into(), d.minor.into()), d.kernel_name.as_str())).collect();
    let mut records = Vec::new();
    // `false` sorts first: other namespaces before the host's.
    for ((host, ns), uses) in by_ns {
        let hint = NamespaceTask { pid: uses[0].namespace_pid, thread: uses[0].namespace_thread };
        let task = namespace_task(roots, ns, hint).ok_or(MountError::NamespaceGone(ns))?;
        let text = std::fs::read_to_string(task.dir(&roots.proc).join("mountinfo")).unwrap_or_default();
        let entries = parse_mountinfo(&text);
        let device_of = |e: &MountEntry| {
            devices.get(&makedev(e.major.into(), e.minor.into())).copied().or_else(|| {
                // btrfs: an anonymous device number; the source names the member.
                let st = stat(&resolve_dev_path(roots, &e.source)).ok()?;
                devices.get(&st.st_rdev).copied()
            })
        };
        let reported: HashSet<u32> = uses.iter().map(|u| u.mount_id).collect();
        let stacked: HashMap<u32, &str> =
            uses.iter().filter(|u| !u.layers.is_empty()).map(|u| (u.mount_id, u.layers_relative_to.as_str())).collect();
        let ours: HashMap<u32, &MountEntry> = entries
            .iter()
            .filter(|e| reported.contains(&e.mount_id) || device_of(e).is_some())
            .map(|e| (e.mount_id, e))
            .collect();
        let parents: HashMap<u32, u32> = entries.iter().map(|e| (e.mount_id, e.parent_id)).collect();
        let mut group = Vec::new();
        for e in &entries {
            if let Some(parent) = ours.get(&e.parent_id)
                && !ours.contains_key(&e.mount_id)
            {
                let place = format!("{} of this disk", parent.mount_point);
                return Err(MountError::ForeignChild {
                    source_dev: e.source.clone(),
                    mount_point: e.mount_point.clone(),
                    place,
                });
            }
        }
        for e in ours.values() {
            let kernel_name = device_of(e).unwrap_or_default();
            let relative_to = stacked.get(&e.mount_id);
            let stacked = relative_to.is_some();
            group.push(MountRecord {
                namespace: ns,
                namespace_pid: task.pid,
                namespace_thread: task.thread,
                host_namespace: host,
                mount_id: e.mount_id,
                mount_point: e.mount_point.clone(),
                root: e.root.clone(),
                fs_type: e.fs_type.clone(),
                options: e.options.clone(),
                super_options: e.super_options.clone(),
                source: e.source.clone(),
                partition: if stacked { 0 } else { partition_number(roots, kernel_name) },
                depth: depth(&parents, e.mount_id),
                stacked,
                layers_relative_to: relative_to.map(|base| base.to_string()).unwrap_or_default(),
            });
        }
        let level = stack_levels(&uses);
        let level_of = |r: &MountRecord| level.get(&r.mount_id).copied().unwrap_or(0);
        group.sort_by(|a, b| {
            level_of(b).cmp(&level_of(a)).then(b.depth.cmp(&a.depth)).then(b.mount_id.cmp(&a.mount_id))
        });
        records.extend(group);
    }
    // Stable: namespaces and depths keep their order within each kind.
    records.sort_by_key(|r| !r.stacked);
    Ok(records)
}

fn depth(parents: &HashMap<u32, u32>, mut id: u32) -> u32 {
    let mut depth = 0;
    // Bounded: a corrupt or racing mountinfo must not loop forever.
    while let Some(&parent) = parents.get(&id) {
        if parent == id || depth > 4096 {
            break;
        }
        depth += 1;
        id = parent;
    }
    depth
}

fn partition_number(roots: &HostRoots, kernel_name: &str) -> u32 {
    std::fs::read_to_string(roots.sys.join("class/block").join(kernel_name).join("partition"))
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

/// A task in mount namespace `ns`: `hint` if it is still there, else the one a scan would read it through.
fn namespace_task(roots: &HostRoots, ns: u64, hint: NamespaceTask) -> Option<NamespaceTask> {
    if hint.namespace(&roots.proc) == Some(ns) {
        return Some(hint);
    }
    ProcfsSource.mount_namespaces(&roots.proc).ok()?.remove(&ns)
}

/// Undoes `records` in order. Returns the records undone, and the error that stopped it, if any.
pub fn unmount(roots: &HostRoots, records: &[MountRecord]) -> (Vec<MountRecord>, Option<MountError>) {
    let mut done = Vec::new();
    for group in records.chunk_by(|a, b| a.namespace == b.namespace) {
        let result = in_namespace(roots, group[0].namespace, group[0].task(), |ns| {
            let mut done = Vec::new();
            for r in group {
                match nix::mount::umount2(r.mount_point.as_str(), MntFlags::UMOUNT_NOFOLLOW) {
                    Ok(()) => {}
                    // Already gone: an unmount elsewhere propagated here.
                    Err(nix::Error::EINVAL) if !ns.mount_ids().contains(&r.mount_id) => {}
                    Err(source) => return (done, Some(MountError::Unmount { place: r.place(), source })),
                }
                tracing::info!(mount = %r.place(), "unmounted");
                done.push(r.clone());
            }
            (done, None)
        });
        match result {
            Ok((undone, error)) => {
                done.extend(undone);
                if error.is_some() {
                    return (done, error);
                }
            }
            Err(e) => return (done, Some(e)),
        }
    }
    (done, None)
}

/// The mounts among `records` no longer in their namespace (an unmount was under way when a previous agent process
/// was killed: it may or may not have happened). A namespace that cannot be entered any more has nothing to mount
/// back into.
pub fn gone(roots: &HostRoots, records: &[MountRecord]) -> Vec<MountRecord> {
    records
        .iter()
        .filter(|r| {
            in_namespace(roots, r.namespace, r.task(), |ns| !ns.mount_ids().contains(&r.mount_id)).unwrap_or(false)
        })
        .cloned()
        .collect()
}

/// How high each stacked mount of one namespace stands: 0 for one whose layers are on the disk's filesystems
/// only, one more than the highest stacked mount a layer of it lies in (an overlay on an overlay on the disk).
/// Higher ones are undone first and mounted back last.
fn stack_levels(uses: &[&MountUse]) -> HashMap<u32, u32> {
    let stacked: Vec<&MountUse> = uses.iter().copied().filter(|u| !u.layers.is_empty()).collect();
    let under = |layer: &str, point: &str| Path::new(point).is_absolute() && Path::new(layer).starts_with(point);
    let mut level: HashMap<u32, u32> = stacked.iter().map(|u| (u.mount_id, 0)).collect();
    // At most one round per stacked mount settles every chain; a cycle (impossible in a real mount table) stops
    // there instead of looping.
    for _ in 0..stacked.len() {
        let mut changed = false;
        for u in &stacked {
            let highest_below = stacked
                .iter()
                .filter(|o| o.mount_id != u.mount_id && u.layers.iter().any(|l| under(&l.path, &o.mount_point)))
                .map(|o| level[&o.mount_id] + 1)
                .max()
                .unwrap_or(0);
            if highest_below > level[&u.mount_id] {
                level.insert(u.mount_id, highest_below);
                changed = true;
            }
        }
        if !changed {
            break;
        }
    }
    level
}

/// Mounts `records` back, in the reverse of the order they were undone. `node_for` gives the device node of a
/// partition number (0: the whole disk) now. Returns each record's outcome.
pub fn mount_back(
    roots: &HostRoots,
    records: &[MountRecord],
    node_for: &(dyn Fn(u32) -> Option<PathBuf> + Sync),
) -> Vec<(MountRecord, Result<(), MountError>)> {
    let mut ordered: Vec<&MountRecord> = records.iter().rev().collect();
    // The disk's filesystems before what is stacked on them; whole filesystems before bind mounts of their
    // subdirectories, which are made from them. Stacked mounts keep the reverse of their undo order: an overlay
    // before the overlays on it.
    ordered.sort_by_key(|r| (r.stacked, r.root != "/", if r.stacked { 0 } else { r.depth }));
    let mut outcomes = Vec::new();
    let mut by_ns: BTreeMap<u64, Vec<&MountRecord>> = BTreeMap::new();
    for r in ordered {
        by_ns.entry(r.namespace).or_default().push(r);
    }
    for group in by_ns.into_values() {
        let entered = in_namespace(roots, group[0].namespace, group[0].task(), |ns| {
            group.iter().map(|r| ((*r).clone(), mount_one(ns, r, node_for))).collect::<Vec<_>>()
        });
        match entered {
            Ok(results) => outcomes.extend(results),
            Err(e) => {
                let reason = e.to_string();
                outcomes.extend(group.iter().map(|r| {
                    let err = MountError::Mount { place: r.place(), device: r.source.clone(), reason: reason.clone() };
                    ((*r).clone(), Err(err))
                }));
            }
        }
    }
    outcomes
}

fn mount_one(
    ns: &Namespace,
    r: &MountRecord,
    node_for: &(dyn Fn(u32) -> Option<PathBuf> + Sync),
) -> Result<(), MountError> {
    let fail = |device: &str, reason: String| MountError::Mount { place: r.place(), device: device.into(), reason };
    let flags = mount_flags(&r.options);
    if r.stacked {
        // An overlay comes back from its own options: the layers, as the mounter gave them, relative ones from the
        // directory they were given against (this thread's working directory is its own: see `in_namespace`).
        let data = mount_data(&r.super_options);
        if !r.layers_relative_to.is_empty() {
            nix::unistd::chdir(r.layers_relative_to.as_str())
                .map_err(|e| fail(&r.source, format!("{}: {}", r.layers_relative_to, e.desc().to_lowercase())))?;
        }
        let mounted = nix::mount::mount(
            Some(r.source.as_str()),
            r.mount_point.as_str(),
            Some(r.fs_type.as_str()),
            flags,
            Some(data.as_str()),
        );
        if !r.layers_relative_to.is_empty() {
            // Back to where setns left it, for the next record; the root is always there.
            let _ = nix::unistd::chdir("/");
        }
        return mounted.map_err(|e| fail(&r.source, e.desc().to_lowercase()));
    }
    let node = node_for(r.partition).ok_or_else(|| fail(&r.source, "the disk is no longer in the guest".into()))?;
    let device = node.display().to_string();
    if r.root == "/" {
        let data = mount_data(&r.super_options);
        let mount = |data: Option<&str>| {
            nix::mount::mount(Some(node.as_path()), r.mount_point.as_str(), Some(r.fs_type.as_str()), flags, data)
        };
        // Super options the kernel shows are not always accepted back; the mount flags matter most.
        return mount(Some(data.as_str())).or_else(|_| mount(None)).map_err(|e| fail(&device, e.desc().to_lowercase()));
    }
    // A bind mount of a subdirectory: bind it from a whole mount of the same device in this namespace.
    let rdev = stat(&node).map_err(|e| fail(&device, e.desc().to_lowercase()))?.st_rdev;
    let whole = ns
        .entries()
        .into_iter()
        .find(|e| e.root == "/" && (makedev(e.major.into(), e.minor.into()) == rdev || e.source == device))
        .ok_or_else(|| {
            fail(&device, "no whole mount of the filesystem is left in that namespace to bind from".into())
        })?;
    let from = Path::new(&whole.mount_point).join(r.root.trim_start_matches('/'));
    let bind = |extra: MsFlags| {
        nix::mount::mount(
            Some(from.as_path()),
            r.mount_point.as_str(),
            None::<&str>,
            MsFlags::MS_BIND | extra,
            None::<&str>,
        )
    };
    bind(MsFlags::empty()).map_err(|e| fail(&device, e.desc().to_lowercase()))?;
    if flags.contains(MsFlags::MS_RDONLY) {
        bind(MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY).map_err(|e| fail(&device, e.desc().to_lowercase()))?;
    }
    Ok(())
}

/// The mount flags among per-mount options ("ro,nosuid,relatime").
fn mount_flags(options: &str) -> MsFlags {
    options
        .split(',')
        .map(|o| match o {
            "ro" => MsFlags::MS_RDONLY,
            "nosuid" => MsFlags::MS_NOSUID,
            "nodev" => MsFlags::MS_NODEV,
            "noexec" => MsFlags::MS_NOEXEC,
            "noatime" => MsFlags::MS_NOATIME,
            "nodiratime" => MsFlags::MS_NODIRATIME,
            "relatime" => MsFlags::MS_RELATIME,
            "strictatime" => MsFlags::MS_STRICTATIME,
            "sync" => MsFlags::MS_SYNCHRONOUS,
            "dirsync" => MsFlags::MS_DIRSYNC,
            "lazytime" => MsFlags::MS_LAZYTIME,
            _ => MsFlags::empty(),
        })
        .fold(MsFlags::empty(), |a, b| a | b)
}

/// Filesystem options among super options, without the read-only state the flags carry. mountinfo octal-escapes
/// what it cannot show (`\054` for a comma in an overlay's layer path); decoded, each option is the string the
/// mounter gave (with its own `\,` escapes), which is what mount takes back.
fn mount_data(super_options: &str) -> String {
    super_options
        .split(',')
        .filter(|o| !matches!(*o, "rw" | "ro" | ""))
        .map(unescape_octal)
        .collect::<Vec<_>>()
        .join(",")
}

/// The mount namespace a worker thread has entered, with a view of its mount table.
struct Namespace {
    /// The agent's /proc, opened before entering: the namespace may have no /proc of its own.
    proc: Dir,
}

impl Namespace {
    fn entries(&self) -> Vec<MountEntry> {
        let mut text = String::new();
        let opened = nix::fcntl::openat(self.proc.as_fd(), "thread-self/mountinfo", OFlag::O_RDONLY, Mode::empty());
        if let Ok(fd) = opened {
            let _ = std::fs::File::from(fd).read_to_string(&mut text);
        }
        parse_mountinfo(&text)
    }

    fn mount_ids(&self) -> HashSet<u32> {
        self.entries().iter().map(|e| e.mount_id).collect()
    }
}

/// Runs `f` on a thread inside mount namespace `ns` (entered through a task in it, preferably `hint`).
fn in_namespace<T: Send>(
    roots: &HostRoots,
    ns: u64,
    hint: NamespaceTask,
    f: impl FnOnce(&Namespace) -> T + Send,
) -> Result<T, MountError> {
    let task = namespace_task(roots, ns, hint).ok_or(MountError::NamespaceGone(ns))?;
    let enter = |source| MountError::Enter { namespace: ns, source };
    let proc = Dir::open(&roots.proc, OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC, Mode::empty())
        .map_err(enter)?;
    let ns_file = std::fs::File::open(task.dir(&roots.proc).join("ns/mnt"))
        .map_err(|e| enter(nix::Error::from_raw(e.raw_os_error().unwrap_or(0))))?;
    std::thread::scope(|scope| {
        std::thread::Builder::new()
            .name("mount-ns".into())
            .spawn_scoped(scope, move || {
                // setns into a mount namespace needs a filesystem context this thread does not share.
                nix::sched::unshare(CloneFlags::CLONE_FS).map_err(enter)?;
                if nix::sys::stat::fstat(&ns_file).map_err(enter)?.st_ino != ns {
                    return Err(MountError::NamespaceGone(ns));
                }
                nix::sched::setns(&ns_file, CloneFlags::CLONE_NEWNS).map_err(enter)?;
                Ok(f(&Namespace { proc }))
            })
            .map_err(|e| enter(nix::Error::from_raw(e.raw_os_error().unwrap_or(0))))?
            .join()
            .unwrap_or_else(|_| Err(MountError::Enter { namespace: ns, source: nix::Error::EIO }))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::usage::target::{Device, Role};

    #[test]
    fn options_become_flags_and_data() {
        let f = mount_flags("ro,nosuid,nodev,relatime,x-unknown");
        assert_eq!(f, MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_RELATIME);
        assert_eq!(mount_data("rw,errors=remount-ro,,data=ordered"), "errors=remount-ro,data=ordered");
        assert_eq!(mount_data("ro"), "");
        assert_eq!(
            mount_data("rw,lowerdir=/d/low\\0401:/x/c\\134\\054d,upperdir=/d/up,workdir=/d/w,uuid=on"),
            "lowerdir=/d/low 1:/x/c\\,d,upperdir=/d/up,workdir=/d/w,uuid=on"
        );
    }

    /// A process (pid 7) whose namespace mounts the disk 8:16 at /data, partition 8:17 at /data/a and, bound from
    /// it, /srv/b; and whose /data/a/tmp holds a foreign tmpfs when `foreign` is set.
    fn fixture(foreign: bool) -> (tempfile::TempDir, HostRoots, Target, u64) {
        let dir = tempfile::tempdir().unwrap();
        let roots = HostRoots::under(dir.path());
        let p = roots.proc.join("7");
        std::fs::create_dir_all(p.join("ns")).unwrap();
        std::fs::write(p.join("ns/mnt"), b"").unwrap();
        let mut text = String::from(
            "1 0 8:2 / / rw - ext4 /dev/sda2 rw\n\
             20 1 8:16 / /data rw,relatime - ext4 /dev/sdb rw\n\
             21 20 8:17 / /data/a ro,nosuid - xfs /dev/sdb1 rw,attr2\n\
             22 1 8:17 /sub /srv/b rw - xfs /dev/sdb1 rw,attr2\n",
        );
        if foreign {
            text.push_str("23 21 0:50 / /data/a/tmp rw - tmpfs tmpfs rw\n");
        }
        std::fs::write(p.join("mountinfo"), text).unwrap();
        std::fs::create_dir_all(roots.sys.join("class/block/sdb1")).unwrap();
        std::fs::write(roots.sys.join("class/block/sdb1/partition"), "1\n").unwrap();
        let dev = |kernel_name: &str, minor, role| Device {
            kernel_name: kernel_name.into(),
            major: 8,
            minor,
            node: format!("/dev/{kernel_name}"),
            role,
        };
        let target =
            Target { key: "d".into(), devices: vec![dev("sdb", 16, Role::Disk), dev("sdb1", 17, Role::Partition)] };
        let ns = stat(&p.join("ns/mnt")).unwrap().st_ino;
        (dir, roots, target, ns)
    }

    fn use_of(ns: u64, mount_id: u32) -> MountUse {
        MountUse { mount_namespace: ns, namespace_pid: 7, mount_id, host_namespace: true, ..MountUse::default() }
    }

    #[test]
    fn plan_orders_deepest_first_and_remembers_partitions() {
        let (_dir, roots, target, ns) = fixture(false);
        let plan = plan(&roots, &target, &[use_of(ns, 20), use_of(ns, 21)]).unwrap();
        let order: Vec<(&str, u32, u32)> =
            plan.iter().map(|r| (r.mount_point.as_str(), r.partition, r.depth)).collect();
        // /srv/b was not in the scan's list, but is found by its device.
        assert_eq!(order, vec![("/data/a", 1, 3), ("/srv/b", 1, 2), ("/data", 0, 2)]);
        assert_eq!(plan[0].super_options, "rw,attr2");
        assert_eq!(plan[1].root, "/sub");
        assert_eq!(plan[2].place(), "/data (ext4) in the host mount namespace");
    }

    /// An overlay at /merged with its lower directory on the disk's /data goes first, wherever it sits, and
    /// comes back last.
    #[test]
    fn stacked_mounts_are_undone_first_and_mounted_back_last() {
        let (_dir, roots, target, ns) = fixture(false);
        let mountinfo = roots.proc.join("7/mountinfo");
        let mut text = std::fs::read_to_string(&mountinfo).unwrap();
        text.push_str(
            "30 1 0:40 / /merged rw - overlay overlay rw,lowerdir=/data/l,upperdir=/data/u,workdir=/data/w\n",
        );
        std::fs::write(&mountinfo, text).unwrap();
        let mut overlay = use_of(ns, 30);
        overlay.layers = vec![wukong_proto::v1::StackedLayer { option: "lowerdir".into(), ..Default::default() }];
        let plan = plan(&roots, &target, &[use_of(ns, 20), use_of(ns, 21), overlay]).unwrap();
        let order: Vec<(&str, bool)> = plan.iter().map(|r| (r.mount_point.as_str(), r.stacked)).collect();
        assert_eq!(order, vec![("/merged", true), ("/data/a", false), ("/srv/b", false), ("/data", false)]);
        assert_eq!(plan[0].place(), "/merged (overlay) in the host mount namespace");
    }

    /// An overlay on an overlay on an overlay on the disk: each stands one higher than the one it lies on,
    /// whatever order the scan reported them in; a path that merely shares a prefix is not inside.
    #[test]
    fn overlays_on_overlays_stand_higher() {
        let overlay = |id: u32, point: &str, layers: &[&str]| MountUse {
            mount_id: id,
            mount_point: point.into(),
            layers: layers
                .iter()
                .map(|p| wukong_proto::v1::StackedLayer {
                    option: "lowerdir".into(),
                    path: p.to_string(),
                    on: "".into(),
                })
                .collect(),
            ..MountUse::default()
        };
        let top = overlay(3, "/mc", &["/mb/x", "/data/z"]);
        let middle = overlay(2, "/mb", &["/ma/x", "/mab/y"]);
        let bottom = overlay(1, "/ma", &["/data/l"]);
        let lookalike = overlay(4, "/mab", &["/data/m"]);
        let disk_mount = use_of(7, 5);
        let levels = stack_levels(&[&top, &middle, &disk_mount, &bottom, &lookalike]);
        assert_eq!(levels, HashMap::from([(1, 0), (2, 1), (3, 2), (4, 0)]));
        let looped = [overlay(1, "/a", &["/b/x"]), overlay(2, "/b", &["/a/x"])];
        assert_eq!(stack_levels(&[&looped[0], &looped[1]]).len(), 2, "a cycle ends");
    }

    #[test]
    fn a_foreign_mount_inside_refuses_the_plan() {
        let (_dir, roots, target, ns) = fixture(true);
        let err = plan(&roots, &target, &[use_of(ns, 20), use_of(ns, 21)]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "tmpfs is mounted at /data/a/tmp inside /data/a of this disk, and it is not part of this disk; unmount \
             it first"
        );
    }

    #[test]
    fn a_vanished_namespace_is_named() {
        let (_dir, roots, target, ns) = fixture(false);
        let mut u = use_of(ns + 1, 20);
        u.namespace_pid = 99;
        let err = plan(&roots, &target, &[u]).unwrap_err();
        assert!(matches!(err, MountError::NamespaceGone(n) if n == ns + 1), "{err}");
    }
}
