//! Who may connect to the SQL endpoint: SCRAM-SHA-256 against stored verifiers, the TLS
//! requirement, the connection limit and the start-up handshake.
//!
//! # Design
//! Users live in the configuration with Postgres-format verifiers
//! (`SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>`, what `wal2delta
//! hash-password` prints and what `pg_authid.rolpassword` holds), never passwords. pgwire's
//! own SCRAM handler wants the salted password, which is as good as the password itself, so
//! the exchange of RFC 5802 is done here from the verifier: the client proves it knows the
//! password by a proof whose hash must equal StoredKey, and the server proves it knows the
//! verifier with a signature from ServerKey.
//!
//! An unknown user goes through the same exchange with a made-up verifier and fails at the
//! end, as in Postgres, so user names cannot be probed. Channel binding (SCRAM-SHA-256-PLUS)
//! is not offered.

use std::fmt::Debug;
use std::str::FromStr;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use datafusion_postgres::pgwire;
use futures::{Sink, SinkExt};
use pgwire::api::auth::{
    DefaultServerParameterProvider, StartupHandler, finish_authentication, protocol_negotiation,
    save_startup_parameters_to_metadata,
};
use pgwire::api::{ClientInfo, PgWireConnectionState};
use pgwire::error::{ErrorInfo, PgWireError, PgWireResult};
use pgwire::messages::startup::Authentication;
use pgwire::messages::{PgWireBackendMessage, PgWireFrontendMessage};
use ring::{digest, hmac};

const MECHANISM: &str = "SCRAM-SHA-256";

/// A parsed SCRAM-SHA-256 verifier.
#[derive(Clone)]
pub struct ScramVerifier {
    iterations: u32,
    salt: Vec<u8>,
    stored_key: Vec<u8>,
    server_key: Vec<u8>,
}

impl Debug for ScramVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ScramVerifier(…)")
    }
}

impl FromStr for ScramVerifier {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || {
            "not a SCRAM-SHA-256 verifier (expected SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>)"
                .to_string()
        };
        let rest = s.strip_prefix("SCRAM-SHA-256$").ok_or_else(bad)?;
        let (params, keys) = rest.split_once('$').ok_or_else(bad)?;
        let (iterations, salt) = params.split_once(':').ok_or_else(bad)?;
        let (stored, server) = keys.split_once(':').ok_or_else(bad)?;
        let iterations: u32 = iterations.parse().map_err(|_| bad())?;
        let decode = |v: &str| B64.decode(v).map_err(|_| bad());
        let verifier = ScramVerifier {
            iterations,
            salt: decode(salt)?,
            stored_key: decode(stored)?,
            server_key: decode(server)?,
        };
        if verifier.iterations == 0
            || verifier.salt.is_empty()
            || verifier.stored_key.len() != 32
            || verifier.server_key.len() != 32
        {
            return Err(bad());
        }
        Ok(verifier)
    }
}

/// The verifier for `password` (random salt, 4096 iterations), in Postgres format.
pub fn verifier_for(password: &str) -> String {
    postgres_protocol::password::scram_sha_256(password.as_bytes())
}

/// A verifier no password matches: unknown users still get a full exchange.
fn decoy() -> ScramVerifier {
    let mut salt = [0u8; 16];
    let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut salt);
    ScramVerifier {
        iterations: 4096,
        salt: salt.to_vec(),
        stored_key: vec![0; 32],
        server_key: vec![0; 32],
    }
}

/// What the endpoint requires of every connection.
pub struct Policy {
    pub users: Vec<(String, ScramVerifier)>,
    pub require_tls: bool,
}

/// Why a connection is turned away before it starts: SQLSTATE and message (FATAL).
#[derive(Clone)]
pub struct Refusal {
    pub code: &'static str,
    pub message: String,
}

