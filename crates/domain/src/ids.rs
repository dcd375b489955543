//! Validated identifiers: user ids, features, editions, serial numbers.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// A request field that failed validation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidInput {
    /// The request field at fault, e.g. `user_id`.
    pub field: &'static str,
    pub message: String,
}

impl InvalidInput {
    pub fn new(field: &'static str, message: impl Into<String>) -> Self {
        Self {
            field,
            message: message.into(),
        }
    }
}

impl fmt::Display for InvalidInput {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

impl std::error::Error for InvalidInput {}

/// Longest accepted user id, in bytes.
pub const MAX_USER_ID_BYTES: usize = 128;

/// A user id as call handling and user management send it: 1 to 128 bytes, no
/// control characters (they would break logs and the seat index's separator).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct UserId(String);

impl UserId {
    pub fn parse(raw: &str) -> Result<Self, InvalidInput> {
        Self::check(raw)?;
        Ok(Self(raw.to_owned()))
    }

    /// Whether `raw` is a valid user id, without making one (a replica
    /// reading a million stored ids keeps them in its own compact form).
    pub fn check(raw: &str) -> Result<(), InvalidInput> {
        if raw.is_empty() {
            return Err(InvalidInput::new("user_id", "must not be empty"));
        }
        if raw.len() > MAX_USER_ID_BYTES {
            return Err(InvalidInput::new(
                "user_id",
                format!(
                    "must be at most {MAX_USER_ID_BYTES} bytes, got {}",
                    raw.len()
                ),
            ));
        }
        if raw.chars().any(char::is_control) {
            return Err(InvalidInput::new(
                "user_id",
                "must not contain control characters",
            ));
        }
        Ok(())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for UserId {
    type Error = InvalidInput;
    fn try_from(value: String) -> Result<Self, Self::Error> {
        Self::parse(&value)
    }
}

impl From<UserId> for String {
    fn from(value: UserId) -> Self {
        value.0
    }
}

impl fmt::Display for UserId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// What an entitlement or a seat is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Feature {
    /// PBX Call Assist 4, a per-user add-on.
    CallAssist,
    /// System activation (Business/Advanced); quantity 1, never a seat.
    SystemActivation,
    /// A floating user license.
    User,
}

impl Feature {
    /// Every feature, in the order of their names (the seat index's order).
    pub const ALL: [Feature; 3] = [
        Feature::CallAssist,
        Feature::SystemActivation,
        Feature::User,
    ];
    /// The features a user can hold a seat of.
    pub const SEATS: [Feature; 2] = [Feature::CallAssist, Feature::User];

    pub fn as_str(self) -> &'static str {
        match self {
            Feature::CallAssist => "call_assist",
            Feature::SystemActivation => "system_activation",
            Feature::User => "user",
        }
    }

    /// Whether a user can hold a seat of this feature.
    pub fn is_seat(self) -> bool {
        self != Feature::SystemActivation
    }

    /// Parses a feature as given in a request: empty means `user`.
    pub fn parse_or_user(raw: &str) -> Result<Self, InvalidInput> {
        if raw.is_empty() {
            Ok(Feature::User)
        } else {
            raw.parse()
        }
    }

    /// Parses a feature that a user can hold a seat of (empty means `user`).
    pub fn parse_seat(raw: &str) -> Result<Self, InvalidInput> {
        let feature = Self::parse_or_user(raw)?;
        if !feature.is_seat() {
            return Err(InvalidInput::new(
                "feature",
                format!("{feature} is not a seat feature (use one of: call_assist, user)"),
            ));
        }
        Ok(feature)
    }
}

impl FromStr for Feature {
    type Err = InvalidInput;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Feature::ALL
            .into_iter()
            .find(|f| f.as_str() == s)
            .ok_or_else(|| {
                // A known feature written in another case or with '-': name it.
                let near = s.trim().to_ascii_lowercase().replace('-', "_");
                let hint = Feature::ALL
                    .into_iter()
                    .find(|f| f.as_str() == near)
                    .map(|f| format!("; did you mean {:?}?", f.as_str()))
                    .unwrap_or_default();
                InvalidInput::new(
                    "feature",
                    format!(
                        "unknown feature {s:?}{hint} (known: call_assist, system_activation, user)"
                    ),
                )
            })
    }
}

impl fmt::Display for Feature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The COMtrexx edition of this PBX.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Edition {
    Vm,
    Business,
    Advanced,
}

