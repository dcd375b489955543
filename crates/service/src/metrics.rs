//! Metrics: Prometheus on its own port (`metrics_addr`, path `/metrics`), and the
//! same counters over OTLP when an OpenTelemetry endpoint is configured.
//!
//! Event counters (RPCs, reconciles, Redis errors) are process-wide; state gauges
//! (seats, capacity, tryout, staleness) are read from a replica's mirror at scrape
//! time, so they are never out of step with what `CheckSeat` answers.

use std::collections::HashMap;
use std::sync::{LazyLock, OnceLock};
use std::time::Duration;

use opentelemetry::KeyValue;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};

use crate::domain::ReconcileOutcome;

/// The labels of one series.
pub type Labels = Vec<(&'static str, String)>;

/// An RPC's method and status code, as its metrics label it.
type RpcKey = (&'static str, &'static str);

/// The process-wide event counters.
pub struct Metrics {
    rpc_requests: Family<Labels, Counter>,
    rpc_duration: Family<Labels, Histogram, fn() -> Histogram>,
    // The two series of each (method, code) seen so far, so that counting an RPC
    // (every CheckSeat) neither allocates labels nor looks them up in both families.
    rpc_series: parking_lot::RwLock<HashMap<RpcKey, (Counter, Histogram)>>,
    reconciles: Family<Labels, Counter>,
    redis_errors: Family<Labels, Counter>,
    redis_master_lookups: Family<Labels, Counter>,
    redis_unconfirmed_writes: Counter,
    limits: LimitMetrics,
    // Repairs of a store that lost writes, by cause; the writes they restored or lost.
    store_repairs: Family<Labels, Counter>,
    repaired_writes: Family<Labels, Counter>,
    clock_rollbacks: Counter,
    clock_skews: Counter,
    corrupt_records: Counter,
    // State files that could not be read (ignored) or written, by operation.
    state_file_failures: Family<Labels, Counter>,
    // Lease acquisitions refused because a concurrent feature was at capacity,
    // by feature (this replica's; sum over replicas).
    lease_busy: Family<Labels, Counter>,
    // The OTLP twins of the counters, once an OTLP endpoint is configured.
    otel: OnceLock<OtelInstruments>,
}

struct OtelInstruments {
    rpc_requests: opentelemetry::metrics::Counter<u64>,
    rpc_duration: opentelemetry::metrics::Histogram<f64>,
    reconciles: opentelemetry::metrics::Counter<u64>,
    redis_errors: opentelemetry::metrics::Counter<u64>,
    redis_master_lookups: opentelemetry::metrics::Counter<u64>,
    redis_unconfirmed_writes: opentelemetry::metrics::Counter<u64>,
}

fn rpc_histogram() -> Histogram {
    // 50 µs to about 1.6 s: CheckSeat lives at the bottom, writes near Redis's timeout.
    Histogram::new(exponential_buckets(0.000_05, 2.0, 16))
}

static METRICS: LazyLock<Metrics> = LazyLock::new(|| Metrics {
    rpc_requests: Family::default(),
    rpc_duration: Family::new_with_constructor(rpc_histogram),
    rpc_series: parking_lot::RwLock::default(),
    reconciles: Family::default(),
    redis_errors: Family::default(),
    redis_master_lookups: Family::default(),
    redis_unconfirmed_writes: Counter::default(),
    limits: LimitMetrics::default(),
    store_repairs: Family::default(),
    repaired_writes: Family::default(),
    clock_rollbacks: Counter::default(),
    clock_skews: Counter::default(),
    corrupt_records: Counter::default(),
    state_file_failures: Family::default(),
    lease_busy: Family::default(),
    otel: OnceLock::new(),
});

/// The process-wide counters.
pub fn metrics() -> &'static Metrics {
    &METRICS
}

