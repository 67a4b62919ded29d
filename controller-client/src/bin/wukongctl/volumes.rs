//! `wukongctl attach` and `detach`: the companion against KubeVirt (`--vmi NS/NAME`) or QEMU (`--qmp SOCKET`), and
//! what `move` ([`crate::moves`]) shares with them.

use crate::UsageError;
use crate::target::VmiRef;
use anyhow::bail;
use indicatif::ProgressBar;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::Duration;
use wukong_controller_client::agent_client::AgentClient;
use wukong_controller_client::companion::{self, AttachOptions, Attached, CompanionError, DetachOptions, Detached};
use wukong_controller_client::hypervisor::{DiskBus, Hypervisor, Removal, VolumeSource, VolumeSpec};
use wukong_controller_client::kubevirt::KubeVirt;
use wukong_controller_client::output;
use wukong_controller_client::qemu::Qemu;
use wukong_proto::v1::Disk;

/// Which hypervisor holds the VM, besides the global --vmi (attach, detach, and the source of a move).
#[derive(Debug, Clone, clap::Args)]
pub struct HypervisorArgs {
    /// With --vmi: change the VM (its spec keeps the volume across restarts), not only the running VMI.
    #[arg(long, help_heading = "Hypervisor")]
    pub persist: bool,
    /// A QEMU QMP socket (plain QEMU); needs --agent, the guest agent's address.
    #[arg(long, value_name = "SOCKET", help_heading = "Hypervisor")]
    pub qmp: Option<PathBuf>,
    /// With --qmp: the virtio-scsi bus for SCSI disks.
    #[arg(long, default_value = "scsi0.0", value_name = "BUS", help_heading = "Hypervisor")]
    pub scsi_bus: String,
    /// With --qmp: a free hot-plug port for a virtio-blk disk (e.g. a pcie-root-port id).
    #[arg(long, value_name = "PORT", help_heading = "Hypervisor")]
    pub virtio_bus: Option<String>,
}

#[derive(Debug, Clone, clap::Args)]
pub struct AttachArgs {
    /// Volume name (KubeVirt) or QEMU device id: a DNS label (a-z, 0-9, '-'), starting with a letter.
    pub volume: String,
    /// The serial the guest sees; default: the volume name, as virtctl does (at most 20 characters).
    #[arg(long)]
    pub serial: Option<String>,
    #[arg(long, value_enum, default_value_t = DiskBus::Scsi)]
    pub bus: DiskBus,
    #[command(flatten)]
    pub storage: StorageArgs,
    /// Seconds to wait for the hypervisor and then the guest.
    #[arg(long, default_value_t = 120)]
    pub timeout: u64,
    #[command(flatten)]
    pub hypervisor: HypervisorArgs,
}

/// What a volume is plugged from: attach's storage, and what a move plugs into its target instead of what the
/// source has.
#[derive(Debug, Clone, clap::Args)]
pub struct StorageArgs {
    /// KubeVirt: the PersistentVolumeClaim to attach.
    #[arg(long, conflicts_with_all = ["data_volume", "image"])]
    pub claim: Option<String>,
    /// KubeVirt: the DataVolume to attach.
    #[arg(long, conflicts_with = "image")]
    pub data_volume: Option<String>,
    /// QEMU: the image file to attach.
    #[arg(long)]
    pub image: Option<PathBuf>,
    /// QEMU: the image format (with --image).
    #[arg(long, default_value = "raw")]
    pub format: String,
}

