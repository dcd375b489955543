//! The licensing server's signed answer to a tryout start (`comtrexx-tryout/v1`).
//!
//! The licensing server's record of a tryout is authoritative (once per serial,
//! ever), so its answer decides when a tryout starts and ends. Like a license
//! document it is trusted only after its Ed25519 signature verifies with the
//! vendor key over the exact payload bytes, and then only when it answers this
//! request (serial number and the request's nonce: no replayed answer) with times
//! that make sense at the service's reference time: a start not ahead of it (beyond
//! a small tolerance), not absurdly far back, and a length of at most
//! [`MAX_TRYOUT_DAYS`]. Every time is checked before anything is added to it, so no
//! answer can reach a date overflow.

use chrono::{DateTime, Duration, Utc};
use ed25519_dalek::{SigningKey, VerifyingKey};
use rand::RngCore as _;
use serde::{Deserialize, Serialize};

use super::ids::SerialNumber;
use super::license::{LicenseRejection, sign_json, verified_bytes};
use super::tryout::{TryoutPolicy, TryoutRecord};

/// The `format` tag of a signed tryout answer.
pub const TRYOUT_FORMAT: &str = "comtrexx-tryout/v1";

/// How far a signed start may lie ahead of the service's time: two machines'
/// clocks differ a little, a start days ahead would be a tryout that ends late.
pub const START_TOLERANCE_SECS: i64 = 300;

/// How far back a signed start may lie (10 years): no PBX's tryout is older,
/// and a time beyond is a broken or forged answer.
pub const MAX_START_AGE_DAYS: i64 = 3650;

/// The longest tryout an answer may grant: the largest `tryout.days`.
pub const MAX_TRYOUT_DAYS: i64 = 365;

/// Random bytes of a request's nonce (hex in the request).
const NONCE_BYTES: usize = 16;

/// The signed content: what the licensing server holds about the serial's tryout,
/// for the request carrying `nonce`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TryoutPayload {
    pub serial_number: String,
    /// The nonce of the request this answers.
    pub nonce: String,
    /// The start the licensing server holds: this request's or an earlier one.
    pub started_at: DateTime<Utc>,
    /// When the tryout it granted ends.
    pub ends_at: DateTime<Utc>,
    /// Whether this request recorded the start (`false`: the serial used it before).
    pub recorded: bool,
}

/// The answer as it travels: the payload's exact bytes (base64) and the signature.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignedTryout {
    pub format: String,
    pub payload: String,
    pub signature: String,
}

/// Why a tryout answer is not trusted. Conclusive: asking again with the same
/// server and key does not help, and nothing starts.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TryoutRejection {
    #[error(
        "the answer carries no signed tryout record (a licensing server that does not sign tryout answers)"
    )]
    Unsigned,
    #[error("malformed tryout answer: {0}")]
    Malformed(String),
    #[error("tryout answer signature does not verify with the configured vendor public key")]
    BadSignature,
    #[error("tryout answer is for serial number {found:?}, this PBX is {expected:?}")]
    WrongSerial { expected: String, found: String },
    #[error("tryout answer was signed for another request (nonce mismatch: a replayed answer)")]
    WrongNonce,
    #[error("tryout answer starts at {started_at}, ahead of this PBX's time {now}")]
    StartInFuture {
        started_at: DateTime<Utc>,
        now: DateTime<Utc>,
    },
    #[error(
        "tryout answer starts at {started_at}, more than {MAX_START_AGE_DAYS} days before this PBX's time {now}"
    )]
    StartTooOld {
        started_at: DateTime<Utc>,
        now: DateTime<Utc>,
    },
    #[error(
        "tryout answer ends at {ends_at} for a start at {started_at}: a tryout lasts more than 0 and at most {MAX_TRYOUT_DAYS} days"
    )]
    BadLength {
        started_at: DateTime<Utc>,
        ends_at: DateTime<Utc>,
    },
}

impl From<LicenseRejection> for TryoutRejection {
    fn from(e: LicenseRejection) -> Self {
        match e {
            LicenseRejection::BadSignature => Self::BadSignature,
            other => Self::Malformed(other.to_string()),
        }
    }
}

