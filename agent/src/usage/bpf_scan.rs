//! The in-kernel process finder: BPF iterators (bpf/usage.bpf.c) walk every task's open files, working directory,
//! root, executable and file mappings inside the kernel and report only the processes that use a watched device,
//! so the scan reads /proc for those few instead of for every process.
//!
//! Two walks, the same records: on Linux 6.7+ one program per task walks its files table and mappings itself,
//! read as one iterator per CPU, each for its share of the processes ([`Walk::PerProcess`]); on older kernels one
//! program per file, task and mapping ([`Walk::PerElement`]), the kernel's per-element iterators. The per-process
//! walk reads a process's mappings from the maple tree the kernel keeps them in, as the kernel's lockless readers
//! do, and through the kernel's VMA iterator where that tree is not safe to read ([`Mappings`]).
//!
//! Loaded once at start ([`BpfSource::load`]); each scan writes its devices to the `devices` maps and reads the
//! iterators, one scan at a time (the maps are shared). The loader is aya: pure Rust, so the agent keeps building
//! for glibc 2.17 with Zig, which libbpf's C dependencies (libelf, zlib) would make a cross-compilation of their
//! own. aya 0.14 cannot link calls to kernel functions (kfuncs), which the per-process walk needs: the object
//! carries them as marked raw calls and [`link_kfuncs`] writes in the running kernel's BTF ids.

use super::source::{Candidate, NamespaceTask, ProcessSource, Seen, SourceError};
use crate::roots::HostRoots;
use aya::maps::{HashMap as BpfHashMap, MapData};
use aya::programs::Iter;
use aya::{Btf, Ebpf, EbpfLoader, Endianness};
use aya_obj::btf::BtfKind;
use nix::sys::stat::{major, minor};
use std::collections::{BTreeMap, BTreeSet};
use std::io::Read;
use std::path::Path;
use std::sync::Mutex;

/// The compiled iterators (agent/build.rs).
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/usage.bpf.o"));

/// A program and the kernel iterator it attaches to.
type Program = (&'static str, &'static str);

/// The per-element programs.
const PER_ELEMENT: [Program; 3] =
    [("usage_files", "task_file"), ("usage_tasks", "task"), ("usage_mappings", "task_vma")];

/// The per-process program.
const PER_PROCESS: Program = ("usage_processes", "task");

/// The one that lists every process's mount namespace, and a thread's apart from its process's (loaded in either
/// walk).
const NAMESPACES: Program = ("usage_namespaces", "task");

/// The kernel functions the per-process program calls, by the number in its call markers (bpf/usage.bpf.c's
/// `KFUNC_CALL`): the VMA iterator (Linux 6.7) and bpf_rdonly_cast (6.2).
const KFUNCS: [(u64, &str); 4] = [
    (1, "bpf_iter_task_vma_new"),
    (2, "bpf_iter_task_vma_next"),
    (3, "bpf_iter_task_vma_destroy"),
    (4, "bpf_rdonly_cast"),
];

/// What a record says (bpf/usage.bpf.c's `enum use_kind`).
const USE_FD: u32 = 1;
const USE_CWD: u32 = 2;
const USE_ROOT: u32 = 3;
const USE_EXE: u32 = 4;
const USE_MAP: u32 = 5;
const USE_MOUNT_NS: u32 = 6;
const USE_UNWALKED: u32 = 7;
const USE_THREAD: u32 = 8;

/// One record as the iterators write it (bpf/usage.bpf.c's `struct record`).
const RECORD: usize = 16;

/// The `devices` map's size in bpf/usage.bpf.c.
const MAX_DEVICES: usize = 4096;

/// The most copies of the per-process program read at once: one per CPU, up to this.
const MAX_SHARDS: u32 = 8;

