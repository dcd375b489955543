//! Injected time: the domain never reads the system clock itself, so tests can
//! move time (tryout expiry, grace periods) without sleeping; and the time
//! authority, which decides how far a replica's own clock counts.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};

use chrono::{DateTime, Duration, Utc};
use parking_lot::Mutex;

/// A source of the current instant.
pub trait Clock: Send + Sync + 'static {
    fn now(&self) -> DateTime<Utc>;
}

/// The real wall clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> DateTime<Utc> {
        Utc::now()
    }
}

/// A clock that only moves when told to; shared by clones.
#[derive(Debug, Clone)]
pub struct ManualClock {
    // Shared so a test can keep a handle while the service holds another.
    now: Arc<Mutex<DateTime<Utc>>>,
}

impl ManualClock {
    pub fn new(start: DateTime<Utc>) -> Self {
        Self {
            now: Arc::new(Mutex::new(start)),
        }
    }

    /// Moves the clock forward (or back, with a negative duration).
    pub fn advance(&self, by: Duration) {
        *self.now.lock() += by;
    }

    pub fn set(&self, to: DateTime<Utc>) {
        *self.now.lock() = to;
    }
}

impl Clock for ManualClock {
    fn now(&self) -> DateTime<Utc> {
        *self.now.lock()
    }
}

/// The default of `clock.max_skew_ms`: how far a replica's clock may differ
/// from the deployment's reference before it stops counting. Time
/// synchronisation keeps clocks within milliseconds; minutes mean a clock that
/// is wrong, not one that drifts.
pub const DEFAULT_MAX_SKEW_MS: i64 = 120_000;

/// The deployment's reference time as last read (Redis `TIME`; for the embedded
/// store its own process clock), and how long ago by a monotonic clock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reference {
    /// The reference time when it was read (ms since the epoch).
    pub at_ms: i64,
    /// Real time passed since, measured by a clock that is never set.
    pub elapsed_ms: i64,
}

impl Reference {
    /// The reference time now: what was read, plus what has really passed.
    pub fn now_ms(&self) -> i64 {
        self.at_ms.saturating_add(self.elapsed_ms.max(0))
    }
}

/// What the time authority looks at on each tick.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TimeInputs {
    /// This replica's own clock now (ms).
    pub node_ms: i64,
    /// The reference, `None` before it was ever read.
    pub reference: Option<Reference>,
    /// The high-water mark so far (ms): decisions never go back behind it.
    pub previous_mark_ms: i64,
    /// A signed vendor time this PBX holds (a license's `issued_at`): evidence
    /// that time is at least there, but never beyond the reference.
    pub signed_floor_ms: Option<i64>,
    /// `clock.max_skew_ms`.
    pub max_skew_ms: i64,
}

/// The time authority's judgement of one tick.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TimeVerdict {
    /// This clock minus the reference (ms; positive: ahead); `None` without one.
    pub skew_ms: Option<i64>,
    /// The skew is beyond the tolerance: this clock does not count.
    pub skewed: bool,
    /// What to add to this clock to get the time decisions are made at: 0 while
    /// it agrees with the reference, the reference's lead over it otherwise.
    pub offset_ms: i64,
    /// The new high-water mark: never lower than before, never beyond the
    /// reference plus the tolerance, so it rises no faster than real time.
    pub mark_ms: i64,
}

