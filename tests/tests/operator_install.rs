//! The README's operator install, run as a platform engineer would: its commands (the certificates made by the
//! real openssl) in a scratch directory, with kubectl recorded rather than sent (the lab has no kubectl of its own:
//! what each call would create is read from its arguments and its input). Then what the shipped manifests need of
//! that install is checked with real parts: every Secret the Deployment mounts exists with every file the operator
//! reads from it; the Deployment's arguments, parsed by the operator's own command line, make it accept a real
//! agent installed with the README's agent certificate (dialled at the VMI's pod IP, which that certificate cannot
//! carry), and the agent accept it; the guard's serving certificate verifies against the applied `caBundle` for
//! the name the API server calls it by.

use anyhow::{Context, Result, bail, ensure};
use base64::Engine;
use clap::Parser;
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use wukong_controller_client::kubevirt::VirtualMachineInstance;
use wukong_e2e::{HostAgent, workspace_root};
use wukong_operator::cli::{Cli, Command as Run};

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
fn readme_block(needle: &str) -> Result<String> {
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
struct Installed {
    /// (namespace, name) → key → the file it holds.
    secrets: BTreeMap<(String, String), BTreeMap<String, PathBuf>>,
    /// Every document applied, in order.
    applied: Vec<Value>,
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
            ["create", "namespace", _] => {}
            ["create", "secret", "generic", name, ..] => {
                let keys = flag("--from-file=")
                    .map(|f| f.split_once('=').map(|(k, p)| (k.to_string(), work.join(p))))
                    .collect::<Option<_>>()
                    .with_context(|| format!("Secret {name}: --from-file without KEY= ({call:?})"))?;
                self.secrets.insert((namespace, name.to_string()), keys);
            }
            ["create", "secret", "tls", name, ..] => {
                let one =
                    |f: &'static str| flag(f).next().map(|p| work.join(p)).context(format!("{f} of Secret {name}"));
                let keys = BTreeMap::from([("tls.crt".into(), one("--cert=")?), ("tls.key".into(), one("--key=")?)]);
                self.secrets.insert((namespace, name.to_string()), keys);
            }
            ["apply", "-f", file] => {
                let path = match *file {
                    "-" => stdin.context("kubectl apply -f - read nothing")?,
                    file => work.join(file),
                };
                let text = std::fs::read_to_string(&path).with_context(|| path.display().to_string())?;
                self.applied.extend(serde_saphyr::from_multiple::<Value>(&text).context(file.to_string())?);
            }
            _ => bail!("the README's install calls kubectl {call:?}, which this test cannot read; teach it"),
        }
        Ok(())
    }

    fn kind(&self, kind: &str) -> impl Iterator<Item = &Value> {
        self.applied.iter().filter(move |d| d["kind"] == kind)
    }
}

