//! The lab's CSI snapshots (tests/src/snapshot_lab.rs) against the genuine API server: a VolumeSnapshot of a claim
//! of the lab's CSI driver is a copy taken when it is made, its objects, finalizers, status and Events as
//! external-snapshotter writes them, and a claim restored from it holds the data of that moment; every refusal is
//! named in upstream's words, on the snapshot (and on its content for a failing driver).

use anyhow::{Context, Result};
use kube::api::{Api, DeleteParams, DynamicObject, PostParams};
use serde_json::json;
use std::path::PathBuf;
use std::time::Duration;
use wukong_e2e::cluster::{ADMIN, Cluster};
use wukong_e2e::kubevirt_lab::{API_SERVER, CONTROLLER, HANDLER, HotplugMode, KubeVirtLab};
use wukong_e2e::snapshot_lab::{FAIL_PARAMETER, SECONDS_PARAMETER, SnapshotLab, contents_resource, snapshots_resource};
use wukong_e2e::storage_lab::{BindingMode, CSI_DRIVER, claims_resource, volumes_resource};
use wukong_e2e::{lab_events, until};

const NS: &str = "snap";
const WAIT: Duration = Duration::from_secs(30);

fn claims(admin: &kube::Client) -> Api<DynamicObject> {
    Api::namespaced_with(admin.clone(), NS, &claims_resource())
}

fn snapshots(admin: &kube::Client) -> Api<DynamicObject> {
    Api::namespaced_with(admin.clone(), NS, &snapshots_resource())
}

fn contents(admin: &kube::Client) -> Api<DynamicObject> {
    Api::all_with(admin.clone(), &contents_resource())
}

/// A cluster with the lab's KubeVirt (whose storage provisions claims), a default CSI class `csi`, a local class
/// `plain`, snapshots and a default VolumeSnapshotClass `snap` (policy Delete).
async fn lab(dir: &std::path::Path) -> Result<(Cluster, KubeVirtLab, SnapshotLab, kube::Client)> {
    let cluster = Cluster::start(&[API_SERVER, CONTROLLER, HANDLER]).await?;
    let kubevirt = KubeVirtLab::start(&cluster, None, NS, HotplugMode::Declarative).await?;
    kubevirt.provision_csi_class(dir, "csi", BindingMode::Immediate, true).await?;
    kubevirt.provision_class(dir, "plain", BindingMode::Immediate, false).await?;
    let admin = cluster.client(ADMIN).await?;
    let snapshots = SnapshotLab::start(admin.clone()).await?;
    snapshots.add_class("snap", "Delete", json!({}), true).await?;
    Ok((cluster, kubevirt, snapshots, admin))
}

/// Claim `name`, Block, `size`, of `class`, restored from snapshot `from` if given.
async fn claim(admin: &kube::Client, name: &str, size: &str, class: &str, from: Option<&str>) -> Result<()> {
    let mut object = json!({"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": name},
                            "spec": {"accessModes": ["ReadWriteOnce"], "volumeMode": "Block", "storageClassName": class,
                                     "resources": {"requests": {"storage": size}}}});
    if let Some(from) = from {
        object["spec"]["dataSource"] =
            json!({"apiGroup": "snapshot.storage.k8s.io", "kind": "VolumeSnapshot", "name": from});
    }
    claims(admin).create(&PostParams::default(), &serde_json::from_value(object)?).await?;
    Ok(())
}

/// The file of bound claim `name`'s volume.
async fn bound_image(admin: &kube::Client, name: &str) -> Result<PathBuf> {
    let pv = until(&format!("claim {name} Bound"), WAIT, || async {
        let claim = claims(admin).get(name).await?;
        Ok(match claim.data["status"]["phase"] == "Bound" {
            true => Ok(claim.data["spec"]["volumeName"].as_str().unwrap_or_default().to_string()),
            false => Err(format!("{}", claim.data["status"])),
        })
    })
    .await?;
    let volume = Api::<DynamicObject>::all_with(admin.clone(), &volumes_resource()).get(&pv).await?;
    assert_eq!(volume.data["spec"]["csi"]["driver"], CSI_DRIVER, "a CSI volume: {:?}", volume.data["spec"]);
    Ok(PathBuf::from(volume.data["spec"]["csi"]["volumeHandle"].as_str().context("a volume handle")?))
}

