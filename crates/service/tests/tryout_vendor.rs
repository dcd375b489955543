//! The tryout anchored at the licensing server: with `licensing-sim` running as a
//! process and the service on a private Redis, `StartTryout` asks the licensing
//! server first. A store that lost its data does not give the tryout again, and a
//! licensing server that cannot be reached means `UNAVAILABLE`, not a silent start.
//! The answer is trusted only when it is signed with the vendor key for this
//! serial and this request, with times that make sense: a licensing server the
//! test runs in-process answers with forged, foreign, replayed, unsigned and
//! out-of-range answers, and nothing starts.

mod common;

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use common::*;
use comtrexx_licensing::config::{RawConfig, RawLicensingServer};
use comtrexx_licensing::domain::license::encode_public_key;
use comtrexx_licensing::domain::{SignedTryout, TryoutPayload};
use comtrexx_licensing::grpc::pb;
use comtrexx_licensing::grpc::vendor_pb as vpb;
use comtrexx_licensing::grpc::vendor_pb::vendor_licensing_service_server::{
    VendorLicensingService, VendorLicensingServiceServer,
};
use comtrexx_licensing::upstream::grpc::{from_timestamp, timestamp};
use comtrexx_licensing_test_support::vendor::{self, set_fault};
use ed25519_dalek::SigningKey;
use tonic::{Code, Request, Response, Status};
use tonic_types::StatusExt as _;

/// Upper bound for anything the tests wait for.
const WAIT: Duration = Duration::from_secs(10);

/// The tryout's length the licensing server grants (and the service's default).
const TRYOUT_DAYS: i64 = 14;

fn sim_url(sim: &SimProcess) -> String {
    format!("http://127.0.0.1:{}", sim.port)
}

/// A service config on `redis` whose licensing server is at `url` (plain http,
/// so a development installation) and signs with `public_key`.
fn server_config(redis: &RedisServer, url: String, public_key: String, serial: &str) -> RawConfig {
    RawConfig {
        edition: "vm".into(),
        vendor_public_key: Some(public_key),
        licensing_server: RawLicensingServer {
            url: Some(url),
            ca_file: None,
            timeout_ms: 1000,
        },
        development_installation: true,
        ..config(Some(redis), serial)
    }
}

/// A service config on `redis` whose licensing server is `sim`.
fn vendor_config(redis: &RedisServer, sim: &SimProcess, serial: &str) -> RawConfig {
    server_config(redis, sim_url(sim), sim.public_key.clone(), serial)
}

/// The tryout record in the store, if any.
fn stored_tryout(redis: &RedisServer, serial: &str) -> Option<String> {
    redis::cmd("GET")
        .arg(format!("lic:{{{serial}}}:tryout"))
        .query(&mut redis.connection())
        .unwrap()
}

/// Asserts that `StartTryout` is refused as an answer that is not trusted, and
/// that nothing started, in the service or in the store.
async fn assert_not_confirmed(c: &mut Client, redis: &RedisServer, serial: &str, what: &str) {
    let err = start_tryout(c).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{what}: {err:?}");
    assert_eq!(
        err.get_details_error_info().expect("ErrorInfo").reason,
        "TRYOUT_NOT_CONFIRMED",
        "{what}: {err:?}"
    );
    assert_eq!(
        tryout(c).await.state(),
        pb::TryoutState::Available,
        "{what}"
    );
    assert_eq!(stored_tryout(redis, serial), None, "{what}");
}

/// How the in-process licensing server answers `StartTryout`.
#[derive(Debug, Clone, Copy)]
enum Answer {
    /// The start asked for, signed with the vendor key for this request.
    Honest,
    /// Signed right, but starting at this time (and ending 14 days later, or at
    /// the end of the representable range).
    StartsAt(DateTime<Utc>),
    /// Signed with a key other than the vendor's.
    ForeignKey,
    /// Signed for another serial number.
    OtherSerial,
    /// A genuine answer to the previous request, sent again (its nonce).
    Replayed,
    /// The older protocol: no signed record, only the unsigned fields.
    Unsigned,
}

