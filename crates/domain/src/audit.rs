//! One entry of the audit trail (API.md, "Audit"): who did what, with which
//! outcome. Plain data; the store keeps it and the gRPC layer shows it. Also
//! the rule that summarizes floods of refusals ([`RefusalFloods`]).
//!
//! Refusals (entries whose code is not `OK`) are kept apart from accepted
//! changes in the store, under a retention of their own
//! ([`AuditRetention::max_refusals`]), so that no amount of them can push an
//! operator's change out of the trail. Before they get there, refusals pass
//! [`RefusalFloods`]: a client hammering the service can neither turn the
//! trail into one more load on the store nor fill the refusals' share with
//! its own.

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

/// Who made a call, as the audit trail names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Who<'a> {
    /// A caller the authorization layer established: its name and role.
    Caller { name: &'a str, role: &'a str },
    /// No caller established (refused before, or never asked): the peer's
    /// address when known.
    Anonymous(Option<std::net::IpAddr>),
}

impl Who<'_> {
    /// The one spelling of a caller without an established identity:
    /// `peer:<address>`, or `-` when not even the address is known.
    pub fn anonymous_name(peer: Option<std::net::IpAddr>) -> String {
        peer.map_or_else(
            || "-".to_owned(),
            |ip| format!("peer:{}", ip.to_canonical()),
        )
    }
}

/// Bounds of an entry's fields (an entry is a line, not a report).
const MAX_METHOD_LEN: usize = 128;
const MAX_USER_ID_LEN: usize = 160;
const MAX_FEATURE_LEN: usize = 64;

impl AuditEvent {
    /// The one constructor of an entry: `who` called `method` with the outcome
    /// `code` (the status code's canonical name) and `detail` (empty for an
    /// accepted call). Every field is bounded; add the request's keys with
    /// [`AuditEvent::with_keys`] and its trace with [`AuditEvent::with_trace`].
    pub fn new(time: DateTime<Utc>, who: Who<'_>, method: &str, code: &str, detail: &str) -> Self {
        let (caller, role) = match who {
            Who::Caller { name, role } => (name.to_owned(), role.to_owned()),
            Who::Anonymous(peer) => (Who::anonymous_name(peer), String::new()),
        };
        Self {
            time,
            caller,
            role,
            method: Self::bounded(method, MAX_METHOD_LEN),
            user_id: String::new(),
            feature: String::new(),
            code: code.to_owned(),
            detail: Self::bounded(detail, MAX_DETAIL_LEN),
            trace_id: String::new(),
        }
    }

    /// The request's business keys, raw as sent (a refused request's bad user
    /// id is worth seeing), bounded.
    pub fn with_keys(mut self, user_id: &str, feature: &str) -> Self {
        self.user_id = Self::bounded(user_id, MAX_USER_ID_LEN);
        self.feature = Self::bounded(feature, MAX_FEATURE_LEN);
        self
    }

    /// The W3C trace id of the call (empty when it had none).
    pub fn with_trace(mut self, trace_id: String) -> Self {
        self.trace_id = trace_id;
        self
    }

    /// Whether the entry is a refusal (any code but `OK`), kept under the
    /// refusals' retention; else an accepted change.
    pub fn is_refusal(&self) -> bool {
        self.code != "OK"
    }

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

/// How much of the trail the store keeps. Accepted changes and refusals are
/// bounded separately: refusals, which anyone can cause, never displace a
/// change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AuditRetention {
    /// Accepted changes kept at most.
    pub max_entries: u64,
    /// Refusals kept at most.
    pub max_refusals: u64,
    pub max_age: chrono::Duration,
}

impl AuditRetention {
    /// The bound of the entries of `event`'s kind.
    pub fn max_of(&self, event: &AuditEvent) -> u64 {
        if event.is_refusal() {
            self.max_refusals
        } else {
            self.max_entries
        }
    }
}

