//! Test harness: disposable PostgreSQL clusters (via testcontainers/pg.sh), the daemon as a
//! real child process, a Delta reader, and waiting on conditions with clear failures.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use deltalake::arrow::array::Array;
use deltalake::arrow::util::display::{ArrayFormatter, FormatOptions};
use deltalake::datafusion::prelude::SessionContext;

const PG_SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/testcontainers/pg.sh");

/// A PostgreSQL cluster in a temporary directory, stopped and removed on drop.
pub struct PgCluster {
    dir: tempfile::TempDir,
    pub port: u16,
}

fn run_script(args: &[&str]) -> String {
    run_script_with(args, &[])
}

fn run_script_with(args: &[&str], env: &[(&str, &str)]) -> String {
    let out = Command::new("bash")
        .arg(PG_SCRIPT)
        .args(args)
        .envs(env.iter().copied())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {PG_SCRIPT}: {e}; bash is required"));
    if !out.status.success() {
        panic!(
            "testcontainers/pg.sh {args:?} failed: {}{}\nInstall the PostgreSQL server binaries \
             (apt-get install -y postgresql) or set PG_BINDIR.",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    String::from_utf8_lossy(&out.stdout).into_owned()
}

impl PgCluster {
    pub fn start() -> PgCluster {
        PgCluster::start_with(&[])
    }

    /// Starts a cluster with environment overrides for pg.sh (e.g. `PG_WAL_LEVEL`).
    pub fn start_with(env: &[(&str, &str)]) -> PgCluster {
        let dir = tempfile::Builder::new()
            .prefix("w2d-pg-")
            .tempdir()
            .expect("temp dir");
        let out = run_script_with(&["start", dir.path().to_str().expect("utf8 path")], env);
        let port = out
            .lines()
            .find_map(|l| l.strip_prefix("PGPORT="))
            .and_then(|p| p.trim().parse().ok())
            .unwrap_or_else(|| panic!("pg.sh start printed no PGPORT: {out}"));
        PgCluster { dir, port }
    }

    /// A key=value DSN for `user` on database `postgres`.
    pub fn dsn(&self, user: &str) -> String {
        format!(
            "host=127.0.0.1 port={} user={user} dbname=postgres sslmode=disable connect_timeout=5",
            self.port
        )
    }

    pub async fn client(&self) -> tokio_postgres::Client {
        let (client, conn) = tokio_postgres::connect(&self.dsn("postgres"), tokio_postgres::NoTls)
            .await
            .expect("connect to the test cluster");
        tokio::spawn(async move {
            let _ = conn.await;
        });
        client
    }

    /// The server's major version (14, 15, …).
    pub async fn major(&self) -> i32 {
        self.client()
            .await
            .query_one(
                "SELECT current_setting('server_version_num')::int / 10000",
                &[],
            )
            .await
            .expect("server version")
            .get(0)
    }

    /// The cluster's directory (owned by the server's user).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Stops the server (`fast` or `immediate`).
    pub fn stop(&self, mode: &str) {
        run_script(&["stop", self.dir.path().to_str().unwrap_or_default(), mode]);
    }

    /// Makes a physical standby of this cluster that streams through the physical slot
    /// `slot` and synchronizes failover slots (PostgreSQL 17+), and names `slot` in
    /// `synchronized_standby_slots` here. The data directory is copied while this server
    /// is stopped cleanly (the server packages tests use have no pg_basebackup); both run
    /// when this returns, this one on its port.
    pub fn standby(&self, slot: &str) -> PgCluster {
        self.standby_with(slot, true)
    }

    /// Like `standby`; with `sync_slots` false, neither server is set up for failover
    /// slots (the settings exist on 17+ only).
    pub fn standby_with(&self, slot: &str, sync_slots: bool) -> PgCluster {
        let data = self.dir.path().join("data");
        let append = |path: &Path, text: &str| {
            use std::io::Write;
            std::fs::OpenOptions::new()
                .append(true)
                .open(path)
                .and_then(|mut f| f.write_all(text.as_bytes()))
                .expect("append to postgresql.conf");
        };
        self.stop("fast");
        let dir = tempfile::Builder::new()
            .prefix("w2d-pg-standby-")
            .tempdir()
            .expect("temp dir");
        let copy = dir.path().join("data");
        let status = Command::new("cp")
            .args(["-a", data.to_str().unwrap(), copy.to_str().unwrap()])
            .status()
            .expect("run cp");
        assert!(status.success(), "copying the data directory failed");
        append(
            &copy.join("postgresql.conf"),
            &format!(
                "primary_conninfo = 'host=127.0.0.1 port={} user=postgres dbname=postgres'\n\
                 primary_slot_name = '{slot}'\nhot_standby_feedback = on\n{sync}",
                self.port,
                sync = if sync_slots {
                    "sync_replication_slots = on\n"
                } else {
                    ""
                },
            ),
        );
        std::fs::write(copy.join("standby.signal"), "").expect("standby.signal");
        // Only here: a promoted standby naming a standby it does not have would hold
        // logical replication back.
        if sync_slots {
            append(
                &data.join("postgresql.conf"),
                &format!("\nsynchronized_standby_slots = '{slot}'\n"),
            );
        }
        // As root, the server runs as another user, who must own what was just written.
        let _ = Command::new("chown")
            .args([
                "-R",
                "--reference",
                data.to_str().unwrap(),
                copy.to_str().unwrap(),
            ])
            .status();
        run_script(&[
            "start",
            self.dir.path().to_str().unwrap_or_default(),
            &self.port.to_string(),
        ]);
        // Owned before it starts: a failed start still stops it on drop.
        let mut standby = PgCluster { dir, port: 0 };
        let out = run_script(&["start", standby.dir.path().to_str().expect("utf8 path")]);
        standby.port = out
            .lines()
            .find_map(|l| l.strip_prefix("PGPORT="))
            .and_then(|p| p.trim().parse().ok())
            .unwrap_or_else(|| panic!("pg.sh start printed no PGPORT: {out}"));
        standby
    }

    pub fn restart(&self, mode: &str) {
        run_script(&[
            "restart",
            self.dir.path().to_str().unwrap_or_default(),
            mode,
        ]);
    }

    pub fn server_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        let _ = Command::new("bash")
            .arg(PG_SCRIPT)
            .args([
                "stop",
                self.dir.path().to_str().unwrap_or_default(),
                "immediate",
            ])
            .output();
    }
}

/// A test environment: a cluster, a lake directory and a config file.
pub struct Env {
    pub pg: PgCluster,
    pub dir: tempfile::TempDir,
    pub lake: PathBuf,
    pub config: PathBuf,
    pub slot: String,
    /// The port of the daemon's SQL endpoint (`[serve] listen`, loopback).
    pub serve_port: u16,
    /// An object-store lake (`s3://bucket/lake/`) instead of the local `lake` directory,
    /// with the config lines it needs.
    pub object_lake: Option<ObjectLake>,
}

/// A lake on the test S3 server.
pub struct ObjectLake {
    pub bucket: String,
    pub url: String,
    /// Lines inside `[lake]` (the lease time).
    pub lake_lines: String,
    /// `[lake.storage]`, appended to the config.
    pub storage: String,
}

/// A free loopback port (bound and released; good enough for tests).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

/// The `psql` client: next to the server binaries, on PATH, or under /usr/lib/postgresql.
pub fn psql_binary() -> PathBuf {
    let mut candidates: Vec<PathBuf> = Vec::new();
    if let Ok(dir) = std::env::var("PG_BINDIR") {
        candidates.push(Path::new(&dir).join("psql"));
    }
    if let Ok(path) = std::env::var("PATH") {
        candidates.extend(std::env::split_paths(&path).map(|d| d.join("psql")));
    }
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.path().join("bin/psql"))
                .collect()
        })
        .unwrap_or_default();
    versions.sort();
    candidates.extend(versions.into_iter().rev());
    candidates
        .into_iter()
        .find(|p| p.is_file())
        .expect("psql is needed for the SQL endpoint tests: apt-get install -y postgresql-client (or set PG_BINDIR)")
}

