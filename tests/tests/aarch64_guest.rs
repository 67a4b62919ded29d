//! The aarch64 agent in an aarch64 guest (issue 27): Debian's arm64 kernel and userland on QEMU's `virt` machine
//! under TCG (scripts/lab/build-guest.sh's aarch64 profile A), with the agent built for aarch64 and glibc 2.17
//! (scripts/lib/build-guest-agent.sh). One bounded journey, since an emulated arm64 guest is slow: a virtio-scsi disk
//! hot-plugged over QMP is inventoried by serial; mounted and written to, it is reported with its mount and its
//! writer; a release is refused naming the writer, and once the writer stops the release fences and unmounts it.
//! `wukongctl` (this machine's) reaches the agent over the lab's forwarded TCP port throughout.

use anyhow::{Context, Result};
use std::process::Output;
use std::time::{Duration, Instant};
use tonic::Code;
use wukong_e2e::{Arch, DiskSpec, Guest, GuestOptions, assets_for, wukongctl_binary};
use wukong_proto::v1::{BlockerKind, DiskState, ReleaseMethod, blocker::Detail};

const SERIAL: &str = "arm-data-0001";
/// How long the agent may take to see the hot-plugged disk (udev under TCG).
const WAIT: Duration = Duration::from_secs(60);
/// The journey after boot: 2–5 s on this machine (2 cores); generous for a slower or busier one.
const JOURNEY_BOUND: Duration = Duration::from_secs(150);

/// Runs `wukongctl --agent http://127.0.0.1:PORT ARGS` (the guest's forwarded agent port).
fn ctl(guest: &Guest, args: &[&str]) -> Result<Output> {
    let mut command = std::process::Command::new(wukongctl_binary());
    command.arg("--agent").arg(guest.agent_address().to_string()).args(args).stdin(std::process::Stdio::null());
    tokio::task::block_in_place(|| command.output()).context("running wukongctl")
}

fn text(out: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

fn json(out: &Output) -> serde_json::Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("JSON from wukongctl ({e}): {}", text(out)))
}

