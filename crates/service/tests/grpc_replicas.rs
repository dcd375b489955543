//! Two replicas of the service on one Redis, with the same serial number and
//! license: capacity holds across them under concurrency, and what one replica
//! writes the other sees.

mod common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use chrono::Utc;
use common::*;
use comtrexx_licensing::config::RawConfig;
use comtrexx_licensing::domain::{Edition, Feature};
use comtrexx_licensing::grpc::pb;
use tonic::Code;
use tonic_types::StatusExt as _;

/// Upper bound for what one replica takes to see another's write.
const PROPAGATION: Duration = Duration::from_secs(3);
const WAIT: Duration = Duration::from_secs(10);

/// Two replicas A and B of one PBX on one Redis. Fields drop in order: the
/// replicas stop before their Redis.
struct Pair {
    a: TestServer,
    b: TestServer,
    vendor: Vendor,
    serial: String,
    redis: RedisServer,
}

impl Pair {
    /// Starts A and B; with `license`, waits until both trust it.
    async fn start(tag: &str, license: Option<&[(Feature, u32)]>, redis_timeout_ms: u64) -> Self {
        let redis = RedisServer::start();
        let vendor = Vendor::new();
        let serial = serial(tag);
        let config = match license {
            Some(entitlements) => {
                vendor.write_license(
                    &serial,
                    Edition::Vm,
                    Utc::now() - chrono::Duration::hours(1),
                    entitlements,
                );
                licensed_config(Some(&redis), &serial, &vendor)
            }
            None => config(Some(&redis), &serial),
        };
        let config = without_load_limits(RawConfig {
            redis_timeout_ms,
            ..config
        });
        let (a, b) = tokio::join!(TestServer::start(config.clone()), TestServer::start(config));
        let pair = Self {
            a,
            b,
            vendor,
            serial,
            redis,
        };
        if license.is_some() {
            for server in [&pair.a, &pair.b] {
                let c = server.client().await;
                let active = eventually(WAIT, || {
                    let mut c = c.clone();
                    async move {
                        overview(&mut c).await.activation_state() == pb::ActivationState::Active
                    }
                })
                .await;
                assert!(active, "replica {} never applied the license", server.addr);
            }
        }
        pair
    }

    /// `n` clients, each with its own connection, alternating between A and B.
    async fn clients(&self, n: usize) -> Vec<Client> {
        let mut clients = Vec::with_capacity(n);
        for i in 0..n {
            let server = if i % 2 == 0 { &self.a } else { &self.b };
            clients.push(server.client().await);
        }
        clients
    }
}

/// Polls `c` until the user's CheckSeat is `licensed`; returns how long it took.
async fn until_licensed(c: &Client, user: &str, licensed: bool) -> Duration {
    let started = Instant::now();
    let seen = eventually(PROPAGATION, || {
        let mut c = c.clone();
        async move { checked(&mut c, user, "").await.licensed == licensed }
    })
    .await;
    assert!(
        seen,
        "{user} not seen as licensed={licensed} within {PROPAGATION:?}"
    );
    started.elapsed()
}

