//! The controller: watches `Wukong` objects (and the claims they own, and VMIs), plans each disk
//! ([`crate::plan`]) and carries the plan out through the companion, then writes status by server-side apply
//! when it changed (an idle cluster gets no writes).

use crate::access::ClusterReads;
use crate::agent_certificate;
use crate::crd::{
    Condition, DataVolumeStatus, DetachRecord, DiskSpec, HISTORY_LIMIT, Phase, VolumeStatus, Wukong, WukongStatus,
    claim_name,
};
use crate::kubevirt_cache::{Cached, CachedVm, CachedVmi, Kind, KubeVirtCache};
use crate::metrics::Metrics;
use crate::moves;
use crate::plan::{ClaimState, DiskPlan, Moving, Observed, Step, plan, refusal_backoff};
use crate::snapshot;
use crate::storage::{self, CachedClaim, Claim, Classes, DataVolume, OwnedClaims, data_volume_resource};
use crate::validate::{SpecError, check, check_against_status};
use crate::wake;
use crate::written::Written;
use crate::{AgentUnreachable, Config, Error, MANAGER, Result, get};
use futures::channel::mpsc::UnboundedSender;
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::PersistentVolumeClaim;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, DynamicObject, ListParams, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType};
use kube::runtime::finalizer::{Event as Finalizing, finalizer};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{Controller, WatchStreamExt, watcher};
use kube::{Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::hash::{DefaultHasher, Hash};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use wukong_controller_client::agent_client::AgentClient;
use wukong_controller_client::companion::{self, AttachOptions, CompanionError, DetachOptions};
use wukong_controller_client::hypervisor::{
    DiskBus, Hypervisor, HypervisorError, VolumeSource, VolumeSpec, VolumeState,
};
use wukong_controller_client::kubevirt::{
    KubeVirt, PendingRequest, VirtualMachine, VirtualMachineInstance, vm_resource, vmi_resource, volume_state_in,
};
use wukong_proto::v1::DiskState;

/// Finalizer that holds a `Wukong` until the claims it must delete are no longer used by the VM.
pub const FINALIZER: &str = "vm.novasphere.dev/claims";
/// Labels on every claim the operator creates.
pub const MANAGED_BY: (&str, &str) = ("app.kubernetes.io/managed-by", MANAGER);
pub const OWNER_LABEL: &str = "vm.novasphere.dev/wukong";
pub const DISK_LABEL: &str = "vm.novasphere.dev/disk";
/// Set on claims kept (`preserveData`) when their `Wukong` is deleted.
pub const PRESERVED_LABEL: &str = "vm.novasphere.dev/preserved";
/// The finalizer the API server adds for a delete with `propagationPolicy: Orphan` (`kubectl delete
/// --cascade=orphan`).
const ORPHAN_FINALIZER: &str = "orphan";
/// A steady object is looked at again this often (drift, a VM started without an event reaching us).
const RESYNC: Duration = Duration::from_secs(300);
/// A step in progress (a claim binding, an unplug under way) is looked at again this soon.
const SOON: Duration = Duration::from_secs(5);
/// Objects reconciled at once: enough that a pass waiting on a slow guest does not hold up the rest, few enough
/// that a burst (an operator restart with hundreds of objects) does not queue every request at the API server.
const CONCURRENCY: u16 = 16;
/// A VM that does not exist yet is looked for again this often.
const VM_MISSING: Duration = Duration::from_secs(30);
/// An attach KubeVirt refused (a VMI with disableHotplug, a bus it does not allow) is tried again this often.
const ATTACH_REFUSED: Duration = Duration::from_secs(30);

/// What every reconcile shares.
pub struct Context {
    pub client: kube::Client,
    pub config: Config,
    pub metrics: Arc<Metrics>,
    events: crate::events::Events,
    /// Refused detaches in a row per (object UID, disk), and when the next attempt is due: the backoff holds
    /// whatever wakes the object meanwhile. Reset by a detach or a re-listing.
    refusals: Mutex<HashMap<(String, String), (u32, Instant)>>,
    /// The status last written per object UID, until the watch has it.
    written: Arc<Written>,
    /// The agents' expiring certificates (shared with the guard).
    certificates: Arc<agent_certificate::CertificateCheck>,
    /// The cluster-scoped reads this identity may make.
    reads: Arc<ClusterReads>,
    caches: Caches,
    /// Wakes other objects: the source of a disk moved into the one reconciled (a change of the destination's spec
    /// is what starts the source's detach).
    wake: UnboundedSender<ObjectRef<Wukong>>,
}

/// What the controller's watches hold, read by every pass instead of asking the API server.
pub struct Caches {
    /// Every claim with an owner label.
    pub claims: Store<CachedClaim>,
    /// Every `Wukong`.
    pub wukongs: Store<Wukong>,
    /// Every VM and VMI.
    pub kubevirt: KubeVirtCache,
}

impl Context {
    pub fn new(
        client: kube::Client,
        config: Config,
        metrics: Arc<Metrics>,
        certificates: Arc<agent_certificate::CertificateCheck>,
        reads: Arc<ClusterReads>,
        caches: Caches,
        wake: UnboundedSender<ObjectRef<Wukong>>,
    ) -> Self {
        Self {
            wake,
            events: crate::events::Events::new(client.clone(), MANAGER.into(), &config.identity),
            client,
            config,
            metrics,
            refusals: Mutex::default(),
            written: Arc::default(),
            certificates,
            reads,
            caches,
        }
    }
}

/// Runs the controller until `shutdown` completes.
pub async fn run(
    client: kube::Client,
    config: Config,
    metrics: Arc<Metrics>,
    certificates: Arc<agent_certificate::CertificateCheck>,
    reads: Arc<ClusterReads>,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    let (wukongs, claims, vms, vmis) = match &config.namespace {
        Some(ns) => (
            Api::<Wukong>::namespaced(client.clone(), ns),
            Api::<CachedClaim>::namespaced(client.clone(), ns),
            Api::<CachedVm>::namespaced(client.clone(), ns),
            Api::<CachedVmi>::namespaced(client.clone(), ns),
        ),
        None => {
            (Api::all(client.clone()), Api::all(client.clone()), Api::all(client.clone()), Api::all(client.clone()))
        }
    };
    // The claims come from the watch that wakes their objects, so a pass reads them from memory (a labelled LIST
    // per pass costs the API server a scan of every claim in the namespace) and sees at least what woke it.
    let (claims_store, claims_writer) = reflector::store();
    let (wukongs_store, wukongs_writer) = reflector::store();
    let (vms_store, vms_writer) = reflector::store();
    let (vmis_store, vmis_writer) = reflector::store();
    let kubevirt = KubeVirtCache { vms: vms_store, vmis: vmis_store };
    let caches = Caches { claims: claims_store, wukongs: wukongs_store.clone(), kubevirt };
    let (wake, woken) = futures::channel::mpsc::unbounded();
    let context = Arc::new(Context::new(client, config, metrics, certificates, reads, caches, wake));
    let claim_events = watcher(claims, watcher::Config::default().labels(OWNER_LABEL).any_semantic())
        .backoff(trigger_backoff())
        .reflect(claims_writer);
    let claim_changes = wake::on_change(claim_events, claim_read);
    let written = context.written.clone();
    let wukong_events = watcher(wukongs, watcher::Config::default().any_semantic())
        .backoff(trigger_backoff())
        // Kept in memory for every object: without what no pass reads (kubectl's last-applied copy of the object).
        .modify(|wukong| {
            wukong.managed_fields_mut().clear();
            wukong.annotations_mut().clear();
        })
        .reflect(wukongs_writer)
        .inspect_ok(move |event| written.seen(event));
    let wukong_changes = wake::on_change(wukong_events, wukong_read);
    // A VM or VMI that changes what a pass reads of it (it starts, stops, or changes its volumes) wakes the Wukong
    // whose VM it is.
    let (vm_changes, vmi_changes) = (cached_changes(vms, vms_writer), cached_changes(vmis, vmis_writer));
    let controller = Controller::for_stream(wukong_changes, wukongs_store.clone())
        .with_config(kube::runtime::controller::Config::default().concurrency(CONCURRENCY))
        .trigger_backoff(trigger_backoff());
    let (vm_store, vmi_store) = (wukongs_store.clone(), wukongs_store);
    let owner_of =
        |claim: CachedClaim| Some(ObjectRef::<Wukong>::new(claim.owner.as_ref()?).within(&claim.namespace()?));
    controller
        // By the owner label, not the owner reference: a DataVolume's claim is owned by the DataVolume (CDI copies
        // its labels, but sets its own `managed-by`).
        .watches_stream(claim_changes, owner_of)
        .watches_stream(vm_changes, move |vm| wukongs_of(&vm_store, &vm.metadata))
        .watches_stream(vmi_changes, move |vmi| wukongs_of(&vmi_store, &vmi.metadata))
        .reconcile_on(woken)
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, context)
        .for_each(|result| async move {
            if let Err(e) = result {
                tracing::debug!(error = %e, "reconcile did not finish");
            }
        })
        .await;
}

/// The VMs (or VMIs) of `api` into the cache `writer` fills, and those whose part a pass reads changed.
fn cached_changes<Spec, Status>(
    api: Api<Cached<Spec, Status>>,
    writer: reflector::store::Writer<Cached<Spec, Status>>,
) -> impl futures::Stream<Item = std::result::Result<Cached<Spec, Status>, watcher::Error>>
where
    Spec: Kind + Serialize + DeserializeOwned + Clone + Default + std::fmt::Debug + Send + Sync + 'static,
    Status: Serialize + DeserializeOwned + Clone + Default + std::fmt::Debug + Send + Sync + 'static,
{
    let events = watcher(api, watcher::Config::default().any_semantic())
        .backoff(trigger_backoff())
        .modify(Cached::trim)
        .reflect(writer);
    wake::on_change(events, Cached::read)
}

/// The `Wukong`s of the VM (or VMI) with metadata `meta`.
fn wukongs_of(store: &Store<Wukong>, meta: &ObjectMeta) -> Vec<ObjectRef<Wukong>> {
    let (ns, name) = (meta.namespace.as_deref(), meta.name.clone().unwrap_or_default());
    store
        .state_filter(|w| w.metadata.namespace.as_deref() == ns && w.is_for_vm(&name))
        .into_iter()
        .map(|w| ObjectRef::from_obj(&*w))
        .collect()
}

/// What of a `Wukong` a pass acts on: its spec (generation), finalizers and deletion. Its status is the operator's
/// own (see `apply`): a change of it alone wakes no pass.
fn wukong_read(wukong: &Wukong, hasher: &mut DefaultHasher) {
    let meta = &wukong.metadata;
    (meta.generation, &meta.finalizers, meta.deletion_timestamp.as_ref().map(|t| t.0.to_string())).hash(hasher);
}

/// What of a claim a pass reads ([`Claim`]), its owner and its deletion; not what binding adds beside its phase
/// (annotations, the volume's name), which the cache does not hold.
fn claim_read(cached: &CachedClaim, hasher: &mut DefaultHasher) {
    (&cached.claim, &cached.owner, cached.meta().deletion_timestamp.as_ref().map(|t| t.0.to_string())).hash(hasher);
}

/// How long the controller's watches wait after an error before they try again: 250 ms doubling up to 3 s (6 s with
/// jitter), from the start again after 30 s without one. kube-runtime's default (client-go's: up to 30 s, reset
/// after 120 s) holds every trigger while any one watch backs off; after an API server restart, whose first minute
/// brings 403s (its RBAC cache not yet filled) and 410s (its watch cache behind the lists it serves), the fault soak
/// saw the operator act on nothing for 3.5 minutes. A removal waiting on the guest should not wait that long.
fn trigger_backoff() -> impl kube::runtime::utils::Backoff + 'static {
    let exponential = backon::ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(250))
        .with_max_delay(Duration::from_secs(3))
        .with_factor(2.0)
        .with_jitter()
        .without_max_times();
    kube::runtime::utils::ResetTimerBackoff::new(
        kube::runtime::watcher::ExponentialBackoff::from(exponential),
        Duration::from_secs(30),
    )
}

/// Failures of the Kubernetes API or KubeVirt: counted, and retried soon from a fresh read.
fn error_policy(wukong: Arc<Wukong>, error: &Error, context: Arc<Context>) -> Action {
    context.metrics.failed(error.metric_label());
    tracing::warn!(wukong = %ObjectRef::from_obj(&*wukong), %error, "reconcile failed; retrying");
    Action::requeue(SOON)
}

async fn reconcile(wukong: Arc<Wukong>, context: Arc<Context>) -> Result<Action> {
    let started = Instant::now();
    // Inside the controller's span, which names the object and why it was woken: a pass that never ends (or never
    // starts) is told by these two lines.
    tracing::debug!("pass started");
    let result = finalized(wukong, &context).await;
    tracing::debug!(elapsed_ms = started.elapsed().as_millis() as u64, ok = result.is_ok(), "pass ended");
    context.metrics.reconciled(started.elapsed());
    result
}

/// A pass under the finalizer: [`apply`] while the object lives, [`cleanup`] once it is being deleted.
async fn finalized(wukong: Arc<Wukong>, context: &Context) -> Result<Action> {
    let ns = wukong.namespace().unwrap_or_default();
    let api: Api<Wukong> = Api::namespaced(context.client.clone(), &ns);
    let object = ObjectRef::from_obj(&*wukong).to_string();
    finalizer(&api, FINALIZER, wukong, |event| async {
        match event {
            Finalizing::Apply(wukong) => apply(&wukong, context).await,
            Finalizing::Cleanup(wukong) => cleanup(&wukong, context).await,
        }
    })
    .await
    .map_err(|e| Error::Finalizer { object, source: Box::new(e) })
}

/// What one pass observed of a `Wukong`'s VM.
struct Scene {
    ns: String,
    vm_name: String,
    vm: VirtualMachine,
    vmi: Option<VirtualMachineInstance>,
    stored: Stored,
    /// The objects that ask for this one's disks, by disk ([`moves::movers`]).
    movers: BTreeMap<String, moves::Mover>,
}

