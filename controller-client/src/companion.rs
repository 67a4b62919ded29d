//! Safe attach and detach, the algorithm of DESIGN.md.
//!
//! The invariant the detach path keeps, and the tests check: the hypervisor is asked to remove a volume only after
//! the guest's agent reported the disk released *in this same operation*, or when the caller forced it. A system
//! disk is never detached, forced or not. Attach returns only once the guest itself reports the disk.
//!
//! `detach` is safe to call again at any point, and should be: after a timeout, a crash, or on every reconcile.
//! A volume the hypervisor is already removing (this detach's earlier run, or another tool) is joined: no second
//! removal is sent, the guest is asked to release the disk if it has not yet, and the call waits. The guest gets its
//! disk back (`CancelDetach`) only when the hypervisor refused the removal *and* still has the volume attached and
//! not being removed; when that cannot be told, the disk stays released, which is safe, and the error says so.

use crate::agent_client::{AgentClient, ClientError};
use crate::hypervisor::{Hypervisor, HypervisorError, Removal, VolumeSource, VolumeSpec, VolumeState};
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
    #[error(
        "'{name}' is not a volume name: {why}; KubeVirt's volume names are DNS labels (a-z, 0-9 and '-', at most 63 \
         characters, starting with a letter)"
    )]
    BadVolumeName { name: String, why: &'static str },
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
        "cannot talk to the guest's agent ({0}); nothing was detached (fail safe). Use --force only if nothing in \
         the guest can be using the disk"
    )]
    AgentUnreachable(Box<ClientError>),
    #[error("another release of disk '{0}' is running in the guest; retry when it has finished")]
    Busy(String),
    #[error(
        "{hypervisor} would not hot-unplug volume '{volume}': {reason}; nothing was changed (the guest was not asked \
         to release it)"
    )]
    WouldNotUnplug { volume: String, hypervisor: String, reason: String },
    #[error("{hypervisor} refused to remove volume '{volume}': {error}; {undo}")]
    RemoveFailed { volume: String, hypervisor: String, error: Box<HypervisorError>, undo: String },
    #[error(
        "{hypervisor} is already removing volume '{volume}' (not at this detach's request), and the guest did not \
         release disk '{serial}' first: {reason}. Nothing can stop that removal from here: stop what uses the disk in \
         the guest now"
    )]
    RemovalUnguarded { volume: String, hypervisor: String, serial: String, reason: String, report: Box<UsageReport> },
    #[error(
        "the removal of volume '{volume}' is in progress but did not finish within {seconds}s ({detail}); {guest}. \
         Run detach again to wait for it"
    )]
    RemovalPending { volume: String, detail: String, guest: String, seconds: u64 },
    #[error(
        "{hypervisor} attached volume '{volume}', but the guest did not report a disk with serial '{serial}' within \
         {seconds}s; check that wukong-agent runs in the guest and that the serial reaches it"
    )]
    GuestDidNotSee { volume: String, hypervisor: String, serial: String, seconds: u64 },
    #[error(
        "{hypervisor} attached volume '{volume}', but this client cannot talk to the guest's agent to confirm the guest \
         sees it ({error}); check that wukong-agent runs in the guest and is reachable"
    )]
    AttachUnconfirmed { volume: String, hypervisor: String, error: Box<ClientError> },
    #[error(
        "volume '{volume}' stays plugged, with disk '{serial}' released in the guest (nothing in it can use the disk), \
         until {why}; run detach again to go on"
    )]
    UnplugHeld { volume: String, serial: String, why: String },
    #[error("volume '{volume}' was not unplugged: {why}; {undo}")]
    UnplugVetoed { volume: String, why: String, undo: String },
    #[error(
        "a move of volume '{0}' is never forced: a move exists to keep the data, and a forced detach loses what the \
         source guest has not written yet; stop what uses the disk there (or add --unmount), or detach with --force \
         and attach yourself"
    )]
    ForcedMove(String),
    #[error(
        "{target} already has a volume '{volume}', plugged from {found}, not from {wanted}; nothing was moved: give \
         the target volume another name (--to-volume)"
    )]
    TargetTaken { volume: String, target: String, found: String, wanted: String },
    #[error(
        "the target guest already has a disk with serial '{serial}' ({dev}), which is not volume '{volume}'; nothing \
         was moved: give the disk another serial (--serial)"
    )]
    SerialTaken { serial: String, volume: String, dev: String },
    #[error(
        "cannot talk to the agent of the target guest ({error}); nothing was moved: the source keeps volume \
         '{volume}'. Check that wukong-agent runs in the target guest and is reachable"
    )]
    MoveTargetUnreachable { volume: String, error: Box<ClientError> },
    #[error(
        "volume '{volume}' is neither in {from} nor, as '{to_volume}', in {to}; nothing was changed. If a move of it \
         stopped after its detach, say what to plug (--image FILE, or --claim / --data-volume) and its --serial to finish \
         it"
    )]
    NothingToMove { volume: String, from: String, to: String, to_volume: String },
    #[error(
        "volume '{volume}' is detached from {from} and not attached to {to} as '{to_volume}': {error}. Run the same \
         move again to finish it"
    )]
    MoveIncomplete { volume: String, to_volume: String, from: String, to: String, error: Box<CompanionError> },
    #[error("{0}")]
    Timeout(String),
    #[error(transparent)]
    Hypervisor(Box<HypervisorError>),
    #[error("the guest's agent failed: {0}")]
    Agent(Box<ClientError>),
}

