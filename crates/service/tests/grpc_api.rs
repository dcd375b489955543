//! The contract of API.md over real gRPC against a real Redis: every RPC's
//! success path and every status code of the table.

mod common;

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use common::*;
use comtrexx_licensing::config::RawConfig;
use comtrexx_licensing::domain::{Edition, Feature, ManualClock};
use comtrexx_licensing::grpc::pb;
use futures::future::join_all;
use tonic::{Code, Status};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_types::StatusExt as _;

/// Upper bound for anything the tests wait for.
const WAIT: Duration = Duration::from_secs(5);
const SERVICE_NAME: &str = "comtrexx.licensing.v1.LicensingService";

// ---------------------------------------------------------------------------
// Fixture and call helpers
// ---------------------------------------------------------------------------

/// One PBX: its own Redis, vendor key and service. Fields drop in order, so the
/// service stops before its Redis.
struct Pbx {
    server: TestServer,
    client: Client,
    vendor: Vendor,
    serial: String,
    /// When the first license document of the test was issued.
    t0: DateTime<Utc>,
    _redis: RedisServer,
}

impl Pbx {
    /// A PBX of `edition` that trusts its vendor and reads its license file;
    /// `license` (if any) is written before start, and the start-up reconcile
    /// has recorded its outcome when this returns.
    async fn licensed(tag: &str, edition: Edition, license: Option<&[(Feature, u32)]>) -> Self {
        let redis = RedisServer::start();
        let vendor = Vendor::new();
        let serial = serial(tag);
        let t0 = Utc::now() - chrono::Duration::days(1);
        if let Some(entitlements) = license {
            vendor.write_license(&serial, edition, t0, entitlements);
        }
        let config = without_load_limits(RawConfig {
            edition: edition.as_str().into(),
            ..licensed_config(Some(&redis), &serial, &vendor)
        });
        let server = TestServer::start(config).await;
        let mut client = server.client().await;
        let o = wait_startup_reconcile(&mut client).await;
        let expected = if license.is_some() {
            pb::ReconcileOutcome::Updated
        } else {
            pb::ReconcileOutcome::Unreachable
        };
        assert_eq!(o.last_reconcile_outcome(), expected, "{o:?}");
        Self {
            server,
            client,
            vendor,
            serial,
            t0,
            _redis: redis,
        }
    }

    /// An edition-VM PBX without any license source, on `clock` if given.
    async fn unlicensed(tag: &str, clock: Option<ManualClock>) -> Self {
        let redis = RedisServer::start();
        let serial = serial(tag);
        let config = config(Some(&redis), &serial);
        let server = match clock {
            Some(clock) => TestServer::start_with_clock(config, Arc::new(clock)).await,
            None => TestServer::start(config).await,
        };
        let client = server.client().await;
        Self {
            server,
            client,
            vendor: Vendor::new(),
            serial,
            t0: Utc::now(),
            _redis: redis,
        }
    }

    /// Writes a license for this PBX, issued `hours` after `t0`.
    fn write_license(&self, edition: Edition, hours: i64, entitlements: &[(Feature, u32)]) {
        self.vendor.write_license(
            &self.serial,
            edition,
            self.t0 + chrono::Duration::hours(hours),
            entitlements,
        );
    }
}

/// Waits until the start-up reconcile recorded an outcome.
async fn wait_startup_reconcile(client: &mut Client) -> pb::GetLicenseOverviewResponse {
    eventually_some(WAIT, || {
        let mut c = client.clone();
        async move {
            let o = overview(&mut c).await;
            (o.last_reconcile_outcome() != pb::ReconcileOutcome::Unspecified).then_some(o)
        }
    })
    .await
    .expect("no start-up reconcile")
}

/// The status's ErrorInfo, asserting it is in this service's domain.
fn error_info(status: &Status) -> tonic_types::ErrorInfo {
    let info = status
        .get_details_error_info()
        .unwrap_or_else(|| panic!("no ErrorInfo in {status:?}"));
    assert_eq!(info.domain, "licensing.comtrexx", "{status:?}");
    info
}

/// Asserts INVALID_ARGUMENT naming `field`.
fn assert_invalid(result: Result<impl std::fmt::Debug, Status>, field: &str, what: &str) {
    let status = match result {
        Ok(ok) => panic!("{what}: expected INVALID_ARGUMENT, got {ok:?}"),
        Err(s) => s,
    };
    assert_eq!(status.code(), Code::InvalidArgument, "{what}: {status:?}");
    let info = error_info(&status);
    assert_eq!(info.reason, "INVALID_ARGUMENT", "{what}");
    assert_eq!(
        info.metadata.get("field").map(String::as_str),
        Some(field),
        "{what}: {info:?}"
    );
}

/// Asserts FAILED_PRECONDITION with ErrorInfo reason `reason`.
fn assert_precondition(result: Result<impl std::fmt::Debug, Status>, reason: &str, what: &str) {
    let status = match result {
        Ok(ok) => panic!("{what}: expected FAILED_PRECONDITION, got {ok:?}"),
        Err(s) => s,
    };
    assert_eq!(
        status.code(),
        Code::FailedPrecondition,
        "{what}: {status:?}"
    );
    assert_eq!(error_info(&status).reason, reason, "{what}");
}

/// Asserts RESOURCE_EXHAUSTED with the capacity and in-use counts.
fn assert_exhausted(
    result: Result<impl std::fmt::Debug, Status>,
    feature: &str,
    capacity: u32,
    in_use: u32,
) {
    let status = match result {
        Ok(ok) => panic!("expected RESOURCE_EXHAUSTED, got {ok:?}"),
        Err(s) => s,
    };
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    let info = error_info(&status);
    assert_eq!(info.reason, "NO_FREE_SEAT");
    assert_eq!(info.metadata["feature"], feature, "{info:?}");
    assert_eq!(info.metadata["capacity"], capacity.to_string(), "{info:?}");
    assert_eq!(info.metadata["in_use"], in_use.to_string(), "{info:?}");
}