/// The storage of an object's disks, as one pass read it.
struct Stored {
    /// The claims of the object's disks.
    claims: OwnedClaims,
    /// The DataVolumes of the object's disks, by name (read only when a disk has a `source`).
    data_volumes: BTreeMap<String, DataVolume>,
    /// CDI is installed (or nothing asked whether it is).
    cdi: bool,
    /// The listed disks made from a DataVolume (see [`storage::data_volume_source`]).
    from_data_volume: BTreeSet<String>,
    /// Class → the modes its CDI StorageProfile offers, for the classes of disks still to be made.
    profiles: BTreeMap<String, Vec<storage::PropertySet>>,
    classes: Classes,
    /// Disk → its claim, for every data disk listed or recorded ([`claim_names`]).
    claim_names: BTreeMap<String, String>,
}

impl Stored {
    /// The claim of data disk `disk`, as [`claim_names`] found it.
    fn claim_of(&self, disk: &str) -> &str {
        self.claim_names.get(disk).map(String::as_str).unwrap_or_default()
    }

    /// Disk `disk` comes from another object (`moveFrom`) that has not handed its claim over yet.
    fn moving_in(&self, disk: &DiskSpec) -> bool {
        disk.move_from.is_some() && !self.claims.contains_key(self.claim_of(&disk.name))
    }
}

/// The claim of each data disk: `<vm>-<disk>`, unless the disk was moved here (`moveFrom`), whose claim keeps the
/// name it was made with, or is recorded with the claim it came with; an unlisted disk's is the one recorded.
fn claim_names(
    wukong: &Wukong,
    vm_name: &str,
    system: Option<&str>,
    recorded: &[VolumeStatus],
    claims: &OwnedClaims,
    context: &Context,
) -> BTreeMap<String, String> {
    let mut names: BTreeMap<String, String> = recorded
        .iter()
        .filter(|v| !v.system && !v.pvc_name.is_empty())
        .map(|v| (v.name.clone(), v.pvc_name.clone()))
        .collect();
    for disk in wukong.spec.disks.iter().filter(|d| system != Some(d.name.as_str())) {
        let came_with = recorded
            .iter()
            .find(|v| v.name == disk.name && v.moved_from.is_some() && claims.contains_key(&v.pvc_name))
            .map(|v| v.pvc_name.clone());
        let moved_in = disk.move_from.as_ref().and_then(|from| {
            let (store, wukongs) = (&context.caches.claims, &context.caches.wukongs);
            moves::claim_of(store, wukongs, wukong, &disk.name, from)
        });
        let name = moved_in.or(came_with).unwrap_or_else(|| claim_name(vm_name, &disk.name));
        names.insert(disk.name.clone(), name);
    }
    names
}

impl Scene {
    /// The plan of every disk: those listed, those recorded in `recorded`, and the strays.
    fn plan(&self, wukong: &Wukong, recorded: &[VolumeStatus]) -> Vec<DiskPlan> {
        let mut all = recorded.to_vec();
        all.extend(self.strays(&wukong.spec.disks, recorded));
        plan(&wukong.spec.disks, &all, |disk| self.observe(wukong, disk))
    }

    fn observe(&self, wukong: &Wukong, disk: &str) -> Observed {
        let in_vm = self.vm.in_template(disk);
        let name = self.stored.claim_of(disk);
        let claim = self.stored.claims.get(name).map(|c| match c.bound() {
            true => ClaimState::Bound,
            false if self.stored.classes.awaits_consumer(c.class.as_deref()) => ClaimState::AwaitsConsumer,
            false => ClaimState::Pending,
        });
        let listed = wukong.spec.disks.iter().find(|d| d.name == disk);
        let moving = match (listed, self.movers.get(disk)) {
            (Some(d), _) if self.stored.moving_in(d) => Some(Moving::In),
            (_, Some(mover)) if mover.refused.is_some() => Some(Moving::Refused),
            (_, Some(mover)) if self.stored.claims.other_owner(name) == Some(mover.wukong.name_any()) => {
                Some(Moving::Out { handed_over: true })
            }
            (_, Some(_)) if claim.is_some() => Some(Moving::Out { handed_over: false }),
            // Nothing made yet, or the claim is someone else's: nothing to move.
            (_, Some(_)) => Some(Moving::Refused),
            (_, None) => None,
        };
        Observed {
            claim,
            data_volume: self.stored.data_volumes.get(name).map(|d| d.phase.clone()),
            from_data_volume: self.stored.from_data_volume.contains(disk),
            in_vm,
            vmi: self.vmi.as_ref().map(|vmi| volume_state_in(vmi, Some(&self.vm), disk)),
            moving,
        }
    }

    /// The system disk in the VM's definition (a volume of its name, or one using its claim): the claim it uses,
    /// empty when it is not a claim (a container disk).
    fn system_disk_claim(&self, disk: &str) -> Option<String> {
        let claim = claim_name(&self.vm_name, disk);
        let template = self.vm.spec.template.as_ref()?;
        template.spec.volumes.iter().find_map(|v| {
            let source = v.persistent_volume_claim.as_ref().map(|c| c.claim_name.clone());
            let source = source.or_else(|| v.data_volume.as_ref().map(|d| d.name.clone()));
            (v.name == disk || source.as_deref() == Some(claim.as_str())).then(|| source.unwrap_or_default())
        })
    }

    /// A client of the guest's agent, by the VMI's route.
    fn agent(&self, context: &Context) -> Result<AgentClient, AgentUnreachable> {
        match &self.vmi {
            Some(vmi) => context.config.agent.connect(&context.client, Some(&self.vm), vmi),
            None => Err(AgentUnreachable::Stopped(format!("{}/{}", self.ns, self.vm_name))),
        }
    }

    /// This object's disks that the VM (or its VMI) has and that neither the list nor the status names: a pass
    /// changed the VM and was cut short before it wrote status (the operator killed mid-attach), and the disk left
    /// the list meanwhile. Nothing else would ever take them out, so they are planned as unlisted disks: detached
    /// safely (the guest asked, nothing forced), and their claims kept, since the options they were listed with
    /// are not known. Ours: the volume uses the claim (or DataVolume) `<vm>-<disk>` that carries this object's
    /// label.
    fn strays(&self, listed: &[DiskSpec], recorded: &[VolumeStatus]) -> Vec<VolumeStatus> {
        let specs = self.vm.spec.template.iter().map(|t| &t.spec).chain(self.vmi.iter().map(|v| &v.spec));
        let mut strays: Vec<VolumeStatus> = Vec::new();
        for spec in specs {
            for volume in &spec.volumes {
                let claim = claim_name(&self.vm_name, &volume.name);
                let pvc = volume.persistent_volume_claim.as_ref().map(|c| &c.claim_name);
                let data_volume = volume.data_volume.as_ref().map(|d| &d.name);
                let ours = match (pvc, data_volume) {
                    (Some(name), _) => *name == claim && self.stored.claims.contains_key(&claim),
                    (None, Some(name)) => *name == claim && self.stored.data_volumes.contains_key(&claim),
                    (None, None) => false,
                };
                let known = listed.iter().any(|d| d.name == volume.name)
                    || recorded.iter().chain(&strays).any(|v| v.name == volume.name);
                if !ours || known {
                    continue;
                }
                let disk = spec.domain.devices.disks.iter().find(|d| d.name == volume.name);
                let bus = disk.and_then(|d| d.disk.as_ref()).and_then(|t| t.bus.as_deref());
                let message = format!(
                    "disk '{}' is in VM {}/{} with this object's claim {claim}, but neither listed nor recorded (an \
                     attach cut short while it left the list): detached safely, claim kept",
                    volume.name, self.ns, self.vm_name
                );
                tracing::warn!(disk = %volume.name, vm = %self.vm_name, "{message}");
                strays.push(VolumeStatus {
                    name: volume.name.clone(),
                    serial: disk.and_then(|d| d.serial.clone()).unwrap_or_else(|| volume.name.clone()),
                    bus: if bus == Some("virtio") { crate::crd::Bus::Virtio } else { crate::crd::Bus::Scsi },
                    phase: Phase::Attached,
                    data_volume: data_volume
                        .map(|name| Box::new(DataVolumeStatus { name: name.clone(), ..Default::default() })),
                    pvc_name: claim,
                    detach_options: crate::crd::DetachOptions { preserve_data: true, ..Default::default() },
                    message: Some(message),
                    ..Default::default()
                });
            }
        }
        strays
    }

    fn kubevirt(&self, context: &Context) -> KubeVirt {
        // A stopped VM has no VMI to route by: change the VM's spec.
        context.reads.kubevirt(KubeVirt::new(context.client.clone(), &self.ns, &self.vm_name, self.vmi.is_none()))
    }
}

/// Where the pass ended for one disk.
struct DiskOutcome {
    /// The disk's status entry; `None` once it is detached and forgotten.
    status: Option<VolumeStatus>,
    /// When to look again, if sooner than the resync.
    requeue: Option<Duration>,
    record: Option<DetachRecord>,
}

impl DiskOutcome {
    fn settled(status: VolumeStatus) -> Self {
        Self { status: Some(status), requeue: None, record: None }
    }

    fn again(status: VolumeStatus, after: Duration) -> Self {
        Self { status: Some(status), requeue: Some(after), record: None }
    }
}

fn now() -> String {
    Timestamp::now().to_string()
}

async fn apply(wukong: &Wukong, context: &Context) -> Result<Action> {
    let client = &context.client;
    let ns = wukong.namespace().unwrap_or_default();
    let name = wukong.name_any();
    // Only the operator writes status: what it wrote last is the truth, even while the watch cache still holds an
    // older copy (a disk detached on the last pass must not be seen, and detached, again).
    let uid = wukong.uid().unwrap_or_default();
    let written = context.written.get(&uid);
    // Read after `written`: its entry is let go only once the watch cache holds that status (`Written::seen`).
    let latest = context.caches.wukongs.get(&ObjectRef::from_obj(wukong)).filter(|w| w.uid() == wukong.uid());
    let previous = written.or_else(|| latest.and_then(|w| w.status.clone())).or_else(|| wukong.status.clone());
    let previous = previous.unwrap_or_default();
    let vm_name = wukong.vm_name();
    let mut status = WukongStatus { vm_name: vm_name.clone(), ..previous.clone() };
    status.observed_generation = wukong.metadata.generation;

    if let Err(error) = check(&name, &wukong.spec).and_then(|()| check_against_status(&wukong.spec, &previous.volumes))
    {
        return invalid(wukong, context, &previous, status, &error).await;
    }

    let mine = ListParams::default().labels(&format!("{OWNER_LABEL}={name}"));
    // A store not filled yet would show no claim for every disk.
    context.caches.claims.wait_until_ready().await.map_err(|_| Error::ClaimsWatchEnded)?;
    let claims = OwnedClaims::new(context.caches.claims.clone(), &ns, &name);
    // StorageClasses, and whether CDI is installed, matter only for a disk whose claim is not bound yet: a steady
    // object reads neither.
    let system = crate::plan::system_disk(&wukong.spec.disks, &previous.volumes);
    let claim_names = claim_names(wukong, &vm_name, system, &previous.volumes, &claims, context);
    let claim_of = |disk: &str| claim_names.get(disk).cloned().unwrap_or_default();
    let unsettled = wukong
        .spec
        .disks
        .iter()
        .any(|d| system != Some(d.name.as_str()) && !claims.get(&claim_of(&d.name)).is_some_and(|c| c.bound()));
    let sourced = wukong.spec.disks.iter().any(|d| d.source.is_some())
        || previous.volumes.iter().any(|v| v.data_volume.is_some());
    // DataVolumes matter to a disk still to be made (it may become one) and to one made from one (its claim is the
    // DataVolume's, even when the status that would say so was never written).
    let unmade_or_filled =
        wukong.spec.disks.iter().any(|d| {
            system != Some(d.name.as_str()) && claims.get(&claim_of(&d.name)).is_none_or(|c| c.of_data_volume)
        });
    let data_volumes = match sourced || unmade_or_filled {
        false => Some(BTreeMap::new()),
        // No CDI in this cluster a moment ago, as StorageClasses are read: none either.
        true if context.reads.no_cdi(storage::FRESH_FOR) => None,
        true => {
            match Api::<DynamicObject>::namespaced_with(client.clone(), &ns, &data_volume_resource()).list(&mine).await
            {
                Ok(list) => Some(list.items.iter().map(|d| (d.name_any(), DataVolume::of(d))).collect()),
                Err(kube::Error::Api(s)) if s.code == 404 => {
                    context.reads.saw_no_cdi();
                    None
                }
                Err(e) => return Err(e.into()),
            }
        }
    };
    let named: Vec<&str> = wukong.spec.disks.iter().filter_map(|d| d.storage_class_name.as_deref()).collect();
    let classes = if unsettled { Classes::read(client, &context.reads, &named).await? } else { Classes::default() };
    let cdi = data_volumes.is_some();
    let data_volumes = data_volumes.unwrap_or_default();
    // Made from a DataVolume: a disk that has one, or whose storage is still to be made and should be one.
    let from_data_volume = wukong
        .spec
        .disks
        .iter()
        .filter(|d| {
            let name = claim_of(&d.name);
            data_volumes.contains_key(&name)
                || !claims.contains_key(&name) && storage::data_volume_source(d, cdi).is_some()
        })
        .map(|d| d.name.clone())
        .collect();
    // The modes each class offers, read once for the disks whose storage is still to be made.
    let mut profiles = BTreeMap::new();
    for disk in wukong.spec.disks.iter().filter(|d| system != Some(d.name.as_str()) && d.move_from.is_none()) {
        let name = claim_of(&disk.name);
        let made = claims.contains_key(&name) || data_volumes.contains_key(&name);
        if let Some(class) = classes.resolve(disk.storage_class_name.as_deref())
            && !made
            && !profiles.contains_key(class)
        {
            profiles.insert(class.to_string(), storage::property_sets(client, &context.reads, class).await?);
        }
    }
    let stored = Stored { claims, cdi, data_volumes, from_data_volume, classes, profiles, claim_names };
    let movers = moves::movers(&context.caches.wukongs, &context.caches.kubevirt, wukong);
    // A disk moved away, or being handed over, is not made again.
    let leaving = |disk: &str| {
        movers.contains_key(disk) || previous.volumes.iter().any(|v| v.name == disk && v.phase == Phase::Moved)
    };
    // Before the VM is looked at: a spec at fault is said whatever the VM's state.
    if let Err(error) = check_storage(wukong, system, &stored, &leaving, context).await? {
        return invalid(wukong, context, &previous, status, &error).await;
    }
    for (i, disk) in wukong.spec.disks.iter().enumerate().filter(|(_, d)| stored.moving_in(d)) {
        let from = disk.move_from.as_ref().expect("a disk moving in has moveFrom");
        if let Err(error) = moves::check_source(&context.caches.wukongs, wukong, i, from) {
            return invalid(wukong, context, &previous, status, &error).await;
        }
        // The source's pass starts the move: it looks for the objects that ask for its disks.
        let _ = context.wake.unbounded_send(ObjectRef::new(&from.wukong).within(&ns));
    }
    set_condition(&mut status, "SpecValid", true, "Valid", "the spec is valid", wukong);

    // The VM and its VMI as the watches hold them; from the API server when the cache has no VM (a new one), and
    // again before anything is taken out.
    let cached = context.caches.kubevirt.vm_and_vmi(&ns, &vm_name);
    let fresh = cached.is_none();
    let observed = match cached {
        Some(observed) => Some(observed),
        None => read_vm_and_vmi(client, &ns, &vm_name).await?,
    };
    let Some((vm, vmi)) = observed else { return vm_not_found(wukong, context, &previous, status).await };
    let mut scene = Scene { ns: ns.clone(), vm_name, vm, vmi, stored, movers };
    let mut plans = scene.plan(wukong, &previous.volumes);
    if !fresh && plans.iter().any(|p| p.step.removes()) {
        let Some((vm, vmi)) = read_vm_and_vmi(client, &ns, &scene.vm_name).await? else {
            return vm_not_found(wukong, context, &previous, status).await;
        };
        (scene.vm, scene.vmi) = (vm, vmi);
        plans = scene.plan(wukong, &previous.volumes);
    }
    let running = match &scene.vmi {
        Some(_) => "the VM is running",
        None => "the VM is not running: disks are added to its spec and attached when it starts",
    };
    let state = if scene.vmi.is_some() { "Running" } else { "Stopped" };
    set_condition(&mut status, "VMAvailable", true, state, running, wukong);
    // Plaintext agents (labs) have no certificate to expire.
    if scene.vmi.is_some() && context.config.agent.tls.is_some() {
        check_agent_certificate(context, wukong, &scene).await;
    }
    let mut volumes = Vec::new();
    let mut requeue = RESYNC;
    for disk in plans {
        let mut outcome = carry_out(&disk, wukong, &scene, context).await?;
        if let (Some(status), Some(why)) =
            (outcome.status.as_mut(), scene.movers.get(&disk.name).and_then(|m| m.refused.as_ref()))
        {
            let said = status.message.take().map(|m| format!("{m}; ")).unwrap_or_default();
            status.message = Some(format!("{said}{why}: not moved, and its claim is kept"));
        }
        requeue = requeue.min(outcome.requeue.unwrap_or(RESYNC));
        status.history.extend(outcome.record);
        volumes.extend(outcome.status);
    }
    let excess = status.history.len().saturating_sub(HISTORY_LIMIT);
    status.history.drain(..excess);
    status.attached = volumes.iter().filter(|v| v.phase == Phase::Attached).count() as u32;
    status.blocked = volumes.iter().filter(|v| v.phase == Phase::DetachBlocked).count() as u32;
    context.metrics.set_blocked(wukong.uid().as_deref().unwrap_or_default(), status.blocked as usize);
    let blocked: Vec<String> = volumes
        .iter()
        .filter(|v| v.phase == Phase::DetachBlocked)
        .map(|v| format!("{}: {}", v.name, v.blockers.join("; ")))
        .collect();
    match blocked.is_empty() {
        true => set_condition(&mut status, "DetachBlocked", false, "NothingBlocked", "no detach is blocked", wukong),
        false => set_condition(&mut status, "DetachBlocked", true, "GuestRefused", &blocked.join(" | "), wukong),
    }
    let waiting: Vec<&str> = volumes
        .iter()
        .filter(|v| !matches!(v.phase, Phase::Attached | Phase::Moved) && !v.system)
        .map(|v| v.name.as_str())
        .collect();
    match waiting.is_empty() {
        true => set_condition(&mut status, "Ready", true, "AllAttached", "every listed disk is attached", wukong),
        false => {
            let message = format!("not settled yet: {}", waiting.join(", "));
            set_condition(&mut status, "Ready", false, "InProgress", &message, wukong)
        }
    }
    status.volumes = volumes;
    write_status(wukong, context, &previous, status).await?;
    Ok(Action::requeue(requeue))
}

