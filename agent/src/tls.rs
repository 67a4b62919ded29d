//! The agent's own mutual TLS (tls_cert, tls_key, tls_client_ca), served on its TCP and vsock listeners; the
//! handshake itself is done in [`crate::transport`], which logs every refused one. The files are read again when they
//! change (a renewed certificate needs no restart): each new connection is served with the files as they were when
//! it arrived; a broken replacement keeps the last good ones, said in the log.

use crate::config::TlsFiles;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::SystemTime;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::crypto::CryptoProvider;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::server::WebPkiClientVerifier;
use tokio_rustls::rustls::sign::{CertifiedKey, SingleCertAndKey};
use tokio_rustls::rustls::{self, RootCertStore, ServerConfig};

/// Why the TLS files cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsConfigError {
    #[error("cannot read the TLS file {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error("the TLS file {0} holds no PEM {1}; check that it is the right file")]
    NoPem(PathBuf, &'static str),
    #[error(
        "the TLS configuration is not usable: {0}; check that the certificate, its key and the client CA belong together"
    )]
    Rejected(#[from] rustls::Error),
    #[error("the client CA is not usable: {0}; check that --tls-client-ca is a CA certificate")]
    ClientCa(#[from] rustls::server::VerifierBuilderError),
    #[error("cannot make the self-signed certificate of the kubevirt-vsock listeners: {0}")]
    SelfSigned(#[from] rcgen::Error),
}

/// The cryptography of every TLS server of the agent: ring, as tonic's.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The agent's own certificate, as `GetAgentInfo` reports it so that callers see an expiry coming.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertificateSummary {
    /// The end of its validity, in Unix seconds.
    pub not_after: i64,
    /// Its subject, e.g. `CN=wukong-agent`.
    pub subject: String,
}

/// What identifies a version of a file: a replaced file (renamed into place, or a Kubernetes-style symlink swap)
/// has another inode, one rewritten in place another modification time or length.
type Stamp = [Option<(u64, SystemTime, u64)>; 3];

fn stamp(files: &TlsFiles) -> Stamp {
    use std::os::unix::fs::MetadataExt;
    [&files.cert, &files.key, &files.client_ca].map(|path| {
        std::fs::metadata(path).ok().map(|m| (m.ino(), m.modified().unwrap_or(SystemTime::UNIX_EPOCH), m.len()))
    })
}

/// The TLS files, loaded, and read again when they change.
pub struct ReloadingTls {
    files: TlsFiles,
    current: Mutex<Loaded>,
}

impl std::fmt::Debug for ReloadingTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReloadingTls").field("files", &self.files).finish_non_exhaustive()
    }
}

/// One usable version of the files.
struct Loaded {
    /// The files' versions last looked at, loaded or not (a broken version is reported once, not per handshake).
    seen: Stamp,
    acceptor: TlsAcceptor,
    certificate: CertificateSummary,
    /// The certificate and key alone, which kubevirt-vsock listeners present too (with KubeVirt's client CA).
    key: Arc<CertifiedKey>,
}

impl ReloadingTls {
    /// Loads the files; at start a broken file is an error (the agent does not run without its identity).
    pub fn new(files: TlsFiles) -> Result<Self, TlsConfigError> {
        let loaded = load(&files, stamp(&files))?;
        Ok(Self { files, current: Mutex::new(loaded) })
    }

    /// The acceptor for a new connection, from the files as they are now if they changed and are usable.
    pub fn acceptor(&self) -> TlsAcceptor {
        self.refresh().acceptor.clone()
    }

    /// The certificate new connections are served with.
    pub fn certificate(&self) -> CertificateSummary {
        self.refresh().certificate.clone()
    }

    /// The certificate and key new connections are served with.
    pub fn certified_key(&self) -> Arc<CertifiedKey> {
        self.refresh().key.clone()
    }

