//! What to do for each disk, decided from what is wanted (the spec), what was recorded (the status) and what is
//! observed (claims, the VM, its VMI). Pure: every branch is unit-tested here; `reconcile` carries the steps out.

use crate::crd::{DetachOptions, DiskSpec, VolumeStatus};
use wukong_controller_client::hypervisor::VolumeState;

/// The name of the disk that is the system disk when one is called so.
pub const SYSTEM_DISK_NAME: &str = "system";

/// What is observed of one disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Observed {
    /// The claim `<vm>-<disk>`: `None` when it does not exist, else whether it is bound.
    pub claim_bound: Option<bool>,
    /// The VM's spec lists a volume of this name.
    pub in_vm: bool,
    /// The volume as the running VMI has it; `None` when the VM is not running.
    pub vmi: Option<VolumeState>,
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

/// The system disk: one recorded as such (it never stops being the system disk, even if the list changes),
/// else the disk named `system`, else the first.
pub fn system_disk<'a>(disks: &'a [DiskSpec], recorded: &'a [VolumeStatus]) -> Option<&'a str> {
    recorded
        .iter()
        .find(|v| v.system)
        .map(|v| v.name.as_str())
        .or_else(|| disks.iter().find(|d| d.name == SYSTEM_DISK_NAME).map(|d| d.name.as_str()))
        .or_else(|| disks.first().map(|d| d.name.as_str()))
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
    match wanted {
        Some(_) if system => Step::KeepSystemDisk,
        Some(_) => match (seen.claim_bound, &seen.vmi) {
            (None, _) if !present => Step::CreateClaim,
            (Some(false), _) if !present => Step::WaitForClaim,
            (_, Some(_)) => Step::Attach,
            (_, None) if seen.in_vm => Step::WaitForBoot,
            (_, None) => Step::AddToStoppedVm,
        },
        None if system => Step::RefuseSystemDiskRemoval,
        None => {
            let options = recorded.map(|r| r.detach_options).unwrap_or_default();
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

/// How long to wait before retrying a refused detach: 15 s, doubling, at most 5 min.
pub fn refusal_backoff(attempt: u32) -> std::time::Duration {
    let seconds = 15u64.saturating_mul(1u64 << attempt.saturating_sub(1).min(5));
    std::time::Duration::from_secs(seconds.min(300))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::{Bus, Phase};
    use std::time::Duration;

    fn disk(name: &str) -> DiskSpec {
        DiskSpec { name: name.into(), size: "1Gi".into(), ..Default::default() }
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
        Observed { claim_bound, in_vm, vmi }
    }

    /// The step for disk "data" (the system disk is "root", listed first).
    fn step_of(listed: bool, options: DetachOptions, observed: Observed) -> Step {
        let disks = if listed { vec![disk("root"), disk("data")] } else { vec![disk("root")] };
        let status = [recorded("root", DetachOptions::default()), recorded("data", options)];
        let plans =
            plan(&disks, &status, |name| if name == "data" { observed.clone() } else { seen(None, true, None) });
        plans.into_iter().find(|p| p.name == "data").expect("data is planned").step
    }

    #[test]
    fn a_listed_disk_goes_from_claim_to_guest() {
        let none = DetachOptions::default();
        let absent = Some(VolumeState::Absent);
        assert_eq!(step_of(true, none, seen(None, false, absent.clone())), Step::CreateClaim);
        assert_eq!(step_of(true, none, seen(None, false, None)), Step::CreateClaim);
        assert_eq!(step_of(true, none, seen(Some(false), false, absent.clone())), Step::WaitForClaim);
        assert_eq!(step_of(true, none, seen(Some(true), false, absent)), Step::Attach);
        assert_eq!(step_of(true, none, seen(Some(true), true, ready())), Step::Attach);
        // A disk already in the VM (attached before its claim was lost from view) is not re-created first.
        assert_eq!(step_of(true, none, seen(None, true, ready())), Step::Attach);
        let removing = Some(VolumeState::Removing { phase: "Detaching".into(), message: String::new() });
        assert_eq!(step_of(true, none, seen(Some(true), false, removing)), Step::Attach);
        assert_eq!(step_of(true, none, seen(Some(true), false, None)), Step::AddToStoppedVm);
        assert_eq!(step_of(true, none, seen(Some(true), true, None)), Step::WaitForBoot);
    }

    #[test]
    fn a_removed_disk_is_detached_with_the_options_recorded_while_it_was_listed() {
        let kept = DetachOptions { preserve_data: true, unmount: true, force: false };
        assert_eq!(step_of(false, kept, seen(Some(true), true, ready())), Step::Detach(kept));
        let pending = Some(VolumeState::Pending { phase: "Bound".into(), message: String::new() });
        assert_eq!(step_of(false, kept, seen(Some(true), true, pending)), Step::Detach(kept));
        assert_eq!(step_of(false, kept, seen(Some(true), true, Some(VolumeState::Absent))), Step::Detach(kept));
        assert_eq!(step_of(false, kept, seen(Some(true), true, None)), Step::RemoveFromStoppedVm);
        assert_eq!(
            step_of(false, kept, seen(Some(true), false, Some(VolumeState::Absent))),
            Step::Finish { delete_claim: false }
        );
        let forced = DetachOptions { force: true, ..Default::default() };
        assert_eq!(step_of(false, forced, seen(Some(true), true, ready())), Step::Detach(forced));
        assert_eq!(step_of(false, forced, seen(None, false, None)), Step::Finish { delete_claim: true });
    }

    #[test]
    fn the_system_disk_is_never_touched() {
        let disks = [disk("root"), disk("data")];
        let plans = plan(&disks, &[], |_| seen(None, false, Some(VolumeState::Absent)));
        assert_eq!(plans[0].step, Step::KeepSystemDisk);
        assert!(plans[0].system);
        assert_eq!(plans[1].step, Step::CreateClaim);
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
