//! The replication connection: Postgres's streaming replication protocol on tokio.
//!
//! tokio-postgres cannot open a `replication=database` session, so this module speaks the
//! protocol itself, using postgres-protocol for message encoding and SCRAM/MD5
//! authentication. It does start-up (TLS per `sslmode`, trust / cleartext / MD5 /
//! SCRAM-SHA-256), simple queries (`IDENTIFY_SYSTEM`, `CREATE_REPLICATION_SLOT`), and then
//! the CopyBoth stream: XLogData and keepalive messages in, standby status updates out.
//!
//! Session settings are fixed at start-up (`DateStyle=ISO`, `TimeZone=UTC`,
//! `IntervalStyle=iso_8601`, `extra_float_digits=3`, `bytea_output=hex`) because pgoutput
//! sends values in text form, and the decoder relies on exactly these formats.

use std::io;
use std::pin::Pin;
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};
use postgres_protocol::message::frontend;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpStream, UnixStream};

use super::cursor::{Cursor, Malformed};
use super::dsn::{ConnParams, Host, SslMode};
use super::sqlstate;
use super::tls::{self, TlsError};
use crate::lsn::Lsn;
use crate::table_name::{quote_ident, quote_literal};

/// Largest backend message accepted: Postgres cannot build a message over 1 GB.
const MAX_MESSAGE_LEN: usize = 1 << 30;

/// How long slot creation may wait before the log says what it waits for.
const SLOW_SLOT_CREATION: Duration = Duration::from_secs(10);

/// Microseconds between the Unix epoch and the Postgres epoch (2000-01-01).
pub const PG_EPOCH_OFFSET_MICROS: i64 = 946_684_800_000_000;

/// An error reported by the server, with its SQLSTATE.
#[derive(Debug, Clone)]
pub struct ServerError {
    pub severity: String,
    pub code: String,
    pub message: String,
    pub detail: Option<String>,
    pub hint: Option<String>,
}

impl std::fmt::Display for ServerError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} (SQLSTATE {})", self.message, self.code)?;
        if let Some(d) = &self.detail {
            write!(f, "; {d}")?;
        }
        if let Some(h) = &self.hint {
            write!(f, "; hint: {h}")?;
        }
        Ok(())
    }
}

/// What went wrong on the replication connection.
#[derive(Debug, thiserror::Error)]
pub enum ReplicationError {
    #[error("cannot reach the source at {target}: {source}")]
    Connect {
        target: String,
        #[source]
        source: io::Error,
    },
    #[error("timed out after {0:?} connecting to the source")]
    ConnectTimeout(Duration),
    #[error("the replication connection failed: {0}")]
    Io(#[from] io::Error),
    #[error("the server requires TLS settings we refuse: {0}")]
    TlsRefused(String),
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("authentication failed: {0}")]
    Auth(String),
    #[error("the server reported: {0}")]
    Server(ServerError),
    #[error("protocol error on the replication connection: {0}")]
    Protocol(String),
    #[error(transparent)]
    Streamed(#[from] super::spill::StreamedError),
}

impl From<Malformed> for ReplicationError {
    fn from(m: Malformed) -> Self {
        ReplicationError::Protocol(m.0)
    }
}

impl ReplicationError {
    /// Transient errors are worth a reconnect with backoff; the rest need an operator.
    pub fn is_transient(&self) -> bool {
        match self {
            ReplicationError::Connect { .. }
            | ReplicationError::ConnectTimeout(_)
            | ReplicationError::Io(_)
            | ReplicationError::Streamed(super::spill::StreamedError::Spill(_)) => true,
            ReplicationError::Server(e) => sqlstate::is_transient(&e.code),
            _ => false,
        }
    }
}

trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

/// One message read off the CopyBoth stream.
#[derive(Debug)]
pub enum StreamMessage {
    /// WAL data: a pgoutput message and the LSN it starts at.
    XLogData {
        wal_start: Lsn,
        wal_end: Lsn,
        data: Bytes,
    },
    /// The server's keepalive, carrying its current WAL position.
    Keepalive { wal_end: Lsn, reply_requested: bool },
}

/// An open replication connection.
pub struct ReplicationConnection {
    stream: Pin<Box<dyn Stream>>,
    read_buf: BytesMut,
    write_buf: BytesMut,
    target: String,
}

/// What `IDENTIFY_SYSTEM` returns.
#[derive(Debug, Clone)]
pub struct SystemIdentity {
    pub system_id: String,
    pub timeline: u32,
    pub xlogpos: Lsn,
    pub dbname: String,
}

impl ReplicationConnection {
    /// Connects, negotiates TLS and authenticates, within the DSN's connect timeout.
    pub async fn connect(params: &ConnParams) -> Result<ReplicationConnection, ReplicationError> {
        let timeout = Duration::from_secs(params.connect_timeout_secs.max(1));
        tokio::time::timeout(timeout, Self::connect_inner(params))
            .await
            .map_err(|_| ReplicationError::ConnectTimeout(timeout))?
    }

