//! Benchmark: wukong-operator with N `Wukong` objects (default 500) against the lab's genuine kube-apiserver, as
//! its ServiceAccount. Each object has a system disk and one data disk on a stopped VM (no guest: the disk goes
//! into the VM's spec), so the operator creates N claims, waits for them to bind and changes N VMs. Reported: time
//! to converge after the operator starts, its peak RSS, API requests per object and per reconcile (from the API
//! server's audit log), reconcile latency p50/p99 (its own histogram), and what it does on an idle cluster.
//!
//! Run: `cargo run --release -p wukong-e2e --bin operator-scale [N…]` (each N in a lab of its own, then the curve;
//! after `cargo build --release -p wukong-operator` and `scripts/lib/install-kube.sh`); `scripts/bench.sh` does all
//! three, for 500, 2,000, 5,000 and 10,000 objects.

use anyhow::{Context, Result, bail};
use futures::{StreamExt, TryStreamExt};
use kube::ResourceExt;
use kube::api::{Api, PostParams};
use kube::runtime::{WatchStreamExt, watcher};
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

/// Requests by the operator, the Lease aside.
fn operator_requests(events: &[AuditEvent]) -> Vec<&AuditEvent> {
    events
        .iter()
        .filter(|e| e.user.username == OPERATOR && e.stage == "ResponseComplete" && !e.request_uri.contains("/leases"))
        .collect()
}

/// (reads, writes) among `requests`.
fn reads_and_writes(requests: &[&AuditEvent]) -> (usize, usize) {
    let writes = requests.iter().filter(|e| e.is_write()).count();
    (requests.len() - writes, writes)
}

/// "verb resource[/subresource]: count", most frequent first: where the requests go.
fn by_verb_and_resource(requests: &[&AuditEvent]) -> Vec<String> {
    let mut counts = std::collections::BTreeMap::<String, usize>::new();
    for e in requests {
        let resource = e.object_ref.as_ref().map_or_else(
            || e.request_uri.clone(),
            |r| match &r.subresource {
                Some(sub) => format!("{}/{sub}", r.resource),
                None => r.resource.clone(),
            },
        );
        *counts.entry(format!("{} {resource}", e.verb)).or_default() += 1;
    }
    let mut counts: Vec<(String, usize)> = counts.into_iter().collect();
    counts.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    counts.into_iter().map(|(what, n)| format!("{what}: {n}")).collect()
}

fn peak_rss_kib(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
        .context("VmHWM in /proc/PID/status")
}

/// One size's result, for the curve.
struct Point {
    objects: usize,
    converge: Duration,
    rss_mib: f64,
    requests: usize,
}

impl Point {
    fn ms_per_object(&self) -> f64 {
        self.converge.as_secs_f64() * 1e3 / self.objects as f64
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    let sizes: Vec<usize> = std::env::args().skip(1).map(|n| n.parse()).collect::<Result<_, _>>()?;
    let sizes = if sizes.is_empty() { vec![500] } else { sizes };
    let mut curve = Vec::new();
    for objects in sizes {
        curve.push(measure(objects).await?);
    }
    if curve.len() > 1 {
        println!("\nthe curve (target: time per object within ±25 % of the first size's):");
        println!("| objects | converged | per object | vs {} | API requests per object | peak RSS |", curve[0].objects);
        println!("|---|---|---|---|---|---|");
        for p in &curve {
            println!(
                "| {} | {:.1} s | {:.1} ms | {:+.0} % | {:.1} | {:.1} MiB |",
                p.objects,
                p.converge.as_secs_f64(),
                p.ms_per_object(),
                (p.ms_per_object() / curve[0].ms_per_object() - 1.0) * 100.0,
                p.requests as f64 / p.objects as f64,
                p.rss_mib
            );
        }
    }
    Ok(())
}

/// Converges `objects` objects in a lab of their own and reports it.
async fn measure(objects: usize) -> Result<Point> {
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
    // Followed with a watch, not by listing every object again and again: that would load the API server more than
    // the operator does.
    let mut done = std::collections::HashSet::new();
    let mut changes = std::pin::pin!(watcher(api.clone(), watcher::Config::default()).applied_objects());
    let limit = Duration::from_secs(3600);
    while done.len() < objects {
        let Ok(change) = tokio::time::timeout_at((started + limit).into(), changes.try_next()).await else {
            bail!("only {} of {objects} objects converged in {} s", done.len(), limit.as_secs());
        };
        let wukong = change?.context("the watch of Wukongs ended")?;
        match converged(&wukong) {
            true => done.insert(wukong.name_any()),
            false => done.remove(&wukong.name_any()),
        };
    }
    let converge = started.elapsed();
    let audit = cluster.audit()?;
    let converging = operator_requests(&audit[mark.min(audit.len())..]);
    let (reads, writes) = reads_and_writes(&converging);
    let (_, metrics) = operator.get("/metrics").await?;
    let reconciles = metric(&metrics, "wukong_operator_reconciles_total");
    let p50 = quantile(&metrics, "wukong_operator_reconcile_duration_seconds", 0.5).unwrap_or(f64::NAN);
    let p99 = quantile(&metrics, "wukong_operator_reconcile_duration_seconds", 0.99).unwrap_or(f64::NAN);

    let idle_mark = cluster.audit()?.len();
    tokio::time::sleep(IDLE).await;
    let (idle_reads, idle_writes) = reads_and_writes(&operator_requests(&cluster.audit()?[idle_mark..]));
    let rss = peak_rss_kib(operator.pid())?;

    println!(
        "converged: {objects} objects in {:.1} s, {:.1} ms per object (target: 60 ms per object, flat from 500 to \
         10,000 objects, on 2 cores)",
        converge.as_secs_f64(),
        converge.as_secs_f64() * 1e3 / objects as f64
    );
    println!("operator peak RSS: {:.1} MiB (target: 96 MiB at 10,000 objects)", rss as f64 / 1024.0);
    println!(
        "API requests while converging: {reads} reads, {writes} writes = {:.1} per object (target: 8), {:.1} per \
         reconcile ({reconciles} reconciles)",
        (reads + writes) as f64 / objects as f64,
        (reads + writes) as f64 / reconciles.max(1.0)
    );
    println!("  by verb and resource: {}", by_verb_and_resource(&converging).join(", "));
    println!("reconcile latency: p50 <= {:.0} ms, p99 <= {:.0} ms (histogram bucket bounds)", p50 * 1e3, p99 * 1e3);
    println!("idle for {} s: {idle_writes} writes, {idle_reads} reads (target: 0 writes)", IDLE.as_secs());
    if idle_writes != 0 {
        bail!("an idle cluster got {idle_writes} writes from the operator");
    }
    Ok(Point { objects, converge, rss_mib: rss as f64 / 1024.0, requests: reads + writes })
}
