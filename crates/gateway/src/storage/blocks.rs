//! Card blocks as the handlers and the sweeper read and end them.

use sqlx::Row;

use super::records::{insert_journal, Journal, JournalKind, StoreError};
use super::store::Store;
use crate::clock::UnixMillis;
use crate::retry_guard::Block;

impl Store {
    /// The blocks in force on a card (all agreements), latest end first.
    pub async fn active_blocks(
        &self,
        merchant_id: &str,
        fingerprint: &[u8],
        now: UnixMillis,
    ) -> Result<Vec<Block>, StoreError> {
        let rows = sqlx::query(
            "SELECT agreement, reason, blocked_until FROM card_blocks WHERE merchant_id = $1 AND fingerprint = $2 \
             AND blocked_until > $3 ORDER BY blocked_until DESC",
        )
        .bind(merchant_id)
        .bind(fingerprint)
        .bind(now)
        .fetch_all(self.pool())
        .await?;
        rows.iter()
            .map(|row| {
                Ok(Block {
                    agreement: row.try_get("agreement")?,
                    reason: row.try_get("reason")?,
                    until: row.try_get("blocked_until")?,
                })
            })
            .collect::<Result<_, sqlx::Error>>()
            .map_err(StoreError::from)
    }

    /// Ends blocks whose time ran out, journalling (and eventing) each as UNBLOCK on the token
    /// whose report caused it. Each block ends once, whichever gateway gets there first.
    pub async fn expire_blocks(&self, now: UnixMillis, caller: &str) -> Result<usize, StoreError> {
        let mut tx = self.pool().begin().await?;
        let rows = sqlx::query(
            "DELETE FROM card_blocks WHERE blocked_until <= $1 RETURNING merchant_id, agreement, token, reason",
        )
        .bind(now)
        .fetch_all(&mut *tx)
        .await?;
        for row in &rows {
            let agreement: String = row.try_get("agreement")?;
            let reason: String = row.try_get("reason")?;
            let entry = Journal {
                merchant_id: row.try_get("merchant_id")?,
                token: row.try_get("token")?,
                kind: JournalKind::Unblock,
                caller: caller.to_owned(),
                at: now,
                purpose: String::new(),
                detail: format!("{reason} ended agreement={agreement}"),
                payment_reference: String::new(),
            };
            insert_journal(&mut tx, &entry).await?;
        }
        tx.commit().await?;
        Ok(rows.len())
    }
}
