//! Real S3 tests: the built `autosync` binary mounts buckets of real S3 servers, and a second
//! S3 client (object_store, plus raw requests for keys object_store cannot send) looks at the
//! bucket from outside. Every test runs once against each server ([`Backend`]), as
//! `moto::NAME` and `garage::NAME`:
//!
//! - **moto's S3 server**, which, like AWS S3, enforces `If-Match`/`If-None-Match` on PUT. It
//!   is found at `$AUTOSYNC_MOTO_SERVER`, then at `.ci/venv/bin/moto_server`, then on `PATH`.
//! - **Garage** (single node), a real distributed object store that ignores both headers, so
//!   autosync falls back to compare-then-write there. It is found at `$AUTOSYNC_GARAGE`, then at
//!   `~/.cargo/bin/garage`, then on `PATH`.
//!
//! Without a server, its tests fail with a one-line message saying how to install it (`.ci/run`
//! installs both). Each test starts its own server on free loopback ports and kills it in
//! `Drop`, even when the test fails. Raw requests to Garage (which checks every signature) go
//! through boto3, from the Python environment moto runs in.
//!
//! Every test has its own temp dir holding the mount point, the state and cache dirs, the
//! daemon's log (`daemon.log`) and the server's log. A failing test keeps it and prints where it
//! is. Nothing waits by sleeping: conditions are polled with a deadline.
//!
//! Set `AUTOSYNC_TEST_LOG` (e.g. `debug`) to change the daemons' `RUST_LOG` (default `info`).

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsStr;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::ops::Deref;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{
    BIN, Mount, MountSpec, Out, Rng, STAMP, StrayGuard, TestDir, Tier, UPLOAD_DELAY, mounted, read, run, run_ok, tail,
    try_run, wait_for, write_file,
};
use futures::TryStreamExt;
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::path::Path as ObjPath;
use object_store::{Attribute, ObjectStore, ObjectStoreExt, PutPayload};

const INSTALL_MOTO: &str = "install it with `python3 -m venv .ci/venv && .ci/venv/bin/pip install 'moto[server]'` \
                            (or run `bash .ci/run`), or set AUTOSYNC_MOTO_SERVER to a moto_server";
const INSTALL_GARAGE: &str = "install it with `cargo install garage --locked --version 2.5.0` (about 13 minutes on 2 \
                              cores; `bash .ci/run` does it), or set AUTOSYNC_GARAGE to a garage binary";
/// Credentials for the moto servers that do not enforce authentication; no Garage key has them.
const KEY_ID: &str = "testing";
const SECRET: &str = "testing";

static TIER: Tier = Tier {
    temp_prefix: "autosync-s3-",
    shutdown_grace: "10",
    flush_timeout: "60",
    drop_unmount_timeout: Duration::from_secs(30),
    drop_exit_timeout: Duration::from_secs(20),
    cli_env_remove: &["AWS_CA_BUNDLE"],
    show_other_logs: true,
};

/// The environment of an `autosync` child (or a boto3 script): no `AWS_*` variable of this
/// machine (the machine sets `AWS_CA_BUNDLE`, and an `AWS_ENDPOINT*` would override
/// `--endpoint`), only the credentials and region given.
fn s3_env(cmd: &mut Command, key_id: &str, secret: &str, region: &str) {
    for (k, _) in std::env::vars_os() {
        if k.as_bytes().starts_with(b"AWS_") {
            cmd.env_remove(&k);
        }
    }
    cmd.env("AWS_ACCESS_KEY_ID", key_id).env("AWS_SECRET_ACCESS_KEY", secret).env("AWS_REGION", region);
}

// ---------------------------------------------------------------------------------------------
// The servers
// ---------------------------------------------------------------------------------------------

/// The S3 server a test runs against.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Backend {
    Moto,
    Garage,
}

impl Backend {
    fn name(self) -> &'static str {
        match self {
            Backend::Moto => "moto",
            Backend::Garage => "garage",
        }
    }

    /// The region the server signs for (Garage refuses requests signed for another).
    fn region(self) -> &'static str {
        match self {
            Backend::Moto => "us-east-1",
            Backend::Garage => "garage",
        }
    }

    /// Which conditional writes the mount-time probe must find: (`PutMode::Create`,
    /// `PutMode::Update`). moto enforces both, as AWS S3 does; Garage ignores both headers.
    fn conditional_writes(self) -> (bool, bool) {
        match self {
            Backend::Moto => (true, true),
            Backend::Garage => (false, false),
        }
    }

    /// The line `autosync status` prints about conditional writes.
    fn status_line(self) -> &'static str {
        match self.conditional_writes() {
            (true, true) => "conditional writes: enforced by the store",
            _ => {
                "conditional writes: not fully enforced by the store (create: no, update: no); using compare-then-write"
            }
        }
    }
}

/// A running server of either kind, killed when dropped.
enum Server {
    Moto(Moto),
    Garage(Garage),
}

impl Server {
    /// Starts a server of `backend` logging to `log`.
    fn start(backend: Backend, log: PathBuf) -> Server {
        match backend {
            Backend::Moto => Server::Moto(Moto::start(log)),
            Backend::Garage => Server::Garage(Garage::start(log)),
        }
    }

    fn backend(&self) -> Backend {
        match self {
            Server::Moto(_) => Backend::Moto,
            Server::Garage(_) => Backend::Garage,
        }
    }

    fn endpoint(&self) -> String {
        let port = match self {
            Server::Moto(m) => m.port,
            Server::Garage(g) => g.s3_port,
        };
        format!("http://127.0.0.1:{port}")
    }

    fn region(&self) -> &'static str {
        self.backend().region()
    }

    /// Credentials the server accepts for every bucket made by [`Server::create_bucket`].
    fn creds(&self) -> (&str, &str) {
        match self {
            Server::Moto(_) => (KEY_ID, SECRET),
            Server::Garage(g) => (&g.key_id, &g.secret),
        }
    }

    fn create_bucket(&self, bucket: &str) {
        match self {
            Server::Moto(m) => m.create_bucket(bucket),
            Server::Garage(g) => g.create_bucket(bucket),
        }
    }

    /// Puts `body` at `key` exactly as given (object_store refuses keys like `a//b`).
    fn put_raw(&self, bucket: &str, key: &str, body: &[u8]) {
        match self {
            Server::Moto(m) => m.put_raw(bucket, key, body),
            Server::Garage(g) => {
                g.boto3(&["put", bucket, key], body);
            }
        }
    }

    /// Every key under `prefix`, exactly as the server lists it.
    fn raw_keys(&self, bucket: &str, prefix: &str) -> Vec<String> {
        match self {
            Server::Moto(m) => {
                let xml = m.ok("GET", &format!("/{bucket}?list-type=2&prefix={prefix}"), &[], b"");
                xml.split("<Key>").skip(1).filter_map(|s| s.split_once("</Key>")).map(|(k, _)| k.to_string()).collect()
            }
            Server::Garage(g) => g.boto3(&["list", bucket, prefix], b"").stdout.lines().map(String::from).collect(),
        }
    }
}

