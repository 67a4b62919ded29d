//! `wukongctl attach` and `detach`: the companion against KubeVirt (`--vmi NS/NAME`) or QEMU (`--qmp SOCKET`).

use anyhow::{Context, bail};
use indicatif::ProgressBar;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::Duration;
use wukong_controller_client::agent_client::AgentClient;
use wukong_controller_client::companion::{self, AttachOptions, Attached, DetachOptions, Detached};
use wukong_controller_client::hypervisor::{DiskBus, VolumeSource, VolumeSpec};
use wukong_controller_client::kubevirt::KubeVirt;
use wukong_controller_client::output;
use wukong_controller_client::qemu::Qemu;

/// Which hypervisor holds the VM.
#[derive(Debug, Clone, clap::Args)]
pub struct BackendArgs {
    /// The KubeVirt VMI, NAMESPACE/NAME (kubeconfig found as kubectl finds it). The agent address defaults to the
    /// VMI's first interface IP.
    #[arg(long, global = true, value_name = "NS/NAME", conflicts_with = "qmp")]
    pub vmi: Option<String>,
    /// With --vmi: change the VM (its spec keeps the volume across restarts), not only the running VMI.
    #[arg(long, global = true)]
    pub persist: bool,
    /// A QEMU QMP socket (plain QEMU).
    #[arg(long, global = true, value_name = "SOCKET")]
    pub qmp: Option<PathBuf>,
    /// With --qmp: the virtio-scsi bus for SCSI disks.
    #[arg(long, global = true, default_value = "scsi0.0", value_name = "BUS")]
    pub scsi_bus: String,
    /// With --qmp: a free hot-plug port for a virtio-blk disk (e.g. a pcie-root-port id).
    #[arg(long, global = true, value_name = "PORT")]
    pub virtio_bus: Option<String>,
}

#[derive(Debug, Clone, clap::Args)]
pub struct AttachArgs {
    /// Volume name (KubeVirt) or QEMU device id.
    pub volume: String,
    /// The serial the guest sees; default: derived from the volume name (lowercase, at most 20 characters).
    #[arg(long)]
    pub serial: Option<String>,
    #[arg(long, value_enum, default_value_t = DiskBus::Scsi)]
    pub bus: DiskBus,
    /// KubeVirt: the PersistentVolumeClaim to attach.
    #[arg(long, conflicts_with_all = ["data_volume", "image"])]
    pub claim: Option<String>,
    /// KubeVirt: the DataVolume to attach.
    #[arg(long, conflicts_with = "image")]
    pub data_volume: Option<String>,
    /// QEMU: the image file to attach.
    #[arg(long)]
    pub image: Option<PathBuf>,
    /// QEMU: the image format.
    #[arg(long, default_value = "raw")]
    pub format: String,
    /// Seconds to wait for the hypervisor and then the guest.
    #[arg(long, default_value_t = 120)]
    pub timeout: u64,
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
    /// Seconds to wait for the hypervisor and the guest to agree the disk is gone.
    #[arg(long, default_value_t = 120)]
    pub timeout: u64,
}

/// A connected hypervisor.
pub enum Backend {
    KubeVirt(KubeVirt),
    Qemu(Qemu),
}

impl Backend {
    pub async fn connect(args: &BackendArgs) -> anyhow::Result<Self> {
        if let Some(vmi) = &args.vmi {
            let (ns, name) = vmi.split_once('/').context("--vmi takes NAMESPACE/NAME")?;
            let client = kube::Client::try_default().await.context("cannot load a kubeconfig")?;
            return Ok(Self::KubeVirt(KubeVirt::new(client, ns, name, args.persist)));
        }
        if let Some(socket) = &args.qmp {
            let qemu = Qemu::connect(socket).await?;
            return Ok(Self::Qemu(qemu.with_scsi_bus(&args.scsi_bus).with_virtio_bus(args.virtio_bus.clone())));
        }
        bail!("attach and detach need a hypervisor: --vmi NAMESPACE/NAME (KubeVirt) or --qmp SOCKET (QEMU)")
    }

    /// The agent's address when none was given: the VMI's interface IP.
    pub async fn agent_address(&self) -> anyhow::Result<Option<String>> {
        match self {
            Self::KubeVirt(k) => Ok(k.agent_address().await?),
            Self::Qemu(_) => Ok(None),
        }
    }
}

/// Shows the current phase on a TTY (a spinner), or logs it.
fn progress_reporter() -> (Option<ProgressBar>, impl Fn(&str) + Sync) {
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

pub async fn attach(backend: &Backend, agent: &AgentClient, args: AttachArgs, json: bool) -> anyhow::Result<()> {
    let serial = match &args.serial {
        Some(s) => s.clone(),
        None => companion::derive_serial(&args.volume)?,
    };
    let source = match (&args.claim, &args.data_volume, &args.image) {
        (Some(c), _, _) => VolumeSource::PersistentVolumeClaim(c.clone()),
        (_, Some(d), _) => VolumeSource::DataVolume(d.clone()),
        (_, _, Some(i)) => VolumeSource::Image { path: i.clone(), format: args.format.clone() },
        _ => bail!("say what to attach: --claim PVC or --data-volume DV (KubeVirt), --image FILE (QEMU)"),
    };
    let volume = VolumeSpec { name: args.volume.clone(), serial, bus: args.bus, source };
    let options = AttachOptions { timeout: Duration::from_secs(args.timeout), poll: Duration::from_secs(1) };
    let (bar, report) = progress_reporter();
    let attached: Attached = match backend {
        Backend::KubeVirt(k) => companion::attach(k, agent, &volume, &options, &report).await,
        Backend::Qemu(q) => companion::attach(q, agent, &volume, &options, &report).await,
    }?;
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    let d = &attached.disk;
    if json {
        crate::print_json(&serde_json::json!({
            "volume": args.volume, "already": attached.already, "disk": output::disk_json(d),
            "timings_ms": timings_json(&attached.timings),
        }));
    } else {
        let how = if attached.already { "was already attached" } else { "is attached" };
        println!(
            "{} {how}: the guest sees it as {} ({}, {})",
            args.volume,
            d.dev_node,
            output::human_size(d.size_bytes),
            d.by_id_links.first().map(String::as_str).unwrap_or("no by-id link")
        );
    }
    Ok(())
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
    if let Err(companion::CompanionError::Refused { report, .. }) = &detached
        && !report.blockers.is_empty()
    {
        if json {
            crate::print_json(&output::usage_json(report));
        } else {
            print!("{}", output::usage_text(report));
        }
    }
    let detached = detached?;
    if let (Some(claim), Backend::KubeVirt(k)) = (&claim, backend) {
        k.delete_claim(claim).await?;
        tracing::info!(claim, "deleted the volume's claim");
    }
    if json {
        crate::print_json(&serde_json::json!({
            "volume": args.volume, "serial": detached.serial, "already": detached.already, "forced": detached.forced,
            "release": detached.release.as_ref().map(output::release_json), "deleted_claim": claim,
            "timings_ms": timings_json(&detached.timings),
        }));
    } else if detached.already {
        println!("{} is not attached; nothing to do", args.volume);
    } else {
        if detached.forced {
            eprintln!("wukongctl: WARNING: {} was detached with --force, without asking the guest", args.volume);
        }
        if let Some(r) = &detached.release {
            print!("{}", output::release_text(r));
        }
        println!("{} is detached{}", args.volume, claim.map(|c| format!("; claim {c} deleted")).unwrap_or_default());
    }
    Ok(())
}
