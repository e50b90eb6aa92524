//! Tokenize: validate and authorise the request, have the vault protect the data, store the
//! token. Bulk import (`super::import`) goes through the same `prepare` and storing.

use tessera_api::v1::{TokenFormat, TokenizeRequest, TokenizeResponse};
use tessera_api::vault::{self, secret_data, ProtectItem};
use tonic::Code;
use zeroize::Zeroizing;

use super::common::{reference_error, retention_end};
use crate::clock::UnixMillis;
use crate::error::ApiError;
use crate::idempotency::MerchantReference;
use crate::mapping::{secret_data, stored_data_type, stored_format, token_message};
use crate::policy::Operation;
use crate::purpose::Kind;
use crate::state::Gateway;
use crate::storage::{store_error, Journal, JournalKind, StoreError, TokenRecord, TokenStatus};
use crate::validate;

/// How often a tokenize retries when a format-preserving token collides with an existing one.
const TOKEN_COLLISION_RETRIES: usize = 5;
/// A single-use token expires this long after creation without use.
const SINGLE_USE_TTL_MS: i64 = 24 * 3600 * 1000;

/// A validated, authorised tokenize, ready for the vault.
#[derive(Debug, Clone)]
pub(crate) struct Prepared {
    pub merchant_id: String,
    pub kind: Kind,
    pub format: TokenFormat,
    pub shopper_reference: String,
    pub deduplicate: bool,
    pub provisional: bool,
    pub needs_keys: bool,
    pub item: ProtectItem,
}

impl Gateway {
    /// Validates and authorises a tokenize and turns it into the vault item, before anything
    /// is created or stored.
    pub(crate) fn prepare(
        &self,
        caller: Option<&str>,
        mut request: TokenizeRequest,
    ) -> Result<Prepared, ApiError> {
        // First, so the CVC's buffer is wiped whatever happens next.
        let cvc = Zeroizing::new(std::mem::take(&mut request.cvc));
        validate::merchant_id(&request.merchant_id)?;
        self.policy
            .authorize(caller, Operation::Tokenize, &request.merchant_id)?;
        let kind = Kind::from_proto(request.kind)?;
        let data = secret_data(request.data.take(), self.clock.year_month())?;
        if !cvc.is_empty() {
            validate::cvc(&cvc)?;
            if kind != Kind::SingleUse {
                return Err(ApiError::invalid(
                    "cvc",
                    "CVC_NOT_ALLOWED",
                    "a CVC may only be given with a single-use token; it is never kept with a multi-use token",
                ));
            }
        }
        if data.is_none() && cvc.is_empty() {
            return Err(ApiError::missing("data"));
        }
        validate::shopper_reference(&request.shopper_reference)?;
        // Checked here too (not only where they are used) so bulk-import items, which go
        // through `prepare` alone, refuse the same text a tokenize refuses.
        if !request.merchant_reference.is_empty() {
            validate::reference("merchant_reference", &request.merchant_reference)?;
        }
        if !request.idempotency_key.is_empty() {
            validate::idempotency_key(&request.idempotency_key)?;
        }
        if kind != Kind::SingleUse && request.shopper_reference.is_empty() {
            return Err(ApiError::missing("shopper_reference"));
        }
        if request.provisional && kind == Kind::SingleUse {
            return Err(ApiError::invalid(
                "provisional",
                "PROVISIONAL_NOT_ALLOWED",
                "only card-on-file and recurrence tokens are created provisionally",
            ));
        }
        let format = TokenFormat::try_from(request.format).map_err(|_| {
            ApiError::invalid("format", "INVALID_FORMAT", "format is not a known TokenFormat")
        })?;
        let is_card = matches!(
            data.as_ref().and_then(|d| d.data.as_ref()),
            Some(secret_data::Data::Card(_))
        );
        if format == TokenFormat::FormatPreserving && !is_card {
            return Err(ApiError::invalid(
                "format",
                "INVALID_FORMAT",
                "format-preserving tokens are only for cards",
            ));
        }
        let vault_format = match format {
            TokenFormat::FormatPreserving => vault::TokenFormat::FormatPreserving,
            TokenFormat::Opaque | TokenFormat::Unspecified => vault::TokenFormat::Opaque,
        };
        Ok(Prepared {
            // A CVC-only token seals nothing, so it needs no merchant keys.
            needs_keys: data.is_some(),
            item: ProtectItem {
                merchant_id: request.merchant_id.clone(),
                data,
                format: vault_format as i32,
                cvc: cvc.to_string(),
            },
            merchant_id: request.merchant_id,
            kind,
            format,
            shopper_reference: request.shopper_reference,
            deduplicate: request.deduplicate,
            provisional: request.provisional,
        })
    }

    /// The wrapped keys a prepared item needs, creating the merchant's keys on first use.
    pub(crate) async fn keys_for(&self, prepared: &Prepared) -> Result<Vec<vault::WrappedKey>, ApiError> {
        if !prepared.needs_keys {
            return Ok(Vec::new());
        }
        let (data_key, fingerprint_key) = self
            .keys
            .current(&self.store, &self.vault, &self.clock, &prepared.merchant_id)
            .await?;
        Ok(vec![(*data_key).clone(), (*fingerprint_key).clone()])
    }

