//! Who is calling, as request extensions: the [`Peer`] a connection comes
//! from (the transport's knowledge: address, client certificate) and the
//! [`Caller`] the authorization layer established from it (name and role).
//! Below every layer that reads them (authorization, limits, handlers, audit).

use std::net::SocketAddr;

use crate::rpc::Role;

/// A caller whose identity was established for this request. Inserted into the
/// request's extensions by the authorization layer; handlers read it from there
/// and never re-parse credentials.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// The name from the callers file (or `loopback` / `anonymous` where the
    /// mode grants a role without credentials).
    pub name: String,
    pub role: Role,
}

impl Caller {
    /// The caller of a request, where the authorization layer set one.
    pub fn of<T>(request: &tonic::Request<T>) -> Option<&Caller> {
        request.extensions().get::<Caller>()
    }
}

/// Who is on the other end of a connection, as the transport knows it. Tonic
/// puts it into every request's extensions.
#[derive(Debug, Clone)]
pub struct Peer {
    pub addr: Option<SocketAddr>,
    /// The client certificate, when one was presented over TLS.
    pub certificate: Option<PeerCertificate>,
}

impl Peer {
    /// Whether the peer connects from this host's loopback (IPv4, IPv6 or
    /// IPv4-mapped IPv6).
    pub fn is_loopback(&self) -> bool {
        self.addr
            .is_some_and(|a| a.ip().to_canonical().is_loopback())
    }
}

/// A client certificate and what its verification found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerCertificate {
    /// Verified against the client CA: the caller's name is its URI SAN, else
    /// its first DNS SAN (`None` when it has neither).
    Verified { identity: Option<String> },
    /// Not verified (another CA, expired, not for client use), and why.
    Rejected { reason: String },
}
