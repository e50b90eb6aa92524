//! `tessera vault init | unseal | seal | status | rekey | retire-keys`: operator calls to a vault over mutual TLS with
//! an operator certificate.
//!
//! Key shares pass through this tool only in zeroizing memory: `init` writes each share to its
//! own new file (mode 0600) and prints none; `unseal` reads one share file and sends it.

use std::fmt;
use std::fs;
use std::io::Write as _;
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Args;
use tessera_api::error_details::decode_error_info;
use tessera_api::vault::vault_client::VaultClient;
use tessera_api::vault::{
    InitRequest, RekeyRequest, RetireMasterKeysRequest, SealRequest, StatusRequest, StatusResponse,
    UnsealRequest,
};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use zeroize::Zeroizing;

/// The first word of a share line (the vault's `sealing::SHARE_PREFIX`).
const SHARE_PREFIX: &str = "tessera-share-v1";

/// How to reach the vault as an operator.
#[derive(Debug, Clone, Args)]
pub struct VaultConnection {
    /// The vault's address.
    #[arg(long, env = "TESSERA_VAULT_ADDR", default_value = "127.0.0.1:7443")]
    pub vault: String,
    /// Directory of the PKI; the defaults below are read from it.
    #[arg(long, default_value = "certs")]
    pub certs_dir: PathBuf,
    /// CA certificate the vault's certificate must chain to [default: CERTS_DIR/ca.pem].
    #[arg(long)]
    pub ca: Option<PathBuf>,
    /// Operator client certificate [default: CERTS_DIR/operator.pem].
    #[arg(long)]
    pub cert: Option<PathBuf>,
    /// Operator client key [default: CERTS_DIR/operator-key.pem].
    #[arg(long)]
    pub key: Option<PathBuf>,
    /// The name the vault's certificate is checked against.
    #[arg(long, default_value = "tessera-vault")]
    pub server_name: String,
}

/// An operator command that failed.
#[derive(Debug)]
#[non_exhaustive]
pub enum AdminError {
    /// A local file could not be read or written.
    Io { path: PathBuf, cause: std::io::Error },
    /// The vault could not be reached over mutual TLS.
    Connect(String),
    /// The vault refused the call.
    Refused {
        code: tonic::Code,
        reason: String,
        message: String,
    },
    /// Bad input on the command line or in a file.
    Usage(String),
}

impl fmt::Display for AdminError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Io { path, cause } => write!(f, "{}: {cause}", path.display()),
            Self::Connect(why) => write!(f, "cannot reach the vault: {why}"),
            Self::Refused {
                code,
                reason,
                message,
            } => {
                write!(f, "the vault refused: {reason}: {message} ({code:?})")
            }
            Self::Usage(why) => f.write_str(why),
        }
    }
}

impl std::error::Error for AdminError {}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> AdminError + '_ {
    move |cause| AdminError::Io {
        path: path.to_owned(),
        cause,
    }
}

fn refused(status: tonic::Status) -> AdminError {
    let reason = decode_error_info(status.details())
        .map(|info| info.reason)
        .unwrap_or_else(|| "UNKNOWN".to_owned());
    AdminError::Refused {
        code: status.code(),
        reason,
        message: status.message().to_owned(),
    }
}

async fn connect(connection: &VaultConnection) -> Result<VaultClient<Channel>, AdminError> {
    let dir = &connection.certs_dir;
    let ca = connection.ca.clone().unwrap_or_else(|| dir.join("ca.pem"));
    let cert = connection
        .cert
        .clone()
        .unwrap_or_else(|| dir.join("operator.pem"));
    let key = connection
        .key
        .clone()
        .unwrap_or_else(|| dir.join("operator-key.pem"));
    let ca_pem = fs::read(&ca).map_err(io(&ca))?;
    let cert_pem = fs::read(&cert).map_err(io(&cert))?;
    let key_pem = Zeroizing::new(fs::read(&key).map_err(io(&key))?);
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca_pem))
        .identity(Identity::from_pem(cert_pem, key_pem.as_slice()))
        .domain_name(connection.server_name.clone());
    let channel = Endpoint::from_shared(format!("https://{}", connection.vault))
        .map_err(|err| AdminError::Connect(err.to_string()))?
        .connect_timeout(Duration::from_secs(10))
        .timeout(Duration::from_secs(30))
        .tls_config(tls)
        .map_err(|err| AdminError::Connect(err.to_string()))?
        .connect()
        .await
        .map_err(|err| AdminError::Connect(format!("{err:?}")))?;
    Ok(VaultClient::new(channel))
}

/// The share file of custodian `index`.
fn share_path(out_dir: &Path, index: u32, shares: u32) -> PathBuf {
    out_dir.join(format!("share-{index}-of-{shares}.txt"))
}

