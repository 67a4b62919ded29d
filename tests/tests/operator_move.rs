//! Issue 28, item 1: a disk moved between two `Wukong`s (`moveFrom`), through a genuine kube-apiserver, the lab's
//! KubeVirt and storage, and two QEMU guests (one per VM) running the agent; the operator runs as its
//! ServiceAccount with the shipped RBAC. The move is refused while a writer holds the disk in the first guest, done
//! once it stops, survives the operator being killed while it runs, keeps the claim (handed over, never deleted),
//! never plugs the disk into both VMs at once, and brings the data intact to the second guest. Bad input is named
//! and changes nothing.

use anyhow::{Context, Result};
use kube::api::{Api, DeleteParams, DynamicObject};
use serde_json::{Value, json};
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};
use wukong_controller_client::hypervisor::{Hypervisor, VolumeState};
use wukong_controller_client::kubevirt::KubeVirt;
use wukong_e2e::Guest;
use wukong_e2e::cluster::{ADMIN, Cluster};
use wukong_e2e::kubevirt_lab::{API_SERVER, CONTROLLER, HANDLER, HotplugMode, KubeVirtLab};
use wukong_e2e::operator_lab::{
    OPERATOR, Operator, create_wukong, events, install_operator, set_disks, volume, wait_for_wukong,
};
use wukong_e2e::storage_lab::{BindingMode, claims_resource};
use wukong_operator::crd::{DiskRef, Phase, Wukong};
use wukong_proto::v1::DiskState;

const NS: &str = "move";
/// Where each VM's agent is reached (its VMI's interface address, forwarded to its guest's port 7443): addresses of
/// this test's own, so that no other test's guest answers there.
const A_ADDRESS: Ipv4Addr = Ipv4Addr::new(127, 0, 28, 1);
const B_ADDRESS: Ipv4Addr = Ipv4Addr::new(127, 0, 28, 2);

fn condition(w: &Wukong, type_: &str) -> Option<(String, String)> {
    let c = w.status.as_ref()?.conditions.iter().find(|c| c.type_ == type_)?;
    Some((c.status.clone(), c.message.clone()))
}

fn spec_error(w: &Wukong) -> Option<String> {
    condition(w, "SpecValid").filter(|(status, _)| status == "False").map(|(_, message)| message)
}

fn moved_disk(from: Value) -> Value {
    json!({"name": "moved", "moveFrom": from})
}

