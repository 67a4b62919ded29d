//! The byte streams that carry gRPC to the agent, one connector per transport: TCP, a Unix socket, vsock (direct
//! AF_VSOCK, or hybrid vsock through a VMM's Unix socket) and KubeVirt's vsock subresource (a websocket through the
//! Kubernetes API). Every attempt is bounded and a failed one is tried again a few times with a backoff (a guest
//! whose vsock driver is not up yet swallows a CONNECT without an answer; an agent restarting refuses for a moment);
//! an answer that retrying cannot change (a refusal by KubeVirt, a socket that does not speak the protocol) ends at
//! once. TLS, when used, is tonic's, on top of these streams.

use crate::address::AgentAddress;
use async_tungstenite::WebSocketStream;
use async_tungstenite::tokio::TokioAdapter;
use async_tungstenite::tungstenite::handshake::client::generate_key;
use async_tungstenite::tungstenite::handshake::derive_accept_key;
use async_tungstenite::tungstenite::protocol::Role;
use http::{StatusCode, header};
use hyper_util::rt::TokioIo;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tonic::transport::Uri;
use ws_stream_tungstenite::WsStream;

/// Attempts to establish one connection.
pub const CONNECT_ATTEMPTS: u32 = 3;
/// The wait after the first failed attempt; doubled after each.
const FIRST_BACKOFF: Duration = Duration::from_millis(250);
/// The longest wait between two attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(1);
/// The longest `OK <port>` line a hybrid vsock backend answers (Firecracker's port numbers fit easily).
const MAX_HYBRID_LINE: usize = 32;
/// The websocket subprotocol of KubeVirt's raw streams (console, vsock).
pub const PLAIN_PROTOCOL: &str = "plain.kubevirt.io";
/// How much of an error answer's body is quoted.
const MAX_QUOTE: usize = 300;

/// A connection to the agent, whatever carries it.
pub trait Duplex: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Duplex for T {}
pub type Stream = Box<dyn Duplex>;

/// Why no connection to the agent could be established; each names the transport and the address.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DialError {
    /// Every attempt failed (no socket, refused, closed, a server error on the way).
    #[error("cannot reach the agent {place}: {reason} ({}); {hint}", attempts_text(*.attempts))]
    Unreachable { place: String, reason: String, attempts: u32, hint: String },
    /// Nothing answered any attempt in time.
    #[error("the agent {place} did not {step} within {timeout:?} ({}); {hint}", attempts_text(*.attempts))]
    Silent { place: String, step: &'static str, timeout: Duration, attempts: u32, hint: String },
    /// An answer that trying again cannot change: refused by KubeVirt, or not the protocol at all.
    #[error("cannot reach the agent {place}: {reason}; {hint}")]
    Refused { place: String, reason: String, hint: String },
}

fn attempts_text(attempts: u32) -> String {
    match attempts {
        1 => "1 attempt".into(),
        n => format!("{n} attempts"),
    }
}

/// How one attempt failed.
enum Failure {
    /// Nothing answered within the attempt's time.
    Silent,
    /// Worth another attempt; `hint` replaces the transport's usual one.
    Retry { reason: String, hint: Option<String> },
    /// Not worth another attempt.
    Final { reason: String, hint: String },
}

impl Failure {
    fn retry(reason: impl Into<String>) -> Self {
        Self::Retry { reason: reason.into(), hint: None }
    }
}

/// What a connector dials, resolved once.
#[derive(Clone)]
enum Target {
    /// `host:port` (an IPv6 host in brackets).
    Tcp(String),
    Unix(PathBuf),
    Vsock {
        cid: u32,
        port: u32,
    },
    Hybrid {
        path: PathBuf,
        port: u32,
    },
    KubeVirt {
        client: kube::Client,
        path: String,
    },
}

/// A connector for one agent address: each call dials anew (tonic calls it for every new connection).
#[derive(Clone)]
pub struct Connector {
    address: AgentAddress,
    target: Target,
    timeout: Duration,
}

