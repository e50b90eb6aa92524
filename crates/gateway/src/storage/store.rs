//! The store: the gateway's database handle. Reads go to a pool; writes go through the write
//! queue ([`super::write_queue`]), which commits concurrent requests' writes together.

use std::time::Duration;

use sqlx::any::{AnyConnectOptions, AnyPoolOptions};
use sqlx::{AnyPool, Row};

use super::records::{
    enum_column, insert_journal, token_from_row, u32_column, Backend, Journal, JournalEntry, JournalKind,
    JournalRecord, ListCursor, MerchantReference, StoreError, StoredKey, Swept, TokenRecord, TokenStatus,
    Transition, TOKEN_COLUMNS,
};
use super::wal_checkpoint::{WalCheckpoints, SQLITE_BUSY_TIMEOUT};
use super::write_queue::{GroupCommit, WriteOp, WriteReply};
use crate::clock::UnixMillis;
use crate::purpose::Kind;
use crate::retry_guard::{Report, ReportState};

/// The gateway's database: a pool for reads and a group-commit writer for writes.
#[derive(Debug, Clone)]
pub struct Store {
    pool: AnyPool,
    writer: GroupCommit,
    backend: Backend,
}

impl Store {
    /// Opens the database named by `database` (an SQLite file path or a `postgres://` URL),
    /// runs migrations, and starts the group-commit writer.
    pub async fn open(database: &str) -> Result<Self, StoreError> {
        sqlx::any::install_default_drivers();
        let backend = Backend::of(database);
        let url = match backend {
            Backend::Postgres => database.to_owned(),
            Backend::Sqlite => {
                let path = database.strip_prefix("sqlite://").unwrap_or(database);
                format!("sqlite://{path}?mode=rwc")
            }
        };
        let options: AnyConnectOptions = url
            .parse()
            .map_err(|err: sqlx::Error| StoreError::Open(err.to_string()))?;
        let pool = AnyPoolOptions::new()
            .max_connections(read_pool_size(backend) + GroupCommit::writers(backend))
            .acquire_timeout(Duration::from_secs(10))
            .after_connect(move |conn, _| {
                Box::pin(async move {
                    if backend == Backend::Sqlite {
                        for pragma in SQLITE_PRAGMAS {
                            sqlx::query(pragma).execute(&mut *conn).await?;
                        }
                    }
                    Ok(())
                })
            })
            .connect_with(options)
            .await
            .map_err(|err| StoreError::Open(err.to_string()))?;
        let migrator = match backend {
            Backend::Sqlite => sqlx::migrate!("./migrations/sqlite"),
            Backend::Postgres => sqlx::migrate!("./migrations/postgres"),
        };
        migrator
            .run(&pool)
            .await
            .map_err(|err| StoreError::Open(err.to_string()))?;
        let wal = (backend == Backend::Sqlite).then(|| {
            let wal = WalCheckpoints::default();
            wal.spawn_background(pool.clone());
            wal
        });
        let writer = GroupCommit::start(pool.clone(), backend, wal).await?;
        Ok(Self {
            pool,
            writer,
            backend,
        })
    }

    /// Runs the migrations of `database` and returns, without starting anything: what
    /// `tessera migrate` does for operators who apply schema changes by hand.
    pub async fn migrate(database: &str) -> Result<(), StoreError> {
        Self::open(database).await?.pool.close().await;
        Ok(())
    }

    /// Inserts many token records (and their journal entries) in one transaction; returns, per
    /// record, whether it was inserted (`false`: the token already existed).
    pub async fn insert_tokens(&self, rows: Vec<(TokenRecord, Journal)>) -> Result<Vec<bool>, StoreError> {
        match self.writer.write(WriteOp::InsertTokens { rows }).await? {
            WriteReply::InsertedMany(inserted) => Ok(inserted),
            _ => Err(StoreError::Query("unexpected reply".into())),
        }
    }

    /// Records an authorisation outcome through the group-commit writer, with its merchant
    /// reference in the same transaction; [`StoreError::ReferenceTaken`], with nothing
    /// recorded, when the reference is strict and was seen in the last 24 hours.
    pub async fn report_authorization(
        &self,
        report: Report,
        reference: Option<MerchantReference>,
    ) -> Result<ReportState, StoreError> {
        let op = WriteOp::ReportAuthorization {
            report: Box::new(report),
            reference,
        };
        match self.writer.write(op).await? {
            WriteReply::Reported(state) => Ok(state),
            WriteReply::ReferenceTaken => Err(StoreError::ReferenceTaken),
            _ => Err(StoreError::Query("unexpected reply".into())),
        }
    }

