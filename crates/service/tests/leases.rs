//! Concurrent-use seats over gRPC, on two replicas of one PBX sharing one
//! Redis: the quantity holds across replicas under concurrency, a holder never
//! takes a second seat, a crashed holder's seat is free within one lease
//! length, renewals report what is lost, and the seat models keep apart.

mod common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use chrono::Utc;
use common::proxy::{Fault, FaultProxy};
use common::*;
use comtrexx_licensing::config::RawConfig;
use comtrexx_licensing::domain::{Edition, Feature, SeatModel};
use comtrexx_licensing::grpc::pb;
use tonic::{Code, Status};
use tonic_types::StatusExt as _;

const WAIT: Duration = Duration::from_secs(10);

/// Two replicas A and B of one PBX on one Redis; `user` is sold for
/// concurrent use, `call_assist` as assigned seats. Fields drop in order: the
/// replicas stop before their Redis.
struct Pair {
    a: TestServer,
    b: TestServer,
    vendor: Vendor,
    serial: String,
    redis: RedisServer,
}

impl Pair {
    async fn start(tag: &str, users: u32, lease_seconds: u64) -> Self {
        let (a, b, vendor, serial, redis) =
            concurrent_replicas(tag, users, lease_seconds, |_| {}).await;
        Self {
            a,
            b,
            vendor,
            serial,
            redis,
        }
    }
}

async fn acquire(
    c: &mut Client,
    user: &str,
    holder: &str,
) -> Result<pb::AcquireLeaseResponse, Status> {
    c.acquire_lease(pb::AcquireLeaseRequest {
        user_id: user.into(),
        feature: String::new(),
        holder: holder.into(),
    })
    .await
    .map(tonic::Response::into_inner)
}

async fn renew(c: &mut Client, holder: &str, ids: &[String]) -> pb::RenewLeasesResponse {
    c.renew_leases(pb::RenewLeasesRequest {
        holder: holder.into(),
        lease_ids: ids.to_vec(),
    })
    .await
    .expect("RenewLeases")
    .into_inner()
}

async fn release(c: &mut Client, id: &str) -> pb::ReleaseLeaseResponse {
    c.release_lease(pb::ReleaseLeaseRequest {
        lease_id: id.into(),
    })
    .await
    .expect("ReleaseLease")
    .into_inner()
}

async fn all_leases(c: &mut Client) -> Vec<pb::Lease> {
    let mut out = Vec::new();
    let mut token = String::new();
    loop {
        let page = c
            .list_leases(pb::ListLeasesRequest {
                feature: String::new(),
                page_size: 7,
                page_token: token,
                min_version: 0,
            })
            .await
            .expect("ListLeases")
            .into_inner();
        out.extend(page.leases);
        if page.next_page_token.is_empty() {
            return out;
        }
        token = page.next_page_token;
    }
}

async fn check_at(c: &mut Client, user: &str, min_version: u64) -> pb::CheckSeatResponse {
    c.check_seat(pb::CheckSeatRequest {
        user_id: user.into(),
        feature: String::new(),
        min_version,
    })
    .await
    .expect("CheckSeat")
    .into_inner()
}

