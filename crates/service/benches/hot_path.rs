//! Measures the numbers in BENCHMARKS.md: `cargo bench --bench hot_path`.
//!
//! 1. `CheckSeat` decided in process (the mirror lookup and decision alone).
//! 2. `CheckSeat` over real gRPC on loopback: latency percentiles and throughput.
//! 3. `AssignSeat` over gRPC against Redis, two replicas: throughput and latency.
//! 4. Cross-replica visibility: assign on A until `CheckSeat` on B says licensed.
//! 5. Mirror memory for many seats (resident set growth).
//! 6. `CheckSeat` latency while a burst of writes and overview calls is shed.
//! 7. `CheckSeat` latency while another caller floods with bodiless streams and
//!    idle connections.
//!
//! Needs `redis-server` on PATH (each run starts its own on a free port) and,
//! for row 7, Debian's python3 with h2.
//! `cargo bench --bench hot_path -- burst` runs only row 6, `-- flood` only row 7.

#[path = "../tests/common/mod.rs"]
mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use common::*;
use comtrexx_licensing::domain::{Edition, Feature, Seat, SeatSource, SystemClock, UserId};
use comtrexx_licensing::grpc::pb;
use comtrexx_licensing::mirror::{Mirror, MirrorConfig, Verifier};
use comtrexx_licensing::store::memory::MemoryStore;
use comtrexx_licensing::store::{Snapshot, Store};

fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);
    pages * 4096
}

async fn check_over_grpc(label: &str, client: &Client, users: usize) {
    // Latency: one caller, sequential.
    let mut c = client.clone();
    for i in 0..500 {
        c.check_seat(check_request(&format!("u{}", i % users)))
            .await
            .unwrap();
    }
    let mut samples = Vec::with_capacity(5000);
    for i in 0..5000 {
        let t = Instant::now();
        c.check_seat(check_request(&format!("u{}", i % users)))
            .await
            .unwrap();
        samples.push(t.elapsed());
    }
    println!(
        "  {label} CheckSeat latency, 1 caller:       {}",
        percentiles(samples)
    );
    // Throughput: 32 concurrent callers on 4 connections for ~2 s.
    let mut channels = Vec::new();
    for _ in 0..4 {
        channels.push(client.clone());
    }
    let deadline = Instant::now() + Duration::from_secs(2);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..32 {
        let mut c = channels[w % 4].clone();
        tasks.push(tokio::spawn(async move {
            let mut n = 0u64;
            while Instant::now() < deadline {
                c.check_seat(check_request(&format!("u{}", (n as usize + w) % users)))
                    .await
                    .unwrap();
                n += 1;
            }
            n
        }));
    }
    let mut total = 0;
    for t in tasks {
        total += t.await.unwrap();
    }
    let secs = started.elapsed().as_secs_f64();
    println!(
        "  {label} CheckSeat throughput, 32 callers:  {:.0} calls/s",
        total as f64 / secs
    );
}

/// A server of `cfg` (with a license) once seats `u0` to `u999` are assigned.
async fn serve_with_seats(cfg: comtrexx_licensing::config::RawConfig) -> (TestServer, Client) {
    let server = TestServer::start(cfg).await;
    let client = server.client().await;
    wait_active(&client).await;
    let mut c = client.clone();
    for i in 0..1000 {
        c.assign_seat(pb::AssignSeatRequest {
            user_id: format!("u{i}"),
            feature: String::new(),
        })
        .await
        .unwrap();
    }
    (server, client)
}

