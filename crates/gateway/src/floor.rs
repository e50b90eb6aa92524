//! The benchmark floor, `tessera.bench.v1.Floor`: the cheapest possible use of the same
//! processes and mutual-TLS hops as the public API. `Relay` sends its payload to the vault's
//! no-op `Echo` and answers with what comes back, so `tessera bench` can print Tessera's
//! throughput and latency as a ratio to a naive two-hop relay measured in the same run.
//!
//! Served only when the configuration sets `benchmark_floor = true`: it is a measuring
//! instrument, not part of the API, and it deliberately skips caller policy (mutual TLS still
//! admits only certificates from the configured client CA).

use tessera_api::bench::floor_server::{Floor, FloorServer};
use tessera_api::bench::{RelayRequest, RelayResponse};
use tonic::{Request, Response, Status};

use crate::config::GatewayConfig;
use crate::vault_client::VaultClient;

/// Largest payload relayed; the benchmark sends about as much as a tokenize request.
const MAX_RELAY_BYTES: usize = 64 * 1024;

/// Relays each call to the vault, one call per call.
#[derive(Debug, Clone)]
pub struct FloorService {
    vault: VaultClient,
}

impl FloorService {
    /// The floor service when `config` enables it, else `None`.
    ///
    /// It has its own vault connection rather than sharing the API's: whatever the API's vault
    /// client does to go faster (batching, coalescing), the floor stays a naive relay.
    pub fn from_config(config: &GatewayConfig) -> Result<Option<FloorServer<Self>>, String> {
        if !config.benchmark_floor {
            return Ok(None);
        }
        tracing::warn!("benchmark floor enabled: serving tessera.bench.v1.Floor (benchmarking only)");
        let service = Self {
            vault: VaultClient::connect(&config.vault)?,
        };
        Ok(Some(
            FloorServer::new(service).max_decoding_message_size(MAX_RELAY_BYTES),
        ))
    }
}

#[tonic::async_trait]
impl Floor for FloorService {
    async fn relay(&self, request: Request<RelayRequest>) -> Result<Response<RelayResponse>, Status> {
        let payload = self.vault.echo(request.into_inner().payload).await?;
        Ok(Response::new(RelayResponse { payload }))
    }
}
