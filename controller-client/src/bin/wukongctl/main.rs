use anyhow::Context;
use clap::{Parser, Subcommand};
use std::io::IsTerminal;
use std::process::ExitCode;
mod volumes;

use std::path::PathBuf;
use wukong_controller_client::agent_client::{AgentAddress, AgentClient, ClientError, TlsFiles};
use wukong_controller_client::companion::CompanionError;
use wukong_controller_client::output;

/// Safe attach and detach of VM disks, checked with the guest's wukong-agent.
#[derive(Debug, Parser)]
#[command(name = "wukongctl", version)]
struct Cli {
    /// Agent address: http://IP:PORT or unix:PATH. Default: the VMI's interface IP with --vmi, else the local
    /// socket unix:/run/wukong-agent/agent.sock.
    #[arg(long, global = true, env = "WUKONG_AGENT")]
    agent: Option<String>,
    #[command(flatten)]
    tls: TlsArgs,
    #[command(flatten)]
    backend: volumes::BackendArgs,
    /// Output format.
    #[arg(long, short = 'o', global = true, value_enum, default_value_t = Format::Table)]
    output: Format,
    #[command(subcommand)]
    command: Command,
}

/// Mutual TLS with the agent: flags, their environment variables, or a file (flags win).
#[derive(Debug, Clone, clap::Args)]
struct TlsArgs {
    /// CA (PEM) that signed the agent's certificate.
    #[arg(long, global = true, env = "WUKONG_TLS_CA", value_name = "FILE")]
    tls_ca: Option<PathBuf>,
    /// This client's certificate (PEM).
    #[arg(long, global = true, env = "WUKONG_TLS_CERT", value_name = "FILE")]
    tls_cert: Option<PathBuf>,
    /// This client's private key (PEM).
    #[arg(long, global = true, env = "WUKONG_TLS_KEY", value_name = "FILE")]
    tls_key: Option<PathBuf>,
    /// The name the agent's certificate carries, when it is not the address's host.
    #[arg(long, global = true, env = "WUKONG_TLS_SERVER_NAME", value_name = "NAME")]
    tls_server_name: Option<String>,
    /// A TOML file with any of: agent, tls_ca, tls_cert, tls_key, tls_server_name (like a kubeconfig for the agent).
    #[arg(long, global = true, env = "WUKONG_AGENT_CONFIG", value_name = "FILE")]
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
                let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
                toml::from_str(&text)
                    .with_context(|| format!("{} is not a valid agent configuration", path.display()))?
            }
            None => AgentConfigFile::default(),
        };
        let ca = self.tls_ca.clone().or(file.tls_ca);
        let cert = self.tls_cert.clone().or(file.tls_cert);
        let key = self.tls_key.clone().or(file.tls_key);
        let server_name = self.tls_server_name.clone().or(file.tls_server_name);
        let tls = match (ca, cert, key) {
            (None, None, None) => None,
            (Some(ca), Some(cert), Some(key)) => Some(TlsFiles { ca, cert, key, server_name }),
            _ => return Err(UsageError("mutual TLS needs all of --tls-ca, --tls-cert and --tls-key".into()).into()),
        };
        Ok((file.agent, tls))
    }
}

/// A mistake in how wukongctl was called (exit code 2).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct UsageError(String);

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
    /// List the guest's disks.
    Disks {
        /// Also scan who uses each disk.
        #[arg(long)]
        usage: bool,
    },
    /// Who uses this disk right now (a fresh scan in the guest). Exit code 3 when it is in use.
    Usage {
        /// The disk's serial.
        serial: String,
    },
    /// Release the disk in the guest so it can be unplugged safely: refused (exit 3, with every reason) while
    /// anything uses it.
    Release {
        /// The disk's serial.
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
        /// The disk's serial.
        serial: String,
    },
    /// Print the agent's facts (version, kernel, boot id, capabilities).
    Info,
    /// Print disk events as they happen (a snapshot first), until interrupted.
    Watch {
        /// Only these serials.
        serials: Vec<String>,
    },
}

/// The local agent's socket (root only).
const DEFAULT_AGENT: &str = "unix:/run/wukong-agent/agent.sock";

