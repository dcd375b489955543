//! `CheckSeat`'s capacity is out of reach of other callers and other RPCs, and
//! idle connections cannot exhaust the process: real sockets against the real
//! server. Bodiless streams come from a raw HTTP/2 client (`tests/h2_flood.py`,
//! Debian's `python3-h2`); idle sockets from loopback addresses of their own
//! (127.0.0.2, 127.0.0.3), so the caps per peer apply to them alone.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use chrono::Utc;
use common::flood::{Flood, idle_socket};
use common::pki::{Pki, tls_channel};
use common::*;
use comtrexx_licensing::auth::Role;
use comtrexx_licensing::auth::callers::new_token;
use comtrexx_licensing::config::RawConfig;
use comtrexx_licensing::domain::{Edition, Feature};
use comtrexx_licensing::grpc::pb;
use comtrexx_licensing::grpc::pb::licensing_service_client::LicensingServiceClient;
use comtrexx_licensing::metrics::metrics;
use tonic::Code;
use tonic::service::Interceptor;
use tonic::transport::Channel;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;
use tonic_types::StatusExt as _;

/// Upper bound for anything the tests wait for.
const WAIT: Duration = Duration::from_secs(10);

fn reason(status: &tonic::Status) -> String {
    status
        .get_details_error_info()
        .map(|i| i.reason)
        .unwrap_or_default()
}

/// `auth.mode = enforce` with a callers file naming `callers` (name, role),
/// each with a new bearer token; returns the tokens in that order.
fn enforce(raw: &mut RawConfig, dir: &Path, callers: &[(&str, Role)]) -> Vec<String> {
    raw.auth.mode = "enforce".into();
    with_callers(raw, dir, callers)
}

/// A callers file naming `callers` (name, role), each with a new bearer
/// token; returns the tokens in that order.
fn with_callers(raw: &mut RawConfig, dir: &Path, callers: &[(&str, Role)]) -> Vec<String> {
    let tokens: Vec<String> = callers.iter().map(|_| new_token()).collect();
    let roles: Vec<String> = callers.iter().map(|(_, role)| role.to_string()).collect();
    let entries: Vec<(&str, &str, &str)> = callers
        .iter()
        .zip(&roles)
        .zip(&tokens)
        .map(|(((name, _), role), token)| (*name, role.as_str(), token.as_str()))
        .collect();
    raw.auth.callers_file = Some(token_callers_file(dir, &entries));
    tokens
}

/// Adds a bearer token to every call.
#[derive(Clone)]
struct Bearer(tonic::metadata::MetadataValue<tonic::metadata::Ascii>);

impl Interceptor for Bearer {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        request
            .metadata_mut()
            .insert("authorization", self.0.clone());
        Ok(request)
    }
}

type TokenClient =
    LicensingServiceClient<tonic::service::interceptor::InterceptedService<Channel, Bearer>>;

