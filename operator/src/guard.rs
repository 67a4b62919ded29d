//! The admission guard's decisions, from the AdmissionReview alone (pure; `webhook` asks the guests). An update
//! of a VirtualMachine or VirtualMachineInstance that drops a hotpluggable volume, or its disk, is an unplug since
//! KubeVirt 1.9 (for a VM) and always was (for a VMI): the guard lets it be stored only once the guest has released
//! the disk. An update KubeVirt's own admission refuses (the API server calls every validating webhook at once,
//! so the guard cannot wait for KubeVirt's verdict) is denied without asking the guest: releasing a disk for an
//! update that is never stored would leave it plugged but released until the grace period.

use kube::core::DynamicObject;
use kube::core::admission::{AdmissionRequest, AdmissionReview, Operation};
use serde_json::Value;
use std::collections::BTreeMap;

/// Label (on a VM, a VMI or their namespace) that opts objects into the guard: `enabled`.
pub const GUARD_LABEL: &str = "vm.novasphere.dev/guard";
/// The value of [`GUARD_LABEL`] on a VM or VMI that opts it out in a namespace that opted in (a VM without an
/// agent, e.g. Windows).
pub const GUARD_DISABLED: &str = "disabled";
/// Annotation on the object: `true` lets the update unplug without asking the guest, at the user's risk.
pub const FORCE_ANNOTATION: &str = "vm.novasphere.dev/force-detach";
/// Annotation on the object: `true` lets the guest's agent unmount idle filesystems of the disk when it releases it.
pub const UNMOUNT_ANNOTATION: &str = "vm.novasphere.dev/unmount-on-detach";
/// The largest AdmissionReview the guard reads (the API server's own request limit is 3 MiB).
pub const MAX_REVIEW_BYTES: usize = 3 << 20;

/// A disk an update unplugs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Removal {
    pub volume: String,
    /// The serial the guest knows it by: the removed disk entry's, else the volume's name.
    pub serial: String,
}

/// What the guard does with a review.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plan {
    /// Allowed at once, without asking any guest.
    Allow(&'static str),
    /// Denied without asking any guest: KubeVirt refuses the update itself.
    Refuse(Refusal),
    /// Allowed without asking the guest, with a warning for the caller: the disks leave a VM's template, but
    /// KubeVirt leaves its running VMI alone (`updateVolumesStrategy: Migration`), so they stay plugged until the VM
    /// restarts. Releasing them would leave the guest without disks that are still there.
    Kept { warning: String },
    /// Each removed disk must be released by the guest first (or, on a dry run, be free to release).
    Release {
        namespace: String,
        /// The VMI whose guest has the disks (a VM's VMI has the VM's name).
        vmi: String,
        removals: Vec<Removal>,
        force: bool,
        unmount: bool,
        dry_run: bool,
        /// Who asked, as the API server vouches for it.
        user: String,
        /// A VM leaving `updateVolumesStrategy: Migration`: KubeVirt then unplugs at once every hotpluggable volume
        /// its running VMI has and the new template lacks (or defines otherwise), kept there meanwhile. Those are
        /// removals too, found in the live VMI (`removals` has only the template's own).
        catching_up: bool,
    },
}

/// An update that unplugs a disk but that KubeVirt v1.9's own validating webhooks (virt-api-validator) refuse: the
/// guard denies it first and releases nothing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// `VMIUpdateAdmitter.Admit` (vmi-update-admitter.go): only KubeVirt's service accounts change a VMI's spec.
    #[error(
        "wukong guard released nothing for VMI {object}: KubeVirt refuses any change of a VMI's spec by {user} \
         (\"update of VMI object is restricted\": only KubeVirt's own service accounts change it). Unplug with \
         virtctl removevolume on a standalone VMI, or remove the volume and its disk from the VM's spec"
    )]
    VmiSpecRestricted { object: String, user: String },
    /// KubeVirt's rule that volumes and disks pair up: `validateExpectedDisksAndFilesystems` (storagehotplug.go) for
    /// a VMI, `validateBootOrder` (vmi-create-admitter.go, run by the VM admitter) for a VM's disks.
    #[error(
        "wukong guard released nothing for {object}: KubeVirt refuses this update (\"{kubevirt}\"). Remove the \
         volume and its disk together"
    )]
    Unpaired { object: String, kubevirt: String },
}

