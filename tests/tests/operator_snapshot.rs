//! Issue 28, item 2: `detachOptions.snapshot`, through a genuine kube-apiserver, the lab's KubeVirt, CSI storage and
//! snapshot controllers, and a QEMU guest running the agent; the operator runs as its ServiceAccount with the
//! shipped RBAC. The snapshot is taken after the guest released the disk and before the unplug, which waits until it
//! is ready; a claim restored from it has the guest's data; a snapshot that fails gives the disk back to the guest,
//! mounted and writable, and says why.

use anyhow::{Context, Result};
use kube::api::{Api, DynamicObject, PostParams};
use serde_json::{Value, json};
use std::time::{Duration, Instant};
use wukong_controller_client::hypervisor::{Hypervisor, VolumeState};
use wukong_controller_client::kubevirt::KubeVirt;
use wukong_e2e::Guest;
use wukong_e2e::cluster::{ADMIN, Cluster};
use wukong_e2e::kubevirt_lab::{API_SERVER, CONTROLLER, HANDLER, HotplugMode, KubeVirtLab, attach_claim};
use wukong_e2e::operator_lab::{
    OPERATOR, Operator, create_wukong, events, install_operator, set_disks, volume, wait_for_wukong,
};
use wukong_e2e::snapshot_lab::{FAIL_PARAMETER, SECONDS_PARAMETER, SnapshotLab, snapshots_resource};
use wukong_e2e::storage_lab::{BindingMode, claims_resource};
use wukong_operator::crd::{Phase, Wukong};
use wukong_operator::snapshot::{DETACH_ANNOTATION, RELEASE_ANNOTATION};
use wukong_proto::v1::DiskState;

const NS: &str = "snap";

fn disk(name: &str, snapshot: Value) -> Value {
    json!({"name": name, "size": "64Mi", "detachOptions": {"unmount": true, "snapshot": snapshot}})
}

