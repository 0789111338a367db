//! `LakeLock`: one daemon per lake, on a local disk or in an object store.
//!
//! Two daemons writing the same lake would both append the same changes and race on the
//! same positions.
//!
//! # Local lakes: a file lock
//! An exclusive OS file lock (`flock`) on `<lake>/_wal2delta/daemon.lock`, held for the
//! life of the process: the kernel releases it when the process dies, even by SIGKILL, so
//! a crash never leaves a stale lock. The file holds the owner's pid for people to read;
//! the lock, not the file, decides.
//!
//! # Object stores: a lease
//! `<lake>/_wal2delta/lease.json` names its holder (host, pid, since) and is renewed every
//! third of `lake.lease_seconds` with a conditional write (`If-Match` the version this
//! daemon wrote last). Every write changes the content (a sequence number), so versions
//! never repeat.
//! - **Taking it.** Absent, or released by a clean stop: created or replaced with a
//!   conditional write. Held: the newcomer watches it for the holder's lease time plus a
//!   second. Renewed meanwhile → the holder is alive and the newcomer is refused, naming
//!   it. Unchanged → the holder is gone (SIGKILL, crash) and the newcomer replaces it,
//!   conditionally on the version it watched. No clocks are compared between hosts.
//! - **Fencing.** A holder trusts its lease until `lease` after it *sent* its last
//!   successful renewal; a newcomer can replace it only after watching it unchanged for
//!   longer than that. Every Delta commit checks [`fence`] first: past that time it commits
//!   nothing (a transient error: the daemon pauses and retries), and once a renewal finds
//!   the lease replaced, the daemon stops ([`LakeLock::lost`]). The commit itself is a
//!   conditional write on the next version, and its application transaction conflicts
//!   with any commit another writer made meanwhile, so even a commit already in flight
//!   when the pause began cannot land on top of the new holder's.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Seek, Write};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, UpdateVersion};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::{Lake, LakeError};

/// The lease object, under the lake root.
const LEASE: &str = "_wal2delta/lease.json";

/// Attempts at the lock file, 50 ms apart, before a start gives up (a `status` probe
/// holds it for microseconds).
const PROBE_RETRIES: u32 = 20;

/// Held while the daemon runs; dropping it releases a file lock at once and stops renewing
/// a lease (call [`LakeLock::release`] to hand a lease over without waiting it out).
#[derive(Debug)]
pub enum LakeLock {
    File(File),
    Lease(Lease),
}

impl LakeLock {
    /// Takes the lock or explains who holds it. On an object store this may wait up to
    /// the holder's lease time to see whether the holder is alive.
    pub async fn acquire(lake: &Lake) -> Result<LakeLock, LakeError> {
        if lake.is_object_store() {
            return Lease::take(lake).await.map(LakeLock::Lease);
        }
        // `status` (`holder`) probes the lock by taking it for an instant: a start that
        // meets the probe tries again for a moment before it says another daemon runs.
        let mut tries = 0;
        loop {
            match lock_file(lake) {
                Err(LakeError::Locked { .. }) if tries < PROBE_RETRIES => {
                    tries += 1;
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
                result => return result.map(LakeLock::File),
            }
        }
    }

    /// Who holds the lock, if anyone. On an object store: whoever the lease names, unless
    /// it was released or not renewed for longer than its lease time (by this host's clock).
    pub async fn holder(lake: &Lake) -> Result<Option<String>, LakeError> {
        if !lake.is_object_store() {
            return file_holder(lake);
        }
        match read_lease(lake).await? {
            None => Ok(None),
            Some((record, _)) if record.released => Ok(None),
            Some((record, _)) => {
                let stale = chrono::DateTime::parse_from_rfc3339(&record.renewed)
                    .map(|t| {
                        let age = chrono::Utc::now().signed_duration_since(t);
                        age.num_seconds() > record.lease_seconds as i64
                    })
                    .unwrap_or(false);
                Ok((!stale).then(|| record.owner()))
            }
        }
    }

    /// Resolves with the new holder when another daemon took the lease over; never for a
    /// file lock.
    pub fn lost(&self) -> impl Future<Output = String> + Send + 'static {
        let receiver = match self {
            LakeLock::File(_) => None,
            LakeLock::Lease(lease) => Some(lease.lost.clone()),
        };
        async move {
            let Some(mut lost) = receiver else {
                return std::future::pending().await;
            };
            loop {
                if let Some(holder) = lost.borrow_and_update().clone() {
                    return holder;
                }
                if lost.changed().await.is_err() {
                    return std::future::pending().await;
                }
            }
        }
    }

