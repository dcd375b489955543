//! Chaos run (not part of `cargo test`): three replicas on one Redis (replica 0
//! through a fault proxy), mixed load (assign, release, check), and random
//! faults: Redis killed and back empty, restarted from an older snapshot,
//! flushed, frozen; the proxy adding latency, blackholing, resetting. At the
//! end the faults stop and the invariants of ARCHITECTURE.md are checked:
//! every replica and the store agree (I4), no pool holds more than its capacity
//! (I1), every acknowledged seat is licensed or was reported lost (I2), the
//! tryout started once (I5). Prints a summary; exits non-zero on a violation.
//!
//! `cargo bench --bench chaos -- SECONDS` (default 60).

#[path = "../tests/common/mod.rs"]
mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::proxy::{Fault, FaultProxy};
use common::{RedisServer, TestServer, config, serial};
use comtrexx_licensing::grpc::pb;
use rand::{Rng as _, SeedableRng as _};
use tonic::Code;

const SEATS: u32 = 20;
const WORKERS: usize = 6;
const USERS_PER_WORKER: usize = 8;

#[derive(Default, Clone)]
struct Tally {
    ops: BTreeMap<String, u64>,
    faults: BTreeMap<&'static str, u64>,
    /// The last definite outcome per user: true = told assigned.
    held: BTreeMap<String, bool>,
    /// Users whose last write had an unknown outcome (UNAVAILABLE).
    unknown: BTreeSet<String>,
    lost_reports: Vec<String>,
}

fn main() {
    let secs: u64 = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(60);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .unwrap();
    let violations = runtime.block_on(run(Duration::from_secs(secs)));
    if violations > 0 {
        std::process::exit(1);
    }
}

async fn run(duration: Duration) -> usize {
    let mut redis = RedisServer::start();
    let proxy = FaultProxy::start(redis.addr()).await;
    let serial = serial("chaos");
    let mut replicas = Vec::new();
    for url in [proxy.url(), redis.url(), redis.url()] {
        let mut c = config(None, &serial);
        c.redis_url = Some(url);
        c.tryout.seats = SEATS;
        replicas.push(TestServer::start(c).await);
    }
    let mut clients = Vec::new();
    for r in &replicas {
        clients.push(r.client().await);
    }
    let started = clients[0]
        .start_tryout(pb::StartTryoutRequest {})
        .await
        .expect("StartTryout")
        .into_inner()
        .status
        .and_then(|s| s.started_at);
    let tally = Arc::new(Mutex::new(Tally::default()));
    for c in &clients {
        let mut events = c
            .clone()
            .watch_license_events(pb::WatchLicenseEventsRequest {})
            .await
            .unwrap()
            .into_inner();
        let tally = tally.clone();
        tokio::spawn(async move {
            while let Ok(Some(e)) = events.message().await {
                if e.kind == "data_lost" {
                    tally.lock().unwrap().lost_reports.push(e.detail);
                }
            }
        });
    }

    let until = Instant::now() + duration;
    let mut workers = Vec::new();
    for w in 0..WORKERS {
        let clients = clients.clone();
        let tally = tally.clone();
        workers.push(tokio::spawn(async move {
            let mut rng = rand::rngs::StdRng::from_entropy();
            while Instant::now() < until {
                let user = format!("w{w}u{}", rng.gen_range(0..USERS_PER_WORKER));
                let mut c = clients[rng.gen_range(0..clients.len())].clone();
                let op = rng.gen_range(0..10);
                let (name, result) = if op < 4 {
                    let r = c
                        .assign_seat(pb::AssignSeatRequest {
                            user_id: user.clone(),
                            feature: String::new(),
                        })
                        .await;
                    ("assign", r.map(|_| true))
                } else if op < 6 {
                    let r = c
                        .release_seat(pb::ReleaseSeatRequest {
                            user_id: user.clone(),
                            feature: String::new(),
                        })
                        .await;
                    ("release", r.map(|_| false))
                } else {
                    let r = c
                        .check_seat(pb::CheckSeatRequest {
                            user_id: user.clone(),
                            feature: String::new(),
                            ..Default::default()
                        })
                        .await;
                    ("check", r.map(|_| false))
                };
                {
                    let mut t = tally.lock().unwrap();
                    let code = match &result {
                        Ok(_) => Code::Ok,
                        Err(s) => s.code(),
                    };
                    *t.ops.entry(format!("{name} {code:?}")).or_default() += 1;
                    if name != "check" {
                        match result {
                            Ok(held) => {
                                t.held.insert(user.clone(), held);
                                t.unknown.remove(&user);
                            }
                            Err(s) if s.code() == Code::Unavailable => {
                                t.unknown.insert(user.clone());
                            }
                            Err(_) => {}
                        }
                    }
                }
                tokio::time::sleep(Duration::from_millis(rng.gen_range(1..10))).await;
            }
        }));
    }

    let mut rng = rand::rngs::StdRng::from_entropy();
    let mut snapshot = redis.save_snapshot();
    while Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(rng.gen_range(500..2000))).await;
        if Instant::now() >= until {
            break;
        }
        let fault = match rng.gen_range(0..9) {
            0 => {
                redis.restart_empty();
                "restart empty"
            }
            1 => {
                redis.restart_from(&snapshot);
                "restart from older snapshot"
            }
            2 => {
                redis.flushall();
                "flushall"
            }
            3 => {
                redis.signal("-STOP");
                tokio::time::sleep(Duration::from_millis(500)).await;
                redis.signal("-CONT");
                "sigstop"
            }
            4 => {
                snapshot = redis.save_snapshot();
                "snapshot saved"
            }
            n => {
                let f = match n {
                    5 => Fault::Latency(Duration::from_millis(300)),
                    6 => Fault::Blackhole,
                    7 => Fault::Reset,
                    _ => Fault::HalfOpen,
                };
                proxy.set(f);
                tokio::time::sleep(Duration::from_millis(rng.gen_range(200..1000))).await;
                proxy.set(Fault::Pass);
                match f {
                    Fault::Latency(_) => "proxy latency",
                    Fault::Blackhole => "proxy blackhole",
                    Fault::Reset => "proxy reset",
                    _ => "proxy half-open",
                }
            }
        };
        *tally.lock().unwrap().faults.entry(fault).or_default() += 1;
    }
    for w in workers {
        w.await.unwrap();
    }
    proxy.set(Fault::Pass);
    let healed = Instant::now();
    check(&clients, &tally, started, healed).await
}

