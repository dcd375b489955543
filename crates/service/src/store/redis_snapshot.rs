//! A snapshot of the Redis store read in bounded steps, never as one blocking
//! call: a small head (epoch, version and the single records), then each seat
//! pool by `HSCAN` pages, then the change feed from the head's version, replayed
//! over the pages. Every seat untouched while the pages were read comes back
//! with its value (`HSCAN` returns every element present for the whole scan);
//! every seat touched meanwhile has a feed entry after the head's version, and
//! the feed's changes carry whole values, so replaying them in order gives the
//! store exactly as it was at the feed's last version.
//!
//! Each step is bounded on its own (the pages on a connection of their own, so a
//! slow page never queues request-path calls behind it, and dropped after a
//! timeout, so Redis never keeps a reply nobody reads). A page that times out is
//! read again smaller, after a jittered pause. When the feed cannot be continued
//! from the head (trimmed under a write burst, another epoch) the snapshot
//! starts again, a bounded number of times.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, Value};
use tokio::sync::Mutex as AsyncMutex;

use chrono::TimeZone as _;

use super::{
    CasRecord, IncidentRecordV1, InitializationRecordV1, LeaseRecordV1, LicenseRecordV1,
    ReconcileRecordV1, RedisStore, SNAPSHOT, SeatRecordV1, Target, TryoutRecordV1, feed_change,
    record, text, texts, version_of,
};
use crate::domain::initcode::PendingInitialization;
use crate::domain::{Feature, Lease, ReconcileStatus, Seat, SeatSource, TryoutRecord, UserId};
use crate::store::{
    Change, ChangeKind, Incident, Position, SeatSink, SeatValue, Snapshot, StoreError,
    StoredLicense,
};

/// Fields one `HSCAN` page asks for (a hint to Redis). A page of 24-byte ids
/// is about 150 kB; at 1 000 000 seats a page of 4 000 took Redis about 6 ms
/// (up to 12 ms), one of 1 500 about 2–3 ms: far below the 10 ms that any
/// single call may hold Redis (BENCHMARKS.md, "Scale").
const SCAN_COUNT: usize = 1500;
/// The smallest page a timed-out page shrinks to.
const SCAN_COUNT_MIN: usize = 50;
/// Feed entries one page of the replay reads.
const FEED_PAGE: usize = 1000;
/// How often a snapshot starts again when the feed could not be continued.
const ATTEMPTS: usize = 4;
/// How often one page is read again after a timeout (each time smaller).
const PAGE_RETRIES: usize = 4;

/// The seats read so far: handed to a [`SeatSink`] as they come, and the
/// records that do not parse, by key, until the replay replaces them.
struct Seats<'a> {
    sink: &'a mut dyn SeatSink,
    /// Records of the pages that do not parse, by (feature, user as stored).
    corrupt: HashMap<(Feature, String), String>,
}

impl Seats<'_> {
    fn put(&mut self, seat: &Seat) {
        self.replayed(
            seat.feature,
            seat.user_id.as_str(),
            Some(SeatValue::of(seat)),
        );
    }

    fn remove(&mut self, feature: Feature, user: &str) {
        self.replayed(feature, user, None);
    }

    fn replayed(&mut self, feature: Feature, user: &str, seat: Option<SeatValue>) {
        if !self.corrupt.is_empty() {
            self.corrupt.remove(&(feature, user.to_owned()));
        }
        self.sink.replayed(feature, user, seat);
    }

    fn clear(&mut self) {
        self.corrupt.clear();
        self.sink.cleared();
    }

    fn restart(&mut self) {
        self.corrupt.clear();
        self.sink.restart();
    }

    /// The corrupt records' names.
    fn corrupt_names(&mut self) -> Vec<String> {
        std::mem::take(&mut self.corrupt)
            .into_iter()
            .map(|((feature, user), e)| format!("seat {feature}/{user:?}: {e}"))
            .collect()
    }
}

