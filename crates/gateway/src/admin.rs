//! `tessera.v1.KeyAdmin`: key rotation for operators. Callers need the `rotate_keys` policy
//! operation (for every merchant, `"*"`, to re-wrap all keys) and `read_metadata` for the
//! rotation status. Every refusal is a gRPC error with an ErrorInfo reason.

use std::collections::BTreeMap;
use std::sync::Arc;

use sqlx::Row;
use tessera_api::identity::peer_identity;
use tessera_api::v1::key_admin_server::KeyAdmin;
use tessera_api::v1::{
    KeyVersion, RewrapAllRequest, RewrapAllResponse, RotateKeyRequest, RotateKeyResponse,
    RotationStatusRequest, RotationStatusResponse,
};
use tessera_api::vault::{KeyPurpose, WrappedKey};
use tonic::{Request, Response, Status};

use crate::api::{store_error, Gateway};
use crate::error::ApiError;
use crate::keyring::{PURPOSE_DATA, PURPOSE_FINGERPRINT};
use crate::policy::Operation;
use crate::reencrypt::REENCRYPT_JOB;
use crate::store::StoredKey;

/// Stored keys per RewrapKeys call.
const REWRAP_BATCH: i64 = 500;

/// The KeyAdmin service over a shared [`Gateway`].
#[derive(Debug, Clone)]
pub struct KeyAdminService(pub Arc<Gateway>);

fn caller<T>(request: &Request<T>) -> Option<String> {
    let certs = request.peer_certs()?;
    peer_identity(certs.iter().map(|cert| cert.as_ref()))
}

fn merchant(merchant_id: &str) -> Result<&str, ApiError> {
    if merchant_id.is_empty() {
        return Err(ApiError::missing("merchant_id"));
    }
    if merchant_id.len() > 64 {
        return Err(ApiError::invalid(
            "merchant_id",
            "INVALID_MERCHANT_ID",
            "merchant_id must be 1 to 64 bytes",
        ));
    }
    Ok(merchant_id)
}

fn query_error(err: sqlx::Error) -> ApiError {
    store_error(err.into())
}

fn u32_of(value: i64) -> u32 {
    u32::try_from(value).unwrap_or(u32::MAX)
}

impl KeyAdminService {
    async fn rotate(&self, identity: Option<&str>, merchant_id: &str) -> Result<RotateKeyResponse, ApiError> {
        let gateway = &self.0;
        let merchant_id = merchant(merchant_id)?;
        gateway
            .policy
            .authorize(identity, Operation::RotateKeys, merchant_id)?;
        let current = gateway
            .store
            .current_key(merchant_id, PURPOSE_DATA)
            .await
            .map_err(store_error)?
            .ok_or_else(|| {
                ApiError::not_found(
                    "MERCHANT_HAS_NO_KEYS",
                    "the merchant has no keys yet; its first tokenize creates them",
                )
            })?;
        let fingerprint_version = gateway
            .store
            .current_key(merchant_id, PURPOSE_FINGERPRINT)
            .await
            .map_err(store_error)?
            .map_or(1, |key| key.version);
        let next = current.version.checked_add(1).ok_or_else(|| {
            ApiError::new(
                tonic::Code::FailedPrecondition,
                "KEY_VERSIONS_EXHAUSTED",
                "the merchant has no data-key version left",
            )
        })?;
        let created = gateway.vault.create_data_key(merchant_id, next).await?;
        let stored = StoredKey {
            merchant_id: merchant_id.to_owned(),
            purpose: PURPOSE_DATA,
            version: created.version,
            blob: created.blob,
        };
        // Inserted unless that version exists: a concurrent rotation won, and its key stands.
        gateway
            .store
            .insert_keys(&[stored], gateway.clock.now_ms())
            .await
            .map_err(store_error)?;
        let now_current = gateway
            .store
            .current_key(merchant_id, PURPOSE_DATA)
            .await
            .map_err(store_error)?
            .map_or(next, |key| key.version);
        // This gateway writes under the new version at once; others within CURRENT_TTL.
        gateway
            .keys
            .set_current_data_version(merchant_id, now_current, fingerprint_version);
        tracing::info!(
            merchant_id,
            identity,
            version = now_current,
            previous = current.version,
            "data key rotated"
        );
        Ok(RotateKeyResponse {
            merchant_id: merchant_id.to_owned(),
            data_key_version: now_current,
            previous_version: current.version,
        })
    }

