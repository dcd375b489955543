//! One entry of the audit trail (API.md, "Audit"): who did what, with which
//! outcome. Plain data; the store keeps it and the gRPC layer shows it. Also
//! the rule that summarizes floods of refusals ([`RefusalFloods`]).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};

/// How long a detail may be; longer ones are cut (an entry is a line, not a report).
pub const MAX_DETAIL_LEN: usize = 200;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditEvent {
    pub time: DateTime<Utc>,
    /// The caller's name (`loopback`, `anonymous`, or `-` when unknown).
    pub caller: String,
    /// The caller's role; empty when no caller was established.
    pub role: String,
    /// The RPC's short name (`AssignSeat`) or the request path for other services.
    pub method: String,
    pub user_id: String,
    pub feature: String,
    /// The status code's canonical name (`OK`, `PERMISSION_DENIED`).
    pub code: String,
    pub detail: String,
    /// The W3C trace id of the call, when it had one.
    pub trace_id: String,
}

impl AuditEvent {
    /// Cuts a detail (or a user id echoed from a bad request) to a bounded length
    /// on a character boundary.
    pub fn bounded(text: &str, max: usize) -> String {
        if text.len() <= max {
            return text.to_owned();
        }
        let mut end = max;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        format!("{}…", &text[..end])
    }
}

/// How much of the trail the store keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AuditRetention {
    pub max_entries: u64,
    pub max_age: chrono::Duration,
}

impl Default for AuditRetention {
    fn default() -> Self {
        Self {
            max_entries: 100_000,
            max_age: chrono::Duration::days(400),
        }
    }
}

/// An entry as stored, with the store's id for paging (`<ms>-<seq>`, newest
/// largest).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditEntry {
    pub id: String,
    pub event: AuditEvent,
}

/// Orders stream ids (`<ms>-<seq>`); `None` for something that is not one.
pub fn parse_entry_id(id: &str) -> Option<(u64, u64)> {
    let (ms, seq) = id.split_once('-')?;
    Some((ms.parse().ok()?, seq.parse().ok()?))
}

/// Refusals made before a handler ran (authentication, authorization, limits,
/// the TLS handshake) are stored one by one up to this many per caller,
/// method and code in each summary interval; the rest of a flood is counted
/// into one summary entry. A client hammering the service can neither turn the
/// trail into one more load on the store nor push older entries out of it
/// (`audit.max_entries`) with its own.
pub const REFUSALS_STORED_PER_INTERVAL: u32 = 20;
/// How often summaries of floods are written.
pub const SUMMARY_INTERVAL: Duration = Duration::from_secs(1);
/// Past this many (caller, method, code) keys tracked at once, refusals of new
/// keys share one key under this caller name.
pub const MANY_CALLERS: &str = "(many callers)";
const MAX_FLOOD_KEYS: usize = 4096;
/// A key without refusals for this long is forgotten.
const FORGET_AFTER: Duration = Duration::from_secs(60);

/// Which refusals are stored one by one and which are summarized. Pure: the
/// caller passes the time and stores what comes out.
#[derive(Debug, Default)]
pub struct RefusalFloods {
    windows: HashMap<(String, String, String), FloodWindow>,
}

#[derive(Debug)]
struct FloodWindow {
    /// When the current interval began.
    started: Instant,
    /// Entries stored one by one in it.
    stored: u32,
    /// Refusals counted (not stored) in it, and the first one's detail.
    summarized: u64,
    example: String,
    role: String,
    last_seen: Instant,
}

impl RefusalFloods {
    /// Whether the refusal `event` is stored on its own (`true`), or counted
    /// into the next summary (`false`).
    pub fn admit(&mut self, event: &AuditEvent, now: Instant) -> bool {
        let mut key = (
            event.caller.clone(),
            event.method.clone(),
            event.code.clone(),
        );
        if !self.windows.contains_key(&key) && self.windows.len() >= MAX_FLOOD_KEYS {
            self.forget_idle(now);
            if self.windows.len() >= MAX_FLOOD_KEYS {
                key.0 = MANY_CALLERS.to_owned();
            }
        }
        let window = self.windows.entry(key).or_insert_with(|| FloodWindow {
            started: now,
            stored: 0,
            summarized: 0,
            example: String::new(),
            role: event.role.clone(),
            last_seen: now,
        });
        window.last_seen = now;
        if window.summarized == 0 && now.duration_since(window.started) >= SUMMARY_INTERVAL {
            window.started = now;
            window.stored = 0;
        }
        if window.stored < REFUSALS_STORED_PER_INTERVAL {
            window.stored += 1;
            return true;
        }
        if window.summarized == 0 {
            window.example = event.detail.clone();
        }
        window.summarized += 1;
        false
    }

