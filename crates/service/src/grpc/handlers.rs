//! The `LicensingService` handlers: `into_inner()`, validate into a domain
//! request, call the service, map the result. One span per RPC carries the
//! business keys.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use futures::Stream;
use tonic::{Code, Request, Response, Status};
use tracing::Instrument as _;

use super::convert::{self, SeatRequest};
use super::pb;
use super::pb::licensing_service_server::LicensingService;
use crate::audit::Auditor;
use crate::auth::Caller;
use crate::domain::LicensingError;
use crate::domain::audit::{AuditEvent, Who};
use crate::limits::{Guards, Refusal, WatchSlot};
use crate::metrics::metrics;
use crate::rpc::{self, AuditField, Rpc, code_label};
use crate::service::Licensing;
use crate::status::{refusal_status, to_status};
use tokio::sync::broadcast;

/// The gRPC face of [`Licensing`].
#[derive(Clone)]
pub struct LicensingApi {
    licensing: Arc<Licensing>,
    audit: Auditor,
    /// Per-caller limits (event streams, rate limits) and the drain signal.
    guards: Arc<Guards>,
    /// `WatchSeats` streams.
    watch: super::WatchOptions,
}

impl LicensingApi {
    pub fn new(
        licensing: Arc<Licensing>,
        audit: Auditor,
        guards: Arc<Guards>,
        watch: super::WatchOptions,
    ) -> Self {
        Self {
            licensing,
            audit,
            guards,
            watch,
        }
    }
}

/// The request fields an audit entry may record (`rpc::AuditField`); the RPC
/// table says which of them each method's entry does record.
trait AuditKeys {
    fn user_id(&self) -> &str {
        ""
    }
    fn feature(&self) -> &str {
        ""
    }
}

macro_rules! audit_keys {
    (user_id, feature: $($t:ident),*) => {$(
        impl AuditKeys for pb::$t {
            fn user_id(&self) -> &str { &self.user_id }
            fn feature(&self) -> &str { &self.feature }
        }
    )*};
    (feature: $($t:ident),*) => {$(
        impl AuditKeys for pb::$t {
            fn feature(&self) -> &str { &self.feature }
        }
    )*};
    (user_id: $($t:ident),*) => {$(
        impl AuditKeys for pb::$t {
            fn user_id(&self) -> &str { &self.user_id }
        }
    )*};
    (none: $($t:ident),*) => {$( impl AuditKeys for pb::$t {} )*};
}

audit_keys!(user_id, feature: CheckSeatRequest, AssignSeatRequest, ReleaseSeatRequest);
audit_keys!(feature: ListSeatsRequest, ListLeasesRequest);
audit_keys!(user_id, feature: AcquireLeaseRequest);
audit_keys!(none: RenewLeasesRequest, ReleaseLeaseRequest);
audit_keys!(user_id: ListAuditEventsRequest);
audit_keys!(none: GetTryoutStatusRequest, StartTryoutRequest, EndTryoutRequest,
    GetLicenseOverviewRequest, ReconcileRequest, CreateInitializationCodeRequest,
    ApplyActivationRequest, WatchLicenseEventsRequest, ResetActivationRequest,
    ActivateOnlineRequest, WatchSeatsRequest);

/// The audit keys of a request, those the RPC table names for `rpc`.
fn audit_keys<'a>(rpc: &Rpc, message: &'a impl AuditKeys) -> (&'a str, &'a str) {
    let field = |f: AuditField, value: &'a str| {
        if rpc.audit_fields.contains(&f) {
            value
        } else {
            ""
        }
    };
    (
        field(AuditField::UserId, message.user_id()),
        field(AuditField::Feature, message.feature()),
    )
}

fn refusal(r: Refusal) -> Status {
    refusal_status(&r)
}

fn invalid(e: crate::domain::InvalidInput) -> Status {
    to_status(LicensingError::from(e))
}