/// Collects a snapshot's seats into one vector ([`RedisStore::read_snapshot`]):
/// the pages' seats, then what the replayed feed changed, by key (few).
#[derive(Default)]
pub(super) struct Collect {
    /// Every readable seat the pages returned (a seat may come twice).
    paged: Vec<Seat>,
    /// The replay's last word per (feature, user): a seat, or none (released).
    replayed: BTreeMap<(Feature, String), Option<Seat>>,
}

impl SeatSink for Collect {
    fn page_seat(&mut self, feature: Feature, user: &str, seat: SeatValue) {
        if let Ok(user_id) = UserId::parse(user) {
            self.paged.push(seat.to_seat(user_id, feature));
        }
    }

    fn replayed(&mut self, feature: Feature, user: &str, seat: Option<SeatValue>) {
        let seat = seat.and_then(|s| Some(s.to_seat(UserId::parse(user).ok()?, feature)));
        self.replayed.insert((feature, user.to_owned()), seat);
    }

    fn cleared(&mut self) {
        self.paged = Vec::new();
        self.replayed.clear();
    }

    fn restart(&mut self) {
        self.cleared();
    }
}

impl Collect {
    /// The seats, ordered by (feature, user), each once.
    pub(super) fn finish(self) -> Vec<Seat> {
        let Collect {
            mut paged,
            replayed,
        } = self;
        // A later page's copy of a seat wins (the tryout pool is read after
        // the purchased one, as the replica's copy takes them); the sort is
        // stable, so of equal keys the last read comes last.
        paged.sort_by(|a, b| (a.feature, &a.user_id).cmp(&(b.feature, &b.user_id)));
        paged.dedup_by(|later, kept| {
            let same = later.feature == kept.feature && later.user_id == kept.user_id;
            if same {
                std::mem::swap(later, kept);
            }
            same
        });
        if !replayed.is_empty() {
            paged.retain(|s| !replayed.contains_key(&(s.feature, s.user_id.as_str().to_owned())));
            paged.extend(replayed.into_values().flatten());
            paged.sort_by(|a, b| (a.feature, &a.user_id).cmp(&(b.feature, &b.user_id)));
        }
        paged
    }
}