/// The one rule of time: a replica's clock counts only while it agrees with the
/// reference within `max_skew_ms`; otherwise decisions use the reference. The
/// mark rises to the time decisions use (or a signed vendor time), but never
/// past the reference plus the tolerance, so one clock that leaps ahead moves
/// nobody's time; a clock going back finds the mark where it was.
pub fn judge(inputs: TimeInputs) -> TimeVerdict {
    let TimeInputs {
        node_ms,
        reference,
        previous_mark_ms,
        signed_floor_ms,
        max_skew_ms,
    } = inputs;
    let reference_ms = reference.map(|r| r.now_ms());
    let skew_ms = reference_ms.map(|r| node_ms.saturating_sub(r));
    let skewed = skew_ms.is_some_and(|s| s.unsigned_abs() > max_skew_ms.unsigned_abs());
    // The time this replica decides at, before the mark.
    let base = match reference_ms {
        Some(r) if skewed => r,
        _ => node_ms,
    };
    // Without a reference there is nothing to bound this clock by but itself.
    let ceiling = reference_ms.map_or(base, |r| r.saturating_add(max_skew_ms).max(base));
    // A signed time is evidence up to the reference, never beyond it.
    let floor = signed_floor_ms.map(|f| f.min(reference_ms.unwrap_or(base)));
    let candidate = floor.map_or(base, |f| f.max(base)).min(ceiling);
    TimeVerdict {
        skew_ms,
        skewed,
        offset_ms: base.saturating_sub(node_ms),
        mark_ms: previous_mark_ms.max(candidate),
    }
}

/// This replica's clock as the time authority corrects it: the node clock while
/// it agrees with the reference, the reference (kept by the node clock's pace)
/// while it does not. Everything that decides or stamps by time reads this.
pub struct TimeAuthority {
    node: Arc<dyn Clock>,
    max_skew_ms: i64,
    // Read on the hot path: one load, no lock. Set once per tick.
    offset_ms: AtomicI64,
    // The last skew measured (ms), `NO_SKEW` before the first reading.
    skew_ms: AtomicI64,
    skewed: AtomicBool,
}

/// `skew_ms` before a reference was read.
const NO_SKEW: i64 = i64::MIN;

impl TimeAuthority {
    pub fn new(node: Arc<dyn Clock>, max_skew_ms: i64) -> Self {
        Self {
            node,
            max_skew_ms,
            offset_ms: AtomicI64::new(0),
            skew_ms: AtomicI64::new(NO_SKEW),
            skewed: AtomicBool::new(false),
        }
    }

    /// This replica's own clock, uncorrected.
    pub fn node_now(&self) -> DateTime<Utc> {
        self.node.now()
    }

    pub fn max_skew_ms(&self) -> i64 {
        self.max_skew_ms
    }

    /// Takes a tick's verdict: from now on decisions use its offset.
    pub fn adopt(&self, verdict: &TimeVerdict) {
        self.offset_ms.store(verdict.offset_ms, Ordering::Relaxed);
        self.skew_ms
            .store(verdict.skew_ms.unwrap_or(NO_SKEW), Ordering::Relaxed);
        self.skewed.store(verdict.skewed, Ordering::Relaxed);
    }

    /// The last skew measured against the reference (ms), `None` before one.
    pub fn skew_ms(&self) -> Option<i64> {
        Some(self.skew_ms.load(Ordering::Relaxed)).filter(|s| *s != NO_SKEW)
    }

    /// Whether this clock disagrees with the reference beyond the tolerance.
    pub fn skewed(&self) -> bool {
        self.skewed.load(Ordering::Relaxed)
    }
}

