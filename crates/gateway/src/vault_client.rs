//! The gateway's side of the vault hop: mutual TLS to every configured vault, with calls
//! spread over all of them.

use std::time::Duration;

use tessera_api::error_details::decode_error_info;
use tessera_api::vault::vault_client::VaultClient as GeneratedClient;
use tessera_api::vault::{
    protect_result, reveal_result, CreateKeysRequest, ItemError, ProtectItem, ProtectRequest, Protected,
    RevealItem, RevealRequest, Revealed, WrappedKey,
};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic::Code;

use crate::config::VaultConnection;
use crate::error::ApiError;

/// A handle on the vaults; cheap to clone.
#[derive(Debug, Clone)]
pub struct VaultClient {
    inner: GeneratedClient<Channel>,
}

impl VaultClient {
    /// Prepares connections to every configured vault. Connections are made lazily, so the
    /// gateway starts (and answers UNAVAILABLE) while a vault is down.
    pub fn connect(config: &VaultConnection) -> Result<Self, String> {
        let read = |path: &std::path::Path| {
            std::fs::read(path).map_err(|err| format!("cannot read {}: {err}", path.display()))
        };
        let tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(read(&config.ca)?))
            .identity(Identity::from_pem(
                read(&config.client_cert)?,
                read(&config.client_key)?,
            ))
            .domain_name(config.server_name.clone());
        let endpoints = config
            .endpoints
            .iter()
            .map(|url| {
                Endpoint::from_shared(url.clone())
                    .and_then(|endpoint| endpoint.tls_config(tls.clone()))
                    .map(|endpoint| {
                        endpoint
                            .connect_timeout(Duration::from_secs(2))
                            .timeout(Duration::from_secs(10))
                            .tcp_nodelay(true)
                            .http2_keep_alive_interval(Duration::from_secs(20))
                    })
                    .map_err(|err| format!("bad vault endpoint {url}: {err}"))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let channel = Channel::balance_list(endpoints.into_iter());
        Ok(Self {
            inner: GeneratedClient::new(channel),
        })
    }

    /// Creates a merchant's first data and fingerprint keys, returned wrapped.
    pub async fn create_keys(
        &self,
        merchant_id: &str,
        version: u32,
    ) -> Result<(WrappedKey, WrappedKey), ApiError> {
        let response = self
            .inner
            .clone()
            .create_keys(CreateKeysRequest {
                merchant_id: merchant_id.to_owned(),
                data_key_version: version,
                fingerprint_key_version: version,
            })
            .await
            .map_err(vault_call_error)?
            .into_inner();
        match (response.data_key, response.fingerprint_key) {
            (Some(data), Some(fingerprint)) => Ok((data, fingerprint)),
            _ => Err(ApiError::internal("VAULT_ERROR", "the vault returned no keys")),
        }
    }

    /// Protects one item.
    pub async fn protect(&self, keys: Vec<WrappedKey>, item: ProtectItem) -> Result<Protected, ApiError> {
        self.protect_batch(keys, vec![item])
            .await?
            .pop()
            .unwrap_or_else(|| Err(ApiError::internal("VAULT_ERROR", "the vault returned no result")))
    }

    /// Protects many items in one round trip; each item succeeds or fails on its own.
    pub async fn protect_batch(
        &self,
        keys: Vec<WrappedKey>,
        items: Vec<ProtectItem>,
    ) -> Result<Vec<Result<Protected, ApiError>>, ApiError> {
        let expected = items.len();
        let response = self
            .inner
            .clone()
            .protect(ProtectRequest { keys, items })
            .await
            .map_err(vault_call_error)?
            .into_inner();
        if response.results.len() != expected {
            return Err(ApiError::internal(
                "VAULT_ERROR",
                "the vault answered a different number of items",
            ));
        }
        Ok(response
            .results
            .into_iter()
            .map(|result| match result.result {
                Some(protect_result::Result::Protected(protected)) => Ok(protected),
                Some(protect_result::Result::Error(error)) => Err(item_error(error)),
                None => Err(ApiError::internal("VAULT_ERROR", "the vault returned no result")),
            })
            .collect())
    }

    /// Sends `payload` to the vault's no-op `Echo` and returns what came back: the vault hop
    /// of the benchmark floor (crate::floor). The status is passed on as it is because the
    /// floor measures the hop, not the gateway's error mapping.
    pub async fn echo(&self, payload: Vec<u8>) -> Result<Vec<u8>, tonic::Status> {
        let response = self
            .inner
            .clone()
            .echo(tessera_api::vault::EchoRequest { payload })
            .await?;
        Ok(response.into_inner().payload)
    }

    /// Reveals one record's card data.
    pub async fn reveal(&self, keys: Vec<WrappedKey>, item: RevealItem) -> Result<Revealed, ApiError> {
        let response = self
            .inner
            .clone()
            .reveal(RevealRequest {
                keys,
                items: vec![item],
            })
            .await
            .map_err(vault_call_error)?
            .into_inner();
        match response
            .results
            .into_iter()
            .next()
            .and_then(|mut r| r.result.take())
        {
            Some(reveal_result::Result::Revealed(revealed)) => Ok(revealed),
            Some(reveal_result::Result::Error(error)) => Err(item_error(error)),
            None => Err(ApiError::internal("VAULT_ERROR", "the vault returned no result")),
        }
    }
}

/// Maps a per-item vault error to the public error it stands for.
fn item_error(error: ItemError) -> ApiError {
    let code = Code::from_i32(error.code);
    let code = if code == Code::Ok { Code::Internal } else { code };
    let mut api = ApiError::new(code, error.reason, error.message);
    api.field = match error.field.as_str() {
        "card.number" => Some("card.number"),
        "card.expiry_month" => Some("card.expiry_month"),
        "card.expiry_year" => Some("card.expiry_year"),
        "card.holder_name" => Some("card.holder_name"),
        "card" => Some("card"),
        "cvc" => Some("cvc"),
        "cvc_token" => Some("cvc_token"),
        "bank_account.iban" => Some("bank_account.iban"),
        "bank_account.bic" => Some("bank_account.bic"),
        "bank_account.holder_name" => Some("bank_account.holder_name"),
        "contact" => Some("contact"),
        "data" => Some("data"),
        _ => None,
    };
    api
}

/// Maps a failed vault call to the public error: callers see that the vault is unavailable,
/// never the vault's internals.
fn vault_call_error(status: tonic::Status) -> ApiError {
    let reason = decode_error_info(status.details()).map(|info| info.reason);
    tracing::warn!(code = ?status.code(), reason = ?reason, "vault call failed");
    match status.code() {
        Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled | Code::Unknown => {
            let reason = if reason.as_deref() == Some("VAULT_SEALED") {
                "VAULT_SEALED"
            } else {
                "VAULT_UNAVAILABLE"
            };
            ApiError::unavailable(reason, "the vault is unavailable; retry later")
        }
        _ => ApiError::internal("VAULT_ERROR", "the vault refused the request"),
    }
}
