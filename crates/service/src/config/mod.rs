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

use crate::auth::AuthOptions;
use crate::auth::tls::TlsFiles;
use crate::domain::audit::AuditRetention;
use crate::domain::license::parse_public_key;
use crate::domain::{Edition, SerialNumber, TryoutPolicy};
use crate::mirror::MirrorConfig;
use crate::upstream::LicenseSource;

mod explain;
mod redis;
mod sections;
mod service_links;

pub use sections::{
    DEFAULT_CONSISTENCY_MAX_WAIT_MS, DEFAULT_LEASE_DURATION_SECONDS, RawAudit, RawAuth, RawClock,
    RawConsistency, RawInitialization, RawLeases, RawLicensingServer, RawLimits, RawLog, RawMirror,
    RawReconcile, RawTls, RawTrace, RawTryout, RawWatch,
};
pub use service_links::{ignored_service_links, is_service_link};

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
    pub watch: RawWatch,
    pub consistency: RawConsistency,
    pub leases: RawLeases,
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
            watch: RawWatch::default(),
            consistency: RawConsistency::default(),
            leases: RawLeases::default(),
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
    /// `WatchSeats` streams (`watch.*`).
    pub watch: crate::grpc::WatchOptions,
    /// `consistency.max_wait_ms`: how long a read with `min_version` waits.
    pub consistency_max_wait: Duration,
    /// `leases.duration_seconds`: how long a lease holds unless renewed.
    pub lease_duration: Duration,
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
    /// The sources could not be read or do not fit the keys: the message names
    /// the key as written, and how to fix it.
    #[error("{0}")]
    Load(String),
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
        if let Some(file) = file {
            std::fs::File::open(file).map_err(|e| {
                ConfigError::Load(format!(
                    "cannot read --config {}: {}",
                    file.display(),
                    io_reason(&e)
                ))
            })?;
        }
        Self::figment(file)
            .extract()
            .map_err(|e| ConfigError::Load(explain::explain(e, file)))
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
        let serial_number = SerialNumber::parse(&self.serial_number).map_err(|e| {
            invalid(
                "serial_number",
                serial_problem(&self.serial_number, &e.message),
            )
        })?;
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
        let watch = self.watch.validate()?;
        let consistency_max_wait = self.consistency.validate()?;
        let lease_duration = self.leases.validate()?;
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
            watch,
            consistency_max_wait,
            lease_duration,
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
}

/// What is wrong with a serial number: the value, and the first character that
/// is not allowed (if that is the fault).
fn serial_problem(raw: &str, message: &str) -> String {
    let bad = raw
        .char_indices()
        .find(|(_, c)| !(c.is_ascii_alphanumeric() || *c == '-' || *c == '_'));
    match bad {
        Some((at, c)) if !raw.is_empty() && raw.len() <= 64 => format!(
            "{raw:?} {message}; {c:?} (at position {}) is not allowed",
            raw[..at].chars().count() + 1
        ),
        _ => format!("{raw:?} {message}"),
    }
}

/// An I/O error without its `(os error N)` suffix.
fn io_reason(error: &std::io::Error) -> String {
    let text = error.to_string();
    match text.find(" (os error") {
        Some(at) => text[..at].to_owned(),
        None => text,
    }
}

fn toml_string(raw: &RawConfig) -> String {
    toml::to_string_pretty(raw).expect("config serializes as TOML")
}

#[cfg(test)]
mod tests;
