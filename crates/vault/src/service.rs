//! The vault's operations over batches. The gRPC layer ([`crate::grpc`]) authenticates the
//! caller and hands each decoded request here; every item succeeds or fails on its own.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use ring::rand::SystemRandom;
use std::time::{Duration, Instant};

use tessera_api::data_checks::cvc_valid;
use tessera_api::vault::{
    protect_result, reveal_result, CreateKeysRequest, CreateKeysResponse, DataFacts, EchoRequest,
    EchoResponse, ItemError, KeyPurpose as ProtoPurpose, ProtectItem, ProtectRequest, ProtectResponse,
    ProtectResult, Protected, RevealItem, RevealRequest, RevealResponse, RevealResult, Revealed,
    StatusResponse, TokenFormat, WrappedKey,
};
use zeroize::Zeroizing;

use crate::card::today_utc;
use crate::config::Mode;
use crate::cvc::{CvcError, CvcStore};
use crate::hardening::{is_debug_build, HardeningReport};
use crate::keys::{KeyCache, KeyError, KeyId, KeyPurpose, MasterKey};
use crate::payload::{DataError, ValidData};
use crate::record::{open_data, seal_data, NonceSequence, RecordAad, RecordError};
use crate::token::{TokenError, TokenRandom};

/// Most items one request may carry; bounds the work and memory of a single call.
pub const MAX_BATCH_ITEMS: usize = 10_000;

