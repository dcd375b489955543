//! The service binary under a supervisor as systemd runs it (`Type=notify`): the
//! test listens on a `NOTIFY_SOCKET` of its own and checks what the process says
//! and when: `READY=1` only once health says SERVING, `STOPPING=1` on SIGTERM,
//! `WATCHDOG=1` pings with `WATCHDOG_USEC`, and SIGHUP reloading the license file
//! (`RELOADING=1` … `READY=1`), keeping the applied license when the file is broken.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use chrono::Utc;
use common::*;
use comtrexx_licensing::domain::{Edition, Feature};
use comtrexx_licensing::grpc::SERVICE_NAME;
use comtrexx_licensing::grpc::pb;
use tokio::net::UnixDatagram;
use tonic::transport::Channel;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

const BIN: &str = env!("CARGO_BIN_EXE_comtrexx-licensing");

/// A notification socket as systemd offers one: a unix datagram socket whose
/// path the service gets in `NOTIFY_SOCKET`.
struct NotifySocket {
    socket: UnixDatagram,
    path: PathBuf,
}

impl NotifySocket {
    fn bind(dir: &Path) -> Self {
        std::fs::create_dir_all(dir).unwrap();
        let path = dir.join("notify.sock");
        let socket = UnixDatagram::bind(&path).expect("bind the notify socket");
        Self { socket, path }
    }

    /// The next datagram's lines (`KEY=VALUE`), or `None` after `within`.
    async fn next(&self, within: Duration) -> Option<Vec<String>> {
        let mut buf = vec![0u8; 4096];
        let n = tokio::time::timeout(within, self.socket.recv(&mut buf))
            .await
            .ok()?
            .expect("receive on the notify socket");
        let text = String::from_utf8(buf[..n].to_vec()).expect("notifications are text");
        Some(text.lines().map(str::to_owned).collect())
    }

    /// Receives until a datagram carries `line`; returns every line received,
    /// that datagram's included. Panics when it does not come within `within`.
    async fn expect(&self, line: &str, within: Duration) -> Vec<String> {
        let deadline = Instant::now() + within;
        let mut seen = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let Some(lines) = self.next(left).await else {
                panic!("no {line} within {within:?}; got {seen:?}");
            };
            let found = lines.iter().any(|l| l == line);
            seen.extend(lines);
            if found {
                return seen;
            }
        }
    }
}

/// The service binary as a child process, killed on drop.
struct Service {
    child: Child,
    port: u16,
    log: PathBuf,
}

impl Service {
    /// Starts `comtrexx-licensing serve` on a free loopback port, with the memory
    /// store, notifying `notify`; `env` adds or overrides variables.
    fn start(dir: &Path, notify: &NotifySocket, env: &[(&str, &str)]) -> Self {
        let log = dir.join("service.log");
        std::fs::File::create(&log).unwrap();
        Self::start_logging_to(&log, notify, env)
    }

