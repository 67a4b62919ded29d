//! The command line (`run`, `crd`): parsed here rather than in `main.rs` so that tests can read the shipped
//! Deployment's arguments exactly as the binary does.

use crate::guard_certs::ManagedCerts;
use crate::webhook::ClientAuth;
use crate::{AgentAccess, Config, WebhookConfig};
use clap::{Parser, Subcommand};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;
use wukong_controller_client::agent_client::VsockTls;
use wukong_controller_client::kubevirt::{AgentTransport, RouteSettings};

/// Declarative disks for the Wukong resource, detached only when the guest lets them go.
#[derive(Debug, Parser)]
#[command(name = "wukong-operator", version)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Reconcile Wukong objects.
    Run(Box<RunArgs>),
    /// Print the CustomResourceDefinition (what deploy/crd.yaml holds).
    Crd,
}

#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// Directory of the agent client's TLS Secret: ca.crt, tls.crt, tls.key (mutual TLS with every agent).
    #[arg(long, env = "WUKONG_AGENT_TLS_DIR", value_name = "DIR", required_unless_present = "agent_plaintext")]
    agent_tls_dir: Option<PathBuf>,
    /// The name every agent's certificate carries (one certificate name for all agents: a certificate rendered into
    /// cloud-init cannot carry an address the VM does not have yet, so agents are never verified by their IP).
    #[arg(long, env = "WUKONG_AGENT_SERVER_NAME", default_value = wukong_proto::AGENT_SERVER_NAME)]
    agent_server_name: String,
    /// Talk to agents without TLS: labs only; agents listening beyond loopback require mutual TLS.
    #[arg(long, conflicts_with = "agent_tls_dir")]
    agent_plaintext: bool,
    /// The agents' port, TCP or vsock, unless a VM's annotation wukong.io/agent-port says another.
    #[arg(long, env = "WUKONG_AGENT_PORT", default_value_t = wukong_proto::DEFAULT_PORT,
          value_parser = clap::value_parser!(u16).range(1..))]
    agent_port: u16,
    /// How to reach a VM's agent, unless its annotation wukong.io/agent-transport says: auto (KubeVirt's vsock
    /// subresource when the VMI has a vsock CID, status.VSOCKCID, else the network), vsock, or network. Over vsock
    /// the operator needs `get` on virtualmachineinstances/vsock (subresources.kubevirt.io), which the chart grants.
    #[arg(long, env = "WUKONG_AGENT_TRANSPORT", value_enum, default_value_t = AgentTransport::Auto)]
    agent_transport: AgentTransport,
    /// Over the network, the network (a name in the VMI's spec.networks) whose interface's IP is dialled, unless a
    /// VM's annotation wukong.io/agent-network says [default: the pod network].
    #[arg(long, env = "WUKONG_AGENT_NETWORK", value_name = "NAME")]
    agent_network: Option<String>,
    /// Over KubeVirt's vsock subresource, who speaks TLS with the guest, unless a VM's annotation
    /// wukong.io/agent-vsock-tls says: agent (the operator's mutual TLS, end to end, to the agent's vsock://
    /// listener) or kubevirt (virt-handler's, to the agent's kubevirt-vsock:// listener).
    #[arg(long, env = "WUKONG_AGENT_VSOCK_TLS", value_enum, default_value_t = VsockTls::Agent)]
    agent_vsock_tls: VsockTls,
    /// Watch, reconcile and guard only this namespace (default: all): nothing beyond it is listed or watched, so a
    /// Role there suffices (the chart's watchNamespace).
    #[arg(long, env = "WUKONG_WATCH_NAMESPACE")]
    watch_namespace: Option<String>,
    /// Namespace of the leader Lease (the operator's own).
    #[arg(long, env = "POD_NAMESPACE", default_value = "wukong-system")]
    lease_namespace: String,
    #[arg(long, default_value = "wukong-operator")]
    lease_name: String,
    /// This replica's identity (the pod's name).
    #[arg(long, env = "POD_NAME")]
    pub identity: Option<String>,
    /// Where /metrics, /healthz and /readyz are served. `[::]` serves IPv6 and IPv4 (0.0.0.0 where the kernel has no
    /// IPv6).
    #[arg(long, env = "WUKONG_HTTP_ADDRESS", default_value = "[::]:8080")]
    http_address: SocketAddr,
    /// Seconds one reconcile waits for an attach or a detach before looking again on a later pass.
    #[arg(long, default_value_t = 30)]
    wait_seconds: u64,
    /// Serve the admission guard (POST /validate) here, over HTTPS (`[::]:8443`: IPv6 and IPv4, as --http-address).
    #[arg(long, env = "WUKONG_WEBHOOK_ADDRESS", requires = "webhook_cert_dir")]
    webhook_address: Option<SocketAddr>,
    /// Directory of the webhook's serving certificate Secret: tls.crt, tls.key (read again when they change).
    #[arg(long, env = "WUKONG_WEBHOOK_CERT_DIR", value_name = "DIR", requires = "webhook_address")]
    webhook_cert_dir: Option<PathBuf>,
    /// Require this CA's client certificate of every webhook caller: the API server's, from its
    /// AdmissionConfiguration (see deploy/guard.yaml). Without it, every review is checked against the live objects
    /// before a guest is asked anything.
    #[arg(long, env = "WUKONG_WEBHOOK_CLIENT_CA", value_name = "FILE", requires = "webhook_address")]
    webhook_client_ca: Option<PathBuf>,
    /// With --webhook-client-ca: the names (common name or DNS SAN) a caller's certificate must carry, comma
    /// separated (default: any certificate of the CA; set it when the CA signs other clients too).
    #[arg(long, env = "WUKONG_WEBHOOK_CLIENT_NAMES", value_delimiter = ',', requires = "webhook_client_ca")]
    webhook_client_names: Vec<String>,
    /// Make and rotate the webhook's serving certificate itself, kept in this Secret of the operator's namespace
    /// (a CA and a certificate for the guard Service's names); every replica writes it into --webhook-cert-dir
    /// (then a writable emptyDir, not a mounted Secret). The leader keeps every caBundle of
    /// --guard-webhook-configuration equal to its CA bundle.
    #[arg(long, env = "WUKONG_GUARD_CERT_SECRET", value_name = "NAME", requires = "webhook_address")]
    guard_cert_secret: Option<String>,
    /// With --guard-cert-secret: the ValidatingWebhookConfiguration whose webhooks' caBundle the leader keeps.
    #[arg(long, default_value = "wukong-guard", requires = "guard_cert_secret")]
    guard_webhook_configuration: String,
    /// With --guard-cert-secret: the guard's Service (in the operator's namespace): the certificate is for
    /// NAME, NAME.NAMESPACE, NAME.NAMESPACE.svc and NAME.NAMESPACE.svc.cluster.local.
    #[arg(long, default_value = "wukong-guard", requires = "guard_cert_secret")]
    guard_service: String,
    /// With --guard-cert-secret: more names (DNS names or IP addresses) for the certificate, comma separated, for
    /// a webhook reached by URL.
    #[arg(long, value_delimiter = ',', requires = "guard_cert_secret")]
    guard_cert_extra_names: Vec<String>,
    /// With --guard-cert-secret: the CA's lifetime; a new CA is made at two thirds of it, and the old one stays
    /// trusted until it expires.
    #[arg(long, default_value_t = 365 * 86400, value_parser = clap::value_parser!(u64).range(3..))]
    guard_ca_validity_seconds: u64,
    /// With --guard-cert-secret: the serving certificate's lifetime; a new one is issued at two thirds of it.
    #[arg(long, default_value_t = 30 * 86400, value_parser = clap::value_parser!(u64).range(3..))]
    guard_cert_validity_seconds: u64,
    /// Seconds the guest may take to release one disk for a review; a release that cannot finish in time is rolled
    /// back by the agent and the update denied. Keep it well under the webhook's timeoutSeconds (30).
    #[arg(long, default_value_t = 15, value_parser = clap::value_parser!(u64).range(1..=28))]
    guard_release_deadline_seconds: u64,
    /// On SIGTERM, seconds the replica, unready at once, goes on answering reviews as usual while the Service stops
    /// sending it any (a `preStop` sleep in the process: it works on every Kubernetes version and in an image
    /// without a shell).
    #[arg(long, default_value_t = 5)]
    shutdown_delay_seconds: u64,
    /// Then, seconds the reviews under way may still take before the process exits (with the delay, keep it under
    /// the Pod's terminationGracePeriodSeconds).
    #[arg(long, default_value_t = 25)]
    shutdown_drain_seconds: u64,
    /// Seconds a guarded disk may stay released while its volume is still in the spec (an allowed update that was
    /// not stored) before the guest gets it back.
    #[arg(long, default_value_t = 60)]
    guard_grace_seconds: u64,
    /// Warn (a gauge, and a Warning Event `AgentCertificateExpiring` at most once a day per VM) when a running VM's
    /// agent serves a certificate that expires within this many days.
    #[arg(long, default_value_t = 30)]
    agent_cert_warning_days: u64,
    /// Log as JSON lines (for log collectors).
    #[arg(long)]
    pub log_json: bool,
}

