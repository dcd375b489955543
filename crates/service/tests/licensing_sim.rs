//! The development licensing server `licensing-sim`, run as the real binary, and
//! the service's network client `GrpcLicensingServer` talking to it: signed
//! documents, activation, error classification, faults, persistence, TLS and the
//! admin command line.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use chrono::{DateTime, Utc};
use comtrexx_licensing::domain::initcode::InitializationCode;
use comtrexx_licensing::domain::license::parse_public_key;
use comtrexx_licensing::domain::signed_tryout::{TryoutQuestion, VendorTryout, new_nonce};
use comtrexx_licensing::domain::{
    Edition, Feature, LicensePayload, LicenseRejection, SerialNumber, SignedLicense, SignedTryout,
    TryoutPolicy, TryoutRejection,
};
use comtrexx_licensing::grpc::vendor_pb::{self as pb, Fault};
use comtrexx_licensing::upstream::grpc::GrpcLicensingServer;
use comtrexx_licensing::upstream::{LicensingServer, UpstreamError};
use comtrexx_licensing_test_support::vendor::{self, Admin, redeem_until, register, set_fault};
use ed25519_dalek::VerifyingKey;

mod common;

use common::SimProcess;

/// The simulator binary of this build (see `sim_binary`).
fn bin() -> std::path::PathBuf {
    common::sim_binary()
}

/// A running `licensing-sim` with how to reach it (plain or TLS); killed on drop.
struct Sim {
    process: SimProcess,
    port: u16,
    public_key: String,
    scheme: &'static str,
    host: &'static str,
}

impl Sim {
    fn start(state: &Path) -> Self {
        Self::start_with(state, &[])
    }

    fn start_with(state: &Path, extra: &[&str]) -> Self {
        let process = SimProcess::start(state, extra);
        let tls = extra.contains(&"--tls-cert");
        Self {
            port: process.port,
            public_key: process.public_key.clone(),
            process,
            scheme: if tls { "https" } else { "http" },
            // The test certificate is for "localhost".
            host: if tls { "localhost" } else { "127.0.0.1" },
        }
    }

    fn url(&self) -> String {
        format!("{}://{}:{}", self.scheme, self.host, self.port)
    }

    fn key(&self) -> VerifyingKey {
        parse_public_key(&self.public_key).unwrap()
    }

    fn upstream(&self) -> GrpcLicensingServer {
        GrpcLicensingServer::new(&self.url(), None, Duration::from_secs(5)).unwrap()
    }

    async fn admin(&self) -> Admin {
        vendor::admin(self.url()).await
    }

    fn stop(&mut self) {
        self.process.kill();
    }
}

fn serial(s: &str) -> SerialNumber {
    SerialNumber::parse(s).unwrap()
}

fn state_dir() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("sim");
    (dir, state)
}

async fn fetch_verified(sim: &Sim, s: &str, edition: Edition) -> LicensePayload {
    let text = sim.upstream().fetch_license(&serial(s)).await.unwrap();
    SignedLicense::from_json(&text)
        .unwrap()
        .verify(&sim.key(), &serial(s), edition)
        .unwrap()
}

/// Asks `upstream` to start the tryout of `s` at `at` with a fresh nonce and
/// verifies the signed answer with the simulator's key, as the service does.
async fn start_tryout_verified(
    sim: &Sim,
    upstream: &GrpcLicensingServer,
    s: &str,
    at: DateTime<Utc>,
) -> Result<Result<VendorTryout, TryoutRejection>, UpstreamError> {
    let nonce = new_nonce();
    let claim = upstream
        .start_tryout(&serial(s), at, &nonce)
        .await?
        .expect("the licensing server keeps tryout records");
    let question = TryoutQuestion {
        serial: &serial(s),
        nonce: &nonce,
        now: Utc::now(),
        policy: TryoutPolicy::default(),
    };
    Ok(SignedTryout::from_json(&claim.signed_tryout)
        .and_then(|signed| signed.verify(&sim.key(), &question)))
}