    /// Records a merchant reference through the group-commit writer, for a request that
    /// succeeds without writing anything else; [`StoreError::ReferenceTaken`] when it is
    /// strict and was seen in the last 24 hours.
    pub async fn record_merchant_reference(&self, reference: MerchantReference) -> Result<(), StoreError> {
        match self.writer.write(WriteOp::RecordReference(reference)).await? {
            WriteReply::Done => Ok(()),
            WriteReply::ReferenceTaken => Err(StoreError::ReferenceTaken),
            _ => Err(StoreError::Query("unexpected reply".into())),
        }
    }

    /// The read pool, for the modules that keep their own queries (events, payment safety).
    pub(crate) fn pool(&self) -> &AnyPool {
        &self.pool
    }

    pub fn backend(&self) -> Backend {
        self.backend
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
        self.writer
            .write(WriteOp::InsertKeys {
                keys: keys.to_vec(),
                at,
            })
            .await
            .map(|_| ())
    }

    /// Inserts a token record and its journal entry, committed with whatever else is being
    /// written at the moment. `Duplicate` when the token already exists.
    pub async fn insert_token(&self, record: &TokenRecord, journal: &Journal) -> Result<(), StoreError> {
        self.insert_token_claiming(record, journal, None).await
    }

    /// Inserts a token and claims its merchant reference in one transaction: both or neither.
    /// [`StoreError::Duplicate`] when the token exists (the reference is not taken), and
    /// [`StoreError::ReferenceTaken`] when the reference is strict and was seen in the last
    /// 24 hours (no token is inserted).
    pub async fn insert_token_claiming(
        &self,
        record: &TokenRecord,
        journal: &Journal,
        reference: Option<&MerchantReference>,
    ) -> Result<(), StoreError> {
        let op = WriteOp::InsertToken {
            record: Box::new(record.clone()),
            journal: journal.clone(),
            reference: reference.cloned(),
        };
        match self.writer.write(op).await? {
            WriteReply::Inserted(true) => Ok(()),
            WriteReply::ReferenceTaken => Err(StoreError::ReferenceTaken),
            _ => Err(StoreError::Duplicate),
        }
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
        row.as_ref().map(token_from_row).transpose()
    }

    /// The newest usable token of the same data (by fingerprint) for a merchant, shopper and
    /// kind, for deduplication.
    pub async fn usable_token_by_fingerprint(
        &self,
        merchant_id: &str,
        shopper_reference: &str,
        kind: Kind,
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
        .bind(kind.as_str())
        .bind(TokenStatus::Active.as_str())
        .bind(now)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(token_from_row).transpose()
    }

    /// Applies `change` to one token and journals it, in one transaction. Returns the record
    /// after the change, or `None` when the token was not in a `from` state (someone else
    /// changed it first, or it never was).
    pub async fn transition(
        &self,
        change: &Transition,
        entry: &JournalEntry<'_>,
    ) -> Result<Option<TokenRecord>, StoreError> {
        match self
            .writer
            .write(WriteOp::Transition {
                change: change.clone(),
                journal: entry.into(),
            })
            .await?
        {
            WriteReply::Record(record) => Ok(record.map(|record| *record)),
            _ => Err(StoreError::Query("unexpected reply".into())),
        }
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
        let op = WriteOp::RecordUse {
            journal: entry.into(),
            consume,
            retain_until,
            cvc_token: cvc_token.map(str::to_owned),
        };
        match self.writer.write(op).await? {
            WriteReply::Used(used) => Ok(used),
            _ => Err(StoreError::Query("unexpected reply".into())),
        }
    }

    /// Adds `months` of retention to an active token, within the lifetime cap, and journals
    /// it. `None` when the token is not active or the cap would be passed.
    pub async fn extend_retention(
        &self,
        entry: &JournalEntry<'_>,
        months: u32,
        retain_until: UnixMillis,
        cap: u32,
    ) -> Result<Option<TokenRecord>, StoreError> {
        match self
            .writer
            .write(WriteOp::Extend {
                journal: entry.into(),
                months,
                retain_until,
                cap,
            })
            .await?
        {
            WriteReply::Record(record) => Ok(record.map(|record| *record)),
            _ => Err(StoreError::Query("unexpected reply".into())),
        }
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
        rows.iter().map(token_from_row).collect::<Result<_, _>>()
    }

