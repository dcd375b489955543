//! End to end over gRPC: the service on a private Redis, with the development
//! licensing server `licensing-sim` running as a separate process. Covers the
//! initialization flow (copy and paste through the portal's "recreate
//! certificate", and online), responses that must be rejected, re-setup, grace
//! and lapse while the licensing server is down, the reconcile schedule across
//! two replicas, capacity drops, and events seen on another replica.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use chrono::{DateTime, DurationRound as _, Utc};
use common::*;
use comtrexx_licensing::config::{RawConfig, RawLicensingServer};
use comtrexx_licensing::domain::initcode::InitializationCode;
use comtrexx_licensing::domain::{Clock as _, Edition, ManualClock, SerialNumber};
use comtrexx_licensing::grpc::pb;
use comtrexx_licensing::grpc::vendor_pb::{self as vpb, Fault};
use comtrexx_licensing::upstream::grpc::from_timestamp;
use tonic::{Code, Status, Streaming};

/// Upper bound for anything the tests wait for.
const WAIT: Duration = Duration::from_secs(10);

use comtrexx_licensing_test_support::vendor::{
    Admin, recreate, redeem, redeem_concurrent, register, revoke, set_fault, stats,
};

// ---------------------------------------------------------------------------
// The licensing server: `licensing-sim serve` as a process
// ---------------------------------------------------------------------------

/// A running `licensing-sim` with a state directory of its own, killed on drop.
struct Sim {
    process: SimProcess,
    _dir: tempfile::TempDir,
}

impl Sim {
    fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        Self {
            process: SimProcess::start(&dir.path().join("sim"), &[]),
            _dir: dir,
        }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.process.port)
    }

    async fn admin(&self) -> Admin {
        comtrexx_licensing_test_support::vendor::admin(self.url()).await
    }

    /// Kills the process (SIGKILL): the licensing server is gone.
    fn kill(&mut self) {
        self.process.kill();
    }

    /// Starts it again on the same port, with the same state and key.
    fn restart(&mut self) {
        self.process.restart();
    }
}

// ---------------------------------------------------------------------------
// The service
// ---------------------------------------------------------------------------

/// A service config on `redis` that reconciles with `sim` and trusts its key.
fn sim_config(redis: &RedisServer, sim: &Sim, serial: &str, edition: Edition) -> RawConfig {
    without_load_limits(RawConfig {
        edition: edition.as_str().into(),
        vendor_public_key: Some(sim.process.public_key.clone()),
        licensing_server: RawLicensingServer {
            url: Some(sim.url()),
            ca_file: None,
            timeout_ms: 1000,
        },
        // The simulator over plain http.
        development_installation: true,
        ..config(Some(redis), serial)
    })
}

/// A manual clock on a whole second (stored times round-trip exactly).
fn clock() -> ManualClock {
    ManualClock::new(
        Utc::now()
            .duration_trunc(chrono::Duration::seconds(1))
            .unwrap(),
    )
}

async fn start_on(config: RawConfig, clock: &ManualClock) -> (TestServer, Client) {
    let server = TestServer::start_with_clock(config, Arc::new(clock.clone())).await;
    let client = server.client().await;
    (server, client)
}

/// The overview, without `clock_skew_ms`: the manual clock stands still while
/// Redis's (the reference) runs on, so the skew differs between two overviews
/// of the same state.
async fn overview(c: &mut Client) -> pb::GetLicenseOverviewResponse {
    let mut o = common::overview(c).await;
    o.clock_skew_ms = 0;
    o
}

async fn create_code(c: &mut Client) -> String {
    c.create_initialization_code(pb::CreateInitializationCodeRequest {})
        .await
        .expect("CreateInitializationCode")
        .into_inner()
        .initialization_code
}

async fn apply(c: &mut Client, response: &str) -> Result<pb::GetLicenseOverviewResponse, Status> {
    c.apply_activation(pb::ApplyActivationRequest {
        activation_response: response.into(),
    })
    .await
    .map(|r| r.into_inner().overview.expect("overview"))
}

fn tryout_state(o: &pb::GetLicenseOverviewResponse) -> pb::TryoutState {
    o.tryout.as_ref().expect("tryout").state()
}

/// (feature, quantity, in use), sorted by feature.
fn entitlements(list: &[pb::Entitlement]) -> Vec<(String, u32, u32)> {
    let mut v: Vec<_> = list
        .iter()
        .map(|e| (e.feature.clone(), e.quantity, e.in_use))
        .collect();
    v.sort();
    v
}

fn ent(feature: &str, quantity: u32, in_use: u32) -> (String, u32, u32) {
    (feature.to_owned(), quantity, in_use)
}

fn time(ts: Option<&prost_types::Timestamp>) -> DateTime<Utc> {
    from_timestamp(ts.expect("timestamp set")).expect("timestamp in range")
}

