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

use crate::domain::license::parse_public_key;
use crate::domain::{Edition, SerialNumber, TryoutPolicy};
use crate::mirror::MirrorConfig;

/// The placeholder serial number for local runs without configuration.
pub const DEV_SERIAL: &str = "DEV-0000000000";

/// The configuration as written, before validation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawConfig {
    pub listen_addr: String,
    /// Empty disables the Prometheus endpoint.
    pub metrics_addr: String,
    pub redis_url: Option<String>,
    pub redis_password: Option<String>,
    pub redis_timeout_ms: u64,
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
    pub tls: RawTls,
    pub otlp_endpoint: Option<String>,
    pub limits: RawLimits,
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

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawMirror {
    pub stale_after_ms: u64,
    pub resync_interval_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawLicensingServer {
    /// `https://host:port` (or `http://` for a local simulator); unset = none.
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
    /// Concurrent `CheckSeat` and `GetTryoutStatus` calls.
    pub concurrent_hot_path: u32,
    /// Concurrent writes (seats, tryout, activation, reconcile).
    pub concurrent_writes: u32,
    /// Concurrent operator reads (overview, seat lists).
    pub concurrent_operator_reads: u32,
    pub watch_subscribers_per_caller: u32,
    /// `CreateInitializationCode` / `ApplyActivation` calls per caller and minute.
    pub activation_per_minute: u32,
    pub activation_burst: u32,
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
        Ok(crate::limits::Limits {
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

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawTls {
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
}

impl Default for RawConfig {
    fn default() -> Self {
        Self {
            listen_addr: "0.0.0.0:50051".into(),
            metrics_addr: "0.0.0.0:9090".into(),
            redis_url: None,
            redis_password: None,
            redis_timeout_ms: 250,
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
            tls: RawTls::default(),
            otlp_endpoint: None,
            limits: RawLimits::default(),
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

/// The license source: the vendor's licensing server, a license file, or none.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LicenseSourceConfig {
    None,
    File(PathBuf),
    Server {
        url: String,
        ca_file: Option<PathBuf>,
        timeout: Duration,
    },
}

pub use crate::domain::LapseAction;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

/// Redis connection settings.
#[derive(Debug, Clone)]
pub struct RedisConfig {
    pub url: String,
    pub timeout: Duration,
}

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen_addr: SocketAddr,
    pub metrics_addr: Option<SocketAddr>,
    /// `None`: the embedded in-memory store.
    pub redis: Option<RedisConfig>,
    pub serial_number: SerialNumber,
    pub edition: Edition,
    pub tryout: TryoutPolicy,
    pub license_file: Option<PathBuf>,
    pub vendor_public_key: Option<VerifyingKey>,
    pub over_capacity_grace: chrono::Duration,
    pub drain_timeout: Duration,
    pub log_format: LogFormat,
    pub log_level: String,
    pub mirror: MirrorConfig,
    /// Certificate and key (PEM) for serving gRPC over TLS.
    pub tls: Option<(PathBuf, PathBuf)>,
    pub otlp_endpoint: Option<String>,
    /// Where entitlements come from.
    pub license_source: LicenseSourceConfig,
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

fn invalid(key: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key,
        message: message.into(),
    }
}

impl RawConfig {
    /// The layered sources. `file` comes from `--config` or `LICENSING_CONFIG`.
    pub fn figment(file: Option<&Path>) -> Figment {
        let mut figment = Figment::from(Serialized::defaults(RawConfig::default()));
        if let Some(file) = file {
            figment = figment.merge(Toml::file_exact(file));
        }
        figment.merge(Env::prefixed("LICENSING_").split("__").ignore(&["config"]))
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
        let listen_addr = self
            .listen_addr
            .parse()
            .map_err(|e| invalid("listen_addr", format!("{:?}: {e}", self.listen_addr)))?;
        let metrics_addr =
            if self.metrics_addr.is_empty() {
                None
            } else {
                Some(self.metrics_addr.parse().map_err(|e| {
                    invalid("metrics_addr", format!("{:?}: {e}", self.metrics_addr))
                })?)
            };
        if !(1..=60_000).contains(&self.redis_timeout_ms) {
            return Err(invalid("redis_timeout_ms", "must be 1 to 60000"));
        }
        let redis = match self.redis_url.as_deref().filter(|u| !u.is_empty()) {
            None => None,
            Some(url) => {
                if !(url.starts_with("redis://")
                    || url.starts_with("rediss://")
                    || url.starts_with("redis+unix://")
                    || url.starts_with("unix://"))
                {
                    return Err(invalid(
                        "redis_url",
                        "must start with redis://, rediss:// or unix://",
                    ));
                }
                let url = match &self.redis_password {
                    Some(password) => {
                        with_password(url, password).map_err(|m| invalid("redis_password", m))?
                    }
                    None => url.to_owned(),
                };
                Some(RedisConfig {
                    url,
                    timeout: Duration::from_millis(self.redis_timeout_ms),
                })
            }
        };
        let serial_number = SerialNumber::parse(&self.serial_number)
            .map_err(|e| invalid("serial_number", e.message))?;
        let edition: Edition = self
            .edition
            .parse()
            .map_err(|e: crate::domain::InvalidInput| invalid("edition", e.message))?;
        if !(1..=365).contains(&self.tryout.days) {
            return Err(invalid("tryout.days", "must be 1 to 365"));
        }
        if !(1..=1000).contains(&self.tryout.seats) {
            return Err(invalid("tryout.seats", "must be 1 to 1000"));
        }
        let vendor_public_key = self
            .vendor_public_key
            .as_deref()
            .filter(|k| !k.is_empty())
            .map(parse_public_key)
            .transpose()
            .map_err(|m| invalid("vendor_public_key", m))?;
        let license_source = match (&self.licensing_server.url, &self.license_file) {
            (Some(_), Some(_)) => {
                return Err(invalid(
                    "licensing_server.url",
                    "set either licensing_server.url or license_file, not both",
                ));
            }
            (Some(url), None) => {
                if !(url.starts_with("https://") || url.starts_with("http://")) {
                    return Err(invalid(
                        "licensing_server.url",
                        "must start with https:// (or http:// for a local simulator)",
                    ));
                }
                if !(100..=120_000).contains(&self.licensing_server.timeout_ms) {
                    return Err(invalid(
                        "licensing_server.timeout_ms",
                        "must be 100 to 120000",
                    ));
                }
                LicenseSourceConfig::Server {
                    url: url.clone(),
                    ca_file: self.licensing_server.ca_file.clone(),
                    timeout: Duration::from_millis(self.licensing_server.timeout_ms),
                }
            }
            (None, Some(path)) => LicenseSourceConfig::File(path.clone()),
            (None, None) => LicenseSourceConfig::None,
        };
        if license_source != LicenseSourceConfig::None && vendor_public_key.is_none() {
            return Err(invalid(
                "vendor_public_key",
                "is required with a license source (documents are verified with it)",
            ));
        }
        if !(1..=3650).contains(&self.grace_days) {
            return Err(invalid("grace_days", "must be 1 to 3650"));
        }
        let lapse_action = match self.lapse_action.as_str() {
            "deny_new" => LapseAction::DenyNew,
            "reset" => LapseAction::Reset,
            other => {
                return Err(invalid(
                    "lapse_action",
                    format!("{other:?} is not deny_new or reset"),
                ));
            }
        };
        if !(1..=30 * 86_400).contains(&self.reconcile.interval_secs) {
            return Err(invalid("reconcile.interval_secs", "must be 1 to 2592000"));
        }
        if self.reconcile.jitter_percent > 50 {
            return Err(invalid("reconcile.jitter_percent", "must be 0 to 50"));
        }
        if !(1..=30 * 24 * 60).contains(&self.initialization.code_ttl_minutes) {
            return Err(invalid(
                "initialization.code_ttl_minutes",
                "must be 1 to 43200",
            ));
        }
        if self.over_capacity_grace_days > 365 {
            return Err(invalid("over_capacity_grace_days", "must be 0 to 365"));
        }
        if !(0..=600_000).contains(&self.drain_timeout_ms) {
            return Err(invalid("drain_timeout_ms", "must be 0 to 600000"));
        }
        let log_format = match self.log.format.as_str() {
            "text" => LogFormat::Text,
            "json" => LogFormat::Json,
            other => {
                return Err(invalid(
                    "log.format",
                    format!("{other:?} is not text or json"),
                ));
            }
        };
        if tracing_subscriber::EnvFilter::try_new(&self.log.level).is_err() {
            return Err(invalid(
                "log.level",
                format!(
                    "{:?} is not a level or filter (e.g. info, debug, comtrexx_licensing=debug)",
                    self.log.level
                ),
            ));
        }
        if self.mirror.stale_after_ms < 100 {
            return Err(invalid("mirror.stale_after_ms", "must be at least 100"));
        }
        if self.mirror.resync_interval_ms < 1000 {
            return Err(invalid(
                "mirror.resync_interval_ms",
                "must be at least 1000",
            ));
        }
        let tls = match (&self.tls.cert_file, &self.tls.key_file) {
            (Some(c), Some(k)) => Some((c.clone(), k.clone())),
            (None, None) => None,
            (Some(_), None) => {
                return Err(invalid("tls.key_file", "is required with tls.cert_file"));
            }
            (None, Some(_)) => {
                return Err(invalid("tls.cert_file", "is required with tls.key_file"));
            }
        };
        let limits = self.limits.validate()?;
        Ok(Config {
            limits,
            listen_addr,
            metrics_addr,
            redis,
            serial_is_placeholder: serial_number.as_str() == DEV_SERIAL,
            serial_number,
            edition,
            tryout: TryoutPolicy {
                days: self.tryout.days,
                seats: self.tryout.seats,
            },
            license_file: self.license_file.clone(),
            vendor_public_key,
            over_capacity_grace: chrono::Duration::days(i64::from(self.over_capacity_grace_days)),
            drain_timeout: Duration::from_millis(self.drain_timeout_ms),
            log_format,
            log_level: self.log.level.clone(),
            mirror: MirrorConfig {
                stale_after: Duration::from_millis(self.mirror.stale_after_ms),
                resync_interval: Duration::from_millis(self.mirror.resync_interval_ms),
                ..MirrorConfig::default()
            },
            tls,
            license_source,
            grace: chrono::Duration::days(i64::from(self.grace_days)),
            lapse_action,
            reconcile_interval: Duration::from_secs(self.reconcile.interval_secs),
            reconcile_jitter_percent: self.reconcile.jitter_percent,
            code_ttl: chrono::Duration::minutes(i64::from(self.initialization.code_ttl_minutes)),
            otlp_endpoint: self
                .otlp_endpoint
                .clone()
                .filter(|e| !e.is_empty())
                .or_else(|| {
                    std::env::var("OTEL_EXPORTER_OTLP_ENDPOINT")
                        .ok()
                        .filter(|e| !e.is_empty())
                }),
        })
    }
}

/// Puts a password into a redis URL (`redis://[user]:password@host`).
fn with_password(url: &str, password: &str) -> Result<String, String> {
    let (scheme, rest) = url.split_once("://").ok_or("redis_url has no scheme")?;
    let (user, host) = match rest.rsplit_once('@') {
        Some((auth, host)) => (auth.split(':').next().unwrap_or(""), host),
        None => ("", rest),
    };
    if password.contains(['@', '/', ':']) {
        return Err("must not contain '@', '/' or ':' (URL syntax)".into());
    }
    Ok(format!("{scheme}://{user}:{password}@{host}"))
}

fn toml_string(raw: &RawConfig) -> String {
    toml::to_string_pretty(raw).expect("config serializes as TOML")
}

#[cfg(test)]
// figment::Jail's closures return figment's (large) error type.
#[allow(clippy::result_large_err)]
mod tests {
    use super::*;
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
            assert_eq!(c.redis.unwrap().timeout, Duration::from_millis(250));
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
            (
                Box::new(|c| c.redis_url = Some("http://x".into())),
                "redis_url",
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
                Box::new(|c| c.limits.activation_burst = 0),
                "limits.activation_burst",
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
        let c = raw.validate().unwrap();
        assert_eq!(c.redis.unwrap().url, "redis://:hunter3@redis:6379");
    }
}
