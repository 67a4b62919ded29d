//! The real binary at start: it refuses at once, in one line that names the path, what it cannot use (a state
//! directory another agent holds, a socket another agent serves, a state directory that is a file or read-only, a
//! missing or invalid configuration file), touching nothing of another agent; and it says so when no udev daemon
//! runs instead of silently reporting no disks. Needs root (a read-only bind mount); without it these tests fail.

mod common;

use common::binary::{AgentProcess, run_to_exit, run_to_exit_under};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use wukong_agent::instance::LOCK_FILE;
use wukong_agent::release::journal::{Fence, Journal, Record};
use wukong_controller_client::agent_client::{AgentAddress, AgentClient};
use wukong_proto::v1::Disk;

/// Flags for an agent whose every file is under `dir`: loopback TCP on any port, its socket and state directory.
fn flags(socket: &Path, state_dir: &Path) -> Vec<String> {
    vec![
        "--listen".into(),
        "127.0.0.1:0".into(),
        "--socket".into(),
        socket.display().to_string(),
        "--state-dir".into(),
        state_dir.display().to_string(),
    ]
}

/// Every file of a directory with its content.
fn contents(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .map(|p| (p.clone(), std::fs::read(&p).unwrap()))
        .collect()
}

async fn answers(socket: &Path) {
    let client = AgentClient::connect(AgentAddress::Unix(socket.to_path_buf())).unwrap();
    let info = client.agent_info().await.expect("the first agent still answers on its socket");
    assert_eq!(info.version, env!("CARGO_PKG_VERSION"));
}

/// A refused start: non-zero exit before ready, and its last line of stderr, the error, which is said once.
fn refusal(status: ExitStatus, stderr: &str) -> &str {
    assert!(!status.success(), "the agent started; stderr:\n{stderr}");
    assert!(!stderr.contains("ready"), "{stderr}");
    let last = stderr.lines().rfind(|l| !l.trim().is_empty()).expect("an error on stderr");
    assert_eq!(stderr.matches(last).count(), 1, "said once:\n{stderr}");
    last
}

/// A start refused before anything else was done: the error is the only line on stderr.
fn refused(status: ExitStatus, stderr: &str) -> &str {
    let line = refusal(status, stderr);
    assert_eq!(stderr.trim(), line, "exactly one line:\n{stderr}");
    line
}

#[tokio::test(flavor = "multi_thread")]
async fn a_second_agent_on_the_same_state_dir_exits_and_touches_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (socket, state) = (dir.path().join("agent.sock"), dir.path().join("state"));
    let first = AgentProcess::start(&flags(&socket, &state));
    // A release in progress, as the first agent would journal it: a second agent that replayed the journal would
    // undo it and remove the record.
    let disk = Disk { id: "stray-1".into(), serial: "stray-1".into(), kernel_name: "sdz".into(), ..Disk::default() };
    Journal::new(Some(state.clone())).save(&Record::new(&disk, Fence::ReadOnly { devices: Vec::new() }));
    let before = contents(&state);

    let (status, stderr) = run_to_exit(&flags(&socket, &state));
    assert_eq!(
        refused(status, &stderr),
        format!(
            "wukong-agent: another wukong-agent (pid {}) holds {}; stop it first or give this one another --state-dir",
            first.pid(),
            state.join(LOCK_FILE).display()
        )
    );
    assert!(socket.exists(), "the first agent's socket is still there");
    answers(&socket).await;
    assert_eq!(contents(&state), before, "the journal and the lock file are unchanged");
    first.stop();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_second_agent_with_its_own_state_dir_does_not_take_a_served_socket() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("agent.sock");
    let first = AgentProcess::start(&flags(&socket, &dir.path().join("first")));
    let (status, stderr) = run_to_exit(&flags(&socket, &dir.path().join("second")));
    // This agent has its own state directory, so it starts (and logs) until it reaches the socket.
    assert_eq!(
        refusal(status, &stderr),
        format!(
            "wukong-agent: {} is served by another running process (another wukong-agent?); stop it or choose \
             another --socket path",
            socket.display()
        )
    );
    answers(&socket).await;
    first.stop();
}

#[test]
fn a_file_in_place_of_the_state_dir_is_refused_before_ready() {
    let dir = tempfile::tempdir().unwrap();
    let (socket, state) = (dir.path().join("agent.sock"), dir.path().join("state"));
    std::fs::write(&state, b"not a directory").unwrap();
    let (status, stderr) = run_to_exit(&flags(&socket, &state));
    assert_eq!(
        refused(status, &stderr),
        format!(
            "wukong-agent: the state directory {} is not a directory; remove it or give another --state-dir",
            state.display()
        )
    );
    assert!(!socket.exists(), "nothing was served");
    assert_eq!(std::fs::read(&state).unwrap(), b"not a directory");
}

/// A directory made read-only by a read-only bind mount of itself (root ignores permission bits); unmounted on drop.
struct ReadOnlyDir(PathBuf);

impl ReadOnlyDir {
    fn new(path: PathBuf) -> Self {
        assert!(nix::unistd::geteuid().is_root(), "a read-only bind mount needs root; run as root");
        std::fs::create_dir_all(&path).unwrap();
        common::sh(&format!("mount --bind '{0}' '{0}' && mount -o remount,bind,ro '{0}'", path.display()));
        Self(path)
    }
}

impl Drop for ReadOnlyDir {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
    }
}

