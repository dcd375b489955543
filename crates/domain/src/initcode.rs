//! The initialization code: what the PBX shows the operator to paste into the
//! vendor portal. It carries the serial number, the edition and a fresh nonce,
//! protected by a checksum against typos, as grouped base32 a person can copy:
//!
//! ```text
//! CTX1-AEBAG-BAFAY-DQOBZ-...
//! ```
//!
//! Layout before encoding: format byte (1), edition byte, nonce (10 bytes),
//! serial length (1), serial (ASCII), CRC-32 of all of that (4 bytes, big endian).

use data_encoding::BASE32_NOPAD;
use rand::RngCore as _;

use super::error::InvalidInput;
use super::ids::{Edition, SerialNumber};

/// The prefix every code starts with (format 1).
pub const PREFIX: &str = "CTX1";
const FORMAT: u8 = 1;
const NONCE_BYTES: usize = 10;
const GROUP: usize = 5;

/// What an initialization code says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InitializationCode {
    pub serial: SerialNumber,
    pub edition: Edition,
    /// Lower-case hex of the random nonce; an activation response must echo it.
    pub nonce: String,
}

impl InitializationCode {
    /// A new code with a fresh random nonce.
    pub fn new(serial: SerialNumber, edition: Edition) -> Self {
        let mut nonce = [0u8; NONCE_BYTES];
        rand::rngs::OsRng.fill_bytes(&mut nonce);
        Self {
            serial,
            edition,
            nonce: hex(&nonce),
        }
    }

    /// The grouped base32 text (e.g. `CTX1-ABCDE-FGHIJ-...`).
    pub fn encode(&self) -> String {
        let serial = self.serial.as_str().as_bytes();
        let mut bytes = vec![FORMAT, edition_byte(self.edition)];
        bytes.extend(unhex(&self.nonce).unwrap_or_default());
        bytes.push(u8::try_from(serial.len()).unwrap_or(u8::MAX));
        bytes.extend_from_slice(serial);
        bytes.extend_from_slice(&crc32fast::hash(&bytes).to_be_bytes());
        let text = BASE32_NOPAD.encode(&bytes);
        let groups: Vec<&str> = text
            .as_bytes()
            .chunks(GROUP)
            .map(|c| std::str::from_utf8(c).expect("base32 is ASCII"))
            .collect();
        format!("{PREFIX}-{}", groups.join("-"))
    }

    /// Reads a code as a person may have copied it: case, spaces, dashes and line
    /// breaks do not matter; `0`/`1`/`8` typed for `O`/`I`/`B` are forgiven.
    pub fn decode(text: &str) -> Result<Self, InvalidInput> {
        let bad = |why: &str| InvalidInput::new("initialization_code", why.to_owned());
        let cleaned: String = text
            .chars()
            .filter(|c| !c.is_whitespace() && *c != '-')
            .map(|c| c.to_ascii_uppercase())
            .collect();
        let body = cleaned
            .strip_prefix(PREFIX)
            .ok_or_else(|| bad("does not start with CTX1"))?;
        let body: String = body
            .chars()
            .map(|c| match c {
                '0' => 'O',
                '1' => 'I',
                '8' => 'B',
                other => other,
            })
            .collect();
        let bytes = BASE32_NOPAD
            .decode(body.as_bytes())
            .map_err(|_| bad("is not valid base32"))?;
        if bytes.len() < 2 + NONCE_BYTES + 1 + 4 {
            return Err(bad("is too short"));
        }
        let (content, crc) = bytes.split_at(bytes.len() - 4);
        if crc32fast::hash(content).to_be_bytes() != crc {
            return Err(bad("has a wrong checksum (mistyped?)"));
        }
        if content[0] != FORMAT {
            return Err(bad("has an unknown format"));
        }
        let edition = match content[1] {
            1 => Edition::Vm,
            2 => Edition::Business,
            3 => Edition::Advanced,
            _ => return Err(bad("names an unknown edition")),
        };
        let nonce = hex(&content[2..2 + NONCE_BYTES]);
        let len = usize::from(content[2 + NONCE_BYTES]);
        let serial_bytes = &content[3 + NONCE_BYTES..];
        if serial_bytes.len() != len {
            return Err(bad("has a serial number of the wrong length"));
        }
        let serial = std::str::from_utf8(serial_bytes)
            .ok()
            .and_then(|s| SerialNumber::parse(s).ok())
            .ok_or_else(|| bad("has an invalid serial number"))?;
        Ok(Self {
            serial,
            edition,
            nonce,
        })
    }
}

fn edition_byte(e: Edition) -> u8 {
    match e {
        Edition::Vm => 1,
        Edition::Business => 2,
        Edition::Advanced => 3,
    }
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(text: &str) -> Option<Vec<u8>> {
    (0..text.len())
        .step_by(2)
        .map(|i| {
            text.get(i..i + 2)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn code() -> InitializationCode {
        InitializationCode::new(
            SerialNumber::parse("0123456789AB").unwrap(),
            Edition::Business,
        )
    }

    #[test]
    fn round_trips() {
        let c = code();
        let text = c.encode();
        assert!(text.starts_with("CTX1-"), "{text}");
        assert!(text.split('-').skip(1).all(|g| g.len() <= 5));
        assert_eq!(InitializationCode::decode(&text).unwrap(), c);
        assert_eq!(c.nonce.len(), 20);
    }

    #[test]
    fn forgives_how_people_copy() {
        let c = code();
        let text = c.encode();
        let sloppy = format!("  {}\n", text.to_lowercase().replace('-', " "));
        assert_eq!(InitializationCode::decode(&sloppy).unwrap(), c);
        let with_digits = text.replace('O', "0").replace('I', "1");
        assert_eq!(InitializationCode::decode(&with_digits).unwrap(), c);
    }

    #[test]
    fn detects_typos_and_garbage() {
        let text = code().encode();
        // Change one character of the body.
        let mut chars: Vec<char> = text.chars().collect();
        let i = 8;
        chars[i] = if chars[i] == 'A' { 'C' } else { 'A' };
        let typo: String = chars.into_iter().collect();
        assert_eq!(
            InitializationCode::decode(&typo).unwrap_err().field,
            "initialization_code"
        );
        assert!(InitializationCode::decode("CTX1-AAAA").is_err());
        assert!(InitializationCode::decode("hello").is_err());
        assert!(InitializationCode::decode("CTX1-!!!!!").is_err());
    }

    #[test]
    fn nonces_are_fresh() {
        assert_ne!(code().nonce, code().nonce);
    }
}

/// The initialization this PBX last issued, as stored: the nonce an activation
/// response must echo, accepted until `expires_at`, once.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PendingInitialization {
    pub nonce: String,
    pub issued_at: chrono::DateTime<chrono::Utc>,
    pub expires_at: chrono::DateTime<chrono::Utc>,
}
