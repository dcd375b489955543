//! The licensing API as tests speak it: one helper per call. A helper named
//! after the call (`assign`, `check`, `release`, `list_seats`) returns the
//! answer or the refusal; its past participle (`assigned`, `checked`,
//! `released`) or a noun (`seats`, `overview`) panics on a refusal, for steps
//! that cannot fail. A `feature` of `""` is the user seat, as in the API.

use std::collections::BTreeSet;

use comtrexx_licensing_proto::pb;
use tonic::Status;

use crate::Client;

/// A `CheckSeat` request for `user`'s user seat (for calls made by hand, e.g.
/// with a token or on a raw client).
pub fn check_request(user: &str) -> pb::CheckSeatRequest {
    pb::CheckSeatRequest {
        user_id: user.into(),
        feature: String::new(),
        ..Default::default()
    }
}

/// An `AssignSeat` request for `user`'s user seat.
pub fn assign_request(user: &str) -> pb::AssignSeatRequest {
    pb::AssignSeatRequest {
        user_id: user.into(),
        feature: String::new(),
    }
}

/// `CheckSeat`: the answer, or the refusal.
pub async fn check(
    c: &mut Client,
    user: &str,
    feature: &str,
) -> Result<pb::CheckSeatResponse, Status> {
    c.check_seat(pb::CheckSeatRequest {
        user_id: user.into(),
        feature: feature.into(),
        ..Default::default()
    })
    .await
    .map(tonic::Response::into_inner)
}

/// `CheckSeat` of a `user` seat with `min_version` (read your writes): the
/// answer, or the refusal.
pub async fn check_at(
    c: &mut Client,
    user: &str,
    min_version: u64,
) -> Result<pb::CheckSeatResponse, Status> {
    c.check_seat(pb::CheckSeatRequest {
        user_id: user.into(),
        feature: "user".into(),
        min_version,
    })
    .await
    .map(tonic::Response::into_inner)
}

/// `CheckSeat`'s answer (panics on a refusal).
pub async fn checked(c: &mut Client, user: &str, feature: &str) -> pb::CheckSeatResponse {
    check(c, user, feature)
        .await
        .unwrap_or_else(|s| panic!("CheckSeat {user} {feature:?}: {s:?}"))
}

/// Whether `CheckSeat` says `user` holds a user seat (panics on a refusal).
pub async fn licensed(c: &mut Client, user: &str) -> bool {
    checked(c, user, "").await.licensed
}

/// `AssignSeat`: the answer, or the refusal.
pub async fn assign(
    c: &mut Client,
    user: &str,
    feature: &str,
) -> Result<pb::AssignSeatResponse, Status> {
    c.assign_seat(pb::AssignSeatRequest {
        user_id: user.into(),
        feature: feature.into(),
    })
    .await
    .map(tonic::Response::into_inner)
}

/// `AssignSeat`'s answer: the seat, and whether it is new (panics on a refusal).
pub async fn assigned(c: &mut Client, user: &str, feature: &str) -> pb::AssignSeatResponse {
    assign(c, user, feature)
        .await
        .unwrap_or_else(|s| panic!("AssignSeat {user} {feature:?}: {s:?}"))
}

/// `ReleaseSeat`: the answer, or the refusal.
pub async fn release(
    c: &mut Client,
    user: &str,
    feature: &str,
) -> Result<pb::ReleaseSeatResponse, Status> {
    c.release_seat(pb::ReleaseSeatRequest {
        user_id: user.into(),
        feature: feature.into(),
    })
    .await
    .map(tonic::Response::into_inner)
}

/// Whether `ReleaseSeat` freed a seat (panics on a refusal).
pub async fn released(c: &mut Client, user: &str, feature: &str) -> bool {
    release(c, user, feature)
        .await
        .unwrap_or_else(|s| panic!("ReleaseSeat {user} {feature:?}: {s:?}"))
        .released
}

/// One `ListSeats` page: the answer, or the refusal.
pub async fn list_page(
    c: &mut Client,
    feature: &str,
    page_size: i32,
    page_token: &str,
) -> Result<pb::ListSeatsResponse, Status> {
    c.list_seats(pb::ListSeatsRequest {
        feature: feature.into(),
        page_size,
        page_token: page_token.into(),
        ..Default::default()
    })
    .await
    .map(tonic::Response::into_inner)
}

/// Every seat of `feature` (`""`: all), page by page, or the first refusal;
/// asserts that only the last page has no token and no page but the last is
/// empty.
pub async fn list_seats(
    c: &mut Client,
    feature: &str,
    page_size: i32,
) -> Result<Vec<pb::Seat>, Status> {
    let mut seats = Vec::new();
    let mut token = String::new();
    for _ in 0..10_000 {
        let page = list_page(c, feature, page_size, &token).await?;
        let n = page.seats.len();
        seats.extend(page.seats);
        if page.next_page_token.is_empty() {
            return Ok(seats);
        }
        assert!(n > 0, "an empty page must not carry a next_page_token");
        token = page.next_page_token;
    }
    panic!("ListSeats never reached the last page");
}

/// Every seat, in `ListSeats` order (panics on a refusal).
pub async fn seats(c: &mut Client) -> Vec<pb::Seat> {
    list_seats(c, "", 1000).await.expect("ListSeats")
}

/// The users `ListSeats` shows with a seat, in its order (by feature, then user).
pub async fn seat_holders(c: &mut Client) -> Vec<String> {
    seats(c).await.into_iter().map(|s| s.user_id).collect()
}

/// The users `ListSeats` shows with a seat, as a set.
pub async fn seat_holder_set(c: &mut Client) -> BTreeSet<String> {
    seat_holders(c).await.into_iter().collect()
}

/// The license overview (panics on an error: for tests where it cannot fail).
pub async fn overview(c: &mut Client) -> pb::GetLicenseOverviewResponse {
    c.get_license_overview(pb::GetLicenseOverviewRequest::default())
        .await
        .expect("GetLicenseOverview")
        .into_inner()
}

/// `StartTryout`: the tryout status, or the refusal.
pub async fn start_tryout(c: &mut Client) -> Result<pb::TryoutStatus, tonic::Status> {
    c.start_tryout(pb::StartTryoutRequest {})
        .await
        .map(|r| r.into_inner().status.expect("status is set"))
}

/// `EndTryout`: the tryout status, or the refusal.
pub async fn end_tryout(c: &mut Client) -> Result<pb::TryoutStatus, tonic::Status> {
    c.end_tryout(pb::EndTryoutRequest {})
        .await
        .map(|r| r.into_inner().status.expect("status is set"))
}

/// `GetTryoutStatus` (panics on an error: for tests where it cannot fail).
pub async fn tryout(c: &mut Client) -> pb::TryoutStatus {
    c.get_tryout_status(pb::GetTryoutStatusRequest::default())
        .await
        .expect("GetTryoutStatus")
        .into_inner()
        .status
        .expect("status is set")
}

/// `Reconcile` (panics on an error: for tests where it cannot fail).
pub async fn reconcile(c: &mut Client) -> pb::ReconcileResponse {
    c.reconcile(pb::ReconcileRequest {})
        .await
        .expect("Reconcile")
        .into_inner()
}
