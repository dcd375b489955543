//! Wiring: builds the store, mirror and service from the configuration, and runs
//! them with the gRPC server until shutdown.

use std::future::Future;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::audit::{AuditWriter, Auditor};
use crate::auth::callers::CallersFile;
use crate::auth::layer::Authenticator;
use crate::auth::tls::TlsMaterial;
use crate::config::{Config, ConfigError, RedisConfig, RedisOptions, invalid};
use crate::domain::{Clock, TimeAuthority};
use crate::mirror::{Mirror, Verifier};
use crate::reload::Reloads;
use crate::server::{self, Health, ServerOptions};
use crate::service::{Licensing, Settings};
use crate::state_file::StateFile;
use crate::store::Store;
use crate::store::memory::MemoryStore;
use crate::store::redis::RedisStore;
use crate::upstream::file::LicenseFile;
use crate::upstream::grpc::GrpcLicensingServer;
use crate::upstream::{Backoff, LicenseSource, LicensingServer};

/// A replica's parts.
pub struct App {
    pub licensing: Arc<Licensing>,
    pub store: Arc<dyn Store>,
    pub mirror: Arc<Mirror>,
    /// What SIGHUP re-reads (see [`crate::reload`]).
    pub reloads: Arc<Reloads>,
    // The Redis store, for its start-up check of the eviction policy.
    redis: Option<Arc<RedisStore>>,
    options: ServerOptions,
    /// The callers file in force (public for a reload trigger, e.g. SIGHUP).
    pub callers: Arc<CallersFile>,
    /// The audit recorder, e.g. for tests that look at the trail.
    pub audit: Auditor,
    // Taken by `run`, which starts it.
    audit_writer: Option<AuditWriter>,
    reload_interval: Duration,
    // The state file (`state_dir`), written while running and at the end.
    state_file: Option<StateFile>,
}

