//! Transactions Postgres streams while they run (pgoutput protocol 2, `streaming 'on'`):
//! their messages go to a spill file per transaction as they arrive; at the commit the
//! file is read back and handed on as one ordinary transaction (Begin, the messages,
//! Commit), so nothing downstream knows it was streamed.
//!
//! - Nothing of a transaction is handed on before its commit. An abort deletes its file;
//!   a subtransaction's abort cuts the file back to where that subtransaction's first
//!   message begins, as Postgres's own apply worker does (within one transaction, what
//!   follows a subtransaction's first change until its abort is that subtransaction's or
//!   its children's: only one subtransaction runs at a time).
//! - Memory stays bounded: a message is written as it arrives, and read back one at a time.
//! - The files live as long as one replication connection. After a restart Postgres
//!   streams every transaction not yet committed from its start again (the slot's
//!   confirmed position never passes an uncommitted transaction's commit), so the
//!   directory is emptied when a connection starts.
//!
//! A record is the message's WAL position (u64), its length (u32), then the message in
//! protocol 1 form.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};

use bytes::Bytes;

use super::pgoutput;
use crate::change::Xid;
use crate::change::message::PgOutputMessage;
use crate::lsn::Lsn;

/// A spill file could not be written or read back.
#[derive(Debug, thiserror::Error)]
#[error(
    "cannot {what} {path} (a transaction Postgres streams before its commit is kept there \
     until it commits): {source}; free space there or set source.spill_dir to a directory \
     with room for the largest transaction"
)]
pub struct SpillError {
    what: &'static str,
    path: PathBuf,
    #[source]
    source: std::io::Error,
}

/// The stream did not follow the protocol's order of stream messages.
#[derive(Debug, thiserror::Error)]
#[error("the server's stream of running transactions is out of order: {0}")]
pub struct OutOfOrder(pub String);

#[derive(Debug, thiserror::Error)]
pub enum StreamedError {
    #[error(transparent)]
    Spill(#[from] SpillError),
    #[error(transparent)]
    OutOfOrder(#[from] OutOfOrder),
    #[error("a spilled message does not decode: {0}")]
    Malformed(#[from] super::cursor::Malformed),
}

const SUFFIX: &str = ".spill";

/// One running transaction's file.
struct Spill {
    path: PathBuf,
    /// Open only during the transaction's block: one write buffer (1 MiB) and one file
    /// descriptor at a time, however many transactions are running.
    file: Option<BufWriter<File>>,
    /// Bytes written.
    len: u64,
    /// Where each subtransaction's first message begins.
    subxacts: HashMap<Xid, u64>,
}

/// The running transactions of one replication connection.
pub struct Spills {
    dir: PathBuf,
    open: HashMap<Xid, Spill>,
    /// The transaction whose block is being received (between Stream Start and Stop).
    block: Option<Xid>,
}

/// Creates `dir` (mode 0700) or checks an existing one: a directory, not a link, owned by
/// this user, and closed to others (tightened to 0700 if it is not). Spill files hold
/// source rows, and the default directory is in the shared temporary directory, where
/// someone else could have created it first.
fn private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt as _, MetadataExt as _, PermissionsExt as _};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    let refuse = |why: String| {
        Err(std::io::Error::new(
            std::io::ErrorKind::PermissionDenied,
            format!("{why}; remove it, or set source.spill_dir to a directory of this user's"),
        ))
    };
    let meta = std::fs::symlink_metadata(dir)?;
    if !meta.file_type().is_dir() {
        return refuse("it is a symbolic link or not a directory".into());
    }
    // SAFETY: geteuid has no preconditions and cannot fail.
    let me = unsafe { libc::geteuid() };
    if meta.uid() != me {
        return refuse(format!(
            "it belongs to user id {}, not to this process's ({me})",
            meta.uid()
        ));
    }
    if meta.mode() & 0o077 != 0 {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    }
    Ok(())
}

/// This daemon's own spill directory: a subdirectory `<pid>-<random>` of the configured
/// one, marked live by an exclusive lock (`flock`) on its `lock` file for as long as the
/// daemon runs. Two daemons given the same directory (two sources whose slots share a
/// name, or a daemon taking over the lease of a frozen one) each write their own
/// subdirectory, so neither reads or deletes the other's transactions, although
/// transaction ids repeat across servers. The kernel drops the lock when its process
/// ends, however it ends; the next daemon to start deletes such subdirectories.
#[derive(Debug)]
pub struct SpillDir {
    dir: PathBuf,
    _lock: File,
}

/// A subdirectory without a `lock` file this old is a start that never finished.
const UNFINISHED: std::time::Duration = std::time::Duration::from_secs(3600);

impl SpillDir {
    /// Creates this process's subdirectory of `base` (and `base` if needed) and locks it,
    /// then deletes the subdirectories of processes that have ended.
    pub fn acquire(base: &Path) -> Result<SpillDir, SpillError> {
        let failed = |path: &Path, source| SpillError {
            what: "set up the spill directory",
            path: path.to_path_buf(),
            source,
        };
        private_dir(base).map_err(|e| failed(base, e))?;
        let unique = uuid::Uuid::new_v4().simple().to_string();
        let dir = base.join(format!("{}-{}", std::process::id(), &unique[..8]));
        private_dir(&dir).map_err(|e| failed(&dir, e))?;
        // Locked under a temporary name and renamed: a `lock` file is always held by its
        // owner, never seen unlocked by a sweeping daemon in between.
        let pending = dir.join("lock.new");
        let lock = lock_file(&pending, true).map_err(|e| failed(&pending, e))?;
        lock.try_lock().map_err(|e| failed(&pending, e.into()))?;
        std::fs::rename(&pending, dir.join("lock")).map_err(|e| failed(&dir, e))?;
        sweep(base, &dir);
        Ok(SpillDir { dir, _lock: lock })
    }

