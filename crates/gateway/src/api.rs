//! The public `tessera.v1.Tokenization` service: authenticate, authorise, validate, then call
//! the vault and the store. Handlers log token ids and merchants, never card data.

use std::sync::Arc;

use tessera_api::identity::peer_identity;
use tessera_api::v1::tokenization_server::Tokenization;
use tessera_api::v1::{
    Card, CardBrand, DeleteTokenRequest, DeleteTokenResponse, DetokenizeRequest, DetokenizeResponse,
    GetTokenRequest, Token, TokenFormat, TokenStatus, TokenizeRequest, TokenizeResponse,
};
use tessera_api::vault::{self, ProtectItem, RevealItem};
use tonic::{Request, Response, Status};

use crate::clock::{Clock, UnixMillis};
use crate::error::ApiError;
use crate::keyring::{KeyRing, PURPOSE_DATA};
use crate::policy::{Operation, Policy};
use crate::store::{JournalEntry, Store, StoreError, TokenRecord, STATUS_ACTIVE, STATUS_DELETED};
use crate::validate;
use crate::vault_client::VaultClient;

/// How often a tokenize retries when a format-preserving token collides with an existing one.
const TOKEN_COLLISION_RETRIES: usize = 5;

/// The state every handler shares.
#[derive(Debug)]
pub struct Gateway {
    pub policy: Policy,
    pub store: Store,
    pub vault: VaultClient,
    pub keys: KeyRing,
    pub clock: Clock,
}

/// The tonic service over a shared [`Gateway`].
#[derive(Debug, Clone)]
pub struct TokenizationService(pub Arc<Gateway>);

fn caller<T>(request: &Request<T>) -> Option<String> {
    let certs = request.peer_certs()?;
    peer_identity(certs.iter().map(|cert| cert.as_ref()))
}

fn store_error(err: StoreError) -> ApiError {
    tracing::error!(error = %err, "storage failed");
    ApiError::unavailable("STORAGE_UNAVAILABLE", "storage is unavailable; retry later")
}

fn format_name(format: TokenFormat) -> &'static str {
    match format {
        TokenFormat::FormatPreserving => "format_preserving",
        TokenFormat::Opaque | TokenFormat::Unspecified => "opaque",
    }
}

fn timestamp(ms: UnixMillis) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: ms.div_euclid(1000),
        nanos: i32::try_from(ms.rem_euclid(1000) * 1_000_000).unwrap_or(0),
    }
}

/// The public metadata of a record.
fn token_message(record: &TokenRecord) -> Token {
    let brand =
        CardBrand::from_str_name(&format!("CARD_BRAND_{}", record.brand)).unwrap_or(CardBrand::Unknown);
    let status = if record.status == STATUS_DELETED {
        TokenStatus::Deleted
    } else {
        TokenStatus::Active
    };
    let format = if record.format == "format_preserving" {
        TokenFormat::FormatPreserving
    } else {
        TokenFormat::Opaque
    };
    Token {
        token: record.token.clone(),
        merchant_id: record.merchant_id.clone(),
        brand: brand as i32,
        first_six: record.first_six.clone(),
        last_four: record.last_four.clone(),
        expiry_month: record.expiry_month,
        expiry_year: record.expiry_year,
        status: status as i32,
        created_at: Some(timestamp(record.created_at)),
        format: format as i32,
        shopper_reference: record.shopper_reference.clone(),
    }
}

/// Moves card data from the public message into the vault message without copying it.
fn vault_card(card: &mut Card) -> vault::Card {
    vault::Card {
        number: std::mem::take(&mut card.number),
        expiry_month: card.expiry_month,
        expiry_year: card.expiry_year,
        holder_name: std::mem::take(&mut card.holder_name),
    }
}

fn public_card(card: &mut vault::Card) -> Card {
    Card {
        number: std::mem::take(&mut card.number),
        expiry_month: card.expiry_month,
        expiry_year: card.expiry_year,
        holder_name: std::mem::take(&mut card.holder_name),
    }
}

