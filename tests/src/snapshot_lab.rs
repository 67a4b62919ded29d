//! CSI volume snapshots in the lab cluster, as external-snapshotter v8.6 plays them (read at its master of 2026,
//! afb2f0d8: pkg/common-controller/snapshot_controller.go and pkg/sidecar-controller/snapshot_controller.go; the
//! functions named below are theirs), for the volumes of the lab's CSI driver [`CSI_DRIVER`]:
//!
//! * **its API**: the `snapshot.storage.k8s.io/v1` CRDs exactly as external-snapshotter ships them
//!   (tests/kubevirt/snapshot-crds.yaml; the lab's 1.20 API server drops their CEL rules, as it drops any);
//! * **the common snapshot-controller** for a dynamic snapshot (`spec.source.persistentVolumeClaimName`): the class
//!   named, or the one default class of the PV's driver set into the spec (`SetDefaultSnapshotClass`); the finalizer
//!   `volumesnapshot-as-source-protection` on the snapshot, `pvc-as-source-protection` on the claim (before any
//!   check, as upstream, and removed once no unready snapshot of the claim is left); the content
//!   `snapcontent-<snapshot UID>` with the claim's volume handle and the class's driver and deletion policy, Event
//!   `CreatingSnapshot`, then the snapshot's status mirrored from the content's (`SnapshotCreated`,
//!   `SnapshotReady`, `restoreSize` as a quantity, the content's `error` copied without an Event); each refusal as a
//!   Warning Event and `status.error` with upstream's message; deletion by the content's policy;
//! * **the csi-snapshotter sidecar** of [`CSI_DRIVER`]: `CreateSnapshot` is a copy of the volume's image beside it
//!   (`snapshot-<snapshot UID>`), its handle the copy's path; a class with parameter [`FAIL_PARAMETER`] fails every
//!   CreateSnapshot with that message (code Internal), with upstream's messages and Events on the content, retried
//!   on every pass; a class with [`SECONDS_PARAMETER`] reports `readyToUse: false` until that many seconds after the
//!   copy was taken (a driver that uploads its snapshot), and the sidecar polls again as upstream does.
//!
//! Restore is the provisioner's ([`crate::storage_lab`]): a claim of a [`CSI_DRIVER`] class with a `dataSource` of
//! kind VolumeSnapshot gets a copy of the snapshot once [`restore_source`] accepts it (external-provisioner's
//! `getSnapshotSource` checks, in its order and words).
//!
//! Not played: pre-provisioned contents (`spec.source.snapshotHandle`), group snapshots, secrets, the
//! `being-created` annotation's guard against deleting a content mid-creation (the lab's copy is synchronous).
//! The controllers act as the admin, as the lab's storage does.

use crate::kubevirt_lab::resource;
use crate::lab_events;
use crate::storage_lab::{
    CSI_DRIVER, annotation, claims_resource, has_finalizer, name, namespace, now, volumes_resource,
};
use anyhow::{Context, Result, bail};
use kube::api::{Api, ApiResource, DeleteParams, DynamicObject, Patch, PatchParams, PostParams};
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The API group.
pub const GROUP: &str = "snapshot.storage.k8s.io";
/// A VolumeSnapshotClass parameter: every CreateSnapshot of the class fails with this message (gRPC code Internal).
pub const FAIL_PARAMETER: &str = "lab.wukong.invalid/fail";
/// A VolumeSnapshotClass parameter: the driver reports a snapshot ready this many seconds after taking it.
pub const SECONDS_PARAMETER: &str = "lab.wukong.invalid/seconds-to-ready";
/// The default class annotation (`IsVolumeSnapshotClassDefaultAnnotation`: only the value "true" counts).
pub const DEFAULT_CLASS: &str = "snapshot.storage.kubernetes.io/is-default-class";
const AS_SOURCE: &str = "snapshot.storage.kubernetes.io/volumesnapshot-as-source-protection";
const BOUND: &str = "snapshot.storage.kubernetes.io/volumesnapshot-bound-protection";
const CONTENT_BOUND: &str = "snapshot.storage.kubernetes.io/volumesnapshotcontent-bound-protection";
const PVC_AS_SOURCE: &str = "snapshot.storage.kubernetes.io/pvc-as-source-protection";
const BEING_DELETED: &str = "snapshot.storage.kubernetes.io/volumesnapshot-being-deleted";
/// The common controller's Events' source.
const CONTROLLER: &str = "snapshot-controller";
/// How often the controllers look again without a change (upstream requeues failures from 1 s).
const RESYNC: Duration = Duration::from_millis(500);

