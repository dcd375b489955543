//! The metrics port (`metrics_addr`): `/metrics` with the process-wide
//! counters (`crate::metrics`) and a replica's state gauges, read from its
//! mirror at scrape time (so they are never out of step with what `CheckSeat`
//! answers), the same gauges over OTLP, and `grpc.health.v1.Health` beside
//! them for probes that cannot reach the gRPC port's TLS.

use std::future::Future;
use std::sync::Arc;

use chrono::Utc;
use opentelemetry::KeyValue;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;

use crate::domain::{ActivationState, Feature, SeatSource, TryoutState};
use crate::metrics::{Format, Labels, OUTCOMES, encode, outcome_name, register_counters};
use crate::service::Licensing;

/// A metric's name and help, declared once so that every sample of a name lands in
/// one family (one `HELP`/`TYPE` block), whatever order the samples come in.
/// Names follow Prometheus conventions: base units in the name (`_seconds`), counters
/// registered without `_total` (the encoder appends it), 0/1 gauges for states.
pub struct Desc {
    pub name: &'static str,
    pub help: &'static str,
}

const SEATS_IN_USE: Desc = Desc {
    name: "licensing_seats_in_use",
    help: "Seats held, by feature and source",
};
const SEATS_CAPACITY: Desc = Desc {
    name: "licensing_seats_capacity",
    help: "Seats that can be held, by feature and source",
};
const SEATS_OVER_CAPACITY: Desc = Desc {
    name: "licensing_seats_over_capacity",
    help: "Purchased seats beyond the licensed quantity (licensed until their over-capacity grace ends), by feature",
};
const LEASES_IN_USE: Desc = Desc {
    name: "licensing_leases_in_use",
    help: "Live leases of a concurrent-use feature, by feature (0 for a feature sold as assigned seats)",
};
const LEASES_CAPACITY: Desc = Desc {
    name: "licensing_leases_capacity",
    help: "How many leases of a concurrent-use feature may live at the same time, by feature (0 for a feature sold as assigned seats)",
};
const LEASES_PEAK_TODAY: Desc = Desc {
    name: "licensing_leases_peak_today",
    help: "The most leases of a concurrent-use feature live at the same time today (UTC), by feature",
};
const TRYOUT_STATE: Desc = Desc {
    name: "licensing_tryout_state",
    help: "1 for the tryout's current state, 0 for the others",
};
const TRYOUT_REMAINING: Desc = Desc {
    name: "licensing_tryout_remaining_seconds",
    help: "Seconds left in the tryout (0 unless active)",
};
const ACTIVATION_STATE: Desc = Desc {
    name: "licensing_activation_state",
    help: "1 for the activation's current state, 0 for the others",
};
const GRACE_REMAINING: Desc = Desc {
    name: "licensing_grace_remaining_seconds",
    help: "Seconds left before activation lapses while the license source is not confirming (0 unless in grace)",
};
const ACTIVATED: Desc = Desc {
    name: "licensing_activated",
    help: "1 when a trusted license is applied (and system activation held where needed)",
};
const RECONCILE_LAST_OUTCOME: Desc = Desc {
    name: "licensing_reconcile_last_outcome",
    help: "1 for the outcome of the last reconcile, 0 for the others (all 0 before the first)",
};
const RECONCILE_LAST_SUCCESS: Desc = Desc {
    name: "licensing_reconcile_last_success_timestamp_seconds",
    help: "Unix time of the last reconcile that reached the license source and trusted its answer (0 if none)",
};
const RECONCILE_INTERVAL: Desc = Desc {
    name: "licensing_reconcile_interval_seconds",
    help: "Configured time between scheduled reconciles",
};
const MIRROR_STALE: Desc = Desc {
    name: "licensing_mirror_stale",
    help: "1 when CheckSeat answers from a copy that may be out of date (store unreachable)",
};
const STATE_SOURCE: Desc = Desc {
    name: "licensing_state_source",
    help: "1 for where this replica's answers come from: store (a snapshot of it), disk (state_dir, store not reached since start), none (no state: NOT_SERVING, reads answer NO_STATE_YET)",
};
const MIRROR_STALENESS: Desc = Desc {
    name: "licensing_mirror_staleness_seconds",
    help: "Seconds since the seat store last answered this replica",
};
const CLOCK_SKEW: Desc = Desc {
    name: "licensing_clock_skew_seconds",
    help: "This node's clock minus the reference time (the seat store's clock), in seconds; positive: ahead",
};
const CLOCK_SKEWED: Desc = Desc {
    name: "licensing_clock_skewed",
    help: "1 while this node's clock is beyond clock.max_skew_ms from the reference time (decisions use the reference)",
};

