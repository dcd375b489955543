//! The simulator's gRPC side: `VendorLicensingService` (what a PBX's licensing
//! service calls), `VendorAdminService` (the portal: devices, vouchers,
//! "recreate certificate", plus stats and faults for tests), health and reflection.

use std::collections::BTreeMap;
use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use ed25519_dalek::SigningKey;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::transport::{Identity, Server, ServerTlsConfig};
use tonic::{Request, Response, Status};
use tonic_health::ServingStatus;

use super::state::{Device, STATE_FILE, SimError, SimState, UsageDay, load_or_create_key};
use comtrexx_licensing_domain::initcode::InitializationCode;
use comtrexx_licensing_domain::{
    Edition, Feature, LicensePayload, SeatModel, SerialNumber, SignedLicense, SignedTryout,
    TryoutPayload, TryoutPolicy,
};
use comtrexx_licensing_proto::VENDOR_FILE_DESCRIPTOR_SET;
use comtrexx_licensing_proto::vendor_pb::vendor_admin_service_server::{
    VendorAdminService, VendorAdminServiceServer,
};
use comtrexx_licensing_proto::vendor_pb::vendor_licensing_service_server::{
    VendorLicensingService, VendorLicensingServiceServer,
};
use comtrexx_licensing_proto::vendor_pb::{self as pb, Fault};
use comtrexx_licensing_proto::{from_timestamp, timestamp};

/// The serial number documents carry under the `WRONG_SERIAL` fault.
pub const WRONG_SERIAL: &str = "WRONG-SERIAL";

/// Licensing calls answered, per serial number.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CallCounts {
    pub activate: u64,
    pub fetch_license: u64,
    pub report_tryout: u64,
    pub start_tryout: u64,
}

#[derive(Clone, Copy)]
enum Call {
    Activate,
    FetchLicense,
    ReportTryout,
    StartTryout,
}

/// The simulator: state, key, fault and counters; cheap to clone (shared).
#[derive(Clone)]
pub struct Simulator {
    inner: Arc<Inner>,
}

struct Inner {
    /// Held across the save, so changes are written in the order they are made.
    state: tokio::sync::Mutex<SimState>,
    state_path: PathBuf,
    key: SigningKey,
    fault: parking_lot::Mutex<Fault>,
    stats: parking_lot::Mutex<BTreeMap<String, CallCounts>>,
}

impl Simulator {
    /// Opens (or starts) the state directory: `state.json` and `signing.key`.
    pub fn open(state_dir: &std::path::Path) -> anyhow::Result<Self> {
        let key = load_or_create_key(state_dir)?;
        let state_path = state_dir.join(STATE_FILE);
        let state = SimState::load(&state_path)?;
        Ok(Self {
            inner: Arc::new(Inner {
                state: tokio::sync::Mutex::new(state),
                state_path,
                key,
                fault: parking_lot::Mutex::new(Fault::None),
                stats: parking_lot::Mutex::new(BTreeMap::new()),
            }),
        })
    }

    /// The published verifying key (what the service configures as `vendor_public_key`).
    pub fn public_key(&self) -> ed25519_dalek::VerifyingKey {
        self.inner.key.verifying_key()
    }

    /// The current fault.
    pub fn fault(&self) -> Fault {
        *self.inner.fault.lock()
    }

    /// The counters of one serial number.
    pub fn stats(&self, serial: &str) -> CallCounts {
        self.inner
            .stats
            .lock()
            .get(serial)
            .copied()
            .unwrap_or_default()
    }

    /// A copy of the state.
    pub async fn snapshot(&self) -> SimState {
        self.inner.state.lock().await.clone()
    }

    fn count(&self, serial: &SerialNumber, call: Call) {
        let mut stats = self.inner.stats.lock();
        let c = stats.entry(serial.as_str().to_owned()).or_default();
        match call {
            Call::Activate => c.activate += 1,
            Call::FetchLicense => c.fetch_license += 1,
            Call::ReportTryout => c.report_tryout += 1,
            Call::StartTryout => c.start_tryout += 1,
        }
    }

