//! Token storage: wrapped merchant keys, token records (ciphertext and metadata) and the
//! journal, in SQLite through sqlx with embedded migrations.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{Row, SqlitePool};

use crate::clock::UnixMillis;

/// A storage failure. Messages name tables and operations, never card data.
#[derive(Debug)]
#[non_exhaustive]
pub enum StoreError {
    /// The row to insert already exists (same merchant and token).
    Duplicate,
    /// The database could not be opened or migrated.
    Open(String),
    /// A query failed.
    Query(String),
}

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Duplicate => f.write_str("row already exists"),
            Self::Open(why) => write!(f, "cannot open the database: {why}"),
            Self::Query(why) => write!(f, "database query failed: {why}"),
        }
    }
}

impl std::error::Error for StoreError {}

impl From<sqlx::Error> for StoreError {
    fn from(err: sqlx::Error) -> Self {
        match &err {
            sqlx::Error::Database(db) if db.is_unique_violation() => Self::Duplicate,
            _ => Self::Query(err.to_string()),
        }
    }
}

/// A wrapped key as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredKey {
    pub merchant_id: String,
    pub purpose: &'static str,
    pub version: u32,
    pub blob: Vec<u8>,
}

/// Token lifecycle states as stored.
pub const STATUS_ACTIVE: &str = "active";
pub const STATUS_DELETED: &str = "deleted";

/// A token record. `ciphertext` is `None` once the token is deleted.
#[derive(Clone, PartialEq, Eq)]
pub struct TokenRecord {
    pub merchant_id: String,
    pub token: String,
    pub format: String,
    pub brand: String,
    pub first_six: String,
    pub last_four: String,
    pub expiry_month: u32,
    pub expiry_year: u32,
    pub shopper_reference: String,
    pub fingerprint: Option<Vec<u8>>,
    pub fingerprint_key_version: u32,
    pub ciphertext: Option<Vec<u8>>,
    pub data_key_version: u32,
    pub status: String,
    pub created_at: UnixMillis,
    pub deleted_at: Option<UnixMillis>,
}

impl fmt::Debug for TokenRecord {
    // Ciphertext and fingerprint are not secrets, but they are nobody's business in a log.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenRecord")
            .field("merchant_id", &self.merchant_id)
            .field("token", &self.token)
            .field("status", &self.status)
            .finish_non_exhaustive()
    }
}

/// A journal entry to write beside a change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JournalEntry<'a> {
    pub merchant_id: &'a str,
    pub token: &'a str,
    /// Transaction type: TK tokenize, DT detokenize, DL delete.
    pub kind: &'static str,
    pub caller: &'a str,
    pub at: UnixMillis,
    pub detail: &'a str,
}

/// The gateway's database.
#[derive(Debug, Clone)]
pub struct Store {
    pool: SqlitePool,
}

fn u32_column(row: &sqlx::sqlite::SqliteRow, name: &str) -> Result<u32, sqlx::Error> {
    let value: i64 = row.try_get(name)?;
    u32::try_from(value).map_err(|err| sqlx::Error::ColumnDecode {
        index: name.to_owned(),
        source: Box::new(err),
    })
}

const TOKEN_COLUMNS: &str = "merchant_id, token, format, brand, first_six, last_four, expiry_month, \
     expiry_year, shopper_reference, fingerprint, fingerprint_key_version, ciphertext, data_key_version, \
     status, created_at, deleted_at";

fn token_from_row(row: &sqlx::sqlite::SqliteRow) -> Result<TokenRecord, sqlx::Error> {
    Ok(TokenRecord {
        merchant_id: row.try_get("merchant_id")?,
        token: row.try_get("token")?,
        format: row.try_get("format")?,
        brand: row.try_get("brand")?,
        first_six: row.try_get("first_six")?,
        last_four: row.try_get("last_four")?,
        expiry_month: u32_column(row, "expiry_month")?,
        expiry_year: u32_column(row, "expiry_year")?,
        shopper_reference: row.try_get("shopper_reference")?,
        fingerprint: row.try_get("fingerprint")?,
        fingerprint_key_version: u32_column(row, "fingerprint_key_version")?,
        ciphertext: row.try_get("ciphertext")?,
        data_key_version: u32_column(row, "data_key_version")?,
        status: row.try_get("status")?,
        created_at: row.try_get("created_at")?,
        deleted_at: row.try_get("deleted_at")?,
    })
}

