//! The companion end to end: `wukongctl --qmp` (the real CLI, QEMU backend) and the real agent in the lab guest.
//! Attach waits for the guest; detach is refused while a file is open (exit 3, blockers printed), succeeds with
//! --unmount once it is closed, and the data survives re-attach; an unreachable agent refuses (exit 4) unless
//! --force; a hypervisor unplug that fails gives the guest its disk back, and so does a gate between the release and
//! the unplug that vetoes it.

use anyhow::{Context, Result};
use std::process::Output;
use std::time::Duration;
use wukong_controller_client::companion::{self, CompanionError, DetachOptions, Gate, UnplugGate};
use wukong_controller_client::hypervisor::{Hypervisor, HypervisorError, Removal, VolumeSpec, VolumeState};
use wukong_controller_client::qemu::Qemu;
use wukong_e2e::{Guest, wukongctl_binary};
use wukong_proto::v1::DiskState;

/// Runs `wukongctl --agent … ARGS --qmp …` against the guest (`--qmp` is a flag of attach and detach).
fn ctl(guest: &Guest, args: &[&str]) -> Result<Output> {
    let qmp = guest.companion_qmp();
    let qmp = qmp.to_str().context("a UTF-8 QMP socket path")?;
    agent_ctl(guest, &[args, &["--qmp", qmp]].concat())
}

/// Runs `wukongctl --agent … ARGS` against the guest's agent.
fn agent_ctl(guest: &Guest, args: &[&str]) -> Result<Output> {
    let out = std::process::Command::new(wukongctl_binary())
        .arg("--agent")
        .arg(guest.agent_address().to_string())
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .context("running wukongctl")?;
    Ok(out)
}

