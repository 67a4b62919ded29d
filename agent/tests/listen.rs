//! The real binary's listeners: IPv6 only, vsock beside TCP, plaintext on vsock refused, and a kubevirt-vsock
//! listener fetching KubeVirt's CA bundle. This machine's kernel binds AF_VSOCK but cannot connect to itself over it
//! (no loopback transport): a vsock connection is made in the QEMU guest lab; here what the binary does with the
//! flags is seen in its log.

mod common;

use common::binary::{AgentProcess, run_to_exit};
use std::path::Path;
use wukong_controller_client::agent_client::{AgentAddress, AgentClient};
use wukong_e2e::pki::Pki;

/// Flags for an agent whose files are under `dir`, listening on each of `listen`, and `extra`.
fn flags(dir: &Path, listen: &[&str], extra: &[String]) -> Vec<String> {
    let mut args = Vec::new();
    for address in listen {
        args.extend(["--listen".to_string(), address.to_string()]);
    }
    for (flag, path) in [("--socket", dir.join("agent.sock")), ("--state-dir", dir.join("state"))] {
        args.extend([flag.to_string(), path.display().to_string()]);
    }
    args.extend(extra.iter().cloned());
    args
}

fn tls_flags(pki: &Pki) -> Vec<String> {
    [("--tls-cert", "agent.crt"), ("--tls-key", "agent.key"), ("--tls-client-ca", "ca.crt")]
        .into_iter()
        .flat_map(|(flag, file)| [flag.to_string(), pki.path(file).display().to_string()])
        .collect()
}

/// The address a `message` log line names.
fn address(agent: &AgentProcess, message: &str) -> String {
    let line = agent.wait_for_line(message);
    line.split("address=").nth(1).expect("the listener's address is logged").trim().to_string()
}

/// A vsock port nobody else on this machine is likely to have taken.
fn vsock_port() -> u32 {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos();
    1_000_000 + (std::process::id() * 7919 + nanos) % 1_000_000_000
}

#[tokio::test(flavor = "multi_thread")]
async fn an_agent_listening_on_ipv6_loopback_only_answers_there() {
    let dir = tempfile::tempdir().unwrap();
    let agent = AgentProcess::start(&flags(dir.path(), &["[::1]:0"], &[]));
    let address = address(&agent, "serving plaintext gRPC on loopback");
    assert!(address.starts_with("[::1]:"), "{address}");
    let client = AgentClient::connect(AgentAddress::Tcp(format!("http://{address}"))).unwrap();
    let info = client.agent_info().await.expect("GetAgentInfo over IPv6");
    assert_eq!(info.version, env!("CARGO_PKG_VERSION"));
    let port = address.rsplit(':').next().unwrap();
    assert!(std::net::TcpStream::connect(format!("127.0.0.1:{port}")).is_err(), "nothing listens on IPv4 at {port}");
    agent.stop();
}

#[test]
fn plaintext_on_vsock_is_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let port = vsock_port();
    let (status, stderr) = run_to_exit(&flags(dir.path(), &["127.0.0.1:0", &format!("vsock://{port}")], &[]));
    assert!(!status.success(), "{stderr}");
    assert!(
        stderr.trim().starts_with(&format!("wukong-agent: refusing to serve plaintext gRPC on vsock://{port}: ")),
        "{stderr}"
    );
    assert!(stderr.contains("--insecure-plaintext"), "{stderr}");
}

/// Whether this kernel lets a vsock port be bound (it need not connect to it).
fn vsock_binds() -> bool {
    use nix::sys::socket::{AddressFamily, SockFlag, SockType, VsockAddr, bind, socket};
    socket(AddressFamily::Vsock, SockType::Stream, SockFlag::SOCK_CLOEXEC, None)
        .and_then(|fd| {
            bind(std::os::fd::AsRawFd::as_raw_fd(&fd), &VsockAddr::new(tokio_vsock::VMADDR_CID_ANY, vsock_port()))
        })
        .is_ok()
}

