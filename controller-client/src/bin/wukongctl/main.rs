use anyhow::Context;
use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
use std::io::IsTerminal;
use std::process::ExitCode;
mod moves;
mod target;
mod volumes;

use std::path::PathBuf;
use wukong_controller_client::agent_client::{AgentAddress, BadAddress, ClientError, Dialer, TlsFiles};
use wukong_controller_client::companion::CompanionError;
use wukong_controller_client::output;
use wukong_proto::serial::Serial;

/// Safe attach and detach of VM disks, checked with the guest's wukong-agent.
#[derive(Debug, Parser)]
#[command(
    name = "wukongctl",
    version,
    after_help = "Exit codes: 0 done, 1 other error, 2 usage error (found before anything is contacted), 3 in use \
                  (refused, with every reason), 4 agent unreachable, 5 timeout (a detach's removal goes on: run \
                  detach again to wait for it), 6 the guest has no such disk, 7 TLS handshake refused."
)]
struct Cli {
    #[command(flatten)]
    target: target::TargetArgs,
    #[command(flatten)]
    tls: TlsArgs,
    /// Output format.
    #[arg(long, short = 'o', global = true, value_enum, default_value_t = Format::Table, help_heading = "Output")]
    output: Format,
    #[command(subcommand)]
    command: Command,
}

/// Mutual TLS with the agent: flags, their environment variables, or a file (flags win).
#[derive(Debug, Clone, clap::Args)]
struct TlsArgs {
    /// CA (PEM) that signed the agent's certificate.
    #[arg(long, global = true, env = "WUKONG_TLS_CA", value_name = "FILE", help_heading = "Mutual TLS")]
    tls_ca: Option<PathBuf>,
    /// This client's certificate (PEM).
    #[arg(long, global = true, env = "WUKONG_TLS_CERT", value_name = "FILE", help_heading = "Mutual TLS")]
    tls_cert: Option<PathBuf>,
    /// This client's private key (PEM).
    #[arg(long, global = true, env = "WUKONG_TLS_KEY", value_name = "FILE", help_heading = "Mutual TLS")]
    tls_key: Option<PathBuf>,
    /// The name the agent's certificate must carry [default: wukong-agent, the name every agent's certificate has,
    /// as the operator verifies it: an agent is never verified by the IP it is dialled at, which a certificate
    /// rendered into cloud-init before the VM had an address cannot name].
    #[arg(long, global = true, env = "WUKONG_TLS_SERVER_NAME", value_name = "NAME", help_heading = "Mutual TLS")]
    tls_server_name: Option<String>,
    /// A TOML file with any of: agent, tls_ca, tls_cert, tls_key, tls_server_name (like a kubeconfig for the agent).
    #[arg(long, global = true, env = "WUKONG_AGENT_CONFIG", value_name = "FILE", help_heading = "Mutual TLS")]
    agent_config: Option<PathBuf>,
}

/// The `--agent-config` file.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct AgentConfigFile {
    agent: Option<String>,
    tls_ca: Option<PathBuf>,
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
    tls_server_name: Option<String>,
}

impl TlsArgs {
    /// The agent address from the file (if any), and the TLS files: all three or none.
    fn resolve(&self) -> anyhow::Result<(Option<String>, Option<TlsFiles>)> {
        let file: AgentConfigFile = match &self.agent_config {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|e| UsageError(format!("cannot read the agent configuration {}: {e}", path.display())))?;
                toml::from_str(&text).map_err(|e| {
                    UsageError(format!("{} is not a valid agent configuration: {}", path.display(), e.message()))
                })?
            }
            None => AgentConfigFile::default(),
        };
        let ca = self.tls_ca.clone().or(file.tls_ca);
        let cert = self.tls_cert.clone().or(file.tls_cert);
        let key = self.tls_key.clone().or(file.tls_key);
        let server_name = self.tls_server_name.clone().or(file.tls_server_name);
        let server_name = Some(server_name.unwrap_or_else(|| wukong_proto::AGENT_SERVER_NAME.to_string()));
        let tls = match (ca, cert, key) {
            (None, None, None) => None,
            (Some(ca), Some(cert), Some(key)) => Some(TlsFiles { ca, cert, key, server_name }),
            _ => return Err(UsageError("mutual TLS needs all of --tls-ca, --tls-cert and --tls-key".into()).into()),
        };
        Ok((file.agent, tls))
    }
}

