//! Kubernetes Events, each an object of its own.

use k8s_openapi::api::core::v1::ObjectReference;
use kube::runtime::events::{Event, Recorder, Reporter};

/// Publishes Events as one reporter (`reportingController`, `reportingInstance`).
///
/// kube's [`Recorder`] keeps every Event it made for six minutes, to fold a later one with the same reference and
/// reason into a series: the series keeps the first Event's note, so a second refusal for another reason would be
/// shown with the first reason. The operator's references carry the object's `resourceVersion`, so nothing folds,
/// and the cache only held memory: with 10,000 objects converging, an Event each. A recorder per Event has none.
#[derive(Clone)]
pub struct Events {
    client: kube::Client,
    reporter: Reporter,
}

impl Events {
    pub fn new(client: kube::Client, controller: String, instance: &str) -> Self {
        Self { client, reporter: Reporter { controller, instance: Some(instance.to_string()) } }
    }

    /// Creates `event` about `reference`.
    pub async fn publish(&self, event: &Event, reference: &ObjectReference) -> Result<(), kube::Error> {
        Recorder::new(self.client.clone(), self.reporter.clone()).publish(event, reference).await
    }
}