enum Exchange {
    Initial,
    /// Server-first sent; the values the client-final is checked against.
    ServerFirstSent {
        user: String,
        verifier: ScramVerifier,
        client_first_bare: String,
        server_first: String,
        nonce: String,
        gs2_header: String,
    },
}

/// The start-up handler of one connection (pgwire asks for one per connection).
pub struct Startup {
    policy: Arc<Policy>,
    cancels: Arc<super::cancel::Cancels>,
    refusal: Option<Refusal>,
    exchange: Mutex<Exchange>,
}

impl Startup {
    pub fn new(
        policy: Arc<Policy>,
        cancels: Arc<super::cancel::Cancels>,
        refusal: Option<Refusal>,
    ) -> Startup {
        Startup {
            policy,
            cancels,
            refusal,
            exchange: Mutex::new(Exchange::Initial),
        }
    }
}

fn fatal(code: &str, message: impl Into<String>) -> PgWireError {
    PgWireError::UserError(Box::new(ErrorInfo::new(
        "FATAL".into(),
        code.into(),
        message.into(),
    )))
}

fn auth_failed(user: &str) -> PgWireError {
    fatal(
        "28P01",
        format!("password authentication failed for user \"{user}\""),
    )
}

fn malformed(what: &str) -> PgWireError {
    fatal("08P01", format!("malformed SCRAM message: {what}"))
}

/// The parameters reported to clients after authentication.
fn server_parameters() -> DefaultServerParameterProvider {
    let mut params = DefaultServerParameterProvider::default();
    params.server_version = format!("16.6 (wal2delta {})", env!("CARGO_PKG_VERSION"));
    params.default_transaction_read_only = true;
    params.is_superuser = false;
    params
}

async fn finish<C>(client: &mut C, cancels: &super::cancel::Cancels) -> PgWireResult<()>
where
    C: ClientInfo + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
    C::Error: Debug,
    PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
{
    cancels.register(client);
    finish_authentication(client, &server_parameters()).await
}

fn hmac_sha256(key: &[u8], data: &[u8]) -> Vec<u8> {
    hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, key), data)
        .as_ref()
        .to_vec()
}

fn attribute<'a>(part: Option<&'a str>, name: &str) -> Result<&'a str, PgWireError> {
    part.and_then(|p| p.strip_prefix(name))
        .and_then(|p| p.strip_prefix('='))
        .ok_or_else(|| malformed(&format!("expected attribute {name}")))
}

impl Startup {
    fn client_first(&self, user: &str, data: &[u8]) -> PgWireResult<(String, Exchange)> {
        let text = std::str::from_utf8(data).map_err(|_| malformed("not UTF-8"))?;
        // gs2-header: "n,," (no channel binding) or "y,," (client could, server cannot).
        let (gs2_header, bare) = if let Some(rest) = text.strip_prefix("n,") {
            ("n,", rest)
        } else if let Some(rest) = text.strip_prefix("y,") {
            ("y,", rest)
        } else if text.starts_with("p=") {
            return Err(fatal(
                "28000",
                "channel binding (SCRAM-SHA-256-PLUS) is not supported by wal2delta; connect with channel_binding=disable or prefer",
            ));
        } else {
            return Err(malformed("gs2 header"));
        };
        // authzid is not supported: the field between the two commas must be empty.
        let bare = bare
            .strip_prefix(',')
            .ok_or_else(|| malformed("authorization identity is not supported"))?;
        let mut parts = bare.split(',');
        let _username = attribute(parts.next(), "n")?;
        let client_nonce = attribute(parts.next(), "r")?;
        if client_nonce.is_empty() {
            return Err(malformed("empty nonce"));
        }
        let verifier = self
            .policy
            .users
            .iter()
            .find(|(name, _)| name == user)
            .map(|(_, v)| v.clone())
            .unwrap_or_else(decoy);
        let mut random = [0u8; 18];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut random)
            .map_err(|_| fatal("XX000", "no randomness for the SCRAM nonce"))?;
        let nonce = format!("{client_nonce}{}", B64.encode(random));
        let server_first = format!(
            "r={nonce},s={},i={}",
            B64.encode(&verifier.salt),
            verifier.iterations
        );
        Ok((
            server_first.clone(),
            Exchange::ServerFirstSent {
                user: user.to_string(),
                verifier,
                client_first_bare: bare.to_string(),
                server_first,
                nonce,
                gs2_header: format!("{gs2_header},"),
            },
        ))
    }
}