    /// Releases the lock; a lease is marked released so the next daemon need not wait.
    pub async fn release(self) {
        if let LakeLock::Lease(lease) = self {
            lease.release().await;
        }
    }
}

fn lock_file(lake: &Lake) -> Result<File, LakeError> {
    let err = |message: String| LakeError::Location {
        location: lake.root().to_string(),
        message,
    };
    let Ok(root) = lake.root().to_file_path() else {
        return Err(err("not a local directory".into()));
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
    Ok(file)
}

fn file_holder(lake: &Lake) -> Result<Option<String>, LakeError> {
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

/// What the lease object says.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct LeaseRecord {
    host: String,
    pid: u32,
    since: String,
    renewed: String,
    lease_seconds: u64,
    /// Grows with every write, so no two writes have the same content (or ETag).
    seq: u64,
    released: bool,
}

impl LeaseRecord {
    fn owner(&self) -> String {
        format!(
            "host {} pid {}, holding since {}",
            self.host, self.pid, self.since
        )
    }
}

/// The process-wide commit fence: until when this process's lease is known to be held.
/// Unset (no lease: a local lake, or a process that only reads) lets every commit pass.
static FENCE: Mutex<Option<Fence>> = Mutex::new(None);

#[derive(Debug, Clone)]
struct Fence {
    renewed: Instant,
    valid_until: Instant,
    lost: Option<String>,
}

fn set_fence(fence: Option<Fence>) {
    *FENCE.lock().unwrap_or_else(|e| e.into_inner()) = fence;
}

fn update_fence(apply: impl FnOnce(&mut Fence)) {
    if let Some(fence) = FENCE.lock().unwrap_or_else(|e| e.into_inner()).as_mut() {
        apply(fence);
    }
}

/// Fails when this process holds a lease it cannot be sure of any more: every commit
/// checks this first.
pub fn fence() -> Result<(), LakeError> {
    let fence = FENCE.lock().unwrap_or_else(|e| e.into_inner()).clone();
    match fence {
        None => Ok(()),
        Some(Fence {
            lost: Some(holder), ..
        }) => Err(LakeError::LeaseLost { holder }),
        Some(f) if Instant::now() >= f.valid_until => Err(LakeError::LeaseExpired {
            seconds: f.renewed.elapsed().as_secs(),
        }),
        Some(_) => Ok(()),
    }
}

/// A lease this daemon holds, renewed by a background task. (`Debug` leaves the store
/// out: some stores' own `Debug` shows their credentials.)
pub struct Lease {
    store: Arc<dyn ObjectStore>,
    /// What this daemon wrote last and its version, shared with the renewing task.
    state: Arc<tokio::sync::Mutex<(LeaseRecord, UpdateVersion)>>,
    lost: watch::Receiver<Option<String>>,
    stop: CancellationToken,
}

impl std::fmt::Debug for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lease").finish_non_exhaustive()
    }
}

impl LeaseRecord {
    /// Whether `other` was written by the same holder (this process, this lease).
    fn same_holder(&self, other: &LeaseRecord) -> bool {
        self.host == other.host && self.pid == other.pid && self.since == other.since
    }
}

fn storage_err(what: &str) -> impl FnOnce(object_store::Error) -> LakeError + '_ {
    move |source| LakeError::Storage {
        what: what.to_string(),
        source,
    }
}

