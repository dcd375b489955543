//! The Redis store, shared by all replicas.
//!
//! Keys (all carry the serial number as hash tag, so every script's keys share one
//! Redis Cluster slot):
//!
//! | key | type | holds |
//! | --- | --- | --- |
//! | `lic:{S}:epoch` | string | id of the current data epoch; absent = data lost |
//! | `lic:{S}:version` | string | write counter |
//! | `lic:{S}:changes` | stream | one entry per write, id `<version>-0` |
//! | `lic:{S}:seats:<feature>:<source>` | hash | user id → [`SeatRecordV1`] |
//! | `lic:{S}:seat_index` | sorted set | `<feature>\0<user id>`, for stable paging |
//! | `lic:{S}:order:<feature>` | sorted set | the purchased pool's readable seats: user id, score `assigned_at_ms` (the over-capacity order) |
//! | `lic:{S}:flagged:<feature>` | sorted set | the seats of `order:<feature>` flagged over capacity, same scores |
//! | `lic:{S}:order_at` | string | the version up to which every write kept the order sets (behind the version: rebuilt before use) |
//! | `lic:{S}:order_build` | string | a build of the order sets in progress: builder id and start version (expires 10 s after its last page) |
//! | `lic:{S}:license` | hash | `id` (signature), `record` ([`LicenseRecordV1`]) |
//! | `lic:{S}:tryout` | string | [`TryoutRecordV1`] |
//! | `lic:{S}:reconcile` | string | [`ReconcileRecordV1`] |
//! | `lic:{S}:init` | string | [`InitializationRecordV1`]: the pending initialization |
//! | `lic:{S}:lease` | string | holder of the reconcile lease (expires by itself) |
//! | `lic:{S}:fence` | string | fencing token of the latest lease grant |
//! | `lic:{S}:retired_license` | string | [`LicenseRecordV1`] a re-setup removed |
//! | `lic:{S}:clock` | string | high-water clock: the largest time seen (ms) |
//! | `lic:{S}:incident` | string | [`IncidentRecordV1`]: the last repair of lost data |
//! | `lic:{S}:audit` | stream | the audit trail's accepted changes, field `record` ([`AuditRecordV1`]) |
//! | `lic:{S}:audit_refusals` | stream | the audit trail's refusals (bounded apart), field `record` |
//! | `lic:{S}:audit_last` | string | the last audit entry id given, unique across both streams |
//! | `lic:{S}:lease_rec` | hash | lease id → [`LeaseRecordV1`]: the leases of concurrent features |
//! | `lic:{S}:lease_key` | hash | `<feature>\0<user id>\0<holder>` → lease id (one lease per holder, user and feature) |
//! | `lic:{S}:lease_pool:<feature>` | sorted set | the feature's lease ids, score `expires_at_ms` (Redis `TIME`): the live ones score above now |
//! | `lic:{S}:lease_usage` | hash | `peak:<feature>:<day>` → most live leases that day, `busy:<feature>:<day>` → refused acquisitions (day: days since 1970, UTC; kept 400 days; outside the versioned state) |
//!
//! Every write is one Lua script (`lua/`), so checks and writes are atomic across
//! replicas; every call is bounded by the configured timeout.

use std::collections::HashSet;
use std::future::Future;
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use async_trait::async_trait;
use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, RedisError, Script, Value};
use tokio::sync::Mutex as AsyncMutex;

#[path = "redis_order.rs"]
mod order;
#[path = "redis_snapshot.rs"]
mod snapshot;

use super::memory::new_epoch;
use super::records::{
    AuditRecordV1, IncidentRecordV1, InitializationRecordV1, LeaseRecordV1, LicenseRecordV1,
    ReconcileRecordV1, SeatRecordV1, TryoutRecordV1,
};
use super::redis_conn::{RedisConfig, RedisTarget};
use super::redis_conn::{RedisConn, Target, Writers};
use super::{
    AcquireOutcome, AssignOutcome, Change, ChangeKind, Changes, ClockReading, Floor, LeaseAcquire,
    LeaseReleaseOutcome, LeaseUsage, LicenseWrite, Position, ReleaseOutcome, RenewOutcome,
    RepairWrite, SeatKey, SeatSink, Snapshot, Store, StoreError, StoredLicense, Summary,
};
use crate::domain::audit::{
    AuditEntry, AuditEvent, AuditRetention, merge_newest_first, parse_entry_id,
};
use crate::domain::initcode::PendingInitialization;
use crate::domain::{
    AssignPlan, Feature, Holder, Lease, ReconcileStatus, Seat, SeatSource, SerialNumber,
    TryoutRecord, UserId,
};

/// How many feed entries Redis keeps (approximately) for mirrors that fall behind;
/// one that falls further behind reads a snapshot instead.
const FEED_LEN: u64 = 10_000;

const SOURCES: [SeatSource; 2] = [SeatSource::Purchased, SeatSource::Tryout];

/// How many times one write builds the seat order sets before it gives up.
const MAX_ORDER_BUILDS: u32 = 3;
/// At most this many ids in one lease renewal script: about 15 µs of Redis
/// per lease, so a script stays under about 8 ms (see BENCHMARKS.md); a larger
/// renewal is several scripts in one pipeline.
const RENEW_CHUNK: usize = 500;

macro_rules! script {
    ($file:literal) => {
        LazyLock::new(|| {
            Script::new(concat!(
                include_str!("lua/prelude.lua"),
                "\n",
                include_str!(concat!("lua/", $file))
            ))
        })
    };
}

static ASSIGN: LazyLock<Script> = script!("assign.lua");
static RELEASE: LazyLock<Script> = script!("release.lua");
static CAS_TRYOUT: LazyLock<Script> = script!("cas_tryout.lua");
static APPLY_LICENSE: LazyLock<Script> = script!("apply_license.lua");
static RECORD_RECONCILE: LazyLock<Script> = script!("record_reconcile.lua");
static SET_INITIALIZATION: LazyLock<Script> = script!("set_initialization.lua");
static RESET: LazyLock<Script> = script!("reset.lua");
static LEASE: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("lua/lease.lua")));
static UNLEASE: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("lua/unlease.lua")));
static SNAPSHOT: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("lua/snapshot.lua")));
static LIST: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("lua/list.lua")));
static RESTORE: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("lua/restore.lua")));
static REPAIR: LazyLock<Script> = script!("repair.lua");
static CLOCK: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("lua/clock.lua")));
static ORDER_BEGIN: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("lua/order_begin.lua")));
static ORDER_PAGE: LazyLock<Script> = script!("order_page.lua");
static ORDER_FINISH: LazyLock<Script> = script!("order_finish.lua");
static LEASE_ACQUIRE: LazyLock<Script> = script!("lease_acquire.lua");
static LEASE_RENEW: LazyLock<Script> = script!("lease_renew.lua");
static LEASE_RELEASE: LazyLock<Script> = script!("lease_release.lua");
static LEASE_LIST: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("lua/lease_list.lua")));
static AUDIT_APPEND: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("lua/audit_append_batch.lua")));

/// The key names of one serial number.
#[derive(Debug, Clone)]
struct Keys {
    prefix: String,
}

impl Keys {
    fn new(serial: &SerialNumber) -> Self {
        Self {
            prefix: format!("lic:{{{serial}}}:"),
        }
    }
    fn key(&self, name: &str) -> String {
        format!("{}{name}", self.prefix)
    }
    fn epoch(&self) -> String {
        self.key("epoch")
    }
    fn version(&self) -> String {
        self.key("version")
    }
    fn feed(&self) -> String {
        self.key("changes")
    }
    fn index(&self) -> String {
        self.key("seat_index")
    }
    /// The order set of a feature's purchased pool (see `lua/prelude.lua`).
    fn order(&self, feature: Feature) -> String {
        self.key(&format!("order:{}", feature.as_str()))
    }
    /// The flagged seats of a feature's purchased pool, in the same order.
    fn flagged(&self, feature: Feature) -> String {
        self.key(&format!("flagged:{}", feature.as_str()))
    }
    /// The version the order sets are true at.
    fn order_at(&self) -> String {
        self.key("order_at")
    }
    /// The mark of a build of the order sets in progress: builder and start version.
    fn order_build(&self) -> String {
        self.key("order_build")
    }
    fn license(&self) -> String {
        self.key("license")
    }
    fn tryout(&self) -> String {
        self.key("tryout")
    }
    fn reconcile(&self) -> String {
        self.key("reconcile")
    }
    fn init(&self) -> String {
        self.key("init")
    }
    fn lease(&self) -> String {
        self.key("lease")
    }
    fn fence(&self) -> String {
        self.key("fence")
    }
    fn retired_license(&self) -> String {
        self.key("retired_license")
    }
    fn clock(&self) -> String {
        self.key("clock")
    }
    fn incident(&self) -> String {
        self.key("incident")
    }
    fn audit(&self) -> String {
        self.key("audit")
    }
    fn audit_refusals(&self) -> String {
        self.key("audit_refusals")
    }
    fn audit_last(&self) -> String {
        self.key("audit_last")
    }
    /// The lease records, by lease id.
    fn lease_records(&self) -> String {
        self.key("lease_rec")
    }
    /// The lease id of each (feature, user, holder).
    fn lease_keys(&self) -> String {
        self.key("lease_key")
    }
    /// A concurrent feature's lease ids, scored by expiry.
    fn lease_pool(&self, feature: Feature) -> String {
        self.key(&format!("lease_pool:{}", feature.as_str()))
    }
    /// The daily peaks and busy counts of the concurrent features.
    fn lease_usage(&self) -> String {
        self.key("lease_usage")
    }
    fn pool(&self, feature: Feature, source: SeatSource) -> String {
        self.key(&format!("seats:{}:{}", feature.as_str(), source.as_str()))
    }
    /// Every seat pool, feature by feature, purchased before tryout.
    fn pools(&self) -> Vec<(Feature, SeatSource, String)> {
        Feature::SEATS
            .into_iter()
            .flat_map(|f| SOURCES.into_iter().map(move |s| (f, s)))
            .map(|(f, s)| (f, s, self.pool(f, s)))
            .collect()
    }
}

