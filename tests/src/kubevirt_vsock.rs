//! KubeVirt v1.9's vsock, as the lab's KubeVirt ([`crate::kubevirt_lab`]) plays it:
//!
//! * **virt-controller** gives a VMI with `spec.domain.devices.autoattachVSOCK: true` a cluster-unique CID in
//!   `status.VSOCKCID` when it writes the phase Scheduled, and frees it once the VMI is gone
//!   (pkg/virt-controller/watch/vsock `cidsMap`: a random start, probed upward, never below 3).
//! * **virt-api** serves `GET .../virtualmachineinstances/{name}/vsock?port=P&tls=B` (rest/vsock.go, streamer.go):
//!   a websocket (subprotocol `plain.kubevirt.io`, binary messages) spliced to the guest's vsock port P by
//!   **virt-handler** (virt-handler/rest/console.go `VSOCKHandler`), which with `tls=true` (the default) is a TLS 1.3
//!   client of the guest that verifies nothing and presents its vsock client certificate (CN
//!   `kubevirt.io:system:client:vsock`, signed by KubeVirt's CA). virt-handler's checks come back through virt-api
//!   as a failed websocket handshake, that is a 500 naming virt-handler's status and message.
//! * **virt-handler** serves KubeVirt's CA to guests at host CID 2, port 1 (gRPC `kubevirt.vsock.system.v1.System`,
//!   pkg/virt-handler/vsock) while the `VSOCK` gate is on: with vhost-device-vsock a guest's connection there
//!   arrives at the Unix socket `<hybrid socket>_1` on this machine.
//!
//! The lab has one guest (its vsock device, [`crate::Guest::vsock_socket`]) and every VMI's domain is it: whatever
//! CID virt-controller gave a VMI, virt-handler's dial reaches that device, whose own CID was fixed when the guest
//! booted ([`crate::Guest::vsock_cid`]).

