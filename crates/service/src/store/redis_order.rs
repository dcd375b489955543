//! Builds the seat order sets (see `lua/prelude.lua`, "Seat order") of a store
//! that lacks them: written before they existed, or by a replica that does not
//! keep them. A background task of the replica, never part of a request: it
//! starts when a snapshot finds the sets behind the version (at start-up, after
//! a resync) or when a write needs them and finds them untrue. In pages, never
//! as one call: the pool is read by `HSCAN` on a bulk connection of its own,
//! and each page's seats are put into the sets as they are at that moment by a
//! small script. Writes made meanwhile keep the sets themselves; the build ends
//! true at the version it ends at only when every one of them did (their feed
//! entries say so), else it runs again. One replica builds at a time (a mark
//! that lives while its pages come); the others' tasks wait for it, and take
//! over when its mark expires.
//!
//! A write that needs the sets meanwhile ([`Builder::wait`]) waits for the
//! build at most until shortly before its call's deadline (`store::answer_by`;
//! [`WAIT`] at most), then answers [`StoreError::Busy`] with the build's
//! expected rest: its script wrote nothing, and the build goes on.

use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use redis::Value;
use tokio::sync::watch;

use super::snapshot::Bulk;
use super::{Keys, ORDER_BEGIN, ORDER_FINISH, ORDER_PAGE, bounded, skip_corrupt, strings, texts};
use crate::domain::{Feature, SeatSource};
use crate::store::StoreError;
use crate::store::redis_conn::RedisConn;

/// How long a build's mark lives without a page (then another replica may
/// start over).
const MARK_MS: u64 = 10_000;
/// The longest a write waits for a build (its own or another replica's), even
/// with a later deadline: a waiting write holds a place in the write budget.
const WAIT: Duration = Duration::from_secs(10);
/// How long before its deadline a waiting write gives up, so that its answer
/// (`Busy`, saying why) goes out before the deadline cuts the call.
const ANSWER_MARGIN: Duration = Duration::from_millis(250);
/// Users one page script puts into the sets, and fields one `HSCAN` of the
/// build asks for: small, so no call of the build keeps Redis busy for long
/// (the build is in the background: its speed matters less than a snapshot's).
const PAGE: usize = 100;
const SCAN: usize = 500;
/// How many times one run builds again when writes that do not keep the sets
/// came during it (an older replica), before it gives up until asked again.
const AGAIN: u32 = 3;
/// The retry delay a `Busy` answer gives when the build's rest is not known
/// (another replica builds), and the shortest it gives.
const RETRY_UNKNOWN: Duration = Duration::from_secs(2);
const RETRY_MIN: Duration = Duration::from_secs(1);
const RETRY_MAX: Duration = Duration::from_secs(60);

/// What a build run ended with, shared by everyone waiting for it.
type Outcome = Result<(), StoreError>;

/// The seat order sets' builder of one replica: at most one task at a time.
pub(in crate::store) struct Builder {
    // The request-path connection, for the small build scripts.
    conn: RedisConn,
    // Its own bulk connection: a build's pages never queue a snapshot's.
    bulk: Bulk,
    keys: Keys,
    timeout: Duration,
    flight: Mutex<Flight>,
    // The newest request a finished run covered, and how it ended.
    done: watch::Sender<(u64, Outcome)>,
    progress: Mutex<Progress>,
}

/// Requests for a build, and the task serving them.
#[derive(Default)]
struct Flight {
    /// Requests made so far (each one's ticket is its number).
    requested: u64,
    /// A request asked for a forced build (the sets looked true but disagree
    /// with a record): the next run's first step rebuilds even when they look true.
    force: bool,
    /// The task, while one runs (taken when it ends, aborted with the store).
    task: Option<tokio::task::JoinHandle<()>>,
}

/// How far the build of this replica is, for the retry delay a waiting write
/// answers with.
#[derive(Debug, Clone, Copy, Default)]
struct Progress {
    /// When this replica's current build started; `None`: none runs here
    /// (another replica's may).
    since: Option<Instant>,
    /// Seat records in the purchased pools when it started.
    total: u64,
    /// Of those, put into the sets so far.
    done: u64,
}

impl Progress {
    /// The build's expected rest, when it runs here and has made progress.
    fn rest(&self) -> Option<Duration> {
        let since = self.since?;
        if self.done == 0 {
            return None;
        }
        let left = self.total.saturating_sub(self.done) as f64 / self.done as f64;
        Some(since.elapsed().mul_f64(left))
    }
}

impl Builder {
    pub(in crate::store) fn new(
        conn: RedisConn,
        bulk: Bulk,
        keys: Keys,
        timeout: Duration,
    ) -> Self {
        Self {
            conn,
            bulk,
            keys,
            timeout,
            flight: Mutex::new(Flight::default()),
            done: watch::channel((0, Ok(()))).0,
            progress: Mutex::new(Progress::default()),
        }
    }

