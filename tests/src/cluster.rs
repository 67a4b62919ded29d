//! A genuine Kubernetes API server for the lab: etcd and kube-apiserver (built from Debian's packages by
//! `scripts/lib/install-kube.sh`) on loopback, with a throwaway CA, RBAC, static-token identities (an admin in
//! `system:masters` and least-privileged users with no rights until a test binds them), the front-proxy flags an
//! aggregated API needs, and an audit log that records every write with its body. Everything stops on drop.
//!
//! A fault test can kill either process (SIGKILL) and start it again as it was: [`Cluster::restart_etcd`],
//! [`Cluster::restart_apiserver`].

use crate::ports::free_port;
use crate::process::Relaunchable;
use anyhow::{Context, Result, bail};
use rcgen::{BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use tokio_rustls::rustls;

/// How long etcd and the API server may take to become ready (about 5 s idle, 10 s under a build).
const READY_TIMEOUT: Duration = Duration::from_secs(90);
/// The admin identity (group `system:masters`).
pub const ADMIN: &str = "lab-admin";
/// Common name of the front-proxy client certificate (the API server's identity towards aggregated servers).
pub const FRONT_PROXY_CLIENT: &str = "front-proxy-client";

/// Common name of the API server's client certificate towards admission webhooks.
pub const WEBHOOK_CLIENT: &str = "wukong-lab-apiserver-webhook-client";

/// Where the API server and etcd binaries are: `$WUKONG_KUBE_DIR/bin`, else `target/wukong-kube/bin`.
pub fn kube_bin_dir() -> PathBuf {
    std::env::var_os("WUKONG_KUBE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| crate::target_dir().join("wukong-kube"))
        .join("bin")
}

/// A throwaway certificate authority.
pub struct Ca {
    pub pem: String,
    issuer: Issuer<'static, KeyPair>,
}

/// A certificate and its key, in PEM.
pub struct Leaf {
    pub cert: String,
    pub key: String,
}

impl Leaf {
    /// The certificate (chain) and key, for rustls.
    pub fn der(
        &self,
    ) -> Result<(Vec<rustls::pki_types::CertificateDer<'static>>, rustls::pki_types::PrivateKeyDer<'static>)> {
        use tokio_rustls::rustls::pki_types::pem::PemObject;
        let certs =
            rustls::pki_types::CertificateDer::pem_slice_iter(self.cert.as_bytes()).collect::<Result<Vec<_>, _>>()?;
        Ok((certs, rustls::pki_types::PrivateKeyDer::from_pem_slice(self.key.as_bytes())?))
    }

    /// A TLS acceptor serving this certificate (a lab server's).
    pub fn tls_acceptor(&self) -> Result<tokio_rustls::TlsAcceptor> {
        let (certs, key) = self.der()?;
        let config =
            rustls::ServerConfig::builder_with_provider(std::sync::Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()?
                .with_no_client_auth()
                .with_single_cert(certs, key)?;
        Ok(tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config)))
    }
}

impl Ca {
    pub fn new(name: &str) -> Result<Self> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        let pem = params.self_signed(&key)?.pem();
        Ok(Self { pem, issuer: Issuer::new(params, key) })
    }

    /// A certificate for `names` (DNS names or IP addresses) with the given usage.
    pub fn leaf(&self, common_name: &str, names: &[&str], usage: ExtendedKeyUsagePurpose) -> Result<Leaf> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())?;
        params.distinguished_name.push(DnType::CommonName, common_name);
        params.extended_key_usages = vec![usage];
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(Leaf { cert: cert.pem(), key: key.serialize_pem() })
    }
}

/// One recorded API request (an audit event at `RequestResponse` level for writes).
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AuditEvent {
    pub verb: String,
    #[serde(rename = "requestURI")]
    pub request_uri: String,
    #[serde(default)]
    pub user: AuditUser,
    #[serde(default)]
    pub object_ref: Option<AuditObjectRef>,
    #[serde(default)]
    pub response_status: Option<serde_json::Value>,
    #[serde(default)]
    pub request_object: Option<serde_json::Value>,
    pub stage: String,
}

