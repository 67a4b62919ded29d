//! Nothing reaches a guest on a caller's word: the admission guard through a genuine kube-apiserver, the lab's
//! KubeVirt and a QEMU guest, with reviews POSTed by a local process that is not the API server (curl). With the API
//! server's client certificate required, such a caller is turned away at the handshake; without it, a review that
//! does not match the live objects is denied by name. Either way the guest releases nothing, and the real path
//! (an update through the API server) still works. A release whose update was never stored is given back after the
//! grace period by whichever replica leads, even once the object no longer opts in.

use anyhow::{Context, Result, bail};
use kube::api::{Api, DynamicObject, PostParams};
use serde_json::{Value, json};
use std::time::{Duration, Instant};
use wukong_controller_client::kubevirt::{KubeVirt, vm_resource};
use wukong_e2e::Guest;
use wukong_e2e::cluster::{ADMIN, Cluster, WEBHOOK_CLIENT};
use wukong_e2e::kubevirt_lab::{
    API_SERVER, CONTROLLER, HANDLER, HotplugMode, KubeVirtLab, attach_claim, removal_patch, resource,
};
use wukong_e2e::operator_lab::{
    OPERATOR, events, install_operator, json_patch, label, post_review, reviews, start_guarded,
};
use wukong_proto::v1::DiskState;

const NS: &str = "trust";
const GUARD: &str = "vm.novasphere.dev/guard";
const UNMOUNT: &str = "vm.novasphere.dev/unmount-on-detach";

/// An AdmissionReview as the API server would send it for `patch` applied to `vm`, from user "mallory".
fn forged_review(vm: &DynamicObject, new: &DynamicObject) -> Value {
    json!({
        "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
        "request": {"uid": "forged-1", "kind": {"group": "kubevirt.io", "version": "v1", "kind": "VirtualMachine"},
                    "resource": {"group": "kubevirt.io", "version": "v1", "resource": "virtualmachines"},
                    "name": vm.metadata.name, "namespace": NS, "operation": "UPDATE",
                    "userInfo": {"username": "mallory"}, "object": new, "oldObject": vm, "dryRun": false},
    })
}

/// `vm` without volume `volume` (and its disk), annotated so that the guest may unmount it: what a forger sends.
fn without(vm: &DynamicObject, volume: &str) -> DynamicObject {
    let mut new = vm.clone();
    let spec = &mut new.data["spec"]["template"]["spec"];
    for path in ["/volumes", "/domain/devices/disks"] {
        if let Some(items) = spec.pointer_mut(path).and_then(Value::as_array_mut) {
            items.retain(|v| v["name"] != volume);
        }
    }
    new.metadata.annotations.get_or_insert_default().insert(UNMOUNT.into(), "true".into());
    new
}

/// The guest still has the disk, usable and mounted where it was.
async fn untouched(guest: &Guest, serial: &str, mnt: &str) -> Result<()> {
    let state = guest.agent().get_disk(serial, false).await?.state();
    anyhow::ensure!(state == DiskState::Present, "disk {serial} is {state:?}, not present");
    guest.run_ok(&format!("grep -q ' {mnt} ' /proc/mounts")).await.with_context(|| format!("{mnt} is unmounted"))?;
    Ok(())
}

/// The verdict of a review the webhook answered: (allowed, message).
fn verdict(body: &str) -> Result<(bool, String)> {
    let review: Value = serde_json::from_str(body).with_context(|| format!("an AdmissionReview: {body}"))?;
    let response = &review["response"];
    Ok((response["allowed"] == true, response["status"]["message"].as_str().unwrap_or_default().to_string()))
}

