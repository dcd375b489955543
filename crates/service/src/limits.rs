//! Request limits and load protection: what one caller, or one burst, may cost
//! the others.
//!
//! - **Budgets per class of RPC** ([`shed`]): the hot path (`CheckSeat` alone),
//!   writes and operator reads each have their own concurrency budget. A call
//!   whose class is full is refused at once (no queue) with `UNAVAILABLE`
//!   (`OVERLOADED`, safe to retry: nothing was done), so a burst of writes or
//!   overview calls never takes `CheckSeat`'s capacity. One caller holds at
//!   most its share of a budget (`RESOURCE_EXHAUSTED`, `CALLER_SHARE_EXCEEDED`),
//!   and a call takes its budget only once its request has arrived whole
//!   (within `request_body_timeout`): streams whose bodies never come hold nothing.
//! - **Connections** ([`Connections`]): a cap per peer address and in total,
//!   a deadline for the TLS handshake and the HTTP/2 preface
//!   ([`AdmittedConnection`]), a stream limit per connection (HTTP/2
//!   `SETTINGS_MAX_CONCURRENT_STREAMS`, set in `server::run`).
//! - **Health watches** ([`HealthWatches`]): `grpc.health.v1.Health/Watch`
//!   needs no credentials, so its streams are capped per peer and in total, and
//!   end when the server drains.
//! - **A server-side deadline** per call ([`deadline`]); a client's shorter
//!   `grpc-timeout` still wins. A stream is bounded only until it is opened.
//! - **A message size limit** (tonic's, answered as `RESOURCE_EXHAUSTED`: [`message_size`]).
//! - **A maximum connection age** (HTTP/2 `GOAWAY` from tonic) and its grace, after
//!   which a connection still open is closed ([`AdmittedConnection`]), so clients
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

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
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
use crate::caller::{Caller, LongStreams, Peer};
use crate::domain::audit::{AuditEvent, Who};
use crate::metrics::metrics;
pub use crate::rpc::RpcClass;
use crate::rpc::{self, code_label};
pub use crate::status::Refusal;
use crate::status::refusal_status;

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
    /// `WatchLicenseEvents` and `WatchSeats` streams one caller may hold open
    /// (together).
    pub watch_subscribers_per_caller: usize,
    /// Token bucket of `CreateInitializationCode` and `ApplyActivation` (each its
    /// own, per caller): refill per minute and burst.
    pub activation_per_minute: u32,
    pub activation_burst: u32,
    /// Share of each class's budget (percent) one caller may hold at once.
    pub caller_share_percent: u32,
    /// How long a budgeted call's request may take to arrive whole; until then
    /// it holds no budget.
    pub request_body_timeout: Duration,
    /// HTTP/2 streams one connection may have open at once (advertised as
    /// `SETTINGS_MAX_CONCURRENT_STREAMS`).
    pub max_streams_per_connection: u32,
    /// From accept to the TLS handshake done and the HTTP/2 preface read.
    pub handshake_timeout: Duration,
    /// Open connections (handshakes included) in total and per peer address.
    pub max_connections: usize,
    pub max_connections_per_peer: usize,
    /// Open `grpc.health.v1.Health/Watch` streams in total and per peer address.
    pub health_watches: usize,
    pub health_watches_per_peer: usize,
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
            caller_share_percent: 50,
            request_body_timeout: Duration::from_secs(5),
            max_streams_per_connection: 256,
            handshake_timeout: Duration::from_secs(5),
            max_connections: 4096,
            max_connections_per_peer: 256,
            health_watches: 256,
            health_watches_per_peer: 8,
        }
    }
}

/// The class of a request path, from the RPC table; `None` for other services
/// (health, reflection) and unbudgeted methods. A method of the service missing
/// from the table counts as an operator read.
pub fn classify(path: &str) -> Option<RpcClass> {
    let method = path.strip_prefix(rpc::SERVICE_PREFIX)?;
    match rpc::by_name(method) {
        Some(rpc) => rpc.class,
        None => Some(RpcClass::OperatorReads),
    }
}

