//! Decides `CheckSeat` in process, from a streamed copy of comtrexx-licensing's
//! seat state.
//!
//! A [`Client`] follows `WatchSeats` on one of the service's replicas (a
//! snapshot, then every change in version order, then heartbeats), keeps a
//! copy of everything the decision reads, and answers
//! [`check_seat`](Client::check_seat) from it with the service's own decision
//! code (the domain crate's `Rules::check`: same reasons, same precedence), in
//! well under a microsecond, without allocating, without a round trip.
//!
//! ```no_run
//! use comtrexx_licensing_client::{Client, Config, Decision, Feature};
//!
//! # async fn call_handling() -> Result<(), Box<dyn std::error::Error>> {
//! let client = Client::start(Config {
//!     endpoints: vec!["https://licensing-0.licensing:50051".into()],
//!     token: Some(std::fs::read_to_string("/run/secrets/licensing-token")?.trim().into()),
//!     cache_file: Some("/var/lib/pbx/licensing.cache".into()),
//!     ..Config::default()
//! })?;
//! client.ready().await; // a copy, from the stream or the cache file
//! match client.check_seat("alice", Feature::User) {
//!     Decision::Known(a) if a.licensed => { /* place the call */ }
//!     Decision::Known(a) => println!("not licensed: {:?}", a.reason),
//!     Decision::Unknown => { /* no copy at all: the caller's own policy */ }
//! }
//! # Ok(()) }
//! ```
//!
//! What it promises:
//!
//! - **It keeps deciding.** Once it has a copy it answers from it while no
//!   replica answers (the answer says [`stale`](Answer::stale) after
//!   [`Config::stale_after`] without a message), and with a
//!   [`cache_file`](Config::cache_file) it starts deciding from its last copy
//!   after a restart, at once. Before it has any copy it answers
//!   [`Decision::Unknown`], never "not licensed".
//! - **It resumes without losing a change.** Each change is exactly one
//!   version above the one before; the client reconnects with jittered
//!   backoff, across the endpoints, with its version and epoch, and gets the
//!   changes after it or a new snapshot. A change out of order is never
//!   applied.
//! - **Its clock is the deployment's.** Time-dependent answers (tryout end,
//!   grace end, over-capacity grace, entitlement expiry) use the reference
//!   time of the stream advanced by the monotonic clock, never the wall clock.
//! - **Read your writes.** [`wait_for_version`](Client::wait_for_version)
//!   waits until the copy has a write's `version` (made on any replica).
//! - **Leases of concurrent features.** [`acquire`](Client::acquire) returns a
//!   [`LeaseGuard`]: renewed in the background with the holder's other leases
//!   in one call, released when dropped, and counted lost by the monotonic
//!   clock no later than the service frees it.
//!
//! `licensing-agent` (this crate's binary) runs a client and answers the
//! service's `CheckSeat` from it on a local socket, for callers that cannot
//! link Rust.

#![warn(missing_docs)]

pub mod agent;
mod cache;
pub mod copy;
mod follow;
mod leases;

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use parking_lot::{Mutex, RwLock};
use tokio::sync::watch;

pub use cache::CacheError;
pub use comtrexx_licensing_domain::{Feature, SeatModel, SeatReason, SeatSource};
pub use leases::{AcquireError, LeaseGuard, Lost};

use copy::SeatCopy;

