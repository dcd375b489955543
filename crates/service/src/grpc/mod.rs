//! The gRPC adapter: generated types, conversions, the error table and the
//! handlers. The only module that knows tonic and prost types; it turns requests
//! into domain calls and domain results into responses.

pub mod convert;
pub mod handlers;
pub mod status;

pub use comtrexx_licensing_proto::{
    FILE_DESCRIPTOR_SET, SERVICE_NAME, VENDOR_FILE_DESCRIPTOR_SET, pb, reflection_services,
    vendor_pb,
};

pub use handlers::LicensingApi;