/// Snapshot `name` of claim `claim`, of class `class` (none: the default).
async fn snapshot(admin: &kube::Client, name: &str, claim: &str, class: Option<&str>) -> Result<()> {
    let mut object = json!({"apiVersion": "snapshot.storage.k8s.io/v1", "kind": "VolumeSnapshot",
                            "metadata": {"name": name}, "spec": {"source": {"persistentVolumeClaimName": claim}}});
    if let Some(class) = class {
        object["spec"]["volumeSnapshotClassName"] = json!(class);
    }
    snapshots(admin).create(&PostParams::default(), &serde_json::from_value(object)?).await?;
    Ok(())
}

/// Waits until snapshot `name`'s status satisfies `done`; returns the snapshot.
async fn snapshot_until(
    admin: &kube::Client,
    name: &str,
    what: &str,
    done: impl Fn(&serde_json::Value) -> bool,
) -> Result<DynamicObject> {
    until(&format!("snapshot {name} {what}"), WAIT, || async {
        let snapshot = snapshots(admin).get(name).await?;
        Ok(match done(&snapshot.data["status"]) {
            true => Ok(snapshot),
            false => Err(format!("{}", snapshot.data["status"])),
        })
    })
    .await
}

fn finalizers(object: &DynamicObject) -> Vec<String> {
    object.metadata.finalizers.clone().unwrap_or_default()
}