    /// Starts a build unless one runs here (a snapshot found the sets behind
    /// the version); returns at once.
    pub(in crate::store) fn start(self: &Arc<Self>) {
        self.request(false);
    }

    /// Ends this replica's build task, if one runs (the store is dropped).
    pub(in crate::store) fn stop(&self) {
        if let Some(task) = self.flight.lock().task.take() {
            task.abort();
        }
    }

    /// Asks for a build that starts after this call (or for the running
    /// task's next run), starting the task if none runs; the request's ticket.
    fn request(self: &Arc<Self>, force: bool) -> u64 {
        let mut flight = self.flight.lock();
        flight.requested += 1;
        flight.force |= force;
        let ticket = flight.requested;
        if flight.task.is_none() {
            let builder = self.clone();
            flight.task = Some(tokio::spawn(async move { builder.serve().await }));
        }
        ticket
    }

    /// The task: runs builds while requests are waiting, each covering every
    /// request made before it started.
    async fn serve(self: Arc<Self>) {
        let mut covered = self.done.borrow().0;
        loop {
            let (upto, force) = {
                let mut flight = self.flight.lock();
                if flight.requested <= covered {
                    flight.task = None;
                    return;
                }
                (flight.requested, std::mem::take(&mut flight.force))
            };
            let outcome = self.build(force).await;
            *self.progress.lock() = Progress::default();
            if let Err(error) = &outcome {
                tracing::warn!(%error, "building the seat order sets failed; writes that need them try again");
            }
            covered = upto;
            self.done.send_modify(|done| *done = (upto, outcome));
        }
    }

    /// Waits for a build that started after this call to end (the write that
    /// asks found the sets untrue; `force`: they looked true but disagree with
    /// a record). At most until shortly before the call's deadline, and
    /// [`WAIT`]: then `Busy`, and the build goes on.
    pub(in crate::store) async fn wait(self: &Arc<Self>, force: bool) -> Result<(), StoreError> {
        let asked = Instant::now();
        let mut until = tokio::time::Instant::now() + WAIT;
        if let Some(deadline) = crate::store::answer_by() {
            until = until.min(deadline.checked_sub(ANSWER_MARGIN).unwrap_or(deadline));
        }
        let mut done = self.done.subscribe();
        let ticket = self.request(force);
        let finished = tokio::time::timeout_at(until, done.wait_for(|(upto, _)| *upto >= ticket));
        match finished.await {
            Ok(Ok(ended)) => ended.1.clone(),
            Ok(Err(_)) => Err(StoreError::Unavailable(
                "the seat order build stopped".into(),
            )),
            Err(_) => {
                let progress = *self.progress.lock();
                let retry_after = progress
                    .rest()
                    .unwrap_or(RETRY_UNKNOWN)
                    .clamp(RETRY_MIN, RETRY_MAX);
                let by = if progress.since.is_some() {
                    format!(
                        "by this replica, {} of {} seats so far",
                        progress.done, progress.total
                    )
                } else {
                    "by another replica".to_owned()
                };
                Err(StoreError::Busy {
                    message: format!(
                        "the over-capacity order of the seat pools is being built \
                         (once, after an upgrade; {by}); this write needs it and waited {} ms; \
                         retry in about {} s",
                        asked.elapsed().as_millis(),
                        retry_after.as_secs_f64().ceil()
                    ),
                    retry_after,
                })
            }
        }
    }

