//! Client of the guest agent: address parsing, connection (TCP or Unix socket), per-call deadlines and retries of
//! idempotent reads.

use hyper_util::rt::TokioIo;
use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
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

/// Where the agent listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AgentAddress {
    /// `http://IP:PORT` or `https://IP:PORT`.
    Tcp(String),
    /// `unix:PATH`.
    Unix(PathBuf),
}

impl FromStr for AgentAddress {
    type Err = ClientError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Some(path) = s.strip_prefix("unix:") {
            let path = path.trim_start_matches("//");
            if path.is_empty() {
                return Err(ClientError::BadAddress(s.to_string()));
            }
            return Ok(Self::Unix(path.into()));
        }
        if s.starts_with("http://") || s.starts_with("https://") {
            let uri: Uri = s.parse().map_err(|_| ClientError::BadAddress(s.to_string()))?;
            if uri.host().is_none() {
                return Err(ClientError::BadAddress(s.to_string()));
            }
            return Ok(Self::Tcp(s.trim_end_matches('/').to_string()));
        }
        Err(ClientError::BadAddress(s.to_string()))
    }
}

impl fmt::Display for AgentAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Tcp(url) => f.write_str(url),
            Self::Unix(path) => write!(f, "unix:{}", path.display()),
        }
    }
}

/// Errors of the agent client.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("'{0}' is not an agent address; use http://IP:PORT (e.g. http://127.0.0.1:7443) or unix:PATH")]
    BadAddress(String),
    #[error("cannot reach the agent at {address}: {reason}; is wukong-agent running and reachable?")]
    Unreachable { address: AgentAddress, reason: String },
    #[error("the agent at {address} did not answer within {timeout:?}")]
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
    /// The files of mutual TLS, to name them when a handshake fails.
    tls: Option<TlsFiles>,
}

impl AgentClient {
    /// Connects to the agent (lazily: the first call establishes the connection).
    pub fn connect(address: AgentAddress) -> Result<Self, ClientError> {
        Self::connect_with(address, None)
    }

