//! Benchmark: attach (until the guest reports the disk) and a safe detach (the guest unmounts and releases, then
//! the hypervisor unplugs) through a genuine kube-apiserver with the lab's KubeVirt (declarative hot-plug, the VM's
//! subresource, phases reported by the lab's controller), against the same done over QMP directly. The disk is a
//! 64 MiB SCSI volume with a mounted, idle ext4. Medians of 5 each.
//!
//! Run: `cargo run -p wukong-e2e --bin kubevirt-overhead` (after `scripts/lib/build-guest-agent.sh` and
//! `scripts/lib/install-kube.sh`).

use anyhow::Result;
use std::time::{Duration, Instant};
use wukong_controller_client::companion::{self, AttachOptions, DetachOptions};
use wukong_controller_client::hypervisor::{DiskBus, Hypervisor, VolumeSource, VolumeSpec};
use wukong_controller_client::kubevirt::KubeVirt;
use wukong_controller_client::qemu::Qemu;
use wukong_e2e::cluster::{ADMIN, Cluster};
use wukong_e2e::kubevirt_lab::{API_SERVER, CONTROLLER, HANDLER, HotplugMode, KubeVirtLab};
use wukong_e2e::{Guest, median};

const SAMPLES: usize = 5;

/// Attaches and safely detaches `SAMPLES` volumes; returns the attach and detach times in milliseconds.
async fn measure<H: Hypervisor>(
    guest: &Guest,
    hypervisor: &H,
    source: impl Fn(usize) -> Result<VolumeSource>,
) -> Result<(Vec<f64>, Vec<f64>)> {
    let agent = guest.agent();
    let attach = AttachOptions { timeout: Duration::from_secs(120), poll: Duration::from_millis(20) };
    let (mut attaches, mut detaches) = (Vec::new(), Vec::new());
    for i in 0..SAMPLES {
        let name = format!("bench{i}");
        let volume = VolumeSpec { name: name.clone(), serial: name.clone(), bus: DiskBus::Scsi, source: source(i)? };
        let started = Instant::now();
        let dev = companion::attach(hypervisor, &agent, &volume, &attach, &|_| {}).await?.disk.dev_node;
        attaches.push(started.elapsed().as_secs_f64() * 1e3);
        // Settled, so the detach is measured, not udev's probe after mkfs (which a release would wait out).
        guest
            .run_ok(&format!("mkfs.ext4 -q {dev} && mkdir -p /mnt/{name} && mount {dev} /mnt/{name} && udevadm settle"))
            .await?;
        let options = DetachOptions {
            volume: name,
            serial: None,
            unmount: true,
            force: false,
            timeout: Duration::from_secs(120),
            poll: Duration::from_millis(20),
        };
        let started = Instant::now();
        companion::detach(hypervisor, &agent, &options, &|_| {}).await?;
        detaches.push(started.elapsed().as_secs_f64() * 1e3);
    }
    Ok((attaches, detaches))
}

#[tokio::main]
async fn main() -> Result<()> {
    let guest = Guest::boot().await?;
    // QEMU directly first: the companion's QMP socket serves one client, which the lab's KubeVirt takes next.
    let qemu = Qemu::connect(&guest.companion_qmp()).await?;
    let images = (0..SAMPLES).map(|_| guest.new_image(64 << 20)).collect::<Result<Vec<_>>>()?;
    let (qmp_attach, qmp_detach) =
        measure(&guest, &qemu, |i| Ok(VolumeSource::Image { path: images[i].clone(), format: "raw".into() })).await?;
    drop(qemu);

    let cluster = Cluster::start(&[API_SERVER, CONTROLLER, HANDLER]).await?;
    let kubevirt = KubeVirtLab::start(&cluster, Some(&guest), "bench", HotplugMode::Declarative).await?;
    kubevirt.create_vm("vm1", true, "10.0.2.15").await?;
    for i in 0..SAMPLES {
        kubevirt.create_claim(&format!("pvc{i}"), &guest.new_image(64 << 20)?).await?;
    }
    let backend = KubeVirt::new(cluster.client(ADMIN).await?, "bench", "vm1", false);
    let (kv_attach, kv_detach) =
        measure(&guest, &backend, |i| Ok(VolumeSource::PersistentVolumeClaim(format!("pvc{i}")))).await?;

    println!("medians of {SAMPLES}, 64 MiB SCSI disk, mounted idle ext4, TCG guest:");
    println!("{:<46} {:>10} {:>10} {:>7}", "", "KubeVirt", "QMP", "ratio");
    for (what, kv, qmp) in [
        ("attach, until the guest reports the disk", kv_attach, qmp_attach),
        ("safe detach, until both agree it is gone", kv_detach, qmp_detach),
    ] {
        let (kv, qmp) = (median(kv), median(qmp));
        println!("{what:<46} {kv:>8.1}ms {qmp:>8.1}ms {:>6.1}x", kv / qmp);
    }
    println!("cluster start: {:.1} s", cluster.started_in.as_secs_f64());
    Ok(())
}
