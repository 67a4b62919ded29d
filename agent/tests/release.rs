//! Releases on this machine's real kernel: loop devices with real filesystems, mounts in two mount namespaces,
//! real processes. Loop devices have no SCSI delete, so they are fenced read-only, like virtio-blk disks. The SCSI
//! path runs in the guest lab (crate wukong-e2e). Needs root; without it these tests fail (they never skip).
// The lock serialises whole tests, each on its own runtime and thread: holding it across awaits is the point.
#![allow(clippy::await_holding_lock)]

mod common;

use common::{Holder, LoopDisk, findmnt_targets, mkdirs, other_threads, serial, sh, threaded_python};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use wukong_agent::inventory::{self, InventoryHandle, Update};
use wukong_agent::release::fence::{self, BlockDevices, FenceError, Kernel};
use wukong_agent::release::journal::Journal;
use wukong_agent::release::{Deadline, ReleaseError, Releaser};
use wukong_agent::roots::HostRoots;
use wukong_agent::serial::Serial;
use wukong_agent::usage::{ActiveSource, UsageScanner};
use wukong_proto::v1::{BlockerKind, Bus, Disk, DiskState, ReleaseMethod, ScsiAddress, blocker::Detail};

/// A releaser over an inventory that holds one loop disk, given a serial.
struct Rig {
    releaser: Releaser,
    inventory: InventoryHandle,
    serial: Serial,
    state_dir: PathBuf,
    _updates: tokio::sync::mpsc::Sender<Update>,
}

async fn rig(disk: &LoopDisk, state_dir: &Path) -> Rig {
    rig_with(disk, state_dir, Arc::new(Kernel)).await
}

/// A rig whose releaser's block-device calls go to `devices`.
async fn rig_with(disk: &LoopDisk, state_dir: &Path, devices: Arc<dyn BlockDevices>) -> Rig {
    rig_as(disk, state_dir, devices, |_| {}).await
}

/// A rig whose inventory lists the loop disk as `describe` changes it.
async fn rig_as(
    disk: &LoopDisk,
    state_dir: &Path,
    devices: Arc<dyn BlockDevices>,
    describe: impl FnOnce(&mut Disk),
) -> Rig {
    let roots = HostRoots::default();
    let name = disk.name();
    // Built by hand: this machine may run no udevd, so udev's database does not know the loop device.
    let (major, minor) = wukong_agent::disk::read_devnum(&roots.sys_block(&name).join("dev")).unwrap();
    let serial = format!("wukong-{name}");
    let d = Disk {
        serial: serial.clone(),
        id: serial.clone(),
        dev_node: disk.dev.clone(),
        kernel_name: name,
        major,
        minor,
        bus: Bus::Other as i32,
        state: DiskState::Present as i32,
        ..Disk::default()
    };
    let mut d = d;
    describe(&mut d);
    let (updates, inventory) = inventory::spawn();
    updates.send(Update::Reconcile(vec![d])).await.unwrap();
    inventory.wait_synced().await;
    let journal = Journal::new(Some(state_dir.to_path_buf()));
    let usage = UsageScanner::new(roots.clone(), ActiveSource::procfs());
    let releaser = Releaser::with_block_devices(roots, inventory.clone(), updates.clone(), usage, journal, devices);
    Rig { releaser, inventory, serial: Serial::parse(&serial).unwrap(), state_dir: state_dir.into(), _updates: updates }
}

impl Rig {
    fn state(&self) -> DiskState {
        self.inventory.snapshot().find(&self.serial).unwrap().state()
    }
}

fn read_only(dev: &str) -> bool {
    sh(&format!("blockdev --getro {dev}")).trim() == "1"
}

/// Mount points of `dev` in the mount namespace of `pid`.
fn findmnt_in(pid: i32, dev: &str) -> BTreeSet<String> {
    sh(&format!("nsenter -t {pid} -m findmnt -n -l -o TARGET -S {dev} || true")).lines().map(str::to_string).collect()
}

fn checksum(path: &Path) -> String {
    sh(&format!("sha256sum '{}'", path.display())).split_whitespace().next().unwrap().to_string()
}

fn write_data(dir: &Path) -> (PathBuf, String) {
    let file = dir.join("data.bin");
    // Written without any sync: the release must put it on the device.
    sh(&format!("head -c 4194304 /dev/urandom > '{}'", file.display()));
    let sum = checksum(&file);
    (file, sum)
}

