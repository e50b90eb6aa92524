//! The vault's configuration file (TOML), read in one place.

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// Everything the vault needs to start. There is deliberately no way to turn TLS or client
/// authentication off: a configuration without them does not parse.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VaultConfig {
    /// Address of the mutual-TLS listener.
    pub listen: SocketAddr,
    #[serde(default)]
    pub mode: Mode,
    pub tls: ServerTls,
    /// The only identities served; every other certificate is refused.
    pub clients: Vec<ClientGrant>,
    pub master_key: MasterKeyConfig,
    /// How many unwrapped merchant keys stay cached (each holds 32 secret bytes).
    #[serde(default = "default_key_cache_capacity")]
    pub key_cache_capacity: usize,
    /// Seconds a CVC is held in memory before it is wiped unused.
    #[serde(default = "default_cvc_ttl_secs")]
    pub cvc_ttl_secs: u64,
    /// Most CVCs held at once; beyond it new ones are refused.
    #[serde(default = "default_cvc_capacity")]
    pub cvc_capacity: usize,
    /// The tamper-evident audit log; required in production mode.
    #[serde(default)]
    pub audit: Option<AuditConfig>,
}

/// Where and how the vault writes its audit log (see `audit.rs`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditConfig {
    /// The append-only log file; created on first start.
    pub path: PathBuf,
    /// A block is sealed (signed) after this many lines at the latest.
    #[serde(default = "default_block_lines")]
    pub block_lines: u64,
    /// ... or after this many milliseconds, when the log is also flushed to disk (fsync).
    #[serde(default = "default_seal_interval_ms")]
    pub seal_interval_ms: u64,
    /// Flush to disk (fsync) before answering every batch instead of once per interval:
    /// nothing acknowledged is lost on power failure, at the cost of one disk flush per call.
    #[serde(default)]
    pub sync_every_batch: bool,
}

fn default_block_lines() -> u64 {
    1000
}

fn default_seal_interval_ms() -> u64 {
    1000
}

fn default_key_cache_capacity() -> usize {
    10_000
}

fn default_cvc_ttl_secs() -> u64 {
    3600
}

fn default_cvc_capacity() -> usize {
    100_000
}

/// Development allows the development key file; production refuses it and debug builds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    #[default]
    Development,
    Production,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Development => "development",
            Self::Production => "production",
        }
    }
}

/// The listener's certificate and the CA every client certificate must chain to.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerTls {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_ca: PathBuf,
}

/// What an allowed identity may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// The gateway: create keys, protect and reveal card data.
    Gateway,
    /// An operator: status, and init, unseal and seal of a sealed vault.
    Operator,
}

/// One allowed client identity (the URI SAN of its certificate) and its role.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientGrant {
    pub identity: String,
    pub role: Role,
}

/// Where the master key comes from.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "source", rename_all = "kebab-case", deny_unknown_fields)]
pub enum MasterKeyConfig {
    /// A key file for development only; created on first start when allowed.
    DevelopmentFile {
        path: PathBuf,
        #[serde(default)]
        create_if_missing: bool,
        /// Master keys being retired (KEK rotation): key files the vault can still unwrap
        /// with, never wrap with, until `tessera keys rewrap-all` has re-wrapped every key.
        #[serde(default)]
        previous_paths: Vec<PathBuf>,
    },
    /// Sealed start: the master key is created by `tessera vault init`, split into key shares,
    /// and rebuilt in memory only when `threshold` custodians submit theirs after each start.
    Sealed {
        /// Public state written by Init: check values, share count and threshold. Never a key.
        state_file: PathBuf,
        /// Refuse a second share from the same operator identity (dual control enforced by
        /// certificates, not only by procedure).
        #[serde(default)]
        distinct_custodians: bool,
    },
}

/// A configuration that cannot be used.
#[derive(Debug)]
#[non_exhaustive]
pub enum ConfigError {
    /// The file could not be read.
    Read { path: PathBuf, cause: std::io::Error },
    /// The text is not a valid configuration.
    Parse(String),
    /// A value is present but unusable.
    Invalid(String),
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Read { path, cause } => write!(f, "cannot read {}: {cause}", path.display()),
            Self::Parse(why) => write!(f, "invalid vault configuration: {why}"),
            Self::Invalid(why) => write!(f, "invalid vault configuration: {why}"),
        }
    }
}

impl std::error::Error for ConfigError {}