/// How a [`Client`] connects and how it judges freshness.
#[derive(Debug, Clone)]
pub struct Config {
    /// The service's replicas (`http://host:port` or `https://host:port`),
    /// tried in turn from a random one.
    pub endpoints: Vec<String>,
    /// TLS for `https://` endpoints: the CA to trust (PEM; default: the
    /// public web roots) and a client certificate (mutual TLS).
    pub tls: Option<Tls>,
    /// A bearer token (the callers file's token of a `call_handling` caller).
    pub token: Option<String>,
    /// The features to follow; empty: all. A feature not followed is
    /// answered [`Decision::Unknown`].
    pub features: Vec<Feature>,
    /// The service's `watch.heartbeat_ms`: a stream silent for three of them
    /// is dropped and resumed.
    pub heartbeat: Duration,
    /// A copy that heard nothing for this long is stale (answers say so).
    /// Default: five heartbeats.
    pub stale_after: Option<Duration>,
    /// Where the last good copy is kept; `None`: not kept.
    pub cache_file: Option<PathBuf>,
    /// How often, at most, the cache file is written while changes arrive.
    pub cache_interval: Duration,
    /// The vendor's public key (base64, as in the service's configuration):
    /// license documents are verified again with it. `None`: the license's
    /// entitlements are taken as the (authenticated) stream sends them.
    pub vendor_public_key: Option<String>,
    /// Bound on connecting to one endpoint.
    pub connect_timeout: Duration,
    /// The name leases are held under ([`Client::acquire`]): this instance,
    /// e.g. a call-handling pod's name. Default: `$HOSTNAME`, else
    /// `pid-<process id>`.
    pub holder: Option<String>,
    /// Reconnect backoff: from `backoff_min` (after a stream that delivered)
    /// doubling per failed attempt up to `backoff_max`, each a random point in
    /// its upper half.
    pub backoff_min: Duration,
    /// See `backoff_min`.
    pub backoff_max: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            endpoints: Vec::new(),
            tls: None,
            token: None,
            features: Vec::new(),
            heartbeat: Duration::from_secs(5),
            stale_after: None,
            cache_file: None,
            cache_interval: Duration::from_secs(1),
            vendor_public_key: None,
            connect_timeout: Duration::from_secs(2),
            holder: None,
            backoff_min: Duration::from_millis(100),
            backoff_max: Duration::from_secs(5),
        }
    }
}

/// TLS settings of the connection to the service.
#[derive(Debug, Clone, Default)]
pub struct Tls {
    /// The CA certificate(s) to trust, PEM; `None`: the public web roots.
    pub ca_pem: Option<Vec<u8>>,
    /// A client certificate and its key, PEM (mutual TLS).
    pub identity: Option<(Vec<u8>, Vec<u8>)>,
    /// The name to verify the server's certificate for, when not the
    /// endpoint's host.
    pub domain_name: Option<String>,
}

impl Config {
    fn stale_limit(&self) -> Duration {
        self.stale_after.unwrap_or(self.heartbeat * 5)
    }
}

/// A configuration that cannot work, and how to fix it.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// `Config::endpoints` is empty.
    #[error(
        "no endpoints: set Config::endpoints to the service's address, e.g. https://licensing:50051"
    )]
    NoEndpoints,
    /// An endpoint that is not an `http://` or `https://` URL.
    #[error("endpoint {0:?} must start with http:// or https://")]
    Endpoint(String),
    /// `Config::vendor_public_key` is not a base64 Ed25519 public key.
    #[error("vendor_public_key: {0}")]
    VendorKey(String),
    /// `Config::heartbeat` below 10 ms.
    #[error("heartbeat must be at least 10 ms")]
    Heartbeat,
    /// `Config::holder` is not 1 to 128 bytes without control characters.
    #[error("holder: {0}")]
    Holder(String),
    /// `Client::start` outside a Tokio runtime.
    #[error("Client::start must be called within a Tokio runtime")]
    NoRuntime,
}

/// The answer of [`Client::check_seat`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// The client has no copy (no stream yet, no cache file), or does not
    /// follow the feature: it cannot say. Never means "not licensed".
    Unknown,
    /// Decided from the copy.
    Known(Answer),
}

impl Decision {
    /// `Some(licensed)`, or `None` when unknown.
    pub fn licensed(&self) -> Option<bool> {
        match self {
            Decision::Unknown => None,
            Decision::Known(a) => Some(a.licensed),
        }
    }
}

/// A decision from the copy: what the service's `CheckSeat` answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Answer {
    /// Whether the user may use the feature now.
    pub licensed: bool,
    /// Why (`Assigned` when licensed; else the first cause from the PBX down).
    pub reason: SeatReason,
    /// The pool of the user's seat, if they hold one.
    pub source: Option<SeatSource>,
    /// When this answer stops holding, if it does.
    pub valid_until: Option<DateTime<Utc>>,
    /// The copy's version.
    pub version: u64,
    /// The copy heard nothing for `stale_after`, or is from the cache file
    /// and no replica answered since.
    pub stale: bool,
}

/// Where the copy is and how fresh: export it as metrics or a status page.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Status {
    /// Whether a copy is held.
    pub has_copy: bool,
    /// The copy is stale (see [`Answer::stale`]).
    pub stale: bool,
    /// A stream is open now.
    pub connected: bool,
    /// The endpoint of the open stream (or the last one tried).
    pub endpoint: Option<String>,
    /// The copy's version.
    pub version: u64,
    /// The store's epoch the version counts in.
    pub epoch: String,
    /// The copy's reference time now.
    pub reference_time: Option<DateTime<Utc>>,
    /// The time since the last message of any kind (the copy's lag).
    pub since_last_message: Option<Duration>,
    /// The time since the last change or snapshot applied.
    pub since_last_change: Option<Duration>,
    /// The copy came from the cache file and no replica answered since.
    pub from_cache_file: bool,
    /// Seats in the copy.
    pub seats: usize,
    /// Streams opened since start.
    pub connects: u64,
    /// Why the last stream ended or the last connect failed.
    pub last_error: Option<String>,
}

