//! Profile B: a Debian guest with systemd as PID 1, where the agent is installed the way users install it, by
//! cloud-init (NoCloud) from `systemd/cloud-init/user-data.yaml` rendered with the shipped unit and configuration.
//! The binary it downloads is the one users download: the glibc 2.17 build of `scripts/lib/build-guest-agent.sh`
//! (`agent_binary()`), served over HTTP from the host.
//! Checks that cloud-init used the NoCloud seed, that the shipped unit runs the agent under systemd (READY, the
//! watchdog, a restart after a crash), and, under the unit's hardening, a refusal naming the user, a release
//! undone by a cancel and a full safe attach and detach from the host over mutual TLS.

use anyhow::{Context, Result, ensure};
use std::process::Command;
use std::time::{Duration, Instant};
use tonic::Code;
use wukong_controller_client::agent_client::{AgentClient, TlsFiles};
use wukong_controller_client::companion::{self, AttachOptions, DetachOptions};
use wukong_controller_client::hypervisor::{DiskBus, VolumeSource, VolumeSpec};
use wukong_controller_client::qemu::Qemu;
use wukong_e2e::pki::Pki;
use wukong_e2e::{FileServer, Guest, agent_binary, nocloud_seed, workspace_root};

fn sha256(path: &std::path::Path) -> Result<String> {
    let out = Command::new("sha256sum").arg(path).output()?;
    Ok(String::from_utf8(out.stdout)?.split_whitespace().next().context("sha256sum printed nothing")?.to_string())
}

fn tls(pki: &Pki, name: &str) -> TlsFiles {
    TlsFiles { server_name: Some("wukong-agent".into()), ..pki.client(name) }
}

async fn systemctl_show(guest: &Guest, props: &str) -> Result<String> {
    guest.run_ok(&format!("systemctl show -p {props} wukong-agent.service")).await
}

