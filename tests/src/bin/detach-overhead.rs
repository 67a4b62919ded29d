//! Benchmark: the time a safe detach (the guest releases the disk, then QEMU unplugs it) adds over a raw unplug
//! (what KubeVirt's `removevolume` has libvirt do: `device_del`, the wait until QEMU reports the device gone, then
//! `blockdev-del` of its image), on the same kind of disk: a mounted, idle ext4 filesystem on a 64 MiB SCSI disk.
//! Both end when QEMU has let go of the image, as the safe detach's unplug wait does. Medians of 10, with where the
//! safe detach spends its time; once with each of the agent's process sources (the in-kernel BPF iterators, then
//! /proc).
//!
//! Run: `cargo run -p wukong-e2e --bin detach-overhead` (after `scripts/lib/build-guest-agent.sh`).

use anyhow::Result;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};
use wukong_controller_client::companion::{self, AttachOptions, DetachOptions};
use wukong_controller_client::hypervisor::{DiskBus, Hypervisor, VolumeSource, VolumeSpec, VolumeState};
use wukong_controller_client::qemu::Qemu;
use wukong_e2e::{Guest, median, millis};

const SAMPLES: usize = 10;

/// Medians of the raw unplugs and the safe detaches, and of each step of the safe ones.
struct Measured {
    raw: f64,
    /// Of the raw unplug, `blockdev-del`: QEMU closing the image, after the device is gone.
    raw_backend: f64,
    safe: f64,
    steps: BTreeMap<String, f64>,
}

#[tokio::main]
async fn main() -> Result<()> {
    let guest = Guest::boot().await?;
    let qemu = Qemu::connect(&guest.companion_qmp()).await?;
    for scanner in ["bpf", "procfs"] {
        if scanner == "procfs" {
            guest.restart_agent_adding("--usage-scanner procfs").await?;
        }
        let info = guest.agent().agent_info().await?;
        anyhow::ensure!(
            info.usage_scanner == scanner,
            "the agent scans with {}: {}",
            info.usage_scanner,
            info.usage_scanner_reason
        );
        let m = measure(&guest, &qemu, scanner).await?;
        println!(
            "detach of a mounted, idle 64 MiB ext4 SCSI disk, TCG guest, median of {SAMPLES}, usage scan by {scanner}:"
        );
        println!("  raw unplug (device_del, gone, blockdev-del):         {:8.1} ms", m.raw);
        println!("    of it blockdev-del:                                {:8.1} ms", m.raw_backend);
        println!("  safe detach (release in the guest, then unplug):     {:8.1} ms", m.safe);
        println!(
            "  added by the safe detach:                            {:8.1} ms ({:.1}x)",
            m.safe - m.raw,
            m.safe / m.raw
        );
        println!("where the safe detach spends it (medians):");
        for (step, value) in m.steps {
            println!("  {step:<34} {value:8.1} ms");
        }
        let rss = guest.run_ok("grep -E '^VmRSS|^VmHWM' /proc/$(pidof wukong-agent)/status | tr -s '\t ' ' '").await?;
        println!("the agent after {} detaches: {}", SAMPLES, rss.trim().replace('\n', ", "));
    }
    guest.shutdown().await;
    Ok(())
}

async fn measure(guest: &Guest, qemu: &Qemu, scanner: &str) -> Result<Measured> {
    let agent = guest.agent();
    let attach = AttachOptions { timeout: Duration::from_secs(60), poll: Duration::from_millis(20) };
    let (mut raw, mut raw_backend, mut safe) = (Vec::new(), Vec::new(), Vec::new());
    let mut steps: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    for i in 0..2 * SAMPLES {
        let name = format!("{scanner}{i:02}");
        let volume = VolumeSpec {
            name: name.clone(),
            serial: name.clone(),
            bus: DiskBus::Scsi,
            source: VolumeSource::Image { path: guest.new_image(64 << 20)?, format: "raw".into() },
        };
        let dev = companion::attach(qemu, &agent, &volume, &attach, &|_| {}).await?.disk.dev_node;
        // Settled, so both measure the detach, not udev's probe after mkfs (which a release would wait out).
        guest
            .run_ok(&format!("mkfs.ext4 -q {dev} && mkdir -p /mnt/{name} && mount {dev} /mnt/{name} && udevadm settle"))
            .await?;
        let started = Instant::now();
        if i % 2 == 0 {
            qemu.remove_volume(&name).await?;
            while qemu.volume_state(&name).await? != VolumeState::Absent {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            let gone = started.elapsed();
            qemu.finish_removal(&name).await?;
            raw.push(millis(started.elapsed()));
            raw_backend.push(millis(started.elapsed() - gone));
            guest.run_ok(&format!("umount -l /mnt/{name}")).await?;
        } else {
            let options = DetachOptions {
                volume: name.clone(),
                serial: None,
                unmount: true,
                force: false,
                timeout: Duration::from_secs(60),
                poll: Duration::from_millis(20),
            };
            let done = companion::detach(qemu, &agent, &options, &|_| {}).await?;
            safe.push(millis(started.elapsed()));
            for (step, d) in &done.timings {
                steps.entry(format!("companion: {step}")).or_default().push(millis(*d));
            }
            for a in done.release.iter().flat_map(|r| &r.actions) {
                let d = a.duration.map(|d| d.seconds as f64 * 1e3 + d.nanos as f64 / 1e6).unwrap_or(0.0);
                steps.entry(format!("  agent: {}", a.kind)).or_default().push(d);
            }
        }
    }
    Ok(Measured {
        raw: median(raw),
        raw_backend: median(raw_backend),
        safe: median(safe),
        steps: steps.into_iter().map(|(step, values)| (step, median(values))).collect(),
    })
}