/// What the service asked: the answer is checked against it.
#[derive(Debug, Clone, Copy)]
pub struct TryoutQuestion<'a> {
    pub serial: &'a SerialNumber,
    /// The nonce the request carried.
    pub nonce: &'a str,
    /// The service's reference time (never behind its high-water clock).
    pub now: DateTime<Utc>,
    /// The local tryout length, which can only shorten what the answer grants.
    pub policy: TryoutPolicy,
}

/// A verified answer: the tryout to keep, and whether this request recorded it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VendorTryout {
    pub started_at: DateTime<Utc>,
    /// The answer's end, or the local policy's when that is sooner.
    pub ends_at: DateTime<Utc>,
    pub recorded: bool,
}

impl VendorTryout {
    /// The tryout record the store keeps.
    pub fn record(&self) -> TryoutRecord {
        TryoutRecord::Started {
            started_at: self.started_at,
            ends_at: self.ends_at,
            ended: None,
        }
    }
}

/// A fresh nonce for one `StartTryout` request (lower-case hex).
pub fn new_nonce() -> String {
    let mut bytes = [0u8; NONCE_BYTES];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    super::initcode::hex(&bytes)
}

impl SignedTryout {
    /// Parses the JSON form (the `signed_tryout` field of the answer).
    pub fn from_json(text: &str) -> Result<Self, TryoutRejection> {
        if text.trim().is_empty() {
            return Err(TryoutRejection::Unsigned);
        }
        let signed: SignedTryout = serde_json::from_str(text)
            .map_err(|e| TryoutRejection::Malformed(format!("not a signed tryout answer: {e}")))?;
        if signed.format != TRYOUT_FORMAT {
            return Err(TryoutRejection::Malformed(format!(
                "unknown format {:?}, expected {TRYOUT_FORMAT:?}",
                signed.format
            )));
        }
        Ok(signed)
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("a signed tryout answer always serializes")
    }

    /// Signs a payload (the simulator and tests; the real vendor signs on its side).
    pub fn sign(payload: &TryoutPayload, key: &SigningKey) -> Self {
        let (payload, signature) = sign_json(payload, key);
        Self {
            format: TRYOUT_FORMAT.to_owned(),
            payload,
            signature,
        }
    }

    /// Verifies the signature, then that the answer is for this serial and this
    /// request, then its times; returns the record to keep only when all hold.
    pub fn verify(
        &self,
        key: &VerifyingKey,
        question: &TryoutQuestion<'_>,
    ) -> Result<VendorTryout, TryoutRejection> {
        let bytes = verified_bytes(key, &self.payload, &self.signature)?;
        let payload: TryoutPayload = serde_json::from_slice(&bytes)
            .map_err(|e| TryoutRejection::Malformed(format!("payload: {e}")))?;
        if payload.serial_number != question.serial.as_str() {
            return Err(TryoutRejection::WrongSerial {
                expected: question.serial.as_str().to_owned(),
                found: payload.serial_number,
            });
        }
        if payload.nonce != question.nonce {
            return Err(TryoutRejection::WrongNonce);
        }
        let ends_at = checked_end(&payload, question.now, question.policy)?;
        Ok(VendorTryout {
            started_at: payload.started_at,
            ends_at,
            recorded: payload.recorded,
        })
    }
}

