//! Request limits and load protection over real gRPC (and a real Redis where
//! the store must be slow): message size, deadline, connection age, budgets per
//! class of RPC, event-stream caps and draining, rate limits, and coalesced
//! resyncs.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use chrono::Utc;
use common::*;
use comtrexx_licensing::domain::{Edition, Feature};
use comtrexx_licensing::grpc::pb;
use comtrexx_licensing::grpc::pb::licensing_service_client::LicensingServiceClient;
use futures::future::join_all;
use tonic::transport::Endpoint;
use tonic::{Code, Status};
use tonic_types::StatusExt as _;

/// Upper bound for anything the tests wait for.
const WAIT: Duration = Duration::from_secs(10);

fn reason(status: &Status) -> String {
    status
        .get_details_error_info()
        .map(|i| i.reason)
        .unwrap_or_default()
}

#[tokio::test]
async fn an_oversize_request_is_refused_and_the_server_lives() {
    let server = TestServer::start(config(None, &serial("size"))).await;
    let mut client = server.client().await;
    let huge = "u".repeat(70 * 1024); // over the default 64 KiB
    let status = client.check_seat(check_request(&huge)).await.unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert_eq!(reason(&status), "MESSAGE_TOO_LARGE");
    // The same connection and server go on answering.
    client.check_seat(check_request("alice")).await.unwrap();
    let mut fresh = server.client().await;
    fresh.check_seat(check_request("alice")).await.unwrap();
    // The refusal (made before any handler ran) is in the audit trail.
    let entries = audited(&client, 1, |e| {
        e.method == "CheckSeat" && e.code == "RESOURCE_EXHAUSTED"
    })
    .await;
    assert_eq!(entries.len(), 1, "{entries:?}");
    assert!(
        entries[0].detail.contains("larger than 65536 bytes"),
        "{entries:?}"
    );
    assert_eq!(
        entries[0].role, "operator",
        "a loopback caller: {entries:?}"
    );
}

#[tokio::test]
async fn the_server_deadline_ends_slow_calls_but_a_shorter_client_timeout_wins() {
    let redis = RedisServer::start();
    let mut cfg = config(Some(&redis), &serial("deadline"));
    cfg.redis_timeout_ms = 10_000;
    cfg.limits.rpc_deadline_ms = 300;
    let server = TestServer::start(cfg).await;
    let mut client = server.client().await;
    pause_redis(&redis, 1_000);
    // The store would answer after 1 s; the server-side deadline ends it first.
    let status = client
        .start_tryout(pb::StartTryoutRequest {})
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    assert_eq!(reason(&status), "DEADLINE_EXCEEDED");
    // A shorter client deadline (grpc-timeout) ends it earlier. tonic's client
    // keeps the same timer and reports it as CANCELLED; where the server's
    // answer arrives first, it names the client's deadline, never the server's.
    let mut request = tonic::Request::new(pb::StartTryoutRequest {});
    request.set_timeout(Duration::from_millis(50));
    let status = client.start_tryout(request).await.unwrap_err();
    match status.code() {
        Code::Cancelled => {}
        Code::DeadlineExceeded => {
            let info = status
                .get_details_error_info()
                .expect("the server's answer");
            assert_eq!(
                info.metadata["deadline_ms"], "50",
                "the client's deadline won"
            );
        }
        other => panic!("{other:?}: {status:?}"),
    }
    // CheckSeat never waits on the store anyway.
    client.check_seat(check_request("alice")).await.unwrap();
    // The handler that was cut off wrote no audit entry; the deadline's layer
    // did (stored once the store answers again).
    let entries = audited(&client, 1, |e| {
        e.method == "StartTryout" && e.detail.contains("deadline of 300 ms")
    })
    .await;
    assert_eq!(entries.len(), 1, "{entries:?}");
    assert_eq!(entries[0].code, "DEADLINE_EXCEEDED");
}