    /// Where this daemon's spill files go.
    pub fn path(&self) -> &Path {
        &self.dir
    }
}

impl Drop for SpillDir {
    fn drop(&mut self) {
        // Still locked: no other daemon touches it meanwhile.
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn lock_file(path: &Path, create: bool) -> std::io::Result<File> {
    File::options()
        .read(true)
        .write(true)
        .create(create)
        .truncate(false)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
}

/// Deletes the subdirectories of `base` (other than `own`) whose daemon has ended: those
/// whose lock can be taken, and those without a lock an hour after they were made.
/// Spill files left in `base` itself by versions before subdirectories go too.
fn sweep(base: &Path, own: &Path) {
    let Ok(entries) = std::fs::read_dir(base) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path == own {
            continue;
        }
        let Ok(meta) = std::fs::symlink_metadata(&path) else {
            continue;
        };
        if !meta.is_dir() {
            if path.to_string_lossy().ends_with(SUFFIX) {
                remove(path);
            }
            continue;
        }
        // A lock taken is held until the directory is gone: no other sweeper races us.
        let (ended, _held) = match lock_file(&path.join("lock"), false) {
            Ok(lock) => (lock.try_lock().is_ok(), Some(lock)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let age = meta.modified().ok().and_then(|m| m.elapsed().ok());
                (age.is_some_and(|age| age > UNFINISHED), None)
            }
            Err(_) => (false, None),
        };
        if ended && let Err(e) = std::fs::remove_dir_all(&path) {
            tracing::warn!(path = %path.display(), error = %e, "cannot delete the spill directory of an ended daemon");
        }
    }
}

impl Spills {
    /// Creates `dir` if needed and deletes the spill files a previous connection left.
    pub fn open(dir: &Path) -> Result<Spills, SpillError> {
        let failed = |what, source| SpillError {
            what,
            path: dir.to_path_buf(),
            source,
        };
        private_dir(dir).map_err(|e| failed("use the spill directory", e))?;
        for entry in std::fs::read_dir(dir).map_err(|e| failed("list the spill directory", e))? {
            let path = entry
                .map_err(|e| failed("list the spill directory", e))?
                .path();
            if path.to_string_lossy().ends_with(SUFFIX) {
                std::fs::remove_file(&path).map_err(|e| SpillError {
                    what: "delete the old spill file",
                    path,
                    source: e,
                })?;
            }
        }
        Ok(Spills {
            dir: dir.to_path_buf(),
            open: HashMap::new(),
            block: None,
        })
    }