/// The single records of the head, then as the replay changes them.
#[derive(Default)]
struct Records {
    license: Option<StoredLicense>,
    tryout: Option<TryoutRecord>,
    reconcile: ReconcileStatus,
    initialization: Option<PendingInitialization>,
    retired: Option<StoredLicense>,
    incident: Option<Incident>,
    /// The leases by id (the head's, then as the replay changes them).
    leases: BTreeMap<String, Lease>,
    /// Corrupt single records, by record name: a replayed change that replaces
    /// one takes its name off.
    corrupt: Vec<(&'static str, String)>,
}

impl Records {
    fn replaced(&mut self, names: &[&str]) {
        self.corrupt.retain(|(n, _)| !names.contains(n));
    }
}

/// Applies one feed change to what was read: the same effect as the write had.
fn replay(change: &Change, seats: &mut Seats<'_>, records: &mut Records) {
    match &change.kind {
        ChangeKind::SeatAssigned(seat) | ChangeKind::SeatFlagged(seat) => seats.put(seat),
        ChangeKind::SeatReleased { feature, user_id } => seats.remove(*feature, user_id.as_str()),
        ChangeKind::LicenseApplied(l) => {
            records.license = Some(l.clone());
            records.replaced(&["license"]);
        }
        ChangeKind::TryoutChanged(t) => {
            records.tryout = Some(t.clone());
            records.replaced(&["tryout"]);
        }
        ChangeKind::ReconcileRecorded(r) => {
            records.reconcile = r.clone();
            records.replaced(&["reconcile"]);
        }
        ChangeKind::InitializationIssued(p) => {
            records.initialization = Some(p.clone());
            records.replaced(&["initialization"]);
        }
        ChangeKind::InitializationConsumed => {
            records.initialization = None;
            records.replaced(&["initialization"]);
        }
        ChangeKind::Repaired(i) => {
            records.incident = Some(i.clone());
            records.replaced(&["incident"]);
        }
        ChangeKind::LeaseAcquired { lease, reclaimed } => {
            for id in reclaimed {
                records.leases.remove(id);
            }
            records
                .leases
                .retain(|_, l| l.key() != lease.key() || l.lease_id == lease.lease_id);
            records.leases.insert(lease.lease_id.clone(), lease.clone());
        }
        ChangeKind::LeasesRenewed {
            lease_ids,
            expires_at,
            ..
        } => {
            for id in lease_ids {
                if let Some(l) = records.leases.get_mut(id) {
                    l.expires_at = *expires_at;
                }
            }
        }
        ChangeKind::LeaseReleased { lease_id } => {
            records.leases.remove(lease_id);
        }
        ChangeKind::Reset => {
            seats.clear();
            records.leases.clear();
            if let Some(l) = records.license.take() {
                records.retired = Some(l);
                records.replaced(&["retired license"]);
            }
            records.reconcile = ReconcileStatus::default();
            records.initialization = None;
            records.replaced(&["license", "reconcile", "initialization"]);
        }
    }
}

/// Why one attempt must start again.
struct Restart(String);

impl RedisStore {
    /// Reads a consistent snapshot in bounded steps (see the module).
    pub(super) async fn read_snapshot(&self) -> Result<Snapshot, StoreError> {
        let mut collect = Collect::default();
        let mut snapshot = self.read_snapshot_into(&mut collect).await?;
        snapshot.seats = collect.finish();
        Ok(snapshot)
    }

    /// [`Self::read_snapshot`], the seats handed to `sink` as they are read.
    pub(super) async fn read_snapshot_into(
        &self,
        sink: &mut dyn SeatSink,
    ) -> Result<Snapshot, StoreError> {
        let mut why = String::new();
        let mut seats = Seats {
            sink,
            corrupt: HashMap::new(),
        };
        for attempt in 0..ATTEMPTS {
            if attempt > 0 {
                seats.restart();
            }
            match self.snapshot_attempt(&mut seats).await? {
                Ok(snapshot) => return Ok(snapshot),
                Err(Restart(reason)) => {
                    tracing::debug!(%reason, "snapshot could not continue from its head; reading again");
                    crate::metrics::metrics().redis_error("snapshot_restart");
                    why = reason;
                }
            }
        }
        Err(StoreError::Unavailable(format!(
            "no consistent snapshot after {ATTEMPTS} attempts: {why}"
        )))
    }

