//! Connection parameters for the source database, parsed from a libpq-style DSN.
//!
//! Both forms libpq accepts are understood: a URL (`postgresql://user:pw@host:5432/db?sslmode=require`)
//! and a key=value string (`host=db1 port=5432 user=wal2delta dbname=app sslmode=verify-full`).
//! The same parameters drive the control connection (tokio-postgres) and the replication
//! connection (our own protocol code), so TLS and authentication behave identically on both.

use std::fmt;

use crate::secret::Secret;

/// How to use TLS, with libpq's meanings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SslMode {
    /// Never use TLS.
    Disable,
    /// Use TLS when the server offers it, plaintext otherwise; the certificate is not checked.
    Prefer,
    /// Always use TLS, refuse plaintext; the certificate is not checked.
    Require,
    /// Always use TLS and check the certificate chain against `sslrootcert`, not the host name.
    VerifyCa,
    /// Always use TLS, check the chain and that the certificate names the host.
    VerifyFull,
}

impl SslMode {
    fn parse(value: &str) -> Result<SslMode, DsnError> {
        Ok(match value {
            "disable" => SslMode::Disable,
            "allow" | "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            other => {
                return Err(DsnError(format!(
                    "sslmode `{other}` is not one of disable, prefer, require, verify-ca, verify-full"
                )));
            }
        })
    }
}

/// Where the server is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Host {
    Tcp(String),
    /// A directory holding the server's Unix socket (`host=/var/run/postgresql`).
    Unix(String),
}

/// Parsed connection parameters. `Debug` never shows the password.
#[derive(Clone, Debug)]
pub struct ConnParams {
    pub host: Host,
    pub port: u16,
    pub user: String,
    pub dbname: String,
    pub password: Option<Secret>,
    pub sslmode: SslMode,
    /// CA certificate file for verify-ca / verify-full; `system` for the platform's store.
    pub sslrootcert: Option<String>,
    pub application_name: String,
    pub connect_timeout_secs: u64,
}

impl fmt::Display for ConnParams {
    /// A description safe for logs: no password.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let host = match &self.host {
            Host::Tcp(h) | Host::Unix(h) => h,
        };
        write!(f, "{}@{}:{}/{}", self.user, host, self.port, self.dbname)
    }
}

/// The DSN could not be understood. The message never contains the password.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct DsnError(String);

impl ConnParams {
    /// Parses a DSN in URL or key=value form.
    pub fn parse(dsn: &str) -> Result<ConnParams, DsnError> {
        let pairs = if dsn.starts_with("postgres://") || dsn.starts_with("postgresql://") {
            url_pairs(dsn)?
        } else {
            keyword_pairs(dsn)?
        };
        let mut params = ConnParams {
            host: Host::Tcp("localhost".into()),
            port: 5432,
            user: std::env::var("USER").unwrap_or_else(|_| "postgres".into()),
            dbname: String::new(),
            password: None,
            sslmode: SslMode::Prefer,
            sslrootcert: None,
            application_name: "wal2delta".into(),
            connect_timeout_secs: 10,
        };
        for (key, value) in pairs {
            match key.as_str() {
                "host" | "hostaddr" => {
                    params.host = if value.starts_with('/') {
                        Host::Unix(value)
                    } else {
                        Host::Tcp(value)
                    }
                }
                "port" => {
                    params.port = value.parse().map_err(|_| {
                        DsnError(format!("port `{value}` is not a number from 1 to 65535"))
                    })?
                }
                "user" => params.user = value,
                "dbname" => params.dbname = value,
                "password" => params.password = Some(Secret::new(value)),
                "sslmode" => params.sslmode = SslMode::parse(&value)?,
                "sslrootcert" => params.sslrootcert = Some(value),
                "application_name" => params.application_name = value,
                "connect_timeout" => {
                    params.connect_timeout_secs = value.parse().map_err(|_| {
                        DsnError(format!(
                            "connect_timeout `{value}` is not a number of seconds"
                        ))
                    })?
                }
                // Accepted and ignored so that DSNs written for libpq keep working.
                "options"
                | "client_encoding"
                | "target_session_attrs"
                | "keepalives"
                | "keepalives_idle"
                | "channel_binding"
                | "gssencmode" => {}
                other => {
                    return Err(DsnError(format!(
                        "the DSN parameter `{other}` is not supported; supported: host, port, user, \
                         dbname, password, sslmode, sslrootcert, application_name, connect_timeout"
                    )));
                }
            }
        }
        if params.dbname.is_empty() {
            params.dbname = params.user.clone();
        }
        Ok(params)
    }
}