pub struct RedisStore {
    // Where the master is (a server, or the sentinels to ask).
    target: Target,
    // Multiplexed, reconnecting; shared by all request-path calls.
    conn: RedisConn,
    // The connections writes go through (with `WAIT`, their own; see `Writers`).
    write_conn: Writers,
    // A separate connection for the blocking feed read, so XREAD BLOCK never
    // delays request-path calls. Dropped after an error and made anew.
    feed_conn: AsyncMutex<Option<MultiplexedConnection>>,
    // A separate connection for the pages of a snapshot (see `snapshot::Bulk`).
    bulk: snapshot::Bulk,
    // Builds the seat order sets in the background when the store lacks them
    // (one task at a time here, one builder across replicas).
    order: Arc<order::Builder>,
    keys: Keys,
    timeout: Duration,
    // The bound of a write: the timeout, plus the `WAIT` time.
    write_timeout: Duration,
    url_for_display: String,
    // The compare-and-set records as last read (see `Self::expected_text`).
    seen: parking_lot::Mutex<SeenTexts>,
}

impl Drop for RedisStore {
    fn drop(&mut self) {
        // The build task holds its own handles: it ends with the store (a
        // build cut off is taken over by the next replica after its mark).
        self.order.stop();
    }
}

/// A compare-and-set value as this replica last read it: what this code makes
/// of it (its re-encoding of the record, or the id; `""`: absent or corrupt)
/// and the exact text stored.
#[derive(Debug, Default)]
struct Seen {
    encoded: String,
    stored: String,
}

#[derive(Debug, Default)]
struct SeenTexts {
    tryout: Seen,
    initialization: Seen,
    license_id: Seen,
}

/// Which compare-and-set record.
#[derive(Debug, Clone, Copy)]
enum CasRecord {
    Tryout,
    Initialization,
    /// The applied license's id (the `id` field beside its record).
    LicenseId,
}

impl SeenTexts {
    fn slot(&mut self, which: CasRecord) -> &mut Seen {
        match which {
            CasRecord::Tryout => &mut self.tryout,
            CasRecord::Initialization => &mut self.initialization,
            CasRecord::LicenseId => &mut self.license_id,
        }
    }
}

impl RedisStore {
    /// A store on one Redis at `url`, with the credentials the URL holds.
    pub fn new(url: &str, serial: &SerialNumber, timeout: Duration) -> Result<Self, StoreError> {
        Self::open(
            &RedisConfig {
                url: url.to_owned(),
                target: RedisTarget::Direct {
                    url: url.to_owned(),
                },
                username: None,
                password: None,
                tls_ca: None,
                timeout,
                wait: None,
            },
            serial,
        )
    }

    /// Creates the store without waiting for Redis: the service must start (and
    /// answer from memory) even while Redis is down.
    pub fn open(config: &RedisConfig, serial: &SerialNumber) -> Result<Self, StoreError> {
        let unavailable = |e: RedisError| StoreError::Unavailable(e.to_string());
        let target = Target::new(config).map_err(unavailable)?;
        let conn = RedisConn::new(&target, config.timeout, None).map_err(unavailable)?;
        let write_conn =
            Writers::new(&target, &conn, config.timeout, config.wait).map_err(unavailable)?;
        let keys = Keys::new(serial);
        let order = Arc::new(order::Builder::new(
            conn.clone(),
            snapshot::Bulk::new(target.clone(), config.timeout),
            keys.clone(),
            config.timeout,
        ));
        Ok(Self {
            bulk: snapshot::Bulk::new(target.clone(), config.timeout),
            order,
            target,
            conn,
            write_conn,
            feed_conn: AsyncMutex::new(None),
            keys,
            timeout: config.timeout,
            write_timeout: config.timeout + config.wait.map_or(Duration::ZERO, |w| w.timeout),
            url_for_display: redact_url(&config.url),
            seen: parking_lot::Mutex::new(SeenTexts::default()),
        })
    }

    /// Runs one Redis call bounded by the configured timeout.
    /// Failures are counted per `operation` (metric `licensing_redis_errors_total`).
    async fn bounded<T>(
        &self,
        operation: &'static str,
        fut: impl Future<Output = Result<T, RedisError>>,
    ) -> Result<T, StoreError> {
        self.bounded_by(self.timeout, operation, fut).await
    }

    /// [`Self::bounded`] with a bound of its own (writes also wait for replicas).
    async fn bounded_by<T>(
        &self,
        limit: Duration,
        operation: &'static str,
        fut: impl Future<Output = Result<T, RedisError>>,
    ) -> Result<T, StoreError> {
        bounded(limit, operation, fut).await
    }

    /// Warns when Redis may evict keys (seat keys would vanish under memory
    /// pressure). Best effort: managed Redis often forbids CONFIG.
    pub async fn check_eviction_policy(&self) -> Option<String> {
        let mut conn = self.conn.clone();
        let reply: Result<Vec<String>, StoreError> = self
            .bounded(
                "config_get",
                redis::cmd("CONFIG")
                    .arg("GET")
                    .arg("maxmemory-policy")
                    .query_async(&mut conn),
            )
            .await;
        match reply {
            Ok(v) => v.get(1).cloned(),
            Err(_) => None,
        }
    }

