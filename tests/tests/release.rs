//! PrepareDetach and CancelDetach in a real guest: SCSI disks deleted in the guest and rescanned back, virtio-blk
//! disks fenced read-only, data written without sync surviving release + cancel and unplug + re-plug, refusals
//! that change nothing, one release per disk at a time, and an agent killed mid-release.

use anyhow::{Context, Result};
use std::time::{Duration, Instant};
use tonic::Code;
use wukong_controller_client::agent_client::{AgentClient, ClientError, DEADLINE_MARGIN};
use wukong_e2e::{DiskSpec, Guest};
use wukong_proto::v1::{BlockerKind, DiskState, ReleaseMethod, blocker::Detail};

const WAIT: Duration = Duration::from_secs(60);

async fn mounted(guest: &Guest, mnt: &str) -> Result<bool> {
    Ok(guest.run(&format!("grep -q ' {mnt} ' /proc/mounts")).await?.status == 0)
}

fn kinds_of(err: &ClientError) -> Vec<BlockerKind> {
    let refusal = err.refusal().expect("a refusal carries the agent's answer");
    refusal.usage.expect("with the usage report").blockers.iter().map(|b| b.kind()).collect()
}

/// A SCSI disk whose release answered: nothing can open it.
async fn cannot_open(guest: &Guest, dev: &str) -> Result<()> {
    guest.run_ok(&format!("! dd if={dev} of=/dev/null bs=512 count=1 2>/dev/null")).await.context("it still opens")?;
    Ok(())
}

/// A SCSI disk whose release answered: nothing can open it, and the kernel's teardown of it (which overlaps the
/// hypervisor's unplug) takes its device node away soon after.
async fn deleted_in_guest(guest: &Guest, dev: &str) -> Result<()> {
    cannot_open(guest, dev).await?;
    let gone = format!("for i in $(seq 200); do test -e {dev} || exit 0; usleep 10000; done; exit 1");
    guest.run_ok(&gone).await.context("its device node is still there after 2 s")?;
    Ok(())
}

async fn state(agent: &AgentClient, serial: &str) -> Result<DiskState> {
    Ok(agent.get_disk(serial, false).await?.state())
}

