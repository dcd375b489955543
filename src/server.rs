//! The gRPC server: `LicensingService`, health and reflection on an already-bound
//! listener, until a shutdown future resolves (so tests run it on port 0).

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tonic::transport::Server;
use tonic_health::ServingStatus;

use crate::auth::layer::{AuthLayer, Authenticator};
use crate::auth::tls::TlsMaterial;
use crate::grpc::pb::licensing_service_server::LicensingServiceServer;
use crate::grpc::{FILE_DESCRIPTOR_SET, LicensingApi, SERVICE_NAME};
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
}

/// Serves until `shutdown` resolves; then health says `NOT_SERVING`, no new calls
/// are taken and in-flight calls get up to `drain_timeout` to finish.
pub async fn run(
    listener: TcpListener,
    licensing: Arc<Licensing>,
    options: ServerOptions,
    shutdown: impl Future<Output = ()> + Send,
) -> anyhow::Result<()> {
    let (health, health_service) = tonic_health::server::health_reporter();
    // "" (the whole server) is SERVING from the start; readiness must not depend
    // on Redis, because CheckSeat keeps answering from memory while it is down.
    health
        .set_service_status(SERVICE_NAME, ServingStatus::Serving)
        .await;

    let (reflection_v1, reflection_v1alpha) =
        crate::grpc::reflection_services(FILE_DESCRIPTOR_SET)?;

    let builder = Server::builder()
        // Call handling sends small, latency-sensitive requests.
        .tcp_nodelay(true)
        // Notice dead peers (a PBX that vanished) instead of keeping streams forever.
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)));
    let audit = options.auth.audit.clone();
    let router = builder
        // Every call but health comes from a known caller whose role allows it;
        // the caller travels on as a request extension (src/auth/layer.rs).
        .layer(AuthLayer::new(options.auth.clone()))
        .add_service(LicensingServiceServer::new(LicensingApi::new(
            licensing, audit,
        )))
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha);

    let (stop_accepting, stop_signal) = tokio::sync::oneshot::channel::<()>();
    // Our own acceptor: TLS material is re-read at run time, and the peer's
    // address and client certificate reach the authorization layer.
    let incoming = crate::auth::tls::incoming(listener, options.tls.clone());
    let serve = router.serve_with_incoming_shutdown(incoming, async {
        let _ = stop_signal.await;
    });
    tokio::pin!(serve);
    tokio::select! {
        result = &mut serve => return Ok(result?),
        () = shutdown => {}
    }
    tracing::info!(
        drain_timeout_ms = options.drain_timeout.as_millis() as u64,
        "shutting down: draining in-flight calls"
    );
    health
        .set_service_status("", ServingStatus::NotServing)
        .await;
    health
        .set_service_status(SERVICE_NAME, ServingStatus::NotServing)
        .await;
    let _ = stop_accepting.send(());
    match tokio::time::timeout(options.drain_timeout, &mut serve).await {
        Ok(result) => result?,
        Err(_) => tracing::warn!("drain timeout passed; closing the calls still running"),
    }
    Ok(())
}