fn entitlement<'a>(list: &'a [pb::Entitlement], feature: &str) -> &'a pb::Entitlement {
    list.iter()
        .find(|e| e.feature == feature)
        .unwrap_or_else(|| panic!("no {feature} entitlement in {list:?}"))
}

fn time(ts: &prost_types::Timestamp) -> DateTime<Utc> {
    DateTime::from_timestamp(ts.seconds, u32::try_from(ts.nanos).unwrap()).unwrap()
}

// ---------------------------------------------------------------------------
// CheckSeat / AssignSeat / ReleaseSeat
// ---------------------------------------------------------------------------

#[tokio::test]
async fn seat_requests_are_validated_and_change_nothing() {
    let pbx = Pbx::licensed(
        "valid",
        Edition::Vm,
        Some(&[(Feature::User, 5), (Feature::CallAssist, 2)]),
    )
    .await;
    let c = &mut pbx.client.clone();
    assigned(c, "alice", "").await;
    assign(c, "alice", "call_assist").await.unwrap();
    let before = (seats(c).await, overview(c).await);

    let bad_users: Vec<(String, &str)> = vec![
        (String::new(), "empty"),
        ("x".repeat(129), "129 bytes"),
        // 65 characters, 129 bytes: the limit counts bytes.
        (format!("{}a", "ü".repeat(64)), "129 bytes, multi-byte"),
        ("a\nb".into(), "newline"),
        ("a\u{7f}b".into(), "DEL"),
        ("a\0b".into(), "NUL"),
        ("a\tb".into(), "tab"),
        ("a\u{85}b".into(), "C1 control"),
    ];
    for (user, what) in &bad_users {
        for feature in ["", "user", "call_assist"] {
            let what = format!("{what} user_id, feature {feature:?}");
            assert_invalid(check(c, user, feature).await, "user_id", &what);
            assert_invalid(assign(c, user, feature).await, "user_id", &what);
            assert_invalid(release(c, user, feature).await, "user_id", &what);
        }
    }
    for feature in ["fax", "users", " user"] {
        let what = format!("feature {feature:?}");
        assert_invalid(check(c, "alice", feature).await, "feature", &what);
        assert_invalid(assign(c, "bob", feature).await, "feature", &what);
        assert_invalid(release(c, "alice", feature).await, "feature", &what);
    }
    assert_invalid(
        assign(c, "bob", "system_activation").await,
        "feature",
        "assign system_activation",
    );
    assert_invalid(list_page(c, "fax", 0, "").await, "feature", "list fax");
    assert_invalid(list_page(c, "", -1, "").await, "page_size", "list -1");

    let after = (seats(c).await, overview(c).await);
    assert_eq!(before, after, "an invalid request changed something");
    assert!(checked(c, "alice", "").await.licensed);
    assert_eq!(
        checked(c, "bob", "").await.reason(),
        pb::SeatReason::NotAssigned
    );
}

#[tokio::test]
async fn user_ids_of_128_bytes_and_empty_feature_are_accepted() {
    let pbx = Pbx::licensed("accept", Edition::Vm, Some(&[(Feature::User, 5)])).await;
    let c = &mut pbx.client.clone();
    for user in [
        "y".repeat(128),
        "ü".repeat(64),
        "Zoë Smith <zoe@example.org>".into(),
    ] {
        let a = assigned(c, &user, "").await;
        assert!(a.created, "{user}");
        let seat = a.seat.unwrap();
        // An empty feature means "user".
        assert_eq!(seat.user_id, user);
        assert_eq!(seat.feature, "user");
        assert_eq!(seat.source(), pb::SeatSource::Purchased);
        assert!(!seat.over_capacity);
        let ck = check(c, &user, "user").await.unwrap();
        assert!(ck.licensed, "{user}: {ck:?}");
        assert_eq!(ck.reason(), pb::SeatReason::Assigned);
        assert_eq!(ck.source(), pb::SeatSource::Purchased);
        assert!(ck.valid_until.is_none(), "an open-ended license: {ck:?}");
        assert!(!ck.stale);
        // The same user holds no seat of another feature.
        let other = check(c, &user, "call_assist").await.unwrap();
        assert!(!other.licensed);
        assert_eq!(other.reason(), pb::SeatReason::NotAssigned);
        assert_eq!(other.source(), pb::SeatSource::Unspecified);
    }
    let seats = list_seats(c, "user", 0).await.expect("ListSeats");
    assert_eq!(seats.len(), 3);
    assert!(seats.iter().any(|s| s.user_id == "y".repeat(128)));
    let r = release(c, &"ü".repeat(64), "user").await.unwrap();
    assert!(r.released);
    assert_eq!(
        checked(c, &"ü".repeat(64), "").await.reason(),
        pb::SeatReason::NotAssigned
    );
}

