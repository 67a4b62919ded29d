//! KubeVirt v1.9 in the lab's genuine API server ([`crate::cluster::Cluster`]), playing what cannot run here:
//!
//! * **virt-api's `subresources.kubevirt.io/v1`**, served as an aggregated API (an `APIService` pointing at this
//!   HTTPS server through an `ExternalName` Service, as virt-api is served): `addvolume`/`removevolume` for VMs and
//!   VMIs, with v1.9's rules, status codes and messages in both feature-gate modes, writing as KubeVirt's
//!   `kubevirt-apiserver` ServiceAccount ([`API_SERVER`]), not as its caller; and a VMI's `vsock`, a websocket the
//!   API server's aggregator proxies as an upgrade, spliced by virt-handler to the lab guest's vsock device, with
//!   virt-handler's TLS ([`crate::kubevirt_vsock`]). RBAC on the subresources is enforced by the API server before a
//!   request gets here (no KubeVirt role grants `vsock`). KubeVirt's admission webhooks are
//!   [`crate::kubevirt_webhooks`].
//! * **The `KubeVirt` object's feature gates** ([`KubeVirtConfig`]): the hot-plug mode ([`HotplugMode`]) and `VSOCK`
//!   (off by default, as in v1.9: a VMI or VM with `autoattachVSOCK` is then refused by virt-api's admission).
//! * **virt-controller and virt-handler** for the lab guest, two loops that watch VMs and VMIs through the API server
//!   as KubeVirt's ServiceAccounts ([`CONTROLLER`], [`HANDLER`], bound to roughly KubeVirt's ClusterRoles by
//!   tests/kubevirt/rbac.yaml), each writing what its upstream counterpart writes: virt-controller the VMI's start up
//!   to Scheduled (with a vsock VMI's cluster-unique `status.VSOCKCID`), the declarative rule (hotpluggable VM
//!   volumes → VMI spec, a changed one unplugged and plugged again) or, with `HotplugVolumes`, a VM's
//!   `status.volumeRequests` (through the VMI's subresources, then the VM's spec), and the attach and detach phases of
//!   `volumeStatus`; virt-handler the phase Running, `interfaces` (none for a VMI without a network interface,
//!   [`VmOptions`]), the volumes' targets and their MountedToPod, Ready and UnMountedFromPod phases, the hot-plugs and
//!   unplugs over QMP with the disk's serial and bus, and the events of each phase change; it also serves KubeVirt's
//!   CA to the guest over vsock. virt-controller's attachment Pods are real Pods (`hp-volume-*`, one per VMI holding
//!   all its hot-plugged volumes; see `handle_hotplug_volumes`), run by the lab's scheduler and kubelet unless an
//!   [`AttachmentPodFault`] keeps them Pending; unplugs in the domain can fail ([`UnplugFailure`]). The VMI CRD has
//!   no status subresource, as KubeVirt ships it: each of these writes is an update of the whole VMI, which every
//!   validating webhook on VMI updates sees. Like KubeVirt the lab checks nothing about use before an unplug: safety
//!   has to come from Wukong. What each unplug pulled out from under the guest is witnessed by the unplug oracle
//!   ([`crate::unplug_oracle`], [`KubeVirtLab::unsafe_unplugs`]), which asks the guest itself, not Wukong.
//!
//! The cluster's storage is [`crate::storage_lab`]: real PersistentVolumes, a provisioner, the PV controller's binder,
//! `WaitForFirstConsumer` classes (a claim of one is bound once the lab's scheduler gives it an attachment Pod's
//! node). virt-controller decides which hot-plugged volumes are ready as v1.9 does (`VolumeReadyToAttachToNode`:
//! a claim that exists is ready whatever its phase, a DataVolume's claim once the DataVolume is Succeeded or
//! PendingPopulation, and a DataVolume in WaitForFirstConsumer gets a population trigger Pod), and virt-handler plugs
//! a Block claim's device and a Filesystem claim's `disk.img` (see [`crate::cdi_lab`] for DataVolumes).

use crate::Guest;
use crate::cluster::{ADMIN, Ca, Cluster, Leaf, create_all};
use crate::kubevirt_vsock::Vsock;
use crate::kubevirt_webhooks::{VM_PATH, VMI_CREATE_PATH, VMI_UPDATE_PATH};
use crate::storage_lab::{self, BindingMode, NODE, Storage, VolumeMode, VolumeScheduling};
use crate::unplug_oracle::{Oracle, UnsafeUnplug};
use anyhow::{Context, Result, bail};
use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use kube::api::{Api, ApiResource, DeleteParams, DynamicObject, ListParams, Patch, PatchParams, PostParams};
use rcgen::ExtendedKeyUsagePurpose;
use serde_json::{Value, json};
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use wukong_controller_client::companion::{self, AttachOptions};
use wukong_controller_client::hypervisor::{DiskBus, Hypervisor, VolumeSource, VolumeSpec, VolumeState};
use wukong_controller_client::kubevirt::KubeVirt;
use wukong_controller_client::qemu::Qemu;

/// How long each attach phase lasts (KubeVirt's take seconds: an attachment pod is scheduled and started).
const PHASE_STEP: Duration = Duration::from_millis(150);
/// How long the lab's KubeVirt takes to unplug a volume that left the spec, unless told otherwise
/// ([`KubeVirtLab::set_unplug_delay`]).
pub const DEFAULT_UNPLUG_DELAY: Duration = PHASE_STEP;
/// How often virt-controller and virt-handler look again when nothing happened (watch events wake them otherwise).
const RESYNC: Duration = Duration::from_millis(100);
/// The namespace virt-api's Service lives in.
pub const KUBEVIRT_NAMESPACE: &str = "kubevirt";
pub(crate) const GROUP: &str = "subresources.kubevirt.io";
/// virt-controller's identity, KubeVirt's ServiceAccount: it creates a running VM's VMI, writes its start up to
/// Scheduled, the declarative VMI spec patches and the attach and detach phases of `volumeStatus`.
pub const CONTROLLER: &str = "system:serviceaccount:kubevirt:kubevirt-controller";
/// virt-handler's identity: it writes the phase Running, `interfaces`, and each volume's target and its MountedToPod,
/// Ready and UnMountedFromPod phases.
pub const HANDLER: &str = "system:serviceaccount:kubevirt:kubevirt-handler";
/// virt-api's identity: its subresources write VMs and VMIs as this account, not as their caller, so a webhook sees
/// `kubevirt-apiserver` for a user's `removevolume`. KubeVirt's VMI admitter lets only KubeVirt's accounts change a
/// VMI's spec.
pub const API_SERVER: &str = "system:serviceaccount:kubevirt:kubevirt-apiserver";
/// The annotations virt-controller writes first on every VMI (vmi.go `execute`).
const LATEST_API_VERSION: &str = "kubevirt.io/latest-observed-api-version";
const STORAGE_API_VERSION: &str = "kubevirt.io/storage-observed-api-version";
/// How long a VMI may take to be Running (four writes, each seen by the next pass).
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// The label KubeVirt puts on its hot-plug attachment Pods.
const ATTACHMENT_LABEL: (&str, &str) = ("kubevirt.io", "hotplug-disk");
/// The lab's label naming the VMI an attachment Pod serves (KubeVirt finds them through the virt-launcher Pod, which
/// the lab has not got).
const ATTACHMENT_VMI_LABEL: &str = "lab.wukong.invalid/vmi";
/// Marks virt-controller's population trigger Pods as temporary (`v1.EphemeralProvisioningObject`).
const EPHEMERAL: &str = "kubevirt.io/ephemeral-provisioning";
/// The image of KubeVirt's attachment Pods (`t.launcherImage`).
const LAUNCHER_IMAGE: &str = "quay.io/kubevirt/virt-launcher:v1.9.0";
/// KubeVirt's filesystem overhead when it finds no CDI resource (`storagetypes.DefaultFSOverhead`): the lab's API
/// server never has one, CDI lab or not (see [`crate::cdi_lab`]).
const DEFAULT_FS_OVERHEAD: &str = "0.055";

/// Why the lab's attachment Pods do not run (the lab's scheduler and kubelet play it; `None` in
/// [`KubeVirtLab::set_attachment_pod_fault`]: each runs once [`KubeVirtLab::set_attachment_pod_start`] passed).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttachmentPodFault {
    /// No node fits: Pending with PodScheduled False (Unschedulable), for as long as the fault lasts.
    Unschedulable,
    /// Scheduled, but its container never starts: the CSI driver will not attach a claim to a second Pod
    /// (ContainerCreating, a Multi-Attach error), for as long as the fault lasts.
    Stuck,
}

/// How virt-launcher's unplug of a disk fails in the guest's domain (libvirt `DetachDeviceFlags`, manager.go
/// `syncDisks`); virt-handler reports each failed sync as a `SyncFailed` Warning event of the VMI, and the volume's
/// status stays Ready because the domain still has the disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UnplugFailure {
    /// `DetachDeviceFlags` returns, but the guest never acknowledges the removal (a virtio disk needs the guest's
    /// PCIe acknowledgement): the disk stays, and every later try is refused by QEMU.
    NeverAcknowledged,
    /// libvirt refuses every try with this message.
    Libvirt(String),
}

/// Which of KubeVirt v1.9's hot-plug feature gates is on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HotplugMode {
    /// `DeclarativeHotplugVolumes` only, v1.9's default: the VM spec is the truth; editing it plugs and unplugs,
    /// and VMI add/remove on a VM-owned VMI is refused with 400.
    Declarative,
    /// `HotplugVolumes` (deprecated in v1.9, takes precedence when on): the VMI's subresources change the VMI; the
    /// VM's only record a request in `vm.status.volumeRequests`, which virt-controller carries out through the VMI's
    /// and then stores in the VM's spec; editing the VM spec does nothing until a restart.
    HotplugVolumes,
}

/// The lab's `KubeVirt` configuration: its feature gates.
#[derive(Debug, Clone, Copy)]
pub struct KubeVirtConfig {
    pub hotplug: HotplugMode,
    /// The `VSOCK` gate (Alpha, off by default through v1.9): VMIs with `autoattachVSOCK` are admitted and get a CID,
    /// and virt-handler serves KubeVirt's CA to guests (see [`crate::kubevirt_vsock`]).
    pub vsock: bool,
}

impl From<HotplugMode> for KubeVirtConfig {
    /// v1.9's defaults but for the hot-plug mode.
    fn from(hotplug: HotplugMode) -> Self {
        Self { hotplug, vsock: false }
    }
}

/// What a lab VM (and its VMI) has besides its root disk.
#[derive(Debug, Clone, Default)]
pub struct VmOptions {
    /// The address its pod network interface reports (`status.interfaces`: where wukongctl looks for the agent).
    /// `None`: no interface at all (`autoattachPodInterface: false`, no networks), as for a guest without
    /// networking; its VMI reports no `interfaces`.
    pub interface_ip: Option<String>,
    /// `autoattachVSOCK: true`: the VMI gets a CID and its vsock subresource reaches the lab's guest (see
    /// [`crate::kubevirt_vsock`]). Refused by KubeVirt's admission unless the lab runs with the `VSOCK` gate.
    pub vsock: bool,
    /// `disableHotplug: true`: its virt-launcher Pod gets no hot-plug directory, so nothing can be hot-plugged into
    /// its guest (see `mount_failures`).
    pub disable_hotplug: bool,
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

/// The VMIs of namespace `ns`.
pub fn vmis(client: &kube::Client, ns: &str) -> Api<DynamicObject> {
    let r = resource("VirtualMachineInstance", "kubevirt.io", "v1", "virtualmachineinstances");
    Api::namespaced_with(client.clone(), ns, &r)
}

fn claims(client: &kube::Client, ns: &str) -> Api<DynamicObject> {
    Api::namespaced_with(client.clone(), ns, &resource("PersistentVolumeClaim", "", "v1", "persistentvolumeclaims"))
}

/// Shared between the aggregated server, virt-controller and virt-handler.
struct Shared {
    /// The admin: the lab's scheduler and kubelet for attachment Pods (not KubeVirt's).
    client: kube::Client,
    /// virt-api, as [`API_SERVER`].
    apiserver: kube::Client,
    /// virt-controller, as [`CONTROLLER`].
    controller: kube::Client,
    /// virt-handler, as [`HANDLER`].
    handler: kube::Client,
    namespace: String,
    mode: HotplugMode,
    /// The `VSOCK` gate, virt-controller's CIDs, KubeVirt's CA and virt-handler's vsock certificate.
    vsock: Arc<Vsock>,
    /// The guest every VMI's domain is, unless `domains` names another for it (see [`KubeVirtLab::add_guest`]).
    guest: Option<LabGuest>,
    /// VMI → the guest that is its domain, for a lab of several VMs with guests of their own.
    domains: Mutex<BTreeMap<String, LabGuest>>,
    /// The serial each hot-plugged volume was plugged with, (VMI, volume) → serial: the oracle finds the disk by it
    /// once the volume, and its disk's serial, have left the spec.
    serials: Mutex<BTreeMap<(String, String), String>>,
    /// The cluster's storage: where a bound claim's data lives, and the scheduler's volume binding.
    storage: Arc<Storage>,
    /// What virt-launcher's domains hold, as virt-handler sees them: (VMI, volume) → the disk's target.
    domain: Mutex<BTreeMap<(String, String), String>>,
    /// When each (VMI, volume)'s status last changed phase, to pace the phases.
    stamps: Mutex<BTreeMap<(String, String), Instant>>,
    /// When virt-handler first saw a plugged volume gone from its VMI's spec.
    leaving: Mutex<BTreeMap<(String, String), Instant>>,
    /// VMI → the address its interface reports.
    addresses: Mutex<BTreeMap<String, String>>,
    /// How long KubeVirt takes from a volume leaving the VMI's spec to the guest losing the disk (virt-handler,
    /// virt-launcher and the attachment pod; seconds in a real cluster). Its status entry stays as it was meanwhile.
    unplug_delay: Mutex<Duration>,
    /// A 500 for every `removevolume` (the volume stays): a removal KubeVirt really refuses.
    refuse_removals: Mutex<Option<String>>,
    /// How virt-launcher's unplugs fail, if they do.
    unplug_failure: Mutex<Option<UnplugFailure>>,
    /// When each (VMI, volume)'s failing unplug was last tried.
    unplug_tried: Mutex<BTreeMap<(String, String), Instant>>,
    /// (VMI, volume)s virt-handler could not mount into their virt-launcher Pod (`disableHotplug`, or a Filesystem
    /// claim without `disk.img`), reported.
    mount_failed: Mutex<BTreeSet<(String, String)>>,
    /// How long a new attachment Pod takes to run (scheduled, its claims attached to the node, its container up).
    pod_start: Mutex<Duration>,
    /// What keeps new attachment Pods from running.
    pod_fault: Mutex<Option<AttachmentPodFault>>,
    /// When each attachment Pod was created, on the lab's clock (the API server's timestamps have whole seconds).
    pods_created: Mutex<BTreeMap<String, Instant>>,
    /// virt-controller is down (restarting, say): it writes nothing until resumed.
    controller_paused: AtomicBool,
    /// The next spec patch of virt-api loses a race: another write of the list it tests lands between its read and
    /// its patch.
    lose_next_race: AtomicBool,
    next_target: Mutex<u8>,
    /// Every hot-plug request virt-api received, as it received it.
    received: Mutex<Vec<Received>>,
}

/// A guest that is a VMI's domain: virt-launcher plugs into it over its companion QMP socket, and the unplug oracle
/// asks it, through its control channel, what held each disk virt-handler unplugs.
#[derive(Clone)]
struct LabGuest {
    qemu: Arc<Qemu>,
    oracle: Arc<Oracle>,
}

impl LabGuest {
    async fn connect(guest: &crate::Guest) -> Result<Self> {
        let qemu = Arc::new(Qemu::connect(&guest.companion_qmp()).await?);
        Ok(Self { qemu, oracle: Arc::new(Oracle::new(guest.shell())) })
    }
}

impl Shared {
    /// The guest that is VMI `vmi`'s domain, if the lab has guests.
    fn guest_of(&self, vmi: &str) -> Option<LabGuest> {
        self.domains.lock().unwrap().get(vmi).cloned().or_else(|| self.guest.clone())
    }