/// Runs the README's install block in `work` and reads back what kubectl was asked to do.
fn run_install(work: &Path) -> Result<Installed> {
    let block = readme_block("kubectl apply -f deploy/operator.yaml")?;
    std::os::unix::fs::symlink(workspace_root().join("deploy"), work.join("deploy"))?;
    std::fs::create_dir(work.join("bin"))?;
    std::fs::write(work.join("bin/kubectl"), KUBECTL)?;
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
fn readme_agent_files() -> Result<BTreeMap<String, String>> {
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

#[tokio::test(flavor = "multi_thread")]
async fn the_readmes_install_makes_every_secret_the_deployment_mounts_and_certificates_that_verify() -> Result<()> {
    let work = tempfile::tempdir()?;
    let installed = run_install(work.path())?;
    let deployment = installed.kind("Deployment").next().context("the install applies no Deployment")?;
    let ns = deployment["metadata"]["namespace"].as_str().context("the Deployment's namespace")?.to_string();
    let pod = &deployment["spec"]["template"]["spec"];

    // Every Secret and ConfigMap a volume names is created by the install, or the Pods stay in ContainerCreating.
    let mut volumes = BTreeMap::new();
    for volume in pod["volumes"].as_array().context("the Deployment's volumes")? {
        let name = volume["name"].as_str().context("a volume's name")?;
        let secret = match (&volume["secret"], &volume["configMap"]) {
            (Value::Object(s), _) => s["secretName"].as_str().context("secretName")?,
            (_, Value::Object(c)) => {
                bail!("volume {name} mounts ConfigMap {}, which the install does not create", c["name"])
            }
            _ => bail!("volume {name} is neither a Secret nor a ConfigMap; teach this test its kind"),
        };
        let keys = installed.secrets.get(&(ns.clone(), secret.to_string())).with_context(|| {
            format!(
                "the Deployment mounts Secret {ns}/{secret} (volume {name}), which the README's install never creates"
            )
        })?;
        volumes.insert(name.to_string(), (secret.to_string(), keys.clone()));
    }

    // The Secrets as the kubelet mounts them, under a scratch root, and the container's arguments pointed there.
    let root = tempfile::tempdir()?;
    let container = &pod["containers"][0];
    let mut mounts = Vec::new();
    for mount in container["volumeMounts"].as_array().context("volumeMounts")? {
        let path = mount["mountPath"].as_str().context("mountPath")?;
        let (secret, keys) = &volumes[mount["name"].as_str().context("a mount's name")?];
        let dir = root.path().join(path.trim_start_matches('/'));
        std::fs::create_dir_all(&dir)?;
        for (key, file) in keys {
            std::fs::copy(file, dir.join(key)).with_context(|| format!("Secret {secret} key {key}: {file:?}"))?;
        }
        mounts.push((path.to_string(), secret.clone()));
    }
    let mounted = |arg: &str| -> String {
        let (flag, value) = arg.split_once('=').unwrap_or((arg, ""));
        match mounts.iter().find(|(path, _)| value.starts_with(path.as_str())) {
            Some(_) => format!("{flag}={}{value}", root.path().display()),
            None => arg.to_string(),
        }
    };
    let agent_port = wukong_e2e::ports::free_port()?;
    let args: Vec<String> = std::iter::once("wukong-operator".to_string())
        .chain(container["args"].as_array().context("args")?.iter().map(|a| mounted(a.as_str().unwrap_or_default())))
        .chain([format!("--agent-port={agent_port}")])
        .collect();
    let Run::Run(run) = Cli::try_parse_from(&args).context("the Deployment's args")?.command else {
        bail!("the Deployment does not run the operator: {args:?}")
    };
    let config = run.config("install-test".into());

    // Every file the operator reads is in the Secret mounted there.
    let tls = config.agent.tls.clone().context("the Deployment talks to agents without TLS")?;
    let webhook = config.webhook.clone().context("the Deployment serves no admission guard")?;
    let mut read = vec![tls.ca.clone(), tls.cert.clone(), tls.key.clone()];
    read.extend([webhook.cert_dir.join("tls.crt"), webhook.cert_dir.join("tls.key")]);
    read.extend(webhook.client_auth.iter().map(|a| a.ca.clone()));
    for file in &read {
        let inside = file.strip_prefix(root.path()).unwrap_or(file);
        let secret = mounts.iter().find(|(p, _)| Path::new("/").join(inside).starts_with(p)).map(|(_, s)| s.as_str());
        ensure!(file.exists(), "the operator reads /{} but Secret {secret:?} has no such key", inside.display());
    }

    // A real agent installed as the README says (its files from render-user-data's flags, systemd/agent.toml's
    // allow_clients), dialled at a VMI's pod IP that its certificate does not carry.
    let files = readme_agent_files()?;
    let file = |flag: &str| work.path().join(&files[flag]).to_str().map(str::to_string).context("a UTF-8 path");
    let listen = format!("127.0.0.1:{agent_port}");
    let config_file = workspace_root().join("systemd/agent.toml");
    let flags = [
        "--config".to_string(),
        config_file.to_str().context("a UTF-8 path")?.to_string(),
        "--tls-cert".into(),
        file("--cert")?,
        "--tls-key".into(),
        file("--key")?,
        "--tls-client-ca".into(),
        file("--client-ca")?,
    ];
    let _agent = HostAgent::start(&listen, &flags.iter().map(String::as_str).collect::<Vec<_>>())?;
    let vmi: VirtualMachineInstance = serde_json::from_value(json!({
        "spec": {"networks": [{"name": "default", "pod": {}}]},
        "status": {"interfaces": [{"name": "default", "ipAddress": "127.0.0.1"}]},
    }))?;
    let client = config.agent.connect(&vmi).context("the VMI has an IP")??;
    let info = client.agent_info().await.context("the shipped Deployment's operator calling the README's agent")?;
    assert!(!info.read_only, "the agent must let the operator release disks (its name in allow_clients): {info:?}");

    // The guard: its Service's name, the CA the install put in every caBundle, the Secret the operator serves.
    let guard_secret = mounts
        .iter()
        .find(|(path, _)| webhook.cert_dir.strip_prefix(root.path()).is_ok_and(|d| Path::new("/").join(d) == *path))
        .map(|(_, secret)| secret)
        .context("the webhook's certificate directory is no mounted Secret")?;
    let serving = &installed.secrets[&(ns.clone(), guard_secret.clone())]["tls.crt"];
    let configuration = installed.kind("ValidatingWebhookConfiguration").next().context("no guard applied")?;
    for hook in configuration["webhooks"].as_array().context("webhooks")? {
        let service = &hook["clientConfig"]["service"];
        let name = |field: &str| service[field].as_str().with_context(|| format!("{}'s Service {field}", hook["name"]));
        let host = format!("{}.{}.svc", name("name")?, name("namespace")?);
        ensure!(
            installed.kind("Service").any(|s| s["metadata"]["name"] == service["name"]),
            "webhook {} calls Service {host}, which the install does not create",
            hook["name"]
        );
        let bundle = hook["clientConfig"]["caBundle"].as_str().unwrap_or_default();
        let ca = base64::engine::general_purpose::STANDARD.decode(bundle).context("caBundle is base64")?;
        ensure!(!ca.is_empty(), "webhook {}'s caBundle is empty after the install", hook["name"]);
        let ca_file = work.path().join("applied-ca.crt");
        std::fs::write(&ca_file, ca)?;
        let verify = Command::new("openssl")
            .args(["verify", "-purpose", "sslserver", "-verify_hostname", &host, "-CAfile"])
            .arg(&ca_file)
            .arg(serving)
            .output()?;
        ensure!(
            verify.status.success(),
            "the guard's certificate does not verify for {host} against webhook {}'s caBundle: {}",
            hook["name"],
            String::from_utf8_lossy(&verify.stdout) + String::from_utf8_lossy(&verify.stderr)
        );
    }
    Ok(())
}
