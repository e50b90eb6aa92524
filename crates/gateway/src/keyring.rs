//! The merchants' wrapped keys as the gateway holds them: opaque blobs it passes to the vault
//! with each request. Created on a merchant's first tokenize; cached because they only change
//! on rotation.
//!
//! Rotation (crate::admin, crate::reencrypt) changes them while gateways run, so nothing here
//! is cached for long: a merchant's current versions are re-read from the database every
//! [`CURRENT_TTL`] (a rotation on another gateway takes new writes here within that time; the
//! rotating gateway switches at once), and a wrapped blob every [`KEY_TTL`] (a KEK rotation's
//! re-wrapped blobs replace the old ones within that time).

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use tessera_api::vault::{KeyPurpose, WrappedKey};

use crate::clock::Clock;
use crate::error::ApiError;
use crate::storage::{Store, StoreError, StoredKey};
use crate::vault_client::VaultClient;

pub const PURPOSE_DATA: &str = "data";
pub const PURPOSE_FINGERPRINT: &str = "fingerprint";

/// How long a merchant's current key versions are used before being read again.
pub const CURRENT_TTL: Duration = Duration::from_secs(2);

/// How long a wrapped key blob is used before being read again.
pub const KEY_TTL: Duration = Duration::from_secs(30);

/// (merchant, purpose, version) of a wrapped key.
type KeyAddress = (String, &'static str, u32);

/// A merchant's current (data, fingerprint) key versions and when they were read.
type CurrentVersions = ((u32, u32), Instant);

/// Wrapped keys, cached by address, and each merchant's current (data, fingerprint) versions,
/// each with the moment it was read.
#[derive(Debug, Default)]
pub struct KeyRing {
    cache: RwLock<HashMap<KeyAddress, (Arc<WrappedKey>, Instant)>>,
    current: RwLock<HashMap<String, CurrentVersions>>,
}

fn wrapped(key: StoredKey) -> WrappedKey {
    let purpose = if key.purpose == PURPOSE_DATA {
        KeyPurpose::Data
    } else {
        KeyPurpose::Fingerprint
    };
    WrappedKey {
        merchant_id: key.merchant_id,
        purpose: purpose as i32,
        version: key.version,
        blob: key.blob,
    }
}

fn store_error(err: StoreError) -> ApiError {
    tracing::error!(error = %err, "key storage failed");
    ApiError::unavailable("STORAGE_UNAVAILABLE", "storage is unavailable; retry later")
}

impl KeyRing {
    /// The merchant's current data and fingerprint keys, created through the vault if the
    /// merchant has none yet.
    pub async fn current(
        &self,
        store: &Store,
        vault: &VaultClient,
        clock: &Clock,
        merchant_id: &str,
    ) -> Result<(Arc<WrappedKey>, Arc<WrappedKey>), ApiError> {
        let known = self
            .current
            .read()
            .ok()
            .and_then(|current| current.get(merchant_id).copied())
            .filter(|(_, read_at)| read_at.elapsed() < CURRENT_TTL)
            .map(|(versions, _)| versions);
        let (data_version, fingerprint_version) = match known {
            Some(versions) => versions,
            None => {
                let versions = self.load_current(store, vault, clock, merchant_id).await?;
                if let Ok(mut current) = self.current.write() {
                    current.insert(merchant_id.to_owned(), (versions, Instant::now()));
                }
                versions
            }
        };
        Ok((
            self.key(store, merchant_id, PURPOSE_DATA, data_version).await?,
            self.key(store, merchant_id, PURPOSE_FINGERPRINT, fingerprint_version)
                .await?,
        ))
    }

    async fn load_current(
        &self,
        store: &Store,
        vault: &VaultClient,
        clock: &Clock,
        merchant_id: &str,
    ) -> Result<(u32, u32), ApiError> {
        let data = store
            .current_key(merchant_id, PURPOSE_DATA)
            .await
            .map_err(store_error)?;
        let fingerprint = store
            .current_key(merchant_id, PURPOSE_FINGERPRINT)
            .await
            .map_err(store_error)?;
        if let (Some(data), Some(fingerprint)) = (data, fingerprint) {
            return Ok((data.version, fingerprint.version));
        }
        let (data, fingerprint) = vault.create_keys(merchant_id, 1).await?;
        let stored = [data, fingerprint].map(|key| StoredKey {
            merchant_id: merchant_id.to_owned(),
            purpose: if key.purpose == KeyPurpose::Data as i32 {
                PURPOSE_DATA
            } else {
                PURPOSE_FINGERPRINT
            },
            version: key.version,
            blob: key.blob,
        });
        store
            .insert_keys(&stored, clock.now_ms())
            .await
            .map_err(store_error)?;
        tracing::info!(merchant_id, "created merchant keys");
        // Another gateway may have won the race; whatever is stored now is the merchant's key.
        Ok((1, 1))
    }

    /// A given key version, from the cache or the store.
    pub async fn key(
        &self,
        store: &Store,
        merchant_id: &str,
        purpose: &'static str,
        version: u32,
    ) -> Result<Arc<WrappedKey>, ApiError> {
        let cache_key = (merchant_id.to_owned(), purpose, version);
        if let Some(key) = self
            .cache
            .read()
            .ok()
            .and_then(|cache| cache.get(&cache_key).cloned())
            .filter(|(_, read_at)| read_at.elapsed() < KEY_TTL)
            .map(|(key, _)| key)
        {
            return Ok(key);
        }
        let stored = store
            .key(merchant_id, purpose, version)
            .await
            .map_err(store_error)?
            .ok_or_else(|| ApiError::internal("KEY_MISSING", "a key version this record needs is missing"))?;
        let key = Arc::new(wrapped(stored));
        if let Ok(mut cache) = self.cache.write() {
            cache.insert(cache_key, (Arc::clone(&key), Instant::now()));
        }
        Ok(key)
    }

    /// Makes `data_version` the merchant's current data-key version here at once (after this
    /// gateway rotated it); the fingerprint version is kept.
    pub fn set_current_data_version(&self, merchant_id: &str, data_version: u32, fingerprint_version: u32) {
        if let Ok(mut current) = self.current.write() {
            current.insert(
                merchant_id.to_owned(),
                ((data_version, fingerprint_version), Instant::now()),
            );
        }
    }

    /// Forgets a destroyed key version.
    pub fn evict(&self, merchant_id: &str, purpose: &'static str, version: u32) {
        if let Ok(mut cache) = self.cache.write() {
            cache.remove(&(merchant_id.to_owned(), purpose, version));
        }
    }

    /// Forgets every cached blob (after a KEK rotation re-wrapped them).
    pub fn clear(&self) {
        if let Ok(mut cache) = self.cache.write() {
            cache.clear();
        }
    }
}