/// Row 6: `CheckSeat` on one replica (Redis store) alone, then while 192
/// callers hammer it with `AssignSeat`/`ReleaseSeat` and 64 with
/// `GetLicenseOverview`/`ListSeats`, over budgets of 16 writes and 4 operator reads.
async fn check_seat_under_burst() {
    let redis = RedisServer::start();
    let vendor = Vendor::new();
    let serial = serial("bench-shed");
    vendor.write_license(
        &serial,
        Edition::Vm,
        Utc::now(),
        &[(Feature::User, 100_000)],
    );
    let mut cfg = licensed_config(Some(&redis), &serial, &vendor);
    cfg.limits.concurrent_writes = 16;
    cfg.limits.concurrent_operator_reads = 4;
    // The burst comes from one host (one caller): this row measures the
    // classes' budgets, not one caller's share of them.
    cfg.limits.caller_share_percent = 100;
    let (server, client) = serve_with_seats(cfg).await;
    let sample = |label: &'static str, n: usize| {
        let mut c = client.clone();
        async move {
            let mut samples = Vec::with_capacity(n);
            for i in 0..n {
                let t = Instant::now();
                let answer = c
                    .check_seat(check_request(&format!("u{}", i % 1000)))
                    .await
                    .unwrap();
                samples.push(t.elapsed());
                assert!(answer.into_inner().licensed);
            }
            println!(
                "  CheckSeat latency, 1 caller, {label} {}",
                percentiles(samples)
            );
        }
    };
    println!("6. CheckSeat while writes and overview calls are shed (Redis store, 1 replica):");
    sample("alone:                ", 3000).await;
    // The burst comes over 8 connections of its own, as from other clients; first
    // retrying shed calls at once (a storm), then waiting the RetryInfo delay.
    let mut connections = Vec::new();
    for _ in 0..8 {
        connections.push(server.client().await);
    }
    for (label, back_off) in [
        ("during burst (storm):  ", false),
        ("during burst (backoff):", true),
    ] {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let mut burst = Vec::new();
        for w in 0..256 {
            let c = connections[w % 8].clone();
            burst.push(tokio::spawn(burst_caller(c, w, back_off, stop.clone())));
        }
        let started = Instant::now();
        sample(label, 1000).await;
        let secs = started.elapsed().as_secs_f64();
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let (mut ok, mut shed) = (0, 0);
        for t in burst {
            let (o, s) = t.await.unwrap();
            ok += o;
            shed += s;
        }
        println!(
            "    burst meanwhile: {:.0} calls/s answered, {:.0} calls/s shed (UNAVAILABLE)",
            ok as f64 / secs,
            shed as f64 / secs
        );
    }
    server.shutdown().await;
}

/// Row 7: `CheckSeat` from call handling (127.0.0.1) on its own connection,
/// alone and then while another host (127.0.0.2) holds 4 connections full of
/// `CheckSeat` and `GetTryoutStatus` streams whose bodies never come and a
/// third (127.0.0.3) keeps opening sockets that never send the HTTP/2 preface.
async fn check_seat_under_flood() {
    use common::flood::{Flood, idle_socket};
    let serial = serial("bench-flood");
    let vendor = Vendor::new();
    vendor.write_license(&serial, Edition::Vm, Utc::now(), &[(Feature::User, 10_000)]);
    let mut cfg = licensed_config(None, &serial, &vendor);
    cfg.limits.handshake_timeout_ms = 1000;
    let (server, client) = serve_with_seats(cfg).await;
    let sample = |label: &'static str| {
        let mut c = client.clone();
        async move {
            let mut samples = Vec::with_capacity(5000);
            for i in 0..5000 {
                let t = Instant::now();
                let answer = c.check_seat(check_request(&format!("u{}", i % 1000))).await;
                samples.push(t.elapsed());
                assert!(answer.expect("CheckSeat answers OK").into_inner().licensed);
            }
            println!(
                "  CheckSeat latency, 1 caller, {label} {}",
                percentiles(samples)
            );
        }
    };
    println!(
        "7. CheckSeat while another caller floods with bodiless streams and idle connections:"
    );
    sample("alone:       ").await;
    let source = ["--source", "127.0.0.2"];
    let mut floods = Vec::new();
    for method in ["CheckSeat", "GetTryoutStatus"] {
        floods.push(Flood::start(server.addr, method, None, (1000, 2), &source));
    }
    let mut opened = 0;
    for flood in &mut floods {
        opened += flood.line().await["opened"].as_u64().unwrap();
    }
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let idle = {
        let stop = stop.clone();
        let addr = server.addr;
        tokio::spawn(async move {
            // At most 300 of ours open at once: the per-peer cap (256) refuses
            // the rest, the handshake timeout closes the others.
            let mut open = std::collections::VecDeque::new();
            let mut n = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                open.push_back(idle_socket("127.0.0.3", addr).await);
                if open.len() > 300 {
                    open.pop_front().unwrap().abort();
                }
                n += 1;
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            n
        })
    };
    sample("during flood:").await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let sockets = idle.await.unwrap();
    let mut answered = 0;
    for flood in floods {
        answered += flood.finish().await["answered"].as_u64().unwrap();
    }
    let m = comtrexx_licensing::metrics::metrics();
    println!(
        "    flood meanwhile: {opened} bodiless streams held ({answered} answered REQUEST_INCOMPLETE), \
         {sockets} idle sockets opened ({} refused per peer, {} closed without preface)",
        m.connections_refused_count("per_peer"),
        m.connections_refused_count("preface_timeout"),
    );
    server.shutdown().await;
}

