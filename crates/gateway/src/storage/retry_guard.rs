//! The retry guard's statements (see `crate::retry_guard` for the rules): a report recorded in
//! the write queue's transaction, with the block it sets, extends or lifts.

use sqlx::Row;

use super::records::{insert_journal, Journal, JournalKind, StoreError, Tx};
use crate::clock::UnixMillis;
use crate::retry_guard::{Block, Outcome, Report, ReportState};

const HOUR_MS: i64 = 3_600_000;

fn journal(report: &Report, kind: JournalKind, detail: String) -> Journal {
    Journal {
        merchant_id: report.merchant_id.clone(),
        token: report.token.clone(),
        kind,
        caller: report.caller.clone(),
        at: report.at,
        purpose: String::new(),
        detail,
        payment_reference: String::new(),
    }
}

/// Applies a report inside the writer's transaction: records the attempt, then blocks,
/// extends or lifts a block as the rules say, journalling (and so eventing) each change.
pub(crate) async fn apply(tx: &mut Tx<'_>, report: &Report) -> Result<ReportState, StoreError> {
    sqlx::query(
        "INSERT INTO authorization_attempts (merchant_id, agreement, fingerprint, token, outcome, at) \
         VALUES ($1, $2, $3, $4, $5, $6)",
    )
    .bind(&report.merchant_id)
    .bind(&report.agreement)
    .bind(&report.fingerprint)
    .bind(&report.token)
    .bind(report.outcome.as_str())
    .bind(report.at)
    .execute(&mut **tx)
    .await?;
    insert_journal(
        tx,
        &journal(
            report,
            JournalKind::Authorization,
            format!("{} agreement={}", report.outcome.as_str(), report.agreement),
        ),
    )
    .await?;

    let existing = block_of(tx, report).await?;
    let limit = report.rule.map_or(0, |rule| rule.limit);
    match report.outcome {
        Outcome::Approved => {
            // An approval resets the count, and lifts a block that the count caused.
            if existing
                .as_ref()
                .is_some_and(|block| block.reason == "RETRY_LIMIT")
            {
                delete_block(tx, report).await?;
                insert_journal(
                    tx,
                    &journal(
                        report,
                        JournalKind::Unblock,
                        format!("APPROVED agreement={}", report.agreement),
                    ),
                )
                .await?;
            }
            Ok(ReportState {
                failed_attempts: 0,
                limit,
                block: existing.filter(|block| block.reason != "RETRY_LIMIT"),
            })
        }
        Outcome::DoNotRetry => {
            let until = report.at + report.do_not_retry_ms;
            let block = Block {
                agreement: report.agreement.clone(),
                reason: "DO_NOT_RETRY".into(),
                until,
            };
            let stronger = existing
                .as_ref()
                .is_some_and(|old| old.reason == "DO_NOT_RETRY" && old.until >= until);
            if !stronger {
                set_block(tx, report, &block).await?;
                insert_journal(
                    tx,
                    &journal(
                        report,
                        JournalKind::Block,
                        format!("DO_NOT_RETRY agreement={}", report.agreement),
                    ),
                )
                .await?;
            }
            let failed = failures(tx, report).await?.len();
            Ok(ReportState {
                failed_attempts: u32::try_from(failed).unwrap_or(u32::MAX),
                limit,
                block: if stronger { existing } else { Some(block) },
            })
        }
        Outcome::Declined => {
            let failed = failures(tx, report).await?;
            let count = u32::try_from(failed.len()).unwrap_or(u32::MAX);
            let Some(rule) = report.rule else {
                return Ok(ReportState {
                    failed_attempts: count,
                    limit,
                    block: existing,
                });
            };
            if count < rule.limit {
                return Ok(ReportState {
                    failed_attempts: count,
                    limit,
                    block: existing,
                });
            }
            // Blocked until enough failures leave the sliding window for the count to drop
            // below the limit again.
            let index = failed
                .len()
                .saturating_sub(usize::try_from(rule.limit).unwrap_or(usize::MAX));
            let oldest_counted = failed.get(index).copied().unwrap_or(report.at);
            let until = oldest_counted + i64::from(rule.window_hours) * HOUR_MS;
            let block = Block {
                agreement: report.agreement.clone(),
                reason: "RETRY_LIMIT".into(),
                until,
            };
            match existing {
                Some(old) if old.until >= until => Ok(ReportState {
                    failed_attempts: count,
                    limit,
                    block: Some(old),
                }),
                _ => {
                    set_block(tx, report, &block).await?;
                    insert_journal(
                        tx,
                        &journal(
                            report,
                            JournalKind::Block,
                            format!("RETRY_LIMIT agreement={} attempts={count}", report.agreement),
                        ),
                    )
                    .await?;
                    Ok(ReportState {
                        failed_attempts: count,
                        limit,
                        block: Some(block),
                    })
                }
            }
        }
    }
}