fn is_executable(p: &Path) -> bool {
    fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// `$VAR` if set (it must be an executable file), else the first of `candidates` that is one,
/// else `name` on `PATH`; `None` when none is.
fn find_exe(var: &str, candidates: &[PathBuf], name: &str, install: &str) -> Option<PathBuf> {
    if let Some(p) = std::env::var_os(var) {
        let p = PathBuf::from(p);
        assert!(is_executable(&p), "{var}={} is not an executable file: {install}", p.display());
        return Some(p);
    }
    if let Some(p) = candidates.iter().find(|p| is_executable(p)) {
        return Some(p.clone());
    }
    std::env::var_os("PATH")
        .and_then(|path| std::env::split_paths(&path).map(|d| d.join(name)).find(|p| is_executable(p)))
}

/// `$AUTOSYNC_MOTO_SERVER`, else `.ci/venv/bin/moto_server`, else `moto_server` on `PATH`.
fn moto_server_path() -> PathBuf {
    let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join(".ci/venv/bin/moto_server");
    find_exe("AUTOSYNC_MOTO_SERVER", &[venv], "moto_server", INSTALL_MOTO).unwrap_or_else(|| {
        panic!("moto_server not found (not in AUTOSYNC_MOTO_SERVER, .ci/venv/bin or PATH): {INSTALL_MOTO}")
    })
}

/// `$AUTOSYNC_GARAGE`, else `~/.cargo/bin/garage`, else `garage` on `PATH`.
fn garage_path() -> PathBuf {
    let home = std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo/bin/garage"));
    find_exe("AUTOSYNC_GARAGE", &home.into_iter().collect::<Vec<_>>(), "garage", INSTALL_GARAGE)
        .unwrap_or_else(|| panic!("garage not found (not in AUTOSYNC_GARAGE, ~/.cargo/bin or PATH): {INSTALL_GARAGE}"))
}

/// The Python moto runs in (from `moto_server`'s `#!` line), which has boto3 (a dependency of
/// moto).
fn moto_python() -> PathBuf {
    let moto = moto_server_path();
    let text = fs::read(&moto).unwrap_or_default();
    let first = text.split(|&b| b == b'\n').next().unwrap_or_default();
    let interp = first
        .strip_prefix(b"#!")
        .and_then(|l| std::str::from_utf8(l).ok())
        .and_then(|l| l.split_whitespace().next())
        .map(PathBuf::from)
        .filter(|p| is_executable(p));
    interp.unwrap_or_else(|| moto.with_file_name("python3"))
}

/// A loopback port nothing listens on (at the time of the call).
fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    l.local_addr().unwrap().port()
}

/// One plain HTTP/1.1 request to a loopback port; returns the status and the body.
fn http(port: u16, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    s.set_write_timeout(Some(Duration::from_secs(30)))?;
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes())?;
    s.write_all(body)?;
    let mut resp = Vec::new();
    s.read_to_end(&mut resp)?;
    let text = String::from_utf8_lossy(&resp).into_owned();
    let status =
        text.strip_prefix("HTTP/1.").and_then(|r| r.get(2..5)).and_then(|c| c.parse().ok()).ok_or_else(|| {
            std::io::Error::other(format!("not an HTTP response: {:?}", &text[..text.len().min(200)]))
        })?;
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    Ok((status, body))
}

/// A moto server on a free loopback port, killed when dropped.
struct Moto {
    child: Child,
    port: u16,
    log: PathBuf,
}