#[tokio::test]
async fn the_deadline_does_not_cut_an_event_stream() {
    let mut cfg = config(None, &serial("deadline-stream"));
    cfg.limits.rpc_deadline_ms = 200;
    let server = TestServer::start(cfg).await;
    let mut client = server.client().await;
    let mut stream = open_stream(&client).await.unwrap();
    // Let the deadline pass several times over while the stream is open.
    tokio::time::sleep(Duration::from_millis(800)).await;
    client
        .start_tryout(pb::StartTryoutRequest {})
        .await
        .unwrap();
    let event = tokio::time::timeout(WAIT, stream.message())
        .await
        .expect("an event within the bound")
        .expect("the stream is still open")
        .expect("an event, not the end");
    assert_eq!(event.kind, "tryout_started");
}

/// A client whose connector counts the connections it opens.
async fn counting_client(addr: std::net::SocketAddr) -> (Client, Arc<AtomicUsize>) {
    let opened = Arc::new(AtomicUsize::new(0));
    let counter = opened.clone();
    let channel = Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_with_connector(tower::service_fn(move |_uri: tonic::transport::Uri| {
            counter.fetch_add(1, Ordering::SeqCst);
            async move {
                let tcp = tokio::net::TcpStream::connect(addr).await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tcp))
            }
        }))
        .await
        .unwrap();
    (LicensingServiceClient::new(channel), opened)
}

#[tokio::test]
async fn old_connections_are_sent_away_so_clients_reconnect() {
    let mut cfg = config(None, &serial("age"));
    cfg.limits.max_connection_age_ms = 300;
    // A grace far beyond the test's calls: the GOAWAY at 300 ms is what sends the
    // client away; the hard close after the grace (tested below) must not cut a call
    // of a client that a loaded machine lets react late.
    cfg.limits.max_connection_age_grace_ms = 10_000;
    let server = TestServer::start(cfg).await;
    let (mut client, opened) = counting_client(server.addr).await;
    client.check_seat(check_request("alice")).await.unwrap();
    assert_eq!(opened.load(Ordering::SeqCst), 1);
    // Keep calling: once the first connection has had its GOAWAY the client
    // opens another, and no call is lost on the way.
    let reconnected = eventually(WAIT, || {
        let mut c = client.clone();
        let opened = opened.clone();
        async move {
            c.check_seat(check_request("alice")).await.unwrap();
            opened.load(Ordering::SeqCst) >= 2
        }
    })
    .await;
    assert!(reconnected, "the client never reconnected");
}

#[tokio::test]
async fn a_connection_past_age_and_grace_is_closed_even_with_a_stream_open() {
    let mut cfg = config(None, &serial("age-stream"));
    cfg.limits.max_connection_age_ms = 200;
    cfg.limits.max_connection_age_grace_ms = 200;
    let server = TestServer::start(cfg).await;
    let client = server.client().await;
    let mut stream = open_stream(&client).await.unwrap();
    // GOAWAY alone would leave this stream (and its connection) open forever.
    let end = tokio::time::timeout(WAIT, stream.message())
        .await
        .expect("the stream ended within the bound");
    assert!(!matches!(end, Ok(Some(_))), "{end:?}");
}