/// Waits (bounded) for agreement, then checks I1, I2, I4, I5; prints a summary.
async fn check(
    clients: &[common::Client],
    tally: &Arc<Mutex<Tally>>,
    started: Option<prost_types::Timestamp>,
    healed: Instant,
) -> usize {
    let users: Vec<String> = (0..WORKERS)
        .flat_map(|w| (0..USERS_PER_WORKER).map(move |u| format!("w{w}u{u}")))
        .collect();
    let mut violations = Vec::new();
    let mut views = Vec::new();
    let mut agreed = None;
    while healed.elapsed() < Duration::from_secs(10) {
        views.clear();
        for c in clients {
            let mut c = c.clone();
            let mut licensed = BTreeSet::new();
            for u in &users {
                if let Ok(r) = c
                    .check_seat(pb::CheckSeatRequest {
                        user_id: u.clone(),
                        feature: String::new(),
                        ..Default::default()
                    })
                    .await
                    && r.into_inner().licensed
                {
                    licensed.insert(u.clone());
                }
            }
            let listed: Option<BTreeSet<String>> = c
                .list_seats(pb::ListSeatsRequest {
                    feature: String::new(),
                    page_size: 1000,
                    page_token: String::new(),
                    ..Default::default()
                })
                .await
                .ok()
                .map(|r| {
                    r.into_inner()
                        .seats
                        .into_iter()
                        .map(|s| s.user_id)
                        .collect()
                });
            views.push((licensed, listed));
        }
        if views
            .iter()
            .all(|v| v == &views[0] && v.1.as_ref() == Some(&v.0))
        {
            agreed = Some(healed.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let t = tally.lock().unwrap().clone();
    if agreed.is_none() {
        violations.push(format!("I4: no agreement 10 s after the faults: {views:?}"));
    }
    let licensed = views.first().map(|v| v.0.clone()).unwrap_or_default();
    if licensed.len() > SEATS as usize {
        violations.push(format!("I1: {} licensed of {SEATS}", licensed.len()));
    }
    let reported = t.lost_reports.join(" ");
    for (user, held) in &t.held {
        if *held
            && !t.unknown.contains(user)
            && !licensed.contains(user)
            && !reported.contains(&format!("/{user} "))
        {
            violations.push(format!(
                "I2: {user} acknowledged, not licensed, not reported lost"
            ));
        }
    }
    for (i, c) in clients.iter().enumerate() {
        let o = common::overview(&mut c.clone()).await;
        if o.tryout.and_then(|t| t.started_at) != started {
            violations.push(format!("I5: tryout start moved on replica {i}"));
        }
    }
    println!("chaos run summary");
    println!("  faults injected: {:?}", t.faults);
    println!("  operations: {:?}", t.ops);
    println!(
        "  agreement after the last fault: {}",
        agreed.map_or("none within 10 s".into(), |d| format!("{d:?}"))
    );
    println!(
        "  seats licensed at the end: {} of {SEATS}; writes reported lost: {}",
        licensed.len(),
        t.lost_reports.len()
    );
    for v in &violations {
        println!("  VIOLATION {v}");
    }
    println!(
        "  invariants: {}",
        if violations.is_empty() {
            "held"
        } else {
            "VIOLATED"
        }
    );
    violations.len()
}