/// A mistake in how wukongctl was called (exit code 2), found before anything is contacted.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub(crate) struct UsageError(String);

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Format {
    Table,
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Attach a volume and wait until the guest reports the disk (needs --vmi or --qmp).
    Attach(volumes::AttachArgs),
    /// Detach a volume safely: the guest releases the disk first, or the detach is refused with every reason
    /// (exit 3). Needs --vmi or --qmp.
    Detach(volumes::DetachArgs),
    /// Move a volume to another VM: a safe detach from this one (--vmi or --qmp; refused with every reason while
    /// its guest uses the disk, exit 3), then an attach of the same storage to the target (--to-vmi or --to-qmp),
    /// never plugged into both. Run it again to finish a move that stopped half way.
    ///
    /// The target gets the storage the source has plugged: its image file (QEMU) or its claim or DataVolume
    /// (KubeVirt, in the same namespace), with the same serial. A move is recorded on this machine (under
    /// $XDG_STATE_HOME, else ~/.local/state, in wukongctl/moves) until it finishes, so that running it again after
    /// it stopped between its detach and its attach plugs the same storage; from elsewhere, --image, --claim or
    /// --data-volume (and --serial) say what to plug. --persist changes both VMs' specs. --force is refused: a move
    /// exists to keep the data.
    Move(moves::MoveArgs),
    /// List the guest's disks.
    Disks {
        /// Also scan who uses each disk.
        #[arg(long)]
        usage: bool,
    },
    /// Who uses this disk right now (a fresh scan in the guest). Exit code 3 when it is in use.
    Usage {
        /// The disk: its serial, or a path in the guest the agent resolves to its disk (/dev/sdb, /dev/sdb1,
        /// /dev/disk/by-id/..., a mount point or any file on it).
        serial: String,
    },
    /// Release the disk in the guest so it can be unplugged safely: refused (exit 3, with every reason) while
    /// anything uses it.
    Release {
        /// The disk: its serial, or a path in the guest the agent resolves to its disk (/dev/sdb, /dev/sdb1,
        /// /dev/disk/by-id/..., a mount point or any file on it).
        serial: String,
        /// Unmount the disk's filesystems (in every mount namespace) if nothing else uses them.
        #[arg(long)]
        unmount: bool,
        /// Run every check and print what would be done, changing nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Undo a release whose unplug did not happen: the disk comes back, with the mounts the release undid.
    CancelRelease {
        /// The disk: its serial, or a path in the guest the agent resolves to its disk (/dev/sdb, /dev/sdb1,
        /// /dev/disk/by-id/..., a mount point or any file on it).
        serial: String,
    },
    /// Print the agent's facts (version, kernel, boot id, capabilities, whether releases are allowed).
    Info,
    /// Print disk events as they happen (a snapshot first), until interrupted; JSON lines with -o json.
    Watch {
        /// Only these serials.
        serials: Vec<String>,
    },
    /// Make the certificates of the agents and the operator, offline; the operator's Secret goes to stdout (for
    /// `kubectl apply -f -`). Contacts nothing.
    #[command(subcommand)]
    Pki(PkiCommand),
}

impl Command {
    /// The hypervisor flags of a volume command (attach, detach, move: the source's).
    fn hypervisor(&self) -> Option<&volumes::HypervisorArgs> {
        match self {
            Command::Attach(args) => Some(&args.hypervisor),
            Command::Detach(args) => Some(&args.hypervisor),
            Command::Move(args) => Some(&args.hypervisor),
            _ => None,
        }
    }
}

#[derive(Debug, Subcommand)]
enum PkiCommand {
    /// A new CA, the agents' certificate and the companion's client certificate in --dir (refused if any exists,
    /// unless --force).
    Init(PkiArgs),
    /// New certificates (and keys) for the agents and the companion from the CA already in --dir.
    Renew(PkiArgs),
}

#[derive(Debug, clap::Args)]
struct PkiArgs {
    /// Where ca.crt, ca.key, agent.crt, agent.key, companion.crt and companion.key are written (keys 0600).
    #[arg(long, value_name = "DIR")]
    dir: PathBuf,
    /// Validity of the agent's and the companion's certificates.
    #[arg(long, default_value_t = 365)]
    days: u32,
    /// Validity of the CA (init only).
    #[arg(long, default_value_t = 3650)]
    ca_days: u32,
    /// The name the agents' certificate carries: the operator's --agent-server-name.
    #[arg(long, default_value = wukong_proto::AGENT_SERVER_NAME)]
    agent_name: String,
    /// The companion's certificate name: the agents' allow_clients.
    #[arg(long, default_value = "wukong-companion")]
    client_name: String,
    /// The operator's namespace, where the Secret wukong-agent-client-tls goes.
    #[arg(long, default_value = "wukong-system")]
    namespace: String,
    /// Replace existing keys (init): every certificate of the old CA stops being trusted.
    #[arg(long)]
    force: bool,
}

/// `wukongctl pki`: writes the files and prints the Secret.
fn pki(command: PkiCommand) -> anyhow::Result<u8> {
    use wukong_controller_client::pki;
    let (args, renew) = match command {
        PkiCommand::Init(args) => (args, false),
        PkiCommand::Renew(args) => (args, true),
    };
    let options = pki::PkiOptions {
        dir: args.dir,
        ca_days: args.ca_days,
        days: args.days,
        agent_name: args.agent_name,
        client_name: args.client_name,
        namespace: args.namespace,
        force: args.force,
    };
    let manifest = match renew {
        false => pki::init(&options),
        true => pki::renew(&options),
    }
    .map_err(|e| match e {
        pki::PkiError::Exists(_) | pki::PkiError::BadName { .. } | pki::PkiError::BadDays { .. } => {
            anyhow::Error::new(UsageError(e.to_string()))
        }
        e => e.into(),
    })?;
    print!("{manifest}");
    eprintln!(
        "wukongctl: wrote {} in {}: give the agents agent.crt, agent.key and ca.crt (their tls_client_ca); apply the \
         Secret above in the operator's namespace",
        [pki::CA_CERT, pki::CA_KEY, pki::AGENT_CERT, pki::AGENT_KEY, pki::CLIENT_CERT, pki::CLIENT_KEY].join(", "),
        options.dir.display()
    );
    Ok(0)
}

/// The local agent's socket (root only).
const DEFAULT_AGENT: &str = "unix:/run/wukong-agent/agent.sock";

/// Exit codes scripts can rely on.
const EXIT_OTHER: u8 = 1;
const EXIT_USAGE: u8 = 2;
const EXIT_IN_USE: u8 = 3;
const EXIT_UNREACHABLE: u8 = 4;
const EXIT_TIMEOUT: u8 = 5;
const EXIT_NOT_IN_GUEST: u8 = 6;
const EXIT_TLS: u8 = 7;

#[tokio::main]
async fn main() -> ExitCode {
    let matches = Cli::command().get_matches();
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    // Only an --agent typed on this command line may override where --vmi leads; WUKONG_AGENT and --agent-config
    // name a default agent, which is not the VMI's.
    let agent_typed = matches.value_source("agent") == Some(clap::parser::ValueSource::CommandLine);
    // Quiet unless asked (WUKONG_LOG=info): the error sentence below is the whole story, printed once.
    let filter = tracing_subscriber::EnvFilter::builder()
        .with_default_directive(tracing_subscriber::filter::LevelFilter::OFF.into())
        .with_env_var("WUKONG_LOG")
        .from_env_lossy();
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let json = cli.output == Format::Json;
    match run(cli, agent_typed).await {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            let code = exit_code(&e);
            let message = sentence(&e);
            // A refusal's blockers were printed as a table already; the message's own list would repeat them.
            let message = message.split(". Blockers: ").next().unwrap_or(&message);
            eprintln!("wukongctl: {message}");
            if json {
                let removal_in_progress =
                    e.downcast_ref::<CompanionError>().is_some_and(CompanionError::removal_in_progress);
                print_json(&serde_json::json!({
                    "error": message, "exit_code": code, "removal_in_progress": removal_in_progress,
                }));
            }
            ExitCode::from(code)
        }
    }
}