/// One gauge family: every sample of one name.
struct GaugeFamily {
    desc: &'static Desc,
    samples: Vec<(Labels, f64)>,
}

/// The state gauges of one scrape, grouped by family.
#[derive(Default)]
struct Gauges(Vec<GaugeFamily>);

impl Gauges {
    fn set(&mut self, desc: &'static Desc, labels: Labels, value: f64) {
        match self.0.iter_mut().find(|f| f.desc.name == desc.name) {
            Some(family) => family.samples.push((labels, value)),
            None => self.0.push(GaugeFamily {
                desc,
                samples: vec![(labels, value)],
            }),
        }
    }

    /// A 0/1 gauge per possible state, 1 for `current`.
    fn states(&mut self, desc: &'static Desc, all: &[&'static str], current: Option<&str>) {
        for state in all {
            let value = f64::from(u8::from(current == Some(*state)));
            self.set(desc, vec![("state", (*state).to_owned())], value);
        }
    }
}

fn seconds_until(end: Option<chrono::DateTime<Utc>>, now: chrono::DateTime<Utc>) -> f64 {
    end.map_or(0.0, |end| {
        ((end - now).num_milliseconds().max(0) as f64) / 1000.0
    })
}

fn activation_state_name(state: ActivationState) -> &'static str {
    match state {
        ActivationState::NotInitialized => "not_initialized",
        ActivationState::Active => "active",
        ActivationState::Grace => "grace",
        ActivationState::Lapsed => "lapsed",
    }
}

/// The state gauges of one replica, computed from its mirror.
fn state_gauges(licensing: &Licensing) -> Gauges {
    let now = Utc::now();
    let overview = licensing.overview();
    let mirror = licensing.mirror();
    let mut g = Gauges::default();
    for feature in Feature::SEATS {
        // A feature sold for concurrent use has no assigned seats to give.
        let purchased = overview
            .entitlements
            .iter()
            .find(|e| {
                e.entitlement.feature == feature
                    && e.entitlement.is_current(now)
                    && e.entitlement.seat_model == crate::domain::SeatModel::Assigned
            })
            .map_or(0, |e| e.entitlement.quantity);
        let concurrent = overview.concurrent.iter().find(|c| c.feature == feature);
        let labels = vec![("feature", feature.to_string())];
        g.set(
            &LEASES_IN_USE,
            labels.clone(),
            f64::from(concurrent.map_or(0, |c| c.in_use)),
        );
        g.set(
            &LEASES_CAPACITY,
            labels.clone(),
            f64::from(concurrent.map_or(0, |c| c.capacity)),
        );
        g.set(
            &LEASES_PEAK_TODAY,
            labels,
            f64::from(concurrent.map_or(0, |c| c.peak_today)),
        );
        let tryout = if feature == Feature::User && overview.tryout.state == TryoutState::Active {
            overview.tryout.seats_total
        } else {
            0
        };
        for (source, capacity) in [
            (SeatSource::Purchased, purchased),
            (SeatSource::Tryout, tryout),
        ] {
            let labels = vec![
                ("feature", feature.to_string()),
                ("source", source.as_str().to_owned()),
            ];
            let in_use = mirror.read(|s| s.count(feature, source));
            g.set(&SEATS_IN_USE, labels.clone(), f64::from(in_use));
            g.set(&SEATS_CAPACITY, labels, f64::from(capacity));
        }
        let over = overview
            .over_capacity
            .iter()
            .find(|o| o.feature == feature)
            .map_or(0, |o| o.seats);
        g.set(
            &SEATS_OVER_CAPACITY,
            vec![("feature", feature.to_string())],
            f64::from(over),
        );
    }
    g.states(
        &TRYOUT_STATE,
        &["available", "active", "expired", "ended", "unavailable"],
        Some(crate::domain::tryout::state_name(overview.tryout.state)),
    );
    let tryout_end = overview
        .tryout
        .ends_at
        .filter(|_| overview.tryout.state == TryoutState::Active);
    g.set(
        &TRYOUT_REMAINING,
        Vec::new(),
        seconds_until(tryout_end, now),
    );
    g.states(
        &ACTIVATION_STATE,
        &["not_initialized", "active", "grace", "lapsed"],
        Some(activation_state_name(overview.activation.state)),
    );
    let grace_end = overview
        .activation
        .grace_ends_at
        .filter(|_| overview.activation.state == ActivationState::Grace);
    g.set(&GRACE_REMAINING, Vec::new(), seconds_until(grace_end, now));
    g.set(
        &ACTIVATED,
        Vec::new(),
        f64::from(u8::from(
            matches!(
                overview.activation.state,
                ActivationState::Active | ActivationState::Grace
            ) && overview.system_activated,
        )),
    );
    let last = overview.reconcile.last_outcome;
    for outcome in OUTCOMES {
        g.set(
            &RECONCILE_LAST_OUTCOME,
            vec![("outcome", outcome_name(outcome).to_owned())],
            f64::from(u8::from(last == Some(outcome))),
        );
    }
    g.set(
        &RECONCILE_LAST_SUCCESS,
        Vec::new(),
        overview
            .reconcile
            .last_success_at
            .map_or(0.0, |t| t.timestamp_millis() as f64 / 1000.0),
    );
    g.set(
        &RECONCILE_INTERVAL,
        Vec::new(),
        licensing.settings().reconcile_interval.as_secs_f64(),
    );
    g.set(
        &MIRROR_STALE,
        Vec::new(),
        f64::from(u8::from(mirror.is_stale())),
    );
    let source = mirror.source();
    for each in crate::mirror::StateSource::ALL {
        g.set(
            &STATE_SOURCE,
            vec![("source", each.as_str().to_owned())],
            f64::from(u8::from(each == source)),
        );
    }
    g.set(
        &CLOCK_SKEW,
        Vec::new(),
        overview.clock_skew_ms.unwrap_or(0) as f64 / 1000.0,
    );
    g.set(
        &CLOCK_SKEWED,
        Vec::new(),
        f64::from(u8::from(overview.clock_skewed)),
    );
    g.set(
        &MIRROR_STALENESS,
        Vec::new(),
        mirror.seconds_since_contact().unwrap_or(f64::INFINITY),
    );
    g
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
        for family in state_gauges(&self.licensing).0 {
            let mut descriptor = encoder.encode_descriptor(
                family.desc.name,
                family.desc.help,
                None,
                MetricType::Gauge,
            )?;
            for (labels, value) in &family.samples {
                ConstGauge::new(*value).encode(descriptor.encode_family(labels)?)?;
            }
        }
        Ok(())
    }
}

