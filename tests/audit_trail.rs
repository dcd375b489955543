//! The audit trail across replicas: entries recorded by one replica (accepted
//! and refused calls, refusals of the handler and of the authorization layer)
//! are listed by another on the same Redis; accepted reads are not recorded.

mod common;

use std::time::Duration;

use common::{RedisServer, TestServer, config, refusals_in};
use comtrexx_licensing::auth::callers::{new_token, token_sha256};
use comtrexx_licensing::grpc::pb;
use tonic::Code;

fn with_token<T>(message: T, token: &str) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    request
}

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
    let callers = dir.path().join("callers.toml");
    std::fs::write(
        &callers,
        format!(
            "[[caller]]\nname = \"admin-ui\"\nrole = \"user_management\"\ntoken_sha256 = \"{}\"\n\n\
             [[caller]]\nname = \"pbx\"\nrole = \"call_handling\"\ntoken_sha256 = \"{}\"\n",
            token_sha256(&admin),
            token_sha256(&pbx)
        ),
    )
    .unwrap();
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
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let mut last = trail(&mut b, "").await;
    while last != expected && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
        last = trail(&mut b, "").await;
    }
    assert_eq!(last, expected, "the second replica's trail");
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
    let callers = dir.path().join("callers.toml");
    std::fs::write(
        &callers,
        format!(
            "[[caller]]\nname = \"ops\"\nrole = \"operator\"\ntoken_sha256 = \"{}\"\n",
            token_sha256(&operator)
        ),
    )
    .unwrap();
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
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let (accounted, entries) = loop {
        let entries: Vec<pb::AuditEvent> = client
            .clone()
            .list_audit_events(with_token(
                pb::ListAuditEventsRequest {
                    page_size: 1000,
                    ..Default::default()
                },
                &operator,
            ))
            .await
            .unwrap()
            .into_inner()
            .events
            .into_iter()
            .filter(|e| e.method == "CheckSeat" && e.code == "UNAUTHENTICATED")
            .collect();
        let accounted = entries.iter().map(refusals_in).sum::<u64>() == FLOOD;
        if accounted || std::time::Instant::now() > deadline {
            break (accounted, entries);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
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
