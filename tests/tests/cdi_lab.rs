//! The lab's CDI (tests/src/cdi_lab.rs) against the genuine API server: DataVolumes turned into claims and walked
//! through CDI v1.64's phases, conditions and Events for blank images, host-assisted clones (a missing source too),
//! http imports (raw and qcow2) and registry imports (which the lab refuses, saying so); StorageProfile defaults for
//! `spec.storage`; and a DataVolume of a `WaitForFirstConsumer` class hot-plugged through KubeVirt's population
//! trigger Pod.

use anyhow::{Context, Result};
use futures::StreamExt;
use kube::api::{Api, DeleteParams, DynamicObject, Patch, PatchParams, PostParams};
use kube::runtime::{WatchStreamExt, watcher};
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use wukong_e2e::cdi_lab::{CDI_CONTROLLER, CdiLab, data_volumes_resource, storage_profiles_resource};
use wukong_e2e::cluster::{ADMIN, Cluster};
use wukong_e2e::kubevirt_lab::{API_SERVER, CONTROLLER, HANDLER, HotplugMode, KubeVirtLab, resource};
use wukong_e2e::storage_lab::{BindingMode, claims_resource, volumes_resource};
use wukong_e2e::{FileServer, lab_events, until};

const NS: &str = "cdi-lab";
const WAIT: Duration = Duration::from_secs(40);

/// A cluster with the lab's KubeVirt (no guest), the default class `lab` (Immediate) and CDI.
struct Lab {
    _cluster: Cluster,
    kubevirt: KubeVirtLab,
    cdi: CdiLab,
    admin: kube::Client,
    phases: Phases,
    _images: tempfile::TempDir,
}

async fn lab() -> Result<Lab> {
    let cluster = Cluster::start(&[API_SERVER, CONTROLLER, HANDLER, CDI_CONTROLLER]).await?;
    let kubevirt = KubeVirtLab::start(&cluster, None, NS, HotplugMode::Declarative).await?;
    let images = tempfile::tempdir()?;
    kubevirt.provision_class(images.path(), "lab", BindingMode::Immediate, true).await?;
    let cdi = CdiLab::start(&cluster, &kubevirt).await?;
    let admin = cluster.client(ADMIN).await?;
    let phases = Phases::record(&admin);
    Ok(Lab { _cluster: cluster, kubevirt, cdi, admin, phases, _images: images })
}

