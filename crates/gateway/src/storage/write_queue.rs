//! Group commit: every write of every concurrent request goes through a queue, and a writer
//! commits whatever has queued up as one transaction. A request is answered only after the
//! transaction holding its write is durable, so throughput is bounded by the disk's commit
//! rate divided by the batch size, not by one commit per request. A batch that fails as a whole
//! is retried op by op, so one bad write never fails its neighbours.
//!
//! A write that carries a merchant reference claims it in the same transaction (see
//! `records::claim_reference`): a strict reference already taken refuses that write
//! alone, and a token insert's claim is undone with it when the token collides.

use std::fmt;
use std::sync::Arc;

use sqlx::pool::PoolConnection;
use sqlx::{Any, AnyConnection, AnyPool, Connection as _, Row};
use tokio::sync::{mpsc, oneshot, Mutex};

use super::records::{
    apply_transition, claim_reference, insert_journal, select_token, values_rows, Backend, Journal,
    MerchantReference, StoreError, StoredKey, TokenRecord, TokenStatus, Transition, Tx, TOKEN_COLUMNS,
    TOKEN_COLUMN_COUNT,
};
use super::retry_guard;
use super::wal_checkpoint::WalCheckpoints;
use crate::clock::UnixMillis;
use crate::retry_guard::{Report, ReportState};

/// Most writes one transaction carries; bounds the latency a batch adds and the statement size.
const MAX_BATCH: usize = 512;
/// Rows per multi-row INSERT: 24 columns × 256 rows stays well under SQLite's 32766 and
/// PostgreSQL's 65535 bind parameters.
const ROWS_PER_INSERT: usize = 256;
/// `last_used_at` of a multi-use card token is kept to this precision (see `record_use`).
const LAST_USED_PRECISION_MS: i64 = 60_000;
/// Writes waiting for a writer; past this, requests wait to enqueue (back-pressure).
const QUEUE_DEPTH: usize = 8192;

/// One write of one request.
#[derive(Debug, Clone)]
pub enum WriteOp {
    /// Store wrapped keys unless present.
    InsertKeys { keys: Vec<StoredKey>, at: UnixMillis },
    /// Insert a token and its TK entry; a duplicate token inserts nothing. With a merchant
    /// reference, the token is inserted only if the reference is claimed, and the reference is
    /// claimed only if the token is inserted.
    InsertToken {
        record: Box<TokenRecord>,
        journal: Journal,
        reference: Option<MerchantReference>,
    },
    /// Insert many tokens (a bulk import chunk) in the same transaction.
    InsertTokens { rows: Vec<(TokenRecord, Journal)> },
    /// Change a token's state if it is in one of the expected states, and journal it.
    Transition { change: Transition, journal: Journal },
    /// Record a detokenize (see `Store::record_use`).
    RecordUse {
        journal: Journal,
        consume: bool,
        retain_until: Option<UnixMillis>,
        cvc_token: Option<String>,
    },
    /// Record an authorisation outcome and apply the retry guard's rules, unless its merchant
    /// reference is strict and taken.
    ReportAuthorization {
        report: Box<Report>,
        reference: Option<MerchantReference>,
    },
    /// Record a merchant reference alone (a deduplicated tokenize, which stores no token).
    RecordReference(MerchantReference),
    /// Extend retention within the cap.
    Extend {
        journal: Journal,
        months: u32,
        retain_until: UnixMillis,
        cap: u32,
    },
}

/// What a write did.
#[derive(Debug, Clone)]
pub enum WriteReply {
    Done,
    /// `false` when the token already existed.
    Inserted(bool),
    /// Per row of `InsertTokens`.
    InsertedMany(Vec<bool>),
    /// The record after the change; `None` when the change did not apply.
    Record(Option<Box<TokenRecord>>),
    /// `false` when the token stopped being usable first.
    Used(bool),
    /// The card's retry-guard state after a report.
    Reported(ReportState),
    /// The write's strict merchant reference was seen in the last 24 hours; nothing was
    /// written.
    ReferenceTaken,
}

struct Pending {
    op: WriteOp,
    reply: oneshot::Sender<Result<WriteReply, StoreError>>,
}

/// The handle requests write through; cheap to clone.
#[derive(Clone)]
pub struct GroupCommit {
    queue: mpsc::Sender<Pending>,
}

impl fmt::Debug for GroupCommit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GroupCommit").finish_non_exhaustive()
    }
}

impl GroupCommit {
    /// Starts the writers: one for SQLite (it has one writer anyway), a few for PostgreSQL so
    /// one batch's commit overlaps the next batch's statements.
    /// `wal` is SQLite's checkpointing, which the writer restarts between batches.
    pub async fn start(
        pool: AnyPool,
        backend: Backend,
        wal: Option<WalCheckpoints>,
    ) -> Result<Self, StoreError> {
        let (queue, receiver) = mpsc::channel(QUEUE_DEPTH);
        let receiver = Arc::new(Mutex::new(receiver));
        for _ in 0..Self::writers(backend) {
            tokio::spawn(writer(pool.clone(), Arc::clone(&receiver), wal.clone()));
        }
        Ok(Self { queue })
    }

    /// Writer tasks, each holding one connection of the pool for good.
    pub const fn writers(backend: Backend) -> u32 {
        match backend {
            Backend::Sqlite => 1,
            Backend::Postgres => 4,
        }
    }

