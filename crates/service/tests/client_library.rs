//! The client library (`comtrexx-licensing-client`) and `licensing-agent`
//! against the real service: its decisions equal the server's `CheckSeat` for
//! every user over a randomized run (assigns, releases, the tryout, a
//! purchase, a capacity drop, time passing, a store that lost its data); a
//! replica killed mid-stream, resumed on another with no change lost or twice;
//! every replica killed (real processes), then the agent deciding from its copy
//! and, after its own restart, from its cache file; "unknown" before any copy.

mod common;

use std::collections::BTreeSet;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use common::*;
use comtrexx_licensing::config::RawConfig;
use comtrexx_licensing::domain::{Edition, Feature};
use comtrexx_licensing::grpc::pb;
use comtrexx_licensing_client::{Client as Local, Config, Decision};
use comtrexx_licensing_proto::seat_state::{seat_reason, seat_source};
use rand::rngs::StdRng;
use rand::{Rng as _, SeedableRng as _};
use tonic::Code;
use tonic_types::StatusExt as _;

const WAIT: Duration = Duration::from_secs(15);
const HEARTBEAT: Duration = Duration::from_millis(200);
const USERS: [&str; 10] = [
    "ann", "bob", "cy", "dee", "eve", "fay", "gus", "hal", "ida", "jo",
];
const FEATURES: [Feature; 2] = [Feature::User, Feature::CallAssist];

fn local_config(endpoints: Vec<String>) -> Config {
    Config {
        endpoints,
        heartbeat: HEARTBEAT,
        backoff_min: Duration::from_millis(20),
        backoff_max: Duration::from_millis(500),
        connect_timeout: Duration::from_millis(500),
        ..Config::default()
    }
}

fn with_heartbeat(mut config: RawConfig) -> RawConfig {
    config.watch.heartbeat_ms = HEARTBEAT.as_millis() as u64;
    without_load_limits(config)
}

/// The local answer as the server's fields: (licensed, reason, source).
fn local_answer(local: &Local, user: &str, feature: Feature) -> (bool, i32, i32, u64) {
    match local.check_seat(user, feature) {
        Decision::Known(a) => (
            a.licensed,
            seat_reason(a.reason).into(),
            a.source
                .map_or(pb::SeatSource::Unspecified, seat_source)
                .into(),
            a.version,
        ),
        Decision::Unknown => panic!("{user}/{feature}: unknown with a copy"),
    }
}

/// Every user and feature: the client's answer equals the server's at the
/// same version (the server asked with `min_version`, the client waited for
/// the version the server answered at).
async fn agree(local: &Local, c: &mut Client, step: &str) {
    for user in USERS {
        for feature in FEATURES {
            let mut min = local.version().unwrap_or(0);
            let mut tries = 0;
            loop {
                let server = c
                    .check_seat(pb::CheckSeatRequest {
                        user_id: user.into(),
                        feature: feature.as_str().into(),
                        min_version: min,
                    })
                    .await
                    .expect("CheckSeat")
                    .into_inner();
                local
                    .wait_for_version(server.version, WAIT)
                    .await
                    .unwrap_or_else(|at| {
                        panic!("the client never reached {} (at {at:?})", server.version)
                    });
                let mine = local_answer(local, user, feature);
                if mine.3 != server.version {
                    // Something changed in between: ask again at the newer one.
                    tries += 1;
                    assert!(tries < 10, "{step}: versions keep moving");
                    min = mine.3;
                    continue;
                }
                assert_eq!(
                    (mine.0, mine.1, mine.2),
                    (server.licensed, server.reason, server.source),
                    "{step}: {user}/{feature} at version {}: client and server disagree",
                    server.version
                );
                break;
            }
        }
    }
}

