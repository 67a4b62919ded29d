//! The KubeVirt backend against recorded, schema-true KubeVirt API exchanges (kube-rs over a `tower-test` mock, as
//! kube-rs' own tests do), only for the answers the lab's real API server and KubeVirt cannot produce on demand:
//! every error status KubeVirt sends (500s, admission 422s, the feature-gate 400), the concurrent-modification
//! 422 that virtctl retries, and a DataVolume body. Everything else runs through the real API server
//! (`tests/tests/kubevirt_cluster.rs`).

use http::{Method, Request, Response};
use kube::client::Body;
use serde_json::{Value, json};
use std::sync::{Arc, Mutex};
use tower_test::mock;
use wukong_controller_client::hypervisor::{DiskBus, Hypervisor, HypervisorError, VolumeSource, VolumeSpec};
use wukong_controller_client::kubevirt::{HotplugMode, KubeVirt, Route};

const SUBRESOURCES: &str = "/apis/subresources.kubevirt.io/v1/namespaces/ns1";

/// One request as the API server saw it.
#[derive(Debug, Clone, PartialEq)]
struct Seen {
    method: Method,
    path: String,
    body: Option<Value>,
}

type Responder = Box<dyn FnMut(&Seen) -> (u16, String) + Send>;

/// A kube client whose API server is `respond`; returns what it was asked.
fn api(mut respond: Responder) -> (kube::Client, Arc<Mutex<Vec<Seen>>>) {
    let (service, mut handle) = mock::pair::<Request<Body>, Response<Body>>();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    tokio::spawn(async move {
        while let Some((request, send)) = handle.next_request().await {
            let method = request.method().clone();
            let path = request.uri().path().to_string();
            if method == Method::PUT {
                assert_eq!(request.headers()[http::header::CONTENT_TYPE], "application/json");
            }
            let bytes = request.into_body().collect_bytes().await.unwrap();
            let body = (!bytes.is_empty()).then(|| serde_json::from_slice(&bytes).expect("JSON bodies"));
            let s = Seen { method, path, body };
            let (status, text) = respond(&s);
            log.lock().unwrap().push(s);
            send.send_response(Response::builder().status(status).body(Body::from(text.into_bytes())).unwrap());
        }
    });
    (kube::Client::new(service, "default"), seen)
}

/// A `metav1.Status` failure, as KubeVirt's API server sends it.
fn status(code: u16, reason: &str, message: &str) -> (u16, String) {
    let body = json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                      "message": message, "reason": reason, "code": code});
    (code, body.to_string())
}

/// A running VMI; `data1` is in its spec when `in_spec`, with a volume status of `phase`/`target` when given.
fn vmi(in_spec: bool, data1: Option<(&str, &str)>) -> (u16, String) {
    let mut disks = vec![json!({"name": "rootdisk", "disk": {"bus": "virtio"}})];
    let mut volumes = vec![json!({"name": "rootdisk", "containerDisk": {"image": "quay.io/containerdisks/debian:12"}})];
    let mut statuses = vec![json!({"name": "rootdisk", "target": "vda"})];
    if in_spec {
        disks.push(json!({"name": "data1", "serial": "data1", "disk": {"bus": "scsi"}}));
        volumes.push(json!({"name": "data1", "persistentVolumeClaim": {"claimName": "pvc-a", "hotpluggable": true}}));
    }
    if let Some((phase, target)) = data1 {
        let (reason, message) = match phase {
            "Ready" => ("VolumeReady", "Successfully attach hotplugged volume data1 to VM"),
            "Bound" => ("PVCBound", "PVC is in phase Bound"),
            _ => ("", ""),
        };
        statuses.push(json!({"name": "data1", "target": target, "phase": phase, "reason": reason,
                             "message": message,
                             "hotplugVolume": {"attachPodName": "hp-volume-x7k2p", "attachPodUID": "5d0c…"},
                             "persistentVolumeClaimInfo": {"accessModes": ["ReadWriteOnce"], "volumeMode": "Filesystem"}}));
    }
    let body = json!({
        "apiVersion": "kubevirt.io/v1", "kind": "VirtualMachineInstance",
        "metadata": {"name": "vm1", "namespace": "ns1", "uid": "8f5c4a76-…"},
        "spec": {"domain": {"devices": {"disks": disks}, "resources": {"requests": {"memory": "1Gi"}}}, "volumes": volumes},
        "status": {"phase": "Running", "volumeStatus": statuses,
                   "interfaces": [{"name": "default", "interfaceName": "eth0", "ipAddress": "10.244.1.17",
                                   "ipAddresses": ["10.244.1.17"], "mac": "02:42:ac:11:00:02", "infoSource": "domain, guest-agent"}]}
    });
    (200, body.to_string())
}

fn pvc_volume() -> VolumeSpec {
    VolumeSpec {
        name: "data1".into(),
        serial: "data1".into(),
        bus: DiskBus::Scsi,
        source: VolumeSource::PersistentVolumeClaim("pvc-a".into()),
    }
}

fn accepted() -> (u16, String) {
    (202, String::new())
}