    async fn snapshot_attempt(
        &self,
        seats: &mut Seats<'_>,
    ) -> Result<Result<Snapshot, Restart>, StoreError> {
        // 1. The head: one small script.
        let mut inv = SNAPSHOT.prepare_invoke();
        inv.key(self.keys.epoch())
            .key(self.keys.version())
            .key(self.keys.license())
            .key(self.keys.tryout())
            .key(self.keys.reconcile())
            .key(self.keys.init())
            .key(self.keys.retired_license())
            .key(self.keys.clock())
            .key(self.keys.incident())
            .key(self.keys.order_at())
            .key(self.keys.lease_records());
        let pools = self.keys.pools();
        for (_, _, key) in &pools {
            inv.key(key);
        }
        let mut conn = self.conn.clone();
        let head: Vec<Value> = self
            .bounded("snapshot", inv.invoke_async(&mut conn))
            .await?;
        if head.len() != 12 + pools.len() {
            return Err(StoreError::Corrupt(
                "snapshot reply has the wrong shape".into(),
            ));
        }
        // A record that does not parse is skipped and named, never fatal: one bad
        // value must not keep every replica from reading the rest.
        let mut records = Records::default();
        let corrupt = &mut records.corrupt;
        let license = single(&head[2], "license", LicenseRecordV1::parse, corrupt);
        let tryout = single(&head[3], "tryout", TryoutRecordV1::parse, corrupt);
        let reconcile = single(&head[4], "reconcile", ReconcileRecordV1::parse, corrupt);
        let initialization = single(
            &head[5],
            "initialization",
            InitializationRecordV1::parse,
            corrupt,
        );
        let retired = single(&head[6], "retired license", LicenseRecordV1::parse, corrupt);
        let incident = single(&head[8], "incident", IncidentRecordV1::parse, corrupt);
        records.license = license;
        records.tryout = tryout;
        records.reconcile = reconcile.unwrap_or_default();
        records.initialization = initialization;
        records.retired = retired;
        records.incident = incident;
        let lease_fields = texts(head[11].clone())?;
        for pair in lease_fields.chunks_exact(2) {
            let lease = match (&pair[0], &pair[1]) {
                (Ok(id), Ok(raw)) => LeaseRecordV1::parse(raw).and_then(|r| r.into_lease(id)),
                _ => Err(StoreError::Corrupt("not UTF-8".into())),
            };
            match lease {
                Ok(lease) => {
                    records.leases.insert(lease.lease_id.clone(), lease);
                }
                Err(e) => {
                    let id = pair[0].as_ref().unwrap_or_else(|lossy| lossy);
                    records
                        .corrupt
                        .push(("lease", format!("lease {id:?}: {e}")));
                }
            }
        }
        // A corrupt license record leaves its id readable: a replica reads the
        // license as none, and applying one expecting none replaces it.
        self.saw(
            CasRecord::LicenseId,
            &text(&head[9]).unwrap_or_default(),
            records.license.as_ref().map(|l| l.id().to_owned()),
        );
        self.saw(
            CasRecord::Tryout,
            &text(&head[3]).unwrap_or_default(),
            records.tryout.as_ref().map(TryoutRecordV1::encode),
        );
        self.saw(
            CasRecord::Initialization,
            &text(&head[5]).unwrap_or_default(),
            records
                .initialization
                .as_ref()
                .map(InitializationRecordV1::encode),
        );
        let epoch = text(&head[0])?;
        let head_version = version_of(&text(&head[1])?)?;
        // A store without true order sets (written before they existed, or by
        // a replica that does not keep them): built now, in the background, so
        // the first write that needs them finds them ready.
        if !epoch.is_empty() && text(&head[10])? != head_version.to_string() {
            self.order.start();
        }
        let high_water_ms = text(&head[7])?.parse::<i64>().unwrap_or_else(|_| {
            let what = "high-water clock is not a number".to_owned();
            records.corrupt.push(("clock", what));
            0
        });

        // 2. The pools, page by page (the sink makes room for them once).
        let mut records_of: HashMap<Feature, usize> = HashMap::new();
        for ((feature, _, _), n) in pools.iter().zip(&head[12..]) {
            let n: usize = redis::from_redis_value_ref(n).unwrap_or(0);
            *records_of.entry(*feature).or_default() += n;
        }
        for (feature, n) in records_of {
            seats.sink.expect(feature, n);
        }
        for (feature, _, key) in &pools {
            self.scan_pool(*feature, key, seats).await?;
        }

        // 3. The feed since the head, replayed over the pages.
        let mut version = head_version;
        if !epoch.is_empty() {
            match self
                .replay_feed(&epoch, head_version, seats, &mut records)
                .await?
            {
                Ok(last) => version = last,
                Err(restart) => return Ok(Err(restart)),
            }
        }

        let mut all_corrupt: Vec<String> = records.corrupt.into_iter().map(|(_, e)| e).collect();
        all_corrupt.extend(seats.corrupt_names());
        for what in &all_corrupt {
            tracing::error!(record = %what, "corrupt record in the seat store skipped");
            crate::metrics::metrics().corrupt_record();
        }
        Ok(Ok(Snapshot {
            position: (!epoch.is_empty()).then_some(Position { epoch, version }),
            seats: Vec::new(),
            license: records.license,
            tryout: records.tryout,
            reconcile: records.reconcile,
            initialization: records.initialization,
            retired_license: records.retired,
            high_water_ms,
            incident: records.incident,
            leases: {
                let mut leases: Vec<Lease> = records.leases.into_values().collect();
                leases.sort_by(|a, b| a.key().cmp(&b.key()));
                leases
            },
            corrupt: all_corrupt,
        }))
    }

