//! Releasing a disk so the hypervisor can unplug it without data loss (PrepareDetach), and undoing that
//! (CancelDetach).
//!
//! A release runs PRESENT → RELEASING → RELEASED, one operation per disk at a time:
//! 1. a fresh usage scan; any blocker but an idle mount refuses, changing nothing (so does a mount without
//!    `unmount`, and another filesystem mounted inside one of the disk's);
//! 2. every filesystem stacked on the disk (an overlay with a layer on it; one on an overlay before that one), then
//!    every mount of the disk, in every mount namespace, is undone deepest first; on a failure the undone ones are
//!    mounted back;
//! 3. a final scan, once udev's own probes of the disk are over, must find nothing;
//! 4. flush: dirty buffers written, the device's write cache flushed;
//! 5. fence: a SCSI device is set offline (nothing can open it from then on) and deleted in the guest, the delete's
//!    end overlapping the unplug; other buses are set read-only.
//!
//! Each step is journalled (see [`journal`]), so a restarted agent undoes an interrupted release and still knows
//! a completed one.
//!
//! A release may be given a [`Deadline`]: a caller that must decide by a fixed time (the admission guard, while the
//! API server waits) needs the release over by then, never still running, or done, after it has given up. Steps
//! that change nothing (scans, the flush) are abandoned when it comes; steps that change the disk are never cut
//! half-way (what they changed must be known to be undone), so the deadline is checked around them. When it
//! passes, what was done is undone before the answer.

pub mod fence;
pub mod journal;
pub mod mounts;

use crate::inventory::{InventoryHandle, LookupError, Mark, TOMBSTONE_TTL, Update};
use crate::roots::HostRoots;
use crate::serial::Serial;
use crate::udev_db::LibUdevDb;
use crate::usage::target::Target;
use crate::usage::{UsageError, UsageScanner};
use fence::{BlockDevices, Kernel};
use journal::{Fence, Journal, Phase, Record};
use mounts::{MountError, MountRecord};
use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};
use tokio::sync::{mpsc, watch};
use wukong_proto::v1::{
    Blocker, BlockerKind, Bus, CancelDetachResponse, Disk, DiskState, MountUse, PrepareDetachResponse, ProcessUse,
    ReleaseAction, ReleaseMethod, ScsiAddress, UsageReport, blocker::Detail,
};

/// How long udev may take to report a deleted SCSI disk gone, or a rescanned one back.
const UDEV_WAIT: Duration = Duration::from_secs(30);
/// How long the final scan waits for udev's probes (after unmount) to finish.
const PROBE_WAIT: Duration = Duration::from_secs(10);
/// Processes that open a disk briefly on their own after it changes (udev workers and the probes they run).
const TRANSIENT_PROBES: &[&str] = &["(udev-worker)", "systemd-udevd", "udevd", "blkid", "lvm", "pvscan", "mdadm"];
/// How many times a release scans again when a mount namespace it found ends before its unmounts are planned.
const NAMESPACE_RESCANS: u32 = 3;
/// How much of a deadline is kept back from a release's steps, to undo them and answer in time when they run out
/// of it (mounting back and clearing read-only mode take milliseconds): this, or a fifth of the deadline if less.
const UNDO_RESERVE: Duration = Duration::from_secs(1);

/// When a release must be over: released, or undone, in time for its caller to hear which.
#[derive(Debug, Clone, Copy)]
pub struct Deadline {
    /// When the steps must have ended, leaving the reserve to undo them and answer.
    steps_end: Instant,
    /// The time the caller gave, for messages.
    given: Duration,
}

impl Deadline {
    /// A deadline `given` from now; `None` when that is beyond what the clock can represent, which is no limit.
    pub fn after(given: Duration) -> Option<Self> {
        let reserve = UNDO_RESERVE.min(given / 5);
        Some(Self { steps_end: Instant::now().checked_add(given - reserve)?, given })
    }

    pub fn given(&self) -> Duration {
        self.given
    }

    fn exceeded(&self, disk: &Disk, step: &'static str) -> ReleaseError {
        ReleaseError::DeadlineExceeded {
            serial: disk.id.clone(),
            step,
            deadline: self.given,
            undo: "nothing was changed".into(),
        }
    }
}

/// Runs a step that changes nothing (a scan, a flush), abandoning it when the deadline comes first. What it started
/// in the kernel may still finish later, harmlessly.
async fn within<T>(
    deadline: Option<Deadline>,
    disk: &Disk,
    step: &'static str,
    work: impl Future<Output = Result<T, ReleaseError>>,
) -> Result<T, ReleaseError> {
    let Some(d) = deadline else { return work.await };
    tokio::time::timeout_at(d.steps_end.into(), work).await.unwrap_or_else(|_| Err(d.exceeded(disk, step)))
}

/// Checks the deadline next to a step that changes the disk: such a step is not started once it has passed, and
/// what it did is undone when it ended too late.
fn in_time(deadline: Option<Deadline>, disk: &Disk, step: &'static str) -> Result<(), ReleaseError> {
    match deadline {
        Some(d) if Instant::now() >= d.steps_end => Err(d.exceeded(disk, step)),
        _ => Ok(()),
    }
}

