//! Named points where a test can make the daemon die on the spot, as a power cut or a
//! SIGKILL would there: with `WAL2DELTA_CRASH_AT=<name>` in its environment the process
//! aborts when it reaches the point of that name. Tests use it for windows a random
//! SIGKILL rarely hits (between writing a deletion-vector file and the commit that
//! references it). Unset, a point costs one comparison.

use std::sync::OnceLock;

/// Aborts the process if `WAL2DELTA_CRASH_AT` names this point.
pub fn reached(name: &str) {
    static AT: OnceLock<Option<String>> = OnceLock::new();
    let at = AT.get_or_init(|| std::env::var("WAL2DELTA_CRASH_AT").ok());
    if at.as_deref() == Some(name) {
        eprintln!("WAL2DELTA_CRASH_AT={name}: aborting here, as a crash would");
        std::process::abort();
    }
}
