//! What a release has changed, kept on disk (under /run by default) so a restarted agent can finish the story: an
//! interrupted release is undone, and a completed one is still known (for CancelDetach and for the companion).

use super::mounts::MountRecord;
use prost::Message;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};
use wukong_proto::v1::Disk;

/// Where a journalled release is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    Releasing,
    Released,
}

/// How the disk is fenced off.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Fence {
    /// The SCSI device is (to be) deleted; it comes back by rescanning this address.
    ScsiDelete { host: u32, channel: u32, target: u32, lun: u32 },
    /// These device nodes were set read-only by the release (ones already read-only are not listed).
    ReadOnly { devices: Vec<String> },
}

/// One release, as journalled.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    pub id: String,
    pub phase: Phase,
    pub fence: Fence,
    /// Seconds since the epoch when the release completed.
    pub released_at: Option<f64>,
    /// Mounts the release undid, in the order it undid them.
    pub unmounted: Vec<MountRecord>,
    /// Mounts the release is undoing, journalled before the first unmount: the kernel writes a filesystem back
    /// before `umount` returns (seconds on slow storage), so an agent killed meanwhile finds here what may already
    /// be gone. Absent in journals of agents before it.
    #[serde(default)]
    pub unmounting: Vec<MountRecord>,
    /// Seconds since the epoch when a detach last asked for the released disk (it keeps a deleted SCSI disk
    /// listed). Absent in journals of agents before it.
    #[serde(default)]
    pub asked_at: Option<f64>,
    /// The disk as it was before the release (protobuf, hex), to list it again after a restart.
    disk: String,
}

impl Record {
    pub fn new(disk: &Disk, fence: Fence) -> Self {
        Self {
            id: disk.id.clone(),
            phase: Phase::Releasing,
            fence,
            released_at: None,
            unmounted: Vec::new(),
            unmounting: Vec::new(),
            asked_at: None,
            disk: disk.encode_to_vec().iter().map(|b| format!("{b:02x}")).collect(),
        }
    }

    pub fn disk(&self) -> Option<Disk> {
        let bytes: Option<Vec<u8>> =
            (0..self.disk.len()).step_by(2).map(|i| u8::from_str_radix(self.disk.get(i..i + 2)?, 16).ok()).collect();
        Disk::decode(bytes?.as_slice()).ok()
    }

    pub fn released_at(&self) -> Option<SystemTime> {
        epoch_seconds(self.released_at?)
    }

    /// When a detach last asked for the released disk.
    pub fn asked_at(&self) -> Option<SystemTime> {
        epoch_seconds(self.asked_at?)
    }

    pub fn set_asked(&mut self, at: SystemTime) {
        self.asked_at = at.duration_since(SystemTime::UNIX_EPOCH).ok().map(|d| d.as_secs_f64());
    }

    pub fn set_released(&mut self, at: SystemTime) {
        self.phase = Phase::Released;
        self.released_at = at.duration_since(SystemTime::UNIX_EPOCH).ok().map(|d| d.as_secs_f64());
    }
}

fn epoch_seconds(secs: f64) -> Option<SystemTime> {
    SystemTime::UNIX_EPOCH.checked_add(Duration::try_from_secs_f64(secs).ok()?)
}

/// The journal directory; `None` keeps nothing (a test, or a read-only agent).
#[derive(Debug, Clone)]
pub struct Journal {
    dir: Option<PathBuf>,
}

impl Journal {
    pub fn new(dir: Option<PathBuf>) -> Self {
        Self { dir }
    }

    fn path(dir: &Path, id: &str) -> PathBuf {
        // Ids are serials ([A-Za-z0-9._+-]) or kernel names: never a path separator.
        dir.join(format!("{}.json", id.to_ascii_lowercase()))
    }

    /// Writes (replaces) the record of its disk. A failure is logged, not fatal: the release itself is what
    /// matters, the journal only helps a restarted agent.
    pub fn save(&self, record: &Record) {
        let Some(dir) = &self.dir else { return };
        let result = (|| {
            std::fs::create_dir_all(dir)?;
            let path = Self::path(dir, &record.id);
            let tmp = path.with_extension("json.tmp");
            std::fs::write(&tmp, serde_json::to_vec_pretty(record).map_err(std::io::Error::other)?)?;
            std::fs::rename(&tmp, &path)
        })();
        if let Err(e) = result {
            tracing::warn!(serial = %record.id, dir = %dir.display(), error = %e, "cannot journal a release");
        }
    }

    pub fn remove(&self, id: &str) {
        if let Some(dir) = &self.dir {
            let _ = std::fs::remove_file(Self::path(dir, id));
        }
    }

    pub fn load(&self, id: &str) -> Option<Record> {
        let text = std::fs::read(Self::path(self.dir.as_ref()?, id)).ok()?;
        serde_json::from_slice(&text).ok()
    }

    /// Every record; unreadable ones are logged and skipped.
    pub fn load_all(&self) -> Vec<Record> {
        let Some(dir) = &self.dir else { return Vec::new() };
        let Ok(entries) = std::fs::read_dir(dir) else { return Vec::new() };
        let mut records = Vec::new();
        for path in entries.flatten().map(|e| e.path()).filter(|p| p.extension().is_some_and(|e| e == "json")) {
            match std::fs::read(&path)
                .map_err(|e| e.to_string())
                .and_then(|t| serde_json::from_slice::<Record>(&t).map_err(|e| e.to_string()))
            {
                Ok(r) => records.push(r),
                Err(e) => tracing::warn!(path = %path.display(), error = %e, "ignoring an unreadable release record"),
            }
        }
        records
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_with_their_disk() {
        let dir = tempfile::tempdir().unwrap();
        let journal = Journal::new(Some(dir.path().join("releases")));
        let disk = Disk { id: "Data-1".into(), serial: "Data-1".into(), kernel_name: "sdb".into(), ..Disk::default() };
        let mut record = Record::new(&disk, Fence::ScsiDelete { host: 2, channel: 0, target: 0, lun: 1 });
        journal.save(&record);
        let at = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        record.set_released(at);
        journal.save(&record);
        let loaded = journal.load("data-1").expect("found case-insensitively");
        assert_eq!(loaded, record);
        assert_eq!(loaded.disk(), Some(disk));
        assert_eq!(loaded.released_at(), Some(at));
        assert_eq!(loaded.asked_at(), None);
        record.set_asked(at + Duration::from_secs(7200));
        journal.save(&record);
        assert_eq!(journal.load("data-1").unwrap().asked_at(), Some(at + Duration::from_secs(7200)));
        // A journal of an agent before `asked_at` (and `unmounting`) still loads.
        let mut old: serde_json::Value = serde_json::from_slice(&serde_json::to_vec(&record).unwrap()).unwrap();
        old.as_object_mut().unwrap().retain(|k, _| k != "asked_at" && k != "unmounting");
        let old: Record = serde_json::from_value(old).unwrap();
        assert_eq!((old.asked_at(), old.released_at()), (None, Some(at)));
        std::fs::write(dir.path().join("releases/junk.json"), b"{not json").unwrap();
        assert_eq!(journal.load_all(), vec![record]);
        journal.remove("DATA-1");
        assert!(journal.load_all().is_empty());
    }

    #[test]
    fn without_a_directory_nothing_is_kept() {
        let journal = Journal::new(None);
        journal.save(&Record::new(&Disk::default(), Fence::ReadOnly { devices: vec![] }));
        assert!(journal.load_all().is_empty());
    }
}
