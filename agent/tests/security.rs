//! The real server as a network service must be: mutual TLS that admits only clients of the configured CA, an
//! allow-list and a read-only mode for the calls that change the guest, named errors for malformed and oversized
//! messages, and limits that refuse with RESOURCE_EXHAUSTED while others keep being served.

use std::path::{Path, PathBuf};
use std::time::Duration;
use tonic::Code;
use wukong_agent::config::{Args, Config, Limits};
use wukong_controller_client::agent_client::{AgentAddress, AgentClient, ClientError};
use wukong_e2e::pki::Pki;

struct Running {
    port: u16,
    socket: PathBuf,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    server: tokio::task::JoinHandle<Result<(), wukong_agent::server::ServerError>>,
    _dir: tempfile::TempDir,
}

impl Running {
    async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        self.server.await.unwrap().unwrap();
    }

    fn tcp(&self) -> AgentAddress {
        AgentAddress::Tcp(format!("http://127.0.0.1:{}", self.port))
    }

    fn local(&self) -> AgentClient {
        AgentClient::connect(AgentAddress::Unix(self.socket.clone())).unwrap()
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Starts the real server on a TCP port (with `tls` from `pki` when given) and a Unix socket.
async fn start(pki: Option<&Pki>, args: Args, limits: Option<Limits>) -> Running {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let socket = dir.path().join("agent.sock");
    let mut args = Args {
        listen: vec![format!("127.0.0.1:{port}")],
        socket: Some(socket.clone()),
        state_dir: Some(dir.path().join("releases")),
        ..args
    };
    if let Some(pki) = pki {
        args.tls_cert = Some(pki.path("agent.crt"));
        args.tls_key = Some(pki.path("agent.key"));
        args.tls_client_ca = Some(pki.path("ca.crt"));
    }
    let mut config = Config::load(&args).unwrap();
    if let Some(limits) = limits {
        config.limits = limits;
    }
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(wukong_agent::server::run(config, async {
        let _ = stopped.await;
    }));
    wait_for(&socket).await;
    Running { port, socket, stop: Some(stop), server, _dir: dir }
}

async fn wait_for(socket: &Path) {
    for _ in 0..200 {
        if socket.exists() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("the agent did not start");
}

#[tokio::test(flavor = "multi_thread")]
async fn mutual_tls_admits_only_clients_of_the_ca_and_the_allow_list_guards_releases() {
    let pki = Pki::new();
    let args = Args { allow_clients: vec!["operator".into()], ..Args::default() };
    let agent = start(Some(&pki), args, None).await;
    let operator = AgentClient::connect_with(agent.tcp(), Some(&pki.client("operator"))).unwrap();
    let info = operator.agent_info().await.unwrap();
    assert!(!info.read_only, "the operator may release disks");
    // Authorised: the request reaches the release itself, which does not know the serial.
    assert_eq!(operator.prepare_detach("no-such-disk", true, true).await.unwrap_err().code(), Some(Code::NotFound));

    let viewer = AgentClient::connect_with(agent.tcp(), Some(&pki.client("viewer"))).unwrap();
    assert!(viewer.agent_info().await.unwrap().read_only, "the viewer is told it is read-only");
    viewer.list_disks(false).await.expect("reads are open to every client of the CA");
    let denied = viewer.prepare_detach("no-such-disk", true, false).await.unwrap_err();
    assert_eq!(denied.code(), Some(Code::PermissionDenied));
    assert_eq!(denied.to_string(), "client 'viewer' may not release disks; allowed clients: operator");
    assert_eq!(viewer.cancel_detach("no-such-disk").await.unwrap_err().code(), Some(Code::PermissionDenied));

    let intruder = AgentClient::connect_with(agent.tcp(), Some(&pki.client("intruder"))).unwrap();
    let e = intruder.agent_info().await.unwrap_err();
    assert!(
        matches!(&e, ClientError::TlsRefused(m) if m.contains("refused this client's certificate")),
        "a certificate from another CA is refused at the handshake, and the client says so: {e}"
    );
    let plaintext = AgentClient::connect(agent.tcp()).unwrap();
    let e = plaintext.agent_info().await.unwrap_err();
    assert!(
        matches!(&e, ClientError::TlsRefused(m) if m.contains("speaks TLS and closed this plaintext connection")),
        "plaintext against the TLS port fails, named as such: {e:?}"
    );
    let mut mismatched = pki.client("operator");
    mismatched.cert = pki.path("viewer.crt"); // someone else's certificate, without its key
    let e = AgentClient::connect_with(agent.tcp(), Some(&mismatched)).unwrap_err();
    assert!(matches!(e, ClientError::Tls(_)), "a certificate without its key is refused before connecting: {e}");
    let e = anonymous_tls(&pki, agent.port).await;
    assert!(e.contains("certificate") || e.contains("transport"), "no client certificate is refused: {e}");

    operator.list_disks(false).await.expect("the agent keeps serving after every refusal");
    let local = agent.local();
    assert_eq!(local.prepare_detach("no-such-disk", true, true).await.unwrap_err().code(), Some(Code::NotFound));
    agent.stop().await;
}

/// A TLS client that trusts the CA but offers no certificate at all.
async fn anonymous_tls(pki: &Pki, port: u16) -> String {
    use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(std::fs::read(pki.path("ca.crt")).unwrap()))
        .domain_name("wukong-agent");
    let channel = Endpoint::from_shared(format!("https://127.0.0.1:{port}")).unwrap().tls_config(tls).unwrap();
    let mut client = wukong_proto::v1::disk_agent_client::DiskAgentClient::new(channel.connect_lazy());
    let status = client.get_agent_info(wukong_proto::v1::GetAgentInfoRequest {}).await.unwrap_err();
    format!("{status:?}")
}

#[tokio::test(flavor = "multi_thread")]
async fn read_only_closes_releases_to_every_network_client_but_not_the_socket() {
    let pki = Pki::new();
    let agent = start(Some(&pki), Args { read_only: true, ..Args::default() }, None).await;
    let operator = AgentClient::connect_with(agent.tcp(), Some(&pki.client("operator"))).unwrap();
    let denied = operator.prepare_detach("no-such-disk", false, false).await.unwrap_err();
    assert_eq!(denied.code(), Some(Code::PermissionDenied));
    assert!(denied.to_string().starts_with("this agent is read-only for network clients"), "{denied}");
    assert!(operator.agent_info().await.unwrap().read_only);
    let local = agent.local();
    assert!(!local.agent_info().await.unwrap().read_only);
    assert_eq!(local.cancel_detach("no-such-disk").await.unwrap_err().code(), Some(Code::NotFound));
    agent.stop().await;
}

/// Sends raw bytes as a request message: what a broken or hostile client can put on the wire.
async fn raw_call(socket: &Path, method: &str, payload: Vec<u8>) -> tonic::Status {
    use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
    #[derive(Default)]
    struct Raw;
    struct RawEncoder;
    struct RawDecoder;
    impl Encoder for RawEncoder {
        type Item = Vec<u8>;
        type Error = tonic::Status;
        fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), tonic::Status> {
            use bytes::BufMut;
            dst.put_slice(&item);
            Ok(())
        }
    }
    impl Decoder for RawDecoder {
        type Item = Vec<u8>;
        type Error = tonic::Status;
        fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, tonic::Status> {
            use bytes::Buf;
            let mut out = vec![0; src.remaining()];
            src.copy_to_slice(&mut out);
            Ok(Some(out))
        }
    }
    impl Codec for Raw {
        type Encode = Vec<u8>;
        type Decode = Vec<u8>;
        type Encoder = RawEncoder;
        type Decoder = RawDecoder;
        fn encoder(&mut self) -> RawEncoder {
            RawEncoder
        }
        fn decoder(&mut self) -> RawDecoder {
            RawDecoder
        }
    }
    let path = socket.to_path_buf();
    let channel = tonic::transport::Endpoint::from_static("http://agent.invalid")
        .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
            let path = path.clone();
            async move { tokio::net::UnixStream::connect(path).await.map(hyper_util::rt::TokioIo::new) }
        }))
        .await
        .unwrap();
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.unwrap();
    let path = http::uri::PathAndQuery::try_from(format!("/wukong.agent.v1.DiskAgent/{method}")).unwrap();
    grpc.unary(tonic::Request::new(payload), path, Raw).await.unwrap_err()
}