/// VM `ns/name` and its VMI, read from the API server; `None` when the VM does not exist.
async fn read_vm_and_vmi(
    client: &kube::Client,
    ns: &str,
    name: &str,
) -> Result<Option<(VirtualMachine, Option<VirtualMachineInstance>)>> {
    let Some(vm) = get::<VirtualMachine>(client, ns, &vm_resource(), name).await? else { return Ok(None) };
    let vmi = get::<VirtualMachineInstance>(client, ns, &vmi_resource(), name).await?;
    Ok(Some((vm, vmi)))
}

/// The VM does not exist: said in the conditions, and nothing else is done.
async fn vm_not_found(
    wukong: &Wukong,
    context: &Context,
    previous: &WukongStatus,
    mut status: WukongStatus,
) -> Result<Action> {
    let (ns, vm_name) = (wukong.namespace().unwrap_or_default(), wukong.vm_name());
    let message = format!(
        "VirtualMachine {ns}/{vm_name} does not exist: create it, or name it in spec.vmName; nothing was changed"
    );
    set_condition(&mut status, "VMAvailable", false, "VMNotFound", &message, wukong);
    set_condition(&mut status, "Ready", false, "VMNotFound", &message, wukong);
    write_status(wukong, context, previous, status).await?;
    Ok(Action::requeue(VM_MISSING))
}

/// A spec at fault: a `SpecValid` condition and an Event naming the field, and nothing else is done.
async fn invalid(
    wukong: &Wukong,
    context: &Context,
    previous: &WukongStatus,
    mut status: WukongStatus,
    error: &SpecError,
) -> Result<Action> {
    set_condition(&mut status, "SpecValid", false, "InvalidSpec", &error.to_string(), wukong);
    set_condition(
        &mut status,
        "Ready",
        false,
        "InvalidSpec",
        "the spec must be fixed first; nothing was changed",
        wukong,
    );
    if previous.conditions.iter().all(|c| c.type_ != "SpecValid" || c.message != error.to_string()) {
        publish(context, wukong, EventType::Warning, "InvalidSpec", "Validate", &error.to_string()).await;
    }
    write_status(wukong, context, previous, status).await?;
    Ok(Action::await_change())
}

/// The checks that need the cluster, for the disks whose claim or DataVolume is still to be made (what exists
/// already was checked before it was made): the StorageClass exists, CDI is installed for a `source`, a clone's
/// claim exists, and the class can give the modes asked for. `Ok(Err(_))`: the spec is at fault.
async fn check_storage(
    wukong: &Wukong,
    system: Option<&str>,
    stored: &Stored,
    leaving: &(dyn Fn(&str) -> bool + Sync),
    context: &Context,
) -> Result<Result<(), SpecError>> {
    let ns = wukong.namespace().unwrap_or_default();
    let client = &context.client;
    for (i, disk) in wukong.spec.disks.iter().enumerate() {
        let name = stored.claim_of(&disk.name);
        let made = stored.claims.contains_key(name) || stored.data_volumes.contains_key(name);
        // A moved disk's claim is made already, by its source.
        if system == Some(disk.name.as_str()) || made || disk.move_from.is_some() || leaving(&disk.name) {
            continue;
        }
        let field = |f: &str| format!("spec.disks[{i}].{f}");
        let fault = |f: &str, message: String| Ok(Err(SpecError { field: field(f), message }));
        // Made under this name again, the claim of a disk moved away would be taken back from its new owner.
        if let Some(owner) = stored.claims.other_owner(name) {
            return fault(
                "name",
                format!(
                    "claim {name} exists and belongs to Wukong {owner} (a disk moved there keeps its claim); give \
                     this disk another name"
                ),
            );
        }
        if let Some(class) = &disk.storage_class_name
            && stored.classes.exists(class) == Some(false)
        {
            return fault(
                "storageClassName",
                format!("StorageClass '{class}' does not exist; name an existing one or leave it out"),
            );
        }
        if let Some(source) = &disk.source {
            if !stored.cdi {
                return fault(
                    "source",
                    "CDI is not installed in this cluster (no datavolumes.cdi.kubevirt.io API): install CDI, or remove \
                     source to get an empty claim"
                        .into(),
                );
            }
            if let Some(clone) = &source.pvc {
                let ns = clone.namespace.clone().unwrap_or_else(|| ns.clone());
                let claims = Api::<PersistentVolumeClaim>::namespaced(client.clone(), &ns);
                if claims.get_opt(&clone.name).await?.is_none() {
                    return fault(
                        "source.pvc",
                        format!("claim {ns}/{} does not exist; name an existing claim to clone", clone.name),
                    );
                }
            }
        }
        if disk.source.is_none() && !stored.cdi && disk.volume_mode == Some(crate::crd::VolumeMode::Filesystem) {
            return fault(
                "volumeMode",
                "KubeVirt cannot hot-plug an empty Filesystem claim (it makes no disk.img for a hot-plugged volume), \
                 and CDI, which would write one into a blank DataVolume, is not installed: use volumeMode: Block, or \
                 install CDI"
                    .into(),
            );
        }
        if let Some(class) = stored.classes.resolve(disk.storage_class_name.as_deref()) {
            let sets = stored.profiles.get(class).map(Vec::as_slice).unwrap_or_default();
            let data_volume = stored.from_data_volume.contains(&disk.name);
            if let Err(refused) = storage::resolve_modes(disk, class, sets, data_volume) {
                return fault(refused.field, refused.message);
            }
        }
    }
    Ok(Ok(()))
}

/// The disk's status before this pass's step: from the list while it is listed (its options become the ones in
/// force), else as recorded.
fn base_status(disk: &DiskPlan, scene: &Scene) -> VolumeStatus {
    let recorded = disk.recorded.clone().unwrap_or_default();
    let mut status = match &disk.wanted {
        Some(spec) => VolumeStatus {
            name: spec.name.clone(),
            pvc_name: scene.stored.claim_of(&spec.name).to_string(),
            // Where it came from, once here, is told as long as it is listed; where it went, while `Moved`.
            moved_from: spec.move_from.clone().or_else(|| {
                recorded.moved_from.clone().filter(|_| scene.stored.claims.contains_key(&recorded.pvc_name))
            }),
            moved_to: recorded.moved_to.clone().filter(|_| recorded.phase == Phase::Moved),
            // A listed disk is detached only to move it away: its detach is timed, and named, as a removal's.
            removal_since: matches!(disk.step, Step::Detach(_))
                .then(|| recorded.removal_since.clone().unwrap_or_else(now)),
            size: spec.size().to_string(),
            serial: spec.serial(),
            bus: spec.bus,
            detach_options: spec.detach_options.clone(),
            storage_class_name: spec.storage_class_name.clone(),
            phase: recorded.phase,
            device: recorded.device.clone(),
            ..Default::default()
        },
        None => VolumeStatus { removal_since: recorded.removal_since.clone().or_else(|| Some(now())), ..recorded },
    };
    status.system = disk.system;
    let claim = scene.stored.claims.get(&status.pvc_name);
    describe_claim(&mut status, claim.as_ref(), disk, scene);
    if !disk.system {
        let sourced = match disk.wanted {
            Some(_) => scene.stored.from_data_volume.contains(&disk.name),
            None => status.data_volume.is_some(),
        };
        status.data_volume = sourced.then(|| {
            let seen = scene.stored.data_volumes.get(&status.pvc_name).cloned().unwrap_or_default();
            Box::new(DataVolumeStatus { name: status.pvc_name.clone(), phase: seen.phase, progress: seen.progress })
        });
    }
    status
}

/// What `status` says of the disk's claim (none yet: not bound, no modes).
fn describe_claim(status: &mut VolumeStatus, claim: Option<&Claim>, disk: &DiskPlan, scene: &Scene) {
    status.bound = claim.is_some_and(Claim::bound);
    if !disk.system {
        let class = claim.and_then(|c| c.class.as_deref()).or(status.storage_class_name.as_deref());
        status.binding_mode = scene.stored.classes.binding_mode(class).map(str::to_string).or(recorded_binding(disk));
        status.access_modes = claim.map(|c| c.access_modes.clone()).unwrap_or_default();
        status.volume_mode = claim.and_then(|c| c.volume_mode.clone());
    }
}

/// The binding mode recorded for a disk, kept while the classes are not read (its claim is bound).
fn recorded_binding(disk: &DiskPlan) -> Option<String> {
    disk.recorded.as_ref().and_then(|r| r.binding_mode.clone())
}

