//! The gRPC listener's transport: plaintext, or TLS with a server certificate
//! and (with `tls.client_ca_file`) client certificates. The certificate, key
//! and client CA are re-read when their files change (cert-manager rotates
//! them): each new connection is accepted with the material in force, calls on
//! open connections go on undisturbed.
//!
//! With `tls.require_client_certificate` (the default once a client CA is
//! set), the handshake itself requires a client certificate and verifies it
//! against the client CA: a client without one, or with one from another CA or
//! expired, never gets a connection. Such a refusal is counted and recorded in
//! the audit trail (method `(TLS handshake)`), since no call ever reaches the
//! authorization layer.
//!
//! Without it (certificates optional, so callers with a bearer token need
//! none), a client certificate is checked in two steps. The handshake proves
//! the client holds the certificate's key (rustls checks its signature) but
//! lets any certificate through; right after it, the certificate chain is
//! verified against the client CA and the result travels with the connection
//! ([`Peer`]), so the authorization layer answers a certificate from another CA
//! or an expired one with `UNAUTHENTICATED` saying why.

use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::Stream;
use parking_lot::RwLock;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{
    DigitallySignedStruct, DistinguishedName, RootCertStore, ServerConfig, SignatureScheme,
};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tonic::transport::server::Connected;

use super::AuthError;
use crate::audit::Auditor;
use crate::domain::audit::{AuditEvent, Who};
use crate::limits::{AdmittedConnection, ConnectionRefusal, Connections};

pub use crate::caller::{Peer, PeerCertificate};

/// The files of the TLS material.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    /// With it, clients prove who they are with a certificate from this CA.
    pub client_ca_file: Option<PathBuf>,
    /// With a client CA: refuse at the handshake a client without a valid
    /// certificate (else a certificate is optional and checked per call).
    pub require_client_certificate: bool,
}

/// The certificate, key and client CA in force, re-readable at run time.
pub struct TlsMaterial {
    files: TlsFiles,
    // Swapped whole on reload; each new connection takes the Arc in force.
    current: RwLock<Arc<Loaded>>,
}

struct Loaded {
    acceptor: TlsAcceptor,
    /// The client CA's chain verifier, used after the handshake.
    client_verifier: Option<Arc<dyn ClientCertVerifier>>,
    /// The handshake already verified the client's chain (certificates
    /// required): after it only the identity is read.
    verified_at_handshake: bool,
    /// The files' bytes this was built from, to notice changes.
    contents: Vec<Vec<u8>>,
}

impl TlsMaterial {
    /// Reads and checks the files; an error names the file at fault.
    pub fn load(files: TlsFiles) -> Result<Self, String> {
        let loaded = build(&files, read_all(&files)?)?;
        Ok(Self {
            files,
            current: RwLock::new(Arc::new(loaded)),
        })
    }

    /// Re-reads the files. On error the material in force stays, and the error says why.
    pub fn reload(&self) -> Result<(), String> {
        let loaded = build(&self.files, read_all(&self.files)?)?;
        *self.current.write() = Arc::new(loaded);
        Ok(())
    }

    /// Re-reads the files if any changed; `Ok(true)` when new material is in force.
    pub fn reload_if_changed(&self) -> Result<bool, String> {
        let contents = read_all(&self.files)?;
        if contents == self.current.read().contents {
            return Ok(false);
        }
        let loaded = build(&self.files, contents)?;
        *self.current.write() = Arc::new(loaded);
        Ok(true)
    }

    pub fn requests_client_certificates(&self) -> bool {
        self.files.client_ca_file.is_some()
    }

    /// Whether the handshake refuses clients without a valid certificate.
    pub fn requires_client_certificates(&self) -> bool {
        self.requests_client_certificates() && self.files.require_client_certificate
    }

    fn current(&self) -> Arc<Loaded> {
        self.current.read().clone()
    }
}

fn read_all(files: &TlsFiles) -> Result<Vec<Vec<u8>>, String> {
    let read = |key: &str, path: &Path| {
        std::fs::read(path).map_err(|e| format!("read {key} {}: {e}", path.display()))
    };
    let mut contents = vec![
        read("tls.cert_file", &files.cert_file)?,
        read("tls.key_file", &files.key_file)?,
    ];
    if let Some(ca) = &files.client_ca_file {
        contents.push(read("tls.client_ca_file", ca)?);
    }
    Ok(contents)
}

