//! Human-readable rendering of agent data for `wukongctl`.

use serde_json::{Value, json};
use wukong_proto::v1::blocker::Detail;
use wukong_proto::v1::{
    AgentInfo, Blocker, BlockerKind, Bus, Disk, DiskEvent, DiskState, EventKind, Partition, PrepareDetachResponse,
    ReleaseAction, ReleaseMethod, UsageReport,
};

/// `1.5 GiB`-style sizes.
pub fn human_size(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 { format!("{bytes} B") } else { format!("{value:.1} {}", UNITS[unit]) }
}

pub fn bus_name(bus: Bus) -> &'static str {
    match bus {
        Bus::Scsi => "scsi",
        Bus::VirtioBlk => "virtio",
        Bus::Nvme => "nvme",
        Bus::Ata => "ata",
        Bus::Usb => "usb",
        Bus::Other | Bus::Unspecified => "other",
    }
}

pub fn state_name(disk: &Disk) -> &'static str {
    match disk.state() {
        DiskState::Releasing => "releasing",
        DiskState::Released => "released",
        DiskState::Present | DiskState::Unspecified => "present",
    }
}

fn event_name(kind: EventKind) -> &'static str {
    match kind {
        EventKind::Existing => "EXISTING",
        EventKind::Synced => "SYNCED",
        EventKind::Added => "ADDED",
        EventKind::Changed => "CHANGED",
        EventKind::Removed => "REMOVED",
        EventKind::Released => "RELEASED",
        EventKind::Unspecified => "UNKNOWN",
    }
}

/// Renders rows as aligned columns.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut out = String::new();
        for (i, (cell, w)) in cells.iter().zip(&widths).enumerate() {
            if i + 1 == cells.len() {
                out.push_str(cell);
            } else {
                out.push_str(&format!("{cell:<w$}  "));
            }
        }
        out.trim_end().to_string() + "\n"
    };
    let mut out = line(header.to_vec());
    for row in rows {
        out.push_str(&line(row.iter().map(String::as_str).collect()));
    }
    out
}

/// The `wukongctl disks` table.
pub fn disks_table(disks: &[Disk]) -> String {
    let rows: Vec<Vec<String>> = disks
        .iter()
        .map(|d| {
            // A filesystem on the whole disk (no partition table) is its content, as a partition's would be.
            let whole = (!d.fs_type.is_empty()).then(|| {
                let mut fs = d.fs_type.clone();
                if !d.fs_label.is_empty() {
                    fs.push_str(&format!(" label={}", d.fs_label));
                }
                if !d.fs_uuid.is_empty() {
                    fs.push_str(&format!(" uuid={}", d.fs_uuid));
                }
                fs
            });
            let contents: Vec<String> = whole
                .into_iter()
                .chain(d.partitions.iter().map(|p| {
                    if p.fs_type.is_empty() {
                        p.kernel_name.clone()
                    } else {
                        format!("{}:{}", p.kernel_name, p.fs_type)
                    }
                }))
                .chain(d.holders.iter().map(|h| format!("held by {}", h.kernel_name)))
                .collect();
            vec![
                if d.serial.is_empty() { "-".into() } else { d.serial.clone() },
                d.dev_node.clone(),
                bus_name(d.bus()).into(),
                human_size(d.size_bytes),
                if d.system { "system".into() } else { state_name(d).into() },
                d.by_id_links.first().cloned().unwrap_or_else(|| "-".into()),
                if contents.is_empty() { "-".into() } else { contents.join(",") },
            ]
        })
        .collect();
    let with_usage = disks.iter().any(|d| d.usage.is_some());
    let mut out = table(&["SERIAL", "DEVICE", "BUS", "SIZE", "STATE", "BY-ID", "CONTENTS"], &rows);
    if with_usage {
        for d in disks {
            if let Some(u) = &d.usage {
                out.push('\n');
                out.push_str(&usage_text(u));
            }
        }
    }
    out
}

