//! The audit trail: newest first in pages, bounded by count and age, refusals never
//! displacing changes.

use super::*;

conformance! {
    store: audit_lists_newest_first_in_pages;
    store: audit_is_bounded_by_max_entries;
    store: audit_refusals_never_displace_changes;
    store: audit_drops_entries_older_than_max_age;
    store: audit_batch_is_stored_as_one_by_one;
    store: audit_batches_keep_ids_unique_and_bounds;
}

// ---------------------------------------------------------------------------
// Audit trail
// ---------------------------------------------------------------------------

fn audit_event(n: usize) -> AuditEvent {
    AuditEvent {
        time: Utc::now(),
        caller: "ops".into(),
        role: "operator".into(),
        method: "AssignSeat".into(),
        user_id: format!("user-{n}"),
        feature: "user".into(),
        code: if n.is_multiple_of(2) {
            "OK"
        } else {
            "PERMISSION_DENIED"
        }
        .into(),
        detail: format!("detail {n} ✓"),
        trace_id: "4bf92f3577b34da6a3ce929d0e0e4736".into(),
    }
}

async fn audit_users(store: &dyn Store, before: Option<&str>, limit: usize) -> Vec<String> {
    store
        .list_audit(before, limit)
        .await
        .expect("list the audit trail")
        .into_iter()
        .map(|e| e.event.user_id)
        .collect()
}

async fn audit_lists_newest_first_in_pages(store: &dyn Store) {
    assert!(store.list_audit(None, 10).await.unwrap().is_empty());
    let retention = AuditRetention::default();
    for n in 0..7 {
        store
            .append_audit(&audit_event(n), &retention)
            .await
            .unwrap();
    }
    let first = store.list_audit(None, 3).await.unwrap();
    assert_eq!(first.len(), 3);
    // Every field round-trips.
    let mut expected = audit_event(6);
    expected.time = first[0].event.time;
    assert_eq!(first[0].event, expected);
    let names: Vec<&str> = first.iter().map(|e| e.event.user_id.as_str()).collect();
    assert_eq!(names, ["user-6", "user-5", "user-4"]);
    let rest = audit_users(store, Some(&first[2].id), 10).await;
    assert_eq!(rest, ["user-3", "user-2", "user-1", "user-0"]);
    assert!(audit_users(store, Some("0-0"), 10).await.is_empty());
}

async fn audit_is_bounded_by_max_entries(store: &dyn Store) {
    let retention = AuditRetention {
        max_entries: 5,
        ..AuditRetention::default()
    };
    // Accepted changes only (even numbers): the newest max_entries are kept.
    for n in (0..24).step_by(2) {
        store
            .append_audit(&audit_event(n), &retention)
            .await
            .unwrap();
    }
    let kept = audit_users(store, None, 100).await;
    assert_eq!(
        kept,
        ["user-22", "user-20", "user-18", "user-16", "user-14"],
        "the newest max_entries are kept"
    );
}

/// Refusals (odd numbers) are bounded apart from the changes: however many
/// come, the changes stay; the listing merges both, newest first, and pages
/// visit every entry once.
async fn audit_refusals_never_displace_changes(store: &dyn Store) {
    let retention = AuditRetention {
        max_entries: 3,
        max_refusals: 4,
        ..AuditRetention::default()
    };
    for n in [0, 1, 2, 4] {
        store
            .append_audit(&audit_event(n), &retention)
            .await
            .unwrap();
    }
    for n in (5..200).step_by(2) {
        store
            .append_audit(&audit_event(n), &retention)
            .await
            .unwrap();
    }
    store
        .append_audit(&audit_event(200), &retention)
        .await
        .unwrap();
    let expected = [
        "user-200", "user-199", "user-197", "user-195", "user-193", "user-4", "user-2",
    ];
    assert_eq!(audit_users(store, None, 100).await, expected);
    let mut paged = Vec::new();
    let mut before: Option<String> = None;
    loop {
        let page = store.list_audit(before.as_deref(), 2).await.unwrap();
        let Some(last) = page.last() else { break };
        before = Some(last.id.clone());
        paged.extend(page.into_iter().map(|e| e.event.user_id));
    }
    assert_eq!(paged, expected, "pages of 2 visit every entry once");
}

async fn audit_drops_entries_older_than_max_age(store: &dyn Store) {
    let retention = AuditRetention::default();
    store
        .append_audit(&audit_event(0), &retention)
        .await
        .unwrap();
    // Not synchronisation: the entry must be older than the age bound below.
    tokio::time::sleep(Duration::from_millis(60)).await;
    let short = AuditRetention {
        max_age: chrono::Duration::milliseconds(30),
        ..AuditRetention::default()
    };
    store.append_audit(&audit_event(1), &short).await.unwrap();
    assert_eq!(audit_users(store, None, 10).await, ["user-1"]);
}

/// A batch lands as the same entries appended one by one would: in order,
/// ids growing across both lists, every field kept; an empty batch is nothing.
async fn audit_batch_is_stored_as_one_by_one(store: &dyn Store) {
    let retention = AuditRetention::default();
    store.append_audit_batch(&[], &retention).await.unwrap();
    assert!(store.list_audit(None, 10).await.unwrap().is_empty());
    store
        .append_audit(&audit_event(0), &retention)
        .await
        .unwrap();
    let batch: Vec<AuditEvent> = (1..=600).map(audit_event).collect();
    store.append_audit_batch(&batch, &retention).await.unwrap();
    store
        .append_audit(&audit_event(601), &retention)
        .await
        .unwrap();
    let all = store.list_audit(None, 1000).await.unwrap();
    let users: Vec<String> = all.iter().map(|e| e.event.user_id.clone()).collect();
    let want: Vec<String> = (0..=601).rev().map(|n| format!("user-{n}")).collect();
    assert_eq!(users, want, "newest first, the batch in its order");
    let ids: Vec<(u64, u64)> = all
        .iter()
        .map(|e| comtrexx_licensing::domain::audit::parse_entry_id(&e.id).expect("an entry id"))
        .collect();
    assert!(
        ids.windows(2).all(|w| w[0] > w[1]),
        "ids are unique and ordered across both lists"
    );
    let mut expected = audit_event(300);
    expected.time = all[301].event.time;
    assert_eq!(all[301].event, expected, "every field round-trips");
}

/// Each list keeps its own bound within a batch too: refusals never push a
/// change out, and the age bound applies.
async fn audit_batches_keep_ids_unique_and_bounds(store: &dyn Store) {
    let retention = AuditRetention {
        max_entries: 3,
        max_refusals: 4,
        ..AuditRetention::default()
    };
    let first: Vec<AuditEvent> = [0, 1, 2, 4].into_iter().map(audit_event).collect();
    store.append_audit_batch(&first, &retention).await.unwrap();
    let flood: Vec<AuditEvent> = (5..200).step_by(2).map(audit_event).collect();
    store.append_audit_batch(&flood, &retention).await.unwrap();
    store
        .append_audit_batch(&[audit_event(200)], &retention)
        .await
        .unwrap();
    assert_eq!(
        audit_users(store, None, 100).await,
        [
            "user-200", "user-199", "user-197", "user-195", "user-193", "user-4", "user-2",
        ]
    );
    // Not synchronisation: the entries must be older than the age bound below.
    tokio::time::sleep(Duration::from_millis(60)).await;
    let short = AuditRetention {
        max_age: chrono::Duration::milliseconds(30),
        ..retention
    };
    store
        .append_audit_batch(&[audit_event(202), audit_event(203)], &short)
        .await
        .unwrap();
    assert_eq!(audit_users(store, None, 10).await, ["user-203", "user-202"]);
}
