//! `redis-server` processes of the test's own, each on a free loopback port,
//! killed on drop: a plain server (no automatic persistence; snapshots only when
//! a test asks), or one with arguments of the test's choosing (replicas,
//! sentinels, TLS, ACL users).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::unused_port;

/// One `redis-server` (or sentinel) process.
pub struct RedisServer {
    pub port: u16,
    child: Option<Child>,
    /// Arguments after the port, bind address and persistence settings.
    args: Vec<String>,
    /// Sentinel mode: the config file it reads and rewrites, and its first text.
    sentinel_conf: Option<(PathBuf, String)>,
    /// The password of the `default` user, for the test's own connections.
    admin_password: Option<String>,
    /// Its working directory: RDB snapshots go there (a master's too, for a
    /// replica's sync).
    dir: tempfile::TempDir,
}

impl RedisServer {
    /// A plain server on a free port.
    pub fn start() -> Self {
        Self::with_args(&[], None)
    }

    /// A plain server on a given port, e.g. one a service was pointed at while
    /// it was down.
    pub fn start_on(port: u16) -> Self {
        Self::spawned(port, Vec::new(), None, None)
    }

    /// A server with `args` after the port and bind address; `admin_password`
    /// is the `default` user's, for the test's own connections.
    pub fn with_args(args: &[&str], admin_password: Option<&str>) -> Self {
        Self::spawned(
            unused_port(),
            args.iter().map(|s| (*s).to_owned()).collect(),
            None,
            admin_password.map(str::to_owned),
        )
    }

    /// A replica of `master`.
    pub fn replica_of(master: &RedisServer) -> Self {
        Self::with_args(
            &["--replicaof", "127.0.0.1", &master.port.to_string()],
            None,
        )
    }

    /// A sentinel watching `master` as `name` (quorum 2, failure noticed after 1 s),
    /// with its config file in `dir`.
    pub fn sentinel(dir: &Path, name: &str, master: &RedisServer) -> Self {
        let path = dir.join(format!("sentinel-{}.conf", rand::random::<u32>()));
        let conf = format!(
            "sentinel monitor {name} 127.0.0.1 {port} 2\n\
             sentinel down-after-milliseconds {name} 1000\n\
             sentinel failover-timeout {name} 5000\n\
             sentinel parallel-syncs {name} 1\n",
            port = master.port
        );
        Self::spawned(unused_port(), Vec::new(), Some((path, conf)), None)
    }

    fn spawned(
        port: u16,
        args: Vec<String>,
        sentinel_conf: Option<(PathBuf, String)>,
        admin_password: Option<String>,
    ) -> Self {
        let mut server = Self {
            port,
            child: None,
            args,
            sentinel_conf,
            admin_password,
            dir: tempfile::tempdir().expect("a directory for redis-server"),
        };
        server.spawn(0);
        server
    }

    fn rdb(&self) -> PathBuf {
        self.dir.path().join("dump.rdb")
    }

