//! What KubeVirt's own writes cost under the admission guard. KubeVirt's VMI CRD has no status subresource, so every
//! status, label and annotation write of virt-controller and virt-handler is a plain update of the VMI, and every
//! webhook on VMI updates reviews it. Through a genuine kube-apiserver with the lab's KubeVirt (no guest: the
//! volumes only move through their phases) and deploy/guard.yaml: the writes are KubeVirt's identities' and carry
//! no subresource (the audit log), all are allowed, none makes the guard ask a guest (the agent port never answers,
//! so a review that asked would be slow and denied), and the reviews per write and their latency are measured.
//! While the guard is down, KubeVirt can write nothing of an opted-in VMI.

use anyhow::{Context, Result};
use kube::api::{Api, DynamicObject, Patch, PatchParams};
use serde_json::json;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use wukong_controller_client::kubevirt::{vm_resource, vmi_resource};
use wukong_e2e::cluster::{ADMIN, AuditEvent, Cluster};
use wukong_e2e::kubevirt_lab::{API_SERVER, CONTROLLER, HANDLER, HotplugMode, KubeVirtLab};
use wukong_e2e::operator_lab::{OPERATOR, Operator, install_operator, metric, quantile, start_guarded};

const NS: &str = "statuses";
const OPT_IN: &str = "vm.novasphere.dev/guard";
const REVIEWS: &str = "wukong_operator_admission_reviews_total";
const DURATION: &str = "wukong_operator_admission_duration_seconds";

/// A port where the guard would reach the VMIs' agent: it counts the connections and answers none, so that a call
/// to it lasts until the caller's timeout.
async fn counting_agent() -> Result<(u16, Arc<AtomicUsize>)> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    let calls = Arc::new(AtomicUsize::new(0));
    let counted = calls.clone();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((stream, _)) = listener.accept().await {
            counted.fetch_add(1, Ordering::SeqCst);
            held.push(stream);
        }
    });
    Ok((port, calls))
}

/// A new 16 MiB claim `pvc-NAME`, hot-plugged as volume NAME through the VM's spec, as declarative hot-plug does.
async fn plug(kubevirt: &KubeVirtLab, vms: &Api<DynamicObject>, images: &std::path::Path, name: &str) -> Result<()> {
    let (image, claim) = (images.join(format!("{name}.raw")), format!("pvc-{name}"));
    std::fs::File::create(&image)?.set_len(16 << 20)?;
    kubevirt.create_claim(&claim, &image).await?;
    let add = json!([
        {"op": "add", "path": "/spec/template/spec/volumes/-",
         "value": {"name": name, "persistentVolumeClaim": {"claimName": claim, "hotpluggable": true}}},
        {"op": "add", "path": "/spec/template/spec/domain/devices/disks/-",
         "value": {"name": name, "serial": name, "disk": {"bus": "scsi"}}},
    ]);
    vms.patch("vm1", &PatchParams::default(), &Patch::<()>::Json(serde_json::from_value(add)?)).await?;
    Ok(())
}

/// Waits until each of `volumes` is attached as KubeVirt reports it (Ready with a target), then until the lab's
/// KubeVirt has written nothing for a while.
async fn wait_ready(cluster: &Cluster, vmis: &Api<DynamicObject>, volumes: &[&str]) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let status = vmis.get("vm1").await?.data["status"]["volumeStatus"].clone();
        let ready = |name: &&str| {
            status
                .as_array()
                .into_iter()
                .flatten()
                .any(|s| s["name"] == *name && s["phase"] == "Ready" && s["target"] != "")
        };
        if volumes.iter().all(ready) {
            break;
        }
        anyhow::ensure!(Instant::now() < deadline, "{volumes:?} were not all Ready within 60 s: {status}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The lab's loops list all the time: only writes count.
    let mut seen = writes_since(cluster, 0)?.len();
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let now = writes_since(cluster, 0)?.len();
        if now == seen {
            return Ok(());
        }
        seen = now;
    }
}

/// The VM and VMI writes the API server decided from `mark` on (the webhooks see updates and patches).
fn writes_since(cluster: &Cluster, mark: usize) -> Result<Vec<AuditEvent>> {
    Ok(cluster
        .audit()?
        .into_iter()
        .skip(mark)
        .filter(|e| {
            e.is_write()
                && matches!(e.verb.as_str(), "update" | "patch")
                && e.object_ref
                    .as_ref()
                    .is_some_and(|r| matches!(r.resource.as_str(), "virtualmachines" | "virtualmachineinstances"))
        })
        .collect())
}

fn stored(events: &[AuditEvent]) -> usize {
    events.iter().filter(|e| e.code() == 200).count()
}

async fn reviews(operator: &Operator) -> Result<(f64, f64, String)> {
    let (_, metrics) = operator.get("/metrics").await?;
    let allowed = metric(&metrics, &format!("{REVIEWS}{{verdict=\"allowed\"}}"));
    let denied = metric(&metrics, &format!("{REVIEWS}{{verdict=\"denied\"}}"));
    Ok((allowed, denied, metrics))
}

