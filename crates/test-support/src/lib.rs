//! Test support for the comtrexx-licensing workspace (a dev-dependency only):
//! private `redis-server` processes on free ports, the development licensing
//! server as a process, a development vendor key, `eventually`, PKI, the fault
//! proxy, the raw HTTP/2 flood client and gRPC call helpers.
#![allow(dead_code, clippy::missing_panics_doc)]

pub mod calls;
pub mod flood;
pub mod pki;
pub mod proxy;
pub mod redis_server;
pub mod vendor;

pub use calls::*;
pub use redis_server::RedisServer;

use std::net::{SocketAddr, TcpListener as StdListener};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use comtrexx_licensing_domain::license::encode_public_key;
use comtrexx_licensing_domain::{
    Edition, Entitlement, Feature, LicensePayload, SeatModel, SignedLicense,
};
use comtrexx_licensing_proto::pb;
use comtrexx_licensing_proto::pb::licensing_service_client::LicensingServiceClient;
use ed25519_dalek::SigningKey;
use tonic::transport::Channel;

pub type Client = LicensingServiceClient<Channel>;

/// A development vendor key and license files signed with it.
pub struct Vendor {
    pub key: SigningKey,
    pub dir: tempfile::TempDir,
}

impl Default for Vendor {
    fn default() -> Self {
        Self::new()
    }
}

impl Vendor {
    pub fn new() -> Self {
        Self {
            key: SigningKey::from_bytes(&rand::random::<[u8; 32]>()),
            dir: tempfile::tempdir().unwrap(),
        }
    }

    pub fn public_key(&self) -> String {
        encode_public_key(&self.key.verifying_key())
    }

    pub fn license_path(&self) -> PathBuf {
        self.dir.path().join("license.json")
    }

    /// Writes a signed license for `serial` with the given entitlements, each
    /// with its seat model.
    pub fn write_license_with_models(
        &self,
        serial: &str,
        edition: Edition,
        issued_at: DateTime<Utc>,
        entitlements: &[(Feature, u32, SeatModel)],
    ) {
        let payload = LicensePayload {
            serial_number: serial.to_owned(),
            edition,
            issued_at,
            entitlements: entitlements
                .iter()
                .map(|(feature, quantity, seat_model)| Entitlement {
                    seat_model: *seat_model,
                    feature: *feature,
                    quantity: *quantity,
                    expires_at: None,
                })
                .collect(),
            nonce: None,
        };
        write_signed(
            &self.license_path(),
            &SignedLicense::sign(&payload, &self.key),
        );
    }

    /// Writes a signed license for `serial` with the given entitlements.
    pub fn write_license(
        &self,
        serial: &str,
        edition: Edition,
        issued_at: DateTime<Utc>,
        entitlements: &[(Feature, u32)],
    ) {
        let payload = LicensePayload {
            serial_number: serial.to_owned(),
            edition,
            issued_at,
            entitlements: entitlements
                .iter()
                .map(|(feature, quantity)| Entitlement {
                    seat_model: Default::default(),
                    feature: *feature,
                    quantity: *quantity,
                    expires_at: None,
                })
                .collect(),
            nonce: None,
        };
        write_signed(
            &self.license_path(),
            &SignedLicense::sign(&payload, &self.key),
        );
    }
}

pub fn write_signed(path: &Path, signed: &SignedLicense) {
    std::fs::write(path, signed.to_json()).unwrap();
}

/// A unique serial number per test, so tests never share keys.
pub fn serial(tag: &str) -> String {
    format!("T-{tag}-{:08x}", rand::random::<u32>())
}

/// Polls `check` until it holds or `within` passes; returns whether it held.
pub async fn eventually<F, Fut>(within: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    eventually_some(within, || {
        let held = check();
        async move { held.await.then_some(()) }
    })
    .await
    .is_some()
}

