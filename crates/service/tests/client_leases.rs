//! Leases through the client library, against two replicas on real Redis: a
//! guard holds, renews (one call for the holder's leases) and releases its
//! lease; the quantity holds; the local decision knows the holder's own
//! leases; a holder process killed with SIGKILL frees its seats within one
//! lease length; a holder cut off from every replica counts its leases lost
//! no later than the service frees them.

mod common;

use std::io::BufRead as _;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use comtrexx_licensing::domain::Feature;
use comtrexx_licensing::grpc::pb;
use comtrexx_licensing_client::{AcquireError, Client as Local, Config, Decision, Lost, SeatModel};
use comtrexx_licensing_test_support::proxy::{Fault, FaultProxy};

const WAIT: Duration = Duration::from_secs(15);
/// The shortest lease the service allows: expiry is seen within the test.
const LEASE: Duration = Duration::from_secs(5);

/// Two replicas on one Redis; `user` sold for concurrent use (`users` at a
/// time), with the shortest lease length.
async fn pair(tag: &str, users: u32) -> (TestServer, TestServer, Vendor, RedisServer) {
    let (a, b, vendor, _, redis) =
        concurrent_replicas(tag, users, LEASE.as_secs(), |c| c.watch.heartbeat_ms = 200).await;
    (a, b, vendor, redis)
}

