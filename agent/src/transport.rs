//! The agent's listeners (TCP, vsock, the Unix socket) as one kind of connection for tonic, each connection marked
//! with who is at the other end and how its handshake authenticated them ([`ConnectionInfo`], a request extension
//! through tonic's `Connected`). Who may do what is decided from that mark ([`crate::access::Caller::of`]), never
//! from what a connection lacks: a vsock peer has no IP address, and must not pass for the root-only Unix socket
//! because of it. The mark replaces tonic's `Request::remote_addr` and `Request::peer_certs`, which know TCP only.
//!
//! TLS handshakes are done here rather than inside tonic: tonic drops a failed handshake with a debug line that has
//! no peer address, and a refused client is exactly what an audit trail must show. TCP and vsock share this path,
//! so what is tested over TCP holds for vsock too.

use crate::config::Listen;
use crate::kubevirt::{self, KubeVirtTls};
use crate::tls::ReloadingTls;
use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpSocket, UnixListener};
use tokio::sync::mpsc;
use tokio_rustls::rustls::pki_types::CertificateDer;
use tokio_rustls::rustls::{self, CertificateError};
use tokio_stream::wrappers::ReceiverStream;
use tokio_vsock::{VMADDR_CID_ANY, VsockAddr, VsockListener};
use tonic::Request;
use tonic::transport::server::Connected;

/// Longest a client may take over its handshake: one that stalls would otherwise hold a task forever.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Pending connections per listener, as tokio's `TcpListener::bind` has.
const BACKLOG: u32 = 1024;

/// Who is at the other end of a connection, as the listener that accepted it knows.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Peer {
    /// The root-only Unix socket.
    Local,
    Tcp(SocketAddr),
    /// A vsock peer: its CID (the host is 2) and port.
    Vsock {
        cid: u32,
        port: u32,
    },
}

impl fmt::Display for Peer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Peer::Local => f.write_str("local"),
            Peer::Tcp(addr) => write!(f, "{addr}"),
            Peer::Vsock { cid, port } => write!(f, "vsock:{cid}:{port}"),
        }
    }
}

/// What a connection's TLS handshake proved of the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Auth {
    /// Nothing: no TLS (the Unix socket, plaintext on loopback, a lab's insecure_plaintext).
    None,
    /// A certificate of the agent's client CA (tls_client_ca): its leaf.
    Certificate(CertificateDer<'static>),
    /// KubeVirt's vsock client certificate, verified against KubeVirt's CA: its common name.
    KubeVirt(String),
}

/// The mark of a connection, on every request tonic serves on it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectionInfo {
    pub peer: Peer,
    pub auth: Auth,
}

impl ConnectionInfo {
    /// The mark of `req`'s connection. None only for a request that came through none of the agent's listeners.
    pub fn of<T>(req: &Request<T>) -> Option<&ConnectionInfo> {
        req.extensions().get()
    }
}

/// A byte stream of any listener, plaintext or TLS.
pub(crate) trait Io: AsyncRead + AsyncWrite + Send + Unpin {}

impl<T: AsyncRead + AsyncWrite + Send + Unpin> Io for T {}

/// An accepted connection, marked.
pub struct Connection {
    io: Box<dyn Io>,
    info: ConnectionInfo,
}

impl Connected for Connection {
    type ConnectInfo = ConnectionInfo;

    fn connect_info(&self) -> ConnectionInfo {
        self.info.clone()
    }
}

impl AsyncRead for Connection {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for Connection {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// A bound listener.
pub enum Listener {
    Tcp(TcpListener),
    Vsock(VsockListener),
    /// The root-only Unix socket: its connections are [`Peer::Local`].
    Unix(UnixListener),
}

impl Listener {
    /// Binds a TCP or vsock address; returns the listener and the address as bound (a TCP port 0 resolved).
    pub fn bind(listen: &Listen) -> io::Result<(Listener, Listen)> {
        match *listen {
            Listen::Tcp(addr) => {
                let listener = bind_tcp(addr)?;
                let bound = Listen::Tcp(listener.local_addr()?);
                Ok((Listener::Tcp(listener), bound))
            }
            Listen::Vsock { port } | Listen::KubeVirtVsock { port } => {
                Ok((Listener::Vsock(VsockListener::bind(VsockAddr::new(VMADDR_CID_ANY, port))?), *listen))
            }
        }
    }

