//! The KubeVirt backend: the `addvolume`/`removevolume` subresources of a VMI or of its VM, and the VMI's
//! `status.volumeStatus`, through kube-rs.
//!
//! Which object's subresources carry a request ([`Route`]) follows KubeVirt 1.9: with declarative hot-plug (its
//! default) the VM's spec is the truth and VMI requests for a VM-owned VMI are refused, so such a VMI goes through
//! its VM; with the deprecated `HotplugVolumes` gate a VM-owned VMI keeps VMI (ephemeral) hot-plug unless
//! `--persist` asks for the VM. The mode is read from the cluster's `KubeVirt` object. Request bodies and the parts of VMI/VM we read are our own
//! serde types, matching KubeVirt's OpenAPI document (`v1.AddVolumeOptions`, `v1.VolumeStatus`, …).

use crate::hypervisor::{Hypervisor, HypervisorError, Removal, VolumeSource, VolumeSpec, VolumeState};
use http::{Method, Request};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::BTreeMap;
use std::time::Duration;

mod route;
pub use route::{
    AgentTransport, NETWORK_ANNOTATION, PORT_ANNOTATION, RouteError, RouteOptions, RouteSettings, TRANSPORT_ANNOTATION,
    VSOCK_TLS_ANNOTATION, agent_route,
};

/// How often a 422 caused by a concurrent modification is retried, as virtctl does.
const CONFLICT_RETRIES: u32 = 15;
/// KubeVirt's message for a patch that lost a race with another writer (retried).
const CONCURRENT_MODIFICATION: &str = "the server rejected our request due to an error in our request";

/// `v1.AddVolumeOptions`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AddVolumeOptions {
    pub name: String,
    pub disk: Disk,
    pub volume_source: HotplugVolumeSource,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dry_run: Vec<String>,
}

/// `v1.RemoveVolumeOptions`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RemoveVolumeOptions {
    pub name: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dry_run: Vec<String>,
}

/// `v1.Disk` (the parts we set and read).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Disk {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk: Option<DiskTarget>,
}

/// `v1.DiskTarget`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DiskTarget {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bus: Option<String>,
}

/// `v1.HotplugVolumeSource`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HotplugVolumeSource {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub persistent_volume_claim: Option<ClaimSource>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_volume: Option<DataVolumeSource>,
}

/// `v1.PersistentVolumeClaimVolumeSource`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ClaimSource {
    pub claim_name: String,
    #[serde(default)]
    pub hotpluggable: bool,
}

/// `v1.DataVolumeSource`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DataVolumeSource {
    pub name: String,
    #[serde(default)]
    pub hotpluggable: bool,
}

/// The parts of a `v1.VirtualMachineInstance` the companion reads.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct VirtualMachineInstance {
    #[serde(default)]
    pub metadata: Metadata,
    #[serde(default)]
    pub spec: VmiSpec,
    #[serde(default)]
    pub status: VmiStatus,
}

/// `metav1.ObjectMeta` (its name, who owns the object, the annotations that choose how its agent is reached).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Metadata {
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub namespace: String,
    #[serde(default)]
    pub owner_references: Vec<OwnerReference>,
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct OwnerReference {
    #[serde(default)]
    pub kind: String,
    #[serde(default)]
    pub name: String,
}

/// The parts of a `v1.KubeVirt` (the installation's configuration) the companion reads: its feature gates.
#[derive(Debug, Clone, Default, Deserialize)]
struct KubeVirtConfig {
    #[serde(default)]
    spec: Value,
}

#[derive(Debug, Clone, Default, Deserialize)]
struct List<T> {
    #[serde(default = "Vec::new")]
    items: Vec<T>,
}

/// Which hot-plug feature gate the cluster runs (KubeVirt 1.9).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HotplugMode {
    /// `DeclarativeHotplugVolumes`, the default since 1.9: the VM's spec is the truth.
    Declarative,
    /// `HotplugVolumes` (deprecated; takes precedence when on): VMI hot-plug is ephemeral unless the VM is asked.
    HotplugVolumes,
}

/// Which object's subresources carry the hot-plug requests, and why.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// A standalone VMI, or `HotplugVolumes` without --persist: the VMI's (lost at restart).
    Vmi,
    /// --persist: the VM's.
    VmPersist,
    /// Declarative hot-plug and a VM-owned VMI: the VM's (the VMI's would be refused with 400).
    VmDeclarative,
}

