//! The one authorization layer in front of every service. Per request it
//! establishes the caller once (bearer token, else client certificate, else
//! what `auth.mode` grants a peer without credentials), checks the policy
//! table, and either inserts the [`Caller`] into the request's extensions or
//! answers the refusal itself (recorded in the audit trail). Handlers read the
//! caller with [`Caller::of`] and never look at credentials.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tower::{Layer, Service};

use super::callers::{CallersFile, bearer};
use super::policy;
use super::tls::{Peer, PeerCertificate};
use super::{AuthError, AuthMode, Caller, Role};
use crate::audit::Auditor;
use crate::domain::audit::{AuditEvent, UNKNOWN_METHOD, Who};
use crate::rpc::{self, Target};

/// What the layer decides with; shared by all connections.
pub struct Authenticator {
    pub mode: AuthMode,
    pub callers: Arc<CallersFile>,
    pub audit: Auditor,
    /// Refuse bearer tokens from peers not on loopback: the listener serves
    /// plaintext and `auth.allow_plaintext_tokens` is off.
    pub refuse_plaintext_tokens: bool,
}

impl Authenticator {
    /// The caller of a request with these headers from this peer, or why there is none.
    pub fn identify(
        &self,
        headers: &http::HeaderMap,
        peer: Option<&Peer>,
    ) -> Result<Caller, AuthError> {
        if self.mode == AuthMode::Disabled {
            return Ok(Caller {
                name: "anonymous".into(),
                role: Role::Operator,
            });
        }
        if let Some(value) = headers.get(http::header::AUTHORIZATION) {
            // A token that crossed the network in clear text is refused, valid
            // or not: accepting it would make that the normal way to call.
            if self.refuse_plaintext_tokens && !peer.is_some_and(Peer::is_loopback) {
                return Err(AuthError::PlaintextToken);
            }
            let token = bearer(value.as_bytes()).map_err(AuthError::MalformedToken)?;
            return self
                .callers
                .current()
                .by_token(token)
                .cloned()
                .ok_or(AuthError::UnknownToken);
        }
        match peer.and_then(|p| p.certificate.as_ref()) {
            Some(PeerCertificate::Verified { identity }) => {
                let identity = identity.as_deref().unwrap_or_default();
                self.callers
                    .current()
                    .by_certificate(identity)
                    .cloned()
                    .ok_or_else(|| AuthError::UnknownCertificate(identity.to_owned()))
            }
            Some(PeerCertificate::Rejected { reason }) => {
                Err(AuthError::CertificateRejected(reason.clone()))
            }
            None if self.mode == AuthMode::Protected && peer.is_some_and(Peer::is_loopback) => {
                Ok(Caller {
                    name: "loopback".into(),
                    role: Role::Operator,
                })
            }
            None => Err(AuthError::MissingCredentials),
        }
    }

    /// The caller, if `path` may be called by it; `Ok(None)` for health, which
    /// needs no caller.
    pub fn decide(
        &self,
        path: &str,
        headers: &http::HeaderMap,
        peer: Option<&Peer>,
    ) -> Result<Option<Caller>, (Option<Caller>, AuthError)> {
        let target = rpc::target(path);
        if target == Target::Health {
            return Ok(None);
        }
        let caller = self.identify(headers, peer).map_err(|e| (None, e))?;
        if !policy::allows(caller.role, target) {
            let error = AuthError::Denied {
                caller: caller.name.clone(),
                role: caller.role,
                method: method_name(path).to_owned(),
            };
            return Err((Some(caller), error));
        }
        Ok(Some(caller))
    }

