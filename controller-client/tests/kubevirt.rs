//! The KubeVirt backend and the companion against recorded, schema-true KubeVirt API exchanges (kube-rs over a
//! `tower-test` mock, as kube-rs' own tests do): exact paths, methods and bodies; KubeVirt's status codes and
//! messages; volume phases over time; and the invariant that no `removevolume` is sent unless the guest released
//! the disk. Where an agent is needed, it is the real wukong-agent running on this machine.

use http::{Method, Request, Response};
use kube::client::Body;
use serde_json::{Value, json};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tower_test::mock;
use wukong_controller_client::agent_client::{AgentAddress, AgentClient};
use wukong_controller_client::companion::{self, AttachOptions, CompanionError, DetachOptions};
use wukong_controller_client::hypervisor::{
    DiskBus, Hypervisor, HypervisorError, VolumeSource, VolumeSpec, VolumeState,
};
use wukong_controller_client::kubevirt::KubeVirt;

const SUBRESOURCES: &str = "/apis/subresources.kubevirt.io/v1/namespaces/ns1";
const VMI_PATH: &str = "/apis/kubevirt.io/v1/namespaces/ns1/virtualmachineinstances/vm1";

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
async fn addvolume_sends_the_exact_body_to_the_vmi_and_accepts_202() {
    // A standalone VMI (no owner): its own subresource, after one read to find that out.
    let (client, seen) = api(Box::new(|s| if s.method == Method::GET { vmi(false, None) } else { accepted() }));
    KubeVirt::new(client, "ns1", "vm1", false).add_volume(&pvc_volume()).await.unwrap();
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen[0].path, VMI_PATH);
    assert_eq!(
        seen[1..],
        [Seen {
            method: Method::PUT,
            path: format!("{SUBRESOURCES}/virtualmachineinstances/vm1/addvolume"),
            body: Some(json!({"name": "data1",
                              "disk": {"name": "data1", "serial": "data1", "disk": {"bus": "scsi"}},
                              "volumeSource": {"persistentVolumeClaim": {"claimName": "pvc-a", "hotpluggable": true}}})),
        }]
    );
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
    let seen = seen.lock().unwrap().clone();
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
        let (client, seen) = api(Box::new(move |_| (code, text.clone())));
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
        assert_eq!(seen.lock().unwrap().len(), 1, "{code} is not retried");
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

#[tokio::test]
async fn volume_state_follows_the_phases_to_ready_and_to_removal() {
    let timeline = vec![
        vmi(true, None), // read once to find the route: a standalone VMI
        vmi(true, None),
        vmi(true, Some(("Bound", ""))),
        vmi(true, Some(("MountedToPod", ""))),
        vmi(true, Some(("Ready", "sda"))),
        vmi(false, Some(("Ready", "sda"))),
        vmi(false, Some(("Detaching", "sda"))),
        vmi(false, None),
    ];
    let mut next = timeline.into_iter();
    let (client, seen) = api(Box::new(move |_| next.next().expect("no more states")));
    let kv = KubeVirt::new(client, "ns1", "vm1", false);
    let mut states = Vec::new();
    for _ in 0..7 {
        states.push(match kv.volume_state("data1").await.unwrap() {
            VolumeState::Absent => "absent".to_string(),
            VolumeState::Pending { phase, .. } => phase,
            VolumeState::Ready { serial, target } => format!("ready {target} {}", serial.unwrap_or_default()),
            VolumeState::Removing { phase, .. } => format!("removing {phase}"),
        });
    }
    // Out of the spec with a status entry left, even a `Ready` one, the volume is being removed.
    assert_eq!(
        states,
        ["Pending", "Bound", "MountedToPod", "ready sda data1", "removing Ready", "removing Detaching", "absent"]
    );
    assert!(seen.lock().unwrap().iter().all(|s| s.method == Method::GET && s.path == VMI_PATH));
}