#[tokio::test]
async fn assign_is_idempotent_and_capacity_is_enforced() {
    let pbx = Pbx::licensed("cap", Edition::Vm, Some(&[(Feature::User, 2)])).await;
    let c = &mut pbx.client.clone();

    let first = assigned(c, "alice", "").await;
    assert!(first.created);
    let again = assign(c, "alice", "user").await.unwrap();
    assert!(!again.created, "the second assignment is not new");
    assert_eq!(again.seat, first.seat, "the existing seat comes back");
    assert!(first.seat.as_ref().unwrap().assigned_at.is_some());

    assert!(assigned(c, "bob", "").await.created);
    assert_exhausted(assign(c, "carol", "").await, "user", 2, 2);
    // The user who already holds a seat still gets it back at capacity.
    assert!(!assigned(c, "alice", "").await.created);
    // A feature that was not purchased has no free seat either.
    assert_exhausted(assign(c, "alice", "call_assist").await, "call_assist", 0, 0);
    assert_eq!(list_seats(c, "", 0).await.expect("ListSeats").len(), 2);

    // Releasing nothing is OK.
    let none = release(c, "nobody", "").await.unwrap();
    assert!(!none.released);
    let none = release(c, "alice", "call_assist").await.unwrap();
    assert!(!none.released);

    assert!(release(c, "alice", "").await.unwrap().released);
    assert!(!release(c, "alice", "user").await.unwrap().released);
    let ck = checked(c, "alice", "").await;
    assert!(!ck.licensed);
    assert_eq!(ck.reason(), pb::SeatReason::NotAssigned);

    // The freed seat can be taken by someone else.
    assert!(assigned(c, "carol", "").await.created);
    assert_exhausted(assign(c, "alice", "").await, "user", 2, 2);
    let o = overview(c).await;
    let e = entitlement(&o.entitlements, "user");
    assert_eq!((e.quantity, e.in_use), (2, 2));
}

// ---------------------------------------------------------------------------
// ListSeats
// ---------------------------------------------------------------------------

#[tokio::test]
async fn list_seats_pages_in_feature_then_user_order() {
    let pbx = Pbx::licensed(
        "list",
        Edition::Vm,
        Some(&[(Feature::User, 150), (Feature::CallAssist, 10)]),
    )
    .await;
    let c = &mut pbx.client.clone();

    // 120 user seats and 5 call_assist seats, assigned in no particular order.
    let mut users: Vec<String> = (0..117).rev().map(|i| format!("user-{i:03}")).collect();
    users.extend(["Zed".to_owned(), "alice".to_owned(), "ümit".to_owned()]);
    let assists: Vec<String> = ["x5", "x1", "b", "A", "x10"].map(String::from).to_vec();
    let mut calls = Vec::new();
    for u in &users {
        calls.push((u.clone(), "user"));
    }
    for u in &assists {
        calls.push((u.clone(), "call_assist"));
    }
    let results = join_all(calls.iter().map(|(u, f)| {
        let mut c = c.clone();
        async move { assign(&mut c, u, f).await }
    }))
    .await;
    for (r, (u, f)) in results.into_iter().zip(&calls) {
        assert!(r.unwrap_or_else(|s| panic!("{u}/{f}: {s:?}")).created);
    }
    let mut expected: Vec<(String, String)> = calls
        .iter()
        .map(|(u, f)| ((*f).to_owned(), u.clone()))
        .collect();
    expected.sort();

    // Default page size 100, with a token to the rest.
    let page = list_page(c, "user", 0, "").await.unwrap();
    assert_eq!(page.seats.len(), 100);
    assert!(!page.next_page_token.is_empty());
    let rest = list_page(c, "user", 0, &page.next_page_token)
        .await
        .unwrap();
    assert_eq!(rest.seats.len(), 20);
    assert!(rest.next_page_token.is_empty());

    // Larger than 1000 is clamped, not refused.
    let big = list_page(c, "user", 5000, "").await.unwrap();
    assert_eq!(big.seats.len(), 120);
    assert!(big.next_page_token.is_empty());
    let all = list_page(c, "", i32::MAX, "").await.unwrap();
    assert_eq!(all.seats.len(), 125);

    // Paging visits each seat once, in (feature, user id) order.
    for size in [7, 100] {
        let seats = list_seats(c, "", size).await.expect("ListSeats");
        let got: Vec<(String, String)> = seats
            .iter()
            .map(|s| (s.feature.clone(), s.user_id.clone()))
            .collect();
        assert_eq!(got, expected, "page size {size}");
        for s in &seats {
            assert_eq!(s.source(), pb::SeatSource::Purchased);
            assert!(s.assigned_at.is_some());
        }
    }
    let assist_only = list_seats(c, "call_assist", 1).await.expect("ListSeats");
    let got: Vec<&str> = assist_only.iter().map(|s| s.user_id.as_str()).collect();
    assert_eq!(got, ["A", "b", "x1", "x10", "x5"]);

    // Bad tokens and sizes.
    assert_invalid(list_page(c, "", -1, "").await, "page_size", "negative");
    assert_invalid(list_page(c, "user", i32::MIN, "").await, "page_size", "min");
    for garbage in ["garbage", "!!!", "eyJ2IjoxfQ", "e30"] {
        assert_invalid(list_page(c, "", 10, garbage).await, "page_token", garbage);
    }
    let first = list_page(c, "", 10, "").await.unwrap();
    assert_invalid(
        list_page(c, "user", 10, &first.next_page_token).await,
        "page_token",
        "token of another filter",
    );
    let user_page = list_page(c, "user", 10, "").await.unwrap();
    assert_invalid(
        list_page(c, "call_assist", 10, &user_page.next_page_token).await,
        "page_token",
        "token of another filter",
    );
    assert_invalid(
        list_page(c, "", 10, &user_page.next_page_token).await,
        "page_token",
        "token of a filter, used without",
    );
    // The token still works with its own filter.
    let next = list_page(c, "user", 10, &user_page.next_page_token)
        .await
        .unwrap();
    assert_eq!(next.seats[0].user_id, expected[5 + 10].1);
}

