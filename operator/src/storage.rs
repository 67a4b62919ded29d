//! The cluster's storage as the operator needs it: StorageClasses (which is the default, which binding mode each
//! has), CDI's StorageProfiles (the access and volume modes a class offers), and the claim or DataVolume a disk gets.

use crate::Result;
use crate::access::ClusterReads;
use crate::crd::{AccessMode, BlankSource, DiskSource, DiskSpec, VolumeMode};
use crate::reconcile::{DISK_LABEL, OWNER_LABEL};
use k8s_openapi::NamespaceResourceScope;
use k8s_openapi::api::core::v1::PersistentVolumeClaim;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::ResourceExt;
use kube::api::{ApiResource, DynamicObject};
use kube::runtime::reflector::{ObjectRef, Store};
use serde::Deserialize;
use serde_json::{Value, json};
use std::borrow::Cow;
use std::collections::BTreeMap;
use std::time::Duration;

/// The annotation that makes a StorageClass the cluster's default.
const DEFAULT_CLASS: &str = "storageclass.kubernetes.io/is-default-class";
/// The binding mode of a class whose claims bind only once a Pod uses them.
pub const WAIT_FOR_FIRST_CONSUMER: &str = "WaitForFirstConsumer";

/// CDI's `DataVolume` (`cdi.kubevirt.io/v1beta1`).
pub fn data_volume_resource() -> ApiResource {
    ApiResource {
        group: "cdi.kubevirt.io".into(),
        version: "v1beta1".into(),
        api_version: "cdi.kubevirt.io/v1beta1".into(),
        kind: "DataVolume".into(),
        plural: "datavolumes".into(),
    }
}

/// CDI's `StorageProfile` (cluster-scoped, one per StorageClass, of the class's name).
pub fn storage_profile_resource() -> ApiResource {
    ApiResource { kind: "StorageProfile".into(), plural: "storageprofiles".into(), ..data_volume_resource() }
}

/// A claim as the operator reads it.
#[derive(Debug, Clone, PartialEq, Eq, Default, Hash)]
pub struct Claim {
    pub phase: String,
    pub class: Option<String>,
    pub access_modes: Vec<String>,
    pub volume_mode: Option<String>,
    /// CDI made it for a DataVolume (its owner).
    pub of_data_volume: bool,
}

impl Claim {
    pub fn of(claim: &PersistentVolumeClaim) -> Self {
        let spec = claim.spec.clone().unwrap_or_default();
        let status = claim.status.clone().unwrap_or_default();
        let access_modes = status.access_modes.filter(|m| !m.is_empty()).or(spec.access_modes).unwrap_or_default();
        Self {
            phase: status.phase.unwrap_or_else(|| "Pending".into()),
            class: spec.storage_class_name,
            access_modes,
            volume_mode: spec.volume_mode,
            of_data_volume: claim.owner_references().iter().any(|o| o.kind == "DataVolume"),
        }
    }

    pub fn bound(&self) -> bool {
        self.phase == "Bound"
    }
}

/// A claim as the controller's watch cache holds it: what the watch and the cache need of its metadata (name,
/// namespace, uid, resource version, deletion), the `Wukong` its [`OWNER_LABEL`] names, and what [`Claim`] says of
/// it. Decoded from each watch event into this, so the rest of the claim (labels, annotations, owners, finalizers,
/// requests) is never held: at thousands of claims the whole objects were a fifth of the operator's memory.
#[derive(Debug, Clone, Deserialize)]
#[serde(from = "PersistentVolumeClaim")]
pub struct CachedClaim {
    metadata: ObjectMeta,
    /// The `Wukong` that owns it, by [`OWNER_LABEL`].
    pub owner: Option<String>,
    /// Its disk there, by [`DISK_LABEL`].
    pub disk: Option<String>,
    pub claim: Claim,
}

impl From<PersistentVolumeClaim> for CachedClaim {
    fn from(claim: PersistentVolumeClaim) -> Self {
        let owner = claim.labels().get(OWNER_LABEL).cloned();
        let disk = claim.labels().get(DISK_LABEL).cloned();
        let of = Claim::of(&claim);
        let meta = claim.metadata;
        let metadata = ObjectMeta {
            name: meta.name,
            namespace: meta.namespace,
            uid: meta.uid,
            resource_version: meta.resource_version,
            deletion_timestamp: meta.deletion_timestamp,
            ..ObjectMeta::default()
        };
        Self { metadata, owner, disk, claim: of }
    }
}