#[tokio::test(flavor = "multi_thread")]
async fn scsi_disks_are_released_refused_cancelled_and_replugged_with_data_intact() -> Result<()> {
    let guest = Guest::boot().await?;
    let agent = guest.agent();

    // An idle, unmounted disk: released, gone from the guest's /dev, listed as RELEASED until unplugged.
    let idle = guest.hotplug(&DiskSpec::scsi("rel-idle")).await?;
    let idle_dev = agent.wait_for_disk("rel-idle", WAIT).await?.dev_node;
    let r = agent.prepare_detach("rel-idle", false, false).await?;
    assert!(r.released, "{r:#?}");
    let kinds: Vec<&str> = r.actions.iter().map(|a| a.kind.as_str()).collect();
    assert_eq!(kinds, ["scan", "verify", "flush", "scsi-delete"]);
    let fence = &r.actions[3].description;
    assert_eq!(
        fence,
        &format!("set SCSI device {idle_dev} offline and deleting it in the guest; nothing can open it any more")
    );
    deleted_in_guest(&guest, &idle_dev).await?;
    let d = agent.get_disk("rel-idle", false).await?;
    assert_eq!((d.state(), d.release_method()), (DiskState::Released, ReleaseMethod::ScsiDelete));
    guest.unplug(&idle).await?;
    let gone = agent.cancel_detach("rel-idle").await.unwrap_err();
    assert_eq!(gone.code(), Some(Code::NotFound), "{gone}");
    assert!(gone.to_string().contains("no longer attached to the guest"), "{gone}");
    assert_eq!(agent.get_disk("rel-idle", false).await.unwrap_err().code(), Some(Code::NotFound));

    // A mounted disk with data written without sync.
    let data = guest.hotplug(&DiskSpec::scsi("rel-data")).await?;
    let dev = agent.wait_for_disk("rel-data", WAIT).await?.dev_node;
    let sum = guest.fill(&dev, "/mnt/d", 8 << 20).await?;

    let refused = agent.prepare_detach("rel-data", false, false).await.unwrap_err();
    assert_eq!(refused.code(), Some(Code::FailedPrecondition), "{refused}");
    assert_eq!(kinds_of(&refused), [BlockerKind::Mount]);
    assert!(refused.to_string().contains("ask for unmount"), "{refused}");
    assert!(mounted(&guest, "/mnt/d").await?, "still mounted after a refusal");

    let dry = agent.prepare_detach("rel-data", true, true).await?;
    assert!(dry.dry_run && !dry.released);
    assert!(dry.actions.iter().any(|a| a.description.starts_with("would unmount /mnt/d")), "{:#?}", dry.actions);
    assert!(mounted(&guest, "/mnt/d").await?, "a dry run changes nothing");
    assert_eq!(state(&agent, "rel-data").await?, DiskState::Present);

    // A process writing to it: refused, the process is unharmed.
    let pid = guest
        .run_ok(
            "sh -c 'exec 3>>/mnt/d/log; while :; do echo x >&3; sleep 1; done' </dev/null >/dev/null 2>&1 & echo $!",
        )
        .await?;
    let pid: i32 = pid.trim().parse()?;
    let refused = agent.prepare_detach("rel-data", true, false).await.unwrap_err();
    let report = refused.refusal().unwrap().usage.unwrap();
    assert!(
        report.blockers.iter().any(|b| matches!(&b.detail, Some(Detail::Process(p)) if p.pid == pid && p.writable)),
        "{refused}"
    );
    guest.run_ok(&format!("kill -0 {pid}")).await.context("the writer is unharmed")?;
    assert!(mounted(&guest, "/mnt/d").await?);
    // Its `sleep` child holds the file too, for up to a second after the loop is killed.
    guest
        .run_ok(&format!(
            "kill {pid}; while ls -l /proc/[0-9]*/fd 2>/dev/null | grep -q /mnt/d/log; do usleep 50000; done"
        ))
        .await?;

    // Two releases at once: exactly one proceeds.
    let (a, b) =
        tokio::join!(agent.prepare_detach("rel-data", true, false), agent.prepare_detach("rel-data", true, false));
    let (released, busy) = match (a, b) {
        (Ok(r), Err(e)) | (Err(e), Ok(r)) => (r, e),
        (a, b) => panic!("expected one release and one ABORTED, got {a:?} and {b:?}"),
    };
    assert!(released.released);
    assert_eq!(busy.code(), Some(Code::Aborted), "{busy}");
    assert!(!mounted(&guest, "/mnt/d").await?);
    cannot_open(&guest, &dev).await?;

    // Cancel, at once (while the kernel may still be tearing the deleted device down): the disk comes back with its
    // mount and its data.
    let back = agent.cancel_detach("rel-data").await?;
    assert_eq!(back.disk.as_ref().map(|d| d.state()), Some(DiskState::Present), "{back:#?}");
    assert!(back.actions.iter().any(|a| a.kind == "mount"), "{:#?}", back.actions);
    assert!(mounted(&guest, "/mnt/d").await?, "mounted again");
    assert_eq!(guest.checksum("/mnt/d/data").await?, sum, "data intact after release + cancel");

    // Release again, unplug, re-plug: the data is on the hypervisor's storage.
    assert!(agent.prepare_detach("rel-data", true, false).await?.released);
    // Released, it has left the guest's disks, though the kernel may still be deleting it: whoever waits for the disk
    // (an attach) waits for the re-plugged one.
    let waited = agent.wait_for_disk("rel-data", Duration::from_millis(500)).await;
    assert!(waited.is_err(), "the released disk is not waited for: {waited:?}");
    guest.unplug(&data).await?;
    guest.replug(&data).await?;
    let dev = agent.wait_for_disk("rel-data", WAIT).await?.dev_node;
    assert_eq!(state(&agent, "rel-data").await?, DiskState::Present, "re-plugged: the tombstone is gone");
    guest.run_ok(&format!("mount {dev} /mnt/d")).await?;
    assert_eq!(guest.checksum("/mnt/d/data").await?, sum, "data intact after unplug + re-plug");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn virtio_is_fenced_read_only_and_swap_lvm_md_and_system_disks_are_refused() -> Result<()> {
    let guest = Guest::boot().await?;
    let agent = guest.agent();

    let v = guest.hotplug(&DiskSpec::virtio("rel-virtio")).await?;
    let dev = agent.wait_for_disk("rel-virtio", WAIT).await?.dev_node;
    let sum = guest.fill(&dev, "/mnt/v", 8 << 20).await?;
    let r = agent.prepare_detach("rel-virtio", true, false).await?;
    assert_eq!(r.disk.as_ref().map(|d| d.release_method()), Some(ReleaseMethod::ReadOnly));
    assert_eq!(guest.run_ok(&format!("blockdev --getro {dev}")).await?.trim(), "1");
    guest.unplug(&v).await?;
    guest.replug(&v).await?;
    let dev = agent.wait_for_disk("rel-virtio", WAIT).await?.dev_node;
    guest.run_ok(&format!("mount {dev} /mnt/v")).await?;
    assert_eq!(guest.checksum("/mnt/v/data").await?, sum, "virtio data intact after unplug + re-plug");

    let refused_as = |serial: &'static str| {
        let agent = agent.clone();
        async move {
            let err = agent.prepare_detach(serial, true, false).await.unwrap_err();
            assert_eq!(err.code(), Some(Code::FailedPrecondition), "{serial}: {err}");
            assert_eq!(agent.get_disk(serial, false).await.unwrap().state(), DiskState::Present, "{serial}");
            err
        }
    };
    guest.hotplug(&DiskSpec::scsi("rel-swap")).await?;
    let swap = agent.wait_for_disk("rel-swap", WAIT).await?.dev_node;
    guest.run_ok(&format!("mkswap {swap} >/dev/null && swapon {swap}")).await?;
    assert_eq!(kinds_of(&refused_as("rel-swap").await), [BlockerKind::Swap]);

    guest.hotplug(&DiskSpec::scsi("rel-lvm")).await?;
    let pv = agent.wait_for_disk("rel-lvm", WAIT).await?.dev_node;
    guest.run_ok(&format!("lvm pvcreate -q {pv} && lvm vgcreate -q vgr {pv} && lvm lvcreate -q -an -Zn -L 8M -n lv vgr && lvm vgchange -q -ay vgr")).await?;
    assert!(kinds_of(&refused_as("rel-lvm").await).contains(&BlockerKind::Holder));

    guest.hotplug(&DiskSpec::scsi("rel-md-a")).await?;
    guest.hotplug(&DiskSpec::scsi("rel-md-b")).await?;
    let a = agent.wait_for_disk("rel-md-a", WAIT).await?.dev_node;
    let b = agent.wait_for_disk("rel-md-b", WAIT).await?.dev_node;
    guest
        .run_ok(&format!("mdadm --create -q --run /dev/md7 --level=1 --raid-devices=2 --metadata=1.2 {a} {b}"))
        .await?;
    assert!(kinds_of(&refused_as("rel-md-a").await).contains(&BlockerKind::Holder));

    // A disk holding /var of the running system: refused by the scan, and marked system once udev re-describes it.
    guest.hotplug(&DiskSpec::scsi("rel-var")).await?;
    let var = agent.wait_for_disk("rel-var", WAIT).await?.dev_node;
    guest.run_ok(&format!("mkfs.ext4 -q {var} && mount {var} /var")).await?;
    let err = refused_as("rel-var").await;
    assert!(kinds_of(&err).contains(&BlockerKind::System), "{err}");
    assert!(err.to_string().contains("holds /var of the running system"), "{err}");
    guest.run_ok(&format!("udevadm trigger --action=change {var} && udevadm settle")).await?;
    let d = agent.get_disk("rel-var", false).await?;
    assert!(d.system, "marked system: {d:#?}");
    assert_eq!(d.system_reason, format!("/var of the running system is mounted from {var}"));
    let err = agent.prepare_detach("rel-var", true, true).await.unwrap_err();
    assert_eq!(err.code(), Some(Code::FailedPrecondition));
    assert_eq!(
        err.to_string(),
        format!(
            "disk 'rel-var' is a system disk (/var of the running system is mounted from {var}); it is never released"
        )
    );
    guest.run_ok("umount /var").await?;

    // The swap active when the agent starts makes its disk a system disk too.
    guest.restart_agent().await?;
    let d = agent.get_disk("rel-swap", false).await?;
    assert!(d.system && d.system_reason.contains("swap area the guest had active"), "{d:#?}");
    Ok(())
}

