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
pub const STATUS_PROVISIONAL: &str = "provisional";
pub const STATUS_ACTIVE: &str = "active";
pub const STATUS_DELETED: &str = "deleted";
pub const STATUS_EXPIRED: &str = "expired";
pub const STATUS_CONSUMED: &str = "consumed";

/// A token record. `ciphertext` is `None` once the token is deleted, expired or consumed.
#[derive(Clone, PartialEq, Eq)]
pub struct TokenRecord {
    pub merchant_id: String,
    pub token: String,
    pub kind: String,
    pub data_type: String,
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
    pub holds_cvc: bool,
    pub status: String,
    pub created_at: UnixMillis,
    pub last_used_at: Option<UnixMillis>,
    pub ended_at: Option<UnixMillis>,
    pub expires_at: Option<UnixMillis>,
    pub retain_until: UnixMillis,
    pub retention_extended_months: u32,
}

impl fmt::Debug for TokenRecord {
    // Ciphertext and fingerprint are not secrets, but they are nobody's business in a log.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenRecord")
            .field("merchant_id", &self.merchant_id)
            .field("token", &self.token)
            .field("kind", &self.kind)
            .field("status", &self.status)
            .finish_non_exhaustive()
    }
}

/// A journal entry to write beside a change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JournalEntry<'a> {
    pub merchant_id: &'a str,
    pub token: &'a str,
    /// Transaction type: TK, DT, DL, CONFIRM, EXTEND, EXPIRE.
    pub kind: &'static str,
    pub caller: &'a str,
    pub at: UnixMillis,
    /// For DT, the stated purpose as `INITIATOR/MODEL/INTERACTION`.
    pub purpose: &'a str,
    pub detail: &'a str,
}

/// A journal entry as read back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JournalRecord {
    pub id: i64,
    pub kind: String,
    pub caller: String,
    pub at: UnixMillis,
    pub purpose: String,
    pub detail: String,
}

/// A token the sweeper ended, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Swept {
    pub merchant_id: String,
    pub token: String,
    pub reason: &'static str,
}

/// A page position in a shopper's token list: (created_at, token) of the last item shown.
pub type ListCursor = (UnixMillis, String);

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

const TOKEN_COLUMNS: &str = "merchant_id, token, kind, data_type, format, brand, first_six, last_four, \
     expiry_month, expiry_year, shopper_reference, fingerprint, fingerprint_key_version, ciphertext, \
     data_key_version, holds_cvc, status, created_at, last_used_at, ended_at, expires_at, retain_until, \
     retention_extended_months";

fn token_from_row(row: &sqlx::sqlite::SqliteRow) -> Result<TokenRecord, sqlx::Error> {
    Ok(TokenRecord {
        merchant_id: row.try_get("merchant_id")?,
        token: row.try_get("token")?,
        kind: row.try_get("kind")?,
        data_type: row.try_get("data_type")?,
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
        holds_cvc: row.try_get::<i64, _>("holds_cvc")? != 0,
        status: row.try_get("status")?,
        created_at: row.try_get("created_at")?,
        last_used_at: row.try_get("last_used_at")?,
        ended_at: row.try_get("ended_at")?,
        expires_at: row.try_get("expires_at")?,
        retain_until: row.try_get("retain_until")?,
        retention_extended_months: u32_column(row, "retention_extended_months")?,
    })
}

type Tx<'a> = sqlx::Transaction<'a, sqlx::Sqlite>;