/// An address that cannot be dialled as given.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TargetError {
    #[error(
        "the agent {0} is reached through the Kubernetes API, and this caller has no Kubernetes client; give one \
         (wukongctl: --vmi or a kubeconfig), or reach the agent another way"
    )]
    NeedsKube(String),
    #[error("'{0}' names no host to connect to")]
    NoHost(String),
}

impl Connector {
    /// A connector for `address`, each attempt bounded by `timeout`; `kube` is needed for KubeVirt's subresource.
    pub fn new(address: &AgentAddress, kube: Option<&kube::Client>, timeout: Duration) -> Result<Self, TargetError> {
        let target = match address {
            AgentAddress::Tcp(url) => {
                let uri: Uri = url.parse().map_err(|_| TargetError::NoHost(url.clone()))?;
                let host = uri.host().filter(|h| !h.is_empty()).ok_or_else(|| TargetError::NoHost(url.clone()))?;
                let port = uri.port_u16().unwrap_or(if uri.scheme_str() == Some("https") { 443 } else { 80 });
                Target::Tcp(format!("{host}:{port}"))
            }
            AgentAddress::Unix(path) => Target::Unix(path.clone()),
            AgentAddress::Vsock { cid, port } => Target::Vsock { cid: *cid, port: *port },
            AgentAddress::HybridVsock { path, port } => Target::Hybrid { path: path.clone(), port: *port },
            AgentAddress::KubeVirtVsock { namespace, name, port, tls } => Target::KubeVirt {
                client: kube.cloned().ok_or_else(|| TargetError::NeedsKube(address.place()))?,
                path: format!(
                    "/apis/subresources.kubevirt.io/v1/namespaces/{namespace}/virtualmachineinstances/{name}/vsock\
                     ?port={port}&tls={}",
                    tls.query()
                ),
            },
        };
        Ok(Self { address: address.clone(), target, timeout })
    }

    /// The longest a dial can take: every attempt and the waits between them.
    pub fn budget(&self) -> Duration {
        let backoffs: Duration = (0..CONNECT_ATTEMPTS - 1).map(|n| FIRST_BACKOFF * 2u32.pow(n)).sum();
        self.timeout * CONNECT_ATTEMPTS + backoffs
    }

    /// A connection to the agent: at least [`CONNECT_ATTEMPTS`] attempts, and as many more as fit in the time
    /// [`CONNECT_ATTEMPTS`] silent ones would take when the address [`AgentAddress::waits_for_listener`].
    pub async fn connect(&self) -> Result<Stream, DialError> {
        let started = std::time::Instant::now();
        let mut backoff = FIRST_BACKOFF;
        let mut attempt = 1;
        loop {
            let failure = match tokio::time::timeout(self.timeout, self.attempt()).await {
                Ok(Ok(stream)) => return Ok(stream),
                Ok(Err(failure)) => failure,
                Err(_) => Failure::Silent,
            };
            let again = match failure {
                Failure::Retry { .. } => true,
                // Silence over vsock may be a guest whose driver is not up yet; a silent TCP peer (packets dropped)
                // or API server stays silent, and waiting for it again only delays the answer.
                Failure::Silent => matches!(self.target, Target::Vsock { .. } | Target::Hybrid { .. }),
                Failure::Final { .. } => false,
            };
            let more = attempt < CONNECT_ATTEMPTS
                || (self.address.waits_for_listener() && started.elapsed() + backoff < self.timeout * CONNECT_ATTEMPTS);
            if !again || !more {
                return Err(self.error(failure, attempt));
            }
            tracing::debug!(address = %self.address, attempt, "the connection to the agent failed; trying again");
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(MAX_BACKOFF);
            attempt += 1;
        }
    }