    /// Every guest of the lab.
    fn guests(&self) -> Vec<LabGuest> {
        self.guest.iter().cloned().chain(self.domains.lock().unwrap().values().cloned()).collect()
    }
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

/// KubeVirt, as far as the lab plays it, in one namespace of a [`Cluster`], with the cluster's storage
/// ([`crate::storage_lab`]). Stops virt-api, virt-controller, virt-handler and the storage controllers on drop.
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
    /// Installs KubeVirt's CRDs, aggregated API and identities (tests/kubevirt/rbac.yaml) in `cluster`, which must
    /// have been started with the users [`API_SERVER`], [`CONTROLLER`] and [`HANDLER`], and starts virt-controller
    /// and virt-handler for `namespace`, which it creates, and the cluster's storage controllers (no StorageClass yet:
    /// see [`Self::provision_class`]). With a guest, volumes are really plugged into it (over its companion QMP
    /// socket); without one they only move through the phases.
    pub async fn start(
        cluster: &Cluster,
        guest: Option<&crate::Guest>,
        namespace: &str,
        mode: HotplugMode,
    ) -> Result<Self> {
        Self::start_with(cluster, guest, namespace, mode.into()).await
    }

    /// [`Self::start`] with the feature gates of `config`. With the `VSOCK` gate and a guest that has a vsock device,
    /// the guest is every vsock VMI's domain, and virt-handler serves KubeVirt's CA to it.
    pub async fn start_with(
        cluster: &Cluster,
        guest: Option<&crate::Guest>,
        namespace: &str,
        config: KubeVirtConfig,
    ) -> Result<Self> {
        let mode = config.hotplug;
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
        install_kubevirt_config(&client, config).await?;
        let vsock_socket = guest.filter(|g| g.has_vsock()).map(crate::Guest::vsock_socket);
        let guest = match guest {
            Some(g) => Some(LabGuest::connect(g).await?),
            None => None,
        };
        let text = std::fs::read_to_string(crate::workspace_root().join("tests/kubevirt/rbac.yaml"))?;
        create_all(&client, serde_saphyr::from_multiple(&text).context("tests/kubevirt/rbac.yaml")?).await?;
        let as_kubevirt = |user| async move {
            cluster.client(user).await.with_context(|| {
                format!(
                    "the lab's KubeVirt runs as {user}: start the cluster with kubevirt_lab::API_SERVER, CONTROLLER \
                     and HANDLER"
                )
            })
        };
        let storage = Arc::new(Storage::new(client.clone(), cluster.runs_controller_manager()));
        let shared = Arc::new(Shared {
            apiserver: as_kubevirt(API_SERVER).await?,
            controller: as_kubevirt(CONTROLLER).await?,
            handler: as_kubevirt(HANDLER).await?,
            client: client.clone(),
            namespace: namespace.into(),
            mode,
            vsock: Arc::new(Vsock::new(config.vsock, vsock_socket)?),
            guest,
            domains: Mutex::new(BTreeMap::new()),
            serials: Mutex::new(BTreeMap::new()),
            storage: storage.clone(),
            domain: Mutex::new(BTreeMap::new()),
            stamps: Mutex::new(BTreeMap::new()),
            leaving: Mutex::new(BTreeMap::new()),
            addresses: Mutex::new(BTreeMap::new()),
            unplug_delay: Mutex::new(DEFAULT_UNPLUG_DELAY),
            refuse_removals: Mutex::new(None),
            unplug_failure: Mutex::new(None),
            unplug_tried: Mutex::new(BTreeMap::new()),
            mount_failed: Mutex::new(BTreeSet::new()),
            pod_start: Mutex::new(PHASE_STEP),
            pod_fault: Mutex::new(None),
            pods_created: Mutex::new(BTreeMap::new()),
            controller_paused: AtomicBool::new(false),
            lose_next_race: AtomicBool::new(false),
            next_target: Mutex::new(0),
            received: Mutex::new(Vec::new()),
        });
        let server = serve_subresources(cluster, shared.clone()).await?;
        let controller = tokio::spawn(run(shared.clone(), Component::Controller));
        let handler = tokio::spawn(run(shared.clone(), Component::Handler));
        let storage = tokio::spawn(storage.run(RESYNC));
        let mut tasks = vec![server, controller, handler, storage];
        tasks.extend(shared.vsock.serve_ca()?);
        Ok(Self { shared, tasks })
    }

    /// Makes `guest` VMI `vmi`'s domain (a VM with a guest of its own, beside the one given to [`Self::start`]): what
    /// is plugged into that VMI is plugged into `guest`. Call before the VMI is created.
    pub async fn add_guest(&self, vmi: &str, guest: &crate::Guest) -> Result<()> {
        let connected = LabGuest::connect(guest).await?;
        self.shared.domains.lock().unwrap().insert(vmi.into(), connected);
        Ok(())
    }

    /// Every unplug virt-handler did while the guest still used the disk (mounted, swapped on, a holder's member,
    /// held by a process), or whose use the oracle could not learn, with what held it ([`crate::unplug_oracle`]).
    /// Always empty without a guest.
    pub fn unsafe_unplugs(&self) -> Vec<UnsafeUnplug> {
        self.shared.guests().iter().flat_map(|g| g.oracle.unsafe_unplugs()).collect()
    }

    /// How many unplugs the oracle checked, safe or not.
    pub fn checked_unplugs(&self) -> usize {
        self.oracle_round_trips().len()
    }

    /// How long the oracle's question to the guest took, for each checked unplug in order: what it adds to an unplug.
    pub fn oracle_round_trips(&self) -> Vec<Duration> {
        self.shared.guests().iter().flat_map(|g| g.oracle.round_trips()).collect()
    }

    /// How long an unplug takes from the volume leaving the VMI's spec until the guest loses the disk (default
    /// 150 ms; a real KubeVirt takes seconds).
    pub fn set_unplug_delay(&self, delay: Duration) {
        *self.shared.unplug_delay.lock().unwrap() = delay;
    }

    /// How long a new attachment Pod takes to run (default 150 ms; seconds to minutes in a real cluster). An unplug
    /// of one of several hot-plugged volumes ends only once the Pod that replaces their old one runs.
    pub fn set_attachment_pod_start(&self, delay: Duration) {
        *self.shared.pod_start.lock().unwrap() = delay;
    }

    /// Keeps every attachment Pod that is not running yet from running, for as long as `fault` is set.
    pub fn set_attachment_pod_fault(&self, fault: Option<AttachmentPodFault>) {
        *self.shared.pod_fault.lock().unwrap() = fault;
    }

    /// The attachment Pods of VMI `vmi` as stored in the API server, oldest first.
    pub async fn attachment_pods(&self, vmi: &str) -> Result<Vec<DynamicObject>> {
        Ok(attachment_pods(&self.shared, &self.shared.client, vmi).await?)
    }

    /// Makes every unplug in the guest's domain fail that way, for as long as it is set (`None`: they work again,
    /// as when the guest finally acknowledges).
    pub fn set_unplug_failure(&self, failure: Option<UnplugFailure>) {
        *self.shared.unplug_failure.lock().unwrap() = failure;
    }

    /// Refuse every `removevolume` with a 500 carrying `message` (`None`: accept them again).
    pub fn refuse_removals(&self, message: Option<&str>) {
        *self.shared.refuse_removals.lock().unwrap() = message.map(str::to_string);
    }

    /// Stops (`true`) or resumes the lab's virt-controller, as its restart or an outage does: meanwhile it writes
    /// nothing (a VM's volume requests stay pending, VMI phases and volume statuses stay as they are).
    pub fn pause_controller(&self, paused: bool) {
        self.shared.controller_paused.store(paused, Ordering::SeqCst);
    }

    /// virt-api's next VM or VMI spec patch loses a race with another writer (virt-controller changes the disks it
    /// tests first), so its JSON patch's `test` fails: KubeVirt answers 422 and its clients retry.
    pub fn lose_next_race(&self) {
        self.shared.lose_next_race.store(true, Ordering::SeqCst);
    }

    /// Every hot-plug request the lab's virt-api received (the API server does not record proxied bodies).
    pub fn received(&self) -> Vec<Received> {
        self.shared.received.lock().unwrap().clone()
    }

    /// KubeVirt's CA (PEM), which signs virt-handler's vsock client certificate and which virt-handler serves to
    /// guests at host CID 2, port 1.
    pub fn kubevirt_ca(&self) -> &str {
        self.shared.vsock.ca_pem()
    }

    /// The client certificate virt-handler presents to guests on `vsock?tls=true` from now on (its Secret
    /// `kubevirt-virt-handler-vsock-client-certs` replaced): `leaf`, or (`None`) the lab's own, signed by
    /// [`Self::kubevirt_ca`]. A leaf from [`crate::kubevirt_vsock::foreign_client_certificate`] is one a guest that
    /// verifies against KubeVirt's CA must refuse.
    pub fn set_vsock_client_certificate(&self, leaf: Option<&Leaf>) -> Result<()> {
        self.shared.vsock.set_client_certificate(leaf)
    }

    /// A `volumeMode: Block` PersistentVolumeClaim of the size of `image`, bound to a PersistentVolume an
    /// administrator made of `image` (pre-bound to the claim, policy Retain: the image is the test's, and stays).
    pub async fn create_claim(&self, name: &str, image: &Path) -> Result<()> {
        self.shared.storage.add_static_claim(&self.shared.namespace, name, image).await
    }

    /// Where claim `name` of the lab's namespace keeps its data once bound (`None` before): a Filesystem claim's disk
    /// is `disk.img` at the volume's root ([`storage_lab::Volume::disk_image`]), which KubeVirt never creates for a
    /// hot-plugged volume: CDI does, or whoever fills the volume.
    pub async fn claim_volume(&self, name: &str) -> Result<Option<storage_lab::Volume>> {
        self.shared.storage.volume(&self.shared.namespace, name).await
    }

    /// The cluster's storage, for the CDI lab.
    pub(crate) fn storage(&self) -> Arc<Storage> {
        self.shared.storage.clone()
    }

    /// A stopped VM `name` (no VMI), with the pod network's interface: hot-plugs change only its spec.
    pub async fn create_stopped_vm(&self, name: &str) -> Result<()> {
        // The address is what its VMI would report; it never runs.
        let options = VmOptions { interface_ip: Some(String::new()), ..Default::default() };
        self.create_vm_object(name, false, &options).await.map(drop)
    }

    async fn create_vm_object(&self, name: &str, running: bool, options: &VmOptions) -> Result<DynamicObject> {
        let vm: DynamicObject = serde_json::from_value(json!({
            "apiVersion": "kubevirt.io/v1", "kind": "VirtualMachine", "metadata": {"name": name},
            "spec": {"running": running, "template": {"metadata": {"labels": {"kubevirt.io/vm": name}},
                     "spec": vmi_spec(options)}},
        }))?;
        Ok(vms(&self.shared.client, &self.shared.namespace).create(&PostParams::default(), &vm).await?)
    }

    /// The default StorageClass `class`, `Immediate`, its volumes made in `dir` by the lab's provisioner (see
    /// [`Self::provision_class`]).
    pub async fn provision(&self, dir: &Path, class: &str) -> Result<()> {
        self.provision_class(dir, class, BindingMode::Immediate, true).await
    }

    /// A StorageClass `class` served by the lab's provisioner ([`storage_lab::PROVISIONER`]) with `mode`, its volumes
    /// in `dir` (a sparse file for a Block claim, a directory for a Filesystem one); with `default`, the cluster's
    /// default class (the API server gives it to claims that name none).
    pub async fn provision_class(&self, dir: &Path, class: &str, mode: BindingMode, default: bool) -> Result<()> {
        self.shared.storage.add_class(dir, class, mode, default).await
    }

    /// As [`Self::provision_class`], served by the lab's CSI driver ([`storage_lab::CSI_DRIVER`]): `csi` volumes,
    /// which [`crate::snapshot_lab`] can snapshot and restore.
    pub async fn provision_csi_class(&self, dir: &Path, class: &str, mode: BindingMode, default: bool) -> Result<()> {
        self.shared.storage.add_csi_class(dir, class, mode, default).await
    }

