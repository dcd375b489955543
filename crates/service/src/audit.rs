//! The audit trail: every state-changing call (accepted or refused) and every
//! refused call, written as a log line (target `audit`) at once and into the
//! store in the background, through a bounded queue. Recording never delays
//! the call it records and never changes its answer: a full queue or a store
//! that cannot take the entry leaves the log line and a counter.
//!
//! Every refusal ([`Auditor::record_refusal`]: by the authorization layer, the
//! limits, the TLS handshake or a handler) is stored one by one up to a limit
//! per caller, method and code and a limit in total each second; the rest of a
//! flood becomes summary entries, at most a few a second ([`RefusalFloods`]).
//! The store keeps refusals apart from accepted changes, each under its own
//! bound, so refusals never push a change out of the trail.

use std::sync::Arc;
use std::time::Instant;

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

/// How many entries may wait for the store; beyond that they are logged only.
const QUEUE_LEN: usize = 4096;
/// How many stored entries one filtered page reads at most before it returns
/// what it found with a token to go on (a filter matching little must not make
/// one call read the whole trail).
const SCAN_BUDGET: usize = 5000;

/// Records audit entries; cheap to clone.
#[derive(Clone)]
pub struct Auditor {
    tx: mpsc::Sender<AuditEvent>,
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

    /// Logs the entry and queues it for the store, without waiting.
    pub fn record(&self, event: AuditEvent) {
        log(&event);
        if let Err(error) = self.tx.try_send(event) {
            let reason = match error {
                mpsc::error::TrySendError::Full(_) => "queue_full",
                mpsc::error::TrySendError::Closed(_) => "stopped",
            };
            crate::metrics::auth_metrics().audit_not_stored(reason);
            tracing::warn!(target: "audit", reason, "audit entry not stored (logged only)");
        }
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
    /// Stores queued entries, and each second the summaries of refusal
    /// floods, until every [`Auditor`] is gone.
    pub async fn run(mut self) {
        let mut tick = tokio::time::interval(SUMMARY_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                event = self.rx.recv() => match event {
                    Some(event) => self.store(&event).await,
                    None => break,
                },
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
        for summary in summaries {
            log(&summary);
            self.store(&summary).await;
        }
    }

    async fn store(&self, event: &AuditEvent) {
        if let Err(error) = self.store.append_audit(event, &self.retention).await {
            crate::metrics::auth_metrics().audit_not_stored("store");
            tracing::warn!(
                target: "audit",
                %error,
                method = %event.method,
                caller = %event.caller,
                "audit entry not stored (logged only)"
            );
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

    #[tokio::test]
    async fn a_full_queue_costs_a_counter_not_the_call() {
        let store: Arc<dyn Store> = Arc::new(MemoryStore::new(Arc::new(SystemClock)));
        // No writer runs: the queue fills up.
        let (auditor, _writer) = Auditor::new(
            store.clone(),
            Arc::new(SystemClock),
            AuditRetention::default(),
        );
        let metrics = crate::metrics::auth_metrics();
        let before = metrics.audit_not_stored_count("queue_full");
        for i in 0..QUEUE_LEN + 3 {
            auditor.record(event(&format!("u{i}")));
        }
        assert_eq!(metrics.audit_not_stored_count("queue_full"), before + 3);
        assert!(store.list_audit(None, 1).await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn a_store_that_fails_costs_a_counter_not_the_call() {
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
        auditor.record(event("alice"));
        auditor.record(event("bob"));
        // Recording never waits for the store.
        assert!(started.elapsed() < std::time::Duration::from_millis(50));
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
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
