//! Snapshot before detach (`detachOptions.snapshot`): a CSI `VolumeSnapshot` (`snapshot.storage.k8s.io/v1`) of a
//! disk's claim, taken by the detach between the guest's release of the disk and the unplug (an [`UnplugGate`]).
//! The guest released the disk, so its filesystems are flushed and unmounted and nothing in the guest can write to
//! it: the copy is consistent. The unplug waits until the snapshot is ready to use; a snapshot that fails gives the
//! disk back to the guest, and the detach is retried with backoff like any refusal.
//!
//! A snapshot holds the disk's last content only if the guest kept the disk released from before the snapshot was
//! taken until the unplug. Given back in between (the guard's release watch, a veto, an agent restart that undid the
//! release), the guest may have written to it. So a snapshot records the release it captured (the agent's
//! `released_at`: one clock, the guest's), and one of an earlier release is deleted and taken again.
//!
//! Its name is fixed for the detach (the name asked for, or the claim's and the moment the removal was first seen),
//! so that a detach resumed by a restarted operator finds it. A snapshot of that name not taken by this detach is
//! never touched: the detach is refused, naming it.

use crate::crd::{SnapshotOptions, SnapshotStatus, VolumeStatus, Wukong};
use crate::reconcile::disk_labels;
use kube::ResourceExt;
use kube::api::{Api, ApiResource, DeleteParams, DynamicObject, PostParams};
use serde_json::{Value, json};
use std::sync::Mutex;
use std::time::{Duration, Instant};
use wukong_controller_client::agent_client::AgentClient;
use wukong_controller_client::companion::{Gate, UnplugGate};
use wukong_proto::v1::DiskState;

/// The annotation naming the detach a snapshot was taken for: `<Wukong UID>/<disk>/<removal first seen>`.
pub const DETACH_ANNOTATION: &str = "vm.novasphere.dev/snapshot-of-detach";
/// The annotation naming the release a snapshot captured: the agent's `released_at` (`forced` for a forced detach,
/// whose snapshot is only crash-consistent).
pub const RELEASE_ANNOTATION: &str = "vm.novasphere.dev/snapshot-of-release";
/// How long one pass waits for a snapshot to become ready before it lets the reconcile go (the disk stays released
/// and plugged; the next pass goes on waiting).
const READY_WAIT: Duration = Duration::from_secs(20);
const POLL: Duration = Duration::from_millis(500);

/// The CSI snapshot API's `VolumeSnapshot`.
pub fn volume_snapshot_resource() -> ApiResource {
    ApiResource {
        group: "snapshot.storage.k8s.io".into(),
        version: "v1".into(),
        api_version: "snapshot.storage.k8s.io/v1".into(),
        kind: "VolumeSnapshot".into(),
        plural: "volumesnapshots".into(),
    }
}

/// The name of a detach's snapshot: the one asked for, else `<claim>-<unix time the removal was first seen>`.
pub fn snapshot_name(asked: Option<&str>, claim: &str, removal_since: Option<&str>) -> String {
    if let Some(name) = asked {
        return name.to_string();
    }
    let since = removal_since.and_then(|s| s.parse::<k8s_openapi::jiff::Timestamp>().ok()).map(|t| t.as_second());
    format!("{claim}-{}", since.unwrap_or_default())
}

/// What the snapshot of one detach is.
pub struct SnapshotRequest {
    pub namespace: String,
    pub name: String,
    pub claim: String,
    pub class: Option<String>,
    /// [`DETACH_ANNOTATION`]'s value.
    pub detach: String,
    /// The labels it gets (the operator's, and the `Wukong` and disk it was taken for).
    pub labels: Value,
    /// The detach is forced: the guest did not release the disk.
    pub forced: bool,
}

impl SnapshotRequest {
    /// The snapshot `asked` for the detach of disk `status` of `wukong`, in namespace `ns`.
    pub fn for_detach(asked: &SnapshotOptions, status: &VolumeStatus, wukong: &Wukong, ns: &str, forced: bool) -> Self {
        let since = status.removal_since.as_deref();
        Self {
            namespace: ns.to_string(),
            name: snapshot_name(asked.name.as_deref(), &status.pvc_name, since),
            claim: status.pvc_name.clone(),
            class: asked.volume_snapshot_class_name.clone(),
            detach: format!("{}/{}/{}", wukong.uid().unwrap_or_default(), status.name, since.unwrap_or_default()),
            labels: disk_labels(wukong, &status.name),
            forced,
        }
    }
}