#[test]
fn a_read_only_state_dir_is_refused_before_ready() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("agent.sock");
    let read_only = ReadOnlyDir::new(dir.path().join("ro"));
    for state in [read_only.0.clone(), read_only.0.join("releases")] {
        let (status, stderr) = run_to_exit(&flags(&socket, &state));
        let line = refused(status, &stderr);
        assert!(
            line.starts_with(&format!("wukong-agent: the state directory {} is not usable: ", state.display())),
            "{line}"
        );
        assert!(line.contains("Read-only file system") && line.ends_with("--state-dir"), "{line}");
        assert!(!socket.exists(), "nothing was served");
    }
}

#[test]
fn a_missing_or_invalid_config_file_is_reported_once() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.toml");
    let (status, stderr) = run_to_exit(&["--config".to_string(), missing.display().to_string()]);
    assert_eq!(
        refused(status, &stderr),
        format!(
            "wukong-agent: cannot read the configuration file {}: No such file or directory (os error 2)",
            missing.display()
        )
    );
    let invalid = dir.path().join("agent.toml");
    std::fs::write(&invalid, "# the agent\nlisten = [\"127.0.0.1\"]\nlisen = 3\n").unwrap();
    let (status, stderr) = run_to_exit(&["--config".to_string(), invalid.display().to_string()]);
    let line = refused(status, &stderr);
    assert!(
        line.starts_with(&format!(
            "wukong-agent: the configuration file {} is not valid at line 3: ",
            invalid.display()
        )),
        "{line}"
    );
    assert!(line.contains("unknown field `lisen`"), "{line}");
}

/// A configuration file whose only setting is where `/run` is.
fn with_run_root(dir: &Path, run: &Path) -> Vec<String> {
    let config = dir.join("agent.toml");
    std::fs::write(&config, format!("run_root = {:?}\n", run.display().to_string())).unwrap();
    let mut args = flags(&dir.join("agent.sock"), &dir.join("state"));
    args.extend(["--config".to_string(), config.display().to_string()]);
    args
}

#[test]
fn without_a_udev_daemon_the_agent_warns_that_it_will_see_no_disks() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    std::fs::create_dir_all(&run).unwrap();
    let agent = AgentProcess::start(&with_run_root(dir.path(), &run));
    let line = agent.wait_for_line("no udev daemon found");
    assert!(line.contains("WARN"), "{line}");
    assert!(
        line.contains(&format!(
            "no udev daemon found ({}/udev/control is missing); disks will not be seen until systemd-udevd runs in \
             this guest",
            run.display()
        )),
        "{line}"
    );
    agent.stop();

    // With udev's control socket there, no warning.
    std::fs::create_dir_all(run.join("udev")).unwrap();
    drop(std::os::unix::net::UnixListener::bind(run.join("udev/control")).unwrap());
    let agent = AgentProcess::start(&with_run_root(dir.path(), &run));
    let log = agent.stop();
    assert!(!log.contains("udev daemon"), "{log}");
}

/// The agent's report of its usage scanner.
async fn scanner(socket: &Path) -> (String, String) {
    let client = AgentClient::connect(AgentAddress::Unix(socket.to_path_buf())).unwrap();
    let info = client.agent_info().await.unwrap();
    (info.usage_scanner, info.usage_scanner_reason)
}

/// Where it can (root, this machine's 6.18 with BTF), the agent finds processes with the BPF iterators, walking
/// per process (Linux 6.7+), and says so; told to, it reads /proc.
#[tokio::test(flavor = "multi_thread")]
async fn the_usage_scanner_is_bpf_where_it_loads_and_procfs_when_chosen() {
    let dir = tempfile::tempdir().unwrap();
    let (socket, state) = (dir.path().join("agent.sock"), dir.path().join("state"));
    let agent = AgentProcess::start(&flags(&socket, &state));
    let (name, reason) = scanner(&socket).await;
    assert_eq!(name, "bpf", "{reason}");
    assert!(reason.starts_with("BPF iterators loaded, a walk per process"), "{reason}");
    assert!(reason.contains(" (kernel 6."), "{reason}");
    agent.stop();
    let mut procfs = flags(&socket, &state);
    procfs.extend(["--usage-scanner".into(), "procfs".into()]);
    let agent = AgentProcess::start(&procfs);
    assert_eq!(scanner(&socket).await, ("procfs".into(), "configured (usage_scanner = procfs)".into()));
    agent.stop();
}

/// Without the privileges BPF needs (CAP_SYS_ADMIN, CAP_BPF and CAP_PERFMON dropped from the bounding set), the
/// agent scans /proc, logs why once, and GetAgentInfo says why; asked for BPF there, it does not start.
#[tokio::test(flavor = "multi_thread")]
async fn without_bpf_privileges_the_scan_reads_proc_and_says_why() {
    let unprivileged = ["setpriv", "--bounding-set=-sys_admin,-bpf,-perfmon", "--"];
    let dir = tempfile::tempdir().unwrap();
    let (socket, state) = (dir.path().join("agent.sock"), dir.path().join("state"));
    let agent = AgentProcess::start_under(&unprivileged, &flags(&socket, &state));
    let (name, reason) = scanner(&socket).await;
    assert_eq!(name, "procfs", "{reason}");
    assert!(
        reason.starts_with("the in-kernel (BPF) usage scan is unavailable: ")
            && reason.contains("CAP_BPF and CAP_PERFMON"),
        "{reason}"
    );
    let log = agent.stop();
    assert_eq!(log.matches("the in-kernel (BPF) usage scan is unavailable").count(), 1, "logged once:\n{log}");

    let mut forced = flags(&socket, &state);
    forced.extend(["--usage-scanner".into(), "bpf".into()]);
    let (status, stderr) = run_to_exit_under(&unprivileged, &forced);
    let error = refusal(status, &stderr);
    assert!(
        error.starts_with("wukong-agent: the in-kernel (BPF) usage scan is unavailable: ")
            && error.contains("--usage-scanner auto"),
        "{error}"
    );
}
