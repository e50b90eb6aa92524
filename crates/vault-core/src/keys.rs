//! The master key, merchant keys wrapped by it, and the bounded cache of unwrapped keys.
//!
//! Merchant keys exist outside the vault only as blobs wrapped by the master key with
//! AES-256-GCM, bound by associated data to their merchant, purpose and version. Inside the
//! vault every key is a [`SecretKey`], which wipes itself on drop and never prints.
//!
//! The primitives themselves (AES-256-GCM, HMAC-SHA-256, HKDF) are in [`crate::crypto`].

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use tessera_api::audit_format::hex;
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

use crate::card::Pan;
use crate::crypto::{self, AesGcmKey, HmacKey, Random, NONCE_LEN, TAG_LEN};

/// Length of every key the vault holds: AES-256 and HMAC-SHA-256 keys alike.
pub const KEY_LEN: usize = crypto::KEY_LEN;
/// First byte of a wrapped key blob, so the format can change without guessing.
const WRAP_FORMAT_V1: u8 = 0x01;
/// Length of a wrapped key blob: format byte, nonce, encrypted key, tag.
pub const WRAPPED_LEN: usize = 1 + NONCE_LEN + KEY_LEN + TAG_LEN;
const WRAP_LABEL: &[u8] = b"tessera/key-wrap/v1";
/// Domain label of a retired master key wrapped by its successor during a KEK rotation.
const RETIRED_MASTER_LABEL: &[u8] = b"tessera/retired-master-key/v1";
const CHECK_VALUE_LABEL: &[u8] = b"tessera/master-key-check/v1";

/// A 256-bit secret key. Wiped on drop; `Debug` prints no bytes.
///
/// The bytes sit behind a `Box` so moving the key moves only a pointer: a plain array would
/// be copied on every move and leave unwiped copies on the stack.
pub struct SecretKey(Box<[u8; KEY_LEN]>);

impl SecretKey {
    /// A fresh key from a cryptographically secure random source.
    pub fn generate(rng: &Random) -> Result<SecretKey, KeyError> {
        let mut key = SecretKey(Box::new([0; KEY_LEN]));
        rng.fill(key.0.as_mut_slice()).map_err(|_| KeyError::Random)?;
        Ok(key)
    }

    /// Takes a key from bytes the caller already holds in zeroizing memory (a key file,
    /// combined Shamir shares).
    pub fn from_bytes(bytes: Zeroizing<[u8; KEY_LEN]>) -> SecretKey {
        let mut key = SecretKey(Box::new([0; KEY_LEN]));
        key.0.copy_from_slice(bytes.as_slice());
        key
    }

    /// A key from an exactly `KEY_LEN`-byte slice, such as an unwrapped plaintext.
    fn from_slice(bytes: &[u8]) -> Option<SecretKey> {
        let bytes: &[u8; KEY_LEN] = bytes.try_into().ok()?;
        let mut key = SecretKey(Box::new([0; KEY_LEN]));
        key.0.copy_from_slice(bytes);
        Some(key)
    }

    /// The key bytes, only to hand them to [`crate::crypto`] or to the wrapping cipher. Private
    /// to this module, so no other code in the vault, let alone outside it, can copy a key
    /// anywhere.
    fn expose(&self) -> &[u8; KEY_LEN] {
        &self.0
    }
}

impl Zeroize for SecretKey {
    fn zeroize(&mut self) {
        self.0.zeroize();
    }
}

impl Drop for SecretKey {
    fn drop(&mut self) {
        self.zeroize();
    }
}

impl ZeroizeOnDrop for SecretKey {}

impl fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SecretKey").finish_non_exhaustive()
    }
}

/// What a merchant key is for. A key serves exactly one purpose, enforced by its wrapping.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum KeyPurpose {
    /// AES-256-GCM encryption of token records.
    Data,
    /// HMAC-SHA-256 card fingerprints.
    Fingerprint,
}

impl KeyPurpose {
    /// The name bound into a wrapped key's associated data and used in logs.
    pub fn as_str(&self) -> &'static str {
        match self {
            KeyPurpose::Data => "data",
            KeyPurpose::Fingerprint => "fingerprint",
        }
    }
}

