//! The usage scanner on this machine's real kernel: loop devices, real filesystems and mounts, a second mount
//! namespace, swap files and real processes. `fuser -m` and `findmnt` are the oracles: everything they find must be
//! in our report. Needs root; without it these tests fail (they never skip).

mod common;

use common::{
    Holder, LoopDisk, findmnt_targets, mkdirs, other_threads, serial, sh, threaded_python, threaded_python_under,
    wait_for_exited_leader,
};
use nix::sys::stat::stat;
use std::collections::BTreeSet;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;
use wukong_agent::roots::HostRoots;
use wukong_agent::usage::{BpfSource, Candidate, Mappings, ProcessSource, ProcfsSource, Walk, process_pids};
use wukong_proto::v1::{Blocker, BlockerKind, Disk, ProcessUseKind, UsageReport, blocker::Detail};

fn mounts_of(report: &UsageReport) -> BTreeSet<String> {
    report
        .blockers
        .iter()
        .filter_map(|b| match &b.detail {
            Some(Detail::Mount(m)) if m.host_namespace => Some(m.mount_point.clone()),
            _ => None,
        })
        .collect()
}

fn kinds(report: &UsageReport) -> BTreeSet<i32> {
    report.blockers.iter().map(|b| b.kind).collect()
}

/// PIDs `fuser -m` finds for the device's filesystems (it prints PIDs on stdout, names on stderr).
fn fuser_pids(dev: &str) -> BTreeSet<i32> {
    let out = Command::new("fuser").arg("-m").arg(dev).output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .filter_map(|w| w.trim_end_matches(char::is_alphabetic).parse().ok())
        .collect()
}

/// Asserts the report is a superset of what fuser -m and findmnt find, and returns it.
fn assert_superset_of_oracles(disk: &LoopDisk) -> UsageReport {
    let report = disk.scan();
    let ours = process_pids(&report);
    let fuser = fuser_pids(&disk.dev);
    assert!(fuser.is_subset(&ours), "fuser -m found {fuser:?}, we found {ours:?}\n{:#?}", messages(&report));
    let findmnt = findmnt_targets(&disk.dev);
    let mounts = mounts_of(&report);
    assert!(findmnt.is_subset(&mounts), "findmnt lists {findmnt:?}, we found {mounts:?}");
    report
}

fn messages(report: &UsageReport) -> Vec<String> {
    report.blockers.iter().map(|b| b.message.clone()).collect()
}

