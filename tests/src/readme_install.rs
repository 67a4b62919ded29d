//! The README's operator install, two ways. Recorded: its operator block (the certificates made by the real
//! `wukongctl pki`) in a scratch directory, with kubectl and helm recorded rather than sent: what
//! each kubectl call would create is read from its arguments and its input, and what `helm install` would install is
//! rendered by the real `helm template` with the same arguments (CRDs included), in helm's install order.
//! `tests/tests/operator_install.rs` checks
//! what it makes against the shipped manifests; [`Installed::apply`] sends it to a lab API server, so the operator's
//! Pods run from exactly what the README installs. Run: [`ReadmeShell`] runs the README's marked blocks as
//! written, with the lab's real kubectl and helm (`tests/tests/install_journey.rs`).

use crate::workspace_root;
use anyhow::{Context, Result, bail, ensure};
use serde_json::Value;
use std::collections::BTreeMap;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Stands in for kubectl and helm: records each call's program and arguments (NUL-separated) and, for kubectl's
/// `-f -`, what it reads; for `helm install`, what the real helm ($WUKONG_HELM) renders from the same arguments.
const STAND_IN: &str = r#"#!/bin/bash
set -euo pipefail
calls=$(dirname "$0")/../calls
mkdir -p "$calls"
n=$(printf '%03d' "$(find "$calls" -name '*.args' | wc -l)")
printf '%s\0' "$(basename "$0")" "$@" > "$calls/$n.args"
if [ "$(basename "$0")" = helm ] && [ "${1:-}" = install ]; then
  shift
  exec "$WUKONG_HELM" template "$@" --include-crds > "$calls/$n.stdin"
fi
if [ "${*: -1}" = - ]; then cat > "$calls/$n.stdin"; fi
"#;

/// The first `sh` block of the README that contains `needle`, continuation lines joined, comments dropped.
pub fn readme_block(needle: &str) -> Result<String> {
    let readme = std::fs::read_to_string(workspace_root().join("README.md"))?;
    let block = readme
        .split("```sh\n")
        .skip(1)
        .filter_map(|rest| rest.split_once("```").map(|(block, _)| block))
        .find(|block| block.contains(needle))
        .with_context(|| format!("the README has no sh block with {needle}"))?;
    Ok(block.replace("\\\n", " "))
}

/// What the install's kubectl calls would have created or applied.
#[derive(Default)]
pub struct Installed {
    /// The namespaces created, in order.
    pub namespaces: Vec<String>,
    /// (namespace, name) → the Secret.
    pub secrets: BTreeMap<(String, String), Secret>,
    /// Every document applied, in order.
    pub applied: Vec<Value>,
}

/// A Secret the install creates: its type (`kubectl create secret generic` or `tls`) and each key's file.
pub struct Secret {
    pub type_: &'static str,
    pub files: BTreeMap<String, PathBuf>,
}

impl Installed {
    fn record(&mut self, work: &Path, call: &[String], stdin: Option<PathBuf>) -> Result<()> {
        let mut namespace = "default".to_string();
        let mut words = Vec::new();
        let (program, call) = call.split_first().context("a call without its program")?;
        let mut args = call.iter();
        while let Some(arg) = args.next() {
            match arg.as_str() {
                "-n" | "--namespace" => namespace = args.next().context("-n without a namespace")?.clone(),
                _ => match arg.strip_prefix("--namespace=") {
                    Some(ns) => namespace = ns.to_string(),
                    None => words.push(arg.as_str()),
                },
            }
        }
        let flag = |name: &'static str| words.iter().filter_map(move |w| w.strip_prefix(name));
        if program == "helm" {
            match words.as_slice() {
                ["install", ..] => {
                    let rendered = stdin.context("helm template rendered nothing")?;
                    let text = std::fs::read_to_string(&rendered)?;
                    let documents = serde_saphyr::from_multiple::<Value>(&text).context("helm template's output")?;
                    self.applied.extend(documents.into_iter().filter(|d| !d.is_null()));
                }
                _ => bail!("the README's install calls helm {call:?}, which this test cannot read; teach it"),
            }
            return Ok(());
        }
        match words.as_slice() {
            ["create", "namespace", name] => self.namespaces.push(name.to_string()),
            ["create", "secret", "generic", name, ..] => {
                let files = flag("--from-file=")
                    .map(|f| f.split_once('=').map(|(k, p)| (k.to_string(), work.join(p))))
                    .collect::<Option<_>>()
                    .with_context(|| format!("Secret {name}: --from-file without KEY= ({call:?})"))?;
                self.secrets.insert((namespace, name.to_string()), Secret { type_: "Opaque", files });
            }
            ["create", "secret", "tls", name, ..] => {
                let one =
                    |f: &'static str| flag(f).next().map(|p| work.join(p)).context(format!("{f} of Secret {name}"));
                let files = BTreeMap::from([("tls.crt".into(), one("--cert=")?), ("tls.key".into(), one("--key=")?)]);
                self.secrets.insert((namespace, name.to_string()), Secret { type_: "kubernetes.io/tls", files });
            }
            ["apply", "-f", file] => {
                let path = match *file {
                    "-" => stdin.context("kubectl apply -f - read nothing")?,
                    file => work.join(file),
                };
                let text = std::fs::read_to_string(&path).with_context(|| path.display().to_string())?;
                for doc in serde_saphyr::from_multiple::<Value>(&text).context(file.to_string())? {
                    match doc["kind"].as_str() {
                        Some("Secret") => self.record_secret(work, &doc)?,
                        _ => self.applied.push(doc),
                    }
                }
            }
            _ => bail!("the README's install calls kubectl {call:?}, which this test cannot read; teach it"),
        }
        Ok(())
    }

