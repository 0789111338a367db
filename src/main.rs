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

async fn run(config: PathBuf) -> anyhow::Result<ExitCode> {
    let settings = Config::load_settings(&config)?;
    let cancel = CancellationToken::new();
    let on_signal = cancel.clone();
    tokio::spawn(async move {
        wait_for_shutdown_signal().await;
        tracing::info!("shutdown requested: committing complete transactions");
        on_signal.cancel();
    });
    wal2delta::pipeline::run(settings, cancel).await?;
    tracing::info!("stopped");
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
    match Lake::open(&settings.lake_path) {
        Ok(lake) => notes.push(format!("lake: {}", lake.root())),
        Err(e) => problems.push(e.to_string()),
    }
    match catalog::connect(&settings.source).await {
        Err(e) => problems.push(e.to_string()),
        Ok(client) => match catalog::check(&client, &settings).await {
            Ok(report) => {
                problems.extend(report.problems);
                notes.extend(report.notes);
            }
            Err(e) => problems.push(e.to_string()),
        },
    }
    for note in &notes {
        println!("ok: {note}");
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