    async fn status(
        &self,
        identity: Option<&str>,
        merchant_id: &str,
    ) -> Result<RotationStatusResponse, ApiError> {
        let gateway = &self.0;
        let merchant_id = merchant(merchant_id)?;
        gateway
            .policy
            .authorize(identity, Operation::ReadMetadata, merchant_id)?;
        let pool = gateway.store.pool();
        let mut versions: BTreeMap<u32, KeyVersion> = BTreeMap::new();
        let rows = sqlx::query(
            "SELECT version, created_at FROM merchant_keys WHERE merchant_id = $1 AND purpose = 'data'",
        )
        .bind(merchant_id)
        .fetch_all(pool)
        .await
        .map_err(query_error)?;
        for row in &rows {
            let version = u32_of(row.try_get("version").map_err(query_error)?);
            versions.insert(
                version,
                KeyVersion {
                    version,
                    created_at: row.try_get("created_at").map_err(query_error)?,
                    ..KeyVersion::default()
                },
            );
        }
        let current_version = versions.keys().next_back().copied().unwrap_or(0);
        let counts = sqlx::query(
            "SELECT data_key_version, COUNT(*) AS records FROM tokens \
             WHERE merchant_id = $1 AND ciphertext IS NOT NULL GROUP BY data_key_version",
        )
        .bind(merchant_id)
        .fetch_all(pool)
        .await
        .map_err(query_error)?;
        let mut pending_records = 0;
        for row in &counts {
            let version = u32_of(row.try_get("data_key_version").map_err(query_error)?);
            let records = u64::try_from(row.try_get::<i64, _>("records").map_err(query_error)?).unwrap_or(0);
            if version < current_version {
                pending_records += records;
            }
            versions
                .entry(version)
                .or_insert_with(|| KeyVersion {
                    version,
                    ..KeyVersion::default()
                })
                .records = records;
        }
        if let Some(current) = versions.get_mut(&current_version) {
            current.current = true;
        }
        let fingerprint_key_version = gateway
            .store
            .current_key(merchant_id, PURPOSE_FINGERPRINT)
            .await
            .map_err(store_error)?
            .map_or(0, |key| key.version);
        let lease = sqlx::query("SELECT holder, lease_until FROM job_leases WHERE job = $1")
            .bind(REENCRYPT_JOB)
            .fetch_optional(pool)
            .await
            .map_err(query_error)?;
        let (job_holder, job_lease_until) = match lease {
            Some(row) => (
                row.try_get("holder").map_err(query_error)?,
                row.try_get("lease_until").map_err(query_error)?,
            ),
            None => (String::new(), 0),
        };
        Ok(RotationStatusResponse {
            merchant_id: merchant_id.to_owned(),
            current_version,
            versions: versions.into_values().collect(),
            fingerprint_key_version,
            pending_records,
            job_holder,
            job_lease_until,
        })
    }