#[tokio::test]
async fn paging_survives_releases_between_pages() {
    let pbx = Pbx::licensed("listrel", Edition::Vm, Some(&[(Feature::User, 10)])).await;
    let c = &mut pbx.client.clone();
    for u in ["a", "b", "c", "d", "e", "f"] {
        assigned(c, u, "").await;
    }
    let p1 = list_page(c, "", 2, "").await.unwrap();
    let got: Vec<&str> = p1.seats.iter().map(|s| s.user_id.as_str()).collect();
    assert_eq!(got, ["a", "b"]);
    // The last listed seat and the next one go away between pages.
    release(c, "b", "").await.unwrap();
    release(c, "c", "").await.unwrap();
    let p2 = list_page(c, "", 2, &p1.next_page_token).await.unwrap();
    let got: Vec<&str> = p2.seats.iter().map(|s| s.user_id.as_str()).collect();
    assert_eq!(got, ["d", "e"]);
    let p3 = list_page(c, "", 2, &p2.next_page_token).await.unwrap();
    let got: Vec<&str> = p3.seats.iter().map(|s| s.user_id.as_str()).collect();
    assert_eq!(got, ["f"]);
    assert!(p3.next_page_token.is_empty());
}

// ---------------------------------------------------------------------------
// Tryout
// ---------------------------------------------------------------------------

#[tokio::test]
async fn tryout_lifecycle_on_a_vm() {
    let pbx = Pbx::unlicensed("tryout", None).await;
    let c = &mut pbx.client.clone();

    let t = tryout(c).await;
    assert_eq!(t.state(), pb::TryoutState::Available);
    assert_eq!((t.test_seats_total, t.test_seats_used), (3, 0));
    assert_eq!(t.days_remaining, 0);
    assert!(t.started_at.is_none() && t.ends_at.is_none());
    let o = overview(c).await;
    assert_eq!(o.activation_state(), pb::ActivationState::NotInitialized);
    assert_eq!(o.edition(), pb::Edition::Vm);
    assert_eq!(o.serial_number, pbx.serial);
    assert!(o.entitlements.is_empty());

    // Neither activated nor in tryout: no seats.
    assert_precondition(
        assign(c, "alice", "").await,
        "NOT_ACTIVATED",
        "before tryout",
    );

    let started = start_tryout(c).await.unwrap();
    assert_eq!(started.state(), pb::TryoutState::Active);
    assert_eq!(started.days_remaining, 14);
    let (from, to) = (
        time(started.started_at.as_ref().unwrap()),
        time(started.ends_at.as_ref().unwrap()),
    );
    assert_eq!(to - from, chrono::Duration::days(14));
    assert!((Utc::now() - from).num_seconds().abs() < 60, "{from}");
    assert_eq!(tryout(c).await, started);
    assert_precondition(
        start_tryout(c).await,
        "TRYOUT_NOT_AVAILABLE",
        "second start",
    );

    for user in ["t1", "t2", "t3"] {
        let a = assigned(c, user, "").await;
        assert!(a.created);
        assert_eq!(a.seat.unwrap().source(), pb::SeatSource::Tryout);
        let ck = checked(c, user, "").await;
        assert!(ck.licensed, "{ck:?}");
        assert_eq!(ck.source(), pb::SeatSource::Tryout);
        assert_eq!(ck.reason(), pb::SeatReason::Assigned);
        assert_eq!(ck.valid_until, started.ends_at, "valid until tryout end");
    }
    assert!(
        !assigned(c, "t2", "").await.created,
        "idempotent in tryout too"
    );
    assert_exhausted(assign(c, "t4", "").await, "user", 3, 3);
    // Test seats are user seats only.
    assert_precondition(
        assign(c, "t1", "call_assist").await,
        "NOT_ACTIVATED",
        "call_assist in tryout",
    );
    let t = tryout(c).await;
    assert_eq!((t.test_seats_total, t.test_seats_used), (3, 3));
    assert_eq!(overview(c).await.tryout.unwrap(), t);

    let ended = end_tryout(c).await.unwrap();
    assert_eq!(ended.state(), pb::TryoutState::Ended);
    assert_eq!(ended.days_remaining, 0);
    assert_eq!(tryout(c).await.state(), pb::TryoutState::Ended);
    let ck = checked(c, "t1", "").await;
    assert!(!ck.licensed);
    assert_eq!(ck.reason(), pb::SeatReason::TryoutOver);
    assert_eq!(ck.source(), pb::SeatSource::Tryout);
    assert!(ck.valid_until.is_none());
    // Nothing is deleted silently: the test seats are still listed.
    let seats = list_seats(c, "", 0).await.expect("ListSeats");
    assert_eq!(seats.len(), 3);
    assert!(seats.iter().all(|s| s.source() == pb::SeatSource::Tryout));

    assert_precondition(
        start_tryout(c).await,
        "TRYOUT_NOT_AVAILABLE",
        "start after end",
    );
    assert_precondition(assign(c, "t5", "").await, "NOT_ACTIVATED", "after end");
    // A test seat can still be released.
    assert!(release(c, "t1", "").await.unwrap().released);
    assert_eq!(tryout(c).await.test_seats_used, 2);
}

#[tokio::test]
async fn tryout_expires_after_fourteen_days() {
    let clock = manual_clock();
    let pbx = Pbx::unlicensed("expire", Some(clock.clone())).await;
    let c = &mut pbx.client.clone();

    let started = start_tryout(c).await.unwrap();
    assert_eq!(
        time(started.started_at.as_ref().unwrap()),
        comtrexx_licensing::domain::Clock::now(&clock)
    );
    assigned(c, "trial", "").await;

    clock.advance(chrono::Duration::days(14) - chrono::Duration::seconds(1));
    let t = tryout(c).await;
    assert_eq!(t.state(), pb::TryoutState::Active);
    assert_eq!(t.days_remaining, 1);
    assert!(checked(c, "trial", "").await.licensed);

    clock.advance(chrono::Duration::seconds(1));
    let t = tryout(c).await;
    assert_eq!(t.state(), pb::TryoutState::Expired);
    assert_eq!(t.days_remaining, 0);
    assert_eq!(t.test_seats_used, 1);
    let ck = checked(c, "trial", "").await;
    assert!(!ck.licensed);
    assert_eq!(ck.reason(), pb::SeatReason::TryoutOver);
    assert_eq!(ck.source(), pb::SeatSource::Tryout);
    assert_precondition(
        start_tryout(c).await,
        "TRYOUT_NOT_AVAILABLE",
        "after expiry",
    );
    assert_precondition(assign(c, "late", "").await, "NOT_ACTIVATED", "after expiry");
}

