//! The live set of disks. One task owns it and applies updates in order; everyone else reads immutable snapshots
//! (a `watch` channel) and sequenced events (a `broadcast` channel). Nothing here takes a lock a reader could hold.
//!
//! Ordering contract, which `WatchDisks` and `WaitForDisk` rely on: the snapshot is published before the event that
//! produced it, and both carry the same sequence number. A reader that subscribes to events first and then reads the
//! snapshot misses nothing: it skips events whose sequence the snapshot already includes.
//!
//! Release state is kept here too, as a mark per disk id that overlays what udev reports. A disk whose SCSI device
//! the release deleted leaves udev's view, but stays listed as a *tombstone* in state RELEASED: the hypervisor's later
//! unplug produces no guest event, and the companion must be able to verify the release. A tombstone ends when
//! the disk comes back (re-plug or CancelDetach), when the mark is cleared, or [`TOMBSTONE_TTL`] after the release
//! or after a detach last asked for it (one held for a slow snapshot asks on every try), whichever is later.

use crate::serial::Serial;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio::sync::{broadcast, mpsc, watch};
use wukong_proto::v1::{Disk, DiskState, EventKind, ReleaseMethod};

/// Events buffered per subscriber before it is considered lagging (and re-sent a snapshot).
const EVENT_BUFFER: usize = 1024;
/// How long a released disk that left the guest stays listed after its release, or after a detach last asked for
/// it, so the companion can verify the release.
pub const TOMBSTONE_TTL: Duration = Duration::from_secs(3600);

/// Where a disk is in the release protocol, as the release module reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mark {
    /// No release: back to what udev says.
    Present,
    Releasing,
    Released {
        at: SystemTime,
        method: ReleaseMethod,
    },
}

impl Mark {
    /// Whether the disk leaving udev's view is part of the release (its SCSI device was deleted) rather than an
    /// unplug: then it stays listed as a tombstone.
    fn keeps_tombstone(self) -> bool {
        matches!(self, Mark::Releasing | Mark::Released { method: ReleaseMethod::ScsiDelete, .. })
    }

    pub fn apply_to(self, disk: &mut Disk) {
        let (state, at, method) = match self {
            Mark::Present => (DiskState::Present, None, ReleaseMethod::Unspecified),
            Mark::Releasing => (DiskState::Releasing, None, ReleaseMethod::Unspecified),
            Mark::Released { at, method } => (DiskState::Released, Some(at.into()), method),
        };
        disk.state = state as i32;
        disk.released_at = at;
        disk.release_method = method as i32;
    }
}

/// The key release marks and tombstones are kept under: the disk id, case-folded like serial lookups.
fn mark_key(id: &str) -> String {
    id.to_ascii_lowercase()
}

/// A change to apply, sent by the udev source.
#[derive(Debug, Clone, PartialEq)]
pub enum Update {
    /// The disk as it is now (added or changed), keyed by kernel name.
    Upsert(Box<Disk>),
    /// The disk with this kernel name is gone.
    Remove(String),
    /// The complete set of disks (initial enumeration, or after the monitor overflowed): anything else is removed.
    Reconcile(Vec<Disk>),
    /// The release state of the disk with this id, from the release module.
    Mark { id: String, mark: Mark },
    /// A released disk no longer in the guest, known from before the agent restarted.
    Tombstone(Box<Disk>),
    /// A detach asked for the released disk with this id at this time: its tombstone lives [`TOMBSTONE_TTL`] from
    /// then.
    Asked { id: String, at: SystemTime },
}

/// One applied change.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    pub kind: EventKind,
    pub disk: Disk,
    pub sequence: u64,
    pub time: SystemTime,
}

/// The disks at one point in the sequence.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// Sequence number of the last event included.
    pub sequence: u64,
    /// False until the first full enumeration has been applied.
    pub synced: bool,
    /// Disks present in the guest, by kernel name.
    pub disks: BTreeMap<String, Disk>,
    /// Released disks no longer in the guest, by case-folded id.
    pub tombstones: BTreeMap<String, Disk>,
}