impl kube::Resource for CachedClaim {
    type DynamicType = ();
    type Scope = NamespaceResourceScope;

    fn kind(_: &()) -> Cow<'_, str> {
        PersistentVolumeClaim::kind(&())
    }
    fn group(_: &()) -> Cow<'_, str> {
        PersistentVolumeClaim::group(&())
    }
    fn version(_: &()) -> Cow<'_, str> {
        PersistentVolumeClaim::version(&())
    }
    fn plural(_: &()) -> Cow<'_, str> {
        PersistentVolumeClaim::plural(&())
    }
    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }
    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

/// The claims of one `Wukong` (those that carry its name in [`OWNER_LABEL`]), read from the controller's watch
/// cache by name: a pass asks only for the claims of its disks.
pub struct OwnedClaims {
    store: Store<CachedClaim>,
    namespace: String,
    owner: String,
}

impl OwnedClaims {
    pub fn new(store: Store<CachedClaim>, namespace: &str, owner: &str) -> Self {
        Self { store, namespace: namespace.into(), owner: owner.into() }
    }

    /// Claim `name`, when it exists and is this object's.
    pub fn get(&self, name: &str) -> Option<Claim> {
        let cached = self.store.get(&ObjectRef::new(name).within(&self.namespace))?;
        (cached.owner.as_ref() == Some(&self.owner)).then(|| cached.claim.clone())
    }

    pub fn contains_key(&self, name: &str) -> bool {
        self.get(name).is_some()
    }

    /// The `Wukong` that owns claim `name`, when it exists and is another object's (handed over by a move, say).
    pub fn other_owner(&self, name: &str) -> Option<String> {
        let cached = self.store.get(&ObjectRef::new(name).within(&self.namespace))?;
        cached.owner.clone().filter(|owner| *owner != self.owner)
    }
}

/// A DataVolume as CDI reports it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DataVolume {
    pub phase: String,
    pub progress: String,
    /// Why it is not ready, from CDI's `Running` or `Ready` condition (e.g. an importer's error).
    pub message: Option<String>,
}

impl DataVolume {
    pub fn of(object: &DynamicObject) -> Self {
        let status = &object.data["status"];
        let text = |v: &Value| v.as_str().unwrap_or_default().to_string();
        let conditions = status["conditions"].as_array().cloned().unwrap_or_default();
        let message = ["Running", "Ready"].iter().find_map(|type_| {
            conditions
                .iter()
                .find(|c| c["type"] == *type_ && c["status"] != "True")
                .map(|c| text(&c["message"]))
                .filter(|m| !m.is_empty())
        });
        Self { phase: text(&status["phase"]), progress: text(&status["progress"]), message }
    }
}

/// How long a read of the StorageClasses or of a StorageProfile serves the passes that follow: both change rarely,
/// and at thousands of objects a read per pass that makes a disk was a fifth of the operator's requests.
pub const FRESH_FOR: Duration = Duration::from_secs(10);

/// What the StorageClasses say.
#[derive(Debug, Clone, Default)]
pub struct Classes {
    /// Class → binding mode; `None` when the operator may not read StorageClasses (a namespaced install without
    /// the read-only ClusterRole): nothing is known of any class.
    known: Option<BTreeMap<String, String>>,
    default: Option<String>,
}

impl Classes {
    /// The classes as read at most [`FRESH_FOR`] ago, or just now when one of `named` is not among them (it may
    /// have been created since).
    pub async fn read(client: &kube::Client, reads: &ClusterReads, named: &[&str]) -> Result<Self> {
        let cached = Self::read_within(client, reads, FRESH_FOR).await?;
        match named.iter().all(|class| cached.exists(class) != Some(false)) {
            true => Ok(cached),
            false => Self::read_within(client, reads, Duration::ZERO).await,
        }
    }