    /// One summary entry (dated `time`) for each key with refusals counted
    /// since the last call; their intervals start anew.
    pub fn summaries(&mut self, now: Instant, time: DateTime<Utc>) -> Vec<AuditEvent> {
        let mut out = Vec::new();
        for ((caller, method, code), window) in &mut self.windows {
            if window.summarized == 0 {
                continue;
            }
            let detail = format!(
                "{} more refused like this in {:.1} s, summarized (first: {})",
                window.summarized,
                now.duration_since(window.started).as_secs_f64(),
                window.example
            );
            out.push(AuditEvent {
                time,
                caller: caller.clone(),
                role: window.role.clone(),
                method: method.clone(),
                user_id: String::new(),
                feature: String::new(),
                code: code.clone(),
                detail: AuditEvent::bounded(&detail, MAX_DETAIL_LEN),
                trace_id: String::new(),
            });
            window.started = now;
            window.stored = 0;
            window.summarized = 0;
            window.example.clear();
        }
        self.forget_idle(now);
        out
    }

    fn forget_idle(&mut self, now: Instant) {
        self.windows
            .retain(|_, w| w.summarized > 0 || now.duration_since(w.last_seen) < FORGET_AFTER);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refusal(caller: &str, detail: &str) -> AuditEvent {
        AuditEvent {
            time: Utc::now(),
            caller: caller.into(),
            role: String::new(),
            method: "AssignSeat".into(),
            user_id: String::new(),
            feature: String::new(),
            code: "UNAUTHENTICATED".into(),
            detail: detail.into(),
            trace_id: String::new(),
        }
    }

    #[test]
    fn a_flood_is_stored_up_to_the_limit_then_summarized() {
        let mut floods = RefusalFloods::default();
        let t0 = Instant::now();
        let admitted = (0..100)
            .filter(|i| floods.admit(&refusal("-", &format!("why {i}")), t0))
            .count();
        assert_eq!(admitted, REFUSALS_STORED_PER_INTERVAL as usize);
        // Another caller has its own allowance.
        assert!(floods.admit(&refusal("peer:10.0.0.1", "x"), t0));
        let t1 = t0 + SUMMARY_INTERVAL;
        let summaries = floods.summaries(t1, Utc::now());
        assert_eq!(summaries.len(), 1);
        let summary = &summaries[0];
        assert_eq!(
            (summary.caller.as_str(), summary.method.as_str()),
            ("-", "AssignSeat")
        );
        assert_eq!(summary.code, "UNAUTHENTICATED");
        assert!(
            summary
                .detail
                .starts_with("80 more refused like this in 1.0 s")
                && summary.detail.contains("first: why 20"),
            "{}",
            summary.detail
        );
        // Counted once: the next summary has nothing, the allowance is back.
        assert!(floods.summaries(t1, Utc::now()).is_empty());
        assert!(floods.admit(&refusal("-", "again"), t1));
    }

    #[test]
    fn the_allowance_renews_each_interval_without_a_summary() {
        let mut floods = RefusalFloods::default();
        let t0 = Instant::now();
        for i in 0..5 {
            let now = t0 + SUMMARY_INTERVAL * i;
            for _ in 0..REFUSALS_STORED_PER_INTERVAL {
                assert!(floods.admit(&refusal("-", "x"), now));
            }
        }
        assert!(
            floods
                .summaries(t0 + SUMMARY_INTERVAL * 5, Utc::now())
                .is_empty()
        );
    }

    #[test]
    fn many_callers_share_one_key_and_idle_ones_are_forgotten() {
        let mut floods = RefusalFloods::default();
        let t0 = Instant::now();
        for i in 0..MAX_FLOOD_KEYS {
            assert!(floods.admit(&refusal(&format!("peer:{i}"), "x"), t0));
        }
        // The table is full: new callers share one key and its allowance.
        let admitted = (0..50)
            .filter(|i| floods.admit(&refusal(&format!("new:{i}"), "x"), t0))
            .count();
        assert_eq!(admitted, REFUSALS_STORED_PER_INTERVAL as usize);
        let summaries = floods.summaries(t0 + SUMMARY_INTERVAL, Utc::now());
        assert_eq!(summaries.len(), 1);
        assert_eq!(summaries[0].caller, MANY_CALLERS);
        // A minute later the idle keys are gone and a new caller gets its own.
        let later = t0 + FORGET_AFTER + SUMMARY_INTERVAL;
        assert!(floods.summaries(later, Utc::now()).is_empty());
        assert!(floods.windows.is_empty());
        assert!(floods.admit(&refusal("peer:new", "x"), later));
    }

    #[test]
    fn details_are_cut_on_a_character_boundary() {
        assert_eq!(AuditEvent::bounded("abc", 5), "abc");
        assert_eq!(AuditEvent::bounded("äää", 3), "ä…");
        assert_eq!(parse_entry_id("17-3"), Some((17, 3)));
        assert_eq!(parse_entry_id("17"), None);
        assert_eq!(parse_entry_id("a-b"), None);
    }
}