/// The span of one RPC at `$level`: method and serial number; handlers add
/// user and feature once validated.
macro_rules! span_at {
    ($level:expr, $method:expr, $licensing:expr) => {
        tracing::span!(
            $level,
            "rpc",
            otel.name = $method,
            rpc = $method,
            serial_number = %$licensing.settings().serial,
            user_id = tracing::field::Empty,
            feature = tracing::field::Empty,
        )
    };
}

/// The span of one RPC, the caller's trace as parent.
fn rpc_span(
    method: &'static str,
    licensing: &Licensing,
    metadata: &tonic::metadata::MetadataMap,
) -> tracing::Span {
    let span = span_at!(tracing::Level::INFO, method, licensing);
    crate::telemetry::set_remote_parent(&span, metadata);
    span
}

/// The span of a hot-path call (`CheckSeat`): the same span, at INFO when the
/// caller sent trace context (its trace goes on through us), else at DEBUG. An
/// INFO span on every call of every PBX user costs the log subscriber a field
/// formatting and a registry entry per call (measured in BENCHMARKS.md) for a
/// span that, without a trace to join and with nothing logged inside it, nobody
/// reads; a `debug` log or trace level brings it back.
fn hot_path_span(
    method: &'static str,
    licensing: &Licensing,
    metadata: &tonic::metadata::MetadataMap,
) -> tracing::Span {
    if metadata.get("traceparent").is_some() {
        return rpc_span(method, licensing, metadata);
    }
    span_at!(tracing::Level::DEBUG, method, licensing)
}

/// Runs one handler inside its span: takes the rate limit the RPC table gives
/// it, counts it (method, status code, latency) and records it in the audit
/// trail when it changes state or was refused (an accepted read, `CheckSeat`
/// above all, costs nothing here).
async fn observe<M: AuditKeys, T>(
    api: &LicensingApi,
    rpc: &'static Rpc,
    request: &Request<M>,
    span: tracing::Span,
    handler: impl Future<Output = Result<Response<T>, Status>>,
) -> Result<Response<T>, Status> {
    let started = Instant::now();
    let result = match api.guards.rate_limit(rpc, request) {
        Ok(()) => handler.instrument(span.clone()).await,
        Err(refused) => Err(refusal(refused)),
    };
    let code = match &result {
        Ok(_) => Code::Ok,
        Err(status) => status.code(),
    };
    metrics().rpc(rpc.name, code_label(code), started.elapsed());
    if code != Code::Ok || rpc.changes_state {
        let who = match Caller::of(request) {
            Some(c) => Who::Caller {
                name: &c.name,
                role: c.role.as_str(),
            },
            None => Who::Anonymous(request.remote_addr().map(|a| a.ip())),
        };
        let (user_id, feature) = audit_keys(rpc, request.get_ref());
        let traceparent = request
            .metadata()
            .get("traceparent")
            .and_then(|v| v.to_str().ok());
        let detail = match &result {
            Ok(_) => "",
            Err(status) => status.message(),
        };
        let event = AuditEvent::new(api.audit.now(), who, rpc.name, code_label(code), detail)
            .with_keys(user_id, feature)
            .with_trace(crate::telemetry::trace_id(&span, traceparent));
        // A refusal goes through the same bound as those made before a
        // handler (a misconfigured client repeating a bad request floods a
        // summary, not the trail); an accepted change is always stored: its
        // call waits for room in the audit queue when a burst fills it.
        if code == Code::Ok {
            api.audit.record_change(event).await;
        } else {
            api.audit.record_refusal(event);
        }
    }
    result
}

fn record_seat(req: &SeatRequest) {
    let span = tracing::Span::current();
    span.record("user_id", req.user_id.as_str());
    span.record("feature", req.feature.as_str());
}

type EventStream =
    Pin<Box<dyn Stream<Item = Result<pb::WatchLicenseEventsResponse, Status>> + Send + 'static>>;