/// What the follower task and the handles share.
struct Shared {
    config: Config,
    key: Option<ed25519_dalek::VerifyingKey>,
    /// The copy; read by every `check_seat`, written per message (briefly).
    copy: RwLock<Option<SeatCopy>>,
    /// Milliseconds since `base` of the last message (0: none).
    last_message: AtomicU64,
    last_change: AtomicU64,
    base: Instant,
    /// The copy's version, for waiters (`None`: no copy).
    version: watch::Sender<Option<u64>>,
    info: Mutex<Info>,
    /// The copy came from the cache file and no replica answered since (read
    /// by every `check_seat`: no lock).
    from_cache_file: AtomicBool,
    /// Signalled when the copy changed (the cache writer waits on it).
    changed: tokio::sync::Notify,
    /// The name leases are held under.
    holder: String,
    /// The leases this client holds.
    leases: leases::Leases,
    /// Signalled after an acquisition (the renewer recomputes its period).
    renew_now: tokio::sync::Notify,
}

#[derive(Default)]
struct Info {
    connected: bool,
    endpoint: Option<String>,
    connects: u64,
    last_error: Option<String>,
}

impl Shared {
    fn stamp(&self, at: Instant) -> u64 {
        // +1: 0 means "never".
        at.saturating_duration_since(self.base).as_millis() as u64 + 1
    }

    fn since(&self, stamp: u64) -> Option<Duration> {
        (stamp != 0).then(|| {
            self.base
                .elapsed()
                .saturating_sub(Duration::from_millis(stamp - 1))
        })
    }

    fn is_stale(&self) -> bool {
        let silent = self
            .since(self.last_message.load(Ordering::Relaxed))
            .is_none_or(|d| d > self.config.stale_limit());
        silent || self.from_cache_file.load(Ordering::Relaxed)
    }
}

/// Stops the background tasks when the last handle is dropped.
struct Tasks(Vec<tokio::task::JoinHandle<()>>);

impl Drop for Tasks {
    fn drop(&mut self) {
        for t in &self.0 {
            t.abort();
        }
    }
}

/// A handle to the local copy; cheap to clone, all clones share it. The
/// background tasks stop when the last handle is dropped.
#[derive(Clone)]
pub struct Client {
    shared: Arc<Shared>,
    _tasks: Arc<Tasks>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("endpoints", &self.shared.config.endpoints)
            .finish_non_exhaustive()
    }
}