/// Polls until both replicas' overviews count `in_use` user seats.
async fn until_in_use(pair: &Pair, in_use: u32) {
    for server in [&pair.a, &pair.b] {
        let c = server.client().await;
        let seen = eventually(PROPAGATION, || {
            let mut c = c.clone();
            async move {
                overview(&mut c)
                    .await
                    .entitlements
                    .iter()
                    .any(|e| e.feature == "user" && e.in_use == in_use)
            }
        })
        .await;
        assert!(seen, "replica {} never counted {in_use} seats", server.addr);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_assignments_never_exceed_capacity() {
    // A generous Redis timeout: this test is about the capacity invariant under
    // load, not about timeouts (tests/grpc_outage.rs covers those).
    let pair = Pair::start("race", Some(&[(Feature::User, 50)]), 5_000).await;
    let clients = pair.clients(8).await;

    let tasks: Vec<_> = (0..1000)
        .map(|i| {
            let mut c = clients[i % clients.len()].clone();
            let user = format!("user-{i:04}");
            tokio::spawn(async move {
                let result = assign(&mut c, &user, "").await;
                (user, result)
            })
        })
        .collect();
    let mut granted = BTreeSet::new();
    let mut exhausted = 0;
    for task in tasks {
        let (user, result) = task.await.unwrap();
        match result {
            Ok(r) => {
                assert!(r.created, "{user}: {r:?}");
                assert_eq!(r.seat.unwrap().user_id, user);
                granted.insert(user);
            }
            Err(s) if s.code() == Code::ResourceExhausted => {
                let info = s.get_details_error_info().expect("ErrorInfo");
                assert_eq!(info.reason, "NO_FREE_SEAT");
                assert_eq!(info.metadata["capacity"], "50", "{info:?}");
                exhausted += 1;
            }
            Err(s) => panic!("{user}: unexpected {s:?}"),
        }
    }
    assert_eq!(granted.len(), 50);
    assert_eq!(exhausted, 950);

    for server in [&pair.a, &pair.b] {
        let mut c = server.client().await;
        let listed = seat_holder_set(&mut c).await;
        assert_eq!(listed, granted, "replica {}", server.addr);
    }
    until_in_use(&pair, 50).await;
    let mut b = pair.b.client().await;
    let err = assign(&mut b, "one-more", "").await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_assignments_of_one_user_create_one_seat() {
    let pair = Pair::start("same", Some(&[(Feature::User, 5)]), 5_000).await;
    let clients = pair.clients(4).await;
    let tasks: Vec<_> = (0..100)
        .map(|i| {
            let mut c = clients[i % clients.len()].clone();
            tokio::spawn(async move { assign(&mut c, "alice", "").await })
        })
        .collect();
    let mut created = 0;
    let mut seats_seen = BTreeSet::new();
    for task in tasks {
        let r = task.await.unwrap().expect("every assignment is OK");
        created += usize::from(r.created);
        let seat = r.seat.unwrap();
        assert_eq!(seat.source(), pb::SeatSource::Purchased);
        seats_seen.insert(format!("{:?}", seat.assigned_at));
    }
    assert_eq!(created, 1, "exactly one call created the seat");
    assert_eq!(seats_seen.len(), 1, "every call returned the same seat");

    let mut a = pair.a.client().await;
    let listed = seats(&mut a).await;
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].user_id, "alice");
    until_in_use(&pair, 1).await;
}

#[tokio::test]
async fn writes_on_one_replica_are_seen_by_the_other() {
    let pair = Pair::start("see", Some(&[(Feature::User, 2)]), 250).await;
    let mut a = pair.a.client().await;
    let mut b = pair.b.client().await;

    assert!(!checked(&mut b, "alice", "").await.licensed);
    assert!(assign(&mut a, "alice", "").await.unwrap().created);
    let took = until_licensed(&b, "alice", true).await;
    println!("assign on A seen by B after {took:?}");
    let on_b = checked(&mut b, "alice", "").await;
    assert_eq!(on_b.reason(), pb::SeatReason::Assigned);
    assert_eq!(on_b.source(), pb::SeatSource::Purchased);
    assert!(!on_b.stale);

    assert!(released(&mut a, "alice", "").await);
    let took = until_licensed(&b, "alice", false).await;
    println!("release on A seen by B after {took:?}");
    assert_eq!(
        checked(&mut b, "alice", "").await.reason(),
        pb::SeatReason::NotAssigned
    );

    // And the other way round.
    assert!(assign(&mut b, "bob", "").await.unwrap().created);
    let took = until_licensed(&a, "bob", true).await;
    println!("assign on B seen by A after {took:?}");
    // B's seat counts on A.
    assert!(assign(&mut a, "carol", "").await.unwrap().created);
    let err = assign(&mut a, "dave", "").await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted);
    let err = assign(&mut b, "dave", "").await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted);

    // A license applied on A raises the capacity on B at once: B re-plans
    // instead of refusing with the old capacity.
    pair.vendor
        .write_license(&pair.serial, Edition::Vm, Utc::now(), &[(Feature::User, 3)]);
    let r = a
        .reconcile(pb::ReconcileRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.outcome(), pb::ReconcileOutcome::Updated);
    let d = assign(&mut b, "dave", "")
        .await
        .expect("B uses the new capacity");
    assert!(d.created);
    let err = assign(&mut a, "erin", "").await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted);
    let r = b
        .reconcile(pb::ReconcileRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.outcome(), pb::ReconcileOutcome::Unchanged);
    until_in_use(&pair, 3).await;
}