/// The error and its causes as one sentence, each cause once: many errors quote their cause already.
fn sentence(e: &anyhow::Error) -> String {
    let mut out = e.to_string();
    for cause in e.chain().skip(1) {
        let cause = cause.to_string();
        if !out.contains(&cause) {
            out = format!("{out}: {cause}");
        }
    }
    out
}

/// The documented exit code of a failure.
fn exit_code(e: &anyhow::Error) -> u8 {
    if let Some(e) = e.downcast_ref::<CompanionError>() {
        return companion_exit_code(e);
    }
    if e.downcast_ref::<UsageError>().is_some()
        || e.downcast_ref::<BadAddress>().is_some()
        || e.downcast_ref::<wukong_proto::serial::SerialError>().is_some()
    {
        return EXIT_USAGE;
    }
    e.downcast_ref::<ClientError>().map_or(EXIT_OTHER, client_exit_code)
}

fn client_exit_code(e: &ClientError) -> u8 {
    match e {
        ClientError::Unreachable { .. } | ClientError::Dial(_) => EXIT_UNREACHABLE,
        ClientError::Timeout { .. } => EXIT_TIMEOUT,
        ClientError::BadAddress(_)
        | ClientError::Target(_)
        | ClientError::TlsFile { .. }
        | ClientError::NotPem { .. }
        | ClientError::Tls(_) => EXIT_USAGE,
        ClientError::TlsRefused(_) => EXIT_TLS,
        err => match err.code() {
            Some(tonic::Code::InvalidArgument) => EXIT_USAGE,
            Some(tonic::Code::DeadlineExceeded) => EXIT_TIMEOUT,
            Some(tonic::Code::NotFound) => EXIT_NOT_IN_GUEST,
            _ => EXIT_OTHER,
        },
    }
}

