//! Benchmark: what the admission guard adds to a VM update through a genuine kube-apiserver, with the lab's
//! KubeVirt and a QEMU guest. (1) Nothing removed: 200 label changes of a guarded VM against 200 of a VM that did
//! not opt in (same API server, same size), and the guard's own time per review (its histogram). (2) A disk
//! released: a VM-spec edit that removes an idle, mounted 64 MiB disk (the guard releases it, unmounting) against
//! the release alone (PrepareDetach straight to the agent), and the fraction of the webhook timeout it uses.
//!
//! Run: `cargo run --release -p wukong-e2e --bin guard-latency` (after `cargo build --release -p wukong-operator`,
//! `scripts/lib/build-guest-agent.sh` and `scripts/lib/install-kube.sh`); `scripts/bench.sh` does all of them.

use anyhow::Result;
use kube::api::{Api, ApiResource, DynamicObject, Patch, PatchParams};
use serde_json::json;
use std::time::{Duration, Instant};
use wukong_controller_client::kubevirt::KubeVirt;
use wukong_e2e::Guest;
use wukong_e2e::cluster::{ADMIN, Cluster};
use wukong_e2e::kubevirt_lab::{
    API_SERVER, CONTROLLER, HANDLER, HotplugMode, KubeVirtLab, attach_claim, removal_patch,
};
use wukong_e2e::operator_lab::{OPERATOR, install_operator, quantile, start_guarded};

const NS: &str = "bench";
const UPDATES: usize = 200;
const RELEASES: usize = 5;
/// The webhook's timeout in deploy/guard.yaml (the API server's maximum).
const WEBHOOK_TIMEOUT: Duration = Duration::from_secs(30);

fn percentile(values: &mut [f64], q: f64) -> f64 {
    values.sort_by(|a, b| a.total_cmp(b));
    values[((values.len() - 1) as f64 * q).round() as usize]
}

async fn label_updates(vms: &Api<DynamicObject>, name: &str) -> Result<Vec<f64>> {
    let mut times = Vec::new();
    for i in 0..UPDATES {
        let patch = json!({"metadata": {"labels": {"bench/round": i.to_string()}}});
        let started = Instant::now();
        vms.patch(name, &PatchParams::default(), &Patch::Merge(&patch)).await?;
        times.push(started.elapsed().as_secs_f64() * 1e3);
    }
    Ok(times)
}

async fn attach_mounted(guest: &Guest, kubevirt: &KubeVirt, volume: &str, claim: &str) -> Result<()> {
    let dev = attach_claim(guest, kubevirt, volume, claim).await?;
    guest
        .run_ok(&format!("mkfs.ext4 -q {dev} && mkdir -p /mnt/{volume} && mount {dev} /mnt/{volume} && udevadm settle"))
        .await?;
    Ok(())
}

#[tokio::main]
async fn main() -> Result<()> {
    let guest = Guest::boot().await?;
    let cluster = Cluster::start(&[OPERATOR, API_SERVER, CONTROLLER, HANDLER]).await?;
    let lab = KubeVirtLab::start(&cluster, Some(&guest), NS, HotplugMode::Declarative).await?;
    install_operator(&cluster).await?;
    let operator = start_guarded(&cluster, "bench", guest.agent_port(), &[]).await?.quiet();
    let admin = cluster.client(ADMIN).await?;
    let r = ApiResource {
        group: "kubevirt.io".into(),
        version: "v1".into(),
        api_version: "kubevirt.io/v1".into(),
        kind: "VirtualMachine".into(),
        plural: "virtualmachines".into(),
    };
    let vms: Api<DynamicObject> = Api::namespaced_with(admin.clone(), NS, &r);
    lab.create_vm("vm1", true, "127.0.0.1").await?;
    lab.create_stopped_vm("plain").await?;
    let opt_in = json!({"metadata": {"labels": {"vm.novasphere.dev/guard": "enabled"},
                                     "annotations": {"vm.novasphere.dev/unmount-on-detach": "true"}}});
    vms.patch("vm1", &PatchParams::default(), &Patch::Merge(&opt_in)).await?;

    // (1) Nothing removed.
    let mut plain = label_updates(&vms, "plain").await?;
    let mut guarded = label_updates(&vms, "vm1").await?;
    let (_, metrics) = operator.get("/metrics").await?;
    let at_webhook = |q| quantile(&metrics, "wukong_operator_admission_duration_seconds", q).unwrap_or(f64::NAN) * 1e3;
    println!(
        "label update, {UPDATES} each: guarded p50 {:.2} ms p99 {:.2} ms; not guarded p50 {:.2} ms p99 {:.2} ms",
        percentile(&mut guarded, 0.5),
        percentile(&mut guarded, 0.99),
        percentile(&mut plain, 0.5),
        percentile(&mut plain, 0.99)
    );
    println!(
        "at the webhook (its histogram, bucket bounds): p50 <= {:.2} ms, p99 <= {:.2} ms (target < 5 ms)",
        at_webhook(0.5),
        at_webhook(0.99)
    );

    // (2) A disk released: through the guard against the release alone.
    let kubevirt = KubeVirt::new(admin.clone(), NS, "vm1", false);
    let (mut through_guard, mut alone) = (Vec::new(), Vec::new());
    for i in 0..RELEASES {
        let (volume, claim) = (format!("d{i}"), format!("pvc-{i}"));
        lab.create_claim(&claim, &guest.new_image(64 << 20)?).await?;
        attach_mounted(&guest, &kubevirt, &volume, &claim).await?;
        let removal = removal_patch(&vms.get("vm1").await?, "/spec/template/spec", &volume)?;
        let patch: json_patch::Patch = serde_json::from_value(removal)?;
        let started = Instant::now();
        vms.patch("vm1", &PatchParams::default(), &Patch::<()>::Json(patch)).await?;
        through_guard.push(started.elapsed().as_secs_f64() * 1e3);
        guest.wait_unplugged(&volume, Duration::from_secs(60)).await?;

        let (volume, claim) = (format!("r{i}"), format!("pvc-r{i}"));
        lab.create_claim(&claim, &guest.new_image(64 << 20)?).await?;
        attach_mounted(&guest, &kubevirt, &volume, &claim).await?;
        let started = Instant::now();
        anyhow::ensure!(guest.agent().prepare_detach(&volume, true, false).await?.released, "{volume} released");
        alone.push(started.elapsed().as_secs_f64() * 1e3);
        guest.agent().cancel_detach(&volume).await?;
    }
    let (guard_median, alone_median) = (percentile(&mut through_guard, 0.5), percentile(&mut alone, 0.5));
    println!(
        "removing a mounted idle disk, median of {RELEASES}: through the guard {guard_median:.0} ms, the release alone \
         {alone_median:.0} ms (+{:.0} ms); {:.1}% of the {} s webhook timeout",
        guard_median - alone_median,
        guard_median / WEBHOOK_TIMEOUT.as_millis() as f64 * 100.0,
        WEBHOOK_TIMEOUT.as_secs()
    );
    guest.shutdown().await;
    Ok(())
}