impl StorageArgs {
    /// The storage these flags name for `target`'s kind of hypervisor (`None`: none named); flags of the other
    /// kind are a usage error.
    pub(crate) fn named(&self, target: &Target) -> Result<Option<VolumeSource>, UsageError> {
        match target {
            Target::KubeVirt(_) if self.image.is_some() => Err(UsageError(
                "--image is for QEMU (--qmp); with --vmi the storage is a claim (--claim) or a DataVolume \
                 (--data-volume)"
                    .into(),
            )),
            Target::KubeVirt(_) => Ok(self
                .claim
                .clone()
                .map(VolumeSource::PersistentVolumeClaim)
                .or_else(|| self.data_volume.clone().map(VolumeSource::DataVolume))),
            Target::Qemu(_) if self.claim.is_some() || self.data_volume.is_some() => Err(UsageError(
                "--claim and --data-volume are for KubeVirt (--vmi); with --qmp the storage is an image file (--image)"
                    .into(),
            )),
            Target::Qemu(_) => {
                Ok(self.image.clone().map(|path| VolumeSource::Image { path, format: self.format.clone() }))
            }
        }
    }
}

/// The storage flags an attach needs.
fn storage_needed(target: &Target) -> UsageError {
    UsageError(match target {
        Target::KubeVirt(_) => "with --vmi, give --claim PVC or --data-volume DV".into(),
        Target::Qemu(_) => "with --qmp, give --image FILE (and no --claim or --data-volume)".into(),
    })
}

#[derive(Debug, Clone, clap::Args)]
pub struct DetachArgs {
    /// Volume name (KubeVirt) or QEMU device id.
    pub volume: String,
    /// The disk's serial; default: what the hypervisor reports, else the volume name.
    #[arg(long)]
    pub serial: Option<String>,
    /// Let the agent unmount the disk's filesystems if nothing else uses them.
    #[arg(long)]
    pub unmount: bool,
    /// Detach without asking the guest. Data still in its caches is lost; a system disk is refused anyway.
    #[arg(long)]
    pub force: bool,
    /// KubeVirt: delete the volume's PersistentVolumeClaim afterwards (default: keep it).
    #[arg(long)]
    pub delete_claim: bool,
    /// Seconds to wait for the hypervisor and the guest to agree the disk is gone. A removal that outlasts it goes
    /// on (exit 5): run detach again to wait for it.
    #[arg(long, default_value_t = 120)]
    pub timeout: u64,
    #[command(flatten)]
    pub hypervisor: HypervisorArgs,
}

