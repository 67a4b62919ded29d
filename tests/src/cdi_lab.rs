//! CDI (the Containerized Data Importer) in the lab's API server, as far as the lab needs it, playing CDI v1.64.0 (the
//! CDI API release KubeVirt v1.9 vendors; read at tag v1.64.0 of kubevirt/containerized-data-importer):
//!
//! * **its API**: the `datavolumes.cdi.kubevirt.io` and `storageprofiles.cdi.kubevirt.io` CRDs exactly as CDI's
//!   operator installs them (tests/kubevirt/cdi-crds.yaml: CDI's generated CRDs, full schemas; the lab's 1.20 API
//!   server ignores their `x-kubernetes-validations`), and CDI's controller identity ([`CDI_CONTROLLER`],
//!   tests/kubevirt/cdi-rbac.yaml) that every write below is made as;
//! * **the StorageProfile controller** (storageprofile-controller.go `reconcileStorageProfile`): one StorageProfile
//!   per StorageClass, its status the class, the provisioner, `cloneStrategy: copy` (host-assisted: the lab has no
//!   VolumeSnapshotClass), `dataImportCronSourceFormat: pvc` and the `claimPropertySets` of its spec; CDI knows
//!   nothing of the lab's provisioner (`storagecapabilities`), so without a spec there are none. An administrator
//!   sets them in the profile's spec ([`CdiLab::set_claim_property_sets`]);
//! * **the DataVolume controllers** (datavolume/controller-base.go `syncDvPvcState`, `updateStatus`,
//!   `updateConditions`, `emitEvent`; import-controller.go, pvc-clone-controller.go, util.go `renderPvcSpec`): a
//!   DataVolume gets its claim, of the same name, controlled by it (`newPersistentVolumeClaim`: the DataVolume's labels
//!   and annotations copied, `app: containerized-data-importer` and CDI's recommended labels, CDI's annotations), with
//!   `spec.pvc` taken as it is or `spec.storage` rendered from the StorageProfile (class: the named one, else the
//!   default virtualization class, else the default class; access modes and volume mode from the first claim property
//!   set; a Filesystem size inflated by CDI's default filesystem overhead, 6 %, `GetRequiredSpace`). Its status walks
//!   CDI's phases with CDI's conditions (Bound, Ready, Running), reasons, messages and Events;
//! * **the workers**, CDI's PVC-level import and host-assisted clone controllers and their Pods, played in process
//!   (no Pod objects): they write on the claim the annotations CDI's controllers write from their Pods (the importer
//!   Pod's name, phase, running condition), which is what the DataVolume's status is made of. A blank image is a
//!   sparse file; an http import downloads the URL (plain http) and converts qcow2 with `qemu-img convert`; a
//!   clone copies the source claim's disk once no Pod uses that claim (`CloneSourceInUse` Events meanwhile); a
//!   registry import fails with a message saying the lab does not do it. A Block claim's data is its device; a
//!   Filesystem claim's is `disk.img`, grown to the usable space (`GetUsableSpace`) as CDI's importer does.
//!
//! **Volume populators.** CDI ≥ 1.57 populates a claim through a populator (`spec.dataSourceRef` to a
//! VolumeImportSource or VolumeCloneSource, a `prime-` claim, DataVolume phase `PendingPopulation` while a
//! `WaitForFirstConsumer` claim waits) only when the class's provisioner is a registered CSI driver
//! (`shouldUseCDIPopulator`: a `CSIDriver` named as the provisioner) and the DataVolume does not say
//! `cdi.kubevirt.io/storage.usePopulator: "false"`. The lab's provisioner is not a CSI driver (as a host-path
//! provisioner such as local-path-provisioner is not), and the lab's 1.20 API server cannot store
//! `spec.dataSourceRef` anyway, so the lab plays CDI's path without populators, the default for such a class: the
//! DataVolume is annotated `cdi.kubevirt.io/storage.usePopulator: "false"`, and in a `WaitForFirstConsumer` class it
//! is in phase `WaitForFirstConsumer` (`HonorWaitForFirstConsumer`, on in CDI's released CR) until a Pod that uses its
//! claim is scheduled: KubeVirt's population trigger Pod, for a hot-plugged one. Then, as for an `Immediate` class:
//! `PVCBound` (imports), `ImportScheduled` → `ImportInProgress` → `Succeeded`; a clone `CloneScheduled` →
//! `CloneInProgress` → `Succeeded`. A clone whose source claim does not exist waits with no phase, condition Bound
//! False reason `CloneWithoutSource` ("The source pvc <name> doesn't exist"), and the Event of that condition, until
//! the source appears.
//!
//! Also left out: the CDI and CDIConfig objects (the lab uses CDI's default configuration: 6 % filesystem overhead,
//! no preallocation), upload, s3, gcs, imageio, vddk and snapshot sources, `sourceRef`, archive content, scratch space,
//! clone authorization (no webhook), progress percentages (`N/A` until `100.0%`), and the finalizers CDI puts on a
//! clone's claim while its source Pod runs. Without a kube-controller-manager (the plain lab) the garbage collector's
//! one job here is played too: a claim whose controlling DataVolume is gone is deleted.

use crate::cluster::{ADMIN, Cluster, apply, create_all};
use crate::kubevirt_lab::{KubeVirtLab, resource};
use crate::lab_events;
use crate::storage_lab::{Storage, VolumeMode, annotation, name, namespace, now};
use anyhow::{Context, Result, bail};
use kube::api::{Api, ApiResource, DeleteParams, DynamicObject, ListParams, Patch, PatchParams, PostParams};
use serde_json::{Map, Value, json};
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// CDI's controller identity (`cdi-sa` in CDI's namespace, bound to CDI's ClusterRole `cdi`).
pub const CDI_CONTROLLER: &str = "system:serviceaccount:cdi:cdi-sa";
/// The namespace CDI is installed in.
pub const CDI_NAMESPACE: &str = "cdi";
/// How long each worker step lasts (CDI's take seconds: a Pod is scheduled and started).
const STEP: Duration = Duration::from_millis(150);
/// How often the lab's CDI looks again when nothing happened.
const RESYNC: Duration = Duration::from_millis(100);
/// CDI's default filesystem overhead (`common.DefaultGlobalOverhead`, CDIConfig's `filesystemOverhead.global`).
const FILESYSTEM_OVERHEAD: f64 = 0.06;
/// The alignment of CDI's sizes (`util.DefaultAlignBlockSize`).
const ALIGN: u64 = 1 << 20;

// Annotations and labels CDI writes (pkg/controller/common/util.go, pkg/common/common.go).
const API_GROUP: &str = "cdi.kubevirt.io";
const ANN_USE_POPULATOR: &str = "cdi.kubevirt.io/storage.usePopulator";
const ANN_POD_RESTARTS: &str = "cdi.kubevirt.io/storage.pod.restarts";
const ANN_CONTENT_TYPE: &str = "cdi.kubevirt.io/storage.contentType";
const ANN_PREALLOCATION_REQUESTED: &str = "cdi.kubevirt.io/storage.preallocation.requested";
const ANN_CREATED_FOR_DATA_VOLUME: &str = "cdi.kubevirt.io/createdForDataVolume";
const ANN_SOURCE: &str = "cdi.kubevirt.io/storage.import.source";
const ANN_ENDPOINT: &str = "cdi.kubevirt.io/storage.import.endpoint";
const ANN_IMPORT_POD: &str = "cdi.kubevirt.io/storage.import.importPodName";
const ANN_POD_PHASE: &str = "cdi.kubevirt.io/storage.pod.phase";
const ANN_POD_SCHEDULABLE: &str = "cdi.kubevirt.io/storage.pod.schedulable";
const ANN_RUNNING: &str = "cdi.kubevirt.io/storage.condition.running";
const ANN_RUNNING_MESSAGE: &str = "cdi.kubevirt.io/storage.condition.running.message";
const ANN_RUNNING_REASON: &str = "cdi.kubevirt.io/storage.condition.running.reason";
const ANN_CLONE_REQUEST: &str = "k8s.io/CloneRequest";
const ANN_CLONE_OF: &str = "k8s.io/CloneOf";
const ANN_CLONE_TYPE: &str = "cdi.kubevirt.io/cloneType";
const ANN_CLONE_FALLBACK_REASON: &str = "cdi.kubevirt.io/cloneFallbackReason";
const ANN_CLONE_SOURCE_POD: &str = "cdi.kubevirt.io/storage.sourceClonePodName";
const ANN_DEFAULT_VIRT_CLASS: &str = "storageclass.kubevirt.io/is-default-virt-class";
const ANN_DEFAULT_CLASS: &str = "storageclass.kubernetes.io/is-default-class";
const ANN_MINIMUM_SIZE: &str = "cdi.kubevirt.io/minimumSupportedPvcSize";
/// `NoPopulatorMessage`: why a clone falls back to host-assisted copying.
const NO_POPULATOR: &str = "In tree storage class does not support snapshot/clone";