/// Every phase each DataVolume of NS went through, as a watch sees them.
struct Phases {
    seen: Arc<Mutex<BTreeMap<String, Vec<String>>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Phases {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Phases {
    fn record(admin: &kube::Client) -> Self {
        let seen = Arc::new(Mutex::new(BTreeMap::<String, Vec<String>>::new()));
        let api = Api::<DynamicObject>::namespaced_with(admin.clone(), NS, &data_volumes_resource());
        let record = seen.clone();
        let task = tokio::spawn(async move {
            let mut changes = watcher(api, watcher::Config::default()).default_backoff().applied_objects().boxed();
            while let Some(Ok(dv)) = changes.next().await {
                let Some(phase) = dv.data["status"]["phase"].as_str().map(str::to_string) else { continue };
                let mut seen = record.lock().unwrap();
                let phases = seen.entry(dv.metadata.name.clone().unwrap_or_default()).or_default();
                if phases.last() != Some(&phase) {
                    phases.push(phase);
                }
            }
        });
        Self { seen, task }
    }

    fn of(&self, dv: &str) -> Vec<String> {
        self.seen.lock().unwrap().get(dv).cloned().unwrap_or_default()
    }
}

impl Lab {
    fn data_volumes(&self) -> Api<DynamicObject> {
        Api::namespaced_with(self.admin.clone(), NS, &data_volumes_resource())
    }

    fn claims(&self) -> Api<DynamicObject> {
        Api::namespaced_with(self.admin.clone(), NS, &claims_resource())
    }

    async fn create(&self, name: &str, source: Value, storage: Value) -> Result<()> {
        let dv = json!({"apiVersion": "cdi.kubevirt.io/v1beta1", "kind": "DataVolume", "metadata": {"name": name},
                        "spec": {"source": source, "storage": storage}});
        self.data_volumes().create(&PostParams::default(), &serde_json::from_value(dv)?).await?;
        Ok(())
    }

    /// Waits until DataVolume `name` is in `phase`; returns it.
    /// Waits until DataVolume `name` is in `phase` and the recorder has seen it there too (its watch may lag the
    /// GET), so that what [`Phases::of`] says afterwards includes it.
    async fn phase(&self, name: &str, phase: &str) -> Result<DynamicObject> {
        until(&format!("DataVolume {name} {phase}"), WAIT, || async {
            let dv = self.data_volumes().get(name).await?;
            let recorded = self.phases.of(name).last().is_some_and(|p| p == phase);
            Ok(match dv.data["status"]["phase"] == phase && recorded {
                true => Ok(dv),
                false => Err(format!("{}; recorded {:?}", dv.data["status"], self.phases.of(name))),
            })
        })
        .await
    }

    /// The data of bound claim `name`: its device, or its `disk.img`.
    async fn disk(&self, name: &str) -> Result<Vec<u8>> {
        let volume = self.kubevirt.claim_volume(name).await?.with_context(|| format!("claim {name} is not bound"))?;
        Ok(std::fs::read(volume.disk_image())?)
    }
}

fn condition<'a>(dv: &'a DynamicObject, kind: &str) -> &'a Value {
    let conditions = dv.data["status"]["conditions"].as_array();
    conditions.and_then(|c| c.iter().find(|c| c["type"] == kind)).unwrap_or(&Value::Null)
}

/// (status, reason, message) of a condition, empty where CDI leaves them out.
fn said(condition: &Value) -> [&str; 3] {
    ["status", "reason", "message"].map(|k| condition[k].as_str().unwrap_or_default())
}

fn annotation<'a>(object: &'a DynamicObject, key: &str) -> Option<&'a str> {
    object.metadata.annotations.as_ref().and_then(|a| a.get(key)).map(String::as_str)
}

/// A file of `size` bytes that are not all alike.
fn pattern(path: &std::path::Path, size: usize) -> Result<Vec<u8>> {
    let bytes: Vec<u8> = (0..size).map(|i| (i * 7 + i / 4096) as u8).collect();
    std::fs::write(path, &bytes)?;
    Ok(bytes)
}