/// Checks the client-final message; returns the server-final message on success.
fn client_final(exchange: &Exchange, data: &[u8]) -> PgWireResult<String> {
    let Exchange::ServerFirstSent {
        user,
        verifier,
        client_first_bare,
        server_first,
        nonce,
        gs2_header,
    } = exchange
    else {
        return Err(malformed("unexpected message"));
    };
    let text = std::str::from_utf8(data).map_err(|_| malformed("not UTF-8"))?;
    let (without_proof, proof) = text
        .rsplit_once(",p=")
        .ok_or_else(|| malformed("missing proof"))?;
    let mut parts = without_proof.split(',');
    let binding = attribute(parts.next(), "c")?;
    let their_nonce = attribute(parts.next(), "r")?;
    if B64.decode(binding).ok().as_deref() != Some(gs2_header.as_bytes()) {
        return Err(malformed("channel binding data does not match"));
    }
    if their_nonce != nonce {
        return Err(malformed("nonce does not match"));
    }
    let proof = B64.decode(proof).map_err(|_| malformed("proof"))?;
    let auth_message = format!("{client_first_bare},{server_first},{without_proof}");
    let client_signature = hmac_sha256(&verifier.stored_key, auth_message.as_bytes());
    if proof.len() != client_signature.len() {
        return Err(auth_failed(user));
    }
    let client_key: Vec<u8> = proof
        .iter()
        .zip(&client_signature)
        .map(|(a, b)| a ^ b)
        .collect();
    let stored_key = digest::digest(&digest::SHA256, &client_key);
    // Constant-time comparison.
    let diff = stored_key
        .as_ref()
        .iter()
        .zip(&verifier.stored_key)
        .fold(0u8, |acc, (a, b)| acc | (a ^ b));
    if diff != 0 {
        return Err(auth_failed(user));
    }
    let server_signature = hmac_sha256(&verifier.server_key, auth_message.as_bytes());
    Ok(format!("v={}", B64.encode(server_signature)))
}

