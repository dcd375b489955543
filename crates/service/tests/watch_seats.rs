//! `WatchSeats` over real gRPC, on real Redis: a snapshot, then every change
//! in version order; resuming by version (changes kept, or a snapshot); a
//! snapshot after a replica re-read the store, and for a consumer that fell
//! behind; roles; the end at drain; an idle stream outliving every idle and
//! age policy of the server; and a local copy built from the stream deciding
//! `CheckSeat` exactly like the server, for every user.

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use chrono::{DateTime, TimeZone, Utc};
use common::*;
use comtrexx_licensing::config::RawConfig;
use comtrexx_licensing::domain::license::parse_public_key;
use comtrexx_licensing::domain::tryout::{TryoutEnd, TryoutEndReason};
use comtrexx_licensing::domain::{
    AppliedLicense, Edition, Feature, LapseAction, LicenseState, ReconcileOutcome, ReconcileStatus,
    Rules, Seat, SeatSource, SignedLicense, TryoutPolicy, TryoutRecord, UserId,
};
use comtrexx_licensing::grpc::pb;
use comtrexx_licensing::grpc::pb::licensing_service_client::LicensingServiceClient;
use pb::seat_state_change::Kind as ChangeKind;
use pb::watch_seats_response::Kind;
use tonic::transport::Endpoint;
use tonic::{Code, Streaming};

const WAIT: Duration = Duration::from_secs(10);

type Watch = Streaming<pb::WatchSeatsResponse>;

async fn watch(c: &mut Client, since_version: u64) -> Watch {
    c.watch_seats(pb::WatchSeatsRequest {
        since_version,
        ..Default::default()
    })
    .await
    .expect("WatchSeats")
    .into_inner()
}

/// The next message, within `WAIT`.
async fn next(stream: &mut Watch) -> pb::WatchSeatsResponse {
    tokio::time::timeout(WAIT, stream.message())
        .await
        .expect("a message in time")
        .expect("the stream goes on")
        .expect("the stream is not over")
}

/// The next message that is not a heartbeat.
async fn next_news(stream: &mut Watch) -> pb::WatchSeatsResponse {
    loop {
        let m = next(stream).await;
        if !matches!(m.kind, Some(Kind::Heartbeat(_))) {
            return m;
        }
    }
}

fn ts(t: &Option<prost_types::Timestamp>) -> Option<DateTime<Utc>> {
    t.as_ref()
        .and_then(|t| Utc.timestamp_opt(t.seconds, t.nanos as u32).single())
}

/// A caller's local copy, built from the stream only, deciding with the
/// domain's own code (`Rules::check_seat`), as the client library will.
struct Model {
    vendor_key: ed25519_dalek::VerifyingKey,
    serial: String,
    version: u64,
    rules: Option<Rules>,
    seats: HashMap<(Feature, String), Seat>,
    license: Option<AppliedLicense>,
    tryout: Option<TryoutRecord>,
    reconcile: ReconcileStatus,
    /// The server's reference time and when it was read (advanced by the
    /// monotonic clock).
    reference: Option<(DateTime<Utc>, Instant)>,
    snapshots: usize,
    /// Every change's version, in the order applied.
    changes: Vec<u64>,
}

impl Model {
    fn new(vendor: Option<&Vendor>, serial: &str) -> Self {
        let key = vendor.map_or_else(
            || ed25519_dalek::SigningKey::from_bytes(&[7; 32]).verifying_key(),
            |v| parse_public_key(&v.public_key()).unwrap(),
        );
        Self {
            vendor_key: key,
            serial: serial.into(),
            version: 0,
            rules: None,
            seats: HashMap::new(),
            license: None,
            tryout: None,
            reconcile: ReconcileStatus::default(),
            reference: None,
            snapshots: 0,
            changes: Vec::new(),
        }
    }