#[derive(Debug, Clone, Default, serde::Deserialize)]
pub struct AuditUser {
    #[serde(default)]
    pub username: String,
}

#[derive(Debug, Clone, Default, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AuditObjectRef {
    #[serde(default)]
    pub resource: String,
    #[serde(default)]
    pub subresource: Option<String>,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub api_group: Option<String>,
}

impl AuditEvent {
    /// A write that reached the server and was decided (create, update, patch, delete).
    pub fn is_write(&self) -> bool {
        self.stage == "ResponseComplete" && matches!(self.verb.as_str(), "create" | "update" | "patch" | "delete")
    }

    /// The HTTP status code the server answered.
    pub fn code(&self) -> u16 {
        self.response_status.as_ref().and_then(|s| s["code"].as_u64()).unwrap_or(0) as u16
    }
}

/// What the API server of a cluster with a node needs beyond the loopback-only default (see `crate::node`).
pub(crate) struct NodeApi<'a> {
    /// The address it binds and advertises (an extra /32 on `lo`): Pods reach it there through the `kubernetes`
    /// Service, and the kubelet registers with it.
    pub address: std::net::Ipv4Addr,
    /// The control plane's and the node's identities, with their groups (`system:nodes` for the kubelet).
    pub identities: &'a [(&'a str, &'a str)],
}

/// The `kubernetes` Service's ClusterIP: the first address of `--service-cluster-ip-range`.
pub const KUBERNETES_SERVICE_IP: &str = "10.0.0.1";

/// A running etcd + kube-apiserver pair on loopback. Stopped (and its files removed) when dropped.
///
/// Its restarts take `&mut self`: injecting faults is one task's job (a soak's fault loop owns the `Cluster`), while
/// the workload runs on `kube::Client`s, which hold the server's address and credentials of their own and need no
/// access to the `Cluster` (see [`Self::client`]). A `Mutex` around each process would only let two tasks restart
/// the same process at once, which no test means to do.
pub struct Cluster {
    etcd: Relaunchable,
    apiserver: Relaunchable,
    dir: tempfile::TempDir,
    pub url: String,
    pub port: u16,
    etcd_ports: [u16; 2],
    tokens: BTreeMap<String, String>,
    /// Started for a node, whose kube-controller-manager runs its controllers (see `crate::node`).
    node: bool,
    pub started_in: Duration,
}

impl Cluster {
    /// Starts etcd and the API server with an admin and the given least-privileged users (no rights until bound).
    pub async fn start(users: &[&str]) -> Result<Self> {
        Self::start_with(users, None).await
    }