/// The hypervisor a volume command was pointed at, checked before anything is contacted.
pub enum Target<'a> {
    KubeVirt(&'a VmiRef),
    Qemu(&'a Path),
}

impl<'a> Target<'a> {
    /// Exactly one of --vmi and --qmp, with the flags that go with it.
    pub fn of(vmi: Option<&'a VmiRef>, args: &'a HypervisorArgs, agent_given: bool) -> Result<Self, UsageError> {
        match (vmi, &args.qmp) {
            (Some(_), Some(_)) => Err(UsageError("give either --vmi (KubeVirt) or --qmp (QEMU), not both".into())),
            (None, None) => Err(UsageError(
                "attach, detach and move need a hypervisor: --vmi NAMESPACE/NAME (KubeVirt) or --qmp SOCKET (QEMU)"
                    .into(),
            )),
            (Some(vmi), None) => Ok(Self::KubeVirt(vmi)),
            (None, Some(_)) if args.persist => Err(UsageError("--persist is for KubeVirt (--vmi)".into())),
            (None, Some(_)) if !agent_given => Err(UsageError(
                "with --qmp, give --agent: the address of wukong-agent in that guest (e.g. https://10.0.2.15:7443, with \
                 the --tls-* flags)"
                    .into(),
            )),
            (None, Some(socket)) => Ok(Self::Qemu(socket)),
        }
    }
}

/// Checks an attach's arguments against its target before anything is contacted; returns the volume to attach.
pub fn attach_volume(target: &Target, args: &AttachArgs) -> anyhow::Result<VolumeSpec> {
    companion::check_volume_name(&args.volume)?;
    let serial = match &args.serial {
        Some(s) => {
            companion::check_serial(s)?;
            s.clone()
        }
        None => companion::derive_serial(&args.volume)?,
    };
    let source = args.storage.named(target)?.ok_or_else(|| storage_needed(target))?;
    if matches!(target, Target::Qemu(_)) && args.bus == DiskBus::Virtio && args.hypervisor.virtio_bus.is_none() {
        return Err(
            UsageError("a virtio disk over --qmp needs --virtio-bus PORT (a free pcie-root-port id)".into()).into()
        );
    }
    Ok(VolumeSpec { name: args.volume.clone(), serial, bus: args.bus, source })
}

/// A connected hypervisor.
pub enum Backend {
    KubeVirt(KubeVirt),
    Qemu(Qemu),
}

impl Backend {
    /// Connects to the hypervisor a volume command was pointed at; a VMI needs the Kubernetes client (and its API
    /// server's URL, for messages).
    pub async fn connect(
        target: &Target<'_>,
        kube: Option<&(kube::Client, String)>,
        args: &HypervisorArgs,
    ) -> anyhow::Result<Self> {
        match target {
            Target::KubeVirt(vmi) => {
                let Some((client, url)) = kube else {
                    bail!("--vmi {}/{} needs a Kubernetes client", vmi.namespace, vmi.name)
                };
                let kubevirt = KubeVirt::new(client.clone(), &vmi.namespace, &vmi.name, args.persist);
                Ok(Self::KubeVirt(kubevirt.with_api_url(url)))
            }
            Target::Qemu(socket) => {
                let qemu = Qemu::connect(socket).await?;
                Ok(Self::Qemu(qemu.with_scsi_bus(&args.scsi_bus).with_virtio_bus(args.virtio_bus.clone())))
            }
        }
    }

    pub(crate) fn describe(&self) -> String {
        match self {
            Self::KubeVirt(k) => k.describe(),
            Self::Qemu(q) => q.describe(),
        }
    }

    /// Which KubeVirt object's subresources were used ("vmi", "vm (declarative hot-plug)", …); none for QEMU.
    async fn route(&self) -> Option<&'static str> {
        match self {
            Self::KubeVirt(k) => k.route().await.ok().map(|r| r.as_str()),
            Self::Qemu(_) => None,
        }
    }
}

/// Shows the current phase on a TTY (a spinner), or logs it.
pub(crate) fn progress_reporter() -> (Option<ProgressBar>, impl Fn(&str) + Sync) {
    let bar = std::io::stderr().is_terminal().then(|| {
        let bar = ProgressBar::new_spinner();
        bar.enable_steady_tick(Duration::from_millis(100));
        bar
    });
    let shown = bar.clone();
    let report = move |phase: &str| match &shown {
        Some(bar) => bar.set_message(phase.to_string()),
        None => tracing::info!("{phase}"),
    };
    (bar, report)
}

fn timings_json(timings: &companion::Timings) -> serde_json::Value {
    timings.iter().map(|(step, d)| (step.to_string(), serde_json::json!(d.as_secs_f64() * 1e3))).collect()
}

pub async fn attach(
    backend: &Backend,
    agent: &AgentClient,
    volume: VolumeSpec,
    args: AttachArgs,
    json: bool,
) -> anyhow::Result<()> {
    let options = AttachOptions { timeout: Duration::from_secs(args.timeout), poll: Duration::from_secs(1) };
    let (bar, report) = progress_reporter();
    let attached: Attached = match backend {
        Backend::KubeVirt(k) => companion::attach(k, agent, &volume, &options, &report).await,
        Backend::Qemu(q) => companion::attach(q, agent, &volume, &options, &report).await,
    }?;
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    if json {
        crate::print_json(&attached_json(backend, &args.volume, &attached).await);
    } else {
        let how = if attached.already { "was already attached" } else { "is attached" };
        println!("{} {how}: the guest sees it as {} ({})", args.volume, attached.disk.dev_node, about(&attached.disk));
    }
    Ok(())
}

