//! Who is calling, and whether they may change the guest. The root-only Unix socket may always; network callers
//! are identified by their client certificate (mutual TLS), and PrepareDetach/CancelDetach can be closed to all of
//! them (`read_only`) or opened to an allow-list of identities. KubeVirt's vsock subresource (`kubevirt-vsock://`)
//! is not on that list: the API server's RBAC on `virtualmachineinstances/vsock` decided who reaches the agent
//! through it, and only `read_only` closes it.

use crate::config::Access;
use crate::transport::{Auth, ConnectionInfo, Peer};
use tonic::{Request, Status};

/// A caller, as the transport knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// The root-only Unix socket.
    Local,
    /// A network client with a verified certificate; its identities are the subject's common name and DNS names.
    Certified(Vec<String>),
    /// A network client without a certificate (plaintext on loopback, or a lab's --insecure-plaintext).
    Anonymous,
    /// KubeVirt's virt-handler on a kubevirt-vsock:// listener, for whoever the API server let use the VMI's vsock
    /// subresource; its certificate (common name given) verified against KubeVirt's CA.
    KubeVirt(String),
}

impl Caller {
    /// The caller of `req`, from the mark its listener put on the connection. A request without one (it came
    /// through none of the agent's listeners) is anonymous: only the Unix socket's mark makes a caller local.
    pub fn of<T>(req: &Request<T>) -> Self {
        let Some(info) = ConnectionInfo::of(req) else { return Caller::Anonymous };
        match (&info.peer, &info.auth) {
            (Peer::Local, _) => Caller::Local,
            (_, Auth::Certificate(leaf)) => Caller::Certified(identities(leaf)),
            (_, Auth::KubeVirt(name)) => Caller::KubeVirt(name.clone()),
            (_, Auth::None) => Caller::Anonymous,
        }
    }

    fn describe(&self) -> String {
        match self {
            Caller::Local => "the local socket".into(),
            Caller::Certified(ids) => format!("client '{}'", ids.first().map(String::as_str).unwrap_or("?")),
            Caller::Anonymous => "an unauthenticated network client".into(),
            Caller::KubeVirt(_) => self.name(),
        }
    }

    /// The name the audit log gives the caller: its certificate's first identity, or KubeVirt's subresource.
    fn name(&self) -> String {
        match self {
            Caller::Local => "local".into(),
            Caller::Certified(ids) => ids.first().map_or("?", String::as_str).into(),
            Caller::Anonymous => "unauthenticated".into(),
            Caller::KubeVirt(name) => format!("KubeVirt's vsock subresource ({name})"),
        }
    }
}

/// The common name and DNS names of a DER certificate.
fn identities(der: &[u8]) -> Vec<String> {
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(der) else { return Vec::new() };
    let mut ids: Vec<String> =
        cert.subject().iter_common_name().filter_map(|cn| cn.as_str().ok().map(str::to_string)).collect();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            if let x509_parser::extensions::GeneralName::DNSName(dns) = name {
                ids.push(dns.to_string());
            }
        }
    }
    ids
}

/// [`may_change`] for a call to `method`, which would change the guest. A refusal is also logged (who asked, from
/// where, and why) so that an operator can see who tried to release a disk.
pub fn authorize<T>(access: &Access, req: &Request<T>, method: &str) -> Result<(), Status> {
    let caller = Caller::of(req);
    let peer = ConnectionInfo::of(req).map_or_else(|| "unknown".to_string(), |info| info.peer.to_string());
    // Both outcomes are logged: who released a disk matters as much as who was refused.
    match may_change(access, &caller) {
        Ok(()) => {
            tracing::info!(method, client = caller.name(), %peer, "allowed a release");
            Ok(())
        }
        Err(refused) => {
            tracing::warn!(method, client = caller.name(), %peer, reason = refused.message(), "refused a release");
            Err(refused)
        }
    }
}

