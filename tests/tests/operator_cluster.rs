//! wukong-operator end to end through a genuine kube-apiserver: the shipped CRD and RBAC (the operator runs as its
//! ServiceAccount, bound by deploy/operator.yaml, never as admin), the lab's KubeVirt (which, like KubeVirt,
//! unplugs whatever it is told to) and a QEMU guest running the agent.

use anyhow::{Context, Result, bail};
use kube::api::{Api, DynamicObject, Patch, PatchParams, PostParams};
use serde_json::{Value, json};
use std::time::{Duration, Instant};
use wukong_e2e::cluster::{ADMIN, Cluster};
use wukong_e2e::kubevirt_lab::{API_SERVER, CONTROLLER, HANDLER, HotplugMode, KubeVirtLab, resource, template_volumes};
use wukong_e2e::operator_lab::{
    OPERATOR, Operator, create_wukong, guest_cluster, install_operator, post_review, set_disks, start_guarded, volume,
    wait_for_wukong as wait_for,
};
use wukong_e2e::pki::Pki;
use wukong_e2e::{Guest, HostAgent};
use wukong_operator::crd::{Phase, Wukong};

const NS: &str = "ns1";

fn wukongs(client: &kube::Client) -> Api<Wukong> {
    Api::namespaced(client.clone(), NS)
}

fn phase_is(disk: &'static str, phase: Phase) -> impl Fn(&Wukong) -> bool {
    move |w| volume(w, disk).is_some_and(|v| v.phase == phase)
}

/// Events about Wukong objects in NS: (type, reason, note, reporting instance).
async fn events(client: &kube::Client) -> Result<Vec<(String, String, String, String)>> {
    let api: Api<DynamicObject> =
        Api::namespaced_with(client.clone(), NS, &resource("Event", "events.k8s.io", "v1", "events"));
    Ok(api
        .list(&Default::default())
        .await?
        .into_iter()
        .filter(|e| e.data["regarding"]["kind"] == "Wukong")
        .map(|e| {
            let s = |k: &str| e.data[k].as_str().unwrap_or_default().to_string();
            (s("type"), s("reason"), s("note"), s("reportingInstance"))
        })
        .collect())
}

async fn object(client: &kube::Client, kind: &str, group: &str, plural: &str, name: &str) -> Result<Option<Value>> {
    let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), NS, &resource(kind, group, "v1", plural));
    Ok(api.get_opt(name).await?.map(|o| serde_json::to_value(o).expect("an object serialises")))
}

/// A QEMU guest, a cluster with the lab's KubeVirt (claims provisioned as image files, kept in the returned
/// directory), the operator's CRD and RBAC installed, and VM `db-vm` running.
async fn operator_lab() -> Result<(Guest, Cluster, KubeVirtLab, tempfile::TempDir)> {
    let (guest, cluster, kubevirt, images) = guest_cluster(NS).await?;
    // The VMI reports the loopback address: the lab forwards the guest agent's port there.
    kubevirt.create_vm("db-vm", true, "127.0.0.1").await?;
    Ok((guest, cluster, kubevirt, images))
}

/// [`operator_lab`] with an operator running and Wukong `db` created with disks `rootdisk` and `a`.
struct DbLab {
    guest: Guest,
    cluster: Cluster,
    kubevirt: KubeVirtLab,
    _images: tempfile::TempDir,
    _operator: Operator,
    admin: kube::Client,
    api: Api<Wukong>,
    root: Value,
    a: Value,
}

async fn db_lab() -> Result<DbLab> {
    let (guest, cluster, kubevirt, _images) = operator_lab().await?;
    let _operator = Operator::start(&cluster, "op-1", guest.agent_port())?;
    let admin = cluster.client(ADMIN).await?;
    let api = wukongs(&admin);
    let root = json!({"name": "rootdisk", "system": true});
    let a = json!({"name": "a", "size": "16Mi"});
    create_wukong(&api, "db", json!({"cpu": 2, "memory": "4Gi", "disks": [root, a]})).await?;
    Ok(DbLab { guest, cluster, kubevirt, _images, _operator, admin, api, root, a })
}

