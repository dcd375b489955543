//! The audit trail across replicas: entries recorded by one replica (accepted
//! and refused calls, refusals of the handler and of the authorization layer)
//! are listed by another on the same Redis; accepted reads are not recorded.

mod common;

use std::time::Duration;

use common::{
    RedisServer, TestServer, config, eventually, refusals_in, token_callers_file, with_token,
};
use comtrexx_licensing::auth::callers::new_token;
use comtrexx_licensing::grpc::pb;
use tonic::Code;

fn seat(user: &str) -> pb::AssignSeatRequest {
    pb::AssignSeatRequest {
        user_id: user.into(),
        feature: String::new(),
    }
}

/// (method, caller, code, user id) of every entry, newest first.
type Row = (String, String, String, String);

async fn trail(client: &mut common::Client, user_id: &str) -> Vec<Row> {
    let mut rows = Vec::new();
    let mut token = String::new();
    loop {
        let page = client
            .list_audit_events(pb::ListAuditEventsRequest {
                page_size: 2,
                page_token: token,
                user_id: user_id.into(),
            })
            .await
            .expect("list the audit trail")
            .into_inner();
        rows.extend(
            page.events
                .into_iter()
                .map(|e| (e.method, e.caller, e.code, e.user_id)),
        );
        if page.next_page_token.is_empty() {
            return rows;
        }
        token = page.next_page_token;
    }
}