/// A blank DataVolume and a host-assisted clone go through CDI's phases to Succeeded with CDI's conditions, the
/// clone holding its source's bytes; a clone of a claim that does not exist waits, saying so as CDI does, and goes
/// on once the claim appears; deleting a DataVolume deletes its claim and the volume.
#[tokio::test(flavor = "multi_thread")]
async fn blank_and_cloned_data_volumes_walk_cdis_phases() -> Result<()> {
    let started = std::time::Instant::now();
    let lab = lab().await?;
    let crds = resource("CustomResourceDefinition", "apiextensions.k8s.io", "v1", "customresourcedefinitions");
    let crd = Api::<DynamicObject>::all_with(lab.admin.clone(), &crds).get("datavolumes.cdi.kubevirt.io").await?;
    let spec = &crd.data["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"];
    assert!(spec["properties"]["source"]["properties"]["http"].is_object(), "CDI's own schema: {spec}");
    let dir = tempfile::tempdir()?;
    let source = pattern(&dir.path().join("src.raw"), 8 << 20)?;
    lab.kubevirt.create_claim("src", &dir.path().join("src.raw")).await?;
    let block = |size: &str| json!({"accessModes": ["ReadWriteOnce"], "volumeMode": "Block", "resources": {"requests": {"storage": size}}});
    lab.create("clone", json!({"pvc": {"namespace": NS, "name": "src"}}), block("8Mi")).await?;
    let filesystem = json!({"accessModes": ["ReadWriteOnce"], "volumeMode": "Filesystem",
                            "resources": {"requests": {"storage": "64Mi"}}});
    lab.create("blank", json!({"blank": {}}), filesystem).await?;
    lab.create("orphan", json!({"pvc": {"namespace": NS, "name": "later"}}), block("8Mi")).await?;

    let blank = lab.phase("blank", "Succeeded").await?;
    lab.phase("clone", "Succeeded").await?;
    assert_eq!(lab.phases.of("blank"), ["Pending", "PVCBound", "ImportScheduled", "ImportInProgress", "Succeeded"]);
    assert_eq!(lab.phases.of("clone"), ["Pending", "CloneScheduled", "CloneInProgress", "Succeeded"]);
    assert_eq!(lab.disk("clone").await?, source, "the clone holds the source's bytes");

    // What CDI writes on a DataVolume it is done with, and on its claim.
    assert_eq!(said(condition(&blank, "Bound")), ["True", "Bound", "PVC blank Bound"]);
    assert_eq!(said(condition(&blank, "Ready")), ["True", "", ""]);
    assert_eq!(said(condition(&blank, "Running")), ["False", "Completed", "Import Complete"]);
    assert_eq!(
        (&blank.data["status"]["progress"], &blank.data["status"]["claimName"]),
        (&json!("100.0%"), &json!("blank"))
    );
    assert_eq!(
        annotation(&blank, "cdi.kubevirt.io/storage.usePopulator"),
        Some("false"),
        "no CSI driver, no populator"
    );
    let claim = lab.claims().get("blank").await?;
    let owner = &claim.metadata.owner_references.clone().unwrap_or_default()[0];
    assert_eq!((owner.kind.as_str(), owner.name.as_str(), owner.controller), ("DataVolume", "blank", Some(true)));
    let labels = claim.metadata.labels.clone().unwrap_or_default();
    assert_eq!(labels.get("app").map(String::as_str), Some("containerized-data-importer"), "{labels:?}");
    assert_eq!(labels.get("app.kubernetes.io/managed-by").map(String::as_str), Some("cdi-controller"), "{labels:?}");
    for (key, value) in [
        ("cdi.kubevirt.io/storage.import.source", "none"),
        ("cdi.kubevirt.io/storage.contentType", "kubevirt"),
        ("cdi.kubevirt.io/storage.import.importPodName", "importer-blank"),
        ("cdi.kubevirt.io/storage.pod.phase", "Succeeded"),
    ] {
        assert_eq!(annotation(&claim, key), Some(value), "{key}");
    }
    assert_eq!(claim.data["spec"]["resources"]["requests"]["storage"], "71135396", "64 MiB plus CDI's 6 % overhead");
    assert_eq!(lab.disk("blank").await?.len(), 64 << 20, "disk.img, the usable space");
    let clone_claim = lab.claims().get("clone").await?;
    assert_eq!(annotation(&clone_claim, "k8s.io/CloneRequest"), Some(&*format!("{NS}/src")));
    assert_eq!(annotation(&clone_claim, "cdi.kubevirt.io/cloneType"), Some("copy"));
    let events = lab_events::about(&lab.admin, NS, "clone").await?;
    assert!(
        events.iter().any(|(t, r, m)| t == "Normal"
            && r == "CloneSucceeded"
            && m == &format!("Successfully cloned from {NS}/src into {NS}/clone")),
        "{events:#?}"
    );

    // A missing source: no phase, the Bound condition says why, and its Event.
    let orphan = lab.data_volumes().get("orphan").await?;
    assert!(orphan.data["status"]["phase"].is_null(), "{}", orphan.data["status"]);
    let why = "The source pvc later doesn't exist";
    assert_eq!(said(condition(&orphan, "Bound")), ["False", "CloneWithoutSource", why]);
    assert_eq!(said(condition(&orphan, "Ready")), ["False", "CloneWithoutSource", why]);
    assert!(lab.claims().get_opt("orphan").await?.is_none(), "no claim before the source exists");
    let events = lab_events::about(&lab.admin, NS, "orphan").await?;
    assert!(events.iter().any(|(_, r, m)| r == "CloneWithoutSource" && m == why), "{events:#?}");
    pattern(&dir.path().join("later.raw"), 4 << 20)?;
    lab.kubevirt.create_claim("later", &dir.path().join("later.raw")).await?;
    lab.phase("orphan", "Succeeded").await?;

    // Deleting the DataVolume deletes its claim, whose volume goes with it (policy Delete).
    let pv = claim.data["spec"]["volumeName"].as_str().context("blank's volume")?.to_string();
    lab.data_volumes().delete("blank", &DeleteParams::default()).await?;
    let volumes = Api::<DynamicObject>::all_with(lab.admin.clone(), &volumes_resource());
    until("claim blank and its volume gone", WAIT, || async {
        let (claim, volume) = (lab.claims().get_opt("blank").await?, volumes.get_opt(&pv).await?);
        Ok(if claim.is_none() && volume.is_none() { Ok(()) } else { Err(format!("{claim:?} {volume:?}")) })
    })
    .await?;
    println!("took {:.1} s", started.elapsed().as_secs_f64());
    Ok(())
}

