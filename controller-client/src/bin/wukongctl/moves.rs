//! `wukongctl move`: a safe detach from the VM `--vmi` or `--qmp` names, then an attach of the same storage to the
//! VM the `--to-*` flags name, never plugged into both ([`companion::move_volume`]).
//!
//! The storage is read from the source before anything changes. A move that stops after its detach (its attach
//! failed, or the process was stopped) leaves the storage in neither VM, where neither hypervisor can say what it
//! was: so a move is recorded on this machine before its detach, and a run that finds the volume in neither VM
//! plugs what the record says. Running the same move again finishes it.

use crate::UsageError;
use crate::target::VmiRef;
use crate::volumes::{
    Backend, HypervisorArgs, StorageArgs, Target, about, attached_json, detached_json, print_blockers, print_release,
    progress_reporter,
};
use anyhow::bail;
use std::path::{Path, PathBuf};
use std::time::Duration;
use wukong_controller_client::agent_client::{AgentAddress, AgentClient};
use wukong_controller_client::companion::{self, AttachOptions, CompanionError, DetachOptions, MoveOptions, Moved};
use wukong_controller_client::hypervisor::{DiskBus, Hypervisor, VolumeSource, VolumeSpec, VolumeState};
use wukong_controller_client::kubevirt::RouteOptions;

#[derive(Debug, Clone, clap::Args)]
pub struct MoveArgs {
    /// The volume in the source VM: its name (KubeVirt) or QEMU device id.
    pub volume: String,
    #[command(flatten)]
    pub to: MoveTargetArgs,
    /// The volume's name in the target VM [default: the same name].
    #[arg(long, value_name = "NAME")]
    pub to_volume: Option<String>,
    /// The disk's serial, in the source guest and in the target [default: what the source's hypervisor reports,
    /// else the volume name].
    #[arg(long)]
    pub serial: Option<String>,
    /// The disk's bus in the target.
    #[arg(long, value_enum, default_value_t = DiskBus::Scsi)]
    pub bus: DiskBus,
    /// Let the source guest's agent unmount the disk's filesystems if nothing else uses them.
    #[arg(long)]
    pub unmount: bool,
    /// Refused: a move never forces its detach (it exists to keep the data).
    #[arg(long, hide = true)]
    pub force: bool,
    // What to plug into the target instead of what the source has plugged: to finish a move that stopped after its
    // detach, when the source cannot say any more.
    #[command(flatten)]
    pub storage: StorageArgs,
    /// Seconds to wait for each half: the detach from the source, then the attach to the target.
    #[arg(long, default_value_t = 120)]
    pub timeout: u64,
    #[command(flatten)]
    pub hypervisor: HypervisorArgs,
}

/// The VM a move goes to (the source is the one --vmi or --qmp names, as for detach).
#[derive(Debug, Clone, clap::Args)]
pub struct MoveTargetArgs {
    /// The target VMI: NAME, or NAMESPACE/NAME in the source's namespace (a claim cannot leave its namespace).
    #[arg(long, value_name = "[NS/]NAME", help_heading = "Move target")]
    pub to_vmi: Option<String>,
    /// The target QEMU's QMP socket; needs --to-agent.
    #[arg(long, value_name = "SOCKET", help_heading = "Move target")]
    pub to_qmp: Option<PathBuf>,
    /// The address of wukong-agent in the target guest, as --agent takes it [default with --to-vmi: the VMI's
    /// route].
    #[arg(long, value_name = "ADDRESS", help_heading = "Move target")]
    pub to_agent: Option<String>,
    /// With --to-qmp: the virtio-scsi bus for SCSI disks.
    #[arg(long, default_value = "scsi0.0", value_name = "BUS", help_heading = "Move target")]
    pub to_scsi_bus: String,
    /// With --to-qmp: a free hot-plug port for a virtio-blk disk (e.g. a pcie-root-port id).
    #[arg(long, value_name = "PORT", help_heading = "Move target")]
    pub to_virtio_bus: Option<String>,
}

/// A move's target and what it plugs there, checked before anything is contacted.
pub struct MovePlan {
    /// The target VMI (KubeVirt), else `hypervisor.qmp` is the target QEMU.
    pub vmi: Option<VmiRef>,
    /// The target's hypervisor flags: the source's --persist, the --to-* socket and buses.
    pub hypervisor: HypervisorArgs,
    /// The target's agent when given (--to-agent); else the target VMI's route.
    pub agent: Option<AgentAddress>,
    pub to_volume: String,
    /// What --image, --claim or --data-volume name instead of what the source has plugged.
    pub storage: Option<VolumeSource>,
}

