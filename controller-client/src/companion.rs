//! Safe attach and detach, the algorithm of DESIGN.md.
//!
//! The invariant the detach path keeps, and the tests check: the hypervisor is asked to remove a volume only after
//! the guest's agent reported the disk released *in this same operation*, or when the caller forced it. A system
//! disk is never detached, forced or not. Attach returns only once the guest itself reports the disk.

use crate::agent_client::{AgentClient, ClientError};
use crate::hypervisor::{Hypervisor, HypervisorError, VolumeSpec, VolumeState};
use std::time::{Duration, Instant};
use tonic::Code;
use wukong_proto::v1::{Disk, DiskState, PrepareDetachResponse, ReleaseMethod, UsageReport};

/// Longest portable serial: QEMU's scsi-disk refuses more than 20 characters without a separate device id.
pub const MAX_SERIAL: usize = 20;

/// Why an attach or detach did not happen (or did not finish). Every message names the volume or serial.
#[derive(Debug, thiserror::Error)]
pub enum CompanionError {
    #[error("'{serial}' is not a portable serial: {why}; use at most 20 characters of a-z, 0-9, '.', '_' and '-'")]
    BadSerial { serial: String, why: &'static str },
    #[error("volume '{volume}' is attached to {hypervisor} with serial '{found}', not '{wanted}'")]
    SerialMismatch { volume: String, hypervisor: String, found: String, wanted: String },
    #[error("detach of disk '{serial}' refused; nothing was detached: {message}")]
    Refused { serial: String, message: String, report: Box<UsageReport> },
    #[error("disk '{serial}' is a system disk of the guest ({reason}); it is never detached, even with --force")]
    SystemDisk { serial: String, reason: String },
    #[error(
        "the guest's agent does not see disk '{serial}' ({message}); nothing was detached. If the guest really does \
         not use it, detach with --force"
    )]
    NotInGuest { serial: String, message: String },
    #[error(
        "cannot reach the guest's agent ({0}); nothing was detached (fail safe). Use --force only if nothing in the \
         guest can be using the disk"
    )]
    AgentUnreachable(Box<ClientError>),
    #[error("another release of disk '{0}' is running in the guest; retry when it has finished")]
    Busy(String),
    #[error("{hypervisor} refused to remove volume '{volume}': {error}; {undo}")]
    RemoveFailed { volume: String, hypervisor: String, error: Box<HypervisorError>, undo: String },
    #[error(
        "{hypervisor} attached volume '{volume}', but the guest did not report a disk with serial '{serial}' within \
         {seconds}s; check that wukong-agent runs in the guest and that the serial reaches it"
    )]
    GuestDidNotSee { volume: String, hypervisor: String, serial: String, seconds: u64 },
    #[error("{0}")]
    Timeout(String),
    #[error(transparent)]
    Hypervisor(Box<HypervisorError>),
    #[error("the guest's agent failed: {0}")]
    Agent(Box<ClientError>),
}

impl From<HypervisorError> for CompanionError {
    fn from(e: HypervisorError) -> Self {
        Self::Hypervisor(Box::new(e))
    }
}

/// Options of a detach.
#[derive(Debug, Clone)]
pub struct DetachOptions {
    pub volume: String,
    /// The disk's serial; by default the one the hypervisor reports, else the volume name (virtctl's default).
    pub serial: Option<String>,
    /// Let the agent unmount idle filesystems of the disk.
    pub unmount: bool,
    /// Skip the guest. Never for a system disk.
    pub force: bool,
    pub timeout: Duration,
    /// How often the hypervisor is polled while waiting.
    pub poll: Duration,
}

/// Options of an attach.
#[derive(Debug, Clone)]
pub struct AttachOptions {
    pub timeout: Duration,
    pub poll: Duration,
}

/// How long each step took, for reports and measurements.
pub type Timings = Vec<(&'static str, Duration)>;

/// A finished detach.
#[derive(Debug, Clone)]
pub struct Detached {
    pub serial: String,
    /// The volume was not attached: nothing was done.
    pub already: bool,
    pub forced: bool,
    /// The agent's release, unless forced.
    pub release: Option<PrepareDetachResponse>,
    pub timings: Timings,
}

/// A finished attach.
#[derive(Debug, Clone)]
pub struct Attached {
    /// The disk as the guest's agent reports it: dev node, by-id links, size.
    pub disk: Disk,
    /// The volume was attached already, with this serial.
    pub already: bool,
    pub timings: Timings,
}

/// Checks a serial given by the caller.
pub fn check_serial(serial: &str) -> Result<(), CompanionError> {
    let bad = |why| Err(CompanionError::BadSerial { serial: serial.into(), why });
    if serial.is_empty() {
        return bad("it is empty");
    }
    if serial.len() > MAX_SERIAL {
        return bad("it is longer than 20 characters");
    }
    if !serial.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b)) {
        return bad("it has characters other than lowercase letters, digits, '.', '_' and '-'");
    }
    Ok(())
}