    fn apply(&mut self, m: &pb::WatchSeatsResponse) {
        match m.kind.as_ref().expect("a kind") {
            Kind::Snapshot(s) => {
                let r = s.rules.as_ref().expect("rules");
                assert_eq!(s.serial_number, self.serial);
                self.rules = Some(Rules {
                    edition: match r.edition() {
                        pb::Edition::Business => Edition::Business,
                        pb::Edition::Advanced => Edition::Advanced,
                        _ => Edition::Vm,
                    },
                    tryout: TryoutPolicy {
                        days: r.tryout_days,
                        seats: r.tryout_seats,
                    },
                    over_capacity_grace: chrono::Duration::seconds(r.over_capacity_grace_seconds),
                    grace: chrono::Duration::seconds(r.grace_seconds),
                    lapse_action: match r.lapse_action() {
                        pb::LapseAction::Reset => LapseAction::Reset,
                        _ => LapseAction::DenyNew,
                    },
                    has_license_source: r.has_license_source,
                });
                self.seats = s.seats.iter().map(|w| self.seat(w)).collect();
                self.license = s.license.as_ref().map(|l| self.license(l));
                self.tryout = s.tryout.as_ref().map(tryout);
                self.reconcile = reconcile(s.reconcile.as_ref().expect("reconcile"));
                self.reference = Some((ts(&s.reference_time).unwrap(), Instant::now()));
                self.snapshots += 1;
            }
            Kind::Change(c) => {
                assert_eq!(
                    m.version,
                    self.version + 1,
                    "changes come one version at a time"
                );
                self.changes.push(m.version);
                match c.kind.as_ref().expect("a change kind") {
                    ChangeKind::SeatPut(w) => {
                        let (key, seat) = self.seat(w);
                        self.seats.insert(key, seat);
                    }
                    ChangeKind::SeatRemoved(r) => {
                        self.seats
                            .remove(&(r.feature.parse().unwrap(), r.user_id.clone()));
                    }
                    ChangeKind::LicenseApplied(l) => self.license = Some(self.license(l)),
                    ChangeKind::LicenseRemoved(_) => self.license = None,
                    ChangeKind::TryoutChanged(t) => self.tryout = Some(tryout(t)),
                    ChangeKind::ReconcileRecorded(r) => self.reconcile = reconcile(r),
                    ChangeKind::Reset(_) => {
                        self.seats.clear();
                        self.license = None;
                        self.reconcile = ReconcileStatus::default();
                    }
                    // Leases decide only concurrent features (none here).
                    ChangeKind::Other(_)
                    | ChangeKind::LeasePut(_)
                    | ChangeKind::LeasesRenewed(_)
                    | ChangeKind::LeaseReleased(_) => {}
                }
            }
            Kind::Heartbeat(h) => {
                assert_eq!(m.version, self.version, "a heartbeat repeats the version");
                self.reference = Some((ts(&h.reference_time).unwrap(), Instant::now()));
            }
        }
        self.version = m.version;
    }

    fn seat(&self, w: &pb::WatchedSeat) -> ((Feature, String), Seat) {
        let feature: Feature = w.feature.parse().unwrap();
        let seat = Seat {
            user_id: UserId::parse(&w.user_id).unwrap(),
            feature,
            source: match w.source() {
                pb::SeatSource::Tryout => SeatSource::Tryout,
                _ => SeatSource::Purchased,
            },
            assigned_at: ts(&w.assigned_at).unwrap(),
            over_capacity_since: ts(&w.over_capacity_since),
        };
        ((feature, w.user_id.clone()), seat)
    }

    /// A Rust caller verifies the document again with the vendor's key.
    fn license(&self, l: &pb::LicenseDocument) -> AppliedLicense {
        let signed = SignedLicense {
            format: l.format.clone(),
            payload: l.payload.clone(),
            signature: l.signature.clone(),
        };
        let serial = comtrexx_licensing::domain::SerialNumber::parse(&self.serial).unwrap();
        let payload = signed
            .verify(&self.vendor_key, &serial, Edition::Vm)
            .expect("the streamed license verifies");
        AppliedLicense {
            signed,
            payload,
            applied_at: ts(&l.applied_at).unwrap(),
        }
    }