/// A disk's size and stable name in the guest: "64 MiB, /dev/disk/by-id/…".
pub(crate) fn about(d: &Disk) -> String {
    format!(
        "{}, {}",
        output::human_size(d.size_bytes),
        d.by_id_links.first().map(String::as_str).unwrap_or("no by-id link")
    )
}

pub(crate) async fn attached_json(backend: &Backend, volume: &str, attached: &Attached) -> serde_json::Value {
    serde_json::json!({
        "volume": volume, "already": attached.already, "disk": output::disk_json(&attached.disk),
        "kubevirt_route": backend.route().await,
        "timings_ms": timings_json(&attached.timings),
    })
}

pub(crate) async fn detached_json(backend: &Backend, volume: &str, detached: &Detached) -> serde_json::Value {
    serde_json::json!({
        "volume": volume, "serial": detached.serial, "already": detached.already, "forced": detached.forced,
        "kubevirt_route": backend.route().await,
        "removal": detached.removal.map(|r| match r {
            Removal::Requested => "requested",
            Removal::AlreadyInProgress => "joined",
        }),
        "release": detached.release.as_ref().map(output::release_json),
        "timings_ms": timings_json(&detached.timings),
    })
}

/// What the guest gave up in a detach that happened: the release (or the warning that there was none), and a
/// removal it joined.
pub(crate) fn print_release(volume: &str, detached: &Detached) {
    if detached.forced {
        eprintln!("wukongctl: WARNING: {volume} was detached with --force, without asking the guest");
    }
    if let Some(r) = &detached.release {
        print!("{}", output::release_text(r));
    }
    if detached.removal == Some(Removal::AlreadyInProgress) {
        println!("{volume} was already being removed; this detach waited for that removal");
    }
}

/// A detach refused while the guest uses the disk: every blocker, as a table (or JSON), before the one error line.
pub(crate) fn print_blockers<T>(result: &Result<T, CompanionError>, json: bool) {
    if let Err(CompanionError::Refused { report, .. } | CompanionError::RemovalUnguarded { report, .. }) = result
        && !report.blockers.is_empty()
    {
        if json {
            crate::print_json(&output::usage_json(report));
        } else {
            print!("{}", output::usage_text(report));
        }
    }
}

pub async fn detach(backend: &Backend, agent: &AgentClient, args: DetachArgs, json: bool) -> anyhow::Result<()> {
    let options = DetachOptions {
        volume: args.volume.clone(),
        serial: args.serial.clone(),
        unmount: args.unmount,
        force: args.force,
        timeout: Duration::from_secs(args.timeout),
        poll: Duration::from_millis(500),
    };
    let claim = match (backend, args.delete_claim) {
        (Backend::KubeVirt(k), true) => k.claim_of(&args.volume).await?,
        (Backend::Qemu(_), true) => bail!("--delete-claim is for KubeVirt volumes"),
        _ => None,
    };
    let (bar, report) = progress_reporter();
    let detached: Result<Detached, _> = match backend {
        Backend::KubeVirt(k) => companion::detach(k, agent, &options, &report).await,
        Backend::Qemu(q) => companion::detach(q, agent, &options, &report).await,
    };
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    print_blockers(&detached, json);
    let detached = detached?;
    if let (Some(claim), Backend::KubeVirt(k)) = (&claim, backend) {
        k.delete_claim(claim).await?;
        tracing::info!(claim, "deleted the volume's claim");
    }
    if json {
        let mut value = detached_json(backend, &args.volume, &detached).await;
        value["deleted_claim"] = serde_json::json!(claim);
        crate::print_json(&value);
    } else if detached.already {
        println!("{} is not attached; nothing to do", args.volume);
    } else {
        print_release(&args.volume, &detached);
        println!("{} is detached{}", args.volume, claim.map(|c| format!("; claim {c} deleted")).unwrap_or_default());
    }
    Ok(())
}