    /// What both tryout calls do first: the serial, the call counted, the outage
    /// faults, the reported start, and the start the device already has.
    async fn tryout_call(
        &self,
        call: Call,
        serial_number: &str,
        started_at: Option<&prost_types::Timestamp>,
    ) -> Result<(SerialNumber, DateTime<Utc>, Option<DateTime<Utc>>), Status> {
        let serial = parse_serial(serial_number)?;
        self.count(&serial, call);
        self.outage()?;
        let started_at = started_at
            .ok_or_else(|| Status::invalid_argument("started_at: required"))
            .and_then(|ts| time_from_pb("started_at", ts))?;
        let earlier = self
            .inner
            .state
            .lock()
            .await
            .device(&serial)?
            .tryout_started_at;
        Ok((serial, started_at, earlier))
    }

    /// The outage faults, which licensing calls answer before anything else.
    fn outage(&self) -> Result<(), Status> {
        match self.fault() {
            Fault::Unavailable => Err(Status::unavailable(
                "licensing-sim: fault UNAVAILABLE is set (simulated outage)",
            )),
            Fault::Internal => Err(Status::internal(
                "licensing-sim: fault INTERNAL is set (simulated server failure)",
            )),
            _ => Ok(()),
        }
    }

    /// The key to sign with, as the document faults say: a fresh random one under
    /// `BAD_SIGNATURE`; under `WRONG_SERIAL` the document's `serial` is replaced.
    fn signer(&self, serial: &mut String) -> SigningKey {
        match self.fault() {
            Fault::BadSignature => SigningKey::generate(&mut rand::rngs::OsRng),
            Fault::WrongSerial => {
                WRONG_SERIAL.clone_into(serial);
                self.inner.key.clone()
            }
            _ => self.inner.key.clone(),
        }
    }

    /// Signs a document, as the document faults say.
    fn sign(&self, mut payload: LicensePayload) -> String {
        let key = self.signer(&mut payload.serial_number);
        SignedLicense::sign(&payload, &key).to_json()
    }

    /// Signs a tryout answer, as the document faults say.
    fn sign_tryout(&self, mut payload: TryoutPayload) -> String {
        let key = self.signer(&mut payload.serial_number);
        SignedTryout::sign(&payload, &key).to_json()
    }

    /// Applies a change to a copy of the state, writes it, and only then makes it
    /// the state: an answer always reflects what is on disk.
    async fn change<T>(
        &self,
        f: impl FnOnce(&mut SimState) -> Result<T, SimError>,
    ) -> Result<T, Status> {
        let mut state = self.inner.state.lock().await;
        let mut next = state.clone();
        let out = f(&mut next)?;
        let path = self.inner.state_path.clone();
        let to_save = next.clone();
        tokio::task::spawn_blocking(move || to_save.save(&path))
            .await
            .map_err(|e| Status::internal(format!("save state: {e}")))?
            .map_err(|e| {
                tracing::error!(error = %e, "cannot write the state file");
                Status::internal(format!("save state: {e}"))
            })?;
        *state = next;
        Ok(out)
    }

    /// The activation response for `code`: the device's document with the nonce.
    async fn activation_response(&self, code: &InitializationCode) -> Result<String, Status> {
        let state = self.inner.state.lock().await;
        let device = state.device(&code.serial)?;
        if device.edition != code.edition {
            return Err(Status::failed_precondition(format!(
                "the initialization code is for edition {}, but {} is registered as {}",
                code.edition, code.serial, device.edition
            )));
        }
        let payload = device.payload(Utc::now(), Some(code.nonce.clone()));
        drop(state);
        Ok(self.sign(payload))
    }
}

fn parse_serial(raw: &str) -> Result<SerialNumber, Status> {
    SerialNumber::parse(raw).map_err(|e| Status::invalid_argument(e.to_string()))
}

fn parse_code(raw: &str) -> Result<InitializationCode, Status> {
    InitializationCode::decode(raw).map_err(|e| Status::invalid_argument(e.to_string()))
}

fn parse_feature(raw: &str) -> Result<Feature, Status> {
    raw.parse::<Feature>()
        .map_err(|e| Status::invalid_argument(e.to_string()))
}

/// The domain edition of a protobuf edition.
pub fn edition_from_pb(raw: i32) -> Result<Edition, Status> {
    match pb::Edition::try_from(raw) {
        Ok(pb::Edition::Vm) => Ok(Edition::Vm),
        Ok(pb::Edition::Business) => Ok(Edition::Business),
        Ok(pb::Edition::Advanced) => Ok(Edition::Advanced),
        _ => Err(Status::invalid_argument(
            "edition: must be EDITION_VM, EDITION_BUSINESS or EDITION_ADVANCED",
        )),
    }
}

