//! Over-capacity flags across many seats: releases, capacity drops and rises,
//! restores and repairs move exactly the flags `domain::capacity::reflag`
//! moves (the stores keep the order incrementally and never re-sort a pool),
//! and corrupt records among many seats count without being flagged (Redis).

use comtrexx_licensing::domain::capacity::reflag;

use super::*;

conformance! {
    store: flags_follow_releases_across_many_seats;
    store: capacity_changes_move_only_the_boundary;
    wipe: restored_and_repaired_flags_anywhere_are_set_right;
    wipe: incremental_flags_match_the_domain_on_random_operations;
}

/// The purchased pool of `feature` in a snapshot.
fn pool(snap: &Snapshot, feature: Feature) -> Vec<Seat> {
    snap.seats
        .iter()
        .filter(|s| s.feature == feature && s.source == SeatSource::Purchased)
        .cloned()
        .collect()
}

/// The users of `feature`'s purchased pool that are flagged, sorted.
fn flagged_set(snap: &Snapshot, feature: Feature) -> BTreeSet<String> {
    pool(snap, feature)
        .into_iter()
        .filter(|s| s.over_capacity_since.is_some())
        .map(|s| s.user_id.as_str().to_owned())
        .collect()
}

/// The (count - quantity) most recently assigned seats of a pool: the flagged
/// set `reflag` leads to.
fn newest(pool: &[Seat], quantity: u32) -> BTreeSet<String> {
    let mut order: Vec<&Seat> = pool.iter().collect();
    order.sort_by(|a, b| {
        b.assigned_at
            .cmp(&a.assigned_at)
            .then_with(|| b.user_id.cmp(&a.user_id))
    });
    let excess = order.len().saturating_sub(quantity as usize);
    order[..excess]
        .iter()
        .map(|s| s.user_id.as_str().to_owned())
        .collect()
}

/// Asserts the flag changes a store made are those `reflag` makes from `before`
/// (the pool as it was, without `leaving`), and that the pool afterwards holds
/// every other seat unchanged: a kept flag keeps its time.
#[track_caller]
fn assert_reflagged(
    before: &[Seat],
    leaving: Option<&str>,
    quantity: u32,
    moved: &[Change],
    after: &Snapshot,
    what: &str,
) {
    let pool_before: Vec<Seat> = before
        .iter()
        .filter(|s| Some(s.user_id.as_str()) != leaving)
        .cloned()
        .collect();
    let want = reflag(&pool_before, quantity, Utc::now());
    let key = |s: &Seat| {
        (
            s.user_id.as_str().to_owned(),
            s.over_capacity_since.is_some(),
        )
    };
    let want_keys: BTreeSet<_> = want.iter().map(key).collect();
    let got = flagged_seats(moved);
    let got_keys: BTreeSet<_> = got.iter().map(key).collect();
    assert_eq!(got_keys, want_keys, "{what}: the flags that moved");
    assert_eq!(got.len(), got_keys.len(), "{what}: each seat moves once");
    let after_pool = pool(after, Feature::User);
    assert_eq!(
        flagged_set(after, Feature::User),
        newest(&pool_before, quantity),
        "{what}: the newest excess is flagged"
    );
    for seat in &pool_before {
        let now = after_pool
            .iter()
            .find(|s| s.user_id == seat.user_id)
            .unwrap_or_else(|| panic!("{what}: {} kept its seat", seat.user_id));
        assert_eq!(now.assigned_at, seat.assigned_at, "{what}");
        if seat.over_capacity_since.is_some() && now.over_capacity_since.is_some() {
            assert_eq!(
                now.over_capacity_since, seat.over_capacity_since,
                "{what}: {} keeps its flag time",
                seat.user_id
            );
        }
    }
}

/// Releases with a capacity, checked against the domain.
async fn checked_release(store: &dyn Store, user: &str, quantity: u32) {
    let before = pool(&snapshot(store).await, Feature::User);
    let changes = release(store, user, Feature::User, Some(quantity))
        .await
        .unwrap_or_else(|| panic!("{user} held a seat"));
    let after = snapshot(store).await;
    assert_reflagged(
        &before,
        Some(user),
        quantity,
        &changes[1..],
        &after,
        &format!("release {user} at {quantity}"),
    );
}

