//! `docs/configuration.md` is the one reference of the configuration keys. This test
//! ties it to the configuration the service actually accepts (`RawConfig`):
//!
//! - the keys: every key of `RawConfig` (its defaults serialized, nested tables walked;
//!   optional keys serialize as `null`, so they are listed too) has a row, and every row
//!   names such a key, once;
//! - each row's environment variable is the key's (`LICENSING_` + upper case, `.` as `__`),
//!   and the real loader (figment, which rejects unknown keys) accepts it;
//! - each row's type and default match the default configuration.
//!
//! A row is a line of a table whose header starts with `| key (TOML) |` (the format is
//! described in the document, "How the keys are listed").

// figment::Jail's closures return figment's (large) error type.
#![allow(clippy::result_large_err)]

use std::collections::BTreeMap;

use comtrexx_licensing::config::RawConfig;
use serde_json::Value;

const DOC_PATH: &str = "docs/configuration.md";
const DOC: &str = include_str!("../../../docs/configuration.md");
const HEADER: &str = "| key (TOML) | environment variable | type | default | meaning |";

/// One documented key: its columns and the line it is on.
#[derive(Debug)]
struct Row {
    line: usize,
    env: String,
    ty: String,
    default: String,
}

/// The rows of the key tables, by key. Fails on a malformed row or a key listed twice.
fn documented_keys() -> BTreeMap<String, Row> {
    let mut rows = BTreeMap::new();
    let mut problems = Vec::new();
    let mut tables = 0;
    let mut in_table = false;
    for (i, line) in DOC.lines().enumerate() {
        let line_no = i + 1;
        let line = line.trim();
        if line == HEADER {
            in_table = true;
            tables += 1;
            continue;
        }
        if !line.starts_with('|') {
            in_table = false;
            continue;
        }
        if !in_table || line.starts_with("| ---") {
            continue;
        }
        let inner = line.trim_start_matches('|').trim_end_matches('|');
        // The last column (meaning) may hold anything, `|` included.
        let cells: Vec<&str> = inner.splitn(5, '|').map(str::trim).collect();
        if cells.len() != 5 {
            problems.push(format!(
                "{DOC_PATH}:{line_no}: a key row needs 5 columns: {line}"
            ));
            continue;
        }
        let Some(key) = backticked(cells[0]).filter(|k| is_key(k)) else {
            problems.push(format!(
                "{DOC_PATH}:{line_no}: the first column must be one key in backticks, got {:?}",
                cells[0]
            ));
            continue;
        };
        let row = Row {
            line: line_no,
            env: cells[1].to_owned(),
            ty: cells[2].to_owned(),
            default: cells[3].to_owned(),
        };
        if let Some(first) = rows.insert(key.to_owned(), row) {
            problems.push(format!(
                "{DOC_PATH}:{line_no}: `{key}` is already documented on line {}",
                first.line
            ));
        }
    }
    assert!(
        tables > 0,
        "{DOC_PATH} has no table with the header {HEADER:?}"
    );
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    rows
}

fn backticked(cell: &str) -> Option<&str> {
    cell.strip_prefix('`')?.strip_suffix('`')
}

fn is_key(s: &str) -> bool {
    !s.is_empty()
        && s.split('.').all(|part| {
            !part.is_empty()
                && part
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        })
}

/// Every key the configuration accepts, with its default (`Null` for an optional key).
fn real_keys() -> BTreeMap<String, Value> {
    fn walk(prefix: &str, value: &Value, out: &mut BTreeMap<String, Value>) {
        match value {
            Value::Object(map) => {
                for (name, v) in map {
                    let key = if prefix.is_empty() {
                        name.clone()
                    } else {
                        format!("{prefix}.{name}")
                    };
                    walk(&key, v, out);
                }
            }
            leaf => {
                out.insert(prefix.to_owned(), leaf.clone());
            }
        }
    }
    let defaults = serde_json::to_value(RawConfig::default()).expect("RawConfig serializes");
    let mut keys = BTreeMap::new();
    walk("", &defaults, &mut keys);
    keys
}

