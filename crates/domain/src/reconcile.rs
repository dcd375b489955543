//! What is remembered about reconciling with the license source.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// What a reconcile did (the API's `ReconcileOutcome`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReconcileOutcome {
    Updated,
    Unchanged,
    Unreachable,
    Rejected,
}

/// The last reconcile as every replica reports it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReconcileStatus {
    /// The last reconcile that reached the source and trusted its answer.
    #[serde(default)]
    pub last_success_at: Option<DateTime<Utc>>,
    #[serde(default)]
    pub last_attempt_at: Option<DateTime<Utc>>,
    #[serde(default)]
    pub last_outcome: Option<ReconcileOutcome>,
    /// Why the last attempt applied nothing; `None` after a success.
    #[serde(default)]
    pub last_error: Option<String>,
    /// When the next scheduled reconcile is due (any replica may run it).
    #[serde(default)]
    pub next_reconcile_at: Option<DateTime<Utc>>,
}
