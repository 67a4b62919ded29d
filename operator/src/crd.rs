//! The `Wukong` resource (`wukongs.vm.novasphere.dev/v1alpha1`): a VM's data disks, declared. The CRD in
//! The chart's CRD (`deploy/chart/wukong-operator/crds/wukong.yaml`, rendered into `deploy/crd.yaml`) is generated
//! from these types (`wukong-operator crd`), and a test keeps the two equal.

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The API group of the resource.
pub const GROUP: &str = "vm.novasphere.dev";

/// A VM and its data disks. Adding a disk to `disks` hot-plugs it; removing one detaches it as soon as the guest
/// lets it go. `cpu` and `memory` describe the VM the platform created: informational, since the operator does not
/// create or resize VMs.
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[kube(
    group = "vm.novasphere.dev",
    version = "v1alpha1",
    kind = "Wukong",
    namespaced,
    shortname = "wk",
    status = "WukongStatus",
    derive = "PartialEq",
    derive = "Default",
    printcolumn = r#"{"name":"VM","type":"string","jsonPath":".status.vmName"}"#,
    printcolumn = r#"{"name":"Attached","type":"integer","jsonPath":".status.attached"}"#,
    printcolumn = r#"{"name":"Blocked","type":"integer","jsonPath":".status.blocked"}"#,
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct WukongSpec {
    /// The KubeVirt VirtualMachine in this namespace whose disks these are. Default: `<name>-vm`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm_name: Option<String>,
    /// Virtual CPUs of the VM, as the platform created it (informational: the operator does not resize VMs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu: Option<u32>,
    /// Memory of the VM, a quantity such as `4Gi` (informational: the operator does not resize VMs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<String>,
    /// The VM's disks. The one named `system`, else the first, is the system disk: it is part of the VM's own
    /// definition and is never plugged, unplugged or deleted by the operator.
    #[serde(default)]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["name"]))]
    pub disks: Vec<DiskSpec>,
}

/// One disk of the VM.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DiskSpec {
    /// The disk's name: the KubeVirt volume's name and the suffix of its claim `<vm>-<name>` (a DNS label).
    pub name: String,
    /// Capacity of the claim, a Kubernetes quantity such as `10Gi`.
    pub size: String,
    /// StorageClass of the claim. Default: the cluster's default class.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage_class_name: Option<String>,
    /// Bus of the disk in the guest.
    #[serde(default)]
    pub bus: Bus,
    /// Serial the guest sees, its identity for the guest agent. Default: the disk's name (at most 20
    /// characters of a-z, 0-9, '.', '_' and '-').
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial: Option<String>,
    /// What a removal of this disk from `disks` may do. Recorded in status while the disk is listed: the options
    /// in force for a removal are the last ones seen.
    #[serde(default)]
    pub detach_options: DetachOptions,
}

/// The bus of a data disk.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Bus {
    #[default]
    Scsi,
    Virtio,
}

/// How a disk removed from `disks` is detached.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DetachOptions {
    /// Detach without asking the guest, at the user's risk (anything still writing loses data). Never for the
    /// system disk.
    #[serde(default)]
    pub force: bool,
    /// Keep the claim (and its data) after the detach.
    #[serde(default)]
    pub preserve_data: bool,
    /// Let the guest's agent unmount idle filesystems of the disk before releasing it.
    #[serde(default)]
    pub unmount: bool,
}

/// What the operator observed and did, rebuilt on every reconcile.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[schemars(transform = no_defaults)]
#[serde(rename_all = "camelCase")]
pub struct WukongStatus {
    /// The generation of the spec this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// The VirtualMachine the disks belong to.
    #[serde(default)]
    pub vm_name: String,
    /// Disks attached and seen by the guest.
    #[serde(default)]
    pub attached: u32,
    /// Disks whose detach the guest refused (or could not be asked).
    #[serde(default)]
    pub blocked: u32,
    /// Every disk that is listed, or is still attached after its removal from the list.
    #[serde(default)]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["name"]))]
    pub volumes: Vec<VolumeStatus>,
    #[serde(default)]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    /// The last detaches and refusals, newest last (at most [`HISTORY_LIMIT`]): Events expire after an hour.
    #[serde(default)]
    pub history: Vec<DetachRecord>,
}

/// Status is written by the operator only: its schema carries no defaults (and kube-apiserver before 1.22 refuses
/// some that schemars derives, such as `default: ""`).
fn no_defaults(schema: &mut schemars::Schema) {
    if let Some(object) = schema.as_object_mut() {
        object.remove("default");
        for value in object.values_mut() {
            strip_defaults(value);
        }
    }
}

fn strip_defaults(value: &mut serde_json::Value) {
    match value {
        serde_json::Value::Object(map) => {
            map.remove("default");
            map.values_mut().for_each(strip_defaults);
        }
        serde_json::Value::Array(items) => items.iter_mut().for_each(strip_defaults),
        _ => {}
    }
}

/// How many detach records the status keeps.
pub const HISTORY_LIMIT: usize = 20;