    async fn connect_inner(params: &ConnParams) -> Result<ReplicationConnection, ReplicationError> {
        let target = params.to_string();
        let stream: Pin<Box<dyn Stream>> = match &params.host {
            Host::Unix(dir) => {
                let path = format!("{dir}/.s.PGSQL.{}", params.port);
                let s = UnixStream::connect(&path).await.map_err(|source| {
                    ReplicationError::Connect {
                        target: target.clone(),
                        source,
                    }
                })?;
                Box::pin(s)
            }
            Host::Tcp(host) => {
                let mut tcp = TcpStream::connect((host.as_str(), params.port))
                    .await
                    .map_err(|source| ReplicationError::Connect {
                        target: target.clone(),
                        source,
                    })?;
                tcp.set_nodelay(true)?;
                match tls::client_config(params)? {
                    None => Box::pin(tcp),
                    Some(config) => {
                        let mut buf = BytesMut::new();
                        frontend::ssl_request(&mut buf);
                        tcp.write_all(&buf).await?;
                        let answer = tcp.read_u8().await?;
                        match answer {
                            b'S' => {
                                let connector = tokio_rustls::TlsConnector::from(config);
                                let tls = connector
                                    .connect(tls::server_name(host)?, tcp)
                                    .await
                                    .map_err(|e| match e.kind() {
                                        // rustls reports certificate and protocol
                                        // rejections as InvalidData: an operator must act.
                                        io::ErrorKind::InvalidData => ReplicationError::TlsRefused(
                                            format!("the TLS handshake with {target} failed: {e}"),
                                        ),
                                        // A reset or EOF mid-handshake (server restarting).
                                        _ => ReplicationError::Io(e),
                                    })?;
                                Box::pin(tls)
                            }
                            b'N' if params.sslmode == SslMode::Prefer => Box::pin(tcp),
                            b'N' => {
                                return Err(ReplicationError::TlsRefused(format!(
                                    "{target} does not accept TLS but sslmode={:?} requires it; \
                                     enable ssl on the server or lower sslmode",
                                    params.sslmode
                                )));
                            }
                            other => {
                                return Err(ReplicationError::Protocol(format!(
                                    "unexpected answer {other:#x} to the TLS request"
                                )));
                            }
                        }
                    }
                }
            }
        };
        let mut conn = ReplicationConnection {
            stream,
            read_buf: BytesMut::with_capacity(64 * 1024),
            write_buf: BytesMut::new(),
            target,
        };
        conn.startup(params).await?;
        Ok(conn)
    }