impl Gateway {
    /// An active token of this merchant, or NOT_FOUND (also for another merchant's token, so
    /// existence does not leak across merchants).
    async fn active_record(&self, merchant_id: &str, token: &str) -> Result<TokenRecord, ApiError> {
        let record = self
            .store
            .token(merchant_id, token)
            .await
            .map_err(store_error)?
            .ok_or_else(|| ApiError::not_found("TOKEN_NOT_FOUND", "no such token for this merchant"))?;
        if record.status != STATUS_ACTIVE {
            return Err(ApiError::not_found("TOKEN_DELETED", "the token was deleted"));
        }
        Ok(record)
    }

    async fn tokenize(
        &self,
        caller: Option<String>,
        mut request: TokenizeRequest,
    ) -> Result<TokenizeResponse, ApiError> {
        validate::merchant_id(&request.merchant_id)?;
        self.policy
            .authorize(caller.as_deref(), Operation::Tokenize, &request.merchant_id)?;
        let caller = caller.unwrap_or_default();
        let mut card = request.card.take().ok_or_else(|| ApiError::missing("card"))?;
        validate::card(&card, self.clock.year_month())?;
        validate::shopper_reference(&request.shopper_reference)?;
        let format = TokenFormat::try_from(request.format).map_err(|_| {
            ApiError::invalid("format", "INVALID_FORMAT", "format is not a known TokenFormat")
        })?;
        let merchant_id = request.merchant_id.as_str();
        let (data_key, fingerprint_key) = self
            .keys
            .current(&self.store, &self.vault, &self.clock, merchant_id)
            .await?;
        let vault_format = match format {
            TokenFormat::FormatPreserving => vault::TokenFormat::FormatPreserving,
            TokenFormat::Opaque | TokenFormat::Unspecified => vault::TokenFormat::Opaque,
        };
        let item = ProtectItem {
            merchant_id: merchant_id.to_owned(),
            card: Some(vault_card(&mut card)),
            format: vault_format as i32,
        };
        for _ in 0..TOKEN_COLLISION_RETRIES {
            let keys = vec![(*data_key).clone(), (*fingerprint_key).clone()];
            // The item is cloned because a collision needs the card again for a fresh token.
            let protected = self.vault.protect(keys, item.clone()).await?;
            let facts = protected.facts.unwrap_or_default();
            if request.deduplicate {
                if let Some(existing) = self
                    .store
                    .active_token_by_fingerprint(
                        merchant_id,
                        &request.shopper_reference,
                        &protected.fingerprint,
                    )
                    .await
                    .map_err(store_error)?
                {
                    tracing::info!(merchant_id, token = %existing.token, "tokenize deduplicated");
                    return Ok(TokenizeResponse {
                        token: Some(token_message(&existing)),
                        existing: true,
                    });
                }
            }
            let now = self.clock.now_ms();
            let record = TokenRecord {
                merchant_id: merchant_id.to_owned(),
                token: protected.token.clone(),
                format: format_name(format).to_owned(),
                brand: facts.brand,
                first_six: facts.first_six,
                last_four: facts.last_four,
                expiry_month: facts.expiry_month,
                expiry_year: facts.expiry_year,
                shopper_reference: request.shopper_reference.clone(),
                fingerprint: Some(protected.fingerprint),
                fingerprint_key_version: protected.fingerprint_key_version,
                ciphertext: Some(protected.ciphertext),
                data_key_version: protected.data_key_version,
                status: STATUS_ACTIVE.to_owned(),
                created_at: now,
                deleted_at: None,
            };
            let entry = JournalEntry {
                merchant_id,
                token: &record.token,
                kind: "TK",
                caller: &caller,
                at: now,
                detail: "",
            };
            match self.store.insert_token(&record, &entry).await {
                Ok(()) => {
                    tracing::info!(merchant_id, token = %record.token, "tokenized");
                    return Ok(TokenizeResponse {
                        token: Some(token_message(&record)),
                        existing: false,
                    });
                }
                Err(StoreError::Duplicate) => {
                    tracing::debug!(merchant_id, "token collision, drawing another");
                }
                Err(err) => return Err(store_error(err)),
            }
        }
        Err(ApiError::new(
            tonic::Code::ResourceExhausted,
            "TOKEN_SPACE_EXHAUSTED",
            "no unused token could be drawn for this card; use the opaque format",
        ))
    }

    async fn get_token(&self, caller: Option<String>, request: GetTokenRequest) -> Result<Token, ApiError> {
        validate::merchant_id(&request.merchant_id)?;
        self.policy
            .authorize(caller.as_deref(), Operation::ReadMetadata, &request.merchant_id)?;
        validate::token(&request.token)?;
        let record = self.active_record(&request.merchant_id, &request.token).await?;
        Ok(token_message(&record))
    }

