//! Watches udev for block devices and feeds the inventory.
//!
//! libudev objects are `!Send`, so the monitor lives on one dedicated thread. The monitor socket is created before
//! the first enumeration, so no event is lost between the two. Events are only triggers: the affected disk is
//! re-described from sysfs and udev's database, which makes handling idempotent and order-proof. The system's mount
//! table is watched beside it: mounting a disk at `/boot` makes it a system disk without any udev event.

use crate::disk;
use crate::inventory::Update;
use crate::roots::HostRoots;
use crate::system::{self, SystemNow, SystemView};
use crate::udev_db::{LibUdevDb, UdevDb};
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::socket::{setsockopt, sockopt};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::thread;
use tokio::sync::mpsc;
use wukong_proto::v1::Disk;

/// Receive buffer of the monitor socket: a burst of hot-plugs (with partitions and holders) must not overflow it.
const MONITOR_BUFFER_BYTES: usize = 16 << 20;
/// How often the thread checks whether the inventory still listens, when no event arrives.
const IDLE_CHECK_MS: u16 = 500;

/// Why the udev source could not start.
#[derive(Debug, thiserror::Error)]
pub enum UdevSourceError {
    #[error("cannot open the udev monitor for block devices: {0}; is systemd-udevd running in the guest?")]
    Monitor(#[source] std::io::Error),
    #[error("cannot start the udev thread: {0}")]
    Thread(#[source] std::io::Error),
}

/// Whether a udev daemon runs: its control socket exists (what libudev itself checks). Without one the monitor
/// opens fine but no device is ever initialised, so the agent would report no disks without saying why.
fn daemon_running(roots: &HostRoots) -> bool {
    control_socket(roots).exists()
}

fn control_socket(roots: &HostRoots) -> PathBuf {
    roots.run.join("udev/control")
}

/// Starts the udev thread. The first update it sends is a full `Reconcile`; it stops when `updates` is closed.
pub fn spawn(roots: HostRoots, updates: mpsc::Sender<Update>) -> Result<thread::JoinHandle<()>, UdevSourceError> {
    if !daemon_running(&roots) {
        tracing::warn!(
            "no udev daemon found ({} is missing); disks will not be seen until systemd-udevd runs in this guest",
            control_socket(&roots).display()
        );
    }
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let handle = thread::Builder::new()
        .name("udev-source".into())
        .spawn(move || {
            let socket = match open_monitor() {
                Ok(s) => {
                    let _ = ready_tx.send(Ok(()));
                    s
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                    return;
                }
            };
            let source = Source { roots: &roots, db: &LibUdevDb, system: SystemView::capture(&roots) };
            run(&source, &socket, &updates);
        })
        .map_err(UdevSourceError::Thread)?;
    match ready_rx.recv() {
        Ok(Ok(())) => Ok(handle),
        Ok(Err(e)) => Err(UdevSourceError::Monitor(e)),
        Err(_) => Err(UdevSourceError::Monitor(std::io::Error::other("the udev thread ended at start"))),
    }
}

fn open_monitor() -> std::io::Result<udev::MonitorSocket> {
    let socket = udev::MonitorBuilder::new()?.match_subsystem("block")?.listen()?;
    // SO_RCVBUFFORCE needs CAP_NET_ADMIN; without it the kernel caps SO_RCVBUF at rmem_max, which still helps.
    let size = MONITOR_BUFFER_BYTES;
    if setsockopt(&socket.as_fd(), sockopt::RcvBufForce, &size).is_err() {
        let _ = setsockopt(&socket.as_fd(), sockopt::RcvBuf, &size);
    }
    Ok(socket)
}

/// Everything needed to describe a disk.
struct Source<'a> {
    roots: &'a HostRoots,
    db: &'a dyn UdevDb,
    system: SystemView,
}

impl Source<'_> {
    /// The disk as udev and sysfs describe it, marked when it is a system disk.
    fn describe(&self, system: &SystemNow<'_>, kernel_name: &str) -> Option<Disk> {
        let mut disk = disk::describe(self.roots, self.db, kernel_name)?;
        system.mark(&mut disk);
        Some(disk)
    }

