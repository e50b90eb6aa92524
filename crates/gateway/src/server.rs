//! Assembles and runs the gateway: `serve(config, listener, shutdown)` is what `main` and the
//! tests call.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tessera_api::limits::{MAX_IMPORT_MESSAGE_BYTES, MAX_REQUEST_BYTES};
use tessera_api::v1::key_admin_server::KeyAdminServer;
use tessera_api::v1::tokenization_server::TokenizationServer;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::transport::{Certificate, Identity, Server, ServerTlsConfig};

use crate::admin::KeyAdminService;
use crate::clock::Clock;
use crate::config::GatewayConfig;
use crate::floor::FloorService;
use crate::keyring::KeyRing;
use crate::policy::Policy;
use crate::reencrypt;
use crate::service::TokenizationService;
use crate::state::Gateway;
use crate::storage::Store;
use crate::sweeper;
use crate::transport_errors::TransportErrorsLayer;
use crate::vault_client::VaultClient;

/// Builds the shared gateway state: opens and migrates the store, prepares the vault hop.
pub async fn build(config: &GatewayConfig, clock: Clock) -> Result<Arc<Gateway>, String> {
    let store = Store::open(&config.database)
        .await
        .map_err(|err| err.to_string())?;
    let vault = VaultClient::connect(&config.vault)?;
    Ok(Arc::new(Gateway {
        policy: Policy::new(&config.callers),
        store,
        vault,
        keys: KeyRing::default(),
        clock,
        lifecycle: config.lifecycle.clone(),
        retry_guard: config.retry_guard.clone(),
    }))
}

fn tls(config: &GatewayConfig) -> Result<ServerTlsConfig, String> {
    let read = |path: &std::path::Path| {
        std::fs::read(path).map_err(|err| format!("cannot read {}: {err}", path.display()))
    };
    // A client CA makes tonic require and verify a client certificate on every connection;
    // without one tonic would silently accept anonymous callers, so it is not optional here.
    Ok(ServerTlsConfig::new()
        .identity(Identity::from_pem(
            read(&config.tls.cert)?,
            read(&config.tls.key)?,
        ))
        .client_ca_root(Certificate::from_pem(read(&config.tls.client_ca)?)))
}

/// Serves the public API on `listener` until `shutdown` completes.
pub async fn serve(
    config: GatewayConfig,
    gateway: Arc<Gateway>,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), String> {
    tokio::spawn(sweeper::run(
        Arc::downgrade(&gateway),
        Duration::from_secs(config.lifecycle.sweep_interval_secs),
        sweeper::holder_name(config.listen),
    ));
    // Key rotation's re-encryption job, coordinated through its own lease like the sweeper.
    tokio::spawn(reencrypt::run(
        Arc::downgrade(&gateway),
        sweeper::holder_name(config.listen),
        reencrypt::grace(Duration::from_secs(config.limits.request_timeout_secs)),
    ));
    let key_admin = KeyAdminServer::new(KeyAdminService(Arc::clone(&gateway)))
        .max_decoding_message_size(MAX_REQUEST_BYTES);
    // tonic sets one decoding limit per service: the largest message any of its methods takes
    // (an import chunk). Unary requests are held to MAX_REQUEST_BYTES by the handlers.
    let tokenization = TokenizationServer::new(TokenizationService(gateway))
        .max_decoding_message_size(MAX_IMPORT_MESSAGE_BYTES);
    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_serving::<TokenizationServer<TokenizationService>>()
        .await;
    let reflection = |builder: tonic_reflection::server::Builder<'static>| {
        builder
            .register_encoded_file_descriptor_set(tessera_api::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .with_service_name("tessera.v1.Tokenization")
            .with_service_name("tessera.v1.KeyAdmin")
            .with_service_name("grpc.health.v1.Health")
    };
    let reflection_v1 = reflection(tonic_reflection::server::Builder::configure())
        .build_v1()
        .map_err(|err| format!("reflection: {err}"))?;
    let reflection_v1alpha = reflection(tonic_reflection::server::Builder::configure())
        .build_v1alpha()
        .map_err(|err| format!("reflection: {err}"))?;

    tracing::info!(addr = %config.listen, "gateway listening (mutual TLS)");
    Server::builder()
        .tls_config(tls(&config)?)
        .map_err(|err| format!("TLS configuration: {err}"))?
        // Outermost: bound the work in flight so overload queues at the edge instead of
        // piling up in the store and the vault hop.
        .concurrency_limit_per_connection(config.limits.concurrency)
        // Inside the limit, around every service: a request that cannot finish in time fails
        // instead of holding a slot, and the refusals tonic makes itself (too large, not a
        // message of the method, no such method) get an ErrorInfo like every other error.
        .layer(TransportErrorsLayer {
            timeout: Duration::from_secs(config.limits.request_timeout_secs),
        })
        .tcp_nodelay(true)
        .add_service(tokenization)
        .add_service(key_admin)
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        // Only with `benchmark_floor = true`: the no-op relay `tessera bench` compares against.
        .add_optional_service(FloorService::from_config(&config)?)
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), shutdown)
        .await
        .map_err(|err| format!("gateway server failed: {err}"))
}