fn code_of(e: Result<impl std::fmt::Debug, Status>) -> Code {
    match e {
        Ok(v) => panic!("expected an error, got {v:?}"),
        Err(s) => s.code(),
    }
}

/// Copy and paste: a code from the service, the portal's answer, back to the service.
async fn activate_by_paste(
    c: &mut Client,
    admin: &mut Admin,
    serial: &str,
) -> pb::GetLicenseOverviewResponse {
    let code = create_code(c).await;
    let response = recreate(admin, serial, &code).await;
    apply(c, &response).await.expect("ApplyActivation")
}

/// Flips one byte of the signed payload (a quantity), keeping the signature.
fn tampered(response: &str) -> String {
    let mut doc: serde_json::Value = serde_json::from_str(response).unwrap();
    let mut payload = B64.decode(doc["payload"].as_str().unwrap()).unwrap();
    let at = payload
        .windows(11)
        .position(|w| w == b"\"quantity\":")
        .expect("payload has a quantity")
        + 11;
    payload[at] ^= 0x08; // '5' becomes '=', '1' becomes '9', ...
    doc["payload"] = B64.encode(&payload).into();
    serde_json::to_string(&doc).unwrap()
}

/// The next event of `kind` on `stream` (others are skipped), within `WAIT`.
async fn next_event(
    stream: &mut Streaming<pb::WatchLicenseEventsResponse>,
    kind: &str,
) -> pb::WatchLicenseEventsResponse {
    let wait = async {
        loop {
            let event = stream
                .message()
                .await
                .expect("event stream")
                .expect("stream open");
            if event.kind == kind {
                return event;
            }
        }
    };
    tokio::time::timeout(WAIT, wait)
        .await
        .unwrap_or_else(|_| panic!("no {kind} event within {WAIT:?}"))
}

/// A VM PBX registered at a running licensing server, with `licenses`
/// redeemed for it, served by one replica on a manual clock (`configure`
/// adjusts the replica's configuration). Not activated yet.
struct Pbx {
    _redis: RedisServer,
    sim: Sim,
    admin: Admin,
    serial: String,
    clock: ManualClock,
    _server: TestServer,
    c: Client,
}

async fn pbx(
    tag: &str,
    licenses: &[(&str, u32)],
    configure: impl FnOnce(RawConfig) -> RawConfig,
) -> Pbx {
    let redis = RedisServer::start();
    let sim = Sim::start();
    let mut admin = sim.admin().await;
    let serial = serial(tag);
    register(&mut admin, &serial, vpb::Edition::Vm).await;
    for (feature, quantity) in licenses {
        redeem(&mut admin, &serial, feature, *quantity).await;
    }
    let clock = clock();
    let config = configure(sim_config(&redis, &sim, &serial, Edition::Vm));
    let (server, c) = start_on(config, &clock).await;
    Pbx {
        _redis: redis,
        sim,
        admin,
        serial,
        clock,
        _server: server,
        c,
    }
}

impl Pbx {
    /// Activates by paste and assigns `users` a user seat; returns when the
    /// licensing server confirmed the license.
    async fn activate(&mut self, users: &[&str]) -> DateTime<Utc> {
        activate_by_paste(&mut self.c, &mut self.admin, &self.serial).await;
        for user in users {
            assigned(&mut self.c, user, "").await;
        }
        self.clock.now()
    }

    /// The licensing server goes away; a minute later a reconcile finds it unreachable.
    async fn lose_the_licensing_server(&mut self) -> pb::ReconcileResponse {
        self.sim.kill();
        // Time passes between the last success and the failing attempt.
        self.clock.advance(chrono::Duration::minutes(1));
        let r = reconcile(&mut self.c).await;
        assert_eq!(r.outcome(), pb::ReconcileOutcome::Unreachable);
        r
    }
}

// ---------------------------------------------------------------------------
// 1. Initialization
// ---------------------------------------------------------------------------