    /// Queues `op` and waits until the transaction carrying it is committed.
    pub async fn write(&self, op: WriteOp) -> Result<WriteReply, StoreError> {
        let (reply, answer) = oneshot::channel();
        self.queue
            .send(Pending { op, reply })
            .await
            .map_err(|_| StoreError::Query("the writer has stopped".into()))?;
        answer
            .await
            .map_err(|_| StoreError::Query("the writer dropped the write".into()))?
    }
}

/// A writer keeps its own connection rather than taking any from the pool per batch: SQLite
/// drops a connection's page cache whenever another connection has written, so a writer that
/// moved between connections re-read the pages it had just written (a `pread` per page, 6% of
/// the gateway's CPU). A connection that fails is replaced.
async fn writer(pool: AnyPool, receiver: Arc<Mutex<mpsc::Receiver<Pending>>>, wal: Option<WalCheckpoints>) {
    let mut connection: Option<PoolConnection<Any>> = None;
    loop {
        let batch = {
            let mut receiver = receiver.lock().await;
            let Some(first) = receiver.recv().await else {
                return;
            };
            let mut batch = vec![first];
            while batch.len() < MAX_BATCH {
                match receiver.try_recv() {
                    Ok(pending) => batch.push(pending),
                    Err(_) => break,
                }
            }
            batch
        };
        let conn = match connection.as_mut() {
            Some(conn) => conn,
            None => match pool.acquire().await {
                Ok(conn) => connection.insert(conn),
                Err(err) => {
                    for pending in batch {
                        let _ = pending.reply.send(Err(StoreError::Query(err.to_string())));
                    }
                    continue;
                }
            },
        };
        if !commit(conn, batch).await && conn.ping().await.is_err() {
            tracing::warn!("the group-commit writer's connection failed; taking another");
            connection = None;
        } else if let Some(wal) = &wal {
            wal.restart_if_long(conn).await;
        }
    }
}

/// Commits `batch`; returns false if anything failed.
async fn commit(conn: &mut AnyConnection, batch: Vec<Pending>) -> bool {
    let ops: Vec<&WriteOp> = batch.iter().map(|pending| &pending.op).collect();
    let started = std::time::Instant::now();
    let outcome = run(conn, &ops).await;
    tracing::debug!(
        writes = ops.len(),
        micros = started.elapsed().as_micros(),
        "group commit"
    );
    match outcome {
        Ok(replies) => {
            for (pending, reply) in batch.into_iter().zip(replies) {
                let _ = pending.reply.send(Ok(reply));
            }
            true
        }
        Err(err) if batch.len() > 1 => {
            tracing::warn!(error = %err, writes = batch.len(), "group commit failed; retrying each write alone");
            for pending in batch {
                let reply = run(conn, &[&pending.op]).await.and_then(|mut replies| {
                    replies.pop().ok_or_else(|| StoreError::Query("no reply".into()))
                });
                let _ = pending.reply.send(reply);
            }
            false
        }
        Err(err) => {
            for pending in batch {
                let _ = pending.reply.send(Err(StoreError::Query(err.to_string())));
            }
            false
        }
    }
}

