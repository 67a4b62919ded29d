//! KubeVirt v1.9 in the lab's genuine API server ([`crate::cluster::Cluster`]), playing what cannot run here:
//!
//! * **virt-api's `subresources.kubevirt.io/v1`**, served as an aggregated API (an `APIService` pointing at this
//!   HTTPS server through an `ExternalName` Service, as virt-api is served): `addvolume`/`removevolume` for VMs and
//!   VMIs, with v1.9's rules, status codes and messages in both feature-gate modes. RBAC on the subresources is
//!   enforced by the API server before a request gets here.
//! * **virt-controller + virt-handler** for the lab guest: a controller that watches VMs and VMIs through the API
//!   server, applies the declarative rule (hotpluggable VM volumes → VMI spec, and back), binds claims to image
//!   files, hot-plugs and unplugs them over QMP with the disk's serial and bus, and reports `volumeStatus` with
//!   KubeVirt's phases, `status.interfaces` and the `VolumeUnplugged` event. Like KubeVirt it checks nothing about
//!   use before an unplug: safety has to come from Wukong.

use crate::Guest;
use crate::cluster::{ADMIN, Ca, Cluster};
use anyhow::{Context, Result, bail};
use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use kube::api::{Api, ApiResource, DynamicObject, Patch, PatchParams, PostParams};
use rcgen::ExtendedKeyUsagePurpose;
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use wukong_controller_client::companion::{self, AttachOptions};
use wukong_controller_client::hypervisor::{DiskBus, Hypervisor, VolumeSource, VolumeSpec, VolumeState};
use wukong_controller_client::kubevirt::KubeVirt;
use wukong_controller_client::qemu::Qemu;

/// How long each attach phase lasts (KubeVirt's take seconds: an attachment pod is scheduled and started).
const PHASE_STEP: Duration = Duration::from_millis(150);
/// How often the controller looks again when nothing happened (it is woken by watch events otherwise).
const RESYNC: Duration = Duration::from_millis(100);
/// The namespace virt-api's Service lives in.
const KUBEVIRT_NAMESPACE: &str = "kubevirt";
const GROUP: &str = "subresources.kubevirt.io";

/// Which of KubeVirt v1.9's hot-plug feature gates is on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HotplugMode {
    /// `DeclarativeHotplugVolumes` only, v1.9's default: the VM spec is the truth; editing it plugs and unplugs,
    /// and VMI add/remove on a VM-owned VMI is refused with 400.
    Declarative,
    /// `HotplugVolumes` (deprecated in v1.9, takes precedence when on): the subresources change the VMI (and, for a
    /// VM, its spec too); editing the VM spec does nothing until a restart.
    HotplugVolumes,
}

/// Any resource, for clients of dynamic objects.
pub fn resource(kind: &str, group: &str, version: &str, plural: &str) -> ApiResource {
    ApiResource {
        group: group.into(),
        version: version.into(),
        api_version: if group.is_empty() { version.into() } else { format!("{group}/{version}") },
        kind: kind.into(),
        plural: plural.into(),
    }
}

fn vms(client: &kube::Client, ns: &str) -> Api<DynamicObject> {
    Api::namespaced_with(client.clone(), ns, &resource("VirtualMachine", "kubevirt.io", "v1", "virtualmachines"))
}

fn vmis(client: &kube::Client, ns: &str) -> Api<DynamicObject> {
    let r = resource("VirtualMachineInstance", "kubevirt.io", "v1", "virtualmachineinstances");
    Api::namespaced_with(client.clone(), ns, &r)
}

fn claims(client: &kube::Client, ns: &str) -> Api<DynamicObject> {
    Api::namespaced_with(client.clone(), ns, &resource("PersistentVolumeClaim", "", "v1", "persistentvolumeclaims"))
}

/// Shared between the aggregated server and the controller.
struct Shared {
    client: kube::Client,
    namespace: String,
    mode: HotplugMode,
    qemu: Option<Arc<Qemu>>,
    /// Claim → image file (the lab's storage).
    images: Mutex<BTreeMap<String, PathBuf>>,
    /// A dynamic provisioner: a directory for new images and the StorageClass it serves.
    provisioner: Mutex<Option<(PathBuf, String)>>,
    /// (VMI, volume) → where its hot-plug is.
    volumes: Mutex<BTreeMap<(String, String), Plug>>,
    /// How long KubeVirt takes from a volume leaving the VMI's spec to the guest losing the disk (virt-handler,
    /// virt-launcher and the attachment pod; seconds in a real cluster). Its status entry stays as it was meanwhile.
    unplug_delay: Mutex<Duration>,
    /// A 500 for every `removevolume` (the volume stays): a removal KubeVirt really refuses.
    refuse_removals: Mutex<Option<String>>,
    next_target: Mutex<u8>,
    /// Every hot-plug request virt-api received, as it received it.
    received: Mutex<Vec<Received>>,
}

/// A hot-plug request as the lab's virt-api received it from the API server.
#[derive(Debug, Clone)]
pub struct Received {
    pub method: String,
    pub path: String,
    /// The caller, as the API server vouches for it (`X-Remote-User`).
    pub user: String,
    pub body: Option<Value>,
}

