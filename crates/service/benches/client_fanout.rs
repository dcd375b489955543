//! The client library against real replicas: `cargo bench --bench
//! client_fanout [-- CLIENTS SECONDS]` (default 1000 clients, 5 s).
//!
//! Two replicas of the service as processes on one `redis-server`:
//!
//! - **propagation**: `AssignSeat` on replica A until a client following
//!   replica B decides the user licensed (from the call's start), p50/p99
//!   over 500 assigns one after another;
//! - **fan-out**: CLIENTS clients on replica B, one change a millisecond
//!   written on A for SECONDS: B's CPU per change (its process's CPU time
//!   over the changes, idle subtracted), and the clients' lag (from the
//!   write's acknowledgement until a client's copy has it, sampled every
//!   millisecond), p50/p99/max.
//!
//! Everything shares this host's two cores (the clients too), so the lag is
//! an upper bound. Results in BENCHMARKS.md ("The client library").

#[path = "../tests/common/mod.rs"]
mod common;

use std::collections::VecDeque;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use comtrexx_licensing::grpc::pb;
use comtrexx_licensing_client::{Client as Local, Config, Feature};

const BIN: &str = env!("CARGO_BIN_EXE_comtrexx-licensing");

struct Replica {
    child: Child,
    port: u16,
}

impl Drop for Replica {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Replica {
    fn start(redis: &RedisServer, serial: &str, clients: usize) -> Self {
        let port = unused_port();
        let child = Command::new(BIN)
            .arg("serve")
            .env("LICENSING_LISTEN_ADDR", format!("127.0.0.1:{port}"))
            .env("LICENSING_METRICS_ADDR", "")
            .env("LICENSING_REDIS_URL", redis.url())
            .env("LICENSING_SERIAL_NUMBER", serial)
            .env("LICENSING_TRYOUT__SEATS", "1000")
            .env("LICENSING_LIMITS__CONCURRENT_WRITES", "100000")
            .env(
                "LICENSING_LIMITS__WATCH_SUBSCRIBERS_PER_CALLER",
                (clients + 10).to_string(),
            )
            .env("LICENSING_LIMITS__CALLER_SHARE_PERCENT", "100")
            // Every client is on this host: one peer address.
            .env(
                "LICENSING_LIMITS__MAX_CONNECTIONS_PER_PEER",
                (clients + 100).to_string(),
            )
            .env("RUST_LOG", "error")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start the service binary");
        Self { child, port }
    }

    fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    async fn client(&self) -> Client {
        eventually_some(Duration::from_secs(30), || {
            let e = self.endpoint();
            async move { Client::connect(e).await.ok() }
        })
        .await
        .expect("the replica listens")
    }

    /// The process's CPU time (s).
    fn cpu(&self) -> f64 {
        let stat =
            std::fs::read_to_string(format!("/proc/{}/stat", self.child.id())).unwrap_or_default();
        let after = stat.rsplit_once(')').map_or("", |(_, r)| r);
        let f: Vec<f64> = after
            .split_whitespace()
            .map(|v| v.parse().unwrap_or(0.0))
            .collect();
        (f.get(11).unwrap_or(&0.0) + f.get(12).unwrap_or(&0.0)) / 100.0
    }
}

/// A connection per client, on both sides (the replicas inherit the limit).
fn raise_open_files() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain system calls on a local struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
}

