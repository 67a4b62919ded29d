//! wukong-operator in the lab: the shipped CRD and RBAC installed in a [`Cluster`], and operator processes that
//! run as the shipped ServiceAccount (never as admin), for the tests and the scale benchmark.

use crate::cluster::{ADMIN, Cluster, create_all};
use crate::kubevirt_lab::{API_SERVER, CONTROLLER, HANDLER, HotplugMode, KubeVirtLab, resource};
use crate::process::Relaunchable;
use anyhow::{Context, Result, bail};
use kube::api::{Api, DynamicObject, PostParams};
use serde_json::Value;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use wukong_operator::crd::Wukong;

/// The operator's identity: its ServiceAccount, as the API server names it.
pub const OPERATOR: &str = "system:serviceaccount:wukong-system:wukong-operator";

/// deploy/crd.yaml, deploy/operator.yaml and deploy/network-policy.yaml as shipped, the Deployment aside: these
/// tests run the operator's binary on the host (operator_cluster.rs runs the Deployment itself as Pods of its image
/// on the lab's node, from the README's install).
pub async fn install_operator(cluster: &Cluster) -> Result<()> {
    let client = cluster.client(ADMIN).await?;
    // The namespace comes first, as in the README (the chart installs into it; the Secrets are made in it before).
    let namespace = serde_json::json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "wukong-system"}});
    let mut documents = vec![namespace];
    for file in ["deploy/crd.yaml", "deploy/operator.yaml", "deploy/network-policy.yaml"] {
        let text = std::fs::read_to_string(crate::workspace_root().join(file))?;
        documents.extend(serde_saphyr::from_multiple::<Value>(&text).with_context(|| file.to_string())?);
    }
    // Without a node the Deployment is only checked for the identity it runs as.
    for deployment in documents.iter().filter(|d| d["kind"] == "Deployment") {
        let account = &deployment["spec"]["template"]["spec"]["serviceAccountName"];
        if account != "wukong-operator" {
            bail!("the Deployment runs as {account}, not the ServiceAccount deploy/operator.yaml binds");
        }
    }
    for budget in documents.iter().filter(|d| d["kind"] == "PodDisruptionBudget") {
        if budget["spec"]["selector"]["matchLabels"]["app.kubernetes.io/name"] != "wukong-operator" {
            bail!("the PodDisruptionBudget does not select the operator's Pods");
        }
    }
    documents.retain(|d| d["kind"] != "Deployment");
    create_all(&client, documents).await
}

/// scripts/build-image.sh's OCI archive of the operator, in `out` (by default target/wukong-image): its path, as the
/// script prints it. The script caches the archive, so an unchanged build only checks its inputs.
pub fn build_operator_image(out: Option<&std::path::Path>) -> Result<PathBuf> {
    let mut command = Command::new("bash");
    command.arg(crate::workspace_root().join("scripts/build-image.sh")).current_dir(crate::workspace_root());
    if let Some(out) = out {
        command.arg("--out").arg(out);
    }
    let output = command.output().context("running scripts/build-image.sh")?;
    if !output.status.success() {
        bail!("scripts/build-image.sh failed: {}", String::from_utf8_lossy(&output.stderr));
    }
    Ok(String::from_utf8(output.stdout)?.trim().into())
}

/// The admission guard's serving certificate: a throwaway CA, and `tls.crt`/`tls.key` for 127.0.0.1 in a
/// directory laid out as the mounted Secret.
pub struct GuardTls {
    pub ca_pem: String,
    pub dir: tempfile::TempDir,
}

impl GuardTls {
    pub fn new() -> Result<Self> {
        let ca = crate::cluster::Ca::new("wukong guard test CA")?;
        let leaf = ca.leaf("wukong-guard", &["127.0.0.1"], rcgen::ExtendedKeyUsagePurpose::ServerAuth)?;
        let dir = crate::process::lab_tempdir("wukong-guard-tls-")?;
        std::fs::write(dir.path().join("tls.crt"), leaf.cert)?;
        std::fs::write(dir.path().join("tls.key"), leaf.key)?;
        Ok(Self { ca_pem: ca.pem, dir })
    }
}

/// The cluster's ValidatingWebhookConfigurations (the guard's is `wukong-guard`).
pub fn webhook_configurations(client: &kube::Client) -> Api<DynamicObject> {
    let r = resource(
        "ValidatingWebhookConfiguration",
        "admissionregistration.k8s.io",
        "v1",
        "validatingwebhookconfigurations",
    );
    Api::all_with(client.clone(), &r)
}