#[async_trait]
impl StartupHandler for Startup {
    async fn on_startup<C>(
        &self,
        client: &mut C,
        message: PgWireFrontendMessage,
    ) -> PgWireResult<()>
    where
        C: ClientInfo + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        match message {
            PgWireFrontendMessage::Startup(ref startup) => {
                protocol_negotiation(client, startup).await?;
                save_startup_parameters_to_metadata(client, startup);
                if let Some(refusal) = &self.refusal {
                    return Err(fatal(refusal.code, refusal.message.clone()));
                }
                if self.policy.require_tls && !client.is_secure() {
                    return Err(fatal(
                        "28000",
                        "wal2delta requires TLS on this endpoint (serve.require_tls); connect with sslmode=require",
                    ));
                }
                if self.policy.users.is_empty() {
                    return finish(client, &self.cancels).await;
                }
                client.set_state(PgWireConnectionState::AuthenticationInProgress);
                client
                    .send(PgWireBackendMessage::Authentication(Authentication::SASL(
                        vec![MECHANISM.to_string()],
                    )))
                    .await?;
            }
            PgWireFrontendMessage::PasswordMessageFamily(msg) => {
                let user = client
                    .metadata()
                    .get(pgwire::api::METADATA_USER)
                    .cloned()
                    .unwrap_or_default();
                let initial = matches!(
                    *self.exchange.lock().expect("exchange lock"),
                    Exchange::Initial
                );
                if initial {
                    let first = msg.into_sasl_initial_response()?;
                    if first.auth_method != MECHANISM {
                        return Err(fatal(
                            "28000",
                            format!(
                                "authentication method {} is not supported; wal2delta offers {MECHANISM}",
                                first.auth_method
                            ),
                        ));
                    }
                    let data = first
                        .data
                        .as_ref()
                        .ok_or_else(|| malformed("empty client-first message"))?;
                    let (server_first, next) = self.client_first(&user, data)?;
                    *self.exchange.lock().expect("exchange lock") = next;
                    client
                        .send(PgWireBackendMessage::Authentication(
                            Authentication::SASLContinue(server_first.into_bytes().into()),
                        ))
                        .await?;
                } else {
                    let response = msg.into_sasl_response()?;
                    let server_final = {
                        let exchange = self.exchange.lock().expect("exchange lock");
                        client_final(&exchange, &response.data)?
                    };
                    client
                        .feed(PgWireBackendMessage::Authentication(
                            Authentication::SASLFinal(server_final.into_bytes().into()),
                        ))
                        .await?;
                    finish(client, &self.cancels).await?;
                }
            }
            _ => {}
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verifiers_round_trip_and_bad_ones_are_named() {
        let v = verifier_for("s3cret");
        let parsed: ScramVerifier = v.parse().expect("own verifier parses");
        assert_eq!(parsed.iterations, 4096);
        assert!("md5abcdef".parse::<ScramVerifier>().is_err());
        assert!(
            "SCRAM-SHA-256$4096:c2FsdA==$AAAA:BBBB"
                .parse::<ScramVerifier>()
                .unwrap_err()
                .contains("SCRAM-SHA-256$")
        );
    }

    /// A full exchange computed the client's way (RFC 5802) against a stored verifier.
    #[test]
    fn the_exchange_accepts_the_password_and_rejects_another() {
        let policy = Arc::new(Policy {
            users: vec![("ana".into(), verifier_for("right").parse().unwrap())],
            require_tls: false,
        });
        for (password, ok) in [("right", true), ("wrong", false)] {
            let startup = Startup::new(policy.clone(), Default::default(), None);
            let client_first_bare = "n=ana,r=abcdefgh";
            let (server_first, exchange) = startup
                .client_first("ana", format!("n,,{client_first_bare}").as_bytes())
                .unwrap();
            let mut attrs = server_first.split(',');
            let nonce = attrs.next().unwrap().strip_prefix("r=").unwrap();
            let salt = B64
                .decode(attrs.next().unwrap().strip_prefix("s=").unwrap())
                .unwrap();
            let salted = {
                let mut out = [0u8; 32];
                ring::pbkdf2::derive(
                    ring::pbkdf2::PBKDF2_HMAC_SHA256,
                    std::num::NonZeroU32::new(4096).unwrap(),
                    &salt,
                    password.as_bytes(),
                    &mut out,
                );
                out
            };
            let client_key = hmac_sha256(&salted, b"Client Key");
            let stored = digest::digest(&digest::SHA256, &client_key);
            let without_proof = format!("c=biws,r={nonce}");
            let auth = format!("{client_first_bare},{server_first},{without_proof}");
            let signature = hmac_sha256(stored.as_ref(), auth.as_bytes());
            let proof: Vec<u8> = client_key
                .iter()
                .zip(&signature)
                .map(|(a, b)| a ^ b)
                .collect();
            let result = client_final(
                &exchange,
                format!("{without_proof},p={}", B64.encode(proof)).as_bytes(),
            );
            assert_eq!(result.is_ok(), ok, "password {password}");
            if ok {
                let server_key = hmac_sha256(&salted, b"Server Key");
                let expected = B64.encode(hmac_sha256(&server_key, auth.as_bytes()));
                assert_eq!(result.unwrap(), format!("v={expected}"));
            }
        }
    }
}