/// A random write on a random replica; refusals (no free seat, not
/// activated, …) are part of the run. The version of the outcome, if any.
async fn random_write(rng: &mut StdRng, replicas: &mut [Client]) -> (String, Option<u64>) {
    let c = &mut replicas[rng.gen_range(0..replicas.len())];
    let user = USERS[rng.gen_range(0..USERS.len())];
    let feature = if rng.gen_bool(0.7) {
        "user"
    } else {
        "call_assist"
    };
    if rng.gen_bool(0.6) {
        let r = c
            .assign_seat(pb::AssignSeatRequest {
                user_id: user.into(),
                feature: feature.into(),
            })
            .await;
        (
            format!(
                "assign {user}/{feature}: {:?}",
                r.as_ref().map(|_| ()).map_err(|s| s.code())
            ),
            r.ok().map(|r| r.into_inner().version),
        )
    } else {
        let r = c
            .release_seat(pb::ReleaseSeatRequest {
                user_id: user.into(),
                feature: feature.into(),
            })
            .await;
        (
            format!(
                "release {user}/{feature}: {:?}",
                r.as_ref().map(|_| ()).map_err(|s| s.code())
            ),
            r.ok().map(|r| r.into_inner().version),
        )
    }
}

/// Waits two heartbeats: the client hears the reference time after the
/// clock moved.
async fn heartbeats() {
    tokio::time::sleep(HEARTBEAT * 3).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_decides_like_the_server_over_a_randomized_run() {
    let seed: u64 = std::env::var("CLIENT_RUN_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| rand::thread_rng().r#gen());
    eprintln!("randomized run, seed {seed} (CLIENT_RUN_SEED={seed} repeats it)");
    let mut rng = StdRng::seed_from_u64(seed);
    let redis = RedisServer::start();
    let vendor = Vendor::new();
    let serial = serial("client-run");
    let clock = Arc::new(manual_clock());
    let config = with_heartbeat(licensed_config(Some(&redis), &serial, &vendor));
    let a = TestServer::start_with_clock(config.clone(), clock.clone()).await;
    let b = TestServer::start_with_clock(config, clock.clone()).await;
    let mut replicas = [a.client().await, b.client().await];
    let mut cb = b.client().await;
    let local = Local::start(local_config(vec![b.endpoint(), a.endpoint()])).unwrap();
    tokio::time::timeout(WAIT, local.ready())
        .await
        .expect("a copy");
    agree(&local, &mut cb, "no license, no tryout").await;

    start_tryout(&mut replicas[0])
        .await
        .expect("the tryout starts");
    agree(&local, &mut cb, "tryout started").await;
    for i in 0..25 {
        let (what, version) = random_write(&mut rng, &mut replicas).await;
        if let Some(v) = version {
            local
                .wait_for_version(v, WAIT)
                .await
                .expect("the write's version");
        }
        agree(&local, &mut cb, &format!("tryout step {i}: {what}")).await;
    }
    clock.advance(chrono::Duration::hours(30));
    heartbeats().await;
    agree(&local, &mut cb, "tryout, 30 hours later").await;

    // A purchase ends the tryout.
    vendor.write_license(
        &serial,
        Edition::Vm,
        Utc::now() - chrono::Duration::minutes(10),
        &[(Feature::User, 4), (Feature::CallAssist, 2)],
    );
    // (A reconcile the clock made due may have applied it already.)
    let r = reconcile(&mut replicas[0]).await;
    assert_eq!(quantity(&r, "user"), 4, "{r:?}");
    agree(&local, &mut cb, "purchased").await;
    for i in 0..30 {
        let (what, version) = random_write(&mut rng, &mut replicas).await;
        if let Some(v) = version {
            local
                .wait_for_version(v, WAIT)
                .await
                .expect("the write's version");
        }
        agree(&local, &mut cb, &format!("purchased step {i}: {what}")).await;
    }
    for user in ["ann", "bob", "cy", "dee"] {
        let _ = assign(&mut replicas[1], user, "user").await;
    }

    // A capacity drop flags seats; they run out after the over-capacity grace.
    vendor.write_license(
        &serial,
        Edition::Vm,
        Utc::now() - chrono::Duration::minutes(5),
        &[(Feature::User, 1), (Feature::CallAssist, 1)],
    );
    let r = reconcile(&mut replicas[1]).await;
    assert_eq!(quantity(&r, "user"), 1, "{r:?}");
    agree(&local, &mut cb, "capacity dropped").await;
    clock.advance(chrono::Duration::days(40));
    heartbeats().await;
    agree(&local, &mut cb, "40 days after the drop").await;
    for i in 0..15 {
        let (what, version) = random_write(&mut rng, &mut replicas).await;
        if let Some(v) = version {
            local
                .wait_for_version(v, WAIT)
                .await
                .expect("the write's version");
        }
        agree(
            &local,
            &mut cb,
            &format!("after the drop, step {i}: {what}"),
        )
        .await;
    }

    // The store loses everything; the replicas restore it; the client's copy
    // converges with theirs.
    redis.flushall();
    assert!(
        eventually(WAIT, || {
            let mut cb = cb.clone();
            async move { overview(&mut cb).await.activation_state() == pb::ActivationState::Active }
        })
        .await
    );
    heartbeats().await;
    agree(&local, &mut cb, "after the store was restored").await;
    let status = local.status();
    assert!(status.connected && !status.stale, "{status:?}");
}

/// Redis rolled back to an older snapshot (the seats assigned after it
/// lost), then repaired by the replicas: the client's copy converges with the
/// server's for every user, and keeps the seats the replicas brought back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_redis_is_rolled_back_and_repaired_the_client_converges() {
    let mut redis = RedisServer::start();
    let serial = serial("client-rollback");
    let mut config = with_heartbeat(config(Some(&redis), &serial));
    config.tryout.seats = 10;
    let a = TestServer::start(config.clone()).await;
    let b = TestServer::start(config).await;
    let (mut ca, mut cb) = (a.client().await, b.client().await);
    start_tryout(&mut ca).await.expect("tryout");
    let local = Local::start(local_config(vec![b.endpoint()])).unwrap();
    tokio::time::timeout(WAIT, local.ready())
        .await
        .expect("a copy");
    assigned(&mut ca, "ann", "user").await;
    let rdb = redis.save_snapshot();
    assigned(&mut ca, "bob", "user").await;
    let v = assigned(&mut cb, "cy", "user").await.version;
    local
        .wait_for_version(v, WAIT)
        .await
        .expect("the client has cy");
    agree(&local, &mut cb, "before the rollback").await;

    redis.restart_from(&rdb);
    // The replicas notice the store went back and write the lost seats again.
    assert!(
        eventually(WAIT, || {
            let mut cb = cb.clone();
            async move {
                // ListSeats reads the store: it fails while the store restarts.
                let listed = cb.list_seats(pb::ListSeatsRequest::default()).await;
                listed.is_ok_and(|r| r.into_inner().seats.len() == 3)
            }
        })
        .await,
        "the replicas did not repair the store"
    );
    heartbeats().await;
    agree(&local, &mut cb, "after the rollback and the repair").await;
    for user in ["ann", "bob", "cy"] {
        assert_eq!(
            local.check_seat(user, Feature::User).licensed(),
            Some(true),
            "{user}"
        );
    }
}

/// Over TLS with `auth.mode = enforce`: a client with a `call_handling`
/// client certificate, and one with a `call_handling` token, get a copy; one
/// without credentials gets none and says why (`status().last_error`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_speaks_tls_with_a_certificate_or_a_token_and_says_why_it_is_refused() {
    let pki = comtrexx_licensing_test_support::pki::Pki::new("client CA");
    let (cert, key) = pki.write_server(&pki.server("server"));
    let mut raw = config(None, &serial("client-tls"));
    raw.tls.cert_file = Some(cert);
    raw.tls.key_file = Some(key);
    raw.tls.client_ca_file = Some(pki.ca_file());
    raw.tls.require_client_certificate = false;
    raw.auth.mode = "enforce".into();
    let callers = pki.dir.path().join("callers.toml");
    std::fs::write(
        &callers,
        format!(
            "[[caller]]\nname = \"pbx-token\"\nrole = \"call_handling\"\ntoken_sha256 = \"{}\"\n\n\
             [[caller]]\nname = \"pbx-cert\"\nrole = \"call_handling\"\ncertificate = \"spiffe://pbx.test/call\"\n",
            token_sha256("t-call")
        ),
    )
    .unwrap();
    raw.auth.callers_file = Some(callers);
    let server = TestServer::start(with_heartbeat(raw)).await;
    let endpoint = format!("https://localhost:{}", server.addr.port());
    let tls = |identity: Option<(Vec<u8>, Vec<u8>)>| comtrexx_licensing_client::Tls {
        ca_pem: Some(pki.ca_pem().into_bytes()),
        identity,
        domain_name: None,
    };
    let pem = pki.client("spiffe://pbx.test/call", false);
    let with_cert = Local::start(Config {
        tls: Some(tls(Some((pem.cert.into_bytes(), pem.key.into_bytes())))),
        ..local_config(vec![endpoint.clone()])
    })
    .unwrap();
    let with_token = Local::start(Config {
        tls: Some(tls(None)),
        token: Some("t-call".into()),
        ..local_config(vec![endpoint.clone()])
    })
    .unwrap();
    let anonymous = Local::start(Config {
        tls: Some(tls(None)),
        ..local_config(vec![endpoint])
    })
    .unwrap();
    for (name, client) in [("certificate", &with_cert), ("token", &with_token)] {
        tokio::time::timeout(WAIT, client.ready())
            .await
            .unwrap_or_else(|_| panic!("{name}: no copy: {:?}", client.status()));
        assert!(matches!(
            client.check_seat("alice", Feature::User),
            Decision::Known(a) if !a.licensed
        ));
    }
    let refused = eventually_some(WAIT, || {
        let e = anonymous.status().last_error;
        async move { e }
    })
    .await
    .unwrap();
    assert!(refused.contains("Unauthenticated"), "{refused}");
    assert_eq!(
        anonymous.check_seat("alice", Feature::User),
        Decision::Unknown
    );
}

