//! `licensing-agent`: answers comtrexx-licensing's `CheckSeat` on a local
//! socket from a streamed copy of the seat state (see the crate's `agent`
//! module). Configuration by flags or `LICENSING_AGENT_*` variables.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use comtrexx_licensing_client::agent::Agent;
use comtrexx_licensing_client::{Client, Config, Feature, Tls};
use comtrexx_licensing_proto::SERVICE_NAME;
use comtrexx_licensing_proto::pb::licensing_service_server::LicensingServiceServer;

#[derive(Debug, Parser)]
#[command(
    name = "licensing-agent",
    version,
    about = "Answers comtrexx-licensing's CheckSeat on a local socket from a streamed copy of the seat state"
)]
struct Args {
    /// Where to answer: a loopback address (`127.0.0.1:50061`, `[::1]:50061`) or
    /// unix:/path/to/socket. Nothing else: the agent answers without
    /// authentication.
    #[arg(
        long,
        env = "LICENSING_AGENT_LISTEN",
        default_value = "127.0.0.1:50061"
    )]
    listen: String,
    /// The service's replicas, comma-separated (http:// or https://).
    #[arg(
        long = "endpoint",
        env = "LICENSING_AGENT_ENDPOINTS",
        value_delimiter = ',',
        required = true
    )]
    endpoints: Vec<String>,
    /// The CA certificate (PEM) that signed the service's certificate.
    #[arg(long, env = "LICENSING_AGENT_CA_FILE")]
    ca_file: Option<PathBuf>,
    /// A client certificate and key (PEM) for mutual TLS.
    #[arg(long, env = "LICENSING_AGENT_CERT_FILE", requires = "key_file")]
    cert_file: Option<PathBuf>,
    #[arg(long, env = "LICENSING_AGENT_KEY_FILE", requires = "cert_file")]
    key_file: Option<PathBuf>,
    /// A file holding the bearer token of a call_handling caller.
    #[arg(long, env = "LICENSING_AGENT_TOKEN_FILE")]
    token_file: Option<PathBuf>,
    /// The features to follow (call_assist, user), comma-separated; empty: all.
    #[arg(long, env = "LICENSING_AGENT_FEATURES", value_delimiter = ',')]
    features: Vec<String>,
    /// Where the last good copy is kept across restarts.
    #[arg(long, env = "LICENSING_AGENT_CACHE_FILE")]
    cache_file: Option<PathBuf>,
    /// The service's watch.heartbeat_ms.
    #[arg(long, env = "LICENSING_AGENT_HEARTBEAT_MS", default_value_t = 5000)]
    heartbeat_ms: u64,
    /// Silence after which answers say stale; default five heartbeats.
    #[arg(long, env = "LICENSING_AGENT_STALE_AFTER_MS")]
    stale_after_ms: Option<u64>,
    /// How long a CheckSeat with min_version may wait for the copy.
    #[arg(long, env = "LICENSING_AGENT_MAX_WAIT_MS", default_value_t = 100)]
    max_wait_ms: u64,
    /// The vendor's public key (base64): license documents are verified again.
    #[arg(long, env = "LICENSING_AGENT_VENDOR_PUBLIC_KEY")]
    vendor_public_key: Option<String>,
}

enum Listen {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

fn listen_of(raw: &str) -> Result<Listen, String> {
    if let Some(path) = raw.strip_prefix("unix:") {
        if path.is_empty() {
            return Err("--listen unix: needs a path, e.g. unix:/run/licensing-agent.sock".into());
        }
        return Ok(Listen::Unix(PathBuf::from(path)));
    }
    let addr: SocketAddr = raw.parse().map_err(|e| {
        format!("--listen {raw:?}: {e} (a loopback address such as 127.0.0.1:50061, or unix:/path)")
    })?;
    if !addr.ip().is_loopback() {
        return Err(format!(
            "--listen {raw}: not a loopback address; the agent answers without authentication, so it listens on loopback (127.0.0.1, ::1) or a Unix socket only"
        ));
    }
    Ok(Listen::Tcp(addr))
}

fn read(path: &PathBuf, what: &str) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("{what} {}: {e}", path.display()))
}

