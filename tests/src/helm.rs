//! helm v4 from `scripts/lib/install-helm.sh` (installed once per machine into target/wukong-helm; a later call
//! only checks it), run with its cache, configuration, data and API discovery cache under that directory, never in
//! `~`.

use anyhow::{Context, Result, bail};
use std::path::PathBuf;
use std::process::Command;

/// The chart, deploy/chart/wukong-operator.
pub fn chart() -> PathBuf {
    crate::workspace_root().join("deploy/chart/wukong-operator")
}

/// The directory install-helm.sh installs into, after making sure it did.
fn installed() -> Result<PathBuf> {
    let script = crate::workspace_root().join("scripts/lib/install-helm.sh");
    let output = Command::new("bash").arg(&script).output().context("running scripts/lib/install-helm.sh")?;
    if !output.status.success() {
        bail!("scripts/lib/install-helm.sh failed: {}", String::from_utf8_lossy(&output.stderr));
    }
    Ok(crate::target_dir().join("wukong-helm"))
}

/// A `helm` command with its private directories set.
pub fn command() -> Result<Command> {
    let dir = installed()?;
    let mut command = Command::new(dir.join("bin/helm"));
    let home = dir.join("home");
    command.env("HELM_CACHE_HOME", home.join("cache")).env("HELM_CONFIG_HOME", home.join("config"));
    // Not ~/.kube/cache either: helm's API discovery cache.
    command.env("HELM_DATA_HOME", home.join("data")).env("KUBECACHEDIR", home.join("kube-cache"));
    Ok(command)
}

/// Runs helm with `args`; its standard output, or an error with its standard error.
pub fn run(args: &[&str]) -> Result<String> {
    let output = command()?.args(args).output().context("running helm")?;
    if !output.status.success() {
        bail!("helm {} failed: {}", args.join(" "), String::from_utf8_lossy(&output.stderr).trim());
    }
    Ok(String::from_utf8(output.stdout)?)
}