/// Which merchant key a blob holds.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct KeyId {
    /// The merchant that owns the key.
    pub merchant_id: String,
    /// What the key is for.
    pub purpose: KeyPurpose,
    /// The key's version; a new version takes all new writes.
    pub version: u32,
}

/// Encodes fields so that no two different field lists give the same bytes: each field is
/// preceded by its length as 8 big-endian bytes. Used for every AEAD associated data, with a
/// domain label as the first field so a wrapped key can never pass as a record or the reverse.
pub(crate) fn length_prefixed(fields: &[&[u8]]) -> Vec<u8> {
    let total = fields.iter().map(|field| 8 + field.len()).sum();
    let mut out = Vec::with_capacity(total);
    for field in fields {
        // usize is at most 64 bits on every target Rust supports, so this never saturates.
        let len = u64::try_from(field.len()).unwrap_or(u64::MAX);
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(field);
    }
    out
}

/// The vault's key-encryption key, which wraps every merchant key.
pub struct MasterKey {
    key: SecretKey,
}

impl MasterKey {
    /// Takes ownership of the master key.
    pub fn new(key: SecretKey) -> MasterKey {
        MasterKey { key }
    }

    // The AES key schedule is built per call rather than kept: the master key is used only to
    // wrap new keys and on key-cache misses, and building it here keeps `new` infallible
    // without an `expect` on ring's (length-only) key check.
    fn cipher(&self) -> Result<AesGcmKey, KeyError> {
        aes_gcm_key(&self.key)
    }

    /// Wraps `key` for `id`. The blob is public: only this master key can open it, and only
    /// for the same merchant, purpose and version.
    pub fn wrap(&self, id: &KeyId, key: &SecretKey, rng: &Random) -> Result<Vec<u8>, KeyError> {
        self.seal_key(&wrap_aad(id), key, rng)
    }

    /// Unwraps a blob made by [`MasterKey::wrap`] for the same `id`.
    pub fn unwrap(&self, id: &KeyId, blob: &[u8]) -> Result<SecretKey, KeyError> {
        self.open_key(&wrap_aad(id), blob)
    }

    /// KEK rotation: wraps `retired` (the master key this one replaces) so that a vault
    /// unsealed with this key can still unwrap merchant keys not yet re-wrapped. The blob is
    /// bound to the retired key's check value.
    pub fn wrap_retired(&self, retired: &MasterKey, rng: &Random) -> Result<Vec<u8>, KeyError> {
        self.seal_key(&retired_aad(&retired.key_check_value()), &retired.key, rng)
    }

    /// Opens a blob made by [`MasterKey::wrap_retired`] and checks that the key inside has
    /// `key_check_value`.
    pub fn unwrap_retired(&self, key_check_value: &str, blob: &[u8]) -> Result<MasterKey, KeyError> {
        let retired = MasterKey::new(self.open_key(&retired_aad(key_check_value), blob)?);
        if retired.key_check_value() != key_check_value {
            return Err(KeyError::Unwrap);
        }
        Ok(retired)
    }

    fn seal_key(&self, aad: &[u8], key: &SecretKey, rng: &Random) -> Result<Vec<u8>, KeyError> {
        // A random 96-bit nonce is safe here: the master key wraps a handful of keys per
        // merchant and version, far below the 2^32 messages where random nonces get risky.
        let mut nonce = [0u8; NONCE_LEN];
        rng.fill(&mut nonce).map_err(|_| KeyError::Random)?;
        let cipher = self.cipher()?;
        // The clear key is copied into the output and encrypted in place; until then the
        // buffer is zeroizing, so an error path cannot leave the key in freed memory.
        let mut out = Zeroizing::new(Vec::with_capacity(WRAPPED_LEN));
        out.push(WRAP_FORMAT_V1);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(key.expose());
        let (_, in_out) = out.split_at_mut_checked(1 + NONCE_LEN).ok_or(KeyError::Crypto)?;
        let tag = cipher
            .seal_in_place(nonce, aad, in_out)
            .map_err(|_| KeyError::Crypto)?;
        out.extend_from_slice(&tag);
        Ok(std::mem::take(&mut *out))
    }