    async fn attempt(&self) -> Result<Stream, Failure> {
        let io = |e: std::io::Error| Failure::retry(e.to_string());
        match &self.target {
            Target::Tcp(authority) => {
                let stream = tokio::net::TcpStream::connect(authority).await.map_err(io)?;
                // gRPC's small frames must not wait for Nagle's algorithm.
                stream.set_nodelay(true).map_err(io)?;
                Ok(Box::new(stream))
            }
            Target::Unix(path) => Ok(Box::new(tokio::net::UnixStream::connect(path).await.map_err(io)?)),
            Target::Vsock { cid, port } => {
                let address = tokio_vsock::VsockAddr::new(*cid, *port);
                Ok(Box::new(tokio_vsock::VsockStream::connect(address).await.map_err(io)?))
            }
            Target::Hybrid { path, port } => hybrid_vsock(path, *port).await,
            Target::KubeVirt { client, path } => kubevirt_vsock(client, path).await,
        }
    }

    /// The error of the last attempt, named by transport and address.
    fn error(&self, failure: Failure, attempts: u32) -> DialError {
        let place = self.address.place();
        let (step, hint) = match &self.address {
            AgentAddress::Tcp(_) | AgentAddress::Unix(_) => {
                ("accept the connection", "is wukong-agent running and reachable?".to_string())
            }
            AgentAddress::Vsock { port, .. } => (
                "accept the vsock connection",
                format!(
                    "is the guest up with its vsock driver loaded, its agent listening on vsock port {port}, and this \
                     host's vhost_vsock module loaded?"
                ),
            ),
            AgentAddress::HybridVsock { port, .. } => (
                "answer CONNECT",
                format!("is the guest up and its vsock driver loaded, and does its agent listen on vsock port {port}?"),
            ),
            AgentAddress::KubeVirtVsock { port, .. } => (
                "answer the websocket upgrade",
                format!(
                    "is the Kubernetes API reachable, the VMI running, and its agent listening on vsock port {port}?"
                ),
            ),
        };
        match failure {
            Failure::Silent => DialError::Silent { place, step, timeout: self.timeout, attempts, hint },
            Failure::Retry { reason, hint: better } => {
                DialError::Unreachable { place, reason, attempts, hint: better.unwrap_or(hint) }
            }
            Failure::Final { reason, hint } => DialError::Refused { place, reason, hint },
        }
    }
}

/// Hybrid vsock (Firecracker, Cloud Hypervisor, vhost-device-vsock): `CONNECT <port>\n` on the VMM's Unix socket,
/// answered by `OK <host port>\n`; from then on the socket is the guest's vsock connection.
async fn hybrid_vsock(path: &Path, port: u32) -> Result<Stream, Failure> {
    let mut stream = tokio::net::UnixStream::connect(path).await.map_err(|e| Failure::Retry {
        reason: format!("cannot connect to the Unix socket {}: {e}", path.display()),
        hint: Some("is the VM running with a hybrid vsock device on that socket (its uds-path)?".into()),
    })?;
    let lost = |e: std::io::Error| Failure::retry(format!("the connection broke during CONNECT {port}: {e}"));
    stream.write_all(format!("CONNECT {port}\n").as_bytes()).await.map_err(lost)?;
    // One byte at a time: whatever follows the line is the guest's, and must stay in the socket.
    let mut line = Vec::new();
    loop {
        let mut byte = [0u8];
        if stream.read(&mut byte).await.map_err(lost)? == 0 {
            let got = match line.is_empty() {
                true => String::new(),
                false => format!(" after {:?}", String::from_utf8_lossy(&line)),
            };
            return Err(Failure::Retry {
                reason: format!("the VMM closed the connection without answering CONNECT {port}{got}"),
                hint: Some(format!("is the guest's agent listening on vsock port {port}?")),
            });
        }
        match byte[0] {
            b'\n' => break,
            b => line.push(b),
        }
        if line.len() > MAX_HYBRID_LINE {
            break;
        }
    }
    let answer = String::from_utf8_lossy(&line);
    let ok = answer.strip_prefix("OK ").is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()));
    match ok {
        true => Ok(Box::new(stream)),
        false => Err(Failure::Final {
            reason: format!("the socket answered CONNECT {port} with {answer:?}, not \"OK <port>\""),
            hint: "is it the hybrid vsock socket of a VMM (Firecracker, Cloud Hypervisor, vhost-device-vsock's \
                   uds-path), not its vhost-user socket or another service?"
                .into(),
        }),
    }
}

