//! `tessera.v1.KeyAdmin`: key rotation for operators. Callers need the `rotate_keys` policy
//! operation (for every merchant, `"*"`, to re-wrap all keys) and `read_metadata` for the
//! rotation status. Every refusal is a gRPC error with an ErrorInfo reason.

use std::collections::BTreeMap;
use std::sync::Arc;

use tessera_api::identity::peer_identity;
use tessera_api::v1::key_admin_server::KeyAdmin;
use tessera_api::v1::{
    KeyVersion, RewrapAllRequest, RewrapAllResponse, RotateKeyRequest, RotateKeyResponse,
    RotationStatusRequest, RotationStatusResponse,
};
use tessera_api::vault::{KeyPurpose, WrappedKey};
use tonic::{Request, Response, Status};

use crate::error::ApiError;
use crate::keyring::{PURPOSE_DATA, PURPOSE_FINGERPRINT};
use crate::policy::Operation;
use crate::reencrypt::REENCRYPT_JOB;
use crate::state::Gateway;
use crate::storage::{store_error, Rewrapped, StoredKey};

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
        let mut versions: BTreeMap<u32, KeyVersion> = BTreeMap::new();
        for (version, created_at) in gateway
            .store
            .data_key_versions(merchant_id)
            .await
            .map_err(store_error)?
        {
            versions.insert(
                version,
                KeyVersion {
                    version,
                    created_at,
                    ..KeyVersion::default()
                },
            );
        }
        let current_version = versions.keys().next_back().copied().unwrap_or(0);
        let counts = gateway
            .store
            .sealed_records_per_version(merchant_id)
            .await
            .map_err(store_error)?;
        let mut pending_records = 0;
        for (version, records) in counts {
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
        let (job_holder, job_lease_until) = gateway
            .store
            .job_lease(REENCRYPT_JOB)
            .await
            .map_err(store_error)?
            .unwrap_or_default();
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
        let mut response = RewrapAllResponse::default();
        let mut after = (String::new(), String::new(), -1_i64);
        loop {
            let rows = gateway
                .store
                .keys_after(&after, REWRAP_BATCH)
                .await
                .map_err(store_error)?;
            if rows.is_empty() {
                break;
            }
            let mut keys = Vec::with_capacity(rows.len());
            for row in rows {
                after = (row.merchant_id.clone(), row.purpose.clone(), row.version);
                keys.push(WrappedKey {
                    merchant_id: row.merchant_id,
                    purpose: if row.purpose == PURPOSE_DATA {
                        KeyPurpose::Data as i32
                    } else {
                        KeyPurpose::Fingerprint as i32
                    },
                    version: u32_of(row.version),
                    blob: row.blob,
                });
            }
            let (results, check_value) = gateway.vault.rewrap_keys(keys.clone()).await?;
            response.master_key_check_value = check_value;
            let mut rewrapped = Vec::with_capacity(keys.len());
            for (old, result) in keys.iter().zip(results) {
                let purpose = if old.purpose == KeyPurpose::Data as i32 {
                    PURPOSE_DATA
                } else {
                    PURPOSE_FINGERPRINT
                };
                match result {
                    Ok(new) => rewrapped.push(Rewrapped {
                        merchant_id: &old.merchant_id,
                        purpose,
                        version: old.version,
                        old_blob: &old.blob,
                        new_blob: new.blob,
                    }),
                    Err(err) => {
                        tracing::warn!(merchant_id = %old.merchant_id, purpose, version = old.version, reason = %err.reason, "key could not be re-wrapped");
                        response.failed += 1;
                    }
                }
            }
            for replaced in gateway
                .store
                .replace_key_blobs(rewrapped)
                .await
                .map_err(store_error)?
            {
                if replaced {
                    response.rewrapped += 1;
                } else {
                    response.skipped += 1;
                }
            }
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
