//! `LakeLock`: one daemon per lake.
//!
//! Two daemons writing the same lake would both append the same changes and race on the
//! same positions. The lock is an exclusive OS file lock (`flock`) on
//! `<lake>/_wal2delta/daemon.lock`, held for the life of the process: the kernel releases
//! it when the process dies, even by SIGKILL, so a crash never leaves a stale lock. The
//! file holds the owner's pid for people to read; the lock, not the file, decides.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Seek, Write};
use std::path::PathBuf;

use super::{Lake, LakeError};

/// Held while the daemon runs; dropping it releases the lock.
#[derive(Debug)]
pub struct LakeLock {
    _file: File,
}

impl LakeLock {
    /// Takes the lock or explains who holds it. Only local lakes can be locked this way.
    pub fn acquire(lake: &Lake) -> Result<LakeLock, LakeError> {
        let err = |message: String| LakeError::Location {
            location: lake.root().to_string(),
            message,
        };
        let Ok(root) = lake.root().to_file_path() else {
            return Err(err(
                "only a local lake directory can be locked for now".into()
            ));
        };
        let dir = root.join("_wal2delta");
        std::fs::create_dir_all(&dir)
            .map_err(|e| err(format!("cannot create {}: {e}", dir.display())))?;
        let path: PathBuf = dir.join("daemon.lock");
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| err(format!("cannot open {}: {e}", path.display())))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                let mut owner = String::new();
                let _ = file.read_to_string(&mut owner);
                return Err(LakeError::Locked {
                    path: path.display().to_string(),
                    owner: owner.trim().to_string(),
                });
            }
            Err(TryLockError::Error(e)) => {
                return Err(err(format!("cannot lock {}: {e}", path.display())));
            }
        }
        // Best effort: the pid is for people; the lock is what counts.
        let _ = file.set_len(0);
        let _ = file.rewind();
        let _ = write!(file, "pid {}", std::process::id());
        Ok(LakeLock { _file: file })
    }

    /// Who holds the lock, if anyone, without taking it for longer than the check.
    pub fn holder(lake: &Lake) -> Result<Option<String>, LakeError> {
        let Ok(root) = lake.root().to_file_path() else {
            return Ok(None);
        };
        let path = root.join("_wal2delta").join("daemon.lock");
        let Ok(mut file) = OpenOptions::new().read(true).write(true).open(&path) else {
            return Ok(None); // never locked
        };
        match file.try_lock() {
            Ok(()) => Ok(None), // released when `file` drops
            Err(TryLockError::WouldBlock) => {
                let mut owner = String::new();
                let _ = file.read_to_string(&mut owner);
                Ok(Some(owner.trim().to_string()))
            }
            Err(TryLockError::Error(e)) => Err(LakeError::Location {
                location: lake.root().to_string(),
                message: format!("cannot check the lock {}: {e}", path.display()),
            }),
        }
    }
}