/// Who is calling, for per-caller limits and the audit log: the authenticated
/// caller's name, else the peer's IP address (all ports of one host are one
/// caller), else `unknown`. The names the authorization layer gives callers
/// without credentials (`loopback`, `anonymous`) are no identity: those are
/// keyed by their address too, so they do not share one budget.
pub fn caller_key(caller: Option<&Caller>, peer: Option<SocketAddr>) -> String {
    match CallerId::of(caller, peer) {
        CallerId::Named(name) => format!("caller:{name}"),
        CallerId::Peer(ip) => format!("peer:{ip}"),
        CallerId::Unknown => "unknown".to_owned(),
    }
}

/// Who is calling, as [`caller_key`] names it, without building the string
/// (the budgets look it up on every call).
#[derive(Hash)]
enum CallerId<'a> {
    Named(&'a str),
    Peer(IpAddr),
    Unknown,
}

impl<'a> CallerId<'a> {
    fn of(caller: Option<&'a Caller>, peer: Option<SocketAddr>) -> Self {
        let identified = caller.filter(|c| !matches!(c.name.as_str(), "loopback" | "anonymous"));
        match (identified, peer) {
            (Some(c), _) => CallerId::Named(&c.name),
            (None, Some(addr)) => CallerId::Peer(addr.ip().to_canonical()),
            (None, None) => CallerId::Unknown,
        }
    }

    /// A digest of the identity: two callers with one digest share a share.
    fn digest(&self) -> u64 {
        use std::hash::{BuildHasher as _, BuildHasherDefault};
        BuildHasherDefault::<std::hash::DefaultHasher>::default().hash_one(self)
    }
}

/// The peer address of a request, as the acceptor (`auth::tls::incoming`),
/// tonic's own TCP/TLS listener or axum (the metrics port) recorded it.
fn peer_addr(ext: &http::Extensions) -> Option<SocketAddr> {
    ext.get::<Peer>()
        .and_then(|p| p.addr)
        .or_else(|| {
            ext.get::<axum::extract::ConnectInfo<SocketAddr>>()
                .map(|i| i.0)
        })
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
    method: &'static str,
    caller: Option<Caller>,
    peer: Option<SocketAddr>,
    traceparent: Option<http::HeaderValue>,
}

impl RefusedCall {
    /// The call of a request to `LicensingService`; `None` for other services.
    fn of<B>(request: &http::Request<B>) -> Option<Self> {
        let path = request.uri().path();
        if !path.starts_with(rpc::SERVICE_PREFIX) {
            return None;
        }
        let ext = request.extensions();
        Some(Self {
            method: rpc::method_label(path),
            caller: ext.get::<Caller>().cloned(),
            peer: peer_addr(ext),
            traceparent: request.headers().get("traceparent").cloned(),
        })
    }

