//! One replica's clock leaping ahead (real processes on one real Redis, the
//! third replica under `faketime`): it must not move time for the others, nor
//! for itself once restarted with a correct clock; while it runs it is
//! reported (overview, metric) and decides at the reference time.

mod common;

use std::fs::File;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use chrono::Utc;
use common::*;
use comtrexx_licensing::grpc::pb;

const BIN: &str = env!("CARGO_BIN_EXE_comtrexx-licensing");

/// How far ahead the wrong clock is.
const LEAP: &str = "+90d";
const LEAP_DAYS: i64 = 90;

/// A replica process on `redis`, killed on drop; its output goes to a file.
struct Replica {
    child: Child,
    grpc: u16,
    metrics: u16,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Replica {
    /// Starts the binary; with `leap`, under `faketime` with that offset (the
    /// monotonic clock left alone, as an NTP step or a wrong RTC leaves it).
    fn start(redis: &RedisServer, serial: &str, leap: Option<&str>) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("replica.log");
        let (grpc, metrics) = (unused_port(), unused_port());
        let mut cmd = match leap {
            Some(offset) => {
                let mut c = Command::new("faketime");
                c.args(["-f", offset, BIN]);
                c
            }
            None => Command::new(BIN),
        };
        let out = File::create(&log).unwrap();
        cmd.arg("serve")
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("FAKETIME_DONT_FAKE_MONOTONIC", "1")
            .env("LICENSING_REDIS_URL", redis.url())
            .env("LICENSING_SERIAL_NUMBER", serial)
            .env("LICENSING_LISTEN_ADDR", format!("127.0.0.1:{grpc}"))
            .env("LICENSING_METRICS_ADDR", format!("127.0.0.1:{metrics}"))
            .env("LICENSING_DRAIN_TIMEOUT_MS", "0")
            .stdout(Stdio::from(out.try_clone().unwrap()))
            .stderr(Stdio::from(out));
        // A process group of its own: `faketime` runs the binary as its child,
        // and both must go when the replica is dropped.
        let child = std::os::unix::process::CommandExt::process_group(&mut cmd, 0)
            .spawn()
            .expect("start the service binary (and faketime)");
        Self {
            child,
            grpc,
            metrics,
            log,
            _dir: dir,
        }
    }

