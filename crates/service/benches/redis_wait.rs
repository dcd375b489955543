//! The cost of `redis_wait_replicas`: `cargo bench --bench redis_wait`.
//!
//! One service replica on a real Redis master with one replica (both started here on
//! free ports); `AssignSeat` latency (one caller) and throughput (16 callers), with
//! writes acknowledged by the master alone and then only after `WAIT 1`. Results
//! are recorded in BENCHMARKS.md.
//!
//! Needs `redis-server` on PATH.

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use chrono::Utc;
use common::*;
use comtrexx_licensing::config::RawConfig;
use comtrexx_licensing::domain::{Edition, Feature};

#[tokio::main]
async fn main() {
    println!(
        "AssignSeat with and without WAIT ({} cores; Redis master + 1 replica on loopback)",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    let master = RedisServer::with_args(&[], None);
    let replica = RedisServer::replica_of(&master);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !redis::cmd("INFO")
        .arg("replication")
        .query::<String>(&mut replica.connection())
        .is_ok_and(|i| i.contains("master_link_status:up"))
    {
        assert!(Instant::now() < deadline, "the replica did not sync");
        std::thread::sleep(Duration::from_millis(20));
    }
    for wait in [0, 1] {
        let vendor = Vendor::new();
        let serial = serial("bench-wait");
        vendor.write_license(
            &serial,
            Edition::Vm,
            Utc::now(),
            &[(Feature::User, 100_000)],
        );
        let server = TestServer::start(RawConfig {
            redis_url: Some(format!("redis://127.0.0.1:{}", master.port)),
            redis_wait_replicas: wait,
            redis_wait_timeout_ms: 1000,
            license_file: Some(vendor.license_path()),
            vendor_public_key: Some(vendor.public_key()),
            serial_number: serial,
            ..RawConfig::default()
        })
        .await;
        let client = server.client().await;
        wait_active(&client).await;
        let mut c = client.clone();
        for i in 0..200 {
            assigned(&mut c, &format!("warm{i}"), "").await;
        }
        let mut samples = Vec::new();
        for i in 0..2000 {
            let t = Instant::now();
            assigned(&mut c, &format!("seq{i}"), "").await;
            samples.push(t.elapsed());
        }
        println!("redis_wait_replicas = {wait}:");
        println!(
            "  AssignSeat latency, 1 caller:      {}",
            percentiles(samples)
        );
        let started = Instant::now();
        let tasks: Vec<_> = (0..16)
            .map(|w| {
                let mut c = client.clone();
                tokio::spawn(async move {
                    for i in 0..500 {
                        assigned(&mut c, &format!("par{w}-{i}"), "").await;
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
        println!(
            "  AssignSeat throughput, 16 callers: {:.0} calls/s (8 000 seats)",
            8_000.0 / started.elapsed().as_secs_f64()
        );
        server.shutdown().await;
    }
}
