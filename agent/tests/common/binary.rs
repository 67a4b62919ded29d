//! The real `wukong-agent` binary as a child process, its stderr (the log) collected line by line, for what only
//! the whole program shows: start-up refusals, exit codes and log lines.

use std::ffi::OsStr;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Longest a start, a refusal or a log line may take: the first start opens the udev monitor and enumerates.
const PATIENCE: Duration = Duration::from_secs(30);

/// The agent with `args`, run through `wrapper` (e.g. `setpriv` with its options and `--`) when not empty.
fn command<S: AsRef<OsStr>>(wrapper: &[&str], args: &[S]) -> Command {
    let agent = env!("CARGO_BIN_EXE_wukong-agent");
    let mut cmd = match wrapper.split_first() {
        Some((program, options)) => {
            let mut cmd = Command::new(program);
            cmd.args(options).arg(agent);
            cmd
        }
        None => Command::new(agent),
    };
    cmd.args(args).stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped());
    cmd
}

/// A running agent; killed on drop.
pub struct AgentProcess {
    child: Child,
    log: Arc<Mutex<Vec<String>>>,
    reader: Option<std::thread::JoinHandle<()>>,
}

impl AgentProcess {
    /// Starts the agent and waits until it says it is ready.
    pub fn start<S: AsRef<OsStr>>(args: &[S]) -> Self {
        Self::start_under(&[], args)
    }

    /// [`Self::start`] through `wrapper` (see [`run_to_exit_under`]).
    pub fn start_under<S: AsRef<OsStr>>(wrapper: &[&str], args: &[S]) -> Self {
        let mut child = command(wrapper, args).spawn().expect("the agent binary starts");
        let stderr = child.stderr.take().unwrap();
        let log = Arc::new(Mutex::new(Vec::new()));
        let reader = std::thread::spawn({
            let log = log.clone();
            move || {
                for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                    log.lock().unwrap().push(line);
                }
            }
        });
        let agent = Self { child, log, reader: Some(reader) };
        agent.wait_for_line("wukong-agent ready");
        agent
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The log so far.
    pub fn log(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    /// Waits for a log line containing `needle` and returns it; fails with the whole log if none comes.
    pub fn wait_for_line(&self, needle: &str) -> String {
        let deadline = Instant::now() + PATIENCE;
        loop {
            if let Some(line) = self.log.lock().unwrap().iter().find(|l| l.contains(needle)) {
                return line.clone();
            }
            assert!(Instant::now() < deadline, "no log line with {needle:?} within {PATIENCE:?}; log:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops the agent as systemd does (SIGTERM), checks it exits successfully, and returns its whole log.
    pub fn stop(mut self) -> String {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
        let status = wait_with_deadline(&mut self.child);
        if let Some(reader) = self.reader.take() {
            reader.join().unwrap();
        }
        assert!(status.success(), "the agent exited with {status}; log:\n{}", self.log());
        self.log()
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs the agent expecting it to exit on its own (a refused start); returns its status and stderr.
pub fn run_to_exit<S: AsRef<OsStr>>(args: &[S]) -> (ExitStatus, String) {
    run_to_exit_under(&[], args)
}

/// [`run_to_exit`] with the agent run through `wrapper`, a program and its options that end by running the agent
/// (e.g. `["setpriv", "--bounding-set=-sys_admin", "--"]`).
pub fn run_to_exit_under<S: AsRef<OsStr>>(wrapper: &[&str], args: &[S]) -> (ExitStatus, String) {
    let mut child = command(wrapper, args).spawn().expect("the agent binary starts");
    let mut stderr = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut text = String::new();
        std::io::Read::read_to_string(&mut stderr, &mut text).unwrap();
        text
    });
    let status = wait_with_deadline(&mut child);
    (status, reader.join().unwrap())
}

fn wait_with_deadline(child: &mut Child) -> ExitStatus {
    let deadline = Instant::now() + PATIENCE;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the agent did not exit within {PATIENCE:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