use crate::cluster::{Ca, Leaf};
use crate::kubevirt_lab::{GROUP, Reply, failure, vmis};
use anyhow::{Context, Result, bail};
use async_tungstenite::WebSocketStream;
use async_tungstenite::tokio::TokioAdapter;
use async_tungstenite::tungstenite::Message;
use async_tungstenite::tungstenite::handshake::derive_accept_key;
use async_tungstenite::tungstenite::protocol::Role;
use futures::{SinkExt, StreamExt};
use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::header::{
    CONNECTION, CONTENT_TYPE, SEC_WEBSOCKET_ACCEPT, SEC_WEBSOCKET_KEY, SEC_WEBSOCKET_PROTOCOL, SEC_WEBSOCKET_VERSION,
    UPGRADE,
};
use hyper::{HeaderMap, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use kube::api::DynamicObject;
use rcgen::ExtendedKeyUsagePurpose;
use serde_json::json;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_rustls::rustls::{self, ClientConfig, DigitallySignedStruct, SignatureScheme};
use ws_stream_tungstenite::WsStream;
use wukong_proto::kubevirt_system::system_server::{System, SystemServer};
use wukong_proto::kubevirt_system::{Bundle, EmptyRequest};

/// The websocket subprotocol of KubeVirt's streams (client-go subresources `PlainStreamProtocolName`).
pub const PLAIN_STREAM: &str = "plain.kubevirt.io";
/// The common name of virt-handler's vsock client certificate (virt-operator components/secrets.go).
pub const CLIENT_NAME: &str = "kubevirt.io:system:client:vsock";
/// The vsock port virt-handler serves KubeVirt's CA on, at host CID 2 (cmd/virt-handler).
const CA_PORT: u32 = 1;

/// The lab's KubeVirt's vsock: the gate, virt-controller's CIDs, KubeVirt's CA and virt-handler's certificate.
pub(crate) struct Vsock {
    /// The `VSOCK` feature gate.
    pub(crate) gate: bool,
    /// virt-controller's `cidsMap`: VMI key (`namespace/name`) → CID.
    cids: Mutex<BTreeMap<String, u32>>,
    /// The guest's vsock device (its hybrid-vsock socket), which every VMI's domain is.
    device: Option<PathBuf>,
    /// KubeVirt's CA (the `kubevirt-ca` ConfigMap), which signs virt-handler's vsock client certificate.
    ca: Ca,
    /// virt-handler's TLS configuration towards guests, with the certificate it presents now.
    client: Mutex<Arc<ClientConfig>>,
    /// The one the lab made, signed by `ca` (Secret `kubevirt-virt-handler-vsock-client-certs`).
    own_client: Arc<ClientConfig>,
}

impl Vsock {
    pub(crate) fn new(gate: bool, device: Option<PathBuf>) -> Result<Self> {
        let ca = Ca::new("kubevirt.io")?;
        let own_client = client_config(&ca.leaf(CLIENT_NAME, &[], ExtendedKeyUsagePurpose::ClientAuth)?)?;
        Ok(Self {
            gate,
            cids: Mutex::new(BTreeMap::new()),
            device,
            ca,
            client: Mutex::new(own_client.clone()),
            own_client,
        })
    }

    pub(crate) fn ca_pem(&self) -> &str {
        &self.ca.pem
    }

    /// What virt-handler presents to guests from now on: `leaf`, or (`None`) the lab's own certificate.
    pub(crate) fn set_client_certificate(&self, leaf: Option<&Leaf>) -> Result<()> {
        let config = match leaf {
            Some(leaf) => client_config(leaf)?,
            None => self.own_client.clone(),
        };
        *self.client.lock().unwrap() = config;
        Ok(())
    }

    /// virt-controller's `cidsMap.Allocate` for `vmi`: its CID if it has one, else the first free one upward of a
    /// random start (wrapping from `u32::MAX` to 3).
    pub(crate) fn allocate(&self, vmi: &DynamicObject) -> Result<u32> {
        let start = match u32::from_be_bytes(crate::cluster::random_bytes()) {
            // "The guest CID will start from 3".
            cid if cid < 3 => cid + 3,
            cid => cid,
        };
        self.allocate_from(key(vmi), start)
    }

    fn allocate_from(&self, key: String, start: u32) -> Result<u32> {
        let mut cids = self.cids.lock().unwrap();
        if let Some(cid) = cids.get(&key) {
            return Ok(*cid);
        }
        let taken: std::collections::BTreeSet<u32> = cids.values().copied().collect();
        let mut cid = start;
        while taken.contains(&cid) {
            cid = if cid == u32::MAX { 3 } else { cid + 1 };
            if cid == start {
                bail!("CIDs exhausted");
            }
        }
        cids.insert(key, cid);
        Ok(cid)
    }

    /// virt-controller's `cidsMap.Remove` for every VMI no longer in `present` (the VMIs it just listed).
    pub(crate) fn free_gone(&self, present: &[DynamicObject]) {
        let keys: Vec<String> = present.iter().map(key).collect();
        self.cids.lock().unwrap().retain(|k, _| keys.contains(k));
    }

    /// virt-handler's vsock server (pkg/virt-handler/vsock, started while the gate is on): KubeVirt's CA at host
    /// CID 2, port 1, which with vhost-device-vsock is the Unix socket `<device>_1`.
    pub(crate) fn serve_ca(&self) -> Result<Option<tokio::task::JoinHandle<()>>> {
        let (true, Some(device)) = (self.gate, &self.device) else { return Ok(None) };
        let path = host_port_socket(device, CA_PORT);
        // A lab before this one on the same guest left its socket file.
        let _ = std::fs::remove_file(&path);
        let listener = tokio::net::UnixListener::bind(&path).with_context(|| format!("binding {}", path.display()))?;
        let service = SystemServer::new(CaBundle(self.ca.pem.clone().into_bytes()));
        Ok(Some(tokio::spawn(async move {
            let incoming = tokio_stream::wrappers::UnixListenerStream::new(listener);
            let served = tonic::transport::Server::builder().add_service(service).serve_with_incoming(incoming).await;
            if let Err(e) = served {
                tracing::warn!(error = %e, "the lab's virt-handler stopped serving KubeVirt's CA");
            }
        })))
    }

    /// virt-handler's dial of `cid`:`port` (mdlayher/vsock `Dial`), wrapped in TLS when `tls` says so.
    async fn dial(&self, cid: u32, port: u32, tls: bool) -> Result<Box<dyn Io>> {
        let device = self.device.as_ref().with_context(|| format!("dial vsock {cid}:{port}: no such device"))?;
        let stream = crate::hybrid_vsock_connect(device, port).await?;
        if !tls {
            return Ok(Box::new(stream));
        }
        let connector = tokio_rustls::TlsConnector::from(self.client.lock().unwrap().clone());
        // No SNI is sent (the configuration's `enable_sni` is off), as Go sends none without a ServerName.
        let name = rustls::pki_types::ServerName::try_from("vsock")?;
        let stream = connector.connect(name, stream).await.with_context(|| format!("TLS to {cid}:{port}"))?;
        Ok(Box::new(stream))
    }
}

/// A certificate like virt-handler's vsock client certificate (its name, client auth) but signed by a CA of its own:
/// what a guest that verifies against KubeVirt's CA must refuse
/// ([`crate::kubevirt_lab::KubeVirtLab::set_vsock_client_certificate`]).
pub fn foreign_client_certificate() -> Result<Leaf> {
    Ca::new("not kubevirt.io")?.leaf(CLIENT_NAME, &[], ExtendedKeyUsagePurpose::ClientAuth)
}

/// A VMI's key in virt-controller's maps.
fn key(vmi: &DynamicObject) -> String {
    format!(
        "{}/{}",
        vmi.metadata.namespace.as_deref().unwrap_or_default(),
        vmi.metadata.name.as_deref().unwrap_or_default()
    )
}

/// The Unix socket where a guest's connection to host CID 2, port `port` arrives (vhost-device-vsock's
/// `<uds-path>_<port>`).
pub fn host_port_socket(device: &Path, port: u32) -> PathBuf {
    let mut path = device.as_os_str().to_owned();
    path.push(format!("_{port}"));
    PathBuf::from(path)
}

/// A guest connection: a vsock stream, or TLS over one.
trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// virt-handler's TLS configuration towards guests, presenting `leaf`: TLS 1.3 only, no server name, and
/// [`InsecureSkipVerify`].
fn client_config(leaf: &Leaf) -> Result<Arc<ClientConfig>> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let (certs, key) = leaf.der()?;
    let mut config = ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(InsecureSkipVerify(provider)))
        .with_client_auth_cert(certs, key)?;
    config.enable_sni = false;
    Ok(Arc::new(config))
}

