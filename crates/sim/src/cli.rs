//! The `licensing-sim` command line: `serve`, `public-key`, and `admin` (a client of
//! a running simulator's `VendorAdminService`).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;
use chrono::{DateTime, SecondsFormat, Utc};
use clap::{Parser, Subcommand, ValueEnum};
use serde::Serialize;
use tonic::transport::Channel;

use super::server::{Simulator, edition_to_pb, serve};
use comtrexx_licensing_domain::initcode::InitializationCode;
use comtrexx_licensing_domain::license::encode_public_key;
use comtrexx_licensing_domain::{Edition, SerialNumber};
use comtrexx_licensing_proto::vendor_pb::vendor_admin_service_client::VendorAdminServiceClient;
use comtrexx_licensing_proto::vendor_pb::{self as pb, Fault};
use comtrexx_licensing_proto::{endpoint, from_timestamp, timestamp};

#[derive(Debug, Parser)]
#[command(
    name = "licensing-sim",
    version,
    about = "Development licensing server: a simulator of the vendor's CIC server / Voucher \
             Center for local runs, demos and tests. NOT the vendor's server; its licenses \
             are signed with a development key."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve the simulator. Prints `vendor_public_key=<base64>` and
    /// `listening on <addr>` to stdout once it accepts calls.
    Serve {
        /// Directory of `state.json` and `signing.key` (created when missing).
        #[arg(long)]
        state: PathBuf,
        /// Address to listen on (port 0: any free port).
        #[arg(long, default_value = "127.0.0.1:7443")]
        listen: SocketAddr,
        /// PEM certificate: serve TLS (needs --tls-key).
        #[arg(long, requires = "tls_key")]
        tls_cert: Option<PathBuf>,
        /// PEM private key of --tls-cert.
        #[arg(long, requires = "tls_cert")]
        tls_key: Option<PathBuf>,
    },
    /// Print the simulator's public key (base64), creating the key when missing:
    /// the value of the service's `vendor_public_key`.
    PublicKey {
        #[arg(long)]
        state: PathBuf,
    },
    /// Administer a running simulator (the vendor portal's "My devices").
    Admin(AdminArgs),
    /// Print a fresh initialization code as a PBX would show it, to try
    /// `admin recreate-certificate` without a PBX. A PBX accepts only the
    /// response to a code it made itself (its nonce).
    InitCode {
        #[arg(long)]
        serial: String,
        /// vm, business or advanced.
        #[arg(long)]
        edition: Edition,
    },
}

#[derive(Debug, clap::Args)]
pub struct AdminArgs {
    /// The simulator's URL (http:// or https://).
    #[arg(
        long,
        env = "LICENSING_SIM_URL",
        default_value = "http://127.0.0.1:7443"
    )]
    pub server: String,
    /// PEM CA certificate to check an https:// simulator against.
    #[arg(long)]
    pub ca_file: Option<PathBuf>,
    /// Timeout of the call, in milliseconds.
    #[arg(long, default_value_t = 5000)]
    pub timeout_ms: u64,
    #[command(subcommand)]
    pub command: AdminCommand,
}

/// A feature's seat model, as `--seat-model` takes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SeatModelArg {
    Assigned,
    Concurrent,
}

#[derive(Debug, Subcommand)]
pub enum AdminCommand {
    /// Register a PBX (or rename it / change its edition; its licenses stay).
    RegisterDevice {
        #[arg(long)]
        serial: String,
        #[arg(long, default_value = "")]
        name: String,
        /// vm, business or advanced.
        #[arg(long)]
        edition: Edition,
    },
    /// Redeem a voucher: add licenses of a feature to a device.
    RedeemVoucher {
        #[arg(long)]
        serial: String,
        /// user, call_assist or system_activation.
        #[arg(long)]
        feature: String,
        #[arg(long)]
        quantity: u32,
        /// RFC 3339 expiry, e.g. 2027-12-31T00:00:00Z (default: never).
        #[arg(long)]
        expires_at: Option<DateTime<Utc>>,
        /// assigned (a seat per set-up user) or concurrent (only the quantity
        /// may use the feature at the same time); default: the feature's own
        /// (assigned for a new one).
        #[arg(long)]
        seat_model: Option<SeatModelArg>,
    },
    /// Revoke licenses of a feature (all of them without --quantity).
    Revoke {
        #[arg(long)]
        serial: String,
        #[arg(long)]
        feature: String,
        #[arg(long, default_value_t = 0)]
        quantity: u32,
    },
    /// "Recreate certificate": paste the PBX's initialization code, get the
    /// activation response (printed to stdout) to paste back at the PBX.
    RecreateCertificate {
        #[arg(long)]
        serial: String,
        #[arg(long)]
        code: String,
    },
    /// Every device with its licenses, as JSON.
    ListDevices,
    /// Licensing calls answered per serial number, as JSON.
    Stats,
    /// Make the simulator misbehave (for tests and demos); `none` ends it.
    Fault {
        #[arg(value_enum)]
        fault: FaultArg,
    },
}

