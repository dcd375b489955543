//! The hot path against the transport's floor: `cargo bench --bench hot_path_ratio`.
//! Recorded in BENCHMARKS.md.
//!
//! `CheckSeat` throughput as a share of the same server's `grpc.health.v1.Health/Check`
//! throughput (a call that does nothing but pass the tower stack and the HTTP/2 and
//! gRPC framing). What `CheckSeat` costs beyond that floor is ours: authorization,
//! limits, span, metrics, the decision, the response. The target is a ratio of 0.95.
//!
//! Set-up: the release binary runs as a process of its own, as deployed (with its log
//! subscriber and metrics), pinned to CPU 0 with `taskset`; `h2load` (Debian's
//! `nghttp2-client`) runs pinned to CPU 1, so server and client each have a core of
//! their own. Both calls carry the same headers (the bearer token too: health ignores
//! it), so the transport does the same work for each. Each round runs the two calls
//! one after the other; the ratio of a round is taken, and the median of the rounds'
//! ratios printed, so that background load hits both calls alike.
//!
//! Two set-ups: TLS with `auth.mode = enforce` and a bearer token (the deployment's
//! shape), and plaintext with the same token from loopback.

#[path = "../tests/common/mod.rs"]
mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::pki::{Pki, tls_channel};
use common::*;

use comtrexx_licensing::auth::callers::new_token;
use comtrexx_licensing::domain::{Edition, Feature};
use comtrexx_licensing::grpc::pb;
use comtrexx_licensing::grpc::pb::licensing_service_client::LicensingServiceClient;
use tonic::transport::Channel;

/// Rounds of the pair (CheckSeat, Health/Check).
const ROUNDS: usize = 7;
/// Requests of one h2load run.
const REQUESTS: u32 = 60_000;
/// h2load's connections and concurrent streams per connection.
const CONNECTIONS: u32 = 4;
const STREAMS: u32 = 16;

/// A gRPC request body as h2load sends it: the 5-byte frame header, then the message.
fn grpc_frame(message: &impl prost::Message) -> Vec<u8> {
    let body = message.encode_to_vec();
    let mut frame = vec![0u8];
    frame.extend_from_slice(&(body.len() as u32).to_be_bytes());
    frame.extend_from_slice(&body);
    frame
}

/// One h2load run; the calls per second it reports. Panics unless every request
/// got an answer.
fn h2load(url: &str, body: &Path, token: &str) -> f64 {
    let out = Command::new("taskset")
        .args(["-c", "1", "h2load"])
        .args(["-n", &REQUESTS.to_string()])
        .args(["-c", &CONNECTIONS.to_string()])
        .args(["-m", &STREAMS.to_string()])
        .args(["-t", "1"])
        .arg("-d")
        .arg(body)
        .args(["-H", "content-type: application/grpc"])
        .args(["-H", "te: trailers"])
        .args(["-H", &format!("authorization: Bearer {token}")])
        .arg(url)
        .output()
        .expect("run h2load (Debian: apt-get install nghttp2-client; scripts/install-tools.sh)");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "h2load failed:\n{text}");
    let done = format!("{REQUESTS} succeeded");
    assert!(text.contains(&done), "not every request answered:\n{text}");
    // "finished in 1.23s, 48765.43 req/s, 4.56MB/s"
    text.lines()
        .find_map(|l| l.strip_prefix("finished in "))
        .and_then(|l| l.split(", ").nth(1))
        .and_then(|r| r.strip_suffix(" req/s"))
        .and_then(|r| r.parse().ok())
        .unwrap_or_else(|| panic!("no req/s in h2load's output:\n{text}"))
}

/// The service binary (built by `cargo bench` for its benches).
const BIN: &str = env!("CARGO_BIN_EXE_comtrexx-licensing");

struct Setup {
    label: &'static str,
    process: Child,
    port: u16,
    scheme: &'static str,
    channel: Channel,
}

impl Drop for Setup {
    fn drop(&mut self) {
        let _ = self.process.kill();
        let _ = self.process.wait();
    }
}