    /// Sends the start-up packet and answers the server until it is ready for queries.
    async fn startup(&mut self, params: &ConnParams) -> Result<(), ReplicationError> {
        let startup_params = [
            ("user", params.user.as_str()),
            ("database", params.dbname.as_str()),
            ("replication", "database"),
            ("application_name", params.application_name.as_str()),
            ("client_encoding", "UTF8"),
            ("DateStyle", "ISO, YMD"),
            ("TimeZone", "UTC"),
            ("IntervalStyle", "iso_8601"),
            ("extra_float_digits", "3"),
            ("bytea_output", "hex"),
        ];
        frontend::startup_message(startup_params.iter().copied(), &mut self.write_buf)?;
        self.flush().await?;
        let mut scram: Option<ScramSha256> = None;
        loop {
            let (tag, body) = self.read_frame().await?;
            match tag {
                b'R' => self.authenticate(params, &body, &mut scram).await?,
                b'E' => {
                    let err = parse_error(&body)?;
                    return Err(if sqlstate::is_auth_failure(&err.code) {
                        ReplicationError::Auth(err.to_string())
                    } else {
                        ReplicationError::Server(err)
                    });
                }
                b'S' | b'K' | b'N' => {}
                b'Z' => return Ok(()),
                other => {
                    return Err(ReplicationError::Protocol(format!(
                        "unexpected message {:?} during start-up",
                        other as char
                    )));
                }
            }
        }
    }

    /// Answers one authentication request (`R` message): cleartext, MD5 or SCRAM-SHA-256
    /// (whose exchange state lives in `scram` between messages).
    async fn authenticate(
        &mut self,
        params: &ConnParams,
        body: &Bytes,
        scram: &mut Option<ScramSha256>,
    ) -> Result<(), ReplicationError> {
        const OK: i32 = 0;
        const CLEARTEXT: i32 = 3;
        const MD5: i32 = 5;
        const SASL: i32 = 10;
        const SASL_CONTINUE: i32 = 11;
        const SASL_FINAL: i32 = 12;
        let password = || {
            params.password.as_ref().ok_or_else(|| {
                ReplicationError::Auth(format!(
                    "the server asks {} for a password but none is configured; set it in the DSN, \
                     source.password_file or source.password_env",
                    params.user
                ))
            })
        };
        let mut c = Cursor::new(body);
        match c.i32("authentication request")? {
            OK => return Ok(()),
            CLEARTEXT => {
                frontend::password_message(password()?.expose().as_bytes(), &mut self.write_buf)?;
            }
            MD5 => {
                let salt: [u8; 4] = c
                    .take(4, "md5 salt")?
                    .try_into()
                    .map_err(|_| ReplicationError::Protocol("md5 salt".into()))?;
                let hash = postgres_protocol::authentication::md5_hash(
                    params.user.as_bytes(),
                    password()?.expose().as_bytes(),
                    salt,
                );
                frontend::password_message(hash.as_bytes(), &mut self.write_buf)?;
            }
            SASL => {
                let mut mechanisms = Vec::new();
                loop {
                    let m = c.cstr("SASL mechanism")?;
                    if m.is_empty() {
                        break;
                    }
                    mechanisms.push(m.to_string());
                }
                if !mechanisms.iter().any(|m| m == "SCRAM-SHA-256") {
                    return Err(ReplicationError::Auth(format!(
                        "the server offers only SASL mechanisms {mechanisms:?}; SCRAM-SHA-256 is supported"
                    )));
                }
                // Channel binding is not implemented: say so ("n"), never "y".
                let s = ScramSha256::new(
                    password()?.expose().as_bytes(),
                    ChannelBinding::unsupported(),
                );
                frontend::sasl_initial_response("SCRAM-SHA-256", s.message(), &mut self.write_buf)?;
                *scram = Some(s);
            }
            SASL_CONTINUE => {
                let s = scram.as_mut().ok_or_else(|| {
                    ReplicationError::Protocol("SASL continue before start".into())
                })?;
                s.update(c.rest())
                    .map_err(|e| ReplicationError::Auth(format!("SCRAM exchange failed: {e}")))?;
                frontend::sasl_response(s.message(), &mut self.write_buf)?;
            }
            SASL_FINAL => {
                let s = scram
                    .as_mut()
                    .ok_or_else(|| ReplicationError::Protocol("SASL final before start".into()))?;
                s.finish(c.rest()).map_err(|e| {
                    ReplicationError::Auth(format!("the server's SCRAM signature is wrong: {e}"))
                })?;
                return Ok(());
            }
            other => {
                return Err(ReplicationError::Auth(format!(
                    "the server asks for authentication method {other}, which is not supported \
                     (trust, password, md5 and scram-sha-256 are)"
                )));
            }
        }
        self.flush().await
    }