    /// Between a Stream Start and its Stop.
    pub fn in_block(&self) -> bool {
        self.block.is_some()
    }

    /// Transactions streamed but neither committed nor aborted yet.
    pub fn running(&self) -> usize {
        self.open.len()
    }

    /// Stream Start.
    pub fn start(&mut self, xid: Xid, first_segment: bool) -> Result<(), StreamedError> {
        if let Some(open) = self.block {
            return Err(OutOfOrder(format!(
                "Stream Start for transaction {xid} inside the block of {open}"
            ))
            .into());
        }
        if first_segment || !self.open.contains_key(&xid) {
            if !first_segment {
                return Err(OutOfOrder(format!(
                    "transaction {xid} continues, but its first block was not received"
                ))
                .into());
            }
            let path = self.dir.join(format!("{}{SUFFIX}", xid.0));
            tracing::debug!(xid = xid.0, "the server streams a running transaction");
            let file = spill_file(&path, true).map_err(|e| SpillError {
                what: "create the spill file",
                path: path.clone(),
                source: e,
            })?;
            self.open.insert(
                xid,
                Spill {
                    path,
                    file: Some(BufWriter::with_capacity(1 << 20, file)),
                    len: 0,
                    subxacts: HashMap::new(),
                },
            );
        } else if let Some(spill) = self.open.get_mut(&xid) {
            // The next block of a running transaction: append where the last one ended.
            let failed = |e| SpillError {
                what: "reopen the spill file",
                path: spill.path.clone(),
                source: e,
            };
            let mut file = spill_file(&spill.path, false).map_err(failed)?;
            file.seek(SeekFrom::Start(spill.len)).map_err(failed)?;
            spill.file = Some(BufWriter::with_capacity(1 << 20, file));
        }
        self.block = Some(xid);
        Ok(())
    }

    /// Stream Stop: the block's transaction's file is written out and closed.
    pub fn stop(&mut self) -> Result<(), StreamedError> {
        let xid = self
            .block
            .take()
            .ok_or_else(|| OutOfOrder("Stream Stop without a Stream Start".into()))?;
        if let Some(spill) = self.open.get_mut(&xid)
            && let Some(writer) = spill.file.take()
        {
            writer.into_inner().map_err(|e| SpillError {
                what: "write the spill file",
                path: spill.path.clone(),
                source: e.into_error(),
            })?;
        }
        Ok(())
    }

    /// A message of the block's transaction (or of its subtransaction `xid`).
    pub fn write(&mut self, xid: Xid, wal_start: Lsn, message: &[u8]) -> Result<(), StreamedError> {
        let top = self
            .block
            .ok_or_else(|| OutOfOrder("a streamed message outside a block".into()))?;
        let spill = self
            .open
            .get_mut(&top)
            .ok_or_else(|| OutOfOrder(format!("no spill file for transaction {top}")))?;
        if xid != top {
            spill.subxacts.entry(xid).or_insert(spill.len);
        }
        let len = u32::try_from(message.len())
            .map_err(|_| OutOfOrder(format!("a message of {} bytes", message.len())))?;
        let file = spill
            .file
            .as_mut()
            .ok_or_else(|| OutOfOrder(format!("the spill file of {top} is not open")))?;
        let written = file
            .write_all(&wal_start.0.to_be_bytes())
            .and_then(|()| file.write_all(&len.to_be_bytes()))
            .and_then(|()| file.write_all(message));
        written.map_err(|e| SpillError {
            what: "write the spill file",
            path: spill.path.clone(),
            source: e,
        })?;
        spill.len += 12 + u64::from(len);
        Ok(())
    }