/// deploy/guard.yaml's documents, as shipped.
pub fn shipped_guard() -> Result<Vec<Value>> {
    let text = std::fs::read_to_string(crate::workspace_root().join("deploy/guard.yaml"))?;
    serde_saphyr::from_multiple::<Value>(&text).context("deploy/guard.yaml")
}

/// deploy/guard.yaml's ValidatingWebhookConfiguration as shipped (rules, selectors, policies), pointed at `url`
/// (the lab has no Service network) with `ca_pem` as its caBundle (`None`: left empty, for an operator that
/// manages it, `--guard-cert-secret`).
pub async fn install_guard(cluster: &Cluster, url: &str, ca_pem: Option<&str>) -> Result<()> {
    install_guard_from(cluster, shipped_guard()?, url, ca_pem).await
}

/// [`install_guard`] from `documents` (the guard's Service and ValidatingWebhookConfiguration, e.g. a rendering of
/// the chart with other values).
pub async fn install_guard_from(
    cluster: &Cluster,
    documents: Vec<Value>,
    url: &str,
    ca_pem: Option<&str>,
) -> Result<()> {
    use base64::Engine;
    let client = cluster.client(ADMIN).await?;
    for mut doc in documents {
        match doc["kind"].as_str().unwrap_or_default() {
            "Service" => {
                if doc["spec"]["ports"][0]["targetPort"] != 8443 {
                    bail!("the guard's Service does not target the webhook port 8443");
                }
            }
            "ValidatingWebhookConfiguration" => {
                let ca = base64::engine::general_purpose::STANDARD.encode(ca_pem.unwrap_or_default());
                for webhook in doc["webhooks"].as_array_mut().context("webhooks")? {
                    webhook["clientConfig"] = serde_json::json!({"url": url, "caBundle": ca});
                }
                // A second guarded operator of one test takes the webhook over.
                let api = webhook_configurations(&client);
                let mut object: DynamicObject = serde_json::from_value(doc)?;
                let name = object.metadata.name.clone().unwrap_or_default();
                match api.get_opt(&name).await? {
                    Some(current) => {
                        object.metadata.resource_version = current.metadata.resource_version;
                        api.replace(&name, &PostParams::default(), &object).await?;
                    }
                    None => drop(api.create(&PostParams::default(), &object).await?),
                }
            }
            other => bail!("the guard's manifest has a {other}, which this lab does not expect"),
        }
    }
    Ok(())
}

/// A QEMU guest, a cluster with the lab's KubeVirt (declarative hot-plug) in `ns` playing that guest's domain, claims
/// of StorageClass `lab-images` provisioned as image files in the returned directory, and the operator's CRD and
/// RBAC installed; no VM yet and no operator running.
pub async fn guest_cluster(ns: &str) -> Result<(crate::Guest, Cluster, KubeVirtLab, tempfile::TempDir)> {
    let guest = crate::Guest::boot().await?;
    let cluster = Cluster::start(&[OPERATOR, API_SERVER, CONTROLLER, HANDLER]).await?;
    let kubevirt = KubeVirtLab::start(&cluster, Some(&guest), ns, HotplugMode::Declarative).await?;
    let images = crate::process::lab_tempdir("wukong-images-")?;
    kubevirt.provision(images.path(), "lab-images").await?;
    install_operator(&cluster).await?;
    Ok((guest, cluster, kubevirt, images))
}

/// An operator that also serves the admission guard (on a free loopback port, with a throwaway certificate),
/// registered with `cluster` by deploy/guard.yaml once it is ready; `extra` flags are added.
pub async fn start_guarded(cluster: &Cluster, identity: &str, agent_port: u16, extra: &[&str]) -> Result<Operator> {
    let port = agent_port.to_string();
    let agent = ["--agent-plaintext", "--agent-port", &port];
    start_guarded_with(cluster, identity, &agent, extra, shipped_guard()?).await
}

/// [`start_guarded`] with `agent` flags saying how it reaches agents (e.g. `--agent-tls-dir DIR`), registered by
/// the guard's `documents` (see [`install_guard_from`]).
pub async fn start_guarded_with(
    cluster: &Cluster,
    identity: &str,
    agent: &[&str],
    extra: &[&str],
    documents: Vec<Value>,
) -> Result<Operator> {
    let tls = GuardTls::new()?;
    let webhook = crate::ports::free_address()?;
    let dir = tls.dir.path().to_str().context("a UTF-8 path")?.to_string();
    let mut args = agent.to_vec();
    args.extend(["--webhook-address", &webhook, "--webhook-cert-dir", &dir]);
    args.extend(extra);
    let mut operator = Operator::start_with(cluster, identity, &args)?;
    operator.wait_ready().await?;
    install_guard_from(cluster, documents, &format!("https://{webhook}/validate"), Some(&tls.ca_pem)).await?;
    operator.guard_tls = Some(tls);
    operator.webhook = Some(webhook);
    Ok(operator)
}