/// A vsock listener with the agent's mutual TLS beside TCP; a second agent on the same vsock port does not start
/// (a port in use is an error, not a missing device). On a kernel without vsock the address is skipped instead.
#[test]
fn a_vsock_listener_serves_beside_tcp_and_its_port_is_the_agents() {
    let pki = Pki::new();
    let dir = tempfile::tempdir().unwrap();
    let port = vsock_port();
    let vsock = format!("vsock://{port}");
    let first = AgentProcess::start(&flags(&dir.path().join("first"), &["127.0.0.1:0", &vsock], &tls_flags(&pki)));
    if !vsock_binds() {
        let line = first.wait_for_line("not listening on this address");
        assert!(line.contains("WARN") && line.contains(&vsock) && line.contains("no vsock device"), "{line}");
        return;
    }
    let serving = "serving gRPC over mutual TLS (client certificates required)";
    let log = first.log();
    assert!(log.lines().any(|l| l.contains(serving) && l.ends_with(&format!("address={vsock}"))), "{log}");
    assert!(log.lines().any(|l| l.contains(serving) && l.contains("address=127.0.0.1:")), "{log}");

    let (status, stderr) = run_to_exit(&flags(&dir.path().join("second"), &[&vsock], &tls_flags(&pki)));
    assert!(!status.success(), "{stderr}");
    let last = stderr.lines().rfind(|l| !l.trim().is_empty()).unwrap();
    assert!(last.starts_with(&format!("wukong-agent: cannot listen on {vsock}: ")), "{stderr}");
    assert!(last.ends_with("is another agent running?"), "{stderr}");
    first.stop();
}

/// KubeVirt's `System` service, serving `bundle` (PEM) as virt-handler does at vsock://2:1.
struct SystemService(Vec<u8>);

#[tonic::async_trait]
impl wukong_proto::kubevirt_system::system_server::System for SystemService {
    async fn ca_bundle(
        &self,
        _: tonic::Request<wukong_proto::kubevirt_system::EmptyRequest>,
    ) -> Result<tonic::Response<wukong_proto::kubevirt_system::Bundle>, tonic::Status> {
        Ok(tonic::Response::new(wukong_proto::kubevirt_system::Bundle { raw: self.0.clone() }))
    }
}

/// An agent with a kubevirt-vsock listener (and no TLS files: its certificate is self-signed) fetches KubeVirt's CA
/// bundle from where `--kubevirt-ca` says, at start.
#[tokio::test(flavor = "multi_thread")]
async fn a_kubevirt_vsock_listener_fetches_kubevirts_ca_at_start() {
    let pki = Pki::new();
    let dir = tempfile::tempdir().unwrap();
    let ca_socket = dir.path().join("kubevirt-ca.sock");
    let incoming = tokio_stream::wrappers::UnixListenerStream::new(tokio::net::UnixListener::bind(&ca_socket).unwrap());
    let service = wukong_proto::kubevirt_system::system_server::SystemServer::new(SystemService(
        std::fs::read(pki.path("ca.crt")).unwrap(),
    ));
    let _ca_server =
        tokio::spawn(tonic::transport::Server::builder().add_service(service).serve_with_incoming(incoming));
    let port = vsock_port();
    let kubevirt = format!("kubevirt-vsock://{port}");
    let ca = format!("unix:{}", ca_socket.display());
    let args = flags(dir.path(), &["127.0.0.1:0", &kubevirt], &["--kubevirt-ca".into(), ca.clone()]);
    // The agent's log is waited for off the runtime, which serves the CA meanwhile.
    tokio::task::spawn_blocking(move || {
        let agent = AgentProcess::start(&args);
        if !vsock_binds() {
            agent.wait_for_line("not listening on this address");
            return;
        }
        let line = agent.wait_for_line("serving gRPC to KubeVirt's vsock subresource (tls=true)");
        assert!(line.contains(&format!("ca={ca}")) && line.ends_with(&format!("address={kubevirt}")), "{line}");
        let line = agent.wait_for_line("KubeVirt's CA bundle fetched");
        assert!(line.contains("certificates=1"), "{line}");
        agent.stop();
    })
    .await
    .unwrap();
}