fn row(method: &str, caller: &str, code: &str, user: &str) -> Row {
    (method.into(), caller.into(), code.into(), user.into())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_replica_lists_what_the_first_recorded() {
    let redis = RedisServer::start();
    let serial = common::serial("audit");
    let (admin, pbx) = (new_token(), new_token());
    let dir = tempfile::tempdir().unwrap();
    let callers = token_callers_file(
        dir.path(),
        &[
            ("admin-ui", "user_management", &admin),
            ("pbx", "call_handling", &pbx),
        ],
    );
    let mut raw = config(Some(&redis), &serial);
    raw.auth.callers_file = Some(callers);
    let first = TestServer::start(raw.clone()).await;
    let second = TestServer::start(raw).await;
    let mut a = first.client().await;

    // From loopback without credentials: the operator starts the tryout.
    a.start_tryout(pb::StartTryoutRequest {}).await.unwrap();
    // Accepted write by a token caller.
    a.assign_seat(with_token(seat("alice"), &admin))
        .await
        .expect("user management may assign");
    // Refused by the authorization layer.
    let denied = a
        .assign_seat(with_token(seat("mallory"), &pbx))
        .await
        .unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied);
    // Refused by the handler.
    let invalid = a
        .check_seat(with_token(
            pb::CheckSeatRequest {
                user_id: String::new(),
                feature: String::new(),
                ..Default::default()
            },
            &pbx,
        ))
        .await
        .unwrap_err();
    assert_eq!(invalid.code(), Code::InvalidArgument);
    // An accepted read: not recorded.
    a.check_seat(with_token(
        pb::CheckSeatRequest {
            user_id: "alice".into(),
            feature: String::new(),
            ..Default::default()
        },
        &pbx,
    ))
    .await
    .unwrap();

    let expected = vec![
        row("CheckSeat", "pbx", "INVALID_ARGUMENT", ""),
        row("AssignSeat", "pbx", "PERMISSION_DENIED", ""),
        row("AssignSeat", "admin-ui", "OK", "alice"),
        row("StartTryout", "loopback", "OK", ""),
    ];
    let mut b = second.client().await;
    // The writer stores entries in the background: poll, bounded.
    eventually(Duration::from_secs(10), || {
        let (mut b, expected) = (b.clone(), expected.clone());
        async move { trail(&mut b, "").await == expected }
    })
    .await;
    assert_eq!(
        trail(&mut b, "").await,
        expected,
        "the second replica's trail"
    );
    assert_eq!(
        trail(&mut b, "alice").await,
        vec![row("AssignSeat", "admin-ui", "OK", "alice")]
    );
    // The trail is for operators only.
    let status = b
        .list_audit_events(with_token(pb::ListAuditEventsRequest::default(), &admin))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    first.shutdown().await;
    second.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_refusals_is_summarized_not_stored_call_by_call() {
    const FLOOD: u64 = 300;
    let redis = RedisServer::start();
    let operator = new_token();
    let dir = tempfile::tempdir().unwrap();
    let callers = token_callers_file(dir.path(), &[("ops", "operator", &operator)]);
    let mut raw = config(Some(&redis), &common::serial("flood"));
    raw.auth.mode = "enforce".into();
    raw.auth.callers_file = Some(callers);
    let server = TestServer::start(raw).await;
    let client = server.client().await;

    let started = std::time::Instant::now();
    let calls = (0..FLOOD).map(|i| {
        let mut c = client.clone();
        async move {
            c.check_seat(pb::CheckSeatRequest {
                user_id: format!("u{i}"),
                feature: String::new(),
                ..Default::default()
            })
            .await
            .unwrap_err()
            .code()
        }
    });
    for code in futures::future::join_all(calls).await {
        assert_eq!(code, Code::Unauthenticated);
    }
    let seconds = started.elapsed().as_secs() + 1;

    // Every refusal is accounted for: entries of their own (at most the
    // allowance per second of the flood) plus the counts of the summaries.
    let refused_checks = || {
        let (mut client, operator) = (client.clone(), operator.clone());
        async move {
            let request = pb::ListAuditEventsRequest {
                page_size: 1000,
                ..Default::default()
            };
            let events = client
                .list_audit_events(with_token(request, &operator))
                .await;
            let events = events.unwrap().into_inner().events.into_iter();
            events
                .filter(|e| e.method == "CheckSeat" && e.code == "UNAUTHENTICATED")
                .collect::<Vec<pb::AuditEvent>>()
        }
    };
    let accounted = eventually(Duration::from_secs(10), || {
        let entries = refused_checks();
        async move { entries.await.iter().map(refusals_in).sum::<u64>() == FLOOD }
    })
    .await;
    let entries = refused_checks().await;
    let own = entries.iter().filter(|e| refusals_in(e) == 1).count() as u64;
    assert!(accounted, "refusals accounted for: {entries:#?}");
    assert!(
        own <= u64::from(comtrexx_licensing::domain::audit::REFUSALS_STORED_PER_INTERVAL) * seconds,
        "{own} entries of their own in {seconds} s"
    );
    assert!(
        entries.len() < 100,
        "{} entries for {FLOOD} refusals",
        entries.len()
    );
    server.shutdown().await;
}

/// How many calls each flood below makes.
const FLOOD_CALLS: u64 = 4000;
/// How many of them are in flight at once.
const FLOOD_CONCURRENCY: usize = 50;

/// A server on its own Redis in `enforce` mode with a small trail
/// (`audit.max_entries = 50`) and an operator (`ops`) and call handling
/// (`pbx`) token; the operator's `StartTryout` is the trail's first entry.
async fn small_trail() -> (RedisServer, TestServer, common::Client, String, String) {
    let redis = RedisServer::start();
    let (operator, pbx) = (new_token(), new_token());
    let dir = tempfile::tempdir().unwrap();
    let callers = token_callers_file(
        dir.path(),
        &[
            ("ops", "operator", &operator),
            ("pbx", "call_handling", &pbx),
        ],
    );
    let mut raw = config(Some(&redis), &common::serial("small-trail"));
    raw.auth.mode = "enforce".into();
    raw.auth.callers_file = Some(callers);
    raw.audit.max_entries = 50;
    let server = TestServer::start(raw).await;
    // The config was validated at start: the file is no longer needed.
    drop(dir);
    let mut client = server.client().await;
    client
        .start_tryout(with_token(pb::StartTryoutRequest {}, &operator))
        .await
        .expect("the operator starts the tryout");
    (redis, server, client, operator, pbx)
}

/// Every entry of the trail, newest first (paged).
async fn whole_trail(client: &common::Client, operator: &str) -> Vec<pb::AuditEvent> {
    let mut events = Vec::new();
    let mut token = String::new();
    loop {
        let page = client
            .clone()
            .list_audit_events(with_token(
                pb::ListAuditEventsRequest {
                    page_size: 1000,
                    page_token: token,
                    user_id: String::new(),
                },
                operator,
            ))
            .await
            .expect("list the audit trail")
            .into_inner();
        events.extend(page.events);
        if page.next_page_token.is_empty() {
            return events;
        }
        token = page.next_page_token;
    }
}

/// Runs `FLOOD_CALLS` calls of `call(i)`, `FLOOD_CONCURRENCY` at a time, and
/// checks each ends with `code`; the flood's duration in whole seconds, rounded up.
async fn flood<F, Fut>(code: Code, call: F) -> u64
where
    F: Fn(u64) -> Fut,
    Fut: std::future::Future<Output = Code>,
{
    use futures::StreamExt as _;
    let started = std::time::Instant::now();
    let codes: Vec<Code> = futures::stream::iter(0..FLOOD_CALLS)
        .map(call)
        .buffer_unordered(FLOOD_CONCURRENCY)
        .collect()
        .await;
    assert!(codes.iter().all(|c| *c == code), "every call ends {code:?}");
    started.elapsed().as_secs() + 1
}

/// Waits (bounded) until the refusals that `matches` account for the whole
/// flood (their summaries are written a second after it); checks that the
/// operator's `StartTryout` is still listed and that the refusals were
/// bounded in total and summarized; returns them.
async fn check_flood_bounded(
    client: &common::Client,
    operator: &str,
    seconds: u64,
    matches: impl Fn(&pb::AuditEvent) -> bool,
) -> Vec<pb::AuditEvent> {
    let accounted = common::eventually(Duration::from_secs(15), || {
        let client = client.clone();
        let matches = &matches;
        async move {
            let trail = whole_trail(&client, operator).await;
            let refusals: u64 = trail.iter().filter(|e| matches(e)).map(refusals_in).sum();
            refusals == FLOOD_CALLS
        }
    })
    .await;
    let trail = whole_trail(client, operator).await;
    let refusals: Vec<pb::AuditEvent> = trail.iter().filter(|e| matches(e)).cloned().collect();
    assert!(
        trail
            .iter()
            .any(|e| e.method == "StartTryout" && e.caller == "ops" && e.code == "OK"),
        "the operator's StartTryout is still listed ({} entries)",
        trail.len()
    );
    assert!(accounted, "every refusal is accounted for: {refusals:#?}");
    use comtrexx_licensing::domain::audit::{
        REFUSALS_STORED_PER_INTERVAL_TOTAL, SUMMARIES_PER_INTERVAL,
    };
    // Per second of the flood (and the one after it): the total allowance
    // and the summaries, whatever the keys.
    let bound = (u64::from(REFUSALS_STORED_PER_INTERVAL_TOTAL) + SUMMARIES_PER_INTERVAL as u64 + 1)
        * (seconds + 1);
    assert!(
        (refusals.len() as u64) <= bound,
        "{} refusal entries for {FLOOD_CALLS} refusals in {seconds} s (bound {bound})",
        refusals.len()
    );
    assert!(
        refusals.iter().any(|e| refusals_in(e) > 1),
        "the flood is summarized"
    );
    refusals
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn made_up_paths_never_push_an_operators_change_out() {
    let (_redis, server, client, operator, _) = small_trail().await;
    let channel = tonic::transport::Channel::from_shared(server.endpoint())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let seconds = flood(Code::Unauthenticated, |i| {
        let mut grpc = tonic::client::Grpc::new(channel.clone());
        async move {
            grpc.ready().await.unwrap();
            let path = http::uri::PathAndQuery::try_from(format!("/x.Y/Z{i}")).unwrap();
            let codec = tonic_prost::ProstCodec::<(), ()>::default();
            grpc.unary(tonic::Request::new(()), path, codec)
                .await
                .unwrap_err()
                .code()
        }
    })
    .await;
    let refusals =
        check_flood_bounded(&client, &operator, seconds, |e| e.code == "UNAUTHENTICATED").await;
    // One method for every path the service does not serve; the path is in the detail.
    for event in &refusals {
        assert_eq!(event.method, "(unknown)", "{event:?}");
    }
    assert!(
        refusals.iter().any(|e| e.detail.contains("/x.Y/Z")),
        "{refusals:#?}"
    );
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_handler_refusals_never_pushes_an_operators_change_out() {
    let (_redis, server, client, operator, pbx) = small_trail().await;
    // A misconfigured PBX: CheckSeat without a user id, again and again.
    let seconds = flood(Code::InvalidArgument, |_| {
        let mut client = client.clone();
        let request = with_token(pb::CheckSeatRequest::default(), &pbx);
        async move { client.check_seat(request).await.unwrap_err().code() }
    })
    .await;
    check_flood_bounded(&client, &operator, seconds, |e| {
        e.method == "CheckSeat" && e.code == "INVALID_ARGUMENT"
    })
    .await;
    server.shutdown().await;
}
