//! Parsers for the `/proc` files the usage scanner reads: `mountinfo` (and the layers in an overlay's super
//! options), `swaps`, `maps` and `fdinfo`.
//!
//! They take text and never panic: a malformed or truncated line (a process exiting mid-read, a hostile fixture)
//! is skipped, not trusted.

/// One line of `/proc/<pid>/mountinfo`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountEntry {
    pub mount_id: u32,
    /// Mount id of the mount this one sits on.
    pub parent_id: u32,
    pub major: u32,
    pub minor: u32,
    /// Root of the mount within its filesystem (not "/" for bind mounts of a subdirectory).
    pub root: String,
    /// Mount point, relative to the process's root, octal escapes decoded.
    pub mount_point: String,
    pub options: String,
    pub fs_type: String,
    /// Mount source, e.g. "/dev/sdb1".
    pub source: String,
    /// Per-superblock options, e.g. "rw,errors=remount-ro".
    pub super_options: String,
}

impl MountEntry {
    pub fn read_only(&self) -> bool {
        self.options.split(',').any(|o| o == "ro")
    }
}

/// Decodes the octal escapes (`\040` space, `\011` tab, `\012` newline, `\134` backslash) the kernel writes in
/// paths. Invalid escapes are kept literally.
pub fn unescape_octal(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' && i + 3 < bytes.len() {
            let digits = &bytes[i + 1..i + 4];
            if digits.iter().all(|d| (b'0'..=b'7').contains(d)) {
                let value = (digits[0] - b'0') as u32 * 64 + (digits[1] - b'0') as u32 * 8 + (digits[2] - b'0') as u32;
                if let Ok(b) = u8::try_from(value) {
                    out.push(b);
                    i += 4;
                    continue;
                }
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Parses `mountinfo`: `ID PARENT MAJ:MIN ROOT MOUNTPOINT OPTIONS [OPTIONAL...] - FSTYPE SOURCE SUPEROPTIONS`.
pub fn parse_mountinfo(text: &str) -> Vec<MountEntry> {
    text.lines().filter_map(parse_mountinfo_line).collect()
}

fn parse_mountinfo_line(line: &str) -> Option<MountEntry> {
    let mut fields = line.split(' ');
    let mount_id = fields.next()?.parse().ok()?;
    let parent_id = fields.next()?.parse().ok()?;
    let (major, minor) = fields.next()?.split_once(':')?;
    let root = unescape_octal(fields.next()?);
    let mount_point = unescape_octal(fields.next()?);
    let options = fields.next()?.to_string();
    // Optional fields end at the lone "-" separator.
    fields.by_ref().find(|f| *f == "-")?;
    let fs_type = fields.next()?.to_string();
    let source = unescape_octal(fields.next()?);
    // The super options are the last field; a line cut short before them is truncated.
    let super_options = fields.next()?.to_string();
    Some(MountEntry {
        mount_id,
        parent_id,
        major: major.parse().ok()?,
        minor: minor.parse().ok()?,
        root,
        mount_point,
        options,
        fs_type,
        source,
        super_options,
    })
}

/// A layer directory of an overlayfs, as its mount options name it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OverlayLayer {
    /// "lowerdir", "upperdir", "workdir" or "datadir" (a data-only lower layer).
    pub option: &'static str,
    /// The directory as given to mount, escapes decoded; relative when the mounter gave a relative path.
    pub path: String,
}

/// The layers of an overlayfs, from the super options mountinfo shows for it
/// (`rw,lowerdir=/l1:/l2::/data,upperdir=/u,workdir=/w,...`).
///
/// Two levels of escaping: the kernel octal-escapes the option values (`\054` comma, `\040` space, `\134`
/// backslash); under that is the string the mounter gave, where a backslash escapes the next character (`\:` a
/// colon inside a path) and, in `lowerdir`, `:` separates layers and `::` starts the data-only ones. The per-layer
/// options of Linux 6.7's mount API (`lowerdir+`, `datadir+`) name one layer each.
pub fn overlay_layers(super_options: &str) -> Vec<OverlayLayer> {
    let mut layers = Vec::new();
    for option in super_options.split(',') {
        let Some((key, raw)) = option.split_once('=') else { continue };
        let value = unescape_octal(raw);
        let option = match key {
            "lowerdir" => {
                layers.extend(split_lowerdir(&value));
                continue;
            }
            "lowerdir+" => "lowerdir",
            "datadir+" => "datadir",
            "upperdir" => "upperdir",
            "workdir" => "workdir",
            _ => continue,
        };
        let path = unescape_backslash(&value);
        if !path.is_empty() {
            layers.push(OverlayLayer { option, path });
        }
    }
    layers
}

/// Splits a `lowerdir` value the way overlayfs does: `\x` is a literal `x`, `:` ends a layer, and the layers after
/// an empty one (`::`) are data-only.
fn split_lowerdir(value: &str) -> Vec<OverlayLayer> {
    let mut layers = Vec::new();
    let mut option = "lowerdir";
    let mut current = String::new();
    let mut chars = value.chars();
    let mut end = |current: &mut String, option: &mut &'static str| {
        if current.is_empty() {
            *option = "datadir";
        } else {
            layers.push(OverlayLayer { option, path: std::mem::take(current) });
        }
    };
    while let Some(c) = chars.next() {
        match c {
            '\\' => current.extend(chars.next()),
            ':' => end(&mut current, &mut option),
            c => current.push(c),
        }
    }
    end(&mut current, &mut option);
    layers
}

