//! Compiles the gRPC contracts with protox (pure Rust): no system `protoc` needed.
//!
//! - `comtrexx/licensing/v1`: the service's API; its descriptor set (with
//!   google.rpc.ErrorInfo, so reflection clients can decode error details) is
//!   what the service's reflection serves.
//! - `comtrexx/vendor/v1`: the protocol to the vendor's licensing server, served
//!   by the development simulator (with its own descriptor set).

use std::path::Path;

// The contracts live at the workspace root (`proto/`, the buf module), beside
// this crate, so other languages and buf read the same files.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    for file in [
        "../../proto/comtrexx/licensing/v1/licensing.proto",
        "../../proto/comtrexx/vendor/v1/vendor.proto",
        "../../proto/google/rpc/error_details.proto",
    ] {
        println!("cargo:rerun-if-changed={file}");
    }
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    let licensing = protox::compile(
        [
            "../../proto/comtrexx/licensing/v1/licensing.proto",
            "../../proto/google/rpc/error_details.proto",
        ],
        ["../../proto"],
    )?;
    let vendor = protox::compile(
        ["../../proto/comtrexx/vendor/v1/vendor.proto"],
        ["../../proto"],
    )?;
    write(&out.join("licensing_descriptor.bin"), &licensing)?;
    write(&out.join("vendor_descriptor.bin"), &vendor)?;
    for set in [licensing, vendor] {
        tonic_prost_build::configure()
            .build_server(true)
            .build_client(true)
            // Servers that answer part of a contract (licensing-agent answers
            // CheckSeat only) get UNIMPLEMENTED for the rest.
            .generate_default_stubs(true)
            // ErrorInfo's Rust type comes from tonic-types.
            .extern_path(".google.rpc", "::tonic_types")
            .compile_fds(set)?;
    }
    Ok(())
}

fn write(path: &Path, set: &prost_types::FileDescriptorSet) -> std::io::Result<()> {
    std::fs::write(path, prost::Message::encode_to_vec(set))
}
