//! The vendor's licensing server (CIC server / Voucher Center), behind one narrow
//! trait. Two implementations:
//!
//! - [`grpc::GrpcLicensingServer`]: the network protocol of
//!   `proto/comtrexx/vendor/v1/vendor.proto` (TLS with rustls, every call bounded);
//! - [`file::LicenseFile`]: a signed license file, for air-gapped sites.
//!
//! Failures are classified so the caller knows whether retrying can help.

pub mod file;
pub mod grpc;

use std::path::PathBuf;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use rand::Rng as _;

use crate::domain::SerialNumber;

/// Where entitlements come from (`licensing_server.*`, `license_file`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LicenseSource {
    None,
    /// A signed license file ([`file::LicenseFile`] reads it at each reconcile).
    File(PathBuf),
    /// The vendor's licensing server ([`grpc::GrpcLicensingServer`]).
    Server {
        url: String,
        /// PEM CA bundle to verify the server with (read when the client is built).
        ca_file: Option<PathBuf>,
        timeout: Duration,
    },
}

/// Why the licensing server gave no usable answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UpstreamError {
    /// Unreachable, timed out, or a server-side failure (5xx): retrying may help.
    #[error("licensing server unreachable: {0}")]
    Transient(String),
    /// The server answered, and the answer is final (unknown serial, bad code,
    /// not allowed): retrying the same request does not help.
    #[error("licensing server refused: {0}")]
    Conclusive(String),
}

/// The licensing server's answer to a tryout start, as received: nothing in it is
/// trusted before the service verified it (`domain::signed_tryout`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TryoutClaim {
    /// The signed tryout record (JSON, `comtrexx-tryout/v1`); empty from a server
    /// that does not sign its tryout answers.
    pub signed_tryout: String,
}

/// One day's peak of a concurrent feature, as reported with a reconcile.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsagePeak {
    pub feature: String,
    /// The UTC day, `YYYY-MM-DD`.
    pub day: String,
    pub peak_in_use: u32,
    pub capacity: u32,
    pub busy: u64,
}

/// What the service needs from the vendor's licensing server.
#[async_trait]
pub trait LicensingServer: Send + Sync + 'static {
    /// Exchanges an initialization code for a signed activation response (the
    /// text an operator would otherwise copy from the vendor portal).
    async fn activate(&self, initialization_code: &str) -> Result<String, UpstreamError>;

    /// The signed license document of a serial number (JSON text).
    async fn fetch_license(&self, serial: &SerialNumber) -> Result<String, UpstreamError>;

    /// [`LicensingServer::fetch_license`], reporting the concurrent features'
    /// daily peaks of use with it (the vendor's usage record). A source that
    /// keeps no usage (a license file) only fetches.
    async fn fetch_license_reporting(
        &self,
        serial: &SerialNumber,
        _usage: &[UsagePeak],
    ) -> Result<String, UpstreamError> {
        self.fetch_license(serial).await
    }

    /// Reports that the serial started its tryout (best effort).
    async fn report_tryout(
        &self,
        serial: &SerialNumber,
        started_at: DateTime<Utc>,
    ) -> Result<(), UpstreamError>;

    /// Asks the licensing server whether the serial may start its tryout at
    /// `started_at`, recording the start if it may: its record is authoritative
    /// (once per serial, ever). The signed answer carries `nonce`. `Ok(None)`:
    /// the source keeps no such record (a license file), so only the store's
    /// record counts.
    async fn start_tryout(
        &self,
        serial: &SerialNumber,
        started_at: DateTime<Utc>,
        nonce: &str,
    ) -> Result<Option<TryoutClaim>, UpstreamError>;

    /// Where it is, for logs and the overview (no secrets).
    fn describe(&self) -> String;

    /// Whether a PBX must be initialized (activation response applied) before
    /// scheduled reconciles fetch its licenses. A licensing server answers for any
    /// serial, so a reset PBX stays reset until initialized again; a license file
    /// is the activation of an air-gapped site.
    fn requires_activation(&self) -> bool {
        true
    }
}

/// Jittered exponential backoff for transient failures.
#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    pub first: Duration,
    pub max: Duration,
    pub attempts: u32,
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            first: Duration::from_millis(200),
            max: Duration::from_secs(5),
            attempts: 3,
        }
    }
}

impl Backoff {
    /// The delay before retry `n` (0-based): full jitter over `first * 2^n`, capped.
    pub fn delay(&self, n: u32) -> Duration {
        let ceiling = self
            .first
            .saturating_mul(2u32.saturating_pow(n))
            .min(self.max);
        let millis = u64::try_from(ceiling.as_millis())
            .unwrap_or(u64::MAX)
            .max(1);
        Duration::from_millis(rand::thread_rng().gen_range(millis / 2..=millis))
    }

    /// Runs `call`, retrying transient failures; conclusive ones return at once.
    pub async fn retry<T, F, Fut>(&self, mut call: F) -> Result<T, UpstreamError>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, UpstreamError>>,
    {
        let mut n = 0;
        loop {
            match call().await {
                Err(UpstreamError::Transient(e)) if n + 1 < self.attempts => {
                    tracing::debug!(attempt = n + 1, error = %e, "licensing server call failed; retrying");
                    tokio::time::sleep(self.delay(n)).await;
                    n += 1;
                }
                other => return other,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    fn quick() -> Backoff {
        Backoff {
            first: Duration::from_millis(1),
            max: Duration::from_millis(4),
            attempts: 3,
        }
    }

    #[tokio::test]
    async fn transient_failures_are_retried() {
        let calls = AtomicU32::new(0);
        let result = quick()
            .retry(|| async {
                if calls.fetch_add(1, Ordering::SeqCst) < 2 {
                    Err(UpstreamError::Transient("down".into()))
                } else {
                    Ok(7)
                }
            })
            .await;
        assert_eq!(result, Ok(7));
        assert_eq!(calls.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn retries_stop_after_the_attempts() {
        let calls = AtomicU32::new(0);
        let result: Result<(), _> = quick()
            .retry(|| async {
                calls.fetch_add(1, Ordering::SeqCst);
                Err(UpstreamError::Transient("down".into()))
            })
            .await;
        assert!(matches!(result, Err(UpstreamError::Transient(_))));
        assert_eq!(calls.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn conclusive_failures_are_not_retried() {
        let calls = AtomicU32::new(0);
        let result: Result<(), _> = quick()
            .retry(|| async {
                calls.fetch_add(1, Ordering::SeqCst);
                Err(UpstreamError::Conclusive("unknown serial".into()))
            })
            .await;
        assert!(matches!(result, Err(UpstreamError::Conclusive(_))));
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn delays_grow_with_jitter_and_cap() {
        let b = Backoff {
            first: Duration::from_millis(100),
            max: Duration::from_millis(1000),
            attempts: 10,
        };
        for n in 0..8 {
            let d = b.delay(n);
            let ceiling = (100u64 << n).min(1000);
            assert!(
                d >= Duration::from_millis(ceiling / 2) && d <= Duration::from_millis(ceiling),
                "{n}: {d:?}"
            );
        }
    }
}