async fn read_lease(lake: &Lake) -> Result<Option<(LeaseRecord, UpdateVersion)>, LakeError> {
    read_lease_from(lake.store().as_ref()).await
}

async fn read_lease_from(
    store: &dyn ObjectStore,
) -> Result<Option<(LeaseRecord, UpdateVersion)>, LakeError> {
    match store.get(&Path::from(LEASE)).await {
        Err(object_store::Error::NotFound { .. }) => Ok(None),
        Err(e) => Err(storage_err("reading the lease _wal2delta/lease.json")(e)),
        Ok(got) => {
            let version = UpdateVersion {
                e_tag: got.meta.e_tag.clone(),
                version: got.meta.version.clone(),
            };
            let bytes = got
                .bytes()
                .await
                .map_err(storage_err("reading the lease _wal2delta/lease.json"))?;
            // An unreadable lease (written by hand?) counts as one held by nobody alive:
            // it is watched and replaced like a dead holder's.
            let record = serde_json::from_slice(&bytes).unwrap_or(LeaseRecord {
                host: "?".into(),
                pid: 0,
                since: "?".into(),
                renewed: "?".into(),
                lease_seconds: 0,
                seq: 0,
                released: false,
            });
            Ok(Some((record, version)))
        }
    }
}

/// Writes `record` over the version `expected` (or as a new object), returning the new
/// version, or `None` when someone else wrote the lease first.
async fn write_lease(
    store: &dyn ObjectStore,
    record: &LeaseRecord,
    expected: Option<UpdateVersion>,
) -> Result<Option<UpdateVersion>, object_store::Error> {
    let body = serde_json::to_vec_pretty(record).unwrap_or_default();
    let mode = match expected {
        None => PutMode::Create,
        Some(v) => PutMode::Update(v),
    };
    let options = PutOptions {
        mode,
        ..Default::default()
    };
    match store
        .put_opts(&Path::from(LEASE), body.into(), options)
        .await
    {
        Ok(put) => Ok(Some(UpdateVersion {
            e_tag: put.e_tag,
            version: put.version,
        })),
        Err(object_store::Error::AlreadyExists { .. })
        | Err(object_store::Error::Precondition { .. }) => Ok(None),
        Err(e) => Err(e),
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "unknown-host".into())
}

impl Lease {
    async fn take(lake: &Lake) -> Result<Lease, LakeError> {
        let lease = lake.lease();
        let now = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
        let mut record = LeaseRecord {
            host: hostname(),
            pid: std::process::id(),
            since: now.clone(),
            renewed: now,
            lease_seconds: lease.as_secs(),
            seq: 0,
            released: false,
        };
        let what = "taking the lease _wal2delta/lease.json";
        let store = lake.store().clone();
        loop {
            let expected = match read_lease(lake).await? {
                None => None,
                Some((held, version)) if held.released => {
                    record.seq = held.seq + 1;
                    Some(version)
                }
                Some((_, version)) if version.e_tag.is_none() && version.version.is_none() => {
                    return Err(LakeError::Location {
                        location: lake.root().to_string(),
                        message: "the store gives the lease object no ETag or version, so it \
                                  cannot be taken or renewed safely; use a store that supports \
                                  conditional writes"
                            .into(),
                    });
                }
                Some((held, version)) => {
                    // Held, or left by a daemon that died: watch whether it is renewed.
                    let wait = Duration::from_secs(held.lease_seconds.max(lease.as_secs()) + 1);
                    tracing::info!(holder = %held.owner(), wait_s = wait.as_secs(), "the lake's lease is held; waiting to see whether its holder renews it");
                    if !unchanged_for(lake, &version, wait).await? {
                        match read_lease(lake).await? {
                            Some((now_held, _)) if !now_held.released => {
                                return Err(LakeError::Locked {
                                    path: format!("{}{LEASE}", lake.root()),
                                    owner: now_held.owner(),
                                });
                            }
                            _ => continue, // released or deleted meanwhile: look again
                        }
                    }
                    tracing::warn!(previous = %held.owner(), "taking over the lake's lease: its holder did not renew it for {} s", wait.as_secs());
                    record.seq = held.seq + 1;
                    Some(version)
                }
            };
            record.renewed =
                chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
            let sent = Instant::now();
            let written = write_lease(store.as_ref(), &record, expected)
                .await
                .map_err(storage_err(what))?;
            let Some(version) = written else {
                continue; // someone else wrote it first: look again
            };
            set_fence(Some(Fence {
                renewed: sent,
                valid_until: sent + lease,
                lost: None,
            }));
            tracing::info!(lease_s = lease.as_secs(), "holding the lake's lease");
            return Ok(Lease::renewing(lake, record, version));
        }
    }

