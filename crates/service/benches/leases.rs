//! Leases over two replicas of one PBX on one `redis-server` (both in this
//! process): `cargo bench --bench leases [-- RENEWED]` prints
//!
//! - `AcquireLease` and `ReleaseLease` latency over gRPC (median, p99, max),
//!   alternating between the replicas, one call at a time;
//! - the same `AcquireLease` under 16 concurrent callers (throughput);
//! - one `RenewLeases` call renewing RENEWED (default 10 000) leases of one
//!   holder: its latency, the longest single Redis call it made (`SLOWLOG`)
//!   and the other replica's delay until it has applied the renewal;
//! - a holder's death: a client library holder (lease length 5 s, the
//!   shortest) stops right after a renewal, without a word; the time until
//!   another holder's acquisition of the only seat succeeds (polled every
//!   10 ms), five times.
//!
//! Results in BENCHMARKS.md ("Leases"). Needs `redis-server` on PATH.

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use chrono::Utc;
use common::*;
use comtrexx_licensing::config::RawConfig;
use comtrexx_licensing::domain::{Edition, Feature, SeatModel};
use comtrexx_licensing::grpc::pb;

/// Calls measured per kind.
const CALLS: usize = 500;

fn summary(mut d: Vec<Duration>) -> String {
    d.sort();
    let at = |q: f64| d[((d.len() as f64 - 1.0) * q).round() as usize];
    format!(
        "median {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        at(0.5).as_secs_f64() * 1e3,
        at(0.99).as_secs_f64() * 1e3,
        d[d.len() - 1].as_secs_f64() * 1e3
    )
}

async fn acquire(c: &mut Client, user: &str, holder: &str) -> pb::AcquireLeaseResponse {
    c.acquire_lease(pb::AcquireLeaseRequest {
        user_id: user.into(),
        feature: String::new(),
        holder: holder.into(),
    })
    .await
    .expect("AcquireLease")
    .into_inner()
}

fn main() {
    let renewed: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(10_000);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(run(renewed));
    runtime.block_on(death_to_free());
}