/// Exit codes scripts can rely on.
const EXIT_OTHER: u8 = 1;
const EXIT_USAGE: u8 = 2;
const EXIT_IN_USE: u8 = 3;
const EXIT_UNREACHABLE: u8 = 4;
const EXIT_TIMEOUT: u8 = 5;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_env("WUKONG_LOG"))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    match run(cli).await {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            // A refusal's blockers were printed as a table already; the message's own list would repeat them.
            let message = format!("{e:#}");
            eprintln!("wukongctl: {}", message.split(". Blockers: ").next().unwrap_or(&message));
            if let Some(e) = e.downcast_ref::<CompanionError>() {
                return ExitCode::from(companion_exit_code(e));
            }
            if e.downcast_ref::<UsageError>().is_some() {
                return ExitCode::from(EXIT_USAGE);
            }
            let code = match e.downcast_ref::<ClientError>() {
                Some(ClientError::Unreachable { .. }) => EXIT_UNREACHABLE,
                Some(ClientError::Timeout { .. }) => EXIT_TIMEOUT,
                Some(ClientError::BadAddress(_) | ClientError::TlsFile { .. } | ClientError::Tls(_)) => EXIT_USAGE,
                Some(err) if err.code() == Some(tonic::Code::InvalidArgument) => EXIT_USAGE,
                Some(err) if err.code() == Some(tonic::Code::DeadlineExceeded) => EXIT_TIMEOUT,
                _ => EXIT_OTHER,
            };
            ExitCode::from(code)
        }
    }
}

/// Exit codes of attach and detach failures.
fn companion_exit_code(e: &CompanionError) -> u8 {
    match e {
        CompanionError::BadSerial { .. } | CompanionError::SerialMismatch { .. } => EXIT_USAGE,
        CompanionError::Refused { .. } | CompanionError::SystemDisk { .. } | CompanionError::NotInGuest { .. } => {
            EXIT_IN_USE
        }
        CompanionError::AgentUnreachable(_) => EXIT_UNREACHABLE,
        CompanionError::Timeout(_) | CompanionError::GuestDidNotSee { .. } => EXIT_TIMEOUT,
        _ => EXIT_OTHER,
    }
}

pub(crate) fn print_json(value: &serde_json::Value) {
    println!("{}", serde_json::to_string_pretty(value).expect("JSON values always serialise"));
}

async fn run(cli: Cli) -> anyhow::Result<u8> {
    let json = cli.output == Format::Json;
    let backend = match &cli.command {
        Command::Attach(_) | Command::Detach(_) => Some(volumes::Backend::connect(&cli.backend).await?),
        _ => None,
    };
    let (file_agent, tls) = cli.tls.resolve()?;
    let address = match (cli.agent.clone().or(file_agent), &backend) {
        (Some(a), _) => a,
        (None, Some(b)) => match b.agent_address().await? {
            Some(a) => a,
            None if cli.backend.vmi.is_some() => {
                anyhow::bail!("the VMI reports no interface IP to reach its agent at; give --agent http://IP:7443")
            }
            None => DEFAULT_AGENT.to_string(),
        },
        (None, None) => DEFAULT_AGENT.to_string(),
    };
    let client = AgentClient::connect_with(address.parse::<AgentAddress>()?, tls.as_ref())?;
    match cli.command {
        Command::Attach(args) => {
            volumes::attach(backend.as_ref().expect("connected above"), &client, args, json).await?
        }
        Command::Detach(args) => {
            volumes::detach(backend.as_ref().expect("connected above"), &client, args, json).await?
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
            println!("version:      {}", info.version);
            println!("hostname:     {}", info.hostname);
            println!("kernel:       {}", info.kernel_release);
            println!("os:           {}", info.os);
            println!("boot id:      {}", info.boot_id);
            println!("disks:        {}", info.disk_count);
            println!("capabilities: {}", info.capabilities.join(", "));
        }
        Command::Watch { serials } => {
            let mut stream = client.watch(serials).await?;
            while let Some(event) = stream.message().await.context("the watch ended with an error")? {
                println!("{}", output::event_line(&event));
            }
        }
    }
    Ok(0)
}