fn build(files: &TlsFiles, contents: Vec<Vec<u8>>) -> Result<Loaded, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&contents[0])
        .collect::<Result<_, _>>()
        .map_err(|e| format!("tls.cert_file {}: {e}", files.cert_file.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "tls.cert_file {}: no PEM certificate in it",
            files.cert_file.display()
        ));
    }
    let key = PrivateKeyDer::from_pem_slice(&contents[1])
        .map_err(|e| format!("tls.key_file {}: {e}", files.key_file.display()))?;
    let client_verifier = match (&files.client_ca_file, contents.get(2)) {
        (Some(path), Some(pem)) => {
            let mut roots = RootCertStore::empty();
            for cert in CertificateDer::pem_slice_iter(pem) {
                let cert =
                    cert.map_err(|e| format!("tls.client_ca_file {}: {e}", path.display()))?;
                roots
                    .add(cert)
                    .map_err(|e| format!("tls.client_ca_file {}: {e}", path.display()))?;
            }
            if roots.is_empty() {
                return Err(format!(
                    "tls.client_ca_file {}: no PEM certificate in it",
                    path.display()
                ));
            }
            Some(
                WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                    .build()
                    .map_err(|e| format!("tls.client_ca_file {}: {e}", path.display()))?,
            )
        }
        _ => None,
    };
    let builder = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?;
    let builder = match &client_verifier {
        Some(verifier) => builder.with_client_cert_verifier(Arc::new(HandshakeVerifier {
            inner: verifier.clone(),
            mandatory: files.require_client_certificate,
        })),
        None => builder.with_no_client_auth(),
    };
    let mut config = builder.with_single_cert(certs, key).map_err(|e| {
        format!(
            "tls.cert_file {} / tls.key_file {}: {e}",
            files.cert_file.display(),
            files.key_file.display()
        )
    })?;
    // gRPC is HTTP/2 only.
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Loaded {
        acceptor: TlsAcceptor::from(Arc::new(config)),
        verified_at_handshake: client_verifier.is_some() && files.require_client_certificate,
        client_verifier,
        contents,
    })
}

/// The handshake-time client verifier. Mandatory: the client CA's own
/// verifier, a client without a valid certificate fails the handshake.
/// Optional: asks for a certificate (so token callers need none), checks that
/// the client holds its key, and leaves the chain check to [`verify_peer`]
/// right after the handshake.
#[derive(Debug)]
struct HandshakeVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    mandatory: bool,
}

