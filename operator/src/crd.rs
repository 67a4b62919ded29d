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
    /// The VM's disks. The one marked `system: true`, or else the one named `system`, is the system disk: it is part
    /// of the VM's own definition and is never plugged, unplugged or deleted by the operator. Every other disk is a
    /// data disk, hot-plugged and detached by the operator; a list without a system disk lists data disks only.
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
    /// This disk is the system disk (as is a disk named `system` when no disk says so): part of the VM's own
    /// definition, reported but never plugged, unplugged or deleted. At most one.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub system: bool,
    /// Capacity of the claim, a Kubernetes quantity such as `10Gi`. Required for a data disk, except a clone
    /// (`source.pvc`), which defaults to its source's size; not used for the system disk.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<String>,
    /// StorageClass of the claim. Default: the cluster's default class.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage_class_name: Option<String>,
    /// Access modes of the claim. Default: the class's (its CDI StorageProfile), else `[ReadWriteOnce]`. A VM
    /// whose disks are all `ReadWriteMany` can live-migrate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("minItems" = 1, "maxItems" = 4))]
    pub access_modes: Option<Vec<AccessMode>>,
    /// Whether the claim is a filesystem holding the disk's image or a raw block device. Default: the class's (its
    /// CDI StorageProfile), else `Filesystem` for a DataVolume and `Block` for a bare claim (KubeVirt cannot
    /// hot-plug an empty Filesystem claim: without a `source`, a disk is a blank DataVolume when CDI is installed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(transform = no_null_in_enum)]
    pub volume_mode: Option<VolumeMode>,
    /// Where the disk's content comes from, as a CDI DataVolume's `spec.source`: set, the operator creates a
    /// DataVolume `<vm>-<name>` (CDI must be installed) and hot-plugs it once CDI has filled it; unset, a bare
    /// empty claim.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    // Boxed: few disks have one, and inline it took 200 bytes in every disk of every object the watch cache holds.
    pub source: Option<Box<DiskSource>>,
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
    /// Move this disk here from another `Wukong` of this namespace: its VM lets the disk go by a safe detach
    /// (refused with reasons while its guest uses it), its claim is handed over to this object, never deleted, and
    /// the disk is hot-plugged into this VM. It is never plugged into both VMs at once. The claim keeps its size,
    /// class and modes; `size`, `storageClassName`, `accessModes` and `volumeMode` are not used. The source object
    /// may list the disk still: it is then shown there as `Moved`, and left alone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub move_from: Option<DiskRef>,
}

/// A disk of a `Wukong` in the same namespace.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DiskRef {
    /// The `Wukong`'s name (in this namespace: a claim cannot leave its namespace).
    pub wukong: String,
    /// The disk's name in that object's `disks`.
    pub disk: String,
}

/// An access mode of a claim, as Kubernetes names them.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, JsonSchema)]
pub enum AccessMode {
    ReadWriteOnce,
    ReadOnlyMany,
    ReadWriteMany,
    ReadWriteOncePod,
}

/// The volume mode of a claim, as Kubernetes names them.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum VolumeMode {
    Filesystem,
    Block,
}

/// The content of a new disk: exactly one of CDI's DataVolume sources (`cdi.kubevirt.io/v1beta1`).
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("minProperties" = 1, "maxProperties" = 1))]
pub struct DiskSource {
    /// An empty disk, made by CDI.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blank: Option<BlankSource>,
    /// An image downloaded over HTTP(S) (raw, qcow2, compressed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<RemoteSource>,
    /// A container disk image from a registry (`docker://…`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub registry: Option<RemoteSource>,
    /// A copy of a claim.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pvc: Option<ClaimSource>,
}

/// CDI's `blank` source: no fields.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, Default, JsonSchema)]
pub struct BlankSource {}

/// CDI's `http` and `registry` sources: where the image is (`http://` or `https://`; `docker://` or
/// `oci-archive://`), and what reaches it.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RemoteSource {
    /// The image's address.
    pub url: String,
    /// A Secret (`accessKeyId`, `secretKey`) for the server or registry.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_ref: Option<String>,
    /// A ConfigMap with the CA bundle of an `https://` server or of the registry.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert_config_map: Option<String>,
}

/// CDI's `pvc` source: the claim to clone, in this namespace unless another is given.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ClaimSource {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
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
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, Default, JsonSchema)]
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
    /// Take a CSI VolumeSnapshot of the claim after the guest released the disk (flushed, unmounted, fenced: a
    /// consistent copy) and before the unplug, which waits until the snapshot is ready to use; `{}` takes one with
    /// the default class and a generated name. A snapshot that fails gives the disk back to the guest. The
    /// snapshot is not owned by the `Wukong`: it outlives the claim and the object.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<SnapshotOptions>,
}

/// The snapshot taken before a detach.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SnapshotOptions {
    /// The VolumeSnapshot's name. Default: `<claim>-<unix time the removal was first seen>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// The VolumeSnapshotClass. Default: the default class of the claim's CSI driver.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume_snapshot_class_name: Option<String>,
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

