use anyhow::Context;
use clap::{Parser, Subcommand};
use std::io::IsTerminal;
use std::process::ExitCode;
use wukong_controller_client::agent_client::{AgentAddress, AgentClient, ClientError};
use wukong_controller_client::output;

/// Safe attach and detach of VM disks, checked with the guest's wukong-agent.
#[derive(Debug, Parser)]
#[command(name = "wukongctl", version)]
struct Cli {
    /// Agent address: http://IP:PORT or unix:PATH.
    #[arg(long, global = true, env = "WUKONG_AGENT", default_value = "unix:/run/wukong-agent/agent.sock")]
    agent: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// List the guest's disks.
    Disks,
    /// Print the agent's facts (version, kernel, boot id, capabilities).
    Info,
    /// Print disk events as they happen (a snapshot first), until interrupted.
    Watch {
        /// Only these serials.
        serials: Vec<String>,
    },
}

/// Exit codes scripts can rely on.
const EXIT_OTHER: u8 = 1;
const EXIT_UNREACHABLE: u8 = 4;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_env("WUKONG_LOG"))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("wukongctl: {e:#}");
            let code = match e.downcast_ref::<ClientError>() {
                Some(ClientError::Unreachable { .. }) => EXIT_UNREACHABLE,
                _ => EXIT_OTHER,
            };
            ExitCode::from(code)
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let address: AgentAddress = cli.agent.parse()?;
    let client = AgentClient::connect(address)?;
    match cli.command {
        Command::Disks => {
            let disks = client.list_disks(false).await?;
            print!("{}", output::disks_table(&disks));
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
    Ok(())
}