    /// An applied Secret (`wukongctl pki`'s), its keys written out as files the way `create secret` reads them.
    fn record_secret(&mut self, work: &Path, doc: &Value) -> Result<()> {
        use base64::Engine;
        let name = doc["metadata"]["name"].as_str().context("an applied Secret without a name")?;
        let namespace = doc["metadata"]["namespace"].as_str().unwrap_or("default");
        ensure!(doc["type"].as_str().unwrap_or("Opaque") == "Opaque", "Secret {name}: teach this test its type");
        let dir = work.join("applied-secrets").join(namespace).join(name);
        std::fs::create_dir_all(&dir)?;
        let mut files = BTreeMap::new();
        for (key, value) in doc["data"].as_object().with_context(|| format!("Secret {name} has no data"))? {
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(value.as_str().unwrap_or_default())
                .with_context(|| format!("Secret {name} key {key} is not base64"))?;
            std::fs::write(dir.join(key), bytes)?;
            files.insert(key.clone(), dir.join(key));
        }
        self.secrets.insert((namespace.to_string(), name.to_string()), Secret { type_: "Opaque", files });
        Ok(())
    }

    pub fn kind(&self, kind: &str) -> impl Iterator<Item = &Value> {
        self.applied.iter().filter(move |d| d["kind"] == kind)
    }
}

/// Runs the README's install block in `work` and reads back what kubectl was asked to do.
pub fn run_install(work: &Path) -> Result<Installed> {
    let block = readme_block("helm install wukong-operator")?;
    std::os::unix::fs::symlink(workspace_root().join("deploy"), work.join("deploy"))?;
    std::fs::create_dir(work.join("bin"))?;
    for program in ["kubectl", "helm"] {
        std::fs::write(work.join("bin").join(program), STAND_IN)?;
        std::fs::set_permissions(work.join("bin").join(program), std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
    }
    // The wukongctl of this build (`cargo build -p wukong-controller-client` first), as an installer has it.
    let wukongctl = crate::wukongctl_binary();
    ensure!(
        wukongctl.exists(),
        "{} is missing: cargo build -p wukong-controller-client --bin wukongctl",
        wukongctl.display()
    );
    std::os::unix::fs::symlink(&wukongctl, work.join("bin/wukongctl"))?;
    let path = format!("{}:{}", work.join("bin").display(), std::env::var("PATH").unwrap_or_default());
    let helm = crate::helm::command()?;
    let mut bash = Command::new("bash");
    bash.envs(helm.get_envs().filter_map(|(k, v)| Some((k, v?)))).env("WUKONG_HELM", helm.get_program());
    let output = bash
        .args(["-euo", "pipefail", "-c", &block])
        .current_dir(work)
        .env("PATH", path)
        .output()
        .context("running bash")?;
    ensure!(output.status.success(), "the README's install failed: {}", String::from_utf8_lossy(&output.stderr));
    let mut installed = Installed::default();
    let mut calls: Vec<PathBuf> = std::fs::read_dir(work.join("calls"))?
        .map(|e| e.map(|e| e.path()))
        .filter(|p| p.as_ref().is_ok_and(|p| p.extension().is_some_and(|e| e == "args")))
        .collect::<Result<_, _>>()?;
    calls.sort();
    for call in calls {
        let args = std::fs::read_to_string(&call)?;
        let args: Vec<String> = args.split_terminator('\0').map(str::to_string).collect();
        let stdin = Some(call.with_extension("stdin")).filter(|p| p.exists());
        installed.record(work, &args, stdin)?;
    }
    Ok(installed)
}

/// The `--cert`, `--key` and `--client-ca` the README gives scripts/render-user-data.sh: the agent's files.
pub fn readme_agent_files() -> Result<BTreeMap<String, String>> {
    let block = readme_block("scripts/render-user-data.sh")?;
    let words: Vec<&str> = block.split_whitespace().collect();
    ["--cert", "--key", "--client-ca"]
        .iter()
        .map(|flag| {
            let at = words.iter().position(|w| w == flag).with_context(|| format!("render-user-data {flag}"))?;
            Ok((flag.to_string(), words.get(at + 1).context("a value")?.to_string()))
        })
        .collect()
}

impl Installed {
    /// Sends what the install made to the API server `client` talks to, as kubectl would have: the namespaces, the
    /// Secrets, then every applied document in order (created, or merged into an existing object).
    pub async fn apply(&self, client: &kube::Client) -> Result<()> {
        use base64::Engine;
        let encode = |file: &PathBuf| -> Result<String> {
            let bytes = std::fs::read(file).with_context(|| file.display().to_string())?;
            Ok(base64::engine::general_purpose::STANDARD.encode(bytes))
        };
        for namespace in &self.namespaces {
            let ns = serde_json::json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}});
            crate::cluster::apply(client, &ns).await?;
        }
        for ((namespace, name), secret) in &self.secrets {
            let data = secret.files.iter().map(|(k, f)| Ok((k.clone(), Value::String(encode(f)?))));
            let data = data.collect::<Result<_>>()?;
            let object = serde_json::json!({"apiVersion": "v1", "kind": "Secret", "type": secret.type_,
                "metadata": {"name": name, "namespace": namespace}, "data": Value::Object(data)});
            crate::cluster::apply(client, &object).await?;
        }
        for doc in &self.applied {
            crate::cluster::apply(client, doc).await?;
        }
        Ok(())
    }
}