/// virt-handler's `InsecureSkipVerify: true`: it accepts whatever certificate a guest shows, since a guest has no
/// identity KubeVirt could check (it is the guest that verifies virt-handler, against KubeVirt's CA). As in Go, the
/// handshake's own signatures are still verified.
#[derive(Debug)]
struct InsecureSkipVerify(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for InsecureSkipVerify {
    fn verify_server_cert(
        &self,
        _end_entity: &rustls::pki_types::CertificateDer<'_>,
        _intermediates: &[rustls::pki_types::CertificateDer<'_>],
        _server_name: &rustls::pki_types::ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// `kubevirt.vsock.system.v1.System` (pkg/virt-handler/vsock/system): the CA bundle, PEM.
struct CaBundle(Vec<u8>);

#[tonic::async_trait]
impl System for CaBundle {
    async fn ca_bundle(
        &self,
        _request: tonic::Request<EmptyRequest>,
    ) -> Result<tonic::Response<Bundle>, tonic::Status> {
        Ok(tonic::Response::new(Bundle { raw: self.0.clone() }))
    }
}

// ---------------------------------------------------------------------------------------------------------------
// virt-api's subresource and virt-handler's stream.

/// `GET /apis/subresources.kubevirt.io/v1/namespaces/{ns}/virtualmachineinstances/{name}/vsock`, in virt-api's
/// order: the VMI (404), `validateVMIForVSOCK` (400), the phase virt-handler can be dialled in (400), then
/// virt-handler's own checks, which virt-api passes on as a 500 (its websocket to virt-handler failed its
/// handshake), and last the client's websocket handshake (gorilla's `Upgrader`). The stream itself runs once the
/// connection is upgraded; a failed dial of the guest then closes it without a word, as virt-handler does after
/// its own upgrade.
pub(crate) async fn subresource(
    virt_api: &kube::Client,
    vsock: &Arc<Vsock>,
    mut request: Request<Incoming>,
    ns: &str,
    name: &str,
) -> Reply {
    let query = request.uri().query().unwrap_or_default().to_string();
    // `FetchVirtualMachineInstance`, as virt-api.
    let vmi = match vmis(virt_api, ns).get_opt(name).await {
        Ok(Some(vmi)) => vmi,
        Ok(None) => {
            return failure(StatusCode::NOT_FOUND, &format!("virtualmachineinstance.kubevirt.io \"{name}\" not found"));
        }
        Err(e) => {
            let message = format!("Internal error occurred: unable to retrieve vmi [{name}]: {e}");
            return failure(StatusCode::INTERNAL_SERVER_ERROR, &message);
        }
    };
    if vmi.data["spec"]["domain"]["devices"]["autoattachVSOCK"] != true {
        return failure(StatusCode::BAD_REQUEST, "VSOCK is not attached.");
    }
    // `getVirtHandlerConnForVMI`.
    let phase = vmi.data["status"]["phase"].as_str().unwrap_or_default();
    if !matches!(phase, "Running" | "Scheduled") {
        let message = format!(
            "Unable to connect to VirtualMachineInstance because phase is {phase} instead of Running or Scheduled"
        );
        return failure(StatusCode::BAD_REQUEST, &message);
    }
    // virt-api hands `tls` on as it came, "true" when empty or absent, and `port` as it came.
    let tls = query_value(&query, "tls").filter(|t| !t.is_empty()).unwrap_or_else(|| "true".into());
    let port = query_value(&query, "port").unwrap_or_default();
    let (cid, port, tls) = match handler_checks(&vmi, &port, &tls) {
        Ok(target) => target,
        Err((code, message)) => {
            // kvcorev1.Dial fails with ErrBadHandshake; `EnrichError` adds the code and virt-handler's text/plain
            // answer; `NewInternalError` wraps it all.
            let message = format!(
                "Internal error occurred: Can't connect to websocket ({code}): websocket: bad handshake: application \
                 info: {message}"
            );
            return failure(StatusCode::INTERNAL_SERVER_ERROR, &message);
        }
    };
    let accept = match websocket_accept(request.headers()) {
        Ok(accept) => accept,
        Err((code, reason)) => return handshake_refusal(code, reason),
    };
    let offered = request
        .headers()
        .get_all(SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .any(|v| v.to_str().is_ok_and(|v| v.split(',').any(|p| p.trim() == PLAIN_STREAM)));
    let upgrade = hyper::upgrade::on(&mut request);
    let vsock = vsock.clone();
    tokio::spawn(async move {
        match upgrade.await {
            Ok(upgraded) => {
                let io = TokioAdapter::new(TokioIo::new(upgraded));
                let websocket = WebSocketStream::from_raw_socket(io, Role::Server, None).await;
                match vsock.dial(cid, port, tls).await {
                    Ok(guest) => splice(websocket, guest).await,
                    Err(e) => tracing::debug!(error = %e, "the lab's virt-handler could not dial the guest"),
                }
            }
            Err(e) => tracing::debug!(error = %e, "the vsock websocket was not upgraded"),
        }
    });
    let mut response = Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header(UPGRADE, "websocket")
        .header(CONNECTION, "Upgrade")
        .header(SEC_WEBSOCKET_ACCEPT, accept);
    if offered {
        response = response.header(SEC_WEBSOCKET_PROTOCOL, PLAIN_STREAM);
    }
    response.body(Full::new(Bytes::new())).expect("a valid response")
}

/// virt-handler's `VSOCKHandler` checks, in its order: the CID (500, "should not happen"), `port` as
/// `strconv.ParseUint(port, 10, 32)` and `tls` as `strconv.ParseBool` (400 each, Go's messages). The refusal is
/// virt-handler's status code and its text.
fn handler_checks(vmi: &DynamicObject, port: &str, tls: &str) -> Result<(u32, u32, bool), (u16, String)> {
    let cid = vmi.data["status"]["VSOCKCID"].as_u64().and_then(|c| u32::try_from(c).ok());
    let cid = cid.ok_or((500, "VSOCK CID is nil".to_string()))?;
    let port = match port.bytes().all(|b| b.is_ascii_digit()) && !port.is_empty() {
        true => port
            .parse::<u32>()
            .map_err(|_| (400, format!("strconv.ParseUint: parsing {port:?}: value out of range")))?,
        false => return Err((400, format!("strconv.ParseUint: parsing {port:?}: invalid syntax"))),
    };
    let tls = match tls {
        "1" | "t" | "T" | "TRUE" | "true" | "True" => true,
        "0" | "f" | "F" | "FALSE" | "false" | "False" => false,
        other => return Err((400, format!("strconv.ParseBool: parsing {other:?}: invalid syntax"))),
    };
    Ok((cid, port, tls))
}

/// gorilla/websocket's `Upgrader.Upgrade` checks, in its order: the `Sec-WebSocket-Accept` of the handshake, or the
/// status and reason of its refusal.
fn websocket_accept(headers: &HeaderMap) -> Result<String, (StatusCode, &'static str)> {
    let has = |name, token: &str| {
        let values = headers.get_all(name);
        values.iter().any(|v| v.to_str().is_ok_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token))))
    };
    if !has(CONNECTION, "upgrade") {
        return Err((
            StatusCode::BAD_REQUEST,
            "websocket: the client is not using the websocket protocol: 'upgrade' token not found in 'Connection' \
             header",
        ));
    }
    if !has(UPGRADE, "websocket") {
        return Err((
            StatusCode::UPGRADE_REQUIRED,
            "websocket: the client is not using the websocket protocol: 'websocket' token not found in 'Upgrade' \
             header",
        ));
    }
    if !has(SEC_WEBSOCKET_VERSION, "13") {
        return Err((
            StatusCode::BAD_REQUEST,
            "websocket: unsupported version: 13 not found in 'Sec-Websocket-Version' header",
        ));
    }
    let key = headers.get(SEC_WEBSOCKET_KEY).map(|k| k.as_bytes()).unwrap_or_default();
    let decoded = {
        use base64::Engine;
        base64::engine::general_purpose::STANDARD.decode(key)
    };
    match decoded {
        Ok(nonce) if nonce.len() == 16 => Ok(derive_accept_key(key)),
        _ => Err((
            StatusCode::BAD_REQUEST,
            "websocket: not a websocket handshake: 'Sec-WebSocket-Key' header must be Base64 encoded value of \
             16-byte in length",
        )),
    }
}

/// A refused websocket handshake: gorilla's answer (`http.Error` with the status text), followed in the same body by
/// virt-api's Status (`writeError` after `clientConnectionUpgrade` failed).
fn handshake_refusal(code: StatusCode, reason: &str) -> Reply {
    let status = json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                        "message": reason, "reason": "BadRequest", "code": 400});
    let body = format!("{}\n{status}", code.canonical_reason().unwrap_or_default());
    let mut response = Response::builder()
        .status(code)
        .header(CONTENT_TYPE, "text/plain; charset=utf-8")
        .header("x-content-type-options", "nosniff")
        .header(SEC_WEBSOCKET_VERSION, "13");
    if code == StatusCode::UPGRADE_REQUIRED {
        response = response.header(UPGRADE, "websocket");
    }
    response.body(Full::new(Bytes::from(body))).expect("a valid response")
}