    /// The local decision now: the reference time advanced by the monotonic clock.
    fn check(&self, user: &str, feature: Feature) -> (bool, i32) {
        let (reference, read_at) = self.reference.expect("a reference time");
        let now = reference + chrono::Duration::from_std(read_at.elapsed()).unwrap();
        let state = LicenseState {
            license: self.license.as_ref(),
            tryout: self.tryout.as_ref(),
            reconcile: &self.reconcile,
        };
        let seat = self.seats.get(&(feature, user.to_owned()));
        let check = self
            .rules
            .expect("rules")
            .check_seat(&state, feature, seat, now);
        let reason = match check.reason {
            comtrexx_licensing::domain::SeatReason::Assigned => pb::SeatReason::Assigned,
            comtrexx_licensing::domain::SeatReason::NotAssigned => pb::SeatReason::NotAssigned,
            comtrexx_licensing::domain::SeatReason::TryoutOver => pb::SeatReason::TryoutOver,
            comtrexx_licensing::domain::SeatReason::NotActivated => pb::SeatReason::NotActivated,
            comtrexx_licensing::domain::SeatReason::OverCapacity => pb::SeatReason::OverCapacity,
            comtrexx_licensing::domain::SeatReason::LicenseLapsed => pb::SeatReason::LicenseLapsed,
            comtrexx_licensing::domain::SeatReason::NoLease => pb::SeatReason::NoLease,
        };
        (check.licensed, reason as i32)
    }

    /// Reads the stream until the model reaches `version`.
    async fn follow_to(&mut self, stream: &mut Watch, version: u64) {
        while self.version < version || self.rules.is_none() {
            let m = next(stream).await;
            self.apply(&m);
        }
    }

    /// Every user decides locally as the server does.
    async fn agrees_with(&self, c: &mut Client, users: &[&str]) {
        for user in users {
            for feature in [Feature::User, Feature::CallAssist] {
                let server = checked(c, user, feature.as_str()).await;
                assert_eq!(
                    self.check(user, feature),
                    (server.licensed, server.reason),
                    "{user}/{feature}: local copy and server disagree"
                );
            }
        }
    }
}

fn tryout(t: &pb::TryoutRecord) -> TryoutRecord {
    if let Some(at) = ts(&t.forfeited_at) {
        return TryoutRecord::Forfeited { at };
    }
    TryoutRecord::Started {
        started_at: ts(&t.started_at).unwrap(),
        ends_at: ts(&t.ends_at).unwrap(),
        ended: ts(&t.ended_at).map(|at| TryoutEnd {
            at,
            reason: match t.end_reason() {
                pb::TryoutEndReason::Purchased => TryoutEndReason::Purchased,
                _ => TryoutEndReason::Operator,
            },
        }),
    }
}

fn reconcile(r: &pb::ReconcileRecord) -> ReconcileStatus {
    ReconcileStatus {
        last_success_at: ts(&r.last_success_at),
        last_attempt_at: ts(&r.last_attempt_at),
        last_outcome: match r.last_outcome() {
            pb::ReconcileOutcome::Updated => Some(ReconcileOutcome::Updated),
            pb::ReconcileOutcome::Unchanged => Some(ReconcileOutcome::Unchanged),
            pb::ReconcileOutcome::Unreachable => Some(ReconcileOutcome::Unreachable),
            pb::ReconcileOutcome::Rejected => Some(ReconcileOutcome::Rejected),
            pb::ReconcileOutcome::Unspecified => None,
        },
        last_error: (!r.last_error.is_empty()).then(|| r.last_error.clone()),
        next_reconcile_at: ts(&r.next_reconcile_at),
    }
}

/// The version the server's copy is at.
fn version_of(server: &TestServer) -> u64 {
    server
        .app_parts
        .as_ref()
        .unwrap()
        .mirror
        .read(|s| s.position.as_ref().map_or(0, |p| p.version))
}

fn licensed(redis: &RedisServer, tag: &str, users: u32) -> (RawConfig, Vendor, String) {
    let vendor = Vendor::new();
    let serial = serial(tag);
    vendor.write_license(
        &serial,
        Edition::Vm,
        Utc::now() - chrono::Duration::hours(1),
        &[(Feature::User, users), (Feature::CallAssist, 2)],
    );
    let config = without_load_limits(licensed_config(Some(redis), &serial, &vendor));
    (config, vendor, serial)
}

const USERS: [&str; 8] = ["ann", "bob", "cy", "dee", "eve", "fay", "gus", "hal"];