/// KubeVirt's vsock subresource: a websocket (subprotocol `plain.kubevirt.io`) whose binary messages carry the
/// guest's vsock connection. kube's own `Client::connect` insists on Kubernetes' channel subprotocols, so the upgrade
/// is sent and checked here.
async fn kubevirt_vsock(client: &kube::Client, path: &str) -> Result<Stream, Failure> {
    let key = generate_key();
    let request = http::Request::get(path)
        .header(header::CONNECTION, "Upgrade")
        .header(header::UPGRADE, "websocket")
        .header(header::SEC_WEBSOCKET_VERSION, "13")
        .header(header::SEC_WEBSOCKET_KEY, &key)
        .header(header::SEC_WEBSOCKET_PROTOCOL, PLAIN_PROTOCOL)
        .body(kube::client::Body::from(Vec::new()))
        .map_err(|e| Failure::Final { reason: format!("cannot build the request: {e}"), hint: "report this".into() })?;
    let response = client
        .send(request)
        .await
        .map_err(|e| Failure::retry(format!("the Kubernetes API did not take the request: {e}")))?;
    let status = response.status();
    if status != StatusCode::SWITCHING_PROTOCOLS {
        let body = response.into_body().collect_bytes().await.unwrap_or_default();
        return Err(refusal(status, &body));
    }
    let accept = header_text(response.headers(), header::SEC_WEBSOCKET_ACCEPT);
    let protocol = header_text(response.headers(), header::SEC_WEBSOCKET_PROTOCOL);
    let proxy = "something between here and KubeVirt (a proxy?) does not pass the websocket upgrade through unchanged";
    if accept != Some(derive_accept_key(key.as_bytes())) {
        return Err(Failure::Final {
            reason: "the upgrade's Sec-WebSocket-Accept does not match the key sent".into(),
            hint: proxy.into(),
        });
    }
    if protocol.as_deref() != Some(PLAIN_PROTOCOL) {
        return Err(Failure::Final {
            reason: format!("the upgrade chose subprotocol {protocol:?}, not {PLAIN_PROTOCOL}"),
            hint: proxy.into(),
        });
    }
    let upgraded = hyper::upgrade::on(response)
        .await
        .map_err(|e| Failure::retry(format!("the upgraded connection is not usable: {e}")))?;
    let socket = WebSocketStream::from_raw_socket(TokioAdapter::new(TokioIo::new(upgraded)), Role::Client, None).await;
    Ok(Box::new(WsStream::new(socket)))
}

fn header_text(headers: &http::HeaderMap, name: header::HeaderName) -> Option<String> {
    headers.get(name).map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
}

