//! Checks a `Wukong`'s spec before anything is changed: a bad field is reported with its path, and nothing is
//! created, plugged or unplugged for that object until it is fixed.

use crate::crd::{AccessMode, DiskRef, DiskSource, DiskSpec, Phase, VolumeStatus, WukongSpec, claim_name};
use crate::plan::SYSTEM_DISK_NAME;
use std::collections::BTreeMap;
use wukong_controller_client::companion::{check_serial, check_volume_name};

/// A field of the spec that cannot be used, named by its path.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct SpecError {
    /// The field's path, e.g. `spec.disks[1].size`.
    pub field: String,
    pub message: String,
}

fn bad(field: String, message: impl Into<String>) -> SpecError {
    SpecError { field, message: message.into() }
}

/// Longest name of an object Kubernetes accepts (a DNS subdomain), here for `<vm>-<disk>` claims.
const MAX_OBJECT_NAME: usize = 253;

/// Checks the spec of the object named `name`: the VM name, every disk's name, size, serial, access modes and
/// source, that no two disks share a name or a serial, and that at most one disk is the system disk.
pub fn check(name: &str, spec: &WukongSpec) -> Result<(), SpecError> {
    let vm = spec.vm_name.clone().unwrap_or_else(|| format!("{name}-vm"));
    if let Some(given) = &spec.vm_name
        && let Err(why) = dns_subdomain(given)
    {
        return Err(bad("spec.vmName".into(), format!("'{given}' is not a VirtualMachine name: {why}")));
    }
    if let Some(memory) = &spec.memory {
        quantity_bytes(memory).map_err(|why| bad("spec.memory".into(), format!("'{memory}' {why}")))?;
    }
    let mut names = BTreeMap::new();
    let mut serials = BTreeMap::new();
    let mut moved = BTreeMap::new();
    for (i, disk) in spec.disks.iter().enumerate() {
        let field = |f: &str| format!("spec.disks[{i}].{f}");
        check_volume_name(&disk.name).map_err(|e| bad(field("name"), e.to_string()))?;
        if let Some(first) = names.insert(disk.name.clone(), i) {
            return Err(bad(field("name"), format!("disk '{}' is listed twice (also spec.disks[{first}])", disk.name)));
        }
        let claim = claim_name(&vm, &disk.name);
        if claim.len() > MAX_OBJECT_NAME {
            return Err(bad(field("name"), format!("the claim name '{claim}' would be longer than 253 characters")));
        }
        check_storage(disk, &field)?;
        let serial = disk.serial();
        let serial_field = if disk.serial.is_some() { field("serial") } else { field("name") };
        check_serial(&serial).map_err(|e| match disk.serial {
            Some(_) => bad(serial_field.clone(), e.to_string()),
            None => bad(serial_field.clone(), format!("{e}; or give the disk a serial")),
        })?;
        if let Some(first) = serials.insert(serial.to_ascii_lowercase(), i) {
            return Err(bad(
                serial_field,
                format!("serial '{serial}' is also the serial of spec.disks[{first}]; each disk needs its own"),
            ));
        }
        if let Some(class) = &disk.storage_class_name
            && let Err(why) = dns_subdomain(class)
        {
            return Err(bad(field("storageClassName"), format!("'{class}' is not a StorageClass name: {why}")));
        }
        check_snapshot(disk, &claim, &|f| field(&format!("detachOptions.snapshot{f}")))?;
        if let Some(from) = &disk.move_from {
            check_move(name, disk, from, &|f| field(&format!("moveFrom{f}")))?;
            if let Some(first) = moved.insert(from.clone(), i) {
                return Err(bad(
                    field("moveFrom"),
                    format!("{from} is moved here by spec.disks[{first}] already; a disk moves to one place"),
                ));
            }
        }
    }
    check_system_disks(&spec.disks)
}