/// Exit codes of attach and detach failures.
fn companion_exit_code(e: &CompanionError) -> u8 {
    match e {
        CompanionError::BadSerial { .. }
        | CompanionError::BadVolumeName { .. }
        | CompanionError::SerialMismatch { .. }
        | CompanionError::ForcedMove(_)
        | CompanionError::TargetTaken { .. }
        | CompanionError::SerialTaken { .. } => EXIT_USAGE,
        CompanionError::Refused { .. }
        | CompanionError::SystemDisk { .. }
        | CompanionError::RemovalUnguarded { .. } => EXIT_IN_USE,
        CompanionError::NotInGuest { .. } => EXIT_NOT_IN_GUEST,
        CompanionError::AgentUnreachable(e)
        | CompanionError::AttachUnconfirmed { error: e, .. }
        | CompanionError::MoveTargetUnreachable { error: e, .. }
            if matches!(**e, ClientError::TlsRefused(_)) =>
        {
            EXIT_TLS
        }
        CompanionError::AgentUnreachable(_)
        | CompanionError::AttachUnconfirmed { .. }
        | CompanionError::MoveTargetUnreachable { .. } => EXIT_UNREACHABLE,
        CompanionError::Timeout(_) | CompanionError::GuestDidNotSee { .. } | CompanionError::RemovalPending { .. } => {
            EXIT_TIMEOUT
        }
        CompanionError::Agent(e) => client_exit_code(e),
        // The attach's own failure says what went wrong; the move's sentence says where the disk is.
        CompanionError::MoveIncomplete { error, .. } => companion_exit_code(error),
        _ => EXIT_OTHER,
    }
}