impl App {
    /// Builds the parts; connects to nothing yet (Redis may be down at start).
    pub fn build(config: &Config, clock: Arc<dyn Clock>) -> anyhow::Result<Self> {
        let files = ConfigFiles::read(config)?;
        let redis = match &files.redis {
            Some(redis) => Some(Arc::new(
                RedisStore::open(redis, &config.serial_number).context("open redis_url")?,
            )),
            None => None,
        };
        // Embedded, the process's own clock is the reference; with Redis, its TIME.
        let store: Arc<dyn Store> = match &redis {
            Some(redis) => redis.clone(),
            None => Arc::new(MemoryStore::new(clock.clone())),
        };
        // Everything else reads the node clock as the time authority corrects it.
        let time = Arc::new(TimeAuthority::new(clock, config.clock_max_skew_ms));
        let clock: Arc<dyn Clock> = time.clone();
        let verifier = Verifier {
            key: config.vendor_public_key,
            serial: config.serial_number.clone(),
            edition: config.edition,
        };
        let mirror = Arc::new(
            Mirror::new(
                store.clone(),
                verifier.clone(),
                config.mirror,
                clock.clone(),
            )
            .with_tryout(config.tryout),
        );
        let state_file = match &config.state_dir {
            Some(dir) => {
                let file = StateFile::in_dir(dir).context("create state_dir")?;
                crate::state_file::load_into(&file, &mirror, &verifier);
                Some(file)
            }
            None => None,
        };
        let settings = Settings {
            serial: config.serial_number.clone(),
            edition: config.edition,
            tryout: config.tryout,
            over_capacity_grace: config.over_capacity_grace,
            vendor_key: config.vendor_public_key,
            grace: config.grace,
            lapse_action: config.lapse_action,
            reconcile_interval: config.reconcile_interval,
            reconcile_jitter_percent: config.reconcile_jitter_percent,
            code_ttl: config.code_ttl,
            backoff: Backoff::default(),
            auth_mode: config.auth.mode.as_str(),
            development_installation: config.development_installation,
            consistency_max_wait: config.consistency_max_wait,
            lease_duration: config.lease_duration,
        };
        let source: Option<Arc<dyn LicensingServer>> = match &config.license_source {
            LicenseSource::None => None,
            LicenseSource::File(path) => Some(Arc::new(LicenseFile::new(path.clone()))),
            LicenseSource::Server {
                url,
                ca_file,
                timeout,
            } => Some(Arc::new(
                GrpcLicensingServer::new(url, ca_file.as_deref(), *timeout)
                    .map_err(anyhow::Error::msg)
                    .context("set up licensing_server")?,
            )),
        };
        // An accepted change waits for room in a full audit queue about as long
        // as for its write (at least a second: a burst on a busy host).
        let write_timeout = files.redis.as_ref().map_or(Duration::ZERO, |r| {
            r.timeout + r.wait.map_or(Duration::ZERO, |w| w.timeout)
        });
        let (audit, audit_writer) = Auditor::new(store.clone(), clock.clone(), config.audit);
        let audit = audit.with_queue_wait(write_timeout.max(Duration::from_secs(1)));
        let licensing = Arc::new(Licensing::new(
            store.clone(),
            mirror.clone(),
            time,
            settings,
            source,
        ));
        let tls = match &config.tls {
            Some(files) => Some(Arc::new(
                TlsMaterial::load(files.clone())
                    .map_err(anyhow::Error::msg)
                    .context("load the TLS material")?,
            )),
            None => None,
        };
        if let Some(tls) = &tls {
            let client_certificates = if tls.requires_client_certificates() {
                "required at the handshake"
            } else if tls.requests_client_certificates() {
                "optional, checked per call"
            } else {
                "not asked for"
            };
            tracing::info!(client_certificates, "TLS on the gRPC listener");
        }
        let callers = Arc::new(files.callers);
        let auth = Arc::new(Authenticator {
            mode: config.auth.mode,
            callers: callers.clone(),
            audit: audit.clone(),
            refuse_plaintext_tokens: tls.is_none() && !config.auth.allow_plaintext_tokens,
        });
        // What SIGHUP (`systemctl reload`) re-reads; a part that fails keeps its state.
        let mut reloads = Reloads::default();
        if let LicenseSource::File(_) = &config.license_source {
            let licensing = licensing.clone();
            reloads.register("license file", move || {
                let licensing = licensing.clone();
                async move { reload_license_file(&licensing).await }
            });
        }
        if config.auth.callers_file.is_some() {
            let callers = callers.clone();
            reloads.register_sync("callers file", move || {
                callers.reload().inspect_err(|_| {
                    crate::metrics::auth_metrics().reload_failed("callers_file");
                })
            });
        }
        if let Some(tls) = &tls {
            let tls = tls.clone();
            reloads.register_sync("TLS material", move || {
                tls.reload()
                    .inspect_err(|_| crate::metrics::auth_metrics().reload_failed("tls"))
            });
        }
        Ok(Self {
            licensing,
            store,
            mirror,
            reloads: Arc::new(reloads),
            redis,
            options: ServerOptions {
                drain_timeout: config.drain_timeout,
                tls,
                auth,
                limits: config.limits.clone(),
                health: Health::new(&config.limits),
                watch: config.watch,
            },
            callers,
            audit,
            audit_writer: Some(audit_writer),
            reload_interval: config.auth.reload_interval,
            state_file,
        })
    }

