//! Key rotation's statements: what `KeyAdmin` reports and re-wraps (crate::admin), and what the
//! re-encryption job moves and destroys (crate::reencrypt).

use sqlx::Row;

use super::records::StoreError;
use super::store::Store;

/// A stored key as re-wrapping reads it, with its purpose as stored ("data", "fingerprint").
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyRow {
    pub merchant_id: String,
    pub purpose: String,
    pub version: i64,
    pub blob: Vec<u8>,
}

/// A key's new blob, replacing `old_blob` only if nobody changed or destroyed the row meanwhile.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rewrapped<'a> {
    pub merchant_id: &'a str,
    pub purpose: &'a str,
    pub version: u32,
    pub old_blob: &'a [u8],
    pub new_blob: Vec<u8>,
}

/// A record sealed under an older data-key version, as re-encryption reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SealedRecord {
    pub token: String,
    pub data_key_version: u32,
    pub ciphertext: Vec<u8>,
}

/// A record's new ciphertext, replacing the old one only if the record still has it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reencrypted<'a> {
    pub token: &'a str,
    pub from_version: u32,
    pub old_ciphertext: &'a [u8],
    pub ciphertext: Vec<u8>,
    pub data_key_version: u32,
}

fn u32_of(value: i64) -> u32 {
    u32::try_from(value).unwrap_or(u32::MAX)
}

fn version_column(row: &sqlx::any::AnyRow, name: &str) -> Result<u32, StoreError> {
    let value: i64 = row.try_get(name)?;
    u32::try_from(value).map_err(|_| StoreError::Query(format!("{name} out of range")))
}

impl Store {
    /// The merchant's data-key versions and when each was created.
    pub async fn data_key_versions(&self, merchant_id: &str) -> Result<Vec<(u32, i64)>, StoreError> {
        let rows = sqlx::query(
            "SELECT version, created_at FROM merchant_keys WHERE merchant_id = $1 AND purpose = 'data'",
        )
        .bind(merchant_id)
        .fetch_all(self.pool())
        .await?;
        let mut versions = Vec::with_capacity(rows.len());
        for row in &rows {
            versions.push((u32_of(row.try_get("version")?), row.try_get("created_at")?));
        }
        Ok(versions)
    }

    /// How many of the merchant's records still hold data, per data-key version.
    pub async fn sealed_records_per_version(&self, merchant_id: &str) -> Result<Vec<(u32, u64)>, StoreError> {
        let counts = sqlx::query(
            "SELECT data_key_version, COUNT(*) AS records FROM tokens \
             WHERE merchant_id = $1 AND ciphertext IS NOT NULL GROUP BY data_key_version",
        )
        .bind(merchant_id)
        .fetch_all(self.pool())
        .await?;
        let mut per_version = Vec::with_capacity(counts.len());
        for row in &counts {
            let version = u32_of(row.try_get("data_key_version")?);
            let records = u64::try_from(row.try_get::<i64, _>("records")?).unwrap_or(0);
            per_version.push((version, records));
        }
        Ok(per_version)
    }

    /// The holder of background job `job`'s lease and until when; `None` if nobody ever took it.
    pub async fn job_lease(&self, job: &str) -> Result<Option<(String, i64)>, StoreError> {
        let lease = sqlx::query("SELECT holder, lease_until FROM job_leases WHERE job = $1")
            .bind(job)
            .fetch_optional(self.pool())
            .await?;
        Ok(match lease {
            Some(row) => Some((row.try_get("holder")?, row.try_get("lease_until")?)),
            None => None,
        })
    }

    /// Up to `limit` stored keys after `after` (merchant, purpose, version), in that order.
    pub async fn keys_after(
        &self,
        after: &(String, String, i64),
        limit: i64,
    ) -> Result<Vec<KeyRow>, StoreError> {
        let rows = sqlx::query(
            "SELECT merchant_id, purpose, version, blob FROM merchant_keys \
             WHERE merchant_id > $1 OR (merchant_id = $1 AND purpose > $2) \
                OR (merchant_id = $1 AND purpose = $2 AND version > $3) \
             ORDER BY merchant_id, purpose, version LIMIT $4",
        )
        .bind(&after.0)
        .bind(&after.1)
        .bind(after.2)
        .bind(limit)
        .fetch_all(self.pool())
        .await?;
        let mut keys = Vec::with_capacity(rows.len());
        for row in &rows {
            keys.push(KeyRow {
                merchant_id: row.try_get("merchant_id")?,
                purpose: row.try_get("purpose")?,
                version: row.try_get("version")?,
                blob: row.try_get("blob")?,
            });
        }
        Ok(keys)
    }

    /// Replaces re-wrapped key blobs in one transaction; per key, whether it was replaced.
    pub async fn replace_key_blobs(&self, keys: Vec<Rewrapped<'_>>) -> Result<Vec<bool>, StoreError> {
        let mut tx = self.pool().begin().await?;
        let mut replaced = Vec::with_capacity(keys.len());
        for key in keys {
            let rows = sqlx::query(
                "UPDATE merchant_keys SET blob = $1 \
                 WHERE merchant_id = $2 AND purpose = $3 AND version = $4 AND blob = $5",
            )
            .bind(key.new_blob)
            .bind(key.merchant_id)
            .bind(key.purpose)
            .bind(i64::from(key.version))
            .bind(key.old_blob)
            .execute(&mut *tx)
            .await?
            .rows_affected();
            replaced.push(rows == 1);
        }
        tx.commit().await?;
        Ok(replaced)
    }