pub fn snapshots_resource() -> ApiResource {
    resource("VolumeSnapshot", GROUP, "v1", "volumesnapshots")
}

pub fn contents_resource() -> ApiResource {
    resource("VolumeSnapshotContent", GROUP, "v1", "volumesnapshotcontents")
}

pub fn classes_resource() -> ApiResource {
    resource("VolumeSnapshotClass", GROUP, "v1", "volumesnapshotclasses")
}

/// Snapshots in the lab. Stops its controllers on drop.
pub struct SnapshotLab {
    admin: kube::Client,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for SnapshotLab {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl SnapshotLab {
    /// Installs the CRDs in the cluster of `admin` and starts the controllers.
    pub async fn start(admin: kube::Client) -> Result<Self> {
        let text = std::fs::read_to_string(crate::workspace_root().join("tests/kubevirt/snapshot-crds.yaml"))?;
        let crds: Vec<Value> = serde_saphyr::from_multiple(&text).context("tests/kubevirt/snapshot-crds.yaml")?;
        // Created as kubectl apply creates, not server-side applied: 1.20's typed patch refuses the CEL rules its
        // schema does not know, where a create drops them as it drops CDI's.
        for crd in &crds {
            crate::cluster::apply(&admin, crd).await?;
        }
        let started = Instant::now();
        for r in [snapshots_resource(), contents_resource(), classes_resource()] {
            while let Err(e) = Api::<DynamicObject>::all_with(admin.clone(), &r).list(&Default::default()).await {
                if started.elapsed() > Duration::from_secs(30) {
                    return Err(e).with_context(|| format!("the {} are not served", r.plural));
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        let controllers = Arc::new(Controllers {
            client: admin.clone(),
            events: lab_events::Once::new(admin.clone()),
            taken: Mutex::new(BTreeMap::new()),
        });
        let resources = vec![snapshots_resource(), contents_resource(), claims_resource(), volumes_resource()];
        let task = tokio::spawn(async move {
            crate::resync_loop("lab snapshots", &controllers.client.clone(), resources, RESYNC, || controllers.sync())
                .await
        });
        Ok(Self { admin, task })
    }

    /// A VolumeSnapshotClass of the lab's CSI driver with `deletionPolicy` and `parameters`; with `default`, the
    /// driver's default class.
    pub async fn add_class(&self, name: &str, deletion_policy: &str, parameters: Value, default: bool) -> Result<()> {
        let mut class = json!({
            "apiVersion": format!("{GROUP}/v1"), "kind": "VolumeSnapshotClass", "metadata": {"name": name},
            "driver": CSI_DRIVER, "deletionPolicy": deletion_policy, "parameters": parameters,
        });
        if default {
            class["metadata"]["annotations"] = json!({DEFAULT_CLASS: "true"});
        }
        Api::<DynamicObject>::all_with(self.admin.clone(), &classes_resource())
            .create(&PostParams::default(), &serde_json::from_value(class)?)
            .await
            .with_context(|| format!("creating VolumeSnapshotClass {name}"))?;
        Ok(())
    }
}

/// What the provisioner restores claim `claim` from (its `dataSource`, a VolumeSnapshot) for a volume of `bytes`
/// of driver `driver`: the snapshot's copy, once external-provisioner's `getSnapshotSource` would accept it; else
/// its error, in its words.
pub(crate) async fn restore_source(
    client: &kube::Client,
    claim: &DynamicObject,
    driver: &str,
    bytes: u64,
) -> Result<PathBuf, String> {
    let namespace = claim.metadata.namespace.clone().unwrap_or_default();
    let vs = claim.data["spec"]["dataSource"]["name"].as_str().unwrap_or_default().to_string();
    let snapshots = Api::<DynamicObject>::namespaced_with(client.clone(), &namespace, &snapshots_resource());
    let snapshot = snapshots.get(&vs).await.map_err(|e| format!("error getting snapshot {vs} from api server: {e}"))?;
    if snapshot.metadata.deletion_timestamp.is_some() {
        return Err(format!("snapshot {vs} is being deleted"));
    }
    let status = &snapshot.data["status"];
    let Some(bound) = status["boundVolumeSnapshotContentName"].as_str() else {
        return Err(format!("snapshot {vs} not bound"));
    };
    let contents = Api::<DynamicObject>::all_with(client.clone(), &contents_resource());
    let content =
        contents.get(bound).await.map_err(|_| format!("error getting snapshotcontent {bound} for snapshot {vs}"))?;
    let reference = &content.data["spec"]["volumeSnapshotRef"];
    if reference["uid"].as_str() != snapshot.metadata.uid.as_deref()
        || reference["namespace"] != namespace.as_str()
        || reference["name"] != vs.as_str()
    {
        return Err(format!("snapshotcontent {bound} for snapshot {vs} is bound to a different snapshot"));
    }
    if content.data["spec"]["driver"] != driver {
        let class = claim.data["spec"]["storageClassName"].as_str().unwrap_or_default();
        return Err(format!(
            "snapshotcontent {bound} for snapshot {vs} is not handled by CSI driver of StorageClass {class}"
        ));
    }
    if status["readyToUse"] != true {
        return Err(format!("snapshot {vs} is not Ready"));
    }
    let Some(handle) = content.data["status"]["snapshotHandle"].as_str() else {
        return Err(format!("snapshot handle {vs} is not available"));
    };
    if let Some(size) = status["restoreSize"].as_str() {
        let restore = wukong_operator::validate::quantity_bytes(size).unwrap_or(0);
        if bytes < restore {
            return Err(format!(
                "requested volume size {bytes} is less than the size {restore} for the source snapshot {vs}"
            ));
        }
    }
    Ok(PathBuf::from(handle))
}

/// The common controller and the lab driver's sidecar.
struct Controllers {
    client: kube::Client,
    /// Upstream does not repeat an Event for an error it already set.
    events: lab_events::Once,
    /// Content name → when the driver took its snapshot (for [`SECONDS_PARAMETER`]).
    taken: Mutex<BTreeMap<String, Instant>>,
}

/// Everything a pass reads.
struct World {
    snapshots: Vec<DynamicObject>,
    contents: Vec<DynamicObject>,
    classes: Vec<DynamicObject>,
    claims: Vec<DynamicObject>,
    volumes: Vec<DynamicObject>,
}

/// The content a dynamic snapshot gets (`GetDynamicSnapshotContentNameForSnapshot`).
fn content_name(snapshot: &DynamicObject) -> String {
    format!("snapcontent-{}", snapshot.metadata.uid.clone().unwrap_or_default())
}

/// `resource.NewQuantity(bytes, BinarySI)` as a string: the largest binary suffix that divides it.
fn binary_quantity(bytes: u64) -> String {
    for (suffix, unit) in
        [("Ei", 1u64 << 60), ("Pi", 1 << 50), ("Ti", 1 << 40), ("Gi", 1 << 30), ("Mi", 1 << 20), ("Ki", 1 << 10)]
    {
        if bytes >= unit && bytes.is_multiple_of(unit) {
            return format!("{}{suffix}", bytes / unit);
        }
    }
    bytes.to_string()
}

/// An RFC 3339 time from nanoseconds since the epoch (`time.Unix(0, ns)` as a `metav1.Time`: seconds only).
fn rfc3339(nanoseconds: i64) -> String {
    let at = k8s_openapi::jiff::Timestamp::from_nanosecond(i128::from(nanoseconds)).unwrap_or_default();
    format!("{at:.0}")
}

impl Controllers {
    async fn sync(&self) -> Result<()> {
        let all = |r: ApiResource| Api::<DynamicObject>::all_with(self.client.clone(), &r);
        let world = World {
            snapshots: all(snapshots_resource()).list(&Default::default()).await?.items,
            contents: all(contents_resource()).list(&Default::default()).await?.items,
            classes: all(classes_resource()).list(&Default::default()).await?.items,
            claims: all(claims_resource()).list(&Default::default()).await?.items,
            volumes: all(volumes_resource()).list(&Default::default()).await?.items,
        };
        for content in &world.contents {
            if let Err(e) = self.sync_content(content, &world).await {
                tracing::debug!(content = name(content), error = %e, "lab snapshots: content sync failed");
            }
        }
        for snapshot in &world.snapshots {
            if let Err(e) = self.sync_snapshot(snapshot, &world).await {
                tracing::debug!(snapshot = name(snapshot), error = %e, "lab snapshots: snapshot sync failed");
            }
        }
        for claim in world.claims.iter().filter(|c| has_finalizer(c, PVC_AS_SOURCE)) {
            if let Err(e) = self.release_claim(claim, &world).await {
                tracing::debug!(claim = name(claim), error = %e, "lab snapshots: claim finalizer");
            }
        }
        Ok(())
    }

    fn snapshots(&self, namespace: &str) -> Api<DynamicObject> {
        Api::namespaced_with(self.client.clone(), namespace, &snapshots_resource())
    }

    fn contents(&self) -> Api<DynamicObject> {
        Api::all_with(self.client.clone(), &contents_resource())
    }

    /// `updateSnapshotErrorStatusWithEvent`: a Warning Event on the snapshot and the same message in its
    /// `status.error` (with `readyToUse: false` when `not_ready`), unless that message is already set.
    async fn refuse(&self, snapshot: &DynamicObject, reason: &str, message: &str, not_ready: bool) -> Result<()> {
        if snapshot.data["status"]["error"]["message"] == message {
            return Ok(());
        }
        self.events.record(&snapshots_resource(), snapshot, "Warning", reason, message, CONTROLLER).await?;
        let mut next = snapshot.clone();
        let status = next.data["status"].as_object().cloned().unwrap_or_default();
        let mut status = Value::Object(status);
        status["error"] = json!({"message": message, "time": now()});
        if not_ready {
            status["readyToUse"] = json!(false);
        }
        next.data["status"] = status;
        self.snapshots(&namespace(snapshot)).replace_status(&name(snapshot), &PostParams::default(), &next).await?;
        Ok(())
    }

    async fn sync_snapshot(&self, snapshot: &DynamicObject, world: &World) -> Result<()> {
        if snapshot.metadata.deletion_timestamp.is_some() {
            return self.delete_snapshot(snapshot, world).await;
        }
        let ns = namespace(snapshot);
        let source = &snapshot.data["spec"]["source"];
        let Some(claim_name) = source["persistentVolumeClaimName"].as_str() else {
            // Pre-provisioned snapshots are not played (see the module's documentation).
            return Ok(());
        };
        let claim = world.claims.iter().find(|c| namespace(c) == ns && name(c) == claim_name);
        // checkAndUpdateSnapshotClass.
        let class = match snapshot.data["spec"]["volumeSnapshotClassName"].as_str() {
            Some(class_name) => match world.classes.iter().find(|c| name(c) == class_name) {
                Some(class) => class,
                None => {
                    let message = format!(
                        "Failed to get snapshot class with error volumesnapshotclass.{GROUP} \"{class_name}\" not found"
                    );
                    return self.refuse(snapshot, "GetSnapshotClassFailed", &message, false).await;
                }
            },
            None => {
                return match self.default_class(snapshot, claim, world) {
                    Ok(class) => {
                        let patch = json!([{"op": "replace", "path": "/spec/volumeSnapshotClassName", "value": class}]);
                        let patch: json_patch::Patch = serde_json::from_value(patch)?;
                        self.snapshots(&ns)
                            .patch(&name(snapshot), &PatchParams::default(), &Patch::<()>::Json(patch))
                            .await?;
                        Ok(())
                    }
                    Err(why) => {
                        let message = format!("Failed to set default snapshot class with error {why}");
                        self.refuse(snapshot, "SetDefaultSnapshotClassFailed", &message, false).await
                    }
                };
            }
        };
        if !has_finalizer(snapshot, AS_SOURCE) {
            let mut next = snapshot.clone();
            next.metadata.finalizers.get_or_insert_with(Vec::new).push(AS_SOURCE.into());
            self.snapshots(&ns).replace(&name(snapshot), &PostParams::default(), &next).await?;
            return Ok(());
        }
        let content_name = content_name(snapshot);
        let Some(content) = world.contents.iter().find(|c| name(c) == content_name) else {
            return self.create_content(snapshot, claim, class, world).await;
        };
        if content.data["spec"]["deletionPolicy"] == "Delete" && !has_finalizer(snapshot, BOUND) {
            let mut next = snapshot.clone();
            next.metadata.finalizers.get_or_insert_with(Vec::new).push(BOUND.into());
            self.snapshots(&ns).replace(&name(snapshot), &PostParams::default(), &next).await?;
            return Ok(());
        }
        self.mirror(snapshot, content).await
    }

    /// `SetDefaultSnapshotClass`: the one class annotated default whose driver is the claim's volume's.
    fn default_class(
        &self,
        snapshot: &DynamicObject,
        claim: Option<&DynamicObject>,
        world: &World,
    ) -> Result<String, String> {
        let claim_name = snapshot.data["spec"]["source"]["persistentVolumeClaimName"].as_str().unwrap_or_default();
        let Some(claim) = claim else {
            return Err(format!(
                "failed to retrieve PVC {claim_name} from the lister: \"persistentvolumeclaim \\\"{claim_name}\\\" not found\""
            ));
        };
        let pv = claim.data["spec"]["volumeName"].as_str().unwrap_or_default();
        if claim.data["status"]["phase"] != "Bound" || pv.is_empty() {
            return Err(format!("the PVC {claim_name} is not yet bound to a PV, will not attempt to take a snapshot"));
        }
        let Some(volume) = world.volumes.iter().find(|v| name(v) == pv) else {
            return Err(format!(
                "failed to retrieve PV {pv} from the API server: \"persistentvolumes \\\"{pv}\\\" not found\""
            ));
        };
        let Some(driver) = volume.data["spec"]["csi"]["driver"].as_str() else {
            return Err(format!(
                "snapshotting non-CSI volumes is not supported, snapshot:{}/{}",
                namespace(snapshot),
                name(snapshot)
            ));
        };
        let defaults: Vec<String> = world
            .classes
            .iter()
            .filter(|c| annotation(c, DEFAULT_CLASS) == Some("true") && c.data["driver"] == driver)
            .map(name)
            .collect();
        match defaults.as_slice() {
            [one] => Ok(one.clone()),
            [] => Err("cannot find default snapshot class".into()),
            many => Err(format!("{} default snapshot classes were found", many.len())),
        }
    }

    /// `createSnapshotContent`: the claim's finalizer first, then the checks, then the content, its Event and the
    /// snapshot's first status.
    async fn create_content(
        &self,
        snapshot: &DynamicObject,
        claim: Option<&DynamicObject>,
        class: &DynamicObject,
        world: &World,
    ) -> Result<()> {
        let (ns, vs) = (namespace(snapshot), name(snapshot));
        let refuse = |why: String| async move {
            let message = format!("Failed to create snapshot content with error {why}");
            self.refuse(snapshot, "SnapshotContentCreationFailed", &message, true).await
        };
        let Some(claim) = claim else {
            return refuse(format!(
                "snapshot controller failed to update {vs} on API server: cannot get claim from snapshot"
            ))
            .await;
        };
        let claim_name = name(claim);
        if claim.metadata.deletion_timestamp.is_some() {
            return refuse(format!(
                "snapshot controller failed to update {claim_name} on API server: cannot add finalizer on claim because it is being deleted"
            ))
            .await;
        }
        if !has_finalizer(claim, PVC_AS_SOURCE) {
            let mut next = claim.clone();
            next.metadata.finalizers.get_or_insert_with(Vec::new).push(PVC_AS_SOURCE.into());
            Api::<DynamicObject>::namespaced_with(self.client.clone(), &ns, &claims_resource())
                .replace(&claim_name, &PostParams::default(), &next)
                .await?;
            return Ok(());
        }
        let pv = claim.data["spec"]["volumeName"].as_str().unwrap_or_default();
        if claim.data["status"]["phase"] != "Bound" || pv.is_empty() {
            return refuse(format!(
                "failed to get input parameters to create snapshot {vs}: \"the PVC {claim_name} is not yet bound to a PV, will not attempt to take a snapshot\""
            ))
            .await;
        }
        let volume = world.volumes.iter().find(|v| name(v) == pv);
        let Some(handle) = volume.and_then(|v| v.data["spec"]["csi"]["volumeHandle"].as_str()) else {
            return refuse(format!("cannot find CSI PersistentVolumeSource for volume {pv}")).await;
        };
        let mut spec = json!({
            "volumeSnapshotRef": {"kind": "VolumeSnapshot", "apiVersion": format!("{GROUP}/v1"), "namespace": ns,
                                  "name": vs, "uid": snapshot.metadata.uid, "resourceVersion": snapshot.metadata.resource_version},
            "source": {"volumeHandle": handle},
            "volumeSnapshotClassName": name(class),
            "deletionPolicy": class.data["deletionPolicy"],
            "driver": class.data["driver"],
        });
        if let Some(mode) = volume.and_then(|v| v.data["spec"]["volumeMode"].as_str()) {
            spec["sourceVolumeMode"] = json!(mode);
        }
        let content = json!({"apiVersion": format!("{GROUP}/v1"), "kind": "VolumeSnapshotContent",
                             "metadata": {"name": content_name(snapshot)}, "spec": spec});
        match self.contents().create(&PostParams::default(), &serde_json::from_value(content)?).await {
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.code == 409 => {}
            Err(e) => {
                let message = format!("Error creating volume snapshot content object for snapshot {ns}/{vs}: {e}.");
                self.events
                    .record(
                        &snapshots_resource(),
                        snapshot,
                        "Warning",
                        "CreateSnapshotContentFailed",
                        &message,
                        CONTROLLER,
                    )
                    .await?;
                return refuse(format!("snapshot controller failed to update {ns}/{vs} on API server: {e}")).await;
            }
        }
        let message = format!("Waiting for a snapshot {ns}/{vs} to be created by the CSI driver.");
        self.events.record(&snapshots_resource(), snapshot, "Normal", "CreatingSnapshot", &message, CONTROLLER).await?;
        let mut next = snapshot.clone();
        next.data["status"] = json!({"boundVolumeSnapshotContentName": content_name(snapshot), "readyToUse": false});
        self.snapshots(&ns).replace_status(&vs, &PostParams::default(), &next).await?;
        Ok(())
    }

    /// `updateSnapshotStatus`: the snapshot's status from its content's, with `SnapshotCreated` and
    /// `SnapshotReady` as they first become true.
    async fn mirror(&self, snapshot: &DynamicObject, content: &DynamicObject) -> Result<()> {
        let (ns, vs) = (namespace(snapshot), name(snapshot));
        let from = &content.data["status"];
        let mut status =
            json!({"boundVolumeSnapshotContentName": name(content), "readyToUse": from["readyToUse"] == true});
        if let Some(created) = from["creationTime"].as_i64() {
            status["creationTime"] = json!(rfc3339(created));
        }
        if let Some(size) = from["restoreSize"].as_u64() {
            status["restoreSize"] = json!(binary_quantity(size));
        }
        if !from["error"].is_null() && from["readyToUse"] != true {
            status["error"] = from["error"].clone();
        }
        let old = &snapshot.data["status"];
        if *old == status {
            return Ok(());
        }
        if old["creationTime"].is_null() && !status["creationTime"].is_null() {
            let message = format!("Snapshot {ns}/{vs} was successfully created by the CSI driver.");
            self.events
                .record(&snapshots_resource(), snapshot, "Normal", "SnapshotCreated", &message, CONTROLLER)
                .await?;
        }
        if old["readyToUse"] != true && status["readyToUse"] == true {
            let message = format!("Snapshot {ns}/{vs} is ready to use.");
            self.events
                .record(&snapshots_resource(), snapshot, "Normal", "SnapshotReady", &message, CONTROLLER)
                .await?;
        }
        let mut next = snapshot.clone();
        next.data["status"] = status;
        self.snapshots(&ns).replace_status(&vs, &PostParams::default(), &next).await?;
        Ok(())
    }

    /// A snapshot being deleted (`processSnapshotWithDeletionTimestamp`): waits while a Pending claim restores from
    /// it; marks its content being deleted; with policy Delete deletes the content and keeps `bound-protection`
    /// until the content is gone; with Retain leaves the content.
    async fn delete_snapshot(&self, snapshot: &DynamicObject, world: &World) -> Result<()> {
        let (ns, vs) = (namespace(snapshot), name(snapshot));
        let restoring = world.claims.iter().any(|c| {
            namespace(c) == ns
                && c.data["spec"]["dataSource"]["kind"] == "VolumeSnapshot"
                && c.data["spec"]["dataSource"]["name"] == vs.as_str()
                && c.data["status"]["phase"] == "Pending"
        });
        if restoring {
            return self
                .events
                .record(
                    &snapshots_resource(),
                    snapshot,
                    "Warning",
                    "SnapshotDeletePending",
                    "Snapshot is being used to restore a PVC",
                    CONTROLLER,
                )
                .await;
        }
        let bound = snapshot.data["status"]["boundVolumeSnapshotContentName"]
            .as_str()
            .map(str::to_string)
            .unwrap_or_else(|| content_name(snapshot));
        let content = world.contents.iter().find(|c| {
            name(c) == bound && c.data["spec"]["volumeSnapshotRef"]["uid"].as_str() == snapshot.metadata.uid.as_deref()
        });
        if let Some(content) = content {
            if annotation(content, BEING_DELETED).is_none() {
                let patch = json!({"metadata": {"annotations": {BEING_DELETED: "yes"}}});
                self.contents().patch(&bound, &PatchParams::default(), &Patch::Merge(&patch)).await?;
            }
            if content.data["spec"]["deletionPolicy"] == "Delete" {
                if content.metadata.deletion_timestamp.is_none() {
                    self.contents().delete(&bound, &DeleteParams::default()).await?;
                }
                return self.drop_finalizers(snapshot, &[AS_SOURCE]).await;
            }
        }
        self.drop_finalizers(snapshot, &[AS_SOURCE, BOUND]).await
    }

    async fn drop_finalizers(&self, snapshot: &DynamicObject, finalizers: &[&str]) -> Result<()> {
        if !finalizers.iter().any(|f| has_finalizer(snapshot, f)) {
            return Ok(());
        }
        let mut next = snapshot.clone();
        next.metadata.finalizers.get_or_insert_with(Vec::new).retain(|f| !finalizers.contains(&f.as_str()));
        self.snapshots(&namespace(snapshot)).replace(&name(snapshot), &PostParams::default(), &next).await?;
        Ok(())
    }

    /// `checkandRemovePVCFinalizer`: the claim's finalizer goes once no snapshot of it in its namespace is unready.
    async fn release_claim(&self, claim: &DynamicObject, world: &World) -> Result<()> {
        let in_use = world.snapshots.iter().any(|s| {
            namespace(s) == namespace(claim)
                && s.data["spec"]["source"]["persistentVolumeClaimName"].as_str() == claim.metadata.name.as_deref()
                && s.data["status"]["readyToUse"] != true
                && s.metadata.deletion_timestamp.is_none()
        });
        if in_use {
            return Ok(());
        }
        let mut next = claim.clone();
        next.metadata.finalizers.get_or_insert_with(Vec::new).retain(|f| f != PVC_AS_SOURCE);
        Api::<DynamicObject>::namespaced_with(self.client.clone(), &namespace(claim), &claims_resource())
            .replace(&name(claim), &PostParams::default(), &next)
            .await?;
        Ok(())
    }

    /// The common controller's finalizer on a bound content, then the lab driver's sidecar: CreateSnapshot until
    /// ready, and DeleteSnapshot for a content deleted with its snapshot.
    async fn sync_content(&self, content: &DynamicObject, world: &World) -> Result<()> {
        let vsc = name(content);
        if content.metadata.deletion_timestamp.is_some() {
            if content.data["spec"]["driver"] == CSI_DRIVER && has_finalizer(content, CONTENT_BOUND) {
                if let Some(handle) = content.data["status"]["snapshotHandle"].as_str()
                    && content.data["spec"]["deletionPolicy"] == "Delete"
                {
                    let _ = std::fs::remove_file(handle);
                }
                let mut next = content.clone();
                next.metadata.finalizers.get_or_insert_with(Vec::new).retain(|f| f != CONTENT_BOUND);
                self.contents().replace(&vsc, &PostParams::default(), &next).await?;
            }
            return Ok(());
        }
        if !content.data["spec"]["volumeSnapshotRef"]["uid"].is_null() && !has_finalizer(content, CONTENT_BOUND) {
            let patch = json!({"metadata": {"finalizers": [CONTENT_BOUND]}});
            self.contents().patch(&vsc, &PatchParams::default(), &Patch::Merge(&patch)).await?;
            return Ok(());
        }
        if content.data["spec"]["driver"] != CSI_DRIVER || content.data["status"]["readyToUse"] == true {
            return Ok(());
        }
        let Some(handle) = content.data["spec"]["source"]["volumeHandle"].as_str() else { return Ok(()) };
        let component = format!("csi-snapshotter {CSI_DRIVER}");
        let class_name = content.data["spec"]["volumeSnapshotClassName"].as_str().unwrap_or_default();
        let Some(class) = world.classes.iter().find(|c| name(c) == class_name) else {
            bail!("failed to take snapshot {vsc} without a snapshot class");
        };
        let first = content.data["status"].is_null();
        let taken = match self.take(content, handle, class) {
            Ok(taken) => taken,
            Err(why) => {
                let (prefix, reason) = if first {
                    ("Failed to create snapshot", "SnapshotCreationFailed")
                } else {
                    ("Failed to check and update snapshot content", "SnapshotContentCheckandUpdateFailed")
                };
                let message = format!("{prefix}: failed to take snapshot of the volume {handle}: \"{why}\"");
                if content.data["status"]["error"]["message"] == message.as_str() {
                    return Ok(());
                }
                self.events.record(&contents_resource(), content, "Warning", reason, &message, &component).await?;
                let time = now();
                let status = json!({"status": {"readyToUse": false, "error": {"message": message, "time": time}}});
                self.contents().patch_status(&vsc, &PatchParams::default(), &Patch::Merge(&status)).await?;
                return Ok(());
            }
        };
        let (path, created, ready, size) = taken;
        let status = json!({"status": {"snapshotHandle": path, "creationTime": created, "readyToUse": ready,
                                       "restoreSize": size, "error": null}});
        if content.data["status"]["readyToUse"] != ready || content.data["status"]["snapshotHandle"].is_null() {
            self.contents().patch_status(&vsc, &PatchParams::default(), &Patch::Merge(&status)).await?;
        }
        Ok(())
    }

    /// The lab driver's CreateSnapshot (idempotent, as CSI's is): the volume's image copied beside the volume once;
    /// (copy, creation time in ns, ready, size), or the gRPC error.
    fn take(
        &self,
        content: &DynamicObject,
        handle: &str,
        class: &DynamicObject,
    ) -> Result<(String, i64, bool, u64), String> {
        if let Some(message) = class.data["parameters"][FAIL_PARAMETER].as_str() {
            return Err(format!("rpc error: code = Internal desc = {message}"));
        }
        let volume = Path::new(handle);
        let image = if volume.is_dir() { volume.join("disk.img") } else { volume.to_path_buf() };
        let uid = content.data["spec"]["volumeSnapshotRef"]["uid"].as_str().unwrap_or_default();
        let copy = volume.with_file_name(format!("snapshot-{uid}"));
        let mut taken = self.taken.lock().unwrap();
        let at = *taken.entry(name(content)).or_insert_with(|| {
            // A failed copy leaves no snapshot: the next call copies again.
            let _ = std::fs::copy(&image, &copy);
            Instant::now()
        });
        let size = std::fs::metadata(&copy).map_err(|e| {
            taken.remove(&name(content));
            format!("rpc error: code = Internal desc = cannot copy {}: {e}", image.display())
        })?;
        let seconds = class.data["parameters"][SECONDS_PARAMETER].as_str().and_then(|s| s.parse().ok()).unwrap_or(0);
        let ready = at.elapsed() >= Duration::from_secs(seconds);
        let created = content.data["status"]["creationTime"]
            .as_i64()
            .unwrap_or_else(|| k8s_openapi::jiff::Timestamp::now().as_nanosecond() as i64);
        Ok((copy.to_string_lossy().into_owned(), created, ready, size.len()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn restore_sizes_are_binary_quantities_as_resource_new_quantity_writes_them() {
        assert_eq!(binary_quantity(1 << 30), "1Gi");
        assert_eq!(binary_quantity(64 << 20), "64Mi");
        assert_eq!(binary_quantity(1536), "1536");
        assert_eq!(binary_quantity(3 << 10), "3Ki");
        assert_eq!(binary_quantity(0), "0");
    }

    #[test]
    fn the_shipped_crds_parse_and_are_the_three_of_snapshot_storage_k8s_io() -> Result<()> {
        let text = std::fs::read_to_string(crate::workspace_root().join("tests/kubevirt/snapshot-crds.yaml"))?;
        let crds: Vec<Value> = serde_saphyr::from_multiple(&text)?;
        let names: Vec<&str> = crds.iter().filter_map(|c| c["metadata"]["name"].as_str()).collect();
        assert_eq!(
            names,
            ["volumesnapshotclasses", "volumesnapshotcontents", "volumesnapshots"].map(|p| format!("{p}.{GROUP}"))
        );
        Ok(())
    }
}
