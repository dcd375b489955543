//! Compiles the gRPC contract with protox (pure Rust): no system `protoc` needed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "proto/comtrexx/licensing/v1/licensing.proto";
    println!("cargo:rerun-if-changed=proto");
    // ErrorInfo is compiled in too, only so reflection clients can decode the
    // error details this service sends; its Rust type comes from tonic-types.
    let descriptors = protox::compile([proto, "proto/google/rpc/error_details.proto"], ["proto"])?;
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    // Reflection serves this descriptor set, so grpcurl needs no proto files.
    std::fs::write(
        out.join("licensing_descriptor.bin"),
        prost::Message::encode_to_vec(&descriptors),
    )?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .extern_path(".google.rpc", "::tonic_types")
        .compile_fds(descriptors)?;
    Ok(())
}