/// gRPC status codes used for item and request errors (google.rpc.Code values).
pub mod code {
    pub const INVALID_ARGUMENT: i32 = 3;
    pub const FAILED_PRECONDITION: i32 = 9;
    pub const PERMISSION_DENIED: i32 = 7;
    pub const RESOURCE_EXHAUSTED: i32 = 8;
    pub const NOT_FOUND: i32 = 5;
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

/// Bounds of the vault's memory-held state.
#[derive(Debug, Clone, Copy)]
pub struct VaultLimits {
    /// Unwrapped merchant keys kept cached.
    pub key_cache_capacity: usize,
    /// How long a CVC is held before it is wiped unused.
    pub cvc_ttl: Duration,
    /// Most CVCs held at once.
    pub cvc_capacity: usize,
}

/// The vault: master key, key cache, CVC store, nonce sequence, random source.
pub struct Vault {
    master: MasterKey,
    cache: KeyCache,
    cvcs: CvcStore,
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

impl From<&DataError> for ItemError {
    fn from(err: &DataError) -> Self {
        item_error(code::INVALID_ARGUMENT, err.reason(), err.to_string(), err.field())
    }
}

impl From<&CvcError> for ItemError {
    fn from(err: &CvcError) -> Self {
        item_error(code::RESOURCE_EXHAUSTED, "CVC_STORE_FULL", err.to_string(), "cvc")
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
    pub fn new(master: MasterKey, limits: VaultLimits, facts: VaultFacts) -> Result<Self, VaultError> {
        let rng = SystemRandom::new();
        let nonces = NonceSequence::new(&rng).map_err(|_| {
            VaultError::new(code::INTERNAL, "RANDOM_FAILED", "the system random source failed")
        })?;
        Ok(Self {
            master,
            cache: KeyCache::new(limits.key_cache_capacity),
            cvcs: CvcStore::new(limits.cvc_ttl, limits.cvc_capacity),
            nonces,
            rng,
            facts,
        })
    }

    /// Wipes CVCs whose time ran out; the server calls this periodically.
    pub fn purge_expired_cvcs(&self) -> usize {
        self.cvcs.purge_expired(Instant::now())
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
        let cvc = Zeroizing::new(item.cvc.clone());
        if !cvc.is_empty() && !cvc_valid(&cvc) {
            return Err(item_error(
                code::INVALID_ARGUMENT,
                "INVALID_CVC",
                "cvc must be 3 or 4 digits".into(),
                "cvc",
            ));
        }
        let data = match &item.data {
            Some(data) => Some(ValidData::from_proto(data, today).map_err(|err| ItemError::from(&err))?),
            None if !cvc.is_empty() => None,
            None => return Err(ItemError::from(&DataError::Missing)),
        };
        let format = TokenFormat::try_from(item.format).map_err(|_| {
            item_error(
                code::INVALID_ARGUMENT,
                "INVALID_FORMAT",
                "unknown token format".into(),
                "format",
            )
        })?;
        let token = match (format, data.as_ref().and_then(ValidData::card)) {
            (TokenFormat::FormatPreserving, Some(card)) => random.next_format_preserving(&card.pan),
            (TokenFormat::FormatPreserving, None) => {
                return Err(item_error(
                    code::INVALID_ARGUMENT,
                    "INVALID_FORMAT",
                    "format-preserving tokens are only for cards".into(),
                    "format",
                ))
            }
            (TokenFormat::Opaque | TokenFormat::Unspecified, _) => random.next_opaque(),
        }
        .map_err(|err| ItemError::from(&err))?;
        let mut protected = match &data {
            Some(data) => self.seal_item(keys, &item.merchant_id, &token, data)?,
            // A CVC-only token: nothing is sealed or stored, the CVC lives in memory only.
            None => Protected {
                token: token.clone(),
                facts: Some(DataFacts {
                    data_type: "cvc".into(),
                    ..DataFacts::default()
                }),
                ..Protected::default()
            },
        };
        if !cvc.is_empty() {
            self.cvcs
                .put(&item.merchant_id, &token, cvc, Instant::now())
                .map_err(|err| ItemError::from(&err))?;
            protected.holds_cvc = true;
        }
        Ok(protected)
    }

    fn seal_item(
        &self,
        keys: &[WrappedKey],
        merchant_id: &str,
        token: &str,
        data: &ValidData,
    ) -> Result<Protected, ItemError> {
        let wrapped_data =
            newest_key(keys, merchant_id, ProtoPurpose::Data).ok_or_else(|| missing_key("data"))?;
        let wrapped_fingerprint = newest_key(keys, merchant_id, ProtoPurpose::Fingerprint)
            .ok_or_else(|| missing_key("fingerprint"))?;
        let data_key = self
            .cache
            .data_key(
                &self.master,
                &key_id(wrapped_data, KeyPurpose::Data),
                &wrapped_data.blob,
            )
            .map_err(|err| ItemError::from(&err))?;
        let fingerprint_key = self
            .cache
            .fingerprint_key(
                &self.master,
                &key_id(wrapped_fingerprint, KeyPurpose::Fingerprint),
                &wrapped_fingerprint.blob,
            )
            .map_err(|err| ItemError::from(&err))?;
        let aad = RecordAad {
            merchant_id,
            token,
            key_version: wrapped_data.version,
        };
        let ciphertext = seal_data(&data_key, &self.nonces, &aad, &data.to_proto())
            .map_err(|err| ItemError::from(&err))?;
        Ok(Protected {
            token: token.to_owned(),
            ciphertext,
            data_key_version: wrapped_data.version,
            fingerprint: data.fingerprint(&fingerprint_key).to_vec(),
            fingerprint_key_version: wrapped_fingerprint.version,
            facts: Some(data.facts()),
            holds_cvc: false,
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
                    Ok(revealed) => reveal_result::Result::Revealed(revealed),
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
    ) -> Result<Revealed, ItemError> {
        let data = if item.ciphertext.is_empty() {
            None
        } else {
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
            Some(open_data(&data_key, &aad, &item.ciphertext).map_err(|err| {
                tracing::warn!(merchant_id = %item.merchant_id, token = %item.token, "record failed its integrity check");
                ItemError::from(&err)
            })?)
        };
        // The CVC is taken only once the record opened: a failed reveal must not burn it.
        let cvc = if item.cvc_token.is_empty() {
            Zeroizing::new(String::new())
        } else {
            self.cvcs
                .take(&item.merchant_id, &item.cvc_token, Instant::now())
                .ok_or_else(|| {
                    item_error(
                        code::NOT_FOUND,
                        "CVC_UNAVAILABLE",
                        "no CVC is held for that token: it was used, expired, or never given".into(),
                        "cvc_token",
                    )
                })?
        };
        if data.is_none() && cvc.is_empty() {
            return Err(item_error(
                code::INVALID_ARGUMENT,
                "MISSING_FIELD",
                "nothing to reveal".into(),
                "ciphertext",
            ));
        }
        Ok(Revealed {
            data,
            cvc: cvc.as_str().to_owned(),
        })
    }

    /// Answers the floor benchmark's echo at once.
    pub fn echo(&self, request: &EchoRequest) -> EchoResponse {
        EchoResponse {
            payload: request.payload.clone(),
        }
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
            master_key_check_value: self.master.key_check_value(),
            held_cvcs: u32::try_from(self.cvcs.len()).unwrap_or(u32::MAX),
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
