//! Durable token events. Each is written in the same transaction as the journal entry of the
//! change that caused it, numbered in commit order, and followed by subscribers from a
//! sequence number on (`SubscribeEvents`).
//!
//! Commit order matters: a subscriber that has seen sequence N must never later find an event
//! numbered below N. With several writers (several gateways on PostgreSQL) an identity column
//! would hand out numbers in insert order, not commit order, so a slow transaction could commit
//! number 7 after 8 was already read. Instead each transaction that writes events takes one
//! transaction-scoped lock, numbers its events after the current maximum and keeps the lock
//! until it commits: event numbers are assigned in commit order. (SQLite has one writer at a
//! time anyway, and numbers rows by itself.) The lock is taken at a transaction's first event and held until it commits,
//! so it serialises only the tail of group-commit batches that carry events.

use std::sync::Arc;
use std::time::Duration;

use sqlx::Row;
use tessera_api::v1::{EventType, SubscribeEventsRequest, TokenEvent};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Status;

use crate::api::Gateway;
use crate::clock::UnixMillis;
use crate::error::ApiError;
use crate::group_commit::Journal;
use crate::store::{Store, StoreError, Tx};

/// Any constant works: it only has to be the same in every gateway.
const EVENT_LOCK_KEY: i64 = 0x7e55_e7a0;
/// Events read per query while catching up.
const PAGE: i64 = 500;
/// How often a caught-up subscriber looks for new events.
const POLL: Duration = Duration::from_millis(200);

/// The event a journal entry of this kind stands for, if any (a detokenize or an
/// authorisation report is journalled but is not an event).
pub fn event_kind(journal_kind: &str) -> Option<&'static str> {
    match journal_kind {
        "TK" => Some("TOKEN_CREATED"),
        "CONFIRM" => Some("TOKEN_CONFIRMED"),
        "DL" => Some("TOKEN_DELETED"),
        "EXPIRE" => Some("TOKEN_EXPIRED"),
        "EXTEND" => Some("RETENTION_EXTENDED"),
        "BLOCK" => Some("CARD_BLOCKED"),
        "UNBLOCK" => Some("CARD_UNBLOCKED"),
        _ => None,
    }
}

/// Writes the events of these journal entries inside the caller's transaction.
pub(crate) async fn insert_events(tx: &mut Tx<'_>, journals: &[&Journal]) -> Result<(), StoreError> {
    let events: Vec<(&Journal, &'static str)> = journals
        .iter()
        .filter_map(|journal| event_kind(journal.kind).map(|kind| (*journal, kind)))
        .collect();
    if events.is_empty() {
        return Ok(());
    }
    let postgres = (**tx).backend_name() == "PostgreSQL";
    // SQLite has one writer, so rows inserted without a number take `seq` = MAX(seq) + 1 in
    // commit order by themselves (`seq` is the rowid): no lock and no query for the maximum,
    // one statement round trip less per batch. PostgreSQL numbers them under the lock.
    let next = if postgres {
        sqlx::query("SELECT pg_advisory_xact_lock($1)")
            .bind(EVENT_LOCK_KEY)
            .execute(&mut **tx)
            .await?;
        let next: i64 = sqlx::query("SELECT COALESCE(MAX(seq), 0) + 1 AS next FROM events")
            .fetch_one(&mut **tx)
            .await?
            .try_get("next")?;
        Some(next)
    } else {
        None
    };
    const ROWS: usize = 256;
    for (chunk_index, chunk) in events.chunks(ROWS).enumerate() {
        let (columns, seq_column) = if next.is_some() { (6, "seq, ") } else { (5, "") };
        let placeholders = crate::store::values_rows(tx, chunk.len(), columns);
        let sql = format!(
            "INSERT INTO events ({seq_column}merchant_id, token, kind, at, detail) VALUES {placeholders}"
        );
        let mut query = sqlx::query(&sql);
        let offset = chunk_index * ROWS;
        for (index, (journal, kind)) in chunk.iter().enumerate() {
            if let Some(next) = next {
                query = query.bind(next + i64::try_from(offset + index).unwrap_or(i64::MAX));
            }
            query = query
                .bind(journal.merchant_id.clone())
                .bind(journal.token.clone())
                .bind(*kind)
                .bind(journal.at)
                .bind(journal.detail.clone());
        }
        query.execute(&mut **tx).await?;
    }
    Ok(())
}

/// An event as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventRow {
    pub seq: i64,
    pub merchant_id: String,
    pub token: String,
    pub kind: String,
    pub at: UnixMillis,
    pub detail: String,
}