    fn open_key(&self, aad: &[u8], blob: &[u8]) -> Result<SecretKey, KeyError> {
        if blob.len() != WRAPPED_LEN {
            return Err(KeyError::Malformed);
        }
        let (format, rest) = blob.split_first().ok_or(KeyError::Malformed)?;
        if *format != WRAP_FORMAT_V1 {
            return Err(KeyError::Malformed);
        }
        let (nonce, sealed) = rest.split_at_checked(NONCE_LEN).ok_or(KeyError::Malformed)?;
        let nonce: [u8; NONCE_LEN] = nonce.try_into().map_err(|_| KeyError::Malformed)?;
        let cipher = self.cipher()?;
        let mut buffer = Zeroizing::new([0u8; KEY_LEN + TAG_LEN]);
        let sealed: &[u8; KEY_LEN + TAG_LEN] = sealed.try_into().map_err(|_| KeyError::Malformed)?;
        buffer.copy_from_slice(sealed);
        let plain = cipher
            .open_in_place(nonce, aad, buffer.as_mut_slice())
            .map_err(|_| KeyError::Unwrap)?;
        SecretKey::from_slice(plain).ok_or(KeyError::Malformed)
    }

    /// Generates a fresh key for `id` and returns only its wrapped blob; the clear key is
    /// wiped before this returns.
    pub fn create_key(&self, id: &KeyId, rng: &Random) -> Result<Vec<u8>, KeyError> {
        let key = SecretKey::generate(rng)?;
        self.wrap(id, &key, rng)
    }

    /// A short public identifier of the loaded master key: the first 8 bytes, in hex, of
    /// HMAC-SHA-256 under the master key of a fixed label. Operators compare it across vaults
    /// and against the value recorded at key ceremony; it reveals nothing usable about the key.
    pub fn key_check_value(&self) -> String {
        let mac = HmacKey::new(self.key.expose()).sign(CHECK_VALUE_LABEL);
        // The first 8 of the 32 tag bytes.
        hex(mac.split_at(8).0)
    }
}

impl MasterKey {
    /// A 32-byte secret derived from the master key for one fixed purpose (HKDF-SHA-256 with
    /// `label` as info), so a key such as the audit signing key needs no storage of its own: it
    /// comes back with the master key and is gone when the master key is. Secret in, secret
    /// out; different labels give independent keys.
    pub(crate) fn derive_secret(&self, label: &[u8]) -> Result<Zeroizing<[u8; KEY_LEN]>, KeyError> {
        crypto::hkdf_sha256(DERIVE_SALT, self.key.expose(), label).map_err(|_| KeyError::Crypto)
    }
}

/// The salt of every key derived from the master key.
const DERIVE_SALT: &[u8] = b"tessera/master-key-derive/v1";

impl fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MasterKey").finish_non_exhaustive()
    }
}

fn retired_aad(key_check_value: &str) -> Vec<u8> {
    length_prefixed(&[RETIRED_MASTER_LABEL, key_check_value.as_bytes()])
}

fn wrap_aad(id: &KeyId) -> Vec<u8> {
    length_prefixed(&[
        WRAP_LABEL,
        id.merchant_id.as_bytes(),
        id.purpose.as_str().as_bytes(),
        &id.version.to_be_bytes(),
    ])
}

fn aes_gcm_key(key: &SecretKey) -> Result<AesGcmKey, KeyError> {
    AesGcmKey::new(key.expose()).map_err(|_| KeyError::Crypto)
}

/// A merchant's AES-256-GCM key for token records (see `record.rs` for sealing).
pub struct DataKey {
    pub(crate) cipher: AesGcmKey,
    // Held so the raw key is wiped when this key is dropped; ring's expanded schedule in
    // `cipher` is not (see `crate::crypto`).
    _secret: SecretKey,
}

impl DataKey {
    /// Prepares a data key for sealing and opening records.
    pub fn new(key: SecretKey) -> Result<DataKey, KeyError> {
        Ok(DataKey {
            cipher: aes_gcm_key(&key)?,
            _secret: key,
        })
    }
}

impl fmt::Debug for DataKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DataKey").finish_non_exhaustive()
    }
}

/// A merchant's HMAC-SHA-256 key for card fingerprints.
pub struct FingerprintKey {
    mac: HmacKey,
    // Held so the raw key is wiped on drop; ring's HMAC key keeps precomputed pad states that
    // it does not wipe (see `crate::crypto`).
    _secret: SecretKey,
}