/// Applies `next` over `current` with a user capacity, checked against the domain.
async fn checked_capacity(
    store: &dyn Store,
    current: &StoredLicense,
    next: &StoredLicense,
    quantity: u32,
) -> Vec<Change> {
    let before = pool(&snapshot(store).await, Feature::User);
    let changes = replace_license(store, current, next, &[(Feature::User, quantity)]).await;
    let after = snapshot(store).await;
    assert_reflagged(
        &before,
        None,
        quantity,
        &changes[1..],
        &after,
        &format!("capacity {quantity}"),
    );
    changes
}

fn user_name(i: usize) -> String {
    format!("u{i:04}")
}

async fn assign_users(store: &dyn Store, lic: &StoredLicense, users: impl Iterator<Item = String>) {
    let plan = purchased(lic, 100_000);
    for user in users {
        created(assign(store, &user, Feature::User, &plan).await);
    }
}

async fn flags_follow_releases_across_many_seats(store: &dyn Store) {
    let lic = with_license(store, "many").await;
    assign_users(store, &lic, (0..300).map(user_name)).await;
    // Down to 240: the 60 newest are flagged.
    let smaller = license("many-2", 240);
    let changes = checked_capacity(store, &lic, &smaller, 240).await;
    assert_eq!(changes.len(), 61);

    // Releasing unflagged seats (oldest, middle) clears the oldest flag each time;
    // releasing a flagged one (newest, lowest, in between) moves nothing else.
    for user in [0, 150, 239, 299, 240, 270, 1, 2] {
        checked_release(store, &user_name(user), 240).await;
    }
    // A release at a smaller capacity flags more, at a larger one clears more.
    checked_release(store, &user_name(3), 200).await;
    checked_release(store, &user_name(4), 280).await;
    checked_release(store, &user_name(5), 0).await;
    checked_release(store, &user_name(6), 1000).await;
    assert!(flagged_set(&snapshot(store).await, Feature::User).is_empty());
}

async fn capacity_changes_move_only_the_boundary(store: &dyn Store) {
    let lic = with_license(store, "boundary").await;
    assign_users(store, &lic, (0..200).map(user_name)).await;
    let mut current = lic;
    // Each change moves exactly the difference of the excess, no other seat.
    for (i, (quantity, moved)) in [
        (150, 50),
        (140, 10),
        (160, 20),
        (0, 160),
        (199, 199),
        (200, 1),
        (100, 100),
        (300, 100),
    ]
    .into_iter()
    .enumerate()
    {
        let next = license(&format!("boundary-{i}"), quantity);
        let changes = checked_capacity(store, &current, &next, quantity).await;
        assert_eq!(changes.len(), 1 + moved, "to {quantity}: {}", changes.len());
        current = next;
    }
}

async fn restored_and_repaired_flags_anywhere_are_set_right(
    store: &dyn Store,
    wipe: &(dyn Fn() + Send + Sync),
) {
    // Flags no reflag would set (scattered, as a restore or repair can bring
    // them): the next reflag still leads to exactly the newest excess.
    let lic = with_license(store, "scattered").await;
    let mut old = snapshot(store).await;
    wipe();
    let t = ms_now() - chrono::Duration::days(2);
    let since = t + chrono::Duration::hours(1);
    old.seats = (0..120)
        .map(|i| Seat {
            user_id: uid(&user_name(i)),
            feature: Feature::User,
            source: SeatSource::Purchased,
            // Ties in threes, broken by user id.
            assigned_at: t + chrono::Duration::minutes(i as i64 / 3),
            over_capacity_since: (i % 7 == 3 || i % 11 == 0).then_some(since),
        })
        .collect();
    assert!(store.restore(&old).await.unwrap());
    let mut current = lic;
    for (i, quantity) in [100, 100, 90, 119, 30].into_iter().enumerate() {
        let next = license(&format!("scattered-{i}"), quantity);
        checked_capacity(store, &current, &next, quantity).await;
        current = next;
    }

    // A repair adds seats, flagged and not, among the flagged ones, and removes
    // some; the release after it sets the flags right.
    let at = position(store).await;
    let repaired = |i: usize, minutes: i64, flagged: bool| Seat {
        user_id: uid(&format!("r{i:03}")),
        feature: Feature::User,
        source: SeatSource::Purchased,
        assigned_at: t + chrono::Duration::minutes(minutes),
        over_capacity_since: flagged.then_some(since),
    };
    let write = RepairWrite {
        expected: Some(at.clone()),
        version_floor: at.version + 3,
        add_seats: vec![
            repaired(1, 39, false),
            repaired(2, 20, true),
            repaired(3, 100, false),
            repaired(4, 1, true),
        ],
        remove_seats: vec![
            (Feature::User, uid(&user_name(119))),
            (Feature::User, uid(&user_name(100))),
        ],
        add_leases: Vec::new(),
        remove_leases: Vec::new(),
        license: None,
        tryout: None,
        reconcile: None,
        initialization: None,
        incident: Incident {
            at: ms_now(),
            ..Incident::default()
        },
    };
    store.repair(&write).await.unwrap().expect("repaired");
    checked_release(store, &user_name(50), 30).await;
    checked_release(store, "r003", 60).await;
    checked_release(store, &user_name(10), 110).await;
}