/// A licensing server such as a licensee could point `licensing_server.url` at:
/// it answers `StartTryout` as the test says, with the unsigned fields always
/// claiming the start it signs and `recorded`.
#[derive(Clone)]
struct FakeVendor {
    key: SigningKey,
    answer: Arc<parking_lot::Mutex<Answer>>,
    /// The nonce of the previous request: what a replayed answer carries.
    last_nonce: Arc<parking_lot::Mutex<String>>,
}

impl FakeVendor {
    /// Serves on a port of its own until the test ends; returns it and its URL.
    async fn start(answer: Answer) -> (Self, String) {
        let fake = Self {
            key: SigningKey::from_bytes(&rand::random::<[u8; 32]>()),
            answer: Arc::new(parking_lot::Mutex::new(answer)),
            last_nonce: Arc::default(),
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let service = VendorLicensingServiceServer::new(fake.clone());
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        (fake, url)
    }

    fn public_key(&self) -> String {
        encode_public_key(&self.key.verifying_key())
    }

    fn set(&self, answer: Answer) {
        *self.answer.lock() = answer;
    }
}

#[tonic::async_trait]
impl VendorLicensingService for FakeVendor {
    async fn activate(
        &self,
        _: Request<vpb::ActivateRequest>,
    ) -> Result<Response<vpb::ActivateResponse>, Status> {
        Err(Status::unimplemented("tryout answers only"))
    }

    async fn fetch_license(
        &self,
        _: Request<vpb::FetchLicenseRequest>,
    ) -> Result<Response<vpb::FetchLicenseResponse>, Status> {
        Err(Status::unimplemented("tryout answers only"))
    }

    async fn report_tryout(
        &self,
        _: Request<vpb::ReportTryoutRequest>,
    ) -> Result<Response<vpb::ReportTryoutResponse>, Status> {
        Ok(Response::new(vpb::ReportTryoutResponse {}))
    }

