//! Records the AdmissionReviews a genuine kube-apiserver sends a validating webhook for the VirtualMachine and
//! VirtualMachineInstance updates KubeVirt and its users make, into `operator/tests/fixtures/reviews/` (where
//! `operator/tests/match_conditions.rs` evaluates deploy/guard.yaml's matchConditions against them).
//!
//! The webhook registered here has the guard's rules (UPDATE of `kubevirt.io` virtualmachines and
//! virtualmachineinstances) but no selector and no matchConditions (the lab's 1.20 server would ignore them), and
//! allows everything: it only keeps each body as the API server sent it. The objects are stored with KubeVirt's
//! schemas (so they are pruned and validated as in a cluster with KubeVirt) and, as in KubeVirt, the VMI has no
//! status subresource: virt-handler's status writes are plain UPDATEs. virt-handler, virt-controller and virt-api
//! act through real ServiceAccount tokens (TokenRequest), so `userInfo` is what a cluster sends for them.
//!
//! Run: `cargo run -p wukong-e2e --bin record-reviews` (after `scripts/lib/install-kube.sh`); the fixtures are
//! committed, so the operator's tests need no cluster.

use anyhow::{Context, Result, bail};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use k8s_openapi::api::authentication::v1::TokenRequest;
use k8s_openapi::api::core::v1::ServiceAccount;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, DynamicObject, Patch, PatchParams, PostParams};
use serde_json::{Value, json};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use wukong_e2e::cluster::{ADMIN, Ca, Cluster};
use wukong_e2e::kubevirt_lab::{removal_patch, resource};

/// The namespace of the lab's objects.
const NS: &str = "lab";
/// KubeVirt's namespace in the upstream install, whose ServiceAccounts its components run as.
const KUBEVIRT_NS: &str = "kubevirt";
/// How long a new CRD may take to be served, or a new webhook to be called (the API server's informers pick them
/// up).
const REGISTER_TIMEOUT: Duration = Duration::from_secs(30);

type Recorded = Arc<Mutex<Vec<Value>>>;

