//! The `wal2delta` command line: parses arguments, sets up logging and signals, and calls
//! into the library. Nothing else lives here.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;
use wal2delta::config::Config;
use wal2delta::lake::Lake;
use wal2delta::source::catalog;

/// Our own logs at info; the Delta kernel's per-snapshot chatter is off: its errors come
/// back to us as results and are reported with context.
const DEFAULT_LOG_FILTER: &str = "info,buoyant_kernel=off,deltalake_core=warn,deltalake_core::writer::stats=error,datafusion=warn";

#[derive(Parser)]
#[command(
    name = "wal2delta",
    version,
    about = "Postgres logical replication into Delta Lake tables, exactly once"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the daemon: replicate the configured tables into the lake until stopped.
    Run {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Check the configuration, the source database and the lake without changing anything.
    Validate {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Show the slot, whether a daemon runs on the lake, and every table's durable
    /// position, version, files and rows. Changes nothing.
    Status {
        #[arg(long, short)]
        config: PathBuf,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Reset the replication position: skip ahead, copy tables again, or re-create a lost
    /// slot. Refuses while a daemon runs on the lake; acts only with --yes.
    #[command(group(clap::ArgGroup::new("what").required(true).args(["to_lsn", "resnapshot", "recreate_slot"])))]
    ResetCheckpoint {
        #[arg(long, short)]
        config: PathBuf,
        /// Move the position forward to this LSN (e.g. 0/1A2B3C4D), skipping every change
        /// in between: a data gap.
        #[arg(long, value_name = "LSN")]
        to_lsn: Option<String>,
        /// Copy tables again from a fresh snapshot at the next start (curated rebuilt, raw
        /// history kept).
        #[arg(long)]
        resnapshot: bool,
        /// With --resnapshot: only this table (schema.table); repeatable. Default: all.
        #[arg(long, requires = "resnapshot")]
        table: Vec<String>,
        /// Drop the slot if it still exists and create it again; the next start copies
        /// every table afresh.
        #[arg(long)]
        recreate_slot: bool,
        /// Do it (without: only show what would be done).
        #[arg(long)]
        yes: bool,
    },
    /// Compare the curated tables with the source at one consistent position, while the
    /// daemon runs. Exit 0 when equal, 1 when a table differs, 2 when it could not run.
    Verify {
        #[arg(long, short)]
        config: PathBuf,
        /// Only this table (schema.table); repeatable. Default: every configured table.
        #[arg(long)]
        table: Vec<String>,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
        /// Seconds to wait for the daemon to reach the source's position.
        #[arg(long, default_value_t = 120)]
        wait: u64,
        /// Copy the tables that differ again (as `resync`), then verify them again.
        #[arg(long)]
        repair: bool,
    },
    /// Copy tables again while the daemon runs: the curated table is replaced in one
    /// commit once the copy is complete, raw history is kept. Waits for the daemon.
    Resync {
        #[arg(long, short)]
        config: PathBuf,
        /// The table to copy (schema.table); repeatable.
        #[arg(long, required = true)]
        table: Vec<String>,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
        /// Seconds to wait for the copies.
        #[arg(long, default_value_t = 3600)]
        wait: u64,
    },
    /// Serve an existing lake over the Postgres protocol, read-only, without replicating
    /// (e.g. on a second host reading the same lake).
    Serve {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Print the SCRAM-SHA-256 verifier of a password, for `[[serve.users]] scram = "…"`.
    /// Reads the password from the terminal (not echoed) or one line from stdin.
    HashPassword,
    /// Prepare a source database and write a configuration: prints the SQL replication
    /// needs (role, grants, replica identity, publication), or runs it with --apply.
    Init {
        /// An administrator's connection: a superuser (or the tables' owner with
        /// CREATEROLE) to run the SQL with --apply; any user can print it. The password
        /// comes from the DSN or PGPASSWORD.
        #[arg(long)]
        dsn: String,
        /// A table to replicate (schema.table; quote mixed case: 'sales."Orders"');
        /// repeatable.
        #[arg(long)]
        table: Vec<String>,
        /// Replicate every table of this schema (partitions come with their partitioned
        /// table); repeatable.
        #[arg(long)]
        schema: Vec<String>,
        /// The configuration file to write.
        #[arg(long, short, default_value = "wal2delta.toml")]
        config: PathBuf,
        /// The file for the new role's password (default: the config's name with the
        /// extension `.password`).
        #[arg(long)]
        password_file: Option<PathBuf>,
        /// Where the lake goes: a directory, or an s3://, az://, gs:// URL.
        #[arg(long, default_value = "/var/lib/wal2delta/lake")]
        lake: String,
        /// wal2delta's role on the source.
        #[arg(long, default_value = "wal2delta")]
        role: String,
        #[arg(long, default_value = "wal2delta")]
        slot: String,
        #[arg(long, default_value = "wal2delta")]
        publication: String,
        /// Run the SQL (in one transaction) instead of only printing it.
        #[arg(long)]
        apply: bool,
        /// Replace an existing configuration file.
        #[arg(long)]
        force: bool,
    },
    /// Drop the replication slot, and the publication if wal2delta created it, so an
    /// uninstalled wal2delta leaves no WAL pinned. The lake is kept.
    Teardown {
        #[arg(long, short)]
        config: PathBuf,
        /// Do it (without: only show what would be done).
        #[arg(long)]
        yes: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("WAL2DELTA_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(DEFAULT_LOG_FILTER)),
        )
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Run { config } => run(config).await,
            Command::Validate { config } => validate(config).await,
            Command::Status { config, json } => status(config, json).await,
            Command::ResetCheckpoint {
                config,
                to_lsn,
                resnapshot,
                table,
                recreate_slot,
                yes,
            } => reset_checkpoint(config, to_lsn, resnapshot, table, recreate_slot, yes).await,
            Command::Verify {
                config,
                table,
                json,
                wait,
                repair,
            } => Ok(verify(config, table, json, wait, repair).await),
            Command::Resync {
                config,
                table,
                json,
                wait,
            } => resync(config, table, json, wait).await,
            Command::Teardown { config, yes } => teardown(config, yes).await,
            Command::Serve { config } => serve(config).await,
            Command::Init {
                dsn,
                table,
                schema,
                config,
                password_file,
                lake,
                role,
                slot,
                publication,
                apply,
                force,
            } => {
                // Absolute paths: the config names the password file, and the daemon may
                // start from another directory.
                let config = std::path::absolute(&config).unwrap_or(config);
                let password_file = password_file
                    .map(|p| std::path::absolute(&p).unwrap_or(p))
                    .unwrap_or_else(|| config.with_extension("password"));
                let request = wal2delta::init::InitRequest {
                    dsn,
                    tables: table,
                    schemas: schema,
                    role,
                    slot,
                    publication,
                    lake,
                    config,
                    password_file,
                    force,
                };
                init(request, apply).await
            }
            Command::HashPassword => hash_password(),
        }
    });
    match result {
        Ok(code) => code,
        Err(e) => {
            // Our error types print their causes themselves; the chain would repeat them.
            tracing::error!("{e}");
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn status(config: PathBuf, json: bool) -> anyhow::Result<ExitCode> {
    let settings = Config::load_settings(&config)?;
    let report = wal2delta::status::gather(&settings).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", wal2delta::status::render(&report));
    }
    Ok(ExitCode::SUCCESS)
}

async fn reset_checkpoint(
    config: PathBuf,
    to_lsn: Option<String>,
    resnapshot: bool,
    tables: Vec<String>,
    recreate_slot: bool,
    yes: bool,
) -> anyhow::Result<ExitCode> {
    use wal2delta::ops::Reset;
    let settings = Config::load_settings(&config)?;
    let reset = match (to_lsn, resnapshot, recreate_slot) {
        (Some(lsn), _, _) => Reset::ToLsn(lsn.parse().map_err(|e| {
            anyhow::anyhow!("--to-lsn {lsn}: {e}; write it as Postgres does, e.g. 0/1A2B3C4D")
        })?),
        (None, true, _) => Reset::Resnapshot(
            tables
                .iter()
                .map(|t| {
                    wal2delta::table_name::TableName::parse(t)
                        .map_err(|e| anyhow::anyhow!("--table: {e}"))
                })
                .collect::<Result<_, _>>()?,
        ),
        _ => Reset::RecreateSlot,
    };
    println!(
        "{}",
        wal2delta::ops::reset_checkpoint(&settings, reset, yes).await?
    );
    Ok(if yes {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(2)
    })
}

fn parse_tables(tables: &[String]) -> anyhow::Result<Vec<wal2delta::table_name::TableName>> {
    tables
        .iter()
        .map(|t| {
            wal2delta::table_name::TableName::parse(t)
                .map_err(|e| anyhow::anyhow!("--table {t}: {e}"))
        })
        .collect()
}

/// Exit 0 equal, 1 differs, 2 could not run (also for bad arguments and configuration).
/// With `repair`, the tables that differ are copied again and verified again.
async fn verify(
    config: PathBuf,
    tables: Vec<String>,
    json: bool,
    wait: u64,
    repair: bool,
) -> ExitCode {
    use wal2delta::verify::{Outcome, VerifyOptions, render, verify};
    let run = async {
        let settings = Config::load_settings(&config)?;
        let wait = std::time::Duration::from_secs(wait);
        let mut options = VerifyOptions {
            tables: parse_tables(&tables)?,
            wait,
        };
        let report = verify(&settings, &options).await?;
        let print = |text: String, value: serde_json::Value| -> anyhow::Result<()> {
            if json {
                println!("{}", serde_json::to_string_pretty(&value)?);
            } else {
                print!("{text}");
            }
            Ok(())
        };
        print(render(&report), serde_json::to_value(&report)?)?;
        let differing: Vec<_> = report
            .tables
            .iter()
            .filter(|t| t.outcome == Outcome::Differs)
            .filter_map(|t| wal2delta::table_name::TableName::parse(&t.table).ok())
            .collect();
        if !repair || differing.is_empty() {
            return Ok::<_, anyhow::Error>(report.exit_code());
        }
        // A fresh copy: one pending from before may already be past the rows found.
        let resynced = wal2delta::resync::resync(
            &settings,
            &differing,
            std::time::Duration::from_secs(3600),
            true,
        )
        .await?;
        print(
            wal2delta::resync::render(&resynced),
            serde_json::to_value(&resynced)?,
        )?;
        if resynced.exit_code() != 0 || !resynced.daemon_running {
            return Ok(1);
        }
        options.tables = differing;
        let again = verify(&settings, &options).await?;
        print(render(&again), serde_json::to_value(&again)?)?;
        Ok(again.exit_code())
    };
    match run.await {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(2)
        }
    }
}

async fn resync(
    config: PathBuf,
    tables: Vec<String>,
    json: bool,
    wait: u64,
) -> anyhow::Result<ExitCode> {
    let settings = Config::load_settings(&config)?;
    let report = wal2delta::resync::resync(
        &settings,
        &parse_tables(&tables)?,
        std::time::Duration::from_secs(wait),
        false,
    )
    .await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", wal2delta::resync::render(&report));
    }
    Ok(ExitCode::from(report.exit_code()))
}

async fn teardown(config: PathBuf, yes: bool) -> anyhow::Result<ExitCode> {
    let settings = Config::load_settings(&config)?;
    println!("{}", wal2delta::ops::teardown(&settings, yes).await?);
    Ok(if yes {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(2)
    })
}

async fn run(config: PathBuf) -> anyhow::Result<ExitCode> {
    let settings = Config::load_settings(&config)?;
    let cancel = CancellationToken::new();
    let on_signal = cancel.clone();
    tokio::spawn(async move {
        wait_for_shutdown_signal().await;
        tracing::info!("shutdown requested: committing complete transactions");
        wal2delta::service::stopping();
        on_signal.cancel();
    });
    wal2delta::pipeline::run(settings, cancel).await?;
    tracing::info!("stopped");
    Ok(ExitCode::SUCCESS)
}

async fn serve(config: PathBuf) -> anyhow::Result<ExitCode> {
    let settings = Config::load_settings(&config)?;
    let Some(serve) = settings.serve.as_ref() else {
        anyhow::bail!(
            "serve.listen is \"off\" in {}: set it to an address (e.g. \"{}\") to serve",
            config.display(),
            wal2delta::serve::config::DEFAULT_SERVE_LISTEN
        );
    };
    let lake = Lake::open(&settings.lake)?;
    let cancel = CancellationToken::new();
    let on_signal = cancel.clone();
    tokio::spawn(async move {
        wait_for_shutdown_signal().await;
        wal2delta::service::stopping();
        on_signal.cancel();
    });
    wal2delta::serve::serve_only(serve, lake, cancel).await?;
    tracing::info!("stopped");
    Ok(ExitCode::SUCCESS)
}

fn hash_password() -> anyhow::Result<ExitCode> {
    use std::io::IsTerminal;
    let password = if std::io::stdin().is_terminal() {
        let first = rpassword::prompt_password("password: ")?;
        let again = rpassword::prompt_password("again: ")?;
        if first != again {
            anyhow::bail!("the two passwords differ; nothing printed");
        }
        first
    } else {
        let mut line = String::new();
        std::io::stdin().read_line(&mut line)?;
        line.trim_end_matches(['\n', '\r']).to_string()
    };
    if password.is_empty() {
        anyhow::bail!("the password is empty; nothing printed");
    }
    println!("{}", wal2delta::serve::auth::verifier_for(&password));
    Ok(ExitCode::SUCCESS)
}

async fn wait_for_shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot listen for SIGTERM; only Ctrl-C stops the daemon");
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

async fn init(request: wal2delta::init::InitRequest, apply: bool) -> anyhow::Result<ExitCode> {
    let (client, admin) = wal2delta::init::connect(&request).await?;
    let plan = wal2delta::init::plan(&client, &admin, &request).await?;
    let tables: Vec<String> = plan.tables.iter().map(|t| t.to_string()).collect();
    eprintln!("tables: {}", tables.join(", "));
    for warning in &plan.warnings {
        eprintln!("warning: {warning}");
    }
    let password_note = |wrote: bool| {
        if wrote {
            eprintln!(
                "wrote the role's password to {0} (mode 0600); the daemon's user must read it \
                 (packaged service: chgrp wal2delta {0} && chmod 0640 {0})",
                request.password_file.display()
            );
        }
    };
    if apply {
        plan.apply(&client).await?;
        password_note(plan.write_files(&request)?);
        eprintln!(
            "applied {} statement(s); wrote {}",
            plan.steps.len(),
            request.config.display()
        );
        eprintln!(
            "next: wal2delta validate --config {0} && wal2delta run --config {0}",
            request.config.display()
        );
    } else {
        password_note(plan.write_files(&request)?);
        print!("{}", plan.script());
        eprintln!(
            "wrote {}; the SQL above is not run: run it as a superuser (psql -1 -f), or run              init again with --apply; then: wal2delta validate --config {}",
            request.config.display(),
            request.config.display()
        );
    }
    Ok(ExitCode::SUCCESS)
}

async fn validate(config: PathBuf) -> anyhow::Result<ExitCode> {
    let settings = match Config::load_settings(&config) {
        Ok(s) => s,
        Err(e) => {
            println!("{e}");
            return Ok(ExitCode::FAILURE);
        }
    };
    let mut problems = Vec::new();
    let mut notes = Vec::new();
    let mut warnings: Vec<String> = Vec::new();
    match Lake::open(&settings.lake) {
        Ok(lake) if lake.is_object_store() => {
            let options = settings.lake.storage.shown();
            notes.push(format!(
                "lake: {} ({})",
                lake.root(),
                if options.is_empty() {
                    "credentials from the environment".to_string()
                } else {
                    options
                }
            ));
            match wal2delta::lake::storage::probe(lake.root(), lake.store().as_ref()).await {
                Ok(found) => notes.push(found),
                Err(problem) => problems.push(problem),
            }
        }
        Ok(lake) => notes.push(format!("lake: {}", lake.root())),
        Err(e) => problems.push(e.to_string()),
    }
    match catalog::connect(&settings.source.conn).await {
        Err(e) => problems.push(e.to_string()),
        Ok(client) => {
            match catalog::check(&client, &settings.source, settings.config_path.as_deref()).await {
                Ok(report) => {
                    problems.extend(report.problems);
                    notes.extend(report.notes);
                    warnings.extend(report.warnings);
                }
                Err(e) => problems.push(e.to_string()),
            }
        }
    }
    for note in &notes {
        println!("ok: {note}");
    }
    for warning in &warnings {
        println!("warning: {warning}");
    }
    if problems.is_empty() {
        println!("configuration and source are ready for replication");
        Ok(ExitCode::SUCCESS)
    } else {
        println!("{} problem(s) found:", problems.len());
        for p in &problems {
            println!("  - {p}");
        }
        Ok(ExitCode::FAILURE)
    }
}
