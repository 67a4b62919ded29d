//! A stand-in for the KubeVirt API server, for the CLI's KubeVirt path end to end. It serves what KubeVirt (v1.9)
//! serves for hot-plug: `PUT …/virtualmachineinstances/{name}/addvolume` and
//! `…/removevolume` (202 with an empty body; 404, 409 and 400 with a `metav1.Status`), and `GET` of the VMI, whose
//! `status.volumeStatus` moves through KubeVirt's phases over time. Each hot-plug is performed on the lab guest
//! over QMP, so `wukongctl --vmi` runs through kube-rs, HTTP and a real guest; without a guest
//! ([`KubeVirtApi::start_without_guest`]) volumes only move through the phases, for tests of the CLI's contract. Bodies are read as plain JSON by the
//! documented field names, not with the companion's own types, so a shared mistake cannot hide.

use crate::Guest;
use anyhow::Result;
use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use wukong_controller_client::hypervisor::{
    DiskBus, Hypervisor, HypervisorError, VolumeSource, VolumeSpec, VolumeState,
};
use wukong_controller_client::qemu::Qemu;

/// How long each KubeVirt phase lasts here (the real ones take seconds).
const PHASE_STEP: Duration = Duration::from_millis(150);

/// One request, as the server saw it.
#[derive(Debug, Clone, PartialEq)]
pub struct Seen {
    pub method: String,
    pub path: String,
    pub body: Option<Value>,
}

#[derive(Debug, Clone)]
struct Volume {
    serial: String,
    bus: String,
    claim: String,
    in_spec: bool,
    /// `None` until KubeVirt would report a status.
    phase: Option<&'static str>,
    target: String,
}

struct State {
    namespace: String,
    name: String,
    /// Each claim's image file; `None` without a guest.
    claims: BTreeMap<String, Option<PathBuf>>,
    volumes: BTreeMap<String, Volume>,
    seen: Vec<Seen>,
    next_target: u8,
    /// The VMI's interface IP, where wukongctl looks for the agent.
    interface_ip: String,
    /// How long KubeVirt takes from `removevolume` to the guest's unplug (tearing down the attachment pod).
    unplug_delay: Duration,
    /// A 500 for every `removevolume`, the volume left in the spec: a removal KubeVirt really refuses.
    refuse_removals: Option<String>,
}

/// The running server.
pub struct KubeVirtApi {
    state: Arc<Mutex<State>>,
    kubeconfig: PathBuf,
    _dir: tempfile::TempDir,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for KubeVirtApi {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl KubeVirtApi {
    /// Serves VMI `namespace/name` of `guest`; `claims` maps each PersistentVolumeClaim to its image file. Uses the
    /// guest's companion QMP socket.
    pub async fn start(guest: &Guest, namespace: &str, name: &str, claims: &[(&str, &Path)]) -> Result<Self> {
        let qemu = Arc::new(Qemu::connect(&guest.companion_qmp()).await?);
        let claims = claims.iter().map(|(c, p)| (c.to_string(), Some(p.to_path_buf()))).collect();
        Self::serve(Some(qemu), namespace, name, claims, "10.0.2.15").await
    }

    /// Serves VMI `namespace/name` with no guest behind it: every claim in `claims` reaches `Ready` without a real
    /// plug, and the VMI reports `interface_ip`, where wukongctl then looks for the agent.
    pub async fn start_without_guest(namespace: &str, name: &str, claims: &[&str], interface_ip: &str) -> Result<Self> {
        let claims = claims.iter().map(|c| (c.to_string(), None)).collect();
        Self::serve(None, namespace, name, claims, interface_ip).await
    }

    async fn serve(
        qemu: Option<Arc<Qemu>>,
        namespace: &str,
        name: &str,
        claims: BTreeMap<String, Option<PathBuf>>,
        interface_ip: &str,
    ) -> Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let dir = tempfile::tempdir()?;
        let kubeconfig = dir.path().join("kubeconfig");
        std::fs::write(
            &kubeconfig,
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: lab\n  cluster:\n    server: http://127.0.0.1:{port}\n\
                 users:\n- name: lab\n  user:\n    token: lab-token\ncontexts:\n- name: lab\n  context:\n    \
                 cluster: lab\n    user: lab\n    namespace: {namespace}\ncurrent-context: lab\n"
            ),
        )?;
        let state = Arc::new(Mutex::new(State {
            namespace: namespace.into(),
            name: name.into(),
            claims,
            volumes: BTreeMap::new(),
            seen: Vec::new(),
            next_target: 0,
            interface_ip: interface_ip.into(),
            unplug_delay: PHASE_STEP,
            refuse_removals: None,
        }));
        let shared = state.clone();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let (state, qemu) = (shared.clone(), qemu.clone());
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req| handle(state.clone(), qemu.clone(), req));
                    let io = hyper_util::rt::TokioIo::new(stream);
                    let _ = hyper::server::conn::http1::Builder::new().serve_connection(io, service).await;
                });
            }
        });
        Ok(Self { state, kubeconfig, _dir: dir, task })
    }

    /// A kubeconfig that points at this server, for `KUBECONFIG`.
    pub fn kubeconfig(&self) -> &Path {
        &self.kubeconfig
    }

    /// How long each unplug takes from `removevolume` until the guest loses the disk (default 150 ms; a real
    /// KubeVirt takes seconds).
    pub fn set_unplug_delay(&self, delay: Duration) {
        self.state.lock().unwrap().unplug_delay = delay;
    }

    /// Refuse every `removevolume` with a 500 carrying `message` (`None`: accept them again).
    pub fn refuse_removals(&self, message: Option<&str>) {
        self.state.lock().unwrap().refuse_removals = message.map(str::to_string);
    }

    /// Every request so far.
    pub fn seen(&self) -> Vec<Seen> {
        self.state.lock().unwrap().seen.clone()
    }
}

