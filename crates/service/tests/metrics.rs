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

/// The body of an HTTP response.
fn body(response: &str) -> &str {
    response.split_once("\r\n\r\n").map_or("", |(_, b)| b)
}

/// Checks the structure of a text-format scrape as a strict parser would: every
/// metric family has exactly one `HELP` and one `TYPE` line, before its samples,
/// and its samples are contiguous (one family per name, with all its label sets);
/// counters end in `_total`; names are snake_case with the `licensing_` prefix.
fn check_exposition(body: &str) {
    use std::collections::HashMap;
    let mut help: HashMap<&str, usize> = HashMap::new();
    let mut types: HashMap<&str, &str> = HashMap::new();
    let mut finished: Vec<&str> = Vec::new();
    let mut current: Option<&str> = None;
    for line in body.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let name = rest.split(' ').next().unwrap();
            *help.entry(name).or_default() += 1;
            assert_eq!(help[name], 1, "second HELP for {name}:\n{body}");
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap();
            assert!(types.insert(name, kind).is_none(), "second TYPE for {name}");
            assert!(help.contains_key(name), "TYPE {name} without HELP");
            if let Some(done) = current.replace(name) {
                finished.push(done);
            }
            assert!(!finished.contains(&name), "family {name} split:\n{body}");
            assert!(
                name.starts_with("licensing_")
                    && name
                        .bytes()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_'),
                "{name} is not snake_case with the licensing_ prefix"
            );
            match kind {
                "counter" => assert!(name.ends_with("_total"), "counter {name} without _total"),
                "gauge" | "histogram" => {
                    assert!(!name.ends_with("_total"), "{kind} {name} ends in _total")
                }
                other => panic!("unexpected type {other} of {name}"),
            }
            continue;
        }
        assert!(
            !line.starts_with('#'),
            "unexpected comment in the text format: {line}"
        );
        if line.is_empty() {
            continue;
        }
        let sample = line.split(['{', ' ']).next().unwrap();
        let family = current.unwrap_or_else(|| panic!("sample before any TYPE: {line}"));
        let ok = sample == family
            || types[family] == "histogram"
                && ["_bucket", "_sum", "_count"]
                    .iter()
                    .any(|suffix| sample.strip_suffix(suffix) == Some(family));
        assert!(
            ok,
            "sample {sample} outside its family (in {family}):\n{body}"
        );
    }
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
    check_exposition(body(&before));
    for name in [
        "licensing_rpc_requests_total",
        "licensing_rpc_duration_seconds",
        "licensing_seats_in_use",
        "licensing_seats_capacity",
        "licensing_tryout_remaining_seconds",
        "licensing_tryout_state",
        "licensing_grace_remaining_seconds",
        "licensing_activation_state",
        "licensing_seats_over_capacity",
        "licensing_reconciles_total",
        "licensing_reconcile_last_outcome",
        "licensing_reconcile_last_success_timestamp_seconds",
        "licensing_reconcile_interval_seconds",
        "licensing_mirror_staleness_seconds",
        "licensing_mirror_stale",
        "licensing_clock_skew_seconds",
        "licensing_clock_skewed",
        "licensing_clock_skews_total",
        "licensing_redis_errors",
        "licensing_audit_not_stored_total{reason=\"queue_full\"}",
        "licensing_audit_not_stored_total{reason=\"store\"}",
        "licensing_audit_not_stored_total{reason=\"stopped\"}",
        "licensing_audit_waits_total",
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
    assert_eq!(value(&before, "licensing_clock_skewed "), 0.0);

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
    check_exposition(body(&after));
    assert_eq!(value(&after, in_use), 2.0);
    let ok = r#"licensing_rpc_requests_total{method="AssignSeat",code="OK"}"#;
    let invalid = r#"licensing_rpc_requests_total{method="AssignSeat",code="INVALID_ARGUMENT"}"#;
    assert!(value(&after, ok) >= 2.0);
    assert!(value(&after, invalid) >= 1.0);
    assert!(value(&after, r#"licensing_reconciles_total{outcome="updated"}"#) >= 1.0);

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
    check_exposition(body(&down));
    assert!(value(&down, r#"licensing_redis_errors_total{operation="assign"}"#) >= 1.0);
    let _ = stop.send(());
    task.await.unwrap().unwrap();
}

/// The structure check rejects what strict parsers reject (the repeated families of
/// a gauge emitted per feature), and accepts a well-formed exposition.
#[test]
fn exposition_check_catches_repeated_families() {
    let good = "# HELP licensing_x_total X.\n# TYPE licensing_x_total counter\nlicensing_x_total{a=\"1\"} 1\n\
                # HELP licensing_y Y.\n# TYPE licensing_y gauge\nlicensing_y{f=\"a\"} 1\nlicensing_y{f=\"b\"} 2\n";
    check_exposition(good);
    let repeated = "# HELP licensing_y Y.\n# TYPE licensing_y gauge\nlicensing_y{f=\"a\"} 1\n\
                    # HELP licensing_z Z.\n# TYPE licensing_z gauge\nlicensing_z{f=\"a\"} 1\n\
                    # HELP licensing_y Y.\n# TYPE licensing_y gauge\nlicensing_y{f=\"b\"} 2\n";
    let interleaved = "# HELP licensing_y Y.\n# TYPE licensing_y gauge\nlicensing_y{f=\"a\"} 1\n\
                       # HELP licensing_z Z.\n# TYPE licensing_z gauge\nlicensing_y{f=\"b\"} 2\n";
    let counter = "# HELP licensing_x X.\n# TYPE licensing_x counter\nlicensing_x 1\n";
    for bad in [repeated, interleaved, counter] {
        assert!(
            std::panic::catch_unwind(|| check_exposition(bad)).is_err(),
            "accepted:\n{bad}"
        );
    }
}

/// The metrics port also answers `grpc.health.v1.Health` (HTTP/2 without TLS,
/// no credentials), with the same status as the gRPC port: for the kubelet's
/// gRPC probe while the gRPC port speaks TLS and requires client certificates.
#[tokio::test]
async fn health_is_served_on_the_metrics_port_too() {
    use comtrexx_licensing::grpc::SERVICE_NAME;
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_client::HealthClient;

    let pki = common::pki::Pki::new("health CA");
    let (cert, key) = pki.write_server(&pki.server("server"));
    let mut raw = config(None, &serial("health"));
    raw.auth.mode = "enforce".into();
    // Enforce needs a callers file: one certificate caller.
    let callers = pki.dir.path().join("callers.toml");
    std::fs::write(
        &callers,
        "[[caller]]\nname = \"monitor\"\nrole = \"monitoring\"\ncertificate = \"spiffe://pbx.test/monitor\"\n",
    )
    .unwrap();
    raw.auth.callers_file = Some(callers);
    raw.tls.cert_file = Some(cert);
    raw.tls.key_file = Some(key);
    raw.tls.client_ca_file = Some(pki.ca_file());
    let config = raw.validate().unwrap();
    let app = App::build(&config, Arc::new(SystemClock)).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let metrics_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let metrics_addr = metrics_listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(app.run(listener, Some(metrics_listener), async {
        let _ = stopped.await;
    }));

    let channel = tonic::transport::Channel::from_shared(format!("http://{metrics_addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = HealthClient::new(channel.clone());
    let check = |service: &str| HealthCheckRequest {
        service: service.into(),
    };
    assert!(
        eventually(std::time::Duration::from_secs(10), || {
            let mut health = health.clone();
            async move {
                health
                    .check(check(SERVICE_NAME))
                    .await
                    .is_ok_and(|r| r.into_inner().status == ServingStatus::Serving as i32)
            }
        })
        .await,
        "the licensing service is SERVING on the metrics port"
    );
    let overall = health.check(check("")).await.unwrap().into_inner();
    assert_eq!(overall.status, ServingStatus::Serving as i32);
    let unknown = health.check(check("nope")).await.unwrap_err();
    assert_eq!(unknown.code(), tonic::Code::NotFound);
    // Only health: the licensing service is not reachable there.
    let status = LicensingServiceClient::new(channel)
        .get_license_overview(pb::GetLicenseOverviewRequest::default())
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unimplemented, "{status:?}");
    // Reflection there knows health (and itself) alone.
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    let MessageResponse::ListServicesResponse(list) = reflection_ask(
        &format!("http://{metrics_addr}"),
        MessageRequest::ListServices(String::new()),
    )
    .await
    else {
        panic!("expected a service list");
    };
    let names: Vec<&str> = list.service.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "grpc.health.v1.Health",
            "grpc.reflection.v1.ServerReflection"
        ]
    );
    // And /metrics still answers plain HTTP/1.1.
    check_exposition(body(&scrape(metrics_addr).await));

    // Draining: a watcher hears NOT_SERVING, and an open watch does not hold
    // the shutdown.
    let mut watch = health.watch(check("")).await.unwrap().into_inner();
    let first = watch.message().await.unwrap().unwrap();
    assert_eq!(first.status, ServingStatus::Serving as i32);
    let _ = stop.send(());
    let next = tokio::time::timeout(std::time::Duration::from_secs(10), watch.message())
        .await
        .expect("a status within the bound")
        .unwrap()
        .unwrap();
    assert_eq!(next.status, ServingStatus::NotServing as i32);
    tokio::time::timeout(std::time::Duration::from_secs(10), task)
        .await
        .expect("the service stops with a health watch open")
        .unwrap()
        .unwrap();
}
