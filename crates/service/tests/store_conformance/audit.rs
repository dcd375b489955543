//! The audit trail: newest first in pages, bounded by count and age, refusals never
//! displacing changes.

use super::*;

conformance! {
    store: audit_lists_newest_first_in_pages;
    store: audit_is_bounded_by_max_entries;
    store: audit_refusals_never_displace_changes;
    store: audit_drops_entries_older_than_max_age;
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