#[tokio::main]
async fn main() -> Result<()> {
    let out = std::env::args()
        .nth(1)
        .map(PathBuf::from)
        .unwrap_or_else(|| wukong_e2e::workspace_root().join("operator/tests/fixtures/reviews"));
    std::fs::create_dir_all(&out)?;
    let cluster = Cluster::start(&[]).await?;
    let admin = cluster.client(ADMIN).await?;
    install_crds(&admin).await?;
    for ns in [NS, KUBEVIRT_NS] {
        let namespaces = Api::<DynamicObject>::all_with(admin.clone(), &resource("Namespace", "", "v1", "namespaces"));
        namespaces.create(&PostParams::default(), &serde_json::from_value(json!({"metadata": {"name": ns}}))?).await?;
    }
    let handler = component(&cluster, &admin, "kubevirt-handler").await?;
    let controller = component(&cluster, &admin, "kubevirt-controller").await?;
    let virt_api = component(&cluster, &admin, "kubevirt-apiserver").await?;
    let recorded = serve_recorder(&admin).await?;

    let vms = |c: &kube::Client| {
        Api::<DynamicObject>::namespaced_with(
            c.clone(),
            NS,
            &resource("VirtualMachine", "kubevirt.io", "v1", "virtualmachines"),
        )
    };
    let vmis = |c: &kube::Client| {
        let r = resource("VirtualMachineInstance", "kubevirt.io", "v1", "virtualmachineinstances");
        Api::<DynamicObject>::namespaced_with(c.clone(), NS, &r)
    };
    create_objects(&vms(&admin), &vmis(&admin)).await?;
    wait_registered(&vms(&admin), &recorded).await?;

    // Each write below calls the webhook; its review is kept under `name`. A patch right after another write may
    // first be tried on the API server's cached, stale copy: storing that fails on the resourceVersion and the
    // server tries again with the stored object, calling the webhook again. The last call is the one stored.
    let save = |name: &str| -> Result<()> {
        let reviews = std::mem::take(&mut *recorded.lock().unwrap());
        let review = reviews.last().with_context(|| format!("{name}: the webhook was not called"))?;
        let path = out.join(format!("{name}.json"));
        std::fs::write(&path, serde_json::to_string_pretty(review)? + "\n")?;
        println!(
            "recorded {}{}",
            path.display(),
            if reviews.len() > 1 { " (the last of a retried write)" } else { "" }
        );
        Ok(())
    };
    let merge = PatchParams::default();

    // virt-handler's status write: a read-modify-write of the whole VMI (no status subresource).
    let mut vmi = vmis(&handler).get("vm1").await?;
    vmi.data["status"]["volumeStatus"] = json!([
        {"name": "rootdisk", "target": "vda"},
        {"name": "data", "target": "sda", "phase": "Ready", "reason": "VolumeReady",
         "message": "Successfully attach hotplugged volume data to VM",
         "hotplugVolume": {"attachPodName": "hp-volume-abcde", "attachPodUID": "0b5e6a1c-5f0e-4a3e-9a7e-2f0c1d2e3f40"}},
    ]);
    vmi.data["status"]["interfaces"] = json!([{"name": "default", "ipAddress": "10.244.0.17",
                                               "ipAddresses": ["10.244.0.17"], "mac": "52:54:00:12:34:56"}]);
    vmis(&handler).replace("vm1", &PostParams::default(), &vmi).await?;
    save("vmi-status-by-virt-handler")?;

    // virt-controller's labels, annotations and finalizers on the VMI (its metadata, never the spec).
    let metadata = json!({"metadata": {"labels": {"kubevirt.io/nodeName": "node-1"},
        "annotations": {"kubevirt.io/latest-observed-api-version": "v1"},
        "finalizers": ["kubevirt.io/virtualMachineControllerFinalize", "foregroundDeleteVirtualMachine"]}});
    vmis(&controller).patch("vm1", &merge, &Patch::Merge(&metadata)).await?;
    save("vmi-metadata-by-virt-controller")?;

    // A user labels and annotates the VM (opting it into the guard, say).
    let labels = json!({"metadata": {"labels": {"vm.novasphere.dev/guard": "enabled"},
        "annotations": {"vm.novasphere.dev/unmount-on-detach": "true"}}});
    vms(&admin).patch("vm1", &merge, &Patch::Merge(&labels)).await?;
    save("vm-labels-by-user")?;

    // The same for a VM with no volume and no disk at all, and virt-handler's status write to its VMI.
    vms(&admin).patch("bare", &merge, &Patch::Merge(&labels)).await?;
    save("bare-vm-labels-by-user")?;
    let mut bare = vmis(&handler).get("bare").await?;
    bare.data["status"]["phase"] = json!("Running");
    vmis(&handler).replace("bare", &PostParams::default(), &bare).await?;
    save("bare-vmi-status-by-virt-handler")?;

    // Changes to the VM's template volumes and disks, as `kubectl edit` or a GitOps sync sends them; each one
    // undone afterwards (that write unrecorded), so the next starts from the same VM.
    let base = "/spec/template/spec";
    let vm = vms(&admin).get("vm1").await?;
    let template = &vm.data["spec"]["template"]["spec"];
    let (volume, disk) = (volume_index(template, "data")?, disk_index(template, "data")?);
    let added = json!([
        {"op": "add", "path": format!("{base}/volumes/-"),
         "value": {"name": "scratch", "persistentVolumeClaim": {"claimName": "pvc-scratch", "hotpluggable": true}}},
        {"op": "add", "path": format!("{base}/domain/devices/disks/-"),
         "value": {"name": "scratch", "serial": "scratch", "disk": {"bus": "scsi"}}},
    ]);
    let claim = format!("{base}/volumes/{volume}/persistentVolumeClaim/claimName");
    for (name, ops) in [
        ("vm-volume-removed-by-user", removal_patch(&vm, base, "data")?),
        ("vm-disk-removed-by-user", json!([{"op": "remove", "path": format!("{base}/domain/devices/disks/{disk}")}])),
        ("vm-claim-changed-by-user", json!([{"op": "replace", "path": claim, "value": "pvc-other"}])),
        ("vm-volume-added-by-user", added),
    ] {
        json_patch(&vms(&admin), "vm1", ops).await?;
        save(name)?;
        let undo = json!({"spec": {"template": {"spec": template}}});
        vms(&admin).patch("vm1", &merge, &Patch::Merge(&undo)).await?;
        recorded.lock().unwrap().clear();
    }

    // virt-api's removevolume on a VM (DeclarativeHotplugVolumes): it patches the VM's template.
    json_patch(&vms(&virt_api), "vm1", removal_patch(&vm, base, "logs")?).await?;
    save("vm-volume-removed-by-virt-api")?;
    // virt-controller's declarative hot-plug then drops the volume from the VMI (HandleDeclarativeVolumes).
    let vmi = vmis(&controller).get("vm1").await?;
    json_patch(&vmis(&controller), "vm1", removal_patch(&vmi, "/spec", "logs")?).await?;
    save("vmi-volume-removed-by-virt-controller")?;
    Ok(())
}