/// The first value of `key` in a URL query, decoded as Go's `url.Query().Get` decodes it.
fn query_value(query: &str, key: &str) -> Option<String> {
    query
        .split('&')
        .filter_map(|pair| pair.split_once('=').or(Some((pair, ""))))
        .find_map(|(k, v)| (decode(k)? == key).then(|| decode(v)).flatten())
}

/// `url.QueryUnescape`: `+` is a space, `%XX` a byte; a bad escape is no value.
fn decode(text: &str) -> Option<String> {
    let mut bytes = Vec::new();
    let mut rest = text.bytes();
    while let Some(b) = rest.next() {
        bytes.push(match b {
            b'+' => b' ',
            b'%' => {
                let hex = [rest.next()?, rest.next()?];
                u8::from_str_radix(std::str::from_utf8(&hex).ok()?, 16).ok()?
            }
            b => b,
        });
    }
    String::from_utf8(bytes).ok()
}

/// virt-handler's stream (console.go `stream`, with kvcorev1 `CopyTo`/`CopyFrom`): what the guest sends goes out as
/// binary messages, one per read; binary messages go to the guest, other messages are skipped, a close message ends
/// it. Whichever side ends first ends both, without a close message (gorilla's `Close` just closes the connection).
async fn splice<S>(websocket: WebSocketStream<S>, guest: Box<dyn Io>)
where
    S: futures::AsyncRead + futures::AsyncWrite + Unpin,
{
    let (mut sink, mut source) = websocket.split();
    let (mut from_guest, mut to_guest) = tokio::io::split(guest);
    let inbound = async {
        while let Some(Ok(message)) = source.next().await {
            match message {
                Message::Binary(data) => to_guest.write_all(&data).await?,
                Message::Close(_) => break,
                _ => {}
            }
        }
        std::io::Result::Ok(())
    };
    let outbound = async {
        // io.Copy's buffer.
        let mut buf = vec![0u8; 32 * 1024];
        loop {
            let n = from_guest.read(&mut buf).await?;
            if n == 0 {
                return std::io::Result::Ok(());
            }
            sink.send(Message::binary(buf[..n].to_vec())).await.map_err(std::io::Error::other)?;
        }
    };
    // How either ended changes nothing: both end.
    tokio::select! {
        _ = inbound => {}
        _ = outbound => {}
    }
}

