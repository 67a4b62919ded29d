//! Closing the guard's loop. The guard releases a disk before an update that unplugs it is stored; that update may
//! still fail (another webhook, a conflict), or KubeVirt may never unplug. The guest's disk is then released but
//! still plugged and still in the spec. The leader looks at every guarded VM (and standalone VMI) periodically and
//! gives such a disk back (`CancelDetach`) once it has stayed released for a grace period, with an Event.

use crate::guard::GUARD_LABEL;
use crate::{AgentAccess, MANAGER, Result, get, typed};
use k8s_openapi::api::core::v1::{Namespace, ObjectReference};
use kube::api::{Api, DynamicObject, ListParams};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::{Resource, ResourceExt};
use std::collections::HashMap;
use std::time::{Duration, Instant};
use wukong_controller_client::hypervisor::VolumeState;
use wukong_controller_client::kubevirt::{
    VirtualMachine, VirtualMachineInstance, resource, vm_resource, vmi_resource, volume_state_in,
};
use wukong_proto::v1::DiskState;

/// How often guarded VMs are looked at (at most; a shorter grace period looks more often).
const INTERVAL: Duration = Duration::from_secs(15);

/// Looks every [`INTERVAL`] (or grace period, if shorter) until the task is dropped; a failed pass is logged and the next one tries again.
pub async fn run(client: kube::Client, agent: AgentAccess, grace: Duration, identity: String) {
    let reporter = Reporter { controller: format!("{MANAGER}-guard"), instance: Some(identity) };
    let recorder = Recorder::new(client.clone(), reporter);
    // When each released disk was first seen released, on this clock: the guest's own clock may be off.
    let mut seen = HashMap::new();
    loop {
        if let Err(e) = pass(&client, &agent, grace, &recorder, &mut seen).await {
            tracing::warn!(error = %e, "looking for released disks still in a spec failed; trying again");
        }
        tokio::time::sleep(INTERVAL.min(grace)).await;
    }
}

/// The guarded objects: labelled ones, and every one in a labelled namespace.
async fn guarded(client: &kube::Client, kind: &str, plural: &str) -> Result<Vec<DynamicObject>> {
    let selector = ListParams::default().labels(&format!("{GUARD_LABEL}=enabled"));
    let r = resource(kind, plural);
    let mut objects = Api::<DynamicObject>::all_with(client.clone(), &r).list(&selector).await?.items;
    for ns in Api::<Namespace>::all(client.clone()).list(&selector).await? {
        let api = Api::<DynamicObject>::namespaced_with(client.clone(), &ns.name_any(), &r);
        objects.extend(
            api.list(&ListParams::default()).await?.items.into_iter().filter(|o| !o.labels().contains_key(GUARD_LABEL)),
        );
    }
    Ok(objects)
}

/// A released disk of a guest: (namespace, VMI, serial).
type Released = (String, String, String);

async fn pass(
    client: &kube::Client,
    access: &AgentAccess,
    grace: Duration,
    recorder: &Recorder,
    seen: &mut HashMap<Released, Instant>,
) -> Result<()> {
    let mut still = HashMap::new();
    let vmi_resource = vmi_resource();
    let mut targets: Vec<(ObjectReference, Option<VirtualMachine>, String)> = Vec::new();
    for vm in guarded(client, "VirtualMachine", "virtualmachines").await? {
        targets.push((vm.object_ref(&vm_resource()), Some(typed(&vm).unwrap_or_default()), vm.name_any()));
    }
    for vmi in guarded(client, "VirtualMachineInstance", "virtualmachineinstances").await? {
        // A VM's VMI is looked at through its VM, whose spec is the truth.
        if !vmi.owner_references().iter().any(|o| o.kind == "VirtualMachine") {
            targets.push((vmi.object_ref(&vmi_resource), None, vmi.name_any()));
        }
    }
    tracing::debug!(targets = targets.len(), "looking for released disks still in a spec");
    for (reference, vm, name) in targets {
        let ns = reference.namespace.clone().unwrap_or_default();
        let Some(vmi) = get::<VirtualMachineInstance>(client, &ns, &vmi_resource, &name).await? else { continue };
        let Some(Ok(agent)) = access.connect(&vmi) else { continue };
        let disks = match agent.list_disks(false).await {
            Ok(disks) => disks,
            Err(e) => {
                tracing::debug!(%ns, %name, error = %e, "cannot list the guest's disks");
                continue;
            }
        };
        let spec = match &vm {
            Some(vm) => vm.spec.template.as_ref().map(|t| t.spec.clone()).unwrap_or_default(),
            None => vmi.spec.clone(),
        };
        for disk in disks.iter().filter(|d| d.state() == DiskState::Released) {
            let key = (ns.clone(), name.clone(), disk.serial.clone());
            let since = seen.get(&key).copied().unwrap_or_else(Instant::now);
            still.insert(key, since);
            let released_for = since.elapsed();
            // The volume whose disk this is, still in the spec, plugged and not being removed.
            let serial_of = |v: &str| {
                let entry = spec.domain.devices.disks.iter().find(|d| d.name == v);
                entry.and_then(|d| d.serial.clone()).unwrap_or_else(|| v.to_string())
            };
            let Some(volume) = spec.volumes.iter().find(|v| serial_of(&v.name).eq_ignore_ascii_case(&disk.serial))
            else {
                continue;
            };
            let plugged = matches!(volume_state_in(&vmi, vm.as_ref(), &volume.name), VolumeState::Ready { .. });
            tracing::debug!(%ns, %name, serial = %disk.serial, plugged, ?released_for, "a released disk still in the spec");
            if !plugged || released_for < grace {
                continue;
            }
            if let Err(e) = agent.cancel_detach(&disk.serial).await {
                tracing::warn!(%ns, %name, serial = %disk.serial, error = %e, "cannot give a released disk back");
                continue;
            }
            let note = format!(
                "disk '{}' (volume {}) stayed released {}s for an unplug that did not happen (the update was not \
                 stored, or KubeVirt did not unplug); the guest got it back (CancelDetach)",
                disk.serial,
                volume.name,
                released_for.as_secs()
            );
            tracing::info!(%ns, %name, "{note}");
            let event = Event {
                type_: EventType::Normal,
                reason: "ReleaseCancelled".into(),
                note: Some(note),
                action: "CancelDetach".into(),
                secondary: None,
            };
            if let Err(e) = recorder.publish(&event, &reference).await {
                tracing::warn!(error = %e, "cannot record the ReleaseCancelled Event");
            }
        }
    }
    *seen = still;
    Ok(())
}
