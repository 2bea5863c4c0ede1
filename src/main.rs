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
}

fn main() -> ExitCode {
    match Cli::parse().command {
        Command::CheckConfig { file } => match Settings::load(Some(&file), std::env::vars()) {
            Ok(s) => {
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
            regatta::telemetry::init(&settings.log);
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
    let app = Application::build(settings)?;
    tracing::info!(addr = %app.addr(), "registry API listening");
    println!("regatta listening on http://{}", app.addr());
    let handle = app.handle();
    actix_web::rt::spawn(async move {
        let _ = tokio::signal::ctrl_c().await;
        tracing::info!("shutting down");
        handle.stop(true).await;
    });
    app.run_until_stopped().await?;
    Ok(())
}