/// A state change of one token, applied only if the token is in one of `from` states.
#[derive(Debug, Clone)]
pub struct Transition<'a> {
    pub from: &'a [&'a str],
    pub to: &'a str,
    /// Destroy ciphertext and fingerprint (deletion, expiry, consumption).
    pub destroy: bool,
    /// Clear the provisional or single-use deadline (confirmation).
    pub clear_deadline: bool,
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
            "SELECT version, blob FROM merchant_keys WHERE merchant_id = $1 AND purpose = $2 \
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
            "SELECT blob FROM merchant_keys WHERE merchant_id = $1 AND purpose = $2 AND version = $3",
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
                 VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING",
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
            "INSERT INTO tokens ({TOKEN_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, \
             $13, $14, $15, $16, $17, $18, $19, $20, $21, $22, $23)"
        ))
        .bind(&record.merchant_id)
        .bind(&record.token)
        .bind(&record.kind)
        .bind(&record.data_type)
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
        .bind(i64::from(record.holds_cvc))
        .bind(&record.status)
        .bind(record.created_at)
        .bind(record.last_used_at)
        .bind(record.ended_at)
        .bind(record.expires_at)
        .bind(record.retain_until)
        .bind(i64::from(record.retention_extended_months))
        .execute(&mut *tx)
        .await?;
        insert_journal(&mut tx, entry).await?;
        tx.commit().await?;
        Ok(())
    }

    /// The record of `token` for `merchant_id`; another merchant's token is simply not found.
    pub async fn token(&self, merchant_id: &str, token: &str) -> Result<Option<TokenRecord>, StoreError> {
        let row = sqlx::query(&format!(
            "SELECT {TOKEN_COLUMNS} FROM tokens WHERE merchant_id = $1 AND token = $2"
        ))
        .bind(merchant_id)
        .bind(token)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.as_ref().map(token_from_row).transpose()?)
    }

    /// The newest usable token of the same data (by fingerprint) for a merchant, shopper and
    /// kind, for deduplication.
    pub async fn usable_token_by_fingerprint(
        &self,
        merchant_id: &str,
        shopper_reference: &str,
        kind: &str,
        fingerprint: &[u8],
        now: UnixMillis,
    ) -> Result<Option<TokenRecord>, StoreError> {
        let row = sqlx::query(&format!(
            "SELECT {TOKEN_COLUMNS} FROM tokens WHERE merchant_id = $1 AND fingerprint = $2 \
             AND shopper_reference = $3 AND kind = $4 AND status = $5 \
             AND (expires_at IS NULL OR expires_at > $6) AND retain_until > $6 \
             ORDER BY created_at DESC LIMIT 1"
        ))
        .bind(merchant_id)
        .bind(fingerprint)
        .bind(shopper_reference)
        .bind(kind)
        .bind(STATUS_ACTIVE)
        .bind(now)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.as_ref().map(token_from_row).transpose()?)
    }

    /// Applies `change` to one token and journals it, in one transaction. Returns the record
    /// after the change, or `None` when the token was not in a `from` state (someone else
    /// changed it first, or it never was).
    pub async fn transition(
        &self,
        change: &Transition<'_>,
        entry: &JournalEntry<'_>,
    ) -> Result<Option<TokenRecord>, StoreError> {
        let mut tx = self.pool.begin().await?;
        if !apply_transition(&mut tx, entry.merchant_id, entry.token, change, entry.at).await? {
            return Ok(None);
        }
        insert_journal(&mut tx, entry).await?;
        let record = select_token(&mut tx, entry.merchant_id, entry.token).await?;
        tx.commit().await?;
        Ok(Some(record))
    }

    /// Records a detokenize: journals it, marks the token used (a single-use token consumed,
    /// its ciphertext destroyed), moves a non-card token's retention, and consumes the
    /// CVC-only token whose CVC was returned. All or nothing: `false` when the token (or the
    /// CVC token) stopped being usable meanwhile, and then nothing was written.
    pub async fn record_use(
        &self,
        entry: &JournalEntry<'_>,
        consume: bool,
        retain_until: Option<UnixMillis>,
        cvc_token: Option<&str>,
    ) -> Result<bool, StoreError> {
        let mut tx = self.pool.begin().await?;
        let used = sqlx::query(
            "UPDATE tokens SET last_used_at = $1, retain_until = COALESCE($2, retain_until), \
             status = CASE WHEN $3 = 1 THEN 'consumed' ELSE status END, \
             ended_at = CASE WHEN $3 = 1 THEN $1 ELSE ended_at END, \
             ciphertext = CASE WHEN $3 = 1 THEN NULL ELSE ciphertext END, \
             fingerprint = CASE WHEN $3 = 1 THEN NULL ELSE fingerprint END \
             WHERE merchant_id = $4 AND token = $5 AND status = 'active'",
        )
        .bind(entry.at)
        .bind(retain_until)
        .bind(i64::from(consume))
        .bind(entry.merchant_id)
        .bind(entry.token)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if used != 1 {
            return Ok(false);
        }
        if let Some(cvc_token) = cvc_token {
            let consume_cvc = Transition {
                from: &[STATUS_ACTIVE],
                to: STATUS_CONSUMED,
                destroy: true,
                clear_deadline: false,
            };
            if !apply_transition(&mut tx, entry.merchant_id, cvc_token, &consume_cvc, entry.at).await? {
                return Ok(false);
            }
            let detail = format!("CVC_RETURNED_WITH {}", entry.token);
            insert_journal(
                &mut tx,
                &JournalEntry {
                    token: cvc_token,
                    detail: &detail,
                    ..entry.clone()
                },
            )
            .await?;
        }
        insert_journal(&mut tx, entry).await?;
        tx.commit().await?;
        Ok(true)
    }

    /// Adds `months` of retention to an active token, within the 24-month lifetime cap, and
    /// journals it. `None` when the token is not active or the cap would be passed.
    pub async fn extend_retention(
        &self,
        entry: &JournalEntry<'_>,
        months: u32,
        retain_until: UnixMillis,
        cap: u32,
    ) -> Result<Option<TokenRecord>, StoreError> {
        let mut tx = self.pool.begin().await?;
        let changed = sqlx::query(
            "UPDATE tokens SET retain_until = $1, retention_extended_months = retention_extended_months + $2 \
             WHERE merchant_id = $3 AND token = $4 AND status = 'active' AND retention_extended_months + $2 <= $5",
        )
        .bind(retain_until)
        .bind(i64::from(months))
        .bind(entry.merchant_id)
        .bind(entry.token)
        .bind(i64::from(cap))
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if changed != 1 {
            return Ok(None);
        }
        insert_journal(&mut tx, entry).await?;
        let record = select_token(&mut tx, entry.merchant_id, entry.token).await?;
        tx.commit().await?;
        Ok(Some(record))
    }

    /// A shopper's usable multi-use tokens, newest first, after `cursor`.
    pub async fn list_usable(
        &self,
        merchant_id: &str,
        shopper_reference: &str,
        now: UnixMillis,
        cursor: Option<&ListCursor>,
        limit: u32,
    ) -> Result<Vec<TokenRecord>, StoreError> {
        let (after_created, after_token) = cursor.cloned().unwrap_or((i64::MAX, String::new()));
        let rows = sqlx::query(&format!(
            "SELECT {TOKEN_COLUMNS} FROM tokens WHERE merchant_id = $1 AND shopper_reference = $2 \
             AND status = 'active' AND kind IN ('card_on_file', 'recurrence') \
             AND (expires_at IS NULL OR expires_at > $3) AND retain_until > $3 \
             AND (created_at < $4 OR (created_at = $4 AND ($5 = '' OR token < $5))) \
             ORDER BY created_at DESC, token DESC LIMIT $6"
        ))
        .bind(merchant_id)
        .bind(shopper_reference)
        .bind(now)
        .bind(after_created)
        .bind(after_token)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(token_from_row)
            .collect::<Result<_, _>>()
            .map_err(StoreError::from)
    }

    /// Journal entries of one token, oldest first.
    pub async fn history(&self, merchant_id: &str, token: &str) -> Result<Vec<JournalRecord>, StoreError> {
        let rows = sqlx::query(
            "SELECT id, kind, caller, at, purpose, detail FROM journal WHERE merchant_id = $1 AND token = $2 \
             ORDER BY id",
        )
        .bind(merchant_id)
        .bind(token)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| {
                Ok(JournalRecord {
                    id: row.try_get("id")?,
                    kind: row.try_get("kind")?,
                    caller: row.try_get("caller")?,
                    at: row.try_get("at")?,
                    purpose: row.try_get("purpose")?,
                    detail: row.try_get("detail")?,
                })
            })
            .collect::<Result<_, sqlx::Error>>()
            .map_err(StoreError::from)
    }

    /// Ends up to `batch` tokens whose time has come, journalling each as EXPIRE, and returns
    /// them. Each row changes state once, whoever runs the sweep: the UPDATE re-checks the
    /// state, so two gateways sweeping together never expire (or journal) a token twice.
    pub async fn sweep(&self, now: UnixMillis, batch: u32, caller: &str) -> Result<Vec<Swept>, StoreError> {
        let scans: [(&str, &'static str); 3] = [
            (
                "status = 'provisional' AND expires_at <= $2",
                "PROVISIONAL_TIMEOUT",
            ),
            (
                "status = 'active' AND expires_at IS NOT NULL AND expires_at <= $2",
                "SINGLE_USE_TIMEOUT",
            ),
            (
                "status IN ('active', 'provisional') AND retain_until <= $2",
                "RETENTION",
            ),
        ];
        let mut swept = Vec::new();
        for (condition, reason) in scans {
            let mut tx = self.pool.begin().await?;
            let rows = sqlx::query(&format!(
                "UPDATE tokens SET status = 'expired', ended_at = $2, ciphertext = NULL, fingerprint = NULL \
                 WHERE (merchant_id, token) IN (SELECT merchant_id, token FROM tokens WHERE {condition} LIMIT $1) \
                 AND {condition} RETURNING merchant_id, token"
            ))
            .bind(i64::from(batch))
            .bind(now)
            .fetch_all(&mut *tx)
            .await?;
            for row in &rows {
                let merchant_id: String = row.try_get("merchant_id")?;
                let token: String = row.try_get("token")?;
                let entry = JournalEntry {
                    merchant_id: &merchant_id,
                    token: &token,
                    kind: "EXPIRE",
                    caller,
                    at: now,
                    purpose: "",
                    detail: reason,
                };
                insert_journal(&mut tx, &entry).await?;
                swept.push(Swept {
                    merchant_id,
                    token,
                    reason,
                });
            }
            tx.commit().await?;
        }
        Ok(swept)
    }
}

