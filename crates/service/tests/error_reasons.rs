//! docs/errors.md lists every `ErrorInfo.reason` the service can send, with its
//! status code. The reasons are collected from the sources (the error table in
//! `status.rs`, `LicensingError::precondition("REASON", …)` and the refusal
//! reasons passed to `upstream_error`); the test fails when the code can send a
//! reason the table lacks, when the table names one the code never sends, or
//! when a row's status code is not the one the error table gives.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use comtrexx_licensing::domain::LicensingError;
use comtrexx_licensing::rpc::{Role, RpcClass};
use comtrexx_licensing::status::{AuthError, Refusal, auth_status, refusal_status, to_status};
use tonic::Status;
use tonic_types::StatusExt as _;

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The source without its trailing unit-test module and without test-only files.
fn production_source(path: &Path) -> Option<String> {
    let name = path.file_name()?.to_str()?;
    if name == "tests.rs" || path.components().any(|c| c.as_os_str() == "tests") {
        return None;
    }
    let text = std::fs::read_to_string(path).unwrap();
    Some(match text.find("\n#[cfg(test)]\nmod ") {
        Some(at) => text[..at].to_owned(),
        None => text,
    })
}

/// The string literals of the call that starts at `from` (just after its
/// opening parenthesis), up to the matching closing one.
fn call_literals(text: &str, from: usize) -> Vec<String> {
    let bytes = text.as_bytes();
    let (mut depth, mut i, mut literals) = (1usize, from, Vec::new());
    while i < bytes.len() && depth > 0 {
        match bytes[i] {
            b'(' => depth += 1,
            b')' => depth -= 1,
            b'"' => {
                let start = i + 1;
                i += 1;
                while bytes[i] != b'"' {
                    i += if bytes[i] == b'\\' { 2 } else { 1 };
                }
                literals.push(text[start..i].to_owned());
            }
            _ => {}
        }
        i += 1;
    }
    literals
}

fn is_reason(s: &str) -> bool {
    s.len() > 1
        && s.starts_with(|c: char| c.is_ascii_uppercase())
        && s.chars().all(|c| c.is_ascii_uppercase() || c == '_')
}

/// Every reason of a `FAILED_PRECONDITION` in the sources, and where a call
/// names none as a literal.
fn precondition_reasons() -> (BTreeSet<String>, Vec<String>) {
    let mut files = Vec::new();
    rust_files(&workspace().join("crates/service/src"), &mut files);
    rust_files(&workspace().join("crates/domain/src"), &mut files);
    let (mut reasons, mut without_literal) = (BTreeSet::new(), Vec::new());
    for path in files {
        let Some(text) = production_source(&path) else {
            continue;
        };
        for call in ["precondition(", "upstream_error("] {
            for (at, _) in text.match_indices(call) {
                if text[..at].ends_with("fn ") {
                    continue;
                }
                let found: Vec<String> = call_literals(&text, at + call.len())
                    .into_iter()
                    .filter(|s| is_reason(s))
                    .collect();
                if found.is_empty() {
                    without_literal.push(format!("{}: {call}", path.display()));
                }
                reasons.extend(found);
            }
        }
    }
    (reasons, without_literal)
}

/// The reason literals of the error table in `status.rs` (`to_status`,
/// `refusal_status`, `AuthError::reason`).
fn status_table_reasons() -> BTreeSet<String> {
    let text =
        production_source(&workspace().join("crates/service/src/status.rs")).expect("status.rs");
    let mut reasons = BTreeSet::new();
    let mut rest = text.as_str();
    while let Some(start) = rest.find('"') {
        let end = start + 1 + rest[start + 1..].find('"').unwrap();
        let literal = &rest[start + 1..end];
        if is_reason(literal) {
            reasons.insert(literal.to_owned());
        }
        rest = &rest[end + 1..];
    }
    reasons
}

/// The rows of docs/errors.md: reason → status code.
fn documented() -> BTreeMap<String, String> {
    let text = std::fs::read_to_string(workspace().join("docs/errors.md")).unwrap();
    let mut rows = BTreeMap::new();
    for line in text.lines().filter(|l| l.starts_with("| `")) {
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        let reason = cells[1].trim_matches('`').to_owned();
        let code = cells[2].trim_matches('`').to_owned();
        assert!(
            rows.insert(reason.clone(), code).is_none(),
            "docs/errors.md lists {reason} twice"
        );
    }
    rows
}