impl Store {
    /// A merchant's events after `after`, oldest first.
    pub async fn events_after(
        &self,
        merchant_id: &str,
        after: i64,
        limit: i64,
    ) -> Result<Vec<EventRow>, StoreError> {
        let rows = sqlx::query(
            "SELECT seq, merchant_id, token, kind, at, detail FROM events WHERE merchant_id = $1 AND seq > $2 \
             ORDER BY seq LIMIT $3",
        )
        .bind(merchant_id)
        .bind(after)
        .bind(limit)
        .fetch_all(self.pool())
        .await?;
        rows.iter()
            .map(|row| {
                Ok(EventRow {
                    seq: row.try_get("seq")?,
                    merchant_id: row.try_get("merchant_id")?,
                    token: row.try_get("token")?,
                    kind: row.try_get("kind")?,
                    at: row.try_get("at")?,
                    detail: row.try_get("detail")?,
                })
            })
            .collect::<Result<_, sqlx::Error>>()
            .map_err(StoreError::from)
    }
}

fn event_message(row: EventRow) -> TokenEvent {
    let kind =
        EventType::from_str_name(&format!("EVENT_TYPE_{}", row.kind)).unwrap_or(EventType::Unspecified);
    TokenEvent {
        sequence: u64::try_from(row.seq).unwrap_or(0),
        r#type: kind as i32,
        merchant_id: row.merchant_id,
        token: row.token,
        at: Some(prost_types::Timestamp {
            seconds: row.at.div_euclid(1000),
            nanos: i32::try_from(row.at.rem_euclid(1000) * 1_000_000).unwrap_or(0),
        }),
        detail: row.detail,
    }
}

/// The stream of one subscriber.
pub type EventStream = ReceiverStream<Result<TokenEvent, Status>>;

/// Streams a merchant's events after `request.after_sequence`, catching up page by page and
/// then polling, until the subscriber goes away. Polling the database (rather than a signal
/// inside one gateway) is what lets a subscriber of any gateway see events written by all.
pub fn subscribe(gateway: Arc<Gateway>, request: &SubscribeEventsRequest) -> Result<EventStream, ApiError> {
    let (events, stream) = mpsc::channel(64);
    let merchant_id = request.merchant_id.clone();
    let mut after = i64::try_from(request.after_sequence).map_err(|_| {
        ApiError::invalid(
            "after_sequence",
            "INVALID_SEQUENCE",
            "after_sequence is out of range",
        )
    })?;
    tokio::spawn(async move {
        loop {
            let page = match gateway.store.events_after(&merchant_id, after, PAGE).await {
                Ok(page) => page,
                Err(err) => {
                    tracing::warn!(error = %err, "reading events failed");
                    let _ = events
                        .send(Err(Status::unavailable("storage is unavailable; resubscribe")))
                        .await;
                    return;
                }
            };
            let caught_up = page.len() < usize::try_from(PAGE).unwrap_or(0);
            for row in page {
                after = row.seq;
                if events.send(Ok(event_message(row))).await.is_err() {
                    return;
                }
            }
            if caught_up {
                tokio::select! {
                    () = tokio::time::sleep(POLL) => {}
                    () = events.closed() => return,
                }
            }
        }
    });
    Ok(ReceiverStream::new(stream))
}