impl Shared {
    /// The hot-plugs of one VMI, by volume.
    fn plugs_of(&self, vmi_name: &str) -> BTreeMap<String, Plug> {
        let volumes = self.volumes.lock().unwrap();
        volumes.iter().filter(|((vmi, _), _)| vmi == vmi_name).map(|((_, v), plug)| (v.clone(), plug.clone())).collect()
    }
}

#[derive(Debug, Clone)]
struct Plug {
    phase: &'static str,
    since: Instant,
    target: String,
    plugged: bool,
    /// When the volume left the VMI's spec.
    leaving: Option<Instant>,
}

/// KubeVirt, as far as the lab plays it, in one namespace of a [`Cluster`]. Stops its server and controller on
/// drop.
pub struct KubeVirtLab {
    shared: Arc<Shared>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for KubeVirtLab {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

impl KubeVirtLab {
    /// Installs KubeVirt's CRDs and aggregated API in `cluster` and starts the controller for `namespace`, which it
    /// creates. With a guest, volumes are really plugged into it (over its companion QMP socket); without one they
    /// only move through the phases.
    pub async fn start(
        cluster: &Cluster,
        guest: Option<&crate::Guest>,
        namespace: &str,
        mode: HotplugMode,
    ) -> Result<Self> {
        let client = cluster.client(ADMIN).await?;
        crate::kubevirt_crds::install(&client).await?;
        for ns in [namespace, KUBEVIRT_NAMESPACE] {
            let namespaces: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(client.clone());
            let object = serde_json::from_value(json!({"metadata": {"name": ns}}))?;
            match namespaces.create(&PostParams::default(), &object).await {
                Ok(_) => {}
                Err(kube::Error::Api(s)) if s.code == 409 => {}
                Err(e) => return Err(e).context("creating the lab's namespaces"),
            }
        }
        install_kubevirt_config(&client, mode).await?;
        let qemu = match guest {
            Some(g) => Some(Arc::new(Qemu::connect(&g.companion_qmp()).await?)),
            None => None,
        };
        let shared = Arc::new(Shared {
            client: client.clone(),
            namespace: namespace.into(),
            mode,
            qemu,
            images: Mutex::new(BTreeMap::new()),
            provisioner: Mutex::new(None),
            volumes: Mutex::new(BTreeMap::new()),
            unplug_delay: Mutex::new(PHASE_STEP),
            refuse_removals: Mutex::new(None),
            next_target: Mutex::new(0),
            received: Mutex::new(Vec::new()),
        });
        let server = serve_subresources(cluster, shared.clone()).await?;
        let controller = tokio::spawn(run_controller(shared.clone()));
        Ok(Self { shared, tasks: vec![server, controller] })
    }

    /// How long an unplug takes from the volume leaving the VMI's spec until the guest loses the disk (default
    /// 150 ms; a real KubeVirt takes seconds).
    pub fn set_unplug_delay(&self, delay: Duration) {
        *self.shared.unplug_delay.lock().unwrap() = delay;
    }

    /// Refuse every `removevolume` with a 500 carrying `message` (`None`: accept them again).
    pub fn refuse_removals(&self, message: Option<&str>) {
        *self.shared.refuse_removals.lock().unwrap() = message.map(str::to_string);
    }

    /// Every hot-plug request the lab's virt-api received (the API server does not record proxied bodies).
    pub fn received(&self) -> Vec<Received> {
        self.shared.received.lock().unwrap().clone()
    }

    /// A PersistentVolumeClaim backed by `image` (bound by the controller, as a provisioner would).
    pub async fn create_claim(&self, name: &str, image: &Path) -> Result<()> {
        self.shared.images.lock().unwrap().insert(name.into(), image.into());
        let size = std::fs::metadata(image).map(|m| m.len()).unwrap_or(0);
        let object: DynamicObject = serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": name},
            "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": size.to_string()}},
                     "volumeMode": "Block"},
        }))?;
        claims(&self.shared.client, &self.shared.namespace).create(&PostParams::default(), &object).await?;
        Ok(())
    }

    /// A stopped VM `name` (no VMI): hot-plugs change only its spec.
    pub async fn create_stopped_vm(&self, name: &str) -> Result<()> {
        self.create_vm_object(name, false).await.map(drop)
    }

    async fn create_vm_object(&self, name: &str, running: bool) -> Result<DynamicObject> {
        let (domain, volumes) = root_disk();
        let vm: DynamicObject = serde_json::from_value(json!({
            "apiVersion": "kubevirt.io/v1", "kind": "VirtualMachine", "metadata": {"name": name},
            "spec": {"running": running, "template": {"metadata": {"labels": {"kubevirt.io/vm": name}},
                     "spec": {"domain": domain, "volumes": volumes}}},
        }))?;
        Ok(vms(&self.shared.client, &self.shared.namespace).create(&PostParams::default(), &vm).await?)
    }

    /// Plays a dynamic provisioner for StorageClass `class` (made the default): any claim of that class (or of
    /// none) gets a new sparse image of its requested size in `dir` and is bound.
    pub async fn provision(&self, dir: &Path, class: &str) -> Result<()> {
        let classes = Api::<DynamicObject>::all_with(
            self.shared.client.clone(),
            &resource("StorageClass", "storage.k8s.io", "v1", "storageclasses"),
        );
        let object = serde_json::from_value(json!({
            "apiVersion": "storage.k8s.io/v1", "kind": "StorageClass",
            "metadata": {"name": class, "annotations": {"storageclass.kubernetes.io/is-default-class": "true"}},
            "provisioner": "lab.wukong.invalid/images", "volumeBindingMode": "Immediate",
        }))?;
        classes.create(&PostParams::default(), &object).await?;
        *self.shared.provisioner.lock().unwrap() = Some((dir.to_path_buf(), class.to_string()));
        Ok(())
    }

    /// A running VM `name` and its VMI (owned by it), for the lab guest. With `owned: false`, a standalone VMI.
    /// `interface_ip` is what the VMI reports as its address (where wukongctl looks for the agent).
    pub async fn create_vm(&self, name: &str, owned: bool, interface_ip: &str) -> Result<()> {
        let ns = &self.shared.namespace;
        let (domain, volumes) = root_disk();
        let mut owner = Vec::new();
        if owned {
            let vm = self.create_vm_object(name, true).await?;
            owner.push(json!({"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachine", "name": name,
                              "uid": vm.metadata.uid, "controller": true, "blockOwnerDeletion": true}));
        }
        let vmi: DynamicObject = serde_json::from_value(json!({
            "apiVersion": "kubevirt.io/v1", "kind": "VirtualMachineInstance",
            "metadata": {"name": name, "ownerReferences": owner},
            "spec": {"domain": domain, "volumes": volumes},
        }))?;
        let api = vmis(&self.shared.client, ns);
        api.create(&PostParams::default(), &vmi).await?;
        let status = json!({"status": {"phase": "Running",
            "volumeStatus": [{"name": "rootdisk", "target": "vda"}],
            "interfaces": [{"name": "default", "ipAddress": interface_ip, "ipAddresses": [interface_ip]}]}});
        api.patch_status(name, &PatchParams::default(), &Patch::Merge(&status)).await?;
        Ok(())
    }
}

