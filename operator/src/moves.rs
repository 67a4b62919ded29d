//! Moving a disk between two `Wukong`s of one namespace (`spec.disks[].moveFrom`). The move is declared on the
//! destination only, so that no order of edits can lose the disk: the source's pass finds the object that asks for
//! its disk ([`movers`]), detaches it safely with its claim kept whatever its options say, and hands the claim over
//! ([`hand_over`]: owner reference and labels); the destination's pass waits for the claim to be its own and then
//! plugs it. The claim's owner is the one fact both read, so an operator stopped between any two steps resumes from
//! what it finds, and a disk is plugged into the destination only once the source's VM let it go.

use crate::Result;
use crate::crd::{DiskRef, Wukong};
use crate::kubevirt_cache::KubeVirtCache;
use crate::reconcile::disk_labels;
use crate::storage::{CachedClaim, data_volume_resource};
use crate::validate::{SpecError, check};
use k8s_openapi::api::core::v1::PersistentVolumeClaim;
use kube::api::{Api, DynamicObject, Patch, PatchParams};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Resource, ResourceExt};
use serde_json::json;
use std::collections::BTreeMap;
use std::sync::Arc;

/// An object that asks for a disk of another (its `moveFrom`).
#[derive(Debug, Clone)]
pub struct Mover {
    pub wukong: Arc<Wukong>,
    /// Its disk that is to be the moved one.
    pub disk: String,
    /// Why it cannot have the disk now (its VM does not exist, its spec is at fault, another asks too): the disk
    /// stays, and its claim is kept whatever its options say.
    pub refused: Option<String>,
}

impl Mover {
    /// Where the disk goes.
    pub fn destination(&self) -> DiskRef {
        DiskRef { wukong: self.wukong.name_any(), disk: self.disk.clone() }
    }
}

/// The objects that ask for disks of `source`, by the source's disk name. Objects being deleted ask for nothing.
pub fn movers(wukongs: &Store<Wukong>, kubevirt: &KubeVirtCache, source: &Wukong) -> BTreeMap<String, Mover> {
    let (ns, name) = (source.namespace(), source.name_any());
    let mut found: BTreeMap<String, Vec<Mover>> = BTreeMap::new();
    // Asked of every object on every pass: by reference, no copy of any name.
    let askers = wukongs.state_filter(|w| {
        w.metadata.namespace == ns
            && w.metadata.deletion_timestamp.is_none()
            && w.spec.disks.iter().any(|d| d.move_from.as_ref().is_some_and(|f| f.wukong == name))
            && w.metadata.name.as_deref() != Some(name.as_str())
    });
    for wukong in askers {
        for disk in &wukong.spec.disks {
            let Some(from) = disk.move_from.as_ref().filter(|f| f.wukong == name) else { continue };
            let refused = match check(&wukong.name_any(), &wukong.spec) {
                Err(e) => Some(format!("Wukong {} asks for it, but its spec is at fault ({e})", wukong.name_any())),
                Ok(()) if kubevirt.vm_and_vmi(ns.as_deref().unwrap_or_default(), &wukong.vm_name()).is_none() => {
                    Some(format!(
                        "Wukong {} asks for it, but its VirtualMachine {} does not exist",
                        wukong.name_any(),
                        wukong.vm_name()
                    ))
                }
                Ok(()) => None,
            };
            found.entry(from.disk.clone()).or_default().push(Mover {
                wukong: wukong.clone(),
                disk: disk.name.clone(),
                refused,
            });
        }
    }
    found
        .into_iter()
        .map(|(disk, mut askers)| {
            if askers.len() > 1 {
                let names: Vec<String> = askers.iter().map(|m| m.destination().to_string()).collect();
                let why = format!("{} all ask for it (moveFrom); a disk moves to one place", names.join(" and "));
                askers.iter_mut().for_each(|m| m.refused = Some(why.clone()));
            }
            (disk, askers.swap_remove(0))
        })
        .collect()
}

/// The claim a moved-in disk uses: the one handed over to `wukong` for `disk`, else the one its source has for the
/// disk named in `from` (in the claims' watch cache, by their labels), else the one the source's status records.
pub fn claim_of(
    claims: &Store<CachedClaim>,
    wukongs: &Store<Wukong>,
    wukong: &Wukong,
    disk: &str,
    from: &DiskRef,
) -> Option<String> {
    let ns = wukong.namespace();
    let labelled = |owner: &str, disk: &str| {
        claims
            .find(|c| c.owner.as_deref() == Some(owner) && c.disk.as_deref() == Some(disk) && c.meta().namespace == ns)
            .map(|c| c.name_any())
    };
    labelled(&wukong.name_any(), disk).or_else(|| labelled(&from.wukong, &from.disk)).or_else(|| {
        let source = wukongs.get(&ObjectRef::new(&from.wukong).within(ns.as_deref().unwrap_or_default()))?;
        let recorded = source.status.as_ref()?.volumes.iter().find(|v| v.name == from.disk)?;
        Some(recorded.pvc_name.clone()).filter(|c| !c.is_empty())
    })
}