    /// Connects to the agent, over mutual TLS when `tls` is given (the address then uses `https`).
    pub fn connect_with(address: AgentAddress, tls: Option<&TlsFiles>) -> Result<Self, ClientError> {
        let channel = match (&address, tls) {
            (AgentAddress::Tcp(url), Some(tls)) => {
                let url = match url.strip_prefix("http://") {
                    Some(rest) => format!("https://{rest}"),
                    None => url.clone(),
                };
                let endpoint = Endpoint::from_shared(url.clone()).map_err(|_| ClientError::BadAddress(url.clone()))?;
                let host = endpoint.uri().host().unwrap_or_default().trim_matches(['[', ']']).to_string();
                let config = ClientTlsConfig::new()
                    .ca_certificate(Certificate::from_pem(read_pem(&tls.ca, Pem::Certificate, "--tls-ca")?))
                    .identity(Identity::from_pem(
                        read_pem(&tls.cert, Pem::Certificate, "--tls-cert")?,
                        read_pem(&tls.key, Pem::Key, "--tls-key")?,
                    ))
                    .domain_name(tls.server_name.clone().unwrap_or(host));
                let address = AgentAddress::Tcp(url);
                let channel = endpoint
                    .tls_config(config)
                    .map_err(|e| ClientError::Tls(format!("the TLS files are not usable: {e}")))?
                    .connect_timeout(DEFAULT_CONNECT_TIMEOUT)
                    .connect_lazy();
                return Ok(Self {
                    address,
                    inner: DiskAgentClient::new(channel),
                    call_timeout: DEFAULT_CALL_TIMEOUT,
                    tls: Some(tls.clone()),
                });
            }
            (AgentAddress::Tcp(url), None) if url.starts_with("https://") => {
                return Err(ClientError::Tls(format!(
                    "{url} needs TLS: give the CA, client certificate and key (--tls-ca, --tls-cert, --tls-key)"
                )));
            }
            (AgentAddress::Tcp(url), None) => Endpoint::from_shared(url.clone())
                .map_err(|_| ClientError::BadAddress(url.clone()))?
                .connect_timeout(DEFAULT_CONNECT_TIMEOUT)
                .connect_lazy(),
            (AgentAddress::Unix(path), _) => {
                let path = path.clone();
                // The URI is required by the API but unused: the connector below dials the socket.
                Endpoint::from_static("http://agent.invalid")
                    .connect_timeout(DEFAULT_CONNECT_TIMEOUT)
                    .connect_with_connector_lazy(tower::service_fn(move |_: Uri| {
                        let path = path.clone();
                        async move { tokio::net::UnixStream::connect(path).await.map(TokioIo::new) }
                    }))
            }
        };
        Ok(Self { address, inner: DiskAgentClient::new(channel), call_timeout: DEFAULT_CALL_TIMEOUT, tls: None })
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

    /// Runs an idempotent read, retrying while the agent is unreachable (e.g. restarting).
    async fn read<T, F, Fut>(&self, call: F) -> Result<T, ClientError>
    where
        F: Fn(DiskAgentClient<Channel>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, Status>>,
    {
        let mut delay = Duration::from_millis(200);
        let mut attempt = 1;
        loop {
            match call(self.inner.clone()).await {
                Ok(resp) => return Ok(resp.into_inner()),
                Err(status) => {
                    let err = self.map_status(status, self.call_timeout).await;
                    if attempt >= READ_ATTEMPTS || !matches!(err, ClientError::Unreachable { .. }) {
                        return Err(err);
                    }
                    tracing::debug!(attempt, error = %err, "agent unreachable; retrying the read");
                    tokio::time::sleep(delay).await;
                    delay *= 2;
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
    /// so the agent's own DEADLINE_EXCEEDED (with its explanation) arrives first.
    pub async fn wait_for_disk(&self, serial: &str, timeout: Duration) -> Result<Disk, ClientError> {
        let deadline = timeout + Duration::from_secs(5);
        let msg = WaitForDiskRequest { serial: serial.to_string(), timeout: timeout.try_into().ok() };
        let req = self.request(msg, deadline);
        self.once(deadline, |mut c| async move { c.wait_for_disk(req).await }).await
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
    match tls {
        Some(tls) if reason.contains("invalid peer certificate: UnknownIssuer") => Some(format!(
            "this client refused the agent's certificate at {address}: the agent's certificate is not signed by the \
             CA in {} (--tls-ca); give the CA that signed it",
            tls.ca.display()
        )),
        Some(tls) if reason.contains("invalid peer certificate") => Some(format!(
            "this client refused the agent's certificate at {address} ({reason}); check --tls-ca {} and, when the \
             certificate names another host, --tls-server-name",
            tls.ca.display()
        )),
        Some(_) if reason.contains("InvalidContentType") || reason.contains("corrupt message") => Some(format!(
            "the agent at {address} does not speak TLS (it answered in plaintext); drop --tls-ca, --tls-cert and \
             --tls-key, or give the agent its TLS files"
        )),
        // TLS 1.3 checks the client's certificate after the client has finished: a refusal then arrives as an
        // alert, or as a closed connection on the first request from a server that does speak TLS.
        Some(tls) if reason.contains("fatal alert") || speaks_tls => Some(format!(
            "the agent at {address} refused this client's certificate ({}) during the TLS handshake ({reason}); it \
             must be signed by the CA the agent trusts (its tls_client_ca)",
            tls.cert.display()
        )),
        None if speaks_tls => Some(format!(
            "the agent at {address} speaks TLS and closed this plaintext connection ({reason}), as an agent \
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

    #[test]
    fn parses_addresses() {
        assert_eq!("unix:/run/a.sock".parse::<AgentAddress>().unwrap(), AgentAddress::Unix("/run/a.sock".into()));
        assert_eq!("unix:///run/a.sock".parse::<AgentAddress>().unwrap(), AgentAddress::Unix("/run/a.sock".into()));
        assert_eq!(
            "http://127.0.0.1:7443/".parse::<AgentAddress>().unwrap(),
            AgentAddress::Tcp("http://127.0.0.1:7443".into())
        );
        for bad in ["", "unix:", "127.0.0.1:7443", "ftp://x", "http://"] {
            assert!(matches!(bad.parse::<AgentAddress>(), Err(ClientError::BadAddress(_))), "{bad}");
        }
    }

    #[tokio::test]
    async fn unreachable_agent_is_a_named_error() {
        let dir = tempfile::tempdir().unwrap();
        let addr = AgentAddress::Unix(dir.path().join("none.sock"));
        let client = AgentClient::connect(addr).unwrap();
        let err = client.agent_info().await.unwrap_err();
        assert!(matches!(err, ClientError::Unreachable { .. }), "{err:?}");
        assert!(err.to_string().contains("none.sock"), "{err}");
    }
}