    /// Counts the refusal and records it in the audit trail.
    fn record(self, audit: &Auditor, refusal: &Refusal) {
        metrics().refused(self.method, refusal.reason());
        let code = refusal_status(refusal).code();
        let who = match &self.caller {
            Some(c) => Who::Caller {
                name: &c.name,
                role: c.role.as_str(),
            },
            None => Who::Anonymous(self.peer.map(|p| p.ip())),
        };
        let trace_id = self
            .traceparent
            .as_ref()
            .and_then(|v| v.to_str().ok())
            .and_then(crate::telemetry::traceparent_trace_id)
            .unwrap_or_default();
        audit.record_refusal(
            AuditEvent::new(
                audit.now(),
                who,
                self.method,
                code_label(code),
                &refusal.to_string(),
            )
            .with_trace(trace_id),
        );
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

/// One class's concurrency budget, and what each caller holds of it.
struct ClassBudget {
    class: RpcClass,
    permits: Arc<Semaphore>,
    /// Most permits one caller may hold (its share of the budget).
    per_caller: usize,
    /// Permits held, by caller digest; a caller without permits has no entry.
    held: Mutex<HashMap<u64, usize>>,
}

impl ClassBudget {
    fn new(class: RpcClass, budget: usize, share_percent: u32) -> Arc<Self> {
        Arc::new(Self {
            class,
            permits: Arc::new(Semaphore::new(budget)),
            per_caller: (budget * share_percent as usize / 100).max(1),
            held: Mutex::new(HashMap::new()),
        })
    }

    /// A permit for `caller`, unless the class is full (first: that is the
    /// server's state) or the caller holds its share.
    fn acquire(self: &Arc<Self>, caller: u64) -> Result<ClassPermit, Refusal> {
        let Ok(permit) = self.permits.clone().try_acquire_owned() else {
            return Err(Refusal::Overloaded { class: self.class });
        };
        let mut held = self.held.lock();
        let mine = held.entry(caller).or_insert(0);
        if *mine >= self.per_caller {
            return Err(Refusal::CallerShare {
                class: self.class,
                limit: self.per_caller,
            });
        }
        *mine += 1;
        Ok(ClassPermit {
            budget: self.clone(),
            caller,
            _permit: permit,
        })
    }
}

/// A call's place in its class's budget and in its caller's share.
struct ClassPermit {
    budget: Arc<ClassBudget>,
    caller: u64,
    _permit: tokio::sync::OwnedSemaphorePermit,
}

impl Drop for ClassPermit {
    fn drop(&mut self) {
        give_back(&mut self.budget.held.lock(), &self.caller);
    }
}

/// Budgets per class of RPC (and per caller within each): a call whose class
/// is full, or whose caller holds its share, is refused at once. The budget is
/// taken only once the request has arrived whole: a stream whose body never
/// comes (within `request_body_timeout`) holds nothing and is then refused.
#[derive(Clone)]
pub struct ShedLayer {
    // One budget per `RpcClass`, in its order.
    budgets: Arc<[Arc<ClassBudget>; 3]>,
    // Most bytes of a request read: one message of the largest size and its prefix.
    body_limit: usize,
    max_message_bytes: usize,
    body_timeout: Duration,
    audit: Auditor,
}

/// The [`ShedLayer`] of `limits`.
pub fn shed(limits: &Limits, audit: Auditor) -> ShedLayer {
    let share = limits.caller_share_percent;
    ShedLayer {
        audit,
        body_limit: limits.max_message_bytes + GRPC_FRAME_HEADER,
        max_message_bytes: limits.max_message_bytes,
        body_timeout: limits.request_body_timeout,
        budgets: Arc::new([
            ClassBudget::new(RpcClass::HotPath, limits.budgets.hot_path, share),
            ClassBudget::new(RpcClass::Writes, limits.budgets.writes, share),
            ClassBudget::new(
                RpcClass::OperatorReads,
                limits.budgets.operator_reads,
                share,
            ),
        ]),
    }
}

impl<S> tower::Layer<S> for ShedLayer {
    type Service = Shed<S>;

    fn layer(&self, inner: S) -> Shed<S> {
        Shed {
            inner,
            layer: self.clone(),
        }
    }
}

#[derive(Clone)]
pub struct Shed<S> {
    inner: S,
    layer: ShedLayer,
}

impl<S, B> tower::Service<http::Request<B>> for Shed<S>
where
    S: tower::Service<http::Request<tonic::body::Body>, Response = HttpResponse>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    B: HttpBody<Data = bytes::Bytes> + Send + 'static,
    B::Error: Into<tonic::codegen::StdError>,
{
    type Response = HttpResponse;
    type Error = S::Error;
    type Future = Answer<S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let Some(class) = classify(request.uri().path()) else {
            return Box::pin(self.inner.call(request.map(tonic::body::Body::new)));
        };
        // The service that was polled ready goes into the future; a clone stays.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let layer = self.layer.clone();
        Box::pin(async move {
            let (parts, body) = request.into_parts();
            let mut read = std::pin::pin!(collect(body, layer.body_limit));
            // A unary call's body has usually come with its headers: look once
            // before arming a timer, so the common case costs no timer at all.
            let read = match futures::poll!(read.as_mut()) {
                Poll::Ready(read) => Ok(read),
                Poll::Pending => tokio::time::timeout(layer.body_timeout, read).await,
            };
            let refusal = match read {
                Ok(Ok(bytes)) => {
                    let request = http::Request::from_parts(parts, Buffered(Some(bytes)));
                    let ext = request.extensions();
                    let caller = CallerId::of(ext.get::<Caller>(), peer_addr(ext)).digest();
                    match layer.budgets[class as usize].acquire(caller) {
                        Ok(permit) => {
                            let response = inner.call(request.map(tonic::body::Body::new)).await;
                            drop(permit);
                            return response;
                        }
                        Err(refusal) => {
                            if let Some(call) = RefusedCall::of(&request) {
                                call.record(&layer.audit, &refusal);
                            }
                            return Ok(refusal_status(&refusal).into_http());
                        }
                    }
                }
                Ok(Err(BodyError::TooLarge)) => Refusal::MessageTooLarge {
                    limit: layer.max_message_bytes,
                },
                Ok(Err(BodyError::Failed)) | Err(_) => Refusal::RequestIncomplete {
                    timeout: layer.body_timeout,
                },
            };
            let request = http::Request::from_parts(parts, ());
            if let Some(call) = RefusedCall::of(&request) {
                call.record(&layer.audit, &refusal);
            }
            Ok(refusal_status(&refusal).into_http())
        })
    }
}

/// The 5-byte prefix of a gRPC message (compression flag, length).
const GRPC_FRAME_HEADER: usize = 5;

/// Why a request body was not read whole.
enum BodyError {
    /// More than one message of the largest size.
    TooLarge,
    /// The client reset the stream or the connection went away.
    Failed,
}

/// Reads a request body to its end, at most `limit` bytes. A body of one
/// frame (a unary call's usual) is kept as it came, without a copy.
async fn collect<B: HttpBody<Data = bytes::Bytes>>(
    body: B,
    limit: usize,
) -> Result<bytes::Bytes, BodyError> {
    let mut body = std::pin::pin!(body);
    let mut first: Option<bytes::Bytes> = None;
    let mut more = bytes::BytesMut::new();
    let mut read = 0;
    while let Some(frame) = std::future::poll_fn(|cx| body.as_mut().poll_frame(cx)).await {
        let Ok(frame) = frame else {
            return Err(BodyError::Failed);
        };
        let Ok(data) = frame.into_data() else {
            continue; // trailers: gRPC requests carry none that matter
        };
        read += data.remaining();
        if read > limit {
            return Err(BodyError::TooLarge);
        }
        match &first {
            None => first = Some(data),
            Some(f) => {
                if more.is_empty() {
                    more.extend_from_slice(f);
                }
                more.extend_from_slice(&data);
            }
        }
    }
    Ok(if more.is_empty() {
        first.unwrap_or_default()
    } else {
        more.freeze()
    })
}

/// A request body read whole, handed on as one frame.
struct Buffered(Option<bytes::Bytes>);

impl HttpBody for Buffered {
    type Data = bytes::Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<bytes::Bytes>, Self::Error>>> {
        Poll::Ready(
            self.get_mut()
                .0
                .take()
                .map(|d| Ok(http_body::Frame::data(d))),
        )
    }

