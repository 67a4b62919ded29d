//! Benchmark: wukong-operator with N `Wukong` objects (default 500) against the lab's genuine kube-apiserver, as
//! its ServiceAccount. Each object has a system disk and one data disk on a stopped VM (no guest: the disk goes
//! into the VM's spec), so the operator creates N claims, waits for them to bind and changes N VMs. Reported: time
//! to converge after the operator starts, its peak RSS, API requests per object and per reconcile (from the API
//! server's audit log), reconcile latency p50/p99 (its own histogram), and what it does on an idle cluster.
//!
//! Run: `cargo run --release -p wukong-e2e --bin operator-scale [N]` (after `cargo build --release -p
//! wukong-operator` and `scripts/lib/install-kube.sh`); `scripts/bench.sh` does all three.

use anyhow::{Context, Result, bail};
use futures::{StreamExt, TryStreamExt};
use kube::api::{Api, PostParams};
use serde_json::json;
use std::time::{Duration, Instant};
use wukong_e2e::cluster::{ADMIN, AuditEvent, Cluster};
use wukong_e2e::kubevirt_lab::{API_SERVER, CONTROLLER, HANDLER, HotplugMode, KubeVirtLab};
use wukong_e2e::operator_lab::{OPERATOR, Operator, install_operator, metric, quantile};
use wukong_operator::crd::{Phase, Wukong};

const NS: &str = "scale";
/// How long the idle cluster is watched after convergence.
const IDLE: Duration = Duration::from_secs(30);

fn converged(w: &Wukong) -> bool {
    let Some(status) = &w.status else { return false };
    let data = status.volumes.iter().find(|v| v.name == "data");
    data.is_some_and(|v| {
        v.phase == Phase::Pending && v.bound && v.message.as_deref().is_some_and(|m| m.contains("in the VM's spec"))
    })
}

/// Requests by the operator, the Lease aside: (reads, writes).
fn operator_requests(events: &[AuditEvent]) -> (usize, usize) {
    let ours: Vec<&AuditEvent> = events
        .iter()
        .filter(|e| e.user.username == OPERATOR && e.stage == "ResponseComplete" && !e.request_uri.contains("/leases"))
        .collect();
    let writes = ours.iter().filter(|e| e.is_write()).count();
    (ours.len() - writes, writes)
}

fn peak_rss_kib(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
        .context("VmHWM in /proc/PID/status")
}

#[tokio::main]
async fn main() -> Result<()> {
    let objects: usize = std::env::args().nth(1).map(|n| n.parse()).transpose()?.unwrap_or(500);
    let cluster = Cluster::start(&[OPERATOR, API_SERVER, CONTROLLER, HANDLER]).await?;
    let kubevirt = KubeVirtLab::start(&cluster, None, NS, HotplugMode::Declarative).await?;
    let images = tempfile::tempdir()?;
    kubevirt.provision(images.path(), "lab-images").await?;
    install_operator(&cluster).await?;
    let admin = cluster.client(ADMIN).await?;
    let api: Api<Wukong> = Api::namespaced(admin.clone(), NS);
    let created = Instant::now();
    futures::stream::iter(0..objects)
        .map(|i| {
            let (kubevirt, api) = (&kubevirt, &api);
            async move {
                kubevirt.create_stopped_vm(&format!("w{i}-vm")).await?;
                let wukong: Wukong = serde_json::from_value(json!({
                    "apiVersion": "vm.novasphere.dev/v1alpha1", "kind": "Wukong", "metadata": {"name": format!("w{i}")},
                    "spec": {"disks": [{"name": "rootdisk", "system": true}, {"name": "data", "size": "16Mi"}]},
                }))?;
                api.create(&PostParams::default(), &wukong).await?;
                Ok::<_, anyhow::Error>(())
            }
        })
        .buffer_unordered(16)
        .try_collect::<()>()
        .await?;
    println!("{objects} stopped VMs and Wukong objects created in {:.1} s", created.elapsed().as_secs_f64());

    let mark = cluster.audit()?.len();
    let started = Instant::now();
    let operator = Operator::start(&cluster, "bench", 1)?.quiet();
    loop {
        let done = api.list(&Default::default()).await?.items.iter().filter(|w| converged(w)).count();
        if done == objects {
            break;
        }
        if started.elapsed() > Duration::from_secs(600) {
            bail!("only {done} of {objects} objects converged in 600 s");
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let converge = started.elapsed();
    let audit = cluster.audit()?;
    let (reads, writes) = operator_requests(&audit[mark.min(audit.len())..]);
    let (_, metrics) = operator.get("/metrics").await?;
    let reconciles = metric(&metrics, "wukong_operator_reconciles_total");
    let p50 = quantile(&metrics, "wukong_operator_reconcile_duration_seconds", 0.5).unwrap_or(f64::NAN);
    let p99 = quantile(&metrics, "wukong_operator_reconcile_duration_seconds", 0.99).unwrap_or(f64::NAN);

    let idle_mark = cluster.audit()?.len();
    tokio::time::sleep(IDLE).await;
    let (idle_reads, idle_writes) = operator_requests(&cluster.audit()?[idle_mark..]);
    let rss = peak_rss_kib(operator.pid())?;

    println!("converged: {objects} objects in {:.1} s (target: 60 s on 2 cores)", converge.as_secs_f64());
    println!("operator peak RSS: {:.1} MiB (target: 64 MiB)", rss as f64 / 1024.0);
    println!(
        "API requests while converging: {reads} reads, {writes} writes = {:.1} per object, {:.1} per reconcile \
         ({reconciles} reconciles)",
        (reads + writes) as f64 / objects as f64,
        (reads + writes) as f64 / reconciles.max(1.0)
    );
    println!("reconcile latency: p50 <= {:.0} ms, p99 <= {:.0} ms (histogram bucket bounds)", p50 * 1e3, p99 * 1e3);
    println!("idle for {} s: {idle_writes} writes, {idle_reads} reads (target: 0 writes)", IDLE.as_secs());
    if idle_writes != 0 {
        bail!("an idle cluster got {idle_writes} writes from the operator");
    }
    Ok(())
}