    /// Like [`Service::start`], with stdout and stderr appended to `log`.
    fn start_logging_to(log: &Path, notify: &NotifySocket, env: &[(&str, &str)]) -> Self {
        let port = unused_port();
        let log = log.to_owned();
        let out = std::fs::OpenOptions::new().append(true).open(&log).unwrap();
        let mut command = Command::new(BIN);
        command
            .arg("serve")
            .env("NOTIFY_SOCKET", &notify.path)
            .env("LICENSING_LISTEN_ADDR", format!("127.0.0.1:{port}"))
            .env("LICENSING_METRICS_ADDR", "")
            .env("LICENSING_SERIAL_NUMBER", serial("sd"))
            .env("LICENSING_LOG__FORMAT", "text")
            .env("RUST_LOG", "info")
            // Whatever runs the tests: not the journal, no watchdog of its own.
            .env_remove("JOURNAL_STREAM")
            .env_remove("WATCHDOG_USEC")
            .env_remove("WATCHDOG_PID")
            .env_remove("LICENSING_CONFIG")
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out);
        for (key, value) in env {
            command.env(key, value);
        }
        let child = command.spawn().expect("start comtrexx-licensing");
        Self { child, port, log }
    }

    fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .args([&format!("-{name}"), &self.child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{name}");
    }

    /// Waits (bounded) for the process to exit; its exit status.
    fn wait_exit(&mut self, within: Duration) -> std::process::ExitStatus {
        let mut status = None;
        let exited = eventually_blocking(within, || {
            status = self.child.try_wait().unwrap();
            status.is_some()
        });
        assert!(
            exited,
            "service did not exit within {within:?}; log:\n{}",
            self.log_text()
        );
        status.expect("exited")
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn health(endpoint: String, service: &str) -> ServingStatus {
    let channel = Channel::from_shared(endpoint)
        .unwrap()
        .connect()
        .await
        .expect("connect the moment READY=1 arrives");
    let status = HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: service.to_owned(),
        })
        .await
        .expect("health check")
        .into_inner()
        .status;
    ServingStatus::try_from(status).unwrap()
}

const START: Duration = Duration::from_secs(20);

#[tokio::test]
async fn ready_only_once_serving_and_stopping_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let notify = NotifySocket::bind(dir.path());
    // The health client's idle connection is drained until this timeout passes.
    let mut service = Service::start(
        dir.path(),
        &notify,
        &[("LICENSING_DRAIN_TIMEOUT_MS", "1000")],
    );

    let seen = notify.expect("READY=1", START).await;
    assert!(
        !seen.iter().any(|l| l == "STOPPING=1"),
        "no STOPPING before READY: {seen:?}"
    );
    // Checked the moment READY arrives, without retrying: it must already serve.
    assert_eq!(health(service.endpoint(), "").await, ServingStatus::Serving);
    assert_eq!(
        health(service.endpoint(), SERVICE_NAME).await,
        ServingStatus::Serving
    );

    service.signal("TERM");
    notify.expect("STOPPING=1", Duration::from_secs(10)).await;
    let status = service.wait_exit(Duration::from_secs(15));
    assert!(
        status.success(),
        "clean exit after drain: {status:?}\n{}",
        service.log_text()
    );
}