/// How the per-process walk reads a process's file mappings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mappings {
    /// From the maple tree the kernel keeps them in, without a lock, as the kernel's own lockless readers do; a
    /// process whose tree is not in RCU mode or changes under the walk is read through the VMA iterator.
    Tree,
    /// Through the kernel's VMA iterator alone, which locks each mapping in turn.
    Iterator,
    /// From the maple tree alone: a process whose tree is not safe to read is left to /proc, which reads it whole.
    /// Tests use it to see what the tree walk itself finds.
    TreeOnly,
}

/// Why the in-kernel finder cannot run here; the agent then scans /proc.
#[derive(Debug, Clone, thiserror::Error)]
#[error("the in-kernel (BPF) usage scan is unavailable: {0}")]
pub struct Unavailable(pub String);

/// How the loaded programs walk the kernel's tasks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Walk {
    /// One program per task walking its files and mappings (Linux 6.7+), read as this many iterators at once.
    PerProcess { shards: u32, mappings: Mappings },
    /// The kernel's per-file, per-task and per-mapping iterators (Linux 5.12+).
    PerElement,
}

/// The loaded iterators.
pub struct BpfSource {
    /// One loaded copy of the object per shard (walking per element, one); the first also holds the namespaces
    /// program.
    loaded: Mutex<Vec<Loaded>>,
    walk: Walk,
    /// The CPUs the agent may run on: with one, iterators are read one after the other.
    cpus: u32,
    /// e.g. "BPF iterators loaded, a walk per process on 2 CPUs, mappings read from their maple tree (kernel 6.18.44)".
    description: String,
}

struct Loaded {
    ebpf: Ebpf,
    devices: BpfHashMap<MapData, u32, u8>,
}

impl BpfSource {
    /// Loads the iterators against the running kernel (its BTF under `roots.sys`), for the processes `roots.proc`
    /// names: the per-process walk where the kernel has it, else the per-element one (the reason logged). Fails
    /// with the reason when the kernel (no BTF, older than 5.12, a verifier refusal), the agent's privileges
    /// (CAP_BPF and CAP_PERFMON, or CAP_SYS_ADMIN; a seccomp filter without `bpf`) or the proc root (not the
    /// kernel's /proc of this process) do not allow either. A first pass of every program proves they can be read.
    pub fn load(roots: &HostRoots) -> Result<Self, Unavailable> {
        Self::load_walk(roots, None)
    }

