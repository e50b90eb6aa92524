//! The vault's TLS configuration: rustls on ring, TLS 1.2+ with safe defaults, a client
//! certificate required on every connection and verified against one configured CA.

use std::sync::Arc;

use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use tessera_api::pem::{load_certs, load_private_key};

use crate::config::ServerTls;

/// Builds the listener's TLS configuration. There is no variant without client
/// authentication: `WebPkiClientVerifier` rejects a handshake that presents no certificate.
pub fn server_config(tls: &ServerTls) -> Result<Arc<ServerConfig>, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = RootCertStore::empty();
    for ca in load_certs(&tls.client_ca).map_err(|err| err.to_string())? {
        roots
            .add(ca)
            .map_err(|err| format!("client CA {}: {err}", tls.client_ca.display()))?;
    }
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), Arc::clone(&provider))
        .build()
        .map_err(|err| format!("client certificate verifier: {err}"))?;
    let certs = load_certs(&tls.cert).map_err(|err| err.to_string())?;
    let key = load_private_key(&tls.key).map_err(|err| err.to_string())?;
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|err| format!("TLS versions: {err}"))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs, key)
        .map_err(|err| format!("vault certificate {}: {err}", tls.cert.display()))?;
    // gRPC runs over HTTP/2 only.
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}