async fn select_token(tx: &mut Tx<'_>, merchant_id: &str, token: &str) -> Result<TokenRecord, StoreError> {
    let row = sqlx::query(&format!(
        "SELECT {TOKEN_COLUMNS} FROM tokens WHERE merchant_id = $1 AND token = $2"
    ))
    .bind(merchant_id)
    .bind(token)
    .fetch_one(&mut **tx)
    .await?;
    Ok(token_from_row(&row)?)
}

async fn apply_transition(
    tx: &mut Tx<'_>,
    merchant_id: &str,
    token: &str,
    change: &Transition<'_>,
    at: UnixMillis,
) -> Result<bool, StoreError> {
    let from = change
        .from
        .iter()
        .map(|state| format!("'{state}'"))
        .collect::<Vec<_>>()
        .join(", ");
    let changed = sqlx::query(&format!(
        "UPDATE tokens SET status = $1, \
         ended_at = CASE WHEN $2 = 1 THEN $3 ELSE ended_at END, \
         ciphertext = CASE WHEN $2 = 1 THEN NULL ELSE ciphertext END, \
         fingerprint = CASE WHEN $2 = 1 THEN NULL ELSE fingerprint END, \
         expires_at = CASE WHEN $4 = 1 THEN NULL ELSE expires_at END \
         WHERE merchant_id = $5 AND token = $6 AND status IN ({from})"
    ))
    .bind(change.to)
    .bind(i64::from(change.destroy))
    .bind(at)
    .bind(i64::from(change.clear_deadline))
    .bind(merchant_id)
    .bind(token)
    .execute(&mut **tx)
    .await?
    .rows_affected();
    Ok(changed == 1)
}

async fn insert_journal(tx: &mut Tx<'_>, entry: &JournalEntry<'_>) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO journal (merchant_id, token, kind, caller, at, purpose, detail) \
         VALUES ($1, $2, $3, $4, $5, $6, $7)",
    )
    .bind(entry.merchant_id)
    .bind(entry.token)
    .bind(entry.kind)
    .bind(entry.caller)
    .bind(entry.at)
    .bind(entry.purpose)
    .bind(entry.detail)
    .execute(&mut **tx)
    .await?;
    Ok(())
}
