//! Closing the guard's loop. The guard releases a disk before an update that unplugs it is stored; that update may
//! still fail (another webhook, a conflict), or KubeVirt may never unplug. The guest's disk is then released but
//! still plugged and still in the spec. The leader looks periodically at every guarded VM (and standalone VMI) and
//! at every release the guard recorded ([`crate::ledger`], whether or not its object is still opted in), and gives
//! such a disk back (`CancelDetach`) once it has stayed released for a grace period, with an Event. A record whose
//! update was stored and whose disk KubeVirt is unplugging, or whose disk the guest has again, is forgotten. A stored
//! update KubeVirt does not carry out (a VM whose `updateVolumesStrategy` is `Migration` keeps its disks until it
//! restarts) is given back like one never stored.
//!
//! With `--watch-namespace` only that namespace is looked at: its objects are listed there, and the namespace itself
//! is read (a namespaced install may not list namespaces).
//!
//! One object that cannot be looked at (its guest unreachable, a read failing) is counted and skipped; the others
//! are still looked at. Clients of the agents are kept between passes, renewed every [`RECONNECT`] so that a
//! rotated client certificate is used.

use crate::crd::{Phase, Wukong};
use crate::guard::{GUARD_LABEL, guarded};
use crate::ledger::{Ledger, Release};
use crate::metrics::Metrics;
use crate::{AgentAccess, Result, typed};
use k8s_openapi::api::core::v1::{Namespace, ObjectReference};
use kube::api::{Api, ApiResource, DynamicObject, ListParams};
use kube::runtime::events::{Event, EventType};
use kube::{Resource, ResourceExt};
use serde_json::Value;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};
use wukong_controller_client::agent_client::{AgentAddress, AgentClient};
use wukong_controller_client::hypervisor::VolumeState;
use wukong_controller_client::kubevirt::{
    VirtualMachine, VirtualMachineInstance, resource, vm_resource, vmi_resource, volume_state_in,
};
use wukong_proto::v1::DiskState;

/// How often guarded VMs are looked at (at most; a shorter grace period looks more often).
const INTERVAL: Duration = Duration::from_secs(15);
/// How long a client of an agent is kept before a new one is made (and the TLS files read again).
const RECONNECT: Duration = Duration::from_secs(600);

/// Objects (and namespaces) labelled as opted in.
fn enabled() -> ListParams {
    ListParams::default().labels(&format!("{GUARD_LABEL}=enabled"))
}

/// A released disk of a guest: (namespace, VMI, serial).
type Released = (String, String, String);

/// An object whose guest is looked at: a guarded VM or standalone VMI, or the object of a recorded release.
struct Target {
    reference: ObjectReference,
    /// The object as stored: its spec (a VM's template spec) is the truth about which volumes stay.
    object: DynamicObject,
    vmi: String,
    releases: Vec<Release>,
    /// Opted in: every released disk of its guest is looked at, not only the recorded ones.
    guarded: bool,
}

impl Target {
    fn new(object: DynamicObject, kind: &str) -> Self {
        let r = if kind == "VirtualMachine" { vm_resource() } else { vmi_resource() };
        Self { reference: object.object_ref(&r), vmi: object.name_any(), object, releases: Vec::new(), guarded: true }
    }

    fn is_vm(&self) -> bool {
        self.reference.kind.as_deref() == Some("VirtualMachine")
    }

    fn spec(&self) -> &Value {
        crate::guard::spec_of(&self.object, self.reference.kind.as_deref().unwrap_or_default())
    }

    fn label(&self) -> String {
        format!("{} {}/{}", self.reference.kind.clone().unwrap_or_default(), self.namespace(), self.vmi)
    }

    fn namespace(&self) -> String {
        self.reference.namespace.clone().unwrap_or_default()
    }
}

/// The loop-closer's state between passes.
pub struct Watch {
    client: kube::Client,
    access: AgentAccess,
    /// The one namespace looked at; `None`: all.
    namespace: Option<String>,
    ledger: Ledger,
    events: crate::events::Events,
    metrics: Arc<Metrics>,
    /// When each released disk was first seen released, on this clock: the guest's own clock may be off.
    seen: HashMap<Released, Instant>,
    /// Clients of the agents by route (the address, whatever transport it names), with when they were made.
    clients: HashMap<AgentAddress, (AgentClient, Instant)>,
}