/// KubeVirt's service accounts (pkg/virt-api/webhooks/serviceaccounts.go `KubeVirtServiceAccounts`), the only
/// users its VMI admitter lets change a VMI's spec. The guard does not know KubeVirt's namespace, so it takes these
/// names in any: a stranger's look-alike account only gets the review the guard gave every update before.
const KUBEVIRT_ACCOUNTS: [&str; 4] =
    ["kubevirt-apiserver", "kubevirt-controller", "kubevirt-handler", "kubevirt-synchronization-controller"];

/// Whether `user` is one of KubeVirt's service accounts.
fn is_kubevirt(user: &str) -> bool {
    let account = user.strip_prefix("system:serviceaccount:").and_then(|rest| rest.split_once(':'));
    account.is_some_and(|(_, name)| KUBEVIRT_ACCOUNTS.contains(&name))
}

/// Why a review cannot be decided: answered with a denial naming it, never a panic.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReviewError {
    #[error("the AdmissionReview is larger than {MAX_REVIEW_BYTES} bytes")]
    TooLarge,
    #[error("the body is not an admission.k8s.io/v1 AdmissionReview: {0}")]
    Malformed(String),
    #[error("the AdmissionReview has no request")]
    NoRequest,
    #[error(
        "the guard reviews kubevirt.io VirtualMachines and VirtualMachineInstances, not {0}; check the webhook's rules"
    )]
    UnexpectedKind(String),
    #[error("the update of {0} carries no {1}; the guard cannot tell which disks it removes")]
    MissingObject(String, &'static str),
}

/// Reads a review from the request body.
pub fn read_review(body: &[u8]) -> Result<AdmissionRequest<DynamicObject>, ReviewError> {
    if body.len() > MAX_REVIEW_BYTES {
        return Err(ReviewError::TooLarge);
    }
    let review: AdmissionReview<DynamicObject> =
        serde_json::from_slice(body).map_err(|e| ReviewError::Malformed(e.to_string()))?;
    if review.types.api_version != "admission.k8s.io/v1" || review.types.kind != "AdmissionReview" {
        let found = format!("{} {}", review.types.api_version, review.types.kind);
        return Err(ReviewError::Malformed(format!("it is a {found}; the webhook speaks admissionReviewVersions v1")));
    }
    // The conversion carries the review's apiVersion and kind into the request, and from it into the response.
    review.try_into().map_err(|_| ReviewError::NoRequest)
}

/// Whether deploy/guard.yaml's webhooks send the API server's reviews of an object with these labels, in a
/// namespace with these labels: the object's own label decides (`enabled`, or [`GUARD_DISABLED`]), else its
/// namespace's.
pub fn guarded(object: &BTreeMap<String, String>, namespace: &BTreeMap<String, String>) -> bool {
    match object.get(GUARD_LABEL).map(String::as_str) {
        Some("enabled") => true,
        Some(GUARD_DISABLED) => false,
        _ => namespace.get(GUARD_LABEL).is_some_and(|v| v == "enabled"),
    }
}

/// Where the spec with volumes and disks is in each kind.
pub(crate) fn spec_of<'a>(object: &'a DynamicObject, kind: &str) -> &'a Value {
    match kind {
        "VirtualMachine" => &object.data["spec"]["template"]["spec"],
        _ => &object.data["spec"],
    }
}

fn names(list: &Value) -> Vec<&str> {
    list.as_array().into_iter().flatten().filter_map(|v| v["name"].as_str()).collect()
}

fn hotpluggable(volume: &Value) -> bool {
    ["persistentVolumeClaim", "dataVolume"].iter().any(|k| volume[k]["hotpluggable"] == Value::Bool(true))
}

