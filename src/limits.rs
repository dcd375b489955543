//! Request limits and load protection: what one caller, or one burst, may cost
//! the others.
//!
//! - **Budgets per class of RPC** ([`shed`]): the hot path (`CheckSeat`),
//!   writes and operator reads each have their own concurrency budget. A call
//!   whose class is full is refused at once (no queue) with `UNAVAILABLE`
//!   (`OVERLOADED`, safe to retry: nothing was done), so a burst of writes or
//!   overview calls never takes `CheckSeat`'s capacity.
//! - **A server-side deadline** per call ([`deadline`]); a client's shorter
//!   `grpc-timeout` still wins. A stream is bounded only until it is opened.
//! - **A message size limit** (tonic's, answered as `RESOURCE_EXHAUSTED`: [`message_size`]).
//! - **A maximum connection age** (HTTP/2 `GOAWAY` from tonic) and its grace, after
//!   which a connection still open is closed ([`AgedConnection`]), so clients
//!   reconnect and spread over the replicas.
//! - **Per caller** ([`Guards`]): `WatchLicenseEvents` streams capped, ended with
//!   `UNAVAILABLE` when the server drains; `CreateInitializationCode` and
//!   `ApplyActivation` rate-limited by a token bucket.
//!
//! A caller is the authenticated [`Caller`] where the authorization layer set
//! one, else the peer's IP address. Every refusal is counted
//! (`licensing_rpc_refused_total`) and recorded in the audit trail: by the
//! layers here for calls refused before their handler runs (shed, over-size,
//! past the deadline), by the handler's own audit for the per-caller guards.

use std::borrow::Cow;
use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Buf as _;
use futures::future::BoxFuture;
use parking_lot::Mutex;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{Semaphore, watch};
use tonic::codegen::{Body as HttpBody, http};
use tonic::transport::server::{Connected, TcpConnectInfo, TlsConnectInfo};

use crate::audit::Auditor;
use crate::auth::Caller;
use crate::auth::tls::Peer;
use crate::domain::audit::{AuditEvent, MAX_DETAIL_LEN};
use crate::grpc::handlers::code_label;
use crate::grpc::status::refusal_status;
use crate::metrics::metrics;

/// The validated `limits.*` configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Largest request message accepted; larger ones get `RESOURCE_EXHAUSTED`.
    pub max_message_bytes: usize,
    /// Server-side deadline of one call (a stream: until it is opened).
    pub rpc_deadline: Duration,
    /// HTTP/2 PING period, to notice peers that vanished.
    pub keepalive_interval: Duration,
    /// How long a PING may stay unanswered before the connection is closed.
    pub keepalive_timeout: Duration,
    /// After this, a connection gets `GOAWAY` and its client reconnects.
    pub max_connection_age: Duration,
    /// After `max_connection_age` plus this, a connection still open is closed.
    pub max_connection_age_grace: Duration,
    /// Concurrent calls per class of RPC.
    pub budgets: Budgets,
    /// `WatchLicenseEvents` streams one caller may hold open.
    pub watch_subscribers_per_caller: usize,
    /// Token bucket of `CreateInitializationCode` and `ApplyActivation` (each its
    /// own, per caller): refill per minute and burst.
    pub activation_per_minute: u32,
    pub activation_burst: u32,
}

/// Concurrent calls allowed per [`RpcClass`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Budgets {
    pub hot_path: usize,
    pub writes: usize,
    pub operator_reads: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_message_bytes: 64 * 1024,
            rpc_deadline: Duration::from_secs(30),
            keepalive_interval: Duration::from_secs(30),
            keepalive_timeout: Duration::from_secs(10),
            max_connection_age: Duration::from_secs(600),
            max_connection_age_grace: Duration::from_secs(30),
            budgets: Budgets {
                hot_path: 1024,
                writes: 64,
                operator_reads: 16,
            },
            watch_subscribers_per_caller: 8,
            activation_per_minute: 6,
            activation_burst: 3,
        }
    }
}

/// Which budget a call draws from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RpcClass {
    /// Answered from memory for call handling; must keep answering under load.
    HotPath,
    /// Goes to the store (or the licensing server) and changes state.
    Writes,
    /// Operator and monitoring reads (overview, seat lists): may be heavy.
    OperatorReads,
}

