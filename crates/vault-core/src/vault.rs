//! The vault's data operations over batches: creating merchant keys, protecting, revealing,
//! re-encrypting and re-wrapping. The vault process (`crates/vault/src/service.rs`)
//! authenticates the caller and hands each decoded request here; every item succeeds or fails
//! on its own, and every batch goes through one step ([`Vault::run_batch`]) that writes its
//! audit records before any result is handed out.
//!
//! No I/O here: the audit log is an [`AuditSink`] and the time comes from a [`Clock`].

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, PoisonError, RwLock};
use std::time::{Duration, Instant};

use tessera_api::data_checks::cvc_valid;
use tessera_api::vault::{
    protect_result, reencrypt_result, reveal_result, rewrap_result, CreateKeysRequest, CreateKeysResponse,
    DataFacts, EchoRequest, EchoResponse, ItemError, KeyPurpose as ProtoPurpose, ProtectItem, ProtectRequest,
    ProtectResponse, ProtectResult, Protected, ReencryptItem, ReencryptRequest, ReencryptResponse,
    ReencryptResult, Reencrypted, RevealItem, RevealRequest, RevealResponse, RevealResult, Revealed,
    RewrapKeysRequest, RewrapKeysResponse, RewrapResult, TokenFormat, WrappedKey,
};
use zeroize::Zeroizing;

use crate::audit::{AuditBatch, AuditSink};
use crate::card::year_month_utc;
use crate::crypto::Random;
use crate::cvc::{CvcError, CvcStore};
use crate::error::{code, VaultError};
use crate::keys::{DataKey, FingerprintKey, KeyCache, KeyError, KeyId, KeyPurpose, MasterKey};
use crate::payload::{DataError, ValidData};
use crate::record::{open_data, seal_data, NonceSequence, RecordAad, RecordError};
use crate::token::{TokenError, TokenRandom};

/// Most items one request may carry; bounds the work and memory of a single call.
pub const MAX_BATCH_ITEMS: usize = 10_000;

/// Longest reveal purpose recorded in the audit log.
const MAX_PURPOSE_BYTES: usize = 128;

/// Where the core gets the time: CVC lifetimes and card expiry. The vault process passes the
/// system clock.
pub trait Clock: Send + Sync + fmt::Debug {
    /// A monotonic instant, for CVC lifetimes.
    fn now(&self) -> Instant;
    /// Seconds since 1970-01-01 UTC, for card expiry.
    fn unix_seconds(&self) -> u64;
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

/// The keys of an unsealed vault: dropped (and wiped) as one on Seal. Its `Debug` shows the
/// keys' redacted forms only.
#[derive(Debug)]
pub struct Unsealed {
    /// Wraps and unwraps merchant keys.
    master: Arc<MasterKey>,
    /// Master keys a KEK rotation is retiring: they unwrap merchant keys not yet re-wrapped,
    /// never wrap. Empty outside a rotation.
    previous: Vec<Arc<MasterKey>>,
    cache: KeyCache,
}

impl Unsealed {
    /// The current master key: it wraps new keys and signs with the audit key derived from it.
    pub fn master(&self) -> &Arc<MasterKey> {
        &self.master
    }

    /// The master keys a KEK rotation is retiring (unwrap only).
    pub fn previous(&self) -> &[Arc<MasterKey>] {
        &self.previous
    }

    /// How many unwrapped merchant keys are cached.
    pub fn cached_keys(&self) -> usize {
        self.cache.len()
    }

    /// A merchant key from the cache or unwrapped (by `get`) with the current master key or,
    /// during a KEK rotation, a previous one.
    fn any_master<K>(&self, get: impl Fn(&MasterKey) -> Result<K, KeyError>) -> Result<K, KeyError> {
        match get(&self.master) {
            Err(err) if !self.previous.is_empty() => self
                .previous
                .iter()
                .find_map(|master| get(master).ok())
                .ok_or(err),
            other => other,
        }
    }