pub fn blocker_kind_name(kind: BlockerKind) -> &'static str {
    match kind {
        BlockerKind::Mount => "mount",
        BlockerKind::Swap => "swap",
        BlockerKind::Holder => "holder",
        BlockerKind::Loop => "loop",
        BlockerKind::Process => "process",
        BlockerKind::KernelClaim => "kernel-claim",
        BlockerKind::System => "system",
        BlockerKind::StackedMount => "stacked-mount",
        BlockerKind::Unspecified => "other",
    }
}

/// The `wukongctl usage` text: a verdict line, then one row per blocker.
pub fn usage_text(report: &UsageReport) -> String {
    let took = report.scan_duration.map(|d| d.seconds as f64 * 1e3 + d.nanos as f64 / 1e6).unwrap_or(0.0);
    if !report.in_use {
        return format!("{} is not in use (scanned in {took:.1} ms)\n", report.serial);
    }
    let rows: Vec<Vec<String>> = report
        .blockers
        .iter()
        .map(|b| vec![blocker_kind_name(b.kind()).to_string(), b.device.clone(), b.message.clone()])
        .collect();
    format!(
        "{} is in use: {} blocker(s) (scanned in {took:.1} ms)\n{}",
        report.serial,
        report.blockers.len(),
        table(&["KIND", "DEVICE", "WHY"], &rows)
    )
}

/// The steps of a release or of its undoing, one per line with its duration.
pub fn actions_text(actions: &[ReleaseAction]) -> String {
    actions
        .iter()
        .map(|a| match a.duration {
            Some(d) => format!(
                "  {:<12} {} ({:.1} ms)\n",
                a.kind,
                a.description,
                d.seconds as f64 * 1e3 + d.nanos as f64 / 1e6
            ),
            None => format!("  {:<12} {}\n", a.kind, a.description),
        })
        .collect()
}

/// What `wukongctl release` prints.
pub fn release_text(r: &PrepareDetachResponse) -> String {
    let disk = r.disk.as_ref().map(|d| format!("{} ({})", d.id, d.dev_node)).unwrap_or_default();
    let head = match (r.dry_run, r.released) {
        (true, _) => format!("dry run: {disk} can be released; a release would:"),
        (false, true) => format!("{disk} is released and may be unplugged:"),
        (false, false) => format!("{disk} was not released:"),
    };
    format!("{head}\n{}", actions_text(&r.actions))
}

pub fn actions_json(actions: &[ReleaseAction]) -> Value {
    Value::Array(
        actions
            .iter()
            .map(|a| json!({"kind": a.kind, "description": a.description, "duration_ms": duration_ms(&a.duration)}))
            .collect(),
    )
}

pub fn release_json(r: &PrepareDetachResponse) -> Value {
    json!({
        "released": r.released,
        "dry_run": r.dry_run,
        "disk": r.disk.as_ref().map(disk_json),
        "actions": actions_json(&r.actions),
        "usage": r.usage.as_ref().map(usage_json),
    })
}

fn timestamp_json(t: &Option<prost_types::Timestamp>) -> Value {
    t.map(|t| json!(t.to_string())).unwrap_or(Value::Null)
}

fn duration_ms(d: &Option<prost_types::Duration>) -> Value {
    d.map(|d| json!(d.seconds as f64 * 1e3 + d.nanos as f64 / 1e6)).unwrap_or(Value::Null)
}

