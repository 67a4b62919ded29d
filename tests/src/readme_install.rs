//! The README's operator install, run as a platform engineer would: its commands (the certificates made by the
//! real `wukongctl pki` and openssl) in a scratch directory, with kubectl recorded rather than sent (the lab has no kubectl of its own):
//! what each call would create is read from its arguments and its input. `tests/tests/operator_install.rs` checks
//! what it makes against the shipped manifests; [`Installed::apply`] sends it to a lab API server, so the operator's
//! Pods run from exactly what the README installs.

use crate::workspace_root;
use anyhow::{Context, Result, bail, ensure};
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Stands in for kubectl: records each call's arguments (NUL-separated) and, for `-f -`, what it reads.
const KUBECTL: &str = r#"#!/bin/bash
set -euo pipefail
calls=$(dirname "$0")/../calls
mkdir -p "$calls"
n=$(printf '%03d' "$(find "$calls" -name '*.args' | wc -l)")
printf '%s\0' "$@" > "$calls/$n.args"
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
    let block = readme_block("kubectl apply -f deploy/operator.yaml")?;
    std::os::unix::fs::symlink(workspace_root().join("deploy"), work.join("deploy"))?;
    std::fs::create_dir(work.join("bin"))?;
    std::fs::write(work.join("bin/kubectl"), KUBECTL)?;
    // The wukongctl of this build (`cargo build -p wukong-controller-client` first), as an installer has it.
    let wukongctl = crate::wukongctl_binary();
    ensure!(
        wukongctl.exists(),
        "{} is missing: cargo build -p wukong-controller-client --bin wukongctl",
        wukongctl.display()
    );
    std::os::unix::fs::symlink(&wukongctl, work.join("bin/wukongctl"))?;
    std::fs::set_permissions(work.join("bin/kubectl"), std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
    let path = format!("{}:{}", work.join("bin").display(), std::env::var("PATH").unwrap_or_default());
    let output = Command::new("bash")
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