    async fn accept(&self) -> io::Result<(Box<dyn Io>, Peer)> {
        Ok(match self {
            Listener::Tcp(listener) => {
                let (stream, addr) = listener.accept().await?;
                (Box::new(stream), Peer::Tcp(addr))
            }
            Listener::Vsock(listener) => {
                let (stream, addr) = listener.accept().await?;
                (Box::new(stream), Peer::Vsock { cid: addr.cid(), port: addr.port() })
            }
            Listener::Unix(listener) => (Box::new(listener.accept().await?.0), Peer::Local),
        })
    }
}

/// An IPv6 address is bound IPv6-only: otherwise `[::]:P` also takes IPv4 (Linux's default,
/// net.ipv6.bindv6only=0), and `0.0.0.0:P` could not be listed beside it.
fn bind_tcp(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = if addr.is_ipv6() {
        let socket = TcpSocket::new_v6()?;
        nix::sys::socket::setsockopt(&socket, nix::sys::socket::sockopt::Ipv6V6Only, &true)?;
        socket
    } else {
        TcpSocket::new_v4()?
    };
    // As tokio's TcpListener::bind does: a restarted agent binds while its old connections are in TIME_WAIT.
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(BACKLOG)
}

/// Why the listeners cannot be started.
#[derive(Debug, thiserror::Error)]
pub enum BindError {
    #[error("cannot listen on {listen}: {source}; is another agent running, or is the address not on this guest?")]
    Tcp { listen: Listen, source: io::Error },
    #[error("cannot listen on {listen}: {source}; is another agent running?")]
    Vsock { listen: Listen, source: io::Error },
    #[error(
        "no listener could be started ({0}) and there is no Unix socket (--no-socket); listen on an address this \
         guest has, or keep the socket"
    )]
    NoneStarted(String),
    #[error("there is nothing to serve on: no listen address and no Unix socket (--no-socket); give --listen")]
    NothingToServe,
}

/// What [`bind_all`] started: the listeners, and the vsock addresses this guest cannot serve yet.
#[derive(Debug)]
pub struct Bound<L> {
    pub listeners: Vec<(L, Listen)>,
    /// Skipped for want of a vsock transport, which can still come: the guest's virtio-vsock driver is a module
    /// that udev may load after the agent started, and a vsock device can be hot-plugged. [`bind_when_available`]
    /// takes each of them up then, as qemu-guest-agent's `--retry-path` waits for its virtio-serial port.
    pub later: Vec<Listen>,
}

/// Binds every listen address. One this guest cannot have (IPv6 on a guest without it, vsock without a vsock
/// device) is skipped with a warning, so that one shipped configuration fits every guest, as long as something
/// else serves: another listener or, when `socket`, the Unix socket. Any other failure is an error.
pub fn bind_all(listen: &[Listen], socket: bool) -> Result<Bound<Listener>, BindError> {
    settle(listen.iter().map(|l| (*l, Listener::bind(l))), has_ipv6(), socket)
}

/// [`bind_all`]'s rule over the results of binding, whatever was bound.
fn settle<L>(
    attempts: impl IntoIterator<Item = (Listen, io::Result<(L, Listen)>)>,
    has_ipv6: bool,
    socket: bool,
) -> Result<Bound<L>, BindError> {
    let mut listeners = Vec::new();
    let mut skipped = Vec::new();
    for (listen, attempt) in attempts {
        match attempt {
            Ok(listener) => listeners.push(listener),
            Err(source) => match missing(&listen, &source, has_ipv6) {
                Some(why) => skipped.push((listen, why, source)),
                None if matches!(listen, Listen::Tcp(_)) => return Err(BindError::Tcp { listen, source }),
                None => return Err(BindError::Vsock { listen, source }),
            },
        }
    }
    if listeners.is_empty() && !socket {
        if skipped.is_empty() {
            return Err(BindError::NothingToServe);
        }
        let all = skipped.iter().map(|(listen, why, e)| format!("{listen}: {why} ({e})")).collect::<Vec<_>>();
        return Err(BindError::NoneStarted(all.join("; ")));
    }
    let mut later = Vec::new();
    for (listen, why, error) in skipped {
        if matches!(listen, Listen::Tcp(_)) {
            tracing::warn!(address = %listen, error = %error, "not listening on this address: {why}");
        } else {
            tracing::warn!(address = %listen, error = %error, "not listening on this address yet: {why}; it is \
                tried again every {VSOCK_RETRY:?} until the vsock device appears");
            later.push(listen);
        }
    }
    Ok(Bound { listeners, later })
}

/// How often a vsock address skipped at start is tried again.
const VSOCK_RETRY: Duration = Duration::from_secs(1);