/// The protobuf edition of a domain edition.
pub fn edition_to_pb(edition: Edition) -> pb::Edition {
    match edition {
        Edition::Vm => pb::Edition::Vm,
        Edition::Business => pb::Edition::Business,
        Edition::Advanced => pb::Edition::Advanced,
    }
}

fn device_to_pb(d: &Device) -> pb::Device {
    pb::Device {
        serial_number: d.serial_number.as_str().to_owned(),
        name: d.name.clone(),
        edition: edition_to_pb(d.edition) as i32,
        licenses: d
            .licenses
            .iter()
            .map(|v| pb::License {
                feature: v.feature.as_str().to_owned(),
                quantity: v.quantity,
                expires_at: v.expires_at.map(timestamp),
                seat_model: match d.seat_models.get(&v.feature) {
                    Some(SeatModel::Concurrent) => pb::SeatModel::Concurrent,
                    _ => pb::SeatModel::Assigned,
                } as i32,
            })
            .collect(),
        tryout_started_at: d.tryout_started_at.map(timestamp),
        usage: d
            .usage
            .iter()
            .map(|u| pb::UsagePeak {
                feature: u.feature.as_str().to_owned(),
                day: u.day.clone(),
                peak_in_use: u.peak_in_use,
                capacity: u.capacity,
                busy: u.busy,
            })
            .collect(),
    }
}

/// When a tryout started at `started_at` ends: the product's tryout length
/// (`TryoutPolicy::default`, 14 days).
fn tryout_end(started_at: DateTime<Utc>) -> Result<DateTime<Utc>, Status> {
    started_at
        .checked_add_signed(chrono::Duration::days(i64::from(
            TryoutPolicy::default().days,
        )))
        .ok_or_else(|| Status::invalid_argument("started_at: out of range"))
}

fn time_from_pb(field: &str, ts: &prost_types::Timestamp) -> Result<DateTime<Utc>, Status> {
    from_timestamp(ts).ok_or_else(|| Status::invalid_argument(format!("{field}: out of range")))
}

#[tonic::async_trait]
impl VendorLicensingService for Simulator {
    async fn activate(
        &self,
        request: Request<pb::ActivateRequest>,
    ) -> Result<Response<pb::ActivateResponse>, Status> {
        let code = parse_code(&request.get_ref().initialization_code);
        if let Ok(code) = &code {
            self.count(&code.serial, Call::Activate);
        }
        self.outage()?;
        let code = code?;
        let activation_response = self.activation_response(&code).await?;
        tracing::info!(serial = %code.serial, "Activate answered");
        Ok(Response::new(pb::ActivateResponse {
            activation_response,
        }))
    }

    async fn fetch_license(
        &self,
        request: Request<pb::FetchLicenseRequest>,
    ) -> Result<Response<pb::FetchLicenseResponse>, Status> {
        let serial = parse_serial(&request.get_ref().serial_number)?;
        self.count(&serial, Call::FetchLicense);
        self.outage()?;
        // The usage the device reports goes into its record (unknown features
        // and malformed days are dropped: a report never fails the fetch).
        let usage: Vec<UsageDay> = request
            .get_ref()
            .usage
            .iter()
            .filter_map(|u| {
                let feature = u.feature.parse::<Feature>().ok()?;
                chrono::NaiveDate::parse_from_str(&u.day, "%Y-%m-%d").ok()?;
                Some(UsageDay {
                    feature,
                    day: u.day.clone(),
                    peak_in_use: u.peak_in_use,
                    capacity: u.capacity,
                    busy: u.busy,
                })
            })
            .collect();
        let payload = if usage.is_empty() {
            let state = self.inner.state.lock().await;
            state.device(&serial)?.payload(Utc::now(), None)
        } else {
            tracing::info!(%serial, days = usage.len(), "usage reported");
            self.change(|s| {
                let device = s.device_mut(&serial)?;
                device.record_usage(usage);
                Ok(device.payload(Utc::now(), None))
            })
            .await?
        };
        tracing::info!(%serial, "FetchLicense answered");
        Ok(Response::new(pb::FetchLicenseResponse {
            signed_license: self.sign(payload),
        }))
    }

