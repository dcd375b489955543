//! Metrics: Prometheus on its own port (`metrics_addr`, path `/metrics`), and the
//! same counters over OTLP when an OpenTelemetry endpoint is configured.
//!
//! Event counters (RPCs, reconciles, Redis errors) are process-wide; state gauges
//! (seats, capacity, tryout, staleness) are read from a replica's mirror at scrape
//! time, so they are never out of step with what `CheckSeat` answers.

use std::future::Future;
use std::sync::{Arc, LazyLock, OnceLock};
use std::time::Duration;

use chrono::Utc;
use opentelemetry::KeyValue;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};
use tokio::net::TcpListener;

use crate::domain::{ActivationState, Feature, ReconcileOutcome, SeatSource, TryoutState};
use crate::service::Licensing;

type Labels = Vec<(&'static str, String)>;

/// The process-wide event counters.
pub struct Metrics {
    rpc_requests: Family<Labels, Counter>,
    rpc_duration: Family<Labels, Histogram, fn() -> Histogram>,
    reconciles: Family<Labels, Counter>,
    redis_errors: Family<Labels, Counter>,
    // Repairs of a store that lost writes, by cause; the writes they restored or lost.
    store_repairs: Family<Labels, Counter>,
    repaired_writes: Family<Labels, Counter>,
    clock_rollbacks: Counter,
    corrupt_records: Counter,
    // The OTLP twins of the counters, once an OTLP endpoint is configured.
    otel: OnceLock<OtelInstruments>,
}

struct OtelInstruments {
    rpc_requests: opentelemetry::metrics::Counter<u64>,
    rpc_duration: opentelemetry::metrics::Histogram<f64>,
    reconciles: opentelemetry::metrics::Counter<u64>,
    redis_errors: opentelemetry::metrics::Counter<u64>,
}

fn rpc_histogram() -> Histogram {
    // 50 µs to about 1.6 s: CheckSeat lives at the bottom, writes near Redis's timeout.
    Histogram::new(exponential_buckets(0.000_05, 2.0, 16))
}

static METRICS: LazyLock<Metrics> = LazyLock::new(|| Metrics {
    rpc_requests: Family::default(),
    rpc_duration: Family::new_with_constructor(rpc_histogram),
    reconciles: Family::default(),
    redis_errors: Family::default(),
    store_repairs: Family::default(),
    repaired_writes: Family::default(),
    clock_rollbacks: Counter::default(),
    corrupt_records: Counter::default(),
    otel: OnceLock::new(),
});

/// The process-wide counters.
pub fn metrics() -> &'static Metrics {
    &METRICS
}

impl Metrics {
    /// Counts one finished RPC.
    pub fn rpc(&self, method: &'static str, code: &'static str, elapsed: Duration) {
        let labels = vec![("method", method.to_owned()), ("code", code.to_owned())];
        self.rpc_requests.get_or_create(&labels).inc();
        self.rpc_duration
            .get_or_create(&labels)
            .observe(elapsed.as_secs_f64());
        if let Some(otel) = self.otel.get() {
            let attrs = [KeyValue::new("method", method), KeyValue::new("code", code)];
            otel.rpc_requests.add(1, &attrs);
            otel.rpc_duration.record(elapsed.as_secs_f64(), &attrs);
        }
    }

    pub fn reconcile(&self, outcome: ReconcileOutcome) {
        let name = outcome_name(outcome);
        self.reconciles
            .get_or_create(&vec![("outcome", name.to_owned())])
            .inc();
        if let Some(otel) = self.otel.get() {
            otel.reconciles.add(1, &[KeyValue::new("outcome", name)]);
        }
    }

    /// Counts a Redis call that failed or timed out.
    pub fn redis_error(&self, operation: &'static str) {
        self.redis_errors
            .get_or_create(&vec![("operation", operation.to_owned())])
            .inc();
        if let Some(otel) = self.otel.get() {
            otel.redis_errors
                .add(1, &[KeyValue::new("operation", operation)]);
        }
    }

    /// Counts a repair of a store that lost writes (`cause`: `rolled_back`,
    /// `replaced`, `lost_epoch`) with the writes it restored and those it lost.
    pub fn store_repair(&self, cause: &'static str, restored: u32, lost: u32) {
        self.store_repairs
            .get_or_create(&vec![("cause", cause.to_owned())])
            .inc();
        for (result, n) in [("restored", restored), ("lost", lost)] {
            self.repaired_writes
                .get_or_create(&vec![("result", result.to_owned())])
                .inc_by(u64::from(n));
        }
    }

    /// Counts a node clock found behind the high-water clock.
    pub fn clock_rollback(&self) {
        self.clock_rollbacks.inc();
    }

