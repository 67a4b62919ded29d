//! What to do for each disk, decided from what is wanted (the spec), what was recorded (the status) and what is
//! observed (claims, the VM, its VMI). Pure: every branch is unit-tested here; `reconcile` carries the steps out.

use crate::crd::{DetachOptions, DiskSpec, Phase, VolumeStatus};
use wukong_controller_client::hypervisor::VolumeState;

/// The name of the disk that is the system disk when one is called so.
pub const SYSTEM_DISK_NAME: &str = "system";

/// Where a disk's claim stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClaimState {
    Bound,
    /// Pending because its StorageClass binds a claim only once a Pod uses it (`WaitForFirstConsumer`), or because
    /// the class cannot be read (no RBAC for StorageClasses): KubeVirt's attachment Pod is that Pod, so the disk is
    /// hot-plugged now, and KubeVirt's attach waits for the bind.
    AwaitsConsumer,
    /// Pending for any other reason: wait.
    Pending,
}

/// What is observed of one disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Observed {
    /// The claim `<vm>-<disk>`, `None` when it does not exist.
    pub claim: Option<ClaimState>,
    /// The DataVolume `<vm>-<disk>`: `None` when it does not exist, else its phase.
    pub data_volume: Option<String>,
    /// The disk is made from a DataVolume (its `source`, or a blank one), not a bare claim.
    pub from_data_volume: bool,
    /// The VM's spec lists a volume of this name.
    pub in_vm: bool,
    /// The volume as the running VMI has it; `None` when the VM is not running.
    pub vmi: Option<VolumeState>,
    /// A move of the disk to or from another object.
    pub moving: Option<Moving>,
}

/// A move of one disk between two objects ([`crate::moves`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Moving {
    /// Another object asks for this disk (its `moveFrom`) and can have it; `handed_over`: the claim is its own
    /// already.
    Out { handed_over: bool },
    /// Another object asks for this disk and cannot have it now: the disk stays, and its claim is kept whatever the
    /// options say.
    Refused,
    /// This disk comes from another object (`moveFrom`), which has not handed its claim over yet.
    In,
}

/// The one thing to do for a disk on this pass.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// The system disk, listed: part of the VM's own definition; reported, never touched.
    KeepSystemDisk,
    /// The system disk left the list: refused, nothing touched.
    RefuseSystemDiskRemoval,
    /// Create the claim.
    CreateClaim,
    /// The claim exists and is not bound yet.
    WaitForClaim,
    /// Create the DataVolume that fills the disk from its `source` (CDI makes its claim).
    CreateDataVolume,
    /// The DataVolume exists and is not ready to be plugged yet (CDI is filling it, or failed).
    WaitForDataVolume,
    /// The VM runs: hot-plug through the companion and wait until the guest sees the disk (idempotent; gives
    /// back a guest copy released by an interrupted detach).
    Attach,
    /// The VM is stopped and its spec lacks the disk: add it there (plugged at the next boot).
    AddToStoppedVm,
    /// The VM is stopped and its spec has the disk: nothing to do until it starts.
    WaitForBoot,
    /// The disk left the list and the VM runs with it: the companion's safe detach with the options in force.
    Detach(DetachOptions),
    /// The disk left the list and the VM is stopped: take it out of the VM's spec (no guest can use it).
    RemoveFromStoppedVm,
    /// The disk left the list and is gone from the VM: delete the claim unless kept, and forget the disk.
    Finish { delete_claim: bool },
    /// Moving out, and gone from the VM: hand the claim over to the object that asked for it.
    HandOver,
    /// Moved out: the claim is the other object's. Shown as `Moved` while listed, forgotten once not.
    Moved,
    /// Moving in: wait until the source's VM let the disk go and its claim is handed over.
    AwaitMove,
}

impl Step {
    /// Takes a disk out of the VM, or deletes its storage: planned only from a fresh read of the VM and its VMI,
    /// never from a watch cache that may lag (a VM taken for stopped while it runs would lose a disk in use).
    pub fn removes(&self) -> bool {
        matches!(self, Step::Detach(_) | Step::RemoveFromStoppedVm | Step::Finish { .. } | Step::HandOver)
    }
}

/// One disk's plan.
#[derive(Debug, Clone, PartialEq)]
pub struct DiskPlan {
    pub name: String,
    pub system: bool,
    /// The disk as listed, or `None` when it left the list.
    pub wanted: Option<DiskSpec>,
    /// The disk as last recorded in status.
    pub recorded: Option<VolumeStatus>,
    pub step: Step,
}

