//! KubeVirt's vsock subresource with `tls=true` (`kubevirt-vsock://PORT`). virt-handler then dials the guest as a
//! TLS 1.3 client that verifies nothing of the guest and presents KubeVirt's vsock client certificate (common name
//! `kubevirt.io:system:client:vsock`, signed by KubeVirt's CA). The agent is the TLS server and verifies that
//! certificate against KubeVirt's CA bundle, which virt-handler serves to guests over vsock (host CID 2, port 1,
//! gRPC `kubevirt.vsock.system.v1.System/CABundle`). The bundle is fetched in the background, with bounded retries,
//! and again every 10 minutes (KubeVirt rotates its CA), keeping the last good one; until one is known, handshakes
//! are refused and logged.

use crate::config::CaSource;
use crate::tls::{self, ReloadingTls, TlsConfigError};
use crate::transport::Io;
use hyper_util::rt::TokioIo;
use std::io;
use std::sync::{Arc, RwLock};
use std::time::Duration;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::client::danger::HandshakeSignatureValid;
use tokio_rustls::rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use tokio_rustls::rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use tokio_rustls::rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use tokio_rustls::rustls::sign::CertifiedKey;
use tokio_rustls::rustls::{
    self, CertificateError, DigitallySignedStruct, DistinguishedName, OtherError, RootCertStore, ServerConfig,
    SignatureScheme,
};
use tonic::transport::{Endpoint, Uri};
use wukong_proto::kubevirt_system::EmptyRequest;
use wukong_proto::kubevirt_system::system_client::SystemClient;

/// What the client certificate's common name must start with, as KubeVirt's example guest agent requires.
pub const CLIENT_NAME_PREFIX: &str = "kubevirt.io:system:client";
/// How often a known bundle is fetched again.
const REFRESH: Duration = Duration::from_secs(600);
/// How soon a failed round is tried again while no bundle is known: a guest's vsock driver may come up late.
const RETRY_WITHOUT_CA: Duration = Duration::from_secs(60);
/// Tries per round, the first at once, then 1 s apart, doubling.
const ATTEMPTS: u32 = 5;
/// Longest one fetch may take: a connection to a vsock device whose driver is not up hangs.
const FETCH_TIMEOUT: Duration = Duration::from_secs(10);

/// Why KubeVirt's CA bundle could not be fetched.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("cannot connect to KubeVirt's CA service at {0}: {1}; is this a KubeVirt VM with autoattachVSOCK?")]
    Connect(CaSource, io::Error),
    #[error("KubeVirt's CA service at {0} failed: {1}")]
    Call(CaSource, String),
    #[error("KubeVirt's CA service at {0} did not answer within {secs}s", secs = FETCH_TIMEOUT.as_secs())]
    Timeout(CaSource),
    #[error("the CA bundle from {0} holds no PEM certificate")]
    NotPem(CaSource),
    #[error("the CA bundle from {0} cannot be used: {1}")]
    Unusable(CaSource, String),
}

/// Why a client certificate that chains to KubeVirt's CA is still not KubeVirt's vsock client.
#[derive(Debug, thiserror::Error)]
enum Refusal {
    #[error("KubeVirt's CA bundle is not known yet (it is fetched from {0}; see the log for why it is not)")]
    NoCa(CaSource),
    #[error("its certificate is not for client authentication (no clientAuth extended key usage)")]
    NotForClients,
    #[error("its certificate's common name {0:?} does not start with {CLIENT_NAME_PREFIX}")]
    NotKubeVirt(String),
}

impl From<Refusal> for rustls::Error {
    fn from(refusal: Refusal) -> Self {
        rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(refusal))))
    }
}

/// The TLS server of the kubevirt-vsock listeners, and the CA bundle it verifies clients with.
pub struct KubeVirtTls {
    ca: Arc<Ca>,
    acceptor: TlsAcceptor,
}