    /// A running VM `name` and its VMI (owned by it), for the lab guest. With `owned: false`, a standalone VMI.
    /// `interface_ip` is what the VMI reports as its address (where wukongctl looks for the agent). Returns once the
    /// lab's virt-controller and virt-handler have started it.
    pub async fn create_vm(&self, name: &str, owned: bool, interface_ip: &str) -> Result<()> {
        self.create_vm_with(name, owned, &VmOptions { interface_ip: Some(interface_ip.into()), ..Default::default() })
            .await
    }

    /// As [`Self::create_vm`] with `disableHotplug: true` in the VMI's devices: its virt-launcher Pod gets no
    /// hot-plug directory, so nothing can be hot-plugged into its guest (see `hotplug_mount_failure`).
    pub async fn create_vm_without_hotplug(&self, name: &str, interface_ip: &str) -> Result<()> {
        let options =
            VmOptions { interface_ip: Some(interface_ip.into()), disable_hotplug: true, ..Default::default() };
        self.create_vm_with(name, true, &options).await
    }

    /// As [`Self::create_vm`], the VM (or standalone VMI) as `options` say: with or without an interface, with a
    /// vsock device.
    pub async fn create_vm_with(&self, name: &str, owned: bool, options: &VmOptions) -> Result<()> {
        let ns = &self.shared.namespace;
        if let Some(address) = &options.interface_ip {
            self.shared.addresses.lock().unwrap().insert(name.into(), address.clone());
        }
        let mut metadata = json!({"name": name});
        // virt-controller starts a running VM's VMI from its template (vm.go `startVMI`); a standalone VMI is its
        // user's.
        let creator = match owned {
            true => {
                let vm = self.create_vm_object(name, true, options).await?;
                metadata["labels"] = vm.data["spec"]["template"]["metadata"]["labels"].clone();
                metadata["ownerReferences"] = json!([{"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachine",
                    "name": name, "uid": vm.metadata.uid, "controller": true, "blockOwnerDeletion": true}]);
                &self.shared.controller
            }
            false => &self.shared.client,
        };
        let vmi: DynamicObject = serde_json::from_value(json!({
            "apiVersion": "kubevirt.io/v1", "kind": "VirtualMachineInstance", "metadata": metadata,
            "spec": vmi_spec(options),
        }))?;
        vmis(creator, ns).create(&PostParams::default(), &vmi).await?;
        let api = vmis(&self.shared.client, ns);
        let started = Instant::now();
        loop {
            let phase = api.get(name).await?.data["status"]["phase"].clone();
            if phase == "Running" {
                return Ok(());
            }
            if started.elapsed() > START_TIMEOUT {
                bail!(
                    "the lab's KubeVirt did not start VMI {ns}/{name} within {START_TIMEOUT:?}: its phase is {phase}"
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// The companion's shipped RBAC (deploy/companion-rbac.yaml), bound to `user` in `ns` (the cluster-wide reader with a
/// ClusterRoleBinding); `without` drops every rule that grants that verb on that resource, to prove each rule is
/// needed.
pub async fn bind_companion_rbac(cluster: &Cluster, ns: &str, user: &str, without: Option<(&str, &str)>) -> Result<()> {
    let text = std::fs::read_to_string(crate::workspace_root().join("deploy/companion-rbac.yaml"))?;
    let documents: Vec<Value> = serde_saphyr::from_multiple(&text).context("deploy/companion-rbac.yaml")?;
    let client = cluster.client(ADMIN).await?;
    let subject = json!([{"kind": "User", "name": user, "apiGroup": "rbac.authorization.k8s.io"}]);
    for mut doc in documents {
        let kind = doc["kind"].as_str().unwrap_or_default().to_string();
        let name = format!("{}-{user}", doc["metadata"]["name"].as_str().unwrap_or_default());
        doc["metadata"]["name"] = json!(name);
        match kind.as_str() {
            "ClusterRole" => {
                if let (Some((verb, resource)), Some(rules)) = (without, doc["rules"].as_array_mut()) {
                    for rule in rules.iter_mut() {
                        let grants = rule["verbs"].as_array().is_some_and(|v| v.iter().any(|v| v == verb));
                        if let (true, Some(resources)) = (grants, rule["resources"].as_array_mut()) {
                            resources.retain(|r| r != resource);
                        }
                    }
                    rules.retain(|r| r["resources"].as_array().is_some_and(|r| !r.is_empty()));
                }
            }
            "RoleBinding" | "ClusterRoleBinding" => {
                doc["roleRef"]["name"] =
                    json!(format!("{}-{user}", doc["roleRef"]["name"].as_str().unwrap_or_default()));
                doc["subjects"] = subject.clone();
                if kind == "RoleBinding" {
                    doc["metadata"]["namespace"] = json!(ns);
                }
            }
            other => bail!("deploy/companion-rbac.yaml has a {other}, which this test does not expect"),
        }
        let plural = format!("{}s", kind.to_lowercase());
        let resource = resource(&kind, "rbac.authorization.k8s.io", "v1", &plural);
        let api: Api<DynamicObject> = match kind.as_str() {
            "RoleBinding" => Api::namespaced_with(client.clone(), ns, &resource),
            _ => Api::all_with(client.clone(), &resource),
        };
        api.create(&PostParams::default(), &serde_json::from_value(doc)?).await?;
    }
    Ok(())
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

/// virtctl-style `removevolume` of `volume` from `plural` (`virtualmachines` or `virtualmachineinstances`) `name` in
/// `ns`, through the aggregated API as `client`; with `dry_run`, `dryRun: ["All"]` in the body, as virtctl sends it.
pub async fn removevolume(
    client: &kube::Client,
    ns: &str,
    plural: &str,
    name: &str,
    volume: &str,
    dry_run: bool,
) -> kube::Result<()> {
    let path = format!("/apis/subresources.kubevirt.io/v1/namespaces/{ns}/{plural}/{name}/removevolume");
    let mut body = json!({"name": volume});
    if dry_run {
        body["dryRun"] = json!(["All"]);
    }
    let request = http::Request::put(path)
        .header("content-type", "application/json")
        .body(serde_json::to_vec(&body).expect("JSON"))
        .expect("a request");
    client.request_text(request).await.map(drop)
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

/// The spec of the lab's VMIs (and VM templates): a container disk to boot from, and what `options` add.
fn vmi_spec(options: &VmOptions) -> Value {
    let (domain, volumes) = root_disk(options.disable_hotplug);
    let mut spec = json!({"domain": domain, "volumes": volumes});
    let devices = &mut spec["domain"]["devices"];
    match options.interface_ip {
        // The pod network, as virt-api's defaulting gives a VMI that names none (`autoattachPodInterface`); the lab's
        // virt-handler reports its interface under that name.
        Some(_) => {
            devices["interfaces"] = json!([{"name": "default", "masquerade": {}}]);
            spec["networks"] = json!([{"name": "default", "pod": {}}]);
        }
        // Without it, virt-api's defaulting would add the pod network.
        None => devices["autoattachPodInterface"] = json!(false),
    }
    if options.vsock {
        spec["domain"]["devices"]["autoattachVSOCK"] = json!(true);
    }
    spec
}

/// The domain and volumes of the lab's VMs: a container disk to boot from.
fn root_disk(disable_hotplug: bool) -> (Value, Value) {
    let mut domain = json!({"devices": {"disks": [{"name": "rootdisk", "disk": {"bus": "virtio"}}]},
                            "memory": {"guest": "512Mi"}});
    if disable_hotplug {
        domain["devices"]["disableHotplug"] = json!(true);
    }
    let volumes = json!([{"name": "rootdisk", "containerDisk": {"image": "quay.io/containerdisks/debian:12"}}]);
    (domain, volumes)
}

/// The `KubeVirt` object of an installation (`kubevirts.kubevirt.io`), whose feature gates say which hot-plug mode
/// runs and whether vsock may be used. Its schema is not in the document the other CRDs come from and nothing here
/// reads more than the gates.
async fn install_kubevirt_config(client: &kube::Client, config: KubeVirtConfig) -> Result<()> {
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
    let hotplug = match config.hotplug {
        HotplugMode::Declarative => None,
        HotplugMode::HotplugVolumes => Some("HotplugVolumes"),
    };
    let gates: Vec<&str> = hotplug.into_iter().chain(config.vsock.then_some("VSOCK")).collect();
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

/// Serves `subresources.kubevirt.io/v1` and KubeVirt's validating webhooks ([`crate::kubevirt_webhooks`]) over
/// HTTPS, as virt-api does, and registers both with the API server.
async fn serve_subresources(cluster: &Cluster, shared: Arc<Shared>) -> Result<tokio::task::JoinHandle<()>> {
    let ca = Ca::new("wukong lab virt-api CA")?;
    let service_name = format!("virt-api.{KUBEVIRT_NAMESPACE}.svc");
    let leaf = ca.leaf("virt-api", &[&service_name], ExtendedKeyUsagePurpose::ServerAuth)?;
    let acceptor = leaf.tls_acceptor()?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    let task = tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let (acceptor, shared) = (acceptor.clone(), shared.clone());
            // As virt-api's Go server: Go sets TCP_NODELAY on every connection. Without it the vsock websocket's
            // small frames would wait out the API server's delayed ACKs (about 40 ms a round trip).
            let _ = stream.set_nodelay(true);
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(stream).await else { return };
                let service = hyper::service::service_fn(move |req| handle(shared.clone(), req));
                let io = hyper_util::rt::TokioIo::new(tls);
                // With upgrades: the vsock subresource is a websocket.
                let connection = hyper::server::conn::http1::Builder::new().serve_connection(io, service);
                let _ = connection.with_upgrades().await;
            });
        }
    });
    register(cluster, port, &ca.pem).await?;
    crate::kubevirt_webhooks::register(&cluster.client(ADMIN).await?, port, &ca.pem).await?;
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

pub(crate) type Reply = Response<Full<Bytes>>;

fn reply(status: StatusCode, body: String) -> Reply {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)))
        .expect("a valid response")
}

/// A `metav1.Status` failure, as virt-api writes them.
pub(crate) fn failure(code: StatusCode, message: &str) -> Reply {
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
    tracing::debug!(%method, %path, %user, "lab virt-api request");
    let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    // Before the body is read: the request may become a websocket.
    if let (&Method::GET, ["apis", GROUP, "v1", "namespaces", ns, "virtualmachineinstances", name, "vsock"]) =
        (&method, parts.as_slice())
    {
        return Ok(crate::kubevirt_vsock::subresource(&shared.apiserver, &shared.vsock, req, ns, name).await);
    }
    let body = req.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
    Ok(match (method, parts.as_slice()) {
        (Method::GET, ["apis", GROUP, "v1"]) => reply(StatusCode::OK, resource_list().to_string()),
        (Method::POST, [webhook])
            if [VMI_CREATE_PATH, VMI_UPDATE_PATH, VM_PATH].contains(&format!("/{webhook}").as_str()) =>
        {
            let review = serde_json::from_slice(&body).unwrap_or(Value::Null);
            reply(StatusCode::OK, crate::kubevirt_webhooks::answer(&path, &review, shared.vsock.gate).to_string())
        }
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

/// virt-api's discovery of `subresources.kubevirt.io/v1`, as far as the lab serves it. v1.9 does not list
/// `virtualmachineinstances/vsock` (pkg/virt-api/api.go `getAPISubResources`), so neither does the lab: a client
/// that goes by discovery does not find the vsock subresource.
fn resource_list() -> Value {
    let resources: Vec<Value> = ["virtualmachineinstances", "virtualmachines"]
        .iter()
        .flat_map(|kind| ["addvolume", "removevolume"].map(|verb| (kind, verb)))
        .map(|(kind, verb)| json!({"name": format!("{kind}/{verb}"), "namespaced": true, "kind": "", "verbs": ["update"]}))
        .collect();
    json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": format!("{GROUP}/v1"), "resources": resources})
}

type Refusal = (StatusCode, String);

/// One `addvolume`/`removevolume`, with virt-api v1.9's checks, in its order, and messages
/// (pkg/virt-api/rest/volumes.go). virt-api reads and writes as its own ServiceAccount ([`API_SERVER`]), whoever
/// called it; a dry run is the same PATCH with `dryRun: All` (`getDryRunOption`), so every webhook reviews it.
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
    // `getDryRunOption` honours the option only when its first value is "All".
    let dry_run = body["dryRun"][0] == "All";
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
    let client = &shared.apiserver;
    // `errors.NewNotFound(v1.Resource(resource), name)`.
    let not_found = |resource: &str| (StatusCode::NOT_FOUND, format!("{resource}.kubevirt.io \"{name}\" not found"));
    let internal = |e: kube::Error| (StatusCode::INTERNAL_SERVER_ERROR, e.to_string());
    match kind {
        "virtualmachines" => {
            let api = vms(client, ns);
            let vm = api.get_opt(name).await.map_err(internal)?.ok_or_else(|| not_found("virtualmachine"))?;
            let mut spec = vm.data["spec"]["template"]["spec"].clone();
            change_volumes(&mut spec, add, &volume, &new_volume, &new_disk)
                .map_err(conflict("virtualmachine", name))?;
            // With HotplugVolumes the VM route only records a request (`vmVolumePatchStatus`); virt-controller
            // carries it out later.
            if shared.mode == HotplugMode::HotplugVolumes {
                return request_volume_change(&api, &vm, add, &volume, &body, dry_run).await;
            }
            if !dry_run {
                race(shared, &vm, "/spec/template/spec").await;
            }
            patch_spec(&api, &vm, "/spec/template/spec", &spec, dry_run).await.map_err(|e| patch_failed("vm", e))
        }
        "virtualmachineinstances" => {
            let api = vmis(client, ns);
            let vmi = api.get_opt(name).await.map_err(internal)?.ok_or_else(|| not_found("virtualmachineinstance"))?;
            // `vmiVolumePatch` checks the owner before the phase: a stopped VM's VMI is refused as owned (400).
            let owned = vmi.metadata.owner_references.iter().flatten().any(|o| o.kind == "VirtualMachine");
            if owned && shared.mode == HotplugMode::Declarative {
                return Err(bad(&format!("VMI {ns}/{name} is owned by a VM")));
            }
            if vmi.data["status"]["phase"] != "Running" {
                return Err(conflict("virtualmachineinstance", name)("VMI is not running".into()));
            }
            let mut spec = vmi.data["spec"].clone();
            change_volumes(&mut spec, add, &volume, &new_volume, &new_disk)
                .map_err(conflict("virtualmachineinstance", name))?;
            if !dry_run {
                race(shared, &vmi, "/spec").await;
            }
            patch_spec(&api, &vmi, "/spec", &spec, dry_run).await.map_err(|e| patch_failed("vmi", e))
        }
        other => Err((StatusCode::NOT_FOUND, format!("the server could not find the requested resource ({other})"))),
    }
}

/// `errors.NewConflict(v1.Resource(resource), name, why)`, as virt-api answers a refused volume request.
fn conflict<'a>(resource: &'a str, name: &'a str) -> impl Fn(String) -> Refusal + 'a {
    move |why| {
        (StatusCode::CONFLICT, format!("Operation cannot be fulfilled on {resource}.kubevirt.io \"{name}\": {why}"))
    }
}

/// How virt-api answers a failed patch of a `vm`, `vmi` or `vm status` (volumes.go `vmVolumePatch`,
/// `vmiVolumePatch`, `vmVolumePatchStatus`): an Invalid status (422; a failed `test`, that is a concurrent change,
/// which virtctl retries) is passed on as it is; anything else, a webhook's denial included, is a 500.
fn patch_failed(what: &str, e: kube::Error) -> Refusal {
    match e {
        kube::Error::Api(s) if s.reason == "Invalid" => (StatusCode::UNPROCESSABLE_ENTITY, s.message),
        kube::Error::Api(s) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("Internal error occurred: unable to patch {what}: {}", s.message),
        ),
        e => (StatusCode::INTERNAL_SERVER_ERROR, format!("Internal error occurred: unable to patch {what}: {e}")),
    }
}

/// Plays [`KubeVirtLab::lose_next_race`]: virt-controller changes the disks of `object`'s spec at `base` after
/// virt-api read it and before virt-api patches it: a VM's first disk's boot order; a VMI's disks in another order
/// (the first one last), as KubeVirt's VMI admitter refuses any change to a permanent disk but pairs disks with their
/// volumes by name.
async fn race(shared: &Shared, object: &DynamicObject, base: &str) {
    if !shared.lose_next_race.swap(false, Ordering::SeqCst) {
        return;
    }
    let spec = base.trim_start_matches('/').split('/').fold(&object.data, |v, k| &v[k]);
    let is_vm = object.types.as_ref().is_some_and(|t| t.kind == "VirtualMachine");
    let change = match is_vm {
        true => {
            let order = spec["domain"]["devices"]["disks"][0]["bootOrder"].as_u64().unwrap_or(0) + 1;
            json!([{"op": "add", "path": format!("{base}/domain/devices/disks/0/bootOrder"), "value": order}])
        }
        false => {
            let mut disks = list(&spec["domain"]["devices"]["disks"]);
            if !disks.is_empty() {
                let first = disks.remove(0);
                disks.push(first);
            }
            json!([{"op": "replace", "path": format!("{base}/domain/devices/disks"), "value": disks}])
        }
    };
    let api = match is_vm {
        true => vms(&shared.controller, &shared.namespace),
        false => vmis(&shared.controller, &shared.namespace),
    };
    let name = object.metadata.name.clone().unwrap_or_default();
    let patch = serde_json::from_value(change).expect("a valid JSON patch");
    if let Err(e) = api.patch(&name, &PatchParams::default(), &Patch::<()>::Json(patch)).await {
        tracing::warn!(error = %e, "the lab's concurrent write for lose_next_race failed");
    }
}

/// `vmVolumePatchStatus` (volumes.go) with the `HotplugVolumes` gate: the request is only appended to the VM's
/// `status.volumeRequests`, with a JSON patch of the status subresource guarded by a `test` of the old list (sent
/// with `dryRun: All` on a dry run), and answered 202 at once; virt-controller carries it out later
/// ([`handle_volume_requests`]). Another request for the same volume is refused while one is pending
/// (`addAddVolumeRequests`, `addRemoveVolumeRequests`, with their messages), except that a remove request replaces
/// a pending add.
async fn request_volume_change(
    api: &Api<DynamicObject>,
    vm: &DynamicObject,
    add: bool,
    volume: &str,
    body: &Value,
    dry_run: bool,
) -> Result<(), Refusal> {
    let vm_name = vm.metadata.name.clone().unwrap_or_default();
    let conflict = conflict("virtualmachine", &vm_name);
    let mut requests = Vec::new();
    for request in list(&vm.data["status"]["volumeRequests"]) {
        let adds = request["addVolumeOptions"]["name"] == volume;
        let removes = request["removeVolumeOptions"]["name"] == volume;
        match (add, adds, removes) {
            (true, true, _) => {
                return Err(conflict(format!("add volume request for volume [{volume}] already exists")));
            }
            (true, _, true) => {
                return Err(conflict(format!(
                    "unable to add volume since a remove volume request for volume [{volume}] already exists and is \
                     still being processed"
                )));
            }
            (false, _, true) => {
                return Err(conflict(format!(
                    "a remove volume request for volume [{volume}] already exists and is still being processed"
                )));
            }
            (false, true, _) => continue,
            _ => requests.push(request),
        }
    }
    requests.push(match add {
        true => json!({"addVolumeOptions": {"name": volume, "disk": hotplug_disk(body, volume),
                                            "volumeSource": hotplug_source(body)}}),
        false => json!({"removeVolumeOptions": {"name": volume}}),
    });
    let patch = match vm.data["status"].is_object() {
        true => guarded_patch(vm, &[("/status/volumeRequests".into(), Value::Array(requests))]),
        // KubeVirt's virt-controller always writes a VM's status (printableStatus); the lab's writes none, so the
        // first request makes it.
        false => {
            serde_json::from_value(json!([{"op": "add", "path": "/status", "value": {"volumeRequests": requests}}]))
                .expect("a valid JSON patch")
        }
    };
    api.patch_status(&vm_name, &PatchParams { dry_run, ..Default::default() }, &Patch::<()>::Json(patch))
        .await
        .map(drop)
        .map_err(|e| patch_failed("vm status", e))
}

/// `v1.HotplugVolumeSource` from `AddVolumeOptions`: virt-api forces `hotpluggable: true`.
fn hotplug_source(body: &Value) -> Value {
    let mut source = body["volumeSource"].clone();
    for key in ["persistentVolumeClaim", "dataVolume"] {
        if source[key].is_object() {
            source[key]["hotpluggable"] = json!(true);
        }
    }
    source
}

/// `v1.Volume` from `AddVolumeOptions` (or a VM's add volume request).
fn hotplug_volume(body: &Value) -> Value {
    let source = hotplug_source(body);
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
    named(&spec["domain"]["devices"]["disks"], name).cloned()
}

/// The item of a list of volumes or disks with that name.
fn named<'a>(list: &'a Value, name: &Value) -> Option<&'a Value> {
    list.as_array().and_then(|l| l.iter().find(|v| v["name"] == *name))
}

fn is_hotpluggable(volume: &Value) -> bool {
    ["persistentVolumeClaim", "dataVolume"].iter().any(|k| volume[k]["hotpluggable"] == json!(true))
}

/// The claim or DataVolume behind a volume (volumes.go `volumeSourceName`, `volumeSourceExists`).
fn source_name(volume: &Value) -> Option<&str> {
    volume["persistentVolumeClaim"]["claimName"].as_str().or(volume["dataVolume"]["name"].as_str())
}

/// Adds or removes a volume and its disk in a VMI spec (or a VM template's spec); the error is why KubeVirt refuses
/// it, answered as a conflict. `verifyVolumeOption` goes through the volumes in order: an addition conflicts with a
/// volume of that name or of that claim; a removal finds its volume by name or by claim, but
/// `ApplyVolumeRequestOnVMISpec` removes by name only, so a removal by claim name changes nothing and is accepted.
fn change_volumes(spec: &mut Value, add: bool, name: &str, volume: &Value, disk: &Value) -> Result<(), String> {
    let volumes = spec["volumes"].as_array().cloned().unwrap_or_default();
    if add {
        let claim = source_name(volume).unwrap_or_default();
        for existing in &volumes {
            if existing["name"] == name {
                return Err(format!("Unable to add volume [{name}] because volume with that name already exists"));
            }
            if source_name(existing) == Some(claim) {
                return Err(format!("Unable to add volume source [{claim}] because it already exists"));
            }
        }
        push(spec, "volumes", volume.clone());
        let devices = &mut spec["domain"]["devices"];
        if !devices["disks"].is_array() {
            devices["disks"] = json!([]);
        }
        devices["disks"].as_array_mut().expect("an array").push(disk.clone());
        return Ok(());
    }
    match volumes.iter().find(|v| v["name"] == name || source_name(v) == Some(name)) {
        None => Err(format!("Unable to remove volume [{name}] because it does not exist")),
        Some(v) if !is_hotpluggable(v) => {
            Err(format!("Unable to remove volume [{}] because it is not hotpluggable", name_of(v)))
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

/// virt-api's change of the volumes and disks of the spec at `base` (`/spec/template/spec` of a VM, `/spec` of a VMI):
/// a JSON patch guarded by `test`s of both lists (volumes.go `generateVolumeRequestPatch`), so a concurrent status
/// write does not disturb it and a concurrent spec change makes it fail with 422; on a dry run, sent with
/// `dryRun: All`.
async fn patch_spec(
    api: &Api<DynamicObject>,
    object: &DynamicObject,
    base: &str,
    spec: &Value,
    dry_run: bool,
) -> kube::Result<()> {
    let lists = [
        (format!("{base}/volumes"), spec["volumes"].clone()),
        (format!("{base}/domain/devices/disks"), spec["domain"]["devices"]["disks"].clone()),
    ];
    patch_lists_with(api, object, &lists, &PatchParams { dry_run, ..Default::default() }).await
}

// ---------------------------------------------------------------------------------------------------------------
// virt-controller and virt-handler: two loops, each as its own identity, writing the VMI as KubeVirt's do. The VMI
// CRD has no status subresource, so each status write is a write of the whole VMI.

/// Which of KubeVirt's components a loop plays.
#[derive(Debug, Clone, Copy)]
enum Component {
    Controller,
    Handler,
}

/// One component's loop: a sync on every watch event of what it watches, and at least every [`RESYNC`].
async fn run(shared: Arc<Shared>, component: Component) {
    use futures::StreamExt;
    use kube::runtime::{WatchStreamExt, watcher};
    let ns = shared.namespace.clone();
    let client = match component {
        Component::Controller => shared.controller.clone(),
        Component::Handler => shared.handler.clone(),
    };
    // Backed off on errors, as every controller's watches are: a failing API server must not spin the runtime.
    let vmi_changes = watcher(vmis(&client, &ns), watcher::Config::default()).default_backoff().map(drop).boxed();
    // virt-handler watches VMIs only: its ClusterRole has nothing on VMs.
    let vm_changes = match component {
        Component::Controller => {
            watcher(vms(&client, &ns), watcher::Config::default()).default_backoff().map(drop).boxed()
        }
        Component::Handler => futures::stream::pending().boxed(),
    };
    let mut changes = futures::stream::select(vmi_changes, vm_changes);
    loop {
        let synced = match component {
            Component::Controller => controller_sync(&shared).await,
            Component::Handler => handler_sync(&shared).await,
        };
        match synced {
            // A write that lost to another writer's (the resourceVersion moved on): requeued at once and redone from
            // a fresh list, as KubeVirt's controllers requeue the key.
            Err(e) if is_conflict(&e) => {
                tracing::debug!(?component, error = %e, "lab {component:?}: conflict, requeued");
                tokio::task::yield_now().await;
                continue;
            }
            Err(e) => {
                tracing::debug!(?component, error = %e, "lab {component:?}: will retry");
                tokio::time::sleep(RESYNC).await;
            }
            Ok(()) => {}
        }
        let _ = tokio::time::timeout(RESYNC, changes.next()).await;
        // A sync that fails at once never waits: yield so the task can always be stopped.
        tokio::task::yield_now().await;
    }
}

fn is_conflict(e: &anyhow::Error) -> bool {
    matches!(e.downcast_ref::<kube::Error>(), Some(kube::Error::Api(s)) if s.code == 409)
}

/// A full update of the VMI (PUT), guarded by the resourceVersion it was read with: 409 when another write came
/// first.
async fn update(api: &Api<DynamicObject>, vmi: &DynamicObject) -> Result<()> {
    let name = vmi.metadata.name.clone().unwrap_or_default();
    api.replace(&name, &PostParams::default(), vmi).await?;
    Ok(())
}

/// A JSON patch of an object's lists, each guarded by a `test` of its old value, as KubeVirt's patch sets are
/// (pkg/apimachinery/patch): `add` where there was no list yet.
async fn patch_lists(api: &Api<DynamicObject>, object: &DynamicObject, lists: &[(String, Value)]) -> kube::Result<()> {
    patch_lists_with(api, object, lists, &PatchParams::default()).await
}

/// [`patch_lists`] with `params` (a dry run).
async fn patch_lists_with(
    api: &Api<DynamicObject>,
    object: &DynamicObject,
    lists: &[(String, Value)],
    params: &PatchParams,
) -> kube::Result<()> {
    let name = object.metadata.name.clone().unwrap_or_default();
    api.patch(&name, params, &Patch::<()>::Json(guarded_patch(object, lists))).await.map(drop)
}

/// The operations of [`patch_lists`].
fn guarded_patch(object: &DynamicObject, lists: &[(String, Value)]) -> json_patch::Patch {
    let mut operations = Vec::new();
    for (path, new) in lists {
        let old = path.trim_start_matches('/').split('/').fold(&object.data, |v, k| &v[k]);
        match old.as_array().is_some_and(|l| !l.is_empty()) {
            true => operations.extend([
                json!({"op": "test", "path": path, "value": old}),
                json!({"op": "replace", "path": path, "value": new}),
            ]),
            false => operations.push(json!({"op": "add", "path": path, "value": new})),
        }
    }
    serde_json::from_value(Value::Array(operations)).expect("test, add and replace operations are a JSON patch")
}

fn key(vmi: &str, volume: &str) -> (String, String) {
    (vmi.to_string(), volume.to_string())
}

fn name_of(value: &Value) -> &str {
    value["name"].as_str().unwrap_or_default()
}

fn list(value: &Value) -> Vec<Value> {
    value.as_array().cloned().unwrap_or_default()
}

/// Whether a volume's status has stayed in its phase for a step (what takes KubeVirt seconds).
fn due(shared: &Shared, vmi: &str, volume: &str) -> bool {
    shared.stamps.lock().unwrap().get(&key(vmi, volume)).is_none_or(|t| t.elapsed() >= PHASE_STEP)
}

/// Records when each volume's status changed phase in a write that was stored.
fn stamp_changes(shared: &Shared, vmi: &str, old: &[Value], new: &[Value]) {
    let now = Instant::now();
    let mut stamps = shared.stamps.lock().unwrap();
    for status in new {
        let before = old.iter().find(|o| o["name"] == status["name"]);
        if before.is_none_or(|b| b["phase"] != status["phase"]) {
            stamps.insert(key(vmi, name_of(status)), now);
        }
    }
}

fn set_phase(status: &mut Value, phase: &str, reason: &str, message: String) {
    status["phase"] = json!(phase);
    status["reason"] = json!(reason);
    status["message"] = json!(message);
}

/// virt-controller: for each VMI, the first of its writes that is due (the next pass sees what it wrote).
async fn controller_sync(shared: &Shared) -> Result<()> {
    if shared.controller_paused.load(Ordering::SeqCst) {
        return Ok(());
    }
    if shared.mode == HotplugMode::HotplugVolumes {
        for vm in vms(&shared.controller, &shared.namespace).list(&Default::default()).await? {
            handle_volume_requests(shared, &vm).await?;
        }
    }
    let api = vmis(&shared.controller, &shared.namespace);
    let listed = api.list(&Default::default()).await?.items;
    shared.vsock.free_gone(&listed);
    for vmi in listed {
        if start(shared, &api, &vmi).await? {
            continue;
        }
        if shared.mode == HotplugMode::Declarative {
            match declarative_sync(shared, &vmi).await {
                Ok(true) => continue,
                Ok(false) => {}
                Err(e) if is_conflict(&e) => return Err(e),
                // KubeVirt's VM and VMI controllers are separate loops: a declarative patch its VMI admitter refuses
                // (a hot-plugged disk on a bus it does not allow) is retried on the next sync and holds nothing else.
                Err(e) => tracing::debug!(error = %e, "lab virt-controller: the declarative patch was refused"),
            }
        }
        if vmi.data["status"]["phase"] == "Running" {
            let pods = handle_hotplug_volumes(shared, &vmi).await?;
            controller_volume_status(shared, &api, &vmi, &pods).await?;
        }
    }
    run_attachment_pods(shared).await
}

fn pods(client: &kube::Client, ns: &str) -> Api<DynamicObject> {
    Api::namespaced_with(client.clone(), ns, &resource("Pod", "", "v1", "pods"))
}

/// The attachment Pods of VMI `vmi` (its population trigger Pods too: KubeVirt lists every Pod its virt-launcher Pod
/// controls), oldest first.
async fn attachment_pods(shared: &Shared, client: &kube::Client, vmi: &str) -> kube::Result<Vec<DynamicObject>> {
    let selector = format!("{}={},{ATTACHMENT_VMI_LABEL}={vmi}", ATTACHMENT_LABEL.0, ATTACHMENT_LABEL.1);
    let mut found = pods(client, &shared.namespace).list(&ListParams::default().labels(&selector)).await?.items;
    let created = shared.pods_created.lock().unwrap().clone();
    found.sort_by_key(|p| p.metadata.name.as_ref().and_then(|n| created.get(n).copied()));
    Ok(found)
}

/// The names of the claims' volumes an attachment Pod holds: only those count (volume-hotplug.go
/// `podVolumesMatchesReadyVolumes`), not its `hotplug-disks` directory or the ServiceAccount token the API server adds.
fn pod_volumes(pod: &DynamicObject) -> BTreeSet<String> {
    let volumes = list(&pod.data["spec"]["volumes"]);
    volumes.iter().filter(|v| v["persistentVolumeClaim"].is_object()).map(|v| name_of(v).to_string()).collect()
}

fn pod_running(pod: &DynamicObject) -> bool {
    pod.data["status"]["phase"] == "Running"
}

fn pod_phase(pod: &DynamicObject) -> &str {
    pod.data["status"]["phase"].as_str().unwrap_or_default()
}

/// The claim behind a hotpluggable volume.
fn claim_of(volume: &Value) -> &str {
    let claim = volume["persistentVolumeClaim"]["claimName"].as_str();
    claim.or(volume["dataVolume"]["name"].as_str()).unwrap_or_default()
}

fn named_object<'a>(objects: &'a [DynamicObject], name: &str) -> Option<&'a DynamicObject> {
    objects.iter().find(|o| o.metadata.name.as_deref() == Some(name))
}

fn is_temporary(pod: &DynamicObject) -> bool {
    pod.metadata.annotations.as_ref().is_some_and(|a| a.contains_key(EPHEMERAL))
}

/// How ready a hot-plugged volume is to be attached to the node (pkg/storage/types/pvc.go
/// `VolumeReadyToAttachToNode`, with CDI's `IsSucceededOrPendingPopulation` and
/// `IsWaitForFirstConsumerBeforePopulating`, containerized-data-importer-api v1beta1/utils.go).
enum Readiness {
    Ready,
    NotReady,
    /// A DataVolume in phase WaitForFirstConsumer: nothing populates its claim until a Pod that uses it is scheduled.
    WaitForFirstConsumer,
}

/// A claim that exists is ready whatever its phase, unless its controller is a DataVolume: then ready once the
/// DataVolume is Succeeded or PendingPopulation. `Err` is KubeVirt's sync error: the claim, or its DataVolume, does
/// not exist.
async fn readiness(shared: &Shared, claims: &[DynamicObject], volume: &Value) -> Result<Readiness, String> {
    let name = claim_of(volume);
    let claim = named_object(claims, name).ok_or_else(|| format!("didn't find PVC {name}"))?;
    let owner = claim.metadata.owner_references.iter().flatten().find(|o| o.controller == Some(true));
    let Some(owner) = owner.filter(|o| o.kind == "DataVolume") else { return Ok(Readiness::Ready) };
    let ns = &shared.namespace;
    // DataVolumeByNameFunc.
    let data_volumes =
        Api::<DynamicObject>::namespaced_with(shared.controller.clone(), ns, &crate::cdi_lab::data_volumes_resource());
    let data_volume = data_volumes.get_opt(&owner.name).await.map_err(|e| e.to_string())?;
    let data_volume = data_volume.ok_or_else(|| format!("unable to find datavolume {ns}/{}", owner.name))?;
    Ok(match data_volume.data["status"]["phase"].as_str() {
        Some("Succeeded" | "PendingPopulation") => Readiness::Ready,
        Some("WaitForFirstConsumer") => Readiness::WaitForFirstConsumer,
        _ => Readiness::NotReady,
    })
}

/// virt-controller's `handleHotplugVolumes` and `cleanupAttachmentPods` (pkg/virt-controller/watch/vmi/
/// volume-hotplug.go) for a running VMI, when `needsHandleHotplug` (more than one attachment Pod, or one that does
/// not hold exactly the VMI's hot-plugged volumes), after `cleanupWaitForFirstConsumerTemporaryPods`. One attachment
/// Pod holds every ready hot-plugged volume ([`readiness`]); when that set changes (a volume plugged or unplugged) a
/// new Pod is created for the new set, unless an old one is still pending. A DataVolume waiting for its first
/// consumer gets a population trigger Pod instead (`triggerHotplugPopulation`). An old Pod is deleted only once no
/// removed volume in it is Ready or MountedToPod, and one running old Pod is kept while the new one does not run yet:
/// so an unplug of one of several volumes ends only when the replacement Pod runs. A hotpluggable volume whose claim
/// (or DataVolume) does not exist stops all of it (`VolumeReadyToAttachToNode` fails, and `handleHotplugVolumes`
/// returns at the first such volume): no Pod is created or deleted for any volume of the VMI. Returns the VMI's
/// attachment Pods as this sync found them, oldest first: KubeVirt's status update in the same sync reads its Pod
/// informer, which has not seen what the sync created or deleted yet.
async fn handle_hotplug_volumes(shared: &Shared, vmi: &DynamicObject) -> Result<Vec<DynamicObject>> {
    let vmi_name = vmi.metadata.name.clone().unwrap_or_default();
    cleanup_temporary_pods(shared, vmi).await?;
    let existing = attachment_pods(shared, &shared.controller, &vmi_name).await?;
    let hotplug: Vec<Value> = list(&vmi.data["spec"]["volumes"]).into_iter().filter(is_hotpluggable).collect();
    let spec_names: BTreeSet<String> = hotplug.iter().map(|v| name_of(v).to_string()).collect();
    let needs_handling =
        existing.len() > 1 || existing.first().map_or(!hotplug.is_empty(), |pod| pod_volumes(pod) != spec_names);
    if !needs_handling {
        return Ok(existing);
    }
    let claims = claims(&shared.controller, &shared.namespace).list(&ListParams::default()).await?.items;
    let mut ready = Vec::new();
    for volume in &hotplug {
        match readiness(shared, &claims, volume).await {
            Err(why) => {
                tracing::debug!(vmi = vmi_name, volume = name_of(volume), why, "lab virt-controller: sync error");
                return Ok(existing);
            }
            Ok(Readiness::WaitForFirstConsumer) => trigger_population(shared, vmi, volume, &claims).await?,
            Ok(Readiness::NotReady) => {}
            Ok(Readiness::Ready) => ready.push(volume.clone()),
        }
    }
    let ready_names: BTreeSet<String> = ready.iter().map(|v| name_of(v).to_string()).collect();
    // getActiveAndOldAttachmentPods: the Pod holding exactly the ready volumes is current; old ones newest first.
    let (mut current, mut old) = (None, Vec::new());
    for pod in &existing {
        match pod_volumes(pod) == ready_names {
            true if pod.metadata.deletion_timestamp.is_none() => current = Some(pod.clone()),
            true => {}
            false => old.push(pod.clone()),
        }
    }
    old.reverse();
    let pending = old.iter().any(|p| !matches!(pod_phase(p), "Running" | "Succeeded" | "Failed"));
    if current.is_none() && !pending && !ready.is_empty() {
        create_attachment_pod(shared, vmi, &ready, &claims).await?;
    }
    // cleanupAttachmentPods.
    let removed: BTreeMap<String, String> = list(&vmi.data["status"]["volumeStatus"])
        .iter()
        .filter(|s| !s["hotplugVolume"].is_null() && !spec_names.contains(name_of(s)))
        .map(|s| (name_of(s).to_string(), s["phase"].as_str().unwrap_or_default().to_string()))
        .collect();
    let blocks_delete =
        |name: &String| removed.get(name).is_some_and(|phase| matches!(phase.as_str(), "Ready" | "MountedToPod"));
    let current_not_running = current.as_ref().is_none_or(|p| !pod_running(p));
    let mut found_running = false;
    for pod in old {
        let volumes = pod_volumes(&pod);
        let preserve = volumes.iter().any(|v| spec_names.contains(v) || blocks_delete(v));
        if !found_running && pod_running(&pod) && !ready.is_empty() && current_not_running && preserve {
            found_running = true;
            continue;
        }
        if volumes.iter().any(blocks_delete) {
            continue;
        }
        delete_pod(shared, vmi, &pod, "Deleted attachment pod").await?;
    }
    Ok(existing)
}

/// Deletes an attachment Pod at once (grace period 0, `deleteAttachmentPod`) and records the Event `what <pod>`.
async fn delete_pod(shared: &Shared, vmi: &DynamicObject, pod: &DynamicObject, what: &str) -> Result<()> {
    let name = pod.metadata.name.clone().unwrap_or_default();
    let now = DeleteParams { grace_period_seconds: Some(0), ..Default::default() };
    match pods(&shared.controller, &shared.namespace).delete(&name, &now).await {
        Ok(_) => {
            event(shared, Component::Controller, vmi, "Normal", "SuccessfulDelete", &format!("{what} {name}")).await?
        }
        Err(kube::Error::Api(s)) if s.code == 404 => {}
        Err(e) => return Err(e.into()),
    }
    shared.pods_created.lock().unwrap().remove(&name);
    Ok(())
}

/// `cleanupWaitForFirstConsumerTemporaryPods` (lifecycle.go), run on every sync of a VMI none of whose
/// non-hotplugged DataVolumes waits for a consumer (the lab's VMIs have none): each temporary Pod that runs or has
/// finished is deleted.
async fn cleanup_temporary_pods(shared: &Shared, vmi: &DynamicObject) -> Result<()> {
    let vmi_name = vmi.metadata.name.clone().unwrap_or_default();
    for pod in attachment_pods(shared, &shared.controller, &vmi_name).await? {
        if is_temporary(&pod) && matches!(pod_phase(&pod), "Running" | "Succeeded" | "Failed") {
            delete_pod(shared, vmi, &pod, "Deleted WaitForFirstConsumer temporary pod").await?;
        }
    }
    Ok(())
}

/// The `hotplug-disks` directory of an attachment Pod, and its container's mount of it.
fn hotplug_disks() -> (Value, Value) {
    let volume = json!({"name": "hotplug-disks", "emptyDir": {}});
    let mount = json!({"name": "hotplug-disks", "mountPath": "/path", "mountPropagation": "HostToContainer"});
    (volume, mount)
}

/// A new Pod object of virt-controller's for VMI `vmi` (labelled for the lab to find it): `hp-volume-` and a random
/// suffix, no grace period.
fn attachment_pod(vmi: &DynamicObject, spec: Value, annotations: Value) -> Result<DynamicObject> {
    let vmi_name = vmi.metadata.name.clone().unwrap_or_default();
    let mut pod = json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"generateName": "hp-volume-", "annotations": annotations,
                     "labels": {ATTACHMENT_LABEL.0: ATTACHMENT_LABEL.1, ATTACHMENT_VMI_LABEL: vmi_name}},
        "spec": spec,
    });
    pod["spec"]["terminationGracePeriodSeconds"] = json!(0);
    Ok(serde_json::from_value(pod)?)
}