impl VaultConfig {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|cause| ConfigError::Read {
            path: path.to_owned(),
            cause,
        })?;
        Self::parse(&text)
    }

    /// Parses and checks configuration text.
    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        let config: Self = toml::from_str(text).map_err(|err| ConfigError::Parse(err.to_string()))?;
        if config.clients.is_empty() {
            return Err(ConfigError::Invalid(
                "[[clients]] must allow at least one identity".into(),
            ));
        }
        if config.key_cache_capacity == 0 || config.cvc_capacity == 0 {
            return Err(ConfigError::Invalid(
                "key_cache_capacity and cvc_capacity must be positive".into(),
            ));
        }
        if !(1..=86_400).contains(&config.cvc_ttl_secs) {
            return Err(ConfigError::Invalid("cvc_ttl_secs must be 1 to 86400".into()));
        }
        if let Some(audit) = &config.audit {
            if audit.block_lines == 0 || !(10..=60_000).contains(&audit.seal_interval_ms) {
                return Err(ConfigError::Invalid(
                    "[audit] block_lines must be positive and seal_interval_ms 10 to 60000".into(),
                ));
            }
        }
        Ok(config)
    }

    /// What production mode requires beyond a valid file: an audit log. (Checked after the
    /// refusal of debug builds, so that one is reported first.)
    pub fn check_production(&self) -> Result<(), ConfigError> {
        if self.mode == Mode::Production && self.audit.is_none() {
            return Err(ConfigError::Invalid(
                "production mode requires an [audit] log (path = ...)".into(),
            ));
        }
        Ok(())
    }

    /// The allow-list by identity.
    pub fn roles(&self) -> HashMap<String, Role> {
        self.clients
            .iter()
            .map(|grant| (grant.identity.clone(), grant.role))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = r#"
        listen = "127.0.0.1:7443"
        mode = "development"
        [tls]
        cert = "certs/vault.pem"
        key = "certs/vault-key.pem"
        client_ca = "certs/ca.pem"
        [[clients]]
        identity = "spiffe://tessera/gateway"
        role = "gateway"
        [master_key]
        source = "development-file"
        path = ".tessera/dev-master-key"
        create_if_missing = true
    "#;

    #[test]
    fn example_parses() {
        let config = VaultConfig::parse(EXAMPLE).map_err(|e| e.to_string());
        assert!(config.is_ok(), "{config:?}");
    }

    #[test]
    fn tls_is_not_optional() {
        let without_tls = EXAMPLE
            .lines()
            .filter(|line| !line.contains("[tls]") && !line.contains("certs/"))
            .collect::<Vec<_>>()
            .join("\n");
        assert!(matches!(
            VaultConfig::parse(&without_tls),
            Err(ConfigError::Parse(_))
        ));
        let without_ca = EXAMPLE.replace("client_ca = \"certs/ca.pem\"", "");
        assert!(matches!(
            VaultConfig::parse(&without_ca),
            Err(ConfigError::Parse(_))
        ));
    }

    #[test]
    fn sealed_start_and_audit_parse() {
        let text = EXAMPLE
            .replace("source = \"development-file\"", "source = \"sealed\"")
            .replace("path = \".tessera/dev-master-key\"", "state_file = \"seal.toml\"")
            .replace("create_if_missing = true", "distinct_custodians = true")
            + "[audit]\npath = \"audit.log\"\n";
        let config = VaultConfig::parse(&text).map_err(|e| e.to_string());
        assert!(
            matches!(
                &config,
                Ok(VaultConfig {
                    master_key: MasterKeyConfig::Sealed {
                        distinct_custodians: true,
                        ..
                    },
                    audit: Some(AuditConfig {
                        block_lines: 1000,
                        ..
                    }),
                    ..
                })
            ),
            "{config:?}"
        );
    }

    #[test]
    fn production_requires_an_audit_log() {
        let text = EXAMPLE.replace("mode = \"development\"", "mode = \"production\"");
        let without = VaultConfig::parse(&text).map_err(|e| e.to_string());
        assert!(matches!(
            without.map(|c| c.check_production()),
            Ok(Err(ConfigError::Invalid(_)))
        ));
        let with_audit = VaultConfig::parse(&(text + "[audit]\npath = \"audit.log\"\n"));
        assert!(matches!(with_audit.map(|c| c.check_production()), Ok(Ok(()))));
    }

    #[test]
    fn clients_are_required() {
        let text = EXAMPLE
            .replace("[[clients]]", "")
            .replace("identity = \"spiffe://tessera/gateway\"", "");
        assert!(VaultConfig::parse(&text.replace("role = \"gateway\"", "")).is_err());
    }
}
