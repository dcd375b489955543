//! Test certificates: a CA of the test's own, server and client certificates
//! (valid or expired) in a temporary directory, and TLS clients that use them.

use std::path::PathBuf;
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SanType,
};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

/// A certificate authority and the files it issued.
pub struct Pki {
    pub dir: tempfile::TempDir,
    ca: CertifiedIssuer<'static, KeyPair>,
}

/// A certificate and its key, PEM.
#[derive(Clone)]
pub struct Pem {
    pub cert: String,
    pub key: String,
}

impl Pki {
    pub fn new(name: &str) -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
        Self {
            dir: tempfile::tempdir().unwrap(),
            ca,
        }
    }

    pub fn ca_pem(&self) -> String {
        self.ca.pem()
    }

    /// Writes the CA certificate; the path is what `tls.client_ca_file` takes.
    pub fn ca_file(&self) -> PathBuf {
        let path = self.dir.path().join("ca.pem");
        std::fs::write(&path, self.ca_pem()).unwrap();
        path
    }

    /// A server certificate for `localhost` and 127.0.0.1, with `label` as its
    /// common name (to tell rotated certificates apart).
    pub fn server(&self, label: &str) -> Pem {
        let mut params =
            CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()]).unwrap();
        params.distinguished_name.push(DnType::CommonName, label);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        self.issue(params)
    }

    /// A client certificate whose URI SAN is `identity`; expired if asked.
    pub fn client(&self, identity: &str, expired: bool) -> Pem {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(DnType::CommonName, identity);
        params.subject_alt_names = vec![SanType::URI(identity.try_into().unwrap())];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        if expired {
            params.not_before = rcgen::date_time_ymd(2020, 1, 1);
            params.not_after = rcgen::date_time_ymd(2021, 1, 1);
        }
        self.issue(params)
    }

    fn issue(&self, params: CertificateParams) -> Pem {
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.ca).unwrap();
        Pem {
            cert: cert.pem(),
            key: key.serialize_pem(),
        }
    }

    /// Writes a server certificate and key (atomically, as a Kubernetes Secret
    /// volume changes); returns (cert path, key path).
    pub fn write_server(&self, pem: &Pem) -> (PathBuf, PathBuf) {
        let cert = self.dir.path().join("tls.crt");
        let key = self.dir.path().join("tls.key");
        for (path, text) in [(&key, &pem.key), (&cert, &pem.cert)] {
            let tmp = path.with_extension("tmp");
            std::fs::write(&tmp, text).unwrap();
            std::fs::rename(&tmp, path).unwrap();
        }
        (cert, key)
    }
}

/// A TLS endpoint for `addr` trusting `ca_pem`, with a client certificate if given.
fn tls_endpoint(addr: std::net::SocketAddr, ca_pem: &str, client: Option<&Pem>) -> Endpoint {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca_pem))
        .domain_name("localhost");
    if let Some(pem) = client {
        tls = tls.identity(Identity::from_pem(&pem.cert, &pem.key));
    }
    Channel::from_shared(format!("https://{addr}"))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect_timeout(Duration::from_secs(5))
}

/// A TLS channel to `addr` trusting `ca_pem`, with a client certificate if given.
pub async fn tls_channel(
    addr: std::net::SocketAddr,
    ca_pem: &str,
    client: Option<&Pem>,
) -> Channel {
    tls_endpoint(addr, ca_pem, client)
        .connect()
        .await
        .expect("connect over TLS")
}

/// Like [`tls_channel`], but connecting on first use: a server that refuses
/// the client at the handshake makes the first call fail, not the set-up.
pub fn tls_channel_lazy(addr: std::net::SocketAddr, ca_pem: &str, client: Option<&Pem>) -> Channel {
    tls_endpoint(addr, ca_pem, client).connect_lazy()
}