/// A portable serial from a volume name: lowercased, other characters as '-', at most 20 characters.
pub fn derive_serial(volume: &str) -> Result<String, CompanionError> {
    let serial: String = volume
        .chars()
        .map(|c| c.to_ascii_lowercase())
        .map(|c| if c.is_ascii_alphanumeric() || "._-".contains(c) { c } else { '-' })
        .take(MAX_SERIAL)
        .collect();
    check_serial(&serial)?;
    Ok(serial)
}

/// Turns an agent error on PrepareDetach into the refusal it means.
fn refusal(serial: &str, e: ClientError) -> CompanionError {
    let message = e.to_string();
    match e.code() {
        _ if matches!(e, ClientError::Unreachable { .. } | ClientError::Timeout { .. }) => {
            CompanionError::AgentUnreachable(Box::new(e))
        }
        // With details when the disk is in use; without them for a system disk or an ambiguous serial, whose
        // sentence says which.
        Some(Code::FailedPrecondition) => CompanionError::Refused {
            serial: serial.into(),
            message,
            report: Box::new(e.refusal().and_then(|r| r.usage).unwrap_or_default()),
        },
        Some(Code::NotFound) => CompanionError::NotInGuest { serial: serial.into(), message },
        Some(Code::Aborted) => CompanionError::Busy(serial.into()),
        _ => CompanionError::Agent(Box::new(e)),
    }
}

/// Detaches a volume safely; see the module documentation for the invariant. `progress` hears each phase.
pub async fn detach<H: Hypervisor>(
    hypervisor: &H,
    agent: &AgentClient,
    options: &DetachOptions,
    progress: &(dyn Fn(&str) + Sync),
) -> Result<Detached, CompanionError> {
    let started = Instant::now();
    let mut timings = Timings::new();
    let volume = options.volume.as_str();
    let state = hypervisor.volume_state(volume).await?;
    let serial = match (&options.serial, &state) {
        (Some(s), _) => s.clone(),
        (None, VolumeState::Ready { serial: Some(s), .. }) => s.clone(),
        _ => volume.to_string(),
    };
    if state == VolumeState::Absent {
        tracing::info!(%serial, volume, hypervisor = %hypervisor.describe(), "volume is not attached; nothing to do");
        return Ok(Detached { serial, already: true, forced: options.force, release: None, timings });
    }
    tracing::info!(%serial, volume, hypervisor = %hypervisor.describe(), force = options.force, "detaching");
    let mut release = None;
    let step = Instant::now();
    if options.force {
        tracing::warn!(
            %serial, volume,
            "FORCED detach: the guest is not asked to release the disk; anything still using it loses its data"
        );
        // Forced or not, a system disk stays: ask the agent, if it answers.
        if let Ok(d) = agent.get_disk(&serial, false).await
            && d.system
        {
            return Err(CompanionError::SystemDisk { serial, reason: d.system_reason });
        }
    } else {
        progress(&format!("asking the guest to release disk '{serial}'"));
        let r = agent.prepare_detach(&serial, options.unmount, false).await.map_err(|e| refusal(&serial, e))?;
        if !r.released {
            let report = Box::new(r.usage.unwrap_or_default());
            return Err(CompanionError::Refused { serial, message: "the agent did not release it".into(), report });
        }
        tracing::info!(%serial, "the guest released the disk");
        release = Some(r);
        timings.push(("release in the guest", step.elapsed()));
    }

    let step = Instant::now();
    progress(&format!("removing volume '{volume}' from {}", hypervisor.describe()));
    if let Err(error) = hypervisor.remove_volume(volume).await {
        let undo = if release.is_some() {
            match agent.cancel_detach(&serial).await {
                Ok(_) => "the guest got its disk back (CancelDetach)".to_string(),
                Err(e) => format!(
                    "CancelDetach failed too ({e}); run `wukongctl cancel-release {serial}` in the guest to get the \
                     disk back"
                ),
            }
        } else {
            "nothing was changed in the guest".to_string()
        };
        tracing::error!(%serial, volume, error = %error, undo = %undo, "removing the volume failed");
        return Err(CompanionError::RemoveFailed {
            volume: volume.into(),
            hypervisor: hypervisor.describe(),
            error: Box::new(error),
            undo,
        });
    }
    timings.push(("remove request", step.elapsed()));

    let step = Instant::now();
    progress(&format!("waiting until {} and the guest agree volume '{volume}' is gone", hypervisor.describe()));
    let deadline = started + options.timeout;
    loop {
        let hypervisor_done = hypervisor.volume_state(volume).await? == VolumeState::Absent;
        // Forced with the agent down, the guest cannot be asked; the hypervisor's word is all there is.
        if hypervisor_done && gone_from_guest(agent, &serial, options.force).await {
            break;
        }
        if Instant::now() >= deadline {
            return Err(CompanionError::Timeout(format!(
                "volume '{volume}' was removed from {}, but {} within {}s",
                hypervisor.describe(),
                if hypervisor_done { "the guest still lists the disk" } else { "it still lists the volume" },
                options.timeout.as_secs()
            )));
        }
        tokio::time::sleep(options.poll).await;
    }
    timings.push(("unplug wait", step.elapsed()));
    tracing::info!(%serial, volume, elapsed = ?started.elapsed(), "detached");
    Ok(Detached { serial, already: false, forced: options.force, release, timings })
}