/// Removes the mounter's backslash escapes (`\x` is `x`).
fn unescape_backslash(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    let mut chars = value.chars();
    while let Some(c) = chars.next() {
        if c == '\\' {
            out.extend(chars.next());
        } else {
            out.push(c);
        }
    }
    out
}

/// One line of `/proc/swaps`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SwapEntry {
    pub path: String,
    /// "partition" or "file".
    pub kind: String,
    pub size_kib: u64,
    pub used_kib: u64,
}

/// Parses `/proc/swaps` (header line first; paths use octal escapes).
pub fn parse_swaps(text: &str) -> Vec<SwapEntry> {
    text.lines()
        .skip(1)
        .filter_map(|line| {
            // Only space and tab separate fields: the kernel escapes those in paths, but not other whitespace.
            let mut f = line.split([' ', '\t']).filter(|f| !f.is_empty());
            let entry = SwapEntry {
                path: unescape_octal(f.next()?),
                kind: f.next()?.to_string(),
                size_kib: f.next()?.parse().ok()?,
                used_kib: f.next()?.parse().ok()?,
            };
            f.next()?; // priority: a line without it is truncated
            Some(entry)
        })
        .collect()
}

/// A file mapping from `/proc/<pid>/maps`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MapEntry {
    pub major: u32,
    pub minor: u32,
    pub inode: u64,
    /// Writable shared mapping: writes reach the file.
    pub shared_writable: bool,
    pub path: String,
}

/// Parses `maps`, keeping file-backed mappings only (inode ≠ 0). The device field is hexadecimal `MAJ:MIN`.
pub fn parse_maps(text: &str) -> Vec<MapEntry> {
    text.lines()
        .filter_map(|line| {
            let mut f = line.splitn(6, ' ');
            let _range = f.next()?;
            let perms = f.next()?;
            let _offset = f.next()?;
            let (major, minor) = f.next()?.split_once(':')?;
            let inode: u64 = f.next()?.parse().ok()?;
            if inode == 0 {
                return None;
            }
            let path = f.next().unwrap_or("").trim_start().to_string();
            Some(MapEntry {
                major: u32::from_str_radix(major, 16).ok()?,
                minor: u32::from_str_radix(minor, 16).ok()?,
                inode,
                shared_writable: perms.len() >= 4 && perms.as_bytes()[1] == b'w' && perms.as_bytes()[3] == b's',
                path,
            })
        })
        .collect()
}

/// True when the `flags:` line of `/proc/<pid>/fdinfo/<fd>` (octal) says the fd was opened for writing.
pub fn fdinfo_writable(text: &str) -> bool {
    text.lines()
        .find_map(|l| l.strip_prefix("flags:"))
        .and_then(|v| u32::from_str_radix(v.trim(), 8).ok())
        .is_some_and(|flags| flags & 0o3 != 0)
}