/// Runs psql against the endpoint; returns (success, stdout + stderr).
pub fn psql(port: u16, user: &str, extra_env: &[(&str, &str)], args: &[&str]) -> (bool, String) {
    let out = Command::new(psql_binary())
        .args([
            "-X",
            "-At",
            "-v",
            "ON_ERROR_STOP=1",
            "-h",
            "127.0.0.1",
            "-p",
        ])
        .arg(port.to_string())
        .args(["-U", user, "-d", "wal2delta"])
        .args(args)
        .env("PGCONNECT_TIMEOUT", "5")
        .envs(extra_env.iter().copied())
        .output()
        .expect("run psql");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

impl Env {
    /// Starts a cluster and runs `setup_sql` in it.
    pub async fn new(setup_sql: &str) -> Env {
        let pg = PgCluster::start();
        pg.client()
            .await
            .batch_execute(setup_sql)
            .await
            .expect("setup SQL");
        let dir = tempfile::Builder::new()
            .prefix("w2d-env-")
            // W2D_KEEP_TEST_DIRS=1 keeps the lake and logs of every test for a post-mortem.
            .disable_cleanup(std::env::var_os("W2D_KEEP_TEST_DIRS").is_some())
            .tempdir()
            .expect("temp dir");
        let lake = dir.path().join("lake");
        let config = dir.path().join("wal2delta.toml");
        Env {
            pg,
            dir,
            lake,
            config,
            slot: "w2d_test".into(),
            serve_port: free_port(),
            object_lake: None,
        }
    }

    /// Like `new`, with the lake in a new bucket of the test S3 server (lease: 3 s).
    pub async fn new_s3(setup_sql: &str) -> Env {
        let mut env = Env::new(setup_sql).await;
        let bucket = crate::s3_server::bucket();
        env.object_lake = Some(ObjectLake {
            url: format!("s3://{bucket}/lake/"),
            bucket,
            lake_lines: "lease_seconds = 3\n".into(),
            storage: crate::s3_server::storage_toml(&env.dir.path().join("s3-secret")),
        });
        env
    }

    /// Like `new`, with the lake in a new container of Azurite (lease: 3 s).
    pub async fn new_azure(setup_sql: &str) -> Env {
        let mut env = Env::new(setup_sql).await;
        let container = crate::azurite::container();
        env.object_lake = Some(ObjectLake {
            url: format!("az://{container}/lake/"),
            bucket: container,
            lake_lines: "lease_seconds = 3\n".into(),
            storage: crate::azurite::storage_toml(&env.dir.path().join("azure-key")),
        });
        env
    }

    /// Where a table of `layer` (`raw`, `curated`) is: a local path or an `s3://` URL.
    pub fn table_location(&self, layer: &str, schema: &str, table: &str) -> String {
        match &self.object_lake {
            Some(o) => format!("{}{layer}/{schema}/{table}/", o.url),
            None => self
                .lake
                .join(layer)
                .join(schema)
                .join(table)
                .to_string_lossy()
                .into_owned(),
        }
    }

    /// A cluster prepared with `setup_sql` and a daemon streaming `tables` as superuser.
    pub async fn streaming(setup_sql: &str, tables: &[&str]) -> (Env, Daemon) {
        let env = Env::new(setup_sql).await;
        env.write_config("postgres", tables, "");
        let daemon = env.daemon();
        env.wait_streaming().await;
        (env, daemon)
    }

    /// Writes the config file for `tables`, connecting as `user`; `extra` is appended.
    pub fn write_config(&self, user: &str, tables: &[&str], extra: &str) {
        self.write_config_serving(user, tables, extra, "");
    }

    /// Like `write_config`, with `serve_extra` added to the `[serve]` section (which
    /// listens on `serve_port` and serves the repository's refined views).
    pub fn write_config_serving(
        &self,
        user: &str,
        tables: &[&str],
        extra: &str,
        serve_extra: &str,
    ) {
        let tables: Vec<String> = tables.iter().map(|t| format!("{t:?}")).collect();
        let (lake, lake_lines, storage) = match &self.object_lake {
            Some(o) => (o.url.as_str(), o.lake_lines.as_str(), o.storage.as_str()),
            None => (self.lake.to_str().unwrap_or_default(), "", ""),
        };
        let text = format!(
            "[source]\ndsn = {dsn:?}\nslot = {slot:?}\npublication = \"w2d_pub\"\ntables = [{tables}]\n\
             status_interval_secs = 1\n{extra}\n[lake]\npath = {lake:?}\n{lake_lines}[apply]\nmax_batch_age_ms = 200\n\
             [serve]\nlisten = \"127.0.0.1:{port}\"\nrefined_dir = {refined:?}\npoll_interval_ms = 200\n{serve_extra}\n{storage}",
            port = self.serve_port,
            refined = concat!(env!("CARGO_MANIFEST_DIR"), "/sql/refined"),
            dsn = self.pg.dsn(user),
            slot = self.slot,
            tables = tables.join(", "),
        );
        std::fs::write(&self.config, text).expect("write config");
    }

    pub fn daemon(&self) -> Daemon {
        Daemon::start(&self.config, &self.dir.path().join("daemon.log"), &[])
    }

    pub fn daemon_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("daemon.log")).unwrap_or_default()
    }

    /// Waits until `sql` (with text parameters) returns a row.
    pub async fn wait_sql(&self, what: &str, timeout: Duration, sql: &str, params: &[&str]) {
        let client = self.pg.client().await;
        let params: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = params
            .iter()
            .map(|p| p as &(dyn tokio_postgres::types::ToSql + Sync))
            .collect();
        wait_for(
            what,
            timeout,
            || {
                let (client, params) = (&client, &params);
                async move { matches!(client.query_opt(sql, params).await, Ok(Some(_))) }
            },
            || self.daemon_log(),
        )
        .await;
    }

    /// Waits until the slot exists and is streaming (a daemon is attached).
    pub async fn wait_streaming(&self) {
        // The walsender's state, not just the slot's `active`: the connection that
        // creates the slot holds it active through the whole initial snapshot, and a
        // `wait_caught_up` then could pass before the snapshot is in the lake.
        self.wait_sql(
            "the daemon to stream from the slot",
            Duration::from_secs(60),
            "SELECT 1 FROM pg_replication_slots s JOIN pg_stat_replication r ON r.pid = s.active_pid \
             WHERE s.slot_name = $1 AND r.state IN ('streaming', 'catchup')",
            &[&self.slot],
        )
        .await;
    }

    /// Waits until the slot's confirmed flush position reaches the current WAL position,
    /// i.e. everything written so far is durable in the lake.
    pub async fn wait_caught_up(&self, timeout: Duration) {
        let target = self.current_wal_lsn().await;
        self.wait_confirmed(&target, timeout).await;
    }

    /// Waits until the slot's confirmed flush position reaches `target`.
    pub async fn wait_confirmed(&self, target: &str, timeout: Duration) {
        self.wait_sql(
            &format!("the slot to confirm {target}"),
            timeout,
            "SELECT 1 FROM pg_replication_slots WHERE slot_name = $1 AND confirmed_flush_lsn >= $2::text::pg_lsn",
            &[&self.slot, target],
        )
        .await;
    }

    /// The slot's `confirmed_flush_lsn`, as text.
    pub async fn confirmed_flush(&self) -> String {
        self.pg
            .client()
            .await
            .query_one(
                "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1",
                &[&self.slot],
            )
            .await
            .expect("read the slot's confirmed_flush_lsn")
            .get(0)
    }

    pub async fn current_wal_lsn(&self) -> String {
        self.pg
            .client()
            .await
            .query_one("SELECT pg_current_wal_lsn()::text", &[])
            .await
            .expect("current wal lsn")
            .get(0)
    }

    /// Waits until the raw table of `schema.table` holds at least `rows` rows.
    pub async fn wait_raw_rows(&self, schema: &str, table: &str, rows: i64, timeout: Duration) {
        let raw = self.table_location("raw", schema, table);
        wait_for(
            &format!("{rows} rows in raw.{schema}.{table}"),
            timeout,
            || async { count_delta_at(&raw).await >= rows },
            || {
                let server = self.pg.server_log();
                let lines: Vec<&str> = server.lines().collect();
                format!(
                    "{}\n--- the server's newest lines ---\n{}",
                    self.daemon_log(),
                    lines[lines.len().saturating_sub(4)..].join("\n"),
                )
            },
        )
        .await;
    }

    pub fn raw_path(&self, schema: &str, table: &str) -> PathBuf {
        self.lake.join("raw").join(schema).join(table)
    }
}

