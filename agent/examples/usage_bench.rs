//! Benchmark: our usage scan, with each process source (/proc and the in-kernel BPF iterators, walking per process,
//! with mappings read from their maple tree as the agent does or through the VMA iterator, and per element), against
//! `fuser -m <dev>` and `lsof <mountpoint>` on the same system state.
//!
//! Builds a loop-mounted ext4 with an overlay stacked on it (its layers on the ext4, as a container engine's are)
//! and N processes with M open fds each; 5% of them hold a file on the loop mount, 1% more one through the
//! overlay, the rest only unrelated files. Times each (median of several runs, ours in alternation so that a load
//! that comes and goes weighs on all alike), and our /proc scan again without its stacked-mount analysis (what that
//! analysis costs); checks that both our sources give the same processes and that fuser and lsof find nothing we
//! miss, and counts the users through the overlay each finds.
//!
//! Run as root: `cargo run --release -p wukong-agent --example usage_bench [PROCSxFDS]...`
//! (default sweep: 500x20 2000x20 4000x20 2000x40 2500x40, the last 100,000 open fds).

use std::collections::BTreeSet;
use std::io::Write;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use wukong_agent::roots::HostRoots;
use wukong_agent::usage::{
    ALL_ANALYSES, Analyses, BpfSource, Mappings, ProcessSource, ProcfsSource, Walk, process_pids, scan_now_with,
};
use wukong_proto::v1::Disk;

const RUNS: usize = 9;

struct Setup {
    dir: tempfile::TempDir,
    dev: String,
    mount: std::path::PathBuf,
    overlay: std::path::PathBuf,
}

impl Setup {
    fn new() -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let image = dir.path().join("disk.img");
        std::fs::File::create(&image).unwrap().set_len(256 << 20).unwrap();
        let dev = run(&format!("losetup -f --show {}", image.display())).trim().to_string();
        run(&format!("mkfs.ext4 -q -F {dev}"));
        let mount = dir.path().join("mnt");
        std::fs::create_dir(&mount).unwrap();
        run(&format!("mount {dev} {}", mount.display()));
        std::fs::write(mount.join("held"), b"data").unwrap();
        let m = mount.display();
        run(&format!("mkdir {m}/lower {m}/upper {m}/work && echo data > {m}/lower/layered"));
        let overlay = dir.path().join("merged");
        std::fs::create_dir(&overlay).unwrap();
        run(&format!(
            "mount -t overlay overlay -o lowerdir={m}/lower,upperdir={m}/upper,workdir={m}/work {}",
            overlay.display()
        ));
        Self { dir, dev, mount, overlay }
    }
}

impl Drop for Setup {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.overlay).status();
        let _ = Command::new("umount").arg("-l").arg(&self.mount).status();
        let _ = Command::new("losetup").arg("-d").arg(&self.dev).status();
        let _ = self.dir.path();
    }
}