/// Why a move into `wukong`'s disk `spec.disks[index]` cannot start: the source object or its disk does not
/// exist, or is its system disk, or another object asks for it too. Asked only while the claim is not handed over:
/// once it is, the source may go.
pub fn check_source(wukongs: &Store<Wukong>, wukong: &Wukong, index: usize, from: &DiskRef) -> Result<(), SpecError> {
    let ns = wukong.namespace();
    let field = |f: &str| format!("spec.disks[{index}].moveFrom{f}");
    let bad = |f: &str, message: String| Err(SpecError { field: field(f), message });
    let Some(source) = wukongs.get(&ObjectRef::new(&from.wukong).within(ns.as_deref().unwrap_or_default())) else {
        return bad(
            ".wukong",
            format!(
                "Wukong {}/{} does not exist; name the Wukong whose disk to move here",
                ns.unwrap_or_default(),
                from.wukong
            ),
        );
    };
    let recorded = source.status.as_ref().map(|s| s.volumes.as_slice()).unwrap_or_default();
    let listed = source.spec.disks.iter().any(|d| d.name == from.disk);
    if !listed && recorded.iter().all(|v| v.name != from.disk) {
        return bad(".disk", format!("Wukong {} has no disk '{}'; name one of its disks", from.wukong, from.disk));
    }
    if crate::plan::system_disk(&source.spec.disks, recorded) == Some(from.disk.as_str()) {
        return bad(
            ".disk",
            format!(
                "disk '{}' is the system disk of Wukong {}: it is part of its VM's definition and never detached, \
                 so it cannot move",
                from.disk, from.wukong
            ),
        );
    }
    let name = wukong.name_any();
    let others: Vec<String> = wukongs
        .state_filter(|w| {
            w.metadata.namespace == ns
                && w.metadata.deletion_timestamp.is_none()
                && w.spec.disks.iter().any(|d| d.move_from.as_ref() == Some(from))
                && w.metadata.name.as_deref() != Some(name.as_str())
        })
        .iter()
        .flat_map(|w| {
            w.spec
                .disks
                .iter()
                .filter(|d| d.move_from.as_ref() == Some(from))
                .map(|d| DiskRef { wukong: w.name_any(), disk: d.name.clone() }.to_string())
        })
        .collect();
    if !others.is_empty() {
        return bad("", format!("{from} is asked for by {} too; a disk moves to one place", others.join(", ")));
    }
    Ok(())
}