/// Issue 29, item 3: a disk removed from spec.disks while KubeVirt's Pod that replaces the VM's attachment Pod is
/// slow, stuck (ContainerCreating) or never scheduled. The operator reports `Detaching` with the attachment Pod that
/// holds the volume, keeps the claim while the VMI's status entry lasts, and finishes (claim deleted) once the
/// replacement runs. The Wukong's deletion in that state keeps the claim too, until KubeVirt lets go of it.
#[tokio::test(flavor = "multi_thread")]
async fn a_removed_disk_keeps_its_claim_until_kubevirts_attachment_pod_is_gone() -> Result<()> {
    use wukong_e2e::kubevirt_lab::AttachmentPodFault;
    // Every field bound (`_`-prefixed ones too): the operator and the images live until the test ends.
    let DbLab { guest: _guest, cluster: _cluster, kubevirt, admin, api, root, a, _images, _operator } =
        db_lab().await?;
    // A claim is deleted once it is gone or terminating (the lab has no controller-manager to end pvc-protection).
    let claim = |name: &str| {
        let (admin, name) = (admin.clone(), format!("db-vm-{name}"));
        async move { object(&admin, "PersistentVolumeClaim", "", "persistentvolumeclaims", &name).await }
    };
    let faults = [("b", None), ("c", Some(AttachmentPodFault::Stuck)), ("d", Some(AttachmentPodFault::Unschedulable))];
    for (disk, fault) in faults {
        set_disks(&api, "db", json!([root, a, {"name": disk, "size": "16Mi"}])).await?;
        wait_for(&api, "db", 120, |w| phase_is("a", Phase::Attached)(w) && phase_is(disk, Phase::Attached)(w)).await?;
        let pods = kubevirt.attachment_pods("db-vm").await?;
        let holder = pods.last().and_then(|p| p.metadata.name.clone()).context("an attachment pod")?;
        kubevirt.set_attachment_pod_start(Duration::from_secs(20));
        kubevirt.set_attachment_pod_fault(fault);
        set_disks(&api, "db", json!([root, a])).await?;
        let named = |w: &Wukong| {
            volume(w, disk).is_some_and(|v| {
                v.phase == Phase::Detaching
                    && v.message.as_deref().is_some_and(|m| m.contains(&format!("attachment pod {holder} is gone")))
            })
        };
        let w = wait_for(&api, "db", 60, named).await?;
        println!("{fault:?}: {:?}", volume(&w, disk).and_then(|v| v.message.clone()));
        tokio::time::sleep(Duration::from_secs(3)).await;
        let w = api.get("db").await?;
        assert_eq!(volume(&w, disk).map(|v| v.phase), Some(Phase::Detaching), "{fault:?}: {:?}", w.status);
        let kept = claim(disk).await?;
        assert!(kept.is_some_and(|c| c["metadata"]["deletionTimestamp"].is_null()), "{fault:?}: the claim stays");

        kubevirt.set_attachment_pod_fault(None);
        kubevirt.set_attachment_pod_start(Duration::from_millis(150));
        wait_for(&api, "db", 90, |w| volume(w, disk).is_none()).await?;
        let gone = claim(disk).await?;
        assert!(gone.is_none_or(|c| c["metadata"]["deletionTimestamp"].is_string()), "{fault:?}: claim deleted");
    }

    // The Wukong is deleted while KubeVirt still holds a removed disk's claim: the claim stays until the entry goes.
    set_disks(&api, "db", json!([root, a, {"name": "e", "size": "16Mi"}])).await?;
    wait_for(&api, "db", 120, phase_is("e", Phase::Attached)).await?;
    kubevirt.set_attachment_pod_fault(Some(AttachmentPodFault::Unschedulable));
    set_disks(&api, "db", json!([root, a])).await?;
    wait_for(&api, "db", 60, phase_is("e", Phase::Detaching)).await?;
    api.delete("db", &Default::default()).await?;
    tokio::time::sleep(Duration::from_secs(8)).await;
    let kept = claim("e").await?;
    assert!(kept.is_some_and(|c| c["metadata"]["deletionTimestamp"].is_null()), "cleanup keeps claim db-vm-e");
    kubevirt.set_attachment_pod_fault(None);
    let deadline = Instant::now() + Duration::from_secs(60);
    while claim("e").await?.is_some_and(|c| c["metadata"]["deletionTimestamp"].is_null()) {
        assert!(Instant::now() < deadline, "cleanup never deleted claim db-vm-e once KubeVirt let go of it");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    Ok(())
}

/// Issue 29, item 5. KubeVirt hot-plugs nothing for a VM with `updateVolumesStrategy: Migration` (declarative
/// hot-plug leaves its VMI alone) and nothing into a VMI with `disableHotplug`. Before, a removed disk waited in
/// `Detaching` for ever (the template lost it, the VMI kept it) with the guest's disk released, and an added disk
/// waited for a guest that never got it. Now the removal is `DetachBlocked` with KubeVirt's reason, nothing touched,
/// and goes through by itself once the strategy is gone; the addition says why in its status.
#[tokio::test(flavor = "multi_thread")]
async fn a_disk_kubevirt_would_not_hot_plug_is_explained_not_waited_for() -> Result<()> {
    let DbLab { guest, cluster: _cluster, kubevirt, admin, api, root, a: _, _images, _operator } = db_lab().await?;
    let w = wait_for(&api, "db", 120, phase_is("a", Phase::Attached)).await?;
    let serial = volume(&w, "a").map(|v| v.serial.clone()).context("disk a's serial")?;
    let vms: Api<DynamicObject> =
        Api::namespaced_with(admin.clone(), NS, &resource("VirtualMachine", "kubevirt.io", "v1", "virtualmachines"));
    let strategy = |value: Value| {
        let vms = vms.clone();
        async move {
            let body = json!({"spec": {"updateVolumesStrategy": value}});
            vms.patch("db-vm", &PatchParams::default(), &Patch::Merge(&body)).await.map(drop)
        }
    };
    strategy(json!("Migration")).await?;
    set_disks(&api, "db", json!([root])).await?;
    let explained = |w: &Wukong| {
        volume(w, "a").is_some_and(|v| {
            v.phase == Phase::DetachBlocked
                && v.blockers.iter().any(|b| b.contains("VM ns1/db-vm has spec.updateVolumesStrategy: Migration"))
        })
    };
    wait_for(&api, "db", 60, explained).await?;
    let vm = object(&admin, "VirtualMachine", "kubevirt.io", "virtualmachines", "db-vm").await?.context("db-vm")?;
    assert!(template_volumes(&vm).contains(&"a".to_string()), "the VM's spec is untouched");
    let state = guest.agent().get_disk(&serial, false).await?.state();
    assert_eq!(state, wukong_proto::v1::DiskState::Present, "the guest was not asked to release it");
    // The strategy goes: the refusal's retry (15 s) detaches it.
    strategy(Value::Null).await?;
    wait_for(&api, "db", 90, |w| volume(w, "a").is_none()).await?;
    guest.wait_unplugged(&serial, Duration::from_secs(30)).await?;

    // A VMI without hot-plug: the added disk says why it is not plugged.
    kubevirt.create_vm_without_hotplug("cold-vm", "127.0.0.1").await?;
    create_wukong(
        &api,
        "cold",
        json!({"cpu": 1, "memory": "1Gi", "vmName": "cold-vm", "disks": [root, {"name": "b", "size": "16Mi"}]}),
    )
    .await?;
    let refused = |w: &Wukong| {
        volume(w, "b").is_some_and(|v| {
            v.phase == Phase::Attaching
                && v.message.as_deref().is_some_and(|m| m.contains("has spec.domain.devices.disableHotplug: true"))
        })
    };
    wait_for(&api, "cold", 60, refused).await?;
    let vm = object(&admin, "VirtualMachine", "kubevirt.io", "virtualmachines", "cold-vm").await?.context("cold-vm")?;
    assert!(!template_volumes(&vm).contains(&"b".to_string()), "nothing was added to the VM's spec");
    Ok(())
}

/// Add a disk: claim, hot-plug, `Attached` with the guest's device. Remove it while a writer holds it: refused,
/// `DetachBlocked` with the writer's pid, nothing touched; the writer stops: detached on its own within the
/// backoff, the claim kept (`preserveData`), the data intact on re-attach. The system disk is never detached; a
/// restart after an interrupted detach converges both ways; `force` with the agent down detaches with a Warning.
#[tokio::test(flavor = "multi_thread")]
async fn declarative_disks_are_plugged_and_detached_only_when_the_guest_lets_go() -> Result<()> {
    let (guest, cluster, _kubevirt, _images) = operator_lab().await?;
    let agent_port = guest.agent_port();
    let mut operator = Operator::start(&cluster, "op-1", agent_port)?;
    let admin = cluster.client(ADMIN).await?;
    let api = wukongs(&admin);

    let data = json!({"name": "data", "size": "64Mi", "detachOptions": {"preserveData": true, "unmount": true}});
    let root = json!({"name": "rootdisk", "system": true});
    let started = Instant::now();
    create_wukong(&api, "db", json!({"cpu": 2, "memory": "4Gi", "disks": [root, data]})).await?;
    let w = wait_for(&api, "db", 120, phase_is("data", Phase::Attached)).await?;
    println!("add a disk → Attached in {:.1} s", started.elapsed().as_secs_f64());
    let v = volume(&w, "data").unwrap();
    let dev = v.device.clone().context("the guest's device in status")?;
    assert_eq!((v.pvc_name.as_str(), v.serial.as_str(), v.bound), ("db-vm-data", "data", true), "{v:?}");
    let system = volume(&w, "rootdisk").unwrap();
    assert!(
        system.system && system.phase == Phase::Attached,
        "the disk marked system: true is the system disk: {system:?}"
    );
    let claim = object(&admin, "PersistentVolumeClaim", "", "persistentvolumeclaims", "db-vm-data").await?.unwrap();
    assert_eq!(claim["metadata"]["ownerReferences"][0]["kind"], "Wukong", "{claim}");
    assert_eq!(claim["metadata"]["labels"]["vm.novasphere.dev/wukong"], "db", "{claim}");
    assert_eq!(claim["status"]["phase"], "Bound");
    let agent = guest.agent();
    assert_eq!(agent.get_disk("data", false).await?.dev_node, dev, "the guest sees serial data at {dev}");

    // A writer holds the filesystem: the removal is refused and nothing changes.
    let sum = guest.fill(&dev, "/mnt/d", 4 << 20).await?;
    let pid = guest.run_ok("sh -c 'exec 3>>/mnt/d/log; exec sleep 1000' </dev/null >/dev/null 2>&1 & echo $!").await?;
    let pid = pid.trim().to_string();
    set_disks(&api, "db", json!([root])).await?;
    let w = wait_for(&api, "db", 60, phase_is("data", Phase::DetachBlocked)).await?;
    let v = volume(&w, "data").unwrap();
    assert!(v.blockers.iter().any(|b| b.contains(&format!("pid {pid}"))), "the writer's pid in status: {v:?}");
    assert!(v.detach_options.preserve_data && v.detach_options.unmount, "the options recorded while listed: {v:?}");
    let refused = events(&admin).await?;
    assert!(
        refused.iter().any(|(t, r, note, _)| t == "Warning" && r == "DetachRefused" && note.contains(&pid)),
        "{refused:#?}"
    );
    let vm = object(&admin, "VirtualMachine", "kubevirt.io", "virtualmachines", "db-vm").await?.unwrap();
    assert!(template_volumes(&vm).contains(&"data".to_string()), "still in the VM's spec: {vm}");
    guest.run_ok("grep -q ' /mnt/d ' /proc/mounts").await.context("still mounted in the guest")?;
    assert_eq!(guest.checksum("/mnt/d/data").await?, sum, "the data is intact");

    // The writer stops: the retry detaches it on its own (the first retry comes 15 s after the refusal).
    guest.run_ok(&format!("kill {pid}; while kill -0 {pid} 2>/dev/null; do usleep 50000; done")).await?;
    let stopped = Instant::now();
    let w = wait_for(&api, "db", 90, |w| volume(w, "data").is_none()).await?;
    println!("writer stopped → detached in {:.1} s", stopped.elapsed().as_secs_f64());
    let history = &w.status.as_ref().unwrap().history;
    let outcomes: Vec<(&str, &str, bool)> =
        history.iter().map(|r| (r.disk.as_str(), r.outcome.as_str(), r.preserved_data)).collect();
    assert_eq!(outcomes, [("data", "Refused", true), ("data", "Detached", true)], "{history:#?}");
    let kept = object(&admin, "PersistentVolumeClaim", "", "persistentvolumeclaims", "db-vm-data").await?;
    assert!(kept.is_some_and(|c| c["metadata"]["deletionTimestamp"].is_null()), "preserveData keeps the claim");
    assert!(!guest.has_disk("data").await, "unplugged from the guest");

    // Listed again: the same claim, the data intact.
    set_disks(&api, "db", json!([root, data])).await?;
    let w = wait_for(&api, "db", 120, phase_is("data", Phase::Attached)).await?;
    let dev = volume(&w, "data").unwrap().device.clone().unwrap();
    guest.run_ok(&format!("mount {dev} /mnt/d")).await?;
    assert_eq!(guest.checksum("/mnt/d/data").await?, sum, "the data is intact after detach and re-attach");
    guest.run_ok("umount /mnt/d").await?;

    // The system disk: refused, even if forced, and nothing touched.
    set_disks(&api, "db", json!([data])).await?;
    let w = wait_for(&api, "db", 60, phase_is("rootdisk", Phase::DetachBlocked)).await?;
    assert!(volume(&w, "rootdisk").unwrap().blockers[0].contains("is the system disk"), "{w:?}");
    let warned = events(&admin).await?;
    assert!(warned.iter().any(|(t, r, _, _)| t == "Warning" && r == "SystemDiskRemovalRefused"), "{warned:#?}");
    let vm = object(&admin, "VirtualMachine", "kubevirt.io", "virtualmachines", "db-vm").await?.unwrap();
    assert!(template_volumes(&vm).contains(&"rootdisk".to_string()), "{vm}");
    assert_eq!(volume(&w, "data").unwrap().phase, Phase::Attached, "the next disk does not become the system disk");
    set_disks(&api, "db", json!([root, data])).await?;
    wait_for(&api, "db", 60, phase_is("rootdisk", Phase::Attached)).await?;

    // Killed between release and unplug, still listed: the restarted operator gives the disk back.
    operator.kill();
    assert!(agent.prepare_detach("data", false, false).await?.released);
    let mut operator = Operator::start(&cluster, "op-1", agent_port)?;
    let deadline = Instant::now() + Duration::from_secs(60);
    while !guest.has_disk("data").await {
        assert!(Instant::now() < deadline, "the restarted operator did not give the released disk back");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let given = events(&admin).await?;
    assert!(given.iter().any(|(_, r, _, _)| r == "ReleaseCancelled"), "{given:#?}");

    // Killed between release and unplug, no longer listed: the restarted operator finishes the detach.
    operator.kill();
    assert!(agent.prepare_detach("data", false, false).await?.released);
    set_disks(&api, "db", json!([root])).await?;
    let mut operator = Operator::start(&cluster, "op-1", agent_port)?;
    wait_for(&api, "db", 60, |w| volume(w, "data").is_none()).await?;

    // Killed mid-attach, after the VM changed and before status was written, and unlisted meanwhile (the fault
    // soak's seed 1796500018310703317, round 37): nothing records the disk, yet the VM has it under the object's
    // claim. The restarted operator detaches it safely and keeps its claim (the options it was listed with are
    // not known).
    let stray = json!({"name": "stray", "size": "16Mi"});
    set_disks(&api, "db", json!([root, stray])).await?;
    let w = wait_for(&api, "db", 120, phase_is("stray", Phase::Attached)).await?;
    operator.kill();
    set_disks(&api, "db", json!([root])).await?;
    let unrecorded: Vec<_> = w.status.as_ref().unwrap().volumes.iter().filter(|v| v.name != "stray").collect();
    let patch = json!({"status": {"volumes": unrecorded}});
    api.patch_status("db", &PatchParams::default(), &Patch::Merge(&patch)).await?;
    assert!(guest.has_disk("stray").await, "the state a kill mid-attach leaves: the guest has the disk");
    let _operator = Operator::start(&cluster, "op-1", agent_port)?;
    let w = wait_for(&api, "db", 90, |w| {
        w.status.as_ref().is_some_and(|s| s.history.iter().any(|r| r.disk == "stray" && r.outcome == "Detached"))
    })
    .await?;
    let record = w.status.as_ref().unwrap().history.iter().rev().find(|r| r.disk == "stray").unwrap().clone();
    assert!(record.preserved_data && !record.forced, "detached safely, claim kept: {record:?}");
    assert!(volume(&w, "stray").is_none(), "{w:?}");
    assert!(!guest.has_disk("stray").await, "unplugged from the guest");
    let vm = object(&admin, "VirtualMachine", "kubevirt.io", "virtualmachines", "db-vm").await?.unwrap();
    assert!(!template_volumes(&vm).contains(&"stray".to_string()), "out of the VM's spec: {vm}");
    let kept = object(&admin, "PersistentVolumeClaim", "", "persistentvolumeclaims", "db-vm-stray").await?;
    assert!(kept.is_some_and(|c| c["metadata"]["deletionTimestamp"].is_null()), "the stray's claim is kept");

    // Forced, with the agent down: detached, with a Warning that says so; the claim is deleted.
    let scratch = json!({"name": "scratch", "size": "16Mi", "detachOptions": {"force": true}});
    set_disks(&api, "db", json!([root, scratch])).await?;
    wait_for(&api, "db", 120, phase_is("scratch", Phase::Attached)).await?;
    guest.run_ok("kill $(pidof wukong-agent); while pidof wukong-agent >/dev/null; do usleep 50000; done").await?;
    set_disks(&api, "db", json!([root])).await?;
    let w = wait_for(&api, "db", 90, |w| volume(w, "scratch").is_none()).await?;
    let history = w.status.unwrap().history;
    let scratch: Vec<_> = history.iter().filter(|r| r.disk == "scratch").collect();
    assert!(scratch.len() == 1 && scratch[0].forced && scratch[0].outcome == "Detached", "one line: {history:#?}");
    let forced = events(&admin).await?;
    assert!(forced.iter().any(|(t, r, _, _)| t == "Warning" && r == "ForcedDetach"), "{forced:#?}");
    // Deleted: with no kube-controller-manager in the lab, the API server's pvc-protection finalizer keeps the
    // object, marked for deletion, as it does in a cluster until no pod uses the claim.
    let scratch = object(&admin, "PersistentVolumeClaim", "", "persistentvolumeclaims", "db-vm-scratch").await?;
    assert!(scratch.is_none_or(|c| c["metadata"]["deletionTimestamp"].is_string()), "claim db-vm-scratch deleted");
    guest.restart_agent().await?;

    // Bad input: the field named in a False condition, nothing created.
    let cases = [
        (
            "twice",
            json!({"vmName": "db-vm", "disks": [{"name": "a", "size": "1Gi"}, {"name": "b", "size": "1Gi", "serial": "a"}]}),
            "SpecValid",
            "spec.disks[1].serial: serial 'a' is also the serial of spec.disks[0]",
        ),
        (
            "ghost",
            json!({"disks": [{"name": "a", "size": "1Gi"}, {"name": "b", "size": "1Gi"}]}),
            "VMAvailable",
            "VirtualMachine ns1/ghost-vm does not exist",
        ),
        (
            "nostore",
            json!({"vmName": "db-vm", "disks": [{"name": "c", "size": "1Gi"}, {"name": "d", "size": "1Gi", "storageClassName": "nope"}]}),
            "SpecValid",
            "spec.disks[1].storageClassName: StorageClass 'nope' does not exist; name an existing one or leave it out",
        ),
    ];
    for (name, spec, condition, message) in cases {
        let bad: Wukong = serde_json::from_value(json!({
            "apiVersion": "vm.novasphere.dev/v1alpha1", "kind": "Wukong", "metadata": {"name": name}, "spec": spec,
        }))?;
        api.create(&PostParams::default(), &bad).await?;
        let w = wait_for(&api, name, 30, |w| w.status.as_ref().is_some_and(|s| !s.conditions.is_empty())).await?;
        let found = w.status.unwrap().conditions.into_iter().find(|c| c.type_ == condition).unwrap();
        assert!(found.status == "False" && found.message.starts_with(message), "{name}: {found:?}");
    }
    for claim in ["db-vm-a", "db-vm-b", "db-vm-c", "db-vm-d", "ghost-vm-a", "ghost-vm-b"] {
        let found = object(&admin, "PersistentVolumeClaim", "", "persistentvolumeclaims", claim).await?;
        assert!(found.is_none(), "bad input created claim {claim}");
    }

    // Deleted: the kept claim is released from the object and labelled.
    api.delete("db", &Default::default()).await?;
    let deadline = Instant::now() + Duration::from_secs(60);
    while api.get_opt("db").await?.is_some() {
        assert!(Instant::now() < deadline, "the finalizer never let go of Wukong db");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let claim = object(&admin, "PersistentVolumeClaim", "", "persistentvolumeclaims", "db-vm-data").await?.unwrap();
    assert_eq!(claim["metadata"]["labels"]["vm.novasphere.dev/preserved"], "true", "{claim}");
    assert!(claim["metadata"]["ownerReferences"].is_null(), "{claim}");
    Ok(())
}

/// Two replicas: only the Lease holder acts; when it dies without a goodbye, the other takes over. A stopped VM
/// gets the disk in its spec only. An idle cluster gets no writes from the operator.
#[tokio::test(flavor = "multi_thread")]
async fn two_replicas_only_the_leader_acts_and_an_idle_cluster_gets_no_writes() -> Result<()> {
    let cluster = Cluster::start(&[OPERATOR, API_SERVER, CONTROLLER, HANDLER]).await?;
    let kubevirt = KubeVirtLab::start(&cluster, None, NS, HotplugMode::Declarative).await?;
    let images = tempfile::tempdir()?;
    kubevirt.provision(images.path(), "lab-images").await?;
    install_operator(&cluster).await?;
    kubevirt.create_stopped_vm("w1-vm").await?;
    let admin = cluster.client(ADMIN).await?;
    let mut first = Operator::start(&cluster, "op-a", 1)?;
    let leases: Api<DynamicObject> =
        Api::namespaced_with(admin.clone(), "wukong-system", &resource("Lease", "coordination.k8s.io", "v1", "leases"));
    let holder = || async {
        let lease = leases.get_opt("wukong-operator").await?;
        Ok::<_, anyhow::Error>(lease.and_then(|l| l.data["spec"]["holderIdentity"].as_str().map(str::to_string)))
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while holder().await?.as_deref() != Some("op-a") {
        assert!(Instant::now() < deadline, "op-a never took the Lease");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let second = Operator::start(&cluster, "op-b", 1)?;
    let api = wukongs(&admin);
    create_wukong(
        &api,
        "w1",
        json!({"disks": [{"name": "rootdisk", "system": true}, {"name": "data", "size": "16Mi"}]}),
    )
    .await?;
    let w = wait_for(&api, "w1", 60, |w| {
        volume(w, "data").is_some_and(|v| v.message.as_deref() == Some("in the VM's spec; attached when the VM starts"))
    })
    .await?;
    assert_eq!(volume(&w, "data").unwrap().phase, Phase::Pending);
    let vm = object(&admin, "VirtualMachine", "kubevirt.io", "virtualmachines", "w1-vm").await?.unwrap();
    assert!(template_volumes(&vm).contains(&"data".to_string()), "the stopped VM's spec has the disk: {vm}");
    let reporters: Vec<String> = events(&admin).await?.into_iter().map(|e| e.3).collect();
    assert!(!reporters.is_empty() && reporters.iter().all(|r| r == "op-a"), "only the leader acts: {reporters:?}");
    // Both replicas are ready (the standby can take over); only the leader has reconciled anything.
    for (replica, reconciled) in [(&first, true), (&second, false)] {
        assert_eq!(replica.get("/readyz").await?.0, 200);
        assert_eq!(replica.get("/healthz").await?.0, 200);
        let (code, metrics) = replica.get("/metrics").await?;
        assert_eq!(code, 200);
        let count = metrics.lines().find_map(|l| l.strip_prefix("wukong_operator_reconciles_total "));
        assert_eq!(count.is_some_and(|c| c != "0"), reconciled, "{metrics}");
        assert!(metrics.contains("wukong_operator_blocked_disks 0"), "{metrics}");
    }

    // Idle: no writes at all from the operator (the Lease renewals aside) for 10 s.
    let mark = cluster.audit()?.len();
    tokio::time::sleep(Duration::from_secs(10)).await;
    let writes: Vec<String> = cluster
        .audit()?
        .into_iter()
        .skip(mark)
        .filter(|e| e.user.username == OPERATOR && e.is_write() && !e.request_uri.contains("/leases/"))
        .map(|e| format!("{} {}", e.verb, e.request_uri))
        .collect();
    assert!(writes.is_empty(), "an idle cluster gets no writes: {writes:#?}");

    // The leader dies without releasing the Lease: the standby takes over once it expires and acts.
    first.kill();
    let deadline = Instant::now() + Duration::from_secs(60);
    while holder().await?.as_deref() != Some("op-b") {
        assert!(Instant::now() < deadline, "op-b never took over the Lease");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    set_disks(
        &api,
        "w1",
        json!([{"name": "rootdisk", "system": true}, {"name": "data", "size": "16Mi"},
                                 {"name": "logs", "size": "16Mi"}]),
    )
    .await?;
    wait_for(&api, "w1", 60, |w| volume(w, "logs").is_some_and(|v| v.phase == Phase::Pending && v.bound)).await?;
    let reporters: Vec<String> = events(&admin).await?.into_iter().map(|e| e.3).collect();
    assert!(reporters.iter().any(|r| r == "op-b"), "the new leader acts: {reporters:?}");

    // Removed while the VM is stopped: no guest can use it; it leaves the VM's spec and the claim is deleted.
    set_disks(&api, "w1", json!([{"name": "rootdisk", "system": true}, {"name": "data", "size": "16Mi"}])).await?;
    let w = wait_for(&api, "w1", 60, |w| volume(w, "logs").is_none()).await?;
    let last = w.status.unwrap().history.last().cloned().unwrap();
    assert!(last.disk == "logs" && last.outcome == "Detached" && !last.forced, "{last:?}");
    let vm = object(&admin, "VirtualMachine", "kubevirt.io", "virtualmachines", "w1-vm").await?.unwrap();
    assert!(!template_volumes(&vm).contains(&"logs".to_string()), "gone from the stopped VM's spec: {vm}");
    Ok(())
}

/// The operator reaches agents over mutual TLS with the files of its Secret (`--agent-tls-dir`: ca.crt, tls.crt,
/// tls.key), re-read on every connection: a certificate the agent trusts gets answers (here: the agent, on this
/// machine, has no such disk), a rotated one it does not trust is named as a TLS refusal in status.
#[tokio::test(flavor = "multi_thread")]
async fn the_operator_talks_to_agents_over_mutual_tls_from_its_secret() -> Result<()> {
    let pki = Pki::new();
    let p = |f: &str| pki.path(f).to_str().unwrap().to_string();
    let agent_port = wukong_e2e::ports::free_port()?;
    let tls = ["--tls-cert", &p("agent.crt"), "--tls-key", &p("agent.key"), "--tls-client-ca", &p("ca.crt")];
    let _agent = HostAgent::start(&format!("127.0.0.1:{agent_port}"), &tls)?;
    let secret = tempfile::tempdir()?;
    let mount = |who: &str| -> Result<()> {
        std::fs::copy(pki.path("ca.crt"), secret.path().join("ca.crt"))?;
        std::fs::copy(pki.path(&format!("{who}.crt")), secret.path().join("tls.crt"))?;
        std::fs::copy(pki.path(&format!("{who}.key")), secret.path().join("tls.key"))?;
        Ok(())
    };
    mount("operator")?;

    let cluster = Cluster::start(&[OPERATOR, API_SERVER, CONTROLLER, HANDLER]).await?;
    let kubevirt = KubeVirtLab::start(&cluster, None, NS, HotplugMode::Declarative).await?;
    let images = tempfile::tempdir()?;
    kubevirt.provision(images.path(), "lab-images").await?;
    install_operator(&cluster).await?;
    kubevirt.create_vm("tls-vm", true, "127.0.0.1").await?;
    let dir = secret.path().to_str().unwrap().to_string();
    let port = agent_port.to_string();
    let _operator = Operator::start_with(&cluster, "op-tls", &["--agent-tls-dir", &dir, "--agent-port", &port])?;
    let api = wukongs(&cluster.client(ADMIN).await?);
    create_wukong(
        &api,
        "tls",
        json!({"disks": [{"name": "rootdisk", "system": true}, {"name": "data", "size": "16Mi"}]}),
    )
    .await?;
    let says = |text: &'static str| {
        move |w: &Wukong| volume(w, "data").and_then(|v| v.message.as_deref()).is_some_and(|m| m.contains(text))
    };
    wait_for(&api, "tls", 90, says("the guest did not report a disk with serial 'data'")).await?;
    // The Secret rotates to a certificate of another CA: the next connection uses it, and the agent refuses it.
    mount("intruder")?;
    let w = wait_for(&api, "tls", 90, says("refused this client's certificate")).await?;
    assert_eq!(volume(&w, "data").unwrap().phase, Phase::Attaching, "{w:?}");
    Ok(())
}

/// Runs `wukongctl pki ARGS` (offline); its stdout, the operator's Secret.
fn pki(args: &[&str]) -> Result<String> {
    let out = std::process::Command::new(wukong_e2e::wukongctl_binary()).arg("pki").args(args).output()?;
    anyhow::ensure!(out.status.success(), "wukongctl pki {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    Ok(String::from_utf8(out.stdout)?)
}

/// The value of `name{labels}` in the Prometheus text, if the series exists.
fn series(metrics: &str, name_and_labels: &str) -> Option<f64> {
    metrics.lines().find_map(|l| l.strip_prefix(&format!("{name_and_labels} "))).and_then(|v| v.parse().ok())
}

/// Certificates from `wukongctl pki` make the operator and a real agent talk mutual TLS. An agent certificate that
/// expires within `--agent-cert-warning-days` is a gauge and one Warning Event `AgentCertificateExpiring`; renewed
/// on the agent's disk (`wukongctl pki renew`) under the running operator and agent, the next handshakes carry the
/// new certificate: `wukongctl info` and the operator's gauge follow it, no Event is repeated, and a certificate
/// valid beyond the threshold removes the series. Neither process restarts.
#[tokio::test(flavor = "multi_thread")]
async fn an_expiring_agent_certificate_is_warned_about_and_its_renewal_seen_without_restarts() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let d = |f: &str| dir.path().join(f).to_str().unwrap().to_string();
    pki(&["init", "--dir", &d("pki"), "--days", "10"])?;
    let p = |f: &str| d(&format!("pki/{f}"));
    let agent_port = wukong_e2e::ports::free_port()?;
    let tls = ["--tls-cert", &p("agent.crt"), "--tls-key", &p("agent.key"), "--tls-client-ca", &p("ca.crt")];
    let mut agent = HostAgent::start(&format!("127.0.0.1:{agent_port}"), &tls)?;
    // The operator's Secret as the kubelet mounts it: the Secret's own keys.
    let secret = dir.path().join("secret");
    std::fs::create_dir(&secret)?;
    for (key, file) in [("ca.crt", "ca.crt"), ("tls.crt", "companion.crt"), ("tls.key", "companion.key")] {
        std::fs::copy(p(file), secret.join(key))?;
    }
    let info = || -> Result<Value> {
        let out = std::process::Command::new(wukong_e2e::wukongctl_binary())
            .args(["--agent", &format!("https://127.0.0.1:{agent_port}"), "--tls-server-name", "wukong-agent"])
            .args(["--tls-ca", &p("ca.crt"), "--tls-cert", &p("companion.crt"), "--tls-key", &p("companion.key")])
            .args(["-o", "json", "info"])
            .output()?;
        anyhow::ensure!(out.status.success(), "wukongctl info: {}", String::from_utf8_lossy(&out.stderr));
        Ok(serde_json::from_slice(&out.stdout)?)
    };
    let now = || std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as f64;
    let day = 86400.0;
    let first = info()?;
    assert_eq!(first["certificate"]["subject"], "CN=wukong-agent", "{first}");
    let first_expiry = first["certificate"]["not_after"].as_f64().context("not_after")?;
    assert!((first_expiry - (now() + 10.0 * day)).abs() < 600.0, "{first}");

    let cluster = Cluster::start(&[OPERATOR, API_SERVER, CONTROLLER, HANDLER]).await?;
    let kubevirt = KubeVirtLab::start(&cluster, None, NS, HotplugMode::Declarative).await?;
    let images = tempfile::tempdir()?;
    kubevirt.provision(images.path(), "lab-images").await?;
    install_operator(&cluster).await?;
    kubevirt.create_vm("cert-vm", true, "127.0.0.1").await?;
    let secret_dir = secret.to_str().unwrap().to_string();
    let port = agent_port.to_string();
    let flags = ["--agent-tls-dir", &secret_dir, "--agent-port", &port, "--agent-cert-warning-days", "15"];
    let operator = Operator::start_with(&cluster, "op-cert", &flags)?;
    let admin = cluster.client(ADMIN).await?;
    let api = wukongs(&admin);
    // A disk the host's agent does not have: it stays Attaching, so the Wukong is reconciled every few seconds.
    create_wukong(
        &api,
        "cert",
        json!({"disks": [{"name": "rootdisk", "system": true}, {"name": "data", "size": "16Mi"}]}),
    )
    .await?;
    let gauge =
        format!("wukong_operator_agent_certificate_expiry_timestamp_seconds{{namespace=\"{NS}\",vm=\"cert-vm\"}}");
    let wait_gauge = |want: Option<f64>| {
        let (operator, gauge) = (&operator, &gauge);
        async move {
            let deadline = Instant::now() + Duration::from_secs(90);
            loop {
                let seen = series(&operator.get("/metrics").await?.1, gauge);
                if seen == want {
                    return Ok::<_, anyhow::Error>(());
                }
                anyhow::ensure!(Instant::now() < deadline, "{gauge} is {seen:?}, not {want:?}");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    };
    wait_gauge(Some(first_expiry)).await?;
    let warnings = || async {
        let all = events(&admin).await?;
        Ok::<_, anyhow::Error>(all.into_iter().filter(|e| e.1 == "AgentCertificateExpiring").collect::<Vec<_>>())
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    let warned = loop {
        let warned = warnings().await?;
        if !warned.is_empty() || Instant::now() > deadline {
            break warned;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    assert_eq!(warned.len(), 1, "{warned:?}");
    let (type_, _, note, _) = &warned[0];
    assert_eq!(type_, "Warning");
    assert!(
        note.starts_with(&format!(
            "the agent of VM {NS}/cert-vm serves a certificate (CN=wukong-agent) that expires in 9 days"
        )),
        "{note}"
    );

    // Renewed from the same CA while both run: new handshakes carry it.
    pki(&["renew", "--dir", &d("pki"), "--days", "12"])?;
    let renewed = info()?["certificate"]["not_after"].as_f64().context("not_after")?;
    assert!((renewed - (now() + 12.0 * day)).abs() < 600.0, "{renewed}");
    wait_gauge(Some(renewed)).await?;
    // A broken file on the agent's disk: the renewed certificate stays in service.
    std::fs::write(p("agent.crt"), "half a certificate")?;
    assert_eq!(info()?["certificate"]["not_after"].as_f64(), Some(renewed));
    pki(&["renew", "--dir", &d("pki"), "--days", "100"])?;
    wait_gauge(None).await?;
    assert_eq!(warnings().await?.len(), 1, "warned once, not on every pass");
    assert!(agent.running()?, "the agent was not restarted");
    assert!(operator.log().contains("AgentCertificateExpiring"), "the warning is in the operator's log too");
    Ok(())
}

/// Liveness (`/healthz`): a leader whose API server stops answering (SIGSTOP: connections open, nothing answers)
/// can no longer renew its Lease; once the Lease has run out it fails its liveness probe, naming the Lease, so the
/// kubelet restarts it, while the standby stays alive (restarting it would not bring the API server back). When the
/// API server answers again, one replica leads and is alive; a leader that lost the Lease meanwhile has exited.
#[tokio::test(flavor = "multi_thread")]
async fn a_leader_that_cannot_renew_its_lease_fails_its_liveness_probe_and_a_standby_does_not() -> Result<()> {
    let cluster = Cluster::start(&[OPERATOR]).await?;
    install_operator(&cluster).await?;
    let admin = cluster.client(ADMIN).await?;
    let leases: Api<DynamicObject> =
        Api::namespaced_with(admin.clone(), "wukong-system", &resource("Lease", "coordination.k8s.io", "v1", "leases"));
    let holder = || async {
        let lease = leases.get_opt("wukong-operator").await?;
        Ok::<_, anyhow::Error>(lease.and_then(|l| l.data["spec"]["holderIdentity"].as_str().map(str::to_string)))
    };
    let mut leader = Operator::start(&cluster, "live-a", 1)?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while holder().await?.as_deref() != Some("live-a") {
        assert!(Instant::now() < deadline, "live-a never took the Lease");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let standby = Operator::start(&cluster, "live-b", 1)?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while standby.get("/readyz").await?.0 != 200 {
        assert!(Instant::now() < deadline, "the standby never became ready");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Healthy leading through several renewals, not only right after taking the Lease.
    tokio::time::sleep(Duration::from_secs(25)).await;
    assert_eq!(leader.get("/healthz").await?, (200, "ok\n".to_string()));
    assert_eq!(standby.get("/healthz").await?, (200, "ok\n".to_string()));

    let signal = |name: &str| {
        let status = std::process::Command::new("kill").args([name, &cluster.apiserver_pid().to_string()]).status();
        anyhow::ensure!(status?.success(), "kill {name} of the API server failed");
        Ok(())
    };
    signal("-STOP")?;
    let frozen = Instant::now();
    let unhealthy = loop {
        let (code, body) = leader.get("/healthz").await?;
        if code != 200 {
            break (code, body, frozen.elapsed());
        }
        if frozen.elapsed() > Duration::from_secs(60) {
            signal("-CONT")?;
            bail!("the leader stayed alive 60 s after its API server stopped answering");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let standby_health = standby.get("/healthz").await;
    signal("-CONT")?;
    let (code, body, after) = unhealthy;
    assert_eq!(code, 500, "{body}");
    assert!(
        body.starts_with(
            "not alive: this replica leads but its Lease wukong-system/wukong-operator has not been renewed for"
        ),
        "{body}"
    );
    // The Lease was renewed at most 10 s before the freeze and lasts 15 s: never unhealthy before it could expire.
    assert!(after > Duration::from_secs(9), "unhealthy {after:?} after the freeze: before the Lease could run out");
    assert_eq!(standby_health?, (200, "ok\n".to_string()), "a standby is not restarted for an API outage");

    // The API server answers again: the leader renews (or the standby wins the expired Lease and the old leader,
    // finding it lost, exits); either way the holder is alive.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let alive = match holder().await?.as_deref() {
            Some("live-a") => leader.get("/healthz").await?.0 == 200,
            Some("live-b") => standby.get("/healthz").await?.0 == 200 && leader.exited()?.is_some(),
            _ => false,
        };
        if alive {
            break;
        }
        assert!(Instant::now() < deadline, "no replica leads and is alive a minute after the API server came back");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    Ok(())
}

/// The admission guard outlives running out of file descriptors: while the process is at its limit the webhook
/// cannot accept connections (it says so and tries again a second later), and once descriptors are free it answers
/// reviews again. A webhook that stopped accepting would leave the replica in the Service answering nothing.
#[tokio::test(flavor = "multi_thread")]
async fn the_guard_serves_again_after_the_process_ran_out_of_file_descriptors() -> Result<()> {
    let cluster = Cluster::start(&[OPERATOR]).await?;
    install_operator(&cluster).await?;
    let operator = start_guarded(&cluster, "fds", 1, &[]).await?;
    assert!(post_review(&operator, &json!({})).await.is_ok(), "the guard answers before");
    let pid = operator.pid().to_string();
    let open = std::fs::read_dir(format!("/proc/{pid}/fd"))?.count();
    // The soft limit only, so that it can be given back.
    let prlimit = |args: &[&str]| std::process::Command::new("prlimit").args(["--pid", &pid]).args(args).output();
    let soft = String::from_utf8(prlimit(&["--nofile", "--output=SOFT", "--noheadings"])?.stdout)?;
    let limit = |n: &str| {
        anyhow::ensure!(prlimit(&[&format!("--nofile={n}:")])?.status.success(), "prlimit --nofile={n}: failed");
        Ok(())
    };
    limit(&(open + 4).to_string())?;
    let address = operator.webhook_address().context("a webhook")?;
    let mut held = Vec::new();
    for _ in 0..16 {
        held.push(tokio::net::TcpStream::connect(address).await?);
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while !operator.log().contains("the admission webhook cannot accept connections; retrying in a second") {
        assert!(Instant::now() < deadline, "the operator never ran out of descriptors: {}", operator.log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop(held);
    limit(soft.trim())?;
    let (code, body) = post_review(&operator, &json!({})).await.context("the guard after the descriptors came back")?;
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("the body is not an admission.k8s.io/v1 AdmissionReview"), "answered as before: {body}");
    Ok(())
}

/// Issue 21: wukong-operator as a platform engineer runs it. Its image (scripts/build-image.sh) imported into the
/// lab's real node (kubelet, containerd), the README's install replayed against the API server as it is (its
/// openssl certificates, both Secrets, deploy/crd.yaml, deploy/operator.yaml, the guard with its caBundle,
/// deploy/network-policy.yaml), a guest agent installed with the README's agent certificate and systemd/agent.toml,
/// reached by the Pods at its VMI's pod IP over mutual TLS. Both replicas run and turn Ready, one holds the Lease;
/// the API server calls the guard through its Service (an unplug of a busy disk denied, then allowed once idle);
/// a Wukong disk is added, its removal refused naming the writer; the leader is killed (its container SIGKILLed, its
/// Pod deleted with no grace) while that removal waits, and the other replica finishes it once the writer stops,
/// the claim kept and the data intact. Then the system disk is refused, a forced detach with the agent down is
/// fenced by the guard until the VM is annotated to force too and then goes with a Warning, and bad input is named
/// in a condition with nothing created.
#[tokio::test(flavor = "multi_thread")]
async fn the_shipped_deployment_runs_as_pods_of_its_image_and_keeps_data_safe() -> Result<()> {
    use k8s_openapi::api::core::v1::Pod;
    use wukong_e2e::node::{NODE_ADDRESS, Node, wait_for_pods};
    use wukong_e2e::readme_install::{readme_agent_files, run_install};
    // Built by scripts/test.sh before the tests: this only checks the script's inputs.
    let archive = wukong_e2e::operator_lab::build_operator_image(None)?;
    let work = tempfile::tempdir()?;
    let installed = run_install(work.path())?;
    let deployment = installed.kind("Deployment").next().context("the install applies no Deployment")?;
    let image = deployment["spec"]["template"]["spec"]["containers"][0]["image"].as_str().context("image")?;
    let base = image.rsplit_once(':').map(|(base, _)| base).context("an image reference with a tag")?;

    let node = Node::start(&[API_SERVER, CONTROLLER, HANDLER]).await?;
    node.import_image_as(&archive, base)?;
    let guest = Guest::boot().await?;
    let files = readme_agent_files()?;
    let file = |flag: &str| work.path().join(&files[flag]);
    let config = wukong_e2e::workspace_root().join("systemd/agent.toml");
    let (cert, key, client_ca) = (file("--cert"), file("--key"), file("--client-ca"));
    let install = [
        (cert.as_path(), "/etc/wukong-agent/tls/agent.crt"),
        (key.as_path(), "/etc/wukong-agent/tls/agent.key"),
        (client_ca.as_path(), "/etc/wukong-agent/tls/client-ca.crt"),
        (config.as_path(), "/etc/wukong-agent/agent.toml"),
    ];
    let lab_client = wukong_controller_client::agent_client::TlsFiles {
        ca: file("--client-ca"),
        cert: work.path().join("pki").join(wukong_controller_client::pki::CLIENT_CERT),
        key: work.path().join("pki").join(wukong_controller_client::pki::CLIENT_KEY),
        server_name: Some("wukong-agent".into()),
    };
    guest.install_agent(&install, "--config /etc/wukong-agent/agent.toml", Some(lab_client)).await?;
    guest.forward_agent(NODE_ADDRESS).await?;
    let kubevirt = KubeVirtLab::start(node.cluster(), Some(&guest), NS, HotplugMode::Declarative).await?;
    let images = tempfile::tempdir()?;
    kubevirt.provision(images.path(), "lab-images").await?;
    let admin = node.client(ADMIN).await?;

    let started = Instant::now();
    installed.apply(&admin).await?;
    let selector = "app.kubernetes.io/name=wukong-operator";
    let pods = wait_for_pods(&admin, "wukong-system", selector, 2, Duration::from_secs(180)).await?;
    println!("README install applied → both replicas Ready in {:.1} s", started.elapsed().as_secs_f64());
    let names: Vec<String> = pods.iter().filter_map(|p| p.metadata.name.clone()).collect();
    let leases: Api<DynamicObject> =
        Api::namespaced_with(admin.clone(), "wukong-system", &resource("Lease", "coordination.k8s.io", "v1", "leases"));
    let holder = || async {
        let lease = leases.get_opt("wukong-operator").await?;
        Ok::<_, anyhow::Error>(lease.and_then(|l| l.data["spec"]["holderIdentity"].as_str().map(str::to_string)))
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    let leader = loop {
        if let Some(h) = holder().await?.filter(|h| names.contains(h)) {
            break h;
        }
        anyhow::ensure!(Instant::now() < deadline, "no replica of {names:?} took the Lease");
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    let pod_api: Api<Pod> = Api::namespaced(admin.clone(), "wukong-system");
    for pod in &pods {
        let statuses = pod.status.as_ref().and_then(|s| s.container_statuses.clone()).unwrap_or_default();
        assert!(statuses.iter().all(|c| c.ready && c.restart_count == 0), "probes pass, no restarts: {statuses:?}");
    }

    // The guard through its Service: a busy disk's unplug by a JSON patch of the VM is denied, naming the writer.
    kubevirt.create_vm("db-vm", true, &NODE_ADDRESS.to_string()).await?;
    let vms: Api<DynamicObject> =
        Api::namespaced_with(admin.clone(), NS, &resource("VirtualMachine", "kubevirt.io", "v1", "virtualmachines"));
    let opt_in = json!({"metadata": {"labels": {"vm.novasphere.dev/guard": "enabled"}}});
    vms.patch("db-vm", &PatchParams::default(), &Patch::Merge(&opt_in)).await?;
    kubevirt.create_claim("pvc-g", &guest.new_image(16 << 20)?).await?;
    let companion = wukong_controller_client::kubevirt::KubeVirt::new(admin.clone(), NS, "db-vm", false);
    let dev = wukong_e2e::kubevirt_lab::attach_claim(&guest, &companion, "g", "pvc-g").await?;
    guest.fill(&dev, "/mnt/g", 1 << 20).await?;
    let writer = "sh -c 'exec 3>>/mnt/g/log; exec sleep 1000' </dev/null >/dev/null 2>&1 & echo $!";
    let pid = guest.run_ok(writer).await?.trim().to_string();
    let remove = wukong_e2e::kubevirt_lab::removal_patch(&vms.get("db-vm").await?, "/spec/template/spec", "g")?;
    let patch = |p: &Value| -> Result<json_patch::Patch> { Ok(serde_json::from_value(p.clone())?) };
    let denied = vms.patch("db-vm", &PatchParams::default(), &Patch::<()>::Json(patch(&remove)?)).await;
    let denied = denied.expect_err("the guard in its Pods denies a busy disk's unplug").to_string();
    assert!(denied.contains("wukong guard refused to unplug disk 'g'") && denied.contains(&format!("pid {pid}")));
    guest.run_ok(&format!("kill {pid}; while kill -0 {pid} 2>/dev/null; do usleep 50000; done")).await?;
    let unmount = json!({"metadata": {"annotations": {"vm.novasphere.dev/unmount-on-detach": "true"}}});
    vms.patch("db-vm", &PatchParams::default(), &Patch::Merge(&unmount)).await?;
    vms.patch("db-vm", &PatchParams::default(), &Patch::<()>::Json(patch(&remove)?)).await.context("idle: allowed")?;
    guest.wait_unplugged("g", Duration::from_secs(60)).await?;

    // A Wukong disk: attached by the leader's Pod, its removal refused while a writer holds it.
    let api = wukongs(&admin);
    let data = json!({"name": "data", "size": "32Mi", "detachOptions": {"preserveData": true, "unmount": true}});
    let root = json!({"name": "rootdisk", "system": true});
    create_wukong(&api, "db", json!({"cpu": 2, "memory": "4Gi", "disks": [root, data]})).await?;
    let w = wait_for(&api, "db", 120, phase_is("data", Phase::Attached)).await?;
    let dev = volume(&w, "data").and_then(|v| v.device.clone()).context("the guest's device in status")?;
    let sum = guest.fill(&dev, "/mnt/d", 2 << 20).await?;
    let writer = "sh -c 'exec 3>>/mnt/d/log; exec sleep 1000' </dev/null >/dev/null 2>&1 & echo $!";
    let pid = guest.run_ok(writer).await?.trim().to_string();
    set_disks(&api, "db", json!([root])).await?;
    let w = wait_for(&api, "db", 60, phase_is("data", Phase::DetachBlocked)).await?;
    let v = volume(&w, "data").context("data")?;
    assert!(v.blockers.iter().any(|b| b.contains(&format!("pid {pid}"))), "the writer's pid in status: {v:?}");

    // The leader dies hard: its container SIGKILLed, its Pod deleted with no grace. The other replica takes the
    // Lease and finishes the detach once the writer stops.
    let pod = pod_api.get(&leader).await?;
    let container = pod.status.and_then(|s| s.container_statuses).and_then(|c| c.first().cloned());
    let id = container.and_then(|c| c.container_id).context("the leader's container id")?;
    node.kill_container(id.trim_start_matches("containerd://"))?;
    let now = kube::api::DeleteParams { grace_period_seconds: Some(0), ..Default::default() };
    pod_api.delete(&leader, &now).await?;
    let deadline = Instant::now() + Duration::from_secs(90);
    let successor = loop {
        if let Some(h) = holder().await?.filter(|h| *h != leader) {
            break h;
        }
        anyhow::ensure!(Instant::now() < deadline, "no replica took the Lease over from {leader}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    println!("leader {leader} killed → {successor} leads");
    guest.run_ok(&format!("kill {pid}; while kill -0 {pid} 2>/dev/null; do usleep 50000; done")).await?;
    wait_for(&api, "db", 120, |w| volume(w, "data").is_none()).await?;
    let kept = object(&admin, "PersistentVolumeClaim", "", "persistentvolumeclaims", "db-vm-data").await?;
    assert!(kept.is_some_and(|c| c["metadata"]["deletionTimestamp"].is_null()), "preserveData keeps the claim");
    set_disks(&api, "db", json!([root, data])).await?;
    let w = wait_for(&api, "db", 120, phase_is("data", Phase::Attached)).await?;
    let dev = volume(&w, "data").and_then(|v| v.device.clone()).context("the device")?;
    guest.run_ok(&format!("mount {dev} /mnt/d")).await?;
    assert_eq!(guest.checksum("/mnt/d/data").await?, sum, "the data is intact after the leader's death");
    guest.run_ok("umount /mnt/d").await?;
    // The Deployment replaces the deleted Pod: two replicas Ready again.
    wait_for_pods(&admin, "wukong-system", selector, 2, Duration::from_secs(120)).await?;

    // The system disk stays, and nothing is touched.
    set_disks(&api, "db", json!([data])).await?;
    let w = wait_for(&api, "db", 60, phase_is("rootdisk", Phase::DetachBlocked)).await?;
    assert!(volume(&w, "rootdisk").is_some_and(|v| v.blockers[0].contains("is the system disk")), "{w:?}");
    set_disks(&api, "db", json!([root, data])).await?;
    // Forced with the guest's agent down. The VM is guarded, and the guard cannot ask the guest either: it refuses
    // the unplug (fail safe) until the VM itself says force; then the disk goes, with a Warning.
    let forced = json!({"name": "data", "size": "32Mi", "detachOptions": {"preserveData": true, "force": true}});
    set_disks(&api, "db", json!([root, forced])).await?;
    wait_for(&api, "db", 60, phase_is("rootdisk", Phase::Attached)).await?;
    guest.run_ok("kill $(pidof wukong-agent); while pidof wukong-agent >/dev/null; do usleep 50000; done").await?;
    set_disks(&api, "db", json!([root])).await?;
    let fenced = |w: &Wukong| {
        volume(w, "data").is_some_and(|v| v.blockers.iter().any(|b| b.contains("vm.novasphere.dev/force-detach=true")))
    };
    wait_for(&api, "db", 60, fenced).await?;
    let force = json!({"metadata": {"annotations": {"vm.novasphere.dev/force-detach": "true"}}});
    vms.patch("db-vm", &PatchParams::default(), &Patch::Merge(&force)).await?;
    wait_for(&api, "db", 120, |w| volume(w, "data").is_none()).await?;
    let warned = events(&admin).await?;
    assert!(warned.iter().any(|(t, r, ..)| t == "Warning" && r == "ForcedDetach"), "{warned:#?}");
    // Bad input: named in a False condition, nothing created.
    create_wukong(
        &api,
        "bad",
        json!({"vmName": "db-vm", "disks": [{"name": "rootdisk", "system": true}, {"name": "x", "size": "ten"}]}),
    )
    .await?;
    let w = wait_for(&api, "bad", 30, |w| w.status.as_ref().is_some_and(|s| !s.conditions.is_empty())).await?;
    let valid =
        w.status.and_then(|s| s.conditions.into_iter().find(|c| c.type_ == "SpecValid")).context("SpecValid")?;
    assert!(valid.status == "False" && valid.message.contains("spec.disks[1].size"), "{valid:?}");
    assert!(object(&admin, "PersistentVolumeClaim", "", "persistentvolumeclaims", "db-vm-x").await?.is_none());
    Ok(())
}