    fn is_end_stream(&self) -> bool {
        self.0.is_none()
    }
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
        let call_info = RefusedCall::of(&request);
        let audit = self.audit.clone();
        let call = inner.call(request);
        Box::pin(async move {
            // The store knows the deadline too: a write waiting for it answers
            // in time, saying why, rather than being cut off here.
            let by = tokio::time::Instant::now() + deadline;
            let call = crate::store::answering_by(by, call);
            match tokio::time::timeout_at(by, call).await {
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
        let Some(call_info) = RefusedCall::of(&request) else {
            return Box::pin(inner.call(request));
        };
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

/// Why a connection was closed by the limits, as the metrics label says it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectionRefusal {
    /// Its peer address already had `max_connections_per_peer` open.
    PerPeer,
    /// The replica already had `max_connections` open.
    Total,
    /// The TLS handshake did not finish within `handshake_timeout`.
    HandshakeTimeout,
    /// The HTTP/2 preface did not arrive within `handshake_timeout`.
    PrefaceTimeout,
}

impl ConnectionRefusal {
    pub const ALL: [ConnectionRefusal; 4] = [
        ConnectionRefusal::PerPeer,
        ConnectionRefusal::Total,
        ConnectionRefusal::HandshakeTimeout,
        ConnectionRefusal::PrefaceTimeout,
    ];

    pub fn reason(self) -> &'static str {
        match self {
            ConnectionRefusal::PerPeer => "per_peer",
            ConnectionRefusal::Total => "total",
            ConnectionRefusal::HandshakeTimeout => "handshake_timeout",
            ConnectionRefusal::PrefaceTimeout => "preface_timeout",
        }
    }
}

/// How often a refused connection is logged at most (each is counted).
const REFUSAL_LOG_EVERY: Duration = Duration::from_secs(10);

/// The open connections of one listener, per peer address and in total.
/// A connection counts from accept (before its TLS handshake) until it closes,
/// so idle sockets and slow handshakes cannot use up the file descriptors.
#[derive(Debug)]
pub struct Connections {
    max_total: usize,
    max_per_peer: usize,
    /// From accept: TLS handshake done and HTTP/2 preface read within this.
    pub handshake_timeout: Duration,
    /// `max_connection_age` plus its grace: then a connection still open is closed.
    lifetime: Duration,
    /// `max_connection_age_grace`: how often a connection kept past its
    /// lifetime by a long stream looks again.
    grace: Duration,
    /// Open connections per peer address; the sum is the total.
    open: Mutex<(usize, HashMap<IpAddr, usize>)>,
    /// When a refusal was last logged.
    logged: Mutex<Option<Instant>>,
}

impl Connections {
    pub fn new(limits: &Limits) -> Arc<Self> {
        metrics().connection_refusal_reasons(ConnectionRefusal::ALL.map(ConnectionRefusal::reason));
        Arc::new(Self {
            max_total: limits.max_connections,
            max_per_peer: limits.max_connections_per_peer,
            handshake_timeout: limits.handshake_timeout,
            lifetime: limits.max_connection_age + limits.max_connection_age_grace,
            grace: limits.max_connection_age_grace,
            open: Mutex::new((0, HashMap::new())),
            logged: Mutex::new(None),
        })
    }

    /// A place for one more connection from `peer`, or why not (counted and
    /// logged here; the caller closes the socket).
    pub fn admit(self: &Arc<Self>, peer: SocketAddr) -> Result<ConnectionSlot, ConnectionRefusal> {
        let ip = peer.ip().to_canonical();
        let refusal = {
            let mut open = self.open.lock();
            let (total, per_peer) = &mut *open;
            let mine = per_peer.get(&ip).copied().unwrap_or(0);
            if *total >= self.max_total {
                ConnectionRefusal::Total
            } else if mine >= self.max_per_peer {
                ConnectionRefusal::PerPeer
            } else {
                *total += 1;
                per_peer.insert(ip, mine + 1);
                metrics().connections_open(1);
                return Ok(ConnectionSlot {
                    connections: self.clone(),
                    ip,
                });
            }
        };
        self.refused(peer, refusal);
        Err(refusal)
    }

    /// Counts a connection closed by a limit; logs a warning now and then.
    pub fn refused(&self, peer: SocketAddr, refusal: ConnectionRefusal) {
        metrics().connection_refused(refusal.reason());
        let now = Instant::now();
        let mut logged = self.logged.lock();
        if logged.is_none_or(|t| now.duration_since(t) >= REFUSAL_LOG_EVERY) {
            *logged = Some(now);
            tracing::warn!(
                %peer,
                reason = refusal.reason(),
                max_connections = self.max_total,
                max_connections_per_peer = self.max_per_peer,
                handshake_timeout_ms = self.handshake_timeout.as_millis() as u64,
                "connection closed by a limit (further ones for 10 s only counted: licensing_connections_refused_total)"
            );
        }
    }

    /// Open connections in total.
    pub fn open(&self) -> usize {
        self.open.lock().0
    }
}

/// One open connection, counted against its peer until dropped.
#[derive(Debug)]
pub struct ConnectionSlot {
    connections: Arc<Connections>,
    ip: IpAddr,
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        let mut open = self.connections.open.lock();
        let (total, per_peer) = &mut *open;
        *total -= 1;
        give_back(per_peer, &self.ip);
        metrics().connections_open(-1);
    }
}

/// Gives one place of `key` back; a key without places is forgotten, so the
/// map holds only those with something open.
fn give_back<K: std::hash::Hash + Eq>(held: &mut HashMap<K, usize>, key: &K) {
    if let Some(mine) = held.get_mut(key) {
        *mine -= 1;
        if *mine == 0 {
            held.remove(key);
        }
    }
}

/// The client connection preface of HTTP/2 (RFC 9113, section 3.4), in bytes.
const H2_PREFACE_LEN: usize = 24;

/// An accepted connection, holding its [`ConnectionSlot`] while it lives.
///
/// It is closed when the HTTP/2 preface has not arrived by its deadline
/// (hyper itself waits for it as long as the socket lives), and once its age
/// passes `max_connection_age` plus the grace: tonic sends `GOAWAY` at
/// `max_connection_age` (new calls go to a new connection, possibly to another
/// replica) but never closes a connection whose streams stay open; this ends
/// them, so every connection is gone by then. Except one carrying a
/// `WatchSeats` stream ([`LongStreams`]): that stream is meant to live for
/// hours (its caller decides from it), so the connection stays until it ends,
/// looked at again every grace. Such streams need a role that may watch and
/// are capped per caller ([`Guards::join_watch`]).
pub struct AdmittedConnection<T> {
    inner: T,
    slot: ConnectionSlot,
    peer: SocketAddr,
    long_streams: LongStreams,
    /// Until the preface is read: its deadline and the bytes still missing.
    preface: Option<(Pin<Box<tokio::time::Sleep>>, usize)>,
    // Fires at the end of the grace; boxed so the wrapper stays `Unpin`.
    closes_at: Pin<Box<tokio::time::Sleep>>,
}

impl<T> AdmittedConnection<T> {
    /// `deadline`: accept time plus the handshake timeout.
    pub fn new(
        inner: T,
        slot: ConnectionSlot,
        peer: SocketAddr,
        deadline: tokio::time::Instant,
        long_streams: LongStreams,
    ) -> Self {
        let lifetime = slot.connections.lifetime;
        Self {
            inner,
            slot,
            peer,
            long_streams,
            preface: Some((Box::pin(tokio::time::sleep_until(deadline)), H2_PREFACE_LEN)),
            closes_at: Box::pin(tokio::time::sleep(lifetime)),
        }
    }

