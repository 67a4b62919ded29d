//! The lab cluster's storage, as a cluster has it: StorageClasses served by the lab's provisioner, real
//! PersistentVolumes, and the controllers that bind, provision and reclaim them, each writing what its upstream
//! counterpart writes, as the admin (the lab has no identities for them):
//!
//! * **kube-controller-manager's PV controller** (`persistentvolume-binder`, pkg/controller/volume/persistentvolume/
//!   pv_controller.go, read at Kubernetes master 2026): `syncUnboundClaim` binds a claim to the volume pre-bound to it
//!   (`bind`: the PV's `claimRef` and phase Bound first, then the claim's `spec.volumeName` with
//!   `pv.kubernetes.io/bound-by-controller` and `pv.kubernetes.io/bind-completed`, then its status with the PV's access
//!   modes and capacity, four writes as upstream); a claim of a `WaitForFirstConsumer` class without
//!   `volume.kubernetes.io/selected-node` waits (`emitEventForUnboundDelayBindingClaim`: Event `WaitForFirstConsumer`,
//!   or `WaitForPodScheduled` naming the unscheduled Pods that use it); otherwise `provisionClaimOperationExternal`
//!   sets `volume.kubernetes.io/storage-provisioner` (and its beta twin) and records `ExternalProvisioning`;
//!   `syncBoundClaim` marks a claim whose volume went `Lost`; `syncVolume` marks a volume whose claim went `Released`.
//!   The lab's API server (1.20) cannot store a class given to a claim after its creation, so the retroactive
//!   default class of Kubernetes ≥ 1.28 is not played: a claim made before any default class exists stays Pending
//!   (`FailedBinding`), as on 1.20. Only volumes pre-bound to a claim are bound (every volume here is: dynamic ones by
//!   the provisioner, static ones by whoever made them); an unclaimed volume is never matched to a claim.
//! * **an external provisioner** for [`PROVISIONER`] (sig-storage-lib-external-provisioner, controller.go
//!   `provisionClaimOperation` and `deleteVolumeOperation`; a host-path provisioner such as local-path-provisioner):
//!   for a claim annotated for it (and, in `WaitForFirstConsumer`, with its selected node) it makes the volume in the
//!   class's directory ([`DIRECTORY_PARAMETER`]): a sparse file of the requested size for `volumeMode: Block`, an empty
//!   directory (a fresh filesystem) for `Filesystem`; then a PV `pvc-<claim UID>` pre-bound to the claim
//!   (`claimRef` with its UID), with the claim's access modes and volume mode, the class's reclaim policy,
//!   `pv.kubernetes.io/provisioned-by`, a `local` source and node affinity to the volume's node; Events
//!   `Provisioning` and `ProvisioningSucceeded` on the claim. A `Released` volume of its own with policy `Delete` is
//!   deleted, files first, then the PV. There is no `CSIDriver` object for it, so CDI uses no volume populators with
//!   it (see [`crate::cdi_lab`]).
//! * **the pvc-protection and pv-protection controllers**, only when the cluster runs no kube-controller-manager (the
//!   plain lab; the node lab runs the real ones): the API server's `StorageObjectInUseProtection` admission puts
//!   `kubernetes.io/pvc-protection` on every claim and `kubernetes.io/pv-protection` on every PV; a claim being
//!   deleted loses its finalizer once no Pod that is not finished uses it, a PV once it is not Bound.
//!
//! The lab's scheduler for KubeVirt's attachment Pods asks [`Storage::schedule`] what kube-scheduler's
//! `VolumeBinding` plugin would say, and virt-handler asks [`Storage::volume`] where a bound claim's data lives.

use crate::kubevirt_lab::resource;
use crate::lab_events;
use anyhow::{Context, Result, bail};
use kube::api::{Api, ApiResource, DeleteParams, DynamicObject, PostParams};
use serde_json::{Value, json};
use std::path::{Path, PathBuf};

