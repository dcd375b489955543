//! The audit trail: every state-changing call (accepted or refused) and every
//! refused call, written as a log line (target `audit`) at once and into the
//! store in the background, through a bounded queue that the writer drains in
//! batches (one store call per batch). Recording never changes a call's answer.
//!
//! Every accepted change is stored: when the queue is full, the call that made
//! the change waits for room ([`Auditor::record_change`], back-pressure on the
//! writers) up to the queue wait (the store's write timeout), and only past it
//! is the entry logged only and counted (`audit_not_stored{reason="queue_full"}`).
//! A batch the store does not take is tried again with backoff for
//! [`RETRY_FOR`]; only then is it dropped (`reason="store"`), so a store that
//! stays away cannot hold writers for longer than the queue wait each.
//! Refusals never wait: a full queue drops them at once (`queue_full`).
//!
//! Every refusal ([`Auditor::record_refusal`]: by the authorization layer, the
//! limits, the TLS handshake or a handler) is stored one by one up to a limit
//! per caller, method and code and a limit in total each second; the rest of a
//! flood becomes summary entries, at most a few a second ([`RefusalFloods`]).
//! The store keeps refusals apart from accepted changes, each under its own
//! bound, so refusals never push a change out of the trail.

use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use crate::domain::audit::{
    AuditEntry, AuditEvent, AuditRetention, RefusalFloods, SUMMARY_INTERVAL, parse_entry_id,
};
use crate::domain::{Clock, InvalidInput, LicensingError};
use crate::store::{Store, StoreError};

/// How many entries may wait for the store; beyond that an accepted change
/// waits for room, a refusal is logged only.
const QUEUE_LEN: usize = 4096;
/// The most entries one store call appends.
const BATCH_LEN: usize = 512;
/// How long a batch the store did not take is tried again before it is dropped.
pub const RETRY_FOR: Duration = Duration::from_secs(5);
/// The first pause before a batch is tried again; it doubles up to `MAX_BACKOFF`.
const FIRST_BACKOFF: Duration = Duration::from_millis(50);
const MAX_BACKOFF: Duration = Duration::from_secs(1);
/// How long an accepted change waits for room in a full queue, unless set
/// ([`Auditor::with_queue_wait`]).
const DEFAULT_QUEUE_WAIT: Duration = Duration::from_secs(1);
/// How many stored entries one filtered page reads at most before it returns
/// what it found with a token to go on (a filter matching little must not make
/// one call read the whole trail).
const SCAN_BUDGET: usize = 5000;

/// Records audit entries; cheap to clone.
#[derive(Clone)]
pub struct Auditor {
    tx: mpsc::Sender<AuditEvent>,
    /// How long an accepted change waits for room in a full queue.
    queue_wait: Duration,
    store: Arc<dyn Store>,
    clock: Arc<dyn Clock>,
    floods: Arc<Mutex<RefusalFloods>>,
}

/// The background half: takes entries off the queue into the store, and
/// writes the summaries of refusal floods.
pub struct AuditWriter {
    rx: mpsc::Receiver<AuditEvent>,
    store: Arc<dyn Store>,
    retention: AuditRetention,
    clock: Arc<dyn Clock>,
    floods: Arc<Mutex<RefusalFloods>>,
}

/// One page of the trail.
#[derive(Debug, Clone)]
pub struct AuditPage {
    pub entries: Vec<AuditEntry>,
    pub next_page_token: String,
}

impl Auditor {
    /// The recorder and its writer; run the writer (`AuditWriter::run`) in a task.
    pub fn new(
        store: Arc<dyn Store>,
        clock: Arc<dyn Clock>,
        retention: AuditRetention,
    ) -> (Self, AuditWriter) {
        let (tx, rx) = mpsc::channel(QUEUE_LEN);
        let floods = Arc::new(Mutex::new(RefusalFloods::default()));
        (
            Self {
                tx,
                queue_wait: DEFAULT_QUEUE_WAIT,
                store: store.clone(),
                clock: clock.clone(),
                floods: floods.clone(),
            },
            AuditWriter {
                rx,
                store,
                retention,
                clock,
                floods,
            },
        )
    }

    /// How long an accepted change waits for room in a full queue before it is
    /// logged only: the store's write timeout, so a change never waits for its
    /// entry longer than for its write.
    pub fn with_queue_wait(mut self, wait: Duration) -> Self {
        self.queue_wait = wait;
        self
    }

    /// Now, by the service's clock.
    pub fn now(&self) -> chrono::DateTime<chrono::Utc> {
        self.clock.now()
    }