    async fn report_tryout(
        &self,
        request: Request<pb::ReportTryoutRequest>,
    ) -> Result<Response<pb::ReportTryoutResponse>, Status> {
        let request = request.into_inner();
        let (serial, started_at, earlier) = self
            .tryout_call(
                Call::ReportTryout,
                &request.serial_number,
                request.started_at.as_ref(),
            )
            .await?;
        // Only a first report changes (and writes) the state.
        let changed = earlier.is_none()
            && self
                .change(|s| s.report_tryout(&serial, started_at))
                .await?;
        tracing::info!(%serial, %started_at, recorded = changed, "ReportTryout answered");
        Ok(Response::new(pb::ReportTryoutResponse {}))
    }

    async fn start_tryout(
        &self,
        request: Request<pb::StartTryoutRequest>,
    ) -> Result<Response<pb::StartTryoutResponse>, Status> {
        let request = request.into_inner();
        let (serial, started_at, earlier) = self
            .tryout_call(
                Call::StartTryout,
                &request.serial_number,
                request.started_at.as_ref(),
            )
            .await?;
        // A start already recorded is answered without writing the state again;
        // a new one only when its end can be represented.
        let (started_at, recorded) = match earlier {
            Some(earlier) => (earlier, false),
            None => {
                tryout_end(started_at)?;
                self.change(|s| s.start_tryout(&serial, started_at)).await?
            }
        };
        let signed_tryout = self.sign_tryout(TryoutPayload {
            serial_number: serial.as_str().to_owned(),
            nonce: request.nonce,
            started_at,
            ends_at: tryout_end(started_at)?,
            recorded,
        });
        tracing::info!(%serial, %started_at, recorded, "StartTryout answered");
        Ok(Response::new(pb::StartTryoutResponse {
            started_at: Some(timestamp(started_at)),
            recorded,
            signed_tryout,
        }))
    }
}

#[tonic::async_trait]
impl VendorAdminService for Simulator {
    async fn register_device(
        &self,
        request: Request<pb::RegisterDeviceRequest>,
    ) -> Result<Response<pb::RegisterDeviceResponse>, Status> {
        let request = request.into_inner();
        let serial = parse_serial(&request.serial_number)?;
        let edition = edition_from_pb(request.edition)?;
        let name = request.name;
        let device = self
            .change(|s| Ok(device_to_pb(s.register(serial, name, edition))))
            .await?;
        tracing::info!(serial = %device.serial_number, "device registered");
        Ok(Response::new(pb::RegisterDeviceResponse {
            device: Some(device),
        }))
    }

    async fn redeem_voucher(
        &self,
        request: Request<pb::RedeemVoucherRequest>,
    ) -> Result<Response<pb::RedeemVoucherResponse>, Status> {
        let request = request.into_inner();
        let serial = parse_serial(&request.serial_number)?;
        let feature = parse_feature(&request.feature)?;
        let expires_at = request
            .expires_at
            .as_ref()
            .map(|ts| time_from_pb("expires_at", ts))
            .transpose()?;
        let seat_model = match pb::SeatModel::try_from(request.seat_model) {
            Ok(pb::SeatModel::Unspecified) => None,
            Ok(pb::SeatModel::Assigned) => Some(SeatModel::Assigned),
            Ok(pb::SeatModel::Concurrent) => Some(SeatModel::Concurrent),
            Err(_) => return Err(Status::invalid_argument("seat_model: unknown value")),
        };
        let now = Utc::now();
        let device = self
            .change(|s| {
                s.redeem(
                    &serial,
                    feature,
                    request.quantity,
                    expires_at,
                    seat_model,
                    now,
                )
                .map(device_to_pb)
            })
            .await?;
        tracing::info!(%serial, %feature, quantity = request.quantity, "voucher redeemed");
        Ok(Response::new(pb::RedeemVoucherResponse {
            device: Some(device),
        }))
    }

    async fn revoke(
        &self,
        request: Request<pb::RevokeRequest>,
    ) -> Result<Response<pb::RevokeResponse>, Status> {
        let request = request.into_inner();
        let serial = parse_serial(&request.serial_number)?;
        let feature = parse_feature(&request.feature)?;
        let device = self
            .change(|s| {
                s.revoke(&serial, feature, request.quantity)
                    .map(device_to_pb)
            })
            .await?;
        tracing::info!(%serial, %feature, quantity = request.quantity, "licenses revoked");
        Ok(Response::new(pb::RevokeResponse {
            device: Some(device),
        }))
    }

