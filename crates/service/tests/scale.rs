//! Cost that grows with the change, not with the store: a replica on a pool of
//! tens of thousands of seats reads it in pages (a snapshot slower than the
//! Redis timeout still completes and costs nothing else), and an idle replica's
//! periodic check reads a summary, not the pool. Compared within one run, by
//! what Redis counts, never by an absolute time.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use chrono::Utc;
use common::*;
use comtrexx_licensing::config::RawConfig;
use comtrexx_licensing::domain::{Edition, Feature};
use comtrexx_licensing::grpc::pb;

const SEATS: usize = 50_000;

/// A Redis holding `SEATS` seats of a licensed PBX, and the config of a replica on it.
async fn seeded(tag: &str) -> (RedisServer, Vendor, RawConfig) {
    let redis = RedisServer::start();
    let vendor = Vendor::new();
    let serial = serial(tag);
    vendor.write_license(
        &serial,
        Edition::Vm,
        Utc::now() - chrono::Duration::hours(2),
        &[(Feature::User, 100_000)],
    );
    seed_seats(&redis, &serial, SEATS).await;
    let config = licensed_config(Some(&redis), &serial, &vendor);
    (redis, vendor, config)
}

/// A replica whose Redis timeout (15 ms) is far below what reading 50 000 seats
/// takes. Before, the snapshot was one script: it timed out, was sent again
/// every 250 ms, and the replica never got a copy while Redis queued the
/// replies. Now it is read in pages, each far below the timeout: the replica
/// gets a correct copy, and keeps getting one while gaps are made in its feed
/// (by hand, every second: each forces a full snapshot) and writes go on, none
/// of them failing, with Redis's memory and output buffers flat.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_snapshot_slower_than_the_redis_timeout_degrades_nothing() {
    let (redis, _vendor, config) = seeded("slow-snapshot").await;
    let serial = config.serial_number.clone();
    let memory_before = info_field(&redis, "memory", "used_memory");

    let server = TestServer::start(without_load_limits(RawConfig {
        redis_timeout_ms: 15,
        ..config
    }))
    .await;
    let mirror = server.app_parts.as_ref().unwrap().mirror.clone();
    let copied = eventually(Duration::from_secs(30), || {
        let n = mirror.read(|s| s.seat_total());
        async move { n == SEATS }
    })
    .await;
    assert!(
        copied,
        "the replica never read the {SEATS} seats with a 15 ms timeout (has {})",
        mirror.read(|s| s.seat_total())
    );
    let mut client = server.client().await;
    wait_active(&client).await;
    let last = format!("user-{:019}", SEATS - 1);
    let check = client
        .check_seat(pb::CheckSeatRequest {
            user_id: last.clone(),
            feature: "user".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(
        check.licensed,
        "the last seeded user is licensed: {check:?}"
    );

    // Writes, while gaps are made in the feed (a full snapshot each time) and
    // Redis is watched.
    let stop = Arc::new(AtomicBool::new(false));
    let watcher = {
        let (stop, url) = (stop.clone(), redis.url());
        let serial = serial.clone();
        tokio::task::spawn_blocking(move || {
            let client = redis::Client::open(url).unwrap();
            let mut conn = client.get_connection().unwrap();
            let (mut memory, mut buffer, mut gaps) = (0u64, 0u64, 0u32);
            let mut tick = 0u32;
            while !stop.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(50));
                tick += 1;
                if tick.is_multiple_of(20) {
                    // A version no feed entry has: a gap for every replica
                    // (the seat order sets' mark moves with it).
                    make_gap(&mut conn, &serial);
                    gaps += 1;
                }
                let info: String = redis::cmd("INFO").arg("memory").query(&mut conn).unwrap();
                let used = info
                    .lines()
                    .find_map(|l| l.strip_prefix("used_memory:"))
                    .and_then(|v| v.trim().parse::<u64>().ok())
                    .unwrap();
                memory = memory.max(used);
                let list: String = redis::cmd("CLIENT").arg("LIST").query(&mut conn).unwrap();
                for l in list.lines() {
                    if let Some(omem) = l
                        .split(' ')
                        .find_map(|f| f.strip_prefix("omem="))
                        .and_then(|v| v.parse::<u64>().ok())
                    {
                        buffer = buffer.max(omem);
                    }
                }
            }
            (memory, buffer, gaps)
        })
    };
    let scans_before = command_calls(&redis, &["hscan"]);
    let mut writers = Vec::new();
    for w in 0..4 {
        let mut client = server.client().await;
        writers.push(tokio::spawn(async move {
            // A write over a 15 ms bound may time out on a loaded host: the
            // caller retries it (safe: assignments are idempotent), a few times
            // at most.
            let (mut failed, mut retried) = (Vec::new(), 0usize);
            for i in 0..150 {
                let user = format!("late-{w}-{i:04}");
                let mut attempt = 0;
                loop {
                    attempt += 1;
                    match client
                        .assign_seat(pb::AssignSeatRequest {
                            user_id: user.clone(),
                            feature: "user".into(),
                        })
                        .await
                    {
                        Ok(_) => break,
                        Err(status) if status.code() == tonic::Code::Unavailable && attempt < 4 => {
                            retried += 1;
                            tokio::time::sleep(Duration::from_millis(20)).await;
                        }
                        Err(status) => {
                            failed.push(format!("{user}: {status:?}"));
                            break;
                        }
                    }
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            (failed, retried)
        }));
    }
    let (mut failed, mut retried) = (Vec::new(), 0);
    for w in writers {
        let (f, r) = w.await.unwrap();
        failed.extend(f);
        retried += r;
    }
    // Let one more gap land after the last write.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    stop.store(true, Ordering::Relaxed);
    let (memory, buffer, gaps) = watcher.await.unwrap();
    let scans = command_calls(&redis, &["hscan"]) - scans_before;
    println!(
        "{} writes failed, {retried} retried; {gaps} gaps, {scans} HSCAN pages; Redis memory {} MB before, \
         {} MB at most; largest output buffer {} kB",
        failed.len(),
        memory_before / 1_000_000,
        memory / 1_000_000,
        buffer / 1000
    );
    assert!(failed.is_empty(), "writes failed: {failed:#?}");
    assert!(
        retried < 60,
        "{retried} of 600 writes needed a retry: the snapshots slow the writes down"
    );
    assert!(gaps >= 3, "gaps were made in the feed");
    assert!(
        // Two full snapshots at least (pages of about 4 000 fields).
        scans >= u64::try_from(2 * SEATS / 4000).unwrap(),
        "the gaps made the replica read full snapshots ({scans} pages)"
    );
    assert!(
        memory < memory_before + 64_000_000,
        "Redis's memory stays flat: {memory_before} before, {memory} at most"
    );
    assert!(
        buffer < 8_000_000,
        "no reply piles up in an output buffer: {buffer} bytes at most"
    );
    let whole = eventually(Duration::from_secs(30), || {
        let n = mirror.read(|s| s.seat_total());
        async move { n == SEATS + 600 }
    })
    .await;
    assert!(
        whole,
        "the replica's copy has every seat ({} of {})",
        mirror.read(|s| s.seat_total()),
        SEATS + 600
    );
}

/// An idle replica checks its copy every `resync_interval` by a summary (one
/// small read), not by reading the pool again: over a few intervals Redis
/// sends it about as much as it would for an empty pool. Before, every
/// interval read the whole pool (megabytes per replica per interval). Also
/// after a full resync that compared the store with the copy in place.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_replica_costs_the_same_for_any_pool_size() {
    let (redis, _vendor, mut raw) = seeded("idle-cost").await;
    raw.mirror.resync_interval_ms = 1000;
    let raw_serial = raw.serial_number.clone();
    let server = TestServer::start(raw).await;
    let mirror = server.app_parts.as_ref().unwrap().mirror.clone();
    let copied = eventually(Duration::from_secs(30), || {
        let n = mirror.read(|s| s.seat_total());
        async move { n == SEATS }
    })
    .await;
    assert!(copied, "the replica read the pool");
    // A gap in the feed: a full resync, compared with the copy in place; the
    // checks after it find the copy equal to the store (no further read).
    make_gap(&mut redis.connection(), &raw_serial);
    let want: u64 = redis::cmd("GET")
        .arg(format!("lic:{{{raw_serial}}}:version"))
        .query(&mut redis.connection())
        .unwrap();
    let caught_up = eventually(Duration::from_secs(30), || {
        let v = mirror.read(|s| s.version());
        async move { v >= want }
    })
    .await;
    assert!(caught_up, "the replica read the store again after the gap");
    assert_eq!(mirror.read(|s| s.seat_total()), SEATS);
    // The seats alone are about 3 MB on the wire.
    let sent_before = info_field(&redis, "stats", "total_net_output_bytes");
    let scans_before = command_calls(&redis, &["hscan"]);
    tokio::time::sleep(Duration::from_millis(4500)).await;
    let sent = info_field(&redis, "stats", "total_net_output_bytes") - sent_before;
    let scans = command_calls(&redis, &["hscan"]) - scans_before;
    println!("an idle replica over 4.5 s (4 check intervals): {sent} bytes, {scans} HSCAN pages");
    assert_eq!(scans, 0, "no page of the pool was read again");
    assert!(
        sent < 200_000,
        "an idle replica's checks cost {sent} bytes in 4.5 s with {SEATS} seats"
    );
    assert!(
        mirror.read(|s| s.position.is_some()),
        "the replica follows the store"
    );
}