/// A snapshot taken with no class named gets the driver's default class, a content bound to it, its finalizers,
/// status and Events as upstream writes them; a claim restored from it holds the data of the moment it was taken,
/// not what was written after; a restore smaller than the snapshot is refused and keeps the snapshot from going;
/// deleting the snapshot (policy Delete) deletes its content and its copy.
#[tokio::test(flavor = "multi_thread")]
async fn a_snapshot_is_the_data_of_its_moment_and_restores_it() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (_cluster, _kubevirt, _snapshots, admin) = lab(dir.path()).await?;
    claim(&admin, "data", "8Mi", "csi", None).await?;
    let image = bound_image(&admin, "data").await?;
    let then = vec![0x5au8; 8 << 20];
    std::fs::write(&image, &then)?;

    snapshot(&admin, "s1", "data", None).await?;
    let s1 = snapshot_until(&admin, "s1", "ready", |s| s["readyToUse"] == true).await?;
    let uid = s1.metadata.uid.clone().context("a UID")?;
    assert_eq!(s1.data["spec"]["volumeSnapshotClassName"], "snap", "the default class, set by the controller");
    let status = &s1.data["status"];
    assert_eq!(status["boundVolumeSnapshotContentName"], format!("snapcontent-{uid}").as_str());
    assert_eq!(status["restoreSize"], "8Mi");
    assert!(status["creationTime"].is_string() && status["error"].is_null(), "{status}");
    let mut kept = finalizers(&s1);
    kept.sort();
    assert_eq!(
        kept,
        [
            "snapshot.storage.kubernetes.io/volumesnapshot-as-source-protection",
            "snapshot.storage.kubernetes.io/volumesnapshot-bound-protection"
        ]
    );
    let content = contents(&admin).get(&format!("snapcontent-{uid}")).await?;
    let spec = &content.data["spec"];
    assert_eq!(spec["driver"], CSI_DRIVER);
    assert_eq!(spec["deletionPolicy"], "Delete");
    assert_eq!(spec["source"]["volumeHandle"], image.to_str().unwrap_or_default());
    assert_eq!(spec["sourceVolumeMode"], "Block");
    assert_eq!(spec["volumeSnapshotRef"]["uid"], uid.as_str());
    assert_eq!(finalizers(&content), ["snapshot.storage.kubernetes.io/volumesnapshotcontent-bound-protection"]);
    let copy = PathBuf::from(content.data["status"]["snapshotHandle"].as_str().context("a snapshot handle")?);
    assert_eq!(content.data["status"]["restoreSize"], 8 << 20);
    let events = lab_events::about(&admin, NS, "s1").await?;
    let expected = [
        ("CreatingSnapshot", format!("Waiting for a snapshot {NS}/s1 to be created by the CSI driver.")),
        ("SnapshotCreated", format!("Snapshot {NS}/s1 was successfully created by the CSI driver.")),
        ("SnapshotReady", format!("Snapshot {NS}/s1 is ready to use.")),
    ];
    let got: Vec<(String, String)> = events.iter().map(|(_, r, m)| (r.clone(), m.clone())).collect();
    assert_eq!(got, expected.map(|(r, m)| (r.to_string(), m)), "{events:#?}");
    until("the claim's pvc-as-source finalizer gone once the snapshot is ready", WAIT, || async {
        let claim = claims(&admin).get("data").await?;
        Ok(if finalizers(&claim).iter().any(|f| f.contains("pvc-as-source")) {
            Err(format!("{:?}", finalizers(&claim)))
        } else {
            Ok(())
        })
    })
    .await?;

    // Written after the snapshot: not in it.
    std::fs::write(&image, vec![0xa5u8; 8 << 20])?;
    claim(&admin, "back", "8Mi", "csi", Some("s1")).await?;
    let restored = bound_image(&admin, "back").await?;
    assert!(std::fs::read(&restored)? == then, "the restored volume holds the data of the snapshot's moment");

    claim(&admin, "small", "4Mi", "csi", Some("s1")).await?;
    let refusal = "error getting handle for DataSource Type VolumeSnapshot by Name s1: requested volume size 4194304 \
                   is less than the size 8388608 for the source snapshot s1";
    until("the small restore refused", WAIT, || async {
        let events = lab_events::about(&admin, NS, "small").await?;
        Ok(match events.iter().any(|(t, r, m)| t == "Warning" && r == "ProvisioningFailed" && m == refusal) {
            true => Ok(()),
            false => Err(format!("{events:?}")),
        })
    })
    .await?;
    snapshots(&admin).delete("s1", &DeleteParams::default()).await?;
    until("the deletion waits for the Pending restore", WAIT, || async {
        let events = lab_events::about(&admin, NS, "s1").await?;
        Ok(
            match events
                .iter()
                .any(|(_, r, m)| r == "SnapshotDeletePending" && m == "Snapshot is being used to restore a PVC")
            {
                true => Ok(()),
                false => Err(format!("{events:?}")),
            },
        )
    })
    .await?;
    assert!(snapshots(&admin).get_opt("s1").await?.is_some(), "kept while a Pending claim restores from it");
    claims(&admin).delete("small", &DeleteParams::default()).await?;
    until("s1, its content and its copy gone", WAIT, || async {
        let vs = snapshots(&admin).get_opt("s1").await?.is_some();
        let vsc = contents(&admin).get_opt(&format!("snapcontent-{uid}")).await?.is_some();
        Ok(if !vs && !vsc && !copy.exists() {
            Ok(())
        } else {
            Err(format!("snapshot {vs}, content {vsc}, copy {}", copy.exists()))
        })
    })
    .await?;
    assert!(std::fs::read(&restored)? == then, "a restored volume outlives its snapshot");
    Ok(())
}