/// The README's runnable install, as a user copies it: each `sh` block that follows a `<!-- run: NAME -->` line.
/// The block named `settings` holds the user's own values (`NAME=value` lines); a test replaces those it must (the
/// lab's file server, say) and runs every other block as written, in a scratch directory beside a checkout's
/// `deploy/` and `scripts/`, with the lab's kubectl and helm and the workspace's wukongctl first in `PATH`.
pub struct ReadmeShell {
    dir: PathBuf,
    settings: String,
    path: String,
    kubeconfig: PathBuf,
    helm_env: Vec<(OsString, OsString)>,
}

/// The `sh` block the README marks `<!-- run: NAME -->`.
pub fn readme_run_block(name: &str) -> Result<String> {
    let readme = std::fs::read_to_string(workspace_root().join("README.md"))?;
    let marker = format!("<!-- run: {name} -->\n");
    let (_, rest) = readme.split_once(&marker).with_context(|| format!("the README has no {marker:?} line"))?;
    let body = rest.strip_prefix("```sh\n").with_context(|| format!("{marker:?} is not followed by a sh block"))?;
    let (block, _) = body.split_once("\n```").with_context(|| format!("the sh block after {marker:?} never ends"))?;
    Ok(format!("{block}\n"))
}

impl ReadmeShell {
    /// Takes the README's settings with `overrides` in place of its values: every override must name a setting the
    /// README has, so a renamed setting fails here rather than running with the README's placeholder.
    pub fn new(dir: &Path, kubeconfig: &Path, overrides: &[(&str, String)]) -> Result<Self> {
        let mut settings = readme_run_block("settings")?;
        for (name, value) in overrides {
            let prefix = format!("{name}=");
            let line = settings
                .lines()
                .find(|l| l.starts_with(&prefix))
                .with_context(|| format!("the README's settings have no {name}=; update this test"))?
                .to_string();
            let quoted = format!("{name}='{}'", value.replace('\'', r"'\''"));
            settings = settings.replace(&line, &quoted);
        }
        for link in ["deploy", "scripts", "systemd"] {
            std::os::unix::fs::symlink(workspace_root().join(link), dir.join(link))?;
        }
        let wukongctl = crate::wukongctl_binary();
        // helm with its private directories (crate::helm), installed if it is not yet.
        let helm = crate::helm::command()?;
        let helm_env: Vec<(OsString, OsString)> =
            helm.get_envs().filter_map(|(k, v)| Some((k.to_os_string(), v?.to_os_string()))).collect();
        let bins = [
            crate::cluster::kube_bin_dir(),
            Path::new(helm.get_program()).parent().context("helm's directory")?.to_path_buf(),
            wukongctl.parent().context("wukongctl's directory")?.to_path_buf(),
        ];
        let mut path = std::env::join_paths(bins)?.into_string().map_err(|p| anyhow::anyhow!("PATH {p:?}"))?;
        path.push(':');
        path.push_str(&std::env::var("PATH").unwrap_or_default());
        Ok(Self { dir: dir.to_path_buf(), settings, path, kubeconfig: kubeconfig.to_path_buf(), helm_env })
    }

    /// Runs the block `name` after the settings, with bash's `-euo pipefail`, for at most 10 minutes (a `kubectl
    /// --wait` on a finalizer that never goes must fail the test, not hang it); its output, or an error with it.
    pub fn run(&self, name: &str) -> Result<String> {
        let script = format!("{}{}", self.settings, readme_run_block(name)?);
        let output = Command::new("timeout")
            .args(["--kill-after=10", "600", "bash", "-euo", "pipefail", "-c", &script])
            .current_dir(&self.dir)
            .env("PATH", &self.path)
            .env("KUBECONFIG", &self.kubeconfig)
            .envs(self.helm_env.iter().map(|(k, v)| (k, v)))
            // kubectl 1.20 keeps its discovery cache in ~/.kube: the scratch directory is its home.
            .env("HOME", &self.dir)
            .output()
            .context("running bash")?;
        let said = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
        let why = match output.status.code() {
            Some(124 | 137) => "did not finish within 600 s".to_string(),
            _ => format!("failed ({})", output.status),
        };
        ensure!(output.status.success(), "the README's {name} block {why}:\n{script}\n---\n{said}");
        Ok(said)
    }
}
