//! The Debian package's default configuration (`debian/config.toml`, installed as
//! `/etc/comtrexx-licensing/config.toml`): valid as shipped, pointing at the local
//! Redis, and still valid when an operator fills in the commented-out keys the
//! way its comments show (top-level keys must stay above the first section).

// figment::Jail's closures return figment::Error, which is large; fine in tests.
#![allow(clippy::result_large_err)]

use std::path::{Path, PathBuf};

use comtrexx_licensing::config::RawConfig;
use comtrexx_licensing::domain::license::encode_public_key;
use comtrexx_licensing::upstream::LicenseSource;
use ed25519_dalek::SigningKey;
use figment::Jail;

fn packaged_config() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../debian/config.toml")
}

#[test]
fn packaged_configuration_is_valid_and_uses_the_local_redis() {
    Jail::expect_with(|jail| {
        jail.clear_env();
        let config = RawConfig::load(Some(&packaged_config()))
            .expect("load the packaged configuration")
            .validate()
            .expect("the packaged configuration validates");
        let redis = config.redis.expect("a Redis store, not the in-memory one");
        assert_eq!(redis.connection.url, "redis://127.0.0.1:6379/0");
        assert!(matches!(config.license_source, LicenseSource::None));
        // The VM's own services call it locally: nothing listens beyond loopback.
        assert!(
            config.listen_addr.ip().is_loopback(),
            "{}",
            config.listen_addr
        );
        assert!(
            config.metrics_addr.is_none_or(|a| a.ip().is_loopback()),
            "{:?}",
            config.metrics_addr
        );
        Ok(())
    });
}

#[test]
fn packaged_configuration_with_its_air_gapped_example_filled_in_is_valid() {
    let key = SigningKey::from_bytes(&[7; 32]);
    let text = std::fs::read_to_string(packaged_config()).unwrap();
    let mut filled = text.clone();
    for (commented, line) in [
        (
            "# serial_number = \"0123456789AB\"",
            "serial_number = \"0123456789AB\"".to_owned(),
        ),
        (
            "# vendor_public_key = \"...\"",
            format!(
                "vendor_public_key = \"{}\"",
                encode_public_key(&key.verifying_key())
            ),
        ),
        (
            "# license_file = \"/etc/comtrexx-licensing/license.json\"",
            "license_file = \"/etc/comtrexx-licensing/license.json\"".to_owned(),
        ),
    ] {
        assert!(
            filled.contains(commented),
            "example line {commented:?} is in the file"
        );
        filled = filled.replace(commented, &line);
    }
    Jail::expect_with(|jail| {
        jail.clear_env();
        jail.create_file("config.toml", &filled)?;
        let config = RawConfig::load(Some(Path::new("config.toml")))
            .expect("load the filled-in configuration")
            .validate()
            .expect("the filled-in configuration validates");
        assert_eq!(config.serial_number.as_str(), "0123456789AB");
        assert!(matches!(
            config.license_source,
            LicenseSource::File(ref path) if path == Path::new("/etc/comtrexx-licensing/license.json")
        ));
        Ok(())
    });
}
