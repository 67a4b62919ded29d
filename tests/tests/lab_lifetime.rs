//! The lab's processes end with the process that started them, however it ends: a benchmark built in release
//! aborts on a panic (no `Drop` runs), and a test can be killed. Every lab process joins one process group whose
//! keeper kills it when its starter is gone (`wukong_e2e::process`).

use anyhow::{Context, Result, ensure};
use std::collections::BTreeSet;
use std::time::{Duration, Instant};
use wukong_e2e::process::{LabProcess, is_alive};

#[test]
fn a_lab_whose_starter_aborts_leaves_no_process_behind() -> Result<()> {
    let run = std::process::Command::new(env!("CARGO_BIN_EXE_lab-abort"))
        .stdin(std::process::Stdio::null())
        .output()
        .context("running lab-abort")?;
    let stderr = String::from_utf8_lossy(&run.stderr);
    ensure!(stderr.contains("dying on purpose"), "lab-abort did not get to its panic: {stderr}");
    // SIGABRT: no unwinding, as in a release build.
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(run.status.signal(), Some(6), "lab-abort aborted: {:?}", run.status);

    let lab: Vec<LabProcess> = String::from_utf8(run.stdout)?
        .lines()
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
            return Ok(());
        }
        assert!(Instant::now() < deadline, "lab processes survived their starter: {survivors:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}
