//! The in-kernel process finder: three BPF iterators (bpf/usage.bpf.c) walk every task's open files, working
//! directory, root, executable and file mappings inside the kernel and report only the processes that use a
//! watched device, so the scan reads /proc for those few instead of for every process.
//!
//! Loaded once at start ([`BpfSource::load`]); each scan writes its devices to the `devices` map and reads the
//! iterators, one scan at a time (the map is shared). The loader is aya: pure Rust, so the agent keeps building
//! for glibc 2.17 with Zig, which libbpf's C dependencies (libelf, zlib) would make a cross-compilation of their
//! own.

use super::source::{ProcessSource, SourceError};
use crate::roots::HostRoots;
use aya::maps::{HashMap as BpfHashMap, MapData};
use aya::programs::Iter;
use aya::{Btf, Ebpf, EbpfLoader, Endianness};
use nix::sys::stat::{major, minor};
use std::collections::{BTreeMap, BTreeSet};
use std::io::Read;
use std::path::Path;
use std::sync::Mutex;

/// The compiled iterators (agent/build.rs).
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/usage.bpf.o"));

/// The three programs and the kernel iterator each attaches to.
const PROGRAMS: [(&str, &str); 3] = [("usage_files", "task_file"), TASKS, ("usage_mappings", "task_vma")];

/// The one that also lists every process's mount namespace.
const TASKS: (&str, &str) = ("usage_tasks", "task");

/// What a record says (bpf/usage.bpf.c's `enum use_kind`).
const USE_MOUNT_NS: u32 = 6;

/// One record as the iterators write it (bpf/usage.bpf.c's `struct record`).
const RECORD: usize = 16;

/// The `devices` map's size in bpf/usage.bpf.c.
const MAX_DEVICES: usize = 4096;

/// Why the in-kernel finder cannot run here; the agent then scans /proc.
#[derive(Debug, Clone, thiserror::Error)]
#[error("the in-kernel (BPF) usage scan is unavailable: {0}")]
pub struct Unavailable(pub String);

/// The loaded iterators.
pub struct BpfSource {
    loaded: Mutex<Loaded>,
    /// e.g. "3 BPF iterators loaded (kernel 6.18.44)".
    description: String,
}

struct Loaded {
    ebpf: Ebpf,
    devices: BpfHashMap<MapData, u32, u8>,
}

impl BpfSource {
    /// Loads the iterators against the running kernel (its BTF under `roots.sys`), for the processes `roots.proc`
    /// names; fails with the reason when the kernel (no BTF, older than 5.12, a verifier refusal), the agent's
    /// privileges (CAP_BPF and CAP_PERFMON, or CAP_SYS_ADMIN; a seccomp filter without `bpf`) or the proc root (not
    /// the kernel's /proc of this process) do not allow it. A first scan proves the iterators can be read.
    pub fn load(roots: &HostRoots) -> Result<Self, Unavailable> {
        let proc_root = roots.proc.as_path();
        let level = pid_level(proc_root)?;
        let btf = Btf::parse_file(roots.sys.join("kernel/btf/vmlinux"), Endianness::default())
            .map_err(|e| Unavailable(format!("the kernel has no BTF to load against: {}", explain(&e))))?;
        let mut ebpf = EbpfLoader::new()
            .btf(Some(&btf))
            .override_global("pid_level", &level, true)
            .load(OBJECT)
            .map_err(|e| Unavailable(format!("cannot load the iterators' object: {}", explain(&e))))?;
        for (name, iterator) in PROGRAMS {
            let program: &mut Iter = ebpf
                .program_mut(name)
                .ok_or_else(|| Unavailable(format!("the object has no program {name}")))?
                .try_into()
                .map_err(|e| Unavailable(format!("program {name} is not an iterator: {e}")))?;
            program
                .load(iterator, &btf)
                .map_err(|e| Unavailable(format!("the kernel refused iterator {iterator}: {}", explain(&e))))?;
        }
        let map = ebpf.take_map("devices").ok_or_else(|| Unavailable("the object has no devices map".into()))?;
        let devices = BpfHashMap::try_from(map).map_err(|e| Unavailable(format!("the devices map: {e}")))?;
        let kernel = std::fs::read_to_string(proc_root.join("sys/kernel/osrelease")).unwrap_or_default();
        let kernel = kernel.trim();
        let source = Self {
            loaded: Mutex::new(Loaded { ebpf, devices }),
            description: format!("{} BPF iterators loaded (kernel {kernel})", PROGRAMS.len()),
        };
        source.records(&BTreeSet::new(), &PROGRAMS).map_err(|e| Unavailable(e.to_string()))?;
        drop(btf);
        // Loading parsed the kernel's whole BTF (5 MiB on 6.1, 13 MiB of peak memory) and freed it; malloc keeps
        // freed memory for reuse, and a resident agent would carry it for good (18 MiB resident against 8.5 with
        // /proc). Hand it back.
        // SAFETY: malloc_trim only releases free heap memory; it takes no pointer and is thread-safe.
        unsafe { nix::libc::malloc_trim(0) };
        Ok(source)
    }

