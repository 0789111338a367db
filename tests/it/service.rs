//! systemd: the unit files pass `systemd-analyze verify`, and the daemon speaks the notify
//! protocol — READY=1 once streaming, WATCHDOG=1 while healthy, STOPPING=1 on SIGTERM —
//! to a socket the test owns.

use std::os::unix::net::UnixDatagram;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::harness::{Daemon, Env, binary};

#[test]
fn unit_files_pass_systemd_analyze_verify() {
    let probe = Command::new("systemd-analyze").arg("--version").output();
    assert!(
        matches!(&probe, Ok(o) if o.status.success()),
        "this test needs systemd-analyze: apt-get install -y systemd ({probe:?})"
    );
    let dir = tempfile::tempdir().unwrap();
    let root = env!("CARGO_MANIFEST_DIR");
    // The units name the installed binary; verify checks it exists, so point at ours.
    for (file, as_name) in [
        ("wal2delta.service", "wal2delta.service"),
        ("wal2delta@.service", "wal2delta@sales.service"),
    ] {
        let text = std::fs::read_to_string(format!("{root}/systemd/{file}")).unwrap();
        assert!(
            text.contains("Type=notify") && text.contains("WatchdogSec="),
            "{file}"
        );
        // The unit protects the Postgres next to it.
        for directive in [
            "MemoryHigh=",
            "MemoryMax=",
            "OOMScoreAdjust=",
            "CPUWeight=",
            "IOWeight=",
            "Nice=",
        ] {
            assert!(text.contains(directive), "{file} lacks {directive}");
        }
        let path = dir.path().join(as_name);
        std::fs::write(&path, text.replace("/usr/local/bin/wal2delta", binary())).unwrap();
        let out = Command::new("systemd-analyze")
            .args(["verify", "--man=no"])
            .arg(&path)
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            out.status.success() && !text.contains("Unknown"),
            "{file}: {text}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemon_speaks_the_systemd_notify_protocol() {
    let env =
        Env::new("CREATE TABLE t (id int PRIMARY KEY); CREATE PUBLICATION w2d_pub FOR TABLE t;")
            .await;
    env.write_config("postgres", &["public.t"], "");
    let socket_path = env.dir.path().join("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let mut daemon = Daemon::start(
        &env.config,
        &env.dir.path().join("daemon.log"),
        &[
            ("NOTIFY_SOCKET", socket_path.to_str().unwrap()),
            ("WATCHDOG_USEC", "1000000"),
        ],
    );
    let mut seen = Vec::<String>::new();
    let read_until = |want: &str, seen: &mut Vec<String>, timeout: Duration| {
        let deadline = Instant::now() + timeout;
        let mut buf = [0u8; 4096];
        while Instant::now() < deadline {
            if let Ok(n) = socket.recv(&mut buf) {
                let msg = String::from_utf8_lossy(&buf[..n]).to_string();
                seen.push(msg.clone());
                if msg.lines().any(|l| l == want) {
                    return true;
                }
            }
        }
        false
    };
    assert!(
        read_until("READY=1", &mut seen, Duration::from_secs(60)),
        "{seen:?}\n{}",
        env.daemon_log()
    );
    assert!(
        seen.iter()
            .any(|m| m.contains("STATUS=streaming slot w2d_test")),
        "{seen:?}"
    );
    // Pinged every quarter period while healthy (idle here).
    let pings = |seen: &[String]| seen.iter().filter(|m| m.trim() == "WATCHDOG=1").count();
    let before = pings(&seen);
    for _ in 0..3 {
        assert!(
            read_until("WATCHDOG=1", &mut seen, Duration::from_secs(5)),
            "{seen:?}"
        );
    }
    assert!(pings(&seen) >= before + 3, "{seen:?}");
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(daemon.pid()),
        nix::sys::signal::Signal::SIGTERM,
    );
    assert!(
        read_until("STOPPING=1", &mut seen, Duration::from_secs(10)),
        "{seen:?}"
    );
    assert!(daemon.wait(Duration::from_secs(30)).success());
}
