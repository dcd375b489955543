//! Availability: CheckSeat keeps answering from the replica's last known state
//! while Redis is down, writes fail fast with UNAVAILABLE, a Redis that comes
//! back empty is repaired from the replica, and the service starts without Redis.

mod common;

use std::time::{Duration, Instant};

use chrono::Utc;
use common::*;
use comtrexx_licensing::config::RawConfig;
use comtrexx_licensing::domain::{Edition, Feature};
use comtrexx_licensing::grpc::pb;
use tonic::{Code, Status};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_types::StatusExt as _;

const WAIT: Duration = Duration::from_secs(10);
/// A generous bound for a write refused because Redis is down (the configured
/// Redis timeout is 250 ms).
const FAIL_FAST: Duration = Duration::from_secs(3);

fn users(seats: &[pb::Seat]) -> Vec<(String, String)> {
    seats
        .iter()
        .map(|s| (s.feature.clone(), s.user_id.clone()))
        .collect()
}

fn in_use(o: &pb::GetLicenseOverviewResponse, feature: &str) -> u32 {
    o.entitlements
        .iter()
        .find(|e| e.feature == feature)
        .map_or(0, |e| e.in_use)
}

/// Asserts UNAVAILABLE that came within [`FAIL_FAST`].
fn assert_unavailable<T: std::fmt::Debug>(result: Result<T, Status>, took: Duration, what: &str) {
    let status = match result {
        Ok(ok) => panic!("{what}: expected UNAVAILABLE, got {ok:?}"),
        Err(s) => s,
    };
    assert_eq!(status.code(), Code::Unavailable, "{what}: {status:?}");
    assert!(took < FAIL_FAST, "{what} took {took:?}");
    println!("{what}: UNAVAILABLE after {took:?}");
}

async fn timed<T>(f: impl std::future::Future<Output = T>) -> (T, Duration) {
    let started = Instant::now();
    let out = f.await;
    (out, started.elapsed())
}

async fn health(server: &TestServer) -> Vec<ServingStatus> {
    let channel = tonic::transport::Channel::from_shared(server.endpoint())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = HealthClient::new(channel);
    let mut out = Vec::new();
    for service in ["", "comtrexx.licensing.v1.LicensingService"] {
        let r = health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .expect("health answers")
            .into_inner();
        out.push(r.status());
    }
    out
}

/// A licensed PBX on `redis` with `entitlements`; waits until it is active.
async fn licensed_pbx(
    redis: &RedisServer,
    tag: &str,
    entitlements: &[(Feature, u32)],
) -> (TestServer, Client, Vendor, String) {
    let vendor = Vendor::new();
    let serial = serial(tag);
    vendor.write_license(&serial, Edition::Vm, Utc::now(), entitlements);
    let server = TestServer::start(licensed_config(Some(redis), &serial, &vendor)).await;
    let client = server.client().await;
    wait_active(&client).await;
    (server, client, vendor, serial)
}

