//! Profile B: a Debian guest with systemd as PID 1, where the agent is installed the way users install it, by
//! cloud-init (NoCloud) from `systemd/cloud-init/user-data.yaml` rendered with the shipped unit and configuration:
//! the .deb of `scripts/package-agent.sh` (dpkg and its maintainer scripts), and the bare binary. Both carry the
//! binary users download, the glibc 2.17 build of `scripts/lib/build-guest-agent.sh` (`agent_binary()`), served
//! over HTTP from the host.
//! Checks that cloud-init used the NoCloud seed, that the shipped unit runs the agent under systemd (READY, the
//! watchdog, a restart after a crash), and, under the unit's hardening, a refusal naming the user, a release that
//! survives a restart of the agent and is undone by the restarted agent's cancel, a release interrupted by a
//! crash and undone by the agent systemd restarts, and a full safe attach and detach from the host over mutual
//! TLS; that the bare binary serves over vsock as well as TCP under the unit (the guest has both); then that an upgrade to a newer .deb keeps a modified configuration and restarts the agent with it, and
//! that a purge removes the package but keeps a journalled release.

use anyhow::{Context, Result, ensure};
use std::process::Command;
use std::time::{Duration, Instant};
use tonic::Code;
use wukong_controller_client::agent_client::{AgentAddress, AgentClient, TlsFiles};
use wukong_controller_client::companion::{self, AttachOptions, DetachOptions};
use wukong_controller_client::hypervisor::{DiskBus, VolumeSource, VolumeSpec};
use wukong_controller_client::qemu::Qemu;
use wukong_e2e::pki::Pki;
use wukong_e2e::{FileServer, Guest, agent_binary, agent_packages, nocloud_seed, workspace_root};
use wukong_proto::v1::DiskState;

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

/// Boots profile B with the user data rendered for `flag URL` (the file's SHA-256) and a throwaway PKI, and waits
/// for cloud-init, which must have finished cleanly from the NoCloud seed. Returns the guest and the times from
/// start to systemd's readiness and to cloud-init's end.
async fn boot_installed(
    pki: &Pki,
    flag: &str,
    url: &str,
    file: &std::path::Path,
) -> Result<(Guest, Duration, Duration)> {
    let rendered = Command::new("bash")
        .arg(workspace_root().join("scripts/render-user-data.sh"))
        .args([flag, url])
        .args(["--agent-sha256", &sha256(file)?])
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
    Ok((guest, booted, started.elapsed()))
}

