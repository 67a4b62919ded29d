//! Processes: what each one the process source found holds on the targets, read from /proc (open files with their
//! access mode, the raw device, working and root directory, program, mappings), and the blockers that name them.
//! The same for both sources, so their reports cannot differ for a process both find.

use super::{DeadlineExceeded, Filesystem, Index, blocker, btrfs_fsid_of, read_comm};
use crate::roots::HostRoots;
use crate::usage::procfs_parse::{MapEntry, fdinfo_mount_id, fdinfo_writable, parse_maps};
use crate::usage::procmap;
use crate::usage::source::{Candidate, Seen};
use crate::usage::threads::{self, Apart, Compare};
use nix::dir::Dir;
use nix::fcntl::{AtFlags, OFlag};
use nix::sys::stat::{FileStat, Mode, SFlag, fstatat, major, makedev, minor};
use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::time::Instant;
use wukong_proto::v1::{Blocker, BlockerKind, ProcessUse, ProcessUseKind, blocker::Detail};

/// Uses listed per process and kind before the rest are summarised in one line.
const MAX_USES_PER_PROCESS: usize = 8;

/// A process, who it is and what it holds on the targets.
type ProcessUses = (i32, Identity, Vec<Use>);

/// Who a process is, as its blockers say.
struct Identity {
    command: String,
    uid: u32,
    cmdline: String,
}

impl Identity {
    /// `memory`: a thread holding the process's memory once its leader has exited, whose command line /proc then
    /// shows alone.
    fn read(proc_root: &Path, pid: i32, memory: Option<i32>) -> Self {
        let mut cmdline = process_cmdline(&proc_root.join(pid.to_string()));
        if let (true, Some(tid)) = (cmdline.is_empty(), memory) {
            cmdline = process_cmdline(&proc_root.join(pid.to_string()).join("task").join(tid.to_string()));
        }
        Self { command: read_comm(proc_root, pid), uid: process_uid(proc_root, pid), cmdline }
    }
}

/// One use of a target by a process, before the process's name and uid are looked up.
struct Use {
    target: usize,
    kind: ProcessUseKind,
    path: String,
    fd: i32,
    writable: bool,
    /// Device node the use is on.
    device: String,
    /// The device described for people, e.g. "/dev/sdb1 (ext4, mounted at /data)".
    place: String,
    /// The thread it was found through, when not the process's own (see [`threads`]).
    thread: Option<i32>,
}

pub(super) fn scan_processes(
    roots: &HostRoots,
    candidates: &[Candidate],
    index: &Index<'_>,
    blockers: &mut [Vec<Blocker>],
    deadline: Instant,
) -> Result<(), DeadlineExceeded> {
    // Two threads per core: /proc lookups often wait on per-task locks, and a second thread keeps the core busy
    // meanwhile (measured: 2000 processes scanned in ~180 ms with 4 threads on 2 cores against ~210 ms with 2). No
    // more than there are processes to read: a scan that names one or none (a release's, often) starts none.
    let threads = std::thread::available_parallelism().map(|n| n.get() * 2).unwrap_or(2).min(16).min(candidates.len());
    let compare = threads::comparer_for(&roots.proc);
    // The share of the candidates of thread `t` of `threads`.
    let share = |t: usize, threads: usize| {
        let mut found = Vec::new();
        let mut scratch = Scratch::default();
        for &Candidate { pid, ref seen } in candidates.iter().skip(t).step_by(threads) {
            if Instant::now() > deadline {
                return Err(DeadlineExceeded);
            }
            let (uses, memory) = process_uses(roots, pid, seen.as_ref(), index, compare, &mut scratch);
            if !uses.is_empty() {
                // Read here, on the scan's threads: three reads of /proc per process add up.
                found.push((pid, Identity::read(&roots.proc, pid, memory), uses));
            }
        }
        Ok(found)
    };
    let results: Vec<Result<Vec<ProcessUses>, DeadlineExceeded>> = if threads <= 1 {
        vec![share(0, 1)]
    } else {
        std::thread::scope(|s| {
            let handles: Vec<_> = (0..threads).map(|t| s.spawn(move || share(t, threads))).collect();
            handles.into_iter().map(|h| h.join().unwrap_or(Ok(Vec::new()))).collect()
        })
    };
    let mut found = Vec::new();
    for r in results {
        found.extend(r?);
    }
    found.sort_by_key(|(pid, ..)| *pid);
    for (pid, identity, uses) in found {
        report_process(pid, identity, uses, blockers);
    }
    Ok(())
}