    /// Records a refused call: on its own while its caller, method and code
    /// (and all refusals together) are within their allowance, else counted
    /// into the next summary entry. O(1) under the lock.
    pub fn record_refusal(&self, event: AuditEvent) {
        if self.floods.lock().admit(&event, Instant::now()) {
            self.record(event);
        } else {
            crate::metrics::auth_metrics().audit_summarized();
        }
    }

    /// Logs a refusal and queues it for the store, without waiting.
    fn record(&self, event: AuditEvent) {
        log(&event);
        if let Err(error) = self.tx.try_send(event) {
            let reason = match error {
                mpsc::error::TrySendError::Full(_) => "queue_full",
                mpsc::error::TrySendError::Closed(_) => "stopped",
            };
            not_stored(reason);
        }
    }

    /// Logs an accepted change and queues it for the store; when the queue is
    /// full, waits for room (up to the queue wait), so that a burst of writes
    /// slows down rather than leaves changes out of the trail. The wait runs in
    /// a task of its own: a call cut off meanwhile (its deadline) still leaves
    /// its entry.
    pub async fn record_change(&self, event: AuditEvent) {
        log(&event);
        let event = match self.tx.try_send(event) {
            Ok(()) => return,
            Err(mpsc::error::TrySendError::Closed(_)) => return not_stored("stopped"),
            Err(mpsc::error::TrySendError::Full(event)) => event,
        };
        crate::metrics::auth_metrics().audit_waited();
        let (tx, wait) = (self.tx.clone(), self.queue_wait);
        let waiting = tokio::spawn(async move {
            match tokio::time::timeout(wait, tx.send(event)).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => not_stored("stopped"),
                Err(_) => not_stored("queue_full"),
            }
        });
        let _ = waiting.await;
    }

    /// One page of the trail, newest first, optionally only one user's entries.
    pub async fn list(
        &self,
        user_id: &str,
        page_size: i32,
        page_token: &str,
    ) -> Result<AuditPage, LicensingError> {
        let size = crate::domain::page_size(page_size)?;
        let mut before = if page_token.is_empty() {
            None
        } else {
            Some(decode_page_token(page_token, user_id)?)
        };
        let mut entries = Vec::new();
        let mut scanned = 0;
        loop {
            let batch_len = if user_id.is_empty() {
                size + 1 - entries.len()
            } else {
                (size + 1).max(100)
            };
            let batch = self
                .store
                .list_audit(before.as_deref(), batch_len)
                .await
                .map_err(store_error)?;
            let exhausted = batch.len() < batch_len;
            scanned += batch.len();
            for entry in batch {
                before = Some(entry.id.clone());
                if user_id.is_empty() || entry.event.user_id == user_id {
                    entries.push(entry);
                    if entries.len() > size {
                        break;
                    }
                }
            }
            if entries.len() > size {
                entries.truncate(size);
                let last = entries.last().expect("a full page has a last entry");
                let token = encode_page_token(&last.id, user_id);
                return Ok(AuditPage {
                    entries,
                    next_page_token: token,
                });
            }
            if exhausted {
                return Ok(AuditPage {
                    entries,
                    next_page_token: String::new(),
                });
            }
            if scanned >= SCAN_BUDGET {
                let token = encode_page_token(before.as_deref().unwrap_or_default(), user_id);
                return Ok(AuditPage {
                    entries,
                    next_page_token: token,
                });
            }
        }
    }
}

/// Counts an entry that reached only the log, and says so.
fn not_stored(reason: &'static str) {
    crate::metrics::auth_metrics().audit_not_stored(reason);
    tracing::warn!(target: "audit", reason, "audit entry not stored (logged only)");
}

/// The entry's log line (target `audit`).
fn log(event: &AuditEvent) {
    tracing::info!(
        target: "audit",
        caller = %event.caller,
        role = %event.role,
        method = %event.method,
        user_id = %event.user_id,
        feature = %event.feature,
        code = %event.code,
        detail = %event.detail,
        trace_id = %event.trace_id,
        "audit"
    );
}

