//! What the companion needs from a hypervisor: add a volume, remove it, and say where it is. One trait, two
//! backends: KubeVirt ([`crate::kubevirt`]) and plain QEMU over QMP ([`crate::qemu`]).

use std::future::Future;
use std::path::PathBuf;

/// The bus a hot-plugged disk hangs off in the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DiskBus {
    /// virtio-scsi (`scsi-hd`): thousands of disks, and the guest can delete the device before unplug.
    Scsi,
    /// virtio-blk: one PCI slot per disk.
    Virtio,
}

impl DiskBus {
    pub fn as_str(self) -> &'static str {
        match self {
            DiskBus::Scsi => "scsi",
            DiskBus::Virtio => "virtio",
        }
    }
}

/// Where a volume's data lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VolumeSource {
    /// A Kubernetes PersistentVolumeClaim (KubeVirt).
    PersistentVolumeClaim(String),
    /// A CDI DataVolume (KubeVirt).
    DataVolume(String),
    /// An image file on the QEMU host.
    Image { path: PathBuf, format: String },
}

/// A volume to attach.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeSpec {
    /// Volume name (KubeVirt) or device id (QEMU).
    pub name: String,
    /// The serial the guest sees.
    pub serial: String,
    pub bus: DiskBus,
    pub source: VolumeSource,
}

/// Where a volume is, as the hypervisor sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VolumeState {
    /// Not attached, and not on its way.
    Absent,
    /// Attaching: known to the hypervisor, not ready yet.
    Pending { phase: String, message: String },
    /// Attached and ready.
    Ready { serial: Option<String>, target: String },
    /// Being removed: the hypervisor was asked to remove it (by anyone) and has not finished. Nothing can stop
    /// that any more; a detach joins it instead of asking again or giving the disk back.
    Removing { phase: String, message: String },
}

/// What became of a removal request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Removal {
    /// This request started the removal.
    Requested,
    /// The hypervisor was already removing the volume (an earlier detach, or another tool); nothing was changed.
    AlreadyInProgress,
}

/// A hypervisor error, named by what happened, carrying the hypervisor's own message.
#[derive(Debug, thiserror::Error)]
pub enum HypervisorError {
    #[error("{what} not found: {message}")]
    NotFound { what: String, message: String },
    #[error("{what} refused the request (conflict): {message}")]
    Conflict { what: String, message: String },
    #[error(
        "{what}: the Kubernetes API refused this identity: {message}; the ClusterRole in deploy/companion-rbac.yaml \
         grants what the companion needs"
    )]
    Forbidden { what: String, message: String },
    #[error("{what} rejected the request as invalid: {message}")]
    Invalid { what: String, message: String },
    #[error("{what} failed (HTTP {code}): {message}")]
    Server { what: String, code: u16, message: String },
    #[error("cannot reach {what}: {message}")]
    Unreachable { what: String, message: String },
    #[error("{what} answered something this client does not understand: {message}")]
    Decode { what: String, message: String },
    #[error("QEMU at {what}: {source}")]
    Qmp { what: String, source: crate::qmp::QmpError },
}

/// A hypervisor that can hot-plug volumes.
pub trait Hypervisor: Send + Sync {
    /// What this is, for messages: "VMI ns/name", "QEMU at /run/vm.qmp".
    fn describe(&self) -> String;
    /// Asks the hypervisor to attach the volume. Returns once the request is accepted, not when it is done.
    fn add_volume(&self, volume: &VolumeSpec) -> impl Future<Output = Result<(), HypervisorError>> + Send;
    /// Asks the hypervisor to detach the volume. Returns once the request is accepted, or once the hypervisor says
    /// a removal is already under way.
    fn remove_volume(&self, name: &str) -> impl Future<Output = Result<Removal, HypervisorError>> + Send;
    /// Where the volume is now.
    fn volume_state(&self, name: &str) -> impl Future<Output = Result<VolumeState, HypervisorError>> + Send;
    /// Why a removal of the volume, accepted now, would not be carried out while the guest runs (`None`: it would
    /// be). Asked before the guest releases the disk: a released disk that stays plugged is of no use to anyone.
    fn unplug_blocker(&self, name: &str) -> impl Future<Output = Result<Option<String>, HypervisorError>> + Send {
        let _ = name;
        std::future::ready(Ok(None))
    }
    /// What the attached volume is plugged from: its claim, DataVolume or image file. `None`: the volume is not
    /// attached, or this hypervisor cannot tell. A move reads it to plug the same storage into another VM.
    fn volume_source(&self, name: &str) -> impl Future<Output = Result<Option<VolumeSource>, HypervisorError>> + Send {
        let _ = name;
        std::future::ready(Ok(None))
    }
    /// Tidies what the hypervisor keeps after the volume is gone (QEMU: its block node). Idempotent; called once
    /// [`Hypervisor::volume_state`] reports [`VolumeState::Absent`].
    fn finish_removal(&self, name: &str) -> impl Future<Output = Result<(), HypervisorError>> + Send {
        let _ = name;
        std::future::ready(Ok(()))
    }
}