#[tokio::test]
async fn initialization_by_copy_and_paste_activates_the_purchased_licenses() {
    let Pbx {
        _redis,
        sim: _sim,
        mut admin,
        serial,
        clock: _clock,
        _server,
        mut c,
    } = pbx("init", &[("user", 5), ("call_assist", 2)], |c| c).await;

    let before = overview(&mut c).await;
    assert_eq!(
        before.activation_state(),
        pb::ActivationState::NotInitialized
    );
    assert!(before.entitlements.is_empty() && !before.system_activated);
    assert_eq!(tryout_state(&before), pb::TryoutState::Available);
    // Nothing to assign from yet (no license, no tryout).
    assert_eq!(
        code_of(assign(&mut c, "alice", "").await),
        Code::FailedPrecondition
    );

    let code = create_code(&mut c).await;
    let decoded = InitializationCode::decode(&code).expect("a decodable code");
    assert_eq!(
        (decoded.serial.as_str(), decoded.edition),
        (serial.as_str(), Edition::Vm)
    );
    let response = recreate(&mut admin, &serial, &code).await;
    let o = apply(&mut c, &response).await.expect("ApplyActivation");
    assert_eq!(o.activation_state(), pb::ActivationState::Active);
    assert!(o.system_activated);
    assert_eq!(
        entitlements(&o.entitlements),
        [ent("call_assist", 2, 0), ent("user", 5, 0)]
    );
    // Buying user licenses before ever starting the tryout forfeits it.
    assert_eq!(tryout_state(&o), pb::TryoutState::Unavailable);
    // The activation is followed by a reconcile with the licensing server.
    assert_eq!(stats(&mut admin, &serial).await.fetch_license_calls, 1);
    assert!(matches!(
        o.last_reconcile_outcome(),
        pb::ReconcileOutcome::Updated | pb::ReconcileOutcome::Unchanged
    ));

    let seat = assigned(&mut c, "alice", "").await.seat.unwrap();
    assert_eq!(seat.source(), pb::SeatSource::Purchased);
    assigned(&mut c, "alice", "call_assist").await;
    let alice = checked(&mut c, "alice", "").await;
    assert!(alice.licensed, "{alice:?}");
    assert_eq!(
        (alice.source(), alice.reason()),
        (pb::SeatSource::Purchased, pb::SeatReason::Assigned)
    );
    assert!(checked(&mut c, "alice", "call_assist").await.licensed);
    let o = overview(&mut c).await;
    assert_eq!(o.activation_state(), pb::ActivationState::Active);
    assert_eq!(
        entitlements(&o.entitlements),
        [ent("call_assist", 2, 1), ent("user", 5, 1)]
    );
}

#[tokio::test]
async fn online_activation_initializes_in_one_call() {
    let redis = RedisServer::start();
    let sim = Sim::start();
    let mut admin = sim.admin().await;
    let serial = serial("online");
    let clock = clock();
    let (_server, mut c) =
        start_on(sim_config(&redis, &sim, &serial, Edition::Business), &clock).await;

    // Not registered at the licensing server: a conclusive refusal.
    let refused = c.activate_online(pb::ActivateOnlineRequest {}).await;
    assert_eq!(code_of(refused), Code::FailedPrecondition);
    register(&mut admin, &serial, vpb::Edition::Business).await;
    redeem(&mut admin, &serial, "system_activation", 1).await;
    redeem(&mut admin, &serial, "user", 3).await;
    // The licensing server is down: nothing changes.
    set_fault(&mut admin, Fault::Unavailable).await;
    let down = c.activate_online(pb::ActivateOnlineRequest {}).await;
    assert_eq!(code_of(down), Code::Unavailable);
    assert_eq!(
        overview(&mut c).await.activation_state(),
        pb::ActivationState::NotInitialized
    );
    set_fault(&mut admin, Fault::None).await;

    let calls = stats(&mut admin, &serial).await.activate_calls;
    let o = c
        .activate_online(pb::ActivateOnlineRequest {})
        .await
        .expect("ActivateOnline")
        .into_inner()
        .overview
        .unwrap();
    assert_eq!(o.activation_state(), pb::ActivationState::Active);
    assert!(o.system_activated);
    assert_eq!(tryout_state(&o), pb::TryoutState::Unavailable);
    assert_eq!(
        entitlements(&o.entitlements),
        [ent("system_activation", 1, 1), ent("user", 3, 0)]
    );
    assert_eq!(stats(&mut admin, &serial).await.activate_calls, calls + 1);
    let seat = assigned(&mut c, "bob", "").await.seat.unwrap();
    assert_eq!(seat.source(), pb::SeatSource::Purchased);
    assert!(checked(&mut c, "bob", "").await.licensed);
}

// ---------------------------------------------------------------------------
// 2. Rejected responses change nothing
// ---------------------------------------------------------------------------

/// The overview without its version: the version moves with every write,
/// also with the initialization codes made here, which the overview does not show.
async fn licensing_state(c: &mut Client) -> pb::GetLicenseOverviewResponse {
    pb::GetLicenseOverviewResponse {
        version: 0,
        ..overview(c).await
    }
}