fn quantity(r: &pb::ReconcileResponse, feature: &str) -> u32 {
    r.entitlements
        .iter()
        .find(|e| e.feature == feature)
        .map_or(0, |e| e.quantity)
}

/// A replica killed in the middle of a stream of writes: the client resumes
/// on the other with its version; its copy ends equal to the server's seats,
/// every change applied once (a gap or a repeat would break the version chain
/// the copy checks, or the seat set).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_killed_mid_stream_the_client_resumes_on_another_losing_nothing() {
    let redis = RedisServer::start();
    let serial = serial("client-kill");
    let mut config = with_heartbeat(config(Some(&redis), &serial));
    config.tryout.seats = 1000;
    let mut a = service_process(&config);
    let mut b = service_process(&config);
    let mut cb = b.client().await;
    start_tryout(&mut cb).await.expect("tryout");
    let local = Local::start(local_config(vec![a.endpoint(), b.endpoint()])).unwrap();
    tokio::time::timeout(WAIT, local.ready())
        .await
        .expect("a copy");
    let first = local.status().endpoint.expect("an endpoint");
    let writer = {
        let mut c = b.client().await;
        tokio::spawn(async move {
            let mut last = 0;
            for i in 0..300 {
                let user = format!("k{i}");
                last = assigned(&mut c, &user, "user").await.version;
                if i % 3 == 0 {
                    last = released_version(&mut c, &format!("k{}", i / 3)).await;
                }
            }
            last
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Kill the replica the client streams from (the other one writes).
    if first == a.endpoint() {
        a.kill();
    } else {
        b.kill();
    }
    let last = if first == a.endpoint() {
        writer.await.unwrap()
    } else {
        // The writer's replica died: finish on the other.
        writer.abort();
        let mut ca = a.client().await;
        assigned(&mut ca, "after", "user").await.version
    };
    local
        .wait_for_version(last, WAIT)
        .await
        .expect("the client reaches the last write");
    let alive = if first == a.endpoint() { &b } else { &a };
    let mut c = alive.client().await;
    let server: BTreeSet<String> = seat_holder_set(&mut c).await;
    let mine: BTreeSet<String> = server
        .iter()
        .filter(|u| local.check_seat(u, Feature::User).licensed() == Some(true))
        .cloned()
        .collect();
    assert_eq!(
        mine, server,
        "every seat the server holds is licensed locally"
    );
    for i in 0..300 {
        let user = format!("k{i}");
        assert_eq!(
            local.check_seat(&user, Feature::User).licensed(),
            Some(server.contains(&user)),
            "{user}"
        );
    }
    let status = local.status();
    assert!(status.connects >= 2, "{status:?}");
    assert_ne!(
        status.endpoint.as_deref(),
        Some(first.as_str()),
        "{status:?}"
    );
}

async fn released_version(c: &mut Client, user: &str) -> u64 {
    c.release_seat(pb::ReleaseSeatRequest {
        user_id: user.into(),
        feature: "user".into(),
    })
    .await
    .expect("ReleaseSeat")
    .into_inner()
    .version
}

/// Every replica killed: the agent (a process) keeps deciding from its copy,
/// marked stale; killed and restarted itself while no replica runs, it
/// decides from its cache file at once; a replica back, it is live again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_every_replica_killed_the_agent_decides_from_its_copy_and_from_its_file() {
    let redis = RedisServer::start();
    let vendor = Vendor::new();
    let serial = serial("client-dark");
    vendor.write_license(
        &serial,
        Edition::Vm,
        Utc::now() - chrono::Duration::hours(1),
        &[(Feature::User, 5)],
    );
    let config = with_heartbeat(licensed_config(Some(&redis), &serial, &vendor));
    let mut a = service_process(&config);
    let mut b = service_process(&config);
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("seats.cache");
    let mut agent = agent_process(&[a.endpoint(), b.endpoint()], &cache, &[]);
    let mut ca = a.client().await;
    wait_active(&ca).await;
    let v = assigned(&mut ca, "alice", "user").await.version;
    assigned(&mut ca, "bob", "user").await;
    let mut local = agent.client().await;
    let alice = check_at(&mut local, "alice", v).await.expect("alice");
    assert!(alice.licensed && !alice.stale, "{alice:?}");
    // The cache file is written within about a second of a change.
    assert!(eventually_blocking(WAIT, || cache.exists()));
    std::thread::sleep(Duration::from_millis(1500));

    a.kill();
    b.kill();
    let stale = eventually_some(WAIT, || {
        let mut local = local.clone();
        async move {
            let r = check_at(&mut local, "alice", 0).await.ok()?;
            r.stale.then_some(r)
        }
    })
    .await
    .expect("the copy goes stale with no replica");
    assert!(stale.licensed, "a licensed user stays licensed: {stale:?}");
    let carol = check_at(&mut local, "carol", 0).await.unwrap();
    assert_eq!(
        (carol.licensed, carol.reason()),
        (false, pb::SeatReason::NotAssigned)
    );

    // The agent itself restarts while no replica answers.
    agent.kill();
    agent.restart();
    let mut local = agent.client().await;
    for user in ["alice", "bob"] {
        let r = check_at(&mut local, user, 0).await.expect("from the file");
        assert!(r.licensed && r.stale, "{user}: {r:?}");
    }

    // A replica is back: the agent resumes and is live; new writes arrive.
    a.restart();
    let mut ca = a.client().await;
    let v = assigned(&mut ca, "carol", "user").await.version;
    let carol = eventually_some(WAIT, || {
        let mut local = local.clone();
        async move { check_at(&mut local, "carol", v).await.ok() }
    })
    .await
    .expect("the agent reaches the new write");
    assert!(carol.licensed, "{carol:?}");
    assert!(
        eventually(WAIT, || {
            let mut local = local.clone();
            async move {
                check_at(&mut local, "alice", 0)
                    .await
                    .is_ok_and(|r| r.licensed && !r.stale)
            }
        })
        .await
    );
}

/// Before any copy: the library answers `Unknown` and `ready()` waits; the
/// agent answers `UNAVAILABLE`/`NO_STATE_YET` (never "not licensed"),
/// `NOT_YET_CONSISTENT` for a version it does not have, refuses a feature it
/// does not follow and bad input like the service, and leaves other RPCs
/// `UNIMPLEMENTED`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn before_any_copy_the_answer_is_unknown_never_not_licensed() {
    let nowhere = format!("http://127.0.0.1:{}", unused_port());
    let local = Local::start(local_config(vec![nowhere.clone()])).unwrap();
    assert_eq!(local.check_seat("alice", Feature::User), Decision::Unknown);
    assert!(
        tokio::time::timeout(Duration::from_millis(500), local.ready())
            .await
            .is_err()
    );
    let status = local.status();
    assert!(!status.has_copy && !status.connected, "{status:?}");
    assert!(
        status
            .last_error
            .as_deref()
            .is_some_and(|e| e.contains(&nowhere)),
        "{status:?}"
    );

    let dir = tempfile::tempdir().unwrap();
    let mut agent = agent_process(
        &[nowhere],
        &dir.path().join("seats.cache"),
        &["--features", "user"],
    );
    let mut c = agent.client().await;
    let e = check_at(&mut c, "alice", 0).await.unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    assert_eq!(reason(&e), "NO_STATE_YET");
    let e = c
        .check_seat(pb::CheckSeatRequest {
            user_id: "alice".into(),
            feature: "call_assist".into(),
            min_version: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(
        (e.code(), reason(&e)),
        (Code::FailedPrecondition, "FEATURE_NOT_FOLLOWED".into())
    );
    let e = check_at(&mut c, "", 0).await.unwrap_err();
    assert_eq!(
        (e.code(), reason(&e)),
        (Code::InvalidArgument, "INVALID_ARGUMENT".into())
    );
    let e = c
        .assign_seat(pb::AssignSeatRequest {
            user_id: "alice".into(),
            feature: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unimplemented, "{e:?}");

    // With a replica the agent answers; a version it does not reach is
    // NOT_YET_CONSISTENT.
    let redis = RedisServer::start();
    let server = TestServer::start(with_heartbeat(config(
        Some(&redis),
        &serial("client-unknown"),
    )))
    .await;
    agent.kill();
    let agent = agent_process(
        &[server.endpoint()],
        &dir.path().join("seats.cache"),
        &["--features", "user"],
    );
    let mut c = agent.client().await;
    let r = eventually_some(WAIT, || {
        let mut c = c.clone();
        async move { check_at(&mut c, "alice", 0).await.ok() }
    })
    .await
    .expect("an answer once a replica streams");
    assert_eq!(
        (r.licensed, r.reason()),
        (false, pb::SeatReason::NotActivated)
    );
    let e = check_at(&mut c, "alice", r.version + 1000)
        .await
        .unwrap_err();
    assert_eq!(
        (e.code(), reason(&e)),
        (Code::Unavailable, "NOT_YET_CONSISTENT".into())
    );
    drop(agent);
}

fn reason(status: &tonic::Status) -> String {
    status
        .get_error_details()
        .error_info()
        .map(|i| i.reason.clone())
        .unwrap_or_default()
}

/// `licensing-agent` following `endpoints`, with its cache file and `extra` flags.
fn agent_process(endpoints: &[String], cache: &std::path::Path, extra: &[&str]) -> Process {
    let (endpoints, cache) = (endpoints.join(","), cache.to_owned());
    let extra: Vec<String> = extra.iter().map(|s| (*s).to_owned()).collect();
    Process::start(move |port| {
        let mut cmd = Command::new(agent_binary());
        cmd.arg("--listen")
            .arg(format!("127.0.0.1:{port}"))
            .args(["--endpoint", &endpoints])
            .arg("--cache-file")
            .arg(&cache)
            .args(["--heartbeat-ms", &HEARTBEAT.as_millis().to_string()])
            .args(&extra);
        cmd
    })
}