/// The target filesystem a file is on: by its device number, or, for an anonymous device no mount names (a
/// nested btrfs subvolume), by asking the kernel which btrfs filesystem the file is part of. Answers for
/// anonymous devices are cached per scan thread.
fn target_fs(
    index: &Index<'_>,
    st: &FileStat,
    path: &Path,
    subvolumes: &mut HashMap<u64, Option<Filesystem>>,
) -> Option<Filesystem> {
    if let Some(fs) = index.filesystems.get(&st.st_dev) {
        return Some(fs.clone());
    }
    let kind = SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT;
    if index.btrfs_fsids.is_empty()
        || major(st.st_dev) != 0
        || index.mounted_devs.contains(&st.st_dev)
        || !(kind == SFlag::S_IFREG || kind == SFlag::S_IFDIR)
    {
        return None;
    }
    subvolumes
        .entry(st.st_dev)
        .or_insert_with(|| {
            let target = *index.btrfs_fsids.get(&btrfs_fsid_of(path)?)?;
            let node = index.targets[target].devices.first().map(|d| d.node.clone()).unwrap_or_default();
            Some(Filesystem { target, label: format!("a btrfs subvolume on {node}"), node })
        })
        .clone()
}

/// The stacked filesystem a file belongs to when its device number is one an overlay made up for a layer (the
/// layers span filesystems and no inode-number mapping is on): no mount names that number, but the mount the file
/// was opened through (fdinfo's `mnt_id`) is the overlay's.
fn stacked_fs(index: &Index<'_>, st: &FileStat, fdinfo: &Path) -> Option<Filesystem> {
    let kind = SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT;
    if index.stacked_mounts.is_empty()
        || major(st.st_dev) != 0
        || index.mounted_devs.contains(&st.st_dev)
        || !(kind == SFlag::S_IFREG || kind == SFlag::S_IFDIR)
    {
        return None;
    }
    let text = std::fs::read_to_string(fdinfo).ok()?;
    index.stacked_mounts.get(&fdinfo_mount_id(&text)?).cloned()
}

/// Everything one process holds on any target: among its open files and mappings, those its source `seen` on the
/// devices (all where it does not say), and, read whole, what its threads hold apart from it. Also returns the
/// thread that holds the process's memory when its leader has exited.
fn process_uses(
    roots: &HostRoots,
    pid: i32,
    seen: Option<&Seen>,
    index: &Index<'_>,
    compare: &dyn Compare,
    scratch: &mut Scratch,
) -> (Vec<Use>, Option<i32>) {
    let dir = roots.proc.join(pid.to_string());
    let Ok(pdir) = Dir::open(&dir, OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC, Mode::empty()) else {
        return (Vec::new(), None);
    };
    let leader = Apart { tid: pid, files: true, dirs: true, memory: true };
    let mut uses = task_uses(&dir, &pdir, leader, None, seen, index, scratch);
    // A walk that saw the process says so when a thread holds something apart (it then reads it whole).
    if seen.is_some() {
        return (uses, None);
    }
    let apart = threads::threads_apart(&pdir, pid, compare);
    for a in &apart {
        let tdir = dir.join("task").join(a.tid.to_string());
        let Ok(t) = Dir::open(&tdir, OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC, Mode::empty()) else {
            continue;
        };
        for u in task_uses(&tdir, &t, *a, Some(a.tid), None, index, scratch) {
            // Where the kernel could not say what is shared, a thread's uses repeat its leader's.
            if !uses.iter().any(|l| (l.target, l.kind, l.fd, &l.path) == (u.target, u.kind, u.fd, &u.path)) {
                uses.push(u);
            }
        }
    }
    (uses, apart.iter().find(|a| a.memory).map(|a| a.tid))
}

