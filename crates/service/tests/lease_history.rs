//! A history checker for leases: 8 concurrent clients over two replicas record
//! every `AcquireLease`, `RenewLeases`, `ReleaseLease` and `CheckSeat` with the
//! instants of invocation and response, under faults: Redis paused twice, the
//! network to replica A cut (every connection reset) and restored, and replica
//! B (a process) killed with SIGKILL halfway (calls then fail or time out with
//! an unknown outcome). Afterwards the history is checked against a
//! sequential model of the lease pool.
//!
//! The store's change feed is the order: every lease write is one feed entry
//! at its version, so the feed (read after the run) is the sequence of writes
//! the store actually made, including those whose answer was lost. The checker
//! replays it through the model and asserts:
//!
//! - the model's invariants at every version: never more leases than the
//!   quantity, one lease per (user, holder), renewals and releases only of
//!   leases that exist (renewals by their holder);
//! - every acknowledged write is the feed entry at the version it answered,
//!   with the outcome the model gives there (`created` exactly when new);
//! - every write in the feed comes from a call that was made (acknowledged
//!   there, or with an unknown outcome);
//! - real time: a write acknowledged before another call began has a lower
//!   version than that call's; a read answers at or after every version
//!   acknowledged before it began (`min_version`);
//! - every read (`CheckSeat`, a release of nothing, a renewal that renewed
//!   nothing) answers the model's state at the version it reports;
//! - every "busy" refusal is explained: at some version within its interval
//!   the pool was full and the key held no lease.

mod common;

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::Utc;
use common::*;
use comtrexx_licensing::config::RawConfig;
use comtrexx_licensing::domain::{Edition, Feature, SeatModel, SerialNumber};
use comtrexx_licensing::grpc::pb;
use comtrexx_licensing::store::redis::RedisStore;
use comtrexx_licensing::store::{ChangeKind, Store};
use comtrexx_licensing_test_support::proxy::{Fault, FaultProxy};
use rand::{Rng as _, SeedableRng as _};
use tonic::Code;

const CAPACITY: usize = 3;
const CLIENTS: usize = 8;
const OPS_PER_CLIENT: usize = 120;
/// The pause between a client's calls: the run outlasts the faults.
const THINK: Duration = Duration::from_millis(20);
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

/// Runs one client: `OPS_PER_CLIENT` random calls, recorded.
async fn client(
    n: usize,
    mut c: Client,
    known_ids: Arc<Mutex<Vec<String>>>,
    acked: Arc<AtomicU64>,
    history: Arc<Mutex<Vec<Event>>>,
) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(n as u64 * 7919 + 1);
    let holder = HOLDERS[n % HOLDERS.len()].to_owned();
    let mut mine: Vec<String> = Vec::new();
    for _ in 0..OPS_PER_CLIENT {
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
    let redis = RedisServer::start();
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
        ..licensed_config(Some(&redis), &serial, &vendor)
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
        let active = eventually(Duration::from_secs(10), || {
            let mut c = c.clone();
            async move { overview(&mut c).await.activation_state() == pb::ActivationState::Active }
        })
        .await;
        assert!(active, "replica {endpoint} never applied the license");
    }
    let start_version = {
        let mut c = a.client().await;
        overview(&mut c).await.version
    };

    let known_ids = Arc::new(Mutex::new(Vec::new()));
    let acked = Arc::new(AtomicU64::new(start_version));
    let history = Arc::new(Mutex::new(Vec::new()));
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
        )));
    }
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
    // The network to A cut for a moment, then B killed.
    to_a.set(Fault::Reset);
    tokio::time::sleep(Duration::from_millis(300)).await;
    to_a.set(Fault::Pass);
    tokio::time::sleep(Duration::from_millis(200)).await;
    b.kill();
    for t in tasks {
        t.await.unwrap();
    }
    let history = history.lock().unwrap().clone();

    // The writes the store made, in order.
    let store = RedisStore::new(
        &redis.url(),
        &SerialNumber::parse(&serial).unwrap(),
        Duration::from_secs(5),
    )
    .unwrap();
    let feed = store.history(start_version).await.unwrap();
    assert_eq!(
        feed.first().map(|c| c.version),
        Some(start_version + 1),
        "the feed reaches back to the start (nothing trimmed)"
    );
    let report = check(&history, &feed, start_version);
    println!(
        "{} calls ({} unknown, {} busy), {} writes checked",
        history.len(),
        report.unknown,
        report.busy,
        report.writes
    );
    let unknown_of = |client_parity: usize, store: bool| {
        history
            .iter()
            .filter(|e| e.client % 2 == client_parity)
            .filter(|e| {
                matches!(&e.outcome, Outcome::Unknown(why) if why.contains("seat store") == store)
            })
            .count()
    };
    println!(
        "unknown outcomes: Redis paused {}, connections to A cut {}, B killed {}",
        unknown_of(0, true) + unknown_of(1, true),
        unknown_of(0, false),
        unknown_of(1, false)
    );
    assert!(report.writes > 10, "the run wrote something: {report:?}");
    // Every fault reached the clients (else the run checked less than it says).
    assert!(
        unknown_of(0, true) + unknown_of(1, true) > 0,
        "Redis paused: no call affected"
    );
    assert!(unknown_of(0, false) > 0, "A cut off: no call affected");
    assert!(unknown_of(1, false) > 0, "B killed: no call affected");
}

