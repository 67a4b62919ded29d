//! The README's operator install, read without a cluster ([`wukong_e2e::readme_install`]: its commands in a scratch
//! directory, `wukongctl pki init` making the agents' and the operator's certificates, kubectl and helm recorded
//! rather than sent; `tests/tests/install_journey.rs` runs the same blocks for real on the lab's node). Then what
//! the shipped manifests need of that install is checked with real parts: every Secret the Deployment mounts
//! exists with every file the operator reads from it; the Deployment's arguments, parsed by the operator's own
//! command line, make it accept a real agent installed with the README's agent certificate (dialled at the VMI's
//! pod IP, which that certificate cannot carry), and the agent accept it; the guard's serving certificate is the
//! operator's own, for the name the API server calls it by, written into a writable emptyDir and with no
//! `caBundle` rendered for a server-side apply to take back (with a certificate of the user's: it verifies
//! against the applied `caBundle`).

use anyhow::{Context, Result, bail, ensure};
use base64::Engine;
use clap::Parser;
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use wukong_controller_client::kubevirt::VirtualMachineInstance;
use wukong_e2e::readme_install::{readme_agent_files, run_install};
use wukong_e2e::{HostAgent, workspace_root};
use wukong_operator::cli::{Cli, Command as Run};

#[tokio::test(flavor = "multi_thread")]
async fn the_readmes_install_makes_every_secret_the_deployment_mounts_and_certificates_that_verify() -> Result<()> {
    let work = tempfile::tempdir()?;
    let installed = run_install(work.path())?;
    let deployment = installed.kind("Deployment").next().context("the install applies no Deployment")?;
    let ns = deployment["metadata"]["namespace"].as_str().context("the Deployment's namespace")?.to_string();
    let pod = &deployment["spec"]["template"]["spec"];

    // Every Secret and ConfigMap a volume names is created by the install, or the Pods stay in ContainerCreating.
    // An emptyDir is the Pod's own (the operator writes its guard certificates there): no keys.
    let mut volumes = BTreeMap::new();
    for volume in pod["volumes"].as_array().context("the Deployment's volumes")? {
        let name = volume["name"].as_str().context("a volume's name")?;
        let secret = match (&volume["secret"], &volume["configMap"], &volume["emptyDir"]) {
            (Value::Object(s), _, _) => s["secretName"].as_str().context("secretName")?,
            (_, Value::Object(c), _) => {
                bail!("volume {name} mounts ConfigMap {}, which the install does not create", c["name"])
            }
            (_, _, Value::Object(_)) => {
                volumes.insert(name.to_string(), (format!("emptyDir {name}"), BTreeMap::new()));
                continue;
            }
            _ => bail!("volume {name} is neither a Secret, a ConfigMap nor an emptyDir; teach this test its kind"),
        };
        let keys = installed.secrets.get(&(ns.clone(), secret.to_string())).map(|s| &s.files).with_context(|| {
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
    // The agents' port as shipped is the agent's own default; the lab's agent listens on a free one instead.
    let agent_port = wukong_e2e::ports::free_port()?;
    let shipped = container["args"].as_array().context("args")?.iter().map(|a| a.as_str().unwrap_or_default());
    let port = format!("--agent-port={}", wukong_proto::DEFAULT_PORT);
    ensure!(shipped.clone().any(|a| a == port), "the Deployment does not dial the agents' default port ({port})");
    let args: Vec<String> = std::iter::once("wukong-operator".to_string())
        .chain(shipped.filter(|a| !a.starts_with("--agent-port=")).map(mounted))
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
    // With its own guard certificates the operator writes them itself, into a writable emptyDir.
    let cert_dir = webhook.cert_dir.strip_prefix(root.path()).map(|d| Path::new("/").join(d))?;
    let cert_mount = mounts.iter().find(|(path, _)| *path == cert_dir.to_string_lossy());
    let cert_volume = cert_mount.map(|(_, volume)| volume.as_str()).unwrap_or_default();
    let cert_writable =
        container["volumeMounts"].as_array().into_iter().flatten().any(|m| {
            m["mountPath"].as_str() == Some(&cert_dir.to_string_lossy()) && m["readOnly"] != Value::Bool(true)
        });
    match &webhook.managed {
        Some(_) => ensure!(
            cert_volume.starts_with("emptyDir ") && cert_writable,
            "the operator writes its guard certificates into {}, which is not a writable emptyDir ({cert_volume:?})",
            cert_dir.display()
        ),
        None => read.extend([webhook.cert_dir.join("tls.crt"), webhook.cert_dir.join("tls.key")]),
    }
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
    // `wukongctl pki init` made both sides: the CA the agents trust for clients is the one the operator's Secret
    // verifies agents with.
    ensure!(
        std::fs::read(file("--client-ca")?)? == std::fs::read(&tls.ca)?,
        "the agents' client CA is not the CA in the operator's Secret"
    );
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
    // The route is the VMI's IP: the Kubernetes client (for KubeVirt's vsock subresource) is never used.
    let unused = kube::Client::try_from(kube::Config::new("http://127.0.0.1:1".parse()?))?;
    let client = config.agent.connect(&unused, None, &vmi).context("the VMI's route")?;
    let info = client.agent_info().await.context("the shipped Deployment's operator calling the README's agent")?;
    assert!(!info.read_only, "the agent must let the operator release disks (its name in allow_clients): {info:?}");

    // The guard: its Service's name, and either the operator's own certificates (their configuration and names
    // are what the install applies, no caBundle rendered for a server-side apply to take back) or the CA the
    // install put in every caBundle and the Secret the operator serves.
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
        if let Some(managed) = &webhook.managed {
            ensure!(configuration["metadata"]["name"] == managed.webhook_configuration.as_str());
            ensure!(managed.names.contains(&host), "the operator's certificate is not for {host}: {:?}", managed.names);
            ensure!(hook["clientConfig"].get("caBundle").is_none(), "{}: a caBundle field is rendered", hook["name"]);
            continue;
        }
        let serving = &installed.secrets[&(ns.clone(), cert_volume.to_string())].files["tls.crt"];
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