    /// The record (and its TK journal entry) of a protected item; an error when the vault named
    /// a data type the gateway does not know.
    pub(crate) fn record_for(
        &self,
        prepared: &Prepared,
        protected: vault::Protected,
        caller: &str,
        now: UnixMillis,
    ) -> Result<(TokenRecord, Journal), ApiError> {
        let facts = protected.facts.clone().unwrap_or_default();
        let data_type = stored_data_type(&facts.data_type)?;
        let deadline = match (prepared.provisional, prepared.kind) {
            (true, _) => {
                Some(now + i64::try_from(self.lifecycle.provisional_ttl_secs).unwrap_or(3600) * 1000)
            }
            (false, Kind::SingleUse) => Some(now + SINGLE_USE_TTL_MS),
            (false, _) => None,
        };
        let record = TokenRecord {
            merchant_id: prepared.merchant_id.clone(),
            token: protected.token,
            kind: prepared.kind,
            retain_until: retention_end(data_type, (facts.expiry_month, facts.expiry_year), now, 0),
            data_type,
            format: stored_format(prepared.format),
            brand: facts.brand,
            first_six: facts.first_six,
            last_four: facts.last_four,
            expiry_month: facts.expiry_month,
            expiry_year: facts.expiry_year,
            shopper_reference: prepared.shopper_reference.clone(),
            fingerprint: Some(protected.fingerprint).filter(|f| !f.is_empty()),
            fingerprint_key_version: protected.fingerprint_key_version,
            ciphertext: Some(protected.ciphertext).filter(|c| !c.is_empty()),
            data_key_version: protected.data_key_version,
            holds_cvc: protected.holds_cvc,
            cvc_vault: String::new(),
            status: if prepared.provisional {
                TokenStatus::Provisional
            } else {
                TokenStatus::Active
            },
            created_at: now,
            last_used_at: None,
            ended_at: None,
            expires_at: deadline,
            retention_extended_months: 0,
        };
        let journal = Journal {
            merchant_id: record.merchant_id.clone(),
            token: record.token.clone(),
            kind: JournalKind::Tokenize,
            caller: caller.to_owned(),
            at: now,
            purpose: String::new(),
            detail: if prepared.provisional { "PROVISIONAL" } else { "" }.to_owned(),
            payment_reference: String::new(),
        };
        Ok((record, journal))
    }

    pub(crate) async fn tokenize(
        &self,
        caller: Option<String>,
        request: TokenizeRequest,
    ) -> Result<TokenizeResponse, ApiError> {
        let reference = request.merchant_reference.clone();
        let strict = request.strict_merchant_reference;
        let prepared = self.prepare(caller.as_deref(), request)?;
        let reference = self
            .check_reference(&prepared.merchant_id, &reference, strict)
            .await?;
        self.tokenize_prepared(
            &prepared,
            caller.as_deref().unwrap_or_default(),
            reference.as_ref(),
        )
        .await
    }

    /// Protects a prepared item and stores its token, drawing a new token if the first one
    /// collides with an existing one (possible only for format-preserving tokens). The merchant
    /// reference, if any, is taken with the token, or with the answer when an existing token
    /// is returned instead.
    pub(crate) async fn tokenize_prepared(
        &self,
        prepared: &Prepared,
        caller: &str,
        reference: Option<&MerchantReference>,
    ) -> Result<TokenizeResponse, ApiError> {
        let keys = self.keys_for(prepared).await?;
        let merchant_id = prepared.merchant_id.as_str();
        for _ in 0..TOKEN_COLLISION_RETRIES {
            // The item is cloned because a collision needs the data again for a fresh token.
            let (protected, served_by) = self.vault.protect(keys.clone(), prepared.item.clone()).await?;
            let now = self.clock.now_ms();
            if prepared.deduplicate && !protected.fingerprint.is_empty() {
                if let Some(existing) = self
                    .store
                    .usable_token_by_fingerprint(
                        merchant_id,
                        &prepared.shopper_reference,
                        prepared.kind,
                        &protected.fingerprint,
                        now,
                    )
                    .await
                    .map_err(store_error)?
                {
                    if let Some(reference) = reference {
                        self.store
                            .record_merchant_reference(reference.clone())
                            .await
                            .map_err(reference_error)?;
                    }
                    tracing::info!(merchant_id, token = %existing.token, "tokenize deduplicated");
                    return Ok(TokenizeResponse {
                        token: Some(token_message(&existing)),
                        existing: true,
                    });
                }
            }
            let (mut record, journal) = self.record_for(prepared, protected, caller, now)?;
            if record.holds_cvc {
                // Only this vault holds the CVC: reveals that want it must go there.
                record.cvc_vault = served_by;
            }
            match self
                .store
                .insert_token_claiming(&record, &journal, reference)
                .await
            {
                Ok(()) => {
                    tracing::info!(merchant_id, token = %record.token, kind = record.kind.as_str(), "tokenized");
                    return Ok(TokenizeResponse {
                        token: Some(token_message(&record)),
                        existing: false,
                    });
                }
                Err(StoreError::Duplicate) => {
                    tracing::debug!(merchant_id, "token collision, drawing another")
                }
                Err(err) => return Err(reference_error(err)),
            }
        }
        Err(ApiError::new(
            Code::ResourceExhausted,
            "TOKEN_SPACE_EXHAUSTED",
            "no unused token could be drawn for this card; use the opaque format",
        ))
    }
}
