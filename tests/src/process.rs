//! A lab process that a fault test can kill and start again exactly as it was: its [`Command`] (program,
//! arguments, environment, and its log file as stderr) is built once and kept, so a restart cannot drift from the
//! first start. A `Command` spawns any number of times; a log given as a file is the same open file each time, so
//! a restarted process appends to what the killed one wrote.
//!
//! Every lab process (etcd, kube-apiserver, operators, QEMU and its vsock backend, agents on the host, the node's
//! daemons) joins one process group, [`lab_group`], whose keeper kills the whole group when this process ends,
//! however it ends: `Drop` does not run when a release build's panic aborts, or when the process is killed. Every
//! lab directory (a cluster's, a guest's, a node's, the operators' logs) is made in one directory, [`lab_dir`], that
//! a cleaner removes then, for the same reason.

use anyhow::{Context, Result};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::OnceLock;

/// What outlives this process to undo its lab: the keeper's process group, and the directory the cleaner removes.
struct Keeper {
    group: i32,
    dir: PathBuf,
}

/// The keeper and the cleaner wait for the end of a pipe only this process can write to; the kernel closes it when
/// this process exits, aborts or is killed. The keeper (a shell, the group's leader) then kills its group; the
/// cleaner, in a group of its own so that it outlives that kill, waits until no process of the group runs (at most
/// 10 s: a dead process whose parent never reaps it stays a zombie) and removes the lab directory, never crossing
/// into a filesystem mounted under it (a node's container mounts). One keeper per test or benchmark process.
fn keeper() -> Result<&'static Keeper> {
    static KEEPER: OnceLock<std::result::Result<Keeper, String>> = OnceLock::new();
    KEEPER.get_or_init(start_keeper).as_ref().map_err(|e| anyhow::Error::msg(e.clone()))
}

fn start_keeper() -> std::result::Result<Keeper, String> {
    const CLEANER: &str = r#"cat >/dev/null
i=0
while [ "$i" -lt 100 ] && pgrep -g "$1" -r R,S,D,T >/dev/null; do sleep 0.1; i=$((i + 1)); done
rm -rf --one-file-system -- "$2""#;
    let dir = tempfile::Builder::new()
        .prefix("wukong-lab-")
        .tempdir()
        .map_err(|e| format!("cannot make the lab directory in {}: {e}", std::env::temp_dir().display()))?
        .keep();
    // close-on-exec: no child inherits the write end, or the pipe would outlive this process.
    let (reader, writer) = std::io::pipe().map_err(|e| format!("cannot make the lab keeper's pipe: {e}"))?;
    let cleaners = reader.try_clone().map_err(|e| format!("cannot share the lab keeper's pipe: {e}"))?;
    let keeper = watch_pipe("keeper", "cat >/dev/null; kill -KILL 0", &[], reader)?;
    let group = keeper.id() as i32;
    watch_pipe("cleaner", CLEANER, &[group.to_string().as_ref(), dir.as_os_str()], cleaners)?;
    // Held until this process ends: the kernel closes it then, and that is the keeper's signal.
    std::mem::forget(writer);
    Ok(Keeper { group, dir })
}

/// Starts `script` (the lab's `what`) in a shell of a process group of its own, with `args` as its `$1`…, reading
/// `pipe`.
fn watch_pipe(
    what: &str,
    script: &str,
    args: &[&std::ffi::OsStr],
    pipe: std::io::PipeReader,
) -> std::result::Result<Child, String> {
    Command::new("sh")
        .args(["-c", script, &format!("wukong-lab-{what}")])
        .args(args)
        .stdin(pipe)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()
        .map_err(|e| format!("cannot start the lab {what} (sh): {e}"))
}

/// The process group every lab process joins ([`Lab::join`]); its leader is the keeper.
pub fn lab_group() -> Result<i32> {
    Ok(keeper()?.group)
}

/// The directory this process makes its lab directories in, removed when this process ends, however it ends.
pub fn lab_dir() -> Result<&'static Path> {
    Ok(&keeper()?.dir)
}

/// A new directory in [`lab_dir`], named `prefix` and a random suffix, removed when dropped.
pub fn lab_tempdir(prefix: &str) -> Result<tempfile::TempDir> {
    let parent = lab_dir()?;
    tempfile::Builder::new()
        .prefix(prefix)
        .tempdir_in(parent)
        .with_context(|| format!("cannot make a directory in {}", parent.display()))
}

/// Puts a lab process in [`lab_group`] when it starts.
pub trait Lab {
    fn join(&mut self) -> Result<&mut Self>;
}

impl Lab for Command {
    fn join(&mut self) -> Result<&mut Self> {
        Ok(self.process_group(lab_group()?))
    }
}

impl Lab for tokio::process::Command {
    fn join(&mut self) -> Result<&mut Self> {
        Ok(self.process_group(lab_group()?))
    }
}

