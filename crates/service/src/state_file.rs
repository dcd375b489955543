//! The replica's last known state on local disk (`state_dir`), so that a replica
//! restarted while the store is unreachable still answers licensed users
//! (flagged `stale`) instead of knowing nothing.
//!
//! The file only ever serves reads until the first snapshot of the store: it is
//! never written back to the store and never a repair source (it may be older
//! than the store, and an older copy must not invent or undo writes).
//!
//! Format (`v` 1): one header line of JSON (`v`, the body's length and SHA-256),
//! then the body, a JSON document with its own `v`, bound to the serial number.
//! A file whose header, length, digest, version or serial does not match, or
//! whose license document does not verify, is reported and ignored, never
//! trusted in part. Writes go to a temporary file that is synced and then
//! renamed over the old one, so a crash leaves the old file or the new one.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use crate::domain::{Feature, ReconcileStatus, Seat, SerialNumber, TryoutRecord, UserId};
use crate::mirror::{Mirror, Verifier};
use crate::store::records::{LeaseRecordV1, LicenseRecordV1, SeatRecordV1};
use crate::store::{Snapshot, StoredLicense};

/// The only state file format this code writes.
pub const STATE_V1: u32 = 1;

/// The file's name inside `state_dir`.
pub const FILE_NAME: &str = "state.json";

/// Larger than any real state (a PBX's seats are thousands): a file beyond it is
/// not read into memory.
const MAX_FILE_BYTES: u64 = 64 * 1024 * 1024;

/// At most one write per this long: a burst of seat changes costs one write.
pub const SAVE_DEBOUNCE: Duration = Duration::from_secs(1);

/// The first line of the file.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Header {
    v: u32,
    /// Bytes of the body after the header line.
    len: u64,
    /// SHA-256 of the body, lowercase hex.
    sha256: String,
}

/// What the file keeps: what the reads need (seats, license, tryout, reconcile
/// status, the high-water clock), nothing a write or a repair would use.
#[derive(Debug, Serialize, Deserialize)]
struct BodyV1 {
    v: u32,
    serial: String,
    /// When it was written (ms since the Unix epoch), for the log line on load.
    saved_at_ms: i64,
    seats: Vec<SeatEntry>,
    license: Option<LicenseRecordV1>,
    tryout: Option<TryoutRecord>,
    reconcile: ReconcileStatus,
    high_water_ms: i64,
    /// The leases of concurrent features (absent in files of older versions):
    /// a replica restarted while Redis is down keeps licensing live uses until
    /// their leases end.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    leases: Vec<LeaseEntry>,
}

#[derive(Debug, Serialize, Deserialize)]
struct LeaseEntry {
    id: String,
    lease: LeaseRecordV1,
}

#[derive(Debug, Serialize, Deserialize)]
struct SeatEntry {
    feature: Feature,
    user: String,
    seat: SeatRecordV1,
}

/// The state read from a file: a snapshot without a position (it places the
/// copy nowhere in the store's history).
#[derive(Debug)]
pub struct Loaded {
    pub snapshot: Snapshot,
    pub saved_at_ms: i64,
}

/// Encodes `snapshot` (seats, license, tryout, reconcile, high-water) for `serial`.
pub fn encode(snapshot: &Snapshot, serial: &SerialNumber, saved_at_ms: i64) -> Vec<u8> {
    let body = BodyV1 {
        v: STATE_V1,
        serial: serial.as_str().to_owned(),
        saved_at_ms,
        seats: snapshot
            .seats
            .iter()
            .map(|s| SeatEntry {
                feature: s.feature,
                user: s.user_id.as_str().to_owned(),
                seat: SeatRecordV1::from_seat(s),
            })
            .collect(),
        license: snapshot.license.as_ref().map(LicenseRecordV1::from_stored),
        tryout: snapshot.tryout.clone(),
        reconcile: snapshot.reconcile.clone(),
        high_water_ms: snapshot.high_water_ms,
        leases: snapshot
            .leases
            .iter()
            .map(|l| LeaseEntry {
                id: l.lease_id.clone(),
                lease: LeaseRecordV1::from_lease(l),
            })
            .collect(),
    };
    let body = serde_json::to_vec(&body).expect("a state body always serializes");
    let header = Header {
        v: STATE_V1,
        len: body.len() as u64,
        sha256: sha256_hex(&body),
    };
    let mut out = serde_json::to_vec(&header).expect("a state header always serializes");
    out.push(b'\n');
    out.extend_from_slice(&body);
    out
}

