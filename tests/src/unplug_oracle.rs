//! The unplug oracle: an independent witness of what a hot-unplug pulled out from under the guest.
//!
//! The lab's virt-handler unplugs a disk whenever its volume leaves the VMI's spec, whatever the guest does with it,
//! as KubeVirt does. Tests prove Wukong keeps that from hurting; to prove it they need a judge that is not Wukong:
//! the agent cannot vouch for itself. So at the instant of each real unplug, virt-handler asks the guest itself,
//! through the lab's test-only control channel ([`GuestShell`], not the agent), whether the disk (found by the serial
//! it was plugged with) is mounted in any mount namespace, swapped on, a member of a holder (dm, md), the backing of
//! a loop device, or held by a process (an open file, the device node, a working directory); an unplug of a disk in
//! any such use is recorded as an [`UnsafeUnplug`] with what held it. An oracle that cannot tell records the unplug as
//! unsafe too, with the reason: it never passes an unplug it did not see.
//!
//! One shell round trip per unplug (one script, [`script`]), answered in a line format [`parse`] reads.

use crate::GuestShell;
use anyhow::{Context, Result, bail, ensure};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

/// Longest the oracle waits for the guest's answer: a guest that does not answer in time is reported, not waited for
/// (the unplug it precedes goes ahead regardless, as KubeVirt's does).
const ORACLE_TIMEOUT: Duration = Duration::from_secs(10);

/// An unplug of a disk the guest still used, as the oracle saw it just before the unplug.
#[derive(Debug, Clone)]
pub struct UnsafeUnplug {
    pub vmi: String,
    pub volume: String,
    pub serial: String,
    /// The guest's block device with that serial (`sdb`), if the oracle found it.
    pub device: Option<String>,
    /// What held it, human-readable: "mounted at /mnt/x", "held open by pid 42 (sh): /mnt/x/log", or why the
    /// oracle could not tell.
    pub held_by: Vec<String>,
    /// When the oracle asked.
    pub at: SystemTime,
}

/// One thing that kept the disk in use, as the guest reported it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Hold {
    /// A mount of the disk or a partition (any mount namespace) at this mount point.
    Mount(String),
    /// Swap on the disk, a partition or a file on it.
    Swap(String),
    /// A stacked device on the disk or a partition (`dm-0`, `md127`), from sysfs `holders`.
    Holder(String),
    /// A loop device whose backing file is the disk, a partition or a file on it.
    Loop { device: String, backing: String },
    /// A process with the device node or a file on the disk open.
    Open { pid: u32, comm: String, path: String },
    /// A process whose working directory is on the disk.
    Cwd { pid: u32, comm: String, path: String },
}

impl std::fmt::Display for Hold {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Hold::Mount(at) => write!(f, "mounted at {at}"),
            Hold::Swap(on) => write!(f, "swapped on: {on}"),
            Hold::Holder(name) => write!(f, "a member of {name}"),
            Hold::Loop { device, backing } => write!(f, "backing {device}: {backing}"),
            Hold::Open { pid, comm, path } => write!(f, "held open by pid {pid} ({comm}): {path}"),
            Hold::Cwd { pid, comm, path } => write!(f, "the working directory of pid {pid} ({comm}): {path}"),
        }
    }
}

/// The guest's answer, read.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    /// The block device with the serial; `None`: the guest has no such disk (nothing to hold).
    pub device: Option<String>,
    pub holds: Vec<Hold>,
    /// Lines the format does not have (an error a tool printed, say): a report with any cannot be trusted.
    pub unreadable: Vec<String>,
    /// The script's last line was seen: the answer is whole.
    pub complete: bool,
}

impl Report {
    /// What held the disk, human-readable; an error when the answer cannot be trusted to be complete.
    pub fn held_by(&self) -> Result<Vec<String>> {
        ensure!(self.complete, "the oracle's script in the guest did not finish");
        ensure!(
            self.unreadable.is_empty(),
            "the oracle's script in the guest printed unexpected lines: {:?}",
            self.unreadable
        );
        let mut held_by: Vec<String> = Vec::new();
        for hold in &self.holds {
            let text = hold.to_string();
            if !held_by.contains(&text) {
                held_by.push(text);
            }
        }
        Ok(held_by)
    }
}