/// The registry a replica's `/metrics` serves: the counters, then its state
/// gauges (computed at scrape time).
pub fn registry(licensing: Arc<Licensing>) -> Registry {
    let mut registry = Registry::default();
    register_counters(&mut registry);
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
            for family in state_gauges(&licensing).0 {
                for (labels, value) in family.samples {
                    let mut attrs: Vec<KeyValue> = labels
                        .into_iter()
                        .map(|(k, v)| KeyValue::new(k, v))
                        .collect();
                    attrs.push(KeyValue::new("name", family.desc.name));
                    if value.is_finite() {
                        observer.observe(value, &attrs);
                    }
                }
            }
        })
        .build();
}

/// Serves `/metrics` on `listener` until `shutdown`, in the format the scraper asks
/// for (OpenMetrics or the Prometheus text format), and beside it the
/// `grpc.health.v1.Health` service (HTTP/2 without TLS, no credentials) with
/// reflection of health alone.
pub async fn serve(
    listener: TcpListener,
    registry: Registry,
    health: crate::limits::BoundedHealth<
        tonic_health::pb::health_server::HealthServer<tonic_health::server::HealthService>,
    >,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    use axum::http::header::{ACCEPT, CONTENT_TYPE};
    let registry = Arc::new(registry);
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move |headers: axum::http::HeaderMap| {
            let registry = registry.clone();
            async move {
                let format = Format::negotiate(headers.get(ACCEPT).and_then(|v| v.to_str().ok()));
                match encode(&registry, format) {
                    Ok(body) => (
                        axum::http::StatusCode::OK,
                        [(CONTENT_TYPE, format.content_type())],
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
    // The health status over gRPC (HTTP/2 without TLS) beside /metrics, for
    // probes that cannot reach the gRPC port's TLS (server::Health), with
    // reflection of health alone (so `grpcurl -plaintext HOST:PORT list` works).
    let (reflection_v1, reflection_v1alpha) = comtrexx_licensing_proto::reflection_services(&[])
        .map_err(|e| std::io::Error::other(e.to_string()))?;
    let grpc = tonic::service::Routes::new(health)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha);
    let app = app.merge(grpc.into_axum_router());
    // The peer's address reaches the health watches' per-peer bound.
    axum::serve(
        listener,
        app.into_make_service_with_connect_info::<std::net::SocketAddr>(),
    )
    .with_graceful_shutdown(shutdown)
    .await
}