/// Hot-plugs claim `claim` into `kubevirt`'s VMI as SCSI volume `volume` (its serial too) with the companion, which
/// waits until the guest sees it; returns the guest's device node.
pub async fn attach_claim(guest: &Guest, kubevirt: &KubeVirt, volume: &str, claim: &str) -> Result<String> {
    let spec = VolumeSpec {
        name: volume.into(),
        serial: volume.into(),
        bus: DiskBus::Scsi,
        source: VolumeSource::PersistentVolumeClaim(claim.into()),
    };
    let options = AttachOptions { timeout: Duration::from_secs(120), poll: Duration::from_millis(50) };
    Ok(companion::attach(kubevirt, &guest.agent(), &spec, &options, &|_| {}).await?.disk.dev_node)
}

/// A JSON patch that removes volume `name` and its disk from the spec at `base` (`/spec/template/spec` of a VM,
/// `/spec` of a VMI), as `kubectl edit` or a GitOps sync would send it.
pub fn removal_patch(object: &DynamicObject, base: &str, name: &str) -> Result<Value> {
    let spec = base.trim_start_matches('/').split('/').fold(&object.data, |v, k| &v[k]);
    let index = |list: &Value| list.as_array().and_then(|l| l.iter().position(|v| v["name"] == name));
    let volume = index(&spec["volumes"]).with_context(|| format!("volume {name} in {base}"))?;
    let disk = index(&spec["domain"]["devices"]["disks"]).with_context(|| format!("disk {name} in {base}"))?;
    Ok(json!([
        {"op": "test", "path": format!("{base}/volumes/{volume}/name"), "value": name},
        {"op": "remove", "path": format!("{base}/volumes/{volume}")},
        {"op": "remove", "path": format!("{base}/domain/devices/disks/{disk}")},
    ]))
}

/// The names of a VM's template volumes (a VM as JSON).
pub fn template_volumes(vm: &Value) -> Vec<String> {
    vm["spec"]["template"]["spec"]["volumes"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|v| v["name"].as_str().map(str::to_string))
        .collect()
}

/// The domain and volumes of the lab's VMs: a container disk to boot from.
fn root_disk() -> (Value, Value) {
    let domain =
        json!({"devices": {"disks": [{"name": "rootdisk", "disk": {"bus": "virtio"}}]}, "memory": {"guest": "512Mi"}});
    let volumes = json!([{"name": "rootdisk", "containerDisk": {"image": "quay.io/containerdisks/debian:12"}}]);
    (domain, volumes)
}

