//! A TCP proxy for fault tests, between the service and Redis on loopback: it
//! passes bytes through, or delays them, swallows them (blackhole), resets every
//! connection, or leaves connections half-open (the Redis side closed, the
//! service side kept open and silent).

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// What the proxy does to traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Bytes pass through.
    Pass,
    /// Every chunk waits this long before it is passed on.
    Latency(Duration),
    /// Connections stay open; nothing passes in either direction (held, as TCP
    /// holds unacknowledged bytes, and delivered when the fault is lifted).
    Blackhole,
    /// Every connection is reset (RST), new ones too.
    Reset,
    /// The Redis side is closed; the service side stays open and hears nothing.
    HalfOpen,
}

/// A running proxy; stops when dropped.
pub struct FaultProxy {
    pub addr: SocketAddr,
    fault: watch::Sender<Fault>,
    // Where new connections go (a failover moves it).
    target: std::sync::Arc<std::sync::Mutex<SocketAddr>>,
    task: tokio::task::JoinHandle<()>,
}

impl FaultProxy {
    /// Listens on 127.0.0.1:0 and forwards to `target`.
    pub async fn start(target: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (fault, rx) = watch::channel(Fault::Pass);
        let target = std::sync::Arc::new(std::sync::Mutex::new(target));
        let to = target.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    return;
                };
                let rx = rx.clone();
                let target = *to.lock().unwrap();
                tokio::spawn(connection(client, target, rx));
            }
        });
        Self {
            addr,
            fault,
            target,
            task,
        }
    }

    /// Sends new connections to `target` and resets the open ones: a failover
    /// as a client behind a virtual address sees it.
    pub async fn retarget(&self, target: SocketAddr) {
        *self.target.lock().unwrap() = target;
        self.set(Fault::Reset);
        // Every connection task sees the reset before traffic passes again.
        tokio::time::sleep(Duration::from_millis(50)).await;
        self.set(Fault::Pass);
    }

    /// A redis URL that goes through the proxy.
    pub fn url(&self) -> String {
        format!("redis://{}", self.addr)
    }

    pub fn set(&self, fault: Fault) {
        self.fault.send_replace(fault);
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn reset(stream: TcpStream) {
    // Linger 0: closing sends RST instead of FIN.
    #[allow(deprecated)]
    let _ = stream.set_linger(Some(Duration::ZERO));
    drop(stream);
}

async fn connection(client: TcpStream, target: SocketAddr, mut rx: watch::Receiver<Fault>) {
    if *rx.borrow() == Fault::Reset {
        reset(client);
        return;
    }
    let Ok(server) = TcpStream::connect(target).await else {
        reset(client);
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (mut cr, mut cw) = client.into_split();
    let (mut sr, mut sw) = server.into_split();
    let up = pump(&mut cr, &mut sw, rx.clone());
    let down = pump(&mut sr, &mut cw, rx.clone());
    let faulted = async {
        loop {
            if rx.changed().await.is_err() {
                return Fault::Pass;
            }
            let f = *rx.borrow();
            if matches!(f, Fault::Reset | Fault::HalfOpen) {
                return f;
            }
        }
    };
    tokio::select! {
        _ = up => {}
        _ = down => {}
        f = faulted => {
            let client = cr.reunite(cw).expect("halves of one stream");
            drop(sr);
            drop(sw);
            match f {
                Fault::Reset => reset(client),
                _ => {
                    // Half-open: hold the service side, read and drop what it
                    // sends, answer nothing, until the fault is lifted.
                    let mut client = client;
                    let mut buf = vec![0u8; 4096];
                    let mut rx = rx.clone();
                    loop {
                        tokio::select! {
                            n = client.read(&mut buf) => if matches!(n, Ok(0) | Err(_)) { return },
                            changed = rx.changed() => {
                                if changed.is_err() || *rx.borrow() != Fault::HalfOpen {
                                    reset(client);
                                    return;
                                }
                            }
                        }
                    }
                }
            }
        }
    }
}

/// Copies from `from` to `to`, applying the current fault to every chunk.
async fn pump<R, W>(from: &mut R, to: &mut W, rx: watch::Receiver<Fault>) -> std::io::Result<()>
where
    R: tokio::io::AsyncRead + Unpin,
    W: tokio::io::AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = from.read(&mut buf).await?;
        if n == 0 {
            return to.shutdown().await;
        }
        let mut rx = rx.clone();
        let fault = *rx.borrow_and_update();
        match fault {
            Fault::Blackhole => {
                let _ = rx.wait_for(|f| *f != Fault::Blackhole).await;
            }
            Fault::Latency(d) => tokio::time::sleep(d).await,
            _ => {}
        }
        to.write_all(&buf[..n]).await?;
    }
}