    /// As [`Self::load`], with the walk chosen rather than the kernel's best (tests and benchmarks compare them).
    pub fn load_walk(roots: &HostRoots, walk: Option<Walk>) -> Result<Self, Unavailable> {
        let proc_root = roots.proc.as_path();
        let level = pid_level(proc_root)?;
        let btf = Btf::parse_file(roots.sys.join("kernel/btf/vmlinux"), Endianness::default())
            .map_err(|e| Unavailable(format!("the kernel has no BTF to load against: {}", explain(&e))))?;
        let kernel = std::fs::read_to_string(proc_root.join("sys/kernel/osrelease")).unwrap_or_default();
        let kernel = kernel.trim();
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get() as u32);
        let per_process = |shards: u32, mappings: Mappings| {
            let object = link_kfuncs(OBJECT, &btf)?;
            let loaded = (0..shards)
                .map(|shard| {
                    let programs: &[Program] = if shard == 0 { &[NAMESPACES, PER_PROCESS] } else { &[PER_PROCESS] };
                    let settings = Settings { level, shard: (shard, shards), mappings };
                    load_copy(bytes_of(&object), &btf, settings, programs)
                })
                .collect::<Result<Vec<_>, _>>()?;
            Ok::<_, Unavailable>((loaded, Walk::PerProcess { shards, mappings }))
        };
        let per_element = || {
            let programs = [NAMESPACES, PER_ELEMENT[0], PER_ELEMENT[1], PER_ELEMENT[2]];
            // The per-element programs read no maple tree.
            let settings = Settings { level, shard: (0, 1), mappings: Mappings::Iterator };
            Ok::<_, Unavailable>((vec![load_copy(OBJECT, &btf, settings, &programs)?], Walk::PerElement))
        };
        let (loaded, walk) = match walk {
            Some(Walk::PerProcess { shards, mappings }) => per_process(shards.clamp(1, MAX_SHARDS), mappings)?,
            Some(Walk::PerElement) => per_element()?,
            None => match per_process(cpus.clamp(1, MAX_SHARDS), Mappings::Tree) {
                Ok(loaded) => loaded,
                Err(why) => {
                    // Said only when the per-element walk does load: else the reason is the same for both.
                    let loaded = per_element()?;
                    tracing::info!(reason = %why.0, "the per-process usage walk cannot load here; the kernel's per-element iterators walk instead");
                    loaded
                }
            },
        };
        let how = match walk {
            Walk::PerProcess { shards, mappings } => {
                let cpus = if shards == 1 { String::new() } else { format!(" on {shards} CPUs") };
                let mappings = match mappings {
                    Mappings::Tree => "mappings read from their maple tree",
                    Mappings::Iterator => "mappings through the VMA iterator",
                    Mappings::TreeOnly => "mappings read from their maple tree alone",
                };
                format!("a walk per process{cpus}, {mappings}")
            }
            Walk::PerElement => "a walk per file, task and mapping".to_string(),
        };
        let source = Self {
            loaded: Mutex::new(loaded),
            walk,
            cpus,
            description: format!("BPF iterators loaded, {how} (kernel {kernel})"),
        };
        let mut every = source.scan_programs();
        every.push((0, NAMESPACES));
        source.records(Some(&BTreeSet::new()), &every).map_err(|e| Unavailable(e.to_string()))?;
        drop(btf);
        // Loading parsed the kernel's whole BTF (5 MiB on 6.1, 13 MiB of peak memory) and freed it; malloc keeps
        // freed memory for reuse, and a resident agent would carry it for good (18 MiB resident against 8.5 with
        // /proc). Hand it back.
        // SAFETY: malloc_trim only releases free heap memory; it takes no pointer and is thread-safe.
        unsafe { nix::libc::malloc_trim(0) };
        Ok(source)
    }

    /// e.g. "BPF iterators loaded, a walk per process on 2 CPUs, mappings read from their maple tree (kernel 6.18.44)".
    pub fn description(&self) -> &str {
        &self.description
    }

    /// How the loaded programs walk.
    pub fn walk(&self) -> Walk {
        self.walk
    }

    /// The programs a scan reads, each with the loaded copy it is in.
    fn scan_programs(&self) -> Vec<(usize, Program)> {
        match self.walk {
            Walk::PerProcess { shards, .. } => (0..shards as usize).map(|copy| (copy, PER_PROCESS)).collect(),
            Walk::PerElement => PER_ELEMENT.iter().map(|&p| (0, p)).collect(),
        }
    }

    /// Every record of one pass of `programs`, with `devices` (userspace dev_t numbers) watched first; `None` leaves
    /// the devices maps as they are, for programs that do not read them (the namespaces').
    fn records(
        &self,
        devices: Option<&BTreeSet<u64>>,
        programs: &[(usize, Program)],
    ) -> Result<Vec<[u32; 4]>, SourceError> {
        let mut loaded = self.loaded.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(devices) = devices {
            if devices.len() > MAX_DEVICES {
                return Err(SourceError(format!(
                    "{} devices to watch, more than the {MAX_DEVICES} the map holds",
                    devices.len()
                )));
            }
            for Loaded { devices: map, .. } in loaded.iter_mut() {
                let stale: Vec<u32> = map.keys().filter_map(Result::ok).collect();
                for key in stale {
                    map.remove(&key).map_err(|e| SourceError(format!("cannot clear the devices map: {e}")))?;
                }
                for &dev in devices {
                    map.insert(kernel_dev(dev), 1, 0)
                        .map_err(|e| SourceError(format!("cannot fill the devices map: {e}")))?;
                }
            }
        }
        let mut files = Vec::new();
        for &(copy, (name, iterator)) in programs {
            let program: &mut Iter = loaded[copy]
                .ebpf
                .program_mut(name)
                .and_then(|p| p.try_into().ok())
                .ok_or_else(|| SourceError(format!("program {name} is gone")))?;
            let id = program.attach().map_err(|e| SourceError(format!("cannot attach iterator {iterator}: {e}")))?;
            let link = program.take_link(id).map_err(|e| SourceError(format!("iterator {iterator}: {e}")))?;
            let file = link.into_file().map_err(|e| SourceError(format!("cannot open iterator {iterator}: {e}")))?;
            files.push((iterator, file));
        }
        // The kernel walks each iterator's tasks inside read(): read on a thread each, they walk on every CPU at
        // once (the programs share only the devices maps, which they only read). With one CPU the threads would only
        // take turns, after starting (a guest's scan read three iterators on three threads): one after the other.
        let read = |(iterator, mut file): (&str, std::fs::File)| {
            let mut bytes = Vec::new();
            file.read_to_end(&mut bytes).map_err(|e| SourceError(format!("cannot read iterator {iterator}: {e}")))?;
            Ok::<_, SourceError>(bytes)
        };
        let parts: Vec<Result<Vec<u8>, SourceError>> = if self.cpus <= 1 {
            files.into_iter().map(read).collect()
        } else {
            let mut files = files.into_iter();
            let first = files.next();
            std::thread::scope(|scope| {
                let others: Vec<_> = files.map(|f| scope.spawn(move || read(f))).collect();
                let mut parts = vec![first.map_or(Ok(Vec::new()), read)];
                parts.extend(others.into_iter().map(|t| t.join().unwrap_or_else(|p| std::panic::resume_unwind(p))));
                parts
            })
        };
        let mut bytes = Vec::new();
        for part in parts {
            bytes.extend(part?);
        }
        Ok(bytes
            .chunks_exact(RECORD)
            .map(|r| std::array::from_fn(|i| u32::from_ne_bytes(r[i * 4..i * 4 + 4].try_into().expect("4 bytes"))))
            .collect())
    }
}