#[tokio::test(flavor = "multi_thread")]
async fn idle_mounts_in_two_namespaces_are_released_and_cancel_brings_them_back() {
    let _serial = serial();
    let mut disk = LoopDisk::new("ext4");
    let a = disk.mount_at("a");
    std::fs::create_dir(a.join("sub")).unwrap();
    let b = disk.bind(&a.join("sub"), "b");
    let (file, sum) = write_data(&a);
    let ns = Holder::start(
        "unshare",
        &["-m", "--propagation", "private", "sh", "-c", "cd / && echo ready && exec sleep 1000"],
    );
    let host_mounts = findmnt_targets(&disk.dev);
    assert_eq!(host_mounts.len(), 2);
    assert_eq!(findmnt_in(ns.pid(), &disk.dev), host_mounts, "the private namespace has its own copies");
    let state = tempfile::tempdir().unwrap();
    let rig = rig(&disk, state.path()).await;

    let refused = rig.releaser.prepare(&rig.serial, false, false, None).await.unwrap_err();
    let ReleaseError::InUse { message, report, .. } = &refused else { panic!("refused as in use: {refused}") };
    assert!(message.contains("it is mounted; nothing was changed (ask for unmount"), "{message}");
    assert_eq!(report.blockers.iter().filter(|b| b.kind() == BlockerKind::Mount).count(), 4, "{message}");
    assert_eq!(findmnt_targets(&disk.dev), host_mounts, "nothing changed");

    let dry = rig.releaser.prepare(&rig.serial, true, true, None).await.unwrap();
    assert!(dry.dry_run && !dry.released);
    let would: Vec<&str> = dry.actions.iter().map(|a| a.description.as_str()).collect();
    assert_eq!(would.iter().filter(|d| d.starts_with("would unmount")).count(), 4, "{would:#?}");
    assert!(would.iter().any(|d| d.starts_with("would set") && d.contains("read-only")), "{would:#?}");
    assert_eq!(findmnt_targets(&disk.dev), host_mounts, "a dry run changes nothing");
    assert!(!read_only(&disk.dev));
    assert_eq!(rig.state(), DiskState::Present);

    let released = rig.releaser.prepare(&rig.serial, true, false, None).await.unwrap();
    assert!(released.released, "{released:#?}");
    assert!(findmnt_targets(&disk.dev).is_empty(), "unmounted in the host namespace");
    assert!(findmnt_in(ns.pid(), &disk.dev).is_empty(), "unmounted in the private namespace");
    assert!(read_only(&disk.dev), "fenced read-only");
    let mut device = std::fs::OpenOptions::new().write(true).open(&disk.dev).unwrap();
    let write = std::io::Write::write_all(&mut device, &[0u8; 4096]).unwrap_err();
    assert_eq!(write.raw_os_error(), Some(nix::libc::EPERM), "nothing can write to it: {write}");
    drop(device);
    let kinds: Vec<&str> = released.actions.iter().map(|a| a.kind.as_str()).collect();
    assert_eq!(kinds, ["scan", "unmount", "unmount", "unmount", "unmount", "verify", "flush", "read-only"]);
    let d = released.disk.unwrap();
    assert_eq!((d.state(), d.release_method()), (DiskState::Released, ReleaseMethod::ReadOnly));
    assert!(d.released_at.is_some());
    assert!(std::fs::read_dir(&rig.state_dir).unwrap().count() == 1, "the release is journalled");

    let again = rig.releaser.prepare(&rig.serial, true, false, None).await.unwrap();
    assert!(again.released && again.actions[0].description.contains("already released"));
    // Asking again is journalled: a deleted SCSI disk stays listed an hour from the last ask, after a restart too.
    let entry = std::fs::read_dir(&rig.state_dir).unwrap().next().unwrap().unwrap().path();
    let record: serde_json::Value = serde_json::from_slice(&std::fs::read(entry).unwrap()).unwrap();
    assert!(record["asked_at"].as_f64().is_some_and(|at| at > 1.7e9), "{record}");

    let cancelled = rig.releaser.cancel(&rig.serial).await.unwrap();
    assert!(!read_only(&disk.dev), "read-write again");
    assert_eq!(findmnt_targets(&disk.dev), host_mounts, "host mounts back: {:#?}", cancelled.actions);
    assert_eq!(findmnt_in(ns.pid(), &disk.dev), host_mounts, "namespace mounts back");
    assert_eq!(checksum(&file), sum, "the data written before the release is intact");
    assert!(b.join("..").exists());
    assert_eq!(rig.state(), DiskState::Present);
    assert_eq!(std::fs::read_dir(&rig.state_dir).unwrap().count(), 0, "the journal entry is gone");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_process_using_the_disk_refuses_the_release_and_changes_nothing() {
    let _serial = serial();
    let mut disk = LoopDisk::new("ext4");
    let a = disk.mount_at("a");
    let writer = Holder::sh(&format!("exec 3>>'{}/log'", a.display()));
    let state = tempfile::tempdir().unwrap();
    let rig = rig(&disk, state.path()).await;
    let err = rig.releaser.prepare(&rig.serial, true, false, None).await.unwrap_err();
    let ReleaseError::InUse { message, report, .. } = &err else { panic!("refused as in use: {err}") };
    let pid = writer.pid();
    assert!(
        report.blockers.iter().any(|b| matches!(&b.detail, Some(Detail::Process(p)) if p.pid == pid && p.writable)),
        "{message}"
    );
    assert!(
        message.contains(&format!("pid {pid}")) && message.contains("it is in use; nothing was changed"),
        "{message}"
    );
    assert!(nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok(), "the writer is unharmed");
    assert_eq!(findmnt_targets(&disk.dev).len(), 1, "still mounted");
    assert!(!read_only(&disk.dev));
    assert_eq!(rig.state(), DiskState::Present);
    assert_eq!(std::fs::read_dir(state.path()).map(|d| d.count()).unwrap_or(0), 0, "nothing journalled");
}

/// A filesystem mounted only in a thread's own mount namespace (`unshare(CLONE_NEWNS)` in one thread), which
/// `/proc/<pid>/mountinfo` does not show: the release refuses naming the thread, unmounts it there when asked
/// (entering the namespace through the thread), and cancel mounts it back there.
#[tokio::test(flavor = "multi_thread")]
async fn a_mount_only_a_thread_sees_is_released_and_cancel_brings_it_back() {
    let _serial = serial();
    let disk = LoopDisk::new("ext4");
    let points = tempfile::tempdir().unwrap();
    let point = points.path().display().to_string();
    // MS_REC | MS_PRIVATE: the thread's mount stays in its namespace.
    let holder = threaded_python(
        &format!(
            "    assert libc.unshare(0x20000)==0\n    assert libc.mount(b'none',b'/',None,0x44000,None)==0\n    \
             assert libc.mount(b'{}',b'{point}',b'ext4',0,None)==0",
            disk.dev
        ),
        "",
    );
    let (pid, thread) = (holder.pid(), other_threads(holder.pid())[0]);
    let in_thread = || findmnt_in(thread, &disk.dev);
    assert_eq!(in_thread(), BTreeSet::from([point.clone()]));
    assert!(findmnt_in(pid, &disk.dev).is_empty() && findmnt_targets(&disk.dev).is_empty());
    let state = tempfile::tempdir().unwrap();
    let rig = rig(&disk, state.path()).await;

    let refused = rig.releaser.prepare(&rig.serial, false, false, None).await.unwrap_err();
    let ReleaseError::InUse { message, .. } = &refused else { panic!("refused as in use: {refused}") };
    assert!(message.contains(&format!("mounted at {point} (ext4) in mount namespace")), "{message}");
    assert!(message.contains(&format!("(of thread {thread} of pid {pid}, python3)")), "{message}");
    assert_eq!(in_thread(), BTreeSet::from([point.clone()]), "nothing changed");

    let released = rig.releaser.prepare(&rig.serial, true, false, None).await.unwrap();
    assert!(released.released, "{released:#?}");
    let kinds: Vec<&str> = released.actions.iter().map(|a| a.kind.as_str()).collect();
    assert_eq!(kinds, ["scan", "unmount", "verify", "flush", "read-only"]);
    assert!(in_thread().is_empty(), "unmounted in the thread's namespace");

    let cancelled = rig.releaser.cancel(&rig.serial).await.unwrap();
    assert_eq!(in_thread(), BTreeSet::from([point]), "mounted back there: {:#?}", cancelled.actions);
    assert!(findmnt_targets(&disk.dev).is_empty(), "and nowhere else");
    assert_eq!(rig.state(), DiskState::Present);
}

/// A filesystem mounted in a namespace no process is in cannot be seen, only felt: after the visible mount is
/// undone, the final scan finds the kernel still holding the device. The release must put the mount back.
#[tokio::test(flavor = "multi_thread")]
async fn a_release_that_fails_after_unmounting_puts_the_mounts_back() {
    let _serial = serial();
    let mut disk = LoopDisk::new("ext4");
    let a = disk.mount_at("a");
    let (file, sum) = write_data(&a);
    let holder_dir = tempfile::tempdir().unwrap();
    let dir = holder_dir.path();
    let inner = tempfile::tempdir().unwrap();
    sh(&format!("mount --bind {d} {d} && mount --make-private {d} && touch {d}/ns", d = dir.display()));
    sh(&format!(
        "unshare --mount={}/ns --propagation private mount {} {}",
        dir.display(),
        disk.dev,
        inner.path().display()
    ));
    let state = tempfile::tempdir().unwrap();
    let rig = rig(&disk, state.path()).await;
    let err = rig.releaser.prepare(&rig.serial, true, false, None).await.unwrap_err();
    sh(&format!("umount {d}/ns && umount {d}", d = dir.display()));
    let ReleaseError::InUse { message, .. } = &err else { panic!("refused as in use: {err}") };
    assert!(message.contains("after unmounting, something still uses it"), "{message}");
    assert!(message.contains("exclusively"), "the kernel claim is named: {message}");
    assert!(
        message.ends_with(&format!(
            "everything was put back: {} (ext4) in the host mount namespace mounted again",
            a.display()
        )),
        "{message}"
    );
    assert_eq!(findmnt_targets(&disk.dev), BTreeSet::from([a.display().to_string()]));
    assert_eq!(checksum(&file), sum);
    assert!(!read_only(&disk.dev));
    assert_eq!(rig.state(), DiskState::Present);
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_releases_of_one_disk_let_exactly_one_proceed() {
    let _serial = serial();
    let disk = LoopDisk::new("ext4");
    let state = tempfile::tempdir().unwrap();
    let rig = rig(&disk, state.path()).await;
    let (a, b) = tokio::join!(
        rig.releaser.prepare(&rig.serial, true, false, None),
        rig.releaser.prepare(&rig.serial, true, false, None)
    );
    let (ok, busy) = match (a, b) {
        (Ok(ok), Err(e)) | (Err(e), Ok(ok)) => (ok, e),
        (a, b) => panic!("expected one release and one refusal, got {a:?} and {b:?}"),
    };
    assert!(ok.released);
    assert!(matches!(busy, ReleaseError::Busy(_)), "{busy}");
    assert_eq!(
        busy.to_string(),
        format!("another release or cancel of disk '{}' is running; retry when it has finished", rig.serial)
    );
    rig.releaser.cancel(&rig.serial).await.unwrap();
    assert!(!read_only(&disk.dev));
}

/// A mounted xfs loop disk with data, released (unmounted, fenced) by an agent process that is gone since, and the
/// journal file it left, for a test to rewrite as that process's last word.
struct ReleasedBefore {
    disk: LoopDisk,
    a: PathBuf,
    file: PathBuf,
    sum: String,
    state: tempfile::TempDir,
    journal: PathBuf,
    _serial: std::sync::MutexGuard<'static, ()>,
}

impl ReleasedBefore {
    async fn new() -> Self {
        let _serial = serial();
        let mut disk = LoopDisk::new("xfs");
        let a = disk.mount_at("a");
        let (file, sum) = write_data(&a);
        let state = tempfile::tempdir().unwrap();
        let first = rig(&disk, state.path()).await;
        assert!(first.releaser.prepare(&first.serial, true, false, None).await.unwrap().released);
        let journal = std::fs::read_dir(state.path()).unwrap().next().unwrap().unwrap().path();
        Self { disk, a, file, sum, state, journal, _serial }
    }
}

/// A release journalled as still running (the agent died mid-way) is undone by the next agent process.
#[tokio::test(flavor = "multi_thread")]
async fn a_restarted_agent_undoes_an_interrupted_release() {
    let ReleasedBefore { disk, a, file, sum, state, journal: path, _serial } = ReleasedBefore::new().await;
    let journalled = std::fs::read_to_string(&path).unwrap();
    std::fs::write(&path, journalled.replace("\"phase\": \"released\"", "\"phase\": \"releasing\"")).unwrap();

    let second = rig(&disk, state.path()).await;
    second.releaser.recover().await;
    assert!(!read_only(&disk.dev), "the fence is lifted");
    assert_eq!(findmnt_targets(&disk.dev), BTreeSet::from([a.display().to_string()]), "the mount is back");
    assert_eq!(checksum(&file), sum);
    assert_eq!(second.state(), DiskState::Present);
    assert!(!path.exists(), "the record is done with");
}

/// The mounts at `place` in this namespace: their mount IDs, from mountinfo.
fn mount_ids_at(place: &Path) -> Vec<u32> {
    let table = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let place = place.display().to_string();
    table
        .lines()
        .filter(|l| l.split(' ').nth(4) == Some(place.as_str()))
        .map(|l| l.split(' ').next().unwrap().parse().unwrap())
        .collect()
}

/// Rewrites the journalled release as one killed while its unmounts ran: still releasing, the mounts listed as being
/// undone (journalled before the first unmount) and none yet as undone; `mount_id` replaces their IDs when given.
fn as_killed_while_unmounting(path: &Path, mount_id: Option<u32>) {
    let mut record: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    record["phase"] = "releasing".into();
    let mut unmounting = record["unmounted"].take();
    record["unmounted"] = serde_json::json!([]);
    for mount in unmounting.as_array_mut().unwrap() {
        if let Some(id) = mount_id {
            mount["mount_id"] = id.into();
        }
    }
    record["unmounting"] = unmounting;
    std::fs::write(path, serde_json::to_string_pretty(&record).unwrap()).unwrap();
}

/// An agent killed while an unmount runs (the kernel writes the filesystem back before umount returns: seconds on
/// slow storage) has journalled the mounts it was undoing: the next agent mounts back the ones that are gone, and
/// leaves alone one that is still there (killed before its unmount), never mounting it twice.
#[tokio::test(flavor = "multi_thread")]
async fn an_agent_killed_while_unmounting_gets_the_mounts_back() {
    let ReleasedBefore { disk, a, file, sum, state, journal: path, _serial } = ReleasedBefore::new().await;
    as_killed_while_unmounting(&path, None);

    let second = rig(&disk, state.path()).await;
    second.releaser.recover().await;
    assert_eq!(mount_ids_at(&a).len(), 1, "the filesystem whose unmount had happened is mounted back");
    assert!(!read_only(&disk.dev) && second.state() == DiskState::Present);
    assert_eq!(checksum(&file), sum);
    assert!(!path.exists(), "the record is done with");

    // Killed before the unmount: the mount is still there (here mounted by hand, as the journal names it).
    assert!(second.releaser.prepare(&second.serial, true, false, None).await.unwrap().released);
    let path = std::fs::read_dir(state.path()).unwrap().next().unwrap().unwrap().path();
    sh(&format!("mount -o ro {} '{}'", disk.dev, a.display()));
    let live = mount_ids_at(&a);
    as_killed_while_unmounting(&path, live.first().copied());
    drop(second);
    let third = rig(&disk, state.path()).await;
    third.releaser.recover().await;
    assert_eq!(mount_ids_at(&a), live, "a mount that is still there is not mounted again");
    assert!(!read_only(&disk.dev) && third.state() == DiskState::Present);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_system_disk_is_never_released() {
    let _serial = serial();
    let disk = LoopDisk::new("none");
    let state = tempfile::tempdir().unwrap();
    let rig = rig(&disk, state.path()).await;
    let mut d = rig.inventory.snapshot().find(&rig.serial).unwrap().clone();
    d.system = true;
    d.system_reason = "/ of the running system is mounted from /dev/x".into();
    rig._updates.send(Update::Upsert(Box::new(d))).await.unwrap();
    rig.inventory.wait_until(|s| s.find(&rig.serial).is_ok_and(|d| d.system)).await;
    let err = rig.releaser.prepare(&rig.serial, true, true, None).await.unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "disk '{}' is a system disk (/ of the running system is mounted from /dev/x); it is never released",
            rig.serial
        )
    );
    assert!(!read_only(&disk.dev));
}

/// Overlay mount points (in this namespace) and their options as mountinfo shows them.
fn overlays_at(paths: &[&Path]) -> BTreeSet<(String, String)> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    text.lines()
        .filter(|l| l.contains(" - overlay "))
        .filter_map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            let point = f[4].replace("\\040", " ");
            paths.iter().any(|p| p.to_str() == Some(point.as_str())).then(|| (point, f[f.len() - 1].to_string()))
        })
        .collect()
}

