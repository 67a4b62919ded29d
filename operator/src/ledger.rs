//! What the guard released, kept in the cluster so that any replica can finish it. Before the guard asks a guest
//! to release a disk for a review, it records the release in a ConfigMap in the operator's namespace; a release
//! the review then refused is forgotten at once. The leader's [`crate::release_watch`] reads every record: once
//! the update was stored (the volume left the spec, or changed) or the guest has the disk again, the record goes;
//! a disk still released while its volume stays in the spec is given back after the grace period, whether or not
//! the object is still opted in.

use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// The label every record carries (and the only ConfigMaps the operator lists).
pub const RECORD_LABEL: &str = "vm.novasphere.dev/guard-release";
/// The key of a record's data.
const KEY: &str = "release.json";

/// One disk released for a review.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Release {
    pub namespace: String,
    /// The reviewed object: `VirtualMachine` or `VirtualMachineInstance`, and its name.
    pub kind: String,
    pub name: String,
    /// The VMI whose guest released the disk.
    pub vmi: String,
    pub volume: String,
    pub serial: String,
    /// The volume as the reviewed object had it (JSON): the update was stored once the spec no longer has it so.
    pub definition: serde_json::Value,
    /// Who asked, as the review says.
    pub user: String,
}

impl Release {
    /// The record's name: one per guest disk, so the API server's second call of a review rewrites the same one.
    pub fn record_name(&self) -> String {
        format!("wukong-release-{:016x}", fnv1a(&format!("{}/{}/{}", self.namespace, self.vmi, self.serial)))
    }
}

/// FNV-1a, 64 bits: a stable name from any length of input (std's hasher may change between Rust releases, and
/// replicas of two versions share these records during a rollout). Not for security: names only.
fn fnv1a(text: &str) -> u64 {
    text.bytes().fold(0xcbf2_9ce4_8422_2325, |hash, byte| (hash ^ u64::from(byte)).wrapping_mul(0x0000_0100_0000_01b3))
}

/// Why the ledger could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    #[error("cannot {action} the guard's release record {name} in namespace {namespace}: {source}")]
    Api { action: &'static str, name: String, namespace: String, source: kube::Error },
}

/// The records, in one namespace.
#[derive(Clone)]
pub struct Ledger {
    api: Api<ConfigMap>,
    namespace: String,
}

impl Ledger {
    pub fn new(client: kube::Client, namespace: &str) -> Self {
        Self { api: Api::namespaced(client, namespace), namespace: namespace.to_string() }
    }

    fn error(&self, action: &'static str, name: &str) -> impl FnOnce(kube::Error) -> LedgerError {
        let (name, namespace) = (name.to_string(), self.namespace.clone());
        move |source| LedgerError::Api { action, name, namespace, source }
    }

    /// Records a release (again: the latest review's record replaces an earlier one of the same disk).
    pub async fn record(&self, release: &Release) -> Result<(), LedgerError> {
        let name = release.record_name();
        let mut map = ConfigMap::default();
        map.metadata.name = Some(name.clone());
        map.metadata.labels = Some(BTreeMap::from([(RECORD_LABEL.to_string(), "true".to_string())]));
        let text = serde_json::to_string(release).expect("a release serialises");
        map.data = Some(BTreeMap::from([(KEY.to_string(), text)]));
        match self.api.create(&PostParams::default(), &map).await {
            Err(kube::Error::Api(s)) if s.code == 409 => {
                let current = self.api.get(&name).await.map_err(self.error("read", &name))?;
                map.metadata.resource_version = current.metadata.resource_version;
                self.api
                    .replace(&name, &PostParams::default(), &map)
                    .await
                    .map(drop)
                    .map_err(self.error("replace", &name))
            }
            result => result.map(drop).map_err(self.error("create", &name)),
        }
    }

    /// Forgets a release (done, refused or given back); an absent record is already forgotten.
    pub async fn forget(&self, release: &Release) -> Result<(), LedgerError> {
        let name = release.record_name();
        match self.api.delete(&name, &DeleteParams::default()).await {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
            Err(e) => Err(self.error("delete", &name)(e)),
        }
    }

    /// Every recorded release; a record that cannot be read is logged and skipped (it names no disk to act on).
    pub async fn releases(&self) -> Result<Vec<Release>, LedgerError> {
        let list = self
            .api
            .list(&ListParams::default().labels(&format!("{RECORD_LABEL}=true")))
            .await
            .map_err(self.error("list", "*"))?;
        Ok(list
            .items
            .into_iter()
            .filter_map(|map| {
                let text = map.data.as_ref().and_then(|d| d.get(KEY))?;
                serde_json::from_str(text)
                    .inspect_err(
                        |e| tracing::warn!(record = ?map.metadata.name, error = %e, "an unreadable release record"),
                    )
                    .ok()
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_is_named_by_its_guest_disk_alone() {
        let release = Release {
            namespace: "prod".into(),
            kind: "VirtualMachine".into(),
            name: "pg-0".into(),
            vmi: "pg-0".into(),
            volume: "data".into(),
            serial: "pg-data".into(),
            definition: serde_json::json!({"name": "data"}),
            user: "alice".into(),
        };
        let name = release.record_name();
        assert!(name.starts_with("wukong-release-") && name.len() == 31, "{name}");
        let other_user = Release { user: "bob".into(), ..release.clone() };
        assert_eq!(other_user.record_name(), name, "the same disk, the same record");
        let other_disk = Release { serial: "pg-wal".into(), ..release };
        assert_ne!(other_disk.record_name(), name);
        // FNV-1a's published test vector: the name must not change between builds.
        assert_eq!(fnv1a("a"), 0xaf63_dc4c_8601_ec8c);
    }
}