#[tokio::test]
async fn a_burst_of_writes_and_overview_calls_is_shed_while_check_seat_answers() {
    let redis = RedisServer::start();
    let vendor = Vendor::new();
    let serial = serial("shed");
    vendor.write_license(
        &serial,
        Edition::Vm,
        Utc::now() - chrono::Duration::days(1),
        &[(Feature::User, 1000)],
    );
    let mut cfg = licensed_config(Some(&redis), &serial, &vendor);
    cfg.redis_timeout_ms = 1000;
    cfg.limits.concurrent_writes = 2;
    cfg.limits.concurrent_operator_reads = 1;
    // One client makes the whole burst: this is about the classes' budgets
    // (tests/hot_path_isolation.rs has the share of one caller).
    cfg.limits.caller_share_percent = 100;
    let server = TestServer::start(cfg).await;
    let client = server.client().await;
    wait_active(&client).await;
    let mut c = client.clone();
    c.assign_seat(assign_request("held")).await.unwrap();

    // The store stalls: admitted writes and seat lists wait for it, so the
    // burst finds its budgets full.
    pause_redis(&redis, 1500);
    let writes = (0..40).map(|i| {
        let mut c = client.clone();
        async move {
            c.assign_seat(assign_request(&format!("burst-{i}")))
                .await
                .map(|_| ())
        }
    });
    let reads = (0..40).map(|i| {
        let mut c = client.clone();
        async move {
            if i % 2 == 0 {
                c.list_seats(pb::ListSeatsRequest::default())
                    .await
                    .map(|_| ())
            } else {
                c.get_license_overview(pb::GetLicenseOverviewRequest::default())
                    .await
                    .map(|_| ())
            }
        }
    });
    let checks = (0..8).map(|_| {
        let mut c = client.clone();
        async move {
            let mut answers = Vec::new();
            for _ in 0..25 {
                answers.push(c.check_seat(check_request("held")).await);
            }
            answers
        }
    });
    let (writes, reads, checks) = tokio::join!(join_all(writes), join_all(reads), join_all(checks));

    for answer in checks.into_iter().flatten() {
        let answer = answer.expect("CheckSeat answers during the burst");
        assert!(answer.into_inner().licensed);
    }
    let shed = |results: &[Result<(), Status>]| {
        results
            .iter()
            .filter(|r| matches!(r, Err(s) if s.code() == Code::Unavailable && reason(s) == "OVERLOADED"))
            .count()
    };
    assert!(shed(&writes) > 0, "no write was shed: {writes:?}");
    assert!(shed(&reads) > 0, "no operator read was shed: {reads:?}");
    // A shed call says when to come back.
    let shed_status = writes
        .iter()
        .filter_map(|r| r.as_ref().err())
        .find(|s| reason(s) == "OVERLOADED")
        .unwrap();
    assert!(shed_status.get_details_retry_info().is_some());
    // Every shed call is in the audit trail, though no handler saw it: on its
    // own, or counted in the summary of the burst. A summary is per caller,
    // method and code, so it also counts the admitted calls the stalled store
    // made UNAVAILABLE.
    let overloaded = |e: &pb::AuditEvent| e.code == "UNAVAILABLE";
    let unavailable = |results: &[Result<(), Status>]| {
        results
            .iter()
            .filter(|r| matches!(r, Err(s) if s.code() == Code::Unavailable))
            .count()
    };
    let total = |found: &[pb::AuditEvent]| found.iter().map(refusals_in).sum::<u64>() as usize;
    for (methods, expected) in [
        (&["AssignSeat"][..], unavailable(&writes)),
        (
            &["ListSeats", "GetLicenseOverview"][..],
            unavailable(&reads),
        ),
    ] {
        let found = audited_until(
            &client,
            |e| methods.contains(&e.method.as_str()) && overloaded(e),
            |found| total(found) >= expected,
        )
        .await;
        assert_eq!(total(&found), expected, "{methods:?}: {found:#?}");
    }
    // Afterwards (the store answers again) the budgets are free.
    let mut c = client.clone();
    c.assign_seat(assign_request("after")).await.unwrap();
    c.get_license_overview(pb::GetLicenseOverviewRequest::default())
        .await
        .unwrap();
}

async fn open_stream(
    client: &Client,
) -> Result<tonic::Streaming<pb::WatchLicenseEventsResponse>, Status> {
    let mut c = client.clone();
    c.watch_license_events(pb::WatchLicenseEventsRequest {})
        .await
        .map(tonic::Response::into_inner)
}

#[tokio::test]
async fn event_streams_are_capped_per_caller_and_freed_when_the_client_goes() {
    let mut cfg = config(None, &serial("watch-cap"));
    cfg.limits.watch_subscribers_per_caller = 2;
    let server = TestServer::start(cfg).await;
    let hub_count = || {
        server
            .app_parts
            .as_ref()
            .unwrap()
            .mirror
            .events()
            .receiver_count()
    };
    let baseline = hub_count();
    let client = server.client().await;
    let first = open_stream(&client).await.unwrap();
    let _second = open_stream(&client).await.unwrap();
    assert_eq!(hub_count(), baseline + 2);
    let status = open_stream(&client).await.unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert_eq!(reason(&status), "TOO_MANY_SUBSCRIBERS");

    // The client drops a stream: it is cleaned up at once, without waiting for
    // the next event, and the caller may open another.
    drop(first);
    assert!(
        eventually(WAIT, || async { hub_count() == baseline + 1 }).await,
        "the dropped stream's subscription lingers"
    );
    let _third = open_stream(&client).await.unwrap();
    // A client that goes away entirely (connection closed) frees its streams too.
    let other = server.client().await;
    drop(client);
    drop(_second);
    drop(_third);
    assert!(
        eventually(WAIT, || async { hub_count() == baseline }).await,
        "subscriptions of a closed connection linger"
    );
    let _again = open_stream(&other).await.unwrap();
}