    /// Starts the process; `attempt` counts starts that found the port taken.
    fn spawn(&mut self, attempt: u32) {
        assert!(
            attempt < 5,
            "redis-server keeps exiting at start: check its arguments {:?}",
            self.args
        );
        let mut command = Command::new("redis-server");
        if let Some((path, conf)) = &self.sentinel_conf {
            // A sentinel rewrites its file: a fresh one per start.
            std::fs::write(path, conf).unwrap();
            command.arg(path).arg("--sentinel");
        }
        command
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .arg("--dir")
            .arg(self.dir.path());
        if self.sentinel_conf.is_none() {
            command.args([
                "--save",
                "",
                "--appendonly",
                "no",
                "--dbfilename",
                "dump.rdb",
            ]);
        }
        let child = command
            .args(&self.args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot start redis-server ({e}). The Redis tests need `redis-server` on PATH: \
                     install it (Debian/Ubuntu: `apt-get install redis-server`, macOS: `brew install redis`) \
                     or run scripts/install-tools.sh"
                )
            });
        let pid = child.id();
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            // The server answering must be ours: another test's redis-server may
            // have taken the port first (ours then exits), and must not be used.
            // Bounded: a listener that accepts and never answers (a port taken
            // by something else) must not hang the test.
            let bound = Duration::from_millis(500);
            let info = redis::Client::open(self.url())
                .and_then(|c| c.get_connection_with_timeout(bound))
                .and_then(|mut c| {
                    c.set_read_timeout(Some(bound))?;
                    c.set_write_timeout(Some(bound))?;
                    redis::cmd("INFO").arg("server").query::<String>(&mut c)
                });
            if let Ok(info) = info {
                let theirs = info
                    .lines()
                    .find_map(|l| l.strip_prefix("process_id:"))
                    .and_then(|p| p.trim().parse::<u32>().ok());
                if theirs == Some(pid) {
                    return;
                }
                self.kill();
                self.port = unused_port();
                return self.spawn(attempt + 1);
            }
            if let Some(Ok(Some(_))) = self.child.as_mut().map(|c| c.try_wait()) {
                // Exited (e.g. the port was taken): try another port.
                self.port = unused_port();
                return self.spawn(attempt + 1);
            }
            assert!(
                Instant::now() < deadline,
                "redis-server did not come up on port {}",
                self.port
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The plain-TCP URL, with the `default` user's password if it has one.
    pub fn url(&self) -> String {
        match &self.admin_password {
            Some(p) => format!("redis://:{p}@127.0.0.1:{}", self.port),
            None => format!("redis://127.0.0.1:{}", self.port),
        }
    }

    /// Its loopback address (for a fault proxy in front of it).
    pub fn addr(&self) -> std::net::SocketAddr {
        std::net::SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// A replica (see [`RedisServer::replica_of`]) has every key of its
    /// master and an open link to it.
    pub async fn caught_up_with(&self, master: &RedisServer, within: Duration) -> bool {
        let key_count = |r: &RedisServer| -> usize {
            redis::cmd("DBSIZE")
                .query::<usize>(&mut r.connection())
                .unwrap_or(0)
        };
        crate::eventually(within, || async {
            let (m, s) = (key_count(master), key_count(self));
            let info: String = redis::cmd("INFO")
                .arg("replication")
                .query(&mut self.connection())
                .unwrap_or_default();
            m > 0 && m == s && info.contains("master_link_status:up")
        })
        .await
    }

    /// A replica stops following its master (`REPLICAOF NO ONE`): it keeps
    /// what it has and takes writes of its own (a failover's new master).
    pub fn detach(&self) {
        let _: () = redis::cmd("REPLICAOF")
            .arg("NO")
            .arg("ONE")
            .query(&mut self.connection())
            .expect("REPLICAOF NO ONE");
    }

    pub fn connection(&self) -> redis::Connection {
        redis::Client::open(self.url())
            .unwrap()
            .get_connection()
            .unwrap()
    }

    /// Writes an RDB snapshot now (`SAVE`) and keeps a copy; returns the copy.
    pub fn save_snapshot(&self) -> PathBuf {
        let _: () = redis::cmd("SAVE")
            .query(&mut self.connection())
            .expect("SAVE");
        let copy = self
            .dir
            .path()
            .join(format!("snapshot-{:08x}.rdb", rand::random::<u32>()));
        std::fs::copy(self.rdb(), &copy).expect("copy the RDB snapshot");
        copy
    }

    /// Kills the server (SIGKILL) and starts it again on the same port from an
    /// older snapshot: the same epoch, versions gone back.
    pub fn restart_from(&mut self, snapshot: &Path) {
        self.kill();
        std::fs::copy(snapshot, self.rdb()).expect("put the snapshot in place");
        self.spawn(0);
    }

    /// Kills the server (SIGKILL) and starts it again on the same port with
    /// the same arguments, empty.
    pub fn restart_empty(&mut self) {
        self.kill();
        let _ = std::fs::remove_file(self.rdb());
        self.spawn(0);
    }

    /// `FLUSHALL`: every key gone, the server keeps running.
    pub fn flushall(&self) {
        let _: () = redis::cmd("FLUSHALL")
            .query(&mut self.connection())
            .expect("FLUSHALL");
    }

    /// Freezes (SIGSTOP) or thaws (SIGCONT) the server: it keeps its sockets
    /// open and answers nothing meanwhile.
    pub fn signal(&self, signal: &str) {
        let pid = self.child.as_ref().expect("running").id();
        let status = Command::new("kill")
            .args([signal, &pid.to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill {signal} {pid}");
    }

    /// Kills the server (SIGKILL): its data is gone.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}