    async fn recreate_certificate(
        &self,
        request: Request<pb::RecreateCertificateRequest>,
    ) -> Result<Response<pb::RecreateCertificateResponse>, Status> {
        let request = request.into_inner();
        let code = parse_code(&request.initialization_code)?;
        let serial = parse_serial(&request.serial_number)?;
        if serial != code.serial {
            return Err(Status::invalid_argument(format!(
                "the initialization code belongs to serial number {}, not {serial}",
                code.serial
            )));
        }
        let activation_response = self.activation_response(&code).await?;
        tracing::info!(%serial, "certificate recreated");
        Ok(Response::new(pb::RecreateCertificateResponse {
            activation_response,
        }))
    }

    async fn list_devices(
        &self,
        _request: Request<pb::ListDevicesRequest>,
    ) -> Result<Response<pb::ListDevicesResponse>, Status> {
        let state = self.inner.state.lock().await;
        Ok(Response::new(pb::ListDevicesResponse {
            devices: state.devices.values().map(device_to_pb).collect(),
        }))
    }

    async fn get_stats(
        &self,
        _request: Request<pb::GetStatsRequest>,
    ) -> Result<Response<pb::GetStatsResponse>, Status> {
        let stats = self.inner.stats.lock();
        Ok(Response::new(pb::GetStatsResponse {
            serials: stats
                .iter()
                .map(|(serial, c)| pb::SerialStats {
                    serial_number: serial.clone(),
                    activate_calls: c.activate,
                    fetch_license_calls: c.fetch_license,
                    report_tryout_calls: c.report_tryout,
                    start_tryout_calls: c.start_tryout,
                })
                .collect(),
        }))
    }

    async fn set_fault(
        &self,
        request: Request<pb::SetFaultRequest>,
    ) -> Result<Response<pb::SetFaultResponse>, Status> {
        let fault = match Fault::try_from(request.get_ref().fault) {
            Ok(Fault::Unspecified) | Err(_) => {
                return Err(Status::invalid_argument(
                    "fault: must be one of FAULT_NONE, FAULT_UNAVAILABLE, FAULT_BAD_SIGNATURE, FAULT_WRONG_SERIAL, FAULT_INTERNAL",
                ));
            }
            Ok(f) => f,
        };
        *self.inner.fault.lock() = fault;
        tracing::warn!(fault = fault.as_str_name(), "fault set");
        Ok(Response::new(pb::SetFaultResponse {}))
    }
}