    /// Runs the mirror, the start-up reconcile, the metrics endpoint (when given a
    /// listener) and the gRPC server until `shutdown`.
    pub async fn run(
        mut self,
        listener: TcpListener,
        metrics_listener: Option<TcpListener>,
        shutdown: impl Future<Output = ()> + Send,
    ) -> anyhow::Result<()> {
        let (stop_tx, stop_rx) = watch::channel(false);
        let stopped = move || {
            let mut rx = stop_rx.clone();
            async move {
                let _ = rx.wait_for(|s| *s).await;
            }
        };
        let mirror_task = tokio::spawn(self.mirror.clone().run(stopped()));
        if let Some(redis) = self.redis.clone() {
            tokio::spawn(warn_about_eviction(redis));
        }
        let licensing = self.licensing.clone();
        let schedule_stopped = stopped();
        let reconcile_task = tokio::spawn(async move {
            licensing
                .run_schedule(SCHEDULE_TICK, schedule_stopped)
                .await;
        });
        if let Some(writer) = self.audit_writer.take() {
            tokio::spawn(writer.run());
        }
        let reload_task = tokio::spawn(watch_credentials(
            self.callers.clone(),
            self.options.tls.clone(),
            self.reload_interval,
            stopped(),
        ));
        // Before the metrics port serves health: NOT_SERVING without state.
        self.options.health.starting(&self.mirror).await;
        let saver_task = self.state_file.take().map(|file| {
            tokio::spawn(crate::state_file::run_saver(
                file,
                self.mirror.clone(),
                self.licensing.settings().serial.clone(),
                stopped(),
            ))
        });
        let metrics_task = metrics_listener.map(|listener| {
            let registry = crate::exporter::registry(self.licensing.clone());
            let health = self.options.health.service();
            tokio::spawn(crate::exporter::serve(
                listener,
                registry,
                health,
                stopped(),
            ))
        });
        let result = server::run(listener, self.licensing.clone(), self.options, shutdown).await;
        // Before going, make sure the store holds what this replica saw: a store
        // that went back is repaired now, not left to replicas started later that
        // never saw the lost writes (a rolling restart).
        final_check(&self.mirror).await;
        let _ = stop_tx.send(true);
        let _ = mirror_task.await;
        let _ = reconcile_task.await;
        let _ = reload_task.await;
        if let Some(task) = saver_task {
            // Its last write holds what the final check saw.
            let _ = task.await;
        }
        if let Some(mut task) = metrics_task {
            // A scrape ends at once; a client watching health there would hold
            // the graceful shutdown open: it gets a moment, then the end.
            match tokio::time::timeout(METRICS_STOP, &mut task).await {
                Ok(Ok(Err(error))) => {
                    tracing::warn!(%error, "metrics endpoint stopped with an error")
                }
                Ok(_) => {}
                Err(_) => task.abort(),
            }
        }
        result
    }
}

/// What the files the configuration names hold, read and checked: by
/// [`App::build`] at start and by `comtrexx-licensing config`. (The configuration
/// itself checks values only.) Every error names the key and the path. The TLS
/// material and the licensing server's CA are read where they are used, when
/// `App::build` sets those parts up; the license file at every reconcile.
pub struct ConfigFiles {
    /// The Redis connection, with `redis_password_file` and `redis_tls_ca_file` read.
    pub redis: Option<RedisConfig>,
    /// The callers file (`auth.callers_file`), loaded and checked.
    pub callers: CallersFile,
}

impl ConfigFiles {
    pub fn read(config: &Config) -> Result<Self, ConfigError> {
        let redis = config.redis.as_ref().map(redis_config).transpose()?;
        if let Some(dir) = &config.state_dir {
            check_state_dir(dir)?;
        }
        let callers = CallersFile::load(
            config.auth.callers_file.as_deref(),
            config.auth.allow_empty_callers_file,
        )
        .map_err(|m| invalid("auth.callers_file", m))?;
        Ok(Self { redis, callers })
    }
}

/// The Redis connection of `options`, with what its files hold.
fn redis_config(options: &RedisOptions) -> Result<RedisConfig, ConfigError> {
    let mut redis = options.connection.clone();
    if let Some(path) = &options.password_file {
        redis.password = Some(read_secret(path).map_err(|m| invalid("redis_password_file", m))?);
    }
    if let Some(path) = &options.tls_ca_file {
        redis.tls_ca =
            Some(read_pem_certificates(path).map_err(|m| invalid("redis_tls_ca_file", m))?);
    }
    Ok(redis)
}

/// A secret from a file (a mounted Secret): the first line, without its newline.
fn read_secret(path: &Path) -> Result<String, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let secret = text.trim_end_matches(['\n', '\r']);
    if secret.is_empty() || secret.contains(['\n', '\r']) {
        return Err(format!(
            "{} must hold the password on one line",
            path.display()
        ));
    }
    Ok(secret.to_owned())
}

/// A PEM bundle that holds at least one certificate.
fn read_pem_certificates(path: &Path) -> Result<Vec<u8>, String> {
    let pem = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    if !String::from_utf8_lossy(&pem).contains("-----BEGIN CERTIFICATE-----") {
        return Err(format!("{} holds no PEM certificate", path.display()));
    }
    Ok(pem)
}

/// `state_dir` is a directory, or missing (then created by [`StateFile::in_dir`]).
fn check_state_dir(dir: &Path) -> Result<(), ConfigError> {
    if dir.is_file() {
        return Err(invalid(
            "state_dir",
            format!(
                "{} is a file; it must be a directory (created if missing)",
                dir.display()
            ),
        ));
    }
    Ok(())
}

