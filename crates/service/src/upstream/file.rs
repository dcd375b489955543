//! A signed license file as the license source, for air-gapped sites: reconcile
//! re-reads it; activation responses are pasted by the operator.

use std::path::PathBuf;

use async_trait::async_trait;
use chrono::{DateTime, Utc};

use super::{LicensingServer, TryoutClaim, UpstreamError};
use crate::domain::SerialNumber;

pub struct LicenseFile {
    path: PathBuf,
}

impl LicenseFile {
    pub fn new(path: PathBuf) -> Self {
        Self { path }
    }
}

#[async_trait]
impl LicensingServer for LicenseFile {
    async fn activate(&self, _initialization_code: &str) -> Result<String, UpstreamError> {
        Err(UpstreamError::Conclusive(
            "no licensing server configured (license file only): paste the vendor portal's response into ApplyActivation".into(),
        ))
    }

    async fn fetch_license(&self, _serial: &SerialNumber) -> Result<String, UpstreamError> {
        // A missing or unreadable file is like a server that cannot be reached:
        // the last good license stays, with grace.
        tokio::fs::read_to_string(&self.path).await.map_err(|e| {
            UpstreamError::Transient(format!("read license file {}: {e}", self.path.display()))
        })
    }

    async fn report_tryout(
        &self,
        _serial: &SerialNumber,
        _started_at: DateTime<Utc>,
    ) -> Result<(), UpstreamError> {
        Ok(()) // nobody to tell at an air-gapped site
    }

    async fn start_tryout(
        &self,
        _serial: &SerialNumber,
        _started_at: DateTime<Utc>,
        _nonce: &str,
    ) -> Result<Option<TryoutClaim>, UpstreamError> {
        Ok(None) // nobody to ask at an air-gapped site: the store's record counts
    }

    fn describe(&self) -> String {
        format!("license file {}", self.path.display())
    }

    fn requires_activation(&self) -> bool {
        false
    }
}