fn reason(status: &Status) -> String {
    status
        .get_details_error_info()
        .map(|i| i.reason)
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_hundred_acquisitions_over_two_replicas_grant_exactly_the_quantity() {
    let pair = Pair::start("lease-race", 20, 90).await;
    let mut clients = Vec::new();
    for i in 0..8 {
        let server = if i % 2 == 0 { &pair.a } else { &pair.b };
        clients.push(server.client().await);
    }
    let tasks: Vec<_> = (0..200)
        .map(|i| {
            let mut c = clients[i % clients.len()].clone();
            let user = format!("user-{i:03}");
            tokio::spawn(async move {
                let r = acquire(&mut c, &user, &format!("pod-{}", i % 4)).await;
                (user, r)
            })
        })
        .collect();
    let mut granted = BTreeSet::new();
    let mut busy = 0;
    for task in tasks {
        let (user, result) = task.await.unwrap();
        match result {
            Ok(r) => {
                assert!(r.created, "{user}: {r:?}");
                assert_eq!(r.lease.unwrap().user_id, user);
                granted.insert(user);
            }
            Err(s) if s.code() == Code::ResourceExhausted => {
                let info = s.get_details_error_info().expect("ErrorInfo");
                assert_eq!(info.reason, "NO_FREE_SEAT");
                assert_eq!(info.metadata["capacity"], "20", "{info:?}");
                assert_eq!(info.metadata["in_use"], "20", "{info:?}");
                busy += 1;
            }
            Err(s) => panic!("{user}: unexpected {s:?}"),
        }
    }
    assert_eq!(granted.len(), 20);
    assert_eq!(busy, 180);
    for server in [&pair.a, &pair.b] {
        let mut c = server.client().await;
        let listed: BTreeSet<String> = all_leases(&mut c)
            .await
            .into_iter()
            .map(|l| l.user_id)
            .collect();
        assert_eq!(listed, granted, "replica {}", server.addr);
    }
    // The overview of either replica shows the use, the peak and the busy count.
    for server in [&pair.a, &pair.b] {
        let c = server.client().await;
        let seen = eventually(WAIT, || {
            let mut c = c.clone();
            async move {
                let o = overview(&mut c).await;
                let user = o.entitlements.iter().find(|e| e.feature == "user").unwrap();
                o.concurrent_use.iter().any(|u| {
                    u.feature == "user"
                        && u.capacity == 20
                        && u.in_use == 20
                        && u.peak_in_use_today == 20
                        && u.at_capacity
                }) && user.in_use == 20
                    && user.seat_model() == pb::SeatModel::Concurrent
            }
        })
        .await;
        assert!(seen, "replica {} never showed 20 of 20 in use", server.addr);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_holder_never_takes_a_second_seat() {
    let pair = Pair::start("lease-idem", 3, 90).await;
    let mut clients = Vec::new();
    for server in [&pair.a, &pair.b] {
        clients.push(server.client().await);
    }
    let tasks: Vec<_> = (0..40)
        .map(|i| {
            let mut c = clients[i % 2].clone();
            tokio::spawn(async move { acquire(&mut c, "alice", "pod-1").await })
        })
        .collect();
    let mut created = 0;
    let mut ids = BTreeSet::new();
    for task in tasks {
        let r = task.await.unwrap().expect("every acquisition is OK");
        created += usize::from(r.created);
        ids.insert(r.lease.unwrap().lease_id);
    }
    assert_eq!(created, 1, "exactly one call took the seat");
    assert_eq!(ids.len(), 1, "every call answered the same lease");
    let mut a = pair.a.client().await;
    assert_eq!(all_leases(&mut a).await.len(), 1);
    // Another holder of the same user is another use.
    let mut b = pair.b.client().await;
    assert!(acquire(&mut b, "alice", "pod-2").await.unwrap().created);
    assert_eq!(all_leases(&mut a).await.len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_crashed_holders_seat_is_free_within_one_lease_length() {
    let pair = Pair::start("lease-expiry", 1, 5).await;
    let mut a = pair.a.client().await;
    let mut b = pair.b.client().await;
    let taken = acquire(&mut a, "crashed", "pod-1").await.unwrap();
    let lease = taken.lease.unwrap();
    // Read your writes on the other replica.
    let on_b = check_at(&mut b, "crashed", taken.version).await;
    assert!(on_b.licensed, "{on_b:?}");
    assert_eq!(on_b.reason(), pb::SeatReason::Assigned);
    assert_eq!(on_b.valid_until, lease.expires_at);
    let full = acquire(&mut b, "waiting", "pod-2").await.unwrap_err();
    assert_eq!(full.code(), Code::ResourceExhausted);

    // pod-1 stops renewing. Within one lease length (5 s) the seat is free.
    let started = Instant::now();
    let next = loop {
        match acquire(&mut b, "waiting", "pod-2").await {
            Ok(r) => break r,
            Err(s) if s.code() == Code::ResourceExhausted => {
                assert!(
                    started.elapsed() < Duration::from_secs(7),
                    "not free within one lease length"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(s) => panic!("{s:?}"),
        }
    };
    assert!(next.created);
    let crashed = check_at(&mut a, "crashed", next.version).await;
    assert!(!crashed.licensed);
    assert_eq!(crashed.reason(), pb::SeatReason::NoLease);
    let waiting = check_at(&mut a, "waiting", next.version).await;
    assert!(waiting.licensed);
    // The crashed holder comes back: its lease is lost, not renewed.
    let r = renew(&mut a, "pod-1", std::slice::from_ref(&lease.lease_id)).await;
    assert!(r.leases.is_empty());
    assert_eq!(r.lost, vec![lease.lease_id]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renewals_keep_leases_and_report_what_is_lost() {
    let pair = Pair::start("lease-renew", 5, 90).await;
    let mut a = pair.a.client().await;
    let mut b = pair.b.client().await;
    let x = acquire(&mut a, "x", "pod-1").await.unwrap().lease.unwrap();
    let y = acquire(&mut a, "y", "pod-1").await.unwrap().lease.unwrap();
    let z = acquire(&mut a, "z", "pod-2").await.unwrap().lease.unwrap();
    let released = release(&mut b, &y.lease_id).await;
    assert!(released.released);
    assert!(!release(&mut b, &y.lease_id).await.released);
    let ids = vec![
        x.lease_id.clone(),
        y.lease_id.clone(),
        z.lease_id.clone(),
        "ffffffffffffffffffffffffffffffff".to_owned(),
    ];
    let r = renew(&mut b, "pod-1", &ids).await;
    assert_eq!(r.leases.len(), 1);
    assert_eq!(r.leases[0].lease_id, x.lease_id);
    assert!(r.leases[0].expires_at.as_ref().unwrap().seconds >= x.expires_at.unwrap().seconds);
    assert_eq!(
        r.lost,
        [y.lease_id.clone(), z.lease_id.clone(), ids[3].clone()]
    );
    assert!(r.version > released.version);
    let y_check = check_at(&mut a, "y", released.version).await;
    assert_eq!(y_check.reason(), pb::SeatReason::NoLease);
    let x_check = check_at(&mut a, "x", r.version).await;
    assert!(x_check.licensed);
}

#[tokio::test]
async fn seat_models_keep_apart_and_requests_are_validated() {
    let pair = Pair::start("lease-models", 2, 90).await;
    let mut a = pair.a.client().await;
    // Assigned seats of a concurrent feature, leases of an assigned one: refused.
    let err = assign(&mut a, "alice", "user").await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert_eq!(reason(&err), "WRONG_SEAT_MODEL");
    let err = a
        .acquire_lease(pb::AcquireLeaseRequest {
            user_id: "alice".into(),
            feature: "call_assist".into(),
            holder: "pod-1".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert_eq!(reason(&err), "WRONG_SEAT_MODEL");
    assert!(
        assign(&mut a, "alice", "call_assist")
            .await
            .unwrap()
            .created
    );
    assert_eq!(
        checked(&mut a, "alice", "").await.reason(),
        pb::SeatReason::NoLease
    );

    let field = |s: Status| {
        assert_eq!(s.code(), Code::InvalidArgument, "{s:?}");
        s.get_details_error_info().unwrap().metadata["field"].clone()
    };
    for (user, holder, want) in [
        ("", "pod", "user_id"),
        ("alice", "", "holder"),
        ("alice", "a\u{7}b", "holder"),
        ("alice", &"h".repeat(129), "holder"),
    ] {
        let err = acquire(&mut a, user, holder).await.unwrap_err();
        assert_eq!(field(err), want, "{user:?} {holder:?}");
    }
    let err = a
        .renew_leases(pb::RenewLeasesRequest {
            holder: "pod".into(),
            lease_ids: vec![String::new()],
        })
        .await
        .unwrap_err();
    assert_eq!(field(err), "lease_ids");
    let err = a
        .release_lease(pb::ReleaseLeaseRequest {
            lease_id: "x".repeat(65),
        })
        .await
        .unwrap_err();
    assert_eq!(field(err), "lease_id");
    let err = a
        .list_leases(pb::ListLeasesRequest {
            page_token: "nonsense".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(field(err), "page_token");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_capacity_drop_refuses_new_uses_and_cuts_no_live_one() {
    let pair = Pair::start("lease-drop", 3, 90).await;
    let mut a = pair.a.client().await;
    let mut b = pair.b.client().await;
    let mut ids = Vec::new();
    for user in ["u1", "u2", "u3"] {
        ids.push(
            acquire(&mut a, user, "pod-1")
                .await
                .unwrap()
                .lease
                .unwrap()
                .lease_id,
        );
    }
    // The vendor's next document sells one.
    pair.vendor.write_license_with_models(
        &pair.serial,
        Edition::Vm,
        Utc::now(),
        &[
            (Feature::User, 1, SeatModel::Concurrent),
            (Feature::CallAssist, 5, SeatModel::Assigned),
        ],
    );
    let r = b
        .reconcile(pb::ReconcileRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.outcome(), pb::ReconcileOutcome::Updated);
    // Live uses go on: renewed, and licensed.
    let renewed = renew(&mut a, "pod-1", &ids).await;
    assert_eq!(renewed.leases.len(), 3);
    for user in ["u1", "u2", "u3"] {
        assert!(
            check_at(&mut b, user, renewed.version).await.licensed,
            "{user}"
        );
    }
    // New ones are refused until the live ones are down below the quantity.
    let busy = acquire(&mut b, "u4", "pod-2").await.unwrap_err();
    assert_eq!(busy.code(), Code::ResourceExhausted);
    let info = busy.get_details_error_info().unwrap();
    assert_eq!(
        (
            info.metadata["capacity"].as_str(),
            info.metadata["in_use"].as_str()
        ),
        ("1", "3")
    );
    release(&mut a, &ids[0]).await;
    release(&mut a, &ids[1]).await;
    assert_eq!(
        acquire(&mut b, "u4", "pod-2").await.unwrap_err().code(),
        Code::ResourceExhausted
    );
    release(&mut a, &ids[2]).await;
    assert!(acquire(&mut b, "u4", "pod-2").await.unwrap().created);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leases_survive_a_redis_that_lost_its_data() {
    let pair = Pair::start("lease-flush", 2, 90).await;
    let mut a = pair.a.client().await;
    let mut b = pair.b.client().await;
    let taken = acquire(&mut a, "alice", "pod-1").await.unwrap();
    let lease = taken.lease.unwrap();
    // B has the lease in its copy before Redis loses everything.
    assert!(check_at(&mut b, "alice", taken.version).await.licensed);
    let _: () = redis::cmd("FLUSHALL")
        .query(&mut pair.redis.connection())
        .unwrap();
    // A replica writes its copy back (restore): the holder's renewal finds
    // its lease, and the quantity still counts it.
    let ok = eventually(WAIT, || {
        let mut a = a.clone();
        let id = lease.lease_id.clone();
        async move {
            a.renew_leases(pb::RenewLeasesRequest {
                holder: "pod-1".into(),
                lease_ids: vec![id],
            })
            .await
            .is_ok_and(|r| r.into_inner().leases.len() == 1)
        }
    })
    .await;
    assert!(ok, "the lease never came back");
    assert!(acquire(&mut b, "bob", "pod-2").await.unwrap().created);
    assert_eq!(
        acquire(&mut b, "carol", "pod-2").await.unwrap_err().code(),
        Code::ResourceExhausted
    );
    assert!(checked(&mut b, "alice", "").await.licensed);
}

/// The next `WatchSeats` message that is not a heartbeat.
async fn next_change(
    stream: &mut tonic::Streaming<pb::WatchSeatsResponse>,
) -> pb::WatchSeatsResponse {
    loop {
        let m = tokio::time::timeout(WAIT, stream.message())
            .await
            .expect("a message within the wait")
            .expect("the stream goes on")
            .expect("a message");
        if !matches!(m.kind, Some(pb::watch_seats_response::Kind::Heartbeat(_))) {
            return m;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_seats_streams_the_leases_a_local_decision_needs() {
    use pb::seat_state_change::Kind as Change;
    use pb::watch_seats_response::Kind;
    let pair = Pair::start("lease-watch", 2, 90).await;
    let mut a = pair.a.client().await;
    let mut b = pair.b.client().await;
    let first = acquire(&mut a, "alice", "pod-1").await.unwrap();
    // A snapshot on the other replica at that version carries the lease and
    // the feature's seat model.
    check_at(&mut b, "alice", first.version).await;
    let mut stream = b
        .watch_seats(pb::WatchSeatsRequest::default())
        .await
        .expect("WatchSeats")
        .into_inner();
    let m = next_change(&mut stream).await;
    let Some(Kind::Snapshot(s)) = m.kind else {
        panic!("a snapshot first: {m:?}");
    };
    assert_eq!(s.leases, vec![first.lease.clone().unwrap()]);
    let license = s.license.unwrap();
    let user = license
        .entitlements
        .iter()
        .find(|e| e.feature == "user")
        .unwrap();
    assert_eq!(user.seat_model(), pb::SeatModel::Concurrent);

    // Then every lease write as a change, one version at a time.
    let second = acquire(&mut a, "bob", "pod-2").await.unwrap();
    let m = next_change(&mut stream).await;
    assert_eq!(m.version, second.version);
    match m.kind {
        Some(Kind::Change(c)) => match c.kind {
            Some(Change::LeasePut(p)) => assert_eq!(p.lease, second.lease),
            other => panic!("{other:?}"),
        },
        other => panic!("{other:?}"),
    }
    let id = first.lease.unwrap().lease_id;
    let renewed = renew(&mut a, "pod-1", std::slice::from_ref(&id)).await;
    let m = next_change(&mut stream).await;
    assert_eq!(m.version, renewed.version);
    match m.kind {
        Some(Kind::Change(c)) => match c.kind {
            Some(Change::LeasesRenewed(r)) => {
                assert_eq!(
                    (r.holder.as_str(), r.lease_ids.clone()),
                    ("pod-1", vec![id.clone()])
                );
                assert_eq!(r.expires_at, renewed.leases[0].expires_at);
            }
            other => panic!("{other:?}"),
        },
        other => panic!("{other:?}"),
    }
    let released = release(&mut a, &id).await;
    let m = next_change(&mut stream).await;
    assert_eq!(m.version, released.version);
    assert!(matches!(
        m.kind,
        Some(Kind::Change(pb::SeatStateChange {
            kind: Some(Change::LeaseReleased(ref r))
        })) if *r == id
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn leases_a_redis_rolled_back_lost_are_written_back_within_the_quantity() {
    let mut pair = Pair::start("lease-rollback", 3, 90).await;
    let mut a = pair.a.client().await;
    let mut b = pair.b.client().await;
    let first = acquire(&mut a, "u1", "pod-1").await.unwrap();
    let rdb = pair.redis.save_snapshot();
    let second = acquire(&mut a, "u2", "pod-1").await.unwrap();
    let third = acquire(&mut b, "u3", "pod-2").await.unwrap();
    // Both replicas have seen every lease.
    for c in [&mut a, &mut b] {
        for user in ["u1", "u2", "u3"] {
            assert!(
                check_at(c, user, third.version.max(second.version))
                    .await
                    .licensed
            );
        }
    }
    // Redis comes back from the older snapshot: it holds u1's lease only.
    pair.redis.restart_from(&rdb);
    // The replicas write the lost leases back: their holders' renewals find
    // them, and the pool is full again (no fourth use).
    for (c, holder, lease) in [(&a, "pod-1", &second), (&b, "pod-2", &third)] {
        let id = lease.lease.as_ref().unwrap().lease_id.clone();
        let back = eventually(WAIT, || {
            let mut c = c.clone();
            let id = id.clone();
            async move {
                c.renew_leases(pb::RenewLeasesRequest {
                    holder: holder.into(),
                    lease_ids: vec![id],
                })
                .await
                .is_ok_and(|r| r.into_inner().leases.len() == 1)
            }
        })
        .await;
        assert!(back, "the lease of {holder} was not written back");
    }
    let r = renew(&mut a, "pod-1", &[first.lease.unwrap().lease_id]).await;
    assert_eq!(
        r.leases.len(),
        1,
        "the lease the snapshot kept is there too"
    );
    assert_eq!(
        acquire(&mut b, "u4", "pod-2").await.unwrap_err().code(),
        Code::ResourceExhausted
    );
    let o = overview(&mut b).await;
    assert!(o.writes_restored >= 2, "{o:?}");
    assert_eq!(o.writes_lost, 0, "{o:?}");
}

/// The vendor switches `user` from assigned seats to concurrent use and back
/// (docs/operations.md, "Switching a feature to concurrent use"): after the
/// switch assigned seats license nobody and count nothing, leases do; the
/// seats stay listed (and releasable) so that switching back brings them
/// into force again, while the leases then license nobody (their holders may
/// still renew them until they release them).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_feature_switched_to_concurrent_use_and_back() {
    let pair = Pair::start("lease-switch", 3, 90).await;
    let mut a = pair.a.client().await;
    let mut b = pair.b.client().await;
    let sell = |model: SeatModel| {
        pair.vendor.write_license_with_models(
            &pair.serial,
            Edition::Vm,
            Utc::now(),
            &[
                (Feature::User, 3, model),
                (Feature::CallAssist, 5, SeatModel::Assigned),
            ],
        );
    };
    let operator = b.clone();
    let switch = |model: SeatModel| {
        sell(model);
        let mut b = operator.clone();
        async move {
            let r = reconcile(&mut b).await;
            assert_eq!(r.outcome(), pb::ReconcileOutcome::Updated, "{r:?}");
            overview(&mut b).await.version
        }
    };
    // Before: assigned seats.
    let v = switch(SeatModel::Assigned).await;
    for user in ["alice", "bob"] {
        assert!(assign(&mut a, user, "user").await.unwrap().created);
    }
    assert!(check_at(&mut b, "alice", v).await.licensed);

    // Concurrent use: the seats license nobody and count nothing.
    let v = switch(SeatModel::Concurrent).await;
    let c = check_at(&mut a, "alice", v).await;
    assert_eq!((c.licensed, c.reason()), (false, pb::SeatReason::NoLease));
    assert_eq!(
        seat_holder_set(&mut a).await,
        BTreeSet::from(["alice".to_owned(), "bob".to_owned()]),
        "the assigned seats stay listed"
    );
    let err = assign(&mut a, "carol", "user").await.unwrap_err();
    assert_eq!(reason(&err), "WRONG_SEAT_MODEL");
    let mut ids = Vec::new();
    for user in ["alice", "carol", "dave"] {
        let taken = acquire(&mut a, user, "pod-1").await.unwrap();
        ids.push(taken.lease.unwrap().lease_id);
    }
    assert!(check_at(&mut b, "alice", v).await.licensed);
    assert_eq!(
        acquire(&mut b, "erin", "pod-2").await.unwrap_err().code(),
        Code::ResourceExhausted,
        "three leases fill the quantity; the two seats do not count"
    );
    // A seat left from before can be released (clean-up).
    assert!(released(&mut a, "bob", "user").await);

    // Back to assigned seats: the remaining seat licenses again, the leases
    // license nobody and none can be taken; the holder's renewals still
    // succeed (no call in progress is disturbed) until it releases them.
    let v = switch(SeatModel::Assigned).await;
    assert!(check_at(&mut b, "alice", v).await.licensed);
    let c = check_at(&mut b, "carol", v).await;
    assert_eq!(
        (c.licensed, c.reason()),
        (false, pb::SeatReason::NotAssigned)
    );
    let err = acquire(&mut a, "carol", "pod-1").await.unwrap_err();
    assert_eq!(reason(&err), "WRONG_SEAT_MODEL");
    let r = renew(&mut a, "pod-1", &ids).await;
    assert_eq!((r.leases.len(), r.lost.len()), (3, 0), "{r:?}");
    let c = check_at(&mut b, "carol", r.version).await;
    assert!(
        !c.licensed,
        "a renewed lease licenses nobody on an assigned feature"
    );
    for id in &ids {
        assert!(release(&mut a, id).await.released);
    }
    assert!(all_leases(&mut b).await.is_empty());
}

/// The lease that fills a concurrent feature is announced by every replica
/// (`lease_at_capacity`), not only by the one that took it; a lease below the
/// quantity is not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_replica_announces_a_feature_at_capacity() {
    let pair = Pair::start("lease-full-event", 2, 90).await;
    let mut a = pair.a.client().await;
    let mut streams = Vec::new();
    for server in [&pair.a, &pair.b] {
        let mut c = server.client().await;
        streams.push(
            c.watch_license_events(pb::WatchLicenseEventsRequest {})
                .await
                .expect("WatchLicenseEvents")
                .into_inner(),
        );
    }
    acquire(&mut a, "u1", "pod-1").await.unwrap();
    acquire(&mut a, "u2", "pod-1").await.unwrap();
    for (stream, replica) in streams.iter_mut().zip(["A (took them)", "B"]) {
        let mut kinds = Vec::new();
        let full = tokio::time::timeout(WAIT, async {
            loop {
                let e = stream.message().await.expect("events").expect("open");
                kinds.push(e.kind.clone());
                if e.kind == "lease_at_capacity" {
                    return e;
                }
            }
        })
        .await
        .unwrap_or_else(|_| panic!("replica {replica}: no lease_at_capacity"));
        assert_eq!(
            (full.feature.as_str(), full.detail.as_str()),
            ("user", "capacity 2, in use 2"),
            "replica {replica}"
        );
        assert_eq!(
            kinds,
            ["lease_acquired", "lease_acquired", "lease_at_capacity"],
            "replica {replica}: announced once, after the second lease"
        );
    }
}

/// A failover to a standby that missed the last writes; replica A repairs the
/// new master first (its versions go on right after the one both replicas had
/// reached), and B reaches it only after that: B finds the feed going on from
/// its version out of another history, and reads the store again instead of
/// following it on its own copy. Both then answer as the store holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_replica_whose_version_a_repair_jumped_over_reads_the_store_again() {
    let mut master = RedisServer::start();
    let standby = RedisServer::replica_of(&master);
    let (to_a, to_b) = (
        FaultProxy::start(master.addr()).await,
        FaultProxy::start(master.addr()).await,
    );
    let vendor = Vendor::new();
    let serial = serial("lease-jumped");
    vendor.write_license_with_models(
        &serial,
        Edition::Vm,
        Utc::now() - chrono::Duration::hours(1),
        &[(Feature::User, 1, SeatModel::Concurrent)],
    );
    let replica = |proxy: &FaultProxy| {
        let mut config = without_load_limits(RawConfig {
            redis_url: Some(proxy.url()),
            ..licensed_config(None, &serial, &vendor)
        });
        config.leases.duration_seconds = 600;
        TestServer::start(config)
    };
    let (a, b) = (replica(&to_a).await, replica(&to_b).await);
    let (mut ca, mut cb) = (a.client().await, b.client().await);
    wait_active(&ca).await;
    wait_active(&cb).await;

    // u0's lease reaches the standby; then the standby stops following.
    let first = acquire(&mut ca, "u0", "pod-1").await.unwrap();
    let standby_store = comtrexx_licensing::store::redis::RedisStore::new(
        &standby.url(),
        &comtrexx_licensing::domain::SerialNumber::parse(&serial).unwrap(),
        Duration::from_secs(5),
    )
    .unwrap();
    let replicated = eventually(WAIT, || async {
        use comtrexx_licensing::store::Store as _;
        standby_store
            .history(0)
            .await
            .is_ok_and(|h| h.last().is_some_and(|c| c.version >= first.version))
    })
    .await;
    assert!(replicated, "the standby never had u0's lease");
    standby.detach();
    // On the master only: u0's lease given back, u1's taken (a pool of one).
    let first_id = first.lease.unwrap().lease_id;
    assert!(release(&mut ca, &first_id).await.released);
    let second = acquire(&mut ca, "u1", "pod-1").await.unwrap();
    assert!(check_at(&mut cb, "u1", second.version).await.licensed);

    // The failover, B cut off; a write through A finds the store went back
    // and repairs it.
    to_b.set(Fault::Reset);
    master.kill();
    to_a.retarget(standby.addr()).await;
    // (The first command on a connection the failover reset may fail.)
    let second_id = second.lease.unwrap().lease_id;
    let repaired = eventually(WAIT, || {
        let (mut ca, id) = (ca.clone(), second_id.clone());
        async move {
            ca.renew_leases(pb::RenewLeasesRequest {
                holder: "pod-1".into(),
                lease_ids: vec![id],
            })
            .await
            .is_ok()
                && overview(&mut ca).await.last_store_repair_at.is_some()
        }
    })
    .await;
    assert!(repaired, "A never repaired the new master");
    to_b.retarget(standby.addr()).await;

    // B answers as the store holds, as A does.
    let held = |leases: &[pb::Lease], user: &str| leases.iter().any(|l| l.user_id == user);
    let agree = eventually(WAIT, || {
        let (mut ca, mut cb) = (ca.clone(), cb.clone());
        async move {
            let leases = all_leases(&mut ca).await;
            let mut agree = true;
            for user in ["u0", "u1"] {
                let (on_a, on_b) = (
                    check_at(&mut ca, user, 0).await.licensed,
                    check_at(&mut cb, user, 0).await.licensed,
                );
                agree &= on_a == held(&leases, user) && on_b == on_a;
            }
            agree
        }
    })
    .await;
    assert!(
        agree,
        "B kept answering from a history the store no longer has"
    );
}
