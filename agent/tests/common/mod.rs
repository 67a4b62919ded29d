//! Real-kernel fixtures shared by the test binaries of this crate: loop devices with filesystems, processes that
//! hold something, the `findmnt` oracle, and the agent binary as a process ([`binary`]). Each binary uses a
//! subset, hence the allowance below.
#![allow(dead_code)]

pub mod binary;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use wukong_agent::roots::HostRoots;
use wukong_agent::usage::{
    ALL_ANALYSES, BpfSource, Candidate, Mappings, NamespaceTask, ProcessSource, ProcfsSource, SourceError, Walk,
    scan_now_with,
};
use wukong_proto::v1::{Disk, UsageReport};

/// The in-kernel process source as the agent loads it, once per test binary: on this machine's kernel (6.7+), the
/// per-process walk. A machine where it cannot load fails the tests that use it (they never fall back silently).
pub fn bpf() -> &'static BpfSource {
    static SOURCE: std::sync::OnceLock<BpfSource> = std::sync::OnceLock::new();
    SOURCE.get_or_init(|| {
        let source = BpfSource::load(&HostRoots::default()).expect("the BPF iterators load on this machine");
        assert!(matches!(source.walk(), Walk::PerProcess { .. }), "not the per-process walk: {}", source.description());
        source
    })
}

/// The in-kernel process source walking per process as the agent does, but reading every mapping through the
/// kernel's VMA iterator, which the maple tree walk hands a process to when its tree is not safe to read: that way
/// runs on this machine only here, so tests compare it too. Once per test binary.
pub fn bpf_vma_iterator() -> &'static BpfSource {
    static SOURCE: std::sync::OnceLock<BpfSource> = std::sync::OnceLock::new();
    SOURCE.get_or_init(|| {
        let shards = std::thread::available_parallelism().map_or(1, |n| n.get() as u32);
        BpfSource::load_walk(&HostRoots::default(), Some(Walk::PerProcess { shards, mappings: Mappings::Iterator }))
            .expect("the per-process walk loads on this machine")
    })
}

/// Every in-kernel way to walk: per process reading mappings from their maple tree (the agent's), per process
/// through the VMA iterator, and per element.
pub fn bpf_walks() -> [&'static BpfSource; 3] {
    [bpf(), bpf_vma_iterator(), bpf_per_element()]
}

/// The in-kernel process source walking per element, as on kernels older than 6.7, once per test binary.
pub fn bpf_per_element() -> &'static BpfSource {
    static SOURCE: std::sync::OnceLock<BpfSource> = std::sync::OnceLock::new();
    SOURCE.get_or_init(|| {
        BpfSource::load_walk(&HostRoots::default(), Some(Walk::PerElement))
            .expect("the per-element iterators load on this machine")
    })
}

/// A source whose every failure fails the test: the scan's fallback to /proc would otherwise hide a broken
/// in-kernel source behind a correct report.
struct Strict<'a>(&'a dyn ProcessSource);

impl ProcessSource for Strict<'_> {
    fn name(&self) -> &'static str {
        self.0.name()
    }

    fn mount_namespaces(&self, proc_root: &Path) -> Result<BTreeMap<u64, NamespaceTask>, SourceError> {
        Ok(self.0.mount_namespaces(proc_root).unwrap_or_else(|e| panic!("{}: {e}", self.0.name())))
    }

    fn candidates(&self, proc_root: &Path, devices: &BTreeSet<u64>) -> Result<Vec<Candidate>, SourceError> {
        Ok(self.0.candidates(proc_root, devices).unwrap_or_else(|e| panic!("{}: {e}", self.0.name())))
    }
}

/// One report per disk, finding processes through `source` (which must not fail).
pub fn scan_by(disks: &[Disk], source: &dyn ProcessSource) -> Vec<UsageReport> {
    scan_now_with(&HostRoots::default(), disks, Duration::from_secs(30), ALL_ANALYSES, &Strict(source))
        .unwrap()
        .to_vec()
}