/// Polls `probe` until it yields a value or `within` passes; returns the value,
/// or `None` on time-out.
pub async fn eventually_some<T, F, Fut>(within: Duration, mut probe: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + within;
    loop {
        if let Some(value) = probe().await {
            return Some(value);
        }
        if Instant::now() > deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// [`eventually`] outside a runtime (e.g. for a process to exit): polls `check`
/// every 10 ms until it holds or `within` passes; returns whether it held.
pub fn eventually_blocking(within: Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + within;
    loop {
        if check() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A port nothing listens on (at the moment of asking).
pub fn unused_port() -> u16 {
    StdListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("find a free port")
}

/// A running `licensing-sim serve` (the development licensing server) on a port of
/// its own, killed on drop. It can be killed and started again on the same port
/// with the same state (and so the same signing key).
pub struct SimProcess {
    child: Option<std::process::Child>,
    // Kept open so the process never writes into a closed pipe.
    _stdout: Option<std::io::BufReader<std::process::ChildStdout>>,
    pub port: u16,
    /// The key it signs with, as `vendor_public_key` expects it.
    pub public_key: String,
    state: PathBuf,
    extra: Vec<String>,
}

impl SimProcess {
    /// Starts `licensing-sim serve --state STATE --listen 127.0.0.1:0 EXTRA...` and
    /// reads the two lines it prints once it accepts calls.
    pub fn start(state: &Path, extra: &[&str]) -> Self {
        let extra: Vec<String> = extra.iter().map(|s| (*s).to_owned()).collect();
        let (child, stdout, port, public_key) = Self::spawn(state, "127.0.0.1:0", &extra);
        Self {
            child: Some(child),
            _stdout: Some(stdout),
            port,
            public_key,
            state: state.to_owned(),
            extra,
        }
    }

    fn spawn(
        state: &Path,
        listen: &str,
        extra: &[String],
    ) -> (
        std::process::Child,
        std::io::BufReader<std::process::ChildStdout>,
        u16,
        String,
    ) {
        use std::io::BufRead as _;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(state.with_extension("log"))
            .unwrap();
        let mut child = Command::new(sim_binary())
            .args(["serve", "--state"])
            .arg(state)
            .args(["--listen", listen])
            .args(extra)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .expect("start licensing-sim");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut reader = std::io::BufReader::new(stdout);
            let (mut key, mut addr) = (None, None);
            let mut line = String::new();
            while key.is_none() || addr.is_none() {
                line.clear();
                if reader.read_line(&mut line).unwrap_or(0) == 0 {
                    let _ = tx.send(Err(format!(
                        "stdout closed; saw key {key:?}, addr {addr:?}"
                    )));
                    return;
                }
                let line = line.trim();
                if let Some(k) = line.strip_prefix("vendor_public_key=") {
                    key = Some(k.to_owned());
                } else if let Some(a) = line.strip_prefix("listening on ") {
                    addr = a.parse::<SocketAddr>().ok();
                }
            }
            let _ = tx.send(Ok((key.unwrap(), addr.unwrap(), reader)));
        });
        match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(Ok((key, addr, reader))) => (child, reader, addr.port(), key),
            other => {
                let _ = child.kill();
                let _ = child.wait();
                let log = std::fs::read_to_string(state.with_extension("log")).unwrap_or_default();
                panic!("licensing-sim did not start: {other:?}\n{log}");
            }
        }
    }

    /// Kills the process (SIGKILL): the licensing server is gone.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        self._stdout = None;
    }

    /// Starts it again on the same port, with the same state and key.
    pub fn restart(&mut self) {
        self.kill();
        let (child, stdout, port, key) = Self::spawn(
            &self.state,
            &format!("127.0.0.1:{}", self.port),
            &self.extra,
        );
        assert_eq!((port, &key), (self.port, &self.public_key));
        self.child = Some(child);
        self._stdout = Some(stdout);
    }
}

impl Drop for SimProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Waits (bounded) until the license is applied: the start-up reconcile ran.
pub async fn wait_active(client: &Client) {
    assert!(
        eventually(Duration::from_secs(10), || {
            let mut c = client.clone();
            async move {
                c.get_license_overview(pb::GetLicenseOverviewRequest::default())
                    .await
                    .map(|o| o.into_inner().activation_state == pb::ActivationState::Active as i32)
                    .unwrap_or(false)
            }
        })
        .await,
        "the license was not applied"
    );
}

/// Waits (bounded) until the newest 1000 audit entries hold at least `count`
/// that `matches` (the trail is written in the background, and the store may
/// be paused); returns those found, fewer on time-out.
pub async fn audited(
    client: &Client,
    count: usize,
    matches: impl Fn(&pb::AuditEvent) -> bool,
) -> Vec<pb::AuditEvent> {
    audited_until(client, matches, |found| found.len() >= count).await
}

/// Waits (bounded) until the newest 1000 audit entries that `matches` are
/// `enough`; returns them.
pub async fn audited_until(
    client: &Client,
    matches: impl Fn(&pb::AuditEvent) -> bool,
    enough: impl Fn(&[pb::AuditEvent]) -> bool,
) -> Vec<pb::AuditEvent> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let events: Vec<pb::AuditEvent> = client
            .clone()
            .list_audit_events(pb::ListAuditEventsRequest {
                page_size: 1000,
                ..Default::default()
            })
            .await
            // A store that is paused or down: ask again until the time is up.
            .map(|r| r.into_inner().events)
            .unwrap_or_default()
            .into_iter()
            .filter(|e| matches(e))
            .collect();
        if enough(&events) || Instant::now() > deadline {
            return events;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A callers file of bearer-token callers `(name, role, token)` in `dir`; the
/// file stores each token's SHA-256, as an operator's would.
pub fn token_callers_file(dir: &Path, callers: &[(&str, &str, &str)]) -> PathBuf {
    let text: String = callers
        .iter()
        .map(|(name, role, token)| {
            format!(
                "[[caller]]\nname = \"{name}\"\nrole = \"{role}\"\ntoken_sha256 = \"{}\"\n\n",
                token_sha256(token)
            )
        })
        .collect();
    let path = dir.join("callers.toml");
    std::fs::write(&path, text).unwrap();
    path
}

/// `message` with `token` as its bearer token.
pub fn with_token<T>(message: T, token: &str) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    request
}

