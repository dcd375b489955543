//! What authentication, authorization and audit cost `CheckSeat`:
//! `cargo bench --bench auth_overhead`. Recorded in BENCHMARKS.md.
//!
//! The same server (embedded store) in five set-ups, measured in alternating
//! rounds so that background load hits them alike:
//!
//! - plaintext, `auth.mode = disabled` (no TLS, no authorization);
//! - TLS, `auth.mode = disabled` (the cost of TLS alone);
//! - mTLS, `auth.mode = enforce`, caller by client certificate (required at
//!   the handshake, the default with a client CA);
//! - TLS, `auth.mode = disabled`, each call carrying an `authorization`
//!   header the server ignores (what the header costs client and transport);
//! - TLS, `auth.mode = enforce`, caller by bearer token.
//!
//! Each round records calls per second and the process's CPU time per call
//! (client and server together; `getrusage`, so time the machine gave to
//! others does not count). Costs are medians of per-round ratios: mTLS/enforce
//! against TLS/disabled is what authorization and audit cost; token/enforce
//! against the ignored header is the server's token check.
//!
//! End to end, a shared 2-core machine varies by several percent from round to
//! round, more than the effect measured. So the authorization layer is also
//! timed alone, in-process around a service that answers at once: the
//! nanoseconds it adds per call, set against the CPU time of a whole call.

#[path = "../tests/common/mod.rs"]
mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::pki::{Pki, tls_channel};
use common::*;

use comtrexx_licensing::audit::Auditor;
use comtrexx_licensing::auth::AuthMode;
use comtrexx_licensing::auth::callers::{CallersFile, new_token, token_sha256};
use comtrexx_licensing::auth::layer::{AuthLayer, Authenticator};
use comtrexx_licensing::auth::tls::{Peer, PeerCertificate};
use comtrexx_licensing::config::RawConfig;
use comtrexx_licensing::domain::SystemClock;
use comtrexx_licensing::domain::audit::AuditRetention;
use comtrexx_licensing::grpc::pb;
use comtrexx_licensing::grpc::pb::licensing_service_client::LicensingServiceClient;
use comtrexx_licensing::store::memory::MemoryStore;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::transport::Channel;
use tower::Layer as _;

const CALLERS: usize = 32;
const CONNECTIONS: usize = 4;
const ROUND: Duration = Duration::from_secs(2);
const ROUNDS: usize = 6;
/// Calls of the in-process layer measurement.
const LAYER_CALLS: u32 = 300_000;

struct Setup {
    label: &'static str,
    server: TestServer,
    channels: Vec<Channel>,
    /// The `authorization` header each call carries, built once as a client would.
    token: Option<MetadataValue<Ascii>>,
}

fn req(user: usize, token: Option<&MetadataValue<Ascii>>) -> tonic::Request<pb::CheckSeatRequest> {
    let mut request = tonic::Request::new(pb::CheckSeatRequest {
        user_id: format!("u{}", user % 1000),
        feature: String::new(),
        ..Default::default()
    });
    if let Some(token) = token {
        request
            .metadata_mut()
            .insert("authorization", token.clone());
    }
    request
}

/// CPU time (user and system) this process has used.
fn cpu_time() -> Duration {
    // SAFETY: getrusage only writes the struct it is given.
    let usage = unsafe {
        let mut usage = std::mem::zeroed::<libc::rusage>();
        assert_eq!(libc::getrusage(libc::RUSAGE_SELF, &mut usage), 0);
        usage
    };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(usage.ru_utime) + tv(usage.ru_stime)
}

/// One round: calls per second of `CALLERS` concurrent callers over
/// `CONNECTIONS` connections, and CPU time per call.
async fn throughput(setup: &Setup) -> (f64, Duration) {
    let deadline = Instant::now() + ROUND;
    let started = Instant::now();
    let cpu_before = cpu_time();
    let mut tasks = Vec::new();
    for w in 0..CALLERS {
        let mut client = LicensingServiceClient::new(setup.channels[w % CONNECTIONS].clone());
        let token = setup.token.clone();
        tasks.push(tokio::spawn(async move {
            let mut n = 0usize;
            while Instant::now() < deadline {
                client
                    .check_seat(req(n + w, token.as_ref()))
                    .await
                    .expect("CheckSeat answers");
                n += 1;
            }
            n
        }));
    }
    let mut total = 0;
    for t in tasks {
        total += t.await.unwrap();
    }
    let cpu = cpu_time() - cpu_before;
    (
        total as f64 / started.elapsed().as_secs_f64(),
        cpu / total.max(1) as u32,
    )
}