    /// Runs a write script that records exactly one change, `kind`.
    async fn write_one(
        &self,
        operation: &'static str,
        floor: Floor<'_>,
        script: &Script,
        kind: ChangeKind,
        configure: impl FnOnce(&mut redis::ScriptInvocation<'_>),
    ) -> Result<Change, StoreError> {
        let reply = self.write(operation, floor, script, configure).await?;
        one_change(operation, &reply, kind)
    }

    /// Runs a write script: the epoch, version, feed and order-at keys, the feed
    /// length and the writer's floor come first (see `lua/prelude.lua`),
    /// `configure` adds the script's own keys and arguments. A store without
    /// epoch answers `NotInitialized`, one below the floor `Moved`. A script that
    /// needs the seat order sets and finds them not true (`noindex`: a store
    /// written before they existed, or by a replica that does not keep them)
    /// wrote nothing: the background build runs (started here if it does not
    /// yet), the write waits for it at most until shortly before its call's
    /// deadline ([`order::Builder::wait`]) and runs again; past that it answers
    /// `Busy`, having written nothing, and the build goes on.
    async fn write(
        &self,
        operation: &'static str,
        floor: Floor<'_>,
        script: &Script,
        configure: impl FnOnce(&mut redis::ScriptInvocation<'_>),
    ) -> Result<Vec<String>, StoreError> {
        let inv = self.write_invocation(script, floor, configure);
        let mut built = 0;
        loop {
            let mut conn = self.write_conn.pick();
            let reply = skip_corrupt(
                operation,
                strings(
                    self.bounded_by(self.write_timeout, operation, inv.invoke_async(&mut conn))
                        .await?,
                )?,
            )?;
            if let Some(refusal) = refusal(&reply) {
                return Err(refusal);
            }
            return match reply.first().map(String::as_str) {
                // Built, then another write came between that did not keep the
                // sets (an older replica): build again, a few times at most.
                Some("noindex") if built < MAX_ORDER_BUILDS => {
                    built += 1;
                    // 'broken': the sets looked true but disagree with a record
                    // (edited by hand): rebuilt even though they look true.
                    let force = reply.get(1).map(String::as_str) == Some("broken");
                    self.order.wait(force).await?;
                    continue;
                }
                Some("noindex") => Err(StoreError::Unavailable(
                    "the seat order sets were rebuilt but are still not true (writes by a \
                     replica that does not keep them): try again"
                        .into(),
                )),
                _ => Ok(reply),
            };
        }
    }

    /// A write script's invocation: the keys and arguments every write script
    /// starts with (see [`Self::write`]), then `configure`'s.
    fn write_invocation<'s>(
        &self,
        script: &'s Script,
        floor: Floor<'_>,
        configure: impl FnOnce(&mut redis::ScriptInvocation<'_>),
    ) -> redis::ScriptInvocation<'s> {
        let floor = match floor {
            Some(p) => format!("{FEED_LEN}|{}|{}", p.epoch, p.version),
            None => format!("{FEED_LEN}||"),
        };
        let mut inv = script.prepare_invoke();
        inv.key(self.keys.epoch())
            .key(self.keys.version())
            .key(self.keys.feed())
            .key(self.keys.order_at())
            .arg(floor);
        configure(&mut inv);
        inv
    }

    /// Notes how a compare-and-set record was read: `stored` is the text in the
    /// store (`""`: absent), `encoded` this code's re-encoding of what it parsed
    /// to (`None`: absent or corrupt).
    fn saw(&self, which: CasRecord, stored: &str, encoded: Option<String>) {
        *self.seen.lock().slot(which) = Seen {
            encoded: encoded.unwrap_or_default(),
            stored: stored.to_owned(),
        };
    }

    /// What a compare-and-set sends as the expected record: the exact text this
    /// replica read when that is the record it expects, otherwise its own
    /// encoding. Comparing re-encoded text would conflict for ever with a record
    /// that has a field this code does not know (a newer replica's, during a
    /// rolling upgrade). A corrupt record this replica read is expected as
    /// "absent" (that is how every replica treats it), so the write replaces it.
    /// A stale note only costs one conflict: the caller re-reads, which notes again.
    fn expected_text(&self, which: CasRecord, encoded: Option<String>) -> String {
        let encoded = encoded.unwrap_or_default();
        let mut seen = self.seen.lock();
        let slot = seen.slot(which);
        if slot.encoded == encoded {
            slot.stored.clone()
        } else {
            encoded
        }
    }

    /// Notes the compare-and-set records a feed entry carries.
    fn saw_change(&self, map: &std::collections::HashMap<String, Value>, change: &Change) {
        let stored = || map.get("d").and_then(|v| text(v).ok()).unwrap_or_default();
        match &change.kind {
            ChangeKind::TryoutChanged(r) => {
                self.saw(
                    CasRecord::Tryout,
                    &stored(),
                    Some(TryoutRecordV1::encode(r)),
                );
            }
            ChangeKind::InitializationIssued(p) => self.saw(
                CasRecord::Initialization,
                &stored(),
                Some(InitializationRecordV1::encode(p)),
            ),
            ChangeKind::InitializationConsumed => self.saw(CasRecord::Initialization, "", None),
            ChangeKind::Reset => {
                self.saw(CasRecord::Initialization, "", None);
                self.saw(CasRecord::LicenseId, "", None);
            }
            ChangeKind::LicenseApplied(l) => {
                self.saw(CasRecord::LicenseId, l.id(), Some(l.id().to_owned()));
            }
            _ => {}
        }
    }
}

/// Takes the names of the corrupt records a script skipped off the front of its
/// reply (`'corrupt', count, names...`, see `lua/prelude.lua`): each is logged
/// and counted (`licensing_corrupt_records_total`), like those a snapshot skips.
fn skip_corrupt(operation: &str, mut reply: Vec<String>) -> Result<Vec<String>, StoreError> {
    if reply.first().map(String::as_str) != Some("corrupt") {
        return Ok(reply);
    }
    let count = reply
        .get(1)
        .and_then(|n| n.parse::<usize>().ok())
        .filter(|n| reply.len() >= 2 + n)
        .ok_or_else(|| StoreError::Corrupt(format!("{operation} replied {reply:?}")))?;
    for name in reply.drain(..2 + count).skip(2) {
        tracing::error!(record = %name, operation, "corrupt record in the seat store skipped");
        crate::metrics::metrics().corrupt_record();
    }
    Ok(reply)
}

/// The refusal a write script answered instead of writing (see `refused()`
/// in `lua/prelude.lua`), if it did.
fn refusal(reply: &[String]) -> Option<StoreError> {
    match reply.first().map(String::as_str) {
        Some("noepoch") => Some(StoreError::NotInitialized),
        Some("moved") => Some(StoreError::Moved),
        Some("badversion") => Some(StoreError::Corrupt(
            "the version counter is not a number or behind the change feed".into(),
        )),
        _ => None,
    }
}

/// A lease length in ms for a script (at least 1).
fn duration_ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)
}

/// Runs one Redis call bounded by `limit`; failures are counted per
/// `operation` (metric `licensing_redis_errors_total`).
async fn bounded<T>(
    limit: Duration,
    operation: &'static str,
    fut: impl Future<Output = Result<T, RedisError>>,
) -> Result<T, StoreError> {
    let result = match tokio::time::timeout(limit, fut).await {
        Ok(Ok(v)) => return Ok(v),
        Ok(Err(e)) => classify(e),
        Err(_) => StoreError::Unavailable(format!("no answer within {} ms", limit.as_millis())),
    };
    crate::metrics::metrics().redis_error(operation);
    Err(result)
}

fn classify(e: RedisError) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

pub use super::redis_conn::redact_url;

fn text(v: &Value) -> Result<String, StoreError> {
    redis::from_redis_value_ref(v).map_err(|e| StoreError::Corrupt(e.to_string()))
}

/// An optional stored record: `None` when absent, or when corrupt (then named in `corrupt`).
fn record<T>(
    v: &Value,
    what: &str,
    parse: fn(&str) -> Result<T, StoreError>,
    corrupt: &mut Vec<String>,
) -> Option<T> {
    match text(v).and_then(|s| {
        if s.is_empty() {
            Ok(None)
        } else {
            parse(&s).map(Some)
        }
    }) {
        Ok(r) => r,
        Err(e) => {
            corrupt.push(format!("{what}: {e}"));
            None
        }
    }
}

fn strings(v: Value) -> Result<Vec<String>, StoreError> {
    redis::from_redis_value(v).map_err(|e| StoreError::Corrupt(e.to_string()))
}

/// A reply of stored bytes, each as text, or (`Err`) as shown in a log when it is
/// not UTF-8: hand-written bytes make one entry corrupt, not the whole reply.
fn texts(v: Value) -> Result<Vec<Result<String, String>>, StoreError> {
    let raw: Vec<Vec<u8>> =
        redis::from_redis_value(v).map_err(|e| StoreError::Corrupt(e.to_string()))?;
    Ok(raw
        .into_iter()
        .map(|b| {
            String::from_utf8(b).map_err(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())
        })
        .collect())
}

/// A stored seat from its (user, record) text.
fn stored_seat(
    feature: Feature,
    user: &Result<String, String>,
    record: &Result<String, String>,
) -> Result<Seat, StoreError> {
    match (user, record) {
        (Ok(user), Ok(record)) => {
            SeatRecordV1::parse(record)?.into_seat(parse_user(user)?, feature)
        }
        _ => Err(StoreError::Corrupt("not UTF-8".into())),
    }
}

fn version_of(s: &str) -> Result<u64, StoreError> {
    s.parse()
        .map_err(|_| StoreError::Corrupt(format!("version {s:?} is not a number")))
}

fn words(reply: &[String]) -> Vec<&str> {
    reply.iter().map(String::as_str).collect()
}

/// A write that answers `ok` and the version it was recorded at.
fn one_change(operation: &str, reply: &[String], kind: ChangeKind) -> Result<Change, StoreError> {
    match words(reply).as_slice() {
        ["ok", v] => Ok(Change {
            version: version_of(v)?,
            kind,
        }),
        other => Err(StoreError::Corrupt(format!(
            "{operation} replied {other:?}"
        ))),
    }
}

fn parse_user(raw: &str) -> Result<UserId, StoreError> {
    UserId::parse(raw).map_err(|e| StoreError::Corrupt(format!("stored user id: {e}")))
}

fn parse_feature(raw: &str) -> Result<Feature, StoreError> {
    raw.parse()
        .map_err(|e| StoreError::Corrupt(format!("stored feature: {e}")))
}

/// Reads the (feature, user, record, version) quadruples of moved flags.
fn flag_changes(flat: &[&str]) -> Result<Vec<Change>, StoreError> {
    flat.chunks_exact(4)
        .map(|q| {
            let (feature, user) = (parse_feature(q[0])?, parse_user(q[1])?);
            Ok(Change {
                version: version_of(q[3])?,
                kind: ChangeKind::SeatFlagged(SeatRecordV1::parse(q[2])?.into_seat(user, feature)?),
            })
        })
        .collect()
}

/// A lease's entry in the lease key hash: `<feature>\0<user>\0<holder>`.
fn lease_key(lease: &Lease) -> String {
    format!(
        "{}\0{}\0{}",
        lease.feature.as_str(),
        lease.user_id.as_str(),
        lease.holder.as_str()
    )
}

/// A comma-separated list of lease ids (lease ids are hex digits).
fn id_list(joined: &str) -> Vec<String> {
    joined
        .split(',')
        .filter(|id| !id.is_empty())
        .map(str::to_owned)
        .collect()
}

/// A time in ms since 1970 as stored.
fn ms_time(raw: &str) -> Result<chrono::DateTime<chrono::Utc>, StoreError> {
    raw.parse::<i64>()
        .ok()
        .and_then(chrono::DateTime::from_timestamp_millis)
        .ok_or_else(|| StoreError::Corrupt(format!("stored time {raw:?}")))
}

