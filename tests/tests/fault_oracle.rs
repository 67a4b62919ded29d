//! The unplug oracle (`wukong_e2e::unplug_oracle`): the lab's virt-handler asks the guest itself, through the lab's
//! control channel and never through the agent, what held each disk it unplugs. Here it catches an unguarded unplug
//! of a mounted disk that a writer holds, passes one the agent released first, and, in a guest alone, names each way
//! a guest can hold a disk.

use anyhow::{Context, Result};
use kube::api::{Api, DynamicObject, Patch, PatchParams};
use std::time::{Duration, Instant, SystemTime};
use wukong_controller_client::kubevirt::{KubeVirt, vm_resource};
use wukong_e2e::cluster::{ADMIN, Cluster};
use wukong_e2e::kubevirt_lab::{
    API_SERVER, CONTROLLER, HANDLER, HotplugMode, KubeVirtLab, attach_claim, removal_patch,
};
use wukong_e2e::unplug_oracle::{Hold, report};
use wukong_e2e::{DiskSpec, Guest, millis, until};

const NS: &str = "oracle";

/// Removes volume `volume` from VM `vm`'s spec with a plain JSON patch, as `kubectl edit` would: no guard, no operator.
async fn remove_from_spec(vms: &Api<DynamicObject>, vm: &str, volume: &str) -> Result<()> {
    let patch: json_patch::Patch =
        serde_json::from_value(removal_patch(&vms.get(vm).await?, "/spec/template/spec", volume)?)?;
    vms.patch(vm, &PatchParams::default(), &Patch::<()>::Json(patch)).await?;
    Ok(())
}