/// True when the agent no longer has the disk in the guest: unknown, or a released SCSI disk (deleted in the
/// guest, listed only so its release can be verified).
async fn gone_from_guest(agent: &AgentClient, serial: &str, forced: bool) -> bool {
    match agent.get_disk(serial, false).await {
        Ok(d) => d.state() == DiskState::Released && d.release_method() == ReleaseMethod::ScsiDelete,
        Err(e) if e.code() == Some(Code::NotFound) => true,
        Err(_) => forced,
    }
}

/// Attaches a volume and returns once the guest's agent reports the disk. Idempotent for the same volume and
/// serial.
pub async fn attach<H: Hypervisor>(
    hypervisor: &H,
    agent: &AgentClient,
    volume: &VolumeSpec,
    options: &AttachOptions,
    progress: &(dyn Fn(&str) + Sync),
) -> Result<Attached, CompanionError> {
    check_serial(&volume.serial)?;
    let started = Instant::now();
    let deadline = started + options.timeout;
    let mut timings = Timings::new();
    let name = volume.name.as_str();
    let state = hypervisor.volume_state(name).await?;
    let already = matches!(state, VolumeState::Ready { .. });
    match &state {
        VolumeState::Ready { serial: Some(found), .. } if !found.eq_ignore_ascii_case(&volume.serial) => {
            return Err(CompanionError::SerialMismatch {
                volume: name.into(),
                hypervisor: hypervisor.describe(),
                found: found.clone(),
                wanted: volume.serial.clone(),
            });
        }
        VolumeState::Absent => {
            progress(&format!("adding volume '{name}' to {}", hypervisor.describe()));
            tracing::info!(serial = %volume.serial, volume = name, hypervisor = %hypervisor.describe(), "attaching");
            hypervisor.add_volume(volume).await?;
        }
        _ => {}
    }
    let step = Instant::now();
    let mut last = state;
    while !matches!(last, VolumeState::Ready { .. }) {
        if let VolumeState::Pending { phase, .. } = &last {
            progress(&format!("volume '{name}': {phase}"));
        }
        if Instant::now() >= deadline {
            let detail = match &last {
                VolumeState::Pending { phase, message } => format!("last phase {phase}: {message}"),
                _ => "it never appeared in the volume status".into(),
            };
            return Err(CompanionError::Timeout(format!(
                "{} did not report volume '{name}' ready within {}s ({detail})",
                hypervisor.describe(),
                options.timeout.as_secs()
            )));
        }
        tokio::time::sleep(options.poll).await;
        last = hypervisor.volume_state(name).await?;
    }
    timings.push(("hypervisor attach", step.elapsed()));

    let step = Instant::now();
    progress(&format!("waiting for the guest to report disk '{}'", volume.serial));
    let remaining = deadline.saturating_duration_since(Instant::now()).max(Duration::from_secs(1));
    let disk = agent.wait_for_disk(&volume.serial, remaining).await.map_err(|e| match e.code() {
        Some(Code::DeadlineExceeded) => CompanionError::GuestDidNotSee {
            volume: name.into(),
            hypervisor: hypervisor.describe(),
            serial: volume.serial.clone(),
            seconds: options.timeout.as_secs(),
        },
        _ if matches!(e, ClientError::Unreachable { .. } | ClientError::Timeout { .. }) => {
            CompanionError::AgentUnreachable(Box::new(e))
        }
        _ => CompanionError::Agent(Box::new(e)),
    })?;
    timings.push(("guest sees it", step.elapsed()));
    tracing::info!(serial = %volume.serial, device = %disk.dev_node, elapsed = ?started.elapsed(), "attached");
    Ok(Attached { disk, already, timings })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serials_are_checked_and_derived_portably() {
        assert!(check_serial("data-1.x_y").is_ok());
        for bad in ["", "Data", "a/b", "x".repeat(21).as_str()] {
            assert!(matches!(check_serial(bad), Err(CompanionError::BadSerial { .. })), "{bad:?}");
        }
        assert_eq!(derive_serial("PG Data/2024-volume-long").unwrap(), "pg-data-2024-volume-");
        assert!(derive_serial("").is_err());
    }
}
