//! `licensing-agent`: a [`Client`] answering the service's `CheckSeat`
//! contract from its copy, for callers that cannot link Rust (a C++ call
//! handling, a script): same request, same response, same error codes,
//! answered in process without a round trip to the service.
//!
//! - Before the client has any copy: `UNAVAILABLE`, reason `NO_STATE_YET`
//!   (as a replica without state), never "not licensed".
//! - `min_version`: waits at most `max_wait` for the copy to reach it, else
//!   `UNAVAILABLE`, reason `NOT_YET_CONSISTENT` (as the service).
//! - A feature the agent does not follow: `FAILED_PRECONDITION`, reason
//!   `FEATURE_NOT_FOLLOWED`.
//! - Every other RPC: `UNIMPLEMENTED` (call the service for those).
//!
//! It listens on loopback or a Unix socket only: it answers without
//! authentication, like any local socket of the caller's pod or host.

use std::collections::HashMap;
use std::time::Duration;

use comtrexx_licensing_domain::{Feature, InvalidInput, LicensingError, UserId};
use comtrexx_licensing_proto::pb;
use comtrexx_licensing_proto::pb::licensing_service_server::LicensingService;
use comtrexx_licensing_proto::seat_state::{opt_timestamp, seat_reason, seat_source};
use tonic::{Code, Request, Response, Status};
use tonic_types::{ErrorDetails, StatusExt as _};

use crate::{Client, Decision};

/// The `ErrorInfo` domain of the service's errors.
pub const ERROR_DOMAIN: &str = "licensing.comtrexx";

fn status(code: Code, reason: &str, message: String, meta: &[(&str, String)]) -> Status {
    let metadata: HashMap<String, String> = meta
        .iter()
        .map(|(k, v)| ((*k).to_owned(), v.clone()))
        .collect();
    let details = ErrorDetails::with_error_info(reason, ERROR_DOMAIN, metadata);
    Status::with_error_details(code, message, details)
}

fn invalid(e: InvalidInput) -> Status {
    let field = e.field;
    status(
        Code::InvalidArgument,
        "INVALID_ARGUMENT",
        LicensingError::from(e).to_string(),
        &[("field", field.to_owned())],
    )
}

/// The agent's `LicensingService`: `CheckSeat` from the client's copy.
#[derive(Debug, Clone)]
pub struct Agent {
    client: Client,
    /// How long `min_version` may wait (the service's `consistency.max_wait_ms`).
    max_wait: Duration,
}

impl Agent {
    /// Answers from `client`; `min_version` waits at most `max_wait`.
    pub fn new(client: Client, max_wait: Duration) -> Self {
        Self { client, max_wait }
    }

    /// `CheckSeat` as the service answers it, from the copy.
    pub async fn check(&self, r: &pb::CheckSeatRequest) -> Result<pb::CheckSeatResponse, Status> {
        let user = UserId::parse(&r.user_id).map_err(invalid)?;
        let feature = Feature::parse_seat(&r.feature).map_err(invalid)?;
        if r.min_version > 0
            && let Err(at) = self
                .client
                .wait_for_version(r.min_version, self.max_wait)
                .await
        {
            let at = at.unwrap_or_default();
            return Err(status(
                Code::Unavailable,
                "NOT_YET_CONSISTENT",
                format!(
                    "this agent's copy is at version {at}, not yet at {} (waited {} ms): retry",
                    r.min_version,
                    self.max_wait.as_millis()
                ),
                &[
                    ("min_version", r.min_version.to_string()),
                    ("version", at.to_string()),
                ],
            ));
        }
        match self.client.check_seat(user.as_str(), feature) {
            Decision::Known(a) => Ok(pb::CheckSeatResponse {
                licensed: a.licensed,
                source: a
                    .source
                    .map_or(pb::SeatSource::Unspecified, seat_source)
                    .into(),
                reason: seat_reason(a.reason).into(),
                valid_until: opt_timestamp(a.valid_until),
                stale: a.stale,
                version: a.version,
            }),
            Decision::Unknown if self.client.follows(feature) => Err(status(
                Code::Unavailable,
                "NO_STATE_YET",
                "no copy of the seat state yet (no replica answered since start and no cache file): retry shortly; never read this as \"not licensed\"".into(),
                &[],
            )),
            Decision::Unknown => Err(status(
                Code::FailedPrecondition,
                "FEATURE_NOT_FOLLOWED",
                format!(
                    "this agent does not follow feature {feature}: add it to --features (or leave --features empty for all)"
                ),
                &[("feature", feature.as_str().to_owned())],
            )),
        }
    }
}

#[tonic::async_trait]
impl LicensingService for Agent {
    async fn check_seat(
        &self,
        request: Request<pb::CheckSeatRequest>,
    ) -> Result<Response<pb::CheckSeatResponse>, Status> {
        self.check(request.get_ref()).await.map(Response::new)
    }
}