#[tokio::test]
async fn fetch_returns_a_signed_document_with_the_purchased_quantities() {
    let (_dir, state) = state_dir();
    let sim = Sim::start(&state);
    let mut admin = sim.admin().await;
    register(&mut admin, "0123456789AB", pb::Edition::Business).await;
    let expiry: DateTime<Utc> = "2099-06-01T00:00:00Z".parse().unwrap();
    redeem_until(&mut admin, "0123456789AB", "user", 10, None).await;
    redeem_until(&mut admin, "0123456789AB", "user", 5, Some(expiry)).await;
    redeem_until(&mut admin, "0123456789AB", "system_activation", 1, None).await;
    redeem_until(&mut admin, "0123456789AB", "call_assist", 2, None).await;
    // Expired: not in the document.
    redeem_until(
        &mut admin,
        "0123456789AB",
        "call_assist",
        50,
        Some("2020-01-01T00:00:00Z".parse().unwrap()),
    )
    .await;

    let before = Utc::now();
    let p = fetch_verified(&sim, "0123456789AB", Edition::Business).await;
    let user = p.entitlement(Feature::User).unwrap();
    assert_eq!((user.quantity, user.expires_at), (15, Some(expiry)));
    assert_eq!(
        p.entitlement(Feature::SystemActivation).unwrap().quantity,
        1
    );
    assert_eq!(p.entitlement(Feature::CallAssist).unwrap().quantity, 2);
    assert_eq!(p.entitlements.len(), 3);
    assert_eq!(p.nonce, None);
    assert!(p.issued_at >= before - chrono::Duration::seconds(1));
    assert_eq!(sim.upstream().describe(), sim.url());
}

#[tokio::test]
async fn refusals_are_conclusive() {
    let (_dir, state) = state_dir();
    let sim = Sim::start(&state);
    let upstream = sim.upstream();
    let err = upstream
        .fetch_license(&serial("UNKNOWN1"))
        .await
        .unwrap_err();
    assert!(
        matches!(err, UpstreamError::Conclusive(ref m) if m.contains("NotFound")),
        "{err:?}"
    );
    let err = upstream.activate("CTX1-NOT-A-CODE").await.unwrap_err();
    assert!(matches!(err, UpstreamError::Conclusive(_)), "{err:?}");
    let code = InitializationCode::new(serial("UNKNOWN1"), Edition::Vm).encode();
    let err = upstream.activate(&code).await.unwrap_err();
    assert!(matches!(err, UpstreamError::Conclusive(_)), "{err:?}");
    let err = upstream
        .report_tryout(&serial("UNKNOWN1"), Utc::now())
        .await
        .unwrap_err();
    assert!(matches!(err, UpstreamError::Conclusive(_)), "{err:?}");
}

#[tokio::test]
async fn activation_answers_the_codes_nonce() {
    let (_dir, state) = state_dir();
    let sim = Sim::start(&state);
    let mut admin = sim.admin().await;
    register(&mut admin, "VM-0001", pb::Edition::Vm).await;
    redeem_until(&mut admin, "VM-0001", "user", 4, None).await;
    let upstream = sim.upstream();

    let code = InitializationCode::new(serial("VM-0001"), Edition::Vm);
    let text = upstream.activate(&code.encode()).await.unwrap();
    let p = SignedLicense::from_json(&text)
        .unwrap()
        .verify(&sim.key(), &serial("VM-0001"), Edition::Vm)
        .unwrap();
    assert_eq!(p.nonce.as_deref(), Some(code.nonce.as_str()));
    assert_eq!(p.entitlement(Feature::User).unwrap().quantity, 4);

    // A code of another edition than the registered one.
    let other = InitializationCode::new(serial("VM-0001"), Edition::Advanced).encode();
    let err = upstream.activate(&other).await.unwrap_err();
    assert!(
        matches!(err, UpstreamError::Conclusive(ref m) if m.contains("FailedPrecondition")),
        "{err:?}"
    );

    // The portal's "recreate certificate" gives the same kind of answer.
    let code = InitializationCode::new(serial("VM-0001"), Edition::Vm);
    let r = admin
        .recreate_certificate(pb::RecreateCertificateRequest {
            serial_number: "VM-0001".into(),
            initialization_code: code.encode(),
        })
        .await
        .unwrap()
        .into_inner();
    let p = SignedLicense::from_json(&r.activation_response)
        .unwrap()
        .verify(&sim.key(), &serial("VM-0001"), Edition::Vm)
        .unwrap();
    assert_eq!(p.nonce, Some(code.nonce));
    let wrong_serial = admin
        .recreate_certificate(pb::RecreateCertificateRequest {
            serial_number: "VM-0002".into(),
            initialization_code: InitializationCode::new(serial("VM-0001"), Edition::Vm).encode(),
        })
        .await
        .unwrap_err();
    assert_eq!(wrong_serial.code(), tonic::Code::InvalidArgument);
}