/// Decodes a file's bytes; every mismatch is an error saying what is wrong.
/// The license document must verify with `verifier` (serial, edition, key).
pub fn decode(bytes: &[u8], verifier: &Verifier) -> Result<Loaded, String> {
    let split = bytes
        .iter()
        .position(|b| *b == b'\n')
        .ok_or("no header line (truncated or not a state file)")?;
    let (header, body) = (&bytes[..split], &bytes[split + 1..]);
    let header: Header =
        serde_json::from_slice(header).map_err(|e| format!("header does not parse: {e}"))?;
    if header.v != STATE_V1 {
        return Err(format!("state file format v{} unknown", header.v));
    }
    if header.len != body.len() as u64 {
        return Err(format!(
            "body is {} bytes, the header says {} (truncated?)",
            body.len(),
            header.len
        ));
    }
    if sha256_hex(body) != header.sha256 {
        return Err("digest does not match the body (corrupt)".into());
    }
    let body: BodyV1 =
        serde_json::from_slice(body).map_err(|e| format!("body does not parse: {e}"))?;
    if body.v != STATE_V1 {
        return Err(format!("state body format v{} unknown", body.v));
    }
    if body.serial != verifier.serial.as_str() {
        return Err(format!(
            "written for serial number {}, this replica serves {}",
            body.serial,
            verifier.serial.as_str()
        ));
    }
    let license = match body.license {
        Some(record) => {
            if record.v != 1 {
                return Err(format!("license record v{} unknown", record.v));
            }
            let stored = StoredLicense {
                signed: record.signed,
                applied_at: record.applied_at,
            };
            // Trusted only if it verifies again, like a document read from Redis;
            // a file whose license does not is not used at all (its seats would
            // answer a definite "not licensed").
            verifier
                .verify(&stored)
                .map_err(|e| format!("license document does not verify: {e}"))?;
            Some(stored)
        }
        None => None,
    };
    let mut seats = Vec::with_capacity(body.seats.len());
    for entry in body.seats {
        let user_id =
            UserId::parse(&entry.user).map_err(|e| format!("seat of {:?}: {e}", entry.user))?;
        let seat: Seat = entry
            .seat
            .into_seat(user_id, entry.feature)
            .map_err(|e| e.to_string())?;
        seats.push(seat);
    }
    let mut leases = Vec::with_capacity(body.leases.len());
    for entry in body.leases {
        leases.push(
            entry
                .lease
                .into_lease(&entry.id)
                .map_err(|e| format!("lease {:?}: {e}", entry.id))?,
        );
    }
    Ok(Loaded {
        snapshot: Snapshot {
            position: None,
            seats,
            leases,
            license,
            tryout: body.tryout,
            reconcile: body.reconcile,
            high_water_ms: body.high_water_ms,
            ..Snapshot::default()
        },
        saved_at_ms: body.saved_at_ms,
    })
}

fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The state file of one replica.
#[derive(Debug, Clone)]
pub struct StateFile {
    path: PathBuf,
}