#[tokio::test]
async fn untrusted_stale_replayed_and_expired_responses_change_nothing() {
    let redis = RedisServer::start();
    let sim = Sim::start();
    let mut admin = sim.admin().await;
    let serial = serial("reject");
    let other = serial.replacen("T-", "O-", 1);
    register(&mut admin, &serial, vpb::Edition::Vm).await;
    register(&mut admin, &other, vpb::Edition::Vm).await;
    redeem(&mut admin, &serial, "user", 5).await;
    redeem(&mut admin, &other, "user", 50).await;
    let clock = clock();
    let config = RawConfig {
        initialization: comtrexx_licensing::config::RawInitialization {
            code_ttl_minutes: 10,
        },
        ..sim_config(&redis, &sim, &serial, Edition::Vm)
    };
    let (_server, mut c) = start_on(config, &clock).await;

    let initial = licensing_state(&mut c).await;
    assert_eq!(
        initial.activation_state(),
        pb::ActivationState::NotInitialized
    );
    let code_a = create_code(&mut c).await;
    let genuine_a = recreate(&mut admin, &serial, &code_a).await;

    let mut rejected = vec![("tampered payload", tampered(&genuine_a))];
    set_fault(&mut admin, Fault::BadSignature).await;
    rejected.push((
        "signed with another key",
        recreate(&mut admin, &serial, &code_a).await,
    ));
    set_fault(&mut admin, Fault::WrongSerial).await;
    rejected.push((
        "for another serial (fault)",
        recreate(&mut admin, &serial, &code_a).await,
    ));
    set_fault(&mut admin, Fault::None).await;
    // A genuine response for another registered device.
    let foreign_code =
        InitializationCode::new(SerialNumber::parse(&other).unwrap(), Edition::Vm).encode();
    rejected.push((
        "for another device",
        recreate(&mut admin, &other, &foreign_code).await,
    ));
    rejected.push(("not a response", "hello".to_owned()));
    for (what, response) in &rejected {
        assert_eq!(
            code_of(apply(&mut c, response).await),
            Code::InvalidArgument,
            "{what}"
        );
        assert_eq!(
            licensing_state(&mut c).await,
            initial,
            "{what} changed something"
        );
        assert!(seats(&mut c).await.is_empty());
    }

    // A newer code makes the response to the older one stale.
    let code_b = create_code(&mut c).await;
    let genuine_b = recreate(&mut admin, &serial, &code_b).await;
    assert_eq!(
        code_of(apply(&mut c, &genuine_a).await),
        Code::InvalidArgument
    );
    assert_eq!(licensing_state(&mut c).await, initial);

    // The response to the current code is accepted, once.
    let active = apply(&mut c, &genuine_b).await.expect("ApplyActivation");
    assert_eq!(active.activation_state(), pb::ActivationState::Active);
    assert_eq!(entitlements(&active.entitlements), [ent("user", 5, 0)]);
    assigned(&mut c, "alice", "").await;
    let active = overview(&mut c).await;
    for (what, response) in [("replayed", &genuine_b), ("stale", &genuine_a)] {
        assert_eq!(
            code_of(apply(&mut c, response).await),
            Code::InvalidArgument,
            "{what}"
        );
        assert_eq!(overview(&mut c).await, active, "{what} changed something");
    }

    // A response to a code older than initialization.code_ttl_minutes.
    let code_c = create_code(&mut c).await;
    let genuine_c = recreate(&mut admin, &serial, &code_c).await;
    clock.advance(chrono::Duration::minutes(11));
    let active = overview(&mut c).await;
    // Well formed, but the state moved on: FAILED_PRECONDITION, saying what to do.
    let expired = apply(&mut c, &genuine_c).await.unwrap_err();
    assert_eq!(expired.code(), Code::FailedPrecondition, "{expired:?}");
    assert!(
        expired.message().contains("expired") && expired.message().contains("create a new code"),
        "{expired:?}"
    );
    assert_eq!(overview(&mut c).await, active);
    assert_eq!(entitlements(&active.entitlements), [ent("user", 5, 1)]);
    let users = seat_holders(&mut c).await;
    assert_eq!(users, ["alice"]);
}

// ---------------------------------------------------------------------------
// 3. Re-setup, and the tryout across it
// ---------------------------------------------------------------------------

