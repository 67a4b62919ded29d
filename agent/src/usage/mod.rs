//! Who uses a disk: a fresh scan on every request (never a cache), run off the async runtime with a deadline.
//! Concurrent requests for the same disks share one scan (single flight).

mod bpf_scan;
pub(crate) mod procfs_parse;
mod procfs_scan;
mod procmap;
mod scan;
mod source;
pub mod target;
mod threads;

use crate::roots::HostRoots;
use crate::udev_db::LibUdevDb;
pub use bpf_scan::{BpfSource, Mappings, Unavailable, Walk};
use futures::FutureExt;
use futures::future::{BoxFuture, Shared};
pub use procfs_scan::ProcfsSource;
pub use scan::Analyses;
pub use source::{Candidate, NamespaceTask, ProcessSource, Seen, SourceError};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};
use target::Target;
use wukong_proto::v1::{Disk, UsageReport};

/// Longest a scan may take before the request fails.
pub const SCAN_DEADLINE: Duration = Duration::from_secs(20);

/// Why a usage scan failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum UsageError {
    #[error("the usage scan did not finish within {0:?}; the guest may be overloaded, retry later")]
    Deadline(Duration),
    #[error("the usage scan failed: {0}")]
    Internal(String),
}

type ScanResult = Result<Arc<Vec<UsageReport>>, UsageError>;
/// Scans running now, by the kernel names they cover; later requests for the same disks join them.
type InFlight = Arc<Mutex<HashMap<Vec<String>, Shared<BoxFuture<'static, ScanResult>>>>>;

/// How the agent finds the processes that use a disk (config key `usage_scanner`, flag `--usage-scanner`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum ScannerChoice {
    /// The in-kernel iterators where they load, else /proc (the agent logs why, once, at start).
    #[default]
    Auto,
    /// The in-kernel iterators; the agent does not start where they cannot load.
    Bpf,
    /// Every process in /proc.
    Procfs,
}

/// The process source a scanner uses, and why that one: what `GetAgentInfo` reports.
#[derive(Clone)]
pub struct ActiveSource {
    pub source: Arc<dyn ProcessSource>,
    /// e.g. "BPF iterators loaded, a walk per process on 2 CPUs, mappings read from their maple tree (kernel 6.18.44)", "configured (usage_scanner =
    /// procfs)", or why the iterators could not load.
    pub reason: String,
}

impl ActiveSource {
    /// The source `choice` asks for on this machine. Only a forced `bpf` that cannot load is an error.
    pub fn choose(choice: ScannerChoice, roots: &HostRoots) -> Result<Self, Unavailable> {
        let procfs = |reason: String| Self { source: Arc::new(ProcfsSource), reason };
        match choice {
            ScannerChoice::Procfs => Ok(procfs("configured (usage_scanner = procfs)".into())),
            ScannerChoice::Bpf => BpfSource::load(roots).map(Self::bpf),
            ScannerChoice::Auto => Ok(BpfSource::load(roots).map(Self::bpf).unwrap_or_else(|e| procfs(e.to_string()))),
        }
    }

    /// /proc, for scans outside the agent's server (tests, benchmarks).
    pub fn procfs() -> Self {
        Self { source: Arc::new(ProcfsSource), reason: "the default outside the agent".into() }
    }

    fn bpf(source: BpfSource) -> Self {
        let reason = source.description().to_string();
        Self { source: Arc::new(source), reason }
    }

    /// "bpf" or "procfs".
    pub fn name(&self) -> &'static str {
        self.source.name()
    }
}

/// Runs usage scans. Cheap to clone.
#[derive(Clone)]
pub struct UsageScanner {
    roots: HostRoots,
    source: ActiveSource,
    deadline: Duration,
    in_flight: InFlight,
}

impl UsageScanner {
    pub fn new(roots: HostRoots, source: ActiveSource) -> Self {
        Self { roots, source, deadline: SCAN_DEADLINE, in_flight: Arc::default() }
    }

    /// The process source its scans use, and why.
    pub fn source(&self) -> &ActiveSource {
        &self.source
    }

    /// The /proc, /sys and /dev it scans.
    pub fn roots(&self) -> &HostRoots {
        &self.roots
    }

    /// A fresh report for each disk, in order. Disks that vanished meanwhile get a report with no blockers.
    pub async fn check(&self, disks: &[Disk]) -> ScanResult {
        let key: Vec<String> = disks.iter().map(|d| d.kernel_name.clone()).collect();
        let scan = {
            let mut in_flight = self.in_flight.lock().expect("in-flight map is never poisoned");
            match in_flight.get(&key) {
                Some(running) => running.clone(),
                None => {
                    let started = self.start(disks.to_vec(), key.clone());
                    in_flight.insert(key, started.clone());
                    started
                }
            }
        };
        scan.await
    }

