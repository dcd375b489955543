//! Logs (text or JSON, in the journal's form under systemd) through `tracing`;
//! traces and metrics over OTLP when an OpenTelemetry endpoint is configured
//! (`otlp_endpoint` or `OTEL_EXPORTER_OTLP_ENDPOINT`), nothing exported otherwise.
//! W3C trace context from incoming calls becomes the parent of each RPC's span.

use anyhow::Context as _;
use opentelemetry::propagation::Extractor;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig as _;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::metrics::SdkMeterProvider;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider};
use tracing_opentelemetry::OpenTelemetrySpanExt as _;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;

use crate::journal::LogFormat;

/// Keeps the exporters; `shutdown` flushes what is buffered.
#[derive(Default)]
pub struct Telemetry {
    tracer: Option<SdkTracerProvider>,
    meter: Option<SdkMeterProvider>,
}

impl Telemetry {
    pub fn otel_enabled(&self) -> bool {
        self.meter.is_some()
    }

    pub fn shutdown(self) {
        if let Some(t) = self.tracer {
            let _ = t.shutdown();
        }
        if let Some(m) = self.meter {
            let _ = m.shutdown();
        }
    }
}

/// What logs and traces are written with (`log.*`, `trace.*`, `otlp_endpoint`).
#[derive(Debug, Clone)]
pub struct Options {
    pub log_format: LogFormat,
    /// `log.level`: a level or an `EnvFilter` directive; `RUST_LOG` overrides it.
    pub log_level: String,
    /// Which spans are exported (independent of `log_level`).
    pub trace_level: String,
    /// Parent-based sampling ratio of new traces.
    pub trace_sampling_ratio: f64,
    /// The OTLP/gRPC endpoint of traces and metrics; `None`: none exported.
    pub otlp_endpoint: Option<String>,
}

/// Installs the global subscriber (and, with an endpoint, the OTLP exporters).
/// Must run inside the Tokio runtime. Each layer has its own filter: `RUST_LOG`
/// (else `log.level`) for the log lines, `trace.level` for the exported spans, so
/// quiet logs do not switch tracing off.
pub fn init(config: &Options) -> anyhow::Result<Telemetry> {
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    let log_filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(&config.log_level));
    // Colours only for a person at a terminal, never in collected logs.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stdout());
    let fmt = match config.log_format {
        format if crate::journal::connected() => crate::journal::layer(format),
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .boxed(),
        LogFormat::Text => tracing_subscriber::fmt::layer().with_ansi(ansi).boxed(),
    };
    let mut telemetry = Telemetry::default();
    let otel_layer = match &config.otlp_endpoint {
        None => None,
        Some(endpoint) => {
            let resource = Resource::builder()
                .with_service_name(
                    std::env::var("OTEL_SERVICE_NAME")
                        .unwrap_or_else(|_| "comtrexx-licensing".into()),
                )
                .build();
            let spans = opentelemetry_otlp::SpanExporter::builder()
                .with_tonic()
                .with_endpoint(endpoint)
                .build()
                .context("build OTLP span exporter")?;
            // New traces are sampled at the configured ratio; a caller's decision
            // (the sampled flag of its traceparent) is followed.
            let sampler = Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
                config.trace_sampling_ratio,
            )));
            let tracer = SdkTracerProvider::builder()
                .with_sampler(sampler)
                .with_batch_exporter(spans)
                .with_resource(resource.clone())
                .build();
            let metrics = opentelemetry_otlp::MetricExporter::builder()
                .with_tonic()
                .with_endpoint(endpoint)
                .build()
                .context("build OTLP metric exporter")?;
            let meter = SdkMeterProvider::builder()
                .with_periodic_exporter(metrics)
                .with_resource(resource)
                .build();
            opentelemetry::global::set_meter_provider(meter.clone());
            crate::metrics::metrics().enable_otel();
            let layer = tracing_opentelemetry::layer()
                .with_tracer(tracer.tracer("comtrexx-licensing"))
                .with_filter(EnvFilter::new(&config.trace_level));
            telemetry.tracer = Some(tracer);
            telemetry.meter = Some(meter);
            Some(layer)
        }
    };
    tracing_subscriber::registry()
        .with(fmt.with_filter(log_filter))
        .with(otel_layer)
        .try_init()
        .context("install the log subscriber")?;
    Ok(telemetry)
}

use tracing_subscriber::Layer as _;

/// Reads W3C `traceparent`/`tracestate` from gRPC metadata.
struct MetadataExtractor<'a>(&'a tonic::metadata::MetadataMap);

impl Extractor for MetadataExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0
            .keys()
            .filter_map(|k| match k {
                tonic::metadata::KeyRef::Ascii(k) => Some(k.as_str()),
                tonic::metadata::KeyRef::Binary(_) => None,
            })
            .collect()
    }
}

/// Makes the caller's trace (if it sent one) the parent of `span`.
pub fn set_remote_parent(span: &tracing::Span, metadata: &tonic::metadata::MetadataMap) {
    if metadata.get("traceparent").is_none() {
        return;
    }
    let parent =
        opentelemetry::global::get_text_map_propagator(|p| p.extract(&MetadataExtractor(metadata)));
    let _ = span.set_parent(parent);
}

/// The trace id of a call, for the audit trail: the span's when traces are
/// exported, else the one in the caller's `traceparent` header; empty if none.
pub fn trace_id(span: &tracing::Span, traceparent: Option<&str>) -> String {
    use opentelemetry::trace::TraceContextExt as _;
    let context = span.context();
    let span_context = context.span().span_context().clone();
    if span_context.is_valid() {
        return span_context.trace_id().to_string();
    }
    traceparent
        .and_then(traceparent_trace_id)
        .unwrap_or_default()
}

/// The trace id of a W3C `traceparent` (`00-<32 hex>-<16 hex>-<2 hex>`).
pub fn traceparent_trace_id(value: &str) -> Option<String> {
    let mut parts = value.split('-');
    let (_version, trace) = (parts.next()?, parts.next()?);
    (trace.len() == 32 && trace.bytes().all(|b| b.is_ascii_hexdigit()) && trace != "0".repeat(32))
        .then(|| trace.to_ascii_lowercase())
}