impl KubeVirtTls {
    /// Its certificate is the agent's own when configured (`identity`, read again when the files change), else a
    /// self-signed one made now: virt-handler does not verify the guest, so nothing would check a better one.
    pub fn new(source: CaSource, identity: Option<Arc<ReloadingTls>>) -> Result<Self, TlsConfigError> {
        let provider = tls::provider();
        let certificate = match identity {
            Some(files) => ServerCert::Files(files),
            None => ServerCert::SelfSigned(self_signed(&provider)?),
        };
        let ca = Arc::new(Ca { source, provider: provider.clone(), current: RwLock::new(None) });
        let verifier =
            KubeVirtClientVerifier { ca: ca.clone(), algorithms: provider.signature_verification_algorithms };
        // TLS 1.3, as virt-handler speaks it. No ALPN: the gRPC client behind virt-handler speaks HTTP/2 whatever
        // this TLS negotiates, and a protocol list would refuse a virt-handler that offers another.
        let config = ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_client_cert_verifier(Arc::new(verifier))
            .with_cert_resolver(Arc::new(certificate));
        Ok(Self { ca, acceptor: TlsAcceptor::from(Arc::new(config)) })
    }

    pub fn acceptor(&self) -> TlsAcceptor {
        self.acceptor.clone()
    }

    /// The CA clients must be signed by, as refusals name it.
    pub fn ca_name(&self) -> String {
        format!("KubeVirt's CA (fetched from {})", self.ca.source)
    }

    /// Where the bundle is fetched from.
    pub fn ca_source(&self) -> &CaSource {
        &self.ca.source
    }

    /// Whether a bundle is known (handshakes are refused until one is).
    pub fn has_ca(&self) -> bool {
        self.ca.current().is_some()
    }

    /// Fetches the bundle once and verifies clients against it from now on; true when it changed.
    pub async fn refresh(&self) -> Result<bool, CaError> {
        let certificates = fetch(&self.ca.source).await?;
        self.ca.install(certificates)
    }

    /// Keeps the bundle current for as long as it runs: a round of up to [`ATTEMPTS`] fetches with backoff, then
    /// the next round in 10 minutes (1 while no bundle is known). A failed round keeps the last good bundle.
    pub async fn keep_current(self: Arc<Self>) {
        let source = &self.ca.source;
        loop {
            match self.refresh_with_retries().await {
                Ok(true) => tracing::info!(
                    source = %source,
                    certificates = self.ca.current().map_or(0, |b| b.certificates.len()),
                    "KubeVirt's CA bundle fetched: kubevirt-vsock clients are verified against it"
                ),
                Ok(false) => tracing::debug!(source = %source, "KubeVirt's CA bundle is unchanged"),
                Err(e) if self.has_ca() => tracing::warn!(
                    error = %e,
                    "cannot refresh KubeVirt's CA bundle: kubevirt-vsock clients are still verified against the last \
                     one fetched"
                ),
                Err(e) => tracing::warn!(
                    error = %e,
                    "cannot fetch KubeVirt's CA bundle: kubevirt-vsock connections are refused until it is fetched"
                ),
            }
            tokio::time::sleep(if self.has_ca() { REFRESH } else { RETRY_WITHOUT_CA }).await;
        }
    }

    async fn refresh_with_retries(&self) -> Result<bool, CaError> {
        let (mut attempt, mut backoff) = (1, Duration::from_secs(1));
        loop {
            match self.refresh().await {
                Err(e) if attempt < ATTEMPTS => {
                    tracing::debug!(attempt, error = %e, "KubeVirt's CA bundle not fetched; trying again");
                    tokio::time::sleep(backoff).await;
                    (attempt, backoff) = (attempt + 1, backoff * 2);
                }
                result => return result,
            }
        }
    }
}

/// KubeVirt's CA bundle, once fetched.
#[derive(Debug)]
struct Ca {
    source: CaSource,
    provider: Arc<CryptoProvider>,
    current: RwLock<Option<Arc<Bundle>>>,
}

