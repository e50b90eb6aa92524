//! `tessera`: the operator and developer tool. `main` only parses arguments and hands over to
//! the module that does the work.
#![forbid(unsafe_code)]

mod audit_verify;
mod bench;
mod bench_cards;
mod bench_load;
mod bench_report;
mod bench_stack;
mod import_file;
mod keys_admin;
mod pki;
mod stack;
mod vault_admin;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::pki::InitOutcome;

const DEV_ONLY_WARNING: &str = "WARNING: development only -- see certs/README.md for production certificates";

#[derive(Debug, Parser)]
#[command(name = "tessera", version, about = "Tessera operator and developer tool")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Development certificates for mutual TLS.
    Certs {
        #[command(subcommand)]
        command: CertsCommand,
    },
    /// Operator tasks on a vault: init and unseal a sealed vault, seal it, show its status.
    Vault {
        #[command(subcommand)]
        command: VaultCommand,
    },
    /// Key rotation through the gateway: rotate a merchant's data key, show progress,
    /// re-wrap every key after a master-key change.
    Keys {
        #[command(subcommand)]
        command: keys_admin::KeysCommand,
    },
    /// The vault's tamper-evident audit log.
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
    /// Start the local development stack (vault and gateway) and wait for Ctrl-C.
    Up {
        /// Directory for the generated configuration, the development master key and the database.
        #[arg(long, default_value = ".tessera")]
        state_dir: PathBuf,
        /// Directory of the development PKI; created with `certs init` if it has no CA yet.
        #[arg(long, default_value = "certs")]
        certs_dir: PathBuf,
        /// Address the gateway's public gRPC API listens on.
        #[arg(long, default_value = "127.0.0.1:8443")]
        gateway_addr: SocketAddr,
        /// Address the vault listens on.
        #[arg(long, default_value = "127.0.0.1:7443")]
        vault_addr: SocketAddr,
        /// The gateway's database: a `postgres://` URL (or an SQLite file path) instead of
        /// STATE_DIR/tessera.db. The gateway creates its tables there at start.
        #[arg(long, value_name = "URL_OR_PATH")]
        database: Option<String>,
    },
    /// Load-test the gateway and compare it with a no-op floor (see docs/benchmarks.md).
    Bench(bench::BenchArgs),
    /// Bulk-import cards (or bank accounts and contact data) from a CSV or JSON-lines file.
    Import(import_file::ImportArgs),
    /// Apply the gateway's database migrations and exit, for operators who run schema changes
    /// by hand before starting gateways (gateways also apply them at start).
    Migrate {
        /// The gateway's `database`: an SQLite file path or a `postgres://` URL.
        #[arg(long, env = "TESSERA_DATABASE")]
        database: String,
    },
}

#[derive(Debug, Subcommand)]
enum VaultCommand {
    /// Create the master key inside a sealed vault and split it into key shares, one file per
    /// custodian (mode 0600). Runs once per vault; the whole key is never written anywhere.
    Init {
        #[command(flatten)]
        split: vault_admin::ShareSplit,
        #[command(flatten)]
        connection: vault_admin::VaultConnection,
    },
    /// Submit one custodian's key share to a sealed vault.
    Unseal {
        /// The custodian's share file from `tessera vault init`.
        #[arg(long)]
        share_file: PathBuf,
        #[command(flatten)]
        connection: vault_admin::VaultConnection,
    },
    /// KEK rotation of an unsealed sealed-start vault (rekey ceremony): the vault creates a new
    /// master key and new shares, one file per custodian; the old shares stop working. The
    /// replaced key only unwraps until `retire-keys`.
    Rekey {
        #[command(flatten)]
        split: vault_admin::ShareSplit,
        #[command(flatten)]
        connection: vault_admin::VaultConnection,
    },
    /// End a KEK rotation: the vault forgets the retiring master keys. Run after `tessera keys
    /// rewrap-all` has re-wrapped every merchant key.
    RetireKeys {
        #[command(flatten)]
        connection: vault_admin::VaultConnection,
    },
    /// Wipe a sealed-start vault's keys from memory until it is unsealed again.
    Seal {
        #[command(flatten)]
        connection: vault_admin::VaultConnection,
    },
    /// Show the vault's seal, key, audit and hardening state (and the audit public key).
    Status {
        #[command(flatten)]
        connection: vault_admin::VaultConnection,
    },
}

#[derive(Debug, Subcommand)]
enum AuditCommand {
    /// Check a vault audit log offline: hash chain, block signatures, shutdown seal. Reports
    /// the first break.
    Verify {
        /// The audit log file.
        file: PathBuf,
        /// The vault's audit public key: 64 hex digits, or a file holding them.
        #[arg(long)]
        public_key: String,
        /// Accept a log without the shutdown seal at its end (a running vault's log); its
        /// unsigned tail is reported instead.
        #[arg(long)]
        allow_open_tail: bool,
    },
}

