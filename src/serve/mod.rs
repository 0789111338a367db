//! The SQL endpoint: the lake over the Postgres wire protocol, for `psql`, drivers and BI
//! tools.
//!
//! # Design
//! - Our own listener, TLS and authentication (`auth`); pgwire runs the protocol and
//!   datafusion-postgres the queries (`session`). TLS is configured or absent: a certificate
//!   that cannot be loaded stops the start instead of falling back to plaintext.
//! - Every statement reads one consistent lake position (`view`). The positions come from
//!   the checkpoint table: [`follow`] takes each record the applier in this process
//!   writes from the channel the pipeline hands over (new data is visible as soon as its
//!   batch is committed), and re-reads the table every `serve.poll_interval_ms` (records
//!   written by another process: `wal2delta serve` next to a daemon elsewhere).
//! - `run` serves next to replication; `wal2delta serve` serves a lake read-only (another
//!   host can serve the same lake); both use this module.
//! - Read-only is decided on the parsed statement (`read_only`).
//! - Sessions run on the endpoint's own threads ([`SqlRuntime`]), at a lower CPU priority
//!   than replication, so a storm of heavy statements cannot stall the apply loop; their
//!   memory is bounded by `budget` and `growth`.

pub mod auth;
pub mod bounded_map;
pub mod budget;
pub mod cancel;
pub mod catalog_columns;
pub mod catalog_functions;
pub mod column_names;
pub mod config;
pub mod copy_out;
pub mod cork;
pub mod dv_scan;
pub mod grants;
pub mod growth;
pub mod held_batches;
pub mod lookup;
pub mod namespace;
pub mod plan_cache;
pub mod primary_keys;
pub mod read_only;
pub mod rewrite;
pub mod session;
pub mod view;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use datafusion_postgres::pgwire;
use pgwire::api::PgWireServerHandlers;
use tokio::sync::{Semaphore, watch};
use tokio_util::sync::CancellationToken;

use crate::lake::Lake;
use crate::lake::checkpoint::CheckpointRecord;
use auth::{Policy, Refusal, Startup};
use config::ServeSettings;
use session::{Session, Shared};
use view::{Position, Views};

/// The endpoint could not start. Each names the setting to fix.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(
        "cannot use the TLS {what} {path}: {message}; fix the file, or remove serve.tls_cert and serve.tls_key to serve without TLS"
    )]
    Tls {
        what: &'static str,
        path: String,
        message: String,
    },
    #[error(
        "cannot listen on {addr} (serve.listen): {source}; another process may hold the port: pick another address, or set serve.listen = \"off\""
    )]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}; fix or remove the file (serve.refined_dir)")]
    Refined(#[from] view::RefinedError),
    #[error("cannot read the lake's checkpoint: {0}")]
    Lake(String),
    #[error("the lake cannot be served under its source names: {0}")]
    Namespace(String),
    #[error(
        "cannot start the SQL endpoint's threads: {0}; the host may be out of threads or memory (check ulimit -u and the unit's TasksMax)"
    )]
    Threads(std::io::Error),
}

/// How much nicer than the rest of the daemon the SQL threads run (`nice` steps): at 10,
/// the kernel gives a busy replication thread about ten times the CPU of a busy SQL one.
pub const SQL_NICE: i32 = 10;

/// The threads SQL sessions run on, with their DataFusion work and reads; shut down
/// (sessions dropped) when the endpoint stops.
struct SqlRuntime(Option<tokio::runtime::Runtime>);

impl SqlRuntime {
    fn start() -> Result<SqlRuntime, ServeError> {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(std::thread::available_parallelism().map_or(2, |n| n.get()))
            .thread_name("wal2delta-sql")
            .on_thread_start(lower_priority)
            .enable_all()
            .build()
            .map(|r| SqlRuntime(Some(r)))
            .map_err(ServeError::Threads)
    }

    fn handle(&self) -> &tokio::runtime::Handle {
        self.0.as_ref().expect("running until dropped").handle()
    }
}

impl Drop for SqlRuntime {
    fn drop(&mut self) {
        // Dropped inside the daemon's runtime, where a blocking shutdown is not allowed.
        if let Some(runtime) = self.0.take() {
            runtime.shutdown_background();
        }
    }
}

/// Lowers the calling thread's CPU priority by [`SQL_NICE`] (Linux sets niceness per
/// thread). Failing is harmless: the thread keeps the process's priority.
fn lower_priority() {
    #[cfg(target_os = "linux")]
    // SAFETY: plain system calls on the calling thread's own id; no memory is shared.
    unsafe {
        let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
        *libc::__errno_location() = 0;
        let current = libc::getpriority(libc::PRIO_PROCESS, tid);
        let current = if *libc::__errno_location() == 0 {
            current
        } else {
            0
        };
        libc::setpriority(libc::PRIO_PROCESS, tid, (current + SQL_NICE).min(19));
    }
}