/// Each refusal as upstream words it: a volume that is not CSI, a class that does not exist (on the snapshot, with a
/// Warning Event); a driver whose CreateSnapshot fails (on the content, with its Event, copied to the snapshot);
/// a driver that takes its time leaves the snapshot bound and not ready until it is.
#[tokio::test(flavor = "multi_thread")]
async fn refusals_and_slow_drivers_are_reported_as_upstream_reports_them() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (_cluster, _kubevirt, snapshots_lab, admin) = lab(dir.path()).await?;
    snapshots_lab.add_class("broken", "Delete", json!({FAIL_PARAMETER: "disk on fire"}), false).await?;
    snapshots_lab.add_class("slow", "Retain", json!({SECONDS_PARAMETER: "3"}), false).await?;
    claim(&admin, "data", "8Mi", "csi", None).await?;
    let image = bound_image(&admin, "data").await?;
    claim(&admin, "local", "8Mi", "plain", None).await?;
    let local_pv = until("claim local Bound", WAIT, || async {
        let claim = claims(&admin).get("local").await?;
        Ok(match claim.data["spec"]["volumeName"].as_str() {
            Some(pv) if claim.data["status"]["phase"] == "Bound" => Ok(pv.to_string()),
            _ => Err(format!("{}", claim.data["status"])),
        })
    })
    .await?;

    let cases = [
        (
            "of-local",
            "local",
            Some("snap"),
            "SnapshotContentCreationFailed",
            format!(
                "Failed to create snapshot content with error cannot find CSI PersistentVolumeSource for volume {local_pv}"
            ),
        ),
        (
            "no-class",
            "data",
            Some("nope"),
            "GetSnapshotClassFailed",
            "Failed to get snapshot class with error volumesnapshotclass.snapshot.storage.k8s.io \"nope\" not found"
                .to_string(),
        ),
        (
            "default-of-local",
            "local",
            None,
            "SetDefaultSnapshotClassFailed",
            format!(
                "Failed to set default snapshot class with error snapshotting non-CSI volumes is not supported, snapshot:{NS}/default-of-local"
            ),
        ),
    ];
    for (name, of, class, reason, message) in &cases {
        snapshot(&admin, name, of, *class).await?;
        let refused = snapshot_until(&admin, name, "refused", |s| s["error"]["message"] == message.as_str()).await?;
        assert_ne!(refused.data["status"]["readyToUse"], true);
        let events = lab_events::about(&admin, NS, name).await?;
        assert!(events.iter().any(|(t, r, m)| t == "Warning" && r == reason && m == message), "{events:#?}");
    }

    // The sidecar's first CreateSnapshot fails, then every retry: the content's error (and the snapshot's copy of
    // it) says so in the retry's words, and each wording is one Warning Event on the content.
    snapshot(&admin, "on-fire", "data", Some("broken")).await?;
    let why = format!(
        "failed to take snapshot of the volume {}: \"rpc error: code = Internal desc = disk on fire\"",
        image.display()
    );
    let (first, retry) =
        (format!("Failed to create snapshot: {why}"), format!("Failed to check and update snapshot content: {why}"));
    let failed = snapshot_until(&admin, "on-fire", "failed", |s| s["error"]["message"] == retry.as_str()).await?;
    assert_eq!(failed.data["status"]["readyToUse"], false);
    let content = failed.data["status"]["boundVolumeSnapshotContentName"].as_str().context("bound")?.to_string();
    let events = lab_events::about(&admin, "default", &content).await?;
    let expected = [("SnapshotCreationFailed", &first), ("SnapshotContentCheckandUpdateFailed", &retry)];
    for (reason, message) in expected {
        assert!(
            events.iter().any(|(t, r, m)| t == "Warning" && r == reason && m == message),
            "the driver's failure is an Event on the content: {events:#?}"
        );
    }
    assert!(
        !lab_events::about(&admin, NS, "on-fire").await?.iter().any(|(t, ..)| t == "Warning"),
        "and none on the snapshot"
    );

    snapshot(&admin, "slowly", "data", Some("slow")).await?;
    let waiting =
        snapshot_until(&admin, "slowly", "bound", |s| s["boundVolumeSnapshotContentName"].is_string()).await?;
    assert_eq!(waiting.data["status"]["readyToUse"], false, "not ready while the driver works");
    let started = std::time::Instant::now();
    snapshot_until(&admin, "slowly", "ready", |s| s["readyToUse"] == true).await?;
    assert!(started.elapsed() >= Duration::from_secs(1), "ready only once the driver says so: {:?}", started.elapsed());
    // Retain: the content stays after its snapshot is deleted.
    snapshots(&admin).delete("slowly", &DeleteParams::default()).await?;
    let retained = format!("snapcontent-{}", waiting.metadata.uid.clone().unwrap_or_default());
    until("slowly gone, its content kept", WAIT, || async {
        let vs = snapshots(&admin).get_opt("slowly").await?.is_some();
        Ok(if vs { Err("the snapshot is still there".to_string()) } else { Ok(()) })
    })
    .await?;
    let kept = contents(&admin).get(&retained).await?;
    assert!(kept.metadata.deletion_timestamp.is_none(), "a Retain content is not deleted");
    assert_eq!(
        kept.metadata
            .annotations
            .unwrap_or_default()
            .get("snapshot.storage.kubernetes.io/volumesnapshot-being-deleted")
            .map(String::as_str),
        Some("yes")
    );
    Ok(())
}
