//! The service binary as a process, configured the way a deployment configures it:
//! Kubernetes' service-link variables, and OTLP export to a real OTLP/gRPC receiver
//! (in-process, the collector stubs of `opentelemetry-proto`) with quiet logs.

mod common;

use std::collections::HashMap;
use std::io::Read as _;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{eventually, eventually_blocking, eventually_some, unused_port};
use comtrexx_licensing::grpc::pb;
use comtrexx_licensing::grpc::pb::licensing_service_client::LicensingServiceClient;
use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_server::{
    MetricsService, MetricsServiceServer,
};
use opentelemetry_proto::tonic::collector::metrics::v1::{
    ExportMetricsServiceRequest, ExportMetricsServiceResponse,
};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::trace::v1::Span;
use tonic::transport::Channel;

const BIN: &str = env!("CARGO_BIN_EXE_comtrexx-licensing");

/// The service process, killed on drop; its stdout and stderr are collected.
struct Service {
    child: Child,
    output: Arc<Mutex<String>>,
    /// The threads that copy stdout and stderr into `output`.
    readers: Vec<std::thread::JoinHandle<()>>,
    grpc: u16,
}

impl Service {
    /// Starts the binary with exactly `env` (no inherited `LICENSING_*`).
    fn start(env: &[(&str, String)]) -> Self {
        let grpc = unused_port();
        let mut cmd = Command::new(BIN);
        cmd.arg("serve")
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("LICENSING_LISTEN_ADDR", format!("127.0.0.1:{grpc}"))
            .env("LICENSING_METRICS_ADDR", "")
            .env("LICENSING_DRAIN_TIMEOUT_MS", "0")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("start the service binary");
        let output = Arc::new(Mutex::new(String::new()));
        let mut readers = Vec::new();
        for pipe in [
            child
                .stdout
                .take()
                .map(|p| Box::new(p) as Box<dyn std::io::Read + Send>),
            child
                .stderr
                .take()
                .map(|p| Box::new(p) as Box<dyn std::io::Read + Send>),
        ]
        .into_iter()
        .flatten()
        {
            let output = output.clone();
            readers.push(std::thread::spawn(move || {
                let mut pipe = pipe;
                let mut buf = [0u8; 4096];
                while let Ok(n) = pipe.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    output
                        .lock()
                        .unwrap()
                        .push_str(&String::from_utf8_lossy(&buf[..n]));
                }
            }));
        }
        Self {
            child,
            output,
            readers,
            grpc,
        }
    }

    fn output(&self) -> String {
        self.output.lock().unwrap().clone()
    }

    /// Connects once the service answers (bounded); panics with its output if it
    /// exited or never answered.
    async fn client(&mut self) -> LicensingServiceClient<Channel> {
        let endpoint = format!("http://127.0.0.1:{}", self.grpc);
        let client = eventually_some(Duration::from_secs(60), || {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("the service exited ({status}):\n{}", self.output());
            }
            let endpoint = endpoint.clone();
            async move { LicensingServiceClient::connect(endpoint).await.ok() }
        })
        .await;
        client
            .unwrap_or_else(|| panic!("the service did not answer within 60 s:\n{}", self.output()))
    }

    /// Waits (bounded) for the process to exit; its status code.
    fn exit_code(&mut self) -> Option<i32> {
        let mut code = None;
        let exited = eventually_blocking(Duration::from_secs(30), || {
            let status = self.child.try_wait().ok().flatten();
            code = status.map(|s| s.code());
            status.is_some()
        });
        assert!(exited, "{}", self.output());
        // The output is whole once its readers saw the pipes close.
        for reader in self.readers.drain(..) {
            let _ = reader.join();
        }
        code.flatten()
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What Kubernetes injects into every pod of the namespace for a Service named
/// `licensing-comtrexx-licensing` (the chart's release `licensing`) with ports
/// `grpc` 50051 and `metrics` 9090.
fn service_link_variables() -> Vec<(&'static str, String)> {
    let p = "LICENSING_COMTREXX_LICENSING";
    let vars = [
        ("SERVICE_HOST", "10.96.12.34"),
        ("SERVICE_PORT", "50051"),
        ("SERVICE_PORT_GRPC", "50051"),
        ("SERVICE_PORT_METRICS", "9090"),
        ("PORT", "tcp://10.96.12.34:50051"),
        ("PORT_50051_TCP", "tcp://10.96.12.34:50051"),
        ("PORT_50051_TCP_PROTO", "tcp"),
        ("PORT_50051_TCP_PORT", "50051"),
        ("PORT_50051_TCP_ADDR", "10.96.12.34"),
        ("PORT_9090_TCP", "tcp://10.96.12.34:9090"),
        ("PORT_9090_TCP_PROTO", "tcp"),
        ("PORT_9090_TCP_PORT", "9090"),
        ("PORT_9090_TCP_ADDR", "10.96.12.34"),
    ];
    vars.iter()
        .map(|(k, v)| {
            let name: &'static str = Box::leak(format!("{p}_{k}").into_boxed_str());
            (name, (*v).to_owned())
        })
        .collect()
}

#[tokio::test]
async fn kubernetes_service_links_do_not_stop_the_service() {
    let mut env = service_link_variables();
    env.push(("LICENSING_LOG__LEVEL", "debug".into()));
    env.push(("LICENSING_SERIAL_NUMBER", "K8S-LINKS-1".into()));
    let mut service = Service::start(&env);
    let mut client = service.client().await;
    let answer = client
        .check_seat(pb::CheckSeatRequest {
            user_id: "alice".into(),
            feature: String::new(),
            ..Default::default()
        })
        .await
        .expect("the service serves with service-link variables set");
    assert!(!answer.into_inner().licensed);
    // Each ignored variable is named in a debug line.
    for (name, _) in service_link_variables() {
        assert!(
            eventually(Duration::from_secs(10), || async {
                service
                    .output()
                    .lines()
                    .any(|l| l.contains("service-link") && l.contains(name))
            })
            .await,
            "no debug line for {name}:\n{}",
            service.output()
        );
    }
}

#[tokio::test]
async fn other_unknown_variables_still_fail_naming_the_variable() {
    let mut env = service_link_variables();
    env.push(("LICENSING_SERIAL_NUMBR", "typo".into()));
    let mut service = Service::start(&env);
    assert_ne!(service.exit_code(), Some(0));
    let output = service.output();
    assert!(output.contains("LICENSING_SERIAL_NUMBR"), "{output}");
}

/// The stderr of `serve` with exactly `env`, which must fail at start.
fn start_failure(env: &[(&str, &str)]) -> String {
    let output = Command::new(BIN)
        .arg("serve")
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("LICENSING_LISTEN_ADDR", "127.0.0.1:0")
        .env("LICENSING_METRICS_ADDR", "")
        .envs(env.iter().copied())
        .output()
        .expect("run the service binary");
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(!output.status.success(), "started with {env:?}:\n{stderr}");
    stderr
}

#[test]
fn configuration_errors_say_what_is_wrong_and_how_to_fix_it() {
    let stderr = start_failure(&[("LICENSING_SERIAL_NUMEBR", "X-1")]);
    assert!(
        stderr.contains("unknown environment variable `LICENSING_SERIAL_NUMEBR`"),
        "{stderr}"
    );
    assert!(
        stderr.contains("did you mean `LICENSING_SERIAL_NUMBER`?"),
        "{stderr}"
    );
    assert!(stderr.contains("`__`"), "{stderr}");
    assert!(!stderr.contains("Caused by"), "printed twice:\n{stderr}");

    let stderr = start_failure(&[("LICENSING_LISTEN_ADDR", "50051")]);
    assert!(
        stderr.contains("`listen_addr` must be HOST:PORT, e.g. 0.0.0.0:50051"),
        "{stderr}"
    );

    let stderr = start_failure(&[("LICENSING_CONFIG", "nope.toml")]);
    assert!(
        stderr.contains("cannot read --config nope.toml: No such file or directory"),
        "{stderr}"
    );

    let stderr = start_failure(&[("LICENSING_SERIAL_NUMBER", "AB C")]);
    assert!(stderr.contains("\"AB C\""), "{stderr}");
    assert!(stderr.contains("' ' (at position 3)"), "{stderr}");

    // Enforce without callers would refuse every call: refused at start instead.
    let stderr = start_failure(&[("LICENSING_AUTH__MODE", "enforce")]);
    for needed in [
        "`auth.callers_file`",
        "LICENSING_AUTH__CALLERS_FILE",
        "comtrexx-licensing auth token --name NAME --role ROLE",
    ] {
        assert!(stderr.contains(needed), "{needed} not in:\n{stderr}");
    }

    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("c.toml");
    std::fs::write(&file, "[log]\nlevel = \"info\"\nedition = \"business\"\n").unwrap();
    let stderr = start_failure(&[("LICENSING_CONFIG", file.to_str().unwrap())]);
    assert!(stderr.contains("unknown key `log.edition`"), "{stderr}");
    assert!(
        stderr.contains("top-level keys must come before the first `[section]`"),
        "{stderr}"
    );
}

/// `grpcurl -plaintext` against the TLS port: the client is told at once (an
/// HTTP/2 GOAWAY saying the port speaks TLS, then the connection closes) instead
/// of waiting, and the service logs a warning saying how to connect, at most
/// once per 10 s however many such clients come.
#[tokio::test]
async fn a_plaintext_http2_client_on_the_tls_port_is_named_in_the_log() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
    const WARNING: &str = "a plaintext HTTP/2 client connected to the TLS port";

    let pki = common::pki::Pki::new("plaintext CA");
    let (cert, key) = pki.write_server(&pki.server("server"));
    let service = Service::start(&[
        ("LICENSING_TLS__CERT_FILE", cert.display().to_string()),
        ("LICENSING_TLS__KEY_FILE", key.display().to_string()),
    ]);
    let addr = format!("127.0.0.1:{}", service.grpc);
    // What a plaintext client reads back, within 5 s (a hang fails the test).
    let plaintext_client = || {
        let addr = addr.clone();
        async move {
            let mut stream = tokio::net::TcpStream::connect(&addr).await.ok()?;
            stream.write_all(PREFACE).await.ok()?;
            let mut answer = Vec::new();
            tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut answer))
                .await
                .expect("the server answers a plaintext client at once")
                .ok()?;
            Some(answer)
        }
    };
    let answer = eventually_some(Duration::from_secs(60), &plaintext_client)
        .await
        .unwrap_or_else(|| panic!("the service never answered:\n{}", service.output()));
    let text = String::from_utf8_lossy(&answer);
    assert!(
        text.contains("this port speaks TLS: connect with TLS"),
        "the GOAWAY's debug data: {answer:?}"
    );
    assert!(
        eventually(Duration::from_secs(10), || async {
            service.output().contains(WARNING)
        })
        .await,
        "no warning:\n{}",
        service.output()
    );
    let output = service.output();
    let line = output.lines().find(|l| l.contains(WARNING)).unwrap();
    assert!(line.contains("leave out -plaintext"), "{line}");
    assert!(line.contains("-cacert"), "{line}");
    assert!(line.contains("suppressed=0"), "{line}");

    // More clients within 10 s: answered the same, not logged again.
    for _ in 0..5 {
        plaintext_client().await.expect("answered");
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        service.output().matches(WARNING).count(),
        1,
        "{}",
        service.output()
    );
}