/// The `KubeVirt` object of an installation (`kubevirts.kubevirt.io`), whose feature gates say which hot-plug mode
/// runs. Its schema is not in the document the other CRDs come from and nothing here reads more than the gates.
async fn install_kubevirt_config(client: &kube::Client, mode: HotplugMode) -> Result<()> {
    let crds = Api::<DynamicObject>::all_with(
        client.clone(),
        &resource("CustomResourceDefinition", "apiextensions.k8s.io", "v1", "customresourcedefinitions"),
    );
    let crd = serde_json::from_value(json!({
        "apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
        "metadata": {"name": "kubevirts.kubevirt.io"},
        "spec": {"group": "kubevirt.io", "scope": "Namespaced",
                 "names": {"kind": "KubeVirt", "plural": "kubevirts", "singular": "kubevirt", "shortNames": ["kv"]},
                 "versions": [{"name": "v1", "served": true, "storage": true, "subresources": {"status": {}},
                               "schema": {"openAPIV3Schema": {"type": "object", "properties": {
                                   "spec": {"type": "object", "x-kubernetes-preserve-unknown-fields": true},
                                   "status": {"type": "object", "x-kubernetes-preserve-unknown-fields": true}}}}}]},
    }))?;
    crds.create(&PostParams::default(), &crd).await?;
    let gates = match mode {
        HotplugMode::Declarative => json!([]),
        HotplugMode::HotplugVolumes => json!(["HotplugVolumes"]),
    };
    let kubevirt = serde_json::from_value(json!({
        "apiVersion": "kubevirt.io/v1", "kind": "KubeVirt", "metadata": {"name": "kubevirt"},
        "spec": {"configuration": {"developerConfiguration": {"featureGates": gates}}},
    }))?;
    let api = Api::<DynamicObject>::namespaced_with(
        client.clone(),
        KUBEVIRT_NAMESPACE,
        &resource("KubeVirt", "kubevirt.io", "v1", "kubevirts"),
    );
    let started = Instant::now();
    // The CRD takes a moment to be served.
    loop {
        match api.create(&PostParams::default(), &kubevirt).await {
            Ok(_) => return Ok(()),
            Err(kube::Error::Api(s)) if s.code == 404 && started.elapsed() < Duration::from_secs(30) => {
                tokio::time::sleep(Duration::from_millis(100)).await
            }
            Err(e) => return Err(e).context("creating the lab's KubeVirt object"),
        }
    }
}

// ---------------------------------------------------------------------------------------------------------------
// virt-api: the aggregated subresources.

/// Serves `subresources.kubevirt.io/v1` over HTTPS and registers it with the API server.
async fn serve_subresources(cluster: &Cluster, shared: Arc<Shared>) -> Result<tokio::task::JoinHandle<()>> {
    use tokio_rustls::rustls;
    use tokio_rustls::rustls::pki_types::pem::PemObject;
    let ca = Ca::new("wukong lab virt-api CA")?;
    let service_name = format!("virt-api.{KUBEVIRT_NAMESPACE}.svc");
    let leaf = ca.leaf("virt-api", &[&service_name], ExtendedKeyUsagePurpose::ServerAuth)?;
    let certs =
        rustls::pki_types::CertificateDer::pem_slice_iter(leaf.cert.as_bytes()).collect::<Result<Vec<_>, _>>()?;
    let key = rustls::pki_types::PrivateKeyDer::from_pem_slice(leaf.key.as_bytes())?;
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key)?;
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    let task = tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let (acceptor, shared) = (acceptor.clone(), shared.clone());
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(stream).await else { return };
                let service = hyper::service::service_fn(move |req| handle(shared.clone(), req));
                let io = hyper_util::rt::TokioIo::new(tls);
                let _ = hyper::server::conn::http1::Builder::new().serve_connection(io, service).await;
            });
        }
    });
    register(cluster, port, &ca.pem).await?;
    Ok(task)
}

/// The ExternalName Service and the APIService, then waits until the API server routes to us.
async fn register(cluster: &Cluster, port: u16, ca_pem: &str) -> Result<()> {
    use base64::Engine;
    let client = cluster.client(ADMIN).await?;
    let services = Api::<DynamicObject>::namespaced_with(
        client.clone(),
        KUBEVIRT_NAMESPACE,
        &resource("Service", "", "v1", "services"),
    );
    let service = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Service", "metadata": {"name": "virt-api"},
        "spec": {"type": "ExternalName", "externalName": "127.0.0.1", "ports": [{"port": port, "protocol": "TCP"}]},
    }))?;
    services.create(&PostParams::default(), &service).await?;
    let apiservices = Api::<DynamicObject>::all_with(
        client.clone(),
        &resource("APIService", "apiregistration.k8s.io", "v1", "apiservices"),
    );
    let apiservice = serde_json::from_value(json!({
        "apiVersion": "apiregistration.k8s.io/v1", "kind": "APIService", "metadata": {"name": format!("v1.{GROUP}")},
        "spec": {"group": GROUP, "version": "v1", "groupPriorityMinimum": 1000, "versionPriority": 15,
                 "caBundle": base64::engine::general_purpose::STANDARD.encode(ca_pem),
                 "service": {"namespace": KUBEVIRT_NAMESPACE, "name": "virt-api", "port": port}},
    }))?;
    apiservices.create(&PostParams::default(), &apiservice).await?;
    let started = Instant::now();
    loop {
        let request = http::Request::get(format!("/apis/{GROUP}/v1")).body(Vec::new())?;
        if client.request_text(request).await.is_ok() {
            return Ok(());
        }
        if started.elapsed() > Duration::from_secs(60) {
            bail!("the API server never routed {GROUP}/v1 to the lab's virt-api: {}", cluster.log("apiserver.log"));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
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

/// A `metav1.Status` failure, as virt-api writes them.
fn failure(code: StatusCode, message: &str) -> Reply {
    let reason = match code {
        StatusCode::BAD_REQUEST => "BadRequest",
        StatusCode::NOT_FOUND => "NotFound",
        StatusCode::CONFLICT => "Conflict",
        StatusCode::UNPROCESSABLE_ENTITY => "Invalid",
        _ => "InternalError",
    };
    let body = json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                      "message": message, "reason": reason, "code": code.as_u16()});
    reply(code, body.to_string())
}