/// Turns one feed entry into a change.
fn feed_change(
    version: u64,
    map: &std::collections::HashMap<String, Value>,
) -> Result<Change, StoreError> {
    let field = |name: &str| -> Result<String, StoreError> {
        map.get(name)
            .map(text)
            .transpose()?
            .ok_or_else(|| StoreError::Corrupt(format!("feed entry {version} lacks {name}")))
    };
    let kind = match field("k")?.as_str() {
        "seat" => {
            let (feature, user) = (parse_feature(&field("f")?)?, parse_user(&field("u")?)?);
            ChangeKind::SeatAssigned(SeatRecordV1::parse(&field("d")?)?.into_seat(user, feature)?)
        }
        "flag" => {
            let (feature, user) = (parse_feature(&field("f")?)?, parse_user(&field("u")?)?);
            ChangeKind::SeatFlagged(SeatRecordV1::parse(&field("d")?)?.into_seat(user, feature)?)
        }
        "init" => ChangeKind::InitializationIssued(InitializationRecordV1::parse(&field("d")?)?),
        "init_used" => ChangeKind::InitializationConsumed,
        "reset" => ChangeKind::Reset,
        "release" => ChangeKind::SeatReleased {
            feature: parse_feature(&field("f")?)?,
            user_id: parse_user(&field("u")?)?,
        },
        "license" => ChangeKind::LicenseApplied(LicenseRecordV1::parse(&field("d")?)?),
        "tryout" => ChangeKind::TryoutChanged(TryoutRecordV1::parse(&field("d")?)?),
        "reconcile" => ChangeKind::ReconcileRecorded(ReconcileRecordV1::parse(&field("d")?)?),
        "repair" => ChangeKind::Repaired(IncidentRecordV1::parse(&field("d")?)?),
        "lease" => {
            let id = field("i")?;
            let reclaimed = field("r")?;
            ChangeKind::LeaseAcquired {
                lease: LeaseRecordV1::parse(&field("d")?)?.into_lease(&id)?,
                reclaimed: id_list(&reclaimed),
            }
        }
        "renew" => ChangeKind::LeasesRenewed {
            holder: Holder::parse(&field("h")?)
                .map_err(|e| StoreError::Corrupt(format!("stored holder: {}", e.message)))?,
            lease_ids: id_list(&field("i")?),
            expires_at: ms_time(&field("e")?)?,
        },
        "unlease" => ChangeKind::LeaseReleased {
            lease_id: field("i")?,
        },
        other => return Err(StoreError::Corrupt(format!("feed entry kind {other:?}"))),
    };
    Ok(Change { version, kind })
}

#[async_trait]
impl Store for RedisStore {
    async fn snapshot(&self) -> Result<Snapshot, StoreError> {
        self.read_snapshot().await
    }

    async fn snapshot_into(&self, sink: &mut dyn SeatSink) -> Result<Snapshot, StoreError> {
        self.read_snapshot_into(sink).await
    }

    async fn changes(&self, since: &Position, wait: Duration) -> Result<Changes, StoreError> {
        let mut guard = self.feed_conn.lock().await;
        if guard.is_none() {
            let config = AsyncConnectionConfig::new()
                .set_connection_timeout(Some(self.timeout))
                .set_response_timeout(Some(wait + self.timeout));
            let conn = self
                .bounded("feed_connect", self.target.connect(&config))
                .await?;
            *guard = Some(conn);
        }
        let conn = guard.as_mut().expect("connection was just set");
        let mut xread = redis::cmd("XREAD");
        xread
            .arg("COUNT")
            .arg(1000)
            .arg("BLOCK")
            .arg(u64::try_from(wait.as_millis()).unwrap_or(u64::MAX).max(1))
            .arg("STREAMS")
            .arg(self.keys.feed())
            .arg(format!("{}-0", since.version));
        let read = xread.query_async::<Option<redis::streams::StreamReadReply>>(conn);
        let reply = match tokio::time::timeout(wait + self.timeout, read).await {
            Ok(Ok(reply)) => reply,
            Ok(Err(e)) => {
                *guard = None;
                crate::metrics::metrics().redis_error("feed_read");
                return Err(classify(e));
            }
            Err(_) => {
                *guard = None;
                crate::metrics::metrics().redis_error("feed_read");
                return Err(StoreError::Unavailable("feed read timed out".into()));
            }
        };
        let mut entries = reply
            .map(|r| r.keys.into_iter().flat_map(|k| k.ids).collect::<Vec<_>>())
            .unwrap_or_default();
        // Nothing new, or something odd: confirm the epoch and version are the ones
        // the caller continues from.
        let mut conn = self.conn.clone();
        let (epoch, version): (Option<String>, Option<u64>) = self
            .bounded(
                "feed_position",
                redis::cmd("MGET")
                    .arg(self.keys.epoch())
                    .arg(self.keys.version())
                    .query_async(&mut conn),
            )
            .await?;
        if epoch.as_deref() != Some(since.epoch.as_str()) || version.unwrap_or(0) < since.version {
            return Ok(Changes::Resync);
        }
        if entries.is_empty() && version.unwrap_or(0) > since.version {
            // The version moved on with no entry in the feed seen: a write
            // that landed after the read (then it is there now), or a version
            // no entry has (a gap, found below).
            let later: redis::streams::StreamRangeReply = self
                .bounded(
                    "feed_position",
                    redis::cmd("XRANGE")
                        .arg(self.keys.feed())
                        .arg(format!("{}-0", since.version + 1))
                        .arg("+")
                        .arg("COUNT")
                        .arg(1000)
                        .query_async(&mut conn),
                )
                .await?;
            if later.ids.is_empty() {
                return Ok(Changes::Resync);
            }
            entries = later.ids;
        }
        let mut changes = Vec::with_capacity(entries.len());
        for (expected, entry) in (since.version + 1..).zip(entries) {
            let v = entry
                .id
                .split_once('-')
                .and_then(|(v, _)| v.parse::<u64>().ok())
                .ok_or_else(|| StoreError::Corrupt(format!("feed id {:?}", entry.id)))?;
            if v != expected {
                // A gap: history was trimmed, or written by something else.
                return Ok(Changes::Resync);
            }
            let change = feed_change(v, &entry.map)?;
            self.saw_change(&entry.map, &change);
            changes.push(change);
        }
        Ok(Changes::Events(changes))
    }

    async fn assign_seat(
        &self,
        floor: Floor<'_>,
        user: &UserId,
        feature: Feature,
        plan: &AssignPlan,
    ) -> Result<AssignOutcome, StoreError> {
        let (plan_name, license_id) = match plan {
            AssignPlan::Purchased { license_id, .. } => ("purchased", license_id.as_str()),
            AssignPlan::Tryout { .. } => ("tryout", ""),
        };
        let reply = self
            .write("assign", floor, &ASSIGN, |inv| {
                inv.key(self.keys.pool(feature, SeatSource::Purchased))
                    .key(self.keys.pool(feature, SeatSource::Tryout))
                    .key(self.keys.index())
                    .key(self.keys.license())
                    .key(self.keys.order(feature))
                    .key(self.keys.flagged(feature))
                    .arg(user.as_str())
                    .arg(feature.as_str())
                    .arg(plan_name)
                    .arg(plan.capacity())
                    .arg(license_id);
            })
            .await?;
        let seat = |json: &str| SeatRecordV1::parse(json)?.into_seat(user.clone(), feature);
        match words(&reply).as_slice() {
            ["existing", json, v] => Ok(AssignOutcome::Existing {
                seat: seat(json)?,
                version: version_of(v)?,
            }),
            ["license_changed"] => Ok(AssignOutcome::LicenseChanged),
            ["exhausted", cap, used] => Ok(AssignOutcome::Exhausted {
                capacity: cap.parse().unwrap_or(0),
                in_use: used.parse().unwrap_or(0),
            }),
            ["created", json, v] => Ok(AssignOutcome::Created(Change {
                version: version_of(v)?,
                kind: ChangeKind::SeatAssigned(seat(json)?),
            })),
            other => Err(StoreError::Corrupt(format!("assign replied {other:?}"))),
        }
    }

    async fn release_seat(
        &self,
        floor: Floor<'_>,
        user: &UserId,
        feature: Feature,
        capacity: Option<(u32, &str)>,
    ) -> Result<ReleaseOutcome, StoreError> {
        let reply = self
            .write("release", floor, &RELEASE, |inv| {
                inv.key(self.keys.pool(feature, SeatSource::Purchased))
                    .key(self.keys.pool(feature, SeatSource::Tryout))
                    .key(self.keys.index())
                    .key(self.keys.license())
                    .key(self.keys.order(feature))
                    .key(self.keys.flagged(feature))
                    .arg(user.as_str())
                    .arg(feature.as_str())
                    .arg(capacity.map(|(c, _)| c.to_string()).unwrap_or_default())
                    .arg(capacity.map_or("", |(_, id)| id));
            })
            .await?;
        match words(&reply).as_slice() {
            ["none", v] => Ok(ReleaseOutcome::NotHeld {
                version: version_of(v)?,
            }),
            ["released", v, flags @ ..] => {
                let mut changes = vec![Change {
                    version: version_of(v)?,
                    kind: ChangeKind::SeatReleased {
                        feature,
                        user_id: user.clone(),
                    },
                }];
                changes.extend(flag_changes(flags)?);
                Ok(ReleaseOutcome::Released(changes))
            }
            other => Err(StoreError::Corrupt(format!("release replied {other:?}"))),
        }
    }