/// Where one disk is.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[schemars(transform = no_defaults)]
#[serde(rename_all = "camelCase")]
pub struct VolumeStatus {
    pub name: String,
    /// The claim; absent for a system disk that is not a claim (e.g. a container disk).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub pvc_name: String,
    /// The claim is bound to a volume.
    pub bound: bool,
    /// Capacity asked for.
    pub size: String,
    pub phase: Phase,
    pub serial: String,
    pub bus: Bus,
    /// The system disk: never detached.
    #[serde(default)]
    pub system: bool,
    /// The disk's device in the guest, e.g. `/dev/sdb`, as the guest's agent reports it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
    /// Why a detach is refused: one sentence per blocker, as the guest's agent wrote them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub blockers: Vec<String>,
    /// What is happening, for a person.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// The detach options in force: the last ones seen while the disk was listed.
    #[serde(default)]
    pub detach_options: DetachOptions,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage_class_name: Option<String>,
    /// When the disk's removal from the list was first seen (RFC 3339), for the history's durations.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub removal_since: Option<String>,
}

/// The phase of one disk.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
pub enum Phase {
    /// Waiting: for its claim to bind, or for the VM to start (the disk is in the VM's spec).
    #[default]
    Pending,
    /// Being hot-plugged, or waiting for the guest to see it.
    Attaching,
    /// Plugged and seen by the guest.
    Attached,
    /// The guest released it; the hypervisor is unplugging it.
    Detaching,
    /// The guest refused to let it go (or could not be asked); retried with backoff.
    DetachBlocked,
    /// Gone from a stopped VM's spec (the entry, and the claim unless kept, go on the next pass).
    Detached,
}

/// A condition of the object, in Kubernetes' shape.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[schemars(transform = no_defaults)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    #[serde(rename = "type")]
    pub type_: String,
    /// `True`, `False` or `Unknown`.
    pub status: String,
    pub reason: String,
    pub message: String,
    /// RFC 3339.
    pub last_transition_time: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

/// One detach, or one refusal (recorded when its reasons change, not on every retry).
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[schemars(transform = no_defaults)]
#[serde(rename_all = "camelCase")]
pub struct DetachRecord {
    pub disk: String,
    pub serial: String,
    /// RFC 3339.
    pub at: String,
    /// `Detached` or `Refused`.
    pub outcome: String,
    /// The guest was not asked (`detachOptions.force`).
    pub forced: bool,
    /// From the removal's first sight to this record.
    pub duration_seconds: u64,
    /// The claim was kept.
    pub preserved_data: bool,
    /// Why it was refused: the blockers' sentences.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

impl Wukong {
    /// The VM's name: `spec.vmName`, else `<name>-vm`.
    pub fn vm_name(&self) -> String {
        self.spec.vm_name.clone().unwrap_or_else(|| format!("{}-vm", self.metadata.name.as_deref().unwrap_or_default()))
    }
}

impl DiskSpec {
    /// The serial the guest sees: `serial`, else the name.
    pub fn serial(&self) -> String {
        self.serial.clone().unwrap_or_else(|| self.name.clone())
    }
}

/// The claim of a disk: `<vm>-<disk>`.
pub fn claim_name(vm: &str, disk: &str) -> String {
    format!("{vm}-{disk}")
}

/// The CRD as YAML, as shipped in the chart's `crds/wukong.yaml`.
pub fn crd_yaml() -> String {
    use kube::CustomResourceExt;
    let crd = serde_json::to_value(Wukong::crd()).expect("the CRD serialises");
    let header = "# Generated by `wukong-operator crd`; a test keeps it equal to the Rust types. Do not edit.\n";
    format!("{header}{}", serde_saphyr::to_string(&crd).expect("the CRD serialises to YAML"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shipped_crd_is_the_generated_one() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/chart/wukong-operator/crds/wukong.yaml");
        let shipped = std::fs::read_to_string(path).expect("the chart's crds/wukong.yaml is checked in");
        assert!(
            shipped == crd_yaml(),
            "deploy/chart/wukong-operator/crds/wukong.yaml differs from the Rust types: run `cargo run -p \
             wukong-operator -- crd > deploy/chart/wukong-operator/crds/wukong.yaml` and scripts/render-manifests.sh"
        );
    }

    #[test]
    fn the_crd_names_the_resource_as_documented() {
        use kube::CustomResourceExt;
        let crd = serde_json::to_value(Wukong::crd()).unwrap();
        assert_eq!(crd["metadata"]["name"], "wukongs.vm.novasphere.dev");
        assert_eq!(crd["spec"]["scope"], "Namespaced");
        assert_eq!(crd["spec"]["names"]["shortNames"][0], "wk");
        let version = &crd["spec"]["versions"][0];
        assert_eq!(version["name"], "v1alpha1");
        assert!(version["subresources"]["status"].is_object());
        let columns: Vec<&str> = version["additionalPrinterColumns"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["name"].as_str().unwrap())
            .collect();
        assert_eq!(columns, ["VM", "Attached", "Blocked", "Ready", "Age"]);
        let disks = &version["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]["disks"];
        assert_eq!(disks["x-kubernetes-list-map-keys"][0], "name");
    }

    #[test]
    fn defaults_follow_the_platforms_sketch() {
        let w: Wukong = serde_json::from_value(serde_json::json!({
            "apiVersion": "vm.novasphere.dev/v1alpha1", "kind": "Wukong", "metadata": {"name": "db"},
            "spec": {"cpu": 2, "memory": "4Gi", "disks": [{"name": "data", "size": "10Gi"}]},
        }))
        .unwrap();
        assert_eq!(w.vm_name(), "db-vm");
        assert_eq!(claim_name(&w.vm_name(), "data"), "db-vm-data");
        assert_eq!(w.spec.disks[0].serial(), "data");
        assert_eq!(w.spec.disks[0].detach_options, DetachOptions::default());
        assert_eq!(w.spec.disks[0].bus, Bus::Scsi);
    }
}
