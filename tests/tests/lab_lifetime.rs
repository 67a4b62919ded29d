//! The lab's processes end with the process that started them, however it ends: a benchmark built in release
//! aborts on a panic (no `Drop` runs), and a test can be killed. Every lab process joins one process group whose
//! keeper kills it when its starter is gone, and every lab directory is made in one that a cleaner removes then
//! (`wukong_e2e::process`).

use anyhow::{Context, Result, ensure};
use std::collections::BTreeSet;
use std::time::{Duration, Instant};
use wukong_e2e::process::{LabProcess, is_alive};

#[test]
fn a_lab_whose_starter_aborts_leaves_no_process_and_no_file_behind() -> Result<()> {
    let run = std::process::Command::new(env!("CARGO_BIN_EXE_lab-abort"))
        .stdin(std::process::Stdio::null())
        .output()
        .context("running lab-abort")?;
    let stderr = String::from_utf8_lossy(&run.stderr);
    ensure!(stderr.contains("dying on purpose"), "lab-abort did not get to its panic: {stderr}");
    // SIGABRT: no unwinding, as in a release build.
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(run.status.signal(), Some(6), "lab-abort aborted: {:?}", run.status);

    let stdout = String::from_utf8(run.stdout)?;
    let mut lines = stdout.lines();
    let dir = std::path::PathBuf::from(lines.next().context("lab-abort printed its lab directory")?);
    ensure!(
        dir.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("wukong-lab-")),
        "lab-abort's first line is its lab directory: {}",
        dir.display()
    );
    let lab: Vec<LabProcess> = lines
        .map(|line| {
            let mut fields = line.splitn(3, ' ');
            let (pid, started, name) = (fields.next(), fields.next(), fields.next());
            Ok(LabProcess {
                pid: pid.context("a pid")?.parse()?,
                started: started.context("a start time")?.parse()?,
                name: name.context("a name")?.to_string(),
                state: 'R',
            })
        })
        .collect::<Result<_>>()?;
    let names: BTreeSet<&str> = lab.iter().map(|p| p.name.as_str()).collect();
    for expected in ["etcd", "kube-apiserver", "wukong-operator", "qemu-system-x86", "sh"] {
        assert!(names.contains(expected), "{expected} is in the lab's process group: {names:?}");
    }

    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let survivors: Vec<&LabProcess> = lab.iter().filter(|p| is_alive(p)).collect();
        if survivors.is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "lab processes survived their starter: {survivors:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
    // The cleaner waits until the group's processes are gone (at most 10 s, for zombies nobody reaps), then removes
    // the cluster's etcd data and logs, the guest's sockets and logs, the operator's log.
    let deadline = Instant::now() + Duration::from_secs(15);
    while dir.exists() {
        let left: Vec<_> =
            std::fs::read_dir(&dir).map(|d| d.flatten().map(|e| e.file_name()).collect()).unwrap_or_default();
        assert!(Instant::now() < deadline, "the lab directory {} outlived its starter, with {left:?}", dir.display());
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}
