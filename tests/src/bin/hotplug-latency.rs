//! Benchmark: how long after QMP `device_add` the agent reports a disk, compared with udev's own time (the by-id
//! link appearing in the guest), and the agent's memory with 20 disks.
//!
//! Run: `cargo run -p wukong-e2e --bin hotplug-latency` (after `scripts/lib/build-guest-agent.sh`).

use anyhow::{Context, Result};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use wukong_e2e::{DiskSpec, Guest};
use wukong_proto::v1::EventKind;

const SAMPLES: usize = 10;
const DISKS_FOR_RSS: usize = 20;

fn percentile(values: &mut [f64], p: f64) -> f64 {
    values.sort_by(|a, b| a.total_cmp(b));
    values[((values.len() - 1) as f64 * p).round() as usize]
}

#[tokio::main]
async fn main() -> Result<()> {
    let guest = Guest::boot().await?;
    let agent = guest.agent();
    let mut watch = agent.watch(Vec::new()).await?;
    while watch.message().await?.context("watch ended")?.kind() != EventKind::Synced {}

    let mut to_event_ms = Vec::new();
    let mut after_link_ms = Vec::new();
    for i in 0..SAMPLES {
        let serial = format!("lat-{i:02}");
        let link = format!("/dev/disk/by-id/scsi-0QEMU_QEMU_HARDDISK_{serial}");
        // A guest-side poller records (guest wall clock, ns) when udev's link appears.
        guest
            .run_ok(&format!(
                "(while [ ! -e {link} ]; do usleep 200; done; gdate +%s%N > /tmp/{serial}.link) >/dev/null 2>&1 &"
            ))
            .await?;
        let started = Instant::now();
        guest.hotplug(&DiskSpec::scsi(&serial)).await?;
        let event = loop {
            let e = tokio::time::timeout(Duration::from_secs(30), watch.message()).await??.context("watch ended")?;
            if e.kind() == EventKind::Added && e.disk.as_ref().is_some_and(|d| d.serial == serial) {
                break e;
            }
        };
        to_event_ms.push(started.elapsed().as_secs_f64() * 1000.0);
        let link_ns: i128 = guest.run_ok(&format!("cat /tmp/{serial}.link")).await?.trim().parse()?;
        let event_time: SystemTime = event.time.context("event has a time")?.try_into()?;
        let event_ns = event_time.duration_since(UNIX_EPOCH)?.as_nanos() as i128;
        after_link_ms.push((event_ns - link_ns) as f64 / 1e6);
    }
    for i in SAMPLES..DISKS_FOR_RSS {
        guest.hotplug(&DiskSpec::scsi(&format!("rss-{i:02}"))).await?;
    }
    agent.wait_for_disk(&format!("rss-{:02}", DISKS_FOR_RSS - 1), Duration::from_secs(60)).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss = guest.run_ok("grep VmRSS /proc/$(pidof wukong-agent)/status").await?;
    let disks = agent.list_disks(false).await?.len();

    println!("hot-plug latency over {SAMPLES} virtio-scsi disks (guest under TCG):");
    println!(
        "  device_add -> ADDED at the host watcher: median {:.0} ms, p90 {:.0} ms",
        percentile(&mut to_event_ms, 0.5),
        percentile(&mut to_event_ms, 0.9)
    );
    println!(
        "  agent ADDED time minus by-id link time (guest clock; poller resolution ~1 ms, negative = agent first): \
         median {:.1} ms, p90 {:.1} ms, max {:.1} ms",
        percentile(&mut after_link_ms, 0.5),
        percentile(&mut after_link_ms, 0.9),
        percentile(&mut after_link_ms, 1.0)
    );
    println!("agent with {disks} disks: {}", rss.trim());
    guest.shutdown().await;
    Ok(())
}