/// Allows or refuses a mutating call, with a sentence that says what to change.
pub fn may_change(access: &Access, caller: &Caller) -> Result<(), Status> {
    let denied = |why: String| Err(Status::permission_denied(why));
    match caller {
        Caller::Local => Ok(()),
        _ if access.read_only => denied(format!(
            "this agent is read-only for network clients ({} may not release disks); use the local socket, or \
             restart the agent without read_only",
            caller.describe()
        )),
        // The API server's RBAC on virtualmachineinstances/vsock chose who reaches the agent this way; the names of
        // allow_clients are of the agent's own CA and cannot name them.
        Caller::KubeVirt(_) => Ok(()),
        _ if access.allowed_clients.is_empty() => Ok(()),
        Caller::Certified(ids) if ids.iter().any(|id| access.allowed_clients.contains(id)) => Ok(()),
        _ => denied(format!(
            "{} may not release disks; allowed clients: {}",
            caller.describe(),
            access.allowed_clients.join(", ")
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_always_network_as_configured() {
        let open = Access::default();
        let read_only = Access { read_only: true, ..Access::default() };
        let listed = Access { allowed_clients: vec!["operator".into()], ..Access::default() };
        let operator = Caller::Certified(vec!["operator".into()]);
        let viewer = Caller::Certified(vec!["viewer".into(), "viewer.example".into()]);
        for access in [&open, &read_only, &listed] {
            assert!(may_change(access, &Caller::Local).is_ok());
        }
        assert!(may_change(&open, &Caller::Anonymous).is_ok());
        let e = may_change(&read_only, &operator).unwrap_err();
        assert_eq!(e.code(), tonic::Code::PermissionDenied);
        assert!(e.message().starts_with("this agent is read-only for network clients (client 'operator'"), "{e:?}");
        assert!(may_change(&listed, &operator).is_ok());
        let e = may_change(&listed, &viewer).unwrap_err();
        assert_eq!(e.message(), "client 'viewer' may not release disks; allowed clients: operator");
        assert!(may_change(&listed, &Caller::Anonymous).is_err());
    }

    fn request(peer: Peer, auth: Auth) -> Request<()> {
        let mut req = Request::new(());
        req.extensions_mut().insert(ConnectionInfo { peer, auth });
        req
    }

    const VSOCK_PEER: Peer = Peer::Vsock { cid: 2, port: 1234 };

    /// Local is what the Unix socket's listener says, never what a connection lacks: a vsock peer has no IP
    /// address, and a request without any mark came through none of the agent's listeners.
    #[test]
    fn only_the_unix_sockets_connections_are_local() {
        assert_eq!(Caller::of(&request(Peer::Local, Auth::None)), Caller::Local);
        assert_eq!(Caller::of(&request(VSOCK_PEER, Auth::None)), Caller::Anonymous);
        assert_eq!(Caller::of(&request(Peer::Tcp("127.0.0.1:5".parse().unwrap()), Auth::None)), Caller::Anonymous);
        assert_eq!(Caller::of(&Request::new(())), Caller::Anonymous, "unmarked");
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(rcgen::DnType::CommonName, "operator");
        let leaf = params.self_signed(&key).unwrap().der().clone();
        assert_eq!(
            Caller::of(&request(VSOCK_PEER, Auth::Certificate(leaf))),
            Caller::Certified(vec!["operator".into()])
        );
        let kubevirt = Auth::KubeVirt("kubevirt.io:system:client:vsock".into());
        assert_eq!(
            Caller::of(&request(VSOCK_PEER, kubevirt)),
            Caller::KubeVirt("kubevirt.io:system:client:vsock".into())
        );
    }

    /// KubeVirt's subresource is gated by the API server's RBAC, not by allow_clients; read_only closes it too.
    #[test]
    fn kubevirts_subresource_may_release_unless_read_only() {
        let kubevirt = Caller::KubeVirt("kubevirt.io:system:client:vsock".into());
        let listed = Access { allowed_clients: vec!["operator".into()], ..Access::default() };
        assert!(may_change(&Access::default(), &kubevirt).is_ok());
        assert!(may_change(&listed, &kubevirt).is_ok(), "allow_clients does not apply");
        let e = may_change(&Access { read_only: true, ..listed }, &kubevirt).unwrap_err();
        assert_eq!(
            e.message(),
            "this agent is read-only for network clients (KubeVirt's vsock subresource \
             (kubevirt.io:system:client:vsock) may not release disks); use the local socket, or restart the agent \
             without read_only"
        );
    }

    /// What the log says while `during` runs.
    fn logged(during: impl FnOnce()) -> String {
        #[derive(Clone, Default)]
        struct Buffer(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);
        impl std::io::Write for Buffer {
            fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(bytes);
                Ok(bytes.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let buffer = Buffer::default();
        let writer = buffer.clone();
        let subscriber = tracing_subscriber::fmt().with_ansi(false).with_writer(move || writer.clone()).finish();
        tracing::subscriber::with_default(subscriber, during);
        String::from_utf8(buffer.0.lock().unwrap().clone()).unwrap()
    }

    /// An allowed release is logged too, naming who released through which peer.
    #[test]
    fn allowed_releases_name_the_caller_and_peer() {
        let kubevirt = Auth::KubeVirt("kubevirt.io:system:client:vsock".into());
        let log = logged(|| authorize(&Access::default(), &request(VSOCK_PEER, kubevirt), "PrepareDetach").unwrap());
        assert!(
            log.contains(
                "allowed a release method=\"PrepareDetach\" client=\"KubeVirt's vsock subresource \
                 (kubevirt.io:system:client:vsock)\" peer=vsock:2:1234"
            ),
            "{log}"
        );
    }

    /// The audit line of a refused release names the caller and the peer, a vsock one by its CID and port.
    #[test]
    fn refused_releases_name_the_vsock_peer() {
        let read_only = Access { read_only: true, ..Access::default() };
        let log = logged(|| {
            authorize(&read_only, &request(VSOCK_PEER, Auth::None), "PrepareDetach").unwrap_err();
        });
        assert!(log.contains("refused a release"), "{log}");
        assert!(log.contains("client=\"unauthenticated\" peer=vsock:2:1234"), "{log}");
        let kubevirt = Auth::KubeVirt("kubevirt.io:system:client:vsock".into());
        let log = logged(|| {
            authorize(&read_only, &request(VSOCK_PEER, kubevirt), "CancelDetach").unwrap_err();
        });
        assert!(
            log.contains(
                "method=\"CancelDetach\" client=\"KubeVirt's vsock subresource (kubevirt.io:system:client:vsock)\" \
                 peer=vsock:2:1234"
            ),
            "{log}"
        );
        let log = logged(|| {
            authorize(&read_only, &Request::new(()), "PrepareDetach").unwrap_err();
        });
        assert!(log.contains("client=\"unauthenticated\" peer=unknown"), "{log}");
    }

    #[test]
    fn identities_are_the_common_name_and_dns_names() {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(vec!["op.example".to_string()]).unwrap();
        params.distinguished_name.push(rcgen::DnType::CommonName, "operator");
        let cert = params.self_signed(&key).unwrap();
        assert_eq!(identities(cert.der()), ["operator", "op.example"]);
        assert!(identities(b"not a certificate").is_empty());
    }
}
