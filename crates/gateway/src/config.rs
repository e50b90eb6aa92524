//! The gateway's configuration file (TOML), read in one place.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::policy::CallerPolicy;

/// Everything the gateway needs to start.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GatewayConfig {
    /// Address of the public mutual-TLS gRPC listener.
    pub listen: SocketAddr,
    /// `production` refuses every switch that exists for tests and benchmarks (and a debug
    /// build, checked by the binary); `development` is the default.
    #[serde(default)]
    pub mode: Mode,
    /// An SQLite file path (the embedded default) or a `postgres://` URL.
    pub database: String,
    pub tls: ServerTls,
    pub vault: VaultConnection,
    /// Who may call, for which merchants, and what they may do.
    #[serde(default)]
    pub callers: Vec<CallerPolicy>,
    /// Bounds on the public API's work in flight.
    #[serde(default)]
    pub limits: Limits,
    /// Serves `tessera.bench.v1.Floor`, which relays each call to the vault's no-op `Echo`:
    /// the floor `tessera bench` measures against. Off unless benchmarking.
    #[serde(default)]
    pub benchmark_floor: bool,
    /// Token lifecycle timing.
    #[serde(default)]
    pub lifecycle: Lifecycle,
    /// Limits on retrying declined cards (the schemes' rules by default).
    #[serde(default)]
    pub retry_guard: crate::retry_guard::RetryGuardConfig,
    /// Hooks for end-to-end tests; never set in production.
    #[serde(default)]
    pub testing: Testing,
}

/// What the deployment is for; production refuses test and benchmark switches.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    #[default]
    Development,
    Production,
}

/// Token lifecycle timing.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Lifecycle {
    /// A provisional token not confirmed within this many seconds is discarded.
    pub provisional_ttl_secs: u64,
    /// How often the sweeper looks for tokens to expire.
    pub sweep_interval_secs: u64,
    /// Most tokens one sweep statement ends, so a sweep never holds the database for long.
    pub sweep_batch: u32,
}

impl Default for Lifecycle {
    fn default() -> Self {
        Self {
            provisional_ttl_secs: 3600,
            sweep_interval_secs: 60,
            sweep_batch: 500,
        }
    }
}

/// Hooks for end-to-end tests.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Testing {
    /// A file holding a clock offset in milliseconds, re-read continuously: tests move the
    /// gateway's time forward to check 24-hour and 14-month rules without waiting.
    pub clock_offset_file: Option<PathBuf>,
}

/// The public listener's certificate and the CA its callers' certificates must chain to.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerTls {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Client certificates are required and must chain to this CA.
    pub client_ca: PathBuf,
}

/// How to reach the vaults over mutual TLS.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VaultConnection {
    /// `https://host:port` of each vault (all with the same master key); calls are batched and
    /// spread over those in rotation (crate::vault_client).
    pub endpoints: Vec<String>,
    /// The DNS name the vault's certificate carries.
    pub server_name: String,
    /// CA the vault's server certificate must chain to.
    pub ca: PathBuf,
    /// The gateway's client certificate and key for this hop.
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
}

/// Work bounds of the public API.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Requests processed at once; more wait in the queue below.
    pub concurrency: usize,
    /// Seconds after which a request fails with DEADLINE_EXCEEDED.
    pub request_timeout_secs: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            concurrency: 1024,
            request_timeout_secs: 30,
        }
    }
}

/// A configuration file that could not be used.
#[derive(Debug)]
#[non_exhaustive]
pub enum ConfigError {
    /// The file could not be read.
    Read { path: PathBuf, cause: std::io::Error },
    /// The file is not valid TOML for this configuration.
    Parse { path: PathBuf, cause: String },
    /// A value is present but unusable.
    Invalid(String),
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Read { path, cause } => write!(f, "cannot read {}: {cause}", path.display()),
            Self::Parse { path, cause } => write!(f, "invalid configuration {}: {cause}", path.display()),
            Self::Invalid(why) => write!(f, "invalid configuration: {why}"),
        }
    }
}

impl std::error::Error for ConfigError {}

