//! The one-time build of the seat order sets (a store written before they
//! existed, as after an upgrade) is a background task of the replica, never
//! part of a request: it starts when the replica reads the store, one replica
//! builds while the others wait for it, and a write that needs the sets
//! meanwhile answers within its own deadline (`UNAVAILABLE`/`STORE_BUSY` with
//! `RetryInfo`), having written nothing.

mod common;

use std::time::{Duration, Instant};

use chrono::Utc;
use common::*;
use comtrexx_licensing::config::RawConfig;
use comtrexx_licensing::domain::{Edition, Feature};
use comtrexx_licensing::grpc::pb;
use tonic_types::StatusExt as _;

/// A Redis holding `seats` purchased seats and the license of a PBX (applied
/// by a replica that then stopped), whose seat order sets were then removed:
/// a store as written before they existed.
async fn store_without_order_sets(tag: &str, seats: usize) -> (RedisServer, Vendor, RawConfig) {
    let redis = RedisServer::start();
    let vendor = Vendor::new();
    let serial = serial(tag);
    vendor.write_license(
        &serial,
        Edition::Vm,
        Utc::now() - chrono::Duration::hours(2),
        &[(Feature::User, 1_000_000)],
    );
    seed_seats(&redis, &serial, seats).await;
    let config = without_load_limits(licensed_config(Some(&redis), &serial, &vendor));
    let first = TestServer::start(config.clone()).await;
    wait_active(&first.client().await).await;
    first.shutdown().await;
    let _: i64 = redis::cmd("DEL")
        .arg(key(&serial, "order:user"))
        .arg(key(&serial, "flagged:user"))
        .arg(key(&serial, "order_at"))
        .query(&mut redis.connection())
        .unwrap();
    (redis, vendor, config)
}

fn key(serial: &str, name: &str) -> String {
    format!("lic:{{{serial}}}:{name}")
}

fn get(redis: &RedisServer, key: &str) -> Option<String> {
    redis::cmd("GET")
        .arg(key)
        .query(&mut redis.connection())
        .unwrap()
}

/// Whether the order sets are true at the store's version (the build ended).
fn built(redis: &RedisServer, serial: &str) -> bool {
    let at = get(redis, &key(serial, "order_at"));
    at.is_some() && at == get(redis, &key(serial, "version"))
}

fn release_within(user: &str, timeout: Duration) -> tonic::Request<pb::ReleaseSeatRequest> {
    let mut request = tonic::Request::new(pb::ReleaseSeatRequest {
        user_id: user.to_owned(),
        feature: "user".into(),
    });
    request.set_timeout(timeout);
    request
}

