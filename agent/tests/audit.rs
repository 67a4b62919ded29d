//! The agent's audit trail, read from the real binary's log: every refused TLS handshake (with the peer's address
//! and why) and every refused release (with the client's certificate name and the method).

mod common;

use common::binary::AgentProcess;
use std::path::Path;
use wukong_controller_client::agent_client::{AgentAddress, AgentClient};
use wukong_e2e::pki::Pki;

/// Starts the agent with mutual TLS on a loopback port and `extra` flags; returns it and its TCP address.
fn start(pki: &Pki, dir: &Path, extra: &[&str]) -> (AgentProcess, AgentAddress) {
    let mut args: Vec<String> = vec!["--listen".into(), "127.0.0.1:0".into()];
    for (flag, path) in [
        ("--socket", dir.join("agent.sock")),
        ("--state-dir", dir.join("state")),
        ("--tls-cert", pki.path("agent.crt")),
        ("--tls-key", pki.path("agent.key")),
        ("--tls-client-ca", pki.path("ca.crt")),
    ] {
        args.extend([flag.to_string(), path.display().to_string()]);
    }
    args.extend(extra.iter().map(|s| s.to_string()));
    let agent = AgentProcess::start(&args);
    let line = agent.wait_for_line("serving gRPC over mutual TLS");
    let address = line.split("address=").nth(1).expect("the listener's address is logged").trim().to_string();
    (agent, AgentAddress::Tcp(format!("http://{address}")))
}

/// A TLS client that trusts the agent's CA but offers no certificate of its own.
async fn without_certificate(pki: &Pki, address: &AgentAddress) {
    use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};
    let AgentAddress::Tcp(url) = address else { unreachable!() };
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(std::fs::read(pki.path("ca.crt")).unwrap()))
        .domain_name("wukong-agent");
    let url = url.replace("http://", "https://");
    let channel = Endpoint::from_shared(url).unwrap().tls_config(tls).unwrap().connect_lazy();
    let mut client = wukong_proto::v1::disk_agent_client::DiskAgentClient::new(channel);
    client.get_agent_info(wukong_proto::v1::GetAgentInfoRequest {}).await.unwrap_err();
}

/// The one log line that contains every one of `needles`, waiting for it.
fn logged(agent: &AgentProcess, needles: &[&str]) -> String {
    agent.wait_for_line(needles[0]);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        if let Some(line) = agent.log().lines().find(|l| needles.iter().all(|n| l.contains(n))) {
            return line.to_string();
        }
        assert!(std::time::Instant::now() < deadline, "no log line with all of {needles:?}; log:\n{}", agent.log());
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn refused_handshakes_are_logged_with_the_peer_and_the_reason() {
    let pki = Pki::new();
    let dir = tempfile::tempdir().unwrap();
    let (agent, address) = start(&pki, dir.path(), &[]);
    let refused = "refused a TLS connection";

    let intruder = AgentClient::connect_with(address.clone(), Some(&pki.client("intruder"))).unwrap();
    intruder.agent_info().await.expect_err("a certificate of another CA is refused");
    let line = logged(&agent, &[refused, "not signed by the client CA"]);
    assert!(line.contains("WARN") && line.contains("peer=127.0.0.1:"), "{line}");

    AgentClient::connect(address.clone()).unwrap().agent_info().await.expect_err("plaintext is refused");
    let line = logged(&agent, &[refused, "does not speak TLS"]);
    assert!(line.contains("peer=127.0.0.1:"), "{line}");

    without_certificate(&pki, &address).await;
    let line = logged(&agent, &[refused, "sent no client certificate"]);
    assert!(line.contains("peer=127.0.0.1:"), "{line}");

    let operator = AgentClient::connect_with(address, Some(&pki.client("operator"))).unwrap();
    let info = operator.agent_info().await.expect("a client of the CA is served");
    assert!(!info.read_only, "the operator's certificate reached the service (no allow-list: it may release)");
    let log = agent.stop();
    // The companion's client retries, so one refused client may be several lines; but each line is one of the
    // three refusals above, never the operator.
    let reasons = ["not signed by the client CA", "does not speak TLS", "sent no client certificate"];
    for line in log.lines().filter(|l| l.contains(refused)) {
        assert!(reasons.iter().any(|r| line.contains(r)), "the operator was not refused: {line}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn refused_releases_are_logged_with_the_client_and_the_method() {
    let pki = Pki::new();
    let dir = tempfile::tempdir().unwrap();
    let (agent, address) = start(&pki, dir.path(), &["--allow-client", "operator"]);
    let viewer = AgentClient::connect_with(address.clone(), Some(&pki.client("viewer"))).unwrap();
    viewer.prepare_detach("pg-data", true, false).await.expect_err("the viewer may not release");
    let line = logged(&agent, &["refused a release", "PrepareDetach"]);
    assert!(line.contains("WARN") && line.contains("client=\"viewer\""), "{line}");
    assert!(line.contains("peer=127.0.0.1:") && line.contains("allowed clients: operator"), "{line}");
    viewer.cancel_detach("pg-data").await.expect_err("nor cancel one");
    let line = logged(&agent, &["refused a release", "CancelDetach"]);
    assert!(line.contains("client=\"viewer\""), "{line}");
    // An allowed client is logged as allowed, not refused (its request reaches the release, which knows no such
    // disk).
    let operator = AgentClient::connect_with(address, Some(&pki.client("operator"))).unwrap();
    operator.prepare_detach("pg-data", true, true).await.expect_err("no such disk");
    let line = logged(&agent, &["allowed a release", "PrepareDetach"]);
    assert!(
        line.contains("INFO") && line.contains("client=\"operator\"") && line.contains("peer=127.0.0.1:"),
        "{line}"
    );
    let log = agent.stop();
    assert_eq!(log.matches("refused a release").count(), 2, "{log}");
    let by_operator: Vec<&str> = log.lines().filter(|l| l.contains("client=\"operator\"")).collect();
    assert!(by_operator.len() == 1 && by_operator[0].contains("allowed a release"), "{log}");

    let dir = tempfile::tempdir().unwrap();
    let (agent, address) = start(&pki, dir.path(), &["--read-only"]);
    let operator = AgentClient::connect_with(address, Some(&pki.client("operator"))).unwrap();
    operator.prepare_detach("pg-data", false, false).await.expect_err("read-only");
    let line = logged(&agent, &["refused a release", "PrepareDetach"]);
    assert!(line.contains("client=\"operator\"") && line.contains("read-only"), "{line}");
    agent.stop();
}