impl Moto {
    fn start(log: PathBuf) -> Moto {
        let exe = moto_server_path();
        // Another process may take the free port before moto binds it: then try another.
        for _ in 0..3 {
            let port = free_port();
            let f = File::create(&log).unwrap_or_else(|e| panic!("create {}: {e}", log.display()));
            let child = Command::new(&exe)
                .args(["-H", "127.0.0.1", "-p", &port.to_string()])
                .env_remove("INITIAL_NO_AUTH_ACTION_COUNT")
                .stdin(Stdio::null())
                .stdout(f.try_clone().unwrap())
                .stderr(f)
                .spawn()
                .unwrap_or_else(|e| panic!("cannot start {}: {e}; {INSTALL_MOTO}", exe.display()));
            let mut moto = Moto { child, port, log: log.clone() };
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                if moto.child.try_wait().ok().flatten().is_some() {
                    break; // exited (port taken?): try another port
                }
                if let Ok((200, body)) = http(port, "GET", "/", &[], b"")
                    && body.contains("ListAllMyBucketsResult")
                {
                    return moto;
                }
                assert!(
                    Instant::now() < deadline,
                    "moto_server did not answer on 127.0.0.1:{port} within 30 s; its log:\n{}",
                    tail(&log, 20)
                );
                std::thread::sleep(Duration::from_millis(25));
            }
        }
        panic!("moto_server ({}) exited at start three times; its log:\n{}", exe.display(), tail(&log, 30));
    }

    /// A raw request that must answer 200.
    fn ok(&self, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> String {
        match http(self.port, method, path, headers, body) {
            Ok((200, body)) => body,
            Ok((status, body)) => {
                panic!("{method} {path} answered {status}: {body}\nmoto log:\n{}", tail(&self.log, 20))
            }
            Err(e) => panic!("{method} {path}: {e}"),
        }
    }

    /// `PUT /bucket`: unsigned, which moto accepts unless authentication is enforced.
    fn create_bucket(&self, bucket: &str) {
        self.ok("PUT", &format!("/{bucket}"), &[], b"");
    }

    /// `PUT /bucket/key` with the key exactly as given (object_store refuses keys like `a//b`).
    fn put_raw(&self, bucket: &str, key: &str, body: &[u8]) {
        self.ok("PUT", &format!("/{bucket}/{key}"), &[("Content-Type", "application/octet-stream")], body);
    }

    /// An IAM action, unsigned: moto routes it by the service named in the credential scope.
    fn iam(&self, params: &[(&str, &str)]) -> String {
        let body = url::form_urlencoded::Serializer::new(String::new())
            .extend_pairs(params)
            .append_pair("Version", "2010-05-08")
            .finish();
        let auth =
            "AWS4-HMAC-SHA256 Credential=setup/20240101/us-east-1/iam/aws4_request, SignedHeaders=host, Signature=0";
        self.ok(
            "POST",
            "/",
            &[("Authorization", auth), ("Content-Type", "application/x-www-form-urlencoded")],
            body.as_bytes(),
        )
    }

    /// Creates an IAM user allowed everything and returns its access key pair.
    fn iam_user(&self, name: &str) -> (String, String) {
        self.iam(&[("Action", "CreateUser"), ("UserName", name)]);
        let policy = r#"{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Action":"*","Resource":"*"}]}"#;
        self.iam(&[("Action", "PutUserPolicy"), ("UserName", name), ("PolicyName", "all"), ("PolicyDocument", policy)]);
        let xml = self.iam(&[("Action", "CreateAccessKey"), ("UserName", name)]);
        let field = |tag: &str| {
            xml.split_once(&format!("<{tag}>"))
                .and_then(|(_, r)| r.split_once(&format!("</{tag}>")))
                .map(|(v, _)| v.to_string())
                .unwrap_or_else(|| panic!("no {tag} in the CreateAccessKey answer: {xml}"))
        };
        (field("AccessKeyId"), field("SecretAccessKey"))
    }

    /// From now on every request must be signed with the credentials of an IAM user.
    fn enforce_auth(&self) {
        self.ok("POST", "/moto-api/reset-auth", &[("Content-Type", "text/plain")], b"0");
        let (status, _) = http(self.port, "GET", "/", &[], b"").expect("GET /");
        assert_ne!(status, 200, "moto still answers unsigned requests after reset-auth");
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A single-node Garage cluster on free loopback ports, with one access key allowed on every
/// bucket made by [`Garage::create_bucket`]. Its metadata and data live next to its log; it is
/// killed when dropped.
struct Garage {
    child: Child,
    exe: PathBuf,
    config: PathBuf,
    log: PathBuf,
    s3_port: u16,
    key_id: String,
    secret: String,
}

/// Name of the one access key of a [`Garage`].
const GARAGE_KEY: &str = "autosync-test";

impl Garage {
    fn start(log: PathBuf) -> Garage {
        let exe = garage_path();
        let dir = log.with_extension("d");
        fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("mkdir {}: {e}", dir.display()));
        let config = dir.join("garage.toml");
        let secret: String = Rng(free_port() as u64).bytes(32).iter().map(|b| format!("{b:02x}")).collect();
        // Another process may take a free port before Garage binds it: then try others.
        for _ in 0..3 {
            let s3_port = free_port();
            let rpc_port =
                wait_for("a second free port", Duration::from_secs(5), || Some(free_port()).filter(|&p| p != s3_port));
            let toml = format!(
                r#"metadata_dir = "{dir}/meta"
data_dir = "{dir}/data"
db_engine = "sqlite"
replication_factor = 1
rpc_bind_addr = "127.0.0.1:{rpc_port}"
rpc_public_addr = "127.0.0.1:{rpc_port}"
rpc_secret = "{secret}"

[s3_api]
s3_region = "{region}"
api_bind_addr = "127.0.0.1:{s3_port}"
root_domain = ".s3.garage.localhost"
"#,
                dir = dir.display(),
                region = Backend::Garage.region(),
            );
            fs::write(&config, toml).unwrap_or_else(|e| panic!("write {}: {e}", config.display()));
            let f = File::create(&log).unwrap_or_else(|e| panic!("create {}: {e}", log.display()));
            let child = Command::new(&exe)
                .arg("-c")
                .arg(&config)
                .arg("server")
                .env("RUST_LOG", "garage=info")
                .env("NO_COLOR", "1")
                .stdin(Stdio::null())
                .stdout(f.try_clone().unwrap())
                .stderr(f)
                .spawn()
                .unwrap_or_else(|e| panic!("cannot start {}: {e}; {INSTALL_GARAGE}", exe.display()));
            let mut g = Garage {
                child,
                exe: exe.clone(),
                config: config.clone(),
                log: log.clone(),
                s3_port,
                key_id: String::new(),
                secret: String::new(),
            };
            // Up once its CLI reaches it over RPC.
            let deadline = Instant::now() + Duration::from_secs(30);
            let up = loop {
                if g.child.try_wait().ok().flatten().is_some() {
                    break false; // exited (port taken?): try other ports
                }
                if g.try_cli(&["status"]).is_ok_and(|o| o.ok()) {
                    break true;
                }
                assert!(
                    Instant::now() < deadline,
                    "garage did not answer its CLI within 30 s; its log:\n{}",
                    tail(&log, 20)
                );
                std::thread::sleep(Duration::from_millis(50));
            };
            if !up {
                continue;
            }
            // One node holding every partition, then one key.
            let node = g.cli(&["node", "id", "-q"]).stdout;
            let node = node.trim().split('@').next().unwrap_or_default().to_string();
            g.cli(&["layout", "assign", "-z", "dc1", "-c", "1G", &node]);
            g.cli(&["layout", "apply", "--version", "1"]);
            let out = g.cli(&["key", "create", GARAGE_KEY]);
            let field = |name: &str| {
                out.stdout
                    .lines()
                    .find_map(|l| {
                        l.split_once(':').filter(|(k, _)| k.trim() == name).map(|(_, v)| v.trim().to_string())
                    })
                    .unwrap_or_else(|| panic!("no `{name}:` in the output of `garage key create`: {out}"))
            };
            (g.key_id, g.secret) = (field("Key ID"), field("Secret key"));
            // The S3 API answers (any HTTP status: the request is unsigned).
            wait_for("Garage's S3 API to answer", Duration::from_secs(30), || {
                http(s3_port, "GET", "/", &[], b"").ok().map(|_| ())
            });
            return g;
        }
        panic!("garage ({}) exited at start three times; its log:\n{}", exe.display(), tail(&log, 30));
    }

    fn try_cli(&self, args: &[&str]) -> Result<Out, String> {
        let mut cmd = Command::new(&self.exe);
        cmd.arg("-c").arg(&self.config).args(args).env("RUST_LOG", "warn");
        try_run(&mut cmd, Duration::from_secs(30), None)
    }

    /// `garage -c CONFIG ARGS...`, which must succeed.
    fn cli(&self, args: &[&str]) -> Out {
        let out = self.try_cli(args).unwrap_or_else(|e| panic!("{e}"));
        assert!(out.ok(), "garage {}: {out}\ngarage log:\n{}", args.join(" "), tail(&self.log, 20));
        out
    }

    /// A bucket that the key can read, write and administer.
    fn create_bucket(&self, bucket: &str) {
        self.cli(&["bucket", "create", bucket]);
        self.cli(&["bucket", "allow", "--read", "--write", "--owner", bucket, "--key", GARAGE_KEY]);
    }

    /// Runs one operation of a boto3 script, signed with the key, which must succeed:
    /// `put BUCKET KEY` (with `body`) or `list BUCKET PREFIX` (prints one key a line).
    fn boto3(&self, args: &[&str], body: &[u8]) -> Out {
        const SCRIPT: &str = r#"
import os, sys, boto3
from botocore.config import Config
endpoint, op, bucket, key, body = sys.argv[1:6]
config = Config(s3={"addressing_style": "path"})
s3 = boto3.client("s3", endpoint_url=endpoint, region_name=os.environ["AWS_REGION"], config=config)
if op == "put":
    with open(body, "rb") as f:
        s3.put_object(Bucket=bucket, Key=key, Body=f.read())
else:
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=key):
        for o in page.get("Contents", []):
            print(o["Key"])
"#;
        let file = tempfile::NamedTempFile::new().expect("tempfile");
        fs::write(file.path(), body).expect("write the body");
        let python = moto_python();
        let mut cmd = Command::new(&python);
        cmd.arg("-c").arg(SCRIPT).arg(format!("http://127.0.0.1:{}", self.s3_port)).args(args).arg(file.path());
        s3_env(&mut cmd, &self.key_id, &self.secret, Backend::Garage.region());
        // No checksum trailers: only what every S3 server understands.
        cmd.env("AWS_REQUEST_CHECKSUM_CALCULATION", "when_required")
            .env("AWS_RESPONSE_CHECKSUM_VALIDATION", "when_required");
        let what = format!("boto3 {} (with {})", args.join(" "), python.display());
        let out = try_run(&mut cmd, Duration::from_secs(60), None).unwrap_or_else(|e| panic!("{what}: {e}"));
        assert!(out.ok(), "{what}: {out}\ngarage log:\n{}", tail(&self.log, 20));
        out
    }
}