async fn handle(shared: Arc<Shared>, req: Request<Incoming>) -> Result<Reply, std::convert::Infallible> {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let user = req.headers().get("x-remote-user").and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
    let body = req.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
    tracing::debug!(%method, %path, %user, "lab virt-api request");
    let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    Ok(match (method, parts.as_slice()) {
        (Method::GET, ["apis", GROUP, "v1"]) => reply(StatusCode::OK, resource_list().to_string()),
        (Method::PUT, ["apis", GROUP, "v1", "namespaces", ns, kind, name, verb]) => {
            let body: Option<Value> = serde_json::from_slice(&body).ok();
            let received = Received { method: "PUT".into(), path: path.clone(), user, body: body.clone() };
            shared.received.lock().unwrap().push(received);
            match volume_request(&shared, ns, kind, name, verb, body).await {
                Ok(()) => reply(StatusCode::ACCEPTED, String::new()),
                Err((code, message)) => failure(code, &message),
            }
        }
        _ => failure(StatusCode::NOT_FOUND, &format!("the server could not find the requested resource ({path})")),
    })
}

fn resource_list() -> Value {
    let resources: Vec<Value> = ["virtualmachineinstances", "virtualmachines"]
        .iter()
        .flat_map(|kind| ["addvolume", "removevolume"].map(|verb| (kind, verb)))
        .map(|(kind, verb)| json!({"name": format!("{kind}/{verb}"), "namespaced": true, "kind": "", "verbs": ["update"]}))
        .collect();
    json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": format!("{GROUP}/v1"), "resources": resources})
}

type Refusal = (StatusCode, String);

/// One `addvolume`/`removevolume`, with virt-api v1.9's checks and messages (pkg/virt-api/rest/volumes.go).
async fn volume_request(
    shared: &Shared,
    ns: &str,
    kind: &str,
    name: &str,
    verb: &str,
    body: Option<Value>,
) -> Result<(), Refusal> {
    let bad = |m: &str| (StatusCode::BAD_REQUEST, m.to_string());
    let Some(body) = body else { return Err(bad("Can not unmarshal Request body to struct")) };
    let volume = body["name"].as_str().filter(|n| !n.is_empty()).map(str::to_string);
    let dry_run = body["dryRun"].as_array().is_some_and(|d| d.iter().any(|v| v == "All"));
    let add = match verb {
        "addvolume" => {
            if volume.is_none() || body.get("disk").is_none() || body.get("volumeSource").is_none() {
                return Err(bad("AddVolumeOptions requires name, disk and volumeSource to be set"));
            }
            true
        }
        "removevolume" => {
            if volume.is_none() {
                return Err(bad("RemoveVolumeOptions requires name to be set"));
            }
            if let Some(message) = shared.refuse_removals.lock().unwrap().clone() {
                return Err((StatusCode::INTERNAL_SERVER_ERROR, format!("Internal error occurred: {message}")));
            }
            false
        }
        _ => return Err((StatusCode::NOT_FOUND, format!("unknown subresource {verb}"))),
    };
    let volume = volume.expect("checked above");
    let (new_volume, new_disk) = (hotplug_volume(&body), hotplug_disk(&body, &volume));
    let client = &shared.client;
    let not_found = |what: &str| (StatusCode::NOT_FOUND, format!("{what} \"{name}\" not found"));
    let internal = |e: kube::Error| (StatusCode::INTERNAL_SERVER_ERROR, e.to_string());
    match kind {
        "virtualmachines" => {
            let api = vms(client, ns);
            let vm =
                api.get_opt(name).await.map_err(internal)?.ok_or_else(|| not_found("virtualmachines.kubevirt.io"))?;
            let mut spec = vm.data["spec"]["template"]["spec"].clone();
            change_volumes(&mut spec, add, &volume, &new_volume, &new_disk)?;
            if dry_run {
                return Ok(());
            }
            replace_path(&api, vm, &["spec", "template", "spec"], spec).await.map_err(internal)?;
            // With HotplugVolumes, virt-controller also hot-plugs into the running VMI (vm.status.volumeRequests).
            if shared.mode == HotplugMode::HotplugVolumes
                && let Some(vmi) = vmis(client, ns).get_opt(name).await.map_err(internal)?
            {
                let mut spec = vmi.data["spec"].clone();
                if change_volumes(&mut spec, add, &volume, &new_volume, &new_disk).is_ok() {
                    replace_path(&vmis(client, ns), vmi, &["spec"], spec).await.map_err(internal)?;
                }
            }
            Ok(())
        }
        "virtualmachineinstances" => {
            let api = vmis(client, ns);
            let vmi = api
                .get_opt(name)
                .await
                .map_err(internal)?
                .ok_or_else(|| not_found("virtualmachineinstances.kubevirt.io"))?;
            if vmi.data["status"]["phase"] != "Running" {
                return Err((StatusCode::CONFLICT, "VMI is not running".into()));
            }
            let owned = vmi.metadata.owner_references.iter().flatten().any(|o| o.kind == "VirtualMachine");
            if owned && shared.mode == HotplugMode::Declarative {
                return Err(bad(&format!("VMI {ns}/{name} is owned by a VM")));
            }
            let mut spec = vmi.data["spec"].clone();
            change_volumes(&mut spec, add, &volume, &new_volume, &new_disk)?;
            if dry_run {
                return Ok(());
            }
            replace_path(&api, vmi, &["spec"], spec).await.map_err(internal)
        }
        other => Err((StatusCode::NOT_FOUND, format!("the server could not find the requested resource ({other})"))),
    }
}