#[tokio::test]
async fn resetup_brings_every_license_back_and_the_tryout_stays_used() {
    let Pbx {
        _redis,
        sim: _sim,
        mut admin,
        serial,
        clock: _clock,
        _server,
        mut c,
    } = pbx("resetup", &[("user", 5), ("call_assist", 2)], |c| c).await;

    // Tryout first: a test seat.
    let t = start_tryout(&mut c).await.expect("StartTryout");
    assert_eq!(t.state(), pb::TryoutState::Active);
    assert_eq!(
        assigned(&mut c, "tester", "").await.seat.unwrap().source(),
        pb::SeatSource::Tryout
    );
    assert!(checked(&mut c, "tester", "").await.licensed);

    // Purchased user licenses arriving by activation end the tryout.
    let first_code = create_code(&mut c).await;
    let first_response = recreate(&mut admin, &serial, &first_code).await;
    let first = apply(&mut c, &first_response)
        .await
        .expect("ApplyActivation");
    assert_eq!(first.activation_state(), pb::ActivationState::Active);
    assert_eq!(tryout_state(&first), pb::TryoutState::Ended);
    let tester = checked(&mut c, "tester", "").await;
    assert!(!tester.licensed);
    assert_eq!(tester.reason(), pb::SeatReason::TryoutOver);
    let purchased = entitlements(&first.entitlements);
    assert_eq!(purchased, [ent("call_assist", 2, 0), ent("user", 5, 0)]);
    for user in ["a", "b", "c"] {
        assigned(&mut c, user, "").await;
    }
    assigned(&mut c, "a", "call_assist").await;
    assert_eq!(seats(&mut c).await.len(), 5);

    // Reset: back to the initial state, with the tryout record kept.
    let reset = c
        .reset_activation(pb::ResetActivationRequest {})
        .await
        .expect("ResetActivation")
        .into_inner()
        .overview
        .unwrap();
    for o in [reset, overview(&mut c).await] {
        assert_eq!(o.activation_state(), pb::ActivationState::NotInitialized);
        assert!(o.entitlements.is_empty() && !o.system_activated);
        assert_eq!(tryout_state(&o), pb::TryoutState::Ended);
        assert_eq!(
            o.last_reconcile_outcome(),
            pb::ReconcileOutcome::Unspecified
        );
    }
    assert!(seats(&mut c).await.is_empty());
    let a = checked(&mut c, "a", "").await;
    assert_eq!(
        (a.licensed, a.reason()),
        (false, pb::SeatReason::NotAssigned)
    );
    assert_eq!(
        code_of(start_tryout(&mut c).await),
        Code::FailedPrecondition
    );
    assert_eq!(
        code_of(assign(&mut c, "a", "").await),
        Code::FailedPrecondition
    );

    // The response of the first initialization does not bring anything back.
    assert_eq!(
        code_of(apply(&mut c, &first_response).await),
        Code::InvalidArgument
    );
    assert_eq!(
        overview(&mut c).await.activation_state(),
        pb::ActivationState::NotInitialized
    );

    // A new code, "recreate certificate", paste: everything purchased is back.
    let again = activate_by_paste(&mut c, &mut admin, &serial).await;
    assert_eq!(again.activation_state(), pb::ActivationState::Active);
    assert_eq!(entitlements(&again.entitlements), purchased);
    assert_eq!(tryout_state(&again), pb::TryoutState::Ended);
    assert_eq!(
        code_of(start_tryout(&mut c).await),
        Code::FailedPrecondition
    );
    for user in ["a", "b", "c", "d", "e"] {
        assigned(&mut c, user, "").await;
    }
    assert_eq!(
        code_of(assign(&mut c, "f", "").await),
        Code::ResourceExhausted
    );
}

// ---------------------------------------------------------------------------
// 4. The licensing server is gone: grace, lapse, and back
// ---------------------------------------------------------------------------

#[tokio::test]
async fn unreachable_server_means_grace_then_lapse_then_deny_new_until_it_is_back() {
    let mut pbx = pbx("grace", &[("user", 5)], |c| RawConfig {
        grace_days: 3,
        lapse_action: "deny_new".into(),
        ..c
    })
    .await;
    let confirmed = pbx.activate(&["a"]).await;
    let o = overview(&mut pbx.c).await;
    assert_eq!(time(o.last_reconciled_at.as_ref()), confirmed);
    assert_eq!(o.grace_ends_at, None);

    let r = pbx.lose_the_licensing_server().await;
    let (clock, c) = (&pbx.clock, &mut pbx.c);
    assert_eq!(entitlements(&r.entitlements), [ent("user", 5, 1)]);
    let grace_end = confirmed + chrono::Duration::days(3);
    let o = overview(c).await;
    assert_eq!(o.activation_state(), pb::ActivationState::Grace);
    assert_eq!(
        o.last_reconcile_outcome(),
        pb::ReconcileOutcome::Unreachable
    );
    assert_eq!(time(o.grace_ends_at.as_ref()), grace_end);
    assert_eq!(time(o.last_reconciled_at.as_ref()), confirmed);

    // Still in grace a moment before its end: seats keep working, new ones too.
    clock.set(grace_end - chrono::Duration::minutes(1));
    let o = overview(c).await;
    assert_eq!(o.activation_state(), pb::ActivationState::Grace);
    assert_eq!(time(o.grace_ends_at.as_ref()), grace_end);
    assert!(checked(c, "a", "").await.licensed);
    assigned(c, "b", "").await;

    // Lapsed: existing seats stay licensed, no new ones.
    clock.set(grace_end + chrono::Duration::minutes(1));
    let o = overview(c).await;
    assert_eq!(o.activation_state(), pb::ActivationState::Lapsed);
    assert_eq!(time(o.grace_ends_at.as_ref()), grace_end);
    for user in ["a", "b"] {
        assert!(checked(c, user, "").await.licensed, "{user}");
    }
    assert_eq!(code_of(assign(c, "c", "").await), Code::FailedPrecondition);
    assert_eq!(seats(c).await.len(), 2);

    // The licensing server is back: active again, new seats again.
    pbx.sim.restart();
    let c = &mut pbx.c;
    let r = reconcile(c).await;
    assert!(
        matches!(
            r.outcome(),
            pb::ReconcileOutcome::Updated | pb::ReconcileOutcome::Unchanged
        ),
        "{r:?}"
    );
    let o = overview(c).await;
    assert_eq!(o.activation_state(), pb::ActivationState::Active, "{o:?}");
    assert_eq!(o.grace_ends_at, None);
    assert_eq!(entitlements(&o.entitlements), [ent("user", 5, 2)]);
    assigned(c, "c", "").await;
}

