//! Client of the guest agent: the channel over any transport (see [`crate::transport`]), with mutual TLS when
//! configured, per-call deadlines, retries of idempotent reads, and errors that say which side failed.

pub use crate::address::{AgentAddress, BadAddress, VsockTls};
use crate::transport::{Connector, DialError, TargetError};
use hyper_util::rt::TokioIo;
use std::path::PathBuf;
use std::time::Duration;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity, Uri};
use tonic::{Code, Request, Status};
use wukong_proto::v1::disk_agent_client::DiskAgentClient;
use wukong_proto::v1::{
    AgentInfo, CancelDetachRequest, CancelDetachResponse, Disk, GetAgentInfoRequest, GetDiskRequest, ListDisksRequest,
    PrepareDetachRequest, PrepareDetachResponse, WaitForDiskRequest, WatchDisksRequest,
};

/// Default deadline of one unary call.
pub const DEFAULT_CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// Deadline of PrepareDetach and CancelDetach: a release waits for udev (up to 30 s) and for probes (up to 10 s).
pub const RELEASE_TIMEOUT: Duration = Duration::from_secs(120);
/// How much longer than a release's deadline its call may take: the agent answers by the deadline, and its answer
/// must still travel.
pub const DEADLINE_MARGIN: Duration = Duration::from_secs(2);
/// Default time allowed to establish a connection.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Attempts for an idempotent read that fails with UNAVAILABLE.
const READ_ATTEMPTS: u32 = 3;
/// HTTP/2 pings while a call is open: a connection whose far end is gone without a word (a guest reset under a
/// long `WaitForDisk`, whose new kernel never heard of it) fails within interval + timeout instead of holding the
/// call until its deadline.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(5);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);

/// The files for mutual TLS with the agent: the CA that signed the agent's certificate, and this client's own
/// certificate and key. `server_name` is the name the agent's certificate must carry, when it is not the host of
/// the address (e.g. one certificate for every agent, reached by changing pod IPs).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsFiles {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    pub server_name: Option<String>,
}