/// The oracle's script for the disk with `serial`, one shell command for the guest's busybox sh. It finds the disk
/// from sysfs alone (virtio-blk's `serial`; SCSI's VPD page 0x80, the serial after a 4-byte header), as QEMU sets
/// them, not through udev's links (their names are udev's encoding of the serial). Mounts come from every process's
/// `mountinfo` (every mount namespace), matched by the device numbers of the disk and its partitions or by the mount
/// source; open files, cwds, swaps and loop backings from one `stat -L` of each, matched by the device they are on
/// (`st_dev`, a mounted filesystem's included) or the device they are (`st_rdev`): no path prefixes, which
/// namespaces and bind mounts would fool. Output lines are tab-separated (see [`parse`]); `end` closes a whole answer.
pub fn script(serial: &str) -> String {
    script_in(serial, "/sys")
}

/// [`script`] with sysfs at `sys`.
fn script_in(serial: &str, sys: &str) -> String {
    format!("serial={}\nsys={}\n{}", shell_quote(serial), shell_quote(sys), SCRIPT)
}

const SCRIPT: &str = r#"disk=
# QEMU puts a SCSI disk's serial in VPD page 0x80 after its 4-byte header, a virtio-blk disk's in `serial`.
# A disk can vanish while this runs (a release deletes its SCSI device just before the unplug): what cannot be read
# any more is not there.
for d in $sys/block/*; do
  s=
  if [ -r "$d/serial" ]; then { read -r s < "$d/serial"; } 2>/dev/null
  elif [ -r "$d/device/vpd_pg80" ]; then s=$(tail -c +5 "$d/device/vpd_pg80" 2>/dev/null)
  fi
  if [ "$s" = "$serial" ]; then disk=${d##*/}; break; fi
done
if [ -n "$disk" ]; then
  printf 'device\t%s\n' "$disk"
  names=$disk
  for p in $sys/block/$disk/$disk*; do [ -r "$p/dev" ] && names="$names ${p##*/}"; done
  ids=
  for n in $names; do { read -r id < "$sys/class/block/$n/dev"; } 2>/dev/null && ids="$ids $id"; done
  for h in $sys/block/$disk/holders/* $sys/block/$disk/$disk*/holders/*; do
    [ -e "$h" ] && printf 'holder\t%s\n' "${h##*/}"
  done
  # A filesystem lazily unmounted (umount -l) is gone from mountinfo, but its open files are still on the disk itself.
  fsdevs=$ids
  # The mount's device (field 3) is not the disk's for every filesystem (btrfs): the mount source is matched too.
  mounts=$(cat /proc/[0-9]*/mountinfo 2>/dev/null | awk -v ids="$ids" -v names="$names" '
    BEGIN { n = split(ids, a, " "); for (i = 1; i <= n; i++) id[a[i]] = 1
            n = split(names, a, " "); for (i = 1; i <= n; i++) node["/dev/" a[i]] = 1 }
    { i = 7; while (i < NF && $i != "-") i++; source = $(i + 2) }
    ($3 in id) || (source in node) { if (!m[$5]++) print "mount", $5; if (!f[$3]++) print "fsdev", $3 }')
  while read -r k v; do
    case $k in
      mount) printf 'mount\t%s\n' "$v" ;;
      fsdev) fsdevs="$fsdevs $v" ;;
    esac
  done <<EOF
$mounts
EOF
  # One stat for all: forks are what an emulated guest is slow at.
  {
    stat -L -c 'fd - %d %t:%T %n' /proc/[0-9]*/fd/* /proc/[0-9]*/cwd 2>/dev/null
    tail -n +2 /proc/swaps | while read -r f rest; do stat -L -c 'swap - %d %t:%T %n' "$f" 2>/dev/null; done
    for b in $sys/block/loop*/loop/backing_file; do
      [ -r "$b" ] && { read -r f < "$b"; } 2>/dev/null && { l=${b#"$sys"/block/}; stat -L -c "loop ${l%%/*} %d %t:%T %n" "$f" 2>/dev/null; }
    done
  } | awk -v ids="$ids" -v fsdevs="$fsdevs" '
    function dev(mm, p) { split(mm, p, ":"); return sprintf("%.0f", p[1] * 256 + p[2] % 256 + int(p[2] / 256) * 1048576) }
    function rdev(mm, p) { split(mm, p, ":"); return sprintf("%x:%x", p[1], p[2]) }
    BEGIN { n = split(ids, a, " "); for (i = 1; i <= n; i++) node[rdev(a[i])] = 1
            n = split(fsdevs, a, " "); for (i = 1; i <= n; i++) fs[dev(a[i])] = 1 }
    ($3 in fs) || ($4 in node) {
      path = $0; sub(/^[^ ]+ [^ ]+ [^ ]+ [^ ]+ /, "", path)
      if ($1 == "fd") { split(path, q, "/"); kind = (q[4] == "cwd") ? "cwd" : "open"; print kind, q[3], path }
      else print $1, $2, path
    }' | while read -r k a b; do
    case $k in
      # A process gone since the stat no longer holds anything.
      open|cwd)
        comm=; { read -r comm < "/proc/$a/comm"; } 2>/dev/null
        t=$(readlink "$b") && printf '%s\t%s\t%s\t%s\n' "$k" "$a" "$comm" "$t" ;;
      swap) printf 'swap\t%s\n' "$b" ;;
      loop) printf 'loop\t%s\t%s\n' "$a" "$b" ;;
    esac
  done
