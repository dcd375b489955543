//! Capacity drops: when a license brings fewer seats of a feature than are held,
//! no seat is deleted. The most recently assigned excess seats are flagged
//! over capacity (and stop being licensed after a grace); when seats are released
//! or capacity grows, flags are cleared, oldest assignment first.

use chrono::{DateTime, Utc};

use super::seats::Seat;

/// The seats of one (feature, purchased) pool whose flag must change so that
/// exactly the `len - quantity` most recently assigned ones are flagged. Seats
/// already flagged keep their original flag time.
pub fn reflag(pool: &[Seat], quantity: u32, now: DateTime<Utc>) -> Vec<Seat> {
    let mut order: Vec<&Seat> = pool.iter().collect();
    // Most recently assigned first; ties broken by user id, newest-looking last.
    order.sort_by(|a, b| {
        b.assigned_at
            .cmp(&a.assigned_at)
            .then_with(|| b.user_id.cmp(&a.user_id))
    });
    let excess = order.len().saturating_sub(quantity as usize);
    let mut changed = Vec::new();
    for (i, seat) in order.into_iter().enumerate() {
        let flag = i < excess;
        match (flag, seat.over_capacity_since) {
            (true, None) => changed.push(Seat {
                over_capacity_since: Some(now),
                ..seat.clone()
            }),
            (false, Some(_)) => changed.push(Seat {
                over_capacity_since: None,
                ..seat.clone()
            }),
            _ => {}
        }
    }
    changed
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Feature, SeatSource, UserId};
    use chrono::Duration;

    fn t0() -> DateTime<Utc> {
        "2026-03-01T00:00:00Z".parse().unwrap()
    }

    fn seat(user: &str, minute: i64, flagged: Option<DateTime<Utc>>) -> Seat {
        Seat {
            user_id: UserId::parse(user).unwrap(),
            feature: Feature::User,
            source: SeatSource::Purchased,
            assigned_at: t0() + Duration::minutes(minute),
            over_capacity_since: flagged,
        }
    }

    fn users(seats: &[Seat]) -> Vec<&str> {
        let mut u: Vec<&str> = seats.iter().map(|s| s.user_id.as_str()).collect();
        u.sort();
        u
    }

    #[test]
    fn flags_the_most_recent_excess() {
        let pool = vec![
            seat("a", 1, None),
            seat("b", 2, None),
            seat("c", 3, None),
            seat("d", 4, None),
        ];
        let now = t0() + Duration::days(1);
        let changed = reflag(&pool, 2, now);
        assert_eq!(users(&changed), ["c", "d"]);
        assert!(changed.iter().all(|s| s.over_capacity_since == Some(now)));
        assert!(reflag(&pool, 4, now).is_empty());
        assert!(reflag(&pool, 10, now).is_empty());
        assert_eq!(reflag(&pool, 0, now).len(), 4);
    }

    #[test]
    fn clears_oldest_flags_first_and_keeps_flag_times() {
        let since = t0() + Duration::hours(1);
        // After "a" was released: b, c, d remain with c, d flagged; capacity 2.
        let pool = vec![
            seat("b", 2, None),
            seat("c", 3, Some(since)),
            seat("d", 4, Some(since)),
        ];
        let changed = reflag(&pool, 2, t0() + Duration::days(2));
        assert_eq!(users(&changed), ["c"]);
        assert_eq!(changed[0].over_capacity_since, None);
        // Nothing to change when flags already match; d keeps its time.
        let pool = vec![
            seat("b", 2, None),
            seat("c", 3, None),
            seat("d", 4, Some(since)),
        ];
        assert!(reflag(&pool, 2, t0() + Duration::days(3)).is_empty());
    }
}
