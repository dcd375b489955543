//! The sections of the configuration (`[auth]`, `[limits]`, ...) as written, and
//! their validation into the options types the modules own. Values only: the
//! files a section names are read by `app`.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{ConfigError, LogFormat, MAX_CLOCK_SKEW_MS, invalid, within};
use crate::auth::tls::TlsFiles;
use crate::auth::{AuthMode, AuthOptions};
use crate::domain::TryoutPolicy;
use crate::domain::audit::AuditRetention;
use crate::mirror::MirrorConfig;
use crate::upstream::LicenseSource;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawAuth {
    /// `protected` | `enforce` | `disabled`.
    pub mode: String,
    /// TOML file of callers (names, roles, certificate identities, token digests).
    pub callers_file: Option<PathBuf>,
    /// How often the callers file and the TLS files are checked for changes.
    pub reload_interval_ms: u64,
    /// Accept a callers file that names no callers (else it is refused at
    /// start and on reload, keeping the callers in force).
    pub allow_empty_callers_file: bool,
    /// Accept bearer tokens over plaintext from peers that are not on loopback
    /// (else refused: the token crossed the network in clear text).
    pub allow_plaintext_tokens: bool,
}

impl Default for RawAuth {
    fn default() -> Self {
        Self {
            mode: "protected".into(),
            callers_file: None,
            reload_interval_ms: 5000,
            allow_empty_callers_file: false,
            allow_plaintext_tokens: false,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawAudit {
    /// Accepted changes kept at most.
    pub max_entries: u64,
    /// Refusals kept at most, apart from the changes (refusals never displace
    /// a change).
    pub max_refusals: u64,
    pub max_age_days: u32,
}

impl Default for RawAudit {
    fn default() -> Self {
        let r = AuditRetention::default();
        Self {
            max_entries: r.max_entries,
            max_refusals: r.max_refusals,
            max_age_days: u32::try_from(r.max_age.num_days()).unwrap_or(400),
        }
    }
}

/// Spans exported over OTLP, set independently of the log lines.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawTrace {
    /// Which spans reach the OTLP exporter (an `EnvFilter` directive, like
    /// `log.level`, which only governs log lines).
    pub level: String,
    /// Share of new traces sampled (0.0 to 1.0); a call that carries a sampled
    /// W3C `traceparent` is always traced (parent-based).
    pub sampling_ratio: f64,
}

impl Default for RawTrace {
    fn default() -> Self {
        Self {
            level: "info".into(),
            sampling_ratio: 1.0,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawTryout {
    pub days: u32,
    pub seats: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawLog {
    pub format: String,
    pub level: String,
}

/// The time authority (`domain::clock::judge`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawClock {
    /// How far this node's clock may differ from the reference time (the seat
    /// store's clock, Redis `TIME`) and still count.
    pub max_skew_ms: u64,
}

impl Default for RawClock {
    fn default() -> Self {
        Self {
            max_skew_ms: crate::domain::clock::DEFAULT_MAX_SKEW_MS as u64,
        }
    }
}

/// `WatchSeats` streams.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawWatch {
    /// A heartbeat at least this often while nothing changes (ms).
    pub heartbeat_ms: u64,
}

impl Default for RawWatch {
    fn default() -> Self {
        Self {
            heartbeat_ms: crate::grpc::WatchOptions::default().heartbeat.as_millis() as u64,
        }
    }
}

/// Concurrent-use seats (`leases.*`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawLeases {
    /// How long a lease holds unless its holder renews it: a crashed holder's
    /// seat is free again within this.
    pub duration_seconds: u64,
}

/// The default of `leases.duration_seconds`: three renewals of 30 s.
pub const DEFAULT_LEASE_DURATION_SECONDS: u64 = 90;

impl Default for RawLeases {
    fn default() -> Self {
        Self {
            duration_seconds: DEFAULT_LEASE_DURATION_SECONDS,
        }
    }
}

impl RawLeases {
    /// `leases.duration_seconds`: 5 s (a holder renews well within it) to an
    /// hour (a crashed holder's seats stay taken that long at most).
    pub(super) fn validate(&self) -> Result<Duration, ConfigError> {
        let s = within("leases.duration_seconds", self.duration_seconds, 5..=3600)?;
        Ok(Duration::from_secs(s))
    }
}

/// Read your writes (`min_version` of the reads).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawConsistency {
    /// How long a read with `min_version` waits for this replica's copy to
    /// reach it before answering `NOT_YET_CONSISTENT`.
    pub max_wait_ms: u64,
}

/// The default of `consistency.max_wait_ms`: the feed brings a write within
/// a few milliseconds; a nudged resync within one round trip or two.
pub const DEFAULT_CONSISTENCY_MAX_WAIT_MS: u64 = 100;

impl Default for RawConsistency {
    fn default() -> Self {
        Self {
            max_wait_ms: DEFAULT_CONSISTENCY_MAX_WAIT_MS,
        }
    }
}

impl RawWatch {
    /// `watch.heartbeat_ms`: from 100 ms up to a minute, below the idle
    /// timeouts of proxies and load balancers (a minute or more).
    pub(super) fn validate(&self) -> Result<crate::grpc::WatchOptions, ConfigError> {
        let ms = within("watch.heartbeat_ms", self.heartbeat_ms, 100..=60_000)?;
        Ok(crate::grpc::WatchOptions {
            heartbeat: Duration::from_millis(ms),
        })
    }
}

impl RawConsistency {
    /// `consistency.max_wait_ms`: 0 (never wait: a copy behind answers
    /// `NOT_YET_CONSISTENT` at once) to 10 s (a reader should rather ask
    /// another replica than wait longer).
    pub(super) fn validate(&self) -> Result<Duration, ConfigError> {
        let ms = within("consistency.max_wait_ms", self.max_wait_ms, 0..=10_000)?;
        Ok(Duration::from_millis(ms))
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawMirror {
    pub stale_after_ms: u64,
    pub resync_interval_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawLicensingServer {
    /// `https://host:port` (`http://` only with `development_installation`); unset = none.
    pub url: Option<String>,
    /// PEM CA bundle to verify the server with (default: public web roots).
    pub ca_file: Option<PathBuf>,
    pub timeout_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawReconcile {
    pub interval_secs: u64,
    /// Random spread of each interval, in percent (either way).
    pub jitter_percent: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawInitialization {
    /// How long an initialization code's nonce is accepted.
    pub code_ttl_minutes: u32,
}

/// Request limits and load protection (`limits.*`; see `crate::limits`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawLimits {
    /// Largest request message, in bytes.
    pub max_message_bytes: u64,
    /// Server-side deadline of one call; a client's shorter `grpc-timeout` wins.
    pub rpc_deadline_ms: u64,
    pub keepalive_interval_ms: u64,
    pub keepalive_timeout_ms: u64,
    /// `GOAWAY` after this, so clients reconnect (and rebalance).
    pub max_connection_age_ms: u64,
    /// A connection still open this long after its `GOAWAY` is closed.
    pub max_connection_age_grace_ms: u64,
    /// Concurrent `CheckSeat` calls.
    pub concurrent_hot_path: u32,
    /// Concurrent writes (seats, tryout, activation, reconcile).
    pub concurrent_writes: u32,
    /// Concurrent operator reads (overview, seat lists, tryout status).
    pub concurrent_operator_reads: u32,
    pub watch_subscribers_per_caller: u32,
    /// `CreateInitializationCode` / `ApplyActivation` calls per caller and minute.
    pub activation_per_minute: u32,
    pub activation_burst: u32,
    /// Share (percent) of each concurrency budget one caller may hold.
    pub caller_share_percent: u32,
    /// How long a request may take to arrive whole before it is refused.
    pub request_body_timeout_ms: u64,
    /// HTTP/2 `SETTINGS_MAX_CONCURRENT_STREAMS` of every connection.
    pub max_streams_per_connection: u32,
    /// From accept to the TLS handshake done and the HTTP/2 preface read.
    pub handshake_timeout_ms: u64,
    /// Open connections in total and per peer address.
    pub max_connections: u32,
    pub max_connections_per_peer: u32,
    /// Open health watches in total and per peer address.
    pub health_watches: u32,
    pub health_watches_per_peer: u32,
}

impl Default for RawLimits {
    fn default() -> Self {
        let l = crate::limits::Limits::default();
        Self {
            max_message_bytes: l.max_message_bytes as u64,
            rpc_deadline_ms: l.rpc_deadline.as_millis() as u64,
            keepalive_interval_ms: l.keepalive_interval.as_millis() as u64,
            keepalive_timeout_ms: l.keepalive_timeout.as_millis() as u64,
            max_connection_age_ms: l.max_connection_age.as_millis() as u64,
            max_connection_age_grace_ms: l.max_connection_age_grace.as_millis() as u64,
            concurrent_hot_path: l.budgets.hot_path as u32,
            concurrent_writes: l.budgets.writes as u32,
            concurrent_operator_reads: l.budgets.operator_reads as u32,
            watch_subscribers_per_caller: l.watch_subscribers_per_caller as u32,
            activation_per_minute: l.activation_per_minute,
            activation_burst: l.activation_burst,
            caller_share_percent: l.caller_share_percent,
            request_body_timeout_ms: l.request_body_timeout.as_millis() as u64,
            max_streams_per_connection: l.max_streams_per_connection,
            handshake_timeout_ms: l.handshake_timeout.as_millis() as u64,
            max_connections: l.max_connections as u32,
            max_connections_per_peer: l.max_connections_per_peer as u32,
            health_watches: l.health_watches as u32,
            health_watches_per_peer: l.health_watches_per_peer as u32,
        }
    }
}

impl RawLimits {
    pub fn validate(&self) -> Result<crate::limits::Limits, ConfigError> {
        let ms = |key, value, range| within(key, value, range).map(Duration::from_millis);
        let count = |key, value, max| within(key, value, 1..=max).map(|v| v as usize);
        Ok(crate::limits::Limits {
            max_message_bytes: within(
                "limits.max_message_bytes",
                self.max_message_bytes,
                4096..=16 * 1024 * 1024,
            )? as usize,
            rpc_deadline: ms(
                "limits.rpc_deadline_ms",
                self.rpc_deadline_ms,
                100..=600_000,
            )?,
            keepalive_interval: ms(
                "limits.keepalive_interval_ms",
                self.keepalive_interval_ms,
                1000..=3_600_000,
            )?,
            keepalive_timeout: ms(
                "limits.keepalive_timeout_ms",
                self.keepalive_timeout_ms,
                1000..=600_000,
            )?,
            max_connection_age: ms(
                "limits.max_connection_age_ms",
                self.max_connection_age_ms,
                100..=7 * 86_400_000,
            )?,
            max_connection_age_grace: ms(
                "limits.max_connection_age_grace_ms",
                self.max_connection_age_grace_ms,
                0..=86_400_000,
            )?,
            budgets: crate::limits::Budgets {
                hot_path: count(
                    "limits.concurrent_hot_path",
                    self.concurrent_hot_path,
                    100_000,
                )?,
                writes: count("limits.concurrent_writes", self.concurrent_writes, 100_000)?,
                operator_reads: count(
                    "limits.concurrent_operator_reads",
                    self.concurrent_operator_reads,
                    100_000,
                )?,
            },
            watch_subscribers_per_caller: count(
                "limits.watch_subscribers_per_caller",
                self.watch_subscribers_per_caller,
                10_000,
            )?,
            activation_per_minute: within(
                "limits.activation_per_minute",
                self.activation_per_minute,
                1..=60_000,
            )?,
            activation_burst: within("limits.activation_burst", self.activation_burst, 1..=10_000)?,
            caller_share_percent: within(
                "limits.caller_share_percent",
                self.caller_share_percent,
                1..=100,
            )?,
            request_body_timeout: ms(
                "limits.request_body_timeout_ms",
                self.request_body_timeout_ms,
                100..=600_000,
            )?,
            max_streams_per_connection: within(
                "limits.max_streams_per_connection",
                self.max_streams_per_connection,
                1..=100_000,
            )?,
            handshake_timeout: ms(
                "limits.handshake_timeout_ms",
                self.handshake_timeout_ms,
                100..=60_000,
            )?,
            max_connections: count("limits.max_connections", self.max_connections, 1_000_000)?,
            max_connections_per_peer: count(
                "limits.max_connections_per_peer",
                self.max_connections_per_peer,
                1_000_000,
            )?,
            health_watches: count("limits.health_watches", self.health_watches, 100_000)?,
            health_watches_per_peer: count(
                "limits.health_watches_per_peer",
                self.health_watches_per_peer,
                100_000,
            )?,
        })
    }
}

impl Default for RawLicensingServer {
    fn default() -> Self {
        Self {
            url: None,
            ca_file: None,
            timeout_ms: 5000,
        }
    }
}

impl Default for RawReconcile {
    fn default() -> Self {
        Self {
            interval_secs: 6 * 3600,
            jitter_percent: 10,
        }
    }
}

impl Default for RawInitialization {
    fn default() -> Self {
        Self {
            code_ttl_minutes: 24 * 60,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawTls {
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    /// PEM CA bundle: clients prove who they are with a certificate it issued.
    pub client_ca_file: Option<PathBuf>,
    /// With `client_ca_file`: a client without a valid certificate is refused
    /// at the handshake. `false`: a certificate is optional (callers with a
    /// bearer token need none) and checked per call.
    pub require_client_certificate: bool,
}

impl Default for RawTls {
    fn default() -> Self {
        Self {
            cert_file: None,
            key_file: None,
            client_ca_file: None,
            require_client_certificate: true,
        }
    }
}

impl Default for RawTryout {
    fn default() -> Self {
        let p = TryoutPolicy::default();
        Self {
            days: p.days,
            seats: p.seats,
        }
    }
}

impl Default for RawLog {
    fn default() -> Self {
        Self {
            format: "text".into(),
            level: "info".into(),
        }
    }
}

impl Default for RawMirror {
    fn default() -> Self {
        let m = MirrorConfig::default();
        Self {
            stale_after_ms: m.stale_after.as_millis() as u64,
            resync_interval_ms: m.resync_interval.as_millis() as u64,
        }
    }
}

impl RawTryout {
    pub(super) fn validate(&self) -> Result<TryoutPolicy, ConfigError> {
        Ok(TryoutPolicy {
            days: within("tryout.days", self.days, 1..=365)?,
            seats: within("tryout.seats", self.seats, 1..=1000)?,
        })
    }
}

impl RawLicensingServer {
    /// The server at `url` (set); plain `http://` only in a development installation.
    pub(super) fn validate(
        &self,
        url: &str,
        development: bool,
    ) -> Result<LicenseSource, ConfigError> {
        if !(url.starts_with("https://") || url.starts_with("http://")) {
            return Err(invalid(
                "licensing_server.url",
                "must start with https:// (or http:// for a local simulator)",
            ));
        }
        // Plain HTTP lets anyone on the path answer for the licensing server;
        // only a development installation (which may trust any vendor key
        // anyway) accepts it.
        if url.starts_with("http://") && !development {
            return Err(invalid(
                "licensing_server.url",
                format!(
                    "{url:?} is plain http://: use https:// (with licensing_server.ca_file for a private CA), or set development_installation = true for a development installation (e.g. licensing-sim on this machine)"
                ),
            ));
        }
        let timeout_ms = within(
            "licensing_server.timeout_ms",
            self.timeout_ms,
            100..=120_000,
        )?;
        Ok(LicenseSource::Server {
            url: url.to_owned(),
            ca_file: self.ca_file.clone(),
            timeout: Duration::from_millis(timeout_ms),
        })
    }
}

impl RawReconcile {
    /// The interval and its jitter (percent).
    pub(super) fn validate(&self) -> Result<(Duration, u32), ConfigError> {
        let secs = within(
            "reconcile.interval_secs",
            self.interval_secs,
            1..=30 * 86_400,
        )?;
        let jitter = within("reconcile.jitter_percent", self.jitter_percent, 0..=50)?;
        Ok((Duration::from_secs(secs), jitter))
    }
}

impl RawInitialization {
    /// How long an initialization code is accepted.
    pub(super) fn validate(&self) -> Result<chrono::Duration, ConfigError> {
        let minutes = within(
            "initialization.code_ttl_minutes",
            self.code_ttl_minutes,
            1..=30 * 24 * 60,
        )?;
        Ok(chrono::Duration::minutes(i64::from(minutes)))
    }
}

impl RawLog {
    pub(super) fn validate(&self) -> Result<LogFormat, ConfigError> {
        let format = match self.format.as_str() {
            "text" => LogFormat::Text,
            "json" => LogFormat::Json,
            other => {
                return Err(invalid(
                    "log.format",
                    format!("{other:?} is not text or json"),
                ));
            }
        };
        if tracing_subscriber::EnvFilter::try_new(&self.level).is_err() {
            return Err(invalid(
                "log.level",
                format!(
                    "{:?} is not a level or filter (e.g. info, debug, comtrexx_licensing=debug)",
                    self.level
                ),
            ));
        }
        Ok(format)
    }
}

impl RawTrace {
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        if tracing_subscriber::EnvFilter::try_new(&self.level).is_err() {
            return Err(invalid(
                "trace.level",
                format!("{:?} is not a level or filter (e.g. info, off)", self.level),
            ));
        }
        if !(0.0..=1.0).contains(&self.sampling_ratio) {
            return Err(invalid("trace.sampling_ratio", "must be 0.0 to 1.0"));
        }
        Ok(())
    }
}

impl RawMirror {
    pub(super) fn validate(&self) -> Result<MirrorConfig, ConfigError> {
        if self.stale_after_ms < 100 {
            return Err(invalid("mirror.stale_after_ms", "must be at least 100"));
        }
        if self.resync_interval_ms < 1000 {
            return Err(invalid(
                "mirror.resync_interval_ms",
                "must be at least 1000",
            ));
        }
        Ok(MirrorConfig {
            stale_after: Duration::from_millis(self.stale_after_ms),
            resync_interval: Duration::from_millis(self.resync_interval_ms),
            ..MirrorConfig::default()
        })
    }
}

impl RawClock {
    /// `clock.max_skew_ms`. Below a second, ordinary network delay would look
    /// like a wrong clock; beyond a year nothing is checked any more.
    pub(super) fn validate(&self) -> Result<i64, ConfigError> {
        if !(1_000..=MAX_CLOCK_SKEW_MS).contains(&self.max_skew_ms) {
            return Err(invalid(
                "clock.max_skew_ms",
                format!("must be 1000 to {MAX_CLOCK_SKEW_MS} (a year)"),
            ));
        }
        Ok(i64::try_from(self.max_skew_ms).unwrap_or(i64::MAX))
    }
}

impl RawTls {
    /// The TLS files (named, not read); `None`: plaintext.
    pub(super) fn validate(&self) -> Result<Option<TlsFiles>, ConfigError> {
        match (&self.cert_file, &self.key_file) {
            (Some(c), Some(k)) => Ok(Some(TlsFiles {
                cert_file: c.clone(),
                key_file: k.clone(),
                client_ca_file: self.client_ca_file.clone(),
                require_client_certificate: self.require_client_certificate,
            })),
            (None, None) if self.client_ca_file.is_some() => Err(invalid(
                "tls.client_ca_file",
                "needs tls.cert_file and tls.key_file (client certificates only exist over TLS)",
            )),
            (None, None) => Ok(None),
            (Some(_), None) => Err(invalid("tls.key_file", "is required with tls.cert_file")),
            (None, Some(_)) => Err(invalid("tls.cert_file", "is required with tls.key_file")),
        }
    }
}

impl RawAuth {
    /// The `auth.*` keys; the callers file is named, not read.
    pub(super) fn validate(&self) -> Result<AuthOptions, ConfigError> {
        let mode = AuthMode::parse(&self.mode).ok_or_else(|| {
            invalid(
                "auth.mode",
                format!("{:?} is not protected, enforce or disabled", self.mode),
            )
        })?;
        let reload_interval_ms = within(
            "auth.reload_interval_ms",
            self.reload_interval_ms,
            100..=3_600_000,
        )?;
        // Every caller needs credentials in enforce mode, and both kinds (token
        // digests and certificate identities) are named only in the callers file:
        // without one, the service would refuse every call but health.
        if mode == AuthMode::Enforce && self.callers_file.is_none() {
            return Err(invalid(
                "auth.callers_file",
                "auth.mode = enforce needs a callers file: every caller needs credentials, \
                 and tokens and client certificates name their caller only there; \
                 set auth.callers_file (LICENSING_AUTH__CALLERS_FILE) to a TOML file of \
                 [[caller]] entries (make a token entry with \
                 `comtrexx-licensing auth token --name NAME --role ROLE`), \
                 or use auth.mode = protected",
            ));
        }
        Ok(AuthOptions {
            mode,
            callers_file: self.callers_file.clone(),
            reload_interval: Duration::from_millis(reload_interval_ms),
            allow_empty_callers_file: self.allow_empty_callers_file,
            allow_plaintext_tokens: self.allow_plaintext_tokens,
        })
    }
}

impl RawAudit {
    pub(super) fn validate(&self) -> Result<AuditRetention, ConfigError> {
        let max_entries = within("audit.max_entries", self.max_entries, 1..=100_000_000)?;
        let max_refusals = within("audit.max_refusals", self.max_refusals, 1..=100_000_000)?;
        let max_age_days = within("audit.max_age_days", self.max_age_days, 1..=36_500)?;
        Ok(AuditRetention {
            max_entries,
            max_refusals,
            max_age: chrono::Duration::days(i64::from(max_age_days)),
        })
    }
}