    /// Counts and records a refusal.
    fn refused(
        &self,
        path: &str,
        headers: &http::HeaderMap,
        peer: Option<&Peer>,
        caller: Option<&Caller>,
        error: &AuthError,
        code: tonic::Code,
    ) {
        let code = rpc::code_label(code);
        crate::metrics::auth_metrics().refused(error.reason(), code);
        let traceparent = headers.get("traceparent").and_then(|v| v.to_str().ok());
        let (method, detail) = match audit_method(path) {
            Some(method) => (method.to_owned(), error.to_string()),
            // Paths the service does not serve share one method label, so a
            // client inventing paths floods one summary, not the trail.
            None => (
                UNKNOWN_METHOD.to_owned(),
                format!("{}: {error}", AuditEvent::bounded(path, 64)),
            ),
        };
        let who = match caller {
            Some(c) => Who::Caller {
                name: &c.name,
                role: c.role.as_str(),
            },
            None => Who::Anonymous(peer.and_then(|p| p.addr).map(|a| a.ip())),
        };
        let trace_id = traceparent
            .and_then(crate::telemetry::traceparent_trace_id)
            .unwrap_or_default();
        self.audit.record_refusal(
            AuditEvent::new(self.audit.now(), who, &method, code, &detail).with_trace(trace_id),
        );
    }
}

/// The RPC's short name for `LicensingService` paths, the path otherwise.
fn method_name(path: &str) -> &str {
    path.strip_prefix(rpc::SERVICE_PREFIX).unwrap_or(path)
}

/// The audit trail's method of a request path: the RPC's short name, or the
/// path of a reflection RPC; `None` for a path the service does not serve.
fn audit_method(path: &str) -> Option<&str> {
    match rpc::target(path) {
        Target::Rpc(method) => rpc::by_name(method).map(|r| r.name),
        Target::Reflection | Target::Health if path.ends_with(REFLECTION_METHOD) => Some(path),
        Target::Reflection | Target::Health | Target::Other(_) => None,
    }
}

/// The one method of both reflection services (`v1` and `v1alpha`).
const REFLECTION_METHOD: &str = "/ServerReflectionInfo";

/// The tower layer (`Server::builder().layer(AuthLayer::new(..))`).
#[derive(Clone)]
pub struct AuthLayer {
    auth: Arc<Authenticator>,
}

impl AuthLayer {
    pub fn new(auth: Arc<Authenticator>) -> Self {
        Self { auth }
    }
}

impl<S> Layer<S> for AuthLayer {
    type Service = AuthService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        AuthService {
            inner,
            auth: self.auth.clone(),
        }
    }
}

#[derive(Clone)]
pub struct AuthService<S> {
    inner: S,
    auth: Arc<Authenticator>,
}

type BoxFuture<T, E> = Pin<Box<dyn std::future::Future<Output = Result<T, E>> + Send>>;

