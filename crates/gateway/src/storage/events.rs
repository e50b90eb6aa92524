//! The events table, as subscribers read it (the database writes it: see
//! `crate::handlers::events`).

use sqlx::Row;

use super::records::{enum_column, kind_of, u32_column, DataType, StoreError};
use super::store::Store;
use crate::clock::UnixMillis;
use crate::purpose::Kind;

/// An event as stored: what happened, and the facts of its token (as `tokens` stores them).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventRow {
    pub seq: i64,
    pub merchant_id: String,
    pub token: String,
    pub kind: String,
    pub at: UnixMillis,
    pub detail: String,
    pub shopper_reference: String,
    /// The token's kind; `None` only if the event's token row was missing when it was written.
    pub token_kind: Option<Kind>,
    /// The token's data type; `None` as for `token_kind`.
    pub data_type: Option<DataType>,
    pub brand: String,
    pub last_four: String,
    pub expiry_month: u32,
    pub expiry_year: u32,
    /// TOKEN_CONFIRMED only: the payment reference of the confirmation.
    pub payment_reference: String,
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
            "SELECT seq, merchant_id, token, kind, at, detail, shopper_reference, token_kind, data_type, brand, \
             last_four, expiry_month, expiry_year, payment_reference \
             FROM events WHERE merchant_id = $1 AND seq > $2 ORDER BY seq LIMIT $3",
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
                    shopper_reference: row.try_get("shopper_reference")?,
                    token_kind: enum_column(row, "token_kind", |text| optional(text, kind_of))?,
                    data_type: enum_column(row, "data_type", |text| optional(text, DataType::parse))?,
                    brand: row.try_get("brand")?,
                    last_four: row.try_get("last_four")?,
                    expiry_month: u32_column(row, "expiry_month")?,
                    expiry_year: u32_column(row, "expiry_year")?,
                    payment_reference: row.try_get("payment_reference")?,
                })
            })
            .collect()
    }
}

/// An event's copy of a token fact: empty when its token row was missing, else stored text.
fn optional<T>(
    text: &str,
    parse: impl FnOnce(&str) -> Result<T, StoreError>,
) -> Result<Option<T>, StoreError> {
    if text.is_empty() {
        Ok(None)
    } else {
        parse(text).map(Some)
    }
}
