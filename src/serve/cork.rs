//! A response's messages leave in one TCP segment, as Postgres sends them.
//!
//! pgwire flushes most messages it sends on its own (`BindComplete`, `RowDescription`,
//! `CommandComplete`, `ReadyForQuery`), and with `TCP_NODELAY` (set so that no answer
//! waits for the client's delayed ACK) each flush became its own segment: a prepared
//! lookup's answer was four segments, four wake-ups of the client, four passes through
//! the loopback path. Postgres buffers its output until `Sync`, `Flush` or the end of a
//! simple query. A session does the same with `TCP_CORK`: it holds its socket's partial
//! segments from a simple query's start, and after each `Sync` or `Flush` until the next
//! one, and releases them at those points. Full segments still go out as they fill (a
//! long result streams), and the kernel sends what is held after 200 ms at most, so a
//! missed release costs latency, never an answer.
//!
//! Linux only; elsewhere the calls do nothing.

use std::os::fd::RawFd;

/// The socket of one SQL session.
pub struct Cork {
    socket: Option<RawFd>,
}

impl Cork {
    /// For the connection on `socket`, which must stay open as long as the session that
    /// uses this (the session ends before its connection closes). `None`: never corks.
    pub fn new(socket: Option<RawFd>) -> Cork {
        Cork { socket }
    }

    /// Partial segments wait for [`Cork::release`].
    pub fn hold(&self) {
        self.set(true);
    }

    /// Sends what waits, and stops holding.
    pub fn release(&self) {
        self.set(false);
    }

    #[cfg(target_os = "linux")]
    fn set(&self, on: bool) {
        let Some(fd) = self.socket else {
            return;
        };
        let value: libc::c_int = on.into();
        // SAFETY: a socket option on a descriptor this session's connection owns and
        // keeps open while the session runs; the value outlives the call.
        let done = unsafe {
            libc::setsockopt(
                fd,
                libc::IPPROTO_TCP,
                libc::TCP_CORK,
                (&value as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if done != 0 {
            tracing::debug!(error = %std::io::Error::last_os_error(), on, "SQL endpoint: cannot set TCP_CORK");
        }
    }

    #[cfg(not(target_os = "linux"))]
    fn set(&self, _on: bool) {}
}