#[tokio::test(flavor = "multi_thread")]
async fn malformed_and_oversized_messages_get_named_errors_and_the_agent_keeps_serving() {
    let agent = start(None, Args::default(), None).await;
    let malformed = raw_call(&agent.socket, "GetDisk", vec![0xff, 0xff, 0xff, 0xff, 0x0f]).await;
    assert_eq!(malformed.code(), Code::Internal, "{malformed:?}");
    assert!(malformed.message().contains("decode"), "{malformed:?}");
    // A field 1 string of 100 KiB: a well-formed message over the 64 KiB limit.
    let mut big = vec![0x0a, 0x80, 0x80, 0x06];
    big.extend(std::iter::repeat_n(b'a', 100 * 1024));
    let oversized = raw_call(&agent.socket, "GetDisk", big).await;
    assert_eq!(oversized.code(), Code::OutOfRange, "{oversized:?}");
    assert!(oversized.message().contains("too large"), "{oversized:?}");
    let local = agent.local();
    for hostile in ["../../etc/passwd", "a\0b", "sd/a", &"x".repeat(10_000), "", " "] {
        let e = local.prepare_detach(hostile, true, false).await.unwrap_err();
        assert_eq!(e.code(), Some(Code::InvalidArgument), "{hostile:?}: {e}");
        assert_eq!(local.get_disk(hostile, false).await.unwrap_err().code(), Some(Code::InvalidArgument));
    }
    local.list_disks(false).await.expect("still serving");
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn limits_refuse_with_resource_exhausted_and_others_are_still_served() {
    let limits = Limits {
        max_requests: 3,
        max_requests_per_connection: 2,
        max_watchers: 1,
        max_watch_seconds: 1,
        ..Limits::default()
    };
    let agent = start(None, Args::default(), Some(limits)).await;
    let wait = |client: AgentClient| {
        tokio::spawn(async move { client.wait_for_disk("never-plugged", Duration::from_secs(60)).await })
    };
    // Two long waits fill one connection: its third request is refused, another connection is served.
    let busy = AgentClient::connect(agent.tcp()).unwrap();
    let held = [wait(busy.clone()), wait(busy.clone())];
    tokio::time::sleep(Duration::from_millis(300)).await;
    let e = busy.agent_info().await.unwrap_err();
    assert_eq!(e.code(), Some(Code::ResourceExhausted), "{e}");
    assert!(e.to_string().starts_with("this connection has 2 requests running"), "{e}");
    let other = AgentClient::connect(agent.tcp()).unwrap();
    other.agent_info().await.expect("another connection is served");
    // A third wait on another connection reaches the overall bound.
    let third = wait(other.clone());
    tokio::time::sleep(Duration::from_millis(300)).await;
    let e = AgentClient::connect(agent.tcp()).unwrap().agent_info().await.unwrap_err();
    assert_eq!(e.code(), Some(Code::ResourceExhausted), "{e}");
    assert!(e.to_string().starts_with("the agent is busy: 3 requests are running"), "{e}");
    for h in held.into_iter().chain([third]) {
        h.abort();
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    other.agent_info().await.expect("served again once the waits are gone");

    // One watch at a time, and it ends after a second with a sentence.
    let mut watch = other.watch(Vec::new()).await.unwrap();
    let e = match other.watch(Vec::new()).await {
        Ok(mut second) => second.message().await.unwrap_err(),
        Err(ClientError::Agent { status }) => status,
        Err(e) => panic!("{e}"),
    };
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    assert!(e.message().starts_with("1 disk watches are open"), "{e:?}");
    let ended = loop {
        match watch.message().await {
            Ok(Some(_)) => continue,
            Ok(None) => panic!("the watch ended without saying why"),
            Err(status) => break status,
        }
    };
    assert_eq!(ended.code(), Code::DeadlineExceeded);
    assert!(ended.message().contains("longest the agent keeps one open (1s)"), "{ended:?}");
    other.watch(Vec::new()).await.expect("a new watch is admitted once the first has ended");
    agent.stop().await;
}
