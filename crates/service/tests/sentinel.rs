//! Redis Sentinel, on real processes the tests start themselves: one master, one
//! replica and three sentinels on loopback (`redis-server --sentinel`), and the
//! service configured with `redis+sentinel://…/MASTER_NAME` and `WAIT 1`. Seats
//! survive a failover, the service follows the new master and keeps writing, and
//! a failover under write load loses no seat a client was told about.

mod common;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use chrono::Utc;
use common::*;
use comtrexx_licensing::config::RawConfig;
use comtrexx_licensing::domain::{Edition, Feature};
use parking_lot::Mutex;

const MASTER: &str = "seats";
/// Upper bound for a failover: noticed after 1 s, then an election and a promotion.
const FAILOVER: Duration = Duration::from_secs(30);

/// A master, its replica and three sentinels watching them.
struct Cluster {
    master: RedisServer,
    replica: RedisServer,
    sentinels: Vec<RedisServer>,
    _dir: tempfile::TempDir,
}

impl Cluster {
    fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let master = RedisServer::with_args(&[], None);
        let replica = RedisServer::replica_of(&master);
        let sentinels: Vec<_> = (0..3)
            .map(|_| RedisServer::sentinel(dir.path(), MASTER, &master))
            .collect();
        let cluster = Self {
            master,
            replica,
            sentinels,
            _dir: dir,
        };
        // Ready when the replica is in sync and every sentinel knows the replica and
        // the two other sentinels (needed to elect a leader for a failover).
        cluster.until("the replica and the sentinels are ready", || {
            let synced = redis::cmd("INFO")
                .arg("replication")
                .query::<String>(&mut cluster.replica.connection())
                .is_ok_and(|i| i.contains("master_link_status:up"));
            synced
                && cluster.sentinels.iter().all(|s| {
                    let mut c = s.connection();
                    let mut count = |what: &str| {
                        redis::cmd("SENTINEL")
                            .arg(what)
                            .arg(MASTER)
                            .query::<Vec<redis::Value>>(&mut c)
                            .map_or(0, |v| v.len())
                    };
                    count("REPLICAS") == 1 && count("SENTINELS") == 2
                })
        });
        cluster
    }

    /// Polls `check` (bounded by [`FAILOVER`]).
    fn until(&self, what: &str, check: impl FnMut() -> bool) {
        assert!(eventually_blocking(FAILOVER, check), "timed out: {what}");
    }

    fn url(&self) -> String {
        let hosts: Vec<String> = self
            .sentinels
            .iter()
            .map(|s| format!("127.0.0.1:{}", s.port))
            .collect();
        format!("redis+sentinel://{}/{MASTER}", hosts.join(","))
    }

    /// The master's port as the first sentinel that answers names it.
    fn master_port(&self) -> Option<u16> {
        self.sentinels.iter().find_map(|s| {
            redis::Client::open(s.url())
                .and_then(|c| c.get_connection())
                .and_then(|mut c| {
                    redis::cmd("SENTINEL")
                        .arg("GET-MASTER-ADDR-BY-NAME")
                        .arg(MASTER)
                        .query::<(String, u16)>(&mut c)
                })
                .ok()
                .map(|(_, port)| port)
        })
    }

    /// Waits until the sentinels name the replica as master and it acts as one.
    fn wait_promoted(&self) {
        self.until("the replica was promoted", || {
            self.master_port() == Some(self.replica.port)
                && redis::cmd("ROLE")
                    .query::<Vec<redis::Value>>(&mut self.replica.connection())
                    .is_ok_and(|r| r.first() == Some(&redis::Value::BulkString(b"master".to_vec())))
        });
    }
}

/// A service on the cluster with a license for 100 000 users; writes wait for 1 replica.
fn sentinel_config(cluster: &Cluster, vendor: &Vendor, serial: &str) -> RawConfig {
    vendor.write_license(serial, Edition::Vm, Utc::now(), &[(Feature::User, 100_000)]);
    RawConfig {
        redis_url: Some(cluster.url()),
        redis_wait_replicas: 1,
        redis_wait_timeout_ms: 500,
        redis_timeout_ms: 500,
        license_file: Some(vendor.license_path()),
        vendor_public_key: Some(vendor.public_key()),
        serial_number: serial.to_owned(),
        ..RawConfig::default()
    }
}

