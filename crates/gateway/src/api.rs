//! The public `tessera.v1.Tokenization` service: authenticate, authorise, validate, then call
//! the vault and the store. Handlers log token ids and merchants, never card data.

use std::sync::Arc;

use tessera_api::identity::peer_identity;
use tessera_api::limits::MAX_REQUEST_BYTES;
use tessera_api::v1::tokenization_server::Tokenization;
use tessera_api::v1::CvcStatus;
use tessera_api::v1::{
    detokenize_response, tokenize_request, AuthorizationOutcome, BankAccount, Card, CardBlock, CardBrand,
    ConfirmTokenRequest, Contact, DataType, DeleteTokenRequest, DeleteTokenResponse, DetokenizeRequest,
    DetokenizeResponse, ExtendRetentionRequest, GetTokenHistoryRequest, GetTokenHistoryResponse,
    GetTokenRequest, JournalEntry as ApiJournalEntry, ListTokensRequest, ListTokensResponse,
    ReportAuthorizationRequest, ReportAuthorizationResponse, SubscribeEventsRequest, Token, TokenFormat,
    TokenStatus, TokenizeRequest, TokenizeResponse, TransactionType,
};
use tessera_api::vault::{self, secret_data, ProtectItem, RevealItem, SecretData};
use tonic::{Code, Request, Response, Status};
use zeroize::Zeroizing;

use crate::clock::{add_months, end_of_month, Clock, UnixMillis};
use crate::config::Lifecycle;
use crate::error::ApiError;
use crate::group_commit::Journal;
use crate::idempotency::{request_hash, MerchantReference};
use crate::keyring::{KeyRing, PURPOSE_DATA};
use crate::policy::{Operation, Policy};
use crate::purpose::{check_kind, check_purpose, CheckedPurpose, Kind};
use crate::retry_guard::{Outcome, Report, RetryGuardConfig};
use crate::store::{
    JournalEntry, ListCursor, Store, StoreError, TokenRecord, Transition, STATUS_ACTIVE, STATUS_CONSUMED,
    STATUS_DELETED, STATUS_EXPIRED, STATUS_PROVISIONAL,
};
use crate::transport_errors::too_large;
use crate::validate;
use crate::vault_client::VaultClient;

/// How often a tokenize retries when a format-preserving token collides with an existing one.
const TOKEN_COLLISION_RETRIES: usize = 5;
/// Card tokens are kept this long after the card expires; other tokens this long after their
/// last use.
const RETENTION_MONTHS: u32 = 14;
/// The most retention ExtendRetention may add over a token's life.
const MAX_EXTENSION_MONTHS: u32 = 24;
/// A single-use token expires this long after creation without use.
const SINGLE_USE_TTL_MS: i64 = 24 * 3600 * 1000;
const DEFAULT_PAGE_SIZE: u32 = 20;
const MAX_PAGE_SIZE: u32 = 100;
const DEFAULT_HISTORY_PAGE_SIZE: u32 = 100;
const MAX_HISTORY_PAGE_SIZE: u32 = 1000;

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

/// The state every handler shares.
#[derive(Debug)]
pub struct Gateway {
    pub policy: Policy,
    pub store: Store,
    pub vault: VaultClient,
    pub keys: KeyRing,
    pub clock: Clock,
    pub lifecycle: Lifecycle,
    pub retry_guard: RetryGuardConfig,
}

/// The tonic service over a shared [`Gateway`].
#[derive(Debug, Clone)]
pub struct TokenizationService(pub Arc<Gateway>);

fn caller<T>(request: &Request<T>) -> Option<String> {
    let certs = request.peer_certs()?;
    peer_identity(certs.iter().map(|cert| cert.as_ref()))
}

/// A unary request's caller and message, once the message is within the unary size limit.
/// tonic's decoder holds the whole service to the import limit (the largest message any of
/// its methods takes), so the tighter limit of the other methods is checked here.
fn accept<T: prost::Message>(request: Request<T>) -> Result<(Option<String>, T), Status> {
    if request.get_ref().encoded_len() > MAX_REQUEST_BYTES {
        return Err(too_large(MAX_REQUEST_BYTES).into());
    }
    Ok((caller(&request), request.into_inner()))
}

pub(crate) fn store_error(err: StoreError) -> ApiError {
    tracing::error!(error = %err, "storage failed");
    ApiError::unavailable("STORAGE_UNAVAILABLE", "storage is unavailable; retry later")
}

fn duplicate_reference() -> ApiError {
    ApiError::new(
        Code::AlreadyExists,
        "DUPLICATE",
        "this merchant_reference was already used for this merchant in the last 24 hours",
    )
}

