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
pub mod events;
#[cfg(test)]
mod fixtures;
pub mod guard;
pub mod guard_certs;
pub mod kubevirt_cache;
pub mod leader;
pub mod ledger;
pub mod metrics;
pub mod moves;
pub mod plan;
pub mod reconcile;
pub mod release_watch;
pub mod server;
pub mod snapshot;
pub mod storage;
pub mod validate;
pub mod verify;
pub mod wake;
pub mod webhook;
pub mod written;

use kube::api::{Api, ApiResource, DynamicObject};
use std::path::PathBuf;
use std::time::Duration;
use wukong_controller_client::agent_client::{
    AgentAddress, AgentClient, ClientError, DEFAULT_CONNECT_TIMEOUT, Dialer, TlsFiles,
};
use wukong_controller_client::hypervisor::HypervisorError;
use wukong_controller_client::kubevirt::{
    AgentTransport, RouteError, RouteOptions, RouteSettings, VirtualMachine, VirtualMachineInstance, agent_route,
};

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
    #[error("the watch of claims ended before it listed them: the operator is shutting down")]
    ClaimsWatchEnded,
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
            Error::ClaimsWatchEnded => "claims_watch",
            Error::Listen { .. } | Error::Certificate(_) | Error::ClientCa(_) | Error::WebhookStopped(_) => "listen",
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// How the operator reaches guest agents: each VMI by its route (KubeVirt's vsock subresource when it has a vsock
/// CID, else the IP of a network's interface; see [`agent_route`]), as its VM's annotations say, else as `route`
/// (the `--agent-*` flags) says; over mutual TLS with the files of a mounted Secret (re-read on every connection, so
/// a rotated Secret is picked up) and the one name all agents' certificates carry, or in plaintext (labs only).
#[derive(Debug, Clone)]
pub struct AgentAccess {
    pub route: RouteSettings,
    pub tls: Option<TlsFiles>,
}