impl Client {
    /// Loads the cache file (if any), then follows `WatchSeats` in the
    /// background on the current Tokio runtime.
    pub fn start(config: Config) -> Result<Self, ConfigError> {
        if config.endpoints.is_empty() {
            return Err(ConfigError::NoEndpoints);
        }
        for e in &config.endpoints {
            if !(e.starts_with("http://") || e.starts_with("https://")) {
                return Err(ConfigError::Endpoint(e.clone()));
            }
        }
        if config.heartbeat < Duration::from_millis(10) {
            return Err(ConfigError::Heartbeat);
        }
        let key = config
            .vendor_public_key
            .as_deref()
            .map(comtrexx_licensing_domain::license::parse_public_key)
            .transpose()
            .map_err(ConfigError::VendorKey)?;
        let holder = config.holder.clone().unwrap_or_else(|| {
            std::env::var("HOSTNAME")
                .ok()
                .filter(|h| !h.is_empty())
                .unwrap_or_else(|| format!("pid-{}", std::process::id()))
        });
        comtrexx_licensing_domain::Holder::parse(&holder)
            .map_err(|e| ConfigError::Holder(e.message))?;
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| ConfigError::NoRuntime)?;
        let shared = Arc::new(Shared {
            key,
            copy: RwLock::new(None),
            last_message: AtomicU64::new(0),
            last_change: AtomicU64::new(0),
            base: Instant::now(),
            version: watch::Sender::new(None),
            info: Mutex::new(Info::default()),
            from_cache_file: AtomicBool::new(false),
            changed: tokio::sync::Notify::new(),
            holder,
            leases: leases::Leases::default(),
            renew_now: tokio::sync::Notify::new(),
            config,
        });
        follow::load_cache(&shared);
        let mut tasks = vec![
            runtime.spawn(follow::run(shared.clone())),
            runtime.spawn(leases::renew(shared.clone())),
        ];
        if shared.config.cache_file.is_some() {
            tasks.push(runtime.spawn(follow::keep_cache(shared.clone())));
        }
        Ok(Self {
            shared,
            _tasks: Arc::new(Tasks(tasks)),
        })
    }

    /// Whether `user_id` is licensed for `feature` now, decided from the
    /// copy with the service's own rules. No allocation, no lock held beyond
    /// the lookup, no network. A user id the service would refuse as input
    /// holds no seat: not licensed, `NotAssigned`.
    pub fn check_seat(&self, user_id: &str, feature: Feature) -> Decision {
        if !self.follows(feature) {
            return Decision::Unknown;
        }
        let guard = self.shared.copy.read();
        let Some(copy) = guard.as_ref() else {
            return Decision::Unknown;
        };
        let now = copy.now(Instant::now());
        let mut check = copy.check(user_id, feature, now);
        // A lease of this holder that the stream has not brought yet.
        if check.reason == SeatReason::NoLease
            && let Some(until) = self.own_lease_until(user_id, feature)
        {
            check = copy.check_with_lease(user_id, feature, until, now);
        }
        let version = copy.version;
        drop(guard);
        Decision::Known(Answer {
            licensed: check.licensed,
            reason: check.reason,
            source: check.source,
            valid_until: check.valid_until,
            version,
            stale: self.shared.is_stale(),
        })
    }

    /// How the license the copy holds sells `feature`: `Concurrent` (a call
    /// takes a lease with [`Client::acquire`]) or `Assigned` (a seat from
    /// assignment to release: [`Client::check_seat`] alone); `None` before a
    /// copy. Call handling that asks this per call keeps working through the
    /// vendor's switch of a feature from one model to the other (see
    /// docs/operations.md, "Switching a feature to concurrent use").
    pub fn seat_model(&self, feature: Feature) -> Option<SeatModel> {
        self.shared
            .copy
            .read()
            .as_ref()
            .map(|c| c.seat_model(feature))
    }

    /// Whether the client follows `feature` (`Config::features` empty: all).
    pub fn follows(&self, feature: Feature) -> bool {
        let features = &self.shared.config.features;
        features.is_empty() || features.contains(&feature)
    }

    /// Resolves once the client has a copy (from the stream or the cache
    /// file). Bound it with `tokio::time::timeout` where waiting forever is
    /// not an option.
    pub async fn ready(&self) {
        let mut rx = self.shared.version.subscribe();
        let _ = rx.wait_for(Option::is_some).await;
    }

    /// Waits until the copy has reached `version` (a write's `version`, from
    /// any replica), at most `timeout`; the copy's version, or `Err` with the
    /// version it is at (`None`: no copy).
    pub async fn wait_for_version(
        &self,
        version: u64,
        timeout: Duration,
    ) -> Result<u64, Option<u64>> {
        let mut rx = self.shared.version.subscribe();
        let reached =
            tokio::time::timeout(timeout, rx.wait_for(|v| v.is_some_and(|v| v >= version))).await;
        match reached {
            Ok(Ok(v)) => Ok(v.unwrap_or_default()),
            _ => Err(*self.shared.version.borrow()),
        }
    }

    /// The copy's version (`None`: no copy).
    pub fn version(&self) -> Option<u64> {
        *self.shared.version.borrow()
    }

    /// Where the copy is and how fresh.
    pub fn status(&self) -> Status {
        let s = &self.shared;
        let (has_copy, version, epoch, reference_time, seats) = match s.copy.read().as_ref() {
            Some(c) => (
                true,
                c.version,
                c.epoch.clone(),
                Some(c.now(Instant::now())),
                c.seat_count(),
            ),
            None => (false, 0, String::new(), None, 0),
        };
        let info = s.info.lock();
        Status {
            has_copy,
            stale: has_copy && s.is_stale(),
            connected: info.connected,
            endpoint: info.endpoint.clone(),
            version,
            epoch,
            reference_time,
            since_last_message: s.since(s.last_message.load(Ordering::Relaxed)),
            since_last_change: s.since(s.last_change.load(Ordering::Relaxed)),
            from_cache_file: s.from_cache_file.load(Ordering::Relaxed),
            seats,
            connects: info.connects,
            last_error: info.last_error.clone(),
        }
    }
}
