//! Durable token events, followed by subscribers from a sequence number on
//! (`SubscribeEvents`).
//!
//! The database writes them: a trigger on the journal (`journal_writes_events`, migrations
//! `0004_events_by_trigger.sql`, on PostgreSQL once per statement since
//! `0005_events_per_statement.sql`) inserts an event for each journal entry whose kind is one,
//! in the same transaction, numbered in commit order (on PostgreSQL under a
//! transaction-scoped advisory lock; SQLite has one writer). So no code path can journal a
//! change and forget its event, and a batch pays no statement for its events. Since
//! `0006_event_token_facts.sql` the trigger also copies the token's facts a subscriber needs
//! (shopper reference, kind, data type, brand, last four, expiry) from its row, and a
//! confirmation's payment reference from its journal entry, so an event can be used without a
//! GetToken; never card data. This module streams them (`crate::storage` reads them).

use std::sync::Arc;
use std::time::Duration;

use tessera_api::v1::{DataType, EventType, SubscribeEventsRequest, TokenEvent, TokenKind};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Status;

use crate::error::ApiError;
use crate::mapping::{brand_of, data_type_of};
use crate::purpose::Kind;
use crate::state::Gateway;
use crate::storage::EventRow;

/// Events read per query while catching up.
const PAGE: i64 = 500;
/// How often a caught-up subscriber looks for new events.
const POLL: Duration = Duration::from_millis(200);

fn event_message(row: EventRow) -> TokenEvent {
    let kind =
        EventType::from_str_name(&format!("EVENT_TYPE_{}", row.kind)).unwrap_or(EventType::Unspecified);
    // Empty only if the event's token row was missing when it was written, which no code path
    // does; then the event says nothing about the kind rather than guess card-on-file.
    let token_kind = row.token_kind.map_or(TokenKind::Unspecified, Kind::to_proto);
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
        shopper_reference: row.shopper_reference,
        token_kind: token_kind as i32,
        data_type: row.data_type.map_or(DataType::Unspecified, data_type_of) as i32,
        brand: brand_of(&row.brand) as i32,
        last_four: row.last_four,
        expiry_month: row.expiry_month,
        expiry_year: row.expiry_year,
        payment_reference: row.payment_reference,
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
                    // The subscriber resubscribes from the last sequence it saw and misses
                    // nothing; the error says so with a reason like every other.
                    let error = ApiError::unavailable(
                        "STORAGE_UNAVAILABLE",
                        "storage is unavailable; resubscribe after the last sequence seen",
                    );
                    tracing::warn!(error = %err, "reading events failed");
                    let _ = events.send(Err(error.into())).await;
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