/// Why a VMI's agent cannot be asked: its route (not configured right, or not there yet), or the client.
#[derive(Debug, thiserror::Error)]
pub enum AgentUnreachable {
    #[error("VM {0} is not running: it has no guest to ask")]
    Stopped(String),
    #[error(transparent)]
    Route(#[from] RouteError),
    #[error(transparent)]
    Client(#[from] ClientError),
}

impl AgentUnreachable {
    /// The VMI has no address or CID yet: waiting helps.
    pub fn is_pending(&self) -> bool {
        matches!(self, Self::Route(e) if e.is_pending())
    }
}

impl AgentAccess {
    /// Plaintext (labs), every agent on `port`, routes chosen per VMI.
    pub fn plaintext(port: u16) -> Self {
        Self { route: RouteSettings { port: Some(port), ..Default::default() }, tls: None }
    }

    /// A client of the agent in a VMI's guest (`vm`: its VM, whose annotations win over the VMI's); `kube` opens
    /// KubeVirt's vsock subresource.
    pub fn connect(
        &self,
        kube: &kube::Client,
        vm: Option<&VirtualMachine>,
        vmi: &VirtualMachineInstance,
    ) -> Result<AgentClient, AgentUnreachable> {
        self.connect_within(kube, vm, vmi, DEFAULT_CONNECT_TIMEOUT)
    }

    /// [`Self::connect`] with each connection attempt bounded by `attempt`: for callers with a deadline of their
    /// own (the guard answers the API server within its webhook timeout, and may dial twice).
    pub fn connect_within(
        &self,
        kube: &kube::Client,
        vm: Option<&VirtualMachine>,
        vmi: &VirtualMachineInstance,
        attempt: Duration,
    ) -> Result<AgentClient, AgentUnreachable> {
        let address = self.address(vm, vmi)?;
        Ok(self.dialer(kube).with_connect_timeout(attempt).connect(address)?)
    }

    /// Where the agent of a VMI's guest is reached.
    pub fn address(
        &self,
        vm: Option<&VirtualMachine>,
        vmi: &VirtualMachineInstance,
    ) -> Result<AgentAddress, RouteError> {
        agent_route(vm, vmi, &RouteOptions { defaults: self.route.clone(), ..Default::default() })
    }

    /// A client of the agent at `address` (from [`Self::address`]).
    pub fn connect_to(&self, kube: &kube::Client, address: AgentAddress) -> Result<AgentClient, ClientError> {
        self.dialer(kube).connect(address)
    }

    fn dialer(&self, kube: &kube::Client) -> Dialer {
        Dialer::new().with_tls(self.tls.clone()).with_kube(kube.clone())
    }

    /// Whether agents may be reached over KubeVirt's vsock subresource, which needs `get` on
    /// `virtualmachineinstances/vsock`: not with `--agent-transport network` (a VM whose annotation still asks for
    /// vsock is then refused by RBAC, and the refusal is reported).
    pub fn may_use_vsock(&self) -> bool {
        self.route.transport != Some(AgentTransport::Network)
    }

    /// TLS files from a directory holding a `kubernetes.io/tls` Secret plus its CA: `ca.crt`, `tls.crt`, `tls.key`;
    /// every agent's certificate must carry `server_name`.
    pub fn tls_dir(dir: PathBuf, route: RouteSettings, server_name: String) -> Self {
        let (ca, cert, key) = (dir.join("ca.crt"), dir.join("tls.crt"), dir.join("tls.key"));
        let tls = TlsFiles { ca, cert, key, server_name: Some(server_name) };
        Self { route, tls: Some(tls) }
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

/// The Events of the admission guard's parts (the webhook and its loop-closer), as this replica.
pub(crate) fn guard_events(client: &kube::Client, identity: &str) -> events::Events {
    events::Events::new(client.clone(), format!("{MANAGER}-guard"), identity)
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::Api;
    use serde_json::json;

    fn vmi(annotations: serde_json::Value) -> VirtualMachineInstance {
        serde_json::from_value(json!({
            "metadata": {"name": "vm1", "namespace": "ns1", "annotations": annotations,
                         "ownerReferences": [{"kind": "VirtualMachine", "name": "vm1"}]},
            "spec": {"domain": {"devices": {"autoattachVSOCK": true}}, "networks": [{"name": "default", "pod": {}}]},
            "status": {"VSOCKCID": 42, "interfaces": [{"name": "default", "ipAddress": "10.244.1.7"}]},
        }))
        .unwrap()
    }

    /// A VMI with a vsock CID is dialled through the operator's own Kubernetes client, and what goes wrong names the
    /// transport and the VMI: what the disk's status and Events then say.
    #[tokio::test]
    async fn agents_of_vmis_with_a_vsock_cid_are_dialled_through_the_kubernetes_api() {
        let api = Api::start(|s| {
            s.path.ends_with("/vsock").then(|| {
                let message = "virtualmachineinstances.subresources.kubevirt.io \"vm1\" is forbidden";
                (403, json!({"kind": "Status", "status": "Failure", "code": 403, "message": message}))
            })
        });
        let access = AgentAccess::plaintext(7443);
        let agent = access.connect(&api.client(), None, &vmi(json!({}))).unwrap();
        let err = agent.agent_info().await.unwrap_err().to_string();
        assert!(
            err.starts_with(
                "cannot reach the agent over KubeVirt's vsock subresource of VMI ns1/vm1 (port 7443, tls=false): the \
                 Kubernetes API answered 403 Forbidden"
            ),
            "{err}"
        );
        assert!(err.contains("needs `get` on virtualmachineinstances/vsock"), "{err}");
        let paths: Vec<String> = api.seen().into_iter().map(|s| s.path).collect();
        assert_eq!(paths, ["/apis/subresources.kubevirt.io/v1/namespaces/ns1/virtualmachineinstances/vm1/vsock"]);
    }

    #[test]
    fn a_vms_annotations_choose_its_route_over_the_operators_flags() {
        let mut access = AgentAccess::plaintext(7443);
        access.route.transport = Some(AgentTransport::Vsock);
        let vm: VirtualMachine = serde_json::from_value(json!({
            "metadata": {"name": "vm1", "namespace": "ns1", "annotations": {"wukong.io/agent-transport": "network"}},
        }))
        .unwrap();
        assert_eq!(access.address(None, &vmi(json!({}))).unwrap().to_string(), "kubevirt://ns1/vm1:7443");
        assert_eq!(access.address(Some(&vm), &vmi(json!({}))).unwrap().to_string(), "http://10.244.1.7:7443");
        let bad = vmi(json!({"wukong.io/agent-vsock-tls": "yes"}));
        let err = access.address(Some(&vm), &bad).unwrap_err();
        assert!(!err.is_pending());
        assert_eq!(
            err.to_string(),
            "VMI ns1/vm1 has annotation wukong.io/agent-vsock-tls: \"yes\", which is not agent or kubevirt; correct or \
             remove it"
        );
    }
}
