//! wukong-operator: the `Wukong` resource's declarative disks. A disk added to `spec.disks` gets its claim and is
//! hot-plugged; a disk removed is detached through the companion's safe detach (the guest's agent releases it in
//! the same operation) as soon as the guest lets it go, with every refusal's reasons in status and Events.
//!
//! Layout after kube-rs' controller-rs: [`crd`] (the types, and the CRD they generate), [`validate`] (bad input),
//! [`plan`] (pure decisions), [`reconcile`] (carrying them out), [`metrics`], [`server`] (metrics and probes),
//! [`leader`] (one active replica), [`access`] (what its identity may do).

pub mod access;
pub mod agent_certificate;
pub mod cli;
pub mod crd;
#[cfg(test)]
mod fixtures;
pub mod guard;
pub mod guard_certs;
pub mod leader;
pub mod ledger;
pub mod metrics;
pub mod plan;
pub mod reconcile;
pub mod release_watch;
pub mod server;
pub mod storage;
pub mod validate;
pub mod verify;
pub mod webhook;

use kube::api::{Api, ApiResource, DynamicObject};
use std::path::PathBuf;
use std::time::Duration;
use wukong_controller_client::agent_client::{AgentClient, ClientError, TlsFiles};
use wukong_controller_client::hypervisor::HypervisorError;
use wukong_controller_client::kubevirt::{VirtualMachineInstance, agent_address_of};

/// The operator's field manager (server-side apply) and Event reporter.
pub const MANAGER: &str = "wukong-operator";