/// Binds `listen`, a vsock address skipped at start ([`Bound::later`]), once the guest has a vsock transport.
pub async fn bind_when_available(listen: Listen) -> (Listener, Listen) {
    retry_bind(listen, Listener::bind, VSOCK_RETRY).await
}

/// Tries `bind` every `every` until it succeeds. A failure other than a missing transport (the port taken by
/// another program meanwhile, say) is logged when it first happens, and tried again too: the agent serves on
/// its other addresses meanwhile.
async fn retry_bind<L>(
    listen: Listen,
    mut bind: impl FnMut(&Listen) -> io::Result<(L, Listen)>,
    every: Duration,
) -> (L, Listen) {
    let mut said = None;
    loop {
        tokio::time::sleep(every).await;
        match bind(&listen) {
            Ok(bound) => {
                tracing::info!(address = %listen, "the vsock transport appeared: listening on this address now");
                return bound;
            }
            Err(e) if missing(&listen, &e, false).is_some() => {}
            Err(e) => {
                if said.replace(e.kind()) != Some(e.kind()) {
                    tracing::warn!(address = %listen, error = %e, "cannot listen on this address; trying again");
                }
            }
        }
    }
}

/// What the guest lacks when binding `listen` failed with `e`, if that is why.
fn missing(listen: &Listen, e: &io::Error, has_ipv6: bool) -> Option<&'static str> {
    use nix::errno::Errno;
    let errno = Errno::from_raw(e.raw_os_error()?);
    match listen {
        // No AF_INET6 at all (ipv6.disable=1), or IPv6 disabled on every interface (a specific address then
        // cannot be bound). With other IPv6 addresses present, an absent one is a mistake, as for IPv4.
        Listen::Tcp(addr) if addr.is_ipv6() => match errno {
            Errno::EAFNOSUPPORT => Some("this guest has no IPv6"),
            Errno::EADDRNOTAVAIL if !has_ipv6 => Some("this guest has no IPv6"),
            _ => None,
        },
        Listen::Tcp(_) => None,
        Listen::Vsock { .. } | Listen::KubeVirtVsock { .. } => {
            matches!(errno, Errno::EAFNOSUPPORT | Errno::ENODEV | Errno::EADDRNOTAVAIL)
                .then_some("this guest has no vsock device (or AF_VSOCK is not in the unit's RestrictAddressFamilies)")
        }
    }
}

/// Whether any interface of the calling thread's network namespace has an IPv6 address.
fn has_ipv6() -> bool {
    std::fs::read_to_string("/proc/thread-self/net/if_inet6").is_ok_and(|addresses| !addresses.trim().is_empty())
}

/// How a listener secures its connections.
#[derive(Clone)]
pub enum Security {
    Plaintext,
    /// The agent's own mutual TLS (tls_cert, tls_key, tls_client_ca).
    MutualTls(Arc<ReloadingTls>),
    /// KubeVirt's vsock TLS (kubevirt-vsock://): virt-handler is the client.
    KubeVirt(Arc<KubeVirtTls>),
}

/// The connections of `listener`, for tonic's `serve_with_incoming`. Each TLS handshake runs on its own task; a
/// refused one is logged with the peer and why. Errors of `accept` itself go to tonic, which decides (as it does
/// for a plain listener) which of them end the server. Stops accepting when tonic drops the stream.
pub fn incoming(listener: Listener, security: Security) -> ReceiverStream<io::Result<Connection>> {
    let (tx, rx) = mpsc::channel(16);
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                accepted = listener.accept() => accepted,
                () = tx.closed() => return,
            };
            match accepted {
                Ok((io, peer)) => {
                    let (tx, security) = (tx.clone(), security.clone());
                    tokio::spawn(async move {
                        if let Some(connection) = secure(io, peer, &security).await {
                            let _ = tx.send(Ok(connection)).await;
                        }
                    });
                }
                Err(e) => {
                    if tx.send(Err(e)).await.is_err() {
                        return;
                    }
                }
            }
        }
    });
    ReceiverStream::new(rx)
}