/// Two idle overlays stacked on the disk (one with a space in its path and a lower directory named with a space)
/// are unmounted before the disk's own mount and come back, with the same layers, after it on cancel. Used through
/// an overlay, the disk is refused, naming the user, and nothing changes.
#[tokio::test(flavor = "multi_thread")]
async fn idle_stacked_overlays_are_released_and_restored_and_used_ones_refuse() {
    let _serial = serial();
    let mut disk = LoopDisk::new("ext4");
    let a = disk.mount_at("a");
    mkdirs(&a, &["low 1", "low2", "up", "work", "up2", "work2"]);
    let (file, sum) = write_data(&a.join("low2"));
    let (one, two) = (disk.dir.path().join("merged one"), a.join("low2/nested merged"));
    for (point, upper, work) in [(&one, "up", "work"), (&two, "up2", "work2")] {
        std::fs::create_dir_all(point).unwrap();
        sh(&format!(
            "mount -t overlay overlay -o 'lowerdir={a}/low 1:{a}/low2,upperdir={a}/{upper},workdir={a}/{work}' '{}'",
            point.display(),
            a = a.display()
        ));
        disk.mounts.push(point.clone());
    }
    let before = overlays_at(&[&one, &two]);
    assert_eq!(before.len(), 2);
    let state = tempfile::tempdir().unwrap();
    let rig = rig(&disk, state.path()).await;

    let user = Holder::sh(&format!("exec 3<'{}/data.bin'", one.display()));
    let err = rig.releaser.prepare(&rig.serial, true, false, None).await.unwrap_err();
    let ReleaseError::InUse { message, .. } = &err else { panic!("refused as in use: {err}") };
    assert!(message.contains("it is in use; nothing was changed"), "{message}");
    assert!(
        message.contains(&format!(
            "(pid {}, uid 0) has {}/data.bin open for reading (on overlay mounted at {}",
            user.pid(),
            one.display(),
            one.display()
        )),
        "{message}"
    );
    assert_eq!(overlays_at(&[&one, &two]), before, "nothing changed");
    drop(user);

    let released = rig.releaser.prepare(&rig.serial, true, false, None).await.unwrap();
    assert!(released.released, "{released:#?}");
    let unmounted: Vec<&str> =
        released.actions.iter().filter(|a| a.kind == "unmount").map(|a| a.description.as_str()).collect();
    assert_eq!(
        unmounted,
        [
            format!("unmounted {} (overlay) in the host mount namespace", two.display()),
            format!("unmounted {} (overlay) in the host mount namespace", one.display()),
            format!("unmounted {} (ext4) in the host mount namespace", a.display()),
        ],
        "stacked first, deepest first"
    );
    assert!(
        released.actions[0].description.contains("2 idle filesystem(s) are stacked on it"),
        "{:?}",
        released.actions[0]
    );
    assert!(overlays_at(&[&one, &two]).is_empty() && findmnt_targets(&disk.dev).is_empty());
    assert!(read_only(&disk.dev));

    let cancelled = rig.releaser.cancel(&rig.serial).await.unwrap();
    let mounted: Vec<&str> =
        cancelled.actions.iter().filter(|a| a.kind == "mount").map(|a| a.description.as_str()).collect();
    assert_eq!(mounted.len(), 3, "{:#?}", cancelled.actions);
    assert!(mounted[0].contains("(ext4)"), "the disk first: {mounted:?}");
    assert_eq!(overlays_at(&[&one, &two]), before, "the overlays are back with the same layers");
    assert_eq!(checksum(&one.join("data.bin")), sum, "and show the disk's data");
    assert_eq!(checksum(&file), sum);
    assert_eq!(rig.state(), DiskState::Present);
}

