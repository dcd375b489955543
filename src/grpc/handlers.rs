//! The `LicensingService` handlers: `into_inner()`, validate into a domain
//! request, call the service, map the result. One span per RPC carries the
//! business keys.

use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use tonic::{Request, Response, Status};
use tracing::Instrument as _;

use super::convert::{self, SeatRequest};
use super::pb;
use super::pb::licensing_service_server::LicensingService;
use super::status::{not_implemented, to_status};
use crate::domain::LicensingError;
use crate::service::Licensing;

/// The gRPC face of [`Licensing`].
#[derive(Clone)]
pub struct LicensingApi {
    licensing: Arc<Licensing>,
}

impl LicensingApi {
    pub fn new(licensing: Arc<Licensing>) -> Self {
        Self { licensing }
    }
}

fn invalid(e: crate::domain::InvalidInput) -> Status {
    to_status(LicensingError::from(e))
}

/// The span of one RPC, with the serial number; handlers add user and feature.
macro_rules! rpc_span {
    ($self:ident, $name:literal) => {
        tracing::info_span!(
            "rpc",
            rpc = $name,
            serial_number = %$self.licensing.settings().serial,
            user_id = tracing::field::Empty,
            feature = tracing::field::Empty,
        )
    };
}

fn record_seat(span: &tracing::Span, req: &SeatRequest) {
    span.record("user_id", req.user_id.as_str());
    span.record("feature", req.feature.as_str());
}

type EventStream =
    Pin<Box<dyn Stream<Item = Result<pb::WatchLicenseEventsResponse, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl LicensingService for LicensingApi {
    async fn check_seat(
        &self,
        request: Request<pb::CheckSeatRequest>,
    ) -> Result<Response<pb::CheckSeatResponse>, Status> {
        let span = rpc_span!(self, "CheckSeat");
        let _enter = span.enter();
        let req = SeatRequest::try_from(request.get_ref()).map_err(invalid)?;
        record_seat(&span, &req);
        let answer = self.licensing.check_seat(&req.user_id, req.feature);
        Ok(Response::new(convert::check_response(&answer)))
    }

    async fn assign_seat(
        &self,
        request: Request<pb::AssignSeatRequest>,
    ) -> Result<Response<pb::AssignSeatResponse>, Status> {
        let span = rpc_span!(self, "AssignSeat");
        async {
            let req = SeatRequest::try_from(request.get_ref()).map_err(invalid)?;
            record_seat(&tracing::Span::current(), &req);
            let (seat, created) = self
                .licensing
                .assign_seat(&req.user_id, req.feature)
                .await
                .map_err(to_status)?;
            if created {
                tracing::info!(source = seat.source.as_str(), "seat assigned");
            }
            Ok(Response::new(pb::AssignSeatResponse {
                seat: Some(convert::seat(&seat)),
                created,
            }))
        }
        .instrument(span)
        .await
    }

    async fn release_seat(
        &self,
        request: Request<pb::ReleaseSeatRequest>,
    ) -> Result<Response<pb::ReleaseSeatResponse>, Status> {
        let span = rpc_span!(self, "ReleaseSeat");
        async {
            let req = SeatRequest::try_from(request.get_ref()).map_err(invalid)?;
            record_seat(&tracing::Span::current(), &req);
            let released = self
                .licensing
                .release_seat(&req.user_id, req.feature)
                .await
                .map_err(to_status)?;
            if released {
                tracing::info!("seat released");
            }
            Ok(Response::new(pb::ReleaseSeatResponse { released }))
        }
        .instrument(span)
        .await
    }

    async fn list_seats(
        &self,
        request: Request<pb::ListSeatsRequest>,
    ) -> Result<Response<pb::ListSeatsResponse>, Status> {
        let span = rpc_span!(self, "ListSeats");
        async {
            let req = request.into_inner();
            if !req.feature.is_empty() {
                tracing::Span::current().record("feature", req.feature.as_str());
            }
            let page = self
                .licensing
                .list_seats(&req.feature, req.page_size, &req.page_token)
                .await
                .map_err(to_status)?;
            Ok(Response::new(pb::ListSeatsResponse {
                seats: page.seats.iter().map(convert::seat).collect(),
                next_page_token: page.next_page_token,
            }))
        }
        .instrument(span)
        .await
    }

    async fn get_tryout_status(
        &self,
        _request: Request<pb::GetTryoutStatusRequest>,
    ) -> Result<Response<pb::GetTryoutStatusResponse>, Status> {
        let _enter = rpc_span!(self, "GetTryoutStatus").entered();
        let status = self.licensing.tryout_status();
        Ok(Response::new(pb::GetTryoutStatusResponse {
            status: Some(convert::tryout_status(&status)),
        }))
    }

    async fn start_tryout(
        &self,
        _request: Request<pb::StartTryoutRequest>,
    ) -> Result<Response<pb::StartTryoutResponse>, Status> {
        async {
            let status = self.licensing.start_tryout().await.map_err(to_status)?;
            tracing::info!(ends_at = ?status.ends_at, "tryout started");
            Ok(Response::new(pb::StartTryoutResponse {
                status: Some(convert::tryout_status(&status)),
            }))
        }
        .instrument(rpc_span!(self, "StartTryout"))
        .await
    }

    async fn end_tryout(
        &self,
        _request: Request<pb::EndTryoutRequest>,
    ) -> Result<Response<pb::EndTryoutResponse>, Status> {
        async {
            let status = self.licensing.end_tryout().await.map_err(to_status)?;
            tracing::info!("tryout ended");
            Ok(Response::new(pb::EndTryoutResponse {
                status: Some(convert::tryout_status(&status)),
            }))
        }
        .instrument(rpc_span!(self, "EndTryout"))
        .await
    }

    async fn get_license_overview(
        &self,
        _request: Request<pb::GetLicenseOverviewRequest>,
    ) -> Result<Response<pb::GetLicenseOverviewResponse>, Status> {
        let _enter = rpc_span!(self, "GetLicenseOverview").entered();
        Ok(Response::new(convert::overview(&self.licensing.overview())))
    }

    async fn reconcile(
        &self,
        _request: Request<pb::ReconcileRequest>,
    ) -> Result<Response<pb::ReconcileResponse>, Status> {
        async {
            let report = self.licensing.reconcile().await.map_err(to_status)?;
            Ok(Response::new(pb::ReconcileResponse {
                outcome: convert::reconcile_outcome(Some(report.outcome)).into(),
                entitlements: report
                    .entitlements
                    .iter()
                    .map(convert::entitlement)
                    .collect(),
                reconciled_at: Some(convert::timestamp(report.reconciled_at)),
                next_reconcile_at: None,
                error: report.error.unwrap_or_default(),
            }))
        }
        .instrument(rpc_span!(self, "Reconcile"))
        .await
    }

    async fn create_initialization_code(
        &self,
        _request: Request<pb::CreateInitializationCodeRequest>,
    ) -> Result<Response<pb::CreateInitializationCodeResponse>, Status> {
        Err(not_implemented("initialization with the licensing server"))
    }

    async fn apply_activation(
        &self,
        _request: Request<pb::ApplyActivationRequest>,
    ) -> Result<Response<pb::ApplyActivationResponse>, Status> {
        Err(not_implemented("activation with the licensing server"))
    }

    type WatchLicenseEventsStream = EventStream;

    async fn watch_license_events(
        &self,
        _request: Request<pb::WatchLicenseEventsRequest>,
    ) -> Result<Response<Self::WatchLicenseEventsStream>, Status> {
        Err(not_implemented("the license event stream"))
    }
}