/// Errors of the agent client.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(transparent)]
    BadAddress(#[from] BadAddress),
    /// The address cannot be dialled by this caller (no Kubernetes client for KubeVirt's subresource).
    #[error(transparent)]
    Target(#[from] TargetError),
    /// No connection could be established: the transport's own account of it.
    #[error(transparent)]
    Dial(DialError),
    #[error("cannot reach the agent {}: {reason}; is wukong-agent running and reachable?", .address.place())]
    Unreachable { address: AgentAddress, reason: String },
    #[error("the agent {} did not answer within {timeout:?}", .address.place())]
    Timeout { address: AgentAddress, timeout: Duration },
    #[error("{}", .status.message())]
    Agent { status: Status },
    #[error("cannot read {path}: {source}")]
    TlsFile { path: PathBuf, source: std::io::Error },
    #[error("{path} is not a PEM {what} ({flag}): {why}")]
    NotPem { path: PathBuf, what: &'static str, flag: &'static str, why: String },
    #[error("{0}")]
    Tls(String),
    /// The TLS handshake failed: one side refused the other, or only one side speaks TLS.
    #[error("{0}")]
    TlsRefused(String),
}

impl ClientError {
    /// The agent did not take the call: no connection, no answer in time, or a refused TLS handshake.
    pub fn is_unreachable(&self) -> bool {
        matches!(self, Self::Dial(_) | Self::Unreachable { .. } | Self::Timeout { .. } | Self::TlsRefused(_))
    }

    /// The gRPC status code, when the agent answered with one.
    pub fn code(&self) -> Option<Code> {
        match self {
            Self::Agent { status } => Some(status.code()),
            _ => None,
        }
    }

    /// For a refused PrepareDetach (FAILED_PRECONDITION): the agent's full answer, with every blocker as data.
    pub fn refusal(&self) -> Option<PrepareDetachResponse> {
        use prost::Message;
        match self {
            Self::Agent { status } if status.code() == Code::FailedPrecondition && !status.details().is_empty() => {
                PrepareDetachResponse::decode(status.details()).ok()
            }
            _ => None,
        }
    }
}

/// A connected agent client.
#[derive(Debug, Clone)]
pub struct AgentClient {
    address: AgentAddress,
    inner: DiskAgentClient<Channel>,
    call_timeout: Duration,
    /// How long idempotent reads are tried again while the agent is unreachable; zero: [`READ_ATTEMPTS`] times.
    retry_reads_for: Duration,
    /// The files of mutual TLS, to name them when a handshake fails.
    tls: Option<TlsFiles>,
}

/// How to reach agents: the files of mutual TLS, a Kubernetes client for KubeVirt's vsock subresource, and how long
/// one connection attempt may take.
#[derive(Clone)]
pub struct Dialer {
    tls: Option<TlsFiles>,
    kube: Option<kube::Client>,
    connect_timeout: Duration,
}

impl Default for Dialer {
    fn default() -> Self {
        Self { tls: None, kube: None, connect_timeout: DEFAULT_CONNECT_TIMEOUT }
    }
}

impl Dialer {
    /// Plaintext, no Kubernetes client, [`DEFAULT_CONNECT_TIMEOUT`].
    pub fn new() -> Self {
        Self::default()
    }

    /// Mutual TLS with these files (none: plaintext). Not used on a Unix socket, nor on KubeVirt's subresource with
    /// [`VsockTls::KubeVirt`], where virt-handler is the guest's TLS client.
    pub fn with_tls(mut self, tls: Option<TlsFiles>) -> Self {
        self.tls = tls;
        self
    }

    /// The Kubernetes client that opens KubeVirt's vsock subresource ([`AgentAddress::KubeVirtVsock`]).
    pub fn with_kube(mut self, client: kube::Client) -> Self {
        self.kube = Some(client);
        self
    }

    /// How long one connection attempt may take (there are [`crate::transport::CONNECT_ATTEMPTS`]).
    pub fn with_connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// A client of the agent at `address` (lazily: the first call establishes the connection).
    pub fn connect(&self, address: AgentAddress) -> Result<AgentClient, ClientError> {
        let connector = Connector::new(&address, self.kube.as_ref(), self.connect_timeout)?;
        let tls = match &address {
            AgentAddress::Unix(_) | AgentAddress::KubeVirtVsock { tls: VsockTls::KubeVirt, .. } => None,
            AgentAddress::Tcp(url) if url.starts_with("https://") && self.tls.is_none() => {
                return Err(ClientError::Tls(format!(
                    "{url} needs TLS: give the CA, client certificate and key (--tls-ca, --tls-cert, --tls-key)"
                )));
            }
            _ => self.tls.clone(),
        };
        // The URI names the scheme (tonic's TLS applies to https) and the HTTP/2 authority; the connector dials.
        let (address, uri) = match (address, &tls) {
            (AgentAddress::Tcp(url), Some(_)) => {
                let url = url.strip_prefix("http://").map_or(url.clone(), |rest| format!("https://{rest}"));
                (AgentAddress::Tcp(url.clone()), url)
            }
            (AgentAddress::Tcp(url), None) => (AgentAddress::Tcp(url.clone()), url),
            (other, Some(_)) => (other, "https://agent.invalid".into()),
            (other, None) => (other, "http://agent.invalid".into()),
        };
        let bad = |why: &str| BadAddress { address: uri.clone(), why: why.into() };
        let mut endpoint = Endpoint::from_shared(uri.clone())
            .map_err(|_| bad("it is not a URL"))?
            // The connector bounds and retries each attempt itself; this also bounds the TLS handshake on top.
            .connect_timeout(connector.budget() + self.connect_timeout)
            .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
            .keep_alive_timeout(KEEPALIVE_TIMEOUT);
        if let Some(tls) = &tls {
            // Unless a name is configured: the URL's host over TCP; other transports have no host, so the name
            // every agent's certificate carries.
            let host = match &address {
                AgentAddress::Tcp(_) => endpoint.uri().host().unwrap_or_default().trim_matches(['[', ']']).to_string(),
                _ => wukong_proto::AGENT_SERVER_NAME.to_string(),
            };
            let config = ClientTlsConfig::new()
                .ca_certificate(Certificate::from_pem(read_pem(&tls.ca, Pem::Certificate, "--tls-ca")?))
                .identity(Identity::from_pem(
                    read_pem(&tls.cert, Pem::Certificate, "--tls-cert")?,
                    read_pem(&tls.key, Pem::Key, "--tls-key")?,
                ))
                .domain_name(tls.server_name.clone().unwrap_or(host));
            endpoint = endpoint
                .tls_config(config)
                .map_err(|e| ClientError::Tls(format!("the TLS files are not usable: {e}")))?;
        }
        let dialer = connector.clone();
        let channel = endpoint.connect_with_connector_lazy(tower::service_fn(move |_: Uri| {
            let connector = dialer.clone();
            async move { connector.connect().await.map(TokioIo::new) }
        }));
        let retry_reads_for = if address.waits_for_listener() { connector.budget() } else { Duration::ZERO };
        let inner = DiskAgentClient::new(channel);
        Ok(AgentClient { address, inner, call_timeout: DEFAULT_CALL_TIMEOUT, tls, retry_reads_for })
    }
}

impl AgentClient {
    /// Connects to the agent in plaintext (lazily: the first call establishes the connection).
    pub fn connect(address: AgentAddress) -> Result<Self, ClientError> {
        Dialer::new().connect(address)
    }

    /// Connects to the agent, over mutual TLS when `tls` is given (see [`Dialer`], which also reaches KubeVirt's
    /// vsock subresource).
    pub fn connect_with(address: AgentAddress, tls: Option<&TlsFiles>) -> Result<Self, ClientError> {
        Dialer::new().with_tls(tls.cloned()).connect(address)
    }

    /// Sets the deadline of each unary call.
    pub fn with_call_timeout(mut self, timeout: Duration) -> Self {
        self.call_timeout = timeout;
        self
    }

    pub fn address(&self) -> &AgentAddress {
        &self.address
    }

    fn request<T>(&self, msg: T, timeout: Duration) -> Request<T> {
        let mut req = Request::new(msg);
        req.set_timeout(timeout);
        req
    }

    async fn map_status(&self, status: Status, timeout: Duration) -> ClientError {
        if let Some(e) = dial_error(&status) {
            return ClientError::Dial(e);
        }
        let timed_out = status.code() == Code::DeadlineExceeded || status.message().contains("Timeout expired");
        match status.code() {
            Code::Cancelled | Code::DeadlineExceeded if timed_out && is_transport_error(&status) => {
                ClientError::Timeout { address: self.address.clone(), timeout }
            }
            // A refused TLS handshake or a reset connection: the agent did not take the call.
            Code::Unavailable | Code::Unknown | Code::Cancelled | Code::Internal if is_transport_error(&status) => {
                let reason = transport_reason(&status);
                // Closed, broken or reset connections look alike for a TLS refusal and for a forwarder in front
                // of an agent that is down: ask the address itself whether a TLS server answers there.
                let speaks_tls = match &self.address {
                    AgentAddress::Tcp(url) if !definitive(&reason) => answers_with_tls_alert(url).await,
                    _ => false,
                };
                match tls_refusal(&self.address, self.tls.as_ref(), &reason, speaks_tls) {
                    Some(sentence) => ClientError::TlsRefused(sentence),
                    None => ClientError::Unreachable { address: self.address.clone(), reason },
                }
            }
            _ => ClientError::Agent { status },
        }
    }

    /// Runs a call once (no retry): for calls that change the guest or wait.
    async fn once<T, Fut>(
        &self,
        timeout: Duration,
        call: impl FnOnce(DiskAgentClient<Channel>) -> Fut,
    ) -> Result<T, ClientError>
    where
        Fut: Future<Output = Result<tonic::Response<T>, Status>>,
    {
        match call(self.inner.clone()).await {
            Ok(response) => Ok(response.into_inner()),
            Err(status) => Err(self.map_status(status, timeout).await),
        }
    }

    /// Runs an idempotent read, retrying while the agent is unreachable (e.g. restarting): [`READ_ATTEMPTS`]
    /// times, or over vsock for as long as a dial may take (`retry_reads_for`; see
    /// [`AgentAddress::waits_for_listener`]).
    async fn read<T, F, Fut>(&self, call: F) -> Result<T, ClientError>
    where
        F: Fn(DiskAgentClient<Channel>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, Status>>,
    {
        let started = std::time::Instant::now();
        let mut delay = Duration::from_millis(200);
        let mut attempt = 1;
        loop {
            match call(self.inner.clone()).await {
                Ok(resp) => return Ok(resp.into_inner()),
                Err(status) => {
                    let err = self.map_status(status, self.call_timeout).await;
                    let more = match self.retry_reads_for.is_zero() {
                        true => attempt < READ_ATTEMPTS,
                        false => started.elapsed() + delay < self.retry_reads_for,
                    };
                    if !more || !matches!(err, ClientError::Unreachable { .. }) {
                        return Err(err);
                    }
                    tracing::debug!(attempt, error = %err, "agent unreachable; retrying the read");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(1));
                    attempt += 1;
                }
            }
        }
    }

    pub async fn agent_info(&self) -> Result<AgentInfo, ClientError> {
        self.read(|mut c| {
            let req = self.request(GetAgentInfoRequest {}, self.call_timeout);
            async move { c.get_agent_info(req).await }
        })
        .await
    }

    pub async fn list_disks(&self, include_usage: bool) -> Result<Vec<Disk>, ClientError> {
        self.read(|mut c| {
            let req = self.request(ListDisksRequest { include_usage }, self.call_timeout);
            async move { c.list_disks(req).await }
        })
        .await
        .map(|r| r.disks)
    }

    pub async fn get_disk(&self, serial: &str, include_usage: bool) -> Result<Disk, ClientError> {
        self.read(|mut c| {
            let req = self.request(GetDiskRequest { serial: serial.to_string(), include_usage }, self.call_timeout);
            async move { c.get_disk(req).await }
        })
        .await
    }

    /// A fresh usage report for the disk.
    pub async fn check_usage(&self, serial: &str) -> Result<wukong_proto::v1::UsageReport, ClientError> {
        self.read(|mut c| {
            let req =
                self.request(wukong_proto::v1::CheckUsageRequest { serial: serial.to_string() }, self.call_timeout);
            async move { c.check_usage(req).await }
        })
        .await
    }

    /// Waits until the guest has settled the disk with this serial. The call's deadline is the wait plus a margin,
    /// so the agent's own DEADLINE_EXCEEDED (with its explanation) arrives first. A wait changes nothing: when the
    /// connection is lost (the agent restarted, the guest reset), it is dialled again and the wait goes on for what
    /// is left of `timeout`.
    pub async fn wait_for_disk(&self, serial: &str, timeout: Duration) -> Result<Disk, ClientError> {
        let started = std::time::Instant::now();
        let mut delay = Duration::from_millis(200);
        loop {
            let left = timeout.saturating_sub(started.elapsed());
            let deadline = left + Duration::from_secs(5);
            let msg = WaitForDiskRequest { serial: serial.to_string(), timeout: left.try_into().ok() };
            let req = self.request(msg, deadline);
            match self.once(deadline, |mut c| async move { c.wait_for_disk(req).await }).await {
                Err(err @ ClientError::Unreachable { .. }) if started.elapsed() + delay < timeout => {
                    tracing::debug!(serial, error = %err, "the wait for the disk lost its connection; waiting again");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(1));
                }
                other => return other,
            }
        }
    }

    /// Releases the disk in the guest (never retried: it changes the guest). A refusal is a
    /// [`ClientError::Agent`] whose [`ClientError::refusal`] holds the blockers.
    pub async fn prepare_detach(
        &self,
        serial: &str,
        unmount: bool,
        dry_run: bool,
    ) -> Result<PrepareDetachResponse, ClientError> {
        self.prepare(serial, unmount, dry_run, None).await
    }

    /// [`Self::prepare_detach`] that is over within `deadline`: the disk is released by then, or the agent undoes
    /// what it did (mounts back, fence lifted, the disk present again) before it answers with a
    /// [`ClientError::Agent`] of code DEADLINE_EXCEEDED whose message names the disk and the step that ran out of
    /// time. The call itself may take [`DEADLINE_MARGIN`] longer, for that answer to arrive.
    pub async fn prepare_detach_within(
        &self,
        serial: &str,
        unmount: bool,
        dry_run: bool,
        deadline: Duration,
    ) -> Result<PrepareDetachResponse, ClientError> {
        self.prepare(serial, unmount, dry_run, Some(deadline)).await
    }

    async fn prepare(
        &self,
        serial: &str,
        unmount: bool,
        dry_run: bool,
        deadline: Option<Duration>,
    ) -> Result<PrepareDetachResponse, ClientError> {
        let timeout = deadline.map_or(RELEASE_TIMEOUT, |d| d.saturating_add(DEADLINE_MARGIN));
        let msg = PrepareDetachRequest {
            serial: serial.to_string(),
            unmount,
            dry_run,
            deadline: deadline.and_then(|d| d.try_into().ok()),
        };
        let req = self.request(msg, timeout);
        self.once(timeout, |mut c| async move { c.prepare_detach(req).await }).await
    }

    /// Undoes a release whose unplug did not happen (never retried).
    pub async fn cancel_detach(&self, serial: &str) -> Result<CancelDetachResponse, ClientError> {
        let req = self.request(CancelDetachRequest { serial: serial.to_string() }, RELEASE_TIMEOUT);
        self.once(RELEASE_TIMEOUT, |mut c| async move { c.cancel_detach(req).await }).await
    }

    /// Opens a watch: a snapshot, then live events.
    pub async fn watch(
        &self,
        serials: Vec<String>,
    ) -> Result<tonic::Streaming<wukong_proto::v1::DiskEvent>, ClientError> {
        match self.inner.clone().watch_disks(WatchDisksRequest { serials }).await {
            Ok(response) => Ok(response.into_inner()),
            Err(status) => Err(self.map_status(status, self.call_timeout).await),
        }
    }
}