/// KubeVirt's CRDs as the lab generates them, but the VMI's without the status subresource, as KubeVirt's own
/// (`NewVirtualMachineInstanceCrd`).
async fn install_crds(admin: &kube::Client) -> Result<()> {
    use kube::runtime::wait::{await_condition, conditions::is_crd_established};
    let api: Api<CustomResourceDefinition> = Api::all(admin.clone());
    for mut crd in wukong_e2e::kubevirt_crds::crds()? {
        if crd.spec.names.kind == "VirtualMachineInstance" {
            crd.spec.versions.iter_mut().for_each(|v| v.subresources = None);
        }
        let name = crd.metadata.name.clone().context("a CRD without a name")?;
        api.create(&PostParams::default(), &crd).await?;
        let established = await_condition(api.clone(), &name, is_crd_established());
        tokio::time::timeout(REGISTER_TIMEOUT, established).await.with_context(|| format!("the CRD {name}"))??;
    }
    Ok(())
}

/// A client acting as KubeVirt's ServiceAccount `name` (bound to cluster-admin: only its identity matters here),
/// through a token from the TokenRequest API, as the component's pod gets one.
async fn component(cluster: &Cluster, admin: &kube::Client, name: &str) -> Result<kube::Client> {
    let accounts: Api<ServiceAccount> = Api::namespaced(admin.clone(), KUBEVIRT_NS);
    accounts.create(&PostParams::default(), &serde_json::from_value(json!({"metadata": {"name": name}}))?).await?;
    let bindings = Api::<DynamicObject>::all_with(
        admin.clone(),
        &resource("ClusterRoleBinding", "rbac.authorization.k8s.io", "v1", "clusterrolebindings"),
    );
    let binding = json!({
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding", "metadata": {"name": name},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "cluster-admin"},
        "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": KUBEVIRT_NS}],
    });
    bindings.create(&PostParams::default(), &serde_json::from_value(binding)?).await?;
    let request: TokenRequest = serde_json::from_value(json!({"spec": {"audiences": []}}))?;
    let token = accounts.create_token_request(name, &PostParams::default(), &request).await?;
    let token = token.status.and_then(|s| s.token).context("a TokenRequest answered without a token")?;
    let kubeconfig = kube::config::Kubeconfig::read_from(cluster.kubeconfig(ADMIN)?)?;
    let mut config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default()).await?;
    config.auth_info.token = Some(token.into());
    Ok(kube::Client::try_from(config)?)
}

/// The VM `vm1` (a boot disk and two hot-plugged disks, a claim and a DataVolume, in its template) and its VMI,
/// shaped as the lab's KubeVirt makes them; and `bare`, a VM and VMI with no volume and no disk at all.
async fn create_objects(vms: &Api<DynamicObject>, vmis: &Api<DynamicObject>) -> Result<()> {
    let spec = json!({
        "domain": {"devices": {"disks": [
            {"name": "rootdisk", "disk": {"bus": "virtio"}},
            {"name": "data", "serial": "data", "disk": {"bus": "scsi"}},
            {"name": "logs", "serial": "logs", "disk": {"bus": "scsi"}},
        ]}, "memory": {"guest": "512Mi"}},
        "volumes": [
            {"name": "rootdisk", "containerDisk": {"image": "quay.io/containerdisks/debian:12"}},
            {"name": "data", "persistentVolumeClaim": {"claimName": "pvc-data", "hotpluggable": true}},
            {"name": "logs", "dataVolume": {"name": "dv-logs", "hotpluggable": true}},
        ],
    });
    let bare = json!({"domain": {"devices": {}, "memory": {"guest": "512Mi"}}});
    for (name, spec) in [("vm1", spec), ("bare", bare)] {
        let vm = json!({
            "apiVersion": "kubevirt.io/v1", "kind": "VirtualMachine", "metadata": {"name": name},
            "spec": {"runStrategy": "Always",
                     "template": {"metadata": {"labels": {"kubevirt.io/vm": name}}, "spec": spec}},
        });
        let vm = vms.create(&PostParams::default(), &serde_json::from_value(vm)?).await?;
        let vmi = json!({
            "apiVersion": "kubevirt.io/v1", "kind": "VirtualMachineInstance",
            "metadata": {"name": name, "labels": {"kubevirt.io/vm": name},
                         "ownerReferences": [{"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachine", "name": name,
                                              "uid": vm.metadata.uid, "controller": true, "blockOwnerDeletion": true}]},
            "spec": spec,
            "status": {"phase": "Scheduled", "nodeName": "node-1"},
        });
        vmis.create(&PostParams::default(), &serde_json::from_value(vmi)?).await?;
    }
    Ok(())
}