/// A tryout PBX: a stream from 0 gets a snapshot, then every change of the
/// tryout and its seats in version order with no gap; its copy decides like
/// the server at each step; a stream resumed from a version in the middle
/// gets exactly the later changes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_is_a_snapshot_then_every_change_and_decides_like_the_server() {
    let redis = RedisServer::start();
    let serial = serial("watch-tryout");
    let server = TestServer::start(without_load_limits(config(Some(&redis), &serial))).await;
    let mut c = server.client().await;
    let mut stream = watch(&mut c, 0).await;
    let mut model = Model::new(None, &serial);
    let first = next(&mut stream).await;
    assert!(matches!(first.kind, Some(Kind::Snapshot(_))), "{first:?}");
    model.apply(&first);
    model.agrees_with(&mut c, &USERS).await;

    start_tryout(&mut c).await.expect("tryout starts");
    model.follow_to(&mut stream, version_of(&server)).await;
    model.agrees_with(&mut c, &USERS).await;
    for user in &USERS[..3] {
        assigned(&mut c, user, "user").await;
    }
    assert!(released(&mut c, "bob", "user").await);
    assigned(&mut c, "dee", "user").await;
    model.follow_to(&mut stream, version_of(&server)).await;
    model.agrees_with(&mut c, &USERS).await;
    let middle = model.version;
    let after_middle_from = model.changes.len();

    end_tryout(&mut c).await.expect("tryout ends");
    assert!(released(&mut c, "ann", "user").await);
    let end = version_of(&server);
    model.follow_to(&mut stream, end).await;
    model.agrees_with(&mut c, &USERS).await;
    assert_eq!(model.snapshots, 1, "one snapshot, then changes only");
    // No gap, no repeat: every version from the snapshot's on.
    let first_change = model.changes[0];
    let expected: Vec<u64> = (first_change..=end).collect();
    assert_eq!(model.changes, expected);

    // Resumed in the middle: exactly the changes after it, no snapshot.
    let mut resumed = watch(&mut c, middle).await;
    let mut seen = Vec::new();
    while seen.last().is_none_or(|v| *v < end) {
        let m = next_news(&mut resumed).await;
        assert!(matches!(m.kind, Some(Kind::Change(_))), "{m:?}");
        seen.push(m.version);
    }
    assert_eq!(seen, model.changes[after_middle_from..].to_vec());
    // Resumed at the current version: a heartbeat at it, nothing else.
    let mut current = watch(&mut c, end).await;
    let m = next(&mut current).await;
    assert!(matches!(m.kind, Some(Kind::Heartbeat(_))), "{m:?}");
    assert_eq!(m.version, end);
}

/// A licensed PBX over two replicas: writes on A reach a stream on B in
/// order; a version older than B's journal (B started later) gets a
/// snapshot; a copy that re-reads the store (Redis flushed and restored)
/// sends a snapshot; the local copy keeps deciding like the server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resuming_past_the_journal_or_after_a_resync_sends_a_snapshot() {
    let redis = RedisServer::start();
    let (config, vendor, serial) = licensed(&redis, "watch-pair", 5);
    let a = TestServer::start(config.clone()).await;
    let mut ca = a.client().await;
    wait_active(&ca).await;
    for user in &USERS[..4] {
        assigned(&mut ca, user, "user").await;
    }
    assigned(&mut ca, "ann", "call_assist").await;
    let b = TestServer::start(config).await;
    let mut cb = b.client().await;
    wait_active(&cb).await;
    let at_b = version_of(&a);
    assert!(
        eventually(WAIT, || {
            let v = version_of(&b);
            async move { v >= at_b }
        })
        .await
    );

    // B's journal starts at its first snapshot: version 1 is beyond it.
    let mut stream = watch(&mut cb, 1).await;
    let mut model = Model::new(Some(&vendor), &serial);
    let first = next(&mut stream).await;
    assert!(matches!(first.kind, Some(Kind::Snapshot(_))), "{first:?}");
    model.apply(&first);
    assert!(model.license.is_some(), "the snapshot carries the license");
    model.agrees_with(&mut cb, &USERS).await;

    // Writes on A, in order on B.
    assigned(&mut ca, "eve", "user").await;
    assert!(released(&mut ca, "bob", "user").await);
    model.follow_to(&mut stream, version_of(&a)).await;
    model.agrees_with(&mut cb, &USERS).await;
    assert_eq!(model.snapshots, 1);

    // A resume names the epoch its version counts in: the store's own
    // continues with the changes, another one (a store re-created since)
    // starts again with a snapshot.
    let Some(Kind::Snapshot(first)) = &first.kind else {
        unreachable!()
    };
    let resume = |since_epoch: &str| pb::WatchSeatsRequest {
        since_version: model.version - 1,
        since_epoch: since_epoch.to_owned(),
        ..Default::default()
    };
    let mut same = cb
        .watch_seats(resume(&first.epoch))
        .await
        .unwrap()
        .into_inner();
    let m = next(&mut same).await;
    assert!(
        matches!(m.kind, Some(Kind::Change(_))) && m.version == model.version,
        "{m:?}"
    );
    let mut other = cb
        .watch_seats(resume("another-epoch"))
        .await
        .unwrap()
        .into_inner();
    let m = next(&mut other).await;
    assert!(matches!(m.kind, Some(Kind::Snapshot(_))), "{m:?}");
    drop((same, other));

    // Redis loses everything: the replicas restore it and re-read it; the
    // stream gets a new snapshot, and the copy still decides like B.
    redis.flushall();
    let snapshots = model.snapshots;
    let deadline = Instant::now() + WAIT;
    while model.snapshots == snapshots {
        assert!(
            Instant::now() < deadline,
            "no snapshot after the store was re-read"
        );
        let m = next(&mut stream).await;
        model.apply(&m);
    }
    assert!(
        eventually(WAIT, || {
            let mut cb = cb.clone();
            async move { checked(&mut cb, "ann", "user").await.licensed }
        })
        .await
    );
    model.follow_to(&mut stream, version_of(&b)).await;
    model.agrees_with(&mut cb, &USERS).await;
}

