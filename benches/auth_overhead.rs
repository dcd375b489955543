//! What authentication, authorization and audit cost `CheckSeat`:
//! `cargo bench --bench auth_overhead`. Recorded in BENCHMARKS.md.
//!
//! The same server (embedded store) in four set-ups, measured in alternating
//! rounds so that background load hits them alike:
//!
//! - plaintext, `auth.mode = disabled` (no TLS, no authorization);
//! - TLS, `auth.mode = disabled` (the cost of TLS alone);
//! - mTLS, `auth.mode = enforce`, caller by client certificate;
//! - TLS, `auth.mode = enforce`, caller by bearer token.
//!
//! Authorization and audit cost = mTLS/enforce (or token) against TLS/disabled.

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use common::pki::{Pki, tls_channel};
use common::*;
use comtrexx_licensing::auth::callers::{new_token, token_sha256};
use comtrexx_licensing::config::RawConfig;
use comtrexx_licensing::grpc::pb;
use comtrexx_licensing::grpc::pb::licensing_service_client::LicensingServiceClient;
use tonic::transport::Channel;

const CALLERS: usize = 32;
const CONNECTIONS: usize = 4;
const ROUND: Duration = Duration::from_secs(2);
const ROUNDS: usize = 4;

struct Setup {
    label: &'static str,
    server: TestServer,
    channels: Vec<Channel>,
    token: Option<String>,
}

fn req(user: usize, token: Option<&str>) -> tonic::Request<pb::CheckSeatRequest> {
    let mut request = tonic::Request::new(pb::CheckSeatRequest {
        user_id: format!("u{}", user % 1000),
        feature: String::new(),
    });
    if let Some(token) = token {
        request
            .metadata_mut()
            .insert("authorization", format!("Bearer {token}").parse().unwrap());
    }
    request
}

/// Calls per second of `CALLERS` concurrent callers over `CONNECTIONS` connections.
async fn throughput(setup: &Setup) -> f64 {
    let deadline = Instant::now() + ROUND;
    let started = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..CALLERS {
        let mut client = LicensingServiceClient::new(setup.channels[w % CONNECTIONS].clone());
        let token = setup.token.clone();
        tasks.push(tokio::spawn(async move {
            let mut n = 0usize;
            while Instant::now() < deadline {
                client
                    .check_seat(req(n + w, token.as_deref()))
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
    total as f64 / started.elapsed().as_secs_f64()
}

/// p50 latency of one sequential caller.
async fn latency(setup: &Setup) -> Duration {
    let mut client = LicensingServiceClient::new(setup.channels[0].clone());
    let mut samples = Vec::with_capacity(3000);
    for i in 0..3000 {
        let t = Instant::now();
        client
            .check_seat(req(i, setup.token.as_deref()))
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
            "TLS, enforce (bearer token)",
            "enforce",
            true,
            true,
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
            token: use_token.then(|| token.clone()),
        });
    }
    // Warm up, then alternate rounds.
    for setup in &setups {
        latency(setup).await;
    }
    let mut rates = vec![Vec::new(); setups.len()];
    for _ in 0..ROUNDS {
        for (i, setup) in setups.iter().enumerate() {
            rates[i].push(throughput(setup).await);
        }
    }
    let mut medians = Vec::new();
    for (i, setup) in setups.iter().enumerate() {
        let mut r = rates[i].clone();
        r.sort_by(f64::total_cmp);
        let median = (r[r.len() / 2 - 1] + r[r.len() / 2]) / 2.0;
        medians.push(median);
        println!(
            "  {:<30} {:>8.0} calls/s (median of {ROUNDS} rounds of {:?}, {CALLERS} callers on {CONNECTIONS} connections), p50 {:>7.1?} one caller",
            setup.label,
            median,
            ROUND,
            latency(setup).await,
        );
    }
    let tls_base = medians[1];
    for (i, label) in [(2, "mTLS + enforce"), (3, "token + enforce")] {
        println!(
            "  authorization and audit cost ({label} vs TLS, disabled): {:+.1} %",
            (tls_base / medians[i] - 1.0) * 100.0
        );
    }
    for setup in setups {
        setup.server.shutdown().await;
    }
}