    fn renewing(lake: &Lake, record: LeaseRecord, version: UpdateVersion) -> Lease {
        let (lost_tx, lost) = watch::channel(None);
        let stop = CancellationToken::new();
        let state = Arc::new(tokio::sync::Mutex::new((record, version)));
        let lease = Lease {
            store: lake.store().clone(),
            state: state.clone(),
            lost,
            stop: stop.clone(),
        };
        let store = lake.store().clone();
        let lease_time = lake.lease();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(lease_time / 3) => {}
                }
                let mut state = state.lock().await;
                if stop.is_cancelled() {
                    return; // released meanwhile
                }
                let (record, version) = &mut *state;
                record.seq += 1;
                record.renewed =
                    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
                let sent = Instant::now();
                match write_lease(store.as_ref(), record, Some(version.clone())).await {
                    Ok(Some(next)) => {
                        *version = next;
                        update_fence(|f| {
                            f.renewed = sent;
                            f.valid_until = sent + lease_time;
                        });
                    }
                    Ok(None) => {
                        let now = read_lease_from(store.as_ref()).await;
                        // A renewal that landed although its answer was lost (a timeout,
                        // a retried 5xx) makes the next one fail: it is still ours.
                        if let Ok(Some((found, found_version))) = &now
                            && record.same_holder(found)
                            && !found.released
                            && found.seq >= record.seq
                        {
                            record.seq = found.seq;
                            *version = found_version.clone();
                            update_fence(|f| {
                                f.renewed = sent;
                                f.valid_until = sent + lease_time;
                            });
                            continue;
                        }
                        let holder = match now {
                            Ok(Some((r, _))) => r.owner(),
                            _ => "unknown".into(),
                        };
                        tracing::error!(%holder, "another daemon took over the lake's lease");
                        update_fence(|f| f.lost = Some(holder.clone()));
                        let _ = lost_tx.send(Some(holder));
                        return;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot renew the lake's lease; retrying");
                    }
                }
            }
        });
        lease
    }

    /// Stops renewing and marks the lease released, if it is still ours.
    async fn release(self) {
        self.stop.cancel();
        // Held through the write, so a renewal cannot race it.
        let state = self.state.lock().await;
        let (mut record, version) = state.clone();
        record.seq += 1;
        record.released = true;
        record.renewed = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
        let released = write_lease(self.store.as_ref(), &record, Some(version)).await;
        drop(state);
        match released {
            Ok(Some(_)) => tracing::info!("released the lake's lease"),
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(error = %e, "cannot release the lake's lease; the next daemon waits for it to expire")
            }
        }
        set_fence(None);
    }
}

/// Whether the lease stays at `version` for `wait` (its holder is gone).
async fn unchanged_for(
    lake: &Lake,
    version: &UpdateVersion,
    wait: Duration,
) -> Result<bool, LakeError> {
    let watched = Instant::now();
    while watched.elapsed() < wait {
        tokio::time::sleep(Duration::from_millis(500)).await;
        match lake.store().head(&Path::from(LEASE)).await {
            Ok(meta) if meta.e_tag == version.e_tag => {}
            Ok(_) | Err(object_store::Error::NotFound { .. }) => return Ok(false),
            Err(e) => return Err(storage_err("watching the lease _wal2delta/lease.json")(e)),
        }
    }
    Ok(true)
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}
