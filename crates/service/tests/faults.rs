//! The fault suite: real `redis-server` processes, real gRPC, a TCP proxy between
//! service and Redis. Every case asserts the invariants of ARCHITECTURE.md:
//!
//! - I1 licensed seats of a pool ≤ its capacity, on every replica;
//! - I2 an acknowledged write is restored, or reported lost (overview, event);
//! - I3 CheckSeat answers a licensed user within its budget through the fault;
//! - I4 replicas and store converge soon after the fault ends (polled, bounded);
//! - I5 the tryout never starts twice; a consumed nonce is never accepted again.
//!
//! docs/reliability.md lists the cases and what each shows.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use common::proxy::{Fault, FaultProxy};
use common::*;
use comtrexx_licensing::config::RawConfig;
use comtrexx_licensing::grpc::pb;
use tonic::Code;

/// How soon replicas and store must agree after a fault ends (I4): one second,
/// plus slack for a loaded test machine.
const CONVERGE: Duration = Duration::from_millis(1500);
/// How long CheckSeat may take during a fault (I3): it never waits for Redis;
/// the bound is generous for a loaded, shared test machine.
const CHECK_BUDGET: Duration = Duration::from_millis(250);
/// How long a retried write may keep answering UNAVAILABLE while Redis comes back.
const WRITE_RETRY: Duration = Duration::from_secs(10);

/// Replicas of one PBX (one serial) on one Redis, and what clients were told.
struct Cluster {
    replicas: Vec<TestServer>,
    clients: Vec<Client>,
    /// Users told "assigned" (and not released since).
    acked: BTreeSet<String>,
    /// Users refused with RESOURCE_EXHAUSTED (never told "assigned").
    refused: BTreeSet<String>,
    tryout_started_at: Option<prost_types::Timestamp>,
    serial: String,
}

fn tryout_config(redis_url: &str, serial: &str, seats: u32) -> RawConfig {
    let mut config = config(None, serial);
    config.redis_url = Some(redis_url.to_owned());
    config.tryout.seats = seats;
    config
}

impl Cluster {
    /// The set-up of the rollback cases: i1 assigned, Redis saves an RDB, then
    /// i2 (replica 0) and i3 (replica 1) assigned and seen everywhere. Returns
    /// the RDB, which holds i1 only.
    async fn i1_saved_then_i2_i3(&mut self, redis: &RedisServer) -> std::path::PathBuf {
        assert_eq!(self.assign(0, "i1").await, Code::Ok);
        let rdb = redis.save_snapshot();
        assert_eq!(self.assign(0, "i2").await, Code::Ok);
        assert_eq!(self.assign(1, "i3").await, Code::Ok);
        self.converged(CONVERGE).await;
        rdb
    }

    /// `urls[i]` is the Redis URL replica i talks to (direct or through a proxy).
    async fn tryout(urls: &[String], tag: &str, seats: u32) -> Self {
        let serial = serial(tag);
        let mut replicas = Vec::new();
        let mut clients = Vec::new();
        for url in urls {
            let server = TestServer::start(tryout_config(url, &serial, seats)).await;
            clients.push(server.client().await);
            replicas.push(server);
        }
        let started = clients[0]
            .start_tryout(pb::StartTryoutRequest {})
            .await
            .expect("StartTryout")
            .into_inner();
        let mut cluster = Self {
            replicas,
            clients,
            acked: BTreeSet::new(),
            refused: BTreeSet::new(),
            tryout_started_at: None,
            serial,
        };
        cluster.tryout_started_at = started.status.and_then(|t| t.started_at);
        assert!(cluster.tryout_started_at.is_some());
        cluster
    }

    /// Assigns through replica `i`, retrying UNAVAILABLE (outcome unknown, safe to
    /// retry) within a bound; records what the client was told.
    async fn assign(&mut self, i: usize, user: &str) -> Code {
        let deadline = Instant::now() + WRITE_RETRY;
        loop {
            match assign(&mut self.clients[i], user, "").await {
                Ok(_) => {
                    self.acked.insert(user.to_owned());
                    return Code::Ok;
                }
                Err(s) if s.code() == Code::Unavailable && Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(s) => {
                    if s.code() == Code::ResourceExhausted {
                        self.refused.insert(user.to_owned());
                    }
                    return s.code();
                }
            }
        }
    }