fn config(args: &Args) -> Result<Config, String> {
    let features = args
        .features
        .iter()
        .filter(|f| !f.is_empty())
        .map(|f| Feature::parse_seat(f).map_err(|e| format!("--features {f:?}: {}", e.message)))
        .collect::<Result<Vec<_>, _>>()?;
    let token = args
        .token_file
        .as_ref()
        .map(|p| read(p, "token file"))
        .transpose()?
        .map(|t| String::from_utf8_lossy(&t).trim().to_owned());
    let identity = match (&args.cert_file, &args.key_file) {
        (Some(c), Some(k)) => Some((read(c, "certificate")?, read(k, "key")?)),
        _ => None,
    };
    let tls = (args.ca_file.is_some() || identity.is_some())
        .then(|| -> Result<Tls, String> {
            Ok(Tls {
                ca_pem: args
                    .ca_file
                    .as_ref()
                    .map(|p| read(p, "CA file"))
                    .transpose()?,
                identity,
                domain_name: None,
            })
        })
        .transpose()?;
    Ok(Config {
        endpoints: args.endpoints.clone(),
        tls,
        token,
        features,
        heartbeat: Duration::from_millis(args.heartbeat_ms),
        stale_after: args.stale_after_ms.map(Duration::from_millis),
        cache_file: args.cache_file.clone(),
        vendor_public_key: args.vendor_public_key.clone(),
        ..Config::default()
    })
}

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        // Colours only on a terminal (not in the journal or a container log).
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let args = Args::parse();
    match run(&args).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("licensing-agent: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(args: &Args) -> Result<(), String> {
    let listen = listen_of(&args.listen)?;
    let client = Client::start(config(args)?).map_err(|e| e.to_string())?;
    let agent = Agent::new(client.clone(), Duration::from_millis(args.max_wait_ms));
    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_not_serving::<LicensingServiceServer<Agent>>()
        .await;
    // Health SERVING once a copy is held (from the stream or the cache file).
    let ready = client.clone();
    tokio::spawn(async move {
        ready.ready().await;
        health.set_serving::<LicensingServiceServer<Agent>>().await;
        tracing::info!(service = SERVICE_NAME, "a copy is held: serving");
    });
    // Reflection, so that grpcurl and other tools can call the agent as they call the service.
    let (reflection_v1, reflection_v1alpha) = comtrexx_licensing_proto::reflection_services(&[
        comtrexx_licensing_proto::FILE_DESCRIPTOR_SET,
    ])
    .map_err(|e| format!("reflection: {e}"))?;
    let router = tonic::transport::Server::builder()
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(LicensingServiceServer::new(agent));
    match listen {
        Listen::Tcp(addr) => {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|e| format!("listen on {addr}: {e}"))?;
            let local = listener.local_addr().map_err(|e| e.to_string())?;
            tracing::info!(listen = %local, "licensing-agent listening");
            router
                .serve_with_incoming_shutdown(
                    tokio_stream::wrappers::TcpListenerStream::new(listener),
                    shutdown_signal(),
                )
                .await
                .map_err(|e| format!("serve: {e}"))
        }
        Listen::Unix(path) => {
            // A socket left by a previous run (killed) is replaced.
            if std::fs::symlink_metadata(&path).is_ok_and(|m| {
                use std::os::unix::fs::FileTypeExt as _;
                m.file_type().is_socket()
            }) {
                let _ = std::fs::remove_file(&path);
            }
            let listener = tokio::net::UnixListener::bind(&path)
                .map_err(|e| format!("listen on unix:{}: {e}", path.display()))?;
            tracing::info!(listen = %format!("unix:{}", path.display()), "licensing-agent listening");
            let served = router
                .serve_with_incoming_shutdown(
                    tokio_stream::wrappers::UnixListenerStream::new(listener),
                    shutdown_signal(),
                )
                .await
                .map_err(|e| format!("serve: {e}"));
            let _ = std::fs::remove_file(&path);
            served
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listens_on_loopback_or_a_unix_socket_only() {
        assert!(matches!(listen_of("127.0.0.1:1"), Ok(Listen::Tcp(_))));
        assert!(matches!(listen_of("[::1]:1"), Ok(Listen::Tcp(_))));
        assert!(matches!(listen_of("unix:/tmp/a.sock"), Ok(Listen::Unix(_))));
        let e = listen_of("0.0.0.0:50061").err().unwrap();
        assert!(e.contains("loopback"), "{e}");
        assert!(listen_of("unix:").is_err());
        assert!(listen_of("localhost").is_err());
    }
}