impl<S, ReqBody, ResBody> Service<http::Request<ReqBody>> for AuthService<S>
where
    S: Service<http::Request<ReqBody>, Response = http::Response<ResBody>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    ReqBody: Send + 'static,
    ResBody: Default + Send + 'static,
{
    type Response = http::Response<ResBody>;
    type Error = S::Error;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<ReqBody>) -> Self::Future {
        let decision = self.auth.decide(
            request.uri().path(),
            request.headers(),
            request.extensions().get::<Peer>(),
        );
        match decision {
            Ok(caller) => {
                if let Some(caller) = caller {
                    request.extensions_mut().insert(caller);
                }
                // The service that was polled ready serves this request; a fresh
                // clone stays behind for the next.
                let clone = self.inner.clone();
                let mut inner = std::mem::replace(&mut self.inner, clone);
                Box::pin(inner.call(request))
            }
            Err((caller, error)) => {
                let status = crate::status::auth_status(&error);
                self.auth.refused(
                    request.uri().path(),
                    request.headers(),
                    request.extensions().get::<Peer>(),
                    caller.as_ref(),
                    &error,
                    status.code(),
                );
                Box::pin(std::future::ready(Ok(status.into_http())))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::SystemClock;
    use crate::domain::audit::AuditRetention;
    use crate::store::memory::MemoryStore;

    fn authenticator(mode: AuthMode) -> Authenticator {
        let store = Arc::new(MemoryStore::new(Arc::new(SystemClock)));
        let (audit, _writer) =
            Auditor::new(store, Arc::new(SystemClock), AuditRetention::default());
        Authenticator {
            mode,
            callers: Arc::new(CallersFile::load(None, false).unwrap()),
            audit,
            refuse_plaintext_tokens: false,
        }
    }

    #[test]
    fn a_token_over_plaintext_is_refused_unless_from_loopback() {
        let mut headers = http::HeaderMap::new();
        headers.insert("authorization", "Bearer nope".parse().unwrap());
        let auth = Authenticator {
            refuse_plaintext_tokens: true,
            ..authenticator(AuthMode::Enforce)
        };
        assert_eq!(
            auth.identify(&headers, Some(&peer("10.1.2.3:5"))),
            Err(AuthError::PlaintextToken)
        );
        assert_eq!(
            auth.identify(&headers, None),
            Err(AuthError::PlaintextToken)
        );
        // From loopback the token never crossed a network: checked as usual.
        assert_eq!(
            auth.identify(&headers, Some(&peer("127.0.0.1:5"))),
            Err(AuthError::UnknownToken)
        );
        assert!(
            AuthError::PlaintextToken
                .to_string()
                .contains("auth.allow_plaintext_tokens")
        );
    }

    fn peer(addr: &str) -> Peer {
        Peer {
            addr: Some(addr.parse().unwrap()),
            certificate: None,
            long_streams: Default::default(),
        }
    }

    #[test]
    fn loopback_is_an_operator_only_in_protected_mode() {
        let headers = http::HeaderMap::new();
        let protected = authenticator(AuthMode::Protected);
        for addr in ["127.0.0.1:5", "[::1]:5", "[::ffff:127.0.0.1]:5"] {
            let caller = protected.identify(&headers, Some(&peer(addr))).unwrap();
            assert_eq!(caller.role, Role::Operator, "{addr}");
        }
        assert_eq!(
            protected.identify(&headers, Some(&peer("10.1.2.3:5"))),
            Err(AuthError::MissingCredentials)
        );
        assert_eq!(
            authenticator(AuthMode::Enforce).identify(&headers, Some(&peer("127.0.0.1:5"))),
            Err(AuthError::MissingCredentials)
        );
        let caller = authenticator(AuthMode::Disabled)
            .identify(&headers, Some(&peer("10.1.2.3:5")))
            .unwrap();
        assert_eq!(caller.role, Role::Operator);
    }

    #[test]
    fn a_bad_token_is_refused_even_from_loopback() {
        let mut headers = http::HeaderMap::new();
        headers.insert("authorization", "Bearer nope".parse().unwrap());
        assert_eq!(
            authenticator(AuthMode::Protected).identify(&headers, Some(&peer("127.0.0.1:5"))),
            Err(AuthError::UnknownToken)
        );
    }

    #[test]
    fn paths_the_service_does_not_serve_share_one_method() {
        assert_eq!(
            audit_method("/comtrexx.licensing.v1.LicensingService/CheckSeat"),
            Some("CheckSeat")
        );
        assert_eq!(
            audit_method("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"),
            Some("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo")
        );
        for path in [
            "/x.Y/Z1",
            "/comtrexx.licensing.v1.LicensingService/Nope",
            "/grpc.reflection.v1.ServerReflection/Z",
        ] {
            assert_eq!(audit_method(path), None, "{path}");
        }
    }

    #[test]
    fn health_needs_no_caller() {
        let auth = authenticator(AuthMode::Enforce);
        let headers = http::HeaderMap::new();
        assert_eq!(
            auth.decide("/grpc.health.v1.Health/Check", &headers, None),
            Ok(None)
        );
        assert!(matches!(
            auth.decide(
                "/comtrexx.licensing.v1.LicensingService/CheckSeat",
                &headers,
                None
            ),
            Err((None, AuthError::MissingCredentials))
        ));
    }
}
