//! The vault's operations over batches. The gRPC layer ([`crate::grpc`]) authenticates the
//! caller and hands each decoded request here; every item succeeds or fails on its own.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, PoisonError, RwLock};

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tessera_api::data_checks::cvc_valid;
use tessera_api::vault::{
    protect_result, reencrypt_result, reveal_result, rewrap_result, CreateKeysRequest, CreateKeysResponse,
    DataFacts, EchoRequest, EchoResponse, InitRequest, InitResponse, ItemError, KeyPurpose as ProtoPurpose,
    ProtectItem, ProtectRequest, ProtectResponse, ProtectResult, Protected, ReencryptItem, ReencryptRequest,
    ReencryptResponse, ReencryptResult, Reencrypted, RekeyRequest, RekeyResponse, RetireMasterKeysResponse,
    RevealItem, RevealRequest, RevealResponse, RevealResult, Revealed, RewrapKeysRequest, RewrapKeysResponse,
    RewrapResult, SealResponse, StatusResponse, TokenFormat, UnsealRequest, UnsealResponse, WrappedKey,
};
use zeroize::Zeroizing;

use tessera_vault_core::audit_key::AuditSigner;
use tessera_vault_core::card::year_month_utc;
use tessera_vault_core::crypto::Random;
use tessera_vault_core::cvc::{CvcError, CvcStore};
use tessera_vault_core::error::code;
pub use tessera_vault_core::error::VaultError;
use tessera_vault_core::keys::{DataKey, FingerprintKey, KeyCache, KeyError, KeyId, KeyPurpose, MasterKey};
use tessera_vault_core::payload::{DataError, ValidData};
use tessera_vault_core::record::{open_data, seal_data, NonceSequence, RecordAad, RecordError};
use tessera_vault_core::token::{TokenError, TokenRandom};

use crate::audit::{AuditBatch, AuditLog};
use crate::config::Mode;
use crate::hardening::{is_debug_build, HardeningReport};
use crate::sealing::{SealError, SealedStart, Submitted};

/// Most items one request may carry; bounds the work and memory of a single call.
pub const MAX_BATCH_ITEMS: usize = 10_000;

/// Longest reveal purpose recorded in the audit log.
const MAX_PURPOSE_BYTES: usize = 128;

/// The audit log's caller for what the vault does on its own (start, stop). Client identities
/// are URIs, so this name cannot be confused with one.
const SELF: &str = "vault";

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

/// Where the master key comes from at start.
#[derive(Debug)]
pub enum KeySource {
    /// Already loaded (the development key file), with any previous master keys a KEK
    /// rotation is retiring (unwrap only).
    Loaded {
        master: MasterKey,
        previous: Vec<MasterKey>,
    },
    /// Sealed start: nothing is loaded until custodians unseal with key shares.
    Sealed(SealedStart),
}

/// The keys of an unsealed vault: dropped (and wiped) as one on Seal.
struct Unsealed {
    /// Wraps and unwraps merchant keys.
    master: Arc<MasterKey>,
    /// Master keys a KEK rotation is retiring: they unwrap merchant keys not yet re-wrapped,
    /// never wrap. Empty outside a rotation.
    previous: Vec<Arc<MasterKey>>,
    cache: KeyCache,
}

impl Unsealed {
    fn new(master: Arc<MasterKey>, previous: Vec<Arc<MasterKey>>, capacity: usize) -> Arc<Self> {
        Arc::new(Unsealed {
            master,
            previous,
            cache: KeyCache::new(capacity),
        })
    }
}

