//! A first end-to-end flow over real gRPC against a real Redis.

mod common;

use chrono::Utc;
use common::*;
use comtrexx_licensing::domain::{Edition, Feature};
use comtrexx_licensing::grpc::pb;

#[tokio::test]
async fn license_assign_check_release_list() {
    let redis = RedisServer::start();
    let vendor = Vendor::new();
    let serial = serial("flow");
    vendor.write_license(&serial, Edition::Vm, Utc::now(), &[(Feature::User, 2)]);
    let server = TestServer::start(licensed_config(Some(&redis), &serial, &vendor)).await;
    let mut client = server.client().await;

    // The start-up reconcile applies the license.
    wait_active(&client).await;

    let assigned = client
        .assign_seat(pb::AssignSeatRequest {
            user_id: "alice".into(),
            feature: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(assigned.created);
    let check = client
        .check_seat(pb::CheckSeatRequest {
            user_id: "alice".into(),
            feature: String::new(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(check.licensed);
    assert_eq!(check.reason, pb::SeatReason::Assigned as i32);
    assert!(!check.stale);

    client
        .assign_seat(pb::AssignSeatRequest {
            user_id: "bob".into(),
            feature: "user".into(),
        })
        .await
        .unwrap();
    let err = client
        .assign_seat(pb::AssignSeatRequest {
            user_id: "carol".into(),
            feature: "user".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::ResourceExhausted);

    let list = client
        .list_seats(pb::ListSeatsRequest {
            feature: String::new(),
            page_size: 1,
            page_token: String::new(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(list.seats.len(), 1);
    assert_eq!(list.seats[0].user_id, "alice");
    let page2 = client
        .list_seats(pb::ListSeatsRequest {
            feature: String::new(),
            page_size: 1,
            page_token: list.next_page_token,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(page2.seats[0].user_id, "bob");
    assert!(page2.next_page_token.is_empty());

    let released = client
        .release_seat(pb::ReleaseSeatRequest {
            user_id: "alice".into(),
            feature: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(released.released);
    server.shutdown().await;
}

/// A replica reads its own writes at once: every seat assigned through it is
/// licensed on the very next `CheckSeat`, also in a burst of writes (the mirror
/// never regresses to an older snapshot).
async fn reads_own_writes(redis: Option<&RedisServer>) {
    let vendor = Vendor::new();
    let serial = serial("ryw");
    vendor.write_license(&serial, Edition::Vm, Utc::now(), &[(Feature::User, 1000)]);
    let server = TestServer::start(licensed_config(redis, &serial, &vendor)).await;
    let mut client = server.client().await;
    wait_active(&client).await;
    for i in 0..300 {
        let user = format!("burst-{i}");
        client
            .assign_seat(pb::AssignSeatRequest {
                user_id: user.clone(),
                feature: String::new(),
            })
            .await
            .unwrap();
        assert!(
            licensed(&mut client, &user).await,
            "{user} not licensed right after its assignment"
        );
        if i % 3 == 0 {
            client
                .release_seat(pb::ReleaseSeatRequest {
                    user_id: user.clone(),
                    feature: String::new(),
                })
                .await
                .unwrap();
            assert!(
                !licensed(&mut client, &user).await,
                "{user} still licensed right after its release"
            );
        }
    }
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_own_writes_memory() {
    reads_own_writes(None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_own_writes_redis() {
    let redis = RedisServer::start();
    reads_own_writes(Some(&redis)).await;
}