impl ProcessSource for BpfSource {
    fn name(&self) -> &'static str {
        "bpf"
    }

    fn mount_namespaces(&self, _proc_root: &Path) -> Result<BTreeMap<u64, NamespaceTask>, SourceError> {
        let mut first = BTreeMap::new();
        for [pid, kind, thread, ns] in self.records(None, &[(0, NAMESPACES)])? {
            if kind == USE_MOUNT_NS && another_process(pid) {
                NamespaceTask { pid: pid as i32, thread: thread as i32 }.see_in(&mut first, u64::from(ns));
            }
        }
        Ok(first)
    }

    fn candidates(&self, _proc_root: &Path, devices: &BTreeSet<u64>) -> Result<Vec<Candidate>, SourceError> {
        if devices.is_empty() {
            return Ok(Vec::new());
        }
        Ok(candidates_of(&self.records(Some(devices), &self.scan_programs())?))
    }
}

/// The processes `records` name (but the agent, and but for their mount namespaces), with what was seen of each;
/// a process one program could not walk, or a record of a kind this agent does not know, is looked at whole.
fn candidates_of(records: &[[u32; 4]]) -> Vec<Candidate> {
    let mut seen: BTreeMap<i32, Option<Seen>> = BTreeMap::new();
    for &[pid, kind, fd, _] in records {
        if kind == USE_MOUNT_NS || !another_process(pid) {
            continue;
        }
        let entry = seen.entry(pid as i32).or_insert_with(|| Some(Seen::default()));
        match (kind, entry.as_mut()) {
            (USE_FD, Some(seen)) => {
                seen.fds.insert(fd as i32);
            }
            (USE_MAP, Some(seen)) => seen.mappings = true,
            // Always looked at (three stats); or already whole.
            (USE_CWD | USE_ROOT | USE_EXE, _) | (USE_FD | USE_MAP, None) => {}
            // Not walked, or found through a thread that holds it apart from its leader: /proc shows that under
            // the thread alone, which the whole reading of a process looks at.
            (USE_UNWALKED | USE_THREAD, _) => *entry = None,
            // A kind this agent does not know: nothing is assumed of the process.
            _ => *entry = None,
        }
    }
    seen.into_iter().map(|(pid, seen)| Candidate { pid, seen }).collect()
}