impl RpcClass {
    pub fn as_str(self) -> &'static str {
        match self {
            RpcClass::HotPath => "hot_path",
            RpcClass::Writes => "writes",
            RpcClass::OperatorReads => "operator_reads",
        }
    }
}

/// The gRPC path prefix of the licensing service.
const SERVICE_PREFIX: &str = "/comtrexx.licensing.v1.LicensingService/";

/// The class of each method, as data. `None`: no concurrency budget
/// (`WatchLicenseEvents` is capped per caller instead). A method of the service
/// missing here counts as an operator read.
pub const CLASSES: [(&str, Option<RpcClass>); 15] = [
    ("CheckSeat", Some(RpcClass::HotPath)),
    ("GetTryoutStatus", Some(RpcClass::HotPath)),
    ("AssignSeat", Some(RpcClass::Writes)),
    ("ReleaseSeat", Some(RpcClass::Writes)),
    ("StartTryout", Some(RpcClass::Writes)),
    ("EndTryout", Some(RpcClass::Writes)),
    ("Reconcile", Some(RpcClass::Writes)),
    ("CreateInitializationCode", Some(RpcClass::Writes)),
    ("ApplyActivation", Some(RpcClass::Writes)),
    ("ResetActivation", Some(RpcClass::Writes)),
    ("ActivateOnline", Some(RpcClass::Writes)),
    ("GetLicenseOverview", Some(RpcClass::OperatorReads)),
    ("ListSeats", Some(RpcClass::OperatorReads)),
    ("ListAuditEvents", Some(RpcClass::OperatorReads)),
    ("WatchLicenseEvents", None),
];

/// The method name and class of a request path; `None` for other services
/// (health, reflection) and unbudgeted methods.
pub fn classify(path: &str) -> Option<(&str, RpcClass)> {
    let method = path.strip_prefix(SERVICE_PREFIX)?;
    match CLASSES.iter().find(|(m, _)| *m == method) {
        Some((_, class)) => class.map(|c| (method, c)),
        None => Some((method, RpcClass::OperatorReads)),
    }
}

/// Why a call was refused before (or instead of) doing its work.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("server busy: too many concurrent {} calls; nothing was done, retry with backoff", class.as_str())]
    Overloaded { class: RpcClass },
    #[error("rate limited; retry in {} ms", retry_after.as_millis())]
    RateLimited { retry_after: Duration },
    #[error("too many WatchLicenseEvents streams for this caller (at most {limit})")]
    TooManySubscribers { limit: usize },
    #[error("shutting down, reconnect")]
    ShuttingDown,
    #[error("deadline of {} ms passed", deadline.as_millis())]
    DeadlineExceeded { deadline: Duration },
    #[error("request message larger than {limit} bytes")]
    MessageTooLarge { limit: usize },
}

impl Refusal {
    /// The word metrics and the audit log use.
    pub fn reason(&self) -> &'static str {
        match self {
            Refusal::Overloaded { .. } => "overloaded",
            Refusal::RateLimited { .. } => "rate_limited",
            Refusal::TooManySubscribers { .. } => "too_many_subscribers",
            Refusal::ShuttingDown => "shutting_down",
            Refusal::DeadlineExceeded { .. } => "deadline_exceeded",
            Refusal::MessageTooLarge { .. } => "message_too_large",
        }
    }
}

/// Who is calling, for per-caller limits and the audit log: the authenticated
/// caller's name, else the peer's IP address (all ports of one host are one
/// caller), else `unknown`. The names the authorization layer gives callers
/// without credentials (`loopback`, `anonymous`) are no identity: those are
/// keyed by their address too, so they do not share one budget.
pub fn caller_key(caller: Option<&Caller>, peer: Option<SocketAddr>) -> String {
    let identified = caller.filter(|c| !matches!(c.name.as_str(), "loopback" | "anonymous"));
    match (identified, peer) {
        (Some(c), _) => format!("caller:{}", c.name),
        (None, Some(addr)) => format!("peer:{}", addr.ip()),
        (None, None) => "unknown".to_owned(),
    }
}

