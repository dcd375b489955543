//! The command line: `serve` (the default), `config`, `auth token`, and the
//! development licensing tools (`dev keygen`, `dev sign-license`).

use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};
use chrono::{DateTime, Utc};
use clap::{Parser, Subcommand};
use ed25519_dalek::SigningKey;

use crate::config::RawConfig;
use crate::domain::license::{encode_public_key, encode_signing_key, parse_signing_key};
use crate::domain::{Edition, Entitlement, Feature, LicensePayload, SignedLicense};

#[derive(Debug, Parser)]
#[command(
    name = "comtrexx-licensing",
    version,
    about = "Licensing service of the COMtrexx PBX stack"
)]
pub struct Cli {
    /// TOML configuration file (also LICENSING_CONFIG).
    #[arg(long, global = true, env = "LICENSING_CONFIG")]
    pub config: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the service (the default).
    Serve,
    /// Print the effective configuration, secrets redacted, and check it.
    Config,
    /// Development licensing tools: NOT for production licenses.
    #[command(subcommand)]
    Dev(DevCommand),
    /// Callers and credentials.
    #[command(subcommand)]
    Auth(AuthCommand),
}

#[derive(Debug, Subcommand)]
pub enum AuthCommand {
    /// Make a new bearer token: prints the token (give it to the caller, once)
    /// on stdout and its callers-file entry (which holds only its SHA-256) on stderr.
    Token {
        /// The caller's name (shown in logs, metrics and the audit trail).
        #[arg(long)]
        name: String,
        /// call_handling, user_management, monitoring or operator.
        #[arg(long)]
        role: String,
    },
}

/// `auth token`: a new token and the callers-file entry that admits it.
pub fn auth_token(name: &str, role: &str) -> anyhow::Result<(String, String)> {
    let role = crate::auth::Role::parse(role).with_context(|| {
        format!("role {role:?} is not call_handling, user_management, monitoring or operator")
    })?;
    let token = crate::auth::callers::new_token();
    let entry = format!(
        "[[caller]]\nname = {}\nrole = \"{role}\"\ntoken_sha256 = \"{}\"\n",
        toml::Value::String(name.to_owned()),
        crate::auth::callers::token_sha256(&token)
    );
    // The entry must be one the service accepts.
    crate::auth::callers::Callers::parse(&entry).map_err(anyhow::Error::msg)?;
    Ok((token, entry))
}

pub fn run_auth(command: AuthCommand) -> anyhow::Result<()> {
    match command {
        AuthCommand::Token { name, role } => {
            let (token, entry) = auth_token(&name, &role)?;
            eprintln!("# add to the callers file (auth.callers_file):");
            eprint!("{entry}");
            eprintln!("# the token (shown once; the service keeps only its SHA-256):");
            println!("{token}");
            Ok(())
        }
    }
}

#[derive(Debug, Subcommand)]
pub enum DevCommand {
    /// Make an Ed25519 key pair for signing development licenses.
    Keygen {
        /// Where to write the secret key (base64).
        #[arg(long)]
        out: PathBuf,
    },
    /// Sign a development license file.
    SignLicense {
        /// The secret key file from `dev keygen`.
        #[arg(long)]
        key: PathBuf,
        #[arg(long)]
        serial: String,
        #[arg(long, default_value = "vm")]
        edition: String,
        /// FEATURE=QUANTITY or FEATURE=QUANTITY@RFC3339-EXPIRY, repeatable,
        /// e.g. user=10, call_assist=5@2027-12-31T00:00:00Z.
        #[arg(long = "entitlement", required = true)]
        entitlements: Vec<String>,
        /// A feature sold for concurrent use (leases) rather than assigned
        /// seats, repeatable, e.g. --concurrent call_assist.
        #[arg(long = "concurrent")]
        concurrent: Vec<String>,
        /// When the license was issued (default: now).
        #[arg(long)]
        issued_at: Option<DateTime<Utc>>,
        /// Where to write the signed license (JSON).
        #[arg(long)]
        out: PathBuf,
    },
}

