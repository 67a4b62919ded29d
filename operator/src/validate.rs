//! Checks a `Wukong`'s spec before anything is changed: a bad field is reported with its path, and nothing is
//! created, plugged or unplugged for that object until it is fixed.

use crate::crd::{WukongSpec, claim_name};
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

/// Checks the spec of the object named `name`: the VM name, every disk's name, size and serial, and that no two
/// disks share a name or a serial.
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
        quantity_bytes(&disk.size).map_err(|why| bad(field("size"), format!("'{}' {why}", disk.size)))?;
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
    }
    Ok(())
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
    use crate::crd::DiskSpec;
    use proptest::prelude::*;

    fn disk(name: &str, size: &str) -> DiskSpec {
        DiskSpec { name: name.into(), size: size.into(), ..Default::default() }
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
            (WukongSpec { memory: Some("4 GB".into()), ..Default::default() }, "spec.memory"),
        ];
        for (spec, field) in cases {
            let error = check("db", &spec).unwrap_err();
            assert_eq!(error.field, field, "{error}");
            assert!(error.to_string().starts_with(field), "{error}");
        }
        let good = spec(vec![disk("system", "20Gi"), DiskSpec { serial: Some("pg-1".into()), ..disk("data", "1Gi") }]);
        assert_eq!(check("db", &good), Ok(()));
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