/// Creates `pod` as virt-controller and remembers when; returns its name.
async fn create_pod(shared: &Shared, pod: &DynamicObject) -> Result<String> {
    let created = pods(&shared.controller, &shared.namespace).create(&PostParams::default(), pod).await?;
    let name = created.metadata.name.unwrap_or_default();
    shared.pods_created.lock().unwrap().insert(name.clone(), Instant::now());
    Ok(name)
}

/// `createAttachmentPod` with `RenderHotplugAttachmentPodTemplate` (pkg/virt-controller/services/template.go): a Pod
/// pinned to the VMI's node by node affinity (the scheduler binds it) holding the claims of `volumes`, a Block
/// claim's device at `/path/<volume>/<claim UID>`, a Filesystem claim mounted at `/<volume>` unless already Ready or
/// MountedToPod.
async fn create_attachment_pod(
    shared: &Shared,
    vmi: &DynamicObject,
    volumes: &[Value],
    claims: &[DynamicObject],
) -> Result<()> {
    let statuses = list(&vmi.data["status"]["volumeStatus"]);
    let (directory, directory_mount) = hotplug_disks();
    let mut container = json!({"name": "hotplug-disk", "image": LAUNCHER_IMAGE,
                               "command": ["/bin/sh", "-c", "/usr/bin/container-disk --copy-path /path/hp"],
                               "volumeMounts": [directory_mount]});
    let mut pod_volumes = vec![directory];
    for volume in volumes {
        let name = name_of(volume);
        pod_volumes.push(json!({"name": name, "persistentVolumeClaim": {"claimName": claim_of(volume)}}));
        let Some(claim) = named_object(claims, claim_of(volume)) else { continue };
        let phase = statuses.iter().find(|s| s["name"] == name).and_then(|s| s["phase"].as_str());
        match VolumeMode::of(&claim.data["spec"]) {
            VolumeMode::Block => {
                let uid = claim.metadata.uid.clone().unwrap_or_default();
                push(
                    &mut container,
                    "volumeDevices",
                    json!({"name": name, "devicePath": format!("/path/{name}/{uid}")}),
                );
            }
            VolumeMode::Filesystem if !matches!(phase, Some("Ready" | "MountedToPod")) => {
                push(&mut container, "volumeMounts", json!({"name": name, "mountPath": format!("/{name}")}));
            }
            VolumeMode::Filesystem => {}
        }
    }
    let affinity = json!({"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
        {"matchExpressions": [{"key": "kubernetes.io/hostname", "operator": "In", "values": [NODE]}]}]}}});
    let spec = json!({"containers": [container], "affinity": affinity, "volumes": pod_volumes});
    let name = create_pod(shared, &attachment_pod(vmi, spec, json!({}))?).await?;
    event(shared, Component::Controller, vmi, "Normal", "SuccessfulCreate", &format!("Created attachment pod {name}"))
        .await
}

