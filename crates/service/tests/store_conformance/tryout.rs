//! The tryout record, written only by compare-and-set.

use super::*;

conformance! {
    store: compare_and_set_tryout;
}

// ---------------------------------------------------------------------------
// compare_and_set_tryout
// ---------------------------------------------------------------------------

async fn compare_and_set_tryout(store: &dyn Store) {
    assert_eq!(snapshot(store).await.tryout, None);
    let before = position(store).await;
    let started = started_tryout();

    let change = store
        .compare_and_set_tryout(None, None, &started)
        .await
        .unwrap()
        .expect("from no record");
    assert_eq!(change.version, before.version + 1);
    assert_eq!(change.kind, ChangeKind::TryoutChanged(started.clone()));
    let snap = snapshot(store).await;
    assert_eq!(snap.tryout.as_ref(), Some(&started));

    // Stale expectations change nothing.
    let other = TryoutRecord::Forfeited { at: Utc::now() };
    assert_eq!(
        store
            .compare_and_set_tryout(None, None, &other)
            .await
            .unwrap(),
        None
    );
    assert_eq!(
        store
            .compare_and_set_tryout(None, Some(&other), &other)
            .await
            .unwrap(),
        None
    );
    assert_eq!(
        store
            .compare_and_set_tryout(None, Some(&ended(&started)), &other)
            .await
            .unwrap(),
        None
    );
    assert_eq!(snapshot(store).await, snap);

    // The record as read back is a valid expectation.
    let read_back = snap.tryout.unwrap();
    let done = ended(&read_back);
    let change = store
        .compare_and_set_tryout(None, Some(&read_back), &done)
        .await
        .unwrap()
        .expect("the current record matches");
    assert_eq!(change.version, before.version + 2);
    assert_eq!(change.kind, ChangeKind::TryoutChanged(done.clone()));
    assert_eq!(snapshot(store).await.tryout, Some(done.clone()));
    // The old record no longer matches.
    assert_eq!(
        store
            .compare_and_set_tryout(None, Some(&started), &other)
            .await
            .unwrap(),
        None
    );
    assert_eq!(snapshot(store).await.tryout, Some(done));
}