/// The connector's own error, when no connection could be established.
fn dial_error(status: &Status) -> Option<DialError> {
    use std::error::Error;
    let mut source = status.source();
    while let Some(s) = source {
        if let Some(e) = s.downcast_ref::<DialError>() {
            return Some(e.clone());
        }
        source = s.source();
    }
    None
}

/// True when the status was produced by the transport (no answer from the agent), not by the agent.
fn is_transport_error(status: &Status) -> bool {
    use std::error::Error;
    status.source().is_some()
        || status.message().contains("transport error")
        || status.message().contains("connect")
        || status.message().contains("Timeout expired")
        || status.message().contains("h2 protocol error")
}

fn transport_reason(status: &Status) -> String {
    use std::error::Error;
    let mut reason = status.message().to_string();
    let mut source = status.source();
    while let Some(s) = source {
        reason = s.to_string();
        source = s.source();
    }
    reason
}

/// Transport words that say by themselves what happened in a TLS handshake.
fn definitive(reason: &str) -> bool {
    ["invalid peer certificate", "InvalidContentType", "corrupt message", "fatal alert"]
        .iter()
        .any(|r| reason.contains(r))
}

/// Whether a TLS server answers at `url`: sent bytes that are not TLS, it answers with an alert record (content
/// type 21) before it closes; a forwarder with no agent behind it closes or resets without a word.
async fn answers_with_tls_alert(url: &str) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Some(authority) = url.parse::<Uri>().ok().and_then(|u| u.authority().map(|a| a.to_string())) else {
        return false;
    };
    let probe = async {
        let mut stream = tokio::net::TcpStream::connect(authority).await.ok()?;
        stream.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await.ok()?;
        let mut first = [0u8; 1];
        (stream.read(&mut first).await.ok()? == 1).then_some(first[0])
    };
    matches!(tokio::time::timeout(Duration::from_secs(2), probe).await, Ok(Some(21)))
}