/// Times of the failed attempts that count now: inside the window and after the last approval.
async fn failures(tx: &mut Tx<'_>, report: &Report) -> Result<Vec<UnixMillis>, StoreError> {
    let window_start = report.rule.map_or(report.at, |rule| {
        report.at - i64::from(rule.window_hours) * HOUR_MS
    });
    let rows = sqlx::query(
        "SELECT at FROM authorization_attempts WHERE merchant_id = $1 AND agreement = $2 AND fingerprint = $3 \
         AND outcome IN ('declined', 'do_not_retry') AND at > $4 \
         AND at > COALESCE((SELECT MAX(at) FROM authorization_attempts WHERE merchant_id = $1 AND agreement = $2 \
             AND fingerprint = $3 AND outcome = 'approved'), -1) \
         ORDER BY at",
    )
    .bind(&report.merchant_id)
    .bind(&report.agreement)
    .bind(&report.fingerprint)
    .bind(window_start)
    .fetch_all(&mut **tx)
    .await?;
    rows.iter()
        .map(|row| row.try_get("at"))
        .collect::<Result<_, sqlx::Error>>()
        .map_err(StoreError::from)
}

async fn block_of(tx: &mut Tx<'_>, report: &Report) -> Result<Option<Block>, StoreError> {
    let row = sqlx::query(
        "SELECT agreement, reason, blocked_until FROM card_blocks WHERE merchant_id = $1 AND agreement = $2 \
         AND fingerprint = $3 AND blocked_until > $4",
    )
    .bind(&report.merchant_id)
    .bind(&report.agreement)
    .bind(&report.fingerprint)
    .bind(report.at)
    .fetch_optional(&mut **tx)
    .await?;
    row.map(|row| {
        Ok(Block {
            agreement: row.try_get("agreement")?,
            reason: row.try_get("reason")?,
            until: row.try_get("blocked_until")?,
        })
    })
    .transpose()
    .map_err(|err: sqlx::Error| StoreError::from(err))
}

async fn set_block(tx: &mut Tx<'_>, report: &Report, block: &Block) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO card_blocks (merchant_id, agreement, fingerprint, reason, token, blocked_until) \
         VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (merchant_id, agreement, fingerprint) \
         DO UPDATE SET reason = excluded.reason, token = excluded.token, blocked_until = excluded.blocked_until",
    )
    .bind(&report.merchant_id)
    .bind(&report.agreement)
    .bind(&report.fingerprint)
    .bind(&block.reason)
    .bind(&report.token)
    .bind(block.until)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

async fn delete_block(tx: &mut Tx<'_>, report: &Report) -> Result<(), StoreError> {
    sqlx::query("DELETE FROM card_blocks WHERE merchant_id = $1 AND agreement = $2 AND fingerprint = $3")
        .bind(&report.merchant_id)
        .bind(&report.agreement)
        .bind(&report.fingerprint)
        .execute(&mut **tx)
        .await?;
    Ok(())
}
