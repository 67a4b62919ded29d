//! Human-readable rendering of agent data for `wukongctl`.

use wukong_proto::v1::{Bus, Disk, DiskEvent, DiskState, EventKind};

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
            let contents: Vec<String> = d
                .partitions
                .iter()
                .map(|p| {
                    if p.fs_type.is_empty() {
                        p.kernel_name.clone()
                    } else {
                        format!("{}:{}", p.kernel_name, p.fs_type)
                    }
                })
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
    table(&["SERIAL", "DEVICE", "BUS", "SIZE", "STATE", "BY-ID", "CONTENTS"], &rows)
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
    fn table_aligns_columns() {
        let t = table(&["A", "BB"], &[vec!["xxx".into(), "y".into()], vec!["z".into(), "w".into()]]);
        assert_eq!(t, "A    BB\nxxx  y\nz    w\n");
    }

    #[test]
    fn disk_rows_show_serial_or_dash() {
        let d = Disk { serial: "data-1".into(), dev_node: "/dev/sdb".into(), size_bytes: 1 << 30, ..Disk::default() };
        let none = Disk { dev_node: "/dev/vdc".into(), ..Disk::default() };
        let t = disks_table(&[d, none]);
        assert!(t.lines().nth(1).unwrap().starts_with("data-1  /dev/sdb"), "{t}");
        assert!(t.lines().nth(2).unwrap().starts_with("-       /dev/vdc"), "{t}");
    }
}
