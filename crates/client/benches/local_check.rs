//! The client library's own costs, without a server: `cargo bench -p
//! comtrexx-licensing-client --bench local_check [-- SEATS...]` (default 100000).
//!
//! For each size: a copy of that many purchased seats (ids of 24 bytes) is
//! written as a cache file, a client is started from it (its endpoint does not
//! answer: the copy comes from the file), then:
//!
//! - start-up from the cache file until the first answer;
//! - the client's memory per seat (bytes the allocator holds for the copy);
//! - `check_seat` latency: each call timed alone (p50, p99, p99.9; includes
//!   about 20 ns of the clock read), and the mean over a million calls;
//! - allocations per `check_seat` call (a counting allocator).
//!
//! Results in BENCHMARKS.md ("The client library").

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use comtrexx_licensing_client::{Client, Config, Decision, Feature};
use comtrexx_licensing_domain::license::testing::{key, payload};
use comtrexx_licensing_domain::{
    AppliedLicense, Edition, LapseAction, ReconcileStatus, Rules, SeatSource, SignedLicense,
    TryoutPolicy,
};
use comtrexx_licensing_proto::pb;
use comtrexx_licensing_proto::seat_state as wire;
use comtrexx_licensing_proto::timestamp;

struct Counting;

static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);
static LIVE_BYTES: AtomicI64 = AtomicI64::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        LIVE_BYTES.fetch_add(layout.size() as i64, Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE_BYTES.fetch_sub(layout.size() as i64, Ordering::Relaxed);
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        LIVE_BYTES.fetch_add(new_size as i64 - layout.size() as i64, Ordering::Relaxed);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn user(i: usize) -> String {
    format!("user-{i:019}")
}

/// A cache file body: a VM PBX licensed for `n` users, holding `n` seats.
fn snapshot(n: usize) -> pb::WatchSeatsResponse {
    let now = chrono::Utc::now();
    let p = payload("SN-BENCH", n as u32);
    let applied = AppliedLicense {
        signed: SignedLicense::sign(&p, &key(1)),
        payload: p,
        applied_at: now,
    };
    let rules = Rules {
        edition: Edition::Vm,
        tryout: TryoutPolicy::default(),
        over_capacity_grace: chrono::Duration::days(7),
        grace: chrono::Duration::days(30),
        lapse_action: LapseAction::DenyNew,
        has_license_source: false,
    };
    let at = now.timestamp_millis();
    pb::WatchSeatsResponse {
        version: 1,
        kind: Some(pb::watch_seats_response::Kind::Snapshot(
            pb::SeatStateSnapshot {
                serial_number: "SN-BENCH".into(),
                rules: Some(wire::rules(&rules)),
                seats: (0..n)
                    .map(|i| {
                        wire::compact_seat(
                            Feature::User,
                            &user(i),
                            comtrexx_licensing_domain::CompactSeat::new(
                                SeatSource::Purchased,
                                at,
                                None,
                            ),
                        )
                    })
                    .collect(),
                license: Some(wire::license(&applied)),
                tryout: None,
                reconcile: Some(wire::reconcile(&ReconcileStatus::default())),
                activation_state: pb::ActivationState::Active.into(),
                grace_ends_at: None,
                reference_time: Some(timestamp(now)),
                epoch: "bench".into(),
                leases: Vec::new(),
            },
        )),
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn run(n: usize, runtime: &tokio::runtime::Runtime) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("seats.cache");
    write_cache(&path, n);
    let _guard = runtime.enter();
    let before = LIVE_BYTES.load(Ordering::Relaxed);
    let started = Instant::now();
    let client = Client::start(Config {
        // Nothing listens there: the copy comes from the cache file only.
        endpoints: vec!["http://127.0.0.1:9".into()],
        cache_file: Some(path),
        backoff_min: Duration::from_secs(60),
        backoff_max: Duration::from_secs(60),
        ..Config::default()
    })
    .unwrap();
    let first = client.check_seat(&user(n - 1), Feature::User);
    let startup = started.elapsed();
    assert!(
        matches!(first, Decision::Known(a) if a.licensed),
        "{first:?}"
    );
    let held = LIVE_BYTES.load(Ordering::Relaxed) - before;

    let users: Vec<String> = (0..4096).map(|i| user((i * 7919) % n)).collect();
    // Warm up.
    for u in &users {
        std::hint::black_box(client.check_seat(u, Feature::User));
    }
    let mut samples = Vec::with_capacity(200_000);
    for i in 0..200_000 {
        let u = &users[i % users.len()];
        let t = Instant::now();
        std::hint::black_box(client.check_seat(u, Feature::User));
        samples.push(t.elapsed());
    }
    samples.sort_unstable();
    let calls = 1_000_000;
    let allocations = ALLOCATIONS.load(Ordering::Relaxed);
    let t = Instant::now();
    for i in 0..calls {
        std::hint::black_box(client.check_seat(&users[i % users.len()], Feature::User));
    }
    let mean = t.elapsed() / calls as u32;
    let per_call = (ALLOCATIONS.load(Ordering::Relaxed) - allocations) as f64 / calls as f64;
    println!(
        "{n:>9} seats | start-up from cache file {:>7.1} ms | copy {:>5.0} B/seat | check_seat p50 {:>4} ns, p99 {:>5} ns, p99.9 {:>5} ns, mean {:>4} ns | allocations/call {per_call:.3}",
        startup.as_secs_f64() * 1e3,
        held as f64 / n as f64,
        percentile(&samples, 0.50).as_nanos(),
        percentile(&samples, 0.99).as_nanos(),
        percentile(&samples, 0.999).as_nanos(),
        mean.as_nanos(),
    );
    drop(client);
}

fn write_cache(path: &std::path::Path, n: usize) {
    // The cache module is private: write the documented format here.
    use prost::Message as _;
    let body = snapshot(n).encode_to_vec();
    let mut data = format!(
        "comtrexx-licensing-client-cache 1\nfeatures *\nbody {} {:08x}\n",
        body.len(),
        crc32fast::hash(&body)
    )
    .into_bytes();
    data.extend_from_slice(&body);
    std::fs::write(path, data).unwrap();
}

fn main() {
    let sizes: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let sizes = if sizes.is_empty() {
        vec![100_000]
    } else {
        sizes
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    for n in sizes {
        run(n, &runtime);
    }
}