/// The vault: master key and key cache (while unsealed), CVC store, nonce sequence, random
/// source, audit log.
pub struct Vault {
    keys: RwLock<Option<Arc<Unsealed>>>,
    sealed_start: Option<SealedStart>,
    cvcs: CvcStore,
    nonces: NonceSequence,
    rng: Random,
    facts: VaultFacts,
    limits: VaultLimits,
    audit: AuditLog,
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

/// An error of one item, as the `ItemError` of its response entry.
trait ToItemError {
    fn to_item_error(&self) -> ItemError;
}

impl ToItemError for DataError {
    fn to_item_error(&self) -> ItemError {
        item_error(
            code::INVALID_ARGUMENT,
            self.reason(),
            self.to_string(),
            self.field(),
        )
    }
}

impl ToItemError for CvcError {
    fn to_item_error(&self) -> ItemError {
        item_error(
            code::RESOURCE_EXHAUSTED,
            "CVC_STORE_FULL",
            self.to_string(),
            "cvc",
        )
    }
}

impl ToItemError for KeyError {
    fn to_item_error(&self) -> ItemError {
        item_error(code::FAILED_PRECONDITION, self.reason(), self.to_string(), "")
    }
}

impl ToItemError for RecordError {
    fn to_item_error(&self) -> ItemError {
        item_error(code::DATA_LOSS, self.reason(), self.to_string(), "")
    }
}

impl ToItemError for TokenError {
    fn to_item_error(&self) -> ItemError {
        item_error(code::INTERNAL, "TOKEN_GENERATION_FAILED", self.to_string(), "")
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

/// The audit public key (hex) that `master` derives, for the seal state file.
fn audit_public_key_of(master: &MasterKey) -> Result<String, SealError> {
    signer_for(master)
        .map(|signer| signer.public_key_hex().to_owned())
        .map_err(|_| SealError::Random)
}

fn signer_for(master: &MasterKey) -> Result<Arc<AuditSigner>, VaultError> {
    AuditSigner::from_master(master)
        .map(Arc::new)
        .map_err(|_| VaultError::AuditKeyFailed)
}

impl Vault {
    pub fn new(
        source: KeySource,
        audit: AuditLog,
        limits: VaultLimits,
        facts: VaultFacts,
    ) -> Result<Self, VaultError> {
        let rng = Random::system();
        let nonces = NonceSequence::new(&rng).map_err(|_| VaultError::RandomFailed)?;
        let (keys, sealed_start) = match source {
            KeySource::Loaded { master, previous } => {
                audit.set_signer(Some(signer_for(&master)?));
                let previous = previous.into_iter().map(Arc::new).collect();
                let keys = Unsealed::new(Arc::new(master), previous, limits.key_cache_capacity);
                (Some(keys), None)
            }
            KeySource::Sealed(sealed) => (None, Some(sealed)),
        };
        Ok(Self {
            keys: RwLock::new(keys),
            sealed_start,
            cvcs: CvcStore::new(limits.cvc_ttl, limits.cvc_capacity),
            nonces,
            rng,
            facts,
            limits,
            audit,
        })
    }

    /// A data key, from the cache or unwrapped with the current master key or, during a KEK
    /// rotation, a previous one.
    fn data_key(&self, unsealed: &Unsealed, id: &KeyId, blob: &[u8]) -> Result<Arc<DataKey>, KeyError> {
        match unsealed.cache.data_key(&unsealed.master, id, blob) {
            Err(err) if !unsealed.previous.is_empty() => unsealed
                .previous
                .iter()
                .find_map(|master| unsealed.cache.data_key(master, id, blob).ok())
                .ok_or(err),
            other => other,
        }
    }

    /// A fingerprint key, like [`Self::data_key`].
    fn fingerprint_key(
        &self,
        unsealed: &Unsealed,
        id: &KeyId,
        blob: &[u8],
    ) -> Result<Arc<FingerprintKey>, KeyError> {
        match unsealed.cache.fingerprint_key(&unsealed.master, id, blob) {
            Err(err) if !unsealed.previous.is_empty() => unsealed
                .previous
                .iter()
                .find_map(|master| unsealed.cache.fingerprint_key(master, id, blob).ok())
                .ok_or(err),
            other => other,
        }
    }

    /// Makes `master` (with `previous` for unwrapping only) the vault's keys, with an empty key
    /// cache. Calls in flight finish with the keys they started with.
    fn install(&self, master: Arc<MasterKey>, previous: Vec<Arc<MasterKey>>) {
        *self.keys.write().unwrap_or_else(PoisonError::into_inner) =
            Some(Unsealed::new(master, previous, self.limits.key_cache_capacity));
    }

    /// The loaded keys, or `VAULT_SEALED`.
    fn unsealed(&self) -> Result<Arc<Unsealed>, VaultError> {
        // The guarded value is one `Option` replaced whole; a panic cannot leave it torn.
        self.keys
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
            .ok_or(VaultError::Sealed)
    }

    /// The prologue of every card-data or key operation: unsealed, and the audit log writable.
    fn ready(&self) -> Result<Arc<Unsealed>, VaultError> {
        let keys = self.unsealed()?;
        self.audit.check().map_err(|_| VaultError::AuditUnavailable)?;
        Ok(keys)
    }

    /// Writes a call's audit records; on failure the call's result must not be handed out.
    fn commit(&self, batch: &AuditBatch) -> Result<(), VaultError> {
        self.audit.append(batch).map_err(|_| VaultError::AuditUnavailable)
    }

    /// The prologue of every batch operation: a bounded batch, then [`Self::ready`].
    fn ready_for_batch(&self, items: usize) -> Result<Arc<Unsealed>, VaultError> {
        check_batch(items)?;
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

    /// The first audit record of a run: how the vault started and how the last run left the log.
    pub fn record_start(&self, prior_log: &str) {
        let mut batch = self.audit.batch(SELF);
        batch.record(
            "vault-start",
            "ok",
            &[
                ("mode", self.facts.mode.as_str()),
                ("master_key_source", self.facts.master_key_source),
                ("version", env!("CARGO_PKG_VERSION")),
                ("prior_log", prior_log),
            ],
        );
        let _ = self.audit.append(&batch);
    }

    /// The last audit record of a run, and the shutdown seal.
    pub fn record_stop(&self) {
        let mut batch = self.audit.batch(SELF);
        batch.record("vault-stop", "ok", &[]);
        let _ = self.audit.append(&batch);
        self.audit.finish();
    }

    /// A call refused before it reached an operation (identity or role not allowed).
    pub fn record_refusal(&self, caller: &str, method: &str, reason: &str) {
        let mut batch = self.audit.batch(caller);
        batch.record("refused", reason, &[("method", method)]);
        let _ = self.audit.append(&batch);
    }

    /// Seals a block if anything is unsigned and flushes the audit log to disk.
    pub fn audit_tick(&self) {
        self.audit.tick();
    }

    /// Wipes CVCs whose time ran out; the server calls this periodically.
    pub fn purge_expired_cvcs(&self) -> usize {
        self.cvcs.purge_expired(Instant::now())
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
        let today = today_utc();
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
                result: Some(match outcome {
                    Ok(protected) => protect_result::Result::Protected(protected),
                    Err(error) => protect_result::Result::Error(error),
                }),
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
            return Err(item_error(
                code::INVALID_ARGUMENT,
                "INVALID_CVC",
                "cvc must be 3 or 4 digits".into(),
                "cvc",
            ));
        }
        let data = match &item.data {
            Some(data) => Some(ValidData::from_proto(data, today).map_err(|err| err.to_item_error())?),
            None if !cvc.is_empty() => None,
            None => return Err(DataError::Missing.to_item_error()),
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
                .put(&item.merchant_id, &token, cvc, Instant::now())
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
        let data_key = self
            .data_key(
                unsealed,
                &key_id(wrapped_data, KeyPurpose::Data),
                &wrapped_data.blob,
            )
            .map_err(|err| err.to_item_error())?;
        let fingerprint_key = self
            .fingerprint_key(
                unsealed,
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
                result: Some(match outcome {
                    Ok(revealed) => reveal_result::Result::Revealed(revealed),
                    Err(error) => reveal_result::Result::Error(error),
                }),
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
            return Err(item_error(
                code::INVALID_ARGUMENT,
                "INVALID_PURPOSE",
                format!("purpose is at most {MAX_PURPOSE_BYTES} bytes"),
                "purpose",
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
            let data_key = self
                .data_key(unsealed, &key_id(wrapped, KeyPurpose::Data), &wrapped.blob)
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
                result: Some(match outcome {
                    Ok(reencrypted) => reencrypt_result::Result::Reencrypted(reencrypted),
                    Err(error) => reencrypt_result::Result::Error(error),
                }),
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
            return Err(item_error(
                code::INVALID_ARGUMENT,
                "INVALID_KEY_VERSION",
                "a record is re-encrypted only to a newer key version".into(),
                "to_version",
            ));
        }
        let wrapped = |version: u32| {
            keys.get(&(item.merchant_id.as_str(), ProtoPurpose::Data as i32, version))
                .copied()
                .ok_or_else(|| missing_key("data"))
        };
        let (old, new) = (wrapped(item.from_version)?, wrapped(item.to_version)?);
        let old_key = self
            .data_key(unsealed, &key_id(old, KeyPurpose::Data), &old.blob)
            .map_err(|err| err.to_item_error())?;
        let new_key = self
            .data_key(unsealed, &key_id(new, KeyPurpose::Data), &new.blob)
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
                result: Some(match outcome {
                    Ok((key, _)) => rewrap_result::Result::Key(key),
                    Err(error) => rewrap_result::Result::Error(error),
                }),
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
                return Err(item_error(
                    code::INVALID_ARGUMENT,
                    "INVALID_KEY_PURPOSE",
                    "the key's purpose must be data or fingerprint".into(),
                    "purpose",
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
                    "no master key this vault holds unwraps this key".into(),
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

    fn sealed_start(&self) -> Result<&SealedStart, VaultError> {
        self.sealed_start.as_ref().ok_or(VaultError::NotASealedVault)
    }

    /// Creates the master key of a sealed vault and returns its shares, once. The vault stays
    /// sealed: custodians unseal it with their shares, proving they work before any data is
    /// encrypted under the key.
    pub fn init(&self, caller: &str, request: &InitRequest) -> Result<InitResponse, VaultError> {
        let sealed = self.sealed_start()?;
        self.audit.check().map_err(|_| VaultError::AuditUnavailable)?;
        let outcome = sealed.initialize(request.shares, request.threshold, &self.rng, audit_public_key_of);
        let mut batch = self.audit.batch(caller);
        let shares = request.shares.to_string();
        let threshold = request.threshold.to_string();
        match outcome {
            Ok(initialized) => {
                batch.record(
                    "init",
                    "ok",
                    &[
                        ("shares", &shares),
                        ("threshold", &threshold),
                        ("kcv", &initialized.state.key_check_value),
                    ],
                );
                // The key now exists only in these shares: hand them out even if the audit log
                // failed just now (it is then unavailable and refuses every card-data call).
                if self.commit(&batch).is_err() {
                    tracing::error!("the init record could not be written to the audit log");
                }
                tracing::info!(
                    key_check_value = %initialized.state.key_check_value,
                    shares = request.shares,
                    threshold = request.threshold,
                    "sealed vault initialised; shares handed out once, master key wiped"
                );
                Ok(InitResponse {
                    shares: initialized
                        .shares
                        .iter()
                        .map(|share| share.as_str().to_owned())
                        .collect(),
                    key_check_value: initialized.state.key_check_value.clone(),
                    threshold: initialized.state.threshold,
                    audit_public_key: initialized.state.audit_public_key.clone(),
                })
            }
            Err(err) => {
                if let SealError::State(why) = &err {
                    tracing::error!(%why, "sealed vault init failed");
                }
                batch.record(
                    "init",
                    err.reason(),
                    &[("shares", &shares), ("threshold", &threshold)],
                );
                let _ = self.commit(&batch);
                Err(VaultError::Seal(err))
            }
        }
    }

    /// Takes one custodian's share; unseals when the threshold is reached.
    pub fn unseal(&self, caller: &str, request: &UnsealRequest) -> Result<UnsealResponse, VaultError> {
        let sealed = self.sealed_start()?;
        if self.unsealed().is_ok() {
            return Err(VaultError::Seal(SealError::AlreadyUnsealed));
        }
        self.audit.check().map_err(|_| VaultError::AuditUnavailable)?;
        let mut batch = self.audit.batch(caller);
        let outcome = sealed.submit(caller, &request.share);
        let status = sealed.status();
        match outcome {
            Ok(Submitted::Progress {
                have,
                threshold,
                index,
            }) => {
                let progress = format!("{have}/{threshold}");
                batch.record(
                    "unseal-share",
                    "accepted",
                    &[("share", &index.to_string()), ("progress", &progress)],
                );
                self.commit(&batch)?;
                tracing::info!(
                    caller,
                    share = index,
                    progress,
                    "key share accepted; still sealed"
                );
                Ok(UnsealResponse {
                    sealed: true,
                    progress: have,
                    threshold,
                    key_check_value: status.key_check_value,
                })
            }
            Ok(Submitted::Unsealed {
                key,
                previous,
                threshold,
                index,
            }) => {
                let signer = signer_for(&key)?;
                let kcv = key.key_check_value();
                self.install(Arc::new(key), previous.into_iter().map(Arc::new).collect());
                let progress = format!("{threshold}/{threshold}");
                batch.record(
                    "unseal-share",
                    "accepted",
                    &[("share", &index.to_string()), ("progress", &progress)],
                );
                batch.record("unseal", "ok", &[("kcv", &kcv)]);
                let committed = self.commit(&batch);
                self.audit.set_signer(Some(signer));
                // Sign what was recorded while sealed (start, unseal attempts) right away.
                self.audit.tick();
                committed?;
                tracing::info!(key_check_value = %kcv, "vault unsealed");
                Ok(UnsealResponse {
                    sealed: false,
                    progress: 0,
                    threshold,
                    key_check_value: kcv,
                })
            }
            Err(err) => {
                batch.record(
                    "unseal-share",
                    err.reason(),
                    &[("progress", &status.progress.to_string())],
                );
                let _ = self.commit(&batch);
                tracing::warn!(
                    caller,
                    reason = err.reason(),
                    progress = status.progress,
                    "key share refused"
                );
                Err(VaultError::Seal(err))
            }
        }
    }

    /// Wipes the master key, the key cache and held CVCs; the vault is sealed until unsealed
    /// again with the threshold of shares. Allowed even when the audit log is down: it only
    /// reduces what the vault can do.
    pub fn seal(&self, caller: &str) -> Result<SealResponse, VaultError> {
        let sealed = self.sealed_start()?;
        let previous = self.keys.write().unwrap_or_else(PoisonError::into_inner).take();
        sealed.reset();
        // No clear() on the CVC store: purging as of a moment past the longest TTL wipes all.
        let far = Instant::now()
            .checked_add(
                self.limits
                    .cvc_ttl
                    .saturating_mul(2)
                    .saturating_add(Duration::from_secs(1)),
            )
            .unwrap_or_else(Instant::now);
        let wiped = self.cvcs.purge_expired(far);
        let mut batch = self.audit.batch(caller);
        let outcome = if previous.is_some() {
            "ok"
        } else {
            "already-sealed"
        };
        batch.record("seal", outcome, &[("cvcs_wiped", &wiped.to_string())]);
        let _ = self.commit(&batch);
        // Signs the block (including the seal record) with the key that is going away.
        self.audit.set_signer(None);
        // Calls already in flight finish with their own reference; the master key and the
        // cached keys are wiped when the last of them ends.
        drop(previous);
        tracing::warn!(caller, cvcs_wiped = wiped, "vault sealed by an operator");
        Ok(SealResponse {})
    }

    /// KEK rotation of a sealed vault (see [`SealedStart::rekey`]): a new master key and new
    /// shares; the replaced key joins the retiring keys, and the audit key rolls over with a
    /// record the old audit key signs.
    pub fn rekey(&self, caller: &str, request: &RekeyRequest) -> Result<RekeyResponse, VaultError> {
        let sealed = self.sealed_start()?;
        let current = self.ready()?;
        let mut batch = self.audit.batch(caller);
        let from_kcv = current.master.key_check_value();
        let shares = request.shares.to_string();
        let threshold = request.threshold.to_string();
        let outcome = sealed.rekey(
            &current.master,
            &current.previous.iter().map(Arc::as_ref).collect::<Vec<_>>(),
            request.shares,
            request.threshold,
            &self.rng,
            audit_public_key_of,
        );
        let (initialized, master) = match outcome {
            Ok(done) => done,
            Err(err) => {
                if let SealError::State(why) = &err {
                    tracing::error!(%why, "rekey failed");
                }
                batch.record(
                    "rekey",
                    err.reason(),
                    &[
                        ("from_kcv", &from_kcv),
                        ("shares", &shares),
                        ("threshold", &threshold),
                    ],
                );
                let _ = self.commit(&batch);
                return Err(VaultError::Seal(err));
            }
        };
        let signer = signer_for(&master)?;
        let state = &initialized.state;
        batch.record(
            "rekey",
            "ok",
            &[
                ("from_kcv", &from_kcv),
                ("to_kcv", &state.key_check_value),
                ("shares", &shares),
                ("threshold", &threshold),
                ("next_audit_key", signer.public_key_hex()),
            ],
        );
        // The new key now exists only in these shares and this process: install it and hand
        // the shares out even if the audit write failed (the log then refuses card data).
        if self.commit(&batch).is_err() {
            tracing::error!("the rekey record could not be written to the audit log");
        }
        let mut previous = vec![Arc::clone(&current.master)];
        previous.extend(current.previous.iter().cloned());
        self.install(Arc::new(master), previous);
        // The old audit key signs the block holding the rekey record (which names the new audit
        // key) before the new one takes over: a verifier follows the chain of keys.
        self.audit.set_signer(Some(signer));
        tracing::warn!(
            caller,
            from_key_check_value = %from_kcv,
            key_check_value = %state.key_check_value,
            "sealed vault rekeyed: new shares handed out once; run `tessera keys rewrap-all`, then `tessera vault retire-keys`"
        );
        Ok(RekeyResponse {
            shares: initialized
                .shares
                .iter()
                .map(|share| share.as_str().to_owned())
                .collect(),
            key_check_value: state.key_check_value.clone(),
            retiring_key_check_values: state
                .retiring
                .iter()
                .map(|key| key.key_check_value.clone())
                .collect(),
            threshold: state.threshold,
            audit_public_key: state.audit_public_key.clone(),
        })
    }

    /// Ends a KEK rotation of a sealed vault: the retiring master keys are forgotten (state
    /// file and memory). Merchant keys still wrapped by one of them stop working, so this runs
    /// after `RewrapKeys` has moved every one.
    pub fn retire_master_keys(&self, caller: &str) -> Result<RetireMasterKeysResponse, VaultError> {
        let sealed = self.sealed_start()?;
        let current = self.ready()?;
        let mut batch = self.audit.batch(caller);
        let kcv = current.master.key_check_value();
        match sealed.retire(&current.master) {
            Ok(retired) => {
                self.install(Arc::clone(&current.master), Vec::new());
                batch.record(
                    "retire-master-keys",
                    "ok",
                    &[("kcv", &kcv), ("retired_kcvs", &retired.join(","))],
                );
                self.commit(&batch)?;
                tracing::warn!(caller, retired = %retired.join(","), "retiring master keys forgotten");
                Ok(RetireMasterKeysResponse {
                    retired_key_check_values: retired,
                })
            }
            Err(err) => {
                batch.record("retire-master-keys", err.reason(), &[("kcv", &kcv)]);
                let _ = self.commit(&batch);
                Err(VaultError::Seal(err))
            }
        }
    }

    /// The vault's key, seal, audit and hardening state, for operators.
    pub fn status(&self) -> StatusResponse {
        let hardening = &self.facts.hardening;
        let keys = self.unsealed().ok();
        let seal = self
            .sealed_start
            .as_ref()
            .map(SealedStart::status)
            .unwrap_or_default();
        let audit = self.audit.status();
        StatusResponse {
            mode: self.facts.mode.as_str().to_owned(),
            master_key_source: self.facts.master_key_source.to_owned(),
            master_key_loaded: keys.is_some(),
            core_dumps_disabled: hardening.core_dumps_disabled,
            ptrace_attach_blocked: hardening.ptrace_attach_blocked,
            memory_locked: hardening.memory_locked,
            memory_lock_error: hardening.memory_lock_error.clone(),
            debug_build: is_debug_build(),
            cached_keys: keys
                .as_ref()
                .map_or(0, |keys| u32::try_from(keys.cache.len()).unwrap_or(u32::MAX)),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            master_key_check_value: keys
                .as_ref()
                .map_or(seal.key_check_value, |keys| keys.master.key_check_value()),
            held_cvcs: u32::try_from(self.cvcs.len()).unwrap_or(u32::MAX),
            sealed: keys.is_none(),
            initialized: seal.initialized || self.sealed_start.is_none(),
            unseal_progress: seal.progress,
            unseal_threshold: seal.threshold,
            unseal_shares: seal.shares,
            audit_state: audit.state.to_owned(),
            audit_error: audit.error,
            audit_path: audit.path,
            audit_lines: audit.lines,
            audit_head: audit.head,
            audit_unsigned: audit.unsigned,
            audit_public_key: if audit.public_key.is_empty() {
                seal.audit_public_key
            } else {
                audit.public_key
            },
            retiring_key_check_values: keys.as_ref().map_or_else(Vec::new, |keys| {
                keys.previous.iter().map(|key| key.key_check_value()).collect()
            }),
        }
    }
}

fn check_batch(items: usize) -> Result<(), VaultError> {
    if items > MAX_BATCH_ITEMS {
        return Err(VaultError::BatchTooLarge);
    }
    Ok(())
}

/// The current UTC `(year, month)` for card expiry checks; the core takes it as an argument.
fn today_utc() -> (u32, u32) {
    // A clock set before 1970 is broken beyond what expiry checks can help with; treating it
    // as 1970 accepts any unexpired-looking date rather than refusing every card.
    let seconds = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|elapsed| elapsed.as_secs())
        .unwrap_or(0);
    year_month_utc(seconds)
}

/// Shared handle used by the server.
pub type SharedVault = Arc<Vault>;
