//! One entry of the audit trail (API.md, "Audit"): who did what, with which
//! outcome. Plain data; the store keeps it and the gRPC layer shows it.

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn details_are_cut_on_a_character_boundary() {
        assert_eq!(AuditEvent::bounded("abc", 5), "abc");
        assert_eq!(AuditEvent::bounded("äää", 3), "ä…");
        assert_eq!(parse_entry_id("17-3"), Some((17, 3)));
        assert_eq!(parse_entry_id("17"), None);
        assert_eq!(parse_entry_id("a-b"), None);
    }
}