// ---------------------------------------------------------------------------------------------------------------
// A client, for the lab's own tests (the product's is wukong-controller-client's).

/// A byte stream through KubeVirt's vsock subresource.
pub type VsockStream = WsStream<TokioAdapter<TokioIo<hyper::upgrade::Upgraded>>>;

/// Opens VMI `vmi`'s vsock subresource with `query` (`port=P&tls=B`) as `client`, through the API server: a
/// websocket offering `plain.kubevirt.io`. `Err` in the result is the refusal: its status code and body.
pub async fn open(
    client: &kube::Client,
    ns: &str,
    vmi: &str,
    query: &str,
) -> Result<std::result::Result<VsockStream, (u16, String)>> {
    let key = async_tungstenite::tungstenite::handshake::client::generate_key();
    let request = Request::get(format!("/apis/{GROUP}/v1/namespaces/{ns}/virtualmachineinstances/{vmi}/vsock?{query}"))
        .header(CONNECTION, "Upgrade")
        .header(UPGRADE, "websocket")
        .header(SEC_WEBSOCKET_VERSION, "13")
        .header(SEC_WEBSOCKET_KEY, &key)
        .header(SEC_WEBSOCKET_PROTOCOL, PLAIN_STREAM)
        .body(kube::client::Body::empty())?;
    let response = client.send(request).await?;
    if response.status() != StatusCode::SWITCHING_PROTOCOLS {
        let code = response.status().as_u16();
        let body = response.into_body().collect().await?.to_bytes();
        return Ok(Err((code, String::from_utf8_lossy(&body).into_owned())));
    }
    let header = |name| response.headers().get(name).and_then(|v| v.to_str().ok()).unwrap_or_default().to_string();
    anyhow::ensure!(header(SEC_WEBSOCKET_ACCEPT) == derive_accept_key(key.as_bytes()), "a wrong Sec-WebSocket-Accept");
    anyhow::ensure!(header(SEC_WEBSOCKET_PROTOCOL) == PLAIN_STREAM, "subprotocol {:?}", header(SEC_WEBSOCKET_PROTOCOL));
    let upgraded = hyper::upgrade::on(response).await.context("upgrading the vsock websocket")?;
    let websocket =
        WebSocketStream::from_raw_socket(TokioAdapter::new(TokioIo::new(upgraded)), Role::Client, None).await;
    Ok(Ok(WsStream::new(websocket)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queries_are_read_as_go_reads_them() {
        assert_eq!(query_value("port=7443&tls=false", "tls").as_deref(), Some("false"));
        assert_eq!(query_value("port=%37443&port=1", "port").as_deref(), Some("7443"), "decoded, the first value");
        assert_eq!(query_value("tls", "tls").as_deref(), Some(""));
        assert_eq!(query_value("tls=true", "port"), None);
    }

    #[test]
    fn virt_handler_parses_port_and_tls_as_go_does() {
        let vmi: DynamicObject = serde_json::from_value(json!({"metadata": {}, "status": {"VSOCKCID": 7}})).unwrap();
        assert_eq!(handler_checks(&vmi, "7443", "true"), Ok((7, 7443, true)));
        assert_eq!(handler_checks(&vmi, "1", "F"), Ok((7, 1, false)));
        let refused = |port, tls| handler_checks(&vmi, port, tls).unwrap_err();
        assert_eq!(refused("", "true"), (400, r#"strconv.ParseUint: parsing "": invalid syntax"#.into()));
        assert_eq!(refused("+5", "true"), (400, r#"strconv.ParseUint: parsing "+5": invalid syntax"#.into()));
        assert_eq!(
            refused("4294967296", "true"),
            (400, r#"strconv.ParseUint: parsing "4294967296": value out of range"#.into())
        );
        assert_eq!(refused("5", "yes"), (400, r#"strconv.ParseBool: parsing "yes": invalid syntax"#.into()));
        let no_cid: DynamicObject = serde_json::from_value(json!({"metadata": {}, "status": {}})).unwrap();
        assert_eq!(handler_checks(&no_cid, "5", "true"), Err((500, "VSOCK CID is nil".into())));
    }

    #[test]
    fn cids_are_unique_at_least_3_and_kept_per_vmi() {
        let vsock = Vsock::new(true, None).unwrap();
        let vmi = |n: usize| -> DynamicObject {
            serde_json::from_value(json!({"metadata": {"namespace": "ns", "name": format!("vm{n}")}})).unwrap()
        };
        let vmis: Vec<DynamicObject> = (0..50).map(vmi).collect();
        let cids: Vec<u32> = vmis.iter().map(|v| vsock.allocate(v).unwrap()).collect();
        assert!(cids.iter().all(|c| *c >= 3));
        assert_eq!(cids.iter().collect::<std::collections::BTreeSet<_>>().len(), cids.len());
        assert_eq!(vsock.allocate(&vmi(7)).unwrap(), cids[7], "a VMI keeps its CID");
        vsock.free_gone(&vmis[..1]);
        assert_eq!(vsock.cids.lock().unwrap().len(), 1, "the others are gone, their CIDs free");
    }

    #[test]
    fn a_taken_cid_is_probed_upward_wrapping_to_3() {
        let vsock = Vsock::new(true, None).unwrap();
        assert_eq!(vsock.allocate_from("ns/a".into(), u32::MAX).unwrap(), u32::MAX);
        assert_eq!(vsock.allocate_from("ns/b".into(), u32::MAX).unwrap(), 3);
        assert_eq!(vsock.allocate_from("ns/c".into(), u32::MAX).unwrap(), 4);
        assert_eq!(vsock.allocate_from("ns/d".into(), 3).unwrap(), 5);
    }
}