#[tokio::test]
async fn faults_are_classified_and_caught() {
    let (_dir, state) = state_dir();
    let sim = Sim::start(&state);
    let mut admin = sim.admin().await;
    register(&mut admin, "S1", pb::Edition::Vm).await;
    redeem_until(&mut admin, "S1", "user", 3, None).await;
    let upstream = sim.upstream();
    let s1 = serial("S1");
    let code = InitializationCode::new(s1.clone(), Edition::Vm).encode();

    for fault in [Fault::Unavailable, Fault::Internal] {
        set_fault(&mut admin, fault).await;
        let err = upstream.fetch_license(&s1).await.unwrap_err();
        assert!(
            matches!(err, UpstreamError::Transient(_)),
            "{fault:?}: {err:?}"
        );
        let err = upstream.activate(&code).await.unwrap_err();
        assert!(
            matches!(err, UpstreamError::Transient(_)),
            "{fault:?}: {err:?}"
        );
        let err = upstream.report_tryout(&s1, Utc::now()).await.unwrap_err();
        assert!(
            matches!(err, UpstreamError::Transient(_)),
            "{fault:?}: {err:?}"
        );
    }

    set_fault(&mut admin, Fault::BadSignature).await;
    for text in [
        upstream.fetch_license(&s1).await.unwrap(),
        upstream.activate(&code).await.unwrap(),
    ] {
        let doc = SignedLicense::from_json(&text).unwrap();
        assert_eq!(
            doc.verify(&sim.key(), &s1, Edition::Vm),
            Err(LicenseRejection::BadSignature)
        );
    }

    set_fault(&mut admin, Fault::WrongSerial).await;
    let doc = SignedLicense::from_json(&upstream.fetch_license(&s1).await.unwrap()).unwrap();
    assert!(matches!(
        doc.verify(&sim.key(), &s1, Edition::Vm),
        Err(LicenseRejection::WrongSerial { ref found, .. }) if found == "WRONG-SERIAL"
    ));

    set_fault(&mut admin, Fault::None).await;
    let p = fetch_verified(&sim, "S1", Edition::Vm).await;
    assert_eq!(p.entitlement(Feature::User).unwrap().quantity, 3);
}

#[tokio::test]
async fn a_stopped_sim_is_transient() {
    let (_dir, state) = state_dir();
    let mut sim = Sim::start(&state);
    let mut admin = sim.admin().await;
    register(&mut admin, "S1", pb::Edition::Vm).await;
    let upstream = sim.upstream();
    fetch_verified(&sim, "S1", Edition::Vm).await;
    sim.stop();
    let started = std::time::Instant::now();
    let err = upstream.fetch_license(&serial("S1")).await.unwrap_err();
    assert!(matches!(err, UpstreamError::Transient(_)), "{err:?}");
    assert!(started.elapsed() < Duration::from_secs(6));
    // A client that never reached it fails the same way.
    let fresh = sim.upstream();
    let err = fresh
        .report_tryout(&serial("S1"), Utc::now())
        .await
        .unwrap_err();
    assert!(matches!(err, UpstreamError::Transient(_)), "{err:?}");
}

#[tokio::test]
async fn a_tryout_start_is_recorded_once_and_survives_a_restart() {
    let (_dir, state) = state_dir();
    let mut sim = Sim::start(&state);
    let mut admin = sim.admin().await;
    register(&mut admin, "S1", pb::Edition::Vm).await;
    let first: DateTime<Utc> = "2026-03-01T10:00:00.123456789Z".parse().unwrap();
    let claim = start_tryout_verified(&sim, &sim.upstream(), "S1", first)
        .await
        .unwrap()
        .unwrap();
    let fourteen_days = chrono::Duration::days(14);
    assert_eq!(
        (claim.started_at, claim.ends_at, claim.recorded),
        (first, first + fourteen_days, true)
    );
    sim.stop();
    let sim = Sim::start(&state);
    let upstream = sim.upstream();
    let again = start_tryout_verified(&sim, &upstream, "S1", Utc::now())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (again.started_at, again.ends_at, again.recorded),
        (first, first + fourteen_days, false)
    );
    let unknown = start_tryout_verified(&sim, &upstream, "UNKNOWN1", Utc::now())
        .await
        .unwrap_err();
    assert!(
        matches!(unknown, UpstreamError::Conclusive(_)),
        "{unknown:?}"
    );
    // The document faults apply to the signed tryout answer too.
    let mut admin = sim.admin().await;
    set_fault(&mut admin, Fault::BadSignature).await;
    assert_eq!(
        start_tryout_verified(&sim, &upstream, "S1", Utc::now())
            .await
            .unwrap(),
        Err(TryoutRejection::BadSignature)
    );
    set_fault(&mut admin, Fault::WrongSerial).await;
    assert!(matches!(
        start_tryout_verified(&sim, &upstream, "S1", Utc::now())
            .await
            .unwrap(),
        Err(TryoutRejection::WrongSerial { .. })
    ));
    let mut admin = sim.admin().await;
    set_fault(&mut admin, Fault::Unavailable).await;
    let down = start_tryout_verified(&sim, &upstream, "S1", Utc::now())
        .await
        .unwrap_err();
    assert!(matches!(down, UpstreamError::Transient(_)), "{down:?}");
}