    /// A report that starts after this call, never joining a scan already running: what a release decides on.
    pub async fn check_fresh(&self, disks: &[Disk]) -> ScanResult {
        let (roots, deadline, disks) = (self.roots.clone(), self.deadline, disks.to_vec());
        let source = self.source.source.clone();
        tokio::task::spawn_blocking(move || scan_now_with(&roots, &disks, deadline, ALL_ANALYSES, source.as_ref()))
            .await
            .unwrap_or_else(|e| Err(UsageError::Internal(e.to_string())))
    }

    fn start(&self, disks: Vec<Disk>, key: Vec<String>) -> Shared<BoxFuture<'static, ScanResult>> {
        let this = self.clone();
        async move {
            let result = this.check_fresh(&disks).await;
            let in_flight = this.in_flight;
            // Later requests must scan afresh: the answer is only valid for those who asked while it ran.
            in_flight.lock().expect("in-flight map is never poisoned").remove(&key);
            result
        }
        .boxed()
        .shared()
    }
}

/// The processes a report names as users of the disk (what `fuser -m` and `lsof` answer, to compare with them).
pub fn process_pids(report: &UsageReport) -> std::collections::BTreeSet<i32> {
    use wukong_proto::v1::blocker::Detail;
    report
        .blockers
        .iter()
        .filter_map(|b| match &b.detail {
            Some(Detail::Process(p)) => Some(p.pid),
            _ => None,
        })
        .collect()
}

/// Every analysis: what the agent runs.
pub const ALL_ANALYSES: Analyses = Analyses { stacked_mounts: true };

/// Scans now, on this thread, with every analysis, finding processes through /proc.
pub fn scan_now(roots: &HostRoots, disks: &[Disk], deadline: Duration) -> ScanResult {
    scan_now_with(roots, disks, deadline, ALL_ANALYSES, &ProcfsSource)
}

