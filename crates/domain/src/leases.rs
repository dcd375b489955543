//! Concurrent-use seats: a lease is one use of a concurrent feature by a user,
//! held by one holder (the calling instance, e.g. a call-handling pod) that
//! renews it; a lease not renewed within the lease length is free again.
//!
//! A lease is identified by what the holder already knows: (user, feature,
//! holder) within the PBX's serial number. A retried or reconnecting acquire
//! by the same holder therefore gets the same lease back, renewed, and never a
//! second seat. Its `lease_id` is the handle renewals and releases name.

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
}
