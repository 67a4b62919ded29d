//! Core Events as the lab's stand-ins for Kubernetes' and KubeVirt's controllers record them (client-go's event
//! recorder: `involvedObject`, `reason`, `message`, `type` and `source.component`, in the object's namespace, or in
//! `default` for a cluster-scoped object).

use crate::kubevirt_lab::resource;
use anyhow::Result;
use kube::api::{Api, ApiResource, DynamicObject, PostParams};
use serde_json::json;
use std::collections::BTreeSet;
use std::sync::Mutex;

/// A lab controller's Event recorder: each (object UID, reason, message) recorded once, as client-go's recorder
/// aggregates a repeated Event into one object and controllers do not repeat an error they already reported.
pub(crate) struct Once {
    client: kube::Client,
    recorded: Mutex<BTreeSet<(String, String, String)>>,
}

impl Once {
    /// Records as `client`.
    pub(crate) fn new(client: kube::Client) -> Self {
        Self { client, recorded: Mutex::new(BTreeSet::new()) }
    }

    /// [`record`], unless this object already has this Event.
    pub(crate) async fn record(
        &self,
        of: &ApiResource,
        object: &DynamicObject,
        type_: &str,
        reason: &str,
        message: &str,
        component: &str,
    ) -> Result<()> {
        let key = (object.metadata.uid.clone().unwrap_or_default(), reason.to_string(), message.to_string());
        if !self.recorded.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).insert(key) {
            return Ok(());
        }
        record(&self.client, of, object, type_, reason, message, component).await
    }
}

/// Records an Event about `object`, of kind `of` (a listed object does not say its kind), as `client`, from
/// `component`.
pub(crate) async fn record(
    client: &kube::Client,
    of: &ApiResource,
    object: &DynamicObject,
    type_: &str,
    reason: &str,
    message: &str,
    component: &str,
) -> Result<()> {
    let (api_version, kind) = (&of.api_version, &of.kind);
    let name = object.metadata.name.clone().unwrap_or_default();
    let namespace = object.metadata.namespace.clone();
    let events = Api::<DynamicObject>::namespaced_with(
        client.clone(),
        namespace.as_deref().unwrap_or("default"),
        &resource("Event", "", "v1", "events"),
    );
    // client-go's recorder names an Event after its object and the time in nanoseconds, in hexadecimal
    // (`makeEvent`): names sort as the Events happened.
    let now = k8s_openapi::jiff::Timestamp::now();
    let event = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Event", "metadata": {"name": format!("{name}.{:x}", now.as_nanosecond())},
        "involvedObject": {"apiVersion": api_version, "kind": kind, "name": name, "namespace": namespace,
                           "uid": object.metadata.uid},
        "reason": reason, "message": message, "type": type_, "source": {"component": component},
        "firstTimestamp": format!("{now:.0}"), "lastTimestamp": format!("{now:.0}"), "count": 1,
    }))?;
    events.create(&PostParams::default(), &event).await?;
    Ok(())
}

/// The Events about object `name` in namespace `namespace` (`default` for a cluster-scoped object), oldest first, as
/// (type, reason, message).
pub async fn about(client: &kube::Client, namespace: &str, name: &str) -> Result<Vec<(String, String, String)>> {
    let events =
        Api::<DynamicObject>::namespaced_with(client.clone(), namespace, &resource("Event", "", "v1", "events"));
    let text = |e: &DynamicObject, key: &str| e.data[key].as_str().unwrap_or_default().to_string();
    let mut found: Vec<DynamicObject> = events
        .list(&Default::default())
        .await?
        .items
        .into_iter()
        .filter(|e| e.data["involvedObject"]["name"] == name)
        .collect();
    // Recorded by the lab (and by client-go), an Event's name ends in the time it happened.
    found.sort_by_key(|e| e.metadata.name.as_deref().and_then(|n| n.rsplit_once('.')).map(|(_, t)| t.to_string()));
    Ok(found.iter().map(|e| (text(e, "type"), text(e, "reason"), text(e, "message"))).collect())
}