/// The seat of a holder that died: free within one lease length.
async fn death_to_free() {
    let redis = RedisServer::start();
    let vendor = Vendor::new();
    let serial = serial("bench-lease-death");
    vendor.write_license_with_models(
        &serial,
        Edition::Vm,
        Utc::now() - chrono::Duration::hours(1),
        &[(Feature::User, 1, SeatModel::Concurrent)],
    );
    let mut config = without_load_limits(licensed_config(Some(&redis), &serial, &vendor));
    config.leases.duration_seconds = 5;
    let (a, b) = tokio::join!(TestServer::start(config.clone()), TestServer::start(config));
    for c in [a.client().await, b.client().await] {
        wait_active(&c).await;
    }
    let holder = |endpoint: String, name: &str| {
        comtrexx_licensing_client::Client::start(comtrexx_licensing_client::Config {
            endpoints: vec![endpoint],
            holder: Some(name.into()),
            ..Default::default()
        })
        .unwrap()
    };
    let mut took = Vec::new();
    for round in 0..5 {
        // The doomed holder runs on a runtime of its own: shutting that runtime
        // down stops its renewals at once, without a release (as a process dies).
        let endpoint = a.endpoint();
        let (tx, rx) = tokio::sync::oneshot::channel::<Instant>();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Runtime::new().unwrap();
            rt.block_on(async {
                let doomed =
                    comtrexx_licensing_client::Client::start(comtrexx_licensing_client::Config {
                        endpoints: vec![endpoint],
                        holder: Some(format!("doomed-{round}")),
                        ..Default::default()
                    })
                    .unwrap();
                let guard = doomed
                    .acquire("dies", Feature::User)
                    .await
                    .expect("the seat");
                // Dies right after a renewal: the longest wait there can be.
                let renewed_at = guard.lease().and_then(|l| l.expires_at);
                while guard.lease().and_then(|l| l.expires_at) == renewed_at {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                std::mem::forget(guard);
                std::mem::forget(doomed);
            });
            rt.shutdown_background();
            let _ = tx.send(Instant::now());
        });
        let died = rx.await.expect("the doomed holder ran");
        let next = holder(b.endpoint(), &format!("next-{round}"));
        let got = loop {
            if let Ok(g) = next.acquire("next", Feature::User).await {
                break g;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        took.push(died.elapsed());
        drop(got);
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    println!(
        "a holder's death until its seat is free again (lease 5 s, died right after a renewal): {}",
        summary(took)
    );
}

async fn run(renewed: usize) {
    let redis = RedisServer::start();
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("slowlog-log-slower-than")
        .arg(0)
        .query(&mut redis.connection())
        .unwrap();
    let vendor = Vendor::new();
    let serial = serial("bench-leases");
    let quantity = u32::try_from(renewed).unwrap().max(1000);
    vendor.write_license_with_models(
        &serial,
        Edition::Vm,
        Utc::now() - chrono::Duration::hours(1),
        &[(Feature::User, quantity, SeatModel::Concurrent)],
    );
    let mut config = without_load_limits(RawConfig {
        redis_timeout_ms: 5_000,
        ..licensed_config(Some(&redis), &serial, &vendor)
    });
    // A renewal of many ids is one large request.
    config.limits.max_message_bytes = 16 << 20;
    let (a, b) = tokio::join!(TestServer::start(config.clone()), TestServer::start(config));
    let (mut ca, mut cb) = (a.client().await, b.client().await);
    for c in [&ca, &cb] {
        let ok = eventually(Duration::from_secs(10), || {
            let mut c = c.clone();
            async move { overview(&mut c).await.activation_state() == pb::ActivationState::Active }
        })
        .await;
        assert!(ok, "the license was never applied");
    }

    // One call at a time, alternating between the replicas.
    let mut acquired = Vec::with_capacity(CALLS);
    let mut ids = Vec::with_capacity(CALLS);
    for i in 0..CALLS {
        let c = if i % 2 == 0 { &mut ca } else { &mut cb };
        let started = Instant::now();
        let r = acquire(c, &format!("user-{i:05}"), "pod-0").await;
        acquired.push(started.elapsed());
        ids.push(r.lease.unwrap().lease_id);
    }
    let mut released = Vec::with_capacity(CALLS);
    for (i, id) in ids.iter().enumerate() {
        let c = if i % 2 == 0 { &mut cb } else { &mut ca };
        let started = Instant::now();
        c.release_lease(pb::ReleaseLeaseRequest {
            lease_id: id.clone(),
        })
        .await
        .expect("ReleaseLease");
        released.push(started.elapsed());
    }
    println!(
        "AcquireLease, one at a time over 2 replicas: {}",
        summary(acquired)
    );
    println!(
        "ReleaseLease, one at a time over 2 replicas: {}",
        summary(released)
    );

    // 16 concurrent callers.
    let started = Instant::now();
    let tasks: Vec<_> = (0..16)
        .map(|t| {
            let mut c = if t % 2 == 0 { ca.clone() } else { cb.clone() };
            tokio::spawn(async move {
                let mut ids = Vec::new();
                for i in 0..CALLS / 16 {
                    ids.push(
                        acquire(&mut c, &format!("c{t}-{i}"), &format!("pod-{t}"))
                            .await
                            .lease
                            .unwrap()
                            .lease_id,
                    );
                }
                for id in ids {
                    c.release_lease(pb::ReleaseLeaseRequest { lease_id: id })
                        .await
                        .expect("ReleaseLease");
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let calls = 2 * 16 * (CALLS / 16);
    println!(
        "AcquireLease + ReleaseLease, 16 concurrent callers over 2 replicas: {:.0} calls/s",
        calls as f64 / started.elapsed().as_secs_f64()
    );

    // One holder's leases renewed in one call.
    let mut ids = Vec::with_capacity(renewed);
    for i in 0..renewed {
        let c = if i % 2 == 0 { &mut ca } else { &mut cb };
        ids.push(
            acquire(c, &format!("r-{i:06}"), "big-holder")
                .await
                .lease
                .unwrap()
                .lease_id,
        );
    }
    let _: () = redis::cmd("SLOWLOG")
        .arg("RESET")
        .query(&mut redis.connection())
        .unwrap();
    let started = Instant::now();
    let r = ca
        .renew_leases(pb::RenewLeasesRequest {
            holder: "big-holder".into(),
            lease_ids: ids.clone(),
        })
        .await
        .expect("RenewLeases")
        .into_inner();
    let took = started.elapsed();
    assert_eq!(r.leases.len(), renewed);
    assert!(r.lost.is_empty());
    // The other replica has applied it once a read at its version answers.
    let seen = Instant::now();
    cb.check_seat(pb::CheckSeatRequest {
        user_id: "r-000000".into(),
        feature: String::new(),
        min_version: r.version,
    })
    .await
    .expect("CheckSeat at the renewal's version");
    let entries: Vec<redis::Value> = redis::cmd("SLOWLOG")
        .arg("GET")
        .arg(-1)
        .query(&mut redis.connection())
        .unwrap();
    let longest = entries
        .iter()
        .filter_map(|e| match e {
            redis::Value::Array(f) => redis::from_redis_value_ref::<u64>(&f[2]).ok(),
            _ => None,
        })
        .max()
        .unwrap_or(0);
    println!(
        "RenewLeases of {renewed} leases by one holder, one call: {:.1} ms; longest Redis call {:.1} ms; other replica at its version after {:.1} ms more",
        took.as_secs_f64() * 1e3,
        longest as f64 / 1e3,
        seen.elapsed().as_secs_f64() * 1e3
    );
}
