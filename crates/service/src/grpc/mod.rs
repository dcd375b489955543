//! The gRPC adapter: generated types, conversions and the handlers. It turns
//! requests into domain calls and domain results into responses (through the
//! one error table, `crate::status`).

pub mod convert;
pub mod handlers;
pub mod watch;

pub use comtrexx_licensing_proto::{
    FILE_DESCRIPTOR_SET, SERVICE_NAME, VENDOR_FILE_DESCRIPTOR_SET, pb, reflection_services,
    vendor_pb,
};

pub use handlers::LicensingApi;
pub use watch::WatchOptions;
