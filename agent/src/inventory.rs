//! The live set of disks. One task owns it and applies updates in order; everyone else reads immutable snapshots
//! (a `watch` channel) and sequenced events (a `broadcast` channel). Nothing here takes a lock a reader could hold.
//!
//! Ordering contract, which `WatchDisks` and `WaitForDisk` rely on: the snapshot is published before the event that
//! produced it, and both carry the same sequence number. A reader that subscribes to events first and then reads the
//! snapshot misses nothing: it skips events whose sequence the snapshot already includes.

use crate::serial::Serial;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::SystemTime;
use tokio::sync::{broadcast, mpsc, watch};
use wukong_proto::v1::{Disk, EventKind};

/// Events buffered per subscriber before it is considered lagging (and re-sent a snapshot).
const EVENT_BUFFER: usize = 1024;

/// A change to apply, sent by the udev source.
#[derive(Debug, Clone, PartialEq)]
pub enum Update {
    /// The disk as it is now (added or changed), keyed by kernel name.
    Upsert(Box<Disk>),
    /// The disk with this kernel name is gone.
    Remove(String),
    /// The complete set of disks (initial enumeration, or after the monitor overflowed): anything else is removed.
    Reconcile(Vec<Disk>),
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
    /// Disks by kernel name.
    pub disks: BTreeMap<String, Disk>,
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
    /// Disks ordered by id (serial, or kernel name for disks without one).
    pub fn disks_by_id(&self) -> Vec<&Disk> {
        let mut disks: Vec<&Disk> = self.disks.values().collect();
        disks.sort_by(|a, b| a.id.cmp(&b.id));
        disks
    }

    /// The disk whose serial or SCSI device id is `serial` (case-insensitive).
    pub fn find(&self, serial: &Serial) -> Result<&Disk, LookupError> {
        let mut found = self.disks.values().filter(|d| disk_matches(d, serial));
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
        let mut rx = self.snapshot.clone();
        // An error means the inventory task ended; there is nothing more to wait for.
        let _ = rx.wait_for(|s| s.synced).await;
    }
}

/// Starts the inventory task. It ends when every sender of updates is dropped.
pub fn spawn() -> (mpsc::Sender<Update>, InventoryHandle) {
    let (tx, rx) = mpsc::channel(EVENT_BUFFER);
    let (snap_tx, snap_rx) = watch::channel(Arc::new(Snapshot::default()));
    let (events, _) = broadcast::channel(EVENT_BUFFER);
    let handle = InventoryHandle { snapshot: snap_rx, events: events.clone() };
    tokio::spawn(run(rx, Inventory { current: Snapshot::default(), snapshot: snap_tx, events }));
    (tx, handle)
}

async fn run(mut updates: mpsc::Receiver<Update>, mut inventory: Inventory) {
    while let Some(update) = updates.recv().await {
        inventory.apply(update);
    }
}

struct Inventory {
    current: Snapshot,
    snapshot: watch::Sender<Arc<Snapshot>>,
    events: broadcast::Sender<Event>,
}

impl Inventory {
    fn apply(&mut self, update: Update) {
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
        }
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

    fn upsert(&mut self, disk: Disk) -> Option<(EventKind, Disk)> {
        match self.current.disks.insert(disk.kernel_name.clone(), disk.clone()) {
            None => Some((EventKind::Added, disk)),
            Some(old) if old != disk => Some((EventKind::Changed, disk)),
            Some(_) => None,
        }
    }

    fn remove(&mut self, name: &str) -> Option<(EventKind, Disk)> {
        self.current.disks.remove(name).map(|d| (EventKind::Removed, d))
    }
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