/// `v1.Volume` from `AddVolumeOptions`: virt-api forces `hotpluggable: true`.
fn hotplug_volume(body: &Value) -> Value {
    let mut source = body["volumeSource"].clone();
    for key in ["persistentVolumeClaim", "dataVolume"] {
        if source[key].is_object() {
            source[key]["hotpluggable"] = json!(true);
        }
    }
    let mut volume = json!({"name": body["name"]});
    if let Some(map) = source.as_object() {
        for (k, v) in map {
            volume[k] = v.clone();
        }
    }
    volume
}

/// `v1.Disk` from `AddVolumeOptions`: virt-api overwrites the disk's name with the volume's.
fn hotplug_disk(body: &Value, volume: &str) -> Value {
    let mut disk = body["disk"].clone();
    disk["name"] = json!(volume);
    disk
}

/// The disk that goes with a volume in a VMI spec (or a VM template's spec).
fn disk_of(spec: &Value, name: &Value) -> Option<Value> {
    spec["domain"]["devices"]["disks"].as_array().and_then(|d| d.iter().find(|d| d["name"] == *name).cloned())
}

fn is_hotpluggable(volume: &Value) -> bool {
    ["persistentVolumeClaim", "dataVolume"].iter().any(|k| volume[k]["hotpluggable"] == json!(true))
}

/// Adds or removes a volume and its disk in a VMI spec (or a VM template's spec), with KubeVirt's conflicts.
fn change_volumes(spec: &mut Value, add: bool, name: &str, volume: &Value, disk: &Value) -> Result<(), Refusal> {
    let conflict = |m: String| (StatusCode::CONFLICT, m);
    let volumes = spec["volumes"].as_array().cloned().unwrap_or_default();
    let existing = volumes.iter().find(|v| v["name"] == name);
    if add {
        if existing.is_some() {
            return Err(conflict(format!(
                "Unable to add volume [{name}] because volume with that name already exists"
            )));
        }
        push(spec, "volumes", volume.clone());
        let devices = &mut spec["domain"]["devices"];
        if !devices["disks"].is_array() {
            devices["disks"] = json!([]);
        }
        devices["disks"].as_array_mut().expect("an array").push(disk.clone());
        return Ok(());
    }
    match existing {
        None => Err(conflict(format!("Unable to remove volume [{name}] because it does not exist"))),
        Some(v) if !is_hotpluggable(v) => {
            Err(conflict(format!("Unable to remove volume [{name}] because it is not hotpluggable")))
        }
        Some(_) => {
            spec["volumes"] = json!(volumes.into_iter().filter(|v| v["name"] != name).collect::<Vec<_>>());
            if let Some(disks) = spec["domain"]["devices"]["disks"].as_array_mut() {
                disks.retain(|d| d["name"] != name);
            }
            Ok(())
        }
    }
}

fn push(spec: &mut Value, key: &str, item: Value) {
    if !spec[key].is_array() {
        spec[key] = json!([]);
    }
    spec[key].as_array_mut().expect("an array").push(item);
}

/// Replaces one part of an object, guarded by its resourceVersion (a concurrent writer makes this fail, as
/// KubeVirt's `test` patch operations do).
async fn replace_path(
    api: &Api<DynamicObject>,
    mut object: DynamicObject,
    path: &[&str],
    value: Value,
) -> kube::Result<()> {
    let mut slot = &mut object.data;
    for key in path {
        slot = &mut slot[*key];
    }
    *slot = value;
    let name = object.metadata.name.clone().unwrap_or_default();
    api.replace(&name, &PostParams::default(), &object).await.map(drop)
}

// ---------------------------------------------------------------------------------------------------------------
// virt-controller and virt-handler.

async fn run_controller(shared: Arc<Shared>) {
    use futures::StreamExt;
    use kube::runtime::{WatchStreamExt, watcher};
    let (ns, client) = (shared.namespace.clone(), shared.client.clone());
    // Backed off on errors, as every controller's watches are: a failing API server must not spin the runtime.
    let changes = futures::stream::select(
        watcher(vms(&client, &ns), watcher::Config::default()).default_backoff().map(drop),
        watcher(vmis(&client, &ns), watcher::Config::default()).default_backoff().map(drop),
    );
    futures::pin_mut!(changes);
    loop {
        if let Err(e) = reconcile(&shared).await {
            tracing::debug!(error = %e, "lab controller: will retry");
            tokio::time::sleep(RESYNC).await;
        }
        let _ = tokio::time::timeout(RESYNC, changes.next()).await;
        // A reconcile that fails at once never waits: yield so the task can always be stopped.
        tokio::task::yield_now().await;
    }
}

async fn reconcile(shared: &Shared) -> Result<()> {
    let (client, ns) = (&shared.client, shared.namespace.as_str());
    bind_claims(shared).await?;
    for vmi in vmis(client, ns).list(&Default::default()).await? {
        let name = vmi.metadata.name.clone().unwrap_or_default();
        if shared.mode == HotplugMode::Declarative && declarative_sync(shared, &vmi).await? {
            continue; // changed: the next round sees the new VMI
        }
        sync_volumes(shared, &name, &vmi).await?;
    }
    Ok(())
}