impl Metrics {
    /// Counts one finished RPC.
    pub fn rpc(&self, method: &'static str, code: &'static str, elapsed: Duration) {
        let seconds = elapsed.as_secs_f64();
        let known = self
            .rpc_series
            .read()
            .get(&(method, code))
            .map(|(count, duration)| {
                count.inc();
                duration.observe(seconds);
            });
        if known.is_none() {
            let labels = vec![("method", method.to_owned()), ("code", code.to_owned())];
            let count = self.rpc_requests.get_or_create(&labels).clone();
            let duration = self.rpc_duration.get_or_create(&labels).clone();
            count.inc();
            duration.observe(seconds);
            self.rpc_series
                .write()
                .insert((method, code), (count, duration));
        }
        if let Some(otel) = self.otel.get() {
            let attrs = [KeyValue::new("method", method), KeyValue::new("code", code)];
            otel.rpc_requests.add(1, &attrs);
            otel.rpc_duration.record(seconds, &attrs);
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

    /// Counts one question to the Sentinels for the master, by whether one was found.
    pub fn redis_master_lookup(&self, found: bool) {
        let outcome = if found { "found" } else { "failed" };
        self.redis_master_lookups
            .get_or_create(&vec![("outcome", outcome.to_owned())])
            .inc();
        if let Some(otel) = self.otel.get() {
            otel.redis_master_lookups
                .add(1, &[KeyValue::new("outcome", outcome)]);
        }
    }

    /// Counts a write that `WAIT` confirmed on fewer replicas than required.
    pub fn redis_unconfirmed_write(&self) {
        self.redis_unconfirmed_writes.inc();
        if let Some(otel) = self.otel.get() {
            otel.redis_unconfirmed_writes.add(1, &[]);
        }
    }

    /// Counts a call refused by a limit (`limits`), by method and reason.
    pub fn refused(&self, method: &str, reason: &'static str) {
        self.limits
            .refused
            .get_or_create(&vec![
                ("method", method.to_owned()),
                ("reason", reason.to_owned()),
            ])
            .inc();
    }

    /// Moves the number of open `WatchLicenseEvents` streams.
    pub fn watch_subscribers(&self, delta: i64) {
        self.limits.watch_subscribers.inc_by(delta);
    }

    /// Moves the number of open gRPC connections (handshakes included).
    pub fn connections_open(&self, delta: i64) {
        self.limits.connections_open.inc_by(delta);
    }

    /// Counts a connection closed by a limit (`limits::ConnectionRefusal`).
    pub fn connection_refused(&self, reason: &'static str) {
        self.limits
            .connections_refused
            .get_or_create(&vec![("reason", reason.to_owned())])
            .inc();
    }

    /// Starts the series of each reason a connection can be closed for at 0,
    /// so that rate alerts work before the first refusal.
    pub fn connection_refusal_reasons(&self, reasons: impl IntoIterator<Item = &'static str>) {
        for reason in reasons {
            self.limits
                .connections_refused
                .get_or_create(&vec![("reason", reason.to_owned())])
                .inc_by(0);
        }
    }

    /// Connections closed by a limit so far, for one reason.
    pub fn connections_refused_count(&self, reason: &'static str) -> u64 {
        self.limits
            .connections_refused
            .get_or_create(&vec![("reason", reason.to_owned())])
            .get()
    }

    /// Counts a failed `accept` (out of file descriptors and the like).
    pub fn accept_error(&self) {
        self.limits.accept_errors.inc();
    }

    /// Moves the number of open `grpc.health.v1.Health/Watch` streams.
    pub fn health_watches(&self, delta: i64) {
        self.limits.health_watches.inc_by(delta);
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

    /// Counts a node clock found to disagree with the reference time.
    pub fn clock_skew(&self) {
        self.clock_skews.inc();
    }

    /// Counts a stored record that did not parse and was skipped.
    pub fn corrupt_record(&self) {
        self.corrupt_records.inc();
    }

    /// Counts a lease acquisition refused because `feature` was at capacity.
    pub fn lease_busy(&self, feature: crate::domain::Feature) {
        self.lease_busy
            .get_or_create(&vec![("feature", feature.as_str().to_owned())])
            .inc();
    }

    /// Counts a state file (`state_dir`) ignored on `load` or not written on `save`.
    pub fn state_file_failure(&self, op: &'static str) {
        self.state_file_failures
            .get_or_create(&vec![("op", op.to_owned())])
            .inc();
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
            redis_master_lookups: meter.u64_counter("licensing.redis.master_lookups").build(),
            redis_unconfirmed_writes: meter
                .u64_counter("licensing.redis.unconfirmed_writes")
                .build(),
        });
    }
}

/// Request limits and load protection (`limits`): one family per name.
#[derive(Default)]
struct LimitMetrics {
    /// `licensing_rpc_refused_total{method, reason}`: calls refused by a limit
    /// (overloaded, rate_limited, too_many_subscribers, shutting_down).
    refused: Family<Labels, Counter>,
    /// `licensing_watch_subscribers`: open `WatchLicenseEvents` streams.
    watch_subscribers: Gauge,
    /// `licensing_connections_open`: open gRPC connections, handshakes included.
    connections_open: Gauge,
    /// `licensing_connections_refused_total{reason}`: connections closed by a
    /// limit (per_peer, total, handshake_timeout, preface_timeout).
    connections_refused: Family<Labels, Counter>,
    /// `licensing_accept_errors_total`: failed accepts (EMFILE and the like).
    accept_errors: Counter,
    /// `licensing_health_watches`: open health watches, both ports.
    health_watches: Gauge,
}

impl LimitMetrics {
    fn register(&self, registry: &mut Registry) {
        registry.register(
            "licensing_rpc_refused",
            "Calls refused by a request limit, by method and reason",
            self.refused.clone(),
        );
        registry.register(
            "licensing_watch_subscribers",
            "Open WatchLicenseEvents streams",
            self.watch_subscribers.clone(),
        );
        registry.register(
            "licensing_connections_open",
            "Open gRPC connections, TLS handshakes in progress included",
            self.connections_open.clone(),
        );
        registry.register(
            "licensing_connections_refused",
            "gRPC connections closed by a limit, by reason (per_peer, total, handshake_timeout, preface_timeout)",
            self.connections_refused.clone(),
        );
        registry.register(
            "licensing_accept_errors",
            "Failed accepts on the gRPC port (out of file descriptors and the like)",
            self.accept_errors.clone(),
        );
        registry.register(
            "licensing_health_watches",
            "Open grpc.health.v1.Health/Watch streams (gRPC and metrics port)",
            self.health_watches.clone(),
        );
    }
}

pub fn outcome_name(o: ReconcileOutcome) -> &'static str {
    match o {
        ReconcileOutcome::Updated => "updated",
        ReconcileOutcome::Unchanged => "unchanged",
        ReconcileOutcome::Unreachable => "unreachable",
        ReconcileOutcome::Rejected => "rejected",
    }
}

