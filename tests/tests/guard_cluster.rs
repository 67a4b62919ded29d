//! The admission guard through a genuine kube-apiserver: deploy/guard.yaml's webhooks (pointed at the operator on
//! loopback with a caBundle), the lab's KubeVirt (which unplugs whatever leaves a spec) and a QEMU guest. Every
//! path that unplugs is tried: a JSON patch of the VM's spec (kubectl edit, GitOps) and virtctl-style removevolume
//! through the aggregated API, for a VM and for a standalone VMI (whose spec only KubeVirt's accounts may change:
//! KubeVirt's own webhooks, served by the lab, refuse anyone else's edit). An update KubeVirt refuses releases
//! nothing.

use anyhow::{Context, Result};
use kube::api::{Api, DynamicObject};
use serde_json::json;
use std::time::{Duration, Instant};
use wukong_controller_client::kubevirt::{KubeVirt, vm_resource, vmi_resource};
use wukong_e2e::Guest;
use wukong_e2e::cluster::{ADMIN, Cluster};
use wukong_e2e::kubevirt_lab::{
    self as kubevirt_lab, API_SERVER, CONTROLLER, HANDLER, HotplugMode, KubeVirtLab, attach_claim, removal_patch,
    template_volumes,
};
use wukong_e2e::operator_lab::{
    OPERATOR, Operator, events, given_back, install_operator, json_patch as patch, label, reviews, start_guarded,
};

const NS: &str = "guarded";

fn vms(client: &kube::Client) -> Api<DynamicObject> {
    Api::namespaced_with(client.clone(), NS, &vm_resource())
}

fn vmis(client: &kube::Client) -> Api<DynamicObject> {
    Api::namespaced_with(client.clone(), NS, &vmi_resource())
}

async fn attach(guest: &Guest, client: &kube::Client, vmi: &str, volume: &str, claim: &str) -> Result<String> {
    attach_claim(guest, &KubeVirt::new(client.clone(), NS, vmi, false), volume, claim).await
}

/// virtctl-style removevolume of `volume` from `plural`/`name` in NS, as `client`.
async fn removevolume(
    client: &kube::Client,
    plural: &str,
    name: &str,
    volume: &str,
    dry_run: bool,
) -> kube::Result<()> {
    kubevirt_lab::removevolume(client, NS, plural, name, volume, dry_run).await
}

/// A guest, the API server with the lab's KubeVirt (declarative hot-plug) in NS, and the operator with the guard,
/// which gives a release back after `grace` seconds.
async fn guarded_lab(grace: &str) -> Result<(Guest, Cluster, KubeVirtLab, Operator)> {
    let guest = Guest::boot().await?;
    let cluster = Cluster::start(&[OPERATOR, API_SERVER, CONTROLLER, HANDLER]).await?;
    let kubevirt = KubeVirtLab::start(&cluster, Some(&guest), NS, HotplugMode::Declarative).await?;
    install_operator(&cluster).await?;
    let operator = start_guarded(&cluster, "guard", guest.agent_port(), &["--guard-grace-seconds", grace]).await?;
    Ok((guest, cluster, kubevirt, operator))
}