/// Runs a handler body as RPC `$rpc` (an entry of the RPC table): span with
/// trace parent, rate limit, metrics, audit.
macro_rules! rpc {
    (hot $self:ident, $rpc:expr, $request:ident, $body:expr) => {{
        let span = hot_path_span($rpc.name, &$self.licensing, $request.metadata());
        observe($self, &$rpc, &$request, span, $body).await
    }};
    ($self:ident, $rpc:expr, $request:ident, $body:expr) => {{
        let span = rpc_span($rpc.name, &$self.licensing, $request.metadata());
        observe($self, &$rpc, &$request, span, $body).await
    }};
}

#[tonic::async_trait]
impl LicensingService for LicensingApi {
    async fn acquire_lease(
        &self,
        request: Request<pb::AcquireLeaseRequest>,
    ) -> Result<Response<pb::AcquireLeaseResponse>, Status> {
        rpc!(self, rpc::ACQUIRE_LEASE, request, async {
            let req = convert::LeaseRequest::try_from(request.get_ref()).map_err(invalid)?;
            let span = tracing::Span::current();
            span.record("user_id", req.user_id.as_str());
            span.record("feature", req.feature.as_str());
            let acquired = self
                .licensing
                .acquire_lease(&req.user_id, req.feature, &req.holder)
                .await
                .map_err(to_status)?;
            if acquired.created {
                tracing::info!(holder = %req.holder, lease_id = %acquired.lease.lease_id, "lease acquired");
            }
            Ok(Response::new(pb::AcquireLeaseResponse {
                lease: Some(convert::lease(&acquired.lease)),
                created: acquired.created,
                version: acquired.version,
            }))
        })
    }

    async fn renew_leases(
        &self,
        request: Request<pb::RenewLeasesRequest>,
    ) -> Result<Response<pb::RenewLeasesResponse>, Status> {
        rpc!(self, rpc::RENEW_LEASES, request, async {
            let req = convert::RenewRequest::try_from(request.get_ref()).map_err(invalid)?;
            let renewed = self
                .licensing
                .renew_leases(&req.holder, &req.lease_ids)
                .await
                .map_err(to_status)?;
            if !renewed.lost.is_empty() {
                tracing::info!(holder = %req.holder, lost = renewed.lost.len(), "leases not renewed (no longer held)");
            }
            Ok(Response::new(pb::RenewLeasesResponse {
                leases: renewed.leases.iter().map(convert::lease).collect(),
                lost: renewed.lost,
                version: renewed.version,
            }))
        })
    }

    async fn release_lease(
        &self,
        request: Request<pb::ReleaseLeaseRequest>,
    ) -> Result<Response<pb::ReleaseLeaseResponse>, Status> {
        rpc!(self, rpc::RELEASE_LEASE, request, async {
            let id = crate::domain::leases::parse_lease_id(&request.get_ref().lease_id, "lease_id")
                .map_err(invalid)?;
            let released = self.licensing.release_lease(&id).await.map_err(to_status)?;
            Ok(Response::new(pb::ReleaseLeaseResponse {
                released: released.value,
                version: released.version,
            }))
        })
    }

    async fn list_leases(
        &self,
        request: Request<pb::ListLeasesRequest>,
    ) -> Result<Response<pb::ListLeasesResponse>, Status> {
        rpc!(self, rpc::LIST_LEASES, request, async {
            let req = request.get_ref();
            if !req.feature.is_empty() {
                tracing::Span::current().record("feature", req.feature.as_str());
            }
            let page = self
                .licensing
                .list_leases(
                    &req.feature,
                    req.page_size,
                    &req.page_token,
                    req.min_version,
                )
                .await
                .map_err(to_status)?;
            Ok(Response::new(pb::ListLeasesResponse {
                leases: page.leases.iter().map(convert::lease).collect(),
                next_page_token: page.next_page_token,
                version: page.version,
            }))
        })
    }

