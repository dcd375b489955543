//! The audit trail across replicas: entries recorded by one replica (accepted
//! and refused calls, refusals of the handler and of the authorization layer)
//! are listed by another on the same Redis; accepted reads are not recorded.

mod common;

use std::time::Duration;

use common::{RedisServer, TestServer, config};
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