/// Docker's overlay with relative layer paths (`LoopDisk::docker_overlay`): refused while a process reads through it;
/// idle, unmounted before the disk and, on cancel, mounted back from the driver's home with the options exactly as
/// Docker gave them, showing the same data.
#[tokio::test(flavor = "multi_thread")]
async fn docker_overlays_with_relative_layers_are_released_and_restored() {
    let _serial = serial();
    let mut disk = LoopDisk::new("ext4");
    let root = disk.mount_at("docker");
    let (_, merged) = disk.docker_overlay(&root);
    let (file, sum) = write_data(&merged);
    let before = overlays_at(&[&merged]);
    assert!(before.iter().all(|(_, o)| o.contains("lowerdir=l/L2:l/L1,upperdir=ctr/diff")), "{before:?}");
    let state = tempfile::tempdir().unwrap();
    let rig = rig(&disk, state.path()).await;

    let user = Holder::sh(&format!("exec 3<'{}'", file.display()));
    let err = rig.releaser.prepare(&rig.serial, true, false, None).await.unwrap_err();
    let ReleaseError::InUse { message, .. } = &err else { panic!("refused as in use: {err}") };
    assert!(message.contains(&format!("(pid {}, uid 0) has {}", user.pid(), file.display())), "{message}");
    assert_eq!(overlays_at(&[&merged]), before, "nothing changed");
    drop(user);

    let released = rig.releaser.prepare(&rig.serial, true, false, None).await.unwrap();
    assert!(released.released, "{released:#?}");
    assert!(overlays_at(&[&merged]).is_empty() && findmnt_targets(&disk.dev).is_empty());
    let cancelled = rig.releaser.cancel(&rig.serial).await.unwrap();
    let mounted = cancelled.actions.iter().filter(|a| a.kind == "mount").count();
    assert_eq!(mounted, 2, "{:#?}", cancelled.actions);
    assert_eq!(overlays_at(&[&merged]), before, "Docker's overlay is back with its relative layers");
    assert_eq!(checksum(&file), sum, "and shows the data written through it");
    assert_eq!(rig.state(), DiskState::Present);
}

