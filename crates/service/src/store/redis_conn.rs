//! How the Redis store reaches Redis: one server (`redis://`, `rediss://` with a CA
//! file, `unix://`) or the master a set of Sentinels names (`redis+sentinel://`),
//! with an ACL user and password, and optionally `WAIT` after every write.
//!
//! With Sentinel, the master's address is asked of the sentinels on every
//! (re)connect and never kept: a connection that fails, or that the old master
//! answers with `READONLY` after a failover, is dropped, and the next call asks the
//! sentinels again (redis-rs also checks with `ROLE` that the node it names is a
//! master). Sentinel itself disconnects the clients of a node it reconfigures.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use redis::aio::{
    ConnectionLike, ConnectionManager, ConnectionManagerConfig, MultiplexedConnection,
};
use redis::sentinel::{SentinelClient, SentinelClientBuilder, SentinelServerType};
use redis::{
    AsyncConnectionConfig, Client, Cmd, ConnectionAddr, ErrorKind, IntoConnectionInfo, RedisError,
    RedisFuture, RedisResult, TlsCertificates, Value,
};
use tokio::sync::Mutex as AsyncMutex;

/// Redis connection settings.
#[derive(Clone)]
pub struct RedisConfig {
    /// `redis_url` as configured (for display: redact it).
    pub url: String,
    pub target: RedisTarget,
    /// ACL user and password, for Redis and (with Sentinel) the sentinels alike.
    pub username: Option<String>,
    pub password: Option<String>,
    /// PEM CA bundle for `rediss://`; `None`: the system's roots.
    pub tls_ca: Option<Vec<u8>>,
    pub timeout: Duration,
    /// `WAIT` after every write; `None`: acknowledged once the master has it.
    pub wait: Option<WaitPolicy>,
}

/// The `redis_*` keys as configured: the files they name are not read yet
/// (`app` reads them into `connection.password` and `connection.tls_ca`).
#[derive(Debug, Clone)]
pub struct RedisOptions {
    /// Everything but what the files hold.
    pub connection: RedisConfig,
    /// `redis_password_file`: the password, on one line.
    pub password_file: Option<PathBuf>,
    /// `redis_tls_ca_file`: a PEM CA bundle for `rediss://`.
    pub tls_ca_file: Option<PathBuf>,
}

impl std::fmt::Debug for RedisConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisConfig")
            .field("url", &redact_url(&self.url))
            .field("target", &self.target)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "***"))
            .field("tls_ca", &self.tls_ca.is_some())
            .field("timeout", &self.timeout)
            .field("wait", &self.wait)
            .finish()
    }
}

/// Hides the password of a redis URL for logs and the overview.
pub fn redact_url(url: &str) -> String {
    match url.split_once("://") {
        Some((scheme, rest)) => match rest.rsplit_once('@') {
            Some((_, host)) => format!("{scheme}://***@{host}"),
            None => url.to_owned(),
        },
        None => url.to_owned(),
    }
}

/// Where Redis is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RedisTarget {
    /// One server: `redis://`, `rediss://` or `unix://` (credentials removed).
    Direct { url: String },
    /// `redis+sentinel://`: the sentinels to ask for the master of `master_name`.
    Sentinel {
        sentinels: Vec<(String, u16)>,
        master_name: String,
    },
}

/// A write is acknowledged once `replicas` replicas confirm it within `timeout`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WaitPolicy {
    pub replicas: u32,
    pub timeout: Duration,
}

/// Where the master is: a fixed client, or the sentinels to ask.
#[derive(Clone)]
pub enum Target {
    Direct(Box<Client>),
    Sentinel(Arc<AsyncMutex<SentinelClient>>),
}

impl Target {
    /// The target of a validated configuration; connects to nothing yet.
    pub fn new(config: &RedisConfig) -> RedisResult<Self> {
        match &config.target {
            RedisTarget::Direct { url } => {
                let info = url.as_str().into_connection_info()?;
                // No CLIENT SETINFO: one command fewer for the ACL user to need.
                let mut settings = info.redis_settings().clone().set_skip_set_lib_name();
                if let Some(user) = &config.username {
                    settings = settings.set_username(user);
                }
                if let Some(password) = &config.password {
                    settings = settings.set_password(password);
                }
                let info = info.set_redis_settings(settings);
                let client = match &config.tls_ca {
                    Some(pem) => Client::build_with_tls(
                        info,
                        TlsCertificates {
                            client_tls: None,
                            root_cert: Some(pem.clone()),
                        },
                    )?,
                    None => Client::open(info)?,
                };
                Ok(Self::Direct(Box::new(client)))
            }
            RedisTarget::Sentinel {
                sentinels,
                master_name,
            } => {
                let nodes = sentinels
                    .iter()
                    .map(|(host, port)| ConnectionAddr::Tcp(host.clone(), *port));
                let mut builder =
                    SentinelClientBuilder::new(nodes, master_name, SentinelServerType::Master)?;
                if let Some(user) = &config.username {
                    builder = builder
                        .set_client_to_redis_username(user)
                        .set_client_to_sentinel_username(user);
                }
                if let Some(password) = &config.password {
                    builder = builder
                        .set_client_to_redis_password(password)
                        .set_client_to_sentinel_password(password);
                }
                Ok(Self::Sentinel(Arc::new(AsyncMutex::new(builder.build()?))))
            }
        }
    }