impl Store {
    /// Opens (creating if needed) the SQLite database at `path` and runs migrations.
    ///
    /// WAL lets readers proceed beside the writer; `synchronous = FULL` makes every commit
    /// durable before the request that caused it is acknowledged.
    pub async fn open(database: &str) -> Result<Self, StoreError> {
        let path = database.strip_prefix("sqlite://").unwrap_or(database);
        let options = SqliteConnectOptions::from_str(&format!("sqlite://{path}"))
            .map_err(|err| StoreError::Open(err.to_string()))?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .busy_timeout(Duration::from_secs(10))
            .foreign_keys(true);
        let pool = SqlitePoolOptions::new()
            .max_connections(8)
            .connect_with(options)
            .await
            .map_err(|err| StoreError::Open(err.to_string()))?;
        sqlx::migrate!("./migrations/sqlite")
            .run(&pool)
            .await
            .map_err(|err| StoreError::Open(err.to_string()))?;
        Ok(Self { pool })
    }

    /// The newest version of a merchant's key for `purpose`, if it has one.
    pub async fn current_key(
        &self,
        merchant_id: &str,
        purpose: &'static str,
    ) -> Result<Option<StoredKey>, StoreError> {
        let row = sqlx::query(
            "SELECT version, blob FROM merchant_keys WHERE merchant_id = ? AND purpose = ? \
             ORDER BY version DESC LIMIT 1",
        )
        .bind(merchant_id)
        .bind(purpose)
        .fetch_optional(&self.pool)
        .await?;
        row.map(|row| {
            Ok::<_, sqlx::Error>(StoredKey {
                merchant_id: merchant_id.to_owned(),
                purpose,
                version: u32_column(&row, "version")?,
                blob: row.try_get("blob")?,
            })
        })
        .transpose()
        .map_err(StoreError::from)
    }

    /// A given version of a merchant's key.
    pub async fn key(
        &self,
        merchant_id: &str,
        purpose: &'static str,
        version: u32,
    ) -> Result<Option<StoredKey>, StoreError> {
        let blob: Option<Vec<u8>> = sqlx::query_scalar(
            "SELECT blob FROM merchant_keys WHERE merchant_id = ? AND purpose = ? AND version = ?",
        )
        .bind(merchant_id)
        .bind(purpose)
        .bind(i64::from(version))
        .fetch_optional(&self.pool)
        .await?;
        Ok(blob.map(|blob| StoredKey {
            merchant_id: merchant_id.to_owned(),
            purpose,
            version,
            blob,
        }))
    }

    /// Stores wrapped keys unless that merchant, purpose and version already has one (another
    /// request or gateway won the race; the caller then reads the winner's key back).
    pub async fn insert_keys(&self, keys: &[StoredKey], at: UnixMillis) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await?;
        for key in keys {
            sqlx::query(
                "INSERT INTO merchant_keys (merchant_id, purpose, version, blob, created_at) \
                 VALUES (?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
            )
            .bind(&key.merchant_id)
            .bind(key.purpose)
            .bind(i64::from(key.version))
            .bind(&key.blob)
            .bind(at)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Inserts a token record and its journal entry in one transaction.
    pub async fn insert_token(
        &self,
        record: &TokenRecord,
        entry: &JournalEntry<'_>,
    ) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await?;
        sqlx::query(&format!(
            "INSERT INTO tokens ({TOKEN_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
        ))
        .bind(&record.merchant_id)
        .bind(&record.token)
        .bind(&record.format)
        .bind(&record.brand)
        .bind(&record.first_six)
        .bind(&record.last_four)
        .bind(i64::from(record.expiry_month))
        .bind(i64::from(record.expiry_year))
        .bind(&record.shopper_reference)
        .bind(&record.fingerprint)
        .bind(i64::from(record.fingerprint_key_version))
        .bind(&record.ciphertext)
        .bind(i64::from(record.data_key_version))
        .bind(&record.status)
        .bind(record.created_at)
        .bind(record.deleted_at)
        .execute(&mut *tx)
        .await?;
        insert_journal(&mut tx, entry).await?;
        tx.commit().await?;
        Ok(())
    }