/// Before the replica goes: checks (and repairs) the store against what this
/// replica saw, retrying for up to `FINAL_CHECK`. A Redis that just came back
/// (restart, failover) fails the first command on a connection it dropped;
/// giving up then would leave the writes only this replica knows to be lost
/// with it.
async fn final_check(mirror: &Mirror) {
    let deadline = tokio::time::Instant::now() + FINAL_CHECK;
    loop {
        match tokio::time::timeout_at(deadline, mirror.resync_now()).await {
            Ok(Ok(())) => return,
            Ok(Err(error)) if tokio::time::Instant::now() + FINAL_CHECK_RETRY < deadline => {
                tracing::debug!(%error, "checking the seat store before stopping; retrying");
                tokio::time::sleep(FINAL_CHECK_RETRY).await;
            }
            Ok(Err(error)) => {
                tracing::warn!(%error, "could not check the seat store before stopping");
                return;
            }
            Err(_) => {
                tracing::warn!("checking the seat store before stopping took too long");
                return;
            }
        }
    }
}

/// Applies the license file again (a reconcile): a file that does not verify, or
/// cannot be read, leaves the applied license as it is, and the reconcile's error
/// is the reload's.
async fn reload_license_file(licensing: &Licensing) -> anyhow::Result<()> {
    let report = licensing.reconcile().await.context("reconcile")?;
    match report.error {
        None => Ok(()),
        Some(error) => Err(anyhow::anyhow!("{:?}: {error}", report.outcome)),
    }
}

/// Re-reads the callers file and the TLS material whenever their files change
/// (cert-manager rotates certificates in place). A file that does not load
/// leaves what is in force, with a warning and a counter.
async fn watch_credentials(
    callers: Arc<CallersFile>,
    tls: Option<Arc<TlsMaterial>>,
    interval: Duration,
    stopped: impl Future<Output = ()>,
) {
    tokio::pin!(stopped);
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = &mut stopped => return,
            _ = tick.tick() => {}
        }
        match callers.reload_if_changed() {
            Ok(true) => tracing::info!(callers = callers.current().len(), "callers file reloaded"),
            Ok(false) => {}
            Err(error) => {
                crate::metrics::auth_metrics().reload_failed("callers_file");
                tracing::warn!(%error, "callers file not reloaded; the previous callers stay in force");
            }
        }
        if let Some(tls) = &tls {
            match tls.reload_if_changed() {
                Ok(true) => tracing::info!("TLS certificate, key and client CA reloaded"),
                Ok(false) => {}
                Err(error) => {
                    crate::metrics::auth_metrics().reload_failed("tls");
                    tracing::warn!(%error, "TLS material not reloaded; the previous stays in force");
                }
            }
        }
    }
}

/// Warns loudly when Redis may evict keys: under memory pressure it would delete
/// seats. Best effort: managed Redis often forbids CONFIG GET.
async fn warn_about_eviction(redis: Arc<RedisStore>) {
    match redis.check_eviction_policy().await {
        Some(policy) if policy != "noeviction" => tracing::error!(
            %policy,
            "Redis maxmemory-policy is not noeviction: under memory pressure Redis deletes keys, seats included; set maxmemory-policy noeviction"
        ),
        Some(_) => {}
        None => tracing::info!(
            "could not read Redis maxmemory-policy (CONFIG GET refused or Redis unreachable); it must be noeviction"
        ),
    }
}

/// How long a stopping replica may take to check (and repair) the store.
const FINAL_CHECK: Duration = Duration::from_secs(2);
/// How long the metrics endpoint may take to close its connections at the end.
const METRICS_STOP: Duration = Duration::from_secs(1);
/// The pause between attempts of that check.
const FINAL_CHECK_RETRY: Duration = Duration::from_millis(50);