async fn carry_out(disk: &DiskPlan, wukong: &Wukong, scene: &Scene, context: &Context) -> Result<DiskOutcome> {
    let mut status = base_status(disk, scene);
    let recorded_phase = disk.recorded.as_ref().map(|r| r.phase);
    let key = (wukong.uid().unwrap_or_default(), disk.name.clone());
    if disk.wanted.is_some() {
        context.refusals.lock().expect("never poisoned").remove(&key);
    }
    let set = |status: &mut VolumeStatus, phase: Phase, message: &str| {
        status.phase = phase;
        status.message = (!message.is_empty()).then(|| message.to_string());
    };
    match &disk.step {
        Step::KeepSystemDisk => {
            let claim = scene.system_disk_claim(&disk.name);
            let message = match claim {
                Some(_) => "the system disk: part of the VM's definition, never detached",
                None => "the system disk is not in the VM's spec; the operator never plugs the system disk",
            };
            status.pvc_name = claim.clone().unwrap_or_default();
            status.bound = scene.stored.claims.get(&status.pvc_name).is_some_and(|c| c.bound());
            set(&mut status, if claim.is_some() { Phase::Attached } else { Phase::Pending }, message);
            Ok(DiskOutcome::settled(status))
        }
        Step::RefuseSystemDiskRemoval => {
            let message = format!(
                "disk '{}' is the system disk of VM {}/{}; it is never detached, even with detachOptions.force. Put \
                 it back in spec.disks",
                disk.name, scene.ns, scene.vm_name
            );
            if recorded_phase != Some(Phase::DetachBlocked) {
                publish(context, wukong, EventType::Warning, "SystemDiskRemovalRefused", "Detach", &message).await;
            }
            status.blockers = vec![message.clone()];
            set(&mut status, Phase::DetachBlocked, &message);
            Ok(DiskOutcome::settled(status))
        }
        Step::CreateClaim | Step::CreateDataVolume => {
            let spec = disk.wanted.as_ref().expect("only a listed disk is created");
            let (made, claim) = create_storage(wukong, spec, &status, scene, context).await?;
            // Said now, not by the next pass (woken by the claim's watch) in a write of its own.
            if let Some(claim) = &claim {
                describe_claim(&mut status, Some(claim), disk, scene);
            }
            let (message, waiting, again) = match disk.step {
                // The status says what the next pass, woken by the claim's watch, will say too: one write less.
                Step::CreateClaim => (
                    format!("claim {} created; waiting for it to bind", status.pvc_name),
                    waiting_for_claim(&status),
                    RESYNC,
                ),
                // A DataVolume's progress is not watched.
                _ => {
                    let message = format!("DataVolume {} created; waiting for CDI to fill it", status.pvc_name);
                    (message.clone(), message, SOON)
                }
            };
            publish(context, wukong, EventType::Normal, made, "CreateClaim", &message).await;
            set(&mut status, Phase::Pending, &waiting);
            Ok(DiskOutcome::again(status, again))
        }
        Step::WaitForClaim => {
            let message = waiting_for_claim(&status);
            set(&mut status, Phase::Pending, &message);
            Ok(DiskOutcome::settled(status))
        }
        Step::WaitForDataVolume => {
            let seen = scene.stored.data_volumes.get(&status.pvc_name).cloned().unwrap_or_default();
            let progress = if seen.progress.is_empty() { String::new() } else { format!(", {}", seen.progress) };
            let why = seen.message.map(|m| format!(": {m}")).unwrap_or_default();
            let message =
                format!("waiting for CDI to fill DataVolume {} (phase {}{progress}){why}", status.pvc_name, seen.phase);
            set(&mut status, Phase::Pending, &message);
            Ok(DiskOutcome::again(status, SOON))
        }
        Step::AddToStoppedVm | Step::WaitForBoot => {
            if disk.step == Step::AddToStoppedVm
                && let Err(e) = scene.kubevirt(context).add_volume(&volume_spec(&status)).await
            {
                // The watch cache may not hold yet what the last pass added: KubeVirt's conflict then names the
                // volume this pass would add.
                let added = matches!(e, HypervisorError::Conflict { .. })
                    && get::<VirtualMachine>(&context.client, &scene.ns, &vm_resource(), &scene.vm_name)
                        .await?
                        .is_some_and(|vm| has_volume(&vm, &disk.name));
                if !added {
                    return Err(e.into());
                }
            }
            set(&mut status, Phase::Pending, "in the VM's spec; attached when the VM starts");
            Ok(DiskOutcome::settled(status))
        }
        Step::Attach => attach(status, recorded_phase, wukong, scene, context).await,
        Step::RemoveFromStoppedVm => {
            scene.kubevirt(context).remove_volume(&disk.name).await?;
            set(&mut status, Phase::Detached, "the VM is not running: removed from its spec");
            Ok(DiskOutcome::again(status, SOON))
        }
        // The snapshot's name comes from the moment the removal was first seen: stored before it is taken, so that
        // an operator restarted while it waits finds it.
        Step::Detach(options)
            if options.snapshot.is_some() && disk.recorded.as_ref().is_none_or(|r| r.removal_since.is_none()) =>
        {
            set(
                &mut status,
                Phase::Detaching,
                "removal recorded; a snapshot is taken once the guest released the disk",
            );
            Ok(DiskOutcome::again(status, Duration::from_secs(1)))
        }
        Step::Detach(options) => detach(status, disk, options.clone(), &key, wukong, scene, context).await,
        Step::Finish { delete_claim } => {
            // Another object asks for the disk and cannot have it yet (its VM is being made, say): kept, and
            // remembered, so that the pass that can hand it over finds it (`apply` says why it waits).
            if scene.movers.get(&disk.name).is_some_and(|m| m.refused.is_some()) {
                set(&mut status, Phase::Detached, "detached");
                return Ok(DiskOutcome::settled(status));
            }
            let delete = *delete_claim && !asked_for(&status, wukong, scene, context);
            if delete {
                delete_storage(context, &scene.ns, &status).await?;
            }
            context.refusals.lock().expect("never poisoned").remove(&key);
            let mut record = detached_record(&status, context, status.detach_options.force);
            record.preserved_data = !delete;
            Ok(DiskOutcome { status: None, requeue: None, record: Some(record) })
        }
        Step::AwaitMove => {
            let from = disk.wanted.as_ref().and_then(|d| d.move_from.as_ref()).expect("only a listed disk moves in");
            let message = awaiting_move(from, &status.pvc_name, &scene.ns, context);
            set(&mut status, Phase::Pending, &message);
            Ok(DiskOutcome::again(status, SOON))
        }
        Step::HandOver => {
            let mover = scene.movers.get(&disk.name).expect("a claim is handed over to the object that asks for it");
            moves::hand_over(
                &context.client,
                &scene.ns,
                &status.pvc_name,
                status.data_volume.is_some(),
                &mover.wukong,
                &mover.disk,
            )
            .await?;
            Ok(moved(status, disk, Some(mover.destination()), wukong, context).await)
        }
        Step::Moved => {
            let to = scene.movers.get(&disk.name).map(moves::Mover::destination);
            let to = to.or_else(|| disk.recorded.as_ref().and_then(|r| r.moved_to.clone()));
            Ok(moved(status, disk, to, wukong, context).await)
        }
    }
}

/// Whether a disk's claim, about to be deleted, is another object's, or another object asks for it: asked again
/// from the watch cache, not from the pass's start, since a detach takes seconds and a move declared meanwhile (the
/// source's removal applied a moment before the destination's `moveFrom`) must still find the claim. The next pass
/// hands it over.
fn asked_for(status: &VolumeStatus, wukong: &Wukong, scene: &Scene, context: &Context) -> bool {
    scene.stored.claims.other_owner(&status.pvc_name).is_some()
        || moves::movers(&context.caches.wukongs, &context.caches.kubevirt, wukong).contains_key(&status.name)
}

/// What a disk moving in waits for: the source's VM to let it go, as the source's status tells.
fn awaiting_move(from: &crate::crd::DiskRef, claim: &str, ns: &str, context: &Context) -> String {
    let source = context.caches.wukongs.get(&ObjectRef::new(&from.wukong).within(ns));
    let there =
        source.as_ref().and_then(|w| w.status.as_ref()).and_then(|s| s.volumes.iter().find(|v| v.name == from.disk));
    let why = match there {
        Some(v) if !v.blockers.is_empty() => {
            format!(": the guest there refuses to let it go: {}", v.blockers.join("; "))
        }
        Some(v) => v.message.as_ref().map(|m| format!(": {m}")).unwrap_or_default(),
        None => String::new(),
    };
    format!("waiting for Wukong {} to detach disk '{}' and hand over claim {claim}{why}", from.wukong, from.disk)
}

/// A disk moved away (its claim handed over to `to`): a history line and an Event the first time; shown as `Moved`
/// while listed, else forgotten.
async fn moved(
    mut status: VolumeStatus,
    disk: &DiskPlan,
    to: Option<crate::crd::DiskRef>,
    wukong: &Wukong,
    context: &Context,
) -> DiskOutcome {
    let first = disk.recorded.as_ref().is_none_or(|r| r.phase != Phase::Moved);
    let whither = to.as_ref().map(ToString::to_string).unwrap_or_else(|| "another Wukong".into());
    let record = first.then(|| {
        let mut record = detached_record(&status, context, false);
        record.outcome = "Moved".into();
        record.preserved_data = true;
        record.moved_to = to.clone();
        record.snapshot = status.snapshot.as_ref().map(|s| s.name.clone());
        record
    });
    if first {
        let message = format!(
            "disk '{}' (serial {}) moved to {whither}, which owns claim {} now",
            status.name, status.serial, status.pvc_name
        );
        publish(context, wukong, EventType::Normal, "Moved", "Move", &message).await;
    }
    if disk.wanted.is_none() {
        return DiskOutcome { status: None, requeue: None, record };
    }
    status.phase = Phase::Moved;
    status.message = Some(format!(
        "moved to {whither}, which owns claim {} now; listed here, it is neither plugged nor made again: remove it \
         from spec.disks",
        status.pvc_name
    ));
    (status.device, status.bound, status.moved_to, status.blockers) = (None, false, to, Vec::new());
    DiskOutcome { status: Some(status), requeue: None, record }
}

/// VM `vm` has volume `name` in its template, or a request pending to add it there.
fn has_volume(vm: &VirtualMachine, name: &str) -> bool {
    vm.in_template(name) || vm.pending_request(name) == Some(PendingRequest::Add)
}

fn waiting_for_claim(status: &VolumeStatus) -> String {
    format!("waiting for claim {} to bind", status.pvc_name)
}

fn volume_spec(status: &VolumeStatus) -> VolumeSpec {
    VolumeSpec {
        name: status.name.clone(),
        serial: status.serial.clone(),
        bus: match status.bus {
            crate::crd::Bus::Scsi => DiskBus::Scsi,
            crate::crd::Bus::Virtio => DiskBus::Virtio,
        },
        source: match status.data_volume {
            Some(_) => VolumeSource::DataVolume(status.pvc_name.clone()),
            None => VolumeSource::PersistentVolumeClaim(status.pvc_name.clone()),
        },
    }
}