/// The bounds on the answer's times, and the end they give: the answer's, or
/// the local policy's when that is sooner. Subtractions of two represented times
/// cannot overflow; every addition is checked.
fn checked_end(
    payload: &TryoutPayload,
    now: DateTime<Utc>,
    policy: TryoutPolicy,
) -> Result<DateTime<Utc>, TryoutRejection> {
    let (started_at, ends_at) = (payload.started_at, payload.ends_at);
    if (started_at - now).num_seconds() > START_TOLERANCE_SECS {
        return Err(TryoutRejection::StartInFuture { started_at, now });
    }
    if (now - started_at).num_days() > MAX_START_AGE_DAYS {
        return Err(TryoutRejection::StartTooOld { started_at, now });
    }
    let length = ends_at - started_at;
    if length <= Duration::zero() || length > Duration::days(MAX_TRYOUT_DAYS) {
        return Err(TryoutRejection::BadLength {
            started_at,
            ends_at,
        });
    }
    // A local end beyond the representable range is later than the answer's.
    Ok(started_at
        .checked_add_signed(Duration::days(i64::from(policy.days)))
        .map_or(ends_at, |local_end| ends_at.min(local_end)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::license::testing::key;

    fn t(s: &str) -> DateTime<Utc> {
        s.parse().unwrap()
    }

    fn serial() -> SerialNumber {
        SerialNumber::parse("S1").unwrap()
    }

    fn payload(started_at: DateTime<Utc>) -> TryoutPayload {
        TryoutPayload {
            serial_number: "S1".into(),
            nonce: "n1".into(),
            started_at,
            ends_at: started_at
                .checked_add_signed(Duration::days(14))
                .unwrap_or(DateTime::<Utc>::MAX_UTC),
            recorded: true,
        }
    }

    fn verify(signed: &SignedTryout, now: &str) -> Result<VendorTryout, TryoutRejection> {
        verify_at(signed, t(now))
    }

    fn verify_at(
        signed: &SignedTryout,
        now: DateTime<Utc>,
    ) -> Result<VendorTryout, TryoutRejection> {
        let serial = serial();
        signed.verify(
            &key(1).verifying_key(),
            &TryoutQuestion {
                serial: &serial,
                nonce: "n1",
                now,
                policy: TryoutPolicy::default(),
            },
        )
    }

    #[test]
    fn a_signed_answer_gives_the_record() {
        let start = t("2026-03-01T10:00:00Z");
        let signed = SignedTryout::sign(&payload(start), &key(1));
        let back = SignedTryout::from_json(&signed.to_json()).unwrap();
        let got = verify(&back, "2026-03-01T10:00:01Z").unwrap();
        assert_eq!(
            got,
            VendorTryout {
                started_at: start,
                ends_at: start + Duration::days(14),
                recorded: true,
            }
        );
        assert_eq!(
            got.record(),
            TryoutRecord::Started {
                started_at: start,
                ends_at: start + Duration::days(14),
                ended: None,
            }
        );
    }

    #[test]
    fn another_key_a_tampered_payload_or_no_signature_is_refused() {
        let start = t("2026-03-01T10:00:00Z");
        let now = "2026-03-01T10:00:00Z";
        let foreign = SignedTryout::sign(&payload(start), &key(2));
        assert_eq!(verify(&foreign, now), Err(TryoutRejection::BadSignature));
        let mut tampered = SignedTryout::sign(&payload(start), &key(1));
        tampered.payload = SignedTryout::sign(&payload(t("2100-01-01T00:00:00Z")), &key(1)).payload;
        assert_eq!(verify(&tampered, now), Err(TryoutRejection::BadSignature));
        assert_eq!(SignedTryout::from_json(""), Err(TryoutRejection::Unsigned));
        assert!(matches!(
            SignedTryout::from_json(
                r#"{"format":"comtrexx-license/v1","payload":"","signature":""}"#
            ),
            Err(TryoutRejection::Malformed(_))
        ));
        let mut garbled = SignedTryout::sign(&payload(start), &key(1));
        garbled.signature = "!!".into();
        assert!(matches!(
            verify(&garbled, now),
            Err(TryoutRejection::Malformed(_))
        ));
    }

    #[test]
    fn an_answer_for_another_serial_or_request_is_refused() {
        let start = t("2026-03-01T10:00:00Z");
        let mut other = payload(start);
        other.serial_number = "S2".into();
        assert!(matches!(
            verify(&SignedTryout::sign(&other, &key(1)), "2026-03-01T10:00:00Z"),
            Err(TryoutRejection::WrongSerial { .. })
        ));
        let mut replayed = payload(start);
        replayed.nonce = "an earlier request".into();
        assert_eq!(
            verify(
                &SignedTryout::sign(&replayed, &key(1)),
                "2026-03-01T10:00:00Z"
            ),
            Err(TryoutRejection::WrongNonce)
        );
    }

    #[test]
    fn times_are_bounded_without_overflow() {
        let now = "2026-03-01T10:00:00Z";
        let ok = |start: DateTime<Utc>| verify(&SignedTryout::sign(&payload(start), &key(1)), now);
        // Within the tolerance ahead, and years back (a tryout used long ago).
        assert!(ok(t(now) + Duration::seconds(START_TOLERANCE_SECS)).is_ok());
        assert!(ok(t("2019-01-01T00:00:00Z")).is_ok());
        assert!(matches!(
            ok(t(now) + Duration::seconds(START_TOLERANCE_SECS + 1)),
            Err(TryoutRejection::StartInFuture { .. })
        ));
        assert!(matches!(
            ok(t("2100-01-01T00:00:00Z")),
            Err(TryoutRejection::StartInFuture { .. })
        ));
        assert!(matches!(
            ok(t("2010-01-01T00:00:00Z")),
            Err(TryoutRejection::StartTooOld { .. })
        ));
        // The ends of the representable range: refused, no panic.
        let mut at_max = payload(t(now));
        (at_max.started_at, at_max.ends_at) = (DateTime::<Utc>::MAX_UTC, DateTime::<Utc>::MAX_UTC);
        assert!(matches!(
            verify(&SignedTryout::sign(&at_max, &key(1)), now),
            Err(TryoutRejection::StartInFuture { .. })
        ));
        let mut at_min = payload(t(now));
        (at_min.started_at, at_min.ends_at) = (DateTime::<Utc>::MIN_UTC, DateTime::<Utc>::MAX_UTC);
        assert!(matches!(
            verify(&SignedTryout::sign(&at_min, &key(1)), now),
            Err(TryoutRejection::StartTooOld { .. })
        ));
        // A reference time at the end of the range (a broken clock): still no panic.
        let at_max_now = verify_at(
            &SignedTryout::sign(&payload(t(now)), &key(1)),
            DateTime::<Utc>::MAX_UTC,
        );
        assert!(
            matches!(at_max_now, Err(TryoutRejection::StartTooOld { .. })),
            "{at_max_now:?}"
        );
        let near_max = DateTime::<Utc>::MAX_UTC - Duration::days(1);
        let mut late = payload(near_max);
        late.ends_at = DateTime::<Utc>::MAX_UTC;
        let kept = verify_at(&SignedTryout::sign(&late, &key(1)), near_max).unwrap();
        assert_eq!(
            (kept.started_at, kept.ends_at),
            (near_max, DateTime::<Utc>::MAX_UTC)
        );
    }

    #[test]
    fn the_length_is_bounded_and_the_policy_only_shortens_it() {
        let start = t("2026-03-01T10:00:00Z");
        let now = "2026-03-01T10:00:00Z";
        for ends_at in [
            start,
            start - Duration::days(1),
            start + Duration::days(366),
        ] {
            let p = TryoutPayload {
                ends_at,
                ..payload(start)
            };
            assert!(
                matches!(
                    verify(&SignedTryout::sign(&p, &key(1)), now),
                    Err(TryoutRejection::BadLength { .. })
                ),
                "{ends_at}"
            );
        }
        let long = TryoutPayload {
            ends_at: start + Duration::days(30),
            ..payload(start)
        };
        let got = verify(&SignedTryout::sign(&long, &key(1)), now).unwrap();
        assert_eq!(got.ends_at, start + Duration::days(14));
        let short = TryoutPayload {
            ends_at: start + Duration::days(7),
            ..payload(start)
        };
        let got = verify(&SignedTryout::sign(&short, &key(1)), now).unwrap();
        assert_eq!(got.ends_at, start + Duration::days(7));
    }

    #[test]
    fn nonces_are_fresh() {
        let (a, b) = (new_nonce(), new_nonce());
        assert_eq!(a.len(), 2 * NONCE_BYTES);
        assert_ne!(a, b);
    }
}