impl Drop for Garage {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---------------------------------------------------------------------------------------------
// The other S3 client
// ---------------------------------------------------------------------------------------------

fn obj(key: &str) -> ObjPath {
    ObjPath::parse(key).unwrap_or_else(|e| panic!("object_store cannot hold key {key:?}: {e}"))
}

/// One object as another S3 client sees it.
struct Object {
    data: Vec<u8>,
    meta: BTreeMap<String, String>,
    etag: String,
}

/// Another S3 client on a bucket: object_store with its own runtime.
struct Other {
    rt: tokio::runtime::Runtime,
    store: AmazonS3,
}

impl Other {
    fn new(server: &Server, bucket: &str) -> Other {
        let (key_id, secret) = server.creds();
        Other::with_keys(server, bucket, key_id, secret)
    }

    fn with_keys(server: &Server, bucket: &str, key_id: &str, secret: &str) -> Other {
        let store = AmazonS3Builder::new()
            .with_endpoint(server.endpoint())
            .with_allow_http(true)
            .with_bucket_name(bucket)
            .with_region(server.region())
            .with_access_key_id(key_id)
            .with_secret_access_key(secret)
            .build()
            .expect("object_store client");
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("tokio runtime");
        Other { rt, store }
    }

    /// Puts `data` at `key`; returns the new ETag.
    fn put(&self, key: &str, data: &[u8]) -> String {
        let r = self.rt.block_on(self.store.put(&obj(key), PutPayload::from(data.to_vec())));
        r.unwrap_or_else(|e| panic!("other client: put {key:?}: {e}")).e_tag.unwrap_or_default()
    }

    fn get(&self, key: &str) -> Object {
        let r = self.rt.block_on(async {
            let g = self.store.get(&obj(key)).await?;
            let meta = g
                .attributes
                .iter()
                .filter_map(|(k, v)| match k {
                    Attribute::Metadata(name) => Some((name.to_ascii_lowercase(), v.as_ref().to_string())),
                    _ => None,
                })
                .collect();
            let etag = g.meta.e_tag.clone().unwrap_or_default();
            let data = g.bytes().await?.to_vec();
            Ok::<_, object_store::Error>(Object { data, meta, etag })
        });
        r.unwrap_or_else(|e| panic!("other client: get {key:?}: {e}"))
    }

    fn delete(&self, key: &str) {
        let r = self.rt.block_on(self.store.delete(&obj(key)));
        r.unwrap_or_else(|e| panic!("other client: delete {key:?}: {e}"));
    }

    /// Every key in the bucket.
    fn keys(&self) -> BTreeSet<String> {
        let r = self.rt.block_on(self.store.list(None).map_ok(|m| m.location.to_string()).try_collect());
        r.unwrap_or_else(|e| panic!("other client: list: {e}"))
    }
}

// ---------------------------------------------------------------------------------------------
// Mounts, processes and the mount table
// ---------------------------------------------------------------------------------------------

/// One test's temp dir: mount point, state and cache dirs, the daemon's and the servers' logs.
struct Fixture {
    dir: TestDir,
    backend: Backend,
}

impl Fixture {
    /// The temp dir of test `name` run against `backend`.
    fn new(name: &str, backend: Backend) -> Self {
        Fixture { dir: TestDir::new(&TIER, &format!("{name}-{}", backend.name())), backend }
    }

    /// A server of this fixture's backend, logging to `NAME.log` in this fixture.
    fn server(&self, name: &str) -> Server {
        Server::start(self.backend, self.root.join(format!("{name}.log")))
    }