#[derive(Debug)]
struct Bundle {
    certificates: Vec<CertificateDer<'static>>,
    /// The chain and validity check, webpki's.
    verifier: Arc<dyn ClientCertVerifier>,
}

impl Ca {
    fn current(&self) -> Option<Arc<Bundle>> {
        self.current.read().unwrap_or_else(|poisoned| poisoned.into_inner()).clone()
    }

    /// Verifies clients against `certificates` from now on (a bundle that cannot be used leaves the last one);
    /// true when they differ from the bundle before.
    fn install(&self, certificates: Vec<CertificateDer<'static>>) -> Result<bool, CaError> {
        if self.current().is_some_and(|bundle| bundle.certificates == certificates) {
            return Ok(false);
        }
        let unusable = |e: &dyn std::fmt::Display| CaError::Unusable(self.source.clone(), e.to_string());
        let mut roots = RootCertStore::empty();
        for certificate in &certificates {
            roots.add(certificate.clone()).map_err(|e| unusable(&e))?;
        }
        let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), self.provider.clone())
            .build()
            .map_err(|e| unusable(&e))?;
        let bundle = Arc::new(Bundle { certificates, verifier });
        *self.current.write().unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(bundle);
        Ok(true)
    }
}

/// Fetches KubeVirt's CA bundle from `source`: its certificates, at least one.
pub async fn fetch(source: &CaSource) -> Result<Vec<CertificateDer<'static>>, CaError> {
    let call = async {
        let stream = connect(source).await.map_err(|e| CaError::Connect(source.clone(), e))?;
        let mut stream = Some(stream);
        // The URI is required by the API but unused: the connector hands over the stream connected above, whose
        // errors say more than the channel's.
        let channel = Endpoint::from_static("http://kubevirt-ca.invalid")
            .connect_with_connector(tower::service_fn(move |_: Uri| {
                let stream = stream.take().ok_or_else(|| io::Error::other("the connection was used already"));
                async move { stream.map(TokioIo::new) }
            }))
            .await
            .map_err(|e| CaError::Call(source.clone(), crate::error_chain::error_chain(&e)))?;
        let bundle = SystemClient::new(channel)
            .ca_bundle(EmptyRequest {})
            .await
            .map_err(|status| CaError::Call(source.clone(), format!("{:?}: {}", status.code(), status.message())))?;
        Ok(bundle.into_inner().raw)
    };
    let raw = tokio::time::timeout(FETCH_TIMEOUT, call).await.map_err(|_| CaError::Timeout(source.clone()))??;
    let certificates = CertificateDer::pem_slice_iter(&raw).collect::<Result<Vec<_>, _>>();
    match certificates {
        Ok(certificates) if !certificates.is_empty() => Ok(certificates),
        _ => Err(CaError::NotPem(source.clone())),
    }
}

async fn connect(source: &CaSource) -> io::Result<Box<dyn Io>> {
    Ok(match source {
        CaSource::Vsock { cid, port } => {
            Box::new(tokio_vsock::VsockStream::connect(tokio_vsock::VsockAddr::new(*cid, *port)).await?)
        }
        CaSource::Unix(path) => Box::new(tokio::net::UnixStream::connect(path).await?),
    })
}

/// The common name of a KubeVirt vsock client certificate: one for client authentication (the clientAuth extended
/// key usage is required, where webpki would also take a certificate without any) whose common name starts with
/// `kubevirt.io:system:client`. Its chain is checked by the caller.
fn client_name(der: &[u8]) -> Result<String, Refusal> {
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(der) else {
        return Err(Refusal::NotKubeVirt(String::new()));
    };
    if !cert.extended_key_usage().ok().flatten().is_some_and(|eku| eku.value.client_auth) {
        return Err(Refusal::NotForClients);
    }
    let name = first_common_name(&cert);
    if !name.starts_with(CLIENT_NAME_PREFIX) {
        return Err(Refusal::NotKubeVirt(name));
    }
    Ok(name)
}

