//! The cache file: the last good copy, so that a process restarted while no
//! replica answers decides from it at once (marked stale) instead of knowing
//! nothing.
//!
//! Format (version 1): three text lines, then the body.
//!
//! ```text
//! comtrexx-licensing-client-cache 1
//! features call_assist,user
//! body <length> <crc32 hex>
//! <length bytes: a WatchSeatsResponse with a snapshot, protobuf-encoded>
//! ```
//!
//! Written to a temporary file in the same directory, synced, then renamed
//! over the old one (and the directory synced): a reader sees the old file or
//! the new one, never a part. A file that does not check out (a torn write
//! from elsewhere, another format, other features) is ignored with a warning.

use std::io::Write as _;
use std::path::{Path, PathBuf};

use comtrexx_licensing_domain::Feature;
use comtrexx_licensing_proto::pb;
use prost::Message as _;

const MAGIC: &str = "comtrexx-licensing-client-cache 1";

/// A cache file that cannot be used, and why.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    /// The file could not be read or written.
    #[error("cache file {path}: {source}")]
    Io {
        /// The cache file.
        path: PathBuf,
        /// What the file system said.
        #[source]
        source: std::io::Error,
    },
    /// The file is not a usable copy (format, features, length, checksum).
    #[error("cache file {path} is not usable: {why}")]
    Invalid {
        /// The cache file.
        path: PathBuf,
        /// What is wrong with it.
        why: String,
    },
}

fn invalid(path: &Path, why: impl Into<String>) -> CacheError {
    CacheError::Invalid {
        path: path.to_owned(),
        why: why.into(),
    }
}

fn features_line(features: &[Feature]) -> String {
    if features.is_empty() {
        return "*".into();
    }
    let mut names: Vec<&str> = features.iter().map(|f| f.as_str()).collect();
    names.sort_unstable();
    names.dedup();
    names.join(",")
}

/// Writes `snapshot` (a `WatchSeatsResponse` holding one) for `features`
/// (empty: all) atomically to `path`.
pub fn write(
    path: &Path,
    features: &[Feature],
    snapshot: &pb::WatchSeatsResponse,
) -> Result<(), CacheError> {
    let io = |source| CacheError::Io {
        path: path.to_owned(),
        source,
    };
    let body = snapshot.encode_to_vec();
    let crc = crc32fast::hash(&body);
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map_or_else(|| "cache".into(), |n| n.to_string_lossy().into_owned());
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        write!(
            f,
            "{MAGIC}\nfeatures {}\nbody {} {crc:08x}\n",
            features_line(features),
            body.len()
        )?;
        f.write_all(&body)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        // The rename itself is durable once the directory is synced.
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.map_err(io)
}

/// Reads the snapshot in `path` for `features` (empty: all). `Ok(None)`: no
/// file. A file written for fewer features than asked is refused (its copy
/// knows nothing of the others).
pub fn read(
    path: &Path,
    features: &[Feature],
) -> Result<Option<pb::WatchSeatsResponse>, CacheError> {
    let data = match std::fs::read(path) {
        Ok(d) => d,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(CacheError::Io {
                path: path.to_owned(),
                source,
            });
        }
    };
    let mut lines = data.splitn(4, |b| *b == b'\n');
    let mut line = |what: &str| {
        lines
            .next()
            .and_then(|l| std::str::from_utf8(l).ok())
            .map(str::to_owned)
            .ok_or_else(|| invalid(path, format!("no {what} line")))
    };
    if line("header")? != MAGIC {
        return Err(invalid(
            path,
            format!("not a cache file of this format ({MAGIC:?})"),
        ));
    }
    let kept = line("features")?;
    let kept = kept
        .strip_prefix("features ")
        .ok_or_else(|| invalid(path, "no features line"))?;
    let wanted = features_line(features);
    let covers = kept == "*"
        || (wanted != "*" && wanted.split(',').all(|f| kept.split(',').any(|k| k == f)));
    if !covers {
        return Err(invalid(
            path,
            format!("it holds the features {kept}, this client watches {wanted}"),
        ));
    }
    let body_line = line("body")?;
    let mut parts = body_line
        .strip_prefix("body ")
        .ok_or_else(|| invalid(path, "no body line"))?
        .split(' ');
    let len: usize = parts
        .next()
        .and_then(|l| l.parse().ok())
        .ok_or_else(|| invalid(path, "body length"))?;
    let crc = parts
        .next()
        .and_then(|c| u32::from_str_radix(c, 16).ok())
        .ok_or_else(|| invalid(path, "body checksum"))?;
    let body = lines.next().unwrap_or_default();
    if body.len() != len {
        return Err(invalid(
            path,
            format!(
                "body is {} bytes, the header says {len} (a torn write?)",
                body.len()
            ),
        ));
    }
    if crc32fast::hash(body) != crc {
        return Err(invalid(path, "body checksum does not match"));
    }
    let message =
        pb::WatchSeatsResponse::decode(body).map_err(|e| invalid(path, format!("body: {e}")))?;
    if !matches!(
        message.kind,
        Some(pb::watch_seats_response::Kind::Snapshot(_))
    ) {
        return Err(invalid(path, "body holds no snapshot"));
    }
    Ok(Some(message))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::copy::tests::snapshot;

    fn message() -> pb::WatchSeatsResponse {
        pb::WatchSeatsResponse {
            version: 42,
            kind: Some(pb::watch_seats_response::Kind::Snapshot(snapshot(
                5,
                vec![],
            ))),
        }
    }

    #[test]
    fn a_written_file_reads_back_and_replaces_the_old_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("seats.cache");
        assert!(read(&path, &[]).unwrap().is_none());
        write(&path, &[Feature::User], &message()).unwrap();
        let mut newer = message();
        newer.version = 43;
        write(&path, &[Feature::User], &newer).unwrap();
        assert_eq!(read(&path, &[Feature::User]).unwrap().unwrap(), newer);
        // No temporary file is left behind.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn a_torn_or_foreign_file_or_fewer_features_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("seats.cache");
        write(&path, &[Feature::User], &message()).unwrap();
        let e = read(&path, &[]).unwrap_err();
        assert!(e.to_string().contains("holds the features user"), "{e}");
        let e = read(&path, &[Feature::CallAssist]).unwrap_err();
        assert!(e.to_string().contains("call_assist"), "{e}");

        let whole = std::fs::read(&path).unwrap();
        std::fs::write(&path, &whole[..whole.len() - 3]).unwrap();
        let e = read(&path, &[Feature::User]).unwrap_err();
        assert!(e.to_string().contains("torn"), "{e}");

        let mut flipped = whole.clone();
        *flipped.last_mut().unwrap() ^= 0xff;
        std::fs::write(&path, &flipped).unwrap();
        let e = read(&path, &[Feature::User]).unwrap_err();
        assert!(e.to_string().contains("checksum"), "{e}");

        std::fs::write(&path, b"{\"seats\": []}").unwrap();
        let e = read(&path, &[Feature::User]).unwrap_err();
        assert!(e.to_string().contains("format"), "{e}");
    }
}