/// Why a release or its undoing did not happen. Every message names the disk and says what to do.
#[derive(Debug, thiserror::Error)]
pub enum ReleaseError {
    #[error(transparent)]
    Lookup(#[from] LookupError),
    #[error("disk '{serial}' is a system disk ({reason}); it is never released")]
    System { serial: String, reason: String },
    #[error("another release or cancel of disk '{0}' is running; retry when it has finished")]
    Busy(String),
    #[error("{message}")]
    InUse { message: String, report: Box<UsageReport>, disk: Box<Disk> },
    #[error(transparent)]
    Usage(#[from] UsageError),
    #[error("releasing disk '{serial}' failed: {error}; {undo}")]
    Failed { serial: String, error: String, undo: String },
    #[error("disk '{serial}' is no longer attached to the guest: nothing answers at SCSI address {address}")]
    Gone { serial: String, address: String },
    #[error("{0}")]
    Timeout(String),
    #[error(
        "disk '{serial}' was not released: {step} did not finish within the deadline of {:.1}s; {undo}; retry with \
         a longer deadline",
        deadline.as_secs_f64()
    )]
    DeadlineExceeded { serial: String, step: &'static str, deadline: Duration, undo: String },
}

/// Runs releases. Cheap to clone.
#[derive(Clone)]
pub struct Releaser {
    inner: Arc<Inner>,
}

struct Inner {
    roots: HostRoots,
    inventory: InventoryHandle,
    updates: mpsc::Sender<Update>,
    usage: UsageScanner,
    journal: Journal,
    devices: Arc<dyn BlockDevices>,
    /// Disks (case-folded ids) with an operation running.
    running: Mutex<HashSet<String>>,
    /// Disks (case-folded ids) whose SCSI delete a release has begun and the kernel has not ended: a receiver whose
    /// sender is dropped at its end.
    deleting: Mutex<HashMap<String, watch::Receiver<()>>>,
}

/// How far a SCSI delete had gone when the release went on.
enum Deleted {
    /// The device is offline (nothing can open the disk) and being deleted; the delete's end overlaps the unplug.
    Offline,
    /// Done, and udev has reported the disk gone (or did not within its wait).
    Ended,
}

/// Marks one disk as having an operation running, until dropped.
struct Running<'a> {
    inner: &'a Inner,
    key: String,
}

impl Drop for Running<'_> {
    fn drop(&mut self) {
        self.inner.running.lock().expect("never poisoned").remove(&self.key);
    }
}

/// What a release changed so far, to undo it if a later step fails.
#[derive(Default)]
struct Progress {
    unmounted: Vec<MountRecord>,
    read_only: Vec<PathBuf>,
}

/// Runs kernel work off the async runtime; a failure (or a panic) comes back as its message.
async fn blocking<T: Send + 'static, E: std::fmt::Display + Send + 'static>(
    work: impl FnOnce() -> Result<T, E> + Send + 'static,
) -> Result<T, String> {
    tokio::task::spawn_blocking(work).await.map_err(|e| e.to_string())?.map_err(|e| e.to_string())
}

fn action(kind: &str, description: String, started: Instant) -> ReleaseAction {
    ReleaseAction { kind: kind.into(), description, duration: started.elapsed().try_into().ok() }
}

impl Releaser {
    pub fn new(
        roots: HostRoots,
        inventory: InventoryHandle,
        updates: mpsc::Sender<Update>,
        usage: UsageScanner,
        journal: Journal,
    ) -> Self {
        Self::with_block_devices(roots, inventory, updates, usage, journal, Arc::new(Kernel))
    }

    /// A releaser whose block-device calls go to `devices` instead of the kernel (a test's slow or failing ones).
    pub fn with_block_devices(
        roots: HostRoots,
        inventory: InventoryHandle,
        updates: mpsc::Sender<Update>,
        usage: UsageScanner,
        journal: Journal,
        devices: Arc<dyn BlockDevices>,
    ) -> Self {
        let (running, deleting) = (Mutex::default(), Mutex::default());
        Self { inner: Arc::new(Inner { roots, inventory, updates, usage, journal, devices, running, deleting }) }
    }