impl MovePlan {
    /// Checks a move's arguments against its source, `source`.
    pub fn of(args: &MoveArgs, source: &Target) -> anyhow::Result<Self> {
        if args.force {
            return Err(CompanionError::ForcedMove(args.volume.clone()).into());
        }
        companion::check_volume_name(&args.volume)?;
        let to_volume = args.to_volume.clone().unwrap_or_else(|| args.volume.clone());
        companion::check_volume_name(&to_volume)?;
        if let Some(serial) = &args.serial {
            companion::check_serial(serial)?;
        }
        let to = &args.to;
        let vmi = match (source, &to.to_vmi, &to.to_qmp) {
            (_, Some(_), Some(_)) => return Err(UsageError("give either --to-vmi or --to-qmp, not both".into()).into()),
            (_, None, None) => {
                return Err(UsageError(
                    "move needs a target: --to-vmi [NS/]NAME (KubeVirt) or --to-qmp SOCKET --to-agent ADDRESS (QEMU)"
                        .into(),
                )
                .into());
            }
            (Target::KubeVirt(from), Some(vmi), None) => Some(VmiRef::move_target(vmi, from)?),
            (Target::Qemu(from), None, Some(qmp)) if same_file(from, qmp) => {
                return Err(UsageError(format!(
                    "--to-qmp {} is the source's QMP socket; a move goes to another VM",
                    qmp.display()
                ))
                .into());
            }
            (Target::Qemu(_), None, Some(_)) if to.to_agent.is_none() => {
                return Err(UsageError(
                    "with --to-qmp, give --to-agent: the address of wukong-agent in the target guest".into(),
                )
                .into());
            }
            (Target::Qemu(_), None, Some(_)) => None,
            _ => {
                return Err(UsageError(
                    "a move stays with one kind of hypervisor: from --vmi to --to-vmi (a claim), or from --qmp to \
                     --to-qmp (an image file)"
                        .into(),
                )
                .into());
            }
        };
        if vmi.is_none() && args.bus == DiskBus::Virtio && to.to_virtio_bus.is_none() {
            return Err(UsageError(
                "a virtio disk over --to-qmp needs --to-virtio-bus PORT (a free pcie-root-port id)".into(),
            )
            .into());
        }
        let hypervisor = HypervisorArgs {
            persist: args.hypervisor.persist,
            qmp: to.to_qmp.clone(),
            scsi_bus: to.to_scsi_bus.clone(),
            virtio_bus: to.to_virtio_bus.clone(),
        };
        let agent = to.to_agent.as_deref().map(str::parse::<AgentAddress>).transpose()?;
        Ok(Self { vmi, hypervisor, agent, to_volume, storage: args.storage.named(source)? })
    }

    pub fn target(&self) -> Target<'_> {
        match (&self.vmi, &self.hypervisor.qmp) {
            (Some(vmi), _) => Target::KubeVirt(vmi),
            (None, Some(qmp)) => Target::Qemu(qmp),
            (None, None) => unreachable!("MovePlan::of names a target VMI or QMP socket"),
        }
    }

    /// The target's agent: --to-agent, else the target VMI's route (which the --agent-* flags choose, as for
    /// --vmi).
    pub async fn agent(
        &self,
        kube: Option<&(kube::Client, String)>,
        route: &RouteOptions,
    ) -> anyhow::Result<AgentAddress> {
        match (&self.agent, &self.vmi, kube) {
            (Some(address), _, _) => Ok(address.clone()),
            (None, Some(vmi), Some(kube)) => crate::target::vmi_agent(kube, vmi, route).await,
            (None, Some(vmi), None) => bail!("--to-vmi {}/{} needs a Kubernetes client", vmi.namespace, vmi.name),
            (None, None, _) => unreachable!("MovePlan::of requires --to-agent with --to-qmp"),
        }
    }

    /// Whether reaching the target needs the Kubernetes API: a VMI, or an agent behind KubeVirt's vsock
    /// subresource.
    pub fn needs_kube(&self) -> bool {
        self.vmi.is_some() || matches!(self.agent, Some(AgentAddress::KubeVirtVsock { .. }))
    }
}

/// Two names of one file (the same QMP socket given twice would "move" a disk into its own VM).
fn same_file(a: &Path, b: &Path) -> bool {
    a == b || std::fs::canonicalize(a).is_ok_and(|a| std::fs::canonicalize(b).is_ok_and(|b| a == b))
}