/// The gate that takes a detach's snapshot, and the snapshot as it last saw it.
pub struct SnapshotGate<'a> {
    api: Api<DynamicObject>,
    agent: &'a AgentClient,
    request: SnapshotRequest,
    seen: Mutex<Option<SnapshotStatus>>,
}

impl<'a> SnapshotGate<'a> {
    pub fn new(client: kube::Client, agent: &'a AgentClient, request: SnapshotRequest) -> Self {
        let api = Api::namespaced_with(client, &request.namespace, &volume_snapshot_resource());
        Self { api, agent, request, seen: Mutex::new(None) }
    }

    /// The snapshot as the gate last saw it.
    pub fn seen(&self) -> Option<SnapshotStatus> {
        self.seen.lock().expect("never poisoned").clone()
    }

    fn place(&self) -> String {
        format!("VolumeSnapshot {}/{}", self.request.namespace, self.request.name)
    }

    /// The release a snapshot taken now captures, or why not yet.
    async fn release(&self, serial: &str) -> Result<String, Gate> {
        if self.request.forced {
            return Ok("forced".into());
        }
        match self.agent.get_disk(serial, false).await {
            Ok(d) if d.state() == DiskState::Released => {
                Ok(d.released_at.map(|t| format!("{}.{:09}", t.seconds, t.nanos)).unwrap_or_default())
            }
            Ok(_) => Err(Gate::Hold(format!("the guest reports disk '{serial}' released"))),
            Err(e) => Err(Gate::Hold(format!("the guest's agent answers ({e})"))),
        }
    }

    fn object(&self, release: &str) -> Result<DynamicObject, serde_json::Error> {
        let r = &self.request;
        let mut spec = json!({"source": {"persistentVolumeClaimName": r.claim}});
        if let Some(class) = &r.class {
            spec["volumeSnapshotClassName"] = json!(class);
        }
        serde_json::from_value(json!({
            "apiVersion": "snapshot.storage.k8s.io/v1", "kind": "VolumeSnapshot",
            "metadata": {"name": r.name, "namespace": r.namespace, "labels": r.labels,
                         "annotations": {DETACH_ANNOTATION: r.detach, RELEASE_ANNOTATION: release}},
            "spec": spec,
        }))
    }

    /// Why the API refused, as the gate answers it: a veto when asking again cannot help.
    fn refused(&self, verb: &str, e: kube::Error) -> Gate {
        let (ns, place) = (&self.request.namespace, self.place());
        match &e {
            // The API server answers for an API it does not serve with a bare `404 page not found`, which is no
            // Status: a read of it fails rather than finding nothing. A snapshot deleted meanwhile is a Status
            // `NotFound`, and is taken again.
            kube::Error::Api(s) if s.code == 404 && (verb != "delete" || s.reason != "NotFound") => {
                Gate::Veto(format!(
                    "the cluster serves no snapshot.storage.k8s.io/v1 VolumeSnapshots, so {place} cannot be taken (install \
                 the CSI external-snapshotter's CRDs and controller, or remove detachOptions.snapshot)"
                ))
            }
            kube::Error::Api(s) if s.code == 403 => Gate::Veto(format!(
                "the operator may not {verb} volumesnapshots.snapshot.storage.k8s.io in namespace {ns} ({}); the chart's \
                 role grants it",
                s.message
            )),
            kube::Error::Api(s) if s.code == 422 || s.code == 400 => {
                Gate::Veto(format!("the API server refused {place}: {}", s.message))
            }
            _ => Gate::Hold(format!("{place} can be read ({e})")),
        }
    }

