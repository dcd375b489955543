//! The network licensing server: `comtrexx.vendor.v1.VendorLicensingService`
//! over gRPC (TLS with rustls for `https://` addresses), every call bounded.
//!
//! The channel connects lazily, on the first call, and reconnects by itself after
//! the server went away; no call waits longer than the configured timeout. Failures
//! are classified by [`classify`]: unreachable, timed out or server-side failures
//! are [`UpstreamError::Transient`]; final answers (unknown serial, bad code, not
//! allowed) are [`UpstreamError::Conclusive`]. Signatures are not checked here:
//! the service verifies every document and signed tryout answer it is handed.

use std::path::Path;
use std::sync::OnceLock;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use tonic::Code;
use tonic::transport::{Channel, Endpoint};

use super::{LicensingServer, TryoutClaim, UpstreamError};
use crate::domain::SerialNumber;
use comtrexx_licensing_proto::vendor_pb;
use comtrexx_licensing_proto::vendor_pb::vendor_licensing_service_client::VendorLicensingServiceClient;

type Client = VendorLicensingServiceClient<Channel>;

/// The vendor's licensing server reached over gRPC.
pub struct GrpcLicensingServer {
    url: String,
    endpoint: Endpoint,
    timeout: Duration,
    /// Built on first use: a lazy channel spawns its worker on the running Tokio
    /// runtime, and `new` may be called where there is none (configuration checks).
    client: OnceLock<Client>,
}

impl GrpcLicensingServer {
    /// A client of the server at `url` (`http://` or `https://`). For `https://`,
    /// the server certificate is checked against `ca_file` (PEM) when given, else
    /// against the public web roots. `timeout` bounds connecting and every call.
    /// Nothing is connected yet: an unreachable server shows on the first call.
    pub fn new(url: &str, ca_file: Option<&Path>, timeout: Duration) -> Result<Self, String> {
        let endpoint = endpoint(url, ca_file, timeout)?;
        Ok(Self {
            url: url.to_owned(),
            endpoint,
            timeout,
            client: OnceLock::new(),
        })
    }

    fn client(&self) -> Client {
        self.client
            .get_or_init(|| VendorLicensingServiceClient::new(self.endpoint.connect_lazy()))
            .clone()
    }

    /// Runs one call, bounded by the timeout, and classifies its failure.
    async fn call<T>(
        &self,
        what: &str,
        fut: impl Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    ) -> Result<T, UpstreamError> {
        match tokio::time::timeout(self.timeout, fut).await {
            Ok(Ok(response)) => Ok(response.into_inner()),
            Ok(Err(status)) => Err(classify(
                status.code(),
                &format!("{what}: {}", describe_status(&status)),
            )),
            Err(_) => Err(UpstreamError::Transient(format!(
                "{what}: no answer from {} within {} ms",
                self.url,
                self.timeout.as_millis()
            ))),
        }
    }
}

pub use comtrexx_licensing_proto::endpoint;

/// Whether a gRPC status code from the licensing server is worth retrying.
///
/// Transient (retry with backoff, keep the last good state meanwhile): the server
/// is down, overloaded, timed out, or failed on its side. Conclusive (the answer is
/// final for this request): the serial is unknown, the code is bad, the caller is
/// not allowed, the server does not implement the call.
pub fn classify(code: Code, message: &str) -> UpstreamError {
    let transient = match code {
        Code::Unavailable
        | Code::DeadlineExceeded
        | Code::Internal
        | Code::Unknown
        | Code::ResourceExhausted
        | Code::Aborted
        // A call cut off mid-way (connection reset) or data lost in transit:
        // asking again may well work.
        | Code::Cancelled
        | Code::DataLoss
        // An error status with code OK is a broken server, not an answer.
        | Code::Ok => true,
        Code::InvalidArgument
        | Code::NotFound
        | Code::PermissionDenied
        | Code::Unauthenticated
        | Code::FailedPrecondition
        | Code::Unimplemented
        | Code::OutOfRange
        | Code::AlreadyExists => false,
    };
    if transient {
        UpstreamError::Transient(message.to_owned())
    } else {
        UpstreamError::Conclusive(message.to_owned())
    }
}

/// The status as one line, with the transport error behind it when there is one
/// (tonic reports "connection refused" only in the source chain).
fn describe_status(status: &tonic::Status) -> String {
    let mut text = format!("{:?}: {}", status.code(), status.message());
    let mut source = std::error::Error::source(status);
    while let Some(e) = source {
        let line = e.to_string();
        if !text.contains(&line) {
            text.push_str(": ");
            text.push_str(&line);
        }
        source = e.source();
    }
    text
}

#[async_trait]
impl LicensingServer for GrpcLicensingServer {
    async fn activate(&self, initialization_code: &str) -> Result<String, UpstreamError> {
        let mut client = self.client();
        let request = vendor_pb::ActivateRequest {
            initialization_code: initialization_code.to_owned(),
        };
        let response = self.call("Activate", client.activate(request)).await?;
        Ok(response.activation_response)
    }

    async fn fetch_license(&self, serial: &SerialNumber) -> Result<String, UpstreamError> {
        self.fetch_license_reporting(serial, &[]).await
    }