type Reply = Response<Full<Bytes>>;

fn reply(status: StatusCode, body: String) -> Reply {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)))
        .expect("a valid response")
}

/// A `metav1.Status` failure.
fn failure(code: StatusCode, reason: &str, message: &str) -> Reply {
    let body = json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                      "message": message, "reason": reason, "code": code.as_u16()});
    reply(code, body.to_string())
}

async fn handle(
    state: Arc<Mutex<State>>,
    qemu: Option<Arc<Qemu>>,
    req: Request<Incoming>,
) -> Result<Reply, std::convert::Infallible> {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let bytes = req.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
    let body: Option<Value> = serde_json::from_slice(&bytes).ok();
    let (namespace, name) = {
        let mut s = state.lock().unwrap();
        s.seen.push(Seen { method: method.to_string(), path: path.clone(), body: body.clone() });
        (s.namespace.clone(), s.name.clone())
    };
    let subresource =
        format!("/apis/subresources.kubevirt.io/v1/namespaces/{namespace}/virtualmachineinstances/{name}/");
    let vmi = format!("/apis/kubevirt.io/v1/namespaces/{namespace}/virtualmachineinstances/{name}");
    Ok(match (method, path.strip_prefix(&subresource)) {
        (Method::PUT, Some("addvolume")) => add_volume(&state, &qemu, body),
        (Method::PUT, Some("removevolume")) => remove_volume(&state, &qemu, body),
        (Method::GET, None) if path == vmi => reply(StatusCode::OK, vmi_json(&state.lock().unwrap()).to_string()),
        _ => failure(
            StatusCode::NOT_FOUND,
            "NotFound",
            &format!("the server could not find the requested resource ({path})"),
        ),
    })
}

fn add_volume(state: &Arc<Mutex<State>>, qemu: &Option<Arc<Qemu>>, body: Option<Value>) -> Reply {
    let Some(body) = body else {
        return failure(StatusCode::BAD_REQUEST, "BadRequest", "Can not unmarshal Request body to struct");
    };
    let (Some(name), Some(disk), Some(source)) =
        (body["name"].as_str(), body.get("disk"), body["volumeSource"]["persistentVolumeClaim"]["claimName"].as_str())
    else {
        return failure(StatusCode::BAD_REQUEST, "BadRequest", "AddVolumeOptions requires name, disk and volumeSource");
    };
    let mut s = state.lock().unwrap();
    if s.volumes.contains_key(name) {
        let message = format!("Unable to add volume [{name}] because volume with that name already exists");
        return failure(StatusCode::CONFLICT, "Conflict", &message);
    }
    let target = format!("sd{}", (b'a' + s.next_target) as char);
    s.next_target += 1;
    let volume = Volume {
        serial: disk["serial"].as_str().unwrap_or_default().to_string(),
        bus: disk["disk"]["bus"].as_str().unwrap_or("scsi").to_string(),
        claim: source.to_string(),
        in_spec: true,
        phase: None,
        target,
    };
    let image = s.claims.get(source).cloned();
    s.volumes.insert(name.to_string(), volume.clone());
    drop(s);
    let (state, qemu, name) = (state.clone(), qemu.clone(), name.to_string());
    tokio::spawn(async move {
        for phase in ["Pending", "Bound", "AttachedToNode", "MountedToPod"] {
            set_phase(&state, &name, Some(phase));
            tokio::time::sleep(PHASE_STEP).await;
        }
        // An unknown claim stays Pending, as an unbound PVC does; without a guest, a known one is Ready at once.
        let (Some(qemu), Some(Some(path))) = (qemu, image.clone()) else {
            if image.is_some() {
                set_phase(&state, &name, Some("Ready"));
            }
            return;
        };
        let spec = VolumeSpec {
            name: name.clone(),
            serial: volume.serial.clone(),
            bus: if volume.bus == "virtio" { DiskBus::Virtio } else { DiskBus::Scsi },
            source: VolumeSource::Image { path, format: "raw".into() },
        };
        match qemu.add_volume(&spec).await {
            Ok(()) => set_phase(&state, &name, Some("Ready")),
            Err(e) => tracing::error!(error = %e, "the lab's KubeVirt could not plug {name}"),
        }
    });
    reply(StatusCode::ACCEPTED, String::new())
}