/// Runs `ops` in one transaction and commits it; replies in `ops` order.
async fn run(conn: &mut AnyConnection, ops: &[&WriteOp]) -> Result<Vec<WriteReply>, StoreError> {
    let mut tx = conn.begin().await?;
    let mut replies: Vec<Option<WriteReply>> = vec![None; ops.len()];
    claim_references(&mut tx, ops, &mut replies).await?;
    // Writes answered by their reference claims: refused, or (token inserts) done with them.
    let settled: Vec<bool> = replies.iter().map(Option::is_some).collect();
    let is_settled = |index: usize| settled.get(index).copied().unwrap_or(false);
    // Token inserts of the whole batch go in multi-row statements: two round trips for the
    // batch instead of two per token.
    let inserts: Vec<(usize, &TokenRecord, &Journal)> = ops
        .iter()
        .enumerate()
        .flat_map(|(index, op)| match op {
            WriteOp::InsertToken {
                record,
                journal,
                reference: None,
            } => vec![(index, record.as_ref(), journal)],
            WriteOp::InsertTokens { rows } => rows
                .iter()
                .map(|(record, journal)| (index, record, journal))
                .collect(),
            _ => Vec::new(),
        })
        .collect();
    let mut inserted_rows = TokenKeys::default();
    for chunk in inserts.chunks(ROWS_PER_INSERT) {
        let inserted = TokenKeys::from(insert_tokens(&mut tx, chunk).await?);
        for (index, record, _) in chunk {
            if let Some(slot) = replies.get_mut(*index) {
                *slot = Some(WriteReply::Inserted(inserted.contains_record(record)));
            }
        }
        let journals: Vec<&Journal> = chunk
            .iter()
            .filter(|(_, record, _)| inserted.contains_record(record))
            .map(|(_, _, journal)| *journal)
            .collect();
        insert_journals(&mut tx, &journals).await?;
        inserted_rows.extend(inserted);
    }
    let was_inserted = |record: &TokenRecord| inserted_rows.contains_record(record);
    // Row updates run in one order (by merchant and token) in every batch, so two writers'
    // batches that touch the same rows wait for each other instead of deadlocking. On SQLite,
    // plain uses come after them, set-based (see `mark_used_together`).
    let set_based_uses = Backend::of_connection(&tx) == Backend::Sqlite;
    let mut order: Vec<(usize, &WriteOp)> = Vec::with_capacity(ops.len());
    let mut plain_uses: Vec<(usize, &Journal)> = Vec::new();
    for (index, op) in ops.iter().copied().enumerate() {
        if is_settled(index) {
            continue;
        }
        match plain_use(op) {
            Some(journal) if set_based_uses => plain_uses.push((index, journal)),
            _ => order.push((index, op)),
        }
    }
    order.sort_by(|(_, a), (_, b)| row_key(a).cmp(&row_key(b)));
    for (index, op) in order {
        let reply = match op {
            WriteOp::InsertToken { record, .. } => WriteReply::Inserted(was_inserted(record)),
            WriteOp::InsertTokens { rows } => {
                WriteReply::InsertedMany(rows.iter().map(|(record, _)| was_inserted(record)).collect())
            }
            WriteOp::InsertKeys { keys, at } => {
                for key in keys {
                    sqlx::query(
                        "INSERT INTO merchant_keys (merchant_id, purpose, version, blob, created_at) \
                         VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING",
                    )
                    .bind(&key.merchant_id)
                    .bind(key.purpose)
                    .bind(i64::from(key.version))
                    .bind(&key.blob)
                    .bind(*at)
                    .execute(&mut *tx)
                    .await?;
                }
                WriteReply::Done
            }
            WriteOp::Transition { change, journal } => {
                if apply_transition(&mut tx, &journal.merchant_id, &journal.token, change, journal.at).await?
                {
                    insert_journal(&mut tx, journal).await?;
                    WriteReply::Record(Some(Box::new(
                        select_token(&mut tx, &journal.merchant_id, &journal.token).await?,
                    )))
                } else {
                    WriteReply::Record(None)
                }
            }
            WriteOp::ReportAuthorization { report, .. } => {
                WriteReply::Reported(retry_guard::apply(&mut tx, report).await?)
            }
            // Claimed in `claim_references`, which answered it.
            WriteOp::RecordReference(_) => WriteReply::Done,
            // PostgreSQL's plain uses, one by one in key order (see `mark_used_together`).
            WriteOp::RecordUse { journal, .. } if plain_use(op).is_some() => {
                let used = mark_used(&mut tx, journal, false, None).await?;
                if used {
                    insert_journal(&mut tx, journal).await?;
                }
                WriteReply::Used(used)
            }
            WriteOp::RecordUse {
                journal,
                consume,
                retain_until,
                cvc_token,
            } => WriteReply::Used(
                record_use(&mut tx, journal, *consume, *retain_until, cvc_token.as_deref()).await?,
            ),
            WriteOp::Extend {
                journal,
                months,
                retain_until,
                cap,
            } => {
                let changed = sqlx::query(
                    "UPDATE tokens SET retain_until = $1, \
                     retention_extended_months = retention_extended_months + $2 \
                     WHERE merchant_id = $3 AND token = $4 AND status = 'active' \
                     AND retention_extended_months + $2 <= $5",
                )
                .bind(*retain_until)
                .bind(i64::from(*months))
                .bind(&journal.merchant_id)
                .bind(&journal.token)
                .bind(i64::from(*cap))
                .execute(&mut *tx)
                .await?
                .rows_affected();
                if changed == 1 {
                    insert_journal(&mut tx, journal).await?;
                    WriteReply::Record(Some(Box::new(
                        select_token(&mut tx, &journal.merchant_id, &journal.token).await?,
                    )))
                } else {
                    WriteReply::Record(None)
                }
            }
        };
        if let Some(slot) = replies.get_mut(index) {
            *slot = Some(reply);
        }
    }
    if !plain_uses.is_empty() {
        let active = mark_used_together(&mut tx, plain_uses.iter().map(|(_, journal)| *journal)).await?;
        let mut journals = Vec::with_capacity(plain_uses.len());
        for (index, journal) in plain_uses {
            let used = active.contains(&journal.merchant_id, &journal.token);
            if used {
                journals.push(journal);
            }
            if let Some(slot) = replies.get_mut(index) {
                *slot = Some(WriteReply::Used(used));
            }
        }
        insert_journals(&mut tx, &journals).await?;
    }
    let committing = std::time::Instant::now();
    tx.commit().await?;
    // The commit's own share of the batch (its WAL writes and its fsync), beside the batch's
    // total in `commit`'s line: how much a faster disk would buy.
    tracing::debug!(micros = committing.elapsed().as_micros(), "group commit: COMMIT");
    replies
        .into_iter()
        .map(|reply| reply.ok_or_else(|| StoreError::Query("a write got no reply".into())))
        .collect()
}

