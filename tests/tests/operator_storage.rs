//! Issue 23: the operator on storage as clusters have it, through a genuine kube-apiserver, the lab's storage (a
//! provisioner for `Immediate` and `WaitForFirstConsumer` classes, real PersistentVolumes), the lab's CDI and
//! KubeVirt, and a QEMU guest running the agent. The operator runs as its ServiceAccount with the shipped RBAC.

use anyhow::{Context, Result, bail};
use kube::api::{Api, DynamicObject, ListParams, PostParams};
use serde_json::{Value, json};
use std::time::{Duration, Instant};
use wukong_e2e::cdi_lab::{CDI_CONTROLLER, CdiLab};
use wukong_e2e::cluster::{ADMIN, Cluster};
use wukong_e2e::kubevirt_lab::{API_SERVER, CONTROLLER, HANDLER, HotplugMode, KubeVirtLab, resource};
use wukong_e2e::operator_lab::{
    OPERATOR, Operator, create_wukong, install_operator, set_disks, volume, wait_for_wukong,
};
use wukong_e2e::storage_lab::{BindingMode, SELECTED_NODE};
use wukong_e2e::{Guest, GuestOutput};
use wukong_operator::crd::{Phase, Wukong};

const NS: &str = "ns1";
/// The default class: `Immediate`, as the lab has always had it.
const IMMEDIATE: &str = "lab-images";
/// A class that binds a claim only once a Pod uses it, as most CSI drivers' default classes do.
const WFFC: &str = "lab-wffc";

/// A cluster with the lab's KubeVirt and CDI, both classes, the operator's CRD and RBAC, and VM `db-vm` running
/// in `guest` (or stopped, without one).
struct Lab {
    cluster: Cluster,
    kubevirt: KubeVirtLab,
    cdi: CdiLab,
    _images: [tempfile::TempDir; 2],
    admin: kube::Client,
    api: Api<Wukong>,
}

async fn lab(guest: Option<&Guest>) -> Result<Lab> {
    let cluster = Cluster::start(&[OPERATOR, API_SERVER, CONTROLLER, HANDLER, CDI_CONTROLLER]).await?;
    let kubevirt = KubeVirtLab::start(&cluster, guest, NS, HotplugMode::Declarative).await?;
    let images = [tempfile::tempdir()?, tempfile::tempdir()?];
    kubevirt.provision_class(images[0].path(), IMMEDIATE, BindingMode::Immediate, true).await?;
    kubevirt.provision_class(images[1].path(), WFFC, BindingMode::WaitForFirstConsumer, false).await?;
    let cdi = CdiLab::start(&cluster, &kubevirt).await?;
    install_operator(&cluster).await?;
    match guest {
        // The VMI reports the loopback address: the lab forwards the guest agent's port there.
        Some(_) => kubevirt.create_vm("db-vm", true, "127.0.0.1").await?,
        None => kubevirt.create_stopped_vm("db-vm").await?,
    }
    let admin = cluster.client(ADMIN).await?;
    let api = Api::namespaced(admin.clone(), NS);
    Ok(Lab { cluster, kubevirt, cdi, _images: images, admin, api })
}

/// Creates Wukong `name` for VM `db-vm` with `disks`.
async fn create(api: &Api<Wukong>, name: &str, disks: Value) -> Result<()> {
    create_wukong(api, name, json!({"vmName": "db-vm", "disks": disks})).await
}

fn attached(disks: &'static [&'static str]) -> impl Fn(&Wukong) -> bool {
    move |w| disks.iter().all(|d| volume(w, d).is_some_and(|v| v.phase == Phase::Attached && v.bound))
}

fn claims(client: &kube::Client) -> Api<DynamicObject> {
    Api::namespaced_with(client.clone(), NS, &resource("PersistentVolumeClaim", "", "v1", "persistentvolumeclaims"))
}

fn data_volumes(client: &kube::Client) -> Api<DynamicObject> {
    Api::namespaced_with(client.clone(), NS, &resource("DataVolume", "cdi.kubevirt.io", "v1beta1", "datavolumes"))
}

/// A claim is gone, or marked for deletion (held by its protection finalizer until no Pod uses it).
async fn claim_deleted(client: &kube::Client, name: &str) -> Result<bool> {
    Ok(claims(client).get_opt(name).await?.is_none_or(|c| c.metadata.deletion_timestamp.is_some()))
}

/// Starts a process in the guest that holds `path` open for writing; returns its pid.
async fn hold(guest: &Guest, path: &str) -> Result<String> {
    let script = format!("sh -c 'exec 3<>{path}; exec sleep 1000' </dev/null >/dev/null 2>&1 & echo $!");
    Ok(guest.run_ok(&script).await?.trim().to_string())
}