    /// Counts a stored record that did not parse and was skipped.
    pub fn corrupt_record(&self) {
        self.corrupt_records.inc();
    }

    /// Creates the OTLP instruments from the global meter provider (call after
    /// installing it).
    pub fn enable_otel(&self) {
        let meter = opentelemetry::global::meter("comtrexx-licensing");
        let _ = self.otel.set(OtelInstruments {
            rpc_requests: meter.u64_counter("licensing.rpc.requests").build(),
            rpc_duration: meter
                .f64_histogram("licensing.rpc.duration")
                .with_unit("s")
                .build(),
            reconciles: meter.u64_counter("licensing.reconcile").build(),
            redis_errors: meter.u64_counter("licensing.redis.errors").build(),
        });
    }
}

fn outcome_name(o: ReconcileOutcome) -> &'static str {
    match o {
        ReconcileOutcome::Updated => "updated",
        ReconcileOutcome::Unchanged => "unchanged",
        ReconcileOutcome::Unreachable => "unreachable",
        ReconcileOutcome::Rejected => "rejected",
    }
}

/// One gauge sample.
struct Sample {
    name: &'static str,
    help: &'static str,
    labels: Labels,
    value: f64,
}

/// The state gauges of one replica, computed from its mirror.
fn state_samples(licensing: &Licensing) -> Vec<Sample> {
    let overview = licensing.overview();
    let mirror = licensing.mirror();
    let mut samples = Vec::new();
    for feature in Feature::SEATS {
        for source in [SeatSource::Purchased, SeatSource::Tryout] {
            let in_use = mirror.read(|s| s.count(feature, source));
            samples.push(Sample {
                name: "licensing_seats_in_use",
                help: "Seats held, by feature and source",
                labels: vec![
                    ("feature", feature.to_string()),
                    ("source", source.as_str().to_owned()),
                ],
                value: f64::from(in_use),
            });
        }
        let purchased = overview
            .entitlements
            .iter()
            .find(|e| e.entitlement.feature == feature && e.entitlement.is_current(Utc::now()))
            .map_or(0, |e| e.entitlement.quantity);
        let tryout = if feature == Feature::User && overview.tryout.state == TryoutState::Active {
            overview.tryout.seats_total
        } else {
            0
        };
        for (source, capacity) in [
            (SeatSource::Purchased, purchased),
            (SeatSource::Tryout, tryout),
        ] {
            samples.push(Sample {
                name: "licensing_seats_capacity",
                help: "Seats that can be held, by feature and source",
                labels: vec![
                    ("feature", feature.to_string()),
                    ("source", source.as_str().to_owned()),
                ],
                value: f64::from(capacity),
            });
        }
    }
    samples.push(Sample {
        name: "licensing_tryout_days_remaining",
        help: "Whole days left in the tryout (0 unless active)",
        labels: Vec::new(),
        value: f64::from(overview.tryout.days_remaining),
    });
    let grace_days = overview.activation.grace_ends_at.map_or(0.0, |end| {
        ((end - Utc::now()).num_seconds().max(0) as f64 / 86_400.0).ceil()
    });
    samples.push(Sample {
        name: "licensing_grace_days_remaining",
        help: "Days left before activation lapses while the license source is unreachable (0 when not in grace)",
        labels: Vec::new(),
        value: grace_days,
    });
    samples.push(Sample {
        name: "licensing_activated",
        help: "1 when a trusted license is applied (and system activation held where needed)",
        labels: Vec::new(),
        value: f64::from(u8::from(
            matches!(
                overview.activation.state,
                ActivationState::Active | ActivationState::Grace
            ) && overview.system_activated,
        )),
    });
    samples.push(Sample {
        name: "licensing_mirror_stale",
        help: "1 when CheckSeat answers from a copy that may be out of date (store unreachable)",
        labels: Vec::new(),
        value: f64::from(u8::from(mirror.is_stale())),
    });
    samples.push(Sample {
        name: "licensing_mirror_staleness_seconds",
        help: "Seconds since the seat store last answered this replica",
        labels: Vec::new(),
        value: mirror.seconds_since_contact().unwrap_or(f64::INFINITY),
    });
    samples
}

/// Encodes a replica's state gauges at scrape time.
#[derive(Clone)]
struct StateCollector {
    licensing: Arc<Licensing>,
}

impl std::fmt::Debug for StateCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StateCollector")
    }
}

impl Collector for StateCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let samples = state_samples(&self.licensing);
        let mut i = 0;
        while i < samples.len() {
            let name = samples[i].name;
            let mut family =
                encoder.encode_descriptor(name, samples[i].help, None, MetricType::Gauge)?;
            while i < samples.len() && samples[i].name == name {
                let gauge = ConstGauge::new(samples[i].value);
                gauge.encode(family.encode_family(&samples[i].labels)?)?;
                i += 1;
            }
        }
        Ok(())
    }
}

