//! A release costs the same in a pool of any size: its script touches the seats
//! whose flag moves, never the whole pool. Measured within one run on a private
//! redis-server, by Redis's own accounting (`INFO commandstats`): the script
//! time per release and the commands it runs, for a pool of 1 000 and one of
//! 50 000 purchased seats, each with over-capacity flags to move on every
//! release. No absolute time is asserted, only the ratio.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use chrono::Utc;
use comtrexx_licensing::domain::{
    Edition, Entitlement, Feature, LicensePayload, SerialNumber, SignedLicense, UserId,
};
use comtrexx_licensing::store::redis::RedisStore;
use comtrexx_licensing::store::{LicenseWrite, ReleaseOutcome, Snapshot, Store, StoredLicense};
use comtrexx_licensing_test_support::RedisServer;
use ed25519_dalek::SigningKey;

fn license(tag: &str, users: u32) -> StoredLicense {
    let payload = LicensePayload {
        serial_number: "T-flat".to_owned(),
        edition: Edition::Vm,
        issued_at: Utc::now(),
        entitlements: vec![Entitlement {
            seat_model: Default::default(),
            feature: Feature::User,
            quantity: users,
            expires_at: None,
        }],
        nonce: Some(tag.to_owned()),
    };
    StoredLicense {
        signed: SignedLicense::sign(&payload, &SigningKey::from_bytes(&[7; 32])),
        applied_at: Utc::now(),
    }
}

fn user(i: usize) -> String {
    format!("user-{i:019}")
}

/// Redis's command statistics: command → (calls, usec).
fn commandstats(conn: &mut redis::Connection) -> HashMap<String, (u64, u64)> {
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query(conn)
        .expect("INFO commandstats");
    let mut stats = HashMap::new();
    for line in info.lines() {
        let Some((name, rest)) = line
            .strip_prefix("cmdstat_")
            .and_then(|l| l.split_once(':'))
        else {
            continue;
        };
        let field = |key: &str| -> u64 {
            rest.split(',')
                .find_map(|kv| kv.strip_prefix(key))
                .and_then(|v| v.parse().ok())
                .unwrap_or(0)
        };
        stats.insert(name.to_owned(), (field("calls="), field("usec=")));
    }
    stats
}

/// What `releases` releases cost Redis in a pool of `size` seats.
struct Cost {
    /// Microseconds of script time per release.
    script_usec: f64,
    /// Commands run inside the script per release.
    commands: f64,
    /// Hash fields read whole (`HGETALL`) during the releases.
    hgetall_calls: u64,
    /// Wall-clock per release, seen by the client (for the log only).
    client_ms: f64,
}

async fn measure(server: &RedisServer, size: usize, releases: usize) -> Cost {
    let serial = comtrexx_licensing_test_support::serial(&format!("flat{size}"));
    let store = RedisStore::new(
        &server.url(),
        &SerialNumber::parse(&serial).unwrap(),
        Duration::from_secs(5),
    )
    .unwrap();
    assert!(store.restore(&Snapshot::default()).await.unwrap());
    let lic = license("flat", size as u32);
    store
        .apply_license(
            None,
            LicenseWrite {
                expected_id: None,
                license: &lic,
                tryout: None,
                capacities: &[],
                consume_initialization: None,
                fence: None,
            },
        )
        .await
        .unwrap()
        .unwrap();

    // The pool written directly (as a store from before the order sets: they
    // are built once, by the first reflag below).
    let mut conn = server.connection();
    let key = |name: &str| format!("lic:{{{serial}}}:{name}");
    let t0 = Utc::now().timestamp_millis() - 86_400_000;
    for chunk in (0..size).collect::<Vec<_>>().chunks(1000) {
        let mut pipe = redis::pipe();
        for &i in chunk {
            let record = format!(
                r#"{{"v":1,"source":"purchased","assigned_at_ms":{}}}"#,
                t0 + i as i64
            );
            pipe.cmd("HSET")
                .arg(key("seats:user:purchased"))
                .arg(user(i))
                .arg(record)
                .ignore();
            pipe.cmd("ZADD")
                .arg(key("seat_index"))
                .arg(0)
                .arg(format!("user\0{}", user(i)))
                .ignore();
        }
        pipe.query::<()>(&mut conn).unwrap();
    }
    let _: i64 = redis::cmd("DEL")
        .arg(key("order_at"))
        .query(&mut conn)
        .unwrap();

    // More over capacity than releases: each release of an old seat clears
    // the oldest flag.
    let quantity = (size - releases - 50) as u32;
    let smaller = license("flat-2", quantity);
    store
        .apply_license(
            None,
            LicenseWrite {
                expected_id: Some(lic.id()),
                license: &smaller,
                tryout: None,
                capacities: &[(Feature::User, quantity)],
                consume_initialization: None,
                fence: None,
            },
        )
        .await
        .unwrap()
        .unwrap();
    let release = async |i: usize| {
        let changes = store
            .release_seat(
                None,
                &UserId::parse(&user(i)).unwrap(),
                Feature::User,
                Some((quantity, smaller.id())),
            )
            .await
            .unwrap();
        let ReleaseOutcome::Released(changes) = changes else {
            panic!("the seat was held");
        };
        assert_eq!(changes.len(), 2, "the release and one flag cleared");
    };
    // Warm-up (the script is loaded), then counted.
    release(0).await;
    let before = commandstats(&mut conn);
    let started = Instant::now();
    for i in 1..=releases {
        release(i).await;
    }
    let elapsed = started.elapsed();
    let after = commandstats(&mut conn);
    let delta = |name: &str| {
        let (c0, u0) = before.get(name).copied().unwrap_or_default();
        let (c1, u1) = after.get(name).copied().unwrap_or_default();
        (c1 - c0, u1 - u0)
    };
    let (eval_calls, eval_usec) = {
        let (a, b) = delta("evalsha");
        let (c, d) = delta("eval");
        (a + c, b + d)
    };
    let scripts = ["evalsha", "eval", "info"];
    let commands: u64 = after
        .keys()
        .filter(|name| !scripts.contains(&name.as_str()))
        .map(|name| delta(name).0)
        .sum();
    assert!(eval_calls >= releases as u64, "every release is one script");
    Cost {
        script_usec: eval_usec as f64 / releases as f64,
        commands: commands as f64 / releases as f64,
        hgetall_calls: delta("hgetall").0,
        client_ms: elapsed.as_secs_f64() * 1000.0 / releases as f64,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn release_cost_is_flat_in_the_pool_size() {
    let server = RedisServer::start();
    let small = measure(&server, 1_000, 200).await;
    let large = measure(&server, 50_000, 200).await;
    for (size, c) in [(1_000, &small), (50_000, &large)] {
        eprintln!(
            "pool {size:>6}: {:8.1} µs script time, {:5.1} commands, {:6.2} ms client time per release; {} HGETALL",
            c.script_usec, c.commands, c.client_ms, c.hgetall_calls
        );
    }
    assert_eq!(large.hgetall_calls, 0, "no release reads a whole pool");
    let time_ratio = large.script_usec / small.script_usec;
    let command_ratio = large.commands / small.commands;
    assert!(
        time_ratio < 5.0,
        "a release in a pool of 50 000 takes {time_ratio:.1}× the time of one in 1 000"
    );
    assert!(
        command_ratio < 2.0,
        "a release in a pool of 50 000 runs {command_ratio:.1}× the commands of one in 1 000"
    );
}