/// Binds every claim the lab has an image for (there is no provisioner).
async fn bind_claims(shared: &Shared) -> Result<()> {
    let api = claims(&shared.client, &shared.namespace);
    for claim in api.list(&Default::default()).await? {
        let name = claim.metadata.name.clone().unwrap_or_default();
        if claim.data["status"]["phase"] != "Bound" {
            provision(shared, &name, &claim.data["spec"])?;
        }
        if claim.data["status"]["phase"] != "Bound" && shared.images.lock().unwrap().contains_key(&name) {
            let size = claim.data["spec"]["resources"]["requests"]["storage"].clone();
            let status =
                json!({"status": {"phase": "Bound", "accessModes": ["ReadWriteOnce"], "capacity": {"storage": size}}});
            api.patch_status(&name, &PatchParams::default(), &Patch::Merge(&status)).await?;
        }
    }
    Ok(())
}

/// A new image for a claim without one, when the lab provisions claims of its class (or of none).
fn provision(shared: &Shared, claim: &str, spec: &Value) -> Result<()> {
    let Some((dir, class)) = shared.provisioner.lock().unwrap().clone() else { return Ok(()) };
    let wanted = spec["storageClassName"].as_str().unwrap_or(&class);
    let mut images = shared.images.lock().unwrap();
    if wanted != class || images.contains_key(claim) {
        return Ok(());
    }
    let size = spec["resources"]["requests"]["storage"].as_str().unwrap_or_default();
    let bytes = wukong_operator::validate::quantity_bytes(size)
        .map_err(|why| anyhow::anyhow!("claim {claim}: size '{size}' {why}"))?;
    let image = dir.join(format!("{claim}.raw"));
    std::fs::File::create(&image)?.set_len(bytes)?;
    images.insert(claim.to_string(), image);
    Ok(())
}

/// `HandleDeclarativeVolumes`: the VMI's hotpluggable volumes follow its VM's template. A VMI volume gone from
/// the template is dropped at once (that *is* the unplug); a template volume is added unless the VMI still has a
/// status entry for it (an unplug in progress). Returns true when it changed the VMI.
async fn declarative_sync(shared: &Shared, vmi: &DynamicObject) -> Result<bool> {
    let Some(owner) = vmi.metadata.owner_references.iter().flatten().find(|o| o.kind == "VirtualMachine") else {
        return Ok(false);
    };
    let Some(vm) = vms(&shared.client, &shared.namespace).get_opt(&owner.name).await? else { return Ok(false) };
    let template = &vm.data["spec"]["template"]["spec"];
    let mut spec = vmi.data["spec"].clone();
    let listed =
        |spec: &Value, name: &Value| spec["volumes"].as_array().is_some_and(|v| v.iter().any(|v| v["name"] == *name));
    let mut changed = false;
    for volume in spec["volumes"].as_array().cloned().unwrap_or_default() {
        if is_hotpluggable(&volume) && !listed(template, &volume["name"]) {
            let name = volume["name"].as_str().unwrap_or_default();
            change_volumes(&mut spec, false, name, &Value::Null, &Value::Null).ok();
            changed = true;
        }
    }
    let vmi_name = vmi.metadata.name.clone().unwrap_or_default();
    for volume in template["volumes"].as_array().cloned().unwrap_or_default() {
        let name = volume["name"].as_str().unwrap_or_default().to_string();
        let unplugging = shared.volumes.lock().unwrap().contains_key(&(vmi_name.clone(), name.clone()));
        if is_hotpluggable(&volume) && !listed(&spec, &volume["name"]) && !unplugging {
            let disk = disk_of(template, &volume["name"]).unwrap_or_else(|| json!({"name": name, "disk": {}}));
            change_volumes(&mut spec, true, &name, &volume, &disk).ok();
            changed = true;
        }
    }
    if changed {
        replace_path(&vmis(&shared.client, &shared.namespace), vmi.clone(), &["spec"], spec).await?;
    }
    Ok(changed)
}

/// virt-handler: moves each hotpluggable volume of the VMI through KubeVirt's phases, plugs and unplugs it in the
/// guest, and reports `volumeStatus`.
async fn sync_volumes(shared: &Shared, vmi_name: &str, vmi: &DynamicObject) -> Result<()> {
    let spec = &vmi.data["spec"];
    let wanted: BTreeMap<String, (Value, Value)> = spec["volumes"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|v| is_hotpluggable(v))
        .map(|v| {
            let name = v["name"].as_str().unwrap_or_default().to_string();
            let disk = disk_of(spec, &v["name"]).unwrap_or(Value::Null);
            (name, (v.clone(), disk))
        })
        .collect();
    let tracked = shared.plugs_of(vmi_name);
    let mut unplugged = Vec::new();
    for (name, (volume, disk)) in &wanted {
        let key = (vmi_name.to_string(), name.clone());
        let plug = shared.volumes.lock().unwrap().get(&key).cloned();
        let next = match plug {
            None => Some(Plug {
                phase: "Pending",
                since: Instant::now(),
                target: String::new(),
                plugged: false,
                leaving: None,
            }),
            Some(p) if p.since.elapsed() < PHASE_STEP || p.phase == "Ready" => None,
            Some(p) => advance(shared, p, name, volume, disk).await?,
        };
        if let Some(next) = next {
            shared.volumes.lock().unwrap().insert(key, next);
        }
    }
    for (name, mut plug) in tracked.into_iter().filter(|(name, _)| !wanted.contains_key(name)) {
        let key = (vmi_name.to_string(), name.clone());
        let leaving = *plug.leaving.get_or_insert_with(Instant::now);
        if plug.phase != "Detaching" && leaving.elapsed() >= *shared.unplug_delay.lock().unwrap() {
            // Like virt-launcher: the disk left the domain, so it is detached, whatever the guest does with it.
            if plug.plugged
                && let Some(qemu) = &shared.qemu
            {
                unplug(qemu, &name).await?;
            }
            let detaching = Plug { phase: "Detaching", since: Instant::now(), plugged: false, ..plug };
            shared.volumes.lock().unwrap().insert(key, detaching);
        } else if plug.phase == "Detaching" && plug.since.elapsed() >= PHASE_STEP {
            shared.volumes.lock().unwrap().remove(&key);
            unplugged.push(name);
        } else {
            shared.volumes.lock().unwrap().insert(key, plug);
        }
    }
    report_status(shared, vmi_name, vmi).await?;
    for name in unplugged {
        event(shared, vmi, "VolumeUnplugged", &format!("Volume {name} has been unplugged")).await?;
    }
    Ok(())
}