/// Nanoseconds per call of `service`, called in-process with `request()`.
async fn per_call<S>(mut service: S, request: impl Fn() -> http::Request<()>) -> f64
where
    S: tower::Service<http::Request<()>, Response = http::Response<()>>,
    S::Error: std::fmt::Debug,
{
    use tower::ServiceExt as _;
    let started = Instant::now();
    for _ in 0..LAYER_CALLS {
        let response = service
            .ready()
            .await
            .unwrap()
            .call(request())
            .await
            .unwrap();
        std::hint::black_box(response);
    }
    started.elapsed().as_nanos() as f64 / f64::from(LAYER_CALLS)
}

/// What the authorization layer adds to one `CheckSeat` call, in ns, with
/// `mode` and the caller given by `peer` and `token`: the layer around a
/// service that answers at once, against that service alone (best of 5).
async fn layer_cost(
    mode: AuthMode,
    callers: &Arc<CallersFile>,
    peer: &Peer,
    token: Option<&str>,
) -> f64 {
    let answer = tower::service_fn(|_request: http::Request<()>| async {
        Ok::<_, std::convert::Infallible>(http::Response::new(()))
    });
    let store = Arc::new(MemoryStore::new(Arc::new(SystemClock)));
    let (audit, _writer) = Auditor::new(store, Arc::new(SystemClock), AuditRetention::default());
    let layer = AuthLayer::new(Arc::new(Authenticator {
        mode,
        callers: callers.clone(),
        audit,
        refuse_plaintext_tokens: false,
    }));
    let request = || {
        let mut request = http::Request::new(());
        *request.uri_mut() = "/comtrexx.licensing.v1.LicensingService/CheckSeat"
            .parse()
            .unwrap();
        if let Some(token) = token {
            request
                .headers_mut()
                .insert("authorization", format!("Bearer {token}").parse().unwrap());
        }
        request.extensions_mut().insert(peer.clone());
        request
    };
    let mut best = f64::MAX;
    for _ in 0..5 {
        let bare = per_call(answer, request).await;
        let layered = per_call(layer.layer(answer), request).await;
        best = best.min(layered - bare);
    }
    best
}

/// The median of the per-round ratios `of / against`, as a cost in percent.
fn cost(of: &[Duration], against: &[Duration]) -> f64 {
    let mut ratios: Vec<f64> = of
        .iter()
        .zip(against)
        .map(|(a, b)| a.as_secs_f64() / b.as_secs_f64())
        .collect();
    ratios.sort_by(f64::total_cmp);
    let n = ratios.len();
    ((ratios[(n - 1) / 2] + ratios[n / 2]) / 2.0 - 1.0) * 100.0
}