    fn begin(&self, disk: &Disk) -> Result<Running<'_>, ReleaseError> {
        let key = disk.id.to_ascii_lowercase();
        if !self.inner.running.lock().expect("never poisoned").insert(key.clone()) {
            return Err(ReleaseError::Busy(disk.id.clone()));
        }
        Ok(Running { inner: &self.inner, key })
    }

    /// Sends a release mark and waits until the inventory shows it, so answers and events agree.
    async fn mark(&self, id: &str, mark: Mark) {
        if self.inner.updates.send(Update::Mark { id: id.to_string(), mark }).await.is_err() {
            return;
        }
        let want = match mark {
            Mark::Present => DiskState::Present,
            Mark::Releasing => DiskState::Releasing,
            Mark::Released { .. } => DiskState::Released,
        };
        let serial = Serial::parse(id).ok();
        let shown = |s: &Arc<crate::inventory::Snapshot>| match serial.as_ref().map(|x| s.find(x)) {
            Some(Ok(d)) => d.state() == want,
            _ => true,
        };
        let _ = tokio::time::timeout(Duration::from_secs(5), self.inner.inventory.wait_until(shown)).await;
    }

    async fn scan(&self, disk: &Disk) -> Result<UsageReport, ReleaseError> {
        Ok(self.inner.usage.check_fresh(std::slice::from_ref(disk)).await?[0].clone())
    }

    fn current(&self, serial: &Serial) -> Result<Disk, ReleaseError> {
        Ok(self.inner.inventory.snapshot().find(serial)?.clone())
    }

    /// PrepareDetach: releases the disk, or says exactly what prevents it and changes nothing. With a deadline, the
    /// release is done by then, or undone before this returns [`ReleaseError::DeadlineExceeded`].
    pub async fn prepare(
        &self,
        serial: &Serial,
        unmount: bool,
        dry_run: bool,
        deadline: Option<Deadline>,
    ) -> Result<PrepareDetachResponse, ReleaseError> {
        let _running = self.begin(&self.current(serial)?)?;
        // Read again now that no other operation runs: one that just finished may have released it.
        let disk = self.current(serial)?;
        if disk.state() == DiskState::Released {
            // A detach held back (a slow snapshot) asks again and again: a deleted SCSI disk stays listed for it.
            let at = SystemTime::now();
            let _ = self.inner.updates.send(Update::Asked { id: disk.id.clone(), at }).await;
            if let Some(mut record) = self.inner.journal.load(&disk.id) {
                record.set_asked(at);
                self.inner.journal.save(&record);
            }
            let description = format!("disk '{}' was already released; nothing to do", disk.id);
            let actions = vec![action("none", description, Instant::now())];
            return Ok(PrepareDetachResponse { released: true, dry_run, disk: Some(disk), actions, usage: None });
        }
        if disk.system {
            return Err(ReleaseError::System { serial: disk.id.clone(), reason: disk.system_reason.clone() });
        }
        let started = Instant::now();
        let (report, plan) = self.scan_and_plan(&disk, unmount, dry_run, deadline).await?;
        let mut summary = scan_summary(&report);
        let waited =
            started.elapsed().saturating_sub(report.scan_duration.and_then(|d| d.try_into().ok()).unwrap_or_default());
        if waited >= Duration::from_millis(100) {
            summary.push_str(&format!(", after waiting {} ms for udev's probes of the disk", waited.as_millis()));
        }
        let mut actions = vec![action("scan", summary, started)];
        if dry_run {
            let would = |kind: &str, description: String| ReleaseAction {
                kind: kind.into(),
                description: format!("would {description}"),
                duration: None,
            };
            actions.extend(plan.iter().map(|r| would("unmount", format!("unmount {}", r.place()))));
            actions.push(would("flush", format!("flush {} and its partitions", disk.dev_node)));
            actions.push(would("fence", fence_description(&disk)));
            return Ok(PrepareDetachResponse {
                released: false,
                dry_run: true,
                disk: Some(disk),
                actions,
                usage: Some(report),
            });
        }
        tracing::info!(serial = %disk.id, device = %disk.dev_node, mounts = plan.len(), "releasing disk");
        self.mark(&disk.id, Mark::Releasing).await;
        let mut record = Record::new(&disk, fence_of(&disk));
        self.inner.journal.save(&record);
        let mut progress = Progress::default();
        match self.execute(&disk, &plan, deadline, &mut record, &mut progress, &mut actions).await {
            Ok(method) => {
                let at = SystemTime::now();
                record.set_released(at);
                self.inner.journal.save(&record);
                self.mark(&disk.id, Mark::Released { at, method }).await;
                tracing::info!(serial = %disk.id, elapsed = ?started.elapsed(), "disk released");
                let disk = self.current(serial).unwrap_or(disk);
                Ok(PrepareDetachResponse {
                    released: true,
                    dry_run: false,
                    disk: Some(disk),
                    actions,
                    usage: Some(report),
                })
            }
            Err(e) => {
                let undo = self.undo(&disk, &progress).await;
                self.inner.journal.remove(&disk.id);
                self.mark(&disk.id, Mark::Present).await;
                tracing::warn!(serial = %disk.id, error = %e, undo = %undo, "release failed and was undone");
                Err(match e {
                    ReleaseError::InUse { message, report, disk } => {
                        ReleaseError::InUse { message: format!("{message}; {undo}"), report, disk }
                    }
                    ReleaseError::Failed { serial, error, .. } => ReleaseError::Failed { serial, error, undo },
                    ReleaseError::DeadlineExceeded { serial, step, deadline, .. } => {
                        ReleaseError::DeadlineExceeded { serial, step, deadline, undo }
                    }
                    other => other,
                })
            }
        }
    }

    /// Scans the disk and decides what a release must undo; refuses when anything but idle mounts uses it. A mount
    /// namespace whose last process exits between the scan and the plan (a container stopping) took its mounts
    /// with it: the disk is scanned again rather than refused for a namespace that no longer exists.
    async fn scan_and_plan(
        &self,
        disk: &Disk,
        unmount: bool,
        dry_run: bool,
        deadline: Option<Deadline>,
    ) -> Result<(UsageReport, Vec<MountRecord>), ReleaseError> {
        let mut rescans = NAMESPACE_RESCANS;
        loop {
            let report = self
                .settled_scan(disk, deadline, "the scan of what uses it (and the wait for udev's probes of it to end)")
                .await?;
            let in_use = |why: String| ReleaseError::InUse {
                message: in_use_message(disk, &why, &report, dry_run),
                report: Box::new(report.clone()),
                disk: Box::new(disk.clone()),
            };
            let mounts = idle_mounts(&report, unmount).map_err(|why| in_use(why.into()))?;
            if mounts.is_empty() {
                return Ok((report, Vec::new()));
            }
            let roots = self.inner.roots.clone();
            let (kernel_name, id) = (disk.kernel_name.clone(), disk.id.clone());
            let planned = tokio::task::spawn_blocking(move || {
                let target = Target::resolve(&roots, &LibUdevDb, &kernel_name, &id)
                    .unwrap_or(Target { key: id, devices: Vec::new() });
                mounts::plan(&roots, &target, &mounts)
            })
            .await
            .map_err(|e| UsageError::Internal(e.to_string()))?;
            match planned {
                Ok(plan) => return Ok((report, plan)),
                Err(MountError::NamespaceGone(ns)) if rescans > 0 => {
                    rescans -= 1;
                    tracing::debug!(serial = %disk.id, namespace = ns, "a mount namespace ended after the scan; scanning again");
                }
                Err(e) => return Err(in_use(format!("{e}; nothing was changed"))),
            }
        }
    }

    async fn execute(
        &self,
        disk: &Disk,
        plan: &[MountRecord],
        deadline: Option<Deadline>,
        record: &mut Record,
        progress: &mut Progress,
        actions: &mut Vec<ReleaseAction>,
    ) -> Result<ReleaseMethod, ReleaseError> {
        let roots = self.inner.roots.clone();
        let devices = &self.inner.devices;
        let failed = |error| ReleaseError::Failed { serial: disk.id.clone(), error, undo: String::new() };
        if !plan.is_empty() {
            let started = Instant::now();
            let records = plan.to_vec();
            record.unmounting = records.clone();
            self.inner.journal.save(record);
            let (r, p) = (roots.clone(), records.clone());
            let (done, error) = blocking(move || Ok::<_, String>(mounts::unmount(&r, &p))).await.map_err(failed)?;
            for r in &done {
                actions.push(action("unmount", format!("unmounted {}", r.place()), started));
            }
            progress.unmounted = done.clone();
            record.unmounted = done;
            record.unmounting.clear();
            self.inner.journal.save(record);
            if let Some(e) = error {
                if e.is_busy() {
                    let report = self.settled_scan(disk, deadline, "the scan of what took the disk back").await?;
                    let why = format!("{e}: something started using it during the release");
                    return Err(ReleaseError::InUse {
                        message: in_use_message(disk, &why, &report, false),
                        report: Box::new(report),
                        disk: Box::new(disk.clone()),
                    });
                }
                return Err(failed(e.to_string()));
            }
            in_time(deadline, disk, "unmounting its filesystems")?;
        }
        let started = Instant::now();
        self.final_scan(disk, deadline).await?;
        actions.push(action("verify", "a final scan found nothing using the disk".into(), started));

        let started = Instant::now();
        let nodes = device_nodes(&roots, disk);
        let (n, d) = (nodes.clone(), devices.clone());
        let flushed = async { blocking(move || n.iter().try_for_each(|p| d.flush(p))).await.map_err(failed) };
        within(deadline, disk, "flushing it to the hypervisor's storage", flushed).await?;
        actions.push(action("flush", format!("flushed {} to the hypervisor's storage", list(&nodes)), started));

        let started = Instant::now();
        match &record.fence {
            Fence::ScsiDelete { .. } => {
                // The delete is where a SCSI release is done for good: undoing it needs udev, maybe what is late.
                in_time(deadline, disk, "deleting its SCSI device")?;
                let description = match self.delete_scsi_device(disk, deadline).await.map_err(failed)? {
                    Deleted::Ended => {
                        format!("deleted SCSI device {} in the guest; nothing can open it any more", disk.dev_node)
                    }
                    Deleted::Offline => format!(
                        "set SCSI device {} offline and deleting it in the guest; nothing can open it any more",
                        disk.dev_node
                    ),
                };
                actions.push(action("scsi-delete", description, started));
                Ok(ReleaseMethod::ScsiDelete)
            }
            Fence::ReadOnly { .. } => {
                let (n, d) = (nodes.clone(), devices.clone());
                let set = blocking(move || {
                    let mut set = Vec::new();
                    for p in &n {
                        if !d.is_read_only(p)? {
                            d.set_read_only(p, true)?;
                            set.push(p.clone());
                        }
                    }
                    Ok::<_, fence::FenceError>(set)
                })
                .await
                .map_err(failed)?;
                progress.read_only = set.clone();
                record.fence = Fence::ReadOnly { devices: set.iter().map(|p| p.display().to_string()).collect() };
                self.inner.journal.save(record);
                in_time(deadline, disk, "setting it read-only")?;
                actions.push(action(
                    "read-only",
                    format!("set {} read-only, so nothing in the guest can write to it", list(&nodes)),
                    started,
                ));
                Ok(ReleaseMethod::ReadOnly)
            }
        }
    }

    /// A fresh scan once udev's own probes of the disk are over (they open it briefly after every change, e.g. an
    /// unmount); if they outlast [`PROBE_WAIT`], they are reported like any other user. `step` names it when the
    /// deadline comes first.
    async fn settled_scan(
        &self,
        disk: &Disk,
        deadline: Option<Deadline>,
        step: &'static str,
    ) -> Result<UsageReport, ReleaseError> {
        let settled = async {
            let probes_end = Instant::now() + PROBE_WAIT;
            loop {
                let report = self.scan(disk).await?;
                if !report.blockers.iter().any(is_transient_probe) || Instant::now() > probes_end {
                    return Ok(report);
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        };
        within(deadline, disk, step, settled).await
    }

    /// Scans again after the unmounts: nothing at all may use the disk now.
    async fn final_scan(&self, disk: &Disk, deadline: Option<Deadline>) -> Result<(), ReleaseError> {
        let report = self
            .settled_scan(
                disk,
                deadline,
                "the final scan after unmounting (and the wait for udev's probes of it to end)",
            )
            .await?;
        if !report.in_use {
            return Ok(());
        }
        let why = "after unmounting, something still uses it".to_string();
        Err(ReleaseError::InUse {
            message: in_use_message(disk, &why, &report, false),
            report: Box::new(report),
            disk: Box::new(disk.clone()),
        })
    }

    /// Deletes the disk's SCSI device in the guest. The device is set offline first, which takes the kernel
    /// microseconds: from then on every open of the disk fails (ENXIO), and the delete skips the cache flush the
    /// release has just done. The delete itself (≈ 20 ms in the lab's one-vCPU guest: the disk's queue frozen and
    /// torn down, its sysfs and device nodes removed) and udev's report of it then run on while the hypervisor
    /// unplugs the disk, as the guest's own removal does after a raw unplug; a cancel waits for the delete's end
    /// ([`Self::cancel`]). The inventory lists the disk as gone from the release on, and tells udev's late views of
    /// it from a re-plugged disk by the kernel's disk sequence number. A kernel without one (before 5.15), or that
    /// refuses the offline state, has the delete and udev's report waited for.
    async fn delete_scsi_device(&self, disk: &Disk, deadline: Option<Deadline>) -> Result<Deleted, String> {
        let (roots, devices, name) = (self.inner.roots.clone(), self.inner.devices.clone(), disk.kernel_name.clone());
        let (r, d, n) = (roots.clone(), devices.clone(), name.clone());
        let offline = match disk.diskseq {
            0 => Err("the kernel does not number disks (diskseq, Linux 5.15)".to_string()),
            _ => blocking(move || d.set_scsi_state(&r, &n, "offline")).await,
        };
        let write = tokio::task::spawn_blocking(move || devices.scsi_delete(&roots, &name));
        if let Err(e) = offline {
            tracing::debug!(serial = %disk.id, error = %e, "not answering before the SCSI delete's end");
            write.await.map_err(|e| e.to_string())?.map_err(|e| e.to_string())?;
            self.wait_gone(disk, deadline).await;
            return Ok(Deleted::Ended);
        }
        let key = disk.id.to_ascii_lowercase();
        let (finished, finishing) = watch::channel(());
        self.inner.deleting.lock().expect("never poisoned").insert(key.clone(), finishing);
        let (releaser, disk) = (self.clone(), disk.clone());
        tokio::spawn(async move {
            match write.await.map_err(|e| e.to_string()).and_then(|r| r.map_err(|e| e.to_string())) {
                Ok(()) => tracing::debug!(serial = %disk.id, "the offline SCSI device is deleted"),
                // The hypervisor's unplug, quicker than the delete, took the device already.
                Err(_) if !releaser.inner.roots.sys_block(&disk.kernel_name).exists() => {
                    tracing::debug!(serial = %disk.id, "the SCSI device was unplugged before its delete")
                }
                // Offline, the disk stays closed to everything until the hypervisor unplugs it (or a cancel).
                Err(e) => tracing::warn!(serial = %disk.id, error = %e, "deleting the offline SCSI device failed"),
            }
            releaser.inner.deleting.lock().expect("never poisoned").remove(&key);
            // Dropped, it wakes every cancel waiting for the delete's end.
            drop(finished);
        });
        Ok(Deleted::Offline)
    }

    /// Waits until udev reports the deleted disk gone (the inventory keeps it as a tombstone), at most until the
    /// deadline's steps end.
    async fn wait_gone(&self, disk: &Disk, deadline: Option<Deadline>) {
        let name = disk.kernel_name.clone();
        let gone = self.inner.inventory.wait_until(|s| s.disks.get(&name).is_none_or(|d| d.id != disk.id));
        let wait = deadline.map_or(UDEV_WAIT, |d| d.steps_end.saturating_duration_since(Instant::now()).min(UDEV_WAIT));
        if tokio::time::timeout(wait, gone).await.is_err() {
            // The kernel has deleted the device already; only udev's report is late.
            tracing::warn!(serial = %disk.id, device = %disk.dev_node, "udev did not report the deleted disk gone");
        }
    }

    /// Undoes what a failed release changed; returns a sentence saying what state the disk is in.
    async fn undo(&self, disk: &Disk, progress: &Progress) -> String {
        let mut failures = Vec::new();
        for p in &progress.read_only {
            if let Err(e) = self.inner.devices.set_read_only(p, false) {
                failures.push(e.to_string());
            }
        }
        let (restored, mut failed) = self.mount_back(disk, &progress.unmounted).await;
        failures.append(&mut failed);
        match (restored.is_empty(), failures.is_empty()) {
            (true, true) => "nothing was changed".into(),
            (false, true) => format!("everything was put back: {} mounted again", restored.join(", ")),
            (_, false) => format!(
                "it could not all be put back: {}{}",
                failures.join("; "),
                if restored.is_empty() { String::new() } else { format!(" (mounted again: {})", restored.join(", ")) }
            ),
        }
    }

    /// Mounts `records` back on the disk as it is now (it may have a new kernel name after a rescan). Returns the
    /// places restored and the failures.
    async fn mount_back(&self, disk: &Disk, records: &[MountRecord]) -> (Vec<String>, Vec<String>) {
        if records.is_empty() {
            return (Vec::new(), Vec::new());
        }
        let now =
            Serial::parse(&disk.id).ok().and_then(|s| self.inner.inventory.snapshot().find_present(&s).ok().cloned());
        let now = now.unwrap_or_else(|| disk.clone());
        let (roots, records) = (self.inner.roots.clone(), records.to_vec());
        let outcomes = tokio::task::spawn_blocking(move || {
            let node_for = |n: u32| -> Option<PathBuf> {
                let node = if n == 0 {
                    now.dev_node.clone()
                } else {
                    now.partitions.iter().find(|p| p.number == n)?.dev_node.clone()
                };
                Some(crate::roots::resolve_dev_path(&roots, &node))
            };
            mounts::mount_back(&roots, &records, &node_for)
        })
        .await
        .unwrap_or_default();
        let mut restored = Vec::new();
        let mut failed = Vec::new();
        for (r, outcome) in outcomes {
            match outcome {
                Ok(()) => restored.push(r.place()),
                Err(e) => failed.push(e.to_string()),
            }
        }
        (restored, failed)
    }

    /// CancelDetach: brings a released disk back, with the mounts the release undid.
    pub async fn cancel(&self, serial: &Serial) -> Result<CancelDetachResponse, ReleaseError> {
        let _running = self.begin(&self.current(serial)?)?;
        let disk = self.current(serial)?;
        if disk.state() == DiskState::Present {
            let description = format!("disk '{}' is not released; nothing to undo", disk.id);
            return Ok(CancelDetachResponse {
                disk: Some(disk),
                actions: vec![action("none", description, Instant::now())],
            });
        }
        // A delete the release left to the kernel is waited for: a rescan before its end would find the disk still
        // there, and the delete would then take it.
        let deleting = self.inner.deleting.lock().expect("never poisoned").get(&disk.id.to_ascii_lowercase()).cloned();
        if let Some(mut finishing) = deleting {
            let _ = finishing.changed().await;
        }
        let disk = self.current(serial)?;
        let record = self.inner.journal.load(&disk.id).unwrap_or_else(|| Record::new(&disk, fence_of(&disk)));
        let result = self.bring_back(&disk, &record).await;
        // Back, or unplugged meanwhile: either way there is no release left to remember.
        if matches!(result, Ok(_) | Err(ReleaseError::Gone { .. })) {
            self.inner.journal.remove(&disk.id);
        }
        let actions = result?;
        Ok(CancelDetachResponse { disk: Some(self.current(serial)?), actions })
    }

    /// Undoes the fence and the unmounts of a release.
    async fn bring_back(&self, disk: &Disk, record: &Record) -> Result<Vec<ReleaseAction>, ReleaseError> {
        let roots = self.inner.roots.clone();
        let stays_released = |error: String| ReleaseError::Failed {
            serial: disk.id.clone(),
            error,
            undo: "the disk stays released".into(),
        };
        let mut actions = Vec::new();
        let started = Instant::now();
        match &record.fence {
            Fence::ScsiDelete { host, channel, target, lun } => {
                let address = ScsiAddress { host: *host, channel: *channel, target: *target, lun: *lun };
                let shown = format!("{host}:{channel}:{target}:{lun}");
                let serial = Serial::parse(&disk.id).map_err(|e| stays_released(e.to_string()))?;
                // The same device, by the kernel's count, still there: its delete failed. The inventory lists it as
                // gone since the release.
                let remains = disk.diskseq != 0 && crate::disk::diskseq(&roots, &disk.kernel_name) == disk.diskseq;
                let done = if remains || self.inner.inventory.snapshot().find_present(&serial).is_ok() {
                    // It may be offline still.
                    let (r, d, name) = (roots.clone(), self.inner.devices.clone(), disk.kernel_name.clone());
                    blocking(move || match fence::scsi_state(&r, &name).as_deref() {
                        Some("offline") => d.set_scsi_state(&r, &name, "running"),
                        _ => Ok(()),
                    })
                    .await
                    .map_err(stays_released)?;
                    self.mark(&disk.id, Mark::Present).await;
                    if remains {
                        // udev describes it again only at its next event: it is listed back as it was.
                        let mut back = disk.clone();
                        Mark::Present.apply_to(&mut back);
                        let _ = self.inner.updates.send(Update::Upsert(Box::new(back))).await;
                    }
                    let description = format!(
                        "SCSI device {} at {shown} was not deleted; it is online again and the disk is back",
                        disk.dev_node
                    );
                    action("scsi-online", description, started)
                } else {
                    let (r, d) = (roots.clone(), self.inner.devices.clone());
                    let answered = blocking(move || d.scsi_rescan(&r, &address)).await.map_err(stays_released)?;
                    // Present again, or gone for good: either way the release is over.
                    self.mark(&disk.id, Mark::Present).await;
                    if !answered {
                        return Err(ReleaseError::Gone { serial: disk.id.clone(), address: shown });
                    }
                    action("scsi-rescan", format!("rescanned SCSI address {shown}; the disk is back"), started)
                };
                let back = self.inner.inventory.wait_until(|s| s.find_present(&serial).is_ok());
                if tokio::time::timeout(UDEV_WAIT, back).await.is_err() {
                    return Err(ReleaseError::Timeout(format!(
                        "no disk with serial '{}' appeared within {}s after bringing back SCSI address {shown}; \
                         another disk may answer there",
                        disk.id,
                        UDEV_WAIT.as_secs()
                    )));
                }
                actions.push(done);
            }
            Fence::ReadOnly { devices } => {
                let paths: Vec<PathBuf> = devices.iter().map(PathBuf::from).collect();
                let (p, d) = (paths.clone(), self.inner.devices.clone());
                blocking(move || p.iter().try_for_each(|p| d.set_read_only(p, false))).await.map_err(stays_released)?;
                self.mark(&disk.id, Mark::Present).await;
                actions.push(action("read-write", format!("cleared read-only mode of {}", list(&paths)), started));
            }
        }
        let started = Instant::now();
        let (restored, failed) = self.mount_back(disk, &record.unmounted).await;
        for place in restored {
            actions.push(action("mount", format!("mounted {place} again"), started));
        }
        for failure in failed {
            tracing::warn!(serial = %disk.id, error = %failure, "a mount could not be put back");
            actions.push(action("mount-failed", failure, started));
        }
        Ok(actions)
    }

    /// Finishes what a previous agent process left: an interrupted release is undone, a completed one is listed
    /// again. Runs once, after the first inventory sync.
    pub async fn recover(&self) {
        for record in self.inner.journal.load_all() {
            let Some(disk) = record.disk() else {
                self.inner.journal.remove(&record.id);
                continue;
            };
            let present = Serial::parse(&record.id)
                .ok()
                .and_then(|s| self.inner.inventory.snapshot().find_present(&s).ok().cloned());
            match (record.phase, &record.fence, present) {
                (Phase::Releasing, ..) => {
                    tracing::warn!(serial = %record.id, "undoing a release the previous agent process did not finish");
                    let mut record = record.clone();
                    // Killed while unmounting: what is gone from its namespace comes back too.
                    let roots = self.inner.roots.clone();
                    let unmounting = std::mem::take(&mut record.unmounting);
                    let gone = blocking(move || Ok::<_, String>(mounts::gone(&roots, &unmounting))).await;
                    record.unmounted.extend(gone.unwrap_or_default());
                    match self.bring_back(&disk, &record).await {
                        Ok(_) => tracing::info!(serial = %record.id, "interrupted release undone; the disk is present"),
                        Err(e) => {
                            tracing::error!(serial = %record.id, error = %e, "cannot undo an interrupted release")
                        }
                    }
                    self.inner.journal.remove(&record.id);
                }
                (Phase::Released, Fence::ReadOnly { .. }, Some(_)) => {
                    let at = record.released_at().unwrap_or_else(SystemTime::now);
                    self.mark(&record.id, Mark::Released { at, method: ReleaseMethod::ReadOnly }).await;
                }
                (Phase::Released, Fence::ScsiDelete { .. }, None)
                    if record
                        .released_at()
                        .max(record.asked_at())
                        .is_some_and(|at| at.elapsed().unwrap_or_default() < TOMBSTONE_TTL) =>
                {
                    let mut tomb = disk;
                    let at = record.released_at().unwrap_or_else(SystemTime::now);
                    Mark::Released { at, method: ReleaseMethod::ScsiDelete }.apply_to(&mut tomb);
                    if let Some(asked) = record.asked_at() {
                        let _ = self.inner.updates.send(Update::Asked { id: record.id.clone(), at: asked }).await;
                    }
                    let _ = self.inner.updates.send(Update::Tombstone(Box::new(tomb))).await;
                }
                // Re-plugged or unplugged since, or too old to matter.
                _ => self.inner.journal.remove(&record.id),
            }
        }
    }
}

/// How a disk will be fenced: SCSI disks are set offline and deleted in the guest; others are set read-only.
fn fence_of(disk: &Disk) -> Fence {
    match (&disk.scsi_address, disk.bus()) {
        (Some(a), Bus::Scsi) => Fence::ScsiDelete { host: a.host, channel: a.channel, target: a.target, lun: a.lun },
        _ => Fence::ReadOnly { devices: Vec::new() },
    }
}

fn fence_description(disk: &Disk) -> String {
    match fence_of(disk) {
        Fence::ScsiDelete { .. } => format!("set SCSI device {} offline and delete it in the guest", disk.dev_node),
        Fence::ReadOnly { .. } => format!("set {} and its partitions read-only", disk.dev_node),
    }
}

/// The disk's partitions, then the disk: flushed and fenced in that order.
fn device_nodes(roots: &HostRoots, disk: &Disk) -> Vec<PathBuf> {
    let mut nodes: Vec<PathBuf> = disk.partitions.iter().map(|p| roots.dev_node(&p.kernel_name)).collect();
    nodes.push(roots.dev_node(&disk.kernel_name));
    nodes
}

fn list(paths: &[PathBuf]) -> String {
    paths.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
}

fn scan_summary(report: &UsageReport) -> String {
    let count = |kind| report.blockers.iter().filter(|b| b.kind() == kind).count();
    match (count(BlockerKind::Mount), count(BlockerKind::StackedMount)) {
        (0, 0) => "nothing uses the disk".into(),
        (n, 0) => format!("the disk is mounted {n} time(s) and nothing else uses it"),
        (n, s) => format!(
            "the disk is mounted {n} time(s), {s} idle filesystem(s) are stacked on it and nothing else uses it"
        ),
    }
}

/// "disk 'S' (/dev/sdb) cannot be released: WHY; nothing was changed. Blockers: …".
fn in_use_message(disk: &Disk, why: &str, report: &UsageReport, dry_run: bool) -> String {
    let blockers: Vec<&str> = report.blockers.iter().map(|b| b.message.as_str()).collect();
    let prefix = if dry_run { "dry run: " } else { "" };
    let mut message = format!("{prefix}disk '{}' ({}) cannot be released: {why}", disk.id, disk.dev_node);
    if !blockers.is_empty() {
        message.push_str(&format!(". Blockers: {}", blockers.join("; ")));
    }
    message
}

/// The disk's mounts, when idle mounts are all that use it and the caller lets the agent unmount them; otherwise
/// why the release is refused.
fn idle_mounts(report: &UsageReport, unmount: bool) -> Result<Vec<MountUse>, &'static str> {
    let mounts: Vec<_> = report
        .blockers
        .iter()
        .filter_map(|b| match &b.detail {
            Some(Detail::Mount(m)) => Some(m.clone()),
            _ => None,
        })
        .collect();
    if report.blockers.len() > mounts.len() {
        return Err("it is in use; nothing was changed");
    }
    if !mounts.is_empty() && !unmount {
        return Err(
            "it is mounted; nothing was changed (ask for unmount to have the agent unmount its idle filesystems)",
        );
    }
    Ok(mounts)
}