/// A client of its own connection, calling with `token`.
async fn token_client(addr: SocketAddr, token: &str) -> TokenClient {
    let channel = Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let bearer = Bearer(format!("Bearer {token}").parse().unwrap());
    LicensingServiceClient::with_interceptor(channel, bearer)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodiless_streams_of_other_callers_take_no_check_seat_capacity() {
    let dir = tempfile::tempdir().unwrap();
    let mut raw = config(None, &serial("isolate"));
    raw.limits.concurrent_hot_path = 64;
    raw.limits.max_streams_per_connection = 100;
    let tokens = enforce(
        &mut raw,
        dir.path(),
        &[
            ("pbx", Role::CallHandling),
            ("monitor", Role::Monitoring),
            ("greedy-pbx", Role::CallHandling),
        ],
    );
    let server = TestServer::start(raw).await;
    let mut pbx = token_client(server.addr, &tokens[0]).await;
    pbx.check_seat(check_request("alice")).await.unwrap();

    // A monitoring caller opens GetTryoutStatus streams, another call-handling
    // caller CheckSeat streams; neither sends a body. Each stream has been
    // read by the server once the script says so.
    let mut tryout = Flood::start(
        server.addr,
        "GetTryoutStatus",
        Some(&tokens[1]),
        (300, 2),
        &[],
    );
    let mut checks = Flood::start(server.addr, "CheckSeat", Some(&tokens[2]), (300, 2), &[]);
    let (tryout_ready, checks_ready) = (tryout.line().await, checks.line().await);

    for i in 0..200 {
        let answer = pbx.check_seat(check_request("alice")).await;
        assert!(answer.is_ok(), "CheckSeat {i} during the flood: {answer:?}");
    }
    let mut fresh = token_client(server.addr, &tokens[0]).await;
    fresh
        .check_seat(check_request("alice"))
        .await
        .expect("CheckSeat on a new connection during the flood");

    // The server advertises its stream limit, and a connection gets no more.
    for ready in [&tryout_ready, &checks_ready] {
        assert_eq!(ready["max_concurrent_streams"], 100, "{ready}");
        assert_eq!(ready["opened"], 200, "two connections of 100: {ready}");
    }
    tryout.finish().await;
    checks.finish().await;
    pbx.check_seat(check_request("alice")).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_without_its_body_is_answered_after_the_body_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let mut raw = config(None, &serial("bodyless"));
    raw.limits.request_body_timeout_ms = 200;
    let tokens = enforce(&mut raw, dir.path(), &[("monitor", Role::Monitoring)]);
    let server = TestServer::start(raw).await;
    let wait = WAIT.as_secs().to_string();
    let mut flood = Flood::start(
        server.addr,
        "GetTryoutStatus",
        Some(&tokens[0]),
        (20, 1),
        &["--until-answered", &wait],
    );
    assert_eq!(flood.line().await["opened"], 20);
    // Every stream is answered (DEADLINE_EXCEEDED, REQUEST_INCOMPLETE) well
    // before the server-side deadline: nothing waits for a body for long.
    let report = flood.line().await;
    assert_eq!(report["answered"], 20, "{report}");
    assert_eq!(report["statuses"]["4"], 20, "{report}");
    let mut client = token_client(server.addr, &tokens[0]).await;
    client
        .get_tryout_status(pb::GetTryoutStatusRequest::default())
        .await
        .unwrap();
}

/// Waits until every socket of `closed` was closed by the server.
async fn all_closed(closed: Vec<tokio::task::JoinHandle<()>>, within: Duration) -> bool {
    tokio::time::timeout(within, futures::future::join_all(closed))
        .await
        .is_ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_are_closed_and_capped_per_peer_and_in_total() {
    let mut raw = config(None, &serial("idle"));
    raw.limits.handshake_timeout_ms = 1000;
    raw.limits.max_connections_per_peer = 8;
    raw.limits.max_connections = 12;
    let server = TestServer::start(raw).await;
    // Call handling's connection is open before the idle sockets come.
    let mut pbx = server.client().await;
    pbx.check_seat(check_request("alice")).await.unwrap();
    let refused = |reason| metrics().connections_refused_count(reason);
    let before = ["per_peer", "total", "preface_timeout"].map(refused);

    // 8 from one peer are taken, 4 more refused; from another peer, 3 more
    // reach the total of 12 (with call handling's), 2 are refused.
    let mut sockets = Vec::new();
    for _ in 0..12 {
        sockets.push(idle_socket("127.0.0.2", server.addr).await);
    }
    for _ in 0..5 {
        sockets.push(idle_socket("127.0.0.3", server.addr).await);
    }
    assert!(
        all_closed(sockets, WAIT).await,
        "idle sockets are closed after the handshake timeout"
    );
    let after = ["per_peer", "total", "preface_timeout"].map(refused);
    assert!(
        after[0] >= before[0] + 4,
        "per peer: {before:?} → {after:?}"
    );
    assert!(after[1] >= before[1] + 2, "total: {before:?} → {after:?}");
    assert!(
        after[2] >= before[2] + 11,
        "preface: {before:?} → {after:?}"
    );
    // Call handling's connection outlived the timeout: it sent its preface.
    pbx.check_seat(check_request("alice")).await.unwrap();
    // And the places are free again.
    let mut fresh = server.client().await;
    fresh.check_seat(check_request("alice")).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_tls_client_is_closed_after_the_handshake_timeout() {
    let pki = Pki::new("silent");
    let (cert, key) = pki.write_server(&pki.server("server"));
    let mut raw = config(None, &serial("tls-idle"));
    raw.tls.cert_file = Some(cert);
    raw.tls.key_file = Some(key);
    raw.limits.handshake_timeout_ms = 300;
    let server = TestServer::start(raw).await;
    let mut sockets = Vec::new();
    for _ in 0..5 {
        sockets.push(idle_socket("127.0.0.2", server.addr).await);
    }
    // Well before the fixed 10 s handshake bound this replica used to have.
    assert!(
        all_closed(sockets, Duration::from_secs(5)).await,
        "silent TLS clients are closed after the handshake timeout"
    );
    let channel = tls_channel(server.addr, &pki.ca_pem(), None).await;
    LicensingServiceClient::new(channel)
        .check_seat(check_request("alice"))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_watches_are_bounded_and_end_when_the_server_drains() {
    let mut raw = config(None, &serial("watch"));
    raw.limits.health_watches_per_peer = 2;
    // A watch that held the drain open would hold it this long.
    raw.drain_timeout_ms = 120_000;
    let server = TestServer::start(raw).await;
    let channel = Channel::from_shared(server.endpoint())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = HealthClient::new(channel);
    let whole = || HealthCheckRequest {
        service: String::new(),
    };
    let mut watches = Vec::new();
    for _ in 0..2 {
        let mut watch = health.watch(whole()).await.unwrap().into_inner();
        assert_eq!(watch.message().await.unwrap().unwrap().status, 1, "SERVING");
        watches.push(watch);
    }
    let status = health.watch(whole()).await.unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert_eq!(reason(&status), "TOO_MANY_WATCHES");
    health.check(whole()).await.expect("Check is not bounded");

    tokio::time::timeout(WAIT, server.shutdown())
        .await
        .expect("the drain does not wait for health watches");
    for mut watch in watches {
        let end = loop {
            match watch.message().await {
                Ok(Some(_)) => continue, // NOT_SERVING
                end => break end,
            }
        };
        let status = end.expect_err("the watch ends with a status");
        assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_caller_holds_at_most_its_share_of_a_budget() {
    let redis = RedisServer::start();
    let vendor = Vendor::new();
    let serial = serial("share");
    vendor.write_license(
        &serial,
        Edition::Vm,
        Utc::now() - chrono::Duration::days(1),
        &[(Feature::User, 1000)],
    );
    let dir = tempfile::tempdir().unwrap();
    let mut raw = licensed_config(Some(&redis), &serial, &vendor);
    raw.redis_timeout_ms = 5000;
    raw.limits.concurrent_writes = 4;
    raw.limits.caller_share_percent = 50;
    // Protected mode: the test itself calls from loopback as an operator.
    let tokens = with_callers(
        &mut raw,
        dir.path(),
        &[
            ("greedy", Role::UserManagement),
            ("other", Role::UserManagement),
        ],
    );
    let server = TestServer::start(raw).await;
    wait_active(&server.client().await).await;
    let assign = |user: String| pb::AssignSeatRequest {
        user_id: user,
        feature: String::new(),
    };
    let greedy = token_client(server.addr, &tokens[0]).await;
    let other = token_client(server.addr, &tokens[1]).await;

    // The store stalls: admitted writes wait for it.
    pause_redis(&redis, 2000);
    let (answers_tx, mut answers) = tokio::sync::mpsc::unbounded_channel();
    for i in 0..6 {
        let mut c = greedy.clone();
        let tx = answers_tx.clone();
        tokio::spawn(async move {
            let _ = tx.send(c.assign_seat(assign(format!("greedy-{i}"))).await);
        });
    }
    // Beyond its share of 2, the greedy caller is refused at once.
    let mut refused = Vec::new();
    while refused.len() < 4 {
        let answer = tokio::time::timeout(WAIT, answers.recv())
            .await
            .unwrap()
            .unwrap();
        refused.push(answer.expect_err("beyond the share"));
    }
    for status in &refused {
        assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
        assert_eq!(reason(status), "CALLER_SHARE_EXCEEDED");
    }
    // The other caller's writes get the rest of the budget while the greedy
    // caller's wait.
    let others = futures::future::join_all((0..2).map(|i| {
        let mut c = other.clone();
        async move { c.assign_seat(assign(format!("other-{i}"))).await }
    }))
    .await;
    for answer in others {
        answer.expect("the other caller is served");
    }
    for _ in 0..2 {
        let answer = tokio::time::timeout(WAIT, answers.recv())
            .await
            .unwrap()
            .unwrap();
        answer.expect("the greedy caller's share is served");
    }
}