/// A consumer that stops reading is not buffered for: once it is more than
/// the broadcast's length behind, it gets a snapshot at the current version
/// when it reads again, and the changes after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_that_stops_reading_gets_a_snapshot_instead_of_a_backlog() {
    let redis = RedisServer::start();
    let (config, vendor, serial) = licensed(&redis, "watch-slow", 50);
    let server = TestServer::start(config).await;
    let mut c = server.client().await;
    wait_active(&c).await;
    // The smallest stream window: the transport buffers little of the
    // backlog, and flow control stops the server before the client's own
    // limit on buffered small DATA frames (half the connection window) is hit.
    let channel = Endpoint::from_shared(server.endpoint())
        .unwrap()
        .initial_stream_window_size(Some(65_535))
        .initial_connection_window_size(Some(1 << 20))
        .connect()
        .await
        .unwrap();
    let mut slow_client = LicensingServiceClient::new(channel);
    let mut slow = watch(&mut slow_client, 0).await;
    let mut model = Model::new(Some(&vendor), &serial);
    model.apply(&next(&mut slow).await);

    // Far more changes than the broadcast keeps, from 8 writers at once.
    let per_writer = 200;
    let mut writers = Vec::new();
    for w in 0..8 {
        let mut c = c.clone();
        writers.push(tokio::spawn(async move {
            let user = format!("writer-{w}");
            for _ in 0..per_writer {
                assigned(&mut c, &user, "user").await;
                assert!(released(&mut c, &user, "user").await);
            }
        }));
    }
    for w in writers {
        w.await.unwrap();
    }
    assigned(&mut c, "last", "user").await;
    let end = version_of(&server);
    assert!(end > 3000, "{end}");

    model.follow_to(&mut slow, end).await;
    assert!(
        model.snapshots >= 2,
        "the backlog was not replaced by a snapshot"
    );
    assert!(
        model.changes.len() < 3000,
        "{} changes were buffered for a consumer that did not read",
        model.changes.len()
    );
    model
        .agrees_with(&mut c, &["last", "writer-0", "nobody"])
        .await;
}