/// The peer address of a request, as the acceptor (`auth::tls::incoming`) or
/// tonic's own TCP/TLS listener recorded it.
fn peer_addr(ext: &http::Extensions) -> Option<SocketAddr> {
    ext.get::<Peer>()
        .and_then(|p| p.addr)
        .or_else(|| {
            ext.get::<TcpConnectInfo>()
                .and_then(TcpConnectInfo::remote_addr)
        })
        .or_else(|| {
            ext.get::<TlsConnectInfo<TcpConnectInfo>>()
                .and_then(|i| i.get_ref().remote_addr())
        })
}

/// The caller of a tonic request.
pub fn caller_of<T>(request: &tonic::Request<T>) -> String {
    caller_key(Caller::of(request), peer_addr(request.extensions()))
}

/// Counts a call a handler refuses; its audit entry is the handler's.
fn count_refused(method: &str, refusal: &Refusal) {
    metrics().refused(method, refusal.reason());
}

/// What the audit entry of a call refused by a layer says about the call,
/// taken from the request before it goes on (the refusal may come later).
/// Cheap to take on every call: the strings are made only for a refusal.
struct RefusedCall {
    method: Cow<'static, str>,
    caller: Option<Caller>,
    peer: Option<SocketAddr>,
    traceparent: Option<http::HeaderValue>,
}

impl RefusedCall {
    fn of<B>(method: &str, request: &http::Request<B>) -> Self {
        let ext = request.extensions();
        Self {
            method: match crate::auth::policy::rule_of(method) {
                Some(rule) => Cow::Borrowed(rule.method),
                None => Cow::Owned(method.to_owned()),
            },
            caller: ext.get::<Caller>().cloned(),
            peer: peer_addr(ext),
            traceparent: request.headers().get("traceparent").cloned(),
        }
    }

    /// Counts the refusal and records it in the audit trail.
    fn record(self, audit: &Auditor, refusal: &Refusal) {
        metrics().refused(&self.method, refusal.reason());
        let code = refusal_status(refusal).code();
        audit.record_refusal(AuditEvent {
            time: audit.now(),
            caller: match &self.caller {
                Some(c) => c.name.clone(),
                None => caller_key(None, self.peer),
            },
            role: self
                .caller
                .as_ref()
                .map(|c| c.role.to_string())
                .unwrap_or_default(),
            method: AuditEvent::bounded(&self.method, 128),
            user_id: String::new(),
            feature: String::new(),
            code: code_label(code).to_owned(),
            detail: AuditEvent::bounded(&refusal.to_string(), MAX_DETAIL_LEN),
            trace_id: self
                .traceparent
                .as_ref()
                .and_then(|v| v.to_str().ok())
                .and_then(crate::telemetry::traceparent_trace_id)
                .unwrap_or_default(),
        });
    }
}

type HttpResponse = http::Response<tonic::body::Body>;

/// The answer of a limit to one call.
type Answer<E> = BoxFuture<'static, Result<HttpResponse, E>>;

/// What one limit of the tower stack does with a call: answer it itself, or
/// pass it to `inner` (and perhaps look at the answer).
pub trait Policy: Clone {
    fn call<S, B>(&self, inner: &mut S, request: http::Request<B>) -> Answer<S::Error>
    where
        S: tower::Service<http::Request<B>, Response = HttpResponse>,
        S::Future: Send + 'static,
        S::Error: Send + 'static,
        B: HttpBody + Send + 'static;
}

/// A tower layer applying one [`Policy`] to every call.
#[derive(Debug, Clone)]
pub struct LimitLayer<P>(P);

impl<S, P: Policy> tower::Layer<S> for LimitLayer<P> {
    type Service = Limited<S, P>;