/// The first common name of a DER certificate, or nothing.
pub fn common_name(der: &[u8]) -> String {
    x509_parser::parse_x509_certificate(der).map(|(_, cert)| first_common_name(&cert)).unwrap_or_default()
}

fn first_common_name(cert: &x509_parser::certificate::X509Certificate<'_>) -> String {
    cert.subject().iter_common_name().find_map(|cn| cn.as_str().ok()).unwrap_or_default().to_string()
}

/// Verifies virt-handler's client certificate: webpki's chain check against the bundle known now, then
/// [`client_name`]'s.
#[derive(Debug)]
struct KubeVirtClientVerifier {
    ca: Arc<Ca>,
    algorithms: WebPkiSupportedAlgorithms,
}

impl ClientCertVerifier for KubeVirtClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        // None: a client that picks its certificate by these names (Go's crypto/tls does with a fixed certificate
        // list) would send none at all after a CA rotation the guest has not fetched yet, and the refusal would
        // say "no certificate" instead of "not signed by KubeVirt's CA".
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let bundle = self.ca.current().ok_or_else(|| Refusal::NoCa(self.ca.source.clone()))?;
        bundle.verifier.verify_client_cert(end_entity, intermediates, now)?;
        client_name(end_entity)?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// The certificate a kubevirt-vsock listener presents.
#[derive(Debug)]
enum ServerCert {
    Files(Arc<ReloadingTls>),
    SelfSigned(Arc<CertifiedKey>),
}

impl ResolvesServerCert for ServerCert {
    fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(match self {
            ServerCert::Files(files) => files.certified_key(),
            ServerCert::SelfSigned(key) => key.clone(),
        })
    }
}