    fn output(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// A client once the replica answers and has read the store (its tryout
    /// is known); panics with its output otherwise.
    async fn client(&mut self) -> Client {
        let url = format!("http://127.0.0.1:{}", self.grpc);
        let ready = eventually(Duration::from_secs(60), || {
            let url = url.clone();
            async move {
                match Client::connect(url).await {
                    Ok(mut c) => c
                        .get_tryout_status(pb::GetTryoutStatusRequest::default())
                        .await
                        .is_ok_and(|s| {
                            s.into_inner()
                                .status
                                .is_some_and(|t| t.state() != pb::TryoutState::Available)
                        }),
                    Err(_) => false,
                }
            }
        })
        .await;
        if let Ok(Some(status)) = self.child.try_wait() {
            panic!("the replica exited ({status}):\n{}", self.output());
        }
        assert!(
            ready,
            "the replica never served the tryout:\n{}",
            self.output()
        );
        Client::connect(url).await.unwrap()
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        // The whole group: under `faketime` the service is its child.
        if let Ok(group) = i32::try_from(self.child.id()) {
            // SAFETY: kill(2) with a negative pid signals that process group;
            // it reads no memory of ours.
            unsafe {
                libc::kill(-group, libc::SIGKILL);
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The tryout state and whether `alice` is licensed, as a replica answers.
async fn answers(c: &mut Client) -> (pb::TryoutState, bool) {
    (tryout(c).await.state(), licensed(c, "alice").await)
}

/// The stored high-water mark (ms), read from Redis itself.
fn stored_mark(redis: &RedisServer, serial: &str) -> i64 {
    let mut conn = redis.connection();
    let v: Option<String> = redis::cmd("GET")
        .arg(format!("lic:{{{serial}}}:clock"))
        .query(&mut conn)
        .unwrap();
    v.map_or(0, |v| v.parse().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clock_leaping_ahead_moves_no_one_elses_time() {
    assert!(
        Command::new("faketime")
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success()),
        "faketime is needed (scripts/install-tools.sh installs it)"
    );
    let redis = RedisServer::start();
    let serial = serial("leap");
    let mut a = Replica::start(&redis, &serial, None);
    let mut b = Replica::start(&redis, &serial, None);
    let mut ca = {
        // The first replica initializes the store; the tryout starts there.
        let url = format!("http://127.0.0.1:{}", a.grpc);
        assert!(
            eventually(Duration::from_secs(60), || {
                let url = url.clone();
                async move {
                    match Client::connect(url).await {
                        Ok(mut c) => start_tryout(&mut c).await.is_ok(),
                        Err(_) => false,
                    }
                }
            })
            .await,
            "no tryout started:\n{}",
            a.output()
        );
        a.client().await
    };
    ca.assign_seat(pb::AssignSeatRequest {
        user_id: "alice".into(),
        feature: String::new(),
    })
    .await
    .expect("AssignSeat");
    let mut cb = b.client().await;
    assert!(
        eventually(Duration::from_secs(10), || {
            let mut cb = cb.clone();
            async move { licensed(&mut cb, "alice").await }
        })
        .await
    );

    // The third replica's clock is 90 days ahead.
    let mut c = Replica::start(&redis, &serial, Some(LEAP));
    let mut cc = c.client().await;
    let reported = eventually(Duration::from_secs(30), || {
        let mut cc = cc.clone();
        async move { overview(&mut cc).await.clock_skewed }
    })
    .await;
    assert!(
        reported,
        "the skewed clock was not reported:\n{}",
        c.output()
    );
    let o = overview(&mut cc).await;
    let days = o.clock_skew_ms / 86_400_000;
    assert!(
        (LEAP_DAYS - 1..=LEAP_DAYS).contains(&days),
        "skew {} ms",
        o.clock_skew_ms
    );
    let metrics = scrape(format!("127.0.0.1:{}", c.metrics).parse().unwrap()).await;
    assert_eq!(value(&metrics, "licensing_clock_skewed "), 1.0);
    assert!(value(&metrics, "licensing_clock_skew_seconds ") > 89.0 * 86_400.0);
    assert_eq!(value(&metrics, "licensing_clock_skews_total "), 1.0);
    // It decides at the reference time, not at its own: the tryout is on.
    assert_eq!(
        answers(&mut cc).await,
        (pb::TryoutState::Active, true),
        "the skewed replica decided at its own clock"
    );
    // It runs on (its schedule ticks each second) while the others keep time
    // and write the shared mark (every 10 s of it): the mark stays real.
    let reported_at = Utc::now();
    let ticked = eventually(Duration::from_secs(40), || {
        let mut ca = ca.clone();
        async move {
            overview(&mut ca)
                .await
                .time_high_water
                .is_some_and(|t| t.seconds >= reported_at.timestamp() + 12)
        }
    })
    .await;
    assert!(ticked, "{}", a.output());
    assert!(overview(&mut cc).await.clock_skewed, "{}", c.output());
    assert_eq!(answers(&mut cc).await, (pb::TryoutState::Active, true));
    for client in [&mut ca, &mut cb] {
        assert_eq!(answers(client).await, (pb::TryoutState::Active, true));
        assert!(!overview(client).await.clock_skewed);
    }

    // Restarted with a correct clock.
    drop(c);
    let mut c = Replica::start(&redis, &serial, None);
    let mut cc = c.client().await;
    let soon = Utc::now() + chrono::Duration::minutes(1);
    for client in [&mut ca, &mut cb, &mut cc] {
        assert_eq!(
            answers(client).await,
            (pb::TryoutState::Active, true),
            "the tryout ended by a clock that leapt"
        );
        let o = overview(client).await;
        assert!(!o.clock_skewed);
        let mark = o.time_high_water.expect("time_high_water").seconds;
        assert!(
            mark <= soon.timestamp(),
            "the high-water clock is in the future: {mark}"
        );
        assert_eq!(o.tryout.unwrap().days_remaining, 14);
    }
    assert!(stored_mark(&redis, &serial) <= soon.timestamp_millis());
    drop(b);
    drop(a);
}