fn find(report: &UsageReport, pid: i32, kind: ProcessUseKind) -> Option<&Blocker> {
    report.blockers.iter().find(|b| matches!(&b.detail, Some(Detail::Process(p)) if p.pid == pid && p.r#use() == kind))
}

#[test]
fn idle_unmounted_device_is_not_in_use() {
    let _serial = serial();
    let disk = LoopDisk::new("ext4");
    let report = disk.scan();
    assert!(!report.in_use, "{:#?}", messages(&report));
    assert!(report.blockers.is_empty());
    assert!(report.scan_duration.is_some() && report.scanned_at.is_some());
}

#[test]
fn mounts_with_hostile_paths_and_bind_mounts_are_found() {
    let _serial = serial();
    for fs in ["ext4", "xfs", "btrfs"] {
        let mut disk = LoopDisk::new(fs);
        let mp = disk.mount_at("with space\ttab\\back\nnewline");
        std::fs::create_dir_all(mp.join("sub")).unwrap();
        let bound = disk.bind(&mp.join("sub"), "bound");
        let report = assert_superset_of_oracles(&disk);
        let mounts = mounts_of(&report);
        assert!(mounts.contains(mp.to_str().unwrap()), "{fs}: {mounts:?}");
        assert!(mounts.contains(bound.to_str().unwrap()), "{fs}: {mounts:?}");
        let bind = report.blockers.iter().find(|b| b.message.contains("bound")).unwrap();
        assert!(bind.message.contains("a bind mount of /sub"), "{fs}: {}", bind.message);
        assert!(bind.message.contains("in the host mount namespace"), "{}", bind.message);
        assert!(bind.message.contains(fs), "{}", bind.message);
        assert!(report.in_use);
    }
}

#[test]
fn processes_with_files_cwd_exe_mmap_and_raw_device_are_found() {
    let _serial = serial();
    let mut disk = LoopDisk::new("ext4");
    let mp = disk.mount_at("m");
    std::fs::write(mp.join("data"), vec![7u8; 8192]).unwrap();
    std::fs::copy("/bin/sleep", mp.join("sleep-on-disk")).unwrap();
    let m = mp.display();
    let writer = Holder::sh(&format!("exec 3>>'{m}/data'"));
    let reader = Holder::sh(&format!("exec 3<'{m}/data'"));
    let cwd = Holder::sh(&format!("cd '{m}'"));
    let exe = Holder::start("sh", &["-c", &format!("echo ready; exec '{m}/sleep-on-disk' 1000")]);
    let on_disk = mp.join("sleep-on-disk");
    while std::fs::read_link(format!("/proc/{}/exe", exe.pid())).ok().as_deref() != Some(on_disk.as_path()) {
        std::thread::sleep(Duration::from_millis(10));
    }
    // Debian's python3 (installed by scripts/lib/install-deps.sh), whatever else is on PATH.
    let mapper = Holder::start(
        "/usr/bin/python3",
        &[
            "-c",
            &format!(
                "import mmap,os,sys,time\nf=open('{m}/data','r+b')\nm=mmap.mmap(f.fileno(),0)\nf.close()\nprint('ready',flush=True)\ntime.sleep(1000)"
            ),
        ],
    );
    let raw = Holder::sh(&format!("exec 4<>{}", disk.dev));
    let report = assert_superset_of_oracles(&disk);

    let w = find(&report, writer.pid(), ProcessUseKind::OpenFile).expect("writer found");
    assert!(w.message.contains("open for writing") && w.message.contains("/data"), "{}", w.message);
    assert!(w.message.contains(&format!("pid {}", writer.pid())) && w.message.contains("uid 0"), "{}", w.message);
    let r = find(&report, reader.pid(), ProcessUseKind::OpenFile).expect("reader found");
    assert!(r.message.contains("open for reading"), "{}", r.message);
    assert!(find(&report, cwd.pid(), ProcessUseKind::Cwd).is_some());
    assert!(find(&report, exe.pid(), ProcessUseKind::Exe).is_some(), "{:#?}", messages(&report));
    let map = find(&report, mapper.pid(), ProcessUseKind::Mmap).expect("mmap found");
    assert!(map.message.contains("shared and writable"), "{}", map.message);
    let dev = find(&report, raw.pid(), ProcessUseKind::BlockDevice).expect("raw device user found");
    assert!(dev.message.contains(&disk.dev) && dev.message.contains("for writing"), "{}", dev.message);

    // The kernel's iterators, every walk, name exactly these processes (each through another kind of use), and
    // no other of the machine's: the /proc analysis that follows reads six processes, not all of them.
    let devices = BTreeSet::from([stat(disk.dev.as_str()).unwrap().st_rdev, stat(&mp).unwrap().st_dev]);
    let holders = BTreeSet::from([writer.pid(), reader.pid(), cwd.pid(), exe.pid(), mapper.pid(), raw.pid()]);
    for source in common::bpf_walks() {
        let named: BTreeSet<i32> =
            source.candidates(Path::new("/proc"), &devices).unwrap().into_iter().map(|c| c.pid).collect();
        assert_eq!(named, holders, "{}", source.description());
    }
}

/// Which processes, and what of each, the walk `source` names for `disk` mounted at `mp`.
fn candidates_for(source: &BpfSource, disk: &LoopDisk, mp: &Path) -> Vec<Candidate> {
    let devices = BTreeSet::from([stat(disk.dev.as_str()).unwrap().st_rdev, stat(mp).unwrap().st_dev]);
    source.candidates(Path::new("/proc"), &devices).unwrap()
}

/// A mapping among thousands: a process with 20,000 anonymous mappings (alternately read-only and writable, so that
/// none merge; a maple tree five levels deep) and, among them, a file on the disk it mapped and closed (with libc's
/// mmap: Python's keeps a descriptor). Every walk names the process and no other, having seen a mapping and no open
/// file; every scan reports the mapping.
#[test]
fn a_file_mapped_among_thousands_of_mappings_is_found_by_every_walk() {
    let _serial = serial();
    let mut disk = LoopDisk::new("ext4");
    let mp = disk.mount_at("m");
    std::fs::write(mp.join("data"), vec![7u8; 4096]).unwrap();
    let script = format!(
        "import ctypes,mmap,os,time\nlibc=ctypes.CDLL(None)\nlibc.mmap.restype=ctypes.c_void_p\n\
         libc.mmap.argtypes=[ctypes.c_void_p,ctypes.c_size_t,ctypes.c_int,ctypes.c_int,ctypes.c_int,ctypes.c_long]\n\
         keep=[]\nfor i in range(20000):\n    \
         keep.append(mmap.mmap(-1,4096,flags=mmap.MAP_PRIVATE,prot=mmap.PROT_READ|(mmap.PROT_WRITE if i%2 else 0)))\n    \
         if i==10000:\n        fd=os.open('{}/data',os.O_RDONLY)\n        \
         assert libc.mmap(None,4096,mmap.PROT_READ,mmap.MAP_PRIVATE,fd,0)!=ctypes.c_void_p(-1).value\n        \
         os.close(fd)\nprint('ready',flush=True)\ntime.sleep(1000)",
        mp.display()
    );
    let holder = Holder::start("/usr/bin/python3", &["-c", &script]);
    let mappings = std::fs::read_to_string(format!("/proc/{}/maps", holder.pid())).unwrap().lines().count();
    assert!(mappings > 20_000, "the holder has {mappings} mappings");
    let report = assert_superset_of_oracles(&disk);
    let map = find(&report, holder.pid(), ProcessUseKind::Mmap).expect("the mapping is reported");
    assert!(map.message.contains("/data"), "{}", map.message);
    for source in common::bpf_walks() {
        let candidates = candidates_for(source, &disk, &mp);
        let seen: Vec<_> =
            candidates.iter().map(|c| (c.pid, c.seen.as_ref().map(|s| (s.mappings, s.fds.len())))).collect();
        assert_eq!(seen, [(holder.pid(), Some((true, 0)))], "{}", source.description());
    }
}

/// A mapping that stays while the rest of its process's mappings change all the time: a thread maps 500 pages one by
/// one and unmaps them, over and over, so that the kernel replaces nodes of the tree while the maple tree walk reads
/// it. Each of 300 walks names the process, having seen its mapping (not only the descriptor Python's mmap keeps).
/// The tree walk alone (no VMA iterator to hand a process to) either saw the mapping or gave the process to /proc,
/// never a tree it read without it; it read the tree in some of the walks, and gave up in others.
#[test]
fn a_steady_mapping_is_found_while_its_tree_changes_under_the_walk() {
    let _serial = serial();
    let mut disk = LoopDisk::new("ext4");
    let mp = disk.mount_at("m");
    std::fs::write(mp.join("data"), vec![7u8; 4096]).unwrap();
    let body = "    while True:\n        pages=[mmap.mmap(-1,4096,flags=mmap.MAP_PRIVATE,prot=mmap.PROT_READ|(mmap.PROT_WRITE if i%2 else 0)) for i in range(500)]\n        for p in pages:\n            p.close()";
    let script = format!(
        "import mmap,threading,time\nf=open('{}/data','rb')\nm=mmap.mmap(f.fileno(),0,prot=mmap.PROT_READ)\nf.close()\n\
         def churn():\n{body}\nthreading.Thread(target=churn,daemon=True).start()\nprint('ready',flush=True)\ntime.sleep(1000)",
        mp.display()
    );
    let holder = Holder::start("/usr/bin/python3", &["-c", &script]);
    let shards = std::thread::available_parallelism().map_or(1, |n| n.get() as u32);
    let tree_only =
        BpfSource::load_walk(&HostRoots::default(), Some(Walk::PerProcess { shards, mappings: Mappings::TreeOnly }))
            .unwrap();
    let mut counts = BTreeSet::new();
    // Whether `source` named the holder, and whether it saw its mapping (None: to be read whole).
    let seen_by = |source: &BpfSource| {
        let candidates = candidates_for(source, &disk, &mp);
        let seen = candidates.iter().find(|c| c.pid == holder.pid()).map(|c| c.seen.as_ref().map(|s| s.mappings));
        (seen, candidates)
    };
    let (mut read, mut given_up) = (0, 0);
    for walk in 0..300 {
        // The agent's walk: seen whole (handed to /proc) would do too; seen without its mapping would not.
        let (seen, candidates) = seen_by(common::bpf());
        assert!(matches!(seen, Some(Some(true) | None)), "walk {walk}: {candidates:?}");
        match seen_by(&tree_only) {
            (Some(Some(true)), _) => read += 1,
            (Some(None), _) => given_up += 1,
            (_, candidates) => panic!("walk {walk}, the tree alone: {candidates:?}"),
        }
        if walk % 30 == 0 {
            counts.insert(std::fs::read_to_string(format!("/proc/{}/maps", holder.pid())).unwrap().lines().count());
        }
    }
    assert!(counts.len() > 1, "the holder's mappings changed during the walks: {counts:?}");
    println!("the tree walk read the holder's tree in {read} of 300 walks and gave up in {given_up}");
    assert!(read > 0 && given_up > 0, "read {read}, given up {given_up}");
}

/// A files table far larger than what is open in it (a server that once held thousands of files keeps its table):
/// files at fds 3000 and 16000 are found by /proc and every in-kernel walk alike, and the walks say which fds they
/// saw, so that /proc reads those two and none of the process's other slots.
#[test]
fn files_at_high_fds_of_a_sparse_files_table_are_found() {
    let _serial = serial();
    let mut disk = LoopDisk::new("ext4");
    let mp = disk.mount_at("m");
    std::fs::write(mp.join("data"), b"x").unwrap();
    let m = mp.display();
    let script = format!("ulimit -n 16384 && exec 16000<'{m}/data' 3000>>'{m}/data'\necho ready\nexec sleep 1000");
    let holder = Holder::start("bash", &["-c", &script]);
    common::wait_for_comm(holder.pid(), "sleep");
    let report = assert_superset_of_oracles(&disk);
    let fds: BTreeSet<i32> = report
        .blockers
        .iter()
        .filter_map(|b| match &b.detail {
            Some(Detail::Process(p)) if p.pid == holder.pid() => Some(p.fd),
            _ => None,
        })
        .collect();
    assert_eq!(fds, BTreeSet::from([3000, 16000]), "{:#?}", messages(&report));
    let devices = BTreeSet::from([stat(disk.dev.as_str()).unwrap().st_rdev, stat(&mp).unwrap().st_dev]);
    for source in common::bpf_walks() {
        let candidates = source.candidates(Path::new("/proc"), &devices).unwrap();
        let seen = candidates.iter().find(|c| c.pid == holder.pid()).and_then(|c| c.seen.clone());
        let seen = seen.unwrap_or_else(|| panic!("{}: {candidates:?}", source.description()));
        assert_eq!(seen.fds, BTreeSet::from([3000, 16000]), "{}", source.description());
        assert!(!seen.mappings, "{}", source.description());
    }
}

#[test]
fn mount_only_in_another_namespace_is_found() {
    let _serial = serial();
    let disk = LoopDisk::new("ext4");
    let inner = tempfile::tempdir().unwrap();
    let ns = Holder::start(
        "unshare",
        &[
            "-m",
            "--propagation",
            "private",
            "sh",
            "-c",
            &format!("mount {} '{}' && cd / && echo ready && exec sleep 1000", disk.dev, inner.path().display()),
        ],
    );
    common::wait_for_comm(ns.pid(), "sleep");
    assert!(findmnt_targets(&disk.dev).is_empty(), "the host namespace does not see the mount");
    let report = disk.scan();
    let m = report
        .blockers
        .iter()
        .find_map(|b| match &b.detail {
            Some(Detail::Mount(m)) => Some((b, m)),
            _ => None,
        })
        .expect("the namespaced mount is found");
    assert!(!m.1.host_namespace);
    assert_eq!(m.1.mount_point, inner.path().to_str().unwrap());
    assert!(
        m.0.message.contains("mount namespace") && m.0.message.contains(&format!("pid {}", ns.pid())),
        "{}",
        m.0.message
    );
}

#[test]
fn swap_file_and_loop_backed_by_a_file_on_the_disk_are_found() {
    let _serial = serial();
    let mut disk = LoopDisk::new("ext4");
    let mp = disk.mount_at("m");
    let swap = mp.join("swapfile");
    sh(&format!(
        "dd if=/dev/zero of={s} bs=1M count=16 status=none && chmod 600 {s} && mkswap -q {s} && swapon {s}",
        s = swap.display()
    ));
    disk.swaps.push(swap.clone());
    let image = mp.join("inner.img");
    std::fs::File::create(&image).unwrap().set_len(8 << 20).unwrap();
    let inner = sh(&format!("losetup -f --show {}", image.display())).trim().to_string();
    disk.extra_loops.push(inner.clone());

    let report = assert_superset_of_oracles(&disk);
    let swap_b = report.blockers.iter().find(|b| b.kind() == BlockerKind::Swap).expect("swap found");
    assert!(swap_b.message.contains("swapfile") && swap_b.message.contains("swapoff"), "{}", swap_b.message);
    let loop_b = report.blockers.iter().find(|b| b.kind() == BlockerKind::Loop).expect("loop found");
    assert!(loop_b.message.contains(&inner) && loop_b.message.contains("inner.img"), "{}", loop_b.message);
}

#[test]
fn swap_on_the_raw_device_and_exclusive_claims_are_found() {
    let _serial = serial();
    let mut disk = LoopDisk::new("none");
    sh(&format!("mkswap -q {d} && swapon {d}", d = disk.dev));
    disk.swaps.push(disk.dev.clone().into());
    let report = disk.scan();
    sh(&format!("swapoff {}", disk.dev));
    assert_eq!(kinds(&report), BTreeSet::from([BlockerKind::Swap as i32]), "{:#?}", messages(&report));
    assert!(report.blockers[0].message.starts_with(&disk.dev), "{}", report.blockers[0].message);
    assert!(!disk.scan().in_use, "after swapoff the device is free");
}

/// Seeded random scenarios: random filesystems, mounts, bind mounts and processes; the oracles must agree.
#[test]
fn randomised_scenarios_agree_with_the_oracles() {
    let _serial = serial();
    let seed: u64 = std::env::var("WUKONG_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(20261121);
    let mut state = seed;
    let mut rand = move |n: u64| {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state % n
    };
    for round in 0..6 {
        let fs = ["ext4", "xfs", "btrfs"][rand(3) as usize];
        let mut disk = LoopDisk::new(fs);
        let mp = disk.mount_at("m");
        for b in 0..rand(3) {
            disk.bind(&mp, &format!("b{b}"));
        }
        let mut holders = Vec::new();
        let mut expected = BTreeSet::new();
        for p in 0..rand(5) {
            let file = mp.join(format!("f{p}"));
            std::fs::write(&file, b"x").unwrap();
            let h = match rand(3) {
                0 => Holder::sh(&format!("exec 3<'{}'", file.display())),
                1 => Holder::sh(&format!("exec 3>>'{}'", file.display())),
                _ => Holder::sh(&format!("cd '{}'", mp.display())),
            };
            expected.insert(h.pid());
            holders.push(h);
        }
        // Unrelated processes holding files elsewhere must not appear.
        let unrelated = Holder::sh("exec 3</etc/hostname; cd /tmp");
        let report = assert_superset_of_oracles(&disk);
        let ours = process_pids(&report);
        assert!(expected.is_subset(&ours), "seed {seed} round {round} ({fs}): expected {expected:?}, found {ours:?}");
        assert!(!ours.contains(&unrelated.pid()), "seed {seed} round {round}: unrelated process reported");
        assert!(report.in_use);
    }
}

/// A mount in a namespace with no process left (kept alive by a bind-mounted nsfs file): no mountinfo shows it,
/// fuser and findmnt see nothing, but the kernel still holds the device. The O_EXCL probe reports it.
#[test]
fn kernel_claim_without_any_visible_user_is_found() {
    let _serial = serial();
    let disk = LoopDisk::new("ext4");
    let holder_dir = tempfile::tempdir().unwrap();
    let dir = holder_dir.path();
    sh(&format!("mount --bind {d} {d} && mount --make-private {d} && touch {d}/ns", d = dir.display()));
    let inner = tempfile::tempdir().unwrap();
    sh(&format!(
        "unshare --mount={}/ns --propagation private mount {} {}",
        dir.display(),
        disk.dev,
        inner.path().display()
    ));
    let report = disk.scan();
    let fuser = fuser_pids(&disk.dev);
    let findmnt = findmnt_targets(&disk.dev);
    sh(&format!("umount {d}/ns && umount {d}", d = dir.display()));
    assert!(fuser.is_empty() && findmnt.is_empty(), "the oracles see nothing: {fuser:?} {findmnt:?}");
    assert_eq!(kinds(&report), BTreeSet::from([BlockerKind::KernelClaim as i32]), "{:#?}", messages(&report));
    assert!(report.blockers[0].message.contains("exclusively"), "{}", report.blockers[0].message);
    assert!(!disk.scan().in_use, "free once the namespace is gone");
}

/// Files in a nested btrfs subvolume carry a device number no mount names; they are still found.
#[test]
fn files_in_nested_btrfs_subvolumes_are_found() {
    let _serial = serial();
    let mut disk = LoopDisk::new("btrfs");
    let mp = disk.mount_at("m");
    sh(&format!("btrfs -q subvolume create {m}/sub && btrfs -q subvolume create {m}/sub/nested", m = mp.display()));
    let file = mp.join("sub/nested/db");
    std::fs::write(&file, b"x").unwrap();
    let writer = Holder::sh(&format!("exec 3>>'{}'", file.display()));
    let cwd = Holder::sh(&format!("cd '{}/sub'", mp.display()));
    let report = assert_superset_of_oracles(&disk);
    let w = find(&report, writer.pid(), ProcessUseKind::OpenFile).expect("file in nested subvolume found");
    assert!(w.message.contains("nested/db"), "{}", w.message);
    assert!(find(&report, cwd.pid(), ProcessUseKind::Cwd).is_some(), "{:#?}", messages(&report));
}

/// The disk holding this machine's `/` is reported as the running system.
#[test]
fn the_disk_holding_root_is_a_system_blocker() {
    let _serial = serial();
    use std::os::unix::fs::MetadataExt;
    let dev = std::fs::metadata("/").unwrap().dev();
    let (ma, mi) = (nix::sys::stat::major(dev), nix::sys::stat::minor(dev));
    assert_ne!(ma, 0, "/ must be on a block device for this test (it is on this project's machines)");
    let sys = std::fs::canonicalize(format!("/sys/dev/block/{ma}:{mi}")).unwrap();
    // A partition's disk is its parent directory in sysfs.
    let disk_dir = if sys.join("partition").exists() { sys.parent().unwrap().to_path_buf() } else { sys };
    let name = disk_dir.file_name().unwrap().to_string_lossy().into_owned();
    let disk = Disk { kernel_name: name.clone(), id: name.clone(), ..Disk::default() };
    // Every process uses `/`, and processes come and go between two scans (kernel workers, a busy machine): both
    // sources give the same blockers but the processes', and each names this test's own process.
    let not_processes = |r: &UsageReport| -> Vec<Blocker> {
        r.blockers.iter().filter(|b| b.kind() != BlockerKind::Process).cloned().collect()
    };
    let holder = Holder::sh("cd /");
    let report = &common::scan_by(std::slice::from_ref(&disk), &ProcfsSource)[0];
    let by_bpf = &common::scan_by(&[disk], common::bpf())[0];
    assert_eq!(not_processes(report), not_processes(by_bpf));
    for r in [report, by_bpf] {
        assert!(process_pids(r).contains(&holder.pid()), "{:#?}", messages(r));
    }
    let system = report.blockers.iter().find(|b| b.kind() == BlockerKind::System).expect("system blocker");
    assert!(system.message.contains("holds / of the running system"), "{}", system.message);
    assert!(report.blockers.iter().any(|b| b.kind() == BlockerKind::Mount));
}

/// Processes that start and exit while scans run never fail a scan, and the steady user is always found.
#[test]
fn scans_survive_processes_exiting_mid_scan() {
    let _serial = serial();
    let mut disk = LoopDisk::new("ext4");
    let mp = disk.mount_at("m");
    std::fs::write(mp.join("f"), b"x").unwrap();
    let steady = Holder::sh(&format!("exec 3<'{}/f'", mp.display()));
    use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
    let stop = std::sync::Arc::new(AtomicBool::new(false));
    let churned = std::sync::Arc::new(AtomicU32::new(0));
    let churn = std::thread::spawn({
        let (stop, churned) = (stop.clone(), churned.clone());
        let file = mp.join("f");
        move || {
            while !stop.load(Ordering::Relaxed) {
                // Short-lived processes, some holding the disk, half of them killed at random points of a scan.
                let mut c = Command::new("sh")
                    .arg("-c")
                    .arg(format!("exec 3<'{}'; exec sleep 0.01", file.display()))
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .unwrap();
                if churned.fetch_add(1, Ordering::Relaxed) % 2 == 0 {
                    let _ = c.kill();
                }
                let _ = c.wait();
            }
        }
    });
    let started = std::time::Instant::now();
    let mut scans = 0;
    // Every source in turn (their reports differ by the churn between them, so each is judged on its own).
    let [tree, iterator, per_element] = common::bpf_walks();
    let sources: [&dyn ProcessSource; 4] = [&ProcfsSource, tree, iterator, per_element];
    while churned.load(Ordering::Relaxed) < 50 && started.elapsed() < Duration::from_secs(20) {
        let source = sources[scans % sources.len()];
        let report = common::scan_by(&[disk.disk()], source).remove(0);
        assert!(process_pids(&report).contains(&steady.pid()), "{}: {:#?}", source.name(), messages(&report));
        scans += 1;
    }
    stop.store(true, Ordering::Relaxed);
    churn.join().unwrap();
    assert!(churned.load(Ordering::Relaxed) >= 50, "processes came and went during {scans} scans");
}

/// PIDs `lsof` finds holding files on `what` (a device or a mount point).
fn lsof_pids(what: &str) -> BTreeSet<i32> {
    let out = Command::new("lsof").arg("-w").arg("-t").arg(what).output().unwrap();
    String::from_utf8_lossy(&out.stdout).split_whitespace().filter_map(|w| w.parse().ok()).collect()
}

fn stacked_of(report: &UsageReport) -> Vec<(&Blocker, &wukong_proto::v1::MountUse)> {
    report
        .blockers
        .iter()
        .filter(|b| b.kind() == BlockerKind::StackedMount)
        .filter_map(|b| match &b.detail {
            Some(Detail::Mount(m)) => Some((b, m)),
            _ => None,
        })
        .collect()
}

/// The PID (in this namespace) of the only child of `pid`: the process `unshare --fork` runs.
fn only_child(pid: i32) -> i32 {
    let children = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap();
    let children: Vec<i32> = children.split_whitespace().map(|c| c.parse().unwrap()).collect();
    assert_eq!(children.len(), 1, "{children:?}");
    children[0]
}

/// What a container is, without a container engine: an overlay whose layers are on the disk, mounted inside a new
/// mount and PID namespace, and a process there working in it. The host sees neither the overlay nor the disk's
/// files in use; `fuser -m` and `lsof` find nothing; the scan reports the overlay, its namespace and the process.
#[test]
fn an_overlay_in_a_container_namespace_and_its_process_are_found() {
    let _serial = serial();
    let mut disk = LoopDisk::new("ext4");
    let mp = disk.mount_at("var lib containers");
    mkdirs(&mp, &["layer 1", "layer2", "upper", "work"]);
    std::fs::write(mp.join("layer2/app.db"), b"rows").unwrap();
    let merged = disk.dir.path().join("rootfs");
    std::fs::create_dir_all(&merged).unwrap();
    let m = mp.display();
    let container = Holder::start(
        "unshare",
        &[
            "--mount",
            "--pid",
            "--fork",
            // Killing unshare must end the container too (its PID 1 is unshare's child).
            "--kill-child",
            "--propagation",
            "private",
            "sh",
            "-c",
            &format!(
                "mount -t overlay overlay -o 'lowerdir={m}/layer 1:{m}/layer2,upperdir={m}/upper,workdir={m}/work' \
                 '{r}' && cd '{r}' && exec 3>>'{r}/app.db' && echo ready && exec sleep 1000",
                r = merged.display()
            ),
        ],
    );
    let app = only_child(container.pid());
    common::wait_for_comm(app, "sleep");
    let report = disk.scan();
    let stacked = stacked_of(&report);
    assert_eq!(stacked.len(), 1, "{:#?}", messages(&report));
    let (b, mount) = stacked[0];
    assert!(!mount.host_namespace);
    assert_eq!(mount.mount_point, merged.to_str().unwrap());
    let layers: Vec<(&str, String)> = mount.layers.iter().map(|l| (l.option.as_str(), l.path.clone())).collect();
    assert_eq!(
        layers,
        vec![
            ("lowerdir", format!("{m}/layer 1")),
            ("lowerdir", format!("{m}/layer2")),
            ("upperdir", format!("{m}/upper")),
            ("workdir", format!("{m}/work")),
        ]
    );
    assert!(
        b.message.starts_with(&format!("overlay mounted at {} in mount namespace ", merged.display())),
        "{}",
        b.message
    );
    assert!(
        b.message.contains(&format!(
            "lowerdir {m}/layer 1, lowerdir {m}/layer2, upperdir {m}/upper and workdir {m}/work on {}",
            disk.dev
        )),
        "{}",
        b.message
    );
    let w = find(&report, app, ProcessUseKind::OpenFile).expect("the container's process is found by its host pid");
    assert!(
        w.message.contains("app.db open for writing") && w.message.contains("(on overlay mounted at"),
        "{}",
        w.message
    );
    assert!(find(&report, app, ProcessUseKind::Cwd).is_some(), "{:#?}", messages(&report));
    // Where the usual tools look, nothing shows.
    assert!(!fuser_pids(&disk.dev).contains(&app), "fuser -m misses the container's process");
    assert!(!lsof_pids(&disk.dev).contains(&app), "lsof of the device misses it");
    assert!(!lsof_pids(mp.to_str().unwrap()).contains(&app), "lsof of the disk's mount point misses it");
}

/// Docker with a long layer list: every layer path relative to its storage driver's home, which mountinfo does not
/// show. Followed from the mount point's ancestors: the overlay is reported with its layers' full paths and the
/// home, and a process writing through it is found. `fuser -m` and `lsof` of the disk do not see that process.
#[test]
fn docker_overlays_with_relative_layer_paths_are_followed() {
    let _serial = serial();
    let mut disk = LoopDisk::new("ext4");
    let root = disk.mount_at("var lib docker");
    let (home, merged) = disk.docker_overlay(&root);
    let app = Holder::sh(&format!("exec 3>>'{}/app.log'", merged.display()));
    let report = disk.scan();
    let stacked = stacked_of(&report);
    assert_eq!(stacked.len(), 1, "{:#?}", messages(&report));
    let (b, mount) = stacked[0];
    let h = home.display();
    assert_eq!(mount.layers_relative_to, home.to_str().unwrap());
    let layers: Vec<(&str, String)> = mount.layers.iter().map(|l| (l.option.as_str(), l.path.clone())).collect();
    let full = |p: &str| format!("{h}/{p}");
    assert_eq!(
        layers,
        vec![
            ("lowerdir", full("l/L2")),
            ("lowerdir", full("l/L1")),
            ("upperdir", full("ctr/diff")),
            ("workdir", full("ctr/work")),
        ]
    );
    let named = format!(
        "its lowerdir {}, lowerdir {}, upperdir {} and workdir {} on {}",
        full("l/L2"),
        full("l/L1"),
        full("ctr/diff"),
        full("ctr/work"),
        disk.dev
    );
    assert!(b.message.contains(&named), "{}", b.message);
    let w = find(&report, app.pid(), ProcessUseKind::OpenFile).expect("the writer through Docker's overlay");
    assert!(
        w.message.contains("app.log open for writing") && w.message.contains("(on overlay mounted at"),
        "{}",
        w.message
    );
    assert!(!fuser_pids(&disk.dev).contains(&app.pid()), "fuser -m misses the writer");
    assert!(!lsof_pids(&disk.dev).contains(&app.pid()), "lsof of the device misses it");
}

/// containerd with a long lower list: its lower directories relative to the snapshots directory, the upper one
/// absolute. Every layer is named with its full path, the relative ones found from the upper one's ancestors.
#[test]
fn containerd_overlays_with_relative_lower_dirs_name_every_layer() {
    let _serial = serial();
    let mut disk = LoopDisk::new("ext4");
    let root = disk.mount_at("snapshotter");
    let rootfs = disk.containerd_overlay(&root);
    let report = disk.scan();
    let stacked = stacked_of(&report);
    assert_eq!(stacked.len(), 1, "{:#?}", messages(&report));
    let (_, mount) = stacked[0];
    assert_eq!(mount.mount_point, rootfs.to_str().unwrap());
    let snapshots = root.join("snapshots");
    assert_eq!(mount.layers_relative_to, snapshots.to_str().unwrap());
    let paths: Vec<String> = mount.layers.iter().map(|l| l.path.clone()).collect();
    let full = |p: &str| snapshots.join(p).display().to_string();
    assert_eq!(paths, [full("2/fs"), full("1/fs"), full("3/fs"), full("3/work")]);
}

/// A FUSE filesystem stacked on the disk: fuse-overlayfs (what rootless Podman mounts) with its layers on the disk.
/// mountinfo shows it without its layers, and the kernel does not say which process serves a FUSE mount, so a
/// process reading through it is not attributed to the disk; what holds the disk is the daemon, with each layer
/// directory open, and that is reported (as `fuser -m` does).
#[test]
fn a_fuse_overlay_daemon_with_its_layers_on_the_disk_is_found() {
    let _serial = serial();
    let mut disk = LoopDisk::new("ext4");
    let mp = disk.mount_at("containers");
    mkdirs(&mp, &["low", "up", "work"]);
    std::fs::write(mp.join("low/app.conf"), b"threads=4\n").unwrap();
    let merged = disk.dir.path().join("fuse-merged");
    std::fs::create_dir_all(&merged).unwrap();
    let (m, f) = (mp.display(), merged.display());
    sh(&format!("fuse-overlayfs -o lowerdir={m}/low,upperdir={m}/up,workdir={m}/work {f}"));
    disk.mounts.push(merged.clone());
    let daemon: i32 = sh(&format!("pgrep -n -f '^fuse-overlayfs .*{f}$'")).trim().parse().unwrap();
    // Held open through the scans: the daemon opens the lower file for each open through the mount and closes it
    // when the kernel's release reaches it, which comes after our close returns; a file read and closed here could
    // be open in one scan and gone in the next.
    let mut reader = std::fs::File::open(merged.join("app.conf")).unwrap();
    let mut text = String::new();
    std::io::Read::read_to_string(&mut reader, &mut text).unwrap();
    assert_eq!(text, "threads=4\n");

    let report = disk.scan();
    let held: BTreeSet<String> = report
        .blockers
        .iter()
        .filter(|b| matches!(&b.detail, Some(Detail::Process(p)) if p.pid == daemon))
        .map(|b| b.message.clone())
        .collect();
    for layer in ["low", "up", "low/app.conf"] {
        let path = format!("{m}/{layer}");
        assert!(held.iter().any(|b| b.contains(&format!("(pid {daemon}, uid 0) has {path} open"))), "{held:#?}");
    }
    drop(reader);
    let fuser = fuser_pids(&disk.dev);
    assert!(fuser.contains(&daemon), "fuser -m finds the daemon too: {fuser:?}");
    assert!(process_pids(&report).is_superset(&fuser), "and we find all fuser finds");
    assert_eq!(stacked_of(&report).len(), 0, "a FUSE mount names no layers to follow");
}

/// An overlay in this namespace with several lower directories (one with a space) on the disk, used in every way a
/// process can: an open file, its working and root directory, its program and a shared mapping. A second overlay
/// has only a lower layer on the disk and its upper one on tmpfs: its files carry per-layer device numbers no
/// mount names. `fuser -m` and `lsof` of the disk see none of these users.
#[test]
fn processes_using_files_through_overlays_are_found() {
    let _serial = serial();
    let mut disk = LoopDisk::new("ext4");
    let mp = disk.mount_at("data");
    mkdirs(&mp, &["low 1/bin", "low2", "up", "work"]);
    std::fs::copy("/usr/bin/busybox", mp.join("low 1/bin/busybox")).unwrap();
    std::fs::write(mp.join("low2/table"), vec![1u8; 8192]).unwrap();
    let (merged, split) = (disk.dir.path().join("merged"), disk.dir.path().join("split view"));
    let tmp = disk.dir.path().join("tmp");
    for d in [&merged, &split, &tmp] {
        std::fs::create_dir_all(d).unwrap();
    }
    let m = mp.display();
    sh(&format!(
        "mount -t overlay overlay -o 'lowerdir={m}/low 1:{m}/low2,upperdir={m}/up,workdir={m}/work' '{}'",
        merged.display()
    ));
    disk.mounts.push(merged.clone());
    sh(&format!("mount -t tmpfs tmpfs '{t}' && mkdir '{t}/u' '{t}/w'", t = tmp.display()));
    disk.mounts.insert(0, tmp.clone());
    sh(&format!(
        "mount -t overlay overlay -o 'lowerdir={m}/low2,upperdir={t}/u,workdir={t}/w' '{}'",
        split.display(),
        t = tmp.display()
    ));
    disk.mounts.push(split.clone());
    let r = merged.display();
    let writer = Holder::sh(&format!("exec 3>>'{r}/new file'"));
    let cwd = Holder::sh(&format!("cd '{r}'"));
    let rooted = Holder::start(
        "chroot",
        &[&r.to_string(), "/bin/busybox", "sh", "-c", "echo ready; exec /bin/busybox sleep 1000"],
    );
    let mapper = Holder::start(
        "/usr/bin/python3",
        &[
            "-c",
            &format!(
                "import mmap,time\nf=open('{r}/table','r+b')\nm=mmap.mmap(f.fileno(),0)\nf.close()\nprint('ready',flush=True)\ntime.sleep(1000)"
            ),
        ],
    );
    let split_reader = Holder::sh(&format!("exec 3<'{}/table'", split.display()));
    let report = disk.scan();
    let stacked = stacked_of(&report);
    let points: BTreeSet<&str> = stacked.iter().map(|(_, m)| m.mount_point.as_str()).collect();
    assert_eq!(points, BTreeSet::from([merged.to_str().unwrap(), split.to_str().unwrap()]), "{:#?}", messages(&report));
    let (split_b, _) = stacked.iter().find(|(_, m)| m.mount_point == split.to_str().unwrap()).unwrap();
    assert!(split_b.message.contains(&format!("its lowerdir {m}/low2 on {}", disk.dev)), "{}", split_b.message);
    assert!(!split_b.message.contains("upperdir"), "the upper layer is not on the disk: {}", split_b.message);

    let w = find(&report, writer.pid(), ProcessUseKind::OpenFile).expect("writer through the overlay");
    assert!(w.message.contains("new file open for writing"), "{}", w.message);
    assert!(find(&report, cwd.pid(), ProcessUseKind::Cwd).is_some(), "{:#?}", messages(&report));
    assert!(find(&report, rooted.pid(), ProcessUseKind::Root).is_some(), "{:#?}", messages(&report));
    assert!(find(&report, rooted.pid(), ProcessUseKind::Exe).is_some(), "{:#?}", messages(&report));
    let map = find(&report, mapper.pid(), ProcessUseKind::Mmap).expect("shared mapping through the overlay");
    assert!(map.message.contains("table"), "{}", map.message);
    let s = find(&report, split_reader.pid(), ProcessUseKind::OpenFile).expect("reader of a per-layer device number");
    assert!(s.message.contains("split view"), "{}", s.message);

    let overlay_users = BTreeSet::from([writer.pid(), cwd.pid(), rooted.pid(), split_reader.pid()]);
    let fuser = fuser_pids(&disk.dev);
    let lsof = lsof_pids(&disk.dev);
    assert!(fuser.is_disjoint(&overlay_users), "fuser -m misses them all: {fuser:?}");
    assert!(lsof.is_disjoint(&overlay_users), "lsof misses them all: {lsof:?}");
    assert!(process_pids(&report).is_superset(&fuser), "and we find all fuser finds");
}

/// How a generated process uses the disk, or does not.
#[derive(Debug, Clone, Copy, PartialEq)]
enum GeneratedUse {
    Reads,
    Writes,
    Cwd,
    Mmap,
    Exe,
    RawDevice,
    ReadsThroughOverlay,
    CwdInOverlay,
    Unrelated,
}

impl GeneratedUse {
    const ALL: [Self; 9] = [
        Self::Reads,
        Self::Writes,
        Self::Cwd,
        Self::Mmap,
        Self::Exe,
        Self::RawDevice,
        Self::ReadsThroughOverlay,
        Self::CwdInOverlay,
        Self::Unrelated,
    ];

    /// A process that uses `disk` this way (files under `mp`, an overlay at `merged`), the `i`th of its state.
    fn start(self, i: usize, disk: &LoopDisk, mp: &Path, merged: &Path) -> Holder {
        let (m, o) = (mp.display(), merged.display());
        std::fs::write(mp.join(format!("f{i}")), vec![1u8; 4096]).unwrap();
        match self {
            Self::Reads => Holder::sh(&format!("exec 3<'{m}/f{i}'")),
            Self::Writes => Holder::sh(&format!("exec 3>>'{m}/f{i}'")),
            Self::Cwd => Holder::sh(&format!("cd '{m}'")),
            Self::Mmap => Holder::start(
                "/usr/bin/python3",
                &[
                    "-c",
                    &format!(
                        "import mmap,time\nf=open('{m}/f{i}','rb')\nm=mmap.mmap(f.fileno(),0,prot=mmap.PROT_READ)\nf.close()\nprint('ready',flush=True)\ntime.sleep(1000)"
                    ),
                ],
            ),
            Self::Exe => {
                let program = mp.join(format!("sleep{i}"));
                std::fs::copy("/bin/sleep", &program).unwrap();
                let holder = Holder::start("sh", &["-c", &format!("echo ready; exec '{}' 1000", program.display())]);
                // Ready is said before the exec: wait for it, or one scan may see it and the other not.
                while std::fs::read_link(format!("/proc/{}/exe", holder.pid())).ok() != Some(program.clone()) {
                    std::thread::sleep(std::time::Duration::from_millis(5));
                }
                holder
            }
            Self::RawDevice => Holder::sh(&format!("exec 4<{}", disk.dev)),
            Self::ReadsThroughOverlay => Holder::sh(&format!("exec 3<'{o}/layered'")),
            Self::CwdInOverlay => Holder::sh(&format!("cd '{o}'")),
            Self::Unrelated => Holder::sh("exec 3</etc/hostname; cd /tmp"),
        }
    }
}

proptest::proptest! {
    #![proptest_config(proptest::test_runner::Config { cases: 12, failure_persistence: None, ..Default::default() })]

    /// Random process states on a random filesystem with an overlay stacked on it: the /proc and the BPF scans give
    /// the same report (LoopDisk::scan asserts it), which names every process that uses the disk and no other.
    #[test]
    fn random_process_states_get_the_same_report_from_both_scanners(
        fs in proptest::sample::select(vec!["ext4", "xfs", "btrfs"]),
        uses in proptest::collection::vec(proptest::sample::select(GeneratedUse::ALL.to_vec()), 1..8),
    ) {
        let _serial = serial();
        let mut disk = LoopDisk::new(fs);
        let mp = disk.mount_at("m");
        let m = mp.display();
        let merged = disk.dir.path().join("merged");
        sh(&format!(
            "mkdir -p '{m}/lower' '{m}/upper' '{m}/work' '{o}' && echo data > '{m}/lower/layered' && \
             mount -t overlay overlay -o 'lowerdir={m}/lower,upperdir={m}/upper,workdir={m}/work' '{o}'",
            o = merged.display()
        ));
        disk.mounts.push(merged.clone());
        let holders: Vec<(GeneratedUse, Holder)> =
            uses.iter().enumerate().map(|(i, u)| (*u, u.start(i, &disk, &mp, &merged))).collect();
        let report = disk.scan();
        let found = process_pids(&report);
        for (u, h) in &holders {
            let named = found.contains(&h.pid());
            proptest::prop_assert_eq!(named, *u != GeneratedUse::Unrelated, "{:?} (pid {}) in {:#?}", u, h.pid(), messages(&report));
        }
    }
}

/// Uses /proc shows under a thread alone: a files table of its own (`unshare(CLONE_FILES)`, holding a file and the
/// raw device), a working directory of its own (`unshare(CLONE_FS)`), and a process whose first thread has exited
/// (`pthread_exit` in `main`), whose file then only its other thread holds. `umount` says the disk is busy; `fuser -m` and `lsof` find none of them.
/// Every scan (/proc and every walk) names all three, each through its thread.
#[test]
fn uses_held_by_threads_apart_from_their_leader_are_found() {
    let _serial = serial();
    let mut disk = LoopDisk::new("ext4");
    let mp = disk.mount_at("m");
    std::fs::write(mp.join("data"), b"x").unwrap();
    let m = mp.display();
    let files = threaded_python(
        &format!(
            "    assert libc.unshare(0x400)==0\n    fd=os.open('{m}/data',os.O_RDWR)\n    raw=os.open('{}',os.O_RDONLY)",
            disk.dev
        ),
        "",
    );
    let dirs = threaded_python(&format!("    assert libc.unshare(0x200)==0\n    os.chdir('{m}')"), "");
    let orphaned = threaded_python(&format!("    fd=os.open('{m}/data',os.O_RDONLY)"), "libc.pthread_exit(None)");
    wait_for_exited_leader(orphaned.pid());
    let busy = Command::new("umount").arg(&mp).output().unwrap();
    assert!(!busy.status.success() && String::from_utf8_lossy(&busy.stderr).contains("busy"), "{busy:?}");
    let holders = BTreeSet::from([files.pid(), dirs.pid(), orphaned.pid()]);
    assert!(fuser_pids(&disk.dev).is_disjoint(&holders), "fuser -m finds threads' uses now: adjust this test");
    assert!(lsof_pids(&m.to_string()).is_disjoint(&holders), "lsof finds threads' uses now: adjust this test");

    let report = assert_superset_of_oracles(&disk);
    let thread_of = |pid: i32, kind: ProcessUseKind| {
        let b =
            find(&report, pid, kind).unwrap_or_else(|| panic!("pid {pid} {kind:?} found: {:#?}", messages(&report)));
        let Some(Detail::Process(p)) = &b.detail else { unreachable!() };
        assert!(p.thread > 0 && p.thread != pid, "{:?}", p);
        assert!(b.message.contains(&format!("in its thread {}", p.thread)), "{}", b.message);
        (b.message.clone(), p.clone())
    };
    let (message, p) = thread_of(files.pid(), ProcessUseKind::OpenFile);
    assert!(message.contains("/data open for writing") && p.writable && p.fd >= 0, "{message}");
    let (message, _) = thread_of(files.pid(), ProcessUseKind::BlockDevice);
    assert!(message.contains(&format!("the block device {} open for reading", disk.dev)), "{message}");
    let (message, _) = thread_of(dirs.pid(), ProcessUseKind::Cwd);
    assert!(message.contains(&format!("working directory at {m}")), "{message}");
    let (message, p) = thread_of(orphaned.pid(), ProcessUseKind::OpenFile);
    assert!(message.contains("/data open for reading"), "{message}");
    assert!(p.cmdline.starts_with("/usr/bin/python3 -c"), "the command line, read through the thread: {:?}", p.cmdline);

    // Each walk says a thread holds it apart, so the process is read whole, threads included.
    let devices = BTreeSet::from([stat(disk.dev.as_str()).unwrap().st_rdev, stat(&mp).unwrap().st_dev]);
    for source in common::bpf_walks() {
        let candidates = source.candidates(Path::new("/proc"), &devices).unwrap();
        for &pid in &holders {
            let c = candidates.iter().find(|c| c.pid == pid);
            assert_eq!(c, Some(&Candidate::whole(pid)), "{}: {candidates:?}", source.description());
        }
    }
}

/// Mounts in mount namespaces that only threads are in: one a thread unshared for itself (`unshare(CLONE_NEWNS)`
/// in one thread, as a Go program does on a locked OS thread), and a process's own whose first thread has exited.
/// `/proc/<pid>/mountinfo` shows neither (the first is the thread's alone, the second went with the first thread):
/// `findmnt`, in the host's namespace or in the process's (`-N`), lists neither; only `/proc/<pid>/task/<tid>` has
/// them. Every scan (/proc and every walk) reports both, each with the thread it is seen through.
#[test]
fn mounts_in_namespaces_only_threads_are_in_are_found() {
    let _serial = serial();
    let disk = LoopDisk::new("ext4");
    let points = tempfile::tempdir().unwrap();
    let (own, gone) = (points.path().join("own"), points.path().join("gone"));
    mkdirs(points.path(), &["own", "gone"]);
    let mount = |at: &Path| format!("    assert libc.mount(b'{}',b'{}',b'ext4',0,None)==0", disk.dev, at.display());
    // MS_REC | MS_PRIVATE: the thread's mount stays in its namespace.
    let own_ns = threaded_python(
        &format!(
            "    assert libc.unshare(0x20000)==0\n    assert libc.mount(b'none',b'/',None,0x44000,None)==0\n{}",
            mount(&own)
        ),
        "",
    );
    let gone_ns =
        threaded_python_under(&["unshare", "-m", "--propagation", "private"], &mount(&gone), "libc.pthread_exit(None)");
    wait_for_exited_leader(gone_ns.pid());
    assert!(findmnt_targets(&disk.dev).is_empty(), "mounted in the host's namespace");
    for holder in [&own_ns, &gone_ns] {
        let listed =
            Command::new("findmnt").args(["-n", "-N", &holder.pid().to_string(), "-S", &disk.dev]).output().unwrap();
        assert!(listed.stdout.is_empty(), "findmnt -N {} lists it now: adjust this test", holder.pid());
    }

    let report = disk.scan();
    assert!(report.in_use, "{:#?}", messages(&report));
    for (holder, point) in [(&own_ns, &own), (&gone_ns, &gone)] {
        let (pid, thread) = (holder.pid(), other_threads(holder.pid())[0]);
        let b = report
            .blockers
            .iter()
            .find(|b| matches!(&b.detail, Some(Detail::Mount(m)) if m.namespace_pid == pid))
            .unwrap_or_else(|| panic!("the mount seen through pid {pid} found: {:#?}", messages(&report)));
        let Some(Detail::Mount(m)) = &b.detail else { unreachable!() };
        assert_eq!(
            (m.namespace_thread, m.mount_point.as_str(), m.host_namespace),
            (thread, point.to_str().unwrap(), false)
        );
        assert!(b.message.contains(&format!("(of thread {thread} of pid {pid}, python3)")), "{}", b.message);
        // What the report says to enter it with does: findmnt -N with the thread.
        let listed = Command::new("findmnt")
            .args(["-n", "-o", "TARGET", "-N", &thread.to_string(), "-S", &disk.dev])
            .output()
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&listed.stdout).trim(), point.to_str().unwrap());
    }
}
