//! One writer at a time: an exclusive lock file beside the state database.
//!
//! A timer-started `ubsync sync`, a running daemon, a backfill or two overlapping timers must
//! never work on the same state at once. [`StateLock::acquire`] takes an OS-level exclusive lock
//! (`flock`) on `<db>.lock` and writes the holder's PID into it; the lock dies with the process,
//! so a crash never leaves a stale lock behind. A second instance gets [`LockError::Held`] naming
//! the holder's PID (exit code 75: try again later).

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

/// Why the lock could not be taken.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error("another ubsync (PID {pid}) is working on {path}; this run stops so they do not overlap (a timer will try again)")]
    Held { pid: String, path: PathBuf },
    #[error("cannot open lock file {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Held for as long as it lives.
#[derive(Debug)]
pub struct StateLock {
    _file: File,
    path: PathBuf,
}

impl StateLock {
    /// The lock file of a state database.
    pub fn path_for(db: &Path) -> PathBuf {
        let mut p = db.as_os_str().to_owned();
        p.push(".lock");
        PathBuf::from(p)
    }

    /// Takes the lock of the state database at `db`, or says who holds it.
    pub fn acquire(db: &Path) -> Result<StateLock, LockError> {
        let path = Self::path_for(db);
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            let _ = crate::store::files::create_private_dir(dir);
        }
        let io = |source| LockError::Io {
            path: path.clone(),
            source,
        };
        use std::os::unix::fs::OpenOptionsExt;
        let mut file = OpenOptions::new()
            .mode(0o600)
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(io)?;
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                let mut pid = String::new();
                let _ = file.read_to_string(&mut pid);
                let pid = pid.trim().to_string();
                return Err(LockError::Held {
                    pid: if pid.is_empty() {
                        "unknown".into()
                    } else {
                        pid
                    },
                    path: db.to_path_buf(),
                });
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(io(e)),
        }
        file.set_len(0).map_err(io)?;
        file.seek(SeekFrom::Start(0)).map_err(io)?;
        write!(file, "{}", std::process::id()).map_err(io)?;
        file.flush().map_err(io)?;
        Ok(StateLock { _file: file, path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_holder_is_refused_with_the_first_ones_pid_until_it_lets_go() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("ubsync.db");
        let first = StateLock::acquire(&db).unwrap();
        match StateLock::acquire(&db) {
            Err(LockError::Held { pid, .. }) => assert_eq!(pid, std::process::id().to_string()),
            other => panic!("expected Held, got {other:?}"),
        }
        drop(first);
        StateLock::acquire(&db).unwrap();
    }
}