/// The lab's provisioner, as its StorageClasses name it.
pub const PROVISIONER: &str = "lab.wukong.invalid/images";
/// The lab's CSI driver: the same provisioner behind the name of a CSI driver, whose volumes are `csi` PVs (the volume
/// handle is the volume's path on the node, where csi-driver-host-path has an ID) and can be snapshotted and restored
/// through `snapshot.storage.k8s.io` ([`crate::snapshot_lab`]). The snapshot controller refuses the `local` PVs of
/// [`PROVISIONER`], as it refuses any volume that is not CSI.
pub const CSI_DRIVER: &str = "images.csi.lab.wukong.invalid";
/// The StorageClass parameter naming the directory the provisioner keeps the class's volumes in.
pub const DIRECTORY_PARAMETER: &str = "lab.wukong.invalid/directory";
/// The lab's one node: KubeVirt's VMIs and attachment Pods run there, and the provisioner's volumes live there.
pub const NODE: &str = "lab-node";
/// Set on a claim by kube-scheduler's volume binder once a Pod that uses it is scheduled (`AnnSelectedNode`).
pub const SELECTED_NODE: &str = "volume.kubernetes.io/selected-node";
const BIND_COMPLETED: &str = "pv.kubernetes.io/bind-completed";
const BOUND_BY_CONTROLLER: &str = "pv.kubernetes.io/bound-by-controller";
const PROVISIONED_BY: &str = "pv.kubernetes.io/provisioned-by";
const STORAGE_PROVISIONER: &str = "volume.kubernetes.io/storage-provisioner";
const BETA_STORAGE_PROVISIONER: &str = "volume.beta.kubernetes.io/storage-provisioner";
const DEFAULT_CLASS: &str = "storageclass.kubernetes.io/is-default-class";
const PVC_PROTECTION: &str = "kubernetes.io/pvc-protection";
const PV_PROTECTION: &str = "kubernetes.io/pv-protection";
/// The Events' source components.
const PV_CONTROLLER: &str = "persistentvolume-controller";

/// A StorageClass's `volumeBindingMode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BindingMode {
    /// Bound and provisioned as soon as the claim exists.
    Immediate,
    /// Provisioned once kube-scheduler picked a node for a Pod that uses the claim.
    WaitForFirstConsumer,
}

impl BindingMode {
    fn as_str(self) -> &'static str {
        match self {
            Self::Immediate => "Immediate",
            Self::WaitForFirstConsumer => "WaitForFirstConsumer",
        }
    }
}

/// A claim's or volume's `volumeMode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VolumeMode {
    Block,
    Filesystem,
}

impl VolumeMode {
    /// The mode of a claim's or PV's spec (the API server defaults it to Filesystem).
    pub fn of(spec: &Value) -> Self {
        match spec["volumeMode"].as_str() {
            Some("Block") => Self::Block,
            _ => Self::Filesystem,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Block => "Block",
            Self::Filesystem => "Filesystem",
        }
    }
}

/// A bound claim's volume as the lab's node has it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Volume {
    /// The PersistentVolume.
    pub name: String,
    pub mode: VolumeMode,
    /// The block device (a file standing for it) or the filesystem's root directory.
    pub path: PathBuf,
}

impl Volume {
    /// The disk image KubeVirt gives the guest: the device itself, or `disk.img` at the filesystem's root (KubeVirt's
    /// and CDI's convention, hotplug-disk/mount.go `mountFileSystemHotplugVolume`).
    pub fn disk_image(&self) -> PathBuf {
        match self.mode {
            VolumeMode::Block => self.path.clone(),
            VolumeMode::Filesystem => self.path.join("disk.img"),
        }
    }
}

/// What kube-scheduler's `VolumeBinding` plugin says of a Pod's claims for the lab's node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VolumeScheduling {
    /// Every claim is bound to a volume the node can reach: the Pod can be bound to the node.
    Bound,
    /// Waiting for claims to be provisioned and bound for the node (`PreBind`).
    Waiting,
    /// The Pod cannot be scheduled; the reason as the scheduler writes it in its `PodScheduled` condition.
    Unschedulable(String),
}

pub fn claims_resource() -> ApiResource {
    resource("PersistentVolumeClaim", "", "v1", "persistentvolumeclaims")
}

pub fn volumes_resource() -> ApiResource {
    resource("PersistentVolume", "", "v1", "persistentvolumes")
}

fn classes_resource() -> ApiResource {
    resource("StorageClass", "storage.k8s.io", "v1", "storageclasses")
}

fn pods_resource() -> ApiResource {
    resource("Pod", "", "v1", "pods")
}

// What the lab's controllers (storage, CDI, snapshots) read of any object.

pub(crate) fn name(object: &DynamicObject) -> String {
    object.metadata.name.clone().unwrap_or_default()
}

pub(crate) fn namespace(object: &DynamicObject) -> String {
    object.metadata.namespace.clone().unwrap_or_default()
}

pub(crate) fn annotation<'a>(object: &'a DynamicObject, key: &str) -> Option<&'a str> {
    object.metadata.annotations.as_ref().and_then(|a| a.get(key)).map(String::as_str)
}

/// Now, as the API writes a time (RFC 3339, seconds).
pub(crate) fn now() -> String {
    format!("{:.0}", k8s_openapi::jiff::Timestamp::now())
}

fn set_annotation(object: &mut DynamicObject, key: &str, value: &str) {
    object.metadata.annotations.get_or_insert_with(Default::default).insert(key.into(), value.into());
}

pub(crate) fn has_finalizer(object: &DynamicObject, finalizer: &str) -> bool {
    object.metadata.finalizers.iter().flatten().any(|f| f == finalizer)
}