/// The faults the simulator can play.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum FaultArg {
    None,
    Unavailable,
    BadSignature,
    WrongSerial,
    Internal,
}

impl From<FaultArg> for Fault {
    fn from(f: FaultArg) -> Self {
        match f {
            FaultArg::None => Fault::None,
            FaultArg::Unavailable => Fault::Unavailable,
            FaultArg::BadSignature => Fault::BadSignature,
            FaultArg::WrongSerial => Fault::WrongSerial,
            FaultArg::Internal => Fault::Internal,
        }
    }
}

/// Runs a parsed command line.
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve {
            state,
            listen,
            tls_cert,
            tls_key,
        } => run_serve(&state, listen, tls_cert.as_deref(), tls_key.as_deref()).await,
        Command::PublicKey { state } => {
            let key = super::state::load_or_create_key(&state)?;
            println!("{}", encode_public_key(&key.verifying_key()));
            Ok(())
        }
        Command::Admin(args) => run_admin(args).await,
        Command::InitCode { serial, edition } => {
            let serial = SerialNumber::parse(&serial)?;
            println!("{}", InitializationCode::new(serial, edition).encode());
            Ok(())
        }
    }
}

async fn run_serve(
    state: &Path,
    listen: SocketAddr,
    tls_cert: Option<&Path>,
    tls_key: Option<&Path>,
) -> anyhow::Result<()> {
    let tls = match (tls_cert, tls_key) {
        (Some(cert), Some(key)) => Some((
            std::fs::read(cert).with_context(|| format!("read {}", cert.display()))?,
            std::fs::read(key).with_context(|| format!("read {}", key.display()))?,
        )),
        _ => None,
    };
    let sim = Simulator::open(state)?;
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("listen on {listen}"))?;
    let addr = listener.local_addr()?;
    if !addr.ip().is_loopback() {
        tracing::warn!(%addr, "the development licensing server listens beyond loopback");
    }
    {
        use std::io::Write as _;
        let mut out = std::io::stdout().lock();
        writeln!(
            out,
            "vendor_public_key={}",
            encode_public_key(&sim.public_key())
        )?;
        writeln!(out, "listening on {addr}")?;
        out.flush()?;
    }
    tracing::info!(
        %addr,
        tls = tls.is_some(),
        state = %state.display(),
        "licensing-sim (development licensing server) serving"
    );
    serve(listener, sim, tls, stop_signal()).await
}

async fn admin_client(args: &AdminArgs) -> anyhow::Result<VendorAdminServiceClient<Channel>> {
    let timeout = Duration::from_millis(args.timeout_ms);
    let channel = endpoint(&args.server, args.ca_file.as_deref(), timeout)
        .map_err(anyhow::Error::msg)?
        .connect()
        .await
        .with_context(|| format!("connect to {}", args.server))?;
    Ok(VendorAdminServiceClient::new(channel))
}