/// Serves the simulator on an already-bound listener until `shutdown` resolves;
/// TLS when a PEM certificate and key are given.
pub async fn serve(
    listener: TcpListener,
    sim: Simulator,
    tls: Option<(Vec<u8>, Vec<u8>)>,
    shutdown: impl Future<Output = ()> + Send,
) -> anyhow::Result<()> {
    let (health, health_service) = tonic_health::server::health_reporter();
    for name in [
        "comtrexx.vendor.v1.VendorLicensingService",
        "comtrexx.vendor.v1.VendorAdminService",
    ] {
        health
            .set_service_status(name, ServingStatus::Serving)
            .await;
    }
    let (reflection_v1, reflection_v1alpha) =
        comtrexx_licensing_proto::reflection_services(&[VENDOR_FILE_DESCRIPTOR_SET])?;

    let mut builder = Server::builder().tcp_nodelay(true);
    if let Some((cert, key)) = tls {
        builder =
            builder.tls_config(ServerTlsConfig::new().identity(Identity::from_pem(cert, key)))?;
    }
    builder
        .add_service(VendorLicensingServiceServer::new(sim.clone()))
        .add_service(VendorAdminServiceServer::new(sim))
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), shutdown)
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use comtrexx_licensing_domain::LicenseRejection;

    fn sim() -> (Simulator, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        (Simulator::open(dir.path()).unwrap(), dir)
    }

    async fn register(sim: &Simulator, serial: &str, edition: pb::Edition) {
        sim.register_device(Request::new(pb::RegisterDeviceRequest {
            serial_number: serial.into(),
            name: "office".into(),
            edition: edition as i32,
        }))
        .await
        .unwrap();
    }

    async fn redeem(
        sim: &Simulator,
        serial: &str,
        feature: &str,
        quantity: u32,
    ) -> Result<(), Status> {
        sim.redeem_voucher(Request::new(pb::RedeemVoucherRequest {
            serial_number: serial.into(),
            feature: feature.into(),
            quantity,
            expires_at: None,
            seat_model: 0,
        }))
        .await
        .map(drop)
    }

    async fn fetch(sim: &Simulator, serial: &str) -> Result<SignedLicense, Status> {
        let r = sim
            .fetch_license(Request::new(pb::FetchLicenseRequest {
                serial_number: serial.into(),
                usage: Vec::new(),
            }))
            .await?;
        Ok(SignedLicense::from_json(&r.into_inner().signed_license).unwrap())
    }

    async fn set_fault(sim: &Simulator, fault: Fault) {
        sim.set_fault(Request::new(pb::SetFaultRequest {
            fault: fault as i32,
        }))
        .await
        .unwrap();
    }

    fn sn(s: &str) -> SerialNumber {
        SerialNumber::parse(s).unwrap()
    }

    #[tokio::test]
    async fn fetch_signs_the_aggregated_licenses() {
        let (sim, _dir) = sim();
        register(&sim, "S1", pb::Edition::Business).await;
        redeem(&sim, "S1", "user", 10).await.unwrap();
        redeem(&sim, "S1", "user", 2).await.unwrap();
        redeem(&sim, "S1", "system_activation", 1).await.unwrap();
        let p = fetch(&sim, "S1")
            .await
            .unwrap()
            .verify(&sim.public_key(), &sn("S1"), Edition::Business)
            .unwrap();
        assert_eq!(p.entitlement(Feature::User).unwrap().quantity, 12);
        assert_eq!(
            p.entitlement(Feature::SystemActivation).unwrap().quantity,
            1
        );
        assert_eq!(p.nonce, None);
        assert_eq!(
            fetch(&sim, "NOPE").await.unwrap_err().code(),
            tonic::Code::NotFound
        );
        assert_eq!(
            fetch(&sim, "a b").await.unwrap_err().code(),
            tonic::Code::InvalidArgument
        );
        assert_eq!(sim.stats("S1").fetch_license, 1);
        assert_eq!(sim.stats("NOPE").fetch_license, 1);
    }

    #[tokio::test]
    async fn admin_input_is_validated() {
        let (sim, _dir) = sim();
        let bad_edition = sim
            .register_device(Request::new(pb::RegisterDeviceRequest {
                serial_number: "S1".into(),
                name: "x".into(),
                edition: 0,
            }))
            .await
            .unwrap_err();
        assert_eq!(bad_edition.code(), tonic::Code::InvalidArgument);
        register(&sim, "S1", pb::Edition::Vm).await;
        assert_eq!(
            redeem(&sim, "S1", "fax", 1).await.unwrap_err().code(),
            tonic::Code::InvalidArgument
        );
        assert_eq!(
            redeem(&sim, "S1", "user", 0).await.unwrap_err().code(),
            tonic::Code::InvalidArgument
        );
        assert_eq!(
            redeem(&sim, "S2", "user", 1).await.unwrap_err().code(),
            tonic::Code::NotFound
        );
        let unspecified = sim
            .set_fault(Request::new(pb::SetFaultRequest { fault: 0 }))
            .await
            .unwrap_err();
        assert_eq!(unspecified.code(), tonic::Code::InvalidArgument);
    }

    #[tokio::test]
    async fn activation_checks_the_code() {
        let (sim, _dir) = sim();
        register(&sim, "S1", pb::Edition::Vm).await;
        let code = InitializationCode::new(sn("S1"), Edition::Vm);
        let r = sim
            .activate(Request::new(pb::ActivateRequest {
                initialization_code: code.encode(),
            }))
            .await
            .unwrap()
            .into_inner();
        let p = SignedLicense::from_json(&r.activation_response)
            .unwrap()
            .verify(&sim.public_key(), &sn("S1"), Edition::Vm)
            .unwrap();
        assert_eq!(p.nonce, Some(code.nonce.clone()));
        assert_eq!(sim.stats("S1").activate, 1);

        let activate = |text: String| {
            let sim = sim.clone();
            async move {
                sim.activate(Request::new(pb::ActivateRequest {
                    initialization_code: text,
                }))
                .await
                .unwrap_err()
                .code()
            }
        };
        assert_eq!(
            activate("CTX1-XXXXX".into()).await,
            tonic::Code::InvalidArgument
        );
        let wrong_edition = InitializationCode::new(sn("S1"), Edition::Advanced).encode();
        assert_eq!(
            activate(wrong_edition).await,
            tonic::Code::FailedPrecondition
        );
        let unknown = InitializationCode::new(sn("S9"), Edition::Vm).encode();
        assert_eq!(activate(unknown).await, tonic::Code::NotFound);

        // The portal's "recreate certificate": the serial must match the code.
        let recreate = |serial: &str, code: String| {
            sim.recreate_certificate(Request::new(pb::RecreateCertificateRequest {
                serial_number: serial.into(),
                initialization_code: code,
            }))
        };
        let r = recreate("S1", code.encode()).await.unwrap().into_inner();
        let p = SignedLicense::from_json(&r.activation_response)
            .unwrap()
            .verify(&sim.public_key(), &sn("S1"), Edition::Vm)
            .unwrap();
        assert_eq!(p.nonce, Some(code.nonce.clone()));
        assert_eq!(
            recreate("S2", code.encode()).await.unwrap_err().code(),
            tonic::Code::InvalidArgument
        );
    }

    #[tokio::test]
    async fn faults() {
        let (sim, _dir) = sim();
        register(&sim, "S1", pb::Edition::Vm).await;
        set_fault(&sim, Fault::Unavailable).await;
        assert_eq!(
            fetch(&sim, "S1").await.unwrap_err().code(),
            tonic::Code::Unavailable
        );
        set_fault(&sim, Fault::Internal).await;
        assert_eq!(
            fetch(&sim, "S1").await.unwrap_err().code(),
            tonic::Code::Internal
        );
        // Admin calls keep working during an outage.
        redeem(&sim, "S1", "user", 1).await.unwrap();
        set_fault(&sim, Fault::BadSignature).await;
        assert_eq!(
            fetch(&sim, "S1")
                .await
                .unwrap()
                .verify(&sim.public_key(), &sn("S1"), Edition::Vm),
            Err(LicenseRejection::BadSignature)
        );
        set_fault(&sim, Fault::WrongSerial).await;
        assert!(matches!(
            fetch(&sim, "S1")
                .await
                .unwrap()
                .verify(&sim.public_key(), &sn("S1"), Edition::Vm),
            Err(LicenseRejection::WrongSerial { .. })
        ));
        set_fault(&sim, Fault::None).await;
        assert!(
            fetch(&sim, "S1")
                .await
                .unwrap()
                .verify(&sim.public_key(), &sn("S1"), Edition::Vm)
                .is_ok()
        );
    }

    #[tokio::test]
    async fn changes_are_on_disk_before_the_answer() {
        let (sim, dir) = sim();
        register(&sim, "S1", pb::Edition::Vm).await;
        redeem(&sim, "S1", "user", 3).await.unwrap();
        let at: DateTime<Utc> = "2026-02-01T00:00:00Z".parse().unwrap();
        sim.report_tryout(Request::new(pb::ReportTryoutRequest {
            serial_number: "S1".into(),
            started_at: Some(timestamp(at)),
        }))
        .await
        .unwrap();
        let on_disk = SimState::load(&dir.path().join(STATE_FILE)).unwrap();
        assert_eq!(on_disk, sim.snapshot().await);
        let d = &on_disk.devices["S1"];
        assert_eq!((d.held(Feature::User), d.tryout_started_at), (3, Some(at)));
        // Reopening the directory gives the same key and devices.
        let again = Simulator::open(dir.path()).unwrap();
        assert_eq!(again.public_key(), sim.public_key());
        assert_eq!(again.snapshot().await, on_disk);
    }

    #[tokio::test]
    async fn a_failed_write_changes_nothing() {
        let (sim, dir) = sim();
        register(&sim, "S1", pb::Edition::Vm).await;
        // Make the state file's place a directory: the rename fails.
        let path = dir.path().join(STATE_FILE);
        std::fs::remove_file(&path).unwrap();
        std::fs::create_dir(&path).unwrap();
        std::fs::write(path.join("x"), "").unwrap();
        let err = redeem(&sim, "S1", "user", 3).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::Internal);
        assert_eq!(sim.snapshot().await.devices["S1"].held(Feature::User), 0);
    }
}
