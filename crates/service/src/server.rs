//! The gRPC server: `LicensingService`, health and reflection on an already-bound
//! listener, until a shutdown future resolves (so tests run it on port 0).
//! The health status is also served on the metrics port ([`Health`]).

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tonic::transport::Server;
use tonic_health::ServingStatus;
use tonic_health::pb::health_server::HealthServer;
use tonic_health::server::{HealthReporter, HealthService};

use crate::auth::layer::{AuthLayer, Authenticator};
use crate::auth::tls::TlsMaterial;
use crate::grpc::pb::licensing_service_server::LicensingServiceServer;
use crate::grpc::{FILE_DESCRIPTOR_SET, LicensingApi, SERVICE_NAME};
use crate::limits::{self, BoundedHealth, Connections, Guards, HealthWatches, Limits};
use crate::mirror::{Mirror, StateSource};
use crate::service::Licensing;

/// How the server runs.
#[derive(Clone)]
pub struct ServerOptions {
    /// How long in-flight calls may take to finish after shutdown starts.
    pub drain_timeout: Duration,
    /// Certificate, key and client CA for TLS (reloadable); plaintext when `None`.
    pub tls: Option<Arc<TlsMaterial>>,
    /// Who may call what; also records refusals and handler outcomes.
    pub auth: Arc<Authenticator>,
    /// Request limits and load protection (`limits.*`).
    pub limits: Limits,
    /// The health status this server reports.
    pub health: Health,
    /// `WatchSeats` streams (`watch.*`).
    pub watch: crate::grpc::WatchOptions,
}

/// The health service name that only says the process runs (liveness probes).
pub const LIVENESS: &str = "liveness";

/// This replica's health (`grpc.health.v1`): one status, served on the gRPC
/// port and on the metrics port. There it is plaintext and needs no
/// credentials, for probes that cannot speak TLS (the kubelet's gRPC probe)
/// while the gRPC port serves TLS, perhaps with client certificates required.
///
/// `""` (the whole server) and `comtrexx.licensing.v1.LicensingService` are
/// `SERVING` once the replica has state to answer from (a snapshot of the store,
/// or its state file), `NOT_SERVING` before (a replica started while Redis is
/// down and nothing on disk: it would answer nothing definitely) and when it
/// drains. Readiness does not otherwise depend on Redis: `CheckSeat` keeps
/// answering from memory while Redis is down. [`LIVENESS`] is `SERVING` while
/// the process runs, for liveness and start-up probes: a replica waiting for
/// Redis must not be restarted for it.
///
/// Its watches need no credentials: both ports together hold at most
/// `limits.health_watches` (`limits.health_watches_per_peer` per peer
/// address), and every one ends when the server drains.
#[derive(Clone, Debug)]
pub struct Health {
    reporter: HealthReporter,
    watches: Arc<HealthWatches>,
}

impl Default for Health {
    fn default() -> Self {
        Self::new(&Limits::default())
    }
}

impl Health {
    /// The health status, its watches bounded by `limits`.
    pub fn new(limits: &Limits) -> Self {
        Self {
            reporter: HealthReporter::new(),
            watches: HealthWatches::new(limits),
        }
    }

    /// A `grpc.health.v1.Health` service answering with this status.
    pub fn service(&self) -> BoundedHealth<HealthServer<HealthService>> {
        BoundedHealth::new(
            HealthServer::new(HealthService::from_health_reporter(self.reporter.clone())),
            self.watches.clone(),
        )
    }

    /// Open watches on both ports.
    pub fn watches(&self) -> usize {
        self.watches.open()
    }

    async fn set(&self, status: ServingStatus) {
        for name in ["", SERVICE_NAME] {
            self.reporter.set_service_status(name, status).await;
        }
    }

    /// Sets the status from whether the replica has state now (before serving,
    /// also on the metrics port); `true` when it has.
    pub async fn starting(&self, mirror: &Mirror) -> bool {
        self.reporter
            .set_service_status(LIVENESS, ServingStatus::Serving)
            .await;
        let has = mirror.source() != StateSource::None;
        let status = if has {
            ServingStatus::Serving
        } else {
            ServingStatus::NotServing
        };
        self.set(status).await;
        has
    }

    /// `SERVING` once the replica has state (it never loses it again).
    fn serve_when_state(&self, mirror: &Mirror) -> tokio::task::JoinHandle<()> {
        let mut source = mirror.source_watch();
        let health = self.clone();
        tokio::spawn(async move {
            if source.wait_for(|s| *s != StateSource::None).await.is_ok() {
                health.set(ServingStatus::Serving).await;
                tracing::info!("replica has state: health SERVING");
            }
        })
    }
}

