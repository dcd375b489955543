//! Layered, validated configuration: built-in defaults < TOML file (`--config` or
//! `LICENSING_CONFIG`) < `LICENSING_*` environment variables (nested keys with
//! `__`, e.g. `LICENSING_TRYOUT__DAYS`). The raw form rejects unknown keys; the
//! validated form is what the service uses, and every error names its key.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ed25519_dalek::VerifyingKey;
use figment::Figment;
use figment::providers::{Env, Format as _, Serialized, Toml};
use serde::{Deserialize, Serialize};

use crate::auth::tls::TlsFiles;
use crate::auth::{AuthMode, AuthOptions};
use crate::domain::audit::AuditRetention;
use crate::domain::license::parse_public_key;
use crate::domain::{Edition, SerialNumber, TryoutPolicy};
use crate::mirror::MirrorConfig;
use crate::upstream::LicenseSource;

/// The placeholder serial number for local runs without configuration.
pub const DEV_SERIAL: &str = "DEV-0000000000";

/// The vendor's public key built into this binary (`COMTREXX_VENDOR_PUBLIC_KEY`
/// at build time, checked by `build.rs`); `None` in development builds.
pub const EMBEDDED_VENDOR_PUBLIC_KEY: Option<&str> = option_env!("COMTREXX_VENDOR_PUBLIC_KEY");

/// The largest `clock.max_skew_ms`: a year (ms).
pub const MAX_CLOCK_SKEW_MS: u64 = 365 * 86_400_000;