#[tokio::test]
async fn draining_ends_event_streams_at_once_with_unavailable() {
    let mut cfg = config(None, &serial("watch-drain"));
    // Far beyond the bound below: a stream holding the drain would fail the test.
    cfg.drain_timeout_ms = 120_000;
    let server = TestServer::start(cfg).await;
    let client = server.client().await;
    let mut stream = open_stream(&client).await.unwrap();
    let shutdown = tokio::spawn(server.shutdown());
    let end = tokio::time::timeout(WAIT, stream.message())
        .await
        .expect("the stream ended within the bound");
    let status = end.expect_err("the stream ends with a status");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert_eq!(reason(&status), "SHUTTING_DOWN");
    tokio::time::timeout(WAIT, shutdown)
        .await
        .expect("the server finished draining within the bound")
        .unwrap();
}

#[tokio::test]
async fn activation_calls_are_rate_limited_per_caller() {
    let mut cfg = config(None, &serial("rate"));
    cfg.limits.activation_per_minute = 1;
    cfg.limits.activation_burst = 2;
    let server = TestServer::start(cfg).await;
    let mut client = server.client().await;
    let apply = || pb::ApplyActivationRequest {
        activation_response: "not a response".into(),
    };
    for _ in 0..2 {
        let status = client.apply_activation(apply()).await.unwrap_err();
        assert_ne!(status.code(), Code::ResourceExhausted, "{status:?}");
    }
    let status = client.apply_activation(apply()).await.unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert_eq!(reason(&status), "RATE_LIMITED");
    let retry = status
        .get_details_retry_info()
        .unwrap()
        .retry_delay
        .unwrap();
    assert!(
        retry > Duration::ZERO && retry <= Duration::from_secs(60),
        "{retry:?}"
    );
    // CreateInitializationCode has a bucket of its own.
    for _ in 0..2 {
        let answer = client
            .create_initialization_code(pb::CreateInitializationCodeRequest {})
            .await;
        assert!(
            !matches!(&answer, Err(s) if s.code() == Code::ResourceExhausted),
            "{answer:?}"
        );
    }
    let status = client
        .create_initialization_code(pb::CreateInitializationCodeRequest {})
        .await
        .unwrap_err();
    assert_eq!(reason(&status), "RATE_LIMITED");
}

#[tokio::test]
async fn failing_assigns_share_their_resyncs() {
    let redis = RedisServer::start();
    let mut cfg = config(Some(&redis), &serial("flight"));
    cfg.redis_timeout_ms = 5000;
    cfg.limits.concurrent_writes = 1000;
    let server = TestServer::start(cfg).await;
    let mirror = server.app_parts.as_ref().unwrap().mirror.clone();
    let client = server.client().await;
    let before = mirror.on_demand_resyncs();
    // No license and no tryout: every plan fails, and each failure asks for a
    // resync. The store stalls so the requests pile up behind the first one.
    pause_redis(&redis, 500);
    let assigns = (0..64).map(|i| {
        let mut c = client.clone();
        async move { c.assign_seat(assign_request(&format!("u{i}"))).await }
    });
    let answers = join_all(assigns).await;
    for answer in &answers {
        let status = answer.as_ref().expect_err("no pool to assign from");
        assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    }
    let resyncs = mirror.on_demand_resyncs() - before;
    assert!(resyncs >= 1, "the failing plans asked for no resync");
    assert!(resyncs <= 4, "64 failing assigns took {resyncs} resyncs");
}
