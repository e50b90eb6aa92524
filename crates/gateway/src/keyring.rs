//! The merchants' wrapped keys as the gateway holds them: opaque blobs it passes to the vault
//! with each request. Created on a merchant's first tokenize; cached because they only change
//! on rotation.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use tessera_api::vault::{KeyPurpose, WrappedKey};

use crate::clock::Clock;
use crate::error::ApiError;
use crate::store::{Store, StoredKey};
use crate::vault_client::VaultClient;

pub const PURPOSE_DATA: &str = "data";
pub const PURPOSE_FINGERPRINT: &str = "fingerprint";

/// (merchant, purpose, version) of a wrapped key.
type KeyAddress = (String, &'static str, u32);

/// Wrapped keys, cached by address.
#[derive(Debug, Default)]
pub struct KeyRing {
    cache: RwLock<HashMap<KeyAddress, Arc<WrappedKey>>>,
    current: RwLock<HashMap<String, (u32, u32)>>,
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

fn store_error(err: crate::store::StoreError) -> ApiError {
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
            .and_then(|current| current.get(merchant_id).copied());
        let (data_version, fingerprint_version) = match known {
            Some(versions) => versions,
            None => {
                let versions = self.load_current(store, vault, clock, merchant_id).await?;
                if let Ok(mut current) = self.current.write() {
                    current.insert(merchant_id.to_owned(), versions);
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
            cache.insert(cache_key, Arc::clone(&key));
        }
        Ok(key)
    }
}
