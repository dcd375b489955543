//! One conformance suite for the `Store` trait, run against both implementations:
//! the embedded `MemoryStore` and the `RedisStore` on a private `redis-server`.
//!
//! Every case is a plain async function over `&dyn Store` (plus, where needed, a
//! way to lose the store's data, or an `Arc` for concurrent callers); the
//! `conformance!` macro turns each into one test per store.

mod common;

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::{Duration, Instant};

use chrono::{DateTime, TimeZone, Utc};
use common::RedisServer;
use comtrexx_licensing::domain::audit::{AuditEvent, AuditRetention};
use comtrexx_licensing::domain::initcode::PendingInitialization;
use comtrexx_licensing::domain::tryout::{TryoutEnd, TryoutEndReason};
use comtrexx_licensing::domain::{
    AssignPlan, Edition, Entitlement, Feature, LicensePayload, ReconcileOutcome, ReconcileStatus,
    Seat, SeatSource, SerialNumber, SignedLicense, SystemClock, TryoutRecord, UserId,
};
use comtrexx_licensing::store::memory::MemoryStore;
use comtrexx_licensing::store::redis::RedisStore;
use comtrexx_licensing::store::{
    AssignOutcome, Change, ChangeKind, Changes, Incident, LicenseWrite, Position, RepairWrite,
    SeatKey, Snapshot, Store, StoreError, StoredLicense,
};
use ed25519_dalek::SigningKey;

// ---------------------------------------------------------------------------
// The stores under test
// ---------------------------------------------------------------------------

/// One store under test, and how to make it lose its data.
struct Subject {
    store: Arc<dyn Store>,
    wipe: Box<dyn Fn() + Send + Sync>,
    // Keeps the shared redis-server alive while the test runs.
    redis: Option<Arc<RedisServer>>,
    // The Redis store's serial number (its keys' hash tag).
    serial: String,
}

impl Subject {
    async fn memory(_tag: &str) -> Self {
        let store = Arc::new(MemoryStore::new(Arc::new(SystemClock)));
        let wiped = Arc::clone(&store);
        Self {
            store,
            wipe: Box::new(move || wiped.wipe()),
            redis: None,
            serial: String::new(),
        }
    }

    async fn redis(tag: &str) -> Self {
        let server = shared_redis();
        let tag: String = tag.chars().take(40).collect();
        let serial = common::serial(&tag);
        let store = RedisStore::new(
            &server.url(),
            &SerialNumber::parse(&serial).expect("a test serial is valid"),
            Duration::from_millis(250),
        )
        .expect("create the redis store");
        // A new Redis store holds no epoch: initialize it as the mirror does.
        assert!(
            store
                .restore(&Snapshot::default())
                .await
                .expect("initialize the redis store"),
            "a fresh serial must need initializing"
        );
        let wipe_server = Arc::clone(&server);
        let wipe_serial = serial.clone();
        Self {
            store: Arc::new(store),
            wipe: Box::new(move || wipe_redis_serial(&wipe_server, &wipe_serial)),
            redis: Some(server),
            serial,
        }
    }
}

/// One redis-server shared by the tests that run at the same time (each test has
/// its own serial number, and every key is hash-tagged by it). It is stopped when
/// the last test using it ends, so no server outlives the test binary.
fn shared_redis() -> Arc<RedisServer> {
    static SHARED: Mutex<Weak<RedisServer>> = Mutex::new(Weak::new());
    let mut slot = SHARED.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some(server) = slot.upgrade() {
        return server;
    }
    let server = Arc::new(RedisServer::start());
    *slot = Arc::downgrade(&server);
    server
}

/// Deletes every key of one serial number, as a Redis that lost its data would.
fn wipe_redis_serial(server: &RedisServer, serial: &str) {
    let mut conn = server.connection();
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("lic:{{{serial}}}:*"))
        .query(&mut conn)
        .expect("list the serial's keys");
    assert!(!keys.is_empty(), "the serial has keys to lose");
    let _: i64 = redis::cmd("DEL")
        .arg(&keys)
        .query(&mut conn)
        .expect("delete the serial's keys");
}