    /// All physical disks udev has settled.
    fn enumerate(&self) -> Vec<Disk> {
        let mut names: Vec<String> = std::fs::read_dir(self.roots.sys.join("block"))
            .map(|rd| rd.filter_map(|e| e.ok()).map(|e| e.file_name().to_string_lossy().into_owned()).collect())
            .unwrap_or_default();
        names.sort();
        // The system mounts are read once for all the disks.
        let system = self.system.now(self.roots);
        names
            .iter()
            .filter(|n| disk::is_physical_disk(self.roots, n))
            .filter_map(|n| self.describe(&system, n))
            .collect()
    }

    /// The inventory updates one event causes.
    fn updates_for(&self, trigger: &Trigger) -> Vec<Update> {
        let roots = self.roots;
        let refresh = |name: &str| match self.describe(&self.system.now(roots), name) {
            Some(d) => Update::Upsert(Box::new(d)),
            // Present in sysfs but not settled (no by-id link yet): it is not a disk we report, yet.
            None => Update::Remove(name.to_string()),
        };
        match trigger.devtype.as_str() {
            "disk" if trigger.action != "remove" && disk::is_physical_disk(roots, &trigger.kernel_name) => {
                vec![refresh(&trigger.kernel_name)]
            }
            "partition" => match &trigger.parent {
                Some(parent) if disk::is_physical_disk(roots, parent) => vec![refresh(parent)],
                _ => Vec::new(),
            },
            // A disk went away (sysfs no longer says what it was), or a virtual device (dm, md, loop) came, went or
            // changed, so holders of any disk may differ. Re-describing every disk is cheap, and the inventory only
            // publishes what really changed.
            _ => vec![Update::Reconcile(self.enumerate())],
        }
    }
}

fn run(source: &Source<'_>, socket: &udev::MonitorSocket, updates: &mpsc::Sender<Update>) {
    // Opened before the first enumeration, like the monitor: a mount between the two is seen.
    let mount_table = system::open_mount_table(source.roots)
        .inspect_err(
            |e| tracing::warn!(error = %e, "cannot watch the mount table; system disks are known at plug time"),
        )
        .ok();
    if updates.blocking_send(Update::Reconcile(source.enumerate())).is_err() {
        return;
    }
    loop {
        let mut fds = vec![PollFd::new(socket.as_fd(), PollFlags::POLLIN)];
        fds.extend(mount_table.as_ref().map(|table| PollFd::new(table.as_fd(), PollFlags::POLLPRI)));
        match poll(&mut fds, PollTimeout::from(IDLE_CHECK_MS)) {
            Ok(0) => {
                if updates.is_closed() {
                    return;
                }
                continue;
            }
            Ok(_) => {}
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => {
                tracing::error!(error = %e, "polling the udev monitor failed; the disk inventory stops updating");
                return;
            }
        }
        let fired = |i: usize| fds.get(i).and_then(|fd| fd.revents()).is_some_and(|r| !r.is_empty());
        let (udev_ready, mounts_changed) = (fired(0), fired(1));
        let mut batch = Vec::new();
        if mounts_changed {
            // Which disks hold /, /boot, /usr or /var may have changed; the inventory publishes only real changes.
            batch.push(Update::Reconcile(source.enumerate()));
        }
        if udev_ready {
            batch.extend(udev_updates(source, socket));
        }
        for update in batch {
            if updates.blocking_send(update).is_err() {
                return;
            }
        }
    }
}

/// The inventory updates of the events the monitor has ready.
fn udev_updates(source: &Source<'_>, socket: &udev::MonitorSocket) -> Vec<Update> {
    nix::errno::Errno::clear();
    let triggers: Vec<Trigger> = socket.iter().map(|e| Trigger::from_event(&e)).collect();
    // The iterator ends when a receive fails: EAGAIN when drained, ENOBUFS when the kernel dropped events.
    if nix::errno::Errno::last() == nix::errno::Errno::ENOBUFS {
        tracing::warn!("the udev monitor overflowed and dropped events; re-enumerating every disk");
        return vec![Update::Reconcile(source.enumerate())];
    }
    triggers.iter().flat_map(|t| source.updates_for(t)).collect()
}

