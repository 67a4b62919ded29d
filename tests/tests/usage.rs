//! CheckUsage in a real guest, for what the host cannot build: partitions on a hot-plugged SCSI disk, swap
//! partitions, LVM, md RAID1 and dm-crypt stacks.

use anyhow::Result;
use std::time::Duration;
use tonic::Code;
use wukong_e2e::{DiskSpec, Guest};
use wukong_proto::v1::{BlockerKind, HolderKind, UsageReport, blocker::Detail};

async fn plug(guest: &Guest, serial: &str) -> Result<String> {
    guest.hotplug(&DiskSpec::scsi(serial)).await?;
    Ok(guest.agent().wait_for_disk(serial, Duration::from_secs(30)).await?.dev_node)
}

fn kinds(r: &UsageReport) -> Vec<BlockerKind> {
    let mut k: Vec<BlockerKind> = r.blockers.iter().map(|b| b.kind()).collect();
    k.sort_by_key(|k| *k as i32);
    k.dedup();
    k
}

fn messages(r: &UsageReport) -> String {
    r.blockers.iter().map(|b| format!("  {}\n", b.message)).collect()
}

fn holder_kinds(r: &UsageReport) -> Vec<HolderKind> {
    r.blockers
        .iter()
        .filter_map(|b| match &b.detail {
            Some(Detail::Holder(h)) => h.holder.as_ref().map(|h| h.kind()),
            _ => None,
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn partitions_mount_and_swap_are_reported_and_idle_disks_are_not() -> Result<()> {
    let guest = Guest::boot().await?;
    let agent = guest.agent();
    let dev = plug(&guest, "parts").await?;
    let idle = plug(&guest, "idle").await?;
    guest
        .run_ok(&format!(
            "printf 'label: gpt\\n,24M\\n,24M\\n' | sfdisk -q {dev} && udevadm settle && \
             mkfs.ext4 -q {dev}1 && mkdir -p '/mnt/data dir' && mount {dev}1 '/mnt/data dir' && \
             mkswap {dev}2 >/dev/null && swapon {dev}2 && udevadm settle"
        ))
        .await?;

    let report = agent.check_usage("parts").await?;
    assert!(report.in_use);
    assert_eq!(kinds(&report), vec![BlockerKind::Mount, BlockerKind::Swap], "{}", messages(&report));
    let mount = report.blockers.iter().find(|b| b.kind() == BlockerKind::Mount).unwrap();
    assert_eq!(mount.message, format!("{dev}1 is mounted at /mnt/data dir (ext4) in the host mount namespace"));
    let swap = report.blockers.iter().find(|b| b.kind() == BlockerKind::Swap).unwrap();
    assert!(swap.message.starts_with(&format!("{dev}2 is active swap")), "{}", swap.message);

    // The inventory shows the partitions and what udev found on them.
    let disk = agent.get_disk("parts", true).await?;
    let fs: Vec<&str> = disk.partitions.iter().map(|p| p.fs_type.as_str()).collect();
    assert_eq!(fs, vec!["ext4", "swap"], "{:?}", disk.partitions);
    assert!(disk.usage.expect("include_usage attaches a report").in_use);

    let free = agent.check_usage("idle").await?;
    assert!(!free.in_use, "an idle disk ({idle}) is not in use:\n{}", messages(&free));

    // udev probes the partitions again after umount and swapoff (a worker briefly opens the disk): let it finish.
    guest.run_ok(&format!("umount '/mnt/data dir' && swapoff {dev}2 && udevadm settle")).await?;
    let after = agent.check_usage("parts").await?;
    assert!(!after.in_use, "after umount and swapoff:\n{}", messages(&after));

    let err = agent.check_usage("no-such-disk").await.unwrap_err();
    assert_eq!(err.code(), Some(Code::NotFound));
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn lvm_and_dm_crypt_holders_are_reported_even_when_nothing_is_mounted() -> Result<()> {
    let guest = Guest::boot().await?;
    let agent = guest.agent();
    let lvm_dev = plug(&guest, "lvm-pv").await?;
    guest
        .run_ok(&format!(
            "lvm pvcreate -q {lvm_dev} && lvm vgcreate -q vg0 {lvm_dev} && \
             lvm lvcreate -q -y -L 16M -n data vg0 && udevadm settle && \
             mkfs.ext4 -q /dev/mapper/vg0-data && mkdir -p /mnt/lv && mount /dev/mapper/vg0-data /mnt/lv"
        ))
        .await?;
    let report = agent.check_usage("lvm-pv").await?;
    assert_eq!(kinds(&report), vec![BlockerKind::Mount, BlockerKind::Holder], "{}", messages(&report));
    assert_eq!(holder_kinds(&report), vec![HolderKind::Lvm]);
    let holder = report.blockers.iter().find(|b| b.kind() == BlockerKind::Holder).unwrap();
    assert!(
        holder.message.contains("LVM logical volume vg0-data") && holder.message.contains("vgchange -an"),
        "{}",
        holder.message
    );
    let mount = report.blockers.iter().find(|b| b.kind() == BlockerKind::Mount).unwrap();
    assert!(mount.message.starts_with("/dev/mapper/vg0-data is mounted at /mnt/lv (ext4)"), "{}", mount.message);

    guest.run_ok("umount /mnt/lv && udevadm settle").await?;
    let report = agent.check_usage("lvm-pv").await?;
    assert_eq!(kinds(&report), vec![BlockerKind::Holder], "an active LV blocks even unmounted:\n{}", messages(&report));
    guest.run_ok("lvm vgchange -q -an vg0 && udevadm settle").await?;
    assert!(!agent.check_usage("lvm-pv").await?.in_use);

    let crypt_dev = plug(&guest, "crypt").await?;
    guest
        .run_ok(&format!(
            "dmsetup create cryptdata --uuid CRYPT-PLAIN-cryptdata --table \
             \"0 $(blockdev --getsz {crypt_dev}) crypt aes-cbc-plain {key} 0 {crypt_dev} 0\" && udevadm settle",
            key = "0123456789abcdef0123456789abcdef"
        ))
        .await?;
    let report = agent.check_usage("crypt").await?;
    assert_eq!(holder_kinds(&report), vec![HolderKind::DmCrypt], "{}", messages(&report));
    assert!(report.blockers[0].message.contains("dm-crypt mapping cryptdata"), "{}", messages(&report));
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn md_raid1_across_two_hotplugged_disks_blocks_both() -> Result<()> {
    let guest = Guest::boot().await?;
    let agent = guest.agent();
    let a = plug(&guest, "md-a").await?;
    let b = plug(&guest, "md-b").await?;
    guest
        .run_ok(&format!(
            "mdadm --create /dev/md0 --run --quiet --level=1 --raid-devices=2 --metadata=1.2 {a} {b} && udevadm settle"
        ))
        .await?;
    for serial in ["md-a", "md-b"] {
        let report = agent.check_usage(serial).await?;
        assert_eq!(holder_kinds(&report), vec![HolderKind::Md], "{serial}:\n{}", messages(&report));
        assert!(report.blockers[0].message.contains("mdadm --stop"), "{}", report.blockers[0].message);
    }
    guest.run_ok("mdadm --stop --quiet /dev/md0 && udevadm settle").await?;
    assert!(!agent.check_usage("md-a").await?.in_use);
    Ok(())
}