#[derive(Debug, Subcommand)]
enum CertsCommand {
    /// Create a development CA and the vault, gateway and client certificates.
    Init {
        /// Where to write the certificates and keys.
        #[arg(long, default_value = "certs")]
        dir: PathBuf,
        /// Replace an existing PKI (every certificate issued from the old CA stops working).
        #[arg(long)]
        force: bool,
    },
    /// Issue one more client certificate from the CA in DIR.
    Client {
        /// Directory holding ca.pem and ca-key.pem.
        #[arg(long, default_value = "certs")]
        dir: PathBuf,
        /// File stem: writes NAME.pem and NAME-key.pem.
        #[arg(long)]
        name: String,
        /// The URI SAN policy is keyed by, e.g. spiffe://tessera/checkout.
        #[arg(long)]
        identity: String,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Vault { command } => run_vault(command),
        Command::Keys { command } => run_keys(command),
        Command::Audit {
            command:
                AuditCommand::Verify {
                    file,
                    public_key,
                    allow_open_tail,
                },
        } => audit_verify::run(&file, &public_key, allow_open_tail).map_err(Into::into),
        Command::Certs {
            command: CertsCommand::Init { dir, force },
        } => certs_init(&dir, force),
        Command::Certs {
            command: CertsCommand::Client { dir, name, identity },
        } => certs_client(&dir, &name, &identity),
        Command::Up {
            state_dir,
            certs_dir,
            gateway_addr,
            vault_addr,
            database,
        } => {
            let options = stack::UpOptions {
                state_dir,
                certs_dir,
                gateway_addr,
                vault_addr,
                database,
            };
            run_up(&options)
        }
        Command::Bench(args) => run_bench(args),
        Command::Migrate { database } => run_migrate(&database),
        Command::Import(args) => run_import(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err}");
            ExitCode::FAILURE
        }
    }
}

fn certs_init(dir: &Path, force: bool) -> Result<(), Box<dyn std::error::Error>> {
    match pki::init(dir, force)? {
        InitOutcome::Created(files) => {
            println!("Created a development PKI in {}:", dir.display());
            for file in files {
                println!("  {}", file.display());
            }
        }
        InitOutcome::AlreadyPresent { missing } => {
            println!(
                "{} already exists; nothing changed (use --force to replace the PKI)",
                dir.join(pki::CA_CERT).display()
            );
            if !missing.is_empty() {
                let names: Vec<String> = missing.iter().map(|path| path.display().to_string()).collect();
                eprintln!("note: missing {}; --force recreates every file", names.join(", "));
            }
        }
    }
    println!("{DEV_ONLY_WARNING}");
    Ok(())
}

fn certs_client(dir: &Path, name: &str, identity: &str) -> Result<(), Box<dyn std::error::Error>> {
    let files = pki::issue_client(dir, name, identity)?;
    println!("Issued a client certificate for {identity}:");
    for file in files {
        println!("  {}", file.display());
    }
    println!("{DEV_ONLY_WARNING}");
    Ok(())
}

fn run_vault(command: VaultCommand) -> Result<(), Box<dyn std::error::Error>> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        match command {
            VaultCommand::Init { split, connection } => vault_admin::init(&connection, &split).await,
            VaultCommand::Unseal {
                share_file,
                connection,
            } => vault_admin::unseal(&connection, &share_file).await,
            VaultCommand::Seal { connection } => vault_admin::seal(&connection).await,
            VaultCommand::Rekey { split, connection } => vault_admin::rekey(&connection, &split).await,
            VaultCommand::RetireKeys { connection } => vault_admin::retire_keys(&connection).await,
            VaultCommand::Status { connection } => vault_admin::status(&connection).await,
        }
    })?;
    Ok(())
}

fn run_keys(command: keys_admin::KeysCommand) -> Result<(), Box<dyn std::error::Error>> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(keys_admin::run(command))?;
    Ok(())
}

fn run_up(options: &stack::UpOptions) -> Result<(), Box<dyn std::error::Error>> {
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(stack::up(options))?;
    Ok(())
}

fn run_import(args: import_file::ImportArgs) -> Result<(), Box<dyn std::error::Error>> {
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let summary = runtime.block_on(import_file::run(args))?;
    // A migration must never look done when it is not: any line not imported fails the
    // command (the results file names each one and why).
    if summary.failed > 0 {
        return Err(format!(
            "{} of {} lines were not imported; the results file names each one and why",
            summary.failed,
            summary.failed + summary.succeeded
        )
        .into());
    }
    Ok(())
}

fn run_migrate(database: &str) -> Result<(), Box<dyn std::error::Error>> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(tessera_gateway::storage::Store::migrate(database))?;
    // The URL may carry a password; say which backend instead of echoing it.
    let backend = match tessera_gateway::storage::Backend::of(database) {
        tessera_gateway::storage::Backend::Postgres => "PostgreSQL",
        tessera_gateway::storage::Backend::Sqlite => "SQLite",
    };
    println!("{backend} database is migrated to the gateway's current schema");
    Ok(())
}

fn run_bench(args: bench::BenchArgs) -> Result<(), Box<dyn std::error::Error>> {
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(bench::run(args))
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    #[test]
    fn arguments_are_consistent() {
        Cli::command().debug_assert();
    }
}