/// Claims the merchant references of a batch's writes, before anything else the batch does,
/// in (merchant, reference) order: on PostgreSQL a claim waits for another writer's
/// transaction holding the same reference, and one order for every batch (references first,
/// then tokens in `row_key` order) keeps two batches from waiting on each other. Answers the
/// writes the claims settle: a strict reference already taken refuses its write; a token
/// insert with a reference is done here whole (see [`insert_referenced_token`]); a reference
/// recorded alone is done. A report whose reference is claimed is left for the main pass.
async fn claim_references(
    tx: &mut Tx<'_>,
    ops: &[&WriteOp],
    replies: &mut [Option<WriteReply>],
) -> Result<(), StoreError> {
    let mut claims: Vec<(usize, &WriteOp, &MerchantReference)> = ops
        .iter()
        .enumerate()
        .filter_map(|(index, op)| reference_of(op).map(|reference| (index, *op, reference)))
        .collect();
    // Stable, so two writes with one reference are claimed in the order they queued.
    claims.sort_by(|(_, _, a), (_, _, b)| {
        (a.merchant_id.as_str(), a.reference.as_str()).cmp(&(b.merchant_id.as_str(), b.reference.as_str()))
    });
    for (index, op, reference) in claims {
        let reply = if let WriteOp::InsertToken { record, journal, .. } = op {
            Some(insert_referenced_token(tx, record, journal, reference).await?)
        } else if !claim_reference(tx, reference).await? {
            Some(WriteReply::ReferenceTaken)
        } else if matches!(op, WriteOp::RecordReference(_)) {
            Some(WriteReply::Done)
        } else {
            None
        };
        if let (Some(slot), Some(reply)) = (replies.get_mut(index), reply) {
            *slot = Some(reply);
        }
    }
    Ok(())
}

/// The merchant reference a write claims, if any.
fn reference_of(op: &WriteOp) -> Option<&MerchantReference> {
    match op {
        WriteOp::InsertToken { reference, .. } | WriteOp::ReportAuthorization { reference, .. } => {
            reference.as_ref()
        }
        WriteOp::RecordReference(reference) => Some(reference),
        _ => None,
    }
}

/// Inserts a token and claims its merchant reference in a savepoint, all or nothing: a strict
/// reference already taken inserts no token ([`WriteReply::ReferenceTaken`]), and a token that
/// collides with an existing one takes no reference (`Inserted(false)`; the request draws
/// another token and claims again). Its own statements rather than the batch's multi-row
/// insert, since the claim must decide before the row goes in and a collision must undo it.
async fn insert_referenced_token(
    tx: &mut Tx<'_>,
    record: &TokenRecord,
    journal: &Journal,
    reference: &MerchantReference,
) -> Result<WriteReply, StoreError> {
    let mut savepoint = sqlx::Acquire::begin(&mut **tx).await?;
    if !claim_reference(&mut savepoint, reference).await? {
        savepoint.rollback().await?;
        return Ok(WriteReply::ReferenceTaken);
    }
    if insert_tokens(&mut savepoint, &[(0, record, journal)])
        .await?
        .is_empty()
    {
        savepoint.rollback().await?;
        return Ok(WriteReply::Inserted(false));
    }
    insert_journals(&mut savepoint, &[journal]).await?;
    savepoint.commit().await?;
    Ok(WriteReply::Inserted(true))
}

/// (merchant, token) of the rows a statement inserted, updated or found, sorted so a lookup is
/// a binary search: a batch of n rows checks each of them, which a linear scan made O(n²).
#[derive(Default)]
struct TokenKeys(Vec<(String, String)>);

impl From<Vec<(String, String)>> for TokenKeys {
    fn from(mut rows: Vec<(String, String)>) -> Self {
        rows.sort_unstable();
        Self(rows)
    }
}

impl TokenKeys {
    fn contains_record(&self, record: &TokenRecord) -> bool {
        self.contains(&record.merchant_id, &record.token)
    }

    fn contains(&self, merchant_id: &str, token: &str) -> bool {
        self.0
            .binary_search_by(|(merchant, row_token)| {
                (merchant.as_str(), row_token.as_str()).cmp(&(merchant_id, token))
            })
            .is_ok()
    }

    fn extend(&mut self, other: TokenKeys) {
        self.0.extend(other.0);
        self.0.sort_unstable();
    }
}

/// The journal entry of a plain use: a detokenize that neither consumes the token, nor moves
/// its retention, nor returns a CVC (most of them).
fn plain_use(op: &WriteOp) -> Option<&Journal> {
    match op {
        WriteOp::RecordUse {
            journal,
            consume: false,
            retain_until: None,
            cvc_token: None,
        } => Some(journal),
        _ => None,
    }
}