    /// A client of the master: for Sentinel, asked of the sentinels now.
    pub async fn master(&self) -> RedisResult<Client> {
        match self {
            Self::Direct(client) => Ok(client.as_ref().clone()),
            Self::Sentinel(sentinel) => {
                let found = sentinel.lock().await.async_get_client().await;
                crate::metrics::metrics().redis_master_lookup(found.is_ok());
                found
            }
        }
    }

    /// A new connection to the master (for the blocking feed read).
    pub async fn connect(
        &self,
        config: &AsyncConnectionConfig,
    ) -> RedisResult<MultiplexedConnection> {
        self.master()
            .await?
            .get_multiplexed_async_connection_with_config(config)
            .await
    }
}

/// A multiplexed connection to the master that reconnects by itself; cheap to
/// clone (clones share the connection). With a [`WaitPolicy`], every script call
/// is followed by `WAIT` on the same connection, and fails when fewer replicas
/// confirm it than required.
#[derive(Clone)]
pub struct RedisConn {
    link: Link,
    wait: Option<WaitPolicy>,
}

#[derive(Clone)]
enum Link {
    Direct(ConnectionManager),
    Sentinel(Arc<MasterSlot>),
}

/// The connection to the master a sentinel named, made on first use and dropped
/// after a connection-level failure.
struct MasterSlot {
    target: Target,
    config: AsyncConnectionConfig,
    // The connection and its generation, so a failure drops only the connection it
    // happened on, never a newer one.
    current: AsyncMutex<Option<(u64, MultiplexedConnection)>>,
    generation: AtomicU64,
}

impl MasterSlot {
    async fn get(&self) -> RedisResult<(u64, MultiplexedConnection)> {
        let mut current = self.current.lock().await;
        if let Some((generation, conn)) = current.as_ref() {
            return Ok((*generation, conn.clone()));
        }
        let conn = self.target.connect(&self.config).await?;
        let generation = self.generation.fetch_add(1, Ordering::Relaxed) + 1;
        *current = Some((generation, conn.clone()));
        Ok((generation, conn))
    }

    /// Drops the connection of `generation` when its answer shows it is no good
    /// for writes any more: the next call asks the sentinels again.
    async fn check(&self, generation: u64, answer: Result<&[Value], &RedisError>) {
        let broken = match answer {
            Err(e) => must_reconnect(e),
            Ok(values) => values.iter().any(|v| match v {
                Value::ServerError(e) => must_reconnect(&e.clone().into()),
                _ => false,
            }),
        };
        if !broken {
            return;
        }
        let mut current = self.current.lock().await;
        if current.as_ref().is_some_and(|(g, _)| *g == generation) {
            *current = None;
        }
    }
}

/// Whether an error means "this connection is no good for writes": broken, timed
/// out, or a node that is (no longer) the master.
fn must_reconnect(e: &RedisError) -> bool {
    e.is_io_error()
        || e.is_connection_dropped()
        || e.is_unrecoverable_error()
        || e.is_timeout()
        || matches!(e.code(), Some("READONLY" | "MASTERDOWN" | "UNBLOCKED" | "LOADING"))
        // A write refused inside a script on a replica.
        || e.to_string().contains("READONLY")
}

impl RedisConn {
    /// A connection to `target`; every call answers within `timeout` (plus the
    /// `WAIT` time when there is a policy).
    pub fn new(target: &Target, timeout: Duration, wait: Option<WaitPolicy>) -> RedisResult<Self> {
        let response = timeout + wait.map_or(Duration::ZERO, |w| w.timeout);
        let link = match target {
            Target::Direct(client) => {
                let config = ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(timeout))
                    .set_response_timeout(Some(response))
                    .set_number_of_retries(1)
                    .set_max_delay(Duration::from_secs(2));
                Link::Direct(ConnectionManager::new_lazy_with_config(
                    client.as_ref().clone(),
                    config,
                )?)
            }
            Target::Sentinel(_) => Link::Sentinel(Arc::new(MasterSlot {
                target: target.clone(),
                config: AsyncConnectionConfig::new()
                    .set_connection_timeout(Some(timeout))
                    .set_response_timeout(Some(response)),
                current: AsyncMutex::new(None),
                generation: AtomicU64::new(0),
            })),
        };
        Ok(Self { link, wait })
    }

    async fn send(&mut self, cmd: &Cmd) -> RedisResult<Value> {
        let wait = self.wait.filter(|_| is_script_call(cmd));
        match &mut self.link {
            Link::Direct(conn) => send_on(conn, cmd, wait).await,
            Link::Sentinel(slot) => {
                let (generation, mut conn) = slot.get().await?;
                let result = send_on(&mut conn, cmd, wait).await;
                slot.check(generation, result.as_ref().map(std::slice::from_ref))
                    .await;
                result
            }
        }
    }
}

