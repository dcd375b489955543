//! One conformance suite for the `Store` trait, run against both implementations:
//! the embedded `MemoryStore` and the `RedisStore` on a private `redis-server`.
//!
//! Every case is a plain async function over `&dyn Store` (plus, where needed, a
//! way to lose the store's data, or an `Arc` for concurrent callers); the
//! `conformance!` macro turns each into one test per store. The cases live in
//! one module per topic (`seats.rs`, `listing.rs`, `feed.rs`, ...), each listing
//! its own cases; this file holds the harness (the stores under test, the
//! macros) and the fixtures the topics share. Test names read
//! `<topic>::<store>::<case>`, e.g. `seats::redis_store::release_frees_a_seat_once`.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::{Duration, Instant};

use chrono::{DateTime, TimeZone, Utc};
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
    AssignOutcome, Change, ChangeKind, Changes, Incident, LicenseWrite, Position, ReleaseOutcome,
    RepairWrite, SeatKey, Snapshot, Store, StoreError, StoredLicense,
};
use comtrexx_licensing_test_support::RedisServer;
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
        let serial = comtrexx_licensing_test_support::serial(&tag);
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

/// Generates `redis_store::<case>` for cases that need a Redis subject itself
/// (its raw keys), not only its store.
macro_rules! redis_only {
    ($($case:ident;)*) => {
        mod redis_store {
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

// ---------------------------------------------------------------------------
// The cases, by topic (each module lists its cases in `conformance!`)
// ---------------------------------------------------------------------------

mod audit;
mod data_loss;
mod feed;
mod flags;
mod integrity;
mod leases;
mod license;
mod listing;
mod over_capacity;
mod reconcile;
mod records;
mod seats;
mod tryout;

// ---------------------------------------------------------------------------
// Fixtures shared by the topics
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
                seat_model: Default::default(),
                feature: Feature::User,
                quantity: users,
                expires_at: None,
            },
            Entitlement {
                seat_model: Default::default(),
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
    store
        .apply_license(None, write)
        .await
        .expect("apply_license")
}

/// Replaces the stored license `current` with `next`, passing the new seat
/// capacities; the changes it made (the license first, then flag changes).
async fn replace_license(
    store: &dyn Store,
    current: &StoredLicense,
    next: &StoredLicense,
    capacities: &[(Feature, u32)],
) -> Vec<Change> {
    apply(
        store,
        LicenseWrite {
            capacities,
            ..plain(Some(current.id()), next)
        },
    )
    .await
    .expect("expectations hold")
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
    match store
        .release_seat(None, &uid(user), feature, capacity.map(|c| (c, id)))
        .await
        .expect("release_seat")
    {
        ReleaseOutcome::Released(changes) => Some(changes),
        ReleaseOutcome::NotHeld { version } => {
            // Read your writes: a release of nothing answers the version the
            // absence is visible at, the store's (nothing was written).
            assert_eq!(version, current_version(store).await);
            None
        }
    }
}

/// The store's version now (0 without an epoch).
async fn current_version(store: &dyn Store) -> u64 {
    snapshot(store).await.position.map_or(0, |p| p.version)
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
        .assign_seat(None, &uid(user), feature, plan)
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
/// Starts the tryout, records a reconcile and issues an initialization
/// (`tag` its nonce): the records besides seats and the license, so that a case
/// sees every kind kept, lost or removed. The tryout record is returned.
async fn with_the_other_records(store: &dyn Store, tag: &str) -> TryoutRecord {
    let started = started_tryout();
    store
        .compare_and_set_tryout(None, None, &started)
        .await
        .unwrap()
        .unwrap();
    store
        .record_reconcile(None, &reconcile_status(ReconcileOutcome::Updated))
        .await
        .unwrap();
    store.set_initialization(None, &pending(tag)).await.unwrap();
    started
}

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

/// A lease time no test outlasts.
const LONG: Duration = Duration::from_secs(60);

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