/// Why a serial lookup found no single disk.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LookupError {
    #[error("no disk with serial '{0}' is present in the guest; check the serial the hypervisor gave the disk")]
    NotFound(String),
    #[error("serial '{serial}' matches several disks ({devices}); give each disk a unique serial in the hypervisor")]
    Ambiguous { serial: String, devices: String },
}

impl Snapshot {
    /// Disks, present ones and tombstones, ordered by id (serial, or kernel name for disks without one).
    pub fn disks_by_id(&self) -> Vec<&Disk> {
        let mut disks: Vec<&Disk> = self.disks.values().chain(self.tombstones.values()).collect();
        disks.sort_by(|a, b| a.id.cmp(&b.id));
        disks
    }

    /// The disk, present or a tombstone, whose serial or SCSI device id is `serial` (case-insensitive).
    pub fn find(&self, serial: &Serial) -> Result<&Disk, LookupError> {
        Self::find_in(self.disks.values().chain(self.tombstones.values()), serial)
    }

    /// Like [`Snapshot::find`], among disks present in the guest only.
    pub fn find_present(&self, serial: &Serial) -> Result<&Disk, LookupError> {
        Self::find_in(self.disks.values(), serial)
    }

    fn find_in<'a>(disks: impl Iterator<Item = &'a Disk>, serial: &Serial) -> Result<&'a Disk, LookupError> {
        let mut found = disks.filter(|d| disk_matches(d, serial));
        match (found.next(), found.next()) {
            (None, _) => Err(LookupError::NotFound(serial.to_string())),
            (Some(d), None) => Ok(d),
            (Some(a), Some(b)) => {
                let mut devices = vec![a.dev_node.clone(), b.dev_node.clone()];
                devices.extend(found.map(|d| d.dev_node.clone()));
                Err(LookupError::Ambiguous { serial: serial.to_string(), devices: devices.join(", ") })
            }
        }
    }
}

/// True when `disk` is the one a caller means by `serial`.
pub fn disk_matches(disk: &Disk, serial: &Serial) -> bool {
    serial.matches(&disk.serial) || serial.matches(&disk.device_id)
}

/// Read side of the inventory, cheap to clone into every request handler.
#[derive(Debug, Clone)]
pub struct InventoryHandle {
    snapshot: watch::Receiver<Arc<Snapshot>>,
    events: broadcast::Sender<Event>,
}

impl InventoryHandle {
    /// The current snapshot.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshot.borrow().clone()
    }

    /// Live events from now on. Subscribe before reading the snapshot (see the module documentation).
    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.events.subscribe()
    }

    /// Waits until the first full enumeration is applied.
    pub async fn wait_synced(&self) {
        self.wait_until(|s| s.synced).await;
    }

    /// Waits until a snapshot satisfies `done`; returns false if the inventory task ended first.
    pub async fn wait_until(&self, done: impl FnMut(&Arc<Snapshot>) -> bool) -> bool {
        let mut rx = self.snapshot.clone();
        rx.wait_for(done).await.is_ok()
    }
}

/// Starts the inventory task. It ends when every sender of updates is dropped.
pub fn spawn() -> (mpsc::Sender<Update>, InventoryHandle) {
    let (tx, rx) = mpsc::channel(EVENT_BUFFER);
    let (snap_tx, snap_rx) = watch::channel(Arc::new(Snapshot::default()));
    let (events, _) = broadcast::channel(EVENT_BUFFER);
    let handle = InventoryHandle { snapshot: snap_rx, events: events.clone() };
    tokio::spawn(run(
        rx,
        Inventory {
            current: Snapshot::default(),
            marks: BTreeMap::new(),
            asked: BTreeMap::new(),
            snapshot: snap_tx,
            events,
        },
    ));
    (tx, handle)
}

async fn run(mut updates: mpsc::Receiver<Update>, mut inventory: Inventory) {
    loop {
        let expiry = inventory.next_expiry();
        tokio::select! {
            update = updates.recv() => match update {
                Some(update) => inventory.apply(update),
                None => return,
            },
            () = sleep_until(expiry) => inventory.apply_changes(|inv| inv.expire(SystemTime::now())),
        }
    }
}

