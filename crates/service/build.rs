//! Checks the trust anchor a release build embeds (the protobuf code is generated
//! in the comtrexx-licensing-proto crate).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    check_vendor_key()
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
