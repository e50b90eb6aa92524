//! `tessera-vault --config vault.toml`

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;
use tessera_vault::audit::AuditLog;
use tessera_vault::config::{MasterKeyConfig, Mode, VaultConfig};
use tessera_vault::hardening::{harden_process, is_debug_build};
use tessera_vault::kek_source::{DevelopmentKeyFile, MasterKeySource};
use tessera_vault::sealing::SealedStart;
use tessera_vault::service::{KeySource, VaultFacts, VaultLimits, VaultService};
use tessera_vault::{grpc, tls};
use tessera_vault_core::crypto::Random;

/// Tessera's vault: the only process that holds keys.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Path of the vault's TOML configuration.
    #[arg(long, env = "TESSERA_VAULT_CONFIG")]
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
    // Harden before anything secret is in memory.
    let hardening = harden_process();
    match run(Args::parse(), hardening).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            tracing::error!("{err}");
            eprintln!("tessera-vault: {err}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args, hardening: tessera_vault::hardening::HardeningReport) -> Result<(), String> {
    let config = VaultConfig::load(&args.config).map_err(|err| err.to_string())?;
    if config.mode == Mode::Production && is_debug_build() {
        return Err("refusing to run a debug build in production mode; build with --release".into());
    }
    config.check_production().map_err(|err| err.to_string())?;
    let tls = tls::server_config(&config.tls)?;
    let mut previous_keys = Vec::new();
    let (keys, source_name) = match &config.master_key {
        MasterKeyConfig::DevelopmentFile {
            path,
            create_if_missing,
            previous_paths,
        } => {
            if config.mode == Mode::Production {
                return Err("the development key file is not allowed in production mode".into());
            }
            let source = DevelopmentKeyFile {
                path: path.clone(),
                create_if_missing: *create_if_missing,
            };
            let master = source.load(&Random::system()).map_err(|err| err.to_string())?;
            tracing::info!(key_check_value = %master.key_check_value(), source = source.describe(), "master key loaded");
            for path in previous_paths {
                let previous = DevelopmentKeyFile {
                    path: path.clone(),
                    create_if_missing: false,
                }
                .load(&Random::system())
                .map_err(|err| err.to_string())?;
                tracing::warn!(key_check_value = %previous.key_check_value(), "previous master key loaded for re-wrapping only (KEK rotation)");
                previous_keys.push(previous);
            }
            (
                KeySource::Loaded {
                    master,
                    previous: std::mem::take(&mut previous_keys),
                },
                source.describe(),
            )
        }
        MasterKeyConfig::Sealed {
            state_file,
            distinct_custodians,
        } => {
            let sealed =
                SealedStart::open(state_file.clone(), *distinct_custodians).map_err(|err| err.to_string())?;
            let status = sealed.status();
            if status.initialized {
                tracing::warn!(
                    key_check_value = %status.key_check_value,
                    threshold = status.threshold,
                    shares = status.shares,
                    "vault is SEALED: {} of {} custodians must run `tessera vault unseal`",
                    status.threshold,
                    status.shares
                );
            } else {
                tracing::warn!("vault is SEALED and not initialised: run `tessera vault init`");
            }
            (KeySource::Sealed(sealed), "sealed (Shamir key shares)")
        }
    };
    let (audit, prior_log) = match &config.audit {
        Some(audit) => AuditLog::open(audit),
        None => {
            tracing::warn!("no [audit] log configured: operations are NOT audited (development only)");
            (AuditLog::disabled(), "disabled")
        }
    };
    let facts = VaultFacts {
        mode: config.mode,
        master_key_source: source_name,
        hardening,
    };
    let vault =
        Arc::new(VaultService::new(keys, audit, limits(&config), facts).map_err(|err| err.to_string())?);
    vault.record_start(prior_log);
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|err| format!("cannot listen on {}: {err}", config.listen))?;
    tracing::info!(addr = %config.listen, mode = config.mode.as_str(), "vault listening (mutual TLS)");
    tokio::spawn(purge_cvcs(Arc::downgrade(&vault)));
    if let Some(audit) = &config.audit {
        let interval = std::time::Duration::from_millis(audit.seal_interval_ms);
        tokio::spawn(seal_audit_blocks(Arc::downgrade(&vault), interval));
    }
    grpc::serve(
        Arc::clone(&vault),
        config.roles(),
        tls,
        listener,
        shutdown_signal(),
    )
    .await;
    // The shutdown seal: a log that does not end with it was cut short or its vault crashed.
    let _ = tokio::task::spawn_blocking(move || vault.record_stop()).await;
    tracing::info!("vault stopped");
    Ok(())
}

/// Seals an audit block and flushes the log to disk every `interval`, on a blocking thread so
/// the flush never stalls the runtime.
async fn seal_audit_blocks(vault: std::sync::Weak<VaultService>, interval: std::time::Duration) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(vault) = vault.upgrade() else { return };
        let _ = tokio::task::spawn_blocking(move || vault.audit_tick()).await;
    }
}

fn limits(config: &VaultConfig) -> VaultLimits {
    VaultLimits {
        key_cache_capacity: config.key_cache_capacity,
        cvc_ttl: std::time::Duration::from_secs(config.cvc_ttl_secs),
        cvc_capacity: config.cvc_capacity,
    }
}

/// Wipes expired CVCs every few seconds, so one is never held much past its time limit even
/// when nobody asks for it.
async fn purge_cvcs(vault: std::sync::Weak<VaultService>) {
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(5));
    loop {
        tick.tick().await;
        let Some(vault) = vault.upgrade() else { return };
        let purged = vault.purge_expired_cvcs();
        if purged > 0 {
            tracing::info!(purged, "expired CVCs wiped");
        }
    }
}

/// Completes on Ctrl-C or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    if let Ok(mut term) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    } else {
        let _ = ctrl_c.await;
    }
}