/// The daemon as a child process; killed on drop.
pub struct Daemon {
    child: Option<Child>,
}

pub fn binary() -> &'static str {
    env!("CARGO_BIN_EXE_wal2delta")
}

impl Daemon {
    pub fn start(config: &Path, log: &Path, env: &[(&str, &str)]) -> Daemon {
        let log_file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .expect("daemon log file");
        let child = Command::new(binary())
            .args(["run", "--config", config.to_str().unwrap_or_default()])
            .env(
                "WAL2DELTA_LOG",
                "info,wal2delta=debug,buoyant_kernel=off,deltalake_core=warn,deltalake_core::writer::stats=error",
            )
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().expect("log clone"))
            .stderr(log_file)
            .spawn()
            .expect("spawn wal2delta");
        Daemon { child: Some(child) }
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().map(|c| c.id() as i32).unwrap_or(0)
    }

    /// SIGKILL: no chance to clean up.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM, then wait for the exit status.
    pub fn terminate(&mut self, timeout: Duration) -> ExitStatus {
        let mut c = self.child.take().expect("daemon running");
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(c.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        wait_exit(&mut c, timeout)
    }

    /// Waits for the process to exit by itself.
    pub fn wait(&mut self, timeout: Duration) -> ExitStatus {
        let mut c = self.child.take().expect("daemon running");
        wait_exit(&mut c, timeout)
    }

    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }
}