impl RunArgs {
    /// How this replica reaches the guests' agents.
    pub fn agent_access(&self) -> AgentAccess {
        let route = RouteSettings {
            transport: Some(self.agent_transport),
            network: self.agent_network.clone(),
            port: Some(self.agent_port),
            vsock_tls: Some(self.agent_vsock_tls),
        };
        match &self.agent_tls_dir {
            Some(dir) => AgentAccess::tls_dir(dir.clone(), route, self.agent_server_name.clone()),
            None => AgentAccess { route, tls: None },
        }
    }

    /// The operator's settings, as `identity` (the Pod's name).
    pub fn config(&self, identity: String) -> Config {
        Config {
            agent: self.agent_access(),
            namespace: self.watch_namespace.clone(),
            lease_namespace: self.lease_namespace.clone(),
            lease_name: self.lease_name.clone(),
            identity,
            http_address: self.http_address,
            attach_wait: Duration::from_secs(self.wait_seconds),
            detach_wait: Duration::from_secs(self.wait_seconds),
            agent_cert_warning: Duration::from_secs(self.agent_cert_warning_days * 86400),
            webhook: self.webhook_address.zip(self.webhook_cert_dir.clone()).map(|(address, cert_dir)| WebhookConfig {
                address,
                cert_dir,
                client_auth: self
                    .webhook_client_ca
                    .clone()
                    .map(|ca| ClientAuth { ca, names: self.webhook_client_names.clone() }),
                release_deadline: Duration::from_secs(self.guard_release_deadline_seconds),
                shutdown_delay: Duration::from_secs(self.shutdown_delay_seconds),
                drain: Duration::from_secs(self.shutdown_drain_seconds),
                grace: Duration::from_secs(self.guard_grace_seconds),
                managed: self.guard_cert_secret.clone().map(|secret| ManagedCerts {
                    names: ManagedCerts::service_names(
                        &self.guard_service,
                        &self.lease_namespace,
                        &self.guard_cert_extra_names,
                    ),
                    namespace: self.lease_namespace.clone(),
                    secret,
                    webhook_configuration: self.guard_webhook_configuration.clone(),
                    ca_validity: Duration::from_secs(self.guard_ca_validity_seconds),
                    cert_validity: Duration::from_secs(self.guard_cert_validity_seconds),
                }),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    fn run_args(args: &[&str]) -> RunArgs {
        match Cli::try_parse_from(["wukong-operator", "run"].iter().chain(args)).unwrap().command {
            Command::Run(args) => *args,
            Command::Crd => panic!("run"),
        }
    }

    #[test]
    fn the_command_line_is_consistent_and_asks_for_agent_tls() {
        Cli::command().debug_assert();
        let error = Cli::try_parse_from(["wukong-operator", "run"]).unwrap_err().to_string();
        assert!(error.contains("--agent-tls-dir"), "{error}");
        assert!(Cli::try_parse_from(["wukong-operator", "run", "--agent-plaintext"]).is_ok());
        let both = ["wukong-operator", "run", "--agent-plaintext", "--agent-tls-dir", "/x"];
        assert!(Cli::try_parse_from(both).is_err());
        let webhook = ["wukong-operator", "run", "--agent-plaintext", "--webhook-address", "0.0.0.0:8443"];
        let with = |extra: &[&str]| {
            Cli::try_parse_from(webhook.iter().chain(["--webhook-cert-dir", "/c"].iter()).chain(extra))
        };
        let Command::Run(args) =
            with(&["--webhook-client-ca", "/ca", "--webhook-client-names", "a,b"]).unwrap().command
        else {
            panic!("run")
        };
        assert_eq!(args.webhook_client_names, ["a", "b"]);
        assert!(with(&["--webhook-client-names", "a"]).is_err(), "names without a CA mean nothing");
        assert!(with(&["--guard-release-deadline-seconds", "30"]).is_err(), "a deadline must leave the review time");
        assert!(with(&["--guard-release-deadline-seconds", "0"]).is_err());
    }

    /// Without --agent-server-name the operator verifies agents against the name the README's install issues
    /// their certificates for, never against the IP it dials (which no cloud-init certificate can carry).
    #[test]
    fn agents_are_verified_by_the_certificates_name_unless_told_otherwise() {
        let name = |args: &RunArgs| args.agent_access().tls.and_then(|t| t.server_name);
        assert_eq!(name(&run_args(&["--agent-tls-dir", "/tls"])).as_deref(), Some("wukong-agent"));
        let other = run_args(&["--agent-tls-dir", "/tls", "--agent-server-name", "agents.example"]);
        assert_eq!(name(&other).as_deref(), Some("agents.example"));
        assert!(run_args(&["--agent-plaintext"]).agent_access().tls.is_none());
    }

    /// The way to agents: each VM's annotations decide, and these flags are the defaults for VMs without them.
    #[test]
    fn the_way_to_agents_is_the_flags_unless_a_vm_says() {
        let route = |args: &[&str]| run_args(&[&["--agent-plaintext"][..], args].concat()).agent_access().route;
        let defaults = route(&[]);
        assert_eq!(
            defaults,
            RouteSettings {
                transport: Some(AgentTransport::Auto),
                network: None,
                port: Some(7443),
                vsock_tls: Some(VsockTls::Agent),
            }
        );
        let chosen = route(&[
            "--agent-transport",
            "network",
            "--agent-network",
            "storage",
            "--agent-vsock-tls",
            "kubevirt",
            "--agent-port",
            "818",
        ]);
        assert_eq!(
            chosen,
            RouteSettings {
                transport: Some(AgentTransport::Network),
                network: Some("storage".into()),
                port: Some(818),
                vsock_tls: Some(VsockTls::KubeVirt),
            }
        );
        assert!(!run_args(&["--agent-plaintext", "--agent-transport", "network"]).agent_access().may_use_vsock());
        assert!(run_args(&["--agent-plaintext"]).agent_access().may_use_vsock());
        for bad in [["--agent-transport", "tcp"], ["--agent-vsock-tls", "true"], ["--agent-port", "0"]] {
            let args = ["wukong-operator", "run", "--agent-plaintext", bad[0], bad[1]];
            assert!(Cli::try_parse_from(args).is_err(), "{bad:?}");
        }
    }

    /// The self-managed guard certificate: off unless --guard-cert-secret names its Secret; then for the Service's
    /// names in the operator's namespace, and meaningless without the webhook.
    #[test]
    fn the_guard_manages_its_certificate_only_when_asked() {
        let base = ["--agent-plaintext", "--webhook-address", "0.0.0.0:8443", "--webhook-cert-dir", "/c"];
        let managed = |extra: &[&str]| {
            let args: Vec<&str> = base.iter().chain(extra).copied().collect();
            run_args(&args).config("r".into()).webhook.unwrap().managed
        };
        assert!(managed(&[]).is_none(), "the mounted Secret stays the default");
        let m = managed(&["--guard-cert-secret", "wukong-guard-certs", "--lease-namespace", "ops"]).unwrap();
        assert_eq!(
            (m.namespace.as_str(), m.secret.as_str(), m.webhook_configuration.as_str()),
            ("ops", "wukong-guard-certs", "wukong-guard")
        );
        assert_eq!(m.names[0], "wukong-guard.ops.svc", "the name the API server verifies comes first (the CN)");
        assert_eq!((m.ca_validity.as_secs(), m.cert_validity.as_secs()), (365 * 86400, 30 * 86400));
        let no_webhook = ["wukong-operator", "run", "--agent-plaintext", "--guard-cert-secret", "s"];
        assert!(Cli::try_parse_from(no_webhook).is_err());
        let orphan = ["wukong-operator", "run", "--agent-plaintext", "--guard-service", "s"];
        assert!(Cli::try_parse_from(orphan).is_err(), "--guard-service means nothing without --guard-cert-secret");
    }
}
