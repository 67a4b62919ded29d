//! KubeVirt v1.9's own validating webhooks on VMs and VMIs, as far as they decide hot-plug and vsock: registered with
//! the lab's API server as KubeVirt's operator registers `virt-api-validator` (components/webhooks.go
//! `NewVirtAPIValidatingWebhookConfiguration`: `failurePolicy: Fail`, 10 s, a Service reference to virt-api) and
//! answered by the lab's virt-api server, as virt-api answers them. The API server calls every validating webhook
//! of an update at once, so another webhook (the wukong guard) sees updates these refuse.
//!
//! * `/virtualmachineinstances-validate-create` (vmi-create-admitter.go `VMICreateAdmitter.Admit`): a VMI with
//!   `autoattachVSOCK` only with the `VSOCK` gate (`validateVSOCK`).
//! * `/virtualmachineinstances-validate-update` (vmi-update-admitter.go `VMIUpdateAdmitter.Admit`): a VMI's spec
//!   changes only by KubeVirt's service accounts ("update of VMI object is restricted"), and then only as hot-plug
//!   allows (storagehotplug.go `AdmitHotplugStorage`).
//! * `/virtualmachines-validate` (vms-admitter.go `VMsAdmitter.Admit`): every disk of the template has its volume
//!   (vmi-create-admitter.go `validateBootOrder`; a CD-ROM may be empty, DeclarativeHotplugVolumes being beta and on
//!   in both of the lab's modes: the lab never disables it). A volume
//!   without a disk is admitted: KubeVirt gives it a default disk when it starts the VMI (`SetDefaultVolumeDisk`).
//!   The template passes `validateVSOCK` too.

use crate::kubevirt_lab::{KUBEVIRT_NAMESPACE, resource};
use anyhow::Result;
use kube::api::{Api, DynamicObject, PostParams};
use serde_json::{Value, json};

/// Where virt-api answers the VMI create admitter (components/webhooks.go `VMICreateValidatePath`).
pub const VMI_CREATE_PATH: &str = "/virtualmachineinstances-validate-create";
/// Where virt-api answers the VMI update admitter (components/webhooks.go `VMIUpdateValidatePath`).
pub const VMI_UPDATE_PATH: &str = "/virtualmachineinstances-validate-update";
/// Where virt-api answers the VM admitter (`VMValidatePath`).
pub const VM_PATH: &str = "/virtualmachines-validate";

/// KubeVirt's service accounts in the lab's KubeVirt namespace (pkg/virt-api/webhooks/serviceaccounts.go
/// `KubeVirtServiceAccounts`).
fn is_kubevirt(user: &str) -> bool {
    ["kubevirt-apiserver", "kubevirt-controller", "kubevirt-handler", "kubevirt-synchronization-controller"]
        .iter()
        .any(|account| user == format!("system:serviceaccount:{KUBEVIRT_NAMESPACE}:{account}"))
}

/// Registers `virt-api-validator`'s VM, VMI create and VMI update webhooks, pointing at virt-api's Service on `port`
/// and trusting `ca_pem`.
pub(crate) async fn register(client: &kube::Client, port: u16, ca_pem: &str) -> Result<()> {
    use base64::Engine;
    let webhook = |name: &str, path: &str, plural: &str, operations: Value| {
        json!({"name": name, "admissionReviewVersions": ["v1"], "failurePolicy": "Fail", "timeoutSeconds": 10,
               "sideEffects": "None",
               "rules": [{"operations": operations, "apiGroups": ["kubevirt.io"], "apiVersions": ["v1"],
                          "resources": [plural]}],
               "clientConfig": {"caBundle": base64::engine::general_purpose::STANDARD.encode(ca_pem),
                                "service": {"namespace": KUBEVIRT_NAMESPACE, "name": "virt-api", "path": path,
                                            "port": port}}})
    };
    let configuration = serde_json::from_value(json!({
        "apiVersion": "admissionregistration.k8s.io/v1", "kind": "ValidatingWebhookConfiguration",
        "metadata": {"name": "virt-api-validator"},
        "webhooks": [
            webhook("virtualmachineinstances-create-validator.kubevirt.io", VMI_CREATE_PATH,
                    "virtualmachineinstances", json!(["CREATE"])),
            webhook("virtualmachineinstances-update-validator.kubevirt.io", VMI_UPDATE_PATH,
                    "virtualmachineinstances", json!(["UPDATE"])),
            webhook("virtualmachine-validator.kubevirt.io", VM_PATH, "virtualmachines", json!(["CREATE", "UPDATE"])),
        ],
    }))?;
    let api = Api::<DynamicObject>::all_with(
        client.clone(),
        &resource(
            "ValidatingWebhookConfiguration",
            "admissionregistration.k8s.io",
            "v1",
            "validatingwebhookconfigurations",
        ),
    );
    api.create(&PostParams::default(), &configuration).await?;
    Ok(())
}