impl Watch {
    pub fn new(
        client: kube::Client,
        access: AgentAccess,
        namespace: Option<String>,
        ledger_namespace: &str,
        identity: &str,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            namespace,
            events: crate::guard_events(&client, identity),
            ledger: Ledger::new(client.clone(), ledger_namespace),
            client,
            access,
            metrics,
            seen: HashMap::new(),
            clients: HashMap::new(),
        }
    }

    /// Looks every [`INTERVAL`] (or grace period, if shorter) until the task is dropped.
    pub async fn run(mut self, grace: Duration) {
        loop {
            self.pass(grace).await;
            tokio::time::sleep(INTERVAL.min(grace)).await;
        }
    }

    /// The namespaces that opted in: every one labelled, or the watched one if it is.
    async fn opted_in(&self) -> Result<Vec<Namespace>> {
        let namespaces = Api::<Namespace>::all(self.client.clone());
        Ok(match &self.namespace {
            None => namespaces.list(&enabled()).await?.items,
            Some(ns) => namespaces
                .get_opt(ns)
                .await?
                .into_iter()
                .filter(|n| n.labels().get(GUARD_LABEL).is_some_and(|v| v == "enabled"))
                .collect(),
        })
    }

    /// The guarded objects of one kind: labelled ones, and the unlabelled ones of the namespaces that opted in.
    async fn guarded(&self, kind: &str, plural: &str, opted_in: &[Namespace]) -> Result<Vec<DynamicObject>> {
        let r = resource(kind, plural);
        let labelled = match &self.namespace {
            Some(ns) => Api::<DynamicObject>::namespaced_with(self.client.clone(), ns, &r),
            None => Api::<DynamicObject>::all_with(self.client.clone(), &r),
        };
        let mut objects = labelled.list(&enabled()).await?.items;
        for ns in opted_in {
            let api = Api::<DynamicObject>::namespaced_with(self.client.clone(), &ns.name_any(), &r);
            let namespace_labels = ns.labels().clone();
            objects.extend(api.list(&ListParams::default()).await?.items.into_iter().filter(|o| {
                o.labels().get(GUARD_LABEL).is_none_or(|v| v != "enabled") && guarded(o.labels(), &namespace_labels)
            }));
        }
        Ok(objects)
    }

    /// Every object to look at, with the releases recorded for it.
    async fn targets(&self) -> Result<(Vec<Target>, usize)> {
        let mut targets: BTreeMap<(String, String, String), Target> = BTreeMap::new();
        let key = |t: &Target| (t.namespace(), t.reference.kind.clone().unwrap_or_default(), t.vmi.clone());
        let opted_in = self.opted_in().await?;
        for vm in self.guarded("VirtualMachine", "virtualmachines", &opted_in).await? {
            let target = Target::new(vm, "VirtualMachine");
            targets.insert(key(&target), target);
        }
        for vmi in self.guarded("VirtualMachineInstance", "virtualmachineinstances", &opted_in).await? {
            // A VM's VMI is looked at through its VM, whose spec is the truth.
            if !vmi.owner_references().iter().any(|o| o.kind == "VirtualMachine") {
                let target = Target::new(vmi, "VirtualMachineInstance");
                targets.insert(key(&target), target);
            }
        }
        let releases = self.ledger.releases().await.map_err(Box::new)?;
        let pending = releases.len();
        for release in releases {
            let id = (release.namespace.clone(), release.kind.clone(), release.name.clone());
            if let Some(target) = targets.get_mut(&id) {
                target.releases.push(release);
                continue;
            }
            let r: ApiResource = if release.kind == "VirtualMachine" { vm_resource() } else { vmi_resource() };
            let api = Api::<DynamicObject>::namespaced_with(self.client.clone(), &release.namespace, &r);
            match api.get_opt(&release.name).await? {
                Some(object) => {
                    let mut target = Target { guarded: false, ..Target::new(object, &release.kind) };
                    target.releases.push(release);
                    targets.insert(id, target);
                }
                // Gone: nothing of it is plugged any more.
                None => self.forget(&release).await,
            }
        }
        Ok((targets.into_values().collect(), pending))
    }

    async fn pass(&mut self, grace: Duration) {
        let (targets, pending) = match self.targets().await {
            Ok(found) => found,
            Err(e) => {
                tracing::warn!(error = %e, "cannot list what the guard's loop-closer looks at; trying again");
                self.metrics.release_watch_pass(false, 0);
                return;
            }
        };
        tracing::debug!(targets = targets.len(), pending, "looking for released disks still in a spec");
        let mut still = HashMap::new();
        let mut forgotten = 0;
        for target in targets {
            match self.look_at(&target, grace, &mut still).await {
                Ok(n) => forgotten += n,
                Err(reason) => self.metrics.release_watch_error(reason),
            }
        }
        self.seen = still;
        self.metrics.release_watch_pass(true, pending.saturating_sub(forgotten));
    }

    /// A client of the agent at `address`, kept between passes.
    fn client_for(&mut self, address: &AgentAddress) -> Option<AgentClient> {
        if let Some((client, made)) = self.clients.get(address)
            && made.elapsed() < RECONNECT
        {
            return Some(client.clone());
        }
        match self.access.connect_to(&self.client, address.clone()) {
            Ok(client) => {
                self.clients.insert(address.clone(), (client.clone(), Instant::now()));
                Some(client)
            }
            Err(e) => {
                tracing::warn!(agent = %address.place(), error = %e, "cannot make a client of the agent");
                None
            }
        }
    }

    /// Whether a `Wukong`'s detach of `volume` of VM `vm` holds the disk released while it takes the snapshot
    /// asked for (`detachOptions.snapshot`, which may take longer than the grace period): the operator's own release,
    /// which it unplugs or gives back itself. Asked only of a disk about to be given back; a failed read says no.
    async fn snapshot_under_way(&self, ns: &str, vm: &str, volume: &str) -> bool {
        let wukongs = match Api::<Wukong>::namespaced(self.client.clone(), ns).list(&ListParams::default()).await {
            Ok(list) => list.items,
            Err(e) => {
                tracing::warn!(%ns, error = %e, "cannot list the Wukongs to tell a snapshot's release");
                return false;
            }
        };
        wukongs.iter().filter(|w| w.is_for_vm(vm) && !w.spec.disks.iter().any(|d| d.name == volume)).any(|w| {
            w.status.as_ref().is_some_and(|s| {
                s.volumes
                    .iter()
                    .any(|v| v.name == volume && v.phase == Phase::Detaching && v.detach_options.snapshot.is_some())
            })
        })
    }

    async fn forget(&self, release: &Release) {
        if let Err(e) = self.ledger.forget(release).await {
            tracing::warn!(error = %e, "cannot forget a finished release; the next pass tries again");
        }
    }

    /// Looks at one object's guest; returns how many recorded releases it forgot, or why it could not look.
    async fn look_at(
        &mut self,
        target: &Target,
        grace: Duration,
        still: &mut HashMap<Released, Instant>,
    ) -> Result<usize, &'static str> {
        let (ns, name) = (target.namespace(), target.vmi.clone());
        let vmi = match crate::get::<VirtualMachineInstance>(&self.client, &ns, &vmi_resource(), &name).await {
            Ok(vmi) => vmi,
            Err(e) => {
                tracing::warn!(object = %target.label(), error = %e, "cannot read the VMI");
                return Err("read");
            }
        };
        let Some(vmi) = vmi else {
            // Not running: nothing is plugged, and nothing recorded for it can be given back.
            for release in &target.releases {
                self.forget(release).await;
            }
            return Ok(target.releases.len());
        };
        let spec = target.spec();
        let in_spec =
            |volume: &str| spec["volumes"].as_array().and_then(|l| l.iter().find(|v| v["name"] == volume).cloned());
        let vm: Option<VirtualMachine> = match target.is_vm() {
            true => typed(&target.object).ok(),
            false => None,
        };
        // Plugged and staying: ready in the VMI, and not leaving it (a VM's template that KubeVirt follows lost it).
        let staying = |volume: &str| matches!(volume_state_in(&vmi, vm.as_ref(), volume), VolumeState::Ready { .. });
        let mut forgotten = 0;
        let mut open = Vec::new();
        for release in &target.releases {
            if in_spec(&release.volume).as_ref() != Some(&release.definition) && !staying(&release.volume) {
                // The update was stored and KubeVirt is unplugging: that is KubeVirt's now. (Stored but staying: a
                // VM whose updateVolumesStrategy is Migration keeps the disk plugged until it restarts.)
                self.forget(release).await;
                forgotten += 1;
            } else {
                open.push(release);
            }
        }
        let address = match self.access.address(vm.as_ref(), &vmi) {
            Ok(address) => address,
            // No IP or CID yet: nothing can be asked, and nothing released can be seen.
            Err(e) if e.is_pending() => return Ok(forgotten),
            Err(e) => {
                tracing::warn!(object = %target.label(), error = %e, "cannot reach the guest's agent");
                return Err("agent");
            }
        };
        let Some(agent) = self.client_for(&address) else { return Err("agent") };
        let disks = match agent.list_disks(false).await {
            Ok(disks) => disks,
            Err(e) => {
                tracing::debug!(%ns, %name, error = %e, "cannot list the guest's disks");
                self.clients.remove(&address);
                return Err("agent");
            }
        };
        let released = |serial: &str| {
            disks.iter().any(|d| d.state() == DiskState::Released && d.serial.eq_ignore_ascii_case(serial))
        };
        for release in open.iter().filter(|r| !released(&r.serial)) {
            // The guest has the disk again (or no longer has it at all): nothing to give back.
            self.forget(release).await;
            forgotten += 1;
        }
        for disk in disks.iter().filter(|d| d.state() == DiskState::Released) {
            let key = (ns.clone(), name.clone(), disk.serial.clone());
            let recorded = open.iter().any(|r| r.serial.eq_ignore_ascii_case(&disk.serial));
            if !target.guarded && !recorded {
                // Not the guard's release, on an object that did not opt in: someone else's business.
                continue;
            }
            let since = self.seen.get(&key).copied().unwrap_or_else(Instant::now);
            still.insert(key, since);
            let released_for = since.elapsed();
            // The VMI's volume whose disk this is: plugged, and staying.
            let serial_of = |v: &str| {
                let entry = vmi.spec.domain.devices.disks.iter().find(|d| d.name == v);
                entry.and_then(|d| d.serial.clone()).unwrap_or_else(|| v.to_string())
            };
            let Some(volume) = vmi.spec.volumes.iter().find(|v| serial_of(&v.name).eq_ignore_ascii_case(&disk.serial))
            else {
                continue;
            };
            let plugged = staying(&volume.name);
            tracing::debug!(%ns, %name, serial = %disk.serial, plugged, ?released_for, "a released disk still plugged");
            if !plugged || released_for < grace {
                continue;
            }
            if self.snapshot_under_way(&ns, &name, &volume.name).await {
                tracing::debug!(%ns, %name, serial = %disk.serial, "released for a Wukong's snapshot before its detach");
                continue;
            }
            if let Err(e) = agent.cancel_detach(&disk.serial).await {
                tracing::warn!(%ns, %name, serial = %disk.serial, error = %e, "cannot give a released disk back");
                continue;
            }
            self.metrics.release_given_back();
            for release in open.iter().filter(|r| r.serial.eq_ignore_ascii_case(&disk.serial)) {
                self.forget(release).await;
                forgotten += 1;
            }
            let note = format!(
                "disk '{}' (volume {}) stayed released {}s for an unplug that did not happen (the update was not \
                 stored, or KubeVirt did not unplug); the guest got it back (CancelDetach)",
                disk.serial,
                volume.name,
                released_for.as_secs()
            );
            tracing::info!(%ns, %name, "{note}");
            let event = Event {
                type_: EventType::Normal,
                reason: "ReleaseCancelled".into(),
                note: Some(note),
                action: "CancelDetach".into(),
                secondary: None,
            };
            if let Err(e) = self.events.publish(&event, &target.reference).await {
                tracing::warn!(error = %e, "cannot record the ReleaseCancelled Event");
            }
        }
        Ok(forgotten)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::Api as MockApi;
    use serde_json::json;

    /// What one pass reads, watching `namespace` (`None`: all); every namespace is opted in.
    async fn reads(namespace: Option<&str>) -> Vec<String> {
        let api = MockApi::start(|s| {
            let name = s.path.strip_prefix("/api/v1/namespaces/").filter(|n| !n.contains('/'))?;
            Some((
                200,
                json!({"apiVersion": "v1", "kind": "Namespace",
                              "metadata": {"name": name, "labels": {GUARD_LABEL: "enabled"}}}),
            ))
        });
        let access = AgentAccess::plaintext(7443);
        let metrics = Arc::new(Metrics::default());
        let watch = Watch::new(api.client(), access, namespace.map(Into::into), "wukong-system", "test", metrics);
        watch.targets().await.expect("a pass");
        api.seen().into_iter().map(|s| s.path).collect()
    }

    /// A disk released for a `Wukong`'s snapshot before its detach is the operator's to unplug or give back: it is
    /// not given back for an update that was not stored, whatever the grace period.
    #[tokio::test]
    async fn a_release_held_for_a_snapshot_is_not_given_back() {
        let wukong = |name: &str, listed: bool, phase: &str, snapshot: bool| {
            let options = if snapshot { json!({"snapshot": {}}) } else { json!({}) };
            let disks = if listed { json!([{"name": "data", "size": "1Gi"}]) } else { json!([]) };
            json!({"apiVersion": "vm.novasphere.dev/v1alpha1", "kind": "Wukong", "metadata": {"name": name},
                   "spec": {"vmName": "vm1", "disks": disks},
                   "status": {"volumes": [{"name": "data", "bound": true, "phase": phase, "serial": "data",
                                           "bus": "scsi", "detachOptions": options}]}})
        };
        let cases = [
            (wukong("w", false, "Detaching", true), true),
            (wukong("w", false, "Detaching", false), false),
            (wukong("w", false, "DetachBlocked", true), false),
            (wukong("w", true, "Detaching", true), false),
        ];
        for (object, held) in cases {
            let list = json!({"apiVersion": "vm.novasphere.dev/v1alpha1", "kind": "WukongList", "metadata": {},
                              "items": [object.clone()]});
            let api =
                MockApi::start(move |s| s.path.ends_with("/namespaces/prod/wukongs").then(|| (200, list.clone())));
            let metrics = Arc::new(Metrics::default());
            let watch = Watch::new(api.client(), AgentAccess::plaintext(7443), None, "wukong-system", "t", metrics);
            assert_eq!(watch.snapshot_under_way("prod", "vm1", "data").await, held, "{object}");
            assert!(!watch.snapshot_under_way("prod", "vm2", "data").await, "another VM's");
        }
    }

    /// A namespaced install lists nothing beyond its namespace and its own, and reads its namespace's labels.
    #[tokio::test]
    async fn watching_one_namespace_reads_only_that_namespace() {
        let paths = reads(Some("prod")).await;
        assert_eq!(
            paths,
            [
                "/api/v1/namespaces/prod",
                "/apis/kubevirt.io/v1/namespaces/prod/virtualmachines",
                "/apis/kubevirt.io/v1/namespaces/prod/virtualmachines",
                "/apis/kubevirt.io/v1/namespaces/prod/virtualmachineinstances",
                "/apis/kubevirt.io/v1/namespaces/prod/virtualmachineinstances",
                "/api/v1/namespaces/wukong-system/configmaps",
            ]
        );
        let everywhere = reads(None).await;
        assert_eq!(everywhere[..2], ["/api/v1/namespaces", "/apis/kubevirt.io/v1/virtualmachines"]);
    }
}