#[tokio::test]
async fn lapse_with_reset_returns_the_pbx_to_its_initial_state() {
    let mut pbx = pbx("lapse", &[("user", 5)], |c| RawConfig {
        grace_days: 2,
        lapse_action: "reset".into(),
        ..c
    })
    .await;
    let confirmed = pbx.activate(&["a", "b"]).await;
    pbx.lose_the_licensing_server().await;
    let (clock, c) = (&pbx.clock, &mut pbx.c);
    clock.set(confirmed + chrono::Duration::days(1));
    let o = overview(c).await;
    assert_eq!(o.activation_state(), pb::ActivationState::Grace);
    assert_eq!(seats(c).await.len(), 2);

    clock.set(confirmed + chrono::Duration::days(2) + chrono::Duration::minutes(1));
    // The schedule performs the lapse action.
    let reset = eventually(WAIT, || {
        let mut c = c.clone();
        async move {
            overview(&mut c).await.activation_state() == pb::ActivationState::NotInitialized
                && seats(&mut c).await.is_empty()
        }
    })
    .await;
    let o = overview(c).await;
    assert!(reset, "the lapse did not reset the PBX: {o:?}");
    assert!(o.entitlements.is_empty());
    // The tryout record (forfeited by the purchase) survives the reset.
    assert_eq!(tryout_state(&o), pb::TryoutState::Unavailable);
    // No license and no tryout to start: the PBX's cause comes first (API.md).
    let a = checked(c, "a", "").await;
    assert_eq!(
        (a.licensed, a.reason()),
        (false, pb::SeatReason::NotActivated)
    );
}

// ---------------------------------------------------------------------------
// 5. The schedule across two replicas
// ---------------------------------------------------------------------------

#[tokio::test]
async fn two_replicas_reconcile_once_per_interval_not_once_each() {
    let redis = RedisServer::start();
    let sim = Sim::start();
    let mut admin = sim.admin().await;
    let serial = serial("sched");
    register(&mut admin, &serial, vpb::Edition::Vm).await;
    redeem(&mut admin, &serial, "user", 5).await;
    let mut config = sim_config(&redis, &sim, &serial, Edition::Vm);
    config.reconcile.interval_secs = 2;
    config.reconcile.jitter_percent = 0;
    let (a, b) = tokio::join!(TestServer::start(config.clone()), TestServer::start(config));
    let mut ca = a.client().await;
    let mut cb = b.client().await;
    let o = ca
        .activate_online(pb::ActivateOnlineRequest {})
        .await
        .expect("ActivateOnline")
        .into_inner()
        .overview
        .unwrap();
    assert_eq!(o.activation_state(), pb::ActivationState::Active);
    let active_on_b = eventually(WAIT, || {
        let mut cb = cb.clone();
        async move { overview(&mut cb).await.activation_state() == pb::ActivationState::Active }
    })
    .await;
    assert!(active_on_b, "replica B never saw the activation");

    // The observation window: the fetch count should grow by one per interval.
    let window = Duration::from_secs(9);
    let start = Instant::now();
    let first = stats(&mut admin, &serial).await.fetch_license_calls;
    let mut seen = vec![(Duration::ZERO, first)];
    while start.elapsed() < window {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let n = stats(&mut admin, &serial).await.fetch_license_calls;
        if n != seen.last().unwrap().1 {
            seen.push((start.elapsed(), n));
        }
    }
    let last = stats(&mut admin, &serial).await.fetch_license_calls;
    let fetched = last - first;
    println!(
        "fetch_license_calls over {window:?} with interval 2 s on two replicas: {first} -> {last} \
         ({fetched} fetches); changes at {seen:?}"
    );
    // One replica per interval: 9 s / 2..3 s = 3..5 (2 allows a loaded machine);
    // both replicas independently would be 6 or more.
    assert!(
        (2..=5).contains(&fetched),
        "{fetched} fetches in {window:?}: {seen:?}"
    );
    // Both replicas know the latest outcome.
    let ob = overview(&mut cb).await;
    assert!(matches!(
        ob.last_reconcile_outcome(),
        pb::ReconcileOutcome::Updated | pb::ReconcileOutcome::Unchanged
    ));
    let next = time(ob.next_reconcile_at.as_ref());
    assert!(next > Utc::now() - chrono::Duration::seconds(3), "{next}");
}

// ---------------------------------------------------------------------------
// 6. Capacity drop
// ---------------------------------------------------------------------------