/// What one task directory (`/proc/<pid>`, or a thread's `task/<tid>`) shows of the parts `parts` asks for (a
/// process's own directory: all of them); `thread` names the thread its uses are found through.
fn task_uses(
    dir: &Path,
    pdir: &Dir,
    parts: Apart,
    thread: Option<i32>,
    seen: Option<&Seen>,
    index: &Index<'_>,
    scratch: &mut Scratch,
) -> Vec<Use> {
    let mut uses = Vec::new();
    let links = [
        ("cwd", ProcessUseKind::Cwd, parts.dirs),
        ("root", ProcessUseKind::Root, parts.dirs),
        ("exe", ProcessUseKind::Exe, parts.memory),
    ];
    for (name, kind, _) in links.into_iter().filter(|l| l.2) {
        if let Ok(st) = fstatat(pdir, name, AtFlags::empty())
            && let Some(fs) = target_fs(index, &st, &dir.join(name), &mut scratch.subvolumes)
        {
            let path = std::fs::read_link(dir.join(name)).map(|p| p.to_string_lossy().into_owned()).unwrap_or_default();
            let (device, place) = (fs.node, fs.label);
            uses.push(Use { target: fs.target, kind, path, fd: -1, writable: false, device, place, thread });
        }
    }
    // A walk that saw no file of it on the devices leaves nothing to read in fd/.
    if parts.files
        && seen.is_none_or(|seen| !seen.fds.is_empty())
        && let Ok(mut fds) =
            Dir::openat(pdir, "fd", OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC, Mode::empty())
    {
        let names: Vec<std::ffi::CString> = match seen {
            Some(seen) => seen.fds.iter().filter_map(|fd| std::ffi::CString::new(fd.to_string()).ok()).collect(),
            None => {
                fds.iter().flatten().map(|e| e.file_name().to_owned()).filter(|n| n.as_bytes()[0] != b'.').collect()
            }
        };
        for name in names {
            let Ok(st) = fstatat(&fds, name.as_c_str(), AtFlags::empty()) else { continue };
            let is_block = SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT == SFlag::S_IFBLK;
            let hit = if is_block {
                index.devices.get(&st.st_rdev).map(|&t| {
                    let d = index.targets[t].device(major(st.st_rdev) as u32, minor(st.st_rdev) as u32);
                    let node = d.map(|d| d.node.clone()).unwrap_or_default();
                    (t, ProcessUseKind::BlockDevice, node.clone(), node)
                })
            } else {
                let fd_name = name.to_string_lossy();
                target_fs(index, &st, &dir.join("fd").join(fd_name.as_ref()), &mut scratch.subvolumes)
                    .or_else(|| stacked_fs(index, &st, &dir.join("fdinfo").join(fd_name.as_ref())))
                    .map(|fs| (fs.target, ProcessUseKind::OpenFile, fs.node, fs.label))
            };
            let Some((target, kind, device, place)) = hit else { continue };
            let fd_name = name.to_string_lossy().into_owned();
            let path = std::fs::read_link(dir.join("fd").join(&fd_name))
                .map(|p| p.to_string_lossy().into_owned())
                .unwrap_or_default();
            let writable =
                std::fs::read_to_string(dir.join("fdinfo").join(&fd_name)).is_ok_and(|t| fdinfo_writable(&t));
            let fd = fd_name.parse().unwrap_or(-1);
            uses.push(Use { target, kind, path, fd, writable, device, place, thread });
        }
    }
    // Without a mounted filesystem of a target there is no file to map, and maps is the costliest read.
    if parts.memory && !index.filesystems.is_empty() && seen.is_none_or(|seen| seen.mappings) {
        let mut listed = HashSet::new();
        for (fs, m) in mapped_files(&dir.join("maps"), index, scratch) {
            if listed.insert((m.inode, m.shared_writable)) {
                uses.push(Use {
                    target: fs.target,
                    kind: ProcessUseKind::Mmap,
                    path: m.path,
                    fd: -1,
                    writable: m.shared_writable,
                    device: fs.node.clone(),
                    place: fs.label.clone(),
                    thread,
                });
            }
        }
    }
    uses
}

