//! What a pool's size costs: `cargo bench --bench scale [-- SIZES...]` (default
//! 10000 100000 1000000 seats, ids of 24 bytes). For each size, on its own
//! `redis-server` and one replica of the service (in this process), prints:
//!
//! - start-up until `CheckSeat` answers correctly for the last seeded user;
//! - the replica's memory per seat, steady and at the peak of a full resync;
//! - `AssignSeat`, `ReleaseSeat` and `CheckSeat` latency over gRPC;
//! - Redis's own time per call in each phase (`SLOWLOG`, every call logged):
//!   median, 99th percentile, the longest and how many took over 10 ms;
//! - idle cost: bytes Redis sends and CPU the replica uses per minute, no changes;
//! - audit entries written per accepted change.
//!
//! Results in BENCHMARKS.md ("Scale"). Needs `redis-server` on PATH.

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use chrono::Utc;
use common::*;
use comtrexx_licensing::domain::{Edition, Feature};
use comtrexx_licensing::grpc::pb;

/// Calls measured per kind.
const CALLS: usize = 300;

fn proc_field(file: &str, field: &str) -> u64 {
    std::fs::read_to_string(file)
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// Resident set and its peak since the last `reset_peak` (bytes).
fn rss() -> u64 {
    proc_field("/proc/self/status", "VmRSS:") * 1024
}
fn peak() -> u64 {
    proc_field("/proc/self/status", "VmHWM:") * 1024
}
fn reset_peak() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// CPU time this process used (s).
fn cpu_seconds() -> f64 {
    cpu_seconds_of("self")
}

/// CPU time process `pid` used (s): user and system time of /proc/PID/stat.
fn cpu_seconds_of(pid: &str) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // utime and stime are fields 14 and 15 of the line; 12 and 13 after ')'.
    (ticks(11) + ticks(12)) / 100.0
}

/// Logs every Redis call from now on (`SLOWLOG` with no threshold), the log
/// emptied.
fn log_every_call(redis: &RedisServer) {
    log_calls_over(redis, 0);
}

/// Logs every Redis call that takes longer than `micros` from now on, the log
/// emptied (a long build's every call would not fit the log).
fn log_calls_over(redis: &RedisServer, micros: u64) {
    let mut conn = redis.connection();
    for (name, value) in [
        ("slowlog-log-slower-than", micros),
        ("slowlog-max-len", 1_000_000),
    ] {
        let _: () = redis::cmd("CONFIG")
            .arg("SET")
            .arg(name)
            .arg(value)
            .query(&mut conn)
            .unwrap();
    }
    let _: () = redis::cmd("SLOWLOG").arg("RESET").query(&mut conn).unwrap();
}