/// The claims a Pod's volumes name.
pub(crate) fn pod_claims(pod: &DynamicObject) -> Vec<String> {
    let volumes = pod.data["spec"]["volumes"].as_array().cloned().unwrap_or_default();
    volumes.iter().filter_map(|v| v["persistentVolumeClaim"]["claimName"].as_str().map(str::to_string)).collect()
}

/// A Pod that has not finished: it holds its claims.
fn pod_active(pod: &DynamicObject) -> bool {
    !matches!(pod.data["status"]["phase"].as_str(), Some("Succeeded" | "Failed"))
}

/// kube-scheduler's message for a Pod that no node of the lab's one fits, `PreFilter` style (its reason names no
/// node count) or `Filter` style (`1 node(s) ...`).
pub(crate) fn unschedulable(reason: &str) -> String {
    format!(
        "0/1 nodes are available: {reason}. preemption: 0/1 nodes are available: 1 Preemption is not helpful for \
         scheduling."
    )
}

/// The cluster's storage controllers (see the module's documentation).
pub struct Storage {
    /// The admin: the controllers' identity in the lab.
    client: kube::Client,
    /// The cluster runs kube-controller-manager (the node lab): its pvc-protection and pv-protection controllers do
    /// their work, not the lab's.
    controller_manager: bool,
    events: lab_events::Once,
}

impl Storage {
    /// The storage of a cluster as `client` (the admin); `controller_manager` when a real kube-controller-manager
    /// runs beside it.
    pub fn new(client: kube::Client, controller_manager: bool) -> Self {
        Self { events: lab_events::Once::new(client.clone()), client, controller_manager }
    }

    /// A StorageClass served by the lab's provisioner, its volumes in `dir`, with `persistentVolumeReclaimPolicy:
    /// Delete`; with `default`, the cluster's default class.
    pub async fn add_class(&self, dir: &Path, class: &str, mode: BindingMode, default: bool) -> Result<()> {
        self.add_class_of(PROVISIONER, dir, class, mode, default).await
    }

    /// As [`Self::add_class`], served by the lab's CSI driver [`CSI_DRIVER`]: its volumes can be snapshotted.
    pub async fn add_csi_class(&self, dir: &Path, class: &str, mode: BindingMode, default: bool) -> Result<()> {
        self.add_class_of(CSI_DRIVER, dir, class, mode, default).await
    }

    async fn add_class_of(
        &self,
        provisioner: &str,
        dir: &Path,
        class: &str,
        mode: BindingMode,
        default: bool,
    ) -> Result<()> {
        let mut object = json!({
            "apiVersion": "storage.k8s.io/v1", "kind": "StorageClass", "metadata": {"name": class},
            "provisioner": provisioner, "parameters": {DIRECTORY_PARAMETER: dir},
            "reclaimPolicy": "Delete", "volumeBindingMode": mode.as_str(),
        });
        if default {
            object["metadata"]["annotations"] = json!({DEFAULT_CLASS: "true"});
        }
        let classes = Api::<DynamicObject>::all_with(self.client.clone(), &classes_resource());
        classes
            .create(&PostParams::default(), &serde_json::from_value(object)?)
            .await
            .with_context(|| format!("creating StorageClass {class}"))?;
        Ok(())
    }

