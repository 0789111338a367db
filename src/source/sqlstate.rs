//! The SQLSTATE codes wal2delta acts on, by name, and which classes are transient.
//!
//! Errors are classified by code, never by message text (messages are translated with
//! `lc_messages` and change between versions).

/// `28000` invalid_authorization_specification (no `pg_hba.conf` entry, …).
pub const INVALID_AUTHORIZATION: &str = "28000";
/// `28P01` invalid_password.
pub const INVALID_PASSWORD: &str = "28P01";
/// `42501` insufficient_privilege.
pub const INSUFFICIENT_PRIVILEGE: &str = "42501";
/// `42704` undefined_object: a slot or publication that does not exist.
pub const UNDEFINED_OBJECT: &str = "42704";
/// `55000` object_not_in_prerequisite_state: e.g. a slot invalidated for lack of WAL.
pub const OBJECT_NOT_IN_PREREQUISITE_STATE: &str = "55000";
/// `55006` object_in_use: a slot still held by a walsender that is exiting.
pub const OBJECT_IN_USE: &str = "55006";

/// Classes that go away by themselves: connection exceptions (`08`), insufficient
/// resources such as too many connections (`53`), operator intervention such as a
/// shutdown or restart in progress (`57P`), system errors (`58`) and transaction
/// rollbacks such as serialization failures (`40`).
const TRANSIENT_CLASSES: [&str; 5] = ["08", "53", "57P", "58", "40"];

/// Whether an error with this SQLSTATE is worth a reconnect with backoff.
pub fn is_transient(code: &str) -> bool {
    TRANSIENT_CLASSES
        .iter()
        .any(|class| code.starts_with(class))
        || code == OBJECT_IN_USE
}

/// Whether the server refused the credentials.
pub fn is_auth_failure(code: &str) -> bool {
    code == INVALID_PASSWORD || code == INVALID_AUTHORIZATION
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classes() {
        assert!(is_transient("08006"));
        assert!(is_transient("57P01"));
        assert!(is_transient(OBJECT_IN_USE));
        assert!(!is_transient(UNDEFINED_OBJECT));
        assert!(!is_transient(INSUFFICIENT_PRIVILEGE));
        assert!(is_auth_failure(INVALID_PASSWORD));
    }
}