#[tokio::test]
async fn purchase_ends_the_tryout() {
    let pbx = Pbx::licensed("buy", Edition::Vm, None).await;
    let c = &mut pbx.client.clone();
    let o = overview(c).await;
    assert_eq!(o.activation_state(), pb::ActivationState::NotInitialized);
    assert!(!o.last_reconcile_error.is_empty());

    start_tryout(c).await.unwrap();
    assert_eq!(
        assigned(c, "trial", "").await.seat.unwrap().source(),
        pb::SeatSource::Tryout
    );

    pbx.write_license(Edition::Vm, 1, &[(Feature::User, 5)]);
    let r = reconcile(c).await;
    assert_eq!(r.outcome(), pb::ReconcileOutcome::Updated, "{r:?}");
    assert!(r.error.is_empty());
    let e = entitlement(&r.entitlements, "user");
    assert_eq!((e.quantity, e.in_use), (5, 0));

    let t = tryout(c).await;
    assert_eq!(t.state(), pb::TryoutState::Ended);
    let ck = checked(c, "trial", "").await;
    assert!(!ck.licensed);
    assert_eq!(ck.reason(), pb::SeatReason::TryoutOver);
    assert_eq!(ck.source(), pb::SeatSource::Tryout);

    // Licensed again with a purchased seat.
    let a = assigned(c, "trial", "").await;
    assert!(a.created, "a purchased seat replaces the test seat");
    assert_eq!(a.seat.unwrap().source(), pb::SeatSource::Purchased);
    let ck = checked(c, "trial", "").await;
    assert!(ck.licensed);
    assert_eq!(ck.source(), pb::SeatSource::Purchased);
    assert!(!assigned(c, "trial", "").await.created);
    let seats = list_seats(c, "", 0).await.expect("ListSeats");
    assert_eq!(seats.len(), 1);
    assert_eq!(seats[0].source(), pb::SeatSource::Purchased);

    let o = overview(c).await;
    assert_eq!(o.activation_state(), pb::ActivationState::Active);
    assert_eq!(entitlement(&o.entitlements, "user").in_use, 1);
    assert_eq!(o.tryout.unwrap().test_seats_used, 0);
    assert_precondition(
        start_tryout(c).await,
        "TRYOUT_NOT_AVAILABLE",
        "after purchase",
    );
}

#[tokio::test]
async fn purchase_before_the_tryout_forfeits_it() {
    let pbx = Pbx::licensed("forfeit", Edition::Vm, Some(&[(Feature::User, 5)])).await;
    let c = &mut pbx.client.clone();
    let t = tryout(c).await;
    assert_eq!(t.state(), pb::TryoutState::Unavailable);
    let refusal = start_tryout(c).await;
    let message = refusal.as_ref().map_err(|s| s.message().to_owned()).err();
    assert_precondition(refusal, "TRYOUT_NOT_AVAILABLE", "forfeited");
    // The refusal says what happened, not merely that the tryout is unavailable.
    let message = message.unwrap();
    assert!(
        message.starts_with("the tryout was forfeited when a purchased license was applied at "),
        "{message}"
    );
    assert!(message.contains("purchased seats"), "{message}");
}

/// A license for another edition is rejected: the overview's reason and the
/// refusal of a seat name the rejection, and offer no tryout on Business.
#[tokio::test]
async fn a_rejected_license_is_named_and_business_is_offered_no_tryout() {
    let pbx = Pbx::licensed("biz-vm", Edition::Business, None).await;
    let c = &mut pbx.client.clone();
    pbx.write_license(
        Edition::Vm,
        1,
        &[(Feature::User, 3), (Feature::SystemActivation, 1)],
    );
    assert_eq!(reconcile(c).await.outcome(), pb::ReconcileOutcome::Rejected);
    let o = overview(c).await;
    assert_eq!(o.activation_state(), pb::ActivationState::NotInitialized);
    let reason = &o.activation_reason;
    assert!(reason.contains("was rejected"), "{reason}");
    assert!(reason.contains("edition vm"), "{reason}");
    assert!(
        reason.contains("edition business has no tryout"),
        "{reason}"
    );
    assert!(!reason.contains("start the tryout"), "{reason}");
    assert!(!reason.contains("applied yet"), "{reason}");

    let refusal = assign(c, "alice", "").await;
    let message = refusal.as_ref().map_err(|s| s.message().to_owned()).err();
    assert_precondition(refusal, "NOT_ACTIVATED", "no license on Business");
    let message = message.unwrap();
    assert!(
        message.contains("edition business has no tryout"),
        "{message}"
    );
    assert!(!message.contains("start the tryout"), "{message}");
}

