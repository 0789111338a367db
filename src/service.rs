//! systemd integration: readiness, watchdog and stopping notifications, and the liveness
//! heartbeat the watchdog is fed from.
//!
//! With `Type=notify` the daemon sends `READY=1` once replication is streaming and
//! `STOPPING=1` when a stop was requested. With `WatchdogSec=`, it pings `WATCHDOG=1` only
//! while the pipeline shows signs of life: [`beat`] is called as apply handles events
//! (server keepalives included, so an idle stream still beats), as snapshot batches are
//! written, on an idle apply loop's timer, and while retrying a lost connection. A
//! pipeline stuck for longer than `WatchdogSec` stops the pings and systemd restarts it.
//! Outside systemd (no `NOTIFY_SOCKET`) all of this does nothing.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use sd_notify::NotifyState;

static EPOCH: OnceLock<Instant> = OnceLock::new();
static LAST_BEAT_MS: AtomicU64 = AtomicU64::new(0);
static READY: AtomicBool = AtomicBool::new(false);

fn now_ms() -> u64 {
    EPOCH.get_or_init(Instant::now).elapsed().as_millis() as u64
}

/// Records that the pipeline made progress or is idle but responsive.
pub fn beat() {
    LAST_BEAT_MS.store(now_ms(), Ordering::Relaxed);
}

/// Tells systemd the service is ready (once) with a status line.
pub fn ready(status: &str) {
    beat();
    if !READY.swap(true, Ordering::Relaxed) {
        let _ = sd_notify::notify(false, &[NotifyState::Ready, NotifyState::Status(status)]);
    } else {
        self::status(status);
    }
}

/// Updates the status line `systemctl status` shows.
pub fn status(status: &str) {
    let _ = sd_notify::notify(false, &[NotifyState::Status(status)]);
}

/// Tells systemd the service is stopping.
pub fn stopping() {
    let _ = sd_notify::notify(false, &[NotifyState::Stopping]);
}

/// Starts pinging the watchdog when systemd asked for one (`WATCHDOG_USEC`).
pub fn spawn_watchdog() {
    // As sd_watchdog_enabled(3): WATCHDOG_USEC set, and WATCHDOG_PID (when set) is us.
    let usec: u64 = match std::env::var("WATCHDOG_USEC")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        Some(usec) if usec > 0 => usec,
        _ => return,
    };
    let for_us = std::env::var("WATCHDOG_PID")
        .ok()
        .and_then(|p| p.parse::<u32>().ok())
        .is_none_or(|pid| pid == std::process::id());
    if !for_us {
        return;
    }
    let period = Duration::from_micros(usec);
    beat();
    tokio::spawn(async move {
        let mut ticker = tokio::time::interval(period / 4);
        let mut warned = false;
        loop {
            ticker.tick().await;
            let silent = Duration::from_millis(
                now_ms().saturating_sub(LAST_BEAT_MS.load(Ordering::Relaxed)),
            );
            if silent < period {
                let _ = sd_notify::notify(false, &[NotifyState::Watchdog]);
                warned = false;
            } else if !warned {
                tracing::error!(
                    silent_ms = silent.as_millis() as u64,
                    "the pipeline shows no progress; the systemd watchdog is no longer fed and \
                     will restart the service"
                );
                warned = true;
            }
        }
    });
}