/// One report per disk, scanned with /proc and with each in-kernel walk ([`bpf_walks`]): all must be identical (but
/// for when they were taken and how long they took).
pub fn scan_every_way(disks: &[Disk]) -> Vec<UsageReport> {
    let timeless = |reports: &[UsageReport]| {
        let mut reports = reports.to_vec();
        for r in &mut reports {
            r.scanned_at = None;
            r.scan_duration = None;
        }
        reports
    };
    let procfs = scan_by(disks, &ProcfsSource);
    let left = timeless(&procfs);
    for source in bpf_walks() {
        let right = timeless(&scan_by(disks, source));
        if left != right {
            let only = |a: &[UsageReport], b: &[UsageReport]| -> Vec<String> {
                let theirs: Vec<_> = b.iter().flat_map(|r| &r.blockers).collect();
                a.iter().flat_map(|r| &r.blockers).filter(|x| !theirs.contains(x)).map(|x| x.message.clone()).collect()
            };
            panic!(
                "the /proc and the BPF scans ({}) differ\nonly /proc: {:#?}\nonly BPF: {:#?}",
                source.description(),
                only(&left, &right),
                only(&right, &left)
            );
        }
    }
    procfs
}

pub fn sh(script: &str) -> String {
    let out = Command::new("sh").arg("-c").arg(script).output().expect("sh runs");
    assert!(out.status.success(), "`{script}` failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Creates each of `dirs` (with its parents) under `base`.
pub fn mkdirs(base: &Path, dirs: &[&str]) {
    for d in dirs {
        std::fs::create_dir_all(base.join(d)).unwrap();
    }
}

pub fn require_root() {
    assert!(nix::unistd::geteuid().is_root(), "usage oracle tests need root (loop devices, mounts); run as root");
}

/// Tests run one at a time: a loop device being set up by one test is briefly open in `losetup`, which another
/// test's scan would rightly report.
pub fn serial() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// Decodes findmnt's `\xHH` escapes.
pub fn unescape_findmnt(s: &str) -> String {
    let mut out = Vec::new();
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1] == b'x'
            && let Ok(v) = u8::from_str_radix(&s[i + 2..i + 4], 16)
        {
            out.push(v);
            i += 4;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The name of every [`LoopDisk`]'s image file.
const IMAGE: &str = "wukong-test-disk.img";

/// Undoes what test processes killed before their [`LoopDisk`]s dropped left behind: loop devices whose image (by
/// its name) was deleted, with swap on them or on their filesystems, and their mounts. A leaked swap on a loop device
/// slows every later run of the machine's benchmarks, and each leak takes a loop device. A live test's image is
/// deleted only after its loop device is detached.
fn sweep_leftovers() {
    let listed = sh("losetup -n -l --raw -O NAME,BACK-FILE");
    // --raw writes the space before "(deleted)" as \x20.
    for dev in listed.lines().filter_map(|l| l.strip_suffix(&format!("/{IMAGE}\\x20(deleted)"))?.split(' ').next()) {
        let points = sh(&format!("findmnt -n -l -o TARGET -S {dev} || true"));
        let swaps = std::fs::read_to_string("/proc/swaps").unwrap_or_default();
        for swap in swaps.lines().skip(1).filter_map(|l| l.split_whitespace().next()) {
            if swap == dev || points.lines().any(|p| Path::new(swap).starts_with(p)) {
                let _ = Command::new("swapoff").arg(swap).status();
            }
        }
        for point in points.lines().rev() {
            let _ = Command::new("umount").arg("-l").arg(point).status();
        }
        let _ = Command::new("losetup").arg("-d").arg(dev).status();
        eprintln!("removed {dev}, left behind by a killed test run");
    }
}

/// A loop device over a sparse file, with a filesystem, cleaned up on drop (mounts first, deepest first).
pub struct LoopDisk {
    pub dir: tempfile::TempDir,
    pub dev: String,
    pub mounts: Vec<PathBuf>,
    pub extra_loops: Vec<String>,
    pub swaps: Vec<PathBuf>,
}

impl LoopDisk {
    pub fn new(fs: &str) -> Self {
        require_root();
        static SWEPT: std::sync::Once = std::sync::Once::new();
        SWEPT.call_once(sweep_leftovers);
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join(IMAGE);
        std::fs::File::create(&image).unwrap().set_len(320 << 20).unwrap();
        let dev = sh(&format!("losetup -f --show {}", image.display())).trim().to_string();
        // The read-only flag of a block device outlives a loop attachment: a test that failed mid-release may have
        // left it set.
        sh(&format!("blockdev --setrw {dev}"));
        let mkfs = match fs {
            "ext4" => format!("mkfs.ext4 -q -F {dev}"),
            "xfs" => format!("mkfs.xfs -q -f {dev}"),
            "btrfs" => format!("mkfs.btrfs -q -f {dev}"),
            "none" => "true".to_string(),
            other => panic!("unknown fs {other}"),
        };
        sh(&mkfs);
        // Where udevd runs, it probes the new device (briefly opening it): let it finish before any scan.
        if Path::new("/run/udev/control").exists() {
            let _ = Command::new("udevadm").arg("settle").status();
        }
        Self { dir, dev, mounts: Vec::new(), extra_loops: Vec::new(), swaps: Vec::new() }
    }

    pub fn name(&self) -> String {
        self.dev.trim_start_matches("/dev/").to_string()
    }

    pub fn mount_at(&mut self, rel: &str) -> PathBuf {
        let mp = self.dir.path().join(rel);
        std::fs::create_dir_all(&mp).unwrap();
        let status = Command::new("mount").arg(&self.dev).arg(&mp).status().unwrap();
        assert!(status.success(), "mount {} {}", self.dev, mp.display());
        self.mounts.push(mp.clone());
        mp
    }

    pub fn bind(&mut self, from: &Path, rel: &str) -> PathBuf {
        let mp = self.dir.path().join(rel);
        std::fs::create_dir_all(&mp).unwrap();
        assert!(Command::new("mount").arg("--bind").arg(from).arg(&mp).status().unwrap().success());
        self.mounts.push(mp.clone());
        mp
    }

    /// Docker's overlay2 layout on this disk's filesystem mounted at `root` (standing for /var/lib/docker): two
    /// image layers under `overlay2/<id>/diff`, their short links `overlay2/l/<ID>`, and a container's overlay
    /// mounted the way Docker (and Podman) mount one whose absolute layer list would not fit the mount call's page:
    /// from `overlay2`, the driver's home, every path relative, as mountinfo then shows them. Returns (home,
    /// merged); the overlay is unmounted on drop.
    pub fn docker_overlay(&mut self, root: &Path) -> (PathBuf, PathBuf) {
        let home = root.join("overlay2");
        mkdirs(&home, &["layer1/diff/etc", "layer2/diff", "ctr/diff", "ctr/work", "ctr/merged", "l"]);
        std::fs::write(home.join("layer1/diff/etc/app.conf"), b"threads=4\n").unwrap();
        std::os::unix::fs::symlink("../layer1/diff", home.join("l/L1")).unwrap();
        std::os::unix::fs::symlink("../layer2/diff", home.join("l/L2")).unwrap();
        sh(&format!(
            "cd '{}' && mount -t overlay overlay -o lowerdir=l/L2:l/L1,upperdir=ctr/diff,workdir=ctr/work ctr/merged",
            home.display()
        ));
        let merged = home.join("ctr/merged");
        self.mounts.push(merged.clone());
        (home, merged)
    }

    /// containerd's overlayfs snapshotter on this disk's filesystem mounted at `root` (standing for
    /// /var/lib/containerd/io.containerd.snapshotter.v1.overlayfs): image snapshots `snapshots/1/fs` and
    /// `snapshots/2/fs`, a container's `snapshots/3`, and its rootfs mounted at `rootfs` outside the disk the way
    /// containerd mounts a long lower list: from `snapshots`, the lower directories relative, the upper and work
    /// ones absolute. Returns the rootfs; unmounted on drop.
    pub fn containerd_overlay(&mut self, root: &Path) -> PathBuf {
        let snapshots = root.join("snapshots");
        mkdirs(&snapshots, &["1/fs", "2/fs", "3/fs", "3/work"]);
        let rootfs = self.dir.path().join("rootfs");
        std::fs::create_dir_all(&rootfs).unwrap();
        sh(&format!(
            "cd '{s}' && mount -t overlay overlay -o 'lowerdir=2/fs:1/fs,upperdir={s}/3/fs,workdir={s}/3/work' '{}'",
            rootfs.display(),
            s = snapshots.display()
        ));
        self.mounts.push(rootfs.clone());
        rootfs
    }

    pub fn disk(&self) -> Disk {
        let name = self.name();
        Disk { kernel_name: name.clone(), id: name.clone(), serial: name, ..Disk::default() }
    }

    /// The disk's report, the same from /proc and every in-kernel walk ([`scan_every_way`]).
    pub fn scan(&self) -> UsageReport {
        scan_every_way(&[self.disk()]).remove(0)
    }
}

impl Drop for LoopDisk {
    fn drop(&mut self) {
        for s in &self.swaps {
            let _ = Command::new("swapoff").arg(s).status();
        }
        for l in &self.extra_loops {
            let _ = Command::new("losetup").arg("-d").arg(l).status();
        }
        for m in self.mounts.iter().rev() {
            let _ = Command::new("umount").arg("-l").arg(m).status();
        }
        let _ = Command::new("losetup").arg("-d").arg(&self.dev).status();
    }
}

/// A process started with a shell script that prints "ready" once it holds what it should; killed on drop.
pub struct Holder(pub Child);

impl Holder {
    pub fn start(program: &str, args: &[&str]) -> Self {
        let mut child =
            Command::new(program).args(args).stdout(Stdio::piped()).stderr(Stdio::inherit()).spawn().unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.as_mut().unwrap()).read_line(&mut line).unwrap();
        assert_eq!(line.trim(), "ready", "{program} {args:?} did not get ready");
        Self(child)
    }

    /// A shell that runs `script` and then becomes `sleep` holding what it got; returned once it is `sleep`, so that
    /// two scans see the same process (its name changes with the exec).
    pub fn sh(script: &str) -> Self {
        let holder = Self::start("sh", &["-c", &format!("{script}\necho ready\nexec sleep 1000")]);
        wait_for_comm(holder.pid(), "sleep");
        holder
    }

    pub fn pid(&self) -> i32 {
        self.0.id() as i32
    }
}

/// Python (Debian's, installed by scripts/lib/install-deps.sh) running `body` in a second thread, which then
/// sleeps; the first thread runs `then` once the second is done.
pub fn threaded_python(body: &str, then: &str) -> Holder {
    threaded_python_under(&[], body, then)
}

/// [`threaded_python`], run by the command `under` (e.g. `unshare -m`), which execs it.
pub fn threaded_python_under(under: &[&str], body: &str, then: &str) -> Holder {
    let script = format!(
        "import ctypes,os,threading,time\nlibc=ctypes.CDLL(None)\nev=threading.Event()\ndef t():\n{body}\n    ev.set()\n    \
         time.sleep(1000)\nthreading.Thread(target=t).start()\nev.wait()\nprint('ready',flush=True)\n{then}\n"
    );
    let args: Vec<&str> = under.iter().copied().chain(["/usr/bin/python3", "-c", &script]).collect();
    Holder::start(args[0], &args[1..])
}

/// Waits until the first thread of `pid` has exited (/proc shows it a zombie).
pub fn wait_for_exited_leader(pid: i32) {
    let state = format!("/proc/{pid}/stat");
    let started = Instant::now();
    while !std::fs::read_to_string(&state)
        .is_ok_and(|s| s.rsplit(')').next().is_some_and(|r| r.trim_start().starts_with('Z')))
    {
        assert!(started.elapsed() < Duration::from_secs(10), "the first thread of {pid} did not exit");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The threads of process `pid` but its first.
pub fn other_threads(pid: i32) -> Vec<i32> {
    let mut tids: Vec<i32> = std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .filter(|&t| t != pid)
        .collect();
    tids.sort_unstable();
    tids
}

/// Waits until process `pid` is named `comm`: a script says "ready" before its last `exec`, and the scans of
/// `scan_every_way` must all see the same name.
pub fn wait_for_comm(pid: i32, comm: &str) {
    let path = format!("/proc/{pid}/comm");
    let started = Instant::now();
    while std::fs::read_to_string(&path).is_ok_and(|c| c.trim() != comm) {
        assert!(started.elapsed() < Duration::from_secs(10), "pid {pid} did not become {comm} within 10 s");
        std::thread::sleep(Duration::from_millis(2));
    }
}

impl Drop for Holder {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Mount points `findmnt` lists for the device in this mount namespace (raw output: escapes as \x20).
pub fn findmnt_targets(dev: &str) -> BTreeSet<String> {
    let out = Command::new("findmnt").args(["-n", "-l", "-o", "TARGET", "-S", dev]).output().unwrap();
    String::from_utf8_lossy(&out.stdout).lines().map(unescape_findmnt).collect()
}