#[tokio::test(flavor = "multi_thread")]
async fn kubevirts_status_writes_pass_the_guard_without_asking_a_guest() -> Result<()> {
    let cluster = Cluster::start(&[OPERATOR, API_SERVER, CONTROLLER, HANDLER]).await?;
    let kubevirt = KubeVirtLab::start(&cluster, None, NS, HotplugMode::Declarative).await?;
    let admin = cluster.client(ADMIN).await?;
    let (vms, vmis) = (
        Api::namespaced_with(admin.clone(), NS, &vm_resource()),
        Api::namespaced_with(admin.clone(), NS, &vmi_resource()),
    );
    // The whole namespace opts in: every VM and VMI update in it is reviewed, from the VMI's start on.
    let namespaces: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(admin.clone());
    let label = json!({"metadata": {"labels": {OPT_IN: "enabled"}}});
    namespaces.patch(NS, &PatchParams::default(), &Patch::Merge(&label)).await?;
    install_operator(&cluster).await?;
    let (agent_port, agent_calls) = counting_agent().await?;
    let mut operator = start_guarded(&cluster, "guard", agent_port, &[]).await?;
    let mark = cluster.audit()?.len();

    // A VM started (virt-controller creates its VMI and writes its start, virt-handler reports it running), then
    // three disks plugged one after the other through its spec, each a spec patch and a run of status writes by
    // both.
    kubevirt.create_vm("vm1", true, "127.0.0.1").await?;
    // KubeVirt's identities have the rights of its ClusterRoles, no more: virt-handler reads VMIs by list and watch
    // only, and cannot touch a VM.
    let handler = cluster.client(HANDLER).await?;
    let get = Api::<DynamicObject>::namespaced_with(handler.clone(), NS, &vmi_resource()).get("vm1").await;
    assert!(matches!(&get, Err(kube::Error::Api(s)) if s.code == 403), "virt-handler got a VMI: {get:?}");
    let vm = Api::<DynamicObject>::namespaced_with(handler, NS, &vm_resource()).list(&Default::default()).await;
    assert!(matches!(&vm, Err(kube::Error::Api(s)) if s.code == 403), "virt-handler listed VMs: {vm:?}");
    let images = tempfile::tempdir()?;
    let disks = ["data1", "data2", "data3"];
    for disk in disks {
        plug(&kubevirt, &vms, images.path(), disk).await?;
        wait_ready(&cluster, &vmis, &[disk]).await?;
    }

    let writes = writes_since(&cluster, mark)?;
    let kubevirts: Vec<&AuditEvent> = writes
        .iter()
        .filter(|e| e.object_ref.as_ref().is_some_and(|r| r.resource == "virtualmachineinstances"))
        .collect();
    let mut by_writer = std::collections::BTreeMap::<(String, String, u16), usize>::new();
    for e in &kubevirts {
        *by_writer.entry((e.user.username.clone(), e.verb.clone(), e.code())).or_default() += 1;
        let r = e.object_ref.as_ref().context("a VMI write names its object")?;
        assert_eq!(r.subresource, None, "a VMI write has no subresource: {e:?}");
        assert!(
            [API_SERVER, CONTROLLER, HANDLER].contains(&e.user.username.as_str()),
            "only KubeVirt writes the VMI: {e:?}"
        );
        // A write lost to another writer is refused before admission (409, or 422 for a failed `test`) and redone.
        assert!(matches!(e.code(), 200 | 409 | 422), "a KubeVirt write of an opted-in VMI was refused: {e:?}");
    }
    println!("VMI writes by writer, verb and answer: {by_writer:#?}");
    let stored_by = |user: &str, verb: &str| by_writer.get(&(user.into(), verb.into(), 200)).copied().unwrap_or(0);
    // virt-handler writes the whole VMI (vm.go `updateVMIStatus`); virt-controller updates a VMI it starts and
    // patches a running one (lifecycle.go `updateStatus`).
    assert!(
        stored_by(HANDLER, "update") >= 2 + 2 * disks.len(),
        "virt-handler's updates: Running, the root disk's target, then MountedToPod and Ready per disk"
    );
    assert!(
        stored_by(CONTROLLER, "update") >= 4,
        "virt-controller's updates: the annotations, Pending, Scheduling, Scheduled"
    );
    assert!(
        stored_by(CONTROLLER, "patch") > 3 * disks.len(),
        "virt-controller's patches: the root disk's entry, then the spec, Bound and AttachedToNode per disk"
    );
    assert!(!by_writer.keys().any(|(_, verb, _)| verb != "update" && verb != "patch"));
    // The status is in the object: the handler's updates carry it.
    let handler_update =
        kubevirts.iter().find(|e| e.user.username == HANDLER && e.code() == 200).context("a handler update")?;
    let body = handler_update.request_object.as_ref().context("the audit log has the handler's request")?;
    assert!(body["status"]["phase"] == "Running" && body["spec"].is_object(), "a whole VMI: {body}");

    let (allowed, denied, metrics) = reviews(&operator).await?;
    let reviewed_writes = stored(&writes);
    let lab_writes = kubevirts.iter().filter(|e| e.code() == 200).count();
    let per_write = allowed / reviewed_writes as f64;
    let p50 = quantile(&metrics, DURATION, 0.5).context("the review duration histogram")?;
    let p99 = quantile(&metrics, DURATION, 0.99).context("the review duration histogram")?;
    println!(
        "{lab_writes} VMI writes by KubeVirt and {} VM spec patches: {allowed} reviews ({per_write:.2} per write), \
         {denied} denied; review latency p50 <= {:.2} ms, p99 <= {:.2} ms; agent connections: {}",
        reviewed_writes - lab_writes,
        p50 * 1e3,
        p99 * 1e3,
        agent_calls.load(Ordering::SeqCst)
    );
    assert_eq!(denied, 0.0, "no write was denied");
    // One review per stored write; a patch the API server first tried on a stale cached copy is reviewed again
    // when it retries, so a few writes cost two.
    let writes = reviewed_writes as f64;
    assert!(
        allowed >= writes && allowed <= writes * 1.2,
        "{allowed} reviews for {reviewed_writes} stored writes of objects in an opted-in namespace"
    );
    // No review asked the guest: its agent port accepts and never answers, so a review that asked would have
    // waited for the agent's call timeout (30 s) and then been denied (fail safe). Connections there come from the
    // guard's release watch, which asks every guarded guest every 15 s whatever is written.
    let slowest = quantile(&metrics, DURATION, 1.0).context("the review duration histogram")?;
    assert!(slowest <= 1.0, "the slowest review took up to {slowest} s: it waited for a guest");
    assert!(p99 <= 0.1, "p99 of the reviews (a bucket bound): {p99} s");

    // Opted in twice (the VMI's own label too): still one review per write, the object webhook's (the namespace
    // webhook leaves objects labelled enabled to it).
    let label = json!({"metadata": {"labels": {OPT_IN: "enabled"}}});
    vmis.patch("vm1", &PatchParams::default(), &Patch::Merge(&label)).await?;
    wait_ready(&cluster, &vmis, &disks).await?;
    let (mark, before) = (cluster.audit()?.len(), reviews(&operator).await?.0);
    plug(&kubevirt, &vms, images.path(), "data4").await?;
    wait_ready(&cluster, &vmis, &["data4"]).await?;
    let writes = writes_since(&cluster, mark)?;
    let vmi_writes = writes
        .iter()
        .filter(|e| e.code() == 200 && e.object_ref.as_ref().is_some_and(|r| r.resource == "virtualmachineinstances"))
        .count();
    let vm_writes = stored(&writes) - vmi_writes;
    let (after, denied, _) = reviews(&operator).await?;
    let per_vmi_write = (after - before - vm_writes as f64) / vmi_writes as f64;
    println!("opted in by namespace and label: {vmi_writes} VMI writes, {per_vmi_write:.2} reviews each");
    assert_eq!(denied, 0.0);
    assert!((1.0..1.2).contains(&per_vmi_write), "one review per write of a VMI opted in twice: {per_vmi_write}");
    let (_, _, metrics) = reviews(&operator).await?;
    assert!(quantile(&metrics, DURATION, 1.0).is_some_and(|s| s <= 1.0), "still no review waited for a guest");

    // The guard is down (failurePolicy: Fail): KubeVirt can write nothing of an opted-in VMI, its status included.
    // The namespace opts out first, so the VM, which did not opt in itself, can still be edited.
    let label = json!({"metadata": {"labels": {OPT_IN: null}}});
    namespaces.patch(NS, &PatchParams::default(), &Patch::Merge(&label)).await?;
    operator.kill();
    let mark = cluster.audit()?.len();
    plug(&kubevirt, &vms, images.path(), "data5").await?;
    let deadline = Instant::now() + Duration::from_secs(30);
    let refused = loop {
        let writes = writes_since(&cluster, mark)?;
        if let Some(e) = writes.into_iter().find(|e| e.user.username == CONTROLLER && e.code() != 200) {
            break e;
        }
        anyhow::ensure!(Instant::now() < deadline, "virt-controller never tried to plug data5 into the VMI");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    // The API server's answer when it cannot call a webhook (the audit log keeps no message for it).
    assert_eq!(refused.code(), 500, "{refused:?}");
    let volumes = vmis.get("vm1").await?.data["spec"]["volumes"].clone();
    assert!(!volumes.to_string().contains("data5"), "the VMI stays as it was: {volumes}");
    Ok(())
}