    /// Once the lifetime has passed, every read and write fails, and hyper
    /// closes the connection.
    fn expired(&mut self, cx: &mut Context<'_>) -> Option<io::Error> {
        while self.closes_at.as_mut().poll(cx).is_ready() {
            if self.long_streams.open() == 0 {
                return Some(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "maximum connection age and grace passed",
                ));
            }
            // A long stream is open: look again one grace later (polled once
            // more by the loop, so the timer wakes this connection).
            let again = tokio::time::Instant::now()
                + self.slot.connections.grace.max(Duration::from_millis(10));
            self.closes_at.as_mut().reset(again);
        }
        None
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for AdmittedConnection<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let Some(e) = this.expired(cx) {
            return Poll::Ready(Err(e));
        }
        let before = buf.filled().len();
        let result = Pin::new(&mut this.inner).poll_read(cx, buf);
        if let Some((deadline, missing)) = &mut this.preface {
            let read = buf.filled().len() - before;
            if read >= *missing {
                this.preface = None;
            } else {
                *missing -= read;
                if result.is_pending() && deadline.as_mut().poll(cx).is_ready() {
                    this.preface = None;
                    this.slot
                        .connections
                        .refused(this.peer, ConnectionRefusal::PrefaceTimeout);
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "no HTTP/2 preface within the handshake timeout",
                    )));
                }
            }
        }
        result
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for AdmittedConnection<T> {
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

impl<T: Connected> Connected for AdmittedConnection<T> {
    // The inner connection's info, so `Request::remote_addr` keeps working.
    type ConnectInfo = T::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

/// The path of the health watch, the one stream anyone may open.
const HEALTH_WATCH: &str = "/grpc.health.v1.Health/Watch";

/// Open `grpc.health.v1.Health/Watch` streams, per peer address and in
/// total, on the gRPC port and the metrics port together; they end when the
/// server drains ([`HealthWatches::drain`]).
#[derive(Debug)]
pub struct HealthWatches {
    max_total: usize,
    max_per_peer: usize,
    open: Mutex<(usize, HashMap<Option<IpAddr>, usize>)>,
    draining: watch::Sender<bool>,
}

impl HealthWatches {
    pub fn new(limits: &Limits) -> Arc<Self> {
        Arc::new(Self {
            max_total: limits.health_watches,
            max_per_peer: limits.health_watches_per_peer,
            open: Mutex::new((0, HashMap::new())),
            draining: watch::channel(false).0,
        })
    }

    /// Ends every open watch (after the answer already queued, e.g. `NOT_SERVING`)
    /// with `UNAVAILABLE`, and refuses new ones the same way.
    pub fn drain(&self) {
        self.draining.send_replace(true);
    }

    /// Open watches in total.
    pub fn open(&self) -> usize {
        self.open.lock().0
    }

    fn join(self: &Arc<Self>, peer: Option<IpAddr>) -> Result<WatchPlace, Refusal> {
        if *self.draining.borrow() {
            return Err(Refusal::ShuttingDown);
        }
        let mut open = self.open.lock();
        let (total, per_peer) = &mut *open;
        let mine = per_peer.entry(peer).or_insert(0);
        let limit = if *total >= self.max_total {
            self.max_total
        } else if *mine >= self.max_per_peer {
            self.max_per_peer
        } else {
            *total += 1;
            *mine += 1;
            metrics().health_watches(1);
            return Ok(WatchPlace {
                watches: self.clone(),
                peer,
            });
        };
        if *mine == 0 {
            per_peer.remove(&peer);
        }
        Err(Refusal::TooManyWatches { limit })
    }
}

/// One open health watch.
struct WatchPlace {
    watches: Arc<HealthWatches>,
    peer: Option<IpAddr>,
}

impl Drop for WatchPlace {
    fn drop(&mut self) {
        let mut open = self.watches.open.lock();
        let (total, per_peer) = &mut *open;
        *total -= 1;
        give_back(per_peer, &self.peer);
        metrics().health_watches(-1);
    }
}

/// A health service (`S`) whose watches are bounded by [`HealthWatches`].
#[derive(Clone)]
pub struct BoundedHealth<S> {
    inner: S,
    watches: Arc<HealthWatches>,
}

impl<S> BoundedHealth<S> {
    pub fn new(inner: S, watches: Arc<HealthWatches>) -> Self {
        Self { inner, watches }
    }
}

impl<S: tonic::server::NamedService> tonic::server::NamedService for BoundedHealth<S> {
    const NAME: &'static str = S::NAME;
}

impl<S, B> tower::Service<http::Request<B>> for BoundedHealth<S>
where
    S: tower::Service<http::Request<B>, Response = HttpResponse>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = HttpResponse;
    type Error = S::Error;
    type Future = Answer<S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        if request.uri().path() != HEALTH_WATCH {
            return Box::pin(self.inner.call(request));
        }
        let peer = peer_addr(request.extensions()).map(|a| a.ip().to_canonical());
        let place = match self.watches.join(peer) {
            Ok(place) => place,
            Err(refusal) => {
                // No audit entry: health needs no caller, and a flood of
                // watches must not write to the trail.
                metrics().refused("grpc.health.v1.Health/Watch", refusal.reason());
                return Box::pin(std::future::ready(Ok(refusal_status(&refusal).into_http())));
            }
        };
        let mut draining = self.watches.draining.subscribe();
        let call = self.inner.call(request);
        Box::pin(async move {
            let response = call.await?;
            let ends = Box::pin(async move {
                let _ = draining.wait_for(|d| *d).await;
            });
            Ok(response.map(|body| {
                tonic::body::Body::new(WatchBody {
                    inner: body,
                    _place: place,
                    ends,
                    draining: false,
                    done: false,
                })
            }))
        })
    }
}