/// `triggerHotplugPopulation` with `RenderHotplugAttachmentTriggerPodTemplate` (template.go): a temporary Pod
/// (`kubevirt.io/ephemeral-provisioning`) beside the VMI's virt-launcher Pod (pod affinity) that uses the DataVolume's
/// claim and exits at once, so that kube-scheduler picks a node for the claim and CDI can populate it.
async fn trigger_population(
    shared: &Shared,
    vmi: &DynamicObject,
    volume: &Value,
    claims: &[DynamicObject],
) -> Result<()> {
    let name = name_of(volume);
    let (directory, directory_mount) = hotplug_disks();
    let mut container = json!({"name": "hotplug-disk", "image": LAUNCHER_IMAGE,
                               "command": ["/bin/bash", "-c", "exit", "0"], "volumeMounts": [directory_mount]});
    let block =
        named_object(claims, claim_of(volume)).is_some_and(|c| VolumeMode::of(&c.data["spec"]) == VolumeMode::Block);
    match block {
        true => container["volumeDevices"] = json!([{"name": name, "devicePath": "/dev/hotplugblockdevice"}]),
        false => push(&mut container, "volumeMounts", json!({"name": name, "mountPath": "/pvc"})),
    }
    let launcher = json!({"kubevirt.io": "virt-launcher", "kubevirt.io/created-by": vmi.metadata.uid});
    let mut spec = json!({
        "containers": [container],
        "affinity": {"podAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [
            {"labelSelector": {"matchLabels": launcher}, "topologyKey": "kubernetes.io/hostname"}]}},
        "volumes": [{"name": name, "persistentVolumeClaim": {"claimName": claim_of(volume), "readOnly": false}}, directory],
    });
    if block {
        spec["securityContext"] = json!({"runAsUser": 0});
    }
    create_pod(shared, &attachment_pod(vmi, spec, json!({EPHEMERAL: "true"}))?).await?;
    let message = format!("Created hotplug trigger pod for volume {name}");
    event(shared, Component::Controller, vmi, "Normal", "SuccessfulCreate", &message).await
}