/// Waits until the oracle has checked `count` unplugs.
async fn checked(kubevirt: &KubeVirtLab, count: usize) -> Result<()> {
    until(&format!("{count} checked unplugs"), Duration::from_secs(90), || async {
        let checked = kubevirt.checked_unplugs();
        Ok(if checked >= count { Ok(()) } else { Err(format!("{checked} checked")) })
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unguarded_unplug_of_a_busy_disk_is_caught_and_a_released_one_is_not() -> Result<()> {
    let started = SystemTime::now();
    let guest = Guest::boot().await?;
    let cluster = Cluster::start(&[API_SERVER, CONTROLLER, HANDLER]).await?;
    let kubevirt = KubeVirtLab::start(&cluster, Some(&guest), NS, HotplugMode::Declarative).await?;
    let admin = cluster.client(ADMIN).await?;
    let vms: Api<DynamicObject> = Api::namespaced_with(admin.clone(), NS, &vm_resource());
    let companion = KubeVirt::new(admin, NS, "vm1", false);
    kubevirt.create_vm("vm1", true, "127.0.0.1").await?;
    for claim in ["pvc-busy", "pvc-idle"] {
        kubevirt.create_claim(claim, &guest.new_image(32 << 20)?).await?;
    }
    let busy = attach_claim(&guest, &companion, "busy", "pvc-busy").await?;
    let idle = attach_claim(&guest, &companion, "idle", "pvc-idle").await?;
    guest.fill(&busy, "/mnt/busy", 1 << 20).await?;
    let writer = guest.start_writer("/mnt/busy").await?;
    guest.fill(&idle, "/mnt/idle", 1 << 20).await?;
    assert_eq!(kubevirt.checked_unplugs(), 0, "plugs are not unplugs");

    // (a) Mounted, a writer holding a file: removed from the VM's spec, and KubeVirt unplugs it regardless.
    remove_from_spec(&vms, "vm1", "busy").await?;
    checked(&kubevirt, 1).await?;
    guest.wait_unplugged("busy", Duration::from_secs(30)).await?;
    let caught = kubevirt.unsafe_unplugs();
    assert_eq!(caught.len(), 1, "{caught:#?}");
    let unplug = &caught[0];
    assert_eq!((unplug.vmi.as_str(), unplug.volume.as_str(), unplug.serial.as_str()), ("vm1", "busy", "busy"));
    assert_eq!(unplug.device.as_deref(), busy.strip_prefix("/dev/"), "{unplug:#?}");
    assert!(unplug.held_by.contains(&"mounted at /mnt/busy".to_string()), "{unplug:#?}");
    let held_open = format!("held open by pid {writer} (sleep): /mnt/busy/log");
    assert!(unplug.held_by.contains(&held_open), "{held_open:?} in {unplug:#?}");
    assert!(unplug.at >= started && unplug.at <= SystemTime::now(), "{unplug:#?}");
    println!("caught: {} of {} ({:?}): {}", unplug.volume, unplug.vmi, unplug.device, unplug.held_by.join("; "));

    // (b) Released by the agent first (unmounted, flushed, deleted from the guest): checked, and not unsafe.
    let released = guest.agent().prepare_detach("idle", true, false).await?;
    assert!(released.released, "the agent released the idle disk: {released:?}");
    remove_from_spec(&vms, "vm1", "idle").await?;
    checked(&kubevirt, 2).await?;
    assert_eq!(kubevirt.checked_unplugs(), 2);
    assert_eq!(
        kubevirt.unsafe_unplugs().len(),
        1,
        "a released disk's unplug is safe: {:#?}",
        kubevirt.unsafe_unplugs()
    );

    let trips: Vec<String> =
        kubevirt.oracle_round_trips().into_iter().map(|d| format!("{:.0} ms", millis(d))).collect();
    println!("the oracle's round trip per unplug: {}", trips.join(", "));
    Ok(())
}

/// Every kind of hold the oracle knows, built in a guest and named by the oracle's report: a partition mounted (at a
/// path with a space), a file on it held open, a working directory in it, a loop device backed by a file on it, a
/// partition swapped on, a dm device over a virtio disk, a device node held open; an idle disk and an absent one
/// hold nothing.
#[tokio::test(flavor = "multi_thread")]
async fn the_oracle_names_each_way_a_guest_holds_a_disk() -> Result<()> {
    let guest = Guest::boot().await?;
    let agent = guest.agent();
    let mut devices = Vec::new();
    for spec in [DiskSpec::scsi("parts"), DiskSpec::virtio("stacked"), DiskSpec::scsi("raw"), DiskSpec::scsi("idle")] {
        guest.hotplug(&spec).await?;
        devices.push(agent.wait_for_disk(&spec.serial, Duration::from_secs(30)).await?.dev_node);
    }
    let [parts, stacked, raw, idle] = devices.as_slice() else { unreachable!("four disks") };
    let sleeper = |setup: &str| format!("sh -c '{setup}; exec sleep 1000' </dev/null >/dev/null 2>&1 & echo $!");
    guest
        .run_ok(&format!(
            "printf 'label: gpt\\n,24M\\n,24M\\n' | sfdisk -q {parts} && udevadm settle && \
             mkfs.ext4 -q {parts}1 && mkdir -p '/mnt/o dir' && mount {parts}1 '/mnt/o dir' && \
             head -c 4194304 /dev/zero > '/mnt/o dir/img' && losetup /dev/loop0 '/mnt/o dir/img' && \
             mkswap {parts}2 >/dev/null && swapon {parts}2 && \
             dmsetup create lin --table \"0 $(blockdev --getsz {stacked}) linear {stacked} 0\" && udevadm settle"
        ))
        .await?;
    let writer = guest.run_ok(&sleeper("exec 3>>\"/mnt/o dir/log\"")).await?.trim().to_string();
    let dweller = guest.run_ok(&sleeper("cd \"/mnt/o dir\"")).await?.trim().to_string();
    let reader = guest.run_ok(&sleeper(&format!("exec 3<{raw}"))).await?.trim().to_string();
    let shell = guest.shell();

    let started = Instant::now();
    let seen = report(&shell, "parts").await?;
    println!("the oracle's round trip for a busy disk: {:.0} ms", millis(started.elapsed()));
    assert_eq!(seen.device.as_deref(), parts.strip_prefix("/dev/"), "{seen:#?}");
    let held_by = seen.held_by()?;
    let pid = |p: &str| p.parse::<u32>().context("a pid");
    let expected = [
        Hold::Mount("/mnt/o dir".into()),
        Hold::Open { pid: pid(&writer)?, comm: "sleep".into(), path: "/mnt/o dir/log".into() },
        Hold::Cwd { pid: pid(&dweller)?, comm: "sleep".into(), path: "/mnt/o dir".into() },
        Hold::Loop { device: "loop0".into(), backing: "/mnt/o dir/img".into() },
        Hold::Swap(format!("{parts}2")),
    ];
    assert_eq!(seen.holds.len(), expected.len(), "{seen:#?}");
    for hold in &expected {
        assert!(seen.holds.contains(hold), "{hold:?} in {seen:#?}");
        assert!(held_by.contains(&hold.to_string()), "{hold} in {held_by:#?}");
    }

    let seen = report(&shell, "stacked").await?;
    assert_eq!(seen.device.as_deref(), stacked.strip_prefix("/dev/"), "{seen:#?}");
    assert_eq!(seen.holds, [Hold::Holder("dm-0".into())], "{seen:#?}");

    let seen = report(&shell, "raw").await?;
    assert_eq!(seen.holds, [Hold::Open { pid: pid(&reader)?, comm: "sleep".into(), path: raw.clone() }], "{seen:#?}");

    let started = Instant::now();
    let seen = report(&shell, "idle").await?;
    println!("the oracle's round trip for an idle disk: {:.0} ms", millis(started.elapsed()));
    assert_eq!(seen.device.as_deref(), idle.strip_prefix("/dev/"));
    assert!(seen.held_by()?.is_empty(), "{seen:#?}");

    let seen = report(&shell, "nosuch").await?;
    assert!(seen.device.is_none() && seen.held_by()?.is_empty(), "{seen:#?}");
    Ok(())
}