    async fn licensed(&self, i: usize, user: &str) -> bool {
        licensed(&mut self.clients[i].clone(), user).await
    }

    async fn listed(&self, i: usize) -> Option<BTreeSet<String>> {
        let seats = list_seats(&mut self.clients[i].clone(), "", 1000)
            .await
            .ok()?;
        Some(seats.into_iter().map(|s| s.user_id).collect())
    }

    /// Every user the test has mentioned.
    fn users(&self) -> BTreeSet<String> {
        self.acked.union(&self.refused).cloned().collect()
    }

    /// What replica `i` answers for every user, its listing and its overview's
    /// seat counts and tryout: the view that must agree everywhere (I4).
    async fn view(&self, i: usize) -> Option<(BTreeMap<String, bool>, BTreeSet<String>, String)> {
        let mut checks = BTreeMap::new();
        for user in self.users() {
            checks.insert(user.clone(), self.licensed(i, &user).await);
        }
        let listed = self.listed(i).await?;
        let o = overview(&mut self.clients[i].clone()).await;
        let tryout = o.tryout.unwrap_or_default();
        let summary = format!(
            "tryout {:?} {:?} seats {}/{}; repair {:?} restored {} lost {:?}",
            tryout.state,
            tryout.started_at,
            tryout.test_seats_used,
            tryout.test_seats_total,
            o.last_store_repair_at,
            o.writes_restored,
            o.lost_writes
        );
        Some((checks, listed, summary))
    }

    /// I4: polls (bounded) until every replica answers the same and its listing
    /// matches its CheckSeat answers; returns the agreed view.
    async fn converged(&self, within: Duration) -> (BTreeMap<String, bool>, BTreeSet<String>) {
        let started = Instant::now();
        let mut last = Vec::new();
        loop {
            let mut views = Vec::new();
            for i in 0..self.clients.len() {
                views.push(self.view(i).await);
            }
            let first = views[0].clone();
            let agree = first.as_ref().is_some_and(|(checks, listed, _)| {
                let licensed: BTreeSet<String> = checks
                    .iter()
                    .filter(|(_, l)| **l)
                    .map(|(u, _)| u.clone())
                    .collect();
                views.iter().all(|v| v == &first) && licensed.is_subset(listed)
            });
            if agree {
                let (checks, listed, _) = first.unwrap();
                println!("converged after {:?}", started.elapsed());
                return (checks, listed);
            }
            assert!(
                started.elapsed() < within,
                "replicas did not converge within {within:?}: {views:#?} (before: {last:#?})"
            );
            last = views;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// I1, I2, I5 on the converged view: licensed ≤ capacity; every
    /// acknowledged seat licensed or named lost; the tryout started once.
    async fn assert_invariants(&self, capacity: usize) -> (BTreeSet<String>, Vec<String>) {
        let (checks, _) = self.converged(CONVERGE).await;
        let licensed: BTreeSet<String> = checks
            .iter()
            .filter(|(_, l)| **l)
            .map(|(u, _)| u.clone())
            .collect();
        assert!(
            licensed.len() <= capacity,
            "I1: {licensed:?} over capacity {capacity}"
        );
        let o = overview(&mut self.clients[0].clone()).await;
        let lost: Vec<String> = o.lost_writes.clone();
        for user in &self.acked {
            assert!(
                licensed.contains(user) || lost.iter().any(|l| l.contains(&format!("/{user} "))),
                "I2: {user} was acknowledged, is not licensed and not reported lost ({lost:?})"
            );
        }
        for i in 0..self.clients.len() {
            let t = overview(&mut self.clients[i].clone())
                .await
                .tryout
                .unwrap_or_default();
            assert_eq!(
                t.started_at, self.tryout_started_at,
                "I5: the tryout start moved on replica {i}"
            );
        }
        (licensed, lost)
    }

    /// I3: CheckSeat of a licensed user answers within its budget, on every replica.
    async fn assert_check_fast(&self, user: &str) {
        for i in 0..self.clients.len() {
            self.assert_check_fast_on(i, user).await;
        }
    }

    async fn assert_check_fast_on(&self, i: usize, user: &str) {
        let started = Instant::now();
        let licensed = self.licensed(i, user).await;
        let took = started.elapsed();
        assert!(licensed, "I3: {user} not licensed on replica {i}");
        assert!(took < CHECK_BUDGET, "I3: CheckSeat took {took:?}");
    }
}

fn set(users: &[&str]) -> BTreeSet<String> {
    users.iter().map(|u| (*u).to_owned()).collect()
}

/// The reproduction of issue "Redis comes back with older data": two replicas,
/// a tryout of 3 seats, Redis restarted from an RDB that holds only i1. The
/// seats the store lost are written back before any new write lands, so i4/i5
/// find the pool full and are refused: nobody told "assigned" loses the seat.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn restart_from_older_snapshot_restores_acknowledged_seats() {
    let mut redis = RedisServer::start();
    let mut c = Cluster::tryout(&[redis.url(), redis.url()], "rdb", 3).await;
    let rdb = c.i1_saved_then_i2_i3(&redis).await;

    redis.restart_from(&rdb);
    c.assert_check_fast("i2").await;
    assert_eq!(c.assign(0, "i4").await, Code::ResourceExhausted);
    assert_eq!(c.assign(1, "i5").await, Code::ResourceExhausted);

    let (licensed, lost) = c.assert_invariants(3).await;
    assert_eq!(licensed, set(&["i1", "i2", "i3"]));
    assert!(lost.is_empty(), "{lost:?}");
    let o = overview(&mut c.clients[1].clone()).await;
    assert!(o.writes_restored >= 2, "{o:?}");
    assert!(o.last_store_repair_at.is_some());
}

/// The same with room in the pool: old and new seats are licensed everywhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn restart_from_older_snapshot_keeps_old_and_new_seats() {
    let mut redis = RedisServer::start();
    let mut c = Cluster::tryout(&[redis.url(), redis.url()], "rdb5", 5).await;
    let rdb = c.i1_saved_then_i2_i3(&redis).await;