/// A process in [`lab_group`], as `/proc` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LabProcess {
    pub pid: i32,
    /// Its start time (clock ticks after boot): a pid reused by a later process has another.
    pub started: u64,
    /// Its command name (`comm`).
    pub name: String,
    /// Its state letter (`Z` for a zombie: dead, not yet reaped).
    pub state: char,
}

/// Every process in [`lab_group`] now (the keeper included).
pub fn lab_processes() -> Result<Vec<LabProcess>> {
    let group = lab_group()?;
    Ok(processes()?.into_iter().filter(|(_, pgrp)| *pgrp == group).map(|(p, _)| p).collect())
}

/// Whether `process` still runs: the same pid with the same start time, and not a zombie.
pub fn is_alive(process: &LabProcess) -> bool {
    now(process.pid).is_some_and(|now| now.started == process.started && now.state != 'Z')
}

/// Whether process `pid` exists and is not a zombie (whose parent, PID 1 here, may never reap it).
pub(crate) fn is_running(pid: i32) -> bool {
    now(pid).is_some_and(|now| now.state != 'Z')
}

/// Process `pid` as `/proc` shows it now; `None` once it is gone.
fn now(pid: i32) -> Option<LabProcess> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_stat(pid, &stat).map(|(process, _)| process)
}

/// Every process on the machine with its process group.
fn processes() -> Result<Vec<(LabProcess, i32)>> {
    let mut all = Vec::new();
    for entry in std::fs::read_dir("/proc").context("reading /proc")? {
        let entry = entry?;
        let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else { continue };
        // Gone between the listing and the read: not a process any more.
        if let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) {
            all.extend(parse_stat(pid, &stat));
        }
    }
    Ok(all)
}

/// `/proc/PID/stat`: the name is between the first `(` and the last `)` (it may hold both); after it come the
/// state (field 3), the parent (4), the process group (5), … and the start time (22).
fn parse_stat(pid: i32, stat: &str) -> Option<(LabProcess, i32)> {
    let (head, tail) = stat.rsplit_once(')')?;
    let name = head.split_once('(')?.1.to_string();
    let fields: Vec<&str> = tail.split_whitespace().collect();
    let state = fields.first()?.chars().next()?;
    let group = fields.get(2)?.parse().ok()?;
    let started = fields.get(19)?.parse().ok()?;
    Some((LabProcess { pid, started, name, state }, group))
}

/// A child process and the command that started it; killed (SIGKILL) when dropped.
pub(crate) struct Relaunchable {
    command: Command,
    child: Child,
    /// What it is, for errors ("kube-apiserver").
    what: String,
}

impl Relaunchable {
    /// Starts `command`, `what` naming it in errors.
    pub(crate) fn spawn(mut command: Command, what: &str) -> Result<Self> {
        let child = command.join()?.spawn().with_context(|| format!("starting {what}"))?;
        Ok(Self { command, child, what: what.into() })
    }

    /// Kills it with SIGKILL (no goodbye: what a crash or the OOM killer does) and reaps it; nothing happens to one
    /// that already exited.
    pub(crate) fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Kills it (SIGKILL) and starts it again with the same command.
    pub(crate) fn restart(&mut self) -> Result<()> {
        self.kill();
        self.child = self.command.spawn().with_context(|| format!("starting {} again", self.what))?;
        Ok(())
    }

    /// The pid of the process now running (a restart changes it).
    pub(crate) fn id(&self) -> u32 {
        self.child.id()
    }

    /// Its exit status, once it has exited.
    pub(crate) fn try_wait(&mut self) -> Result<Option<ExitStatus>> {
        self.child.try_wait().with_context(|| format!("waiting for {}", self.what))
    }
}

impl Drop for Relaunchable {
    fn drop(&mut self) {
        self.kill();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_lines_with_hostile_names_are_read() {
        let stat = "4242 (a) (b) c) S 1 4000 4000 0 -1 4194560 1 0 0 0 0 0 0 0 20 0 1 0 987654 1000 10";
        let (process, group) = parse_stat(4242, stat).unwrap();
        assert_eq!(process, LabProcess { pid: 4242, started: 987654, name: "a) (b) c".into(), state: 'S' });
        assert_eq!(group, 4000);
        for broken in ["", "4242 no parentheses S 1 2", "4242 (x) S 1", "4242 (x) S 1 notanumber"] {
            assert_eq!(parse_stat(4242, broken), None, "{broken:?}");
        }
    }

    #[test]
    fn a_child_that_joins_is_in_the_lab_group() {
        let mut child = Command::new("sleep").arg("30").join().unwrap().spawn().unwrap();
        let listed = lab_processes().unwrap();
        let keeper = lab_group().unwrap();
        assert!(listed.iter().any(|p| p.pid == child.id() as i32 && p.name == "sleep"), "{listed:?}");
        assert!(listed.iter().any(|p| p.pid == keeper && p.name == "sh"), "{listed:?}");
        let sleeper = listed.iter().find(|p| p.pid == child.id() as i32).unwrap().clone();
        child.kill().unwrap();
        child.wait().unwrap();
        assert!(!is_alive(&sleeper));
    }
}