/// The users holding a purchased user seat in the data of the node on `port`.
fn stored_users(node: &RedisServer, serial: &str) -> BTreeSet<String> {
    redis::cmd("HKEYS")
        .arg(format!("lic:{{{serial}}}:seats:user:purchased"))
        .query(&mut node.connection())
        .unwrap()
}

/// Asserts that every user in `acknowledged` holds a seat: in ListSeats, in
/// CheckSeat, and in the data of the master `node`.
async fn assert_kept(c: &mut Client, node: &RedisServer, serial: &str, acknowledged: &[String]) {
    let listed = seat_holder_set(c).await;
    let stored = stored_users(node, serial);
    let lost: Vec<_> = acknowledged
        .iter()
        .filter(|u| !listed.contains(*u) || !stored.contains(*u))
        .collect();
    assert!(lost.is_empty(), "acknowledged seats lost: {lost:?}");
    for user in acknowledged {
        let mut c = c.clone();
        assert!(
            eventually(Duration::from_secs(10), || {
                let mut c = c.clone();
                async move { check(&mut c, user, "").await.is_ok_and(|r| r.licensed) }
            })
            .await,
            "{user} is not licensed"
        );
        assert!(licensed(&mut c, user).await);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seats_survive_a_sentinel_failover_and_writes_go_on() {
    let cluster = Cluster::start();
    let vendor = Vendor::new();
    let serial = serial("sentinel");
    let server = TestServer::start(sentinel_config(&cluster, &vendor, &serial)).await;
    let mut c = server.client().await;
    wait_active(&c).await;
    let before: Vec<String> = (0..10).map(|i| format!("before-{i}")).collect();
    for user in &before {
        assigned(&mut c, user, "").await;
    }
    assert_eq!(cluster.master_port(), Some(cluster.master.port));

    let _: String = redis::cmd("SENTINEL")
        .arg("FAILOVER")
        .arg(MASTER)
        .query(&mut cluster.sentinels[0].connection())
        .unwrap();
    cluster.wait_promoted();

    // The service asks the sentinels again and writes to the new master.
    assert!(
        eventually(FAILOVER, || {
            let mut c = c.clone();
            async move { assign(&mut c, "after", "").await.is_ok() }
        })
        .await,
        "no write succeeded after the failover"
    );
    let mut all = before;
    all.push("after".into());
    assert_kept(&mut c, &cluster.replica, &serial, &all).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failover_under_write_load_loses_no_acknowledged_seat() {
    let mut cluster = Cluster::start();
    let vendor = Vendor::new();
    let serial = serial("sentinel-load");
    let server = TestServer::start(sentinel_config(&cluster, &vendor, &serial)).await;
    let c = server.client().await;
    wait_active(&c).await;

    // Writers assign new users without pause; a user counts once AssignSeat said OK.
    let acknowledged = Arc::new(Mutex::new(Vec::<String>::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let writers: Vec<_> = (0..4)
        .map(|w| {
            let (mut c, acknowledged, stop) = (c.clone(), acknowledged.clone(), stop.clone());
            tokio::spawn(async move {
                for n in 0.. {
                    if stop.load(Ordering::Relaxed) {
                        return;
                    }
                    let user = format!("w{w}-{n}");
                    if assign(&mut c, &user, "").await.is_ok() {
                        acknowledged.lock().push(user);
                    }
                }
            })
        })
        .collect();
    let acked = || acknowledged.lock().len();
    assert!(
        eventually(FAILOVER, || std::future::ready(acked() >= 100)).await,
        "the writers made no progress"
    );

    // The master dies mid-load; the replica takes over; the old master comes back
    // empty and the sentinels make it a replica of the new one.
    cluster.master.kill();
    let at_kill = acked();
    cluster.wait_promoted();
    cluster.master.restart_empty();
    assert!(
        eventually(FAILOVER, || std::future::ready(acked() >= at_kill + 100)).await,
        "the service did not keep writing after the failover ({} acknowledged since the kill)",
        acked() - at_kill
    );
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        w.await.unwrap();
    }
    let acknowledged = acknowledged.lock().clone();
    let mut c = c.clone();
    assert_kept(&mut c, &cluster.replica, &serial, &acknowledged).await;
}
