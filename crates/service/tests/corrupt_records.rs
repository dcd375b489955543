//! A corrupt record in Redis, written with `redis-cli` as an operator's slip or
//! a damaged restore would leave it, against the real server: it is skipped and
//! counted, and never stops a write half-way.

mod common;

use std::process::Command;
use std::time::Duration;

use chrono::Utc;
use common::*;
use comtrexx_licensing::config::RawConfig;
use comtrexx_licensing::domain::{Edition, Feature};
use comtrexx_licensing::grpc::pb;

const WAIT: Duration = Duration::from_secs(10);

fn redis_cli(redis: &RedisServer, args: &[&str]) {
    let out = Command::new("redis-cli")
        .arg("-u")
        .arg(redis.url())
        .args(args)
        .output()
        .expect("run redis-cli");
    assert!(out.status.success(), "redis-cli {args:?}: {out:?}");
}

/// The reproduction: `HSET lic:{S}:seats:user:purchased bob garbage`,
/// then a license with fewer seats. The seats beyond the new quantity are
/// flagged over capacity (the corrupt one still takes its slot), and the next
/// reconcile keeps them flagged.
#[tokio::test]
async fn smaller_license_flags_the_excess_despite_a_corrupt_seat() {
    let redis = RedisServer::start();
    let vendor = Vendor::new();
    let serial = serial("corrupt-drop");
    let t0 = Utc::now() - chrono::Duration::days(1);
    vendor.write_license(&serial, Edition::Vm, t0, &[(Feature::User, 5)]);
    let config = without_load_limits(RawConfig {
        edition: Edition::Vm.as_str().into(),
        ..licensed_config(Some(&redis), &serial, &vendor)
    });
    let server = TestServer::start(config).await;
    let client = server.client().await;
    let c = &mut client.clone();
    wait_active(c).await;
    for user in ["alice", "carol", "dave", "erin"] {
        c.assign_seat(pb::AssignSeatRequest {
            user_id: user.into(),
            feature: String::new(),
        })
        .await
        .unwrap_or_else(|s| panic!("AssignSeat {user}: {s:?}"));
    }
    redis_cli(
        &redis,
        &[
            "HSET",
            &format!("lic:{{{serial}}}:seats:user:purchased"),
            "bob",
            "garbage",
        ],
    );

    vendor.write_license(
        &serial,
        Edition::Vm,
        t0 + chrono::Duration::hours(1),
        &[(Feature::User, 2)],
    );
    assert_eq!(reconcile(c).await.outcome(), pb::ReconcileOutcome::Updated);
    let flagged_three = || {
        let mut c = client.clone();
        async move {
            let o = overview(&mut c).await;
            o.over_capacity
                .iter()
                .any(|g| g.feature == "user" && g.seats == 3)
        }
    };
    assert!(
        eventually(WAIT, flagged_three).await,
        "three seats over capacity: {:?}",
        overview(c).await
    );

    // Nothing changed since: the next reconcile finds the flags in place.
    assert_eq!(
        reconcile(c).await.outcome(),
        pb::ReconcileOutcome::Unchanged
    );
    assert!(
        eventually(WAIT, flagged_three).await,
        "{:?}",
        overview(c).await
    );
    server.shutdown().await;
}