/// After a re-setup the tryout record stays: a used tryout is not offered again.
#[tokio::test]
async fn after_a_reset_a_used_tryout_is_not_offered() {
    let pbx = Pbx::licensed("reset-used", Edition::Vm, None).await;
    let c = &mut pbx.client.clone();
    let o = overview(c).await;
    assert!(
        o.activation_reason.contains("or start the tryout"),
        "a fresh VM: {}",
        o.activation_reason
    );
    start_tryout(c).await.expect("StartTryout");
    pbx.write_license(Edition::Vm, 0, &[(Feature::User, 3)]);
    assert_eq!(reconcile(c).await.outcome(), pb::ReconcileOutcome::Updated);
    let reset = c
        .reset_activation(pb::ResetActivationRequest {})
        .await
        .expect("ResetActivation")
        .into_inner();
    let o = reset.overview.expect("the overview after the reset");
    assert_eq!(o.activation_state(), pb::ActivationState::NotInitialized);
    let reason = &o.activation_reason;
    assert!(!reason.contains("start the tryout"), "{reason}");
    assert!(
        reason.contains("the tryout ended when a purchased license was applied"),
        "{reason}"
    );
    assert_eq!(overview(c).await.activation_reason, *reason);

    let refusal = assign(c, "alice", "").await;
    let message = refusal.as_ref().map_err(|s| s.message().to_owned()).err();
    assert_precondition(refusal, "NOT_ACTIVATED", "reset");
    let message = message.unwrap();
    assert!(!message.contains("start the tryout"), "{message}");
    assert!(message.contains("the tryout ended"), "{message}");
}

// ---------------------------------------------------------------------------
// Business edition
// ---------------------------------------------------------------------------

#[tokio::test]
async fn business_edition_needs_system_activation() {
    let pbx = Pbx::licensed("biz", Edition::Business, Some(&[(Feature::User, 3)])).await;
    let c = &mut pbx.client.clone();

    let t = tryout(c).await;
    assert_eq!(t.state(), pb::TryoutState::Unavailable);
    assert_eq!(t.test_seats_total, 0);
    assert_precondition(start_tryout(c).await, "TRYOUT_UNAVAILABLE", "business");
    assert_precondition(
        assign(c, "alice", "").await,
        "NOT_ACTIVATED",
        "no activation",
    );
    // The root cause of any user's answer is the PBX's: NOT_ACTIVATED, not
    // NOT_ASSIGNED (API.md's order), and the overview says why.
    let ck = checked(c, "alice", "").await;
    assert!(!ck.licensed);
    assert_eq!(ck.reason(), pb::SeatReason::NotActivated);
    let o = overview(c).await;
    assert_eq!(o.edition(), pb::Edition::Business);
    assert_eq!(o.activation_state(), pb::ActivationState::Active);
    assert!(!o.system_activated);
    assert!(
        o.activation_reason.contains("system_activation"),
        "{}",
        o.activation_reason
    );
    assert_eq!(entitlement(&o.entitlements, "user").quantity, 3);

    // A VM license does not fit a Business PBX.
    pbx.write_license(
        Edition::Vm,
        1,
        &[(Feature::User, 3), (Feature::SystemActivation, 1)],
    );
    assert_eq!(reconcile(c).await.outcome(), pb::ReconcileOutcome::Rejected);

    pbx.write_license(
        Edition::Business,
        2,
        &[(Feature::User, 3), (Feature::SystemActivation, 1)],
    );
    assert_eq!(reconcile(c).await.outcome(), pb::ReconcileOutcome::Updated);
    let o = overview(c).await;
    assert!(o.system_activated);
    let sa = entitlement(&o.entitlements, "system_activation");
    assert_eq!((sa.quantity, sa.in_use), (1, 1));
    let a = assigned(c, "alice", "").await;
    assert!(a.created);
    assert_eq!(a.seat.unwrap().source(), pb::SeatSource::Purchased);
    let ck = checked(c, "alice", "").await;
    assert!(ck.licensed);
    assert_eq!(ck.reason(), pb::SeatReason::Assigned);
    // Activated: a user without a seat is now simply not assigned.
    assert_eq!(
        checked(c, "carol", "").await.reason(),
        pb::SeatReason::NotAssigned
    );

    // A later license without system activation: the seat stays, unlicensed.
    pbx.write_license(Edition::Business, 3, &[(Feature::User, 3)]);
    assert_eq!(reconcile(c).await.outcome(), pb::ReconcileOutcome::Updated);
    let ck = checked(c, "alice", "").await;
    assert!(!ck.licensed);
    assert_eq!(ck.reason(), pb::SeatReason::NotActivated);
    assert_eq!(ck.source(), pb::SeatSource::Purchased);
    assert!(!overview(c).await.system_activated);
    assert_precondition(assign(c, "bob", "").await, "NOT_ACTIVATED", "deactivated");
    assert_eq!(list_seats(c, "", 0).await.expect("ListSeats").len(), 1);
}

// ---------------------------------------------------------------------------
// Reconcile and overview
// ---------------------------------------------------------------------------

/// A smaller license leaves seats over capacity: the overview counts them per
/// feature with the end of their grace, and explains the activation state.
#[tokio::test]
async fn overview_names_over_capacity_seats_and_their_grace() {
    let pbx = Pbx::licensed("overcap", Edition::Vm, Some(&[(Feature::User, 3)])).await;
    let c = &mut pbx.client.clone();
    for user in ["alice", "bob", "carol"] {
        assigned(c, user, "").await;
    }
    let o = overview(c).await;
    assert!(o.over_capacity.is_empty(), "{:?}", o.over_capacity);
    assert!(
        o.activation_reason.contains("confirmed"),
        "{}",
        o.activation_reason
    );

    pbx.write_license(Edition::Vm, 1, &[(Feature::User, 1)]);
    let before = Utc::now();
    assert_eq!(reconcile(c).await.outcome(), pb::ReconcileOutcome::Updated);
    let o = overview(c).await;
    assert_eq!(o.over_capacity.len(), 1, "{:?}", o.over_capacity);
    let over = &o.over_capacity[0];
    assert_eq!((over.feature.as_str(), over.seats), ("user", 2));
    // The default over-capacity grace is 14 days from the reconcile that flagged them.
    let ends = time(over.grace_ends_at.as_ref().unwrap());
    let grace = chrono::Duration::days(14);
    assert!(
        ends >= before + grace - chrono::Duration::seconds(1) && ends <= Utc::now() + grace,
        "{ends}"
    );
    // Still licensed until then.
    assert!(checked(c, "carol", "").await.licensed);
}