pub const OUTCOMES: [ReconcileOutcome; 4] = [
    ReconcileOutcome::Updated,
    ReconcileOutcome::Unchanged,
    ReconcileOutcome::Unreachable,
    ReconcileOutcome::Rejected,
];

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

/// Registers the process-wide event counters (the state gauges are the
/// exporter's). Each event metric is one
/// `Family` registered under one name; a new metric gets its own `register` call
/// here (counters without `_total`, durations with `Unit::Seconds`).
pub fn register_counters(registry: &mut Registry) {
    let m = metrics();
    for op in REDIS_OPERATIONS {
        m.redis_errors
            .get_or_create(&vec![("operation", op.to_owned())])
            .inc_by(0);
    }
    for outcome in OUTCOMES {
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
        "licensing_reconciles",
        "Reconciles by outcome",
        m.reconciles.clone(),
    );
    registry.register(
        "licensing_redis_errors",
        "Redis calls that failed or timed out, by operation",
        m.redis_errors.clone(),
    );
    registry.register(
        "licensing_redis_master_lookups",
        "Questions to the Redis Sentinels for the master, by outcome (found, failed)",
        m.redis_master_lookups.clone(),
    );
    registry.register(
        "licensing_redis_unconfirmed_writes",
        "Writes answered UNAVAILABLE because WAIT confirmed fewer replicas than redis_wait_replicas",
        m.redis_unconfirmed_writes.clone(),
    );
    m.limits.register(registry);
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
        "licensing_clock_skews",
        "Times this node's clock was found beyond clock.max_skew_ms from the reference time (the seat store's clock)",
        m.clock_skews.clone(),
    );
    registry.register(
        "licensing_corrupt_records",
        "Stored records that did not parse and were skipped",
        m.corrupt_records.clone(),
    );
    registry.register(
        "licensing_state_file_failures",
        "State files (state_dir) ignored at start (corrupt, truncated, another serial, unverified license) or not written, by op",
        m.state_file_failures.clone(),
    );
    registry.register(
        "licensing_lease_busy",
        "Lease acquisitions refused because the concurrent feature was at capacity, by feature (this replica's)",
        m.lease_busy.clone(),
    );
    register_auth_metrics(registry);
}

/// The two exposition formats `/metrics` speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// OpenMetrics 1.0 (what Prometheus asks for).
    OpenMetrics,
    /// The Prometheus text format 0.0.4 (anything that does not ask for
    /// OpenMetrics: curl, `promtool check metrics`, older scrapers).
    Text,
}

impl Format {
    /// Chooses by the request's `Accept` header.
    pub fn negotiate(accept: Option<&str>) -> Self {
        match accept {
            Some(a) if a.contains("application/openmetrics-text") => Format::OpenMetrics,
            _ => Format::Text,
        }
    }