/// Marks the tokens of a batch's plain uses used, two statements for the whole batch rather
/// than two per use; returns those that are active (and so may be used). SQLite only: there
/// the batch is the only writer, so what it reads cannot be changing underneath it. On
/// PostgreSQL another gateway's transaction may be deleting a token right then; each use there
/// takes its row lock in the batch's key order instead ([`mark_used`]), which a set-based
/// statement cannot do without risking deadlocks between batches.
///
/// `last_used_at` changes only when it is unset or a minute old, as in [`mark_used`], so a
/// token paid with again and again is not rewritten each time.
async fn mark_used_together<'a>(
    tx: &mut Tx<'_>,
    journals: impl Iterator<Item = &'a Journal>,
) -> Result<TokenKeys, StoreError> {
    // A token used twice in one batch keeps its earliest use.
    let mut uses: Vec<(&str, &str, UnixMillis)> = journals
        .map(|journal| (journal.merchant_id.as_str(), journal.token.as_str(), journal.at))
        .collect();
    uses.sort_unstable();
    uses.dedup_by(|later, earlier| (later.0, later.1) == (earlier.0, earlier.1));
    let mut active = Vec::with_capacity(uses.len());
    for chunk in uses.chunks(ROWS_PER_INSERT) {
        let sql = mark_stale_used_sql(&values_rows(tx, chunk.len(), 3));
        let mut query = sqlx::query(&sql);
        for (merchant_id, token, at) in chunk {
            query = query.bind(*merchant_id).bind(*token).bind(*at);
        }
        let updated = TokenKeys::from(merchant_tokens(query.fetch_all(&mut **tx).await?)?);
        let unchanged: Vec<&(&str, &str, UnixMillis)> = chunk
            .iter()
            .filter(|(merchant_id, token, _)| !updated.contains(merchant_id, token))
            .collect();
        active.extend(updated.0);
        if unchanged.is_empty() {
            continue;
        }
        let sql = active_of_sql(&values_rows(tx, unchanged.len(), 2));
        let mut query = sqlx::query(&sql);
        for (merchant_id, token, _) in unchanged {
            query = query.bind(*merchant_id).bind(*token);
        }
        active.extend(merchant_tokens(query.fetch_all(&mut **tx).await?)?);
    }
    Ok(TokenKeys::from(active))
}

// Both statements name `v` first in a CROSS JOIN: SQLite then looks each (merchant, token) up
// by primary key. Left to itself SQLite 3.46 walked every active token through the
// `tokens_by_retention` index and scanned `v` for each, which took 0.5 s per batch once the
// table held 100,000 tokens.

/// Sets `last_used_at` of the active tokens in `values` (merchant, token, at) whose last use
/// is a minute old, returning their (merchant_id, token).
fn mark_stale_used_sql(values: &str) -> String {
    format!(
        "WITH v(m, t, at) AS (VALUES {values}), \
         stale(sm, st, sat) AS (SELECT tokens.merchant_id, tokens.token, v.at FROM v CROSS JOIN tokens \
         WHERE tokens.merchant_id = v.m AND tokens.token = v.t AND tokens.status = 'active' \
         AND (tokens.last_used_at IS NULL OR tokens.last_used_at <= v.at - {LAST_USED_PRECISION_MS})) \
         UPDATE tokens SET last_used_at = stale.sat FROM stale \
         WHERE merchant_id = stale.sm AND token = stale.st RETURNING merchant_id, token"
    )
}

/// (merchant_id, token) of the active tokens among `values` (merchant, token).
fn active_of_sql(values: &str) -> String {
    format!(
        "WITH v(m, t) AS (VALUES {values}) SELECT tokens.merchant_id, tokens.token FROM v CROSS JOIN tokens \
         WHERE tokens.merchant_id = v.m AND tokens.token = v.t AND tokens.status = 'active'"
    )
}

/// (merchant_id, token) of each row.
fn merchant_tokens(rows: Vec<sqlx::any::AnyRow>) -> Result<Vec<(String, String)>, StoreError> {
    rows.iter()
        .map(|row| Ok((row.try_get("merchant_id")?, row.try_get("token")?)))
        .collect::<Result<_, sqlx::Error>>()
        .map_err(StoreError::from)
}

/// The token row an op updates first, for a consistent lock order.
fn row_key(op: &WriteOp) -> (&str, &str) {
    match op {
        WriteOp::Transition { journal, .. }
        | WriteOp::RecordUse { journal, .. }
        | WriteOp::Extend { journal, .. } => (journal.merchant_id.as_str(), journal.token.as_str()),
        WriteOp::ReportAuthorization { report, .. } => (report.merchant_id.as_str(), report.token.as_str()),
        WriteOp::InsertKeys { .. }
        | WriteOp::InsertToken { .. }
        | WriteOp::InsertTokens { .. }
        | WriteOp::RecordReference(_) => ("", ""),
    }
}

/// Inserts token rows, skipping any that already exist; returns (merchant, token) of the rows
/// inserted.
async fn insert_tokens(
    tx: &mut Tx<'_>,
    rows: &[(usize, &TokenRecord, &Journal)],
) -> Result<Vec<(String, String)>, StoreError> {
    if rows.is_empty() {
        return Ok(Vec::new());
    }
    let placeholders = values_rows(tx, rows.len(), TOKEN_COLUMN_COUNT);
    let sql = format!(
        "INSERT INTO tokens ({TOKEN_COLUMNS}) VALUES {placeholders} ON CONFLICT DO NOTHING RETURNING merchant_id, token"
    );
    let mut query = sqlx::query(&sql);
    for (_, record, _) in rows {
        query = query
            .bind(record.merchant_id.clone())
            .bind(record.token.clone())
            .bind(record.kind.as_str())
            .bind(record.data_type.as_str())
            .bind(record.format.as_str())
            .bind(record.brand.clone())
            .bind(record.first_six.clone())
            .bind(record.last_four.clone())
            .bind(i64::from(record.expiry_month))
            .bind(i64::from(record.expiry_year))
            .bind(record.shopper_reference.clone())
            .bind(record.fingerprint.clone())
            .bind(i64::from(record.fingerprint_key_version))
            .bind(record.ciphertext.clone())
            .bind(i64::from(record.data_key_version))
            .bind(i64::from(record.holds_cvc))
            .bind(record.cvc_vault.clone())
            .bind(record.status.as_str())
            .bind(record.created_at)
            .bind(record.last_used_at)
            .bind(record.ended_at)
            .bind(record.expires_at)
            .bind(record.retain_until)
            .bind(i64::from(record.retention_extended_months));
    }
    merchant_tokens(query.fetch_all(&mut **tx).await?)
}