    /// A volume an administrator made for claim `namespace/claim` from the existing `image` (a block device): a PV
    /// pre-bound to the claim (`claimRef` without a UID), with policy `Retain` and no class, and the claim itself,
    /// `volumeMode: Block` and `storageClassName: ""` so that no default class provisions it instead.
    pub async fn add_static_claim(&self, namespace: &str, claim: &str, image: &Path) -> Result<()> {
        let size =
            std::fs::metadata(image).with_context(|| format!("the image {} of claim {claim}", image.display()))?;
        let size = size.len().to_string();
        let pv = format!("static-{namespace}-{claim}");
        let volume = json!({
            "apiVersion": "v1", "kind": "PersistentVolume", "metadata": {"name": pv},
            "spec": {"accessModes": ["ReadWriteOnce"], "capacity": {"storage": size}, "volumeMode": "Block",
                     "persistentVolumeReclaimPolicy": "Retain", "storageClassName": "",
                     "claimRef": {"namespace": namespace, "name": claim},
                     "local": {"path": image}, "nodeAffinity": node_affinity(NODE)},
        });
        let volumes = Api::<DynamicObject>::all_with(self.client.clone(), &volumes_resource());
        volumes
            .create(&PostParams::default(), &serde_json::from_value(volume)?)
            .await
            .with_context(|| format!("creating PersistentVolume {pv}"))?;
        let object = json!({
            "apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": claim},
            "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": size}},
                     "volumeMode": "Block", "storageClassName": ""},
        });
        let claims = Api::<DynamicObject>::namespaced_with(self.client.clone(), namespace, &claims_resource());
        claims
            .create(&PostParams::default(), &serde_json::from_value(object)?)
            .await
            .with_context(|| format!("creating claim {namespace}/{claim}"))?;
        Ok(())
    }

    /// Where bound claim `namespace/claim`'s data lives on the lab's node; `None` while it is not bound.
    pub async fn volume(&self, namespace: &str, claim: &str) -> Result<Option<Volume>> {
        let claims = Api::<DynamicObject>::namespaced_with(self.client.clone(), namespace, &claims_resource());
        let Some(claim) = claims.get_opt(claim).await? else { return Ok(None) };
        let pv = claim.data["spec"]["volumeName"].as_str().unwrap_or_default();
        if claim.data["status"]["phase"] != "Bound" || pv.is_empty() {
            return Ok(None);
        }
        let volumes = Api::<DynamicObject>::all_with(self.client.clone(), &volumes_resource());
        let Some(volume) = volumes.get_opt(pv).await? else { return Ok(None) };
        let path = volume_path(&volume).with_context(|| format!("PV {pv} is neither a lab CSI nor a local volume"))?;
        Ok(Some(Volume { name: pv.into(), mode: VolumeMode::of(&volume.data["spec"]), path }))
    }

    /// Runs the controllers until the task is aborted: a pass on every change of a claim, PV or Pod, and at least every
    /// `resync`.
    pub(crate) async fn run(self: std::sync::Arc<Self>, resync: std::time::Duration) {
        let resources = vec![claims_resource(), volumes_resource(), pods_resource()];
        crate::resync_loop("lab storage", &self.client, resources, resync, || self.sync()).await
    }

    /// One pass of every controller over every claim and PV. A write that fails (lost to another writer) is tried
    /// again on the next pass, as the controllers requeue.
    async fn sync(&self) -> Result<()> {
        let all = |r: ApiResource| Api::<DynamicObject>::all_with(self.client.clone(), &r);
        let claims = all(claims_resource()).list(&Default::default()).await?.items;
        let volumes = all(volumes_resource()).list(&Default::default()).await?.items;
        let classes = all(classes_resource()).list(&Default::default()).await?.items;
        let pods = all(pods_resource()).list(&Default::default()).await?.items;
        for claim in &claims {
            if let Err(e) = self.sync_claim(claim, &volumes, &classes, &pods).await {
                tracing::debug!(claim = name(claim), error = %e, "lab storage: claim sync failed");
            }
        }
        for volume in &volumes {
            if let Err(e) = self.sync_volume(volume, &claims).await {
                tracing::debug!(volume = name(volume), error = %e, "lab storage: volume sync failed");
            }
        }
        Ok(())
    }

    fn claims(&self, namespace: &str) -> Api<DynamicObject> {
        Api::namespaced_with(self.client.clone(), namespace, &claims_resource())
    }

    fn volumes(&self) -> Api<DynamicObject> {
        Api::all_with(self.client.clone(), &volumes_resource())
    }

    /// Records an Event once, from the provisioner or the PV controller as its reason says.
    async fn event(
        &self,
        of: &ApiResource,
        object: &DynamicObject,
        type_: &str,
        reason: &str,
        message: &str,
    ) -> Result<()> {
        let component = match reason {
            "Provisioning" | "ProvisioningSucceeded" | "ProvisioningFailed" => PROVISIONER,
            _ => PV_CONTROLLER,
        };
        self.events.record(of, object, type_, reason, message, component).await
    }

    async fn sync_claim(
        &self,
        claim: &DynamicObject,
        volumes: &[DynamicObject],
        classes: &[DynamicObject],
        pods: &[DynamicObject],
    ) -> Result<()> {
        let (namespace, claim_name) = (namespace(claim), name(claim));
        let users: Vec<&DynamicObject> = pods
            .iter()
            .filter(|p| p.metadata.namespace.as_deref() == Some(&namespace) && pod_claims(p).contains(&claim_name))
            .collect();
        if claim.metadata.deletion_timestamp.is_some() {
            // pvc-protection: `podUsesPVC` over the Pods that have not finished.
            if !self.controller_manager && has_finalizer(claim, PVC_PROTECTION) && !users.iter().any(|p| pod_active(p))
            {
                let mut next = claim.clone();
                next.metadata.finalizers.get_or_insert_with(Vec::new).retain(|f| f != PVC_PROTECTION);
                self.claims(&namespace).replace(&claim_name, &PostParams::default(), &next).await?;
            }
            return Ok(());
        }
        if annotation(claim, BIND_COMPLETED).is_some() {
            return self.sync_bound_claim(claim, volumes).await;
        }
        let requested = claim.data["spec"]["volumeName"].as_str().unwrap_or_default();
        if !requested.is_empty() {
            // The user asked for this PV: bound once it is free or pre-bound to the claim.
            return match volumes.iter().find(|v| name(v) == requested) {
                Some(v) if v.data["spec"]["claimRef"].is_null() || bound_to(v, claim) => self.bind(v, claim).await,
                _ => Ok(()),
            };
        }
        if let Some(volume) = volumes.iter().find(|v| bound_to(v, claim)) {
            return self.bind(volume, claim).await;
        }
        let claims = claims_resource();
        let class_name = claim.data["spec"]["storageClassName"].as_str().unwrap_or_default();
        if class_name.is_empty() {
            let message = "no persistent volumes available for this claim and no storage class is set";
            return self.event(&claims, claim, "Normal", "FailedBinding", message).await;
        }
        let Some(class) = classes.iter().find(|c| name(c) == class_name) else {
            let message = format!("storageclass.storage.k8s.io \"{class_name}\" not found");
            return self.event(&claims, claim, "Warning", "ProvisioningFailed", &message).await;
        };
        let delayed = class.data["volumeBindingMode"] == "WaitForFirstConsumer";
        if delayed && annotation(claim, SELECTED_NODE).is_none() {
            let waiting: Vec<String> = users
                .iter()
                .filter(|p| p.data["spec"]["nodeName"].as_str().is_none_or(str::is_empty))
                .map(|p| name(p))
                .collect();
            let (reason, message) = match waiting.as_slice() {
                [] => ("WaitForFirstConsumer", "waiting for first consumer to be created before binding".to_string()),
                [pod] => ("WaitForPodScheduled", format!("waiting for pod {pod} to be scheduled")),
                pods => ("WaitForPodScheduled", format!("waiting for pods {} to be scheduled", pods.join(","))),
            };
            return self.event(&claims, claim, "Normal", reason, &message).await;
        }
        let provisioner = class.data["provisioner"].as_str().unwrap_or_default();
        if annotation(claim, STORAGE_PROVISIONER).is_none() {
            // setClaimProvisioner, then the Event of provisionClaimOperationExternal.
            let mut next = claim.clone();
            set_annotation(&mut next, STORAGE_PROVISIONER, provisioner);
            set_annotation(&mut next, BETA_STORAGE_PROVISIONER, provisioner);
            let next = self.claims(&namespace).replace(&claim_name, &PostParams::default(), &next).await?;
            let message = format!(
                "Waiting for a volume to be created either by the external provisioner '{provisioner}' or manually by \
                 the system administrator. If volume creation is delayed, please verify that the provisioner is \
                 running and correctly registered."
            );
            return self.event(&claims, &next, "Normal", "ExternalProvisioning", &message).await;
        }
        if [PROVISIONER, CSI_DRIVER].contains(&provisioner)
            && annotation(claim, STORAGE_PROVISIONER) == Some(provisioner)
        {
            self.provision(claim, class, volumes).await?;
        }
        Ok(())
    }

    /// The external provisioner's `provisionClaimOperation` for one claim of one of its classes.
    async fn provision(&self, claim: &DynamicObject, class: &DynamicObject, volumes: &[DynamicObject]) -> Result<()> {
        let pv = format!("pvc-{}", claim.metadata.uid.clone().unwrap_or_default());
        if volumes.iter().any(|v| name(v) == pv) {
            return Ok(());
        }
        let claims = claims_resource();
        let key = format!("{}/{}", namespace(claim), name(claim));
        let Some(dir) = class.data["parameters"][DIRECTORY_PARAMETER].as_str() else {
            let message = format!(
                "failed to provision volume with StorageClass \"{}\": the class has no parameter {DIRECTORY_PARAMETER}",
                name(class)
            );
            return self.event(&claims, claim, "Warning", "ProvisioningFailed", &message).await;
        };
        let message = format!("External provisioner is provisioning volume for claim \"{key}\"");
        self.event(&claims, claim, "Normal", "Provisioning", &message).await?;
        let spec = &claim.data["spec"];
        let size = spec["resources"]["requests"]["storage"].as_str().unwrap_or_default();
        let bytes = wukong_operator::validate::quantity_bytes(size)
            .map_err(|why| anyhow::anyhow!("claim {key}: size '{size}' {why}"))?;
        let provisioner = class.data["provisioner"].as_str().unwrap_or(PROVISIONER);
        // Only the CSI driver restores a snapshot; a host-path provisioner ignores `dataSource` and makes an empty
        // volume, as local-path-provisioner does.
        let snapshot = match &spec["dataSource"] {
            source if provisioner == CSI_DRIVER && source["kind"] == "VolumeSnapshot" => {
                match crate::snapshot_lab::restore_source(&self.client, claim, provisioner, bytes).await {
                    Ok(image) => Some(image),
                    Err(why) => {
                        let message = format!(
                            "error getting handle for DataSource Type VolumeSnapshot by Name {}: {why}",
                            source["name"].as_str().unwrap_or_default()
                        );
                        return self.event(&claims, claim, "Warning", "ProvisioningFailed", &message).await;
                    }
                }
            }
            _ => None,
        };
        let mode = VolumeMode::of(spec);
        let path = Path::new(dir).join(match mode {
            VolumeMode::Block => format!("{pv}.raw"),
            VolumeMode::Filesystem => pv.clone(),
        });
        let image = match mode {
            VolumeMode::Block => path.clone(),
            VolumeMode::Filesystem => {
                std::fs::create_dir_all(&path)?;
                path.join("disk.img")
            }
        };
        match &snapshot {
            Some(from) => {
                std::fs::copy(from, &image)
                    .with_context(|| format!("restoring {} from {}", image.display(), from.display()))?;
                let file = std::fs::OpenOptions::new().write(true).open(&image)?;
                if file.metadata()?.len() < bytes {
                    file.set_len(bytes)?;
                }
            }
            None if mode == VolumeMode::Block => std::fs::File::create(&path)?.set_len(bytes)?,
            None => {}
        }
        let node = annotation(claim, SELECTED_NODE).unwrap_or(NODE);
        let (kind, source) = match provisioner {
            CSI_DRIVER => ("csi", json!({"driver": CSI_DRIVER, "volumeHandle": path})),
            _ => ("local", json!({"path": path})),
        };
        let mut volume = json!({
            "apiVersion": "v1", "kind": "PersistentVolume",
            "metadata": {"name": pv, "annotations": {PROVISIONED_BY: provisioner}},
            "spec": {"accessModes": spec["accessModes"], "capacity": {"storage": size}, "volumeMode": mode.as_str(),
                     "persistentVolumeReclaimPolicy": class.data["reclaimPolicy"].as_str().unwrap_or("Delete"),
                     "storageClassName": name(class), "claimRef": claim_ref(claim),
                     "nodeAffinity": node_affinity(node)},
        });
        volume["spec"][kind] = source;
        self.volumes()
            .create(&PostParams::default(), &serde_json::from_value(volume)?)
            .await
            .with_context(|| format!("creating PersistentVolume {pv}"))?;
        self.event(&claims, claim, "Normal", "ProvisioningSucceeded", &format!("Successfully provisioned volume {pv}"))
            .await
    }

    /// `bind`: the volume's side first (`bindVolumeToClaim`, `updateVolumePhase`), then the claim's
    /// (`bindClaimToVolume`, `updateClaimStatus`), each written only when it changes.
    async fn bind(&self, volume: &DynamicObject, claim: &DynamicObject) -> Result<()> {
        let (namespace, claim_name, pv) = (namespace(claim), name(claim), name(volume));
        let reference = &volume.data["spec"]["claimRef"];
        let mut volume = volume.clone();
        if reference["uid"].as_str() != claim.metadata.uid.as_deref()
            || reference["name"] != claim_name.as_str()
            || reference["namespace"] != namespace.as_str()
        {
            let mut next = volume.clone();
            next.data["spec"]["claimRef"] = claim_ref(claim);
            if !bound_to(&volume, claim) && annotation(&volume, BOUND_BY_CONTROLLER).is_none() {
                set_annotation(&mut next, BOUND_BY_CONTROLLER, "yes");
            }
            volume = self.volumes().replace(&pv, &PostParams::default(), &next).await?;
        }
        if volume.data["status"]["phase"] != "Bound" {
            let mut next = volume.clone();
            next.data["status"] = json!({"phase": "Bound"});
            volume = self.volumes().replace_status(&pv, &PostParams::default(), &next).await?;
        }
        let mut claim = claim.clone();
        let mut next = claim.clone();
        if claim.data["spec"]["volumeName"] != pv.as_str() {
            next.data["spec"]["volumeName"] = json!(pv);
            if annotation(&next, BOUND_BY_CONTROLLER).is_none() {
                set_annotation(&mut next, BOUND_BY_CONTROLLER, "yes");
            }
        }
        if annotation(&next, BIND_COMPLETED).is_none() {
            set_annotation(&mut next, BIND_COMPLETED, "yes");
        }
        if next.data != claim.data || next.metadata.annotations != claim.metadata.annotations {
            claim = self.claims(&namespace).replace(&claim_name, &PostParams::default(), &next).await?;
        }
        let status = json!({"phase": "Bound", "accessModes": volume.data["spec"]["accessModes"],
                            "capacity": volume.data["spec"]["capacity"]});
        self.claim_status(claim, status).await
    }

    /// Writes a claim's status (`updateClaimStatus`) when it changes.
    async fn claim_status(&self, claim: DynamicObject, status: Value) -> Result<()> {
        if claim.data["status"] == status {
            return Ok(());
        }
        let (namespace, claim_name) = (namespace(&claim), name(&claim));
        let mut next = claim;
        next.data["status"] = status;
        self.claims(&namespace).replace_status(&claim_name, &PostParams::default(), &next).await?;
        Ok(())
    }

    /// `syncBoundClaim`: a claim bound before whose volume is gone, or bound elsewhere, is Lost (with the Event, once).
    async fn sync_bound_claim(&self, claim: &DynamicObject, volumes: &[DynamicObject]) -> Result<()> {
        let pv = claim.data["spec"]["volumeName"].as_str().unwrap_or_default();
        let lost = match volumes.iter().find(|v| name(v) == pv) {
            _ if pv.is_empty() => {
                ("ClaimLost", "Bound claim has lost reference to PersistentVolume. Data on the volume is lost!")
            }
            None => ("ClaimLost", "Bound claim has lost its PersistentVolume. Data on the volume is lost!"),
            Some(v)
                if v.data["spec"]["claimRef"]["uid"]
                    .as_str()
                    .is_none_or(|u| Some(u) == claim.metadata.uid.as_deref()) =>
            {
                return self.bind(v, claim).await;
            }
            Some(_) => ("ClaimMisbound", "Two claims are bound to the same volume, this one is bound incorrectly"),
        };
        if claim.data["status"]["phase"] == "Lost" {
            return Ok(());
        }
        self.claim_status(claim.clone(), json!({"phase": "Lost"})).await?;
        self.event(&claims_resource(), claim, "Warning", lost.0, lost.1).await
    }

    /// `syncVolume` and `reclaimVolume`, the provisioner's `deleteVolumeOperation`, and pv-protection.
    async fn sync_volume(&self, volume: &DynamicObject, claims: &[DynamicObject]) -> Result<()> {
        let pv = name(volume);
        let phase = volume.data["status"]["phase"].as_str().unwrap_or_default();
        if volume.metadata.deletion_timestamp.is_some() {
            if !self.controller_manager && has_finalizer(volume, PV_PROTECTION) && phase != "Bound" {
                let mut next = volume.clone();
                next.metadata.finalizers.get_or_insert_with(Vec::new).retain(|f| f != PV_PROTECTION);
                self.volumes().replace(&pv, &PostParams::default(), &next).await?;
            }
            return Ok(());
        }
        let reference = &volume.data["spec"]["claimRef"];
        let uid = reference["uid"].as_str().unwrap_or_default();
        if uid.is_empty() {
            // Unclaimed, or reserved for a claim that has not been bound to it yet.
            return self.volume_phase(volume, "Available").await;
        }
        let claim = claims.iter().find(|c| {
            c.metadata.namespace.as_deref() == reference["namespace"].as_str()
                && Some(name(c).as_str()) == reference["name"].as_str()
        });
        if claim.is_some_and(|c| c.metadata.uid.as_deref() == Some(uid)) {
            return Ok(());
        }
        if phase != "Released" && phase != "Failed" {
            return self.volume_phase(volume, "Released").await;
        }
        let ours = annotation(volume, PROVISIONED_BY).is_some_and(|p| [PROVISIONER, CSI_DRIVER].contains(&p));
        if phase != "Released" || !ours || volume.data["spec"]["persistentVolumeReclaimPolicy"] != "Delete" {
            return Ok(());
        }
        let path = volume_path(volume).unwrap_or_default();
        match VolumeMode::of(&volume.data["spec"]) {
            VolumeMode::Block if path.exists() => std::fs::remove_file(&path)?,
            VolumeMode::Filesystem if path.exists() => std::fs::remove_dir_all(&path)?,
            _ => {}
        }
        match self.volumes().delete(&pv, &DeleteParams::default()).await {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(s)) if s.is_not_found() => Ok(()),
            Err(e) => Err(e).with_context(|| format!("deleting PersistentVolume {pv}")),
        }
    }

    async fn volume_phase(&self, volume: &DynamicObject, phase: &str) -> Result<()> {
        if volume.data["status"]["phase"] == phase {
            return Ok(());
        }
        let mut next = volume.clone();
        next.data["status"] = json!({"phase": phase});
        self.volumes().replace_status(&name(volume), &PostParams::default(), &next).await?;
        Ok(())
    }

    /// kube-scheduler's `VolumeBinding` plugin for a Pod on node `node`: `PreFilter` refuses a Pod whose claim is
    /// missing, being deleted, or unbound in an `Immediate` class; `Filter` refuses a bound volume the node cannot
    /// reach; `Reserve` and `PreBind` (`AssumePodVolumes`, `BindPodVolumes`) give an unbound `WaitForFirstConsumer`
    /// claim the node in `volume.kubernetes.io/selected-node` and wait until it is bound.
    pub async fn schedule(&self, pod: &DynamicObject, node: &str) -> Result<VolumeScheduling> {
        let namespace = namespace(pod);
        let classes = Api::<DynamicObject>::all_with(self.client.clone(), &classes_resource());
        let mut waiting = false;
        for claim_name in pod_claims(pod) {
            let Some(claim) = self.claims(&namespace).get_opt(&claim_name).await? else {
                return Ok(VolumeScheduling::Unschedulable(unschedulable(&format!(
                    "persistentvolumeclaim \"{claim_name}\" not found"
                ))));
            };
            if claim.metadata.deletion_timestamp.is_some() {
                return Ok(VolumeScheduling::Unschedulable(unschedulable(&format!(
                    "persistentvolumeclaim \"{claim_name}\" is being deleted"
                ))));
            }
            let pv = claim.data["spec"]["volumeName"].as_str().unwrap_or_default();
            if !pv.is_empty() {
                let volume = self.volumes().get_opt(pv).await?;
                if volume.as_ref().is_some_and(|v| !reaches(v, node)) {
                    return Ok(VolumeScheduling::Unschedulable(unschedulable(
                        "1 node(s) had volume node affinity conflict",
                    )));
                }
                continue;
            }
            let class = match claim.data["spec"]["storageClassName"].as_str() {
                Some(class) if !class.is_empty() => classes.get_opt(class).await?,
                _ => None,
            };
            if class.is_none_or(|c| c.data["volumeBindingMode"] != "WaitForFirstConsumer") {
                return Ok(VolumeScheduling::Unschedulable(unschedulable(
                    "pod has unbound immediate PersistentVolumeClaims",
                )));
            }
            waiting = true;
            match annotation(&claim, SELECTED_NODE) {
                Some(selected) if selected == node => {}
                Some(other) => bail!("claim {namespace}/{claim_name} was selected for node {other}, not {node}"),
                None => {
                    let mut next = claim.clone();
                    set_annotation(&mut next, SELECTED_NODE, node);
                    self.claims(&namespace).replace(&claim_name, &PostParams::default(), &next).await?;
                }
            }
        }
        Ok(if waiting { VolumeScheduling::Waiting } else { VolumeScheduling::Bound })
    }
}