    pub fn content_type(self) -> &'static str {
        match self {
            Format::OpenMetrics => "application/openmetrics-text; version=1.0.0; charset=utf-8",
            Format::Text => "text/plain; version=0.0.4; charset=utf-8",
        }
    }
}

/// Encodes `registry` in `format`.
pub fn encode(registry: &Registry, format: Format) -> Result<String, std::fmt::Error> {
    let mut body = String::new();
    prometheus_client::encoding::text::encode(&mut body, registry)?;
    Ok(match format {
        Format::OpenMetrics => body,
        Format::Text => openmetrics_to_text(&body),
    })
}

/// Rewrites the OpenMetrics encoding as the Prometheus text format: a counter family
/// `x` (samples `x_total`) is announced as `x_total`; `# UNIT`, `# EOF`, `_created`
/// samples and exemplars have no place there. Gauges and histograms are the same in
/// both.
fn openmetrics_to_text(om: &str) -> String {
    let mut out = String::with_capacity(om.len());
    let mut help: Option<(&str, &str)> = None;
    let mut counter: Option<String> = None;
    for line in om.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# HELP ") {
            help = rest.split_once(' ').or(Some((rest, "")));
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap_or((rest, "unknown"));
            let (name, kind) = match kind {
                "counter" => {
                    counter = Some(format!("{name}_created"));
                    (format!("{name}_total"), "counter")
                }
                "gauge" | "histogram" | "summary" => {
                    counter = None;
                    (name.to_owned(), kind)
                }
                _ => {
                    counter = None;
                    (name.to_owned(), "untyped")
                }
            };
            if let Some((_, text)) = help.take() {
                out.push_str(&format!("# HELP {name} {text}\n"));
            }
            out.push_str(&format!("# TYPE {name} {kind}\n"));
            continue;
        }
        if line.starts_with('#') {
            continue;
        }
        if counter
            .as_deref()
            .is_some_and(|created| line.starts_with(created))
        {
            continue;
        }
        // An exemplar follows the value as ` # {...}`.
        let sample = line.split_once(" # ").map_or(line, |(s, _)| s);
        out.push_str(sample);
        out.push('\n');
    }
    out
}

// ---------------------------------------------------------------------------
// Callers, authorization, audit and the trust anchor: a self-contained block.
// ---------------------------------------------------------------------------

/// The process-wide counters and gauges of authentication, authorization,
/// audit and the trust anchor.
pub struct AuthMetrics {
    /// Calls refused by the authorization layer, by reason and status code.
    refused: Family<Labels, Counter>,
    /// Audit entries that reached only the log, by reason.
    audit_not_stored: Family<Labels, Counter>,
    /// Refusals counted into a summary entry instead of stored one by one.
    audit_summarized: Counter,
    /// Accepted changes that waited for room in the audit queue.
    audit_waits: Counter,
    /// Re-reads of the callers file or TLS material that failed, by file.
    reload_failures: Family<Labels, Counter>,
    tls_handshake_failures: Counter,
    /// 1 for the `auth.mode` in force, 0 for the others.
    auth_mode: Family<Labels, prometheus_client::metrics::gauge::Gauge>,
    /// 1 when the configuration declares a development installation.
    development_installation: prometheus_client::metrics::gauge::Gauge,
}

static AUTH_METRICS: LazyLock<AuthMetrics> = LazyLock::new(|| AuthMetrics {
    refused: Family::default(),
    audit_not_stored: Family::default(),
    audit_summarized: Counter::default(),
    audit_waits: Counter::default(),
    reload_failures: Family::default(),
    tls_handshake_failures: Counter::default(),
    auth_mode: Family::default(),
    development_installation: Default::default(),
});

/// The process-wide authentication, authorization and audit metrics.
pub fn auth_metrics() -> &'static AuthMetrics {
    &AUTH_METRICS
}

impl AuthMetrics {
    pub fn refused(&self, reason: &'static str, code: &'static str) {
        self.refused
            .get_or_create(&vec![
                ("reason", reason.to_owned()),
                ("code", code.to_owned()),
            ])
            .inc();
    }

    pub fn audit_not_stored(&self, reason: &'static str) {
        self.audit_not_stored
            .get_or_create(&vec![("reason", reason.to_owned())])
            .inc();
    }

    /// How many audit entries reached only the log for `reason` (for tests).
    pub fn audit_not_stored_count(&self, reason: &'static str) -> u64 {
        self.audit_not_stored
            .get_or_create(&vec![("reason", reason.to_owned())])
            .get()
    }