async fn insert_journals(tx: &mut Tx<'_>, journals: &[&Journal]) -> Result<(), StoreError> {
    for chunk in journals.chunks(ROWS_PER_INSERT) {
        if chunk.is_empty() {
            continue;
        }
        let placeholders = values_rows(tx, chunk.len(), 8);
        let sql = format!(
            "INSERT INTO journal (merchant_id, token, kind, caller, at, purpose, detail, payment_reference) \
             VALUES {placeholders}"
        );
        let mut query = sqlx::query(&sql);
        for journal in chunk {
            query = query
                .bind(journal.merchant_id.clone())
                .bind(journal.token.clone())
                .bind(journal.kind.as_str())
                .bind(journal.caller.clone())
                .bind(journal.at)
                .bind(journal.purpose.clone())
                .bind(journal.detail.clone())
                .bind(journal.payment_reference.clone());
        }
        query.execute(&mut **tx).await?;
    }
    Ok(())
}

/// See `Store::record_use`. A plain use (no consumption, no retention change, no CVC) is
/// [`mark_used`] alone, with its journal entry left to the caller to insert with the batch's
/// other plain uses; anything more runs here in a savepoint.
async fn record_use(
    tx: &mut Tx<'_>,
    journal: &Journal,
    consume: bool,
    retain_until: Option<UnixMillis>,
    cvc_token: Option<&str>,
) -> Result<bool, StoreError> {
    // A savepoint, so a use that turns out void (its CVC token was consumed meanwhile) leaves
    // no half-change inside the shared transaction.
    let mut savepoint = sqlx::Acquire::begin(&mut **tx).await?;
    if !mark_used(&mut savepoint, journal, consume, retain_until).await? {
        savepoint.rollback().await?;
        return Ok(false);
    }
    if let Some(cvc_token) = cvc_token {
        let consume_cvc = Transition {
            from: &[TokenStatus::Active],
            to: TokenStatus::Consumed,
            destroy: true,
            clear_deadline: false,
        };
        if !apply_transition(
            &mut savepoint,
            &journal.merchant_id,
            cvc_token,
            &consume_cvc,
            journal.at,
        )
        .await?
        {
            savepoint.rollback().await?;
            return Ok(false);
        }
        let cvc_entry = Journal {
            token: cvc_token.to_owned(),
            detail: format!("CVC_RETURNED_WITH {}", journal.token),
            ..journal.clone()
        };
        insert_journal(&mut savepoint, &cvc_entry).await?;
    }
    insert_journal(&mut savepoint, journal).await?;
    savepoint.commit().await?;
    Ok(true)
}

/// Marks the token of `journal` used (consumed, with a new retention end, or only its
/// `last_used_at`) if it is active; `false`, with nothing changed, if it is not.
async fn mark_used(
    tx: &mut Tx<'_>,
    journal: &Journal,
    consume: bool,
    retain_until: Option<UnixMillis>,
) -> Result<bool, StoreError> {
    let used = sqlx::query(
        "UPDATE tokens SET last_used_at = $1, retain_until = COALESCE($2, retain_until), \
         status = CASE WHEN $3 = 1 THEN 'consumed' ELSE status END, \
         ended_at = CASE WHEN $3 = 1 THEN $1 ELSE ended_at END, \
         ciphertext = CASE WHEN $3 = 1 THEN NULL ELSE ciphertext END, \
         fingerprint = CASE WHEN $3 = 1 THEN NULL ELSE fingerprint END \
         WHERE merchant_id = $4 AND token = $5 AND status = 'active' \
         AND ($3 = 1 OR $2 IS NOT NULL OR last_used_at IS NULL OR last_used_at <= $1 - $6)",
    )
    .bind(journal.at)
    .bind(retain_until)
    .bind(i64::from(consume))
    .bind(&journal.merchant_id)
    .bind(&journal.token)
    .bind(LAST_USED_PRECISION_MS)
    .execute(&mut **tx)
    .await?
    .rows_affected();
    // A multi-use card token used again within a minute keeps its last_used_at: then nothing
    // changes in the row, so repeated payments with one token do not queue on each other. Its
    // use must still find it active. On PostgreSQL `FOR SHARE` waits for a transaction that is
    // changing the row (another gateway deleting the token) and then reads what it committed,
    // so a use never follows a deletion it did not see; uses share the lock among themselves.
    let check = if Backend::of_connection(tx) == Backend::Postgres {
        "SELECT 1 AS one FROM tokens WHERE merchant_id = $1 AND token = $2 AND status = 'active' FOR SHARE"
    } else {
        "SELECT 1 AS one FROM tokens WHERE merchant_id = $1 AND token = $2 AND status = 'active'"
    };
    Ok(used == 1
        || (!consume
            && retain_until.is_none()
            && sqlx::query(check)
                .bind(&journal.merchant_id)
                .bind(&journal.token)
                .fetch_optional(&mut **tx)
                .await?
                .is_some()))
}