/// How many connections writes with `WAIT` use in turn.
const WAITING_WRITERS: usize = 4;

/// The connections writes go through: without `WAIT` the shared one; with `WAIT` a
/// few of their own, used in turn. Redis blocks a waiting client's connection until
/// its replicas confirm, so reads never queue behind a waiting write, and several
/// writes wait side by side.
pub struct Writers {
    conns: Vec<RedisConn>,
    next: AtomicUsize,
}

impl Writers {
    pub fn new(
        target: &Target,
        shared: &RedisConn,
        timeout: Duration,
        wait: Option<WaitPolicy>,
    ) -> RedisResult<Self> {
        let conns = match wait {
            None => vec![shared.clone()],
            Some(wait) => (0..WAITING_WRITERS)
                .map(|_| RedisConn::new(target, timeout, Some(wait)))
                .collect::<RedisResult<_>>()?,
        };
        Ok(Self {
            conns,
            next: AtomicUsize::new(0),
        })
    }

    /// The connection for the next write.
    pub fn pick(&self) -> RedisConn {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        self.conns[n % self.conns.len()].clone()
    }
}

/// Whether a command runs a script (the store's writes are scripts).
fn is_script_call(cmd: &Cmd) -> bool {
    matches!(cmd.args_iter().next(), Some(redis::Arg::Simple(name))
        if name.eq_ignore_ascii_case(b"EVALSHA") || name.eq_ignore_ascii_case(b"EVAL"))
}

/// Sends `cmd`, followed on the same connection by `WAIT` when there is a policy:
/// its answer counts only once enough replicas confirm.
async fn send_on(
    conn: &mut impl ConnectionLike,
    cmd: &Cmd,
    wait: Option<WaitPolicy>,
) -> RedisResult<Value> {
    let Some(wait) = wait else {
        return conn.req_packed_command(cmd).await;
    };
    let millis = u64::try_from(wait.timeout.as_millis()).unwrap_or(u64::MAX);
    let mut pipe = redis::pipe();
    pipe.add_command(cmd.clone())
        .cmd("WAIT")
        .arg(wait.replicas)
        .arg(millis);
    let mut replies = conn.req_packed_commands(&pipe, 0, 2).await?.into_iter();
    let (reply, confirmed) = (replies.next(), replies.next());
    let reply = match reply {
        Some(Value::ServerError(e)) => return Err(e.into()),
        Some(reply) => reply,
        None => return Err((ErrorKind::Parse, "no reply to the write").into()),
    };
    let confirmed: i64 = match confirmed {
        Some(v) => redis::from_redis_value(v)?,
        None => return Err((ErrorKind::Parse, "no reply to WAIT").into()),
    };
    if confirmed < i64::from(wait.replicas) {
        crate::metrics::metrics().redis_unconfirmed_write();
        return Err(RedisError::from((
            ErrorKind::Client,
            "write not confirmed by enough replicas; outcome unknown, safe to retry",
            format!(
                "WAIT: {confirmed} of {} replicas within {millis} ms",
                wait.replicas
            ),
        )));
    }
    Ok(reply)
}

impl ConnectionLike for RedisConn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        Box::pin(self.send(cmd))
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        Box::pin(async move {
            match &mut self.link {
                Link::Direct(conn) => conn.req_packed_commands(pipeline, offset, count).await,
                Link::Sentinel(slot) => {
                    let (generation, mut conn) = slot.get().await?;
                    let result = conn.req_packed_commands(pipeline, offset, count).await;
                    slot.check(generation, result.as_deref()).await;
                    result
                }
            }
        })
    }

    fn get_db(&self) -> i64 {
        match &self.link {
            Link::Direct(conn) => conn.get_db(),
            Link::Sentinel(_) => 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scripts_are_recognised() {
        assert!(is_script_call(redis::cmd("EVALSHA").arg("abc").arg(0)));
        assert!(is_script_call(redis::cmd("evalsha").arg("abc").arg(0)));
        assert!(!is_script_call(redis::cmd("MGET").arg("a")));
        assert!(!is_script_call(
            redis::cmd("SCRIPT").arg("LOAD").arg("return 1")
        ));
    }

    #[test]
    fn failover_errors_reconnect() {
        let readonly = RedisError::from((
            ErrorKind::Server(redis::ServerErrorKind::ReadOnly),
            "You can't write against a read only replica.",
        ));
        assert!(must_reconnect(&readonly));
        let io = RedisError::from(std::io::Error::from(std::io::ErrorKind::ConnectionReset));
        assert!(must_reconnect(&io));
        let script = RedisError::from((
            ErrorKind::Server(redis::ServerErrorKind::NoScript),
            "No matching script",
        ));
        assert!(!must_reconnect(&script));
    }
}