    async fn check_seat(
        &self,
        request: Request<pb::CheckSeatRequest>,
    ) -> Result<Response<pb::CheckSeatResponse>, Status> {
        rpc!(hot self, rpc::CHECK_SEAT, request, async {
            let req = SeatRequest::try_from(request.get_ref()).map_err(invalid)?;
            record_seat(&req);
            let min_version = request.get_ref().min_version;
            let answer = self
                .licensing
                .check_seat_at(&req.user_id, req.feature, min_version)
                .await
                .map_err(to_status)?;
            Ok(Response::new(convert::check_response(&answer)))
        })
    }

    async fn assign_seat(
        &self,
        request: Request<pb::AssignSeatRequest>,
    ) -> Result<Response<pb::AssignSeatResponse>, Status> {
        rpc!(self, rpc::ASSIGN_SEAT, request, async {
            let req = SeatRequest::try_from(request.get_ref()).map_err(invalid)?;
            record_seat(&req);
            let assigned = self
                .licensing
                .assign_seat(&req.user_id, req.feature)
                .await
                .map_err(to_status)?;
            if assigned.created {
                tracing::info!(source = assigned.seat.source.as_str(), "seat assigned");
            }
            Ok(Response::new(pb::AssignSeatResponse {
                seat: Some(convert::seat(&assigned.seat)),
                created: assigned.created,
                version: assigned.version,
            }))
        })
    }

    async fn release_seat(
        &self,
        request: Request<pb::ReleaseSeatRequest>,
    ) -> Result<Response<pb::ReleaseSeatResponse>, Status> {
        rpc!(self, rpc::RELEASE_SEAT, request, async {
            let req = SeatRequest::try_from(request.get_ref()).map_err(invalid)?;
            record_seat(&req);
            let released = self
                .licensing
                .release_seat(&req.user_id, req.feature)
                .await
                .map_err(to_status)?;
            if released.value {
                tracing::info!("seat released");
            }
            Ok(Response::new(pb::ReleaseSeatResponse {
                released: released.value,
                version: released.version,
            }))
        })
    }

    async fn list_seats(
        &self,
        request: Request<pb::ListSeatsRequest>,
    ) -> Result<Response<pb::ListSeatsResponse>, Status> {
        rpc!(self, rpc::LIST_SEATS, request, async {
            let req = request.get_ref();
            if !req.feature.is_empty() {
                tracing::Span::current().record("feature", req.feature.as_str());
            }
            let page = self
                .licensing
                .list_seats(
                    &req.feature,
                    req.page_size,
                    &req.page_token,
                    req.min_version,
                )
                .await
                .map_err(to_status)?;
            Ok(Response::new(pb::ListSeatsResponse {
                seats: page.seats.iter().map(convert::seat).collect(),
                next_page_token: page.next_page_token,
                version: page.version,
            }))
        })
    }

    async fn get_tryout_status(
        &self,
        request: Request<pb::GetTryoutStatusRequest>,
    ) -> Result<Response<pb::GetTryoutStatusResponse>, Status> {
        rpc!(self, rpc::GET_TRYOUT_STATUS, request, async {
            let status = self
                .licensing
                .tryout_status_at(request.get_ref().min_version)
                .await
                .map_err(to_status)?;
            Ok(Response::new(pb::GetTryoutStatusResponse {
                status: Some(convert::tryout_status(&status.value)),
                version: status.version,
            }))
        })
    }

    async fn start_tryout(
        &self,
        request: Request<pb::StartTryoutRequest>,
    ) -> Result<Response<pb::StartTryoutResponse>, Status> {
        rpc!(self, rpc::START_TRYOUT, request, async {
            let status = self.licensing.start_tryout().await.map_err(to_status)?;
            tracing::info!(ends_at = ?status.value.ends_at, "tryout started");
            Ok(Response::new(pb::StartTryoutResponse {
                status: Some(convert::tryout_status(&status.value)),
                version: status.version,
            }))
        })
    }

