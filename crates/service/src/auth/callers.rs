//! The callers file (`auth.callers_file`): who may call, with which role, proven
//! by which credential. Tokens are stored only as SHA-256 (hex) and compared in
//! constant time. The file is validated as a whole (an entry with an unknown
//! role, a duplicate name or no credential refuses the file, naming the entry)
//! and can be re-read at run time; a file that does not validate leaves the
//! callers in force unchanged. A file that names no callers is refused too
//! (an editor that truncates before writing would otherwise lock every caller
//! out), unless `auth.allow_empty_callers_file` says the deployment means it.
//! Reloads (SIGHUP and the periodic check) are serialised: read, parse and
//! swap happen under one lock, so older content never replaces newer.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use parking_lot::{Mutex, RwLock};
use serde::Deserialize;
use sha2::{Digest as _, Sha256};
use subtle::ConstantTimeEq as _;

use super::{Caller, Role};

/// The longest bearer token accepted (longer ones are refused unread).
pub const MAX_TOKEN_LEN: usize = 512;
/// The prefix of tokens made by `auth token`, so they are recognisable in a leak scan.
pub const TOKEN_PREFIX: &str = "cxl_";

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    #[serde(default)]
    caller: Vec<RawCaller>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCaller {
    name: String,
    role: String,
    /// The certificate's URI SAN (else its first DNS SAN).
    certificate: Option<String>,
    /// SHA-256 of the bearer token, 64 hex digits.
    token_sha256: Option<String>,
}

/// The validated callers file.
#[derive(Debug, Default)]
pub struct Callers {
    // Certificate identity (URI or DNS SAN) → caller.
    by_certificate: HashMap<String, Caller>,
    // Token digests with their callers; searched linearly in constant time per
    // entry, so timing says nothing about which digest matched or how closely.
    tokens: Vec<([u8; 32], Caller)>,
    count: usize,
}

impl Callers {
    /// Parses and validates the callers file's text. Errors name the entry
    /// (`caller[N] "name"`) and what is wrong with it.
    pub fn parse(text: &str) -> Result<Self, String> {
        let raw: RawFile = toml::from_str(text).map_err(|e| e.to_string())?;
        let mut callers = Callers::default();
        let mut names = HashMap::new();
        for (i, entry) in raw.caller.iter().enumerate() {
            let at = format!("caller[{i}] {:?}", entry.name);
            if entry.name.trim().is_empty() || entry.name.len() > 128 {
                return Err(format!("{at}: name must be 1 to 128 characters"));
            }
            if entry.name.chars().any(char::is_control) {
                return Err(format!("{at}: name contains a control character"));
            }
            if let Some(first) = names.insert(entry.name.as_str(), i) {
                return Err(format!("{at}: duplicate name (also caller[{first}])"));
            }
            let role = Role::parse(&entry.role).ok_or_else(|| {
                format!(
                    "{at}: unknown role {:?} (one of call_handling, user_management, monitoring, operator)",
                    entry.role
                )
            })?;
            let caller = Caller {
                name: entry.name.clone(),
                role,
            };
            if entry.certificate.is_none() && entry.token_sha256.is_none() {
                return Err(format!(
                    "{at}: has neither certificate nor token_sha256, so nobody can prove to be it"
                ));
            }
            if let Some(identity) = &entry.certificate {
                if identity.is_empty() {
                    return Err(format!("{at}: certificate is empty"));
                }
                if callers
                    .by_certificate
                    .insert(identity.clone(), caller.clone())
                    .is_some()
                {
                    return Err(format!(
                        "{at}: certificate {identity:?} is already another caller's"
                    ));
                }
            }
            if let Some(hex) = &entry.token_sha256 {
                let digest = parse_digest(hex).ok_or_else(|| {
                    format!("{at}: token_sha256 must be 64 hex digits (the SHA-256 of the token)")
                })?;
                if callers.tokens.iter().any(|(d, _)| *d == digest) {
                    return Err(format!("{at}: token_sha256 is already another caller's"));
                }
                callers.tokens.push((digest, caller));
            }
            callers.count += 1;
        }
        Ok(callers)
    }