impl Route {
    pub fn as_str(self) -> &'static str {
        match self {
            Route::Vmi => "vmi",
            Route::VmPersist => "vm (--persist)",
            Route::VmDeclarative => "vm (declarative hot-plug)",
        }
    }

    fn through_vm(self) -> bool {
        self != Route::Vmi
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct VmiSpec {
    #[serde(default)]
    pub domain: Domain,
    #[serde(default)]
    pub volumes: Vec<Volume>,
    #[serde(default)]
    pub networks: Vec<Network>,
}

/// `v1.Network`: its name, and whether it is the pod network (`pod: {}`); Multus networks are the others.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Network {
    pub name: String,
    #[serde(default)]
    pub pod: Option<serde_json::Value>,
}

/// The network KubeVirt gives a VMI that names none (`autoattachPodInterface`): the pod network, `default`.
const DEFAULT_POD_NETWORK: &str = "default";

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Domain {
    #[serde(default)]
    pub devices: Devices,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Devices {
    #[serde(default)]
    pub disks: Vec<Disk>,
    /// No hot-plug directory in the virt-launcher Pod (template.go `withHotplugSupport`): nothing can be
    /// hot-plugged into the guest.
    #[serde(default)]
    pub disable_hotplug: bool,
    /// A vsock device for the guest (KubeVirt's `VSOCK` feature gate); its CID is then in `status.VSOCKCID`.
    #[serde(default, rename = "autoattachVSOCK")]
    pub autoattach_vsock: Option<bool>,
}

/// `v1.Volume` (name and the hot-pluggable sources).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Volume {
    pub name: String,
    #[serde(default)]
    pub persistent_volume_claim: Option<ClaimSource>,
    #[serde(default)]
    pub data_volume: Option<DataVolumeSource>,
}

impl Volume {
    /// A PVC or DataVolume plugged as hotpluggable.
    pub fn hotpluggable(&self) -> bool {
        self.persistent_volume_claim.as_ref().is_some_and(|c| c.hotpluggable)
            || self.data_volume.as_ref().is_some_and(|d| d.hotpluggable)
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VmiStatus {
    #[serde(default)]
    pub volume_status: Vec<VolumeStatus>,
    #[serde(default)]
    pub interfaces: Vec<NetworkInterface>,
    /// The guest's vsock CID, set by virt-controller once the VMI is scheduled (that exact, uppercase, key).
    #[serde(default, rename = "VSOCKCID")]
    pub vsock_cid: Option<u32>,
}

/// `v1.VolumeStatus`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct VolumeStatus {
    pub name: String,
    #[serde(default)]
    pub target: String,
    #[serde(default)]
    pub phase: String,
    #[serde(default)]
    pub reason: String,
    #[serde(default)]
    pub message: String,
    #[serde(default, rename = "hotplugVolume")]
    pub hotplug_volume: Option<HotplugVolumeStatus>,
}

/// `v1.HotplugVolumeStatus`: the attachment Pod that holds a hot-plugged volume on the node.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HotplugVolumeStatus {
    #[serde(default)]
    pub attach_pod_name: String,
}

/// `v1.VirtualMachineInstanceNetworkInterface`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NetworkInterface {
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub ip_address: String,
}

/// The parts of a `v1.VirtualMachine` the companion reads: its template's volumes and its pending volume requests.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct VirtualMachine {
    #[serde(default)]
    pub metadata: Metadata,
    #[serde(default)]
    pub spec: VmSpec,
    #[serde(default)]
    pub status: VmStatus,
}

/// `v1.VirtualMachineStatus` (the part we read).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VmStatus {
    /// With the `HotplugVolumes` gate, the VM's `addvolume`/`removevolume` only record a request here; virt-controller
    /// carries it out later and drops it once the template reflects it.
    #[serde(default)]
    pub volume_requests: Vec<VolumeRequest>,
}

/// `v1.VirtualMachineVolumeRequest`: one of the two options is set.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VolumeRequest {
    #[serde(default)]
    pub add_volume_options: Option<RequestedVolume>,
    #[serde(default)]
    pub remove_volume_options: Option<RequestedVolume>,
}

/// The volume a request names (the rest of its options is not read).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RequestedVolume {
    pub name: String,
}

/// What a pending request of `vm.status.volumeRequests` asks for a volume.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PendingRequest {
    Add,
    Remove,
}

impl VirtualMachine {
    /// With `updateVolumesStrategy: Migration` declarative hot-plug leaves the VMI alone (hotplug.go
    /// `HandleDeclarativeVolumes` returns at once): a volume that leaves the template stays plugged until the VM
    /// restarts, and one added to it is plugged only then.
    pub fn migrates_volumes(&self) -> bool {
        self.spec.update_volumes_strategy.as_deref() == Some("Migration")
    }

    /// Whether volume `name` is in the VM's template.
    pub fn in_template(&self, name: &str) -> bool {
        self.spec.template.as_ref().is_some_and(|t| t.spec.volumes.iter().any(|v| v.name == name))
    }