    /// Takes the snapshot (or finds the one taken), and waits a while for it to be ready.
    async fn take(&self, release: &str) -> Gate {
        let place = self.place();
        let mut snapshot = match self.api.get_opt(&self.request.name).await {
            Err(e) => return self.refused("get", e),
            Ok(None) => {
                let object = match self.object(release) {
                    Ok(object) => object,
                    Err(e) => return Gate::Veto(format!("{place} cannot be written: {e}")),
                };
                match self.api.create(&PostParams::default(), &object).await {
                    Ok(created) => {
                        tracing::info!(snapshot = %place, claim = %self.request.claim, release, "taking a snapshot before the unplug");
                        created
                    }
                    Err(kube::Error::Api(s)) if s.code == 409 => return Gate::Hold(format!("{place} is read again")),
                    Err(e) => return self.refused("create", e),
                }
            }
            Ok(Some(found)) => {
                let annotation = |key: &str| found.metadata.annotations.as_ref().and_then(|a| a.get(key)).cloned();
                if annotation(DETACH_ANNOTATION).as_deref() != Some(self.request.detach.as_str()) {
                    return Gate::Veto(format!(
                        "{place} exists and was not taken by this detach; name another in \
                         detachOptions.snapshot.name, or delete it"
                    ));
                }
                if found.metadata.deletion_timestamp.is_some() {
                    return Gate::Hold(format!("{place}, of an earlier release of the disk, is deleted"));
                }
                if annotation(RELEASE_ANNOTATION).as_deref() != Some(release) {
                    // The guest had the disk back after this snapshot was taken: it may hold newer data.
                    if let Err(e) = self.api.delete(&self.request.name, &DeleteParams::background()).await {
                        return self.refused("delete", e);
                    }
                    tracing::info!(snapshot = %place, "the guest had the disk back since the snapshot: taking it again");
                    return Gate::Hold(format!(
                        "{place} is taken again (the guest had the disk back after it was taken, and may have written \
                         to it)"
                    ));
                }
                found
            }
        };
        let deadline = Instant::now() + READY_WAIT;
        loop {
            let status = status_of(&self.request.name, &snapshot.data);
            *self.seen.lock().expect("never poisoned") = Some(status.clone());
            if status.ready_to_use {
                return Gate::Open;
            }
            if let Some(error) = status.error {
                return Gate::Veto(format!("{place} failed: {error}"));
            }
            if Instant::now() >= deadline {
                return Gate::Hold(format!("{place} is ready to use"));
            }
            tokio::time::sleep(POLL).await;
            snapshot = match self.api.get_opt(&self.request.name).await {
                Ok(Some(s)) => s,
                Ok(None) => return Gate::Hold(format!("{place}, deleted by someone, is taken again")),
                Err(e) => return self.refused("get", e),
            };
        }
    }
}

impl UnplugGate for SnapshotGate<'_> {
    async fn before_unplug(&self, serial: &str) -> Gate {
        match self.release(serial).await {
            Ok(release) => self.take(&release).await,
            Err(not_yet) => not_yet,
        }
    }
}

/// A VolumeSnapshot's status as the detach reports it.
fn status_of(name: &str, object: &Value) -> SnapshotStatus {
    let status = &object["status"];
    SnapshotStatus {
        name: name.to_string(),
        ready_to_use: status["readyToUse"].as_bool().unwrap_or(false),
        restore_size: status["restoreSize"].as_str().map(str::to_string),
        error: status["error"]["message"].as_str().map(str::to_string),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_snapshot_is_named_for_its_detach() {
        assert_eq!(snapshot_name(Some("before-move"), "vm-data", None), "before-move");
        assert_eq!(snapshot_name(None, "vm-data", Some("2026-12-06T16:30:00Z")), "vm-data-1796574600");
        assert_eq!(snapshot_name(None, "vm-data", Some("not a time")), "vm-data-0");
    }

    #[test]
    fn the_status_is_read_as_the_snapshot_controller_writes_it() {
        let ready =
            json!({"status": {"readyToUse": true, "restoreSize": "64Mi", "boundVolumeSnapshotContentName": "x"}});
        assert_eq!(
            status_of("s", &ready),
            SnapshotStatus { name: "s".into(), ready_to_use: true, restore_size: Some("64Mi".into()), error: None }
        );
        let failed = json!({"status": {"readyToUse": false, "error": {"message": "Failed to create snapshot: boom", "time": "2026-12-06T16:30:00Z"}}});
        assert_eq!(status_of("s", &failed).error.as_deref(), Some("Failed to create snapshot: boom"));
        assert_eq!(status_of("s", &json!({})), SnapshotStatus { name: "s".into(), ..SnapshotStatus::default() });
    }
}