/// File mappings of a process on a target filesystem. Asks the kernel VMA by VMA (PROCMAP_QUERY, Linux 6.11+),
/// which formats no text; reads and parses the maps text on older kernels.
fn mapped_files<'i>(maps: &Path, index: &'i Index<'_>, scratch: &mut Scratch) -> Vec<(&'i Filesystem, MapEntry)> {
    let Ok(file) = std::fs::File::open(maps) else { return Vec::new() };
    let on_target = |dev: u64| index.filesystems.contains_key(&dev);
    let mut found = None;
    if scratch.procmap_query != Some(false) {
        match procmap::file_mappings(&file, |major, minor| on_target(makedev(major.into(), minor.into()))) {
            Ok(mappings) => {
                scratch.procmap_query = Some(true);
                found = Some(mappings);
            }
            Err(procmap::Unsupported) => scratch.procmap_query = Some(false),
        }
    }
    let found = found.unwrap_or_else(|| {
        use std::io::Read;
        scratch.maps.clear();
        if (&file).read_to_end(&mut scratch.maps).is_err() {
            return Vec::new();
        }
        scratch
            .maps
            .split(|b| *b == b'\n')
            .filter(|line| map_device(line).is_some_and(|(dev, _)| on_target(dev)))
            .filter_map(|line| parse_maps(&String::from_utf8_lossy(line)).pop())
            .collect()
    });
    found
        .into_iter()
        .filter_map(|m| Some((index.filesystems.get(&makedev(m.major.into(), m.minor.into()))?, m)))
        .collect()
}

/// Buffers a scan thread reuses from process to process.
#[derive(Default)]
struct Scratch {
    maps: Vec<u8>,
    /// Whether the kernel answers PROCMAP_QUERY (unknown until the first process).
    procmap_query: Option<bool>,
    /// Answers for anonymous devices no mount names (see [`target_fs`]).
    subvolumes: HashMap<u64, Option<Filesystem>>,
}

/// The device (as dev_t) and inode of a file-backed line of `maps`, without allocating: the full parse is only
/// done for lines on a target. `None` for anonymous mappings and malformed lines.
fn map_device(line: &[u8]) -> Option<(u64, u64)> {
    let mut fields = line.split(|b| *b == b' ').filter(|f| !f.is_empty());
    let dev = fields.nth(3)?;
    let inode: u64 = std::str::from_utf8(fields.next()?).ok()?.parse().ok()?;
    if inode == 0 {
        return None;
    }
    let colon = dev.iter().position(|b| *b == b':')?;
    let hex = |s: &[u8]| u64::from_str_radix(std::str::from_utf8(s).ok()?, 16).ok();
    Some((makedev(hex(&dev[..colon])?, hex(&dev[colon + 1..])?), inode))
}

fn process_uid(proc_root: &Path, pid: i32) -> u32 {
    std::fs::read_to_string(proc_root.join(pid.to_string()).join("status"))
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| l.strip_prefix("Uid:").and_then(|v| v.split_whitespace().next()?.parse().ok()))
        })
        .unwrap_or(u32::MAX)
}

/// The command line `/proc` shows in `dir` (a process's or a thread's directory).
fn process_cmdline(dir: &Path) -> String {
    let raw = std::fs::read(dir.join("cmdline")).unwrap_or_default();
    let mut s: String = String::from_utf8_lossy(&raw).replace('\0', " ").trim_end().to_string();
    if s.len() > 256 {
        let cut = (0..=256).rev().find(|&i| s.is_char_boundary(i)).unwrap_or(0);
        s.truncate(cut);
    }
    s
}