    async fn end_tryout(
        &self,
        request: Request<pb::EndTryoutRequest>,
    ) -> Result<Response<pb::EndTryoutResponse>, Status> {
        rpc!(self, rpc::END_TRYOUT, request, async {
            let status = self.licensing.end_tryout().await.map_err(to_status)?;
            tracing::info!("tryout ended");
            Ok(Response::new(pb::EndTryoutResponse {
                status: Some(convert::tryout_status(&status.value)),
                version: status.version,
            }))
        })
    }

    async fn get_license_overview(
        &self,
        request: Request<pb::GetLicenseOverviewRequest>,
    ) -> Result<Response<pb::GetLicenseOverviewResponse>, Status> {
        rpc!(self, rpc::GET_LICENSE_OVERVIEW, request, async {
            let overview = self
                .licensing
                .overview_at(request.get_ref().min_version)
                .await
                .map_err(to_status)?;
            Ok(Response::new(convert::overview(&overview)))
        })
    }

    async fn reconcile(
        &self,
        request: Request<pb::ReconcileRequest>,
    ) -> Result<Response<pb::ReconcileResponse>, Status> {
        rpc!(self, rpc::RECONCILE, request, async {
            let report = self.licensing.reconcile().await.map_err(to_status)?;
            Ok(Response::new(pb::ReconcileResponse {
                outcome: convert::reconcile_outcome(Some(report.outcome)).into(),
                entitlements: report
                    .entitlements
                    .iter()
                    .map(convert::entitlement)
                    .collect(),
                reconciled_at: Some(convert::timestamp(report.reconciled_at)),
                next_reconcile_at: report.next_reconcile_at.map(convert::timestamp),
                error: report.error.unwrap_or_default(),
                version: report.version,
            }))
        })
    }

    async fn create_initialization_code(
        &self,
        request: Request<pb::CreateInitializationCodeRequest>,
    ) -> Result<Response<pb::CreateInitializationCodeResponse>, Status> {
        rpc!(self, rpc::CREATE_INITIALIZATION_CODE, request, async {
            let code = self
                .licensing
                .create_initialization_code()
                .await
                .map_err(to_status)?;
            tracing::info!("initialization code created");
            Ok(Response::new(pb::CreateInitializationCodeResponse {
                initialization_code: code.value,
                version: code.version,
            }))
        })
    }

    async fn apply_activation(
        &self,
        request: Request<pb::ApplyActivationRequest>,
    ) -> Result<Response<pb::ApplyActivationResponse>, Status> {
        rpc!(self, rpc::APPLY_ACTIVATION, request, async {
            let overview = self
                .licensing
                .apply_activation(&request.get_ref().activation_response)
                .await
                .map_err(to_status)?;
            Ok(Response::new(pb::ApplyActivationResponse {
                overview: Some(convert::overview(&overview.value)),
                version: overview.version,
            }))
        })
    }

    async fn watch_license_events(
        &self,
        request: Request<pb::WatchLicenseEventsRequest>,
    ) -> Result<Response<EventStream>, Status> {
        rpc!(self, rpc::WATCH_LICENSE_EVENTS, request, async {
            let slot = self
                .guards
                .join_watch(rpc::WATCH_LICENSE_EVENTS.name, &request)
                .map_err(refusal)?;
            let events = self.licensing.mirror().events().subscribe();
            let stream = event_stream(events, Box::pin(self.guards.drained()), slot);
            Ok(Response::new(Box::pin(stream) as EventStream))
        })
    }

    async fn reset_activation(
        &self,
        request: Request<pb::ResetActivationRequest>,
    ) -> Result<Response<pb::ResetActivationResponse>, Status> {
        rpc!(self, rpc::RESET_ACTIVATION, request, async {
            let overview = self.licensing.reset_activation().await.map_err(to_status)?;
            Ok(Response::new(pb::ResetActivationResponse {
                overview: Some(convert::overview(&overview.value)),
                version: overview.version,
            }))
        })
    }