    /// Merchants with more than one data-key version, with their current (newest) version.
    pub async fn merchants_with_old_data_keys(&self) -> Result<Vec<(String, u32)>, StoreError> {
        let rows = sqlx::query(
            "SELECT merchant_id, MAX(version) AS current_version FROM merchant_keys \
             WHERE purpose = 'data' GROUP BY merchant_id HAVING COUNT(*) > 1",
        )
        .fetch_all(self.pool())
        .await?;
        let mut merchants = Vec::with_capacity(rows.len());
        for row in &rows {
            merchants.push((
                row.try_get::<String, _>("merchant_id")?,
                version_column(row, "current_version")?,
            ));
        }
        Ok(merchants)
    }

    /// Up to `limit` of the merchant's records after token `after` sealed under a version older
    /// than `current`, in token order.
    pub async fn records_under_older_keys(
        &self,
        merchant_id: &str,
        current: u32,
        after: &str,
        limit: i64,
    ) -> Result<Vec<SealedRecord>, StoreError> {
        let rows = sqlx::query(
            "SELECT token, data_key_version, ciphertext FROM tokens \
             WHERE merchant_id = $1 AND data_key_version < $2 AND ciphertext IS NOT NULL AND token > $3 \
             ORDER BY token LIMIT $4",
        )
        .bind(merchant_id)
        .bind(i64::from(current))
        .bind(after)
        .bind(limit)
        .fetch_all(self.pool())
        .await?;
        let mut records = Vec::with_capacity(rows.len());
        for row in &rows {
            records.push(SealedRecord {
                token: row.try_get("token")?,
                data_key_version: version_column(row, "data_key_version")?,
                ciphertext: row.try_get("ciphertext")?,
            });
        }
        Ok(records)
    }

    /// Replaces re-encrypted ciphertexts in one transaction; returns how many were replaced.
    pub async fn replace_ciphertexts(
        &self,
        merchant_id: &str,
        records: Vec<Reencrypted<'_>>,
    ) -> Result<u64, StoreError> {
        let mut tx = self.pool().begin().await?;
        let mut replaced = 0;
        for record in records {
            replaced += sqlx::query(
                "UPDATE tokens SET ciphertext = $1, data_key_version = $2 \
                 WHERE merchant_id = $3 AND token = $4 AND data_key_version = $5 AND ciphertext = $6",
            )
            .bind(record.ciphertext)
            .bind(i64::from(record.data_key_version))
            .bind(merchant_id)
            .bind(record.token)
            .bind(i64::from(record.from_version))
            .bind(record.old_ciphertext)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        }
        tx.commit().await?;
        Ok(replaced)
    }

    /// When the merchant's data-key `version` was created.
    pub async fn data_key_created_at(&self, merchant_id: &str, version: u32) -> Result<i64, StoreError> {
        Ok(sqlx::query_scalar(
            "SELECT created_at FROM merchant_keys WHERE merchant_id = $1 AND purpose = 'data' AND version = $2",
        )
        .bind(merchant_id)
        .bind(i64::from(version))
        .fetch_one(self.pool())
        .await?)
    }

    /// The merchant's data-key versions older than `current`.
    pub async fn data_key_versions_before(
        &self,
        merchant_id: &str,
        current: u32,
    ) -> Result<Vec<u32>, StoreError> {
        let rows = sqlx::query(
            "SELECT version FROM merchant_keys WHERE merchant_id = $1 AND purpose = 'data' AND version < $2",
        )
        .bind(merchant_id)
        .bind(i64::from(current))
        .fetch_all(self.pool())
        .await?;
        rows.iter().map(|row| version_column(row, "version")).collect()
    }

    /// How many of the merchant's records hold data sealed under data-key `version`.
    pub async fn records_under_key(&self, merchant_id: &str, version: u32) -> Result<i64, StoreError> {
        Ok(sqlx::query_scalar(
            "SELECT COUNT(*) FROM tokens WHERE merchant_id = $1 AND data_key_version = $2 AND ciphertext IS NOT NULL",
        )
        .bind(merchant_id)
        .bind(i64::from(version))
        .fetch_one(self.pool())
        .await?)
    }

    /// Deletes data-key `version`, in the same statement checking that a newer version exists
    /// and no record references it; returns the rows deleted.
    pub async fn destroy_unreferenced_data_key(
        &self,
        merchant_id: &str,
        version: u32,
    ) -> Result<u64, StoreError> {
        Ok(sqlx::query(
            "DELETE FROM merchant_keys WHERE merchant_id = $1 AND purpose = 'data' AND version = $2 \
             AND version < (SELECT MAX(version) FROM merchant_keys WHERE merchant_id = $1 AND purpose = 'data') \
             AND NOT EXISTS (SELECT 1 FROM tokens WHERE merchant_id = $1 AND data_key_version = $2 \
                             AND ciphertext IS NOT NULL)",
        )
        .bind(merchant_id)
        .bind(i64::from(version))
        .execute(self.pool())
        .await?
        .rows_affected())
    }
}