/// How often a replica looks at the schedule (reconcile due, lapse, time events).
const SCHEDULE_TICK: Duration = Duration::from_secs(1);

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;
    use crate::config::RawConfig;
    use crate::domain::SystemClock;

    fn config(raw: RawConfig) -> Config {
        raw.validate_with_anchor(None)
            .expect("the configuration validates: its files are not read there")
    }

    /// The key and message of the error reading the files of `raw`.
    fn file_error(raw: RawConfig) -> (&'static str, String) {
        match ConfigFiles::read(&config(raw)) {
            Err(ConfigError::Invalid { key, message }) => (key, message),
            Err(other) => panic!("expected a key at fault, got {other}"),
            Ok(_) => panic!("expected an error"),
        }
    }

    fn redis(password_file: Option<PathBuf>, tls_ca_file: Option<PathBuf>) -> RawConfig {
        RawConfig {
            redis_url: Some("rediss://licensing@r:6380".into()),
            redis_password: password_file.is_none().then(|| "pw".into()),
            redis_password_file: password_file,
            redis_tls_ca_file: tls_ca_file,
            ..RawConfig::default()
        }
    }

    #[test]
    fn missing_files_are_refused_naming_key_and_path() {
        let (key, message) = file_error(redis(None, Some("/x/ca.pem".into())));
        assert_eq!(key, "redis_tls_ca_file");
        assert!(
            message.starts_with("/x/ca.pem: ") && message.contains("No such file"),
            "{message}"
        );
        let (key, message) = file_error(redis(Some("/x/password".into()), None));
        assert_eq!(key, "redis_password_file");
        assert!(message.starts_with("/x/password: "), "{message}");
        let (key, message) = file_error(RawConfig {
            auth: crate::config::RawAuth {
                callers_file: Some("/x/callers.toml".into()),
                ..Default::default()
            },
            ..RawConfig::default()
        });
        assert_eq!(key, "auth.callers_file");
        assert!(message.contains("/x/callers.toml"), "{message}");
        let (key, message) = file_error(RawConfig {
            state_dir: Some("Cargo.toml".into()),
            ..RawConfig::default()
        });
        assert_eq!(key, "state_dir");
        assert!(message.contains("Cargo.toml is a file"), "{message}");
    }

    #[test]
    fn bad_files_are_refused_naming_key_and_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = |name: &str| dir.path().join(name);
        std::fs::write(path("empty.pem"), "nothing here").unwrap();
        std::fs::write(path("password"), "two\nlines\n").unwrap();
        std::fs::write(
            path("callers.toml"),
            "[[caller]]\nname = \"pbx\"\nrole = \"king\"\ncertificate = \"spiffe://pbx\"\n",
        )
        .unwrap();
        let (key, message) = file_error(redis(None, Some(path("empty.pem"))));
        assert_eq!(key, "redis_tls_ca_file");
        assert!(message.contains("holds no PEM certificate"), "{message}");
        assert!(message.contains("empty.pem"), "{message}");
        let (key, message) = file_error(redis(Some(path("password")), None));
        assert_eq!(key, "redis_password_file");
        assert!(message.contains("on one line"), "{message}");
        let (key, message) = file_error(RawConfig {
            auth: crate::config::RawAuth {
                callers_file: Some(path("callers.toml")),
                ..Default::default()
            },
            ..RawConfig::default()
        });
        assert_eq!(key, "auth.callers_file");
        assert!(message.contains("caller[0]"), "{message}");
        assert!(message.contains("callers.toml"), "{message}");
    }

    #[test]
    fn the_files_fill_the_redis_connection_and_the_callers() {
        let dir = tempfile::tempdir().unwrap();
        let path = |name: &str| dir.path().join(name);
        let pem = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n";
        std::fs::write(path("ca.pem"), pem).unwrap();
        // A file's trailing newline is not the password's.
        std::fs::write(path("password"), "pa:ss@w/rd\n").unwrap();
        std::fs::write(
            path("callers.toml"),
            "[[caller]]\nname = \"pbx\"\nrole = \"call_handling\"\ncertificate = \"spiffe://pbx\"\n",
        )
        .unwrap();
        let mut raw = redis(Some(path("password")), Some(path("ca.pem")));
        raw.auth.callers_file = Some(path("callers.toml"));
        let files = ConfigFiles::read(&config(raw)).unwrap();
        let redis = files.redis.unwrap();
        assert_eq!(redis.password.as_deref(), Some("pa:ss@w/rd"));
        assert_eq!(redis.tls_ca.as_deref(), Some(pem.as_bytes()));
        assert_eq!(files.callers.current().len(), 1);
    }

    #[test]
    fn app_build_refuses_a_missing_file_naming_key_and_path() {
        let config = config(redis(None, Some("/x/ca.pem".into())));
        let error = App::build(&config, Arc::new(SystemClock))
            .err()
            .expect("a missing CA file fails the start");
        let text = format!("{error:#}");
        assert!(
            text.contains("redis_tls_ca_file") && text.contains("/x/ca.pem: No such file"),
            "{text}"
        );
    }
}