fn local(endpoint: String) -> Local {
    Local::start(Config {
        endpoints: vec![endpoint],
        features: vec![Feature::User],
        ..Config::default()
    })
    .expect("client config")
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1e3)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let clients = args.first().copied().unwrap_or(1000);
    raise_open_files();
    let seconds = args.get(1).copied().unwrap_or(5);
    let redis = RedisServer::start();
    let serial = serial("fanout");
    let a = Replica::start(&redis, &serial, clients);
    let b = Replica::start(&redis, &serial, clients);
    let mut ca = a.client().await;
    let _ = b.client().await;
    start_tryout(&mut ca).await.expect("tryout");

    // Propagation: A's write until B's client decides licensed.
    let follower = local(b.endpoint());
    tokio::time::timeout(Duration::from_secs(30), follower.ready())
        .await
        .expect("a copy");
    let mut samples = Vec::new();
    for i in 0..500 {
        let user = format!("p{}", i % 400);
        if i >= 400 {
            released(&mut ca, &user, "user").await;
        }
        let t = Instant::now();
        assigned(&mut ca, &user, "user").await;
        while follower.check_seat(&user, Feature::User).licensed() != Some(true) {
            tokio::task::yield_now().await;
            assert!(t.elapsed() < Duration::from_secs(10), "never propagated");
        }
        samples.push(t.elapsed());
    }
    for i in 0..400 {
        released(&mut ca, &format!("p{i}"), "user").await;
    }
    samples.sort_unstable();
    println!(
        "propagation A -> client on B: p50 {}, p99 {}, max {} (500 assigns)",
        ms(pct(&samples, 0.5)),
        ms(pct(&samples, 0.99)),
        ms(*samples.last().unwrap())
    );
    drop(follower);

    // Fan-out.
    let locals: Vec<Local> = (0..clients).map(|_| local(b.endpoint())).collect();
    let started = Instant::now();
    for l in &locals {
        if tokio::time::timeout(Duration::from_secs(60), l.ready())
            .await
            .is_err()
        {
            panic!("a client got no copy in a minute: {:?}", l.status());
        }
    }
    println!(
        "{clients} clients on replica B: all hold a copy after {}",
        ms(started.elapsed())
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    let idle_from = (Instant::now(), b.cpu());
    tokio::time::sleep(Duration::from_secs(2)).await;
    let idle_rate = (b.cpu() - idle_from.1) / idle_from.0.elapsed().as_secs_f64();

    // Writes: one a millisecond (as far as A keeps up), acknowledged times kept.
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(u64, Instant)>();
    let writer = {
        let mut ca = ca.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(1));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            let end = Instant::now() + Duration::from_secs(seconds as u64);
            let mut n = 0u64;
            while Instant::now() < end {
                tick.tick().await;
                // Assign and release in turn: the tryout's seats never run out.
                let user = format!("f{}", n / 2);
                let version = if n.is_multiple_of(2) {
                    ca.assign_seat(pb::AssignSeatRequest {
                        user_id: user,
                        feature: "user".into(),
                    })
                    .await
                    .expect("AssignSeat")
                    .into_inner()
                    .version
                } else {
                    ca.release_seat(pb::ReleaseSeatRequest {
                        user_id: user,
                        feature: "user".into(),
                    })
                    .await
                    .expect("ReleaseSeat")
                    .into_inner()
                    .version
                };
                let _ = tx.send((version, Instant::now()));
                n += 1;
            }
            n
        })
    };
    let cpu_from = (Instant::now(), b.cpu());
    // Sampler: every millisecond, which clients reached which acknowledged version.
    let mut acked: VecDeque<(u64, Instant)> = VecDeque::new();
    let mut base = 0usize; // index of acked[0] in the whole sequence
    let mut next = vec![0usize; clients];
    let mut lags: Vec<Duration> = Vec::new();
    let mut done = false;
    loop {
        while let Ok(a) = rx.try_recv() {
            acked.push_back(a);
        }
        if writer.is_finished() && !done {
            done = true;
        }
        let now = Instant::now();
        for (c, l) in locals.iter().enumerate() {
            let v = l.version().unwrap_or(0);
            while next[c] - base < acked.len() {
                let (version, at) = acked[next[c] - base];
                if v < version {
                    break;
                }
                lags.push(now.saturating_duration_since(at));
                next[c] += 1;
            }
        }
        // Drop what every client has passed.
        let min = *next.iter().min().unwrap();
        while base < min {
            acked.pop_front();
            base += 1;
        }
        if done && rx.is_empty() && acked.is_empty() {
            break;
        }
        if cpu_from.0.elapsed() > Duration::from_secs(seconds as u64 + 60) {
            println!("(clients still behind after a minute: stopped)");
            break;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let changes = writer.await.unwrap();
    let window = cpu_from.0.elapsed().as_secs_f64();
    let cpu = b.cpu() - cpu_from.1 - idle_rate * window;
    lags.sort_unstable();
    println!(
        "fan-out: {changes} changes in {seconds} s ({:.0}/s) to {clients} clients: replica B CPU {:.1} µs per change ({:.1} µs per change and client); lag p50 {}, p99 {}, max {} ({} samples)",
        changes as f64 / seconds as f64,
        cpu / changes as f64 * 1e6,
        cpu / changes as f64 / clients as f64 * 1e6,
        ms(pct(&lags, 0.5)),
        ms(pct(&lags, 0.99)),
        ms(lags.last().copied().unwrap_or_default()),
        lags.len()
    );
}