fn wait_exit(c: &mut Child, timeout: Duration) -> ExitStatus {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(Some(status)) = c.try_wait() {
            return status;
        }
        if Instant::now() > deadline {
            let _ = c.kill();
            panic!("the daemon did not exit within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Polls `cond` until it holds; on timeout panics with `what` and the `context()` text.
pub async fn wait_for<F, Fut, C>(what: &str, timeout: Duration, mut cond: F, context: C)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
    C: Fn() -> String,
{
    let deadline = Instant::now() + timeout;
    loop {
        if cond().await {
            return;
        }
        if Instant::now() > deadline {
            let ctx = context();
            let tail = |n: usize| {
                let lines: Vec<&str> = ctx.lines().collect();
                lines[lines.len().saturating_sub(n)..].join("\n")
            };
            // The newest lines first: a truncated report still shows where it stood.
            panic!(
                "timed out after {timeout:?} waiting for {what}\n--- newest lines ---\n{}\n\
                 --- context ---\n{}",
                tail(10),
                tail(40)
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Asserts how many changes of each operation (`_op`, sorted) the raw table of
/// `public.<table>` holds: every change exactly once.
pub async fn assert_raw_ops(env: &Env, table: &str, expected: &[(&str, i64)]) {
    let ops: Vec<(String, i64)> = query_delta(
        &env.raw_path("public", table),
        "SELECT _op, count(*) FROM t GROUP BY _op ORDER BY _op",
    )
    .await
    .into_iter()
    .map(|r| {
        let count = r[1].as_deref().and_then(|c| c.parse().ok()).unwrap_or(-1);
        (r[0].clone().unwrap_or_default(), count)
    })
    .collect();
    let expected: Vec<(String, i64)> = expected.iter().map(|(o, n)| (o.to_string(), *n)).collect();
    assert_eq!(
        ops, expected,
        "raw changes of {table} by operation, each once"
    );
}

/// Runs `sql` over the Delta table at `path` (registered as `t`) and returns the rows as
/// text (`None` for NULL). Returns no rows when the table does not exist yet.
pub async fn query_delta(path: &Path, sql: &str) -> Vec<Vec<Option<String>>> {
    query_delta_at(path.to_str().unwrap_or_default(), sql).await
}

/// `query_delta` for a table at a local path or an `s3://` URL on the test S3 server.
pub async fn query_delta_at(location: &str, sql: &str) -> Vec<Vec<Option<String>>> {
    let url = if location.starts_with("s3://") {
        crate::s3_server::register_in_process();
        url::Url::parse(location).expect("table URL")
    } else if location.starts_with("az://") {
        crate::azurite::register_in_process();
        url::Url::parse(location).expect("table URL")
    } else {
        let path = Path::new(location);
        if !path.join("_delta_log").exists() {
            return vec![];
        }
        url::Url::from_directory_path(path).expect("absolute path")
    };
    let table = match deltalake::open_table(url).await {
        Ok(table) => table,
        Err(deltalake::DeltaTableError::NotATable(_)) => return vec![],
        Err(e) => panic!("open Delta table {location}: {e}"),
    };
    let ctx = SessionContext::new();
    table
        .update_datafusion_session(&ctx.state())
        .expect("register store");
    let provider = table.table_provider().await.expect("table provider");
    ctx.register_table("t", provider).expect("register table");
    let batches = ctx
        .sql(sql)
        .await
        .expect("plan")
        .collect()
        .await
        .expect("execute");
    let options = FormatOptions::default();
    let mut rows = Vec::new();
    for batch in batches {
        let formatters: Vec<_> = batch
            .columns()
            .iter()
            .map(|c| ArrayFormatter::try_new(c.as_ref(), &options).expect("formatter"))
            .collect();
        for r in 0..batch.num_rows() {
            rows.push(
                batch
                    .columns()
                    .iter()
                    .zip(&formatters)
                    .map(|(c, f)| (!c.is_null(r)).then(|| f.value(r).to_string()))
                    .collect(),
            );
        }
    }
    rows
}

/// Fails the test, saying what to install, when Python's `deltalake` reader is missing.
pub fn require_python_deltalake() {
    let probe = Command::new("python3")
        .args(["-c", "import deltalake, pyarrow"])
        .output();
    assert!(
        matches!(&probe, Ok(o) if o.status.success()),
        "this test needs Python with the deltalake and pyarrow packages: \
         python3 -m pip install deltalake pyarrow ({probe:?})"
    );
}

/// Convenience: `SELECT count(*)` over a Delta table (0 when it does not exist).
pub async fn count_delta(path: &Path) -> i64 {
    count_delta_at(path.to_str().unwrap_or_default()).await
}

/// `count_delta` for a local path or an `s3://` URL.
pub async fn count_delta_at(location: &str) -> i64 {
    query_delta_at(location, "SELECT count(*) FROM t")
        .await
        .first()
        .and_then(|r| r[0].as_ref())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// Runs `wal2delta <args[0]> --config <env's config> <args[1..]>`: exit code and output.
pub fn wal2delta(env: &Env, args: &[&str]) -> (i32, String) {
    wal2delta_with(env, args, &[])
}

/// Like `wal2delta`, with `vars` added to the environment.
pub fn wal2delta_with(env: &Env, args: &[&str], vars: &[(&str, &str)]) -> (i32, String) {
    let mut all = vec![args[0], "--config", env.config.to_str().unwrap()];
    all.extend(&args[1..]);
    let out = Command::new(binary())
        .args(&all)
        .envs(vars.iter().copied())
        .output()
        .expect("run wal2delta");
    (
        out.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// Peak resident set size of a process, in bytes (`VmHWM` in /proc).
pub fn peak_rss(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kb| kb * 1024)
        .unwrap_or(0)
}

/// Starts a test server (`program args`) that lives as long as the test process and
/// waits until it listens on `port`; fails saying how to `install` it.
pub fn process_server(program: &str, args: &[String], port: u16, what: &str, install: &str) {
    let (tx, rx) = std::sync::mpsc::channel();
    let (program, args) = (program.to_string(), args.to_vec());
    // A thread that lives as long as the process: the server dies with it (PDEATHSIG is
    // tied to the spawning thread).
    std::thread::spawn(move || {
        use std::os::unix::process::CommandExt;
        let mut command = Command::new(&program);
        command
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        // SAFETY: prctl is async-signal-safe.
        unsafe {
            command.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let child = command.spawn();
        let _ = tx.send(child.as_ref().map(|_| ()).map_err(|e| e.to_string()));
        if let Ok(mut child) = child {
            let _ = child.wait();
        }
    });
    if let Ok(Err(e)) = rx.recv() {
        panic!("cannot start {what} ({e}): {install}");
    }
    let started = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "{what} did not listen on port {port} within 60 s: is it installed? {install}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}