fn holder(endpoints: Vec<String>, name: &str) -> Local {
    Local::start(Config {
        endpoints,
        holder: Some(name.into()),
        heartbeat: Duration::from_millis(200),
        backoff_min: Duration::from_millis(20),
        backoff_max: Duration::from_millis(300),
        connect_timeout: Duration::from_millis(500),
        ..Config::default()
    })
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guard_holds_renews_and_releases_and_the_quantity_holds() {
    let (a, b, _vendor, _redis) = pair("client-lease", 2).await;
    let pod_a = holder(vec![a.endpoint()], "pod-a");
    let pod_b = holder(vec![b.endpoint()], "pod-b");
    tokio::time::timeout(WAIT, pod_b.ready())
        .await
        .expect("a copy");
    // How the license sells each feature, for call handling that follows a
    // switch of the seat model.
    assert_eq!(
        (
            pod_b.seat_model(Feature::User),
            pod_b.seat_model(Feature::CallAssist)
        ),
        (Some(SeatModel::Concurrent), Some(SeatModel::Assigned))
    );

    let alice = pod_a.acquire("alice", Feature::User).await.expect("alice");
    let bob = pod_a.acquire("bob", Feature::User).await.expect("bob");
    assert!(alice.created() && alice.held());
    // Again for alice: the same lease, renewed, no second seat.
    let again = pod_a.acquire("alice", Feature::User).await.expect("again");
    assert_eq!((again.id(), again.created()), (alice.id(), false));
    drop(again);
    // The quantity is 2: a third user is refused, on the other replica too.
    let refused = pod_b.acquire("carol", Feature::User).await.unwrap_err();
    assert!(
        matches!(&refused, AcquireError::Refused(e) if e.contains("ResourceExhausted")),
        "{refused:?}"
    );
    // Both clients decide alice licensed locally (pod_b from the stream).
    pod_b
        .wait_for_version(bob.version(), WAIT)
        .await
        .expect("pod-b's copy has the leases");
    for client in [&pod_a, &pod_b] {
        assert!(matches!(
            client.check_seat("alice", Feature::User),
            Decision::Known(d) if d.licensed
        ));
        assert!(matches!(
            client.check_seat("carol", Feature::User),
            Decision::Known(d) if !d.licensed && d.reason == comtrexx_licensing_client::SeatReason::NoLease
        ));
    }

    // Held past twice the lease length: the renewer keeps them.
    tokio::time::sleep(LEASE * 2).await;
    assert!(alice.held() && bob.held());
    let mut cb = b.client().await;
    let mut ca = a.client().await;
    let on_a = checked(&mut ca, "alice", "user").await;
    let on_b = checked(&mut cb, "alice", "user").await;
    let listed = cb
        .list_leases(pb::ListLeasesRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(
        on_b.licensed,
        "A: {on_a:?}\nB: {on_b:?}\nleases: {listed:?}\nguard: {:?}",
        alice.lease()
    );

    // Dropping a guard releases its lease: carol gets the seat.
    drop(alice);
    let carol = eventually_some(WAIT, || {
        let pod_b = pod_b.clone();
        async move { pod_b.acquire("carol", Feature::User).await.ok() }
    })
    .await
    .expect("carol gets the released seat");
    assert!(carol.held());
    // An assigned feature is not leased.
    let wrong = pod_a
        .acquire("dave", Feature::CallAssist)
        .await
        .unwrap_err();
    assert!(
        matches!(&wrong, AcquireError::Refused(e) if e.contains("WRONG_SEAT_MODEL")),
        "{wrong:?}"
    );
}

/// Run as a child process by the SIGKILL test (ignored on its own): holds
/// leases for the users in `HOLD_USERS` on `HOLD_ENDPOINT`, prints `held`,
/// and sleeps until killed.
#[tokio::test]
#[ignore = "a child process of a_holder_killed_with_sigkill_frees_its_seats_within_one_lease_length"]
async fn holder_process() {
    let Ok(endpoint) = std::env::var("HOLD_ENDPOINT") else {
        return;
    };
    let pod = holder(vec![endpoint], "doomed-pod");
    let mut guards = Vec::new();
    for user in std::env::var("HOLD_USERS").unwrap().split(',') {
        guards.push(pod.acquire(user, Feature::User).await.expect("acquire"));
    }
    println!("held");
    tokio::time::sleep(Duration::from_secs(600)).await;
    drop(guards);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_holder_killed_with_sigkill_frees_its_seats_within_one_lease_length() {
    let (a, b, _vendor, _redis) = pair("client-lease-kill", 2).await;
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "holder_process", "--ignored", "--nocapture"])
        .env("HOLD_ENDPOINT", a.endpoint())
        .env("HOLD_USERS", "ann,ben")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start the holder process");
    let stdout = child.stdout.take().unwrap();
    let held = tokio::task::spawn_blocking(move || {
        std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
            .any(|l| l == "held")
    });
    assert!(
        tokio::time::timeout(WAIT, held).await.unwrap().unwrap(),
        "the holder process did not hold its leases"
    );
    let survivor = holder(vec![b.endpoint()], "survivor");
    assert!(
        survivor.acquire("cy", Feature::User).await.is_err(),
        "full while the holder lives"
    );

    child.kill().unwrap();
    let killed = Instant::now();
    let _ = child.wait();
    let freed = eventually_some(LEASE * 3, || {
        let survivor = survivor.clone();
        async move { survivor.acquire("cy", Feature::User).await.ok() }
    })
    .await
    .expect("the killed holder's seats never freed");
    let took = killed.elapsed();
    assert!(freed.held());
    // Within one lease length (plus the retry interval of this loop).
    assert!(
        took <= LEASE + Duration::from_secs(1),
        "freed after {took:?}, the lease is {LEASE:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_holder_cut_off_counts_its_lease_lost_no_later_than_the_service_frees_it() {
    let (a, b, _vendor, _redis) = pair("client-lease-cut", 1).await;
    let proxy = FaultProxy::start(a.addr).await;
    let pod = holder(vec![format!("http://{}", proxy.addr)], "cut-pod");
    let lease = pod.acquire("ann", Feature::User).await.expect("ann");
    assert!(lease.held());
    // Every replica out of reach (the holder's only way is the proxy).
    proxy.set(Fault::Reset);
    let cut = Instant::now();
    let lost_after = eventually_some(LEASE * 2, || {
        let lost = lease.lost();
        async move { lost }
    })
    .await
    .expect("the guard never counted its lease lost");
    let counted_lost = cut.elapsed();
    assert!(matches!(lost_after, Lost::Expired { .. }), "{lost_after:?}");
    assert!(counted_lost <= LEASE, "counted lost after {counted_lost:?}");
    // The service frees it at its expiry; another holder gets the seat then.
    let other = holder(vec![b.endpoint()], "other-pod");
    let got = eventually_some(LEASE * 2, || {
        let other = other.clone();
        async move { other.acquire("ben", Feature::User).await.ok() }
    })
    .await
    .expect("the seat is free after the lease's expiry");
    let freed_after = cut.elapsed();
    assert!(
        counted_lost <= freed_after,
        "the holder counted its lease lost ({counted_lost:?}) after the service freed it ({freed_after:?})"
    );
    assert!(got.held());
    // Back in reach, the holder does not regain a lease above the quantity:
    // its renewal reports it lost, and acquiring it again is refused.
    proxy.set(Fault::Pass);
    let lost = eventually_some(WAIT, || {
        let lost = lease.lost();
        async move { lost.filter(|l| *l == Lost::NotHeld) }
    })
    .await;
    assert_eq!(lost, Some(Lost::NotHeld));
    tokio::time::sleep(LEASE).await;
    assert!(!lease.held(), "held above the quantity");
    // Once the seat is free, the guard's lease is acquired again.
    drop(got);
    assert!(
        eventually(WAIT, || {
            let held = lease.held();
            async move { held }
        })
        .await,
        "the lost lease was not acquired again: {:?}",
        lease.lost()
    );
}

/// A holder's connection cut and restored a thousand times: the service
/// never holds more leases than the holder has users, each user at most one;
/// once the guards are dropped no seat lingers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_cuts_never_make_a_second_lease_and_leave_no_seat_behind() {
    let (a, b, _vendor, _redis) = pair("client-lease-cuts", 10).await;
    let proxy = FaultProxy::start(a.addr).await;
    let pod = holder(vec![format!("http://{}", proxy.addr)], "flaky-pod");
    let users = ["u1", "u2", "u3"];
    let mut guards = Vec::new();
    for user in users {
        guards.push(pod.acquire(user, Feature::User).await.expect("acquire"));
    }
    let mut cb = b.client().await;
    let (tx, mut rx) = tokio::sync::oneshot::channel::<()>();
    let watcher = {
        let mut cb = cb.clone();
        tokio::spawn(async move {
            let mut most = 0;
            loop {
                if let Ok(r) = cb.list_leases(pb::ListLeasesRequest::default()).await {
                    let leases = r.into_inner().leases;
                    let mut per_user = std::collections::HashMap::new();
                    for l in &leases {
                        *per_user.entry(l.user_id.clone()).or_insert(0) += 1;
                    }
                    assert!(
                        per_user.values().all(|n| *n == 1),
                        "a user with two leases: {leases:?}"
                    );
                    most = most.max(leases.len());
                }
                if rx.try_recv().is_ok() {
                    return most;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    for i in 0..1000 {
        proxy.set(if i % 2 == 0 {
            Fault::Reset
        } else {
            Fault::Pass
        });
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    proxy.set(Fault::Pass);
    let _ = tx.send(());
    let most = watcher.await.unwrap();
    assert!(
        most <= users.len(),
        "{most} leases for {} users",
        users.len()
    );
    // Every guard holds again, then gives its seat back.
    assert!(
        eventually(WAIT, || {
            let all = guards.iter().all(|g| g.held());
            async move { all }
        })
        .await
    );
    drop(guards);
    assert!(
        eventually(WAIT, || {
            let mut cb = cb.clone();
            async move {
                cb.list_leases(pb::ListLeasesRequest::default())
                    .await
                    .is_ok_and(|r| r.into_inner().leases.is_empty())
            }
        })
        .await,
        "a seat lingers after the guards were dropped"
    );
    let _ = &mut cb;
}