#[tokio::test]
async fn capacity_drop_flags_the_most_recent_seats_until_their_grace_ends() {
    let mut pbx = pbx("drop", &[("user", 4)], |c| RawConfig {
        over_capacity_grace_days: 2,
        ..c
    })
    .await;
    pbx.activate(&["a", "b", "c", "d"]).await;
    let Pbx {
        _redis,
        sim: _sim,
        mut admin,
        serial,
        clock,
        _server,
        mut c,
    } = pbx;
    assert_eq!(
        code_of(assign(&mut c, "e", "").await),
        Code::ResourceExhausted
    );

    revoke(&mut admin, &serial, "user", 2).await;
    let r = reconcile(&mut c).await;
    assert_eq!(r.outcome(), pb::ReconcileOutcome::Updated, "{r:?}");
    assert_eq!(entitlements(&r.entitlements), [ent("user", 2, 4)]);
    let flagged_at = Utc::now();

    // Every seat is still there; the two most recently assigned are flagged
    // (ties in assignment time broken by user id, as the service orders them).
    let listed = seats(&mut c).await;
    assert_eq!(listed.len(), 4, "{listed:?}");
    let mut by_recency: Vec<&pb::Seat> = listed.iter().collect();
    by_recency.sort_by_key(|s| {
        let t = s.assigned_at.as_ref().unwrap();
        std::cmp::Reverse((t.seconds, t.nanos, s.user_id.clone()))
    });
    let expected: Vec<&str> = by_recency[..2].iter().map(|s| s.user_id.as_str()).collect();
    let mut flagged: Vec<&str> = listed
        .iter()
        .filter(|s| s.over_capacity)
        .map(|s| s.user_id.as_str())
        .collect();
    let mut expected_sorted = expected.clone();
    expected_sorted.sort();
    flagged.sort();
    assert_eq!(flagged, expected_sorted, "{listed:?}");
    let order: Vec<(&str, i64, i32, bool)> = by_recency
        .iter()
        .map(|s| {
            let t = s.assigned_at.as_ref().unwrap();
            (s.user_id.as_str(), t.seconds, t.nanos, s.over_capacity)
        })
        .collect();
    println!("seats, most recently assigned first (user, s, ns, flagged): {order:?}");
    let unflagged: Vec<&str> = by_recency[2..].iter().map(|s| s.user_id.as_str()).collect();
    // The flag time is the store's (Redis TIME), so compare with the wall clock.
    let mut grace_end = flagged_at;
    for user in &flagged {
        let r = checked(&mut c, user, "").await;
        assert!(r.licensed, "{user}: {r:?}");
        assert_eq!(r.reason(), pb::SeatReason::Assigned);
        let until = time(r.valid_until.as_ref());
        let expected = flagged_at + chrono::Duration::days(2);
        assert!(
            (until - expected).num_seconds().abs() < 60,
            "{user}: valid until {until}, expected about {expected}"
        );
        grace_end = grace_end.max(until);
    }
    for user in &unflagged {
        let r = checked(&mut c, user, "").await;
        assert!(r.licensed && r.valid_until.is_none(), "{user}: {r:?}");
    }
    assert!(!overview(&mut c).await.entitlements.is_empty());

    // After the over-capacity grace the flagged seats stop being licensed.
    clock.set(grace_end + chrono::Duration::seconds(1));
    for user in &flagged {
        let r = checked(&mut c, user, "").await;
        assert!(!r.licensed, "{user}: {r:?}");
        assert_eq!(r.reason(), pb::SeatReason::OverCapacity, "{user}");
    }
    for user in &unflagged {
        assert!(checked(&mut c, user, "").await.licensed, "{user}");
    }

    // Releasing a seat within capacity makes room: the oldest flagged seat is
    // cleared and licensed again; the most recent stays flagged.
    assert!(released(&mut c, unflagged[0], "").await);
    let (newest, oldest_flagged) = (expected[0], expected[1]);
    let listed = seats(&mut c).await;
    let flags: Vec<(&str, bool)> = listed
        .iter()
        .map(|s| (s.user_id.as_str(), s.over_capacity))
        .collect();
    assert_eq!(listed.len(), 3);
    assert!(flags.contains(&(oldest_flagged, false)), "{flags:?}");
    assert!(flags.contains(&(newest, true)), "{flags:?}");
    assert!(flags.contains(&(unflagged[1], false)), "{flags:?}");
    let r = checked(&mut c, oldest_flagged, "").await;
    assert!(
        r.licensed && r.reason() == pb::SeatReason::Assigned,
        "{r:?}"
    );
    assert_eq!(
        checked(&mut c, newest, "").await.reason(),
        pb::SeatReason::OverCapacity
    );
}

// ---------------------------------------------------------------------------
// 7. Events across replicas
// ---------------------------------------------------------------------------