impl Clock for TimeAuthority {
    fn now(&self) -> DateTime<Utc> {
        let node = self.node.now();
        match self.offset_ms.load(Ordering::Relaxed) {
            0 => node,
            offset => node
                .checked_add_signed(Duration::milliseconds(offset))
                .unwrap_or(node),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone as _;

    const DAY: i64 = 86_400_000;
    const NOW: i64 = 1_780_000_000_000;

    fn inputs(node_ms: i64, reference_ms: Option<i64>, previous_mark_ms: i64) -> TimeInputs {
        TimeInputs {
            node_ms,
            reference: reference_ms.map(|at_ms| Reference {
                at_ms,
                elapsed_ms: 0,
            }),
            previous_mark_ms,
            signed_floor_ms: None,
            max_skew_ms: DEFAULT_MAX_SKEW_MS,
        }
    }

    #[test]
    fn an_agreeing_clock_counts_and_raises_the_mark() {
        let v = judge(inputs(NOW + 1_000, Some(NOW), NOW - 10_000));
        assert_eq!(v.skew_ms, Some(1_000));
        assert!(!v.skewed);
        assert_eq!(v.offset_ms, 0);
        assert_eq!(v.mark_ms, NOW + 1_000);
    }

    #[test]
    fn a_clock_ahead_does_not_count_and_moves_no_mark() {
        let v = judge(inputs(NOW + 90 * DAY, Some(NOW), NOW - 1_000));
        assert_eq!(v.skew_ms, Some(90 * DAY));
        assert!(v.skewed);
        assert_eq!(v.offset_ms, -90 * DAY);
        assert_eq!(
            v.mark_ms, NOW,
            "the mark follows the reference, not the clock"
        );
    }

    #[test]
    fn a_clock_behind_does_not_count_and_the_mark_stays() {
        let v = judge(inputs(NOW - 5 * DAY, Some(NOW), NOW));
        assert!(v.skewed);
        assert_eq!(v.offset_ms, 5 * DAY);
        assert_eq!(v.mark_ms, NOW);
        // Within the tolerance but behind the mark: the mark stays.
        let v = judge(inputs(NOW - 60_000, Some(NOW), NOW));
        assert!(!v.skewed);
        assert_eq!(v.mark_ms, NOW);
    }

    #[test]
    fn the_mark_rises_no_faster_than_real_time() {
        // The reference was read 10 s ago: it is 10 s later now, not more.
        let mut i = inputs(NOW + 30 * DAY, None, NOW);
        i.reference = Some(Reference {
            at_ms: NOW,
            elapsed_ms: 10_000,
        });
        let v = judge(i);
        assert!(v.skewed);
        assert_eq!(v.mark_ms, NOW + 10_000);
        assert_eq!(v.offset_ms, NOW + 10_000 - i.node_ms);
        // Even an agreeing clock lifts the mark at most to the reference plus
        // the tolerance.
        let v = judge(inputs(NOW + DEFAULT_MAX_SKEW_MS, Some(NOW), 0));
        assert_eq!(v.mark_ms, NOW + DEFAULT_MAX_SKEW_MS);
    }

    #[test]
    fn time_that_really_passed_counts() {
        // Everything stopped ten days: the reference moved on, and so does the mark.
        let later = NOW + 10 * DAY;
        let v = judge(inputs(later, Some(later), NOW));
        assert!(!v.skewed);
        assert_eq!(v.mark_ms, later);
    }

    #[test]
    fn signed_times_raise_the_floor_up_to_the_reference() {
        let mut i = inputs(NOW - 3 * DAY, None, 0);
        i.signed_floor_ms = Some(NOW);
        // No reference: the signed time is not believed beyond this clock.
        assert_eq!(judge(i).mark_ms, NOW - 3 * DAY);
        i.reference = Some(Reference {
            at_ms: NOW,
            elapsed_ms: 0,
        });
        i.node_ms = NOW - 60_000;
        assert_eq!(judge(i).mark_ms, NOW);
        // A signed time beyond the reference is capped.
        i.signed_floor_ms = Some(NOW + DAY);
        assert_eq!(judge(i).mark_ms, NOW);
    }

    #[test]
    fn without_a_reference_the_clock_is_all_there_is() {
        let v = judge(inputs(NOW, None, NOW - 1));
        assert_eq!(v.skew_ms, None);
        assert!(!v.skewed);
        assert_eq!(v.mark_ms, NOW);
    }

    #[test]
    fn the_authority_corrects_a_skewed_clock() {
        let node = ManualClock::new(Utc.timestamp_millis_opt(NOW + 90 * DAY).unwrap());
        let time = TimeAuthority::new(Arc::new(node.clone()), DEFAULT_MAX_SKEW_MS);
        assert_eq!(time.now(), node.now());
        assert_eq!(time.skew_ms(), None);
        time.adopt(&judge(inputs(NOW + 90 * DAY, Some(NOW), 0)));
        assert!(time.skewed());
        assert_eq!(time.skew_ms(), Some(90 * DAY));
        assert_eq!(time.now().timestamp_millis(), NOW);
        node.advance(Duration::seconds(1));
        assert_eq!(time.now().timestamp_millis(), NOW + 1_000);
        assert_eq!(time.node_now(), node.now());
    }
}