    /// Reads one pool by `HSCAN` pages into `seats` (a later source of the same
    /// user replaces an earlier one, as the replica's copy does).
    async fn scan_pool(
        &self,
        feature: Feature,
        key: &str,
        seats: &mut Seats<'_>,
    ) -> Result<(), StoreError> {
        let mut cursor = Some(String::from("0"));
        let mut count = SCAN_COUNT;
        // A page is parsed while the next one is on its way.
        let mut page: Option<Value> = None;
        while cursor.is_some() || page.is_some() {
            // Boxed: the page's future is large, and nested in the snapshot's.
            let fetch = Box::pin(async {
                let Some(at) = &cursor else {
                    return Ok(None);
                };
                let ((next, flat),): ((String, Value),) = self
                    .bulk
                    .read(&mut count, |n| {
                        let mut pipe = redis::pipe();
                        pipe.cmd("HSCAN").arg(key).arg(at).arg("COUNT").arg(n);
                        pipe
                    })
                    .await?;
                Ok::<_, StoreError>(Some((next, flat)))
            });
            let parse = async {
                match page.take() {
                    Some(flat) => parse_page(feature, flat, seats).await,
                    None => Ok(()),
                }
            };
            let (fetched, parsed) = tokio::join!(fetch, parse);
            parsed?;
            match fetched? {
                Some((next, flat)) => {
                    page = Some(flat);
                    cursor = (next != "0").then_some(next);
                }
                None => cursor = None,
            }
        }
        Ok(())
    }

    /// Replays the feed after `from` over what was read, and answers the last
    /// version replayed; `Restart` when the feed does not continue from `from`
    /// in `epoch` (trimmed meanwhile, a gap, or the store replaced).
    async fn replay_feed(
        &self,
        epoch: &str,
        from: u64,
        seats: &mut Seats<'_>,
        records: &mut Records,
    ) -> Result<Result<u64, Restart>, StoreError> {
        let mut last = from;
        loop {
            let mut page_len = FEED_PAGE;
            let (page, now_epoch, now_version): (
                redis::streams::StreamRangeReply,
                Option<String>,
                Option<String>,
            ) = self
                .bulk
                .read(&mut page_len, |n| {
                    let mut pipe = redis::pipe();
                    pipe.atomic()
                        .cmd("XRANGE")
                        .arg(self.keys.feed())
                        .arg(format!("{}-0", last + 1))
                        .arg("+")
                        .arg("COUNT")
                        .arg(n)
                        .cmd("GET")
                        .arg(self.keys.epoch())
                        .cmd("GET")
                        .arg(self.keys.version());
                    pipe
                })
                .await?;
            if now_epoch.as_deref() != Some(epoch) {
                return Ok(Err(Restart("the store's epoch changed".into())));
            }
            let top = version_of(now_version.as_deref().unwrap_or("0"))?;
            let read = page.ids.len();
            for entry in page.ids {
                let v = entry
                    .id
                    .split_once('-')
                    .and_then(|(v, _)| v.parse::<u64>().ok());
                if v != Some(last + 1) {
                    return Ok(Err(Restart(format!(
                        "the feed does not continue from version {last} (found {:?})",
                        entry.id
                    ))));
                }
                let change = match feed_change(last + 1, &entry.map) {
                    Ok(change) => change,
                    // Not replayable: a new head is read, past this entry.
                    Err(e) => return Ok(Err(Restart(format!("feed entry {}: {e}", last + 1)))),
                };
                self.saw_change(&entry.map, &change);
                replay(&change, seats, records);
                last += 1;
            }
            if read < page_len {
                if last < top {
                    return Ok(Err(Restart(format!(
                        "the feed ends at {last}, the version is {top}"
                    ))));
                }
                return Ok(Ok(last));
            }
        }
    }
}

/// A connection of its own for bulk reads (the pages of a snapshot, of a
/// build of the seat order sets), with a longer bound than a request's: a slow
/// page never queues request-path calls behind it. Dropped after an error or
/// timeout (so Redis drops the reply nobody reads) and made anew.
pub(super) struct Bulk {
    target: Target,
    timeout: Duration,
    conn: AsyncMutex<Option<MultiplexedConnection>>,
}

impl Bulk {
    pub(super) fn new(target: Target, timeout: Duration) -> Self {
        Self {
            target,
            timeout,
            conn: AsyncMutex::new(None),
        }
    }