    redis.restart_from(&rdb);
    assert_eq!(c.assign(0, "i4").await, Code::Ok);
    assert_eq!(c.assign(1, "i5").await, Code::Ok);
    let (licensed, _) = c.assert_invariants(5).await;
    assert_eq!(licensed, set(&["i1", "i2", "i3", "i4", "i5"]));
}

/// A replica cut off while the store goes back; another replica, which never
/// saw the lost writes, fills the pool on the rolled-back store (the versions
/// even line up again). When the cut-off replica returns, it notices that the
/// store's history is not its own, cannot write i2/i3 back (the pool is full)
/// and reports them lost: overview, event, audit log.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn writes_lost_to_a_full_pool_are_reported() {
    let mut redis = RedisServer::start();
    let proxy = FaultProxy::start(redis.addr()).await;
    let mut c = Cluster::tryout(&[proxy.url()], "lost", 3).await;
    let mut events = c.clients[0]
        .watch_license_events(pb::WatchLicenseEventsRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(c.assign(0, "i1").await, Code::Ok);
    let rdb = redis.save_snapshot();
    assert_eq!(c.assign(0, "i2").await, Code::Ok);
    assert_eq!(c.assign(0, "i3").await, Code::Ok);

    proxy.set(Fault::Blackhole);
    redis.restart_from(&rdb);
    // A replica started now knows only what the rolled-back store holds.
    let late = TestServer::start(tryout_config(&redis.url(), &c.serial, 3)).await;
    c.clients.push(late.client().await);
    c.replicas.push(late);
    assert_eq!(c.assign(1, "i4").await, Code::Ok);
    assert_eq!(c.assign(1, "i5").await, Code::Ok);
    c.assert_check_fast_on(0, "i2").await;

    proxy.set(Fault::Pass);
    let (licensed, lost) = c.assert_invariants(3).await;
    assert_eq!(licensed, set(&["i1", "i4", "i5"]));
    assert_eq!(lost.len(), 2, "{lost:?}");
    let o = overview(&mut c.clients[1].clone()).await;
    assert_eq!(o.writes_lost, 2);
    let event = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            let e = events.message().await.unwrap().unwrap();
            if e.kind == "data_lost" {
                return e;
            }
        }
    })
    .await
    .expect("a data_lost event");
    assert!(
        event.detail.contains("i2") && event.detail.contains("i3"),
        "{event:?}"
    );
}