    /// How many callers the file names.
    pub fn len(&self) -> usize {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// The caller a verified client certificate names.
    pub fn by_certificate(&self, identity: &str) -> Option<&Caller> {
        self.by_certificate.get(identity)
    }

    /// The caller a bearer token belongs to. Every stored digest is compared,
    /// each in constant time.
    pub fn by_token(&self, token: &str) -> Option<&Caller> {
        let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let mut found = None;
        for (stored, caller) in &self.tokens {
            if bool::from(stored.ct_eq(&digest)) {
                found = Some(caller);
            }
        }
        found
    }
}

fn parse_digest(hex: &str) -> Option<[u8; 32]> {
    let bytes = data_encoding::HEXLOWER_PERMISSIVE
        .decode(hex.as_bytes())
        .ok()?;
    bytes.try_into().ok()
}

/// The SHA-256 of a token, as the callers file stores it.
pub fn token_sha256(token: &str) -> String {
    data_encoding::HEXLOWER.encode(&Sha256::digest(token.as_bytes()))
}

/// A new random bearer token (256 bits).
pub fn new_token() -> String {
    format!(
        "{TOKEN_PREFIX}{}",
        URL_SAFE_NO_PAD.encode(rand::random::<[u8; 32]>())
    )
}

/// The token of an `authorization` header value: `Bearer <token>` (scheme
/// case-insensitive). `Err` when the header is there but not a usable bearer
/// token.
pub fn bearer(value: &[u8]) -> Result<&str, &'static str> {
    let value = std::str::from_utf8(value).map_err(|_| "authorization header is not text")?;
    let (scheme, token) = value
        .split_once(' ')
        .ok_or("authorization header is not `Bearer <token>`")?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err("authorization header is not `Bearer <token>`");
    }
    let token = token.trim_matches(' ');
    if token.is_empty() || token.len() > MAX_TOKEN_LEN {
        return Err("bearer token is empty or too long");
    }
    if !token.bytes().all(|b| b.is_ascii_graphic()) {
        return Err("bearer token has characters outside printable ASCII");
    }
    Ok(token)
}

/// The callers file in force, re-readable at run time (a file watcher, or a
/// SIGHUP handler, calls [`CallersFile::reload`]).
pub struct CallersFile {
    /// `None`: no callers file configured (only loopback or `disabled` callers).
    path: Option<PathBuf>,
    /// Whether a file that names no callers is accepted.
    allow_empty: bool,
    // Swapped whole on reload; readers clone the Arc and never hold the lock.
    current: RwLock<(Arc<Callers>, Vec<u8>)>,
    // Held by a reload from reading the file to the swap: a reload that read
    // older content can never swap it in after one that read newer.
    reloading: Mutex<()>,
}

impl CallersFile {
    /// Reads and validates the file; an error names the path and the entry.
    /// A file without callers is refused unless `allow_empty`.
    pub fn load(path: Option<&Path>, allow_empty: bool) -> Result<Self, String> {
        let (callers, bytes) = match path {
            Some(path) => read(path, allow_empty)?,
            None => (Callers::default(), Vec::new()),
        };
        Ok(Self {
            path: path.map(Path::to_owned),
            allow_empty,
            current: RwLock::new((Arc::new(callers), bytes)),
            reloading: Mutex::new(()),
        })
    }

    /// The callers in force.
    pub fn current(&self) -> Arc<Callers> {
        self.current.read().0.clone()
    }

    /// Re-reads the file. On error the callers in force stay, and the error says why.
    pub fn reload(&self) -> Result<(), String> {
        self.reload_if_changed().map(|_| ())
    }

    /// Re-reads the file if its content changed; `Ok(true)` when new callers are in force.
    pub fn reload_if_changed(&self) -> Result<bool, String> {
        let Some(path) = &self.path else {
            return Ok(false);
        };
        let _serialised = self.reloading.lock();
        let bytes = std::fs::read(path).map_err(|e| format!("read {}: {e}", path.display()))?;
        if bytes == self.current.read().1 {
            return Ok(false);
        }
        let (callers, bytes) = parse_file(path, bytes, self.allow_empty)?;
        *self.current.write() = (Arc::new(callers), bytes);
        Ok(true)
    }
}

fn read(path: &Path, allow_empty: bool) -> Result<(Callers, Vec<u8>), String> {
    let bytes = std::fs::read(path).map_err(|e| format!("read {}: {e}", path.display()))?;
    parse_file(path, bytes, allow_empty)
}