/// `wukongctl move`: the source's backend and agent, then the target's.
pub async fn move_volume(
    (from, from_agent): (&Backend, &AgentClient),
    (to, to_agent): (&Backend, &AgentClient),
    plan: MovePlan,
    args: MoveArgs,
    json: bool,
) -> anyhow::Result<()> {
    let (bar, report) = progress_reporter();
    let moved = match (from, to) {
        (Backend::KubeVirt(f), Backend::KubeVirt(t)) => {
            move_between((f, from_agent), (t, to_agent), &plan, &args, &report).await
        }
        (Backend::Qemu(f), Backend::Qemu(t)) => {
            move_between((f, from_agent), (t, to_agent), &plan, &args, &report).await
        }
        _ => unreachable!("MovePlan::of keeps a move with one kind of hypervisor"),
    };
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    print_blockers(&moved, json);
    let Moved { detached, attached } = moved?;
    if json {
        crate::print_json(&serde_json::json!({
            "volume": args.volume, "to_volume": plan.to_volume, "serial": attached.disk.serial,
            "detach": detached_json(from, &args.volume, &detached).await,
            "attach": attached_json(to, &plan.to_volume, &attached).await,
        }));
        return Ok(());
    }
    if !detached.already {
        print_release(&args.volume, &detached);
    }
    let renamed = if plan.to_volume == args.volume { String::new() } else { format!(" as {}", plan.to_volume) };
    let now = format!("now {} in the target guest ({})", attached.disk.dev_node, about(&attached.disk));
    let (source, target) = (from.describe(), to.describe());
    match (detached.already, attached.already) {
        (true, true) => println!("{} was already moved to {target}{renamed}: {now}", args.volume),
        (true, false) => {
            println!("{} moved to {target}{renamed} (an earlier run had detached it from {source}): {now}", args.volume)
        }
        (false, _) => println!("{} moved: from {source} to {target}{renamed}, {now}", args.volume),
    }
    Ok(())
}

/// A move between two hypervisors: what to plug into the target (the flags', else what the source has, else what
/// an earlier run plugged into the target, else this machine's record of a move that stopped after its detach),
/// then [`companion::move_volume`].
async fn move_between<S: Hypervisor, T: Hypervisor>(
    (from, from_agent): (&S, &AgentClient),
    (to, to_agent): (&T, &AgentClient),
    plan: &MovePlan,
    args: &MoveArgs,
    report: &(dyn Fn(&str) + Sync),
) -> Result<Moved, CompanionError> {
    let record = Record::of(&from.describe(), &args.volume, &to.describe(), &plan.to_volume);
    let located = match companion::locate_move(from, to, &args.volume, &plan.to_volume).await {
        // What the flags name is plugged whatever the source has (say, an image QEMU names by no single file).
        Err(e) if plan.storage.is_some() => {
            tracing::info!(error = %e, "cannot tell what the source has plugged; plugging what the flags name");
            None
        }
        located => located?,
    };
    let found = match located {
        Some(located) => Some((located.source, located.serial)),
        None => record.read().map(|(source, serial)| (source, Some(serial))),
    };
    let (found_source, found_serial) = found.unzip();
    let source = plan.storage.clone().or(found_source).ok_or_else(|| CompanionError::NothingToMove {
        volume: args.volume.clone(),
        from: from.describe(),
        to: to.describe(),
        to_volume: plan.to_volume.clone(),
    })?;
    let serial = match args.serial.clone().or(found_serial.flatten()) {
        Some(serial) => serial,
        None => companion::derive_serial(&args.volume)?,
    };
    let volume = VolumeSpec { name: plan.to_volume.clone(), serial, bus: args.bus, source };
    let timeout = Duration::from_secs(args.timeout);
    let options = MoveOptions {
        detach: DetachOptions {
            volume: args.volume.clone(),
            serial: args.serial.clone(),
            unmount: args.unmount,
            force: false,
            timeout,
            poll: Duration::from_millis(500),
        },
        attach: AttachOptions { timeout, poll: Duration::from_secs(1) },
    };
    record.write(&volume);
    let moved = companion::move_volume(from, from_agent, to, to_agent, &volume, &options, report).await;
    // Kept while the source may have let go of the volume (the record is then all that says what it was).
    let source_has_it = || async {
        matches!(from.volume_state(&args.volume).await, Ok(VolumeState::Ready { .. } | VolumeState::Pending { .. }))
    };
    if moved.is_ok() || source_has_it().await {
        record.remove();
    }
    moved
}