    async fn flush(&mut self) -> Result<(), ReplicationError> {
        self.stream.write_all(&self.write_buf).await?;
        self.stream.flush().await?;
        self.write_buf.clear();
        Ok(())
    }

    /// Reads one whole backend message: its tag and body. Cancel-safe: a cancelled call
    /// loses nothing, the bytes stay in the buffer for the next call.
    async fn read_frame(&mut self) -> Result<(u8, Bytes), ReplicationError> {
        loop {
            if self.read_buf.len() >= 5 {
                let len = u32::from_be_bytes([
                    self.read_buf[1],
                    self.read_buf[2],
                    self.read_buf[3],
                    self.read_buf[4],
                ]) as usize;
                if !(4..=MAX_MESSAGE_LEN).contains(&len) {
                    return Err(ReplicationError::Protocol(format!(
                        "message length {len} is out of range"
                    )));
                }
                if self.read_buf.len() > len {
                    let tag = self.read_buf[0];
                    let mut frame = self.read_buf.split_to(len + 1).freeze();
                    frame.advance(5);
                    return Ok((tag, frame));
                }
                self.read_buf.reserve(len + 1 - self.read_buf.len());
            }
            let n = self.stream.read_buf(&mut self.read_buf).await?;
            if n == 0 {
                return Err(ReplicationError::Io(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("{} closed the replication connection", self.target),
                )));
            }
        }
    }

    /// Runs a simple query and returns its rows as text.
    pub async fn simple_query(
        &mut self,
        sql: &str,
    ) -> Result<Vec<Vec<Option<String>>>, ReplicationError> {
        frontend::query(sql, &mut self.write_buf)?;
        self.flush().await?;
        let mut rows = Vec::new();
        let mut error = None;
        loop {
            let (tag, body) = self.read_frame().await?;
            match tag {
                b'D' => {
                    let mut c = Cursor::new(&body);
                    let n = c.i16("column count")?;
                    let mut row = Vec::with_capacity(n.max(0) as usize);
                    for _ in 0..n {
                        let len = c.i32("value length")?;
                        if len < 0 {
                            row.push(None);
                        } else {
                            let v = c.take(len as usize, "value")?;
                            row.push(Some(String::from_utf8_lossy(v).into_owned()));
                        }
                    }
                    rows.push(row);
                }
                b'E' => error = Some(parse_error(&body)?),
                b'T' | b'C' | b'N' | b'S' | b'I' => {}
                b'Z' => {
                    return match error {
                        Some(e) => Err(ReplicationError::Server(e)),
                        None => Ok(rows),
                    };
                }
                other => {
                    return Err(ReplicationError::Protocol(format!(
                        "unexpected message {:?} answering a query",
                        other as char
                    )));
                }
            }
        }
    }

    pub async fn identify_system(&mut self) -> Result<SystemIdentity, ReplicationError> {
        let rows = self.simple_query("IDENTIFY_SYSTEM").await?;
        let row = rows
            .first()
            .filter(|r| r.len() >= 4)
            .ok_or_else(|| ReplicationError::Protocol("IDENTIFY_SYSTEM returned no row".into()))?;
        let get = |i: usize| row[i].clone().unwrap_or_default();
        Ok(SystemIdentity {
            system_id: get(0),
            timeline: get(1).parse().unwrap_or(0),
            xlogpos: get(2)
                .parse()
                .map_err(|e| ReplicationError::Protocol(format!("IDENTIFY_SYSTEM xlogpos: {e}")))?,
            dbname: get(3),
        })
    }

    /// `CREATE_REPLICATION_SLOT … LOGICAL pgoutput`; returns the slot's consistent point.
    /// A `failover` slot (PostgreSQL 17+) is synchronized to standbys that ask for it.
    pub async fn create_slot(
        &mut self,
        slot: &str,
        failover: bool,
    ) -> Result<Lsn, ReplicationError> {
        Ok(self.create_slot_with(slot, false, false, failover).await?.0)
    }

