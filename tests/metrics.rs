//! The Prometheus endpoint serves the documented names, with values that follow
//! the seats.

mod common;

use std::sync::Arc;

use chrono::Utc;
use common::*;
use comtrexx_licensing::app::App;
use comtrexx_licensing::domain::{Edition, Feature, SystemClock};
use comtrexx_licensing::grpc::pb;
use comtrexx_licensing::grpc::pb::licensing_service_client::LicensingServiceClient;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// GETs `/metrics` over plain HTTP/1.1.
async fn scrape(addr: std::net::SocketAddr) -> String {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    response
}

/// The value of the sample whose line starts with `prefix` (name and labels).
fn value(body: &str, prefix: &str) -> f64 {
    body.lines()
        .find(|l| l.starts_with(prefix))
        .unwrap_or_else(|| panic!("no sample {prefix} in:\n{body}"))
        .rsplit(' ')
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

#[tokio::test]
async fn metrics_follow_the_seats() {
    let redis = RedisServer::start();
    let vendor = Vendor::new();
    let serial = serial("metrics");
    vendor.write_license(&serial, Edition::Vm, Utc::now(), &[(Feature::User, 5)]);
    let mut raw = licensed_config(Some(&redis), &serial, &vendor);
    raw.listen_addr = "127.0.0.1:0".into();
    let config = raw.validate().unwrap();
    let app = App::build(&config, Arc::new(SystemClock)).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let metrics_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (addr, metrics_addr) = (
        listener.local_addr().unwrap(),
        metrics_listener.local_addr().unwrap(),
    );
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(app.run(listener, Some(metrics_listener), async {
        let _ = stopped.await;
    }));
    let mut client = LicensingServiceClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    // Wait for the start-up reconcile.
    wait_active(&client).await;

    let before = scrape(metrics_addr).await;
    for name in [
        "licensing_rpc_requests_total",
        "licensing_rpc_duration_seconds",
        "licensing_seats_in_use",
        "licensing_seats_capacity",
        "licensing_tryout_days_remaining",
        "licensing_grace_days_remaining",
        "licensing_reconcile_total",
        "licensing_mirror_staleness_seconds",
        "licensing_mirror_stale",
        "licensing_redis_errors",
    ] {
        assert!(before.contains(name), "{name} missing in:\n{before}");
    }
    let in_use = r#"licensing_seats_in_use{feature="user",source="purchased"}"#;
    assert_eq!(value(&before, in_use), 0.0);
    assert_eq!(
        value(
            &before,
            r#"licensing_seats_capacity{feature="user",source="purchased"}"#
        ),
        5.0
    );
    assert_eq!(value(&before, "licensing_mirror_stale "), 0.0);

    for user in ["a", "b"] {
        client
            .assign_seat(pb::AssignSeatRequest {
                user_id: user.into(),
                feature: String::new(),
            })
            .await
            .unwrap();
    }
    let _ = client
        .assign_seat(pb::AssignSeatRequest {
            user_id: String::new(),
            feature: String::new(),
        })
        .await
        .unwrap_err();
    let after = scrape(metrics_addr).await;
    assert_eq!(value(&after, in_use), 2.0);
    let ok = r#"licensing_rpc_requests_total{method="AssignSeat",code="OK"}"#;
    let invalid = r#"licensing_rpc_requests_total{method="AssignSeat",code="INVALID_ARGUMENT"}"#;
    assert!(value(&after, ok) >= 2.0);
    assert!(value(&after, invalid) >= 1.0);
    assert!(value(&after, r#"licensing_reconcile_total{outcome="updated"}"#) >= 1.0);

    client
        .release_seat(pb::ReleaseSeatRequest {
            user_id: "a".into(),
            feature: String::new(),
        })
        .await
        .unwrap();
    assert_eq!(value(&scrape(metrics_addr).await, in_use), 1.0);

    // Redis gone: staleness shows and Redis errors are counted.
    drop(redis);
    let _ = client
        .assign_seat(pb::AssignSeatRequest {
            user_id: "c".into(),
            feature: String::new(),
        })
        .await
        .unwrap_err();
    assert!(
        eventually(std::time::Duration::from_secs(10), || async {
            value(&scrape(metrics_addr).await, "licensing_mirror_stale ") == 1.0
        })
        .await
    );
    let down = scrape(metrics_addr).await;
    assert!(value(&down, r#"licensing_redis_errors_total{operation="assign"}"#) >= 1.0);
    let _ = stop.send(());
    task.await.unwrap().unwrap();
}
