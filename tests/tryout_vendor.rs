//! The tryout anchored at the licensing server: with `licensing-sim` running as a
//! process and the service on a private Redis, `StartTryout` asks the licensing
//! server first. A store that lost its data does not give the tryout again, and a
//! licensing server that cannot be reached means `UNAVAILABLE`, not a silent start.

mod common;

use std::time::Duration;

use common::*;
use comtrexx_licensing::config::{RawConfig, RawLicensingServer};
use comtrexx_licensing::grpc::pb;
use comtrexx_licensing::grpc::vendor_pb as vpb;
use comtrexx_licensing::grpc::vendor_pb::vendor_admin_service_client::VendorAdminServiceClient;
use tonic::Code;

/// Upper bound for anything the tests wait for.
const WAIT: Duration = Duration::from_secs(10);

fn sim_url(sim: &SimProcess) -> String {
    format!("http://127.0.0.1:{}", sim.port)
}

/// A service config on `redis` whose licensing server is `sim`.
fn vendor_config(redis: &RedisServer, sim: &SimProcess, serial: &str) -> RawConfig {
    RawConfig {
        edition: "vm".into(),
        vendor_public_key: Some(sim.public_key.clone()),
        licensing_server: RawLicensingServer {
            url: Some(sim_url(sim)),
            ca_file: None,
            timeout_ms: 1000,
        },
        ..config(Some(redis), serial)
    }
}

async fn register(sim: &SimProcess, serial: &str) {
    VendorAdminServiceClient::connect(sim_url(sim))
        .await
        .unwrap()
        .register_device(vpb::RegisterDeviceRequest {
            serial_number: serial.into(),
            name: format!("PBX {serial}"),
            edition: vpb::Edition::Vm as i32,
        })
        .await
        .expect("RegisterDevice");
}

#[tokio::test]
async fn the_tryout_is_refused_after_redis_is_flushed_and_the_replicas_restart() {
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let sim = SimProcess::start(&dir.path().join("sim"), &[]);
    let serial = serial("tryout-flush");
    register(&sim, &serial).await;
    let config = vendor_config(&redis, &sim, &serial);

    let a = TestServer::start(config.clone()).await;
    let b = TestServer::start(config.clone()).await;
    let started = start_tryout(&mut a.client().await)
        .await
        .expect("StartTryout");
    assert_eq!(started.state(), pb::TryoutState::Active);
    let first_start = started.started_at;
    let mut cb = b.client().await;
    assert!(
        eventually(WAIT, || {
            let mut cb = cb.clone();
            async move { tryout(&mut cb).await.state() == pb::TryoutState::Active }
        })
        .await
    );
    // A second start, on either replica, is refused by the store's own record.
    assert_eq!(
        start_tryout(&mut cb).await.unwrap_err().code(),
        Code::FailedPrecondition
    );

    // Redis loses everything; both replicas restart.
    a.shutdown().await;
    b.shutdown().await;
    let _: () = redis::cmd("FLUSHALL")
        .query(&mut redis.connection())
        .unwrap();
    let a = TestServer::start(config.clone()).await;
    let b = TestServer::start(config).await;
    let (mut ca, mut cb) = (a.client().await, b.client().await);

    // The licensing server remembers: refused, every time, and the store takes its
    // record back, so both replicas show the tryout that was started first.
    assert!(
        eventually(WAIT, || {
            let (mut ca, mut cb) = (ca.clone(), cb.clone());
            async move {
                assert_eq!(
                    start_tryout(&mut ca).await.unwrap_err().code(),
                    Code::FailedPrecondition
                );
                let seen = tryout(&mut cb).await;
                seen.state() == pb::TryoutState::Active && seen.started_at == first_start
            }
        })
        .await,
        "the licensing server's tryout record did not come back"
    );
    assert_eq!(
        start_tryout(&mut cb).await.unwrap_err().code(),
        Code::FailedPrecondition
    );
    assert_eq!(tryout(&mut ca).await.started_at, first_start);
}

#[tokio::test]
async fn the_tryout_does_not_start_while_the_licensing_server_is_down() {
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let mut sim = SimProcess::start(&dir.path().join("sim"), &[]);
    let serial = serial("tryout-down");
    register(&sim, &serial).await;
    let server = TestServer::start(vendor_config(&redis, &sim, &serial)).await;
    let mut c = server.client().await;

    sim.kill();
    assert_eq!(
        start_tryout(&mut c).await.unwrap_err().code(),
        Code::Unavailable
    );
    // Nothing was started, here or in the store.
    assert_eq!(tryout(&mut c).await.state(), pb::TryoutState::Available);
    let stored: Option<String> = redis::cmd("GET")
        .arg(format!("lic:{{{serial}}}:tryout"))
        .query(&mut redis.connection())
        .unwrap();
    assert_eq!(stored, None);

    // Back: the start goes through, once.
    sim.restart();
    let started = start_tryout(&mut c).await.expect("StartTryout");
    assert_eq!(started.state(), pb::TryoutState::Active);
    assert_eq!(
        start_tryout(&mut c).await.unwrap_err().code(),
        Code::FailedPrecondition
    );
}

#[tokio::test]
async fn a_serial_the_licensing_server_does_not_know_gets_no_tryout() {
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let sim = SimProcess::start(&dir.path().join("sim"), &[]);
    let serial = serial("tryout-unknown");
    let server = TestServer::start(vendor_config(&redis, &sim, &serial)).await;
    let mut c = server.client().await;
    assert_eq!(
        start_tryout(&mut c).await.unwrap_err().code(),
        Code::FailedPrecondition
    );
    assert_eq!(tryout(&mut c).await.state(), pb::TryoutState::Available);
}