#[tokio::test]
async fn state_and_key_survive_a_restart() {
    let (_dir, state) = state_dir();
    let mut sim = Sim::start(&state);
    let mut admin = sim.admin().await;
    register(&mut admin, "S1", pb::Edition::Advanced).await;
    redeem_until(&mut admin, "S1", "user", 7, None).await;
    redeem_until(&mut admin, "S1", "system_activation", 1, None).await;
    let tryout: DateTime<Utc> = "2026-03-01T10:00:00Z".parse().unwrap();
    // (An Advanced PBX has no tryout; the simulator records what it is told.)
    sim.upstream()
        .report_tryout(&serial("S1"), tryout)
        .await
        .unwrap();
    let devices_before = admin
        .list_devices(pb::ListDevicesRequest {})
        .await
        .unwrap()
        .into_inner()
        .devices;
    let key_before = sim.public_key.clone();
    sim.stop();
    assert!(state.join("state.json").exists() && state.join("signing.key").exists());
    assert!(!state.join("state.json.tmp").exists());

    let sim = Sim::start(&state);
    assert_eq!(sim.public_key, key_before);
    let mut admin = sim.admin().await;
    let devices_after = admin
        .list_devices(pb::ListDevicesRequest {})
        .await
        .unwrap()
        .into_inner()
        .devices;
    assert_eq!(devices_after, devices_before);
    assert_eq!(devices_after.len(), 1);
    assert_eq!(
        devices_after[0].tryout_started_at,
        Some(comtrexx_licensing::upstream::grpc::timestamp(tryout))
    );
    let p = fetch_verified(&sim, "S1", Edition::Advanced).await;
    assert_eq!(p.entitlement(Feature::User).unwrap().quantity, 7);
    // The public-key command prints the same key.
    let out = Command::new(bin())
        .args(["public-key", "--state"])
        .arg(&state)
        .output()
        .unwrap();
    assert!(out.status.success());
    assert_eq!(String::from_utf8(out.stdout).unwrap().trim(), key_before);
}

#[tokio::test]
async fn stats_count_the_licensing_calls() {
    let (_dir, state) = state_dir();
    let sim = Sim::start(&state);
    let mut admin = sim.admin().await;
    register(&mut admin, "S1", pb::Edition::Vm).await;
    register(&mut admin, "S2", pb::Edition::Vm).await;
    let upstream = sim.upstream();
    for _ in 0..3 {
        upstream.fetch_license(&serial("S1")).await.unwrap();
    }
    upstream.fetch_license(&serial("S2")).await.unwrap();
    upstream
        .activate(&InitializationCode::new(serial("S1"), Edition::Vm).encode())
        .await
        .unwrap();
    upstream
        .report_tryout(&serial("S1"), Utc::now())
        .await
        .unwrap();
    let claim = start_tryout_verified(&sim, &upstream, "S1", Utc::now())
        .await
        .unwrap()
        .unwrap();
    // Reported before: the first report is the start it keeps.
    assert!(!claim.recorded);
    let stats = admin
        .get_stats(pb::GetStatsRequest {})
        .await
        .unwrap()
        .into_inner()
        .serials;
    assert_eq!(
        stats,
        vec![
            pb::SerialStats {
                serial_number: "S1".into(),
                activate_calls: 1,
                fetch_license_calls: 3,
                report_tryout_calls: 1,
                start_tryout_calls: 1,
            },
            pb::SerialStats {
                serial_number: "S2".into(),
                activate_calls: 0,
                fetch_license_calls: 1,
                report_tryout_calls: 0,
                start_tryout_calls: 0,
            },
        ]
    );
}

