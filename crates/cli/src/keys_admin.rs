//! `tessera keys rotate | status | rewrap-all`: key rotation through the gateway's
//! `tessera.v1.KeyAdmin` service, over mutual TLS as the operator identity (whose caller policy
//! must grant `rotate_keys`, and `read_metadata` for the status).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Subcommand};
use tessera_api::error_details::decode_error_info;
use tessera_api::v1::key_admin_client::KeyAdminClient;
use tessera_api::v1::{RewrapAllRequest, RotateKeyRequest, RotationStatusRequest};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

/// How to reach the gateway as an operator.
#[derive(Debug, Clone, Args)]
pub struct GatewayConnection {
    /// The gateway's public address.
    #[arg(long, env = "TESSERA_GATEWAY_ADDR", default_value = "127.0.0.1:8443")]
    pub gateway: SocketAddr,
    /// Directory of the PKI (ca.pem and the client certificate).
    #[arg(long, default_value = "certs")]
    pub certs_dir: PathBuf,
    /// Client certificate name in the certs directory (NAME.pem, NAME-key.pem).
    #[arg(long, default_value = "operator")]
    pub client: String,
}

#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Create a merchant's next data-key version: new writes use it at once, older records
    /// are re-encrypted in the background and old versions destroyed when unused.
    Rotate {
        #[arg(long)]
        merchant: String,
        #[command(flatten)]
        connection: GatewayConnection,
    },
    /// Show a merchant's data-key versions and the records each still protects.
    Status {
        #[arg(long)]
        merchant: String,
        #[command(flatten)]
        connection: GatewayConnection,
    },
    /// Master-key (KEK) rotation: re-wrap every stored key with the vault's current master
    /// key. Run after restarting the vaults with the new key current and the old one previous.
    RewrapAll {
        #[command(flatten)]
        connection: GatewayConnection,
    },
}

fn refused(status: &tonic::Status) -> String {
    let reason = decode_error_info(status.details())
        .map(|info| info.reason)
        .unwrap_or_else(|| "UNKNOWN".to_owned());
    format!(
        "the gateway refused: {} ({:?}, {reason})",
        status.message(),
        status.code()
    )
}

async fn connect(connection: &GatewayConnection) -> Result<KeyAdminClient<Channel>, String> {
    let read = |name: &str| {
        let path = connection.certs_dir.join(name);
        std::fs::read(&path).map_err(|err| format!("cannot read {}: {err}", path.display()))
    };
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(read("ca.pem")?))
        .identity(Identity::from_pem(
            read(&format!("{}.pem", connection.client))?,
            read(&format!("{}-key.pem", connection.client))?,
        ))
        .domain_name("tessera-gateway");
    let channel = Endpoint::from_shared(format!("https://{}", connection.gateway))
        .and_then(|endpoint| endpoint.tls_config(tls))
        .map_err(|err| err.to_string())?
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
        .map_err(|err| format!("cannot connect to the gateway at {}: {err}", connection.gateway))?;
    Ok(KeyAdminClient::new(channel))
}

pub async fn run(command: KeysCommand) -> Result<(), String> {
    match command {
        KeysCommand::Rotate { merchant, connection } => {
            let response = connect(&connection)
                .await?
                .rotate_key(RotateKeyRequest {
                    merchant_id: merchant,
                })
                .await
                .map_err(|status| refused(&status))?
                .into_inner();
            println!(
                "merchant {}: data key version {} is current (was {}); older records are re-encrypted in the background",
                response.merchant_id, response.data_key_version, response.previous_version
            );
        }
        KeysCommand::Status { merchant, connection } => {
            let response = connect(&connection)
                .await?
                .rotation_status(RotationStatusRequest {
                    merchant_id: merchant,
                })
                .await
                .map_err(|status| refused(&status))?
                .into_inner();
            println!("merchant {}", response.merchant_id);
            println!("  current data key version  {}", response.current_version);
            println!("  fingerprint key version   {}", response.fingerprint_key_version);
            println!("  records to re-encrypt     {}", response.pending_records);
            for version in &response.versions {
                println!(
                    "  version {:>4}  records {:>10}{}",
                    version.version,
                    version.records,
                    if version.current { "  (current)" } else { "" }
                );
            }
            if !response.job_holder.is_empty() {
                println!(
                    "  re-encryption lease held by {} until {} (Unix ms)",
                    response.job_holder, response.job_lease_until
                );
            }
        }
        KeysCommand::RewrapAll { connection } => {
            let response = connect(&connection)
                .await?
                .rewrap_all(RewrapAllRequest {})
                .await
                .map_err(|status| refused(&status))?
                .into_inner();
            println!(
                "re-wrapped {} keys under master key {} ({} failed, {} changed meanwhile and left alone)",
                response.rewrapped, response.master_key_check_value, response.failed, response.skipped
            );
            if response.failed > 0 {
                return Err(format!(
                    "{} keys could not be re-wrapped: keep the previous master key until they are",
                    response.failed
                ));
            }
        }
    }
    Ok(())
}