/// What a failed connection means when TLS is at stake: which side refused what. `speaks_tls`: a TLS server
/// answers at the address. `None` when it is an ordinary unreachable agent.
fn tls_refusal(address: &AgentAddress, tls: Option<&TlsFiles>, reason: &str, speaks_tls: bool) -> Option<String> {
    let at = address.place();
    match tls {
        Some(tls) if reason.contains("invalid peer certificate: UnknownIssuer") => Some(format!(
            "this client refused the agent's certificate {at}: the agent's certificate is not signed by the \
             CA in {} (--tls-ca); give the CA that signed it",
            tls.ca.display()
        )),
        Some(tls) if reason.contains("invalid peer certificate") => Some(format!(
            "this client refused the agent's certificate {at} ({reason}); check --tls-ca {} and, when the \
             certificate names another host, --tls-server-name",
            tls.ca.display()
        )),
        Some(_) if reason.contains("InvalidContentType") || reason.contains("corrupt message") => Some(format!(
            "the agent {at} does not speak TLS (it answered in plaintext); drop --tls-ca, --tls-cert and \
             --tls-key, or give the agent its TLS files"
        )),
        // TLS 1.3 checks the client's certificate after the client has finished: a refusal then arrives as an
        // alert, or as a closed connection on the first request from a server that does speak TLS.
        Some(tls) if reason.contains("fatal alert") || speaks_tls => Some(format!(
            "the agent {at} refused this client's certificate ({}) during the TLS handshake ({reason}); it \
             must be signed by the CA the agent trusts (its tls_client_ca)",
            tls.cert.display()
        )),
        None if speaks_tls => Some(format!(
            "the agent {at} speaks TLS and closed this plaintext connection ({reason}), as an agent \
             reachable beyond loopback must; give --tls-ca, --tls-cert and --tls-key"
        )),
        _ => None,
    }
}