#[tokio::test(flavor = "multi_thread")]
async fn a_snapshot_taken_at_detach_restores_the_data_and_a_failing_one_gives_the_disk_back() -> Result<()> {
    let guest = Guest::boot().await?;
    let cluster = Cluster::start(&[OPERATOR, API_SERVER, CONTROLLER, HANDLER]).await?;
    let kubevirt = KubeVirtLab::start(&cluster, Some(&guest), NS, HotplugMode::Declarative).await?;
    let images = tempfile::tempdir()?;
    kubevirt.provision_csi_class(images.path(), "csi", BindingMode::Immediate, true).await?;
    let admin = cluster.client(ADMIN).await?;
    let snapshots_lab = SnapshotLab::start(admin.clone()).await?;
    // The default class's driver takes 3 s to make a snapshot ready (it uploads it), long enough to be seen.
    snapshots_lab.add_class("snap", "Retain", json!({SECONDS_PARAMETER: "3"}), true).await?;
    snapshots_lab.add_class("broken", "Delete", json!({FAIL_PARAMETER: "disk on fire"}), false).await?;
    install_operator(&cluster).await?;
    kubevirt.create_vm("db-vm", true, "127.0.0.1").await?;
    let mut operator = Operator::start(&cluster, "op-1", guest.agent_port())?;
    let api: Api<Wukong> = Api::namespaced(admin.clone(), NS);
    let snapshots = Api::<DynamicObject>::namespaced_with(admin.clone(), NS, &snapshots_resource());
    let claims = Api::<DynamicObject>::namespaced_with(admin.clone(), NS, &claims_resource());
    let vm = KubeVirt::new(admin.clone(), NS, "db-vm", false);

    let root = json!({"name": "rootdisk", "system": true});
    let (data, bad) = (disk("data", json!({})), disk("bad", json!({"volumeSnapshotClassName": "broken"})));
    create_wukong(&api, "db", json!({"vmName": "db-vm", "disks": [root, data, bad]})).await?;
    let attached =
        |w: &Wukong| ["data", "bad"].iter().all(|d| volume(w, d).is_some_and(|v| v.phase == Phase::Attached));
    wait_for_wukong(&api, "db", 120, attached).await?;
    let agent = guest.agent();
    let sum = guest.fill(&agent.get_disk("data", false).await?.dev_node, "/mnt/data", 4 << 20).await?;
    let bad_sum = guest.fill(&agent.get_disk("bad", false).await?.dev_node, "/mnt/bad", 1 << 20).await?;

    // A snapshot that fails: the disk is given back, the refusal says why, and nothing is unplugged.
    set_disks(&api, "db", json!([root, data])).await?;
    let w =
        wait_for_wukong(&api, "db", 90, |w| volume(w, "bad").is_some_and(|v| v.phase == Phase::DetachBlocked)).await?;
    let v = volume(&w, "bad").context("bad's status")?;
    let why = v.blockers.join("; ");
    assert!(
        why.starts_with("volume 'bad' was not unplugged: VolumeSnapshot snap/db-vm-bad-")
            && why.contains("failed to take snapshot of the volume")
            && why.contains("\"rpc error: code = Internal desc = disk on fire\"")
            && why.ends_with("the guest got disk 'bad' back (CancelDetach)"),
        "{why}"
    );
    assert!(v.snapshot.as_ref().is_some_and(|s| !s.ready_to_use && s.error.is_some()), "{:?}", v.snapshot);
    let refused = events(&admin, NS).await?;
    assert!(
        refused
            .iter()
            .any(|e| e.data["reason"] == "DetachRefused"
                && e.data["note"].as_str().unwrap_or("").contains("disk on fire")),
        "{refused:#?}"
    );
    // Listed again, so that no retry races the checks: the guest has it, mounted and writable, with its data.
    set_disks(&api, "db", json!([root, data, bad])).await?;
    wait_for_wukong(&api, "db", 60, attached).await?;
    assert!(matches!(vm.volume_state("bad").await?, VolumeState::Ready { .. }), "never unplugged");
    assert_eq!(agent.get_disk("bad", false).await?.state(), DiskState::Present);
    assert_eq!(guest.checksum("/mnt/bad/data").await?, bad_sum, "mounted again, intact");
    guest.run_ok("echo more >> /mnt/bad/data && sync").await.context("writable again")?;

    // A snapshot that works: taken once the guest released the disk, and the unplug waits until it is ready. The
    // operator is killed while it waits; its successor finds the snapshot of this release and takes no other.
    let removed = Instant::now();
    set_disks(&api, "db", json!([root, bad])).await?;
    let mut seen_waiting: Option<String> = None;
    let detached = loop {
        anyhow::ensure!(removed.elapsed() < Duration::from_secs(120), "data was not detached within 120 s");
        let w = api.get("db").await?;
        if volume(&w, "data").is_none() {
            break w;
        }
        let taken = snapshots.list(&Default::default()).await?.items.into_iter().find(|s| {
            s.metadata.labels.as_ref().and_then(|l| l.get("vm.novasphere.dev/disk")).map(String::as_str) == Some("data")
        });
        if let Some(s) = taken
            && s.data["status"]["readyToUse"] != true
            && s.data["status"]["boundVolumeSnapshotContentName"].is_string()
        {
            // Taken and not ready: the guest has let the disk go, and KubeVirt still has it plugged.
            assert_eq!(agent.get_disk("data", false).await?.state(), DiskState::Released);
            assert!(matches!(vm.volume_state("data").await?, VolumeState::Ready { .. }), "unplugged before ready");
            if seen_waiting.is_none() {
                operator.restart().await?;
                seen_waiting = s.metadata.annotations.and_then(|a| a.get(RELEASE_ANNOTATION).cloned());
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let release = seen_waiting.context("the snapshot was seen taken and not ready while the disk was still plugged")?;
    let status = detached.status.as_ref().context("a status")?;
    let record = status.history.iter().rev().find(|r| r.disk == "data").context("a history line")?;
    assert_eq!(record.outcome, "Detached");
    let name = record.snapshot.clone().context("the history names the snapshot")?;
    assert!(name.starts_with("db-vm-data-"), "{name}");
    let taken = snapshots.get(&name).await?;
    assert_eq!(taken.data["status"]["readyToUse"], true);
    assert_eq!(taken.data["spec"]["source"]["persistentVolumeClaimName"], "db-vm-data");
    let annotations = taken.metadata.annotations.clone().unwrap_or_default();
    assert!(annotations.get(DETACH_ANNOTATION).is_some_and(|d| d.contains("/data/")), "{annotations:?}");
    assert_eq!(annotations.get(RELEASE_ANNOTATION), Some(&release), "the snapshot of the release before the restart");
    let of_data = snapshots.list(&kube::api::ListParams::default().labels("vm.novasphere.dev/disk=data")).await?;
    assert_eq!(of_data.items.len(), 1, "one snapshot, not retaken after the restart");
    assert!(taken.metadata.owner_references.is_none(), "the snapshot outlives the Wukong");
    let detached_events = events(&admin, NS).await?;
    assert!(
        detached_events.iter().any(|e| e.data["reason"] == "Detached"
            && e.data["note"].as_str().unwrap_or("").contains(&format!("after VolumeSnapshot {name} of it was ready"))),
        "{detached_events:#?}"
    );

    // Restored: a new claim from the snapshot, attached, holds what the guest wrote.
    let restored = json!({"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": "restored"},
        "spec": {"accessModes": ["ReadWriteOnce"], "volumeMode": "Block", "storageClassName": "csi",
                 "resources": {"requests": {"storage": "64Mi"}},
                 "dataSource": {"apiGroup": "snapshot.storage.k8s.io", "kind": "VolumeSnapshot", "name": name}}});
    claims.create(&PostParams::default(), &serde_json::from_value(restored)?).await?;
    let dev = attach_claim(&guest, &vm, "restored", "restored").await?;
    guest.run_ok(&format!("mkdir -p /mnt/restored && mount {dev} /mnt/restored")).await?;
    assert_eq!(guest.checksum("/mnt/restored/data").await?, sum, "the snapshot holds the guest's data");
    Ok(())
}

/// A cluster without the snapshot CRDs: the detach is vetoed, naming what to install, and nothing is created. Against
/// the real API server, whose answer for an API it does not serve is a bare `404 page not found`, not a Status.
#[tokio::test(flavor = "multi_thread")]
async fn a_cluster_without_the_snapshot_api_refuses_the_detach_naming_it() -> Result<()> {
    use wukong_controller_client::agent_client::AgentClient;
    use wukong_controller_client::companion::{Gate, UnplugGate};
    use wukong_operator::snapshot::{SnapshotGate, SnapshotRequest};
    let cluster = Cluster::start(&[]).await?;
    let admin = cluster.client(ADMIN).await?;
    // Forced, so that no guest is asked: the gate goes straight to the snapshot.
    let request = SnapshotRequest {
        namespace: "default".into(),
        name: "db-vm-data-1".into(),
        claim: "db-vm-data".into(),
        class: None,
        detach: "uid/data/2026-12-06T00:00:00Z".into(),
        labels: json!({"vm.novasphere.dev/disk": "data"}),
        forced: true,
    };
    let agent = AgentClient::connect("http://127.0.0.1:9".parse()?)?;
    let gate = SnapshotGate::new(admin, &agent, request);
    match gate.before_unplug("data").await {
        Gate::Veto(why) => assert_eq!(
            why,
            "the cluster serves no snapshot.storage.k8s.io/v1 VolumeSnapshots, so VolumeSnapshot default/db-vm-data-1 \
             cannot be taken (install the CSI external-snapshotter's CRDs and controller, or remove \
             detachOptions.snapshot)"
        ),
        other => anyhow::bail!("expected a veto, got {other:?}"),
    }
    assert!(gate.seen().is_none(), "no snapshot was seen, none was made");
    Ok(())
}
