//! Load errors (figment's) as messages that say what is wrong and how to fix it:
//! the key as the user wrote it (`LICENSING_SERIAL_NUMEBR`, or `log.edition` in a
//! named file), the nearest known key, and the form a value must have.

use std::path::{Path, PathBuf};

use figment::Source;
use figment::error::{Actual, Kind};

use super::RawConfig;

/// Where the faulty key was written.
enum Origin {
    Env,
    File(PathBuf),
    Other,
}

impl Origin {
    fn of(error: &figment::Error) -> Self {
        let Some(metadata) = &error.metadata else {
            return Origin::Other;
        };
        if metadata.name.contains("environment variable") {
            return Origin::Env;
        }
        match &metadata.source {
            Some(Source::File(path)) => Origin::File(path.clone()),
            _ => Origin::Other,
        }
    }

    /// `key` (dotted) as written in this origin.
    fn spelling(&self, key: &str) -> String {
        match self {
            Origin::Env => env_name(key),
            _ => key.to_owned(),
        }
    }

    /// ` in FILE` / ` (LICENSING_X)`, after the key's name.
    fn place(&self, key: &str) -> String {
        match self {
            Origin::Env => format!(" (environment variable `{}`)", env_name(key)),
            Origin::File(path) => format!(" in {}", path.display()),
            Origin::Other => String::new(),
        }
    }
}

/// The environment variable of a dotted key: `auth.mode` is `LICENSING_AUTH__MODE`.
pub fn env_name(key: &str) -> String {
    format!("LICENSING_{}", key.replace('.', "__").to_ascii_uppercase())
}

/// Every key of the configuration, dotted (`auth.mode`), sections included.
pub fn known_keys() -> Vec<String> {
    fn walk(prefix: &str, value: &serde_json::Value, out: &mut Vec<String>) {
        if let serde_json::Value::Object(map) = value {
            for (k, v) in map {
                let key = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                walk(&key, v, out);
                out.push(key);
            }
        }
    }
    let value = serde_json::to_value(RawConfig::default()).expect("config serializes");
    let mut out = Vec::new();
    walk("", &value, &mut out);
    out
}

/// The known key nearest to `key` by edit distance, if near enough to be a typo.
fn nearest(key: &str, known: &[String]) -> Option<String> {
    let key = key.to_ascii_lowercase();
    known
        .iter()
        .map(|k| (edit_distance(&key, k), k))
        .filter(|(d, k)| *d <= (k.len() / 3).max(2))
        .min_by_key(|(d, _)| *d)
        .map(|(_, k)| k.clone())
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut previous = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let substitution = previous + usize::from(ca != *cb);
            previous = row[j + 1];
            row[j + 1] = substitution.min(row[j] + 1).min(previous + 1);
        }
    }
    row[b.len()]
}

/// The form a value of `key` must have, from serde's `expected`.
fn form(key: &str, expected: &str) -> String {
    match key {
        "listen_addr" => "HOST:PORT, e.g. 0.0.0.0:50051".into(),
        "metrics_addr" => "HOST:PORT, e.g. 0.0.0.0:9090 (empty: no metrics endpoint)".into(),
        _ => match expected {
            "u8" | "u16" | "u32" | "u64" | "u128" | "usize" => "a whole number (0 or more)".into(),
            "i8" | "i16" | "i32" | "i64" | "i128" | "isize" => "a whole number".into(),
            "f32" | "f64" => "a number".into(),
            "a boolean" => "true or false".into(),
            "a string" | "path string" => "a string".into(),
            other => other.into(),
        },
    }
}

/// One load error as a message; the file given to `--config` (if any) for the
/// errors that name no source.
fn explain_one(error: &figment::Error, file: Option<&Path>, known: &[String]) -> String {
    let origin = Origin::of(error);
    let path = error.path.join(".");
    match &error.kind {
        Kind::UnknownField(field, _) => {
            // The path ends with the field itself; its section is what precedes it.
            let mut segments = error.path.clone();
            if segments.last() == Some(field) {
                segments.pop();
            }
            let section = segments.join(".");
            let key = if section.is_empty() {
                field.clone()
            } else {
                format!("{section}.{field}")
            };
            let what = match &origin {
                Origin::Env => format!("unknown environment variable `{}`", env_name(&key)),
                _ => format!("unknown key `{key}`{}", origin.place(&key)),
            };
            let mut message = what;
            // A top-level key written after a `[section]` of the file lands in it.
            let misplaced = matches!(origin, Origin::File(_))
                && !section.is_empty()
                && known.iter().any(|k| k == field);
            if misplaced {
                message.push_str(&format!(
                    ": `{field}` is a top-level key, and top-level keys must come before the \
                     first `[section]` of the file (here it follows `[{section}]`); move it above"
                ));
            } else if let Some(near) = nearest(&key, known) {
                message.push_str(&format!(": did you mean `{}`?", origin.spelling(&near)));
            }
            if matches!(origin, Origin::Env) {
                message.push_str(
                    " (nested keys are joined with `__`, e.g. `LICENSING_AUTH__MODE` for `auth.mode`)",
                );
            }
            message
        }
        Kind::InvalidType(actual, expected) | Kind::InvalidValue(actual, expected)
            if !path.is_empty() =>
        {
            let mut message = format!(
                "`{path}` must be {}; found {actual}{}",
                form(&path, expected),
                origin.place(&path)
            );
            let quotable = matches!(
                actual,
                Actual::Unsigned(_) | Actual::Signed(_) | Actual::Float(_) | Actual::Bool(_)
            );
            if matches!(origin, Origin::Env) && form(&path, expected) == "a string" && quotable {
                message.push_str(&format!(
                    " (a value that reads as a number or boolean is a string in quotes: {}='\"…\"')",
                    env_name(&path)
                ));
            }
            message
        }
        _ => {
            let place = match (&origin, file) {
                (Origin::File(path), _) => format!(" (in {})", path.display()),
                (Origin::Other, Some(file)) => format!(" (in {})", file.display()),
                _ => String::new(),
            };
            if path.is_empty() {
                format!("{}{place}", error.kind)
            } else {
                format!("`{path}`: {}{}", error.kind, origin.place(&path))
            }
        }
    }
}

/// All load errors of `error`, one a line.
pub fn explain(error: figment::Error, file: Option<&Path>) -> String {
    let known = known_keys();
    error
        .into_iter()
        .map(|e| explain_one(&e, file, &known))
        .collect::<Vec<_>>()
        .join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn edit_distance_counts_edits() {
        assert_eq!(edit_distance("serial_numebr", "serial_number"), 2);
        assert_eq!(edit_distance("auth_mode", "auth.mode"), 1);
        assert_eq!(edit_distance("", "abc"), 3);
        assert_eq!(edit_distance("abc", "abc"), 0);
    }

    #[test]
    fn known_keys_include_nested_ones() {
        let known = known_keys();
        for key in [
            "serial_number",
            "auth",
            "auth.mode",
            "log.level",
            "license_file",
        ] {
            assert!(known.iter().any(|k| k == key), "{key} in {known:?}");
        }
        assert_eq!(
            nearest("auth_mdoe", &known).as_deref(),
            Some("auth.mode"),
            "a nested key written with `_`"
        );
        assert_eq!(nearest("something_else_entirely", &known), None);
    }
}
