//! The run lock: at most one run per state directory.
//!
//! The lock is an exclusive advisory lock (`flock`) on `run.lock` in the state directory, taken
//! with a non-blocking try. The kernel drops it when the holder's process ends, however it ends
//! (SIGKILL included), so a lock left by a dead run is simply free: the next run takes it over and
//! says so. The file's text names the holder (pid, start time, host) for the refusal message and
//! for `status`; it is written only while the lock is held.
//!
//! The file is never deleted: deleting it while another process waits on the same path would let
//! two runs each lock a different inode. Releasing empties it instead.
//!
//! Must not: decide anything from the file's text alone (a stale text is normal after a crash),
//! or block waiting for the other run.

use std::fmt;
use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Serialize};

/// The lock file's name inside the state directory.
pub const LOCK_FILE: &str = "run.lock";

/// Who holds (or held) the lock.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LockHolder {
    pub pid: u32,
    pub started_at: DateTime<Utc>,
    pub host: String,
}

impl fmt::Display for LockHolder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "pid {} on {}, started {}",
            self.pid,
            self.host,
            self.started_at.to_rfc3339_opts(SecondsFormat::Secs, true)
        )
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// Another live run holds the lock.
    #[error(
        "another fhirlift run is using the state directory {}: {}; wait for it to finish (it releases the lock when it exits)",
        .state_dir.display(),
        match .holder { Some(h) => h.to_string(), None => "details not written yet".to_string() }
    )]
    Held {
        state_dir: PathBuf,
        holder: Option<LockHolder>,
    },
    #[error("{}: cannot use the run lock: {source}", .path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The held run lock; released when dropped (and by the kernel if the process dies).
#[derive(Debug)]
pub struct RunLock {
    file: File,
    path: PathBuf,
    holder: LockHolder,
    previous: Option<LockHolder>,
}

impl RunLock {
    /// Takes the lock of `state_dir` (created if missing), or says who holds it.
    pub fn acquire(state_dir: &Path) -> Result<RunLock, LockError> {
        let path = state_dir.join(LOCK_FILE);
        let io = |source| LockError::Io {
            path: path.clone(),
            source,
        };
        std::fs::create_dir_all(state_dir).map_err(io)?;
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(io)?;
        match file.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                return Err(LockError::Held {
                    state_dir: state_dir.to_path_buf(),
                    holder: read_holder(&mut file),
                });
            }
            Err(TryLockError::Error(e)) => return Err(io(e)),
        }
        // Text left behind means its writer died without releasing: a takeover.
        let previous = read_holder(&mut file);
        let holder = LockHolder {
            pid: std::process::id(),
            started_at: Utc::now(),
            host: hostname(),
        };
        let text = serde_json::to_string(&holder).map_err(|e| io(std::io::Error::other(e)))?;
        file.set_len(0).map_err(io)?;
        file.seek(SeekFrom::Start(0)).map_err(io)?;
        file.write_all(text.as_bytes()).map_err(io)?;
        file.flush().map_err(io)?;
        if let Some(prev) = &previous {
            tracing::warn!(
                pid = prev.pid,
                host = %prev.host,
                started_at = %prev.started_at,
                "Took over a run lock left by a run that ended without releasing it"
            );
        }
        Ok(RunLock {
            file,
            path,
            holder,
            previous,
        })
    }

    /// This run's entry.
    pub fn holder(&self) -> &LockHolder {
        &self.holder
    }

    /// The run whose stale lock was taken over, if any.
    pub fn took_over(&self) -> Option<&LockHolder> {
        self.previous.as_ref()
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for RunLock {
    fn drop(&mut self) {
        // Empty first, so that a stale text can only mean a run that did not get here.
        let _ = self.file.set_len(0);
        let _ = self.file.unlock();
    }
}

/// Who holds the lock of `state_dir` right now, if anyone (for `status`). Never takes the lock,
/// not even briefly, so it can never make a starting run fail: it reads the holder's text and, for
/// a holder on this host, checks that its process is still alive.
pub fn current_holder(state_dir: &Path) -> Result<Option<LockHolder>, LockError> {
    let path = state_dir.join(LOCK_FILE);
    let mut file = match OpenOptions::new().read(true).open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(LockError::Io { path, source }),
    };
    Ok(read_holder(&mut file).filter(|h| h.host != hostname() || pid_alive(h.pid)))
}

/// `true` unless the process is known to be gone. Without `/proc` it cannot tell and says alive.
pub fn pid_alive(pid: u32) -> bool {
    let proc_root = Path::new("/proc");
    if !proc_root.join("self").exists() {
        return true;
    }
    // A zombie (ended, not yet reaped by its parent) holds no lock any more.
    match std::fs::read_to_string(proc_root.join(pid.to_string()).join("stat")) {
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_none_or(|state| state != "Z" && state != "X"),
        Err(_) => false,
    }
}

fn read_holder(file: &mut File) -> Option<LockHolder> {
    let mut text = String::new();
    file.seek(SeekFrom::Start(0)).ok()?;
    file.read_to_string(&mut text).ok()?;
    serde_json::from_str(text.trim()).ok()
}

/// The machine's host name, for telling runs on a shared state directory apart.
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::fs::read_to_string("/etc/hostname"))
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "unknown-host".to_string())
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests fail loudly on purpose")]
mod tests {
    use super::*;

    #[test]
    fn second_acquire_is_refused_and_names_the_holder() {
        let dir = tempfile::tempdir().unwrap();
        let first = RunLock::acquire(dir.path()).unwrap();
        assert!(first.took_over().is_none());
        let err = RunLock::acquire(dir.path()).unwrap_err();
        match &err {
            LockError::Held { holder, .. } => {
                assert_eq!(holder.as_ref().unwrap().pid, std::process::id())
            }
            other => panic!("unexpected {other:?}"),
        }
        let text = err.to_string();
        assert!(
            text.contains(&format!("pid {}", std::process::id())),
            "{text}"
        );
        assert_eq!(
            current_holder(dir.path()).unwrap().unwrap().pid,
            std::process::id()
        );
        drop(first);
        assert!(current_holder(dir.path()).unwrap().is_none());
        assert!(pid_alive(std::process::id()));
        assert!(!pid_alive(u32::MAX - 1));
        let again = RunLock::acquire(dir.path()).unwrap();
        assert!(again.took_over().is_none(), "a released lock is not stale");
    }

    #[test]
    fn stale_text_without_a_lock_is_taken_over() {
        let dir = tempfile::tempdir().unwrap();
        let stale = LockHolder {
            pid: 999_999,
            started_at: Utc::now(),
            host: "elsewhere".into(),
        };
        std::fs::write(
            dir.path().join(LOCK_FILE),
            serde_json::to_string(&stale).unwrap(),
        )
        .unwrap();
        let lock = RunLock::acquire(dir.path()).unwrap();
        assert_eq!(lock.took_over(), Some(&stale));
        assert_eq!(lock.holder().pid, std::process::id());
    }
}
