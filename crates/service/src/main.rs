//! Entry point: parse the command line, load the configuration, start logging,
//! bind the listener, start the SIGHUP reload and the systemd watchdog, and hand
//! over to `App::run`.

use std::sync::Arc;

use anyhow::Context as _;
use clap::Parser as _;
use comtrexx_licensing::app::App;
use comtrexx_licensing::cli::{self, Cli, Command};
use comtrexx_licensing::config::RawConfig;
use comtrexx_licensing::domain::SystemClock;
use comtrexx_licensing::{reload, shutdown_signal, systemd, telemetry};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command.unwrap_or(Command::Serve) {
        Command::Config => cli::print_config(cli.config.as_deref()),
        Command::Dev(dev) => cli::run_dev(dev),
        Command::Auth(auth) => cli::run_auth(auth),
        Command::Serve => {
            let config = RawConfig::load(cli.config.as_deref())?.validate()?;
            let telemetry = telemetry::init(&config.telemetry())?;
            let app = App::build(&config, Arc::new(SystemClock))?;
            if telemetry.otel_enabled() {
                comtrexx_licensing::exporter::register_otel_gauges(app.licensing.clone());
            }
            comtrexx_licensing::log_startup(&config, app.store.describe());
            let listener = tokio::net::TcpListener::bind(config.listen_addr)
                .await
                .with_context(|| format!("bind listen_addr {}", config.listen_addr))?;
            let metrics_listener = match config.metrics_addr {
                Some(addr) => Some(
                    tokio::net::TcpListener::bind(addr)
                        .await
                        .with_context(|| format!("bind metrics_addr {addr}"))?,
                ),
                None => None,
            };
            tracing::info!(
                addr = %listener.local_addr()?,
                metrics = ?config.metrics_addr,
                "serving gRPC"
            );
            // Before serving: a SIGHUP from the moment systemd hears READY=1 reloads.
            reload::spawn_on_sighup(app.reloads.clone())?;
            systemd::spawn_watchdog();
            let result = app.run(listener, metrics_listener, shutdown_signal()).await;
            telemetry.shutdown();
            result
        }
    }
}