    async fn list_seats(
        &self,
        feature: Option<Feature>,
        after: Option<&SeatKey>,
        limit: usize,
    ) -> Result<Vec<Seat>, StoreError> {
        let member = |f: Feature, u: &str| format!("{}\0{u}", f.as_str());
        let (min, max) = match (feature, after) {
            // Resuming inside the filtered feature, or across all features.
            (None, Some(k)) => (
                format!("({}", member(k.feature, k.user_id.as_str())),
                "+".to_owned(),
            ),
            (Some(f), Some(k)) if k.feature == f => (
                format!("({}", member(k.feature, k.user_id.as_str())),
                format!("({}\u{1}", f.as_str()),
            ),
            // A key past the filtered feature: nothing is left.
            (Some(f), Some(k)) if k.feature > f => return Ok(Vec::new()),
            // No key, or one before the filtered feature: the feature's start.
            (Some(f), _) => (
                format!("[{}\0", f.as_str()),
                format!("({}\u{1}", f.as_str()),
            ),
            (None, None) => ("-".to_owned(), "+".to_owned()),
        };
        let mut inv = LIST.prepare_invoke();
        inv.key(self.keys.index());
        for f in Feature::SEATS {
            inv.key(self.keys.pool(f, SeatSource::Purchased))
                .key(self.keys.pool(f, SeatSource::Tryout));
        }
        inv.arg(min).arg(max).arg(limit);
        for f in Feature::SEATS {
            inv.arg(f.as_str());
        }
        let mut conn = self.conn.clone();
        let flat = texts(self.bounded("list", inv.invoke_async(&mut conn)).await?)?;
        Ok(flat
            .chunks_exact(3)
            .filter_map(|t| {
                let seat = t[0]
                    .as_deref()
                    .map_err(|_| StoreError::Corrupt("feature not UTF-8".into()))
                    .and_then(parse_feature)
                    .and_then(|f| stored_seat(f, &t[1], &t[2]));
                let user = t[1].as_ref().unwrap_or_else(|lossy| lossy);
                seat.inspect_err(|error| {
                    tracing::error!(%error, user = %user, "corrupt seat record skipped in a listing");
                    crate::metrics::metrics().corrupt_record();
                })
                .ok()
            })
            .collect())
    }

    async fn acquire_seat_lease(
        &self,
        floor: Floor<'_>,
        r: LeaseAcquire<'_>,
    ) -> Result<AcquireOutcome, StoreError> {
        let reply = self
            .write("lease_acquire", floor, &LEASE_ACQUIRE, |inv| {
                inv.key(self.keys.license())
                    .key(self.keys.lease_records())
                    .key(self.keys.lease_keys())
                    .key(self.keys.lease_pool(r.feature))
                    .key(self.keys.lease_usage())
                    .arg(r.user.as_str())
                    .arg(r.feature.as_str())
                    .arg(r.holder.as_str())
                    .arg(r.plan.capacity)
                    .arg(&r.plan.license_id)
                    .arg(r.new_id)
                    .arg(duration_ms(r.duration));
            })
            .await?;
        match words(&reply).as_slice() {
            ["license_changed"] => Ok(AcquireOutcome::LicenseChanged),
            ["exhausted", cap, used] => Ok(AcquireOutcome::Exhausted {
                capacity: cap.parse().unwrap_or(0),
                in_use: used.parse().unwrap_or(0),
            }),
            ["acquired", id, record, v, created, in_use, reclaimed @ ..] => {
                let lease = LeaseRecordV1::parse(record)?.into_lease(id)?;
                let reclaimed = reclaimed.iter().map(|s| (*s).to_owned()).collect();
                Ok(AcquireOutcome::Acquired {
                    change: Change {
                        version: version_of(v)?,
                        kind: ChangeKind::LeaseAcquired { lease, reclaimed },
                    },
                    created: *created == "1",
                    in_use: in_use.parse().unwrap_or(0),
                })
            }
            other => Err(StoreError::Corrupt(format!(
                "lease acquire replied {other:?}"
            ))),
        }
    }

    async fn renew_seat_leases(
        &self,
        floor: Floor<'_>,
        holder: &Holder,
        lease_ids: &[String],
        duration: Duration,
    ) -> Result<RenewOutcome, StoreError> {
        // Each id once, in the order asked (a chunk dedupes only its own).
        let mut seen = HashSet::with_capacity(lease_ids.len());
        let ids: Vec<&String> = lease_ids
            .iter()
            .filter(|id| seen.insert(id.as_str()))
            .collect();
        // One script per chunk, all of them in one pipeline: one round trip,
        // and Redis serves other callers between the scripts.
        let invocations: Vec<_> = ids
            .chunks(RENEW_CHUNK)
            .map(|chunk| {
                self.write_invocation(&LEASE_RENEW, floor, |inv| {
                    inv.key(self.keys.lease_records());
                    for feature in Feature::SEATS {
                        inv.key(self.keys.lease_pool(feature));
                    }
                    inv.arg(holder.as_str())
                        .arg(duration_ms(duration))
                        .arg(Feature::SEATS.len());
                    for feature in Feature::SEATS {
                        inv.arg(feature.as_str());
                    }
                    for id in chunk {
                        inv.arg(id.as_str());
                    }
                })
            })
            .collect();
        let mut pipe = redis::pipe();
        pipe.load_script(&LEASE_RENEW).ignore();
        for inv in &invocations {
            pipe.invoke_script(inv);
        }
        let mut conn = self.write_conn.pick();
        let replies: Vec<Value> = self
            .bounded_by(
                self.write_timeout,
                "lease_renew",
                pipe.query_async(&mut conn),
            )
            .await?;
        let mut outcome = RenewOutcome::default();
        for reply in replies {
            let reply = skip_corrupt("lease_renew", strings(reply)?)?;
            // A later chunk refused (the store moved between them): the
            // renewal is retried whole; what was renewed stays renewed.
            if let Some(refusal) = refusal(&reply) {
                return Err(refusal);
            }
            let corrupt = || StoreError::Corrupt(format!("lease renew replied {reply:?}"));
            let [v, expires, n, rest @ ..] = reply.as_slice() else {
                return Err(corrupt());
            };
            let version = version_of(v)?;
            let expires_at = ms_time(expires)?;
            let n: usize = n.parse().map_err(|_| corrupt())?;
            if rest.len() < 2 * n {
                return Err(corrupt());
            }
            let (renewed, lost) = rest.split_at(2 * n);
            let leases = renewed
                .chunks_exact(2)
                .map(|p| LeaseRecordV1::parse(&p[1])?.into_lease(&p[0]))
                .collect::<Result<Vec<_>, _>>()?;
            if n > 0 {
                outcome.changes.push(Change {
                    version,
                    kind: ChangeKind::LeasesRenewed {
                        holder: holder.clone(),
                        lease_ids: leases.iter().map(|l| l.lease_id.clone()).collect(),
                        expires_at,
                    },
                });
            }
            outcome.leases.extend(leases);
            outcome.lost.extend_from_slice(lost);
            outcome.version = outcome.version.max(version);
        }
        Ok(outcome)
    }

    async fn release_seat_lease(
        &self,
        floor: Floor<'_>,
        lease_id: &str,
    ) -> Result<LeaseReleaseOutcome, StoreError> {
        let reply = self
            .write("lease_release", floor, &LEASE_RELEASE, |inv| {
                inv.key(self.keys.lease_records())
                    .key(self.keys.lease_keys());
                for feature in Feature::SEATS {
                    inv.key(self.keys.lease_pool(feature));
                }
                inv.arg(lease_id);
            })
            .await?;
        match words(&reply).as_slice() {
            ["none", v] => Ok(LeaseReleaseOutcome::NotHeld {
                version: version_of(v)?,
            }),
            ["released", v] => Ok(LeaseReleaseOutcome::Released(Change {
                version: version_of(v)?,
                kind: ChangeKind::LeaseReleased {
                    lease_id: lease_id.to_owned(),
                },
            })),
            other => Err(StoreError::Corrupt(format!(
                "lease release replied {other:?}"
            ))),
        }
    }