    /// The bound of one bulk page: longer than a request's, never shorter.
    fn page_timeout(&self) -> Duration {
        (self.timeout * 4).max(Duration::from_millis(500))
    }

    /// Runs one bulk read (`make(count)`), bounded by the page timeout. After a
    /// timeout the connection is dropped (Redis discards the reply nobody
    /// reads) and the read is tried again after a jittered pause, asking for
    /// half as much (`count`, kept for later pages).
    pub(super) async fn read<T: redis::FromRedisValue>(
        &self,
        count: &mut usize,
        make: impl Fn(usize) -> redis::Pipeline,
    ) -> Result<T, StoreError> {
        let mut pause = Duration::from_millis(20);
        let mut tries = 0;
        loop {
            let mut guard = self.conn.lock().await;
            if guard.is_none() {
                let config = AsyncConnectionConfig::new()
                    .set_connection_timeout(Some(self.timeout))
                    .set_response_timeout(Some(self.page_timeout()));
                let conn =
                    super::bounded(self.timeout, "bulk_connect", self.target.connect(&config))
                        .await?;
                *guard = Some(conn);
            }
            let conn: &mut MultiplexedConnection = guard.as_mut().expect("connection was just set");
            let pipe = make(*count);
            let error =
                match tokio::time::timeout(self.page_timeout(), pipe.query_async(conn)).await {
                    Ok(Ok(reply)) => return Ok(reply),
                    Ok(Err(e)) => super::classify(e),
                    Err(_) => StoreError::Unavailable(format!(
                        "no answer to a bulk page within {} ms",
                        self.page_timeout().as_millis()
                    )),
                };
            *guard = None;
            drop(guard);
            crate::metrics::metrics().redis_error("snapshot_page");
            tries += 1;
            if tries > PAGE_RETRIES {
                return Err(error);
            }
            *count = (*count / 2).max(SCAN_COUNT_MIN);
            tokio::time::sleep(crate::store::jittered(pause)).await;
            pause *= 2;
        }
    }
}

/// One `HSCAN` page's (user, record) pairs into `seats`, read in place (no
/// copy of an id or a record is made). Yields now and then: the connection's
/// driver, which reads the next page meanwhile, may run on this thread.
async fn parse_page(
    feature: Feature,
    flat: Value,
    seats: &mut Seats<'_>,
) -> Result<(), StoreError> {
    let Value::Array(items) = flat else {
        return Err(StoreError::Corrupt(format!(
            "a page of seat pool {feature} is not an array"
        )));
    };
    fn bytes(v: &Value) -> Result<&[u8], StoreError> {
        match v {
            Value::BulkString(b) => Ok(b.as_slice()),
            Value::SimpleString(s) => Ok(s.as_bytes()),
            other => Err(StoreError::Corrupt(format!("page entry {other:?}"))),
        }
    }
    for (i, pair) in items.chunks_exact(2).enumerate() {
        if i > 0 && i % 512 == 0 {
            tokio::task::yield_now().await;
        }
        let (user, record) = (bytes(&pair[0])?, bytes(&pair[1])?);
        match page_seat(user, record) {
            Ok((user, seat)) => seats.sink.page_seat(feature, user, seat),
            Err(e) => {
                let user = String::from_utf8_lossy(user).into_owned();
                seats.corrupt.insert((feature, user), e.to_string());
            }
        }
    }
    seats.sink.page_done();
    Ok(())
}

/// A stored (user, record) pair, checked as `stored_seat` checks it: the
/// canonical record text read directly, anything else by the record's parser.
fn page_seat<'a>(user: &'a [u8], record: &[u8]) -> Result<(&'a str, SeatValue), StoreError> {
    let (Ok(user), Ok(record)) = (std::str::from_utf8(user), std::str::from_utf8(record)) else {
        return Err(StoreError::Corrupt("not UTF-8".into()));
    };
    let seat = match canonical_seat(record) {
        Some(seat) => seat,
        None => SeatRecordV1::parse(record)?.into_value()?,
    };
    UserId::check(user).map_err(|e| StoreError::Corrupt(format!("stored user id: {e}")))?;
    Ok((user, seat))
}

