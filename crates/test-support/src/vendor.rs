//! Calls to the development licensing server's admin service (`licensing-sim`):
//! the vendor portal's side of a test (devices, vouchers, certificates, faults,
//! statistics). Each panics on a refusal, naming the call.

use chrono::{DateTime, Utc};
use comtrexx_licensing_proto::vendor_pb as vpb;
use comtrexx_licensing_proto::vendor_pb::vendor_admin_service_client::VendorAdminServiceClient;
use tonic::transport::Channel;

/// A client of the licensing server's admin service.
pub type Admin = VendorAdminServiceClient<Channel>;

/// Connects to the admin service at `url`.
pub async fn admin(url: String) -> Admin {
    VendorAdminServiceClient::connect(url)
        .await
        .expect("connect to the licensing server's admin service")
}

/// Registers a PBX of `edition` under `serial` (the portal's device list).
pub async fn register(admin: &mut Admin, serial: &str, edition: vpb::Edition) {
    admin
        .register_device(vpb::RegisterDeviceRequest {
            serial_number: serial.into(),
            name: format!("PBX {serial}"),
            edition: edition as i32,
        })
        .await
        .expect("RegisterDevice");
}

/// Redeems a voucher of `quantity` units of `feature` for `serial`, without end.
pub async fn redeem(admin: &mut Admin, serial: &str, feature: &str, quantity: u32) {
    redeem_until(admin, serial, feature, quantity, None).await;
}

/// Redeems a voucher that ends at `expires_at` (`None`: without end).
pub async fn redeem_until(
    admin: &mut Admin,
    serial: &str,
    feature: &str,
    quantity: u32,
    expires_at: Option<DateTime<Utc>>,
) {
    redeem_with(
        admin,
        serial,
        feature,
        quantity,
        expires_at,
        vpb::SeatModel::Unspecified,
    )
    .await;
}

/// Redeems a voucher of a feature sold for concurrent use, without end.
pub async fn redeem_concurrent(admin: &mut Admin, serial: &str, feature: &str, quantity: u32) {
    redeem_with(
        admin,
        serial,
        feature,
        quantity,
        None,
        vpb::SeatModel::Concurrent,
    )
    .await;
}

async fn redeem_with(
    admin: &mut Admin,
    serial: &str,
    feature: &str,
    quantity: u32,
    expires_at: Option<DateTime<Utc>>,
    seat_model: vpb::SeatModel,
) {
    admin
        .redeem_voucher(vpb::RedeemVoucherRequest {
            seat_model: seat_model as i32,
            serial_number: serial.into(),
            feature: feature.into(),
            quantity,
            expires_at: expires_at.map(|t| prost_types::Timestamp {
                seconds: t.timestamp(),
                nanos: i32::try_from(t.timestamp_subsec_nanos()).unwrap_or(0),
            }),
        })
        .await
        .expect("RedeemVoucher");
}

/// Takes back `quantity` units of `feature` from `serial`.
pub async fn revoke(admin: &mut Admin, serial: &str, feature: &str, quantity: u32) {
    admin
        .revoke(vpb::RevokeRequest {
            serial_number: serial.into(),
            feature: feature.into(),
            quantity,
        })
        .await
        .expect("Revoke");
}

/// The portal's "recreate certificate": the activation response to paste back
/// for an initialization code.
pub async fn recreate(admin: &mut Admin, serial: &str, code: &str) -> String {
    admin
        .recreate_certificate(vpb::RecreateCertificateRequest {
            serial_number: serial.into(),
            initialization_code: code.into(),
        })
        .await
        .expect("RecreateCertificate")
        .into_inner()
        .activation_response
}

/// Makes the licensing server misbehave (or behave again, `Fault::None`).
pub async fn set_fault(admin: &mut Admin, fault: vpb::Fault) {
    admin
        .set_fault(vpb::SetFaultRequest {
            fault: fault as i32,
        })
        .await
        .expect("SetFault");
}

/// What the licensing server counted for `serial` (zeros when it saw nothing).
pub async fn stats(admin: &mut Admin, serial: &str) -> vpb::SerialStats {
    admin
        .get_stats(vpb::GetStatsRequest {})
        .await
        .expect("GetStats")
        .into_inner()
        .serials
        .into_iter()
        .find(|s| s.serial_number == serial)
        .unwrap_or_default()
}
