//! Floods from a raw HTTP/2 client and idle sockets, for the tests and benches
//! of the limits (tests/hot_path_isolation.rs, benches/hot_path.rs).

use std::io::{BufRead as _, BufReader, Write as _};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};

use tokio::io::AsyncReadExt as _;

/// `h2_flood.py` (in this crate): streams without bodies, held open until `finish`.
pub struct Flood {
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: BufReader<ChildStdout>,
}

impl Flood {
    /// `streams` on each of `connections` to `method`, with a bearer token if
    /// given; `extra`: more options of the script.
    pub fn start(
        addr: SocketAddr,
        method: &str,
        token: Option<&str>,
        (streams, connections): (u32, u32),
        extra: &[&str],
    ) -> Self {
        const SERVICE: &str = "/comtrexx.licensing.v1.LicensingService/";
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("h2_flood.py");
        let token = token.map(|t| ["--token", t]);
        let mut child = Command::new("/usr/bin/python3")
            .arg(script)
            .arg(addr.ip().to_string())
            .arg(addr.port().to_string())
            .arg(format!("{SERVICE}{method}"))
            .args(["--streams", &streams.to_string()])
            .args(["--connections", &connections.to_string()])
            .args(token.iter().flatten())
            .args(extra)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("run /usr/bin/python3 (with python3-h2: scripts/install-tools.sh)");
        Self {
            stdin: child.stdin.take(),
            stdout: BufReader::new(child.stdout.take().unwrap()),
            child,
        }
    }

    /// The next JSON line the script prints.
    pub async fn line(&mut self) -> serde_json::Value {
        let mut line = String::new();
        let read = tokio::task::block_in_place(|| self.stdout.read_line(&mut line));
        assert!(
            matches!(read, Ok(1..)),
            "the flood script ended early: {read:?}"
        );
        serde_json::from_str(&line).unwrap()
    }

    /// Ends the flood: what the server did to its streams.
    pub async fn finish(mut self) -> serde_json::Value {
        let mut stdin = self.stdin.take().unwrap();
        let _ = stdin.flush();
        drop(stdin);
        let report = self.line().await;
        let _ = self.child.wait();
        report
    }
}

impl Drop for Flood {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A TCP connection from `source` (a loopback address) to `addr` that sends
/// nothing, and a task that says when the server closed it.
pub async fn idle_socket(source: &str, addr: SocketAddr) -> tokio::task::JoinHandle<()> {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(format!("{source}:0").parse().unwrap()).unwrap();
    let mut stream = socket.connect(addr).await.unwrap();
    tokio::spawn(async move {
        let mut buf = [0u8; 64];
        // Ends with EOF or a reset; a server that keeps it open keeps this waiting.
        while let Ok(1..) = stream.read(&mut buf).await {}
    })
}
