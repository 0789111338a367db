//! Query cancellation: Postgres's `CancelRequest`, which psql sends on Ctrl-C, psycopg on
//! `cancel()` and JDBC on `Statement.cancel()`.
//!
//! # Design
//! - **pgwire's registry.** At start-up every session gets a process ID and a random
//!   secret key (sent to the client as `BackendKeyData`) and is registered under them in
//!   pgwire's `ConnectionManager`; the registration lives in the session's extensions and
//!   ends with the connection.
//! - **A cancel request** arrives on a connection of its own, names the pair, and fires
//!   the session's current statement token. Planning and every row of the result watch
//!   that token, as they watch the statement deadline, so the statement stops within one
//!   batch with `57014` and the session stays usable.
//! - **Idle sessions**: a cancel that arrives between statements does nothing, as in
//!   Postgres (the token of a finished statement has nobody watching it).

use std::sync::Arc;

use datafusion_postgres::pgwire;
use pgwire::api::cancel::DefaultCancelHandler;
use pgwire::api::{
    ClientInfo, ConnectionGuard, ConnectionHandle, ConnectionManager, PidSecretKeyGenerator,
    RandomPidSecretKeyGenerator,
};
use tokio_util::sync::CancellationToken;

/// The endpoint's cancel keys and the sessions registered under them.
#[derive(Default)]
pub struct Cancels {
    manager: Arc<ConnectionManager>,
    keys: RandomPidSecretKeyGenerator,
}

/// One session's registration; dropping it unregisters the session.
pub struct Registration {
    handle: Arc<ConnectionHandle>,
    _guard: ConnectionGuard,
}

impl Cancels {
    /// Gives the session its process ID and secret key and registers it; the client
    /// learns both in `BackendKeyData` at the end of authentication.
    pub fn register(&self, client: &mut impl ClientInfo) {
        let (pid, key) = self.keys.generate(&*client);
        client.set_pid_and_secret_key(pid, key.clone());
        let (handle, guard) = self.manager.register(pid, key);
        client.session_extensions().insert(Registration {
            handle,
            _guard: guard,
        });
    }

    /// The handler pgwire calls with each `CancelRequest`.
    pub fn handler(&self) -> Arc<DefaultCancelHandler> {
        Arc::new(DefaultCancelHandler::new(self.manager.clone()))
    }
}

/// A token for the statement the session starts now: cancelled when a cancel request
/// for the session arrives before the session's next statement starts. A session that
/// was never registered (it cannot be, after authentication) gets a token nothing fires.
pub async fn statement_token(client: &impl ClientInfo) -> CancellationToken {
    let token = CancellationToken::new();
    let Some(registration) = client.session_extensions().get::<Registration>() else {
        return token;
    };
    let fired = registration.handle.start_query().await;
    let cancel = token.clone();
    // Ends when the request comes or when the next statement replaces the sender.
    tokio::spawn(async move {
        if fired.await.is_ok() {
            cancel.cancel();
        }
    });
    token
}