/// The AdmissionReview answering `review` (the body the API server POSTed to `path`), with the `VSOCK` gate on or
/// off.
pub(crate) fn answer(path: &str, review: &Value, vsock_gate: bool) -> Value {
    let request = &review["request"];
    let refusal = match path {
        VMI_CREATE_PATH => validate_vsock(&request["object"]["spec"], vsock_gate),
        VMI_UPDATE_PATH => admit_vmi_update(request),
        VM_PATH => admit_vm(request, vsock_gate),
        other => Some(format!("the lab's virt-api serves no webhook at {other}")),
    };
    let mut response = json!({"uid": request["uid"], "allowed": refusal.is_none()});
    if let Some(message) = refusal {
        // `webhookutils.ToAdmissionResponse`: the causes' messages joined with ", ", reason Invalid, code 422.
        response["status"] = json!({"message": message, "reason": "Invalid", "code": 422});
    }
    json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "response": response})
}

/// `VMIUpdateAdmitter.Admit`, its spec and hot-plug rules: the refusal's message, if any.
fn admit_vmi_update(request: &Value) -> Option<String> {
    let (new, old) = (&request["object"], &request["oldObject"]);
    if new["spec"] == old["spec"] {
        return None;
    }
    // "Only allow the KubeVirt SA to modify the VMI spec, since that means it went through the sub resource."
    if !is_kubevirt(request["userInfo"]["username"].as_str().unwrap_or_default()) {
        return Some("update of VMI object is restricted".into());
    }
    admit_hotplug_storage(&new["spec"], &old["spec"], &old["status"]["volumeStatus"])
}

/// `VMsAdmitter.Admit`, its template's `ValidateVirtualMachineInstanceSpec` as far as the lab plays it: the rule
/// that pairs disks with volumes (`validateBootOrder`, with its field path), then `validateVSOCK`.
fn admit_vm(request: &Value, vsock_gate: bool) -> Option<String> {
    let spec = &request["object"]["spec"]["template"]["spec"];
    let volumes = list(&spec["volumes"]);
    let disk_without_volume = list(&spec["domain"]["devices"]["disks"]).iter().enumerate().find_map(|(index, disk)| {
        let has_volume = named(&volumes, &disk["name"]).is_some();
        (!has_volume && !disk["cdrom"].is_object())
            .then(|| format!("spec.template.spec.domain.devices.disks[{index}].Name '{}' not found.", name_of(disk)))
    });
    let causes: Vec<String> = disk_without_volume.into_iter().chain(validate_vsock(spec, vsock_gate)).collect();
    (!causes.is_empty()).then(|| causes.join(", "))
}

/// `validateVSOCK` (vmi-create-admitter.go) of a VMI spec: `autoattachVSOCK` needs the `VSOCK` gate.
fn validate_vsock(spec: &Value, vsock_gate: bool) -> Option<String> {
    (spec["domain"]["devices"]["autoattachVSOCK"] == true && !vsock_gate)
        .then(|| "VSOCK feature gate is not enabled in kubevirt-config".to_string())
}