async fn wait_for(what: &str, timeout: Duration, mut done: impl AsyncFnMut() -> Result<bool>) -> Result<()> {
    let deadline = Instant::now() + timeout;
    while !done().await? {
        if Instant::now() > deadline {
            bail!("{what} did not happen within {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_review_that_is_not_the_api_servers_releases_nothing() -> Result<()> {
    let guest = Guest::boot().await?;
    let cluster = Cluster::start(&[OPERATOR, API_SERVER, CONTROLLER, HANDLER]).await?;
    let kubevirt = KubeVirtLab::start(&cluster, Some(&guest), NS, HotplugMode::Declarative).await?;
    install_operator(&cluster).await?;
    let admin = cluster.client(ADMIN).await?;
    let vms: Api<DynamicObject> = Api::namespaced_with(admin.clone(), NS, &vm_resource());
    let kv = KubeVirt::new(admin.clone(), NS, "vm1", false);
    kubevirt.create_vm("vm1", true, "127.0.0.1").await?;
    kubevirt.create_claim("pvc-data", &guest.new_image(64 << 20)?).await?;
    let dev = attach_claim(&guest, &kv, "data", "pvc-data").await?;
    let sum = guest.fill(&dev, "/mnt/t", 1 << 20).await?;

    // 1. The API server's client certificate required: a caller without it gets nothing but a refused handshake.
    let ca = cluster.webhook_client_ca();
    let ca = ca.to_str().context("a UTF-8 path")?;
    let strict = ["--webhook-client-ca", ca, "--webhook-client-names", WEBHOOK_CLIENT];
    let mut operator = start_guarded(&cluster, "strict", guest.agent_port(), &strict).await?;
    let vm = vms.get("vm1").await?;
    let refused = post_review(&operator, &forged_review(&vm, &without(&vm, "data"))).await;
    let error = refused.expect_err("a caller without the API server's certificate must be refused").to_string();
    assert!(error.contains("curl"), "{error}");
    untouched(&guest, "data", "/mnt/t").await?;
    let log = operator.log();
    assert!(
        log.lines().any(|l| l.contains("webhook TLS handshake refused") && l.contains("127.0.0.1:")),
        "the refusal is logged with the caller's address:\n{log}"
    );
    // The real path: the API server presents its certificate, and the guarded unplug goes through.
    label(&vms, "vm1", json!({GUARD: "enabled"}), json!({UNMOUNT: "true"})).await?;
    let remove = removal_patch(&vms.get("vm1").await?, "/spec/template/spec", "data")?;
    json_patch(&vms, "vm1", remove, false).await?.expect("the API server's own review is answered");
    guest.wait_unplugged("data", Duration::from_secs(60)).await?;
    operator.kill();

    // 2. No client certificate required: every review is checked against the live objects first.
    let mut operator = start_guarded(&cluster, "open", guest.agent_port(), &["--guard-grace-seconds", "3"]).await?;
    let dev = attach_claim(&guest, &kv, "data", "pvc-data").await?;
    guest.run_ok(&format!("mount {dev} /mnt/t")).await?;
    label(&vms, "vm1", json!({GUARD: null}), json!({})).await?;
    let vm = vms.get("vm1").await?;
    let (code, body) = post_review(&operator, &forged_review(&vm, &without(&vm, "data"))).await?;
    let (allowed, message) = verdict(&body)?;
    assert!(code == 200 && !allowed, "{code}: {body}");
    assert!(message.contains("VirtualMachine trust/vm1 has not opted in to the guard"), "{message}");
    untouched(&guest, "data", "/mnt/t").await?;

    label(&vms, "vm1", json!({GUARD: "enabled"}), json!({})).await?;
    let vm = vms.get("vm1").await?;
    let mut stale = vm.clone();
    stale.metadata.resource_version = Some("1".into());
    let (_, body) = post_review(&operator, &forged_review(&stale, &without(&stale, "data"))).await?;
    let (allowed, message) = verdict(&body)?;
    assert!(!allowed && message.contains("the review's oldObject is at 1"), "{message}");
    untouched(&guest, "data", "/mnt/t").await?;

    let mut invented = vm.clone();
    invented.data["spec"]["template"]["spec"]["volumes"][1]["persistentVolumeClaim"]["claimName"] = json!("other");
    let (_, body) = post_review(&operator, &forged_review(&invented, &without(&invented, "data"))).await?;
    let (allowed, message) = verdict(&body)?;
    assert!(!allowed && message.contains("volume data of the review's oldObject is not in the stored"), "{message}");
    untouched(&guest, "data", "/mnt/t").await?;
    let log = operator.log();
    let logged = log.lines().filter(|l| l.contains("review does not match the live objects"));
    assert_eq!(logged.filter(|l| l.contains("127.0.0.1:")).count(), 3, "each denial names its caller:\n{log}");
    let (_, metrics) = operator.get("/metrics").await?;
    assert!(metrics.contains("wukong_operator_admission_untrusted_refused_total 3"), "{metrics}");

    // 3. A release whose update is never stored (here another webhook fails it: they run in parallel) is recorded
    // in the cluster; another replica gives the disk back after the grace period although the VM no longer opts in.
    let namespaces = Api::<DynamicObject>::all_with(admin.clone(), &resource("Namespace", "", "v1", "namespaces"));
    label(&namespaces, NS, json!({"lab.wukong/unreachable-webhook": "on"}), json!({})).await?;
    let failing = json!({
        "apiVersion": "admissionregistration.k8s.io/v1", "kind": "ValidatingWebhookConfiguration",
        "metadata": {"name": "lab-unreachable"},
        "webhooks": [{"name": "unreachable.lab.wukong", "admissionReviewVersions": ["v1"], "sideEffects": "None",
                      "failurePolicy": "Fail", "timeoutSeconds": 5,
                      "clientConfig": {"url": format!("https://{}/never", wukong_e2e::ports::free_address()?)},
                      "namespaceSelector": {"matchLabels": {"lab.wukong/unreachable-webhook": "on"}},
                      "rules": [{"apiGroups": ["kubevirt.io"], "apiVersions": ["*"], "operations": ["UPDATE"],
                                 "resources": ["virtualmachines"]}]}],
    });
    wukong_e2e::operator_lab::webhook_configurations(&admin)
        .create(&PostParams::default(), &serde_json::from_value(failing)?)
        .await?;
    let remove = removal_patch(&vms.get("vm1").await?, "/spec/template/spec", "data")?;
    let (_, message) = json_patch(&vms, "vm1", remove, false).await?.expect_err("not stored");
    assert!(message.contains("unreachable.lab.wukong"), "{message}");
    anyhow::ensure!(guest.agent().get_disk("data", false).await?.state() == DiskState::Released);
    let records = Api::<DynamicObject>::namespaced_with(
        admin.clone(),
        "wukong-system",
        &resource("ConfigMap", "", "v1", "configmaps"),
    );
    let recorded =
        records.list(&kube::api::ListParams::default().labels("vm.novasphere.dev/guard-release=true")).await?;
    assert_eq!(recorded.items.len(), 1, "the release is recorded in the cluster");
    operator.kill();
    label(&namespaces, NS, json!({"lab.wukong/unreachable-webhook": null}), json!({})).await?;
    let successor = start_guarded(&cluster, "successor", guest.agent_port(), &["--guard-grace-seconds", "3"]).await?;
    // Another guarded VM whose guest nobody can reach: the leader's passes skip it and still give vm1's disk back.
    kubevirt.create_vm("ghost", true, "127.0.0.66").await?;
    label(&vms, "ghost", json!({GUARD: "enabled"}), json!({})).await?;
    label(&vms, "vm1", json!({GUARD: null}), json!({})).await?;
    // The successor leads once the killed replica's Lease runs out (15 s), then waits the grace period.
    wait_for("the give-back of the released disk", Duration::from_secs(90), async || {
        // Given back, a SCSI disk is scanned in again: absent from the guest for a moment.
        Ok(guest.agent().get_disk("data", false).await.is_ok_and(|d| d.state() == DiskState::Present))
    })
    .await?;
    untouched(&guest, "data", "/mnt/t").await?;
    assert_eq!(guest.checksum("/mnt/t/data").await?, sum, "the data is intact");
    let given = events(&admin, NS).await?;
    assert!(given.iter().any(|e| e.data["reason"] == "ReleaseCancelled"), "{given:#?}");
    let recorded =
        records.list(&kube::api::ListParams::default().labels("vm.novasphere.dev/guard-release=true")).await?;
    assert!(recorded.items.is_empty(), "the record is forgotten: {:?}", recorded.items);
    let (_, metrics) = successor.get("/metrics").await?;
    assert!(metrics.contains("wukong_operator_guard_releases_given_back_total 1"), "{metrics}");
    let unreachable = metrics
        .lines()
        .find_map(|l| l.strip_prefix("wukong_operator_guard_release_watch_errors_total{reason=\"agent\"} "))
        .and_then(|n| n.parse::<u64>().ok());
    assert!(unreachable.is_some_and(|n| n >= 1), "the unreachable guest is counted and skipped:\n{metrics}");

    // 4. Opted out in an opted-in namespace (a VM without an agent): its updates never reach the guard.
    label(&namespaces, NS, json!({GUARD: "enabled"}), json!({})).await?;
    kubevirt.create_stopped_vm("windows").await?;
    label(&vms, "windows", json!({GUARD: "disabled"}), json!({})).await?;
    let add = json!([
        {"op": "add", "path": "/spec/template/spec/volumes/-",
         "value": {"name": "x", "persistentVolumeClaim": {"claimName": "pvc-x", "hotpluggable": true}}},
        {"op": "add", "path": "/spec/template/spec/domain/devices/disks/-", "value": {"name": "x", "disk": {"bus": "scsi"}}},
    ]);
    json_patch(&vms, "windows", add.clone(), false).await?.expect("an addition");
    let before = reviews(&successor).await?;
    let remove = removal_patch(&vms.get("windows").await?, "/spec/template/spec", "x")?;
    json_patch(&vms, "windows", remove, false).await?.expect("an opted-out VM's removal is not the guard's");
    assert_eq!(reviews(&successor).await?, before, "the guard is not called for an opted-out VM");
    label(&vms, "windows", json!({GUARD: null}), json!({})).await?;
    json_patch(&vms, "windows", add, false).await?.expect("an addition");
    let remove = removal_patch(&vms.get("windows").await?, "/spec/template/spec", "x")?;
    json_patch(&vms, "windows", remove, false).await?.expect("stopped: nothing is plugged");
    assert!(reviews(&successor).await? > before, "without the opt-out the namespace's label brings it to the guard");

    // 5. A release never outlives its review: a udev probe that never ends after the unmount keeps the agent from
    // finishing within the guard's deadline; the agent puts everything back before it answers, so when the API
    // server hands out the denial the disk is already mounted again.
    let _strict_deadline =
        start_guarded(&cluster, "deadline", guest.agent_port(), &["--guard-release-deadline-seconds", "3"]).await?;
    let dev = guest.agent().get_disk("data", false).await?.dev_node;
    // A slow unmount lets the probe hold the disk before the agent's final scan however the guest schedules it (a
    // CI run saw the release finish first without it).
    guest.slow_unmount("/mnt/t", 32 << 20).await?;
    guest.probe_after_unmount(&dev, "/mnt/t").await?;
    let remove = removal_patch(&vms.get("vm1").await?, "/spec/template/spec", "data")?;
    let (code, message) = json_patch(&vms, "vm1", remove, false).await?.expect_err("the release cannot finish");
    let denied = Instant::now();
    assert!(
        code == 403 && message.contains("could not release disk 'data' (volume data) of VMI trust/vm1 within 3s"),
        "{code}: {message}"
    );
    untouched(&guest, "data", "/mnt/t").await?;
    let back = denied.elapsed();
    assert!(back < Duration::from_secs(1), "the disk was back {back:?} after the denial");
    println!("deadline: denied {code}, disk present and mounted {back:?} after the denial");
    guest.run_ok("kill $(cat /tmp/probe/pid)").await?;
    let recorded =
        records.list(&kube::api::ListParams::default().labels("vm.novasphere.dev/guard-release=true")).await?;
    assert!(recorded.items.is_empty(), "a refused release is forgotten at once: {:?}", recorded.items);

    // 6. SIGTERM: nothing under way, so the replica steps down, answers on for the shutdown delay (5 s) while it
    // leaves the Service, and exits cleanly.
    // During the delay it is unready but still reviews as usual (a review that unplugs nothing is allowed, not
    // turned away with "retry"): the Service is still taking it out.
    let mut successor = successor;
    let vm = vms.get("vm1").await?;
    let sent = Instant::now();
    successor.send_sigterm()?;
    while successor.get("/readyz").await?.0 == 200 {
        anyhow::ensure!(sent.elapsed() < Duration::from_secs(1), "still ready a second after SIGTERM");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (code, body) = post_review(&successor, &forged_review(&vm, &vm)).await?;
    assert!(code == 200 && body.contains("\"allowed\":true"), "{code}: {body}");
    let status = successor.wait_exit(Duration::from_secs(15)).await?;
    assert!(status.success(), "{status}");
    let took = sent.elapsed();
    assert!(took >= Duration::from_millis(4500), "the shutdown delay (5 s) was kept: exited after {took:?}");
    let log = successor.log();
    assert!(log.contains("every admission review under way was answered"), "{log}");
    Ok(())
}
