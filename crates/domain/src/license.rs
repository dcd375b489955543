//! Signed license documents: what the vendor's licensing server (or a license
//! file) says this PBX has purchased. A document is trusted only after its Ed25519
//! signature verifies over the exact payload bytes and its serial number is ours.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use chrono::{DateTime, Utc};
use ed25519_dalek::{Signature, Signer as _, SigningKey, Verifier as _, VerifyingKey};
use serde::{Deserialize, Serialize};

use super::ids::{Edition, Feature, SerialNumber};

/// The `format` tag of a signed license document.
pub const LICENSE_FORMAT: &str = "comtrexx-license/v1";

/// How the seats of a feature are held: the vendor's choice per entitlement.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SeatModel {
    /// A seat is held from `AssignSeat` to `ReleaseSeat` (every document
    /// without `seat_model` means this).
    #[default]
    Assigned,
    /// Any number of users may be set up; only the quantity may use the
    /// feature at the same time, each use held by a lease its holder renews.
    Concurrent,
}

impl SeatModel {
    pub fn as_str(self) -> &'static str {
        match self {
            SeatModel::Assigned => "assigned",
            SeatModel::Concurrent => "concurrent",
        }
    }

    pub fn is_assigned(&self) -> bool {
        *self == SeatModel::Assigned
    }
}

impl std::fmt::Display for SeatModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for SeatModel {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "assigned" => Ok(SeatModel::Assigned),
            "concurrent" => Ok(SeatModel::Concurrent),
            other => Err(format!(
                "unknown seat model {other:?} (use assigned or concurrent)"
            )),
        }
    }
}

/// A feature with a purchased quantity, as signed by the licensing server.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entitlement {
    pub feature: Feature,
    pub quantity: u32,
    /// `None` when the entitlement does not expire.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<DateTime<Utc>>,
    /// Absent in a document means assigned, so every existing document keeps
    /// its meaning (and its signed bytes).
    #[serde(default, skip_serializing_if = "SeatModel::is_assigned")]
    pub seat_model: SeatModel,
}

impl Entitlement {
    /// Whether the entitlement still holds at `now`.
    pub fn is_current(&self, now: DateTime<Utc>) -> bool {
        self.expires_at.is_none_or(|end| now < end)
    }
}

/// The signed content of a license document.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LicensePayload {
    pub serial_number: String,
    pub edition: Edition,
    pub issued_at: DateTime<Utc>,
    pub entitlements: Vec<Entitlement>,
    /// The initialization nonce this document answers, when it is an activation
    /// response; `None` for a plain license file or a reconcile answer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nonce: Option<String>,
}

impl LicensePayload {
    /// The entitlement of one feature, if the document grants it.
    pub fn entitlement(&self, feature: Feature) -> Option<&Entitlement> {
        self.entitlements.iter().find(|e| e.feature == feature)
    }

    /// How the seats of `feature` are held (assigned when not granted).
    pub fn seat_model(&self, feature: Feature) -> SeatModel {
        self.entitlement(feature)
            .map_or(SeatModel::Assigned, |e| e.seat_model)
    }
}

/// A document as it travels and is stored: the payload's exact bytes (base64) and
/// the signature over them. Storing this, not the parsed payload, means whatever
/// reads it back (another replica, a restart) verifies it again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignedLicense {
    pub format: String,
    pub payload: String,
    pub signature: String,
}

/// Why a document is not trusted. Conclusive: retrying the same document never helps.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LicenseRejection {
    #[error("malformed license document: {0}")]
    Malformed(String),
    #[error("license signature does not verify with the configured vendor public key")]
    BadSignature,
    #[error("license is for serial number {found:?}, this PBX is {expected:?}")]
    WrongSerial { expected: String, found: String },
    #[error("license is for edition {found}, this PBX is {expected}")]
    WrongEdition { expected: Edition, found: Edition },
}

impl SignedLicense {
    /// Parses the JSON form of a signed document (a license file's content).
    pub fn from_json(text: &str) -> Result<Self, LicenseRejection> {
        let signed: SignedLicense = serde_json::from_str(text)
            .map_err(|e| LicenseRejection::Malformed(format!("not a signed license: {e}")))?;
        if signed.format != LICENSE_FORMAT {
            return Err(LicenseRejection::Malformed(format!(
                "unknown format {:?}, expected {LICENSE_FORMAT:?}",
                signed.format
            )));
        }
        Ok(signed)
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("a signed license always serializes")
    }