/// Loads the certificate chain and key; any problem is an error (never plaintext).
fn tls_acceptor(cert: &Path, key: &Path) -> Result<pgwire::tokio::TlsAcceptor, ServeError> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let cert_err = |message: String| ServeError::Tls {
        what: "certificate",
        path: cert.display().to_string(),
        message,
    };
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .map_err(|e| cert_err(e.to_string()))?
        .collect::<Result<_, _>>()
        .map_err(|e| cert_err(e.to_string()))?;
    if certs.is_empty() {
        return Err(cert_err("the file holds no PEM certificate".into()));
    }
    let key = PrivateKeyDer::from_pem_file(key).map_err(|e| ServeError::Tls {
        what: "key",
        path: key.display().to_string(),
        message: e.to_string(),
    })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| cert_err(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| {
            cert_err(format!(
                "certificate and key do not form a usable pair: {e}"
            ))
        })?;
    config.alpn_protocols = vec![b"postgresql".to_vec()];
    Ok(pgwire::tokio::TlsAcceptor::from(Arc::new(config)))
}

/// One connection's handlers.
struct Connection {
    session: Arc<Session>,
    startup: Arc<Startup>,
    cancels: Arc<cancel::Cancels>,
}

impl PgWireServerHandlers for Connection {
    fn simple_query_handler(&self) -> Arc<impl pgwire::api::query::SimpleQueryHandler> {
        self.session.clone()
    }

    fn extended_query_handler(&self) -> Arc<impl pgwire::api::query::ExtendedQueryHandler> {
        self.session.clone()
    }

    fn error_handler(&self) -> Arc<impl pgwire::api::ErrorHandler> {
        self.session.clone()
    }

    fn startup_handler(&self) -> Arc<impl pgwire::api::auth::StartupHandler> {
        self.startup.clone()
    }

    fn cancel_handler(&self) -> Arc<impl pgwire::api::cancel::CancelHandler> {
        self.cancels.handler()
    }
}

/// Keeps `latest` at the newest checkpoint record until `cancel`: each record published
/// on `records` (the applier in this process) at once, and what the checkpoint table
/// holds every `every`. The lookup targets sessions used are made at a record before it
/// is published (`Views::prepare_lookups`): usually a few milliseconds later (200 ms at
/// most), and no session waits for them.
pub async fn follow(
    views: Arc<Views>,
    latest: watch::Sender<Option<Position>>,
    mut records: Option<watch::Receiver<Option<CheckpointRecord>>>,
    every: Duration,
    cancel: CancellationToken,
) {
    let mut failing = false;
    loop {
        // Branch order is priority order: stop, then a record from this process.
        let published = tokio::select! {
            biased;
            _ = cancel.cancelled() => return,
            changed = next_record(&mut records) => changed,
            _ = tokio::time::sleep(every) => None,
        };
        if let Some(record) = published {
            views.prepare_lookups(&record).await;
            advance(&latest, Some(record));
            continue;
        }
        match views.latest_position().await {
            Ok(p) => {
                failing = false;
                if let Some(p) = &p {
                    views.prepare_lookups(p).await;
                }
                advance(&latest, p);
            }
            Err(e) if !failing => {
                failing = true;
                tracing::warn!(error = %e, "the SQL endpoint cannot read the lake's checkpoint; serving the last position it read");
            }
            Err(_) => {}
        }
    }
}

/// The next record published on `records`; pending forever without a channel or once
/// the publisher is gone (polling goes on).
async fn next_record(
    records: &mut Option<watch::Receiver<Option<CheckpointRecord>>>,
) -> Option<CheckpointRecord> {
    let Some(rx) = records.as_mut() else {
        return std::future::pending().await;
    };
    if rx.changed().await.is_err() {
        *records = None;
        return std::future::pending().await;
    }
    rx.borrow_and_update().clone()
}

/// Moves `latest` to `position` (the newest record) unless it is the same. No LSN
/// comparison: a newer record may carry a lower LSN (streaming resumes below a snapshot
/// copied from a temporary slot). A poll never undoes a published record, as records are
/// published after their commit and taken in turn with the polls.
fn advance(latest: &watch::Sender<Option<Position>>, position: Option<Position>) {
    latest.send_if_modified(|current| {
        if *current != position {
            *current = position;
            true
        } else {
            false
        }
    });
}