/// How a new master key is split: the arguments of `init` and `rekey`.
#[derive(Debug, Clone, Args)]
pub struct ShareSplit {
    /// Number of shares (custodians), 2 to 255.
    #[arg(long)]
    pub shares: u32,
    /// Shares needed to unseal, 2 to --shares.
    #[arg(long)]
    pub threshold: u32,
    /// Where to write share-I-of-N.txt (created with mode 0700; must hold no share files).
    #[arg(long)]
    pub out_dir: PathBuf,
}

/// `tessera vault init`: the vault creates and splits the master key; each share goes to its
/// own new file in `out_dir`, which is created with mode 0700 and must not hold share files.
pub async fn init(connection: &VaultConnection, split: &ShareSplit) -> Result<(), AdminError> {
    let mut client = ceremony(connection, split).await?;
    let request = InitRequest {
        shares: split.shares,
        threshold: split.threshold,
    };
    let response = client.init(request).await.map_err(refused)?.into_inner();
    write_shares(
        split,
        &response.shares,
        response.threshold,
        &response.key_check_value,
    )?;
    println!("audit public key: {}", response.audit_public_key);
    println!(
        "The vault is initialised and SEALED. Hand each share file to its custodian, then delete \
         it here; {} of them must run `tessera vault unseal` after every start.",
        response.threshold
    );
    Ok(())
}

/// `tessera vault rekey`: KEK rotation of an unsealed sealed-start vault. The vault creates a
/// new master key and new shares (written like `init`'s); the old shares stop working.
pub async fn rekey(connection: &VaultConnection, split: &ShareSplit) -> Result<(), AdminError> {
    let mut client = ceremony(connection, split).await?;
    let request = RekeyRequest {
        shares: split.shares,
        threshold: split.threshold,
    };
    let response = client.rekey(request).await.map_err(refused)?.into_inner();
    write_shares(
        split,
        &response.shares,
        response.threshold,
        &response.key_check_value,
    )?;
    println!(
        "retiring (unwrap only): {}",
        response.retiring_key_check_values.join(", ")
    );
    println!("audit public key from now on: {}", response.audit_public_key);
    println!(
        "The vault wraps with the new master key. Hand out the new share files and destroy the \
         old shares; run `tessera keys rewrap-all`, then `tessera vault retire-keys`."
    );
    Ok(())
}

/// `tessera vault retire-keys`: ends a KEK rotation (after `tessera keys rewrap-all`).
pub async fn retire_keys(connection: &VaultConnection) -> Result<(), AdminError> {
    let mut client = connect(connection).await?;
    let response = client
        .retire_master_keys(RetireMasterKeysRequest {})
        .await
        .map_err(refused)?
        .into_inner();
    if response.retired_key_check_values.is_empty() {
        println!("no master key was retiring");
    } else {
        println!(
            "retired master keys: {}",
            response.retired_key_check_values.join(", ")
        );
    }
    Ok(())
}

/// Checks the share destination before the vault creates a key whose shares could not be
/// saved (created with mode 0700, holding none of the files about to be written), then
/// connects.
async fn ceremony(
    connection: &VaultConnection,
    split: &ShareSplit,
) -> Result<VaultClient<Channel>, AdminError> {
    let (shares, out_dir) = (split.shares, split.out_dir.as_path());
    if !(2..=shares).contains(&split.threshold) || shares > 255 {
        return Err(AdminError::Usage(
            "--threshold must be at least 2 and at most --shares, --shares at most 255".into(),
        ));
    }
    fs::create_dir_all(out_dir).map_err(io(out_dir))?;
    fs::set_permissions(out_dir, fs::Permissions::from_mode(0o700)).map_err(io(out_dir))?;
    for index in 1..=shares {
        let path = share_path(out_dir, index, shares);
        if path.exists() {
            return Err(AdminError::Usage(format!(
                "{} already exists; give an empty --out-dir",
                path.display()
            )));
        }
    }
    connect(connection).await
}

/// Writes each share to its own new file (mode 0600) and prints where, and the key check value.
fn write_shares(split: &ShareSplit, shares: &[String], threshold: u32, kcv: &str) -> Result<(), AdminError> {
    let count = u32::try_from(shares.len()).unwrap_or(u32::MAX);
    for (index, share) in (1..).zip(shares) {
        let path = share_path(&split.out_dir, index, count);
        let mut text = Zeroizing::new(String::with_capacity(512));
        text.push_str(&format!(
            "# Tessera master key share {index} of {count}: any {threshold} shares unseal the vault.\n\
             # Key check value: {kcv} (the vault reports the same value once unsealed).\n\
             # For ONE custodian. Keep it offline; never send it by e-mail or chat.\n\
             # Unseal with: tessera vault unseal --share-file <this file>\n",
        ));
        text.push_str(share);
        text.push('\n');
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .map_err(io(&path))?;
        file.write_all(text.as_bytes())
            .and_then(|()| file.sync_all())
            .map_err(io(&path))?;
        println!("share {index} of {count}: {}", path.display());
    }
    println!("key check value: {kcv}");
    Ok(())
}