/// Why a reconcile failed. Refusals (in use, agent unreachable, system disk) are not errors: they are status.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("the Kubernetes API failed: {0}")]
    Kube(#[from] kube::Error),
    #[error(transparent)]
    Hypervisor(#[from] HypervisorError),
    #[error("the finalizer of {object} failed: {source}")]
    Finalizer { object: String, source: Box<kube::runtime::finalizer::Error<Error>> },
    #[error("{object} cannot be read: {message}")]
    Decode { object: String, message: String },
    #[error("{object} is being deleted: waiting for VM {vm} to stop using claims {claims} before deleting them")]
    ClaimsInUse { object: String, vm: String, claims: String },
    #[error("the leader lease failed: {0}")]
    Lease(#[from] kube_lease_manager::LeaseManagerError),
    #[error("this replica lost the leader lease {0}; exiting so that only the new leader acts")]
    LostLease(String),
    #[error(
        "cannot serve the admission webhook: no usable certificate in {0} (tls.crt and tls.key, PEM); mount the \
         webhook's serving certificate Secret there"
    )]
    Certificate(PathBuf),
    #[error(
        "cannot require the API server's client certificate: no usable CA certificate in {0} (PEM); give \
         --webhook-client-ca the CA that signed the certificate of the API server's AdmissionConfiguration"
    )]
    ClientCa(PathBuf),
    #[error(transparent)]
    Ledger(#[from] Box<ledger::LedgerError>),
    #[error("the admission webhook's server panicked ({0}); exiting so that the replica is restarted")]
    WebhookStopped(String),
    #[error("cannot serve metrics and probes on {address}: {source}")]
    Listen { address: std::net::SocketAddr, source: std::io::Error },
    #[error(transparent)]
    Access(#[from] access::AccessError),
}

impl Error {
    /// A bounded label for the failures metric.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Kube(kube::Error::Api(s)) if s.code == 409 => "conflict",
            Error::Kube(_) => "kubernetes_api",
            Error::Hypervisor(_) => "kubevirt",
            Error::Finalizer { .. } => "finalizer",
            Error::Decode { .. } => "decode",
            Error::Ledger(_) => "ledger",
            Error::ClaimsInUse { .. } => "claims_in_use",
            Error::Lease(_) | Error::LostLease(_) => "lease",
            Error::Access(_) => "access",
            Error::Listen { .. } | Error::Certificate(_) | Error::ClientCa(_) | Error::WebhookStopped(_) => "listen",
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// How the operator reaches guest agents: at each VMI's first interface IP, on `port`, over mutual TLS with the
/// files of a mounted Secret (re-read on every connection, so a rotated Secret is picked up) and the one name all
/// agents' certificates carry, or in plaintext (labs only).
#[derive(Debug, Clone)]
pub struct AgentAccess {
    pub port: u16,
    pub tls: Option<TlsFiles>,
}

impl AgentAccess {
    /// A client of the agent in a VMI's guest, at its first interface IP; `None` while the VMI reports none.
    pub fn connect(&self, vmi: &VirtualMachineInstance) -> Option<Result<AgentClient, ClientError>> {
        self.address(vmi).map(|address| self.connect_to(&address))
    }

    /// Where the agent of a VMI's guest is reached; `None` while the VMI reports no IP.
    pub fn address(&self, vmi: &VirtualMachineInstance) -> Option<String> {
        agent_address_of(vmi, self.port)
    }

    /// A client of the agent at `address` (from [`Self::address`]).
    pub fn connect_to(&self, address: &str) -> Result<AgentClient, ClientError> {
        address.parse().and_then(|a| AgentClient::connect_with(a, self.tls.as_ref()))
    }

    /// TLS files from a directory holding a `kubernetes.io/tls` Secret plus its CA: `ca.crt`, `tls.crt`, `tls.key`;
    /// every agent's certificate must carry `server_name`.
    pub fn tls_dir(dir: PathBuf, port: u16, server_name: String) -> Self {
        let (ca, cert, key) = (dir.join("ca.crt"), dir.join("tls.crt"), dir.join("tls.key"));
        let tls = TlsFiles { ca, cert, key, server_name: Some(server_name) };
        Self { port, tls: Some(tls) }
    }
}

/// The operator's settings; nothing global.
#[derive(Debug, Clone)]
pub struct Config {
    pub agent: AgentAccess,
    /// Watch one namespace (a namespaced install: nothing is listed, watched or guarded beyond it); `None`: all.
    pub namespace: Option<String>,
    /// The Lease that elects the active replica.
    pub lease_namespace: String,
    pub lease_name: String,
    /// This replica's name (the pod's), for the Lease and Events.
    pub identity: String,
    /// Where `/metrics`, `/healthz` and `/readyz` are served.
    pub http_address: std::net::SocketAddr,
    /// How long one reconcile waits for an attach or a detach before it looks again on a later pass.
    pub attach_wait: Duration,
    pub detach_wait: Duration,
    /// The admission guard's endpoint, when served.
    pub webhook: Option<WebhookConfig>,
    /// An agent certificate that expires within this long is warned about ([`agent_certificate`]).
    pub agent_cert_warning: Duration,
}

/// Where the admission guard listens, and its serving certificate's directory (`tls.crt`, `tls.key`).
#[derive(Debug, Clone)]
pub struct WebhookConfig {
    pub address: std::net::SocketAddr,
    pub cert_dir: PathBuf,
    /// Require the API server's client certificate; `None`: check every review against the live objects.
    pub client_auth: Option<webhook::ClientAuth>,
    /// How long the guest may take to release one disk for a review before it rolls the release back.
    pub release_deadline: Duration,
    /// On SIGTERM, how long the replica goes on answering reviews as usual while it leaves the Service (the
    /// endpoints controller and every kube-proxy take a few seconds to stop sending it any).
    pub shutdown_delay: Duration,
    /// Then, how long reviews under way may still take before the process exits.
    pub drain: Duration,
    /// How long a guarded disk may stay released while its volume is still in the spec before the leader gives it
    /// back ([`release_watch`]).
    pub grace: Duration,
    /// The serving certificate made and rotated by the operator itself, written into `cert_dir` by every replica;
    /// `None`: `cert_dir` is a mounted Secret ([`guard_certs`]).
    pub managed: Option<guard_certs::ManagedCerts>,
}

pub use leader::run;

/// The Event recorder of the admission guard's parts (the webhook and its loop-closer), as this replica.
pub(crate) fn guard_recorder(client: &kube::Client, identity: &str) -> kube::runtime::events::Recorder {
    let reporter =
        kube::runtime::events::Reporter { controller: format!("{MANAGER}-guard"), instance: Some(identity.into()) };
    kube::runtime::events::Recorder::new(client.clone(), reporter)
}

/// A dynamic object as the typed view of the parts the operator reads (KubeVirt's objects have no crate).
pub(crate) fn typed<T: serde::de::DeserializeOwned>(object: &DynamicObject) -> Result<T, serde_json::Error> {
    serde_json::to_value(object).and_then(serde_json::from_value)
}

/// Reads one object of `resource` in `ns`, typed; `None` when it does not exist.
pub(crate) async fn get<T: serde::de::DeserializeOwned>(
    client: &kube::Client,
    ns: &str,
    resource: &ApiResource,
    name: &str,
) -> Result<Option<T>> {
    let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), ns, resource);
    match api.get_opt(name).await? {
        None => Ok(None),
        Some(object) => typed(&object)
            .map(Some)
            .map_err(|e| Error::Decode { object: format!("{} {ns}/{name}", resource.kind), message: e.to_string() }),
    }
}