/// An optional enum's schema lists `null` among its values, which kube-apiserver refuses (an enum's values must be
/// of its type); `nullable: true` already allows it.
fn no_null_in_enum(schema: &mut schemars::Schema) {
    if let Some(serde_json::Value::Array(values)) = schema.get_mut("enum") {
        values.retain(|v| !v.is_null());
    }
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
    /// Capacity asked for; empty when none is (the system disk, a clone of its source's size).
    #[serde(default, skip_serializing_if = "String::is_empty")]
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
    /// The claim's binding mode, from its StorageClass: `Immediate`, or `WaitForFirstConsumer` (the claim binds
    /// once KubeVirt's attachment Pod uses it, so the disk is hot-plugged while the claim is still Pending).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub binding_mode: Option<String>,
    /// The claim's access modes, as it has them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub access_modes: Vec<String>,
    /// The claim's volume mode, as it has it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume_mode: Option<String>,
    /// The DataVolume that fills the disk (`source`), as CDI reports it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    // Boxed, as `DiskSpec::source` is: few disks have one.
    pub data_volume: Option<Box<DataVolumeStatus>>,
    /// When the disk's removal from the list was first seen (RFC 3339), for the history's durations.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub removal_since: Option<String>,
    /// The snapshot its detach takes (`detachOptions.snapshot`), as the snapshot controller reports it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<SnapshotStatus>,
    /// The disk came (or is coming: phase `Pending`) from this disk of another object (`moveFrom`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub moved_from: Option<DiskRef>,
    /// The disk went to this disk of another object (phase `Moved`), which now owns its claim.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub moved_to: Option<DiskRef>,
}

/// A VolumeSnapshot taken before a detach.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, Default, JsonSchema)]
#[schemars(transform = no_defaults)]
#[serde(rename_all = "camelCase")]
pub struct SnapshotStatus {
    pub name: String,
    /// The snapshot controller's `readyToUse`: the unplug waits for it.
    #[serde(default)]
    pub ready_to_use: bool,
    /// Its `restoreSize`: the least a claim restored from it may ask for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restore_size: Option<String>,
    /// Its `status.error.message`, when taking it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// A DataVolume as CDI reports it.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, Default, JsonSchema)]
#[schemars(transform = no_defaults)]
#[serde(rename_all = "camelCase")]
pub struct DataVolumeStatus {
    pub name: String,
    /// CDI's phase, e.g. `ImportInProgress`, `Succeeded`, `WaitForFirstConsumer`, `Failed`.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub phase: String,
    /// CDI's progress, e.g. `45.00%`.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub progress: String,
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
    /// Moved to another object (`movedTo`), which owns its claim now: still listed here, it is neither plugged nor
    /// made again. Remove it from `disks`; nothing is deleted.
    Moved,
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
    /// `Detached`, `Moved` (to `movedTo`) or `Refused`.
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
    /// The VolumeSnapshot taken before the unplug (`detachOptions.snapshot`), ready to use.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<String>,
    /// Where the disk went (outcome `Moved`): the object that owns its claim now, and its disk there.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub moved_to: Option<DiskRef>,
}

impl std::fmt::Display for DiskRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "disk '{}' of Wukong {}", self.disk, self.wukong)
    }
}

impl Wukong {
    /// The VM's name: `spec.vmName`, else `<name>-vm`.
    pub fn vm_name(&self) -> String {
        self.spec.vm_name.clone().unwrap_or_else(|| format!("{}-vm", self.metadata.name.as_deref().unwrap_or_default()))
    }

    /// Whether `vm` is this object's VM, as [`Self::vm_name`] says, without making the name: asked of every
    /// object for every VMI event.
    pub fn is_for_vm(&self, vm: &str) -> bool {
        match &self.spec.vm_name {
            Some(name) => name == vm,
            None => vm.strip_suffix("-vm").is_some_and(|name| self.metadata.name.as_deref() == Some(name)),
        }
    }
}

impl DiskSpec {
    /// The serial the guest sees: `serial`, else the name.
    pub fn serial(&self) -> String {
        self.serial.clone().unwrap_or_else(|| self.name.clone())
    }

    /// The capacity asked for, empty when none is (the system disk, a clone).
    pub fn size(&self) -> &str {
        self.size.as_deref().unwrap_or_default()
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
        assert!(w.is_for_vm("db-vm") && !w.is_for_vm("db") && !w.is_for_vm("db-vm-vm") && !w.is_for_vm("xdb-vm"));
        let mut named = w.clone();
        named.spec.vm_name = Some("db".into());
        assert!(named.is_for_vm("db") && !named.is_for_vm("db-vm"));
        assert_eq!(claim_name(&w.vm_name(), "data"), "db-vm-data");
        assert_eq!(w.spec.disks[0].serial(), "data");
        assert_eq!(w.spec.disks[0].detach_options, DetachOptions::default());
        assert_eq!(w.spec.disks[0].bus, Bus::Scsi);
    }
}