    async fn list_seat_leases(&self, feature: Option<Feature>) -> Result<Vec<Lease>, StoreError> {
        let mut inv = LEASE_LIST.prepare_invoke();
        inv.key(self.keys.lease_records());
        for f in Feature::SEATS {
            if feature.is_none_or(|want| want == f) {
                inv.key(self.keys.lease_pool(f));
            }
        }
        let mut conn = self.conn.clone();
        let flat = texts(
            self.bounded("lease_list", inv.invoke_async(&mut conn))
                .await?,
        )?;
        let mut leases: Vec<Lease> = flat
            .chunks_exact(2)
            .filter_map(|p| {
                let lease = match (&p[0], &p[1]) {
                    (Ok(id), Ok(raw)) => LeaseRecordV1::parse(raw).and_then(|r| r.into_lease(id)),
                    _ => Err(StoreError::Corrupt("not UTF-8".into())),
                };
                lease
                    .inspect_err(|error| {
                        tracing::error!(%error, "corrupt lease record skipped in a listing");
                        crate::metrics::metrics().corrupt_record();
                    })
                    .ok()
            })
            .collect();
        leases.sort_by(|a, b| a.key().cmp(&b.key()));
        Ok(leases)
    }

    async fn lease_usage(&self, since_day: i64) -> Result<Vec<LeaseUsage>, StoreError> {
        let mut conn = self.conn.clone();
        let fields: Vec<(String, String)> = self
            .bounded(
                "lease_usage",
                redis::cmd("HGETALL")
                    .arg(self.keys.lease_usage())
                    .query_async(&mut conn),
            )
            .await?;
        let mut days: std::collections::BTreeMap<(Feature, i64), (u32, u64)> =
            std::collections::BTreeMap::new();
        for (field, value) in fields {
            let mut parts = field.splitn(3, ':');
            let (Some(kind), Some(feature), Some(day)) = (parts.next(), parts.next(), parts.next())
            else {
                continue;
            };
            let (Ok(feature), Ok(day)) = (feature.parse::<Feature>(), day.parse::<i64>()) else {
                continue;
            };
            if day < since_day {
                continue;
            }
            let entry = days.entry((feature, day)).or_default();
            match kind {
                "peak" => entry.0 = value.parse().unwrap_or(0),
                "busy" => entry.1 = value.parse().unwrap_or(0),
                _ => {}
            }
        }
        Ok(days
            .into_iter()
            .map(|((feature, day), (peak, busy))| LeaseUsage {
                feature,
                day,
                peak,
                busy,
            })
            .collect())
    }

    async fn compare_and_set_tryout(
        &self,
        floor: Floor<'_>,
        expected: Option<&TryoutRecord>,
        new: &TryoutRecord,
    ) -> Result<Option<Change>, StoreError> {
        let new_text = TryoutRecordV1::encode(new);
        let reply = self
            .write("cas_tryout", floor, &CAS_TRYOUT, |inv| {
                inv.key(self.keys.tryout())
                    .arg(
                        self.expected_text(CasRecord::Tryout, expected.map(TryoutRecordV1::encode)),
                    )
                    .arg(&new_text);
            })
            .await?;
        match words(&reply).as_slice() {
            ["conflict"] => Ok(None),
            ["ok", v] => {
                self.saw(CasRecord::Tryout, &new_text, Some(new_text.clone()));
                Ok(Some(Change {
                    version: version_of(v)?,
                    kind: ChangeKind::TryoutChanged(new.clone()),
                }))
            }
            other => Err(StoreError::Corrupt(format!(
                "tryout write replied {other:?}"
            ))),
        }
    }

    async fn apply_license(
        &self,
        floor: Floor<'_>,
        w: LicenseWrite<'_>,
    ) -> Result<Option<Vec<Change>>, StoreError> {
        let record = LicenseRecordV1::encode(w.license);
        let new_tryout = w.tryout.map(|(_, n)| TryoutRecordV1::encode(n));
        let reply = self
            .write("apply_license", floor, &APPLY_LICENSE, |inv| {
                inv.key(self.keys.license())
                    .key(self.keys.tryout())
                    .key(self.keys.init())
                    .key(self.keys.fence());
                for (feature, _) in w.capacities {
                    inv.key(self.keys.pool(*feature, SeatSource::Purchased))
                        .key(self.keys.order(*feature))
                        .key(self.keys.flagged(*feature));
                }
                inv.arg(self.expected_text(CasRecord::LicenseId, w.expected_id.map(str::to_owned)))
                    .arg(w.license.id())
                    .arg(record)
                    .arg(w.tryout.map_or_else(String::new, |(e, _)| {
                        self.expected_text(CasRecord::Tryout, e.map(TryoutRecordV1::encode))
                    }))
                    .arg(new_tryout.clone().unwrap_or_default())
                    .arg(w.consume_initialization.map_or_else(String::new, |p| {
                        self.expected_text(
                            CasRecord::Initialization,
                            Some(InitializationRecordV1::encode(p)),
                        )
                    }))
                    .arg(w.fence.map(|f| f.to_string()).unwrap_or_default());
                for (feature, quantity) in w.capacities {
                    inv.arg(feature.as_str()).arg(*quantity);
                }
            })
            .await?;
        match words(&reply).as_slice() {
            ["conflict"] | ["fenced"] => Ok(None),
            ["ok", v, tryout_v, init_v, flags @ ..] => {
                let id = w.license.id();
                self.saw(CasRecord::LicenseId, id, Some(id.to_owned()));
                let mut changes = vec![Change {
                    version: version_of(v)?,
                    kind: ChangeKind::LicenseApplied(w.license.clone()),
                }];
                if let (Some((_, new)), false) = (w.tryout, tryout_v.is_empty()) {
                    if let Some(text) = &new_tryout {
                        self.saw(CasRecord::Tryout, text, Some(text.clone()));
                    }
                    changes.push(Change {
                        version: version_of(tryout_v)?,
                        kind: ChangeKind::TryoutChanged(new.clone()),
                    });
                }
                if !init_v.is_empty() {
                    self.saw(CasRecord::Initialization, "", None);
                    changes.push(Change {
                        version: version_of(init_v)?,
                        kind: ChangeKind::InitializationConsumed,
                    });
                }
                changes.extend(flag_changes(flags)?);
                Ok(Some(changes))
            }
            other => Err(StoreError::Corrupt(format!(
                "license write replied {other:?}"
            ))),
        }
    }

    async fn set_initialization(
        &self,
        floor: Floor<'_>,
        pending: &PendingInitialization,
    ) -> Result<Change, StoreError> {
        let kind = ChangeKind::InitializationIssued(pending.clone());
        self.write_one(
            "set_initialization",
            floor,
            &SET_INITIALIZATION,
            kind,
            |inv| {
                inv.key(self.keys.init())
                    .arg(InitializationRecordV1::encode(pending));
            },
        )
        .await
    }

    async fn reset(&self, floor: Floor<'_>) -> Result<Change, StoreError> {
        self.write_one("reset", floor, &RESET, ChangeKind::Reset, |inv| {
            inv.key(self.keys.license())
                .key(self.keys.retired_license())
                .key(self.keys.reconcile())
                .key(self.keys.init())
                .key(self.keys.index());
            for (_, _, key) in self.keys.pools() {
                inv.key(key);
            }
            for feature in Feature::SEATS {
                inv.key(self.keys.order(feature))
                    .key(self.keys.flagged(feature));
            }
            // A re-setup ends every lease too.
            inv.key(self.keys.lease_records())
                .key(self.keys.lease_keys());
            for feature in Feature::SEATS {
                inv.key(self.keys.lease_pool(feature));
            }
        })
        .await
    }

