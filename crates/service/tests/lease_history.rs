//! A history checker for leases: 8 concurrent clients over two replicas record
//! every `AcquireLease`, `RenewLeases`, `ReleaseLease` and `CheckSeat` with the
//! instants of invocation and response, under faults: Redis paused twice, the
//! network to replica A cut (every connection reset) and restored, a Redis
//! failover to a standby that missed the last writes, and replica B (a
//! process) killed with SIGKILL after it (calls then fail or time out with an
//! unknown outcome). Afterwards the history is checked against a sequential
//! model of the lease pool.
//!
//! The store's change feed is the order: every lease write is one feed entry
//! at its version, so the feed is the sequence of writes the store actually
//! made, including those whose answer was lost. The failover splits it in two.
//! The replicas reach Redis through a proxy; the standby replicates the master
//! until it is detached (`REPLICAOF NO ONE`), the clients write on for a
//! while, then the proxy stops passing bytes (the cut), the master's feed is
//! read directly (segment 1), the master is killed and the proxy sent to the
//! standby (the failover). The standby's feed up to the last version both
//! feeds share identically (`common`) is segment 1's; its entries after it
//! are segment 2: the replicas' repair (the leases they hold that the standby
//! lacks, written back while the quantity has room, the others reported lost
//! in an incident) and every write after the failover. The checker replays
//! segment 1 through the model, and the model's state at `common` followed by
//! segment 2, and asserts:
//!
//! - the model's invariants at every version of both: never more leases than
//!   the quantity, one lease per (user, holder), renewals and releases only of
//!   leases that exist (renewals by their holder); a lease written back by a
//!   repair counts like any other, is one the incident names and was granted
//!   in segment 1;
//! - every acknowledged write is the feed entry at the version it answered,
//!   with the outcome the model gives there (`created` exactly when new): in
//!   segment 1 when answered before the failover, else in segment 2 when the
//!   entry at its version there is this write, else in segment 1 (an answer
//!   that came late; never a call made after the failover);
//! - every write in either feed comes from a call that was made (acknowledged
//!   there, or with an unknown outcome), or from a repair;
//! - real time, within a segment: a write acknowledged before another call
//!   began has a lower version than that call's; a read answers at or after
//!   every version acknowledged before it began (and at or after its
//!   `min_version`);
//! - every read (`CheckSeat`, a release of nothing, a renewal that renewed
//!   nothing) answers the model's state at the version it reports; after the
//!   failover a replica may still answer from its pre-failover copy: the
//!   state of either segment is accepted, and those that only segment 1
//!   explains are counted;
//! - every "busy" refusal is explained: at some version within its interval
//!   (in one segment) the pool was full and the key held no lease;
//! - acknowledged grants lost in the failover are their own class: every lease
//!   granted in segment 1 after `common` (the standby never had it) was
//!   released before the failover, written back by a repair, or lost; every
//!   lost one is named in a repair's incident, and every renewal naming it
//!   after the failover answers it `lost`. The overview reports the last
//!   incident.
//!
//! Releases acknowledged in segment 1 after `common` of a lease the standby
//! held are undone by the failover: a repair does them again (an entry the
//! incident names, checked to come from a release that was called) unless the
//! store wrote that lease since (here: its holder renewed it, as these
//! clients keep renewing ids they released); the model follows the store, and
//! the run counts both.

mod common;

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::Utc;
use common::*;
use comtrexx_licensing::config::RawConfig;
use comtrexx_licensing::domain::{Edition, Feature, SeatModel, SerialNumber};
use comtrexx_licensing::grpc::pb;
use comtrexx_licensing::store::redis::RedisStore;
use comtrexx_licensing::store::{Change, ChangeKind, Incident, Store};
use comtrexx_licensing_test_support::proxy::{Fault, FaultProxy};
use rand::{Rng as _, SeedableRng as _};
use tonic::Code;

const CAPACITY: usize = 3;
const CLIENTS: usize = 8;
/// The pause between a client's calls.
const THINK: Duration = Duration::from_millis(20);
/// How long the clients write on the master after the standby stopped
/// following it: the writes the failover loses.
const DETACHED: Duration = Duration::from_millis(400);
/// How long the clients run after the failover before B is killed (the
/// replicas notice the store went back, repair it, and write on), and after.
const AFTER_FAILOVER: Duration = Duration::from_millis(1200);
const AFTER_KILL: Duration = Duration::from_millis(500);
const USERS: [&str; 6] = ["u0", "u1", "u2", "u3", "u4", "u5"];
const HOLDERS: [&str; 4] = ["h0", "h1", "h2", "h3"];

#[derive(Debug, Clone)]
enum Call {
    Acquire { user: String, holder: String },
    Renew { holder: String, ids: Vec<String> },
    Release { id: String },
    Check { user: String, min_version: u64 },
}

#[derive(Debug, Clone)]
enum Outcome {
    Acquired {
        id: String,
        created: bool,
        version: u64,
    },
    Busy,
    Renewed {
        renewed: Vec<String>,
        lost: Vec<String>,
        version: u64,
    },
    Released {
        released: bool,
        version: u64,
    },
    Checked {
        licensed: bool,
        version: u64,
    },
    /// No answer that says what happened (a timeout, Redis unreachable).
    Unknown(String),
}

#[derive(Debug, Clone)]
struct Event {
    client: usize,
    call: Call,
    invoked: Instant,
    answered: Instant,
    outcome: Outcome,
}

impl Outcome {
    /// The version a write's answer says it is visible at (writes only).
    fn write_version(&self) -> Option<u64> {
        match self {
            Outcome::Acquired { version, .. } => Some(*version),
            Outcome::Renewed {
                renewed, version, ..
            } if !renewed.is_empty() => Some(*version),
            Outcome::Released {
                released: true,
                version,
            } => Some(*version),
            _ => None,
        }
    }

    /// The version any answer reports (reads and writes).
    fn version(&self) -> Option<u64> {
        match self {
            Outcome::Acquired { version, .. }
            | Outcome::Renewed { version, .. }
            | Outcome::Released { version, .. }
            | Outcome::Checked { version, .. } => Some(*version),
            Outcome::Busy | Outcome::Unknown(_) => None,
        }
    }
}