async fn sleep_until(at: Option<SystemTime>) {
    match at {
        Some(at) => tokio::time::sleep(at.duration_since(SystemTime::now()).unwrap_or_default()).await,
        None => std::future::pending().await,
    }
}

struct Inventory {
    current: Snapshot,
    /// Release marks by case-folded disk id; absent means PRESENT.
    marks: BTreeMap<String, Mark>,
    /// When a detach last asked for a released disk, by case-folded disk id.
    asked: BTreeMap<String, SystemTime>,
    snapshot: watch::Sender<Arc<Snapshot>>,
    events: broadcast::Sender<Event>,
}

type Change = (EventKind, Disk);

impl Inventory {
    fn apply(&mut self, update: Update) {
        self.apply_changes(|inv| inv.changes_for(update));
    }

    /// Runs `f`, then publishes the snapshot and, after it, the events of the changes `f` made.
    fn apply_changes(&mut self, f: impl FnOnce(&mut Self) -> Vec<Change>) {
        let changes = f(self);
        let time = SystemTime::now();
        let events: Vec<Event> = changes
            .into_iter()
            .map(|(kind, disk)| {
                self.current.sequence += 1;
                Event { kind, disk, sequence: self.current.sequence, time }
            })
            .collect();
        self.snapshot.send_replace(Arc::new(self.current.clone()));
        for event in events {
            tracing::info!(
                kind = ?event.kind, serial = %event.disk.serial, device = %event.disk.dev_node,
                sequence = event.sequence, "disk event"
            );
            // No subscriber is not an error: nobody is watching.
            let _ = self.events.send(event);
        }
    }

    fn changes_for(&mut self, update: Update) -> Vec<Change> {
        let mut changes = Vec::new();
        match update {
            Update::Upsert(disk) => changes.extend(self.upsert(*disk)),
            Update::Remove(name) => changes.extend(self.remove(&name)),
            Update::Reconcile(disks) => {
                let present: Vec<String> = disks.iter().map(|d| d.kernel_name.clone()).collect();
                let gone: Vec<String> = self.current.disks.keys().filter(|k| !present.contains(k)).cloned().collect();
                for name in gone {
                    changes.extend(self.remove(&name));
                }
                for disk in disks {
                    changes.extend(self.upsert(disk));
                }
                self.current.synced = true;
            }
            Update::Mark { id, mark } => changes.extend(self.mark(&id, mark)),
            Update::Tombstone(disk) => changes.extend(self.tombstone(*disk)),
            Update::Asked { id, at } => {
                let last = self.asked.entry(mark_key(&id)).or_insert(at);
                *last = (*last).max(at);
            }
        }
        changes
    }

    fn upsert(&mut self, mut disk: Disk) -> Vec<Change> {
        let key = mark_key(&disk.id);
        let is_new = !self.current.disks.contains_key(&disk.kernel_name);
        if is_new && let Some(tomb) = self.current.tombstones.get(&key) {
            if tomb.diskseq != 0 && tomb.diskseq == disk.diskseq {
                // udev describing the fenced device before its delete ended (a partition's removal, a mount's): the
                // same disk by the kernel's count, so still the tombstone.
                return Vec::new();
            }
            // The released disk is back (re-plugged, or rescanned by CancelDetach): the release is over.
            self.current.tombstones.remove(&key);
            self.forget(&key);
        }
        if let Some(mark) = self.marks.get(&key) {
            mark.apply_to(&mut disk);
        }
        match self.current.disks.insert(disk.kernel_name.clone(), disk.clone()) {
            None => vec![(EventKind::Added, disk)],
            Some(old) if old != disk => vec![(EventKind::Changed, disk)],
            Some(_) => Vec::new(),
        }
    }

    fn remove(&mut self, name: &str) -> Vec<Change> {
        let Some(disk) = self.current.disks.remove(name) else { return Vec::new() };
        let key = mark_key(&disk.id);
        match self.marks.get(&key) {
            Some(mark) if mark.keeps_tombstone() => {
                self.current.tombstones.insert(key, disk);
                Vec::new()
            }
            _ => {
                // Unplugged: whatever release there was is complete.
                self.forget(&key);
                vec![(EventKind::Removed, disk)]
            }
        }
    }