    /// Mounts `source` of `server` at `mnt`, with state dir `state-TAG` and cache dir `cache-TAG`.
    fn mount(&self, server: &Server, source: &str, metadata_ttl: &str, tag: &str) -> Mount {
        self.mount_with(server, source, metadata_ttl, tag, server.creds())
    }

    /// Mounts `source` of `server` with the credentials `creds`; the region is given by
    /// `--region`.
    fn mount_with(&self, server: &Server, source: &str, ttl: &str, tag: &str, creds: (&str, &str)) -> Mount {
        let endpoint = server.endpoint();
        let spec = MountSpec {
            source: OsStr::new(source),
            state: &self.root.join(format!("state-{tag}")),
            cache: &self.root.join(format!("cache-{tag}")),
            opts: &["--endpoint", &endpoint, "--allow-http", "--region", server.region()],
            upload_delay: UPLOAD_DELAY,
            metadata_ttl: ttl,
        };
        Mount::start(&self.dir, &spec, |cmd| {
            cmd.env("NO_COLOR", "1");
            s3_env(cmd, creds.0, creds.1, server.region());
        })
    }
}

impl Deref for Fixture {
    type Target = TestDir;

    fn deref(&self) -> &TestDir {
        &self.dir
    }
}

impl Mount {
    fn status_json(&self) -> serde_json::Value {
        let out = run_ok(self.cli("status").arg("--json"));
        serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("status --json is not JSON ({e}): {out}"))
    }
}

// ---------------------------------------------------------------------------------------------
// Data helpers
// ---------------------------------------------------------------------------------------------