/// The agent is killed (SIGKILL) after it unmounted the disk, while it waits for what looks like a udev probe to
/// let go. The restarted agent finds the journal and undoes the release: the disk is PRESENT and mounted again.
/// The unmount is slowed by unwritten data so that the probe holds the disk before the agent's final scan.
#[tokio::test(flavor = "multi_thread")]
async fn an_agent_killed_mid_release_leaves_the_disk_present_after_restart() -> Result<()> {
    let guest = Guest::boot().await?;
    let agent = guest.agent();
    guest.hotplug(&DiskSpec::scsi("rel-kill")).await?;
    let dev = agent.wait_for_disk("rel-kill", WAIT).await?.dev_node;
    let sum = guest.fill(&dev, "/mnt/k", 8 << 20).await?;
    guest.slow_unmount("/mnt/k", 32 << 20).await?;
    guest.probe_after_unmount(&dev, "/mnt/k").await?;
    let release = tokio::spawn({
        let agent = agent.clone();
        async move { agent.prepare_detach("rel-kill", true, false).await }
    });
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while mounted(&guest, "/mnt/k").await? {
        assert!(tokio::time::Instant::now() < deadline, "the release never unmounted /mnt/k");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    guest.wait_for_probe_hold(Duration::from_secs(30)).await?;
    assert_eq!(state(&agent, "rel-kill").await?, DiskState::Releasing);
    guest.kill_agent().await?;
    let interrupted = release.await?.unwrap_err();
    assert!(interrupted.code() != Some(Code::Ok), "{interrupted}");
    guest.start_agent().await?;
    assert_eq!(state(&agent, "rel-kill").await?, DiskState::Present, "never stuck RELEASING");
    assert!(mounted(&guest, "/mnt/k").await?, "the interrupted release was undone: mounted again");
    assert_eq!(guest.checksum("/mnt/k/data").await?, sum);
    let log = guest.run_ok("cat /var/log/wukong-agent.log").await?;
    assert!(log.contains("undoing a release the previous agent process did not finish"), "{log}");
    Ok(())
}

/// The admission guard's case: a release with a deadline it cannot meet (after the unmount, a udev probe that never
/// ends keeps the final scan waiting) is refused with DEADLINE_EXCEEDED within the deadline, and by then the disk
/// is back: mounted, writable, PRESENT. Once the probe is gone, a deadline long enough releases it as always.
#[tokio::test(flavor = "multi_thread")]
async fn a_release_that_cannot_meet_its_deadline_is_refused_with_the_disk_usable() -> Result<()> {
    let guest = Guest::boot().await?;
    let agent = guest.agent();
    guest.hotplug(&DiskSpec::scsi("rel-late")).await?;
    let dev = agent.wait_for_disk("rel-late", WAIT).await?.dev_node;
    let sum = guest.fill(&dev, "/mnt/late", 8 << 20).await?;
    guest.slow_unmount("/mnt/late", 32 << 20).await?;
    guest.probe_after_unmount(&dev, "/mnt/late").await?;

    let deadline = Duration::from_secs(5);
    let started = Instant::now();
    let refused = agent.prepare_detach_within("rel-late", true, false, deadline).await.unwrap_err();
    let took = started.elapsed();
    let usable = guest.run("grep -q ' /mnt/late ' /proc/mounts && echo after > /mnt/late/after").await?;
    let usable_after = started.elapsed() - took;
    assert_eq!(usable.status, 0, "mounted and writable: {}", usable.output);
    assert!(usable_after < Duration::from_secs(1), "usable {usable_after:?} after the refusal");
    // The agent stops its steps with a fifth of the deadline left for the undoing; an emulated guest on a loaded
    // machine can use more, and what counts is that the answer (the disk already back) comes before the caller's
    // own call deadline, which the client sets that margin later.
    assert!(took < deadline + DEADLINE_MARGIN, "refused before the caller gave up, after {took:?}");
    assert_eq!(refused.code(), Some(Code::DeadlineExceeded), "{refused}");
    assert_eq!(
        refused.to_string(),
        "disk 'rel-late' was not released: the final scan after unmounting (and the wait for udev's probes of it to \
         end) did not finish within the deadline of 5.0s; everything was put back: /mnt/late (ext4) in the host \
         mount namespace mounted again; retry with a longer deadline"
    );
    assert_eq!(state(&agent, "rel-late").await?, DiskState::Present);
    assert_eq!(guest.checksum("/mnt/late/data").await?, sum);
    guest.run_ok(&format!("test -b {dev}")).await.context("the SCSI device was never deleted")?;

    guest.run_ok("kill $(cat /tmp/probe/pid)").await?;
    let released = agent.prepare_detach_within("rel-late", true, false, Duration::from_secs(25)).await?;
    let kinds: Vec<&str> = released.actions.iter().map(|a| a.kind.as_str()).collect();
    assert_eq!(kinds, ["scan", "unmount", "verify", "flush", "scsi-delete"]);
    assert!(released.released && !mounted(&guest, "/mnt/late").await?);
    Ok(())
}