    /// Creates a slot that exports a snapshot: returns the consistent point and the
    /// snapshot name, which other sessions may import (`SET TRANSACTION SNAPSHOT`) until
    /// this connection runs another command or closes. A `temporary` slot disappears with
    /// the connection.
    pub async fn create_slot_exporting(
        &mut self,
        slot: &str,
        temporary: bool,
        failover: bool,
    ) -> Result<(Lsn, String), ReplicationError> {
        let (lsn, name) = self
            .create_slot_with(slot, temporary, true, failover)
            .await?;
        let name = name.ok_or_else(|| {
            ReplicationError::Protocol("CREATE_REPLICATION_SLOT exported no snapshot".into())
        })?;
        Ok((lsn, name))
    }

    async fn create_slot_with(
        &mut self,
        slot: &str,
        temporary: bool,
        export: bool,
        failover: bool,
    ) -> Result<(Lsn, Option<String>), ReplicationError> {
        let options = match (export, failover) {
            // The option list (PostgreSQL 15+) is needed for FAILOVER (17+); the keywords
            // work on every version.
            (true, true) => "(SNAPSHOT 'export', FAILOVER true)",
            (false, true) => "(SNAPSHOT 'nothing', FAILOVER true)",
            (true, false) => "EXPORT_SNAPSHOT",
            (false, false) => "NOEXPORT_SNAPSHOT",
        };
        let sql = format!(
            "CREATE_REPLICATION_SLOT {}{} LOGICAL pgoutput {options}",
            quote_ident(slot),
            if temporary { " TEMPORARY" } else { "" },
        );
        // Postgres answers once every transaction running at the call has ended (on a
        // standby: once the primary has logged its running transactions), which can take
        // long on a busy or an idle server; say what it waits for.
        let query = self.simple_query(&sql);
        tokio::pin!(query);
        let rows = tokio::select! {
            rows = &mut query => rows?,
            _ = tokio::time::sleep(SLOW_SLOT_CREATION) => {
                tracing::warn!(
                    slot,
                    "creating the replication slot is waiting for the transactions running on the \
                     source to end (see pg_stat_activity for long ones); on a standby it waits for \
                     the primary to log its running transactions: SELECT pg_log_standby_snapshot(); \
                     on the primary ends the wait"
                );
                query.await?
            }
        };
        let row = rows.first();
        let lsn = row
            .and_then(|r| r.get(1).cloned().flatten())
            .ok_or_else(|| {
                ReplicationError::Protocol("CREATE_REPLICATION_SLOT returned no LSN".into())
            })?;
        let snapshot = row.and_then(|r| r.get(2).cloned().flatten());
        let lsn = lsn
            .parse()
            .map_err(|e| ReplicationError::Protocol(format!("CREATE_REPLICATION_SLOT: {e}")))?;
        Ok((lsn, snapshot))
    }

    /// `START_REPLICATION SLOT … LOGICAL start (proto_version '1', publication_names …)`,
    /// or with `streaming`, protocol 2 and `streaming 'on'` (PostgreSQL 14+): running
    /// transactions are sent before their commit. Returns once the server switched to
    /// CopyBoth mode.
    pub async fn start_replication(
        &mut self,
        slot: &str,
        start: Lsn,
        publication: &str,
        streaming: bool,
    ) -> Result<(), ReplicationError> {
        let protocol = if streaming {
            "proto_version '2', streaming 'on'"
        } else {
            "proto_version '1'"
        };
        let sql = format!(
            "START_REPLICATION SLOT {} LOGICAL {} ({protocol}, publication_names {}, messages 'true')",
            quote_ident(slot),
            start,
            quote_literal(&quote_ident(publication)),
        );
        frontend::query(&sql, &mut self.write_buf)?;
        self.flush().await?;
        loop {
            let (tag, body) = self.read_frame().await?;
            match tag {
                b'W' => return Ok(()),
                b'N' => {}
                b'E' => {
                    let err = parse_error(&body)?;
                    // Drain to ReadyForQuery is unnecessary: the caller drops the connection.
                    return Err(ReplicationError::Server(err));
                }
                other => {
                    return Err(ReplicationError::Protocol(format!(
                        "unexpected message {:?} answering START_REPLICATION",
                        other as char
                    )));
                }
            }
        }
    }