    /// Journal entries of one token, oldest first.
    pub async fn history(&self, merchant_id: &str, token: &str) -> Result<Vec<JournalRecord>, StoreError> {
        self.history_page(merchant_id, token, 0, i64::MAX).await
    }

    /// Up to `limit` journal entries of a token after entry `after_id`, oldest first.
    pub async fn history_page(
        &self,
        merchant_id: &str,
        token: &str,
        after_id: i64,
        limit: i64,
    ) -> Result<Vec<JournalRecord>, StoreError> {
        let rows = sqlx::query(
            "SELECT id, kind, caller, at, purpose, detail FROM journal \
             WHERE merchant_id = $1 AND token = $2 AND id > $3 ORDER BY id LIMIT $4",
        )
        .bind(merchant_id)
        .bind(token)
        .bind(after_id)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| {
                Ok(JournalRecord {
                    id: row.try_get("id")?,
                    kind: enum_column(row, "kind", JournalKind::parse)?,
                    caller: row.try_get("caller")?,
                    at: row.try_get("at")?,
                    purpose: row.try_get("purpose")?,
                    detail: row.try_get("detail")?,
                })
            })
            .collect()
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
                    kind: JournalKind::Expire,
                    caller,
                    at: now,
                    purpose: "",
                    detail: reason,
                    payment_reference: "",
                };
                insert_journal(&mut tx, &Journal::from(&entry)).await?;
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

    /// Takes or renews the lease on background job `job` for `holder` until `now + ttl`, and
    /// returns whether `holder` now holds it. One conditional upsert decides: the row is
    /// written only when nobody holds the lease, it has run out, or `holder` already holds it,
    /// so of several gateways asking at once exactly one gets it (PostgreSQL serialises the
    /// conflicting inserts on the primary key; SQLite has one writer).
    ///
    /// `now` is wall-clock time shared by every gateway (never a test clock): a lease measures
    /// how long its holder may have been gone, so `ttl` must exceed the clock skew between
    /// hosts by a wide margin.
    pub async fn try_take_lease(
        &self,
        job: &str,
        holder: &str,
        now: UnixMillis,
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        let ttl_ms = i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX);
        let taken = sqlx::query(
            "INSERT INTO job_leases (job, holder, lease_until) VALUES ($1, $2, $3) \
             ON CONFLICT (job) DO UPDATE SET holder = excluded.holder, lease_until = excluded.lease_until \
             WHERE job_leases.lease_until <= $4 OR job_leases.holder = excluded.holder",
        )
        .bind(job)
        .bind(holder)
        .bind(now.saturating_add(ttl_ms))
        .bind(now)
        .execute(&self.pool)
        .await?
        .rows_affected();
        Ok(taken == 1)
    }
}

/// SQLite settings for many concurrent durable writes (documented in docs/storage.md):
/// - WAL: readers never block the writer and the writer never blocks readers.
/// - synchronous = FULL: a commit is on disk before any request it carries is answered.
/// - wal_autocheckpoint = 0: the writer never stalls copying pages; `WalCheckpoints` copies
///   them in the background and has the writer start the WAL over once it is 32 MiB long.
/// - journal_size_limit: a WAL file that grew past 64 MiB anyway is truncated back.
/// - cache_size = -8192: 8 MiB of page cache per connection. The kernel's page cache holds the
///   file for every connection at once; with 64 MiB each, six private caches filling up made
///   the gateway's resident set grow for minutes under load, with no throughput to show for it.
/// - busy_timeout: a writer briefly locked out (the sweeper, a second gateway) waits instead
///   of failing.
const SQLITE_PRAGMAS: &[&str] = &[
    "PRAGMA journal_mode = WAL",
    "PRAGMA synchronous = FULL",
    "PRAGMA wal_autocheckpoint = 0",
    "PRAGMA journal_size_limit = 67108864",
    "PRAGMA cache_size = -8192",
    "PRAGMA temp_store = MEMORY",
    SQLITE_BUSY_TIMEOUT,
    "PRAGMA foreign_keys = ON",
];

/// Read connections: enough for the machine's cores to be busy, with headroom for queries
/// waiting on the network (PostgreSQL) or on the disk.
fn read_pool_size(backend: Backend) -> u32 {
    let cores = std::thread::available_parallelism().map_or(2, std::num::NonZeroUsize::get);
    let per_core = match backend {
        Backend::Sqlite => 2,
        Backend::Postgres => 4,
    };
    u32::try_from(cores * per_core).unwrap_or(8).clamp(4, 64)
}
