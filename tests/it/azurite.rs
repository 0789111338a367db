//! Azurite, Microsoft's Azure Storage emulator (npm `azurite`), for the `az://` lake tests:
//! one blob service per test process on a free loopback port, killed with the process;
//! each test takes its own container, created with a SharedKey-signed request.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};

use base64::Engine;

use crate::harness::{free_port, process_server};

/// Azurite's well-known development account and key.
pub const ACCOUNT: &str = "devstoreaccount1";
pub const KEY: &str =
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";

pub fn port() -> u16 {
    static PORT: OnceLock<u16> = OnceLock::new();
    *PORT.get_or_init(|| {
        let port = free_port();
        let dir = std::env::temp_dir().join(format!("w2d-azurite-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let args = [
            "--blobHost",
            "127.0.0.1",
            "--blobPort",
            &port.to_string(),
            "--location",
            dir.to_str().unwrap_or("/tmp"),
            "--silent",
            "--skipApiVersionCheck",
            "--loose",
        ]
        .map(String::from);
        process_server(
            "azurite-blob",
            &args,
            port,
            "Azurite",
            "npm install -g azurite",
        );
        // Stores built with `use_emulator` (here and in the daemons this process starts,
        // which inherit it) find Azurite through this variable. They must use emulator
        // mode: Azurite ignores the `startFrom` listing parameter real Azure honours.
        // SAFETY: set once, before any store is built; Rust's own environment reads take
        // the same lock.
        unsafe {
            std::env::set_var(
                "AZURITE_BLOB_STORAGE_URL",
                format!("http://127.0.0.1:{port}"),
            )
        };
        port
    })
}

/// A new, empty container.
pub fn container() -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let name = format!(
        "w2d-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    );
    let date = chrono::Utc::now()
        .format("%a, %d %b %Y %H:%M:%S GMT")
        .to_string();
    let version = "2021-08-06";
    // SharedKey: the verb, eleven standard headers (all empty here), the x-ms- headers,
    // then the resource.
    let to_sign = format!(
        "PUT\n\n\n\n\n\n\n\n\n\n\n\nx-ms-date:{date}\nx-ms-version:{version}\n/{ACCOUNT}/{ACCOUNT}/{name}\nrestype:container"
    );
    let key = base64::engine::general_purpose::STANDARD
        .decode(KEY)
        .expect("account key");
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &key);
    let signature = base64::engine::general_purpose::STANDARD
        .encode(ring::hmac::sign(&key, to_sign.as_bytes()).as_ref());
    let mut stream = TcpStream::connect(("127.0.0.1", port())).expect("connect to Azurite");
    write!(
        stream,
        "PUT /{ACCOUNT}/{name}?restype=container HTTP/1.1\r\nHost: 127.0.0.1:{}\r\n\
         x-ms-date: {date}\r\nx-ms-version: {version}\r\n\
         Authorization: SharedKey {ACCOUNT}:{signature}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        port()
    )
    .expect("send to Azurite");
    let mut response = String::new();
    let _ = stream.read_to_string(&mut response);
    assert!(
        response.starts_with("HTTP/1.1 201"),
        "Azurite did not create container {name}: {response}"
    );
    name
}

/// The `[lake.storage]` table reaching Azurite (emulator mode; the port comes from
/// `AZURITE_BLOB_STORAGE_URL`); the key comes from `key_file`, which this writes.
pub fn storage_toml(key_file: &Path) -> String {
    port();
    std::fs::write(key_file, format!("{KEY}\n")).expect("write the Azure key file");
    format!(
        "[lake.storage]\nuse_emulator = true\naccount_name = {ACCOUNT:?}\naccess_key_file = {key:?}\n",
        key = key_file.to_str().unwrap_or_default(),
    )
}

/// Makes this test process open `az://` tables on Azurite (as the daemon does).
pub fn register_in_process() {
    static DONE: OnceLock<()> = OnceLock::new();
    DONE.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("w2d-az-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        crate::s3_server::register_toml("az://x/", &storage_toml(&dir.join("key")));
    });
}
