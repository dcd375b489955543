//! `redis-server` processes with arguments of the test's choosing (replicas,
//! sentinels, TLS, ACL users), each on a free loopback port, killed on drop.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// One `redis-server` (or sentinel) process.
pub struct RedisNode {
    pub port: u16,
    child: Option<Child>,
    args: Vec<String>,
    /// Sentinel mode: the config file it reads and rewrites.
    sentinel_conf: Option<(PathBuf, String)>,
    /// The password of the `default` user, for the test's own connections.
    admin_password: Option<String>,
    /// Its working directory (a master writes an RDB file there for a replica's sync).
    dir: tempfile::TempDir,
}

impl RedisNode {
    /// A server without persistence; `args` come after the port and bind address.
    pub fn start(args: &[&str], admin_password: Option<&str>) -> Self {
        let mut node = Self {
            port: super::unused_port(),
            child: None,
            args: args.iter().map(|s| (*s).to_owned()).collect(),
            sentinel_conf: None,
            admin_password: admin_password.map(str::to_owned),
            dir: tempfile::tempdir().unwrap(),
        };
        node.spawn(0);
        node
    }

    /// A replica of `master`.
    pub fn replica_of(master: &RedisNode) -> Self {
        Self::start(
            &["--replicaof", "127.0.0.1", &master.port.to_string()],
            None,
        )
    }

    /// A sentinel watching `master` as `name` (quorum 2, failure noticed after 1 s),
    /// with its config file in `dir`.
    pub fn sentinel(dir: &Path, name: &str, master: &RedisNode) -> Self {
        let path = dir.join(format!("sentinel-{}.conf", rand::random::<u32>()));
        let conf = format!(
            "sentinel monitor {name} 127.0.0.1 {port} 2\n\
             sentinel down-after-milliseconds {name} 1000\n\
             sentinel failover-timeout {name} 5000\n\
             sentinel parallel-syncs {name} 1\n",
            port = master.port
        );
        let mut node = Self {
            port: super::unused_port(),
            child: None,
            args: Vec::new(),
            sentinel_conf: Some((path, conf)),
            admin_password: None,
            dir: tempfile::tempdir().unwrap(),
        };
        node.spawn(0);
        node
    }

    /// Starts the process; `attempt` counts starts that found the port taken.
    fn spawn(&mut self, attempt: u32) {
        assert!(
            attempt < 5,
            "redis-server keeps exiting at start: check its arguments {:?}",
            self.args
        );
        let port = self.port.to_string();
        let mut command = Command::new("redis-server");
        if let Some((path, conf)) = &self.sentinel_conf {
            // A sentinel rewrites its file: a fresh one per start.
            std::fs::write(path, conf).unwrap();
            command.arg(path).arg("--sentinel");
        }
        command
            .args(["--port", &port, "--bind", "127.0.0.1"])
            .arg("--dir")
            .arg(self.dir.path())
            .args(if self.sentinel_conf.is_none() {
                &["--save", "", "--appendonly", "no"][..]
            } else {
                &[][..]
            })
            .args(&self.args)
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let child = command.spawn().unwrap_or_else(|e| {
            panic!("cannot start redis-server ({e}); run scripts/install-tools.sh")
        });
        let pid = child.id();
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            // The server answering must be ours, not another test's on a reused port.
            let info = redis::Client::open(self.admin_url())
                .and_then(|c| c.get_connection())
                .and_then(|mut c| redis::cmd("INFO").arg("server").query::<String>(&mut c));
            if let Ok(info) = info {
                let theirs = info
                    .lines()
                    .find_map(|l| l.strip_prefix("process_id:"))
                    .and_then(|p| p.trim().parse::<u32>().ok());
                if theirs == Some(pid) {
                    return;
                }
                self.kill();
                self.port = super::unused_port();
                return self.spawn(attempt + 1);
            }
            if let Some(Ok(Some(_))) = self.child.as_mut().map(|c| c.try_wait()) {
                self.port = super::unused_port();
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

    /// The plain-TCP URL with the `default` user's password, for the test itself.
    pub fn admin_url(&self) -> String {
        match &self.admin_password {
            Some(p) => format!("redis://:{p}@127.0.0.1:{}", self.port),
            None => format!("redis://127.0.0.1:{}", self.port),
        }
    }

    pub fn connection(&self) -> redis::Connection {
        redis::Client::open(self.admin_url())
            .unwrap()
            .get_connection()
            .unwrap()
    }

    /// Kills the process (SIGKILL): its data is gone.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same port with the same arguments, empty.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn(0);
    }
}

impl Drop for RedisNode {
    fn drop(&mut self) {
        self.kill();
    }
}
