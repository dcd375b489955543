//! Read your writes on any replica (API.md, "Versions"): two replicas of the
//! service on one real Redis. A write's response carries the version at which
//! its outcome is visible; a read with that `min_version` on the other replica
//! answers with it, never with the state before it; a version far ahead is
//! refused after the wait; versions only grow, also across a store that lost
//! writes and was repaired.

mod common;

use std::time::{Duration, Instant};

use chrono::Utc;
use common::*;
use comtrexx_licensing::config::RawConfig;
use comtrexx_licensing::domain::{Edition, Feature};
use comtrexx_licensing::grpc::pb;
use tonic::Code;
use tonic_types::StatusExt as _;

const WAIT: Duration = Duration::from_secs(10);
/// How long a write may keep answering UNAVAILABLE while Redis comes back.
const WRITE_RETRY: Duration = Duration::from_secs(10);

/// Two replicas A and B of one licensed PBX on one Redis. Fields drop in
/// order: the replicas stop before their Redis.
struct Pair {
    a: TestServer,
    b: TestServer,
    _vendor: Vendor,
    redis: RedisServer,
}

impl Pair {
    async fn start(tag: &str, users: u32) -> Self {
        let redis = RedisServer::start();
        let vendor = Vendor::new();
        let serial = serial(tag);
        vendor.write_license(
            &serial,
            Edition::Vm,
            Utc::now() - chrono::Duration::hours(1),
            &[(Feature::User, users)],
        );
        let config = without_load_limits(RawConfig {
            // This test is about versions, not about timeouts of a loaded machine.
            redis_timeout_ms: 5_000,
            ..licensed_config(Some(&redis), &serial, &vendor)
        });
        let (a, b) = tokio::join!(TestServer::start(config.clone()), TestServer::start(config));
        for server in [&a, &b] {
            wait_active(&server.client().await).await;
        }
        Self {
            a,
            b,
            _vendor: vendor,
            redis,
        }
    }
}

/// Assigns through `c`, retrying UNAVAILABLE (outcome unknown, safe to retry)
/// while Redis comes back; the answer.
async fn assign_retrying(c: &mut Client, user: &str) -> pb::AssignSeatResponse {
    let deadline = Instant::now() + WRITE_RETRY;
    loop {
        match assign(c, user, "").await {
            Ok(answer) => return answer,
            Err(s) if s.code() == Code::Unavailable && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(s) => panic!("AssignSeat {user}: {s:?}"),
        }
    }
}

/// The test of the feature: assign on A, then at once CheckSeat on B with the
/// assignment's version, two thousand times (fifty at a time): never a
/// refusal. Without `min_version` the same race may see the feed's lag (it is
/// counted and printed, not asserted: that is what `min_version` is for).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_check_on_another_replica_with_the_write_version_never_refuses() {
    const USERS: usize = 2_000;
    const AT_ONCE: usize = 50;
    let pair = Pair::start("ryw", 2 * USERS as u32 + 10).await;
    let (a, b) = (pair.a.client().await, pair.b.client().await);

    let run = |prefix: &'static str, with_version: bool| {
        let (a, b) = (a.clone(), b.clone());
        async move {
            let tasks: Vec<_> = (0..AT_ONCE)
                .map(|t| {
                    let (mut a, mut b) = (a.clone(), b.clone());
                    tokio::spawn(async move {
                        let mut refused = Vec::new();
                        for i in (t..USERS).step_by(AT_ONCE) {
                            let user = format!("{prefix}-{i:05}");
                            let written = assigned(&mut a, &user, "").await;
                            assert!(written.created && written.version > 0, "{written:?}");
                            let min_version = if with_version { written.version } else { 0 };
                            let answer = check_at(&mut b, &user, min_version)
                                .await
                                .unwrap_or_else(|s| panic!("CheckSeat {user} on B: {s:?}"));
                            if with_version {
                                assert!(answer.version >= written.version, "{answer:?}");
                            }
                            if !answer.licensed {
                                refused.push((user, answer.reason()));
                            }
                        }
                        refused
                    })
                })
                .collect();
            let mut refused = Vec::new();
            for task in tasks {
                refused.extend(task.await.expect("task"));
            }
            refused
        }
    };

    let refused = run("ryw", true).await;
    assert!(
        refused.is_empty(),
        "{} of {USERS} checks on B with the assignment's version were refused, e.g. {:?}",
        refused.len(),
        &refused[..refused.len().min(5)]
    );
    let lagged = run("lag", false).await;
    println!(
        "without min_version, {} of {USERS} checks on B right after the assignment on A were refused",
        lagged.len()
    );
}