impl Default for AuditRetention {
    fn default() -> Self {
        Self {
            max_entries: 100_000,
            max_refusals: 100_000,
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

/// Merges two lists of entries, each newest first (the changes and the
/// refusals), into one newest first, at most `limit` long. Ids are unique
/// across both lists (the stores make them so), so paging by "strictly older
/// than the last id" visits every entry once.
pub fn merge_newest_first(
    changes: Vec<AuditEntry>,
    refusals: Vec<AuditEntry>,
    limit: usize,
) -> Vec<AuditEntry> {
    let key = |e: &AuditEntry| parse_entry_id(&e.id).unwrap_or_default();
    let mut out = Vec::with_capacity(limit.min(changes.len() + refusals.len()));
    let (mut a, mut b) = (
        changes.into_iter().peekable(),
        refusals.into_iter().peekable(),
    );
    while out.len() < limit {
        let next = match (a.peek(), b.peek()) {
            (Some(x), Some(y)) if key(x) >= key(y) => a.next(),
            (Some(_), Some(_)) => b.next(),
            (Some(_), None) => a.next(),
            (None, _) => b.next(),
        };
        match next {
            Some(entry) => out.push(entry),
            None => break,
        }
    }
    out
}

/// Refusals are stored one by one up to this many per caller, method and code
/// in each summary interval; the rest of a flood is counted into one summary
/// entry.
pub const REFUSALS_STORED_PER_INTERVAL: u32 = 20;
/// And up to this many in total per interval, whatever their keys: many
/// callers, methods or codes at once cannot multiply the allowance.
pub const REFUSALS_STORED_PER_INTERVAL_TOTAL: u32 = 100;
/// At most this many summary entries per interval; the floods beyond share one
/// more summary (caller [`MANY_CALLERS`], method and code [`VARIOUS`]).
pub const SUMMARIES_PER_INTERVAL: usize = 20;
/// How often summaries of floods are written.
pub const SUMMARY_INTERVAL: Duration = Duration::from_secs(1);
/// Past [`MAX_FLOOD_KEYS`] (caller, method, code) keys tracked at once,
/// refusals of new keys share one key under this caller name.
pub const MANY_CALLERS: &str = "(many callers)";
/// The method and code of that shared key, and of the summary of the floods
/// beyond [`SUMMARIES_PER_INTERVAL`].
pub const VARIOUS: &str = "(various)";
/// The method name of every request path the service does not serve: a client
/// inventing paths gets one key, not one per path (the path goes into the detail).
pub const UNKNOWN_METHOD: &str = "(unknown)";
/// How many keys are tracked at once (the state is bounded by this, whatever
/// comes in).
pub const MAX_FLOOD_KEYS: usize = 1024;
/// A key without refusals for this long is forgotten.
const FORGET_AFTER: Duration = Duration::from_secs(60);
/// How long a key's strings may be (callers file names and methods are
/// shorter; this only bounds the state against a caller that is not).
const MAX_KEY_LEN: usize = 128;

type FloodKey = (String, String, String);

/// Which refusals are stored one by one and which are summarized. Pure: the
/// caller passes the time and stores what comes out.
///
/// Each call of [`RefusalFloods::admit`] is O(1): one map look-up, counters,
/// no sweep over the keys. The allowances renew lazily: each key remembers the
/// interval its counters belong to, and a key of an older interval counts as
/// fresh. Sweeps (forgetting idle keys) happen only in
/// [`RefusalFloods::summaries`], once per interval.
#[derive(Debug, Default)]
pub struct RefusalFloods {
    windows: HashMap<FloodKey, FloodWindow>,
    /// The number of the current interval, and when it began (`None` before
    /// the first refusal).
    interval: u64,
    started: Option<Instant>,
    /// Refusals stored one by one in the current interval, all keys together.
    stored: u32,
    /// Refusals counted into summaries not yet written, all keys together.
    pending: u64,
}

#[derive(Debug)]
struct FloodWindow {
    /// The interval `stored` belongs to.
    interval: u64,
    /// Entries stored one by one in it.
    stored: u32,
    /// Refusals counted (not stored) since the last summary, and the first
    /// one's detail.
    summarized: u64,
    example: String,
    role: String,
    last_seen: Instant,
}

impl RefusalFloods {
    /// Whether the refusal `event` is stored on its own (`true`), or counted
    /// into the next summary (`false`).
    pub fn admit(&mut self, event: &AuditEvent, now: Instant) -> bool {
        let started = *self.started.get_or_insert(now);
        // A new interval begins by itself only when no summary is waiting:
        // a flood is summarized before its allowance renews.
        if self.pending == 0 && now.duration_since(started) >= SUMMARY_INTERVAL {
            self.next_interval(now);
        }
        let key = (
            bounded_key(&event.caller),
            bounded_key(&event.method),
            bounded_key(&event.code),
        );
        let key = if self.windows.contains_key(&key) || self.windows.len() < MAX_FLOOD_KEYS {
            key
        } else {
            (
                MANY_CALLERS.to_owned(),
                VARIOUS.to_owned(),
                VARIOUS.to_owned(),
            )
        };
        let interval = self.interval;
        let window = self.windows.entry(key).or_insert_with(|| FloodWindow {
            interval,
            stored: 0,
            summarized: 0,
            example: String::new(),
            role: AuditEvent::bounded(&event.role, MAX_KEY_LEN),
            last_seen: now,
        });
        window.last_seen = now;
        if window.interval != interval {
            window.interval = interval;
            window.stored = 0;
        }
        if window.stored < REFUSALS_STORED_PER_INTERVAL
            && self.stored < REFUSALS_STORED_PER_INTERVAL_TOTAL
        {
            window.stored += 1;
            self.stored += 1;
            return true;
        }
        if window.summarized == 0 {
            window.example = AuditEvent::bounded(&event.detail, MAX_DETAIL_LEN);
        }
        window.summarized += 1;
        self.pending += 1;
        false
    }

    /// The summary entries (dated `time`) of the refusals counted since the
    /// last call: one per key, at most [`SUMMARIES_PER_INTERVAL`] and one for
    /// the rest (the largest floods get their own). A new interval starts.
    pub fn summaries(&mut self, now: Instant, time: DateTime<Utc>) -> Vec<AuditEvent> {
        let seconds = self
            .started
            .map_or(0.0, |s| now.duration_since(s).as_secs_f64());
        let mut floods: Vec<(&FloodKey, &mut FloodWindow)> = self
            .windows
            .iter_mut()
            .filter(|(_, w)| w.summarized > 0)
            .collect();
        floods.sort_by_key(|f| std::cmp::Reverse(f.1.summarized));
        let mut out = Vec::new();
        let mut rest = (0u64, String::new());
        for (i, ((caller, method, code), window)) in floods.into_iter().enumerate() {
            if i < SUMMARIES_PER_INTERVAL {
                out.push(summary(
                    time,
                    (caller, &window.role, method, code),
                    window.summarized,
                    seconds,
                    &window.example,
                ));
            } else {
                if rest.0 == 0 {
                    rest.1 = format!("{caller} {method} {code}: {}", window.example);
                }
                rest.0 += window.summarized;
            }
            window.summarized = 0;
            window.example.clear();
        }
        if rest.0 > 0 {
            out.push(summary(
                time,
                (MANY_CALLERS, "", VARIOUS, VARIOUS),
                rest.0,
                seconds,
                &rest.1,
            ));
        }
        self.pending = 0;
        self.next_interval(now);
        self.windows
            .retain(|_, w| now.duration_since(w.last_seen) < FORGET_AFTER);
        out
    }

    /// How many keys are tracked (bounded by [`MAX_FLOOD_KEYS`] + 1).
    pub fn tracked_keys(&self) -> usize {
        self.windows.len()
    }

    fn next_interval(&mut self, now: Instant) {
        self.interval += 1;
        self.started = Some(now);
        self.stored = 0;
    }
}

fn bounded_key(text: &str) -> String {
    AuditEvent::bounded(text, MAX_KEY_LEN)
}

/// One summary entry: `(caller, role, method, code)` refused `count` more
/// times in `seconds`.
fn summary(
    time: DateTime<Utc>,
    (caller, role, method, code): (&str, &str, &str, &str),
    count: u64,
    seconds: f64,
    example: &str,
) -> AuditEvent {
    let detail =
        format!("{count} more refused like this in {seconds:.1} s, summarized (first: {example})");
    AuditEvent::new(
        time,
        Who::Caller { name: caller, role },
        method,
        code,
        &detail,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_constructor_bounds_every_field_and_spells_anonymous_callers_once() {
        let t = Utc::now();
        let long = "x".repeat(1000);
        let e = AuditEvent::new(
            t,
            Who::Caller {
                name: "pbx",
                role: "operator",
            },
            &long,
            "OK",
            &long,
        )
        .with_keys(&long, &long)
        .with_trace("abc".into());
        assert_eq!((e.caller.as_str(), e.role.as_str()), ("pbx", "operator"));
        assert!(e.method.len() <= MAX_METHOD_LEN + 3);
        assert!(e.detail.len() <= MAX_DETAIL_LEN + 3);
        assert!(e.user_id.len() <= MAX_USER_ID_LEN + 3);
        assert!(e.feature.len() <= MAX_FEATURE_LEN + 3);
        assert_eq!(e.trace_id, "abc");
        assert!(!e.is_refusal());
        let peer = "::ffff:10.0.0.7".parse().ok();
        let anonymous = AuditEvent::new(
            t,
            Who::Anonymous(peer),
            "(TLS handshake)",
            "UNAUTHENTICATED",
            "no",
        );
        assert_eq!(anonymous.caller, "peer:10.0.0.7");
        assert_eq!(anonymous.role, "");
        assert!(anonymous.is_refusal());
        assert_eq!(Who::anonymous_name(None), "-");
    }

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

    fn with_method(caller: &str, method: &str) -> AuditEvent {
        AuditEvent {
            method: method.into(),
            ..refusal(caller, "x")
        }
    }

    #[test]
    fn distinct_keys_share_a_total_allowance_and_a_bounded_state() {
        const CALLS: usize = 50_000;
        let mut floods = RefusalFloods::default();
        let t0 = Instant::now();
        // Every call a new caller and method: the per-key allowance alone
        // would store them all.
        let admitted = (0..CALLS)
            .filter(|i| {
                floods.admit(
                    &with_method(&format!("peer:{i}"), &format!("/x.Y/Z{i}")),
                    t0,
                )
            })
            .count();
        assert_eq!(admitted, REFUSALS_STORED_PER_INTERVAL_TOTAL as usize);
        // The state stays bounded: the keys beyond the table share one.
        assert_eq!(floods.tracked_keys(), MAX_FLOOD_KEYS + 1);
        let summaries = floods.summaries(t0 + SUMMARY_INTERVAL, Utc::now());
        // A bounded number of summaries, accounting for every refusal.
        assert_eq!(summaries.len(), SUMMARIES_PER_INTERVAL + 1);
        let counted: u64 = summaries
            .iter()
            .map(|s| s.detail.split_once(' ').unwrap().0.parse::<u64>().unwrap())
            .sum();
        assert_eq!(counted as usize + admitted, CALLS);
        // The largest flood (the shared key) comes first, the rest last.
        assert_eq!(
            (summaries[0].caller.as_str(), summaries[0].method.as_str()),
            (MANY_CALLERS, VARIOUS)
        );
        let rest = summaries.last().unwrap();
        assert_eq!(
            (rest.caller.as_str(), rest.code.as_str()),
            (MANY_CALLERS, VARIOUS)
        );
        assert!(
            rest.detail.contains("UNAUTHENTICATED: x"),
            "{}",
            rest.detail
        );
    }

    #[test]
    fn idle_keys_are_forgotten_once_an_interval() {
        let mut floods = RefusalFloods::default();
        let t0 = Instant::now();
        for i in 0..MAX_FLOOD_KEYS * 2 {
            floods.admit(&refusal(&format!("peer:{i}"), "x"), t0);
        }
        assert_eq!(floods.tracked_keys(), MAX_FLOOD_KEYS + 1);
        assert!(
            !floods
                .summaries(t0 + SUMMARY_INTERVAL, Utc::now())
                .is_empty()
        );
        // A minute later the idle keys are gone and a new caller gets its own.
        let later = t0 + FORGET_AFTER + SUMMARY_INTERVAL;
        assert!(floods.summaries(later, Utc::now()).is_empty());
        assert_eq!(floods.tracked_keys(), 0);
        assert!(floods.admit(&refusal("peer:new", "x"), later));
    }

    #[test]
    fn refusals_and_changes_have_their_own_bounds() {
        let retention = AuditRetention {
            max_entries: 5,
            max_refusals: 7,
            ..AuditRetention::default()
        };
        let refused = refusal("-", "x");
        let accepted = AuditEvent {
            code: "OK".into(),
            ..refusal("ops", "")
        };
        assert!(refused.is_refusal() && !accepted.is_refusal());
        assert_eq!(retention.max_of(&refused), 7);
        assert_eq!(retention.max_of(&accepted), 5);
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