/// Reads the share line out of a share file into zeroizing memory.
fn read_share(path: &Path) -> Result<Zeroizing<String>, AdminError> {
    let text = Zeroizing::new(fs::read_to_string(path).map_err(io(path))?);
    let line = text
        .lines()
        .map(str::trim)
        .find(|line| line.starts_with(SHARE_PREFIX))
        .ok_or_else(|| AdminError::Usage(format!("{} holds no {SHARE_PREFIX} line", path.display())))?;
    Ok(Zeroizing::new(line.to_owned()))
}

/// `tessera vault unseal`: submits one custodian's share.
pub async fn unseal(connection: &VaultConnection, share_file: &Path) -> Result<(), AdminError> {
    let share = read_share(share_file)?;
    let share_kcv = share
        .split_ascii_whitespace()
        .nth(1)
        .unwrap_or_default()
        .to_owned();
    let mut client = connect(connection).await?;
    let response = client
        .unseal(UnsealRequest {
            share: share.as_str().to_owned(),
        })
        .await
        .map_err(refused)?
        .into_inner();
    if response.sealed {
        println!(
            "share accepted: {} of {} shares; the vault is still SEALED",
            response.progress, response.threshold
        );
    } else {
        println!("share accepted: the vault is UNSEALED");
        println!("key check value: {}", response.key_check_value);
        if response.key_check_value != share_kcv {
            eprintln!("WARNING: the vault's key check value differs from the one in the share file");
        }
    }
    Ok(())
}

/// `tessera vault seal`: wipes the vault's keys from memory.
pub async fn seal(connection: &VaultConnection) -> Result<(), AdminError> {
    let mut client = connect(connection).await?;
    client.seal(SealRequest {}).await.map_err(refused)?;
    println!("the vault is SEALED: its keys are wiped until custodians unseal it again");
    Ok(())
}

/// `tessera vault status`: prints the vault's key, seal, audit and hardening state.
pub async fn status(connection: &VaultConnection) -> Result<(), AdminError> {
    let mut client = connect(connection).await?;
    let status = client
        .status(StatusRequest {})
        .await
        .map_err(refused)?
        .into_inner();
    print!("{}", render_status(&status));
    Ok(())
}

fn render_status(status: &StatusResponse) -> String {
    let mut out = String::new();
    let mut line = |key: &str, value: &dyn fmt::Display| out.push_str(&format!("{key}: {value}\n"));
    line("sealed", &status.sealed);
    line("initialized", &status.initialized);
    if status.unseal_threshold > 0 {
        line(
            "unseal progress",
            &format!(
                "{} of {} (of {} shares)",
                status.unseal_progress, status.unseal_threshold, status.unseal_shares
            ),
        );
    }
    line("master key source", &status.master_key_source);
    line("key check value", &status.master_key_check_value);
    if !status.retiring_key_check_values.is_empty() {
        line(
            "retiring key check values",
            &status.retiring_key_check_values.join(", "),
        );
    }
    line("mode", &status.mode);
    line("audit state", &status.audit_state);
    if !status.audit_error.is_empty() {
        line("audit error", &status.audit_error);
    }
    if !status.audit_path.is_empty() {
        line("audit path", &status.audit_path);
        line("audit lines", &status.audit_lines);
        line("audit head", &status.audit_head);
        line("audit unsigned", &status.audit_unsigned);
    }
    line("audit public key", &status.audit_public_key);
    line("cached keys", &status.cached_keys);
    line("held cvcs", &status.held_cvcs);
    line("core dumps disabled", &status.core_dumps_disabled);
    line("ptrace attach blocked", &status.ptrace_attach_blocked);
    line("memory locked", &status.memory_locked);
    line("debug build", &status.debug_build);
    line("version", &status.version);
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn share_lines_are_found_among_comments() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("share.txt");
        fs::write(&path, "# comment\n  tessera-share-v1 abcd 2 00ff  \n").unwrap();
        assert_eq!(
            read_share(&path).unwrap().as_str(),
            "tessera-share-v1 abcd 2 00ff"
        );
        fs::write(&path, "nothing here\n").unwrap();
        assert!(matches!(read_share(&path), Err(AdminError::Usage(_))));
    }

    #[test]
    fn status_shows_seal_and_audit_state() {
        let text = render_status(&StatusResponse {
            sealed: true,
            unseal_progress: 1,
            unseal_threshold: 3,
            unseal_shares: 5,
            audit_state: "ok".into(),
            audit_path: "a.log".into(),
            ..StatusResponse::default()
        });
        assert!(text.contains("sealed: true\n"), "{text}");
        assert!(text.contains("unseal progress: 1 of 3 (of 5 shares)\n"), "{text}");
        assert!(text.contains("audit state: ok\n"), "{text}");
    }
}