/// A version no write answered: UNAVAILABLE, reason NOT_YET_CONSISTENT, after
/// about `consistency.max_wait_ms` (default 100), saying where the copy is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_version_far_ahead_is_not_yet_consistent_after_the_wait() {
    let pair = Pair::start("ahead", 5).await;
    let (mut a, mut b) = (pair.a.client().await, pair.b.client().await);
    let version = assigned(&mut a, "alice", "").await.version;
    let started = Instant::now();
    let refused = check_at(&mut b, "alice", version + 1_000_000)
        .await
        .unwrap_err();
    let waited = started.elapsed();
    assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");
    let info = refused.get_error_details().error_info().cloned().unwrap();
    assert_eq!(info.reason, "NOT_YET_CONSISTENT");
    assert_eq!(
        info.metadata.get("min_version"),
        Some(&(version + 1_000_000).to_string())
    );
    let at: u64 = info.metadata["version"].parse().unwrap();
    assert!(at >= version, "{info:?}");
    assert!(waited >= Duration::from_millis(90), "{waited:?}");
    assert!(waited < Duration::from_secs(3), "{waited:?}");

    // The other reads refuse the same way; with a version reached they answer.
    let ahead = version + 1_000_000;
    let o = b
        .get_license_overview(pb::GetLicenseOverviewRequest { min_version: ahead })
        .await
        .unwrap_err();
    assert_eq!(o.code(), Code::Unavailable);
    let t = b
        .get_tryout_status(pb::GetTryoutStatusRequest { min_version: ahead })
        .await
        .unwrap_err();
    assert_eq!(t.code(), Code::Unavailable);
    let l = b
        .list_seats(pb::ListSeatsRequest {
            min_version: ahead,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(l.code(), Code::Unavailable);
    let o = b
        .get_license_overview(pb::GetLicenseOverviewRequest {
            min_version: version,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(o.version >= version);
    assert_eq!(o.entitlements[0].in_use, 1);
    let l = b
        .list_seats(pb::ListSeatsRequest {
            min_version: version,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(l.seats.len(), 1);
    assert!(l.version >= version);
}

/// Every write RPC's response carries a non-zero version, and one after the
/// other they only grow, whichever replica answers; a write that changed
/// nothing answers one at which the existing state is visible.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_write_answers_a_version_that_only_grows() {
    let pair = Pair::start("grow", 5).await;
    let (mut a, mut b) = (pair.a.client().await, pair.b.client().await);
    let mut versions = Vec::new();
    let mut push = |what: &str, v: u64| {
        assert!(v > 0, "{what} answered version 0");
        versions.push((what.to_owned(), v));
    };
    push("Reconcile", reconcile(&mut a).await.version);
    push("AssignSeat", assigned(&mut b, "alice", "").await.version);
    let again = assigned(&mut a, "alice", "").await;
    assert!(!again.created);
    push("AssignSeat again", again.version);
    // The no-op's version shows the seat on the other replica.
    assert!(
        check_at(&mut b, "alice", again.version)
            .await
            .unwrap()
            .licensed
    );
    let released = b
        .release_seat(pb::ReleaseSeatRequest {
            user_id: "alice".into(),
            feature: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(released.released);
    push("ReleaseSeat", released.version);
    let nothing = a
        .release_seat(pb::ReleaseSeatRequest {
            user_id: "alice".into(),
            feature: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!nothing.released);
    push("ReleaseSeat again", nothing.version);
    assert!(
        !check_at(&mut b, "alice", nothing.version)
            .await
            .unwrap()
            .licensed
    );
    let code = b
        .create_initialization_code(pb::CreateInitializationCodeRequest {})
        .await
        .unwrap()
        .into_inner();
    push("CreateInitializationCode", code.version);
    let reset = a
        .reset_activation(pb::ResetActivationRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(reset.overview.as_ref().unwrap().version <= reset.version);
    push("ResetActivation", reset.version);
    push("Reconcile after reset", reconcile(&mut b).await.version);
    let grew = versions.windows(2).all(|w| w[0].1 <= w[1].1);
    assert!(grew, "versions went back: {versions:?}");
    let changes: Vec<_> = versions
        .iter()
        .filter(|(what, _)| !what.ends_with("again"))
        .map(|(_, v)| *v)
        .collect();
    assert!(
        changes.windows(2).all(|w| w[0] < w[1]),
        "each change has a version of its own: {versions:?}"
    );
}

/// Versions only grow across a store that lost writes: Redis goes back to an
/// older snapshot (i2 and i3 lost), or loses everything. The replicas write
/// back what it lost; the next write's version is above every version answered
/// before, and a read with the lost write's version sees it.
async fn versions_grow_across_a_loss(tag: &str, rolled_back: bool) {
    let mut pair = Pair::start(tag, 10).await;
    let (mut a, mut b) = (pair.a.client().await, pair.b.client().await);
    assigned(&mut a, "i1", "").await;
    let rdb = pair.redis.save_snapshot();
    assigned(&mut a, "i2", "").await;
    let last = assigned(&mut b, "i3", "").await.version;
    // Both replicas hold i3 before Redis loses it.
    for c in [&mut a, &mut b] {
        assert!(check_at(c, "i3", last).await.unwrap().licensed);
    }
    if rolled_back {
        pair.redis.restart_from(&rdb);
    } else {
        pair.redis.flushall();
    }
    let next = assign_retrying(&mut a, "i4").await.version;
    assert!(next > last, "a version went back: {next} after {last}");
    // The lost write, by its version, on either replica (repaired meanwhile).
    for c in [&mut a, &mut b] {
        let seen = eventually(WAIT, || {
            let mut c = c.clone();
            async move {
                check_at(&mut c, "i3", last)
                    .await
                    .is_ok_and(|r| r.licensed && r.version >= last)
            }
        })
        .await;
        assert!(seen, "i3 not seen at version {last} after the repair");
    }
    let after = check_at(&mut b, "i4", next).await.unwrap();
    assert!(after.licensed && after.version >= next, "{after:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn versions_grow_across_a_rollback_and_its_repair() {
    versions_grow_across_a_loss("ryw-rollback", true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn versions_grow_across_a_flushed_store_and_its_restore() {
    versions_grow_across_a_loss("ryw-flush", false).await;
}