#[tokio::test(flavor = "multi_thread")]
async fn the_aarch64_agent_inventories_reports_refuses_and_releases_a_hotplugged_disk() -> Result<()> {
    // The image first (built once, then cached under target/), so that the boot time is the boot's.
    let started = Instant::now();
    assets_for(Arch::Aarch64)?;
    println!("aarch64 guest: kernel and initramfs ready in {:.1} s", started.elapsed().as_secs_f64());
    let started = Instant::now();
    let guest = Guest::boot_with_options(&GuestOptions { arch: Arch::Aarch64, ..Default::default() }).await?;
    println!("aarch64 guest: booted with its agent answering in {:.1} s", started.elapsed().as_secs_f64());
    let journey = Instant::now();
    let agent = guest.agent();

    // An aarch64 machine and an aarch64 agent, reached by wukongctl over the forwarded port.
    assert_eq!(guest.run_ok("uname -m").await?.trim(), "aarch64");
    let elf_machine = guest.run_ok("od -An -tx1 -j18 -N2 /usr/bin/wukong-agent").await?;
    assert_eq!(elf_machine.trim(), "b7 00", "the guest's agent is an aarch64 ELF (EM_AARCH64)");
    assert!(guest.agent_address().to_string().starts_with("http://127.0.0.1:"), "{}", guest.agent_address());
    let info = ctl(&guest, &["-o", "json", "info"])?;
    assert_eq!(info.status.code(), Some(0), "{}", text(&info));
    assert_eq!(json(&info)["arch"], "aarch64", "{}", text(&info));

    // A virtio-scsi disk hot-plugged over QMP: inventoried by its serial.
    let plugged = guest.hotplug(&DiskSpec::scsi(SERIAL)).await?;
    let disk = agent.wait_for_disk(SERIAL, WAIT).await?;
    assert_eq!(disk.serial, SERIAL);
    assert!(disk.dev_node.starts_with("/dev/sd"), "{disk:#?}");
    let link = disk.by_id_links.first().context("a by-id link")?;
    assert_eq!(guest.run_ok(&format!("readlink -f {link}")).await?.trim(), disk.dev_node, "{link}");
    let disks = ctl(&guest, &["-o", "json", "disks"])?;
    assert_eq!(disks.status.code(), Some(0), "{}", text(&disks));
    let listed = json(&disks);
    let listed = listed.as_array().context("disks is a list")?;
    assert!(
        listed.iter().any(|d| d["serial"] == SERIAL && d["dev_node"] == disk.dev_node.as_str() && d["bus"] == "scsi"),
        "wukongctl disks lists {SERIAL} at {}: {}",
        disk.dev_node,
        text(&disks)
    );

    // Mounted, with a writer: the usage report names both.
    let dev = disk.dev_node;
    guest.fill(&dev, "/mnt/a", 1 << 20).await?;
    let pid = guest.start_writer("/mnt/a").await?;
    let report = agent.check_usage(SERIAL).await?;
    assert!(report.in_use, "{report:#?}");
    assert!(
        report.blockers.iter().any(|b| matches!(&b.detail, Some(Detail::Mount(m)) if m.mount_point == "/mnt/a")),
        "the report names the mount: {report:#?}"
    );
    assert!(
        report.blockers.iter().any(|b| matches!(&b.detail,
            Some(Detail::Process(p)) if p.pid.to_string() == pid && p.writable && p.path == "/mnt/a/log")),
        "the report names the writer (pid {pid}): {report:#?}"
    );
    let usage = ctl(&guest, &["usage", SERIAL])?;
    assert_eq!(usage.status.code(), Some(3), "in use: {}", text(&usage));
    assert!(text(&usage).contains(&format!("(pid {pid}, uid 0) has /mnt/a/log open for writing")), "{}", text(&usage));

    // PrepareDetach is refused while the writer runs, naming it; nothing changes.
    let refused = agent.prepare_detach(SERIAL, true, false).await.unwrap_err();
    assert_eq!(refused.code(), Some(Code::FailedPrecondition), "{refused}");
    let blockers = refused.refusal().context("a refusal with the agent's answer")?.usage.context("its usage")?.blockers;
    assert!(
        blockers.iter().any(|b| b.kind() == BlockerKind::Process
            && matches!(&b.detail, Some(Detail::Process(p)) if p.pid.to_string() == pid && p.writable)),
        "the refusal names the writer (pid {pid}): {refused}"
    );
    let refused = ctl(&guest, &["release", SERIAL, "--unmount"])?;
    assert_eq!(refused.status.code(), Some(3), "{}", text(&refused));
    assert!(
        text(&refused).contains(&format!("(pid {pid}, uid 0) has /mnt/a/log open for writing")),
        "{}",
        text(&refused)
    );
    guest
        .run_ok(&format!("kill -0 {pid} && grep -q ' /mnt/a ' /proc/mounts && test -b {dev}"))
        .await
        .context("after the refusals the writer runs, the disk is mounted and present")?;
    assert_eq!(agent.get_disk(SERIAL, false).await?.state(), DiskState::Present);

    // The writer stops: the release unmounts and fences (a SCSI disk is deleted in the guest).
    guest.stop_process(&pid).await?;
    let released = ctl(&guest, &["-o", "json", "release", SERIAL, "--unmount"])?;
    assert_eq!(released.status.code(), Some(0), "{}", text(&released));
    let released = json(&released);
    assert_eq!(released["released"], true, "{released}");
    let kinds: Vec<&str> =
        released["actions"].as_array().context("actions")?.iter().filter_map(|a| a["kind"].as_str()).collect();
    assert!(kinds.contains(&"unmount") && kinds.ends_with(&["scsi-delete"]), "unmount, then the fence: {kinds:?}");
    guest
        .run_ok(&format!("! grep -q ' /mnt/a ' /proc/mounts && test ! -e {dev}"))
        .await
        .context("unmounted, and the device is gone from the guest")?;
    let d = agent.get_disk(SERIAL, false).await?;
    assert_eq!((d.state(), d.release_method()), (DiskState::Released, ReleaseMethod::ScsiDelete), "{d:#?}");

    // The hypervisor unplugs it (QMP device_del, DEVICE_DELETED): the release cannot be undone any more, and the
    // agent then forgets the disk (a released SCSI disk stays listed until then: its unplug makes no guest event).
    guest.unplug(&plugged).await?;
    let gone = agent.cancel_detach(SERIAL).await.unwrap_err();
    assert_eq!(gone.code(), Some(Code::NotFound), "{gone}");
    assert!(gone.to_string().contains("no longer attached to the guest"), "{gone}");
    assert_eq!(agent.get_disk(SERIAL, false).await.unwrap_err().code(), Some(Code::NotFound));
    let took = journey.elapsed();
    println!(
        "aarch64 guest: journey (plug, inventory, usage, refusal, release, unplug) in {:.1} s",
        took.as_secs_f64()
    );
    assert!(took < JOURNEY_BOUND, "the journey took {took:?}, more than {JOURNEY_BOUND:?}");
    Ok(())
}
