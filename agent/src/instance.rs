//! One agent per state directory. The release journal there is replayed at start (an interrupted release is
//! undone) and the Unix socket is replaced, so a second agent started by mistake must stop before doing either: it
//! would undo a release the first one is running and leave the first unreachable.

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// Name of the lock file inside the state directory.
pub const LOCK_FILE: &str = "agent.lock";

/// Why the state directory cannot be this agent's.
#[derive(Debug, thiserror::Error)]
pub enum StateDirError {
    #[error("the state directory {0} is not a directory; remove it or give another --state-dir")]
    NotADirectory(PathBuf),
    #[error(
        "the state directory {path} is not usable: {source}; make it a writable directory or give another --state-dir"
    )]
    Unusable { path: PathBuf, source: std::io::Error },
    #[error("another wukong-agent ({}) holds {path}; stop it first or give this one another --state-dir", holder(*pid))]
    Held { path: PathBuf, pid: Option<u32> },
}

fn holder(pid: Option<u32>) -> String {
    match pid {
        Some(pid) => format!("pid {pid}"),
        // It has taken the lock and not yet written its pid.
        None => "pid not yet recorded".into(),
    }
}

/// The exclusive lock on the state directory, held as long as this value lives. The kernel drops it when the
/// process ends, however it ends, so a crashed agent never blocks the next one.
#[derive(Debug)]
pub struct InstanceLock {
    _file: Flock<File>,
}

impl InstanceLock {
    /// Creates the state directory if needed, takes its lock without waiting, and records this process's pid in it.
    pub fn acquire(dir: &Path) -> Result<Self, StateDirError> {
        let unusable = |path: &Path| {
            let path = path.to_path_buf();
            move |source| StateDirError::Unusable { path, source }
        };
        match std::fs::metadata(dir) {
            Ok(meta) if !meta.is_dir() => return Err(StateDirError::NotADirectory(dir.to_path_buf())),
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                std::fs::create_dir_all(dir).map_err(unusable(dir))?;
            }
            Err(e) => return Err(unusable(dir)(e)),
        }
        let path = dir.join(LOCK_FILE);
        // Opened for writing even when it exists: that is what proves the directory writable (a read-only mount
        // refuses it), before anything else is tried there.
        let file = OpenOptions::new().read(true).write(true).create(true).truncate(false).mode(0o600).open(&path);
        let file = file.map_err(unusable(dir))?;
        let mut file = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(locked) => locked,
            Err((_, Errno::EWOULDBLOCK)) => return Err(StateDirError::Held { pid: read_pid(&path), path }),
            Err((_, errno)) => return Err(unusable(dir)(errno.into())),
        };
        // The file is never removed: removing it would let a third agent lock a new file while the second still
        // holds the old one. A stale pid in it is harmless, only the lock counts.
        file.set_len(0).map_err(unusable(dir))?;
        writeln!(file, "{}", std::process::id()).map_err(unusable(dir))?;
        Ok(Self { _file: file })
    }
}

fn read_pid(path: &Path) -> Option<u32> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_lock_is_refused_with_the_holders_pid_until_the_first_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        let first = InstanceLock::acquire(&state).unwrap();
        let lock = state.join(LOCK_FILE);
        assert_eq!(std::fs::read_to_string(&lock).unwrap(), format!("{}\n", std::process::id()));
        let err = InstanceLock::acquire(&state).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "another wukong-agent (pid {}) holds {}; stop it first or give this one another --state-dir",
                std::process::id(),
                lock.display()
            )
        );
        drop(first);
        InstanceLock::acquire(&state).expect("free again once the holder is gone");
    }

    #[test]
    fn a_file_in_place_of_the_directory_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("state");
        std::fs::write(&file, b"not a directory").unwrap();
        let err = InstanceLock::acquire(&file).unwrap_err();
        assert!(matches!(err, StateDirError::NotADirectory(_)), "{err}");
        assert!(err.to_string().starts_with(&format!("the state directory {} is not a directory", file.display())));
        let err = InstanceLock::acquire(&file.join("releases")).unwrap_err();
        assert!(matches!(err, StateDirError::Unusable { .. }), "{err}");
        assert_eq!(std::fs::read(&file).unwrap(), b"not a directory");
    }
}