impl CompanionError {
    /// True when the hypervisor is removing the volume (asked by this detach, an earlier one, or another tool): the
    /// removal goes on whatever happens next, and running detach again waits for it.
    pub fn removal_in_progress(&self) -> bool {
        matches!(self, Self::RemovalPending { .. } | Self::RemovalUnguarded { .. })
    }
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

/// What a detach asks between the guest's release of the disk and the unplug: the operator takes a snapshot of the
/// released (so consistent) disk there. The detach's invariant holds whatever it answers.
pub trait UnplugGate: Sync {
    /// Asked once the guest released disk `serial` in this detach (or, forced, without a release), before the
    /// hypervisor is asked to remove the volume. Not asked when the hypervisor is already removing it.
    fn before_unplug(&self, serial: &str) -> impl Future<Output = Gate> + Send;
}

/// A gate's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Gate {
    /// Unplug now.
    Open,
    /// Not yet, for this reason: the disk stays released and plugged ([`CompanionError::UnplugHeld`]); a detach
    /// run again releases nothing new and asks again.
    Hold(String),
    /// Not this time, for this reason: the guest gets the disk back ([`CompanionError::UnplugVetoed`]).
    Veto(String),
}

/// No gate: the unplug follows the release.
pub struct Ungated;

impl UnplugGate for Ungated {
    async fn before_unplug(&self, _serial: &str) -> Gate {
        Gate::Open
    }
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
    /// Who asked the hypervisor to remove it: this detach, or an earlier request it joined. `None` when `already`.
    pub removal: Option<Removal>,
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

/// Longest volume name: KubeVirt's volume names are DNS labels.
pub const MAX_VOLUME_NAME: usize = 63;

/// Checks a volume name by KubeVirt's rule (a DNS label: lowercase letters, digits and '-', at most 63, starting
/// and ending with a letter or digit), which also makes it a valid QEMU device id when it starts with a letter.
pub fn check_volume_name(name: &str) -> Result<(), CompanionError> {
    let bad = |why| Err(CompanionError::BadVolumeName { name: name.into(), why });
    if name.is_empty() {
        return bad("it is empty");
    }
    if name.len() > MAX_VOLUME_NAME {
        return bad("it is longer than 63 characters");
    }
    if !name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-') {
        return bad("it has characters other than lowercase letters, digits and '-'");
    }
    if !name.starts_with(|c: char| c.is_ascii_lowercase()) || name.ends_with('-') {
        return bad("it must start with a letter and end with a letter or digit");
    }
    Ok(())
}

