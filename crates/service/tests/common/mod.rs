//! The service's test harness: the real service on port 0 talking real gRPC, on
//! a private `redis-server` or the embedded store. Everything that does not need
//! the service itself (Redis processes, ports, `eventually`, PKI, call helpers)
//! is in the test-support crate, re-exported here.
#![allow(dead_code, unused_imports)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use comtrexx_licensing::app::App;
use comtrexx_licensing::config::RawConfig;
use comtrexx_licensing::domain::{
    Clock, Feature, ManualClock, Seat, SeatSource, SerialNumber, SystemClock, UserId,
};
use comtrexx_licensing::grpc::pb::licensing_service_client::LicensingServiceClient;
use comtrexx_licensing::store::redis::RedisStore;
use comtrexx_licensing::store::{Incident, Position, RepairWrite, Snapshot, Store};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub use comtrexx_licensing_test_support::*;

/// The service, running on 127.0.0.1:0 until dropped or shut down.
pub struct TestServer {
    pub addr: SocketAddr,
    pub app_parts: Option<AppParts>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<anyhow::Result<()>>>,
}

/// Handles into the running app, for tests that look inside.
pub struct AppParts {
    pub mirror: Arc<comtrexx_licensing::mirror::Mirror>,
}

impl TestServer {
    pub async fn start(config: RawConfig) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        Self::start_on(config, Arc::new(SystemClock), listener).await
    }

    /// On a clock the test moves. Such a clock jumps by days while Redis's TIME
    /// (the reference) does not: unless the test sets `clock.max_skew_ms`, it
    /// counts as agreeing with the reference however far it is moved.
    pub async fn start_with_clock(config: RawConfig, clock: Arc<dyn Clock>) -> Self {
        let mut config = config;
        if config.clock == comtrexx_licensing::config::RawClock::default() {
            config.clock.max_skew_ms = comtrexx_licensing::config::MAX_CLOCK_SKEW_MS;
        }
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        Self::start_on(config, clock, listener).await
    }

    /// Like [`TestServer::start_with_clock`], on a listener the test bound itself
    /// (e.g. on an address of a network namespace it made).
    pub async fn start_on(
        config: RawConfig,
        clock: Arc<dyn Clock>,
        listener: tokio::net::TcpListener,
    ) -> Self {
        let mut config = config;
        config.listen_addr = "127.0.0.1:0".into();
        config.metrics_addr = String::new();
        let config = config.validate().expect("test config is valid");
        let app = App::build(&config, clock).expect("build app");
        let parts = AppParts {
            mirror: app.mirror.clone(),
        };
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(app.run(listener, None, async {
            let _ = stopped.await;
        }));
        let server = Self {
            addr,
            app_parts: Some(parts),
            stop: Some(stop),
            task: Some(task),
        };
        server.wait_synced().await;
        server
    }

    /// Waits until the mirror has read the store once (bounded).
    async fn wait_synced(&self) {
        let mirror = &self.app_parts.as_ref().unwrap().mirror;
        // On time-out the store is unreachable: tests of that case go on.
        let _synced = eventually(Duration::from_secs(10), || {
            let synced = mirror.read(|s| s.position.is_some());
            async move { synced }
        })
        .await;
    }

    pub async fn client(&self) -> Client {
        LicensingServiceClient::connect(format!("http://{}", self.addr))
            .await
            .expect("connect to the test server")
    }

    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Stops the server gracefully and waits for it.
    pub async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            task.await.unwrap().unwrap();
        }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// A config for a server on the given Redis (or the memory store when `None`).
pub fn config(redis: Option<&RedisServer>, serial: &str) -> RawConfig {
    RawConfig {
        redis_url: redis.map(RedisServer::url),
        serial_number: serial.to_owned(),
        ..RawConfig::default()
    }
}

/// A config that trusts `vendor` and reads its license file.
pub fn licensed_config(redis: Option<&RedisServer>, serial: &str, vendor: &Vendor) -> RawConfig {
    RawConfig {
        license_file: Some(vendor.license_path()),
        vendor_public_key: Some(vendor.public_key()),
        ..config(redis, serial)
    }
}