macro_rules! one_case {
    ($subject:ident, store, $case:ident $(, #[$attr:meta])*) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        $(#[$attr])*
        async fn $case() {
            let subject = Subject::$subject(stringify!($case)).await;
            super::$case(&*subject.store).await;
        }
    };
    ($subject:ident, wipe, $case:ident $(, #[$attr:meta])*) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        $(#[$attr])*
        async fn $case() {
            let subject = Subject::$subject(stringify!($case)).await;
            super::$case(&*subject.store, &*subject.wipe).await;
        }
    };
    ($subject:ident, shared, $case:ident $(, #[$attr:meta])*) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
        $(#[$attr])*
        async fn $case() {
            let subject = Subject::$subject(stringify!($case)).await;
            super::$case(Arc::clone(&subject.store)).await;
        }
    };
}

/// Generates `memory_store::<case>` and `redis_store::<case>` for every case.
/// `redis: #[attr]` after a case applies only to the Redis test (used to mark a
/// known defect of the Redis store, so the case still runs with `--ignored`).
macro_rules! conformance {
    ($($kind:ident: $case:ident $(, redis: #[$redis_attr:meta])*;)*) => {
        mod memory_store {
            use super::*;
            $( one_case!(memory, $kind, $case); )*
        }
        mod redis_store {
            use super::*;
            $( one_case!(redis, $kind, $case $(, #[$redis_attr])*); )*
        }
    };
}

conformance! {
    store: assign_creates_a_seat_and_is_idempotent;
    store: assign_reports_an_exhausted_pool;
    store: purchased_assign_against_another_license_is_refused;
    store: tryout_pool_is_separate_from_purchased_pool;
    store: tryout_seat_is_replaced_by_a_purchased_seat;
    store: purchased_seat_is_kept_under_a_tryout_plan;
    store: release_frees_a_seat_once;
    store: list_seats_is_ordered_and_filtered;
    store: list_seats_pages_visit_every_seat_once;
    store: list_seats_filter_holds_with_an_after_key_of_another_feature;
    store: compare_and_set_tryout;
    store: apply_license_compares_license_and_tryout;
    store: capacity_drop_flags_the_most_recent_excess;
    store: capacities_leave_unlisted_pools_untouched;
    wipe: over_capacity_order_is_assignment_time_then_user_id;
    store: set_initialization_round_trips;
    store: apply_license_consumes_the_pending_initialization_once;
    store: apply_license_writes_everything_in_order;
    store: apply_license_with_a_stale_initialization_changes_nothing;
    store: reset_removes_everything_but_the_tryout_record;
    store: lease_is_exclusive_until_its_holder_releases_it;
    store: lease_expires_after_its_ttl;
    store: apply_license_is_fenced_by_the_latest_lease_grant;
    store: record_reconcile_round_trips;
    store: change_feed_reports_every_write_in_order;
    store: change_feed_waits_when_idle_and_resyncs_foreign_positions;
    shared: change_feed_wakes_a_waiting_reader;
    wipe: data_loss_refuses_writes_until_restored;
    wipe: restore_keeps_over_capacity_marks;
    wipe: restore_keeps_the_pending_initialization;
    wipe: lease_tokens_keep_growing_across_data_loss;
    shared: concurrent_assigns_never_exceed_capacity;
    shared: concurrent_assigns_of_one_user_create_one_seat;
    store: writes_below_the_floor_are_refused;
    store: repair_writes_back_only_where_it_was_planned;
    store: release_reflag_is_guarded_by_the_stored_license;
    store: high_water_clock_only_grows;
    store: high_water_clock_never_passes_the_store_time;
    wipe: restore_caps_the_high_water_clock;
    store: audit_lists_newest_first_in_pages;
    store: audit_is_bounded_by_max_entries;
    store: audit_refusals_never_displace_changes;
    store: audit_drops_entries_older_than_max_age;
}

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

fn uid(raw: &str) -> UserId {
    UserId::parse(raw).expect("a valid test user id")
}

fn vendor_key() -> SigningKey {
    SigningKey::from_bytes(&[7; 32])
}

/// A signed license document; `tag` makes documents (and so their ids) differ.
fn license(tag: &str, users: u32) -> StoredLicense {
    let payload = LicensePayload {
        serial_number: "T-conformance".to_owned(),
        edition: Edition::Vm,
        issued_at: Utc::now(),
        entitlements: vec![
            Entitlement {
                feature: Feature::User,
                quantity: users,
                expires_at: None,
            },
            Entitlement {
                feature: Feature::CallAssist,
                quantity: users,
                expires_at: None,
            },
        ],
        nonce: Some(tag.to_owned()),
    };
    StoredLicense {
        signed: SignedLicense::sign(&payload, &vendor_key()),
        applied_at: Utc::now(),
    }
}

fn purchased(license: &StoredLicense, capacity: u32) -> AssignPlan {
    AssignPlan::Purchased {
        capacity,
        license_id: license.id().to_owned(),
    }
}

fn tryout(capacity: u32) -> AssignPlan {
    AssignPlan::Tryout { capacity }
}

/// A license write that expects `expected_id` and changes nothing else: no tryout
/// change, no capacities, no initialization consumed, no fence.
fn plain<'a>(expected_id: Option<&'a str>, license: &'a StoredLicense) -> LicenseWrite<'a> {
    LicenseWrite {
        expected_id,
        license,
        tryout: None,
        capacities: &[],
        consume_initialization: None,
        fence: None,
    }
}

async fn apply(store: &dyn Store, write: LicenseWrite<'_>) -> Option<Vec<Change>> {
    store.apply_license(write).await.expect("apply_license")
}

async fn release(
    store: &dyn Store,
    user: &str,
    feature: Feature,
    capacity: Option<u32>,
) -> Option<Vec<Change>> {
    // Flags are set against the stored license (the guard a release shares with
    // an assignment).
    let license = snapshot(store).await.license;
    let id = license.as_ref().map_or("", StoredLicense::id);
    store
        .release_seat(&uid(user), feature, capacity.map(|c| (c, id)))
        .await
        .expect("release_seat")
}

/// Applies a first license document to a store that has none, and returns it.
async fn with_license(store: &dyn Store, tag: &str) -> StoredLicense {
    let lic = license(tag, 100);
    let changes = apply(store, plain(None, &lic))
        .await
        .expect("a store without a license accepts the first one");
    assert_eq!(changes.len(), 1);
    assert_eq!(changes[0].kind, ChangeKind::LicenseApplied(lic.clone()));
    lic
}

fn started_tryout() -> TryoutRecord {
    let now = Utc::now();
    TryoutRecord::Started {
        started_at: now,
        ends_at: now + chrono::Duration::days(14),
        ended: None,
    }
}

fn ended(record: &TryoutRecord) -> TryoutRecord {
    match record {
        TryoutRecord::Started {
            started_at,
            ends_at,
            ..
        } => TryoutRecord::Started {
            started_at: *started_at,
            ends_at: *ends_at,
            ended: Some(TryoutEnd {
                at: Utc::now(),
                reason: TryoutEndReason::Operator,
            }),
        },
        other => panic!("not a started tryout: {other:?}"),
    }
}

async fn snapshot(store: &dyn Store) -> Snapshot {
    store.snapshot().await.expect("snapshot")
}

async fn position(store: &dyn Store) -> Position {
    snapshot(store)
        .await
        .position
        .expect("the store is initialized")
}

/// Asserts a new seat was created and returns it with its change.
#[track_caller]
fn created(outcome: AssignOutcome) -> (Seat, Change) {
    match outcome {
        AssignOutcome::Created(change) => match &change.kind {
            ChangeKind::SeatAssigned(seat) => (seat.clone(), change),
            other => panic!("a created seat reports SeatAssigned, got {other:?}"),
        },
        other => panic!("expected Created, got {other:?}"),
    }
}

async fn assign(
    store: &dyn Store,
    user: &str,
    feature: Feature,
    plan: &AssignPlan,
) -> AssignOutcome {
    store
        .assign_seat(&uid(user), feature, plan)
        .await
        .expect("assign_seat")
}

fn keys_of(seats: &[Seat]) -> Vec<(Feature, String)> {
    seats
        .iter()
        .map(|s| (s.feature, s.user_id.as_str().to_owned()))
        .collect()
}

fn seats_of<'a>(snap: &'a Snapshot, user: &str) -> Vec<&'a Seat> {
    snap.seats
        .iter()
        .filter(|s| s.user_id.as_str() == user)
        .collect()
}

/// Reads the feed from `since` until it has nothing more.
async fn drain(store: &dyn Store, since: &Position) -> Vec<Change> {
    let mut cursor = since.clone();
    let mut all = Vec::new();
    for _ in 0..100 {
        match store
            .changes(&cursor, Duration::from_millis(50))
            .await
            .unwrap()
        {
            Changes::Events(events) if events.is_empty() => return all,
            Changes::Events(events) => {
                cursor.version = events.last().unwrap().version;
                all.extend(events);
            }
            Changes::Resync => panic!("unexpected Resync from {cursor:?}"),
        }
    }
    panic!("the feed never ran dry");
}

/// An instant with millisecond precision (what every store keeps), near now.
fn ms_now() -> DateTime<Utc> {
    Utc.timestamp_millis_opt(Utc::now().timestamp_millis())
        .unwrap()
}

/// A pending initialization; `nonce` tells them apart.
fn pending(nonce: &str) -> PendingInitialization {
    let now = Utc::now();
    PendingInitialization {
        nonce: nonce.to_owned(),
        issued_at: now,
        expires_at: now + chrono::Duration::hours(24),
    }
}

fn reconcile_status(outcome: ReconcileOutcome) -> ReconcileStatus {
    let now = Utc::now();
    ReconcileStatus {
        last_success_at: Some(now),
        last_attempt_at: Some(now),
        last_outcome: Some(outcome),
        last_error: None,
        next_reconcile_at: Some(now + chrono::Duration::hours(6)),
    }
}

/// The seats of `SeatFlagged` changes, sorted by (feature, user); panics on any
/// other kind.
#[track_caller]
fn flagged_seats(changes: &[Change]) -> Vec<Seat> {
    let mut seats: Vec<Seat> = changes
        .iter()
        .map(|c| match &c.kind {
            ChangeKind::SeatFlagged(seat) => seat.clone(),
            other => panic!("expected SeatFlagged, got {other:?}"),
        })
        .collect();
    seats.sort_by(|a, b| (a.feature, &a.user_id).cmp(&(b.feature, &b.user_id)));
    seats
}

fn users_of(seats: &[Seat]) -> Vec<&str> {
    seats.iter().map(|s| s.user_id.as_str()).collect()
}

/// The users of a feature's seats that carry an over-capacity flag.
fn flagged_users(snap: &Snapshot, feature: Feature) -> Vec<&str> {
    snap.seats
        .iter()
        .filter(|s| s.feature == feature && s.over_capacity_since.is_some())
        .map(|s| s.user_id.as_str())
        .collect()
}

#[track_caller]
fn seat_in(snap: &Snapshot, feature: Feature, user: &str) -> Seat {
    snap.seats
        .iter()
        .find(|s| s.feature == feature && s.user_id.as_str() == user)
        .cloned()
        .unwrap_or_else(|| panic!("no {feature} seat of {user} in the snapshot"))
}

/// Asserts `at` lies within `from ..= to`, give or take clock slack (Redis takes
/// its own clock, at millisecond precision).
#[track_caller]
fn assert_near(at: DateTime<Utc>, from: DateTime<Utc>, to: DateTime<Utc>) {
    let slack = chrono::Duration::seconds(2);
    assert!(
        at >= from - slack && at <= to + slack,
        "{at} is not near now ({from} .. {to})"
    );
}

/// Asserts versions count up by one from `after + 1`.
#[track_caller]
fn assert_consecutive(changes: &[Change], after: u64) {
    let versions: Vec<u64> = changes.iter().map(|c| c.version).collect();
    let want: Vec<u64> = (after + 1..=after + changes.len() as u64).collect();
    assert_eq!(versions, want, "changes count up one by one");
}

// ---------------------------------------------------------------------------
// assign_seat
// ---------------------------------------------------------------------------

async fn assign_creates_a_seat_and_is_idempotent(store: &dyn Store) {
    let lic = with_license(store, "assign").await;
    let plan = purchased(&lic, 5);
    let before = position(store).await;

    let t0 = Utc::now();
    let (seat, change) = created(assign(store, "alice", Feature::User, &plan).await);
    let t1 = Utc::now();
    assert_eq!(seat.user_id, uid("alice"));
    assert_eq!(seat.feature, Feature::User);
    assert_eq!(seat.source, SeatSource::Purchased);
    assert_eq!(seat.over_capacity_since, None);
    let slack = chrono::Duration::seconds(2);
    assert!(
        seat.assigned_at >= t0 - slack && seat.assigned_at <= t1 + slack,
        "assigned_at {} is not near now ({t0} .. {t1})",
        seat.assigned_at
    );
    assert_eq!(change.version, before.version + 1);

    // Again: the same seat, nothing written.
    assert_eq!(
        assign(store, "alice", Feature::User, &plan).await,
        AssignOutcome::Existing(seat.clone())
    );
    let snap = snapshot(store).await;
    assert_eq!(snap.position.as_ref().unwrap().version, before.version + 1);
    assert_eq!(snap.seats, vec![seat.clone()]);

    // Another feature of the same user is another seat.
    let (ca, _) = created(assign(store, "alice", Feature::CallAssist, &plan).await);
    assert_eq!(ca.feature, Feature::CallAssist);
    assert_eq!(ca.source, SeatSource::Purchased);
    assert_eq!(snapshot(store).await.seats, vec![ca, seat]);
}

async fn assign_reports_an_exhausted_pool(store: &dyn Store) {
    let lic = with_license(store, "exhausted").await;
    let plan = purchased(&lic, 2);
    created(assign(store, "a", Feature::User, &plan).await);
    created(assign(store, "b", Feature::User, &plan).await);
    let full = snapshot(store).await;

    assert_eq!(
        assign(store, "c", Feature::User, &plan).await,
        AssignOutcome::Exhausted {
            capacity: 2,
            in_use: 2
        }
    );
    // Nothing was written.
    assert_eq!(snapshot(store).await, full);
    // A holder still gets its seat back from a full pool.
    assert!(matches!(
        assign(store, "a", Feature::User, &plan).await,
        AssignOutcome::Existing(_)
    ));
    // A plan below what is in use reports the real count.
    assert_eq!(
        assign(store, "c", Feature::User, &purchased(&lic, 1)).await,
        AssignOutcome::Exhausted {
            capacity: 1,
            in_use: 2
        }
    );
    assert_eq!(
        assign(store, "c", Feature::User, &purchased(&lic, 0)).await,
        AssignOutcome::Exhausted {
            capacity: 0,
            in_use: 2
        }
    );
    // Pools are per feature: call_assist is still empty.
    let (ca, _) = created(assign(store, "c", Feature::CallAssist, &purchased(&lic, 1)).await);
    assert_eq!(ca.feature, Feature::CallAssist);
    // The capacity is the plan's: a bigger plan makes room.
    let (seat, _) = created(assign(store, "c", Feature::User, &purchased(&lic, 3)).await);
    assert_eq!(seat.source, SeatSource::Purchased);
    assert_eq!(
        assign(store, "d", Feature::User, &purchased(&lic, 3)).await,
        AssignOutcome::Exhausted {
            capacity: 3,
            in_use: 3
        }
    );
}

async fn purchased_assign_against_another_license_is_refused(store: &dyn Store) {
    // No license stored at all: a purchased plan cannot hold.
    let other = license("never-applied", 10);
    assert_eq!(
        assign(store, "alice", Feature::User, &purchased(&other, 10)).await,
        AssignOutcome::LicenseChanged
    );

    let stored = with_license(store, "stored").await;
    assert_ne!(stored.id(), other.id());
    let before = snapshot(store).await;
    assert_eq!(
        assign(store, "alice", Feature::User, &purchased(&other, 10)).await,
        AssignOutcome::LicenseChanged
    );
    assert_eq!(snapshot(store).await, before, "nothing was written");
    // The plan made against the stored document works.
    created(assign(store, "alice", Feature::User, &purchased(&stored, 10)).await);
}

async fn tryout_pool_is_separate_from_purchased_pool(store: &dyn Store) {
    let lic = with_license(store, "pools").await;
    let bought = purchased(&lic, 1);
    created(assign(store, "p1", Feature::User, &bought).await);
    assert_eq!(
        assign(store, "p2", Feature::User, &bought).await,
        AssignOutcome::Exhausted {
            capacity: 1,
            in_use: 1
        }
    );

    let test = tryout(3);
    for user in ["t1", "t2", "t3"] {
        let (seat, _) = created(assign(store, user, Feature::User, &test).await);
        assert_eq!(seat.source, SeatSource::Tryout);
        assert_eq!(seat.user_id, uid(user));
    }
    assert_eq!(
        assign(store, "t4", Feature::User, &test).await,
        AssignOutcome::Exhausted {
            capacity: 3,
            in_use: 3
        }
    );
    // The tryout seats did not use up purchased capacity, nor the other way round.
    assert_eq!(
        assign(store, "p2", Feature::User, &bought).await,
        AssignOutcome::Exhausted {
            capacity: 1,
            in_use: 1
        }
    );
    // A tryout holder under a tryout plan gets its seat back.
    match assign(store, "t2", Feature::User, &test).await {
        AssignOutcome::Existing(seat) => {
            assert_eq!(seat.source, SeatSource::Tryout);
            assert_eq!(seat.user_id, uid("t2"));
        }
        other => panic!("expected Existing, got {other:?}"),
    }

    let snap = snapshot(store).await;
    let sources: Vec<_> = snap
        .seats
        .iter()
        .map(|s| (s.user_id.as_str(), s.source))
        .collect();
    assert_eq!(
        sources,
        vec![
            ("p1", SeatSource::Purchased),
            ("t1", SeatSource::Tryout),
            ("t2", SeatSource::Tryout),
            ("t3", SeatSource::Tryout),
        ]
    );
}

async fn tryout_seat_is_replaced_by_a_purchased_seat(store: &dyn Store) {
    let lic = with_license(store, "upgrade").await;
    let (trial, _) = created(assign(store, "alice", Feature::User, &tryout(1)).await);
    assert_eq!(trial.source, SeatSource::Tryout);

    // A full purchased pool leaves the tryout seat as it is.
    created(assign(store, "bob", Feature::User, &purchased(&lic, 1)).await);
    assert_eq!(
        assign(store, "alice", Feature::User, &purchased(&lic, 1)).await,
        AssignOutcome::Exhausted {
            capacity: 1,
            in_use: 1
        }
    );
    assert_eq!(
        seats_of(&snapshot(store).await, "alice"),
        vec![&trial],
        "an exhausted purchased pool must not touch the tryout seat"
    );

    // With room, the purchased seat replaces the tryout seat.
    let (seat, _) = created(assign(store, "alice", Feature::User, &purchased(&lic, 2)).await);
    assert_eq!(seat.source, SeatSource::Purchased);
    assert_eq!(seat.user_id, uid("alice"));
    assert_eq!(seat.feature, Feature::User);
    let snap = snapshot(store).await;
    assert_eq!(seats_of(&snap, "alice"), vec![&seat]);
    assert!(snap.seats.iter().all(|s| s.source == SeatSource::Purchased));
    let listed = store
        .list_seats(Some(Feature::User), None, 10)
        .await
        .unwrap();
    assert_eq!(listed, snap.seats);

    // The tryout pool has room again: the replaced seat no longer counts.
    let (carol, _) = created(assign(store, "carol", Feature::User, &tryout(1)).await);
    assert_eq!(carol.source, SeatSource::Tryout);
    // And alice keeps her purchased seat under either plan.
    assert_eq!(
        assign(store, "alice", Feature::User, &purchased(&lic, 2)).await,
        AssignOutcome::Existing(seat.clone())
    );
}

async fn purchased_seat_is_kept_under_a_tryout_plan(store: &dyn Store) {
    let lic = with_license(store, "keep").await;
    let (seat, _) = created(assign(store, "alice", Feature::User, &purchased(&lic, 1)).await);
    let before = snapshot(store).await;
    assert_eq!(
        assign(store, "alice", Feature::User, &tryout(3)).await,
        AssignOutcome::Existing(seat.clone())
    );
    // Even with the purchased plan's document gone stale or the pool full.
    assert_eq!(
        assign(store, "alice", Feature::User, &tryout(0)).await,
        AssignOutcome::Existing(seat.clone())
    );
    assert_eq!(
        assign(
            store,
            "alice",
            Feature::User,
            &purchased(&license("x", 1), 0)
        )
        .await,
        AssignOutcome::Existing(seat)
    );
    assert_eq!(snapshot(store).await, before, "nothing was written");
}

// ---------------------------------------------------------------------------
// release_seat
// ---------------------------------------------------------------------------

async fn release_frees_a_seat_once(store: &dyn Store) {
    let lic = with_license(store, "release").await;
    let plan = purchased(&lic, 1);
    created(assign(store, "alice", Feature::User, &plan).await);
    created(assign(store, "alice", Feature::CallAssist, &plan).await);
    let (bob, _) = created(assign(store, "bob", Feature::User, &tryout(3)).await);
    let before = position(store).await;

    // Nothing to release: no change, with or without a capacity.
    assert_eq!(release(store, "nobody", Feature::User, None).await, None);
    assert_eq!(release(store, "nobody", Feature::User, Some(0)).await, None);
    assert_eq!(position(store).await, before);

    let changes = release(store, "alice", Feature::User, None)
        .await
        .expect("alice held a seat");
    assert_eq!(changes.len(), 1, "only the release: {changes:?}");
    let change = &changes[0];
    assert_eq!(change.version, before.version + 1);
    assert_eq!(
        change.kind,
        ChangeKind::SeatReleased {
            feature: Feature::User,
            user_id: uid("alice"),
        }
    );
    assert_eq!(release(store, "alice", Feature::User, None).await, None);

    let snap = snapshot(store).await;
    assert_eq!(snap.position.as_ref().unwrap().version, before.version + 1);
    assert_eq!(
        keys_of(&snap.seats),
        vec![
            (Feature::CallAssist, "alice".to_owned()),
            (Feature::User, "bob".to_owned()),
        ]
    );
    let listed = store.list_seats(None, None, 100).await.unwrap();
    assert_eq!(listed, snap.seats);
    // The released seat leaves no gap in a limited listing either.
    assert_eq!(
        keys_of(
            &store
                .list_seats(Some(Feature::User), None, 1)
                .await
                .unwrap()
        ),
        vec![(Feature::User, "bob".to_owned())]
    );

    // A tryout seat is released the same way; with a capacity nothing is over,
    // so no flag moves.
    let changes = release(store, "bob", Feature::User, Some(1))
        .await
        .expect("bob held a tryout seat");
    assert_eq!(
        changes,
        vec![Change {
            version: before.version + 2,
            kind: ChangeKind::SeatReleased {
                feature: Feature::User,
                user_id: bob.user_id,
            },
        }]
    );
    assert!(
        store
            .list_seats(Some(Feature::User), None, 100)
            .await
            .unwrap()
            .is_empty()
    );

    // The freed seat can be taken again.
    created(assign(store, "carol", Feature::User, &plan).await);
    created(assign(store, "dave", Feature::User, &tryout(1)).await);
}

// ---------------------------------------------------------------------------
// list_seats
// ---------------------------------------------------------------------------

/// User ids that sort differently by bytes, chars or case, with punctuation
/// (including what Redis lex ranges treat specially) and non-ASCII text.
fn odd_user_ids() -> Vec<String> {
    let mut ids: Vec<String> = [
        "a",
        "a b",
        "a.b",
        "a-b",
        "ab",
        "A",
        "Zoe",
        "zoe",
        "zoë",
        "Zoë",
        "émile",
        "ä",
        "anna.müller@example.com",
        "o'brien",
        "\"quoted\"",
        "back\\slash",
        "(paren",
        "[bracket",
        "-",
        "+",
        "%s%d",
        "{brace}",
        "日本語",
        "😀",
        "\u{ff}",
        "\u{100}",
        "user:1",
        "user\u{2028}sep",
        "tab-less",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect();
    ids.push("ä".repeat(64)); // 128 bytes, the longest accepted id
    ids.push("x".repeat(128));
    ids
}

/// Seats of both features and both sources, returned in the expected order.
async fn fill_for_listing(store: &dyn Store) -> Vec<(Feature, String)> {
    let lic = with_license(store, "listing").await;
    let plan = purchased(&lic, 1000);
    let ids = odd_user_ids();
    let mut expected = BTreeSet::new();
    for (i, id) in ids.iter().enumerate() {
        // Every user gets a user seat (some from the tryout pool), every
        // third one a call_assist seat too.
        let user_plan = if i % 4 == 1 {
            tryout(1000)
        } else {
            plan.clone()
        };
        created(assign(store, id, Feature::User, &user_plan).await);
        expected.insert((Feature::User, id.clone()));
        if i % 3 == 0 {
            created(assign(store, id, Feature::CallAssist, &plan).await);
            expected.insert((Feature::CallAssist, id.clone()));
        }
    }
    expected.into_iter().collect()
}

async fn list_seats_is_ordered_and_filtered(store: &dyn Store) {
    assert!(store.list_seats(None, None, 10).await.unwrap().is_empty());
    let expected = fill_for_listing(store).await;
    assert!(Feature::CallAssist < Feature::User);

    let all = store.list_seats(None, None, 10_000).await.unwrap();
    assert_eq!(keys_of(&all), expected);
    assert_eq!(all, snapshot(store).await.seats);

    for feature in Feature::SEATS {
        let listed = store.list_seats(Some(feature), None, 10_000).await.unwrap();
        let want: Vec<_> = expected
            .iter()
            .filter(|(f, _)| *f == feature)
            .cloned()
            .collect();
        assert!(!want.is_empty());
        assert_eq!(keys_of(&listed), want, "filter {feature}");
    }

    // The limit, and zero.
    let first = store.list_seats(None, None, 3).await.unwrap();
    assert_eq!(keys_of(&first), expected[..3].to_vec());
    assert!(store.list_seats(None, None, 0).await.unwrap().is_empty());

    // `after` need not be a held seat: listing resumes strictly after it.
    let after = SeatKey {
        feature: Feature::User,
        user_id: uid("b"),
    };
    let listed = store.list_seats(None, Some(&after), 10_000).await.unwrap();
    let want: Vec<_> = expected
        .iter()
        .filter(|(f, u)| (*f, u.as_str()) > (Feature::User, "b"))
        .cloned()
        .collect();
    assert_eq!(keys_of(&listed), want);
    // After the very last seat: nothing.
    let (f, u) = expected.last().unwrap();
    let last = SeatKey {
        feature: *f,
        user_id: uid(u),
    };
    assert!(
        store
            .list_seats(None, Some(&last), 10)
            .await
            .unwrap()
            .is_empty()
    );
}

async fn list_seats_pages_visit_every_seat_once(store: &dyn Store) {
    let expected = fill_for_listing(store).await;
    for filter in [None, Some(Feature::CallAssist), Some(Feature::User)] {
        let want: Vec<_> = expected
            .iter()
            .filter(|(f, _)| filter.is_none_or(|x| x == *f))
            .cloned()
            .collect();
        for size in [1, 2, 7] {
            let mut seen = Vec::new();
            let mut after: Option<SeatKey> = None;
            for _ in 0..=want.len() + 1 {
                let page = store
                    .list_seats(filter, after.as_ref(), size)
                    .await
                    .unwrap();
                // Full pages while seats remain: callers detect the last page
                // by a short one.
                assert_eq!(
                    page.len(),
                    size.min(want.len() - seen.len()),
                    "filter {filter:?}, page size {size}, after {after:?}"
                );
                let Some(last) = page.last() else { break };
                after = Some(SeatKey {
                    feature: last.feature,
                    user_id: last.user_id.clone(),
                });
                seen.extend(keys_of(&page));
            }
            assert_eq!(seen, want, "filter {filter:?}, page size {size}");
        }
    }
}

async fn list_seats_filter_holds_with_an_after_key_of_another_feature(store: &dyn Store) {
    let lic = with_license(store, "cross").await;
    let plan = purchased(&lic, 10);
    for user in ["a", "b", "c"] {
        created(assign(store, user, Feature::CallAssist, &plan).await);
        created(assign(store, user, Feature::User, &plan).await);
    }
    // Resuming a user-seat listing after a call_assist key lists only user seats.
    let after = SeatKey {
        feature: Feature::CallAssist,
        user_id: uid("a"),
    };
    let listed = store
        .list_seats(Some(Feature::User), Some(&after), 10)
        .await
        .unwrap();
    assert_eq!(
        keys_of(&listed),
        vec![
            (Feature::User, "a".to_owned()),
            (Feature::User, "b".to_owned()),
            (Feature::User, "c".to_owned()),
        ]
    );
    // After a key beyond every call_assist seat: no call_assist seats.
    let after = SeatKey {
        feature: Feature::User,
        user_id: uid("a"),
    };
    assert!(
        store
            .list_seats(Some(Feature::CallAssist), Some(&after), 10)
            .await
            .unwrap()
            .is_empty()
    );
}

// ---------------------------------------------------------------------------
// compare_and_set_tryout
// ---------------------------------------------------------------------------

async fn compare_and_set_tryout(store: &dyn Store) {
    assert_eq!(snapshot(store).await.tryout, None);
    let before = position(store).await;
    let started = started_tryout();

    let change = store
        .compare_and_set_tryout(None, &started)
        .await
        .unwrap()
        .expect("from no record");
    assert_eq!(change.version, before.version + 1);
    assert_eq!(change.kind, ChangeKind::TryoutChanged(started.clone()));
    let snap = snapshot(store).await;
    assert_eq!(snap.tryout.as_ref(), Some(&started));

    // Stale expectations change nothing.
    let other = TryoutRecord::Forfeited { at: Utc::now() };
    assert_eq!(
        store.compare_and_set_tryout(None, &other).await.unwrap(),
        None
    );
    assert_eq!(
        store
            .compare_and_set_tryout(Some(&other), &other)
            .await
            .unwrap(),
        None
    );
    assert_eq!(
        store
            .compare_and_set_tryout(Some(&ended(&started)), &other)
            .await
            .unwrap(),
        None
    );
    assert_eq!(snapshot(store).await, snap);

    // The record as read back is a valid expectation.
    let read_back = snap.tryout.unwrap();
    let done = ended(&read_back);
    let change = store
        .compare_and_set_tryout(Some(&read_back), &done)
        .await
        .unwrap()
        .expect("the current record matches");
    assert_eq!(change.version, before.version + 2);
    assert_eq!(change.kind, ChangeKind::TryoutChanged(done.clone()));
    assert_eq!(snapshot(store).await.tryout, Some(done.clone()));
    // The old record no longer matches.
    assert_eq!(
        store
            .compare_and_set_tryout(Some(&started), &other)
            .await
            .unwrap(),
        None
    );
    assert_eq!(snapshot(store).await.tryout, Some(done));
}

// ---------------------------------------------------------------------------
// apply_license
// ---------------------------------------------------------------------------

async fn apply_license_compares_license_and_tryout(store: &dyn Store) {
    let first = with_license(store, "first").await;
    let second = license("second", 5);
    let third = license("third", 7);
    let before = snapshot(store).await;
    assert_eq!(before.license.as_ref(), Some(&first));

    // Wrong expected document: nothing changes.
    assert_eq!(
        apply(store, plain(Some("not-the-stored-id"), &second)).await,
        None
    );
    assert_eq!(
        apply(store, plain(None, &second)).await,
        None,
        "expecting no document while one is stored"
    );
    assert_eq!(apply(store, plain(Some(second.id()), &third)).await, None);
    assert_eq!(snapshot(store).await, before);

    // With a tryout change: both are written, as consecutive changes.
    let forfeited = TryoutRecord::Forfeited { at: Utc::now() };
    let v = before.position.as_ref().unwrap().version;
    let changes = apply(
        store,
        LicenseWrite {
            tryout: Some((None, &forfeited)),
            ..plain(Some(first.id()), &second)
        },
    )
    .await
    .expect("expectations hold");
    assert_eq!(
        changes,
        vec![
            Change {
                version: v + 1,
                kind: ChangeKind::LicenseApplied(second.clone()),
            },
            Change {
                version: v + 2,
                kind: ChangeKind::TryoutChanged(forfeited.clone()),
            },
        ]
    );
    let snap = snapshot(store).await;
    assert_eq!(snap.license.as_ref(), Some(&second));
    assert_eq!(snap.tryout.as_ref(), Some(&forfeited));
    assert_eq!(snap.position.as_ref().unwrap().version, v + 2);

    // The tryout expectation no longer holds: nothing changes, not even the license.
    let started = started_tryout();
    assert_eq!(
        apply(
            store,
            LicenseWrite {
                tryout: Some((None, &started)),
                ..plain(Some(second.id()), &third)
            }
        )
        .await,
        None
    );
    assert_eq!(
        apply(
            store,
            LicenseWrite {
                tryout: Some((Some(&started), &started)),
                ..plain(Some(second.id()), &third)
            }
        )
        .await,
        None
    );
    assert_eq!(snapshot(store).await, snap);

    // The right expectations, without a tryout change: one change.
    let changes = apply(store, plain(Some(second.id()), &third))
        .await
        .expect("expectations hold");
    assert_eq!(
        changes,
        vec![Change {
            version: v + 3,
            kind: ChangeKind::LicenseApplied(third.clone()),
        }]
    );
    let after = snapshot(store).await;
    assert_eq!(after.license, Some(third));
    assert_eq!(after.tryout, Some(forfeited));
}

// ---------------------------------------------------------------------------
// over-capacity flags
// ---------------------------------------------------------------------------

/// Purchased `feature` seats for `users`, assigned in the order given. The Redis
/// store stamps assignments in milliseconds, so neighbours may tie; a tie goes to
/// the higher user id as the more recent one, which is the assignment order when
/// `users` are ascending.
async fn assign_in_order(store: &dyn Store, lic: &StoredLicense, feature: Feature, users: &[&str]) {
    let plan = purchased(lic, 100);
    for user in users {
        created(assign(store, user, feature, &plan).await);
    }
}

async fn capacity_drop_flags_the_most_recent_excess(store: &dyn Store) {
    let lic = with_license(store, "drop").await;
    assign_in_order(store, &lic, Feature::User, &["u1", "u2", "u3", "u4", "u5"]).await;
    // A tryout seat of the same feature, assigned last: not in the purchased pool.
    let (trial, _) = created(assign(store, "u9", Feature::User, &tryout(5)).await);
    let unflagged = snapshot(store).await;
    assert!(
        unflagged
            .seats
            .iter()
            .all(|s| s.over_capacity_since.is_none())
    );
    let before = position(store).await;

    // Down to 2: the three most recent purchased seats are flagged, now.
    let smaller = license("drop-2", 2);
    let t0 = Utc::now();
    let changes = apply(
        store,
        LicenseWrite {
            capacities: &[(Feature::User, 2)],
            ..plain(Some(lic.id()), &smaller)
        },
    )
    .await
    .expect("expectations hold");
    let t1 = Utc::now();
    assert_consecutive(&changes, before.version);
    assert_eq!(changes[0].kind, ChangeKind::LicenseApplied(smaller.clone()));
    let flagged = flagged_seats(&changes[1..]);
    assert_eq!(users_of(&flagged), ["u3", "u4", "u5"]);
    for seat in &flagged {
        let old = seat_in(&unflagged, Feature::User, seat.user_id.as_str());
        assert_eq!(
            Seat {
                over_capacity_since: None,
                ..seat.clone()
            },
            old,
            "only the flag changed"
        );
        assert_near(seat.over_capacity_since.expect("flagged"), t0, t1);
    }
    let snap = snapshot(store).await;
    for seat in &flagged {
        assert_eq!(&seat_in(&snap, Feature::User, seat.user_id.as_str()), seat);
    }
    assert_eq!(flagged_users(&snap, Feature::User), ["u3", "u4", "u5"]);
    assert_eq!(seat_in(&snap, Feature::User, "u9"), trial);
    assert_eq!(store.list_seats(None, None, 100).await.unwrap(), snap.seats);
    assert_eq!(drain(store, &before).await, changes);

    // The same capacity again: no flag moves, and flags keep their time.
    let same = license("drop-3", 2);
    let changes = apply(
        store,
        LicenseWrite {
            capacities: &[(Feature::User, 2)],
            ..plain(Some(smaller.id()), &same)
        },
    )
    .await
    .expect("expectations hold");
    assert_eq!(changes.len(), 1, "only the license: {changes:?}");
    assert_eq!(changes[0].kind, ChangeKind::LicenseApplied(same.clone()));
    let again = snapshot(store).await;
    assert_eq!(again.seats, snap.seats);

    // Releasing a seat that is not flagged makes room for the oldest flagged one.
    let v = position(store).await.version;
    let changes = release(store, "u1", Feature::User, Some(2))
        .await
        .expect("u1 held a seat");
    assert_consecutive(&changes, v);
    assert_eq!(
        changes[0].kind,
        ChangeKind::SeatReleased {
            feature: Feature::User,
            user_id: uid("u1"),
        }
    );
    let cleared = flagged_seats(&changes[1..]);
    assert_eq!(cleared, vec![seat_in(&unflagged, Feature::User, "u3")]);
    let snap = snapshot(store).await;
    assert_eq!(flagged_users(&snap, Feature::User), ["u4", "u5"]);
    for user in ["u4", "u5"] {
        assert_eq!(
            seat_in(&snap, Feature::User, user),
            seat_in(&again, Feature::User, user),
            "{user} keeps its flag time"
        );
    }

    // Without a capacity, a release leaves the flags as they are.
    let changes = release(store, "u2", Feature::User, None)
        .await
        .expect("u2 held a seat");
    assert_eq!(changes.len(), 1, "only the release: {changes:?}");
    assert_eq!(
        flagged_users(&snapshot(store).await, Feature::User),
        ["u4", "u5"]
    );

    // More capacity clears every flag.
    let bigger = license("drop-4", 10);
    let v = position(store).await.version;
    let changes = apply(
        store,
        LicenseWrite {
            capacities: &[(Feature::User, 10)],
            ..plain(Some(same.id()), &bigger)
        },
    )
    .await
    .expect("expectations hold");
    assert_consecutive(&changes, v);
    assert_eq!(changes[0].kind, ChangeKind::LicenseApplied(bigger.clone()));
    let cleared = flagged_seats(&changes[1..]);
    assert_eq!(
        cleared,
        vec![
            seat_in(&unflagged, Feature::User, "u4"),
            seat_in(&unflagged, Feature::User, "u5"),
        ]
    );
    let snap = snapshot(store).await;
    assert!(snap.seats.iter().all(|s| s.over_capacity_since.is_none()));
    assert_eq!(
        users_of(&snap.seats),
        ["u3", "u4", "u5", "u9"],
        "flags never delete seats"
    );
}

async fn capacities_leave_unlisted_pools_untouched(store: &dyn Store) {
    let lic = with_license(store, "unlisted").await;
    assign_in_order(store, &lic, Feature::CallAssist, &["a", "b", "c"]).await;
    assign_in_order(store, &lic, Feature::User, &["a", "b", "c"]).await;

    // Only the user pool is listed: only its flags move.
    let second = license("unlisted-2", 1);
    let changes = apply(
        store,
        LicenseWrite {
            capacities: &[(Feature::User, 1)],
            ..plain(Some(lic.id()), &second)
        },
    )
    .await
    .expect("expectations hold");
    let flagged = flagged_seats(&changes[1..]);
    assert!(flagged.iter().all(|s| s.feature == Feature::User));
    assert_eq!(users_of(&flagged), ["b", "c"]);
    let snap = snapshot(store).await;
    assert!(flagged_users(&snap, Feature::CallAssist).is_empty());

    // Now only call_assist: the user flags keep their time.
    let third = license("unlisted-3", 1);
    let changes = apply(
        store,
        LicenseWrite {
            capacities: &[(Feature::CallAssist, 1)],
            ..plain(Some(second.id()), &third)
        },
    )
    .await
    .expect("expectations hold");
    let flagged = flagged_seats(&changes[1..]);
    assert!(flagged.iter().all(|s| s.feature == Feature::CallAssist));
    assert_eq!(users_of(&flagged), ["b", "c"]);
    let after = snapshot(store).await;
    let users_pool = |snap: &Snapshot| -> Vec<Seat> {
        snap.seats
            .iter()
            .filter(|s| s.feature == Feature::User)
            .cloned()
            .collect()
    };
    assert_eq!(users_pool(&after), users_pool(&snap));

    // User capacity grows: the user flags clear, the call_assist ones stay.
    let fourth = license("unlisted-4", 3);
    let changes = apply(
        store,
        LicenseWrite {
            capacities: &[(Feature::User, 3)],
            ..plain(Some(third.id()), &fourth)
        },
    )
    .await
    .expect("expectations hold");
    let cleared = flagged_seats(&changes[1..]);
    assert!(cleared.iter().all(|s| s.feature == Feature::User));
    assert!(cleared.iter().all(|s| s.over_capacity_since.is_none()));
    assert_eq!(users_of(&cleared), ["b", "c"]);
    let last = snapshot(store).await;
    let call_assist_pool = |snap: &Snapshot| -> Vec<Seat> {
        snap.seats
            .iter()
            .filter(|s| s.feature == Feature::CallAssist)
            .cloned()
            .collect()
    };
    assert_eq!(call_assist_pool(&last), call_assist_pool(&after));
    assert_eq!(flagged_users(&last, Feature::CallAssist), ["b", "c"]);
    assert!(flagged_users(&last, Feature::User).is_empty());

    // No capacities at all: nothing moves.
    let fifth = license("unlisted-5", 0);
    let changes = apply(store, plain(Some(fourth.id()), &fifth))
        .await
        .expect("expectations hold");
    assert_eq!(changes.len(), 1, "only the license: {changes:?}");
    let unchanged = snapshot(store).await;
    assert_eq!(unchanged.seats, last.seats);
}

// ---------------------------------------------------------------------------
// set_initialization
// ---------------------------------------------------------------------------

async fn set_initialization_round_trips(store: &dyn Store) {
    assert_eq!(snapshot(store).await.initialization, None);
    let before = position(store).await;

    let first = pending("0123456789abcdef0123");
    let c1 = store.set_initialization(&first).await.unwrap();
    assert_eq!(
        c1,
        Change {
            version: before.version + 1,
            kind: ChangeKind::InitializationIssued(first.clone()),
        }
    );
    assert_eq!(snapshot(store).await.initialization, Some(first.clone()));

    // A newer one replaces it.
    let second = pending("fedcba9876543210fedc");
    let c2 = store.set_initialization(&second).await.unwrap();
    assert_eq!(
        c2,
        Change {
            version: before.version + 2,
            kind: ChangeKind::InitializationIssued(second.clone()),
        }
    );
    let snap = snapshot(store).await;
    assert_eq!(snap.initialization, Some(second));
    assert_eq!(snap.position.unwrap().version, before.version + 2);
    assert_eq!(drain(store, &before).await, vec![c1, c2]);
}

async fn apply_license_consumes_the_pending_initialization_once(store: &dyn Store) {
    let lic = with_license(store, "consume").await;
    let init = pending("consume");
    store.set_initialization(&init).await.unwrap();
    let before = position(store).await;

    let activated = license("consume-2", 5);
    let changes = apply(
        store,
        LicenseWrite {
            consume_initialization: Some(&init),
            ..plain(Some(lic.id()), &activated)
        },
    )
    .await
    .expect("the pending initialization is the stored one");
    assert_eq!(
        changes,
        vec![
            Change {
                version: before.version + 1,
                kind: ChangeKind::LicenseApplied(activated.clone()),
            },
            Change {
                version: before.version + 2,
                kind: ChangeKind::InitializationConsumed,
            },
        ]
    );
    let snap = snapshot(store).await;
    assert_eq!(snap.initialization, None);
    assert_eq!(snap.license, Some(activated.clone()));
    assert_eq!(drain(store, &before).await, changes);

    // The same initialization cannot be used twice.
    let replay = license("consume-3", 5);
    assert_eq!(
        apply(
            store,
            LicenseWrite {
                consume_initialization: Some(&init),
                ..plain(Some(activated.id()), &replay)
            },
        )
        .await,
        None
    );
    assert_eq!(snapshot(store).await, snap, "nothing was written");
}

async fn apply_license_writes_everything_in_order(store: &dyn Store) {
    let lic = with_license(store, "everything").await;
    assign_in_order(store, &lic, Feature::User, &["a", "b", "c"]).await;
    let started = started_tryout();
    store
        .compare_and_set_tryout(None, &started)
        .await
        .unwrap()
        .unwrap();
    let init = pending("everything");
    store.set_initialization(&init).await.unwrap();
    let before = position(store).await;

    let done = ended(&started);
    let next = license("everything-2", 1);
    let changes = apply(
        store,
        LicenseWrite {
            expected_id: Some(lic.id()),
            license: &next,
            tryout: Some((Some(&started), &done)),
            capacities: &[(Feature::User, 1), (Feature::CallAssist, 1)],
            consume_initialization: Some(&init),
            fence: None,
        },
    )
    .await
    .expect("every expectation holds");
    assert_consecutive(&changes, before.version);
    assert_eq!(changes[0].kind, ChangeKind::LicenseApplied(next.clone()));
    assert_eq!(changes[1].kind, ChangeKind::TryoutChanged(done.clone()));
    assert_eq!(changes[2].kind, ChangeKind::InitializationConsumed);
    assert_eq!(users_of(&flagged_seats(&changes[3..])), ["b", "c"]);
    let snap = snapshot(store).await;
    assert_eq!(snap.license, Some(next));
    assert_eq!(snap.tryout, Some(done));
    assert_eq!(snap.initialization, None);
    assert_eq!(flagged_users(&snap, Feature::User), ["b", "c"]);
    assert_eq!(drain(store, &before).await, changes);
}

async fn apply_license_with_a_stale_initialization_changes_nothing(store: &dyn Store) {
    let lic = with_license(store, "stale").await;
    assign_in_order(store, &lic, Feature::User, &["a", "b"]).await;
    let old = pending("stale-old");
    store.set_initialization(&old).await.unwrap();
    let current = pending("stale-new");
    store.set_initialization(&current).await.unwrap();
    let snap = snapshot(store).await;

    // An activation answering the replaced initialization writes nothing at all:
    // no license, no tryout change, no flags.
    let next = license("stale-2", 0);
    let forfeited = TryoutRecord::Forfeited { at: Utc::now() };
    assert_eq!(
        apply(
            store,
            LicenseWrite {
                tryout: Some((None, &forfeited)),
                capacities: &[(Feature::User, 0)],
                consume_initialization: Some(&old),
                ..plain(Some(lic.id()), &next)
            },
        )
        .await,
        None
    );
    // Nor one with the right nonce but other times.
    let altered = PendingInitialization {
        expires_at: current.expires_at + chrono::Duration::seconds(1),
        ..current.clone()
    };
    assert_eq!(
        apply(
            store,
            LicenseWrite {
                consume_initialization: Some(&altered),
                ..plain(Some(lic.id()), &next)
            },
        )
        .await,
        None
    );
    assert_eq!(snapshot(store).await, snap, "nothing was written");

    // The current one is accepted.
    let changes = apply(
        store,
        LicenseWrite {
            consume_initialization: Some(&current),
            ..plain(Some(lic.id()), &next)
        },
    )
    .await
    .expect("the current initialization");
    assert_eq!(changes[1].kind, ChangeKind::InitializationConsumed);
    assert_eq!(snapshot(store).await.initialization, None);
}

// ---------------------------------------------------------------------------
// reset
// ---------------------------------------------------------------------------

async fn reset_removes_everything_but_the_tryout_record(store: &dyn Store) {
    let lic = with_license(store, "reset").await;
    assign_in_order(store, &lic, Feature::User, &["a", "b"]).await;
    assign_in_order(store, &lic, Feature::CallAssist, &["a"]).await;
    created(assign(store, "t", Feature::User, &tryout(1)).await);
    let started = started_tryout();
    store
        .compare_and_set_tryout(None, &started)
        .await
        .unwrap()
        .unwrap();
    store
        .record_reconcile(&reconcile_status(ReconcileOutcome::Updated))
        .await
        .unwrap();
    store.set_initialization(&pending("reset")).await.unwrap();
    apply(
        store,
        LicenseWrite {
            capacities: &[(Feature::User, 1)],
            ..plain(Some(lic.id()), &lic)
        },
    )
    .await
    .expect("re-applying the stored document with a capacity drop");
    let before = snapshot(store).await;
    let before_pos = before.position.clone().unwrap();
    assert_eq!(before.seats.len(), 4);
    assert_eq!(flagged_users(&before, Feature::User), ["b"]);

    let change = store.reset().await.unwrap();
    assert_eq!(
        change,
        Change {
            version: before_pos.version + 1,
            kind: ChangeKind::Reset,
        }
    );
    let snap = snapshot(store).await;
    assert_eq!(
        snap,
        Snapshot {
            position: Some(Position {
                epoch: before_pos.epoch.clone(),
                version: before_pos.version + 1,
            }),
            seats: Vec::new(),
            license: None,
            tryout: Some(started.clone()),
            reconcile: ReconcileStatus::default(),
            initialization: None,
            // Kept, so an older document is never applied after the re-setup.
            retired_license: Some(lic.clone()),
            ..Snapshot::default()
        }
    );
    assert!(store.list_seats(None, None, 100).await.unwrap().is_empty());
    for feature in Feature::SEATS {
        assert!(
            store
                .list_seats(Some(feature), None, 100)
                .await
                .unwrap()
                .is_empty()
        );
    }
    assert_eq!(drain(store, &before_pos).await, vec![change.clone()]);

    // Writes are accepted afterwards, against the emptied state.
    assert_eq!(
        assign(store, "a", Feature::User, &purchased(&lic, 1)).await,
        AssignOutcome::LicenseChanged,
        "the license is gone"
    );
    let next = license("reset-2", 1);
    apply(store, plain(None, &next))
        .await
        .expect("no license is stored after a reset");
    let (seat, _) = created(assign(store, "z", Feature::User, &purchased(&next, 1)).await);
    assert_eq!(seat.over_capacity_since, None);
    created(assign(store, "y", Feature::User, &tryout(1)).await);
    store
        .compare_and_set_tryout(Some(&started), &ended(&started))
        .await
        .unwrap()
        .expect("the kept tryout record is the expectation");
    store.set_initialization(&pending("again")).await.unwrap();
    store
        .record_reconcile(&reconcile_status(ReconcileOutcome::Unchanged))
        .await
        .unwrap();
    assert_eq!(
        keys_of(&store.list_seats(None, None, 100).await.unwrap()),
        vec![
            (Feature::User, "y".to_owned()),
            (Feature::User, "z".to_owned())
        ]
    );
    // A second reset on the emptied store works too.
    store.reset().await.unwrap();
    assert!(snapshot(store).await.seats.is_empty());
}

// ---------------------------------------------------------------------------
// the reconcile lease
// ---------------------------------------------------------------------------

const LONG: Duration = Duration::from_secs(60);

async fn lease_is_exclusive_until_its_holder_releases_it(store: &dyn Store) {
    let before = position(store).await;
    let t1 = store
        .acquire_lease("replica-a", LONG)
        .await
        .unwrap()
        .expect("a free lease");
    assert!(t1 > 0);
    // Held: nobody gets it, not even its holder again.
    assert_eq!(store.acquire_lease("replica-b", LONG).await.unwrap(), None);
    assert_eq!(store.acquire_lease("replica-a", LONG).await.unwrap(), None);
    // Another replica's release does not free it.
    store.release_lease("replica-b").await.unwrap();
    assert_eq!(store.acquire_lease("replica-b", LONG).await.unwrap(), None);
    // The holder's does.
    store.release_lease("replica-a").await.unwrap();
    let t2 = store
        .acquire_lease("replica-b", LONG)
        .await
        .unwrap()
        .expect("released by its holder");
    assert!(t2 > t1, "tokens grow: {t1} then {t2}");
    assert_eq!(store.acquire_lease("replica-a", LONG).await.unwrap(), None);
    // A stale holder's release does not free the new holder's lease.
    store.release_lease("replica-a").await.unwrap();
    assert_eq!(store.acquire_lease("replica-c", LONG).await.unwrap(), None);
    store.release_lease("replica-b").await.unwrap();
    let t3 = store
        .acquire_lease("replica-b", LONG)
        .await
        .unwrap()
        .expect("released by its holder");
    assert!(t3 > t2, "tokens grow: {t2} then {t3}");
    // Releasing twice is harmless.
    store.release_lease("replica-b").await.unwrap();
    store.release_lease("replica-b").await.unwrap();

    // The lease is not data: it writes nothing to the feed.
    assert_eq!(position(store).await, before);
    assert!(drain(store, &before).await.is_empty());
}

/// Polls until `holder` gets the lease; panics after `limit`.
async fn acquire_within(store: &dyn Store, holder: &str, limit: Duration) -> u64 {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(token) = store.acquire_lease(holder, LONG).await.unwrap() {
            return token;
        }
        assert!(
            Instant::now() < deadline,
            "{holder} did not get the lease within {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn lease_expires_after_its_ttl(store: &dyn Store) {
    let ttl = Duration::from_millis(200);
    let start = Instant::now();
    let t1 = store
        .acquire_lease("replica-a", ttl)
        .await
        .unwrap()
        .expect("a free lease");
    let t2 = match store.acquire_lease("replica-b", LONG).await.unwrap() {
        // Held until the ttl is over (unless the machine was too slow to ask in time).
        Some(t) => {
            let waited = start.elapsed();
            assert!(
                waited >= ttl,
                "the lease was granted again (token {t}) {waited:?} after a {ttl:?} grant"
            );
            t
        }
        None => acquire_within(store, "replica-b", Duration::from_secs(10)).await,
    };
    let waited = start.elapsed();
    assert!(t2 > t1, "tokens grow: {t1} then {t2}");
    assert!(
        waited + Duration::from_millis(20) >= ttl,
        "the lease was held for its ttl, got it after {waited:?}"
    );
    // The expired holder's release does not free the new grant.
    store.release_lease("replica-a").await.unwrap();
    assert_eq!(store.acquire_lease("replica-c", ttl).await.unwrap(), None);
}

async fn apply_license_is_fenced_by_the_latest_lease_grant(store: &dyn Store) {
    let lic = with_license(store, "fence").await;
    assign_in_order(store, &lic, Feature::User, &["a", "b"]).await;
    // No grant yet: no fence matches.
    let next = license("fence-2", 1);
    let fenced_write = |fence: u64| LicenseWrite {
        capacities: &[(Feature::User, 1)],
        fence: Some(fence),
        ..plain(Some(lic.id()), &next)
    };
    let snap = snapshot(store).await;
    assert_eq!(apply(store, fenced_write(1)).await, None);
    assert_eq!(snapshot(store).await, snap);

    let old = store
        .acquire_lease("replica-a", LONG)
        .await
        .unwrap()
        .unwrap();
    store.release_lease("replica-a").await.unwrap();
    let newer = store
        .acquire_lease("replica-b", LONG)
        .await
        .unwrap()
        .unwrap();
    assert!(newer > old);

    // The older holder is fenced off: nothing is written, not even flags.
    assert_eq!(apply(store, fenced_write(old)).await, None);
    assert_eq!(apply(store, fenced_write(newer + 1)).await, None);
    assert_eq!(snapshot(store).await, snap, "nothing was written");

    // The latest grant's token writes, while held and after the release (no
    // newer grant since).
    let changes = apply(store, fenced_write(newer))
        .await
        .expect("the latest grant's token");
    assert_eq!(changes[0].kind, ChangeKind::LicenseApplied(next.clone()));
    assert_eq!(users_of(&flagged_seats(&changes[1..])), ["b"]);
    store.release_lease("replica-b").await.unwrap();
    let third = license("fence-3", 1);
    apply(
        store,
        LicenseWrite {
            fence: Some(newer),
            ..plain(Some(next.id()), &third)
        },
    )
    .await
    .expect("no newer grant since");
    // Once another grant happens, the token is stale.
    let newest = store
        .acquire_lease("replica-c", LONG)
        .await
        .unwrap()
        .unwrap();
    assert!(newest > newer);
    let fourth = license("fence-4", 1);
    let write = LicenseWrite {
        fence: Some(newer),
        ..plain(Some(third.id()), &fourth)
    };
    assert_eq!(apply(store, write).await, None);
    assert_eq!(snapshot(store).await.license, Some(third));
}

// ---------------------------------------------------------------------------
// record_reconcile
// ---------------------------------------------------------------------------

async fn record_reconcile_round_trips(store: &dyn Store) {
    assert_eq!(snapshot(store).await.reconcile, ReconcileStatus::default());
    let before = position(store).await;
    let failed = ReconcileStatus {
        last_success_at: None,
        last_attempt_at: Some(Utc::now()),
        last_outcome: Some(ReconcileOutcome::Unreachable),
        last_error: Some("licensing server: connection refused — ünïcödé".to_owned()),
        next_reconcile_at: Some(Utc::now() + chrono::Duration::minutes(5)),
    };
    let change = store.record_reconcile(&failed).await.unwrap();
    assert_eq!(change.version, before.version + 1);
    assert_eq!(change.kind, ChangeKind::ReconcileRecorded(failed.clone()));
    assert_eq!(snapshot(store).await.reconcile, failed);

    let now = Utc::now();
    let ok = ReconcileStatus {
        last_success_at: Some(now),
        last_attempt_at: Some(now),
        last_outcome: Some(ReconcileOutcome::Updated),
        last_error: None,
        next_reconcile_at: Some(now + chrono::Duration::hours(6)),
    };
    let change = store.record_reconcile(&ok).await.unwrap();
    assert_eq!(change.version, before.version + 2);
    assert_eq!(snapshot(store).await.reconcile, ok);

    // An unscheduled status clears the next reconcile time.
    let unscheduled = ReconcileStatus {
        next_reconcile_at: None,
        ..ok.clone()
    };
    let change = store.record_reconcile(&unscheduled).await.unwrap();
    assert_eq!(change.version, before.version + 3);
    assert_eq!(
        change.kind,
        ChangeKind::ReconcileRecorded(unscheduled.clone())
    );
    assert_eq!(snapshot(store).await.reconcile, unscheduled);
}

// ---------------------------------------------------------------------------
// changes
// ---------------------------------------------------------------------------

async fn change_feed_reports_every_write_in_order(store: &dyn Store) {
    let start = position(store).await;
    let mut written = Vec::new();

    let lic = license("feed", 1);
    written.extend(apply(store, plain(None, &lic)).await.unwrap());
    let plan = purchased(&lic, 1);
    let (_, c) = created(assign(store, "alice", Feature::User, &plan).await);
    written.push(c);
    // Writes that write nothing report nothing.
    assign(store, "alice", Feature::User, &plan).await;
    assign(store, "bob", Feature::User, &plan).await;
    assert_eq!(release(store, "bob", Feature::User, None).await, None);
    let started = started_tryout();
    written.push(
        store
            .compare_and_set_tryout(None, &started)
            .await
            .unwrap()
            .unwrap(),
    );
    let (_, c) = created(assign(store, "bob", Feature::User, &tryout(3)).await);
    written.push(c);
    let (_, c) = created(assign(store, "bob", Feature::CallAssist, &plan).await);
    written.push(c);
    written.push(
        store
            .record_reconcile(&reconcile_status(ReconcileOutcome::Unchanged))
            .await
            .unwrap(),
    );
    written.extend(release(store, "alice", Feature::User, None).await.unwrap());
    let bigger = license("feed-2", 2);
    written.extend(
        apply(
            store,
            LicenseWrite {
                tryout: Some((Some(&started), &ended(&started))),
                ..plain(Some(lic.id()), &bigger)
            },
        )
        .await
        .unwrap(),
    );
    let (_, c) = created(assign(store, "bob", Feature::User, &purchased(&bigger, 2)).await);
    written.push(c);
    // The newer kinds: an initialization issued and consumed, flags moved by a
    // license and by a release, a reset.
    let init = pending("feed");
    written.push(store.set_initialization(&init).await.unwrap());
    let third = license("feed-3", 2);
    written.extend(
        apply(
            store,
            LicenseWrite {
                capacities: &[(Feature::User, 0)],
                consume_initialization: Some(&init),
                ..plain(Some(bigger.id()), &third)
            },
        )
        .await
        .unwrap(),
    );
    let (_, c) = created(assign(store, "carol", Feature::User, &purchased(&third, 2)).await);
    written.push(c);
    written.extend(
        release(store, "carol", Feature::User, Some(1))
            .await
            .unwrap(),
    );
    written.push(store.reset().await.unwrap());

    let versions: Vec<u64> = written.iter().map(|c| c.version).collect();
    let want: Vec<u64> = (start.version + 1..=start.version + written.len() as u64).collect();
    assert_eq!(versions, want, "writes count up one by one");
    let kinds: Vec<&str> = written
        .iter()
        .map(|c| match c.kind {
            ChangeKind::SeatAssigned(_) => "assigned",
            ChangeKind::SeatReleased { .. } => "released",
            ChangeKind::LicenseApplied(_) => "license",
            ChangeKind::TryoutChanged(_) => "tryout",
            ChangeKind::ReconcileRecorded(_) => "reconcile",
            ChangeKind::SeatFlagged(_) => "flagged",
            ChangeKind::InitializationIssued(_) => "init_issued",
            ChangeKind::InitializationConsumed => "init_consumed",
            ChangeKind::Reset => "reset",
            ChangeKind::Repaired(_) => "repaired",
        })
        .collect();
    assert_eq!(
        kinds,
        [
            "license",
            "assigned",
            "tryout",
            "assigned",
            "assigned",
            "reconcile",
            "released",
            "license",
            "tryout",
            "assigned",
            "init_issued",
            "license",
            "init_consumed",
            "flagged",
            "assigned",
            "released",
            "flagged",
            "reset",
        ]
    );

    let flags: Vec<(&str, bool)> = written
        .iter()
        .filter_map(|c| match &c.kind {
            ChangeKind::SeatFlagged(seat) => {
                Some((seat.user_id.as_str(), seat.over_capacity_since.is_some()))
            }
            _ => None,
        })
        .collect();
    assert_eq!(flags, [("bob", true), ("bob", false)]);

    // The feed has exactly what the writes returned, in order.
    assert_eq!(drain(store, &start).await, written);
    // From the middle: the rest.
    let mid = Position {
        epoch: start.epoch.clone(),
        version: written[3].version,
    };
    assert_eq!(drain(store, &mid).await, written[4..].to_vec());
    // The snapshot's position is where the feed ends.
    let end = position(store).await;
    assert_eq!(end.epoch, start.epoch);
    assert_eq!(end.version, written.last().unwrap().version);
}

async fn change_feed_waits_when_idle_and_resyncs_foreign_positions(store: &dyn Store) {
    let lic = with_license(store, "idle").await;
    created(assign(store, "alice", Feature::User, &purchased(&lic, 1)).await);
    let pos = position(store).await;
    let wait = Duration::from_millis(50);

    let t = Instant::now();
    assert_eq!(
        store.changes(&pos, wait).await.unwrap(),
        Changes::Events(Vec::new())
    );
    let took = t.elapsed();
    assert!(
        took >= wait / 2 && took < Duration::from_secs(10),
        "an idle feed answers after about the wait, took {took:?}"
    );

    let foreign = Position {
        epoch: format!("{}-other", pos.epoch),
        version: pos.version,
    };
    assert_eq!(
        store.changes(&foreign, wait).await.unwrap(),
        Changes::Resync
    );
    let foreign_behind = Position {
        epoch: "0000000000000000".to_owned(),
        version: 0,
    };
    assert_ne!(foreign_behind.epoch, pos.epoch);
    assert_eq!(
        store.changes(&foreign_behind, wait).await.unwrap(),
        Changes::Resync
    );
    let ahead = Position {
        epoch: pos.epoch.clone(),
        version: pos.version + 5,
    };
    assert_eq!(store.changes(&ahead, wait).await.unwrap(), Changes::Resync);
    let just_ahead = Position {
        epoch: pos.epoch.clone(),
        version: pos.version + 1,
    };
    assert_eq!(
        store.changes(&just_ahead, wait).await.unwrap(),
        Changes::Resync
    );
    // None of this wrote anything.
    assert_eq!(position(store).await, pos);
}

async fn change_feed_wakes_a_waiting_reader(store: Arc<dyn Store>) {
    let lic = with_license(&*store, "wake").await;
    let pos = position(&*store).await;
    let reader = {
        let store = Arc::clone(&store);
        let pos = pos.clone();
        tokio::spawn(async move {
            let t = Instant::now();
            let changes = store.changes(&pos, Duration::from_secs(20)).await;
            (changes, t.elapsed())
        })
    };
    let (_, change) = created(assign(&*store, "alice", Feature::User, &purchased(&lic, 1)).await);
    let (changes, took) = reader.await.unwrap();
    assert_eq!(changes.unwrap(), Changes::Events(vec![change]));
    assert!(
        took < Duration::from_secs(10),
        "a write ends the wait, took {took:?}"
    );
}

// ---------------------------------------------------------------------------
// data loss and restore
// ---------------------------------------------------------------------------

async fn data_loss_refuses_writes_until_restored(
    store: &dyn Store,
    wipe: &(dyn Fn() + Send + Sync),
) {
    let lic = with_license(store, "loss").await;
    let plan = purchased(&lic, 3);
    let (alice, _) = created(assign(store, "alice", Feature::User, &plan).await);
    created(assign(store, "alice", Feature::CallAssist, &plan).await);
    created(assign(store, "bob", Feature::User, &tryout(3)).await);
    store
        .compare_and_set_tryout(None, &started_tryout())
        .await
        .unwrap()
        .unwrap();
    store
        .record_reconcile(&reconcile_status(ReconcileOutcome::Updated))
        .await
        .unwrap();
    store.set_initialization(&pending("loss")).await.unwrap();
    let old = snapshot(store).await;
    let old_pos = old.position.clone().unwrap();
    assert_eq!(old.seats.len(), 3);

    wipe();

    let lost = snapshot(store).await;
    assert_eq!(lost.position, None);
    assert!(lost.seats.is_empty());
    assert_eq!(lost.license, None);
    assert_eq!(lost.tryout, None);
    assert_eq!(lost.initialization, None);
    assert_eq!(
        store
            .changes(&old_pos, Duration::from_millis(50))
            .await
            .unwrap(),
        Changes::Resync
    );

    // Every write is refused: an empty store must not look like "no seats in use".
    assert_eq!(
        store.assign_seat(&uid("carol"), Feature::User, &plan).await,
        Err(StoreError::NotInitialized)
    );
    assert_eq!(
        store
            .assign_seat(&uid("carol"), Feature::User, &tryout(3))
            .await,
        Err(StoreError::NotInitialized)
    );
    assert_eq!(
        store.release_seat(&uid("alice"), Feature::User, None).await,
        Err(StoreError::NotInitialized)
    );
    assert_eq!(
        store
            .release_seat(&uid("alice"), Feature::User, Some((3, "any")))
            .await,
        Err(StoreError::NotInitialized)
    );
    assert_eq!(
        store.compare_and_set_tryout(None, &started_tryout()).await,
        Err(StoreError::NotInitialized)
    );
    assert_eq!(
        store.apply_license(plain(None, &lic)).await,
        Err(StoreError::NotInitialized)
    );
    assert_eq!(
        store
            .apply_license(LicenseWrite {
                capacities: &[(Feature::User, 0)],
                ..plain(Some(lic.id()), &lic)
            })
            .await,
        Err(StoreError::NotInitialized)
    );
    assert_eq!(
        store.set_initialization(&pending("lost")).await,
        Err(StoreError::NotInitialized)
    );
    assert_eq!(store.reset().await, Err(StoreError::NotInitialized));
    assert_eq!(
        store.record_reconcile(&ReconcileStatus::default()).await,
        Err(StoreError::NotInitialized)
    );
    assert_eq!(
        snapshot(store).await.position,
        None,
        "refused writes wrote nothing"
    );

    // Restore from what a replica still holds.
    assert!(store.restore(&old).await.unwrap());
    let restored = snapshot(store).await;
    let new_pos = restored.position.clone().expect("restored");
    assert_ne!(new_pos.epoch, old_pos.epoch, "a restore starts a new epoch");
    assert_eq!(restored.seats, old.seats);
    assert_eq!(restored.license, old.license);
    assert_eq!(restored.tryout, old.tryout);
    assert_eq!(restored.reconcile, old.reconcile);
    assert_eq!(restored.initialization, old.initialization);
    assert_eq!(
        store.list_seats(None, None, 100).await.unwrap(),
        old.seats,
        "the seat listing is restored too"
    );
    // Positions of the lost epoch cannot be continued.
    assert_eq!(
        store
            .changes(&old_pos, Duration::from_millis(50))
            .await
            .unwrap(),
        Changes::Resync
    );

    // A second restore (another replica, later) does nothing.
    assert!(!store.restore(&Snapshot::default()).await.unwrap());
    assert!(!store.restore(&old).await.unwrap());
    assert_eq!(snapshot(store).await, restored);

    // The restored store works: capacity counts the restored seats.
    assert_eq!(
        assign(store, "alice", Feature::User, &plan).await,
        AssignOutcome::Existing(alice)
    );
    let (_, carol) = created(assign(store, "carol", Feature::User, &plan).await);
    assert_eq!(carol.version, new_pos.version + 1);
    assert_eq!(
        assign(store, "dave", Feature::User, &purchased(&lic, 2)).await,
        AssignOutcome::Exhausted {
            capacity: 2,
            in_use: 2
        }
    );
    assert_eq!(drain(store, &new_pos).await, vec![carol]);
}

async fn restore_keeps_over_capacity_marks(store: &dyn Store, wipe: &(dyn Fn() + Send + Sync)) {
    // A replica's snapshot may hold seats marked over capacity; a restore keeps
    // every field (at the millisecond precision every store keeps).
    let lic = with_license(store, "marks").await;
    let mut old = snapshot(store).await;
    wipe();
    let at = ms_now();
    old.seats = vec![
        Seat {
            user_id: uid("over"),
            feature: Feature::User,
            source: SeatSource::Purchased,
            assigned_at: at - chrono::Duration::hours(2),
            over_capacity_since: Some(at - chrono::Duration::minutes(5)),
        },
        Seat {
            user_id: uid("trial"),
            feature: Feature::User,
            source: SeatSource::Tryout,
            assigned_at: at,
            over_capacity_since: None,
        },
    ];
    assert!(store.restore(&old).await.unwrap());
    let restored = snapshot(store).await;
    assert_eq!(restored.seats, old.seats);
    assert_eq!(restored.license, Some(lic.clone()));
    // The tryout seat counts against the tryout pool, the other against purchased.
    assert_eq!(
        assign(store, "x", Feature::User, &tryout(1)).await,
        AssignOutcome::Exhausted {
            capacity: 1,
            in_use: 1
        }
    );
    assert_eq!(
        assign(store, "x", Feature::User, &purchased(&lic, 1)).await,
        AssignOutcome::Exhausted {
            capacity: 1,
            in_use: 1
        }
    );
}

async fn restore_keeps_the_pending_initialization(
    store: &dyn Store,
    wipe: &(dyn Fn() + Send + Sync),
) {
    let lic = with_license(store, "restore-init").await;
    let init = pending("restore-init");
    store.set_initialization(&init).await.unwrap();
    let old = snapshot(store).await;
    assert_eq!(old.initialization, Some(init.clone()));
    wipe();
    assert_eq!(snapshot(store).await.initialization, None);

    assert!(store.restore(&old).await.unwrap());
    let restored = snapshot(store).await;
    assert_eq!(restored.initialization, Some(init.clone()));
    // The restored one is the one an activation consumes.
    let next = license("restore-init-2", 1);
    let changes = apply(
        store,
        LicenseWrite {
            consume_initialization: Some(&init),
            ..plain(Some(lic.id()), &next)
        },
    )
    .await
    .expect("the restored initialization is the stored one");
    assert_eq!(changes[1].kind, ChangeKind::InitializationConsumed);
    assert_eq!(snapshot(store).await.initialization, None);

    // A snapshot without one restores none.
    let without = snapshot(store).await;
    wipe();
    assert!(store.restore(&without).await.unwrap());
    assert_eq!(snapshot(store).await.initialization, None);
}

async fn over_capacity_order_is_assignment_time_then_user_id(
    store: &dyn Store,
    wipe: &(dyn Fn() + Send + Sync),
) {
    // Seats with chosen times, through a restore: the newest assignment is flagged
    // first whatever its user id; equal times go to the higher user id first; an
    // existing flag keeps its time.
    let lic = with_license(store, "order").await;
    let mut old = snapshot(store).await;
    wipe();
    let t = ms_now() - chrono::Duration::days(1);
    let since = t + chrono::Duration::hours(1);
    let seat = |user: &str, hours_ago: i64, flagged: bool| Seat {
        user_id: uid(user),
        feature: Feature::User,
        source: SeatSource::Purchased,
        assigned_at: t - chrono::Duration::hours(hours_ago),
        over_capacity_since: flagged.then_some(since),
    };
    old.seats = vec![
        seat("zed", 4, false),
        seat("abe", 3, true),
        seat("amy", 2, false),
        seat("bob", 0, false),
        seat("cat", 0, true),
        // A newer tryout seat is not in the purchased pool.
        Seat {
            source: SeatSource::Tryout,
            ..seat("zzz", -1, false)
        },
    ];
    assert!(store.restore(&old).await.unwrap());

    // Newest first: cat, bob (a tie, higher id first), amy, abe, zed. Capacity 2
    // flags cat, bob and amy and clears abe.
    let next = license("order-2", 2);
    let t0 = Utc::now();
    let changes = apply(
        store,
        LicenseWrite {
            capacities: &[(Feature::User, 2)],
            ..plain(Some(lic.id()), &next)
        },
    )
    .await
    .expect("expectations hold");
    let t1 = Utc::now();
    let moved = flagged_seats(&changes[1..]);
    assert_eq!(users_of(&moved), ["abe", "amy", "bob"]);
    assert_eq!(moved[0], seat("abe", 3, false));
    for s in &moved[1..] {
        assert_near(s.over_capacity_since.expect("flagged"), t0, t1);
    }
    let snap = snapshot(store).await;
    assert_eq!(flagged_users(&snap, Feature::User), ["amy", "bob", "cat"]);
    assert_eq!(
        seat_in(&snap, Feature::User, "cat"),
        seat("cat", 0, true),
        "cat keeps its flag time"
    );
    assert_eq!(seat_in(&snap, Feature::User, "zed"), seat("zed", 4, false));
    assert_eq!(
        seat_in(&snap, Feature::User, "zzz").over_capacity_since,
        None
    );

    // Capacity 4: only the newest stays flagged; of the tie, bob is cleared.
    let wider = license("order-3", 4);
    let changes = apply(
        store,
        LicenseWrite {
            capacities: &[(Feature::User, 4)],
            ..plain(Some(next.id()), &wider)
        },
    )
    .await
    .expect("expectations hold");
    assert_eq!(users_of(&flagged_seats(&changes[1..])), ["amy", "bob"]);
    let snap = snapshot(store).await;
    assert_eq!(flagged_users(&snap, Feature::User), ["cat"]);
    assert_eq!(seat_in(&snap, Feature::User, "cat"), seat("cat", 0, true));

    // Releasing the oldest seat with capacity 4 clears the last flag.
    let changes = release(store, "zed", Feature::User, Some(4))
        .await
        .expect("zed held a seat");
    assert_eq!(flagged_seats(&changes[1..]), vec![seat("cat", 0, false)]);
}

async fn lease_tokens_keep_growing_across_data_loss(
    store: &dyn Store,
    wipe: &(dyn Fn() + Send + Sync),
) {
    // A replica that took the lease before the store lost its data may still be
    // writing with its token: no later grant may hand out that token again.
    with_license(store, "lease-loss").await;
    let before = store
        .acquire_lease("replica-a", LONG)
        .await
        .unwrap()
        .expect("a free lease");
    let old = snapshot(store).await;
    wipe();
    assert!(store.restore(&old).await.unwrap());
    let after = acquire_within(store, "replica-b", Duration::from_secs(10)).await;
    assert!(
        after > before,
        "a grant after data loss reuses token {after} (first grant was {before})"
    );
    // The old holder's token is fenced off.
    let lic = old.license.as_ref().unwrap();
    let next = license("lease-loss-2", 1);
    assert_eq!(
        apply(
            store,
            LicenseWrite {
                fence: Some(before),
                ..plain(Some(lic.id()), &next)
            },
        )
        .await,
        None
    );
}

// ---------------------------------------------------------------------------
// concurrency
// ---------------------------------------------------------------------------

async fn concurrent_assigns_never_exceed_capacity(store: Arc<dyn Store>) {
    let lic = with_license(&*store, "race").await;
    let plan = purchased(&lic, 10);
    let tasks: Vec<_> = (0..200)
        .map(|i| {
            let store = Arc::clone(&store);
            let plan = plan.clone();
            tokio::spawn(async move {
                store
                    .assign_seat(&uid(&format!("user-{i:03}")), Feature::User, &plan)
                    .await
            })
        })
        .collect();
    let mut created_versions = BTreeSet::new();
    let mut exhausted = 0;
    for task in tasks {
        match task.await.unwrap().expect("assign_seat") {
            AssignOutcome::Created(change) => {
                assert!(
                    created_versions.insert(change.version),
                    "versions are unique"
                );
            }
            AssignOutcome::Exhausted { capacity, in_use } => {
                assert_eq!((capacity, in_use), (10, 10));
                exhausted += 1;
            }
            other => panic!("unexpected outcome {other:?}"),
        }
    }
    assert_eq!(created_versions.len(), 10);
    assert_eq!(exhausted, 190);
    let snap = snapshot(&*store).await;
    assert_eq!(snap.seats.len(), 10);
    assert!(snap.seats.iter().all(|s| s.source == SeatSource::Purchased));
    assert_eq!(
        snap.position.unwrap().version,
        *created_versions.last().unwrap()
    );
}

async fn concurrent_assigns_of_one_user_create_one_seat(store: Arc<dyn Store>) {
    let lic = with_license(&*store, "same-user").await;
    let plan = purchased(&lic, 10);
    let tasks: Vec<_> = (0..50)
        .map(|_| {
            let store = Arc::clone(&store);
            let plan = plan.clone();
            tokio::spawn(
                async move { store.assign_seat(&uid("alice"), Feature::User, &plan).await },
            )
        })
        .collect();
    let mut created_seats = Vec::new();
    let mut existing = Vec::new();
    for task in tasks {
        match task.await.unwrap().expect("assign_seat") {
            outcome @ AssignOutcome::Created(_) => created_seats.push(created(outcome).0),
            AssignOutcome::Existing(seat) => existing.push(seat),
            other => panic!("unexpected outcome {other:?}"),
        }
    }
    assert_eq!(created_seats.len(), 1);
    assert_eq!(existing.len(), 49);
    assert!(existing.iter().all(|s| *s == created_seats[0]));
    assert_eq!(snapshot(&*store).await.seats, created_seats);

    // The same with a tryout pool.
    let tasks: Vec<_> = (0..50)
        .map(|i| {
            let store = Arc::clone(&store);
            tokio::spawn(async move {
                store
                    .assign_seat(&uid(&format!("t{}", i % 5)), Feature::User, &tryout(3))
                    .await
            })
        })
        .collect();
    let mut created_count = 0;
    for task in tasks {
        match task.await.unwrap().expect("assign_seat") {
            AssignOutcome::Created(_) => created_count += 1,
            AssignOutcome::Existing(seat) => assert_eq!(seat.source, SeatSource::Tryout),
            AssignOutcome::Exhausted { capacity, in_use } => {
                assert_eq!((capacity, in_use), (3, 3));
            }
            other => panic!("unexpected outcome {other:?}"),
        }
    }
    assert_eq!(created_count, 3);
    let tryout_seats = snapshot(&*store)
        .await
        .seats
        .into_iter()
        .filter(|s| s.source == SeatSource::Tryout)
        .count();
    assert_eq!(tryout_seats, 3);
}

// ---------------------------------------------------------------------------
// integrity: the writer's floor, repair, the release guard, the high-water clock
// ---------------------------------------------------------------------------

async fn writes_below_the_floor_are_refused(store: &dyn Store) {
    created(assign(store, "a", Feature::User, &tryout(5)).await);
    let at = position(store).await;
    // A writer that has seen a later version: the store went back behind it.
    store.set_floor(Some(Position {
        epoch: at.epoch.clone(),
        version: at.version + 1,
    }));
    assert_eq!(
        store
            .assign_seat(&uid("b"), Feature::User, &tryout(5))
            .await,
        Err(StoreError::Moved)
    );
    assert_eq!(
        store.release_seat(&uid("a"), Feature::User, None).await,
        Err(StoreError::Moved)
    );
    assert_eq!(
        store.record_reconcile(&ReconcileStatus::default()).await,
        Err(StoreError::Moved)
    );
    // A writer that knows another epoch.
    store.set_floor(Some(Position {
        epoch: "another".into(),
        version: 0,
    }));
    assert_eq!(store.reset().await, Err(StoreError::Moved));
    assert_eq!(position(store).await, at, "nothing was written");
    // At or below the store's version: written.
    store.set_floor(Some(at.clone()));
    created(assign(store, "b", Feature::User, &tryout(5)).await);
    store.set_floor(None);
    created(assign(store, "c", Feature::User, &tryout(5)).await);
}

async fn repair_writes_back_only_where_it_was_planned(store: &dyn Store) {
    created(assign(store, "keep", Feature::User, &tryout(5)).await);
    created(assign(store, "gone", Feature::User, &tryout(5)).await);
    let at = position(store).await;
    let tryout_record = started_tryout();
    let lost = Seat {
        user_id: uid("lost"),
        feature: Feature::User,
        source: SeatSource::Tryout,
        assigned_at: ms_now(),
        over_capacity_since: None,
    };
    let mut incident = Incident {
        at: ms_now(),
        rolled_back_from: at.version + 5,
        ..Incident::default()
    };
    incident.restored("seat user/lost".into());
    incident.lost("seat user/full".into());
    let write = RepairWrite {
        expected: Some(Position {
            epoch: at.epoch.clone(),
            version: at.version + 1,
        }),
        version_floor: at.version + 5,
        add_seats: vec![lost.clone()],
        remove_seats: vec![(Feature::User, uid("gone"))],
        tryout: Some(tryout_record.clone()),
        incident: incident.clone(),
        ..RepairWrite::default()
    };
    // Planned on another position: nothing written.
    assert_eq!(store.repair(&write).await, Ok(None));
    assert_eq!(position(store).await, at);

    let write = RepairWrite {
        expected: Some(at.clone()),
        ..write
    };
    let changes = store.repair(&write).await.unwrap().expect("repaired");
    let kinds: Vec<ChangeKind> = changes.iter().map(|c| c.kind.clone()).collect();
    assert_eq!(
        kinds,
        [
            ChangeKind::SeatAssigned(lost.clone()),
            ChangeKind::SeatReleased {
                feature: Feature::User,
                user_id: uid("gone"),
            },
            ChangeKind::TryoutChanged(tryout_record.clone()),
            ChangeKind::Repaired(incident.clone()),
        ]
    );
    // The versions jump above every version a replica saw, then count up.
    assert_consecutive(&changes, at.version + 5);
    let snap = snapshot(store).await;
    assert_eq!(users_of(&snap.seats), ["keep", "lost"]);
    assert_eq!(snap.incident, Some(incident));
    assert_eq!(snap.tryout, Some(tryout_record.clone()));
    // The feed holds the repair's entries after the jump.
    let history = store.history(at.version).await.unwrap();
    assert_eq!(history, changes);
    // A follower at the old position sees a gap (and re-reads).
    match store.changes(&at, Duration::from_millis(50)).await.unwrap() {
        Changes::Resync => {}
        Changes::Events(events) => assert_ne!(events[0].version, at.version + 1),
    }
}

async fn release_reflag_is_guarded_by_the_stored_license(store: &dyn Store) {
    let lic = with_license(store, "guard").await;
    created(assign(store, "a", Feature::User, &purchased(&lic, 5)).await);
    let other = license("other", 1);
    assert_eq!(
        store
            .release_seat(&uid("a"), Feature::User, Some((1, other.id())))
            .await,
        Err(StoreError::Moved),
        "capacity read from another license"
    );
    assert_eq!(users_of(&snapshot(store).await.seats), ["a"]);
    assert!(
        store
            .release_seat(&uid("a"), Feature::User, Some((1, lic.id())))
            .await
            .unwrap()
            .is_some()
    );
}

async fn high_water_clock_only_grows(store: &dyn Store) {
    let start = snapshot(store).await.high_water_ms;
    let t = start.max(1_767_225_600_000) + 1000;
    assert_eq!(store.advance_clock(t).await.unwrap().high_water_ms, t);
    assert_eq!(store.advance_clock(t - 500).await.unwrap().high_water_ms, t);
    // 0 only reads.
    assert_eq!(store.advance_clock(0).await.unwrap().high_water_ms, t);
    assert_eq!(snapshot(store).await.high_water_ms, t);
}

/// Days in ms, for clocks that leap.
const DAY_MS: i64 = 86_400_000;

/// A replica's clock 90 days ahead cannot carry the shared mark with it: the
/// store raises it at most to its own time, which it reports as the reference.
async fn high_water_clock_never_passes_the_store_time(store: &dyn Store) {
    let wall = chrono::Utc::now().timestamp_millis();
    let reading = store.advance_clock(wall + 90 * DAY_MS).await.unwrap();
    // The reference is the store's clock (Redis TIME, or this process's own
    // clock for the embedded store): here, the same host's.
    assert!(
        (reading.reference_ms - wall).abs() < 60_000,
        "{reading:?} vs {wall}"
    );
    assert!(reading.high_water_ms <= reading.reference_ms, "{reading:?}");
    assert!(snapshot(store).await.high_water_ms <= reading.reference_ms);
}

/// A restore writes back the replica's mark, but not beyond the store's time.
async fn restore_caps_the_high_water_clock(store: &dyn Store, wipe: &(dyn Fn() + Send + Sync)) {
    let mut old = snapshot(store).await;
    let wall = chrono::Utc::now().timestamp_millis();
    old.high_water_ms = wall + 90 * DAY_MS;
    wipe();
    assert!(store.restore(&old).await.unwrap());
    let reference = store.advance_clock(0).await.unwrap().reference_ms;
    assert!(snapshot(store).await.high_water_ms <= reference);
}

// ---------------------------------------------------------------------------
// Audit trail
// ---------------------------------------------------------------------------

fn audit_event(n: usize) -> AuditEvent {
    AuditEvent {
        time: Utc::now(),
        caller: "ops".into(),
        role: "operator".into(),
        method: "AssignSeat".into(),
        user_id: format!("user-{n}"),
        feature: "user".into(),
        code: if n.is_multiple_of(2) {
            "OK"
        } else {
            "PERMISSION_DENIED"
        }
        .into(),
        detail: format!("detail {n} ✓"),
        trace_id: "4bf92f3577b34da6a3ce929d0e0e4736".into(),
    }
}

async fn audit_users(store: &dyn Store, before: Option<&str>, limit: usize) -> Vec<String> {
    store
        .list_audit(before, limit)
        .await
        .expect("list the audit trail")
        .into_iter()
        .map(|e| e.event.user_id)
        .collect()
}

async fn audit_lists_newest_first_in_pages(store: &dyn Store) {
    assert!(store.list_audit(None, 10).await.unwrap().is_empty());
    let retention = AuditRetention::default();
    for n in 0..7 {
        store
            .append_audit(&audit_event(n), &retention)
            .await
            .unwrap();
    }
    let first = store.list_audit(None, 3).await.unwrap();
    assert_eq!(first.len(), 3);
    // Every field round-trips.
    let mut expected = audit_event(6);
    expected.time = first[0].event.time;
    assert_eq!(first[0].event, expected);
    let names: Vec<&str> = first.iter().map(|e| e.event.user_id.as_str()).collect();
    assert_eq!(names, ["user-6", "user-5", "user-4"]);
    let rest = audit_users(store, Some(&first[2].id), 10).await;
    assert_eq!(rest, ["user-3", "user-2", "user-1", "user-0"]);
    assert!(audit_users(store, Some("0-0"), 10).await.is_empty());
}

async fn audit_is_bounded_by_max_entries(store: &dyn Store) {
    let retention = AuditRetention {
        max_entries: 5,
        ..AuditRetention::default()
    };
    // Accepted changes only (even numbers): the newest max_entries are kept.
    for n in (0..24).step_by(2) {
        store
            .append_audit(&audit_event(n), &retention)
            .await
            .unwrap();
    }
    let kept = audit_users(store, None, 100).await;
    assert_eq!(
        kept,
        ["user-22", "user-20", "user-18", "user-16", "user-14"],
        "the newest max_entries are kept"
    );
}

/// Refusals (odd numbers) are bounded apart from the changes: however many
/// come, the changes stay; the listing merges both, newest first, and pages
/// visit every entry once.
async fn audit_refusals_never_displace_changes(store: &dyn Store) {
    let retention = AuditRetention {
        max_entries: 3,
        max_refusals: 4,
        ..AuditRetention::default()
    };
    for n in [0, 1, 2, 4] {
        store
            .append_audit(&audit_event(n), &retention)
            .await
            .unwrap();
    }
    for n in (5..200).step_by(2) {
        store
            .append_audit(&audit_event(n), &retention)
            .await
            .unwrap();
    }
    store
        .append_audit(&audit_event(200), &retention)
        .await
        .unwrap();
    let expected = [
        "user-200", "user-199", "user-197", "user-195", "user-193", "user-4", "user-2",
    ];
    assert_eq!(audit_users(store, None, 100).await, expected);
    let mut paged = Vec::new();
    let mut before: Option<String> = None;
    loop {
        let page = store.list_audit(before.as_deref(), 2).await.unwrap();
        let Some(last) = page.last() else { break };
        before = Some(last.id.clone());
        paged.extend(page.into_iter().map(|e| e.event.user_id));
    }
    assert_eq!(paged, expected, "pages of 2 visit every entry once");
}

async fn audit_drops_entries_older_than_max_age(store: &dyn Store) {
    let retention = AuditRetention::default();
    store
        .append_audit(&audit_event(0), &retention)
        .await
        .unwrap();
    // Not synchronisation: the entry must be older than the age bound below.
    tokio::time::sleep(Duration::from_millis(60)).await;
    let short = AuditRetention {
        max_age: chrono::Duration::milliseconds(30),
        ..AuditRetention::default()
    };
    store.append_audit(&audit_event(1), &short).await.unwrap();
    assert_eq!(audit_users(store, None, 10).await, ["user-1"]);
}

// ---------------------------------------------------------------------------
// Records this code did not write (Redis only)
// ---------------------------------------------------------------------------
//
// The memory store holds domain values, not bytes: it cannot hold a corrupt
// record, nor one with a field this code does not know (a newer replica's). So
// these cases run against Redis only; each writes the bytes with a raw
// connection under the test's own serial number.

macro_rules! redis_only {
    ($($case:ident;)*) => {
        mod redis_store_records {
            use super::*;
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    let subject = Subject::redis(stringify!($case)).await;
                    super::$case(&subject).await;
                }
            )*
        }
    };
}

redis_only! {
    corrupt_seat_does_not_stop_a_smaller_license;
    corrupt_seat_does_not_stop_a_release;
    corrupt_own_seat_is_replaced_in_its_slot;
    corrupt_tryout_record_is_replaced_by_compare_and_set;
    corrupt_license_record_is_replaced_by_the_next_license;
    records_with_unknown_fields_can_be_compared_and_set;
    corrupt_fence_does_not_leave_a_lease_taken;
    bad_version_counter_refuses_writes_before_any;
    corrupt_clock_does_not_stop_a_restore;
}

const USER_POOL: &str = "seats:user:purchased";

/// Raw commands on one Redis subject's keys (`name` is the part after the prefix).
struct Raw<'a>(&'a Subject);

impl Raw<'_> {
    fn key(&self, name: &str) -> String {
        format!("lic:{{{}}}:{name}", self.0.serial)
    }

    fn run<T: redis::FromRedisValue>(&self, cmd: &mut redis::Cmd) -> T {
        let mut conn = self.0.redis.as_ref().expect("a Redis subject").connection();
        cmd.query(&mut conn).expect("a raw Redis command")
    }

    fn set(&self, name: &str, value: &str) {
        self.run::<()>(redis::cmd("SET").arg(self.key(name)).arg(value));
    }

    fn hset(&self, name: &str, field: &str, value: &str) {
        self.run::<i64>(redis::cmd("HSET").arg(self.key(name)).arg(field).arg(value));
    }

    fn hexists(&self, name: &str, field: &str) -> bool {
        self.run(redis::cmd("HEXISTS").arg(self.key(name)).arg(field))
    }

    /// Writes `value` to the string record `name` and reports it in the feed,
    /// as a newer replica's script would.
    fn write_as_newer_replica(&self, name: &str, kind: &str, value: &str) {
        let v: u64 = self.run(redis::cmd("INCR").arg(self.key("version")));
        self.set(name, value);
        self.run::<String>(
            redis::cmd("XADD")
                .arg(self.key("changes"))
                .arg(format!("{v}-0"))
                .arg("k")
                .arg(kind)
                .arg("d")
                .arg(value),
        );
    }
}

/// `json` with one more field, as a newer replica adds an optional one.
fn with_unknown_field(json: &str, path: &[&str]) -> String {
    let mut value: serde_json::Value = serde_json::from_str(json).expect("a stored record");
    let mut at = &mut value;
    for part in path {
        at = &mut at[*part];
    }
    at["added_by_a_newer_replica"] = serde_json::Value::Bool(true);
    value.to_string()
}

/// The issue's reproduction: an unreadable seat, then a license with fewer seats.
async fn corrupt_seat_does_not_stop_a_smaller_license(subject: &Subject) {
    let store = &*subject.store;
    let lic = with_license(store, "corrupt-drop").await;
    assign_in_order(
        store,
        &lic,
        Feature::User,
        &["alice", "carol", "dave", "erin"],
    )
    .await;
    Raw(subject).hset(USER_POOL, "bob", "garbage");

    // Applies `next` over `current` with two user seats.
    let two_users = async |current: &StoredLicense, next: &StoredLicense| {
        apply(
            store,
            LicenseWrite {
                capacities: &[(Feature::User, 2)],
                ..plain(Some(current.id()), next)
            },
        )
        .await
        .expect("expectations hold")
    };
    let smaller = license("corrupt-drop-2", 2);
    let changes = two_users(&lic, &smaller).await;
    assert_eq!(changes[0].kind, ChangeKind::LicenseApplied(smaller.clone()));
    // Five seats for two: bob's unreadable record still takes its slot, so the
    // three most recent readable seats are flagged and no more than two are left.
    assert_eq!(
        users_of(&flagged_seats(&changes[1..])),
        ["carol", "dave", "erin"]
    );
    let snap = snapshot(store).await;
    assert_eq!(snap.license.as_ref(), Some(&smaller));
    assert_eq!(
        flagged_users(&snap, Feature::User),
        ["carol", "dave", "erin"]
    );
    assert!(
        snap.corrupt.iter().any(|c| c.contains("bob")),
        "the corrupt seat is reported: {:?}",
        snap.corrupt
    );

    // The next reconcile at the same quantity finds the flags in place.
    let changes = two_users(&smaller, &license("corrupt-drop-3", 2)).await;
    assert_eq!(changes.len(), 1, "only the license: {changes:?}");
}

async fn corrupt_seat_does_not_stop_a_release(subject: &Subject) {
    let store = &*subject.store;
    let lic = with_license(store, "corrupt-release").await;
    assign_in_order(store, &lic, Feature::User, &["u1", "u2", "u3"]).await;
    // JSON, but no seat record (no assignment time); and bytes that are not text.
    Raw(subject).hset(USER_POOL, "bob", r#"{"v":1}"#);
    Raw(subject).run::<i64>(
        redis::cmd("HSET")
            .arg(Raw(subject).key(USER_POOL))
            .arg(&b"\xff\xfe"[..])
            .arg(&b"\xff"[..]),
    );

    let changes = release(store, "u1", Feature::User, Some(2))
        .await
        .expect("u1 held a seat");
    assert_eq!(
        changes[0].kind,
        ChangeKind::SeatReleased {
            feature: Feature::User,
            user_id: uid("u1"),
        }
    );
    // u2, u3 and two corrupt records are left for two: both readable are flagged.
    assert_eq!(users_of(&flagged_seats(&changes[1..])), ["u2", "u3"]);
    let snap = snapshot(store).await;
    assert_eq!(users_of(&snap.seats), ["u2", "u3"]);
    assert_eq!(flagged_users(&snap, Feature::User), ["u2", "u3"]);
    assert_eq!(snap.corrupt.len(), 2, "{:?}", snap.corrupt);
    assert!(
        Raw(subject).hexists(USER_POOL, "bob"),
        "a corrupt record is skipped, not removed"
    );
}

async fn corrupt_own_seat_is_replaced_in_its_slot(subject: &Subject) {
    let store = &*subject.store;
    let raw = Raw(subject);
    let lic = with_license(store, "corrupt-own").await;
    created(assign(store, "alice", Feature::User, &purchased(&lic, 10)).await);
    raw.hset(USER_POOL, "bob", "garbage");
    raw.run::<i64>(
        redis::cmd("ZADD")
            .arg(raw.key("seat_index"))
            .arg(0)
            .arg("user\0bob"),
    );
    // Skipped by every read, but still a seat in use for capacity.
    assert_eq!(
        users_of(&store.list_seats(None, None, 10).await.unwrap()),
        ["alice"]
    );
    assert_eq!(users_of(&snapshot(store).await.seats), ["alice"]);
    let two = purchased(&lic, 2);
    let full = |in_use| AssignOutcome::Exhausted {
        capacity: 2,
        in_use,
    };
    assert_eq!(assign(store, "carol", Feature::User, &two).await, full(2));

    // Bob gets a readable seat in his own slot.
    let (seat, _) = created(assign(store, "bob", Feature::User, &two).await);
    assert_eq!(seat.source, SeatSource::Purchased);
    let snap = snapshot(store).await;
    assert_eq!(users_of(&snap.seats), ["alice", "bob"]);
    assert!(snap.corrupt.is_empty(), "{:?}", snap.corrupt);

    // Where the others already fill the pool, a corrupt record stays as it is:
    // replacing it would give one seat more than the quantity.
    raw.hset(USER_POOL, "dave", "garbage");
    assert_eq!(assign(store, "dave", Feature::User, &two).await, full(3));
}

/// Every replica reads a corrupt tryout record as none, so a write expecting
/// none replaces it (the tryout is also once per serial at the licensing server).
async fn corrupt_tryout_record_is_replaced_by_compare_and_set(subject: &Subject) {
    let store = &*subject.store;
    Raw(subject).set("tryout", "garbage");
    let snap = snapshot(store).await;
    assert_eq!(snap.tryout, None);
    assert!(!snap.corrupt.is_empty());

    let new = started_tryout();
    assert!(
        store
            .compare_and_set_tryout(None, &new)
            .await
            .unwrap()
            .is_some(),
        "the corrupt record read as none is replaced"
    );
    let snap = snapshot(store).await;
    assert_eq!(snap.tryout, Some(new));
    assert!(snap.corrupt.is_empty(), "{:?}", snap.corrupt);
}

/// A replica reads a corrupt license record as none (every seat unlicensed):
/// the next license applied, expecting none, must replace it, not conflict for ever.
async fn corrupt_license_record_is_replaced_by_the_next_license(subject: &Subject) {
    let store = &*subject.store;
    with_license(store, "corrupt-license").await;
    Raw(subject).hset("license", "record", "garbage");
    let snap = snapshot(store).await;
    assert_eq!(snap.license, None);
    assert!(!snap.corrupt.is_empty());

    let next = license("corrupt-license-2", 5);
    let changes = apply(store, plain(None, &next))
        .await
        .expect("the corrupt record read as none is replaced");
    assert_eq!(changes[0].kind, ChangeKind::LicenseApplied(next.clone()));
    assert_eq!(snapshot(store).await.license, Some(next));
}

/// During a rolling upgrade a newer replica writes records with a field this
/// code does not know; compare-and-set compares what was read, not this code's
/// re-encoding, so the two never conflict for ever.
async fn records_with_unknown_fields_can_be_compared_and_set(subject: &Subject) {
    use comtrexx_licensing::store::records::{InitializationRecordV1, TryoutRecordV1};
    let store = &*subject.store;
    let raw = Raw(subject);

    // Read in a snapshot.
    let started = started_tryout();
    let text = with_unknown_field(&TryoutRecordV1::encode(&started), &["record"]);
    raw.set("tryout", &with_unknown_field(&text, &[]));
    assert_eq!(snapshot(store).await.tryout.as_ref(), Some(&started));
    let done = ended(&started);
    assert!(
        store
            .compare_and_set_tryout(Some(&started), &done)
            .await
            .unwrap()
            .is_some(),
        "a record with an unknown field is the expected one"
    );
    assert_eq!(snapshot(store).await.tryout.as_ref(), Some(&done));

    // Read from the change feed.
    let before = position(store).await;
    let newer = ended(&done);
    raw.write_as_newer_replica(
        "tryout",
        "tryout",
        &with_unknown_field(&TryoutRecordV1::encode(&newer), &["record"]),
    );
    assert_eq!(
        drain(store, &before)
            .await
            .into_iter()
            .map(|c| c.kind)
            .collect::<Vec<_>>(),
        [ChangeKind::TryoutChanged(newer.clone())]
    );
    assert!(
        store
            .compare_and_set_tryout(Some(&newer), &ended(&newer))
            .await
            .unwrap()
            .is_some(),
        "a record read from the feed is the expected one"
    );

    // The pending initialization an activation consumes, likewise.
    let issued = pending("newer-replica");
    raw.set(
        "init",
        &with_unknown_field(&InitializationRecordV1::encode(&issued), &["pending"]),
    );
    assert_eq!(snapshot(store).await.initialization.as_ref(), Some(&issued));
    let lic = license("unknown-fields", 5);
    let changes = apply(
        store,
        LicenseWrite {
            consume_initialization: Some(&issued),
            ..plain(None, &lic)
        },
    )
    .await
    .expect("the initialization read is the expected one");
    assert_eq!(
        changes.last().map(|c| &c.kind),
        Some(&ChangeKind::InitializationConsumed)
    );
}

async fn corrupt_fence_does_not_leave_a_lease_taken(subject: &Subject) {
    let store = &*subject.store;
    Raw(subject).set("fence", "garbage");
    let ttl = Duration::from_secs(30);
    let token = store
        .acquire_lease("a", ttl)
        .await
        .expect("a corrupt fencing counter is no error")
        .expect("the free lease is granted");
    let now = u64::try_from(Utc::now().timestamp_millis()).unwrap();
    assert!(token + 60_000 >= now, "tokens still grow with the clock");
    assert_eq!(store.acquire_lease("b", ttl).await.unwrap(), None);
    store.release_lease("a").await.unwrap();
    let next = store.acquire_lease("b", ttl).await.unwrap().unwrap();
    assert!(next > token);
}

async fn bad_version_counter_refuses_writes_before_any(subject: &Subject) {
    let store = &*subject.store;
    let raw = Raw(subject);
    let lic = with_license(store, "bad-version").await;
    for bad in ["garbage", "0"] {
        // Not a number, or behind the change feed: the version the next entry
        // would take is refused by the feed, after the seat was written.
        raw.set("version", bad);
        let err = store
            .assign_seat(&uid("alice"), Feature::User, &purchased(&lic, 5))
            .await
            .unwrap_err();
        assert!(matches!(err, StoreError::Corrupt(_)), "{bad}: {err:?}");
        assert!(
            !raw.hexists(USER_POOL, "alice"),
            "{bad}: nothing was written"
        );
    }
}

async fn corrupt_clock_does_not_stop_a_restore(subject: &Subject) {
    let store = &*subject.store;
    (subject.wipe)();
    Raw(subject).set("clock", "garbage");
    assert!(
        store
            .restore(&Snapshot::default())
            .await
            .expect("a corrupt clock does not stop the restore"),
        "the store lost its epoch"
    );
    assert!(snapshot(store).await.position.is_some());
}