/// Sets the endpoint up and returns the task that serves until `cancel` (the caller
/// spawns and joins it). TLS, the refined views and the address are checked before this
/// returns, so a bad setting stops the start.
pub async fn start(
    settings: &ServeSettings,
    lake: Lake,
    records: Option<watch::Receiver<Option<CheckpointRecord>>>,
    keys: primary_keys::PrimaryKeys,
    cancel: CancellationToken,
) -> Result<impl std::future::Future<Output = ()> + Send + 'static, ServeError> {
    let tls = match &settings.tls {
        Some((cert, key)) => Some(tls_acceptor(cert, key)?),
        None => None,
    };
    let refined = view::load_refined(&settings.refined_dir)?;
    let refined_count = refined.len();
    let views =
        Arc::new(Views::new(lake, refined, settings.namespace.clone()).with_keys(keys.clone()));
    let first = views
        .latest_position()
        .await
        .map_err(|e| ServeError::Lake(e.to_string()))?;
    // `run` checks the configured tables; `serve` may read a lake with others.
    if let Some(p) = &first
        && let Some(clash) = settings
            .namespace
            .clashes(&p.versions.tables())
            .into_iter()
            .next()
    {
        return Err(ServeError::Namespace(clash));
    }
    let (latest, latest_rx) = watch::channel(first);
    let listener = tokio::net::TcpListener::bind(settings.listen)
        .await
        .map_err(|source| ServeError::Bind {
            addr: settings.listen,
            source,
        })?;
    let addr = listener.local_addr().unwrap_or(settings.listen);
    tracing::info!(
        %addr,
        tls = tls.is_some(),
        require_tls = settings.require_tls,
        users = settings.users.len(),
        refined_views = refined_count,
        "SQL endpoint listening (psql \"host={} port={} dbname={}\")",
        addr.ip(),
        addr.port(),
        view::DATABASE
    );
    tokio::spawn(follow(
        views.clone(),
        latest,
        records,
        settings.poll_interval,
        cancel.clone(),
    ));
    let shared = Arc::new(Shared::new(views, latest_rx, settings, keys));
    let policy = Arc::new(Policy {
        users: settings.users.clone(),
        require_tls: settings.require_tls,
    });
    let cancels = Arc::new(cancel::Cancels::default());
    let max = settings.max_connections;
    let slots = Arc::new(Semaphore::new(max));
    let runtime = SqlRuntime::start()?;
    Ok(async move {
        loop {
            let accepted = tokio::select! {
                _ = cancel.cancelled() => return,
                a = listener.accept() => a,
            };
            let (socket, peer) = match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "SQL endpoint: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            // As Postgres does: a response's messages go out as written. With Nagle's
            // algorithm an extended-protocol answer (several small writes) waited for the
            // client's delayed ACK: prepared lookups ran at half the rate of simple ones.
            if let Err(e) = socket.set_nodelay(true) {
                tracing::debug!(error = %e, "SQL endpoint: cannot set TCP_NODELAY");
            }
            let permit = slots.clone().try_acquire_owned().ok();
            let refusal = permit.is_none().then(|| {
                crate::telemetry::sql_connection_refused();
                Refusal {
                    code: "53300",
                    message: format!(
                        "sorry, too many clients already (serve.max_connections = {max})"
                    ),
                }
            });
            // The descriptor stays open while the session runs (`cork::Cork::new`).
            let fd = std::os::fd::AsRawFd::as_raw_fd(&socket);
            let handlers = Connection {
                session: Arc::new(Session::new(shared.clone(), cork::Cork::new(Some(fd)))),
                startup: Arc::new(Startup::new(policy.clone(), cancels.clone(), refusal)),
                cancels: cancels.clone(),
            };
            let tls = tls.clone();
            // Registered again with the SQL threads' reactor, where the session runs.
            let socket = match socket.into_std() {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(%peer, error = %e, "SQL endpoint: cannot hand the connection over");
                    continue;
                }
            };
            runtime.handle().spawn(async move {
                let _connected = permit.map(|p| (p, crate::telemetry::SqlConnection::open()));
                let socket = match tokio::net::TcpStream::from_std(socket) {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::warn!(%peer, error = %e, "SQL endpoint: cannot serve the connection");
                        return;
                    }
                };
                if let Err(e) = pgwire::tokio::process_socket(socket, tls, handlers).await {
                    tracing::debug!(%peer, error = %e, "SQL connection ended with an error");
                }
            });
        }
    })
}

/// `wal2delta serve`: the endpoint alone, reading the lake, until `cancel`.
pub async fn serve_only(
    settings: &ServeSettings,
    lake: Lake,
    cancel: CancellationToken,
) -> Result<(), ServeError> {
    // No source connection: no primary keys to report.
    let endpoint = start(settings, lake, None, Default::default(), cancel).await?;
    crate::service::ready("serving the lake read-only");
    endpoint.await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lake::checkpoint::TableVersions;
    use crate::lsn::Lsn;

    fn record(lsn: u64, raw_version: u64) -> Position {
        let mut versions = TableVersions::default();
        versions.raw.insert("public.t".into(), raw_version);
        Position {
            lsn: Lsn(lsn),
            commit_ts: None,
            versions,
        }
    }

    #[test]
    fn the_newest_record_is_shown_even_with_a_lower_lsn() {
        let (latest, mut rx) = watch::channel(None);
        advance(&latest, Some(record(200, 1)));
        // Streaming resumed below a snapshot copied from a temporary slot: the newer
        // record has the lower LSN and must still be served.
        advance(&latest, Some(record(150, 2)));
        assert_eq!(*rx.borrow_and_update(), Some(record(150, 2)));
        // The same record again does not wake readers.
        advance(&latest, Some(record(150, 2)));
        assert!(!rx.has_changed().unwrap());
    }
}
