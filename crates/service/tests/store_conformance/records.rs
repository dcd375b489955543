//! Records this code did not write (Redis only): corrupt records, records
//! with fields of a newer replica, a bad version counter or clock.

use super::*;

redis_only! {
    corrupt_seat_does_not_stop_a_smaller_license;
    corrupt_seat_does_not_stop_a_release;
    corrupt_own_seat_is_replaced_in_its_slot;
    corrupt_tryout_record_is_replaced_by_compare_and_set;
    corrupt_license_record_is_replaced_by_the_next_license;
    records_with_unknown_fields_can_be_compared_and_set;
    corrupt_fence_does_not_leave_a_lease_taken;
    bad_version_counter_refuses_writes_before_any;
    corrupt_clock_does_not_stop_a_restore;
}

// ---------------------------------------------------------------------------
// Records this code did not write (Redis only)
// ---------------------------------------------------------------------------
//
// The memory store holds domain values, not bytes: it cannot hold a corrupt
// record, nor one with a field this code does not know (a newer replica's). So
// these cases run against Redis only; each writes the bytes with a raw
// connection under the test's own serial number.

const USER_POOL: &str = "seats:user:purchased";

/// Raw commands on one Redis subject's keys (`name` is the part after the prefix).
struct Raw<'a>(&'a Subject);

impl Raw<'_> {
    fn key(&self, name: &str) -> String {
        format!("lic:{{{}}}:{name}", self.0.serial)
    }

    fn run<T: redis::FromRedisValue>(&self, cmd: &mut redis::Cmd) -> T {
        let mut conn = self.0.redis.as_ref().expect("a Redis subject").connection();
        cmd.query(&mut conn).expect("a raw Redis command")
    }

    fn set(&self, name: &str, value: &str) {
        self.run::<()>(redis::cmd("SET").arg(self.key(name)).arg(value));
    }

    fn hset(&self, name: &str, field: &str, value: &str) {
        self.run::<i64>(redis::cmd("HSET").arg(self.key(name)).arg(field).arg(value));
    }

    fn hexists(&self, name: &str, field: &str) -> bool {
        self.run(redis::cmd("HEXISTS").arg(self.key(name)).arg(field))
    }

    /// Writes `value` to the string record `name` and reports it in the feed,
    /// as a newer replica's script would.
    fn write_as_newer_replica(&self, name: &str, kind: &str, value: &str) {
        let v: u64 = self.run(redis::cmd("INCR").arg(self.key("version")));
        self.set(name, value);
        self.run::<String>(
            redis::cmd("XADD")
                .arg(self.key("changes"))
                .arg(format!("{v}-0"))
                .arg("k")
                .arg(kind)
                .arg("d")
                .arg(value),
        );
    }
}

/// `json` with one more field, as a newer replica adds an optional one.
fn with_unknown_field(json: &str, path: &[&str]) -> String {
    let mut value: serde_json::Value = serde_json::from_str(json).expect("a stored record");
    let mut at = &mut value;
    for part in path {
        at = &mut at[*part];
    }
    at["added_by_a_newer_replica"] = serde_json::Value::Bool(true);
    value.to_string()
}

/// The issue's reproduction: an unreadable seat, then a license with fewer seats.
async fn corrupt_seat_does_not_stop_a_smaller_license(subject: &Subject) {
    let store = &*subject.store;
    let lic = with_license(store, "corrupt-drop").await;
    assign_in_order(
        store,
        &lic,
        Feature::User,
        &["alice", "carol", "dave", "erin"],
    )
    .await;
    Raw(subject).hset(USER_POOL, "bob", "garbage");

    // Applies `next` over `current` with two user seats.
    let two_users = async |current: &StoredLicense, next: &StoredLicense| {
        replace_license(store, current, next, &[(Feature::User, 2)]).await
    };
    let smaller = license("corrupt-drop-2", 2);
    let changes = two_users(&lic, &smaller).await;
    assert_eq!(changes[0].kind, ChangeKind::LicenseApplied(smaller.clone()));
    // Five seats for two: bob's unreadable record still takes its slot, so the
    // three most recent readable seats are flagged and no more than two are left.
    assert_eq!(
        users_of(&flagged_seats(&changes[1..])),
        ["carol", "dave", "erin"]
    );
    let snap = snapshot(store).await;
    assert_eq!(snap.license.as_ref(), Some(&smaller));
    assert_eq!(
        flagged_users(&snap, Feature::User),
        ["carol", "dave", "erin"]
    );
    assert!(
        snap.corrupt.iter().any(|c| c.contains("bob")),
        "the corrupt seat is reported: {:?}",
        snap.corrupt
    );

    // The next reconcile at the same quantity finds the flags in place.
    let changes = two_users(&smaller, &license("corrupt-drop-3", 2)).await;
    assert_eq!(changes.len(), 1, "only the license: {changes:?}");
}