fn url_pairs(dsn: &str) -> Result<Vec<(String, String)>, DsnError> {
    // The url crate does not know the postgresql scheme's authority rules, but it parses
    // user:password@host:port/path?query of any scheme; errors must not echo the DSN.
    let url = url::Url::parse(dsn)
        .map_err(|e| DsnError(format!("the DSN is not a valid postgresql:// URL ({e})")))?;
    let decode = |s: &str| {
        percent_encoding::percent_decode_str(s)
            .decode_utf8_lossy()
            .into_owned()
    };
    let mut pairs = Vec::new();
    if let Some(host) = url.host_str().filter(|h| !h.is_empty()) {
        let host = host.trim_start_matches('[').trim_end_matches(']');
        pairs.push(("host".into(), decode(host)));
    }
    if let Some(port) = url.port() {
        pairs.push(("port".into(), port.to_string()));
    }
    if !url.username().is_empty() {
        pairs.push(("user".into(), decode(url.username())));
    }
    if let Some(pw) = url.password() {
        pairs.push(("password".into(), decode(pw)));
    }
    let db = url.path().trim_start_matches('/');
    if !db.is_empty() {
        pairs.push(("dbname".into(), decode(db)));
    }
    for (k, v) in url.query_pairs() {
        pairs.push((k.into_owned(), v.into_owned()));
    }
    Ok(pairs)
}

/// libpq's `key=value key2='quoted \' value'` syntax.
fn keyword_pairs(dsn: &str) -> Result<Vec<(String, String)>, DsnError> {
    let mut pairs = Vec::new();
    let mut chars = dsn.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        if chars.peek().is_none() {
            return Ok(pairs);
        }
        let mut key = String::new();
        while let Some(&c) = chars.peek() {
            if c == '=' || c.is_whitespace() {
                break;
            }
            key.push(c);
            chars.next();
        }
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        if chars.next() != Some('=') {
            return Err(DsnError(format!(
                "the DSN is malformed near `{key}`: expected key=value pairs or a postgresql:// URL"
            )));
        }
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        let mut value = String::new();
        if chars.peek() == Some(&'\'') {
            chars.next();
            loop {
                match chars.next() {
                    None => {
                        return Err(DsnError(format!(
                            "the DSN value of `{key}` has no closing quote"
                        )));
                    }
                    Some('\\') => {
                        if let Some(c) = chars.next() {
                            value.push(c);
                        }
                    }
                    Some('\'') => break,
                    Some(c) => value.push(c),
                }
            }
        } else {
            while let Some(&c) = chars.peek() {
                if c.is_whitespace() {
                    break;
                }
                chars.next();
                if c == '\\' {
                    if let Some(n) = chars.next() {
                        value.push(n);
                    }
                } else {
                    value.push(c);
                }
            }
        }
        pairs.push((key, value));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_keyword_form() {
        let p = ConnParams::parse(
            "host=127.0.0.1 port=5433 user=rep dbname=app password='a b\\'c' sslmode=require",
        )
        .unwrap();
        assert_eq!(p.host, Host::Tcp("127.0.0.1".into()));
        assert_eq!(p.port, 5433);
        assert_eq!(p.user, "rep");
        assert_eq!(p.dbname, "app");
        assert_eq!(p.password.unwrap().expose(), "a b'c");
        assert_eq!(p.sslmode, SslMode::Require);
    }

    #[test]
    fn parses_url_form() {
        let p = ConnParams::parse(
            "postgresql://rep:p%40ss@db.example:6000/app?sslmode=verify-full&sslrootcert=/ca.pem",
        )
        .unwrap();
        assert_eq!(p.host, Host::Tcp("db.example".into()));
        assert_eq!(p.port, 6000);
        assert_eq!(p.password.as_ref().unwrap().expose(), "p@ss");
        assert_eq!(p.sslmode, SslMode::VerifyFull);
        assert_eq!(p.sslrootcert.as_deref(), Some("/ca.pem"));
        assert_eq!(p.to_string(), "rep@db.example:6000/app");
    }

    #[test]
    fn errors_do_not_leak_password() {
        let err = ConnParams::parse("postgresql://rep:topsecret@db:notaport/app").unwrap_err();
        assert!(!err.to_string().contains("topsecret"), "{err}");
        let err = ConnParams::parse("password=topsecret bogus=1").unwrap_err();
        assert!(!err.to_string().contains("topsecret"), "{err}");
    }
}
