//! Compiles the gRPC contracts with protox (pure Rust): no system `protoc` needed.
//!
//! - `comtrexx/licensing/v1`: the service's API; its descriptor set (with
//!   google.rpc.ErrorInfo, so reflection clients can decode error details) is
//!   what the service's reflection serves.
//! - `comtrexx/vendor/v1`: the protocol to the vendor's licensing server, served
//!   by the development simulator (with its own descriptor set).

use std::path::Path;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    for file in [
        "proto/comtrexx/licensing/v1/licensing.proto",
        "proto/comtrexx/vendor/v1/vendor.proto",
        "proto/google/rpc/error_details.proto",
    ] {
        println!("cargo:rerun-if-changed={file}");
    }
    check_vendor_key()?;
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    let licensing = protox::compile(
        [
            "proto/comtrexx/licensing/v1/licensing.proto",
            "proto/google/rpc/error_details.proto",
        ],
        ["proto"],
    )?;
    let vendor = protox::compile(["proto/comtrexx/vendor/v1/vendor.proto"], ["proto"])?;
    write(&out.join("licensing_descriptor.bin"), &licensing)?;
    write(&out.join("vendor_descriptor.bin"), &vendor)?;
    for set in [licensing, vendor] {
        tonic_prost_build::configure()
            .build_server(true)
            .build_client(true)
            // ErrorInfo's Rust type comes from tonic-types.
            .extern_path(".google.rpc", "::tonic_types")
            .compile_fds(set)?;
    }
    Ok(())
}

/// The trust anchor: a release build embeds the vendor's public key from
/// `COMTREXX_VENDOR_PUBLIC_KEY` (base64 of the 32-byte Ed25519 key; read by
/// `config::EMBEDDED_VENDOR_PUBLIC_KEY`). A value that is not such a key fails
/// the build rather than producing a binary that trusts nothing.
fn check_vendor_key() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-env-changed=COMTREXX_VENDOR_PUBLIC_KEY");
    let Ok(key) = std::env::var("COMTREXX_VENDOR_PUBLIC_KEY") else {
        return Ok(());
    };
    use base64::Engine as _;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(key.trim())
        .map_err(|e| format!("COMTREXX_VENDOR_PUBLIC_KEY is not base64: {e}"))?;
    let bytes: [u8; 32] = bytes
        .try_into()
        .map_err(|_| "COMTREXX_VENDOR_PUBLIC_KEY is not a 32-byte Ed25519 public key")?;
    ed25519_dalek::VerifyingKey::from_bytes(&bytes)
        .map_err(|e| format!("COMTREXX_VENDOR_PUBLIC_KEY is not an Ed25519 public key: {e}"))?;
    Ok(())
}

fn write(path: &Path, set: &prost_types::FileDescriptorSet) -> std::io::Result<()> {
    std::fs::write(path, prost::Message::encode_to_vec(set))
}