/// The snapshot a detach takes: of a data disk's claim, with names Kubernetes accepts.
fn check_snapshot(disk: &DiskSpec, claim: &str, field: &dyn Fn(&str) -> String) -> Result<(), SpecError> {
    let Some(snapshot) = &disk.detach_options.snapshot else { return Ok(()) };
    if disk.system || disk.name == SYSTEM_DISK_NAME {
        return Err(bad(field(""), "the system disk is never detached, so no snapshot is taken before its detach"));
    }
    match &snapshot.name {
        Some(name) => dns_subdomain(name)
            .map_err(|why| bad(field(".name"), format!("'{name}' is not a VolumeSnapshot name: {why}")))?,
        // The claim's name and a Unix time in seconds (10 digits until 2286).
        None if claim.len() + 11 > MAX_OBJECT_NAME => {
            return Err(bad(
                field(".name"),
                format!("the generated name '{claim}-<time>' would be longer than 253 characters; give a name"),
            ));
        }
        None => {}
    }
    if let Some(class) = &snapshot.volume_snapshot_class_name {
        dns_subdomain(class).map_err(|why| {
            bad(field(".volumeSnapshotClassName"), format!("'{class}' is not a VolumeSnapshotClass name: {why}"))
        })?;
    }
    Ok(())
}

/// A move into object `name`: of a data disk, from another object of this namespace.
fn check_move(name: &str, disk: &DiskSpec, from: &DiskRef, field: &dyn Fn(&str) -> String) -> Result<(), SpecError> {
    if disk.system || disk.name == SYSTEM_DISK_NAME {
        return Err(bad(
            field(""),
            "the system disk is part of the VM's own definition and is never plugged; only a data disk can be moved \
             in",
        ));
    }
    if disk.source.is_some() {
        return Err(bad(field(""), "a moved disk brings its claim and its data; remove source or moveFrom"));
    }
    if from.wukong.contains('/') {
        return Err(bad(
            field(".wukong"),
            format!(
                "'{}' names another namespace: a disk moves only between Wukongs of one namespace (a claim cannot \
                 leave its namespace); give the name of a Wukong in this namespace",
                from.wukong
            ),
        ));
    }
    dns_subdomain(&from.wukong)
        .map_err(|why| bad(field(".wukong"), format!("'{}' is not a Wukong name: {why}", from.wukong)))?;
    if from.wukong == name {
        return Err(bad(field(".wukong"), format!("'{name}' is this object: a disk moves from another Wukong")));
    }
    check_volume_name(&from.disk).map_err(|e| bad(field(".disk"), e.to_string()))
}

/// At most one disk is marked `system: true`, and a disk named `system` is not a data disk beside another one.
fn check_system_disks(disks: &[DiskSpec]) -> Result<(), SpecError> {
    let marked: Vec<usize> = disks.iter().enumerate().filter(|(_, d)| d.system).map(|(i, _)| i).collect();
    if let [first, second, ..] = marked[..] {
        return Err(bad(
            format!("spec.disks[{second}].system"),
            format!("spec.disks[{first}] is the system disk already; a VM has one system disk"),
        ));
    }
    if let Some(&marked) = marked.first()
        && let Some(named) = disks.iter().position(|d| d.name == SYSTEM_DISK_NAME && !d.system)
    {
        return Err(bad(
            format!("spec.disks[{named}].name"),
            format!(
                "a disk named '{SYSTEM_DISK_NAME}' is the system disk, but spec.disks[{marked}] is marked system: \
                 true; rename one of them"
            ),
        ));
    }
    Ok(())
}