/// The Redis operations the store names in `licensing_redis_errors_total`; their
/// counters start at 0 so that rate alerts work before the first error.
const REDIS_OPERATIONS: [&str; 15] = [
    "snapshot",
    "feed_connect",
    "feed_read",
    "feed_position",
    "assign",
    "release",
    "list",
    "cas_tryout",
    "apply_license",
    "record_reconcile",
    "restore",
    "config_get",
    "history",
    "repair",
    "clock",
];

/// The registry a replica's `/metrics` serves.
pub fn registry(licensing: Arc<Licensing>) -> Registry {
    let m = metrics();
    for op in REDIS_OPERATIONS {
        m.redis_errors
            .get_or_create(&vec![("operation", op.to_owned())])
            .inc_by(0);
    }
    for outcome in [
        ReconcileOutcome::Updated,
        ReconcileOutcome::Unchanged,
        ReconcileOutcome::Unreachable,
        ReconcileOutcome::Rejected,
    ] {
        m.reconciles
            .get_or_create(&vec![("outcome", outcome_name(outcome).to_owned())])
            .inc_by(0);
    }
    for cause in ["rolled_back", "replaced", "lost_epoch"] {
        m.store_repairs
            .get_or_create(&vec![("cause", cause.to_owned())])
            .inc_by(0);
    }
    for result in ["restored", "lost"] {
        m.repaired_writes
            .get_or_create(&vec![("result", result.to_owned())])
            .inc_by(0);
    }
    let mut registry = Registry::default();
    registry.register(
        "licensing_rpc_requests",
        "Finished RPCs by method and gRPC status code",
        m.rpc_requests.clone(),
    );
    registry.register_with_unit(
        "licensing_rpc_duration",
        "RPC latency by method and gRPC status code",
        Unit::Seconds,
        m.rpc_duration.clone(),
    );
    registry.register(
        "licensing_reconcile",
        "Reconciles by outcome",
        m.reconciles.clone(),
    );
    registry.register(
        "licensing_redis_errors",
        "Redis calls that failed or timed out, by operation",
        m.redis_errors.clone(),
    );
    registry.register(
        "licensing_store_repairs",
        "Repairs of a seat store that lost writes (restarted empty or from an older snapshot, flushed, failed over), by cause",
        m.store_repairs.clone(),
    );
    registry.register(
        "licensing_repaired_writes",
        "Acknowledged writes a repair wrote back (restored) or could not (lost)",
        m.repaired_writes.clone(),
    );
    registry.register(
        "licensing_clock_rollbacks",
        "Times this node's clock was found behind the high-water clock",
        m.clock_rollbacks.clone(),
    );
    registry.register(
        "licensing_corrupt_records",
        "Stored records that did not parse and were skipped",
        m.corrupt_records.clone(),
    );
    registry.register_collector(Box::new(StateCollector { licensing }));
    registry
}

/// Registers OTLP observable gauges for a replica's state.
pub fn register_otel_gauges(licensing: Arc<Licensing>) {
    let meter = opentelemetry::global::meter("comtrexx-licensing");
    // The callback stays registered with the meter provider; the handle is only a marker.
    let _ = meter
        .f64_observable_gauge("licensing.state")
        .with_description("Replica state gauges (the Prometheus gauges, by name)")
        .with_callback(move |observer| {
            for s in state_samples(&licensing) {
                let mut attrs: Vec<KeyValue> = s
                    .labels
                    .iter()
                    .map(|(k, v)| KeyValue::new(*k, v.clone()))
                    .collect();
                attrs.push(KeyValue::new("name", s.name));
                if s.value.is_finite() {
                    observer.observe(s.value, &attrs);
                }
            }
        })
        .build();
}

/// Serves `/metrics` on `listener` until `shutdown`.
pub async fn serve(
    listener: TcpListener,
    registry: Registry,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    use axum::http::header::CONTENT_TYPE;
    let registry = Arc::new(registry);
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let registry = registry.clone();
            async move {
                let mut body = String::new();
                match prometheus_client::encoding::text::encode(&mut body, &registry) {
                    Ok(()) => (
                        axum::http::StatusCode::OK,
                        [(
                            CONTENT_TYPE,
                            "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        )],
                        body,
                    ),
                    Err(_) => (
                        axum::http::StatusCode::INTERNAL_SERVER_ERROR,
                        [(CONTENT_TYPE, "text/plain; charset=utf-8")],
                        "encode metrics failed\n".to_owned(),
                    ),
                }
            }
        }),
    );
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}