    fn refresh(&self) -> MutexGuard<'_, Loaded> {
        let mut current = self.current.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let now = stamp(&self.files);
        if now != current.seen {
            current.seen = now;
            match load(&self.files, now) {
                Ok(loaded) => {
                    tracing::info!(
                        cert = %self.files.cert.display(),
                        subject = %loaded.certificate.subject,
                        not_after = loaded.certificate.not_after,
                        "TLS files changed: new connections use the new certificate"
                    );
                    *current = loaded;
                }
                Err(e) => tracing::warn!(
                    error = %e,
                    subject = %current.certificate.subject,
                    not_after = current.certificate.not_after,
                    "TLS files changed but cannot be used: still serving the previous certificate"
                ),
            }
        }
        current
    }
}

/// The agent's identity, and the CA every client certificate must chain to (a client without one is refused).
fn load(files: &TlsFiles, seen: Stamp) -> Result<Loaded, TlsConfigError> {
    let provider = provider();
    let certs = certificates(&files.cert, "certificate")?;
    let certificate =
        summary(&certs[0]).ok_or_else(|| TlsConfigError::NoPem(files.cert.clone(), "X.509 certificate"))?;
    let key = PrivateKeyDer::from_pem_slice(&read(&files.key)?)
        .map_err(|_| TlsConfigError::NoPem(files.key.clone(), "private key"))?;
    let key = Arc::new(CertifiedKey::from_der(certs, key, &provider)?);
    let mut roots = RootCertStore::empty();
    for ca in certificates(&files.client_ca, "CA certificate")? {
        roots.add(ca)?;
    }
    let verifier = WebPkiClientVerifier::builder_with_provider(roots.into(), provider.clone()).build()?;
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(Arc::new(SingleCertAndKey::from(key.clone())));
    // gRPC is HTTP/2; clients (tonic's among them) insist on it being negotiated.
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Loaded { seen, acceptor: TlsAcceptor::from(Arc::new(config)), certificate, key })
}

fn summary(cert: &CertificateDer<'_>) -> Option<CertificateSummary> {
    let (_, cert) = x509_parser::parse_x509_certificate(cert).ok()?;
    Some(CertificateSummary { not_after: cert.validity().not_after.timestamp(), subject: cert.subject().to_string() })
}

fn read(path: &Path) -> Result<Vec<u8>, TlsConfigError> {
    std::fs::read(path).map_err(|source| TlsConfigError::Read { path: path.to_path_buf(), source })
}

