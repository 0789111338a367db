//! moto's standalone S3 server (PyPI `moto[server]`) for the object-store tests: one per
//! test process, on a free loopback port, killed with the process; each test takes its own
//! bucket. One server because the storage options are registered process-wide (as in the
//! daemon), so every test's lake must reach the same endpoint.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};

use crate::harness::{free_port, process_server};

/// The access key the tests use (moto accepts any).
pub const ACCESS_KEY: &str = "w2dtest";
pub const SECRET_KEY: &str = "w2dtest-secret";
pub const REGION: &str = "us-east-1";

/// The running server's port.
pub fn port() -> u16 {
    static PORT: OnceLock<u16> = OnceLock::new();
    *PORT.get_or_init(start)
}

pub fn endpoint() -> String {
    format!("http://127.0.0.1:{}", port())
}

fn start() -> u16 {
    let port = free_port();
    let args = [
        "-m",
        "moto.server",
        "-H",
        "127.0.0.1",
        "-p",
        &port.to_string(),
    ]
    .map(String::from);
    process_server(
        "python3",
        &args,
        port,
        "moto's S3 server",
        "python3 -m pip install 'moto[server]'",
    );
    port
}

/// Sends one bodiless request; the status code and the response's text.
fn request(method: &str, path: &str) -> (u16, String) {
    let mut stream = TcpStream::connect(("127.0.0.1", port())).expect("connect to moto");
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        port()
    )
    .expect("send to moto");
    let mut response = String::new();
    let _ = stream.read_to_string(&mut response);
    let code = response
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or(0);
    (code, response)
}

/// A new, empty bucket.
pub fn bucket() -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let name = format!(
        "w2d-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    );
    let (code, response) = request("PUT", &format!("/{name}"));
    assert_eq!(code, 200, "moto did not create bucket {name}: {response}");
    name
}

/// Every object key in `bucket` under `prefix` (moto's ListObjectsV2, up to 1000 keys).
pub fn keys(bucket: &str, prefix: &str) -> Vec<String> {
    let (_, response) = request("GET", &format!("/{bucket}?list-type=2&prefix={prefix}"));
    response
        .split("<Key>")
        .skip(1)
        .filter_map(|part| part.split("</Key>").next())
        .map(str::to_string)
        .collect()
}

/// The `[lake.storage]` table reaching the server; the secret comes from `secret_file`,
/// which this writes.
pub fn storage_toml(secret_file: &Path) -> String {
    std::fs::write(secret_file, format!("{SECRET_KEY}\n")).expect("write the S3 secret file");
    format!(
        "[lake.storage]\nendpoint = {endpoint:?}\nallow_http = true\nregion = {REGION:?}\n\
         access_key_id = {ACCESS_KEY:?}\nsecret_access_key_file = {secret:?}\n",
        endpoint = endpoint(),
        secret = secret_file.to_str().unwrap_or_default(),
    )
}

/// Makes this test process open `s3://` tables on the server (as the daemon does).
pub fn register_in_process() {
    static DONE: OnceLock<()> = OnceLock::new();
    DONE.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("w2d-s3-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        register_toml("s3://x/", &storage_toml(&dir.join("secret")));
    });
}

/// Registers the `[lake.storage]` table `text` for lakes like `location`, in this process.
pub fn register_toml(location: &str, text: &str) {
    let parsed: toml::Table = toml::from_str(text).expect("storage TOML");
    let table: std::collections::BTreeMap<String, toml::Value> = parsed["lake"]["storage"]
        .as_table()
        .expect("[lake.storage]")
        .clone()
        .into_iter()
        .collect();
    let mut problems = Vec::new();
    let options =
        wal2delta::lake::storage::StorageOptions::resolve(location, &table, &mut problems);
    assert!(problems.is_empty(), "{problems:?}");
    let url = url::Url::parse(location).expect("url");
    wal2delta::lake::storage::register(&url, &options);
}