/// An overlay whose lower directories are inside another overlay on the disk (an image built inside a container):
/// the one on top is undone first, although the one beneath sits deeper in the mount tree, and mounted back last.
#[tokio::test(flavor = "multi_thread")]
async fn an_overlay_on_an_overlay_is_undone_before_it_and_mounted_back_after_it() {
    let _serial = serial();
    let mut disk = LoopDisk::new("ext4");
    let a = disk.mount_at("a");
    mkdirs(&a, &["low/x", "low/y", "up", "work"]);
    let (_, sum) = write_data(&a.join("low/x"));
    let (beneath, top) = (a.join("beneath"), disk.dir.path().join("top"));
    for point in [&beneath, &top] {
        std::fs::create_dir_all(point).unwrap();
    }
    sh(&format!(
        "mount -t overlay overlay -o 'lowerdir={a}/low,upperdir={a}/up,workdir={a}/work' '{}'",
        beneath.display(),
        a = a.display()
    ));
    disk.mounts.push(beneath.clone());
    sh(&format!("mount -t overlay overlay -o 'lowerdir={b}/x:{b}/y' '{}'", top.display(), b = beneath.display()));
    disk.mounts.push(top.clone());
    let before = overlays_at(&[&beneath, &top]);
    assert_eq!(before.len(), 2);
    let state = tempfile::tempdir().unwrap();
    let rig = rig(&disk, state.path()).await;

    let released = rig.releaser.prepare(&rig.serial, true, false, None).await.unwrap();
    assert!(released.released, "{released:#?}");
    let unmounted: Vec<&str> =
        released.actions.iter().filter(|a| a.kind == "unmount").map(|a| a.description.as_str()).collect();
    let undone = |point: &Path, fs: &str| format!("unmounted {} ({fs}) in the host mount namespace", point.display());
    assert_eq!(unmounted, [undone(&top, "overlay"), undone(&beneath, "overlay"), undone(&a, "ext4")]);
    let cancelled = rig.releaser.cancel(&rig.serial).await.unwrap();
    let mounted: Vec<&str> =
        cancelled.actions.iter().filter(|a| a.kind == "mount").map(|a| a.description.as_str()).collect();
    assert!(mounted.len() == 3 && mounted[2].contains(&top.display().to_string()), "top last: {mounted:#?}");
    assert_eq!(overlays_at(&[&beneath, &top]), before, "both overlays are back");
    assert_eq!(checksum(&top.join("data.bin")), sum, "and the top one shows the disk's data");
}