async fn stop(guest: &Guest, pid: &str) -> Result<GuestOutput> {
    guest.run(&format!("kill {pid}; while kill -0 {pid} 2>/dev/null; do usleep 50000; done")).await
}

/// Items 1 and 2: disks of a `WaitForFirstConsumer` class (a blank DataVolume, and a bare `Block` claim) are
/// hot-plugged while their claims are Pending and bound once KubeVirt's Pods use them; the `Block` claim is a raw
/// device in the guest. Both are refused while used, naming the process, and detached once it stops; a claim of an
/// `Immediate` class binds at once.
#[tokio::test(flavor = "multi_thread")]
async fn a_wffc_disk_and_a_block_disk_attach_are_refused_while_used_and_detach_safely() -> Result<()> {
    let guest = Guest::boot().await?;
    let lab = lab(Some(&guest)).await?;
    let _operator = Operator::start(&lab.cluster, "op-1", guest.agent_port())?;
    let root = json!({"name": "rootdisk", "system": true});
    let wffc = json!({"name": "late", "size": "16Mi", "storageClassName": WFFC});
    // CDI is installed: `late` becomes a blank DataVolume (CDI writes its disk.img), `raw` a bare Block claim; both
    // wait for their first consumer. `soon` binds at once.
    let raw = json!({"name": "raw", "size": "16Mi", "volumeMode": "Block", "storageClassName": WFFC});
    let soon = json!({"name": "soon", "size": "16Mi", "volumeMode": "Block"});
    let started = Instant::now();
    create(&lab.api, "db", json!([root, wffc, raw, soon])).await?;
    let w = wait_for_wukong(&lab.api, "db", 120, attached(&["late", "raw", "soon"])).await?;
    println!(
        "a WaitForFirstConsumer disk and a Block disk → Attached and bound in {:.1} s",
        started.elapsed().as_secs_f64()
    );

    // The WFFC claims waited for their consumer (KubeVirt's attachment Pod, or its Pod that lets CDI fill a
    // DataVolume) and were bound for it.
    let late = volume(&w, "late").unwrap();
    assert_eq!(late.data_volume.as_ref().map(|d| d.phase.as_str()), Some("Succeeded"), "a blank DataVolume: {late:?}");
    let events = Api::<DynamicObject>::namespaced_with(lab.admin.clone(), NS, &resource("Event", "", "v1", "events"));
    for disk in ["late", "raw"] {
        let v = volume(&w, disk).unwrap();
        assert_eq!(v.binding_mode.as_deref(), Some("WaitForFirstConsumer"), "{v:?}");
        let claim = claims(&lab.admin).get(&v.pvc_name).await?;
        let node = claim.metadata.annotations.as_ref().and_then(|a| a.get(SELECTED_NODE)).cloned();
        assert_eq!(node.as_deref(), Some("lab-node"), "{:?}", claim.metadata);
        assert!(claim.data["spec"]["volumeName"].is_string(), "bound to a PersistentVolume: {:?}", claim.data);
        let field = format!("involvedObject.name={}", v.pvc_name);
        let reasons: Vec<Value> = events
            .list(&ListParams::default().fields(&field))
            .await?
            .items
            .iter()
            .map(|e| e.data["reason"].clone())
            .collect();
        assert!(reasons.contains(&json!("WaitForFirstConsumer")), "{disk} waited for its first consumer: {reasons:?}");
    }
    assert_eq!(volume(&w, "soon").unwrap().binding_mode.as_deref(), Some("Immediate"));

    // The Block claim is a raw device of the claim's size in the guest, with the modes in status.
    let raw = volume(&w, "raw").unwrap();
    assert_eq!(
        (raw.volume_mode.as_deref(), raw.access_modes.clone()),
        (Some("Block"), vec!["ReadWriteOnce".to_string()])
    );
    let raw_dev = raw.device.clone().context("the raw disk's device")?;
    assert_eq!(guest.run_ok(&format!("blockdev --getsize64 {raw_dev}")).await?.trim(), (16u64 << 20).to_string());

    // Used: a filesystem with a writer on the WFFC disk, the raw device held open. Both removals are refused.
    let late_dev = late.device.clone().context("the WFFC disk's device")?;
    let sum = guest.fill(&late_dev, "/mnt/late", 1 << 20).await?;
    let writer = hold(&guest, "/mnt/late/data").await?;
    let holder = hold(&guest, &raw_dev).await?;
    set_disks(&lab.api, "db", json!([root])).await?;
    let w = wait_for_wukong(&lab.api, "db", 60, |w| {
        ["late", "raw"].iter().all(|d| volume(w, d).is_some_and(|v| v.phase == Phase::DetachBlocked))
    })
    .await?;
    for (disk, pid) in [("late", &writer), ("raw", &holder)] {
        let v = volume(&w, disk).unwrap();
        assert!(v.blockers.iter().any(|b| b.contains(&format!("pid {pid}"))), "{disk} names pid {pid}: {v:?}");
    }
    assert_eq!(guest.checksum("/mnt/late/data").await?, sum, "the data is intact");

    // They stop: both go on the operator's retry, and their claims are deleted (no preserveData).
    stop(&guest, &writer).await?;
    guest.run_ok("umount /mnt/late").await?;
    stop(&guest, &holder).await?;
    wait_for_wukong(&lab.api, "db", 90, |w| volume(w, "late").is_none() && volume(w, "raw").is_none()).await?;
    assert!(!guest.has_disk("late").await && !guest.has_disk("raw").await, "unplugged from the guest");
    for claim in ["db-vm-late", "db-vm-raw"] {
        assert!(claim_deleted(&lab.admin, claim).await?, "claim {claim} deleted");
    }
    Ok(())
}