    async fn acquire_lease(&self, holder: &str, ttl: Duration) -> Result<Option<u64>, StoreError> {
        let mut inv = LEASE.prepare_invoke();
        inv.key(self.keys.lease())
            .key(self.keys.fence())
            .arg(holder)
            .arg(u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1));
        let mut conn = self.conn.clone();
        let token: u64 = self.bounded("lease", inv.invoke_async(&mut conn)).await?;
        Ok((token > 0).then_some(token))
    }

    async fn release_lease(&self, holder: &str) -> Result<(), StoreError> {
        let mut inv = UNLEASE.prepare_invoke();
        inv.key(self.keys.lease()).arg(holder);
        let mut conn = self.conn.clone();
        let _: i64 = self.bounded("lease", inv.invoke_async(&mut conn)).await?;
        Ok(())
    }

    async fn record_reconcile(
        &self,
        floor: Floor<'_>,
        status: &ReconcileStatus,
    ) -> Result<Change, StoreError> {
        let kind = ChangeKind::ReconcileRecorded(status.clone());
        self.write_one("record_reconcile", floor, &RECORD_RECONCILE, kind, |inv| {
            inv.key(self.keys.reconcile())
                .arg(ReconcileRecordV1::encode(status));
        })
        .await
    }

    async fn restore(&self, from: &Snapshot) -> Result<bool, StoreError> {
        let pools = self.keys.pools();
        let mut inv = RESTORE.prepare_invoke();
        inv.key(self.keys.epoch())
            .key(self.keys.version())
            .key(self.keys.feed())
            .key(self.keys.license())
            .key(self.keys.tryout())
            .key(self.keys.reconcile())
            .key(self.keys.index())
            .key(self.keys.init())
            .key(self.keys.retired_license())
            .key(self.keys.clock())
            .key(self.keys.order_at());
        // KEYS[12..]: the pools, then each feature's order sets (1-based indexes).
        for (_, _, key) in &pools {
            inv.key(key);
        }
        let sets = order_keys(&self.keys, &mut inv, 12 + pools.len());
        // Then the lease keys: records, keys, each feature's pool.
        let lease_base = 12 + pools.len() + 2 * Feature::SEATS.len();
        inv.key(self.keys.lease_records())
            .key(self.keys.lease_keys());
        for feature in Feature::SEATS {
            inv.key(self.keys.lease_pool(feature));
        }
        let license_record = from.license.as_ref().map(LicenseRecordV1::encode);
        inv.arg(new_epoch())
            .arg(from.position.as_ref().map_or(0, |p| p.version))
            .arg(from.license.as_ref().map(StoredLicense::id).unwrap_or(""))
            .arg(license_record.unwrap_or_default())
            .arg(
                from.tryout
                    .as_ref()
                    .map(TryoutRecordV1::encode)
                    .unwrap_or_default(),
            )
            .arg(ReconcileRecordV1::encode(&from.reconcile))
            .arg(
                from.initialization
                    .as_ref()
                    .map(InitializationRecordV1::encode)
                    .unwrap_or_default(),
            )
            .arg(
                from.retired_license
                    .as_ref()
                    .map(LicenseRecordV1::encode)
                    .unwrap_or_default(),
            )
            .arg(from.high_water_ms);
        let leases: Vec<(usize, &Lease)> = from
            .leases
            .iter()
            .filter_map(|l| {
                let i = Feature::SEATS.iter().position(|f| *f == l.feature)?;
                Some((lease_base + 2 + i, l))
            })
            .collect();
        inv.arg(leases.len() * 5);
        for (pool, lease) in leases {
            inv.arg(pool)
                .arg(&lease.lease_id)
                .arg(lease_key(lease))
                .arg(lease.expires_at.timestamp_millis())
                .arg(LeaseRecordV1::encode(lease));
        }
        inv.arg(lease_base);
        for seat in &from.seats {
            let Some(index) = pools
                .iter()
                .position(|(f, s, _)| *f == seat.feature && *s == seat.source)
            else {
                continue;
            };
            let (order, flagged) = sets.of(seat);
            let record = SeatRecordV1::encode(seat);
            inv.arg(12 + index)
                .arg(order)
                .arg(flagged)
                .arg(seat.feature.as_str())
                .arg(seat.user_id.as_str())
                .arg(record)
                .arg(seat.assigned_at.timestamp_millis());
        }
        let mut conn = self.write_conn.pick();
        let restored: i64 = self
            .bounded_by(self.write_timeout, "restore", inv.invoke_async(&mut conn))
            .await?;
        Ok(restored == 1)
    }

    async fn history(&self, after: u64) -> Result<Vec<Change>, StoreError> {
        let mut conn = self.conn.clone();
        let reply: redis::streams::StreamRangeReply = self
            .bounded(
                "history",
                redis::cmd("XRANGE")
                    .arg(self.keys.feed())
                    .arg(format!("{}-0", after.saturating_add(1)))
                    .arg("+")
                    .arg("COUNT")
                    .arg(FEED_LEN)
                    .query_async(&mut conn),
            )
            .await?;
        let mut changes = Vec::with_capacity(reply.ids.len());
        for entry in reply.ids {
            let Some(v) = entry
                .id
                .split_once('-')
                .and_then(|(v, _)| v.parse::<u64>().ok())
            else {
                continue;
            };
            match feed_change(v, &entry.map) {
                Ok(change) => {
                    self.saw_change(&entry.map, &change);
                    changes.push(change);
                }
                Err(error) => tracing::warn!(%error, version = v, "corrupt feed entry skipped"),
            }
        }
        Ok(changes)
    }

    async fn summary(&self, at: u64) -> Result<Summary, StoreError> {
        let pools = self.keys.pools();
        let mut pipe = redis::pipe();
        pipe.atomic()
            .cmd("GET")
            .arg(self.keys.epoch())
            .cmd("GET")
            .arg(self.keys.version());
        for (_, _, key) in &pools {
            pipe.cmd("HLEN").arg(key);
        }
        pipe.cmd("XRANGE")
            .arg(self.keys.feed())
            .arg(format!("{at}-0"))
            .arg(format!("{at}-0"));
        let mut conn = self.conn.clone();
        let reply: Vec<Value> = self.bounded("summary", pipe.query_async(&mut conn)).await?;
        if reply.len() != 3 + pools.len() {
            return Err(StoreError::Corrupt(
                "summary reply has the wrong shape".into(),
            ));
        }
        let optional = |v: &Value| -> Result<Option<String>, StoreError> {
            redis::from_redis_value_ref(v).map_err(|e| StoreError::Corrupt(e.to_string()))
        };
        let epoch = optional(&reply[0])?;
        let version = version_of(optional(&reply[1])?.as_deref().unwrap_or("0"))?;
        let mut seats = 0;
        for v in &reply[2..2 + pools.len()] {
            seats += redis::from_redis_value_ref::<u64>(v)
                .map_err(|e| StoreError::Corrupt(e.to_string()))?;
        }
        let entry: redis::streams::StreamRangeReply =
            redis::from_redis_value_ref(&reply[2 + pools.len()])
                .map_err(|e| StoreError::Corrupt(e.to_string()))?;
        // A corrupt entry tells nothing: as if trimmed.
        let change_at = entry.ids.first().and_then(|e| feed_change(at, &e.map).ok());
        Ok(Summary {
            position: epoch.map(|epoch| Position { epoch, version }),
            seats,
            change_at,
        })
    }

    async fn repair(&self, w: &RepairWrite) -> Result<Option<Vec<Change>>, StoreError> {
        let Some(expected) = &w.expected else {
            return Ok(None);
        };
        let pools = self.keys.pools();
        let mut inv = REPAIR.prepare_invoke();
        inv.key(self.keys.epoch())
            .key(self.keys.version())
            .key(self.keys.feed())
            .key(self.keys.order_at())
            .key(self.keys.license())
            .key(self.keys.tryout())
            .key(self.keys.reconcile())
            .key(self.keys.init())
            .key(self.keys.index())
            .key(self.keys.incident());
        // KEYS[11..]: the pools, then each feature's order sets (1-based indexes).
        for (_, _, key) in &pools {
            inv.key(key);
        }
        let sets = order_keys(&self.keys, &mut inv, 11 + pools.len());
        let lease_base = 11 + pools.len() + 2 * Feature::SEATS.len();
        inv.key(self.keys.lease_records())
            .key(self.keys.lease_keys());
        for feature in Feature::SEATS {
            inv.key(self.keys.lease_pool(feature));
        }
        let (init_mode, init_record) = match &w.initialization {
            None => ("", String::new()),
            Some(None) => ("del", String::new()),
            Some(Some(p)) => ("set", InitializationRecordV1::encode(p)),
        };
        let incident = IncidentRecordV1::encode(&w.incident);
        inv.arg(format!("{FEED_LEN}||"))
            .arg(&expected.epoch)
            .arg(expected.version)
            .arg(w.version_floor)
            .arg(w.license.as_ref().map(StoredLicense::id).unwrap_or(""))
            .arg(
                w.license
                    .as_ref()
                    .map(LicenseRecordV1::encode)
                    .unwrap_or_default(),
            )
            .arg(
                w.tryout
                    .as_ref()
                    .map(TryoutRecordV1::encode)
                    .unwrap_or_default(),
            )
            .arg(
                w.reconcile
                    .as_ref()
                    .map(ReconcileRecordV1::encode)
                    .unwrap_or_default(),
            )
            .arg(init_mode)
            .arg(init_record)
            .arg(&incident);
        let pool_index = |feature: Feature, source: SeatSource| {
            pools
                .iter()
                .position(|(f, s, _)| *f == feature && *s == source)
                .map(|i| i + 11)
        };
        let mut kinds = Vec::new();
        for seat in &w.add_seats {
            let Some(index) = pool_index(seat.feature, seat.source) else {
                continue;
            };
            // A purchased seat's flag state is read from its record.
            let (order, flagged) = match sets.of(seat) {
                (0, _) => (0, 0),
                (order, _) => (order, sets.flagged_of(seat.feature)),
            };
            let record = SeatRecordV1::encode(seat);
            inv.arg("add")
                .arg(index)
                .arg(0)
                .arg(order)
                .arg(flagged)
                .arg(seat.feature.as_str())
                .arg(seat.user_id.as_str())
                .arg(record);
            kinds.push(ChangeKind::SeatAssigned(seat.clone()));
        }
        for (feature, user) in &w.remove_seats {
            let (Some(index), Some(other)) = (
                pool_index(*feature, SeatSource::Purchased),
                pool_index(*feature, SeatSource::Tryout),
            ) else {
                continue;
            };
            inv.arg("del")
                .arg(index)
                .arg(other)
                .arg(sets.order_of(*feature))
                .arg(sets.flagged_of(*feature))
                .arg(feature.as_str())
                .arg(user.as_str())
                .arg("");
            kinds.push(ChangeKind::SeatReleased {
                feature: *feature,
                user_id: user.clone(),
            });
        }
        for lease in &w.remove_leases {
            let Some(i) = Feature::SEATS.iter().position(|f| *f == lease.feature) else {
                continue;
            };
            inv.arg("unlease")
                .arg(lease_base)
                .arg(lease_base + 1)
                .arg(lease_base + 2 + i)
                .arg(&lease.lease_id)
                .arg(lease_key(lease))
                .arg("")
                .arg("");
            kinds.push(ChangeKind::LeaseReleased {
                lease_id: lease.lease_id.clone(),
            });
        }
        for lease in &w.add_leases {
            let Some(i) = Feature::SEATS.iter().position(|f| *f == lease.feature) else {
                continue;
            };
            inv.arg("lease")
                .arg(lease_base)
                .arg(lease_base + 1)
                .arg(lease_base + 2 + i)
                .arg(&lease.lease_id)
                .arg(lease_key(lease))
                .arg(lease.expires_at.timestamp_millis())
                .arg(LeaseRecordV1::encode(lease));
            kinds.push(ChangeKind::LeaseAcquired {
                lease: lease.clone(),
                reclaimed: Vec::new(),
            });
        }
        if let Some(license) = &w.license {
            kinds.push(ChangeKind::LicenseApplied(license.clone()));
        }
        if let Some(tryout) = &w.tryout {
            kinds.push(ChangeKind::TryoutChanged(tryout.clone()));
        }
        if let Some(reconcile) = &w.reconcile {
            kinds.push(ChangeKind::ReconcileRecorded(reconcile.clone()));
        }
        match &w.initialization {
            None => {}
            Some(None) => kinds.push(ChangeKind::InitializationConsumed),
            Some(Some(p)) => kinds.push(ChangeKind::InitializationIssued(p.clone())),
        }
        kinds.push(ChangeKind::Repaired(w.incident.clone()));
        let mut conn = self.conn.clone();
        let reply = strings(self.bounded("repair", inv.invoke_async(&mut conn)).await?)?;
        match words(&reply).as_slice() {
            ["moved"] => Ok(None),
            ["ok", versions @ ..] if versions.len() == kinds.len() => versions
                .iter()
                .zip(kinds)
                .map(|(v, kind)| {
                    Ok(Change {
                        version: version_of(v)?,
                        kind,
                    })
                })
                .collect::<Result<Vec<_>, _>>()
                .map(Some),
            other => Err(StoreError::Corrupt(format!("repair replied {other:?}"))),
        }
    }

    async fn advance_clock(&self, ms: i64) -> Result<ClockReading, StoreError> {
        let mut inv = CLOCK.prepare_invoke();
        inv.key(self.keys.clock()).arg(ms);
        let mut conn = self.conn.clone();
        let (stored, now): (String, String) =
            self.bounded("clock", inv.invoke_async(&mut conn)).await?;
        let ms = |v: &str| {
            v.parse()
                .map_err(|_| StoreError::Corrupt(format!("high-water clock {v:?}")))
        };
        Ok(ClockReading {
            high_water_ms: ms(&stored)?,
            reference_ms: ms(&now)?,
        })
    }

    async fn append_audit_batch(
        &self,
        events: &[AuditEvent],
        retention: &AuditRetention,
    ) -> Result<(), StoreError> {
        // Ids come from Redis's clock, so replicas with skewed clocks still
        // append in order; the age bound is taken against the events' time (the
        // newest, as appending them one by one would leave it).
        let Some(min_id) = events
            .iter()
            .map(|e| {
                e.time
                    .timestamp_millis()
                    .saturating_sub(retention.max_age.num_milliseconds())
                    .max(0)
            })
            .max()
        else {
            return Ok(());
        };
        let mut inv = AUDIT_APPEND.prepare_invoke();
        inv.key(self.keys.audit())
            .key(self.keys.audit_refusals())
            .key(self.keys.audit_last())
            .arg(retention.max_entries)
            .arg(retention.max_refusals)
            .arg(min_id);
        for event in events {
            inv.arg(if event.is_refusal() { "r" } else { "c" })
                .arg(AuditRecordV1::encode(event));
        }
        let mut conn = self.conn.clone();
        self.bounded("audit_append", inv.invoke_async::<Vec<String>>(&mut conn))
            .await
            .map(drop)
    }

    async fn list_audit(
        &self,
        before: Option<&str>,
        limit: usize,
    ) -> Result<Vec<AuditEntry>, StoreError> {
        // The newest id strictly before `before` (inclusive range end).
        let end = match before {
            None => "+".to_owned(),
            Some(id) => match parse_entry_id(id) {
                Some((0, 0)) => return Ok(Vec::new()),
                Some((ms, 0)) => format!("{}-{}", ms - 1, u64::MAX),
                Some((ms, seq)) => format!("{ms}-{}", seq - 1),
                None => return Err(StoreError::Corrupt(format!("audit id {id:?}"))),
            },
        };
        let range = |key: String| {
            redis::cmd("XREVRANGE")
                .arg(key)
                .arg(&end)
                .arg("-")
                .arg("COUNT")
                .arg(limit)
                .to_owned()
        };
        let mut pipe = redis::pipe();
        pipe.add_command(range(self.keys.audit()))
            .add_command(range(self.keys.audit_refusals()));
        let mut conn = self.conn.clone();
        let (changes, refusals): (
            redis::streams::StreamRangeReply,
            redis::streams::StreamRangeReply,
        ) = self
            .bounded("audit_list", pipe.query_async(&mut conn))
            .await?;
        Ok(merge_newest_first(
            audit_entries(changes)?,
            audit_entries(refusals)?,
            limit,
        ))
    }

    fn describe(&self) -> String {
        format!("redis at {}", self.url_for_display)
    }
}