/// `AdmitHotplugStorage` (pkg/storage/admitters/storagehotplug.go) for a VMI's new and old spec; a volume is
/// permanent when its status entry has no `hotplugVolume` (`getPermanentVolumes`).
fn admit_hotplug_storage(new: &Value, old: &Value, statuses: &Value) -> Option<String> {
    let (new_volumes, old_volumes) = (list(&new["volumes"]), list(&old["volumes"]));
    let (new_disks, old_disks) = (list(&new["domain"]["devices"]["disks"]), list(&old["domain"]["devices"]["disks"]));
    // `validateExpectedDisksAndFilesystems`: a disk or filesystem for each volume but a memory dump.
    let declared = new_volumes.iter().filter(|v| v["memoryDump"].is_null()).count();
    let empty_drives =
        new_disks.iter().filter(|d| named(&new_volumes, &d["name"]).is_none() && d["cdrom"].is_object()).count();
    let required = list(&new["domain"]["devices"]["filesystems"]).len() + new_disks.len() - empty_drives;
    if declared != required {
        return Some(format!("mismatch between volumes declared ({declared}) and required ({required})"));
    }
    let permanent =
        |volume: &Value| list(statuses).iter().any(|s| s["name"] == volume["name"] && s["hotplugVolume"].is_null());
    let (new_permanent, old_permanent): (Vec<&Value>, Vec<&Value>) =
        (new_volumes.iter().filter(|v| permanent(v)).collect(), old_volumes.iter().filter(|v| permanent(v)).collect());
    // `verifyPermanentVolumes` (migrated volumes aside: the lab migrates nothing).
    if new_permanent.len() != old_permanent.len() {
        return Some("Number of permanent volumes has changed".into());
    }
    for volume in new_permanent {
        let name = name_of(volume);
        match old_permanent.iter().find(|v| v["name"] == volume["name"]) {
            None => return Some(format!("permanent volume {name}, not found")),
            Some(old) if *old != volume => return Some(format!("permanent volume {name}, changed")),
            Some(_) if named(&new_disks, &volume["name"]) != named(&old_disks, &volume["name"]) => {
                return Some(format!("permanent disk {name}, changed"));
            }
            Some(_) => {}
        }
    }
    // `verifyHotplugVolumes`.
    for volume in new_volumes.iter().filter(|v| !permanent(v)) {
        let name = name_of(volume);
        let disk = named(&new_disks, &volume["name"]);
        let dump = !volume["memoryDump"].is_null();
        match named(&old_volumes, &volume["name"]) {
            Some(old) if old != volume => return Some(format!("hotplug volume {name}, changed")),
            Some(_) if dump => {}
            Some(_) if disk.is_none() => return Some(format!("volume {name} doesn't have a matching disk")),
            Some(_) if disk != named(&old_disks, &volume["name"]) => {
                return Some(format!("hotplug disk {name}, changed"));
            }
            Some(_) => {}
            None if volume["dataVolume"].is_null() && volume["persistentVolumeClaim"].is_null() && !dump => {
                return Some(format!("volume {name} is not a PVC or DataVolume"));
            }
            None if dump => {}
            None => match disk {
                None => return Some(format!("disk {name} does not exist")),
                Some(disk) if named(&old_disks, &volume["name"]).is_none() => {
                    if let Some(refusal) = hotplug_disk_configuration(disk, name) {
                        return Some(refusal);
                    }
                }
                Some(_) => {}
            },
        }
    }
    None
}

/// `ValidateHotplugDiskConfiguration` with the prefix "Hotplug configuration": a hot-plugged disk is a `disk` on
/// the scsi or virtio bus, or a `lun` on scsi.
fn hotplug_disk_configuration(disk: &Value, name: &str) -> Option<String> {
    let bus = |device: &str| disk[device]["bus"].as_str().unwrap_or_default().to_string();
    if disk["disk"].is_object() {
        let bus = bus("disk");
        return (!matches!(bus.as_str(), "scsi" | "virtio")).then(|| {
            format!(
                "Hotplug configuration for disk [{name}] requires bus to be 'scsi' or 'virtio'. [{bus}] is not \
                 permitted."
            )
        });
    }
    if disk["lun"].is_object() {
        let bus = bus("lun");
        return (bus != "scsi").then(|| {
            format!("Hotplug configuration for LUN [{name}] requires bus to be 'scsi'. [{bus}] is not permitted.")
        });
    }
    Some(format!("Hotplug configuration for [{name}] requires diskDevice of type 'disk' or 'lun' to be used."))
}

fn list(value: &Value) -> Vec<Value> {
    value.as_array().cloned().unwrap_or_default()
}

fn named<'a>(list: &'a [Value], name: &Value) -> Option<&'a Value> {
    list.iter().find(|v| v["name"] == *name)
}