/// `config` with limits that no burst of a test reaches: tests of other
/// behaviour send hundreds of concurrent writes or many activations in a row
/// (`tests/limits.rs` tests the limits themselves).
pub fn without_load_limits(mut config: RawConfig) -> RawConfig {
    config.limits.concurrent_writes = 100_000;
    config.limits.concurrent_operator_reads = 100_000;
    config.limits.activation_burst = 10_000;
    config.limits.caller_share_percent = 100;
    config
}

pub fn manual_clock() -> ManualClock {
    ManualClock::new(Utc::now())
}

impl TestServer {
    /// Like [`TestServer::start`], but returns as soon as the server listens,
    /// without waiting for the first store sync (for a store that is down).
    pub async fn start_unsynced(config: RawConfig) -> Self {
        let mut config = config;
        config.listen_addr = "127.0.0.1:0".into();
        config.metrics_addr = String::new();
        let config = config.validate().expect("test config is valid");
        let app = App::build(&config, Arc::new(SystemClock)).expect("build app");
        let parts = AppParts {
            mirror: app.mirror.clone(),
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(app.run(listener, None, async {
            let _ = stopped.await;
        }));
        Self {
            addr,
            app_parts: Some(parts),
            stop: Some(stop),
            task: Some(task),
        }
    }
}

// ---------------------------------------------------------------------------
// Large pools (tests/scale.rs, benches/scale.rs)
// ---------------------------------------------------------------------------

/// Seats written per seeding step.
const SEED_BATCH: usize = 100_000;

/// The id of seeded seat `i`: 24 bytes.
pub fn seat_user(i: usize) -> String {
    format!("user-{i:019}")
}

/// Writes `n` purchased seats into a new store of `serial`: the first batch as
/// a restore, the rest as repairs (each one script), as a large installation's
/// store holds them.
pub async fn seed_seats(redis: &RedisServer, serial: &str, n: usize) {
    let store = RedisStore::new(
        &redis.url(),
        &SerialNumber::parse(serial).unwrap(),
        Duration::from_secs(120),
    )
    .unwrap();
    let at = Utc::now() - chrono::Duration::hours(1);
    let seats = |from: usize, to: usize| -> Vec<Seat> {
        (from..to)
            .map(|i| Seat {
                user_id: UserId::parse(&seat_user(i)).unwrap(),
                feature: Feature::User,
                source: SeatSource::Purchased,
                assigned_at: at,
                over_capacity_since: None,
            })
            .collect()
    };
    let first = SEED_BATCH.min(n);
    let snapshot = Snapshot {
        position: Some(Position {
            epoch: "seed".into(),
            version: 1,
        }),
        seats: seats(0, first),
        ..Snapshot::default()
    };
    assert!(store.restore(&snapshot).await.unwrap(), "a new serial");
    let mut done = first;
    while done < n {
        let to = (done + SEED_BATCH).min(n);
        let at = store.snapshot().await.unwrap().position;
        let write = RepairWrite {
            version_floor: at.as_ref().map_or(0, |p| p.version),
            expected: at,
            add_seats: seats(done, to),
            incident: Incident::default(),
            ..RepairWrite::default()
        };
        assert!(store.repair(&write).await.unwrap().is_some(), "seeded");
        done = to;
    }
}

/// A version no feed entry has: a gap in the feed, so every replica reads a
/// full snapshot. The seat order sets (see store/lua/prelude.lua) stay true.
pub fn make_gap(conn: &mut redis::Connection, serial: &str) {
    let _: i64 = redis::Script::new(GAP)
        .key(format!("lic:{{{serial}}}:version"))
        .key(format!("lic:{{{serial}}}:order_at"))
        .invoke(conn)
        .unwrap();
}

/// Bumps the version without a feed entry; keeps the order sets' mark with it.
const GAP: &str = "local v = redis.call('INCR', KEYS[1]) \
if redis.call('GET', KEYS[2]) == tostring(v - 1) then redis.call('SET', KEYS[2], v) end \
return v";

/// A numeric field of `INFO section`.
pub fn info_field(redis: &RedisServer, section: &str, field: &str) -> u64 {
    let info: String = redis::cmd("INFO")
        .arg(section)
        .query(&mut redis.connection())
        .unwrap();
    info.lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("INFO {section} has {field}"))
}

// ---------------------------------------------------------------------------
// The service as a process
// ---------------------------------------------------------------------------

