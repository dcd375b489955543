//! Concurrent-use seats: a lease is one use of a concurrent feature by a user,
//! held by one holder (the calling instance, e.g. a call-handling pod) that
//! renews it; a lease not renewed within the lease length is free again.
//!
//! A lease is identified by what the holder already knows: (user, feature,
//! holder) within the PBX's serial number. A retried or reconnecting acquire
//! by the same holder therefore gets the same lease back, renewed, and never a
//! second seat. Its `lease_id` is the handle renewals and releases name.

use std::collections::HashMap;

use chrono::{DateTime, Utc};

use super::ids::{Feature, InvalidInput, UserId};

/// The calling instance that holds leases: the same rules as a user id
/// (1 to 128 bytes, no control characters), reported under its own field name.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Holder(String);

impl Holder {
    pub fn parse(raw: &str) -> Result<Self, InvalidInput> {
        UserId::parse(raw)
            .map(|u| Self(String::from(u)))
            .map_err(|e| InvalidInput::new("holder", e.message))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for Holder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// The longest lease id a request may name (ids are 32 hex digits; longer
/// ones are unknown anyway, and refused before they reach the store).
pub const MAX_LEASE_ID_BYTES: usize = 64;

/// A lease id as named in a request: non-empty, at most
/// [`MAX_LEASE_ID_BYTES`], printable ASCII (ids are made of hex digits).
pub fn parse_lease_id(raw: &str, field: &'static str) -> Result<String, InvalidInput> {
    if raw.is_empty() {
        return Err(InvalidInput::new(field, "must not be empty"));
    }
    if raw.len() > MAX_LEASE_ID_BYTES {
        return Err(InvalidInput::new(
            field,
            format!(
                "must be at most {MAX_LEASE_ID_BYTES} bytes, got {}",
                raw.len()
            ),
        ));
    }
    if !raw.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(InvalidInput::new(field, "must be printable ASCII"));
    }
    Ok(raw.to_owned())
}

/// A new lease id: 128 random bits in hex. Used only when the (user, feature,
/// holder) holds no lease yet; otherwise the existing id is kept.
pub fn new_lease_id() -> String {
    format!("{:032x}", rand::random::<u128>())
}

/// One use of a concurrent feature.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub lease_id: String,
    pub user_id: UserId,
    pub feature: Feature,
    pub holder: Holder,
    pub acquired_at: DateTime<Utc>,
    /// The lease is free again at this instant unless renewed before.
    pub expires_at: DateTime<Utc>,
}

impl Lease {
    /// Whether the lease still holds at `now` (the store judges with its own
    /// clock; a replica with the deployment's reference time).
    pub fn is_live(&self, now: DateTime<Utc>) -> bool {
        now < self.expires_at
    }

    /// The order leases are listed in: (feature, user, holder).
    pub fn key(&self) -> (Feature, &UserId, &Holder) {
        (self.feature, &self.user_id, &self.holder)
    }
}

/// What an acquisition may use: the feature's quantity from the verified
/// license (named by its id: the store refuses the write if another document
/// was applied meanwhile).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeasePlan {
    pub capacity: u32,
    pub license_id: String,
}

/// How many of a feature's leases are live at `now`, and the latest instant
/// one of a user's leases holds until: what a copy keeps per user.
pub fn latest_expiry<'a>(expiries: impl IntoIterator<Item = &'a i64>, now_ms: i64) -> Option<i64> {
    expiries.into_iter().copied().filter(|e| *e > now_ms).max()
}

/// The leases a copy of the store holds (a replica's mirror, a client's
/// copy), by id and by feature and user, so that `CheckSeat` on a concurrent
/// feature is one lookup ([`LeaseBook::until_ms`]). Expired leases stay until
/// the store reclaims them (an acquisition's `reclaimed`, a release): the
/// decision compares their expiry with its own time.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LeaseBook {
    by_id: HashMap<String, Lease>,
    /// Per feature and user: their leases' ids and expiries (ms).
    by_user: HashMap<Feature, HashMap<String, Vec<(String, i64)>>>,
}

impl LeaseBook {
    /// Puts a lease (acquired, or renewed by a repeated acquire); the older
    /// lease of the same (feature, user, holder), if any, goes.
    pub fn put(&mut self, lease: &Lease) {
        self.remove(&lease.lease_id);
        let same_key: Vec<String> = self
            .by_user
            .get(&lease.feature)
            .and_then(|u| u.get(lease.user_id.as_str()))
            .map(|ids| {
                ids.iter()
                    .filter(|(id, _)| self.by_id.get(id).is_some_and(|l| l.holder == lease.holder))
                    .map(|(id, _)| id.clone())
                    .collect()
            })
            .unwrap_or_default();
        for id in same_key {
            self.remove(&id);
        }
        self.by_user
            .entry(lease.feature)
            .or_default()
            .entry(lease.user_id.as_str().to_owned())
            .or_default()
            .push((lease.lease_id.clone(), lease.expires_at.timestamp_millis()));
        self.by_id.insert(lease.lease_id.clone(), lease.clone());
    }