fn run(script: &str) -> String {
    let out = Command::new("sh").arg("-c").arg(script).output().expect("sh");
    assert!(out.status.success(), "{script}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Starts `procs` sleeping processes with `fds` open files each; every 20th holds the file on the mount, and
/// every 100th (offset by 10) one through the overlay. Returns the processes, the PIDs that hold the mount and
/// those that hold it through the overlay.
fn spawn_processes(setup: &Setup, procs: usize, fds: usize) -> (Vec<Child>, BTreeSet<i32>, BTreeSet<i32>) {
    let unrelated = setup.dir.path().join("unrelated");
    std::fs::write(&unrelated, b"x").unwrap();
    let mut children = Vec::with_capacity(procs);
    let mut holders = BTreeSet::new();
    let mut stacked = BTreeSet::new();
    for i in 0..procs {
        let holds = i % 20 == 0;
        let through_overlay = i % 100 == 10;
        let mut redirs = String::new();
        for fd in 3..3 + fds {
            let file = match fd {
                3 if holds => setup.mount.join("held"),
                3 if through_overlay => setup.overlay.join("layered"),
                _ => unrelated.clone(),
            };
            redirs.push_str(&format!("exec {fd}<'{}'\n", file.display()));
        }
        let child = Command::new("bash")
            .arg("-c")
            .arg(format!("{redirs}echo ready\nexec sleep 100000"))
            .stdout(Stdio::piped())
            .stdin(Stdio::null())
            .spawn()
            .expect("spawn");
        if holds {
            holders.insert(child.id() as i32);
        }
        if through_overlay {
            stacked.insert(child.id() as i32);
        }
        children.push(child);
    }
    // All were started at once; now wait until each has opened its files.
    for c in children.iter_mut() {
        use std::io::Read;
        let mut ready = [0u8; 6];
        c.stdout.take().expect("piped").read_exact(&mut ready).expect("the process reports ready");
    }
    (children, holders, stacked)
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn time<T>(f: impl Fn() -> T) -> (Duration, T) {
    let mut times = Vec::new();
    let mut last = None;
    for _ in 0..RUNS {
        let t = Instant::now();
        last = Some(f());
        times.push(t.elapsed());
    }
    (median(times), last.expect("RUNS > 0"))
}

/// PIDs from `lsof` output (second column, after a header line).
fn lsof_pids(text: &str) -> BTreeSet<i32> {
    text.lines().skip(1).filter_map(|l| l.split_whitespace().nth(1)?.parse().ok()).collect()
}

fn main() {
    assert!(nix::unistd::geteuid().is_root(), "the benchmark needs root (loop devices, mounts)");
    let args: Vec<String> = std::env::args().skip(1).collect();
    let configs: Vec<(usize, usize)> = if args.is_empty() {
        vec![(500, 20), (2000, 20), (4000, 20), (2000, 40), (2500, 40)]
    } else {
        args.iter()
            .map(|a| {
                let (p, f) = a.split_once('x').expect("configurations look like 2000x20");
                (p.parse().expect("process count"), f.parse().expect("fd count"))
            })
            .collect()
    };
    let bpf = BpfSource::load(&HostRoots::default()).expect("the BPF iterators load (root, kernel 5.12+, BTF)");
    let per_element = BpfSource::load_walk(&HostRoots::default(), Some(Walk::PerElement))
        .expect("the per-element iterators load (root, kernel 5.12+, BTF)");
    // The agent's walk with every mapping read through the VMA iterator: what reading the maple tree saves.
    let by_iterator = match bpf.walk() {
        Walk::PerProcess { shards, .. } => {
            BpfSource::load_walk(&HostRoots::default(), Some(Walk::PerProcess { shards, mappings: Mappings::Iterator }))
                .expect("the per-process walk loads with the VMA iterator")
        }
        Walk::PerElement => BpfSource::load_walk(&HostRoots::default(), Some(Walk::PerElement))
            .expect("the per-element iterators load (root, kernel 5.12+, BTF)"),
    };
    println!(
        "usage scan vs fuser -m and lsof, median of {RUNS} runs, {} cores; bpf: {}; bpf/vma: {}; bpf/elem: {}",
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        bpf.description(),
        by_iterator.description(),
        per_element.description()
    );
    println!(
        "{:>6} {:>4} {:>9} {:>9} {:>9} {:>9} {:>11} {:>9} {:>9} {:>8} {:>9} {:>11} {:>10} {:>11}  agree",
        "procs",
        "fds",
        "bpf",
        "bpf/vma",
        "bpf/elem",
        "procfs",
        "w/o stacked",
        "fuser -m",
        "lsof",
        "vma/bpf",
        "elem/bpf",
        "procfs/bpf",
        "fuser/bpf",
        "lsof/bpf"
    );
    for (procs, fds) in configs {
        let setup = Setup::new();
        let (mut children, expected, stacked) = spawn_processes(&setup, procs, fds);
        let disk = {
            let name = setup.dev.trim_start_matches("/dev/").to_string();
            Disk { kernel_name: name.clone(), id: name, ..Disk::default() }
        };
        let roots = HostRoots::default();
        let pids = |reports: &[wukong_proto::v1::UsageReport]| process_pids(&reports[0]);
        let without_stacked = Analyses { stacked_mounts: false };
        let ways: [(&dyn ProcessSource, Analyses); 5] = [
            (&bpf, ALL_ANALYSES),
            (&by_iterator, ALL_ANALYSES),
            (&per_element, ALL_ANALYSES),
            (&ProcfsSource, ALL_ANALYSES),
            (&ProcfsSource, without_stacked),
        ];
        let mut times = [Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new()];
        let mut last = [None, None, None, None, None];
        for _ in 0..RUNS {
            for (i, (source, analyses)) in ways.iter().enumerate() {
                let t = Instant::now();
                let disks = std::slice::from_ref(&disk);
                last[i] =
                    Some(scan_now_with(&roots, disks, Duration::from_secs(60), *analyses, *source).expect("scan"));
                times[i].push(t.elapsed());
            }
        }
        let [bpf_t, iterator_t, element_t, procfs_t, without_t] = times.map(median);
        let [by_bpf, by_iterator_pids, by_elements, ours, without] = last.map(|r| pids(&r.expect("RUNS > 0")));
        let (fuser_t, fuser_out) =
            time(|| Command::new("fuser").arg("-m").arg(&setup.dev).stderr(Stdio::null()).output().unwrap());
        // fuser prints PIDs (with access letters such as "c" or "m") on stdout, the names on stderr.
        let fuser: BTreeSet<i32> = String::from_utf8_lossy(&fuser_out.stdout)
            .split_whitespace()
            .filter_map(|w| w.trim_end_matches(char::is_alphabetic).parse().ok())
            .collect();
        let (lsof_t, lsof_out) =
            time(|| Command::new("lsof").arg("-w").arg(&setup.mount).stderr(Stdio::null()).output().unwrap());
        let lsof = lsof_pids(&String::from_utf8_lossy(&lsof_out.stdout));
        let agree = by_bpf == ours
            && by_iterator_pids == ours
            && by_elements == ours
            && expected.is_subset(&ours)
            && stacked.is_subset(&ours)
            && fuser.is_subset(&ours)
            && lsof.is_subset(&ours);
        let through = |found: &BTreeSet<i32>| found.intersection(&stacked).count();
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        let ratio = |d: Duration| d.as_secs_f64() / bpf_t.as_secs_f64();
        println!(
            "{procs:>6} {fds:>4} {:>7.1}ms {:>7.1}ms {:>7.1}ms {:>7.1}ms {:>9.1}ms {:>7.1}ms {:>7.1}ms {:>7.1}x {:>8.1}x {:>10.1}x {:>9.1}x {:>10.1}x  {} (bpf {}, bpf/vma {}, bpf/elem {}, procfs {}, fuser {}, lsof {}, expected {}; through the overlay: ours {}, without the analysis {}, fuser {}, lsof {}, of {})",
            ms(bpf_t),
            ms(iterator_t),
            ms(element_t),
            ms(procfs_t),
            ms(without_t),
            ms(fuser_t),
            ms(lsof_t),
            ratio(iterator_t),
            ratio(element_t),
            ratio(procfs_t),
            ratio(fuser_t),
            ratio(lsof_t),
            if agree { "yes" } else { "NO" },
            by_bpf.len(),
            by_iterator_pids.len(),
            by_elements.len(),
            ours.len(),
            fuser.len(),
            lsof.len(),
            expected.len() + stacked.len(),
            through(&ours),
            through(&without),
            through(&fuser),
            through(&lsof),
            stacked.len()
        );
        std::io::stdout().flush().ok();
        for c in children.iter_mut() {
            let _ = c.kill();
        }
        for c in children.iter_mut() {
            let _ = c.wait();
        }
        assert!(
            agree,
            "the tools disagree on the PIDs: bpf {by_bpf:?}, bpf/vma {by_iterator_pids:?}, bpf/elem {by_elements:?}, procfs {ours:?}, fuser {fuser:?}, lsof {lsof:?}"
        );
    }
}