/// http imports of a raw and of a qcow2 image yield the file's bytes (on a Block claim, and as a Filesystem claim's
/// `disk.img`); a URL that answers 404 and a registry import fail in the importer, as CDI reports a failing Pod.
#[tokio::test(flavor = "multi_thread")]
async fn http_imports_yield_the_files_bytes_and_a_registry_import_is_refused() -> Result<()> {
    let started = std::time::Instant::now();
    let lab = lab().await?;
    let dir = tempfile::tempdir()?;
    let raw = dir.path().join("disk.raw");
    let bytes = pattern(&raw, 3 << 20)?;
    let qcow2 = dir.path().join("disk.qcow2");
    let out = std::process::Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "qcow2"])
        .arg(&raw)
        .arg(&qcow2)
        .output()?;
    anyhow::ensure!(out.status.success(), "qemu-img convert: {}", String::from_utf8_lossy(&out.stderr));
    let server = FileServer::start(&[&raw, &qcow2]).await?;
    let storage = |mode: &str, size: &str| json!({"accessModes": ["ReadWriteOnce"], "volumeMode": mode, "resources": {"requests": {"storage": size}}});
    lab.create("raw", json!({"http": {"url": server.host_url(&raw)}}), storage("Block", "8Mi")).await?;
    lab.create("qcow", json!({"http": {"url": server.host_url(&qcow2)}}), storage("Filesystem", "16Mi")).await?;
    let missing = format!("http://127.0.0.1:{}/missing.raw", server.port);
    lab.create("missing", json!({"http": {"url": missing}}), storage("Block", "8Mi")).await?;
    lab.create(
        "registry",
        json!({"registry": {"url": "docker://quay.io/containerdisks/debian:12"}}),
        storage("Block", "8Mi"),
    )
    .await?;

    lab.phase("raw", "Succeeded").await?;
    lab.phase("qcow", "Succeeded").await?;
    assert_eq!(lab.phases.of("raw"), ["Pending", "PVCBound", "ImportScheduled", "ImportInProgress", "Succeeded"]);
    assert_eq!(lab.disk("raw").await?[..bytes.len()], bytes[..], "the raw file's bytes");
    let image = lab.disk("qcow").await?;
    assert_eq!(image[..bytes.len()], bytes[..], "the qcow2 image's bytes, as raw");
    assert_eq!(image.len(), 16 << 20, "disk.img grown to the usable space");
    let claim = lab.claims().get("raw").await?;
    assert_eq!(annotation(&claim, "cdi.kubevirt.io/storage.import.endpoint"), Some(&*server.host_url(&raw)));

    for (name, says) in
        [("missing", "expected status code 200, got 404"), ("registry", "does not import from a registry")]
    {
        let dv = until(&format!("{name}'s failing importer"), WAIT, || async {
            let dv = lab.data_volumes().get(name).await?;
            Ok(match condition(&dv, "Running")["reason"] == "Error" {
                true => Ok(dv),
                false => Err(format!("{}", dv.data["status"])),
            })
        })
        .await?;
        let [status, _, message] = said(condition(&dv, "Running"));
        assert!(status == "False" && message.contains(says), "{name}: {}", dv.data["status"]);
        assert_eq!(dv.data["status"]["phase"], "ImportInProgress", "{name}: the Pod restarts, it does not fail");
        // The importer's Error event is recorded after the condition it explains: wait for it as for the condition.
        until(&format!("{name}'s Error event"), WAIT, || async {
            let events = lab_events::about(&lab.admin, NS, name).await?;
            Ok(match events.iter().any(|(t, r, m)| t == "Warning" && r == "Error" && m.contains(says)) {
                true => Ok(()),
                false => Err(format!("{events:#?}")),
            })
        })
        .await?;
    }
    println!("took {:.1} s", started.elapsed().as_secs_f64());
    Ok(())
}