impl Edition {
    pub fn as_str(self) -> &'static str {
        match self {
            Edition::Vm => "vm",
            Edition::Business => "business",
            Edition::Advanced => "advanced",
        }
    }

    /// Business and Advanced need a `system_activation` entitlement; VM does not.
    pub fn needs_system_activation(self) -> bool {
        self != Edition::Vm
    }

    /// Only the VM edition has a tryout.
    pub fn has_tryout(self) -> bool {
        self == Edition::Vm
    }
}

impl FromStr for Edition {
    type Err = InvalidInput;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "vm" => Ok(Edition::Vm),
            "business" => Ok(Edition::Business),
            "advanced" => Ok(Edition::Advanced),
            _ => Err(InvalidInput::new(
                "edition",
                format!("unknown edition {s:?} (known: vm, business, advanced)"),
            )),
        }
    }
}

impl fmt::Display for Edition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The PBX's serial number: every license, seat and tryout record belongs to one.
/// Letters, digits, `-` and `_` only, because it is part of every Redis key (inside
/// the `{…}` hash tag).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct SerialNumber(String);

impl SerialNumber {
    pub fn parse(raw: &str) -> Result<Self, InvalidInput> {
        if raw.is_empty() || raw.len() > 64 {
            return Err(InvalidInput::new(
                "serial_number",
                "must be 1 to 64 characters",
            ));
        }
        if !raw
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err(InvalidInput::new(
                "serial_number",
                "may contain only letters, digits, '-' and '_'",
            ));
        }
        Ok(Self(raw.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for SerialNumber {
    type Error = InvalidInput;
    fn try_from(value: String) -> Result<Self, Self::Error> {
        Self::parse(&value)
    }
}

impl From<SerialNumber> for String {
    fn from(value: SerialNumber) -> Self {
        value.0
    }
}

impl fmt::Display for SerialNumber {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_feature_in_another_case_is_named() {
        let e = "User".parse::<Feature>().unwrap_err();
        assert_eq!(e.field, "feature");
        assert!(
            e.message.contains(r#"did you mean "user"?"#),
            "{}",
            e.message
        );
        let e = "call-assist".parse::<Feature>().unwrap_err();
        assert!(
            e.message.contains(r#"did you mean "call_assist"?"#),
            "{}",
            e.message
        );
        let e = "seats".parse::<Feature>().unwrap_err();
        assert!(!e.message.contains("did you mean"), "{}", e.message);
        assert!(e.message.contains("known: call_assist"), "{}", e.message);
    }

    #[test]
    fn user_id_edges() {
        assert_eq!(UserId::parse("").unwrap_err().field, "user_id");
        assert!(UserId::parse("a").is_ok());
        assert!(UserId::parse(&"x".repeat(128)).is_ok());
        assert!(UserId::parse(&"x".repeat(129)).is_err());
        // 64 two-byte characters are 128 bytes: accepted; one more is not.
        assert!(UserId::parse(&"ä".repeat(64)).is_ok());
        assert!(UserId::parse(&"ä".repeat(65)).is_err());
        assert!(UserId::parse("bob\n").is_err());
        assert!(UserId::parse("a\u{0}b").is_err());
        assert!(UserId::parse("a\u{7f}").is_err());
        assert!(UserId::parse("anna.müller@example.com").is_ok());
    }

    #[test]
    fn features_parse() {
        assert_eq!(Feature::parse_or_user("").unwrap(), Feature::User);
        assert_eq!(
            Feature::parse_or_user("call_assist").unwrap(),
            Feature::CallAssist
        );
        let err = Feature::parse_or_user("fax").unwrap_err();
        assert_eq!(err.field, "feature");
        assert_eq!(
            Feature::parse_seat("system_activation").unwrap_err().field,
            "feature"
        );
        assert_eq!(Feature::parse_seat("").unwrap(), Feature::User);
        // ALL is sorted by name: the seat index relies on it.
        let mut names: Vec<_> = Feature::ALL.iter().map(|f| f.as_str()).collect();
        names.sort();
        assert_eq!(
            names,
            Feature::ALL.iter().map(|f| f.as_str()).collect::<Vec<_>>()
        );
    }

    #[test]
    fn serial_and_edition() {
        assert!(SerialNumber::parse("AB-1234_x").is_ok());
        assert!(SerialNumber::parse("").is_err());
        assert!(SerialNumber::parse("a{b}").is_err());
        assert!(SerialNumber::parse(&"1".repeat(65)).is_err());
        assert_eq!("Business".parse::<Edition>().unwrap(), Edition::Business);
        assert!("pro".parse::<Edition>().is_err());
        assert!(Edition::Vm.has_tryout() && !Edition::Advanced.has_tryout());
    }
}
