//! Every accepted change is in the audit trail at the highest write rate: a
//! bulk provisioning run (20 000 AssignSeat at full concurrency, over real gRPC
//! to the real server on Redis) leaves one stored entry per assignment. The
//! trail's queue is far smaller than the run: entries go to Redis in batches,
//! and a full queue slows the writes down instead of dropping their entries.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use chrono::Utc;
use common::*;
use comtrexx_licensing::config::RawConfig;
use comtrexx_licensing::domain::{Edition, Feature};
use comtrexx_licensing::grpc::pb;

const USERS: usize = 20_000;
const IN_FLIGHT: usize = 512;
const CHANNELS: usize = 8;

fn xlen(redis: &RedisServer, key: &str) -> usize {
    let mut conn = redis.connection();
    redis::cmd("XLEN").arg(key).query(&mut conn).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bulk_provisioning_run_leaves_every_change_in_the_trail() {
    let redis = RedisServer::start();
    let vendor = Vendor::new();
    let serial = serial("audit-bulk");
    vendor.write_license(
        &serial,
        Edition::Vm,
        Utc::now() - chrono::Duration::days(1),
        &[(Feature::User, USERS as u32)],
    );
    // A Redis timeout far above what a write takes, even on a loaded host: this
    // is about the trail at full speed, not about writes that time out.
    let config = without_load_limits(RawConfig {
        edition: Edition::Vm.as_str().into(),
        redis_timeout_ms: 5000,
        ..licensed_config(Some(&redis), &serial, &vendor)
    });
    let server = TestServer::start(config).await;
    let mut clients = Vec::new();
    for _ in 0..CHANNELS {
        clients.push(server.client().await);
    }
    wait_active(&clients[0]).await;
    let stream = format!("lic:{{{serial}}}:audit");
    let before = xlen(&redis, &stream);

    let next = Arc::new(AtomicUsize::new(0));
    let accepted = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for worker in 0..IN_FLIGHT {
        let mut client = clients[worker % CHANNELS].clone();
        let (next, accepted) = (next.clone(), accepted.clone());
        tasks.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= USERS {
                    return;
                }
                let request = pb::AssignSeatRequest {
                    user_id: format!("bulk-user-{i:06}"),
                    feature: String::new(),
                };
                match client.assign_seat(request).await {
                    Ok(_) => {
                        accepted.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(status) => panic!("AssignSeat {i}: {status:?}"),
                }
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    let elapsed = started.elapsed();
    let accepted = accepted.load(Ordering::Relaxed);
    eprintln!(
        "{accepted} assignments in {:.1} s ({:.0}/s)",
        elapsed.as_secs_f64(),
        accepted as f64 / elapsed.as_secs_f64()
    );
    assert_eq!(accepted, USERS);

    // The writer catches up: one stored entry per accepted change, no more.
    let stored = || xlen(&redis, &stream) - before;
    let caught_up = eventually(Duration::from_secs(60), || {
        let n = stored();
        async move { n >= USERS }
    })
    .await;
    let metrics = comtrexx_licensing::metrics::auth_metrics();
    assert!(
        caught_up,
        "{} of {USERS} changes in the trail (queue_full: {}, store: {})",
        stored(),
        metrics.audit_not_stored_count("queue_full"),
        metrics.audit_not_stored_count("store"),
    );
    assert_eq!(stored(), USERS);
    assert_eq!(metrics.audit_not_stored_count("queue_full"), 0);
    assert_eq!(metrics.audit_not_stored_count("store"), 0);

    // And the trail lists them (newest first, through the API).
    let page = clients[0]
        .list_audit_events(pb::ListAuditEventsRequest {
            page_size: 1,
            page_token: String::new(),
            user_id: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(page.events[0].method, "AssignSeat");
    server.shutdown().await;
}