#[tokio::test]
async fn tls_with_a_private_ca() {
    let (dir, state) = state_dir();
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    let cert_path = dir.path().join("cert.pem");
    let key_path = dir.path().join("key.pem");
    std::fs::write(&cert_path, cert.cert.pem()).unwrap();
    std::fs::write(&key_path, cert.signing_key.serialize_pem()).unwrap();
    let sim = Sim::start_with(
        &state,
        &[
            "--tls-cert",
            cert_path.to_str().unwrap(),
            "--tls-key",
            key_path.to_str().unwrap(),
        ],
    );
    assert!(sim.url().starts_with("https://localhost:"));

    // The admin command line, over TLS with the same CA.
    let out = Command::new(bin())
        .args(["admin", "--server", &sim.url(), "--ca-file"])
        .arg(&cert_path)
        .args([
            "register-device",
            "--serial",
            "S1",
            "--name",
            "lab",
            "--edition",
            "vm",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let upstream =
        GrpcLicensingServer::new(&sim.url(), Some(&cert_path), Duration::from_secs(5)).unwrap();
    let text = upstream.fetch_license(&serial("S1")).await.unwrap();
    SignedLicense::from_json(&text)
        .unwrap()
        .verify(&sim.key(), &serial("S1"), Edition::Vm)
        .unwrap();

    // Without the CA (public web roots only) the certificate is not trusted.
    let untrusted = sim.upstream();
    let err = untrusted.fetch_license(&serial("S1")).await.unwrap_err();
    assert!(matches!(err, UpstreamError::Transient(_)), "{err:?}");
    // Plain HTTP/2 to a TLS port fails too.
    let plain = GrpcLicensingServer::new(
        &format!("http://127.0.0.1:{}", sim.port),
        None,
        Duration::from_secs(2),
    )
    .unwrap();
    assert!(matches!(
        plain.fetch_license(&serial("S1")).await,
        Err(UpstreamError::Transient(_))
    ));
}

/// Runs `licensing-sim admin --server URL ARGS...` and returns its stdout.
fn admin_cli(sim: &Sim, args: &[&str]) -> String {
    let out = Command::new(bin())
        .args(["admin", "--server", &sim.url()])
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[tokio::test]
async fn the_admin_command_line() {
    let (_dir, state) = state_dir();
    let sim = Sim::start(&state);
    admin_cli(
        &sim,
        &[
            "register-device",
            "--serial",
            "S1",
            "--name",
            "office",
            "--edition",
            "business",
        ],
    );
    let device: serde_json::Value = serde_json::from_str(&admin_cli(
        &sim,
        &[
            "redeem-voucher",
            "--serial",
            "S1",
            "--feature",
            "user",
            "--quantity",
            "10",
            "--expires-at",
            "2099-01-01T00:00:00Z",
        ],
    ))
    .unwrap();
    assert_eq!(device["licenses"][0]["quantity"], 10);
    admin_cli(
        &sim,
        &[
            "redeem-voucher",
            "--serial",
            "S1",
            "--feature",
            "system_activation",
            "--quantity",
            "1",
        ],
    );
    admin_cli(
        &sim,
        &[
            "revoke",
            "--serial",
            "S1",
            "--feature",
            "user",
            "--quantity",
            "4",
        ],
    );
    let list: serde_json::Value =
        serde_json::from_str(&admin_cli(&sim, &["list-devices"])).unwrap();
    let d = &list["devices"][0];
    assert_eq!(
        (
            d["serial_number"].as_str(),
            d["name"].as_str(),
            d["edition"].as_str()
        ),
        (Some("S1"), Some("office"), Some("business"))
    );
    assert_eq!(d["licenses"][0]["feature"], "user");
    assert_eq!(d["licenses"][0]["quantity"], 6);
    assert_eq!(d["licenses"][0]["expires_at"], "2099-01-01T00:00:00Z");

    // Re-setup: the PBX shows a code (here: `init-code` stands in for it), the
    // portal answers, the PBX checks the answer.
    let out = Command::new(bin())
        .args(["init-code", "--serial", "S1", "--edition", "business"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let code = InitializationCode::decode(&String::from_utf8(out.stdout).unwrap()).unwrap();
    assert_eq!(
        (code.serial.as_str(), code.edition),
        ("S1", Edition::Business)
    );
    let response = admin_cli(
        &sim,
        &[
            "recreate-certificate",
            "--serial",
            "S1",
            "--code",
            &code.encode(),
        ],
    );
    let p = SignedLicense::from_json(response.trim())
        .unwrap()
        .verify(&sim.key(), &serial("S1"), Edition::Business)
        .unwrap();
    assert_eq!(p.nonce, Some(code.nonce));
    assert_eq!(p.entitlement(Feature::User).unwrap().quantity, 6);

    admin_cli(&sim, &["fault", "unavailable"]);
    assert!(matches!(
        sim.upstream().fetch_license(&serial("S1")).await,
        Err(UpstreamError::Transient(_))
    ));
    admin_cli(&sim, &["fault", "none"]);
    fetch_verified(&sim, "S1", Edition::Business).await;
    let stats: serde_json::Value = serde_json::from_str(&admin_cli(&sim, &["stats"])).unwrap();
    assert_eq!(stats["serials"][0]["fetch_license_calls"], 2);

    // Refusals exit non-zero with the reason.
    let out = Command::new(bin())
        .args([
            "admin",
            "--server",
            &sim.url(),
            "redeem-voucher",
            "--serial",
            "S1",
            "--feature",
            "fax",
            "--quantity",
            "1",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("InvalidArgument"));
}

#[tokio::test]
async fn a_concurrent_voucher_is_signed_as_such_and_reported_usage_is_kept() {
    use comtrexx_licensing::domain::SeatModel;
    use comtrexx_licensing::upstream::UsagePeak;
    let (_dir, state) = state_dir();
    let mut sim = Sim::start(&state);
    admin_cli(
        &sim,
        &["register-device", "--serial", "S1", "--edition", "vm"],
    );
    let device: serde_json::Value = serde_json::from_str(&admin_cli(
        &sim,
        &[
            "redeem-voucher",
            "--serial",
            "S1",
            "--feature",
            "user",
            "--quantity",
            "20",
            "--seat-model",
            "concurrent",
        ],
    ))
    .unwrap();
    assert_eq!(device["licenses"][0]["seat_model"], "concurrent");
    admin_cli(
        &sim,
        &[
            "redeem-voucher",
            "--serial",
            "S1",
            "--feature",
            "call_assist",
            "--quantity",
            "2",
        ],
    );
    let p = fetch_verified(&sim, "S1", Edition::Vm).await;
    assert_eq!(p.seat_model(Feature::User), SeatModel::Concurrent);
    assert_eq!(p.seat_model(Feature::CallAssist), SeatModel::Assigned);
    // A later voucher without a seat model keeps the feature's.
    admin_cli(
        &sim,
        &[
            "redeem-voucher",
            "--serial",
            "S1",
            "--feature",
            "user",
            "--quantity",
            "5",
        ],
    );
    let p = fetch_verified(&sim, "S1", Edition::Vm).await;
    assert_eq!(p.entitlement(Feature::User).unwrap().quantity, 25);
    assert_eq!(p.seat_model(Feature::User), SeatModel::Concurrent);

    // The PBX reports its daily peaks with a reconcile; a day reported again
    // keeps the larger numbers, and the record survives a restart.
    let peak = |day: &str, peak_in_use: u32, busy: u64| UsagePeak {
        feature: "user".into(),
        day: day.into(),
        peak_in_use,
        capacity: 20,
        busy,
    };
    let upstream = sim.upstream();
    upstream
        .fetch_license_reporting(
            &serial("S1"),
            &[peak("2026-12-06", 17, 0), peak("2026-12-07", 20, 3)],
        )
        .await
        .unwrap();
    upstream
        .fetch_license_reporting(&serial("S1"), &[peak("2026-12-07", 12, 1)])
        .await
        .unwrap();
    sim.stop();
    let sim = Sim::start(&state);
    let list: serde_json::Value =
        serde_json::from_str(&admin_cli(&sim, &["list-devices"])).unwrap();
    let usage = &list["devices"][0]["usage"];
    assert_eq!(usage.as_array().unwrap().len(), 2, "{usage}");
    assert_eq!(usage[0]["day"], "2026-12-06");
    assert_eq!(usage[0]["peak_in_use"], 17);
    assert_eq!(
        (
            usage[1]["day"].as_str(),
            usage[1]["peak_in_use"].as_u64(),
            usage[1]["busy"].as_u64()
        ),
        (Some("2026-12-07"), Some(20), Some(3))
    );
}