#[tokio::test]
async fn reconcile_outcomes() {
    let pbx = Pbx::licensed("recon", Edition::Vm, Some(&[(Feature::User, 2)])).await;
    let c = &mut pbx.client.clone();
    assigned(c, "alice", "").await;

    let r = reconcile(c).await;
    assert_eq!(r.outcome(), pb::ReconcileOutcome::Unchanged);
    assert!(r.error.is_empty());
    assert!(r.reconciled_at.is_some());
    assert_eq!(entitlement(&r.entitlements, "user").quantity, 2);
    let good = overview(c).await;
    assert_eq!(
        good.last_reconcile_outcome(),
        pb::ReconcileOutcome::Unchanged
    );

    let expect_rejected = |r: pb::ReconcileResponse, what: &str| {
        assert_eq!(r.outcome(), pb::ReconcileOutcome::Rejected, "{what}: {r:?}");
        assert!(!r.error.is_empty(), "{what}");
        let e = entitlement(&r.entitlements, "user");
        assert_eq!((e.quantity, e.in_use), (2, 1), "{what}: unchanged");
    };

    // Signed by another key.
    let other = Vendor::new();
    other.write_license(
        &pbx.serial,
        Edition::Vm,
        pbx.t0 + chrono::Duration::hours(1),
        &[(Feature::User, 99)],
    );
    std::fs::copy(other.license_path(), pbx.vendor.license_path()).unwrap();
    expect_rejected(reconcile(c).await, "other key");
    let o = overview(c).await;
    assert_eq!(o.last_reconcile_outcome(), pb::ReconcileOutcome::Rejected);
    assert!(!o.last_reconcile_error.is_empty());
    // The last good entitlements still hold (ACTIVE, or GRACE while the source fails).
    assert!(
        matches!(
            o.activation_state(),
            pb::ActivationState::Active | pb::ActivationState::Grace
        ),
        "{o:?}"
    );
    assert_eq!(o.entitlements, good.entitlements);
    assert_eq!(
        o.last_reconciled_at, good.last_reconciled_at,
        "no success since"
    );
    // The old capacity still holds.
    assigned(c, "bob", "").await;
    assert_exhausted(assign(c, "carol", "").await, "user", 2, 2);
    release(c, "bob", "").await.unwrap();

    // For another serial number.
    pbx.vendor.write_license(
        &serial("foreign"),
        Edition::Vm,
        pbx.t0 + chrono::Duration::hours(1),
        &[(Feature::User, 99)],
    );
    expect_rejected(reconcile(c).await, "foreign serial");

    // Not a license at all.
    std::fs::write(pbx.vendor.license_path(), "{not json").unwrap();
    expect_rejected(reconcile(c).await, "malformed");

    // A newer document with another quantity.
    pbx.write_license(
        Edition::Vm,
        2,
        &[(Feature::User, 4), (Feature::CallAssist, 1)],
    );
    let r = reconcile(c).await;
    assert_eq!(r.outcome(), pb::ReconcileOutcome::Updated, "{r:?}");
    assert!(r.error.is_empty());
    let e = entitlement(&r.entitlements, "user");
    assert_eq!((e.quantity, e.in_use), (4, 1));
    let o = overview(c).await;
    assert_eq!(o.last_reconcile_outcome(), pb::ReconcileOutcome::Updated);
    assert_eq!(
        o.activation_state(),
        pb::ActivationState::Active,
        "confirmed again"
    );
    assert!(o.last_reconcile_error.is_empty());
    assert!(o.last_reconciled_at.is_some());
    let e = entitlement(&o.entitlements, "user");
    assert_eq!((e.quantity, e.in_use), (4, 1));
    let ca = entitlement(&o.entitlements, "call_assist");
    assert_eq!((ca.quantity, ca.in_use), (1, 0));
    for u in ["b", "c", "d"] {
        assigned(c, u, "").await;
    }
    assert_exhausted(assign(c, "e", "").await, "user", 4, 4);
    assign(c, "b", "call_assist").await.unwrap();
    let o = overview(c).await;
    assert_eq!(entitlement(&o.entitlements, "call_assist").in_use, 1);
    assert_eq!(
        reconcile(c).await.outcome(),
        pb::ReconcileOutcome::Unchanged
    );

    // An older document than the applied one.
    pbx.write_license(Edition::Vm, 1, &[(Feature::User, 10)]);
    let r = reconcile(c).await;
    assert_eq!(r.outcome(), pb::ReconcileOutcome::Rejected, "{r:?}");
    assert_eq!(entitlement(&r.entitlements, "user").quantity, 4);
    assert_exhausted(assign(c, "e", "").await, "user", 4, 4);

    // The source is gone.
    std::fs::remove_file(pbx.vendor.license_path()).unwrap();
    let r = reconcile(c).await;
    assert_eq!(r.outcome(), pb::ReconcileOutcome::Unreachable, "{r:?}");
    assert!(!r.error.is_empty());
    assert_eq!(entitlement(&r.entitlements, "user").quantity, 4);
    let o = overview(c).await;
    assert_eq!(
        o.last_reconcile_outcome(),
        pb::ReconcileOutcome::Unreachable
    );
    // Unreachable: the last good entitlements hold for the grace period.
    assert_eq!(o.activation_state(), pb::ActivationState::Grace, "{o:?}");
    assert!(o.grace_ends_at.is_some(), "{o:?}");
    assert!(checked(c, "alice", "").await.licensed);
}