/// An OTLP/gRPC receiver: the spans and metric names it was sent.
#[derive(Clone, Default)]
struct Receiver {
    spans: Arc<Mutex<Vec<Span>>>,
    metrics: Arc<Mutex<Vec<String>>>,
}

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut spans = self.spans.lock().unwrap();
        for resource in request.into_inner().resource_spans {
            for scope in resource.scope_spans {
                spans.extend(scope.spans);
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

#[tonic::async_trait]
impl MetricsService for Receiver {
    async fn export(
        &self,
        request: tonic::Request<ExportMetricsServiceRequest>,
    ) -> Result<tonic::Response<ExportMetricsServiceResponse>, tonic::Status> {
        let mut names = self.metrics.lock().unwrap();
        for resource in request.into_inner().resource_metrics {
            for scope in resource.scope_metrics {
                names.extend(scope.metrics.into_iter().map(|m| m.name));
            }
        }
        Ok(tonic::Response::new(ExportMetricsServiceResponse::default()))
    }
}

impl Receiver {
    /// Starts the receiver on a free loopback port; its endpoint.
    async fn start(&self) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let router = tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(self.clone()))
            .add_service(MetricsServiceServer::new(self.clone()));
        tokio::spawn(
            router.serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        format!("http://{addr}")
    }

    /// The attributes of the spans received so far whose trace id is `trace_id`.
    fn spans_of(&self, trace_id: &[u8]) -> Vec<(String, HashMap<String, String>)> {
        self.spans
            .lock()
            .unwrap()
            .iter()
            .filter(|s| s.trace_id == trace_id)
            .map(|s| (s.name.clone(), attributes(s)))
            .collect()
    }
}

fn attributes(span: &Span) -> HashMap<String, String> {
    span.attributes
        .iter()
        .filter_map(|kv| match kv.value.as_ref()?.value.as_ref()? {
            Value::StringValue(v) => Some((kv.key.clone(), v.clone())),
            other => Some((kv.key.clone(), format!("{other:?}"))),
        })
        .collect()
}

/// A W3C traceparent with a fresh trace id (sampled); the trace id's bytes.
fn traceparent() -> (String, Vec<u8>) {
    let trace = rand::random::<u128>() | 1;
    let parent = rand::random::<u64>() | 1;
    (
        format!("00-{trace:032x}-{parent:016x}-01"),
        trace.to_be_bytes().to_vec(),
    )
}

async fn check_seat(
    client: &mut LicensingServiceClient<Channel>,
    user: &str,
    traceparent: Option<&str>,
) {
    let mut request = tonic::Request::new(pb::CheckSeatRequest {
        user_id: user.into(),
        feature: String::new(),
        ..Default::default()
    });
    if let Some(tp) = traceparent {
        request
            .metadata_mut()
            .insert("traceparent", tp.parse().unwrap());
    }
    client.check_seat(request).await.unwrap();
}

#[tokio::test]
async fn otlp_exports_spans_and_metrics_with_log_level_warn() {
    let receiver = Receiver::default();
    let endpoint = receiver.start().await;
    let serial = format!("OTLP-{:08X}", rand::random::<u32>());
    let mut service = Service::start(&[
        ("LICENSING_OTLP_ENDPOINT", endpoint),
        ("LICENSING_LOG__LEVEL", "warn".into()),
        ("LICENSING_SERIAL_NUMBER", serial.clone()),
        // New traces are never sampled: only a caller's sampled trace is exported.
        ("LICENSING_TRACE__SAMPLING_RATIO", "0.0".into()),
        // Export promptly (milliseconds), so the test waits for seconds at most.
        ("OTEL_BSP_SCHEDULE_DELAY", "100".into()),
        ("OTEL_METRIC_EXPORT_INTERVAL", "200".into()),
    ]);
    let mut client = service.client().await;

    let (tp, trace_id) = traceparent();
    check_seat(&mut client, "traced-1", Some(&tp)).await;
    assert!(
        eventually(Duration::from_secs(30), || async {
            !receiver.spans_of(&trace_id).is_empty()
        })
        .await,
        "no span with the caller's trace id arrived"
    );
    let spans = receiver.spans_of(&trace_id);
    let (name, attrs) = &spans[0];
    assert_eq!(name, "CheckSeat");
    assert_eq!(attrs.get("rpc").map(String::as_str), Some("CheckSeat"));
    assert_eq!(attrs.get("serial_number"), Some(&serial));
    assert_eq!(attrs.get("user_id").map(String::as_str), Some("traced-1"));

    // Without a traceparent, ratio 0 samples nothing; a later traced call arriving
    // proves the untraced one (exported first, if at all) was not.
    check_seat(&mut client, "untraced", None).await;
    let (tp, trace_id) = traceparent();
    check_seat(&mut client, "traced-2", Some(&tp)).await;
    assert!(
        eventually(Duration::from_secs(30), || async {
            !receiver.spans_of(&trace_id).is_empty()
        })
        .await
    );
    let untraced = receiver
        .spans
        .lock()
        .unwrap()
        .iter()
        .filter(|s| attributes(s).get("user_id").map(String::as_str) == Some("untraced"))
        .count();
    assert_eq!(untraced, 0, "an unsampled root span was exported");

    // Metrics arrive: the RPC counter and the state gauges.
    assert!(
        eventually(Duration::from_secs(30), || async {
            let names = receiver.metrics.lock().unwrap();
            ["licensing.rpc.requests", "licensing.state"]
                .iter()
                .all(|m| names.iter().any(|n| n == m))
        })
        .await,
        "metrics did not arrive: {:?}",
        receiver.metrics.lock().unwrap()
    );
    // The log level is in force: no info line was written.
    let output = service.output();
    assert!(
        !output.contains(" INFO ") && !output.contains("serving gRPC"),
        "{output}"
    );
}