    /// The last pending request for volume `name` (virt-api refuses a second one while one is pending, except that a
    /// remove replaces an add).
    pub fn pending_request(&self, name: &str) -> Option<PendingRequest> {
        self.status.volume_requests.iter().rev().find_map(|r| {
            let named = |o: &Option<RequestedVolume>| o.as_ref().is_some_and(|v| v.name == name);
            match (named(&r.add_volume_options), named(&r.remove_volume_options)) {
                (_, true) => Some(PendingRequest::Remove),
                (true, _) => Some(PendingRequest::Add),
                _ => None,
            }
        })
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VmSpec {
    #[serde(default)]
    pub template: Option<VmTemplate>,
    /// `Replacement` (the default) or `Migration`.
    #[serde(default)]
    pub update_volumes_strategy: Option<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct VmTemplate {
    #[serde(default)]
    pub spec: VmiSpec,
}

/// One VMI (and its VM, when it has one) in a namespace.
#[derive(Clone)]
pub struct KubeVirt {
    client: kube::Client,
    namespace: String,
    name: String,
    persist: bool,
    /// The API server, for messages: "the Kubernetes API at https://…".
    api: String,
    /// Found on first use.
    route: tokio::sync::OnceCell<Route>,
    /// The cluster's hot-plug mode when the caller knows it already; `None`: read from the `KubeVirt` object.
    known_mode: Option<HotplugMode>,
}

impl KubeVirt {
    /// `persist`: change the VM's spec (the `virtualmachines/…` subresources), so the volume survives a restart;
    /// implied for a VM-owned VMI when the cluster runs declarative hot-plug.
    pub fn new(client: kube::Client, namespace: &str, name: &str, persist: bool) -> Self {
        Self {
            client,
            namespace: namespace.into(),
            name: name.into(),
            persist,
            api: "the Kubernetes API".into(),
            route: tokio::sync::OnceCell::new(),
            known_mode: None,
        }
    }

    /// Takes the cluster's hot-plug mode as `mode` instead of reading it: for a caller that may not list `KubeVirt`
    /// objects in every namespace (a namespaced install), whose every read would be refused.
    pub fn with_hotplug_mode(mut self, mode: HotplugMode) -> Self {
        self.known_mode = Some(mode);
        self
    }

    /// Which object's subresources this backend uses, found once: --persist, else the VMI's owner and the
    /// cluster's hot-plug mode.
    pub async fn route(&self) -> Result<Route, HypervisorError> {
        self.route
            .get_or_try_init(|| async {
                if self.persist {
                    return Ok(Route::VmPersist);
                }
                let vmi = self.vmi().await?;
                if !vmi.metadata.owner_references.iter().any(|o| o.kind == "VirtualMachine") {
                    return Ok(Route::Vmi);
                }
                let route = match self.hotplug_mode().await {
                    HotplugMode::Declarative => Route::VmDeclarative,
                    HotplugMode::HotplugVolumes => Route::Vmi,
                };
                tracing::info!(vmi = %format!("{}/{}", self.namespace, self.name), route = route.as_str(), "KubeVirt route");
                Ok(route)
            })
            .await
            .copied()
    }

    /// The cluster's hot-plug mode, from its `KubeVirt` object's feature gates (unless [`Self::with_hotplug_mode`]
    /// gave it). Unreadable (no rights, not installed as expected): KubeVirt 1.9's default, declarative, which is
    /// also the safe guess (a VMI request the cluster would refuse is never sent).
    pub async fn hotplug_mode(&self) -> HotplugMode {
        if let Some(mode) = self.known_mode {
            return mode;
        }
        let list: Result<List<KubeVirtConfig>, _> = self.get("/apis/kubevirt.io/v1/kubevirts".into()).await;
        let gates = list.ok().and_then(|l| l.items.into_iter().next()).map(|k| {
            k.spec["configuration"]["developerConfiguration"]["featureGates"].as_array().cloned().unwrap_or_default()
        });
        match gates {
            Some(gates) if gates.iter().any(|g| g == "HotplugVolumes") => HotplugMode::HotplugVolumes,
            Some(_) => HotplugMode::Declarative,
            None => {
                tracing::info!(
                    "cannot read the cluster's KubeVirt object; assuming declarative hot-plug (1.9's default)"
                );
                HotplugMode::Declarative
            }
        }
    }

    /// Names the API server's URL in messages (a client does not expose it).
    pub fn with_api_url(mut self, url: &str) -> Self {
        self.api = format!("the Kubernetes API at {url}");
        self
    }

    fn subresource(&self, route: Route, verb: &str) -> String {
        let kind = if route.through_vm() { "virtualmachines" } else { "virtualmachineinstances" };
        format!("/apis/subresources.kubevirt.io/v1/namespaces/{}/{kind}/{}/{verb}", self.namespace, self.name)
    }

    fn what(&self) -> String {
        let through_vm = self.persist || self.route.get().is_some_and(|r| r.through_vm());
        let kind = if through_vm { "VM" } else { "VMI" };
        format!("{kind} {}/{}", self.namespace, self.name)
    }

    /// PUTs a subresource body; 2xx is success. Retries the 422 a concurrent modification causes, as virtctl does.
    async fn put(&self, verb: &str, body: &impl Serialize) -> Result<(), HypervisorError> {
        let body = serde_json::to_vec(body).expect("option bodies always serialise");
        let route = self.route().await?;
        let mut attempt = 1;
        loop {
            let request = Request::builder()
                .method(Method::PUT)
                .uri(self.subresource(route, verb))
                .header(http::header::CONTENT_TYPE, "application/json")
                .body(body.clone())
                .expect("a valid request");
            match self.client.request_text(request).await {
                Ok(_) => return Ok(()),
                Err(e) => {
                    let err = self.error(e);
                    let retry = matches!(&err, HypervisorError::Invalid { message, .. }
                        if message.contains(CONCURRENT_MODIFICATION));
                    if !retry || attempt >= CONFLICT_RETRIES {
                        return Err(err);
                    }
                    tracing::debug!(attempt, verb, "KubeVirt reported a concurrent modification; retrying");
                    tokio::time::sleep(Duration::from_millis(100 * u64::from(attempt))).await;
                    attempt += 1;
                }
            }
        }
    }

    async fn get<T: serde::de::DeserializeOwned>(&self, path: String) -> Result<T, HypervisorError> {
        let request = Request::get(path).body(Vec::new()).expect("a valid request");
        self.client.request(request).await.map_err(|e| self.error(e))
    }

    /// The VMI as it is now.
    pub async fn vmi(&self) -> Result<VirtualMachineInstance, HypervisorError> {
        self.get(format!("/apis/kubevirt.io/v1/namespaces/{}/virtualmachineinstances/{}", self.namespace, self.name))
            .await
    }

    async fn vm(&self) -> Result<VirtualMachine, HypervisorError> {
        self.get(format!("/apis/kubevirt.io/v1/namespaces/{}/virtualmachines/{}", self.namespace, self.name)).await
    }

    /// The VMI and, when a VM owns it, that VM: what [`agent_route`] reads.
    pub async fn vmi_and_vm(&self) -> Result<(VirtualMachineInstance, Option<VirtualMachine>), HypervisorError> {
        let vmi = self.vmi().await?;
        if !vmi.metadata.owner_references.iter().any(|o| o.kind == "VirtualMachine") {
            return Ok((vmi, None));
        }
        match self.vm().await {
            Ok(vm) => Ok((vmi, Some(vm))),
            // Its VM is being deleted: the VMI's own annotations still say how to reach its agent.
            Err(HypervisorError::NotFound { .. }) => Ok((vmi, None)),
            Err(e) => Err(e),
        }
    }

    /// The claim (PVC or DataVolume name) behind a volume of the VMI.
    pub async fn claim_of(&self, volume: &str) -> Result<Option<String>, HypervisorError> {
        Ok(self.volume_source(volume).await?.and_then(|source| match source {
            VolumeSource::PersistentVolumeClaim(name) | VolumeSource::DataVolume(name) => Some(name),
            VolumeSource::Image { .. } => None,
        }))
    }

    /// Deletes a PersistentVolumeClaim of the VMI's namespace.
    pub async fn delete_claim(&self, claim: &str) -> Result<(), HypervisorError> {
        let path = format!("/api/v1/namespaces/{}/persistentvolumeclaims/{claim}", self.namespace);
        let request = Request::delete(path).body(Vec::new()).expect("a valid request");
        self.client.request_text(request).await.map(|_| ()).map_err(|e| self.error(e))
    }

    /// Names the error by its HTTP status, keeping KubeVirt's message.
    fn error(&self, e: kube::Error) -> HypervisorError {
        let what = self.what();
        match e {
            kube::Error::Api(status) => {
                let message = status.message.clone();
                match status.code {
                    403 => HypervisorError::Forbidden { what, message },
                    404 => HypervisorError::NotFound { what, message },
                    409 => HypervisorError::Conflict { what, message },
                    400 | 422 => HypervisorError::Invalid { what, message },
                    code => HypervisorError::Server { what, code, message },
                }
            }
            kube::Error::SerdeError(e) => HypervisorError::Decode { what, message: e.to_string() },
            other => HypervisorError::Unreachable { what: self.api.clone(), message: other.to_string() },
        }
    }
}

impl Hypervisor for KubeVirt {
    fn describe(&self) -> String {
        self.what()
    }

    /// The claim or DataVolume the VMI's spec names for the volume, as the kind of source it is.
    async fn volume_source(&self, name: &str) -> Result<Option<VolumeSource>, HypervisorError> {
        let vmi = self.vmi().await?;
        Ok(vmi.spec.volumes.into_iter().find(|v| v.name == name).and_then(|v| {
            v.persistent_volume_claim
                .map(|c| VolumeSource::PersistentVolumeClaim(c.claim_name))
                .or_else(|| v.data_volume.map(|d| VolumeSource::DataVolume(d.name)))
        }))
    }

    async fn add_volume(&self, volume: &VolumeSpec) -> Result<(), HypervisorError> {
        let source = match &volume.source {
            VolumeSource::PersistentVolumeClaim(claim) => HotplugVolumeSource {
                persistent_volume_claim: Some(ClaimSource { claim_name: claim.clone(), hotpluggable: true }),
                data_volume: None,
            },
            VolumeSource::DataVolume(name) => HotplugVolumeSource {
                persistent_volume_claim: None,
                data_volume: Some(DataVolumeSource { name: name.clone(), hotpluggable: true }),
            },
            VolumeSource::Image { path, .. } => {
                return Err(HypervisorError::Invalid {
                    what: self.what(),
                    message: format!(
                        "an image file ({}) cannot be hot-plugged into KubeVirt; give a claim or a DataVolume",
                        path.display()
                    ),
                });
            }
        };
        match self.vmi().await {
            Ok(vmi) if vmi.spec.domain.devices.disable_hotplug => {
                return Err(HypervisorError::Invalid {
                    what: self.what(),
                    message: format!(
                        "VMI {}/{} has spec.domain.devices.disableHotplug: true, so its virt-launcher Pod has no \
                         hot-plug directory and KubeVirt can plug nothing into the running guest; nothing was \
                         changed. Add volume '{}' to the VM's spec and restart the VM instead",
                        self.namespace, self.name, volume.name
                    ),
                });
            }
            // A stopped VM has no VMI: the volume goes into its spec only.
            Ok(_) | Err(HypervisorError::NotFound { .. }) => {}
            Err(e) => return Err(e),
        }
        let body = AddVolumeOptions {
            name: volume.name.clone(),
            disk: Disk {
                name: volume.name.clone(),
                serial: Some(volume.serial.clone()),
                disk: Some(DiskTarget { bus: Some(volume.bus.as_str().into()) }),
            },
            volume_source: source,
            dry_run: Vec::new(),
        };
        self.put("addvolume", &body).await
    }

    async fn unplug_blocker(&self, name: &str) -> Result<Option<String>, HypervisorError> {
        let declarative = match self.route().await? {
            Route::Vmi => false,
            Route::VmDeclarative => true,
            Route::VmPersist => self.hotplug_mode().await == HotplugMode::Declarative,
        };
        if !declarative || !self.vm().await?.migrates_volumes() {
            return Ok(None);
        }
        Ok(Some(format!(
            "VM {}/{} has spec.updateVolumesStrategy: Migration, and KubeVirt's declarative hot-plug leaves the VMI of \
             such a VM alone (HandleDeclarativeVolumes), so removing volume '{name}' from its spec would leave the disk \
             plugged until the VM restarts. Set spec.updateVolumesStrategy to Replacement (or remove it) and detach \
             again, or stop the VM",
            self.namespace, self.name
        )))
    }

    async fn remove_volume(&self, name: &str) -> Result<Removal, HypervisorError> {
        self.put("removevolume", &RemoveVolumeOptions { name: name.into(), dry_run: Vec::new() }).await?;
        Ok(Removal::Requested)
    }

    async fn volume_state(&self, name: &str) -> Result<VolumeState, HypervisorError> {
        let vmi = self.vmi().await?;
        // KubeVirt unplugs only what was plugged as hotpluggable; anything else needs the VM's restart.
        if let Some(v) = vmi.spec.volumes.iter().find(|v| v.name == name)
            && !v.hotpluggable()
        {
            return Err(HypervisorError::Invalid {
                what: self.what(),
                message: format!(
                    "volume '{name}' is not hotpluggable: KubeVirt plugs and unplugs only volumes added with \
                     hotpluggable: true (a PVC or DataVolume); this one changes only with a restart of the VM"
                ),
            });
        }
        // Through the VM its template is the truth (with declarative hot-plug, editing it *is* the unplug): a
        // volume gone from it is being removed even while the VMI still carries it.
        let vm = match self.route().await?.through_vm() {
            true => Some(self.vm().await?),
            false => None,
        };
        match volume_state_in(&vmi, vm.as_ref(), name) {
            VolumeState::Removing { phase, mut message } => {
                for (volume, claim) in self.missing_claims(&vmi).await {
                    message.push_str(&format!(
                        "; but KubeVirt hot-plugs and unplugs nothing of this VMI while volume '{volume}' names claim \
                         '{claim}', which does not exist (virt-controller's handleHotplugVolumes stops at it): create \
                         claim '{claim}', or remove volume '{volume}' (the guest never got it: detach it with --force)"
                    ));
                }
                Ok(VolumeState::Removing { phase, message })
            }
            state => Ok(state),
        }
    }
}

impl KubeVirt {
    /// The hot-plugged volumes of the VMI, not attached yet, whose claim does not exist: (volume, claim). One such
    /// volume stops every hot-plug and unplug of the VMI (volume-hotplug.go `handleHotplugVolumes` returns at the
    /// first claim it cannot find), so a removal in progress never ends. A claim that cannot be read for another
    /// reason (no `get` on claims) is not reported.
    async fn missing_claims(&self, vmi: &VirtualMachineInstance) -> Vec<(String, String)> {
        let mut missing = Vec::new();
        for volume in vmi.spec.volumes.iter().filter(|v| v.hotpluggable()) {
            let Some(claim) = &volume.persistent_volume_claim else { continue };
            let status = vmi.status.volume_status.iter().find(|s| s.name == volume.name);
            if status.is_some_and(|s| !s.phase.is_empty() && s.phase != "Pending") {
                continue;
            }
            let path = format!("/api/v1/namespaces/{}/persistentvolumeclaims/{}", self.namespace, claim.claim_name);
            if let Err(HypervisorError::NotFound { .. }) = self.get::<Value>(path).await {
                missing.push((volume.name.clone(), claim.claim_name.clone()));
            }
        }
        missing
    }
}

/// A valid namespace name (an RFC 1123 label): lowercase letters, digits and '-', at most 63, starting and ending
/// with a letter or digit.
pub fn valid_namespace(name: &str) -> bool {
    valid_dns(name, 63, false)
}

/// A valid VM or VMI name (an RFC 1123 subdomain): also '.', at most 253.
pub fn valid_name(name: &str) -> bool {
    valid_dns(name, 253, true)
}

fn valid_dns(name: &str, max: usize, dots: bool) -> bool {
    !name.is_empty()
        && name.len() <= max
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || (dots && b == b'.'))
        && name.bytes().next().is_some_and(|b| b.is_ascii_alphanumeric())
        && name.bytes().last().is_some_and(|b| b.is_ascii_alphanumeric())
}

/// A `kubevirt.io/v1` resource, for clients of dynamic objects.
pub fn resource(kind: &str, plural: &str) -> kube::api::ApiResource {
    kube::api::ApiResource {
        group: "kubevirt.io".into(),
        version: "v1".into(),
        api_version: "kubevirt.io/v1".into(),
        kind: kind.into(),
        plural: plural.into(),
    }
}

pub fn vm_resource() -> kube::api::ApiResource {
    resource("VirtualMachine", "virtualmachines")
}

pub fn vmi_resource() -> kube::api::ApiResource {
    resource("VirtualMachineInstance", "virtualmachineinstances")
}

/// A volume's state from a VMI and, when the VM's template is the truth (declarative hot-plug, or a change made
/// through the VM), its VM: for callers that read both once and ask about several volumes.
pub fn volume_state_in(vmi: &VirtualMachineInstance, vm: Option<&VirtualMachine>, name: &str) -> VolumeState {
    let in_spec = vmi.spec.volumes.iter().any(|v| v.name == name);
    let serial = vmi.spec.domain.devices.disks.iter().find(|d| d.name == name).and_then(|d| d.serial.clone());
    let status = vmi.status.volume_status.iter().find(|s| s.name == name);
    // With the Migration strategy the template says what the VM gets at its next start, not what is unplugged now.
    let in_template = vm.filter(|vm| !vm.migrates_volumes()).map(|vm| vm.in_template(name));
    let request = vm.and_then(|vm| vm.pending_request(name));
    classify(in_spec, in_template, request, status, serial)
}

/// A volume's state from where KubeVirt has it: the VMI's spec, the VM's template (`None` when not consulted), a
/// pending request of the VM's `status.volumeRequests`, and the VMI's volume status. A status entry outlives the
/// volume's removal from the spec (`UnMountedFromPod`, `Detaching`) for as long as an attachment Pod holds the
/// volume: seconds, minutes, or for ever when the Pod that replaces it never runs. That whole time the volume is
/// being removed.
///
/// A pending request comes first: while one waits for virt-controller, the template and the VMI still show the
/// volume as it was (a removal) or already half-changed (an add that reached the VMI before the template). A pending
/// remove is a removal in progress until virt-controller has carried it out and dropped it; a pending add is an
/// attach in progress until the volume is ready.
fn classify(
    in_spec: bool,
    in_template: Option<bool>,
    request: Option<PendingRequest>,
    status: Option<&VolumeStatus>,
    serial: Option<String>,
) -> VolumeState {
    let phase_or =
        |default: &str| status.map(|s| s.phase.as_str()).filter(|p| !p.is_empty()).unwrap_or(default).to_string();
    match request {
        Some(PendingRequest::Remove) => {
            return VolumeState::Removing {
                phase: phase_or("Requested"),
                message: "a remove request for it is pending in the VM's status.volumeRequests; virt-controller \
                          carries it out"
                    .into(),
            };
        }
        // Ready before virt-controller stored the template and dropped the request: attached.
        Some(PendingRequest::Add) => {
            return match status.filter(|s| s.phase == "Ready" && !s.target.is_empty()) {
                Some(s) => VolumeState::Ready { serial, target: s.target.clone() },
                None => VolumeState::Pending {
                    phase: phase_or("Requested"),
                    message: "an add request for it is pending in the VM's status.volumeRequests; virt-controller \
                              carries it out"
                        .into(),
                },
            };
        }
        None => {}
    }
    let leaving = in_template == Some(false) || (!in_spec && in_template.is_none());
    match status {
        Some(s) if leaving || !in_spec => VolumeState::Removing {
            phase: if s.phase.is_empty() { "Unknown".into() } else { s.phase.clone() },
            message: unplugging(s),
        },
        Some(s) if s.phase == "Ready" && !s.target.is_empty() => {
            VolumeState::Ready { serial, target: s.target.clone() }
        }
        Some(s) => VolumeState::Pending { phase: s.phase.clone(), message: s.message.clone() },
        None if in_spec && leaving => VolumeState::Removing {
            phase: "Pending".into(),
            message: "removed from the VM's spec; the VMI still has it".into(),
        },
        None if in_spec || in_template == Some(true) => {
            VolumeState::Pending { phase: "Pending".into(), message: "no volume status yet".into() }
        }
        None => VolumeState::Absent,
    }
}

/// What a volume that left the spec waits for. While its phase is Ready or MountedToPod the guest's domain still has
/// the disk: libvirt's `DetachDeviceFlags` may return with the removal pending until the guest acknowledges it
/// (virtio), or fail; virt-handler reports both only as `SyncFailed` events of the VMI (virt-launcher manager.go
/// `syncDisks`). After that its status entry goes only with the attachment Pod that holds it, and virt-controller
/// deletes that Pod only once no unplugged volume in it is Ready or MountedToPod and, while other hot-plugged volumes
/// stay, once the Pod that replaces it runs (volume-hotplug.go `cleanupAttachmentPods`).
fn unplugging(s: &VolumeStatus) -> String {
    let pod = s.hotplug_volume.as_ref().map(|h| h.attach_pod_name.as_str()).filter(|p| !p.is_empty());
    match pod {
        _ if matches!(s.phase.as_str(), "Ready" | "MountedToPod") => format!(
            "volume '{}' left the spec, but the guest's domain still has the disk: the guest has not acknowledged the \
             unplug, or libvirt failed it; the VMI's SyncFailed events say which (`kubectl get events \
             --field-selector reason=SyncFailed`)",
            s.name
        ),
        Some(pod) => format!(
            "volume '{}' left the spec; KubeVirt keeps its status entry until attachment pod {pod} is gone, which it \
             deletes once the guest let go of the volume and the VMI's newer attachment pod (if other hot-plugged \
             volumes stay) runs: `kubectl get pods -l kubevirt.io=hotplug-disk` shows which is pending and why",
            s.name
        ),
        None => format!("volume '{}' left the spec; KubeVirt is unplugging it", s.name),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(phase: &str, target: &str) -> VolumeStatus {
        VolumeStatus { name: "data1".into(), target: target.into(), phase: phase.into(), ..Default::default() }
    }

    fn kind(state: VolumeState) -> String {
        match state {
            VolumeState::Absent => "absent".into(),
            VolumeState::Pending { phase, .. } => format!("pending {phase}"),
            VolumeState::Ready { target, .. } => format!("ready {target}"),
            VolumeState::Removing { phase, .. } => format!("removing {phase}"),
        }
    }

    #[test]
    fn a_removal_says_what_kubevirt_waits_for() {
        let message = |phase: &str, pod: &str| {
            let hotplug_volume = Some(HotplugVolumeStatus { attach_pod_name: pod.into() });
            let s = VolumeStatus { hotplug_volume, ..status(phase, "") };
            match classify(false, None, None, Some(&s), None) {
                VolumeState::Removing { message, .. } => message,
                other => panic!("{other:?}"),
            }
        };
        assert!(message("Ready", "hp-volume-x").contains("the guest's domain still has the disk"));
        assert!(message("MountedToPod", "hp-volume-x").contains("SyncFailed"));
        assert!(message("Detaching", "hp-volume-x").contains("until attachment pod hp-volume-x is gone"));
        assert!(message("UnMountedFromPod", "").ends_with("KubeVirt is unplugging it"));
    }

    #[test]
    fn a_volume_out_of_the_spec_with_a_status_entry_is_being_removed() {
        let ready = status("Ready", "sda");
        let cases: [(bool, Option<bool>, Option<&VolumeStatus>, &str); 11] = [
            // The VMI alone (no --persist).
            (true, None, Some(&ready), "ready sda"),
            (true, None, Some(&status("MountedToPod", "")), "pending MountedToPod"),
            (true, None, None, "pending Pending"),
            (false, None, Some(&ready), "removing Ready"),
            (false, None, Some(&status("UnMountedFromPod", "sda")), "removing UnMountedFromPod"),
            (false, None, Some(&status("", "")), "removing Unknown"),
            (false, None, None, "absent"),
            // The VM's template decides: gone from it is a removal, even while the VMI still has the volume.
            (true, Some(false), Some(&ready), "removing Ready"),
            (true, Some(false), None, "removing Pending"),
            (false, Some(true), None, "pending Pending"),
            (false, Some(false), None, "absent"),
        ];
        for (in_spec, in_template, status, want) in cases {
            let got = kind(classify(in_spec, in_template, None, status, None));
            assert_eq!(got, want, "in_spec={in_spec} in_template={in_template:?} status={status:?}");
        }
    }

    /// With `updateVolumesStrategy: Migration` KubeVirt does not unplug what leaves the template: the VMI's word
    /// counts, so a volume gone from the template but still plugged is Ready, not being removed for ever.
    #[test]
    fn a_migration_strategy_vm_template_does_not_unplug() {
        let vmi: VirtualMachineInstance = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "vm1"},
            "spec": {"volumes": [{"name": "data1", "persistentVolumeClaim": {"claimName": "c", "hotpluggable": true}}]},
            "status": {"phase": "Running", "volumeStatus": [{"name": "data1", "target": "sda", "phase": "Ready"}]},
        }))
        .unwrap();
        let vm = |strategy: Option<&str>| -> VirtualMachine {
            serde_json::from_value(serde_json::json!({
                "spec": {"updateVolumesStrategy": strategy, "template": {"spec": {"volumes": []}}},
            }))
            .unwrap()
        };
        assert!(vm(Some("Migration")).migrates_volumes());
        assert_eq!(kind(volume_state_in(&vmi, Some(&vm(Some("Migration"))), "data1")), "ready sda");
        assert_eq!(kind(volume_state_in(&vmi, Some(&vm(Some("Replacement"))), "data1")), "removing Ready");
        assert_eq!(kind(volume_state_in(&vmi, Some(&vm(None)), "data1")), "removing Ready");
    }

    /// `HotplugVolumes` through the VM: virt-api only records the request; until virt-controller has carried it out,
    /// the template and the VMI still show the volume as it was, or half-changed.
    #[test]
    fn a_pending_volume_request_decides_over_the_template_and_the_vmi() {
        let ready = status("Ready", "sda");
        let (add, remove) = (Some(PendingRequest::Add), Some(PendingRequest::Remove));
        // in the VMI's spec, in the template, the pending request, the VMI's status entry: the state.
        type Case<'a> = (bool, Option<bool>, Option<PendingRequest>, Option<&'a VolumeStatus>, &'a str);
        let cases: [Case; 7] = [
            // Remove requested: nothing changed yet, the VMI lost it first, then the template too.
            (true, Some(true), remove, Some(&ready), "removing Ready"),
            (false, Some(true), remove, Some(&status("Detaching", "")), "removing Detaching"),
            (false, Some(false), remove, None, "removing Requested"),
            // Add requested: nothing yet, the VMI has it before the template does, then it is ready.
            (false, Some(false), add, None, "pending Requested"),
            (true, Some(false), add, Some(&status("Bound", "")), "pending Bound"),
            (true, Some(false), add, Some(&ready), "ready sda"),
            (true, Some(true), None, Some(&ready), "ready sda"),
        ];
        for (in_spec, in_template, request, status, want) in cases {
            let got = kind(classify(in_spec, in_template, request, status, None));
            assert_eq!(
                got, want,
                "in_spec={in_spec} in_template={in_template:?} request={request:?} status={status:?}"
            );
        }
        let vm: VirtualMachine = serde_json::from_value(serde_json::json!({"status": {"volumeRequests": [
            {"addVolumeOptions": {"name": "data2", "disk": {"name": "data2"}, "volumeSource": {}}},
            {"removeVolumeOptions": {"name": "data1"}}]}}))
        .unwrap();
        assert_eq!(
            (vm.pending_request("data1"), vm.pending_request("data2"), vm.pending_request("data3")),
            (remove, add, None)
        );
    }
}