impl FingerprintKey {
    /// Prepares a fingerprint key.
    pub fn new(key: SecretKey) -> FingerprintKey {
        FingerprintKey {
            mac: HmacKey::new(key.expose()),
            _secret: key,
        }
    }

    /// HMAC-SHA-256 of the normalised card number: equal for every token of the same card
    /// under this merchant's key, and useless to anyone without the key (PCI DSS 3.5.1.1
    /// forbids plain hashes of card numbers).
    pub fn fingerprint(&self, pan: &Pan) -> [u8; 32] {
        self.fingerprint_bytes(pan.digits().as_bytes())
    }

    /// HMAC-SHA-256 of already normalised, type-prefixed non-card data (see
    /// [`crate::payload`]); the prefix keeps an e-mail address from ever colliding with a PAN.
    pub(crate) fn fingerprint_bytes(&self, normalised: &[u8]) -> [u8; 32] {
        self.mac.sign(normalised)
    }
}

impl fmt::Debug for FingerprintKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FingerprintKey").finish_non_exhaustive()
    }
}

#[derive(Clone)]
enum CachedKey {
    Data(Arc<DataKey>),
    Fingerprint(Arc<FingerprintKey>),
}

struct CacheEntry {
    /// The blob this key was unwrapped from: a hit needs the same bytes, so a replaced or
    /// tampered blob is always unwrapped (and checked) again.
    blob: Vec<u8>,
    key: CachedKey,
    last_used: u64,
}

#[derive(Default)]
struct CacheState {
    clock: u64,
    entries: HashMap<KeyId, CacheEntry>,
}

/// A bounded, thread-safe cache of unwrapped merchant keys.
///
/// When full, the least recently used key is evicted; evicted and cleared keys are wiped once
/// the last request using them lets go of its `Arc`.
pub struct KeyCache {
    capacity: usize,
    state: Mutex<CacheState>,
}

impl KeyCache {
    /// An empty cache holding at most `capacity` keys (0 caches nothing).
    pub fn new(capacity: usize) -> KeyCache {
        KeyCache {
            capacity,
            state: Mutex::new(CacheState::default()),
        }
    }

    /// The data key wrapped in `blob` for `id`, from the cache or unwrapped and cached.
    pub fn data_key(&self, master: &MasterKey, id: &KeyId, blob: &[u8]) -> Result<Arc<DataKey>, KeyError> {
        if id.purpose != KeyPurpose::Data {
            return Err(KeyError::WrongPurpose);
        }
        if let Some(CachedKey::Data(key)) = self.lookup(id, blob) {
            return Ok(key);
        }
        let key = Arc::new(DataKey::new(master.unwrap(id, blob)?)?);
        self.insert(id, blob, CachedKey::Data(Arc::clone(&key)));
        Ok(key)
    }

    /// The fingerprint key wrapped in `blob` for `id`, from the cache or unwrapped and cached.
    pub fn fingerprint_key(
        &self,
        master: &MasterKey,
        id: &KeyId,
        blob: &[u8],
    ) -> Result<Arc<FingerprintKey>, KeyError> {
        if id.purpose != KeyPurpose::Fingerprint {
            return Err(KeyError::WrongPurpose);
        }
        if let Some(CachedKey::Fingerprint(key)) = self.lookup(id, blob) {
            return Ok(key);
        }
        let key = Arc::new(FingerprintKey::new(master.unwrap(id, blob)?));
        self.insert(id, blob, CachedKey::Fingerprint(Arc::clone(&key)));
        Ok(key)
    }

    /// Number of keys cached.
    pub fn len(&self) -> usize {
        self.state().entries.len()
    }

    /// True when no key is cached.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Drops every cached key, for example when the vault is sealed again.
    pub fn clear(&self) {
        let entries = std::mem::take(&mut self.state().entries);
        // Dropped here, after the lock is released, so wiping never holds up other requests.
        drop(entries);
    }