/// Only call handling, user management and operators may watch; the
/// features filter refuses unknown names like any request field.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn roles_and_features_are_checked() {
    let dir = tempfile::tempdir().unwrap();
    let mut raw = config(None, &serial("watch-roles"));
    raw.auth.mode = "enforce".into();
    raw.auth.callers_file = Some(token_callers_file(
        dir.path(),
        &[
            ("pbx", "call_handling", "t-call"),
            ("um", "user_management", "t-um"),
            ("mon", "monitoring", "t-mon"),
            ("op", "operator", "t-op"),
        ],
    ));
    let server = TestServer::start(raw).await;
    let mut c = server.client().await;
    let request = |token: &str, features: Vec<String>| {
        with_token(
            pb::WatchSeatsRequest {
                since_version: 0,
                features,
                ..Default::default()
            },
            token,
        )
    };
    for token in ["t-call", "t-um", "t-op"] {
        let mut stream = c
            .watch_seats(request(token, vec!["user".into()]))
            .await
            .unwrap_or_else(|e| panic!("{token}: {e:?}"))
            .into_inner();
        let m = next(&mut stream).await;
        assert!(matches!(m.kind, Some(Kind::Snapshot(_))), "{token}");
    }
    let denied = c.watch_seats(request("t-mon", vec![])).await.unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied);
    let none = c
        .watch_seats(tonic::Request::new(pb::WatchSeatsRequest::default()))
        .await
        .unwrap_err();
    assert_eq!(none.code(), Code::Unauthenticated);
    let unknown = c
        .watch_seats(request("t-op", vec!["users".into()]))
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), Code::InvalidArgument);
    use tonic_types::StatusExt as _;
    let info = unknown.get_details_error_info().expect("error info");
    assert_eq!(
        info.metadata.get("field").map(String::as_str),
        Some("features")
    );
}

/// At drain, an open stream ends with UNAVAILABLE (reconnect elsewhere and
/// resume by version) instead of holding the drain open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_ends_with_unavailable_at_drain() {
    let redis = RedisServer::start();
    let mut raw = config(Some(&redis), &serial("watch-drain"));
    raw.drain_timeout_ms = 30_000;
    let server = TestServer::start(raw).await;
    let mut c = server.client().await;
    let mut stream = watch(&mut c, 0).await;
    next(&mut stream).await;
    let started = Instant::now();
    let stopping = tokio::spawn(server.shutdown());
    let end = loop {
        match tokio::time::timeout(WAIT, stream.message()).await.unwrap() {
            Ok(Some(_)) => continue, // a heartbeat sent before the drain
            Ok(None) => panic!("the stream ended without a status"),
            Err(status) => break status,
        }
    };
    assert_eq!(end.code(), Code::Unavailable);
    stopping.await.unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "the drain waited for the stream"
    );
}

/// Time-compressed hours: with the server's keepalive, connection age and
/// grace, and the heartbeat all short, and a client that pings often, an
/// idle stream outlives many connection ages and grace periods, with a
/// heartbeat at least every `watch.heartbeat_ms`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_stream_is_not_cut_by_keepalive_or_connection_age() {
    let mut raw = config(None, &serial("watch-idle"));
    raw.watch.heartbeat_ms = 100;
    raw.limits.keepalive_interval_ms = 1_000;
    raw.limits.keepalive_timeout_ms = 1_000;
    raw.limits.max_connection_age_ms = 200;
    raw.limits.max_connection_age_grace_ms = 0;
    let server = TestServer::start(raw).await;
    let channel = Endpoint::from_shared(server.endpoint())
        .unwrap()
        .http2_keep_alive_interval(Duration::from_millis(100))
        .keep_alive_timeout(Duration::from_millis(500))
        .keep_alive_while_idle(true)
        .connect()
        .await
        .unwrap();
    let mut c = LicensingServiceClient::new(channel);
    let mut stream = watch(&mut c, 0).await;
    let first = next(&mut stream).await;
    assert!(matches!(first.kind, Some(Kind::Snapshot(_))));
    let version = first.version;
    // 25 connection ages, 3 keepalive periods of the server.
    let until = Instant::now() + Duration::from_secs(5);
    let mut last = Instant::now();
    let mut beats = 0;
    while Instant::now() < until {
        let m = tokio::time::timeout(Duration::from_secs(2), stream.message())
            .await
            .expect("a message within 2 s")
            .unwrap_or_else(|e| panic!("the idle stream was cut after {beats} heartbeats: {e:?}"))
            .expect("the idle stream ended");
        assert!(matches!(m.kind, Some(Kind::Heartbeat(_))), "{m:?}");
        assert_eq!(m.version, version);
        assert!(
            last.elapsed() < Duration::from_secs(1),
            "heartbeats stopped"
        );
        last = Instant::now();
        beats += 1;
    }
    assert!(beats >= 20, "{beats} heartbeats in 5 s at 100 ms");
}