    /// Starts it for a node when `node` is given: bound to the node's address, with a serving certificate Pods
    /// accept, the `kubernetes` Service's endpoints kept, ServiceAccount tokens mounted into Pods, and the Node
    /// authorizer for the kubelet.
    pub(crate) async fn start_with(users: &[&str], node: Option<NodeApi<'_>>) -> Result<Self> {
        let started = Instant::now();
        let bin = kube_bin_dir();
        for tool in ["etcd", "kube-apiserver"] {
            if !bin.join(tool).is_file() {
                bail!(
                    "{} is missing; run scripts/lib/install-kube.sh (scripts/test.sh does)",
                    bin.join(tool).display()
                );
            }
        }
        let dir = crate::process::lab_tempdir("wukong-cluster-")?;
        let path = |f: &str| dir.path().join(f);
        let write = |f: &str, text: &str| std::fs::write(path(f), text).with_context(|| format!("writing {f}"));

        let ca = Ca::new("wukong lab cluster CA")?;
        write("ca.crt", &ca.pem)?;
        let address = node.as_ref().map_or("127.0.0.1".to_string(), |n| n.address.to_string());
        let mut names = vec!["127.0.0.1", "localhost"];
        if node.is_some() {
            // Pods dial the `kubernetes` Service (KUBERNETES_SERVICE_HOST is its ClusterIP), the kubelet the address.
            names.extend([address.as_str(), KUBERNETES_SERVICE_IP, "kubernetes.default.svc"]);
        }
        let serving = ca.leaf("kube-apiserver", &names, ExtendedKeyUsagePurpose::ServerAuth)?;
        write("apiserver.crt", &serving.cert)?;
        write("apiserver.key", &serving.key)?;
        let front_proxy = Ca::new("wukong lab front-proxy CA")?;
        write("front-proxy-ca.crt", &front_proxy.pem)?;
        let proxy_client = front_proxy.leaf(FRONT_PROXY_CLIENT, &[], ExtendedKeyUsagePurpose::ClientAuth)?;
        write("front-proxy-client.crt", &proxy_client.cert)?;
        write("front-proxy-client.key", &proxy_client.key)?;
        // The API server's client certificate towards admission webhooks (its AdmissionConfiguration), from a CA of
        // its own: a webhook that requires it knows a review came from the API server.
        let webhook_client_ca = Ca::new("wukong lab webhook-client CA")?;
        write("webhook-client-ca.crt", &webhook_client_ca.pem)?;
        let webhook_client = webhook_client_ca.leaf(WEBHOOK_CLIENT, &[], ExtendedKeyUsagePurpose::ClientAuth)?;
        write("webhook-client.crt", &webhook_client.cert)?;
        write("webhook-client.key", &webhook_client.key)?;
        // The user is named '*': it serves every webhook (the lab's listen on ports chosen later). A cluster names
        // it after the webhook's Service, wukong-guard.wukong-system.svc (deploy/guard.yaml).
        write(
            "webhook-clients.kubeconfig",
            &format!(
                "apiVersion: v1\nkind: Config\nusers:\n- name: '*'\n  user:\n    client-certificate: {}\n    \
                 client-key: {}\n",
                path("webhook-client.crt").display(),
                path("webhook-client.key").display()
            ),
        )?;
        write(
            "admission.yaml",
            &format!(
                "apiVersion: apiserver.config.k8s.io/v1\nkind: AdmissionConfiguration\nplugins:\n\
                 - name: ValidatingAdmissionWebhook\n  configuration:\n    apiVersion: apiserver.config.k8s.io/v1\n    \
                 kind: WebhookAdmissionConfiguration\n    kubeConfigFile: {}\n",
                path("webhook-clients.kubeconfig").display()
            ),
        )?;
        let service_accounts = KeyPair::generate()?;
        write("sa.key", &service_accounts.serialize_pem())?;
        write("sa.pub", &service_accounts.public_key_pem())?;

        let mut tokens = BTreeMap::new();
        let mut token_file = String::new();
        let identities = node.as_ref().map_or(&[][..], |n| n.identities);
        let everyone = std::iter::once((ADMIN, "system:masters"))
            .chain(users.iter().map(|user| (*user, "wukong:lab")))
            .chain(identities.iter().copied());
        for (n, (user, groups)) in everyone.enumerate() {
            let token = format!("{}{n:04}", random_hex());
            token_file.push_str(&format!("{token},{user},uid-{n},\"{groups}\"\n"));
            tokens.insert(user.to_string(), token);
        }
        write("tokens.csv", &token_file)?;
        // Writes and subresource calls with their bodies, the rest as metadata: tests prove from the server's side
        // what did (and did not) reach it.
        write(
            "audit-policy.yaml",
            "apiVersion: audit.k8s.io/v1\nkind: Policy\nomitStages: [RequestReceived]\nrules:\n\
             - level: RequestResponse\n  verbs: [create, update, patch, delete]\n- level: Metadata\n",
        )?;

        let etcd_ports = [free_port()?, free_port()?];
        let etcd_url = format!("http://127.0.0.1:{}", etcd_ports[0]);
        let peer_url = format!("http://127.0.0.1:{}", etcd_ports[1]);
        let mut etcd = Command::new(bin.join("etcd"));
        etcd.arg("--data-dir")
            .arg(path("etcd"))
            .args(["--listen-client-urls", &etcd_url, "--advertise-client-urls", &etcd_url])
            .args(["--listen-peer-urls", &peer_url, "--initial-advertise-peer-urls", &peer_url])
            .args(["--initial-cluster", &format!("default={peer_url}"), "--log-level", "warn"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(path("etcd.log"))?);
        let etcd = Relaunchable::spawn(etcd, "etcd")?;

        let port = free_port()?;
        let p = |f: &str| path(f).display().to_string();
        let mut apiserver = Command::new(bin.join("kube-apiserver"));
        match node {
            // Without a node nothing routes to Services and no Pod runs: no endpoints, no token mounts.
            None => apiserver
                .args(["--authorization-mode=RBAC", "--endpoint-reconciler-type=none"])
                .arg("--disable-admission-plugins=ServiceAccount"),
            // The kubelet reports only an InternalIP: the node's name does not resolve.
            Some(_) => apiserver
                .args(["--authorization-mode=Node,RBAC", "--enable-admission-plugins=NodeRestriction"])
                .arg("--kubelet-preferred-address-types=InternalIP"),
        };
        apiserver
            .args(["--etcd-servers", &etcd_url])
            .arg(format!("--bind-address={address}"))
            .arg(format!("--advertise-address={address}"))
            .arg(format!("--secure-port={port}"))
            .arg(format!("--tls-cert-file={}", p("apiserver.crt")))
            .arg(format!("--tls-private-key-file={}", p("apiserver.key")))
            .arg(format!("--client-ca-file={}", p("ca.crt")))
            .arg(format!("--token-auth-file={}", p("tokens.csv")))
            .arg("--service-cluster-ip-range=10.0.0.0/24")
            .arg(format!("--service-account-key-file={}", p("sa.pub")))
            .arg(format!("--service-account-signing-key-file={}", p("sa.key")))
            .arg("--service-account-issuer=https://kubernetes.default.svc")
            .arg(format!("--requestheader-client-ca-file={}", p("front-proxy-ca.crt")))
            .arg(format!("--requestheader-allowed-names={FRONT_PROXY_CLIENT}"))
            .args(["--requestheader-username-headers=X-Remote-User", "--requestheader-group-headers=X-Remote-Group"])
            .arg("--requestheader-extra-headers-prefix=X-Remote-Extra-")
            .arg(format!("--proxy-client-cert-file={}", p("front-proxy-client.crt")))
            .arg(format!("--proxy-client-key-file={}", p("front-proxy-client.key")))
            .arg(format!("--admission-control-config-file={}", p("admission.yaml")))
            .arg(format!("--audit-policy-file={}", p("audit-policy.yaml")))
            .arg(format!("--audit-log-path={}", p("audit.log")))
            .arg("--audit-log-mode=blocking")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(path("apiserver.log"))?);
        // A failure here drops etcd, which kills it.
        let apiserver = Relaunchable::spawn(apiserver, "kube-apiserver")?;

        // From here on a failure drops the cluster, which stops both processes.
        let mut cluster = Self {
            etcd,
            apiserver,
            url: format!("https://{address}:{port}"),
            port,
            etcd_ports,
            tokens,
            node: node.is_some(),
            dir,
            started_in: Duration::ZERO,
        };
        cluster.wait_ready().await?;
        cluster.started_in = started.elapsed();
        tracing::info!(secs = cluster.started_in.as_secs_f64(), url = %cluster.url, "cluster ready");
        Ok(cluster)
    }

