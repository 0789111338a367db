//! TLS fails closed: `require` refuses a server without TLS, `verify-full` accepts only a
//! certificate signed by the configured CA for the host, and an unreadable `sslrootcert`
//! stops start-up. Nothing falls back to plaintext.

use std::time::Duration;

use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};

use crate::harness::{Env, wait_for};

const SETUP: &str = r#"
CREATE TABLE secret_stuff (id int PRIMARY KEY, v text);
CREATE PUBLICATION w2d_pub FOR TABLE secret_stuff;
"#;

fn ca(name: &str) -> CertifiedIssuer<'static, KeyPair> {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, name);
    CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap()
}

fn run(config: &std::path::Path) -> (bool, String) {
    let out = std::process::Command::new(crate::harness::binary())
        .args(["run", "--config", config.to_str().unwrap()])
        .output()
        .unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_is_enforced_and_never_downgraded() {
    let env = Env::new(SETUP).await;

    // The server has no TLS yet: sslmode=require must refuse, not fall back to plaintext.
    env.write_config("postgres", &["public.secret_stuff"], "");
    let require = std::fs::read_to_string(&env.config)
        .unwrap()
        .replace("sslmode=disable", "sslmode=require");
    std::fs::write(&env.config, &require).unwrap();
    let (ok, out) = run(&env.config);
    assert!(
        !ok,
        "sslmode=require connected to a server without TLS:\n{out}"
    );
    assert!(
        out.contains("TLS"),
        "the error should say TLS is the problem:\n{out}"
    );

    // Turn TLS on with a certificate for 127.0.0.1 signed by our CA.
    let trusted = ca("wal2delta test CA");
    let other = ca("some other CA");
    let server_key = KeyPair::generate().unwrap();
    let server_cert =
        CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()])
            .unwrap()
            .signed_by(&server_key, &trusted)
            .unwrap();
    let dir = env.pg.dir();
    std::fs::write(dir.join("server.crt"), server_cert.pem()).unwrap();
    std::fs::write(dir.join("server.key"), server_key.serialize_pem()).unwrap();
    for f in ["server.crt", "server.key"] {
        let path = dir.join(f);
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .unwrap();
        if nix::unistd::geteuid().is_root() {
            let owner = std::fs::metadata(dir).unwrap();
            let uid = std::os::unix::fs::MetadataExt::uid(&owner);
            let gid = std::os::unix::fs::MetadataExt::gid(&owner);
            std::os::unix::fs::chown(&path, Some(uid), Some(gid)).unwrap();
        }
    }
    let pg = env.pg.client().await;
    for sql in [
        format!(
            "ALTER SYSTEM SET ssl_cert_file = '{}'",
            dir.join("server.crt").display()
        ),
        format!(
            "ALTER SYSTEM SET ssl_key_file = '{}'",
            dir.join("server.key").display()
        ),
        "ALTER SYSTEM SET ssl = on".to_string(),
        "SELECT pg_reload_conf()".to_string(),
    ] {
        pg.batch_execute(&sql).await.unwrap();
    }
    wait_for(
        "ssl = on after reload",
        Duration::from_secs(30),
        || async {
            env.pg
                .client()
                .await
                .query_one("SHOW ssl", &[])
                .await
                .map(|r| r.get::<_, String>(0) == "on")
                .unwrap_or(false)
        },
        || env.pg.server_log(),
    )
    .await;

    let ca_file = env.dir.path().join("ca.pem");
    let other_ca_file = env.dir.path().join("other-ca.pem");
    std::fs::write(&ca_file, trusted.pem()).unwrap();
    std::fs::write(&other_ca_file, other.pem()).unwrap();
    let with_mode = |mode: &str, root: &std::path::Path| {
        require.replace(
            "sslmode=require",
            &format!("sslmode={mode} sslrootcert={}", root.display()),
        )
    };

    // A certificate from another CA is refused.
    std::fs::write(&env.config, with_mode("verify-full", &other_ca_file)).unwrap();
    let (ok, out) = run(&env.config);
    assert!(
        !ok,
        "verify-full accepted a certificate from an untrusted CA:\n{out}"
    );
    assert!(out.to_lowercase().contains("certificate"), "{out}");

    // verify-ca checks the chain too.
    std::fs::write(&env.config, with_mode("verify-ca", &other_ca_file)).unwrap();
    let (ok, out) = run(&env.config);
    assert!(
        !ok,
        "verify-ca accepted a certificate from an untrusted CA:\n{out}"
    );

    // An unreadable root certificate stops start-up.
    std::fs::write(
        &env.config,
        with_mode("verify-full", &env.dir.path().join("missing.pem")),
    )
    .unwrap();
    let (ok, out) = run(&env.config);
    assert!(!ok, "started without its root certificate:\n{out}");
    assert!(out.contains("cannot read sslrootcert"), "{out}");

    // The right CA: replication runs over TLS, on both connections.
    std::fs::write(&env.config, with_mode("verify-full", &ca_file)).unwrap();
    let mut daemon = env.daemon();
    env.wait_streaming().await;
    let over_tls: bool = pg
        .query_one(
            "SELECT bool_and(s.ssl) FROM pg_stat_ssl s JOIN pg_stat_replication r USING (pid)",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(over_tls, "the replication connection is not encrypted");
    pg.batch_execute("INSERT INTO secret_stuff VALUES (1, 'over tls')")
        .await
        .unwrap();
    env.wait_raw_rows("public", "secret_stuff", 1, Duration::from_secs(60))
        .await;
    assert!(daemon.terminate(Duration::from_secs(30)).success());
}