/// The connection after its handshake, or None (logged) when the client is refused.
async fn secure(io: Box<dyn Io>, peer: Peer, security: &Security) -> Option<Connection> {
    let (acceptor, client_ca) = match security {
        Security::Plaintext => return Some(Connection { io, info: ConnectionInfo { peer, auth: Auth::None } }),
        Security::MutualTls(tls) => (tls.acceptor(), "the client CA (tls_client_ca)".to_string()),
        Security::KubeVirt(kubevirt) => (kubevirt.acceptor(), kubevirt.ca_name()),
    };
    let reason = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(io)).await {
        Ok(Ok(tls)) => match tls.get_ref().1.peer_certificates().and_then(<[_]>::first).cloned() {
            Some(leaf) => {
                let auth = match security {
                    Security::KubeVirt(_) => Auth::KubeVirt(kubevirt::common_name(&leaf)),
                    _ => Auth::Certificate(leaf),
                };
                return Some(Connection { io: Box::new(tls), info: ConnectionInfo { peer, auth } });
            }
            // Both verifiers make a certificate mandatory; a handshake without one is refused all the same.
            None => "it sent no client certificate".into(),
        },
        Ok(Err(e)) => refusal(&e, &client_ca),
        Err(_) => format!("no TLS handshake within {}s", HANDSHAKE_TIMEOUT.as_secs()),
    };
    tracing::warn!(peer = %peer, reason = %reason, "refused a TLS connection");
    None
}

