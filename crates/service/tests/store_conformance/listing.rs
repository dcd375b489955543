//! Listing seats: ordered by feature and user id, filtered, paged without gaps or
//! repeats.

use super::*;

conformance! {
    store: list_seats_is_ordered_and_filtered;
    store: list_seats_pages_visit_every_seat_once;
    store: list_seats_filter_holds_with_an_after_key_of_another_feature;
}

// ---------------------------------------------------------------------------
// list_seats
// ---------------------------------------------------------------------------

/// User ids that sort differently by bytes, chars or case, with punctuation
/// (including what Redis lex ranges treat specially) and non-ASCII text.
fn odd_user_ids() -> Vec<String> {
    let mut ids: Vec<String> = [
        "a",
        "a b",
        "a.b",
        "a-b",
        "ab",
        "A",
        "Zoe",
        "zoe",
        "zoë",
        "Zoë",
        "émile",
        "ä",
        "anna.müller@example.com",
        "o'brien",
        "\"quoted\"",
        "back\\slash",
        "(paren",
        "[bracket",
        "-",
        "+",
        "%s%d",
        "{brace}",
        "日本語",
        "😀",
        "\u{ff}",
        "\u{100}",
        "user:1",
        "user\u{2028}sep",
        "tab-less",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect();
    ids.push("ä".repeat(64)); // 128 bytes, the longest accepted id
    ids.push("x".repeat(128));
    ids
}

/// Seats of both features and both sources, returned in the expected order.
async fn fill_for_listing(store: &dyn Store) -> Vec<(Feature, String)> {
    let lic = with_license(store, "listing").await;
    let plan = purchased(&lic, 1000);
    let ids = odd_user_ids();
    let mut expected = BTreeSet::new();
    for (i, id) in ids.iter().enumerate() {
        // Every user gets a user seat (some from the tryout pool), every
        // third one a call_assist seat too.
        let user_plan = if i % 4 == 1 {
            tryout(1000)
        } else {
            plan.clone()
        };
        created(assign(store, id, Feature::User, &user_plan).await);
        expected.insert((Feature::User, id.clone()));
        if i % 3 == 0 {
            created(assign(store, id, Feature::CallAssist, &plan).await);
            expected.insert((Feature::CallAssist, id.clone()));
        }
    }
    expected.into_iter().collect()
}

async fn list_seats_is_ordered_and_filtered(store: &dyn Store) {
    assert!(store.list_seats(None, None, 10).await.unwrap().is_empty());
    let expected = fill_for_listing(store).await;
    assert!(Feature::CallAssist < Feature::User);

    let all = store.list_seats(None, None, 10_000).await.unwrap();
    assert_eq!(keys_of(&all), expected);
    assert_eq!(all, snapshot(store).await.seats);

    for feature in Feature::SEATS {
        let listed = store.list_seats(Some(feature), None, 10_000).await.unwrap();
        let want: Vec<_> = expected
            .iter()
            .filter(|(f, _)| *f == feature)
            .cloned()
            .collect();
        assert!(!want.is_empty());
        assert_eq!(keys_of(&listed), want, "filter {feature}");
    }

    // The limit, and zero.
    let first = store.list_seats(None, None, 3).await.unwrap();
    assert_eq!(keys_of(&first), expected[..3].to_vec());
    assert!(store.list_seats(None, None, 0).await.unwrap().is_empty());

    // `after` need not be a held seat: listing resumes strictly after it.
    let after = SeatKey {
        feature: Feature::User,
        user_id: uid("b"),
    };
    let listed = store.list_seats(None, Some(&after), 10_000).await.unwrap();
    let want: Vec<_> = expected
        .iter()
        .filter(|(f, u)| (*f, u.as_str()) > (Feature::User, "b"))
        .cloned()
        .collect();
    assert_eq!(keys_of(&listed), want);
    // After the very last seat: nothing.
    let (f, u) = expected.last().unwrap();
    let last = SeatKey {
        feature: *f,
        user_id: uid(u),
    };
    assert!(
        store
            .list_seats(None, Some(&last), 10)
            .await
            .unwrap()
            .is_empty()
    );
}

async fn list_seats_pages_visit_every_seat_once(store: &dyn Store) {
    let expected = fill_for_listing(store).await;
    for filter in [None, Some(Feature::CallAssist), Some(Feature::User)] {
        let want: Vec<_> = expected
            .iter()
            .filter(|(f, _)| filter.is_none_or(|x| x == *f))
            .cloned()
            .collect();
        for size in [1, 2, 7] {
            let mut seen = Vec::new();
            let mut after: Option<SeatKey> = None;
            for _ in 0..=want.len() + 1 {
                let page = store
                    .list_seats(filter, after.as_ref(), size)
                    .await
                    .unwrap();
                // Full pages while seats remain: callers detect the last page
                // by a short one.
                assert_eq!(
                    page.len(),
                    size.min(want.len() - seen.len()),
                    "filter {filter:?}, page size {size}, after {after:?}"
                );
                let Some(last) = page.last() else { break };
                after = Some(SeatKey {
                    feature: last.feature,
                    user_id: last.user_id.clone(),
                });
                seen.extend(keys_of(&page));
            }
            assert_eq!(seen, want, "filter {filter:?}, page size {size}");
        }
    }
}

async fn list_seats_filter_holds_with_an_after_key_of_another_feature(store: &dyn Store) {
    let lic = with_license(store, "cross").await;
    let plan = purchased(&lic, 10);
    for user in ["a", "b", "c"] {
        created(assign(store, user, Feature::CallAssist, &plan).await);
        created(assign(store, user, Feature::User, &plan).await);
    }
    // Resuming a user-seat listing after a call_assist key lists only user seats.
    let after = SeatKey {
        feature: Feature::CallAssist,
        user_id: uid("a"),
    };
    let listed = store
        .list_seats(Some(Feature::User), Some(&after), 10)
        .await
        .unwrap();
    assert_eq!(
        keys_of(&listed),
        vec![
            (Feature::User, "a".to_owned()),
            (Feature::User, "b".to_owned()),
            (Feature::User, "c".to_owned()),
        ]
    );
    // After a key beyond every call_assist seat: no call_assist seats.
    let after = SeatKey {
        feature: Feature::User,
        user_id: uid("a"),
    };
    assert!(
        store
            .list_seats(Some(Feature::CallAssist), Some(&after), 10)
            .await
            .unwrap()
            .is_empty()
    );
}