/// The system disk: one recorded as such (it never stops being the system disk, even if the list changes: an
/// object made when the first disk was the system disk keeps it), else the disk marked `system: true`, else the
/// disk named `system`. No other: a list of data disks has no system disk.
pub fn system_disk<'a>(disks: &'a [DiskSpec], recorded: &'a [VolumeStatus]) -> Option<&'a str> {
    recorded
        .iter()
        .find(|v| v.system)
        .map(|v| v.name.as_str())
        .or_else(|| disks.iter().find(|d| d.system).map(|d| d.name.as_str()))
        .or_else(|| disks.iter().find(|d| d.name == SYSTEM_DISK_NAME).map(|d| d.name.as_str()))
}

/// A DataVolume in this phase can be plugged, as KubeVirt decides (pkg/storage/types/pvc.go
/// `VolumeReadyToAttachToNode`, with CDI's `IsSucceededOrPendingPopulation`): filled (`Succeeded`), or waiting for
/// its consumer (`PendingPopulation`, and `WaitForFirstConsumer`, for which KubeVirt starts a Pod that lets CDI
/// fill it, `triggerHotplugPopulation`).
pub fn data_volume_pluggable(phase: &str) -> bool {
    matches!(phase, "Succeeded" | "PendingPopulation" | "WaitForFirstConsumer")
}

/// Plans every disk that is listed or recorded: listed ones in list order, then the removed ones.
pub fn plan(disks: &[DiskSpec], recorded: &[VolumeStatus], observe: impl Fn(&str) -> Observed) -> Vec<DiskPlan> {
    let system = system_disk(disks, recorded).map(str::to_string);
    let listed = disks.iter().map(|d| (d.name.as_str(), Some(d)));
    let removed = recorded.iter().filter(|v| !disks.iter().any(|d| d.name == v.name)).map(|v| (v.name.as_str(), None));
    listed
        .chain(removed)
        .map(|(name, wanted)| {
            let recorded = recorded.iter().find(|v| v.name == name).cloned();
            let is_system = system.as_deref() == Some(name);
            let step = step(wanted, recorded.as_ref(), is_system, &observe(name));
            DiskPlan { name: name.to_string(), system: is_system, wanted: wanted.cloned(), recorded, step }
        })
        .collect()
}

fn step(wanted: Option<&DiskSpec>, recorded: Option<&VolumeStatus>, system: bool, seen: &Observed) -> Step {
    let present = seen.in_vm || seen.vmi.as_ref().is_some_and(|s| *s != VolumeState::Absent);
    if !system && let Some(step) = move_step(wanted, recorded, seen) {
        return step;
    }
    match wanted {
        Some(_) if system => Step::KeepSystemDisk,
        Some(_) => match (seen.from_data_volume, &seen.data_volume, seen.claim, &seen.vmi) {
            (true, None, _, _) if !present => Step::CreateDataVolume,
            (true, Some(phase), _, _) if !present && !data_volume_pluggable(phase) => Step::WaitForDataVolume,
            (false, _, None, _) if !present => Step::CreateClaim,
            (false, _, Some(ClaimState::Pending), _) if !present => Step::WaitForClaim,
            (_, _, _, Some(_)) => Step::Attach,
            (_, _, _, None) if seen.in_vm => Step::WaitForBoot,
            (_, _, _, None) => Step::AddToStoppedVm,
        },
        None if system => Step::RefuseSystemDiskRemoval,
        None => {
            let mut options = recorded.map(|r| r.detach_options.clone()).unwrap_or_default();
            // Another object asks for it: whatever happens here, its claim is not ours to delete.
            options.preserve_data |= seen.moving == Some(Moving::Refused);
            match &seen.vmi {
                Some(state) if *state != VolumeState::Absent => Step::Detach(options),
                None if seen.in_vm => Step::RemoveFromStoppedVm,
                // Running, gone from the VMI, but still in the VM's spec: the detach removes it from the spec.
                Some(_) if seen.in_vm => Step::Detach(options),
                _ => Step::Finish { delete_claim: !options.preserve_data },
            }
        }
    }
}