    /// e.g. "3 BPF iterators loaded (kernel 6.18.44)".
    pub fn description(&self) -> &str {
        &self.description
    }

    /// Every record of one pass of `programs` with `devices` (userspace dev_t numbers) watched.
    fn records(&self, devices: &BTreeSet<u64>, programs: &[(&str, &str)]) -> Result<Vec<[u32; 4]>, SourceError> {
        if devices.len() > MAX_DEVICES {
            return Err(SourceError(format!(
                "{} devices to watch, more than the {MAX_DEVICES} the map holds",
                devices.len()
            )));
        }
        let mut loaded = self.loaded.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let Loaded { ebpf, devices: map } = &mut *loaded;
        let stale: Vec<u32> = map.keys().filter_map(Result::ok).collect();
        for key in stale {
            map.remove(&key).map_err(|e| SourceError(format!("cannot clear the devices map: {e}")))?;
        }
        for &dev in devices {
            map.insert(kernel_dev(dev), 1, 0).map_err(|e| SourceError(format!("cannot fill the devices map: {e}")))?;
        }
        let mut files = Vec::new();
        for &(name, iterator) in programs {
            let program: &mut Iter = ebpf
                .program_mut(name)
                .and_then(|p| p.try_into().ok())
                .ok_or_else(|| SourceError(format!("program {name} is gone")))?;
            let id = program.attach().map_err(|e| SourceError(format!("cannot attach iterator {iterator}: {e}")))?;
            let link = program.take_link(id).map_err(|e| SourceError(format!("iterator {iterator}: {e}")))?;
            let file = link.into_file().map_err(|e| SourceError(format!("cannot open iterator {iterator}: {e}")))?;
            files.push((iterator, file));
        }
        // The kernel walks each iterator's tasks inside read(): read on a thread each, they walk on every CPU at
        // once (the programs share only the devices map, which they only read). With one CPU this costs two
        // thread starts.
        let read = |(iterator, mut file): (&str, std::fs::File)| {
            let mut bytes = Vec::new();
            file.read_to_end(&mut bytes).map_err(|e| SourceError(format!("cannot read iterator {iterator}: {e}")))?;
            Ok::<_, SourceError>(bytes)
        };
        let mut files = files.into_iter();
        let first = files.next();
        let parts: Vec<Result<Vec<u8>, SourceError>> = std::thread::scope(|scope| {
            let others: Vec<_> = files.map(|f| scope.spawn(move || read(f))).collect();
            let mut parts = vec![first.map_or(Ok(Vec::new()), read)];
            parts.extend(others.into_iter().map(|t| t.join().unwrap_or_else(|p| std::panic::resume_unwind(p))));
            parts
        });
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

    fn mount_namespaces(&self, _proc_root: &Path) -> Result<BTreeMap<u64, i32>, SourceError> {
        let mut first = BTreeMap::new();
        // The task iterator alone: no device watched, it lists the mount namespaces.
        for [pid, kind, _, ns] in self.records(&BTreeSet::new(), &[TASKS])? {
            if kind == USE_MOUNT_NS && another_process(pid) {
                let lowest = first.entry(u64::from(ns)).or_insert(pid as i32);
                *lowest = (*lowest).min(pid as i32);
            }
        }
        Ok(first)
    }

    fn candidates(&self, _proc_root: &Path, devices: &BTreeSet<u64>) -> Result<Vec<i32>, SourceError> {
        if devices.is_empty() {
            return Ok(Vec::new());
        }
        let pids: BTreeSet<i32> = self
            .records(devices, &PROGRAMS)?
            .into_iter()
            .filter(|&[pid, kind, _, _]| kind != USE_MOUNT_NS && another_process(pid))
            .map(|[pid, ..]| pid as i32)
            .collect();
        Ok(pids.into_iter().collect())
    }
}

/// A pid the scan looks at: not the agent itself (as with /proc), and one the reader's namespace names (0: none).
fn another_process(pid: u32) -> bool {
    pid != 0 && pid != std::process::id()
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