#[tokio::test]
async fn tryout_is_shared_by_the_replicas() {
    let pair = Pair::start("trysee", None, 250).await;
    let mut a = pair.a.client().await;
    let mut b = pair.b.client().await;

    let started = a
        .start_tryout(pb::StartTryoutRequest {})
        .await
        .unwrap()
        .into_inner()
        .status
        .unwrap();
    assert_eq!(started.state(), pb::TryoutState::Active);
    let on_b = eventually(PROPAGATION, || {
        let mut b = b.clone();
        async move { tryout(&mut b).await.state() == pb::TryoutState::Active }
    })
    .await;
    assert!(on_b, "B never saw the tryout A started");
    let seen = tryout(&mut b).await;
    assert_eq!(seen.started_at, started.started_at);
    assert_eq!(seen.ends_at, started.ends_at);
    let err = b.start_tryout(pb::StartTryoutRequest {}).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);

    // The three test seats are shared.
    assign(&mut a, "t1", "").await.unwrap();
    assign(&mut b, "t2", "").await.unwrap();
    assign(&mut a, "t3", "").await.unwrap();
    let err = assign(&mut b, "t4", "").await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted);

    // Ended on B: A's test seats are over.
    let ended = b
        .end_tryout(pb::EndTryoutRequest {})
        .await
        .unwrap()
        .into_inner()
        .status
        .unwrap();
    assert_eq!(ended.state(), pb::TryoutState::Ended);
    until_licensed(&a, "t1", false).await;
    assert_eq!(
        checked(&mut a, "t1", "").await.reason(),
        pb::SeatReason::TryoutOver
    );
    assert_eq!(tryout(&mut a).await.state(), pb::TryoutState::Ended);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_tryout_starts_succeed_once() {
    let pair = Pair::start("tryrace", None, 5_000).await;
    let clients = pair.clients(10).await;
    let tasks: Vec<_> = clients
        .into_iter()
        .map(|mut c| tokio::spawn(async move { c.start_tryout(pb::StartTryoutRequest {}).await }))
        .collect();
    let mut ok = Vec::new();
    for task in tasks {
        match task.await.unwrap() {
            Ok(r) => ok.push(r.into_inner().status.unwrap()),
            Err(s) => {
                assert_eq!(s.code(), Code::FailedPrecondition, "{s:?}");
                let info = s.get_details_error_info().expect("ErrorInfo");
                assert_eq!(info.reason, "TRYOUT_NOT_AVAILABLE");
            }
        }
    }
    assert_eq!(ok.len(), 1, "exactly one start wins: {ok:?}");
    for server in [&pair.a, &pair.b] {
        let c = server.client().await;
        let same = eventually(PROPAGATION, || {
            let mut c = c.clone();
            let started_at = ok[0].started_at;
            async move {
                let t = tryout(&mut c).await;
                t.state() == pb::TryoutState::Active && t.started_at == started_at
            }
        })
        .await;
        assert!(same, "replica {} disagrees on the tryout", server.addr);
    }
}

/// Sums the `calls` of the given commands in Redis's INFO commandstats.

#[tokio::test]
async fn idle_replicas_follow_the_change_feed() {
    let pair = Pair::start("idle", Some(&[(Feature::User, 2)]), 250).await;
    let redis = &pair.redis;
    let scripts = || command_calls(redis, &["eval", "evalsha"]);
    let feed_reads = || command_calls(redis, &["xread"]);
    let (scripts_before, reads_before) = (scripts(), feed_reads());
    // An observation window, not a synchronisation: idle replicas should only
    // wait on the change feed (one blocking read per feed_wait, 500 ms), and
    // read a full snapshot only every resync_interval (30 s).
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (scripts_run, reads) = (scripts() - scripts_before, feed_reads() - reads_before);
    println!("two idle replicas in 1 s: {scripts_run} scripts, {reads} feed reads");
    assert!(
        scripts_run <= 4,
        "two idle replicas ran {scripts_run} Lua scripts in 1 s: the mirror re-reads \
         full snapshots in a loop instead of following the change feed"
    );
    assert!(reads >= 1, "the mirror never read the change feed");
}