/// A small deterministic generator (xorshift), so a failure can be replayed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

async fn incremental_flags_match_the_domain_on_random_operations(
    store: &dyn Store,
    wipe: &(dyn Fn() + Send + Sync),
) {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut current = with_license(store, "random").await;
    let mut next_user = 0;
    let mut quantity = 40;
    for step in 0..400 {
        let users: Vec<String> = pool(&snapshot(store).await, Feature::User)
            .iter()
            .map(|s| s.user_id.as_str().to_owned())
            .collect();
        let pick = |rng: &mut Rng| users[rng.below(users.len())].clone();
        match rng.below(20) {
            // Assign (user ids in no particular order: ties go by id, not time).
            0..=7 => {
                let user = format!("{:x}-{next_user}", rng.next() % 4096);
                next_user += 1;
                let plan = AssignPlan::Purchased {
                    capacity: 100_000,
                    license_id: current.id().to_owned(),
                };
                created(assign(store, &user, Feature::User, &plan).await);
            }
            8..=11 if !users.is_empty() => {
                quantity = rng.below(users.len() + 5) as u32;
                checked_release(store, &pick(&mut rng), quantity).await;
            }
            12 if !users.is_empty() => {
                let user = pick(&mut rng);
                release(store, &user, Feature::User, None)
                    .await
                    .expect("held a seat");
            }
            13..=16 => {
                quantity = rng.below(users.len() + 5) as u32;
                let next = license(&format!("random-{step}"), quantity);
                checked_capacity(store, &current, &next, quantity).await;
                current = next;
            }
            17 => {
                // The same capacity again: nothing moves.
                let next = license(&format!("random-{step}"), quantity);
                checked_capacity(store, &current, &next, quantity).await;
                current = next;
            }
            18 if !users.is_empty() => {
                // Lost and restored with flags scattered at random.
                let mut old = snapshot(store).await;
                let since = ms_now() - chrono::Duration::hours(1);
                for seat in &mut old.seats {
                    seat.over_capacity_since = (rng.below(4) == 0).then_some(since);
                }
                wipe();
                assert!(store.restore(&old).await.unwrap());
            }
            _ => {}
        }
    }
    // Whatever came before, one last reflag lands on the newest excess.
    let last = license("random-last", 10);
    checked_capacity(store, &current, &last, 10).await;
}

/// The cases that write raw bytes into Redis.
mod raw_records {
    use super::*;

    redis_only! {
        corrupt_records_among_many_seats_count_but_are_never_flagged;
        a_store_without_order_sets_builds_them_once;
        a_write_that_did_not_keep_the_order_is_noticed;
    }

    // ---------------------------------------------------------------------------
    // Redis only: corrupt records, stores written before the order sets existed
    // ---------------------------------------------------------------------------

    const USER_POOL: &str = "seats:user:purchased";

    fn raw_key(subject: &Subject, name: &str) -> String {
        format!("lic:{{{}}}:{name}", subject.serial)
    }

    fn raw<T: redis::FromRedisValue>(subject: &Subject, cmd: &mut redis::Cmd) -> T {
        let mut conn = subject
            .redis
            .as_ref()
            .expect("a Redis subject")
            .connection();
        cmd.query(&mut conn).expect("a raw Redis command")
    }

