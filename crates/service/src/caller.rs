//! Who is calling, as request extensions: the [`Peer`] a connection comes
//! from (the transport's knowledge: address, client certificate) and the
//! [`Caller`] the authorization layer established from it (name and role).
//! Below every layer that reads them (authorization, limits, handlers, audit).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

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
    /// The streams of this connection meant to stay open for hours.
    pub long_streams: LongStreams,
}

/// How many streams meant to stay open for hours (`WatchSeats`) a connection
/// carries: while one is open, the connection is not closed at its maximum
/// age and grace (it still gets `GOAWAY`, so new calls go elsewhere). Shared
/// by the connection and its requests' [`Peer`].
#[derive(Debug, Clone, Default)]
pub struct LongStreams(Arc<AtomicUsize>);

impl LongStreams {
    /// Counts one open stream until the returned hold drops.
    pub fn hold(&self) -> LongStreamHold {
        self.0.fetch_add(1, Ordering::Relaxed);
        LongStreamHold(self.0.clone())
    }

    pub fn open(&self) -> usize {
        self.0.load(Ordering::Relaxed)
    }
}

/// One open long stream of a connection (see [`LongStreams`]).
#[derive(Debug)]
pub struct LongStreamHold(Arc<AtomicUsize>);

impl Drop for LongStreamHold {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
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