async fn corrupt_seat_does_not_stop_a_release(subject: &Subject) {
    let store = &*subject.store;
    let lic = with_license(store, "corrupt-release").await;
    assign_in_order(store, &lic, Feature::User, &["u1", "u2", "u3"]).await;
    // JSON, but no seat record (no assignment time); and bytes that are not text.
    Raw(subject).hset(USER_POOL, "bob", r#"{"v":1}"#);
    Raw(subject).run::<i64>(
        redis::cmd("HSET")
            .arg(Raw(subject).key(USER_POOL))
            .arg(&b"\xff\xfe"[..])
            .arg(&b"\xff"[..]),
    );

    let changes = release(store, "u1", Feature::User, Some(2))
        .await
        .expect("u1 held a seat");
    assert_eq!(
        changes[0].kind,
        ChangeKind::SeatReleased {
            feature: Feature::User,
            user_id: uid("u1"),
        }
    );
    // u2, u3 and two corrupt records are left for two: both readable are flagged.
    assert_eq!(users_of(&flagged_seats(&changes[1..])), ["u2", "u3"]);
    let snap = snapshot(store).await;
    assert_eq!(users_of(&snap.seats), ["u2", "u3"]);
    assert_eq!(flagged_users(&snap, Feature::User), ["u2", "u3"]);
    assert_eq!(snap.corrupt.len(), 2, "{:?}", snap.corrupt);
    assert!(
        Raw(subject).hexists(USER_POOL, "bob"),
        "a corrupt record is skipped, not removed"
    );
}

async fn corrupt_own_seat_is_replaced_in_its_slot(subject: &Subject) {
    let store = &*subject.store;
    let raw = Raw(subject);
    let lic = with_license(store, "corrupt-own").await;
    created(assign(store, "alice", Feature::User, &purchased(&lic, 10)).await);
    raw.hset(USER_POOL, "bob", "garbage");
    raw.run::<i64>(
        redis::cmd("ZADD")
            .arg(raw.key("seat_index"))
            .arg(0)
            .arg("user\0bob"),
    );
    // Skipped by every read, but still a seat in use for capacity.
    assert_eq!(
        users_of(&store.list_seats(None, None, 10).await.unwrap()),
        ["alice"]
    );
    assert_eq!(users_of(&snapshot(store).await.seats), ["alice"]);
    let two = purchased(&lic, 2);
    let full = |in_use| AssignOutcome::Exhausted {
        capacity: 2,
        in_use,
    };
    assert_eq!(assign(store, "carol", Feature::User, &two).await, full(2));

    // Bob gets a readable seat in his own slot.
    let (seat, _) = created(assign(store, "bob", Feature::User, &two).await);
    assert_eq!(seat.source, SeatSource::Purchased);
    let snap = snapshot(store).await;
    assert_eq!(users_of(&snap.seats), ["alice", "bob"]);
    assert!(snap.corrupt.is_empty(), "{:?}", snap.corrupt);

    // Where the others already fill the pool, a corrupt record stays as it is:
    // replacing it would give one seat more than the quantity.
    raw.hset(USER_POOL, "dave", "garbage");
    assert_eq!(assign(store, "dave", Feature::User, &two).await, full(3));
}

/// Every replica reads a corrupt tryout record as none, so a write expecting
/// none replaces it (the tryout is also once per serial at the licensing server).
async fn corrupt_tryout_record_is_replaced_by_compare_and_set(subject: &Subject) {
    let store = &*subject.store;
    Raw(subject).set("tryout", "garbage");
    let snap = snapshot(store).await;
    assert_eq!(snap.tryout, None);
    assert!(!snap.corrupt.is_empty());

    let new = started_tryout();
    assert!(
        store
            .compare_and_set_tryout(None, None, &new)
            .await
            .unwrap()
            .is_some(),
        "the corrupt record read as none is replaced"
    );
    let snap = snapshot(store).await;
    assert_eq!(snap.tryout, Some(new));
    assert!(snap.corrupt.is_empty(), "{:?}", snap.corrupt);
}

/// A replica reads a corrupt license record as none (every seat unlicensed):
/// the next license applied, expecting none, must replace it, not conflict for ever.
async fn corrupt_license_record_is_replaced_by_the_next_license(subject: &Subject) {
    let store = &*subject.store;
    with_license(store, "corrupt-license").await;
    Raw(subject).hset("license", "record", "garbage");
    let snap = snapshot(store).await;
    assert_eq!(snap.license, None);
    assert!(!snap.corrupt.is_empty());

    let next = license("corrupt-license-2", 5);
    let changes = apply(store, plain(None, &next))
        .await
        .expect("the corrupt record read as none is replaced");
    assert_eq!(changes[0].kind, ChangeKind::LicenseApplied(next.clone()));
    assert_eq!(snapshot(store).await.license, Some(next));
}

/// During a rolling upgrade a newer replica writes records with a field this
/// code does not know; compare-and-set compares what was read, not this code's
/// re-encoding, so the two never conflict for ever.
async fn records_with_unknown_fields_can_be_compared_and_set(subject: &Subject) {
    use comtrexx_licensing::store::records::{InitializationRecordV1, TryoutRecordV1};
    let store = &*subject.store;
    let raw = Raw(subject);

    // Read in a snapshot.
    let started = started_tryout();
    let text = with_unknown_field(&TryoutRecordV1::encode(&started), &["record"]);
    raw.set("tryout", &with_unknown_field(&text, &[]));
    assert_eq!(snapshot(store).await.tryout.as_ref(), Some(&started));
    let done = ended(&started);
    assert!(
        store
            .compare_and_set_tryout(None, Some(&started), &done)
            .await
            .unwrap()
            .is_some(),
        "a record with an unknown field is the expected one"
    );
    assert_eq!(snapshot(store).await.tryout.as_ref(), Some(&done));

    // Read from the change feed.
    let before = position(store).await;
    let newer = ended(&done);
    raw.write_as_newer_replica(
        "tryout",
        "tryout",
        &with_unknown_field(&TryoutRecordV1::encode(&newer), &["record"]),
    );
    assert_eq!(
        drain(store, &before)
            .await
            .into_iter()
            .map(|c| c.kind)
            .collect::<Vec<_>>(),
        [ChangeKind::TryoutChanged(newer.clone())]
    );
    assert!(
        store
            .compare_and_set_tryout(None, Some(&newer), &ended(&newer))
            .await
            .unwrap()
            .is_some(),
        "a record read from the feed is the expected one"
    );

    // The pending initialization an activation consumes, likewise.
    let issued = pending("newer-replica");
    raw.set(
        "init",
        &with_unknown_field(&InitializationRecordV1::encode(&issued), &["pending"]),
    );
    assert_eq!(snapshot(store).await.initialization.as_ref(), Some(&issued));
    let lic = license("unknown-fields", 5);
    let changes = apply(
        store,
        LicenseWrite {
            consume_initialization: Some(&issued),
            ..plain(None, &lic)
        },
    )
    .await
    .expect("the initialization read is the expected one");
    assert_eq!(
        changes.last().map(|c| &c.kind),
        Some(&ChangeKind::InitializationConsumed)
    );
}

async fn corrupt_fence_does_not_leave_a_lease_taken(subject: &Subject) {
    let store = &*subject.store;
    Raw(subject).set("fence", "garbage");
    let ttl = Duration::from_secs(30);
    let token = store
        .acquire_lease("a", ttl)
        .await
        .expect("a corrupt fencing counter is no error")
        .expect("the free lease is granted");
    let now = u64::try_from(Utc::now().timestamp_millis()).unwrap();
    assert!(token + 60_000 >= now, "tokens still grow with the clock");
    assert_eq!(store.acquire_lease("b", ttl).await.unwrap(), None);
    store.release_lease("a").await.unwrap();
    let next = store.acquire_lease("b", ttl).await.unwrap().unwrap();
    assert!(next > token);
}

async fn bad_version_counter_refuses_writes_before_any(subject: &Subject) {
    let store = &*subject.store;
    let raw = Raw(subject);
    let lic = with_license(store, "bad-version").await;
    for bad in ["garbage", "0"] {
        // Not a number, or behind the change feed: the version the next entry
        // would take is refused by the feed, after the seat was written.
        raw.set("version", bad);
        let err = store
            .assign_seat(None, &uid("alice"), Feature::User, &purchased(&lic, 5))
            .await
            .unwrap_err();
        assert!(matches!(err, StoreError::Corrupt(_)), "{bad}: {err:?}");
        assert!(
            !raw.hexists(USER_POOL, "alice"),
            "{bad}: nothing was written"
        );
    }
}

async fn corrupt_clock_does_not_stop_a_restore(subject: &Subject) {
    let store = &*subject.store;
    (subject.wipe)();
    Raw(subject).set("clock", "garbage");
    assert!(
        store
            .restore(&Snapshot::default())
            .await
            .expect("a corrupt clock does not stop the restore"),
        "the store lost its epoch"
    );
    assert!(snapshot(store).await.position.is_some());
}