#[tokio::test]
async fn watchdog_pings_when_watchdog_usec_is_set() {
    let dir = tempfile::tempdir().unwrap();
    let notify = NotifySocket::bind(dir.path());
    // 200 ms: pings every 100 ms.
    let _service = Service::start(dir.path(), &notify, &[("WATCHDOG_USEC", "200000")]);
    notify.expect("READY=1", START).await;
    let started = Instant::now();
    for _ in 0..3 {
        notify.expect("WATCHDOG=1", Duration::from_secs(5)).await;
    }
    // Three pings at 100 ms take about 200-300 ms; far less than 5 s each.
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[tokio::test]
async fn no_watchdog_pings_without_watchdog_usec() {
    let dir = tempfile::tempdir().unwrap();
    let notify = NotifySocket::bind(dir.path());
    let _service = Service::start(dir.path(), &notify, &[]);
    notify.expect("READY=1", START).await;
    // Two would-be ping intervals of the test above, and then some.
    let seen = notify.next(Duration::from_millis(500)).await;
    assert_eq!(seen, None, "no notifications while idle without a watchdog");
}

/// Sends SIGHUP and checks that systemd hears `RELOADING=1`, then `READY=1`
/// with a status line naming `part` as failed.
async fn reload_fails_for(service: &Service, notify: &NotifySocket, part: &str) {
    service.signal("HUP");
    notify.expect("RELOADING=1", Duration::from_secs(10)).await;
    let seen = notify.expect("READY=1", Duration::from_secs(30)).await;
    assert!(
        seen.iter()
            .any(|l| l.starts_with("STATUS=") && l.contains(part)),
        "systemctl status names the part that failed: {seen:?}"
    );
}

/// The purchased `user` quantity the service reports.
async fn user_quantity(client: &mut Client) -> Option<u32> {
    overview(client)
        .await
        .entitlements
        .iter()
        .find(|e| e.feature == "user")
        .map(|e| e.quantity)
}

#[tokio::test]
async fn sighup_reloads_the_license_file_and_keeps_the_license_when_broken() {
    let dir = tempfile::tempdir().unwrap();
    let notify = NotifySocket::bind(dir.path());
    let vendor = Vendor::new();
    let serial = serial("hup");
    let issued = |minutes_ago| Utc::now() - chrono::Duration::minutes(minutes_ago);
    vendor.write_license(&serial, Edition::Vm, issued(30), &[(Feature::User, 5)]);
    let license = vendor.license_path();
    let key = vendor.public_key();
    let service = Service::start(
        dir.path(),
        &notify,
        &[
            ("LICENSING_SERIAL_NUMBER", &serial),
            ("LICENSING_LICENSE_FILE", license.to_str().unwrap()),
            ("LICENSING_VENDOR_PUBLIC_KEY", &key),
        ],
    );
    notify.expect("READY=1", START).await;
    let mut client =
        pb::licensing_service_client::LicensingServiceClient::connect(service.endpoint())
            .await
            .unwrap();
    wait_active(&client).await;
    assert_eq!(user_quantity(&mut client).await, Some(5));

    // A new license in place, then SIGHUP: systemd hears RELOADING=1, then READY=1
    // once the reload is done, and the new entitlements are in force by then.
    vendor.write_license(&serial, Edition::Vm, issued(20), &[(Feature::User, 9)]);
    service.signal("HUP");
    notify.expect("RELOADING=1", Duration::from_secs(10)).await;
    notify.expect("READY=1", Duration::from_secs(30)).await;
    assert_eq!(user_quantity(&mut client).await, Some(9));

    // A broken file: the reload fails, says so, and the running license stays.
    std::fs::write(&license, "{ not a license").unwrap();
    reload_fails_for(&service, &notify, "license file").await;
    assert_eq!(user_quantity(&mut client).await, Some(9));
    let after_broken = overview(&mut client).await;
    assert_eq!(
        after_broken.activation_state,
        pb::ActivationState::Grace as i32,
        "a broken file is a failing license source: the last good entitlements hold"
    );
    assert_eq!(
        after_broken.last_reconcile_outcome,
        pb::ReconcileOutcome::Rejected as i32
    );
    let log = service.log_text();
    assert!(
        log.lines().any(|l| l.contains("ERROR")
            && l.contains("reload failed")
            && l.contains("license file")),
        "the failed reload is logged as an error:\n{log}"
    );

    // The service still serves, and a good file reloads again.
    vendor.write_license(&serial, Edition::Vm, issued(10), &[(Feature::User, 7)]);
    service.signal("HUP");
    notify.expect("RELOADING=1", Duration::from_secs(10)).await;
    notify.expect("READY=1", Duration::from_secs(30)).await;
    assert_eq!(user_quantity(&mut client).await, Some(7));
    assert_eq!(
        overview(&mut client).await.activation_state,
        pb::ActivationState::Active as i32
    );
}

#[tokio::test]
async fn logs_in_the_journal_form_only_when_stdout_is_the_journal_stream() {
    use std::os::unix::fs::MetadataExt as _;
    let dir = tempfile::tempdir().unwrap();
    let notify = NotifySocket::bind(dir.path());

    // Elsewhere: the text format as always, timestamp first.
    let mut plain = Service::start(dir.path(), &notify, &[]);
    notify.expect("READY=1", START).await;
    plain.signal("TERM");
    plain.wait_exit(Duration::from_secs(15));
    let text = plain.log_text();
    let first = text.lines().next().expect("log lines");
    assert!(
        first.starts_with("20") && !first.starts_with('<'),
        "timestamp first outside the journal: {first}"
    );

    // Stdout is the stream systemd announced (its device and inode): priorities.
    let log = dir.path().join("journal.log");
    std::fs::File::create(&log).unwrap();
    let meta = std::fs::metadata(&log).unwrap();
    let stream = format!("{}:{}", meta.dev(), meta.ino());
    let notify = NotifySocket::bind(&dir.path().join("second"));
    let mut journal = Service::start_logging_to(
        &log,
        &notify,
        &[
            ("JOURNAL_STREAM", &stream),
            ("LICENSING_LOG__FORMAT", "text"),
        ],
    );
    notify.expect("READY=1", START).await;
    journal.signal("TERM");
    journal.wait_exit(Duration::from_secs(15));
    let text = journal.log_text();
    let lines: Vec<&str> = text.lines().collect();
    assert!(!lines.is_empty());
    for line in &lines {
        let rest = line
            .strip_prefix("<6>")
            .or_else(|| line.strip_prefix("<4>"))
            .or_else(|| line.strip_prefix("<3>"))
            .unwrap_or_else(|| panic!("a priority prefix on every line: {line}"));
        assert!(!rest.starts_with("20"), "no timestamp: {line}");
        assert!(!line.contains('\u{1b}'), "no colour: {line}");
    }
    // The in-memory store warning is a warning, the start an info.
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("<4>") && l.contains("no redis_url"))
    );
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("<6>") && l.contains("serving gRPC"))
    );
}