async fn attach(
    mut status: VolumeStatus,
    recorded: Option<Phase>,
    wukong: &Wukong,
    scene: &Scene,
    context: &Context,
) -> Result<DiskOutcome> {
    let agent = match scene.agent(context) {
        Ok(agent) => agent,
        Err(e) => {
            status.phase = Phase::Attaching;
            status.message = Some(format!("cannot reach the guest's agent: {e}"));
            return Ok(DiskOutcome::again(status, SOON));
        }
    };
    // Released by a detach that was interrupted (the operator restarted, the disk listed again) while the VM still
    // has it plugged and nothing removes it: the guest gets it back before the attach waits for it.
    let plugged = matches!(scene.observe(wukong, &status.name).vmi, Some(VolumeState::Ready { .. }));
    if plugged
        && let Ok(disk) = agent.get_disk(&status.serial, false).await
        && disk.state() == DiskState::Released
    {
        if let Err(e) = agent.cancel_detach(&status.serial).await {
            status.phase = Phase::Attaching;
            status.message = Some(format!("the guest released the disk and CancelDetach failed: {e}"));
            return Ok(DiskOutcome::again(status, SOON));
        }
        let message = format!(
            "disk '{}' was released in the guest by an interrupted detach and is listed again: given back \
             (CancelDetach)",
            status.serial
        );
        publish(context, wukong, EventType::Normal, "ReleaseCancelled", "Attach", &message).await;
    }
    let options = AttachOptions { timeout: context.config.attach_wait, poll: Duration::from_millis(500) };
    let hypervisor = scene.kubevirt(context);
    match companion::attach(&hypervisor, &agent, &volume_spec(&status), &options, &|_| {}).await {
        Ok(attached) => {
            status.device = Some(attached.disk.dev_node.clone());
            status.phase = Phase::Attached;
            status.message = None;
            if recorded != Some(Phase::Attached) {
                let came = status.moved_from.as_ref().map(|f| format!(", moved from {f}")).unwrap_or_default();
                let message = format!(
                    "disk '{}' is attached: {} in the guest (claim {}{came})",
                    status.name, attached.disk.dev_node, status.pvc_name
                );
                publish(context, wukong, EventType::Normal, "Attached", "Attach", &message).await;
            }
            Ok(DiskOutcome::settled(status))
        }
        // KubeVirt refused this disk: why belongs in its status, not in a failed reconcile of the whole object.
        Err(CompanionError::Hypervisor(e))
            if matches!(*e, HypervisorError::Invalid { .. } | HypervisorError::Conflict { .. }) =>
        {
            status.phase = Phase::Attaching;
            status.message = Some(e.to_string());
            Ok(DiskOutcome::again(status, ATTACH_REFUSED))
        }
        Err(CompanionError::Hypervisor(e)) => Err(Error::Hypervisor(*e)),
        Err(e) => {
            status.phase = Phase::Attaching;
            status.message = Some(e.to_string());
            Ok(DiskOutcome::again(status, SOON))
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn detach(
    mut status: VolumeStatus,
    disk: &DiskPlan,
    options: crate::crd::DetachOptions,
    key: &(String, String),
    wukong: &Wukong,
    scene: &Scene,
    context: &Context,
) -> Result<DiskOutcome> {
    let recorded = disk.recorded.as_ref().map(|r| r.phase);
    let due = context.refusals.lock().expect("never poisoned").get(key).map(|(_, due)| *due);
    if let Some(wait) = due.and_then(|due| due.checked_duration_since(Instant::now()))
        && recorded == Some(Phase::DetachBlocked)
    {
        return Ok(DiskOutcome::again(status, wait));
    }
    let blocked = |mut status: VolumeStatus, blockers: Vec<String>| {
        let after = {
            let mut refusals = context.refusals.lock().expect("never poisoned");
            let (attempts, due) = refusals.entry(key.clone()).or_insert((0, Instant::now()));
            *attempts += 1;
            let after = refusal_backoff(*attempts);
            *due = Instant::now() + after;
            after
        };
        let changed = recorded != Some(Phase::DetachBlocked) || status.blockers != blockers;
        status.phase = Phase::DetachBlocked;
        status.message = Some(format!("the guest did not let the disk go; retrying in {}s", after.as_secs()));
        status.blockers = blockers;
        (status, after, changed)
    };
    let agent = match scene.agent(context) {
        Ok(agent) => agent,
        Err(e) => {
            let sentence = format!("cannot reach the guest's agent (fail safe): {e}");
            let (status, after, changed) = blocked(status, vec![sentence]);
            return refused(status, after, changed, wukong, context).await;
        }
    };
    if options.force && recorded != Some(Phase::Detaching) {
        let message = format!(
            "FORCED detach of disk '{}' (detachOptions.force): the guest is not asked to release it; anything still \
             using it loses its data",
            status.name
        );
        publish(context, wukong, EventType::Warning, "ForcedDetach", "Detach", &message).await;
    }
    let detach_options = DetachOptions {
        volume: status.name.clone(),
        serial: Some(status.serial.clone()),
        unmount: options.unmount,
        force: options.force,
        timeout: context.config.detach_wait,
        poll: Duration::from_millis(500),
    };
    let hypervisor = scene.kubevirt(context);
    let gate = options.snapshot.as_ref().map(|asked| {
        let request = snapshot::SnapshotRequest::for_detach(asked, &status, wukong, &scene.ns, options.force);
        snapshot::SnapshotGate::new(context.client.clone(), &agent, request)
    });
    let detached = match &gate {
        Some(gate) => companion::detach_gated(&hypervisor, &agent, &detach_options, gate, &|_| {}).await,
        None => companion::detach(&hypervisor, &agent, &detach_options, &|_| {}).await,
    };
    if let Some(seen) = gate.as_ref().and_then(|g| g.seen()) {
        status.snapshot = Some(seen);
    }
    match detached {
        Ok(detached) => {
            context.refusals.lock().expect("never poisoned").remove(key);
            // Asked again: a move declared while the detach ran (the source's removal applied a moment before the
            // destination's `moveFrom`) gets the claim, not its deletion.
            let mover = moves::movers(&context.caches.wukongs, &context.caches.kubevirt, wukong).remove(&status.name);
            match mover {
                Some(mover) if mover.refused.is_none() => {
                    let (ns, claim) = (&scene.ns, &status.pvc_name);
                    let data_volume = status.data_volume.is_some();
                    moves::hand_over(&context.client, ns, claim, data_volume, &mover.wukong, &mover.disk).await?;
                    return Ok(moved(status, disk, Some(mover.destination()), wukong, context).await);
                }
                // Asked for by an object that cannot have it yet: kept and remembered, as `Step::Finish` does.
                Some(_) if disk.wanted.is_none() => {
                    status.phase = Phase::Detached;
                    status.message = Some("detached".into());
                    return Ok(DiskOutcome::settled(status));
                }
                _ => {}
            }
            let delete = !options.preserve_data && !asked_for(&status, wukong, scene, context);
            if delete {
                delete_storage(context, &scene.ns, &status).await?;
            }
            let mut record = detached_record(&status, context, detached.forced);
            record.preserved_data = !delete;
            record.snapshot = status.snapshot.as_ref().map(|s| s.name.clone());
            let message = format!(
                "disk '{}' (serial {}) is detached{}{}; claim {} {}",
                status.name,
                status.serial,
                if detached.forced { " (forced)" } else { " after the guest released it" },
                match &record.snapshot {
                    Some(name) => format!(", after VolumeSnapshot {name} of it was ready"),
                    None => String::new(),
                },
                status.pvc_name,
                match (delete, options.preserve_data) {
                    (true, _) => "deleted",
                    (false, true) => "kept (preserveData)",
                    (false, false) => "kept (another Wukong's)",
                }
            );
            publish(context, wukong, EventType::Normal, "Detached", "Detach", &message).await;
            Ok(DiskOutcome { status: None, requeue: None, record: Some(record) })
        }
        Err(CompanionError::Hypervisor(e)) => Err(Error::Hypervisor(*e)),
        Err(
            e @ (CompanionError::RemovalPending { .. } | CompanionError::Busy(_) | CompanionError::UnplugHeld { .. }),
        ) => {
            status.phase = Phase::Detaching;
            status.message = Some(e.to_string());
            status.blockers.clear();
            Ok(DiskOutcome::again(status, SOON))
        }
        Err(e) => {
            let mut sentences: Vec<String> = match &e {
                CompanionError::Refused { report, .. } | CompanionError::RemovalUnguarded { report, .. } => {
                    report.blockers.iter().map(|b| b.message.clone()).collect()
                }
                _ => Vec::new(),
            };
            if sentences.is_empty() {
                sentences.push(e.to_string());
            }
            let (status, after, changed) = blocked(status, sentences);
            refused(status, after, changed, wukong, context).await
        }
    }
}

/// A refused detach: a Warning Event and a history line when its reasons changed, and a retry after the backoff.
async fn refused(
    status: VolumeStatus,
    after: Duration,
    changed: bool,
    wukong: &Wukong,
    context: &Context,
) -> Result<DiskOutcome> {
    let reason = status.blockers.join("; ");
    let mut record = None;
    if changed {
        let message = format!("detach of disk '{}' refused, nothing was detached: {reason}", status.name);
        publish(context, wukong, EventType::Warning, "DetachRefused", "Detach", &message).await;
        record = Some(DetachRecord {
            disk: status.name.clone(),
            serial: status.serial.clone(),
            at: now(),
            outcome: "Refused".into(),
            forced: status.detach_options.force,
            duration_seconds: seconds_since(status.removal_since.as_deref()),
            preserved_data: true,
            reason: Some(reason),
            snapshot: None,
            moved_to: None,
        });
    }
    Ok(DiskOutcome { status: Some(status), requeue: Some(after), record })
}

fn seconds_since(since: Option<&str>) -> u64 {
    since
        .and_then(|s| s.parse::<Timestamp>().ok())
        .map(|t| Timestamp::now().duration_since(t).as_secs().max(0) as u64)
        .unwrap_or(0)
}

fn detached_record(status: &VolumeStatus, context: &Context, forced: bool) -> DetachRecord {
    let seconds = seconds_since(status.removal_since.as_deref());
    context.metrics.detached(Duration::from_secs(seconds));
    DetachRecord {
        disk: status.name.clone(),
        serial: status.serial.clone(),
        at: now(),
        outcome: "Detached".into(),
        forced,
        duration_seconds: seconds,
        preserved_data: status.detach_options.preserve_data,
        reason: None,
        snapshot: None,
        moved_to: None,
    }
}

/// The labels of what the operator makes for disk `disk` of `wukong` (its claim or DataVolume, a snapshot before its
/// detach): the manager, the object and the disk.
pub fn disk_labels(wukong: &Wukong, disk: &str) -> Value {
    json!({MANAGED_BY.0: MANAGED_BY.1, OWNER_LABEL: wukong.name_any(), DISK_LABEL: disk})
}

/// The claim of a disk, or the DataVolume that makes it (a disk with a `source`), owned by its `Wukong` and
/// labelled (CDI copies a DataVolume's labels to its claim), by server-side apply. Returns the Event's reason.
async fn create_storage(
    wukong: &Wukong,
    disk: &crate::crd::DiskSpec,
    status: &VolumeStatus,
    scene: &Scene,
    context: &Context,
) -> Result<(&'static str, Option<Claim>)> {
    let owner = wukong.controller_owner_ref(&()).expect("a Wukong read from the API has a name and UID");
    let class = disk.storage_class_name.as_deref();
    let sets = scene.stored.classes.resolve(class).and_then(|c| scene.stored.profiles.get(c));
    let sets = sets.map(Vec::as_slice).unwrap_or_default();
    let source = storage::data_volume_source(disk, scene.stored.cdi);
    // Checked before this pass went on (`check_storage`): a profile changed since is CDI's or the provisioner's to
    // refuse, so the disk's own modes are asked for as they are.
    let from = source.is_some();
    let modes = storage::resolve_modes(disk, class.unwrap_or_default(), sets, from)
        .or_else(|_| storage::resolve_modes(disk, class.unwrap_or_default(), &[], from))
        .expect("without a profile every mode is offered");
    let metadata = json!({"name": status.pvc_name, "ownerReferences": [owner],
        "labels": disk_labels(wukong, &status.name)});
    let (resource, spec, reason) = match source {
        Some(mut source) => {
            // CDI needs the namespace of a claim to clone; the disk's own is the default.
            if let Some(clone) = source.pvc.as_mut() {
                clone.namespace.get_or_insert_with(|| scene.ns.clone());
            }
            let spec = storage::data_volume_spec(&source, disk.size(), class, &modes);
            (data_volume_resource(), spec, "DataVolumeCreated")
        }
        None => (claim_resource(), storage::claim_spec(disk.size(), class, &modes), "ClaimCreated"),
    };
    let object = json!({"apiVersion": resource.api_version, "kind": resource.kind, "metadata": metadata, "spec": spec});
    let made = Api::<DynamicObject>::namespaced_with(context.client.clone(), &scene.ns, &resource)
        .patch(&status.pvc_name, &PatchParams::apply(MANAGER), &Patch::Apply(&object))
        .await?;
    // The claim as the API server made it (its default class given); a DataVolume's is CDI's to make.
    let claim = (resource.kind == "PersistentVolumeClaim")
        .then(|| made.try_parse::<PersistentVolumeClaim>().ok())
        .flatten()
        .map(|c| Claim::of(&c));
    Ok((reason, claim))
}

fn claim_resource() -> kube::api::ApiResource {
    kube::api::ApiResource::erase::<PersistentVolumeClaim>(&())
}

/// Deletes a disk's storage: its DataVolume first when it has one (CDI would make a deleted claim again from it;
/// the garbage collector deletes its claim), then the claim.
async fn delete_storage(context: &Context, ns: &str, status: &VolumeStatus) -> Result<()> {
    if status.data_volume.is_some() {
        let api = Api::<DynamicObject>::namespaced_with(context.client.clone(), ns, &data_volume_resource());
        match api.delete(&status.pvc_name, &DeleteParams::background()).await {
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.code == 404 => {}
            Err(e) => return Err(e.into()),
        }
    }
    delete_claim_named(context, ns, &status.pvc_name).await
}

async fn delete_claim_named(context: &Context, ns: &str, claim: &str) -> Result<()> {
    match Api::<PersistentVolumeClaim>::namespaced(context.client.clone(), ns)
        .delete(claim, &DeleteParams::default())
        .await
    {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// The `Wukong` is being deleted: claims of disks with `preserveData` are released from it (owner reference
/// dropped, labelled `preserved`); the others are deleted once the VM no longer uses them: not in its spec, nor in
/// its VMI's, and no VMI status entry for their disk (KubeVirt's attachment Pod still holds the claim until then).
async fn cleanup(wukong: &Wukong, context: &Context) -> Result<Action> {
    let ns = wukong.namespace().unwrap_or_default();
    let vm_name = wukong.vm_name();
    let vm = get::<VirtualMachine>(&context.client, &ns, &vm_resource(), &vm_name).await?;
    let vmi = get::<VirtualMachineInstance>(&context.client, &ns, &vmi_resource(), &vm_name).await?;
    let uses = |claim: &str| {
        let in_spec = |volumes: &[wukong_controller_client::kubevirt::Volume]| {
            volumes.iter().any(|v| {
                v.persistent_volume_claim.as_ref().is_some_and(|c| c.claim_name == claim)
                    || v.data_volume.as_ref().is_some_and(|d| d.name == claim)
            })
        };
        vm.as_ref().and_then(|vm| vm.spec.template.as_ref()).is_some_and(|t| in_spec(&t.spec.volumes))
            || vmi.as_ref().is_some_and(|vmi| in_spec(&vmi.spec.volumes))
    };
    let unplugging =
        |disk: &str| vmi.as_ref().is_some_and(|vmi| vmi.status.volume_status.iter().any(|s| s.name == disk));
    let mine = ListParams::default().labels(&format!("{OWNER_LABEL}={}", wukong.name_any()));
    let volumes = wukong.status.as_ref().map(|s| s.volumes.clone()).unwrap_or_default();
    // A disk's storage: its claim, or the DataVolume that owns its claim (kept or deleted with it).
    let mut owned = Vec::new();
    for resource in [claim_resource(), data_volume_resource()] {
        let is_data_volume = resource.kind == "DataVolume";
        if is_data_volume && volumes.iter().all(|v| v.data_volume.is_none()) {
            continue;
        }
        let api = Api::<DynamicObject>::namespaced_with(context.client.clone(), &ns, &resource);
        let objects = match api.list(&mine).await {
            Ok(list) => list.items,
            Err(kube::Error::Api(s)) if s.code == 404 && is_data_volume => Vec::new(),
            Err(e) => return Err(e.into()),
        };
        let by_data_volume = |o: &DynamicObject| o.owner_references().iter().any(|r| r.kind == "DataVolume");
        let objects = objects.into_iter().filter(|o| is_data_volume || !by_data_volume(o));
        owned.extend(objects.map(|o| (api.clone(), is_data_volume, o)));
    }
    // `kubectl delete --cascade=orphan` asks to keep what the object owns: the API server adds the `orphan`
    // finalizer, and the garbage collector takes this object's owner reference off every claim and then removes that
    // finalizer, before or after we look. Either sign keeps every claim as `preserveData` keeps one, plugged or not:
    // an uninstall deletes the `Wukong` objects this way and loses no disk. A claim we do not own is never ours to
    // delete anyway.
    let orphaned = wukong.finalizers().iter().any(|f| f == ORPHAN_FINALIZER);
    let uid = wukong.uid().unwrap_or_default();
    // A disk another object asks for goes there once the VM let it go, rather than with this object.
    let movers = moves::movers(&context.caches.wukongs, &context.caches.kubevirt, wukong);
    let mut in_use = Vec::new();
    for (api, data_volume, object) in owned {
        let name = object.name_any();
        let ours = object.owner_references().iter().any(|o| o.uid == uid);
        let recorded = volumes.iter().find(|v| v.pvc_name == name);
        let disk = object.labels().get(DISK_LABEL).cloned().unwrap_or_default();
        let mover = movers.get(&disk).filter(|_| ours && !orphaned);
        if let Some(mover) = mover.filter(|m| m.refused.is_none()) {
            if uses(&name) || unplugging(&disk) {
                in_use.push(name);
            } else {
                moves::hand_over(&context.client, &ns, &name, data_volume, &mover.wukong, &mover.disk).await?;
            }
            continue;
        }
        let preserve = orphaned || !ours || mover.is_some() || recorded.is_none_or(|v| v.detach_options.preserve_data);
        if preserve {
            let patch = json!({"metadata": {"ownerReferences": null, "labels": {PRESERVED_LABEL: "true"}}});
            api.patch(&name, &PatchParams::default(), &Patch::Merge(&patch)).await?;
        } else if uses(&name) || object.labels().get(DISK_LABEL).is_some_and(|disk| unplugging(disk)) {
            in_use.push(name);
        } else if let Some(volume) = recorded {
            delete_storage(context, &ns, volume).await?;
        }
    }
    context.metrics.set_blocked(wukong.uid().as_deref().unwrap_or_default(), 0);
    context.written.forget(&wukong.uid().unwrap_or_default());
    if in_use.is_empty() {
        return Ok(Action::await_change());
    }
    // An error keeps the finalizer (and the object) until the VM lets go; the error policy looks again soon.
    Err(Error::ClaimsInUse {
        object: format!("Wukong {ns}/{}", wukong.name_any()),
        vm: vm_name,
        claims: in_use.join(", "),
    })
}

fn set_condition(status: &mut WukongStatus, type_: &str, ok: bool, reason: &str, message: &str, wukong: &Wukong) {
    let value = if ok { "True" } else { "False" };
    let generation = wukong.metadata.generation;
    match status.conditions.iter_mut().find(|c| c.type_ == type_) {
        Some(c) if c.status == value && c.reason == reason && c.message == message => {
            c.observed_generation = generation
        }
        Some(c) => {
            let time = if c.status == value { c.last_transition_time.clone() } else { now() };
            *c = Condition {
                type_: type_.into(),
                status: value.into(),
                reason: reason.into(),
                message: message.into(),
                last_transition_time: time,
                observed_generation: generation,
            };
        }
        None => status.conditions.push(Condition {
            type_: type_.into(),
            status: value.into(),
            reason: reason.into(),
            message: message.into(),
            last_transition_time: now(),
            observed_generation: generation,
        }),
    }
}

/// Writes status by server-side apply, only when it changed (an object never given one has none: its status names
/// no VM, so it differs from any written).
async fn write_status(wukong: &Wukong, context: &Context, previous: &WukongStatus, status: WukongStatus) -> Result<()> {
    if *previous == status {
        return Ok(());
    }
    let uid = wukong.uid().unwrap_or_default();
    let api: Api<Wukong> = Api::namespaced(context.client.clone(), &wukong.namespace().unwrap_or_default());
    let patch = json!({"apiVersion": Wukong::api_version(&()), "kind": Wukong::kind(&()), "status": &status});
    // Recorded before the write: the watch may deliver it before the response arrives, and must find it to let it
    // go (else the entry stays, older than the cache, and the next pass writes the same status again).
    let prior = context.written.wrote(&uid, status);
    if let Err(e) =
        api.patch_status(&wukong.name_any(), &PatchParams::apply(MANAGER).force(), &Patch::Apply(&patch)).await
    {
        context.written.restore(&uid, prior);
        return Err(e.into());
    }
    Ok(())
}

/// Asks a running VM's agent which certificate it serves and warns when that expires soon (see
/// [`agent_certificate`]).
async fn check_agent_certificate(context: &Context, wukong: &Wukong, scene: &Scene) {
    let Ok(agent) = scene.agent(context) else { return };
    if let Some(note) = context.certificates.check(&agent, &scene.ns, &scene.vm_name).await {
        publish(context, wukong, EventType::Warning, "AgentCertificateExpiring", "CheckAgent", &note).await;
    }
}

/// Records an Event on the `Wukong`; a failure to record one is logged, never fatal.
async fn publish(context: &Context, wukong: &Wukong, type_: EventType, reason: &str, action: &str, note: &str) {
    let event = Event {
        type_,
        reason: reason.into(),
        note: Some(note.chars().take(1000).collect()),
        action: action.into(),
        secondary: None,
    };
    match type_ {
        EventType::Warning => tracing::warn!(wukong = %ObjectRef::from_obj(wukong), reason, "{note}"),
        EventType::Normal => tracing::info!(wukong = %ObjectRef::from_obj(wukong), reason, "{note}"),
    }
    if let Err(e) = context.events.publish(&event, &wukong.object_ref(&())).await {
        tracing::warn!(error = %e, reason, "cannot record an Event");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::{Api as MockApi, context, context_with_claims, wukong};
    use http::Method;

    fn not_found(what: &str) -> (u16, serde_json::Value) {
        let message = format!("{what} not found");
        (
            404,
            json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404, "message": message}),
        )
    }

    #[test]
    fn a_disk_in_the_vm_under_the_objects_claim_that_nothing_names_is_a_stray() {
        let vm: VirtualMachine = serde_json::from_value(json!({"spec": {"template": {"spec": {
            "domain": {"devices": {"disks": [
                {"name": "lost", "serial": "lost-serial", "disk": {"bus": "virtio"}},
                {"name": "filled", "disk": {"bus": "scsi"}},
            ]}},
            "volumes": [
                {"name": "rootdisk", "persistentVolumeClaim": {"claimName": "golden"}},
                {"name": "lost", "persistentVolumeClaim": {"claimName": "db-vm-lost", "hotpluggable": true}},
                {"name": "filled", "dataVolume": {"name": "db-vm-filled", "hotpluggable": true}},
                {"name": "listed", "persistentVolumeClaim": {"claimName": "db-vm-listed", "hotpluggable": true}},
                {"name": "recorded", "persistentVolumeClaim": {"claimName": "db-vm-recorded", "hotpluggable": true}},
                {"name": "theirs", "persistentVolumeClaim": {"claimName": "db-vm-theirs", "hotpluggable": true}},
                {"name": "renamed", "persistentVolumeClaim": {"claimName": "db-vm-lost", "hotpluggable": true}},
            ],
        }}}}))
        .unwrap();
        // `theirs` has the name the operator would give it, but its claim is another object's.
        let mut claims: Vec<_> = ["db-vm-lost", "db-vm-listed", "db-vm-recorded", "db-vm-filled"]
            .iter()
            .map(|name| crate::fixtures::claim(name, "db", "Bound"))
            .collect();
        claims.push(crate::fixtures::claim("db-vm-theirs", "other", "Bound"));
        let stored = Stored {
            claims: OwnedClaims::new(crate::fixtures::claims_store(claims), "ns1", "db"),
            data_volumes: [("db-vm-filled".to_string(), DataVolume::default())].into(),
            cdi: true,
            from_data_volume: BTreeSet::new(),
            profiles: BTreeMap::new(),
            classes: Classes::default(),
            claim_names: BTreeMap::new(),
        };
        let scene = Scene { ns: "ns1".into(), vm_name: "db-vm".into(), vm, vmi: None, stored, movers: BTreeMap::new() };
        let listed = wukong(json!([{"name": "listed", "size": "1Gi"}])).spec.disks;
        let recorded = [VolumeStatus { name: "recorded".into(), ..Default::default() }];

        let strays = scene.strays(&listed, &recorded);
        let names: Vec<(&str, &str, &str)> =
            strays.iter().map(|v| (v.name.as_str(), v.pvc_name.as_str(), v.serial.as_str())).collect();
        assert_eq!(names, [("lost", "db-vm-lost", "lost-serial"), ("filled", "db-vm-filled", "filled")]);
        assert_eq!(strays[0].bus, crate::crd::Bus::Virtio);
        assert_eq!((strays[1].bus, strays[1].data_volume.is_some()), (crate::crd::Bus::Scsi, true));
        for stray in &strays {
            let options = &stray.detach_options;
            assert!(options.preserve_data && !options.force && !options.unmount, "{stray:?}");
        }
        // Planned as unlisted disks: a safe detach of a running VM's disk, with the claim kept.
        let mut all = recorded.to_vec();
        all.extend(strays);
        let running = |_: &str| Observed {
            claim: Some(ClaimState::Bound),
            data_volume: None,
            from_data_volume: false,
            in_vm: true,
            vmi: Some(VolumeState::Ready { serial: None, target: "sdb".into() }),
            moving: None,
        };
        let steps: Vec<(String, Step)> =
            plan(&listed, &all, running).into_iter().map(|p| (p.name, p.step)).collect::<Vec<_>>();
        let detach = Step::Detach(crate::crd::DetachOptions { preserve_data: true, ..Default::default() });
        assert!(steps.contains(&("lost".into(), detach)), "{steps:?}");
    }

    #[tokio::test]
    async fn an_invalid_spec_is_reported_and_nothing_else_is_touched() {
        let object = wukong(json!([{"name": "data", "size": "1Gi"}, {"name": "data", "size": "2Gi"}]));
        let api = MockApi::start(|_| None);
        apply(&object, &context(api.client())).await.unwrap();
        let seen = api.seen();
        let calls: Vec<(Method, &str)> = seen.iter().map(|s| (s.method.clone(), s.path.as_str())).collect();
        assert_eq!(
            calls,
            [
                (Method::POST, "/apis/events.k8s.io/v1/namespaces/ns1/events"),
                (Method::PATCH, "/apis/vm.novasphere.dev/v1alpha1/namespaces/ns1/wukongs/db/status"),
            ]
        );
        assert_eq!(seen[0].body["reason"], "InvalidSpec");
        let conditions = &seen[1].body["status"]["conditions"];
        let valid = conditions.as_array().unwrap().iter().find(|c| c["type"] == "SpecValid").unwrap();
        assert_eq!(valid["status"], "False");
        assert_eq!(valid["message"], "spec.disks[1].name: disk 'data' is listed twice (also spec.disks[0])");
    }

    #[tokio::test]
    async fn a_missing_vm_is_reported_and_nothing_else_is_touched() {
        let object = wukong(json!([{"name": "root", "system": true}, {"name": "data", "size": "1Gi"}]));
        let api = MockApi::start(|s| {
            (s.path.ends_with("/virtualmachines/db-vm")).then(|| not_found("virtualmachines.kubevirt.io \"db-vm\""))
        });
        let action = apply(&object, &context(api.client())).await.unwrap();
        assert_eq!(action, Action::requeue(VM_MISSING));
        let seen = api.seen();
        let calls: Vec<(Method, &str)> = seen.iter().map(|s| (s.method.clone(), s.path.as_str())).collect();
        // The disks' storage is read (and checked) first, then the VM; the only write is status.
        assert_eq!(
            calls,
            [
                (Method::GET, "/apis/cdi.kubevirt.io/v1beta1/namespaces/ns1/datavolumes"),
                (Method::GET, "/apis/storage.k8s.io/v1/storageclasses"),
                (Method::GET, "/apis/kubevirt.io/v1/namespaces/ns1/virtualmachines/db-vm"),
                (Method::PATCH, "/apis/vm.novasphere.dev/v1alpha1/namespaces/ns1/wukongs/db/status"),
            ]
        );
        let status = &seen[3].body["status"];
        assert_eq!(status["volumes"], json!([]), "no disk is touched: {status}");
        let vm = status["conditions"].as_array().unwrap().iter().find(|c| c["type"] == "VMAvailable").unwrap();
        assert!(vm["message"].as_str().unwrap().starts_with("VirtualMachine ns1/db-vm does not exist"), "{vm}");
    }

    #[tokio::test]
    async fn a_new_disk_gets_its_claim_owned_and_labelled_before_anything_else() {
        let object = wukong(
            json!([{"name": "root", "system": true}, {"name": "data", "size": "8Gi", "storageClassName": "fast"}]),
        );
        let vm = json!({"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachine", "metadata": {"name": "db-vm"},
                        "spec": {"template": {"spec": {"volumes": [{"name": "root", "containerDisk": {"image": "x"}}]}}}});
        let api = MockApi::start(move |s| match s.path.as_str() {
            p if p.ends_with("/virtualmachines/db-vm") => Some((200, vm.clone())),
            p if p.ends_with("/virtualmachineinstances/db-vm") => {
                Some(not_found("virtualmachineinstances.kubevirt.io"))
            }
            "/apis/storage.k8s.io/v1/storageclasses" => Some((
                200,
                json!({"apiVersion": "storage.k8s.io/v1", "kind": "StorageClassList", "metadata": {},
                       "items": [{"metadata": {"name": "fast"}, "provisioner": "x", "volumeBindingMode": "Immediate"}]}),
            )),
            // No CDI: a bare claim.
            p if p.starts_with("/apis/cdi.kubevirt.io/") => Some(not_found("the server could not find the resource")),
            _ => None,
        });
        let action = apply(&object, &context(api.client())).await.unwrap();
        assert_eq!(action, Action::requeue(RESYNC), "the claim's watch wakes it when it binds");
        let seen = api.seen();
        let writes: Vec<&str> = seen.iter().filter(|s| s.method != Method::GET).map(|s| s.path.as_str()).collect();
        assert_eq!(
            writes,
            [
                "/api/v1/namespaces/ns1/persistentvolumeclaims/db-vm-data",
                "/apis/events.k8s.io/v1/namespaces/ns1/events",
                "/apis/vm.novasphere.dev/v1alpha1/namespaces/ns1/wukongs/db/status",
            ],
            "one claim, one Event, one status write: no VM change before the claim is bound"
        );
        let claim = &seen.iter().find(|s| s.path.ends_with("/db-vm-data")).unwrap().body;
        assert_eq!(claim["metadata"]["ownerReferences"][0]["kind"], "Wukong");
        assert_eq!(claim["metadata"]["labels"]["vm.novasphere.dev/disk"], "data");
        assert_eq!(claim["spec"]["resources"]["requests"]["storage"], "8Gi");
        assert_eq!(claim["spec"]["storageClassName"], "fast");
        let volumes = &seen.last().unwrap().body["status"]["volumes"];
        assert_eq!(volumes[0]["system"], true);
        assert_eq!(volumes[0]["phase"], "Attached", "the system disk is the VM's own: {volumes}");
        assert_eq!(volumes[1]["phase"], "Pending");
        assert_eq!(volumes[1]["detachOptions"], json!({"force": false, "preserveData": false, "unmount": false}));
        assert_eq!(claim["spec"]["accessModes"], json!(["ReadWriteOnce"]), "no profile: RWO");
        assert_eq!(claim["spec"]["volumeMode"], "Block", "KubeVirt hot-plugs no empty Filesystem claim");
        assert_eq!(volumes[1]["bindingMode"], "Immediate");
        assert_eq!(
            (volumes[1]["accessModes"].clone(), volumes[1]["volumeMode"].clone(), volumes[1]["message"].clone()),
            (json!(["ReadWriteOnce"]), json!("Block"), json!("waiting for claim db-vm-data to bind")),
            "the claim as made, and what the next pass says too: it has nothing to write"
        );
    }

    /// A stopped VM (no VMI), its claims as `claims`, StorageClass `fast` binding as `binding`, CDI's StorageProfile
    /// of `fast` offering `profile`, and CDI installed or not; returns every request `object`'s pass made.
    async fn pass(
        object: &Wukong,
        claims: serde_json::Value,
        binding: &str,
        profile: serde_json::Value,
        cdi: bool,
    ) -> Vec<crate::fixtures::Seen> {
        let vm = json!({"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachine", "metadata": {"name": "db-vm"},
                        "spec": {"template": {"spec": {"volumes": [{"name": "root", "containerDisk": {"image": "x"}}]}}}});
        let classes = json!({"apiVersion": "storage.k8s.io/v1", "kind": "StorageClassList", "metadata": {}, "items": [
            {"metadata": {"name": "fast", "annotations": {"storageclass.kubernetes.io/is-default-class": "true"}},
             "provisioner": "x", "volumeBindingMode": binding}]});
        let claims: Vec<PersistentVolumeClaim> = serde_json::from_value(claims).unwrap();
        let profile = json!({"apiVersion": "cdi.kubevirt.io/v1beta1", "kind": "StorageProfile",
                             "metadata": {"name": "fast"}, "status": {"claimPropertySets": profile}});
        let api = MockApi::start(move |s| match (s.method.clone(), s.path.as_str()) {
            (_, p) if p.ends_with("/virtualmachines/db-vm") && s.method == Method::GET => Some((200, vm.clone())),
            (_, p) if p.ends_with("/virtualmachineinstances/db-vm") => {
                Some(not_found("virtualmachineinstances.kubevirt.io"))
            }
            (Method::GET, "/apis/storage.k8s.io/v1/storageclasses") => Some((200, classes.clone())),
            (Method::GET, "/apis/cdi.kubevirt.io/v1beta1/storageprofiles/fast") => Some((200, profile.clone())),
            (Method::GET, p) if p.contains("/persistentvolumeclaims/") => Some(not_found("persistentvolumeclaims")),
            (_, p) if p.starts_with("/apis/cdi.kubevirt.io/") && !cdi => {
                Some(not_found("the server could not find the requested resource"))
            }
            _ => None,
        });
        apply(object, &context_with_claims(api.client(), claims)).await.unwrap();
        api.seen()
    }

    fn writes(seen: &[crate::fixtures::Seen]) -> Vec<String> {
        seen.iter().filter(|s| s.method != Method::GET).map(|s| format!("{} {}", s.method, s.path)).collect()
    }

    fn spec_error(seen: &[crate::fixtures::Seen]) -> String {
        let status = &seen.last().unwrap().body["status"];
        let valid = status["conditions"].as_array().unwrap().iter().find(|c| c["type"] == "SpecValid").unwrap();
        assert_eq!(valid["status"], "False", "{status}");
        valid["message"].as_str().unwrap().to_string()
    }

    fn pending_claim(class: &str) -> serde_json::Value {
        json!({"apiVersion": "v1", "kind": "PersistentVolumeClaim",
               "metadata": {"name": "db-vm-data", "namespace": "ns1", "labels": {"vm.novasphere.dev/wukong": "db"}},
               "spec": {"storageClassName": class, "accessModes": ["ReadWriteOnce"], "volumeMode": "Block"},
               "status": {"phase": "Pending"}})
    }

    #[tokio::test]
    async fn a_claim_waiting_for_its_first_consumer_is_plugged_and_an_immediate_one_is_waited_for() {
        let object = wukong(json!([{"name": "root", "system": true}, {"name": "data", "size": "1Gi"}]));
        let seen = pass(&object, json!([pending_claim("fast")]), "WaitForFirstConsumer", json!([]), true).await;
        let vm_patch = "PUT /apis/subresources.kubevirt.io/v1/namespaces/ns1/virtualmachines/db-vm/addvolume";
        assert!(writes(&seen).iter().any(|w| w == vm_patch), "added to the stopped VM: {:?}", writes(&seen));
        let data = &seen.last().unwrap().body["status"]["volumes"][1];
        assert_eq!((data["bound"].clone(), data["bindingMode"].clone()), (json!(false), json!("WaitForFirstConsumer")));
        assert_eq!(
            (data["volumeMode"].clone(), data["accessModes"].clone()),
            (json!("Block"), json!(["ReadWriteOnce"]))
        );

        let lists_data_volumes = |seen: &[crate::fixtures::Seen]| seen.iter().any(|s| s.path.ends_with("/datavolumes"));
        assert!(!lists_data_volumes(&seen), "a bare claim made: no DataVolume to look for");

        let seen = pass(&object, json!([pending_claim("fast")]), "Immediate", json!([]), true).await;
        assert!(!writes(&seen).iter().any(|w| w == vm_patch), "{:?}", writes(&seen));
        // A claim CDI made for a DataVolume (whose status may never have said so): the DataVolume is looked at.
        let mut filled = pending_claim("fast");
        filled["metadata"]["ownerReferences"] =
            json!([{"apiVersion": "cdi.kubevirt.io/v1beta1", "kind": "DataVolume", "name": "db-vm-data", "uid": "1"}]);
        assert!(lists_data_volumes(&pass(&object, json!([filled]), "Immediate", json!([]), true).await));
        let data = &seen.last().unwrap().body["status"]["volumes"][1];
        assert_eq!(data["message"], "waiting for claim db-vm-data to bind");
    }

    /// VM ns1/db-vm, with volume `data` (of claim db-vm-data) beside its container disk when `with_data`.
    fn db_vm(with_data: bool) -> serde_json::Value {
        let mut volumes = vec![json!({"name": "root", "containerDisk": {"image": "x"}})];
        if with_data {
            volumes.push(
                json!({"name": "data", "persistentVolumeClaim": {"claimName": "db-vm-data", "hotpluggable": true}}),
            );
        }
        json!({"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachine",
               "metadata": {"name": "db-vm", "namespace": "ns1", "resourceVersion": "5", "uid": "u1",
                            "generation": 3, "labels": {"app": "db"},
                            "finalizers": ["kubevirt.io/virtualMachineControllerFinalize"],
                            "managedFields": [{"manager": "kubectl", "operation": "Update"}],
                            "ownerReferences": [{"apiVersion": "pool.kubevirt.io/v1alpha1",
                                                 "kind": "VirtualMachinePool", "name": "pool", "uid": "u0",
                                                 "controller": true}],
                            "annotations": {"kubectl.kubernetes.io/last-applied-configuration": "{}",
                                            "kubevirt.io/latest-observed-api-version": "v1",
                                            "wukong.io/agent-port": "7444"}},
               "spec": {"runStrategy": "Halted", "template": {"metadata": {"labels": {"a": "b"}},
                        "spec": {"volumes": volumes, "domain": {"cpu": {"cores": 2}, "devices": {}}}}}})
    }

    #[test]
    fn a_cached_vm_keeps_only_what_a_pass_reads() {
        let cache = crate::fixtures::kubevirt_cache(vec![db_vm(true)], Vec::new());
        let vm = cache.vms.state().pop().unwrap();
        let owner = k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference {
            kind: "VirtualMachinePool".into(),
            name: "pool".into(),
            ..Default::default()
        };
        let expected = ObjectMeta {
            name: Some("db-vm".into()),
            namespace: Some("ns1".into()),
            uid: Some("u1".into()),
            resource_version: Some("5".into()),
            owner_references: Some(vec![owner]),
            annotations: Some([("wukong.io/agent-port".to_string(), "7444".to_string())].into()),
            ..ObjectMeta::default()
        };
        assert_eq!(vm.metadata, expected, "only what the watch needs and a pass reads");
        let (vm, vmi) = cache.vm_and_vmi("ns1", "db-vm").expect("cached");
        assert!(vmi.is_none(), "listed, and no VMI: stopped");
        let volumes: Vec<&str> =
            vm.spec.template.as_ref().unwrap().spec.volumes.iter().map(|v| v.name.as_str()).collect();
        assert_eq!(volumes, ["root", "data"]);
        assert!(cache.vm_and_vmi("ns1", "other").is_none(), "a VM not cached is read from the API server");
    }

    /// `Wukong` ns1/web, whose disk `moved` is to be db's disk `data` (`moveFrom`), and its VM.
    fn web_asking_for_data() -> (Wukong, Value) {
        let web = serde_json::from_value(json!({
            "apiVersion": "vm.novasphere.dev/v1alpha1", "kind": "Wukong",
            "metadata": {"name": "web", "namespace": "ns1", "uid": "7d2b9c1e-0000-4000-8000-000000000002"},
            "spec": {"disks": [{"name": "moved", "moveFrom": {"wukong": "db", "disk": "data"}}]},
        }))
        .unwrap();
        let vm = json!({"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachine",
                        "metadata": {"name": "web-vm", "namespace": "ns1"}, "spec": {}});
        (web, vm)
    }

    #[tokio::test]
    async fn a_disk_another_object_asks_for_is_handed_over_and_never_deleted() {
        // `data` left db's list with options that delete its claim, and its stopped VM no longer has it.
        let mut db = wukong(json!([{"name": "root", "system": true}]));
        db.status = Some(WukongStatus {
            volumes: vec![VolumeStatus {
                name: "data".into(),
                pvc_name: "db-vm-data".into(),
                bound: true,
                serial: "data".into(),
                ..Default::default()
            }],
            ..Default::default()
        });
        let mut claim = crate::fixtures::claim("db-vm-data", "db", "Bound");
        claim.metadata.labels.get_or_insert_default().insert(DISK_LABEL.into(), "data".into());
        let (web, web_vm) = web_asking_for_data();
        let respond = |s: &crate::fixtures::Seen| {
            s.path.ends_with("/virtualmachineinstances/db-vm").then(|| not_found("virtualmachineinstances.kubevirt.io"))
        };
        let context = |api: &MockApi, vms: Vec<Value>| {
            let cache = crate::fixtures::kubevirt_cache(vms, Vec::new());
            crate::fixtures::context_with_objects(
                api.client(),
                vec![claim.clone()],
                cache,
                vec![db.clone(), web.clone()],
            )
        };

        // web's VM does not exist: nothing is handed over, nothing deleted whatever the options say, and the disk
        // is remembered for the pass that can hand it over.
        let api = MockApi::start(respond);
        apply(&db, &context(&api, vec![db_vm(false)])).await.unwrap();
        let seen = api.seen();
        assert!(seen.iter().all(|s| s.method != Method::DELETE && !s.path.ends_with("/db-vm-data")), "{seen:#?}");
        let status = &seen.last().unwrap().body["status"];
        assert_eq!(status["history"], json!([]));
        let data = &status["volumes"][1];
        assert_eq!(data["phase"], "Detached", "{status}");
        assert_eq!(
            data["message"],
            "detached; Wukong web asks for it, but its VirtualMachine web-vm does not exist: not moved, and its claim \
             is kept"
        );

        // It does: the claim becomes web's (owner and labels), in a history line that says where it went.
        let api = MockApi::start(respond);
        apply(&db, &context(&api, vec![db_vm(false), web_vm])).await.unwrap();
        let seen = api.seen();
        assert!(seen.iter().all(|s| s.method != Method::DELETE), "{seen:#?}");
        let patch = seen.iter().find(|s| s.path.ends_with("/persistentvolumeclaims/db-vm-data")).expect("handed over");
        assert_eq!(patch.method, Method::PATCH);
        let meta = &patch.body["metadata"];
        assert_eq!(
            (meta["ownerReferences"][0]["name"].clone(), meta["ownerReferences"][0]["kind"].clone()),
            (json!("web"), json!("Wukong"))
        );
        assert_eq!(
            (meta["labels"][OWNER_LABEL].clone(), meta["labels"][DISK_LABEL].clone()),
            (json!("web"), json!("moved"))
        );
        let status = &seen.last().unwrap().body["status"];
        let volumes: Vec<&Value> = status["volumes"].as_array().unwrap().iter().collect();
        assert!(volumes.iter().all(|v| v["name"] != "data"), "forgotten: {status}");
        let record = &status["history"][0];
        assert_eq!(
            (record["outcome"].clone(), record["movedTo"].clone()),
            (json!("Moved"), json!({"wukong": "web", "disk": "moved"}))
        );

        // The operator stopped between the hand-over and its status write: the next pass finds the claim web's, and
        // records the move without touching the claim again.
        let mut handed = claim.clone();
        handed.metadata.labels.get_or_insert_default().insert(OWNER_LABEL.into(), "web".into());
        let api = MockApi::start(respond);
        let cache = crate::fixtures::kubevirt_cache(vec![db_vm(false), web_asking_for_data().1], Vec::new());
        let objects = vec![db.clone(), web.clone()];
        apply(&db, &crate::fixtures::context_with_objects(api.client(), vec![handed], cache, objects)).await.unwrap();
        let seen = api.seen();
        let writes: Vec<&str> = seen.iter().filter(|s| s.method != Method::GET).map(|s| s.path.as_str()).collect();
        assert!(writes.iter().all(|w| !w.contains("persistentvolumeclaims")), "{writes:?}");
        let status = &seen.last().unwrap().body["status"];
        assert_eq!(status["history"][0]["outcome"], "Moved", "{status}");
    }

    #[tokio::test]
    async fn a_pass_plans_from_the_watch_cache_and_reads_the_vm_again_before_taking_a_disk_out() {
        let requests = |seen: &[crate::fixtures::Seen]| -> Vec<String> {
            seen.iter().map(|s| format!("{} {}", s.method, s.path)).collect()
        };
        let vm_get = "GET /apis/kubevirt.io/v1/namespaces/ns1/virtualmachines/db-vm".to_string();
        let bound = json!({"metadata": {"name": "db-vm-data", "namespace": "ns1",
                                        "labels": {"vm.novasphere.dev/wukong": "db"}},
                           "spec": {"accessModes": ["ReadWriteOnce"], "volumeMode": "Block", "storageClassName": "fast"},
                           "status": {"phase": "Bound"}});
        let claims: Vec<PersistentVolumeClaim> = serde_json::from_value(json!([bound])).unwrap();

        // The VM stopped in the cache, the disk's claim bound: added to the VM's spec without reading the VM.
        let listed = wukong(json!([{"name": "root", "system": true}, {"name": "data", "size": "1Gi"}]));
        let api = MockApi::start(|s| {
            s.path.ends_with("/virtualmachineinstances/db-vm").then(|| not_found("virtualmachineinstances.kubevirt.io"))
        });
        let cache = crate::fixtures::kubevirt_cache(vec![db_vm(false)], Vec::new());
        apply(&listed, &crate::fixtures::context_with_caches(api.client(), claims.clone(), cache)).await.unwrap();
        let seen = requests(&api.seen());
        assert!(!seen.contains(&vm_get), "{seen:?}");
        assert!(seen.iter().any(|r| r.ends_with("/virtualmachines/db-vm/addvolume")), "{seen:?}");

        // The cache behind the last pass's add: KubeVirt's conflict, and the VM read again has the volume.
        let live_vm = db_vm(true);
        let api = MockApi::start(move |s| match s.path.as_str() {
            p if p.ends_with("/virtualmachineinstances/db-vm") => {
                Some(not_found("virtualmachineinstances.kubevirt.io"))
            }
            p if p.ends_with("/virtualmachines/db-vm") => Some((200, live_vm.clone())),
            p if p.ends_with("/addvolume") => Some((
                409,
                json!({"kind": "Status", "status": "Failure", "code": 409,
                "message": "Unable to add volume [data] because volume with that name already exists"}),
            )),
            _ => None,
        });
        let cache = crate::fixtures::kubevirt_cache(vec![db_vm(false)], Vec::new());
        apply(&listed, &crate::fixtures::context_with_caches(api.client(), claims.clone(), cache)).await.unwrap();
        let status = api.seen().last().unwrap().body["status"].clone();
        assert_eq!(status["volumes"][1]["message"], "in the VM's spec; attached when the VM starts", "{status}");

        // Unlisted while the cache still says stopped, and the VM runs: read again, it is a safe detach of a running
        // VM, not a removal from a stopped VM's spec.
        let unlisted = wukong(json!([{"name": "root", "system": true}]));
        let running = json!({"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachineInstance",
                             "metadata": {"name": "db-vm", "namespace": "ns1"},
                             "spec": {"volumes": [{"name": "data", "persistentVolumeClaim":
                                                   {"claimName": "db-vm-data", "hotpluggable": true}}]},
                             "status": {"volumeStatus": [{"name": "data", "phase": "Ready", "target": "sda"}]}});
        let live_vm = db_vm(true);
        let api = MockApi::start(move |s| match s.path.as_str() {
            p if p.ends_with("/virtualmachines/db-vm") => Some((200, live_vm.clone())),
            p if p.ends_with("/virtualmachineinstances/db-vm") => Some((200, running.clone())),
            _ => None,
        });
        let cache = crate::fixtures::kubevirt_cache(vec![db_vm(true)], Vec::new());
        apply(&unlisted, &crate::fixtures::context_with_caches(api.client(), claims, cache)).await.unwrap();
        let seen = requests(&api.seen());
        assert!(seen.contains(&vm_get), "read again before taking the disk out: {seen:?}");
        assert!(!seen.iter().any(|r| r.ends_with("/removevolume")), "nothing removed: {seen:?}");
        let status = api.seen().last().unwrap().body["status"].clone();
        assert_eq!(status["volumes"][1]["phase"], "DetachBlocked", "the guest is asked first: {status}");
    }

    #[tokio::test]
    async fn a_disk_with_a_source_gets_a_data_volume_with_the_profiles_modes() {
        let object = wukong(json!([{"name": "data", "size": "2Gi", "source": {"blank": {}}}]));
        let profile = json!([{"accessModes": ["ReadWriteMany"], "volumeMode": "Block"}]);
        let seen = pass(&object, json!([]), "Immediate", profile, true).await;
        assert_eq!(
            writes(&seen),
            [
                "PATCH /apis/cdi.kubevirt.io/v1beta1/namespaces/ns1/datavolumes/db-vm-data",
                "POST /apis/events.k8s.io/v1/namespaces/ns1/events",
                "PATCH /apis/vm.novasphere.dev/v1alpha1/namespaces/ns1/wukongs/db/status",
            ],
            "a DataVolume and no bare claim"
        );
        let dv = &seen.iter().find(|s| s.path.ends_with("/datavolumes/db-vm-data")).unwrap().body;
        assert_eq!(dv["metadata"]["labels"]["vm.novasphere.dev/wukong"], "db");
        assert_eq!(dv["metadata"]["ownerReferences"][0]["kind"], "Wukong");
        assert_eq!(
            dv["spec"],
            json!({"source": {"blank": {}}, "storage": {"accessModes": ["ReadWriteMany"], "volumeMode": "Block",
                   "resources": {"requests": {"storage": "2Gi"}}}})
        );
        let data = &seen.last().unwrap().body["status"]["volumes"][0];
        assert_eq!(data["system"], false, "a list of data disks has no system disk");
        assert_eq!(data["dataVolume"]["name"], "db-vm-data");
    }

    #[tokio::test]
    async fn bad_storage_is_named_and_nothing_is_created() {
        let cases = [
            (
                json!({"name": "data", "size": "1Gi", "source": {"blank": {}}}),
                json!([]),
                false,
                "spec.disks[0].source: CDI is not installed in this cluster",
            ),
            (
                json!({"name": "data", "source": {"pvc": {"name": "golden"}}}),
                json!([]),
                true,
                "spec.disks[0].source.pvc: claim ns1/golden does not exist; name an existing claim to clone",
            ),
            (
                json!({"name": "data", "size": "1Gi", "volumeMode": "Block"}),
                json!([{"accessModes": ["ReadWriteOnce"], "volumeMode": "Filesystem"}]),
                true,
                "spec.disks[0].volumeMode: StorageClass 'fast' cannot provide Block volumes",
            ),
        ];
        for (disk, profile, cdi, message) in cases {
            let object = wukong(json!([disk]));
            let seen = pass(&object, json!([]), "Immediate", profile, cdi).await;
            assert!(spec_error(&seen).starts_with(message), "{} does not start with {message}", spec_error(&seen));
            let created: Vec<String> =
                writes(&seen).into_iter().filter(|w| !w.contains("/events") && !w.ends_with("/status")).collect();
            assert!(created.is_empty(), "nothing is created: {created:?}");
        }
    }

    #[tokio::test]
    async fn a_settled_object_gets_no_writes_even_from_a_stale_cache() {
        let object = wukong(json!([{"name": "root", "system": true}, {"name": "data", "size": "1Gi"}]));
        let vm = json!({"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachine", "metadata": {"name": "db-vm"},
                        "spec": {"template": {"spec": {"volumes": [{"name": "root", "containerDisk": {"image": "x"}},
                                 {"name": "data", "persistentVolumeClaim": {"claimName": "db-vm-data", "hotpluggable": true}}]}}}});
        let claim = crate::fixtures::claim("db-vm-data", "db", "Bound");
        let api = MockApi::start(move |s| match s.path.as_str() {
            p if p.ends_with("/virtualmachines/db-vm") => Some((200, vm.clone())),
            p if p.ends_with("/virtualmachineinstances/db-vm") => {
                Some(not_found("virtualmachineinstances.kubevirt.io"))
            }
            _ => None,
        });
        let context = context_with_claims(api.client(), vec![claim]);
        apply(&object, &context).await.unwrap();
        let first = api.seen().len();
        // The same object again, its status still unwritten in this (stale) copy: only reads.
        for _ in 0..3 {
            assert_eq!(apply(&object, &context).await.unwrap(), Action::requeue(RESYNC));
        }
        let again = api.seen();
        let writes: Vec<String> = again[first..]
            .iter()
            .filter(|s| s.method != Method::GET)
            .map(|s| format!("{} {}", s.method, s.path))
            .collect();
        assert!(writes.is_empty(), "a settled object gets no writes: {writes:?}");
        let reads: Vec<&str> = again[first..].iter().map(|s| s.path.as_str()).collect();
        assert!(
            reads.iter().all(|p| !p.contains("storageclasses") && !p.contains("datavolumes")),
            "every claim bound: neither classes nor DataVolumes are read: {reads:?}"
        );
        let status = &again.iter().rfind(|s| s.method == Method::PATCH).unwrap().body["status"];
        assert_eq!(status["volumes"][1]["phase"], "Pending");
        assert_eq!(status["volumes"][1]["message"], "in the VM's spec; attached when the VM starts");

        // The watch's copy catches up: it is the truth again, and the operator's own copy is let go.
        assert_eq!(context.written.len(), 1);
        let mut caught_up = object.clone();
        caught_up.status = Some(serde_json::from_value(status.clone()).unwrap());
        context.written.seen(&watcher::Event::Apply(caught_up.clone()));
        assert!(context.written.is_empty(), "not held twice");
        let before = api.seen().len();
        apply(&caught_up, &context).await.unwrap();
        assert!(api.seen()[before..].iter().all(|s| s.method == Method::GET), "nothing to write");
    }

    /// `kubectl delete --cascade=orphan`: the garbage collector may take our owner reference off the claims and
    /// remove the `orphan` finalizer before the operator looks. A claim we no longer own is kept (labelled
    /// preserved), even one the VM still uses; a claim we own and the VM uses still holds the deletion.
    #[tokio::test]
    async fn a_deleted_object_keeps_the_claims_the_garbage_collector_orphaned() {
        let mut object = wukong(json!([{"name": "root", "system": true}, {"name": "data", "size": "1Gi"}]));
        object.metadata.deletion_timestamp =
            Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time("2026-12-05T04:16:40Z".parse().unwrap()));
        let volume = |name: &str| {
            json!({"name": name, "pvcName": format!("db-vm-{name}"), "bound": true, "size": "1Gi",
            "phase": "Attached", "serial": name, "bus": "scsi"})
        };
        object.status = Some(serde_json::from_value(json!({"volumes": [volume("data"), volume("logs")]})).unwrap());
        let vm = json!({"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachine", "metadata": {"name": "db-vm"},
                        "spec": {"template": {"spec": {"volumes": [
                                 {"name": "data", "persistentVolumeClaim": {"claimName": "db-vm-data", "hotpluggable": true}},
                                 {"name": "logs", "persistentVolumeClaim": {"claimName": "db-vm-logs", "hotpluggable": true}}]}}}});
        let owner = json!([{"apiVersion": "vm.novasphere.dev/v1alpha1", "kind": "Wukong", "name": "db",
                            "uid": object.metadata.uid.clone().unwrap()}]);
        let claim = |name: &str, owners: serde_json::Value| {
            json!({"apiVersion": "v1", "kind": "PersistentVolumeClaim",
            "metadata": {"name": name, "ownerReferences": owners}})
        };
        let claims = json!({"apiVersion": "v1", "kind": "List", "metadata": {},
            "items": [claim("db-vm-data", json!([])), claim("db-vm-logs", owner)]});
        let api = MockApi::start(move |s| match s.path.as_str() {
            p if p.ends_with("/virtualmachines/db-vm") => Some((200, vm.clone())),
            p if p.ends_with("/virtualmachineinstances/db-vm") => {
                Some(not_found("virtualmachineinstances.kubevirt.io"))
            }
            p if p.ends_with("/persistentvolumeclaims") => Some((200, claims.clone())),
            p if p.contains("/persistentvolumeclaims/") => Some((200, claim("x", json!([])))),
            _ => None,
        });
        let error = cleanup(&object, &context(api.client())).await.unwrap_err().to_string();
        assert!(error.contains("db-vm-logs") && !error.contains("db-vm-data"), "{error}");
        let writes: Vec<(Method, String)> =
            api.seen().into_iter().filter(|s| s.method != Method::GET).map(|s| (s.method, s.path)).collect();
        assert_eq!(writes, [(Method::PATCH, "/api/v1/namespaces/ns1/persistentvolumeclaims/db-vm-data".to_string())]);
    }

    #[tokio::test]
    async fn a_deleted_object_hands_a_disk_another_asks_for_over_instead_of_deleting_it() {
        let mut object = wukong(json!([{"name": "data", "size": "1Gi"}]));
        object.metadata.deletion_timestamp =
            Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time("2026-12-05T04:16:40Z".parse().unwrap()));
        object.status = Some(
            serde_json::from_value(json!({"volumes": [{"name": "data", "pvcName": "db-vm-data", "bound": true,
                "phase": "Attached", "serial": "data", "bus": "scsi"}]}))
            .unwrap(),
        );
        let owner = json!([{"apiVersion": "vm.novasphere.dev/v1alpha1", "kind": "Wukong", "name": "db",
                            "uid": object.metadata.uid.clone().unwrap()}]);
        let claims = json!({"apiVersion": "v1", "kind": "List", "metadata": {}, "items": [
            {"metadata": {"name": "db-vm-data", "ownerReferences": owner,
                          "labels": {OWNER_LABEL: "db", DISK_LABEL: "data"}}}]});
        // The VM no longer has the disk (no VMI, none in its spec).
        let vm = json!({"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachine", "metadata": {"name": "db-vm"},
                        "spec": {"template": {"spec": {"volumes": []}}}});
        let api = MockApi::start(move |s| match s.path.as_str() {
            p if p.ends_with("/virtualmachines/db-vm") => Some((200, vm.clone())),
            p if p.ends_with("/virtualmachineinstances/db-vm") => {
                Some(not_found("virtualmachineinstances.kubevirt.io"))
            }
            p if p.ends_with("/persistentvolumeclaims") => Some((200, claims.clone())),
            _ => None,
        });
        let (web, web_vm) = web_asking_for_data();
        let cache = crate::fixtures::kubevirt_cache(vec![web_vm], Vec::new());
        let context = crate::fixtures::context_with_objects(api.client(), Vec::new(), cache, vec![web]);
        cleanup(&object, &context).await.unwrap();
        let seen = api.seen();
        let writes: Vec<&crate::fixtures::Seen> = seen.iter().filter(|s| s.method != Method::GET).collect();
        assert_eq!(writes.len(), 1, "one hand-over, no delete: {writes:#?}");
        assert!(writes[0].path.ends_with("/persistentvolumeclaims/db-vm-data"));
        assert_eq!(writes[0].body["metadata"]["ownerReferences"][0]["name"], "web");
        assert_eq!(writes[0].body["metadata"]["labels"][DISK_LABEL], "moved");
    }
}