fn reason_and_code(status: &Status) -> (String, String) {
    let info = status.get_error_details().error_info().cloned().unwrap();
    (
        info.reason,
        comtrexx_licensing::rpc::code_label(status.code()).to_owned(),
    )
}

/// What the error table answers for every kind of error it knows, reason → code.
fn sent() -> BTreeMap<String, String> {
    let d = Duration::from_millis(1);
    let refusals = [
        Refusal::Overloaded {
            class: RpcClass::Writes,
        },
        Refusal::RateLimited { retry_after: d },
        Refusal::TooManySubscribers { limit: 1 },
        Refusal::ShuttingDown,
        Refusal::DeadlineExceeded { deadline: d },
        Refusal::MessageTooLarge { limit: 1 },
        Refusal::CallerShare {
            class: RpcClass::Writes,
            limit: 1,
        },
        Refusal::RequestIncomplete { timeout: d },
        Refusal::TooManyWatches { limit: 1 },
    ];
    let auth = [
        AuthError::MissingCredentials,
        AuthError::MalformedToken("x"),
        AuthError::UnknownToken,
        AuthError::PlaintextToken,
        AuthError::CertificateRejected("x".into()),
        AuthError::UnknownCertificate("x".into()),
        AuthError::Denied {
            caller: "x".into(),
            role: Role::Monitoring,
            method: "x".into(),
        },
    ];
    let errors = [
        LicensingError::from(comtrexx_licensing::domain::InvalidInput::new(
            "user_id", "x",
        )),
        LicensingError::NoFreeSeat {
            feature: comtrexx_licensing::domain::Feature::User,
            capacity: 1,
            in_use: 1,
        },
        LicensingError::Unavailable("x".into()),
        LicensingError::StoreBusy {
            message: "x".into(),
            retry_after: d,
        },
        LicensingError::Aborted("x".into()),
        LicensingError::LicensingServerUnavailable("x".into()),
        LicensingError::NoStateYet("x".into()),
        LicensingError::NotYetConsistent {
            min_version: 2,
            version: 1,
            waited_ms: 100,
        },
        LicensingError::Internal("x".into()),
    ];
    let (preconditions, _) = precondition_reasons();
    let preconditions = preconditions
        .into_iter()
        .map(|r| to_status(LicensingError::precondition(r.leak(), "x")));
    refusals
        .iter()
        .map(refusal_status)
        .chain(auth.iter().map(auth_status))
        .chain(errors.into_iter().map(to_status))
        .chain(preconditions)
        .map(|s| reason_and_code(&s))
        .collect()
}

#[test]
fn every_reason_the_code_sends_is_documented_and_nothing_else() {
    let (preconditions, without_literal) = precondition_reasons();
    // The one call whose reason is a parameter: `upstream_error` passes on the
    // reason its callers name (collected from those calls).
    assert_eq!(
        without_literal.len(),
        1,
        "a precondition whose reason is not a literal; name the reason at the call: {without_literal:?}"
    );
    // The scan finds what it must (a broken scan would find nothing).
    for known in ["NOT_ACTIVATED", "ACTIVATION_REFUSED", "TRYOUT_UNAVAILABLE"] {
        assert!(preconditions.contains(known), "scan missed {known}");
    }
    let mut in_code: BTreeSet<String> = status_table_reasons();
    in_code.extend(preconditions);
    let docs = documented();
    let missing: Vec<&String> = in_code.iter().filter(|r| !docs.contains_key(*r)).collect();
    let never_sent: Vec<&String> = docs.keys().filter(|r| !in_code.contains(*r)).collect();
    assert!(
        missing.is_empty(),
        "reasons the code sends that docs/errors.md lacks: {missing:?}"
    );
    assert!(
        never_sent.is_empty(),
        "reasons docs/errors.md names that the code never sends: {never_sent:?}"
    );
    // Every reason the error table answers is one the scan found, with the
    // status code the table in the docs gives.
    for (reason, code) in sent() {
        assert!(
            in_code.contains(&reason),
            "{reason} is sent but not found by the scan"
        );
        assert_eq!(
            docs.get(&reason),
            Some(&code),
            "docs/errors.md: status code of {reason}"
        );
    }
}