/// A pid the scan looks at: not the agent itself (as with /proc), and one the reader's namespace names (0: none).
fn another_process(pid: u32) -> bool {
    pid != 0 && pid != std::process::id()
}

/// What a loaded copy of the object is set to at load (its `const volatile` globals).
#[derive(Clone, Copy)]
struct Settings {
    /// The depth of the reader's pid namespace.
    level: u32,
    /// The shard of the processes it walks, of how many.
    shard: (u32, u32),
    mappings: Mappings,
}

/// One loaded copy of `object` with `programs` loaded into the kernel.
fn load_copy(object: &[u8], btf: &Btf, settings: Settings, programs: &[Program]) -> Result<Loaded, Unavailable> {
    // bpf/usage.bpf.c's MAPPINGS_*.
    let mappings: u32 = match settings.mappings {
        Mappings::Tree => 0,
        Mappings::Iterator => 1,
        Mappings::TreeOnly => 2,
    };
    let mut ebpf = EbpfLoader::new()
        .btf(Some(btf))
        .override_global("pid_level", &settings.level, true)
        .override_global("shard", &settings.shard.0, true)
        .override_global("shards", &settings.shard.1, true)
        .override_global("mappings", &mappings, true)
        .load(object)
        .map_err(|e| Unavailable(format!("cannot load the iterators' object: {}", explain(&e))))?;
    for &(name, iterator) in programs {
        let program: &mut Iter = ebpf
            .program_mut(name)
            .ok_or_else(|| Unavailable(format!("the object has no program {name}")))?
            .try_into()
            .map_err(|e| Unavailable(format!("program {name} is not an iterator: {e}")))?;
        program
            .load(iterator, btf)
            .map_err(|e| Unavailable(format!("the kernel refused program {name} ({iterator}): {}", explain(&e))))?;
    }
    let map = ebpf.take_map("devices").ok_or_else(|| Unavailable("the object has no devices map".into()))?;
    let devices = BpfHashMap::try_from(map).map_err(|e| Unavailable(format!("the devices map: {e}")))?;
    Ok(Loaded { ebpf, devices })
}

/// `object` with every kfunc call marker (bpf/usage.bpf.c's `KFUNC_CALL`: a call instruction with src_reg 2 and
/// the immediate 0x7eed00NN, 8-byte aligned as every instruction is) given the BTF id of kernel function NN in
/// `btf`, as 8-byte words (the object's alignment). Fails naming the first function the kernel lacks.
fn link_kfuncs(object: &[u8], btf: &Btf) -> Result<Vec<u64>, Unavailable> {
    const MARKER: u64 = 0x7eed_0000_0000_2085;
    const MARKER_MASK: u64 = 0xffff_ff00_ffff_ffff;
    let mut words: Vec<u64> = object
        .chunks(8)
        .map(|chunk| {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            u64::from_le_bytes(word)
        })
        .collect();
    let ids = KFUNCS
        .iter()
        .map(|&(number, name)| {
            let id = btf.id_by_type_name_kind(name, BtfKind::Func).map_err(|_| {
                Unavailable(format!("the kernel has no {name} (the per-process walk needs Linux 6.7 or later)"))
            })?;
            Ok((number, id))
        })
        .collect::<Result<BTreeMap<u64, u32>, Unavailable>>()?;
    for word in words.iter_mut().filter(|w| **w & MARKER_MASK == MARKER) {
        let number = (*word >> 32) & 0xff;
        let id = ids.get(&number).ok_or_else(|| {
            Unavailable(format!("the object calls kernel function number {number}, which the agent does not know"))
        })?;
        *word = (u64::from(*id) << 32) | (MARKER & 0xffff_ffff);
    }
    Ok(words.into_iter().map(u64::to_le).collect())
}