    async fn detokenize(
        &self,
        caller: Option<String>,
        request: DetokenizeRequest,
    ) -> Result<DetokenizeResponse, ApiError> {
        validate::merchant_id(&request.merchant_id)?;
        self.policy
            .authorize(caller.as_deref(), Operation::Detokenize, &request.merchant_id)?;
        let caller = caller.unwrap_or_default();
        validate::token(&request.token)?;
        let record = self.active_record(&request.merchant_id, &request.token).await?;
        let ciphertext = record
            .ciphertext
            .clone()
            .ok_or_else(|| ApiError::not_found("TOKEN_DELETED", "the token was deleted"))?;
        let data_key = self
            .keys
            .key(
                &self.store,
                &record.merchant_id,
                PURPOSE_DATA,
                record.data_key_version,
            )
            .await?;
        let mut card = self
            .vault
            .reveal(
                vec![(*data_key).clone()],
                RevealItem {
                    merchant_id: record.merchant_id.clone(),
                    token: record.token.clone(),
                    data_key_version: record.data_key_version,
                    ciphertext,
                },
            )
            .await?;
        // The card is released only once its use is journalled.
        self.store
            .journal(&JournalEntry {
                merchant_id: &record.merchant_id,
                token: &record.token,
                kind: "DT",
                caller: &caller,
                at: self.clock.now_ms(),
                detail: "",
            })
            .await
            .map_err(store_error)?;
        tracing::info!(merchant_id = %record.merchant_id, token = %record.token, "detokenized");
        Ok(DetokenizeResponse {
            token: record.token,
            card: Some(public_card(&mut card)),
        })
    }

    async fn delete_token(
        &self,
        caller: Option<String>,
        request: DeleteTokenRequest,
    ) -> Result<DeleteTokenResponse, ApiError> {
        validate::merchant_id(&request.merchant_id)?;
        self.policy
            .authorize(caller.as_deref(), Operation::Delete, &request.merchant_id)?;
        let caller = caller.unwrap_or_default();
        validate::token(&request.token)?;
        let entry = JournalEntry {
            merchant_id: &request.merchant_id,
            token: &request.token,
            kind: "DL",
            caller: &caller,
            at: self.clock.now_ms(),
            detail: "",
        };
        match self.store.delete_token(&entry).await.map_err(store_error)? {
            Some(record) => {
                tracing::info!(merchant_id = %record.merchant_id, token = %record.token, "deleted");
                Ok(DeleteTokenResponse {
                    token: Some(token_message(&record)),
                })
            }
            // Tells a deleted token apart from an unknown one, as for every other call.
            None => self
                .active_record(&request.merchant_id, &request.token)
                .await
                .and_then(|_| {
                    Err(ApiError::internal(
                        "STORAGE_CONFLICT",
                        "the token changed during deletion; retry",
                    ))
                }),
        }
    }
}

fn reply<T>(result: Result<T, ApiError>) -> Result<Response<T>, Status> {
    result.map(Response::new).map_err(|err| {
        tracing::debug!(code = ?err.code, reason = %err.reason, "request refused");
        Status::from(err)
    })
}

#[tonic::async_trait]
impl Tokenization for TokenizationService {
    async fn tokenize(
        &self,
        request: Request<TokenizeRequest>,
    ) -> Result<Response<TokenizeResponse>, Status> {
        let caller = caller(&request);
        reply(self.0.tokenize(caller, request.into_inner()).await)
    }

    async fn get_token(&self, request: Request<GetTokenRequest>) -> Result<Response<Token>, Status> {
        let caller = caller(&request);
        reply(self.0.get_token(caller, request.into_inner()).await)
    }

    async fn detokenize(
        &self,
        request: Request<DetokenizeRequest>,
    ) -> Result<Response<DetokenizeResponse>, Status> {
        let caller = caller(&request);
        reply(self.0.detokenize(caller, request.into_inner()).await)
    }

    async fn delete_token(
        &self,
        request: Request<DeleteTokenRequest>,
    ) -> Result<Response<DeleteTokenResponse>, Status> {
        let caller = caller(&request);
        reply(self.0.delete_token(caller, request.into_inner()).await)
    }
}