impl StateFile {
    /// The file in `dir`, which is created if missing.
    pub fn in_dir(dir: &Path) -> std::io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        Ok(Self {
            path: dir.join(FILE_NAME),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Reads the file: `Ok(None)` when there is none, `Err` saying why one is
    /// not used.
    pub fn load(&self, verifier: &Verifier) -> Result<Option<Loaded>, String> {
        let file = match std::fs::File::open(&self.path) {
            Ok(file) => file,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(format!("cannot open: {e}")),
        };
        let len = file.metadata().map_err(|e| e.to_string())?.len();
        if len > MAX_FILE_BYTES {
            return Err(format!(
                "{len} bytes, more than the {MAX_FILE_BYTES} a state file may have"
            ));
        }
        let mut bytes = Vec::with_capacity(len as usize);
        std::io::Read::read_to_end(&mut std::io::Read::take(file, MAX_FILE_BYTES), &mut bytes)
            .map_err(|e| format!("cannot read: {e}"))?;
        decode(&bytes, verifier).map(Some)
    }

    /// Writes `bytes` atomically: a temporary file beside it, synced, renamed
    /// over the old one, and the directory synced so the rename persists.
    pub fn save(&self, bytes: &[u8]) -> std::io::Result<()> {
        let dir = self.path.parent().unwrap_or_else(|| Path::new("."));
        let tmp = self.path.with_extension("json.tmp");
        let result = (|| {
            let mut file = std::fs::File::create(&tmp)?;
            file.write_all(bytes)?;
            file.sync_all()?;
            std::fs::rename(&tmp, &self.path)?;
            std::fs::File::open(dir)?.sync_all()
        })();
        if result.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        result
    }
}

/// Loads the file into the mirror, if there is one that verifies; logs and
/// counts a file that is ignored.
pub fn load_into(file: &StateFile, mirror: &Mirror, verifier: &Verifier) {
    match file.load(verifier) {
        Ok(Some(loaded)) => {
            let seats = loaded.snapshot.seats.len();
            tracing::info!(
                path = %file.path().display(),
                seats,
                saved_at_ms = loaded.saved_at_ms,
                "loaded the last known state from state_dir; it answers reads until the seat store is reached"
            );
            mirror.load_disk(loaded.snapshot);
        }
        Ok(None) => {
            mirror.set_disk_problem("no state file yet".into());
            tracing::info!(path = %file.path().display(), "no saved state in state_dir");
        }
        Err(problem) => {
            crate::metrics::metrics().state_file_failure("load");
            tracing::error!(
                path = %file.path().display(),
                %problem,
                "state file ignored; this replica has no state until the seat store is reached"
            );
            mirror.set_disk_problem(format!("state file ignored: {problem}"));
        }
    }
}

/// Writes the mirror's state whenever it moved (at most once per
/// [`SAVE_DEBOUNCE`]) until `stopped`, then once more. Only state read from the
/// store is written, never state that came from the file itself.
pub async fn run_saver(
    file: StateFile,
    mirror: Arc<Mirror>,
    serial: SerialNumber,
    stopped: impl std::future::Future<Output = ()>,
) {
    tokio::pin!(stopped);
    let mut versions = mirror.version_watch();
    // The state as it is at start goes to disk too (a first write soon after
    // start, not only after the next change).
    versions.mark_changed();
    let mut saved = None;
    loop {
        tokio::select! {
            () = &mut stopped => break,
            changed = versions.changed() => if changed.is_err() { break },
        }
        // Debounce: the changes of the next moment go into the same write.
        tokio::select! {
            () = &mut stopped => break,
            () = tokio::time::sleep(SAVE_DEBOUNCE) => {}
        }
        saved = save_once(&file, &mirror, &serial, saved).await;
    }
    save_once(&file, &mirror, &serial, saved).await;
}

/// Writes the state if it is from the store and not the one written last;
/// returns the position written (or still on disk).
async fn save_once(
    file: &StateFile,
    mirror: &Mirror,
    serial: &SerialNumber,
    saved: Option<crate::store::Position>,
) -> Option<crate::store::Position> {
    let snapshot = mirror.read(|s| s.position.is_some().then(|| s.to_snapshot()))?;
    if snapshot.position == saved {
        return saved;
    }
    let bytes = encode(&snapshot, serial, chrono::Utc::now().timestamp_millis());
    let file = file.clone();
    let written = tokio::task::spawn_blocking(move || file.save(&bytes)).await;
    match written {
        Ok(Ok(())) => snapshot.position,
        Ok(Err(error)) => {
            crate::metrics::metrics().state_file_failure("save");
            tracing::warn!(%error, "could not write the state file; the previous one stays");
            saved
        }
        Err(_) => saved,
    }
}

#[cfg(test)]
mod tests {
    use chrono::Utc;

    use super::*;
    use crate::domain::license::testing::{key, payload};
    use crate::domain::{Edition, SeatSource, SignedLicense};
    use crate::store::Position;

    fn serial() -> SerialNumber {
        SerialNumber::parse("SF-0000000001").unwrap()
    }

    fn verifier() -> Verifier {
        Verifier {
            key: Some(key(7).verifying_key()),
            serial: serial(),
            edition: Edition::Vm,
        }
    }

    fn snapshot() -> Snapshot {
        Snapshot {
            position: Some(Position {
                epoch: "e".into(),
                version: 3,
            }),
            seats: vec![Seat {
                user_id: UserId::parse("alice").unwrap(),
                feature: Feature::User,
                source: SeatSource::Purchased,
                assigned_at: Utc::now(),
                over_capacity_since: None,
            }],
            high_water_ms: 1234,
            ..Snapshot::default()
        }
    }

    #[test]
    fn round_trip_keeps_what_reads_need_and_no_position() {
        let original = snapshot();
        let bytes = encode(&original, &serial(), 42);
        let loaded = decode(&bytes, &verifier()).unwrap();
        assert_eq!(loaded.saved_at_ms, 42);
        assert_eq!(loaded.snapshot.position, None);
        assert_eq!(loaded.snapshot.high_water_ms, 1234);
        let seats = &loaded.snapshot.seats;
        assert_eq!(seats.len(), 1);
        assert_eq!(seats[0].user_id.as_str(), "alice");
        assert_eq!(
            seats[0].assigned_at.timestamp_millis(),
            original.seats[0].assigned_at.timestamp_millis()
        );
    }

    #[test]
    fn leases_round_trip_and_older_files_have_none() {
        let mut original = snapshot();
        let at = chrono::DateTime::from_timestamp_millis(1_800_000_000_000).unwrap();
        original.leases = vec![crate::domain::Lease {
            lease_id: "0123456789abcdef0123456789abcdef".into(),
            user_id: UserId::parse("alice").unwrap(),
            feature: Feature::User,
            holder: crate::domain::Holder::parse("pod-1").unwrap(),
            acquired_at: at,
            expires_at: at + chrono::Duration::seconds(90),
        }];
        let loaded = decode(&encode(&original, &serial(), 42), &verifier()).unwrap();
        assert_eq!(loaded.snapshot.leases, original.leases);
        // A file without leases (written before them) still loads.
        let bytes = encode(&snapshot(), &serial(), 42);
        assert!(!String::from_utf8_lossy(&bytes).contains("leases"));
        assert!(
            decode(&bytes, &verifier())
                .unwrap()
                .snapshot
                .leases
                .is_empty()
        );
    }

    #[test]
    fn corrupt_and_truncated_files_are_refused() {
        let bytes = encode(&snapshot(), &serial(), 42);
        let truncated = &bytes[..bytes.len() - 5];
        let err = decode(truncated, &verifier()).unwrap_err();
        assert!(err.contains("truncated"), "{err}");
        let mut flipped = bytes.clone();
        let last = flipped.len() - 3;
        flipped[last] ^= 0x01;
        let err = decode(&flipped, &verifier()).unwrap_err();
        assert!(err.contains("digest"), "{err}");
        assert!(decode(b"", &verifier()).is_err());
        assert!(decode(b"garbage\n{}", &verifier()).is_err());
        let header_only = &bytes[..bytes.iter().position(|b| *b == b'\n').unwrap()];
        assert!(decode(header_only, &verifier()).is_err());
    }

    #[test]
    fn another_serial_is_refused() {
        let other = SerialNumber::parse("SF-0000000002").unwrap();
        let bytes = encode(&snapshot(), &other, 42);
        let err = decode(&bytes, &verifier()).unwrap_err();
        assert!(err.contains("serial"), "{err}");
    }

    #[test]
    fn an_unknown_version_is_refused() {
        let bytes = encode(&snapshot(), &serial(), 42);
        let text = String::from_utf8(bytes).unwrap();
        let (_, body) = text.split_once('\n').unwrap();
        let body = body.replacen("\"v\":1", "\"v\":2", 1);
        let header = format!(
            "{{\"v\":1,\"len\":{},\"sha256\":\"{}\"}}\n",
            body.len(),
            sha256_hex(body.as_bytes())
        );
        let err = decode(format!("{header}{body}").as_bytes(), &verifier()).unwrap_err();
        assert!(err.contains("v2"), "{err}");
        let err = decode(
            text.replacen("\"v\":1", "\"v\":9", 1).as_bytes(),
            &verifier(),
        )
        .unwrap_err();
        assert!(err.contains("v9"), "{err}");
    }

    fn with_license(signer: u8) -> Snapshot {
        let mut snap = snapshot();
        snap.license = Some(StoredLicense {
            signed: SignedLicense::sign(&payload(serial().as_str(), 5), &key(signer)),
            applied_at: Utc::now(),
        });
        snap
    }

    #[test]
    fn a_license_that_verifies_is_kept() {
        let snap = with_license(7);
        let loaded = decode(&encode(&snap, &serial(), 42), &verifier()).unwrap();
        assert_eq!(loaded.snapshot.license, snap.license);
    }

    #[test]
    fn a_license_that_does_not_verify_makes_the_file_unused() {
        // Signed by another key, with a digest that matches: a tampered file.
        let bytes = encode(&with_license(8), &serial(), 42);
        let err = decode(&bytes, &verifier()).unwrap_err();
        assert!(err.contains("verify"), "{err}");
    }

    #[test]
    fn save_replaces_the_file_whole() {
        let dir = tempfile::tempdir().unwrap();
        let file = StateFile::in_dir(&dir.path().join("sub")).unwrap();
        assert!(file.load(&verifier()).unwrap().is_none());
        file.save(&encode(&snapshot(), &serial(), 1)).unwrap();
        file.save(&encode(&snapshot(), &serial(), 2)).unwrap();
        let loaded = file.load(&verifier()).unwrap().unwrap();
        assert_eq!(loaded.saved_at_ms, 2);
        let names: Vec<_> = std::fs::read_dir(dir.path().join("sub"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, [FILE_NAME]);
    }
}