/// The kernel's block devices, but each flush first waits `delay`: a device stuck behind slow storage. Counts the
/// flushes that have ended, so a test can wait for one it gave up on before its loop device goes away.
struct SlowFlush {
    delay: Duration,
    ended: AtomicUsize,
}

impl SlowFlush {
    fn new(delay: Duration) -> Arc<Self> {
        Arc::new(Self { delay, ended: AtomicUsize::new(0) })
    }

    /// Waits until `n` flushes have ended.
    fn wait_ended(&self, n: usize) {
        let give_up = Instant::now() + self.delay * 2 + Duration::from_secs(5);
        while self.ended.load(Ordering::SeqCst) < n {
            assert!(Instant::now() < give_up, "the slow flush never ended");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl BlockDevices for SlowFlush {
    fn flush(&self, path: &Path) -> Result<(), FenceError> {
        std::thread::sleep(self.delay);
        let flushed = fence::flush(path);
        self.ended.fetch_add(1, Ordering::SeqCst);
        flushed
    }
}

/// A mounted ext4 loop disk with data at `a`, and a rig whose flushes take `flush_delay`; the tests of release
/// deadlines start from it.
struct SlowDisk {
    rig: Rig,
    slow: Arc<SlowFlush>,
    a: PathBuf,
    file: PathBuf,
    sum: String,
    // Dropped after the rig: the rig's state lives there, the disk's filesystem is mounted from there.
    _state: tempfile::TempDir,
    disk: LoopDisk,
    _serial: std::sync::MutexGuard<'static, ()>,
}

impl SlowDisk {
    async fn new(flush_delay: Duration) -> Self {
        let _serial = serial();
        let mut disk = LoopDisk::new("ext4");
        let a = disk.mount_at("a");
        let (file, sum) = write_data(&a);
        let state = tempfile::tempdir().unwrap();
        let slow = SlowFlush::new(flush_delay);
        let rig = rig_with(&disk, state.path(), slow.clone()).await;
        Self { rig, slow, a, file, sum, _state: state, disk, _serial }
    }

    /// What a refused release must leave: see [`assert_back`].
    fn assert_back(&self) {
        assert_back(&self.rig, &self.disk, &self.a, &self.file, &self.sum);
    }
}

/// What a refused release must leave, observed the moment it returns: the disk mounted where it was, writable, PRESENT,
/// nothing journalled, its data intact.
fn assert_back(rig: &Rig, disk: &LoopDisk, mounted: &Path, file: &Path, sum: &str) {
    assert_eq!(findmnt_targets(&disk.dev), BTreeSet::from([mounted.display().to_string()]), "mounted again");
    assert!(!read_only(&disk.dev), "writable again");
    assert_eq!(rig.state(), DiskState::Present);
    assert_eq!(std::fs::read_dir(&rig.state_dir).map(|d| d.count()).unwrap_or(0), 0, "nothing journalled");
    assert_eq!(checksum(file), sum);
    std::fs::write(mounted.join("after"), b"usable").unwrap();
}

/// The flush hangs past the deadline, after the disk's filesystem was unmounted: the release answers within the
/// deadline, naming the step, with the mount already back.
#[tokio::test(flavor = "multi_thread")]
async fn a_release_that_outlives_its_deadline_is_undone_before_it_answers() {
    let fixture = SlowDisk::new(Duration::from_secs(6)).await;
    let (rig, a) = (&fixture.rig, &fixture.a);

    let deadline = Duration::from_secs(3);
    let started = Instant::now();
    let err = rig.releaser.prepare(&rig.serial, true, false, Deadline::after(deadline)).await.unwrap_err();
    let took = started.elapsed();
    fixture.assert_back();
    assert!(took < deadline, "answered within the deadline, after {took:?}");
    assert!(took > deadline - Duration::from_secs(1), "not before the steps ran out of it: {took:?}");
    assert!(matches!(err, ReleaseError::DeadlineExceeded { .. }), "{err:?}");
    assert_eq!(
        err.to_string(),
        format!(
            "disk '{}' was not released: flushing it to the hypervisor's storage did not finish within the deadline \
             of 3.0s; everything was put back: {} (ext4) in the host mount namespace mounted again; retry with a \
             longer deadline",
            rig.serial,
            a.display()
        )
    );
    fixture.slow.wait_ended(1);
}

/// udev's probes of the disk never end (a `blkid` holds it open for reading): the deadline passes during the first
/// scan, before anything changed.
#[tokio::test(flavor = "multi_thread")]
async fn a_deadline_that_passes_while_udev_probes_the_disk_changes_nothing() {
    let _serial = serial();
    let mut disk = LoopDisk::new("ext4");
    let a = disk.mount_at("a");
    let (file, sum) = write_data(&a);
    let blkid = disk.dir.path().join("blkid");
    std::fs::copy("/usr/bin/sleep", &blkid).unwrap();
    let probe =
        Holder::start("sh", &["-c", &format!("exec 3<{}; echo ready; exec '{}' 1000", disk.dev, blkid.display())]);
    let state = tempfile::tempdir().unwrap();
    let rig = rig(&disk, state.path()).await;

    let started = Instant::now();
    let err =
        rig.releaser.prepare(&rig.serial, true, false, Deadline::after(Duration::from_secs(2))).await.unwrap_err();
    let took = started.elapsed();
    assert_back(&rig, &disk, &a, &file, &sum);
    assert!(took < Duration::from_secs(2), "answered within the deadline, after {took:?}");
    assert_eq!(
        err.to_string(),
        format!(
            "disk '{}' was not released: the scan of what uses it (and the wait for udev's probes of it to end) did \
             not finish within the deadline of 2.0s; nothing was changed; retry with a longer deadline",
            rig.serial
        )
    );
    drop(probe);
}

/// A deadline long enough changes nothing: a slow flush that fits in it, the same steps as without one.
#[tokio::test(flavor = "multi_thread")]
async fn a_release_within_its_deadline_is_the_same_release() {
    let fixture = SlowDisk::new(Duration::from_secs(1)).await;
    let (rig, disk) = (&fixture.rig, &fixture.disk);

    let released = rig.releaser.prepare(&rig.serial, true, false, Deadline::after(Duration::from_secs(30))).await;
    let released = released.unwrap();
    assert!(released.released, "{released:#?}");
    let kinds: Vec<&str> = released.actions.iter().map(|a| a.kind.as_str()).collect();
    assert_eq!(kinds, ["scan", "unmount", "verify", "flush", "read-only"]);
    assert!(findmnt_targets(&disk.dev).is_empty() && read_only(&disk.dev));
    assert_eq!(rig.state(), DiskState::Released);
    assert_eq!(std::fs::read_dir(&rig.state_dir).unwrap().count(), 1, "journalled as a release without one is");
    fixture.slow.wait_ended(1);

    rig.releaser.cancel(&rig.serial).await.unwrap();
    fixture.assert_back();
}

/// Serves the agent's gRPC service over the rig on a Unix socket in `dir`, as the agent does on its local socket.
fn serve(rig: &Rig, dir: &Path) -> PathBuf {
    use wukong_agent::{agent_info::AgentFacts, config::Limits, limits::Admission, service::DiskAgentService};
    let socket = dir.join("agent.sock");
    let incoming = tokio_stream::wrappers::UnixListenerStream::new(tokio::net::UnixListener::bind(&socket).unwrap());
    let (_, stopping) = tokio::sync::watch::channel(false);
    let service = DiskAgentService::new(
        rig.inventory.clone(),
        Arc::new(AgentFacts::new("/proc".into(), None, &ActiveSource::procfs())),
        UsageScanner::new(HostRoots::default(), ActiveSource::procfs()),
        rig.releaser.clone(),
        Default::default(),
        Admission::new(Limits::default()),
        stopping,
    );
    let server = tonic::transport::Server::builder()
        .add_service(wukong_proto::v1::disk_agent_server::DiskAgentServer::new(service))
        .serve_with_incoming(incoming);
    tokio::spawn(server);
    socket
}

/// Through gRPC: the companion's deadline, and a plain client's own call deadline (grpc-timeout), each end in
/// DEADLINE_EXCEEDED with the disk back by the time the answer arrives.
#[tokio::test(flavor = "multi_thread")]
async fn over_grpc_a_missed_deadline_is_deadline_exceeded_with_the_disk_back() {
    use wukong_controller_client::agent_client::{AgentAddress, AgentClient};
    let fixture = SlowDisk::new(Duration::from_secs(6)).await;
    let rig = &fixture.rig;
    let socket = serve(rig, fixture.disk.dir.path());
    let serial = rig.serial.to_string();

    let client = AgentClient::connect(AgentAddress::Unix(socket.clone())).unwrap();
    assert!(client.agent_info().await.unwrap().capabilities.contains(&"release-deadline".to_string()));
    let started = Instant::now();
    let err = client.prepare_detach_within(&serial, true, false, Duration::from_secs(2)).await.unwrap_err();
    let took = started.elapsed();
    fixture.assert_back();
    assert!(took < Duration::from_secs(2), "answered within the deadline, after {took:?}");
    assert_eq!(err.code(), Some(tonic::Code::DeadlineExceeded), "{err:?}");
    assert!(
        err.to_string().starts_with(&format!(
            "disk '{serial}' was not released: flushing it to the hypervisor's storage did not finish within the \
             deadline of 2.0s; everything was put back"
        )),
        "{err}"
    );

    let channel = tonic::transport::Endpoint::from_static("http://agent.invalid")
        .connect_with_connector(tower::service_fn(move |_| {
            let socket = socket.clone();
            async move { tokio::net::UnixStream::connect(socket).await.map(hyper_util::rt::TokioIo::new) }
        }))
        .await
        .unwrap();
    let mut plain = wukong_proto::v1::disk_agent_client::DiskAgentClient::new(channel);
    let mut request = tonic::Request::new(wukong_proto::v1::PrepareDetachRequest {
        serial: serial.clone(),
        unmount: true,
        ..Default::default()
    });
    request.set_timeout(Duration::from_secs(3));
    let started = Instant::now();
    let status = plain.prepare_detach(request).await.unwrap_err();
    let took = started.elapsed();
    fixture.assert_back();
    assert!(took < Duration::from_secs(3), "answered within the call's deadline, after {took:?}");
    assert_eq!(status.code(), tonic::Code::DeadlineExceeded, "{status:?}");
    assert!(status.message().contains("did not finish within the deadline of 3.0s"), "{}", status.message());
    fixture.slow.wait_ended(2);
}

/// The kernel's block devices, as SCSI ones whose delete the kernel refuses: setting a state is recorded (a loop
/// device has none), and each delete fails.
#[derive(Default)]
struct UndeletableScsi {
    states: std::sync::Mutex<Vec<String>>,
}

impl BlockDevices for UndeletableScsi {
    fn set_scsi_state(&self, _: &HostRoots, kernel_name: &str, state: &str) -> Result<(), FenceError> {
        self.states.lock().unwrap().push(format!("{kernel_name} {state}"));
        Ok(())
    }

    fn scsi_delete(&self, roots: &HostRoots, kernel_name: &str) -> Result<(), FenceError> {
        let path = roots.sys_block(kernel_name).join("device/delete").display().to_string();
        Err(FenceError::Sysfs { path, source: std::io::Error::from_raw_os_error(nix::libc::EINVAL) })
    }
}

/// A SCSI release answers once the device is offline, and the inventory lists the disk as gone from then on, though
/// the device is still there; when its delete then fails, a cancel finds the same device (by the kernel's disk
/// sequence number) and lists it back, mounted, without a rescan.
#[tokio::test(flavor = "multi_thread")]
async fn a_scsi_release_whose_delete_fails_is_cancelled_on_the_same_device() {
    let _serial = serial();
    let mut disk = LoopDisk::new("ext4");
    let a = disk.mount_at("a");
    let (file, sum) = write_data(&a);
    let state = tempfile::tempdir().unwrap();
    let devices = Arc::new(UndeletableScsi::default());
    let name = disk.name();
    let diskseq = wukong_agent::disk::diskseq(&HostRoots::default(), &name);
    assert!(diskseq > 0, "this machine's kernel numbers disks");
    let rig = rig_as(&disk, state.path(), devices.clone(), |d| {
        d.bus = Bus::Scsi as i32;
        d.scsi_address = Some(ScsiAddress { host: 9, channel: 0, target: 0, lun: 1 });
        d.diskseq = diskseq;
    })
    .await;

    let released = rig.releaser.prepare(&rig.serial, true, false, None).await.unwrap();
    assert!(released.released, "{released:#?}");
    let fence = released.actions.last().unwrap();
    assert!(fence.description.starts_with(&format!("set SCSI device {} offline", disk.dev)), "{fence:?}");
    assert_eq!(*devices.states.lock().unwrap(), [format!("{name} offline")]);
    assert!(findmnt_targets(&disk.dev).is_empty(), "unmounted");
    let snap = rig.inventory.snapshot();
    assert!(snap.find_present(&rig.serial).is_err(), "gone from the guest's disks the moment it is released");
    assert_eq!(snap.find(&rig.serial).unwrap().state(), DiskState::Released, "listed as released");

    let cancelled = rig.releaser.cancel(&rig.serial).await.unwrap();
    let kinds: Vec<&str> = cancelled.actions.iter().map(|a| a.kind.as_str()).collect();
    assert_eq!(kinds, ["scsi-online", "mount"], "{:#?}", cancelled.actions);
    let online = &cancelled.actions[0].description;
    assert!(online.contains("was not deleted; it is online again"), "{online}");
    let back = rig.inventory.snapshot().find_present(&rig.serial).unwrap().clone();
    assert_eq!((back.state(), back.diskseq, back.kernel_name.as_str()), (DiskState::Present, diskseq, name.as_str()));
    assert_eq!(findmnt_targets(&disk.dev), BTreeSet::from([a.display().to_string()]), "mounted again");
    assert_eq!(checksum(&file), sum, "the data is intact");
    assert_eq!(std::fs::read_dir(&rig.state_dir).unwrap().count(), 0, "the journal entry is gone");
}
