#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use regatta::config::Settings;
use regatta::startup::Application;

#[derive(Parser)]
#[command(
    name = "regatta",
    version,
    about = "Container-registry gateway: one address, many backing registries"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a node.
    Serve {
        /// Configuration file (default: config/default.toml when it exists).
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Check a configuration file and name every problem in it.
    CheckConfig { file: PathBuf },
    /// Operate a cluster through a node's admin API.
    Admin {
        /// The admin listener of any node.
        #[arg(
            long,
            env = "REGATTA_ADMIN_URL",
            default_value = "http://127.0.0.1:5001"
        )]
        url: String,
        /// The admin token (`[admin] token`).
        #[arg(long, env = "REGATTA_ADMIN_TOKEN", hide_env_values = true)]
        token: String,
        #[command(subcommand)]
        command: regatta::admin_cli::AdminCommand,
    },
}

fn main() -> ExitCode {
    match Cli::parse().command {
        Command::Admin {
            url,
            token,
            command,
        } => match regatta::admin_cli::run(&url, &token, command) {
            Ok(text) => {
                println!("{}", text.trim_end());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("regatta admin: {e}");
                ExitCode::FAILURE
            }
        },
        Command::CheckConfig { file } => match Settings::load(Some(&file), std::env::vars()) {
            Ok(s) => {
                // Warnings are allowed: printed, and the check still passes.
                for warning in s.warnings() {
                    eprintln!("{}: warning: {warning}", file.display());
                }
                println!(
                    "{}: ok ({} backends, {} orgs)",
                    file.display(),
                    s.backends.len(),
                    s.orgs.len()
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{}: {e}", file.display());
                ExitCode::FAILURE
            }
        },
        Command::Serve { config } => {
            let settings = match Settings::load(config.as_deref(), std::env::vars()) {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("{e}");
                    return ExitCode::FAILURE;
                }
            };
            match serve(settings) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!(error = %e, "regatta stopped");
                    eprintln!("regatta: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

#[actix_web::main]
async fn serve(settings: Settings) -> anyhow::Result<()> {
    let telemetry = regatta::telemetry::init(&settings.log, &settings.tracing);
    let grace = settings.server.shutdown_grace;
    for warning in settings.warnings() {
        tracing::warn!(key = %warning.key, "{}", warning.reason);
    }
    let app = Application::build(settings)?;
    tracing::info!(addr = %app.addr(), "registry API listening");
    println!("regatta listening on http://{}", app.addr());
    if let Some(admin) = app.admin_addr() {
        tracing::info!(addr = %admin, "admin API listening");
        println!("regatta admin API on http://{admin}");
    }
    app.stop_on_signals(grace);
    let served = app.run_until_stopped().await;
    // The OTLP exporter's shutdown blocks; on actix's runtime it must run off the loop.
    let _ = actix_web::rt::task::spawn_blocking(move || telemetry.shutdown()).await;
    served?;
    Ok(())
}
