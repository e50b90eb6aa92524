//! The vault's operations over batches. The gRPC layer ([`crate::grpc`]) authenticates the
//! caller and hands each decoded request here; every item succeeds or fails on its own.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use ring::rand::SystemRandom;
use tessera_api::vault::{
    protect_result, reveal_result, CardFacts as ProtoFacts, CreateKeysRequest, CreateKeysResponse, ItemError,
    KeyPurpose as ProtoPurpose, ProtectItem, ProtectRequest, ProtectResponse, ProtectResult, Protected,
    RevealItem, RevealRequest, RevealResponse, RevealResult, StatusResponse, TokenFormat, WrappedKey,
};

use crate::card::{today_utc, CardError, ValidCard};
use crate::config::Mode;
use crate::hardening::{is_debug_build, HardeningReport};
use crate::keys::{KeyCache, KeyError, KeyId, KeyPurpose, MasterKey};
use crate::record::{open_card, seal_card, NonceSequence, RecordAad, RecordError};
use crate::token::{TokenError, TokenRandom};

/// Most items one request may carry; bounds the work and memory of a single call.
pub const MAX_BATCH_ITEMS: usize = 10_000;

/// gRPC status codes used for item and request errors (google.rpc.Code values).
pub mod code {
    pub const INVALID_ARGUMENT: i32 = 3;
    pub const FAILED_PRECONDITION: i32 = 9;
    pub const PERMISSION_DENIED: i32 = 7;
    pub const INTERNAL: i32 = 13;
    pub const DATA_LOSS: i32 = 15;
}

/// A whole request refused. The message is fixed text: never card data or key bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VaultError {
    pub code: i32,
    pub reason: &'static str,
    pub message: &'static str,
}

impl fmt::Display for VaultError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.message, self.reason)
    }
}

impl std::error::Error for VaultError {}

impl VaultError {
    pub const fn new(code: i32, reason: &'static str, message: &'static str) -> Self {
        Self {
            code,
            reason,
            message,
        }
    }
}

/// What the vault knows about itself, fixed at start.
#[derive(Debug, Clone)]
pub struct VaultFacts {
    pub mode: Mode,
    pub master_key_source: &'static str,
    pub hardening: HardeningReport,
}

/// The vault: master key, key cache, nonce sequence, random source.
pub struct Vault {
    master: MasterKey,
    cache: KeyCache,
    nonces: NonceSequence,
    rng: SystemRandom,
    facts: VaultFacts,
}

impl fmt::Debug for Vault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Vault")
            .field("facts", &self.facts)
            .finish_non_exhaustive()
    }
}

fn item_error(code: i32, reason: &str, message: String, field: &str) -> ItemError {
    ItemError {
        code,
        reason: reason.to_owned(),
        message,
        field: field.to_owned(),
    }
}

impl From<&CardError> for ItemError {
    fn from(err: &CardError) -> Self {
        item_error(code::INVALID_ARGUMENT, err.reason(), err.to_string(), err.field())
    }
}

impl From<&KeyError> for ItemError {
    fn from(err: &KeyError) -> Self {
        item_error(code::FAILED_PRECONDITION, err.reason(), err.to_string(), "")
    }
}

impl From<&RecordError> for ItemError {
    fn from(err: &RecordError) -> Self {
        item_error(code::DATA_LOSS, err.reason(), err.to_string(), "")
    }
}

impl From<&TokenError> for ItemError {
    fn from(err: &TokenError) -> Self {
        item_error(code::INTERNAL, "TOKEN_GENERATION_FAILED", err.to_string(), "")
    }
}

/// The wrapped keys of one request, by (merchant, purpose).
fn index_keys(keys: &[WrappedKey]) -> HashMap<(&str, i32, u32), &WrappedKey> {
    keys.iter()
        .map(|key| ((key.merchant_id.as_str(), key.purpose, key.version), key))
        .collect()
}

fn newest_key<'a>(
    keys: &'a [WrappedKey],
    merchant_id: &str,
    purpose: ProtoPurpose,
) -> Option<&'a WrappedKey> {
    keys.iter()
        .filter(|key| key.merchant_id == merchant_id && key.purpose == purpose as i32)
        .max_by_key(|key| key.version)
}