    // A panic while holding the lock cannot leave the map inconsistent (each update is one
    // insert or remove), so a poisoned lock is recovered rather than failing every request.
    fn state(&self) -> MutexGuard<'_, CacheState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn lookup(&self, id: &KeyId, blob: &[u8]) -> Option<CachedKey> {
        let mut state = self.state();
        state.clock += 1;
        let now = state.clock;
        let entry = state.entries.get_mut(id)?;
        if entry.blob != blob {
            return None;
        }
        entry.last_used = now;
        Some(entry.key.clone())
    }

    fn insert(&self, id: &KeyId, blob: &[u8], key: CachedKey) {
        if self.capacity == 0 {
            return;
        }
        let entry = CacheEntry {
            blob: blob.to_vec(),
            key,
            last_used: 0,
        };
        let mut state = self.state();
        state.clock += 1;
        let now = state.clock;
        let evicted = if !state.entries.contains_key(id) && state.entries.len() >= self.capacity {
            // A linear scan runs only on a miss into a full cache; capacities are in the
            // hundreds or thousands, far cheaper than the unwrap that preceded it.
            let oldest = state
                .entries
                .iter()
                .min_by_key(|(_, entry)| entry.last_used)
                .map(|(id, _)| id.clone());
            oldest.and_then(|oldest| state.entries.remove(&oldest))
        } else {
            None
        };
        let replaced = state.entries.insert(
            id.clone(),
            CacheEntry {
                last_used: now,
                ..entry
            },
        );
        drop(state);
        // Evicted and replaced keys are wiped here, outside the lock.
        drop((evicted, replaced));
    }
}

impl fmt::Debug for KeyCache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyCache")
            .field("capacity", &self.capacity)
            .finish_non_exhaustive()
    }
}

/// Why a key operation failed. Never carries key bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum KeyError {
    /// The system's secure random source failed.
    Random,
    /// The blob did not authenticate for this merchant, purpose and version.
    Unwrap,
    /// The blob has the wrong length or format byte.
    Malformed,
    /// The key was asked for under a purpose it does not serve.
    WrongPurpose,
    /// The cryptographic library refused an operation that cannot fail on valid keys.
    Crypto,
}

impl KeyError {
    /// The machine-readable `google.rpc.ErrorInfo` reason.
    pub fn reason(&self) -> &'static str {
        match self {
            KeyError::Random => "RANDOM_UNAVAILABLE",
            KeyError::Unwrap => "KEY_UNWRAP_FAILED",
            KeyError::Malformed => "KEY_MALFORMED",
            KeyError::WrongPurpose => "KEY_WRONG_PURPOSE",
            KeyError::Crypto => "CRYPTO_FAILURE",
        }
    }
}

impl fmt::Display for KeyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            KeyError::Random => "the system random source failed",
            KeyError::Unwrap => {
                "wrapped key does not belong to this merchant, purpose and version, or is corrupt"
            }
            KeyError::Malformed => "wrapped key has the wrong length or format",
            KeyError::WrongPurpose => "key purpose does not match the operation",
            KeyError::Crypto => "the cryptographic library refused the key",
        })
    }
}

impl std::error::Error for KeyError {}