/// A data disk's step in a move, if it is in one. Moved stays moved while listed: the claim is another object's, and
/// making the disk again under its name would take it back.
fn move_step(wanted: Option<&DiskSpec>, recorded: Option<&VolumeStatus>, seen: &Observed) -> Option<Step> {
    if recorded.is_some_and(|r| r.phase == Phase::Moved) {
        return Some(Step::Moved);
    }
    match seen.moving? {
        Moving::Out { handed_over: true } => Some(Step::Moved),
        Moving::Out { handed_over: false } => {
            let options = wanted.map(|w| &w.detach_options).or(recorded.map(|r| &r.detach_options));
            let options = DetachOptions { preserve_data: true, ..options.cloned().unwrap_or_default() };
            Some(match &seen.vmi {
                Some(state) if *state != VolumeState::Absent => Step::Detach(options),
                None if seen.in_vm => Step::RemoveFromStoppedVm,
                Some(_) if seen.in_vm => Step::Detach(options),
                _ => Step::HandOver,
            })
        }
        Moving::In if wanted.is_some() => Some(Step::AwaitMove),
        Moving::In | Moving::Refused => None,
    }
}

/// How long to wait before retrying a refused detach: 15 s, doubling, at most 5 min.
pub fn refusal_backoff(attempt: u32) -> std::time::Duration {
    let seconds = 15u64.saturating_mul(1u64 << attempt.saturating_sub(1).min(5));
    std::time::Duration::from_secs(seconds.min(300))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::{BlankSource, Bus, DiskSource};
    use std::time::Duration;

    fn disk(name: &str) -> DiskSpec {
        DiskSpec { name: name.into(), size: Some("1Gi".into()), ..Default::default() }
    }

    fn system(name: &str) -> DiskSpec {
        DiskSpec { system: true, ..disk(name) }
    }

    fn recorded(name: &str, options: DetachOptions) -> VolumeStatus {
        VolumeStatus {
            name: name.into(),
            pvc_name: format!("vm-{name}"),
            bound: true,
            size: "1Gi".into(),
            phase: Phase::Attached,
            serial: name.into(),
            bus: Bus::Scsi,
            detach_options: options,
            ..Default::default()
        }
    }

    fn ready() -> Option<VolumeState> {
        Some(VolumeState::Ready { serial: None, target: "sda".into() })
    }

    fn seen(claim_bound: Option<bool>, in_vm: bool, vmi: Option<VolumeState>) -> Observed {
        let claim = claim_bound.map(|b| if b { ClaimState::Bound } else { ClaimState::Pending });
        Observed { claim, data_volume: None, from_data_volume: false, in_vm, vmi, moving: None }
    }

    /// The step for disk "data" (the system disk is "root", listed first).
    fn step_of(listed: bool, options: &DetachOptions, observed: Observed) -> Step {
        step_of_disk(listed.then(|| disk("data")), options, observed)
    }

    fn step_of_disk(data: Option<DiskSpec>, options: &DetachOptions, observed: Observed) -> Step {
        let disks: Vec<DiskSpec> = [system("root")].into_iter().chain(data).collect();
        let status = [recorded("root", DetachOptions::default()), recorded("data", options.clone())];
        let plans =
            plan(&disks, &status, |name| if name == "data" { observed.clone() } else { seen(None, true, None) });
        plans.into_iter().find(|p| p.name == "data").expect("data is planned").step
    }

    #[test]
    fn a_listed_disk_goes_from_claim_to_guest() {
        let none = DetachOptions::default();
        let absent = Some(VolumeState::Absent);
        assert_eq!(step_of(true, &none, seen(None, false, absent.clone())), Step::CreateClaim);
        assert_eq!(step_of(true, &none, seen(None, false, None)), Step::CreateClaim);
        assert_eq!(step_of(true, &none, seen(Some(false), false, absent.clone())), Step::WaitForClaim);
        assert_eq!(step_of(true, &none, seen(Some(true), false, absent)), Step::Attach);
        assert_eq!(step_of(true, &none, seen(Some(true), true, ready())), Step::Attach);
        // A disk already in the VM (attached before its claim was lost from view) is not re-created first.
        assert_eq!(step_of(true, &none, seen(None, true, ready())), Step::Attach);
        // A claim whose class waits for a first consumer binds only once KubeVirt's attachment Pod uses it.
        let awaits =
            Observed { claim: Some(ClaimState::AwaitsConsumer), ..seen(None, false, Some(VolumeState::Absent)) };
        assert_eq!(step_of(true, &none, awaits.clone()), Step::Attach);
        assert_eq!(step_of(true, &none, Observed { vmi: None, ..awaits }), Step::AddToStoppedVm);
        let removing = Some(VolumeState::Removing { phase: "Detaching".into(), message: String::new() });
        assert_eq!(step_of(true, &none, seen(Some(true), false, removing)), Step::Attach);
        assert_eq!(step_of(true, &none, seen(Some(true), false, None)), Step::AddToStoppedVm);
        assert_eq!(step_of(true, &none, seen(Some(true), true, None)), Step::WaitForBoot);
    }

    #[test]
    fn a_removed_disk_is_detached_with_the_options_recorded_while_it_was_listed() {
        let kept = DetachOptions { preserve_data: true, unmount: true, ..Default::default() };
        assert_eq!(step_of(false, &kept, seen(Some(true), true, ready())), Step::Detach(kept.clone()));
        let pending = Some(VolumeState::Pending { phase: "Bound".into(), message: String::new() });
        assert_eq!(step_of(false, &kept, seen(Some(true), true, pending)), Step::Detach(kept.clone()));
        assert_eq!(
            step_of(false, &kept, seen(Some(true), true, Some(VolumeState::Absent))),
            Step::Detach(kept.clone())
        );
        assert_eq!(step_of(false, &kept, seen(Some(true), true, None)), Step::RemoveFromStoppedVm);
        assert_eq!(
            step_of(false, &kept, seen(Some(true), false, Some(VolumeState::Absent))),
            Step::Finish { delete_claim: false }
        );
        let forced = DetachOptions { force: true, ..Default::default() };
        assert_eq!(step_of(false, &forced, seen(Some(true), true, ready())), Step::Detach(forced.clone()));
        assert_eq!(step_of(false, &forced, seen(None, false, None)), Step::Finish { delete_claim: true });
    }

    #[test]
    fn a_disk_with_a_source_is_plugged_once_cdi_lets_kubevirt_plug_it() {
        let none = DetachOptions::default();
        let blank = DiskSpec {
            source: Some(Box::new(DiskSource { blank: Some(BlankSource {}), ..Default::default() })),
            ..disk("data")
        };
        let with = |phase: Option<&str>, vmi: Option<VolumeState>| Observed {
            data_volume: phase.map(str::to_string),
            from_data_volume: true,
            ..seen(phase.map(|_| false), false, vmi)
        };
        let absent = Some(VolumeState::Absent);
        let step = |phase, vmi| step_of_disk(Some(blank.clone()), &none, with(phase, vmi));
        assert_eq!(step(None, absent.clone()), Step::CreateDataVolume);
        for phase in ["Pending", "ImportScheduled", "ImportInProgress", "CloneInProgress", "Failed", "Unknown"] {
            assert_eq!(step(Some(phase), absent.clone()), Step::WaitForDataVolume, "{phase}");
        }
        for phase in ["Succeeded", "PendingPopulation", "WaitForFirstConsumer"] {
            assert_eq!(step(Some(phase), absent.clone()), Step::Attach, "{phase}");
            assert_eq!(step(Some(phase), None), Step::AddToStoppedVm, "{phase}");
        }
        // Plugged already (a DataVolume deleted behind our back is not made again under the guest).
        assert_eq!(step(None, ready()), Step::Attach);
    }

    #[test]
    fn the_system_disk_is_never_touched() {
        let disks = [system("root"), disk("data")];
        let plans = plan(&disks, &[], |_| seen(None, false, Some(VolumeState::Absent)));
        assert_eq!(plans[0].step, Step::KeepSystemDisk);
        assert!(plans[0].system);
        assert_eq!(plans[1].step, Step::CreateClaim);
        // No disk marked or named so: every disk is a data disk, the first too.
        let plans = plan(&[disk("root"), disk("data")], &[], |_| seen(None, false, Some(VolumeState::Absent)));
        let steps: Vec<_> = plans.iter().map(|p| (p.system, p.step.clone())).collect();
        assert_eq!(steps, [(false, Step::CreateClaim), (false, Step::CreateClaim)]);
        // An object whose status recorded its first disk as the system disk (the old rule) keeps it.
        let mut root = recorded("root", DetachOptions::default());
        root.system = true;
        let plans = plan(&[disk("root"), disk("data")], &[root], |_| seen(None, false, Some(VolumeState::Absent)));
        assert_eq!((plans[0].system, plans[0].step.clone()), (true, Step::KeepSystemDisk));
        // Named "system": that one, wherever it is listed.
        let disks = [disk("data"), disk(SYSTEM_DISK_NAME)];
        let plans = plan(&disks, &[], |_| seen(None, false, None));
        assert_eq!((plans[0].step.clone(), plans[1].step.clone()), (Step::CreateClaim, Step::KeepSystemDisk));
        // Removed, even forced: refused. And the next disk does not become the system disk.
        let mut root = recorded("root", DetachOptions { force: true, ..Default::default() });
        root.system = true;
        let plans = plan(&[disk("data")], &[root, recorded("data", DetachOptions::default())], |_| {
            seen(Some(true), true, ready())
        });
        let steps: Vec<_> = plans.iter().map(|p| (p.name.as_str(), p.system, p.step.clone())).collect();
        assert_eq!(steps, [("data", false, Step::Attach), ("root", true, Step::RefuseSystemDiskRemoval)]);
    }

    #[test]
    fn a_disk_moving_out_is_detached_with_its_claim_kept_then_handed_over() {
        let deleting = DetachOptions { unmount: true, ..Default::default() };
        let kept = DetachOptions { preserve_data: true, ..deleting.clone() };
        let out = |handed_over, in_vm, vmi| Observed {
            moving: Some(Moving::Out { handed_over }),
            ..seen(Some(true), in_vm, vmi)
        };
        for listed in [true, false] {
            // Listed or not, the disk leaves, with its claim kept whatever the options say.
            let options = if listed { DetachOptions::default() } else { deleting.clone() };
            let expected = DetachOptions { preserve_data: true, unmount: !listed, ..Default::default() };
            assert_eq!(step_of(listed, &options, out(false, true, ready())), Step::Detach(expected), "{listed}");
            assert_eq!(step_of(listed, &options, out(false, true, None)), Step::RemoveFromStoppedVm);
            assert_eq!(step_of(listed, &options, out(false, false, Some(VolumeState::Absent))), Step::HandOver);
            assert_eq!(step_of(listed, &options, out(false, false, None)), Step::HandOver);
            assert_eq!(step_of(listed, &options, out(true, false, None)), Step::Moved);
        }
        // Asked for by an object that cannot have it: a removal keeps the claim; a listed disk stays.
        let refused = |vmi| Observed { moving: Some(Moving::Refused), ..seen(Some(true), false, vmi) };
        assert_eq!(step_of(false, &deleting, refused(None)), Step::Finish { delete_claim: false });
        assert_eq!(step_of(false, &deleting, refused(ready())), Step::Detach(kept));
        assert_eq!(step_of(true, &deleting, refused(ready())), Step::Attach);
        // The system disk never moves.
        let plans = plan(&[system("root")], &[], |_| out(false, true, ready()));
        assert_eq!(plans[0].step, Step::KeepSystemDisk);
    }

    #[test]
    fn a_moved_disk_stays_moved_while_listed_and_is_never_made_again() {
        let disks = [system("root"), disk("data")];
        let mut moved = recorded("data", DetachOptions::default());
        moved.phase = Phase::Moved;
        // Its claim is another object's, so none is seen: without the record it would be made again.
        let plans = plan(&disks, &[recorded("root", DetachOptions::default()), moved.clone()], |_| {
            seen(None, false, Some(VolumeState::Absent))
        });
        assert_eq!(plans[1].step, Step::Moved);
        let plans = plan(&disks[..1], &[moved], |_| seen(None, false, Some(VolumeState::Absent)));
        assert_eq!(plans[1].step, Step::Moved, "unlisted: forgotten, nothing deleted");
        assert!(!Step::Moved.removes() && Step::HandOver.removes());
    }

    #[test]
    fn a_disk_moving_in_waits_for_its_claim() {
        let moving_in = Observed { moving: Some(Moving::In), ..seen(None, false, Some(VolumeState::Absent)) };
        assert_eq!(step_of(true, &DetachOptions::default(), moving_in.clone()), Step::AwaitMove);
        assert_eq!(step_of(true, &DetachOptions::default(), Observed { vmi: None, ..moving_in }), Step::AwaitMove);
    }

    #[test]
    fn nothing_listed_or_recorded_plans_nothing() {
        assert!(plan(&[], &[], |_| unreachable!("no disk to observe")).is_empty());
    }

    #[test]
    fn refusals_back_off_from_15_seconds_to_5_minutes() {
        let delays: Vec<u64> = (1..=8).map(|a| refusal_backoff(a).as_secs()).collect();
        assert_eq!(delays, [15, 30, 60, 120, 240, 300, 300, 300]);
        assert_eq!(refusal_backoff(0), Duration::from_secs(15));
        assert_eq!(refusal_backoff(u32::MAX), Duration::from_secs(300));
    }
}
