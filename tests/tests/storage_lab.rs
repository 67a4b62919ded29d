//! The lab cluster's storage (tests/src/storage_lab.rs) against the genuine API server: claims bound to real
//! PersistentVolumes as the PV controller and an external provisioner bind them, `WaitForFirstConsumer` classes
//! bound once KubeVirt's attachment Pod is scheduled, and Block and Filesystem claims reaching the QEMU guest as
//! KubeVirt plugs them (a Filesystem claim's `disk.img`).

use anyhow::{Context, Result};
use futures::{StreamExt, TryStreamExt};
use kube::api::{
    Api, DeleteParams, DynamicObject, ListParams, Patch, PatchParams, PostParams, WatchEvent, WatchParams,
};
use serde_json::{Value, json};
use std::time::Duration;
use wukong_e2e::cluster::{ADMIN, Cluster};
use wukong_e2e::kubevirt_lab::{API_SERVER, CONTROLLER, HANDLER, HotplugMode, KubeVirtLab, resource, vmis};
use wukong_e2e::storage_lab::{BindingMode, NODE, PROVISIONER, SELECTED_NODE, claims_resource, volumes_resource};
use wukong_e2e::{Guest, lab_events, until};

const NS: &str = "store";
const WAIT: Duration = Duration::from_secs(30);

fn claims(admin: &kube::Client) -> Api<DynamicObject> {
    Api::namespaced_with(admin.clone(), NS, &claims_resource())
}

fn volumes(admin: &kube::Client) -> Api<DynamicObject> {
    Api::all_with(admin.clone(), &volumes_resource())
}

/// Creates claim `name`: `mode`, `size`, ReadWriteOnce, of `class` (none: the default class, given by the API server).
async fn claim(admin: &kube::Client, name: &str, mode: &str, size: &str, class: Option<&str>) -> Result<()> {
    let mut object = json!({"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": name},
                            "spec": {"accessModes": ["ReadWriteOnce"], "volumeMode": mode,
                                     "resources": {"requests": {"storage": size}}}});
    if let Some(class) = class {
        object["spec"]["storageClassName"] = json!(class);
    }
    claims(admin).create(&PostParams::default(), &serde_json::from_value(object)?).await?;
    Ok(())
}

/// Waits until claim `name` is Bound; returns it.
async fn bound(admin: &kube::Client, name: &str) -> Result<DynamicObject> {
    until(&format!("claim {name} Bound"), WAIT, || async {
        let claim = claims(admin).get(name).await?;
        Ok(match claim.data["status"]["phase"] == "Bound" {
            true => Ok(claim),
            false => Err(format!("{}", claim.data["status"])),
        })
    })
    .await
}

fn annotation<'a>(object: &'a DynamicObject, key: &str) -> Option<&'a str> {
    object.metadata.annotations.as_ref().and_then(|a| a.get(key)).map(String::as_str)
}

/// Adds hotpluggable volume `volume` of claim `claim` (serial `volume`, SCSI) to VM `vm`'s template: the declarative
/// hot-plug.
async fn plug(admin: &kube::Client, vm: &str, volume: &str, claim: &str) -> Result<()> {
    let vms = Api::<DynamicObject>::namespaced_with(
        admin.clone(),
        NS,
        &resource("VirtualMachine", "kubevirt.io", "v1", "virtualmachines"),
    );
    let add = json!([
        {"op": "add", "path": "/spec/template/spec/volumes/-",
         "value": {"name": volume, "persistentVolumeClaim": {"claimName": claim, "hotpluggable": true}}},
        {"op": "add", "path": "/spec/template/spec/domain/devices/disks/-",
         "value": {"name": volume, "serial": volume, "disk": {"bus": "scsi"}}},
    ]);
    let patch: json_patch::Patch = serde_json::from_value(add)?;
    vms.patch(vm, &PatchParams::default(), &Patch::<()>::Json(patch)).await?;
    Ok(())
}