    /// One run: builds the order sets, or waits for another replica's build;
    /// `Ok` once they are true (or a build ended).
    async fn build(&self, force: bool) -> Outcome {
        let started = Instant::now();
        let id = super::new_epoch();
        let mut pause = Duration::from_millis(50);
        // The first step of a forced run builds even when they look true.
        let mut force = force;
        let mut again = 0;
        loop {
            let began = self.order_begin(&id, force).await?;
            force = false;
            match began.as_str() {
                "done" => return Ok(()),
                "busy" => {
                    // Another replica builds: poll until it ends (or its mark
                    // expires, and this one takes over).
                    tokio::time::sleep(crate::store::jittered(pause)).await;
                    pause = (pause * 2).min(Duration::from_secs(1));
                    continue;
                }
                "started" => {}
                other => {
                    return Err(StoreError::Corrupt(format!(
                        "order build began with {other:?}"
                    )));
                }
            }
            *self.progress.lock() = Progress {
                since: Some(Instant::now()),
                total: self.purchased_seats().await?,
                done: 0,
            };
            let mut pages = 0usize;
            let mut lost = false;
            'pools: for feature in Feature::SEATS {
                let key = self.keys.pool(feature, SeatSource::Purchased);
                let mut cursor = String::from("0");
                let mut count = SCAN;
                loop {
                    let ((next, flat),): ((String, Value),) = self
                        .bulk
                        .read(&mut count, |n| {
                            let mut pipe = redis::pipe();
                            pipe.cmd("HSCAN").arg(&key).arg(&cursor).arg("COUNT").arg(n);
                            pipe
                        })
                        .await?;
                    let users: Vec<Vec<u8>> = texts(flat)?
                        .chunks_exact(2)
                        .map(|pair| match &pair[0] {
                            Ok(user) => user.clone().into_bytes(),
                            Err(lossy) => lossy.clone().into_bytes(),
                        })
                        .collect();
                    for chunk in users.chunks(PAGE) {
                        pages += 1;
                        if !self.order_page(&id, feature, chunk).await? {
                            lost = true;
                            break 'pools;
                        }
                        self.progress.lock().done += chunk.len() as u64;
                    }
                    if next == "0" {
                        break;
                    }
                    cursor = next;
                }
            }
            *self.progress.lock() = Progress::default();
            if lost {
                tracing::info!("seat order build taken over by another replica; waiting for it");
                continue;
            }
            match self.order_finish(&id).await?.as_str() {
                "ok" => {
                    tracing::info!(
                        pages,
                        elapsed_ms =
                            u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
                        "built the seat order sets of the purchased pools in pages (once per store)"
                    );
                    return Ok(());
                }
                "again" if again < AGAIN => {
                    again += 1;
                    tracing::warn!(
                        "a write that does not keep the seat order sets came during their build \
                         (a replica of an older version?), or the feed was trimmed past its start; \
                         building them again"
                    );
                }
                "again" => {
                    return Err(StoreError::Unavailable(
                        "the seat order sets were rebuilt but are still not true (writes by a \
                         replica that does not keep them): try again"
                            .into(),
                    ));
                }
                _ => {}
            }
        }
    }

    /// Seat records in the purchased pools (one small read).
    async fn purchased_seats(&self) -> Result<u64, StoreError> {
        let mut pipe = redis::pipe();
        for feature in Feature::SEATS {
            pipe.cmd("HLEN")
                .arg(self.keys.pool(feature, SeatSource::Purchased));
        }
        let mut conn = self.conn.clone();
        let counts: Vec<u64> =
            bounded(self.timeout, "order_build", pipe.query_async(&mut conn)).await?;
        Ok(counts.into_iter().sum())
    }

    async fn order_begin(&self, id: &str, force: bool) -> Result<String, StoreError> {
        let mut inv = ORDER_BEGIN.prepare_invoke();
        inv.key(self.keys.version())
            .key(self.keys.order_at())
            .key(self.keys.order_build())
            .arg(id)
            .arg(MARK_MS)
            .arg(if force { "force" } else { "" });
        for feature in Feature::SEATS {
            inv.key(self.keys.order(feature))
                .key(self.keys.flagged(feature));
        }
        let mut conn = self.conn.clone();
        let reply =
            strings(bounded(self.timeout, "order_build", inv.invoke_async(&mut conn)).await?)?;
        Ok(reply.into_iter().next().unwrap_or_default())
    }

    /// One page; `false` when the build is no longer this builder's.
    async fn order_page(
        &self,
        id: &str,
        feature: Feature,
        users: &[Vec<u8>],
    ) -> Result<bool, StoreError> {
        let mut inv = ORDER_PAGE.prepare_invoke();
        self.order_keys(&mut inv)
            .key(self.keys.pool(feature, SeatSource::Purchased))
            .key(self.keys.order(feature))
            .key(self.keys.flagged(feature))
            .arg("")
            .arg(id)
            .arg(MARK_MS)
            .arg(feature.as_str());
        for user in users {
            inv.arg(user.as_slice());
        }
        let mut conn = self.conn.clone();
        let reply = skip_corrupt(
            "order_build",
            strings(bounded(self.timeout, "order_build", inv.invoke_async(&mut conn)).await?)?,
        )?;
        Ok(reply.first().map(String::as_str) == Some("ok"))
    }

    async fn order_finish(&self, id: &str) -> Result<String, StoreError> {
        let mut inv = ORDER_FINISH.prepare_invoke();
        self.order_keys(&mut inv).arg("").arg(id);
        let mut conn = self.conn.clone();
        let reply =
            strings(bounded(self.timeout, "order_build", inv.invoke_async(&mut conn)).await?)?;
        Ok(reply.into_iter().next().unwrap_or_default())
    }

    /// The prelude's keys and the build's mark: KEYS[1..5].
    fn order_keys<'a>(
        &self,
        inv: &'a mut redis::ScriptInvocation<'static>,
    ) -> &'a mut redis::ScriptInvocation<'static> {
        inv.key(self.keys.epoch())
            .key(self.keys.version())
            .key(self.keys.feed())
            .key(self.keys.order_at())
            .key(self.keys.order_build())
    }
}