#[derive(Debug, Default)]
struct Report {
    writes: usize,
    unknown: usize,
    busy: usize,
}

/// Checks `history` against the feed replayed through the model (see the module).
fn check(history: &[Event], feed: &[comtrexx_licensing::store::Change], start: u64) -> Report {
    // Replay: the pool after every version from `start` on.
    let mut states: BTreeMap<u64, Pool> = BTreeMap::new();
    let mut pool = Pool::default();
    states.insert(start, pool.clone());
    // What each write was: (version → (kind, key or ids, created)).
    let mut writes: BTreeMap<u64, String> = BTreeMap::new();
    for change in feed {
        match &change.kind {
            ChangeKind::LeaseAcquired { lease, reclaimed } => {
                assert!(reclaimed.is_empty(), "nothing expires in this run");
                let (user, holder) = (lease.user_id.as_str(), lease.holder.as_str());
                match pool.id_of(user, holder) {
                    Some(id) => assert_eq!(
                        id, &lease.lease_id,
                        "v{}: a second lease for ({user}, {holder})",
                        change.version
                    ),
                    None => {
                        assert!(
                            pool.leases.len() < CAPACITY,
                            "v{}: a lease beyond the quantity: {pool:?}",
                            change.version
                        );
                        assert!(!pool.leases.contains_key(&lease.lease_id));
                        pool.leases
                            .insert(lease.lease_id.clone(), (user.to_owned(), holder.to_owned()));
                    }
                }
                writes.insert(change.version, format!("acquire {user} {holder}"));
            }
            ChangeKind::LeasesRenewed {
                holder, lease_ids, ..
            } => {
                for id in lease_ids {
                    let held = pool.leases.get(id);
                    assert_eq!(
                        held.map(|(_, h)| h.as_str()),
                        Some(holder.as_str()),
                        "v{}: renewal of {id} not held by {holder}",
                        change.version
                    );
                }
                writes.insert(change.version, format!("renew {holder}"));
            }
            ChangeKind::LeaseReleased { lease_id } => {
                assert!(
                    pool.leases.remove(lease_id).is_some(),
                    "v{}: release of {lease_id}, not held",
                    change.version
                );
                writes.insert(change.version, format!("release {lease_id}"));
            }
            // Other writes (none expected during the run) leave the pool as it is.
            _ => {}
        }
        states.insert(change.version, pool.clone());
    }
    let last = feed.last().map_or(start, |c| c.version);
    let at = |v: u64| -> &Pool {
        states
            .range(..=v)
            .next_back()
            .map(|(_, p)| p)
            .expect("a state at or before every version")
    };
    let before = |v: u64| at(v.saturating_sub(1));

    let mut report = Report::default();
    let mut explained: HashSet<u64> = HashSet::new();
    for e in history {
        let what = format!("client {} {:?} -> {:?}", e.client, e.call, e.outcome);
        match (&e.call, &e.outcome) {
            (
                Call::Acquire { user, holder },
                Outcome::Acquired {
                    id,
                    created,
                    version,
                },
            ) => {
                assert_eq!(
                    writes.get(version).map(String::as_str),
                    Some(format!("acquire {user} {holder}").as_str()),
                    "{what}: not the feed's write at its version"
                );
                assert_eq!(at(*version).id_of(user, holder), Some(id), "{what}");
                assert_eq!(
                    *created,
                    before(*version).id_of(user, holder).is_none(),
                    "{what}: created only when new"
                );
                explained.insert(*version);
            }
            (Call::Acquire { user, holder }, Outcome::Busy) => {
                report.busy += 1;
                let (lo, hi) = interval(history, e);
                let full = (lo..=hi.saturating_sub(1).min(last)).any(|v| {
                    let p = at(v);
                    p.leases.len() >= CAPACITY && p.id_of(user, holder).is_none()
                });
                assert!(full, "{what}: the pool was never full within v{lo}..v{hi}");
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
                    at(*version)
                } else {
                    assert_eq!(
                        writes.get(version).map(String::as_str),
                        Some(format!("renew {holder}").as_str()),
                        "{what}"
                    );
                    explained.insert(*version);
                    before(*version)
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
                assert_eq!((renewed, lost), (&want_renewed, &want_lost), "{what}");
            }
            (Call::Release { id }, Outcome::Released { released, version }) => {
                if *released {
                    assert_eq!(
                        writes.get(version).map(String::as_str),
                        Some(format!("release {id}").as_str()),
                        "{what}"
                    );
                    explained.insert(*version);
                } else {
                    assert!(!at(*version).leases.contains_key(id), "{what}");
                }
            }
            (Call::Check { user, min_version }, Outcome::Checked { licensed, version }) => {
                assert!(version >= min_version, "{what}: below its min_version");
                assert_eq!(
                    *licensed,
                    at(*version).holds(user),
                    "{what}: not the state at v{version}"
                );
            }
            (_, Outcome::Unknown(_)) => report.unknown += 1,
            _ => panic!("{what}: an answer that does not fit the call"),
        }
        // Real time: every version acknowledged before this call began is
        // below a write's version and at most a read's.
        if let Some(v) = e.outcome.version() {
            let (lo, _) = interval(history, e);
            if e.outcome.write_version().is_some() {
                assert!(
                    v > lo,
                    "{what}: v{v} not after v{lo} acknowledged before it"
                );
            } else {
                assert!(v >= lo, "{what}: v{v} behind v{lo} acknowledged before it");
            }
        }
    }
    // Every write in the feed comes from a call that was made: acknowledged
    // above, or one whose outcome is unknown with the same key.
    for (version, write) in &writes {
        if explained.contains(version) {
            continue;
        }
        let made = history.iter().any(|e| {
            matches!(e.outcome, Outcome::Unknown(_))
                && match (&e.call, write.split(' ').collect::<Vec<_>>().as_slice()) {
                    (Call::Acquire { user, holder }, ["acquire", u, h]) => user == u && holder == h,
                    (Call::Renew { holder, .. }, ["renew", h]) => holder == h,
                    (Call::Release { id }, ["release", i]) => id == i,
                    _ => false,
                }
        });
        assert!(made, "v{version} {write}: a write no call explains");
    }
    report.writes = writes.len();
    report
}