/// The next phase of an attach: Pending → Bound (once its claim is) → AttachedToNode → MountedToPod → Ready.
async fn advance(shared: &Shared, plug: Plug, name: &str, volume: &Value, disk: &Value) -> Result<Option<Plug>> {
    let now = Instant::now();
    let claim = volume["persistentVolumeClaim"]["claimName"].as_str().or(volume["dataVolume"]["name"].as_str());
    let image = claim.and_then(|c| shared.images.lock().unwrap().get(c).cloned());
    let phase = match plug.phase {
        "Pending" if image.is_none() => return Ok(None),
        "Pending" => "Bound",
        "Bound" => "AttachedToNode",
        "AttachedToNode" => "MountedToPod",
        _ => {
            let target = {
                let mut next = shared.next_target.lock().unwrap();
                *next += 1;
                format!("sd{}", (b'a' + *next) as char)
            };
            if let (Some(qemu), Some(path)) = (&shared.qemu, image) {
                let spec = VolumeSpec {
                    name: name.into(),
                    serial: disk["serial"].as_str().unwrap_or(name).to_string(),
                    bus: if disk["disk"]["bus"] == "virtio" { DiskBus::Virtio } else { DiskBus::Scsi },
                    source: VolumeSource::Image { path, format: "raw".into() },
                };
                qemu.add_volume(&spec)
                    .await
                    .with_context(|| format!("the lab's virt-handler could not plug {name}"))?;
            }
            return Ok(Some(Plug { phase: "Ready", since: now, target, plugged: true, leaving: None }));
        }
    };
    Ok(Some(Plug { phase, since: now, ..plug }))
}

/// Unplugs a volume from the guest and waits until QEMU has let go of it, as virt-launcher does.
async fn unplug(qemu: &Qemu, name: &str) -> Result<()> {
    qemu.remove_volume(name).await?;
    while qemu.volume_state(name).await? != VolumeState::Absent {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    qemu.finish_removal(name).await?;
    Ok(())
}

/// Writes `status.volumeStatus` when it changed: the VMI's other entries as they are, the hot-plugged ones from
/// the controller's state.
async fn report_status(shared: &Shared, vmi_name: &str, vmi: &DynamicObject) -> Result<()> {
    let tracked = shared.plugs_of(vmi_name);
    let current = vmi.data["status"]["volumeStatus"].as_array().cloned().unwrap_or_default();
    let mut statuses: Vec<Value> = current
        .iter()
        .filter(|s| s["hotplugVolume"].is_null() && !tracked.contains_key(s["name"].as_str().unwrap_or("")))
        .cloned()
        .collect();
    for (name, plug) in &tracked {
        let ready = plug.phase == "Ready";
        statuses.push(json!({
            "name": name, "phase": plug.phase, "target": plug.target,
            "reason": if ready { "VolumeReady" } else { "" },
            "message": if ready { format!("Successfully attach hotplugged volume {name} to VM") } else { String::new() },
            "hotplugVolume": {"attachPodName": format!("hp-volume-{name}"), "attachPodUID": format!("uid-{name}")},
        }));
    }
    if statuses != current {
        let patch = json!({"status": {"volumeStatus": statuses}});
        vmis(&shared.client, &shared.namespace)
            .patch_status(vmi_name, &PatchParams::default(), &Patch::Merge(&patch))
            .await?;
    }
    Ok(())
}

/// A core Event about the VMI, as virt-handler records one.
async fn event(shared: &Shared, vmi: &DynamicObject, reason: &str, message: &str) -> Result<()> {
    let events = Api::<DynamicObject>::namespaced_with(
        shared.client.clone(),
        &shared.namespace,
        &resource("Event", "", "v1", "events"),
    );
    let event = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Event", "metadata": {"generateName": format!("{}.", vmi.metadata.name.clone().unwrap_or_default())},
        "involvedObject": {"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachineInstance",
                           "name": vmi.metadata.name, "namespace": shared.namespace, "uid": vmi.metadata.uid},
        "reason": reason, "message": message, "type": "Normal", "source": {"component": "virt-handler"},
    }))?;
    events.create(&PostParams::default(), &event).await?;
    Ok(())
}
