//! The gRPC listener's transport: plaintext, or TLS with a server certificate
//! and (with `tls.client_ca_file`) client certificates. The certificate, key
//! and client CA are re-read when their files change (cert-manager rotates
//! them): each new connection is accepted with the material in force, calls on
//! open connections go on undisturbed.
//!
//! A client certificate is checked in two steps. The handshake proves the
//! client holds the certificate's key (rustls checks its signature) but lets
//! any certificate through; right after it, the certificate chain is verified
//! against the client CA and the result travels with the connection
//! ([`Peer`]), so the authorization layer answers a certificate from another CA
//! or an expired one with `UNAUTHENTICATED` saying why, instead of a bare
//! handshake failure the caller cannot read.

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

/// How long a client may take to finish the TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

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

/// The files of the TLS material.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    /// With it, clients may prove who they are with a certificate from this CA.
    pub client_ca_file: Option<PathBuf>,
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
        Some(verifier) => builder.with_client_cert_verifier(Arc::new(ProofOfPossession {
            inner: verifier.clone(),
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
        client_verifier,
        contents,
    })
}

/// The handshake-time client verifier: asks for a certificate (optional, so
/// token callers need none), checks that the client holds its key, and leaves
/// the chain check to [`verify_peer`] right after the handshake.
#[derive(Debug)]
struct ProofOfPossession {
    inner: Arc<dyn ClientCertVerifier>,
}

impl ClientCertVerifier for ProofOfPossession {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        false
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        Ok(ClientCertVerified::assertion())
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
pub fn incoming(
    listener: TcpListener,
    tls: Option<Arc<TlsMaterial>>,
) -> impl Stream<Item = Result<Conn, io::Error>> + Send + 'static {
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Conn, io::Error>>(64);
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                () = tx.closed() => return,
                accepted = listener.accept() => accepted,
            };
            let (stream, addr) = match accepted {
                Ok(ok) => ok,
                Err(error) => {
                    // Out of file descriptors and the like: pause instead of spinning.
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            // Call handling sends small, latency-sensitive requests.
            let _ = stream.set_nodelay(true);
            let peer = Peer {
                addr: Some(addr),
                certificate: None,
            };
            let Some(tls) = &tls else {
                if tx.send(Ok(Conn::Plain(stream, peer))).await.is_err() {
                    return;
                }
                continue;
            };
            let loaded = tls.current();
            let tx = tx.clone();
            tokio::spawn(async move {
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, loaded.acceptor.accept(stream)).await
                {
                    Ok(Ok(stream)) => {
                        let mut peer = peer;
                        if let (Some(verifier), Some(chain)) = (
                            &loaded.client_verifier,
                            stream.get_ref().1.peer_certificates(),
                        ) {
                            peer.certificate = verify_peer(verifier.as_ref(), chain);
                        }
                        let _ = tx.send(Ok(Conn::Tls(Box::new(stream), peer))).await;
                    }
                    Ok(Err(error)) => {
                        tracing::debug!(%addr, %error, "TLS handshake failed");
                        crate::metrics::auth_metrics().tls_handshake_failed();
                    }
                    Err(_) => {
                        tracing::debug!(%addr, "TLS handshake timed out");
                        crate::metrics::auth_metrics().tls_handshake_failed();
                    }
                }
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}