    /// Signs a payload. Used by the development licensing tools and tests; the real
    /// vendor signs on its side.
    pub fn sign(payload: &LicensePayload, key: &SigningKey) -> Self {
        let (payload, signature) = sign_json(payload, key);
        Self {
            format: LICENSE_FORMAT.to_owned(),
            payload,
            signature,
        }
    }

    /// Verifies the signature, then the serial number and edition, and returns
    /// the payload only when all hold.
    pub fn verify(
        &self,
        key: &VerifyingKey,
        serial: &SerialNumber,
        edition: Edition,
    ) -> Result<LicensePayload, LicenseRejection> {
        let bytes = verified_bytes(key, &self.payload, &self.signature)?;
        let payload: LicensePayload = serde_json::from_slice(&bytes)
            .map_err(|e| LicenseRejection::Malformed(format!("payload: {e}")))?;
        if payload.serial_number != serial.as_str() {
            return Err(LicenseRejection::WrongSerial {
                expected: serial.as_str().to_owned(),
                found: payload.serial_number,
            });
        }
        if payload.edition != edition {
            return Err(LicenseRejection::WrongEdition {
                expected: edition,
                found: payload.edition,
            });
        }
        for (i, e) in payload.entitlements.iter().enumerate() {
            if payload.entitlements[..i]
                .iter()
                .any(|o| o.feature == e.feature)
            {
                return Err(LicenseRejection::Malformed(format!(
                    "feature {} appears twice",
                    e.feature
                )));
            }
        }
        Ok(payload)
    }
}

/// The base64 of a payload's JSON bytes and of the Ed25519 signature over them:
/// the two signed fields of every document the vendor signs.
pub(crate) fn sign_json(payload: &impl Serialize, key: &SigningKey) -> (String, String) {
    let bytes = serde_json::to_vec(payload).expect("a payload always serializes");
    let signature = key.sign(&bytes);
    (B64.encode(&bytes), B64.encode(signature.to_bytes()))
}

/// The payload bytes of a signed document, only once its signature verifies over
/// them with `key` (checked before the payload is parsed: re-serializing would
/// change the bytes).
pub(crate) fn verified_bytes(
    key: &VerifyingKey,
    payload: &str,
    signature: &str,
) -> Result<Vec<u8>, LicenseRejection> {
    let bytes = B64
        .decode(payload)
        .map_err(|e| LicenseRejection::Malformed(format!("payload is not base64: {e}")))?;
    let sig_bytes = B64
        .decode(signature)
        .map_err(|e| LicenseRejection::Malformed(format!("signature is not base64: {e}")))?;
    let signature =
        Signature::from_slice(&sig_bytes).map_err(|_| LicenseRejection::BadSignature)?;
    key.verify(&bytes, &signature)
        .map_err(|_| LicenseRejection::BadSignature)?;
    Ok(bytes)
}

/// Decodes a base64 Ed25519 public key (32 bytes), as configured in `vendor_public_key`.
pub fn parse_public_key(b64: &str) -> Result<VerifyingKey, String> {
    VerifyingKey::from_bytes(&key_bytes(b64)?)
        .map_err(|e| format!("not an Ed25519 public key: {e}"))
}

/// Decodes a base64 Ed25519 secret key (32 bytes).
pub fn parse_signing_key(b64: &str) -> Result<SigningKey, String> {
    Ok(SigningKey::from_bytes(&key_bytes(b64)?))
}

/// The 32 bytes of a base64 Ed25519 key.
fn key_bytes(b64: &str) -> Result<[u8; 32], String> {
    let bytes = B64
        .decode(b64.trim())
        .map_err(|e| format!("not base64: {e}"))?;
    bytes
        .try_into()
        .map_err(|b: Vec<u8>| format!("must be 32 bytes, got {}", b.len()))
}

/// Encodes a public key the way `vendor_public_key` expects it.
pub fn encode_public_key(key: &VerifyingKey) -> String {
    B64.encode(key.as_bytes())
}

/// Encodes a secret key the way `parse_signing_key` reads it.
pub fn encode_signing_key(key: &SigningKey) -> String {
    B64.encode(key.to_bytes())
}

/// Keys and payloads for tests (of this crate, and of crates that enable the
/// `testing` feature as a dev-dependency).
#[cfg(any(test, feature = "testing"))]
pub mod testing {
    use super::*;

    /// A deterministic signing key.
    pub fn key(seed: u8) -> SigningKey {
        SigningKey::from_bytes(&[seed; 32])
    }