#[tokio::test]
async fn persist_uses_the_vm_subresources_and_any_2xx_is_success() {
    let (client, seen) = api(Box::new(|_| (200, "{}".into())));
    let vm = KubeVirt::new(client, "ns1", "vm1", true);
    let mut volume = pvc_volume();
    volume.source = VolumeSource::DataVolume("dv-a".into());
    volume.bus = DiskBus::Virtio;
    vm.add_volume(&volume).await.unwrap();
    vm.remove_volume("data1").await.unwrap();
    // The hot-plug requests (add_volume reads the VMI first: one without hot-plug is refused before any request).
    let seen: Vec<_> = seen.lock().unwrap().iter().filter(|r| r.path.starts_with(SUBRESOURCES)).cloned().collect();
    assert_eq!(seen[0].path, format!("{SUBRESOURCES}/virtualmachines/vm1/addvolume"));
    assert_eq!(
        seen[0].body,
        Some(json!({"name": "data1", "disk": {"name": "data1", "serial": "data1", "disk": {"bus": "virtio"}},
                    "volumeSource": {"dataVolume": {"name": "dv-a", "hotpluggable": true}}}))
    );
    assert_eq!(seen[1].path, format!("{SUBRESOURCES}/virtualmachines/vm1/removevolume"));
    assert_eq!(seen[1].body, Some(json!({"name": "data1"})));
}

#[tokio::test]
async fn every_error_status_is_a_named_error_with_kubevirts_message() {
    let cases = [
        (status(404, "NotFound", "virtualmachineinstance.kubevirt.io \"vm1\" not found"), "NotFound"),
        (status(409, "Conflict", "VMI is not running"), "Conflict"),
        (
            status(409, "Conflict", "Unable to add volume [data1] because volume with that name already exists"),
            "Conflict",
        ),
        (status(409, "Conflict", "Unable to remove volume [data1] because it does not exist"), "Conflict"),
        (
            status(
                400,
                "BadRequest",
                "Enable DeclarativeHotplugVolumes or HotplugVolumes feature gate to use this API.",
            ),
            "Invalid",
        ),
        (status(422, "Invalid", "admission webhook denied the request: bus sata is not supported"), "Invalid"),
        (status(500, "InternalError", "unable to patch vmi: etcdserver: request timed out"), "Server"),
    ];
    for ((code, body), kind) in cases {
        let text = body.clone();
        // A standalone VMI, so the request that fails is the removevolume itself.
        let (client, seen) =
            api(Box::new(move |s| if s.method == Method::GET { vmi(false, None) } else { (code, text.clone()) }));
        let err = KubeVirt::new(client, "ns1", "vm1", false).remove_volume("data1").await.unwrap_err();
        let message: Value = serde_json::from_str(&body).unwrap();
        let message = message["message"].as_str().unwrap();
        let named = match &err {
            HypervisorError::NotFound { .. } => "NotFound",
            HypervisorError::Conflict { .. } => "Conflict",
            HypervisorError::Invalid { .. } => "Invalid",
            HypervisorError::Server { code: 500, .. } => "Server",
            other => panic!("{code}: unexpected {other:?}"),
        };
        assert_eq!(named, kind, "{code}: {err}");
        assert!(err.to_string().contains(message) && err.to_string().contains("VMI ns1/vm1"), "{err}");
        assert_eq!(seen.lock().unwrap().iter().filter(|s| s.method == Method::PUT).count(), 1, "{code} is not retried");
    }
}

#[tokio::test]
async fn a_concurrent_modification_422_is_retried_until_accepted() {
    let mut n = 0;
    let (client, seen) = api(Box::new(move |s| {
        if s.method == Method::GET {
            return vmi(false, None);
        }
        n += 1;
        if n < 3 {
            status(422, "Invalid", "the server rejected our request due to an error in our request")
        } else {
            accepted()
        }
    }));
    KubeVirt::new(client, "ns1", "vm1", false).add_volume(&pvc_volume()).await.unwrap();
    assert_eq!(seen.lock().unwrap().iter().filter(|s| s.method == Method::PUT).count(), 3);
}

/// A caller that may not list `KubeVirt` objects in every namespace (a namespaced operator) gives the mode: a VM's
/// VMI is routed by it, and the cluster-wide list that would be refused is never sent.
#[tokio::test]
async fn a_given_hotplug_mode_is_taken_without_reading_the_kubevirt_object() {
    let (client, seen) = api(Box::new(|s| match s.path.as_str() {
        "/apis/kubevirt.io/v1/namespaces/ns1/virtualmachineinstances/vm1" => {
            let (code, text) = vmi(false, None);
            let mut body: Value = serde_json::from_str(&text).unwrap();
            body["metadata"]["ownerReferences"] = json!([{"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachine",
                                                          "name": "vm1", "uid": "1", "controller": true}]);
            (code, body.to_string())
        }
        _ => status(403, "Forbidden", "kubevirts.kubevirt.io is forbidden"),
    }));
    let given = KubeVirt::new(client.clone(), "ns1", "vm1", false).with_hotplug_mode(HotplugMode::HotplugVolumes);
    assert_eq!(given.route().await.unwrap(), Route::Vmi, "HotplugVolumes: a VM's VMI keeps VMI hot-plug");
    assert!(seen.lock().unwrap().iter().all(|s| !s.path.contains("/kubevirts")), "{:?}", seen.lock().unwrap());
    // Not given: read, refused, and declarative assumed (the VM's subresources).
    let read = KubeVirt::new(client, "ns1", "vm1", false);
    assert_eq!(read.route().await.unwrap(), Route::VmDeclarative);
    assert!(seen.lock().unwrap().iter().any(|s| s.path == "/apis/kubevirt.io/v1/kubevirts"));
}