    /// Removes a lease (released, reclaimed); an unknown id changes nothing.
    pub fn remove(&mut self, id: &str) {
        let Some(lease) = self.by_id.remove(id) else {
            return;
        };
        if let Some(users) = self.by_user.get_mut(&lease.feature)
            && let Some(ids) = users.get_mut(lease.user_id.as_str())
        {
            ids.retain(|(i, _)| i != id);
            if ids.is_empty() {
                users.remove(lease.user_id.as_str());
            }
        }
    }

    /// A lease renewed until `expires_at`; an unknown id changes nothing.
    pub fn renew(&mut self, id: &str, expires_at: DateTime<Utc>) {
        let Some(lease) = self.by_id.get_mut(id) else {
            return;
        };
        lease.expires_at = expires_at;
        let ms = expires_at.timestamp_millis();
        if let Some(ids) = self
            .by_user
            .get_mut(&lease.feature)
            .and_then(|u| u.get_mut(lease.user_id.as_str()))
        {
            for (i, until) in ids.iter_mut() {
                if i == id {
                    *until = ms;
                }
            }
        }
    }

    /// The latest expiry (ms) of the user's leases of `feature`, live or not;
    /// `None` without one. No allocation.
    pub fn until_ms(&self, feature: Feature, user_id: &str) -> Option<i64> {
        self.by_user
            .get(&feature)?
            .get(user_id)?
            .iter()
            .map(|(_, until)| *until)
            .max()
    }

    /// The live leases of `feature` at `now_ms`.
    pub fn live(&self, feature: Feature, now_ms: i64) -> u32 {
        self.by_user.get(&feature).map_or(0, |users| {
            users
                .values()
                .flatten()
                .filter(|(_, until)| *until > now_ms)
                .count() as u32
        })
    }

    /// Every lease held (live or not), unordered.
    pub fn iter(&self) -> impl Iterator<Item = &Lease> {
        self.by_id.values()
    }

    /// A lease by id.
    pub fn get(&self, id: &str) -> Option<&Lease> {
        self.by_id.get(id)
    }

    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }

    pub fn clear(&mut self) {
        self.by_id.clear();
        self.by_user.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holders_follow_the_user_id_rules_under_their_own_name() {
        assert_eq!(Holder::parse("pod-1").unwrap().as_str(), "pod-1");
        for bad in ["", "a\nb", &"x".repeat(129)] {
            assert_eq!(Holder::parse(bad).unwrap_err().field, "holder");
        }
    }

    #[test]
    fn lease_ids_are_bounded_printable_and_fresh() {
        let id = new_lease_id();
        assert_eq!(id.len(), 32);
        assert_ne!(id, new_lease_id());
        assert_eq!(parse_lease_id(&id, "lease_id").unwrap(), id);
        for bad in ["", "a b", &"f".repeat(65)] {
            assert_eq!(
                parse_lease_id(bad, "lease_ids").unwrap_err().field,
                "lease_ids"
            );
        }
    }

    #[test]
    fn only_live_expiries_count() {
        assert_eq!(latest_expiry(&[10, 30, 20], 15), Some(30));
        assert_eq!(latest_expiry(&[10, 15], 15), None);
        assert_eq!(latest_expiry(&[], 0), None);
    }

    fn lease(id: &str, user: &str, holder: &str, until_s: i64) -> Lease {
        Lease {
            lease_id: id.into(),
            user_id: UserId::parse(user).unwrap(),
            feature: Feature::User,
            holder: Holder::parse(holder).unwrap(),
            acquired_at: DateTime::from_timestamp(0, 0).unwrap(),
            expires_at: DateTime::from_timestamp(until_s, 0).unwrap(),
        }
    }

    #[test]
    fn the_book_keeps_one_lease_per_holder_and_the_latest_expiry_per_user() {
        let mut book = LeaseBook::default();
        book.put(&lease("a", "alice", "pod-1", 10));
        book.put(&lease("b", "alice", "pod-2", 20));
        assert_eq!(book.until_ms(Feature::User, "alice"), Some(20_000));
        // The same holder again: the new lease replaces its old one.
        book.put(&lease("c", "alice", "pod-2", 15));
        assert_eq!(
            (book.len(), book.until_ms(Feature::User, "alice")),
            (2, Some(15_000))
        );
        book.renew("a", DateTime::from_timestamp(30, 0).unwrap());
        assert_eq!(book.until_ms(Feature::User, "alice"), Some(30_000));
        assert_eq!(book.live(Feature::User, 16_000), 1);
        book.remove("a");
        book.remove("c");
        book.remove("unknown");
        assert!(book.is_empty());
        assert_eq!(book.until_ms(Feature::User, "alice"), None);
        assert_eq!(book.until_ms(Feature::CallAssist, "alice"), None);
    }
}