/// What a udev event is about, copied out of libudev.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Trigger {
    action: String,
    kernel_name: String,
    devtype: String,
    /// For a partition: the disk it belongs to (parent directory in sysfs).
    parent: Option<String>,
}

impl Trigger {
    fn from_event(event: &udev::Event) -> Self {
        let device = event.device();
        let syspath = device.syspath().to_path_buf();
        Self {
            action: device.action().map(|a| a.to_string_lossy().into_owned()).unwrap_or_default(),
            kernel_name: device.sysname().to_string_lossy().into_owned(),
            devtype: device.devtype().map(|t| t.to_string_lossy().into_owned()).unwrap_or_default(),
            parent: parent_name(&syspath),
        }
    }
}

fn parent_name(syspath: &Path) -> Option<String> {
    syspath.parent()?.file_name().map(|n| n.to_string_lossy().into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::udev_db::FixtureUdevDb;

    fn trigger(action: &str, name: &str, devtype: &str, parent: Option<&str>) -> Trigger {
        Trigger {
            action: action.into(),
            kernel_name: name.into(),
            devtype: devtype.into(),
            parent: parent.map(str::to_string),
        }
    }

    /// A fixture with one physical disk `vdb` (no serial) and a virtual `dm-0`.
    fn updates_for(roots: &HostRoots, db: &FixtureUdevDb, trigger: &Trigger) -> Vec<Update> {
        Source { roots, db, system: SystemView::default() }.updates_for(trigger)
    }

    fn fixture() -> (tempfile::TempDir, HostRoots, FixtureUdevDb) {
        let dir = tempfile::tempdir().unwrap();
        let roots = HostRoots::under(dir.path());
        std::fs::create_dir_all(roots.sys.join("devices/virtio3")).unwrap();
        std::fs::create_dir_all(roots.sys_block("vdb")).unwrap();
        std::fs::write(roots.sys_block("vdb").join("dev"), "254:16\n").unwrap();
        std::os::unix::fs::symlink("../../devices/virtio3", roots.sys_block("vdb").join("device")).unwrap();
        std::fs::create_dir_all(roots.sys_block("dm-0")).unwrap();
        std::fs::write(roots.sys_block("dm-0").join("dev"), "253:0\n").unwrap();
        let mut db = FixtureUdevDb::default();
        db.0.insert("vdb".into(), [("DEVNAME".to_string(), "/dev/vdb".to_string())].into());
        (dir, roots, db)
    }

    #[test]
    fn events_become_the_right_updates() {
        let (_dir, roots, db) = fixture();
        let upsert = updates_for(&roots, &db, &trigger("add", "vdb", "disk", None));
        assert!(matches!(&upsert[..], [Update::Upsert(d)] if d.kernel_name == "vdb"), "{upsert:?}");
        let partition = updates_for(&roots, &db, &trigger("add", "vdb1", "partition", Some("vdb")));
        assert!(matches!(&partition[..], [Update::Upsert(d)] if d.kernel_name == "vdb"), "{partition:?}");
        let foreign = updates_for(&roots, &db, &trigger("add", "loop0p1", "partition", Some("loop0")));
        assert!(foreign.is_empty(), "partitions of virtual devices are not ours: {foreign:?}");
        for t in [trigger("add", "dm-0", "disk", None), trigger("remove", "vdb", "disk", None)] {
            let u = updates_for(&roots, &db, &t);
            assert!(matches!(&u[..], [Update::Reconcile(disks)] if disks.len() == 1), "{t:?}: {u:?}");
        }
    }

    #[test]
    fn a_udev_daemon_is_known_by_its_control_socket() {
        let (_dir, roots, _) = fixture();
        assert!(!daemon_running(&roots));
        std::fs::create_dir_all(roots.run.join("udev")).unwrap();
        std::fs::write(roots.run.join("udev/control"), b"").unwrap();
        assert!(daemon_running(&roots));
    }

    #[test]
    fn unsettled_disk_is_removed_not_reported() {
        let (_dir, roots, mut db) = fixture();
        db.0.clear();
        let u = updates_for(&roots, &db, &trigger("change", "vdb", "disk", None));
        assert_eq!(u, vec![Update::Remove("vdb".into())]);
    }
}