impl Event {
    /// The feed entry an acknowledged write says it is (writes only).
    fn write(&self) -> Option<(u64, Write)> {
        let v = self.outcome.write_version()?;
        let w = match (&self.call, &self.outcome) {
            (Call::Acquire { user, holder }, Outcome::Acquired { id, .. }) => Write::Acquire {
                user: user.clone(),
                holder: holder.clone(),
                id: id.clone(),
            },
            (Call::Renew { holder, .. }, Outcome::Renewed { renewed, .. }) => Write::Renew {
                holder: holder.clone(),
                ids: sorted(renewed),
            },
            (Call::Release { id }, Outcome::Released { .. }) => Write::Release { id: id.clone() },
            _ => return None,
        };
        Some((v, w))
    }

    fn describe(&self) -> String {
        format!(
            "client {} {:?} -> {:?}",
            self.client, self.call, self.outcome
        )
    }
}

fn sorted(ids: &[String]) -> Vec<String> {
    let mut ids = ids.to_vec();
    ids.sort();
    ids
}

/// The model: the leases held (id → (user, holder)) after each version.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Pool {
    leases: BTreeMap<String, (String, String)>,
}

impl Pool {
    fn id_of(&self, user: &str, holder: &str) -> Option<&String> {
        self.leases
            .iter()
            .find(|(_, (u, h))| u == user && h == holder)
            .map(|(id, _)| id)
    }

    fn holds(&self, user: &str) -> bool {
        self.leases.values().any(|(u, _)| u == user)
    }
}

/// Runs one client until `stop`: random calls, recorded.
async fn client(
    n: usize,
    mut c: Client,
    known_ids: Arc<Mutex<Vec<String>>>,
    acked: Arc<AtomicU64>,
    history: Arc<Mutex<Vec<Event>>>,
    stop: Arc<AtomicBool>,
) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(n as u64 * 7919 + 1);
    let holder = HOLDERS[n % HOLDERS.len()].to_owned();
    let mut mine: Vec<String> = Vec::new();
    while !stop.load(Ordering::SeqCst) {
        tokio::time::sleep(THINK).await;
        // The instant of invocation comes before the call reads what was
        // acknowledged (its min_version), so that every answer before it is seen.
        let invoked = Instant::now();
        let call = match rng.gen_range(0..10) {
            0..=3 => Call::Acquire {
                user: USERS[rng.gen_range(0..USERS.len())].to_owned(),
                holder: holder.clone(),
            },
            4..=5 => {
                let mut ids = mine.clone();
                ids.push("ffffffffffffffffffffffffffffffff".into());
                Call::Renew {
                    holder: holder.clone(),
                    ids,
                }
            }
            6..=7 => {
                let known = known_ids.lock().unwrap().clone();
                match known.get(rng.gen_range(0..known.len().max(1))) {
                    Some(id) => Call::Release { id: id.clone() },
                    None => Call::Release {
                        id: "eeeeeeeeeeeeeeeeeeeeeeeeeeeeeeee".into(),
                    },
                }
            }
            _ => Call::Check {
                user: USERS[rng.gen_range(0..USERS.len())].to_owned(),
                min_version: acked.load(Ordering::SeqCst),
            },
        };
        let outcome = perform(&mut c, &call).await;
        // Published before the instant of the answer (see `invoked`).
        if let Some(v) = outcome.version() {
            acked.fetch_max(v, Ordering::SeqCst);
        }
        let answered = Instant::now();
        if let Outcome::Acquired { id, .. } = &outcome {
            if !mine.contains(id) {
                mine.push(id.clone());
            }
            known_ids.lock().unwrap().push(id.clone());
        }
        history.lock().unwrap().push(Event {
            client: n,
            call,
            invoked,
            answered,
            outcome,
        });
    }
}