fn env_var(key: &str) -> String {
    format!("LICENSING_{}", key.to_ascii_uppercase().replace('.', "__"))
}

fn lookup<'a>(value: &'a Value, key: &str) -> Option<&'a Value> {
    key.split('.').try_fold(value, |v, part| v.get(part))
}

#[test]
fn every_key_is_documented_and_every_documented_key_exists() {
    let documented = documented_keys();
    let real = real_keys();
    assert!(
        real.len() > 40,
        "only {} keys found in RawConfig: is it still serialized with its optional keys?",
        real.len()
    );
    let missing: Vec<&String> = real
        .keys()
        .filter(|k| !documented.contains_key(*k))
        .collect();
    let unknown: Vec<String> = documented
        .iter()
        .filter(|(k, _)| !real.contains_key(*k))
        .map(|(k, row)| format!("`{k}` ({DOC_PATH}:{})", row.line))
        .collect();
    assert!(
        missing.is_empty() && unknown.is_empty(),
        "{DOC_PATH} and the configuration differ\n\
         keys the service accepts but {DOC_PATH} does not document: {missing:?}\n\
         keys {DOC_PATH} documents but the service does not accept: {unknown:?}"
    );
}

#[test]
fn documented_variables_types_and_defaults_match() {
    let documented = documented_keys();
    let real = real_keys();
    let mut problems = Vec::new();
    for (key, row) in &documented {
        let at = format!("{DOC_PATH}:{} `{key}`", row.line);
        let want_env = format!("`{}`", env_var(key));
        if row.env != want_env {
            problems.push(format!(
                "{at}: environment variable {:?}, expected {want_env}",
                row.env
            ));
        }
        let Some(default) = real.get(key) else {
            continue; // reported by the other test
        };
        let types: &[&str] = match default {
            Value::Bool(_) => &["boolean"],
            Value::Number(n) if n.is_f64() => &["number"],
            Value::Number(_) => &["integer"],
            Value::String(_) => &["string", "path"],
            // Optional keys: strings or paths today.
            Value::Null => &["string", "path"],
            other => panic!("{key}: unexpected default {other}"),
        };
        if !types.contains(&row.ty.as_str()) {
            problems.push(format!(
                "{at}: type {:?}, expected one of {types:?}",
                row.ty
            ));
        }
        let want_default = match default {
            Value::Null => "unset".to_owned(),
            Value::String(s) => format!("`{s}`"),
            other => format!("`{other}`"),
        };
        // The default column may go on with a remark: "unset (the system's roots)".
        let ok = row.default == want_default
            || row
                .default
                .strip_prefix(want_default.as_str())
                .is_some_and(|rest| rest.starts_with(' '));
        if !ok {
            problems.push(format!(
                "{at}: default {:?}, expected {want_default}",
                row.default
            ));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn the_loader_accepts_every_documented_variable() {
    let documented = documented_keys();
    let real = real_keys();
    figment::Jail::expect_with(|jail| {
        // The loader rejects what it does not know, so acceptance below means something.
        jail.clear_env();
        jail.set_env("LICENSING_NOT_A_DOCUMENTED_KEY", "1");
        assert!(
            RawConfig::load(None).is_err(),
            "the loader accepted an unknown key"
        );
        for key in documented.keys() {
            jail.clear_env();
            let value = match real.get(key) {
                Some(Value::String(s)) => s.clone(),
                Some(Value::Null) | None => "/etc/comtrexx-licensing/x".to_owned(),
                Some(other) => other.to_string(),
            };
            jail.set_env(env_var(key), &value);
            let loaded = RawConfig::load(None).unwrap_or_else(|e| {
                panic!(
                    "{DOC_PATH}: `{key}` as {}={value:?} is refused: {e}",
                    env_var(key)
                )
            });
            let loaded = serde_json::to_value(&loaded).expect("RawConfig serializes");
            let got = lookup(&loaded, key);
            assert!(
                got.is_some_and(|v| !v.is_null()),
                "{}={value:?} did not reach `{key}` (got {got:?})",
                env_var(key)
            );
        }
        Ok(())
    });
}