/// CDI makes a StorageProfile per StorageClass; with no claim property sets, a `spec.storage` DataVolume that names
/// no access mode cannot be rendered (ErrClaimNotValid), and once an administrator sets them its claim takes them. A
/// DataVolume of a `WaitForFirstConsumer` class waits in phase WaitForFirstConsumer; hot-plugged, it gets KubeVirt's
/// population trigger Pod, which has its claim bound, and once populated it is attached.
#[tokio::test(flavor = "multi_thread")]
async fn storage_profiles_fill_in_claims_and_a_waiting_data_volume_is_hot_plugged() -> Result<()> {
    let started = std::time::Instant::now();
    let lab = lab().await?;
    let local = tempfile::tempdir()?;
    lab.kubevirt.provision_class(local.path(), "local", BindingMode::WaitForFirstConsumer, false).await?;
    let profiles = Api::<DynamicObject>::all_with(lab.admin.clone(), &storage_profiles_resource());
    let profile = until("CDI's StorageProfile for class lab", WAIT, || async {
        Ok(profiles
            .get_opt("lab")
            .await?
            .filter(|p| p.data["status"].is_object())
            .ok_or_else(|| "none yet".to_string()))
    })
    .await?;
    assert_eq!(profile.data["status"]["provisioner"], wukong_e2e::storage_lab::PROVISIONER);
    assert_eq!(
        (&profile.data["status"]["storageClass"], &profile.data["status"]["cloneStrategy"]),
        (&json!("lab"), &json!("copy"))
    );
    assert!(profile.data["status"]["claimPropertySets"].is_null(), "CDI knows nothing of the lab's provisioner");

    lab.create("defaults", json!({"blank": {}}), json!({"resources": {"requests": {"storage": "64Mi"}}})).await?;
    let dv = until("ErrClaimNotValid", WAIT, || async {
        let dv = lab.data_volumes().get("defaults").await?;
        Ok(match condition(&dv, "Bound")["reason"] == "ErrClaimNotValid" {
            true => Ok(dv),
            false => Err(format!("{}", dv.data["status"])),
        })
    })
    .await?;
    assert_eq!(
        said(condition(&dv, "Bound")),
        ["False", "ErrClaimNotValid", "no accessMode specified in StorageProfile lab"]
    );
    let events = lab_events::about(&lab.admin, NS, "defaults").await?;
    let warning = "Spec is missing accessMode and volumeMode, cannot get access mode from StorageProfile lab";
    assert!(events.iter().any(|(t, r, m)| t == "Warning" && r == "ErrClaimNotValid" && m == warning), "{events:#?}");
    assert!(lab.claims().get_opt("defaults").await?.is_none());
    lab.cdi.set_claim_property_sets("lab", json!([{"accessModes": ["ReadWriteMany"], "volumeMode": "Block"}])).await?;
    lab.phase("defaults", "Succeeded").await?;
    let claim = lab.claims().get("defaults").await?;
    assert_eq!(claim.data["spec"]["accessModes"], json!(["ReadWriteMany"]));
    assert_eq!(claim.data["spec"]["volumeMode"], "Block");
    assert_eq!(claim.data["spec"]["storageClassName"], "lab", "the default class");
    assert_eq!(claim.data["spec"]["resources"]["requests"]["storage"], "67108864", "Block: no overhead, in bytes");

    // WaitForFirstConsumer, then hot-plugged.
    let local_storage = json!({"accessModes": ["ReadWriteOnce"], "volumeMode": "Block", "storageClassName": "local",
                               "resources": {"requests": {"storage": "16Mi"}}});
    lab.create("waiting", json!({"blank": {}}), local_storage).await?;
    lab.phase("waiting", "WaitForFirstConsumer").await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(lab.claims().get("waiting").await?.data["status"]["phase"], "Pending", "no consumer yet");
    lab.kubevirt.create_vm("vm1", true, "10.0.2.15").await?;
    let vms = Api::<DynamicObject>::namespaced_with(
        lab.admin.clone(),
        NS,
        &resource("VirtualMachine", "kubevirt.io", "v1", "virtualmachines"),
    );
    let add = json!([
        {"op": "add", "path": "/spec/template/spec/volumes/-",
         "value": {"name": "waiting", "dataVolume": {"name": "waiting", "hotpluggable": true}}},
        {"op": "add", "path": "/spec/template/spec/domain/devices/disks/-",
         "value": {"name": "waiting", "serial": "waiting", "disk": {"bus": "scsi"}}},
    ]);
    vms.patch("vm1", &PatchParams::default(), &Patch::<()>::Json(serde_json::from_value::<json_patch::Patch>(add)?))
        .await?;
    lab.phase("waiting", "Succeeded").await?;
    let vmis = Api::<DynamicObject>::namespaced_with(
        lab.admin.clone(),
        NS,
        &resource("VirtualMachineInstance", "kubevirt.io", "v1", "virtualmachineinstances"),
    );
    until("volume waiting Ready", WAIT, || async {
        let vmi = vmis.get("vm1").await?;
        let statuses = vmi.data["status"]["volumeStatus"].as_array().cloned().unwrap_or_default();
        let status = statuses.iter().find(|s| s["name"] == "waiting").cloned();
        Ok(match status.as_ref().is_some_and(|s| s["phase"] == "Ready") {
            true => Ok(()),
            false => Err(format!("{status:?}")),
        })
    })
    .await?;
    let phases = lab.phases.of("waiting");
    assert_eq!(phases, ["WaitForFirstConsumer", "PVCBound", "ImportScheduled", "ImportInProgress", "Succeeded"]);
    let events = lab_events::about(&lab.admin, NS, "vm1").await?;
    let has = |prefix: &str| events.iter().any(|(_, r, m)| r.starts_with("Successful") && m.starts_with(prefix));
    assert!(has("Created hotplug trigger pod for volume waiting"), "{events:#?}");
    assert!(has("Deleted WaitForFirstConsumer temporary pod hp-volume-"), "{events:#?}");
    assert!(has("Created attachment pod hp-volume-"), "{events:#?}");
    let claim = lab.claims().get("waiting").await?;
    assert_eq!(annotation(&claim, wukong_e2e::storage_lab::SELECTED_NODE), Some(wukong_e2e::storage_lab::NODE));
    println!("took {:.1} s", started.elapsed().as_secs_f64());
    Ok(())
}