/// The words' memory as bytes: the object [`link_kfuncs`] returned, padded with zeros to a whole word.
fn bytes_of(words: &[u64]) -> &[u8] {
    // SAFETY: u64 has no padding and every byte of it is initialised; the slice covers exactly the words' memory,
    // borrowed for as long as they are.
    unsafe { std::slice::from_raw_parts(words.as_ptr().cast::<u8>(), std::mem::size_of_val(words)) }
}

/// The kernel's encoding of a device number (MKDEV: 12 bits of major, 20 of minor), from userspace's dev_t.
fn kernel_dev(dev: u64) -> u32 {
    ((major(dev) as u32) << 20) | (minor(dev) as u32 & 0xf_ffff)
}

/// The depth of the pid namespace `proc_root` names processes in, which must be this process's: the iterators
/// see the tasks of the reader's pid namespace and report their pids there.
fn pid_level(proc_root: &Path) -> Result<u32, Unavailable> {
    let status = std::fs::read_to_string(proc_root.join("self/status"))
        .map_err(|e| Unavailable(format!("{} is not the kernel's /proc of this process: {e}", proc_root.display())))?;
    let nspid: Vec<&str> = status
        .lines()
        .find_map(|l| l.strip_prefix("NSpid:"))
        .map(|v| v.split_whitespace().collect())
        .unwrap_or_default();
    let own = std::process::id().to_string();
    match nspid.last() {
        Some(last) if *last == own => Ok(nspid.len() as u32 - 1),
        _ => Err(Unavailable(format!(
            "{} names processes of another pid namespace than the agent's (its self is {nspid:?}, the agent is {own})",
            proc_root.display()
        ))),
    }
}