/// Item 3: disks filled by CDI: a blank DataVolume whose modes come from the class's StorageProfile, and a clone
/// of a claim whose bytes reach the guest; hot-plugged as `dataVolume` volumes, the DataVolume deleted with the
/// disk.
#[tokio::test(flavor = "multi_thread")]
async fn disks_from_data_volumes_are_plugged_once_cdi_filled_them() -> Result<()> {
    let guest = Guest::boot().await?;
    let lab = lab(Some(&guest)).await?;
    lab.cdi
        .set_claim_property_sets(IMMEDIATE, json!([{"accessModes": ["ReadWriteMany"], "volumeMode": "Block"}]))
        .await?;
    // A golden image with known bytes, as a claim to clone.
    let golden = tempfile::NamedTempFile::new()?;
    let content: Vec<u8> = (0..(4u32 << 20)).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    std::fs::write(golden.path(), &content)?;
    lab.kubevirt.create_claim("golden", golden.path()).await?;
    let expected = sha256(&content);

    let _operator = Operator::start(&lab.cluster, "op-1", guest.agent_port())?;
    let root = json!({"name": "rootdisk", "system": true});
    let blank = json!({"name": "blank", "size": "16Mi", "source": {"blank": {}}});
    let copy = json!({"name": "copy", "source": {"pvc": {"name": "golden"}}});
    let started = Instant::now();
    create(&lab.api, "db", json!([root, blank, copy])).await?;
    let w = wait_for_wukong(&lab.api, "db", 180, attached(&["blank", "copy"])).await?;
    println!("a blank DataVolume and a clone → Attached in {:.1} s", started.elapsed().as_secs_f64());

    for disk in ["blank", "copy"] {
        let v = volume(&w, disk).unwrap();
        let dv = v.data_volume.as_ref().context("the DataVolume in status")?;
        assert_eq!((dv.name.as_str(), dv.phase.as_str()), (format!("db-vm-{disk}").as_str(), "Succeeded"), "{v:?}");
    }
    let blank = volume(&w, "blank").unwrap();
    assert_eq!(
        (blank.access_modes.clone(), blank.volume_mode.as_deref()),
        (vec!["ReadWriteMany".to_string()], Some("Block")),
        "the StorageProfile's modes"
    );
    let vm = Api::<DynamicObject>::namespaced_with(
        lab.admin.clone(),
        NS,
        &resource("VirtualMachine", "kubevirt.io", "v1", "virtualmachines"),
    )
    .get("db-vm")
    .await?;
    let plugged = vm.data["spec"]["template"]["spec"]["volumes"].as_array().cloned().unwrap_or_default();
    let copy = plugged.iter().find(|v| v["name"] == "copy").context("copy in the VM's spec")?;
    assert_eq!(copy["dataVolume"], json!({"name": "db-vm-copy", "hotpluggable": true}), "{copy}");

    // The clone's bytes, read in the guest.
    let dev = volume(&w, "copy").unwrap().device.clone().context("the clone's device")?;
    let read = guest.run_ok(&format!("head -c {} {dev} | sha256sum", content.len())).await?;
    assert_eq!(read.split_whitespace().next(), Some(expected.as_str()), "the guest reads the golden image's bytes");

    // Removed: detached, and the DataVolume deleted (its claim with it).
    set_disks(&lab.api, "db", json!([root, {"name": "blank", "size": "16Mi", "source": {"blank": {}}}])).await?;
    wait_for_wukong(&lab.api, "db", 90, |w| volume(w, "copy").is_none()).await?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while data_volumes(&lab.admin).get_opt("db-vm-copy").await?.is_some()
        || !claim_deleted(&lab.admin, "db-vm-copy").await?
    {
        assert!(Instant::now() < deadline, "DataVolume db-vm-copy and its claim were not deleted");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(claims(&lab.admin).get_opt("golden").await?.is_some(), "the clone's source is untouched");
    Ok(())
}

fn sha256(bytes: &[u8]) -> String {
    let mut child = std::process::Command::new("sha256sum")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("sha256sum runs");
    use std::io::Write;
    child.stdin.take().unwrap().write_all(bytes).unwrap();
    let out = child.wait_with_output().unwrap();
    String::from_utf8_lossy(&out.stdout).split_whitespace().next().unwrap_or_default().to_string()
}

/// Items 4 and 6: what the schema can refuse is refused at admission, naming the field; the rest gets a False
/// `SpecValid` condition naming the field, and nothing is created.
#[tokio::test(flavor = "multi_thread")]
async fn bad_storage_input_is_refused_or_named_and_creates_nothing() -> Result<()> {
    let lab = lab(None).await?;
    lab.cdi
        .set_claim_property_sets(IMMEDIATE, json!([{"accessModes": ["ReadWriteOnce"], "volumeMode": "Filesystem"}]))
        .await?;
    let _operator = Operator::start(&lab.cluster, "op-1", 1)?;

    // Refused by the API server, naming the field (the 1.20 API server leaves the list index out): nothing is stored.
    let refused = [
        (
            "unknown-source",
            json!([{"name": "a", "size": "1Gi", "source": {"s3": {"url": "s3://b/k"}}}]),
            "spec.disks.source",
        ),
        (
            "two-sources",
            json!([{"name": "a", "size": "1Gi", "source": {"blank": {}, "pvc": {"name": "x"}}}]),
            "spec.disks.source",
        ),
        (
            "bad-mode",
            json!([{"name": "a", "size": "1Gi", "accessModes": ["ReadWriteAlways"]}]),
            "spec.disks.accessModes",
        ),
        ("bad-volume-mode", json!([{"name": "a", "size": "1Gi", "volumeMode": "Raw"}]), "spec.disks.volumeMode"),
    ];
    // Sent as kubectl sends them (untyped: the Rust types would refuse some before they left).
    let raw = Api::<DynamicObject>::namespaced_with(
        lab.admin.clone(),
        NS,
        &resource("Wukong", "vm.novasphere.dev", "v1alpha1", "wukongs"),
    );
    for (name, disks, field) in refused {
        let object = serde_json::from_value(json!({"apiVersion": "vm.novasphere.dev/v1alpha1", "kind": "Wukong",
            "metadata": {"name": name}, "spec": {"vmName": "db-vm", "disks": disks}}))?;
        match raw.create(&PostParams::default(), &object).await {
            Ok(_) => bail!("Wukong {name} was stored"),
            Err(kube::Error::Api(status)) => {
                assert_eq!(status.code, 422, "{name}: {status:?}");
                assert!(status.message.contains(field), "{name}: the refusal names {field}: {}", status.message);
            }
            Err(e) => return Err(e.into()),
        }
    }

    // Named by the operator.
    let named = [
        (
            "clone-missing",
            json!([{"name": "a", "source": {"pvc": {"name": "nothere"}}}]),
            "spec.disks[0].source.pvc: claim ns1/nothere does not exist",
        ),
        (
            "block-on-fs",
            json!([{"name": "a", "size": "1Gi", "volumeMode": "Block"}]),
            "spec.disks[0].volumeMode: StorageClass 'lab-images' cannot provide Block volumes",
        ),
        (
            "two-systems",
            json!([{"name": "a", "system": true}, {"name": "b", "system": true}]),
            "spec.disks[1].system: spec.disks[0] is the system disk already",
        ),
        ("no-size", json!([{"name": "a"}]), "spec.disks[0].size: a data disk needs a size"),
        (
            "bad-url",
            json!([{"name": "a", "size": "1Gi", "source": {"http": {"url": "ftp://images/a.img"}}}]),
            "spec.disks[0].source.http.url",
        ),
    ];
    for (name, disks, _) in &named {
        create(&lab.api, name, disks.clone()).await?;
    }
    for (name, _, message) in named {
        let w = wait_for_wukong(&lab.api, name, 30, |w| w.status.as_ref().is_some_and(|s| !s.conditions.is_empty()))
            .await?;
        let valid = w.status.unwrap().conditions.into_iter().find(|c| c.type_ == "SpecValid").context("SpecValid")?;
        assert!(valid.status == "False" && valid.message.starts_with(message), "{name}: {valid:?}");
    }
    let made: Vec<String> = claims(&lab.admin)
        .list(&ListParams::default())
        .await?
        .into_iter()
        .chain(data_volumes(&lab.admin).list(&ListParams::default()).await?)
        .filter_map(|o| o.metadata.name)
        .filter(|n| n != "golden")
        .collect();
    assert!(made.is_empty(), "bad input created {made:?}");
    Ok(())
}
