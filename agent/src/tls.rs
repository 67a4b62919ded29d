//! Mutual TLS for the TCP listeners, with the handshake done here rather than inside tonic: tonic drops a failed
//! handshake with a debug line that has no peer address, and a refused client is exactly what an audit trail must
//! show. tonic still sees the client's certificate (its `TlsConnectInfo`), so `Request::peer_certs` works as before.

use crate::config::TlsFiles;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::server::WebPkiClientVerifier;
use tokio_rustls::rustls::{self, CertificateError, RootCertStore, ServerConfig};
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::ReceiverStream;

/// Longest a client may take over its handshake: one that stalls would otherwise hold a task forever.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

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
}

/// The agent's identity, and the CA every client certificate must chain to (a client without one is refused).
pub fn acceptor(files: &TlsFiles) -> Result<TlsAcceptor, TlsConfigError> {
    let certs = certificates(&files.cert, "certificate")?;
    let key = PrivateKeyDer::from_pem_slice(&read(&files.key)?)
        .map_err(|_| TlsConfigError::NoPem(files.key.clone(), "private key"))?;
    let mut roots = RootCertStore::empty();
    for ca in certificates(&files.client_ca, "CA certificate")? {
        roots.add(ca)?;
    }
    let verifier = WebPkiClientVerifier::builder(roots.into()).build()?;
    let mut config = ServerConfig::builder().with_client_cert_verifier(verifier).with_single_cert(certs, key)?;
    // gRPC is HTTP/2; clients (tonic's among them) insist on it being negotiated.
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
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

/// The TLS connections of `listener`, for tonic's `serve_with_incoming`. Each handshake runs on its own task; a
/// refused one is logged with the peer's address and why. Errors of `accept` itself go to tonic, which decides
/// (as it does for a plain listener) which of them end the server. Stops accepting when tonic drops the stream.
pub fn incoming(listener: TcpListener, acceptor: TlsAcceptor) -> ReceiverStream<io::Result<TlsStream<TcpStream>>> {
    let (tx, rx) = mpsc::channel(16);
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                accepted = listener.accept() => accepted,
                () = tx.closed() => return,
            };
            match accepted {
                Ok((tcp, peer)) => {
                    let (tx, acceptor) = (tx.clone(), acceptor.clone());
                    tokio::spawn(async move {
                        if let Some(tls) = handshake(&acceptor, tcp, peer).await {
                            let _ = tx.send(Ok(tls)).await;
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

async fn handshake(acceptor: &TlsAcceptor, tcp: TcpStream, peer: SocketAddr) -> Option<TlsStream<TcpStream>> {
    let reason = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
        Ok(Ok(tls)) => return Some(tls),
        Ok(Err(e)) => refusal(&e),
        Err(_) => format!("no TLS handshake within {}s", HANDSHAKE_TIMEOUT.as_secs()),
    };
    tracing::warn!(peer = %peer, reason = %reason, "refused a TLS connection");
    None
}

/// Why a handshake failed, in words an operator reading the log can act on.
fn refusal(e: &io::Error) -> String {
    match e.get_ref().and_then(|inner| inner.downcast_ref::<rustls::Error>()) {
        Some(rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer)) => {
            "its client certificate is not signed by the client CA (tls_client_ca)".into()
        }
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

    #[test]
    fn unusable_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let junk = dir.path().join("agent.crt");
        std::fs::write(&junk, "not a certificate\n").unwrap();
        let files = |cert: &Path| TlsFiles { cert: cert.into(), key: junk.clone(), client_ca: junk.clone() };
        let Err(err) = acceptor(&files(&junk)) else { panic!("junk was accepted") };
        assert_eq!(
            err.to_string(),
            format!("the TLS file {} holds no PEM certificate; check that it is the right file", junk.display())
        );
        let missing = dir.path().join("missing.crt");
        let Err(err) = acceptor(&files(&missing)) else { panic!("a missing file was accepted") };
        assert!(err.to_string().starts_with(&format!("cannot read the TLS file {}: ", missing.display())), "{err}");
    }
}