    async fn read_within(client: &kube::Client, reads: &ClusterReads, max_age: Duration) -> Result<Self> {
        let Some(classes) = reads.storage_classes(client, max_age).await? else { return Ok(Self::default()) };
        let default = classes
            .iter()
            .find(|c| c.annotations().get(DEFAULT_CLASS).is_some_and(|v| v == "true"))
            .map(|c| c.name_any());
        let known = classes
            .iter()
            .map(|c| {
                let mode = c.volume_binding_mode.clone().unwrap_or_else(|| "Immediate".into());
                (c.name_any(), mode)
            })
            .collect();
        Ok(Self { known: Some(known), default })
    }

    /// Whether class `name` exists; `None` when classes cannot be read.
    pub fn exists(&self, name: &str) -> Option<bool> {
        self.known.as_ref().map(|k| k.contains_key(name))
    }

    /// The class a claim of `class` gets: the one named, else the default.
    pub fn resolve<'a>(&'a self, class: Option<&'a str>) -> Option<&'a str> {
        class.or(self.default.as_deref())
    }

    /// The binding mode of a claim of `class`; `None` when unknown (classes unreadable, or no such class).
    pub fn binding_mode(&self, class: Option<&str>) -> Option<&str> {
        let class = self.resolve(class)?;
        self.known.as_ref()?.get(class).map(String::as_str)
    }

    /// A Pending claim of `class` is hot-plugged now: its class waits for a first consumer (KubeVirt's attachment
    /// Pod), or nothing is known of classes (KubeVirt's attach then waits for the bind, as it would for any claim).
    pub fn awaits_consumer(&self, class: Option<&str>) -> bool {
        match &self.known {
            None => true,
            Some(_) => self.binding_mode(class) == Some(WAIT_FOR_FIRST_CONSUMER),
        }
    }
}

/// The DataVolume a new disk is made from: its own `source`, else a blank one when CDI is installed and the claim
/// may hold a filesystem. KubeVirt hot-plugs a Filesystem claim's `disk.img` and creates that file only for the
/// volumes a VM boots with, never for a hot-plugged one (pkg/host-disk/host-disk.go `shouldSkipVolumeSource`): an
/// empty Filesystem claim cannot be hot-plugged, and CDI writes `disk.img` into a blank DataVolume's. `None`: a bare
/// claim, of volume mode `Block` unless the disk says otherwise.
pub fn data_volume_source(disk: &DiskSpec, cdi: bool) -> Option<DiskSource> {
    match &disk.source {
        Some(source) => Some(DiskSource::clone(source)),
        None if cdi && disk.volume_mode != Some(VolumeMode::Block) => {
            Some(DiskSource { blank: Some(BlankSource {}), ..Default::default() })
        }
        None => None,
    }
}

/// One combination of modes a class offers (CDI's `claimPropertySets`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PropertySet {
    pub access_modes: Vec<String>,
    pub volume_mode: String,
}

/// The combinations class `class` offers, from its CDI StorageProfile (`spec.claimPropertySets`, the admin's,
/// before `status.claimPropertySets`, CDI's, as CDI reads them); empty when unknown (no CDI, no profile, no RBAC).
pub async fn property_sets(client: &kube::Client, reads: &ClusterReads, class: &str) -> Result<Vec<PropertySet>> {
    let Some(profile) = reads.storage_profile(client, class, FRESH_FOR).await? else { return Ok(Vec::new()) };
    let sets = |part: &str| profile.data[part]["claimPropertySets"].as_array().cloned().unwrap_or_default();
    let chosen = Some(sets("spec")).filter(|s| !s.is_empty()).unwrap_or_else(|| sets("status"));
    Ok(chosen
        .iter()
        .map(|set| PropertySet {
            access_modes: set["accessModes"]
                .as_array()
                .map(|m| m.iter().filter_map(Value::as_str).map(str::to_string).collect())
                .unwrap_or_default(),
            volume_mode: set["volumeMode"].as_str().unwrap_or("Filesystem").to_string(),
        })
        .collect())
}

/// The modes a new claim gets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Modes {
    pub access_modes: Vec<String>,
    pub volume_mode: String,
}

/// Why a disk's modes cannot be had from its class: the field at fault (`accessModes` or `volumeMode`) and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModesRefused {
    pub field: &'static str,
    pub message: String,
}