    fn data_key(&self, id: &KeyId, blob: &[u8]) -> Result<Arc<DataKey>, KeyError> {
        self.any_master(|master| self.cache.data_key(master, id, blob))
    }

    fn fingerprint_key(&self, id: &KeyId, blob: &[u8]) -> Result<Arc<FingerprintKey>, KeyError> {
        self.any_master(|master| self.cache.fingerprint_key(master, id, blob))
    }
}

/// The vault's data side: master key and key cache (while unsealed), CVC store, nonce sequence,
/// random source; the audit log and the clock come in from the process. Its `Debug` shows the
/// keys, CVCs and random source redacted.
#[derive(Debug)]
pub struct Vault {
    keys: RwLock<Option<Arc<Unsealed>>>,
    cvcs: CvcStore,
    nonces: NonceSequence,
    rng: Random,
    limits: VaultLimits,
    audit: Arc<dyn AuditSink>,
    clock: Arc<dyn Clock>,
}

fn item_error(code: i32, reason: &str, message: impl ToString, field: &str) -> ItemError {
    ItemError {
        code,
        reason: reason.to_owned(),
        message: message.to_string(),
        field: field.to_owned(),
    }
}

/// An item refused as bad input (INVALID_ARGUMENT) for `reason`, naming its `field`.
fn invalid(field: &str, reason: &str, message: impl ToString) -> ItemError {
    item_error(code::INVALID_ARGUMENT, reason, message, field)
}

/// An error of one item, as the `ItemError` of its response entry.
trait ToItemError {
    fn to_item_error(&self) -> ItemError;
}

impl ToItemError for DataError {
    fn to_item_error(&self) -> ItemError {
        invalid(self.field(), self.reason(), self)
    }
}

impl ToItemError for CvcError {
    fn to_item_error(&self) -> ItemError {
        item_error(code::RESOURCE_EXHAUSTED, "CVC_STORE_FULL", self, "cvc")
    }
}

impl ToItemError for KeyError {
    fn to_item_error(&self) -> ItemError {
        item_error(code::FAILED_PRECONDITION, self.reason(), self, "")
    }
}

impl ToItemError for RecordError {
    fn to_item_error(&self) -> ItemError {
        item_error(code::DATA_LOSS, self.reason(), self, "")
    }
}

impl ToItemError for TokenError {
    fn to_item_error(&self) -> ItemError {
        item_error(code::INTERNAL, "TOKEN_GENERATION_FAILED", self, "")
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
    /// A sealed vault (no keys until [`Self::install`]), with a fresh nonce sequence.
    pub fn new(
        audit: Arc<dyn AuditSink>,
        clock: Arc<dyn Clock>,
        limits: VaultLimits,
    ) -> Result<Self, VaultError> {
        let rng = Random::system();
        let nonces = NonceSequence::new(&rng).map_err(|_| VaultError::RandomFailed)?;
        Ok(Self {
            keys: RwLock::new(None),
            cvcs: CvcStore::new(limits.cvc_ttl, limits.cvc_capacity),
            nonces,
            rng,
            limits,
            audit,
            clock,
        })
    }

    /// The vault's secure random source.
    pub fn rng(&self) -> &Random {
        &self.rng
    }

    /// Wipes the master key and the key cache once the calls still using them end: the vault
    /// is sealed. Returns the keys that were loaded, if any.
    pub fn take_keys(&self) -> Option<Arc<Unsealed>> {
        self.keys.write().unwrap_or_else(PoisonError::into_inner).take()
    }

    /// Wipes CVCs whose time ran out; the server calls this periodically.
    pub fn purge_expired_cvcs(&self) -> usize {
        self.cvcs.purge_expired(self.clock.now())
    }

    /// Wipes every CVC held (on Seal). Returns how many.
    pub fn wipe_cvcs(&self) -> usize {
        // No clear() on the CVC store: purging as of a moment past the longest TTL wipes all.
        let now = self.clock.now();
        let far = now
            .checked_add(
                self.limits
                    .cvc_ttl
                    .saturating_mul(2)
                    .saturating_add(Duration::from_secs(1)),
            )
            .unwrap_or(now);
        self.cvcs.purge_expired(far)
    }

    /// How many CVCs are held now.
    pub fn held_cvcs(&self) -> usize {
        self.cvcs.len()
    }

    /// Makes `master` (with `previous` for unwrapping only) the vault's keys, with an empty key
    /// cache. Calls in flight finish with the keys they started with.
    pub fn install(&self, master: Arc<MasterKey>, previous: Vec<Arc<MasterKey>>) {
        *self.keys.write().unwrap_or_else(PoisonError::into_inner) = Some(Arc::new(Unsealed {
            master,
            previous,
            cache: KeyCache::new(self.limits.key_cache_capacity),
        }));
    }

    /// The loaded keys, or `VAULT_SEALED`.
    pub fn unsealed(&self) -> Result<Arc<Unsealed>, VaultError> {
        // The guarded value is one `Option` replaced whole; a panic cannot leave it torn.
        self.keys
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
            .ok_or(VaultError::Sealed)
    }

    /// The prologue of every card-data or key operation: unsealed, and the audit log writable.
    pub fn ready(&self) -> Result<Arc<Unsealed>, VaultError> {
        let keys = self.unsealed()?;
        self.audit.check().map_err(|_| VaultError::AuditUnavailable)?;
        Ok(keys)
    }

    /// Writes a call's audit records; on failure the call's result must not be handed out.
    pub fn commit(&self, batch: &AuditBatch) -> Result<(), VaultError> {
        self.audit.append(batch).map_err(|_| VaultError::AuditUnavailable)
    }

    /// The prologue of every batch operation: a bounded batch, then [`Self::ready`].
    fn ready_for_batch(&self, items: usize) -> Result<Arc<Unsealed>, VaultError> {
        if items > MAX_BATCH_ITEMS {
            return Err(VaultError::BatchTooLarge);
        }
        self.ready()
    }

    /// The one batch step of every batch operation: runs `work` on each item on its own,
    /// records one audit line per item with `record`, turns each outcome into its response
    /// entry with `entry`, and writes the call's audit lines. The results are handed out only
    /// once the audit log holds them.
    fn run_batch<Item, Done, Entry>(
        &self,
        caller: &str,
        items: &[Item],
        mut work: impl FnMut(&Item) -> Result<Done, ItemError>,
        mut record: impl FnMut(&mut AuditBatch, &Item, &Result<Done, ItemError>),
        entry: impl Fn(Result<Done, ItemError>) -> Entry,
    ) -> Result<Vec<Entry>, VaultError> {
        let mut batch = self.audit.batch(caller);
        let results = items
            .iter()
            .map(|item| {
                let outcome = work(item);
                record(&mut batch, item, &outcome);
                entry(outcome)
            })
            .collect();
        self.commit(&batch)?;
        Ok(results)
    }

    /// Creates a merchant's data and fingerprint keys; only their wrapped blobs leave.
    pub fn create_keys(
        &self,
        caller: &str,
        request: &CreateKeysRequest,
    ) -> Result<CreateKeysResponse, VaultError> {
        let keys = self.ready()?;
        if request.merchant_id.is_empty() || request.merchant_id.len() > 64 {
            return Err(VaultError::InvalidMerchantId);
        }
        // A fingerprint-key version of 0 asks for a data key alone (a data-key rotation keeps
        // the fingerprint key, so fingerprints stay comparable).
        if request.data_key_version == 0 {
            return Err(VaultError::InvalidKeyVersion);
        }
        let create = |purpose: KeyPurpose, proto: ProtoPurpose, version: u32| {
            let id = KeyId {
                merchant_id: request.merchant_id.clone(),
                purpose,
                version,
            };
            let blob = keys
                .master
                .create_key(&id, &self.rng)
                .map_err(|_| VaultError::KeyCreationFailed)?;
            Ok::<_, VaultError>(WrappedKey {
                merchant_id: id.merchant_id,
                purpose: proto as i32,
                version,
                blob,
            })
        };
        let data_key = create(KeyPurpose::Data, ProtoPurpose::Data, request.data_key_version)?;
        let fingerprint_key = match request.fingerprint_key_version {
            0 => None,
            version => Some(create(
                KeyPurpose::Fingerprint,
                ProtoPurpose::Fingerprint,
                version,
            )?),
        };
        let mut batch = self.audit.batch(caller);
        batch.record(
            "create-keys",
            "ok",
            &[
                ("merchant", &request.merchant_id),
                ("data_key_version", &request.data_key_version.to_string()),
                (
                    "fingerprint_key_version",
                    &fingerprint_key
                        .as_ref()
                        .map_or(String::new(), |key| key.version.to_string()),
                ),
            ],
        );
        self.commit(&batch)?;
        tracing::info!(merchant_id = %request.merchant_id, "created merchant keys");
        Ok(CreateKeysResponse {
            data_key: Some(data_key),
            fingerprint_key,
        })
    }

    /// Validates, tokenizes, fingerprints and seals each item.
    pub fn protect(&self, caller: &str, request: &ProtectRequest) -> Result<ProtectResponse, VaultError> {
        let keys = self.ready_for_batch(request.items.len())?;
        let mut random =
            TokenRandom::for_batch(&self.rng, request.items.len()).map_err(|_| VaultError::RandomFailed)?;
        let today = year_month_utc(self.clock.unix_seconds());
        let results = self.run_batch(
            caller,
            &request.items,
            |item| self.protect_item(&keys, &request.keys, item, &mut random, today),
            |batch, item, outcome| match outcome {
                Ok(protected) => {
                    let data = protected
                        .facts
                        .as_ref()
                        .map_or("", |facts| facts.data_type.as_str());
                    batch.record(
                        "protect",
                        "ok",
                        &[
                            ("merchant", &item.merchant_id),
                            ("token", &protected.token),
                            ("data", data),
                            ("cvc", if protected.holds_cvc { "held" } else { "" }),
                        ],
                    );
                }
                Err(error) => batch.record("protect", &error.reason, &[("merchant", &item.merchant_id)]),
            },
            |outcome| ProtectResult {
                result: Some(
                    outcome.map_or_else(protect_result::Result::Error, protect_result::Result::Protected),
                ),
            },
        )?;
        Ok(ProtectResponse { results })
    }

    fn protect_item(
        &self,
        unsealed: &Unsealed,
        keys: &[WrappedKey],
        item: &ProtectItem,
        random: &mut TokenRandom,
        today: (u32, u32),
    ) -> Result<Protected, ItemError> {
        let cvc = Zeroizing::new(item.cvc.clone());
        if !cvc.is_empty() && !cvc_valid(&cvc) {
            return Err(invalid("cvc", "INVALID_CVC", "cvc must be 3 or 4 digits"));
        }
        let data = match &item.data {
            Some(data) => Some(ValidData::from_proto(data, today).map_err(|err| err.to_item_error())?),
            None if !cvc.is_empty() => None,
            None => return Err(DataError::Missing.to_item_error()),
        };
        let format = TokenFormat::try_from(item.format)
            .map_err(|_| invalid("format", "INVALID_FORMAT", "unknown token format"))?;
        let token = match (format, data.as_ref().and_then(ValidData::card)) {
            (TokenFormat::FormatPreserving, Some(card)) => random.next_format_preserving(&card.pan),
            (TokenFormat::FormatPreserving, None) => {
                return Err(invalid(
                    "format",
                    "INVALID_FORMAT",
                    "format-preserving tokens are only for cards",
                ))
            }
            (TokenFormat::Opaque | TokenFormat::Unspecified, _) => random.next_opaque(),
        }
        .map_err(|err| err.to_item_error())?;
        let mut protected = match &data {
            Some(data) => self.seal_item(unsealed, keys, &item.merchant_id, &token, data)?,
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
                .put(&item.merchant_id, &token, cvc, self.clock.now())
                .map_err(|err| err.to_item_error())?;
            protected.holds_cvc = true;
        }
        Ok(protected)
    }

    fn seal_item(
        &self,
        unsealed: &Unsealed,
        keys: &[WrappedKey],
        merchant_id: &str,
        token: &str,
        data: &ValidData,
    ) -> Result<Protected, ItemError> {
        let wrapped_data =
            newest_key(keys, merchant_id, ProtoPurpose::Data).ok_or_else(|| missing_key("data"))?;
        let wrapped_fingerprint = newest_key(keys, merchant_id, ProtoPurpose::Fingerprint)
            .ok_or_else(|| missing_key("fingerprint"))?;
        let data_key = unsealed
            .data_key(&key_id(wrapped_data, KeyPurpose::Data), &wrapped_data.blob)
            .map_err(|err| err.to_item_error())?;
        let fingerprint_key = unsealed
            .fingerprint_key(
                &key_id(wrapped_fingerprint, KeyPurpose::Fingerprint),
                &wrapped_fingerprint.blob,
            )
            .map_err(|err| err.to_item_error())?;
        let aad = RecordAad {
            merchant_id,
            token,
            key_version: wrapped_data.version,
        };
        let ciphertext =
            seal_data(&data_key, &self.nonces, &aad, &data.to_proto()).map_err(|err| err.to_item_error())?;
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
    pub fn reveal(&self, caller: &str, request: &RevealRequest) -> Result<RevealResponse, VaultError> {
        let unsealed = self.ready_for_batch(request.items.len())?;
        let keys = index_keys(&request.keys);
        let results = self.run_batch(
            caller,
            &request.items,
            |item| self.reveal_item(&unsealed, &keys, item),
            |batch, item, outcome| {
                let (result, cvc) = match outcome {
                    Ok(revealed) => ("ok", if revealed.cvc.is_empty() { "" } else { "revealed" }),
                    Err(error) => (error.reason.as_str(), ""),
                };
                let version = if item.ciphertext.is_empty() {
                    String::new()
                } else {
                    item.data_key_version.to_string()
                };
                batch.record(
                    "reveal",
                    result,
                    &[
                        ("merchant", &item.merchant_id),
                        ("token", &item.token),
                        ("cvc_token", &item.cvc_token),
                        ("data_key_version", &version),
                        ("cvc", cvc),
                        ("purpose", &item.purpose),
                    ],
                );
            },
            |outcome| RevealResult {
                result: Some(
                    outcome.map_or_else(reveal_result::Result::Error, reveal_result::Result::Revealed),
                ),
            },
        )?;
        Ok(RevealResponse { results })
    }

    fn reveal_item(
        &self,
        unsealed: &Unsealed,
        keys: &HashMap<(&str, i32, u32), &WrappedKey>,
        item: &RevealItem,
    ) -> Result<Revealed, ItemError> {
        if item.purpose.len() > MAX_PURPOSE_BYTES {
            return Err(invalid(
                "purpose",
                "INVALID_PURPOSE",
                format!("purpose is at most {MAX_PURPOSE_BYTES} bytes"),
            ));
        }
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
            let data_key = unsealed
                .data_key(&key_id(wrapped, KeyPurpose::Data), &wrapped.blob)
                .map_err(|err| err.to_item_error())?;
            let aad = RecordAad {
                merchant_id: &item.merchant_id,
                token: &item.token,
                key_version: item.data_key_version,
            };
            Some(open_data(&data_key, &aad, &item.ciphertext).map_err(|err| {
                tracing::warn!(merchant_id = %item.merchant_id, token = %item.token, "record failed its integrity check");
                err.to_item_error()
            })?)
        };
        // The CVC is taken only once the record opened: a failed reveal must not burn it.
        let cvc = if item.cvc_token.is_empty() {
            Zeroizing::new(String::new())
        } else {
            self.cvcs
                .take(&item.merchant_id, &item.cvc_token, self.clock.now())
                .ok_or_else(|| {
                    item_error(
                        code::NOT_FOUND,
                        "CVC_UNAVAILABLE",
                        "no CVC is held for that token: it was used, expired, or never given",
                        "cvc_token",
                    )
                })?
        };
        if data.is_none() && cvc.is_empty() {
            return Err(invalid("ciphertext", "MISSING_FIELD", "nothing to reveal"));
        }
        Ok(Revealed {
            data,
            cvc: cvc.as_str().to_owned(),
        })
    }

    /// Key rotation: opens each record under its old data key and seals it under the new one.
    /// One audit record per item names merchant, token and both versions.
    pub fn reencrypt(
        &self,
        caller: &str,
        request: &ReencryptRequest,
    ) -> Result<ReencryptResponse, VaultError> {
        let unsealed = self.ready_for_batch(request.items.len())?;
        let keys = index_keys(&request.keys);
        let results = self.run_batch(
            caller,
            &request.items,
            |item| self.reencrypt_item(&unsealed, &keys, item),
            |batch, item, outcome| {
                let result = match outcome {
                    Ok(_) => "ok",
                    Err(error) => error.reason.as_str(),
                };
                batch.record(
                    "reencrypt",
                    result,
                    &[
                        ("merchant", &item.merchant_id),
                        ("token", &item.token),
                        ("from_version", &item.from_version.to_string()),
                        ("to_version", &item.to_version.to_string()),
                    ],
                );
            },
            |outcome| ReencryptResult {
                result: Some(outcome.map_or_else(
                    reencrypt_result::Result::Error,
                    reencrypt_result::Result::Reencrypted,
                )),
            },
        )?;
        Ok(ReencryptResponse { results })
    }

    fn reencrypt_item(
        &self,
        unsealed: &Unsealed,
        keys: &HashMap<(&str, i32, u32), &WrappedKey>,
        item: &ReencryptItem,
    ) -> Result<Reencrypted, ItemError> {
        if item.to_version <= item.from_version {
            return Err(invalid(
                "to_version",
                "INVALID_KEY_VERSION",
                "a record is re-encrypted only to a newer key version",
            ));
        }
        let wrapped = |version: u32| {
            keys.get(&(item.merchant_id.as_str(), ProtoPurpose::Data as i32, version))
                .copied()
                .ok_or_else(|| missing_key("data"))
        };
        let (old, new) = (wrapped(item.from_version)?, wrapped(item.to_version)?);
        let old_key = unsealed
            .data_key(&key_id(old, KeyPurpose::Data), &old.blob)
            .map_err(|err| err.to_item_error())?;
        let new_key = unsealed
            .data_key(&key_id(new, KeyPurpose::Data), &new.blob)
            .map_err(|err| err.to_item_error())?;
        let old_aad = RecordAad {
            merchant_id: &item.merchant_id,
            token: &item.token,
            key_version: item.from_version,
        };
        let data = open_data(&old_key, &old_aad, &item.ciphertext).map_err(|err| {
            tracing::warn!(merchant_id = %item.merchant_id, token = %item.token, "record failed its integrity check during re-encryption");
            err.to_item_error()
        })?;
        let new_aad = RecordAad {
            key_version: item.to_version,
            ..old_aad
        };
        let ciphertext =
            seal_data(&new_key, &self.nonces, &new_aad, &data).map_err(|err| err.to_item_error())?;
        Ok(Reencrypted {
            ciphertext,
            data_key_version: item.to_version,
        })
    }

    /// KEK rotation: unwraps each key with any master key held (current first) and wraps it
    /// with the current one. One audit record per key names it and both master key check values.
    pub fn rewrap_keys(
        &self,
        caller: &str,
        request: &RewrapKeysRequest,
    ) -> Result<RewrapKeysResponse, VaultError> {
        let unsealed = self.ready_for_batch(request.keys.len())?;
        let current = unsealed.master.key_check_value();
        let results = self.run_batch(
            caller,
            &request.keys,
            |wrapped| self.rewrap_key(&unsealed, wrapped),
            |batch, wrapped, outcome| {
                let (result, from) = match outcome {
                    Ok((_, from)) => ("ok", from.as_str()),
                    Err(error) => (error.reason.as_str(), ""),
                };
                let purpose = match ProtoPurpose::try_from(wrapped.purpose) {
                    Ok(ProtoPurpose::Data) => "data",
                    Ok(ProtoPurpose::Fingerprint) => "fingerprint",
                    _ => "",
                };
                batch.record(
                    "rewrap-key",
                    result,
                    &[
                        ("merchant", &wrapped.merchant_id),
                        ("purpose", purpose),
                        ("version", &wrapped.version.to_string()),
                        ("from_kcv", from),
                        ("to_kcv", &current),
                    ],
                );
            },
            |outcome| RewrapResult {
                result: Some(outcome.map_or_else(rewrap_result::Result::Error, |(key, _)| {
                    rewrap_result::Result::Key(key)
                })),
            },
        )?;
        Ok(RewrapKeysResponse {
            results,
            master_key_check_value: current,
        })
    }

    fn rewrap_key(
        &self,
        unsealed: &Unsealed,
        wrapped: &WrappedKey,
    ) -> Result<(WrappedKey, String), ItemError> {
        let purpose = match ProtoPurpose::try_from(wrapped.purpose) {
            Ok(ProtoPurpose::Data) => KeyPurpose::Data,
            Ok(ProtoPurpose::Fingerprint) => KeyPurpose::Fingerprint,
            _ => {
                return Err(invalid(
                    "purpose",
                    "INVALID_KEY_PURPOSE",
                    "the key's purpose must be data or fingerprint",
                ))
            }
        };
        let id = key_id(wrapped, purpose);
        let (key, from) = std::iter::once(&unsealed.master)
            .chain(&unsealed.previous)
            .find_map(|master| {
                master
                    .unwrap(&id, &wrapped.blob)
                    .ok()
                    .map(|key| (key, master.key_check_value()))
            })
            .ok_or_else(|| {
                item_error(
                    code::FAILED_PRECONDITION,
                    "KEY_UNWRAP_FAILED",
                    "no master key this vault holds unwraps this key",
                    "",
                )
            })?;
        let blob = unsealed
            .master
            .wrap(&id, &key, &self.rng)
            .map_err(|err| err.to_item_error())?;
        Ok((
            WrappedKey {
                merchant_id: wrapped.merchant_id.clone(),
                purpose: wrapped.purpose,
                version: wrapped.version,
                blob,
            },
            from,
        ))
    }

    /// Answers the floor benchmark's echo at once (refused while sealed, like every data call).
    pub fn echo(&self, request: &EchoRequest) -> Result<EchoResponse, VaultError> {
        self.unsealed()?;
        Ok(EchoResponse {
            payload: request.payload.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::panic,
        clippy::indexing_slicing
    )]

    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Mutex;

    use tessera_api::vault::{secret_data, Card, SecretData};

    use super::*;
    use crate::audit::AuditUnavailable;
    use crate::keys::SecretKey;

    /// An audit sink that keeps the lines in memory and can be made to fail, like the log file
    /// after a write error.
    #[derive(Debug, Default)]
    struct MemorySink {
        lines: Mutex<Vec<String>>,
        broken: AtomicBool,
    }

    impl AuditSink for MemorySink {
        fn check(&self) -> Result<(), AuditUnavailable> {
            if self.broken.load(Ordering::SeqCst) {
                Err(AuditUnavailable)
            } else {
                Ok(())
            }
        }

        fn batch(&self, caller: &str) -> AuditBatch {
            AuditBatch::new(true, format!("record caller={caller}"))
        }

        fn append(&self, batch: &AuditBatch) -> Result<(), AuditUnavailable> {
            self.check()?;
            let mut lines = self.lines.lock().unwrap();
            lines.extend(batch.lines().map(str::to_owned));
            Ok(())
        }
    }

    /// 2025-06-15, fixed.
    #[derive(Debug)]
    struct FixedClock(Instant);

    impl Clock for FixedClock {
        fn now(&self) -> Instant {
            self.0
        }

        fn unix_seconds(&self) -> u64 {
            1_749_945_600
        }
    }

    const PAN: &str = "4111111111111111";

    fn item(number: &str, cvc: &str) -> ProtectItem {
        ProtectItem {
            merchant_id: "m1".into(),
            data: Some(SecretData {
                data: Some(secret_data::Data::Card(Card {
                    number: number.into(),
                    expiry_month: 12,
                    expiry_year: 2027,
                    holder_name: "Ada Lovelace".into(),
                })),
            }),
            format: TokenFormat::Opaque as i32,
            cvc: cvc.into(),
        }
    }

    #[test]
    fn a_batch_is_audited_item_by_item_and_refused_while_the_log_is_down() {
        let sink = Arc::new(MemorySink::default());
        let limits = VaultLimits {
            key_cache_capacity: 8,
            cvc_ttl: Duration::from_secs(60),
            cvc_capacity: 8,
        };
        let vault = Vault::new(sink.clone(), Arc::new(FixedClock(Instant::now())), limits).unwrap();
        let request = CreateKeysRequest {
            merchant_id: "m1".into(),
            data_key_version: 1,
            fingerprint_key_version: 1,
        };
        assert_eq!(vault.create_keys("gw", &request).unwrap_err(), VaultError::Sealed);

        let master = MasterKey::new(SecretKey::generate(vault.rng()).unwrap());
        vault.install(Arc::new(master), Vec::new());
        let created = vault.create_keys("gw", &request).unwrap();
        let keys: Vec<WrappedKey> = [created.data_key, created.fingerprint_key]
            .into_iter()
            .flatten()
            .collect();
        let protect = ProtectRequest {
            keys: keys.clone(),
            items: vec![item(PAN, "123"), item("4111111111111112", "")],
        };
        let response = vault.protect("gw", &protect).unwrap();
        let [ok, refused] = &response.results[..] else {
            panic!("two results: {response:?}")
        };
        let Some(protect_result::Result::Protected(protected)) = &ok.result else {
            panic!("{ok:?}")
        };
        let Some(protect_result::Result::Error(error)) = &refused.result else {
            panic!("{refused:?}")
        };
        assert_eq!(
            (error.code, error.field.as_str()),
            (code::INVALID_ARGUMENT, "card.number")
        );
        assert_eq!(vault.held_cvcs(), 1);

        // One line per key creation and per item, each with its outcome; no card data.
        let lines = sink.lines.lock().unwrap().clone();
        assert_eq!(lines.len(), 3, "{lines:?}");
        assert!(lines[0].contains("event=create-keys result=ok merchant=m1"));
        assert!(lines[1].contains(&format!(
            "event=protect result=ok merchant=m1 token={}",
            protected.token
        )));
        assert!(lines[1].ends_with("cvc=held"));
        assert!(lines[2].contains(&format!("event=protect result={}", error.reason)));
        assert!(lines
            .iter()
            .all(|line| !line.contains(PAN) && !line.contains("123 ")));
        assert!(!format!("{vault:?}").contains(PAN));

        // The record opens for the same merchant and token, with the CVC once.
        let reveal = RevealRequest {
            keys: keys.clone(),
            items: vec![RevealItem {
                merchant_id: "m1".into(),
                token: protected.token.clone(),
                data_key_version: protected.data_key_version,
                ciphertext: protected.ciphertext.clone(),
                cvc_token: protected.token.clone(),
                purpose: "capture".into(),
            }],
        };
        let revealed = vault.reveal("gw", &reveal).unwrap();
        let Some(reveal_result::Result::Revealed(revealed)) = &revealed.results[0].result else {
            panic!("{revealed:?}")
        };
        assert_eq!(revealed.cvc, "123");

        // A log that cannot be written refuses the call before any work.
        sink.broken.store(true, Ordering::SeqCst);
        assert_eq!(
            vault.protect("gw", &protect).unwrap_err(),
            VaultError::AuditUnavailable
        );
        assert_eq!(vault.held_cvcs(), 0, "nothing was held for the refused call");
        assert_eq!(sink.lines.lock().unwrap().len(), 4);
    }
}