/// One caller of the burst: writes (`w < 192`) or operator reads, until `stop`.
async fn burst_caller(
    mut c: Client,
    w: usize,
    back_off: bool,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> (u64, u64) {
    use tonic::Code;
    use tonic_types::StatusExt as _;
    let (mut ok, mut shed) = (0u64, 0u64);
    let mut i = 0u64;
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        let user = format!("burst{w}-{}", i % 50);
        let result = match (w < 192, i % 2) {
            (true, 0) => c
                .assign_seat(pb::AssignSeatRequest {
                    user_id: user,
                    feature: String::new(),
                })
                .await
                .map(|_| ()),
            (true, _) => c
                .release_seat(pb::ReleaseSeatRequest {
                    user_id: user,
                    feature: String::new(),
                })
                .await
                .map(|_| ()),
            (false, 0) => c
                .get_license_overview(pb::GetLicenseOverviewRequest::default())
                .await
                .map(|_| ()),
            (false, _) => c
                .list_seats(pb::ListSeatsRequest {
                    page_size: 1000,
                    ..Default::default()
                })
                .await
                .map(|_| ()),
        };
        match result {
            Ok(()) => ok += 1,
            Err(s) if s.code() == Code::Unavailable => {
                shed += 1;
                if back_off
                    && let Some(delay) = s.get_details_retry_info().and_then(|r| r.retry_delay)
                {
                    tokio::time::sleep(delay).await;
                }
            }
            Err(s) => panic!("burst call failed: {s:?}"),
        }
        i += 1;
    }
    (ok, shed)
}