#[tokio::test(flavor = "multi_thread")]
async fn no_tool_can_unplug_a_disk_the_guest_still_uses() -> Result<()> {
    let (guest, cluster, kubevirt, mut operator) = guarded_lab("3").await?;
    let admin = cluster.client(ADMIN).await?;
    let (vms, vmis) = (vms(&admin), vmis(&admin));
    kubevirt.create_vm("vm1", true, "127.0.0.1").await?;
    label(&vms, "vm1", json!({"vm.novasphere.dev/guard": "enabled"}), json!({})).await?;
    kubevirt.create_claim("pvc-data", &guest.new_image(64 << 20)?).await?;
    let dev = attach(&guest, &admin, "vm1", "data", "pvc-data").await?;
    let sum = guest.fill(&dev, "/mnt/g", 4 << 20).await?;
    let pid = guest.start_writer("/mnt/g").await?;
    let agent = guest.agent();

    // kubectl edit / GitOps: the VM spec loses the disk while a writer holds it: denied, nothing changes.
    let vm = vms.get("vm1").await?;
    let remove = removal_patch(&vm, "/spec/template/spec", "data")?;
    let (code, message) = patch(&vms, "vm1", remove.clone(), false).await?.expect_err("the unplug must be denied");
    assert_eq!(code, 403, "{message}");
    assert!(
        message.contains("wukong guard refused to unplug disk 'data' (volume data) of VMI guarded/vm1"),
        "{message}"
    );
    assert!(message.contains(&format!("pid {pid}")), "the writer is named: {message}");
    assert!(message.contains("vm.novasphere.dev/force-detach=true"), "how to force: {message}");
    assert!(template_volumes(&serde_json::to_value(vms.get("vm1").await?)?).contains(&"data".to_string()));
    assert_eq!(agent.get_disk("data", false).await?.state(), wukong_proto::v1::DiskState::Present);
    assert_eq!(guest.checksum("/mnt/g/data").await?, sum, "the data is intact");

    // Pointing the hotplugged volume at another claim is an unplug too (KubeVirt drops a changed volume from the
    // VMI to plug the new definition): denied the same way.
    let volumes = vm.data["spec"]["template"]["spec"]["volumes"].as_array().context("volumes")?;
    let index = volumes.iter().position(|v| v["name"] == "data").context("volume data")?;
    let path = format!("/spec/template/spec/volumes/{index}/persistentVolumeClaim/claimName");
    let moved = json!([{"op": "replace", "path": path, "value": "pvc-other"}]);
    let (code, message) = patch(&vms, "vm1", moved, false).await?.expect_err("a changed claim must be denied");
    assert!(code == 403 && message.contains(&format!("pid {pid}")), "{code}: {message}");
    assert_eq!(agent.get_disk("data", false).await?.state(), wukong_proto::v1::DiskState::Present);

    // A dry run: the same verdict, and the guest is not asked to release anything.
    let (code, dry) = patch(&vms, "vm1", remove.clone(), true).await?.expect_err("denied on a dry run too");
    assert_eq!((code, dry.contains(&format!("pid {pid}"))), (403, true), "{dry}");
    guest.run_ok("grep -q ' /mnt/g ' /proc/mounts").await.context("a dry run unmounts nothing")?;

    // An object that did not opt in: allowed, and the guard is not even asked.
    kubevirt.create_stopped_vm("cold").await?;
    let before = reviews(&operator).await?;
    let add = json!([{"op": "add", "path": "/spec/template/spec/volumes/-",
                      "value": {"name": "x", "persistentVolumeClaim": {"claimName": "pvc-x", "hotpluggable": true}}},
                     {"op": "add", "path": "/spec/template/spec/domain/devices/disks/-", "value": {"name": "x", "disk": {"bus": "scsi"}}}]);
    patch(&vms, "cold", add, false).await?.expect("an addition is allowed");
    let cold = vms.get("cold").await?;
    patch(&vms, "cold", removal_patch(&cold, "/spec/template/spec", "x")?, false).await?.expect("not opted in");
    assert_eq!(reviews(&operator).await?, before, "the webhook is not called for an object that did not opt in");

    // The writer stops; with the unmount annotation the same patch is allowed, and KubeVirt unplugs the disk.
    guest.stop_process(&pid).await?;
    label(&vms, "vm1", json!({}), json!({"vm.novasphere.dev/unmount-on-detach": "true"})).await?;
    patch(&vms, "vm1", remove, false).await?.expect("the released disk's unplug is allowed");
    guest.wait_unplugged("data", Duration::from_secs(60)).await?;
    let dev = attach(&guest, &admin, "vm1", "data", "pvc-data").await?;
    guest.run_ok(&format!("mount {dev} /mnt/g")).await?;
    assert_eq!(guest.checksum("/mnt/g/data").await?, sum, "the data is intact after the guarded unplug");

    // virtctl removevolume, through the aggregated API: virt-api's change of the VM spec is reviewed the same way.
    let pid = guest.start_writer("/mnt/g").await?;
    let refused = removevolume(&admin, "virtualmachines", "vm1", "data", false).await.expect_err("must be refused");
    // virt-api turns the webhook's denial of its patch into a 500 (volumes.go `vmVolumePatch`).
    assert!(matches!(&refused, kube::Error::Api(s) if s.code == 500), "{refused}");
    assert!(refused.to_string().contains("wukong guard refused to unplug disk 'data'"), "{refused}");
    assert!(refused.to_string().contains(&format!("pid {pid}")), "{refused}");
    guest.stop_process(&pid).await?;
    removevolume(&admin, "virtualmachines", "vm1", "data", false)
        .await
        .context("removevolume once the guest let go")?;
    guest.wait_unplugged("data", Duration::from_secs(60)).await?;

    // The agent is down: denied (fail safe); forced: allowed, with a Warning Event naming who forced it.
    attach(&guest, &admin, "vm1", "data", "pvc-data").await?;
    guest.run_ok("kill $(pidof wukong-agent); while pidof wukong-agent >/dev/null; do usleep 50000; done").await?;
    let remove = removal_patch(&vms.get("vm1").await?, "/spec/template/spec", "data")?;
    let (code, message) = patch(&vms, "vm1", remove.clone(), false).await?.expect_err("fail safe");
    assert_eq!(code, 403);
    assert!(message.contains("cannot ask the guest of VMI guarded/vm1"), "{message}");
    label(&vms, "vm1", json!({}), json!({"vm.novasphere.dev/force-detach": "true"})).await?;
    patch(&vms, "vm1", remove, false).await?.expect("forced");
    let forced = events(&admin, NS).await?;
    assert!(
        forced
            .iter()
            .any(|e| e.data["reason"] == "ForcedUnplug" && e.data["note"].as_str().unwrap_or("").contains(ADMIN)),
        "a Warning Event names who forced it: {forced:#?}"
    );
    guest.restart_agent().await?;
    // Forced through virt-api: the review names virt-api's account, so the Event says KubeVirt acted for a request.
    attach(&guest, &admin, "vm1", "data", "pvc-data").await?;
    removevolume(&admin, "virtualmachines", "vm1", "data", false).await.context("a forced removevolume")?;
    guest.wait_unplugged("data", Duration::from_secs(60)).await?;
    let acting = format!("KubeVirt ({API_SERVER}) acting for a removevolume request");
    let forced = events(&admin, NS).await?;
    assert!(
        forced
            .iter()
            .any(|e| e.data["reason"] == "ForcedUnplug" && e.data["note"].as_str().unwrap_or("").contains(&acting)),
        "a Warning Event says KubeVirt acted for someone: {forced:#?}"
    );
    label(&vms, "vm1", json!({}), json!({"vm.novasphere.dev/force-detach": null})).await?;

    // The old path: a standalone VMI's spec loses a busy disk. Only KubeVirt's accounts change a VMI's spec
    // (vmi-update-admitter.go), so that is virt-api's removevolume on the VMI, patching it as kubevirt-apiserver.
    kubevirt.create_vm("solo", false, "127.0.0.1").await?;
    label(&vmis, "solo", json!({"vm.novasphere.dev/guard": "enabled"}), json!({})).await?;
    kubevirt.create_claim("pvc-solo", &guest.new_image(16 << 20)?).await?;
    let dev = attach(&guest, &admin, "solo", "solo-data", "pvc-solo").await?;
    guest.fill(&dev, "/mnt/s", 1 << 20).await?;
    let pid = guest.start_writer("/mnt/s").await?;
    let solo = |dry_run| removevolume(&admin, "virtualmachineinstances", "solo", "solo-data", dry_run);
    let refused = solo(false).await.expect_err("virt-api's removal from the VMI is guarded").to_string();
    assert!(refused.contains("wukong guard refused to unplug disk 'solo-data'"), "{refused}");
    assert!(refused.contains(&format!("pid {pid}")), "{refused}");
    guest.stop_process(&pid).await?;

    // A system disk (the guest mounted this one at /boot): denied, and forced too.
    guest.run_ok(&format!("umount /mnt/s && mkdir -p /boot && mount {dev} /boot")).await?;
    // No udev event says so: the agent learns it from the mount table.
    let deadline = Instant::now() + Duration::from_secs(5);
    while !agent.get_disk("solo-data", false).await?.system {
        anyhow::ensure!(Instant::now() < deadline, "the agent never saw that the disk holds /boot");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let message = solo(false).await.expect_err("a system disk stays").to_string();
    assert!(message.contains("/boot of the running system"), "{message}");
    label(&vmis, "solo", json!({}), json!({"vm.novasphere.dev/force-detach": "true"})).await?;
    let message = solo(false).await.expect_err("a system disk stays, forced too").to_string();
    assert!(message.contains("is a system disk of the guest"), "{message}");
    guest.run_ok("umount /boot").await?;
    let deadline = Instant::now() + Duration::from_secs(5);
    while agent.get_disk("solo-data", false).await?.system {
        anyhow::ensure!(Instant::now() < deadline, "unmounted from /boot, the disk is still a system disk");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Closing the loop. A release whose update was never stored (here: the guest released the disk, the spec kept
    // it) is given back after the grace period, with an Event.
    attach(&guest, &admin, "vm1", "data", "pvc-data").await?;
    assert!(agent.prepare_detach("data", false, false).await?.released);
    given_back(&guest, &admin, NS, "data").await.context("the released disk still in the spec")?;
    // The other direction: a disk released for an unplug KubeVirt is carrying out (slowly) stays released.
    kubevirt.set_unplug_delay(Duration::from_secs(15));
    let remove = removal_patch(&vms.get("vm1").await?, "/spec/template/spec", "data")?;
    patch(&vms, "vm1", remove, false).await?.expect("an idle disk's unplug is allowed");
    tokio::time::sleep(Duration::from_secs(9)).await;
    let state = agent.get_disk("data", false).await.map(|d| d.state()).ok();
    assert!(
        state != Some(wukong_proto::v1::DiskState::Present),
        "a disk leaving the spec is not given back: {state:?}"
    );
    guest.wait_unplugged("data", Duration::from_secs(60)).await?;
    kubevirt.set_unplug_delay(Duration::from_millis(150));

    // The webhook is down: the API server's own refusal for failurePolicy: Fail.
    operator.kill();
    let (code, message) = patch(&vms, "vm1", json!([{"op": "add", "path": "/metadata/labels/x", "value": "y"}]), false)
        .await?
        .expect_err("no webhook, no change");
    assert!(message.contains("failed calling webhook"), "{code}: {message}");
    Ok(())
}

/// The API server asks KubeVirt's webhooks and the guard at once. An unplug KubeVirt refuses must release nothing:
/// the guest keeps its disk present and mounted, not fenced until a grace period gives it back. Each update here
/// unplugs an idle, mounted disk the guard would otherwise release (the unmount annotation lets it unmount).
#[tokio::test(flavor = "multi_thread")]
async fn an_update_kubevirt_refuses_releases_nothing() -> Result<()> {
    let (guest, cluster, kubevirt, _operator) = guarded_lab("600").await?;
    let admin = cluster.client(ADMIN).await?;
    let (vms, vmis) = (vms(&admin), vmis(&admin));
    let agent = guest.agent();
    let opted_in = json!({"vm.novasphere.dev/guard": "enabled"});
    let unmount = json!({"vm.novasphere.dev/unmount-on-detach": "true"});
    let kept = |serial: &'static str, mnt: &'static str| {
        let (agent, guest) = (&agent, &guest);
        async move {
            let state = agent.get_disk(serial, false).await?.state();
            anyhow::ensure!(state == wukong_proto::v1::DiskState::Present, "{serial} was released: {state:?}");
            guest.run_ok(&format!("grep -q ' {mnt} ' /proc/mounts")).await.context("the disk was unmounted")?;
            Ok(())
        }
    };

    // A user's edit of a standalone VMI's spec: "update of VMI object is restricted".
    kubevirt.create_vm("solo", false, "127.0.0.1").await?;
    label(&vmis, "solo", opted_in.clone(), unmount.clone()).await?;
    kubevirt.create_claim("pvc-solo", &guest.new_image(16 << 20)?).await?;
    let dev = attach(&guest, &admin, "solo", "solo-data", "pvc-solo").await?;
    guest.fill(&dev, "/mnt/s", 1 << 20).await?;
    let remove = removal_patch(&vmis.get("solo").await?, "/spec", "solo-data")?;
    let (code, message) = patch(&vmis, "solo", remove, false).await?.expect_err("KubeVirt refuses a user's VMI edit");
    assert!(matches!(code, 403 | 422) && message.contains("update of VMI object is restricted"), "{code}: {message}");
    kept("solo-data", "/mnt/s").await?;
    assert!(vmis.get("solo").await?.data["spec"]["volumes"].to_string().contains("solo-data"), "the VMI keeps it");

    // A VM whose template keeps the disk but loses its volume: KubeVirt's VM admitter refuses it.
    kubevirt.create_vm("vm1", true, "127.0.0.1").await?;
    label(&vms, "vm1", opted_in, unmount).await?;
    kubevirt.create_claim("pvc-data", &guest.new_image(16 << 20)?).await?;
    let dev = attach(&guest, &admin, "vm1", "data", "pvc-data").await?;
    guest.fill(&dev, "/mnt/g", 1 << 20).await?;
    let vm = vms.get("vm1").await?;
    let mut volume_only = removal_patch(&vm, "/spec/template/spec", "data")?;
    volume_only.as_array_mut().context("a patch")?.pop();
    let (code, message) = patch(&vms, "vm1", volume_only, false).await?.expect_err("a disk without its volume");
    assert!(matches!(code, 403 | 422) && message.contains("Name 'data' not found."), "{code}: {message}");
    kept("data", "/mnt/g").await?;

    // Its template loses the disk but keeps the volume: KubeVirt admits it and unplugs nothing (the VMI keeps its
    // volume and disk), so there is nothing to release either.
    let mut disk_only = removal_patch(&vm, "/spec/template/spec", "data")?;
    disk_only.as_array_mut().context("a patch")?.remove(1);
    patch(&vms, "vm1", disk_only, false).await?.expect("a volume without its disk is admitted");
    tokio::time::sleep(Duration::from_secs(2)).await;
    kept("data", "/mnt/g").await?;
    assert!(guest.has_disk("data").await, "nothing was unplugged");

    // A dry run reaches virt-api's PATCH (`dryRun: true` in the review): the guard asks the guest and releases
    // nothing.
    let pid = guest.start_writer("/mnt/s").await?;
    let refused = removevolume(&admin, "virtualmachineinstances", "solo", "solo-data", true)
        .await
        .expect_err("a dry run of a busy disk's removal is refused");
    assert!(refused.to_string().contains(&format!("pid {pid}")), "the guard reviewed the dry run: {refused}");
    guest.stop_process(&pid).await?;
    removevolume(&admin, "virtualmachineinstances", "solo", "solo-data", true)
        .await
        .context("an idle disk's dry run")?;
    kept("solo-data", "/mnt/s").await?;
    Ok(())
}

/// A JSON patch of VM `name` in NS as the admin, sent raw to read the response's `Warning` headers (the API server
/// passes admission warnings on there): the status code and the warnings.
async fn patch_vm_warned(client: &kube::Client, name: &str, patch: serde_json::Value) -> Result<(u16, Vec<String>)> {
    let path = format!("/apis/kubevirt.io/v1/namespaces/{NS}/virtualmachines/{name}");
    let request = http::Request::patch(path)
        .header("content-type", "application/json-patch+json")
        .body(kube::client::Body::from(serde_json::to_vec(&patch)?))?;
    let response = client.send(request).await?;
    let warnings =
        response.headers().get_all("warning").iter().map(|v| v.to_str().unwrap_or_default().to_string()).collect();
    Ok((response.status().as_u16(), warnings))
}

/// `updateVolumesStrategy: Migration`: KubeVirt's declarative hot-plug leaves the running VMI alone (hotplug.go
/// `HandleDeclarativeVolumes`), so a disk that leaves the template stays plugged until the VM restarts. Nothing may
/// release it for an unplug that never comes (the guard allows the edit with a warning, the companion refuses a
/// detach it could not finish), a release that happened anyway is given back, and leaving the strategy, which
/// unplugs at once what the template lost meanwhile, is guarded like any other unplug.
#[tokio::test(flavor = "multi_thread")]
async fn a_migration_strategy_vm_keeps_its_disks_and_nothing_releases_them_for_nothing() -> Result<()> {
    let (guest, cluster, kubevirt, _operator) = guarded_lab("3").await?;
    let admin = cluster.client(ADMIN).await?;
    let vms = vms(&admin);
    let agent = guest.agent();
    kubevirt.create_vm("vm1", true, "127.0.0.1").await?;
    label(&vms, "vm1", json!({"vm.novasphere.dev/guard": "enabled"}), json!({})).await?;
    kubevirt.create_claim("pvc-data", &guest.new_image(32 << 20)?).await?;
    let dev = attach(&guest, &admin, "vm1", "data", "pvc-data").await?;
    let sum = guest.fill(&dev, "/mnt/g", 2 << 20).await?;
    let pid = guest.start_writer("/mnt/g").await?;
    let strategy = |value: serde_json::Value| {
        let vms = vms.clone();
        async move {
            let body = json!({"spec": {"updateVolumesStrategy": value}});
            vms.patch("vm1", &kube::api::PatchParams::default(), &kube::api::Patch::Merge(&body)).await
        }
    };
    let untouched = |why: &'static str| {
        let (agent, guest, pid) = (&agent, &guest, &pid);
        async move {
            let state = agent.get_disk("data", false).await?.state();
            anyhow::ensure!(state == wukong_proto::v1::DiskState::Present, "{why}: the disk is {state:?}");
            guest.run_ok(&format!("grep -q ' /mnt/g ' /proc/mounts && kill -0 {pid}")).await.context(why)?;
            Ok(())
        }
    };
    strategy(json!("Migration")).await?;

    // The companion's detach through the VM would only edit the template: refused before the guest is asked.
    let companion = KubeVirt::new(admin.clone(), NS, "vm1", false);
    let options = wukong_controller_client::companion::DetachOptions {
        volume: "data".into(),
        serial: None,
        unmount: true,
        force: false,
        timeout: Duration::from_secs(20),
        poll: Duration::from_millis(100),
    };
    let refused = wukong_controller_client::companion::detach(&companion, &agent, &options, &|_| {})
        .await
        .expect_err("a detach KubeVirt would never carry out");
    let message = refused.to_string();
    assert!(message.contains("would not hot-unplug volume 'data'"), "{message}");
    assert!(message.contains("VM guarded/vm1 has spec.updateVolumesStrategy: Migration"), "{message}");
    assert!(template_volumes(&serde_json::to_value(vms.get("vm1").await?)?).contains(&"data".to_string()));
    untouched("the companion changed nothing").await?;

    // kubectl edit: the template loses the busy disk. Not an unplug here: allowed, with a warning, the guest not
    // asked; the lab's KubeVirt (as v1.9) keeps the volume in the VMI and the disk in the guest.
    let remove = removal_patch(&vms.get("vm1").await?, "/spec/template/spec", "data")?;
    let (code, warnings) = patch_vm_warned(&admin, "vm1", remove).await?;
    assert_eq!(code, 200, "{warnings:?}");
    assert!(
        warnings.iter().any(|w| w.contains("disk 'data' (volume data) stays plugged in the running guest")),
        "the caller is told why nothing was unplugged: {warnings:?}"
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    let vmi = vmis(&admin).get("vm1").await?;
    assert!(vmi.data["spec"]["volumes"].to_string().contains("pvc-data"), "KubeVirt keeps the volume in the VMI");
    untouched("a template edit of a Migration VM").await?;

    // Leaving the strategy unplugs what the template lost: guarded, refused while the writer holds the disk.
    let refused = strategy(serde_json::Value::Null).await.expect_err("leaving Migration would unplug a busy disk");
    assert!(refused.to_string().contains("wukong guard refused to unplug disk 'data' (volume data)"), "{refused}");
    assert!(refused.to_string().contains(&format!("pid {pid}")), "{refused}");
    untouched("a refused strategy change").await?;
    guest.stop_process(&pid).await?;

    // A release KubeVirt does not follow: the guard releases the idle disk for leaving the strategy (virt-controller
    // is down meanwhile), then the strategy is back before KubeVirt acted. The disk stays plugged, so the leader
    // gives it back after the grace period (3 s).
    label(&vms, "vm1", json!({}), json!({"vm.novasphere.dev/unmount-on-detach": "true"})).await?;
    kubevirt.pause_controller(true);
    strategy(serde_json::Value::Null).await.context("the idle disk is released for leaving the strategy")?;
    assert_eq!(agent.get_disk("data", false).await?.state(), wukong_proto::v1::DiskState::Released);
    strategy(json!("Migration")).await?;
    kubevirt.pause_controller(false);
    given_back(&guest, &admin, NS, "data").await.context("a released disk KubeVirt keeps plugged")?;
    assert!(guest.has_disk("data").await, "KubeVirt kept it plugged");

    // Leaving it for good with the disk idle: released, then unplugged by KubeVirt, the data intact.
    strategy(serde_json::Value::Null).await.context("leaving Migration with an idle disk")?;
    guest.wait_unplugged("data", Duration::from_secs(60)).await?;
    // The guest deletes a released SCSI disk itself; KubeVirt's unplug follows.
    let deadline = Instant::now() + Duration::from_secs(60);
    while vmis(&admin).get("vm1").await?.data["spec"]["volumes"].to_string().contains("pvc-data") {
        anyhow::ensure!(Instant::now() < deadline, "KubeVirt never unplugged the volume after the strategy went");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let dev = attach(&guest, &admin, "vm1", "data", "pvc-data").await?;
    guest.run_ok(&format!("mount {dev} /mnt/g")).await?;
    assert_eq!(guest.checksum("/mnt/g/data").await?, sum, "the data is intact");
    Ok(())
}