pub(crate) fn print_json(value: &serde_json::Value) {
    println!("{}", serde_json::to_string_pretty(value).expect("JSON values always serialise"));
}

/// Checks the serials a command names, before anything is contacted (the agent's own rule). A path (it starts with
/// '/', which no serial does) is the guest's to resolve: only the agent sees its devices and mounts.
fn check_serials(command: &Command) -> Result<(), wukong_proto::serial::SerialError> {
    let serials: Vec<&String> = match command {
        Command::Usage { serial } | Command::Release { serial, .. } | Command::CancelRelease { serial } => {
            if serial.starts_with('/') { Vec::new() } else { vec![serial] }
        }
        Command::Watch { serials } => serials.iter().collect(),
        Command::Detach(args) => args.serial.iter().collect(),
        Command::Move(args) => args.serial.iter().collect(),
        Command::Attach(_) | Command::Disks { .. } | Command::Info | Command::Pki(_) => Vec::new(),
    };
    serials.into_iter().try_for_each(|s| Serial::parse(s).map(drop))
}

async fn run(cli: Cli, agent_typed: bool) -> anyhow::Result<u8> {
    if let Command::Pki(command) = cli.command {
        return pki(command);
    }
    let json = cli.output == Format::Json;
    // Every mistake in the call is found here, before anything is contacted.
    let vmi = cli.target.vmi()?;
    let (file_agent, tls) = cli.tls.resolve()?;
    let agent = match &vmi {
        Some(_) if agent_typed => cli.target.agent.clone(),
        Some(_) => None,
        None => cli.target.agent.clone().or(file_agent),
    };
    let address = agent.as_deref().map(str::parse::<AgentAddress>).transpose()?;
    let routed = vmi.is_some() && address.is_none();
    let route_flags = [
        ("--agent-transport", cli.target.agent_transport.is_some()),
        ("--agent-network", cli.target.agent_network.is_some()),
        ("--agent-port", cli.target.agent_port.is_some()),
        ("--agent-vsock-tls", cli.target.agent_vsock_tls.is_some()),
    ];
    if let Some((flag, _)) = route_flags.iter().find(|(_, given)| *given).filter(|_| !routed) {
        return Err(UsageError(format!(
            "{flag} chooses the way to the agent of a --vmi; with --agent, or without --vmi, the address says it"
        ))
        .into());
    }
    check_serials(&cli.command)?;
    let volume_target =
        cli.command.hypervisor().map(|args| volumes::Target::of(vmi.as_ref(), args, address.is_some())).transpose()?;
    let move_plan = match (&cli.command, &volume_target) {
        (Command::Move(args), Some(source)) => Some(moves::MovePlan::of(args, source)?),
        _ => None,
    };
    let attach_volume = match (&cli.command, &volume_target) {
        (Command::Attach(args), Some(target)) => Some(volumes::attach_volume(target, args)?),
        _ => None,
    };
    if let (Command::Detach(args), Some(volumes::Target::Qemu(_))) = (&cli.command, &volume_target)
        && args.delete_claim
    {
        return Err(UsageError("--delete-claim is for KubeVirt volumes (--vmi)".into()).into());
    }

    // KubeVirt's vsock subresource is opened through the Kubernetes API too.
    let needs_kube = vmi.is_some()
        || matches!(address, Some(AgentAddress::KubeVirtVsock { .. }))
        || move_plan.as_ref().is_some_and(moves::MovePlan::needs_kube);
    let kube = match needs_kube {
        true => Some(target::kube_client(&cli.target).await?),
        false => None,
    };
    let backend = match (cli.command.hypervisor(), &volume_target) {
        (Some(args), Some(t)) => Some(volumes::Backend::connect(t, kube.as_ref(), args).await?),
        _ => None,
    };
    let move_to = match &move_plan {
        Some(plan) => Some(volumes::Backend::connect(&plan.target(), kube.as_ref(), &plan.hypervisor).await?),
        None => None,
    };
    // The agent of the machine the command was pointed at, and no other.
    let address = match (address, &vmi, &kube) {
        (Some(address), _, _) => address,
        (None, Some(vmi), Some(kube)) => target::vmi_agent(kube, vmi, &cli.target.route()).await?,
        _ => DEFAULT_AGENT.parse()?,
    };
    let move_agent = match &move_plan {
        Some(plan) => Some(plan.agent(kube.as_ref(), &cli.target.route()).await?),
        None => None,
    };
    tracing::info!(agent = %address.place(), "reaching the agent");
    let dialer = Dialer::new().with_tls(tls);
    let dialer = match kube {
        Some((client, _)) => dialer.with_kube(client),
        None => dialer,
    };
    let client = dialer.connect(address)?;
    let move_client = move_agent.map(|address| dialer.connect(address)).transpose()?;
    match cli.command {
        Command::Attach(args) => {
            let volume = attach_volume.expect("checked above");
            volumes::attach(backend.as_ref().expect("connected above"), &client, volume, args, json).await?
        }
        Command::Detach(args) => {
            volumes::detach(backend.as_ref().expect("connected above"), &client, args, json).await?
        }
        Command::Move(args) => {
            let from = (backend.as_ref().expect("connected above"), &client);
            let to = (move_to.as_ref().expect("connected above"), move_client.as_ref().expect("dialled above"));
            moves::move_volume(from, to, move_plan.expect("checked above"), args, json).await?
        }
        Command::Disks { usage } => {
            let disks = client.list_disks(usage).await?;
            if json {
                print_json(&serde_json::Value::Array(disks.iter().map(output::disk_json).collect()));
            } else {
                print!("{}", output::disks_table(&disks));
            }
        }
        Command::Usage { serial } => {
            let report = client.check_usage(&serial).await?;
            if json {
                print_json(&output::usage_json(&report));
            } else {
                print!("{}", output::usage_text(&report));
            }
            return Ok(if report.in_use { EXIT_IN_USE } else { 0 });
        }
        Command::Release { serial, unmount, dry_run } => match client.prepare_detach(&serial, unmount, dry_run).await {
            Ok(r) if json => print_json(&output::release_json(&r)),
            Ok(r) => print!("{}", output::release_text(&r)),
            Err(e) if e.code() == Some(tonic::Code::FailedPrecondition) => {
                let message = e.to_string();
                match e.refusal() {
                    Some(r) if json => print_json(&output::release_json(&r)),
                    Some(r) => print!("{}", r.usage.as_ref().map(output::usage_text).unwrap_or_default()),
                    None => {}
                }
                // The table above already lists the blockers the message repeats for plain gRPC clients.
                let headline = if e.refusal().is_some() { message.split(". Blockers: ").next() } else { None };
                eprintln!("wukongctl: {}", headline.unwrap_or(&message));
                return Ok(EXIT_IN_USE);
            }
            Err(e) => return Err(e.into()),
        },
        Command::CancelRelease { serial } => {
            let r = client.cancel_detach(&serial).await?;
            if json {
                print_json(&serde_json::json!({
                    "disk": r.disk.as_ref().map(output::disk_json),
                    "actions": output::actions_json(&r.actions),
                }));
            } else {
                let disk = r.disk.as_ref().map(|d| format!("{} ({})", d.id, d.dev_node)).unwrap_or_default();
                print!("{disk} is back:\n{}", output::actions_text(&r.actions));
            }
        }
        Command::Info => {
            let info = client.agent_info().await?;
            if json {
                print_json(&output::info_json(&info));
            } else {
                print!("{}", output::info_text(&info));
            }
        }
        Command::Pki(_) => unreachable!("answered before any agent is contacted"),
        Command::Watch { serials } => {
            let mut stream = client.watch(serials).await?;
            while let Some(event) = stream.message().await.context("the watch ended with an error")? {
                match json {
                    // One compact object per line, so `jq` and scripts can follow the stream.
                    true => println!("{}", output::event_json(&event)),
                    false => println!("{}", output::event_line(&event)),
                }
            }
        }
    }
    Ok(0)
}