fn parse_file(
    path: &Path,
    bytes: Vec<u8>,
    allow_empty: bool,
) -> Result<(Callers, Vec<u8>), String> {
    let text =
        std::str::from_utf8(&bytes).map_err(|_| format!("{}: not UTF-8 text", path.display()))?;
    let callers = Callers::parse(text).map_err(|e| format!("{}: {e}", path.display()))?;
    if callers.is_empty() && !allow_empty {
        return Err(format!(
            "{}: names no callers, which would refuse every caller (a file truncated while \
             being written?); set auth.allow_empty_callers_file = true if that is meant",
            path.display()
        ));
    }
    Ok((callers, bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = r#"
[[caller]]
name = "call-handling"
role = "call_handling"
certificate = "spiffe://pbx.local/ns/pbx/sa/call-handling"

[[caller]]
name = "ops"
role = "operator"
token_sha256 = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
"#;

    #[test]
    fn the_contract_example_parses() {
        let callers = Callers::parse(FILE).unwrap();
        assert_eq!(callers.len(), 2);
        let ch = callers
            .by_certificate("spiffe://pbx.local/ns/pbx/sa/call-handling")
            .unwrap();
        assert_eq!(ch.role, Role::CallHandling);
        // sha256("test") is the digest in the file.
        assert_eq!(callers.by_token("test").unwrap().name, "ops");
        assert!(callers.by_token("tesT").is_none());
    }

    #[test]
    fn bad_entries_are_refused_by_name() {
        let cases = [
            (
                "[[caller]]\nname = \"a\"\nrole = \"admin\"\ntoken_sha256 = \"9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08\"\n",
                "unknown role",
            ),
            ("[[caller]]\nname = \"a\"\nrole = \"operator\"\n", "neither"),
            (
                "[[caller]]\nname = \"a\"\nrole = \"operator\"\ncertificate = \"x\"\n[[caller]]\nname = \"a\"\nrole = \"monitoring\"\ncertificate = \"y\"\n",
                "duplicate name",
            ),
            (
                "[[caller]]\nname = \"a\"\nrole = \"operator\"\ntoken_sha256 = \"abc\"\n",
                "64 hex",
            ),
            (
                "[[caller]]\nname = \"a\"\nrole = \"operator\"\ncertificate = \"x\"\ncolour = \"red\"\n",
                "colour",
            ),
        ];
        for (text, what) in cases {
            let err = Callers::parse(text).unwrap_err();
            assert!(err.contains(what), "{err}");
            assert!(err.contains("caller[") || what == "colour", "{err}");
        }
    }

    #[test]
    fn new_tokens_match_their_digest() {
        let token = new_token();
        assert!(token.starts_with(TOKEN_PREFIX));
        let file = format!(
            "[[caller]]\nname = \"s\"\nrole = \"monitoring\"\ntoken_sha256 = \"{}\"\n",
            token_sha256(&token)
        );
        let callers = Callers::parse(&file).unwrap();
        assert_eq!(callers.by_token(&token).unwrap().role, Role::Monitoring);
        assert_eq!(
            bearer(format!("Bearer {token}").as_bytes()),
            Ok(token.as_str())
        );
        assert_eq!(
            bearer(format!("bearer {token}").as_bytes()),
            Ok(token.as_str())
        );
        assert!(bearer(b"Basic abc").is_err());
        assert!(bearer(b"Bearer ").is_err());
    }

    #[test]
    fn reload_keeps_the_old_callers_on_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("callers.toml");
        std::fs::write(&path, FILE).unwrap();
        let file = CallersFile::load(Some(&path), false).unwrap();
        assert_eq!(file.reload_if_changed(), Ok(false));
        std::fs::write(
            &path,
            "[[caller]]\nname = \"x\"\nrole = \"root\"\ncertificate = \"c\"\n",
        )
        .unwrap();
        let err = file.reload().unwrap_err();
        assert!(err.contains("caller[0]"), "{err}");
        assert_eq!(file.current().len(), 2);
        // An empty file (an editor truncated it first): refused, the callers stay.
        for empty in ["", "# all callers removed\n"] {
            std::fs::write(&path, empty).unwrap();
            let err = file.reload_if_changed().unwrap_err();
            assert!(err.contains("auth.allow_empty_callers_file"), "{err}");
            assert_eq!(file.current().len(), 2);
        }
        assert!(CallersFile::load(Some(&path), false).is_err());
        // Unless the deployment says so.
        let allowed = CallersFile::load(Some(&path), true).unwrap();
        assert!(allowed.current().is_empty());
        std::fs::write(&path, FILE).unwrap();
        let allowed = CallersFile::load(Some(&path), true).unwrap();
        std::fs::write(&path, "").unwrap();
        assert_eq!(allowed.reload_if_changed(), Ok(true));
        assert!(allowed.current().is_empty());
    }

    /// A caller file of one caller named `v<n>`.
    fn version(n: u32) -> String {
        format!("[[caller]]\nname = \"v{n}\"\nrole = \"operator\"\ncertificate = \"c\"\n")
    }

    #[test]
    fn concurrent_reloads_leave_the_newest_content_in_force() {
        const ROUNDS: u32 = 200;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("callers.toml");
        std::fs::write(&path, version(0)).unwrap();
        let file = Arc::new(CallersFile::load(Some(&path), false).unwrap());
        for n in 1..=ROUNDS {
            // Replaced atomically, as an editor or a Secret mount does.
            let next = dir.path().join("next.toml");
            std::fs::write(&next, version(n)).unwrap();
            // Reloads in flight while the file changes (SIGHUP and the check).
            let reloads: Vec<_> = (0..3)
                .map(|_| {
                    let file = file.clone();
                    std::thread::spawn(move || file.reload_if_changed())
                })
                .collect();
            std::fs::rename(&next, &path).unwrap();
            let last = file.reload_if_changed();
            for reload in reloads {
                reload.join().unwrap().unwrap();
            }
            last.unwrap();
            assert!(
                file.current()
                    .by_certificate("c")
                    .is_some_and(|c| c.name == format!("v{n}")),
                "round {n}: {:?}",
                file.current().by_certificate("c")
            );
        }
    }
}