/// Every certificate of a PEM file; none is an error that names the file.
fn certificates(path: &Path, what: &'static str) -> Result<Vec<CertificateDer<'static>>, TlsConfigError> {
    let certs: Vec<_> = CertificateDer::pem_slice_iter(&read(path)?).flatten().collect();
    if certs.is_empty() {
        return Err(TlsConfigError::NoPem(path.to_path_buf(), what));
    }
    Ok(certs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn unusable_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let junk = dir.path().join("agent.crt");
        std::fs::write(&junk, "not a certificate\n").unwrap();
        let files = |cert: &Path| TlsFiles { cert: cert.into(), key: junk.clone(), client_ca: junk.clone() };
        let Err(err) = load(&files(&junk), Stamp::default()) else { panic!("junk was accepted") };
        assert_eq!(
            err.to_string(),
            format!("the TLS file {} holds no PEM certificate; check that it is the right file", junk.display())
        );
        let missing = dir.path().join("missing.crt");
        let Err(err) = load(&files(&missing), Stamp::default()) else { panic!("a missing file was accepted") };
        assert!(err.to_string().starts_with(&format!("cannot read the TLS file {}: ", missing.display())), "{err}");
    }

    /// A CA, and a leaf of it named `name` valid `days` (the agent's, or a client's), written as `stem.crt/.key`.
    struct Ca(rcgen::Issuer<'static, rcgen::KeyPair>);

    impl Ca {
        fn new(dir: &Path) -> Self {
            let key = rcgen::KeyPair::generate().unwrap();
            let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
            params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
            std::fs::write(dir.join("ca.crt"), params.self_signed(&key).unwrap().pem()).unwrap();
            Self(rcgen::Issuer::new(params, key))
        }

        fn leaf(&self, dir: &Path, stem: &str, name: &str, days: i64) -> i64 {
            let key = rcgen::KeyPair::generate().unwrap();
            let mut params = rcgen::CertificateParams::new(vec![name.to_string()]).unwrap();
            params.distinguished_name.push(rcgen::DnType::CommonName, name);
            let not_after = SystemTime::now() + Duration::from_secs(days as u64 * 86400);
            params.not_after = not_after.into();
            let cert = params.signed_by(&key, &self.0).unwrap();
            // Renamed into place, as `wukongctl pki renew` and a kubelet's Secret update do.
            for (ext, text) in [("crt", cert.pem()), ("key", key.serialize_pem())] {
                std::fs::write(dir.join(format!(".{stem}.{ext}")), text).unwrap();
                std::fs::rename(dir.join(format!(".{stem}.{ext}")), dir.join(format!("{stem}.{ext}"))).unwrap();
            }
            not_after.duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs() as i64
        }
    }

    /// One real handshake against `tls` on loopback, through the listeners' accept path: the not-after of the
    /// certificate the agent presented.
    async fn handshake_not_after(tls: &Arc<ReloadingTls>, dir: &Path) -> i64 {
        use crate::transport::{Listener, Security, incoming};
        use tokio::net::{TcpListener, TcpStream};
        use tokio_rustls::rustls::ClientConfig;
        use tokio_stream::StreamExt;
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let mut incoming = incoming(Listener::Tcp(listener), Security::MutualTls(tls.clone()));
        let mut roots = RootCertStore::empty();
        roots.add(certificates(&dir.join("ca.crt"), "CA").unwrap().remove(0)).unwrap();
        let client_certs = certificates(&dir.join("client.crt"), "certificate").unwrap();
        let client_key = PrivateKeyDer::from_pem_slice(&std::fs::read(dir.join("client.key")).unwrap()).unwrap();
        let mut config = ClientConfig::builder()
            .with_root_certificates(roots)
            .with_client_auth_cert(client_certs, client_key)
            .unwrap();
        config.alpn_protocols = vec![b"h2".to_vec()];
        let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
        let tcp = TcpStream::connect(address).await.unwrap();
        let name = rustls::pki_types::ServerName::try_from("wukong-agent").unwrap();
        let (client, server) = tokio::join!(connector.connect(name, tcp), incoming.next());
        server.expect("the listener stopped").expect("the agent accepted");
        let client = client.expect("the client accepted the agent's certificate");
        let presented = client.get_ref().1.peer_certificates().unwrap()[0].clone();
        summary(&presented).unwrap().not_after
    }

    /// A renewed certificate is served from the next handshake and reported; a broken replacement keeps the
    /// previous one in service (and in the report) until a usable one arrives.
    #[tokio::test]
    async fn new_handshakes_use_replaced_files_and_a_broken_replacement_keeps_the_old_ones() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::new(dir.path());
        let first = ca.leaf(dir.path(), "agent", "wukong-agent", 365);
        ca.leaf(dir.path(), "client", "wukong-companion", 365);
        let files = TlsFiles {
            cert: dir.path().join("agent.crt"),
            key: dir.path().join("agent.key"),
            client_ca: dir.path().join("ca.crt"),
        };
        let tls = Arc::new(ReloadingTls::new(files.clone()).unwrap());
        assert_eq!(handshake_not_after(&tls, dir.path()).await, first);
        assert_eq!(tls.certificate(), CertificateSummary { not_after: first, subject: "CN=wukong-agent".into() });

        let renewed = ca.leaf(dir.path(), "agent", "wukong-agent", 20);
        assert_ne!(renewed, first);
        assert_eq!(handshake_not_after(&tls, dir.path()).await, renewed, "the renewed certificate is served");
        assert_eq!(tls.certificate().not_after, renewed);

        // A half-written key (it does not match the certificate) and a junk certificate: the renewed one stays.
        std::fs::write(&files.key, "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n").unwrap();
        assert_eq!(handshake_not_after(&tls, dir.path()).await, renewed);
        std::fs::write(&files.cert, "junk").unwrap();
        assert_eq!(handshake_not_after(&tls, dir.path()).await, renewed);
        assert_eq!(tls.certificate().not_after, renewed);

        let fixed = ca.leaf(dir.path(), "agent", "wukong-agent", 40);
        assert_eq!(handshake_not_after(&tls, dir.path()).await, fixed, "a usable replacement is taken again");
    }
}