/// The real agent on this machine, on a Unix socket; it knows no disk with the serials these tests use.
async fn host_agent(dir: &std::path::Path) -> (AgentClient, tokio::sync::oneshot::Sender<()>) {
    let socket = dir.join("agent.sock");
    let args = wukong_agent::config::Args {
        listen: vec!["127.0.0.1:0".into()],
        socket: Some(socket.clone()),
        state_dir: Some(dir.join("releases")),
        ..Default::default()
    };
    let config = wukong_agent::config::Config::load(&args).unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(wukong_agent::server::run(config, async {
        let _ = stopped.await;
    }));
    for _ in 0..200 {
        if socket.exists() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    (AgentClient::connect(AgentAddress::Unix(socket)).unwrap(), stop)
}

fn detach_options() -> DetachOptions {
    DetachOptions {
        volume: "data1".into(),
        serial: None,
        unmount: true,
        force: false,
        timeout: Duration::from_secs(5),
        poll: Duration::from_millis(10),
    }
}

fn removevolume_sent(seen: &Arc<Mutex<Vec<Seen>>>) -> bool {
    seen.lock().unwrap().iter().any(|s| s.path.ends_with("/removevolume"))
}

#[tokio::test(flavor = "multi_thread")]
async fn no_removevolume_when_the_agent_is_unreachable() {
    let (client, seen) =
        api(Box::new(|s| if s.method == Method::GET { vmi(true, Some(("Ready", "sda"))) } else { accepted() }));
    let kv = KubeVirt::new(client, "ns1", "vm1", false);
    let dir = tempfile::tempdir().unwrap();
    let agent = AgentClient::connect(AgentAddress::Unix(dir.path().join("no-agent.sock"))).unwrap();
    let err = companion::detach(&kv, &agent, &detach_options(), &|_| {}).await.unwrap_err();
    assert!(matches!(err, CompanionError::AgentUnreachable(_)), "{err}");
    assert!(err.to_string().contains("nothing was detached (fail safe)"), "{err}");
    assert!(!removevolume_sent(&seen), "{:#?}", seen.lock().unwrap());
}

#[tokio::test(flavor = "multi_thread")]
async fn no_removevolume_when_the_agent_refuses_and_force_skips_the_guest_loudly() {
    let dir = tempfile::tempdir().unwrap();
    let (agent, _stop) = host_agent(dir.path()).await;
    let mut gone = false;
    let (client, seen) = api(Box::new(move |s| match (&s.method, s.path.ends_with("/removevolume")) {
        (&Method::PUT, true) => {
            gone = true;
            accepted()
        }
        _ if gone => vmi(false, None),
        _ => vmi(true, Some(("Ready", "sda"))),
    }));
    let kv = KubeVirt::new(client, "ns1", "vm1", false);
    let err = companion::detach(&kv, &agent, &detach_options(), &|_| {}).await.unwrap_err();
    assert!(matches!(err, CompanionError::NotInGuest { .. }), "{err}");
    assert!(err.to_string().contains("does not see disk 'data1'"), "{err}");
    assert!(!removevolume_sent(&seen), "refused: no removevolume");

    let forced = DetachOptions { force: true, ..detach_options() };
    let done = companion::detach(&kv, &agent, &forced, &|_| {}).await.unwrap();
    assert!(done.forced && done.release.is_none());
    assert!(removevolume_sent(&seen), "forced: removevolume sent");
}

#[tokio::test(flavor = "multi_thread")]
async fn attach_adds_the_volume_waits_for_ready_then_for_the_guest() {
    let dir = tempfile::tempdir().unwrap();
    let (agent, _stop) = host_agent(dir.path()).await;
    let mut timeline =
        vec![vmi(false, None), vmi(true, None), vmi(true, Some(("Bound", ""))), vmi(true, Some(("Ready", "sda")))]
            .into_iter();
    let (client, seen) = api(Box::new(move |s| {
        if s.method == Method::PUT {
            accepted()
        } else {
            timeline.next().unwrap_or_else(|| vmi(true, Some(("Ready", "sda"))))
        }
    }));
    let kv = KubeVirt::new(client, "ns1", "vm1", false);
    let options = AttachOptions { timeout: Duration::from_secs(3), poll: Duration::from_millis(10) };
    let phases = Mutex::new(Vec::new());
    let err = companion::attach(&kv, &agent, &pvc_volume(), &options, &|p| phases.lock().unwrap().push(p.to_string()))
        .await
        .unwrap_err();
    // The host has no such disk: the hypervisor attached it, the guest never reported it.
    assert!(matches!(err, CompanionError::GuestDidNotSee { .. }), "{err}");
    assert!(err.to_string().contains("VMI ns1/vm1 attached volume 'data1', but the guest did not report"), "{err}");
    let puts: Vec<String> =
        seen.lock().unwrap().iter().filter(|s| s.method == Method::PUT).map(|s| s.path.clone()).collect();
    assert_eq!(puts, [format!("{SUBRESOURCES}/virtualmachineinstances/vm1/addvolume")]);
    let phases = phases.into_inner().unwrap();
    assert!(phases.iter().any(|p| p == "volume 'data1': Bound"), "{phases:?}");

    // Attached already with this serial: no second addvolume; with another serial: refused, nothing sent.
    let (client, seen) =
        api(Box::new(|s| if s.method == Method::PUT { accepted() } else { vmi(true, Some(("Ready", "sda"))) }));
    let kv = KubeVirt::new(client, "ns1", "vm1", false);
    let err = companion::attach(&kv, &agent, &pvc_volume(), &options, &|_| {}).await.unwrap_err();
    assert!(matches!(err, CompanionError::GuestDidNotSee { .. }), "{err}");
    let mut other = pvc_volume();
    other.serial = "other".into();
    let err = companion::attach(&kv, &agent, &other, &options, &|_| {}).await.unwrap_err();
    assert!(matches!(err, CompanionError::SerialMismatch { .. }), "{err}");
    assert!(seen.lock().unwrap().iter().all(|s| s.method == Method::GET), "idempotent: nothing but reads");
}

#[tokio::test]
async fn the_agent_address_comes_from_the_vmi_interface() {
    let (client, _) = api(Box::new(|_| vmi(true, None)));
    let kv = KubeVirt::new(client, "ns1", "vm1", false);
    assert_eq!(kv.agent_address().await.unwrap().as_deref(), Some("http://10.244.1.17:7443"));
    assert_eq!(kv.claim_of("data1").await.unwrap().as_deref(), Some("pvc-a"));
}