    fn mark(&mut self, id: &str, mark: Mark) -> Vec<Change> {
        let key = mark_key(id);
        match mark {
            Mark::Present => self.forget(&key),
            _ => {
                self.marks.insert(key.clone(), mark);
            }
        }
        let kind = match mark {
            Mark::Released { .. } => EventKind::Released,
            _ => EventKind::Changed,
        };
        let mut changes = Vec::new();
        for disk in self.current.disks.values_mut().filter(|d| mark_key(&d.id) == key) {
            mark.apply_to(disk);
            changes.push((kind, disk.clone()));
        }
        if mark == Mark::Present {
            changes.extend(self.current.tombstones.remove(&key).map(|d| (EventKind::Removed, d)));
        } else if let Some(tomb) = self.current.tombstones.get_mut(&key) {
            mark.apply_to(tomb);
            changes.push((kind, tomb.clone()));
        }
        if matches!(mark, Mark::Released { method: ReleaseMethod::ScsiDelete, .. }) {
            self.bury_fenced(&key);
        }
        changes
    }

    /// A disk released with its SCSI device offline leaves the guest now, though udev reports the device's delete
    /// later: a disk re-plugged with the same id meanwhile is then a new disk, neither ambiguous with it nor
    /// released. The kernel's disk sequence number tells udev's late views of the fenced device from a new disk; a
    /// kernel without it (before 5.15) has the delete and udev's report waited for by the release, and is left to
    /// udev here.
    fn bury_fenced(&mut self, key: &str) {
        let fenced: Vec<String> = self
            .current
            .disks
            .values()
            .filter(|d| mark_key(&d.id) == key && d.diskseq != 0)
            .map(|d| d.kernel_name.clone())
            .collect();
        for name in fenced {
            if let Some(disk) = self.current.disks.remove(&name) {
                self.current.tombstones.insert(key.to_string(), disk);
            }
        }
    }

    /// The end of a release: its mark and when a detach last asked for it.
    fn forget(&mut self, key: &str) {
        self.marks.remove(key);
        self.asked.remove(key);
    }

    fn tombstone(&mut self, disk: Disk) -> Option<Change> {
        let key = mark_key(&disk.id);
        if self.current.disks.values().any(|d| mark_key(&d.id) == key) {
            return None;
        }
        let at = released_at(&disk)?;
        self.marks.insert(key.clone(), Mark::Released { at, method: disk.release_method() });
        self.current.tombstones.insert(key, disk.clone());
        Some((EventKind::Released, disk))
    }

    /// When a released tombstone expires: [`TOMBSTONE_TTL`] after its release or the last detach that asked for
    /// it.
    fn expiry(&self, key: &str, tomb: &Disk) -> Option<SystemTime> {
        let at = released_at(tomb)?;
        Some(self.asked.get(key).map_or(at, |&asked| asked.max(at)) + TOMBSTONE_TTL)
    }

    /// When the first released tombstone expires.
    fn next_expiry(&self) -> Option<SystemTime> {
        self.current.tombstones.iter().filter_map(|(k, d)| self.expiry(k, d)).min()
    }

    fn expire(&mut self, now: SystemTime) -> Vec<Change> {
        let expired: Vec<String> = self
            .current
            .tombstones
            .iter()
            .filter(|(k, d)| self.expiry(k, d).is_some_and(|at| at <= now))
            .map(|(k, _)| k.clone())
            .collect();
        expired.iter().flat_map(|k| self.mark(k, Mark::Present)).collect()
    }
}