    async fn fetch_license_reporting(
        &self,
        serial: &SerialNumber,
        usage: &[super::UsagePeak],
    ) -> Result<String, UpstreamError> {
        let mut client = self.client();
        let request = vendor_pb::FetchLicenseRequest {
            serial_number: serial.as_str().to_owned(),
            usage: usage
                .iter()
                .map(|u| vendor_pb::UsagePeak {
                    feature: u.feature.clone(),
                    day: u.day.clone(),
                    peak_in_use: u.peak_in_use,
                    capacity: u.capacity,
                    busy: u.busy,
                })
                .collect(),
        };
        let response = self
            .call("FetchLicense", client.fetch_license(request))
            .await?;
        Ok(response.signed_license)
    }

    async fn report_tryout(
        &self,
        serial: &SerialNumber,
        started_at: DateTime<Utc>,
    ) -> Result<(), UpstreamError> {
        let mut client = self.client();
        let request = vendor_pb::ReportTryoutRequest {
            serial_number: serial.as_str().to_owned(),
            started_at: Some(timestamp(started_at)),
        };
        self.call("ReportTryout", client.report_tryout(request))
            .await?;
        Ok(())
    }

    async fn start_tryout(
        &self,
        serial: &SerialNumber,
        started_at: DateTime<Utc>,
        nonce: &str,
    ) -> Result<Option<TryoutClaim>, UpstreamError> {
        let mut client = self.client();
        let request = vendor_pb::StartTryoutRequest {
            serial_number: serial.as_str().to_owned(),
            started_at: Some(timestamp(started_at)),
            nonce: nonce.to_owned(),
        };
        let response = self
            .call("StartTryout", client.start_tryout(request))
            .await?;
        // The unsigned `started_at` and `recorded` are for older clients: the
        // service decides with the signed record only.
        Ok(Some(TryoutClaim {
            signed_tryout: response.signed_tryout,
        }))
    }

    fn describe(&self) -> String {
        self.url.clone()
    }
}

pub use comtrexx_licensing_proto::{from_timestamp, timestamp};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_code_is_classified() {
        let transient = [
            Code::Unavailable,
            Code::DeadlineExceeded,
            Code::Internal,
            Code::Unknown,
            Code::ResourceExhausted,
            Code::Aborted,
            Code::Cancelled,
            Code::DataLoss,
            Code::Ok,
        ];
        let conclusive = [
            Code::InvalidArgument,
            Code::NotFound,
            Code::PermissionDenied,
            Code::Unauthenticated,
            Code::FailedPrecondition,
            Code::Unimplemented,
            Code::OutOfRange,
            Code::AlreadyExists,
        ];
        // All 17 gRPC codes, each in exactly one list.
        let mut all: Vec<i32> = transient
            .iter()
            .chain(&conclusive)
            .map(|c| *c as i32)
            .collect();
        all.sort_unstable();
        assert_eq!(all, (0..17).collect::<Vec<_>>());
        for code in transient {
            assert_eq!(
                classify(code, "m"),
                UpstreamError::Transient("m".into()),
                "{code:?}"
            );
        }
        for code in conclusive {
            assert_eq!(
                classify(code, "m"),
                UpstreamError::Conclusive("m".into()),
                "{code:?}"
            );
        }
    }

    #[test]
    fn urls_are_checked() {
        let t = Duration::from_secs(1);
        assert!(endpoint("http://127.0.0.1:7443", None, t).is_ok());
        assert!(endpoint("https://licensing.example.com", None, t).is_ok());
        assert!(endpoint("127.0.0.1:7443", None, t).is_err());
        assert!(endpoint("ftp://x", None, t).is_err());
        let missing = Path::new("/nonexistent/ca.pem");
        let err = endpoint("https://x", Some(missing), t).unwrap_err();
        assert!(err.contains("/nonexistent/ca.pem"), "{err}");
        assert!(endpoint("http://x", Some(missing), t).is_err());
    }

    #[test]
    fn new_needs_no_runtime_and_describes_the_url() {
        let server =
            GrpcLicensingServer::new("http://127.0.0.1:7443", None, Duration::from_secs(1))
                .unwrap();
        assert_eq!(server.describe(), "http://127.0.0.1:7443");
    }

    #[tokio::test]
    async fn an_unreachable_server_is_transient() {
        // A port nothing listens on: bind, note it, close.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let server = GrpcLicensingServer::new(
            &format!("http://127.0.0.1:{port}"),
            None,
            Duration::from_secs(2),
        )
        .unwrap();
        let serial = SerialNumber::parse("S1").unwrap();
        let err = server.fetch_license(&serial).await.unwrap_err();
        assert!(matches!(err, UpstreamError::Transient(_)), "{err:?}");
    }

    #[tokio::test]
    async fn a_server_that_never_answers_times_out_as_transient() {
        // Accepts TCP connections and then says nothing.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let hold = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((socket, _)) = listener.accept().await {
                held.push(socket);
            }
        });
        let server = GrpcLicensingServer::new(
            &format!("http://127.0.0.1:{port}"),
            None,
            Duration::from_millis(300),
        )
        .unwrap();
        let started = std::time::Instant::now();
        let err = server.activate("CTX1-AAAAA").await.unwrap_err();
        assert!(matches!(err, UpstreamError::Transient(_)), "{err:?}");
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{:?}",
            started.elapsed()
        );
        hold.abort();
    }

    #[test]
    fn timestamps_round_trip() {
        let at: DateTime<Utc> = "2026-03-01T12:34:56.789Z".parse().unwrap();
        assert_eq!(from_timestamp(&timestamp(at)), Some(at));
    }
}
