//! comtrexx-licensing: the licensing service of a COMtrexx PBX stack.
//!
//! - [`auth`]: callers and roles (who is calling), the role → RPC policy table, the
//!   callers file, the TLS acceptor and the authorization layer.
//! - [`audit`]: the audit trail: log line at once, store entry through a bounded queue.
//! - [`domain`]: editions, features, seats, the tryout state machine, signed
//!   licenses and the seat decisions; free of I/O.
//! - [`store`]: the `Store` trait with the Redis and embedded in-memory stores.
//! - [`mirror`]: each replica's in-memory copy of the store, followed through the
//!   store's change feed; the hot path reads it.
//! - [`state_file`]: the replica's last known state on local disk (`state_dir`),
//!   answering reads after a restart while the store is unreachable.
//! - [`events`]: license events for WatchLicenseEvents (from the change feed and the clock).
//! - [`service`]: the application service (validate, decide, write, read).
//! - [`grpc`]: the gRPC adapter: generated types, conversions, error table, handlers.
//! - [`limits`]: request limits and load protection (budgets per class of RPC,
//!   deadline, connection age, per-caller stream cap and rate limits).
//! - [`server`]: the tonic server with health and reflection on a bound listener.
//! - [`app`]: wiring of the parts from the configuration, and their tasks.
//! - [`config`]: layered, validated configuration (defaults, TOML, environment).
//! - [`cli`]: the command line, including the development licensing tools.
//! - [`metrics`]: Prometheus `/metrics` and OTLP metrics.
//! - [`upstream`]: the vendor licensing server behind one trait (network, license file).
//! - [`telemetry`]: logs, OTLP traces, W3C trace context of incoming calls.
//! - [`journal`]: log lines for the systemd journal (syslog priority, no timestamp).
//! - [`systemd`]: readiness, drain, reload and watchdog notifications to systemd.
//! - [`reload`]: SIGHUP re-reads the files that may change in place (license file,
//!   callers file, TLS material).

pub mod app;
pub mod audit;
pub mod auth;
pub mod caller;
pub mod cli;
pub mod config;
/// The licensing rules (the comtrexx-licensing-domain crate).
pub use comtrexx_licensing_domain as domain;
pub mod events;
pub mod exporter;
pub mod grpc;
pub mod journal;
pub mod limits;
pub mod metrics;
pub mod mirror;
pub mod reload;
pub mod rpc;
pub mod server;
pub mod service;
pub mod state_file;
pub mod status;
pub mod store;
pub mod systemd;
pub mod telemetry;
pub mod upstream;

/// Resolves on SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = term => {}
    }
    tracing::info!("shutdown signal received");
}

/// Logs what this replica runs with, and warns where a setting needs attention.
pub fn log_startup(config: &config::Config, store: String) {
    tracing::info!(
        serial_number = %config.serial_number,
        edition = %config.edition,
        %store,
        "starting comtrexx-licensing {}",
        env!("CARGO_PKG_VERSION")
    );
    for variable in config::ignored_service_links() {
        tracing::debug!(
            %variable,
            "ignored: a Kubernetes service-link variable, not a setting"
        );
    }
    if config.redis.is_none() {
        tracing::warn!(
            "no redis_url configured: using the embedded in-memory store; all seats and the tryout record are lost on restart"
        );
    }
    crate::metrics::auth_metrics()
        .set_posture(config.auth.mode.as_str(), config.development_installation);
    if config.auth.mode == auth::AuthMode::Disabled {
        tracing::warn!(
            "auth.mode is disabled: every caller is an operator and may reset activation, release seats and burn the tryout; use protected or enforce"
        );
    }
    if config.development_installation {
        tracing::warn!(
            "development_installation is set: licenses signed with the configured vendor_public_key are trusted, not only the vendor's, and a plain http:// licensing server is accepted"
        );
    }
    if config.serial_is_placeholder {
        tracing::warn!(
            "serial_number not configured: using the development placeholder {}",
            config::DEV_SERIAL
        );
    }
}
