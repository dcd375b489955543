//! Wiring: builds the store, mirror and service from the configuration, and runs
//! them with the gRPC server until shutdown.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::audit::{AuditWriter, Auditor};
use crate::auth::callers::CallersFile;
use crate::auth::layer::Authenticator;
use crate::auth::tls::TlsMaterial;
use crate::config::{Config, LicenseSourceConfig};
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
use crate::upstream::{Backoff, LicensingServer};

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
        let redis = match &config.redis {
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
        };
        let source: Option<Arc<dyn LicensingServer>> = match &config.license_source {
            LicenseSourceConfig::None => None,
            LicenseSourceConfig::File(path) => Some(Arc::new(LicenseFile::new(path.clone()))),
            LicenseSourceConfig::Server {
                url,
                ca_file,
                timeout,
            } => Some(Arc::new(
                GrpcLicensingServer::new(url, ca_file.as_deref(), *timeout)
                    .map_err(anyhow::Error::msg)
                    .context("set up licensing_server")?,
            )),
        };
        let (audit, audit_writer) = Auditor::new(store.clone(), clock.clone(), config.audit);
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
        let callers = Arc::new(
            CallersFile::load(
                config.auth.callers_file.as_deref(),
                config.auth.allow_empty_callers_file,
            )
            .map_err(anyhow::Error::msg)
            .context("load auth.callers_file")?,
        );
        let auth = Arc::new(Authenticator {
            mode: config.auth.mode,
            callers: callers.clone(),
            audit: audit.clone(),
            refuse_plaintext_tokens: tls.is_none() && !config.auth.allow_plaintext_tokens,
        });
        // What SIGHUP (`systemctl reload`) re-reads; a part that fails keeps its state.
        let mut reloads = Reloads::default();
        if let LicenseSourceConfig::File(_) = &config.license_source {
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
