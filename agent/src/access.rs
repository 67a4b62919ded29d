//! Who is calling, and whether they may change the guest. The root-only Unix socket may always; network callers
//! are identified by their client certificate (mutual TLS), and PrepareDetach/CancelDetach can be closed to all of
//! them (`read_only`) or opened to an allow-list of identities.

use crate::config::Access;
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
}

impl Caller {
    pub fn of<T>(req: &Request<T>) -> Self {
        if let Some(certs) = req.peer_certs()
            && let Some(leaf) = certs.first()
        {
            return Caller::Certified(identities(leaf.as_ref()));
        }
        if req.remote_addr().is_some() { Caller::Anonymous } else { Caller::Local }
    }

    fn describe(&self) -> String {
        match self {
            Caller::Local => "the local socket".into(),
            Caller::Certified(ids) => format!("client '{}'", ids.first().map(String::as_str).unwrap_or("?")),
            Caller::Anonymous => "an unauthenticated network client".into(),
        }
    }

    /// The name the audit log gives the caller: its certificate's first identity.
    fn name(&self) -> &str {
        match self {
            Caller::Local => "local",
            Caller::Certified(ids) => ids.first().map(String::as_str).unwrap_or("?"),
            Caller::Anonymous => "unauthenticated",
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
    may_change(access, &caller).inspect_err(|refused| {
        tracing::warn!(
            method,
            client = caller.name(),
            peer = %req.remote_addr().map_or_else(|| "local".to_string(), |a| a.to_string()),
            reason = refused.message(),
            "refused a release"
        )
    })
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
