//! Benchmark: the ways to reach the agent, in the same lab run against the same guest and agent (one with a NIC and
//! a vsock device): TCP (QEMU's user network), plain vsock (the guest's AF_VSOCK, reached through the VMM's hybrid
//! vsock socket, as Firecracker and vhost-device-vsock expose it), and KubeVirt's vsock subresource through the
//! genuine API server in both TLS modes (`tls=false`: raw bytes to the guest; `tls=true`: virt-handler's TLS 1.3 to
//! the guest). Medians of 20: a GetAgentInfo round trip on an open connection, a new connection and its first call,
//! and a safe detach (the guest releases an unmounted 64 MiB SCSI disk over that transport, then QEMU unplugs it:
//! `device_del` until `DEVICE_DELETED`). Then the agent's
//! resident memory with all these listeners. The agent serves plaintext gRPC on TCP and vsock here (a lab), so
//! the numbers compare transports, not TLS.
//!
//! Run: `cargo run -p wukong-e2e --bin transport-latency` (after `scripts/lib/build-guest-agent.sh`).

use anyhow::{Context, Result};
use std::time::{Duration, Instant};
use wukong_controller_client::agent_client::{AgentAddress, Dialer, VsockTls};
use wukong_e2e::cluster::{ADMIN, Cluster};
use wukong_e2e::kubevirt_lab::{API_SERVER, CONTROLLER, HANDLER, HotplugMode, KubeVirtConfig, KubeVirtLab, VmOptions};
use wukong_e2e::{DiskSpec, Guest, GuestOptions, median, millis};

const SAMPLES: usize = 20;
const NS: &str = "bench";
const LISTEN: &str = "--listen 0.0.0.0:7443 --listen vsock://7443 --listen kubevirt-vsock://7444 --insecure-plaintext";

#[tokio::main]
async fn main() -> Result<()> {
    let guest = Guest::boot_with_options(&GuestOptions { vsock: true, ..Default::default() }).await?;
    let cluster = Cluster::start(&[API_SERVER, CONTROLLER, HANDLER]).await?;
    let config = KubeVirtConfig { hotplug: HotplugMode::Declarative, vsock: true };
    let kubevirt = KubeVirtLab::start_with(&cluster, Some(&guest), NS, config).await?;
    kubevirt.create_vm_with("vm", true, &VmOptions { interface_ip: None, vsock: true, ..Default::default() }).await?;
    // Restarted once the lab's virt-handler serves KubeVirt's CA, so its kubevirt-vsock listener has it at once.
    guest.install_agent(&[], LISTEN, None).await?;
    let admin = cluster.client(ADMIN).await?;
    let subresource = |port, tls| AgentAddress::KubeVirtVsock { namespace: NS.into(), name: "vm".into(), port, tls };
    let transports = [
        ("TCP", guest.agent_address()),
        ("plain vsock (hybrid socket)", AgentAddress::HybridVsock { path: guest.vsock_socket(), port: 7443 }),
        ("KubeVirt subresource, tls=false", subresource(7443, VsockTls::Agent)),
        ("KubeVirt subresource, tls=true", subresource(7444, VsockTls::KubeVirt)),
    ];
    let dialer = Dialer::new().with_kube(admin);
    let client = |address: &AgentAddress| dialer.connect(address.clone()).context("a client");
    // tls=true needs the CA the agent fetches in the background after its start.
    let deadline = Instant::now() + Duration::from_secs(60);
    while client(&transports[3].1)?.agent_info().await.is_err() {
        anyhow::ensure!(Instant::now() < deadline, "the agent's kubevirt-vsock listener never served");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    let mut rows = Vec::new();
    for (n, (name, address)) in transports.iter().enumerate() {
        let agent = client(address)?;
        agent.agent_info().await?;
        let mut round_trips = Vec::new();
        for _ in 0..SAMPLES {
            let started = Instant::now();
            agent.agent_info().await?;
            round_trips.push(millis(started.elapsed()));
        }
        let mut first_calls = Vec::new();
        for _ in 0..SAMPLES {
            let started = Instant::now();
            client(address)?.agent_info().await?;
            first_calls.push(millis(started.elapsed()));
        }
        let mut detaches = Vec::new();
        for i in 0..SAMPLES {
            let disk = guest.hotplug(&DiskSpec::scsi(&format!("t{n}d{i:02}"))).await?;
            agent.wait_for_disk(&disk.spec.serial, Duration::from_secs(30)).await?;
            // A safe detach as the companion does it, over this transport: the guest releases, then QEMU unplugs.
            let started = Instant::now();
            let released = agent.prepare_detach(&disk.spec.serial, false, false).await?;
            anyhow::ensure!(released.released, "{} was not released: {released:?}", disk.spec.serial);
            guest.unplug(&disk).await?;
            detaches.push(millis(started.elapsed()));
        }
        rows.push((name, median(round_trips), median(first_calls), median(detaches)));
    }
    let rss = guest.run_ok("grep -E 'VmRSS|VmHWM' /proc/$(pidof wukong-agent)/status | tr -s ' \\t' ' '").await?;

    println!("reaching the agent, one TCG guest, the same agent and disk kind for all, medians of {SAMPLES}:");
    println!("  {:<34} {:>14} {:>22} {:>14}", "transport", "GetAgentInfo", "new connection + call", "safe detach");
    let (_, tcp_rtt, tcp_first, tcp_detach) = rows[0];
    for (name, rtt, first, detach) in &rows {
        println!(
            "  {name:<34} {rtt:7.2} ms {:4.1}x {first:12.2} ms {:5.1}x {detach:7.1} ms {:4.2}x",
            rtt / tcp_rtt,
            first / tcp_first,
            detach / tcp_detach
        );
    }
    println!("the agent with TCP, vsock and kubevirt-vsock listeners: {}", rss.trim().replace('\n', ", "));
    guest.shutdown().await;
    Ok(())
}