/// Why a handshake failed, in words an operator reading the log can act on.
fn refusal(e: &io::Error, client_ca: &str) -> String {
    match e.get_ref().and_then(|inner| inner.downcast_ref::<rustls::Error>()) {
        // BadSignature: an issuer of the same name but another key, such as a CA rotated since.
        Some(rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer | CertificateError::BadSignature)) => {
            format!("its client certificate is not signed by {client_ca}")
        }
        // The agent's own sentences (KubeVirt's checks), said as they are.
        Some(rustls::Error::InvalidCertificate(CertificateError::Other(why))) => why.to_string(),
        Some(rustls::Error::NoCertificatesPresented) => "it sent no client certificate".into(),
        Some(rustls::Error::InvalidMessage(_)) => {
            "it does not speak TLS (a plaintext client against the TLS port?)".into()
        }
        Some(other) => other.to_string(),
        None => format!("the connection failed during the handshake: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::errno::Errno;

    fn tcp(addr: &str) -> Listen {
        Listen::Tcp(addr.parse().unwrap())
    }

    fn port_of(bound: &Listen) -> u16 {
        let Listen::Tcp(addr) = bound else { panic!("{bound} is not TCP") };
        addr.port()
    }

    /// `[::]:P` beside `0.0.0.0:P`, in either order, and `[::1]:P` beside `127.0.0.1:P`: IPv6 listeners are
    /// IPv6-only, so a dual-stack configuration lists both families on one port.
    #[tokio::test]
    async fn ipv4_and_ipv6_listen_on_the_same_port() {
        let (_v4, bound) = Listener::bind(&tcp("0.0.0.0:0")).unwrap();
        let port = port_of(&bound);
        let (_v6, bound) = Listener::bind(&tcp(&format!("[::]:{port}"))).expect("[::] beside 0.0.0.0");
        assert_eq!(bound, tcp(&format!("[::]:{port}")));

        let (_v6, bound) = Listener::bind(&tcp("[::]:0")).unwrap();
        let port = port_of(&bound);
        Listener::bind(&tcp(&format!("0.0.0.0:{port}"))).expect("0.0.0.0 beside [::]");

        let (_v4, bound) = Listener::bind(&tcp("127.0.0.1:0")).unwrap();
        let port = port_of(&bound);
        Listener::bind(&tcp(&format!("[::1]:{port}"))).expect("[::1] beside 127.0.0.1");

        let (_taken, bound) = Listener::bind(&tcp("[::]:0")).unwrap();
        let again = Listener::bind(&bound).err().expect("the same IPv6 address twice");
        assert_eq!(again.raw_os_error(), Some(Errno::EADDRINUSE as i32));
    }

    fn failed<L>(errno: Errno) -> io::Result<(L, Listen)> {
        Err(io::Error::from_raw_os_error(errno as i32))
    }

    fn ok(listen: Listen) -> (Listen, io::Result<((), Listen)>) {
        (listen, Ok(((), listen)))
    }

    /// A listener the guest cannot have is skipped while something else serves, and fails the start when nothing
    /// does; every other failure is an error naming the address.
    #[test]
    fn missing_ipv6_or_vsock_is_skipped_while_something_else_serves() {
        let vsock = Listen::Vsock { port: 7443 };
        let kubevirt = Listen::KubeVirtVsock { port: 7444 };
        let any6 = tcp("[::]:7443");
        let attempts = || {
            vec![
                ok(tcp("0.0.0.0:7443")),
                (any6, failed(Errno::EAFNOSUPPORT)),
                (tcp("[::1]:7443"), failed(Errno::EADDRNOTAVAIL)),
                (vsock, failed(Errno::ENODEV)),
                (kubevirt, failed(Errno::EAFNOSUPPORT)),
            ]
        };
        let bound = settle(attempts(), false, false).unwrap();
        assert_eq!(bound.listeners, [((), tcp("0.0.0.0:7443"))]);
        assert_eq!(bound.later, [vsock, kubevirt], "vsock is taken up when it comes; IPv6 is not");

        // With IPv6 on other interfaces, an absent address is the configuration's mistake.
        let err = settle(attempts(), true, false).unwrap_err();
        assert!(matches!(err, BindError::Tcp { listen, .. } if listen == tcp("[::1]:7443")), "{err}");

        // Only the Unix socket is left: it serves.
        let skipped = || vec![(any6, failed::<()>(Errno::EAFNOSUPPORT)), (vsock, failed(Errno::EADDRNOTAVAIL))];
        assert!(settle(skipped(), false, true).unwrap().listeners.is_empty());
        let err = settle(skipped(), false, false).unwrap_err();
        assert!(matches!(err, BindError::NoneStarted(_)), "{err}");
        let text = err.to_string();
        assert!(text.starts_with("no listener could be started ([::]:7443: this guest has no IPv6 ("), "{text}");
        assert!(text.contains("; vsock://7443: this guest has no vsock device"), "{text}");
        assert!(matches!(
            settle(Vec::<(Listen, io::Result<((), Listen)>)>::new(), false, false),
            Err(BindError::NothingToServe)
        ));

        // In use, or refused, is not a missing transport.
        for (listen, errno) in [
            (vsock, Errno::EADDRINUSE),
            (kubevirt, Errno::EACCES),
            (any6, Errno::EADDRINUSE),
            (tcp("10.9.9.9:7443"), Errno::EADDRNOTAVAIL),
            (tcp("10.9.9.9:7443"), Errno::EAFNOSUPPORT),
        ] {
            let err = settle(vec![ok(tcp("127.0.0.1:7443")), (listen, failed(errno))], false, true).unwrap_err();
            assert!(err.to_string().starts_with(&format!("cannot listen on {listen}: ")), "{err}");
        }
    }

    /// The real kernel's answer in a network namespace without IPv6 (a fresh one: `lo` is down and has no
    /// address): `[::1]` cannot be bound, and is skipped because the guest has no IPv6 at all. Needs root.
    #[tokio::test]
    async fn a_guest_without_ipv6_skips_its_ipv6_address() {
        let runtime = tokio::runtime::Handle::current();
        let (bound, ipv6_there) = std::thread::spawn(move || {
            let _runtime = runtime.enter();
            // This thread alone moves to the new namespace; sockets it makes stay in it.
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).expect("a network namespace (run as root)");
            let ipv6 = has_ipv6();
            let attempt = [(tcp("[::1]:0"), Listener::bind(&tcp("[::1]:0")))];
            (settle(attempt, ipv6, true).map(|b| (b.listeners.len(), b.later.len())), ipv6)
        })
        .join()
        .unwrap();
        assert!(!ipv6_there);
        assert_eq!(bound.unwrap(), (0, 0), "skipped for good, the Unix socket serves");
        assert!(has_ipv6(), "this machine has IPv6 ([::1]), so the tests above bind it");
    }

    /// A vsock address skipped at start is bound once the transport is there; a failure of another kind on the
    /// way (the port taken meanwhile) does not end the wait.
    #[tokio::test]
    async fn a_skipped_vsock_address_is_bound_when_the_transport_appears() {
        let vsock = Listen::Vsock { port: 7443 };
        let mut answers = vec![Errno::ENODEV, Errno::EAFNOSUPPORT, Errno::EADDRINUSE, Errno::EADDRINUSE].into_iter();
        let mut attempts = 0;
        let started = std::time::Instant::now();
        let bind = |listen: &Listen| {
            attempts += 1;
            match answers.next() {
                Some(errno) => failed(errno),
                None => Ok(("listener", *listen)),
            }
        };
        let bound = retry_bind(vsock, bind, Duration::from_millis(20)).await;
        assert_eq!(bound, ("listener", vsock));
        assert_eq!(attempts, 5);
        assert!(started.elapsed() >= Duration::from_millis(100), "one attempt every interval");
    }

    #[test]
    fn peers_are_named_for_the_log() {
        assert_eq!(Peer::Vsock { cid: 2, port: 1024 }.to_string(), "vsock:2:1024");
        assert_eq!(Peer::Tcp("[::1]:7443".parse().unwrap()).to_string(), "[::1]:7443");
        assert_eq!(Peer::Local.to_string(), "local");
    }
}