#[cfg(test)]
mod tests {
    // A failed setup step should stop the test where it happened.
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::purpose::Kind;
    use crate::storage::{DataType, JournalEntry, JournalKind, Store, TokenFormat};

    const MERCHANT: &str = "m_batch";
    const NOW: UnixMillis = 1_800_000_000_000;

    fn record(token: &str) -> TokenRecord {
        TokenRecord {
            merchant_id: MERCHANT.into(),
            token: token.into(),
            kind: Kind::CardOnFile,
            data_type: DataType::Card,
            format: TokenFormat::Opaque,
            brand: "VISA".into(),
            first_six: "411111".into(),
            last_four: "1111".into(),
            expiry_month: 12,
            expiry_year: 2030,
            shopper_reference: "shopper-1".into(),
            fingerprint: Some(vec![7; 32]),
            fingerprint_key_version: 1,
            ciphertext: Some(vec![9; 40]),
            data_key_version: 1,
            holds_cvc: false,
            cvc_vault: String::new(),
            status: TokenStatus::Active,
            created_at: NOW,
            last_used_at: None,
            ended_at: None,
            expires_at: None,
            retain_until: NOW + 1_000_000,
            retention_extended_months: 0,
        }
    }

    fn journal(token: &str, kind: JournalKind, at: UnixMillis) -> Journal {
        Journal {
            merchant_id: MERCHANT.into(),
            token: token.into(),
            kind,
            caller: "spiffe://tessera/test".into(),
            at,
            purpose: String::new(),
            detail: String::new(),
            payment_reference: String::new(),
        }
    }

    fn plain_use(token: &str, at: UnixMillis) -> WriteOp {
        WriteOp::RecordUse {
            journal: journal(token, JournalKind::Detokenize, at),
            consume: false,
            retain_until: None,
            cvc_token: None,
        }
    }

    const DELETION: Transition = Transition {
        from: &[TokenStatus::Active],
        to: TokenStatus::Deleted,
        destroy: true,
        clear_deadline: false,
    };

    fn delete(token: &str, at: UnixMillis) -> WriteOp {
        WriteOp::Transition {
            change: DELETION,
            journal: journal(token, JournalKind::Delete, at),
        }
    }

    async fn store_with(dir: &tempfile::TempDir, tokens: &[&str]) -> Store {
        let store = Store::open(&dir.path().join("batch.db").display().to_string())
            .await
            .unwrap();
        let rows = tokens
            .iter()
            .map(|token| (record(token), journal(token, JournalKind::Tokenize, NOW)))
            .collect();
        store.insert_tokens(rows).await.unwrap();
        store
    }

    fn kinds(history: &[crate::storage::JournalRecord]) -> Vec<&str> {
        history.iter().map(|entry| entry.kind.as_str()).collect()
    }

    /// Plain uses of a batch are marked together, after the batch's other changes: a use
    /// batched with a deletion of its token finds it deleted and writes nothing, so a token's
    /// journal entries always follow its changes; a token deleted earlier is refused; the
    /// others are journalled and marked used.
    #[tokio::test]
    async fn plain_uses_in_a_batch_follow_its_other_changes() {
        let dir = tempfile::tempdir().unwrap();
        let store = store_with(&dir, &["tok_a", "tok_b", "tok_c"]).await;
        let deleted = JournalEntry {
            merchant_id: MERCHANT,
            token: "tok_c",
            kind: JournalKind::Delete,
            caller: "spiffe://tessera/test",
            at: NOW,
            purpose: "",
            detail: "",
            payment_reference: "",
        };
        store.transition(&DELETION, &deleted).await.unwrap().unwrap();
        let ops = [
            plain_use("tok_a", NOW + 1),
            delete("tok_a", NOW + 2),
            plain_use("tok_b", NOW + 3),
            plain_use("tok_c", NOW + 4),
        ];
        let mut conn = store.pool().acquire().await.unwrap();
        let replies = run(&mut conn, &ops.iter().collect::<Vec<_>>()).await.unwrap();
        assert!(matches!(
            replies.as_slice(),
            [
                WriteReply::Used(false),
                WriteReply::Record(Some(_)),
                WriteReply::Used(true),
                WriteReply::Used(false)
            ]
        ));
        assert_eq!(
            kinds(&store.history(MERCHANT, "tok_a").await.unwrap()),
            ["TK", "DL"]
        );
        assert_eq!(
            kinds(&store.history(MERCHANT, "tok_b").await.unwrap()),
            ["TK", "DT"]
        );
        assert_eq!(
            kinds(&store.history(MERCHANT, "tok_c").await.unwrap()),
            ["TK", "DL"]
        );
        let used = store.token(MERCHANT, "tok_b").await.unwrap().unwrap();
        assert_eq!(used.last_used_at, Some(NOW + 3));
    }

