//! A review's body checked against the API server before the guard acts on it. When the webhook does not require
//! the API server's client certificate (managed clusters cannot give it one), anyone who reaches the port can POST
//! an AdmissionReview; nothing in its body is taken on trust. Before a guest is asked to release anything, the
//! live object and its namespace are read: the API server would have sent this review only if they opted in, only
//! if the object is still at the review's `oldObject` version, and only for volumes the stored object has.

use crate::guard::{GUARD_DISABLED, GUARD_LABEL, Removal, guarded, spec_of};
use k8s_openapi::api::core::v1::Namespace;
use kube::ResourceExt;
use kube::api::{Api, DynamicObject};
use kube::core::admission::AdmissionRequest;
use serde_json::Value;
use wukong_controller_client::kubevirt::{vm_resource, vmi_resource};

/// Why a review does not match the live objects; each is a denial that names the check and releases nothing.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error(
        "{object} does not exist: the review is not of a stored object (forged, or the object was deleted); \
         nothing was released"
    )]
    Missing { object: String },
    #[error(
        "{object} has not opted in to the guard (label {GUARD_LABEL}=enabled on it or on its namespace, and not \
         {GUARD_LABEL}={GUARD_DISABLED} on it), so the API server sends no review of it: this one did not come from \
         the API server; nothing was released"
    )]
    NotOptedIn { object: String },
    #[error(
        "{object} is stored at resourceVersion {live}, the review's oldObject is at {review}: the review is not of \
         the stored object (forged, or the object changed while it was reviewed: retry the update); nothing was \
         released"
    )]
    Stale { object: String, live: String, review: String },
    #[error(
        "volume {volume} of the review's oldObject is not in the stored {object} as the review has it: the review \
         is not of the stored object; nothing was released"
    )]
    NotStored { object: String, volume: String },
    #[error("cannot read {what} to check the review against it ({source}); denied (fail safe)")]
    Read { what: String, source: kube::Error },
}

/// Checks an untrusted review of a VM or VMI against the live objects, before `removals` are released.
pub async fn check(
    client: &kube::Client,
    request: &AdmissionRequest<DynamicObject>,
    removals: &[Removal],
) -> Result<(), VerifyError> {
    let kind = request.kind.kind.as_str();
    let ns = request.namespace.clone().unwrap_or_default();
    let object = format!("{kind} {ns}/{}", request.name);
    // From the kind the planner accepted, not from the body's `resource`, which is the caller's word.
    let resource = if kind == "VirtualMachine" { vm_resource() } else { vmi_resource() };
    let read = |what: &str| {
        let what = what.to_string();
        move |source| VerifyError::Read { what, source }
    };
    let live = Api::<DynamicObject>::namespaced_with(client.clone(), &ns, &resource)
        .get_opt(&request.name)
        .await
        .map_err(read(&object))?
        .ok_or_else(|| VerifyError::Missing { object: object.clone() })?;
    let namespace = Api::<Namespace>::all(client.clone()).get(&ns).await.map_err(read(&format!("namespace {ns}")))?;
    if !guarded(live.labels(), namespace.labels()) {
        return Err(VerifyError::NotOptedIn { object });
    }
    let old = request.old_object.as_ref();
    let review = old.and_then(|o| o.metadata.resource_version.clone()).unwrap_or_default();
    let stored = live.metadata.resource_version.clone().unwrap_or_default();
    if review != stored || old.and_then(|o| o.metadata.uid.as_ref()) != live.metadata.uid.as_ref() {
        return Err(VerifyError::Stale { object, live: stored, review });
    }
    let volumes = |o: &DynamicObject| spec_of(o, kind)["volumes"].as_array().cloned().unwrap_or_default();
    let (stored, reviewed) = (volumes(&live), old.map(volumes).unwrap_or_default());
    for Removal { volume, .. } in removals {
        let find = |list: &[Value]| list.iter().find(|v| v["name"] == volume.as_str()).cloned();
        if find(&stored).is_none() || find(&stored) != find(&reviewed) {
            return Err(VerifyError::NotStored { object, volume: volume.clone() });
        }
    }
    Ok(())
}
