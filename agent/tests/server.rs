//! The real server on this machine (udev monitor included), reached over its Unix socket.

use std::time::{Duration, Instant};
use tonic::Code;
use wukong_agent::config::{Args, Config};
use wukong_controller_client::agent_client::{AgentAddress, AgentClient};
use wukong_proto::v1::EventKind;

fn config(socket: &std::path::Path) -> Config {
    let args = Args {
        listen: vec!["127.0.0.1:0".into()],
        socket: Some(socket.to_path_buf()),
        state_dir: Some(socket.with_file_name("releases")),
        ..Args::default()
    };
    Config::load(&args).unwrap()
}

/// Starts the real server on `socket`; send on the returned sender to stop it.
fn start(
    socket: &std::path::Path,
) -> (tokio::sync::oneshot::Sender<()>, tokio::task::JoinHandle<Result<(), wukong_agent::server::ServerError>>) {
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(wukong_agent::server::run(config(socket), async {
        let _ = stop_rx.await;
    }));
    (stop_tx, server)
}

async fn connected(socket: &std::path::Path) -> AgentClient {
    for _ in 0..100 {
        if socket.exists() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    AgentClient::connect(AgentAddress::Unix(socket.to_path_buf())).unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn shutdown_ends_open_watches_and_waits_promptly() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("agent.sock");
    let (stop_tx, server) = start(&socket);
    let client = connected(&socket).await;
    let mut watch = client.watch(Vec::new()).await.unwrap();
    loop {
        let e = watch.message().await.unwrap().unwrap();
        if e.kind() == EventKind::Synced {
            break;
        }
    }
    let waiter = tokio::spawn({
        let client = client.clone();
        async move { client.wait_for_disk("never-plugged", Duration::from_secs(300)).await }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;

    let started = Instant::now();
    stop_tx.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(4), server).await.expect("server stops promptly").unwrap().unwrap();
    assert!(started.elapsed() < Duration::from_secs(4));

    let ended = watch.message().await;
    assert_eq!(ended.unwrap_err().code(), Code::Unavailable, "the watcher is told the agent is going away");
    let err = waiter.await.unwrap().unwrap_err();
    assert_eq!(err.code(), Some(Code::Unavailable), "{err}");
    assert!(!socket.exists(), "the socket is removed on exit");
}

#[tokio::test(flavor = "multi_thread")]
async fn socket_is_root_only_and_stale_sockets_are_replaced() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("agent.sock");
    drop(std::os::unix::net::UnixListener::bind(&socket).unwrap()); // a stale socket left by a crashed agent
    let (stop_tx, server) = start(&socket);
    // Until the agent has loaded its scanner and bound, the path is the stale socket, which refuses: ask until the
    // agent answers.
    let started = Instant::now();
    let info = loop {
        match connected(&socket).await.agent_info().await {
            Ok(info) => break info,
            Err(e) => assert!(started.elapsed() < Duration::from_secs(30), "the stale socket was not replaced: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(info.version, env!("CARGO_PKG_VERSION"));
    let mode = std::fs::metadata(&socket).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    stop_tx.send(()).unwrap();
    server.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_regular_file_at_the_socket_path_is_refused_and_kept() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("precious");
    std::fs::write(&path, b"data").unwrap();
    let err = wukong_agent::server::run(config(&path), async {}).await.unwrap_err();
    assert!(matches!(err, wukong_agent::server::ServerError::NotASocket(_)), "{err}");
    assert!(err.to_string().contains("is not a socket"), "{err}");
    assert_eq!(std::fs::read(&path).unwrap(), b"data");
}

#[tokio::test(flavor = "multi_thread")]
async fn release_requests_for_bad_or_unknown_serials_are_named_errors_and_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("agent.sock");
    let (stop_tx, server) = start(&socket);
    let client = connected(&socket).await;
    let before = client.list_disks(false).await.unwrap();
    for (serial, code) in
        [("no-such-disk", Code::NotFound), ("../sda", Code::InvalidArgument), ("a\0b", Code::InvalidArgument)]
    {
        let prepare = client.prepare_detach(serial, true, false).await.unwrap_err();
        assert_eq!(prepare.code(), Some(code), "PrepareDetach({serial:?}): {prepare}");
        let cancel = client.cancel_detach(serial).await.unwrap_err();
        assert_eq!(cancel.code(), Some(code), "CancelDetach({serial:?}): {cancel}");
    }
    let err = client.prepare_detach("no-such-disk", false, true).await.unwrap_err();
    assert!(err.to_string().starts_with("no disk with serial 'no-such-disk' is present in the guest"), "{err}");
    assert_eq!(client.list_disks(false).await.unwrap(), before, "nothing changed");
    assert!(client.agent_info().await.unwrap().capabilities.contains(&"release".to_string()));
    let journalled: Vec<_> = std::fs::read_dir(dir.path().join("releases"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .filter(|name| name != wukong_agent::instance::LOCK_FILE)
        .collect();
    assert!(journalled.is_empty(), "nothing was journalled: {journalled:?}");
    stop_tx.send(()).unwrap();
    server.await.unwrap().unwrap();
}

/// Server reflection answers both `grpc.reflection.v1` and `v1alpha`, asked by an independent client: Debian's
/// gRPC C core (python3-grpcio, installed by scripts/lib/install-deps.sh), with the request encoded by hand
/// (ServerReflectionRequest field 7, list_services = "") and the answer read as raw bytes.
#[tokio::test(flavor = "multi_thread")]
async fn reflection_answers_v1_and_v1alpha_to_an_independent_client() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("agent.sock");
    let (stop_tx, server) = start(&socket);
    let client = connected(&socket).await;
    client.agent_info().await.unwrap();
    let script = r#"
import sys, grpc
channel = grpc.insecure_channel("unix:" + sys.argv[1])
for version in ("v1", "v1alpha"):
    call = channel.stream_stream(f"/grpc.reflection.{version}.ServerReflection/ServerReflectionInfo")
    answer = b"".join(call(iter([b"\x3a\x00"]), timeout=10))
    print(version, "wukong.agent.v1.DiskAgent" in answer.decode("latin-1"), "grpc.health.v1.Health" in answer.decode("latin-1"))
"#;
    let out = tokio::process::Command::new("/usr/bin/python3")
        .arg("-c")
        .arg(script)
        .arg(&socket)
        .output()
        .await
        .expect("python3 runs");
    stop_tx.send(()).unwrap();
    server.await.unwrap().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(stdout, "v1 True True\nv1alpha True True\n");
}
