//! wukong-operator: `run` (the controller) or `crd` (print the CRD). The command line is `wukong_operator::cli`.

use anyhow::Context;
use clap::Parser;
use wukong_operator::cli::{Cli, Command};
use wukong_operator::crd;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = match Cli::parse().command {
        Command::Crd => {
            print!("{}", crd::crd_yaml());
            return Ok(());
        }
        Command::Run(args) => *args,
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    let logs = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match args.log_json {
        true => logs.json().init(),
        false => logs.init(),
    }
    let identity = match &args.identity {
        Some(id) => id.clone(),
        None => std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .context("no --identity (POD_NAME) and no hostname to use instead")?,
    };
    let config = args.config(identity);
    let client = kube::Client::try_default().await.context("cannot configure a Kubernetes client")?;
    let shutdown = async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    };
    wukong_operator::run(client, config, shutdown).await?;
    Ok(())
}