#[cfg(test)]
mod tests {
    #![allow(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::panic,
        clippy::indexing_slicing
    )]

    use super::*;

    fn id(merchant: &str, purpose: KeyPurpose, version: u32) -> KeyId {
        KeyId {
            merchant_id: merchant.into(),
            purpose,
            version,
        }
    }

    fn master() -> MasterKey {
        MasterKey::new(SecretKey::from_bytes(Zeroizing::new([7; KEY_LEN])))
    }

    #[test]
    fn wrap_unwrap_round_trip() {
        let rng = Random::system();
        let master = master();
        let key = SecretKey::generate(&rng).unwrap();
        let data = id("m1", KeyPurpose::Data, 1);
        let blob = master.wrap(&data, &key, &rng).unwrap();
        assert_eq!(blob.len(), WRAPPED_LEN);
        assert_eq!(blob[0], WRAP_FORMAT_V1);
        assert!(!blob.windows(KEY_LEN).any(|w| w == key.expose()));
        assert_eq!(master.unwrap(&data, &blob).unwrap().expose(), key.expose());
    }

    #[test]
    fn a_retired_master_key_opens_only_under_its_successor_and_check_value() {
        let rng = Random::system();
        let retired = master();
        let successor = MasterKey::new(SecretKey::generate(&rng).unwrap());
        let kcv = retired.key_check_value();
        let blob = successor.wrap_retired(&retired, &rng).unwrap();
        assert_eq!(
            successor.unwrap_retired(&kcv, &blob).unwrap().key_check_value(),
            kcv
        );
        assert_eq!(
            successor
                .unwrap_retired(&successor.key_check_value(), &blob)
                .unwrap_err(),
            KeyError::Unwrap
        );
        assert_eq!(retired.unwrap_retired(&kcv, &blob).unwrap_err(), KeyError::Unwrap);
        // A retired-key blob never passes as a merchant key.
        assert!(successor.unwrap(&id("m1", KeyPurpose::Data, 1), &blob).is_err());
    }

    #[test]
    fn blob_is_bound_to_merchant_purpose_version_and_master() {
        let rng = Random::system();
        let master = master();
        let data = id("m1", KeyPurpose::Data, 1);
        let blob = master.create_key(&data, &rng).unwrap();
        for other in [
            id("m2", KeyPurpose::Data, 1),
            id("m1", KeyPurpose::Fingerprint, 1),
            id("m1", KeyPurpose::Data, 2),
        ] {
            assert_eq!(
                master.unwrap(&other, &blob).unwrap_err(),
                KeyError::Unwrap,
                "{other:?}"
            );
        }
        let other_master = MasterKey::new(SecretKey::from_bytes(Zeroizing::new([8; KEY_LEN])));
        assert_eq!(other_master.unwrap(&data, &blob).unwrap_err(), KeyError::Unwrap);
    }

    #[test]
    fn malformed_blobs_are_refused_without_panicking() {
        let rng = Random::system();
        let master = master();
        let data = id("m1", KeyPurpose::Data, 1);
        let blob = master.create_key(&data, &rng).unwrap();
        for len in 0..blob.len() {
            assert_eq!(
                master.unwrap(&data, &blob[..len]).unwrap_err(),
                KeyError::Malformed
            );
        }
        let mut longer = blob.clone();
        longer.push(0);
        assert_eq!(master.unwrap(&data, &longer).unwrap_err(), KeyError::Malformed);
        let mut format = blob.clone();
        format[0] = 0x02;
        assert_eq!(master.unwrap(&data, &format).unwrap_err(), KeyError::Malformed);
        let mut flipped = blob;
        flipped[20] ^= 1;
        assert_eq!(master.unwrap(&data, &flipped).unwrap_err(), KeyError::Unwrap);
    }

    #[test]
    fn length_prefixing_separates_fields() {
        assert_ne!(length_prefixed(&[b"ab", b"c"]), length_prefixed(&[b"a", b"bc"]));
        assert_eq!(length_prefixed(&[b"x"]), [0, 0, 0, 0, 0, 0, 0, 1, b'x']);
    }

    #[test]
    fn key_check_value_is_stable_and_distinguishes_keys() {
        let kcv = master().key_check_value();
        assert_eq!(kcv.len(), 16);
        assert!(kcv
            .bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()));
        assert_eq!(kcv, master().key_check_value());
        let other = MasterKey::new(SecretKey::from_bytes(Zeroizing::new([8; KEY_LEN])));
        assert_ne!(kcv, other.key_check_value());
    }

    #[test]
    fn cache_hits_need_same_id_and_blob() {
        let rng = Random::system();
        let master = master();
        let cache = KeyCache::new(4);
        let data = id("m1", KeyPurpose::Data, 1);
        let blob = master.create_key(&data, &rng).unwrap();
        let first = cache.data_key(&master, &data, &blob).unwrap();
        let second = cache.data_key(&master, &data, &blob).unwrap();
        assert!(Arc::ptr_eq(&first, &second));
        assert_eq!(cache.len(), 1);

        // A new blob under the same id is unwrapped again and replaces the entry.
        let replacement = master.create_key(&data, &rng).unwrap();
        let third = cache.data_key(&master, &data, &replacement).unwrap();
        assert!(!Arc::ptr_eq(&first, &third));
        assert_eq!(cache.len(), 1);

        // A cached id does not vouch for a tampered blob.
        let mut tampered = replacement.clone();
        tampered[30] ^= 1;
        assert_eq!(
            cache.data_key(&master, &data, &tampered).unwrap_err(),
            KeyError::Unwrap
        );
    }

    #[test]
    fn cache_checks_purpose() {
        let rng = Random::system();
        let master = master();
        let cache = KeyCache::new(4);
        let fp = id("m1", KeyPurpose::Fingerprint, 1);
        let blob = master.create_key(&fp, &rng).unwrap();
        assert_eq!(
            cache.data_key(&master, &fp, &blob).unwrap_err(),
            KeyError::WrongPurpose
        );
        let key = cache.fingerprint_key(&master, &fp, &blob).unwrap();
        let data = id("m1", KeyPurpose::Data, 1);
        assert_eq!(
            cache.fingerprint_key(&master, &data, &blob).unwrap_err(),
            KeyError::WrongPurpose
        );
        let pan = Pan::parse("4111111111111111").unwrap();
        assert_eq!(
            key.fingerprint(&pan),
            cache
                .fingerprint_key(&master, &fp, &blob)
                .unwrap()
                .fingerprint(&pan)
        );
    }

    #[test]
    fn cache_evicts_least_recently_used() {
        let rng = Random::system();
        let master = master();
        let cache = KeyCache::new(2);
        let ids: Vec<KeyId> = (1..=3).map(|v| id("m1", KeyPurpose::Data, v)).collect();
        let blobs: Vec<Vec<u8>> = ids
            .iter()
            .map(|id| master.create_key(id, &rng).unwrap())
            .collect();
        let one = cache.data_key(&master, &ids[0], &blobs[0]).unwrap();
        let two = cache.data_key(&master, &ids[1], &blobs[1]).unwrap();
        // Touch 1 so 2 is the least recently used.
        assert!(Arc::ptr_eq(
            &one,
            &cache.data_key(&master, &ids[0], &blobs[0]).unwrap()
        ));
        cache.data_key(&master, &ids[2], &blobs[2]).unwrap();
        assert_eq!(cache.len(), 2);
        assert!(Arc::ptr_eq(
            &one,
            &cache.data_key(&master, &ids[0], &blobs[0]).unwrap()
        ));
        assert!(!Arc::ptr_eq(
            &two,
            &cache.data_key(&master, &ids[1], &blobs[1]).unwrap()
        ));
        cache.clear();
        assert!(cache.is_empty());

        let none = KeyCache::new(0);
        none.data_key(&master, &ids[0], &blobs[0]).unwrap();
        assert_eq!(none.len(), 0);
    }

    #[test]
    fn fingerprint_depends_on_key_and_card() {
        let a = FingerprintKey::new(SecretKey::from_bytes(Zeroizing::new([1; KEY_LEN])));
        let b = FingerprintKey::new(SecretKey::from_bytes(Zeroizing::new([2; KEY_LEN])));
        let visa = Pan::parse("4111111111111111").unwrap();
        let same = Pan::parse("4111 1111 1111 1111").unwrap();
        let mc = Pan::parse("5555555555554444").unwrap();
        assert_eq!(a.fingerprint(&visa), a.fingerprint(&same));
        assert_ne!(a.fingerprint(&visa), b.fingerprint(&visa));
        assert_ne!(a.fingerprint(&visa), a.fingerprint(&mc));
    }

    #[test]
    fn debug_prints_no_key_bytes() {
        let key = SecretKey::from_bytes(Zeroizing::new([0xab; KEY_LEN]));
        assert_eq!(format!("{key:?}"), "SecretKey { .. }");
        let master = master();
        assert_eq!(format!("{master:?}"), "MasterKey { .. }");
        let data = DataKey::new(SecretKey::from_bytes(Zeroizing::new([0xab; KEY_LEN]))).unwrap();
        assert_eq!(format!("{data:?}"), "DataKey { .. }");
        let fp = FingerprintKey::new(SecretKey::from_bytes(Zeroizing::new([0xab; KEY_LEN])));
        assert_eq!(format!("{fp:?}"), "FingerprintKey { .. }");
        for printed in [format!("{key:#?}"), format!("{:?}", KeyCache::new(3))] {
            assert!(!printed.contains("171") && !printed.contains("ab"), "{printed}");
        }
    }

    #[test]
    fn zeroize_wipes_secret_key() {
        let mut key = SecretKey::from_bytes(Zeroizing::new([0xab; KEY_LEN]));
        key.zeroize();
        assert_eq!(key.expose(), &[0; KEY_LEN]);
    }
}