/// A blocker as JSON: kind, device, message and the structured detail.
pub fn blocker_json(b: &Blocker) -> Value {
    let detail = match &b.detail {
        Some(Detail::Mount(m)) => json!({
            "mount_point": m.mount_point, "fs_type": m.fs_type, "root": m.root, "options": m.options,
            "read_only": m.read_only, "mount_namespace": m.mount_namespace, "host_namespace": m.host_namespace,
            "namespace_pid": m.namespace_pid, "namespace_thread": m.namespace_thread,
        }),
        Some(Detail::Swap(s)) => {
            json!({"path": s.path, "is_file": s.is_file, "size_bytes": s.size_bytes, "used_bytes": s.used_bytes})
        }
        Some(Detail::Holder(h)) => {
            let h = h.holder.clone().unwrap_or_default();
            json!({"kernel_name": h.kernel_name, "dev_node": h.dev_node, "name": h.name, "uuid": h.uuid})
        }
        Some(Detail::Loop(l)) => json!({"loop_device": l.loop_device, "backing_file": l.backing_file}),
        Some(Detail::Process(p)) => json!({
            "pid": p.pid, "command": p.command, "cmdline": p.cmdline, "uid": p.uid,
            "use": format!("{:?}", p.r#use()).to_lowercase(), "path": p.path, "fd": p.fd, "writable": p.writable,
            "thread": p.thread,
        }),
        Some(Detail::KernelClaim(k)) => json!({"device": k.device}),
        Some(Detail::System(s)) => json!({"reason": s.reason}),
        None => Value::Null,
    };
    json!({"kind": blocker_kind_name(b.kind()), "device": b.device, "message": b.message, "detail": detail})
}

pub fn usage_json(r: &UsageReport) -> Value {
    json!({
        "serial": r.serial,
        "in_use": r.in_use,
        "blockers": r.blockers.iter().map(blocker_json).collect::<Vec<_>>(),
        "scanned_at": timestamp_json(&r.scanned_at),
        "scan_duration_ms": duration_ms(&r.scan_duration),
    })
}

fn partition_json(p: &Partition) -> Value {
    json!({
        "number": p.number, "kernel_name": p.kernel_name, "dev_node": p.dev_node, "size_bytes": p.size_bytes,
        "fs_type": p.fs_type, "fs_uuid": p.fs_uuid, "fs_label": p.fs_label,
        "holders": p.holders.iter().map(|h| json!(h.kernel_name)).collect::<Vec<_>>(),
    })
}

/// A disk as JSON (with its usage report when it has one).
pub fn disk_json(d: &Disk) -> Value {
    json!({
        "serial": d.serial, "id": d.id, "kernel_name": d.kernel_name, "dev_node": d.dev_node,
        "major": d.major, "minor": d.minor, "bus": bus_name(d.bus()), "by_id_links": d.by_id_links,
        "by_path_links": d.by_path_links, "size_bytes": d.size_bytes, "vendor": d.vendor, "model": d.model,
        "wwn": d.wwn, "device_id": d.device_id, "read_only": d.read_only, "fs_type": d.fs_type,
        "fs_uuid": d.fs_uuid, "fs_label": d.fs_label,
        "state": state_name(d), "system": d.system, "system_reason": d.system_reason,
        "released_at": timestamp_json(&d.released_at),
        "release_method": match d.release_method() {
            ReleaseMethod::ScsiDelete => json!("scsi-delete"),
            ReleaseMethod::ReadOnly => json!("read-only"),
            ReleaseMethod::Unspecified => Value::Null,
        },
        "scsi_address": d.scsi_address.map(|a| format!("{}:{}:{}:{}", a.host, a.channel, a.target, a.lun)),
        "partitions": d.partitions.iter().map(partition_json).collect::<Vec<_>>(),
        "holders": d.holders.iter().map(|h| json!(h.kernel_name)).collect::<Vec<_>>(),
        "usage": d.usage.as_ref().map(usage_json),
    })
}

/// One watch event as a JSON object (a line of `watch -o json`).
pub fn event_json(e: &DiskEvent) -> Value {
    json!({
        "kind": event_name(e.kind()), "sequence": e.sequence, "time": timestamp_json(&e.time),
        "disk": e.disk.as_ref().map(disk_json),
    })
}

/// The agent's facts as JSON.
pub fn info_json(i: &AgentInfo) -> Value {
    json!({
        "version": i.version, "hostname": i.hostname, "kernel_release": i.kernel_release, "os": i.os,
        "arch": i.arch, "boot_id": i.boot_id, "uptime_ms": duration_ms(&i.uptime),
        "started_at": timestamp_json(&i.started_at), "memory_bytes": i.memory_bytes, "disk_count": i.disk_count,
        "capabilities": i.capabilities, "read_only": i.read_only,
        "usage_scanner": (!i.usage_scanner.is_empty()).then(|| json!({
            "name": i.usage_scanner, "reason": i.usage_scanner_reason,
        })),
        "certificate": (i.certificate_not_after != 0).then(|| json!({
            "subject": i.certificate_subject, "not_after": i.certificate_not_after,
        })),
    })
}

/// The agent's facts, one per line.
pub fn info_text(i: &AgentInfo) -> String {
    let releases = match i.read_only {
        true => "refused for this client (read-only)",
        false => "allowed",
    };
    [
        ("version", i.version.clone()),
        ("hostname", i.hostname.clone()),
        ("kernel", i.kernel_release.clone()),
        ("os", i.os.clone()),
        ("arch", i.arch.clone()),
        ("boot id", i.boot_id.clone()),
        ("disks", i.disk_count.to_string()),
        ("releases", releases.to_string()),
        ("capabilities", i.capabilities.join(", ")),
        ("usage scan", usage_scanner_text(i)),
        ("certificate", certificate_text(i)),
    ]
    .iter()
    .map(|(k, v)| format!("{:<13} {v}\n", format!("{k}:")))
    .collect()
}

/// How the agent finds the processes that use a disk, and why, e.g. "bpf (BPF iterators loaded, a walk per file,
/// task and mapping (kernel 6.1.0))".
fn usage_scanner_text(i: &AgentInfo) -> String {
    match i.usage_scanner.as_str() {
        "" => "not reported (an agent older than the BPF scan reads /proc)".into(),
        name => format!("{name} ({})", i.usage_scanner_reason),
    }
}

/// The agent's certificate: its subject and when it expires, in UTC and in days from now.
fn certificate_text(i: &AgentInfo) -> String {
    if i.certificate_not_after == 0 {
        return "none (plaintext or the Unix socket only)".into();
    }
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64);
    let left = i.certificate_not_after - now;
    let when = time::OffsetDateTime::from_unix_timestamp(i.certificate_not_after)
        .map(|t| format!("{} {:02}:{:02}:{:02} UTC", t.date(), t.hour(), t.minute(), t.second()))
        .unwrap_or_else(|_| i.certificate_not_after.to_string());
    match left {
        ..0 => format!("{}, EXPIRED {when}", i.certificate_subject),
        _ => format!("{}, expires {when} (in {} days)", i.certificate_subject, left / 86400),
    }
}