/// The hotpluggable volumes of `old` that `new` drops, changes (KubeVirt's `filterHotplugVMIVolumes` unplugs a
/// hotplugged volume that is not deeply equal to the template's, to plug the new definition after it: pointing it
/// at another claim unplugs the disk the guest has), or, in a VMI (`disks_count`), whose disk it drops. A VM's
/// template that keeps a volume but drops its disk unplugs nothing: KubeVirt's VM admitter accepts it (a volume
/// without a disk gets a default one, `SetDefaultVolumeDisk`) and `filterHotplugVMIDisks` keeps the VMI's disk
/// while its volume stays.
pub fn removals(old: &Value, new: &Value, disks_count: bool) -> Vec<Removal> {
    let new_disks = names(&new["domain"]["devices"]["disks"]);
    let new_volumes: &[Value] = new["volumes"].as_array().map(Vec::as_slice).unwrap_or_default();
    let old_disks = old["domain"]["devices"]["disks"].as_array().cloned().unwrap_or_default();
    old["volumes"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|v| hotpluggable(v))
        .filter(|v| {
            let name = v["name"].as_str().unwrap_or_default();
            let disk_dropped = disks_count && old_disks.iter().any(|d| d["name"] == name) && !new_disks.contains(&name);
            !new_volumes.contains(v) || disk_dropped
        })
        .filter_map(|v| v["name"].as_str())
        .map(|name| {
            let disk = old_disks.iter().find(|d| d["name"] == name);
            let serial = disk.and_then(|d| d["serial"].as_str()).filter(|s| !s.is_empty()).unwrap_or(name);
            Removal { volume: name.to_string(), serial: serial.to_string() }
        })
        .collect()
}

/// A VM whose declarative hot-plug KubeVirt leaves alone: `HandleDeclarativeVolumes` (pkg/storage/hotplug/hotplug.go)
/// returns at once for `spec.updateVolumesStrategy: Migration`.
fn migrates_volumes(vm: &DynamicObject) -> bool {
    vm.data["spec"]["updateVolumesStrategy"] == "Migration"
}

fn annotated(object: &DynamicObject, key: &str) -> bool {
    object.metadata.annotations.as_ref().and_then(|a| a.get(key)).is_some_and(|v| v == "true")
}

/// Decides what a review needs, from the review alone.
pub fn plan(request: &AdmissionRequest<DynamicObject>) -> Result<Plan, ReviewError> {
    let kind = request.kind.kind.as_str();
    let described = format!("{}/{} {}", request.kind.group, request.kind.version, kind);
    if request.kind.group != "kubevirt.io" || !matches!(kind, "VirtualMachine" | "VirtualMachineInstance") {
        return Err(ReviewError::UnexpectedKind(described));
    }
    if request.operation != Operation::Update {
        return Ok(Plan::Allow("not an update"));
    }
    if request.sub_resource.is_some() {
        return Ok(Plan::Allow("a subresource, not the spec"));
    }
    let object = request.object.as_ref().ok_or_else(|| ReviewError::MissingObject(described.clone(), "object"))?;
    let old = request.old_object.as_ref().ok_or(ReviewError::MissingObject(described, "oldObject"))?;
    let is_vmi = kind == "VirtualMachineInstance";
    let (old_spec, new_spec) = (spec_of(old, kind), spec_of(object, kind));
    let removals = removals(old_spec, new_spec, is_vmi);
    let catching_up = !is_vmi && migrates_volumes(old) && !migrates_volumes(object);
    if removals.is_empty() && !catching_up {
        return Ok(Plan::Allow("no hotpluggable disk is removed"));
    }
    let user = request.user_info.username.clone().unwrap_or_default();
    let namespace = request.namespace.clone().unwrap_or_default();
    let object_name = format!("{namespace}/{}", request.name);
    if let Some(refusal) = kubevirt_refuses(&object_name, is_vmi, &user, new_spec) {
        return Ok(Plan::Refuse(refusal));
    }
    if !is_vmi && migrates_volumes(object) {
        let disks: Vec<String> = removals.iter().map(|r| format!("'{}' (volume {})", r.serial, r.volume)).collect();
        return Ok(Plan::Kept {
            warning: format!(
                "wukong guard: VirtualMachine {object_name} has spec.updateVolumesStrategy: Migration, so KubeVirt \
                 does not hot-unplug: disk {} stays plugged in the running guest until the VM restarts; the guest \
                 was not asked to release it",
                disks.join(", ")
            ),
        });
    }
    Ok(Plan::Release {
        namespace,
        vmi: request.name.clone(),
        removals,
        force: annotated(object, FORCE_ANNOTATION),
        unmount: annotated(object, UNMOUNT_ANNOTATION),
        dry_run: request.dry_run,
        user,
        catching_up,
    })
}