fn key_id(key: &WrappedKey, purpose: KeyPurpose) -> KeyId {
    KeyId {
        merchant_id: key.merchant_id.clone(),
        purpose,
        version: key.version,
    }
}

fn missing_key(what: &str) -> ItemError {
    item_error(
        code::FAILED_PRECONDITION,
        "KEY_MISSING",
        format!("the request carries no {what} key for this item's merchant"),
        "",
    )
}

impl Vault {
    pub fn new(master: MasterKey, cache_capacity: usize, facts: VaultFacts) -> Result<Self, VaultError> {
        let rng = SystemRandom::new();
        let nonces = NonceSequence::new(&rng).map_err(|_| {
            VaultError::new(code::INTERNAL, "RANDOM_FAILED", "the system random source failed")
        })?;
        Ok(Self {
            master,
            cache: KeyCache::new(cache_capacity),
            nonces,
            rng,
            facts,
        })
    }

    /// Creates a merchant's data and fingerprint keys; only their wrapped blobs leave.
    pub fn create_keys(&self, request: &CreateKeysRequest) -> Result<CreateKeysResponse, VaultError> {
        if request.merchant_id.is_empty() || request.merchant_id.len() > 64 {
            return Err(VaultError::new(
                code::INVALID_ARGUMENT,
                "INVALID_MERCHANT_ID",
                "merchant_id must be 1 to 64 bytes",
            ));
        }
        if request.data_key_version == 0 || request.fingerprint_key_version == 0 {
            return Err(VaultError::new(
                code::INVALID_ARGUMENT,
                "INVALID_KEY_VERSION",
                "key versions start at 1",
            ));
        }
        let create = |purpose: KeyPurpose, proto: ProtoPurpose, version: u32| {
            let id = KeyId {
                merchant_id: request.merchant_id.clone(),
                purpose,
                version,
            };
            let blob = self.master.create_key(&id, &self.rng).map_err(|_| {
                VaultError::new(
                    code::INTERNAL,
                    "KEY_CREATION_FAILED",
                    "the key could not be created",
                )
            })?;
            Ok(WrappedKey {
                merchant_id: id.merchant_id,
                purpose: proto as i32,
                version,
                blob,
            })
        };
        let data_key = create(KeyPurpose::Data, ProtoPurpose::Data, request.data_key_version)?;
        let fingerprint_key = create(
            KeyPurpose::Fingerprint,
            ProtoPurpose::Fingerprint,
            request.fingerprint_key_version,
        )?;
        tracing::info!(merchant_id = %request.merchant_id, "created merchant keys");
        Ok(CreateKeysResponse {
            data_key: Some(data_key),
            fingerprint_key: Some(fingerprint_key),
        })
    }

    /// Validates, tokenizes, fingerprints and seals each item.
    pub fn protect(&self, request: &ProtectRequest) -> Result<ProtectResponse, VaultError> {
        check_batch(request.items.len())?;
        let mut random = TokenRandom::for_batch(&self.rng, request.items.len()).map_err(|_| {
            VaultError::new(code::INTERNAL, "RANDOM_FAILED", "the system random source failed")
        })?;
        let today = today_utc();
        let results = request
            .items
            .iter()
            .map(|item| {
                let result = match self.protect_item(&request.keys, item, &mut random, today) {
                    Ok(protected) => protect_result::Result::Protected(protected),
                    Err(error) => protect_result::Result::Error(error),
                };
                ProtectResult { result: Some(result) }
            })
            .collect();
        Ok(ProtectResponse { results })
    }