/// An error with its causes (e.g. the verifier's reason under aya's "program failed to load"), and what is missing
/// when the kernel said EPERM.
fn explain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = crate::error_chain::error_chain(e);
    let denied = std::iter::successors(Some(e), |e| e.source()).any(|e| {
        e.downcast_ref::<std::io::Error>().and_then(std::io::Error::raw_os_error)
            == Some(nix::errno::Errno::EPERM as i32)
    });
    if denied {
        text.push_str(
            " (loading needs CAP_BPF and CAP_PERFMON, or CAP_SYS_ADMIN, and the bpf system call allowed by any \
             seccomp filter, e.g. SystemCallFilter=bpf in a systemd unit)",
        );
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::sys::stat::makedev;

    #[test]
    fn device_numbers_are_converted_to_the_kernels_encoding() {
        assert_eq!(kernel_dev(makedev(7, 0)), 7 << 20);
        assert_eq!(kernel_dev(makedev(8, 17)), (8 << 20) | 17);
        assert_eq!(kernel_dev(makedev(259, 1 << 19)), (259 << 20) | (1 << 19));
        assert_eq!(kernel_dev(makedev(0, 1234)), 1234);
    }

    /// The kfunc call markers in the object, by number.
    fn markers(words: &[u64]) -> BTreeMap<u64, usize> {
        let mut found = BTreeMap::new();
        for w in words.iter().filter(|w| **w & 0xffff_ff00_ffff_ffff == 0x7eed_0000_0000_2085) {
            *found.entry((w >> 32) & 0xff).or_default() += 1;
        }
        found
    }

    #[test]
    fn every_kfunc_call_in_the_object_is_linked_to_the_running_kernels_function() {
        let object = link_kfuncs(OBJECT, &Btf::from_sys_fs().expect("this machine's kernel has BTF")).unwrap();
        let raw: Vec<u64> = OBJECT.chunks(8).map(|c| c.iter().rev().fold(0, |w, b| w << 8 | u64::from(*b))).collect();
        let before = markers(&raw);
        assert_eq!(before.keys().copied().collect::<Vec<_>>(), [1, 2, 3, 4], "each kfunc is called: {before:?}");
        assert!(markers(&object).is_empty(), "no marker is left");
        let changed: Vec<(u64, u64)> = raw.iter().zip(&object).filter(|(a, b)| a != b).map(|(a, b)| (*a, *b)).collect();
        assert_eq!(changed.len(), before.values().sum::<usize>(), "only the markers change");
        for (_, linked) in changed {
            assert_eq!(linked & 0xffff_ffff, 0x2085, "still a kfunc call: {linked:#x}");
            assert!(linked >> 32 > 0, "a BTF id: {linked:#x}");
        }
    }

    #[test]
    fn a_kernel_without_the_vma_iterator_is_refused_naming_it() {
        let e = link_kfuncs(OBJECT, &Btf::new()).unwrap_err().to_string();
        assert!(e.contains("the kernel has no bpf_iter_task_vma_new"), "{e}");
        assert!(e.contains("Linux 6.7 or later"), "{e}");
    }

    #[test]
    fn records_become_the_processes_to_read_with_what_was_seen_of_each() {
        let own = std::process::id();
        let dev = 7 << 20;
        let records = [
            [10, USE_FD, 3, dev],
            [10, USE_MAP, 0, dev],
            [10, USE_FD, 9, dev],
            [10, USE_FD, 3, dev],
            [11, USE_CWD, 0, dev],
            [11, USE_EXE, 0, dev],
            [12, USE_FD, 4, dev],
            [12, USE_UNWALKED, 0, 0],
            [12, USE_FD, 5, dev],
            [13, USE_MOUNT_NS, 0, 4_026_531_840],
            [0, USE_FD, 3, dev],
            [own, USE_FD, 3, dev],
            [14, 99, 0, 0],
            [14, USE_FD, 1, dev],
            [15, USE_FD, 6, dev],
            [15, USE_THREAD, 0, dev],
            [15, USE_MAP, 0, dev],
        ];
        let seen = |fds: &[i32], mappings| Some(Seen { fds: fds.iter().copied().collect(), mappings });
        assert_eq!(
            candidates_of(&records),
            [
                Candidate { pid: 10, seen: seen(&[3, 9], true) },
                Candidate { pid: 11, seen: seen(&[], false) },
                Candidate::whole(12),
                Candidate::whole(14),
                Candidate::whole(15),
            ]
        );
        assert_eq!(candidates_of(&[]), []);
    }

    #[test]
    fn a_kernel_without_btf_is_refused_with_a_reason() {
        let sys = tempfile::tempdir().unwrap();
        let roots = HostRoots { sys: sys.path().to_path_buf(), ..HostRoots::default() };
        let e = BpfSource::load(&roots).err().expect("no BTF, no iterators").to_string();
        assert!(e.starts_with("the in-kernel (BPF) usage scan is unavailable: the kernel has no BTF"), "{e}");
        assert!(e.contains("kernel/btf/vmlinux"), "names the file: {e}");
    }

    #[test]
    fn a_proc_root_that_is_not_this_processes_is_refused_with_a_reason() {
        let dir = tempfile::tempdir().unwrap();
        let e = pid_level(dir.path()).unwrap_err().to_string();
        assert!(e.contains("is not the kernel's /proc of this process"), "{e}");
        std::fs::create_dir_all(dir.path().join("self")).unwrap();
        std::fs::write(dir.path().join("self/status"), "Name:\tx\nNSpid:\t1\t2\n").unwrap();
        let e = pid_level(dir.path()).unwrap_err().to_string();
        assert!(e.contains("another pid namespace"), "{e}");
        assert!(pid_level(Path::new("/proc")).is_ok(), "this process's own /proc");
    }
}