    /// The next XLogData or keepalive. Cancel-safe.
    pub async fn recv(&mut self) -> Result<StreamMessage, ReplicationError> {
        loop {
            let (tag, body) = self.read_frame().await?;
            match tag {
                b'd' => {
                    let mut c = Cursor::new(&body);
                    match c.u8("copy data kind")? {
                        b'w' => {
                            let wal_start = Lsn(c.u64("XLogData start")?);
                            let wal_end = Lsn(c.u64("XLogData end")?);
                            let _send_time = c.i64("XLogData time")?;
                            let header = 1 + 8 + 8 + 8;
                            return Ok(StreamMessage::XLogData {
                                wal_start,
                                wal_end,
                                data: body.slice(header..),
                            });
                        }
                        b'k' => {
                            let wal_end = Lsn(c.u64("keepalive end")?);
                            let _send_time = c.i64("keepalive time")?;
                            let reply_requested = c.u8("keepalive reply flag")? == 1;
                            return Ok(StreamMessage::Keepalive {
                                wal_end,
                                reply_requested,
                            });
                        }
                        other => {
                            return Err(ReplicationError::Protocol(format!(
                                "unknown replication message kind {other:#x}"
                            )));
                        }
                    }
                }
                b'N' => {}
                b'E' => return Err(ReplicationError::Server(parse_error(&body)?)),
                // CopyDone, CommandComplete, ReadyForQuery: the server ended the stream
                // (it is shutting down); reconnecting is the answer.
                b'c' | b'C' | b'Z' => {
                    return Err(ReplicationError::Io(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the server ended the replication stream",
                    )));
                }
                other => {
                    return Err(ReplicationError::Protocol(format!(
                        "unexpected message {:?} in the replication stream",
                        other as char
                    )));
                }
            }
        }
    }

    /// Sends a standby status update: `received` is what we have read off the stream
    /// (shown as `write_lsn`), `flushed` what is durable in the lake (`flush_lsn`, the
    /// position the slot may advance to).
    pub async fn send_status(
        &mut self,
        received: Lsn,
        flushed: Lsn,
    ) -> Result<(), ReplicationError> {
        let now_pg = chrono::Utc::now().timestamp_micros() - PG_EPOCH_OFFSET_MICROS;
        let mut payload = Vec::with_capacity(34);
        payload.push(b'r');
        payload.extend_from_slice(&received.max(flushed).0.to_be_bytes()); // written
        payload.extend_from_slice(&flushed.0.to_be_bytes()); // flushed
        payload.extend_from_slice(&flushed.0.to_be_bytes()); // applied
        payload.extend_from_slice(&now_pg.to_be_bytes());
        payload.push(0); // no reply requested
        frontend::CopyData::new(&payload[..])?.write(&mut self.write_buf);
        self.flush().await
    }

    /// Ends the stream politely (CopyDone, Terminate). Errors are ignored: we are leaving.
    pub async fn close(mut self) {
        frontend::copy_done(&mut self.write_buf);
        frontend::terminate(&mut self.write_buf);
        let _ = tokio::time::timeout(Duration::from_secs(2), self.flush()).await;
    }
}

/// Parses an ErrorResponse / NoticeResponse body.
pub fn parse_error(body: &[u8]) -> Result<ServerError, Malformed> {
    let mut c = Cursor::new(body);
    let mut err = ServerError {
        severity: String::new(),
        code: String::new(),
        message: String::new(),
        detail: None,
        hint: None,
    };
    loop {
        let field = c.u8("error field type")?;
        if field == 0 {
            break;
        }
        let value = c.cstr("error field")?.to_string();
        match field {
            b'V' => err.severity = value,
            b'S' if err.severity.is_empty() => err.severity = value,
            b'C' => err.code = value,
            b'M' => err.message = value,
            b'D' => err.detail = Some(value),
            b'H' => err.hint = Some(value),
            _ => {}
        }
    }
    Ok(err)
}