/// Where a script's order sets are among its KEYS (1-based), feature by feature
/// from `first`.
struct OrderKeys {
    first: usize,
}

/// Appends each feature's order sets (order, then flagged) to a script's keys,
/// from KEYS[`first`] on.
fn order_keys(keys: &Keys, inv: &mut redis::ScriptInvocation<'_>, first: usize) -> OrderKeys {
    for feature in Feature::SEATS {
        inv.key(keys.order(feature)).key(keys.flagged(feature));
    }
    OrderKeys { first }
}

impl OrderKeys {
    fn position(&self, feature: Feature) -> usize {
        let i = Feature::SEATS
            .iter()
            .position(|f| *f == feature)
            .unwrap_or_default();
        self.first + 2 * i
    }
    /// The order set of a feature's purchased pool.
    fn order_of(&self, feature: Feature) -> usize {
        self.position(feature)
    }
    /// Its flagged set.
    fn flagged_of(&self, feature: Feature) -> usize {
        self.position(feature) + 1
    }
    /// The sets a seat goes into: (order, flagged), 0 for none; a tryout seat
    /// into none, an unflagged purchased seat into its order set only.
    fn of(&self, seat: &Seat) -> (usize, usize) {
        if seat.source != SeatSource::Purchased {
            return (0, 0);
        }
        let flagged = if seat.over_capacity_since.is_some() {
            self.flagged_of(seat.feature)
        } else {
            0
        };
        (self.order_of(seat.feature), flagged)
    }
}

/// The entries of an `XREVRANGE` of an audit stream.
fn audit_entries(reply: redis::streams::StreamRangeReply) -> Result<Vec<AuditEntry>, StoreError> {
    reply
        .ids
        .into_iter()
        .map(|entry| {
            let record: String = entry
                .get("record")
                .ok_or_else(|| StoreError::Corrupt(format!("audit entry {}", entry.id)))?;
            Ok(AuditEntry {
                event: AuditRecordV1::decode(&record)?,
                id: entry.id,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_share_the_serial_hash_tag() {
        let keys = Keys::new(&SerialNumber::parse("AB12").unwrap());
        assert_eq!(keys.epoch(), "lic:{AB12}:epoch");
        assert_eq!(
            keys.pool(Feature::User, SeatSource::Tryout),
            "lic:{AB12}:seats:user:tryout"
        );
        assert_eq!(keys.pools().len(), 4);
    }

    #[test]
    fn skipped_corrupt_records_are_taken_off_a_reply() {
        let reply = |w: &[&str]| w.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
        assert_eq!(
            skip_corrupt("t", reply(&["corrupt", "2", "a", "b", "ok", "7"])).unwrap(),
            reply(&["ok", "7"])
        );
        assert_eq!(
            skip_corrupt("t", reply(&["ok", "7"])).unwrap(),
            reply(&["ok", "7"])
        );
        assert!(skip_corrupt("t", reply(&["corrupt", "3", "a"])).is_err());
        assert!(skip_corrupt("t", reply(&["corrupt", "x"])).is_err());
    }

    #[test]
    fn urls_are_redacted() {
        assert_eq!(
            redact_url("redis://:secret@host:6379/0"),
            "redis://***@host:6379/0"
        );
        assert_eq!(redact_url("redis://host:6379"), "redis://host:6379");
    }
}