fn name_of(value: &Value) -> &str {
    value["name"].as_str().unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::kubevirt_lab::API_SERVER as VIRT_API;

    fn spec(volumes: &[&str], disks: &[Value]) -> Value {
        let volumes: Vec<Value> = volumes
            .iter()
            .map(|n| match *n {
                "root" => json!({"name": "root", "containerDisk": {"image": "x"}}),
                n => {
                    json!({"name": n, "persistentVolumeClaim": {"claimName": format!("pvc-{n}"), "hotpluggable": true}})
                }
            })
            .collect();
        json!({"domain": {"devices": {"disks": disks}}, "volumes": volumes})
    }

    fn disk(name: &str, bus: &str) -> Value {
        json!({"name": name, "disk": {"bus": bus}})
    }

    fn vmi_review(user: &str, old: Value, new: Value) -> Value {
        let statuses = json!([{"name": "root"}, {"name": "data", "hotplugVolume": {}}]);
        json!({"request": {"uid": "u1", "userInfo": {"username": user},
                           "object": {"spec": new}, "oldObject": {"spec": old, "status": {"volumeStatus": statuses}}}})
    }

    fn refusal(path: &str, review: &Value) -> Option<String> {
        refusal_with(path, review, false)
    }

    fn refusal_with(path: &str, review: &Value, vsock_gate: bool) -> Option<String> {
        let answer = answer(path, review, vsock_gate);
        assert_eq!(answer["response"]["uid"], "u1");
        match answer["response"]["allowed"].as_bool() {
            Some(true) => None,
            _ => Some(answer["response"]["status"]["message"].as_str().unwrap().to_string()),
        }
    }

    #[test]
    fn only_kubevirt_changes_a_vmis_spec_and_only_as_hotplug_allows() {
        let old = spec(&["root", "data"], &[disk("root", "virtio"), disk("data", "scsi")]);
        let dropped = spec(&["root"], &[disk("root", "virtio")]);
        let user = refusal(VMI_UPDATE_PATH, &vmi_review("alice", old.clone(), dropped.clone()));
        assert_eq!(user.as_deref(), Some("update of VMI object is restricted"));
        assert_eq!(refusal(VMI_UPDATE_PATH, &vmi_review(VIRT_API, old.clone(), dropped)), None);
        let mut status_only = vmi_review("alice", old.clone(), old.clone());
        status_only["request"]["object"]["status"] = json!({"phase": "Running"});
        assert_eq!(refusal(VMI_UPDATE_PATH, &status_only), None, "the spec is unchanged");
        let cases = [
            (
                spec(&["root"], &[disk("root", "virtio"), disk("data", "scsi")]),
                "mismatch between volumes declared (1) and required (2)",
            ),
            (
                spec(&["root", "data"], &[disk("root", "virtio")]),
                "mismatch between volumes declared (2) and required (1)",
            ),
            (spec(&["data"], &[disk("data", "scsi")]), "Number of permanent volumes has changed"),
            (spec(&["root", "data"], &[disk("root", "virtio"), disk("data", "virtio")]), "hotplug disk data, changed"),
            (
                spec(&["root", "data", "new"], &[disk("root", "virtio"), disk("data", "scsi"), disk("new", "sata")]),
                "Hotplug configuration for disk [new] requires bus to be 'scsi' or 'virtio'. [sata] is not permitted.",
            ),
        ];
        for (new, message) in cases {
            assert_eq!(refusal(VMI_UPDATE_PATH, &vmi_review(VIRT_API, old.clone(), new)).as_deref(), Some(message));
        }
        let added =
            spec(&["root", "data", "new"], &[disk("root", "virtio"), disk("data", "scsi"), disk("new", "virtio")]);
        assert_eq!(refusal(VMI_UPDATE_PATH, &vmi_review(VIRT_API, old, added)), None);
    }

    #[test]
    fn every_disk_of_a_vms_template_needs_its_volume_but_not_the_other_way_round() {
        let review =
            |template: Value| json!({"request": {"uid": "u1", "object": {"spec": {"template": {"spec": template}}}}});
        let volume_gone = spec(&["root"], &[disk("root", "virtio"), disk("data", "scsi")]);
        assert_eq!(
            refusal(VM_PATH, &review(volume_gone)).as_deref(),
            Some("spec.template.spec.domain.devices.disks[1].Name 'data' not found.")
        );
        let disk_gone = spec(&["root", "data"], &[disk("root", "virtio")]);
        assert_eq!(refusal(VM_PATH, &review(disk_gone)), None);
        let empty_drive = spec(&["root"], &[disk("root", "virtio"), json!({"name": "iso", "cdrom": {"bus": "sata"}})]);
        assert_eq!(refusal(VM_PATH, &review(empty_drive)), None, "an empty CD-ROM drive");
    }

    #[test]
    fn vsock_needs_its_feature_gate_on_vmis_and_vm_templates() {
        let gate = "VSOCK feature gate is not enabled in kubevirt-config";
        let mut vmi = spec(&["root"], &[disk("root", "virtio")]);
        vmi["domain"]["devices"]["autoattachVSOCK"] = json!(true);
        let create = json!({"request": {"uid": "u1", "object": {"spec": vmi}}});
        assert_eq!(refusal_with(VMI_CREATE_PATH, &create, false).as_deref(), Some(gate));
        assert_eq!(refusal_with(VMI_CREATE_PATH, &create, true), None);

        let mut template = spec(&["root"], &[disk("root", "virtio"), disk("data", "scsi")]);
        template["domain"]["devices"]["autoattachVSOCK"] = json!(true);
        let vm = json!({"request": {"uid": "u1", "object": {"spec": {"template": {"spec": template}}}}});
        let both = format!("spec.template.spec.domain.devices.disks[1].Name 'data' not found., {gate}");
        assert_eq!(refusal_with(VM_PATH, &vm, false), Some(both), "every cause, joined");
        let without_gate = refusal_with(VM_PATH, &vm, true);
        assert_eq!(without_gate.as_deref(), Some("spec.template.spec.domain.devices.disks[1].Name 'data' not found."));
    }
}