    pub fn audit_waited(&self) {
        self.audit_waits.inc();
    }

    /// How many accepted changes waited for room in the audit queue (for tests).
    pub fn audit_waits_count(&self) -> u64 {
        self.audit_waits.get()
    }

    pub fn audit_summarized(&self) {
        self.audit_summarized.inc();
    }

    /// How many refusals were counted into summary entries (for tests).
    pub fn audit_summarized_count(&self) -> u64 {
        self.audit_summarized.get()
    }

    pub fn reload_failed(&self, file: &'static str) {
        self.reload_failures
            .get_or_create(&vec![("file", file.to_owned())])
            .inc();
    }

    pub fn tls_handshake_failed(&self) {
        self.tls_handshake_failures.inc();
    }

    /// Records the posture the process runs with (at start).
    pub fn set_posture(&self, auth_mode: &'static str, development_installation: bool) {
        for mode in ["protected", "enforce", "disabled"] {
            self.auth_mode
                .get_or_create(&vec![("mode", mode.to_owned())])
                .set(i64::from(mode == auth_mode));
        }
        self.development_installation
            .set(i64::from(development_installation));
    }
}

fn register_auth_metrics(registry: &mut Registry) {
    let m = auth_metrics();
    for reason in ["queue_full", "store", "stopped"] {
        m.audit_not_stored
            .get_or_create(&vec![("reason", reason.to_owned())])
            .inc_by(0);
    }
    registry.register(
        "licensing_auth_refused",
        "Calls refused by authentication or authorization, by reason and gRPC status code",
        m.refused.clone(),
    );
    registry.register(
        "licensing_audit_not_stored",
        "Audit entries written only to the log, by reason: queue_full (an accepted change found the queue full for the whole queue wait, or a refusal found it full), store (the store did not take the batch within the retry time), stopped (the writer had stopped)",
        m.audit_not_stored.clone(),
    );
    registry.register(
        "licensing_audit_waits",
        "Accepted changes whose call waited for room in a full audit queue (back-pressure of a write burst)",
        m.audit_waits.clone(),
    );
    registry.register(
        "licensing_audit_refusals_summarized",
        "Refused calls counted into a summary audit entry instead of stored one by one (a flood of one caller, method and code)",
        m.audit_summarized.clone(),
    );
    registry.register(
        "licensing_credentials_reload_failures",
        "Failed re-reads of the callers file or the TLS material (the previous stays in force), by file",
        m.reload_failures.clone(),
    );
    registry.register(
        "licensing_tls_handshake_failures",
        "TLS handshakes on the gRPC listener that failed or timed out",
        m.tls_handshake_failures.clone(),
    );
    registry.register(
        "licensing_auth_mode",
        "1 for the auth.mode in force (protected, enforce or disabled)",
        m.auth_mode.clone(),
    );
    registry.register(
        "licensing_development_installation",
        "1 when the configuration declares a development installation (its own vendor key instead of the embedded one)",
        m.development_installation.clone(),
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_format_names_counters_with_total() {
        let om = "# HELP x_reqs Requests.\n# TYPE x_reqs counter\nx_reqs_total{a=\"1\"} 3\nx_reqs_created{a=\"1\"} 1.7e9\n\
                  # HELP x_lat_seconds Latency.\n# TYPE x_lat_seconds histogram\n# UNIT x_lat_seconds seconds\n\
                  x_lat_seconds_bucket{le=\"+Inf\"} 1 # {trace=\"a\"} 0.1\nx_lat_seconds_sum 0.1\nx_lat_seconds_count 1\n\
                  # HELP x_up Up.\n# TYPE x_up gauge\nx_up 1.0\n# EOF\n";
        assert_eq!(
            openmetrics_to_text(om),
            "# HELP x_reqs_total Requests.\n# TYPE x_reqs_total counter\nx_reqs_total{a=\"1\"} 3\n\
             # HELP x_lat_seconds Latency.\n# TYPE x_lat_seconds histogram\n\
             x_lat_seconds_bucket{le=\"+Inf\"} 1\nx_lat_seconds_sum 0.1\nx_lat_seconds_count 1\n\
             # HELP x_up Up.\n# TYPE x_up gauge\nx_up 1.0\n"
        );
    }

    #[test]
    fn openmetrics_is_negotiated() {
        assert_eq!(
            Format::negotiate(Some(
                "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5"
            )),
            Format::OpenMetrics
        );
        assert_eq!(Format::negotiate(Some("*/*")), Format::Text);
        assert_eq!(Format::negotiate(None), Format::Text);
    }
}
