//! A replica started while Redis is unreachable never answers a definite "not
//! licensed" from knowing nothing: without state it is NOT_SERVING (gRPC port and
//! metrics port) and its reads answer UNAVAILABLE/NO_STATE_YET; with a state file
//! from an earlier run (`state_dir`) it answers licensed users as before,
//! flagged stale, and the store's snapshot replaces that state once Redis is back.

mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use common::*;
use comtrexx_licensing::app::App;
use comtrexx_licensing::config::RawConfig;
use comtrexx_licensing::domain::{Edition, Feature, SystemClock};
use comtrexx_licensing::grpc::pb;
use tonic::Code;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_types::StatusExt as _;

const WAIT: Duration = Duration::from_secs(10);

/// The health of `""` and of the licensing service at `endpoint`.
async fn health(endpoint: String) -> [ServingStatus; 2] {
    let channel = tonic::transport::Channel::from_shared(endpoint)
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client = HealthClient::new(channel);
    let mut out = [ServingStatus::Unknown; 2];
    for (i, service) in ["", comtrexx_licensing::grpc::SERVICE_NAME]
        .into_iter()
        .enumerate()
    {
        let r = client
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .expect("health answers")
            .into_inner();
        out[i] = r.status();
    }
    out
}

/// Asserts UNAVAILABLE with `ErrorInfo.reason` NO_STATE_YET.
fn assert_no_state<T: std::fmt::Debug>(result: Result<T, tonic::Status>, what: &str) {
    let status = result.expect_err(&format!("{what}: expected NO_STATE_YET"));
    assert_eq!(status.code(), Code::Unavailable, "{what}: {status:?}");
    let info = status
        .get_details_error_info()
        .unwrap_or_else(|| panic!("{what}: no ErrorInfo in {status:?}"));
    assert_eq!(info.reason, "NO_STATE_YET", "{what}: {status:?}");
    assert!(status.message().contains("no state yet"), "{status:?}");
}

fn with_state_dir(config: RawConfig, dir: &Path) -> RawConfig {
    RawConfig {
        state_dir: Some(dir.to_owned()),
        ..config
    }
}

#[tokio::test]
async fn a_replica_started_without_redis_and_without_state_is_not_serving() {
    let port = unused_port();
    let vendor = Vendor::new();
    let serial = serial("cold");
    vendor.write_license(&serial, Edition::Vm, Utc::now(), &[(Feature::User, 2)]);
    let mut raw = RawConfig {
        redis_url: Some(format!("redis://127.0.0.1:{port}")),
        ..licensed_config(None, &serial, &vendor)
    };
    raw.listen_addr = "127.0.0.1:0".into();
    let config = raw.validate().unwrap();
    let app = App::build(&config, Arc::new(SystemClock)).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let metrics_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let metrics_addr = metrics_listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(app.run(listener, Some(metrics_listener), async {
        let _ = stopped.await;
    }));
    let endpoint = format!("http://{addr}");
    let mut c = Client::connect(endpoint.clone()).await.unwrap();

    assert_eq!(
        health(endpoint.clone()).await,
        [ServingStatus::NotServing; 2]
    );
    assert_eq!(
        health(format!("http://{metrics_addr}")).await,
        [ServingStatus::NotServing; 2]
    );
    assert_no_state(check(&mut c, "alice", "").await, "CheckSeat");
    assert_no_state(
        c.get_license_overview(pb::GetLicenseOverviewRequest::default())
            .await,
        "GetLicenseOverview",
    );
    assert_no_state(
        c.get_tryout_status(pb::GetTryoutStatusRequest::default())
            .await,
        "GetTryoutStatus",
    );
    let body = scrape(metrics_addr).await;
    assert!(
        body.contains("licensing_state_source{source=\"none\"} 1"),
        "{body}"
    );

    // Redis comes up: the replica reads it, says SERVING and answers.
    let _redis = RedisServer::start_on(port);
    let serving = eventually(WAIT, || {
        let endpoint = endpoint.clone();
        async move { health(endpoint).await == [ServingStatus::Serving; 2] }
    })
    .await;
    assert!(serving, "never SERVING once Redis came up");
    assert_eq!(
        health(format!("http://{metrics_addr}")).await,
        [ServingStatus::Serving; 2]
    );
    wait_active(&c).await;
    let ck = check(&mut c, "alice", "").await.unwrap();
    assert_eq!(ck.reason(), pb::SeatReason::NotAssigned, "{ck:?}");
    let body = scrape(metrics_addr).await;
    assert!(
        body.contains("licensing_state_source{source=\"store\"} 1"),
        "{body}"
    );
    let _ = stop.send(());
    task.await.unwrap().unwrap();
}