async fn run_admin(args: AdminArgs) -> anyhow::Result<()> {
    let mut client = admin_client(&args).await?;
    let status = |e: tonic::Status| anyhow::anyhow!("{:?}: {}", e.code(), e.message());
    match args.command {
        AdminCommand::RegisterDevice {
            serial,
            name,
            edition,
        } => {
            let r = client
                .register_device(pb::RegisterDeviceRequest {
                    serial_number: serial,
                    name,
                    edition: edition_to_pb(edition) as i32,
                })
                .await
                .map_err(status)?;
            print_json(&device_json(r.get_ref().device.as_ref()));
        }
        AdminCommand::RedeemVoucher {
            serial,
            feature,
            quantity,
            expires_at,
            seat_model,
        } => {
            let r = client
                .redeem_voucher(pb::RedeemVoucherRequest {
                    serial_number: serial,
                    feature,
                    quantity,
                    expires_at: expires_at.map(timestamp),
                    seat_model: match seat_model {
                        None => pb::SeatModel::Unspecified,
                        Some(SeatModelArg::Assigned) => pb::SeatModel::Assigned,
                        Some(SeatModelArg::Concurrent) => pb::SeatModel::Concurrent,
                    } as i32,
                })
                .await
                .map_err(status)?;
            print_json(&device_json(r.get_ref().device.as_ref()));
        }
        AdminCommand::Revoke {
            serial,
            feature,
            quantity,
        } => {
            let r = client
                .revoke(pb::RevokeRequest {
                    serial_number: serial,
                    feature,
                    quantity,
                })
                .await
                .map_err(status)?;
            print_json(&device_json(r.get_ref().device.as_ref()));
        }
        AdminCommand::RecreateCertificate { serial, code } => {
            let r = client
                .recreate_certificate(pb::RecreateCertificateRequest {
                    serial_number: serial,
                    initialization_code: code,
                })
                .await
                .map_err(status)?;
            println!("{}", r.get_ref().activation_response);
        }
        AdminCommand::ListDevices => {
            let r = client
                .list_devices(pb::ListDevicesRequest {})
                .await
                .map_err(status)?;
            print_json(&DevicesJson {
                devices: r
                    .get_ref()
                    .devices
                    .iter()
                    .map(|d| device_json(Some(d)))
                    .collect(),
            });
        }
        AdminCommand::Stats => {
            let r = client
                .get_stats(pb::GetStatsRequest {})
                .await
                .map_err(status)?;
            print_json(&StatsJson {
                serials: r
                    .get_ref()
                    .serials
                    .iter()
                    .map(|s| SerialStatsJson {
                        serial_number: &s.serial_number,
                        activate_calls: s.activate_calls,
                        fetch_license_calls: s.fetch_license_calls,
                        report_tryout_calls: s.report_tryout_calls,
                        start_tryout_calls: s.start_tryout_calls,
                    })
                    .collect(),
            });
        }
        AdminCommand::Fault { fault } => {
            let fault = Fault::from(fault);
            client
                .set_fault(pb::SetFaultRequest {
                    fault: fault as i32,
                })
                .await
                .map_err(status)?;
            eprintln!("fault set: {}", fault.as_str_name());
        }
    }
    Ok(())
}

fn print_json(value: &impl Serialize) {
    println!(
        "{}",
        serde_json::to_string_pretty(value).expect("JSON values always serialize")
    );
}

fn time_json(ts: Option<&prost_types::Timestamp>) -> Option<String> {
    ts.and_then(from_timestamp)
        .map(|t| t.to_rfc3339_opts(SecondsFormat::AutoSi, true))
}

/// A license (voucher) as the admin commands print it.
#[derive(Debug, Serialize)]
struct LicenseJson<'a> {
    feature: &'a str,
    quantity: u32,
    expires_at: Option<String>,
    /// Shown only for a feature sold for concurrent use.
    #[serde(skip_serializing_if = "Option::is_none")]
    seat_model: Option<&'static str>,
}

/// A day's peak of use a device reported with a reconcile.
#[derive(Debug, Serialize)]
struct UsageJson<'a> {
    feature: &'a str,
    day: &'a str,
    peak_in_use: u32,
    capacity: u32,
    busy: u64,
}

/// A device as the admin commands print it.
#[derive(Debug, Serialize)]
struct DeviceJson<'a> {
    serial_number: &'a str,
    name: &'a str,
    edition: &'static str,
    licenses: Vec<LicenseJson<'a>>,
    tryout_started_at: Option<String>,
    /// The daily peaks of the concurrent features (absent when none reported).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    usage: Vec<UsageJson<'a>>,
}