#[tokio::test(flavor = "multi_thread")]
async fn cloud_init_installs_the_agent_under_systemd_and_a_safe_detach_works_over_mtls() -> Result<()> {
    let pki = Pki::new();
    let files = FileServer::start(&agent_binary()).await?;
    let root = workspace_root();
    let rendered = Command::new("bash")
        .arg(root.join("scripts/render-user-data.sh"))
        .args(["--agent-url", &format!("http://10.0.2.2:{}/wukong-agent", files.port)])
        .args(["--agent-sha256", &sha256(&agent_binary())?])
        .arg("--cert")
        .arg(pki.path("agent.crt"))
        .arg("--key")
        .arg(pki.path("agent.key"))
        .arg("--client-ca")
        .arg(pki.path("ca.crt"))
        .output()?;
    ensure!(rendered.status.success(), "{}", String::from_utf8_lossy(&rendered.stderr));
    let seed = nocloud_seed(pki.dir.path(), &String::from_utf8(rendered.stdout)?)?;
    let started = Instant::now();
    let guest = Guest::boot_systemd(&seed).await?;
    let booted = started.elapsed();

    let status = guest.run("cloud-init status --wait --long").await?;
    ensure!(status.output.contains("status: done"), "cloud-init did not finish cleanly:\n{}", status.output);
    ensure!(status.output.contains("DataSourceNoCloud"), "cloud-init did not use the NoCloud seed:\n{}", status.output);
    let installed = started.elapsed();

    // The shipped unit, verbatim, running the agent: Type=notify means active only after READY=1.
    let unit_sum = guest.run_ok("sha256sum /etc/systemd/system/wukong-agent.service").await?;
    assert!(unit_sum.starts_with(&sha256(&root.join("systemd/wukong-agent.service"))?), "the unit is the shipped one");
    assert_eq!(guest.run_ok("systemctl is-active wukong-agent.service").await?.trim(), "active");
    let shown = systemctl_show(&guest, "Type -p Restart -p WatchdogUSec -p NRestarts -p StatusErrno").await?;
    for expected in ["Type=notify", "Restart=on-failure", "WatchdogUSec=30s", "NRestarts=0"] {
        assert!(shown.lines().any(|l| l == expected), "{expected} not in:\n{shown}");
    }
    let journal = guest.run_ok("journalctl -u wukong-agent.service --no-pager -o cat").await?;
    assert!(journal.contains("wukong-agent ready"), "{journal}");
    assert!(journal.contains("serving gRPC over mutual TLS"), "{journal}");

    // Only clients of the CA get in; only the companion may release.
    let companion_tls = tls(&pki, "wukong-companion");
    let agent = AgentClient::connect_with(guest.agent_address(), Some(&companion_tls))?;
    let info = agent.agent_info().await?;
    assert!(!info.read_only, "the companion may release disks");
    let viewer = AgentClient::connect_with(guest.agent_address(), Some(&tls(&pki, "viewer")))?;
    let denied = viewer.prepare_detach("anything", true, false).await.unwrap_err();
    assert_eq!(denied.code(), Some(Code::PermissionDenied), "{denied}");
    let plain = AgentClient::connect(guest.agent_address())?.agent_info().await.unwrap_err();
    assert!(plain.code().is_none(), "plaintext is refused by the TLS listener: {plain}");

    // systemd restarts the agent after a crash. SIGABRT is what a panic raises (panic = "abort"); a SIGSEGV sent
    // by kill would only reset Rust's stack-overflow handler.
    guest.run_ok("kill -ABRT $(pidof wukong-agent)").await?;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let shown = systemctl_show(&guest, "NRestarts -p ActiveState").await?;
        if shown.contains("NRestarts=1") && shown.contains("ActiveState=active") {
            break;
        }
        ensure!(Instant::now() < deadline, "systemd did not restart the agent:\n{shown}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    agent.agent_info().await.context("the restarted agent answers")?;

    // A full safe attach and detach from the host, over mutual TLS, under the unit's sandbox.
    let qemu = Qemu::connect(&guest.companion_qmp()).await?;
    let volume = VolumeSpec {
        name: "data-b".into(),
        serial: "data-b".into(),
        bus: DiskBus::Scsi,
        source: VolumeSource::Image { path: guest.new_image(64 << 20)?, format: "raw".into() },
    };
    let attach = AttachOptions { timeout: Duration::from_secs(60), poll: Duration::from_millis(100) };
    let disk = companion::attach(&qemu, &agent, &volume, &attach, &|_| {}).await?.disk;
    let sum = guest.fill(&disk.dev_node, "/mnt/b", 4 << 20).await?;

    // The hardened unit (systemd-analyze security: 3.1): a seccomp allow-list, /sys read-only but for
    // /sys/devices, block devices only. Under it, a refusal names the user, and a release is undone by a cancel.
    let sandbox = guest.run_ok("grep -E '^(Seccomp|NoNewPrivs):' /proc/$(pidof wukong-agent)/status").await?;
    assert!(sandbox.contains("Seccomp:\t2") && sandbox.contains("NoNewPrivs:\t1"), "{sandbox}");
    let holder = guest
        .run_ok("sh -c 'exec 3>>/mnt/b/log; exec sleep 600' </dev/null >/dev/null 2>&1 & echo $!")
        .await?
        .trim()
        .to_string();
    let refused = agent.prepare_detach("data-b", true, false).await.unwrap_err();
    assert_eq!(refused.code(), Some(Code::FailedPrecondition), "{refused}");
    assert!(
        refused.to_string().contains(&format!("(pid {holder}, uid 0) has /mnt/b/log open for writing")),
        "{refused}"
    );
    guest.run_ok(&format!("kill {holder}; while [ -e /proc/{holder} ]; do sleep 0.1; done")).await?;
    let released = agent.prepare_detach("data-b", true, false).await?;
    assert!(released.released, "{released:?}");
    let kinds: Vec<&str> = released.actions.iter().map(|a| a.kind.as_str()).collect();
    assert!(kinds.contains(&"scsi-delete"), "the sandboxed agent deleted the SCSI device: {kinds:?}");
    let cancelled = agent.cancel_detach("data-b").await?;
    let kinds: Vec<&str> = cancelled.actions.iter().map(|a| a.kind.as_str()).collect();
    assert!(kinds.contains(&"scsi-rescan") && kinds.contains(&"mount"), "rescanned and mounted back: {kinds:?}");
    assert_eq!(guest.checksum("/mnt/b/data").await?, sum, "data intact after a release and a cancel");

    let options = DetachOptions {
        volume: "data-b".into(),
        serial: None,
        unmount: true,
        force: false,
        timeout: Duration::from_secs(60),
        poll: Duration::from_millis(100),
    };
    let detached = companion::detach(&qemu, &agent, &options, &|_| {}).await?;
    let mut kinds: Vec<String> = detached.release.iter().flat_map(|r| &r.actions).map(|a| a.kind.clone()).collect();
    let unmounts = kinds.iter().filter(|k| *k == "unmount").count();
    // systemd's sandboxed services (the agent's own unit among them) hold copies of the mount in their private
    // namespaces: the release undoes every one.
    assert!(unmounts >= 2, "the mount is undone in the host's namespace and in private ones: {kinds:?}");
    kinds.dedup();
    assert_eq!(kinds, ["scan", "unmount", "verify", "flush", "scsi-delete"], "the sandboxed agent did every step");
    let disk = companion::attach(&qemu, &agent, &volume, &attach, &|_| {}).await?.disk;
    guest.run_ok(&format!("mount {} /mnt/b", disk.dev_node)).await?;
    assert_eq!(guest.checksum("/mnt/b/data").await?, sum, "data intact after a safe detach and re-attach");
    eprintln!(
        "profile B: systemd up in {:.1} s, agent installed by cloud-init after {:.1} s",
        booted.as_secs_f64(),
        installed.as_secs_f64()
    );
    Ok(())
}