/// Waits until the unit is active (after READY=1) with a main process other than `old_pid`; returns the new one.
async fn wait_restarted(guest: &Guest, old_pid: &str) -> Result<String> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let shown = systemctl_show(guest, "MainPID -p ActiveState").await?;
        let pid = shown.lines().find_map(|l| l.strip_prefix("MainPID=")).unwrap_or_default().to_string();
        if shown.contains("ActiveState=active") && pid != old_pid && pid != "0" {
            return Ok(pid);
        }
        ensure!(Instant::now() < deadline, "the agent did not come back:\n{shown}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// The release journal's files, one a line (empty when there is none).
async fn journal_files(guest: &Guest) -> Result<String> {
    guest.run_ok("ls -A /run/wukong-agent/releases 2>/dev/null || true").await
}

#[tokio::test(flavor = "multi_thread")]
async fn cloud_init_installs_the_deb_a_safe_detach_works_over_mtls_and_an_upgrade_keeps_the_configuration() -> Result<()>
{
    let pki = Pki::new();
    let packages = tempfile::tempdir()?;
    let version = env!("CARGO_PKG_VERSION");
    // The upgrade: the same binary packaged as the next patch version.
    let (major_minor, patch) = version.rsplit_once('.').context("a MAJOR.MINOR.PATCH version")?;
    let next = format!("{major_minor}.{}", patch.parse::<u32>()? + 1);
    let (deb, _) = agent_packages(packages.path(), version)?;
    let (next_deb, _) = agent_packages(packages.path(), &next)?;
    let files = FileServer::start(&[&deb, &next_deb]).await?;
    let root = workspace_root();
    let (guest, booted, installed) = boot_installed(&pki, "--agent-deb", &files.url(&deb), &deb).await?;

    // Installed by dpkg, enabled and started by its postinst; cloud-init's staged copies are gone.
    let status = guest.run_ok("dpkg-query -W -f '${Version} ${Status}' wukong-agent").await?;
    assert_eq!(status, format!("{version} install ok installed"));
    assert_eq!(guest.run_ok("systemctl is-enabled wukong-agent.service").await?.trim(), "enabled");
    let left = guest.run("ls /etc/systemd/system/wukong-agent.service /etc/wukong-agent/wukong-agent.service /etc/wukong-agent/wukong-agent.tmpfiles /var/tmp/wukong-agent.deb").await?;
    assert_eq!(left.output.matches("No such file").count(), 4, "one unit, the package's: {}", left.output);
    // The shipped unit, verbatim, running the agent: Type=notify means active only after READY=1.
    let unit_sum = guest.run_ok("sha256sum /lib/systemd/system/wukong-agent.service").await?;
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

    // The hardened unit (systemd-analyze security: 3.4): a seccomp allow-list, /sys read-only but for
    // /sys/devices, block devices only. Under it, a refusal names the user, and a release is undone by a cancel.
    let sandbox = guest.run_ok("grep -E '^(Seccomp|NoNewPrivs):' /proc/$(pidof wukong-agent)/status").await?;
    assert!(sandbox.contains("Seccomp:\t2") && sandbox.contains("NoNewPrivs:\t1"), "{sandbox}");
    // The unit lets the usage scan load its BPF iterators (CAP_SYS_ADMIN, and bpf alone of @privileged).
    let info = agent.agent_info().await?;
    assert_eq!(info.usage_scanner, "bpf", "{}", info.usage_scanner_reason);
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
    let fence = &released.actions.last().unwrap().description;
    assert!(fence.starts_with("set SCSI device /dev/") && fence.contains(" offline"), "the sandbox lets it: {fence}");
    // The journal outlives the agent: no systemd removes /run/wukong-agent when the service stops (it is no
    // RuntimeDirectory, which systemd < 235 removes on every stop), and the restarted agent cancels the release.
    assert_eq!(systemctl_show(&guest, "RuntimeDirectory").await?.trim(), "RuntimeDirectory=");
    let journalled = journal_files(&guest).await?;
    assert!(!journalled.trim().is_empty(), "the release is journalled");
    let pid = systemctl_show(&guest, "MainPID").await?.trim().trim_start_matches("MainPID=").to_string();
    guest.run_ok("systemctl stop wukong-agent.service").await?;
    assert_eq!(journal_files(&guest).await?, journalled, "the journal is still there with the agent stopped");
    guest.run_ok("systemctl start wukong-agent.service").await?;
    wait_restarted(&guest, &pid).await?;
    let cancelled = agent.cancel_detach("data-b").await?;
    let kinds: Vec<&str> = cancelled.actions.iter().map(|a| a.kind.as_str()).collect();
    assert!(kinds.contains(&"scsi-rescan") && kinds.contains(&"mount"), "rescanned and mounted back: {kinds:?}");
    assert_eq!(guest.checksum("/mnt/b/data").await?, sum, "data intact after a release and a cancel");

    // A release interrupted by a crash: the agent is SIGKILLed after it unmounted the disk, while what looks like
    // a udev probe holds it; systemd restarts it (the journal untouched, as on any systemd) and the new agent
    // undoes the release: the disk is present and mounted again.
    // The unmount is slowed by unwritten data, so the probe holds the disk before the agent's final scan however
    // slowly the emulated guest schedules it (without that, a CI run saw the release finish first).
    // The cancel's rescan may have named the disk anew.
    let dev = agent.get_disk("data-b", false).await?.dev_node;
    guest.slow_unmount("/mnt/b", 32 << 20).await?;
    guest.probe_after_unmount(&dev, "/mnt/b").await?;
    let release = tokio::spawn({
        let agent = agent.clone();
        async move { agent.prepare_detach("data-b", true, false).await }
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    while guest.run("grep -q ' /mnt/b ' /proc/mounts").await?.status == 0 {
        ensure!(Instant::now() < deadline, "the release never unmounted /mnt/b");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    guest.wait_for_probe_hold(Duration::from_secs(30)).await?;
    assert_eq!(agent.get_disk("data-b", false).await?.state(), DiskState::Releasing);
    let pid = systemctl_show(&guest, "MainPID").await?.trim().trim_start_matches("MainPID=").to_string();
    guest.run_ok("kill -KILL $(pidof wukong-agent)").await?;
    assert!(release.await?.is_err(), "the interrupted release did not answer success");
    wait_restarted(&guest, &pid).await?;
    assert_eq!(agent.get_disk("data-b", false).await?.state(), DiskState::Present, "never stuck RELEASING");
    guest.run_ok("grep -q ' /mnt/b ' /proc/mounts").await.context("the interrupted release was undone: mounted")?;
    let journal = guest.run_ok("journalctl -u wukong-agent.service --no-pager -o cat").await?;
    assert!(journal.contains("undoing a release the previous agent process did not finish"), "{journal}");
    guest.run_ok("kill $(cat /tmp/probe/pid)").await?;
    assert_eq!(guest.checksum("/mnt/b/data").await?, sum, "data intact after an interrupted release");

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

    // An upgrade keeps a modified configuration (a conffile the new package does not change: dpkg keeps it without
    // asking) and restarts the agent, which then serves with it: a second listener.
    guest
        .run_ok("sed -i 's/^listen = .*/listen = [\"0.0.0.0:7443\", \"127.0.0.1:7444\"]/' /etc/wukong-agent/agent.toml")
        .await?;
    let pid = systemctl_show(&guest, "MainPID").await?.trim().trim_start_matches("MainPID=").to_string();
    let upgrade = guest
        .run(&format!(
            "curl -fsS -o /var/tmp/next.deb {} && dpkg -i /var/tmp/next.deb </dev/null 2>&1",
            files.url(&next_deb)
        ))
        .await?;
    assert_eq!(upgrade.status, 0, "{}", upgrade.output);
    assert!(!upgrade.output.contains("Configuration file"), "dpkg asked nothing: {}", upgrade.output);
    let status = guest.run_ok("dpkg-query -W -f '${Version} ${Status}' wukong-agent").await?;
    assert_eq!(status, format!("{next} install ok installed"));
    let config = guest.run_ok("grep '^listen' /etc/wukong-agent/agent.toml; ls /etc/wukong-agent").await?;
    assert!(
        config.starts_with("listen = [\"0.0.0.0:7443\", \"127.0.0.1:7444\"]\n"),
        "the configuration is kept:\n{config}"
    );
    assert!(!config.contains("dpkg-"), "no .dpkg-dist or .dpkg-old beside it:\n{config}");
    wait_restarted(&guest, &pid).await?;
    let listening = guest.run_ok("ss -Hltn 'sport = :7444'").await?;
    assert!(listening.contains("127.0.0.1:7444"), "the restarted agent serves the kept configuration: {listening:?}");
    assert!(!agent.agent_info().await.context("the upgraded agent answers")?.read_only);

    // A purge removes what the package made, but keeps a journalled release: only an agent that finds it can give
    // the disk back before the next boot.
    let released = agent.prepare_detach("data-b", true, false).await?;
    assert!(released.released, "{released:?}");
    let purge = guest.run("dpkg --purge wukong-agent 2>&1").await?;
    assert_eq!(purge.status, 0, "{}", purge.output);
    assert!(
        purge.output.contains(
            "wukong-agent: kept /run/wukong-agent: its release journal holds a release (reinstall the agent to \
             cancel it; it goes at the next boot)"
        ),
        "{}",
        purge.output
    );
    let gone = guest
        .run("ls /usr/sbin/wukong-agent /lib/systemd/system/wukong-agent.service /etc/wukong-agent/agent.toml /usr/lib/tmpfiles.d/wukong-agent.conf")
        .await?;
    assert_eq!(gone.output.matches("No such file").count(), 4, "{}", gone.output);
    let state = guest.run("systemctl is-active wukong-agent.service").await?;
    assert_eq!(state.output.trim(), "inactive");
    assert!(!journal_files(&guest).await?.trim().is_empty(), "the journalled release is kept");
    eprintln!(
        "profile B (.deb): systemd up in {:.1} s, agent installed by cloud-init after {:.1} s",
        booted.as_secs_f64(),
        installed.as_secs_f64()
    );
    Ok(())
}

/// The bare binary: /usr/sbin/wukong-agent with the unit and the tmpfiles.d entry from systemd/, as shipped.
#[tokio::test(flavor = "multi_thread")]
async fn cloud_init_installs_the_bare_binary_under_systemd() -> Result<()> {
    let pki = Pki::new();
    let binary = agent_binary();
    let files = FileServer::start(&[&binary]).await?;
    let root = workspace_root();
    let (guest, booted, installed) = boot_installed(&pki, "--agent-url", &files.url(&binary), &binary).await?;
    for (installed, shipped) in [
        ("/usr/sbin/wukong-agent", binary.clone()),
        ("/etc/systemd/system/wukong-agent.service", root.join("systemd/wukong-agent.service")),
        ("/etc/tmpfiles.d/wukong-agent.conf", root.join("systemd/wukong-agent.tmpfiles")),
    ] {
        let sum = guest.run_ok(&format!("sha256sum {installed}")).await?;
        assert!(sum.starts_with(&sha256(&shipped)?), "{installed} is {}", shipped.display());
    }
    assert_eq!(guest.run_ok("systemctl is-enabled wukong-agent.service").await?.trim(), "enabled");
    assert_eq!(guest.run_ok("systemctl is-active wukong-agent.service").await?.trim(), "active");
    assert_eq!(guest.run_ok("stat -c %a /run/wukong-agent").await?.trim(), "700");
    let agent = AgentClient::connect_with(guest.agent_address(), Some(&tls(&pki, "wukong-companion")))?;
    assert!(!agent.agent_info().await?.read_only, "serving the companion over mutual TLS");
    // The unit allows AF_VSOCK and the shipped configuration listens on vsock://7443: the VM's host reaches the
    // agent without the guest's network too, with the same mutual TLS.
    let vsock = AgentAddress::HybridVsock { path: guest.vsock_socket(), port: 7443 };
    let agent = AgentClient::connect_with(vsock, Some(&tls(&pki, "wukong-companion")))?;
    assert!(!agent.agent_info().await?.read_only, "serving the companion over vsock");
    let journal = guest.run_ok("journalctl -u wukong-agent.service -o cat").await?;
    assert!(
        journal.lines().any(|l| l.contains("serving gRPC over mutual TLS") && l.contains("vsock://7443")),
        "{journal}"
    );
    eprintln!(
        "profile B (binary): systemd up in {:.1} s, agent installed by cloud-init after {:.1} s",
        booted.as_secs_f64(),
        installed.as_secs_f64()
    );
    Ok(())
}