/// A process on a loopback port of its own, started by `command(port)`;
/// SIGKILLed on `kill` and on drop; restartable on the same port.
pub struct Process {
    child: Option<std::process::Child>,
    port: u16,
    command: Box<dyn Fn(u16) -> std::process::Command>,
}

impl Process {
    pub fn start(command: impl Fn(u16) -> std::process::Command + 'static) -> Self {
        let mut p = Self {
            child: None,
            port: unused_port(),
            command: Box::new(command),
        };
        p.restart();
        p
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// A gRPC client, once the process listens.
    pub async fn client(&self) -> Client {
        eventually_some(Duration::from_secs(15), || {
            let endpoint = self.endpoint();
            async move { Client::connect(endpoint).await.ok() }
        })
        .await
        .expect("the process listens")
    }

    /// SIGKILL.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn restart(&mut self) {
        self.kill();
        let mut cmd = (self.command)(self.port);
        cmd.env("RUST_LOG", "warn")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        self.child = Some(cmd.spawn().expect("start the process"));
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The service binary, configured by environment as `config` says (the
/// settings the tests vary).
pub fn service_process(config: &RawConfig) -> Process {
    let mut env = vec![
        (
            "LICENSING_SERIAL_NUMBER".to_owned(),
            config.serial_number.clone(),
        ),
        (
            "LICENSING_WATCH__HEARTBEAT_MS".into(),
            config.watch.heartbeat_ms.to_string(),
        ),
        (
            "LICENSING_TRYOUT__SEATS".into(),
            config.tryout.seats.to_string(),
        ),
        (
            "LICENSING_LIMITS__CONCURRENT_WRITES".into(),
            "100000".into(),
        ),
    ];
    if let Some(url) = &config.redis_url {
        env.push(("LICENSING_REDIS_URL".into(), url.clone()));
    }
    if let Some(path) = &config.license_file {
        env.push(("LICENSING_LICENSE_FILE".into(), path.display().to_string()));
    }
    if let Some(key) = &config.vendor_public_key {
        env.push(("LICENSING_VENDOR_PUBLIC_KEY".into(), key.clone()));
    }
    Process::start(move |port| {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_comtrexx-licensing"));
        cmd.arg("serve")
            .env("LICENSING_LISTEN_ADDR", format!("127.0.0.1:{port}"))
            .env("LICENSING_METRICS_ADDR", "")
            .env("LICENSING_DRAIN_TIMEOUT_MS", "0")
            .envs(env.iter().map(|(k, v)| (k, v)));
        cmd
    })
}

// ---------------------------------------------------------------------------
// Concurrent-use seats
// ---------------------------------------------------------------------------

/// Two replicas of one PBX on a private Redis: `user` sold for concurrent use
/// (`users` at a time), `call_assist` as 5 assigned seats, leases of
/// `lease_seconds`; `adjust` changes the configuration further. Returns once
/// both replicas have applied the license: the replicas, the vendor, the
/// serial number and the Redis.
pub async fn concurrent_replicas(
    tag: &str,
    users: u32,
    lease_seconds: u64,
    adjust: impl Fn(&mut RawConfig),
) -> (TestServer, TestServer, Vendor, String, RedisServer) {
    let redis = RedisServer::start();
    let vendor = Vendor::new();
    let serial = serial(tag);
    vendor.write_license_with_models(
        &serial,
        comtrexx_licensing::domain::Edition::Vm,
        Utc::now() - chrono::Duration::hours(1),
        &[
            (
                Feature::User,
                users,
                comtrexx_licensing::domain::SeatModel::Concurrent,
            ),
            (
                Feature::CallAssist,
                5,
                comtrexx_licensing::domain::SeatModel::Assigned,
            ),
        ],
    );
    let mut config = without_load_limits(RawConfig {
        redis_timeout_ms: 5_000,
        ..licensed_config(Some(&redis), &serial, &vendor)
    });
    config.leases.duration_seconds = lease_seconds;
    adjust(&mut config);
    let (a, b) = tokio::join!(TestServer::start(config.clone()), TestServer::start(config));
    for server in [&a, &b] {
        wait_active(&server.client().await).await;
    }
    (a, b, vendor, serial, redis)
}