/// Size, access modes, volume mode and source of one disk. The system disk is the VM's own: the operator creates
/// nothing for it, so none of these may ask it to, and its size is optional.
fn check_storage(disk: &DiskSpec, field: &dyn Fn(&str) -> String) -> Result<(), SpecError> {
    let system = disk.system || disk.name == SYSTEM_DISK_NAME;
    if system {
        let creating = [
            ("source", disk.source.is_some()),
            ("accessModes", disk.access_modes.is_some()),
            ("volumeMode", disk.volume_mode.is_some()),
        ];
        if let Some((name, _)) = creating.iter().find(|(_, set)| *set) {
            return Err(bad(
                field(name),
                "the system disk is part of the VM's own definition and the operator creates nothing for it; \
                 remove this field, or make this a data disk",
            ));
        }
    }
    let clone = disk.source.as_ref().is_some_and(|s| s.pvc.is_some());
    match &disk.size {
        Some(size) => {
            quantity_bytes(size).map_err(|why| bad(field("size"), format!("'{size}' {why}")))?;
        }
        None if !system && !clone && disk.move_from.is_none() => {
            return Err(bad(field("size"), "a data disk needs a size, a Kubernetes quantity such as 10Gi"));
        }
        None => {}
    }
    if let Some(modes) = &disk.access_modes {
        let mut seen = std::collections::BTreeSet::new();
        if let Some(twice) = modes.iter().find(|m| !seen.insert(**m)) {
            return Err(bad(field("accessModes"), format!("{twice:?} is listed twice")));
        }
        if modes.is_empty() {
            return Err(bad(field("accessModes"), "give at least one access mode, or leave the field out"));
        }
        if modes.iter().all(|m| *m == AccessMode::ReadOnlyMany) {
            return Err(bad(
                field("accessModes"),
                "a data disk is written by its guest, and ReadOnlyMany alone cannot be; add ReadWriteOnce or \
                 ReadWriteMany",
            ));
        }
    }
    if let Some(source) = &disk.source {
        check_source(source, &|f| field(&format!("source.{f}")), &field("source"))?;
    }
    Ok(())
}

/// A DataVolume source: exactly one kind, with an address CDI can use.
fn check_source(source: &DiskSource, field: &dyn Fn(&str) -> String, whole: &str) -> Result<(), SpecError> {
    let kinds = [
        ("blank", source.blank.is_some()),
        ("http", source.http.is_some()),
        ("registry", source.registry.is_some()),
        ("pvc", source.pvc.is_some()),
    ];
    let given: Vec<&str> = kinds.iter().filter(|(_, set)| *set).map(|(kind, _)| *kind).collect();
    if given.len() != 1 {
        let found = if given.is_empty() { "none".to_string() } else { given.join(" and ") };
        return Err(bad(
            whole.to_string(),
            format!("give exactly one of blank, http, registry or pvc (CDI's DataVolume sources); found {found}"),
        ));
    }
    if let Some(http) = &source.http {
        check_url(&http.url, &["http://", "https://"]).map_err(|why| bad(field("http.url"), why))?;
    }
    if let Some(registry) = &source.registry {
        check_url(&registry.url, &["docker://", "oci-archive://"]).map_err(|why| bad(field("registry.url"), why))?;
    }
    if let Some(claim) = &source.pvc {
        dns_subdomain(&claim.name)
            .map_err(|why| bad(field("pvc.name"), format!("'{}' is not a claim name: {why}", claim.name)))?;
        if let Some(ns) = &claim.namespace {
            dns_label(ns).map_err(|why| bad(field("pvc.namespace"), format!("'{ns}' is not a namespace: {why}")))?;
        }
    }
    Ok(())
}

/// An address with one of `schemes` and something after it, without spaces.
fn check_url(url: &str, schemes: &[&str]) -> Result<(), String> {
    let rest = schemes.iter().find_map(|scheme| url.strip_prefix(scheme));
    match rest {
        Some(rest) if !rest.is_empty() && !rest.starts_with('/') && !url.chars().any(char::is_whitespace) => Ok(()),
        _ => Err(format!("'{url}' is not an address CDI can use: it must start with {}", schemes.join(" or "))),
    }
}

/// The system disk never changes: an object whose status records one (its first disk, under the old rule, say)
/// cannot mark another.
pub fn check_against_status(spec: &WukongSpec, recorded: &[VolumeStatus]) -> Result<(), SpecError> {
    // A disk that came from elsewhere is this object's now: another `moveFrom` would name a disk it does not have.
    for (i, disk) in spec.disks.iter().enumerate() {
        // In these phases the claim is this object's: handed over.
        let plugged = |v: &&VolumeStatus| {
            matches!(v.phase, Phase::Attaching | Phase::Attached | Phase::Detaching | Phase::DetachBlocked)
        };
        let came = recorded.iter().filter(plugged).find(|v| v.name == disk.name);
        if let (Some(from), Some(came_from)) = (&disk.move_from, came.and_then(|v| v.moved_from.as_ref()))
            && from != came_from
        {
            return Err(bad(
                format!("spec.disks[{i}].moveFrom"),
                format!(
                    "disk '{}' was moved here from {came_from} already; a moved disk does not move again from \
                     elsewhere: put moveFrom back, or remove it",
                    disk.name
                ),
            ));
        }
    }
    let Some(system) = recorded.iter().find(|v| v.system) else { return Ok(()) };
    let other = spec.disks.iter().position(|d| d.system && d.name != system.name);
    match other {
        Some(i) => Err(bad(
            format!("spec.disks[{i}].system"),
            format!(
                "disk '{}' is this VM's system disk (status.volumes) and the system disk never changes; remove \
                 system: true from disk '{}'",
                system.name, spec.disks[i].name
            ),
        )),
        None => Ok(()),
    }
}