    async fn corrupt_records_among_many_seats_count_but_are_never_flagged(subject: &Subject) {
        let store = &*subject.store;
        let lic = with_license(store, "corrupt-many").await;
        assign_users(store, &lic, (0..100).map(user_name)).await;
        // Unreadable records beside the seats (as by hand), and one readable seat
        // overwritten with garbage after it was placed in the order.
        for name in ["zz-garbage-1", "zz-garbage-2", "aa-garbage"] {
            raw::<i64>(
                subject,
                redis::cmd("HSET")
                    .arg(raw_key(subject, USER_POOL))
                    .arg(name)
                    .arg("garbage"),
            );
        }
        raw::<i64>(
            subject,
            redis::cmd("HSET")
                .arg(raw_key(subject, USER_POOL))
                .arg(user_name(99))
                .arg(r#"{"v":1}"#),
        );
        // 103 records for 90: the 13 newest readable seats are flagged (u0099, the
        // newest, is unreadable now: it counts, it is never flagged).
        let smaller = license("corrupt-many-2", 90);
        let changes = replace_license(store, &lic, &smaller, &[(Feature::User, 90)]).await;
        let want: BTreeSet<String> = (86..99).map(user_name).collect();
        let got: BTreeSet<String> = flagged_seats(&changes[1..])
            .iter()
            .map(|s| s.user_id.as_str().to_owned())
            .collect();
        assert_eq!(got, want);
        assert_eq!(flagged_set(&snapshot(store).await, Feature::User), want);

        // Releases: the freed slot goes to the oldest flag; corrupt records stay.
        let changes = release(store, &user_name(0), Feature::User, Some(90))
            .await
            .unwrap();
        assert_eq!(users_of(&flagged_seats(&changes[1..])), [user_name(86)]);
        let changes = release(store, &user_name(98), Feature::User, Some(90))
            .await
            .unwrap();
        assert_eq!(changes.len(), 1, "a flagged seat left: {changes:?}");
        let changes = release(store, &user_name(1), Feature::User, Some(50))
            .await
            .unwrap();
        // 100 records (4 unreadable) for 50: the 50 newest readable are flagged.
        let snap = snapshot(store).await;
        assert_eq!(flagged_set(&snap, Feature::User).len(), 50);
        assert_eq!(changes.len(), 1 + 50 - 11);
        let hlen: i64 = raw(subject, redis::cmd("HLEN").arg(raw_key(subject, USER_POOL)));
        assert_eq!(hlen, 100, "corrupt records are skipped, never removed");
    }

    async fn a_store_without_order_sets_builds_them_once(subject: &Subject) {
        let store = &*subject.store;
        let lic = with_license(store, "legacy").await;
        assign_users(store, &lic, (0..50).map(user_name)).await;
        let smaller = license("legacy-2", 40);
        checked_capacity(store, &lic, &smaller, 40).await;
        // As a store written before the order sets existed.
        raw::<i64>(
            subject,
            redis::cmd("DEL")
                .arg(raw_key(subject, "order:user"))
                .arg(raw_key(subject, "flagged:user"))
                .arg(raw_key(subject, "order_at")),
        );
        checked_release(store, &user_name(0), 40).await;
        checked_release(store, &user_name(45), 40).await;
        let order: i64 = raw(
            subject,
            redis::cmd("ZCARD").arg(raw_key(subject, "order:user")),
        );
        assert_eq!(order, 48);
        let at: String = raw(subject, redis::cmd("GET").arg(raw_key(subject, "order_at")));
        assert_eq!(at, position(store).await.version.to_string());
    }

    async fn a_write_that_did_not_keep_the_order_is_noticed(subject: &Subject) {
        let store = &*subject.store;
        let lic = with_license(store, "older").await;
        assign_users(store, &lic, (0..30).map(user_name)).await;
        // An older replica assigns a seat: the hash and the feed, no order set.
        let record = format!(
            r#"{{"v":1,"source":"purchased","assigned_at_ms":{}}}"#,
            Utc::now().timestamp_millis() + 60_000
        );
        let v: u64 = raw(subject, redis::cmd("INCR").arg(raw_key(subject, "version")));
        raw::<i64>(
            subject,
            redis::cmd("HSET")
                .arg(raw_key(subject, USER_POOL))
                .arg("newest")
                .arg(&record),
        );
        raw::<String>(
            subject,
            redis::cmd("XADD")
                .arg(raw_key(subject, "changes"))
                .arg(format!("{v}-0"))
                .arg("k")
                .arg("seat")
                .arg("f")
                .arg("user")
                .arg("u")
                .arg("newest")
                .arg("d")
                .arg(&record),
        );
        // The next reflag knows that seat: it is the newest, flagged first.
        let smaller = license("older-2", 29);
        let changes = checked_capacity(store, &lic, &smaller, 29).await;
        assert_eq!(users_of(&flagged_seats(&changes[1..])), ["newest", "u0029"]);
    }
}