impl AuditWriter {
    /// Stores queued entries in batches, and each second the summaries of
    /// refusal floods, until every [`Auditor`] is gone and the queue is empty.
    pub async fn run(mut self) {
        let mut tick = tokio::time::interval(SUMMARY_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut batch = Vec::with_capacity(BATCH_LEN);
        loop {
            tokio::select! {
                n = self.rx.recv_many(&mut batch, BATCH_LEN) => {
                    if n == 0 {
                        break;
                    }
                    self.store(&batch).await;
                    batch.clear();
                }
                _ = tick.tick() => self.store_summaries().await,
            }
        }
        self.store_summaries().await;
    }

    async fn store_summaries(&self) {
        let summaries = self
            .floods
            .lock()
            .summaries(Instant::now(), self.clock.now());
        for summary in &summaries {
            log(summary);
        }
        self.store(&summaries).await;
    }

    /// Appends a batch in one call; a batch the store does not take is tried
    /// again with backoff (the queue fills meanwhile, and accepted changes
    /// wait for room) for [`RETRY_FOR`], then dropped, each entry counted.
    async fn store(&self, batch: &[AuditEvent]) {
        if batch.is_empty() {
            return;
        }
        let started = Instant::now();
        let mut backoff = FIRST_BACKOFF;
        loop {
            let error = match self.store.append_audit_batch(batch, &self.retention).await {
                Ok(()) => return,
                Err(error) => error,
            };
            if started.elapsed() + backoff > RETRY_FOR {
                for event in batch {
                    crate::metrics::auth_metrics().audit_not_stored("store");
                    tracing::warn!(
                        target: "audit",
                        %error,
                        method = %event.method,
                        caller = %event.caller,
                        "audit entry not stored (logged only)"
                    );
                }
                return;
            }
            tracing::debug!(%error, entries = batch.len(), "audit batch not stored yet, trying again");
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }
}

fn store_error(e: StoreError) -> LicensingError {
    match e {
        StoreError::Unavailable(m) => LicensingError::Unavailable(m),
        StoreError::NotInitialized | StoreError::Moved => {
            LicensingError::Unavailable("store not initialized or being repaired".into())
        }
        StoreError::Corrupt(m) => LicensingError::Internal(m),
        StoreError::Busy {
            message,
            retry_after,
        } => LicensingError::StoreBusy {
            message,
            retry_after,
        },
    }
}

/// The opaque `page_token` of `ListAuditEvents`.
#[derive(Debug, Serialize, Deserialize)]
struct PageToken {
    v: u32,
    /// Entries strictly older than this id come next.
    before: String,
    /// The user id filter the token was made for (empty = none).
    user_id: String,
}

fn encode_page_token(before: &str, user_id: &str) -> String {
    let token = PageToken {
        v: 1,
        before: before.to_owned(),
        user_id: user_id.to_owned(),
    };
    URL_SAFE_NO_PAD.encode(serde_json::to_vec(&token).expect("a page token always serializes"))
}

/// Reads a `ListAuditEvents` page token made for the `user_id` filter: the id
/// the next page starts before.
pub fn decode_page_token(raw: &str, user_id: &str) -> Result<String, InvalidInput> {
    let bad = || {
        InvalidInput::new(
            "page_token",
            "is not a token from a previous ListAuditEvents response",
        )
    };
    if raw.len() > 1024 {
        return Err(bad());
    }
    let bytes = URL_SAFE_NO_PAD.decode(raw).map_err(|_| bad())?;
    let token: PageToken = serde_json::from_slice(&bytes).map_err(|_| bad())?;
    if token.v != 1 || parse_entry_id(&token.before).is_none() {
        return Err(bad());
    }
    if token.user_id != user_id {
        return Err(InvalidInput::new(
            "page_token",
            "was made for another user_id filter",
        ));
    }
    Ok(token.before)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::SystemClock;
    use crate::store::memory::MemoryStore;

    fn event(user: &str) -> AuditEvent {
        AuditEvent {
            time: chrono::Utc::now(),
            caller: "ops".into(),
            role: "operator".into(),
            method: "AssignSeat".into(),
            user_id: user.into(),
            feature: "user".into(),
            code: "OK".into(),
            detail: String::new(),
            trace_id: String::new(),
        }
    }

    fn refused(user: &str) -> AuditEvent {
        AuditEvent {
            code: "PERMISSION_DENIED".into(),
            ..event(user)
        }
    }

    #[tokio::test]
    async fn a_full_queue_makes_changes_wait_and_drops_refusals() {
        let store: Arc<dyn Store> = Arc::new(MemoryStore::new(Arc::new(SystemClock)));
        // No writer runs yet: the queue fills up.
        let (auditor, writer) = Auditor::new(
            store.clone(),
            Arc::new(SystemClock),
            AuditRetention::default(),
        );
        let auditor = auditor.with_queue_wait(Duration::from_millis(100));
        let metrics = crate::metrics::auth_metrics();
        let full = metrics.audit_not_stored_count("queue_full");
        for i in 0..QUEUE_LEN {
            auditor.record_change(event(&format!("u{i}"))).await;
        }
        // A refusal is not waited for: dropped at once, counted.
        let started = Instant::now();
        auditor.record(refused("flood"));
        assert!(started.elapsed() < Duration::from_millis(50));
        assert_eq!(metrics.audit_not_stored_count("queue_full"), full + 1);
        // An accepted change waits for the queue wait, then is logged only.
        let waits = metrics.audit_waits_count();
        let started = Instant::now();
        auditor.record_change(event("late")).await;
        assert!(started.elapsed() >= Duration::from_millis(100));
        assert_eq!(metrics.audit_not_stored_count("queue_full"), full + 2);
        assert!(metrics.audit_waits_count() > waits);

        // With the writer draining, a change that waits gets its place.
        let auditor = auditor.with_queue_wait(Duration::from_secs(10));
        let writer = tokio::spawn(writer.run());
        auditor.record_change(event("waited")).await;
        drop(auditor);
        writer.await.unwrap();
        let stored = store.list_audit(None, QUEUE_LEN + 10).await.unwrap();
        assert_eq!(stored.len(), QUEUE_LEN + 1);
        assert_eq!(stored[0].event.user_id, "waited");
        assert_eq!(metrics.audit_not_stored_count("queue_full"), full + 2);
    }

    #[tokio::test]
    async fn a_store_that_fails_is_retried_then_costs_a_counter_not_the_call() {
        // Nothing listens on port 1: every append fails at once.
        let serial = crate::domain::SerialNumber::parse("AUDIT-FAIL").unwrap();
        let store = crate::store::redis::RedisStore::new(
            "redis://127.0.0.1:1",
            &serial,
            std::time::Duration::from_millis(100),
        )
        .unwrap();
        let (auditor, writer) = Auditor::new(
            Arc::new(store),
            Arc::new(SystemClock),
            AuditRetention::default(),
        );
        let metrics = crate::metrics::auth_metrics();
        let before = metrics.audit_not_stored_count("store");
        let writer = tokio::spawn(writer.run());
        let started = std::time::Instant::now();
        auditor.record_change(event("alice")).await;
        auditor.record_change(event("bob")).await;
        // Recording never waits for the store while the queue has room.
        assert!(started.elapsed() < std::time::Duration::from_millis(50));
        // Tried again for RETRY_FOR, then dropped and counted.
        tokio::time::sleep(RETRY_FOR / 2).await;
        assert_eq!(metrics.audit_not_stored_count("store"), before);
        let deadline = std::time::Instant::now() + RETRY_FOR * 3;
        while metrics.audit_not_stored_count("store") < before + 2 {
            assert!(
                std::time::Instant::now() < deadline,
                "store failures counted"
            );
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        drop(auditor);
        writer.await.unwrap();
    }

    #[tokio::test]
    async fn a_store_back_within_the_retry_time_gets_the_batch() {
        // Redis starts a second after the entries were recorded.
        let port = comtrexx_licensing_test_support::unused_port();
        let serial = crate::domain::SerialNumber::parse("AUDIT-LATE").unwrap();
        let store: Arc<dyn Store> = Arc::new(
            crate::store::redis::RedisStore::new(
                &format!("redis://127.0.0.1:{port}"),
                &serial,
                Duration::from_millis(200),
            )
            .unwrap(),
        );
        let (auditor, writer) = Auditor::new(
            store.clone(),
            Arc::new(SystemClock),
            AuditRetention::default(),
        );
        let writer = tokio::spawn(writer.run());
        for i in 0..10 {
            auditor.record_change(event(&format!("u{i}"))).await;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        let _redis = comtrexx_licensing_test_support::RedisServer::start_on(port);
        drop(auditor);
        writer.await.unwrap();
        assert_eq!(store.list_audit(None, 100).await.unwrap().len(), 10);
    }

    #[tokio::test]
    async fn pages_visit_every_entry_once_newest_first() {
        let store: Arc<dyn Store> = Arc::new(MemoryStore::new(Arc::new(SystemClock)));
        for i in 0u32..25 {
            let user = if i.is_multiple_of(3) { "alice" } else { "bob" };
            store
                .append_audit(&event(&format!("{user}{i}")), &AuditRetention::default())
                .await
                .unwrap();
        }
        let (auditor, _writer) =
            Auditor::new(store, Arc::new(SystemClock), AuditRetention::default());
        let mut seen = Vec::new();
        let mut token = String::new();
        loop {
            let page = auditor.list("", 10, &token).await.unwrap();
            seen.extend(page.entries.iter().map(|e| e.event.user_id.clone()));
            if page.next_page_token.is_empty() {
                break;
            }
            token = page.next_page_token;
        }
        let expected: Vec<String> = (0u32..25)
            .rev()
            .map(|i| format!("{}{i}", if i.is_multiple_of(3) { "alice" } else { "bob" }))
            .collect();
        assert_eq!(seen, expected);
        let page = auditor.list("alice0", 10, "").await.unwrap();
        assert_eq!(page.entries.len(), 1);
        let err = auditor.list("x", 10, &token).await.unwrap_err();
        assert!(matches!(err, LicensingError::InvalidInput(i) if i.field == "page_token"));
    }
}
