//! Secrets never leak: the source password and the SQL endpoint's passwords (right and
//! wrong ones) appear in no log line, error, `status` or `validate` output, or metric, also
//! after failed logins and a failed source authentication.

use std::process::Command;
use std::time::Duration;

use crate::harness::{Daemon, Env, binary, free_port, psql, wait_for};

const SOURCE_PW: &str = "src-Secret-7f3a9";
const WRONG_SOURCE_PW: &str = "src-Wrong-51c2e";
const ENDPOINT_PW: &str = "sql-Secret-88d1b";
const WRONG_ENDPOINT_PW: &str = "sql-Wrong-0e4aa";

fn run(args: &[&str], env: &[(&str, &str)]) -> String {
    let out = Command::new(binary())
        .args(args)
        .envs(env.iter().copied())
        .output()
        .unwrap();
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passwords_appear_in_no_log_error_status_or_metric() {
    let env = Env::new(&format!(
        "CREATE TABLE t (id int PRIMARY KEY, v text);
         INSERT INTO t VALUES (1, 'x');
         CREATE ROLE repl_secret LOGIN REPLICATION PASSWORD '{SOURCE_PW}' IN ROLE w2d_scram;
         GRANT SELECT ON t TO repl_secret;
         CREATE PUBLICATION w2d_pub FOR TABLE t;"
    ))
    .await;
    let verifier = crate::sql::hash_password(ENDPOINT_PW);
    let metrics_port = free_port();
    env.write_config_serving(
        "repl_secret",
        &["public.t"],
        &format!("password_env = \"W2D_PW\"\n[metrics]\nlisten = \"127.0.0.1:{metrics_port}\""),
        &format!("[[serve.users]]\nname = \"analyst\"\nscram = \"{verifier}\""),
    );
    let good = [("W2D_PW", SOURCE_PW)];
    let _daemon = Daemon::start(&env.config, &env.dir.path().join("daemon.log"), &good);
    env.wait_streaming().await;

    // Endpoint logins: wrong password, unknown user, right password.
    let port = env.serve_port;
    let login = |user: &str, pw: &str| {
        psql(
            port,
            user,
            &[("PGPASSWORD", pw)],
            &["-c", "SELECT count(*) FROM t"],
        )
        .1
    };
    let mut outputs = vec![
        login("analyst", WRONG_ENDPOINT_PW),
        login("nobody", ENDPOINT_PW),
    ];
    wait_for(
        "the endpoint answers with the right password",
        Duration::from_secs(60),
        || async move { login("analyst", ENDPOINT_PW).trim() == "1" },
        || env.daemon_log(),
    )
    .await;

    // Operator commands, with the right and a wrong source password.
    let config = env.config.to_str().unwrap();
    outputs.push(run(&["status", "--config", config], &good));
    outputs.push(run(&["status", "--config", config, "--json"], &good));
    outputs.push(run(&["validate", "--config", config], &good));
    outputs.push(run(
        &["validate", "--config", config],
        &[("W2D_PW", WRONG_SOURCE_PW)],
    ));
    // A second daemon that fails to authenticate at the source.
    let other = env.dir.path().join("other.toml");
    let text = std::fs::read_to_string(&env.config)
        .unwrap()
        .replace(
            &format!("127.0.0.1:{}", env.serve_port),
            &format!("127.0.0.1:{}", free_port()),
        )
        .replace(
            &format!("127.0.0.1:{metrics_port}"),
            &format!("127.0.0.1:{}", free_port()),
        )
        .replace(
            env.lake.to_str().unwrap(),
            env.dir.path().join("other-lake").to_str().unwrap(),
        );
    std::fs::write(&other, text).unwrap();
    let failed = run(
        &["run", "--config", other.to_str().unwrap()],
        &[("W2D_PW", WRONG_SOURCE_PW)],
    );
    assert!(
        failed.contains("password authentication failed") || failed.contains("authentication"),
        "{failed}"
    );
    outputs.push(failed);

    // Metrics.
    let scrape = {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", metrics_port))
            .await
            .unwrap();
        s.write_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut body = String::new();
        s.read_to_string(&mut body).await.unwrap();
        body
    };
    assert!(
        scrape.contains("wal2delta_sql_statements_total"),
        "{scrape}"
    );
    outputs.push(scrape);
    outputs.push(env.daemon_log());

    let mut searched = 0;
    for text in &outputs {
        for secret in [SOURCE_PW, WRONG_SOURCE_PW, ENDPOINT_PW, WRONG_ENDPOINT_PW] {
            assert!(!text.contains(secret), "a password leaked into:\n{text}");
        }
        searched += text.len();
    }
    println!(
        "figure: secrets: 4 passwords searched in {} outputs ({searched} bytes), leaks 0",
        outputs.len()
    );
}