    /// Stream Abort: the transaction's file goes, or is cut back to where the aborted
    /// subtransaction began.
    pub fn abort(&mut self, xid: Xid, subxid: Xid) -> Result<(), StreamedError> {
        if xid == subxid {
            if let Some(spill) = self.open.remove(&xid) {
                remove(spill.path);
            }
            return Ok(());
        }
        let Some(spill) = self.open.get_mut(&xid) else {
            return Ok(());
        };
        let Some(&cut) = spill.subxacts.get(&subxid) else {
            return Ok(()); // nothing of it was streamed
        };
        let failed = |e| SpillError {
            what: "cut back the spill file",
            path: spill.path.clone(),
            source: e,
        };
        match spill.file.as_mut() {
            Some(file) => {
                file.flush().map_err(failed)?;
                file.get_ref().set_len(cut).map_err(failed)?;
                file.get_mut().seek(SeekFrom::Start(cut)).map_err(failed)?;
            }
            // Between blocks, where Stream Abort comes: the file is closed.
            None => spill_file(&spill.path, false)
                .and_then(|f| f.set_len(cut))
                .map_err(failed)?,
        }
        spill.len = cut;
        spill.subxacts.retain(|_, start| *start < cut);
        Ok(())
    }

    /// Stream Commit: the transaction, ready to be read back.
    pub fn commit(
        &mut self,
        xid: Xid,
        commit_lsn: Lsn,
        end_lsn: Lsn,
        commit_ts: i64,
    ) -> Result<Replay, StreamedError> {
        let mut spill = self.open.remove(&xid).ok_or_else(|| {
            OutOfOrder(format!(
                "Stream Commit for transaction {xid}, which was never streamed"
            ))
        })?;
        let path = spill.path.clone();
        let failed = |what, e| SpillError {
            what,
            path: path.clone(),
            source: e,
        };
        let mut file = match spill.file.take() {
            Some(writer) => writer
                .into_inner()
                .map_err(|e| failed("write the spill file", e.into_error()))?,
            None => spill_file(&path, false).map_err(|e| failed("read back the spill file", e))?,
        };
        file.seek(SeekFrom::Start(0))
            .map_err(|e| failed("read back the spill file", e))?;
        tracing::debug!(xid = xid.0, bytes = spill.len, %commit_lsn, "streamed transaction committed");
        Ok(Replay {
            reader: BufReader::with_capacity(1 << 20, file),
            path,
            left: spill.len,
            xid,
            commit_lsn,
            end_lsn,
            commit_ts,
            begun: false,
            ended: false,
        })
    }
}

/// A spill file opened to read and write: source rows, so readable by this user only, and
/// never through a link someone else put in the directory. `create` starts it empty.
fn spill_file(path: &Path, create: bool) -> std::io::Result<File> {
    File::options()
        .read(true)
        .write(true)
        .create(create)
        .truncate(create)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
}

fn remove(path: PathBuf) {
    if let Err(e) = std::fs::remove_file(&path) {
        tracing::warn!(path = %path.display(), error = %e, "cannot delete a spill file");
    }
}

/// A committed streamed transaction read back: Begin, its messages, Commit.
pub struct Replay {
    reader: BufReader<File>,
    path: PathBuf,
    /// Bytes of records not read yet.
    left: u64,
    xid: Xid,
    commit_lsn: Lsn,
    end_lsn: Lsn,
    commit_ts: i64,
    begun: bool,
    ended: bool,
}

/// One message read back: its WAL position, the message, its size.
pub struct Replayed {
    pub wal_start: Lsn,
    pub message: PgOutputMessage,
    pub bytes: usize,
}

impl Replay {
    /// The next message; `None` after the Commit.
    pub fn next_replayed(&mut self) -> Result<Option<Replayed>, StreamedError> {
        if !self.begun {
            self.begun = true;
            return Ok(Some(Replayed {
                wal_start: self.commit_lsn,
                message: PgOutputMessage::Begin {
                    final_lsn: self.commit_lsn,
                    commit_ts: self.commit_ts,
                    xid: self.xid,
                },
                bytes: 1,
            }));
        }
        if self.left == 0 {
            if self.ended {
                return Ok(None);
            }
            self.ended = true;
            return Ok(Some(Replayed {
                wal_start: self.end_lsn,
                message: PgOutputMessage::Commit {
                    flags: 0,
                    commit_lsn: self.commit_lsn,
                    end_lsn: self.end_lsn,
                    commit_ts: self.commit_ts,
                },
                bytes: 1,
            }));
        }
        let failed = |e| SpillError {
            what: "read back the spill file",
            path: self.path.clone(),
            source: e,
        };
        let mut head = [0u8; 12];
        self.reader.read_exact(&mut head).map_err(failed)?;
        let wal_start = Lsn(u64::from_be_bytes(head[..8].try_into().expect("8 bytes")));
        let len = u32::from_be_bytes(head[8..].try_into().expect("4 bytes"));
        let mut data = vec![0; len as usize];
        self.reader.read_exact(&mut data).map_err(failed)?;
        self.left = self.left.saturating_sub(12 + u64::from(len));
        let message = pgoutput::decode(&Bytes::from(data))?;
        Ok(Some(Replayed {
            wal_start,
            message,
            bytes: (len as usize).max(1),
        }))
    }
}

impl Drop for Replay {
    fn drop(&mut self) {
        remove(std::mem::take(&mut self.path));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn insert(id: &str) -> Vec<u8> {
        let mut b = vec![b'I'];
        b.extend(16384u32.to_be_bytes());
        b.push(b'N');
        b.extend(1i16.to_be_bytes());
        b.push(b't');
        b.extend((id.len() as i32).to_be_bytes());
        b.extend(id.as_bytes());
        b
    }

    fn replayed(mut replay: Replay) -> Vec<String> {
        let mut out = vec![];
        while let Some(r) = replay.next_replayed().unwrap() {
            out.push(match r.message {
                PgOutputMessage::Begin { xid, .. } => format!("begin {xid}"),
                PgOutputMessage::Commit { end_lsn, .. } => format!("commit {end_lsn}"),
                PgOutputMessage::Insert { new, .. } => match &new.0[0] {
                    crate::change::message::TupleValue::Text(t) => {
                        String::from_utf8(t.to_vec()).unwrap()
                    }
                    other => format!("{other:?}"),
                },
                other => format!("{other:?}"),
            });
        }
        out
    }

    #[test]
    fn each_daemon_spills_into_its_own_directory_and_ended_ones_are_swept() {
        let root = tempfile::tempdir().unwrap();
        let base = root.path().join("spill");
        let first = SpillDir::acquire(&base).unwrap();
        let second = SpillDir::acquire(&base).unwrap();
        assert_ne!(first.path(), second.path());
        assert!(first.path().starts_with(&base) && first.path().join("lock").exists());
        // A daemon that ended without cleaning up (its lock is free) and a spill file
        // of the layout before subdirectories.
        let ended = base.join("1-dead");
        std::fs::create_dir(&ended).unwrap();
        std::fs::write(ended.join("lock"), "").unwrap();
        std::fs::write(ended.join("7.spill"), "x").unwrap();
        std::fs::write(base.join("9.spill"), "x").unwrap();
        let third = SpillDir::acquire(&base).unwrap();
        assert!(!ended.exists(), "an ended daemon's directory is swept");
        assert!(!base.join("9.spill").exists());
        assert!(
            first.path().exists() && second.path().exists(),
            "live daemons' directories stay"
        );
        let gone = first.path().to_path_buf();
        drop(first);
        assert!(
            !gone.exists(),
            "a daemon removes its own directory when it ends"
        );
        drop((second, third));
    }

    #[test]
    fn the_spill_directory_and_files_are_private() {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("spill");
        let mut spills = Spills::open(&dir).unwrap();
        assert_eq!(mode(&dir), 0o700);
        spills.start(Xid(9), true).unwrap();
        assert_eq!(mode(&dir.join("9.spill")), 0o600);
        // An existing directory open to others is closed.
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        Spills::open(&dir).unwrap();
        assert_eq!(mode(&dir), 0o700);
        // A link planted where the directory goes is refused.
        let target = root.path().join("elsewhere");
        std::fs::create_dir(&target).unwrap();
        let link = root.path().join("link");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        let err = Spills::open(&link)
            .err()
            .expect("a symbolic link is refused")
            .to_string();
        assert!(
            err.contains("symbolic link") && err.contains("source.spill_dir"),
            "{err}"
        );
    }

    #[test]
    fn a_streamed_transaction_is_replayed_whole_without_its_aborted_subtransactions() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("7.spill"), b"left by a crash").unwrap();
        let mut spills = Spills::open(dir.path()).unwrap();
        assert!(
            !dir.path().join("7.spill").exists(),
            "leftovers are deleted"
        );
        let (top, sub, nested) = (Xid(10), Xid(11), Xid(12));
        spills.start(top, true).unwrap();
        spills.write(top, Lsn(1), &insert("1")).unwrap();
        spills.write(sub, Lsn(2), &insert("2")).unwrap();
        spills.stop().unwrap();
        // Another transaction's block in between.
        spills.start(Xid(20), true).unwrap();
        spills.write(Xid(20), Lsn(3), &insert("x")).unwrap();
        spills.stop().unwrap();
        spills.start(top, false).unwrap();
        spills.write(nested, Lsn(4), &insert("3")).unwrap();
        spills.stop().unwrap();
        // ROLLBACK TO the savepoint of `sub`: its child aborts first, then itself.
        spills.abort(top, nested).unwrap();
        spills.abort(top, sub).unwrap();
        spills.start(top, false).unwrap();
        spills.write(top, Lsn(5), &insert("4")).unwrap();
        spills.stop().unwrap();
        spills.abort(Xid(20), Xid(20)).unwrap();
        assert_eq!(spills.running(), 1);
        let replay = spills.commit(top, Lsn(6), Lsn(7), 0).unwrap();
        assert_eq!(
            replayed(replay),
            ["begin 10", "1", "4", "commit 0/7"],
            "the aborted subtransactions' rows are gone"
        );
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            0,
            "no file is left"
        );
    }

    #[test]
    fn a_restarted_stream_starts_the_transaction_over() {
        let dir = tempfile::tempdir().unwrap();
        let mut spills = Spills::open(dir.path()).unwrap();
        spills.start(Xid(10), true).unwrap();
        spills.write(Xid(10), Lsn(1), &insert("1")).unwrap();
        spills.stop().unwrap();
        spills.start(Xid(10), true).unwrap();
        spills.write(Xid(10), Lsn(1), &insert("1")).unwrap();
        spills.stop().unwrap();
        let replay = spills.commit(Xid(10), Lsn(6), Lsn(7), 0).unwrap();
        assert_eq!(replayed(replay), ["begin 10", "1", "commit 0/7"]);
    }

    #[test]
    fn stream_messages_out_of_order_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let mut spills = Spills::open(dir.path()).unwrap();
        assert!(spills.stop().is_err());
        assert!(spills.write(Xid(1), Lsn(1), &insert("1")).is_err());
        assert!(spills.start(Xid(1), false).is_err(), "never started");
        assert!(spills.commit(Xid(1), Lsn(1), Lsn(2), 0).is_err());
        spills.start(Xid(1), true).unwrap();
        assert!(spills.start(Xid(2), true).is_err(), "nested block");
    }
}
