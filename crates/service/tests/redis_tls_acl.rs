//! Redis over TLS (`rediss://` with `redis_tls_ca_file`) as an ACL user whose
//! password comes from a file (`redis_username`, `redis_password_file`), against a
//! real `redis-server` started with `--tls-port` and a certificate made here. The
//! user has only the commands of the ACL line in docs/redis.md: every flow of
//! the service runs with it, and Redis logs no refused command.

mod common;

use std::path::Path;
use std::time::Duration;

use chrono::Utc;
use common::*;
use comtrexx_licensing::config::RawConfig;
use comtrexx_licensing::domain::{Edition, Feature, SeatModel};
use comtrexx_licensing::grpc::pb;
use tonic::Code;

const WAIT: Duration = Duration::from_secs(10);
const USER: &str = "comtrexx-licensing";
/// URL syntax characters and a trailing newline, as a Secret file may hold them.
const PASSWORD: &str = "s3cret:with@url/chars";
const ADMIN_PASSWORD: &str = "admin-only";

/// The ACL rule of the service's user, as docs/redis.md gives it (after the
/// user name, `on` and the password).
const ACL_RULE: &str = "resetkeys ~lic:* resetchannels -@all \
    +evalsha +script|load +mget +xread +wait +role \
    +get +set +del +unlink +exists +incr +time +hget +hset +hdel +hgetall +hscan +hlen +hexists \
    +zadd +zrem +zrangebylex +zcard +zrevrank +zrevrange +xadd +xtrim +xrange +xrevrange +multi +exec \
    +zcount +zscore +zrangebyscore +zremrangebyscore +hincrby +hkeys";

/// A Redis with TLS on `tls_port` (plain TCP stays for the test's own admin calls
/// as the `default` user) and the service's ACL user.
fn tls_redis(dir: &Path, tls_port: u16) -> RedisServer {
    let cert = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_owned()]).unwrap();
    std::fs::write(dir.join("redis.crt"), cert.cert.pem()).unwrap();
    std::fs::write(dir.join("redis.key"), cert.signing_key.serialize_pem()).unwrap();
    let path = |name: &str| dir.join(name).to_str().unwrap().to_owned();
    let (crt, key) = (path("redis.crt"), path("redis.key"));
    let user_rule = format!("{USER} on >{PASSWORD} {ACL_RULE}");
    let mut args = vec![
        "--tls-port".to_owned(),
        tls_port.to_string(),
        "--tls-cert-file".into(),
        crt.clone(),
        "--tls-key-file".into(),
        key,
        "--tls-ca-cert-file".into(),
        crt,
        "--tls-auth-clients".into(),
        "no".into(),
        "--requirepass".into(),
        ADMIN_PASSWORD.into(),
        "--user".into(),
    ];
    args.extend(user_rule.split(' ').map(str::to_owned));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    RedisServer::with_args(&args, Some(ADMIN_PASSWORD))
}

fn tls_config(dir: &Path, tls_port: u16, ca: &Path, vendor: &Vendor, serial: &str) -> RawConfig {
    std::fs::write(dir.join("redis-password"), format!("{PASSWORD}\n")).unwrap();
    vendor.write_license_with_models(
        serial,
        Edition::Vm,
        Utc::now(),
        &[
            (Feature::User, 10, SeatModel::Assigned),
            (Feature::CallAssist, 2, SeatModel::Concurrent),
        ],
    );
    RawConfig {
        redis_url: Some(format!("rediss://127.0.0.1:{tls_port}")),
        redis_username: Some(USER.into()),
        redis_password_file: Some(dir.join("redis-password")),
        redis_tls_ca_file: Some(ca.to_owned()),
        license_file: Some(vendor.license_path()),
        vendor_public_key: Some(vendor.public_key()),
        serial_number: serial.to_owned(),
        ..RawConfig::default()
    }
}