/// A write that claimed a merchant reference failed: DUPLICATE when the strict reference was
/// taken (by a concurrent request that got there first), else a storage failure.
fn reference_error(err: StoreError) -> ApiError {
    match err {
        StoreError::ReferenceTaken => duplicate_reference(),
        err => store_error(err),
    }
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

fn status_of(record: &TokenRecord) -> TokenStatus {
    match record.status.as_str() {
        STATUS_PROVISIONAL => TokenStatus::Provisional,
        STATUS_DELETED => TokenStatus::Deleted,
        STATUS_EXPIRED => TokenStatus::Expired,
        STATUS_CONSUMED => TokenStatus::Consumed,
        _ => TokenStatus::Active,
    }
}

pub(crate) fn data_type_of(stored: &str) -> DataType {
    match stored {
        "card" => DataType::Card,
        "bank_account" => DataType::BankAccount,
        "email" => DataType::Email,
        "phone" => DataType::Phone,
        "cvc" => DataType::Cvc,
        _ => DataType::Unspecified,
    }
}

/// A stored brand ("VISA"); no brand at all for data that is not a card.
pub(crate) fn brand_of(stored: &str) -> CardBrand {
    if stored.is_empty() {
        CardBrand::Unspecified
    } else {
        CardBrand::from_str_name(&format!("CARD_BRAND_{stored}")).unwrap_or(CardBrand::Unknown)
    }
}

/// The public metadata of a record.
pub(crate) fn token_message(record: &TokenRecord) -> Token {
    let brand = brand_of(&record.brand);
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
        status: status_of(record) as i32,
        created_at: Some(timestamp(record.created_at)),
        format: format as i32,
        shopper_reference: record.shopper_reference.clone(),
        kind: Kind::parse(&record.kind).to_proto() as i32,
        data_type: data_type_of(&record.data_type) as i32,
        last_used_at: record.last_used_at.map(timestamp),
        retain_until: Some(timestamp(record.retain_until)),
        expires_at: record.expires_at.map(timestamp),
        retention_extended_months: record.retention_extended_months,
        blocks: Vec::new(),
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

/// Validates the data of a tokenize and moves it into the vault's message.
fn secret_data(
    data: Option<tokenize_request::Data>,
    today: (u32, u32),
) -> Result<Option<SecretData>, ApiError> {
    let data = match data {
        Some(tokenize_request::Data::Card(mut card)) => {
            validate::card(&card, today)?;
            secret_data::Data::Card(vault_card(&mut card))
        }
        Some(tokenize_request::Data::BankAccount(mut account)) => {
            validate::bank_account(&account)?;
            secret_data::Data::BankAccount(vault::BankAccount {
                iban: std::mem::take(&mut account.iban),
                bic: std::mem::take(&mut account.bic),
                holder_name: std::mem::take(&mut account.holder_name),
            })
        }
        Some(tokenize_request::Data::Contact(mut contact)) => {
            validate::contact(&contact)?;
            secret_data::Data::Contact(vault::Contact {
                email: std::mem::take(&mut contact.email),
                phone: std::mem::take(&mut contact.phone),
            })
        }
        None => return Ok(None),
    };
    Ok(Some(SecretData { data: Some(data) }))
}

/// Moves revealed data into the public response's oneof without copying it.
fn public_data(revealed: &mut vault::Revealed) -> Option<detokenize_response::Data> {
    match revealed.data.as_mut().and_then(|data| data.data.as_mut())? {
        secret_data::Data::Card(card) => Some(detokenize_response::Data::Card(Card {
            number: std::mem::take(&mut card.number),
            expiry_month: card.expiry_month,
            expiry_year: card.expiry_year,
            holder_name: std::mem::take(&mut card.holder_name),
        })),
        secret_data::Data::BankAccount(account) => {
            Some(detokenize_response::Data::BankAccount(BankAccount {
                iban: std::mem::take(&mut account.iban),
                bic: std::mem::take(&mut account.bic),
                holder_name: std::mem::take(&mut account.holder_name),
            }))
        }
        secret_data::Data::Contact(contact) => Some(detokenize_response::Data::Contact(Contact {
            email: std::mem::take(&mut contact.email),
            phone: std::mem::take(&mut contact.phone),
        })),
    }
}

fn precondition(reason: &'static str, message: &'static str) -> ApiError {
    ApiError::new(Code::FailedPrecondition, reason, message)
}

/// Whether the record's own deadlines have passed, whether or not the sweeper has run yet.
fn past_deadline(record: &TokenRecord, now: UnixMillis) -> bool {
    record.expires_at.is_some_and(|at| at <= now) || record.retain_until <= now
}

/// Refuses a token that no longer exists for its caller: deleted, expired or consumed.
fn check_exists(record: &TokenRecord, now: UnixMillis) -> Result<(), ApiError> {
    match record.status.as_str() {
        STATUS_DELETED => Err(ApiError::not_found("TOKEN_DELETED", "the token was deleted")),
        STATUS_EXPIRED => Err(ApiError::not_found("TOKEN_EXPIRED", "the token expired")),
        STATUS_PROVISIONAL | STATUS_ACTIVE if past_deadline(record, now) => {
            Err(ApiError::not_found("TOKEN_EXPIRED", "the token expired"))
        }
        _ => Ok(()),
    }
}

/// Refuses a token that cannot be used now.
fn check_usable(record: &TokenRecord, now: UnixMillis) -> Result<(), ApiError> {
    check_exists(record, now)?;
    match record.status.as_str() {
        STATUS_CONSUMED => Err(ApiError::not_found(
            "TOKEN_CONSUMED",
            "the single-use token was already used",
        )),
        STATUS_PROVISIONAL => Err(precondition(
            "TOKEN_PROVISIONAL",
            "the token is provisional until ConfirmToken confirms the payment that created it",
        )),
        _ => Ok(()),
    }
}

/// When a token with these facts is deleted by the retention rules, counted from `from` for
/// data other than cards.
fn retention_end(data_type: &str, expiry: (u32, u32), from: UnixMillis, extended_months: u32) -> UnixMillis {
    let base = if data_type == "card" {
        end_of_month(expiry.1, expiry.0)
    } else {
        from
    };
    add_months(base, RETENTION_MONTHS + extended_months)
}

fn parse_cursor(page_token: &str) -> Result<Option<ListCursor>, ApiError> {
    if page_token.is_empty() {
        return Ok(None);
    }
    let invalid = || {
        ApiError::invalid(
            "page_token",
            "INVALID_PAGE_TOKEN",
            "page_token is not one this API returned",
        )
    };
    let rest = page_token.strip_prefix("v1.").ok_or_else(invalid)?;
    let (created, token) = rest.split_once('.').ok_or_else(invalid)?;
    let created = created.parse::<i64>().map_err(|_| invalid())?;
    validate::token(token).map_err(|_| invalid())?;
    Ok(Some((created, token.to_owned())))
}

/// The journal entry a history page continues after (0 for the first page).
fn parse_history_cursor(page_token: &str) -> Result<i64, ApiError> {
    if page_token.is_empty() {
        return Ok(0);
    }
    page_token
        .strip_prefix("h1.")
        .and_then(|id| id.parse::<i64>().ok())
        .filter(|id| *id > 0)
        .ok_or_else(|| {
            ApiError::invalid(
                "page_token",
                "INVALID_PAGE_TOKEN",
                "page_token is not one this API returned",
            )
        })
}

fn transaction_type(kind: &str) -> TransactionType {
    match kind {
        "TK" => TransactionType::Tokenize,
        "DT" => TransactionType::Detokenize,
        "DL" => TransactionType::Delete,
        "CONFIRM" => TransactionType::Confirm,
        "EXTEND" => TransactionType::Extend,
        "EXPIRE" => TransactionType::Expire,
        "AUTH" => TransactionType::Authorization,
        "BLOCK" => TransactionType::Block,
        "UNBLOCK" => TransactionType::Unblock,
        _ => TransactionType::Unspecified,
    }
}

impl Gateway {
    /// The record of a token of this merchant, whatever its state, or NOT_FOUND (also for
    /// another merchant's token, so existence does not leak across merchants).
    async fn lookup(&self, merchant_id: &str, token: &str) -> Result<TokenRecord, ApiError> {
        self.store
            .token(merchant_id, token)
            .await
            .map_err(store_error)?
            .ok_or_else(|| ApiError::not_found("TOKEN_NOT_FOUND", "no such token for this merchant"))
    }

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

    /// The record (and its TK journal entry) of a protected item.
    pub(crate) fn record_for(
        &self,
        prepared: &Prepared,
        protected: vault::Protected,
        caller: &str,
        now: UnixMillis,
    ) -> (TokenRecord, Journal) {
        let facts = protected.facts.clone().unwrap_or_default();
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
            kind: prepared.kind.as_str().to_owned(),
            retain_until: retention_end(&facts.data_type, (facts.expiry_month, facts.expiry_year), now, 0),
            data_type: facts.data_type,
            format: format_name(prepared.format).to_owned(),
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
                STATUS_PROVISIONAL
            } else {
                STATUS_ACTIVE
            }
            .to_owned(),
            created_at: now,
            last_used_at: None,
            ended_at: None,
            expires_at: deadline,
            retention_extended_months: 0,
        };
        let journal = Journal {
            merchant_id: record.merchant_id.clone(),
            token: record.token.clone(),
            kind: "TK",
            caller: caller.to_owned(),
            at: now,
            purpose: String::new(),
            detail: if prepared.provisional { "PROVISIONAL" } else { "" }.to_owned(),
            payment_reference: String::new(),
        };
        (record, journal)
    }

    /// The common start of a call about one token: a valid merchant id the caller may act
    /// for with `operation`, and a token of valid syntax. Returns the caller's identity.
    fn authorized(
        &self,
        caller: Option<String>,
        operation: Operation,
        merchant_id: &str,
        token: &str,
    ) -> Result<String, ApiError> {
        validate::merchant_id(merchant_id)?;
        self.policy.authorize(caller.as_deref(), operation, merchant_id)?;
        validate::token(token)?;
        Ok(caller.unwrap_or_default())
    }

    /// Applies a state change; ABORTED when the token changed under it (a concurrent request
    /// got there first), so the caller retries against the new state.
    async fn apply(
        &self,
        change: &Transition,
        entry: &JournalEntry<'_>,
        during: &str,
    ) -> Result<TokenRecord, ApiError> {
        self.store
            .transition(change, entry)
            .await
            .map_err(store_error)?
            .ok_or_else(|| {
                ApiError::new(
                    Code::Aborted,
                    "CONCURRENT_CHANGE",
                    format!("the token changed during {during}; retry"),
                )
            })
    }

    async fn tokenize(
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

    /// Checks a request's merchant reference and returns it for the store to take with what
    /// the request writes (see crate::idempotency): it is not recorded here, so a request that
    /// fails later leaves it free. A strict one already seen in the last 24 hours is refused
    /// now, before any vault work; the store's claim decides between concurrent requests.
    async fn check_reference(
        &self,
        merchant_id: &str,
        reference: &str,
        strict: bool,
    ) -> Result<Option<MerchantReference>, ApiError> {
        if reference.is_empty() {
            return if strict {
                Err(ApiError::missing("merchant_reference"))
            } else {
                Ok(None)
            };
        }
        validate::reference("merchant_reference", reference)?;
        let now = self.clock.now_ms();
        if strict
            && self
                .store
                .merchant_reference_taken(merchant_id, reference, now)
                .await
                .map_err(store_error)?
        {
            return Err(duplicate_reference());
        }
        Ok(Some(MerchantReference {
            merchant_id: merchant_id.to_owned(),
            reference: reference.to_owned(),
            strict,
            seen_at: now,
        }))
    }

    /// Runs `work` under the request's idempotency key, if it has one (see crate::idempotency).
    async fn idempotent<T, F>(
        &self,
        caller: Option<&str>,
        merchant_id: &str,
        key: &str,
        method: &str,
        hash: Vec<u8>,
        work: F,
    ) -> Result<T, ApiError>
    where
        T: prost::Message + Default,
        F: std::future::Future<Output = Result<T, ApiError>>,
    {
        if key.is_empty() {
            return work.await;
        }
        validate::merchant_id(merchant_id)?;
        let caller = caller.ok_or_else(|| {
            ApiError::unauthenticated(
                "CALLER_UNIDENTIFIED",
                "client certificate carries no URI identity",
            )
        })?;
        crate::idempotency::run(
            &self.store,
            (merchant_id, caller),
            key,
            method,
            hash,
            self.clock.now_ms(),
            work,
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
                        prepared.kind.as_str(),
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
            let (mut record, journal) = self.record_for(prepared, protected, caller, now);
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
                    tracing::info!(merchant_id, token = %record.token, kind = %record.kind, "tokenized");
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

    async fn get_token(&self, caller: Option<String>, request: GetTokenRequest) -> Result<Token, ApiError> {
        self.authorized(
            caller,
            Operation::ReadMetadata,
            &request.merchant_id,
            &request.token,
        )?;
        let record = self.lookup(&request.merchant_id, &request.token).await?;
        let now = self.clock.now_ms();
        // A metadata read answers for a token that is no longer usable too, flagged with its
        // status (as DeleteToken's answer is); only the operations that use a token refuse it.
        let mut token = token_message(&record);
        if matches!(record.status.as_str(), STATUS_PROVISIONAL | STATUS_ACTIVE) && past_deadline(&record, now)
        {
            // Past its deadline, the token is expired even before the sweeper records it.
            token.status = TokenStatus::Expired as i32;
        }
        if let Some(fingerprint) = &record.fingerprint {
            token.blocks = self
                .store
                .active_blocks(&record.merchant_id, fingerprint, now)
                .await
                .map_err(store_error)?
                .into_iter()
                .map(|block| CardBlock {
                    acquiring_agreement: block.agreement,
                    reason: block.reason,
                    blocked_until: Some(timestamp(block.until)),
                })
                .collect();
        }
        Ok(token)
    }

    /// Refuses a merchant-initiated use of a card blocked under the stated agreement (or, when
    /// none is stated, under any), with the reason and when the block ends.
    async fn check_retry_guard(
        &self,
        record: &TokenRecord,
        agreement: &str,
        now: UnixMillis,
    ) -> Result<(), ApiError> {
        let Some(fingerprint) = &record.fingerprint else {
            return Ok(());
        };
        let blocks = self
            .store
            .active_blocks(&record.merchant_id, fingerprint, now)
            .await
            .map_err(store_error)?;
        let Some(block) = blocks
            .into_iter()
            .find(|block| agreement.is_empty() || block.agreement == agreement)
        else {
            return Ok(());
        };
        let (reason, message) = if block.reason == "DO_NOT_RETRY" {
            (
                "DO_NOT_RETRY",
                "the issuer answered do-not-retry for this card; merchant-initiated use is blocked",
            )
        } else {
            ("RETRY_LIMIT", "the scheme's limit of failed attempts for this card is reached; merchant-initiated use is blocked")
        };
        let mut error = precondition(reason, message);
        error.metadata = vec![
            (
                "blocked_until",
                tessera_api::calendar::rfc3339_millis(block.until),
            ),
            ("blocked_until_unix_ms", block.until.to_string()),
            ("acquiring_agreement", block.agreement),
        ];
        Err(error)
    }

    async fn report_authorization(
        &self,
        caller: Option<String>,
        request: ReportAuthorizationRequest,
    ) -> Result<ReportAuthorizationResponse, ApiError> {
        validate::merchant_id(&request.merchant_id)?;
        // Reporting an outcome is part of paying with a token.
        let allowed = self
            .policy
            .authorize(
                caller.as_deref(),
                Operation::DetokenizeMerchantInitiated,
                &request.merchant_id,
            )
            .or_else(|_| {
                self.policy
                    .authorize(caller.as_deref(), Operation::Detokenize, &request.merchant_id)
            });
        allowed?;
        let caller = caller.unwrap_or_default();
        validate::token(&request.token)?;
        let outcome = match AuthorizationOutcome::try_from(request.outcome) {
            Ok(AuthorizationOutcome::Approved) => Outcome::Approved,
            Ok(AuthorizationOutcome::Declined) => Outcome::Declined,
            Ok(AuthorizationOutcome::DeclinedDoNotRetry) => Outcome::DoNotRetry,
            Ok(AuthorizationOutcome::Unspecified) => return Err(ApiError::missing("outcome")),
            Err(_) => {
                return Err(ApiError::invalid(
                    "outcome",
                    "INVALID_OUTCOME",
                    "outcome is not a known AuthorizationOutcome",
                ))
            }
        };
        if request.acquiring_agreement.is_empty() {
            return Err(ApiError::missing("acquiring_agreement"));
        }
        validate::reference("acquiring_agreement", &request.acquiring_agreement)?;
        let now = self.clock.now_ms();
        let record = self.lookup(&request.merchant_id, &request.token).await?;
        check_exists(&record, now)?;
        let fingerprint = record.fingerprint.clone().ok_or_else(|| {
            precondition(
                "NO_CARD_FINGERPRINT",
                "this token has no card to count attempts for",
            )
        })?;
        let reference = self
            .check_reference(
                &request.merchant_id,
                &request.merchant_reference,
                request.strict_merchant_reference,
            )
            .await?;
        let config = &self.retry_guard;
        let report = Report {
            merchant_id: record.merchant_id.clone(),
            agreement: request.acquiring_agreement.clone(),
            fingerprint,
            token: record.token.clone(),
            outcome,
            at: now,
            caller,
            rule: config.rule(&record.brand),
            do_not_retry_ms: i64::from(config.do_not_retry_block_hours) * 3_600_000,
        };
        let state = self
            .store
            .report_authorization(report, reference)
            .await
            .map_err(reference_error)?;
        Ok(ReportAuthorizationResponse {
            failed_attempts: state.failed_attempts,
            limit: state.limit,
            block: state.block.map(|block| CardBlock {
                acquiring_agreement: block.agreement,
                reason: block.reason,
                blocked_until: Some(timestamp(block.until)),
            }),
        })
    }

    async fn detokenize(
        &self,
        caller: Option<String>,
        request: DetokenizeRequest,
    ) -> Result<DetokenizeResponse, ApiError> {
        validate::merchant_id(&request.merchant_id)?;
        let purpose = check_purpose(request.purpose.as_ref())?;
        let operation = if purpose.merchant_initiated() {
            Operation::DetokenizeMerchantInitiated
        } else {
            Operation::Detokenize
        };
        self.policy
            .authorize(caller.as_deref(), operation, &request.merchant_id)?;
        let caller = caller.unwrap_or_default();
        validate::token(&request.token)?;
        let now = self.clock.now_ms();
        let record = self.lookup(&request.merchant_id, &request.token).await?;
        check_usable(&record, now)?;
        if record.data_type == "cvc" {
            return Err(precondition(
                "CVC_ONLY_TOKEN",
                "a CVC-only token is not detokenized itself; name it as cvc_token of a card-on-file detokenize",
            ));
        }
        if request.shopper_reference != record.shopper_reference {
            return Err(precondition(
                "SHOPPER_REFERENCE_MISMATCH",
                "shopper_reference differs from the one the token was created with",
            ));
        }
        let kind = Kind::parse(&record.kind);
        check_kind(kind, purpose)?;
        if purpose.merchant_initiated() {
            self.check_retry_guard(&record, &request.acquiring_agreement, now)
                .await?;
        }
        let (other_cvc_token, other_cvc_vault) = self
            .cvc_token(&request, &record, kind, purpose, now)
            .await?
            .unzip();
        let held_cvc = match (&other_cvc_token, record.holds_cvc) {
            (Some(other), _) => Some((other.clone(), other_cvc_vault.unwrap_or_default())),
            (None, true) => Some((record.token.clone(), record.cvc_vault.clone())),
            (None, false) => None,
        };
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
        // The data first, without the CVC: a CVC is taken from vault memory only by the use
        // that was recorded below, so a racing use that loses never burns it (it gets
        // TOKEN_CONSUMED, not CVC_UNAVAILABLE), and a reveal that fails leaves it held.
        let mut revealed = self
            .vault
            .reveal(
                vec![(*data_key).clone()],
                RevealItem {
                    merchant_id: record.merchant_id.clone(),
                    token: record.token.clone(),
                    data_key_version: record.data_key_version,
                    ciphertext,
                    cvc_token: String::new(),
                    // The vault's audit record names why the data was revealed.
                    purpose: purpose.journal_text(),
                },
            )
            .await?;
        let retain_until = (record.data_type != "card")
            .then(|| retention_end(&record.data_type, (0, 0), now, record.retention_extended_months));
        let purpose_text = purpose.journal_text();
        let entry = JournalEntry {
            merchant_id: &record.merchant_id,
            token: &record.token,
            kind: "DT",
            caller: &caller,
            at: now,
            purpose: &purpose_text,
            detail: if other_cvc_token.is_some() { "WITH_CVC" } else { "" },
            payment_reference: "",
        };
        // The data is released only once its use is journalled (and a single-use token
        // consumed): if another request consumed it first, this one returns nothing.
        let used = self
            .store
            .record_use(
                &entry,
                kind == Kind::SingleUse,
                retain_until,
                other_cvc_token.as_deref(),
            )
            .await
            .map_err(store_error)?;
        if !used {
            return Err(ApiError::not_found(
                "TOKEN_CONSUMED",
                "the token was used or changed by another request",
            ));
        }
        tracing::info!(merchant_id = %record.merchant_id, token = %record.token, purpose = %purpose_text, "detokenized");
        let (cvc, cvc_status) = match held_cvc {
            Some((cvc_token, cvc_vault)) => self.take_cvc(&record, cvc_token, &cvc_vault, purpose_text).await,
            None => (String::new(), CvcStatus::Unspecified),
        };
        Ok(DetokenizeResponse {
            token: record.token,
            data: public_data(&mut revealed),
            cvc,
            cvc_status: cvc_status as i32,
        })
    }

    /// Takes the CVC held under `cvc_token` from vault memory, once the use it goes with is
    /// recorded. The CVC lives only in the vault that took it, so the call goes there. The use
    /// stands whatever happens here: a CVC that is gone (that vault restarted, was sealed or
    /// cannot be reached, or the CVC's time ran out) is reported as unavailable, so the caller
    /// still gets the data and can ask the shopper for the CVC again.
    async fn take_cvc(
        &self,
        record: &TokenRecord,
        cvc_token: String,
        cvc_vault: &str,
        purpose_text: String,
    ) -> (String, CvcStatus) {
        let taken = self
            .vault
            .reveal_on(
                cvc_vault,
                Vec::new(),
                RevealItem {
                    merchant_id: record.merchant_id.clone(),
                    token: record.token.clone(),
                    data_key_version: 0,
                    ciphertext: Vec::new(),
                    cvc_token,
                    purpose: purpose_text,
                },
            )
            .await;
        match taken {
            Ok(mut revealed) if !revealed.cvc.is_empty() => {
                (std::mem::take(&mut revealed.cvc), CvcStatus::Returned)
            }
            Ok(_) => (String::new(), CvcStatus::Unavailable),
            Err(err) => {
                tracing::warn!(merchant_id = %record.merchant_id, token = %record.token, reason = %err.reason, "the CVC is unavailable; the data was returned without it");
                (String::new(), CvcStatus::Unavailable)
            }
        }
    }

    /// The CVC-only token a detokenize names, checked: only a cardholder-initiated use of a
    /// card-on-file token may ask for a CVC, and only for the same merchant and shopper.
    /// Returns the token and the vault holding its CVC.
    async fn cvc_token(
        &self,
        request: &DetokenizeRequest,
        record: &TokenRecord,
        kind: Kind,
        purpose: CheckedPurpose,
        now: UnixMillis,
    ) -> Result<Option<(String, String)>, ApiError> {
        if request.cvc_token.is_empty() {
            return Ok(None);
        }
        if kind != Kind::CardOnFile || purpose.merchant_initiated() {
            return Err(precondition(
                "CVC_NOT_ALLOWED",
                "a CVC is returned only with a cardholder-initiated use of a card-on-file token",
            ));
        }
        validate::token(&request.cvc_token)?;
        let cvc = self
            .store
            .token(&request.merchant_id, &request.cvc_token)
            .await
            .map_err(store_error)?
            .ok_or_else(|| {
                ApiError::not_found("CVC_TOKEN_NOT_FOUND", "no such CVC token for this merchant")
            })?;
        check_usable(&cvc, now)?;
        if cvc.data_type != "cvc" || !cvc.holds_cvc {
            return Err(precondition(
                "NOT_A_CVC_TOKEN",
                "cvc_token does not name a CVC-only single-use token",
            ));
        }
        if cvc.shopper_reference != record.shopper_reference {
            return Err(precondition(
                "SHOPPER_REFERENCE_MISMATCH",
                "the CVC token belongs to another shopper than the card token",
            ));
        }
        Ok(Some((cvc.token, cvc.cvc_vault)))
    }

    async fn delete_token(
        &self,
        caller: Option<String>,
        request: DeleteTokenRequest,
    ) -> Result<DeleteTokenResponse, ApiError> {
        let caller = self.authorized(caller, Operation::Delete, &request.merchant_id, &request.token)?;
        let now = self.clock.now_ms();
        let record = self.lookup(&request.merchant_id, &request.token).await?;
        check_exists(&record, now)?;
        let entry = JournalEntry {
            merchant_id: &request.merchant_id,
            token: &request.token,
            kind: "DL",
            caller: &caller,
            at: now,
            purpose: "",
            detail: if record.status == STATUS_PROVISIONAL {
                "DISCARDED"
            } else {
                ""
            },
            payment_reference: "",
        };
        let change = Transition {
            from: &[STATUS_PROVISIONAL, STATUS_ACTIVE, STATUS_CONSUMED],
            to: STATUS_DELETED,
            destroy: true,
            clear_deadline: false,
        };
        let deleted = self.apply(&change, &entry, "deletion").await?;
        tracing::info!(merchant_id = %deleted.merchant_id, token = %deleted.token, "deleted");
        Ok(DeleteTokenResponse {
            token: Some(token_message(&deleted)),
        })
    }

    async fn confirm_token(
        &self,
        caller: Option<String>,
        request: ConfirmTokenRequest,
    ) -> Result<Token, ApiError> {
        let caller = self.authorized(caller, Operation::Tokenize, &request.merchant_id, &request.token)?;
        validate::reference("payment_reference", &request.payment_reference)?;
        let now = self.clock.now_ms();
        let record = self.lookup(&request.merchant_id, &request.token).await?;
        check_exists(&record, now)?;
        if record.status != STATUS_PROVISIONAL {
            return Err(precondition(
                "TOKEN_NOT_PROVISIONAL",
                "only a provisional token can be confirmed",
            ));
        }
        let detail = if request.payment_reference.is_empty() {
            "RECURRING_CONTRACT".to_owned()
        } else {
            format!(
                "RECURRING_CONTRACT payment_reference={}",
                request.payment_reference
            )
        };
        let entry = JournalEntry {
            merchant_id: &request.merchant_id,
            token: &request.token,
            kind: "CONFIRM",
            caller: &caller,
            at: now,
            purpose: "",
            detail: &detail,
            payment_reference: &request.payment_reference,
        };
        let change = Transition {
            from: &[STATUS_PROVISIONAL],
            to: STATUS_ACTIVE,
            destroy: false,
            clear_deadline: true,
        };
        let confirmed = self.apply(&change, &entry, "confirmation").await?;
        tracing::info!(merchant_id = %confirmed.merchant_id, token = %confirmed.token, "confirmed: recurring contract");
        Ok(token_message(&confirmed))
    }

    async fn list_tokens(
        &self,
        caller: Option<String>,
        request: ListTokensRequest,
    ) -> Result<ListTokensResponse, ApiError> {
        validate::merchant_id(&request.merchant_id)?;
        self.policy
            .authorize(caller.as_deref(), Operation::List, &request.merchant_id)?;
        if request.shopper_reference.is_empty() {
            return Err(ApiError::missing("shopper_reference"));
        }
        validate::shopper_reference(&request.shopper_reference)?;
        let size = match request.page_size {
            0 => DEFAULT_PAGE_SIZE,
            size => size.min(MAX_PAGE_SIZE),
        };
        let cursor = parse_cursor(&request.page_token)?;
        let mut records = self
            .store
            .list_usable(
                &request.merchant_id,
                &request.shopper_reference,
                self.clock.now_ms(),
                cursor.as_ref(),
                size + 1,
            )
            .await
            .map_err(store_error)?;
        let more = records.len() > size as usize;
        records.truncate(size as usize);
        let next_page_token = match records.last() {
            Some(last) if more => format!("v1.{}.{}", last.created_at, last.token),
            _ => String::new(),
        };
        Ok(ListTokensResponse {
            tokens: records.iter().map(token_message).collect(),
            next_page_token,
        })
    }

    async fn extend_retention(
        &self,
        caller: Option<String>,
        request: ExtendRetentionRequest,
    ) -> Result<Token, ApiError> {
        let caller = self.authorized(caller, Operation::Extend, &request.merchant_id, &request.token)?;
        if !(1..=MAX_EXTENSION_MONTHS).contains(&request.months) {
            return Err(ApiError::invalid(
                "months",
                "INVALID_MONTHS",
                "months must be 1 to 24",
            ));
        }
        let now = self.clock.now_ms();
        let record = self.lookup(&request.merchant_id, &request.token).await?;
        check_usable(&record, now)?;
        if record.retention_extended_months + request.months > MAX_EXTENSION_MONTHS {
            return Err(precondition(
                "RETENTION_LIMIT",
                "retention can be extended by at most 24 months in total",
            ));
        }
        let detail = format!("+{} months", request.months);
        let entry = JournalEntry {
            merchant_id: &request.merchant_id,
            token: &request.token,
            kind: "EXTEND",
            caller: &caller,
            at: now,
            purpose: "",
            detail: &detail,
            payment_reference: "",
        };
        let retain_until = add_months(record.retain_until, request.months);
        let extended = self
            .store
            .extend_retention(&entry, request.months, retain_until, MAX_EXTENSION_MONTHS)
            .await
            .map_err(store_error)?
            .ok_or_else(|| {
                precondition(
                    "RETENTION_LIMIT",
                    "retention can be extended by at most 24 months in total",
                )
            })?;
        Ok(token_message(&extended))
    }

    async fn token_history(
        &self,
        caller: Option<String>,
        request: GetTokenHistoryRequest,
    ) -> Result<GetTokenHistoryResponse, ApiError> {
        self.authorized(
            caller,
            Operation::ReadMetadata,
            &request.merchant_id,
            &request.token,
        )?;
        let size = match request.page_size {
            0 => DEFAULT_HISTORY_PAGE_SIZE,
            size => size.min(MAX_HISTORY_PAGE_SIZE),
        };
        let after = parse_history_cursor(&request.page_token)?;
        // Existence first, so an unknown token answers NOT_FOUND and not an empty history.
        self.lookup(&request.merchant_id, &request.token).await?;
        let mut entries = self
            .store
            .history_page(&request.merchant_id, &request.token, after, i64::from(size) + 1)
            .await
            .map_err(store_error)?;
        let more = entries.len() > size as usize;
        entries.truncate(size as usize);
        let next_page_token = match entries.last() {
            Some(last) if more => format!("h1.{}", last.id),
            _ => String::new(),
        };
        Ok(GetTokenHistoryResponse {
            next_page_token,
            entries: entries
                .into_iter()
                .map(|entry| ApiJournalEntry {
                    transaction_id: u64::try_from(entry.id).unwrap_or(0),
                    r#type: transaction_type(&entry.kind) as i32,
                    at: Some(timestamp(entry.at)),
                    caller: entry.caller,
                    purpose: CheckedPurpose::from_journal_text(&entry.purpose),
                    detail: entry.detail,
                })
                .collect(),
        })
    }
}

/// A mutating request that may carry an idempotency key: its method name, its merchant, and
/// a hash of its non-secret fields that tells a repeat from a different request.
trait IdempotentRequest: prost::Message + Send + 'static {
    const METHOD: &'static str;
    fn take_key(&mut self) -> String;
    fn merchant_id(&self) -> &str;
    fn hash(&self) -> Vec<u8>;
}

impl IdempotentRequest for TokenizeRequest {
    const METHOD: &'static str = "Tokenize";

    fn take_key(&mut self) -> String {
        std::mem::take(&mut self.idempotency_key)
    }

    fn merchant_id(&self) -> &str {
        &self.merchant_id
    }

    /// Every field but the secret data, which is represented by the facts PCI DSS allows to
    /// be kept (first six, last four, length, expiry), so no card number is ever hashed in the
    /// clear.
    fn hash(&self) -> Vec<u8> {
        let digits = |text: &str| text.chars().filter(char::is_ascii_digit).collect::<String>();
        let edges = |text: &str| {
            let chars: Vec<char> = text.chars().collect();
            let head: String = chars.iter().take(6).collect();
            let tail: String = chars.iter().skip(chars.len().saturating_sub(4)).collect();
            format!("{head}|{tail}|{}", chars.len())
        };
        let facts = match &self.data {
            Some(tokenize_request::Data::Card(card)) => {
                format!(
                    "card|{}|{}|{}",
                    edges(&digits(&card.number)),
                    card.expiry_month,
                    card.expiry_year
                )
            }
            Some(tokenize_request::Data::BankAccount(account)) => {
                let iban: String = account.iban.chars().filter(|c| !c.is_whitespace()).collect();
                format!("bank|{}|{}", edges(&iban), account.bic)
            }
            Some(tokenize_request::Data::Contact(contact)) => {
                format!("contact|{}|{}", edges(&contact.email), edges(&contact.phone))
            }
            None => "none".to_owned(),
        };
        request_hash(&[
            Self::METHOD.as_bytes(),
            self.merchant_id.as_bytes(),
            facts.as_bytes(),
            &self.format.to_be_bytes(),
            self.shopper_reference.as_bytes(),
            &[
                u8::from(self.deduplicate),
                u8::from(self.provisional),
                u8::from(!self.cvc.is_empty()),
            ],
            &self.kind.to_be_bytes(),
            self.merchant_reference.as_bytes(),
            &[u8::from(self.strict_merchant_reference)],
        ])
    }
}

/// Implements [`IdempotentRequest`] for a request whose hash covers the listed fields.
macro_rules! idempotent_request {
    ($type:ty, $method:literal, |$request:ident| [$($part:expr),* $(,)?]) => {
        impl IdempotentRequest for $type {
            const METHOD: &'static str = $method;

            fn take_key(&mut self) -> String {
                std::mem::take(&mut self.idempotency_key)
            }

            fn merchant_id(&self) -> &str {
                &self.merchant_id
            }

            fn hash(&self) -> Vec<u8> {
                let $request = self;
                request_hash(&[Self::METHOD.as_bytes(), $request.merchant_id.as_bytes(), $($part),*])
            }
        }
    };
}

idempotent_request!(DeleteTokenRequest, "DeleteToken", |r| [r.token.as_bytes()]);
idempotent_request!(ConfirmTokenRequest, "ConfirmToken", |r| [
    r.token.as_bytes(),
    r.payment_reference.as_bytes()
]);
idempotent_request!(ExtendRetentionRequest, "ExtendRetention", |r| [
    r.token.as_bytes(),
    &r.months.to_be_bytes()
]);
idempotent_request!(ReportAuthorizationRequest, "ReportAuthorization", |r| [
    r.token.as_bytes(),
    &r.outcome.to_be_bytes(),
    r.acquiring_agreement.as_bytes(),
    r.merchant_reference.as_bytes(),
    &[u8::from(r.strict_merchant_reference)],
]);

impl TokenizationService {
    /// Runs `handler` for a mutating request under its idempotency key, if it carries one.
    async fn idempotent_call<R, T, F, Fut>(
        &self,
        request: Request<R>,
        handler: F,
    ) -> Result<Response<T>, Status>
    where
        R: IdempotentRequest,
        T: prost::Message + Default,
        F: FnOnce(Option<String>, R) -> Fut,
        Fut: std::future::Future<Output = Result<T, ApiError>>,
    {
        let (caller, mut request) = accept(request)?;
        let key = request.take_key();
        let hash = request.hash();
        let merchant_id = request.merchant_id().to_owned();
        let work = handler(caller.clone(), request);
        reply(
            self.0
                .idempotent(caller.as_deref(), &merchant_id, &key, R::METHOD, hash, work)
                .await,
        )
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
    type ImportTokensStream = crate::import::ImportStream;
    type SubscribeEventsStream = crate::events::EventStream;

    async fn report_authorization(
        &self,
        request: Request<ReportAuthorizationRequest>,
    ) -> Result<Response<ReportAuthorizationResponse>, Status> {
        self.idempotent_call(request, |caller, request| {
            self.0.report_authorization(caller, request)
        })
        .await
    }

    async fn subscribe_events(
        &self,
        request: Request<SubscribeEventsRequest>,
    ) -> Result<Response<Self::SubscribeEventsStream>, Status> {
        let (caller, request) = accept(request)?;
        let start = || -> Result<_, ApiError> {
            validate::merchant_id(&request.merchant_id)?;
            self.0
                .policy
                .authorize(caller.as_deref(), Operation::ReadMetadata, &request.merchant_id)?;
            crate::events::subscribe(Arc::clone(&self.0), &request)
        };
        reply(start())
    }

    async fn import_tokens(
        &self,
        request: Request<tonic::Streaming<tessera_api::v1::ImportRequest>>,
    ) -> Result<Response<Self::ImportTokensStream>, Status> {
        let caller = caller(&request);
        Ok(Response::new(crate::import::start(
            Arc::clone(&self.0),
            caller,
            request.into_inner(),
        )))
    }

    async fn tokenize(
        &self,
        request: Request<TokenizeRequest>,
    ) -> Result<Response<TokenizeResponse>, Status> {
        self.idempotent_call(request, |caller, request| self.0.tokenize(caller, request))
            .await
    }

    async fn get_token(&self, request: Request<GetTokenRequest>) -> Result<Response<Token>, Status> {
        let (caller, request) = accept(request)?;
        reply(self.0.get_token(caller, request).await)
    }

    async fn detokenize(
        &self,
        request: Request<DetokenizeRequest>,
    ) -> Result<Response<DetokenizeResponse>, Status> {
        let (caller, request) = accept(request)?;
        reply(self.0.detokenize(caller, request).await)
    }

    async fn delete_token(
        &self,
        request: Request<DeleteTokenRequest>,
    ) -> Result<Response<DeleteTokenResponse>, Status> {
        self.idempotent_call(request, |caller, request| self.0.delete_token(caller, request))
            .await
    }

    async fn confirm_token(&self, request: Request<ConfirmTokenRequest>) -> Result<Response<Token>, Status> {
        self.idempotent_call(request, |caller, request| self.0.confirm_token(caller, request))
            .await
    }

    async fn list_tokens(
        &self,
        request: Request<ListTokensRequest>,
    ) -> Result<Response<ListTokensResponse>, Status> {
        let (caller, request) = accept(request)?;
        reply(self.0.list_tokens(caller, request).await)
    }

    async fn extend_retention(
        &self,
        request: Request<ExtendRetentionRequest>,
    ) -> Result<Response<Token>, Status> {
        self.idempotent_call(request, |caller, request| {
            self.0.extend_retention(caller, request)
        })
        .await
    }

    async fn get_token_history(
        &self,
        request: Request<GetTokenHistoryRequest>,
    ) -> Result<Response<GetTokenHistoryResponse>, Status> {
        let (caller, request) = accept(request)?;
        reply(self.0.token_history(caller, request).await)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn card_retention_counts_from_the_end_of_the_expiry_month() {
        let until = retention_end("card", (12, 2030), 0, 0);
        assert_eq!(until, add_months(end_of_month(2030, 12), 14));
        assert_eq!(retention_end("card", (12, 2030), 0, 3), add_months(until, 3));
        assert_eq!(retention_end("email", (0, 0), 1_000, 0), add_months(1_000, 14));
    }

    #[test]
    fn cursors_round_trip_and_refuse_garbage() {
        assert_eq!(parse_cursor("").map_err(|e| e.reason), Ok(None));
        assert_eq!(
            parse_cursor("v1.123.tok_abc").map_err(|e| e.reason),
            Ok(Some((123, "tok_abc".into())))
        );
        for bad in ["123.tok", "v1.x.tok", "v1.1.bad token", "v2.1.tok"] {
            assert!(parse_cursor(bad).is_err(), "{bad}");
        }
        assert_eq!(parse_history_cursor("").map_err(|e| e.reason), Ok(0));
        assert_eq!(parse_history_cursor("h1.42").map_err(|e| e.reason), Ok(42));
        for bad in ["42", "h1.", "h1.-3", "h1.x", "v1.1.tok"] {
            assert!(parse_history_cursor(bad).is_err(), "{bad}");
        }
    }
}
