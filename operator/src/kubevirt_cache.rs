//! The VMs and VMIs as the controller's watches hold them: typed to what a pass reads, and read by the passes
//! instead of a GET of each per pass (at thousands of objects those GETs were half the operator's requests).

use k8s_openapi::NamespaceResourceScope;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{self as meta, ObjectMeta};
use kube::api::ApiResource;
use kube::runtime::reflector::{ObjectRef, Store};
use serde::{Deserialize, Serialize};
use std::borrow::Cow;
use std::hash::{DefaultHasher, Hash};
use wukong_controller_client::kubevirt::{
    Metadata, OwnerReference, VirtualMachine, VirtualMachineInstance, VmSpec, VmStatus, VmiSpec, VmiStatus,
    vm_resource, vmi_resource,
};

/// The prefix of the only annotations a pass reads of a VM or VMI: those that choose how its agent is reached
/// (`wukong.io/agent-transport`, …). KubeVirt's own and kubectl's last-applied copy (often the largest part of an
/// object) are never read.
const READ_ANNOTATIONS: &str = "wukong.io/";

/// A KubeVirt object as cached: its metadata and the parts of its spec and status that the companion's typed views
/// read. Decoded straight from the watch (the rest of the object is never held): a `DynamicObject` cache took about
/// 10 KB per VM, these a few hundred bytes.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct Cached<Spec, Status> {
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: Spec,
    #[serde(default)]
    pub status: Status,
}

pub type CachedVm = Cached<VmSpec, VmStatus>;
pub type CachedVmi = Cached<VmiSpec, VmiStatus>;

/// Which KubeVirt kind a spec is of.
pub trait Kind {
    fn resource() -> ApiResource;
}

impl Kind for VmSpec {
    fn resource() -> ApiResource {
        vm_resource()
    }
}

impl Kind for VmiSpec {
    fn resource() -> ApiResource {
        vmi_resource()
    }
}

impl<Spec: Kind, Status> kube::Resource for Cached<Spec, Status> {
    type DynamicType = ();
    type Scope = NamespaceResourceScope;

    fn kind(_: &()) -> Cow<'_, str> {
        Spec::resource().kind.into()
    }
    fn group(_: &()) -> Cow<'_, str> {
        Spec::resource().group.into()
    }
    fn version(_: &()) -> Cow<'_, str> {
        Spec::resource().version.into()
    }
    fn plural(_: &()) -> Cow<'_, str> {
        Spec::resource().plural.into()
    }
    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }
    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

impl<Spec: Kind + Serialize, Status: Serialize> Cached<Spec, Status> {
    /// Keeps of the metadata only what the watch and the cache need (name, namespace, uid, resource version) and
    /// what a pass reads: the owners' kinds and names, and the annotations that choose how the agent is reached.
    pub fn trim(&mut self) {
        let meta = std::mem::take(&mut self.metadata);
        let owners = meta.owner_references.map(|owners| {
            owners
                .into_iter()
                .map(|o| meta::OwnerReference { kind: o.kind, name: o.name, ..Default::default() })
                .collect()
        });
        let annotations =
            meta.annotations.map(|all| all.into_iter().filter(|(key, _)| key.starts_with(READ_ANNOTATIONS)).collect());
        self.metadata = ObjectMeta {
            name: meta.name,
            namespace: meta.namespace,
            uid: meta.uid,
            resource_version: meta.resource_version,
            owner_references: owners,
            annotations,
            ..ObjectMeta::default()
        };
    }

    /// What of it a pass reads, for [`crate::wake::on_change`]: the typed spec and status, and the annotations and
    /// owners that choose how its agent is reached.
    pub fn read(&self, hasher: &mut DefaultHasher) {
        let parts = serde_json::to_string(&(&self.spec, &self.status)).unwrap_or_default();
        let owners = self.metadata.owner_references.iter().flatten().map(|o| (&o.kind, &o.name)).collect::<Vec<_>>();
        (parts, &self.metadata.annotations, owners).hash(hasher);
    }

    fn metadata(&self) -> Metadata {
        let meta = &self.metadata;
        Metadata {
            name: meta.name.clone().unwrap_or_default(),
            namespace: meta.namespace.clone().unwrap_or_default(),
            owner_references: (meta.owner_references.iter().flatten())
                .map(|o| OwnerReference { kind: o.kind.clone(), name: o.name.clone() })
                .collect(),
            annotations: meta.annotations.clone().unwrap_or_default(),
        }
    }
}

/// The watch caches of VMs and VMIs.
#[derive(Clone)]
pub struct KubeVirtCache {
    pub vms: Store<CachedVm>,
    pub vmis: Store<CachedVmi>,
}

impl KubeVirtCache {
    /// VM `ns/name` and its VMI as the caches hold them; `None` while either cache has not listed yet, or when the
    /// VM is not in it (it may be new: the caller reads it from the API server).
    pub fn vm_and_vmi(&self, ns: &str, name: &str) -> Option<(VirtualMachine, Option<VirtualMachineInstance>)> {
        // A store that has not listed yet would say every VMI is gone: every VM stopped.
        if !ready(&self.vmis) {
            return None;
        }
        let vm = self.vms.get(&ObjectRef::new(name).within(ns))?;
        let vm = VirtualMachine { metadata: vm.metadata(), spec: vm.spec.clone(), status: vm.status.clone() };
        let vmi = self.vmis.get(&ObjectRef::new(name).within(ns)).map(|vmi| VirtualMachineInstance {
            metadata: vmi.metadata(),
            spec: vmi.spec.clone(),
            status: vmi.status.clone(),
        });
        Some((vm, vmi))
    }
}

/// Whether `store` has listed once.
fn ready<K: kube::Resource + Clone + 'static>(store: &Store<K>) -> bool
where
    K::DynamicType: Eq + Hash + Clone,
{
    futures::FutureExt::now_or_never(store.wait_until_ready()).is_some_and(|r| r.is_ok())
}