/// One fault of the connection between a replica and Redis (the other replica
/// talks to Redis directly): CheckSeat keeps answering, a write through the
/// faulty path answers UNAVAILABLE (outcome unknown) or OK, and its retry after
/// the fault is OK exactly once; everything converges.
async fn connection_fault(tag: &str, fault: Fault) {
    let redis = RedisServer::start();
    let proxy = FaultProxy::start(redis.addr()).await;
    let mut c = Cluster::tryout(&[proxy.url(), redis.url()], tag, 5).await;
    assert_eq!(c.assign(0, "u1").await, Code::Ok);
    assert_eq!(c.assign(1, "u2").await, Code::Ok);
    c.converged(CONVERGE).await;

    proxy.set(fault);
    c.assert_check_fast("u1").await;
    let during = c.clients[0]
        .assign_seat(pb::AssignSeatRequest {
            user_id: "u3".into(),
            feature: String::new(),
        })
        .await;
    match &during {
        Ok(_) => {
            c.acked.insert("u3".into());
        }
        Err(s) => assert_eq!(s.code(), Code::Unavailable, "{s:?}"),
    }
    assert_eq!(c.assign(1, "u4").await, Code::Ok);
    c.assert_check_fast_on(0, "u2").await;

    proxy.set(Fault::Pass);
    // Safe to retry whatever the first attempt did.
    assert_eq!(c.assign(0, "u3").await, Code::Ok);
    let (licensed, lost) = c.assert_invariants(5).await;
    assert_eq!(licensed, set(&["u1", "u2", "u3", "u4"]));
    assert!(lost.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn proxy_latency_beyond_the_redis_timeout() {
    connection_fault("latency", Fault::Latency(Duration::from_millis(400))).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn proxy_blackhole() {
    connection_fault("blackhole", Fault::Blackhole).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn proxy_connection_reset() {
    connection_fault("reset", Fault::Reset).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn proxy_half_open_connection() {
    connection_fault("halfopen", Fault::HalfOpen).await;
}

/// Redis killed (SIGKILL) and back empty, or flushed: the replicas write back
/// every seat and the tryout record; a new write goes through after that.
async fn store_loses_everything(tag: &str, lose: impl FnOnce(&mut RedisServer)) {
    let mut redis = RedisServer::start();
    let mut c = Cluster::tryout(&[redis.url(), redis.url()], tag, 5).await;
    for (i, user) in [(0, "u1"), (1, "u2"), (0, "u3")] {
        assert_eq!(c.assign(i, user).await, Code::Ok);
    }
    c.converged(CONVERGE).await;
    lose(&mut redis);
    c.assert_check_fast("u2").await;
    assert_eq!(c.assign(1, "u4").await, Code::Ok);
    let (licensed, lost) = c.assert_invariants(5).await;
    assert_eq!(licensed, set(&["u1", "u2", "u3", "u4"]));
    assert!(lost.is_empty());
    let o = overview(&mut c.clients[0].clone()).await;
    assert!(o.writes_restored >= 3, "{o:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_killed_and_restarted_empty() {
    store_loses_everything("empty", RedisServer::restart_empty).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_flushall() {
    store_loses_everything("flushall", |r| r.flushall()).await;
}

/// Redis frozen (SIGSTOP): its sockets stay open, nothing answers. CheckSeat
/// answers from memory; writes answer UNAVAILABLE within the timeout; after
/// SIGCONT everything converges and a retried write is applied once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_frozen_with_sigstop() {
    let redis = RedisServer::start();
    let mut c = Cluster::tryout(&[redis.url(), redis.url()], "sigstop", 5).await;
    assert_eq!(c.assign(0, "u1").await, Code::Ok);
    // Both replicas hold u1 before Redis freezes (the feed takes a moment to
    // bring it to replica 1; frozen, it would not bring it at all).
    c.converged(CONVERGE).await;
    redis.signal("-STOP");
    c.assert_check_fast("u1").await;
    let started = Instant::now();
    let r = c.clients[1]
        .assign_seat(pb::AssignSeatRequest {
            user_id: "u2".into(),
            feature: String::new(),
        })
        .await;
    assert_eq!(r.map(|_| ()).unwrap_err().code(), Code::Unavailable);
    assert!(started.elapsed() < Duration::from_secs(3));
    redis.signal("-CONT");
    assert_eq!(c.assign(1, "u2").await, Code::Ok);
    let (licensed, _) = c.assert_invariants(5).await;
    assert_eq!(licensed, set(&["u1", "u2"]));
}

/// A failover to a replica that lagged: a Redis replica is detached
/// (REPLICAOF NO ONE) after it had i1, the master takes i2 and i3 and dies,
/// and the service's address now leads to the detached replica. The seats it
/// lacks are written back.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn failover_to_a_lagging_replica() {
    let mut master = RedisServer::start();
    let standby = RedisServer::replica_of(&master);
    let proxy = FaultProxy::start(master.addr()).await;
    let mut c = Cluster::tryout(&[proxy.url(), proxy.url()], "failover", 5).await;
    assert_eq!(c.assign(0, "i1").await, Code::Ok);
    // The standby has everything up to i1, then lags for good.
    assert!(
        standby
            .caught_up_with(&master, Duration::from_secs(10))
            .await,
        "the standby never caught up"
    );
    standby.detach();
    assert_eq!(c.assign(0, "i2").await, Code::Ok);
    assert_eq!(c.assign(1, "i3").await, Code::Ok);
    c.converged(CONVERGE).await;

    master.kill();
    proxy.retarget(standby.addr()).await;
    c.assert_check_fast("i3").await;
    assert_eq!(c.assign(1, "i4").await, Code::Ok);
    let (licensed, lost) = c.assert_invariants(5).await;
    assert_eq!(licensed, set(&["i1", "i2", "i3", "i4"]));
    assert!(lost.is_empty());
}

/// The store goes back while the replicas are restarted one by one: the
/// replica that still holds the lost seats writes them back before it goes,
/// and the restarted replicas follow.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rollback_during_a_rolling_restart() {
    let mut redis = RedisServer::start();
    let mut c = Cluster::tryout(&[redis.url(), redis.url()], "rolling", 5).await;
    let rdb = c.i1_saved_then_i2_i3(&redis).await;

    redis.restart_from(&rdb);
    for i in 0..2 {
        // Replace replica i with a fresh one (no state of its own).
        let old = std::mem::replace(
            &mut c.replicas[i],
            TestServer::start(tryout_config(&redis.url(), &c.serial, 5)).await,
        );
        old.shutdown().await;
        c.clients[i] = c.replicas[i].client().await;
        assert_eq!(c.assign(i, &format!("n{i}")).await, Code::Ok);
    }
    let (licensed, lost) = c.assert_invariants(5).await;
    assert_eq!(licensed, set(&["i1", "i2", "i3", "n0", "n1"]));
    assert!(lost.is_empty());
}

/// Clock jumps (a manual clock): once the tryout has ended, setting the node
/// clock back does not bring it back, also on a replica started later with the
/// clock still wrong (the high-water clock is kept in the store); the rollback
/// is an event and an overview field. The tryout starts 15 days ago and ends
/// now: the store keeps a mark only up to its own time (Redis `TIME`), so the
/// time that ends it must be real.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn clock_jumps_back_and_time_does_not() {
    let redis = RedisServer::start();
    let serial = serial("clock");
    let clock = comtrexx_licensing::domain::ManualClock::new(
        chrono::Utc::now() - chrono::Duration::days(15),
    );
    let start = |clock: &comtrexx_licensing::domain::ManualClock| {
        TestServer::start_with_clock(
            tryout_config(&redis.url(), &serial, 3),
            std::sync::Arc::new(clock.clone()),
        )
    };
    let server = start(&clock).await;
    let mut c = server.client().await;
    let mut events = c
        .watch_license_events(pb::WatchLicenseEventsRequest {})
        .await
        .unwrap()
        .into_inner();
    c.start_tryout(pb::StartTryoutRequest {}).await.unwrap();
    c.assign_seat(pb::AssignSeatRequest {
        user_id: "t1".into(),
        feature: String::new(),
    })
    .await
    .unwrap();
    let check = |c: &Client| {
        let mut c = c.clone();
        async move {
            c.check_seat(pb::CheckSeatRequest {
                user_id: "t1".into(),
                feature: String::new(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
        }
    };
    assert!(check(&c).await.licensed);

    // The tryout ends; the schedule sees the new time.
    let ended = chrono::Utc::now();
    clock.set(ended);
    let seen = |c: &Client, at: chrono::DateTime<chrono::Utc>| {
        let c = c.clone();
        eventually(Duration::from_secs(5), move || {
            let mut c = c.clone();
            async move {
                overview(&mut c)
                    .await
                    .time_high_water
                    .is_some_and(|t| t.seconds >= at.timestamp())
            }
        })
    };
    assert!(seen(&c, ended).await, "the high-water clock never moved");
    assert!(!check(&c).await.licensed);

    // The node clock goes back five days: nothing comes back.
    clock.set(ended - chrono::Duration::days(5));
    let flagged = eventually(Duration::from_secs(3), || {
        let mut c = c.clone();
        async move { overview(&mut c).await.clock_rolled_back }
    })
    .await;
    assert!(flagged, "the rollback was not reported");
    let o = overview(&mut c).await;
    let t = o.tryout.unwrap();
    assert_eq!(t.state(), pb::TryoutState::Expired);
    assert_eq!(t.days_remaining, 0);
    assert!(o.time_high_water.unwrap().seconds >= ended.timestamp());
    let c1 = check(&c).await;
    assert!(!c1.licensed);
    assert_eq!(c1.reason(), pb::SeatReason::TryoutOver);
    let event = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            let e = events.message().await.unwrap().unwrap();
            if e.kind == "clock_rolled_back" {
                return e;
            }
        }
    })
    .await;
    assert!(event.is_ok(), "no clock_rolled_back event");

    // A replica started now, with the clock still wrong, reads the high-water
    // clock from the store.
    let late = start(&clock).await;
    let late_client = late.client().await;
    assert!(!check(&late_client).await.licensed);
    let t = overview(&mut late_client.clone()).await.tryout.unwrap();
    assert_eq!(t.state(), pb::TryoutState::Expired);
}

/// The licensing server answering UNAVAILABLE, bad signatures, or gone: the
/// reconcile reports it, seats stay licensed, writes go on, both replicas agree.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn licensing_server_faults_leave_seats_alone() {
    use comtrexx_licensing::config::RawLicensingServer;
    use comtrexx_licensing::grpc::vendor_pb::vendor_admin_service_client::VendorAdminServiceClient;
    use comtrexx_licensing::grpc::vendor_pb::{self as vpb, Fault as SimFault};

    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let mut sim = SimProcess::start(&dir.path().join("sim"), &[]);
    let sim_url = format!("http://127.0.0.1:{}", sim.port);
    let serial = serial("simfault");
    let mut admin = VendorAdminServiceClient::connect(sim_url.clone())
        .await
        .unwrap();
    admin
        .register_device(vpb::RegisterDeviceRequest {
            serial_number: serial.clone(),
            name: "PBX".into(),
            edition: vpb::Edition::Vm as i32,
        })
        .await
        .unwrap();
    admin
        .redeem_voucher(vpb::RedeemVoucherRequest {
            seat_model: 0,
            serial_number: serial.clone(),
            feature: "user".into(),
            quantity: 3,
            expires_at: None,
        })
        .await
        .unwrap();
    let config = RawConfig {
        vendor_public_key: Some(sim.public_key.clone()),
        licensing_server: RawLicensingServer {
            url: Some(sim_url),
            ca_file: None,
            timeout_ms: 500,
        },
        // The simulator over plain http.
        development_installation: true,
        ..config(Some(&redis), &serial)
    };
    let a = TestServer::start(config.clone()).await;
    let b = TestServer::start(config).await;
    let (mut ca, mut cb) = (a.client().await, b.client().await);
    ca.activate_online(pb::ActivateOnlineRequest {})
        .await
        .expect("ActivateOnline");
    for (c, user) in [(&mut ca, "p1"), (&mut cb, "p2")] {
        c.assign_seat(pb::AssignSeatRequest {
            user_id: user.into(),
            feature: String::new(),
        })
        .await
        .unwrap();
    }
    let faults: [(Option<SimFault>, pb::ReconcileOutcome); 3] = [
        (
            Some(SimFault::Unavailable),
            pb::ReconcileOutcome::Unreachable,
        ),
        (Some(SimFault::BadSignature), pb::ReconcileOutcome::Rejected),
        (None, pb::ReconcileOutcome::Unreachable),
    ];
    for (i, (fault, outcome)) in faults.into_iter().enumerate() {
        match fault {
            Some(f) => {
                admin
                    .set_fault(vpb::SetFaultRequest { fault: f as i32 })
                    .await
                    .unwrap();
            }
            None => sim.kill(),
        }
        let r = ca
            .reconcile(pb::ReconcileRequest {})
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.outcome(), outcome, "{fault:?}: {r:?}");
        let user = format!("q{i}");
        let assigned = cb
            .assign_seat(pb::AssignSeatRequest {
                user_id: user.clone(),
                feature: String::new(),
            })
            .await;
        let mut expect: Vec<String> = vec!["p1".into(), "p2".into()];
        if i == 0 {
            assert!(assigned.is_ok(), "{assigned:?}");
            expect.push(user);
        } else {
            // The third user seat of three is taken by q0.
            assert_eq!(assigned.unwrap_err().code(), Code::ResourceExhausted);
        }
        for c in [&ca, &cb] {
            for user in &expect {
                let started = Instant::now();
                let ck = c
                    .clone()
                    .check_seat(pb::CheckSeatRequest {
                        user_id: user.clone(),
                        feature: String::new(),
                        ..Default::default()
                    })
                    .await
                    .unwrap()
                    .into_inner();
                assert!(ck.licensed, "{user} after {fault:?}");
                assert!(started.elapsed() < CHECK_BUDGET);
            }
        }
        let agree = eventually(CONVERGE, || {
            let (mut ca, mut cb) = (ca.clone(), cb.clone());
            async move {
                let (oa, ob) = (overview(&mut ca).await, overview(&mut cb).await);
                oa.entitlements == ob.entitlements
                    && oa.last_reconcile_outcome == ob.last_reconcile_outcome
                    && oa.activation_state == ob.activation_state
            }
        })
        .await;
        assert!(agree, "replicas disagree after {fault:?}");
    }
}

/// A replica process killed (SIGKILL) in the middle of a burst of writes:
/// everything it acknowledged is in the store, and the store and the surviving
/// replica agree on every seat (a write cut off mid-way is wholly there or not).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replica_killed_mid_write() {
    use std::sync::{Arc, Mutex};
    let redis = RedisServer::start();
    let serial = serial("killed");
    let port = unused_port();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_comtrexx-licensing"))
        .arg("serve")
        .env("LICENSING_LISTEN_ADDR", format!("127.0.0.1:{port}"))
        .env("LICENSING_METRICS_ADDR", "")
        .env("LICENSING_REDIS_URL", redis.url())
        .env("LICENSING_SERIAL_NUMBER", &serial)
        .env("LICENSING_TRYOUT__SEATS", "1000")
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start the service binary");
    let survivor = TestServer::start(tryout_config(&redis.url(), &serial, 1000)).await;
    let mut s = survivor.client().await;
    s.start_tryout(pb::StartTryoutRequest {}).await.unwrap();
    let endpoint = format!("http://127.0.0.1:{port}");
    let doomed = eventually_some(Duration::from_secs(20), || {
        let endpoint = endpoint.clone();
        async move { Client::connect(endpoint).await.ok() }
    })
    .await
    .expect("the replica process never listened");
    let acked = Arc::new(Mutex::new(BTreeSet::new()));
    let mut writers = Vec::new();
    for w in 0..4 {
        let (mut c, acked) = (doomed.clone(), acked.clone());
        writers.push(tokio::spawn(async move {
            for i in 0..200 {
                let user = format!("k{w}-{i}");
                let r = c
                    .assign_seat(pb::AssignSeatRequest {
                        user_id: user.clone(),
                        feature: String::new(),
                    })
                    .await;
                match r {
                    Ok(_) => {
                        acked.lock().unwrap().insert(user);
                    }
                    Err(_) => return,
                }
            }
        }));
    }
    assert!(
        eventually(Duration::from_secs(20), || {
            let n = acked.lock().unwrap().len();
            async move { n >= 40 }
        })
        .await
    );
    child.kill().unwrap();
    child.wait().unwrap();
    for w in writers {
        w.await.unwrap();
    }
    let acked = acked.lock().unwrap().clone();
    // The store (ListSeats) and the survivor's CheckSeat agree on every user.
    let listed = Arc::new(Mutex::new(BTreeSet::new()));
    let converged = eventually(CONVERGE, || {
        let mut s = s.clone();
        let slot = listed.clone();
        let acked = acked.clone();
        async move {
            let seats: BTreeSet<String> = s
                .list_seats(pb::ListSeatsRequest {
                    feature: String::new(),
                    page_size: 1000,
                    page_token: String::new(),
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner()
                .seats
                .into_iter()
                .map(|s| s.user_id)
                .collect();
            *slot.lock().unwrap() = seats.clone();
            let mut agree = acked.is_subset(&seats);
            for w in 0..4 {
                for i in 0..200 {
                    let user = format!("k{w}-{i}");
                    let licensed = s
                        .check_seat(pb::CheckSeatRequest {
                            user_id: user.clone(),
                            feature: String::new(),
                            ..Default::default()
                        })
                        .await
                        .unwrap()
                        .into_inner()
                        .licensed;
                    agree &= licensed == seats.contains(&user);
                }
            }
            agree
        }
    })
    .await;
    let listed = listed.lock().unwrap().clone();
    assert!(
        converged,
        "store and survivor disagree: acked {acked:?} listed {listed:?}"
    );
    println!(
        "acknowledged {}, in the store {}",
        acked.len(),
        listed.len()
    );
}

/// A fresh deployment on an empty Redis is writable as soon as it serves: the
/// first writes go through at once, without UNAVAILABLE.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fresh_deployment_is_writable_at_once() {
    let redis = RedisServer::start();
    let serial = serial("fresh");
    let a = TestServer::start_unsynced(tryout_config(&redis.url(), &serial, 3)).await;
    let b = TestServer::start_unsynced(tryout_config(&redis.url(), &serial, 3)).await;
    let (mut ca, mut cb) = (a.client().await, b.client().await);
    ca.start_tryout(pb::StartTryoutRequest {})
        .await
        .expect("the first write goes through");
    for (c, user) in [(&mut ca, "f1"), (&mut cb, "f2")] {
        c.assign_seat(pb::AssignSeatRequest {
            user_id: user.into(),
            feature: String::new(),
        })
        .await
        .expect("assignments go through at once");
    }
    let agree = eventually(CONVERGE, || {
        let (mut ca, mut cb) = (ca.clone(), cb.clone());
        async move {
            let (oa, ob) = (overview(&mut ca).await, overview(&mut cb).await);
            oa.tryout == ob.tryout && oa.tryout.is_some_and(|t| t.test_seats_used == 2)
        }
    })
    .await;
    assert!(agree, "the replicas never agreed");
}