/// What a PEM file must hold.
#[derive(Clone, Copy)]
enum Pem {
    Certificate,
    Key,
}

/// Reads a TLS file and checks it holds what its flag promises, so a wrong file is named before any handshake.
fn read_pem(path: &PathBuf, what: Pem, flag: &'static str) -> Result<Vec<u8>, ClientError> {
    use tokio_rustls::rustls::pki_types::pem::PemObject;
    use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let bytes = std::fs::read(path).map_err(|source| ClientError::TlsFile { path: path.clone(), source })?;
    let (checked, what) = match what {
        Pem::Certificate => (CertificateDer::pem_slice_iter(&bytes).next().map(|c| c.map(drop)), "certificate"),
        Pem::Key => (Some(PrivateKeyDer::from_pem_slice(&bytes).map(drop)), "private key"),
    };
    match checked {
        Some(Ok(())) => Ok(bytes),
        Some(Err(e)) => Err(ClientError::NotPem { path: path.clone(), what, flag, why: e.to_string() }),
        None => Err(ClientError::NotPem { path: path.clone(), what, flag, why: format!("it holds no {what}") }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transport::PLAIN_PROTOCOL;
    use async_tungstenite::tungstenite::handshake::derive_accept_key;
    use hyper_util::rt::TokioExecutor;
    use std::path::Path;
    use std::sync::Arc;
    use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
    use tokio_rustls::rustls;

    const QUICK: Duration = Duration::from_millis(500);

    #[tokio::test]
    async fn unreachable_agent_is_a_named_error() {
        let dir = tempfile::tempdir().unwrap();
        let addr = AgentAddress::Unix(dir.path().join("none.sock"));
        let client = Dialer::new().with_connect_timeout(QUICK).connect(addr).unwrap();
        let err = client.agent_info().await.unwrap_err();
        assert!(matches!(err, ClientError::Dial(DialError::Unreachable { .. })), "{err:?}");
        assert!(err.is_unreachable());
        assert!(err.to_string().contains("none.sock"), "{err}");
    }

    /// A stand-in for the agent: HTTP/2 that answers every gRPC call UNIMPLEMENTED with `name`, which proves the
    /// call crossed the transport (and TLS, when there is some) intact.
    async fn fake_agent(io: impl AsyncRead + AsyncWrite + Send + Unpin + 'static, name: &'static str) {
        let service = hyper::service::service_fn(move |_| async move {
            http::Response::builder()
                .header("content-type", "application/grpc")
                .header("grpc-status", "12")
                .header("grpc-message", name)
                .body(String::new())
        });
        let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
            .serve_connection(TokioIo::new(io), service)
            .await;
    }

    async fn answered_by(client: &AgentClient) -> String {
        match client.agent_info().await {
            Err(ClientError::Agent { status }) if status.code() == Code::Unimplemented => status.message().into(),
            other => panic!("{other:?}"),
        }
    }

    /// The CA, the agents' certificate (for `wukong-agent`) and the companion's, as `wukongctl pki init` makes them.
    fn pki(dir: &Path) -> TlsFiles {
        let options = crate::pki::PkiOptions {
            dir: dir.into(),
            ca_days: 2,
            days: 1,
            agent_name: wukong_proto::AGENT_SERVER_NAME.into(),
            client_name: "wukong-companion".into(),
            namespace: "wukong-system".into(),
            force: false,
        };
        crate::pki::init(&options).unwrap();
        let file = |name| dir.join(name);
        TlsFiles {
            ca: file(crate::pki::CA_CERT),
            cert: file(crate::pki::CLIENT_CERT),
            key: file(crate::pki::CLIENT_KEY),
            server_name: None,
        }
    }

    /// The agent's side of mutual TLS: its certificate, and clients of the CA only.
    fn acceptor(dir: &Path) -> tokio_rustls::TlsAcceptor {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = rustls::RootCertStore::empty();
        roots.add(CertificateDer::from_pem_file(dir.join(crate::pki::CA_CERT)).unwrap()).unwrap();
        let verifier =
            rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone()).build();
        let chain = CertificateDer::pem_file_iter(dir.join(crate::pki::AGENT_CERT)).unwrap().map(Result::unwrap);
        let key = PrivateKeyDer::from_pem_file(dir.join(crate::pki::AGENT_KEY)).unwrap();
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_client_cert_verifier(verifier.unwrap())
            .with_single_cert(chain.collect(), key)
            .unwrap();
        config.alpn_protocols = vec![b"h2".to_vec()];
        tokio_rustls::TlsAcceptor::from(Arc::new(config))
    }

    /// A VMM's hybrid vsock socket with the agent behind it, over mutual TLS when `tls` is given.
    fn hybrid_vsock(path: &Path, tls: Option<tokio_rustls::TlsAcceptor>) {
        let listener = tokio::net::UnixListener::bind(path).unwrap();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let tls = tls.clone();
                tokio::spawn(async move {
                    let mut line = Vec::new();
                    let mut byte = [0u8];
                    while stream.read(&mut byte).await.unwrap() == 1 && byte[0] != b'\n' {
                        line.push(byte[0]);
                    }
                    assert_eq!(line, b"CONNECT 7443");
                    stream.write_all(b"OK 1073741824\n").await.unwrap();
                    match tls {
                        Some(tls) => fake_agent(tls.accept(stream).await.unwrap(), "agent behind TLS").await,
                        None => fake_agent(stream, "plaintext agent").await,
                    }
                });
            }
        });
    }

    #[tokio::test]
    async fn calls_reach_the_agent_over_hybrid_vsock() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vm.vsock");
        hybrid_vsock(&path, None);
        let address: AgentAddress = format!("hvsock://{}:7443", path.display()).parse().unwrap();
        let client = AgentClient::connect(address).unwrap();
        assert_eq!(answered_by(&client).await, "plaintext agent");
    }

    /// A guest whose vsock driver is not up swallows CONNECT: the call ends, bounded, with the transport's sentence.
    #[tokio::test]
    async fn a_silent_guest_is_a_bounded_named_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vm.vsock");
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((stream, _)) = listener.accept().await {
                held.push(stream);
            }
        });
        let address = AgentAddress::HybridVsock { path, port: 7443 };
        let client = Dialer::new().with_connect_timeout(QUICK).connect(address).unwrap();
        let err = client.agent_info().await.unwrap_err();
        assert!(matches!(err, ClientError::Dial(DialError::Silent { .. })), "{err:?}");
        assert!(err.to_string().contains("did not answer CONNECT within 500ms (3 attempts)"), "{err}");
    }

    /// tonic's TLS runs on top of any transport; the agent is verified by the name all agents' certificates carry.
    #[tokio::test]
    async fn mutual_tls_runs_inside_hybrid_vsock() {
        let dir = tempfile::tempdir().unwrap();
        let tls = pki(dir.path());
        let path = dir.path().join("vm.vsock");
        hybrid_vsock(&path, Some(acceptor(dir.path())));
        let address = AgentAddress::HybridVsock { path: path.clone(), port: 7443 };
        let client = AgentClient::connect_with(address.clone(), Some(&tls)).unwrap();
        assert_eq!(answered_by(&client).await, "agent behind TLS");
        let elsewhere = TlsFiles { server_name: Some("other-name".into()), ..tls };
        let refused = AgentClient::connect_with(address, Some(&elsewhere)).unwrap().agent_info().await.unwrap_err();
        assert!(matches!(refused, ClientError::TlsRefused(_)), "{refused:?}");
        let text = refused.to_string();
        assert!(
            text.contains(&format!("refused the agent's certificate at hvsock://{}:7443", path.display())),
            "{text}"
        );
    }

    /// KubeVirt's subresource as virt-api serves it: a websocket upgrade with subprotocol plain.kubevirt.io whose
    /// binary messages carry the guest's stream, or a `metav1.Status` refusal. Behind it, the agent; each accepted
    /// upgrade's query is sent on `queries`.
    async fn virt_api(queries: tokio::sync::mpsc::UnboundedSender<String>) -> kube::Client {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let queries = queries.clone();
                let service = hyper::service::service_fn(move |mut request: http::Request<hyper::body::Incoming>| {
                    let queries = queries.clone();
                    async move {
                        let path = request.uri().path().to_string();
                        if !path.starts_with(
                            "/apis/subresources.kubevirt.io/v1/namespaces/ns1/virtualmachineinstances/vm1/",
                        ) {
                            let status =
                                serde_json::json!({"kind": "Status", "code": 400, "message": "VSOCK is not attached."});
                            return http::Response::builder().status(400).body(status.to_string());
                        }
                        let headers = request.headers();
                        assert_eq!(headers[header_name("sec-websocket-protocol")], PLAIN_PROTOCOL);
                        assert_eq!(headers[header_name("upgrade")], "websocket");
                        let accept = derive_accept_key(headers[header_name("sec-websocket-key")].as_bytes());
                        queries.send(request.uri().query().unwrap_or_default().to_string()).unwrap();
                        let upgrade = hyper::upgrade::on(&mut request);
                        tokio::spawn(async move {
                            use async_tungstenite::tokio::TokioAdapter;
                            let upgraded = TokioIo::new(upgrade.await.unwrap());
                            let socket = async_tungstenite::WebSocketStream::from_raw_socket(
                                TokioAdapter::new(upgraded),
                                async_tungstenite::tungstenite::protocol::Role::Server,
                                None,
                            )
                            .await;
                            fake_agent(ws_stream_tungstenite::WsStream::new(socket), "agent behind KubeVirt").await;
                        });
                        http::Response::builder()
                            .status(101)
                            .header("connection", "Upgrade")
                            .header("upgrade", "websocket")
                            .header("sec-websocket-accept", accept)
                            .header("sec-websocket-protocol", PLAIN_PROTOCOL)
                            .body(String::new())
                    }
                });
                tokio::spawn(
                    hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .with_upgrades(),
                );
            }
        });
        kube::Client::try_from(kube::Config::new(url.parse().unwrap())).unwrap()
    }

    fn header_name(name: &'static str) -> http::HeaderName {
        http::HeaderName::from_static(name)
    }

    #[tokio::test]
    async fn calls_reach_the_agent_over_kubevirts_vsock_subresource() {
        let (queries, mut asked) = tokio::sync::mpsc::unbounded_channel();
        let kube = virt_api(queries).await;
        let dialer = Dialer::new().with_kube(kube).with_connect_timeout(QUICK);
        // With virt-handler's TLS toward the guest, this client speaks plaintext inside: its TLS files are unused.
        let dir = tempfile::tempdir().unwrap();
        let tls = pki(dir.path());
        let address: AgentAddress = "kubevirt://ns1/vm1:818?tls=kubevirt".parse().unwrap();
        let client = dialer.clone().with_tls(Some(tls)).connect(address).unwrap();
        assert_eq!(answered_by(&client).await, "agent behind KubeVirt");
        assert_eq!(asked.recv().await.unwrap(), "port=818&tls=true");
        let client = dialer.connect("kubevirt://ns1/vm1:7443".parse().unwrap()).unwrap();
        assert_eq!(answered_by(&client).await, "agent behind KubeVirt");
        assert_eq!(asked.recv().await.unwrap(), "port=7443&tls=false");

        let other = dialer.connect("kubevirt://ns1/vm2:7443".parse().unwrap()).unwrap();
        let err = other.agent_info().await.unwrap_err();
        assert!(matches!(err, ClientError::Dial(DialError::Refused { .. })), "{err:?}");
        assert!(
            err.to_string().starts_with(
                "cannot reach the agent over KubeVirt's vsock subresource of VMI ns1/vm2 (port 7443, tls=false): the \
                 Kubernetes API answered 400 Bad Request: \"VSOCK is not attached.\"; give the VMI"
            ),
            "{err}"
        );
    }

    #[test]
    fn the_subresource_without_a_kubernetes_client_is_a_named_error() {
        let err = AgentClient::connect("kubevirt://ns1/vm1:7443".parse().unwrap()).unwrap_err();
        assert!(matches!(err, ClientError::Target(_)), "{err:?}");
        assert!(err.to_string().contains("has no Kubernetes client"), "{err}");
    }
}