    /// A VM license for `serial` with `users` user seats, issued 2026-01-01.
    pub fn payload(serial: &str, users: u32) -> LicensePayload {
        LicensePayload {
            serial_number: serial.to_owned(),
            edition: Edition::Vm,
            issued_at: "2026-01-01T00:00:00Z".parse().unwrap(),
            entitlements: vec![Entitlement {
                seat_model: Default::default(),
                feature: Feature::User,
                quantity: users,
                expires_at: None,
            }],
            nonce: None,
        }
    }
}

/// A license document that verified, with when it was applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppliedLicense {
    pub signed: SignedLicense,
    pub payload: LicensePayload,
    pub applied_at: DateTime<Utc>,
}

impl AppliedLicense {
    /// Identifies the document: its signature is unique to its exact bytes.
    pub fn id(&self) -> &str {
        &self.signed.signature
    }
}

#[cfg(test)]
mod tests {
    use super::testing::{key, payload};
    use super::*;

    fn serial(s: &str) -> SerialNumber {
        SerialNumber::parse(s).unwrap()
    }

    #[test]
    fn sign_then_verify_round_trips() {
        let k = key(1);
        let signed = SignedLicense::sign(&payload("S1", 5), &k);
        let back = SignedLicense::from_json(&signed.to_json()).unwrap();
        let p = back
            .verify(&k.verifying_key(), &serial("S1"), Edition::Vm)
            .unwrap();
        assert_eq!(p.entitlement(Feature::User).unwrap().quantity, 5);
    }

    #[test]
    fn other_key_is_rejected() {
        let signed = SignedLicense::sign(&payload("S1", 5), &key(1));
        let err = signed
            .verify(&key(2).verifying_key(), &serial("S1"), Edition::Vm)
            .unwrap_err();
        assert_eq!(err, LicenseRejection::BadSignature);
    }

    #[test]
    fn tampered_payload_is_rejected() {
        let k = key(1);
        let mut signed = SignedLicense::sign(&payload("S1", 5), &k);
        let forged = serde_json::to_vec(&payload("S1", 500)).unwrap();
        signed.payload = B64.encode(forged);
        assert_eq!(
            signed
                .verify(&k.verifying_key(), &serial("S1"), Edition::Vm)
                .unwrap_err(),
            LicenseRejection::BadSignature
        );
    }

    #[test]
    fn foreign_serial_and_edition_are_rejected() {
        let k = key(1);
        let signed = SignedLicense::sign(&payload("S1", 5), &k);
        assert!(matches!(
            signed.verify(&k.verifying_key(), &serial("S2"), Edition::Vm),
            Err(LicenseRejection::WrongSerial { .. })
        ));
        assert!(matches!(
            signed.verify(&k.verifying_key(), &serial("S1"), Edition::Business),
            Err(LicenseRejection::WrongEdition { .. })
        ));
    }

    #[test]
    fn malformed_documents_are_rejected() {
        assert!(matches!(
            SignedLicense::from_json("{}"),
            Err(LicenseRejection::Malformed(_))
        ));
        let k = key(1);
        let mut p = payload("S1", 5);
        p.entitlements.push(p.entitlements[0].clone());
        let signed = SignedLicense::sign(&p, &k);
        assert!(matches!(
            signed.verify(&k.verifying_key(), &serial("S1"), Edition::Vm),
            Err(LicenseRejection::Malformed(_))
        ));
        let mut bad = SignedLicense::sign(&payload("S1", 5), &k);
        bad.signature = "!!".into();
        assert!(matches!(
            bad.verify(&k.verifying_key(), &serial("S1"), Edition::Vm),
            Err(LicenseRejection::Malformed(_))
        ));
    }

    #[test]
    fn keys_round_trip_through_base64() {
        let k = key(7);
        let public = parse_public_key(&encode_public_key(&k.verifying_key())).unwrap();
        assert_eq!(public, k.verifying_key());
        let secret = parse_signing_key(&encode_signing_key(&k)).unwrap();
        assert_eq!(secret.to_bytes(), k.to_bytes());
        assert!(parse_public_key("AAAA").is_err());
    }

    #[test]
    fn expiry() {
        let e = Entitlement {
            seat_model: Default::default(),
            feature: Feature::User,
            quantity: 1,
            expires_at: Some("2026-06-01T00:00:00Z".parse().unwrap()),
        };
        assert!(e.is_current("2026-05-31T23:59:59Z".parse().unwrap()));
        assert!(!e.is_current("2026-06-01T00:00:00Z".parse().unwrap()));
    }
}