fi
echo end
"#;

/// `s` as one word for sh.
fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// Reads the script's answer. Lines it does not know, or known ones with bad fields, go to
/// [`Report::unreadable`]; nothing panics on any input.
pub fn parse(output: &str) -> Report {
    let mut report = Report::default();
    for line in output.lines() {
        let fields: Vec<&str> = line.splitn(4, '\t').collect();
        let hold = match fields.as_slice() {
            [""] => continue,
            ["end"] => {
                report.complete = true;
                continue;
            }
            ["device", name] if !name.is_empty() => {
                report.device = Some(name.to_string());
                continue;
            }
            ["mount", at] => Some(Hold::Mount(unescape(at))),
            ["swap", on] => Some(Hold::Swap(unescape(on))),
            ["holder", name] if !name.is_empty() => Some(Hold::Holder(name.to_string())),
            ["loop", device, backing] => Some(Hold::Loop { device: device.to_string(), backing: backing.to_string() }),
            [kind @ ("open" | "cwd"), pid, comm, path] => pid.parse().ok().map(|pid| {
                let (comm, path) = (comm.to_string(), path.to_string());
                match *kind {
                    "open" => Hold::Open { pid, comm, path },
                    _ => Hold::Cwd { pid, comm, path },
                }
            }),
            _ => None,
        };
        match hold {
            Some(hold) => report.holds.push(hold),
            None => report.unreadable.push(line.to_string()),
        }
    }
    report
}