    async fn activate_online(
        &self,
        request: Request<pb::ActivateOnlineRequest>,
    ) -> Result<Response<pb::ActivateOnlineResponse>, Status> {
        rpc!(self, rpc::ACTIVATE_ONLINE, request, async {
            let overview = self.licensing.activate_online().await.map_err(to_status)?;
            Ok(Response::new(pb::ActivateOnlineResponse {
                overview: Some(convert::overview(&overview.value)),
                version: overview.version,
            }))
        })
    }

    async fn watch_seats(
        &self,
        request: Request<pb::WatchSeatsRequest>,
    ) -> Result<Response<super::watch::SeatStream>, Status> {
        rpc!(self, rpc::WATCH_SEATS, request, async {
            let req = request.get_ref();
            let features = super::watch::features(&req.features).map_err(invalid)?;
            let slot = self
                .guards
                .join_watch(rpc::WATCH_SEATS.name, &request)
                .map_err(refusal)?;
            let (start, feed) = self
                .licensing
                .watch_seats(req.since_version, &req.since_epoch, &features)
                .map_err(to_status)?;
            // Keeps the connection past its maximum age while the stream is open.
            let hold = request
                .extensions()
                .get::<crate::caller::Peer>()
                .map(|p| p.long_streams.hold());
            let stream = super::watch::seat_stream(super::watch::Watcher {
                licensing: self.licensing.clone(),
                features,
                start,
                feed,
                heartbeat: self.watch.heartbeat,
                drained: Box::pin(self.guards.drained()),
                slot,
                hold,
            });
            Ok(Response::new(stream))
        })
    }

    async fn list_audit_events(
        &self,
        request: Request<pb::ListAuditEventsRequest>,
    ) -> Result<Response<pb::ListAuditEventsResponse>, Status> {
        rpc!(self, rpc::LIST_AUDIT_EVENTS, request, async {
            let req = request.get_ref();
            let page = self
                .audit
                .list(&req.user_id, req.page_size, &req.page_token)
                .await
                .map_err(to_status)?;
            Ok(Response::new(pb::ListAuditEventsResponse {
                events: page
                    .entries
                    .iter()
                    .map(|e| convert::audit_event(&e.event))
                    .collect(),
                next_page_token: page.next_page_token,
            }))
        })
    }
}

/// What an open event stream holds: dropped with the stream, at once when its
/// client goes away (no task outlives it), which frees the broadcast receiver
/// and the caller's slot.
struct Subscription {
    events: broadcast::Receiver<crate::events::LicenseEvent>,
    drained: Pin<Box<dyn Future<Output = ()> + Send>>,
    _slot: WatchSlot,
}

/// The events of one subscriber until the server drains; then one
/// `UNAVAILABLE` ("shutting down, reconnect") and the end.
fn event_stream(
    events: broadcast::Receiver<crate::events::LicenseEvent>,
    drained: Pin<Box<dyn Future<Output = ()> + Send>>,
    slot: WatchSlot,
) -> impl Stream<Item = Result<pb::WatchLicenseEventsResponse, Status>> + Send + 'static {
    let subscription = Subscription {
        events,
        drained,
        _slot: slot,
    };
    futures::stream::unfold(Some(subscription), |state| async move {
        let mut sub = state?;
        let item = tokio::select! {
            biased;
            () = &mut sub.drained => return Some((Err(refusal(Refusal::ShuttingDown)), None)),
            received = sub.events.recv() => match received {
                Ok(event) => convert::event(&event),
                Err(broadcast::error::RecvError::Lagged(missed)) => {
                    let mut e =
                        crate::events::LicenseEvent::new("lagged_resync", chrono::Utc::now());
                    e.detail = format!("{missed} events missed: re-read the state");
                    convert::event(&e)
                }
                Err(broadcast::error::RecvError::Closed) => return None,
            },
        };
        Some((Ok(item), Some(sub)))
    })
}