impl GatewayConfig {
    /// Reads and checks a configuration file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|cause| ConfigError::Read {
            path: path.to_owned(),
            cause,
        })?;
        Self::parse(&text).map_err(|err| match err {
            ConfigError::Parse { cause, .. } => ConfigError::Parse {
                path: path.to_owned(),
                cause,
            },
            other => other,
        })
    }

    /// Parses and checks configuration text; separate from [`Self::load`] so tests need no files.
    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        let config: Self = toml::from_str(text).map_err(|err| ConfigError::Parse {
            path: PathBuf::new(),
            cause: err.to_string(),
        })?;
        if config.vault.endpoints.is_empty() {
            return Err(ConfigError::Invalid(
                "[vault] endpoints must name at least one vault".into(),
            ));
        }
        if let Some(bad) = config.vault.endpoints.iter().find(|e| !e.starts_with("https://")) {
            return Err(ConfigError::Invalid(format!(
                "vault endpoint {bad} must be https:// (the vault speaks only mutual TLS)"
            )));
        }
        let lifecycle = &config.lifecycle;
        if lifecycle.provisional_ttl_secs == 0
            || lifecycle.sweep_interval_secs == 0
            || lifecycle.sweep_batch == 0
        {
            return Err(ConfigError::Invalid("[lifecycle] values must be positive".into()));
        }
        if config.limits.concurrency == 0 || config.limits.request_timeout_secs == 0 {
            return Err(ConfigError::Invalid("[limits] values must be positive".into()));
        }
        for caller in &config.callers {
            caller.check().map_err(ConfigError::Invalid)?;
        }
        if config.mode == Mode::Production {
            // A moved clock breaks every retention and retry-guard rule, and the floor is an
            // unauthenticated relay to the vault: neither may be reachable in production.
            if config.testing.clock_offset_file.is_some() {
                return Err(ConfigError::Invalid(
                    "[testing] clock_offset_file is for tests and is refused in production mode".into(),
                ));
            }
            if config.benchmark_floor {
                return Err(ConfigError::Invalid(
                    "benchmark_floor is for benchmarks and is refused in production mode".into(),
                ));
            }
        }
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const EXAMPLE: &str = r#"
        listen = "127.0.0.1:8443"
        database = "/tmp/tessera.db"
        [tls]
        cert = "certs/gateway.pem"
        key = "certs/gateway-key.pem"
        client_ca = "certs/ca.pem"
        [vault]
        endpoints = ["https://127.0.0.1:7443"]
        server_name = "tessera-vault"
        ca = "certs/ca.pem"
        client_cert = "certs/gateway-client.pem"
        client_key = "certs/gateway-client-key.pem"
        [[callers]]
        identity = "spiffe://tessera/dev-client"
        merchants = ["*"]
        operations = ["tokenize", "read_metadata", "detokenize", "delete"]
    "#;

    #[test]
    fn example_parses() {
        let config = GatewayConfig::parse(EXAMPLE).unwrap();
        assert_eq!(config.callers.len(), 1);
        assert_eq!(config.limits.concurrency, 1024);
    }

    #[test]
    fn plaintext_vault_endpoint_is_refused() {
        let text = EXAMPLE.replace("https://127.0.0.1:7443", "http://127.0.0.1:7443");
        assert!(matches!(
            GatewayConfig::parse(&text),
            Err(ConfigError::Invalid(_))
        ));
    }

    #[test]
    fn production_refuses_the_test_clock_and_the_benchmark_floor() {
        let production = EXAMPLE.replace("database =", "mode = \"production\"\n        database =");
        assert_eq!(GatewayConfig::parse(&production).unwrap().mode, Mode::Production);
        let floor = production.replace("database =", "benchmark_floor = true\n        database =");
        assert!(
            matches!(GatewayConfig::parse(&floor), Err(ConfigError::Invalid(why)) if why.contains("benchmark_floor"))
        );
        let clock = format!("{production}\n        [testing]\n        clock_offset_file = \"/tmp/offset\"\n");
        assert!(
            matches!(GatewayConfig::parse(&clock), Err(ConfigError::Invalid(why)) if why.contains("clock_offset_file"))
        );
        // The same switches are accepted in development, where tests and benchmarks run.
        let development = floor.replace("mode = \"production\"", "mode = \"development\"");
        assert!(GatewayConfig::parse(&development).unwrap().benchmark_floor);
    }

    #[test]
    fn unknown_operation_is_refused() {
        let text = EXAMPLE.replace("\"delete\"", "\"everything\"");
        assert!(GatewayConfig::parse(&text).is_err());
    }
}
