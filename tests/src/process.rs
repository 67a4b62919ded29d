//! A lab process that a fault test can kill and start again exactly as it was: its [`Command`] (program,
//! arguments, environment, and its log file as stderr) is built once and kept, so a restart cannot drift from the
//! first start. A `Command` spawns any number of times; a log given as a file is the same open file each time, so
//! a restarted process appends to what the killed one wrote.

use anyhow::{Context, Result};
use std::process::{Child, Command, ExitStatus};

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
        let child = command.spawn().with_context(|| format!("starting {what}"))?;
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