async fn json_patch(api: &Api<DynamicObject>, name: &str, ops: Value) -> Result<()> {
    let ops: json_patch::Patch = serde_json::from_value(ops)?;
    api.patch(name, &PatchParams::default(), &Patch::<()>::Json(ops)).await?;
    Ok(())
}

fn index_of(list: &Value, name: &str, what: &str) -> Result<usize> {
    list.as_array().and_then(|l| l.iter().position(|v| v["name"] == name)).with_context(|| format!("{what} {name}"))
}

fn volume_index(spec: &Value, name: &str) -> Result<usize> {
    index_of(&spec["volumes"], name, "volume")
}

fn disk_index(spec: &Value, name: &str) -> Result<usize> {
    index_of(&spec["domain"]["devices"]["disks"], name, "disk")
}

/// Serves the recording webhook on loopback and registers it; returns what it records.
async fn serve_recorder(admin: &kube::Client) -> Result<Recorded> {
    use base64::Engine;
    let ca = Ca::new("wukong review recorder CA")?;
    let leaf = ca.leaf("recorder", &["127.0.0.1"], rcgen::ExtendedKeyUsagePurpose::ServerAuth)?;
    let acceptor = leaf.tls_acceptor()?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    let recorded = Recorded::default();
    let keep = recorded.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let (acceptor, keep) = (acceptor.clone(), keep.clone());
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(stream).await else { return };
                let service = hyper::service::service_fn(move |request| answer(keep.clone(), request));
                let io = hyper_util::rt::TokioIo::new(tls);
                let _ = hyper::server::conn::http1::Builder::new().serve_connection(io, service).await;
            });
        }
    });
    let webhook = json!({
        "apiVersion": "admissionregistration.k8s.io/v1", "kind": "ValidatingWebhookConfiguration",
        "metadata": {"name": "review-recorder"},
        "webhooks": [{
            "name": "recorder.lab.wukong.invalid", "admissionReviewVersions": ["v1"], "sideEffects": "None",
            "failurePolicy": "Fail", "matchPolicy": "Equivalent", "timeoutSeconds": 10,
            "clientConfig": {"url": format!("https://127.0.0.1:{port}/record"),
                             "caBundle": base64::engine::general_purpose::STANDARD.encode(&ca.pem)},
            "rules": [{"apiGroups": ["kubevirt.io"], "apiVersions": ["*"], "operations": ["UPDATE"],
                       "resources": ["virtualmachines", "virtualmachineinstances"], "scope": "Namespaced"}],
        }],
    });
    let r = resource(
        "ValidatingWebhookConfiguration",
        "admissionregistration.k8s.io",
        "v1",
        "validatingwebhookconfigurations",
    );
    Api::<DynamicObject>::all_with(admin.clone(), &r)
        .create(&PostParams::default(), &serde_json::from_value(webhook)?)
        .await?;
    Ok(recorded)
}

/// Keeps the review and allows the request.
async fn answer(
    recorded: Recorded,
    request: hyper::Request<hyper::body::Incoming>,
) -> Result<hyper::Response<Full<Bytes>>, hyper::Error> {
    let body = request.into_body().collect().await?.to_bytes();
    let review: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let uid = review["request"]["uid"].clone();
    recorded.lock().unwrap().push(review);
    let response = json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
                          "response": {"uid": uid, "allowed": true}});
    Ok(hyper::Response::new(Full::new(Bytes::from(response.to_string()))))
}

/// Waits until the API server calls the new webhook (a VM annotation written until it does), then forgets those
/// calls.
async fn wait_registered(vms: &Api<DynamicObject>, recorded: &Recorded) -> Result<()> {
    let started = Instant::now();
    for round in 0.. {
        let probe = json!({"metadata": {"annotations": {"lab.wukong.invalid/probe": round.to_string()}}});
        vms.patch("vm1", &PatchParams::default(), &Patch::Merge(&probe)).await?;
        if !recorded.lock().unwrap().is_empty() {
            break;
        }
        if started.elapsed() > REGISTER_TIMEOUT {
            bail!("the API server never called the recording webhook");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Its annotation removed again, so the recorded VM carries nothing of the probe's.
    let clear = json!({"metadata": {"annotations": {"lab.wukong.invalid/probe": null}}});
    vms.patch("vm1", &PatchParams::default(), &Patch::Merge(&clear)).await?;
    recorded.lock().unwrap().clear();
    Ok(())
}