/// A Redis, a license of 2 users, and a replica with `state_dir` that ran
/// against them, assigned alice and stopped (its last state went to disk).
async fn ran_once(tag: &str) -> (RedisServer, Vendor, String, tempfile::TempDir, RawConfig) {
    let redis = RedisServer::start();
    let vendor = Vendor::new();
    let serial = serial(tag);
    vendor.write_license(&serial, Edition::Vm, Utc::now(), &[(Feature::User, 2)]);
    let dir = tempfile::tempdir().unwrap();
    let config = with_state_dir(licensed_config(Some(&redis), &serial, &vendor), dir.path());
    let server = TestServer::start(config.clone()).await;
    let mut c = server.client().await;
    wait_active(&c).await;
    c.assign_seat(pb::AssignSeatRequest {
        user_id: "alice".into(),
        feature: String::new(),
    })
    .await
    .expect("AssignSeat");
    server.shutdown().await;
    assert!(dir.path().join("state.json").is_file());
    (redis, vendor, serial, dir, config)
}

#[tokio::test]
async fn a_replica_restarted_during_an_outage_answers_from_its_state_dir() {
    let (mut redis, vendor, serial, _dir, config) = ran_once("warm").await;
    let with_dir = || config.clone();

    // While it is stopped the store moves on (another replica, no state_dir):
    // alice released, bob assigned. Then Redis goes down.
    let other = TestServer::start(licensed_config(Some(&redis), &serial, &vendor)).await;
    let mut o = other.client().await;
    o.release_seat(pb::ReleaseSeatRequest {
        user_id: "alice".into(),
        feature: String::new(),
    })
    .await
    .unwrap();
    o.assign_seat(pb::AssignSeatRequest {
        user_id: "bob".into(),
        feature: String::new(),
    })
    .await
    .unwrap();
    other.shutdown().await;
    let saved = redis.save_snapshot();
    redis.kill();

    // Restarted during the outage: the last known state, flagged stale.
    let server = TestServer::start_unsynced(with_dir()).await;
    let mut c = server.client().await;
    assert_eq!(health(server.endpoint()).await, [ServingStatus::Serving; 2]);
    let ck = check(&mut c, "alice", "").await.unwrap();
    assert!(ck.licensed && ck.stale, "{ck:?}");
    let ck = check(&mut c, "bob", "").await.unwrap();
    assert!(!ck.licensed && ck.stale, "{ck:?}");
    let o = overview(&mut c).await;
    assert_eq!(o.activation_state(), pb::ActivationState::Active);

    // Redis back: the store's state replaces the disk's, nothing written back.
    redis.restart_from(&saved);
    let converged = eventually(WAIT, || {
        let mut c = c.clone();
        async move {
            let bob = check(&mut c, "bob", "").await.unwrap();
            let alice = check(&mut c, "alice", "").await.unwrap();
            bob.licensed && !bob.stale && alice.reason() == pb::SeatReason::NotAssigned
        }
    })
    .await;
    assert!(
        converged,
        "never converged to the store once Redis was back"
    );
    let seats = c
        .list_seats(pb::ListSeatsRequest {
            feature: String::new(),
            page_size: 10,
            page_token: String::new(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .seats;
    let users: Vec<_> = seats.iter().map(|s| s.user_id.as_str()).collect();
    assert_eq!(users, ["bob"], "the disk state must not be written back");
    assert!(overview(&mut c).await.writes_lost == 0);
    server.shutdown().await;
}

#[tokio::test]
async fn a_corrupt_or_truncated_state_file_is_ignored() {
    let (mut redis, _vendor, _serial, dir, config) = ran_once("torn").await;
    let with_dir = || config.clone();
    let file = dir.path().join("state.json");
    let good = std::fs::read(&file).unwrap();
    redis.kill();

    let truncated = good[..good.len() - 7].to_vec();
    let mut flipped = good.clone();
    let at = good.len() / 2 + good.len() / 4;
    flipped[at] = if flipped[at] == b'1' { b'2' } else { b'1' };
    for (what, bytes) in [("truncated", truncated), ("corrupt", flipped)] {
        std::fs::write(&file, &bytes).unwrap();
        let server = TestServer::start_unsynced(with_dir()).await;
        let mut c = server.client().await;
        assert_eq!(
            health(server.endpoint()).await,
            [ServingStatus::NotServing; 2],
            "{what}"
        );
        let status = check(&mut c, "alice", "").await.unwrap_err();
        assert!(
            status.message().contains("state file ignored"),
            "{what}: {status:?}"
        );
        assert_no_state(Err::<(), _>(status), what);
        server.shutdown().await;
        // Still the bytes it was given: nothing without state is written.
        assert_eq!(std::fs::read(&file).unwrap(), bytes, "{what}");
    }

    // The good file again: answers from it.
    std::fs::write(&file, &good).unwrap();
    let server = TestServer::start_unsynced(with_dir()).await;
    let mut c = server.client().await;
    let ck = check(&mut c, "alice", "").await.unwrap();
    assert!(ck.licensed && ck.stale, "{ck:?}");
    server.shutdown().await;
}