/// VMI `vmi`'s status entry for `volume`.
async fn volume_status(admin: &kube::Client, vmi: &str, volume: &str) -> Result<Option<Value>> {
    let vmi = vmis(admin, NS).get(vmi).await?;
    let statuses = vmi.data["status"]["volumeStatus"].as_array().cloned().unwrap_or_default();
    Ok(statuses.into_iter().find(|s| s["name"] == volume))
}

/// The resource version to watch VMI `vmi` from ([`phases_until`]), taken before a change.
async fn vmi_version(admin: &kube::Client, vmi: &str) -> Result<String> {
    let list = vmis(admin, NS).list_metadata(&ListParams::default().fields(&format!("metadata.name={vmi}"))).await?;
    list.metadata.resource_version.context("a list's resourceVersion")
}

/// Records the (phase, reason, message) VMI `vmi`'s entry for `volume` goes through until phase `last`, from a watch
/// of the VMI since `since` ([`vmi_version`] before the change): every status the lab wrote, in order. Polling missed
/// phases under load (the lab paces each for 150 ms, a GET can take longer).
async fn phases_until(
    admin: &kube::Client,
    vmi: &str,
    volume: &str,
    last: &str,
    since: &str,
) -> Result<Vec<[String; 3]>> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let params = WatchParams::default().fields(&format!("metadata.name={vmi}")).timeout(60);
    let mut events = vmis(admin, NS).watch(&params, since).await?.boxed();
    let mut seen: Vec<[String; 3]> = Vec::new();
    while seen.last().is_none_or(|[phase, ..]| phase != last) {
        let event = tokio::time::timeout_at(deadline, events.try_next()).await;
        let object = match event {
            Ok(Ok(Some(WatchEvent::Added(object) | WatchEvent::Modified(object)))) => object,
            Ok(Ok(Some(WatchEvent::Bookmark(_)))) => continue,
            other => anyhow::bail!("volume {volume} never {last} (the watch gave {other:?}): {seen:?}"),
        };
        let statuses = object.data["status"]["volumeStatus"].as_array().cloned().unwrap_or_default();
        if let Some(status) = statuses.iter().find(|s| s["name"] == volume) {
            let text = |key: &str| status[key].as_str().unwrap_or_default().to_string();
            let entry = [text("phase"), text("reason"), text("message")];
            if seen.last() != Some(&entry) {
                seen.push(entry);
            }
        }
    }
    Ok(seen)
}

/// A hot-plugged volume's phase, reason and message while its claim is Pending.
const PENDING: [&str; 3] = ["Pending", "PVCNotReady", "PVC is in phase ClaimPending"];

fn phases(seen: &[[String; 3]]) -> Vec<String> {
    seen.iter().map(|[phase, ..]| phase.clone()).collect()
}

/// Checks that what volume phases `seen` went through before `AttachedToNode` are phases from the claim (`from_claim`),
/// and returns the phases from `AttachedToNode` on. Nothing before it is fine: virt-controller's
/// status write that would say Pending can lose a conflict to virt-handler's update of the VMI, and the retry already
/// finds the attachment Pod, in KubeVirt as in the lab.
fn from_attached(seen: &[[String; 3]], from_claim: &[[&str; 3]]) -> Vec<String> {
    let at = seen.iter().position(|[phase, ..]| phase == "AttachedToNode").unwrap_or(seen.len());
    let is_from_claim = |entry: &[String; 3]| from_claim.iter().any(|c| c.iter().eq(entry.iter()));
    assert!(seen[..at].iter().all(is_from_claim), "before AttachedToNode: {seen:?}");
    phases(&seen[at..])
}

fn is_subsequence(wanted: &[&str], seen: &[String]) -> bool {
    let mut seen = seen.iter();
    wanted.iter().all(|w| seen.any(|s| s == w))
}

