//! Who uses a disk: a fresh scan on every request (never a cache), run off the async runtime with a deadline.
//! Concurrent requests for the same disks share one scan (single flight).

mod procfs_parse;
mod scan;
pub mod target;

pub use procfs_parse::{MapEntry, MountEntry, SwapEntry, parse_maps, parse_mountinfo, parse_swaps, unescape_octal};

use crate::roots::HostRoots;
use crate::udev_db::LibUdevDb;
use futures::FutureExt;
use futures::future::{BoxFuture, Shared};
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

/// Runs usage scans. Cheap to clone.
#[derive(Clone)]
pub struct UsageScanner {
    roots: HostRoots,
    deadline: Duration,
    in_flight: Arc<Mutex<HashMap<Vec<String>, Shared<BoxFuture<'static, ScanResult>>>>>,
}

impl UsageScanner {
    pub fn new(roots: HostRoots) -> Self {
        Self { roots, deadline: SCAN_DEADLINE, in_flight: Arc::default() }
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

    fn start(&self, disks: Vec<Disk>, key: Vec<String>) -> Shared<BoxFuture<'static, ScanResult>> {
        let roots = self.roots.clone();
        let deadline = self.deadline;
        let in_flight = self.in_flight.clone();
        async move {
            let result = tokio::task::spawn_blocking(move || scan_now(&roots, &disks, deadline))
                .await
                .unwrap_or_else(|e| Err(UsageError::Internal(e.to_string())));
            // Later requests must scan afresh: the answer is only valid for those who asked while it ran.
            in_flight.lock().expect("in-flight map is never poisoned").remove(&key);
            result
        }
        .boxed()
        .shared()
    }
}

/// Scans now, on this thread.
pub fn scan_now(roots: &HostRoots, disks: &[Disk], deadline: Duration) -> ScanResult {
    let started = Instant::now();
    let scanned_at = SystemTime::now();
    let targets: Vec<Target> = disks
        .iter()
        .map(|d| {
            Target::resolve(roots, &LibUdevDb, &d.kernel_name, &d.id)
                .unwrap_or_else(|| Target { key: d.id.clone(), devices: Vec::new() })
        })
        .collect();
    let blockers = scan::scan(roots, &targets, started + deadline).map_err(|_| UsageError::Deadline(deadline))?;
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