#[tokio::test]
async fn overview_before_and_after_a_license() {
    let pbx = Pbx::licensed("overview", Edition::Vm, None).await;
    let c = &mut pbx.client.clone();
    let o = overview(c).await;
    assert_eq!(o.serial_number, pbx.serial);
    assert_eq!(o.edition(), pb::Edition::Vm);
    assert_eq!(o.activation_state(), pb::ActivationState::NotInitialized);
    assert!(o.entitlements.is_empty());
    assert!(o.last_reconciled_at.is_none());
    assert_eq!(
        o.last_reconcile_outcome(),
        pb::ReconcileOutcome::Unreachable
    );
    assert!(!o.license_source.is_empty());
    assert_eq!(o.tryout.unwrap().state(), pb::TryoutState::Available);

    pbx.write_license(
        Edition::Vm,
        0,
        &[(Feature::User, 3), (Feature::CallAssist, 2)],
    );
    let r = reconcile(c).await;
    assert_eq!(r.outcome(), pb::ReconcileOutcome::Updated);
    assigned(c, "alice", "").await;
    assigned(c, "bob", "").await;
    assign(c, "bob", "call_assist").await.unwrap();
    let o = overview(c).await;
    assert_eq!(o.serial_number, pbx.serial);
    assert_eq!(o.activation_state(), pb::ActivationState::Active);
    assert!(o.system_activated, "a licensed VM is activated");
    assert!(o.last_reconciled_at.is_some());
    assert_eq!(o.entitlements.len(), 2);
    let u = entitlement(&o.entitlements, "user");
    assert_eq!((u.quantity, u.in_use), (3, 2));
    assert!(u.expires_at.is_none());
    let ca = entitlement(&o.entitlements, "call_assist");
    assert_eq!((ca.quantity, ca.in_use), (2, 1));
    // Buying users forfeits the unused tryout.
    assert_eq!(o.tryout.unwrap().state(), pb::TryoutState::Unavailable);
}

// ---------------------------------------------------------------------------
// Health, shutdown
// ---------------------------------------------------------------------------

#[tokio::test]
async fn health_is_serving_and_a_stopped_server_refuses_calls() {
    let pbx = Pbx::unlicensed("health", None).await;
    let mut health = HealthClient::new(
        tonic::transport::Channel::from_shared(pbx.server.endpoint())
            .unwrap()
            .connect()
            .await
            .unwrap(),
    );
    for service in ["", SERVICE_NAME] {
        let r = health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.status(), ServingStatus::Serving, "{service:?}");
    }
    let unknown = health
        .check(HealthCheckRequest {
            service: "no.such.Service".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), Code::NotFound);

    let Pbx {
        server, mut client, ..
    } = pbx;
    let endpoint = server.endpoint();
    assert!(checked(&mut client, "x", "").await.reason() == pb::SeatReason::NotActivated);
    server.shutdown().await;
    let err = client
        .get_tryout_status(pb::GetTryoutStatusRequest::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(
        comtrexx_licensing::grpc::pb::licensing_service_client::LicensingServiceClient::connect(
            endpoint
        )
        .await
        .is_err(),
        "the port still takes connections"
    );
}

#[tokio::test]
async fn graceful_shutdown_lets_an_in_flight_call_finish() {
    let redis = RedisServer::start();
    let vendor = Vendor::new();
    let serial = serial("drain");
    vendor.write_license(&serial, Edition::Vm, Utc::now(), &[(Feature::User, 5)]);
    let config = RawConfig {
        // Longer than the pause below, so the call waits for Redis instead of failing.
        redis_timeout_ms: 20_000,
        ..licensed_config(Some(&redis), &serial, &vendor)
    };
    let server = TestServer::start(config.clone()).await;
    let addr = server.addr;
    let mut client = server.client().await;
    wait_startup_reconcile(&mut client).await;
    assigned(&mut client, "warm", "").await;

    // Hold every write in Redis, so the next AssignSeat stays in flight.
    let mut admin = redis.connection();
    let _: () = redis::cmd("CLIENT")
        .arg("PAUSE")
        .arg(15_000)
        .arg("WRITE")
        .query(&mut admin)
        .unwrap();
    let in_flight = tokio::spawn({
        let mut c = client.clone();
        async move { assign(&mut c, "late", "").await }
    });
    let waiting = eventually(WAIT, || {
        let list: String = redis::cmd("CLIENT").arg("LIST").query(&mut admin).unwrap();
        let held = list
            .lines()
            .any(|l| l.contains(" flags=b ") && l.contains(" cmd=eval"));
        async move { held }
    })
    .await;
    assert!(waiting, "the assignment never reached Redis");

    let mut stopping = tokio::spawn(server.shutdown());
    // Shutdown has begun once the listener is closed.
    let closed = eventually(WAIT, || async move {
        tokio::net::TcpStream::connect(addr).await.is_err()
    })
    .await;
    assert!(closed, "the listener did not close");
    // Shutdown waits for the call (a bounded look, not a synchronisation).
    assert!(
        tokio::time::timeout(Duration::from_millis(300), &mut stopping)
            .await
            .is_err(),
        "shutdown finished while a call was still in flight"
    );
    assert!(!in_flight.is_finished());
    let _: () = redis::cmd("CLIENT")
        .arg("UNPAUSE")
        .query(&mut admin)
        .unwrap();

    let done = tokio::time::timeout(WAIT, in_flight)
        .await
        .expect("the in-flight call finished")
        .unwrap();
    let done = done.expect("the in-flight call succeeded");
    assert!(done.created);
    tokio::time::timeout(WAIT, stopping)
        .await
        .expect("shutdown finished")
        .unwrap();

    // The seat was written.
    let again = TestServer::start(config).await;
    let mut c = again.client().await;
    let users = seat_holders(&mut c).await;
    assert_eq!(users, ["late", "warm"]);
    again.shutdown().await;
}