#[tokio::test(flavor = "multi_thread")]
async fn a_disk_moves_to_another_vm_once_its_guest_lets_it_go_with_its_data_and_claim() -> Result<()> {
    let (first, second) = tokio::try_join!(Guest::boot(), Guest::boot())?;
    let cluster = Cluster::start(&[OPERATOR, API_SERVER, CONTROLLER, HANDLER]).await?;
    let kubevirt = KubeVirtLab::start(&cluster, Some(&first), NS, HotplugMode::Declarative).await?;
    kubevirt.add_guest("b-vm", &second).await?;
    let images = tempfile::tempdir()?;
    kubevirt.provision_csi_class(images.path(), "csi", BindingMode::Immediate, true).await?;
    install_operator(&cluster).await?;
    first.forward_agent(A_ADDRESS).await?;
    second.forward_agent(B_ADDRESS).await?;
    kubevirt.create_vm("a-vm", true, &A_ADDRESS.to_string()).await?;
    kubevirt.create_vm("b-vm", true, &B_ADDRESS.to_string()).await?;
    let mut operator = Operator::start(&cluster, "op-1", 7443)?;
    let admin = cluster.client(ADMIN).await?;
    let api: Api<Wukong> = Api::namespaced(admin.clone(), NS);
    let claims = Api::<DynamicObject>::namespaced_with(admin.clone(), NS, &claims_resource());
    let (vm_a, vm_b) =
        (KubeVirt::new(admin.clone(), NS, "a-vm", false), KubeVirt::new(admin.clone(), NS, "b-vm", false));

    let root = json!({"name": "rootdisk", "system": true});
    let data = json!({"name": "data", "size": "64Mi", "detachOptions": {"unmount": true}});
    create_wukong(&api, "a", json!({"vmName": "a-vm", "disks": [root, data]})).await?;
    create_wukong(&api, "b", json!({"vmName": "b-vm", "disks": [root]})).await?;
    let attached = |w: &Wukong| volume(w, "data").is_some_and(|v| v.phase == Phase::Attached);
    wait_for_wukong(&api, "a", 120, attached).await?;
    let dev = first.agent().get_disk("data", false).await?.dev_node;
    let sum = first.fill(&dev, "/mnt/data", 4 << 20).await?;
    let untouched = || async {
        let a = api.get("a").await?;
        anyhow::ensure!(attached(&a), "a's disk left: {:?}", volume(&a, "data"));
        first.run_ok("grep -q ' /mnt/data ' /proc/mounts").await.context("still mounted in a's guest")?;
        anyhow::ensure!(!second.has_disk("moved").await, "b's guest has the disk");
        Ok::<_, anyhow::Error>(a)
    };

    // Bad input: named in SpecValid, and nothing moves.
    let bad = [
        (
            json!({"wukong": "other/a", "disk": "data"}),
            "spec.disks[1].moveFrom.wukong: 'other/a' names another namespace",
        ),
        (
            json!({"wukong": "a", "disk": "rootdisk"}),
            "spec.disks[1].moveFrom.disk: disk 'rootdisk' is the system disk of Wukong a",
        ),
        (json!({"wukong": "nope", "disk": "data"}), "spec.disks[1].moveFrom.wukong: Wukong move/nope does not exist"),
    ];
    for (from, said) in bad {
        set_disks(&api, "b", json!([root, moved_disk(from)])).await?;
        let b = wait_for_wukong(&api, "b", 30, |w| spec_error(w).is_some_and(|e| e.starts_with(said))).await?;
        assert!(volume(&b, "moved").is_none(), "nothing recorded for the disk: {:?}", b.status);
        untouched().await?;
    }
    // A target VM that does not exist: the object says so, and the source keeps its disk and says why.
    let from_a = json!({"wukong": "a", "disk": "data"});
    create_wukong(&api, "ghost", json!({"vmName": "ghost-vm", "disks": [moved_disk(from_a.clone())]})).await?;
    let ghost =
        wait_for_wukong(&api, "ghost", 30, |w| condition(w, "VMAvailable").is_some_and(|(s, _)| s == "False")).await?;
    let (_, message) = condition(&ghost, "VMAvailable").unwrap();
    assert!(message.starts_with("VirtualMachine move/ghost-vm does not exist") && message.contains("spec.vmName"));
    let a = wait_for_wukong(&api, "a", 30, |w| {
        volume(w, "data").and_then(|v| v.message.as_deref()).is_some_and(|m| m.contains("ghost-vm does not exist"))
    })
    .await?;
    assert!(attached(&a));
    untouched().await?;
    api.delete("ghost", &DeleteParams::default()).await?;
    set_disks(&api, "b", json!([root])).await?;

    // A writer holds the disk in a's guest: the move is refused there, and b says why it waits.
    let pid =
        first.run_ok("sh -c 'exec 3>>/mnt/data/log; exec sleep 1000' </dev/null >/dev/null 2>&1 & echo $!").await?;
    let pid = pid.trim().to_string();
    set_disks(&api, "b", json!([root, moved_disk(from_a.clone())])).await?;
    let a =
        wait_for_wukong(&api, "a", 60, |w| volume(w, "data").is_some_and(|v| v.phase == Phase::DetachBlocked)).await?;
    let v = volume(&a, "data").unwrap();
    assert!(v.blockers.iter().any(|b| b.contains(&format!("pid {pid}"))), "the writer in a's status: {v:?}");
    let b = wait_for_wukong(&api, "b", 30, |w| {
        volume(w, "moved").and_then(|v| v.message.as_deref()).is_some_and(|m| m.contains(&format!("pid {pid}")))
    })
    .await?;
    let waiting = volume(&b, "moved").unwrap();
    assert_eq!(waiting.phase, Phase::Pending);
    assert_eq!(waiting.pvc_name, "a-vm-data");
    assert!(waiting.message.as_deref().unwrap().starts_with("waiting for Wukong a to detach disk 'data'"));
    assert!(matches!(vm_a.volume_state("data").await?, VolumeState::Ready { .. }), "still plugged into a-vm");
    first.run_ok("grep -q ' /mnt/data ' /proc/mounts").await.context("still mounted in a's guest")?;
    assert_eq!(first.checksum("/mnt/data/data").await?, sum);

    // The writer stops: the next retry moves it. The operator is killed while the move runs (the guest released the
    // disk, KubeVirt is unplugging it: seconds in a real cluster); its successor finishes it. At no moment do both VMs
    // have the disk. KubeVirt's unplug is held until the restart, so that the restart surely falls inside it however
    // slow this loop is on a busy machine; it ends 3 s after the restart.
    kubevirt.set_unplug_delay(Duration::from_secs(600));
    first.run_ok(&format!("kill {pid}; while kill -0 {pid} 2>/dev/null; do usleep 50000; done")).await?;
    let stopped = Instant::now();
    let mut restarted = false;
    // What the loop saw, for a failure's message: each change of the volume on each VM and of a's disk, and when
    // (seconds since the writer stopped).
    let mut seen: Vec<(f64, String)> = Vec::new();
    let b = loop {
        anyhow::ensure!(stopped.elapsed() < Duration::from_secs(150), "not moved within 150 s; saw {seen:#?}");
        let in_a = vm_a.volume_state("data").await?;
        let in_b = vm_b.volume_state("moved").await?;
        let released = first.agent().get_disk("data", false).await.map(|d| d.state());
        let now = format!("a-vm {in_a:?}, b-vm {in_b:?}, a's disk {released:?}");
        if seen.last().is_none_or(|(_, last)| *last != now) {
            seen.push((stopped.elapsed().as_secs_f64(), now));
        }
        assert!(in_a == VolumeState::Absent || in_b == VolumeState::Absent, "on both VMs; saw {seen:#?}");
        if !restarted && released.is_ok_and(|s| s == DiskState::Released) && in_a != VolumeState::Absent {
            operator.restart().await.context("restarting the operator while the move runs")?;
            restarted = true;
            kubevirt.set_unplug_delay(stopped.elapsed() + Duration::from_secs(3));
        }
        let b = api.get("b").await?;
        if volume(&b, "moved").is_some_and(|v| v.phase == Phase::Attached) {
            break b;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    println!("writer stopped → moved in {:.1} s", stopped.elapsed().as_secs_f64());
    assert!(
        restarted,
        "the operator was restarted while a's guest had released the disk and a-vm still had it; saw {seen:#?}"
    );

    // Where it went, in both statuses and a's history; the claim is b's now, and was never deleted.
    let here = volume(&b, "moved").unwrap();
    assert_eq!(here.moved_from, Some(DiskRef { wukong: "a".into(), disk: "data".into() }));
    assert_eq!(here.pvc_name, "a-vm-data");
    let a = wait_for_wukong(&api, "a", 30, |w| volume(w, "data").is_some_and(|v| v.phase == Phase::Moved)).await?;
    let gone = volume(&a, "data").unwrap();
    assert_eq!(gone.moved_to, Some(DiskRef { wukong: "b".into(), disk: "moved".into() }));
    let history = &a.status.as_ref().unwrap().history;
    let moved = history.iter().rev().find(|r| r.disk == "data").context("a's history")?;
    assert_eq!((moved.outcome.as_str(), moved.preserved_data), ("Moved", true), "{history:#?}");
    assert_eq!(moved.moved_to, gone.moved_to);
    assert_eq!(condition(&a, "Ready").map(|(s, _)| s).as_deref(), Some("True"), "a Moved disk is settled");
    let claim = claims.get("a-vm-data").await?;
    let labels = claim.metadata.labels.clone().unwrap_or_default();
    assert_eq!(
        (labels["vm.novasphere.dev/wukong"].as_str(), labels["vm.novasphere.dev/disk"].as_str()),
        ("b", "moved")
    );
    let owners = claim.metadata.owner_references.clone().unwrap_or_default();
    assert_eq!(owners.iter().map(|o| o.name.as_str()).collect::<Vec<_>>(), ["b"]);
    assert!(claim.metadata.deletion_timestamp.is_none());
    assert_eq!(claims.list(&Default::default()).await?.items.len(), 1, "no claim made or lost");
    let noted = events(&admin, NS).await?;
    assert!(
        noted.iter().any(|e| e.data["reason"] == "Moved"
            && e.data["note"].as_str().unwrap_or("").contains("moved to disk 'moved' of Wukong b")),
        "{noted:#?}"
    );

    // The data, intact in b's guest; a's guest has no such disk any more; nothing was pulled out from under a guest.
    assert!(!first.has_disk("data").await, "unplugged from a's guest");
    let dev = second.agent().get_disk("moved", false).await?.dev_node;
    second.run_ok(&format!("mkdir -p /mnt/moved && mount {dev} /mnt/moved")).await?;
    assert_eq!(second.checksum("/mnt/moved/data").await?, sum, "the data moved intact");
    second.run_ok("umount /mnt/moved").await?;
    assert!(kubevirt.unsafe_unplugs().is_empty(), "{:?}", kubevirt.unsafe_unplugs());

    // a lets go of the listing: nothing is deleted, and b keeps its disk.
    set_disks(&api, "a", json!([root])).await?;
    wait_for_wukong(&api, "a", 30, |w| volume(w, "data").is_none()).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(claims.get("a-vm-data").await?.metadata.deletion_timestamp.is_none(), "the claim is b's");
    let b = api.get("b").await?;
    assert!(volume(&b, "moved").is_some_and(|v| v.phase == Phase::Attached), "{:?}", b.status);
    Ok(())
}