/// The modes of a new claim for `disk` of class `class` offering `sets`: the disk's own, else the first set that
/// fits what the disk does say (as CDI's `renderPvcSpecVolumeModeAndAccessModesAndStorageClass` picks them), else
/// `[ReadWriteOnce]` and `Filesystem` for a DataVolume's claim, `Block` for a bare one (see [`data_volume_source`]).
/// A mode the class's profile does not offer is refused, naming the field.
pub fn resolve_modes(
    disk: &DiskSpec,
    class: &str,
    sets: &[PropertySet],
    data_volume: bool,
) -> Result<Modes, ModesRefused> {
    let name = |m: &AccessMode| format!("{m:?}");
    let wanted_access: Option<Vec<String>> = disk.access_modes.as_ref().map(|m| m.iter().map(name).collect());
    let wanted_mode = disk.volume_mode.map(|m| match m {
        VolumeMode::Filesystem => "Filesystem".to_string(),
        VolumeMode::Block => "Block".to_string(),
    });
    let offered = |set: &PropertySet| {
        wanted_mode.as_ref().is_none_or(|m| *m == set.volume_mode)
            && wanted_access.as_ref().is_none_or(|w| w.iter().all(|m| set.access_modes.contains(m)))
    };
    if !sets.is_empty()
        && !sets.iter().any(offered)
        && let Some(mode) = &wanted_mode
    {
        let field = if sets.iter().any(|s| s.volume_mode == *mode) { "accessModes" } else { "volumeMode" };
        let offers: Vec<String> =
            sets.iter().map(|s| format!("{} {}", s.volume_mode, s.access_modes.join("+"))).collect();
        let asked = match field {
            "volumeMode" => format!("{mode} volumes"),
            _ => format!("{} with {mode} volumes", wanted_access.clone().unwrap_or_default().join("+")),
        };
        return Err(ModesRefused {
            field,
            message: format!(
                "StorageClass '{class}' cannot provide {asked}: its CDI StorageProfile offers {}",
                offers.join(", ")
            ),
        });
    }
    let fitting = sets.iter().find(|s| offered(s));
    Ok(Modes {
        access_modes: wanted_access
            .or_else(|| fitting.map(|s| s.access_modes.clone()).filter(|m| !m.is_empty()))
            .unwrap_or_else(|| vec!["ReadWriteOnce".into()]),
        volume_mode: wanted_mode
            .or_else(|| fitting.map(|s| s.volume_mode.clone()))
            .unwrap_or_else(|| if data_volume { "Filesystem" } else { "Block" }.into()),
    })
}

/// The spec of a disk's bare claim.
pub fn claim_spec(size: &str, class: Option<&str>, modes: &Modes) -> Value {
    let mut spec = json!({"accessModes": modes.access_modes, "volumeMode": modes.volume_mode,
                          "resources": {"requests": {"storage": size}}});
    if let Some(class) = class {
        spec["storageClassName"] = json!(class);
    }
    spec
}