    /// Uses a minute apart move `last_used_at`; uses within the minute keep it and are still
    /// journalled, in one batch or in the next.
    #[tokio::test]
    async fn last_used_at_moves_once_a_minute() {
        let dir = tempfile::tempdir().unwrap();
        let store = store_with(&dir, &["tok_a"]).await;
        let mut conn = store.pool().acquire().await.unwrap();
        let minute = LAST_USED_PRECISION_MS;
        for (at, last_used_at) in [
            (NOW + 5, NOW + 5),
            (NOW + minute, NOW + 5),
            (NOW + minute + 5, NOW + minute + 5),
        ] {
            let replies = run(&mut conn, &[&plain_use("tok_a", at)]).await.unwrap();
            assert!(matches!(replies.as_slice(), [WriteReply::Used(true)]));
            let record = store.token(MERCHANT, "tok_a").await.unwrap().unwrap();
            assert_eq!(record.last_used_at, Some(last_used_at), "after a use at {at}");
        }
        assert_eq!(
            kinds(&store.history(MERCHANT, "tok_a").await.unwrap()),
            ["TK", "DT", "DT", "DT"]
        );
    }

    /// The plain-use statements look tokens up by primary key, whatever the table holds (see
    /// `mark_stale_used_sql`): no line of SQLite's plan walks another index of `tokens`.
    #[tokio::test]
    async fn plain_use_statements_look_tokens_up_by_key() {
        let dir = tempfile::tempdir().unwrap();
        let store = store_with(&dir, &["tok_a"]).await;
        let mut conn = store.pool().acquire().await.unwrap();
        let rows = 64;
        for (sql, columns) in [
            (mark_stale_used_sql(&vec!["(?, ?, ?)"; rows].join(", ")), 3),
            (active_of_sql(&vec!["(?, ?)"; rows].join(", ")), 2),
        ] {
            let explain = format!("EXPLAIN QUERY PLAN {sql}");
            let mut query = sqlx::query(&explain);
            for _ in 0..rows {
                query = query.bind(MERCHANT).bind("tok_a");
                if columns == 3 {
                    query = query.bind(NOW);
                }
            }
            let plan: Vec<String> = query
                .fetch_all(&mut *conn)
                .await
                .unwrap()
                .iter()
                .map(|row| row.try_get::<String, _>(3).unwrap())
                .collect();
            for line in plan.iter().filter(|line| line.contains(" tokens ")) {
                assert!(line.contains("sqlite_autoindex_tokens_1"), "{line} in {plan:#?}");
            }
        }
    }

    fn strict(reference: &str) -> MerchantReference {
        MerchantReference {
            merchant_id: MERCHANT.into(),
            reference: reference.into(),
            strict: true,
            seen_at: NOW,
        }
    }

    fn insert(token: &str, reference: Option<&str>) -> WriteOp {
        WriteOp::InsertToken {
            record: Box::new(record(token)),
            journal: journal(token, JournalKind::Tokenize, NOW),
            reference: reference.map(strict),
        }
    }

    /// In one batch, the second write with a strict reference is refused and writes nothing,
    /// a colliding token takes no reference (so a later write in the batch takes it), and
    /// the batch's other writes go on.
    #[tokio::test]
    async fn a_taken_reference_refuses_only_its_own_write_in_a_batch() {
        let dir = tempfile::tempdir().unwrap();
        let store = store_with(&dir, &["tok_old"]).await;
        let ops = [
            insert("tok_a", Some("order-1")),
            insert("tok_b", Some("order-1")),
            insert("tok_old", Some("order-2")),
            insert("tok_c", None),
            WriteOp::RecordReference(strict("order-2")),
            WriteOp::RecordReference(strict("order-1")),
        ];
        let mut conn = store.pool().acquire().await.unwrap();
        let replies = run(&mut conn, &ops.iter().collect::<Vec<_>>()).await.unwrap();
        assert!(
            matches!(
                replies.as_slice(),
                [
                    WriteReply::Inserted(true),
                    WriteReply::ReferenceTaken,
                    WriteReply::Inserted(false),
                    WriteReply::Inserted(true),
                    WriteReply::Done,
                    WriteReply::ReferenceTaken,
                ]
            ),
            "{replies:?}"
        );
        assert!(store.token(MERCHANT, "tok_a").await.unwrap().is_some());
        assert!(store.token(MERCHANT, "tok_b").await.unwrap().is_none());
        assert!(store.history(MERCHANT, "tok_b").await.unwrap().is_empty());
        assert!(store.token(MERCHANT, "tok_c").await.unwrap().is_some());
        assert_eq!(kinds(&store.history(MERCHANT, "tok_old").await.unwrap()), ["TK"]);
    }

    /// A token used again within `LAST_USED_PRECISION_MS` keeps its `last_used_at` and is
    /// still journalled.
    #[tokio::test]
    async fn a_repeated_plain_use_is_journalled_without_rewriting_the_row() {
        let dir = tempfile::tempdir().unwrap();
        let store = store_with(&dir, &["tok_a"]).await;
        let ops = [plain_use("tok_a", NOW + 1), plain_use("tok_a", NOW + 2)];
        let mut conn = store.pool().acquire().await.unwrap();
        let replies = run(&mut conn, &ops.iter().collect::<Vec<_>>()).await.unwrap();
        assert!(replies
            .iter()
            .all(|reply| matches!(reply, WriteReply::Used(true))));
        assert_eq!(
            kinds(&store.history(MERCHANT, "tok_a").await.unwrap()),
            ["TK", "DT", "DT"]
        );
        let used = store.token(MERCHANT, "tok_a").await.unwrap().unwrap();
        assert_eq!(used.last_used_at, Some(NOW + 1));
    }
}