impl ClientCertVerifier for HandshakeVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        self.mandatory
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        if self.mandatory {
            self.inner
                .verify_client_cert(end_entity, intermediates, now)
        } else {
            Ok(ClientCertVerified::assertion())
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

impl Loaded {
    /// What the client certificate of an accepted connection says: verified
    /// at the handshake already, or verified now against the client CA.
    fn peer_certificate(&self, session: &rustls::ServerConnection) -> Option<PeerCertificate> {
        let chain = session.peer_certificates()?;
        if self.verified_at_handshake {
            return chain.first().map(|end_entity| PeerCertificate::Verified {
                identity: certificate_identity(end_entity),
            });
        }
        verify_peer(self.client_verifier.as_deref()?, chain)
    }
}

/// Verifies a presented chain against the client CA and reads the caller's
/// certificate identity.
fn verify_peer(
    verifier: &dyn ClientCertVerifier,
    chain: &[CertificateDer<'_>],
) -> Option<PeerCertificate> {
    let (end_entity, intermediates) = chain.split_first()?;
    Some(
        match verifier.verify_client_cert(end_entity, intermediates, UnixTime::now()) {
            Ok(_) => PeerCertificate::Verified {
                identity: certificate_identity(end_entity),
            },
            Err(e) => PeerCertificate::Rejected {
                reason: e.to_string(),
            },
        },
    )
}

/// A certificate's caller name: its first URI SAN (e.g. a SPIFFE ID), else its
/// first DNS SAN.
pub fn certificate_identity(der: &[u8]) -> Option<String> {
    use x509_parser::prelude::{FromDer as _, GeneralName, X509Certificate};
    let (_, cert) = X509Certificate::from_der(der).ok()?;
    let san = cert.subject_alternative_name().ok()??;
    let names = &san.value.general_names;
    names
        .iter()
        .find_map(|n| match n {
            GeneralName::URI(uri) => Some((*uri).to_owned()),
            _ => None,
        })
        .or_else(|| {
            names.iter().find_map(|n| match n {
                GeneralName::DNSName(dns) => Some((*dns).to_owned()),
                _ => None,
            })
        })
}

/// One accepted connection: plaintext or TLS.
pub enum Conn {
    Plain(TcpStream, Peer),
    Tls(Box<TlsStream<TcpStream>>, Peer),
}

impl Connected for Conn {
    type ConnectInfo = Peer;

    fn connect_info(&self) -> Peer {
        match self {
            Conn::Plain(_, peer) | Conn::Tls(_, peer) => peer.clone(),
        }
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s, _) => Pin::new(s).poll_read(cx, buf),
            Conn::Tls(s, _) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Conn::Plain(s, _) => Pin::new(s).poll_write(cx, buf),
            Conn::Tls(s, _) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Conn::Plain(s, _) => Pin::new(s).poll_write_vectored(cx, bufs),
            Conn::Tls(s, _) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Conn::Plain(s, _) => s.is_write_vectored(),
            Conn::Tls(s, _) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s, _) => Pin::new(s).poll_flush(cx),
            Conn::Tls(s, _) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s, _) => Pin::new(s).poll_shutdown(cx),
            Conn::Tls(s, _) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// The connections of `listener`, with TLS when `tls` is given. Accepting runs
/// in a task of its own and each handshake in another, so a slow or silent
/// client never holds up the others. The task ends when the stream is dropped.
///
/// Each connection takes a place in `connections` at accept (a peer or the
/// replica at its cap: closed at once) and must finish its TLS handshake and
/// send the HTTP/2 preface within `connections.handshake_timeout`.
///
/// A client refused at the handshake for its certificate (none, or one that
/// does not verify, with `tls.require_client_certificate`) is recorded in
/// `audit`; other failed handshakes (port scans, TCP probes) are only counted.
pub fn incoming(
    listener: TcpListener,
    tls: Option<Arc<TlsMaterial>>,
    audit: Auditor,
    connections: Arc<Connections>,
) -> impl Stream<Item = Result<AdmittedConnection<Conn>, io::Error>> + Send + 'static {
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<AdmittedConnection<Conn>, io::Error>>(64);
    tokio::spawn(async move {
        let mut backoff = AcceptBackoff::default();
        loop {
            let accepted = tokio::select! {
                () = tx.closed() => return,
                accepted = listener.accept() => accepted,
            };
            let (stream, addr) = match accepted {
                Ok(ok) => {
                    backoff.reset();
                    ok
                }
                Err(error) => {
                    // Out of file descriptors and the like: pause instead of spinning.
                    backoff.wait(&error).await;
                    continue;
                }
            };
            let deadline = tokio::time::Instant::now() + connections.handshake_timeout;
            let Ok(slot) = connections.admit(addr) else {
                continue; // dropping the socket closes it
            };
            // Call handling sends small, latency-sensitive requests.
            let _ = stream.set_nodelay(true);
            let long_streams = crate::caller::LongStreams::default();
            let peer = Peer {
                addr: Some(addr),
                certificate: None,
                long_streams: long_streams.clone(),
            };
            let Some(tls) = &tls else {
                let conn = AdmittedConnection::new(
                    Conn::Plain(stream, peer),
                    slot,
                    addr,
                    deadline,
                    long_streams,
                );
                if tx.send(Ok(conn)).await.is_err() {
                    return;
                }
                continue;
            };
            let loaded = tls.current();
            let tx = tx.clone();
            let audit = audit.clone();
            let connections = connections.clone();
            tokio::spawn(async move {
                // A plaintext gRPC client (`grpcurl -plaintext`) on this TLS port
                // would otherwise wait for an answer it cannot read while nothing
                // is logged: named here (rate-limited), and told so in HTTP/2.
                let mut first = [0u8; H2_PREFACE.len()];
                if let Ok(Ok(n)) = tokio::time::timeout_at(deadline, stream.peek(&mut first)).await
                    && is_plaintext_h2(&first[..n])
                {
                    crate::metrics::auth_metrics().tls_handshake_failed();
                    if let Some(suppressed) = PLAINTEXT_H2_WARNING.due(std::time::Instant::now()) {
                        tracing::warn!(
                            %addr,
                            suppressed,
                            "a plaintext HTTP/2 client connected to the TLS port: this port speaks \
                             TLS only; connect with TLS (grpcurl: leave out -plaintext and pass \
                             -cacert with the CA of the server's certificate). At most one such \
                             warning per {} s; `suppressed` counts the ones left out since the last",
                            PLAINTEXT_H2_WARNING.every.as_secs()
                        );
                    }
                    refuse_plaintext_h2(stream).await;
                    return;
                }
                let handshake = loaded.acceptor.accept(stream).into_fallible();
                match tokio::time::timeout_at(deadline, handshake).await {
                    Ok(Ok(stream)) => {
                        let mut peer = peer;
                        peer.certificate = loaded.peer_certificate(stream.get_ref().1);
                        let conn = Conn::Tls(Box::new(stream), peer);
                        let _ = tx
                            .send(Ok(AdmittedConnection::new(
                                conn,
                                slot,
                                addr,
                                deadline,
                                long_streams,
                            )))
                            .await;
                    }
                    Ok(Err((error, stream))) => {
                        tracing::debug!(%addr, %error, "TLS handshake failed");
                        crate::metrics::auth_metrics().tls_handshake_failed();
                        if let Some((reason, detail)) = certificate_refusal(&error) {
                            record_handshake_refusal(&audit, addr, reason, &detail);
                        }
                        close_gently(stream).await;
                    }
                    Err(_) => {
                        tracing::debug!(%addr, "TLS handshake timed out");
                        crate::metrics::auth_metrics().tls_handshake_failed();
                        connections.refused(addr, ConnectionRefusal::HandshakeTimeout);
                    }
                }
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

/// The pause after a failed accept: 10 ms, doubling to 1 s while accepts keep
/// failing (EMFILE does not go away by retrying at once). Each failure is
/// counted; the first of a run is logged.
#[derive(Default)]
struct AcceptBackoff {
    failures: u32,
}

impl AcceptBackoff {
    const FIRST: Duration = Duration::from_millis(10);
    const MAX: Duration = Duration::from_secs(1);

    fn reset(&mut self) {
        self.failures = 0;
    }

    async fn wait(&mut self, error: &io::Error) {
        crate::metrics::metrics().accept_error();
        if self.failures == 0 {
            tracing::warn!(%error, "accept failed; backing off (licensing_accept_errors_total)");
        }
        let pause = Self::FIRST
            .saturating_mul(1 << self.failures.min(7))
            .min(Self::MAX);
        self.failures = self.failures.saturating_add(1);
        tokio::time::sleep(pause).await;
    }
}

/// The client connection preface of HTTP/2 (RFC 9113, 3.4): what a plaintext
/// gRPC client sends first. A TLS client starts with a handshake record (0x16).
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Whether the first bytes of a connection are (the start of) the HTTP/2 preface.
fn is_plaintext_h2(first: &[u8]) -> bool {
    first.len() >= 3 && H2_PREFACE.starts_with(&first[..first.len().min(H2_PREFACE.len())])
}

/// The warning about plaintext HTTP/2 clients on the TLS port: at most one per 10 s.
static PLAINTEXT_H2_WARNING: RateLimited = RateLimited::new(Duration::from_secs(10));

/// At most one event per `every` is let through; the others are counted, and the
/// next one let through says how many were left out.
pub struct RateLimited {
    every: Duration,
    /// When the last one was let through, and how many were left out since.
    state: std::sync::Mutex<(Option<std::time::Instant>, u64)>,
}

impl RateLimited {
    pub const fn new(every: Duration) -> Self {
        Self {
            every,
            state: std::sync::Mutex::new((None, 0)),
        }
    }

    /// `Some(left out since the last)` when an event at `now` is let through.
    pub fn due(&self, now: std::time::Instant) -> Option<u64> {
        let mut state = self
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let (last, suppressed) = &mut *state;
        if last.is_some_and(|at| now.saturating_duration_since(at) < self.every) {
            *suppressed = suppressed.saturating_add(1);
            return None;
        }
        *last = Some(now);
        Some(std::mem::take(suppressed))
    }
}

/// The answer to a plaintext HTTP/2 client: the server's (empty) SETTINGS and a
/// GOAWAY (PROTOCOL_ERROR) whose debug data says why, then the connection closes.
/// grpc clients show the debug data or at least fail at once instead of waiting.
async fn refuse_plaintext_h2(mut stream: TcpStream) {
    use tokio::io::AsyncWriteExt as _;
    const WHY: &[u8] =
        b"this port speaks TLS: connect with TLS (grpcurl without -plaintext, with -cacert)";
    let mut frames = Vec::with_capacity(9 + 9 + 8 + WHY.len());
    // SETTINGS: length 0, type 0x4, no flags, stream 0.
    frames.extend_from_slice(&[0, 0, 0, 0x4, 0, 0, 0, 0, 0]);
    // GOAWAY: type 0x7, stream 0; last stream 0, error PROTOCOL_ERROR (0x1), debug data.
    let length = u32::try_from(8 + WHY.len()).unwrap_or(8).to_be_bytes();
    frames.extend_from_slice(&[length[1], length[2], length[3], 0x7, 0, 0, 0, 0, 0]);
    frames.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 0x1]);
    frames.extend_from_slice(WHY);
    let _ = tokio::time::timeout(ALERT_LINGER, stream.write_all(&frames)).await;
    close_gently(stream).await;
}

/// How long a refused client has to read the TLS alert that says why.
const ALERT_LINGER: Duration = Duration::from_secs(1);

/// Closes a connection whose handshake failed so that the client reads the
/// TLS alert (e.g. `certificate required`): send FIN, then read and discard
/// what the client still sends for a moment. Closed at once, with the
/// client's first data unread, the kernel answers with a reset and the
/// client sees only `broken pipe`.
async fn close_gently(mut stream: TcpStream) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let _ = stream.shutdown().await;
    let mut sink = [0u8; 4096];
    let _ = tokio::time::timeout(ALERT_LINGER, async {
        while let Ok(1..) = stream.read(&mut sink).await {}
    })
    .await;
}

/// Why a failed handshake refused the client's certificate, if that was the
/// cause (rustls's error inside the I/O error): the reason label of
/// `licensing_auth_refused_total` and the audit entry's detail.
fn certificate_refusal(error: &io::Error) -> Option<(&'static str, String)> {
    match error.get_ref()?.downcast_ref::<rustls::Error>()? {
        rustls::Error::NoCertificatesPresented => Some((
            AuthError::MissingCredentials.reason(),
            "refused at the TLS handshake: no client certificate \
             (tls.require_client_certificate)"
                .to_owned(),
        )),
        rustls::Error::InvalidCertificate(why) => {
            let error = AuthError::CertificateRejected(why.to_string());
            Some((
                error.reason(),
                format!("refused at the TLS handshake: {error}"),
            ))
        }
        _ => None,
    }
}

/// Counts and records a client refused at the handshake: no call reached the
/// authorization layer, so this is the audit trail's only trace of it.
fn record_handshake_refusal(audit: &Auditor, addr: SocketAddr, reason: &'static str, detail: &str) {
    crate::metrics::auth_metrics().refused(reason, "UNAUTHENTICATED");
    audit.record_refusal(AuditEvent::new(
        audit.now(),
        Who::Anonymous(Some(addr.ip())),
        HANDSHAKE_METHOD,
        "UNAUTHENTICATED",
        detail,
    ));
}

/// The audit trail's method name for a client refused at the TLS handshake.
pub const HANDSHAKE_METHOD: &str = "(TLS handshake)";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_http2_preface_is_told_from_a_tls_client_hello() {
        assert!(is_plaintext_h2(H2_PREFACE));
        // The preface and the client's first SETTINGS frame in one read.
        assert!(is_plaintext_h2(
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04"
        ));
        // A preface still arriving.
        assert!(is_plaintext_h2(b"PRI * HT"));
        // A TLS ClientHello record, too little to tell, and HTTP/1.
        assert!(!is_plaintext_h2(&[0x16, 0x03, 0x01, 0x02, 0x00]));
        assert!(!is_plaintext_h2(b"PR"));
        assert!(!is_plaintext_h2(b"GET / HTTP/1.1\r\n"));
    }

    #[test]
    fn at_most_one_warning_per_interval_counting_the_rest() {
        let limit = RateLimited::new(Duration::from_secs(10));
        let t0 = std::time::Instant::now();
        assert_eq!(limit.due(t0), Some(0));
        assert_eq!(limit.due(t0 + Duration::from_secs(1)), None);
        assert_eq!(limit.due(t0 + Duration::from_secs(9)), None);
        assert_eq!(limit.due(t0 + Duration::from_secs(10)), Some(2));
        assert_eq!(limit.due(t0 + Duration::from_secs(11)), None);
        assert_eq!(limit.due(t0 + Duration::from_secs(25)), Some(1));
        // A clock read out of order counts as within the interval.
        assert_eq!(limit.due(t0), None);
    }
}