/// A udev worker or probe reading the disk: it goes away on its own.
fn is_transient_probe(b: &Blocker) -> bool {
    matches!(&b.detail, Some(Detail::Process(ProcessUse { command, writable: false, .. }))
        if TRANSIENT_PROBES.contains(&command.as_str()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn process(command: &str, writable: bool) -> Blocker {
        Blocker {
            kind: BlockerKind::Process as i32,
            detail: Some(Detail::Process(ProcessUse { command: command.into(), writable, ..ProcessUse::default() })),
            ..Blocker::default()
        }
    }

    #[test]
    fn only_read_only_udev_probes_are_waited_out() {
        assert!(is_transient_probe(&process("(udev-worker)", false)));
        assert!(!is_transient_probe(&process("(udev-worker)", true)));
        assert!(!is_transient_probe(&process("postgres", false)));
    }

    #[test]
    fn only_idle_mounts_the_caller_lets_go_are_planned() {
        let mount = Blocker {
            kind: BlockerKind::Mount as i32,
            detail: Some(Detail::Mount(MountUse { mount_point: "/data".into(), ..MountUse::default() })),
            ..Blocker::default()
        };
        let report =
            |blockers: Vec<Blocker>| UsageReport { in_use: !blockers.is_empty(), blockers, ..UsageReport::default() };
        assert_eq!(idle_mounts(&report(vec![]), false), Ok(vec![]), "nothing to unmount needs no permission");
        let mounted = report(vec![mount.clone()]);
        assert_eq!(idle_mounts(&mounted, true).map(|m| m.len()), Ok(1));
        assert!(idle_mounts(&mounted, false).is_err_and(|why| why.starts_with("it is mounted")));
        let used = report(vec![mount, process("postgres", true)]);
        assert_eq!(idle_mounts(&used, true), Err("it is in use; nothing was changed"));
    }

    #[test]
    fn scsi_disks_are_deleted_others_set_read_only() {
        let address = wukong_proto::v1::ScsiAddress { host: 2, channel: 0, target: 3, lun: 1 };
        let scsi = Disk { bus: Bus::Scsi as i32, scsi_address: Some(address), ..Disk::default() };
        assert_eq!(fence_of(&scsi), Fence::ScsiDelete { host: 2, channel: 0, target: 3, lun: 1 });
        let scsi = Disk { dev_node: "/dev/sdb".into(), ..scsi };
        assert_eq!(fence_description(&scsi), "set SCSI device /dev/sdb offline and delete it in the guest");
        let virtio = Disk { bus: Bus::VirtioBlk as i32, dev_node: "/dev/vdb".into(), ..Disk::default() };
        assert_eq!(fence_of(&virtio), Fence::ReadOnly { devices: vec![] });
        assert_eq!(fence_description(&virtio), "set /dev/vdb and its partitions read-only");
    }

    #[test]
    fn refusal_lists_every_blocker() {
        let disk = Disk { id: "data".into(), dev_node: "/dev/sdb".into(), ..Disk::default() };
        let mut a = process("postgres", true);
        a.message = "postgres (pid 7) has /data/x open for writing".into();
        let mut b = process("sh", false);
        b.message = "sh (pid 8) has its working directory in /data".into();
        let report = UsageReport { in_use: true, blockers: vec![a, b], ..UsageReport::default() };
        assert_eq!(
            in_use_message(&disk, "it is in use; nothing was changed", &report, true),
            "dry run: disk 'data' (/dev/sdb) cannot be released: it is in use; nothing was changed. Blockers: postgres (pid 7) has \
             /data/x open for writing; sh (pid 8) has its working directory in /data"
        );
    }
}
