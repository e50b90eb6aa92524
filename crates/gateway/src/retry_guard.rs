//! The retry guard: card schemes penalise merchants that retry declined cards too often, so
//! Tessera counts failed authorisations per merchant, acquiring agreement and card (by keyed
//! fingerprint, so every token of the same card counts together) and blocks merchant-initiated
//! use of a card that reached its scheme's limit or got a "do not retry" answer. Cardholder-
//! initiated use is never blocked: the cardholder is there to fix the problem.

use serde::Deserialize;
use sqlx::Row;

use crate::clock::UnixMillis;
use crate::group_commit::Journal;
use crate::store::{Store, StoreError, Tx};

const HOUR_MS: i64 = 3_600_000;

/// A scheme's limit: at most `limit` failed attempts in `window_hours`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetryRule {
    pub limit: u32,
    pub window_hours: u32,
}

/// Retry-guard configuration; the defaults are the schemes' published rules.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetryGuardConfig {
    /// Mastercard: 10 failed attempts in 24 hours.
    pub mastercard: RetryRule,
    /// Visa: 15 failed attempts in 30 days.
    pub visa: RetryRule,
    /// How long a "do not retry" answer blocks the card.
    pub do_not_retry_block_hours: u32,
}

impl Default for RetryGuardConfig {
    fn default() -> Self {
        Self {
            mastercard: RetryRule {
                limit: 10,
                window_hours: 24,
            },
            visa: RetryRule {
                limit: 15,
                window_hours: 30 * 24,
            },
            do_not_retry_block_hours: 30 * 24,
        }
    }
}

impl RetryGuardConfig {
    /// The rule for a card brand (as stored, e.g. "VISA"); other brands have no attempt limit.
    pub fn rule(&self, brand: &str) -> Option<RetryRule> {
        match brand {
            "MASTERCARD" => Some(self.mastercard),
            "VISA" => Some(self.visa),
            _ => None,
        }
    }
}

/// A reported outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Approved,
    Declined,
    DoNotRetry,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Approved => "approved",
            Self::Declined => "declined",
            Self::DoNotRetry => "do_not_retry",
        }
    }
}

/// One report, as the writer applies it.
#[derive(Debug, Clone)]
pub struct Report {
    pub merchant_id: String,
    pub agreement: String,
    pub fingerprint: Vec<u8>,
    pub token: String,
    pub outcome: Outcome,
    pub at: UnixMillis,
    pub caller: String,
    pub rule: Option<RetryRule>,
    pub do_not_retry_ms: i64,
}

/// A block on merchant-initiated use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Block {
    pub agreement: String,
    /// RETRY_LIMIT or DO_NOT_RETRY.
    pub reason: String,
    pub until: UnixMillis,
}

/// The card's state after a report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReportState {
    pub failed_attempts: u32,
    pub limit: u32,
    pub block: Option<Block>,
}

fn journal(report: &Report, kind: &'static str, detail: String) -> Journal {
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
    crate::store::insert_journal(
        tx,
        &journal(
            report,
            "AUTH",
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
                crate::store::insert_journal(
                    tx,
                    &journal(
                        report,
                        "UNBLOCK",
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
                crate::store::insert_journal(
                    tx,
                    &journal(
                        report,
                        "BLOCK",
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
                    crate::store::insert_journal(
                        tx,
                        &journal(
                            report,
                            "BLOCK",
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
                kind: "UNBLOCK",
                caller: caller.to_owned(),
                at: now,
                purpose: String::new(),
                detail: format!("{reason} ended agreement={agreement}"),
                payment_reference: String::new(),
            };
            crate::store::insert_journal(&mut tx, &entry).await?;
        }
        tx.commit().await?;
        Ok(rows.len())
    }
}