/// An Immediate claim binds at once to a PersistentVolume the lab's provisioner made, with what the PV controller
/// writes on both; a Block claim gets a sparse file, a Filesystem claim a directory; deleting the claim deletes the
/// volume and its files (Delete policy). A claim of a class no provisioner serves stays Pending, and KubeVirt's
/// attachment Pod for it stays Pending as kube-scheduler leaves it: unbound immediate claims.
#[tokio::test(flavor = "multi_thread")]
async fn an_immediate_claim_binds_at_once_and_its_volume_goes_with_it() -> Result<()> {
    let started = std::time::Instant::now();
    let cluster = Cluster::start(&[API_SERVER, CONTROLLER, HANDLER]).await?;
    let kubevirt = KubeVirtLab::start(&cluster, None, NS, HotplugMode::Declarative).await?;
    let dir = tempfile::tempdir()?;
    kubevirt.provision_class(dir.path(), "fast", BindingMode::Immediate, true).await?;
    let admin = cluster.client(ADMIN).await?;
    claim(&admin, "data", "Filesystem", "16Mi", None).await?;
    claim(&admin, "raw", "Block", "8Mi", Some("fast")).await?;

    let data = bound(&admin, "data").await?;
    let uid = data.metadata.uid.clone().context("a UID")?;
    let pv = format!("pvc-{uid}");
    assert_eq!(data.data["spec"]["storageClassName"], "fast", "the default class, given by the API server");
    assert_eq!(data.data["spec"]["volumeName"], pv.as_str(), "VOLUME");
    assert_eq!(data.data["status"]["capacity"]["storage"], "16Mi", "CAPACITY");
    assert_eq!(data.data["status"]["accessModes"], json!(["ReadWriteOnce"]));
    for (key, value) in [
        ("pv.kubernetes.io/bind-completed", "yes"),
        ("pv.kubernetes.io/bound-by-controller", "yes"),
        ("volume.kubernetes.io/storage-provisioner", PROVISIONER),
        ("volume.beta.kubernetes.io/storage-provisioner", PROVISIONER),
    ] {
        assert_eq!(annotation(&data, key), Some(value), "{key}: {:?}", data.metadata.annotations);
    }
    let volume = volumes(&admin).get(&pv).await?;
    assert_eq!(volume.data["status"]["phase"], "Bound");
    assert_eq!(volume.data["spec"]["claimRef"]["uid"], uid.as_str());
    assert_eq!(volume.data["spec"]["volumeMode"], "Filesystem");
    assert_eq!(volume.data["spec"]["persistentVolumeReclaimPolicy"], "Delete");
    assert_eq!(annotation(&volume, "pv.kubernetes.io/provisioned-by"), Some(PROVISIONER));
    let path = dir.path().join(&pv);
    assert!(path.is_dir(), "a Filesystem volume is a directory: {}", path.display());
    let raw = bound(&admin, "raw").await?;
    let raw_pv = raw.data["spec"]["volumeName"].as_str().context("raw's volume")?.to_string();
    assert_eq!(std::fs::metadata(dir.path().join(format!("{raw_pv}.raw")))?.len(), 8 << 20, "a sparse Block device");
    let events = lab_events::about(&admin, NS, "data").await?;
    let reasons: Vec<String> = events.iter().map(|(_, r, _)| r.clone()).collect();
    assert!(
        is_subsequence(&["ExternalProvisioning", "Provisioning", "ProvisioningSucceeded"], &reasons),
        "{events:#?}"
    );
    assert!(events.iter().any(|(_, _, m)| m == &format!("Successfully provisioned volume {pv}")), "{events:#?}");

    claims(&admin).delete("data", &DeleteParams::default()).await?;
    until("claim data, its PV and its directory gone", WAIT, || async {
        let gone = claims(&admin).get_opt("data").await?.is_none() && volumes(&admin).get_opt(&pv).await?.is_none();
        Ok(if gone && !path.exists() { Ok(()) } else { Err(format!("gone: {gone}, directory: {}", path.exists())) })
    })
    .await?;

    // A class nobody provisions: the claim waits for its provisioner, and a Pod that uses it is unschedulable.
    let classes = Api::<DynamicObject>::all_with(
        admin.clone(),
        &resource("StorageClass", "storage.k8s.io", "v1", "storageclasses"),
    );
    let elsewhere = json!({"apiVersion": "storage.k8s.io/v1", "kind": "StorageClass", "metadata": {"name": "elsewhere"},
                           "provisioner": "example.com/none", "volumeBindingMode": "Immediate"});
    classes.create(&PostParams::default(), &serde_json::from_value(elsewhere)?).await?;
    claim(&admin, "stuck", "Block", "8Mi", Some("elsewhere")).await?;
    kubevirt.create_vm("vm1", true, "10.0.2.15").await?;
    let since = vmi_version(&admin, "vm1").await?;
    plug(&admin, "vm1", "stuck", "stuck").await?;
    let seen = phases_until(&admin, "vm1", "stuck", "AttachedToNode", &since).await?;
    from_attached(&seen, &[PENDING]);
    let pod = until("an unschedulable attachment pod", WAIT, || async {
        let pods = kubevirt.attachment_pods("vm1").await?;
        Ok(match pods.first() {
            Some(pod) if pod.data["status"]["conditions"][0]["reason"] == "Unschedulable" => Ok(pod.clone()),
            other => Err(format!("{other:?}")),
        })
    })
    .await?;
    let condition = &pod.data["status"]["conditions"][0];
    assert_eq!(
        condition["message"],
        "0/1 nodes are available: pod has unbound immediate PersistentVolumeClaims. preemption: 0/1 nodes are \
         available: 1 Preemption is not helpful for scheduling.",
        "{condition}"
    );
    assert!(pod.data["spec"]["nodeName"].is_null(), "not bound to a node: {}", pod.data["spec"]);
    let stuck = claims(&admin).get("stuck").await?;
    assert_eq!(stuck.data["status"]["phase"], "Pending");
    let events = lab_events::about(&admin, NS, "stuck").await?;
    assert!(
        events.iter().any(|(_, r, m)| r == "ExternalProvisioning" && m.contains("'example.com/none'")),
        "{events:#?}"
    );
    println!("took {:.1} s", started.elapsed().as_secs_f64());
    Ok(())
}