fn report_process(pid: i32, identity: Identity, uses: Vec<Use>, blockers: &mut [Vec<Blocker>]) {
    let Identity { command, uid, cmdline } = identity;
    // (target, kind) → how many uses, and the device of the first.
    let mut per_kind: HashMap<(usize, i32), (usize, String)> = HashMap::new();
    for u in uses {
        let (count, _) = per_kind.entry((u.target, u.kind as i32)).or_insert_with(|| (0, u.device.clone()));
        *count += 1;
        if *count > MAX_USES_PER_PROCESS {
            continue;
        }
        let who = format!("{command} (pid {pid}, uid {uid})");
        let mode = if u.writable { "writing" } else { "reading" };
        let message = match u.kind {
            ProcessUseKind::OpenFile => format!("{who} has {} open for {mode}", u.path),
            ProcessUseKind::BlockDevice => format!("{who} has the block device {} open for {mode}", u.device),
            ProcessUseKind::Cwd => format!("{who} has its working directory at {}", u.path),
            ProcessUseKind::Root => format!("{who} has its root directory at {}", u.path),
            ProcessUseKind::Exe => format!("{who} runs the program {}", u.path),
            ProcessUseKind::Mmap if u.writable => format!("{who} has {} memory-mapped, shared and writable", u.path),
            ProcessUseKind::Mmap | ProcessUseKind::Unspecified => format!("{who} has {} memory-mapped", u.path),
        };
        let through = u.thread.map(|t| format!(" in its thread {t}")).unwrap_or_default();
        blockers[u.target].push(blocker(
            BlockerKind::Process,
            &u.device,
            format!("{message}{through} (on {})", u.place),
            Detail::Process(ProcessUse {
                pid,
                command: command.clone(),
                cmdline: cmdline.clone(),
                uid,
                r#use: u.kind as i32,
                path: u.path,
                fd: u.fd,
                writable: u.writable,
                thread: u.thread.unwrap_or(0),
            }),
        ));
    }
    for ((target, _), (count, device)) in per_kind {
        if count > MAX_USES_PER_PROCESS {
            let more = count - MAX_USES_PER_PROCESS;
            blockers[target].push(Blocker {
                kind: BlockerKind::Process as i32,
                message: format!(
                    "{command} (pid {pid}, uid {uid}) holds {more} more files of the same kind on {device}"
                ),
                device,
                detail: None,
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::usage::target::Target;
    use std::os::unix::fs::MetadataExt;

    /// Both ways of reading mappings (PROCMAP_QUERY and the maps text of older kernels) find a shared, writable
    /// mapping of a file, with its path.
    #[test]
    fn mapped_files_found_by_ioctl_and_by_text() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mapped file");
        std::fs::write(&path, vec![1u8; 4096]).unwrap();
        let file = std::fs::OpenOptions::new().read(true).write(true).open(&path).unwrap();
        // SAFETY: a fresh shared mapping of a file we own; unmapped below.
        let addr = unsafe {
            nix::sys::mman::mmap(
                None,
                std::num::NonZeroUsize::new(4096).unwrap(),
                nix::sys::mman::ProtFlags::PROT_READ | nix::sys::mman::ProtFlags::PROT_WRITE,
                nix::sys::mman::MapFlags::MAP_SHARED,
                &file,
                0,
            )
        }
        .unwrap();
        let targets = [Target { key: "t".into(), devices: Vec::new() }];
        let mut index = Index {
            targets: &targets,
            devices: HashMap::new(),
            filesystems: HashMap::new(),
            mounted_devs: HashSet::new(),
            btrfs_fsids: HashMap::new(),
            stacked_mounts: HashMap::new(),
        };
        let dev = std::fs::metadata(&path).unwrap().dev();
        index.filesystems.insert(dev, Filesystem { target: 0, node: "/dev/test".into(), label: "test fs".into() });
        let maps = Path::new("/proc/self/maps");
        for forced in [None, Some(false)] {
            let mut scratch = Scratch { procmap_query: forced, ..Scratch::default() };
            let found = mapped_files(maps, &index, &mut scratch);
            let m = found.iter().find(|(_, m)| m.path.ends_with("mapped file")).map(|(_, m)| m);
            let m = m.unwrap_or_else(|| panic!("mapping found (procmap {forced:?}): {:?}", found.len()));
            assert!(m.shared_writable, "procmap {forced:?}");
            assert_eq!(m.path, path.to_str().unwrap());
        }
        // SAFETY: the mapping created above.
        unsafe { nix::sys::mman::munmap(addr, 4096) }.unwrap();
    }

    #[test]
    fn map_device_reads_hex_device_and_inode_without_allocating() {
        let line = b"7f0000000000-7f0000001000 rw-s 00000000 08:11 42 /x y";
        assert_eq!(map_device(line), Some((makedev(8, 0x11), 42)));
        assert_eq!(map_device(b"7f00-7f01 rw-p 00000000 00:00 0"), None);
        assert_eq!(map_device(b"garbage"), None);
        assert_eq!(map_device(b"a b c zz:01 5 /x"), None);
    }
}