/// The spec of a disk's DataVolume: its source as CDI names it, and `storage` (CDI renders the claim from it). A
/// clone without a size gets its source's (CDI's `renderPvcSpecVolumeSize`).
pub fn data_volume_spec(source: &DiskSource, size: &str, class: Option<&str>, modes: &Modes) -> Value {
    let mut storage = json!({"accessModes": modes.access_modes, "volumeMode": modes.volume_mode});
    if !size.is_empty() {
        storage["resources"] = json!({"requests": {"storage": size}});
    }
    if let Some(class) = class {
        storage["storageClassName"] = json!(class);
    }
    json!({"source": source, "storage": storage})
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::{BlankSource, ClaimSource};

    /// A bound claim as the API server serves it, and as the watch cache keeps it: what the operator reads of it is
    /// the same, and nothing else of it is held.
    #[test]
    fn a_cached_claim_reads_the_same_and_holds_nothing_else() {
        let served = json!({
            "apiVersion": "v1", "kind": "PersistentVolumeClaim",
            "metadata": {"name": "db-vm-data", "namespace": "ns1", "uid": "u1", "resourceVersion": "7",
                "labels": {"vm.novasphere.dev/wukong": "db", "vm.novasphere.dev/disk": "data"},
                "annotations": {"pv.kubernetes.io/bind-completed": "yes", "volume.kubernetes.io/storage-provisioner": "x"},
                "ownerReferences": [{"apiVersion": "cdi.kubevirt.io/v1beta1", "kind": "DataVolume", "name": "db-vm-data",
                                     "uid": "u2"}],
                "finalizers": ["kubernetes.io/pvc-protection"],
                "managedFields": [{"manager": "wukong-operator", "operation": "Apply"}]},
            "spec": {"storageClassName": "fast", "accessModes": ["ReadWriteOnce"], "volumeMode": "Block",
                     "resources": {"requests": {"storage": "1Gi"}}, "volumeName": "pv-1"},
            "status": {"phase": "Bound", "accessModes": ["ReadWriteMany"], "capacity": {"storage": "1Gi"},
                       "conditions": [{"type": "Resizing", "status": "False"}]},
        });
        let claim: PersistentVolumeClaim = serde_json::from_value(served.clone()).unwrap();
        let cached: CachedClaim = serde_json::from_value(served).unwrap();
        assert_eq!(cached.claim, Claim::of(&claim));
        assert!(cached.claim.of_data_volume && cached.claim.bound());
        assert_eq!(cached.claim.access_modes, ["ReadWriteMany"], "the modes it was bound with");
        assert_eq!(cached.owner.as_deref(), Some("db"));
        let expected = ObjectMeta {
            name: Some("db-vm-data".into()),
            namespace: Some("ns1".into()),
            uid: Some("u1".into()),
            resource_version: Some("7".into()),
            ..ObjectMeta::default()
        };
        assert_eq!(cached.metadata, expected);
        // A claim of no `Wukong` (it lost its label) is nobody's, and a missing phase is Pending.
        let bare: CachedClaim = serde_json::from_value(json!({"metadata": {"name": "x"}})).unwrap();
        assert_eq!((bare.owner, bare.claim.phase.as_str()), (None, "Pending"));
    }

    fn set(modes: &[&str], volume_mode: &str) -> PropertySet {
        PropertySet { access_modes: modes.iter().map(|m| m.to_string()).collect(), volume_mode: volume_mode.into() }
    }

    fn disk(access: Option<Vec<AccessMode>>, mode: Option<VolumeMode>) -> DiskSpec {
        DiskSpec { name: "data".into(), access_modes: access, volume_mode: mode, ..Default::default() }
    }

    #[test]
    fn modes_come_from_the_disk_then_the_profile_then_rwo_filesystem() {
        let rwo_fs = Modes { access_modes: vec!["ReadWriteOnce".into()], volume_mode: "Filesystem".into() };
        assert_eq!(resolve_modes(&disk(None, None), "local", &[], true), Ok(rwo_fs));
        // A bare claim must be Block to be hot-plugged (KubeVirt makes no disk.img for a hot-plugged Filesystem one).
        assert_eq!(resolve_modes(&disk(None, None), "local", &[], false).unwrap().volume_mode, "Block");
        let profile = [set(&["ReadWriteMany"], "Block"), set(&["ReadWriteOnce"], "Filesystem")];
        let first = resolve_modes(&disk(None, None), "ceph", &profile, true).unwrap();
        assert_eq!((first.access_modes, first.volume_mode.as_str()), (vec!["ReadWriteMany".into()], "Block"));
        // The disk says Filesystem: the set that offers it gives the access modes.
        let fs = resolve_modes(&disk(None, Some(VolumeMode::Filesystem)), "ceph", &profile, true).unwrap();
        assert_eq!((fs.access_modes, fs.volume_mode.as_str()), (vec!["ReadWriteOnce".into()], "Filesystem"));
        let rwx = resolve_modes(&disk(Some(vec![AccessMode::ReadWriteMany]), None), "ceph", &profile, true).unwrap();
        assert_eq!(rwx.volume_mode, "Block");
    }

    #[test]
    fn a_mode_the_class_does_not_offer_is_refused_naming_the_field() {
        let profile = [set(&["ReadWriteOnce"], "Filesystem")];
        let refused = resolve_modes(&disk(None, Some(VolumeMode::Block)), "local", &profile, true).unwrap_err();
        assert_eq!(refused.field, "volumeMode");
        assert_eq!(
            refused.message,
            "StorageClass 'local' cannot provide Block volumes: its CDI StorageProfile offers Filesystem ReadWriteOnce"
        );
        let refused = resolve_modes(
            &disk(Some(vec![AccessMode::ReadWriteMany]), Some(VolumeMode::Filesystem)),
            "local",
            &profile,
            true,
        )
        .unwrap_err();
        assert_eq!(refused.field, "accessModes", "{}", refused.message);
        // Access modes alone are the claim's to check (the provisioner refuses them): not refused here.
        assert!(resolve_modes(&disk(Some(vec![AccessMode::ReadWriteMany]), None), "local", &profile, true).is_ok());
        // Without a profile nothing is known, so nothing is refused.
        assert!(resolve_modes(&disk(None, Some(VolumeMode::Block)), "local", &[], true).is_ok());
    }

    #[test]
    fn a_disk_without_a_source_is_a_blank_data_volume_with_cdi_else_a_bare_claim() {
        let blank = Some(DiskSource { blank: Some(BlankSource {}), ..Default::default() });
        assert_eq!(data_volume_source(&disk(None, None), true), blank);
        assert_eq!(data_volume_source(&disk(None, Some(VolumeMode::Filesystem)), true), blank);
        assert_eq!(data_volume_source(&disk(None, Some(VolumeMode::Block)), true), None);
        assert_eq!(data_volume_source(&disk(None, None), false), None);
        let clone =
            DiskSource { pvc: Some(ClaimSource { name: "golden".into(), namespace: None }), ..Default::default() };
        let cloned = DiskSpec { source: Some(Box::new(clone.clone())), ..disk(None, Some(VolumeMode::Block)) };
        assert_eq!(data_volume_source(&cloned, true), Some(clone));
    }

    #[test]
    fn claims_and_data_volumes_carry_the_modes_and_cdis_source() {
        let modes = Modes { access_modes: vec!["ReadWriteMany".into()], volume_mode: "Block".into() };
        assert_eq!(
            claim_spec("8Gi", Some("ceph"), &modes),
            json!({"accessModes": ["ReadWriteMany"], "volumeMode": "Block", "storageClassName": "ceph",
                   "resources": {"requests": {"storage": "8Gi"}}})
        );
        let blank = DiskSource { blank: Some(BlankSource {}), ..Default::default() };
        assert_eq!(
            data_volume_spec(&blank, "1Gi", None, &modes),
            json!({"source": {"blank": {}}, "storage": {"accessModes": ["ReadWriteMany"], "volumeMode": "Block",
                   "resources": {"requests": {"storage": "1Gi"}}}})
        );
        let clone =
            DiskSource { pvc: Some(ClaimSource { name: "golden".into(), namespace: None }), ..Default::default() };
        assert_eq!(
            data_volume_spec(&clone, "", Some("ceph"), &modes),
            json!({"source": {"pvc": {"name": "golden"}}, "storage": {"accessModes": ["ReadWriteMany"],
                   "volumeMode": "Block", "storageClassName": "ceph"}})
        );
    }

    #[test]
    fn a_data_volume_says_why_it_is_not_ready() {
        let object: DynamicObject = serde_json::from_value(json!({
            "apiVersion": "cdi.kubevirt.io/v1beta1", "kind": "DataVolume", "metadata": {"name": "db-vm-data"},
            "status": {"phase": "ImportInProgress", "progress": "12.50%", "conditions": [
                {"type": "Ready", "status": "False", "message": ""},
                {"type": "Running", "status": "False", "reason": "Error",
                 "message": "Unable to connect to http data source: expected status code 200, got 404"}]}
        }))
        .unwrap();
        let dv = DataVolume::of(&object);
        assert_eq!((dv.phase.as_str(), dv.progress.as_str()), ("ImportInProgress", "12.50%"));
        assert_eq!(
            dv.message.as_deref(),
            Some("Unable to connect to http data source: expected status code 200, got 404")
        );
    }
}