/// A `WaitForFirstConsumer` claim stays Pending, with the PV controller's Event, until KubeVirt hot-plugs it: its
/// attachment Pod is scheduled, the scheduler selects the node for the claim, the provisioner makes the volume there,
/// and the guest gets the disk. Beside it, a Filesystem claim whose `disk.img` holds data reaches the guest as that
/// disk, and a Filesystem claim without `disk.img` never does: virt-handler cannot mount it.
#[tokio::test(flavor = "multi_thread")]
async fn a_claim_waits_for_its_first_consumer_and_both_volume_modes_reach_the_guest() -> Result<()> {
    let started = std::time::Instant::now();
    let guest = Guest::boot().await?;
    let cluster = Cluster::start(&[API_SERVER, CONTROLLER, HANDLER]).await?;
    let kubevirt = KubeVirtLab::start(&cluster, Some(&guest), NS, HotplugMode::Declarative).await?;
    let (local, shared) = (tempfile::tempdir()?, tempfile::tempdir()?);
    kubevirt.provision_class(local.path(), "local", BindingMode::WaitForFirstConsumer, true).await?;
    kubevirt.provision_class(shared.path(), "shared", BindingMode::Immediate, false).await?;
    kubevirt.create_vm("vm1", true, "10.0.2.15").await?;
    let admin = cluster.client(ADMIN).await?;
    claim(&admin, "late", "Block", "16Mi", None).await?;
    claim(&admin, "files", "Filesystem", "32Mi", Some("shared")).await?;
    claim(&admin, "empty", "Filesystem", "16Mi", Some("shared")).await?;

    let events = until("the WaitForFirstConsumer Event", WAIT, || async {
        let events = lab_events::about(&admin, NS, "late").await?;
        Ok(match events.iter().any(|(_, r, _)| r == "WaitForFirstConsumer") {
            true => Ok(events),
            false => Err(format!("{events:?}")),
        })
    })
    .await?;
    assert!(
        events.contains(&(
            "Normal".into(),
            "WaitForFirstConsumer".into(),
            "waiting for first consumer to be created before binding".into()
        )),
        "{events:#?}"
    );
    bound(&admin, "files").await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let late = claims(&admin).get("late").await?;
    assert_eq!(late.data["status"]["phase"], "Pending", "no consumer yet");
    assert!(late.data["spec"]["volumeName"].is_null() && annotation(&late, SELECTED_NODE).is_none(), "{late:?}");

    // The Filesystem claim's disk is disk.img at its volume's root.
    let volume = kubevirt.claim_volume("files").await?.context("files is bound")?;
    let marker = b"wukong filesystem claim";
    let mut image = vec![0u8; 16 << 20];
    image[..marker.len()].copy_from_slice(marker);
    std::fs::write(volume.disk_image(), &image)?;

    let since = vmi_version(&admin, "vm1").await?;
    plug(&admin, "vm1", "late", "late").await?;
    plug(&admin, "vm1", "files", "files").await?;
    let seen = phases_until(&admin, "vm1", "late", "Ready", &since).await?;
    // Plugged with files a moment later, late's first attachment Pod may stop being current before it is reported,
    // with late's claim bound by then.
    let attached = from_attached(&seen, &[PENDING, ["Bound", "PVCNotReady", "PVC is in phase Bound"]]);
    assert!(is_subsequence(&["AttachedToNode", "MountedToPod", "Ready"], &attached), "{seen:?}");
    phases_until(&admin, "vm1", "files", "Ready", &since).await?;
    until("the guest's disks late and files", Duration::from_secs(60), || async {
        let (late, files) = (guest.has_disk("late").await, guest.has_disk("files").await);
        Ok(if late && files { Ok(()) } else { Err(format!("late: {late}, files: {files}")) })
    })
    .await?;
    let read =
        guest.run_ok(&format!("head -c {} /dev/disk/by-id/scsi-0QEMU_QEMU_HARDDISK_files", marker.len())).await?;
    assert_eq!(read.as_bytes(), marker, "the guest reads disk.img");

    let late = claims(&admin).get("late").await?;
    assert_eq!(annotation(&late, SELECTED_NODE), Some(NODE), "selected by the scheduler");
    assert_eq!(late.data["status"]["phase"], "Bound");
    let pv = volumes(&admin).get(late.data["spec"]["volumeName"].as_str().context("late's volume")?).await?;
    let node = &pv.data["spec"]["nodeAffinity"]["required"]["nodeSelectorTerms"][0]["matchExpressions"][0]["values"][0];
    assert_eq!(node, NODE, "the volume lives on the selected node");
    let events = lab_events::about(&admin, NS, "late").await?;
    let reasons: Vec<String> = events.iter().map(|(_, r, _)| r.clone()).collect();
    assert!(
        is_subsequence(&["WaitForFirstConsumer", "ExternalProvisioning", "ProvisioningSucceeded"], &reasons),
        "{events:#?}"
    );

    // No disk.img: KubeVirt creates none for a hot-plugged volume, and the bind mount fails.
    plug(&admin, "vm1", "empty", "empty").await?;
    let failure = until("virt-handler's SyncFailed for volume empty", WAIT, || async {
        let events = lab_events::about(&admin, NS, "vm1").await?;
        let failed = events.iter().find(|(_, r, m)| r == "SyncFailed" && m.contains("volume empty"));
        Ok(failed.map(|(_, _, m)| m.clone()).ok_or_else(|| format!("{events:?}")))
    })
    .await?;
    assert!(failure.starts_with("failed to mount filesystem hotplug volume empty: lstat "), "{failure}");
    assert!(failure.ends_with("/disk.img: no such file or directory"), "{failure}");
    tokio::time::sleep(Duration::from_secs(1)).await;
    let status = volume_status(&admin, "vm1", "empty").await?.context("empty's entry")?;
    assert_eq!(status["phase"], "AttachedToNode", "{status}");
    assert_eq!(status["persistentVolumeClaimInfo"]["volumeMode"], "Filesystem", "{status}");
    assert!(!guest.has_disk("empty").await, "nothing reaches the guest");
    println!("took {:.1} s", started.elapsed().as_secs_f64());
    Ok(())
}