/// A non-101 answer to the upgrade: its `metav1.Status` message, with what to do.
fn refusal(status: StatusCode, body: &[u8]) -> Failure {
    let message = serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v["message"].as_str().map(str::to_string))
        .unwrap_or_else(|| String::from_utf8_lossy(body).trim().to_string());
    let message: String = message.chars().take(MAX_QUOTE).collect();
    let reason = match message.is_empty() {
        true => format!("the Kubernetes API answered {status}"),
        false => format!("the Kubernetes API answered {status}: {message:?}"),
    };
    let hint = match status.as_u16() {
        // Overloaded or failing on the way (virt-api, virt-handler, the guest not listening yet): try again.
        408 | 429 | 500.. => return Failure::Retry { reason, hint: None },
        400 => {
            "give the VMI spec.domain.devices.autoattachVSOCK: true (KubeVirt's VSOCK feature gate) and restart \
                it, or reach its agent over the network (--agent-transport network)"
        }
        401 | 403 => {
            "this identity needs `get` on virtualmachineinstances/vsock in API group subresources.kubevirt.io \
                      in the VMI's namespace (no KubeVirt role grants it; see the README's RBAC)"
        }
        404 => "does the VMI exist, and does this cluster's KubeVirt serve the vsock subresource (1.1 or later)?",
        _ => "see the Kubernetes API's message",
    };
    Failure::Final { reason, hint: hint.into() }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU32, Ordering};

    const QUICK: Duration = Duration::from_millis(300);

    fn hybrid(path: &Path) -> Connector {
        let address = AgentAddress::HybridVsock { path: path.into(), port: 7443 };
        Connector::new(&address, None, QUICK).unwrap()
    }

    /// A hybrid vsock backend on a Unix socket: each accepted connection is handled by `answer`; counts them.
    fn backend<F, Fut>(path: &Path, answer: F) -> Arc<AtomicU32>
    where
        F: Fn(tokio::net::UnixStream) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let listener = tokio::net::UnixListener::bind(path).unwrap();
        let accepted = Arc::new(AtomicU32::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(answer(stream));
            }
        });
        accepted
    }

    /// Reads the CONNECT line a client sends.
    async fn connect_line(stream: &mut tokio::net::UnixStream) -> String {
        let mut line = Vec::new();
        let mut byte = [0u8];
        while stream.read(&mut byte).await.unwrap() == 1 && byte[0] != b'\n' {
            line.push(byte[0]);
        }
        String::from_utf8(line).unwrap()
    }

    #[tokio::test]
    async fn hybrid_vsock_connects_after_ok_and_keeps_what_follows() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vm.vsock");
        backend(&path, |mut stream| async move {
            assert_eq!(connect_line(&mut stream).await, "CONNECT 7443");
            // The guest's first bytes may arrive with the answer: they belong to the stream.
            stream.write_all(b"OK 1073741824\nhello").await.unwrap();
            let mut echo = [0u8; 4];
            stream.read_exact(&mut echo).await.unwrap();
            stream.write_all(&echo).await.unwrap();
        });
        let mut stream = hybrid(&path).connect().await.unwrap();
        let mut hello = [0u8; 5];
        stream.read_exact(&mut hello).await.unwrap();
        assert_eq!(&hello, b"hello");
        stream.write_all(b"ping").await.unwrap();
        let mut pong = [0u8; 4];
        stream.read_exact(&mut pong).await.unwrap();
        assert_eq!(&pong, b"ping");
    }

    #[tokio::test]
    async fn a_garbage_answer_is_named_and_not_retried() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vm.vsock");
        let accepted = backend(&path, |mut stream| async move {
            connect_line(&mut stream).await;
            stream.write_all(b"HTTP/1.1 400 Bad Request\r\n\r\n").await.unwrap();
        });
        let err = hybrid(&path).connect().await.err().unwrap();
        let text = err.to_string();
        assert!(matches!(err, DialError::Refused { .. }), "{err:?}");
        assert!(text.contains(&format!("at hvsock://{}:7443", path.display())), "{text}");
        assert!(text.contains("answered CONNECT 7443 with \"HTTP/1.1 400 Bad Request\\r\""), "{text}");
        assert_eq!(accepted.load(Ordering::SeqCst), 1, "a wrong socket stays wrong");
    }

    #[tokio::test]
    async fn a_closed_connection_is_retried_then_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vm.vsock");
        let accepted = backend(&path, |mut stream| async move {
            connect_line(&mut stream).await;
        });
        let err = hybrid(&path).connect().await.err().unwrap();
        let text = err.to_string();
        assert!(text.contains("closed the connection without answering CONNECT 7443"), "{text}");
        assert!(text.contains("(3 attempts); is the guest's agent listening on vsock port 7443?"), "{text}");
        assert_eq!(accepted.load(Ordering::SeqCst), CONNECT_ATTEMPTS);
    }

    /// A guest whose agent is not listening yet refuses at once (the backend closes the connection): over vsock
    /// the dial keeps trying within its budget, so an agent that comes up meanwhile is reached.
    #[tokio::test]
    async fn an_agent_that_starts_during_the_dial_is_reached() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vm.vsock");
        let address = AgentAddress::HybridVsock { path: path.clone(), port: 7443 };
        let connector = Connector::new(&address, None, Duration::from_secs(1)).unwrap();
        let refusing = backend(&path, |mut stream| async move {
            connect_line(&mut stream).await;
        });
        let listening = path.clone();
        let up = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(1500)).await;
            std::fs::remove_file(&listening).unwrap();
            backend(&listening, |mut stream| async move {
                connect_line(&mut stream).await;
                stream.write_all(b"OK 1\n").await.unwrap();
                tokio::time::sleep(Duration::from_secs(5)).await;
            })
        });
        connector.connect().await.expect("reached once the agent listens");
        let accepted = up.await.unwrap();
        let refused = refusing.load(Ordering::SeqCst);
        assert!(refused >= CONNECT_ATTEMPTS, "{refused} refusals first: more than a TCP dial would have taken");
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
    }

    /// The trap of hybrid vsock: before the guest's driver is up, a CONNECT is never answered.
    #[tokio::test]
    async fn a_silent_guest_gives_a_bounded_named_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vm.vsock");
        let accepted = backend(&path, |mut stream| async move {
            connect_line(&mut stream).await;
            tokio::time::sleep(Duration::from_secs(3600)).await;
        });
        let connector = hybrid(&path);
        let started = std::time::Instant::now();
        let err = connector.connect().await.err().unwrap();
        assert!(started.elapsed() < connector.budget() + Duration::from_secs(1), "{:?}", started.elapsed());
        assert_eq!(
            err.to_string(),
            format!(
                "the agent at hvsock://{}:7443 did not answer CONNECT within 300ms (3 attempts); is the guest up and \
                 its vsock driver loaded, and does its agent listen on vsock port 7443?",
                path.display()
            )
        );
        assert_eq!(accepted.load(Ordering::SeqCst), CONNECT_ATTEMPTS);
    }

    #[tokio::test]
    async fn a_missing_socket_names_the_socket() {
        let dir = tempfile::tempdir().unwrap();
        let err = hybrid(&dir.path().join("none.vsock")).connect().await.err().unwrap().to_string();
        assert!(err.contains("cannot connect to the Unix socket") && err.contains("none.vsock"), "{err}");
        assert!(err.contains("hybrid vsock device on that socket"), "{err}");
    }

    #[test]
    fn the_subresource_needs_a_kubernetes_client() {
        let address = "kubevirt://prod/pg-0:7443".parse().unwrap();
        let err = Connector::new(&address, None, QUICK).err().unwrap().to_string();
        assert!(err.starts_with("the agent over KubeVirt's vsock subresource of VMI prod/pg-0"), "{err}");
    }

    #[test]
    fn kubevirts_refusals_are_quoted_with_what_to_do() {
        let status = |code: u16, message: &str| {
            let body = serde_json::json!({"kind": "Status", "status": "Failure", "message": message, "code": code});
            match refusal(StatusCode::from_u16(code).unwrap(), body.to_string().as_bytes()) {
                Failure::Final { reason, hint } => format!("{reason}; {hint}"),
                Failure::Retry { reason, .. } => format!("retry: {reason}"),
                Failure::Silent => unreachable!(),
            }
        };
        let not_attached = status(400, "VSOCK is not attached.");
        assert!(not_attached.contains("400 Bad Request: \"VSOCK is not attached.\"; give the VMI"), "{not_attached}");
        let forbidden = status(403, "virtualmachineinstances.subresources.kubevirt.io \"vm\" is forbidden");
        assert!(forbidden.contains("needs `get` on virtualmachineinstances/vsock"), "{forbidden}");
        assert!(status(404, "not found").contains("does the VMI exist"));
        assert!(status(500, "dial failed").starts_with("retry: "));
        let plain = refusal(StatusCode::BAD_GATEWAY, b"upstream down\n");
        assert!(
            matches!(plain, Failure::Retry { reason, .. } if reason.ends_with("502 Bad Gateway: \"upstream down\""))
        );
    }
}