#[tokio::test]
async fn a_watcher_on_one_replica_sees_changes_made_on_the_other() {
    let redis = RedisServer::start();
    let sim = Sim::start();
    let mut admin = sim.admin().await;
    let serial = serial("events");
    register(&mut admin, &serial, vpb::Edition::Vm).await;
    redeem(&mut admin, &serial, "user", 5).await;
    redeem(&mut admin, &serial, "call_assist", 1).await;
    let config = sim_config(&redis, &sim, &serial, Edition::Vm);
    let (a, b) = tokio::join!(TestServer::start(config.clone()), TestServer::start(config));
    let mut ca = a.client().await;
    let mut cb = b.client().await;
    let mut stream = cb
        .watch_license_events(pb::WatchLicenseEventsRequest {})
        .await
        .expect("WatchLicenseEvents")
        .into_inner();

    activate_by_paste(&mut ca, &mut admin, &serial).await;
    next_event(&mut stream, "activation_applied").await;

    assigned(&mut ca, "eve", "").await;
    let e = next_event(&mut stream, "seat_assigned").await;
    assert_eq!((e.user_id.as_str(), e.feature.as_str()), ("eve", "user"));
    let seat = e.seat.expect("the seat");
    assert_eq!(
        (seat.user_id.as_str(), seat.source()),
        ("eve", pb::SeatSource::Purchased)
    );

    redeem(&mut admin, &serial, "user", 3).await;
    let r = reconcile(&mut ca).await;
    assert_eq!(r.outcome(), pb::ReconcileOutcome::Updated, "{r:?}");
    next_event(&mut stream, "entitlements_changed").await;
    let ob = overview(&mut cb).await;
    assert_eq!(
        entitlements(&ob.entitlements),
        [ent("call_assist", 1, 0), ent("user", 8, 1)]
    );

    // A re-setup on A: B stops licensing the seat it answered for.
    assert!(checked(&mut cb, "eve", "").await.licensed);
    ca.reset_activation(pb::ResetActivationRequest {})
        .await
        .expect("ResetActivation");
    next_event(&mut stream, "reset").await;
    let unlicensed = eventually(WAIT, || {
        let mut cb = cb.clone();
        async move { !checked(&mut cb, "eve", "").await.licensed }
    })
    .await;
    assert!(unlicensed, "B still licenses eve after the reset");
    assert_eq!(
        overview(&mut cb).await.activation_state(),
        pb::ActivationState::NotInitialized
    );
}

// ---------------------------------------------------------------------------
// Concurrent use: the daily peak goes to the licensing server
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daily_peak_of_concurrent_use_is_reported_with_each_reconcile() {
    let redis = RedisServer::start();
    let sim = Sim::start();
    let mut admin = sim.admin().await;
    let serial = serial("usage");
    register(&mut admin, &serial, vpb::Edition::Vm).await;
    redeem_concurrent(&mut admin, &serial, "user", 2).await;
    redeem(&mut admin, &serial, "call_assist", 1).await;
    let server = TestServer::start(sim_config(&redis, &sim, &serial, Edition::Vm)).await;
    let mut c = server.client().await;
    let o = c
        .activate_online(pb::ActivateOnlineRequest {})
        .await
        .expect("ActivateOnline")
        .into_inner()
        .overview
        .unwrap();
    let user = o.entitlements.iter().find(|e| e.feature == "user").unwrap();
    assert_eq!(user.seat_model(), pb::SeatModel::Concurrent);

    // The day the uses fall on (a run across midnight UTC may see the next).
    let day_before = Utc::now().format("%Y-%m-%d").to_string();
    for (user, holder) in [("alice", "pod-0"), ("bob", "pod-1")] {
        c.acquire_lease(pb::AcquireLeaseRequest {
            user_id: user.into(),
            feature: String::new(),
            holder: holder.into(),
        })
        .await
        .expect("AcquireLease");
    }
    let busy = c
        .acquire_lease(pb::AcquireLeaseRequest {
            user_id: "carol".into(),
            feature: String::new(),
            holder: "pod-1".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(busy.code(), Code::ResourceExhausted);
    let o = overview(&mut c).await;
    let used = o
        .concurrent_use
        .iter()
        .find(|u| u.feature == "user")
        .expect("user is sold for concurrent use");
    assert_eq!(
        (
            used.capacity,
            used.in_use,
            used.peak_in_use_today,
            used.busy_today,
            used.at_capacity
        ),
        (2, 2, 2, 1, true)
    );

    c.reconcile(pb::ReconcileRequest {})
        .await
        .expect("Reconcile");
    let devices = admin
        .list_devices(vpb::ListDevicesRequest {})
        .await
        .expect("ListDevices")
        .into_inner();
    let device = devices
        .devices
        .iter()
        .find(|d| d.serial_number == serial)
        .unwrap();
    let today = Utc::now().format("%Y-%m-%d").to_string();
    let reported = device
        .usage
        .iter()
        .find(|u| u.feature == "user" && (u.day == today || u.day == day_before))
        .unwrap_or_else(|| panic!("no usage of today in {:?}", device.usage));
    assert_eq!(
        (reported.peak_in_use, reported.capacity, reported.busy),
        (2, 2, 1)
    );
}