    async fn start_tryout(
        &self,
        request: Request<vpb::StartTryoutRequest>,
    ) -> Result<Response<vpb::StartTryoutResponse>, Status> {
        let request = request.into_inner();
        let asked = request
            .started_at
            .as_ref()
            .and_then(from_timestamp)
            .expect("the service sends its start");
        let previous = std::mem::replace(&mut *self.last_nonce.lock(), request.nonce.clone());
        let days = chrono::Duration::days(TRYOUT_DAYS);
        let mut payload = TryoutPayload {
            serial_number: request.serial_number,
            nonce: request.nonce,
            started_at: asked,
            ends_at: asked + days,
            recorded: true,
        };
        let mut key = self.key.clone();
        let answer = *self.answer.lock();
        match answer {
            Answer::Honest | Answer::Unsigned => {}
            Answer::StartsAt(at) => {
                payload.started_at = at;
                payload.ends_at = at
                    .checked_add_signed(days)
                    .unwrap_or(DateTime::<Utc>::MAX_UTC);
            }
            Answer::ForeignKey => key = SigningKey::from_bytes(&rand::random::<[u8; 32]>()),
            Answer::OtherSerial => payload.serial_number = "ANOTHER-PBX".into(),
            Answer::Replayed => payload.nonce = previous,
        }
        let signed_tryout = match answer {
            Answer::Unsigned => String::new(),
            _ => SignedTryout::sign(&payload, &key).to_json(),
        };
        Ok(Response::new(vpb::StartTryoutResponse {
            started_at: Some(timestamp(payload.started_at)),
            recorded: true,
            signed_tryout,
        }))
    }
}

/// The service on a fresh Redis, asking a fake licensing server that answers
/// `answer` first.
async fn with_fake_vendor(
    tag: &str,
    answer: Answer,
) -> (RedisServer, FakeVendor, TestServer, Client, String) {
    let redis = RedisServer::start();
    let (fake, url) = FakeVendor::start(answer).await;
    let serial = serial(tag);
    let server = TestServer::start(server_config(&redis, url, fake.public_key(), &serial)).await;
    let client = server.client().await;
    (redis, fake, server, client, serial)
}

async fn register(sim: &SimProcess, serial: &str) {
    let mut admin = vendor::admin(sim_url(sim)).await;
    vendor::register(&mut admin, serial, vpb::Edition::Vm).await;
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
    assert_eq!(stored_tryout(&redis, &serial), None);

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

/// Asserts that the tryout is active and ends exactly 14 days after it started.
fn assert_fourteen_days(status: &pb::TryoutStatus) {
    assert_eq!(status.state(), pb::TryoutState::Active);
    let started = status.started_at.as_ref().and_then(from_timestamp).unwrap();
    let ends = status.ends_at.as_ref().and_then(from_timestamp).unwrap();
    assert_eq!(ends - started, chrono::Duration::days(TRYOUT_DAYS));
}

#[tokio::test]
async fn a_tryout_start_in_2100_from_the_licensing_server_is_refused() {
    let in_2100 = "2100-01-01T00:00:00Z".parse().unwrap();
    let (redis, _fake, _server, mut c, serial) =
        with_fake_vendor("tryout-2100", Answer::StartsAt(in_2100)).await;
    assert_not_confirmed(&mut c, &redis, &serial, "a start in 2100").await;
    // The operators see why, in the audit trail.
    let refused = audited(&c, 1, |e| {
        e.method == "StartTryout"
            && e.code == "FAILED_PRECONDITION"
            && e.detail.contains("ahead of this PBX's time")
    })
    .await;
    assert_eq!(refused.len(), 1, "{refused:?}");
}

#[tokio::test]
async fn a_tryout_start_at_the_end_of_time_is_refused_without_a_panic() {
    let (redis, fake, _server, mut c, serial) =
        with_fake_vendor("tryout-max", Answer::StartsAt(DateTime::<Utc>::MAX_UTC)).await;
    assert_not_confirmed(&mut c, &redis, &serial, "a start at the largest time").await;
    let long_ago = DateTime::<Utc>::MIN_UTC;
    fake.set(Answer::StartsAt(long_ago));
    assert_not_confirmed(&mut c, &redis, &serial, "a start at the smallest time").await;
    // The same service, still serving, starts the tryout from an honest answer.
    fake.set(Answer::Honest);
    let started = start_tryout(&mut c).await.expect("StartTryout");
    assert_fourteen_days(&started);
    assert!(stored_tryout(&redis, &serial).is_some());
}

#[tokio::test]
async fn a_forged_foreign_replayed_or_unsigned_tryout_answer_is_refused() {
    let (redis, fake, _server, mut c, serial) =
        with_fake_vendor("tryout-forged", Answer::ForeignKey).await;
    assert_not_confirmed(&mut c, &redis, &serial, "another key").await;
    for answer in [Answer::OtherSerial, Answer::Replayed, Answer::Unsigned] {
        fake.set(answer);
        assert_not_confirmed(&mut c, &redis, &serial, &format!("{answer:?}")).await;
    }
}

#[tokio::test]
async fn the_sims_signed_tryout_answer_starts_the_tryout_and_a_faulted_one_does_not() {
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let sim = SimProcess::start(&dir.path().join("sim"), &[]);
    let (faulted, honest) = (serial("tryout-faulted"), serial("tryout-signed"));
    register(&sim, &faulted).await;
    register(&sim, &honest).await;
    let a = TestServer::start(vendor_config(&redis, &sim, &faulted)).await;
    let mut ca = a.client().await;
    let mut admin = vendor::admin(sim_url(&sim)).await;
    for fault in [vpb::Fault::BadSignature, vpb::Fault::WrongSerial] {
        set_fault(&mut admin, fault).await;
        assert_not_confirmed(&mut ca, &redis, &faulted, &format!("{fault:?}")).await;
    }
    set_fault(&mut admin, vpb::Fault::None).await;
    // The simulator recorded the start asked for first (its record is
    // authoritative, whatever became of its answer): now signed properly, that
    // start is the one the store takes, and this start is refused as a used one.
    let err = start_tryout(&mut ca).await.unwrap_err();
    assert_eq!(
        err.get_details_error_info().expect("ErrorInfo").reason,
        "TRYOUT_NOT_AVAILABLE",
        "{err:?}"
    );
    assert_fourteen_days(&tryout(&mut ca).await);

    // A serial that never started: the signed answer starts it, 14 days.
    let b = TestServer::start(vendor_config(&redis, &sim, &honest)).await;
    let mut cb = b.client().await;
    let started = start_tryout(&mut cb).await.expect("StartTryout");
    assert_fourteen_days(&started);
    assert_eq!(tryout(&mut cb).await, started);
}