/// A path as the kernel escapes it in `mountinfo` and `/proc/swaps` (`\040` for a space, `\011`, `\012`, `\134`),
/// back; anything else as it is.
fn unescape(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes.get(i + 1..i + 4).filter(|d| d.iter().all(|b| (b'0'..=b'7').contains(b)));
        match (bytes[i], octal) {
            (b'\\', Some(d)) => {
                let value = d.iter().fold(0u32, |v, b| v * 8 + u32::from(b - b'0'));
                out.push(u8::try_from(value).unwrap_or(b'?'));
                i += 4;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Asks the guest behind `shell` what holds its disk with `serial`: one round trip, bounded.
pub async fn report(shell: &GuestShell, serial: &str) -> Result<Report> {
    let out = tokio::time::timeout(ORACLE_TIMEOUT, shell.run(&script(serial)))
        .await
        .with_context(|| format!("the guest did not answer within {ORACLE_TIMEOUT:?}"))??;
    if out.status != 0 {
        bail!("the oracle's script in the guest failed with status {}: {}", out.status, out.output.trim());
    }
    Ok(parse(&out.output))
}

/// What the oracle saw before one unplug, to be recorded once the unplug is done ([`Oracle::record`]): an unplug that
/// fails is tried again, and asked about again.
#[derive(Debug)]
pub struct Check {
    seen: UnsafeUnplug,
    round_trip: Duration,
}

/// The oracle of one guest: asks it before each unplug and keeps what it found.
pub struct Oracle {
    shell: GuestShell,
    unsafe_unplugs: Mutex<Vec<UnsafeUnplug>>,
    /// How long each check's round trip to the guest took, one per checked unplug.
    round_trips: Mutex<Vec<Duration>>,
}

impl Oracle {
    pub fn new(shell: GuestShell) -> Self {
        Self { shell, unsafe_unplugs: Mutex::new(Vec::new()), round_trips: Mutex::new(Vec::new()) }
    }

    /// Asks the guest what holds the disk with `serial`, volume `volume` of VMI `vmi`, now. `None`: the volume's
    /// serial is unknown (virt-handler never plugged it), which the oracle cannot check and so reports.
    pub async fn ask(&self, vmi: &str, volume: &str, serial: Option<&str>) -> Check {
        let at = SystemTime::now();
        let started = Instant::now();
        let answer = match serial {
            Some(serial) => report(&self.shell, serial).await,
            None => Err(anyhow::anyhow!("volume {volume} was not hot-plugged by the lab's virt-handler: no serial")),
        };
        let round_trip = started.elapsed();
        let (device, held_by) = match answer.and_then(|r| r.held_by().map(|held_by| (r.device, held_by))) {
            Ok(seen) => seen,
            Err(e) => (None, vec![format!("the oracle could not ask the guest: {e:#}")]),
        };
        let serial = serial.unwrap_or_default().to_string();
        let seen = UnsafeUnplug { vmi: vmi.into(), volume: volume.into(), serial, device, held_by, at };
        tracing::info!(
            vmi, volume, serial = seen.serial, device = ?seen.device, held_by = ?seen.held_by,
            round_trip_ms = crate::millis(round_trip), "unplug oracle"
        );
        Check { seen, round_trip }
    }

    /// Records a check whose unplug was done.
    pub fn record(&self, check: Check) {
        self.round_trips.lock().unwrap().push(check.round_trip);
        if !check.seen.held_by.is_empty() {
            self.unsafe_unplugs.lock().unwrap().push(check.seen);
        }
    }

    /// Every unplug done while the guest still used the disk, or whose use the oracle could not learn.
    pub fn unsafe_unplugs(&self) -> Vec<UnsafeUnplug> {
        self.unsafe_unplugs.lock().unwrap().clone()
    }

    /// The round trip of each checked unplug, in order.
    pub fn round_trips(&self) -> Vec<Duration> {
        self.round_trips.lock().unwrap().clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What the script printed in the lab guest for a mounted disk with a writer, a partition swapped on and a dm
    /// device on another partition.
    const FIXTURE: &str = "device\tsdb\nholder\tdm-0\nmount\t/mnt/a\\040b\nmount\t/mnt/x\n\
                           open\t42\tsleep\t/mnt/x/log\ncwd\t43\tsh\t/mnt/x\nswap\t/dev/sdb2\n\
                           loop\tloop0\t/mnt/x/img\nopen\t42\tsleep\t/mnt/x/log\nend\n";

    #[test]
    fn a_full_answer_is_read_and_described() {
        let report = parse(FIXTURE);
        assert_eq!(report.device.as_deref(), Some("sdb"));
        assert!(report.complete && report.unreadable.is_empty(), "{report:?}");
        assert_eq!(report.holds[1], Hold::Mount("/mnt/a b".into()));
        assert_eq!(
            report.held_by().unwrap(),
            [
                "a member of dm-0",
                "mounted at /mnt/a b",
                "mounted at /mnt/x",
                "held open by pid 42 (sleep): /mnt/x/log",
                "the working directory of pid 43 (sh): /mnt/x",
                "swapped on: /dev/sdb2",
                "backing loop0: /mnt/x/img",
            ]
        );
    }

    #[test]
    fn a_disk_the_guest_does_not_have_holds_nothing() {
        let report = parse("end\n");
        assert_eq!(report, Report { complete: true, ..Default::default() });
        assert!(report.held_by().unwrap().is_empty());
    }

    #[test]
    fn a_path_with_a_tab_keeps_it() {
        let report = parse("device\tvdb\nopen\t7\tdb\t/data/a\tb\nend\n");
        assert_eq!(report.holds, [Hold::Open { pid: 7, comm: "db".into(), path: "/data/a\tb".into() }]);
    }

    #[test]
    fn hostile_or_broken_answers_are_never_trusted_and_never_panic() {
        let hostile = [
            "device\tsdb\nawk: cmd. line:3: syntax error\nend\n",
            "device\tsdb\nopen\tnot-a-pid\tsh\t/x\nend\n",
            "device\tsdb\nopen\t99999999999\tsh\t/x\nend\n",
            "device\tsdb\nopen\t42\nend\n",
            "device\t\nend\n",
            "holder\t\nend\n",
            "\u{0}\u{ffff}\t\t\t\t\nend\n",
            "mount\t/mnt/\\7\\777\\\nend\n",
        ];
        for text in hostile {
            let report = parse(text);
            assert!(report.held_by().is_err() || !report.holds.is_empty(), "{text:?}: {report:?}");
        }
        let cut = parse("device\tsdb\nmount\t/mnt/x\n");
        let error = cut.held_by().unwrap_err().to_string();
        assert_eq!(error, "the oracle's script in the guest did not finish");
        let garbage = parse("device\tsdb\nsh: stat: not found\nend\n");
        assert!(garbage.held_by().unwrap_err().to_string().contains("sh: stat: not found"));
        // Any bytes at all.
        let noise: String = (0u32..2000).filter_map(|i| char::from_u32(i * 37 % 0x3000)).collect();
        let _ = parse(&noise).held_by();
        assert_eq!(unescape("\\"), "\\");
        assert_eq!(unescape("a\\04"), "a\\04");
        assert_eq!(unescape("\\777"), "?");
    }

    /// A guest the oracle cannot reach, or a volume whose serial it does not know: the unplug is recorded as unsafe,
    /// with the reason, never passed.
    #[tokio::test]
    async fn an_oracle_that_cannot_ask_records_the_unplug_as_unsafe() {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let oracle = Oracle::new(GuestShell { route: crate::ControlRoute::Tcp(port) });
        let refused = oracle.ask("vm1", "data", Some("data")).await;
        oracle.record(refused);
        let unknown = oracle.ask("vm1", "boot", None).await;
        oracle.record(unknown);
        let recorded = oracle.unsafe_unplugs();
        assert_eq!(oracle.round_trips().len(), 2);
        assert_eq!(recorded.len(), 2, "{recorded:#?}");
        assert_eq!((recorded[0].volume.as_str(), recorded[0].serial.as_str()), ("data", "data"));
        assert!(recorded[0].held_by[0].starts_with("the oracle could not ask the guest: "), "{recorded:#?}");
        assert_eq!(
            recorded[1].held_by,
            [
                "the oracle could not ask the guest: volume boot was not hot-plugged by the lab's virt-handler: no serial"
            ]
        );
    }

    /// A disk that vanishes while the script runs (a release deleted its SCSI device just before the unplug): its
    /// files listed but unreadable are not there, and the answer is still complete and trusted. The soak's round 35
    /// (seed 1796528685091034679) recorded "tail: can't open '/sys/block/sdb/device/vpd_pg80'" as an unsafe unplug.
    /// Here sysfs is a tree whose vanished disks' files are directories: listed, readable to `[ -r ]`, unreadable.
    #[test]
    fn a_disk_vanishing_during_the_scan_is_not_there() {
        let sys = tempfile::tempdir().unwrap();
        let put = |path: &str, bytes: &[u8]| {
            let path = sys.path().join(path);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, bytes).unwrap();
        };
        put("block/sdy/device/vpd_pg80", b"\0\x80\0\x04data");
        put("block/sdy/dev", b"250:250\n");
        put("class/block/sdy/dev", b"250:250\n");
        for gone in ["block/sda/device/vpd_pg80", "block/vda/serial", "class/block/sdy1/dev", "block/sdy/sdy1/dev"] {
            std::fs::create_dir_all(sys.path().join(gone)).unwrap();
        }
        // As the guest's control handler runs it: busybox sh, stderr into the answer.
        let answer = |serial: &str| {
            let script = format!("{{\n{}\n}} 2>&1", script_in(serial, sys.path().to_str().unwrap()));
            let out = std::process::Command::new("busybox")
                .args(["sh", "-c", &script])
                .output()
                .expect("busybox (scripts/lib/install-deps.sh)");
            parse(&String::from_utf8_lossy(&out.stdout))
        };
        let found = answer("data");
        assert_eq!(found.device.as_deref(), Some("sdy"), "{found:?}");
        assert_eq!(found.held_by().unwrap(), Vec::<String>::new());
        let gone = answer("other");
        assert_eq!(gone, Report { complete: true, ..Default::default() });
    }

    #[test]
    fn the_serial_is_one_shell_word() {
        assert!(script("data1").starts_with("serial='data1'\n"));
        assert!(script("it's").starts_with(r"serial='it'\''s'"));
    }
}