/// Whether KubeVirt's admission refuses an update (that unplugs a disk) by `user` whose new spec is `spec`, and why.
/// `object` is `namespace/name`.
fn kubevirt_refuses(object: &str, is_vmi: bool, user: &str, spec: &Value) -> Option<Refusal> {
    let volumes = names(&spec["volumes"]);
    let disks = spec["domain"]["devices"]["disks"].as_array().map(Vec::as_slice).unwrap_or_default();
    // A CD-ROM may have no volume (an empty drive, DeclarativeHotplugVolumes); every other disk needs one.
    let unpaired = disks
        .iter()
        .enumerate()
        .find(|(_, d)| d["cdrom"].is_null() && !d["name"].as_str().is_some_and(|n| volumes.contains(&n)));
    if !is_vmi {
        // The VM admitter's `validateBootOrder`, with its field path (it names `Name` with a capital N).
        return unpaired.map(|(index, disk)| Refusal::Unpaired {
            object: format!("VirtualMachine {object}"),
            kubevirt: format!(
                "spec.template.spec.domain.devices.disks[{index}].Name '{}' not found.",
                disk["name"].as_str().unwrap_or_default()
            ),
        });
    }
    if !is_kubevirt(user) {
        return Some(Refusal::VmiSpecRestricted { object: object.to_string(), user: user.to_string() });
    }
    // `validateExpectedDisksAndFilesystems`: a disk or filesystem for each volume but a memory dump.
    let declared = spec["volumes"].as_array().into_iter().flatten().filter(|v| v["memoryDump"].is_null()).count();
    let filesystems = spec["domain"]["devices"]["filesystems"].as_array().map_or(0, Vec::len);
    let cdroms_without_volume = disks
        .iter()
        .filter(|d| !d["cdrom"].is_null() && !d["name"].as_str().is_some_and(|n| volumes.contains(&n)))
        .count();
    let required = filesystems + disks.len() - cdroms_without_volume;
    (declared != required).then(|| Refusal::Unpaired {
        object: format!("VMI {object}"),
        kubevirt: format!("mismatch between volumes declared ({declared}) and required ({required})"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    fn spec(volumes: &[(&str, bool)], disks: &[(&str, Option<&str>)]) -> Value {
        let volumes: Vec<Value> = volumes
            .iter()
            .map(|(n, hot)| json!({"name": n, "persistentVolumeClaim": {"claimName": format!("pvc-{n}"), "hotpluggable": hot}}))
            .collect();
        let disks: Vec<Value> =
            disks.iter().map(|(n, s)| json!({"name": n, "serial": s, "disk": {"bus": "scsi"}})).collect();
        json!({"domain": {"devices": {"disks": disks}}, "volumes": volumes})
    }

    /// virt-api's account, whose VMI spec changes (removevolume on a standalone VMI) KubeVirt admits.
    const VIRT_API: &str = "system:serviceaccount:kubevirt:kubevirt-apiserver";

    fn review(kind: &str, operation: &str, old: Value, new: Value, annotations: Value, dry_run: bool) -> Vec<u8> {
        review_by("alice", kind, operation, old, new, annotations, dry_run)
    }

    fn review_by(
        user: &str,
        kind: &str,
        operation: &str,
        old: Value,
        new: Value,
        annotations: Value,
        dry_run: bool,
    ) -> Vec<u8> {
        let object = |spec: Value| {
            let spec = if kind == "VirtualMachine" { json!({"template": {"spec": spec}}) } else { spec };
            json!({"apiVersion": "kubevirt.io/v1", "kind": kind,
                   "metadata": {"name": "vm1", "namespace": "ns1", "annotations": annotations}, "spec": spec})
        };
        let plural = if kind == "VirtualMachine" { "virtualmachines" } else { "virtualmachineinstances" };
        serde_json::to_vec(&json!({
            "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
            "request": {"uid": "u1", "kind": {"group": "kubevirt.io", "version": "v1", "kind": kind},
                        "resource": {"group": "kubevirt.io", "version": "v1", "resource": plural},
                        "name": "vm1", "namespace": "ns1", "operation": operation,
                        "userInfo": {"username": user}, "object": object(new), "oldObject": object(old),
                        "dryRun": dry_run},
        }))
        .unwrap()
    }

    fn plan_of(body: &[u8]) -> Result<Plan, ReviewError> {
        plan(&read_review(body)?)
    }

    #[test]
    fn a_removed_hotpluggable_disk_must_be_released_first() {
        let old = spec(
            &[("root", false), ("data", true), ("logs", true)],
            &[("root", None), ("data", Some("pg-1")), ("logs", None)],
        );
        // A user edits a VM's spec; only KubeVirt changes a VMI's (here virt-api, for removevolume).
        for (kind, who) in [("VirtualMachine", "alice"), ("VirtualMachineInstance", VIRT_API)] {
            let dropped = spec(&[("root", false), ("logs", true)], &[("root", None), ("logs", None)]);
            let body = review_by(who, kind, "UPDATE", old.clone(), dropped, json!({}), false);
            let Ok(Plan::Release { namespace, vmi, removals, force, unmount, dry_run, user, .. }) = plan_of(&body)
            else {
                panic!("{kind}: a removal must be released")
            };
            assert_eq!((namespace.as_str(), vmi.as_str(), user.as_str()), ("ns1", "vm1", who));
            assert_eq!(removals, [Removal { volume: "data".into(), serial: "pg-1".into() }]);
            assert!(!force && !unmount && !dry_run);
            let no_logs = spec(&[("root", false), ("data", true)], &[("root", None), ("data", Some("pg-1"))]);
            let body = review_by(who, kind, "UPDATE", old.clone(), no_logs, json!({FORCE_ANNOTATION: "true"}), true);
            let Ok(Plan::Release { removals, force, dry_run, .. }) = plan_of(&body) else { panic!("{kind}") };
            assert_eq!(removals, [Removal { volume: "logs".into(), serial: "logs".into() }], "no serial: the name");
            assert!(force && dry_run);
        }
    }

    /// The API server asks KubeVirt's webhooks and the guard at once: an unplug KubeVirt refuses is denied before
    /// the guest is asked, so no disk is left released for an update that is never stored.
    #[test]
    fn an_unplug_kubevirt_refuses_is_denied_without_asking_the_guest() {
        let vmi = "VirtualMachineInstance";
        let old = spec(&[("root", false), ("data", true)], &[("root", None), ("data", Some("pg-1"))]);
        let dropped = spec(&[("root", false)], &[("root", None)]);
        let refusal = |who: &str, kind: &str, new: &Value| match plan_of(&review_by(
            who,
            kind,
            "UPDATE",
            old.clone(),
            new.clone(),
            json!({}),
            false,
        )) {
            Ok(Plan::Refuse(refusal)) => Some(refusal),
            _ => None,
        };
        // A VMI's spec edited by anyone but KubeVirt, its look-alikes in other namespaces included.
        for who in ["alice", "system:serviceaccount:ns1:default", "system:serviceaccount:kubevirt:kubevirt-operator"] {
            let denied = refusal(who, vmi, &dropped).expect(who);
            assert_eq!(denied, Refusal::VmiSpecRestricted { object: "ns1/vm1".into(), user: who.into() });
            let message = denied.to_string();
            assert!(message.starts_with("wukong guard released nothing for VMI ns1/vm1"), "{message}");
            assert!(message.contains("(\"update of VMI object is restricted\""), "{message}");
        }
        for who in
            [VIRT_API, "system:serviceaccount:kv:kubevirt-controller", "system:serviceaccount:kv:kubevirt-handler"]
        {
            assert_eq!(refusal(who, vmi, &dropped), None, "{who} is KubeVirt");
        }
        // KubeVirt's own write with unpaired volumes and disks (`validateExpectedDisksAndFilesystems`).
        let volume_gone = spec(&[("root", false)], &[("root", None), ("data", Some("pg-1"))]);
        let disk_gone = spec(&[("root", false), ("data", true)], &[("root", None)]);
        for (new, declared, required) in [(&volume_gone, 1, 2), (&disk_gone, 2, 1)] {
            let kubevirt = format!("mismatch between volumes declared ({declared}) and required ({required})");
            assert_eq!(refusal(VIRT_API, vmi, new), Some(Refusal::Unpaired { object: "VMI ns1/vm1".into(), kubevirt }));
        }
        // A VM's template: a disk without its volume is refused (`validateBootOrder`)...
        let denied = refusal("alice", "VirtualMachine", &volume_gone).expect("a disk without a volume");
        let kubevirt = "spec.template.spec.domain.devices.disks[1].Name 'data' not found.".to_string();
        assert_eq!(denied, Refusal::Unpaired { object: "VirtualMachine ns1/vm1".into(), kubevirt });
        assert!(denied.to_string().contains("Remove the volume and its disk together"), "{denied}");
        // ...a volume without its disk is admitted and unplugs nothing (the VMI keeps its disk): no release either.
        let body = review("VirtualMachine", "UPDATE", old.clone(), disk_gone, json!({}), false);
        assert_eq!(plan_of(&body), Ok(Plan::Allow("no hotpluggable disk is removed")));
        // An emptied CD-ROM drive keeps its disk without a volume: an unplug KubeVirt carries out.
        let mut ejected = volume_gone.clone();
        ejected["domain"]["devices"]["disks"][1] = json!({"name": "data", "cdrom": {"bus": "sata"}});
        let mut loaded = old.clone();
        loaded["domain"]["devices"]["disks"][1] = json!({"name": "data", "cdrom": {"bus": "sata"}});
        for (kind, who) in [("VirtualMachine", "alice"), (vmi, VIRT_API)] {
            let body = review_by(who, kind, "UPDATE", loaded.clone(), ejected.clone(), json!({}), false);
            assert!(matches!(plan_of(&body), Ok(Plan::Release { .. })), "{kind}");
        }
    }

    /// KubeVirt unplugs a hotplugged volume whose definition changed (`filterHotplugVMIVolumes`), to plug the new
    /// one after it: the guest loses the disk it has.
    #[test]
    fn a_changed_hotpluggable_volume_is_a_removal() {
        let old = spec(&[("root", false), ("data", true)], &[("root", None), ("data", Some("pg-1"))]);
        let mut moved = old.clone();
        moved["volumes"][1]["persistentVolumeClaim"]["claimName"] = json!("another-claim");
        let mut cold_changed = old.clone();
        cold_changed["volumes"][0]["persistentVolumeClaim"]["claimName"] = json!("another-root");
        let mut disk_changed = old.clone();
        disk_changed["domain"]["devices"]["disks"][1]["disk"]["bus"] = json!("virtio");
        assert_eq!(removals(&old, &moved, false), [Removal { volume: "data".into(), serial: "pg-1".into() }]);
        assert_eq!(removals(&old, &cold_changed, true), [], "a volume that is not hotpluggable is not the guard's");
        assert_eq!(removals(&old, &disk_changed, true), [], "the volume is unchanged: KubeVirt keeps it plugged");
        let diskless = spec(&[("data", true)], &[]);
        assert_eq!(removals(&diskless, &diskless, true), [], "nothing changed: no disk was dropped");
        let body = review("VirtualMachine", "UPDATE", old, moved, json!({}), false);
        assert!(matches!(plan_of(&body), Ok(Plan::Release { .. })));
    }

    /// `updateVolumesStrategy: Migration`: KubeVirt leaves the running VMI alone, so a template edit unplugs
    /// nothing (allowed, with a warning, the guest not asked); leaving that strategy unplugs at once whatever the
    /// VMI kept meanwhile (a release, found in the live VMI).
    #[test]
    fn a_migration_strategy_vm_keeps_its_disks_until_it_leaves_that_strategy() {
        let strategy = |body: Vec<u8>, old: Option<&str>, new: Option<&str>| -> Vec<u8> {
            let mut review: Value = serde_json::from_slice(&body).unwrap();
            review["request"]["oldObject"]["spec"]["updateVolumesStrategy"] = json!(old);
            review["request"]["object"]["spec"]["updateVolumesStrategy"] = json!(new);
            serde_json::to_vec(&review).unwrap()
        };
        let old = spec(&[("root", false), ("data", true)], &[("root", None), ("data", Some("pg-1"))]);
        let dropped = spec(&[("root", false)], &[("root", None)]);
        let body = review("VirtualMachine", "UPDATE", old.clone(), dropped.clone(), json!({}), false);
        let Ok(Plan::Kept { warning }) = plan_of(&strategy(body.clone(), Some("Migration"), Some("Migration"))) else {
            panic!("a Migration VM's template edit is not an unplug")
        };
        assert!(warning.contains("VirtualMachine ns1/vm1 has spec.updateVolumesStrategy: Migration"), "{warning}");
        assert!(warning.contains("disk 'pg-1' (volume data) stays plugged"), "{warning}");
        // Set in the same update that drops the volume: KubeVirt reads the stored VM, which has it.
        assert!(matches!(plan_of(&strategy(body.clone(), None, Some("Migration"))), Ok(Plan::Kept { .. })));
        // Leaving it: KubeVirt unplugs what the template lost meanwhile, even if this update drops nothing.
        let unchanged = review("VirtualMachine", "UPDATE", dropped.clone(), dropped, json!({}), false);
        let Ok(Plan::Release { removals, catching_up, .. }) = plan_of(&strategy(unchanged, Some("Migration"), None))
        else {
            panic!("leaving the Migration strategy may unplug")
        };
        assert!(catching_up && removals.is_empty());
        let Ok(Plan::Release { removals, catching_up, .. }) = plan_of(&strategy(body, Some("Migration"), None)) else {
            panic!("leaving the Migration strategy and dropping a volume is an unplug")
        };
        assert!(catching_up);
        assert_eq!(removals, [Removal { volume: "data".into(), serial: "pg-1".into() }]);
    }

    #[test]
    fn an_object_is_guarded_by_its_own_label_else_by_its_namespace() {
        let labels =
            |v: Option<&str>| v.map(|v| BTreeMap::from([(GUARD_LABEL.to_string(), v.to_string())])).unwrap_or_default();
        for (object, namespace, expected) in [
            (Some("enabled"), None, true),
            (Some("enabled"), Some("enabled"), true),
            (None, Some("enabled"), true),
            (Some("other"), Some("enabled"), true),
            (Some(GUARD_DISABLED), Some("enabled"), false),
            (None, None, false),
            (None, Some("disabled"), false),
            (Some(GUARD_DISABLED), None, false),
        ] {
            assert_eq!(guarded(&labels(object), &labels(namespace)), expected, "{object:?} in {namespace:?}");
        }
    }

    #[test]
    fn additions_unrelated_changes_and_cold_volumes_are_allowed_at_once() {
        let old = spec(&[("root", false), ("data", true)], &[("root", None), ("data", None)]);
        let added =
            spec(&[("root", false), ("data", true), ("new", true)], &[("root", None), ("data", None), ("new", None)]);
        let cold = spec(&[("data", true)], &[("data", None)]);
        for (new, operation) in [(added, "UPDATE"), (old.clone(), "UPDATE"), (cold, "UPDATE"), (json!({}), "DELETE")] {
            let body = review("VirtualMachine", operation, old.clone(), new, json!({}), false);
            assert!(matches!(plan_of(&body), Ok(Plan::Allow(_))), "{operation}");
        }
    }

    #[test]
    fn bad_reviews_are_named() {
        assert!(matches!(read_review(b"{"), Err(ReviewError::Malformed(_))));
        assert!(matches!(read_review(&vec![b' '; MAX_REVIEW_BYTES + 1]), Err(ReviewError::TooLarge)));
        let v1beta1 = br#"{"apiVersion": "admission.k8s.io/v1beta1", "kind": "AdmissionReview"}"#;
        assert!(read_review(v1beta1).unwrap_err().to_string().contains("admissionReviewVersions v1"));
        let empty = br#"{"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview"}"#;
        assert_eq!(read_review(empty).unwrap_err(), ReviewError::NoRequest);
        let request = read_review(&review("VirtualMachine", "UPDATE", json!({}), json!({}), json!({}), false)).unwrap();
        let response =
            serde_json::to_value(kube::core::admission::AdmissionResponse::from(&request).into_review()).unwrap();
        assert_eq!(
            (&response["apiVersion"], &response["kind"]),
            (&json!("admission.k8s.io/v1"), &json!("AdmissionReview"))
        );
        assert_eq!(response["response"]["uid"], "u1", "the response answers the request's uid");
        let pod = String::from_utf8(review("VirtualMachine", "UPDATE", json!({}), json!({}), json!({}), false))
            .unwrap()
            .replace("\"group\":\"kubevirt.io\",\"kind\":\"VirtualMachine\"", "\"group\":\"\",\"kind\":\"Pod\"");
        let error = plan_of(pod.as_bytes()).unwrap_err();
        assert!(matches!(error, ReviewError::UnexpectedKind(_)), "{error}");
        let mut orphan: Value =
            serde_json::from_slice(&review("VirtualMachine", "UPDATE", json!({}), json!({}), json!({}), false))
                .unwrap();
        orphan["request"].as_object_mut().unwrap().remove("oldObject");
        let error = plan_of(&serde_json::to_vec(&orphan).unwrap()).unwrap_err();
        assert_eq!(
            error.to_string(),
            "the update of kubevirt.io/v1 VirtualMachine carries no oldObject; the guard cannot tell which disks it removes"
        );
    }

    proptest! {
        #[test]
        fn any_body_is_decided_or_refused_without_panicking(body in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = plan_of(&body);
        }

        #[test]
        fn any_volume_lists_are_decided_without_panicking(
            old in proptest::collection::vec(("[a-z]{1,3}", any::<bool>(), proptest::option::of("[a-z0-9]{0,4}")), 0..6),
            keep in proptest::collection::vec(any::<bool>(), 6),
        ) {
            let volumes: Vec<(&str, bool)> = old.iter().map(|(n, h, _)| (n.as_str(), *h)).collect();
            let disks: Vec<(&str, Option<&str>)> = old.iter().map(|(n, _, s)| (n.as_str(), s.as_deref())).collect();
            let kept: Vec<(&str, bool)> = volumes.iter().zip(&keep).filter(|(_, k)| **k).map(|(v, _)| *v).collect();
            let kept_disks: Vec<(&str, Option<&str>)> = disks.iter().zip(&keep).filter(|(_, k)| **k).map(|(d, _)| *d).collect();
            let removed = removals(&spec(&volumes, &disks), &spec(&kept, &kept_disks), true);
            for r in &removed {
                prop_assert!(volumes.iter().any(|(n, hot)| *n == r.volume && *hot), "only hotpluggable volumes: {r:?}");
                prop_assert!(!r.serial.is_empty());
            }
        }
    }
}
