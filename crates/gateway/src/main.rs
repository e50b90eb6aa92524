//! `tessera-gateway --config gateway.toml`

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use tessera_gateway::clock::Clock;
use tessera_gateway::config::{GatewayConfig, Mode};
use tessera_gateway::server;

/// Tessera's public gRPC gateway.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Path of the gateway's TOML configuration.
    #[arg(long, env = "TESSERA_GATEWAY_CONFIG")]
    config: PathBuf,
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let args = Args::parse();
    match run(args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            tracing::error!("{err}");
            eprintln!("tessera-gateway: {err}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> Result<(), String> {
    // rustls needs one process-wide provider; Tessera uses ring everywhere.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let config = GatewayConfig::load(&args.config).map_err(|err| err.to_string())?;
    // Debug builds carry debug assertions and no optimisation: not a build to serve card
    // traffic with, as the vault also refuses.
    if config.mode == Mode::Production && cfg!(debug_assertions) {
        return Err("production mode refuses a debug build; build with --release".into());
    }
    let clock = match &config.testing.clock_offset_file {
        Some(path) => {
            tracing::warn!(path = %path.display(), "TEST CLOCK IN USE: time is offset by the file's value");
            Clock::from_offset_file(path.clone())
        }
        None => Clock::system(),
    };
    let gateway = server::build(&config, clock).await?;
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|err| format!("cannot listen on {}: {err}", config.listen))?;
    server::serve(config, gateway, listener, shutdown_signal()).await?;
    tracing::info!("gateway stopped");
    Ok(())
}

/// Completes on Ctrl-C or SIGTERM, so `tessera up` and service managers stop us cleanly.
async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        if let Ok(mut term) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            tokio::select! {
                _ = ctrl_c => {}
                _ = term.recv() => {}
            }
            return;
        }
    }
    let _ = ctrl_c.await;
}