/// What a caller that is not the API server gets from POSTing `review` to a guarded operator's webhook (curl, a
/// local process with no client certificate): the HTTP status and body, or curl's own failure (a refused TLS
/// handshake) as the error.
pub async fn post_review(operator: &Operator, review: &Value) -> Result<(u16, String)> {
    let (Some(webhook), Some(tls)) = (&operator.webhook, &operator.guard_tls) else {
        bail!("the operator serves no guard");
    };
    let ca = tls.dir.path().join("ca.crt");
    std::fs::write(&ca, &tls.ca_pem)?;
    let body = tempfile::NamedTempFile::new()?;
    std::fs::write(body.path(), serde_json::to_vec(review)?)?;
    let output = tokio::process::Command::new("curl")
        .args(["--silent", "--show-error", "--max-time", "60", "--cacert"])
        .arg(&ca)
        .args(["-H", "content-type: application/json", "-w", "\n%{http_code}", "--data-binary"])
        .arg(format!("@{}", body.path().display()))
        .arg(format!("https://{webhook}/validate?timeout=30s"))
        .output()
        .await
        .context("running curl")?;
    if !output.status.success() {
        bail!("curl: {}", String::from_utf8_lossy(&output.stderr).trim());
    }
    let text = String::from_utf8(output.stdout)?;
    let (body, code) = text.rsplit_once('\n').context("curl's status line")?;
    Ok((code.trim().parse()?, body.to_string()))
}

/// One operator process, as its ServiceAccount; killed (SIGKILL, no goodbye) on drop.
pub struct Operator {
    /// Its identity (`--identity`): the holder the leader lease names.
    identity: String,
    /// Its command is kept for [`Self::restart`]: the same identity, HTTP address and webhook flags.
    process: Relaunchable,
    http: std::net::SocketAddr,
    log: PathBuf,
    /// Print the end of the log when dropped (see `Drop`).
    echo_log: bool,
    /// The guard's certificate directory, kept while the operator serves it.
    guard_tls: Option<GuardTls>,
    /// Where it serves the guard.
    webhook: Option<String>,
}

impl Operator {
    /// Starts an operator as `identity`, reaching agents in plaintext on `agent_port` (the lab's agents), logging
    /// to `wukong-operator-IDENTITY-PORT.log` in the lab directory (PORT: its HTTP port, so that operators of one
    /// identity keep their own); its last lines are printed, and the log removed, when it is dropped.
    pub fn start(cluster: &Cluster, identity: &str, agent_port: u16) -> Result<Self> {
        Self::start_with(cluster, identity, &["--agent-plaintext", "--agent-port", &agent_port.to_string()])
    }