/// kube-scheduler's bind (`DefaultBinder`): a `Binding` of the Pod to the lab's node, from which the API server sets
/// `spec.nodeName`.
async fn bind_pod(shared: &Shared, name: &str) -> Result<()> {
    let ns = &shared.namespace;
    let binding = json!({"apiVersion": "v1", "kind": "Binding", "metadata": {"name": name},
                         "target": {"apiVersion": "v1", "kind": "Node", "name": NODE}});
    let request = http::Request::post(format!("/api/v1/namespaces/{ns}/pods/{name}/binding"))
        .header("content-type", "application/json")
        .body(serde_json::to_vec(&binding)?)?;
    shared.client.request_text(request).await.with_context(|| format!("binding Pod {ns}/{name} to node {NODE}"))?;
    Ok(())
}

/// The cluster's kube-scheduler and the lab node's kubelet for attachment Pods (as the admin). The scheduler binds a
/// Pod to the node once its volumes allow it ([`Storage::schedule`]: a claim of a `WaitForFirstConsumer` class is
/// given the node and waited for; an unbound `Immediate` one, a missing one, refuse the Pod), else writes why not in
/// `PodScheduled`; the kubelet runs a bound Pod once its start time passed (a temporary trigger Pod runs `exit 0` and
/// Succeeds), unless a fault keeps it Pending.
async fn run_attachment_pods(shared: &Shared) -> Result<()> {
    let api = pods(&shared.client, &shared.namespace);
    let selector = format!("{}={}", ATTACHMENT_LABEL.0, ATTACHMENT_LABEL.1);
    for pod in api.list(&ListParams::default().labels(&selector)).await? {
        if pod.metadata.deletion_timestamp.is_some() || matches!(pod_phase(&pod), "Running" | "Succeeded" | "Failed") {
            continue;
        }
        let name = pod.metadata.name.clone().unwrap_or_default();
        let created = *shared.pods_created.lock().unwrap().entry(name.clone()).or_insert_with(Instant::now);
        let fault = *shared.pod_fault.lock().unwrap();
        if pod.data["spec"]["nodeName"].as_str().is_none_or(str::is_empty) {
            let verdict = match fault {
                Some(AttachmentPodFault::Unschedulable) => VolumeScheduling::Unschedulable(storage_lab::unschedulable(
                    "1 node(s) had volume node affinity conflict",
                )),
                _ => shared.storage.schedule(&pod, NODE).await?,
            };
            match verdict {
                VolumeScheduling::Bound => bind_pod(shared, &name).await?,
                VolumeScheduling::Waiting => {}
                VolumeScheduling::Unschedulable(message) => {
                    let conditions = json!([{"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                                             "message": message}]);
                    if pod.data["status"]["conditions"] != conditions {
                        let status = json!({"status": {"phase": "Pending", "conditions": conditions}});
                        api.patch_status(&name, &PatchParams::default(), &Patch::Merge(&status)).await?;
                    }
                }
            }
            continue;
        }
        let container = |ready: bool, state: Value| {
            json!([{"name": "hotplug-disk", "ready": ready, "restartCount": 0, "image": LAUNCHER_IMAGE, "imageID": "",
                    "state": state}])
        };
        let status = match fault {
            Some(AttachmentPodFault::Stuck) => json!({"phase": "Pending",
                "conditions": [{"type": "PodScheduled", "status": "True"}],
                "containerStatuses": container(false, json!({"waiting": {"reason": "ContainerCreating"}}))}),
            _ if created.elapsed() < *shared.pod_start.lock().unwrap() => continue,
            _ if is_temporary(&pod) => json!({"phase": "Succeeded",
                "conditions": [{"type": "PodScheduled", "status": "True"},
                               {"type": "Ready", "status": "False", "reason": "PodCompleted"}],
                "containerStatuses": container(false, json!({"terminated": {"exitCode": 0, "reason": "Completed"}}))}),
            _ => json!({"phase": "Running",
                "conditions": [{"type": "PodScheduled", "status": "True"}, {"type": "Ready", "status": "True"}],
                "containerStatuses": container(true, json!({"running": {}}))}),
        };
        if pod.data["status"]["phase"] == status["phase"] && pod.data["status"]["conditions"] == status["conditions"] {
            continue;
        }
        api.patch_status(&name, &PatchParams::default(), &Patch::Merge(&json!({"status": status}))).await?;
    }
    Ok(())
}

/// A VMI's start as virt-controller writes it, each step a full update (lifecycle.go `updateStatus` updates, not
/// patches, a VMI that is not yet running): first the observed API version annotations (vmi.go `execute`, "this
/// must be first step in execution"), then the phases Pending, Scheduling (its virt-launcher pod is created) and
/// Scheduled (the pod runs on a node), with the VMI's CID when it has `autoattachVSOCK` (lifecycle.go
/// `cidsMap.Allocate`, in the same write). virt-handler takes it from there. Returns true when it wrote.
async fn start(shared: &Shared, api: &Api<DynamicObject>, vmi: &DynamicObject) -> Result<bool> {
    let mut next = vmi.clone();
    let annotations = next.metadata.annotations.get_or_insert_with(Default::default);
    if !annotations.contains_key(LATEST_API_VERSION) {
        annotations.insert(LATEST_API_VERSION.into(), "v1".into());
        annotations.insert(STORAGE_API_VERSION.into(), "v1".into());
    } else {
        let phase = match vmi.data["status"]["phase"].as_str().unwrap_or_default() {
            "" => "Pending",
            "Pending" => "Scheduling",
            "Scheduling" => "Scheduled",
            _ => return Ok(false),
        };
        next.data["status"]["phase"] = json!(phase);
        if phase == "Scheduled" {
            next.data["status"]["nodeName"] = json!(NODE);
            if vmi.data["spec"]["domain"]["devices"]["autoattachVSOCK"] == true {
                next.data["status"]["VSOCKCID"] = json!(shared.vsock.allocate(vmi)?);
            }
        }
    }
    update(api, &next).await?;
    Ok(true)
}

/// A VM's sync with the `HotplugVolumes` gate (pkg/virt-controller/watch/vm/vm.go `sync`, `handleVolumeRequests`,
/// `updateStatus`, `trimDoneVolumeRequests`): each request of `vm.status.volumeRequests` is applied to a copy of the
/// template (`ApplyVolumeRequestOnVMISpec`) and, for a running VMI that does not reflect it yet, carried out first
/// through the VMI's own `addvolume`/`removevolume` (so virt-api patches the VMI, as itself). Only at the end of the
/// sync is the template change stored (an update of the VM), and the status update after it drops the requests the
/// template now reflects. A failed VMI call ends the sync with the template unchanged and the request pending, to be
/// tried again on the next sync.
async fn handle_volume_requests(shared: &Shared, vm: &DynamicObject) -> Result<()> {
    let requests = list(&vm.data["status"]["volumeRequests"]);
    if requests.is_empty() {
        return Ok(());
    }
    let (ns, name) = (&shared.namespace, vm.metadata.name.clone().unwrap_or_default());
    let vmi = vmis(&shared.controller, ns).get_opt(&name).await?;
    let vmi_volumes = vmi.filter(|v| v.metadata.deletion_timestamp.is_none()).map(|v| list(&v.data["spec"]["volumes"]));
    let mut template = vm.data["spec"]["template"]["spec"].clone();
    for request in &requests {
        let add = request["addVolumeOptions"].is_object();
        let (verb, options) = match add {
            true => ("addvolume", &request["addVolumeOptions"]),
            false => ("removevolume", &request["removeVolumeOptions"]),
        };
        let volume = name_of(options);
        // Nothing to do is no error: a volume already added, or already gone.
        let _ = change_volumes(&mut template, add, volume, &hotplug_volume(options), &hotplug_disk(options, volume));
        let Some(vmi_volumes) = &vmi_volumes else { continue };
        if vmi_volumes.iter().any(|v| v["name"] == volume) == add {
            continue;
        }
        let path = format!("/apis/{GROUP}/v1/namespaces/{ns}/virtualmachineinstances/{name}/{verb}");
        let call =
            http::Request::put(path).header("content-type", "application/json").body(serde_json::to_vec(options)?)?;
        // Not a kube::Error: a refusal is requeued with a pause, not at once as a lost write is.
        if let Err(e) = shared.controller.request_text(call).await {
            bail!("Error encountered while handling volume hotplug requests: {e}");
        }
    }
    let api = vms(&shared.controller, ns);
    let mut vm = vm.clone();
    if template != vm.data["spec"]["template"]["spec"] {
        vm.data["spec"]["template"]["spec"] = template.clone();
        vm = api.replace(&name, &PostParams::default(), &vm).await?;
    }
    let done = |request: &Value| {
        let (add, volume) = match request["addVolumeOptions"].is_object() {
            true => (true, &request["addVolumeOptions"]["name"]),
            false => (false, &request["removeVolumeOptions"]["name"]),
        };
        let in_template = |list: &Value| named(list, volume).is_some();
        add == in_template(&template["volumes"]) && add == in_template(&template["domain"]["devices"]["disks"])
    };
    let pending: Vec<Value> = requests.iter().filter(|r| !done(r)).cloned().collect();
    if pending != requests {
        vm.data["status"]["volumeRequests"] = Value::Array(pending);
        api.replace_status(&name, &PostParams::default(), &vm).await?;
    }
    Ok(())
}

/// `HandleDeclarativeVolumes` (pkg/storage/hotplug/hotplug.go), run by virt-controller on every VM sync: the running
/// VMI's hotpluggable volumes follow its VM's template, unless the VM's `updateVolumesStrategy` is `Migration` or the
/// VMI is not Running (`patchHotplugVolumes`), when nothing happens at all. A VMI volume gone from the template, or whose template
/// definition is not deeply equal to it (another claim, say), is dropped at once (`filterHotplugVMIVolumes`): that
/// *is* the unplug. A template volume missing from the VMI is added unless the VMI still has a status entry for it,
/// an unplug in progress (`getNewHotplugVMVolumes`): so a changed volume comes back with its new definition once the
/// old one is gone. Disks follow their volumes (`filterHotplugVMIDisks`, `getNewHotplugVMDisks`). One JSON patch of
/// both lists, guarded by `test`s of their old values. Returns true when it changed the VMI.
async fn declarative_sync(shared: &Shared, vmi: &DynamicObject) -> Result<bool> {
    let Some(owner) = vmi.metadata.owner_references.iter().flatten().find(|o| o.kind == "VirtualMachine") else {
        return Ok(false);
    };
    if vmi.data["status"]["phase"] != "Running" {
        return Ok(false);
    }
    let Some(vm) = vms(&shared.controller, &shared.namespace).get_opt(&owner.name).await? else { return Ok(false) };
    // HandleDeclarativeVolumes returns at once for `updateVolumesStrategy: Migration` ("Are there some cases we can
    // proceed?"): the VMI keeps every volume the template lost until it restarts.
    if vm.data["spec"]["updateVolumesStrategy"] == "Migration" {
        return Ok(false);
    }
    let spec = &vmi.data["spec"];
    let (volumes, disks) = declarative_lists(&vm.data["spec"]["template"]["spec"], spec, &vmi.data["status"]);
    if volumes == list(&spec["volumes"]) && disks == list(&spec["domain"]["devices"]["disks"]) {
        return Ok(false);
    }
    let api = vmis(&shared.controller, &shared.namespace);
    let lists =
        [("/spec/volumes".into(), Value::Array(volumes)), ("/spec/domain/devices/disks".into(), Value::Array(disks))];
    patch_lists(&api, vmi, &lists).await?;
    Ok(true)
}

/// The VMI's volumes and disks as `HandleDeclarativeVolumes` makes them from the VM's `template` spec, the VMI's
/// `spec` and `status` (see [`declarative_sync`]).
fn declarative_lists(template: &Value, spec: &Value, status: &Value) -> (Vec<Value>, Vec<Value>) {
    let template_disks = &template["domain"]["devices"]["disks"];
    let kept = list(&spec["volumes"]).into_iter().filter(|v| {
        !is_hotpluggable(v) || named(&template["volumes"], &v["name"]).is_some_and(|t| !is_hotpluggable(t) || t == v)
    });
    let with_status = |name: &Value| list(&status["volumeStatus"]).iter().any(|s| s["name"] == *name);
    let added = list(&template["volumes"])
        .into_iter()
        .filter(|v| is_hotpluggable(v) && named(&spec["volumes"], &v["name"]).is_none() && !with_status(&v["name"]));
    let volumes = Value::Array(kept.chain(added).collect());
    let disks = list(&spec["domain"]["devices"]["disks"])
        .into_iter()
        .filter(|d| {
            named(&volumes, &d["name"]).is_some()
                || named(template_disks, &d["name"]).is_some_and(|vm_disk| {
                    // A CD-ROM keeps its drive when its medium changes; any other disk goes with its volume.
                    named(&template["volumes"], &d["name"]).is_none()
                        || (vm_disk["cdrom"].is_object() && d["cdrom"].is_object())
                })
        })
        .chain(list(template_disks).into_iter().filter(|d| {
            named(&volumes, &d["name"]).is_some_and(is_hotpluggable)
                && named(&spec["domain"]["devices"]["disks"], &d["name"]).is_none()
        }))
        .collect();
    (list(&volumes), disks)
}

/// `getVolumePhaseMessageReason` (storage.go): a hot-plugged volume's phase, reason and message from its claim.
fn claim_phase(claims: &[DynamicObject], name: &str) -> (&'static str, &'static str, String) {
    match named_object(claims, name).map(|c| c.data["status"]["phase"].as_str().unwrap_or_default()) {
        None => ("Pending", "FailedPvcNotFound", format!("PVC {name} not found")),
        Some("Pending") => ("Pending", "PVCNotReady", "PVC is in phase ClaimPending".into()),
        Some("Bound") => ("Bound", "PVCNotReady", "PVC is in phase Bound".into()),
        Some(_) => ("Pending", "PVCNotReady", "PVC is in phase Lost".into()),
    }
}

/// `processPVCInfo` (storage.go): what a volume's status says of its claim, when the claim exists. The filesystem
/// overhead is KubeVirt's default: it finds no CDI resource in the lab's API server.
fn claim_info(status: &mut Value, claims: &[DynamicObject], name: &str) {
    let Some(claim) = named_object(claims, name) else { return };
    let spec = &claim.data["spec"];
    let mut info = json!({"claimName": name, "filesystemOverhead": DEFAULT_FS_OVERHEAD});
    for (key, value) in [
        ("accessModes", &spec["accessModes"]),
        ("volumeMode", &spec["volumeMode"]),
        ("capacity", &claim.data["status"]["capacity"]),
        ("requests", &spec["resources"]["requests"]),
    ] {
        if !value.is_null() {
            info[key] = value.clone();
        }
    }
    status["persistentVolumeClaimInfo"] = info;
}

/// `volumeStatus` as virt-controller keeps it for a running VMI (pkg/virt-controller/watch/vmi/storage.go
/// `updateVolumeStatus`, `processHotplugVolumeStatus`, `processPVCInfo`, `phaseForUnpluggedVolume`): an entry for
/// each volume of the spec, with its claim's `persistentVolumeClaimInfo`. A hot-plugged volume's attachment Pod is the
/// current one, the Pod (not being deleted) holding exactly the VMI's hot-plugged volumes
/// (`getActiveAndOldAttachmentPods`), a population trigger Pod too. Without one, a volume that is not Ready takes its
/// phase from its claim ([`claim_phase`]: Pending, or Bound once the claim is); with one, a Pending or Bound volume
/// is AttachedToNode (with virt-controller's Event), and the Pod's UID is recorded once its container is ready, which
/// virt-handler waits for. An entry whose volume left the spec stays while any attachment Pod (`pods`) still holds the
/// volume: as it is while virt-handler still has the disk (Ready, MountedToPod), Detaching once virt-handler let go
/// of it; it is dropped only when no Pod holds it. Written as KubeVirt writes a running VMI's status: a JSON patch
/// with a `test` of the old list (lifecycle.go `prepareVMIPatch`).
async fn controller_volume_status(
    shared: &Shared,
    api: &Api<DynamicObject>,
    vmi: &DynamicObject,
    pods: &[DynamicObject],
) -> Result<()> {
    let vmi_name = vmi.metadata.name.clone().unwrap_or_default();
    let claims = claims(&shared.controller, &shared.namespace).list(&ListParams::default()).await?.items;
    let old = list(&vmi.data["status"]["volumeStatus"]);
    let mut left: BTreeMap<String, Value> = old.iter().map(|s| (name_of(s).to_string(), s.clone())).collect();
    let volumes = list(&vmi.data["spec"]["volumes"]);
    let hotplug: BTreeSet<String> =
        volumes.iter().filter(|v| is_hotpluggable(v)).map(|v| name_of(v).to_string()).collect();
    let current = pods.iter().rev().find(|p| p.metadata.deletion_timestamp.is_none() && pod_volumes(p) == hotplug);
    let mut attached = Vec::new();
    let mut new = Vec::new();
    for volume in &volumes {
        let name = name_of(volume).to_string();
        let mut status = left.remove(&name).unwrap_or_else(|| json!({"name": name, "target": ""}));
        if is_hotpluggable(volume) {
            if status["hotplugVolume"].is_null() {
                status["hotplugVolume"] = json!({});
            }
            let phase = status["phase"].as_str().unwrap_or_default().to_string();
            let from_claim = match current {
                None if phase != "Ready" => {
                    status["hotplugVolume"]["attachPodUID"] = json!("");
                    true
                }
                None => false,
                Some(pod) => {
                    let pod_name = pod.metadata.name.clone().unwrap_or_default();
                    let ready = pod.data["status"]["containerStatuses"][0]["ready"] == true;
                    let uid = if ready { pod.metadata.uid.clone().unwrap_or_default() } else { String::new() };
                    status["hotplugVolume"]["attachPodName"] = json!(pod_name);
                    status["hotplugVolume"]["attachPodUID"] = json!(uid);
                    if matches!(phase.as_str(), "" | "Bound" | "Pending") {
                        let message = format!("Created hotplug attachment pod {pod_name}, for volume {name}");
                        set_phase(&mut status, "AttachedToNode", "SuccessfulCreate", message.clone());
                        attached.push(message);
                    }
                    // A volume re-added while its old attachment Pod still goes starts over from its claim.
                    phase == "Detaching"
                }
            };
            if from_claim {
                let (phase, reason, message) = claim_phase(&claims, claim_of(volume));
                set_phase(&mut status, phase, reason, message);
            }
        }
        if let Some(claim) = source_name(volume) {
            claim_info(&mut status, &claims, claim);
        }
        new.push(status);
    }
    for (name, mut status) in left {
        // Only a hot-plugged volume has an attachment pod to wait for, and its entry lasts as long as a Pod holds it
        // (`findAttachmentPodByVolumeName`).
        let Some(pod) = pods.iter().find(|p| pod_volumes(p).contains(&name)) else { continue };
        if status["hotplugVolume"].is_null() {
            continue;
        }
        status["hotplugVolume"] = json!({"attachPodName": pod.metadata.name, "attachPodUID": pod.metadata.uid});
        if !matches!(status["phase"].as_str(), Some("Ready" | "MountedToPod")) {
            status["phase"] = json!("Detaching");
        }
        new.push(status);
    }
    new.sort_by(|a, b| name_of(a).cmp(name_of(b)));
    if new == old {
        return Ok(());
    }
    patch_lists(api, vmi, &[("/status/volumeStatus".into(), Value::Array(new.clone()))]).await?;
    stamp_changes(shared, &vmi_name, &old, &new);
    for message in attached {
        event(shared, Component::Controller, vmi, "Normal", "SuccessfulCreate", &message).await?;
    }
    Ok(())
}

/// virt-handler (pkg/virt-handler/vm.go): starts a scheduled VMI's domain and reports it Running with its
/// interfaces; for a running one keeps the domain in step with the VMI and reports each volume's target and phase
/// from it. Whatever changed is written with a full update of the VMI, as `updateVMIStatus` does (`Update`).
async fn handler_sync(shared: &Shared) -> Result<()> {
    let api = vmis(&shared.handler, &shared.namespace);
    for vmi in api.list(&Default::default()).await? {
        let name = vmi.metadata.name.clone().unwrap_or_default();
        let mut next = vmi.clone();
        let mut failures = BTreeMap::new();
        match vmi.data["status"]["phase"].as_str() {
            Some("Scheduled") => {
                boot(shared, &name, &vmi);
                next.data["status"]["phase"] = json!("Running");
                if let Some(ip) = shared.addresses.lock().unwrap().get(&name) {
                    next.data["status"]["interfaces"] =
                        json!([{"name": "default", "ipAddress": ip, "ipAddresses": [ip]}]);
                }
            }
            Some("Running") => {
                sync_domain(shared, &name, &vmi).await?;
                failures = mount_failures(shared, &vmi).await?;
                // virt-controller makes the entries; with none there is nothing to report.
                if vmi.data["status"]["volumeStatus"].is_array() {
                    let statuses = statuses_from_domain(shared, &name, &vmi, &failures);
                    next.data["status"]["volumeStatus"] = Value::Array(statuses);
                }
            }
            _ => continue,
        }
        if next.data != vmi.data {
            update(&api, &next).await?;
            let (old, new) = (list(&vmi.data["status"]["volumeStatus"]), list(&next.data["status"]["volumeStatus"]));
            stamp_changes(shared, &name, &old, &new);
            for (reason, message) in phase_events(&old, &new) {
                event(shared, Component::Handler, &next, "Normal", &reason, &message).await?;
            }
        }
        // Recorded once per volume: the recorder aggregates the repeats.
        for (volume, message) in failures {
            if shared.mount_failed.lock().unwrap().insert(key(&name, &volume)) {
                event(shared, Component::Handler, &next, "Warning", "SyncFailed", &message).await?;
            }
        }
    }
    Ok(())
}

/// The events virt-handler records for its own status update (vm.go `generateEventsForVolumeStatusChange`): each
/// entry whose phase changed, with its new reason and message. Its `VolumeUnplugged` branch (an entry gone) never
/// fires here, as it effectively never does in KubeVirt: virt-handler keeps every entry it was given, and
/// virt-controller drops them with the attachment Pod.
fn phase_events(old: &[Value], new: &[Value]) -> Vec<(String, String)> {
    new.iter()
        .filter(|n| old.iter().find(|o| o["name"] == n["name"]).is_none_or(|o| o["phase"] != n["phase"]))
        .filter_map(|n| Some((n["reason"].as_str()?.to_string(), n["message"].as_str().unwrap_or_default().into())))
        .filter(|(reason, _)| !reason.is_empty())
        .collect()
}

/// Why virt-handler cannot mount attached volumes into the VMI's virt-launcher Pod (hotplug-disk/mount.go
/// `mountHotplugVolume`), for each AttachedToNode hot-plugged volume: a VMI with `disableHotplug` has a virt-launcher
/// Pod without the `hotplug-disks` directory (template.go adds `withHotplugSupport` only without it); a Filesystem
/// claim (so `persistentVolumeClaimInfo.volumeMode` says, which is what virt-handler's `isBlockVolume` reads) without
/// `disk.img` at its root cannot be bind-mounted (`mountFileSystemHotplugVolume`), and KubeVirt creates `disk.img`
/// only for volumes that are not hot-plugged (host-disk.go `shouldSkipVolumeSource`). Each such volume stays
/// AttachedToNode and every sync fails with the message.
async fn mount_failures(shared: &Shared, vmi: &DynamicObject) -> Result<BTreeMap<String, String>> {
    let mut failures = BTreeMap::new();
    let disabled = vmi.data["spec"]["domain"]["devices"]["disableHotplug"] == true;
    let vmi_uid = vmi.metadata.uid.clone().unwrap_or_default();
    for status in list(&vmi.data["status"]["volumeStatus"]) {
        if status["hotplugVolume"].is_null() || status["phase"] != "AttachedToNode" {
            continue;
        }
        let volume = name_of(&status).to_string();
        if disabled {
            let message = format!(
                "failed to mount filesystem hotplug volume {volume}: failed to resolve /var/lib/kubelet/pods/{vmi_uid}/\
                 volumes/kubernetes.io~empty-dir/hotplug-disks: no such file or directory"
            );
            failures.insert(volume, message);
            continue;
        }
        let pod_uid = status["hotplugVolume"]["attachPodUID"].as_str().unwrap_or_default();
        if pod_uid.is_empty() || status["persistentVolumeClaimInfo"]["volumeMode"] == "Block" {
            continue;
        }
        let Some(spec_volume) = named(&vmi.data["spec"]["volumes"], &json!(volume)) else { continue };
        let Some(found) = shared.storage.volume(&shared.namespace, claim_of(spec_volume)).await? else { continue };
        if !found.disk_image().exists() {
            let message = format!(
                "failed to mount filesystem hotplug volume {volume}: lstat /var/lib/kubelet/pods/{pod_uid}/volumes/\
                 kubernetes.io~local-volume/{}/disk.img: no such file or directory",
                found.name
            );
            failures.insert(volume, message);
        }
    }
    Ok(failures)
}

/// The domain starts with the VMI's disks that are not hot-plugged, on virtio targets in order.
fn boot(shared: &Shared, vmi_name: &str, vmi: &DynamicObject) {
    let mut domain = shared.domain.lock().unwrap();
    let boot = list(&vmi.data["spec"]["volumes"]).into_iter().filter(|v| !is_hotpluggable(v));
    for (n, volume) in boot.enumerate() {
        domain.insert(key(vmi_name, name_of(&volume)), format!("vd{}", (b'a' + n as u8) as char));
    }
}

/// virt-launcher's disk sync, driven by virt-handler: a hotpluggable volume of the spec that virt-handler mounted
/// into the pod (MountedToPod) is plugged into the guest with its disk's serial and bus; a plugged volume gone from
/// the spec is unplugged once KubeVirt's time for that passed, whatever the guest does with it (libvirt
/// `DetachDeviceFlags`), the oracle having asked the guest just before what still held it.
async fn sync_domain(shared: &Shared, vmi_name: &str, vmi: &DynamicObject) -> Result<()> {
    let spec = &vmi.data["spec"];
    let statuses = list(&vmi.data["status"]["volumeStatus"]);
    let phase_of = |name: &str| statuses.iter().find(|s| s["name"] == name).map(|s| s["phase"].clone());
    for volume in list(&spec["volumes"]).iter().filter(|v| is_hotpluggable(v)) {
        let name = name_of(volume);
        shared.leaving.lock().unwrap().remove(&key(vmi_name, name));
        let plugged = shared.domain.lock().unwrap().contains_key(&key(vmi_name, name));
        if plugged || phase_of(name) != Some(json!("MountedToPod")) || !due(shared, vmi_name, name) {
            continue;
        }
        let claim = claim_of(volume);
        let found = shared.storage.volume(&shared.namespace, claim).await?;
        let image = found.map(|v| v.disk_image());
        let image = image.with_context(|| format!("claim {claim} of volume {name} of VMI {vmi_name} is not bound"))?;
        let target = {
            let mut next = shared.next_target.lock().unwrap();
            *next += 1;
            format!("sd{}", (b'a' + *next) as char)
        };
        if let Some(LabGuest { qemu, .. }) = shared.guest_of(vmi_name) {
            let disk = disk_of(spec, &volume["name"]).unwrap_or(Value::Null);
            let spec = VolumeSpec {
                name: name.into(),
                serial: disk["serial"].as_str().unwrap_or(name).to_string(),
                bus: if disk["disk"]["bus"] == "virtio" { DiskBus::Virtio } else { DiskBus::Scsi },
                source: VolumeSource::Image { path: image, format: "raw".into() },
            };
            qemu.add_volume(&spec).await.with_context(|| format!("the lab's virt-handler could not plug {name}"))?;
            shared.serials.lock().unwrap().insert(key(vmi_name, name), spec.serial);
        }
        shared.domain.lock().unwrap().insert(key(vmi_name, name), target);
    }
    let in_spec: Vec<String> = list(&spec["volumes"]).iter().map(|v| name_of(v).to_string()).collect();
    let gone: Vec<String> = {
        let domain = shared.domain.lock().unwrap();
        domain.keys().filter(|(v, name)| v == vmi_name && !in_spec.contains(name)).map(|(_, n)| n.clone()).collect()
    };
    for name in gone {
        let since = *shared.leaving.lock().unwrap().entry(key(vmi_name, &name)).or_insert_with(Instant::now);
        if since.elapsed() < *shared.unplug_delay.lock().unwrap() {
            continue;
        }
        let failure = shared.unplug_failure.lock().unwrap().clone();
        if let Some(failure) = failure {
            failed_unplug(shared, vmi, &name, &failure).await?;
            continue;
        }
        shared.unplug_tried.lock().unwrap().remove(&key(vmi_name, &name));
        if let Some(LabGuest { qemu, oracle }) = shared.guest_of(vmi_name) {
            // Asked at the last instant before the unplug, recorded only once it is done: a failed unplug is retried,
            // and asked about again.
            let serial = shared.serials.lock().unwrap().get(&key(vmi_name, &name)).cloned();
            let check = oracle.ask(vmi_name, &name, serial.as_deref()).await;
            unplug(&qemu, &name).await?;
            oracle.record(check);
        }
        shared.domain.lock().unwrap().remove(&key(vmi_name, &name));
        shared.leaving.lock().unwrap().remove(&key(vmi_name, &name));
        shared.serials.lock().unwrap().remove(&key(vmi_name, &name));
    }
    Ok(())
}

/// Each volume's status from the domain (vm.go `updateVolumeStatusesFromDomain`, `updateHotplugVolumeStatus`): its
/// target is the domain's; a hot-plugged volume with a target is Ready; without one, it is MountedToPod once its
/// attachment pod's volume is mounted into virt-launcher (a step after AttachedToNode, unless the mount fails:
/// `failures`), or UnMountedFromPod once it left the spec.
fn statuses_from_domain(
    shared: &Shared,
    vmi_name: &str,
    vmi: &DynamicObject,
    failures: &BTreeMap<String, String>,
) -> Vec<Value> {
    let in_spec = |name: &str| list(&vmi.data["spec"]["volumes"]).iter().any(|v| v["name"] == name);
    let domain = shared.domain.lock().unwrap().clone();
    let mut statuses = list(&vmi.data["status"]["volumeStatus"]);
    for status in &mut statuses {
        let name = name_of(status).to_string();
        let target = domain.get(&key(vmi_name, &name)).cloned().unwrap_or_default();
        status["target"] = json!(target);
        if status["hotplugVolume"].is_null() {
            continue;
        }
        let phase = status["phase"].as_str().unwrap_or_default().to_string();
        if !target.is_empty() {
            let message = format!("Successfully attach hotplugged volume {name} to VM");
            set_phase(status, "Ready", "VolumeReady", message);
        } else if in_spec(&name)
            && phase == "AttachedToNode"
            && !failures.contains_key(&name)
            && status["hotplugVolume"]["attachPodUID"].as_str().is_some_and(|u| !u.is_empty())
            && due(shared, vmi_name, &name)
        {
            let message = format!("Volume {name} has been mounted in virt-launcher pod");
            set_phase(status, "MountedToPod", "VolumeMountedToPod", message);
        } else if !in_spec(&name) && matches!(phase.as_str(), "Ready" | "MountedToPod" | "AttachedToNode") {
            let message = format!("Volume {name} has been unmounted from virt-launcher pod");
            set_phase(status, "UnMountedFromPod", "VolumeUnMountedFromPod", message);
        }
    }
    statuses
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

/// A failing unplug of volume `name`, tried again about every second (virt-handler's retries of a failed sync): the
/// disk stays in the domain, and each failed try is a `SyncFailed` Warning event (vm.go `sync`). A removal the guest
/// never acknowledges fails from its second try, when QEMU refuses the repeated `device_del`.
async fn failed_unplug(shared: &Shared, vmi: &DynamicObject, name: &str, failure: &UnplugFailure) -> Result<()> {
    let vmi_name = vmi.metadata.name.clone().unwrap_or_default();
    let last = shared.unplug_tried.lock().unwrap().get(&key(&vmi_name, name)).copied();
    if last.is_some_and(|t| t.elapsed() < Duration::from_secs(1)) {
        return Ok(());
    }
    shared.unplug_tried.lock().unwrap().insert(key(&vmi_name, name), Instant::now());
    let message = match failure {
        UnplugFailure::NeverAcknowledged if last.is_none() => return Ok(()),
        UnplugFailure::NeverAcknowledged => format!(
            "internal error: unable to execute QEMU command 'device_del': Device ua-{name} is already in the process \
             of unplug"
        ),
        UnplugFailure::Libvirt(message) => message.clone(),
    };
    let message =
        format!("server error. command SyncVMI failed: \"LibvirtError(Code=1, Domain=10, Message='{message}')\"");
    event(shared, Component::Handler, vmi, "Warning", "SyncFailed", &message).await
}

/// A core Event about the VMI, as `component` records one (as its own identity).
async fn event(
    shared: &Shared,
    component: Component,
    vmi: &DynamicObject,
    type_: &str,
    reason: &str,
    message: &str,
) -> Result<()> {
    let (client, source) = match component {
        Component::Controller => (&shared.controller, "virtualmachine-controller"),
        Component::Handler => (&shared.handler, "virt-handler"),
    };
    let of = resource("VirtualMachineInstance", "kubevirt.io", "v1", "virtualmachineinstances");
    crate::lab_events::record(client, &of, vmi, type_, reason, message, source).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pvc(name: &str, claim: &str) -> Value {
        json!({"name": name, "persistentVolumeClaim": {"claimName": claim, "hotpluggable": true}})
    }

    fn disk(name: &str) -> Value {
        json!({"name": name, "serial": name, "disk": {"bus": "scsi"}})
    }

    /// A spec with the root disk and `volumes`, each with its disk.
    fn spec(volumes: &[Value]) -> Value {
        let (domain, root) = root_disk(false);
        let mut spec = json!({"domain": domain, "volumes": root});
        for volume in volumes {
            push(&mut spec, "volumes", volume.clone());
            spec["domain"]["devices"]["disks"].as_array_mut().unwrap().push(disk(name_of(volume)));
        }
        spec
    }

    fn names(list: &[Value]) -> Vec<&str> {
        list.iter().map(name_of).collect()
    }

    #[test]
    fn a_vmi_that_follows_its_template_is_left_alone() {
        let both = spec(&[pvc("data", "pvc-a")]);
        let (volumes, disks) = declarative_lists(&both, &both, &json!({}));
        assert_eq!((volumes, disks), (list(&both["volumes"]), list(&both["domain"]["devices"]["disks"])));
    }

    #[test]
    fn a_volume_gone_from_the_template_leaves_the_vmi_with_its_disk() {
        let (template, vmi) = (spec(&[]), spec(&[pvc("data", "pvc-a")]));
        let (volumes, disks) = declarative_lists(&template, &vmi, &json!({}));
        assert_eq!((names(&volumes), names(&disks)), (vec!["rootdisk"], vec!["rootdisk"]));
    }

    #[test]
    fn another_claim_is_an_unplug_then_a_plug_once_the_old_status_is_gone() {
        let (template, vmi) = (spec(&[pvc("data", "pvc-b")]), spec(&[pvc("data", "pvc-a")]));
        let (volumes, disks) = declarative_lists(&template, &vmi, &json!({}));
        assert_eq!((names(&volumes), names(&disks)), (vec!["rootdisk"], vec!["rootdisk"]), "dropped, not replaced");

        // Unplugging: its status entry is still there, so it is not added back yet.
        let unplugging = json!({"volumeStatus": [{"name": "data", "phase": "Detaching", "hotplugVolume": {}}]});
        let dropped = spec(&[]);
        assert_eq!(names(&declarative_lists(&template, &dropped, &unplugging).0), ["rootdisk"]);

        let (volumes, disks) = declarative_lists(&template, &dropped, &json!({"volumeStatus": []}));
        assert_eq!(volumes.last(), Some(&pvc("data", "pvc-b")), "back with the new claim");
        assert_eq!(disks.last(), Some(&disk("data")));
    }

    #[test]
    fn volumes_that_are_not_hotpluggable_stay_as_they_are() {
        let mut template = spec(&[]);
        template["volumes"][0]["containerDisk"]["image"] = json!("another");
        let mut vmi = spec(&[]);
        push(&mut vmi, "volumes", json!({"name": "cold", "persistentVolumeClaim": {"claimName": "pvc-c"}}));
        let (volumes, _) = declarative_lists(&template, &vmi, &json!({}));
        assert_eq!(volumes, list(&vmi["volumes"]), "a changed boot disk and a VMI-only cold volume stay");
    }

    #[test]
    fn a_cdrom_keeps_its_drive_when_its_medium_changes() {
        let cdrom = json!({"name": "iso", "cdrom": {"bus": "sata"}});
        let mut template = spec(&[pvc("iso", "pvc-new")]);
        template["domain"]["devices"]["disks"][1] = cdrom.clone();
        let mut vmi = spec(&[pvc("iso", "pvc-old")]);
        vmi["domain"]["devices"]["disks"][1] = cdrom.clone();
        let (volumes, disks) = declarative_lists(&template, &vmi, &json!({}));
        assert_eq!((names(&volumes), disks.last()), (vec!["rootdisk"], Some(&cdrom)));
    }
}