/// A DNS subdomain (RFC 1123), the rule for the names of most Kubernetes objects.
fn dns_subdomain(name: &str) -> Result<(), &'static str> {
    if name.is_empty() || name.len() > MAX_OBJECT_NAME {
        return Err("it must have 1 to 253 characters");
    }
    if !name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.') {
        return Err("only lowercase letters, digits, '-' and '.' are allowed");
    }
    let alnum = |c: Option<u8>| c.is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
    if !alnum(name.bytes().next()) || !alnum(name.bytes().last()) {
        return Err("it must start and end with a letter or digit");
    }
    Ok(())
}

/// A DNS label (RFC 1123), the rule for namespaces.
fn dns_label(name: &str) -> Result<(), &'static str> {
    if name.len() > 63 || name.contains('.') {
        return Err("it must have at most 63 characters and no '.'");
    }
    dns_subdomain(name)
}

/// The bytes a Kubernetes quantity stands for (`10Gi`, `500M`, `1e9`, `1.5Gi`); more than zero, whole bytes.
/// Hand-written: the quantity crates parse into floats or carry a Kubernetes version of their own, and a size
/// needs exact integers.
pub fn quantity_bytes(text: &str) -> Result<u64, &'static str> {
    const SUFFIXES: [(&str, u64); 12] = [
        ("Ki", 1 << 10),
        ("Mi", 1 << 20),
        ("Gi", 1 << 30),
        ("Ti", 1 << 40),
        ("Pi", 1 << 50),
        ("Ei", 1 << 60),
        ("k", 1_000),
        ("M", 1_000_000),
        ("G", 1_000_000_000),
        ("T", 1_000_000_000_000),
        ("P", 1_000_000_000_000_000),
        ("E", 1_000_000_000_000_000_000),
    ];
    let not = "is not a size: use a Kubernetes quantity such as 10Gi or 500M";
    let (number, multiplier) = match SUFFIXES.iter().find(|(s, _)| text.ends_with(s)) {
        Some((s, m)) => (&text[..text.len() - s.len()], *m),
        None => match text.split_once(['e', 'E']) {
            Some((n, exp)) => {
                let exp: u32 = exp.parse().map_err(|_| not)?;
                (n, 10u64.checked_pow(exp).ok_or("is too large")?)
            }
            None => (text, 1),
        },
    };
    let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
    if whole.is_empty() && fraction.is_empty() || !(whole.bytes().chain(fraction.bytes()).all(|b| b.is_ascii_digit())) {
        return Err(not);
    }
    let scale = 10u128.checked_pow(fraction.len() as u32).ok_or(not)?;
    let digits: u128 = format!("{whole}{fraction}").parse().map_err(|_| "is too large")?;
    let bytes = digits.checked_mul(u128::from(multiplier)).ok_or("is too large")?;
    if bytes % scale != 0 {
        return Err("is not a whole number of bytes");
    }
    let bytes = u64::try_from(bytes / scale).map_err(|_| "is too large")?;
    if bytes == 0 {
        return Err("must be more than zero");
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::{BlankSource, ClaimSource, DetachOptions, RemoteSource, SnapshotOptions, VolumeMode};
    use proptest::prelude::*;

    fn disk(name: &str, size: &str) -> DiskSpec {
        DiskSpec { name: name.into(), size: Some(size.into()), ..Default::default() }
    }

    fn sourced(name: &str, source: DiskSource) -> DiskSpec {
        DiskSpec { source: Some(Box::new(source)), ..disk(name, "1Gi") }
    }

    fn http(url: &str) -> DiskSource {
        DiskSource { http: Some(RemoteSource { url: url.into(), ..Default::default() }), ..Default::default() }
    }

    fn snapshotted(disk: DiskSpec, name: Option<&str>, class: Option<&str>) -> DiskSpec {
        let snapshot =
            SnapshotOptions { name: name.map(Into::into), volume_snapshot_class_name: class.map(Into::into) };
        DiskSpec { detach_options: DetachOptions { snapshot: Some(snapshot), ..Default::default() }, ..disk }
    }

    fn moved(disk: DiskSpec, wukong: &str, from: &str) -> DiskSpec {
        DiskSpec { move_from: Some(DiskRef { wukong: wukong.into(), disk: from.into() }), ..disk }
    }

    fn spec(disks: Vec<DiskSpec>) -> WukongSpec {
        WukongSpec { disks, ..Default::default() }
    }

    #[test]
    fn quantities_are_exact_bytes() {
        for (text, bytes) in
            [("10Gi", 10u64 << 30), ("500M", 500_000_000), ("1e9", 1_000_000_000), ("1.5Gi", 3 << 29), ("4096", 4096)]
        {
            assert_eq!(quantity_bytes(text), Ok(bytes), "{text}");
        }
        for text in ["", "Gi", "-1Gi", "0", "1.5", "ten", "1Zi", "99999999999Ei", "1e99", "1..5Gi", " 1Gi"] {
            assert!(quantity_bytes(text).is_err(), "{text:?} was accepted");
        }
    }

    #[test]
    fn every_bad_field_is_named() {
        let cases = [
            (spec(vec![disk("Data", "1Gi")]), "spec.disks[0].name"),
            (spec(vec![disk("data", "lots")]), "spec.disks[0].size"),
            (spec(vec![disk("data", "1Gi"), disk("data", "2Gi")]), "spec.disks[1].name"),
            (spec(vec![disk("a-very-long-disk-name-x", "1Gi")]), "spec.disks[0].name"),
            (
                spec(vec![disk("a", "1Gi"), DiskSpec { serial: Some("A".into()), ..disk("b", "1Gi") }]),
                "spec.disks[1].serial",
            ),
            (spec(vec![DiskSpec { serial: Some("bad serial".into()), ..disk("a", "1Gi") }]), "spec.disks[0].serial"),
            (
                spec(vec![DiskSpec { storage_class_name: Some("Fast_SSD".into()), ..disk("a", "1Gi") }]),
                "spec.disks[0].storageClassName",
            ),
            (WukongSpec { vm_name: Some("My VM".into()), ..Default::default() }, "spec.vmName"),
            (
                spec(vec![snapshotted(disk("a", "1Gi"), Some("Before_Detach"), None)]),
                "spec.disks[0].detachOptions.snapshot.name",
            ),
            (
                spec(vec![snapshotted(disk("a", "1Gi"), None, Some("csi hostpath"))]),
                "spec.disks[0].detachOptions.snapshot.volumeSnapshotClassName",
            ),
            (
                spec(vec![snapshotted(DiskSpec { system: true, ..disk("root", "1Gi") }, None, None)]),
                "spec.disks[0].detachOptions.snapshot",
            ),
            (
                spec(vec![moved(DiskSpec { system: true, ..disk("root", "1Gi") }, "a", "data")]),
                "spec.disks[0].moveFrom",
            ),
            (spec(vec![moved(disk("data", "1Gi"), "other-ns/a", "data")]), "spec.disks[0].moveFrom.wukong"),
            (spec(vec![moved(disk("data", "1Gi"), "db", "data")]), "spec.disks[0].moveFrom.wukong"),
            (spec(vec![moved(disk("data", "1Gi"), "a", "Data")]), "spec.disks[0].moveFrom.disk"),
            (spec(vec![moved(sourced("data", http("https://x/y.img")), "a", "data")]), "spec.disks[0].moveFrom"),
            (
                spec(vec![moved(disk("one", "1Gi"), "a", "data"), moved(disk("two", "1Gi"), "a", "data")]),
                "spec.disks[1].moveFrom",
            ),
            (
                WukongSpec {
                    vm_name: Some("v".repeat(245)),
                    disks: vec![snapshotted(disk("a", "1Gi"), None, None)],
                    ..Default::default()
                },
                "spec.disks[0].detachOptions.snapshot.name",
            ),
            (spec(vec![DiskSpec { size: None, ..disk("data", "") }]), "spec.disks[0].size"),
            (
                spec(vec![
                    DiskSpec { system: true, ..disk("root", "1Gi") },
                    DiskSpec { system: true, ..disk("b", "1Gi") },
                ]),
                "spec.disks[1].system",
            ),
            (spec(vec![DiskSpec { system: true, ..disk("root", "1Gi") }, disk("system", "1Gi")]), "spec.disks[1].name"),
            (
                spec(vec![DiskSpec { system: true, volume_mode: Some(VolumeMode::Block), ..disk("root", "1Gi") }]),
                "spec.disks[0].volumeMode",
            ),
            (spec(vec![sourced("system", http("https://images.example/a.img"))]), "spec.disks[0].source"),
            (
                spec(vec![DiskSpec { access_modes: Some(vec![AccessMode::ReadOnlyMany]), ..disk("a", "1Gi") }]),
                "spec.disks[0].accessModes",
            ),
            (
                spec(vec![DiskSpec {
                    access_modes: Some(vec![AccessMode::ReadWriteMany, AccessMode::ReadWriteMany]),
                    ..disk("a", "1Gi")
                }]),
                "spec.disks[0].accessModes",
            ),
            (spec(vec![sourced("a", DiskSource::default())]), "spec.disks[0].source"),
            (
                spec(vec![sourced(
                    "a",
                    DiskSource { blank: Some(BlankSource {}), http: http("http://x/y").http, ..Default::default() },
                )]),
                "spec.disks[0].source",
            ),
            (spec(vec![sourced("a", http("ftp://images/a.img"))]), "spec.disks[0].source.http.url"),
            (spec(vec![sourced("a", http("https://"))]), "spec.disks[0].source.http.url"),
            (
                spec(vec![sourced(
                    "a",
                    DiskSource {
                        registry: Some(RemoteSource { url: "quay.io/x".into(), ..Default::default() }),
                        ..Default::default()
                    },
                )]),
                "spec.disks[0].source.registry.url",
            ),
            (
                spec(vec![sourced(
                    "a",
                    DiskSource {
                        pvc: Some(ClaimSource { name: "Gold".into(), namespace: None }),
                        ..Default::default()
                    },
                )]),
                "spec.disks[0].source.pvc.name",
            ),
            (
                spec(vec![sourced(
                    "a",
                    DiskSource {
                        pvc: Some(ClaimSource { name: "gold".into(), namespace: Some("a.b".into()) }),
                        ..Default::default()
                    },
                )]),
                "spec.disks[0].source.pvc.namespace",
            ),
            (WukongSpec { memory: Some("4 GB".into()), ..Default::default() }, "spec.memory"),
        ];
        for (spec, field) in cases {
            let error = check("db", &spec).unwrap_err();
            assert_eq!(error.field, field, "{error}");
            assert!(error.to_string().starts_with(field), "{error}");
        }
        let good = spec(vec![disk("system", "20Gi"), DiskSpec { serial: Some("pg-1".into()), ..disk("data", "1Gi") }]);
        assert_eq!(check("db", &good), Ok(()));
        // The system disk needs no size; a clone defaults to its source's; the other sources are checked.
        let clone =
            DiskSource { pvc: Some(ClaimSource { name: "golden".into(), namespace: None }), ..Default::default() };
        let registry = DiskSource {
            registry: Some(RemoteSource {
                url: "docker://quay.io/containerdisks/fedora:41".into(),
                ..Default::default()
            }),
            ..Default::default()
        };
        let good = spec(vec![
            DiskSpec { system: true, size: None, ..disk("root", "") },
            DiskSpec { size: None, ..sourced("copy", clone) },
            sourced("image", http("https://images.example/fedora.qcow2")),
            sourced("registry", registry),
            sourced("blank", DiskSource { blank: Some(BlankSource {}), ..Default::default() }),
            DiskSpec {
                access_modes: Some(vec![AccessMode::ReadWriteMany]),
                volume_mode: Some(VolumeMode::Block),
                ..disk("shared", "1Gi")
            },
        ]);
        assert_eq!(check("db", &good), Ok(()));
    }

    #[test]
    fn a_moved_disk_does_not_move_again_from_elsewhere() {
        let came = VolumeStatus {
            name: "data".into(),
            phase: Phase::Attached,
            moved_from: Some(DiskRef { wukong: "a".into(), disk: "data".into() }),
            ..Default::default()
        };
        let asked = |wukong: &str| spec(vec![moved(disk("data", "1Gi"), wukong, "data")]);
        assert_eq!(check_against_status(&asked("a"), std::slice::from_ref(&came)), Ok(()));
        assert_eq!(check_against_status(&spec(vec![disk("data", "1Gi")]), std::slice::from_ref(&came)), Ok(()));
        let error = check_against_status(&asked("b"), std::slice::from_ref(&came)).unwrap_err();
        assert_eq!(error.field, "spec.disks[0].moveFrom");
        assert!(error.message.starts_with("disk 'data' was moved here from disk 'data' of Wukong a already"));
        // Still waiting for its claim: it may be asked from elsewhere instead.
        let waiting = VolumeStatus { phase: Phase::Pending, ..came };
        assert_eq!(check_against_status(&asked("b"), &[waiting]), Ok(()));
    }

    #[test]
    fn the_recorded_system_disk_stays_the_system_disk() {
        let recorded = [VolumeStatus { name: "root".into(), system: true, ..Default::default() }];
        let moved = spec(vec![disk("root", "1Gi"), DiskSpec { system: true, ..disk("data", "1Gi") }]);
        let error = check_against_status(&moved, &recorded).unwrap_err();
        assert_eq!(error.field, "spec.disks[1].system", "{error}");
        let kept = spec(vec![DiskSpec { system: true, ..disk("root", "1Gi") }, disk("data", "1Gi")]);
        assert_eq!(check_against_status(&kept, &recorded), Ok(()));
        assert_eq!(check_against_status(&moved, &[]), Ok(()));
    }

    proptest! {
        #[test]
        fn any_text_is_a_size_or_a_clear_refusal(text in "\\PC{0,24}") {
            match quantity_bytes(&text) {
                Ok(bytes) => prop_assert!(bytes > 0),
                Err(why) => prop_assert!(!why.is_empty()),
            }
        }

        #[test]
        fn any_address_is_usable_or_refused_naming_the_field(url in "\\PC{0,40}", registry in any::<bool>()) {
            let remote = Some(RemoteSource { url: url.clone(), ..Default::default() });
            let source = match registry {
                true => DiskSource { registry: remote, ..Default::default() },
                false => DiskSource { http: remote, ..Default::default() },
            };
            let schemes: &[&str] = if registry { &["docker://", "oci-archive://"] } else { &["http://", "https://"] };
            match check("db", &spec(vec![sourced("a", source)])) {
                Ok(()) => prop_assert!(schemes.iter().any(|s| url.starts_with(s)) && !url.contains(char::is_whitespace)),
                Err(e) => prop_assert!(e.field.starts_with("spec.disks[0].source.") && e.message.contains(&url)),
            }
        }

        #[test]
        fn binary_sizes_round_trip(n in 1u64..1_000_000, suffix in 0usize..4) {
            let (s, m) = [("Ki", 1u64 << 10), ("Mi", 1 << 20), ("Gi", 1 << 30), ("Ti", 1 << 40)][suffix];
            prop_assert_eq!(quantity_bytes(&format!("{n}{s}")), Ok(n * m));
        }

        #[test]
        fn any_disk_list_is_checked_without_panicking(
            names in proptest::collection::vec("[a-zA-Z0-9 ._-]{0,30}", 0..6),
            sizes in proptest::collection::vec("[0-9a-zA-Z.]{0,8}", 6),
        ) {
            let disks = names.iter().zip(&sizes).map(|(n, s)| disk(n, s)).collect();
            let _ = check("db", &spec(disks));
        }
    }
}