fn self_signed(provider: &CryptoProvider) -> Result<Arc<CertifiedKey>, TlsConfigError> {
    let key = rcgen::KeyPair::generate()?;
    let cert = rcgen::CertificateParams::new(vec![wukong_proto::AGENT_SERVER_NAME.to_string()])?.self_signed(&key)?;
    let key_der = PrivateKeyDer::try_from(key.serialize_der()).map_err(|e| rustls::Error::General(e.to_string()))?;
    Ok(Arc::new(CertifiedKey::from_der(vec![cert.der().clone()], key_der, provider)?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair};
    use tokio_stream::StreamExt;
    use wukong_proto::kubevirt_system::Bundle as PemBundle;
    use wukong_proto::kubevirt_system::system_server::{System, SystemServer};

    /// A CA as KubeVirt's: its PEM, and what it signs.
    struct TestCa {
        pem: String,
        issuer: Issuer<'static, KeyPair>,
    }

    impl TestCa {
        fn new(name: &str) -> Self {
            let key = KeyPair::generate().unwrap();
            let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
            params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            params.distinguished_name.push(DnType::CommonName, name);
            let pem = params.self_signed(&key).unwrap().pem();
            Self { pem, issuer: Issuer::new(params, key) }
        }

        /// A client certificate named `name`, with the clientAuth usage or none.
        fn client(&self, name: &str, client_auth: bool) -> (CertificateDer<'static>, PrivateKeyDer<'static>) {
            let key = KeyPair::generate().unwrap();
            let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
            params.distinguished_name.push(DnType::CommonName, name);
            if client_auth {
                params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
            }
            let cert = params.signed_by(&key, &self.issuer).unwrap();
            (cert.der().clone(), PrivateKeyDer::try_from(key.serialize_der()).unwrap())
        }
    }

    const VSOCK_CLIENT: &str = "kubevirt.io:system:client:vsock";

    fn kubevirt_tls(source: CaSource) -> KubeVirtTls {
        KubeVirtTls::new(source, None).unwrap()
    }

    fn verify(tls: &KubeVirtTls, cert: &CertificateDer<'_>) -> Result<(), rustls::Error> {
        let verifier = KubeVirtClientVerifier {
            ca: tls.ca.clone(),
            algorithms: tls.ca.provider.signature_verification_algorithms,
        };
        verifier.verify_client_cert(cert, &[], UnixTime::now()).map(|_| ())
    }

    fn refused(result: Result<(), rustls::Error>) -> String {
        match result.expect_err("refused") {
            rustls::Error::InvalidCertificate(CertificateError::Other(why)) => why.to_string(),
            other => format!("{other:?}"),
        }
    }

    /// A certificate of KubeVirt's CA for client authentication named kubevirt.io:system:client… is accepted;
    /// another CA's, another name and a missing usage are not, nor anything before a bundle is known.
    #[test]
    fn only_kubevirts_vsock_client_certificate_is_accepted() {
        let kubevirt = TestCa::new("kubevirt.io@1700000000");
        let tls = kubevirt_tls(CaSource::Vsock { cid: 2, port: 1 });
        let (good, _) = kubevirt.client(VSOCK_CLIENT, true);
        assert_eq!(
            refused(verify(&tls, &good)),
            "KubeVirt's CA bundle is not known yet (it is fetched from vsock://2:1; see the log for why it is not)"
        );
        let certificates = CertificateDer::pem_slice_iter(kubevirt.pem.as_bytes()).collect::<Result<_, _>>().unwrap();
        assert!(tls.ca.install(certificates).unwrap());
        verify(&tls, &good).expect("KubeVirt's vsock client is accepted");
        verify(&tls, &kubevirt.client("kubevirt.io:system:client:virt-handler", true).0).expect("any system client");

        // Another CA, and one with the same name but another key (a rotation the agent has not fetched).
        for other in [TestCa::new("some other CA"), TestCa::new("kubevirt.io@1700000000")] {
            let not_signed = verify(&tls, &other.client(VSOCK_CLIENT, true).0).unwrap_err();
            assert!(
                matches!(
                    not_signed,
                    rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer | CertificateError::BadSignature)
                ),
                "{not_signed:?}"
            );
        }
        assert_eq!(
            refused(verify(&tls, &kubevirt.client("kubevirt.io:system:node:vsock", true).0)),
            "its certificate's common name \"kubevirt.io:system:node:vsock\" does not start with kubevirt.io:system:client"
        );
        assert_eq!(
            refused(verify(&tls, &kubevirt.client(VSOCK_CLIENT, false).0)),
            "its certificate is not for client authentication (no clientAuth extended key usage)"
        );
    }

    /// virt-handler's `System` service, serving `bundle`.
    struct SystemService(Vec<u8>);

    #[tonic::async_trait]
    impl System for SystemService {
        async fn ca_bundle(
            &self,
            _: tonic::Request<EmptyRequest>,
        ) -> Result<tonic::Response<PemBundle>, tonic::Status> {
            Ok(tonic::Response::new(PemBundle { raw: self.0.clone() }))
        }
    }

    /// Serves `bundle` on a Unix socket in `dir` until the returned task is dropped; its `kubevirt_ca` address.
    fn serve_bundle(dir: &std::path::Path, name: &str, bundle: &str) -> (CaSource, tokio::task::JoinHandle<()>) {
        let path = dir.join(name);
        let incoming = tokio_stream::wrappers::UnixListenerStream::new(tokio::net::UnixListener::bind(&path).unwrap());
        let service = SystemServer::new(SystemService(bundle.as_bytes().to_vec()));
        let server = tokio::spawn(async move {
            tonic::transport::Server::builder().add_service(service).serve_with_incoming(incoming).await.unwrap();
        });
        (CaSource::Unix(path), server)
    }

    /// The bundle is fetched over gRPC as virt-handler serves it (here on a Unix socket); a bundle that is not PEM
    /// and a service that is not there are named errors, and leave the bundle known before.
    #[tokio::test]
    async fn the_bundle_is_fetched_from_kubevirts_system_service_and_a_bad_one_is_not_taken() {
        let dir = tempfile::tempdir().unwrap();
        let kubevirt = TestCa::new("kubevirt.io@1700000000");
        let (source, _server) = serve_bundle(dir.path(), "ca.sock", &kubevirt.pem);
        let fetched = fetch(&source).await.unwrap();
        assert_eq!(fetched.len(), 1);

        let tls = kubevirt_tls(source.clone());
        assert!(tls.refresh().await.unwrap(), "a first bundle");
        assert!(!tls.refresh().await.unwrap(), "the same bundle again");
        verify(&tls, &kubevirt.client(VSOCK_CLIENT, true).0).unwrap();

        let (junk, _junk_server) = serve_bundle(dir.path(), "junk.sock", "not a certificate\n");
        let err = fetch(&junk).await.unwrap_err();
        assert_eq!(err.to_string(), format!("the CA bundle from {junk} holds no PEM certificate"));
        let absent = CaSource::Unix(dir.path().join("absent.sock"));
        let err = fetch(&absent).await.unwrap_err();
        assert!(
            err.to_string().starts_with(&format!("cannot connect to KubeVirt's CA service at {absent}: ")),
            "{err}"
        );
        assert!(tls.has_ca(), "failed fetches keep the bundle");
    }

    /// A real TLS 1.3 handshake as virt-handler makes it (verifying nothing of the agent) through the listeners'
    /// accept path, after the bundle is fetched in the background: the connection is marked as KubeVirt's.
    #[tokio::test]
    async fn virt_handlers_handshake_is_accepted_once_the_bundle_is_fetched() {
        use crate::transport::{Auth, Listener, Security, incoming};
        let dir = tempfile::tempdir().unwrap();
        let kubevirt = TestCa::new("kubevirt.io@1700000000");
        let (source, _server) = serve_bundle(dir.path(), "ca.sock", &kubevirt.pem);
        let tls = Arc::new(kubevirt_tls(source));
        let refresher = tokio::spawn(tls.clone().keep_current());
        for _ in 0..200 {
            if tls.has_ca() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(tls.has_ca(), "the bundle is fetched at start");
        refresher.abort();

        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let mut incoming = incoming(Listener::Tcp(listener), Security::KubeVirt(tls));
        let (cert, key) = kubevirt.client(VSOCK_CLIENT, true);
        let config = rustls::ClientConfig::builder_with_provider(tls::provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyServer(tls::provider())))
            .with_client_auth_cert(vec![cert], key)
            .unwrap();
        let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
        let tcp = tokio::net::TcpStream::connect(address).await.unwrap();
        let name = rustls::pki_types::ServerName::try_from("guest").unwrap();
        let (client, server) = tokio::join!(connector.connect(name, tcp), incoming.next());
        client.expect("virt-handler's side of the handshake");
        let connection = server.unwrap().expect("the agent accepted virt-handler");
        use tonic::transport::server::Connected;
        assert_eq!(connection.connect_info().auth, Auth::KubeVirt(VSOCK_CLIENT.into()));
    }

    /// virt-handler's `InsecureSkipVerify`.
    #[derive(Debug)]
    struct AnyServer(Arc<CryptoProvider>);

    impl rustls::client::danger::ServerCertVerifier for AnyServer {
        fn verify_server_cert(
            &self,
            _: &CertificateDer<'_>,
            _: &[CertificateDer<'_>],
            _: &rustls::pki_types::ServerName<'_>,
            _: &[u8],
            _: UnixTime,
        ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
            Ok(rustls::client::danger::ServerCertVerified::assertion())
        }

        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
        }

        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
        }

        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            self.0.signature_verification_algorithms.supported_schemes()
        }
    }
}