#[tokio::main]
async fn main() {
    if std::env::args().any(|a| a == "burst") {
        check_seat_under_burst().await;
        return;
    }
    if std::env::args().any(|a| a == "flood") {
        check_seat_under_flood().await;
        return;
    }
    println!(
        "comtrexx-licensing benchmarks ({} cores)",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );

    // 1. In-process decision.
    {
        let store: Arc<dyn Store> = Arc::new(MemoryStore::new(Arc::new(SystemClock)));
        let serial = serial("bench");
        let vendor = Vendor::new();
        vendor.write_license(
            &serial,
            Edition::Vm,
            Utc::now(),
            &[(Feature::User, 200_000)],
        );
        let server_cfg = licensed_config(None, &serial, &vendor);
        let config = server_cfg.validate().unwrap();
        let app = comtrexx_licensing::app::App::build(&config, Arc::new(SystemClock)).unwrap();
        let licensing = app.licensing.clone();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(app.run(listener, None, async {
            let _ = stopped.await;
        }));
        let client =
            pb::licensing_service_client::LicensingServiceClient::connect(format!("http://{addr}"))
                .await
                .unwrap();
        wait_active(&client).await;
        let users = 10_000;
        let mut c = client.clone();
        for i in 0..users {
            c.assign_seat(pb::AssignSeatRequest {
                user_id: format!("u{i}"),
                feature: String::new(),
            })
            .await
            .unwrap();
        }
        let ids: Vec<UserId> = (0..users)
            .map(|i| UserId::parse(&format!("u{i}")).unwrap())
            .collect();
        let n = 2_000_000;
        let t = Instant::now();
        let mut licensed = 0;
        for i in 0..n {
            licensed += usize::from(
                licensing
                    .check_seat(&ids[i % users], Feature::User)
                    .expect("the mirror has synced")
                    .check
                    .licensed,
            );
        }
        let per = t.elapsed() / n as u32;
        assert_eq!(licensed, n);
        println!("1. CheckSeat decision in process ({users} seats): {per:?} per call");
        println!("2. CheckSeat over gRPC (loopback, embedded store):");
        check_over_grpc("memory", &client, users).await;
        let _ = stop.send(());
        task.await.unwrap().unwrap();
        drop(store);
    }

    // 3 and 4: two replicas on one Redis.
    {
        let redis = RedisServer::start();
        let vendor = Vendor::new();
        let serial = serial("bench-redis");
        vendor.write_license(
            &serial,
            Edition::Vm,
            Utc::now(),
            &[(Feature::User, 100_000)],
        );
        let a = TestServer::start(licensed_config(Some(&redis), &serial, &vendor)).await;
        let b = TestServer::start(licensed_config(Some(&redis), &serial, &vendor)).await;
        let (ca, cb) = (a.client().await, b.client().await);
        wait_active(&ca).await;
        wait_active(&cb).await;

        println!("3. AssignSeat over gRPC, Redis store, 2 replicas:");
        let mut c = ca.clone();
        let mut samples = Vec::new();
        for i in 0..2000 {
            let t = Instant::now();
            c.assign_seat(pb::AssignSeatRequest {
                user_id: format!("seq{i}"),
                feature: String::new(),
            })
            .await
            .unwrap();
            samples.push(t.elapsed());
        }
        println!(
            "  AssignSeat latency, 1 caller:          {}",
            percentiles(samples)
        );
        let started = Instant::now();
        let mut tasks = Vec::new();
        for w in 0..32 {
            let mut c = if w % 2 == 0 { ca.clone() } else { cb.clone() };
            tasks.push(tokio::spawn(async move {
                for i in 0..500 {
                    c.assign_seat(pb::AssignSeatRequest {
                        user_id: format!("par{w}-{i}"),
                        feature: String::new(),
                    })
                    .await
                    .unwrap();
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        println!(
            "  AssignSeat throughput, 32 callers:     {:.0} calls/s (16 000 seats)",
            16_000.0 / started.elapsed().as_secs_f64()
        );
        check_over_grpc("redis ", &cb, 2000).await;

        println!("4. Cross-replica visibility (assign on A, CheckSeat on B until licensed):");
        let mut samples = Vec::new();
        let (mut ca2, mut cb2) = (ca.clone(), cb.clone());
        for i in 0..300 {
            let user = format!("vis{i}");
            let t = Instant::now();
            ca2.assign_seat(pb::AssignSeatRequest {
                user_id: user.clone(),
                feature: String::new(),
            })
            .await
            .unwrap();
            loop {
                if cb2
                    .check_seat(check_request(&user))
                    .await
                    .unwrap()
                    .into_inner()
                    .licensed
                {
                    break;
                }
                assert!(
                    t.elapsed() < Duration::from_secs(5),
                    "not visible on B after 5 s"
                );
            }
            samples.push(t.elapsed());
        }
        println!(
            "  assign + visible on the other replica: {}",
            percentiles(samples)
        );
        a.shutdown().await;
        b.shutdown().await;
    }

    check_seat_under_burst().await;
    check_seat_under_flood().await;

    // 5. Mirror memory.
    {
        let n = 1_000_000;
        let store = MemoryStore::new(Arc::new(SystemClock));
        store.wipe();
        let now = Utc::now();
        let seats: Vec<Seat> = (0..n)
            .map(|i| Seat {
                user_id: UserId::parse(&format!("user-{i:07}@pbx.example")).unwrap(),
                feature: Feature::User,
                source: SeatSource::Purchased,
                assigned_at: now,
                over_capacity_since: None,
            })
            .collect();
        store
            .restore(&Snapshot {
                seats,
                ..Snapshot::default()
            })
            .await
            .unwrap();
        let verifier = Verifier {
            key: None,
            serial: comtrexx_licensing::domain::SerialNumber::parse("BENCH").unwrap(),
            edition: Edition::Vm,
        };
        let before = rss_bytes();
        let mirror = Mirror::new(
            Arc::new(store),
            verifier,
            MirrorConfig::default(),
            Arc::new(SystemClock),
        );
        mirror.resync_now().await.unwrap();
        let after = rss_bytes();
        assert_eq!(mirror.read(|s| s.seat_total()), n);
        println!(
            "5. Mirror of {n} seats (user ids of 24 bytes): resident set grew by {:.0} MiB (an upper bound: includes the transient snapshot)",
            (after.saturating_sub(before)) as f64 / 1_048_576.0
        );
    }
}