/// The `mnt_id:` line of `/proc/<pid>/fdinfo/<fd>`: the mount the file was opened through.
pub fn fdinfo_mount_id(text: &str) -> Option<u32> {
    text.lines().find_map(|l| l.strip_prefix("mnt_id:")).and_then(|v| v.trim().parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_decodes_escapes_and_optional_fields() {
        let text = "\
22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw
36 22 8:17 /sub /mnt/with\\040space\\011tab\\012nl\\134bs rw,nosuid shared:5 master:2 - xfs /dev/sdb1 rw,attr2
37 22 0:45 / /data ro - btrfs /dev/sdc rw,space_cache=v2
";
        let m = parse_mountinfo(text);
        assert_eq!(m.len(), 3);
        assert_eq!((m[0].major, m[0].minor, m[0].mount_point.as_str()), (8, 1, "/"));
        assert_eq!(m[1].mount_point, "/mnt/with space\ttab\nnl\\bs");
        assert_eq!((m[1].root.as_str(), m[1].fs_type.as_str(), m[1].source.as_str()), ("/sub", "xfs", "/dev/sdb1"));
        assert!(!m[1].read_only());
        assert!(m[2].read_only());
        assert_eq!((m[2].major, m[2].minor), (0, 45));
    }

    #[test]
    fn mountinfo_skips_truncated_and_hostile_lines() {
        let text = "\
22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw
23 1 8:2 / /cut rw - ext4
garbage
24 1 x:y / /bad rw - ext4 /dev/x rw
25 1 8:3 / /nosep rw ext4 /dev/x rw

26 1 8:4
27 1 8:5 / /ok rw - ext4 /dev/sda5 rw";
        let m = parse_mountinfo(text);
        assert_eq!(m.iter().map(|e| e.mount_point.as_str()).collect::<Vec<_>>(), vec!["/", "/ok"]);
    }

    #[test]
    fn unescape_handles_edge_cases() {
        assert_eq!(unescape_octal("a\\040b"), "a b");
        assert_eq!(unescape_octal("\\"), "\\");
        assert_eq!(unescape_octal("end\\04"), "end\\04");
        assert_eq!(unescape_octal("\\999"), "\\999");
        assert_eq!(unescape_octal("\\777"), "\\777", "out of byte range stays literal");
        assert_eq!(unescape_octal("plain"), "plain");
    }

    #[test]
    fn swaps_with_file_and_partition() {
        let text = "\
Filename\t\t\t\tType\t\tSize\t\tUsed\t\tPriority
/dev/sdb2                               partition\t1048572\t\t0\t\t-2
/mnt/data/my\\040swap                   file\t\t65532\t\t12\t\t-3
/truncated file 100
";
        let s = parse_swaps(text);
        assert_eq!(s.len(), 2);
        assert_eq!((s[0].path.as_str(), s[0].kind.as_str(), s[0].size_kib), ("/dev/sdb2", "partition", 1048572));
        assert_eq!((s[1].path.as_str(), s[1].kind.as_str(), s[1].used_kib), ("/mnt/data/my swap", "file", 12));
        assert!(parse_swaps("").is_empty());
        // A vertical tab is not escaped by the kernel and is part of the path, not a separator (found by proptest).
        let vt = parse_swaps("Filename Type Size Used Priority\n/swap\u{b}file file 8 0 -2\n");
        assert_eq!(vt[0].path, "/swap\u{b}file");
    }

    #[test]
    fn maps_keep_file_mappings_with_hex_devices() {
        let text = "\
55d0c0a00000-55d0c0a02000 r--p 00000000 fd:01 1234 /usr/bin/cat
7f0000000000-7f0000001000 rw-s 00000000 08:11 42 /mnt/data/file with spaces (deleted)
7f0000002000-7f0000003000 rw-p 00000000 00:00 0 [heap]
7ffd00000000-7ffd00001000 rw-p 00000000 00:00 0
broken line
7f0000004000-7f0000005000 r--p 00000000 zz:01 5 /x
";
        let m = parse_maps(text);
        assert_eq!(m.len(), 2);
        assert_eq!((m[0].major, m[0].minor, m[0].inode, m[0].shared_writable), (0xfd, 1, 1234, false));
        assert_eq!(m[1].path, "/mnt/data/file with spaces (deleted)");
        assert_eq!((m[1].major, m[1].minor, m[1].shared_writable), (8, 0x11, true));
    }

    /// What this machine's kernel (6.18) showed for overlays mounted with a space, an escaped colon, comma and
    /// backslash in lower directories, and with a data-only layer.
    #[test]
    fn overlay_layers_decode_both_escape_levels() {
        let shown = "rw,lowerdir=/d/low\\0401:/x/a\\134:b:/x/c\\134\\054d:/x/e\\134\\134f,upperdir=/d/up\\040per,\
                     workdir=/d/work,uuid=on";
        let layers = overlay_layers(shown);
        let got: Vec<(&str, &str)> = layers.iter().map(|l| (l.option, l.path.as_str())).collect();
        assert_eq!(
            got,
            vec![
                ("lowerdir", "/d/low 1"),
                ("lowerdir", "/x/a:b"),
                ("lowerdir", "/x/c,d"),
                ("lowerdir", "/x/e\\f"),
                ("upperdir", "/d/up per"),
                ("workdir", "/d/work"),
            ]
        );
        let data = overlay_layers("ro,lowerdir=/x/u::/x/c\\134\\054d,redirect_dir=on");
        let got: Vec<(&str, &str)> = data.iter().map(|l| (l.option, l.path.as_str())).collect();
        assert_eq!(got, vec![("lowerdir", "/x/u"), ("datadir", "/x/c,d")]);
        let plus = overlay_layers("rw,lowerdir+=/a,lowerdir+=/b,datadir+=/c,upperdir=/u,workdir=/w");
        assert_eq!(
            plus.iter().map(|l| l.option).collect::<Vec<_>>(),
            ["lowerdir", "lowerdir", "datadir", "upperdir", "workdir"]
        );
    }

    #[test]
    fn overlay_layers_ignore_hostile_options() {
        assert!(overlay_layers("").is_empty());
        assert!(overlay_layers("rw,errors=remount-ro,lowerdir").is_empty());
        let odd = overlay_layers("lowerdir=::\\,upperdir=\\,workdir=,lowerdir=a\\");
        let got: Vec<(&str, &str)> = odd.iter().map(|l| (l.option, l.path.as_str())).collect();
        // A dangling backslash escapes nothing; empty layers are no layers.
        assert_eq!(got, vec![("lowerdir", "a")]);
    }

    #[test]
    fn fdinfo_flags() {
        assert!(!fdinfo_writable("pos:\t0\nflags:\t0100000\nmnt_id:\t30\n"));
        assert!(fdinfo_writable("pos:\t0\nflags:\t02100001\n"));
        assert!(fdinfo_writable("flags:\t02\n"));
        assert!(!fdinfo_writable("flags:\tzz\n"));
        assert!(!fdinfo_writable(""));
        assert_eq!(fdinfo_mount_id("pos:\t0\nflags:\t0100000\nmnt_id:\t46\nino:\t13\n"), Some(46));
        assert_eq!(fdinfo_mount_id("mnt_id:\t-1\n"), None);
        assert_eq!(fdinfo_mount_id("mnt_id:\n"), None);
        assert_eq!(fdinfo_mount_id("flags:\t02\n"), None);
    }
}

#[cfg(test)]
mod properties {
    use super::*;
    use proptest::prelude::*;

    /// Escapes a path the way the kernel does in mountinfo and swaps (`\ooo` for space, tab, newline, backslash).
    fn kernel_escape(path: &str) -> String {
        let mut out = String::new();
        for c in path.chars() {
            match c {
                ' ' | '\t' | '\n' | '\\' => out.push_str(&format!("\\{:03o}", c as u32)),
                c => out.push(c),
            }
        }
        out
    }

    proptest! {
        #[test]
        fn parsers_never_panic_on_arbitrary_text(text in "\\PC*(\n\\PC*){0,8}") {
            let _ = parse_mountinfo(&text);
            let _ = parse_swaps(&text);
            let _ = parse_maps(&text);
            let _ = fdinfo_writable(&text);
            let _ = fdinfo_mount_id(&text);
            let _ = unescape_octal(&text);
            let _ = overlay_layers(&text);
        }

        #[test]
        fn parsers_never_panic_on_arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let text = String::from_utf8_lossy(&bytes);
            let _ = parse_mountinfo(&text);
            let _ = parse_swaps(&text);
            let _ = parse_maps(&text);
            let _ = overlay_layers(&text);
        }

        /// Any layer paths, escaped by a mounter and then by the kernel, come back as they were, in order.
        #[test]
        fn overlay_layers_round_trip(
            lower in proptest::collection::vec("/[^\u{0}]{1,24}", 1..5),
            data in proptest::collection::vec("/[^\u{0}]{1,24}", 0..3),
            upper in "/[^\u{0}]{1,24}",
        ) {
            // The mounter escapes backslash, colon and comma; the kernel then escapes what mountinfo cannot carry.
            let mount_escape = |p: &String| p.replace('\\', "\\\\").replace(':', "\\:").replace(',', "\\,");
            let kernel = |s: String| {
                let mut out = String::new();
                for c in s.chars() {
                    match c {
                        ' ' | '\t' | '\n' | '\\' | ',' | '=' => out.push_str(&format!("\\{:03o}", c as u32)),
                        c => out.push(c),
                    }
                }
                out
            };
            let mut lowerdir = lower.iter().map(mount_escape).collect::<Vec<_>>().join(":");
            if !data.is_empty() {
                lowerdir.push_str("::");
                lowerdir.push_str(&data.iter().map(mount_escape).collect::<Vec<_>>().join(":"));
            }
            let shown = format!(
                "rw,lowerdir={},upperdir={},workdir={},uuid=on",
                kernel(lowerdir), kernel(mount_escape(&upper)), kernel(mount_escape(&upper))
            );
            let got = overlay_layers(&shown);
            let want: Vec<(&str, &str)> = lower.iter().map(|p| ("lowerdir", p.as_str()))
                .chain(data.iter().map(|p| ("datadir", p.as_str())))
                .chain([("upperdir", upper.as_str()), ("workdir", upper.as_str())])
                .collect();
            prop_assert_eq!(got.iter().map(|l| (l.option, l.path.as_str())).collect::<Vec<_>>(), want);
        }

        #[test]
        fn mount_points_round_trip_through_kernel_escaping(path in "/[^\u{0}]{0,64}", major in 0u32..4096, minor in 0u32..1_000_000) {
            let line = format!(
                "36 22 {major}:{minor} / {} rw,relatime shared:5 - ext4 /dev/sdb1 rw", kernel_escape(&path)
            );
            let parsed = parse_mountinfo(&line);
            prop_assert_eq!(parsed.len(), 1);
            prop_assert_eq!(&parsed[0].mount_point, &path);
            prop_assert_eq!((parsed[0].major, parsed[0].minor), (major, minor));
        }

        #[test]
        fn swap_paths_round_trip(path in "/[^\u{0}]{0,64}", size in any::<u32>(), used in any::<u32>()) {
            let text = format!("Filename Type Size Used Priority\n{} file {size} {used} -2\n", kernel_escape(&path));
            let parsed = parse_swaps(&text);
            prop_assert_eq!(parsed.len(), 1);
            prop_assert_eq!(&parsed[0].path, &path);
            prop_assert_eq!((parsed[0].size_kib, parsed[0].used_kib), (u64::from(size), u64::from(used)));
        }

        #[test]
        fn map_paths_with_spaces_round_trip(path in "/[^\n\u{0}]{0,64}", major in 0u32..4096, minor in 0u32..256, inode in 1u64..) {
            let line = format!("7f00-7f01 rw-s 00000000 {major:02x}:{minor:02x} {inode} {path}");
            let parsed = parse_maps(&line);
            prop_assert_eq!(parsed.len(), 1);
            prop_assert_eq!(&parsed[0].path, path.trim_start());
            prop_assert_eq!((parsed[0].major, parsed[0].minor, parsed[0].inode), (major, minor, inode));
            prop_assert!(parsed[0].shared_writable);
        }
    }
}