/// The versions a call's linearization point may lie between: the highest
/// version acknowledged before it began, and the lowest version of a call
/// that began after it was answered (`u64::MAX`: none).
fn interval(history: &[Event], e: &Event) -> (u64, u64) {
    let lo = history
        .iter()
        .filter(|o| o.answered < e.invoked)
        .filter_map(|o| o.outcome.version())
        .max()
        .unwrap_or(0);
    let hi = history
        .iter()
        .filter(|o| o.invoked > e.answered)
        .filter_map(|o| o.outcome.write_version())
        .min()
        .unwrap_or(u64::MAX);
    (lo, hi)
}

/// The checker is not vacuous: a feed with one lease beyond the quantity, or an
/// answer that is not the state at its version, fails it.
mod checker {
    use super::*;
    use comtrexx_licensing::domain::{Holder, Lease, UserId};
    use comtrexx_licensing::store::Change;

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

    #[test]
    #[should_panic(expected = "beyond the quantity")]
    fn a_lease_beyond_the_quantity_is_found() {
        let feed: Vec<Change> = (1..=4)
            .map(|v| acquired(v, &format!("id{v}"), &format!("u{v}")))
            .collect();
        check(&[], &feed, 0);
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
        check(&history, &feed, 0);
    }

    #[test]
    #[should_panic(expected = "no call explains")]
    fn a_write_nobody_made_is_found() {
        check(&[], &[acquired(1, "id1", "u1")], 0);
    }
}