/// Serves until `shutdown` resolves; then health says `NOT_SERVING`, no new calls
/// are taken and in-flight calls get up to `drain_timeout` to finish. systemd hears
/// `READY=1` when serving starts and `STOPPING=1` when draining does.
pub async fn run(
    listener: TcpListener,
    licensing: Arc<Licensing>,
    options: ServerOptions,
    shutdown: impl Future<Output = ()> + Send,
) -> anyhow::Result<()> {
    let health = options.health.clone();
    let follow_state = if health.starting(licensing.mirror()).await {
        None
    } else {
        tracing::warn!(
            "no state yet (seat store not reached, no state file): health NOT_SERVING, reads answer NO_STATE_YET"
        );
        Some(health.serve_when_state(licensing.mirror()))
    };

    let (reflection_v1, reflection_v1alpha) =
        crate::grpc::reflection_services(&[FILE_DESCRIPTOR_SET])?;

    let limits_cfg = &options.limits;
    // Set when the server starts draining: open event streams end at once.
    let (start_draining, draining) = tokio::sync::watch::channel(false);
    let guards = Guards::new(limits_cfg, draining);
    let builder = Server::builder()
        // Call handling sends small, latency-sensitive requests.
        .tcp_nodelay(true)
        // Notice dead peers (a PBX that vanished) instead of keeping streams forever.
        .http2_keepalive_interval(Some(limits_cfg.keepalive_interval))
        .http2_keepalive_timeout(Some(limits_cfg.keepalive_timeout))
        // GOAWAY after this age: clients reconnect, and spread over replicas added since.
        // (Not tonic's grace: with one set it closes without a GOAWAY; see AdmittedConnection.)
        .max_connection_age(limits_cfg.max_connection_age)
        // SETTINGS_MAX_CONCURRENT_STREAMS: one connection cannot open streams
        // without bound (tonic advertises no limit of its own).
        .max_concurrent_streams(limits_cfg.max_streams_per_connection);
    let audit = options.auth.audit.clone();
    let stack = tower::ServiceBuilder::new()
        // Every call but health comes from a known caller whose role allows it;
        // the caller travels on as a request extension (src/auth/layer.rs).
        .layer(AuthLayer::new(options.auth.clone()))
        // Read the request whole (bounded in time and size), then refuse at once
        // (UNAVAILABLE) a call whose class is at its budget, or whose caller
        // holds its share: a burst of writes or overview calls, or one caller's
        // streams without bodies, never takes CheckSeat's capacity.
        .layer(limits::shed(limits_cfg, audit.clone()))
        // Bound every admitted call (a stream until it opens), or sooner the
        // client's grpc-timeout: DEADLINE_EXCEEDED, not tonic's CANCELLED.
        .layer(limits::deadline(limits_cfg.rpc_deadline, audit.clone()))
        // Say RESOURCE_EXHAUSTED for an over-size request (tonic: OUT_OF_RANGE).
        .layer(limits::message_size(
            limits_cfg.max_message_bytes,
            audit.clone(),
        ))
        .into_inner();
    let licensing_service = LicensingServiceServer::new(LicensingApi::new(
        licensing,
        audit.clone(),
        guards,
        options.watch,
    ))
    // Refuse over-size requests before decoding them (see message_size above).
    .max_decoding_message_size(limits_cfg.max_message_bytes);
    let router = builder
        .layer(stack)
        .add_service(licensing_service)
        .add_service(health.service())
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha);

    let (stop_accepting, stop_signal) = tokio::sync::oneshot::channel::<()>();
    // Our own acceptor: TLS material is re-read at run time, and the peer's
    // address and client certificate reach the authorization layer. It caps
    // connections per peer and in total, and closes one without its TLS
    // handshake and HTTP/2 preface in time. Each connection is closed after
    // its age and grace (streams included).
    let connections = Connections::new(limits_cfg);
    let incoming = crate::auth::tls::incoming(listener, options.tls.clone(), audit, connections);
    let serve = router.serve_with_incoming_shutdown(incoming, async {
        let _ = stop_signal.await;
    });
    tokio::pin!(serve);
    // The bound listener's connections are taken from the first poll of `serve`,
    // just below: tell systemd (Type=notify) now. (Health may say NOT_SERVING
    // until the replica has state; the process itself has started.)
    crate::systemd::ready("serving");
    tokio::select! {
        result = &mut serve => return Ok(result?),
        () = shutdown => {}
    }
    crate::systemd::stopping();
    tracing::info!(
        drain_timeout_ms = options.drain_timeout.as_millis() as u64,
        "shutting down: draining in-flight calls"
    );
    if let Some(follow) = follow_state {
        // Stopped first, so it cannot say SERVING after the drain said NOT_SERVING.
        follow.abort();
        let _ = follow.await;
    }
    health.set(ServingStatus::NotServing).await;
    // Event streams and health watches end now with UNAVAILABLE ("reconnect")
    // instead of holding the drain open until its timeout.
    let _ = start_draining.send(true);
    health.watches.drain();
    let _ = stop_accepting.send(());
    match tokio::time::timeout(options.drain_timeout, &mut serve).await {
        Ok(result) => result?,
        Err(_) => tracing::warn!("drain timeout passed; closing the calls still running"),
    }
    Ok(())
}