/// How many refusals an audit entry stands for: the count of a summary of a
/// flood ("N more refused like this …"), else 1.
pub fn refusals_in(event: &pb::AuditEvent) -> u64 {
    match event.detail.split_once(" more refused like this") {
        Some((n, _)) => n.parse().expect("a summary starts with its count"),
        None => 1,
    }
}

/// Sends one `grpc.reflection.v1` request to `endpoint` and returns the answer.
pub async fn reflection_ask(
    endpoint: &str,
    request: tonic_reflection::pb::v1::server_reflection_request::MessageRequest,
) -> tonic_reflection::pb::v1::server_reflection_response::MessageResponse {
    use tokio_stream::StreamExt as _;
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    let channel = tonic::transport::Channel::from_shared(endpoint.to_owned())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client = ServerReflectionClient::new(channel);
    let outbound = tokio_stream::iter([ServerReflectionRequest {
        host: String::new(),
        message_request: Some(request),
    }]);
    let mut answers = client
        .server_reflection_info(outbound)
        .await
        .unwrap()
        .into_inner();
    answers
        .next()
        .await
        .expect("an answer")
        .unwrap()
        .message_response
        .expect("a message")
}

/// Latency percentiles of a series, as the benches print them.
pub fn percentiles(mut samples: Vec<Duration>) -> String {
    samples.sort();
    let at = |p: f64| samples[((samples.len() as f64 - 1.0) * p) as usize];
    format!(
        "p50 {:>8.1?}  p90 {:>8.1?}  p99 {:>8.1?}  max {:>8.1?}  (n = {})",
        at(0.50),
        at(0.90),
        at(0.99),
        samples[samples.len() - 1],
        samples.len()
    )
}

/// GETs `/metrics` over plain HTTP/1.1.
pub async fn scrape(addr: std::net::SocketAddr) -> String {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    response
}

/// The value of the sample whose line starts with `prefix` (name and labels).
pub fn value(body: &str, prefix: &str) -> f64 {
    body.lines()
        .find(|l| l.starts_with(prefix))
        .unwrap_or_else(|| panic!("no sample {prefix} in:\n{body}"))
        .rsplit(' ')
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

/// Pauses every client of `redis` (Lua scripts included) for `ms`: a store
/// that answers slowly. (It cannot be lifted early: the pause holds the
/// unpause command too.)
pub fn pause_redis(redis: &RedisServer, ms: u64) {
    let mut conn = redis.connection();
    let _: () = redis::cmd("CLIENT")
        .arg("PAUSE")
        .arg(ms)
        .arg("ALL")
        .query(&mut conn)
        .unwrap();
}

/// How often `redis` ran any of `commands` (lower case, as `INFO commandstats`
/// names them; calls from scripts included).
pub fn command_calls(redis: &RedisServer, commands: &[&str]) -> u64 {
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query(&mut redis.connection())
        .unwrap();
    info.lines()
        .filter_map(|line| {
            let (name, rest) = line.strip_prefix("cmdstat_")?.split_once(':')?;
            let calls = rest.strip_prefix("calls=")?.split(',').next()?;
            commands
                .contains(&name)
                .then(|| calls.parse::<u64>().unwrap())
        })
        .sum()
}

/// The hex SHA-256 of a bearer token, as a callers file stores it.
pub fn token_sha256(token: &str) -> String {
    use sha2::Digest as _;
    sha2::Sha256::digest(token.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The `licensing-sim` binary of this build (see [`workspace_binary`]).
pub fn sim_binary() -> PathBuf {
    static BUILT: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BUILT
        .get_or_init(|| workspace_binary("licensing-sim", "licensing-sim"))
        .clone()
}

/// The `licensing-agent` binary of this build (see [`workspace_binary`]).
pub fn agent_binary() -> PathBuf {
    static BUILT: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BUILT
        .get_or_init(|| workspace_binary("comtrexx-licensing-client", "licensing-agent"))
        .clone()
}

/// A binary of another package of the workspace, of this build: beside the
/// test executable's directory (`target/<profile>/`). `cargo test` at the
/// workspace root builds it (its package has tests of its own); when a single
/// package's tests run, it is built here once.
pub fn workspace_binary(package: &str, bin: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("the test's own path");
    // target/<profile>/deps/<test> or target/<profile>/<bench>
    let mut dir = exe.parent().expect("a directory").to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    let path = dir.join(bin);
    if !path.exists() {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut build = Command::new(cargo);
        build.args(["build", "--package", package, "--bin", bin]);
        if dir.ends_with("release") {
            build.arg("--release");
        }
        let status = build
            .status()
            .unwrap_or_else(|e| panic!("run cargo build for {bin}: {e}"));
        assert!(
            status.success(),
            "cargo build -p {package} --bin {bin} failed"
        );
    }
    path
}