/// Runs Redis at a higher priority than everything else here (`renice -10`):
/// the bench, its replica and Redis share two cores, and the slow log times a
/// call by the wall clock, so a Redis preempted mid-call would show the
/// host's scheduling, not Redis's work.
fn favour(redis: &RedisServer) {
    let server: String = redis::cmd("INFO")
        .arg("server")
        .query(&mut redis.connection())
        .unwrap();
    let pid = server
        .lines()
        .find_map(|l| l.strip_prefix("process_id:"))
        .expect("INFO server names the process")
        .trim()
        .to_owned();
    let reniced = std::process::Command::new("renice")
        .args(["-n", "-10", "-p", &pid])
        .stdout(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !reniced {
        println!(
            "  (Redis could not be given a higher priority: its times include the host's scheduling)"
        );
    }
}

/// The commands a client sends itself; the others in the slow log are the
/// commands a script ran (Redis logs them too), counted in their script's time.
const TOP_LEVEL: [&str; 9] = [
    "evalsha",
    "eval",
    "evalsha_ro",
    "eval_ro",
    "hscan",
    "xread",
    "xrange",
    "exec",
    "script",
];

/// The calls in the slow log since [`log_every_call`], which empties it again:
/// how many the service sent, their median, 99th percentile and longest (with
/// its command), and how many took over 10 ms. Times are Redis's own (the command's execution,
/// wall clock).
fn redis_calls(redis: &RedisServer) -> String {
    let mut conn = redis.connection();
    let entries: Vec<redis::Value> = redis::cmd("SLOWLOG")
        .arg("GET")
        .arg(-1)
        .query(&mut conn)
        .unwrap();
    let _: () = redis::cmd("SLOWLOG").arg("RESET").query(&mut conn).unwrap();
    let mut took_all = Vec::new();
    let mut longest = (0, String::new());
    for entry in entries {
        let redis::Value::Array(fields) = entry else {
            continue;
        };
        let took: u64 = redis::from_redis_value_ref(&fields[2]).unwrap_or(0);
        let args: Vec<String> = redis::from_redis_value_ref(&fields[3]).unwrap_or_default();
        // The bench's own calls are not the service's.
        let command = args.first().map(|c| c.to_lowercase()).unwrap_or_default();
        if ["slowlog", "config", "info", "get", "mget", "xlen", "del"].contains(&command.as_str()) {
            continue;
        }
        if TOP_LEVEL.contains(&command.as_str()) {
            took_all.push(took);
        }
        if took > longest.0 {
            // A script by the first key it touches beyond the prelude's (its
            // fifth for write scripts; the first otherwise).
            let what = match command.as_str() {
                "evalsha" | "eval" => format!(
                    "{command} {} keys, {}",
                    args.get(2).cloned().unwrap_or_default(),
                    args.get(7).or(args.get(3)).cloned().unwrap_or_default()
                ),
                _ => command.clone(),
            };
            longest = (took, what);
        }
    }
    took_all.sort_unstable();
    let at = |q: f64| {
        took_all
            .get(((took_all.len() as f64 - 1.0) * q).round() as usize)
            .copied()
            .unwrap_or(0)
    };
    format!(
        "{} calls, p50 {} µs, p99 {} µs, longest {} µs ({}), over 10 ms: {}",
        took_all.len(),
        at(0.5),
        at(0.99),
        longest.0,
        longest.1,
        took_all.iter().filter(|t| **t > 10_000).count()
    )
}

async fn measure(size: usize) {
    println!("== {size} seats");
    let redis = RedisServer::start();
    favour(&redis);
    let vendor = Vendor::new();
    let serial = serial(&format!("scale-{size}"));
    vendor.write_license(
        &serial,
        Edition::Vm,
        Utc::now() - chrono::Duration::hours(2),
        &[(Feature::User, u32::try_from(size * 2).unwrap())],
    );
    let t = Instant::now();
    seed_seats(&redis, &serial, size).await;
    println!("  seeded in {:.1} s", t.elapsed().as_secs_f64());

    // Start-up until a correct answer for the last seeded user.
    log_every_call(&redis);
    let before = rss();
    reset_peak();
    let t = Instant::now();
    let server = TestServer::start(without_load_limits(licensed_config(
        Some(&redis),
        &serial,
        &vendor,
    )))
    .await;
    let mirror = server.app_parts.as_ref().unwrap().mirror.clone();
    let copied = eventually(Duration::from_secs(120), || {
        let n = mirror.read(|s| s.seat_total());
        async move { n >= size }
    })
    .await;
    assert!(copied, "the replica read the pool");
    let copy_took = t.elapsed();
    let mut client = server.client().await;
    let last = seat_user(size - 1);
    let ready = eventually(Duration::from_secs(120), || {
        let mut c = client.clone();
        let last = last.clone();
        async move {
            c.check_seat(check_request_for(&last))
                .await
                .is_ok_and(|r| r.into_inner().licensed)
        }
    })
    .await;
    let startup = t.elapsed();
    assert!(ready, "the replica answers for the last seeded user");
    let steady = rss().saturating_sub(before);
    let start_peak = peak().saturating_sub(before);
    println!(
        "  start-up: copy of the pool read {:.0} ms, a correct answer {:.0} ms",
        copy_took.as_secs_f64() * 1000.0,
        startup.as_secs_f64() * 1000.0
    );
    println!("  Redis during start-up: {}", redis_calls(&redis));

    // A full resync (a gap in the feed) and its peak.
    reset_peak();
    make_gap(&mut redis.connection(), &serial);
    let caught_up = eventually(Duration::from_secs(120), || {
        let v = mirror.read(|s| s.position.as_ref().map_or(0, |p| p.version));
        let want: u64 = redis::cmd("GET")
            .arg(format!("lic:{{{serial}}}:version"))
            .query(&mut redis.connection())
            .unwrap_or(0);
        async move { v >= want }
    })
    .await;
    assert!(caught_up, "the replica read the store again");
    println!("  Redis during the full resync: {}", redis_calls(&redis));
    let resync_peak = peak().saturating_sub(before).max(steady);
    println!(
        "  replica memory: steady {:.0} B/seat, start peak {:.0} B/seat, resync peak {:.0} B/seat ({:.2}x steady)",
        steady as f64 / size as f64,
        start_peak as f64 / size as f64,
        resync_peak as f64 / size as f64,
        resync_peak as f64 / steady.max(1) as f64
    );

    // Calls, every Redis call logged.
    let mut conn = redis.connection();
    let audit_before: u64 = redis::cmd("XLEN")
        .arg(format!("lic:{{{serial}}}:audit"))
        .query(&mut conn)
        .unwrap_or(0);
    let mut assigns = Vec::with_capacity(CALLS);
    for i in 0..CALLS {
        let t = Instant::now();
        client
            .assign_seat(pb::AssignSeatRequest {
                user_id: format!("new-{i:020}"),
                feature: "user".into(),
            })
            .await
            .unwrap();
        assigns.push(t.elapsed());
    }
    let mut releases = Vec::with_capacity(CALLS);
    for i in 0..CALLS {
        let t = Instant::now();
        client
            .release_seat(pb::ReleaseSeatRequest {
                user_id: seat_user(i * (size / CALLS)),
                feature: "user".into(),
            })
            .await
            .unwrap();
        releases.push(t.elapsed());
    }
    let mut checks = Vec::with_capacity(CALLS * 10);
    for i in 0..CALLS * 10 {
        let t = Instant::now();
        client
            .check_seat(check_request_for(&seat_user((i * 7919) % size)))
            .await
            .unwrap();
        checks.push(t.elapsed());
    }
    let calls = redis_calls(&redis);
    println!("  AssignSeat:  {}", percentiles(assigns));
    println!("  ReleaseSeat: {}", percentiles(releases));
    println!("  CheckSeat:   {}", percentiles(checks));
    println!("  Redis during those calls: {calls}");

    // Audit entries per accepted change (the writer may lag a moment).
    tokio::time::sleep(Duration::from_secs(2)).await;
    let audit_after: u64 = redis::cmd("XLEN")
        .arg(format!("lic:{{{serial}}}:audit"))
        .query(&mut conn)
        .unwrap_or(0);
    println!(
        "  audit entries per accepted change: {:.2} ({} for {} changes)",
        (audit_after - audit_before) as f64 / (2 * CALLS) as f64,
        audit_after - audit_before,
        2 * CALLS
    );

    // Idle: nothing changes for 20 s.
    let sent = info_field(&redis, "stats", "total_net_output_bytes");
    let cpu = cpu_seconds();
    let idle = Duration::from_secs(20);
    tokio::time::sleep(idle).await;
    let per_minute = 60.0 / idle.as_secs_f64();
    println!(
        "  idle, per minute: {:.0} kB from Redis, {:.3} CPU-s in the bench's process (replica and bench)",
        (info_field(&redis, "stats", "total_net_output_bytes") - sent) as f64 / 1000.0 * per_minute,
        (cpu_seconds() - cpu) * per_minute
    );
    println!(
        "  Redis during the audit wait and the idle time: {}",
        redis_calls(&redis)
    );

    // Upgrade: a store written before the seat order sets existed builds them
    // once, in the background (here started by the first write that needs
    // them, a release with a capacity, which waits for it at most 10 s and
    // then answers STORE_BUSY).
    // Pages of the build: about a millisecond each, so only the calls over
    // one are logged (all of them would not fit the log).
    log_calls_over(&redis, 1_000);
    let _: () = redis::cmd("DEL")
        .arg(format!("lic:{{{serial}}}:order_at"))
        .query(&mut conn)
        .unwrap();
    let t = Instant::now();
    let released = client
        .release_seat(pb::ReleaseSeatRequest {
            user_id: seat_user(size - 2),
            feature: "user".into(),
        })
        .await;
    let built = eventually(Duration::from_secs(300), || {
        let marks: (Option<String>, Option<String>) = redis::cmd("MGET")
            .arg(format!("lic:{{{serial}}}:order_at"))
            .arg(format!("lic:{{{serial}}}:version"))
            .query(&mut redis.connection())
            .unwrap_or((None, None));
        async move { marks.0.is_some() && marks.0 == marks.1 }
    })
    .await;
    println!(
        "  one-time build of the seat order sets (upgrade): {:.0} ms; Redis, calls over 1 ms only: {}; the release {}",
        t.elapsed().as_secs_f64() * 1000.0,
        redis_calls(&redis),
        match (&released, built) {
            (Ok(_), true) => "succeeded".to_owned(),
            (Err(status), _) => format!("answered {:?}: {}", status.code(), status.message()),
            (Ok(_), false) => "succeeded, the build did not finish".to_owned(),
        }
    );
    server.shutdown().await;

    replica_process(&redis, &serial, &vendor, size).await;
}

/// The replica alone, as its own process (the binary, as deployed): from its
/// start to a correct answer for the last seeded user, its resident set, and
/// the CPU it uses in an idle minute (/proc/PID/stat), nothing else counted.
async fn replica_process(redis: &RedisServer, serial: &str, vendor: &Vendor, size: usize) {
    let port = unused_port();
    log_every_call(redis);
    let t = Instant::now();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_comtrexx-licensing"))
        .arg("serve")
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("LICENSING_LISTEN_ADDR", format!("127.0.0.1:{port}"))
        .env("LICENSING_METRICS_ADDR", "")
        .env("LICENSING_REDIS_URL", redis.url())
        .env("LICENSING_SERIAL_NUMBER", serial)
        .env(
            "LICENSING_LICENSE_FILE",
            vendor.license_path().display().to_string(),
        )
        .env("LICENSING_VENDOR_PUBLIC_KEY", vendor.public_key())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start the service binary");
    let pid = child.id().to_string();
    let last = seat_user(size - 1);
    let ready = eventually(Duration::from_secs(120), || {
        let last = last.clone();
        async move {
            let Ok(mut c) = comtrexx_licensing::grpc::pb::licensing_service_client::LicensingServiceClient::connect(
                format!("http://127.0.0.1:{port}"),
            )
            .await
            else {
                return false;
            };
            c.check_seat(check_request_for(&last))
                .await
                .is_ok_and(|r| r.into_inner().licensed)
        }
    })
    .await;
    let startup = t.elapsed();
    assert!(
        ready,
        "the replica process answers for the last seeded user"
    );
    tokio::time::sleep(Duration::from_secs(5)).await;
    let rss = proc_field(&format!("/proc/{pid}/status"), "VmRSS:") * 1024;
    let peak = proc_field(&format!("/proc/{pid}/status"), "VmHWM:") * 1024;
    let cpu = cpu_seconds_of(&pid);
    let idle = Duration::from_secs(60);
    tokio::time::sleep(idle).await;
    let used = cpu_seconds_of(&pid) - cpu;
    println!(
        "  replica process: a correct answer {:.0} ms after its start; resident {:.0} MB ({:.0} B/seat, the process's own included), peak {:.0} MB; idle minute: {:.3} CPU-s",
        startup.as_secs_f64() * 1000.0,
        rss as f64 / 1e6,
        rss as f64 / size as f64,
        peak as f64 / 1e6,
        used
    );
    println!(
        "  Redis during its start-up and idle minute: {}",
        redis_calls(redis)
    );
    let _ = child.kill();
    let _ = child.wait();
}

fn check_request_for(user_id: &str) -> pb::CheckSeatRequest {
    pb::CheckSeatRequest {
        user_id: user_id.to_owned(),
        feature: "user".into(),
        ..Default::default()
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let sizes: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let sizes = if sizes.is_empty() {
        vec![10_000, 100_000, 1_000_000]
    } else {
        sizes
    };
    for size in sizes {
        measure(size).await;
    }
}