/// Where a lab volume's data lives on the node: a `local` PV's path, or a lab CSI PV's volume handle.
pub(crate) fn volume_path(volume: &DynamicObject) -> Option<PathBuf> {
    let spec = &volume.data["spec"];
    match (spec["local"]["path"].as_str(), &spec["csi"]) {
        (Some(path), _) => Some(path.into()),
        (None, csi) if csi["driver"] == CSI_DRIVER => csi["volumeHandle"].as_str().map(PathBuf::from),
        _ => None,
    }
}

/// Whether a volume is reserved for (or bound to) this claim: `IsVolumeBoundToClaim`.
fn bound_to(volume: &DynamicObject, claim: &DynamicObject) -> bool {
    let reference = &volume.data["spec"]["claimRef"];
    reference["name"].as_str() == claim.metadata.name.as_deref()
        && reference["namespace"].as_str() == claim.metadata.namespace.as_deref()
        && reference["uid"].as_str().is_none_or(|u| u.is_empty() || Some(u) == claim.metadata.uid.as_deref())
}

/// `reference.GetReference` of a claim, as a PV's `claimRef`.
fn claim_ref(claim: &DynamicObject) -> Value {
    json!({"kind": "PersistentVolumeClaim", "namespace": claim.metadata.namespace, "name": claim.metadata.name,
           "uid": claim.metadata.uid, "apiVersion": "v1", "resourceVersion": claim.metadata.resource_version})
}

/// A `local` volume's required node affinity: the one node that has it.
fn node_affinity(node: &str) -> Value {
    json!({"required": {"nodeSelectorTerms": [{"matchExpressions": [
        {"key": "kubernetes.io/hostname", "operator": "In", "values": [node]}]}]}})
}

/// Whether a PV's node affinity admits `node` (the lab's nodes carry only their `kubernetes.io/hostname` label).
fn reaches(volume: &DynamicObject, node: &str) -> bool {
    let terms = volume.data["spec"]["nodeAffinity"]["required"]["nodeSelectorTerms"].as_array().cloned();
    let Some(terms) = terms else { return true };
    terms.iter().any(|term| {
        term["matchExpressions"].as_array().into_iter().flatten().all(|e| {
            e["key"] == "kubernetes.io/hostname"
                && e["operator"] == "In"
                && e["values"].as_array().is_some_and(|v| v.iter().any(|n| n == node))
        })
    })
}