/// CDI's DataVolumes (`cdi.kubevirt.io/v1beta1`).
pub fn data_volumes_resource() -> ApiResource {
    resource("DataVolume", API_GROUP, "v1beta1", "datavolumes")
}

/// CDI's StorageProfiles (cluster-scoped, named as their StorageClass).
pub fn storage_profiles_resource() -> ApiResource {
    resource("StorageProfile", API_GROUP, "v1beta1", "storageprofiles")
}

fn claims_resource() -> ApiResource {
    crate::storage_lab::claims_resource()
}

/// CDI in the lab. Stops its controllers on drop.
pub struct CdiLab {
    admin: kube::Client,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for CdiLab {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl CdiLab {
    /// Installs CDI's CRDs and identity in `cluster` (which must have been started with the user
    /// [`CDI_CONTROLLER`]) and starts its controllers over the storage of `kubevirt`.
    pub async fn start(cluster: &Cluster, kubevirt: &KubeVirtLab) -> Result<Self> {
        let admin = cluster.client(ADMIN).await?;
        let namespaces = Api::<DynamicObject>::all_with(admin.clone(), &resource("Namespace", "", "v1", "namespaces"));
        let namespace = serde_json::from_value(json!({"metadata": {"name": CDI_NAMESPACE}}))?;
        match namespaces.create(&PostParams::default(), &namespace).await {
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.code == 409 => {}
            Err(e) => return Err(e).context("creating CDI's namespace"),
        }
        let manifest = |file: &str| -> Result<Vec<Value>> {
            let text = std::fs::read_to_string(crate::workspace_root().join("tests/kubevirt").join(file))?;
            serde_saphyr::from_multiple(&text).with_context(|| format!("tests/kubevirt/{file}"))
        };
        // KubeVirt ships no DataVolume CRD (crate::kubevirt_crds): CDI's come with CDI.
        for crd in manifest("cdi-crds.yaml")? {
            apply(&admin, &crd).await?;
        }
        create_all(&admin, manifest("cdi-rbac.yaml")?).await?;
        let client = cluster.client(CDI_CONTROLLER).await.context(
            "the lab's CDI runs as its ServiceAccount: start the cluster with cdi_lab::CDI_CONTROLLER among its users",
        )?;
        // The CRDs take a moment to be served.
        let started = Instant::now();
        for r in [data_volumes_resource(), storage_profiles_resource()] {
            while let Err(e) = Api::<DynamicObject>::all_with(client.clone(), &r).list(&ListParams::default()).await {
                if started.elapsed() > Duration::from_secs(30) {
                    return Err(e).with_context(|| format!("CDI's {} are not served", r.plural));
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        let cdi = Arc::new(Cdi {
            events: lab_events::Once::new(client.clone()),
            client,
            storage: kubevirt.storage(),
            garbage_collector: !cluster.runs_controller_manager(),
            transfers: Mutex::new(BTreeMap::new()),
            stamps: Mutex::new(BTreeMap::new()),
        });
        Ok(Self { admin, task: tokio::spawn(cdi.run()) })
    }

    /// What an administrator does for a storage class CDI knows nothing of: sets the `claimPropertySets` of its
    /// StorageProfile's spec (e.g. `[{"accessModes": ["ReadWriteMany"], "volumeMode": "Block"}]`), which CDI copies to
    /// the status it renders `spec.storage` from. Waits for CDI to have made the profile.
    pub async fn set_claim_property_sets(&self, class: &str, sets: Value) -> Result<()> {
        let profiles = Api::<DynamicObject>::all_with(self.admin.clone(), &storage_profiles_resource());
        let started = Instant::now();
        while profiles.get_opt(class).await?.is_none() {
            if started.elapsed() > Duration::from_secs(30) {
                bail!("CDI made no StorageProfile for StorageClass {class}");
            }
            tokio::time::sleep(RESYNC).await;
        }
        let patch = json!({"spec": {"claimPropertySets": sets}});
        profiles.patch(class, &PatchParams::default(), &Patch::Merge(&patch)).await?;
        Ok(())
    }
}

/// CDI's controllers.
struct Cdi {
    /// As [`CDI_CONTROLLER`].
    client: kube::Client,
    /// Where a bound claim's data lives.
    storage: Arc<Storage>,
    /// The cluster has no garbage collector of its own (no kube-controller-manager).
    garbage_collector: bool,
    /// Claim UID → the worker's transfer in progress.
    transfers: Mutex<BTreeMap<String, tokio::task::JoinHandle<Result<(), String>>>>,
    /// Claim UID → when its worker last took a step.
    stamps: Mutex<BTreeMap<String, Instant>>,
    events: lab_events::Once,
}

/// What a DataVolume asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Operation {
    Blank,
    Http(String),
    Registry(String),
    /// A host-assisted clone of claim `name` of namespace `namespace` (empty: the DataVolume's, as the spec says it).
    Clone {
        namespace: String,
        name: String,
    },
}

impl Operation {
    /// `getDataVolumeOp`, for the sources the lab plays; the error names what it does not.
    fn of(dv: &DynamicObject) -> Result<Self, String> {
        let source = &dv.data["spec"]["source"];
        if source["blank"].is_object() {
            return Ok(Self::Blank);
        }
        if let Some(url) = source["http"]["url"].as_str() {
            return Ok(Self::Http(url.into()));
        }
        if let Some(url) = source["registry"]["url"].as_str() {
            return Ok(Self::Registry(url.into()));
        }
        if let Some(name) = source["pvc"]["name"].as_str() {
            let namespace = source["pvc"]["namespace"].as_str().unwrap_or_default().to_string();
            return Ok(Self::Clone { namespace, name: name.into() });
        }
        Err(format!("the lab's CDI plays blank, http, registry and pvc sources, not {source}"))
    }

    /// The Events' source: each DataVolume controller has its own recorder.
    fn controller(&self) -> &'static str {
        match self {
            Self::Clone { .. } => "datavolume-pvc-clone-controller",
            _ => "datavolume-import-controller",
        }
    }
}

/// An Event to record.
struct Event {
    type_: &'static str,
    reason: String,
    message: String,
}

fn uid(object: &DynamicObject) -> String {
    object.metadata.uid.clone().unwrap_or_default()
}

fn bytes(quantity: &str) -> Result<u64, String> {
    wukong_operator::validate::quantity_bytes(quantity).map_err(|why| format!("'{quantity}' {why}"))
}

impl Cdi {
    fn api(&self, r: &ApiResource, namespace: Option<&str>) -> Api<DynamicObject> {
        match namespace {
            Some(ns) => Api::namespaced_with(self.client.clone(), ns, r),
            None => Api::all_with(self.client.clone(), r),
        }
    }

    /// Records an Event once (see `recorded`).
    async fn event(&self, of: &ApiResource, object: &DynamicObject, event: &Event, component: &str) -> Result<()> {
        self.events.record(of, object, event.type_, &event.reason, &event.message, component).await
    }

    /// The controllers' loop: a pass on every change of a DataVolume, claim, StorageClass or StorageProfile, and at
    /// least every [`RESYNC`].
    async fn run(self: Arc<Self>) {
        let resources = vec![
            data_volumes_resource(),
            claims_resource(),
            resource("StorageClass", "storage.k8s.io", "v1", "storageclasses"),
            storage_profiles_resource(),
        ];
        crate::resync_loop("lab CDI", &self.client, resources, RESYNC, || self.sync()).await
    }

    /// One pass over every StorageClass and DataVolume (a failed write is tried again on the next pass, as CDI's
    /// controllers requeue).
    async fn sync(&self) -> Result<()> {
        self.sync_storage_profiles().await?;
        let data_volumes = self.api(&data_volumes_resource(), None).list(&ListParams::default()).await?.items;
        for dv in &data_volumes {
            if let Err(e) = self.sync_data_volume(dv).await {
                tracing::debug!(dv = name(dv), error = %e, "lab CDI: DataVolume sync failed");
            }
        }
        if self.garbage_collector {
            self.collect_claims(&data_volumes).await?;
        }
        Ok(())
    }

    /// The StorageProfile controller (see the module's documentation): a profile for each class, none for a class
    /// that is gone.
    async fn sync_storage_profiles(&self) -> Result<()> {
        let classes = self.api(&resource("StorageClass", "storage.k8s.io", "v1", "storageclasses"), None);
        let classes = classes.list(&ListParams::default()).await?.items;
        let profiles = self.api(&storage_profiles_resource(), None);
        let existing = profiles.list(&ListParams::default()).await?.items;
        for class in &classes {
            let class_name = name(class);
            let profile = match existing.iter().find(|p| name(p) == class_name) {
                Some(profile) => profile.clone(),
                None => {
                    // createEmptyStorageProfile (the lab has no CDI object to own it).
                    let profile = json!({"apiVersion": "cdi.kubevirt.io/v1beta1", "kind": "StorageProfile",
                        "metadata": {"name": class_name, "labels": {"app.kubernetes.io/component": "storage",
                                                                     "app.kubernetes.io/managed-by": "cdi-controller"}},
                        "spec": {}});
                    profiles.create(&PostParams::default(), &serde_json::from_value(profile)?).await?
                }
            };
            let sets = profile.data["spec"]["claimPropertySets"].as_array().cloned().unwrap_or_default();
            if sets.iter().any(|s| s["volumeMode"].is_null() || s["accessModes"].as_array().is_none_or(Vec::is_empty)) {
                // "each ClaimPropertySet must provide both volume mode and access modes": the status stays.
                continue;
            }
            let mut status = json!({"storageClass": class_name, "provisioner": class.data["provisioner"],
                                    "cloneStrategy": profile.data["spec"]["cloneStrategy"].as_str().unwrap_or("copy"),
                                    "dataImportCronSourceFormat": "pvc"});
            if !sets.is_empty() {
                status["claimPropertySets"] = Value::Array(sets);
            }
            if profile.data["status"] != status {
                let mut next = profile.clone();
                next.data["status"] = status;
                profiles.replace_status(&class_name, &PostParams::default(), &next).await?;
            }
        }
        for profile in existing.iter().filter(|p| !classes.iter().any(|c| name(c) == name(p))) {
            match profiles.delete(&name(profile), &DeleteParams::default()).await {
                Ok(_) => {}
                Err(kube::Error::Api(s)) if s.is_not_found() => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    /// The garbage collector for DataVolumes' claims: one whose controlling DataVolume no longer exists is deleted.
    async fn collect_claims(&self, data_volumes: &[DynamicObject]) -> Result<()> {
        let claims = self.api(&claims_resource(), None).list(&ListParams::default()).await?.items;
        for claim in claims.iter().filter(|c| c.metadata.deletion_timestamp.is_none()) {
            let owner = claim.metadata.owner_references.iter().flatten().find(|o| o.controller == Some(true));
            let Some(owner) = owner.filter(|o| o.kind == "DataVolume") else { continue };
            if data_volumes.iter().any(|dv| dv.metadata.uid.as_deref() == Some(owner.uid.as_str())) {
                continue;
            }
            match self
                .api(&claims_resource(), Some(&namespace(claim)))
                .delete(&name(claim), &DeleteParams::default())
                .await
            {
                Ok(_) => {}
                Err(kube::Error::Api(s)) if s.is_not_found() => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    /// One DataVolume's reconcile: its claim made if missing, its worker's next step, its status from both.
    async fn sync_data_volume(&self, dv: &DynamicObject) -> Result<()> {
        if dv.metadata.deletion_timestamp.is_some() {
            return Ok(());
        }
        let (ns, dv_name) = (namespace(dv), name(dv));
        let claims = self.api(&claims_resource(), Some(&ns));
        let operation = match Operation::of(dv) {
            Ok(operation) => operation,
            Err(why) => {
                let event = Event { type_: "Warning", reason: "Unsupported".into(), message: why };
                return self.event(&data_volumes_resource(), dv, &event, "datavolume-import-controller").await;
            }
        };
        let component = operation.controller();
        // updateDataVolumeUseCDIPopulator: the class's provisioner is no CSI driver (see the module's documentation).
        let mut dv = dv.clone();
        if annotation(&dv, ANN_USE_POPULATOR).is_none() {
            let mut next = dv.clone();
            next.metadata
                .annotations
                .get_or_insert_with(Default::default)
                .insert(ANN_USE_POPULATOR.into(), "false".into());
            if matches!(operation, Operation::Clone { .. }) {
                next.metadata
                    .annotations
                    .get_or_insert_with(Default::default)
                    .insert(ANN_CLONE_TYPE.into(), "copy".into());
            }
            dv = self.api(&data_volumes_resource(), Some(&ns)).replace(&dv_name, &PostParams::default(), &next).await?;
        }
        let mut claim = claims.get_opt(&dv_name).await?;
        if claim.is_none() {
            match self.render_claim(&dv, &operation).await? {
                Err(sync) => return self.write_status(&dv, StatusFrom::Sync(sync), &operation).await,
                Ok(object) => {
                    claim = Some(claims.create(&PostParams::default(), &object).await?);
                    if let (Operation::Clone { .. }, Some(created)) = (&operation, &claim) {
                        // fallbackToHostAssisted.
                        let event =
                            Event { type_: "Warning", reason: "NoPopulator".into(), message: NO_POPULATOR.into() };
                        self.event(&claims_resource(), created, &event, component).await?;
                    }
                }
            }
        }
        let claim = claim.expect("found or made above");
        // The DataVolume controller and the worker's controllers are separate loops in CDI: the status shows what the
        // claim said before the worker's step, and the worker's step shows on the next pass.
        self.write_status(&dv, StatusFrom::Claim(&claim), &operation).await?;
        self.work(&dv, claim, &operation).await.map(drop)
    }

    /// `renderPvcSpec` and `newPersistentVolumeClaim` (or, for a clone, `validateCloneAndSourcePVC` first): the
    /// claim to create, or the status to write when there is none to create yet.
    async fn render_claim(&self, dv: &DynamicObject, operation: &Operation) -> Result<Result<DynamicObject, Sync>> {
        let spec = match self.render_spec(dv, operation).await? {
            Ok(spec) => spec,
            Err(why) => return Ok(Err(Sync::claim_not_valid(why))),
        };
        if let Operation::Clone { namespace: source_ns, name: source } = operation {
            let ns = if source_ns.is_empty() { namespace(dv) } else { source_ns.clone() };
            let Some(source_claim) = self.api(&claims_resource(), Some(&ns)).get_opt(source).await? else {
                let message = format!("The source pvc {source} doesn't exist");
                return Ok(Err(Sync::keep(dv, "CloneWithoutSource", message)));
            };
            if let Err(why) = validate_clone(&source_claim, dv, &spec) {
                let message = format!("The clone doesn't meet the validation requirements: {why}");
                return Ok(Err(Sync::keep(dv, "CloneValidationFailed", message)));
            }
        }
        let mut labels: Map<String, Value> = Map::new();
        labels.insert("app".into(), json!("containerized-data-importer"));
        if VolumeMode::of(&spec) == VolumeMode::Filesystem {
            labels.insert("alerts.k8s.io/KubePersistentVolumeFillingUp".into(), json!("disabled"));
        }
        for (k, v) in dv.metadata.labels.iter().flatten() {
            labels.insert(k.clone(), json!(v));
        }
        // util.SetRecommendedLabels (the lab's CDI has no installer labels).
        labels.insert("app.kubernetes.io/component".into(), json!("storage"));
        labels.insert("app.kubernetes.io/managed-by".into(), json!("cdi-controller"));
        let mut annotations: Map<String, Value> =
            dv.metadata.annotations.iter().flatten().map(|(k, v)| (k.clone(), json!(v))).collect();
        annotations.insert(ANN_POD_RESTARTS.into(), json!("0"));
        annotations.insert(ANN_CONTENT_TYPE.into(), json!("kubevirt"));
        annotations.insert(ANN_PREALLOCATION_REQUESTED.into(), json!("false"));
        annotations.insert(ANN_CREATED_FOR_DATA_VOLUME.into(), json!(uid(dv)));
        match operation {
            Operation::Blank => {
                annotations.insert(ANN_SOURCE.into(), json!("none"));
            }
            Operation::Http(url) | Operation::Registry(url) => {
                let source = if matches!(operation, Operation::Http(_)) { "http" } else { "registry" };
                annotations.insert(ANN_SOURCE.into(), json!(source));
                annotations.insert(ANN_ENDPOINT.into(), json!(url));
            }
            Operation::Clone { namespace: source_ns, name: source } => {
                let ns = if source_ns.is_empty() { namespace(dv) } else { source_ns.clone() };
                annotations.insert(ANN_CLONE_REQUEST.into(), json!(format!("{ns}/{source}")));
                annotations.insert(ANN_CLONE_TYPE.into(), json!("copy"));
                annotations.insert(ANN_CLONE_FALLBACK_REASON.into(), json!(NO_POPULATOR));
            }
        }
        let claim = json!({
            "apiVersion": "v1", "kind": "PersistentVolumeClaim",
            "metadata": {"name": name(dv), "labels": labels, "annotations": annotations,
                         "ownerReferences": [{"apiVersion": "cdi.kubevirt.io/v1beta1", "kind": "DataVolume",
                                              "name": name(dv), "uid": uid(dv), "controller": true,
                                              "blockOwnerDeletion": true}]},
            "spec": spec,
        });
        Ok(Ok(serde_json::from_value(claim)?))
    }

    /// `renderPvcSpec`: `spec.pvc` as it is, or `spec.storage` rendered (`pvcFromStorage`); `Err` says why not.
    async fn render_spec(&self, dv: &DynamicObject, operation: &Operation) -> Result<Result<Value, String>> {
        let spec = &dv.data["spec"];
        if spec["pvc"].is_object() {
            return Ok(Ok(spec["pvc"].clone()));
        }
        if !spec["storage"].is_object() {
            return Ok(Err("datavolume one of {pvc, storage} field is required".into()));
        }
        let storage = &spec["storage"];
        let mut claim = Map::new();
        for key in
            ["accessModes", "selector", "resources", "volumeName", "storageClassName", "volumeMode", "dataSource"]
        {
            if !storage[key].is_null() {
                claim.insert(key.into(), storage[key].clone());
            }
        }
        let mut claim = Value::Object(claim);
        let Some(class) = self.storage_class(storage["storageClassName"].as_str()).await? else {
            if claim["accessModes"].as_array().is_none_or(Vec::is_empty) {
                let message = "PVC spec is missing accessMode and no storageClass to choose profile";
                self.dv_event(dv, "Warning", "ErrClaimNotValid", message, operation).await?;
                return Ok(Err(message.into()));
            }
            return Ok(self.render_size(dv, &mut claim, None, operation).await?.map(|()| claim));
        };
        let class_name = name(&class);
        claim["storageClassName"] = json!(class_name);
        let profile = self.api(&storage_profiles_resource(), None).get_opt(&class_name).await?;
        let sets = profile
            .as_ref()
            .and_then(|p| p.data["status"]["claimPropertySets"].as_array().cloned())
            .unwrap_or_default();
        let no_profile =
            format!("cannot get StorageProfile: storageprofiles.cdi.kubevirt.io \"{class_name}\" not found");
        let has_modes = claim["accessModes"].as_array().is_some_and(|m| !m.is_empty());
        let has_mode = claim["volumeMode"].as_str().is_some_and(|m| !m.is_empty());
        match (has_modes, has_mode) {
            (false, false) => {
                // getDefaultVolumeAndAccessMode: the first claim property set.
                let first = sets.first().filter(|s| s["accessModes"].as_array().is_some_and(|m| !m.is_empty()));
                let Some(first) = first else {
                    let message = format!(
                        "Spec is missing accessMode and volumeMode, cannot get access mode from StorageProfile {class_name}"
                    );
                    self.dv_event(dv, "Warning", "ErrClaimNotValid", &message, operation).await?;
                    let why = if profile.is_none() {
                        no_profile
                    } else {
                        format!("no accessMode specified in StorageProfile {class_name}")
                    };
                    return Ok(Err(why));
                };
                claim["accessModes"] = first["accessModes"].clone();
                if !first["volumeMode"].is_null() {
                    claim["volumeMode"] = first["volumeMode"].clone();
                }
            }
            (false, true) => {
                // getDefaultAccessModes: the set of the claim's volume mode.
                let found = sets.iter().find(|s| {
                    s["volumeMode"] == claim["volumeMode"] && s["accessModes"].as_array().is_some_and(|m| !m.is_empty())
                });
                let Some(found) = found else {
                    let message = format!(
                        "Spec is missing accessMode and cannot get access mode from StorageProfile {class_name}"
                    );
                    self.dv_event(dv, "Warning", "ErrClaimNotValid", &message, operation).await?;
                    let why = if profile.is_none() {
                        format!("no accessMode specified and cannot get StorageProfile {class_name}")
                    } else {
                        format!("no matching accessMode specified in StorageProfile {class_name}")
                    };
                    return Ok(Err(why));
                };
                claim["accessModes"] = found["accessModes"].clone();
            }
            (true, false) => {
                // getDefaultVolumeMode: the set sharing an access mode, else the cluster's default.
                let modes = claim["accessModes"].as_array().cloned().unwrap_or_default();
                let found = sets
                    .iter()
                    .find(|s| s["accessModes"].as_array().is_some_and(|a| a.iter().any(|m| modes.contains(m))));
                if let Some(mode) = found.map(|s| s["volumeMode"].clone()).filter(|m| !m.is_null()) {
                    claim["volumeMode"] = mode;
                }
            }
            (true, true) => {}
        }
        Ok(self.render_size(dv, &mut claim, profile.as_ref(), operation).await?.map(|()| claim))
    }

    /// `renderPvcSpecVolumeSize`: a size is required (a clone's may come from its source), at least 1 MiB, a
    /// Filesystem claim's inflated by the filesystem overhead, at least the profile's minimum; written as CDI writes
    /// it, in bytes.
    async fn render_size(
        &self,
        dv: &DynamicObject,
        claim: &mut Value,
        profile: Option<&DynamicObject>,
        operation: &Operation,
    ) -> Result<Result<(), String>> {
        let requested = claim["resources"]["requests"]["storage"].as_str().map(str::to_string);
        let requested = match (requested, operation) {
            (Some(size), _) => size,
            (None, Operation::Clone { namespace: source_ns, name: source }) => {
                let ns = if source_ns.is_empty() { namespace(dv) } else { source_ns.clone() };
                match self.api(&claims_resource(), Some(&ns)).get_opt(source).await? {
                    Some(source) => match clone_size(&source, claim) {
                        Ok(size) => {
                            claim["resources"]["requests"]["storage"] = json!(size);
                            return Ok(Ok(()));
                        }
                        Err(why) => return Ok(Err(why)),
                    },
                    // Sized once the source exists; meanwhile the clone waits for it (`validateCloneAndSourcePVC`).
                    None => return Ok(Ok(())),
                }
            }
            (None, _) => return Ok(Err("PVC Spec is not valid - missing storage size".into())),
        };
        let size = match bytes(&requested) {
            Ok(size) => size,
            Err(why) => return Ok(Err(why)),
        };
        if size < ALIGN {
            return Ok(Err("PVC Spec is not valid - storage size should be at least 1MiB".into()));
        }
        let mut size = match VolumeMode::of(claim) {
            VolumeMode::Filesystem if claim["storageClassName"] != "" => required_space(size),
            _ => size,
        };
        if let Some(minimum) = profile.and_then(|p| annotation(p, ANN_MINIMUM_SIZE)).and_then(|m| bytes(m).ok()) {
            size = size.max(minimum);
        }
        claim["resources"]["requests"]["storage"] = json!(size.to_string());
        Ok(Ok(()))
    }

    /// `GetStorageClassByNameWithVirtFallback`: the named class, else the default virtualization class, else the
    /// default class (the newest, then by name).
    async fn storage_class(&self, named: Option<&str>) -> Result<Option<DynamicObject>> {
        let classes = self.api(&resource("StorageClass", "storage.k8s.io", "v1", "storageclasses"), None);
        if let Some(named) = named {
            return Ok(classes.get_opt(named).await?);
        }
        let mut all = classes.list(&ListParams::default()).await?.items;
        all.sort_by(|a, b| {
            let created = |c: &DynamicObject| c.metadata.creation_timestamp.clone().map(|t| t.0);
            created(b).cmp(&created(a)).then_with(|| name(a).cmp(&name(b)))
        });
        for key in [ANN_DEFAULT_VIRT_CLASS, ANN_DEFAULT_CLASS] {
            if let Some(class) = all.iter().find(|c| annotation(c, key) == Some("true")) {
                return Ok(Some(class.clone()));
            }
        }
        Ok(None)
    }

    async fn dv_event(
        &self,
        dv: &DynamicObject,
        type_: &'static str,
        reason: &'static str,
        message: &str,
        operation: &Operation,
    ) -> Result<()> {
        let event = Event { type_, reason: reason.into(), message: message.into() };
        self.event(&data_volumes_resource(), dv, &event, operation.controller()).await
    }

    /// Whether a worker may take its next step: CDI's Pods take their time.
    fn due(&self, claim: &DynamicObject) -> bool {
        self.stamps.lock().unwrap().get(&uid(claim)).is_none_or(|t| t.elapsed() >= STEP)
    }

    /// Writes a worker step's annotations on the claim (as CDI's PVC-level controllers do) and returns the claim.
    async fn annotate(&self, claim: &DynamicObject, annotations: &[(&str, &str)]) -> Result<DynamicObject> {
        let mut next = claim.clone();
        let map = next.metadata.annotations.get_or_insert_with(Default::default);
        for (k, v) in annotations {
            map.insert(k.to_string(), v.to_string());
        }
        self.stamps.lock().unwrap().insert(uid(claim), Instant::now());
        Ok(self
            .api(&claims_resource(), Some(&namespace(claim)))
            .replace(&name(claim), &PostParams::default(), &next)
            .await?)
    }

    /// The worker's next step for a bound claim that is not complete (import-controller.go `reconcilePvc`,
    /// `updatePvcFromPod`; clone-controller.go `Reconcile`, `reconcileSourcePod`, `updatePvcFromPod`): the importer
    /// Pod named, created (Pending), Running while the transfer runs, then Succeeded, or failed with its message. A
    /// clone's target Pod runs first; its source Pod starts once no other Pod uses the source claim. A claim in a
    /// `WaitForFirstConsumer` class is worked on only once bound (`HonorWaitForFirstConsumer`).
    async fn work(&self, dv: &DynamicObject, claim: DynamicObject, operation: &Operation) -> Result<DynamicObject> {
        if claim.data["status"]["phase"] != "Bound"
            || !self.due(&claim)
            || annotation(&claim, ANN_POD_PHASE) == Some("Succeeded")
        {
            return Ok(claim);
        }
        let importer = format!("importer-{}", name(&claim));
        match (operation, annotation(&claim, ANN_POD_PHASE), annotation(&claim, ANN_RUNNING)) {
            (Operation::Clone { .. }, None, _) => {
                self.annotate(&claim, &[(ANN_POD_PHASE, "Pending"), (ANN_POD_SCHEDULABLE, "true")]).await
            }
            (_, None, _) if annotation(&claim, ANN_IMPORT_POD).is_none() => {
                self.annotate(&claim, &[(ANN_IMPORT_POD, &importer)]).await
            }
            (_, None, _) => self.annotate(&claim, &[(ANN_POD_PHASE, "Pending"), (ANN_POD_SCHEDULABLE, "true")]).await,
            (_, Some("Pending"), _) => {
                let running = [
                    (ANN_POD_PHASE, "Running"),
                    (ANN_RUNNING, "true"),
                    (ANN_RUNNING_MESSAGE, ""),
                    (ANN_RUNNING_REASON, "Pod is running"),
                ];
                let claim = self.annotate(&claim, &running).await?;
                if !matches!(operation, Operation::Clone { .. }) {
                    self.start_transfer(&claim, operation).await?;
                }
                Ok(claim)
            }
            (_, Some("Running"), Some("true")) => {
                if let Operation::Clone { .. } = operation
                    && annotation(&claim, ANN_CLONE_SOURCE_POD).is_none()
                {
                    return self.start_clone(dv, claim, operation).await;
                }
                self.finish(claim, operation).await
            }
            _ => Ok(claim),
        }
    }

    /// A clone's source Pod, once no Pod that has not finished uses the source claim (`GetPodsUsingPVCs`); meanwhile a
    /// `CloneSourceInUse` Warning on the DataVolume for each such Pod.
    async fn start_clone(
        &self,
        dv: &DynamicObject,
        claim: DynamicObject,
        operation: &Operation,
    ) -> Result<DynamicObject> {
        let Operation::Clone { namespace: source_ns, name: source } = operation else { return Ok(claim) };
        let ns = if source_ns.is_empty() { namespace(dv) } else { source_ns.clone() };
        let pods = self.api(&resource("Pod", "", "v1", "pods"), Some(&ns)).list(&ListParams::default()).await?.items;
        let users: Vec<&DynamicObject> = pods
            .iter()
            .filter(|p| !matches!(p.data["status"]["phase"].as_str(), Some("Succeeded" | "Failed")))
            .filter(|p| crate::storage_lab::pod_claims(p).contains(source))
            .collect();
        if !users.is_empty() {
            for pod in users {
                let message = format!("pod {ns}/{} using PersistentVolumeClaim {source}", name(pod));
                self.dv_event(dv, "Warning", "CloneSourceInUse", &message, operation).await?;
            }
            return Ok(claim);
        }
        let source_pod = format!("{}-source-pod", uid(&claim));
        let claim = self.annotate(&claim, &[(ANN_CLONE_SOURCE_POD, &source_pod)]).await?;
        self.start_transfer(&claim, operation).await?;
        Ok(claim)
    }

    /// Starts the worker's transfer into the claim's volume, off the loop.
    async fn start_transfer(&self, claim: &DynamicObject, operation: &Operation) -> Result<()> {
        let target = self.storage.volume(&namespace(claim), &name(claim)).await?;
        let target = target.with_context(|| format!("claim {} is bound to no volume", name(claim)))?;
        let source = match operation {
            Operation::Clone { .. } => {
                let request = annotation(claim, ANN_CLONE_REQUEST).unwrap_or_default();
                let (ns, source) = request.split_once('/').unwrap_or_default();
                Some(
                    self.storage
                        .volume(ns, source)
                        .await?
                        .with_context(|| format!("source claim {request} is not bound"))?,
                )
            }
            _ => None,
        };
        let capacity = claim.data["status"]["capacity"]["storage"].as_str().unwrap_or_default().to_string();
        let operation = operation.clone();
        let task = tokio::task::spawn_blocking(move || {
            let capacity = bytes(&capacity)?;
            transfer(&operation, source.map(|s| s.disk_image()).as_deref(), &target, capacity)
        });
        self.transfers.lock().unwrap().insert(uid(claim), task);
        Ok(())
    }

    /// Ends the worker once its transfer ended: Succeeded (and the claim's Event), or the failed Pod's message.
    async fn finish(&self, claim: DynamicObject, operation: &Operation) -> Result<DynamicObject> {
        let task = {
            let mut transfers = self.transfers.lock().unwrap();
            match transfers.get(&uid(&claim)) {
                Some(task) if task.is_finished() => transfers.remove(&uid(&claim)),
                _ => None,
            }
        };
        let Some(task) = task else { return Ok(claim) };
        let outcome = task.await.unwrap_or_else(|e| Err(format!("the lab's worker failed: {e}")));
        let clone = matches!(operation, Operation::Clone { .. });
        let (done, component) =
            if clone { ("Clone Complete", "clone-controller") } else { ("Import Complete", "import-controller") };
        match outcome {
            Ok(()) => {
                let mut annotations = vec![
                    (ANN_POD_PHASE, "Succeeded"),
                    (ANN_RUNNING, "false"),
                    (ANN_RUNNING_MESSAGE, done),
                    (ANN_RUNNING_REASON, "Completed"),
                ];
                if clone {
                    annotations.push((ANN_CLONE_OF, "true"));
                }
                let claim = self.annotate(&claim, &annotations).await?;
                let event = match clone {
                    true => {
                        Event { type_: "Normal", reason: "CloneSucceeded".into(), message: "Clone Complete".into() }
                    }
                    false => {
                        Event { type_: "Normal", reason: "ImportSucceeded".into(), message: "Import Successful".into() }
                    }
                };
                self.event(&claims_resource(), &claim, &event, component).await?;
                Ok(claim)
            }
            Err(why) => {
                // The Pod's container failed: it restarts (OnFailure), its phase stays Running.
                let claim = self
                    .annotate(
                        &claim,
                        &[(ANN_RUNNING, "false"), (ANN_RUNNING_MESSAGE, &why), (ANN_RUNNING_REASON, "Error")],
                    )
                    .await?;
                let event = Event { type_: "Warning", reason: "ErrImportFailedPVC".into(), message: why };
                self.event(&claims_resource(), &claim, &event, component).await?;
                Ok(claim)
            }
        }
    }

    /// `updateStatus` (or `updateDataVolumeStatusPhaseWithEvent`) and `emitEvent`: the DataVolume's phase, claim
    /// name, restart count, progress and conditions, written when they change, with the Events of a phase change and
    /// of the conditions.
    async fn write_status(&self, dv: &DynamicObject, from: StatusFrom<'_>, operation: &Operation) -> Result<()> {
        let old = dv.data["status"].clone();
        let mut status = if old.is_object() { old.clone() } else { json!({}) };
        let current = old["phase"].as_str().unwrap_or_default().to_string();
        let (claim, event, reason, message) = match from {
            StatusFrom::Sync(sync) => {
                status["phase"] = json!(sync.phase);
                (None, Some(sync.event), sync.reason, sync.message)
            }
            StatusFrom::Claim(claim) => {
                let event = self.next_phase(claim, &mut status, operation).await?;
                (Some(claim), event, String::new(), String::new())
            }
        };
        if !status["phase"].is_string() || status["phase"] == "" {
            status.as_object_mut().expect("an object").remove("phase");
        }
        let conditions = update_conditions(&old["conditions"], &status, claim, &reason, &message);
        status["conditions"] = conditions;
        if status == old {
            return Ok(());
        }
        let mut next = dv.clone();
        next.data["status"] = status.clone();
        self.api(&data_volumes_resource(), Some(&namespace(dv)))
            .replace_status(&name(dv), &PostParams::default(), &next)
            .await?;
        let phase = status["phase"].as_str().unwrap_or_default();
        if let Some(event) = event.filter(|_| phase != current) {
            self.event(&data_volumes_resource(), dv, &event, operation.controller()).await?;
        }
        self.condition_events(dv, &old["conditions"], &status["conditions"], operation).await
    }

    /// `emitConditionEvent`: the Bound condition's Event whenever it changes; a Warning with the Running condition's
    /// reason and message when a bound, not ready, not running DataVolume says why.
    async fn condition_events(
        &self,
        dv: &DynamicObject,
        old: &Value,
        new: &Value,
        operation: &Operation,
    ) -> Result<()> {
        let find =
            |list: &Value, kind: &str| list.as_array().and_then(|l| l.iter().find(|c| c["type"] == kind)).cloned();
        let same = |a: &Option<Value>, b: &Option<Value>| {
            a.as_ref()
                .zip(b.as_ref())
                .is_some_and(|(a, b)| ["status", "reason", "message"].iter().all(|k| a[k] == b[k]))
        };
        let bound = find(new, "Bound");
        if let Some(bound) = bound.as_ref().filter(|_| !same(&bound, &find(old, "Bound"))) {
            let (reason, message) =
                (bound["reason"].as_str().unwrap_or_default(), bound["message"].as_str().unwrap_or_default());
            let event = Event { type_: "Normal", reason: reason.into(), message: message.into() };
            self.event(&data_volumes_resource(), dv, &event, operation.controller()).await?;
        }
        let (ready, running) = (find(new, "Ready"), find(new, "Running"));
        let (Some(ready), Some(running), Some(bound)) = (ready, running, bound) else { return Ok(()) };
        let message = running["message"].as_str().unwrap_or_default();
        let old_message = find(old, "Running").map(|r| r["message"].clone());
        if ready["status"] == "False"
            && running["status"] == "False"
            && bound["status"] == "True"
            && !message.is_empty()
            && old_message.as_ref().and_then(Value::as_str) != Some(message)
        {
            let reason = running["reason"].as_str().unwrap_or_default().into();
            let event = Event { type_: "Warning", reason, message: message.into() };
            self.event(&data_volumes_resource(), dv, &event, operation.controller()).await?;
        }
        Ok(())
    }

    /// The phase `updateStatus` derives from the claim (and the import or clone controller's `updateStatusPhase`),
    /// with the Event of that phase; sets `claimName`, `restartCount` and `progress` as CDI does.
    async fn next_phase(
        &self,
        claim: &DynamicObject,
        status: &mut Value,
        operation: &Operation,
    ) -> Result<Option<Event>> {
        if claim.metadata.deletion_timestamp.is_some() {
            return Ok(None);
        }
        status["claimName"] = json!(name(claim));
        let mut event = None;
        if annotation(claim, ANN_POD_PHASE) == Some("Succeeded") {
            event = phase_of_work(claim, status, operation);
        } else {
            match claim.data["status"]["phase"].as_str().unwrap_or_default() {
                "Pending" => {
                    let class = self.storage_class(claim.data["spec"]["storageClassName"].as_str()).await?;
                    let delayed = class.is_some_and(|c| c.data["volumeBindingMode"] == "WaitForFirstConsumer");
                    status["phase"] = json!(if delayed { "WaitForFirstConsumer" } else { "Pending" });
                }
                "Bound" => {
                    if matches!(status["phase"].as_str(), Some("Pending" | "WaitForFirstConsumer" | "Unknown")) {
                        status["phase"] = json!("PVCBound");
                    }
                    event = phase_of_work(claim, status, operation);
                }
                "Lost" => {
                    status["phase"] = json!("Failed");
                    let message = format!("PVC {} lost", name(claim));
                    event = Some(Event { type_: "Warning", reason: "ErrClaimLost".into(), message });
                }
                "" => {}
                _ => status["phase"] = json!("Unknown"),
            }
        }
        if let Some(restarts) = annotation(claim, ANN_POD_RESTARTS).and_then(|r| r.parse::<i32>().ok()) {
            status["restartCount"] = json!(restarts);
        }
        if status["progress"].as_str().is_none_or(str::is_empty) {
            status["progress"] = json!("N/A");
        }
        Ok(event)
    }
}

/// The phase and Event of a bound claim's work (import-controller.go and clone-controller-base.go
/// `updateStatusPhase`): Scheduled once the worker's Pod is named (an import) or requested (a clone), then as the
/// Pod's phase says; Succeeded with progress `100.0%`.
fn phase_of_work(claim: &DynamicObject, status: &mut Value, operation: &Operation) -> Option<Event> {
    let pod_phase = annotation(claim, ANN_POD_PHASE);
    let bound = claim.data["status"]["phase"] == "Bound";
    let claim_name = name(claim);
    let (scheduled, in_progress, failed, succeeded) = match operation {
        Operation::Clone { namespace: source_ns, name: source } => {
            if pod_phase != Some("Succeeded") && !(annotation(claim, ANN_CLONE_REQUEST).is_some() && bound) {
                return None;
            }
            let (from, to) = (format!("{source_ns}/{source}"), format!("{}/{claim_name}", namespace(claim)));
            (
                ("CloneScheduled", "CloneScheduled", format!("Cloning from {from} into {to} scheduled")),
                ("CloneInProgress", "CloneInProgress", format!("Cloning from {from} into {to} in progress")),
                ("CloneFailed", format!("Cloning from {from} into {to} failed")),
                ("CloneSucceeded", format!("Successfully cloned from {from} into {to}")),
            )
        }
        _ => {
            if pod_phase != Some("Succeeded") && !(annotation(claim, ANN_IMPORT_POD).is_some() && bound) {
                return None;
            }
            (
                ("ImportScheduled", "ImportScheduled", format!("Import into {claim_name} scheduled")),
                ("ImportInProgress", "ImportInProgress", format!("Import into {claim_name} in progress")),
                ("ImportFailed", format!("Failed to import into PVC {claim_name}")),
                ("ImportSucceeded", format!("Successfully imported into PVC {claim_name}")),
            )
        }
    };
    status["phase"] = json!(scheduled.0);
    let normal = |(reason, message): (&str, String)| Some(Event { type_: "Normal", reason: reason.into(), message });
    match pod_phase? {
        "Pending" => normal((scheduled.1, scheduled.2)),
        "Running" => {
            status["phase"] = json!(in_progress.0);
            normal((in_progress.1, in_progress.2))
        }
        "Failed" => Some(Event { type_: "Warning", reason: failed.0.into(), message: failed.1 }),
        "Succeeded" => {
            status["phase"] = json!("Succeeded");
            status["progress"] = json!("100.0%");
            normal(succeeded)
        }
        _ => None,
    }
}

/// What a DataVolume's status is written from: its claim, or a sync that found none to make yet.
enum StatusFrom<'a> {
    Claim(&'a DynamicObject),
    Sync(Sync),
}

/// `syncDataVolumeStatusPhaseWithEvent` with no claim: the phase to write, the reason and message its Bound and
/// Ready conditions take, and the Event of a phase change.
struct Sync {
    phase: String,
    reason: String,
    message: String,
    event: Event,
}

impl Sync {
    /// `renderPvcSpec` failed: the phase unset, reason `ErrClaimNotValid`.
    fn claim_not_valid(why: String) -> Self {
        let event = Event { type_: "Warning", reason: "ErrClaimNotValid".into(), message: why.clone() };
        Self { phase: String::new(), reason: "ErrClaimNotValid".into(), message: why, event }
    }

    /// A clone that cannot start yet (`validateCloneAndSourcePVC`): the phase stays as it is.
    fn keep(dv: &DynamicObject, reason: &str, message: String) -> Self {
        let phase = dv.data["status"]["phase"].as_str().unwrap_or_default().to_string();
        let event = Event { type_: "Warning", reason: reason.into(), message: message.clone() };
        Self { phase, reason: reason.into(), message, event }
    }
}

/// `updateCondition`: a condition's status, message and reason, with its transition time when the status changes
/// and its heartbeat when anything does (message and reason are left out when empty, as CDI's JSON omits them).
fn set_condition(conditions: &mut Vec<Value>, kind: &str, status: &str, message: &str, reason: &str) {
    let index = match conditions.iter().position(|c| c["type"] == kind) {
        Some(index) => index,
        None => {
            conditions.push(json!({"type": kind, "status": ""}));
            conditions.len() - 1
        }
    };
    let condition = &mut conditions[index];
    let text = |v: &Value| v.as_str().unwrap_or_default().to_string();
    let changed = text(&condition["message"]) != message || text(&condition["reason"]) != reason;
    if condition["status"] != status {
        let now = now();
        condition["lastTransitionTime"] = json!(now);
        condition["lastHeartbeatTime"] = json!(now);
    } else if changed {
        condition["lastHeartbeatTime"] = json!(now());
    }
    if condition["status"] != status || changed {
        let object = condition.as_object_mut().expect("an object");
        for (key, value) in [("message", message), ("reason", reason)] {
            match value.is_empty() {
                true => object.remove(key),
                false => object.insert(key.into(), json!(value)),
            };
        }
    }
    condition["status"] = json!(status);
}

/// `updateConditions` (datavolume/controller-base.go, conditions.go): Bound from the claim's phase (or `reason` and
/// `message` when there is no claim), Ready from the DataVolume's phase, Running from the worker's annotations on
/// the claim.
fn update_conditions(old: &Value, status: &Value, claim: Option<&DynamicObject>, reason: &str, message: &str) -> Value {
    let mut conditions = old.as_array().cloned().unwrap_or_default();
    let ready = match status["phase"].as_str() {
        Some("Succeeded") => "True",
        Some("Unknown") => "Unknown",
        _ => "False",
    };
    match claim {
        Some(claim) => {
            let claim_name = name(claim);
            match claim.data["status"]["phase"].as_str().unwrap_or_default() {
                "Bound" => set_condition(&mut conditions, "Bound", "True", &format!("PVC {claim_name} Bound"), "Bound"),
                phase => {
                    let (message, reason) = match phase {
                        "Pending" => (format!("PVC {claim_name} Pending"), "Pending"),
                        "Lost" => ("Claim Lost".to_string(), "ClaimLost"),
                        _ => (String::new(), ""),
                    };
                    set_condition(&mut conditions, "Bound", "False", &message, reason);
                    set_condition(&mut conditions, "Ready", "False", "", "");
                }
            }
        }
        None => {
            let message = if message.is_empty() { "No PVC found" } else { message };
            let reason = if reason.is_empty() { "NotFound" } else { reason };
            set_condition(&mut conditions, "Bound", "False", message, reason);
            set_condition(&mut conditions, "Ready", "False", "", "");
        }
    }
    set_condition(&mut conditions, "Ready", ready, message, reason);
    // updateRunningCondition (the lab writes no source Pod annotations).
    let of_claim = |key| claim.and_then(|c| annotation(c, key)).unwrap_or_default();
    let (running_message, running_reason) = (of_claim(ANN_RUNNING_MESSAGE), of_claim(ANN_RUNNING_REASON));
    if of_claim(ANN_POD_SCHEDULABLE) == "false" {
        set_condition(&mut conditions, "Running", "False", "Importer pod cannot be scheduled", "Unschedulable");
    } else {
        match claim.and_then(|c| annotation(c, ANN_RUNNING)).map(str::to_lowercase).as_deref() {
            Some("true") => {
                set_condition(&mut conditions, "Running", "True", running_message, running_reason);
                set_condition(&mut conditions, "Ready", "False", "", "TransferRunning");
            }
            Some("false") | None => set_condition(&mut conditions, "Running", "False", running_message, running_reason),
            Some(_) => set_condition(&mut conditions, "Running", "Unknown", running_message, running_reason),
        }
    }
    Value::Array(conditions)
}

/// `validateClone`: the content types match, and a Block source (or an explicit `spec.pvc`) is no larger than its
/// clone (`ValidateRequestedCloneSize`).
fn validate_clone(source: &DynamicObject, dv: &DynamicObject, spec: &Value) -> Result<(), String> {
    let source_type = annotation(source, ANN_CONTENT_TYPE).filter(|t| !t.is_empty()).unwrap_or("kubevirt");
    let target_type = dv.data["spec"]["contentType"].as_str().filter(|t| !t.is_empty()).unwrap_or("kubevirt");
    if source_type != target_type {
        return Err(format!("Source contentType ({source_type}) and target contentType ({target_type}) do not match"));
    }
    let explicit = dv.data["spec"]["pvc"].is_object();
    let target = spec["resources"]["requests"]["storage"].as_str();
    if !(explicit || (target.is_some() && VolumeMode::of(&source.data["spec"]) == VolumeMode::Block)) {
        return Ok(());
    }
    let source = source.data["spec"]["resources"]["requests"]["storage"].as_str();
    let (Some(source), Some(target)) = (source, target) else {
        return Err("source/target missing storage resource requests".into());
    };
    let (source, target) = (bytes(source)?, bytes(target)?);
    if source > target {
        return Err(format!("target resources requests storage size is smaller than the source {target} < {source}"));
    }
    Ok(())
}

/// A clone's size when its `spec.storage` names none (`renderClonePvcVolumeSizeFromSource`): the source's request
/// for the same volume mode and class, else its capacity. CDI sizes a Filesystem source cloned to Block with a size
/// detection Pod, which the lab does not play.
fn clone_size(source: &DynamicObject, target: &Value) -> Result<String, String> {
    let (from, to) = (VolumeMode::of(&source.data["spec"]), VolumeMode::of(target));
    if from == VolumeMode::Filesystem && to == VolumeMode::Block {
        return Err("cannot detect the required pvc size".into());
    }
    if source.data["status"]["phase"] != "Bound" {
        return Err("source pvc is not bound".into());
    }
    let size = match from == to && source.data["spec"]["storageClassName"] == target["storageClassName"] {
        true => source.data["spec"]["resources"]["requests"]["storage"].as_str(),
        false => source.data["status"]["capacity"]["storage"].as_str(),
    };
    size.map(str::to_string).ok_or_else(|| "source pvc has no status.capacity[storage]".into())
}

/// `GetRequiredSpace`: the size of a Filesystem claim for an image of `size` bytes (aligned to 1 MiB, plus the
/// filesystem's overhead).
fn required_space(size: u64) -> u64 {
    ((size.div_ceil(ALIGN) * ALIGN) as f64 * (1.0 + FILESYSTEM_OVERHEAD)).ceil() as u64
}

/// `GetUsableSpace`: the largest image a filesystem of `available` bytes holds, rounded down to 1 MiB.
fn usable_space(available: u64) -> u64 {
    let without_overhead = (available as f64 / (1.0 + FILESYSTEM_OVERHEAD)).ceil() as u64;
    without_overhead / ALIGN * ALIGN
}

/// The worker's transfer into `target`, a volume of `capacity` bytes: nothing for a blank Block volume; the URL's
/// image (raw, or qcow2 converted to raw); a copy of the source's disk. A Filesystem volume's `disk.img` is then grown
/// to the usable space (the importer's and upload server's `ResizeImage`). The error is the failed Pod's message.
fn transfer(
    operation: &Operation,
    source: Option<&Path>,
    target: &crate::storage_lab::Volume,
    capacity: u64,
) -> Result<(), String> {
    let image = target.disk_image();
    let limit = match target.mode {
        VolumeMode::Block => capacity,
        VolumeMode::Filesystem => usable_space(capacity),
    };
    let io = |e: std::io::Error| format!("Unable to process data: {e}");
    let data = match operation {
        Operation::Blank => None,
        Operation::Http(url) => Some(raw_image(&http_get(url)?, &image)?),
        Operation::Registry(url) => {
            return Err(format!("Unable to process data: the lab's CDI does not import from a registry ({url})"));
        }
        Operation::Clone { .. } => Some(std::fs::read(source.ok_or("a clone without a source")?).map_err(io)?),
    };
    if let Some(data) = &data
        && data.len() as u64 > limit
    {
        return Err(format!(
            "Virtual image size {} is larger than the reported available storage {limit}. A larger PVC is required.",
            data.len()
        ));
    }
    let mut file = match target.mode {
        VolumeMode::Block => std::fs::OpenOptions::new().write(true).open(&image).map_err(io)?,
        VolumeMode::Filesystem => std::fs::File::create(&image).map_err(io)?,
    };
    if let Some(data) = &data {
        std::io::Write::write_all(&mut file, data).map_err(io)?;
    }
    if target.mode == VolumeMode::Filesystem {
        file.set_len(limit).map_err(io)?;
    }
    file.sync_all().map_err(io)
}

/// An image as raw bytes: a qcow2 image (its magic, `QFI\xfb`) converted with `qemu-img convert`, as CDI's importer
/// does; anything else taken as raw. `beside` names where the conversion's files go.
fn raw_image(data: &[u8], beside: &Path) -> Result<Vec<u8>, String> {
    if !data.starts_with(b"QFI\xfb") {
        return Ok(data.to_vec());
    }
    let (qcow2, raw) = (beside.with_extension("download.qcow2"), beside.with_extension("download.raw"));
    let io = |e: std::io::Error| format!("Unable to process data: {e}");
    std::fs::write(&qcow2, data).map_err(io)?;
    let out = std::process::Command::new("qemu-img")
        .args(["convert", "-f", "qcow2", "-O", "raw"])
        .arg(&qcow2)
        .arg(&raw)
        .output()
        .map_err(|e| format!("Unable to process data: qemu-img: {e}"))?;
    let converted = std::fs::read(&raw);
    let _ = (std::fs::remove_file(&qcow2), std::fs::remove_file(&raw));
    if !out.status.success() {
        return Err(format!("Unable to process data: qemu-img convert: {}", String::from_utf8_lossy(&out.stderr)));
    }
    converted.map_err(io)
}

/// A plain HTTP/1.1 GET of `url` (`http://host:port/path`), the body of a 200 answer; the error as CDI's http data
/// source says it.
fn http_get(url: &str) -> Result<Vec<u8>, String> {
    use std::io::{Read, Write};
    let fail = |why: String| format!("Unable to connect to http data source: {why}");
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| fail(format!("the lab's CDI fetches only http:// URLs, not {url}")))?;
    let (host, path) = rest.split_once('/').map_or((rest, "/".to_string()), |(h, p)| (h, format!("/{p}")));
    let mut stream = std::net::TcpStream::connect(host).map_err(|e| fail(format!("{e}")))?;
    stream.set_read_timeout(Some(Duration::from_secs(60))).map_err(|e| fail(e.to_string()))?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).map_err(|e| fail(e.to_string()))?;
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).map_err(|e| fail(e.to_string()))?;
    let end = answer.windows(4).position(|w| w == b"\r\n\r\n").ok_or_else(|| fail("no HTTP answer".into()))?;
    let head = String::from_utf8_lossy(&answer[..end]).to_string();
    let status = head.lines().next().unwrap_or_default().split_once(' ').map_or("", |(_, s)| s).to_string();
    if !status.starts_with("200") {
        let code = status.split_whitespace().next().unwrap_or_default();
        return Err(fail(format!("expected status code 200, got {code}. Status: {status}")));
    }
    Ok(answer[end + 4..].to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_follow_cdis_overhead_arithmetic() {
        // 64 MiB on a filesystem: 67108864 × 1.06, and back to the 64 MiB the image may use.
        assert_eq!(required_space(64 << 20), 71_135_396);
        assert_eq!(usable_space(71_135_396), 64 << 20);
        // A size that is not a whole MiB is aligned up first.
        assert_eq!(required_space((1 << 20) + 1), ((2u64 << 20) as f64 * 1.06).ceil() as u64);
    }

    #[test]
    fn a_condition_keeps_its_transition_time_while_only_its_message_changes() {
        let mut conditions = Vec::new();
        set_condition(&mut conditions, "Running", "False", "", "");
        let first = conditions[0]["lastTransitionTime"].clone();
        assert!(conditions[0].get("message").is_none(), "{conditions:?}");
        set_condition(&mut conditions, "Running", "False", "Import Complete", "Completed");
        assert_eq!(
            (conditions[0]["lastTransitionTime"].clone(), &conditions[0]["reason"]),
            (first, &json!("Completed"))
        );
        set_condition(&mut conditions, "Running", "True", "", "Pod is running");
        assert_eq!(conditions[0]["status"], "True");
        assert!(conditions[0].get("message").is_none(), "{conditions:?}");
    }
}
