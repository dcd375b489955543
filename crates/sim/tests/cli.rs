//! The `licensing-sim` binary as scripts and the service's tests run it: the key it
//! prints is the one `public-key` prints, and `serve` announces its key and address.
//! (Its protocol against the service's licensing-server client is tested in the
//! service's `tests/licensing_sim.rs`.)

use std::io::{BufRead as _, BufReader};
use std::process::{Command, Stdio};

const BIN: &str = env!("CARGO_BIN_EXE_licensing-sim");

#[test]
fn public_key_is_stable_and_serve_announces_it() {
    let state = tempfile::tempdir().unwrap();
    let key = || {
        let out = Command::new(BIN)
            .args(["public-key", "--state"])
            .arg(state.path())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap().trim().to_owned()
    };
    let first = key();
    assert_eq!(first.len(), 44, "a base64 Ed25519 key: {first:?}");
    assert_eq!(key(), first, "the key is created once and kept");

    let mut child = Command::new(BIN)
        .args(["serve", "--listen", "127.0.0.1:0", "--state"])
        .arg(state.path())
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let announced = lines.next().unwrap().unwrap();
    let listening = lines.next().unwrap().unwrap();
    child.kill().unwrap();
    child.wait().unwrap();
    assert_eq!(announced, format!("vendor_public_key={first}"));
    assert!(
        listening.starts_with("listening on 127.0.0.1:"),
        "{listening}"
    );
}

#[test]
fn an_unknown_command_fails_with_usage() {
    let out = Command::new(BIN).arg("frobnicate").output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("Usage"));
}