fn text(out: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

#[tokio::test(flavor = "multi_thread")]
async fn wukongctl_attach_and_safe_detach_over_qmp_keep_the_data() -> Result<()> {
    let guest = Guest::boot().await?;
    let image = guest.new_image(64 << 20)?;
    let image = image.to_str().unwrap();

    let out = ctl(&guest, &["-o", "json", "attach", "vol1", "--image", image, "--serial", "vol1"])?;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let attached: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let dev = attached["disk"]["dev_node"].as_str().context("the guest's device node")?.to_string();
    assert_eq!(attached["disk"]["serial"], "vol1");
    guest.run_ok(&format!("test -b {dev}")).await.context("the guest has the device")?;
    let again = ctl(&guest, &["attach", "vol1", "--image", image, "--serial", "vol1"])?;
    assert!(text(&again).contains("vol1 was already attached"), "idempotent: {}", text(&again));

    let sum = guest.fill(&dev, "/mnt/c", 8 << 20).await?;
    let pid = guest.run_ok("sh -c 'exec 3>>/mnt/c/log; exec sleep 1000' </dev/null >/dev/null 2>&1 & echo $!").await?;
    let pid = pid.trim();

    // In the guest people think in paths: `usage` takes the device, a file on it and the mount point as well.
    for name in [dev.as_str(), "/mnt/c/log", "/mnt/c", "vol1"] {
        let usage = agent_ctl(&guest, &["usage", name])?;
        assert_eq!(usage.status.code(), Some(3), "in use: {}", text(&usage));
        assert!(
            text(&usage).contains(&format!("(pid {pid}, uid 0) has /mnt/c/log open for writing")),
            "{}",
            text(&usage)
        );
    }
    let elsewhere = agent_ctl(&guest, &["usage", "/proc"])?;
    assert_eq!(elsewhere.status.code(), Some(6), "a path on no disk the agent knows: {}", text(&elsewhere));

    let refused = ctl(&guest, &["detach", "vol1", "--unmount"])?;
    assert_eq!(refused.status.code(), Some(3), "{}", text(&refused));
    let shown = text(&refused);
    assert!(shown.contains(&format!("sleep (pid {pid}, uid 0) has /mnt/c/log open for writing")), "{shown}");
    assert!(shown.contains("nothing was detached"), "{shown}");
    guest.run_ok(&format!("test -b {dev} && grep -q ' /mnt/c ' /proc/mounts")).await.context("still attached")?;

    guest.run_ok(&format!("kill {pid}; while kill -0 {pid} 2>/dev/null; do usleep 50000; done")).await?;
    let detached = ctl(&guest, &["detach", "vol1", "--unmount"])?;
    assert_eq!(detached.status.code(), Some(0), "{}", text(&detached));
    assert!(text(&detached).contains("vol1 is detached"), "{}", text(&detached));
    let gone = ctl(&guest, &["detach", "vol1"])?;
    assert!(text(&gone).contains("vol1 is not attached; nothing to do"), "{}", text(&gone));

    let out = ctl(&guest, &["-o", "json", "attach", "vol1", "--image", image, "--serial", "vol1"])?;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let dev: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let dev = dev["disk"]["dev_node"].as_str().unwrap().to_string();
    guest.run_ok(&format!("mount {dev} /mnt/c")).await?;
    assert_eq!(guest.checksum("/mnt/c/data").await?, sum, "data intact after detach + re-attach");

    // The agent stops answering: fail safe (exit 4), unless forced.
    guest.run_ok("kill $(pidof wukong-agent); while pidof wukong-agent >/dev/null; do usleep 50000; done").await?;
    let unreachable = ctl(&guest, &["detach", "vol1", "--unmount"])?;
    assert_eq!(unreachable.status.code(), Some(4), "{}", text(&unreachable));
    assert!(text(&unreachable).contains("nothing was detached (fail safe)"), "{}", text(&unreachable));
    guest.run_ok(&format!("test -b {dev}")).await.context("still attached after the refusal")?;
    let forced = ctl(&guest, &["detach", "vol1", "--force", "--timeout", "30"])?;
    assert_eq!(forced.status.code(), Some(0), "{}", text(&forced));
    assert!(text(&forced).contains("WARNING: vol1 was detached with --force"), "{}", text(&forced));
    guest.run_ok("umount -l /mnt/c").await?;
    guest.restart_agent().await?;
    Ok(())
}

/// A hypervisor whose unplug fails: QEMU is asked to delete a device id it does not have.
struct FailingUnplug(Qemu);

impl Hypervisor for FailingUnplug {
    fn describe(&self) -> String {
        self.0.describe()
    }
    async fn add_volume(&self, volume: &VolumeSpec) -> Result<(), HypervisorError> {
        self.0.add_volume(volume).await
    }
    async fn remove_volume(&self, name: &str) -> Result<Removal, HypervisorError> {
        self.0.remove_volume(&format!("{name}-elsewhere")).await
    }
    async fn volume_state(&self, name: &str) -> Result<VolumeState, HypervisorError> {
        self.0.volume_state(name).await
    }
}

/// A gate that answers `answer`, and remembers whom it was asked about.
struct Answer(Gate, std::sync::Mutex<Vec<String>>);

impl Answer {
    fn new(answer: Gate) -> Self {
        Self(answer, Default::default())
    }

    fn asked(&self) -> Vec<String> {
        self.1.lock().unwrap().clone()
    }
}

impl UnplugGate for Answer {
    async fn before_unplug(&self, serial: &str) -> Gate {
        self.1.lock().unwrap().push(serial.to_string());
        self.0.clone()
    }
}

/// A failed unplug, and a gate between the release and the unplug (what the operator's snapshot before a detach
/// is): one that vetoes gives the guest its disk back, one that holds leaves it released and plugged, and a detach
/// run again after a hold unplugs it.
#[tokio::test(flavor = "multi_thread")]
async fn a_failed_unplug_or_a_vetoing_gate_gives_the_guest_its_disk_back() -> Result<()> {
    let guest = Guest::boot().await?;
    let image = guest.new_image(64 << 20)?;
    let out = ctl(&guest, &["attach", "vol2", "--image", image.to_str().unwrap(), "--serial", "vol2"])?;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let dev = guest.agent().get_disk("vol2", false).await?.dev_node;
    let sum = guest.fill(&dev, "/mnt/f", 1 << 20).await?;

    let hypervisor = FailingUnplug(Qemu::connect(&guest.companion_qmp()).await?);
    let options = DetachOptions {
        volume: "vol2".into(),
        serial: None,
        unmount: true,
        force: false,
        timeout: Duration::from_secs(30),
        poll: Duration::from_millis(200),
    };
    let err = companion::detach(&hypervisor, &guest.agent(), &options, &|_| {}).await.unwrap_err();
    let CompanionError::RemoveFailed { undo, .. } = &err else { panic!("expected RemoveFailed, got {err}") };
    assert_eq!(undo, "the guest got its disk back (CancelDetach)", "{err}");
    assert!(err.to_string().contains("Device 'vol2-elsewhere' not found"), "QEMU's own error is kept: {err}");
    assert_eq!(
        hypervisor.volume_state("vol2").await?,
        VolumeState::Ready { serial: Some("vol2".into()), target: "vol2".into() }
    );
    assert_eq!(guest.checksum("/mnt/f/data").await?, sum, "mounted again and intact");
    guest.run_ok("echo more >> /mnt/f/data && sync").await.context("the disk is usable again")?;
    let sum = guest.checksum("/mnt/f/data").await?;

    let qemu = &hypervisor.0;
    let plugged = VolumeState::Ready { serial: Some("vol2".into()), target: "vol2".into() };
    let veto = Answer::new(Gate::Veto("the snapshot failed".into()));
    let err = companion::detach_gated(qemu, &guest.agent(), &options, &veto, &|_| {}).await.unwrap_err();
    assert_eq!(
        err.to_string(),
        "volume 'vol2' was not unplugged: the snapshot failed; the guest got disk 'vol2' back (CancelDetach)"
    );
    assert_eq!(veto.asked(), ["vol2"], "asked once the guest released it");
    assert_eq!(qemu.volume_state("vol2").await?, plugged);
    assert_eq!(guest.checksum("/mnt/f/data").await?, sum, "mounted again and intact");
    guest.run_ok("echo more >> /mnt/f/data && sync").await.context("the disk is usable again")?;

    let hold = Answer::new(Gate::Hold("the snapshot is ready".into()));
    let err = companion::detach_gated(qemu, &guest.agent(), &options, &hold, &|_| {}).await.unwrap_err();
    assert!(matches!(err, CompanionError::UnplugHeld { .. }), "{err}");
    assert!(err.to_string().contains("until the snapshot is ready; run detach again to go on"), "{err}");
    assert_eq!(guest.agent().get_disk("vol2", false).await?.state(), DiskState::Released, "still released");
    assert_eq!(qemu.volume_state("vol2").await?, plugged, "still plugged");
    guest.run_ok("! grep -q ' /mnt/f ' /proc/mounts").await.context("unmounted while held")?;

    let open = Answer::new(Gate::Open);
    let detached = companion::detach_gated(qemu, &guest.agent(), &options, &open, &|_| {}).await?;
    assert_eq!(open.asked(), ["vol2"]);
    assert!(detached.release.is_some_and(|r| r.released), "the held release was found released again");
    assert_eq!(qemu.volume_state("vol2").await?, VolumeState::Absent);
    Ok(())
}

/// QMP: a detach that timed out while the guest was still handling a PCIe unplug is run again. QEMU refuses a second
/// `device_del` for a device whose unplug is pending, without side effects; the retry joins the unplug instead of
/// failing and giving the guest its disk back, and the data survives. Native PCIe hot-plug (not ACPI's) makes the
/// guest wait the 5 s a slot's attention button gives for a change of mind, the window the retry runs in.
#[tokio::test(flavor = "multi_thread")]
async fn a_detach_retried_while_device_del_is_pending_joins_the_unplug() -> Result<()> {
    let guest = Guest::boot_with(&["-global", "ICH9-LPC.acpi-pci-hotplug-with-bridge-support=off"]).await?;
    let image = guest.new_image(64 << 20)?;
    let image = image.to_str().unwrap();
    let attach = ["-o", "json", "attach", "vol3", "--image", image, "--serial", "vol3", "--bus", "virtio"];
    let out = ctl(&guest, &[&attach[..], &["--virtio-bus", "rp4", "--timeout", "60"]].concat())?;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let dev = guest.agent().get_disk("vol3", false).await?.dev_node;
    let sum = guest.fill(&dev, "/mnt/v", 4 << 20).await?;

    let first = ctl(&guest, &["-o", "json", "detach", "vol3", "--unmount", "--timeout", "1"])?;
    assert_eq!(first.status.code(), Some(5), "{}", text(&first));
    let error: serde_json::Value = serde_json::from_slice(&first.stdout)?;
    assert_eq!(error["removal_in_progress"], true, "{error}");
    assert!(text(&first).contains("Run detach again to wait for it"), "{}", text(&first));
    assert!(!text(&first).contains("cancel-release"), "{}", text(&first));

    let second = ctl(&guest, &["-o", "json", "detach", "vol3", "--unmount", "--timeout", "60"])?;
    assert_eq!(second.status.code(), Some(0), "{}", text(&second));
    let done: serde_json::Value = serde_json::from_slice(&second.stdout)?;
    assert_eq!(done["removal"], "joined", "{done}");
    guest.run_ok(&format!("! test -e {dev} && ! grep -q ' /mnt/v ' /proc/mounts")).await.context("never given back")?;

    // The block node the first run left is gone too: the same volume attaches again, with its data.
    let out = ctl(&guest, &[&attach[..], &["--virtio-bus", "rp4", "--timeout", "60"]].concat())?;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let dev = guest.agent().get_disk("vol3", false).await?.dev_node;
    guest.run_ok(&format!("mount {dev} /mnt/v")).await?;
    assert_eq!(guest.checksum("/mnt/v/data").await?, sum, "data intact after the retried detach");
    Ok(())
}