/// Names in a folder of the mount, sorted.
fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("read_dir {}: {e}", dir.display()))
        .map(|e| e.unwrap_or_else(|e| panic!("read_dir {}: {e}", dir.display())).file_name())
        .map(|n| n.to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

fn is_marker(key: &str) -> bool {
    key.rsplit('/').next() == Some(".autosync-folder")
}

/// A clean run logs no warning or error: each one is a failed request or a conflict.
fn assert_no_warnings(fx: &Fixture) {
    let log = fs::read_to_string(&fx.log).unwrap_or_default();
    let bad: Vec<&str> = log.lines().filter(|l| l.contains(" WARN ") || l.contains(" ERROR ")).collect();
    assert!(bad.is_empty(), "the daemon logged warnings or errors:\n{}", bad.join("\n"));
}

/// This machine's hostname as conflict copies spell it (SEMANTICS.md: every character other
/// than ASCII letters, digits and `-` becomes `_`).
fn conflict_host() -> String {
    let h = nix::unistd::gethostname().expect("gethostname").to_string_lossy().into_owned();
    h.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' { c } else { '_' }).collect()
}

fn utc_stamp() -> String {
    chrono::Utc::now().format("%Y%m%d-%H%M%S").to_string()
}

// ---------------------------------------------------------------------------------------------
// 1. Round trip under a prefix: content, attributes as user metadata, conditional writes
// ---------------------------------------------------------------------------------------------

fn round_trip_under_a_prefix(backend: Backend) {
    let fx = Fixture::new("roundtrip", backend);
    let server = fx.server("server");
    server.create_bucket("round");
    let other = Other::new(&server, "round");
    let m = fx.mount(&server, "s3://round/some/prefix", "1", "a");

    let data = Rng(1).bytes(200_000);
    write_file(&fx.m("hello.txt"), b"hello from the mount\n");
    write_file(&fx.m("nested/deeper/data.bin"), &data);
    write_file(&fx.m("empty"), b"");
    fs::create_dir(fx.m("emptydir")).unwrap();
    std::os::unix::fs::symlink("nested/deeper/data.bin", fx.m("link")).unwrap();
    run_ok(Command::new("chmod").arg("640").arg(fx.m("hello.txt")));
    run_ok(Command::new("chmod").arg("750").arg(fx.m("nested")));
    run_ok(Command::new("chown").arg("1234:5678").arg(fx.m("hello.txt")));
    for p in ["hello.txt", "nested"] {
        run_ok(Command::new("touch").args(["-d", "2021-03-04 05:06:07"]).arg(fx.m(p)).env("TZ", "UTC"));
    }
    m.flush();

    // Every key is under the prefix; the files are exactly these, plus folder markers.
    let keys = other.keys();
    assert!(keys.iter().all(|k| k.starts_with("some/prefix/")), "keys outside the prefix: {keys:?}");
    let files: BTreeSet<&str> =
        keys.iter().filter(|k| !is_marker(k)).map(|k| k.strip_prefix("some/prefix/").unwrap()).collect();
    let want: BTreeSet<&str> = ["empty", "hello.txt", "link", "nested/deeper/data.bin"].into();
    assert_eq!(files, want, "files in the bucket (all keys: {keys:?})");
    assert!(keys.contains("some/prefix/emptydir/.autosync-folder"), "no marker for the empty folder: {keys:?}");

    // Content and attributes match what the mount shows, for every file.
    for rel in &want {
        let o = other.get(&format!("some/prefix/{rel}"));
        let md = fs::symlink_metadata(fx.m(rel)).unwrap();
        let content = if md.file_type().is_symlink() {
            fs::read_link(fx.m(rel)).unwrap().as_os_str().as_bytes().to_vec()
        } else {
            read(&fx.m(rel))
        };
        assert!(o.data == content, "{rel}: the object's content differs from the file in the mount");
        let got = (o.meta.get("mode"), o.meta.get("uid"), o.meta.get("gid"), o.meta.get("mtime"));
        let (mode, uid, gid, mtime) =
            (md.mode().to_string(), md.uid().to_string(), md.gid().to_string(), md.mtime().to_string());
        assert_eq!(got, (Some(&mode), Some(&uid), Some(&gid), Some(&mtime)), "{rel}: metadata {:?}", o.meta);
        assert_eq!(o.meta.get("autosync-hash"), Some(&blake3::hash(&content).to_hex().to_string()), "{rel}");
    }
    // ...and they are the values that were set.
    let hello = other.get("some/prefix/hello.txt");
    assert_eq!(hello.data, b"hello from the mount\n");
    assert_eq!(hello.meta["mode"], (libc::S_IFREG | 0o640).to_string());
    assert_eq!((hello.meta["uid"].as_str(), hello.meta["gid"].as_str()), ("1234", "5678"));
    assert_eq!(hello.meta["mtime"], STAMP.to_string());
    let link = other.get("some/prefix/link");
    assert_eq!(link.data, b"nested/deeper/data.bin");
    assert_eq!(link.meta["mode"], (libc::S_IFLNK | 0o777).to_string(), "a symlink's mode has the S_IFLNK bits");
    let marker = other.get("some/prefix/nested/.autosync-folder");
    assert_eq!(marker.meta.get("mode"), Some(&(libc::S_IFDIR | 0o750).to_string()), "folder marker: {:?}", marker.meta);
    assert_eq!(marker.meta.get("mtime"), Some(&STAMP.to_string()), "folder marker: {:?}", marker.meta);

    // moto enforces both kinds of conditional write and Garage neither, and the probe found
    // that out; `status` says so in one line.
    let st = m.status_json();
    let (create, update) = backend.conditional_writes();
    assert_eq!(st["conditional_create"], create, "status: {st}");
    assert_eq!(st["conditional_update"], update, "status: {st}");
    assert_eq!((st["pending_ops"].as_u64(), st["conflicts"].as_u64()), (Some(0), Some(0)), "status: {st}");
    let out = run_ok(&mut m.cli("status"));
    let lines: Vec<&str> = out.stdout.lines().filter(|l| l.contains("conditional")).collect();
    assert_eq!(lines, [backend.status_line()], "status: {out}");
    m.unmount();

    // A fresh mount (another machine: new state and cache) shows the same tree and attributes.
    let m = fx.mount(&server, "s3://round/some/prefix", "1", "b");
    assert_eq!(read(&fx.m("hello.txt")), b"hello from the mount\n");
    assert!(read(&fx.m("nested/deeper/data.bin")) == data, "data.bin differs in a fresh mount");
    assert_eq!(read(&fx.m("empty")), b"");
    assert_eq!(fs::read_link(fx.m("link")).unwrap(), Path::new("nested/deeper/data.bin"));
    assert_eq!(names(&fx.m("emptydir")), Vec::<String>::new());
    let md = fs::metadata(fx.m("hello.txt")).unwrap();
    assert_eq!((md.mode() & 0o7777, md.uid(), md.gid(), md.mtime()), (0o640, 1234, 5678, STAMP), "hello.txt");
    let md = fs::metadata(fx.m("nested")).unwrap();
    assert_eq!((md.mode() & 0o7777, md.mtime()), (0o750, STAMP), "nested/");
    m.unmount();
    assert_no_warnings(&fx);
}

// ---------------------------------------------------------------------------------------------
// 2. Objects written by another client, with awkward key characters, show up in the mount
// ---------------------------------------------------------------------------------------------

fn objects_from_another_client_appear_with_their_names(backend: Backend) {
    let fx = Fixture::new("names", backend);
    let server = fx.server("server");
    server.create_bucket("names");
    let other = Other::new(&server, "names");
    let m = fx.mount(&server, "s3://names", "0.5", "a");
    // The empty root is listed (and that listing cached) before the objects exist.
    assert_eq!(names(&fx.mnt), Vec::<String>::new());

    let objects: Vec<(&str, Vec<u8>)> = [
        "with space.txt",
        "ünïcödé ñame.txt",
        "a+b=c.txt",
        "100%.txt",
        "50%25 literal.txt",
        "a%2Fb.txt",
        "issue#12.txt",
        "q?x&y=z.txt",
        "folder with space/x+y%z#w ü.txt",
    ]
    .iter()
    .map(|&k| (k, format!("content of {k}\n").into_bytes()))
    .collect();
    for (k, data) in &objects {
        other.put(k, data);
    }

    let top: BTreeSet<String> = objects.iter().map(|(k, _)| k.split('/').next().unwrap().to_string()).collect();
    let top: Vec<String> = top.into_iter().collect();
    wait_for("the other client's objects to appear in the mount", Duration::from_secs(20), || {
        (names(&fx.mnt) == top).then_some(())
    });
    assert_eq!(names(&fx.m("folder with space")), vec!["x+y%z#w ü.txt".to_string()]);
    for (k, data) in &objects {
        assert_eq!(&read(&fx.m(k)), data, "{k} in the mount");
        assert_eq!(fs::metadata(fx.m(k)).unwrap().len(), data.len() as u64, "size of {k}");
    }

    // Their later changes show too: a replaced object (new size) and a deleted one.
    let replaced = b"replaced by the other client, with a different size\n";
    other.put("a+b=c.txt", replaced);
    other.delete("100%.txt");
    // (Polled by `stat`: reading the file before the mount re-lists its folder would read
    // the version it knows, which answers ESTALE now that it is gone.)
    wait_for("the replaced object's new size in the mount", Duration::from_secs(20), || {
        (fs::metadata(fx.m("a+b=c.txt")).ok()?.len() == replaced.len() as u64).then_some(())
    });
    assert_eq!(read(&fx.m("a+b=c.txt")), replaced);
    wait_for("the deleted object to leave the mount", Duration::from_secs(20), || {
        (!names(&fx.mnt).iter().any(|n| n == "100%.txt")).then_some(())
    });
    let objects: Vec<(&str, Vec<u8>)> = objects
        .into_iter()
        .filter(|(k, _)| *k != "100%.txt")
        .map(|(k, d)| if k == "a+b=c.txt" { (k, replaced.to_vec()) } else { (k, d) })
        .collect();

    // The other way round: names written in the mount are the keys, byte for byte.
    let mine = ["from mount + % # ü.txt", "sub dir/50%25 b+c.txt"];
    for k in mine {
        write_file(&fx.m(k), format!("mine: {k}\n").as_bytes());
    }
    m.flush();
    for k in mine {
        assert_eq!(other.get(k).data, format!("mine: {k}\n").into_bytes(), "key {k:?} as read by the other client");
    }
    let keys: BTreeSet<String> = other.keys().into_iter().filter(|k| !is_marker(k)).collect();
    let want: BTreeSet<String> = objects.iter().map(|(k, _)| k.to_string()).chain(mine.map(String::from)).collect();
    assert_eq!(keys, want, "keys in the bucket");
    m.unmount();
    assert_no_warnings(&fx);
}

// ---------------------------------------------------------------------------------------------
// 3. Keys that cannot be file names are skipped with a warning; the rest lists fine
// ---------------------------------------------------------------------------------------------

fn keys_that_cannot_be_paths_are_skipped(backend: Backend) {
    let fx = Fixture::new("badkeys", backend);
    let server = fx.server("server");
    server.create_bucket("odd");
    server.put_raw("odd", "bad//x", b"empty component\n");
    server.put_raw("odd", "bad/ok", b"ok\n");
    server.put_raw("odd", "dir/../y", b"dot-dot\n");
    server.put_raw("odd", "dir/fine.txt", b"fine\n");
    let m = fx.mount(&server, "s3://odd", "1", "a");

    let ls = |rel: &str| {
        let out = run(Command::new("ls").arg(fx.m(rel)));
        assert!(out.ok() && out.stderr.is_empty(), "ls {rel}: {out}");
        out.stdout
    };
    assert_eq!(ls(""), "bad\ndir\n");
    assert_eq!(ls("bad"), "ok\n");
    assert_eq!(ls("dir"), "fine.txt\n");
    assert_eq!(read(&fx.m("bad/ok")), b"ok\n");
    assert_eq!(read(&fx.m("dir/fine.txt")), b"fine\n");

    // One warning names each skipped key.
    let log = fs::read_to_string(&fx.log).unwrap();
    let warned =
        |key: &str| log.lines().any(|l| l.contains("WARN") && l.contains("cannot be a file name") && l.contains(key));
    assert!(warned("bad//"), "no warning about `bad//x` in the daemon log:\n{log}");
    assert!(warned("dir/../"), "no warning about `dir/../y` in the daemon log:\n{log}");

    // The folder stays usable: a new file in it goes up, and the odd objects are untouched.
    write_file(&fx.m("bad/new.txt"), b"new\n");
    m.flush();
    assert_eq!(ls("bad"), "new.txt\nok\n");
    let other = Other::new(&server, "odd");
    assert_eq!(other.get("bad/new.txt").data, b"new\n");
    let listing = server.raw_keys("odd", "bad/");
    assert!(listing.iter().any(|k| k == "bad//x"), "bad//x is gone from the bucket: {listing:?}");
    m.unmount();
}

// ---------------------------------------------------------------------------------------------
// 4. A conflict: the bucket keeps the other client's edit, ours becomes a conflict copy
// ---------------------------------------------------------------------------------------------

/// On moto the conflict shows as a 412 to the conditional upload; on Garage, which ignores the
/// condition, through compare-then-write.
fn concurrent_edit_becomes_a_conflict_copy(backend: Backend) {
    let fx = Fixture::new("conflict", backend);
    let server = fx.server("server");
    server.create_bucket("conf");
    let other = Other::new(&server, "conf");
    // A long metadata TTL: the mount does not notice the other client's write before its own.
    let m = fx.mount(&server, "s3://conf/team", "600", "a");
    let f = fx.m("f.txt");
    write_file(&f, b"ours, first version\n");
    m.flush();
    assert_eq!(other.get("team/f.txt").data, b"ours, first version\n");

    let theirs = b"theirs: written by another client\n";
    let their_etag = other.put("team/f.txt", theirs);
    let before = utc_stamp();
    let ours = b"ours, second version, longer than the first\n";
    {
        let mut h = OpenOptions::new().write(true).open(&f).unwrap();
        h.write_all(ours).unwrap();
    }
    m.flush();
    let after = utc_stamp();

    // The bucket keeps their version at the path...
    let at_path = other.get("team/f.txt");
    assert_eq!(at_path.data, theirs, "the other client's edit was overwritten");
    assert_eq!(at_path.etag, their_etag);
    // ...and ours is next to it as f.conflict-HOST-YYYYMMDD-HHMMSS.txt.
    let prefix = format!("team/f.conflict-{}-", conflict_host());
    let keys = other.keys();
    let copies: Vec<&String> = keys.iter().filter(|k| k.starts_with(&prefix)).collect();
    assert_eq!(copies.len(), 1, "expected one conflict copy `{prefix}YYYYMMDD-HHMMSS.txt`; keys: {keys:?}");
    let stamp = copies[0].strip_prefix(&prefix).unwrap().strip_suffix(".txt").unwrap_or_else(|| {
        panic!("conflict copy {} does not keep the .txt extension", copies[0]);
    });
    let well_formed = stamp.len() == 15
        && stamp.bytes().enumerate().all(|(i, b)| if i == 8 { b == b'-' } else { b.is_ascii_digit() });
    assert!(well_formed, "stamp {stamp:?} of {} is not YYYYMMDD-HHMMSS", copies[0]);
    assert!(before.as_str() <= stamp && stamp <= after.as_str(), "stamp {stamp} not within [{before}, {after}] UTC");
    assert_eq!(other.get(copies[0]).data, ours, "the conflict copy does not hold our version");
    assert_eq!(keys.iter().filter(|k| !is_marker(k)).count(), 2, "keys: {keys:?}");

    // status counts it.
    let out = run_ok(&mut m.cli("status"));
    let line = out.stdout.lines().find(|l| l.starts_with("conflicts:")).unwrap_or_else(|| panic!("{out}"));
    assert_eq!(line.split_once(':').unwrap().1.trim(), "1", "status: {out}");
    assert_eq!(m.status_json()["conflicts"], 1);
    let log = fs::read_to_string(&fx.log).unwrap();
    assert!(log.lines().any(|l| l.contains("WARN") && l.contains("conflict")), "no conflict warning in:\n{log}");

    // In the mount: their version at the path, ours as the conflict copy.
    let copy_name = copies[0].strip_prefix("team/").unwrap().to_string();
    let mut want_names = vec!["f.txt".to_string(), copy_name.clone()];
    want_names.sort();
    let want = (want_names, Some(theirs.to_vec()));
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let seen = (names(&fx.mnt), fs::read(&f).ok());
        if seen == want {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "after 10 s the mount shows {:?} with f.txt = {:?}; expected {:?} with f.txt = {:?}",
            seen.0,
            seen.1.as_deref().map(String::from_utf8_lossy),
            want.0,
            String::from_utf8_lossy(theirs)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(read(&fx.m(&copy_name)), ours);
    m.unmount();
}

// ---------------------------------------------------------------------------------------------
// 5. Bad setups: one line on stderr, a non-zero exit, nothing mounted
// ---------------------------------------------------------------------------------------------

/// A mount that must fail: the `--endpoint`, the source, the credentials, and a part of the
/// one line it must print.
struct BadSetup<'a> {
    what: &'a str,
    endpoint: String,
    source: &'a str,
    creds: (&'a str, &'a str),
    says: &'a str,
}

fn bad_setups_fail_with_one_line_and_mount_nothing(backend: Backend) {
    let fx = Fixture::new("bad", backend);
    let server = fx.server("server");
    server.create_bucket("exists");
    // A server that checks signatures, with a bucket `guarded` and the one key pair allowed on
    // it. moto checks them only when told to: a second moto server where one IAM user is
    // allowed everything. Garage always does: the same server, with its key.
    let moto_auth;
    let (guarded, key_id, secret) = match &server {
        Server::Moto(_) => {
            let m = Moto::start(fx.root.join("moto-auth.log"));
            let (key_id, secret) = m.iam_user("alice");
            m.create_bucket("guarded");
            m.enforce_auth();
            moto_auth = Server::Moto(m);
            (&moto_auth, key_id, secret)
        }
        Server::Garage(g) => {
            server.create_bucket("guarded");
            (&server, g.key_id.clone(), g.secret.clone())
        }
    };
    // A port below 1024 that nothing listens on: a port picked free at run time could be
    // taken by a server another test starts meanwhile (seen: it answered 403).
    let closed = 1;

    let case = |what, endpoint, source, creds, says| BadSetup { what, endpoint, source, creds, says };
    let cases = [
        case("missing bucket", server.endpoint(), "s3://nosuchbucket/p", server.creds(), "does not exist"),
        case(
            "unreachable endpoint",
            format!("http://127.0.0.1:{closed}"),
            "s3://exists",
            server.creds(),
            "cannot reach",
        ),
        case("unknown access key", guarded.endpoint(), "s3://guarded", (KEY_ID, SECRET), "refused the credentials"),
        case(
            "wrong secret",
            guarded.endpoint(),
            "s3://guarded",
            (&key_id, "not-the-secret"),
            "refused the credentials",
        ),
    ];
    let mut failures = Vec::new();
    for (i, BadSetup { what, endpoint, source, creds, says }) in cases.iter().enumerate() {
        for daemon in [false, true] {
            let mp = fx.root.join(format!("mp{i}-{daemon}"));
            fs::create_dir(&mp).unwrap();
            let _guard = StrayGuard(mp.clone());
            let mut cmd = Command::new(BIN);
            cmd.arg("mount").arg(source).arg(&mp);
            cmd.arg("--state-dir").arg(fx.root.join(format!("s{i}-{daemon}")));
            cmd.arg("--cache-dir").arg(fx.root.join(format!("c{i}-{daemon}")));
            cmd.args(["--endpoint", endpoint, "--allow-http"]).env_remove("RUST_LOG");
            // The region from the environment here, from `--region` in `Fixture::mount`.
            s3_env(&mut cmd, creds.0, creds.1, backend.region());
            if daemon {
                cmd.arg("--daemon");
            }
            let mode = if daemon { "with --daemon" } else { "in the foreground" };
            let out = try_run(&mut cmd, Duration::from_secs(60), None)
                .unwrap_or_else(|e| panic!("{what} {mode}: the mount should have failed: {e}"));
            assert!(!out.ok(), "{what} {mode}: mount succeeded: {out}");
            assert!(!mounted(&mp), "{what} {mode}: something is mounted at {}", mp.display());
            let lines: Vec<&str> = out.stderr.lines().filter(|l| !l.trim().is_empty()).collect();
            if lines.len() != 1 || !lines[0].starts_with("autosync: ") || !lines[0].contains(says) {
                failures
                    .push(format!("{what} {mode}: stderr is not one `autosync: ...{says}...` line:\n{}", out.stderr));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));

    // The same guarded bucket mounts with the right credentials, and takes writes.
    let m = fx.mount_with(guarded, "s3://guarded", "1", "ok", (&key_id, &secret));
    write_file(&fx.m("signed.txt"), b"written with valid credentials\n");
    m.flush();
    assert_eq!(
        Other::with_keys(guarded, "guarded", &key_id, &secret).get("signed.txt").data,
        b"written with valid credentials\n"
    );
    m.unmount();
}

// ---------------------------------------------------------------------------------------------
// 6. A 40 MiB file goes up as a multipart upload
// ---------------------------------------------------------------------------------------------

fn forty_mib_file_goes_up_multipart(backend: Backend) {
    let fx = Fixture::new("big", backend);
    let server = fx.server("server");
    server.create_bucket("big");
    let other = Other::new(&server, "big");
    let m = fx.mount(&server, "s3://big/data", "1", "a");
    let data = Rng(6).bytes(40 << 20);
    let want = blake3::hash(&data);
    write_file(&fx.m("big.bin"), &data);
    m.flush();

    let o = other.get("data/big.bin");
    assert_eq!(o.data.len(), data.len(), "size of the object");
    assert_eq!(blake3::hash(&o.data), want, "the object differs from what was written");
    // S3 gives a multipart object the ETag `"HASH-PARTS"`: 40 MiB in 16 MiB parts is 3 parts.
    assert!(o.etag.trim_matches('"').ends_with("-3"), "ETag {} is not that of a 3-part upload", o.etag);
    assert_eq!(o.meta.get("mode"), Some(&fs::metadata(fx.m("big.bin")).unwrap().mode().to_string()), "{:?}", o.meta);
    m.unmount();
    assert_no_warnings(&fx);
}

// ---------------------------------------------------------------------------------------------
// Every test against every server
// ---------------------------------------------------------------------------------------------

/// For each test function `f(Backend)`, the tests `moto::f` and `garage::f`.
macro_rules! against_every_backend {
    ($($test:ident),* $(,)?) => {
        mod moto {
            $(#[test]
            fn $test() {
                super::$test(super::Backend::Moto)
            })*
        }
        mod garage {
            $(#[test]
            fn $test() {
                super::$test(super::Backend::Garage)
            })*
        }
    };
}

against_every_backend!(
    round_trip_under_a_prefix,
    objects_from_another_client_appear_with_their_names,
    keys_that_cannot_be_paths_are_skipped,
    concurrent_edit_becomes_a_conflict_copy,
    bad_setups_fail_with_one_line_and_mount_nothing,
    forty_mib_file_goes_up_multipart,
);