/// Whether `GetLicenseOverview` with `token` is answered.
async fn overview_with(client: &mut Client, token: &str) -> Result<(), tonic::Code> {
    client
        .get_license_overview(with_token(pb::GetLicenseOverviewRequest::default(), token))
        .await
        .map(drop)
        .map_err(|s| s.code())
}

#[tokio::test]
async fn an_empty_callers_file_is_refused_and_the_callers_stay() {
    use comtrexx_licensing::auth::callers::new_token;
    let dir = tempfile::tempdir().unwrap();
    let notify = NotifySocket::bind(dir.path());
    let (first, second) = (new_token(), new_token());
    let callers = token_callers_file(dir.path(), &[("monitor", "monitoring", &first)]);
    let service = Service::start(
        dir.path(),
        &notify,
        &[
            ("LICENSING_AUTH__MODE", "enforce"),
            ("LICENSING_AUTH__CALLERS_FILE", callers.to_str().unwrap()),
            ("LICENSING_AUTH__RELOAD_INTERVAL_MS", "100"),
        ],
    );
    notify.expect("READY=1", START).await;
    let mut client =
        pb::licensing_service_client::LicensingServiceClient::connect(service.endpoint())
            .await
            .unwrap();
    assert_eq!(overview_with(&mut client, &first).await, Ok(()));

    // An editor truncates the file before writing it: SIGHUP refuses it...
    std::fs::write(&callers, "").unwrap();
    reload_fails_for(&service, &notify, "callers file").await;
    // ... and so does the periodic check, with a warning.
    assert!(
        eventually(Duration::from_secs(10), || async {
            service
                .log_text()
                .lines()
                .any(|l| l.contains("WARN") && l.contains("callers file not reloaded"))
        })
        .await,
        "the periodic check warns:\n{}",
        service.log_text()
    );
    // The previous callers stay in force.
    assert_eq!(overview_with(&mut client, &first).await, Ok(()));

    // The finished file is taken.
    token_callers_file(dir.path(), &[("monitor", "monitoring", &second)]);
    assert!(
        eventually(Duration::from_secs(10), || {
            let mut client = client.clone();
            let second = second.clone();
            async move { overview_with(&mut client, &second).await.is_ok() }
        })
        .await,
        "the new callers file is in force"
    );
    assert_eq!(
        overview_with(&mut client, &first).await,
        Err(tonic::Code::Unauthenticated)
    );
}