    fn protect_item(
        &self,
        keys: &[WrappedKey],
        item: &ProtectItem,
        random: &mut TokenRandom,
        today: (u32, u32),
    ) -> Result<Protected, ItemError> {
        let card = item
            .card
            .as_ref()
            .ok_or_else(|| ItemError::from(&CardError::MissingCard))?;
        let card = ValidCard::from_proto(card, today).map_err(|err| ItemError::from(&err))?;
        let data =
            newest_key(keys, &item.merchant_id, ProtoPurpose::Data).ok_or_else(|| missing_key("data"))?;
        let fingerprint = newest_key(keys, &item.merchant_id, ProtoPurpose::Fingerprint)
            .ok_or_else(|| missing_key("fingerprint"))?;
        let data_key = self
            .cache
            .data_key(&self.master, &key_id(data, KeyPurpose::Data), &data.blob)
            .map_err(|err| ItemError::from(&err))?;
        let fingerprint_key = self
            .cache
            .fingerprint_key(
                &self.master,
                &key_id(fingerprint, KeyPurpose::Fingerprint),
                &fingerprint.blob,
            )
            .map_err(|err| ItemError::from(&err))?;
        let token = match TokenFormat::try_from(item.format) {
            Ok(TokenFormat::FormatPreserving) => random.next_format_preserving(&card.pan),
            Ok(TokenFormat::Opaque | TokenFormat::Unspecified) => random.next_opaque(),
            Err(_) => {
                return Err(item_error(
                    code::INVALID_ARGUMENT,
                    "INVALID_FORMAT",
                    "unknown token format".into(),
                    "format",
                ))
            }
        }
        .map_err(|err| ItemError::from(&err))?;
        let aad = RecordAad {
            merchant_id: &item.merchant_id,
            token: &token,
            key_version: data.version,
        };
        let ciphertext =
            seal_card(&data_key, &self.nonces, &aad, &card).map_err(|err| ItemError::from(&err))?;
        let facts = card.facts();
        Ok(Protected {
            fingerprint: fingerprint_key.fingerprint(&card.pan).to_vec(),
            fingerprint_key_version: fingerprint.version,
            token,
            ciphertext,
            data_key_version: data.version,
            facts: Some(ProtoFacts {
                brand: facts.brand.as_str().to_owned(),
                first_six: facts.first_six,
                last_four: facts.last_four,
                expiry_month: facts.expiry.month,
                expiry_year: facts.expiry.year,
            }),
        })
    }

    /// Opens each record and returns its card data.
    pub fn reveal(&self, request: &RevealRequest) -> Result<RevealResponse, VaultError> {
        check_batch(request.items.len())?;
        let keys = index_keys(&request.keys);
        let results = request
            .items
            .iter()
            .map(|item| {
                let result = match self.reveal_item(&keys, item) {
                    Ok(card) => reveal_result::Result::Card(card),
                    Err(error) => reveal_result::Result::Error(error),
                };
                RevealResult { result: Some(result) }
            })
            .collect();
        Ok(RevealResponse { results })
    }

    fn reveal_item(
        &self,
        keys: &HashMap<(&str, i32, u32), &WrappedKey>,
        item: &RevealItem,
    ) -> Result<tessera_api::vault::Card, ItemError> {
        let wrapped = keys
            .get(&(
                item.merchant_id.as_str(),
                ProtoPurpose::Data as i32,
                item.data_key_version,
            ))
            .ok_or_else(|| missing_key("data"))?;
        let data_key = self
            .cache
            .data_key(&self.master, &key_id(wrapped, KeyPurpose::Data), &wrapped.blob)
            .map_err(|err| ItemError::from(&err))?;
        let aad = RecordAad {
            merchant_id: &item.merchant_id,
            token: &item.token,
            key_version: item.data_key_version,
        };
        open_card(&data_key, &aad, &item.ciphertext).map_err(|err| {
            tracing::warn!(merchant_id = %item.merchant_id, token = %item.token, "record failed its integrity check");
            ItemError::from(&err)
        })
    }

    /// The vault's key and hardening state, for operators.
    pub fn status(&self) -> StatusResponse {
        let hardening = &self.facts.hardening;
        StatusResponse {
            mode: self.facts.mode.as_str().to_owned(),
            master_key_source: self.facts.master_key_source.to_owned(),
            master_key_loaded: true,
            core_dumps_disabled: hardening.core_dumps_disabled,
            ptrace_attach_blocked: hardening.ptrace_attach_blocked,
            memory_locked: hardening.memory_locked,
            memory_lock_error: hardening.memory_lock_error.clone(),
            debug_build: is_debug_build(),
            cached_keys: u32::try_from(self.cache.len()).unwrap_or(u32::MAX),
            version: env!("CARGO_PKG_VERSION").to_owned(),
        }
    }
}

fn check_batch(items: usize) -> Result<(), VaultError> {
    if items > MAX_BATCH_ITEMS {
        return Err(VaultError::new(
            code::INVALID_ARGUMENT,
            "BATCH_TOO_LARGE",
            "a request carries at most 10000 items",
        ));
    }
    Ok(())
}

/// Shared handle used by the server.
pub type SharedVault = Arc<Vault>;