    fn layer(&self, inner: S) -> Limited<S, P> {
        Limited {
            inner,
            policy: self.0.clone(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Limited<S, P> {
    inner: S,
    policy: P,
}

impl<S, B, P> tower::Service<http::Request<B>> for Limited<S, P>
where
    S: tower::Service<http::Request<B>, Response = HttpResponse>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    B: HttpBody + Send + 'static,
    P: Policy,
{
    type Response = HttpResponse;
    type Error = S::Error;
    type Future = Answer<S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        self.policy.call(&mut self.inner, request)
    }
}

/// Sheds a call at once when its class is at its budget.
#[derive(Clone)]
pub struct Shed {
    // One semaphore per `RpcClass`, in its order.
    semaphores: Arc<[Arc<Semaphore>; 3]>,
    // Most bytes of a shed request read before answering (see `drain`).
    drain_limit: usize,
    audit: Auditor,
}

/// Budgets per class of RPC: a call whose class is full is refused at once
/// with `UNAVAILABLE` (`OVERLOADED`).
pub fn shed(budgets: Budgets, max_message_bytes: usize, audit: Auditor) -> LimitLayer<Shed> {
    LimitLayer(Shed {
        audit,
        drain_limit: max_message_bytes + GRPC_FRAME_HEADER,
        semaphores: Arc::new([
            Arc::new(Semaphore::new(budgets.hot_path)),
            Arc::new(Semaphore::new(budgets.writes)),
            Arc::new(Semaphore::new(budgets.operator_reads)),
        ]),
    })
}

impl Policy for Shed {
    fn call<S, B>(&self, inner: &mut S, request: http::Request<B>) -> Answer<S::Error>
    where
        S: tower::Service<http::Request<B>, Response = HttpResponse>,
        S::Future: Send + 'static,
        S::Error: Send + 'static,
        B: HttpBody + Send + 'static,
    {
        let Some((method, class)) = classify(request.uri().path()) else {
            return Box::pin(inner.call(request));
        };
        match self.semaphores[class as usize].clone().try_acquire_owned() {
            Ok(permit) => {
                let call = inner.call(request);
                Box::pin(async move {
                    let response = call.await;
                    drop(permit);
                    response
                })
            }
            Err(_) => {
                let refusal = Refusal::Overloaded { class };
                RefusedCall::of(method, &request).record(&self.audit, &refusal);
                let response = refusal_status(&refusal).into_http();
                let limit = self.drain_limit;
                Box::pin(async move {
                    drain(request.into_body(), limit).await;
                    Ok(response)
                })
            }
        }
    }
}

/// The 5-byte prefix of a gRPC message (compression flag, length).
const GRPC_FRAME_HEADER: usize = 5;

/// How long a shed request's body is read at most before the answer goes out.
const DRAIN_WAIT: Duration = Duration::from_millis(200);

/// Reads a request body to its end (at most `limit` bytes, at most
/// `DRAIN_WAIT`) and discards it. Answering while the client is still sending
/// makes HTTP/2 reset the stream, and hyper closes a connection whose peer
/// causes many resets (its guard against reset floods): without this, a
/// client whose calls are shed by the thousand loses its connection
/// (seen in the burst row of the bench).
async fn drain<B: HttpBody>(body: B, limit: usize) {
    let mut body = std::pin::pin!(body);
    let mut read = 0;
    let _ = tokio::time::timeout(DRAIN_WAIT, async {
        while read <= limit {
            match std::future::poll_fn(|cx| body.as_mut().poll_frame(cx)).await {
                Some(Ok(frame)) => read += frame.data_ref().map_or(0, |d| d.remaining()),
                _ => return,
            }
        }
    })
    .await;
}

/// Ends a call that has not answered within its deadline with
/// `DEADLINE_EXCEEDED`: the server-side deadline, or the client's
/// `grpc-timeout` when shorter. A stream's response is its opening, so the
/// deadline never cuts an open `WatchLicenseEvents`.
#[derive(Clone)]
pub struct Deadline {
    deadline: Duration,
    audit: Auditor,
}

pub fn deadline(deadline: Duration, audit: Auditor) -> LimitLayer<Deadline> {
    LimitLayer(Deadline { deadline, audit })
}

impl Policy for Deadline {
    fn call<S, B>(&self, inner: &mut S, request: http::Request<B>) -> Answer<S::Error>
    where
        S: tower::Service<http::Request<B>, Response = HttpResponse>,
        S::Future: Send + 'static,
        S::Error: Send + 'static,
        B: HttpBody + Send + 'static,
    {
        let deadline = match client_timeout(request.headers()) {
            Some(client) => client.min(self.deadline),
            None => self.deadline,
        };
        // The handler, and with it its own audit entry, is dropped when the
        // deadline passes: the entry of a call cut off is written here.
        let call_info = request
            .uri()
            .path()
            .strip_prefix(SERVICE_PREFIX)
            .map(|method| RefusedCall::of(method, &request));
        let audit = self.audit.clone();
        let call = inner.call(request);
        Box::pin(async move {
            match tokio::time::timeout(deadline, call).await {
                Ok(response) => response,
                Err(_) => {
                    let refusal = Refusal::DeadlineExceeded { deadline };
                    if let Some(call_info) = call_info {
                        call_info.record(&audit, &refusal);
                    }
                    Ok(refusal_status(&refusal).into_http())
                }
            }
        })
    }
}

/// The client's deadline from its `grpc-timeout` header (`1-8 digits` and a
/// unit: `H`, `M`, `S`, `m`, `u`, `n`); `None` when absent or malformed.
fn client_timeout(headers: &http::HeaderMap) -> Option<Duration> {
    let value = headers.get("grpc-timeout")?.to_str().ok()?;
    let (digits, unit) = value.split_at(value.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// Answers a request over the message size limit with `RESOURCE_EXHAUSTED`
/// (`MESSAGE_TOO_LARGE`), as the gRPC status code table asks. tonic refuses it
/// before decoding, but as `OUT_OF_RANGE`, a code this service uses nowhere else.
#[derive(Clone)]
pub struct MessageSize {
    limit: usize,
    audit: Auditor,
}

pub fn message_size(limit: usize, audit: Auditor) -> LimitLayer<MessageSize> {
    LimitLayer(MessageSize { limit, audit })
}

/// `grpc-status` of `OUT_OF_RANGE`.
const GRPC_OUT_OF_RANGE: &[u8] = b"11";

impl Policy for MessageSize {
    fn call<S, B>(&self, inner: &mut S, request: http::Request<B>) -> Answer<S::Error>
    where
        S: tower::Service<http::Request<B>, Response = HttpResponse>,
        S::Future: Send + 'static,
        S::Error: Send + 'static,
        B: HttpBody + Send + 'static,
    {
        let Some(method) = request.uri().path().strip_prefix(SERVICE_PREFIX) else {
            return Box::pin(inner.call(request));
        };
        let call_info = RefusedCall::of(method, &request);
        let audit = self.audit.clone();
        let limit = self.limit;
        let call = inner.call(request);
        Box::pin(async move {
            let response = call.await?;
            // A request refused while decoding is answered with headers only.
            if response.headers().get("grpc-status").map(|v| v.as_bytes())
                != Some(GRPC_OUT_OF_RANGE)
            {
                return Ok(response);
            }
            let refusal = Refusal::MessageTooLarge { limit };
            call_info.record(&audit, &refusal);
            Ok(refusal_status(&refusal).into_http())
        })
    }
}

/// A connection that is closed once its age passes `max_connection_age` plus
/// the grace. tonic sends `GOAWAY` at `max_connection_age` (new calls go to a new
/// connection, possibly to another replica) but never closes a connection whose
/// streams stay open; this ends them, so every connection is gone by then.
pub struct AgedConnection<T> {
    inner: T,
    // Fires at the end of the grace; boxed so the wrapper stays `Unpin`.
    closes_at: Pin<Box<tokio::time::Sleep>>,
}

impl<T> AgedConnection<T> {
    pub fn new(inner: T, lifetime: Duration) -> Self {
        Self {
            inner,
            closes_at: Box::pin(tokio::time::sleep(lifetime)),
        }
    }

    /// Once the lifetime has passed, every read and write fails, and hyper
    /// closes the connection.
    fn expired(&mut self, cx: &mut Context<'_>) -> Option<io::Error> {
        self.closes_at.as_mut().poll(cx).is_ready().then(|| {
            io::Error::new(
                io::ErrorKind::TimedOut,
                "maximum connection age and grace passed",
            )
        })
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for AgedConnection<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let Some(e) = this.expired(cx) {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for AgedConnection<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if let Some(e) = this.expired(cx) {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut this.inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

impl<T: Connected> Connected for AgedConnection<T> {
    // The inner connection's info, so `Request::remote_addr` keeps working.
    type ConnectInfo = T::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

/// A token bucket: `burst` calls at once, then one per `1 / rate` seconds.
#[derive(Debug, Clone, Copy)]
struct TokenBucket {
    tokens: f64,
    updated: Instant,
}

impl TokenBucket {
    fn full(burst: u32, now: Instant) -> Self {
        Self {
            tokens: f64::from(burst),
            updated: now,
        }
    }

    /// Takes a token, or says how long until one is there.
    fn take(&mut self, now: Instant, per_second: f64, burst: u32) -> Result<(), Duration> {
        let elapsed = now.saturating_duration_since(self.updated).as_secs_f64();
        self.tokens = (self.tokens + elapsed * per_second).min(f64::from(burst));
        self.updated = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - self.tokens) / per_second))
        }
    }
}

/// Past this many buckets, idle (full) ones are forgotten, so peers cycling
/// through addresses cannot grow the map without bound.
const MAX_IDLE_BUCKETS: usize = 4096;

/// A replica's per-caller limits and its drain signal, shared by the handlers.
#[derive(Debug)]
pub struct Guards {
    watch_limit: usize,
    /// Open `WatchLicenseEvents` streams per caller.
    watchers: Mutex<HashMap<String, usize>>,
    per_second: f64,
    burst: u32,
    /// Token buckets by (method, caller).
    buckets: Mutex<HashMap<(&'static str, String), TokenBucket>>,
    /// Becomes `true` when the server starts draining.
    draining: watch::Receiver<bool>,
}

impl Guards {
    pub fn new(limits: &Limits, draining: watch::Receiver<bool>) -> Arc<Self> {
        Arc::new(Self {
            watch_limit: limits.watch_subscribers_per_caller,
            watchers: Mutex::new(HashMap::new()),
            per_second: f64::from(limits.activation_per_minute) / 60.0,
            burst: limits.activation_burst,
            buckets: Mutex::new(HashMap::new()),
            draining,
        })
    }

    /// Takes a token of `method`'s bucket for the request's caller; refusals
    /// are counted and audited here.
    pub fn rate_limit<T>(
        &self,
        method: &'static str,
        request: &tonic::Request<T>,
    ) -> Result<(), Refusal> {
        let caller = caller_of(request);
        let now = Instant::now();
        let outcome = {
            let mut buckets = self.buckets.lock();
            if buckets.len() > MAX_IDLE_BUCKETS {
                let (per_second, burst) = (self.per_second, self.burst);
                buckets.retain(|_, b| {
                    let mut probe = *b;
                    probe.tokens = (probe.tokens
                        + now.saturating_duration_since(probe.updated).as_secs_f64() * per_second)
                        .min(f64::from(burst));
                    probe.tokens < f64::from(burst)
                });
            }
            buckets
                .entry((method, caller.clone()))
                .or_insert_with(|| TokenBucket::full(self.burst, now))
                .take(now, self.per_second, self.burst)
        };
        outcome.map_err(|retry_after| {
            let refusal = Refusal::RateLimited { retry_after };
            count_refused(method, &refusal);
            refusal
        })
    }

    /// A place for one more `WatchLicenseEvents` stream of the request's caller;
    /// given back when the returned slot drops (the stream ends or its client
    /// goes away).
    pub fn join_watch<T>(
        self: &Arc<Self>,
        request: &tonic::Request<T>,
    ) -> Result<WatchSlot, Refusal> {
        let caller = caller_of(request);
        {
            let mut watchers = self.watchers.lock();
            let open = watchers.entry(caller.clone()).or_insert(0);
            if *open < self.watch_limit {
                *open += 1;
                metrics().watch_subscribers(1);
                return Ok(WatchSlot {
                    guards: self.clone(),
                    caller,
                });
            }
        }
        let refusal = Refusal::TooManySubscribers {
            limit: self.watch_limit,
        };
        count_refused("WatchLicenseEvents", &refusal);
        Err(refusal)
    }

    /// Open streams of all callers.
    pub fn watch_subscribers(&self) -> usize {
        self.watchers.lock().values().sum()
    }

    /// Resolves once the server drains (or is gone).
    pub fn drained(&self) -> impl Future<Output = ()> + Send + 'static {
        let mut draining = self.draining.clone();
        async move {
            let _ = draining.wait_for(|d| *d).await;
        }
    }
}

/// One open `WatchLicenseEvents` stream, counted against its caller.
#[derive(Debug)]
pub struct WatchSlot {
    guards: Arc<Guards>,
    caller: String,
}

impl Drop for WatchSlot {
    fn drop(&mut self) {
        let mut watchers = self.guards.watchers.lock();
        if let Some(open) = watchers.get_mut(&self.caller) {
            *open -= 1;
            if *open == 0 {
                watchers.remove(&self.caller);
            }
        }
        metrics().watch_subscribers(-1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_method_is_classified_and_watch_has_no_budget() {
        assert_eq!(
            classify("/comtrexx.licensing.v1.LicensingService/CheckSeat"),
            Some(("CheckSeat", RpcClass::HotPath))
        );
        assert_eq!(
            classify("/comtrexx.licensing.v1.LicensingService/AssignSeat"),
            Some(("AssignSeat", RpcClass::Writes))
        );
        assert_eq!(
            classify("/comtrexx.licensing.v1.LicensingService/SomethingNew"),
            Some(("SomethingNew", RpcClass::OperatorReads))
        );
        assert_eq!(
            classify("/comtrexx.licensing.v1.LicensingService/WatchLicenseEvents"),
            None
        );
        assert_eq!(classify("/grpc.health.v1.Health/Check"), None);
        // Every RPC of the contract is in the table.
        let descriptor = <prost_types::FileDescriptorSet as prost::Message>::decode(
            crate::grpc::FILE_DESCRIPTOR_SET,
        )
        .unwrap();
        let service = descriptor
            .file
            .iter()
            .flat_map(|f| &f.service)
            .find(|s| s.name() == "LicensingService")
            .unwrap();
        for method in &service.method {
            assert!(
                CLASSES.iter().any(|(m, _)| *m == method.name()),
                "{} has no class",
                method.name()
            );
        }
    }

    #[test]
    fn client_timeouts_parse_as_grpc_defines_them() {
        let parse = |v: &str| {
            let mut headers = http::HeaderMap::new();
            headers.insert("grpc-timeout", v.parse().unwrap());
            client_timeout(&headers)
        };
        assert_eq!(parse("100m"), Some(Duration::from_millis(100)));
        assert_eq!(parse("2S"), Some(Duration::from_secs(2)));
        assert_eq!(parse("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(parse("5u"), Some(Duration::from_micros(5)));
        assert_eq!(parse("123456789S"), None);
        assert_eq!(parse("S"), None);
        assert_eq!(parse("10x"), None);
        assert_eq!(parse("-1S"), None);
        assert_eq!(client_timeout(&http::HeaderMap::new()), None);
    }

    #[test]
    fn token_bucket_allows_a_burst_then_the_rate() {
        let t0 = Instant::now();
        let per_second = 1.0; // one a second
        let mut bucket = TokenBucket::full(3, t0);
        for _ in 0..3 {
            assert_eq!(bucket.take(t0, per_second, 3), Ok(()));
        }
        let wait = bucket.take(t0, per_second, 3).unwrap_err();
        assert!(wait > Duration::from_millis(900) && wait <= Duration::from_secs(1));
        let later = t0 + Duration::from_millis(500);
        let wait = bucket.take(later, per_second, 3).unwrap_err();
        assert!(wait <= Duration::from_millis(500) + Duration::from_millis(1));
        assert_eq!(
            bucket.take(t0 + Duration::from_secs(1), per_second, 3),
            Ok(())
        );
        // Idle for long: back to the burst, never beyond.
        let much_later = t0 + Duration::from_secs(3600);
        for _ in 0..3 {
            assert_eq!(bucket.take(much_later, per_second, 3), Ok(()));
        }
        assert!(bucket.take(much_later, per_second, 3).is_err());
    }

    #[test]
    fn callers_are_keyed_by_name_else_peer_ip() {
        let caller = Caller {
            name: "pbx-1".into(),
            role: crate::auth::Role::CallHandling,
        };
        let peer: SocketAddr = "10.0.0.7:4711".parse().unwrap();
        assert_eq!(caller_key(Some(&caller), Some(peer)), "caller:pbx-1");
        assert_eq!(caller_key(None, Some(peer)), "peer:10.0.0.7");
        let other_port: SocketAddr = "10.0.0.7:4712".parse().unwrap();
        assert_eq!(caller_key(None, Some(other_port)), "peer:10.0.0.7");
        assert_eq!(caller_key(None, None), "unknown");
        // Callers without credentials are told apart by address.
        let loopback = Caller {
            name: "loopback".into(),
            role: crate::auth::Role::Operator,
        };
        assert_eq!(caller_key(Some(&loopback), Some(peer)), "peer:10.0.0.7");
    }
}