    /// The record of `token` for `merchant_id`; another merchant's token is simply not found.
    pub async fn token(&self, merchant_id: &str, token: &str) -> Result<Option<TokenRecord>, StoreError> {
        let row = sqlx::query(&format!(
            "SELECT {TOKEN_COLUMNS} FROM tokens WHERE merchant_id = ? AND token = ?"
        ))
        .bind(merchant_id)
        .bind(token)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.as_ref().map(token_from_row).transpose()?)
    }

    /// The newest active token of the same card (by fingerprint) for a merchant and shopper.
    pub async fn active_token_by_fingerprint(
        &self,
        merchant_id: &str,
        shopper_reference: &str,
        fingerprint: &[u8],
    ) -> Result<Option<TokenRecord>, StoreError> {
        let row = sqlx::query(&format!(
            "SELECT {TOKEN_COLUMNS} FROM tokens WHERE merchant_id = ? AND fingerprint = ? \
             AND shopper_reference = ? AND status = ? ORDER BY created_at DESC LIMIT 1"
        ))
        .bind(merchant_id)
        .bind(fingerprint)
        .bind(shopper_reference)
        .bind(STATUS_ACTIVE)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.as_ref().map(token_from_row).transpose()?)
    }

    /// Writes a journal entry on its own (a detokenize changes no record).
    pub async fn journal(&self, entry: &JournalEntry<'_>) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await?;
        insert_journal(&mut tx, entry).await?;
        tx.commit().await?;
        Ok(())
    }

    /// Marks an active token deleted, destroys its ciphertext and fingerprint, and journals
    /// it, in one transaction. `None` when there was no active token to delete.
    pub async fn delete_token(&self, entry: &JournalEntry<'_>) -> Result<Option<TokenRecord>, StoreError> {
        let mut tx = self.pool.begin().await?;
        let changed = sqlx::query(
            "UPDATE tokens SET status = ?, ciphertext = NULL, fingerprint = NULL, deleted_at = ? \
             WHERE merchant_id = ? AND token = ? AND status = ?",
        )
        .bind(STATUS_DELETED)
        .bind(entry.at)
        .bind(entry.merchant_id)
        .bind(entry.token)
        .bind(STATUS_ACTIVE)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if changed == 0 {
            return Ok(None);
        }
        insert_journal(&mut tx, entry).await?;
        let row = sqlx::query(&format!(
            "SELECT {TOKEN_COLUMNS} FROM tokens WHERE merchant_id = ? AND token = ?"
        ))
        .bind(entry.merchant_id)
        .bind(entry.token)
        .fetch_one(&mut *tx)
        .await?;
        let record = token_from_row(&row)?;
        tx.commit().await?;
        Ok(Some(record))
    }

    /// Journal entries of one token, oldest first: (kind, caller, at, detail).
    pub async fn history(
        &self,
        merchant_id: &str,
        token: &str,
    ) -> Result<Vec<(String, String, UnixMillis, String)>, StoreError> {
        let rows = sqlx::query(
            "SELECT kind, caller, at, detail FROM journal WHERE merchant_id = ? AND token = ? ORDER BY id",
        )
        .bind(merchant_id)
        .bind(token)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| {
                Ok((
                    row.try_get("kind")?,
                    row.try_get("caller")?,
                    row.try_get("at")?,
                    row.try_get("detail")?,
                ))
            })
            .collect::<Result<_, sqlx::Error>>()
            .map_err(StoreError::from)
    }
}

async fn insert_journal(
    tx: &mut sqlx::Transaction<'_, sqlx::Sqlite>,
    entry: &JournalEntry<'_>,
) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO journal (merchant_id, token, kind, caller, at, detail) VALUES (?, ?, ?, ?, ?, ?)",
    )
    .bind(entry.merchant_id)
    .bind(entry.token)
    .bind(entry.kind)
    .bind(entry.caller)
    .bind(entry.at)
    .bind(entry.detail)
    .execute(&mut **tx)
    .await?;
    Ok(())
}