/// Scans now, on this thread, with the analyses asked for and the processes `source` finds.
pub fn scan_now_with(
    roots: &HostRoots,
    disks: &[Disk],
    deadline: Duration,
    analyses: Analyses,
    source: &dyn ProcessSource,
) -> ScanResult {
    let started = Instant::now();
    let scanned_at = SystemTime::now();
    let targets: Vec<Target> = disks
        .iter()
        .map(|d| {
            Target::resolve(roots, &LibUdevDb, &d.kernel_name, &d.id)
                .unwrap_or_else(|| Target { key: d.id.clone(), devices: Vec::new() })
        })
        .collect();
    let blockers = scan::scan(roots, &targets, started + deadline, analyses, source)
        .map_err(|_| UsageError::Deadline(deadline))?;
    let duration = started.elapsed();
    let reports = disks
        .iter()
        .zip(blockers)
        .map(|(d, blockers)| UsageReport {
            serial: d.serial.clone(),
            in_use: !blockers.is_empty(),
            blockers,
            scanned_at: Some(scanned_at.into()),
            scan_duration: duration.try_into().ok(),
        })
        .collect();
    Ok(Arc::new(reports))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{MetadataExt, symlink};
    use wukong_proto::v1::{BlockerKind, ProcessUseKind, blocker::Detail};

    /// A fixture tree: a fake disk whose device number is that of the filesystem holding a real file, a process
    /// (pid 4242) whose mountinfo mounts it and whose fd 7 is that file.
    fn fixture() -> (tempfile::TempDir, HostRoots, Disk) {
        let dir = tempfile::tempdir().unwrap();
        let roots = HostRoots::under(dir.path());
        let data = dir.path().join("data file");
        std::fs::write(&data, b"x").unwrap();
        let dev = std::fs::metadata(&data).unwrap().dev();
        let (ma, mi) = (nix::sys::stat::major(dev), nix::sys::stat::minor(dev));
        std::fs::create_dir_all(roots.sys.join("block/fakedisk")).unwrap();
        std::fs::write(roots.sys.join("block/fakedisk/dev"), format!("{ma}:{mi}\n")).unwrap();
        let p = roots.proc.join("4242");
        std::fs::create_dir_all(p.join("fd")).unwrap();
        std::fs::create_dir_all(p.join("fdinfo")).unwrap();
        std::fs::create_dir_all(p.join("ns")).unwrap();
        std::fs::write(p.join("ns/mnt"), b"").unwrap();
        std::fs::write(p.join("comm"), b"postgres\n").unwrap();
        std::fs::write(p.join("status"), b"Name:\tpostgres\nUid:\t999\t999\t999\t999\n").unwrap();
        std::fs::write(p.join("cmdline"), b"postgres\0-D\0/var/lib/pg\0").unwrap();
        std::fs::write(
            p.join("mountinfo"),
            format!(
                "30 1 {ma}:{mi} / /var/lib/pg\\040data rw,relatime - ext4 /dev/fakedisk rw\n31 1 {ma}:{mi} / /cut rw\n"
            ),
        )
        .unwrap();
        symlink(&data, p.join("fd/7")).unwrap();
        std::fs::write(p.join("fdinfo/7"), b"pos:\t0\nflags:\t0100002\n").unwrap();
        std::fs::write(roots.proc.join("swaps"), b"Filename Type Size Used Priority\n").unwrap();
        let disk = Disk {
            kernel_name: "fakedisk".into(),
            id: "fake-serial".into(),
            serial: "fake-serial".into(),
            ..Disk::default()
        };
        (dir, roots, disk)
    }

    #[test]
    fn scan_of_a_fixture_tree_finds_mount_and_process() {
        let (_dir, roots, disk) = fixture();
        let reports = scan_now(&roots, &[disk], Duration::from_secs(10)).unwrap();
        let r = &reports[0];
        assert!(r.in_use);
        assert_eq!(r.serial, "fake-serial");
        let mount = r.blockers.iter().find(|b| b.kind() == BlockerKind::Mount).expect("mount found");
        assert!(mount.message.contains("is mounted at /var/lib/pg data (ext4)"), "{}", mount.message);
        assert_eq!(r.blockers.iter().filter(|b| b.kind() == BlockerKind::Mount).count(), 1, "truncated line ignored");
        let process = r.blockers.iter().find(|b| b.kind() == BlockerKind::Process).expect("process found");
        assert!(process.message.starts_with("postgres (pid 4242, uid 999) has"), "{}", process.message);
        assert!(process.message.contains("data file open for writing"), "{}", process.message);
        let Some(Detail::Process(p)) = &process.detail else { panic!("process detail") };
        assert_eq!((p.fd, p.uid, p.writable, p.r#use()), (7, 999, true, ProcessUseKind::OpenFile));
        assert_eq!(p.cmdline, "postgres -D /var/lib/pg");
    }

    /// A fake process in its own mount namespace, seeing the fixture's directory as its root.
    fn process_in_namespace(roots: &HostRoots, base: &std::path::Path, pid: i32, comm: &str, mountinfo: &str) {
        let p = roots.proc.join(pid.to_string());
        for sub in ["fd", "fdinfo", "ns"] {
            std::fs::create_dir_all(p.join(sub)).unwrap();
        }
        std::fs::write(p.join("ns/mnt"), b"").unwrap();
        std::fs::write(p.join("comm"), format!("{comm}\n")).unwrap();
        std::fs::write(p.join("status"), b"Uid:\t1000\t1000\t1000\t1000\n").unwrap();
        std::fs::write(p.join("cmdline"), comm).unwrap();
        std::fs::write(p.join("mountinfo"), mountinfo).unwrap();
        symlink(base, p.join("root")).unwrap();
    }

    /// An overlay whose lower directory (a path with a space, among several) is on the disk, seen from two mount
    /// namespaces; processes using files through it, including one whose file carries a per-layer device number
    /// no mount names (found through the mount it was opened through).
    #[test]
    fn overlays_stacked_on_the_disk_and_their_users_are_found() {
        let (dir, roots, disk) = fixture();
        std::fs::create_dir_all(dir.path().join("layers/low 1")).unwrap();
        // The overlay's own device number: any filesystem other than the fixture's (procfs here).
        let overlay = std::fs::metadata("/proc/version").unwrap().dev();
        let (oma, omi) = (nix::sys::stat::major(overlay), nix::sys::stat::minor(overlay));
        let line = |id: u32| {
            format!(
                "{id} 1 {oma}:{omi} / /merged rw,relatime - overlay overlay \
                 rw,lowerdir=/elsewhere:/layers/low\\0401,upperdir=/nowhere/u,workdir=/nowhere/w\n"
            )
        };
        let mut host = std::fs::read_to_string(roots.proc.join("4242/mountinfo")).unwrap();
        host.push_str(&line(40));
        std::fs::write(roots.proc.join("4242/mountinfo"), host).unwrap();
        symlink(dir.path(), roots.proc.join("4242/root")).unwrap();
        // The agent's own namespace is the host's: pid 4242's.
        symlink("4242", roots.proc.join("self")).unwrap();
        process_in_namespace(&roots, dir.path(), 4243, "app", &line(50));
        symlink("/proc/version", roots.proc.join("4243/fd/3")).unwrap();
        std::fs::write(roots.proc.join("4243/fdinfo/3"), b"flags:\t0100000\nmnt_id:\t50\n").unwrap();
        // A sysfs file stands for a per-layer device number: anonymous, regular, in no mountinfo of the tree.
        symlink("/sys/kernel/uevent_seqnum", roots.proc.join("4243/fd/4")).unwrap();
        std::fs::write(roots.proc.join("4243/fdinfo/4"), b"flags:\t0100001\nmnt_id:\t50\n").unwrap();
        // The same kind of file opened through another mount is not the overlay's.
        symlink("/sys/kernel/uevent_seqnum", roots.proc.join("4243/fd/5")).unwrap();
        std::fs::write(roots.proc.join("4243/fdinfo/5"), b"flags:\t0100000\nmnt_id:\t77\n").unwrap();

        let reports = scan_now(&roots, std::slice::from_ref(&disk), Duration::from_secs(10)).unwrap();
        let r = &reports[0];
        let stacked: Vec<&wukong_proto::v1::Blocker> =
            r.blockers.iter().filter(|b| b.kind() == BlockerKind::StackedMount).collect();
        assert_eq!(stacked.len(), 2, "seen from both namespaces: {:#?}", r.blockers);
        let host = stacked.iter().find(|b| b.message.contains("host mount namespace")).expect("host overlay");
        assert!(
            host.message.starts_with("overlay mounted at /merged in the host mount namespace is stacked on this disk: its lowerdir /layers/low 1 on "),
            "{}",
            host.message
        );
        assert!(
            host.message.ends_with("(ext4, mounted at /var/lib/pg data); it must be unmounted before the disk"),
            "{}",
            host.message
        );
        let other = stacked.iter().find(|b| b.message.contains("of pid 4243, app")).expect("namespaced overlay");
        let Some(Detail::Mount(m)) = &other.detail else { panic!("mount detail") };
        assert_eq!((m.mount_id, m.host_namespace, m.fs_type.as_str()), (50, false, "overlay"));
        assert_eq!(m.layers.len(), 1);
        assert_eq!((m.layers[0].option.as_str(), m.layers[0].path.as_str()), ("lowerdir", "/layers/low 1"));
        let users: Vec<(i32, i32, bool)> = r
            .blockers
            .iter()
            .filter_map(|b| match &b.detail {
                // (Its root, the fixture's directory, is on the disk too.)
                Some(Detail::Process(p)) if p.pid == 4243 && p.fd >= 0 => Some((p.pid, p.fd, p.writable)),
                _ => None,
            })
            .collect();
        assert_eq!(users, vec![(4243, 3, false), (4243, 4, true)], "{:#?}", r.blockers);
        let user =
            r.blockers.iter().find(|b| b.message.starts_with("app (pid 4243, uid 1000) has /proc/version")).unwrap();
        assert!(user.message.contains("(on overlay mounted at /merged in"), "{}", user.message);
    }

    #[test]
    fn vanished_disk_and_empty_tree_are_not_errors() {
        let dir = tempfile::tempdir().unwrap();
        let roots = HostRoots::under(dir.path());
        let disk = Disk { kernel_name: "gone".into(), id: "gone".into(), ..Disk::default() };
        let reports = scan_now(&roots, &[disk], Duration::from_secs(10)).unwrap();
        assert!(!reports[0].in_use);
    }

    #[test]
    fn zero_deadline_is_a_named_error() {
        let (_dir, roots, disk) = fixture();
        let err = scan_now(&roots, &[disk], Duration::ZERO).unwrap_err();
        assert!(matches!(err, UsageError::Deadline(_)), "{err}");
    }

    #[test]
    fn concurrent_checks_share_one_scan_and_later_ones_scan_afresh() {
        let (_dir, roots, disk) = fixture();
        // One blocking thread, held busy until both requests are registered: the first scan cannot finish (and
        // leave) before the second request looks for it.
        let rt = tokio::runtime::Builder::new_current_thread().max_blocking_threads(1).build().unwrap();
        rt.block_on(async {
            let (release, hold) = std::sync::mpsc::channel::<()>();
            let busy = tokio::task::spawn_blocking(move || hold.recv());
            let scanner = UsageScanner::new(roots, ActiveSource::procfs());
            let disks = [disk];
            let (a, b, ()) = tokio::join!(scanner.check(&disks), scanner.check(&disks), async {
                tokio::task::yield_now().await;
                release.send(()).unwrap();
            });
            busy.await.unwrap().unwrap();
            let (a, b) = (a.unwrap(), b.unwrap());
            assert!(Arc::ptr_eq(&a, &b), "the second request joined the first scan");
            let c = scanner.check(&disks).await.unwrap();
            assert!(!Arc::ptr_eq(&a, &c), "a later request gets a fresh scan");
            assert!(scanner.in_flight.lock().unwrap().is_empty());
        });
    }
}
