//! The gRPC adapter: generated types, conversions, the error table and the
//! handlers. The only module that knows tonic and prost types; it turns requests
//! into domain calls and domain results into responses.

pub mod convert;
pub mod handlers;
pub mod status;

/// Generated from `proto/comtrexx/licensing/v1/licensing.proto`.
pub mod pb {
    #![allow(clippy::all, clippy::pedantic, missing_docs)]
    tonic::include_proto!("comtrexx.licensing.v1");
}

/// The encoded descriptor set, served by reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/licensing_descriptor.bin"));

/// The service's full name, as health checks and reflection know it.
pub const SERVICE_NAME: &str = "comtrexx.licensing.v1.LicensingService";

pub use handlers::LicensingApi;

/// Generated from `proto/comtrexx/vendor/v1/vendor.proto`: the licensing-server
/// protocol (client side here, server side in the simulator).
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