    async fn rewrap_all(&self, identity: Option<&str>) -> Result<RewrapAllResponse, ApiError> {
        let gateway = &self.0;
        gateway.policy.authorize(identity, Operation::RotateKeys, "*")?;
        let pool = gateway.store.pool();
        let mut response = RewrapAllResponse::default();
        let mut after = (String::new(), String::new(), -1_i64);
        loop {
            let rows = sqlx::query(
                "SELECT merchant_id, purpose, version, blob FROM merchant_keys \
                 WHERE merchant_id > $1 OR (merchant_id = $1 AND purpose > $2) \
                    OR (merchant_id = $1 AND purpose = $2 AND version > $3) \
                 ORDER BY merchant_id, purpose, version LIMIT $4",
            )
            .bind(&after.0)
            .bind(&after.1)
            .bind(after.2)
            .bind(REWRAP_BATCH)
            .fetch_all(pool)
            .await
            .map_err(query_error)?;
            if rows.is_empty() {
                break;
            }
            let mut keys = Vec::with_capacity(rows.len());
            for row in &rows {
                let purpose: String = row.try_get("purpose").map_err(query_error)?;
                let version: i64 = row.try_get("version").map_err(query_error)?;
                let merchant_id: String = row.try_get("merchant_id").map_err(query_error)?;
                after = (merchant_id.clone(), purpose.clone(), version);
                keys.push(WrappedKey {
                    merchant_id,
                    purpose: if purpose == PURPOSE_DATA {
                        KeyPurpose::Data as i32
                    } else {
                        KeyPurpose::Fingerprint as i32
                    },
                    version: u32_of(version),
                    blob: row.try_get("blob").map_err(query_error)?,
                });
            }
            let (results, check_value) = gateway.vault.rewrap_keys(keys.clone()).await?;
            response.master_key_check_value = check_value;
            let mut tx = pool.begin().await.map_err(query_error)?;
            for (old, result) in keys.iter().zip(results) {
                let purpose = if old.purpose == KeyPurpose::Data as i32 {
                    PURPOSE_DATA
                } else {
                    PURPOSE_FINGERPRINT
                };
                match result {
                    Ok(new) => {
                        // Only if nobody changed or destroyed the row meanwhile.
                        let replaced = sqlx::query(
                            "UPDATE merchant_keys SET blob = $1 \
                             WHERE merchant_id = $2 AND purpose = $3 AND version = $4 AND blob = $5",
                        )
                        .bind(new.blob)
                        .bind(&old.merchant_id)
                        .bind(purpose)
                        .bind(i64::from(old.version))
                        .bind(&old.blob)
                        .execute(&mut *tx)
                        .await
                        .map_err(query_error)?
                        .rows_affected();
                        if replaced == 1 {
                            response.rewrapped += 1;
                        } else {
                            response.skipped += 1;
                        }
                    }
                    Err(err) => {
                        tracing::warn!(merchant_id = %old.merchant_id, purpose, version = old.version, reason = %err.reason, "key could not be re-wrapped");
                        response.failed += 1;
                    }
                }
            }
            tx.commit().await.map_err(query_error)?;
        }
        // This gateway uses the re-wrapped blobs at once; others within keyring::KEY_TTL.
        gateway.keys.clear();
        tracing::info!(
            identity,
            rewrapped = response.rewrapped,
            failed = response.failed,
            skipped = response.skipped,
            master_key_check_value = %response.master_key_check_value,
            "stored keys re-wrapped"
        );
        Ok(response)
    }
}

#[tonic::async_trait]
impl KeyAdmin for KeyAdminService {
    async fn rotate_key(
        &self,
        request: Request<RotateKeyRequest>,
    ) -> Result<Response<RotateKeyResponse>, Status> {
        let identity = caller(&request);
        let merchant_id = request.into_inner().merchant_id;
        Ok(Response::new(
            self.rotate(identity.as_deref(), &merchant_id).await?,
        ))
    }

    async fn rotation_status(
        &self,
        request: Request<RotationStatusRequest>,
    ) -> Result<Response<RotationStatusResponse>, Status> {
        let identity = caller(&request);
        let merchant_id = request.into_inner().merchant_id;
        Ok(Response::new(
            self.status(identity.as_deref(), &merchant_id).await?,
        ))
    }

    async fn rewrap_all(
        &self,
        request: Request<RewrapAllRequest>,
    ) -> Result<Response<RewrapAllResponse>, Status> {
        let identity = caller(&request);
        Ok(Response::new(self.rewrap_all(identity.as_deref()).await?))
    }
}