/// `config`: prints the effective configuration and whether it validates,
/// the files it names included (read as at start).
pub fn print_config(file: Option<&Path>) -> anyhow::Result<()> {
    let raw = RawConfig::load(file)?;
    print!("{}", raw.redacted_toml());
    let config = raw.validate()?;
    crate::app::ConfigFiles::read(&config)?;
    Ok(())
}

pub fn run_dev(command: DevCommand) -> anyhow::Result<()> {
    match command {
        DevCommand::Keygen { out } => {
            let key = SigningKey::generate(&mut rand::rngs::OsRng);
            write_secret(&out, &encode_signing_key(&key))?;
            eprintln!(
                "development signing key written to {} (keep it private)",
                out.display()
            );
            println!("{}", encode_public_key(&key.verifying_key()));
            Ok(())
        }
        DevCommand::SignLicense {
            key,
            serial,
            edition,
            entitlements,
            concurrent,
            issued_at,
            out,
        } => {
            let concurrent = concurrent
                .iter()
                .map(|f| f.parse::<Feature>())
                .collect::<Result<Vec<_>, _>>()?;
            let text = std::fs::read_to_string(&key)
                .with_context(|| format!("read key file {}", key.display()))?;
            let key = parse_signing_key(&text).map_err(anyhow::Error::msg)?;
            let edition: Edition = edition.parse()?;
            let payload = LicensePayload {
                serial_number: serial,
                edition,
                issued_at: issued_at.unwrap_or_else(Utc::now),
                entitlements: entitlements
                    .iter()
                    .map(|e| {
                        let mut e = parse_entitlement(e)?;
                        if concurrent.contains(&e.feature) {
                            e.seat_model = crate::domain::SeatModel::Concurrent;
                        }
                        Ok(e)
                    })
                    .collect::<anyhow::Result<_>>()?,
                nonce: None,
            };
            let signed = SignedLicense::sign(&payload, &key);
            std::fs::write(&out, signed.to_json() + "\n")
                .with_context(|| format!("write license {}", out.display()))?;
            eprintln!("development license written to {}", out.display());
            Ok(())
        }
    }
}

fn parse_entitlement(raw: &str) -> anyhow::Result<Entitlement> {
    let Some((feature, rest)) = raw.split_once('=') else {
        bail!("entitlement {raw:?} is not FEATURE=QUANTITY[@EXPIRY]");
    };
    let (quantity, expires_at) = match rest.split_once('@') {
        Some((q, e)) => (
            q,
            Some(
                e.parse::<DateTime<Utc>>()
                    .with_context(|| format!("expiry {e:?}"))?,
            ),
        ),
        None => (rest, None),
    };
    Ok(Entitlement {
        seat_model: Default::default(),
        feature: feature.parse::<Feature>()?,
        quantity: quantity
            .parse()
            .with_context(|| format!("quantity {quantity:?}"))?,
        expires_at,
    })
}

#[cfg(unix)]
fn write_secret(path: &Path, content: &str) -> anyhow::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("write key file {}", path.display()))?;
    writeln!(file, "{content}")?;
    Ok(())
}

#[cfg(not(unix))]
fn write_secret(path: &Path, content: &str) -> anyhow::Result<()> {
    std::fs::write(path, format!("{content}\n"))
        .with_context(|| format!("write key file {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entitlement_syntax() {
        let e = parse_entitlement("user=10").unwrap();
        assert_eq!(
            (e.feature, e.quantity, e.expires_at),
            (Feature::User, 10, None)
        );
        let e = parse_entitlement("call_assist=2@2027-01-01T00:00:00Z").unwrap();
        assert!(e.expires_at.is_some());
        assert!(parse_entitlement("user").is_err());
        assert!(parse_entitlement("fax=1").is_err());
        assert!(parse_entitlement("user=-1").is_err());
    }

    #[test]
    fn auth_token_entry_admits_its_token() {
        let (token, entry) = auth_token("nightly \"backup\"", "monitoring").unwrap();
        let callers = crate::auth::callers::Callers::parse(&entry).unwrap();
        let caller = callers.by_token(&token).unwrap();
        assert_eq!(caller.name, "nightly \"backup\"");
        assert_eq!(caller.role, crate::auth::Role::Monitoring);
        assert!(!entry.contains(&token));
        assert!(auth_token("x", "root").is_err());
    }
}