#[tokio::test]
async fn redis_outage_keeps_check_seat_and_refuses_writes() {
    let mut redis = RedisServer::start();
    let (server, mut c, _vendor, _serial) = licensed_pbx(
        &redis,
        "down",
        &[(Feature::User, 3), (Feature::CallAssist, 1)],
    )
    .await;
    assign(&mut c, "alice", "").await.unwrap();
    assign(&mut c, "bob", "").await.unwrap();
    assign(&mut c, "alice", "call_assist").await.unwrap();
    assert!(!checked(&mut c, "alice", "").await.stale);

    redis.kill();
    let stale = eventually(WAIT, || {
        let mut c = c.clone();
        async move { checked(&mut c, "alice", "").await.stale }
    })
    .await;
    assert!(stale, "CheckSeat never reported stale while Redis is down");

    for (user, feature) in [("alice", ""), ("bob", "user"), ("alice", "call_assist")] {
        let ck = checked(&mut c, user, feature).await;
        assert!(ck.licensed, "{user}/{feature}: {ck:?}");
        assert!(ck.stale);
        assert_eq!(ck.reason(), pb::SeatReason::Assigned);
        assert_eq!(ck.source(), pb::SeatSource::Purchased);
    }
    let carol = checked(&mut c, "carol", "").await;
    assert!(!carol.licensed && carol.stale);
    assert_eq!(carol.reason(), pb::SeatReason::NotAssigned);

    let (r, took) = timed(assign(&mut c, "carol", "")).await;
    let status = r.as_ref().map(|_| ()).unwrap_err().clone();
    assert_unavailable(r, took, "AssignSeat");
    assert_eq!(
        status.get_details_error_info().expect("ErrorInfo").reason,
        "STORE_UNAVAILABLE"
    );
    let (r, took) = timed(assign(&mut c, "alice", "")).await;
    assert_unavailable(r, took, "AssignSeat of a held seat");
    let (r, took) = timed(release(&mut c, "bob", "")).await;
    assert_unavailable(r, took, "ReleaseSeat");
    let (r, took) = timed(list_seats(&mut c, "", 1000)).await;
    assert_unavailable(r, took, "ListSeats");

    // Nothing was half-written: bob still holds his seat, carol none.
    assert!(checked(&mut c, "bob", "").await.licensed);
    assert!(!checked(&mut c, "carol", "").await.licensed);

    // Reads of the last known state still answer.
    let t = c
        .get_tryout_status(pb::GetTryoutStatusRequest::default())
        .await
        .expect("GetTryoutStatus answers")
        .into_inner()
        .status
        .unwrap();
    assert_eq!(
        t.state(),
        pb::TryoutState::Unavailable,
        "forfeited by the purchase"
    );
    let o = overview(&mut c).await;
    assert_eq!(o.activation_state(), pb::ActivationState::Active);
    assert_eq!(in_use(&o, "user"), 2);
    assert_eq!(health(&server).await, [ServingStatus::Serving; 2]);
    server.shutdown().await;
}

#[tokio::test]
async fn redis_back_empty_is_restored_from_the_replica() {
    let mut redis = RedisServer::start();
    let (server, mut c, vendor, serial) = licensed_pbx(
        &redis,
        "empty",
        &[(Feature::User, 3), (Feature::CallAssist, 1)],
    )
    .await;
    assign(&mut c, "alice", "").await.unwrap();
    assign(&mut c, "bob", "").await.unwrap();
    assign(&mut c, "bob", "call_assist").await.unwrap();
    let before = list_seats(&mut c, "", 1000).await.unwrap();
    assert_eq!(before.len(), 3);

    redis.restart_empty();
    let restored = eventually(WAIT, || {
        let mut c = c.clone();
        async move {
            let ck = checked(&mut c, "alice", "").await;
            let listed = list_seats(&mut c, "", 1000)
                .await
                .map(|s| s.len())
                .unwrap_or(0);
            ck.licensed && !ck.stale && listed == 3
        }
    })
    .await;
    assert!(restored, "the replica never repaired the empty Redis");
    let after = list_seats(&mut c, "", 1000).await.unwrap();
    assert_eq!(users(&after), users(&before));
    assert_eq!(after, before, "seats keep their source and assigned_at");
    assert!(checked(&mut c, "bob", "call_assist").await.licensed);

    // Capacity counts the restored seats.
    assert!(assign(&mut c, "carol", "").await.unwrap().created);
    let err = assign(&mut c, "dave", "").await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    let info = err.get_details_error_info().expect("ErrorInfo");
    assert_eq!(info.metadata["capacity"], "3");
    assert_eq!(info.metadata["in_use"], "3");
    let err = assign(&mut c, "alice", "call_assist").await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(!assign(&mut c, "alice", "").await.unwrap().created);

    // The repaired Redis holds the license too: a replica without a license
    // source of its own trusts the stored document.
    let replica = TestServer::start(RawConfig {
        vendor_public_key: Some(vendor.public_key()),
        ..config(Some(&redis), &serial)
    })
    .await;
    let mut r = replica.client().await;
    let o = overview(&mut r).await;
    assert_eq!(o.activation_state(), pb::ActivationState::Active);
    assert_eq!(in_use(&o, "user"), 3);
    assert!(checked(&mut r, "alice", "").await.licensed);
    assert!(checked(&mut r, "carol", "").await.licensed);
    replica.shutdown().await;
    server.shutdown().await;
}