    /// Kills etcd (SIGKILL) and starts it again with the same data directory, ports and flags (it recovers from its
    /// write-ahead log); returns once the API server serves reads from it again, with how long that took from the
    /// kill. The API server stays up meanwhile, answering what needs etcd with errors, as it does in a cluster.
    pub async fn restart_etcd(&mut self) -> Result<Duration> {
        self.restart(|cluster| &mut cluster.etcd).await
    }

    /// Kills kube-apiserver (SIGKILL) and starts it again with the same flags, port, certificates and tokens, so
    /// clients made before work again; returns once it is ready, with how long that took from the kill.
    pub async fn restart_apiserver(&mut self) -> Result<Duration> {
        self.restart(|cluster| &mut cluster.apiserver).await
    }

    async fn restart(&mut self, process: fn(&mut Self) -> &mut Relaunchable) -> Result<Duration> {
        let killed = Instant::now();
        process(self).restart()?;
        self.wait_ready().await?;
        let down = killed.elapsed();
        tracing::info!(secs = down.as_secs_f64(), url = %self.url, "cluster ready again after a restart");
        Ok(down)
    }

    /// Waits until /readyz says ok (its `etcd` check included) and a list of namespaces is answered: a list without
    /// a resourceVersion is read from etcd (a quorum read), never from the API server's cache.
    async fn wait_ready(&mut self) -> Result<()> {
        let client = self.client(ADMIN).await?;
        let namespaces: kube::Api<k8s_openapi::api::core::v1::Namespace> = kube::Api::all(client.clone());
        let started = Instant::now();
        loop {
            if let Some(status) = self.apiserver.try_wait()? {
                bail!("kube-apiserver exited ({status}): {}", self.log("apiserver.log"));
            }
            if let Some(status) = self.etcd.try_wait()? {
                bail!("etcd exited ({status}): {}", self.log("etcd.log"));
            }
            let request = http::Request::get("/readyz").body(Vec::new())?;
            if client.request_text(request).await.is_ok_and(|body| body.trim() == "ok")
                && namespaces.list(&kube::api::ListParams::default().limit(1)).await.is_ok()
            {
                return Ok(());
            }
            if started.elapsed() > READY_TIMEOUT {
                bail!("kube-apiserver not ready within {READY_TIMEOUT:?}: {}", self.log("apiserver.log"));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Whether kube-controller-manager runs for this cluster (it does with a node: its garbage collector and its
    /// pvc-protection and pv-protection controllers, but not its PV binder), so the lab must not play those.
    pub fn runs_controller_manager(&self) -> bool {
        self.node
    }

    /// The last lines of one of the cluster's logs, for error messages.
    pub fn log(&self, file: &str) -> String {
        let text = std::fs::read_to_string(self.dir.path().join(file)).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    /// A kubeconfig for `user` (written once; for wukongctl and `KUBECONFIG`).
    pub fn kubeconfig(&self, user: &str) -> Result<PathBuf> {
        let token = self.tokens.get(user).with_context(|| format!("the lab cluster has no user {user}"))?;
        // ':' separates paths in KUBECONFIG, and ServiceAccount user names are full of them.
        let path = self.dir.path().join(format!("kubeconfig-{}", user.replace(':', "_")));
        if !path.exists() {
            std::fs::write(
                &path,
                format!(
                    "apiVersion: v1\nkind: Config\nclusters:\n- name: lab\n  cluster:\n    server: {}\n    \
                     certificate-authority: {}\nusers:\n- name: {user}\n  user:\n    token: {token}\ncontexts:\n\
                     - name: lab\n  context:\n    cluster: lab\n    user: {user}\ncurrent-context: lab\n",
                    self.url,
                    self.dir.path().join("ca.crt").display()
                ),
            )?;
        }
        Ok(path)
    }

    /// A file of the cluster's: `ca.crt` (the API server's CA), `sa.key` (the ServiceAccount signing key), logs.
    pub fn file(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// The CA file of the API server's client certificate towards webhooks (for `--webhook-client-ca`).
    pub fn webhook_client_ca(&self) -> PathBuf {
        self.dir.path().join("webhook-client-ca.crt")
    }

    /// A client acting as `user`.
    pub async fn client(&self, user: &str) -> Result<kube::Client> {
        let kubeconfig = kube::config::Kubeconfig::read_from(self.kubeconfig(user)?)?;
        let config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default()).await?;
        Ok(kube::Client::try_from(config)?)
    }

    /// Every audit event so far (complete requests only), across the log's rotations: kube-apiserver renames
    /// `audit.log` to `audit-TIMESTAMP.log` at 100 MiB (when `--audit-log-maxsize` is unset) and keeps every
    /// backup (`--audit-log-maxbackup` 0); by name the backups sort oldest first and before `audit.log`.
    pub fn audit(&self) -> Result<Vec<AuditEvent>> {
        read_audit_logs(self.dir.path())
    }

    /// The API server's process: a test stops it (SIGSTOP) to play an API server that no longer answers. A restart
    /// changes it.
    pub fn apiserver_pid(&self) -> u32 {
        self.apiserver.id()
    }

    /// The processes and ports this cluster holds, to check that dropping it leaves nothing behind.
    pub fn footprint(&self) -> (Vec<u32>, Vec<u16>) {
        let pids = vec![self.etcd.id(), self.apiserver.id()];
        (pids, vec![self.port, self.etcd_ports[0], self.etcd_ports[1]])
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // The API server first, so it does not log etcd's absence.
        self.apiserver.kill();
        self.etcd.kill();
    }
}

/// Creates `document` (of any kind the server serves), or merges it into the object when it exists, as
/// `kubectl apply` does; returns the object as stored. Not server-side apply: on 1.20 that refuses Service and
/// container ports without `protocol` (part of their list key), which manifests leave to the defaults.
pub async fn apply(client: &kube::Client, document: &serde_json::Value) -> Result<kube::api::DynamicObject> {
    use kube::api::{Api, GroupVersionKind, Patch, PatchParams, PostParams};
    use kube::discovery::{Scope, pinned_kind};
    let (api_version, kind) = (document["apiVersion"].as_str().unwrap_or_default(), document["kind"].as_str());
    let kind = kind.with_context(|| format!("a document without a kind: {document}"))?;
    // policy/v1 is newer than the lab's server (1.20): the same object in policy/v1beta1 proves its shape.
    let mut document = document.clone();
    let api_version = match (kind, api_version) {
        ("PodDisruptionBudget", "policy/v1") => "policy/v1beta1",
        _ => api_version,
    };
    document["apiVersion"] = api_version.into();
    let document = &document;
    let (group, version) = api_version.split_once('/').unwrap_or(("", api_version));
    let (resource, capabilities) = pinned_kind(client, &GroupVersionKind::gvk(group, version, kind))
        .await
        .with_context(|| format!("the API server does not serve {kind} in {api_version}"))?;
    let name = document["metadata"]["name"].as_str().with_context(|| format!("a {kind} without a name"))?;
    let api = match capabilities.scope {
        Scope::Namespaced => {
            let namespace = document["metadata"]["namespace"].as_str().unwrap_or("default");
            Api::namespaced_with(client.clone(), namespace, &resource)
        }
        Scope::Cluster => Api::all_with(client.clone(), &resource),
    };
    match api.create(&PostParams::default(), &serde_json::from_value(document.clone())?).await {
        Err(kube::Error::Api(status)) if status.code == 409 => {
            api.patch(name, &PatchParams::default(), &Patch::Merge(document)).await
        }
        created => created,
    }
    .with_context(|| format!("applying the {kind} {name}"))
}

/// Creates `documents` (namespaces, service accounts, CRDs and RBAC, as deploy/ and KubeVirt's manifests hold them)
/// in order, as `kubectl create -f` does.
pub async fn create_all(client: &kube::Client, documents: Vec<serde_json::Value>) -> Result<()> {
    use kube::api::{Api, DynamicObject, PostParams};
    for doc in documents {
        let kind = doc["kind"].as_str().unwrap_or_default();
        let (group, version, plural, namespaced) = match kind {
            "CustomResourceDefinition" => ("apiextensions.k8s.io", "v1", "customresourcedefinitions", false),
            "Namespace" => ("", "v1", "namespaces", false),
            "ServiceAccount" => ("", "v1", "serviceaccounts", true),
            "ClusterRole" => ("rbac.authorization.k8s.io", "v1", "clusterroles", false),
            "ClusterRoleBinding" => ("rbac.authorization.k8s.io", "v1", "clusterrolebindings", false),
            "Role" => ("rbac.authorization.k8s.io", "v1", "roles", true),
            "RoleBinding" => ("rbac.authorization.k8s.io", "v1", "rolebindings", true),
            "NetworkPolicy" => ("networking.k8s.io", "v1", "networkpolicies", true),
            "PodDisruptionBudget" => ("policy", "v1beta1", "poddisruptionbudgets", true),
            other => bail!("the lab cannot create a {other}"),
        };
        let r = crate::kubevirt_lab::resource(kind, group, version, plural);
        let mut doc = doc.clone();
        // policy/v1 is newer than the lab's server (1.20): the same object in policy/v1beta1 proves its shape.
        doc["apiVersion"] = r.api_version.clone().into();
        let api: Api<DynamicObject> = match namespaced {
            true => Api::namespaced_with(client.clone(), doc["metadata"]["namespace"].as_str().unwrap_or_default(), &r),
            false => Api::all_with(client.clone(), &r),
        };
        let name = format!("{kind} {}", doc["metadata"]["name"].as_str().unwrap_or_default());
        api.create(&PostParams::default(), &serde_json::from_value(doc)?)
            .await
            .with_context(|| format!("creating the {name}"))?;
    }
    Ok(())
}

/// 16 random hex digits from the kernel (tokens need not be strong here, only unguessable by other tests).
fn random_hex() -> String {
    random_bytes::<8>().iter().map(|b| format!("{b:02x}")).collect()
}

/// `N` random bytes from the kernel.
pub(crate) fn random_bytes<const N: usize>() -> [u8; N] {
    let mut bytes = [0u8; N];
    let _ = std::fs::File::open("/dev/urandom").and_then(|mut f| std::io::Read::read_exact(&mut f, &mut bytes));
    bytes
}

/// The audit events in `dir`'s `audit*.log` files, oldest first (see [`Cluster::audit`]).
fn read_audit_logs(dir: &std::path::Path) -> Result<Vec<AuditEvent>> {
    let mut logs: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|path| {
            path.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("audit") && n.ends_with(".log"))
        })
        .collect();
    logs.sort();
    let mut events = Vec::new();
    for log in logs {
        let text = std::fs::read_to_string(&log).with_context(|| format!("reading {}", log.display()))?;
        // A line still being written has no newline yet: it is read next time.
        let complete = text.rfind('\n').map_or("", |end| &text[..end]);
        for line in complete.lines() {
            events.push(serde_json::from_str(line).with_context(|| format!("an audit line: {line}"))?);
        }
    }
    Ok(events)
}

#[cfg(test)]
mod audit_tests {
    use super::*;

    #[test]
    fn the_audit_log_is_read_across_rotations_and_a_line_being_written_is_left_for_later() {
        let dir = tempfile::tempdir().unwrap();
        let event = |uri: &str| format!(r#"{{"verb":"get","requestURI":"{uri}","stage":"ResponseComplete"}}"#);
        let write = |name: &str, text: String| std::fs::write(dir.path().join(name), text).unwrap();
        write("audit-2026-12-05T19-00-00.000.log", format!("{}\n{}\n", event("/1"), event("/2")));
        write("audit-2026-12-05T20-00-00.000.log", format!("{}\n", event("/3")));
        write("audit.log", format!("{}\n{}", event("/4"), &event("/5")[..20]));
        write("apiserver.log", "not audit\n".into());
        let uris: Vec<String> = read_audit_logs(dir.path()).unwrap().into_iter().map(|e| e.request_uri).collect();
        assert_eq!(uris, ["/1", "/2", "/3", "/4"]);

        write("audit.log", "{not json\n".into());
        let err = read_audit_logs(dir.path()).unwrap_err();
        assert!(format!("{err:#}").contains("an audit line: {not json"), "{err:#}");
    }
}