/// The serial virtctl would give a volume: its name. A name longer than a portable serial is refused rather than
/// cut short, since two names with the same first 20 characters would then share a serial.
pub fn derive_serial(volume: &str) -> Result<String, CompanionError> {
    check_volume_name(volume)?;
    if volume.len() > MAX_SERIAL {
        return Err(CompanionError::BadSerial {
            serial: volume.into(),
            why: "the volume name is longer than 20 characters, the longest portable serial; give one with --serial",
        });
    }
    Ok(volume.to_string())
}

/// Turns an agent error on PrepareDetach into the refusal it means.
fn refusal(serial: &str, e: ClientError) -> CompanionError {
    let message = e.to_string();
    match e.code() {
        _ if e.is_unreachable() => CompanionError::AgentUnreachable(Box::new(e)),
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

/// Detaches a volume safely; see the module documentation for the invariant and why it may be called again.
/// `progress` hears each phase.
pub async fn detach<H: Hypervisor>(
    hypervisor: &H,
    agent: &AgentClient,
    options: &DetachOptions,
    progress: &(dyn Fn(&str) + Sync),
) -> Result<Detached, CompanionError> {
    detach_gated(hypervisor, agent, options, &Ungated, progress).await
}

/// [`detach`], with `gate` asked between the guest's release and the unplug.
pub async fn detach_gated<H: Hypervisor, G: UnplugGate>(
    hypervisor: &H,
    agent: &AgentClient,
    options: &DetachOptions,
    gate: &G,
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
        hypervisor.finish_removal(volume).await?;
        tracing::info!(%serial, volume, hypervisor = %hypervisor.describe(), "volume is not attached; nothing to do");
        return Ok(Detached { serial, already: true, removal: None, forced: options.force, release: None, timings });
    }
    let removing = matches!(state, VolumeState::Removing { .. });
    // A removal the hypervisor would accept but never carry out leaves the guest's disk released and plugged: ask
    // before anything changes.
    if !removing && let Some(reason) = hypervisor.unplug_blocker(volume).await? {
        return Err(CompanionError::WouldNotUnplug {
            volume: volume.into(),
            hypervisor: hypervisor.describe(),
            reason,
        });
    }
    tracing::info!(%serial, volume, hypervisor = %hypervisor.describe(), force = options.force, removing, "detaching");
    let step = Instant::now();
    let release = release(hypervisor, agent, options, &serial, removing, progress).await?;
    if release.is_some() {
        timings.push(("release in the guest", step.elapsed()));
    }

    if !removing {
        let step = Instant::now();
        match gate.before_unplug(&serial).await {
            Gate::Open => {}
            Gate::Hold(why) => {
                return Err(CompanionError::UnplugHeld { volume: volume.into(), serial, why });
            }
            Gate::Veto(why) => {
                let undo = match &release {
                    None => "nothing was changed in the guest".to_string(),
                    Some(_) => match agent.cancel_detach(&serial).await {
                        Ok(_) => format!("the guest got disk '{serial}' back (CancelDetach)"),
                        Err(e) => format!(
                            "CancelDetach failed ({e}): disk '{serial}' stays released; run `wukongctl cancel-release \
                             {serial}` in the guest to get it back"
                        ),
                    },
                };
                tracing::warn!(%serial, volume, %why, %undo, "the unplug was vetoed");
                return Err(CompanionError::UnplugVetoed { volume: volume.into(), why, undo });
            }
        }
        timings.push(("before the unplug", step.elapsed()));
    }

    let step = Instant::now();
    let removal = if removing {
        tracing::info!(%serial, volume, "the hypervisor is already removing the volume; joining that removal");
        Removal::AlreadyInProgress
    } else {
        progress(&format!("removing volume '{volume}' from {}", hypervisor.describe()));
        match hypervisor.remove_volume(volume).await {
            Ok(removal) => removal,
            Err(error) => removal_refused(hypervisor, agent, volume, &serial, release.is_some(), error).await?,
        }
    };
    if removal == Removal::AlreadyInProgress {
        progress(&format!("{} is already removing volume '{volume}'; waiting for it", hypervisor.describe()));
    }
    timings.push(("remove request", step.elapsed()));

    let step = Instant::now();
    progress(&format!("waiting until {} and the guest agree volume '{volume}' is gone", hypervisor.describe()));
    let deadline = started + options.timeout;
    let mut finished = false;
    loop {
        let state = hypervisor.volume_state(volume).await?;
        let hypervisor_done = state == VolumeState::Absent;
        if hypervisor_done {
            // The guest is asked while the hypervisor tidies up after the volume (QEMU's `blockdev-del` waits up to
            // 50 ms for its RCU thread): neither waits for the other. Forced with the agent down, the guest cannot
            // be asked; the hypervisor's word is all there is.
            let tidied = async { if finished { Ok(()) } else { hypervisor.finish_removal(volume).await } };
            let (tidied, gone) = tokio::join!(tidied, gone_from_guest(agent, &serial, options.force));
            tidied?;
            finished = true;
            if gone {
                break;
            }
        }
        if Instant::now() >= deadline {
            let detail = match hypervisor_done {
                true => format!("{} removed it, but the guest still lists disk '{serial}'", hypervisor.describe()),
                false => match state {
                    VolumeState::Removing { phase, message } | VolumeState::Pending { phase, message } => {
                        format!("{} still lists it, in phase {phase}: {message}", hypervisor.describe())
                    }
                    _ => format!("{} still lists it", hypervisor.describe()),
                },
            };
            let guest = match &release {
                Some(_) => format!("the guest released disk '{serial}', so nothing in it can use the disk"),
                None => format!("the guest was not asked to release disk '{serial}'"),
            };
            return Err(CompanionError::RemovalPending {
                volume: volume.into(),
                detail,
                guest,
                seconds: options.timeout.as_secs(),
            });
        }
        tokio::time::sleep(options.poll).await;
    }
    timings.push(("unplug wait", step.elapsed()));
    tracing::info!(%serial, volume, elapsed = ?started.elapsed(), ?removal, "detached");
    Ok(Detached { serial, already: false, removal: Some(removal), forced: options.force, release, timings })
}

/// The guest's side of a detach: the agent releases the disk (idempotent: a disk released by an earlier run is
/// reported released again), or, forced, nothing but the system-disk check. `removing`: the hypervisor is already
/// removing the volume, so a refusal cannot stop anything and says so, and a disk the guest does not have needs
/// no release.
async fn release<H: Hypervisor>(
    hypervisor: &H,
    agent: &AgentClient,
    options: &DetachOptions,
    serial: &str,
    removing: bool,
    progress: &(dyn Fn(&str) + Sync),
) -> Result<Option<PrepareDetachResponse>, CompanionError> {
    if options.force {
        tracing::warn!(
            %serial, volume = options.volume,
            "FORCED detach: the guest is not asked to release the disk; anything still using it loses its data"
        );
        // Forced or not, a system disk stays: ask the agent, if it answers.
        if let Ok(d) = agent.get_disk(serial, false).await
            && d.system
        {
            return Err(CompanionError::SystemDisk { serial: serial.into(), reason: d.system_reason });
        }
        return Ok(None);
    }
    progress(&format!("asking the guest to release disk '{serial}'"));
    let refused = match agent.prepare_detach(serial, options.unmount, false).await {
        Ok(r) if r.released => {
            tracing::info!(%serial, "the guest released the disk");
            return Ok(Some(r));
        }
        Ok(r) => CompanionError::Refused {
            serial: serial.into(),
            message: "the agent did not release it".into(),
            report: Box::new(r.usage.unwrap_or_default()),
        },
        Err(e) if removing && e.code() == Some(Code::NotFound) => {
            tracing::info!(%serial, "the guest does not have the disk; nothing to release before the removal ends");
            return Ok(None);
        }
        Err(e) => refusal(serial, e),
    };
    if !removing {
        return Err(refused);
    }
    let report = match &refused {
        CompanionError::Refused { report, .. } => report.clone(),
        _ => Box::default(),
    };
    Err(CompanionError::RemovalUnguarded {
        volume: options.volume.clone(),
        hypervisor: hypervisor.describe(),
        serial: serial.into(),
        reason: refused.to_string(),
        report,
    })
}

/// The hypervisor refused the removal. Whether the guest gets its disk back depends on what the hypervisor says
/// *now*: only a volume still attached and not being removed is given back; a removal under way (a retry that lost
/// a race, another tool) is joined; when the state cannot be read, the disk stays released, which is safe.
async fn removal_refused<H: Hypervisor>(
    hypervisor: &H,
    agent: &AgentClient,
    volume: &str,
    serial: &str,
    released: bool,
    error: HypervisorError,
) -> Result<Removal, CompanionError> {
    let failed = |undo: String, error: HypervisorError| {
        tracing::error!(%serial, volume, error = %error, undo = %undo, "removing the volume failed");
        CompanionError::RemoveFailed {
            volume: volume.into(),
            hypervisor: hypervisor.describe(),
            error: Box::new(error),
            undo,
        }
    };
    let undo = match hypervisor.volume_state(volume).await {
        Ok(VolumeState::Removing { .. } | VolumeState::Absent) => {
            tracing::info!(%serial, volume, error = %error, "the removal request failed, but a removal is under way");
            return Ok(Removal::AlreadyInProgress);
        }
        Err(state_error) => format!(
            "could not tell whether the volume is being removed ({state_error}), so the guest keeps disk '{serial}' \
             released{}; run detach again: it finishes a removal under way, or asks again",
            if released { " (nothing in it can use the disk)" } else { "" }
        ),
        Ok(_) if !released => "nothing was changed in the guest".to_string(),
        Ok(_) => match agent.cancel_detach(serial).await {
            Ok(_) => "the guest got its disk back (CancelDetach)".to_string(),
            Err(e) => format!(
                "the volume is still attached and not being removed, but CancelDetach failed ({e}); run `wukongctl \
                 cancel-release {serial}` in the guest to get the disk back, or detach again"
            ),
        },
    };
    Err(failed(undo, error))
}

/// True when the agent no longer has the disk in the guest: unknown, or a released SCSI disk (deleted in the
/// guest, listed only so its release can be verified).
async fn gone_from_guest(agent: &AgentClient, serial: &str, forced: bool) -> bool {
    match agent.get_disk(serial, false).await {
        Ok(d) => deleted_in_guest(&d),
        Err(e) if e.code() == Some(Code::NotFound) => true,
        Err(_) => forced,
    }
}

/// A released SCSI disk the guest deleted: listed until the hypervisor unplugs it, but no longer in the guest.
fn deleted_in_guest(disk: &Disk) -> bool {
    disk.state() == DiskState::Released && disk.release_method() == ReleaseMethod::ScsiDelete
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
    check_volume_name(&volume.name)?;
    check_serial(&volume.serial)?;
    let started = Instant::now();
    let deadline = started + options.timeout;
    let mut timings = Timings::new();
    let name = volume.name.as_str();
    let state = hypervisor.volume_state(name).await?;
    let already = matches!(state, VolumeState::Ready { .. });
    if let VolumeState::Ready { serial: Some(found), .. } = &state
        && !found.eq_ignore_ascii_case(&volume.serial)
    {
        return Err(CompanionError::SerialMismatch {
            volume: name.into(),
            hypervisor: hypervisor.describe(),
            found: found.clone(),
            wanted: volume.serial.clone(),
        });
    }
    let step = Instant::now();
    let mut last = state;
    let mut added = false;
    while !matches!(last, VolumeState::Ready { .. }) {
        match &last {
            // Added once; a volume still being removed (an earlier unplug) is added when it is gone.
            VolumeState::Absent if !added => {
                progress(&format!("adding volume '{name}' to {}", hypervisor.describe()));
                tracing::info!(serial = %volume.serial, volume = name, hypervisor = %hypervisor.describe(), "attaching");
                hypervisor.add_volume(volume).await?;
                added = true;
            }
            VolumeState::Removing { phase, .. } => progress(&format!("volume '{name}' is being removed ({phase})")),
            VolumeState::Pending { phase, .. } => progress(&format!("volume '{name}': {phase}")),
            _ => {}
        }
        if Instant::now() >= deadline {
            let detail = match &last {
                VolumeState::Pending { phase, message } => format!("last phase {phase}: {message}"),
                VolumeState::Removing { phase, .. } => format!("an earlier removal of it is still in phase {phase}"),
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
        _ if e.is_unreachable() => CompanionError::AttachUnconfirmed {
            volume: name.into(),
            hypervisor: hypervisor.describe(),
            error: Box::new(e),
        },
        _ => CompanionError::Agent(Box::new(e)),
    })?;
    timings.push(("guest sees it", step.elapsed()));
    tracing::info!(serial = %volume.serial, device = %disk.dev_node, elapsed = ?started.elapsed(), "attached");
    Ok(Attached { disk, already, timings })
}

/// Options of a move: those of its two halves.
#[derive(Debug, Clone)]
pub struct MoveOptions {
    /// The source's detach. Never forced: a move refuses `force` ([`CompanionError::ForcedMove`]).
    pub detach: DetachOptions,
    pub attach: AttachOptions,
}

/// A finished move: the source's detach, then the target's attach.
#[derive(Debug, Clone)]
pub struct Moved {
    /// `already`: the source did not have the volume any more (an earlier move detached it).
    pub detached: Detached,
    /// `already`: the target had it already (an earlier move got that far).
    pub attached: Attached,
}

/// What a move plugs into the target, as found before anything changes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Located {
    pub source: VolumeSource,
    /// The serial the hypervisor that has the volume reports, if any.
    pub serial: Option<String>,
    /// Found in the target (an earlier move got that far), not in the source.
    pub in_target: bool,
}

/// Where the storage of a move is: what `source` has plugged as `volume`, or, when the source no longer has it (a
/// move that finished, or one that stopped after its detach), what `target` has as `to_volume`. `None`: neither
/// has it, and only the caller can say what to plug.
pub async fn locate_move<S: Hypervisor, T: Hypervisor>(
    source: &S,
    target: &T,
    volume: &str,
    to_volume: &str,
) -> Result<Option<Located>, CompanionError> {
    let serial_of = |state| match state {
        VolumeState::Ready { serial, .. } => serial,
        _ => None,
    };
    if let Some(found) = source.volume_source(volume).await? {
        let serial = serial_of(source.volume_state(volume).await?);
        return Ok(Some(Located { source: found, serial, in_target: false }));
    }
    if let Some(found) = target.volume_source(to_volume).await? {
        let serial = serial_of(target.volume_state(to_volume).await?);
        return Ok(Some(Located { source: found, serial, in_target: true }));
    }
    Ok(None)
}

/// Whether two sources are the same storage: the same claim, or the same image file however it is spelt.
fn same_source(a: &VolumeSource, b: &VolumeSource) -> bool {
    match (a, b) {
        (VolumeSource::Image { path: a, .. }, VolumeSource::Image { path: b, .. }) => {
            a == b || std::fs::canonicalize(a).is_ok_and(|a| std::fs::canonicalize(b).is_ok_and(|b| a == b))
        }
        _ => a == b,
    }
}

fn describe_source(source: &VolumeSource) -> String {
    match source {
        VolumeSource::PersistentVolumeClaim(c) => format!("claim '{c}'"),
        VolumeSource::DataVolume(d) => format!("DataVolume '{d}'"),
        VolumeSource::Image { path, format } => format!("{format} image {}", path.display()),
    }
}

/// Moves a volume from one VM to another: a safe [`detach`] from `source` (refused, changing nothing, while the
/// source guest uses the disk), then an [`attach`] of `volume` (the same storage) to `target`. The disk is never
/// plugged into both: the attach starts only once the source's hypervisor and guest agree it is gone.
///
/// Everything that would stop the attach and can be known beforehand (a bad name or serial, the target's volume
/// name or serial taken, the target's agent unreachable) is checked before the detach, so such a move changes
/// nothing. Like its halves, a move may be run again: a source that no longer has the volume goes straight to the
/// attach, so a move that stopped between the two finishes ([`CompanionError::MoveIncomplete`] says so).
pub async fn move_volume<S: Hypervisor, T: Hypervisor>(
    source: &S,
    source_agent: &AgentClient,
    target: &T,
    target_agent: &AgentClient,
    volume: &VolumeSpec,
    options: &MoveOptions,
    progress: &(dyn Fn(&str) + Sync),
) -> Result<Moved, CompanionError> {
    let detach_options = &options.detach;
    check_volume_name(&volume.name)?;
    check_serial(&volume.serial)?;
    if detach_options.force {
        return Err(CompanionError::ForcedMove(detach_options.volume.clone()));
    }
    let state = target.volume_state(&volume.name).await?;
    if let VolumeState::Ready { serial: Some(found), .. } = &state
        && !found.eq_ignore_ascii_case(&volume.serial)
    {
        return Err(CompanionError::SerialMismatch {
            volume: volume.name.clone(),
            hypervisor: target.describe(),
            found: found.clone(),
            wanted: volume.serial.clone(),
        });
    }
    if let Some(found) = target.volume_source(&volume.name).await?
        && !same_source(&found, &volume.source)
    {
        return Err(CompanionError::TargetTaken {
            volume: volume.name.clone(),
            target: target.describe(),
            found: describe_source(&found),
            wanted: describe_source(&volume.source),
        });
    }
    // The attach waits for the serial in the target guest: another disk with it there would be taken for this one.
    let in_target = matches!(state, VolumeState::Ready { .. });
    match target_agent.get_disk(&volume.serial, false).await {
        // The volume's own disk (an earlier move got that far), or one the guest released and deleted.
        Ok(d) if in_target || deleted_in_guest(&d) => {}
        Ok(d) => {
            return Err(CompanionError::SerialTaken {
                serial: volume.serial.clone(),
                volume: volume.name.clone(),
                dev: d.dev_node,
            });
        }
        Err(e) if e.code() == Some(Code::NotFound) => {}
        Err(e) if e.is_unreachable() => {
            return Err(CompanionError::MoveTargetUnreachable {
                volume: detach_options.volume.clone(),
                error: Box::new(e),
            });
        }
        Err(e) => return Err(CompanionError::Agent(Box::new(e))),
    }

    tracing::info!(
        volume = detach_options.volume, to_volume = volume.name, from = %source.describe(), to = %target.describe(),
        "moving"
    );
    let detached = detach(source, source_agent, detach_options, progress).await?;
    if detached.already {
        tracing::info!(volume = detach_options.volume, "the source does not have the volume; going on to the attach");
    }
    let attached = attach(target, target_agent, volume, &options.attach, progress).await.map_err(|error| {
        tracing::error!(volume = detach_options.volume, %error, "the attach of a move failed after its detach");
        CompanionError::MoveIncomplete {
            volume: detach_options.volume.clone(),
            to_volume: volume.name.clone(),
            from: source.describe(),
            to: target.describe(),
            error: Box::new(error),
        }
    })?;
    tracing::info!(volume = detach_options.volume, device = %attached.disk.dev_node, "moved");
    Ok(Moved { detached, attached })
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
        assert_eq!(derive_serial("pg-data-2024").unwrap(), "pg-data-2024");
        let long = derive_serial("pg-data-2024-volume-long").unwrap_err().to_string();
        assert!(long.contains("give one with --serial"), "{long}");
        for bad in ["", "Data1", "a/b", "1abc", "abc-", "pg data", &"a".repeat(64)] {
            assert!(matches!(check_volume_name(bad), Err(CompanionError::BadVolumeName { .. })), "{bad:?}");
            assert!(derive_serial(bad).is_err(), "{bad:?}");
        }
        assert!(check_volume_name(&"a".repeat(63)).is_ok());
    }

    #[test]
    fn a_move_knows_the_same_storage_however_it_is_spelt() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.raw"), b"").unwrap();
        let image = |path: std::path::PathBuf| VolumeSource::Image { path, format: "raw".into() };
        let a = image(dir.path().join("a.raw"));
        assert!(same_source(&a, &image(dir.path().join(".").join("a.raw"))));
        assert!(!same_source(&a, &image(dir.path().join("b.raw"))));
        let claim = VolumeSource::PersistentVolumeClaim("pg".into());
        assert!(same_source(&claim, &claim.clone()));
        assert!(!same_source(&claim, &VolumeSource::DataVolume("pg".into())), "a claim is not a DataVolume");
        assert_eq!(describe_source(&a), format!("raw image {}", dir.path().join("a.raw").display()));
    }
}