/// The configuration as written, before validation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawConfig {
    pub listen_addr: String,
    /// Empty disables the Prometheus endpoint.
    pub metrics_addr: String,
    pub redis_url: Option<String>,
    /// ACL user (overrides a user in `redis_url`).
    pub redis_username: Option<String>,
    pub redis_password: Option<String>,
    /// A file holding the password (a mounted Secret); trailing newline ignored.
    pub redis_password_file: Option<PathBuf>,
    /// PEM CA bundle to verify a `rediss://` server with (default: system roots).
    pub redis_tls_ca_file: Option<PathBuf>,
    pub redis_timeout_ms: u64,
    /// Acknowledge a write only once this many replicas confirm it (`WAIT`); 0 = off.
    pub redis_wait_replicas: u32,
    /// How long a write waits for the replicas' confirmation.
    pub redis_wait_timeout_ms: u64,
    pub serial_number: String,
    pub edition: String,
    pub tryout: RawTryout,
    pub license_file: Option<PathBuf>,
    pub vendor_public_key: Option<String>,
    pub over_capacity_grace_days: u32,
    pub grace_days: u32,
    pub lapse_action: String,
    pub licensing_server: RawLicensingServer,
    pub reconcile: RawReconcile,
    pub initialization: RawInitialization,
    pub drain_timeout_ms: u64,
    pub log: RawLog,
    pub mirror: RawMirror,
    pub clock: RawClock,
    /// Where the replica keeps its last known state, to answer reads after a
    /// restart while the store is unreachable; unset or empty: nowhere.
    pub state_dir: Option<PathBuf>,
    pub tls: RawTls,
    pub otlp_endpoint: Option<String>,
    pub limits: RawLimits,
    pub trace: RawTrace,
    pub auth: RawAuth,
    pub audit: RawAudit,
    /// Declares a development installation: a `vendor_public_key` other than
    /// the one built into a release binary is then trusted (and shown as such),
    /// and a plain `http://` `licensing_server.url` is accepted.
    pub development_installation: bool,
}

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
        let ms = Duration::from_millis;
        let within = |key: &'static str, value: u64, min: u64, max: u64| {
            if (min..=max).contains(&value) {
                Ok(value)
            } else {
                Err(invalid(key, format!("must be {min} to {max}")))
            }
        };
        let max_message_bytes = within(
            "limits.max_message_bytes",
            self.max_message_bytes,
            4096,
            16 * 1024 * 1024,
        )?;
        let rpc_deadline = within("limits.rpc_deadline_ms", self.rpc_deadline_ms, 100, 600_000)?;
        let keepalive_interval = within(
            "limits.keepalive_interval_ms",
            self.keepalive_interval_ms,
            1000,
            3_600_000,
        )?;
        let keepalive_timeout = within(
            "limits.keepalive_timeout_ms",
            self.keepalive_timeout_ms,
            1000,
            600_000,
        )?;
        let max_connection_age = within(
            "limits.max_connection_age_ms",
            self.max_connection_age_ms,
            100,
            7 * 86_400_000,
        )?;
        let max_connection_age_grace = within(
            "limits.max_connection_age_grace_ms",
            self.max_connection_age_grace_ms,
            0,
            86_400_000,
        )?;
        let count = |key: &'static str, value: u32, max: u64| {
            within(key, u64::from(value), 1, max).map(|v| v as usize)
        };
        let budgets = crate::limits::Budgets {
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
        };
        let watch_subscribers_per_caller = count(
            "limits.watch_subscribers_per_caller",
            self.watch_subscribers_per_caller,
            10_000,
        )?;
        within(
            "limits.activation_per_minute",
            u64::from(self.activation_per_minute),
            1,
            60_000,
        )?;
        within(
            "limits.activation_burst",
            u64::from(self.activation_burst),
            1,
            10_000,
        )?;
        let caller_share_percent = within(
            "limits.caller_share_percent",
            u64::from(self.caller_share_percent),
            1,
            100,
        )? as u32;
        let request_body_timeout = within(
            "limits.request_body_timeout_ms",
            self.request_body_timeout_ms,
            100,
            600_000,
        )?;
        let max_streams_per_connection = within(
            "limits.max_streams_per_connection",
            u64::from(self.max_streams_per_connection),
            1,
            100_000,
        )? as u32;
        let handshake_timeout = within(
            "limits.handshake_timeout_ms",
            self.handshake_timeout_ms,
            100,
            60_000,
        )?;
        let max_connections = count("limits.max_connections", self.max_connections, 1_000_000)?;
        let max_connections_per_peer = count(
            "limits.max_connections_per_peer",
            self.max_connections_per_peer,
            1_000_000,
        )?;
        let health_watches = count("limits.health_watches", self.health_watches, 100_000)?;
        let health_watches_per_peer = count(
            "limits.health_watches_per_peer",
            self.health_watches_per_peer,
            100_000,
        )?;
        Ok(crate::limits::Limits {
            caller_share_percent,
            request_body_timeout: ms(request_body_timeout),
            max_streams_per_connection,
            handshake_timeout: ms(handshake_timeout),
            max_connections,
            max_connections_per_peer,
            health_watches,
            health_watches_per_peer,
            max_message_bytes: max_message_bytes as usize,
            rpc_deadline: ms(rpc_deadline),
            keepalive_interval: ms(keepalive_interval),
            keepalive_timeout: ms(keepalive_timeout),
            max_connection_age: ms(max_connection_age),
            max_connection_age_grace: ms(max_connection_age_grace),
            budgets,
            watch_subscribers_per_caller,
            activation_per_minute: self.activation_per_minute,
            activation_burst: self.activation_burst,
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

impl Default for RawConfig {
    fn default() -> Self {
        Self {
            listen_addr: "0.0.0.0:50051".into(),
            metrics_addr: "0.0.0.0:9090".into(),
            redis_url: None,
            redis_username: None,
            redis_password: None,
            redis_password_file: None,
            redis_tls_ca_file: None,
            redis_timeout_ms: 250,
            redis_wait_replicas: 0,
            redis_wait_timeout_ms: 100,
            serial_number: DEV_SERIAL.into(),
            edition: "vm".into(),
            tryout: RawTryout::default(),
            license_file: None,
            vendor_public_key: None,
            over_capacity_grace_days: 14,
            grace_days: 30,
            lapse_action: "deny_new".into(),
            licensing_server: RawLicensingServer::default(),
            reconcile: RawReconcile::default(),
            initialization: RawInitialization::default(),
            drain_timeout_ms: 10_000,
            log: RawLog::default(),
            mirror: RawMirror::default(),
            clock: RawClock::default(),
            state_dir: None,
            tls: RawTls::default(),
            otlp_endpoint: None,
            limits: RawLimits::default(),
            auth: RawAuth::default(),
            audit: RawAudit::default(),
            development_installation: false,
            trace: RawTrace::default(),
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

pub use crate::domain::LapseAction;

pub use crate::journal::LogFormat;

pub use crate::store::redis_conn::{RedisConfig, RedisOptions, RedisTarget, WaitPolicy};

/// The validated configuration: values only. The files it names (callers file,
/// Redis password and CA, TLS material, license file) are read by `app`.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen_addr: SocketAddr,
    pub metrics_addr: Option<SocketAddr>,
    /// `None`: the embedded in-memory store.
    pub redis: Option<RedisOptions>,
    pub serial_number: SerialNumber,
    pub edition: Edition,
    pub tryout: TryoutPolicy,
    pub vendor_public_key: Option<VerifyingKey>,
    pub over_capacity_grace: chrono::Duration,
    pub drain_timeout: Duration,
    pub log_format: LogFormat,
    pub log_level: String,
    /// Which spans are exported (independent of `log_level`).
    pub trace_level: String,
    /// Parent-based sampling ratio of new traces.
    pub trace_sampling_ratio: f64,
    pub mirror: MirrorConfig,
    /// `clock.max_skew_ms`: how far this node's clock may differ from the
    /// reference time and still count.
    pub clock_max_skew_ms: i64,
    /// The directory of the state file (`state_dir`); `None`: none kept.
    pub state_dir: Option<PathBuf>,
    /// Certificate, key and client CA (PEM) for serving gRPC over TLS.
    pub tls: Option<TlsFiles>,
    pub auth: AuthOptions,
    pub audit: AuditRetention,
    /// A development installation: trusts a vendor key other than the built-in one.
    pub development_installation: bool,
    pub otlp_endpoint: Option<String>,
    /// Where entitlements come from.
    pub license_source: LicenseSource,
    /// How long the last good entitlements hold while the source is unreachable.
    pub grace: chrono::Duration,
    pub lapse_action: LapseAction,
    pub reconcile_interval: Duration,
    pub reconcile_jitter_percent: u32,
    pub code_ttl: chrono::Duration,
    /// Whether the serial number is the development placeholder.
    pub serial_is_placeholder: bool,
    /// Request limits and load protection.
    pub limits: crate::limits::Limits,
}

/// A configuration that cannot be used, naming the key at fault.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{0}")]
    Load(#[from] Box<figment::Error>),
    #[error("invalid configuration key `{key}`: {message}")]
    Invalid { key: &'static str, message: String },
}

/// The error of `key`, for the checks here and for `app`'s reading of the files.
pub fn invalid(key: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key,
        message: message.into(),
    }
}

/// `Ok(value)` when `value` is in `range`, else the error of `key`.
fn within<T: PartialOrd + std::fmt::Display + Copy>(
    key: &'static str,
    value: T,
    range: std::ops::RangeInclusive<T>,
) -> Result<T, ConfigError> {
    if range.contains(&value) {
        Ok(value)
    } else {
        Err(invalid(
            key,
            format!("must be {} to {}", range.start(), range.end()),
        ))
    }
}

impl Config {
    /// What logs and traces are written with.
    pub fn telemetry(&self) -> crate::telemetry::Options {
        crate::telemetry::Options {
            log_format: self.log_format,
            log_level: self.log_level.clone(),
            trace_level: self.trace_level.clone(),
            trace_sampling_ratio: self.trace_sampling_ratio,
            otlp_endpoint: self.otlp_endpoint.clone(),
        }
    }
}

impl RawConfig {
    /// The layered sources. `file` comes from `--config` or `LICENSING_CONFIG`.
    pub fn figment(file: Option<&Path>) -> Figment {
        let mut figment = Figment::from(Serialized::defaults(RawConfig::default()));
        if let Some(file) = file {
            figment = figment.merge(Toml::file_exact(file));
        }
        figment.merge(
            Env::prefixed("LICENSING_")
                .filter(|key| !is_service_link(key.as_str()))
                .split("__")
                .ignore(&["config"]),
        )
    }

    pub fn load(file: Option<&Path>) -> Result<Self, ConfigError> {
        Self::figment(file)
            .extract()
            .map_err(|e| ConfigError::Load(Box::new(e)))
    }

    /// The configuration as TOML with secrets redacted (`config` subcommand).
    pub fn redacted_toml(&self) -> String {
        let mut copy = self.clone();
        copy.redis_url = copy
            .redis_url
            .as_deref()
            .map(crate::store::redis::redact_url);
        if copy.redis_password.is_some() {
            copy.redis_password = Some("***".into());
        }
        toml_string(&copy)
    }

    pub fn validate(&self) -> Result<Config, ConfigError> {
        self.validate_with_anchor(EMBEDDED_VENDOR_PUBLIC_KEY)
    }

    /// Validates against a given built-in vendor key (the trust anchor). Checks
    /// values only: no file is read here.
    pub fn validate_with_anchor(&self, anchor: Option<&str>) -> Result<Config, ConfigError> {
        let (listen_addr, metrics_addr) = self.addresses()?;
        let redis = self.redis()?;
        let serial_number = SerialNumber::parse(&self.serial_number)
            .map_err(|e| invalid("serial_number", e.message))?;
        let edition: Edition = self
            .edition
            .parse()
            .map_err(|e: crate::domain::InvalidInput| invalid("edition", e.message))?;
        let tryout = self.tryout.validate()?;
        let vendor_public_key = self.vendor_public_key(anchor)?;
        let license_source = self.license_source()?;
        if license_source != LicenseSource::None && vendor_public_key.is_none() {
            return Err(invalid(
                "vendor_public_key",
                "is required with a license source (documents are verified with it)",
            ));
        }
        let grace_days = within("grace_days", self.grace_days, 1..=3650)?;
        let lapse_action = self.lapse_action()?;
        let (reconcile_interval, reconcile_jitter_percent) = self.reconcile.validate()?;
        let code_ttl = self.initialization.validate()?;
        let over_capacity_grace_days = within(
            "over_capacity_grace_days",
            self.over_capacity_grace_days,
            0..=365,
        )?;
        let drain_timeout_ms = within("drain_timeout_ms", self.drain_timeout_ms, 0..=600_000)?;
        let log_format = self.log.validate()?;
        self.trace.validate()?;
        let mirror = self.mirror.validate()?;
        let clock_max_skew_ms = self.clock.validate()?;
        let tls = self.tls.validate()?;
        let limits = self.limits.validate()?;
        let auth = self.auth.validate()?;
        let audit = self.audit.validate()?;
        Ok(Config {
            auth,
            audit,
            development_installation: self.development_installation,
            limits,
            listen_addr,
            metrics_addr,
            redis,
            serial_is_placeholder: serial_number.as_str() == DEV_SERIAL,
            serial_number,
            edition,
            tryout,
            vendor_public_key,
            over_capacity_grace: chrono::Duration::days(i64::from(over_capacity_grace_days)),
            drain_timeout: Duration::from_millis(drain_timeout_ms),
            log_format,
            log_level: self.log.level.clone(),
            trace_level: self.trace.level.clone(),
            trace_sampling_ratio: self.trace.sampling_ratio,
            mirror,
            clock_max_skew_ms,
            // Whether it is a directory is `app`'s to find out (it creates it).
            state_dir: self.state_dir.clone().filter(|d| !d.as_os_str().is_empty()),
            tls,
            license_source,
            grace: chrono::Duration::days(i64::from(grace_days)),
            lapse_action,
            reconcile_interval,
            reconcile_jitter_percent,
            code_ttl,
            otlp_endpoint: self.otlp_endpoint(),
        })
    }

    /// `listen_addr` and `metrics_addr` (empty: no metrics endpoint).
    fn addresses(&self) -> Result<(SocketAddr, Option<SocketAddr>), ConfigError> {
        let listen_addr = self
            .listen_addr
            .parse()
            .map_err(|e| invalid("listen_addr", format!("{:?}: {e}", self.listen_addr)))?;
        if self.metrics_addr.is_empty() {
            return Ok((listen_addr, None));
        }
        let metrics_addr = self
            .metrics_addr
            .parse()
            .map_err(|e| invalid("metrics_addr", format!("{:?}: {e}", self.metrics_addr)))?;
        Ok((listen_addr, Some(metrics_addr)))
    }

    /// `vendor_public_key`, checked against the key built into the binary.
    fn vendor_public_key(&self, anchor: Option<&str>) -> Result<Option<VerifyingKey>, ConfigError> {
        let configured_key = self
            .vendor_public_key
            .as_deref()
            .filter(|k| !k.is_empty())
            .map(parse_public_key)
            .transpose()
            .map_err(|m| invalid("vendor_public_key", m))?;
        let Some(anchor) = anchor.filter(|a| !a.is_empty()) else {
            return Ok(configured_key);
        };
        let anchor = parse_public_key(anchor).map_err(|m| {
            invalid(
                "vendor_public_key",
                format!("the built-in key is unusable: {m}"),
            )
        })?;
        match configured_key {
            Some(key) if key != anchor && !self.development_installation => Err(invalid(
                "vendor_public_key",
                "differs from the vendor key built into this binary; remove it, or set development_installation = true for a development installation",
            )),
            Some(key) => Ok(Some(key)),
            None => Ok(Some(anchor)),
        }
    }

    /// `licensing_server.*` or `license_file` (not both).
    fn license_source(&self) -> Result<LicenseSource, ConfigError> {
        match (&self.licensing_server.url, &self.license_file) {
            (Some(_), Some(_)) => Err(invalid(
                "licensing_server.url",
                "set either licensing_server.url or license_file, not both",
            )),
            (Some(url), None) => self
                .licensing_server
                .validate(url, self.development_installation),
            (None, Some(path)) => Ok(LicenseSource::File(path.clone())),
            (None, None) => Ok(LicenseSource::None),
        }
    }

    fn lapse_action(&self) -> Result<LapseAction, ConfigError> {
        match self.lapse_action.as_str() {
            "deny_new" => Ok(LapseAction::DenyNew),
            "reset" => Ok(LapseAction::Reset),
            other => Err(invalid(
                "lapse_action",
                format!("{other:?} is not deny_new or reset"),
            )),
        }
    }

    /// `otlp_endpoint`, else the standard `OTEL_EXPORTER_OTLP_ENDPOINT`.
    fn otlp_endpoint(&self) -> Option<String> {
        self.otlp_endpoint
            .clone()
            .filter(|e| !e.is_empty())
            .or_else(|| {
                std::env::var("OTEL_EXPORTER_OTLP_ENDPOINT")
                    .ok()
                    .filter(|e| !e.is_empty())
            })
    }

    /// The `redis_*` keys; `None` without a `redis_url` (the in-memory store).
    /// The password and CA files are named, not read.
    fn redis(&self) -> Result<Option<RedisOptions>, ConfigError> {
        within("redis_timeout_ms", self.redis_timeout_ms, 1..=60_000)?;
        let Some(url) = self.redis_url.as_deref().filter(|u| !u.is_empty()) else {
            return Ok(None);
        };
        let (scheme, rest) = url.split_once("://").unwrap_or(("", url));
        let (url_user, url_password, location) = redis_url_credentials(rest)?;
        let target = redis_target(scheme, location)?;
        // The keys win over the URL's credentials.
        let (password, password_file) = match (&self.redis_password, &self.redis_password_file) {
            (Some(_), Some(_)) => {
                return Err(invalid(
                    "redis_password_file",
                    "set either redis_password or redis_password_file, not both",
                ));
            }
            (Some(p), None) => (Some(p.clone()), None),
            (None, Some(path)) => (None, Some(path.clone())),
            (None, None) => (url_password, None),
        };
        let username = self
            .redis_username
            .clone()
            .filter(|u| !u.is_empty())
            .or(url_user);
        if username.is_some() && password.is_none() && password_file.is_none() {
            return Err(invalid(
                "redis_password",
                "an ACL user (redis_username or the URL's user) needs a password: set redis_password or redis_password_file",
            ));
        }
        if self.redis_tls_ca_file.is_some() && scheme != "rediss" {
            return Err(invalid(
                "redis_tls_ca_file",
                "is only used with a rediss:// redis_url",
            ));
        }
        within("redis_wait_replicas", self.redis_wait_replicas, 0..=100)?;
        within(
            "redis_wait_timeout_ms",
            self.redis_wait_timeout_ms,
            1..=60_000,
        )?;
        Ok(Some(RedisOptions {
            connection: RedisConfig {
                url: url.to_owned(),
                target,
                username,
                password,
                tls_ca: None,
                timeout: Duration::from_millis(self.redis_timeout_ms),
                wait: (self.redis_wait_replicas > 0).then(|| WaitPolicy {
                    replicas: self.redis_wait_replicas,
                    timeout: Duration::from_millis(self.redis_wait_timeout_ms),
                }),
            },
            password_file,
            tls_ca_file: self.redis_tls_ca_file.clone(),
        }))
    }
}

/// The user and password in a Redis URL (after `scheme://`), decoded, and the
/// rest of it.
#[allow(clippy::type_complexity)]
fn redis_url_credentials(
    rest: &str,
) -> Result<(Option<String>, Option<String>, &str), ConfigError> {
    let Some((auth, location)) = rest.rsplit_once('@') else {
        return Ok((None, None, rest));
    };
    let (user, password) = match auth.split_once(':') {
        Some((u, p)) => (u, Some(p)),
        None => (auth, None),
    };
    let decode = |s: &str| {
        percent_encoding::percent_decode_str(s)
            .decode_utf8()
            .map(|s| s.into_owned())
            .map_err(|_| invalid("redis_url", "credentials are not UTF-8"))
    };
    Ok((
        Some(decode(user)?).filter(|u| !u.is_empty()),
        password.map(decode).transpose()?,
        location,
    ))
}

/// Where Redis is: one server, or the sentinels of a master.
fn redis_target(scheme: &str, location: &str) -> Result<RedisTarget, ConfigError> {
    match scheme {
        "redis" | "rediss" | "redis+unix" | "unix" => Ok(RedisTarget::Direct {
            url: format!("{scheme}://{location}"),
        }),
        "redis+sentinel" => {
            let (hosts, master_name) = location.split_once('/').unwrap_or((location, ""));
            let master_name = master_name.trim_end_matches('/');
            if master_name.is_empty() || master_name.contains(['/', '?', '#']) {
                return Err(invalid(
                    "redis_url",
                    "a redis+sentinel:// URL ends with /MASTER_NAME",
                ));
            }
            let sentinels = hosts
                .split(',')
                .map(sentinel_address)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|m| invalid("redis_url", m))?;
            Ok(RedisTarget::Sentinel {
                sentinels,
                master_name: master_name.to_owned(),
            })
        }
        _ => Err(invalid(
            "redis_url",
            "must start with redis://, rediss://, unix:// or redis+sentinel://",
        )),
    }
}

impl RawTryout {
    fn validate(&self) -> Result<TryoutPolicy, ConfigError> {
        Ok(TryoutPolicy {
            days: within("tryout.days", self.days, 1..=365)?,
            seats: within("tryout.seats", self.seats, 1..=1000)?,
        })
    }
}

impl RawLicensingServer {
    /// The server at `url` (set); plain `http://` only in a development installation.
    fn validate(&self, url: &str, development: bool) -> Result<LicenseSource, ConfigError> {
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
    fn validate(&self) -> Result<(Duration, u32), ConfigError> {
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
    fn validate(&self) -> Result<chrono::Duration, ConfigError> {
        let minutes = within(
            "initialization.code_ttl_minutes",
            self.code_ttl_minutes,
            1..=30 * 24 * 60,
        )?;
        Ok(chrono::Duration::minutes(i64::from(minutes)))
    }
}

impl RawLog {
    fn validate(&self) -> Result<LogFormat, ConfigError> {
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
    fn validate(&self) -> Result<(), ConfigError> {
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
    fn validate(&self) -> Result<MirrorConfig, ConfigError> {
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
    fn validate(&self) -> Result<i64, ConfigError> {
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
    fn validate(&self) -> Result<Option<TlsFiles>, ConfigError> {
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
    fn validate(&self) -> Result<AuthOptions, ConfigError> {
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
    fn validate(&self) -> Result<AuditRetention, ConfigError> {
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

/// The top-level keys of the configuration (a service-link-shaped name that is one
/// of them stays a setting).
fn known_keys() -> &'static [String] {
    static KEYS: std::sync::OnceLock<Vec<String>> = std::sync::OnceLock::new();
    KEYS.get_or_init(|| match serde_json::to_value(RawConfig::default()) {
        Ok(serde_json::Value::Object(map)) => map.keys().cloned().collect(),
        _ => Vec::new(),
    })
}

/// Whether `key` (a `LICENSING_` variable without its prefix, any case) is not a
/// setting but one of the variables Kubernetes injects for a Service whose name
/// starts with `licensing` (service links): `<SVC>_SERVICE_HOST`,
/// `<SVC>_SERVICE_PORT[_<PORT-NAME>]`, `<SVC>_PORT` and
/// `<SVC>_PORT_<n>_<PROTO>[_PROTO|_PORT|_ADDR]`.
pub fn is_service_link(key: &str) -> bool {
    let key = key.to_ascii_lowercase();
    if key.contains("__") || known_keys().contains(&key) {
        return false;
    }
    // `<SVC>` may be empty: a Service named just `licensing` gives
    // LICENSING_SERVICE_HOST, LICENSING_PORT, ...
    let svc_ok = |svc: &str| svc.is_empty() || !svc.starts_with('_') && !svc.ends_with('_');
    if let Some(svc) = key.strip_suffix("service_host") {
        return svc.is_empty() || svc.strip_suffix('_').is_some_and(svc_ok);
    }
    if let Some((svc, rest)) = key.split_once("service_port")
        && (svc.is_empty() || svc.strip_suffix('_').is_some_and(svc_ok))
    {
        return rest.is_empty() || rest.len() > 1 && rest.starts_with('_');
    }
    if let Some(svc) = key.strip_suffix("port")
        && (svc.is_empty() || svc.strip_suffix('_').is_some_and(svc_ok))
    {
        return true;
    }
    // <SVC>_PORT_<n>_<PROTO>[_<FIELD>]
    let parts: Vec<&str> = key.split('_').collect();
    parts.iter().enumerate().any(|(i, part)| {
        *part == "port"
            && parts
                .get(i + 1)
                .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
            && parts
                .get(i + 2)
                .is_some_and(|p| matches!(*p, "tcp" | "udp" | "sctp"))
            && match parts.len() - i {
                3 => true,
                4 => matches!(parts[i + 3], "proto" | "port" | "addr"),
                _ => false,
            }
    })
}

/// The `LICENSING_*` variables of this process that are ignored as service links.
pub fn ignored_service_links() -> Vec<String> {
    std::env::vars_os()
        .filter_map(|(k, _)| k.into_string().ok())
        .filter(|k| k.strip_prefix("LICENSING_").is_some_and(is_service_link))
        .collect()
}

/// `host[:port]` (or `[v6]:port`) of a sentinel; port 26379 when omitted.
fn sentinel_address(raw: &str) -> Result<(String, u16), String> {
    let bad = || format!("sentinel {raw:?} is not host:port");
    let (host, port) = match raw.strip_prefix('[') {
        Some(rest) => {
            let (host, after) = rest.split_once(']').ok_or_else(bad)?;
            (host, after.strip_prefix(':'))
        }
        None => match raw.split_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (raw, None),
        },
    };
    let port = match port {
        Some(p) => p.parse::<u16>().map_err(|_| bad())?,
        None => 26379,
    };
    if host.is_empty() || port == 0 {
        return Err(bad());
    }
    Ok((host.to_owned(), port))
}

fn toml_string(raw: &RawConfig) -> String {
    toml::to_string_pretty(raw).expect("config serializes as TOML")
}

#[cfg(test)]
// figment::Jail's closures return figment's (large) error type.
#[allow(clippy::result_large_err)]
mod tests {
    use super::*;
    use crate::domain::license::encode_public_key;
    use ed25519_dalek::SigningKey;
    use figment::Jail;

    type Mutation = Box<dyn Fn(&mut RawConfig)>;

    #[test]
    fn defaults_validate() {
        let c = RawConfig::default().validate().unwrap();
        assert_eq!(c.listen_addr.port(), 50051);
        assert!(c.redis.is_none());
        assert!(c.serial_is_placeholder);
        assert_eq!(c.tryout, TryoutPolicy { days: 14, seats: 3 });
        assert_eq!(c.edition, Edition::Vm);
    }

    #[test]
    fn env_overrides_file_overrides_defaults() {
        Jail::expect_with(|jail| {
            jail.create_file(
                "licensing.toml",
                "serial_number = \"FILE-1\"\nedition = \"business\"\n[tryout]\ndays = 10\n",
            )?;
            jail.set_env("LICENSING_TRYOUT__DAYS", "7");
            jail.set_env("LICENSING_REDIS_URL", "redis://127.0.0.1:6379");
            jail.set_env("LICENSING_CONFIG", "licensing.toml");
            let raw = RawConfig::load(Some(Path::new("licensing.toml"))).unwrap();
            let c = raw.validate().unwrap();
            assert_eq!(c.serial_number.as_str(), "FILE-1");
            assert_eq!(c.edition, Edition::Business);
            assert_eq!(c.tryout.days, 7);
            assert_eq!(
                c.redis.unwrap().connection.timeout,
                Duration::from_millis(250)
            );
            Ok(())
        });
    }

    #[test]
    fn unknown_keys_are_rejected() {
        Jail::expect_with(|jail| {
            jail.create_file("c.toml", "serial_numbr = \"x\"\n")?;
            let err = RawConfig::load(Some(Path::new("c.toml"))).unwrap_err();
            assert!(err.to_string().contains("serial_numbr"), "{err}");
            jail.clear_env();
            jail.set_env("LICENSING_TRYOUT__WEEKS", "2");
            let err = RawConfig::load(None).unwrap_err();
            assert!(err.to_string().contains("weeks"), "{err}");
            Ok(())
        });
    }

    #[test]
    fn invalid_values_name_their_key() {
        let cases: Vec<(Mutation, &str)> = vec![
            (
                Box::new(|c| c.listen_addr = "nowhere".into()),
                "listen_addr",
            ),
            (Box::new(|c| c.redis_timeout_ms = 0), "redis_timeout_ms"),
            (Box::new(|c| c.clock.max_skew_ms = 999), "clock.max_skew_ms"),
            (
                Box::new(|c| c.clock.max_skew_ms = MAX_CLOCK_SKEW_MS + 1),
                "clock.max_skew_ms",
            ),
            (
                Box::new(|c| c.redis_url = Some("http://x".into())),
                "redis_url",
            ),
            (
                Box::new(|c| c.redis_url = Some("redis+sentinel://s1:26379".into())),
                "redis_url",
            ),
            (
                Box::new(|c| c.redis_url = Some("redis+sentinel://s1:port/m".into())),
                "redis_url",
            ),
            (
                Box::new(|c| {
                    c.redis_url = Some("redis://r:6379".into());
                    c.redis_password = Some("a".into());
                    c.redis_password_file = Some("p".into());
                }),
                "redis_password_file",
            ),
            (
                Box::new(|c| {
                    c.redis_url = Some("redis://r:6379".into());
                    c.redis_username = Some("licensing".into());
                }),
                "redis_password",
            ),
            (
                Box::new(|c| {
                    c.redis_url = Some("redis://r:6379".into());
                    c.redis_tls_ca_file = Some("ca.pem".into());
                }),
                "redis_tls_ca_file",
            ),
            (
                Box::new(|c| {
                    c.redis_url = Some("redis://r:6379".into());
                    c.redis_wait_replicas = 101;
                }),
                "redis_wait_replicas",
            ),
            (
                Box::new(|c| {
                    c.redis_url = Some("redis://r:6379".into());
                    c.redis_wait_timeout_ms = 0;
                }),
                "redis_wait_timeout_ms",
            ),
            (
                Box::new(|c| c.serial_number = "a b".into()),
                "serial_number",
            ),
            (Box::new(|c| c.edition = "pro".into()), "edition"),
            (Box::new(|c| c.tryout.days = 0), "tryout.days"),
            (Box::new(|c| c.tryout.seats = 0), "tryout.seats"),
            (
                Box::new(|c| c.vendor_public_key = Some("AAAA".into())),
                "vendor_public_key",
            ),
            (
                Box::new(|c| c.license_file = Some("l.json".into())),
                "vendor_public_key",
            ),
            (Box::new(|c| c.log.format = "xml".into()), "log.format"),
            (Box::new(|c| c.log.level = "loud=,=".into()), "log.level"),
            (
                Box::new(|c| c.trace.level = "loud=,=".into()),
                "trace.level",
            ),
            (
                Box::new(|c| c.trace.sampling_ratio = 1.5),
                "trace.sampling_ratio",
            ),
            (
                Box::new(|c| c.tls.cert_file = Some("c.pem".into())),
                "tls.key_file",
            ),
            (Box::new(|c| c.grace_days = 0), "grace_days"),
            (
                Box::new(|c| c.lapse_action = "panic".into()),
                "lapse_action",
            ),
            (
                Box::new(|c| c.reconcile.interval_secs = 0),
                "reconcile.interval_secs",
            ),
            (
                Box::new(|c| c.reconcile.jitter_percent = 90),
                "reconcile.jitter_percent",
            ),
            (
                Box::new(|c| c.initialization.code_ttl_minutes = 0),
                "initialization.code_ttl_minutes",
            ),
            (
                Box::new(|c| c.licensing_server.url = Some("ftp://x".into())),
                "licensing_server.url",
            ),
            (
                Box::new(|c| {
                    c.licensing_server.url = Some("https://cic.example".into());
                    c.license_file = Some("l.json".into());
                }),
                "licensing_server.url",
            ),
            (
                Box::new(|c| c.licensing_server.url = Some("https://cic.example".into())),
                "vendor_public_key",
            ),
            (
                Box::new(|c| c.limits.max_message_bytes = 100),
                "limits.max_message_bytes",
            ),
            (
                Box::new(|c| c.limits.rpc_deadline_ms = 0),
                "limits.rpc_deadline_ms",
            ),
            (
                Box::new(|c| c.limits.keepalive_interval_ms = 10),
                "limits.keepalive_interval_ms",
            ),
            (
                Box::new(|c| c.limits.keepalive_timeout_ms = 0),
                "limits.keepalive_timeout_ms",
            ),
            (
                Box::new(|c| c.limits.max_connection_age_ms = 0),
                "limits.max_connection_age_ms",
            ),
            (
                Box::new(|c| c.limits.max_connection_age_grace_ms = u64::MAX),
                "limits.max_connection_age_grace_ms",
            ),
            (
                Box::new(|c| c.limits.concurrent_hot_path = 0),
                "limits.concurrent_hot_path",
            ),
            (
                Box::new(|c| c.limits.concurrent_writes = 0),
                "limits.concurrent_writes",
            ),
            (
                Box::new(|c| c.limits.concurrent_operator_reads = 0),
                "limits.concurrent_operator_reads",
            ),
            (
                Box::new(|c| c.limits.watch_subscribers_per_caller = 0),
                "limits.watch_subscribers_per_caller",
            ),
            (
                Box::new(|c| c.limits.activation_per_minute = 0),
                "limits.activation_per_minute",
            ),
            (
                Box::new(|c| c.limits.caller_share_percent = 101),
                "limits.caller_share_percent",
            ),
            (
                Box::new(|c| c.limits.request_body_timeout_ms = 0),
                "limits.request_body_timeout_ms",
            ),
            (
                Box::new(|c| c.limits.max_streams_per_connection = 0),
                "limits.max_streams_per_connection",
            ),
            (
                Box::new(|c| c.limits.handshake_timeout_ms = 60_001),
                "limits.handshake_timeout_ms",
            ),
            (
                Box::new(|c| c.limits.max_connections = 0),
                "limits.max_connections",
            ),
            (
                Box::new(|c| c.limits.max_connections_per_peer = 0),
                "limits.max_connections_per_peer",
            ),
            (
                Box::new(|c| c.limits.health_watches = 0),
                "limits.health_watches",
            ),
            (
                Box::new(|c| c.limits.health_watches_per_peer = 0),
                "limits.health_watches_per_peer",
            ),
            (
                Box::new(|c| c.limits.activation_burst = 0),
                "limits.activation_burst",
            ),
            (Box::new(|c| c.auth.mode = "open".into()), "auth.mode"),
            (
                Box::new(|c| c.auth.reload_interval_ms = 0),
                "auth.reload_interval_ms",
            ),
            (Box::new(|c| c.audit.max_entries = 0), "audit.max_entries"),
            (Box::new(|c| c.audit.max_refusals = 0), "audit.max_refusals"),
            (Box::new(|c| c.audit.max_age_days = 0), "audit.max_age_days"),
            (
                Box::new(|c| c.tls.client_ca_file = Some("ca.pem".into())),
                "tls.client_ca_file",
            ),
        ];
        for (mutate, key) in cases {
            let mut raw = RawConfig::default();
            mutate(&mut raw);
            match raw.validate() {
                Err(ConfigError::Invalid { key: k, .. }) => assert_eq!(k, key),
                other => panic!("expected an error for {key}, got {other:?}"),
            }
        }
    }

    #[test]
    fn auth_and_audit_keys_come_from_file_and_environment() {
        Jail::expect_with(|jail| {
            jail.create_file(
                "callers.toml",
                "[[caller]]\nname = \"pbx\"\nrole = \"call_handling\"\ncertificate = \"spiffe://pbx\"\n",
            )?;
            jail.create_file(
                "c.toml",
                "[auth]\nmode = \"enforce\"\ncallers_file = \"callers.toml\"\n[audit]\nmax_entries = 50\n",
            )?;
            jail.set_env("LICENSING_AUDIT__MAX_AGE_DAYS", "7");
            let c = RawConfig::load(Some(Path::new("c.toml")))
                .unwrap()
                .validate()
                .unwrap();
            assert_eq!(c.auth.mode, AuthMode::Enforce);
            assert_eq!(c.audit.max_entries, 50);
            assert_eq!(c.audit.max_age, chrono::Duration::days(7));
            assert_eq!(
                c.auth.callers_file.as_deref(),
                Some(Path::new("callers.toml"))
            );
            Ok(())
        });
        let defaults = RawConfig::default().validate().unwrap();
        assert_eq!(defaults.auth.mode, AuthMode::Protected);
        assert_eq!(defaults.audit, AuditRetention::default());
    }

    #[test]
    fn a_built_in_vendor_key_refuses_another_unless_development() {
        let built_in = encode_public_key(&SigningKey::from_bytes(&[1; 32]).verifying_key());
        let other = encode_public_key(&SigningKey::from_bytes(&[2; 32]).verifying_key());
        let anchor = parse_public_key(&built_in).unwrap();
        // Nothing configured: the built-in key is used.
        let c = RawConfig::default()
            .validate_with_anchor(Some(&built_in))
            .unwrap();
        assert_eq!(c.vendor_public_key, Some(anchor));
        // The same key configured: fine.
        let same = RawConfig {
            vendor_public_key: Some(built_in.clone()),
            ..RawConfig::default()
        };
        assert!(same.validate_with_anchor(Some(&built_in)).is_ok());
        // Another key: refused, naming the key.
        let mut raw = RawConfig {
            vendor_public_key: Some(other.clone()),
            ..RawConfig::default()
        };
        match raw.validate_with_anchor(Some(&built_in)) {
            Err(ConfigError::Invalid { key, .. }) => assert_eq!(key, "vendor_public_key"),
            other => panic!("another vendor key must be refused, got {other:?}"),
        }
        // ... unless the installation says it is a development one.
        raw.development_installation = true;
        let c = raw.validate_with_anchor(Some(&built_in)).unwrap();
        assert!(c.development_installation);
        assert_eq!(c.vendor_public_key, Some(parse_public_key(&other).unwrap()));
        // Without a built-in key any configured key is trusted, as before.
        raw.development_installation = false;
        assert!(raw.validate_with_anchor(None).is_ok());
    }

    #[test]
    fn a_plain_http_licensing_server_needs_a_development_installation() {
        let key = encode_public_key(&SigningKey::from_bytes(&[1; 32]).verifying_key());
        let mut raw = RawConfig {
            vendor_public_key: Some(key),
            licensing_server: RawLicensingServer {
                url: Some("http://127.0.0.1:7443".into()),
                ..RawLicensingServer::default()
            },
            ..RawConfig::default()
        };
        match raw.validate_with_anchor(None) {
            Err(ConfigError::Invalid { key, message }) => {
                assert_eq!(key, "licensing_server.url");
                assert!(message.contains("https://"), "{message}");
                assert!(message.contains("development_installation"), "{message}");
            }
            other => panic!("http:// must be refused, got {other:?}"),
        }
        raw.development_installation = true;
        assert!(raw.validate_with_anchor(None).is_ok());
        raw.development_installation = false;
        raw.licensing_server.url = Some("https://cic.example".into());
        assert!(raw.validate_with_anchor(None).is_ok());
    }

    #[test]
    fn service_links_are_ignored_other_unknown_variables_are_not() {
        // What Kubernetes injects for a Service `licensing-comtrexx-licensing` with
        // ports grpc 50051 and metrics 9090.
        let links = [
            "LICENSING_COMTREXX_LICENSING_SERVICE_HOST",
            "LICENSING_COMTREXX_LICENSING_SERVICE_PORT",
            "LICENSING_COMTREXX_LICENSING_SERVICE_PORT_GRPC",
            "LICENSING_COMTREXX_LICENSING_SERVICE_PORT_METRICS",
            "LICENSING_COMTREXX_LICENSING_PORT",
            "LICENSING_COMTREXX_LICENSING_PORT_50051_TCP",
            "LICENSING_COMTREXX_LICENSING_PORT_50051_TCP_PROTO",
            "LICENSING_COMTREXX_LICENSING_PORT_50051_TCP_PORT",
            "LICENSING_COMTREXX_LICENSING_PORT_50051_TCP_ADDR",
            "LICENSING_COMTREXX_LICENSING_PORT_9090_TCP_ADDR",
            "LICENSING_SIM_PORT_8443_UDP",
            // A Service named just `licensing`.
            "LICENSING_SERVICE_HOST",
            "LICENSING_SERVICE_PORT",
            "LICENSING_PORT",
            "LICENSING_PORT_50051_TCP_ADDR",
        ];
        for var in links {
            assert!(is_service_link(&var["LICENSING_".len()..]), "{var}");
        }
        for key in [
            "listen_addr",
            "metrics_addr",
            "serial_numbr",
            "transport",
            "x_service_hosts",
            "x_port_http_tcp",
            "x_port_1_tcp_extra",
            "tryout__port",
        ] {
            assert!(!is_service_link(key), "{key}");
        }
        Jail::expect_with(|jail| {
            jail.clear_env();
            for var in links {
                jail.set_env(var, "10.0.0.1");
            }
            jail.set_env("LICENSING_SERIAL_NUMBER", "K8S-1");
            let raw = RawConfig::load(None).unwrap();
            assert_eq!(raw.serial_number, "K8S-1");
            assert_eq!(ignored_service_links().len(), links.len());
            // Any other unknown variable still fails, naming itself.
            jail.set_env("LICENSING_SERIAL_NUMBR", "x");
            let err = RawConfig::load(None).unwrap_err();
            assert!(err.to_string().contains("serial_numbr"), "{err}");
            Ok(())
        });
    }

    #[test]
    fn wrong_types_name_their_key() {
        Jail::expect_with(|jail| {
            jail.set_env("LICENSING_TRYOUT__DAYS", "fourteen");
            let err = RawConfig::load(None).unwrap_err();
            assert!(
                err.to_string().to_lowercase().contains("tryout.days"),
                "{err}"
            );
            Ok(())
        });
    }

    #[test]
    fn redis_targets_credentials_and_file_names() {
        Jail::expect_with(|jail| {
            jail.set_env(
                "LICENSING_REDIS_URL",
                "redis+sentinel://app:url%40pw@s1:26380,s2,[::1]:26381/seats",
            );
            jail.set_env("LICENSING_REDIS_WAIT_REPLICAS", "1");
            let r = RawConfig::load(None)
                .unwrap()
                .validate()
                .unwrap()
                .redis
                .unwrap()
                .connection;
            assert_eq!(
                r.target,
                RedisTarget::Sentinel {
                    sentinels: vec![
                        ("s1".into(), 26380),
                        ("s2".into(), 26379),
                        ("::1".into(), 26381)
                    ],
                    master_name: "seats".into(),
                }
            );
            assert_eq!(
                (r.username.as_deref(), r.password.as_deref()),
                (Some("app"), Some("url@pw"))
            );
            assert_eq!(
                r.wait,
                Some(WaitPolicy {
                    replicas: 1,
                    timeout: Duration::from_millis(100)
                })
            );
            // The keys win over the URL; the files are named, not read.
            jail.set_env("LICENSING_REDIS_URL", "rediss://old:pw@r:6380/2");
            jail.set_env("LICENSING_REDIS_USERNAME", "licensing");
            jail.set_env("LICENSING_REDIS_PASSWORD_FILE", "password");
            jail.set_env("LICENSING_REDIS_TLS_CA_FILE", "ca.pem");
            let r = RawConfig::load(None)
                .unwrap()
                .validate()
                .unwrap()
                .redis
                .unwrap();
            assert_eq!(
                r.connection.target,
                RedisTarget::Direct {
                    url: "rediss://r:6380/2".into()
                }
            );
            assert_eq!(
                (r.connection.username.as_deref(), r.connection.password),
                (Some("licensing"), None)
            );
            assert_eq!(r.password_file.as_deref(), Some(Path::new("password")));
            assert_eq!(r.tls_ca_file.as_deref(), Some(Path::new("ca.pem")));
            assert!(r.connection.tls_ca.is_none());
            Ok(())
        });
    }

    /// The files a configuration names are not read (nor looked at) when it is
    /// validated: a configuration naming only missing files validates, and
    /// carries their paths (`app::ConfigFiles` reads them).
    #[test]
    fn validation_reads_no_file() {
        let raw = RawConfig {
            redis_url: Some("rediss://licensing@r:6380".into()),
            redis_password_file: Some("/nonexistent/password".into()),
            redis_tls_ca_file: Some("/nonexistent/ca.pem".into()),
            auth: RawAuth {
                callers_file: Some("/nonexistent/callers.toml".into()),
                ..RawAuth::default()
            },
            tls: RawTls {
                cert_file: Some("/nonexistent/tls.crt".into()),
                key_file: Some("/nonexistent/tls.key".into()),
                client_ca_file: Some("/nonexistent/clients.pem".into()),
                ..RawTls::default()
            },
            // A file, not a directory: also `app`'s to find out.
            state_dir: Some("Cargo.toml".into()),
            license_file: Some("/nonexistent/license.json".into()),
            vendor_public_key: Some(encode_public_key(
                &SigningKey::from_bytes(&[1; 32]).verifying_key(),
            )),
            ..RawConfig::default()
        };
        let c = raw.validate_with_anchor(None).unwrap();
        let redis = c.redis.unwrap();
        assert_eq!(
            redis.password_file.as_deref(),
            Some(Path::new("/nonexistent/password"))
        );
        assert_eq!(
            redis.tls_ca_file.as_deref(),
            Some(Path::new("/nonexistent/ca.pem"))
        );
        assert_eq!(
            c.auth.callers_file.as_deref(),
            Some(Path::new("/nonexistent/callers.toml"))
        );
        assert_eq!(c.tls.unwrap().cert_file, Path::new("/nonexistent/tls.crt"));
        assert_eq!(c.state_dir.as_deref(), Some(Path::new("Cargo.toml")));
        assert_eq!(
            c.license_source,
            LicenseSource::File("/nonexistent/license.json".into())
        );
    }

    #[test]
    fn secrets_are_redacted() {
        let raw = RawConfig {
            redis_url: Some("redis://:hunter2@redis:6379".into()),
            redis_password: Some("hunter3".into()),
            ..RawConfig::default()
        };
        let text = raw.redacted_toml();
        assert!(
            !text.contains("hunter2") && !text.contains("hunter3"),
            "{text}"
        );
        assert!(text.contains("[tryout]"), "{text}");
        let c = raw.validate().unwrap().redis.unwrap().connection;
        assert_eq!(c.password.as_deref(), Some("hunter3"));
        assert!(!format!("{c:?}").contains("hunter"), "{c:?}");
    }

    #[test]
    fn limits_come_from_file_and_env() {
        Jail::expect_with(|jail| {
            jail.create_file(
                "c.toml",
                "[limits]\nmax_message_bytes = 8192\nconcurrent_writes = 4\n",
            )?;
            jail.set_env("LICENSING_LIMITS__RPC_DEADLINE_MS", "1500");
            let c = RawConfig::load(Some(Path::new("c.toml")))
                .unwrap()
                .validate()
                .unwrap();
            assert_eq!(c.limits.max_message_bytes, 8192);
            assert_eq!(c.limits.budgets.writes, 4);
            assert_eq!(c.limits.rpc_deadline, Duration::from_millis(1500));
            assert_eq!(
                c.limits.budgets.hot_path,
                crate::limits::Limits::default().budgets.hot_path
            );
            jail.set_env("LICENSING_LIMITS__MAX_MESSAGE_BYTE", "1");
            assert!(RawConfig::load(None).is_err());
            Ok(())
        });
    }

    #[test]
    fn default_limits_validate_to_the_defaults() {
        assert_eq!(
            RawLimits::default().validate().unwrap(),
            crate::limits::Limits::default()
        );
    }
}