/// A health watch's response: the inner stream, ended with `UNAVAILABLE`
/// (`SHUTTING_DOWN`) once the server drains.
struct WatchBody {
    inner: tonic::body::Body,
    _place: WatchPlace,
    ends: BoxFuture<'static, ()>,
    /// `ends` has resolved.
    draining: bool,
    done: bool,
}

impl HttpBody for WatchBody {
    type Data = bytes::Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<bytes::Bytes>, Self::Error>>> {
        let this = self.get_mut();
        if this.done {
            return Poll::Ready(None);
        }
        let inner = Pin::new(&mut this.inner).poll_frame(cx);
        // `ends` is polled until it is ready, never after.
        if !this.draining {
            if this.ends.as_mut().poll(cx).is_pending() {
                return inner;
            }
            this.draining = true;
        }
        // Draining: what the stream already has (the NOT_SERVING answer) goes
        // out, then the end.
        if let Poll::Ready(Some(Ok(frame))) = &inner
            && frame.is_data()
        {
            return inner;
        }
        this.done = true;
        let mut trailers = http::HeaderMap::new();
        let _ = refusal_status(&Refusal::ShuttingDown).add_header(&mut trailers);
        Poll::Ready(Some(Ok(http_body::Frame::trailers(trailers))))
    }

    fn is_end_stream(&self) -> bool {
        self.done
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
    /// Open `WatchLicenseEvents` and `WatchSeats` streams per caller.
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

    /// Takes a token of the RPC's bucket for the request's caller, when the
    /// RPC table gives it a rate limit; a refusal is counted here and audited
    /// by the handler.
    pub fn rate_limit<T>(
        &self,
        rpc: &'static rpc::Rpc,
        request: &tonic::Request<T>,
    ) -> Result<(), Refusal> {
        let method = rpc.name;
        let Some(rpc::RateLimit::Activation) = rpc.rate_limit else {
            return Ok(());
        };
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

    /// A place for one more stream (`WatchLicenseEvents`, `WatchSeats`: one
    /// cap for both) of the request's caller; given back when the returned slot
    /// drops (the stream ends or its client goes away).
    pub fn join_watch<T>(
        self: &Arc<Self>,
        method: &'static str,
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
        count_refused(method, &refusal);
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

/// One open `WatchLicenseEvents` or `WatchSeats` stream, counted against its caller.
#[derive(Debug)]
pub struct WatchSlot {
    guards: Arc<Guards>,
    caller: String,
}

impl Drop for WatchSlot {
    fn drop(&mut self) {
        give_back(&mut self.guards.watchers.lock(), &self.caller);
        metrics().watch_subscribers(-1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_method_is_classified_and_watch_has_no_budget() {
        let service = |m: &str| format!("/comtrexx.licensing.v1.LicensingService/{m}");
        for (method, class, label) in [
            ("CheckSeat", Some(RpcClass::HotPath), "CheckSeat"),
            ("AssignSeat", Some(RpcClass::Writes), "AssignSeat"),
            ("SomethingNew", Some(RpcClass::OperatorReads), "(unknown)"),
            ("WatchLicenseEvents", None, "WatchLicenseEvents"),
        ] {
            assert_eq!(classify(&service(method)), class, "{method}");
            assert_eq!(rpc::method_label(&service(method)), label, "{method}");
        }
        assert_eq!(classify("/grpc.health.v1.Health/Check"), None);
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
    fn a_caller_holds_at_most_its_share_and_a_full_class_says_so_first() {
        let budget = ClassBudget::new(RpcClass::HotPath, 4, 50);
        let (a, b) = (1, 2);
        let held: Vec<_> = (0..2).map(|_| budget.acquire(a).unwrap()).collect();
        assert_eq!(
            budget.acquire(a).err(),
            Some(Refusal::CallerShare {
                class: RpcClass::HotPath,
                limit: 2
            })
        );
        let others: Vec<_> = (0..2).map(|_| budget.acquire(b).unwrap()).collect();
        assert_eq!(
            budget.acquire(3).err(),
            Some(Refusal::Overloaded {
                class: RpcClass::HotPath
            })
        );
        drop(held);
        budget.acquire(a).unwrap();
        drop(others);
        assert!(
            budget.held.lock().len() <= 1,
            "callers without permits are forgotten"
        );
    }

    #[tokio::test]
    async fn connections_are_capped_per_peer_and_in_total() {
        let limits = Limits {
            max_connections: 3,
            max_connections_per_peer: 2,
            ..Limits::default()
        };
        let connections = Connections::new(&limits);
        let peer = |ip: &str| SocketAddr::new(ip.parse().unwrap(), 4711);
        let first = connections.admit(peer("10.0.0.1")).unwrap();
        let _second = connections.admit(peer("10.0.0.1")).unwrap();
        assert_eq!(
            connections.admit(peer("10.0.0.1")).err(),
            Some(ConnectionRefusal::PerPeer)
        );
        let _third = connections.admit(peer("10.0.0.2")).unwrap();
        assert_eq!(
            connections.admit(peer("10.0.0.3")).err(),
            Some(ConnectionRefusal::Total)
        );
        drop(first);
        assert_eq!(connections.open(), 2);
        connections.admit(peer("10.0.0.3")).unwrap();
    }

    #[test]
    fn callers_are_keyed_by_name_else_peer_ip() {
        let caller = Caller {
            name: "pbx-1".into(),
            role: crate::rpc::Role::CallHandling,
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
            role: crate::rpc::Role::Operator,
        };
        assert_eq!(caller_key(Some(&loopback), Some(peer)), "peer:10.0.0.7");
    }
}