fn median<T: Copy + PartialOrd>(values: &[T]) -> T {
    let mut v = values.to_vec();
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

/// p50 latency of one sequential caller.
async fn latency(setup: &Setup) -> Duration {
    let mut client = LicensingServiceClient::new(setup.channels[0].clone());
    let mut samples = Vec::with_capacity(3000);
    for i in 0..3000 {
        let t = Instant::now();
        client
            .check_seat(req(i, setup.token.as_ref()))
            .await
            .unwrap();
        samples.push(t.elapsed());
    }
    samples.sort();
    samples[samples.len() / 2]
}

#[tokio::main]
async fn main() {
    println!(
        "CheckSeat: authentication, authorization and audit overhead ({} cores)",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    let pki = Pki::new("bench CA");
    let (cert, key) = pki.write_server(&pki.server("bench"));
    let ca = pki.ca_pem();
    let token = new_token();
    let callers = pki.dir.path().join("callers.toml");
    std::fs::write(
        &callers,
        format!(
            "[[caller]]\nname = \"pbx-cert\"\nrole = \"call_handling\"\ncertificate = \"spiffe://bench/pbx\"\n\n\
             [[caller]]\nname = \"pbx-token\"\nrole = \"call_handling\"\ntoken_sha256 = \"{}\"\n",
            token_sha256(&token)
        ),
    )
    .unwrap();
    let client_pem = pki.client("spiffe://bench/pbx", false);

    let base = |mode: &str, tls: bool, client_ca: bool| {
        let mut raw: RawConfig = config(None, &serial("bench-auth"));
        raw.auth.mode = mode.into();
        raw.auth.callers_file = Some(callers.clone());
        if tls {
            raw.tls.cert_file = Some(cert.clone());
            raw.tls.key_file = Some(key.clone());
        }
        if client_ca {
            raw.tls.client_ca_file = Some(pki.ca_file());
        }
        raw
    };
    let mut setups = Vec::new();
    for (label, mode, tls, client_ca, use_cert, use_token) in [
        (
            "plaintext, auth disabled",
            "disabled",
            false,
            false,
            false,
            false,
        ),
        ("TLS, auth disabled", "disabled", true, false, false, false),
        (
            "mTLS, enforce (certificate)",
            "enforce",
            true,
            true,
            true,
            false,
        ),
        (
            "TLS, disabled, token ignored",
            "disabled",
            true,
            false,
            false,
            true,
        ),
        (
            "TLS, enforce (bearer token)",
            "enforce",
            true,
            false,
            false,
            true,
        ),
    ] {
        let server = TestServer::start(base(mode, tls, client_ca)).await;
        let mut channels = Vec::new();
        for _ in 0..CONNECTIONS {
            channels.push(if tls {
                tls_channel(server.addr, &ca, use_cert.then_some(&client_pem)).await
            } else {
                Channel::from_shared(server.endpoint())
                    .unwrap()
                    .connect()
                    .await
                    .unwrap()
            });
        }
        setups.push(Setup {
            label,
            server,
            channels,
            token: use_token.then(|| format!("Bearer {token}").parse().unwrap()),
        });
    }
    // Warm up, then alternate rounds.
    for setup in &setups {
        latency(setup).await;
    }
    let mut rates = vec![Vec::new(); setups.len()];
    let mut cpu = vec![Vec::new(); setups.len()];
    for _ in 0..ROUNDS {
        for (i, setup) in setups.iter().enumerate() {
            let (rate, cpu_per_call) = throughput(setup).await;
            rates[i].push(rate);
            cpu[i].push(cpu_per_call);
        }
    }
    for (i, setup) in setups.iter().enumerate() {
        println!(
            "  {:<30} {:>8.0} calls/s, {:>5.1?} CPU per call (medians of {ROUNDS} rounds of {:?}, {CALLERS} callers on {CONNECTIONS} connections), p50 {:>7.1?} one caller",
            setup.label,
            median(&rates[i]),
            median(&cpu[i]),
            ROUND,
            latency(setup).await,
        );
    }
    println!("  CPU per call against another set-up (median of the per-round ratios):");
    for (label, of, against) in [
        ("TLS (TLS, disabled vs plaintext, disabled)", 1, 0),
        (
            "authorization and audit (mTLS + enforce vs TLS, disabled)",
            2,
            1,
        ),
        (
            "the authorization header, not checked (vs TLS, disabled)",
            3,
            1,
        ),
        (
            "the server's token check (token + enforce vs header ignored)",
            4,
            3,
        ),
        (
            "bearer token in all (token + enforce vs TLS, disabled)",
            4,
            1,
        ),
    ] {
        println!("    {label}: {:+.1} %", cost(&cpu[of], &cpu[against]));
    }

    // The layer alone, in-process.
    let callers = Arc::new(CallersFile::load(Some(&callers), false).unwrap());
    let loopback = "127.0.0.1:40000".parse().ok();
    let plain_peer = Peer {
        addr: loopback,
        certificate: None,
        long_streams: Default::default(),
    };
    let cert_peer = Peer {
        addr: loopback,
        certificate: Some(PeerCertificate::Verified {
            identity: Some("spiffe://bench/pbx".into()),
        }),
        long_streams: Default::default(),
    };
    let whole_call = median(&cpu[1]).as_nanos() as f64;
    println!(
        "  the authorization layer alone, in-process (ns per call, best of 5 × {LAYER_CALLS} calls; share of a CheckSeat's {:.1} µs CPU over TLS):",
        whole_call / 1000.0
    );
    for (label, mode, peer, token) in [
        (
            "auth.mode = disabled",
            AuthMode::Disabled,
            &plain_peer,
            None,
        ),
        (
            "enforce, client certificate",
            AuthMode::Enforce,
            &cert_peer,
            None,
        ),
        (
            "enforce, bearer token",
            AuthMode::Enforce,
            &plain_peer,
            Some(token.as_str()),
        ),
    ] {
        let ns = layer_cost(mode, &callers, peer, token).await;
        println!(
            "    {label:<30} {ns:>7.0} ns ({:.2} %)",
            ns / whole_call * 100.0
        );
    }
    for setup in setups {
        setup.server.shutdown().await;
    }
}