async fn perform(c: &mut Client, call: &Call) -> Outcome {
    let unknown = |s: tonic::Status| Outcome::Unknown(format!("{:?}: {}", s.code(), s.message()));
    match call {
        Call::Acquire { user, holder } => match c
            .acquire_lease(pb::AcquireLeaseRequest {
                user_id: user.clone(),
                feature: String::new(),
                holder: holder.clone(),
            })
            .await
        {
            Ok(r) => {
                let r = r.into_inner();
                Outcome::Acquired {
                    id: r.lease.unwrap().lease_id,
                    created: r.created,
                    version: r.version,
                }
            }
            Err(s) if s.code() == Code::ResourceExhausted => Outcome::Busy,
            Err(s) => unknown(s),
        },
        Call::Renew { holder, ids } => match c
            .renew_leases(pb::RenewLeasesRequest {
                holder: holder.clone(),
                lease_ids: ids.clone(),
            })
            .await
        {
            Ok(r) => {
                let r = r.into_inner();
                Outcome::Renewed {
                    renewed: r.leases.into_iter().map(|l| l.lease_id).collect(),
                    lost: r.lost,
                    version: r.version,
                }
            }
            Err(s) => unknown(s),
        },
        Call::Release { id } => match c
            .release_lease(pb::ReleaseLeaseRequest {
                lease_id: id.clone(),
            })
            .await
        {
            Ok(r) => {
                let r = r.into_inner();
                Outcome::Released {
                    released: r.released,
                    version: r.version,
                }
            }
            Err(s) => unknown(s),
        },
        Call::Check { user, min_version } => match c
            .check_seat(pb::CheckSeatRequest {
                user_id: user.clone(),
                feature: String::new(),
                min_version: *min_version,
            })
            .await
        {
            Ok(r) => {
                let r = r.into_inner();
                Outcome::Checked {
                    licensed: r.licensed,
                    version: r.version,
                }
            }
            Err(s) => unknown(s),
        },
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn lease_histories_over_two_replicas_under_faults_are_linearizable() {
    // The master, and a standby replicating it; the replicas reach whichever
    // is the master through a proxy (a failover moves it).
    let mut redis = RedisServer::start();
    let standby = RedisServer::replica_of(&redis);
    let redis_proxy = FaultProxy::start(redis.addr()).await;
    let vendor = Vendor::new();
    let serial = serial("lease-history");
    vendor.write_license_with_models(
        &serial,
        Edition::Vm,
        Utc::now() - chrono::Duration::hours(1),
        &[(Feature::User, CAPACITY as u32, SeatModel::Concurrent)],
    );
    let mut config = without_load_limits(RawConfig {
        redis_timeout_ms: 300,
        redis_url: Some(redis_proxy.url()),
        ..licensed_config(None, &serial, &vendor)
    });
    // Long enough that nothing expires during the run: the model has no time.
    config.leases.duration_seconds = 3600;
    let a = TestServer::start(config.clone()).await;
    // B is a process, to be killed; each replica is reached through a proxy
    // whose connections can be cut.
    let mut b = service_process(&config);
    let b_addr: std::net::SocketAddr =
        format!("127.0.0.1:{}", b.endpoint().rsplit(':').next().unwrap())
            .parse()
            .unwrap();
    let to_a = FaultProxy::start(a.addr).await;
    let to_b = FaultProxy::start(b_addr).await;
    let via = |proxy: &FaultProxy| format!("http://{}", proxy.addr);
    for endpoint in [via(&to_a), via(&to_b)] {
        let c = eventually_some(Duration::from_secs(15), || {
            let endpoint = endpoint.clone();
            async move { Client::connect(endpoint).await.ok() }
        })
        .await
        .expect("the replica listens");
        wait_active(&c).await;
    }
    let start_version = {
        let mut c = a.client().await;
        overview(&mut c).await.version
    };
    assert!(
        standby
            .caught_up_with(&redis, Duration::from_secs(10))
            .await,
        "the standby never caught up"
    );
    let serial_number = SerialNumber::parse(&serial).unwrap();
    let store_at =
        |url: &str| RedisStore::new(url, &serial_number, Duration::from_secs(5)).unwrap();

    let known_ids = Arc::new(Mutex::new(Vec::new()));
    let acked = Arc::new(AtomicU64::new(start_version));
    let history = Arc::new(Mutex::new(Vec::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for n in 0..CLIENTS {
        let proxy = if n % 2 == 0 { &to_a } else { &to_b };
        let c = Client::connect(via(proxy)).await.unwrap();
        tasks.push(tokio::spawn(client(
            n,
            c,
            known_ids.clone(),
            acked.clone(),
            history.clone(),
            stop.clone(),
        )));
    }
    let run_started = Instant::now();
    // Redis pauses twice while the clients run (longer than the Redis timeout).
    let mut admin = redis.connection();
    for _ in 0..2 {
        tokio::time::sleep(Duration::from_millis(150)).await;
        let _: () = redis::cmd("CLIENT")
            .arg("PAUSE")
            .arg(500)
            .arg("ALL")
            .query(&mut admin)
            .unwrap();
        tokio::time::sleep(Duration::from_millis(600)).await;
    }
    // The network to A cut for a moment.
    to_a.set(Fault::Reset);
    tokio::time::sleep(Duration::from_millis(300)).await;
    to_a.set(Fault::Pass);
    tokio::time::sleep(Duration::from_millis(200)).await;

    // The failover: the standby stops following the master and misses what
    // the clients write next; then nothing reaches the master any more, its
    // feed is read (segment 1), it is killed and the standby takes its place.
    standby.detach();
    tokio::time::sleep(DETACHED).await;
    redis_proxy.set(Fault::Blackhole);
    let cut = Instant::now();
    // A script already inside Redis ends; none starts after this.
    tokio::time::sleep(Duration::from_millis(50)).await;
    let _: () = redis::cmd("CLIENT")
        .arg("PAUSE")
        .arg(60_000)
        .arg("WRITE")
        .query(&mut admin)
        .unwrap();
    let before = store_at(&redis.url()).history(start_version).await.unwrap();
    let standby_left_at = store_at(&standby.url())
        .history(start_version)
        .await
        .unwrap()
        .last()
        .map_or(start_version, |c| c.version);
    redis.kill();
    redis_proxy.retarget(standby.addr()).await;
    let failed_over = Instant::now();
    // The replicas notice the store went back and repair it; the clients
    // write on. Then B is killed.
    tokio::time::sleep(AFTER_FAILOVER).await;
    b.kill();
    let b_killed = Instant::now();
    tokio::time::sleep(AFTER_KILL).await;
    stop.store(true, Ordering::SeqCst);
    for t in tasks {
        t.await.unwrap();
    }
    let run_time = run_started.elapsed();
    let history = history.lock().unwrap().clone();

    // The writes the standby made, in order, after the clients stopped.
    let standby_store = store_at(&standby.url());
    let after = standby_store.history(start_version).await.unwrap();
    for (name, feed) in [("master", &before), ("standby", &after)] {
        assert_eq!(
            feed.first().map(|c| c.version),
            Some(start_version + 1),
            "the {name}'s feed reaches back to the start (nothing trimmed)"
        );
    }
    let failover = Failover {
        standby: &after,
        cut,
        at: failed_over,
    };
    let report = check(&history, &before, start_version, Some(&failover));
    let f = report.failover.as_ref().expect("a failover was checked");
    assert_eq!(
        f.common, standby_left_at,
        "the feeds part where the standby was left"
    );
    println!(
        "{} calls in {:.1} s ({} unknown, {} busy), {} writes checked",
        history.len(),
        run_time.as_secs_f64(),
        report.unknown,
        report.busy,
        report.writes
    );
    println!(
        "failover: the standby had v{} of v{}; segment 2 has {} writes, {} leases written back by {} repairs; \
         {} reads answered from the pre-failover copy, {} late answers",
        f.common,
        before.last().map_or(0, |c| c.version),
        f.segment2_writes,
        f.written_back_entries,
        f.incidents,
        f.stale_reads,
        f.late_answers,
    );
    println!(
        "acknowledged grants lost in the failover: {} written back, {} lost, {} released before \
         ({} of them written back anyway); {} renewals answered a lost one `lost`; \
         {} acknowledged releases undone by the failover, {} of them done again by a repair",
        f.grants.written_back,
        f.grants.lost,
        f.grants.released_before,
        f.grants.revived,
        f.lost_renewals,
        f.undone_releases,
        f.releases_done_again,
    );
    // What the failover and the faults did to the calls.
    let during_failover = |e: &Event| e.invoked < failed_over && e.answered > cut;
    let unknown = |keep: &dyn Fn(&Event, &str) -> bool| {
        history
            .iter()
            .filter(|e| matches!(&e.outcome, Outcome::Unknown(why) if keep(e, why)))
            .count()
    };
    let failover_unknown = unknown(&|e, _| during_failover(e));
    let paused = unknown(&|e, why| !during_failover(e) && why.contains("seat store"));
    let a_cut =
        unknown(&|e, why| !during_failover(e) && e.client % 2 == 0 && !why.contains("seat store"));
    let b_dead =
        unknown(&|e, why| !during_failover(e) && e.client % 2 == 1 && !why.contains("seat store"));
    println!(
        "unknown outcomes: Redis paused {paused}, connections to A cut {a_cut}, failover {failover_unknown}, B killed {b_dead}"
    );
    assert!(report.writes > 10, "the run wrote something: {report:?}");
    // Every fault reached the clients (else the run checked less than it says).
    assert!(paused > 0, "Redis paused: no call affected");
    assert!(a_cut > 0, "A cut off: no call affected");
    assert!(failover_unknown > 0, "the failover: no call affected");
    assert!(b_dead > 0, "B killed: no call affected");
    assert!(
        history.iter().any(|e| e.client % 2 == 1
            && e.answered > failed_over
            && e.answered < b_killed
            && e.outcome.version().is_some()),
        "B answered nothing after the failover"
    );
    assert!(
        f.grants.written_back + f.grants.lost + f.grants.released_before > 0,
        "no acknowledged grant the standby missed: the failover tested nothing"
    );
    assert!(
        f.incidents > 0,
        "the store that went back was never repaired"
    );
    assert!(
        f.segment2_writes > f.written_back_entries + f.incidents,
        "no write after the failover"
    );
    // The overview reports the last repair (the surviving replica, once it
    // has followed the store to its end).
    let last = after.last().map_or(0, |c| c.version);
    let mut c = a.client().await;
    let current = eventually(Duration::from_secs(5), || {
        let mut c = c.clone();
        async move { overview(&mut c).await.version >= last }
    })
    .await;
    assert!(current, "A never followed the store to v{last}");
    let o = overview(&mut c).await;
    let incident = after
        .iter()
        .rev()
        .find_map(|c| match &c.kind {
            ChangeKind::Repaired(i) => Some(i),
            _ => None,
        })
        .expect("a repair");
    assert!(o.last_store_repair_at.is_some(), "{o:?}");
    assert_eq!(
        (o.writes_restored, o.writes_lost, &o.lost_writes),
        (incident.restored_total, incident.lost_total, &incident.lost),
        "the overview reports the last repair"
    );
}

/// What happened at a failover, as the checker needs it.
struct Failover<'a> {
    /// The new master's feed after the run (from the same start as segment 1's).
    standby: &'a [Change],
    /// When writes stopped reaching the old master.
    cut: Instant,
    /// When they could reach the new one.
    at: Instant,
}

#[derive(Debug, Default)]
struct Report {
    writes: usize,
    unknown: usize,
    busy: usize,
    failover: Option<FailoverReport>,
}

#[derive(Debug, Default)]
struct FailoverReport {
    /// The last version both feeds share identically.
    common: u64,
    segment2_writes: usize,
    written_back_entries: usize,
    incidents: usize,
    /// Reads after the failover only the pre-failover state explains.
    stale_reads: usize,
    /// Writes of segment 1 answered after the cut (held, then let through).
    late_answers: usize,
    grants: Grants,
    /// The lost grants: (id, user, holder).
    lost: Vec<(String, String, String)>,
    /// Renewals after the failover that named a lost grant (and answered it `lost`).
    lost_renewals: usize,
    /// Releases acknowledged in segment 1 of a lease the standby still held.
    undone_releases: usize,
    /// Of those, the ones a repair did again.
    releases_done_again: usize,
}

/// The acknowledged grants the standby never had, by what became of them.
#[derive(Debug, Default, PartialEq, Eq)]
struct Grants {
    written_back: usize,
    lost: usize,
    released_before: usize,
    /// Released before the failover, and written back by a repair all the same
    /// (a replica's copy had not seen the release).
    revived: usize,
}

/// What a feed entry wrote, as calls are compared with it.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Write {
    Acquire {
        user: String,
        holder: String,
        id: String,
    },
    /// `ids` sorted.
    Renew {
        holder: String,
        ids: Vec<String>,
    },
    Release {
        id: String,
    },
    /// A lease a repair wrote back: no call made it.
    Restored {
        user: String,
        holder: String,
        id: String,
    },
    /// A release a repair did again (the store had lost it): the call was
    /// made in segment 1.
    ReleasedAgain {
        id: String,
    },
    /// Anything else (a repair's incident record).
    Other,
}

/// One history of the store replayed through the model: the pool after every
/// version up to `last`, and what each of its own versions (after `own_from`)
/// wrote.
struct Replay {
    name: &'static str,
    own_from: u64,
    last: u64,
    states: BTreeMap<u64, Pool>,
    writes: BTreeMap<u64, Write>,
    incidents: Vec<Incident>,
}

impl Replay {
    /// Replays `feed` from `pool` at version `start`, asserting the model's
    /// invariants at every version.
    fn new(name: &'static str, start: u64, pool: Pool, feed: &[Change]) -> Self {
        // The leases a repair wrote back: the entries its script made right
        // before its incident record, one for each thing it restored.
        let by_version: BTreeMap<u64, &Change> = feed.iter().map(|c| (c.version, c)).collect();
        let mut written_back: HashSet<u64> = HashSet::new();
        let mut released_again: HashSet<u64> = HashSet::new();
        for change in feed {
            let ChangeKind::Repaired(incident) = &change.kind else {
                continue;
            };
            let k = u64::from(incident.restored_total);
            let mut leases = 0;
            let mut releases = 0;
            for v in change.version.saturating_sub(k)..change.version {
                let entry = by_version.get(&v).unwrap_or_else(|| {
                    panic!(
                        "{name} v{v}: the repair at v{} restored {k} writes, this one is missing",
                        change.version
                    )
                });
                if matches!(entry.kind, ChangeKind::LeaseAcquired { .. }) {
                    written_back.insert(v);
                    leases += 1;
                }
                if matches!(entry.kind, ChangeKind::LeaseReleased { .. }) {
                    released_again.insert(v);
                    releases += 1;
                }
            }
            if incident.restored.len() as u64 == k {
                let named = incident
                    .restored
                    .iter()
                    .filter(|w| w.starts_with("lease "))
                    .count();
                assert_eq!(
                    leases, named,
                    "{name} v{}: the leases written back are not those the incident names: {incident:?}",
                    change.version
                );
                let named_releases = incident
                    .restored
                    .iter()
                    .filter(|w| w.starts_with("release of lease "))
                    .count();
                assert_eq!(
                    releases, named_releases,
                    "{name} v{}: the lease releases done again are not those the incident names: {incident:?}",
                    change.version
                );
            }
        }
        let mut replay = Replay {
            name,
            own_from: start,
            last: feed.last().map_or(start, |c| c.version),
            states: BTreeMap::from([(start, pool.clone())]),
            writes: BTreeMap::new(),
            incidents: Vec::new(),
        };
        let mut pool = pool;
        for change in feed {
            let v = change.version;
            let write = match &change.kind {
                ChangeKind::LeaseAcquired { lease, reclaimed } => {
                    assert!(reclaimed.is_empty(), "nothing expires in this run");
                    let (user, holder) = (lease.user_id.as_str(), lease.holder.as_str());
                    match pool.id_of(user, holder) {
                        Some(id) => assert_eq!(
                            id, &lease.lease_id,
                            "{name} v{v}: a second lease for ({user}, {holder})"
                        ),
                        None => {
                            assert!(
                                pool.leases.len() < CAPACITY,
                                "{name} v{v}: a lease beyond the quantity: {pool:?} and {}",
                                lease.lease_id
                            );
                            assert!(!pool.leases.contains_key(&lease.lease_id));
                            pool.leases.insert(
                                lease.lease_id.clone(),
                                (user.to_owned(), holder.to_owned()),
                            );
                        }
                    }
                    let (user, holder, id) =
                        (user.to_owned(), holder.to_owned(), lease.lease_id.clone());
                    if written_back.contains(&v) {
                        Write::Restored { user, holder, id }
                    } else {
                        Write::Acquire { user, holder, id }
                    }
                }
                ChangeKind::LeasesRenewed {
                    holder, lease_ids, ..
                } => {
                    for id in lease_ids {
                        let held = pool.leases.get(id);
                        assert_eq!(
                            held.map(|(_, h)| h.as_str()),
                            Some(holder.as_str()),
                            "{name} v{v}: renewal of {id} not held by {holder}"
                        );
                    }
                    Write::Renew {
                        holder: holder.as_str().to_owned(),
                        ids: sorted(lease_ids),
                    }
                }
                ChangeKind::LeaseReleased { lease_id } => {
                    assert!(
                        pool.leases.remove(lease_id).is_some(),
                        "{name} v{v}: release of {lease_id}, not held"
                    );
                    if released_again.contains(&v) {
                        Write::ReleasedAgain {
                            id: lease_id.clone(),
                        }
                    } else {
                        Write::Release {
                            id: lease_id.clone(),
                        }
                    }
                }
                ChangeKind::Repaired(incident) => {
                    replay.incidents.push(incident.clone());
                    Write::Other
                }
                // Other writes (none expected during the run) leave the pool as it is.
                _ => Write::Other,
            };
            replay.writes.insert(v, write);
            replay.states.insert(v, pool.clone());
        }
        replay
    }

    /// The pool at version `v`: `None` for a version this history never had
    /// (beyond its end, or jumped over by a repair).
    fn at(&self, v: u64) -> Option<&Pool> {
        self.states.get(&v)
    }

    /// The pool a write at version `v` found: at the last version before it.
    fn before(&self, v: u64) -> Option<&Pool> {
        self.states.range(..v).next_back().map(|(_, p)| p)
    }

    fn own(&self, v: u64) -> bool {
        v > self.own_from && v <= self.last
    }
}

/// Whether an answer is this history's state at its version (the real-time
/// order is checked apart): for a write, its version.
fn fits(e: &Event, h: &Replay) -> Result<Option<u64>, String> {
    let what = e.describe();
    let name = h.name;
    let at = |v: u64| {
        h.at(v)
            .ok_or_else(|| format!("{what}: {name} has no state at v{v}"))
    };
    let before = |v: u64| {
        h.before(v)
            .ok_or_else(|| format!("{what}: {name} has no state before v{v}"))
    };
    match (&e.call, &e.outcome) {
        (
            Call::Acquire { user, holder },
            Outcome::Acquired {
                id,
                created,
                version,
            },
        ) => {
            let (_, write) = e.write().expect("a write");
            if h.writes.get(version) != Some(&write) {
                return Err(format!(
                    "{what}: not {name}'s write at its version ({:?})",
                    h.writes.get(version)
                ));
            }
            if at(*version)?.id_of(user, holder) != Some(id) {
                return Err(format!("{what}: not the lease at v{version} in {name}"));
            }
            if *created != before(*version)?.id_of(user, holder).is_none() {
                return Err(format!("{what}: created only when new ({name})"));
            }
            Ok(Some(*version))
        }
        (
            Call::Renew { holder, ids },
            Outcome::Renewed {
                renewed,
                lost,
                version,
            },
        ) => {
            let state = if renewed.is_empty() {
                at(*version)?
            } else {
                let (_, write) = e.write().expect("a write");
                if h.writes.get(version) != Some(&write) {
                    return Err(format!(
                        "{what}: not {name}'s write at its version ({:?})",
                        h.writes.get(version)
                    ));
                }
                before(*version)?
            };
            let mut want_renewed = Vec::new();
            let mut want_lost = Vec::new();
            let mut seen = HashSet::new();
            for id in ids {
                if !seen.insert(id) {
                    continue;
                }
                match state.leases.get(id) {
                    Some((_, h)) if h == holder => want_renewed.push(id.clone()),
                    _ => want_lost.push(id.clone()),
                }
            }
            if (renewed, lost) != (&want_renewed, &want_lost) {
                return Err(format!(
                    "{what}: {name} at v{version} renews {want_renewed:?}, loses {want_lost:?}"
                ));
            }
            Ok((!renewed.is_empty()).then_some(*version))
        }
        (Call::Release { id }, Outcome::Released { released, version }) => {
            if *released {
                let (_, write) = e.write().expect("a write");
                if h.writes.get(version) != Some(&write) {
                    return Err(format!(
                        "{what}: not {name}'s write at its version ({:?})",
                        h.writes.get(version)
                    ));
                }
                Ok(Some(*version))
            } else if at(*version)?.leases.contains_key(id) {
                Err(format!("{what}: {name} holds {id} at v{version}"))
            } else {
                Ok(None)
            }
        }
        (Call::Check { user, min_version }, Outcome::Checked { licensed, version }) => {
            if version < min_version {
                return Err(format!("{what}: below its min_version"));
            }
            if *licensed != at(*version)?.holds(user) {
                return Err(format!("{what}: not the state at v{version} in {name}"));
            }
            Ok(None)
        }
        _ => Err(format!("{what}: an answer that does not fit the call")),
    }
}

/// Which history an answer belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Segment {
    /// The old master's (before the failover; all of it without one).
    One,
    /// The new master's: the state at `common`, then its own entries.
    Two,
}

/// Checks `history` against the feeds replayed through the model (see the
/// module): `before`, the store's feed after `start` (the old master's when
/// there was a failover), and the failover's.
fn check(history: &[Event], before: &[Change], start: u64, failover: Option<&Failover>) -> Report {
    let one = Replay::new("segment 1", start, Pool::default(), before);
    // The new master: what both feeds share, then its own entries.
    let two = failover.map(|f| {
        let mine: BTreeMap<u64, &Change> = before.iter().map(|c| (c.version, c)).collect();
        let mut common = start;
        for c in f.standby {
            if c.version == common + 1 && mine.get(&c.version) == Some(&c) {
                common = c.version;
            } else {
                break;
            }
        }
        let rest: Vec<Change> = f
            .standby
            .iter()
            .filter(|c| c.version > common)
            .cloned()
            .collect();
        let state = one.at(common).expect("segment 1 holds common").clone();
        let mut two = Replay::new("segment 2", common, state, &rest);
        for (v, p) in one.states.range(..=common) {
            two.states.insert(*v, p.clone());
        }
        for (v, w) in one.writes.range(..=common) {
            two.writes.insert(*v, w.clone());
        }
        (f, common, two)
    });
    let history_of = |s: Segment| match (s, &two) {
        (Segment::Two, Some((_, _, two))) => two,
        _ => &one,
    };

    // Each answer's segment: before the failover the old master's; after it,
    // a write is the new master's when the entry at its version there is this
    // write, else a late answer of the old one; a read is the new master's
    // state when it fits it, else the pre-failover copy's.
    let segments: Vec<Segment> = history
        .iter()
        .map(|e| match &two {
            Some((f, _, two)) if e.answered >= f.at && e.outcome.version().is_some() => {
                match e.write() {
                    Some((v, w)) if two.own(v) && two.writes.get(&v) == Some(&w) => Segment::Two,
                    Some(_) => Segment::One,
                    None if fits(e, two).is_ok() => Segment::Two,
                    None => Segment::One,
                }
            }
            _ => Segment::One,
        })
        .collect();
    let common = two.as_ref().map_or(u64::MAX, |(_, c, _)| *c);
    // Whether an answer is part of segment `s`'s history (what both share is
    // part of both).
    let part_of = |i: usize, s: Segment| -> bool {
        let Some(v) = history[i].outcome.version() else {
            return false;
        };
        segments[i] == s || (s == Segment::Two && v <= common)
    };
    // The versions a call's linearization point may lie between within a
    // segment: the highest version acknowledged there before it began, and the
    // lowest write version there of a call that began after it was answered
    // (`u64::MAX`: none).
    let interval = |e: &Event, s: Segment| -> (u64, u64) {
        let lo = (0..history.len())
            .filter(|&i| part_of(i, s) && history[i].answered < e.invoked)
            .filter_map(|i| history[i].outcome.version())
            .max()
            .unwrap_or(0);
        let hi = (0..history.len())
            .filter(|&i| part_of(i, s) && history[i].invoked > e.answered)
            .filter_map(|i| history[i].outcome.write_version())
            .min()
            .unwrap_or(u64::MAX);
        (lo, hi)
    };

    let mut report = Report::default();
    let mut failover_report = FailoverReport::default();
    let mut explained: [HashSet<u64>; 2] = [HashSet::new(), HashSet::new()];
    for (i, e) in history.iter().enumerate() {
        let what = e.describe();
        if let Outcome::Unknown(_) = e.outcome {
            report.unknown += 1;
            continue;
        }
        if let (Call::Acquire { user, holder }, Outcome::Busy) = (&e.call, &e.outcome) {
            report.busy += 1;
            let after_failover = two.as_ref().is_some_and(|(f, _, _)| e.answered >= f.at);
            let candidates: &[Segment] = if after_failover {
                &[Segment::Two, Segment::One]
            } else {
                &[Segment::One]
            };
            let full_in = |s: Segment| {
                let h = history_of(s);
                let (mut lo, hi) = interval(e, s);
                if s == Segment::Two {
                    // Refused by the new master: after the failover.
                    lo = lo.max(common);
                }
                (lo..=hi.saturating_sub(1).min(h.last)).any(|v| {
                    h.at(v).is_some_and(|p| {
                        p.leases.len() >= CAPACITY && p.id_of(user, holder).is_none()
                    })
                })
            };
            assert!(
                candidates.iter().any(|s| full_in(*s)),
                "{what}: the pool was never full within its interval ({candidates:?})"
            );
            continue;
        }
        let s = segments[i];
        let h = history_of(s);
        match fits(e, h) {
            Ok(Some(v)) => {
                explained[(s == Segment::Two) as usize].insert(v);
            }
            Ok(None) => {}
            Err(why) => {
                let other = two.as_ref().map(|(_, _, two)| fits(e, two));
                panic!("{why} (segment 2: {other:?})");
            }
        }
        if let Some((f, _, _)) = &two
            && s == Segment::One
        {
            if e.outcome.write_version().is_some() {
                assert!(
                    e.invoked < f.at,
                    "{what}: a call made after the failover wrote on the old master"
                );
                failover_report.late_answers += usize::from(e.answered >= f.cut);
            } else if e.answered >= f.at {
                failover_report.stale_reads += 1;
            }
        }
        // Real time: every version acknowledged in this segment before this
        // call began is below a write's version and at most a read's.
        let v = e.outcome.version().expect("an answer with a version");
        let (lo, _) = interval(e, s);
        if e.outcome.write_version().is_some() {
            assert!(
                v > lo,
                "{what}: v{v} not after v{lo} acknowledged before it ({s:?})"
            );
        } else {
            assert!(
                v >= lo,
                "{what}: v{v} behind v{lo} acknowledged before it ({s:?})"
            );
        }
    }

    // Every write in a feed comes from a call that was made (acknowledged
    // above, or one whose outcome is unknown with the same key) or a repair.
    let mut histories = vec![(&one, &explained[0])];
    if let Some((_, _, two)) = &two {
        histories.push((two, &explained[1]));
    }
    for (h, explained) in histories {
        for (version, write) in h.writes.range(h.own_from + 1..) {
            if explained.contains(version) {
                continue;
            }
            let made = match write {
                Write::Restored { user, holder, id } => {
                    // A lease some acquisition granted in segment 1.
                    assert!(
                        one.writes.values().any(|w| matches!(w,
                            Write::Acquire { user: u, holder: hd, id: i } if (u, hd, i) == (user, holder, id))),
                        "{} v{version}: a lease written back that was never granted: {write:?}",
                        h.name
                    );
                    true
                }
                Write::ReleasedAgain { id } => {
                    // A release of it was called (acknowledged or not).
                    assert!(
                        history.iter().any(
                            |e| matches!(&e.call, Call::Release { id: i } if i == id)
                                && matches!(
                                    e.outcome,
                                    Outcome::Released { released: true, .. } | Outcome::Unknown(_)
                                )
                        ),
                        "{} v{version}: a release done again that no call made: {write:?}",
                        h.name
                    );
                    true
                }
                Write::Other => true,
                _ => history.iter().any(|e| {
                    matches!(e.outcome, Outcome::Unknown(_))
                        && match (&e.call, write) {
                            (
                                Call::Acquire { user, holder },
                                Write::Acquire {
                                    user: u,
                                    holder: hd,
                                    ..
                                },
                            ) => user == u && holder == hd,
                            (Call::Renew { holder, .. }, Write::Renew { holder: hd, .. }) => {
                                holder == hd
                            }
                            (Call::Release { id }, Write::Release { id: i }) => id == i,
                            _ => false,
                        }
                }),
            };
            assert!(
                made,
                "{} v{version} {write:?}: a write no call explains",
                h.name
            );
        }
        report.writes += h.writes.range(h.own_from + 1..).count();
    }

    // The acknowledged grants the standby never had, by what became of them.
    if let Some((f, common, two)) = &two {
        let at_common = one.at(*common).expect("segment 1 holds common");
        let mut grants: BTreeMap<&str, (&str, &str)> = BTreeMap::new();
        for (i, e) in history.iter().enumerate() {
            if segments[i] != Segment::One {
                continue;
            }
            match (&e.call, &e.outcome) {
                (Call::Acquire { user, holder }, Outcome::Acquired { id, version, .. })
                    if *version > *common && !at_common.leases.contains_key(id) =>
                {
                    grants.insert(id, (user, holder));
                }
                (
                    Call::Release { id },
                    Outcome::Released {
                        released: true,
                        version,
                    },
                ) if *version > *common && at_common.leases.contains_key(id) => {
                    failover_report.undone_releases += 1;
                    let again = two
                        .writes
                        .values()
                        .any(|w| matches!(w, Write::ReleasedAgain { id: i } if i == id));
                    if again {
                        failover_report.releases_done_again += 1;
                    }
                }
                _ => {}
            }
        }
        let own_writes = |h: &Replay| -> Vec<Write> {
            h.writes
                .range(h.own_from + 1..)
                .map(|(_, w)| w.clone())
                .collect()
        };
        let (writes_one, writes_two) = (own_writes(&one), own_writes(two));
        for (id, (user, holder)) in grants {
            let released = writes_one
                .iter()
                .any(|w| matches!(w, Write::Release { id: i } if i == id));
            let written_back = writes_two
                .iter()
                .any(|w| matches!(w, Write::Restored { id: i, .. } if i == id));
            let g = &mut failover_report.grants;
            match (released, written_back) {
                (true, back) => {
                    g.released_before += 1;
                    g.revived += back as usize;
                }
                (false, true) => g.written_back += 1,
                (false, false) => {
                    g.lost += 1;
                    failover_report
                        .lost
                        .push((id.to_owned(), user.to_owned(), holder.to_owned()));
                }
            }
        }
        // Every lost one is reported: named in a repair's incident, and
        // answered `lost` by every renewal of it after the failover.
        for (id, user, holder) in &failover_report.lost {
            let name = format!("lease {}/{user} held by {holder}", Feature::User);
            let named = two
                .incidents
                .iter()
                .any(|i| i.lost.iter().any(|l| l.starts_with(&name)));
            let unnamed_room = two
                .incidents
                .iter()
                .any(|i| (i.lost.len() as u32) < i.lost_total);
            assert!(
                named || unnamed_room,
                "{id} ({user}, {holder}): an acknowledged grant lost in the failover that no repair reported: {:?}",
                two.incidents
            );
            for e in history.iter().filter(|e| e.invoked >= f.at) {
                if let (Call::Renew { holder: h, ids }, Outcome::Renewed { lost, .. }) =
                    (&e.call, &e.outcome)
                    && h == holder
                    && ids.contains(id)
                {
                    assert!(
                        lost.contains(id),
                        "{}: a lost grant renewed after the failover",
                        e.describe()
                    );
                    failover_report.lost_renewals += 1;
                }
            }
        }
        let lost_total: u32 = two.incidents.iter().map(|i| i.lost_total).sum();
        assert!(
            lost_total as usize >= failover_report.lost.len(),
            "{} grants lost, the repairs reported {lost_total}",
            failover_report.lost.len()
        );
        failover_report.common = *common;
        failover_report.segment2_writes = writes_two.len();
        failover_report.written_back_entries = writes_two
            .iter()
            .filter(|w| matches!(w, Write::Restored { .. }))
            .count();
        failover_report.incidents = two.incidents.len();
        report.failover = Some(failover_report);
    }
    report
}

/// The checker is not vacuous: a feed with one lease beyond the quantity (also
/// after a failover, counting the leases a repair wrote back), an answer that
/// is not the state at its version, a write nobody made, or an acknowledged
/// grant lost in a failover that no repair reported, fails it.
mod checker {
    use super::*;
    use comtrexx_licensing::domain::{Holder, Lease, UserId};

    fn acquired(version: u64, id: &str, user: &str) -> Change {
        Change {
            version,
            kind: ChangeKind::LeaseAcquired {
                lease: Lease {
                    lease_id: id.into(),
                    user_id: UserId::parse(user).unwrap(),
                    feature: Feature::User,
                    holder: Holder::parse("h0").unwrap(),
                    acquired_at: Utc::now(),
                    expires_at: Utc::now(),
                },
                reclaimed: Vec::new(),
            },
        }
    }

    fn released(version: u64, id: &str) -> Change {
        Change {
            version,
            kind: ChangeKind::LeaseReleased {
                lease_id: id.into(),
            },
        }
    }

    /// A repair's incident record: the leases of `restored` written back, those
    /// of `lost` reported lost (users, held by h0).
    fn repaired(version: u64, restored: &[&str], lost: &[&str]) -> Change {
        let mut incident = Incident::default();
        for user in restored {
            incident.restored(format!("lease user/{user} held by h0"));
        }
        for user in lost {
            incident.lost(format!(
                "lease user/{user} held by h0 (its feature was at capacity by then)"
            ));
        }
        Change {
            version,
            kind: ChangeKind::Repaired(incident),
        }
    }

    fn event(call: Call, outcome: Outcome) -> Event {
        let now = Instant::now();
        Event {
            client: 0,
            call,
            invoked: now,
            answered: now,
            outcome,
        }
    }

    fn acquire(user: &str, id: &str, created: bool, version: u64) -> Event {
        event(
            Call::Acquire {
                user: user.into(),
                holder: "h0".into(),
            },
            Outcome::Acquired {
                id: id.into(),
                created,
                version,
            },
        )
    }

    fn release(id: &str, version: u64) -> Event {
        event(
            Call::Release { id: id.into() },
            Outcome::Released {
                released: true,
                version,
            },
        )
    }

    /// A failover now: every event made before it was answered by the old master.
    fn failover(standby: &[Change]) -> Failover<'_> {
        let cut = Instant::now();
        std::thread::sleep(Duration::from_millis(1));
        Failover {
            standby,
            cut,
            at: Instant::now(),
        }
    }

    #[test]
    #[should_panic(expected = "beyond the quantity")]
    fn a_lease_beyond_the_quantity_is_found() {
        let feed: Vec<Change> = (1..=4)
            .map(|v| acquired(v, &format!("id{v}"), &format!("u{v}")))
            .collect();
        check(&[], &feed, 0, None);
    }

    #[test]
    #[should_panic(expected = "not the state at")]
    fn a_check_that_misses_a_lease_is_found() {
        let feed = vec![acquired(1, "id1", "u1")];
        let history = [event(
            Call::Check {
                user: "u1".into(),
                min_version: 0,
            },
            Outcome::Checked {
                licensed: false,
                version: 1,
            },
        )];
        check(&history, &feed, 0, None);
    }

    #[test]
    #[should_panic(expected = "no call explains")]
    fn a_write_nobody_made_is_found() {
        check(&[], &[acquired(1, "id1", "u1")], 0, None);
    }

    /// The standby kept id1 (released later on the old master: the release is
    /// undone) and id2; a repair writes back id3 and id4: one lease too many.
    #[test]
    #[should_panic(expected = "segment 2 v7: a lease beyond the quantity")]
    fn a_lease_written_back_beyond_the_quantity_is_found() {
        let before = vec![
            acquired(1, "id1", "u1"),
            acquired(2, "id2", "u2"),
            released(3, "id1"),
            acquired(4, "id3", "u3"),
            acquired(5, "id4", "u4"),
        ];
        let standby = vec![
            before[0].clone(),
            before[1].clone(),
            acquired(6, "id3", "u3"),
            acquired(7, "id4", "u4"),
            repaired(8, &["u3", "u4"], &[]),
        ];
        check(&[], &before, 0, Some(&failover(&standby)));
    }

    /// id2 was granted after the standby's last version and is in no copy the
    /// repair wrote back, nor named in its incident.
    #[test]
    #[should_panic(expected = "no repair reported")]
    fn an_acknowledged_grant_lost_and_never_reported_is_found() {
        let before = vec![acquired(1, "id1", "u1"), acquired(2, "id2", "u2")];
        let history = [acquire("u1", "id1", true, 1), acquire("u2", "id2", true, 2)];
        let standby = vec![before[0].clone(), repaired(3, &[], &[])];
        check(&history, &before, 0, Some(&failover(&standby)));
    }

    /// Three grants the standby missed: id4 released before the failover, id2
    /// written back, id3 lost (reported, and its renewal answers it lost); a
    /// check after the failover answered from the old copy is counted.
    #[test]
    fn acknowledged_grants_lost_in_a_failover_are_classified() {
        let before = vec![
            acquired(1, "id1", "u1"),
            acquired(2, "id4", "u4"),
            released(3, "id4"),
            acquired(4, "id2", "u2"),
            acquired(5, "id3", "u3"),
        ];
        let mut history = vec![
            acquire("u1", "id1", true, 1),
            acquire("u4", "id4", true, 2),
            release("id4", 3),
            acquire("u2", "id2", true, 4),
            acquire("u3", "id3", true, 5),
        ];
        let standby = vec![
            before[0].clone(),
            acquired(6, "id2", "u2"),
            repaired(7, &["u2"], &["u3"]),
            acquired(8, "id5", "u5"),
        ];
        let f = failover(&standby);
        history.push(event(
            Call::Check {
                user: "u3".into(),
                min_version: 5,
            },
            Outcome::Checked {
                licensed: true,
                version: 5,
            },
        ));
        history.push(acquire("u5", "id5", true, 8));
        history.push(event(
            Call::Renew {
                holder: "h0".into(),
                ids: vec!["id3".into()],
            },
            Outcome::Renewed {
                renewed: Vec::new(),
                lost: vec!["id3".into()],
                version: 8,
            },
        ));
        let report = check(&history, &before, 0, Some(&f));
        let f = report.failover.expect("a failover");
        assert_eq!(f.common, 1);
        assert_eq!(
            f.grants,
            Grants {
                written_back: 1,
                lost: 1,
                released_before: 1,
                revived: 0,
            }
        );
        assert_eq!(f.lost, [("id3".into(), "u3".into(), "h0".into())]);
        assert_eq!((f.stale_reads, f.lost_renewals), (1, 1));
        assert_eq!((f.written_back_entries, f.incidents), (1, 1));
    }

    /// A new master that renews a grant the failover lost.
    #[test]
    #[should_panic(expected = "segment 2 v4: renewal of id2 not held by h0")]
    fn a_lost_grant_renewed_after_the_failover_is_found() {
        let before = vec![acquired(1, "id1", "u1"), acquired(2, "id2", "u2")];
        let mut history = vec![acquire("u1", "id1", true, 1), acquire("u2", "id2", true, 2)];
        let standby = vec![
            before[0].clone(),
            repaired(3, &[], &["u2"]),
            Change {
                version: 4,
                kind: ChangeKind::LeasesRenewed {
                    holder: Holder::parse("h0").unwrap(),
                    lease_ids: vec!["id2".into()],
                    expires_at: Utc::now(),
                },
            },
        ];
        let f = failover(&standby);
        history.push(event(
            Call::Renew {
                holder: "h0".into(),
                ids: vec!["id2".into()],
            },
            Outcome::Renewed {
                renewed: vec!["id2".into()],
                lost: Vec::new(),
                version: 4,
            },
        ));
        check(&history, &before, 0, Some(&f));
    }
}