#[tokio::test]
async fn every_flow_runs_over_tls_as_the_restricted_acl_user() {
    let dir = tempfile::tempdir().unwrap();
    let tls_port = unused_port();
    let redis = tls_redis(dir.path(), tls_port);
    let vendor = Vendor::new();
    let serial = serial("tls-acl");
    let config = tls_config(
        dir.path(),
        tls_port,
        &dir.path().join("redis.crt"),
        &vendor,
        &serial,
    );
    let a = TestServer::start(config.clone()).await;
    let b = TestServer::start(config).await;
    let (mut ca, mut cb) = (a.client().await, b.client().await);
    // Start-up: the store's first epoch, the reconcile lease, the license.
    wait_active(&ca).await;
    wait_active(&cb).await;

    // Seats: written on A, seen on B through the change feed.
    for user in ["alice", "bob"] {
        assigned(&mut ca, user, "").await;
    }
    assert!(
        eventually(WAIT, || {
            let mut cb = cb.clone();
            async move { licensed(&mut cb, "bob").await }
        })
        .await
    );
    assert_eq!(seat_holders(&mut cb).await, ["alice", "bob"]);
    assert!(
        cb.release_seat(pb::ReleaseSeatRequest {
            user_id: "alice".into(),
            feature: String::new(),
        })
        .await
        .expect("ReleaseSeat")
        .into_inner()
        .released
    );
    // Leases of the concurrent feature: acquired on A, renewed and released on B.
    let lease = ca
        .acquire_lease(pb::AcquireLeaseRequest {
            user_id: "alice".into(),
            feature: "call_assist".into(),
            holder: "pod-a".into(),
        })
        .await
        .expect("AcquireLease")
        .into_inner()
        .lease
        .unwrap();
    let renewed = cb
        .renew_leases(pb::RenewLeasesRequest {
            holder: "pod-a".into(),
            lease_ids: vec![lease.lease_id.clone()],
        })
        .await
        .expect("RenewLeases")
        .into_inner();
    assert_eq!(renewed.leases.len(), 1);
    let listed = cb
        .list_leases(pb::ListLeasesRequest::default())
        .await
        .expect("ListLeases")
        .into_inner();
    assert_eq!(listed.leases.len(), 1);
    assert!(
        cb.release_lease(pb::ReleaseLeaseRequest {
            lease_id: lease.lease_id
        })
        .await
        .expect("ReleaseLease")
        .into_inner()
        .released
    );
    cb.reconcile(pb::ReconcileRequest {})
        .await
        .expect("Reconcile");
    ca.create_initialization_code(pb::CreateInitializationCodeRequest {})
        .await
        .expect("CreateInitializationCode");
    assert_eq!(
        ca.start_tryout(pb::StartTryoutRequest {})
            .await
            .unwrap_err()
            .code(),
        Code::FailedPrecondition
    );

    // The audit trail (a Redis stream) has the writes, on the other replica too.
    let audit = cb
        .list_audit_events(pb::ListAuditEventsRequest {
            page_size: 100,
            page_token: String::new(),
            user_id: "alice".into(),
        })
        .await
        .expect("ListAuditEvents")
        .into_inner();
    assert!(!audit.events.is_empty());

    // Redis loses its data: a replica writes its state back.
    let _: () = redis::cmd("FLUSHALL")
        .query(&mut redis.connection())
        .unwrap();
    assert!(
        eventually(WAIT, || {
            let mut ca = ca.clone();
            async move { assign(&mut ca, "carol", "").await.is_ok() }
        })
        .await,
        "no write after the store was restored"
    );
    assert_eq!(seat_holders(&mut ca).await, ["bob", "carol"]);
    ca.reset_activation(pb::ResetActivationRequest {})
        .await
        .expect("ResetActivation");
    assert!(seat_holders(&mut cb).await.is_empty());

    // Nothing the service did was refused by the ACL, except the start-up check of
    // the eviction policy, which is best effort and not granted on purpose.
    let log: Vec<std::collections::HashMap<String, redis::Value>> = redis::cmd("ACL")
        .arg("LOG")
        .query(&mut redis.connection())
        .unwrap();
    let refused: Vec<String> = log
        .iter()
        .filter_map(|entry| entry.get("object"))
        .map(|o| redis::from_redis_value_ref::<String>(o).unwrap())
        .filter(|command| command != "config|get")
        .collect();
    assert!(refused.is_empty(), "ACL refused: {refused:?}");
    assert!(
        !log.is_empty(),
        "the eviction-policy check ran and was refused"
    );
    // And the user is as narrow as it says: nothing outside its keys or commands.
    let mut as_user = redis::Client::open(format!(
        "redis://{USER}:{}@127.0.0.1:{}",
        PASSWORD
            .replace(':', "%3A")
            .replace('@', "%40")
            .replace('/', "%2F"),
        redis.port
    ))
    .unwrap()
    .get_connection()
    .unwrap();
    let other_key: redis::RedisResult<Option<String>> =
        redis::cmd("GET").arg("not-licensing").query(&mut as_user);
    let flush: redis::RedisResult<()> = redis::cmd("FLUSHALL").query(&mut as_user);
    assert!(other_key.is_err() && flush.is_err());
}

#[tokio::test]
async fn a_redis_certificate_from_another_ca_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let tls_port = unused_port();
    let _redis = tls_redis(dir.path(), tls_port);
    let other = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_owned()]).unwrap();
    let other_ca = dir.path().join("other.crt");
    std::fs::write(&other_ca, other.cert.pem()).unwrap();
    let vendor = Vendor::new();
    let serial = serial("tls-other-ca");
    let server = TestServer::start_unsynced(tls_config(
        dir.path(),
        tls_port,
        &other_ca,
        &vendor,
        &serial,
    ))
    .await;
    let mut c = server.client().await;
    // ListSeats reads Redis: it cannot, over a connection it does not trust.
    let read = c
        .list_seats(pb::ListSeatsRequest {
            feature: String::new(),
            page_size: 10,
            page_token: String::new(),
            ..Default::default()
        })
        .await;
    assert_eq!(read.unwrap_err().code(), Code::Unavailable);
}