/// One line per watch event.
pub fn event_line(e: &DiskEvent) -> String {
    match &e.disk {
        Some(d) => format!(
            "{:<8} seq={} serial={} device={} by-id={}",
            event_name(e.kind()),
            e.sequence,
            if d.serial.is_empty() { "-" } else { &d.serial },
            d.dev_node,
            d.by_id_links.first().map(String::as_str).unwrap_or("-"),
        ),
        None => format!("{:<8} seq={}", event_name(e.kind()), e.sequence),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(human_size(0), "0 B");
        assert_eq!(human_size(1023), "1023 B");
        assert_eq!(human_size(1 << 30), "1.0 GiB");
        assert_eq!(human_size(1536 << 20), "1.5 GiB");
    }

    #[test]
    fn info_says_how_the_agent_scans_and_why() {
        let bpf = AgentInfo {
            usage_scanner: "bpf".into(),
            usage_scanner_reason: "BPF iterators loaded, a walk per file, task and mapping (kernel 6.1.0)".into(),
            ..AgentInfo::default()
        };
        assert!(
            info_text(&bpf).contains(
                "usage scan:   bpf (BPF iterators loaded, a walk per file, task and mapping (kernel 6.1.0))\n"
            ),
            "{}",
            info_text(&bpf)
        );
        assert_eq!(
            info_json(&bpf)["usage_scanner"],
            json!({"name": "bpf", "reason": "BPF iterators loaded, a walk per file, task and mapping (kernel 6.1.0)"})
        );
        let older = AgentInfo::default();
        assert!(info_text(&older).contains("usage scan:   not reported"), "{}", info_text(&older));
        assert_eq!(info_json(&older)["usage_scanner"], Value::Null);
    }

    #[test]
    fn table_aligns_columns() {
        let t = table(&["A", "BB"], &[vec!["xxx".into(), "y".into()], vec!["z".into(), "w".into()]]);
        assert_eq!(t, "A    BB\nxxx  y\nz    w\n");
    }

    #[test]
    fn usage_text_lists_every_blocker() {
        let report = UsageReport {
            serial: "pg".into(),
            in_use: true,
            blockers: vec![Blocker {
                kind: BlockerKind::Mount as i32,
                device: "/dev/sdb1".into(),
                message: "/dev/sdb1 is mounted at /var/lib/pg (ext4) in the host mount namespace".into(),
                detail: None,
            }],
            ..UsageReport::default()
        };
        let t = usage_text(&report);
        assert!(t.starts_with("pg is in use: 1 blocker(s)"), "{t}");
        assert!(t.contains("mount  /dev/sdb1  /dev/sdb1 is mounted at /var/lib/pg"), "{t}");
        let j = usage_json(&report);
        assert_eq!(j["blockers"][0]["kind"], "mount");
        assert_eq!(j["in_use"], true);
        let idle = usage_text(&UsageReport { serial: "x".into(), ..UsageReport::default() });
        assert!(idle.starts_with("x is not in use"), "{idle}");
    }

    #[test]
    fn release_text_lists_steps_with_durations_when_done() {
        let disk = Disk { id: "pg".into(), dev_node: "/dev/sdb".into(), ..Disk::default() };
        let step = |kind: &str, description: &str, ms: Option<i32>| ReleaseAction {
            kind: kind.into(),
            description: description.into(),
            duration: ms.map(|ms| prost_types::Duration { seconds: 0, nanos: ms * 1_000_000 }),
        };
        let done = PrepareDetachResponse {
            released: true,
            disk: Some(disk.clone()),
            actions: vec![step("flush", "flushed /dev/sdb", Some(3))],
            ..PrepareDetachResponse::default()
        };
        assert_eq!(
            release_text(&done),
            "pg (/dev/sdb) is released and may be unplugged:\n  flush        flushed /dev/sdb (3.0 ms)\n"
        );
        let dry = PrepareDetachResponse {
            dry_run: true,
            disk: Some(disk),
            actions: vec![step("fence", "would set SCSI device /dev/sdb offline and delete it in the guest", None)],
            ..PrepareDetachResponse::default()
        };
        assert_eq!(
            release_text(&dry),
            "dry run: pg (/dev/sdb) can be released; a release would:\n  fence        would set SCSI device /dev/sdb offline and delete it in the guest\n"
        );
        assert_eq!(release_json(&dry)["actions"][0]["duration_ms"], Value::Null);
    }

    #[test]
    fn disk_rows_show_serial_or_dash() {
        let d = Disk { serial: "data-1".into(), dev_node: "/dev/sdb".into(), size_bytes: 1 << 30, ..Disk::default() };
        let none = Disk { dev_node: "/dev/vdc".into(), ..Disk::default() };
        let t = disks_table(&[d, none]);
        assert!(t.lines().nth(1).unwrap().starts_with("data-1  /dev/sdb"), "{t}");
        assert!(t.lines().nth(2).unwrap().starts_with("-       /dev/vdc"), "{t}");
    }

    #[test]
    fn a_filesystem_on_the_whole_disk_is_its_contents() {
        let whole = Disk {
            dev_node: "/dev/sdb".into(),
            fs_type: "ext4".into(),
            fs_label: "pgdata".into(),
            fs_uuid: "0b1c".into(),
            ..Disk::default()
        };
        let unlabelled = Disk { dev_node: "/dev/sdc".into(), fs_type: "xfs".into(), ..Disk::default() };
        let t = disks_table(&[whole, unlabelled]);
        assert!(t.lines().nth(1).unwrap().ends_with("  ext4 label=pgdata uuid=0b1c"), "{t}");
        assert!(t.lines().nth(2).unwrap().ends_with("  xfs"), "{t}");
    }
}