#[tokio::test]
async fn seats_survive_a_service_restart() {
    let redis = RedisServer::start();
    let (server, mut c, vendor, serial) =
        licensed_pbx(&redis, "restart", &[(Feature::User, 2)]).await;
    let alice = assign(&mut c, "alice", "").await.unwrap().seat.unwrap();
    assign(&mut c, "bob", "").await.unwrap();
    server.shutdown().await;

    let server = TestServer::start(licensed_config(Some(&redis), &serial, &vendor)).await;
    let mut c = server.client().await;
    let ck = checked(&mut c, "alice", "").await;
    assert!(ck.licensed && !ck.stale, "{ck:?}");
    let seats = list_seats(&mut c, "", 1000).await.unwrap();
    assert_eq!(
        users(&seats),
        [
            ("user".into(), "alice".into()),
            ("user".into(), "bob".into())
        ]
    );
    assert_eq!(seats[0], alice);
    let again = assign(&mut c, "alice", "").await.unwrap();
    assert!(!again.created);
    let err = assign(&mut c, "carol", "").await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted);
    let r = c
        .reconcile(pb::ReconcileRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.outcome(), pb::ReconcileOutcome::Unchanged);
    assert_eq!(in_use(&overview(&mut c).await, "user"), 2);
    server.shutdown().await;
}

#[tokio::test]
async fn service_starts_while_redis_is_down() {
    let port = unused_port();
    let vendor = Vendor::new();
    let serial = serial("nodb");
    vendor.write_license(&serial, Edition::Vm, Utc::now(), &[(Feature::User, 2)]);
    let config = RawConfig {
        redis_url: Some(format!("redis://127.0.0.1:{port}")),
        ..licensed_config(None, &serial, &vendor)
    };
    let server = TestServer::start_unsynced(config).await;
    let mut c = server.client().await;

    // It knows nothing yet: not a definite "not licensed", but no state and
    // out of the Service's endpoints.
    assert_eq!(health(&server).await, [ServingStatus::NotServing; 2]);
    let status = c
        .check_seat(pb::CheckSeatRequest {
            user_id: "alice".into(),
            feature: String::new(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert_eq!(
        status.get_details_error_info().map(|i| i.reason),
        Some("NO_STATE_YET".to_owned()),
        "{status:?}"
    );
    let (r, took) = timed(assign(&mut c, "alice", "")).await;
    assert_unavailable(r, took, "AssignSeat without Redis");
    let (r, took) = timed(list_seats(&mut c, "", 1000)).await;
    assert_unavailable(r, took, "ListSeats without Redis");
    let (r, took) = timed(c.start_tryout(pb::StartTryoutRequest {})).await;
    assert_unavailable(r, took, "StartTryout without Redis");
    let o = c
        .get_license_overview(pb::GetLicenseOverviewRequest::default())
        .await
        .unwrap_err();
    assert_eq!(o.code(), Code::Unavailable, "{o:?}");

    // Redis comes up: the replica initializes it, applies the license and
    // takes writes.
    let _redis = RedisServer::start_on(port);
    let ready = eventually(WAIT, || {
        let mut c = c.clone();
        async move {
            let checked = c
                .check_seat(pb::CheckSeatRequest {
                    user_id: "alice".into(),
                    feature: String::new(),
                    ..Default::default()
                })
                .await;
            checked.is_ok_and(|r| !r.into_inner().stale)
                && overview(&mut c).await.activation_state() == pb::ActivationState::Active
        }
    })
    .await;
    assert!(ready, "the replica never recovered once Redis came up");
    assert_eq!(health(&server).await, [ServingStatus::Serving; 2]);
    assert!(assign(&mut c, "alice", "").await.unwrap().created);
    assert!(checked(&mut c, "alice", "").await.licensed);
    server.shutdown().await;
}