/// A seat record exactly as this code and the scripts write it
/// (`{"v":1,"source":"purchased","assigned_at_ms":N}`, optionally with
/// `,"over_capacity_since_ms":N`), with times a replica can read; `None` for
/// any other text (then the full parser decides).
fn canonical_seat(record: &str) -> Option<SeatValue> {
    let (source, rest) = if let Some(rest) =
        record.strip_prefix(r#"{"v":1,"source":"purchased","assigned_at_ms":"#)
    {
        (SeatSource::Purchased, rest)
    } else {
        (
            SeatSource::Tryout,
            record.strip_prefix(r#"{"v":1,"source":"tryout","assigned_at_ms":"#)?,
        )
    };
    let (assigned_at_ms, rest) = leading_int(rest)?;
    let over_capacity_since_ms = match rest {
        "}" => None,
        _ => {
            let rest = rest.strip_prefix(r#","over_capacity_since_ms":"#)?;
            let (since, rest) = leading_int(rest)?;
            (rest == "}").then_some(())?;
            Some(since)
        }
    };
    let readable = |ms: i64| chrono::Utc.timestamp_millis_opt(ms).single().is_some();
    (readable(assigned_at_ms) && over_capacity_since_ms.is_none_or(readable)).then_some(SeatValue {
        source,
        assigned_at_ms,
        over_capacity_since_ms,
    })
}

/// A JSON integer at the start of `text` (no leading zeros, no overflow) and
/// the text after it.
fn leading_int(text: &str) -> Option<(i64, &str)> {
    let digits_from = usize::from(text.starts_with('-'));
    let end = text[digits_from..]
        .find(|c: char| !c.is_ascii_digit())
        .map_or(text.len(), |n| n + digits_from);
    let digits = &text[digits_from..end];
    if digits.is_empty() || (digits.len() > 1 && digits.starts_with('0')) {
        return None;
    }
    Some((text[..end].parse().ok()?, &text[end..]))
}

/// A single record of the head: `None` when absent, or when corrupt (then named
/// under `what` in `corrupt`).
fn single<T>(
    v: &Value,
    what: &'static str,
    parse: fn(&str) -> Result<T, StoreError>,
    corrupt: &mut Vec<(&'static str, String)>,
) -> Option<T> {
    let mut found = Vec::new();
    let r = record(v, what, parse, &mut found);
    corrupt.extend(found.into_iter().map(|e| (what, e)));
    r
}