/// This machine's record of a move, between its detach and its attach: a file under
/// `$XDG_STATE_HOME/wukongctl/moves` (else `~/.local/state/wukongctl/moves`) named for the move's source, target and
/// volumes. Best effort: a move that cannot be recorded goes on, and says so in the log.
struct Record {
    key: String,
    path: Option<PathBuf>,
}

/// What a record holds.
#[derive(serde::Serialize, serde::Deserialize)]
struct Recorded {
    /// The move it is about: its source, volume, target and target volume.
    key: String,
    serial: String,
    storage: Storage,
}

/// A [`VolumeSource`], as a record keeps it.
#[derive(serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
enum Storage {
    Claim(String),
    DataVolume(String),
    Image { path: PathBuf, format: String },
}

impl Record {
    fn of(from: &str, volume: &str, to: &str, to_volume: &str) -> Self {
        let state = std::env::var_os("XDG_STATE_HOME")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|home| Path::new(&home).join(".local/state")));
        Self::under(state, format!("{volume} of {from} to {to_volume} of {to}"))
    }

    fn under(dir: Option<PathBuf>, key: String) -> Self {
        // FNV-1a: a short file name that stays the same across builds, whatever characters the paths have.
        let hash = key.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3));
        let path = dir.map(|dir| dir.join("wukongctl/moves").join(format!("{hash:016x}.json")));
        Self { key, path }
    }

    /// The storage and serial a move that stopped after its detach was plugging.
    fn read(&self) -> Option<(VolumeSource, String)> {
        let text = std::fs::read_to_string(self.path.as_ref()?).ok()?;
        let r: Recorded = serde_json::from_str(&text).ok().filter(|r: &Recorded| r.key == self.key)?;
        let source = match r.storage {
            Storage::Claim(claim) => VolumeSource::PersistentVolumeClaim(claim),
            Storage::DataVolume(name) => VolumeSource::DataVolume(name),
            Storage::Image { path, format } => VolumeSource::Image { path, format },
        };
        tracing::info!(record = %self.key, "the move stopped after its detach; plugging what it recorded");
        Some((source, r.serial))
    }

    fn write(&self, volume: &VolumeSpec) {
        let Some(path) = &self.path else {
            tracing::warn!(record = %self.key, "no $XDG_STATE_HOME or $HOME: the move is not recorded");
            return;
        };
        let storage = match &volume.source {
            VolumeSource::PersistentVolumeClaim(claim) => Storage::Claim(claim.clone()),
            VolumeSource::DataVolume(name) => Storage::DataVolume(name.clone()),
            VolumeSource::Image { path, format } => Storage::Image { path: path.clone(), format: format.clone() },
        };
        let recorded = Recorded { key: self.key.clone(), serial: volume.serial.clone(), storage };
        let text = serde_json::to_string_pretty(&recorded).expect("a record always serialises");
        let written = path.parent().map_or(Ok(()), std::fs::create_dir_all).and_then(|()| std::fs::write(path, text));
        if let Err(e) = written {
            tracing::warn!(path = %path.display(), error = %e, "cannot record the move");
        }
    }

    fn remove(&self) {
        if let Some(path) = &self.path
            && let Err(e) = std::fs::remove_file(path)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!(path = %path.display(), error = %e, "cannot remove the move's record");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use wukong_controller_client::hypervisor::DiskBus;

    #[test]
    fn a_record_gives_back_what_it_was_given_for_its_move_only() {
        let dir = tempfile::tempdir().unwrap();
        let record = |key: &str| Record::under(Some(dir.path().into()), key.into());
        let image = VolumeSource::Image { path: "/var/lib/vm/pg data.qcow2".into(), format: "qcow2".into() };
        for source in [image, VolumeSource::PersistentVolumeClaim("pg".into()), VolumeSource::DataVolume("dv".into())] {
            let volume = VolumeSpec { name: "pg".into(), serial: "pgdata".into(), bus: DiskBus::Scsi, source };
            let a = record("pg of QEMU at /a.qmp to pg of QEMU at /b.qmp");
            assert_eq!(a.read(), None, "nothing recorded yet");
            a.write(&volume);
            assert_eq!(a.read(), Some((volume.source.clone(), "pgdata".into())));
            assert_eq!(record("pg of QEMU at /b.qmp to pg of QEMU at /a.qmp").read(), None, "another move's");
            a.remove();
            assert_eq!(a.read(), None, "removed");
            a.remove();
        }
        assert_eq!(Record::under(None, "k".into()).read(), None, "no state directory: no record");
    }
}