/// Starts the binary on CPU 0 with `env`, and connects once it answers (bounded).
async fn start(env: &[(&str, String)], port: u16, ca: Option<&str>) -> (Child, Channel) {
    let mut cmd = Command::new("taskset");
    cmd.args(["-c", "0", BIN, "serve"])
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("LICENSING_LISTEN_ADDR", format!("127.0.0.1:{port}"))
        .env(
            "LICENSING_METRICS_ADDR",
            format!("127.0.0.1:{}", unused_port()),
        )
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("start the service binary");
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    for _ in 0..600 {
        if let Some(status) = child.try_wait().unwrap() {
            panic!("the service exited: {status}");
        }
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            let channel = match ca {
                Some(ca) => tls_channel(addr, ca, None).await,
                None => Channel::from_shared(format!("http://{addr}"))
                    .unwrap()
                    .connect()
                    .await
                    .unwrap(),
            };
            return (child, channel);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("the service never listened on {addr}");
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    (values[(n - 1) / 2] + values[n / 2]) / 2.0
}

#[tokio::main]
async fn main() {
    println!(
        "CheckSeat against Health/Check on the same server: server on CPU 0, h2load on CPU 1; \
         {ROUNDS} rounds of {REQUESTS} calls each, {CONNECTIONS} connections × {STREAMS} streams"
    );
    let pki = Pki::new("bench CA");
    let (cert, key) = pki.write_server(&pki.server("localhost"));
    let ca = pki.ca_pem();
    let vendor = Vendor::new();
    let serial = serial("bench-ratio");
    vendor.write_license(
        &serial,
        Edition::Vm,
        chrono::Utc::now(),
        &[(Feature::User, 100)],
    );
    let (call_handling, user_management) = (new_token(), new_token());
    let callers = token_callers_file(
        pki.dir.path(),
        &[
            ("pbx", "call_handling", &call_handling),
            ("users", "user_management", &user_management),
        ],
    );
    let dir = tempfile::tempdir().unwrap();
    let check = dir.path().join("check.bin");
    std::fs::write(
        &check,
        grpc_frame(&pb::CheckSeatRequest {
            user_id: "alice".into(),
            feature: String::new(),
            ..Default::default()
        }),
    )
    .unwrap();
    let health = dir.path().join("health.bin");
    // HealthCheckRequest { service: "" } encodes to nothing.
    std::fs::write(&health, [0u8, 0, 0, 0, 0]).unwrap();

    let mut setups = Vec::new();
    for (label, tls) in [
        ("TLS, enforce, bearer token", true),
        ("plaintext, enforce, bearer token", false),
    ] {
        let mut env = vec![
            ("LICENSING_SERIAL_NUMBER", serial.clone()),
            ("LICENSING_LICENSE_FILE", path(&vendor.license_path())),
            ("LICENSING_VENDOR_PUBLIC_KEY", vendor.public_key()),
            ("LICENSING_AUTH__MODE", "enforce".to_owned()),
            ("LICENSING_AUTH__CALLERS_FILE", path(&callers)),
        ];
        if tls {
            env.push(("LICENSING_TLS__CERT_FILE", path(&cert)));
            env.push(("LICENSING_TLS__KEY_FILE", path(&key)));
        }
        let port = unused_port();
        let (process, channel) = start(&env, port, tls.then_some(ca.as_str())).await;
        let mut client = LicensingServiceClient::new(channel.clone());
        let assigned = client
            .assign_seat(with_token(
                pb::AssignSeatRequest {
                    user_id: "alice".into(),
                    feature: String::new(),
                },
                &user_management,
            ))
            .await;
        assert!(assigned.is_ok(), "assign alice: {assigned:?}");
        setups.push(Setup {
            label,
            process,
            port,
            scheme: if tls { "https" } else { "http" },
            channel,
        });
    }

    for setup in &setups {
        let base = format!("{}://127.0.0.1:{}", setup.scheme, setup.port);
        let check_url = format!("{base}/comtrexx.licensing.v1.LicensingService/CheckSeat");
        let health_url = format!("{base}/grpc.health.v1.Health/Check");
        // Warm-up of both, then the rounds.
        h2load(&check_url, &check, &call_handling);
        h2load(&health_url, &health, &call_handling);
        let (mut checks, mut healths, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..ROUNDS {
            let c = h2load(&check_url, &check, &call_handling);
            let h = h2load(&health_url, &health, &call_handling);
            checks.push(c);
            healths.push(h);
            ratios.push(c / h);
        }
        // Every CheckSeat above was answered "licensed": ask once more, as a client.
        let answer = LicensingServiceClient::new(setup.channel.clone())
            .check_seat(with_token(
                pb::CheckSeatRequest {
                    user_id: "alice".into(),
                    feature: String::new(),
                    ..Default::default()
                },
                &call_handling,
            ))
            .await
            .expect("CheckSeat answers")
            .into_inner();
        assert!(answer.licensed, "alice is licensed: {answer:?}");
        let rounds: Vec<String> = ratios.iter().map(|r| format!("{r:.3}")).collect();
        println!(
            "  {:<34} CheckSeat {:>7.0} calls/s, Health/Check {:>7.0} calls/s (medians); \
             ratio {:.3} (median of rounds: {})",
            setup.label,
            median(&mut checks),
            median(&mut healths),
            median(&mut ratios.clone()),
            rounds.join(" "),
        );
    }
}

fn path(p: &Path) -> String {
    p.to_str().expect("a UTF-8 temporary path").to_owned()
}