    /// Starts an operator as `identity` with `agent` flags saying how it reaches agents.
    pub fn start_with(cluster: &Cluster, identity: &str, agent: &[&str]) -> Result<Self> {
        let http: std::net::SocketAddr = crate::ports::free_address()?.parse()?;
        let log = crate::process::lab_dir()?.join(format!("wukong-operator-{identity}-{}.log", http.port()));
        let mut command = Command::new(crate::operator_binary());
        command
            .env_clear()
            .env("KUBECONFIG", cluster.kubeconfig(OPERATOR)?)
            .env("RUST_LOG", "info,wukong_operator=debug")
            .args(["run", "--identity", identity])
            .args(agent)
            .args(["--http-address", &http.to_string(), "--wait-seconds", "10", "--lease-namespace", "wukong-system"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?);
        let process =
            Relaunchable::spawn(command, "wukong-operator").context("is it built? cargo build -p wukong-operator")?;
        Ok(Self { identity: identity.into(), process, http, log, echo_log: true, guard_tls: None, webhook: None })
    }

    /// Its identity, as the leader lease's holder names it.
    pub fn identity(&self) -> &str {
        &self.identity
    }

    /// Waits until `/readyz` answers 200: its watches are up (as leader or standby), and its guard, if it serves one,
    /// listens.
    async fn wait_ready(&self) -> Result<()> {
        const READY_TIMEOUT: Duration = Duration::from_secs(30);
        let deadline = Instant::now() + READY_TIMEOUT;
        while self.get("/readyz").await?.0 != 200 {
            if Instant::now() > deadline {
                bail!("the operator (pid {}) was not ready within {READY_TIMEOUT:?}", self.pid());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(())
    }

    /// Kills it (SIGKILL: no goodbye, its Lease is not released) and starts it again as it was started: the same
    /// identity and flags, the same HTTP address, and for a guarded operator the same webhook address and
    /// certificate directory, so the registered ValidatingWebhookConfiguration reaches it again. Returns once
    /// `/readyz` answers 200. What a crashed container restarted by the kubelet looks like, the Pod's IP kept. One
    /// that was killed or exited before is started again the same way.
    pub async fn restart(&mut self) -> Result<()> {
        self.process.restart()?;
        self.wait_ready().await
    }

    /// GET on the operator's HTTP port: the status code and the body (HTTP/1.0, so the server closes).
    pub async fn get(&self, path: &str) -> Result<(u16, String)> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut stream = loop {
            match tokio::net::TcpStream::connect(self.http).await {
                Ok(stream) => break stream,
                Err(e) if Instant::now() > deadline => return Err(e).context("the operator's HTTP port"),
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        };
        stream.write_all(format!("GET {path} HTTP/1.0\r\n\r\n").as_bytes()).await?;
        let mut response = String::new();
        stream.read_to_string(&mut response).await?;
        let code = response.split_whitespace().nth(1).and_then(|c| c.parse().ok()).context("an HTTP status")?;
        let body = response.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
        Ok((code, body))
    }

    /// Leaves its log alone when dropped: for programs (the demo, the benchmarks), whose output is not captured the
    /// way a test's is.
    pub fn quiet(mut self) -> Self {
        self.echo_log = false;
        self
    }

    /// The pid of the process now running (a restart changes it).
    pub fn pid(&self) -> u32 {
        self.process.id()
    }

    /// Where it serves the admission guard, when it does.
    pub fn webhook_address(&self) -> Option<&str> {
        self.webhook.as_deref()
    }

    /// Its exit status, once it has exited.
    pub fn exited(&mut self) -> Result<Option<std::process::ExitStatus>> {
        self.process.try_wait()
    }

    /// Stops it as Kubernetes does (SIGTERM) and waits at most `within` for it to exit; its exit status.
    pub async fn terminate(&mut self, within: Duration) -> Result<std::process::ExitStatus> {
        self.send_sigterm()?;
        self.wait_exit(within).await
    }

    /// Sends SIGTERM (what the kubelet does to a Pod's container) and returns at once.
    pub fn send_sigterm(&self) -> Result<()> {
        let status = Command::new("kill").args(["-TERM", &self.pid().to_string()]).status()?;
        anyhow::ensure!(status.success(), "kill -TERM {} failed", self.pid());
        Ok(())
    }

    /// Waits until the process exited, at most `within`.
    pub async fn wait_exit(&mut self, within: Duration) -> Result<std::process::ExitStatus> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.process.try_wait()? {
                return Ok(status);
            }
            if Instant::now() > deadline {
                bail!("the operator did not exit within {within:?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Its log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Kills it with SIGKILL: no goodbye, the Lease is not released.
    pub fn kill(&mut self) {
        self.process.kill();
    }
}

impl Drop for Operator {
    /// Kills it and prints the end of its log: the test harness shows a test's output only when it fails, which is
    /// when the operator's side of the story is wanted (CI keeps nothing else).
    fn drop(&mut self) {
        self.kill();
        if self.echo_log {
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            let lines: Vec<&str> = log.lines().collect();
            println!("--- the last lines of {} ---", self.log.display());
            println!("{}", lines[lines.len().saturating_sub(40)..].join("\n"));
        }
        let _ = std::fs::remove_file(&self.log);
    }
}

/// A quantile of a Prometheus histogram, as the upper bound of the bucket it falls in.
pub fn quantile(metrics: &str, name: &str, q: f64) -> Option<f64> {
    let buckets: Vec<(f64, f64)> = metrics
        .lines()
        .filter_map(|l| l.strip_prefix(&format!("{name}_bucket{{le=\"")))
        .filter_map(|rest| {
            let (le, count) = rest.split_once("\"} ")?;
            Some((le.parse().unwrap_or(f64::INFINITY), count.parse().ok()?))
        })
        .collect();
    let total = buckets.last()?.1;
    buckets.iter().find(|(_, count)| *count >= q * total).map(|(le, _)| *le)
}

/// A counter or gauge of the Prometheus text.
pub fn metric(metrics: &str, name: &str) -> f64 {
    metrics.lines().find_map(|l| l.strip_prefix(&format!("{name} "))).and_then(|v| v.parse().ok()).unwrap_or(0.0)
}

/// The API server's answer to a JSON patch of `name`: `Ok` when stored, else its status code and message.
pub async fn json_patch(
    api: &Api<DynamicObject>,
    name: &str,
    patch: Value,
    dry_run: bool,
) -> Result<Result<(), (u16, String)>> {
    let params = kube::api::PatchParams { dry_run, ..Default::default() };
    let patch: json_patch::Patch = serde_json::from_value(patch)?;
    match api.patch(name, &params, &kube::api::Patch::<()>::Json(patch)).await {
        Ok(_) => Ok(Ok(())),
        Err(kube::Error::Api(s)) => Ok(Err((s.code, s.message))),
        Err(e) => Err(e.into()),
    }
}

/// Merges labels and annotations into an object's metadata (`null` removes one).
pub async fn label(api: &Api<DynamicObject>, name: &str, labels: Value, annotations: Value) -> Result<()> {
    let body = serde_json::json!({"metadata": {"labels": labels, "annotations": annotations}});
    api.patch(name, &kube::api::PatchParams::default(), &kube::api::Patch::Merge(&body)).await?;
    Ok(())
}

/// Reviews the guard answered so far (from its metrics).
pub async fn reviews(operator: &Operator) -> Result<u64> {
    let (_, metrics) = operator.get("/metrics").await?;
    Ok(metrics
        .lines()
        .filter(|l| l.starts_with("wukong_operator_admission_reviews_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum())
}

/// The `events.k8s.io/v1` Events of a namespace.
pub async fn events(client: &kube::Client, ns: &str) -> Result<Vec<DynamicObject>> {
    let r = resource("Event", "events.k8s.io", "v1", "events");
    Ok(Api::<DynamicObject>::namespaced_with(client.clone(), ns, &r).list(&Default::default()).await?.items)
}

/// Waits until the guard's leader gave disk `serial` back to the guest and published its `ReleaseCancelled` Event
/// in namespace `ns` (the Event follows the CancelDetach).
pub async fn given_back(guest: &crate::Guest, admin: &kube::Client, ns: &str, serial: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(40);
    loop {
        let state = guest.agent().get_disk(serial, false).await.map(|d| d.state()).ok();
        let present = state == Some(wukong_proto::v1::DiskState::Present);
        let event = events(admin, ns).await?.iter().any(|e| e.data["reason"] == "ReleaseCancelled");
        if present && event {
            return Ok(());
        }
        anyhow::ensure!(Instant::now() < deadline, "never given back: disk {state:?}, ReleaseCancelled Event {event}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Creates Wukong `name` with `spec` in `api`'s namespace, as a user does.
pub async fn create_wukong(api: &Api<Wukong>, name: &str, spec: Value) -> Result<()> {
    let wukong: Wukong = serde_json::from_value(serde_json::json!({
        "apiVersion": "vm.novasphere.dev/v1alpha1", "kind": "Wukong", "metadata": {"name": name}, "spec": spec,
    }))?;
    api.create(&PostParams::default(), &wukong).await?;
    Ok(())
}

/// Replaces the disks of Wukong `name`, as `kubectl patch --type merge` does.
pub async fn set_disks(api: &Api<Wukong>, name: &str, disks: Value) -> Result<()> {
    let patch = serde_json::json!({"spec": {"disks": disks}});
    api.patch(name, &kube::api::PatchParams::default(), &kube::api::Patch::Merge(&patch)).await?;
    Ok(())
}

/// Disk `disk` in the status of `w`.
pub fn volume<'a>(w: &'a Wukong, disk: &str) -> Option<&'a wukong_operator::crd::VolumeStatus> {
    w.status.as_ref()?.volumes.iter().find(|v| v.name == disk)
}

/// Waits until Wukong `name` satisfies `done`, polling; the last object seen is in the error.
pub async fn wait_for_wukong(
    api: &Api<Wukong>,
    name: &str,
    seconds: u64,
    done: impl Fn(&Wukong) -> bool,
) -> Result<Wukong> {
    let deadline = Instant::now() + Duration::from_secs(seconds);
    loop {
        let object = api.get_opt(name).await?;
        if let Some(object) = &object
            && done(object)
        {
            return Ok(object.clone());
        }
        if Instant::now() > deadline {
            bail!("Wukong {name} did not get there within {seconds}s; last seen: {:#?}", object.map(|o| o.status));
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}