fn remove_volume(state: &Arc<Mutex<State>>, qemu: &Option<Arc<Qemu>>, body: Option<Value>) -> Reply {
    let Some(name) = body.as_ref().and_then(|b| b["name"].as_str()).map(str::to_string) else {
        return failure(StatusCode::BAD_REQUEST, "BadRequest", "RemoveVolumeOptions requires name");
    };
    let delay = {
        let mut s = state.lock().unwrap();
        if let Some(message) = &s.refuse_removals {
            let message = format!("Internal error occurred: {message}");
            return failure(StatusCode::INTERNAL_SERVER_ERROR, "InternalError", &message);
        }
        let delay = s.unplug_delay;
        let Some(v) = s.volumes.get_mut(&name).filter(|v| v.in_spec) else {
            let message = format!("Unable to remove volume [{name}] because it does not exist");
            return failure(StatusCode::CONFLICT, "Conflict", &message);
        };
        v.in_spec = false;
        delay
    };
    let (state, qemu) = (state.clone(), qemu.clone());
    tokio::spawn(async move {
        // The entry stays Ready for a while after the volume left the spec, as in KubeVirt, until the attachment
        // pod is gone.
        tokio::time::sleep(delay).await;
        set_phase(&state, &name, Some("UnMountedFromPod"));
        if let Some(qemu) = qemu
            && let Err(e) = unplug(&qemu, &name).await
        {
            tracing::error!(error = %e, "the lab's KubeVirt could not unplug {name}");
            return;
        }
        set_phase(&state, &name, Some("Detaching"));
        tokio::time::sleep(PHASE_STEP).await;
        state.lock().unwrap().volumes.remove(&name);
    });
    reply(StatusCode::ACCEPTED, String::new())
}

/// Unplugs a volume from the guest and waits until QEMU has let go of it, as virt-launcher does.
async fn unplug(qemu: &Qemu, name: &str) -> Result<(), HypervisorError> {
    qemu.remove_volume(name).await?;
    while qemu.volume_state(name).await? != VolumeState::Absent {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    qemu.finish_removal(name).await
}

fn set_phase(state: &Arc<Mutex<State>>, name: &str, phase: Option<&'static str>) {
    if let Some(v) = state.lock().unwrap().volumes.get_mut(name) {
        v.phase = phase;
    }
}

fn vmi_json(s: &State) -> Value {
    let mut disks = vec![json!({"name": "rootdisk", "disk": {"bus": "virtio"}})];
    let mut volumes = vec![json!({"name": "rootdisk", "containerDisk": {"image": "quay.io/containerdisks/debian:12"}})];
    let mut statuses = vec![json!({"name": "rootdisk", "target": "vda"})];
    for (name, v) in &s.volumes {
        if v.in_spec {
            disks.push(json!({"name": name, "serial": v.serial, "disk": {"bus": v.bus}}));
            volumes.push(json!({"name": name, "persistentVolumeClaim": {"claimName": v.claim, "hotpluggable": true}}));
        }
        if let Some(phase) = v.phase {
            let ready = phase == "Ready";
            statuses.push(json!({
                "name": name, "phase": phase,
                "target": if ready || !v.in_spec { v.target.as_str() } else { "" },
                "reason": if ready { "VolumeReady" } else { "" },
                "message": if ready { format!("Successfully attach hotplugged volume {name} to VM") } else { String::new() },
                "hotplugVolume": {"attachPodName": format!("hp-volume-{name}"), "attachPodUID": "0a9c…"},
            }));
        }
    }
    json!({
        "apiVersion": "kubevirt.io/v1", "kind": "VirtualMachineInstance",
        "metadata": {"name": s.name, "namespace": s.namespace},
        "spec": {"domain": {"devices": {"disks": disks}}, "volumes": volumes},
        "status": {"phase": "Running", "volumeStatus": statuses,
                   "interfaces": [{"name": "default", "ipAddress": s.interface_ip, "ipAddresses": [s.interface_ip]}]}
    })
}