/// A device as the admin commands print it (`null` when absent).
fn device_json(device: Option<&pb::Device>) -> Option<DeviceJson<'_>> {
    let d = device?;
    let edition = match pb::Edition::try_from(d.edition) {
        Ok(pb::Edition::Vm) => "vm",
        Ok(pb::Edition::Business) => "business",
        Ok(pb::Edition::Advanced) => "advanced",
        _ => "unspecified",
    };
    Some(DeviceJson {
        serial_number: &d.serial_number,
        name: &d.name,
        edition,
        licenses: d
            .licenses
            .iter()
            .map(|l| LicenseJson {
                feature: &l.feature,
                quantity: l.quantity,
                expires_at: time_json(l.expires_at.as_ref()),
                seat_model: (l.seat_model == pb::SeatModel::Concurrent as i32)
                    .then_some("concurrent"),
            })
            .collect(),
        tryout_started_at: time_json(d.tryout_started_at.as_ref()),
        usage: d
            .usage
            .iter()
            .map(|u| UsageJson {
                feature: &u.feature,
                day: &u.day,
                peak_in_use: u.peak_in_use,
                capacity: u.capacity,
                busy: u.busy,
            })
            .collect(),
    })
}

#[derive(Debug, Serialize)]
struct DevicesJson<'a> {
    devices: Vec<Option<DeviceJson<'a>>>,
}

#[derive(Debug, Serialize)]
struct StatsJson<'a> {
    serials: Vec<SerialStatsJson<'a>>,
}

#[derive(Debug, Serialize)]
struct SerialStatsJson<'a> {
    serial_number: &'a str,
    activate_calls: u64,
    fetch_license_calls: u64,
    report_tryout_calls: u64,
    start_tryout_calls: u64,
}

/// Resolves on SIGINT or, on Unix, SIGTERM: `serve` then stops accepting calls.
async fn stop_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_line_parses() {
        Cli::command_for_test().debug_assert();
        let cli = Cli::try_parse_from([
            "licensing-sim",
            "admin",
            "redeem-voucher",
            "--serial",
            "S1",
            "--feature",
            "user",
            "--quantity",
            "10",
            "--expires-at",
            "2027-12-31T00:00:00Z",
        ])
        .unwrap();
        let Command::Admin(args) = cli.command else {
            panic!("not admin")
        };
        assert_eq!(args.server, "http://127.0.0.1:7443");
        assert!(matches!(
            args.command,
            AdminCommand::RedeemVoucher {
                quantity: 10,
                expires_at: Some(_),
                ..
            }
        ));
        let cli = Cli::try_parse_from(["licensing-sim", "serve", "--state", "/tmp/x"]).unwrap();
        assert!(matches!(
            cli.command,
            Command::Serve { listen, tls_cert: None, .. } if listen.to_string() == "127.0.0.1:7443"
        ));
        // TLS needs both files.
        assert!(
            Cli::try_parse_from(["licensing-sim", "serve", "--state", "x", "--tls-cert", "c"])
                .is_err()
        );
        let cli =
            Cli::try_parse_from(["licensing-sim", "admin", "fault", "bad-signature"]).unwrap();
        assert!(matches!(
            cli.command,
            Command::Admin(AdminArgs {
                command: AdminCommand::Fault {
                    fault: FaultArg::BadSignature
                },
                ..
            })
        ));
        assert!(
            Cli::try_parse_from([
                "licensing-sim",
                "admin",
                "register-device",
                "--serial",
                "S1",
                "--edition",
                "pro"
            ])
            .is_err()
        );
    }

    #[test]
    fn devices_print_as_json() {
        let d = pb::Device {
            serial_number: "S1".into(),
            name: "office".into(),
            edition: pb::Edition::Business as i32,
            licenses: vec![pb::License {
                feature: "user".into(),
                quantity: 3,
                expires_at: Some(prost_types::Timestamp {
                    seconds: 1_800_000_000,
                    nanos: 0,
                }),
                seat_model: 0,
            }],
            tryout_started_at: None,
            usage: Vec::new(),
        };
        let v = serde_json::to_value(device_json(Some(&d))).unwrap();
        assert_eq!(v["edition"], "business");
        assert_eq!(v["licenses"][0]["quantity"], 3);
        assert_eq!(v["licenses"][0]["expires_at"], "2027-01-15T08:00:00Z");
        assert_eq!(v["tryout_started_at"], serde_json::Value::Null);
        let text = serde_json::to_string(&device_json(Some(&d))).unwrap();
        assert!(
            text.starts_with(r#"{"serial_number":"S1","name":"office""#),
            "{text}"
        );
        assert_eq!(serde_json::to_string(&device_json(None)).unwrap(), "null");
    }

    impl Cli {
        fn command_for_test() -> clap::Command {
            <Self as clap::CommandFactory>::command()
        }
    }
}