/// Hands the claim `claim` of a disk that left its VM over to `to`'s disk `disk`: its owner reference and labels
/// (and those of the DataVolume that owns it, if it has one) become `to`'s, so that the claim is deleted with `to`
/// (as its options say), never with the source. Idempotent.
pub async fn hand_over(
    client: &kube::Client,
    ns: &str,
    claim: &str,
    data_volume: bool,
    to: &Wukong,
    disk: &str,
) -> Result<()> {
    let owner = to.controller_owner_ref(&()).expect("a Wukong read from the API has a name and UID");
    let labels = disk_labels(to, disk);
    let owned = json!({"metadata": {"ownerReferences": [owner], "labels": labels}});
    let labelled = json!({"metadata": {"labels": labels}});
    if data_volume {
        let api = Api::<DynamicObject>::namespaced_with(client.clone(), ns, &data_volume_resource());
        api.patch(claim, &PatchParams::default(), &Patch::Merge(&owned)).await?;
        // The claim's owner is its DataVolume: only its labels change.
        Api::<PersistentVolumeClaim>::namespaced(client.clone(), ns)
            .patch(claim, &PatchParams::default(), &Patch::Merge(&labelled))
            .await?;
    } else {
        Api::<PersistentVolumeClaim>::namespaced(client.clone(), ns)
            .patch(claim, &PatchParams::default(), &Patch::Merge(&owned))
            .await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::{claim, claims_store, kubevirt_cache, store_of};
    use serde_json::{Value, json};

    fn wukong(name: &str, disks: Value, status: Value) -> Wukong {
        serde_json::from_value(json!({
            "apiVersion": "vm.novasphere.dev/v1alpha1", "kind": "Wukong",
            "metadata": {"name": name, "namespace": "ns1", "uid": format!("uid-{name}")},
            "spec": {"disks": disks}, "status": status,
        }))
        .unwrap()
    }

    fn vm(name: &str) -> Value {
        json!({"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachine",
               "metadata": {"name": name, "namespace": "ns1"}, "spec": {}})
    }

    fn from(wukong: &str, disk: &str) -> Value {
        json!({"wukong": wukong, "disk": disk})
    }

    #[test]
    fn the_object_that_asks_for_a_disk_gets_it_only_when_it_can_take_it() {
        let a = wukong("a", json!([{"name": "data", "size": "1Gi"}]), json!({}));
        let b = wukong("b", json!([{"name": "moved", "moveFrom": from("a", "data")}]), json!({}));
        let unrelated = wukong("c", json!([{"name": "data", "size": "1Gi"}]), json!({}));
        let kubevirt = kubevirt_cache(vec![vm("b-vm")], vec![]);
        let found = movers(&store_of(vec![a.clone(), b.clone(), unrelated.clone()]), &kubevirt, &a);
        let mover = &found["data"];
        assert_eq!((mover.destination().to_string(), mover.refused.clone()), ("disk 'moved' of Wukong b".into(), None));
        assert!(movers(&store_of(vec![a.clone(), b.clone()]), &kubevirt, &unrelated).is_empty());

        // Its VM does not exist: refused, said why.
        let none = kubevirt_cache(vec![], vec![]);
        let found = movers(&store_of(vec![a.clone(), b.clone()]), &none, &a);
        assert_eq!(
            found["data"].refused.as_deref(),
            Some("Wukong b asks for it, but its VirtualMachine b-vm does not exist")
        );

        // Two ask: neither gets it.
        let d = wukong("d", json!([{"name": "data", "moveFrom": from("a", "data")}]), json!({}));
        let kubevirt = kubevirt_cache(vec![vm("b-vm"), vm("d-vm")], vec![]);
        let found = movers(&store_of(vec![a.clone(), b, d]), &kubevirt, &a);
        let why = found["data"].refused.clone().unwrap_or_default();
        assert!(
            why.contains("Wukong b") && why.contains("Wukong d") && why.ends_with("a disk moves to one place"),
            "{why}"
        );
    }

    #[test]
    fn a_moved_disk_finds_its_claim_by_its_labels_wherever_the_move_stands() {
        let labelled = |name: &str, owner: &str, disk: &str| {
            let mut c = claim(name, owner, "Bound");
            c.metadata.labels.get_or_insert_default().insert(crate::reconcile::DISK_LABEL.into(), disk.into());
            c
        };
        let a = wukong(
            "a",
            json!([]),
            json!({"vmName": "a-vm", "volumes": [{"name": "data", "pvcName": "recorded",
            "bound": true, "phase": "Attached", "serial": "data", "bus": "scsi"}]}),
        );
        let b = wukong("b", json!([{"name": "moved", "moveFrom": from("a", "data")}]), json!({}));
        let source = DiskRef { wukong: "a".into(), disk: "data".into() };
        let wukongs = store_of(vec![a, b.clone()]);
        let find = |claims| claim_of(&claims_store(claims), &wukongs, &b, "moved", &source);
        assert_eq!(find(vec![labelled("a-vm-data", "a", "data")]).as_deref(), Some("a-vm-data"), "not handed over");
        assert_eq!(find(vec![labelled("a-vm-data", "b", "moved")]).as_deref(), Some("a-vm-data"), "handed over");
        assert_eq!(find(vec![]).as_deref(), Some("recorded"), "only the source's status knows it");
    }

    #[test]
    fn a_move_from_what_cannot_move_is_named() {
        let a = wukong("a", json!([{"name": "root", "system": true}, {"name": "data", "size": "1Gi"}]), json!({}));
        let check = |asked: Value, others: Vec<Wukong>| {
            let b = wukong("b", json!([{"name": "moved", "moveFrom": asked.clone()}]), json!({}));
            let from: DiskRef = serde_json::from_value(asked).unwrap();
            let all = [vec![a.clone(), b.clone()], others].concat();
            check_source(&store_of(all), &b, 0, &from).map_err(|e| e.to_string())
        };
        assert_eq!(check(from("a", "data"), vec![]), Ok(()));
        let error = check(from("gone", "data"), vec![]).unwrap_err();
        assert!(error.starts_with("spec.disks[0].moveFrom.wukong: Wukong ns1/gone does not exist"), "{error}");
        let error = check(from("a", "nope"), vec![]).unwrap_err();
        assert!(error.starts_with("spec.disks[0].moveFrom.disk: Wukong a has no disk 'nope'"), "{error}");
        let error = check(from("a", "root"), vec![]).unwrap_err();
        assert!(
            error.starts_with("spec.disks[0].moveFrom.disk: disk 'root' is the system disk of Wukong a"),
            "{error}"
        );
        let c = wukong("c", json!([{"name": "mine", "moveFrom": from("a", "data")}]), json!({}));
        let error = check(from("a", "data"), vec![c]).unwrap_err();
        assert!(
            error.starts_with(
                "spec.disks[0].moveFrom: disk 'data' of Wukong a is asked for by disk 'mine' of Wukong c too"
            ),
            "{error}"
        );
    }
}