/// When a tombstone's disk was released; `None` while its release is still running.
fn released_at(d: &Disk) -> Option<SystemTime> {
    d.released_at.and_then(|t| SystemTime::try_from(t).ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn disk(name: &str, serial: &str) -> Disk {
        Disk {
            kernel_name: name.into(),
            serial: serial.into(),
            id: serial.into(),
            dev_node: format!("/dev/{name}"),
            state: DiskState::Present as i32,
            ..Disk::default()
        }
    }

    async fn next(rx: &mut broadcast::Receiver<Event>) -> (EventKind, String, u64) {
        let e = rx.recv().await.unwrap();
        (e.kind, e.disk.kernel_name, e.sequence)
    }

    #[tokio::test]
    async fn applies_updates_in_order_with_increasing_sequence() {
        let (tx, inv) = spawn();
        let mut rx = inv.subscribe();
        tx.send(Update::Reconcile(vec![disk("sda", "a")])).await.unwrap();
        tx.send(Update::Upsert(Box::new(disk("sdb", "b")))).await.unwrap();
        let mut changed = disk("sdb", "b");
        changed.size_bytes = 42;
        tx.send(Update::Upsert(Box::new(changed.clone()))).await.unwrap();
        tx.send(Update::Upsert(Box::new(changed))).await.unwrap(); // identical: no event
        tx.send(Update::Remove("sda".into())).await.unwrap();
        tx.send(Update::Remove("sdz".into())).await.unwrap(); // unknown: no event
        tx.send(Update::Reconcile(vec![disk("sdc", "c")])).await.unwrap();
        let got = [
            next(&mut rx).await,
            next(&mut rx).await,
            next(&mut rx).await,
            next(&mut rx).await,
            next(&mut rx).await,
            next(&mut rx).await,
        ];
        assert_eq!(
            got,
            [
                (EventKind::Added, "sda".into(), 1),
                (EventKind::Added, "sdb".into(), 2),
                (EventKind::Changed, "sdb".into(), 3),
                (EventKind::Removed, "sda".into(), 4),
                (EventKind::Removed, "sdb".into(), 5),
                (EventKind::Added, "sdc".into(), 6),
            ]
        );
        let snap = inv.snapshot();
        assert!(snap.synced);
        assert_eq!(snap.sequence, 6);
        assert_eq!(snap.disks.keys().collect::<Vec<_>>(), vec!["sdc"]);
    }

    #[tokio::test]
    async fn snapshot_is_published_before_its_event() {
        let (tx, inv) = spawn();
        let mut rx = inv.subscribe();
        tx.send(Update::Upsert(Box::new(disk("sda", "a")))).await.unwrap();
        let e = rx.recv().await.unwrap();
        assert!(inv.snapshot().sequence >= e.sequence);
        assert!(inv.snapshot().disks.contains_key("sda"));
    }

    #[tokio::test]
    async fn wait_synced_returns_after_first_reconcile() {
        let (tx, inv) = spawn();
        assert!(!inv.snapshot().synced);
        tx.send(Update::Reconcile(vec![])).await.unwrap();
        tokio::time::timeout(std::time::Duration::from_secs(5), inv.wait_synced()).await.unwrap();
    }

    async fn kinds(rx: &mut broadcast::Receiver<Event>, n: usize) -> Vec<(EventKind, DiskState)> {
        let mut out = Vec::new();
        for _ in 0..n {
            let e = rx.recv().await.unwrap();
            out.push((e.kind, e.disk.state()));
        }
        out
    }

    #[tokio::test]
    async fn a_deleted_scsi_disk_stays_as_a_released_tombstone_until_it_comes_back() {
        let (tx, inv) = spawn();
        let mut rx = inv.subscribe();
        tx.send(Update::Reconcile(vec![disk("sdb", "Data")])).await.unwrap();
        tx.send(Update::Mark { id: "DATA".into(), mark: Mark::Releasing }).await.unwrap();
        tx.send(Update::Remove("sdb".into())).await.unwrap(); // the release deleted it: no REMOVED event
        let at = SystemTime::now();
        tx.send(Update::Mark { id: "data".into(), mark: Mark::Released { at, method: ReleaseMethod::ScsiDelete } })
            .await
            .unwrap();
        assert_eq!(
            kinds(&mut rx, 3).await,
            [
                (EventKind::Added, DiskState::Present),
                (EventKind::Changed, DiskState::Releasing),
                (EventKind::Released, DiskState::Released),
            ]
        );
        let snap = inv.snapshot();
        assert!(snap.disks.is_empty() && snap.find_present(&Serial::parse("data").unwrap()).is_err());
        let tomb = snap.find(&Serial::parse("data").unwrap()).unwrap();
        assert_eq!((tomb.state(), tomb.release_method()), (DiskState::Released, ReleaseMethod::ScsiDelete));
        assert_eq!(snap.disks_by_id().len(), 1, "listed");
        // Re-plugged (or rescanned): the tombstone goes, the new disk is present.
        tx.send(Update::Upsert(Box::new(disk("sdc", "data")))).await.unwrap();
        assert_eq!(kinds(&mut rx, 1).await, [(EventKind::Added, DiskState::Present)]);
        assert!(inv.snapshot().tombstones.is_empty());
    }

    #[tokio::test]
    async fn a_disk_released_offline_leaves_at_once_and_only_a_new_disk_comes_back() {
        let (tx, inv) = spawn();
        let mut rx = inv.subscribe();
        let numbered = |name: &str, seq: u64| Disk { diskseq: seq, ..disk(name, "data") };
        tx.send(Update::Reconcile(vec![numbered("sdb", 7), disk("sdc", "old-kernel")])).await.unwrap();
        let released = Mark::Released { at: SystemTime::now(), method: ReleaseMethod::ScsiDelete };
        for id in ["data", "old-kernel"] {
            tx.send(Update::Mark { id: id.into(), mark: Mark::Releasing }).await.unwrap();
            tx.send(Update::Mark { id: id.into(), mark: released }).await.unwrap();
        }
        assert_eq!(
            kinds(&mut rx, 6).await,
            [
                (EventKind::Added, DiskState::Present),
                (EventKind::Added, DiskState::Present),
                (EventKind::Changed, DiskState::Releasing),
                (EventKind::Released, DiskState::Released),
                (EventKind::Changed, DiskState::Releasing),
                (EventKind::Released, DiskState::Released),
            ]
        );
        let snap = inv.snapshot();
        let data = Serial::parse("data").unwrap();
        assert!(snap.find_present(&data).is_err(), "gone from the guest the moment it is released");
        assert_eq!(snap.find(&data).unwrap().state(), DiskState::Released, "listed as a tombstone");
        // Without the kernel's count, late views could not be told from a new disk: udev decides, as before.
        assert_eq!(snap.disks.keys().collect::<Vec<_>>(), ["sdc"]);

        // udev's late views of the deleted device: still a tombstone, no event.
        tx.send(Update::Upsert(Box::new(numbered("sdb", 7)))).await.unwrap();
        tx.send(Update::Reconcile(vec![numbered("sdb", 7), disk("sdc", "old-kernel")])).await.unwrap();
        tx.send(Update::Remove("sdb".into())).await.unwrap();
        tx.send(Update::Upsert(Box::new(disk("sdd", "other")))).await.unwrap();
        assert_eq!(next(&mut rx).await.0, EventKind::Added, "the next event is the other disk's");
        assert!(inv.snapshot().find_present(&data).is_err());
        assert_eq!(inv.snapshot().find(&data).unwrap().state(), DiskState::Released);

        // Re-plugged under the same kernel name: a new disk by the kernel's count, present; the release is over.
        tx.send(Update::Upsert(Box::new(numbered("sdb", 9)))).await.unwrap();
        assert_eq!(kinds(&mut rx, 1).await, [(EventKind::Added, DiskState::Present)]);
        let snap = inv.snapshot();
        assert_eq!(snap.find(&data).unwrap().diskseq, 9);
        assert!(!snap.tombstones.contains_key("data"));
    }

    #[tokio::test]
    async fn an_unplugged_read_only_release_is_removed_and_marks_follow_udev_updates() {
        let (tx, inv) = spawn();
        let mut rx = inv.subscribe();
        tx.send(Update::Reconcile(vec![disk("vdb", "v")])).await.unwrap();
        let released = Mark::Released { at: SystemTime::now(), method: ReleaseMethod::ReadOnly };
        tx.send(Update::Mark { id: "v".into(), mark: released }).await.unwrap();
        let mut changed = disk("vdb", "v");
        changed.read_only = true;
        tx.send(Update::Upsert(Box::new(changed))).await.unwrap(); // udev's view keeps the release state
        tx.send(Update::Remove("vdb".into())).await.unwrap(); // the hypervisor unplugged it
        assert_eq!(
            kinds(&mut rx, 4).await,
            [
                (EventKind::Added, DiskState::Present),
                (EventKind::Released, DiskState::Released),
                (EventKind::Changed, DiskState::Released),
                (EventKind::Removed, DiskState::Released),
            ]
        );
        assert!(inv.snapshot().tombstones.is_empty());
        tx.send(Update::Upsert(Box::new(disk("vdb", "v")))).await.unwrap();
        assert_eq!(kinds(&mut rx, 1).await, [(EventKind::Added, DiskState::Present)], "the mark went with it");
    }

    #[tokio::test]
    async fn tombstones_expire() {
        let (tx, inv) = spawn();
        let mut rx = inv.subscribe();
        let mut old = disk("sdb", "old");
        let at = SystemTime::now() - TOMBSTONE_TTL - Duration::from_secs(1);
        Mark::Released { at, method: ReleaseMethod::ScsiDelete }.apply_to(&mut old);
        tx.send(Update::Reconcile(vec![])).await.unwrap();
        tx.send(Update::Tombstone(Box::new(old))).await.unwrap();
        assert_eq!(
            kinds(&mut rx, 2).await,
            [(EventKind::Released, DiskState::Released), (EventKind::Removed, DiskState::Released)]
        );
        assert!(inv.snapshot().tombstones.is_empty());
    }

    #[tokio::test]
    async fn a_tombstone_a_detach_asked_for_lives_on_from_then() {
        let (tx, inv) = spawn();
        let mut rx = inv.subscribe();
        let mut held = disk("sdb", "held");
        let now = SystemTime::now();
        Mark::Released { at: now - TOMBSTONE_TTL - Duration::from_secs(1), method: ReleaseMethod::ScsiDelete }
            .apply_to(&mut held);
        tx.send(Update::Reconcile(vec![])).await.unwrap();
        tx.send(Update::Asked { id: "HELD".into(), at: now - Duration::from_secs(5) }).await.unwrap();
        tx.send(Update::Tombstone(Box::new(held))).await.unwrap();
        assert_eq!(kinds(&mut rx, 1).await, [(EventKind::Released, DiskState::Released)]);
        // An earlier question does not shorten it.
        tx.send(Update::Asked { id: "held".into(), at: now - TOMBSTONE_TTL * 2 }).await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(inv.snapshot().tombstones.len(), 1, "kept: a detach asked for it 5 s ago");
        tx.send(Update::Mark { id: "held".into(), mark: Mark::Present }).await.unwrap();
        assert_eq!(kinds(&mut rx, 1).await, [(EventKind::Removed, DiskState::Released)]);
        assert!(inv.snapshot().tombstones.is_empty());
    }

    #[test]
    fn find_matches_serial_or_device_id_case_insensitively() {
        let mut snap = Snapshot::default();
        let mut long = disk("sdb", "A-Long-Serial-Over-Twenty-Chars");
        long.device_id = "short-id".into();
        snap.disks.insert("sdb".into(), long);
        snap.disks.insert("sdc".into(), disk("sdc", "MixedCase"));
        let s = |v: &str| Serial::parse(v).unwrap();
        assert_eq!(snap.find(&s("a-long-serial-over-twenty-chars")).unwrap().kernel_name, "sdb");
        assert_eq!(snap.find(&s("SHORT-ID")).unwrap().kernel_name, "sdb");
        assert_eq!(snap.find(&s("mixedcase")).unwrap().kernel_name, "sdc");
        assert_eq!(snap.find(&s("nope")), Err(LookupError::NotFound("nope".into())));
        snap.disks.insert("sdd".into(), disk("sdd", "mixedcase"));
        assert!(matches!(snap.find(&s("MIXEDCASE")), Err(LookupError::Ambiguous { .. })));
    }

    #[test]
    fn disks_without_serial_never_match() {
        let mut snap = Snapshot::default();
        snap.disks.insert("sdb".into(), disk("sdb", ""));
        assert!(snap.find(&Serial::parse("sdb").unwrap()).is_err());
    }
}
