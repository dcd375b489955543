//! The gRPC contracts of comtrexx-licensing, generated from `proto/` at the
//! workspace root with protox (no system `protoc`):
//!
//! - [`pb`]: `comtrexx.licensing.v1`, the service's API (clients and servers);
//! - [`vendor_pb`]: `comtrexx.vendor.v1`, the protocol to the vendor's licensing
//!   server (the service's client side, the simulator's server side);
//! - their encoded descriptor sets, for reflection;
//! - [`timestamp`] and [`from_timestamp`], between protobuf and chrono time;
//! - [`seat_state`]: the `WatchSeats` messages to and from the domain's types,
//!   shared by the service (which encodes its copy) and the client library
//!   (which decodes the stream).
//!
//! Nothing here decides anything: the decisions are the domain's.

use chrono::{DateTime, Utc};

pub mod seat_state;

/// Generated from `proto/comtrexx/licensing/v1/licensing.proto`.
pub mod pb {
    #![allow(clippy::all, clippy::pedantic, missing_docs)]
    tonic::include_proto!("comtrexx.licensing.v1");
}

/// The encoded descriptor set of the licensing API (with `google.rpc.ErrorInfo`,
/// so reflection clients can decode error details), served by reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/licensing_descriptor.bin"));

/// The service's full name, as health checks and reflection know it.
pub const SERVICE_NAME: &str = "comtrexx.licensing.v1.LicensingService";

/// Generated from `proto/comtrexx/vendor/v1/vendor.proto`: the licensing-server
/// protocol.
pub mod vendor_pb {
    #![allow(clippy::all, clippy::pedantic, missing_docs)]
    tonic::include_proto!("comtrexx.vendor.v1");
}

/// The vendor protocol's descriptor set, served by the simulator's reflection.
pub const VENDOR_FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/vendor_descriptor.bin"));

/// Reflection in both versions (`v1`, and `v1alpha`, which grpcurl 1.8 and many
/// tools still speak only) over some descriptor sets and the health service's.
#[allow(clippy::type_complexity)]
pub fn reflection_services(
    descriptor_sets: &[&'static [u8]],
) -> Result<
    (
        tonic_reflection::server::v1::ServerReflectionServer<
            impl tonic_reflection::server::v1::ServerReflection,
        >,
        tonic_reflection::server::v1alpha::ServerReflectionServer<
            impl tonic_reflection::server::v1alpha::ServerReflection,
        >,
    ),
    tonic_reflection::server::Error,
> {
    let builder = || {
        descriptor_sets.iter().fold(
            tonic_reflection::server::Builder::configure()
                .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET),
            |builder, set| builder.register_encoded_file_descriptor_set(set),
        )
    };
    Ok((builder().build_v1()?, builder().build_v1alpha()?))
}

/// A point in time as a protobuf timestamp.
pub fn timestamp(at: DateTime<Utc>) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: at.timestamp(),
        nanos: i32::try_from(at.timestamp_subsec_nanos()).unwrap_or(0),
    }
}

/// The point in time of a protobuf timestamp; `None` when it is out of range.
pub fn from_timestamp(ts: &prost_types::Timestamp) -> Option<DateTime<Utc>> {
    DateTime::from_timestamp(ts.seconds, u32::try_from(ts.nanos).ok()?)
}

/// The transport endpoint for `url`: connect and request timeouts, and TLS for
/// `https://` (the CA in `ca_file`, else the public web roots). Shared by the
/// service's licensing-server client and the simulator's admin client.
pub fn endpoint(
    url: &str,
    ca_file: Option<&std::path::Path>,
    timeout: std::time::Duration,
) -> Result<tonic::transport::Endpoint, String> {
    let https = if url.starts_with("https://") {
        true
    } else if url.starts_with("http://") {
        false
    } else {
        return Err(format!(
            "licensing server URL {url:?} must start with http:// or https://"
        ));
    };
    let mut endpoint = tonic::transport::Endpoint::from_shared(url.to_owned())
        .map_err(|e| format!("licensing server URL {url:?}: {e}"))?
        .connect_timeout(timeout)
        .timeout(timeout)
        .tcp_nodelay(true);
    if https {
        let mut tls = tonic::transport::ClientTlsConfig::new().timeout(timeout);
        tls = match ca_file {
            Some(path) => {
                let pem = std::fs::read(path)
                    .map_err(|e| format!("read CA file {}: {e}", path.display()))?;
                if !String::from_utf8_lossy(&pem).contains("-----BEGIN CERTIFICATE-----") {
                    return Err(format!(
                        "CA file {} holds no PEM certificate",
                        path.display()
                    ));
                }
                tls.ca_certificate(tonic::transport::Certificate::from_pem(pem))
            }
            None => tls.with_webpki_roots(),
        };
        endpoint = endpoint
            .tls_config(tls)
            .map_err(|e| format!("TLS for {url:?}: {e}"))?;
    } else if ca_file.is_some() {
        return Err(format!(
            "a CA file is set but the licensing server URL {url:?} is not https://"
        ));
    }
    Ok(endpoint)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_round_trip_and_refuse_out_of_range() {
        let at = DateTime::from_timestamp(1_700_000_000, 123_000_000).unwrap();
        assert_eq!(from_timestamp(&timestamp(at)), Some(at));
        let bad = prost_types::Timestamp {
            seconds: 0,
            nanos: -1,
        };
        assert_eq!(from_timestamp(&bad), None);
    }

    #[test]
    fn descriptor_sets_name_the_services() {
        use prost::Message as _;
        let set = prost_types::FileDescriptorSet::decode(FILE_DESCRIPTOR_SET).unwrap();
        assert!(
            set.file
                .iter()
                .any(|f| f.package() == "comtrexx.licensing.v1")
        );
        let set = prost_types::FileDescriptorSet::decode(VENDOR_FILE_DESCRIPTOR_SET).unwrap();
        assert!(set.file.iter().any(|f| f.package() == "comtrexx.vendor.v1"));
    }
}