/// Another replica holds the build (its mark, set by hand here): this
/// replica's release, which needs the sets, waits for it only until shortly
/// before its own deadline of 1 s and answers `STORE_BUSY` with a retry delay,
/// writing nothing. When the other builder goes away (its mark gone), this
/// replica's background task builds the sets, with no request waiting, and the
/// release succeeds. Before, the build ran inside the write (and waited up to
/// 60 s for another builder): the call was cut off by its deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_during_the_build_answers_within_its_deadline() {
    let (redis, _vendor, config) = store_without_order_sets("order-busy", 20_000).await;
    let serial = config.serial_number.clone();
    let version = get(&redis, &key(&serial, "version")).unwrap();
    let _: () = redis::cmd("SET")
        .arg(key(&serial, "order_build"))
        .arg(format!("another-replica|{version}"))
        .arg("PX")
        .arg(60_000)
        .query(&mut redis.connection())
        .unwrap();

    let server = TestServer::start(config).await;
    let mut client = server.client().await;
    wait_active(&client).await;
    let user = seat_user(7);
    let started = Instant::now();
    let status = client
        .release_seat(release_within(&user, Duration::from_secs(1)))
        .await
        .expect_err("the release needs the order sets, which another replica builds");
    let took = started.elapsed();
    let info = status.get_details_error_info().expect("ErrorInfo");
    assert_eq!(
        (status.code(), info.reason.as_str()),
        (tonic::Code::Unavailable, "STORE_BUSY"),
        "{status:?}"
    );
    let retry = status
        .get_details_retry_info()
        .and_then(|r| r.retry_delay)
        .expect("RetryInfo");
    assert!(retry >= Duration::from_secs(1), "{retry:?}");
    assert!(
        took < Duration::from_secs(1),
        "answered within its deadline, not cut off by it: {took:?}"
    );
    // Nothing was written: the seat is held.
    let held: bool = redis::cmd("HEXISTS")
        .arg(key(&serial, "seats:user:purchased"))
        .arg(&user)
        .query(&mut redis.connection())
        .unwrap();
    assert!(held, "the seat is still held");
    assert!(!built(&redis, &serial));

    // The other builder is gone: this replica's task takes over and builds
    // the sets in the background.
    let _: i64 = redis::cmd("DEL")
        .arg(key(&serial, "order_build"))
        .query(&mut redis.connection())
        .unwrap();
    assert!(
        eventually(Duration::from_secs(30), || {
            let done = built(&redis, &serial);
            async move { done }
        })
        .await,
        "the replica built the order sets without a write waiting"
    );
    let order: u64 = redis::cmd("ZCARD")
        .arg(key(&serial, "order:user"))
        .query(&mut redis.connection())
        .unwrap();
    assert_eq!(order, 20_000);
    client
        .release_seat(release_within(&user, Duration::from_secs(5)))
        .await
        .expect("the release succeeds once the sets are built");
    server.shutdown().await;
}

/// Two replicas start on a store without order sets: the sets are built once,
/// in the background, by one of them (each seat put into the order once: Redis
/// counts the `ZADD`s), with no write asking; a release on the other replica
/// meanwhile answers within its deadline (done, or `STORE_BUSY` with nothing
/// written), and succeeds once the build is over.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replicas_build_the_order_once_in_the_background() {
    const SEATS: usize = 50_000;
    let (redis, _vendor, config) = store_without_order_sets("order-once", SEATS).await;
    let serial = config.serial_number.clone();
    let zadds_before = command_calls(&redis, &["zadd"]);

    let (a, b) = tokio::join!(
        TestServer::start(config.clone()),
        TestServer::start(config.clone())
    );
    let mut client = b.client().await;
    wait_active(&client).await;
    let user = seat_user(11);
    let started = Instant::now();
    match client
        .release_seat(release_within(&user, Duration::from_secs(2)))
        .await
    {
        Ok(_) => {}
        Err(status) => {
            let reason = status.get_details_error_info().map(|i| i.reason);
            assert_eq!(
                (status.code(), reason.as_deref()),
                (tonic::Code::Unavailable, Some("STORE_BUSY")),
                "{status:?}"
            );
            assert!(status.get_details_retry_info().is_some(), "{status:?}");
        }
    }
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "answered within its deadline: {:?}",
        started.elapsed()
    );
    assert!(
        eventually(Duration::from_secs(60), || {
            let done = built(&redis, &serial);
            async move { done }
        })
        .await,
        "the order sets were built"
    );
    let zadds = command_calls(&redis, &["zadd"]) - zadds_before;
    println!("{zadds} ZADD calls for {SEATS} seats");
    assert!(
        zadds < (SEATS as u64) * 3 / 2,
        "one build, not two: {zadds} ZADD calls for {SEATS} seats"
    );
    client
        .release_seat(release_within(&user, Duration::from_secs(5)))
        .await
        .expect("the release succeeds once the sets are built");
    let order: u64 = redis::cmd("ZCARD")
        .arg(key(&serial, "order:user"))
        .query(&mut redis.connection())
        .unwrap();
    assert_eq!(order, (SEATS - 1) as u64);
    a.shutdown().await;
    b.shutdown().await;
}
