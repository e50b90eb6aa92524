//! The idempotency keys' table (see `crate::idempotency` for the rules): claiming a key,
//! replaying or releasing it, and the read-only hint that a strict merchant reference is taken.

use std::time::Duration;

use sqlx::Row;
use tonic::Code;

use super::records::{store_error, StoreError, REPLAY_WINDOW_MS};
use super::store::Store;
use crate::clock::UnixMillis;
use crate::error::ApiError;

/// A claim not finished within this long was abandoned (its gateway died) and may be retaken.
const CLAIM_LEASE_MS: i64 = 60_000;
/// How long a repeat waits for the first request to finish before giving up with ABORTED.
const WAIT_FOR_FIRST: Duration = Duration::from_secs(5);
const POLL: Duration = Duration::from_millis(15);

/// A claimed key, to be finished with the request's outcome.
#[derive(Debug, Clone)]
pub struct Claim {
    merchant_id: String,
    caller: String,
    key: String,
}

/// What to do with a request that carries a key.
#[derive(Debug)]
pub enum Begin {
    /// This request owns the key: run it, then `finish`.
    Run(Claim),
    /// The first request finished: answer with its encoded response.
    Replay(Vec<u8>),
}

impl Store {
    /// Claims `key` for a request, or finds the first request's answer.
    pub async fn begin_idempotent(
        &self,
        merchant_id: &str,
        caller: &str,
        key: &str,
        method: &str,
        hash: &[u8],
        now: UnixMillis,
    ) -> Result<Begin, ApiError> {
        let started = tokio::time::Instant::now();
        loop {
            let claimed = sqlx::query(
                "INSERT INTO idempotency_keys (merchant_id, caller, key, method, request_hash, state, created_at, locked_until) \
                 VALUES ($1, $2, $3, $4, $5, 'in_flight', $6, $7) \
                 ON CONFLICT (merchant_id, caller, key) DO UPDATE SET method = excluded.method, \
                 request_hash = excluded.request_hash, state = 'in_flight', response = NULL, \
                 created_at = excluded.created_at, locked_until = excluded.locked_until \
                 WHERE idempotency_keys.created_at <= $8 \
                 OR (idempotency_keys.state = 'in_flight' AND idempotency_keys.locked_until <= $6)",
            )
            .bind(merchant_id)
            .bind(caller)
            .bind(key)
            .bind(method)
            .bind(hash)
            .bind(now)
            .bind(now + CLAIM_LEASE_MS)
            .bind(now - REPLAY_WINDOW_MS)
            .execute(self.pool())
            .await
            .map_err(|err| storage(err.into()))?
            .rows_affected();
            if claimed == 1 {
                return Ok(Begin::Run(Claim {
                    merchant_id: merchant_id.to_owned(),
                    caller: caller.to_owned(),
                    key: key.to_owned(),
                }));
            }
            let row = sqlx::query(
                "SELECT method, request_hash, state, response FROM idempotency_keys \
                 WHERE merchant_id = $1 AND caller = $2 AND key = $3",
            )
            .bind(merchant_id)
            .bind(caller)
            .bind(key)
            .fetch_optional(self.pool())
            .await
            .map_err(|err| storage(err.into()))?;
            // Released between the two statements (the first request failed): claim again.
            let Some(row) = row else { continue };
            let stored_method: String = row.try_get("method").map_err(|err| storage(err.into()))?;
            let stored_hash: Vec<u8> = row.try_get("request_hash").map_err(|err| storage(err.into()))?;
            if stored_method != method || stored_hash != hash {
                return Err(ApiError::invalid(
                    "idempotency_key",
                    "IDEMPOTENCY_KEY_REUSED",
                    "this idempotency_key was used for a different request in the last 24 hours",
                ));
            }
            let state: String = row.try_get("state").map_err(|err| storage(err.into()))?;
            if state == "done" {
                let response: Option<Vec<u8>> = row.try_get("response").map_err(|err| storage(err.into()))?;
                return Ok(Begin::Replay(response.unwrap_or_default()));
            }
            if started.elapsed() >= WAIT_FOR_FIRST {
                return Err(ApiError::new(
                    Code::Aborted,
                    "IDEMPOTENCY_IN_FLIGHT",
                    "a request with this idempotency_key is still in progress; retry later",
                ));
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Stores the first answer, or releases the key when the request failed.
    pub async fn finish_idempotent(
        &self,
        claim: &Claim,
        response: Option<Vec<u8>>,
    ) -> Result<(), StoreError> {
        let query = match &response {
            Some(_) => {
                "UPDATE idempotency_keys SET state = 'done', response = $4 \
                        WHERE merchant_id = $1 AND caller = $2 AND key = $3"
            }
            None => "DELETE FROM idempotency_keys WHERE merchant_id = $1 AND caller = $2 AND key = $3",
        };
        let mut statement = sqlx::query(query)
            .bind(&claim.merchant_id)
            .bind(&claim.caller)
            .bind(&claim.key);
        if let Some(response) = response {
            statement = statement.bind(response);
        }
        statement.execute(self.pool()).await?;
        Ok(())
    }

    /// True when `reference` was seen for this merchant in the last 24 hours: a strict
    /// request with it is refused before any work. Only a hint, read outside any write; the
    /// claim in the writer's transaction decides.
    pub async fn merchant_reference_taken(
        &self,
        merchant_id: &str,
        reference: &str,
        now: UnixMillis,
    ) -> Result<bool, StoreError> {
        let row = sqlx::query(
            "SELECT 1 AS one FROM merchant_references \
             WHERE merchant_id = $1 AND reference = $2 AND seen_at > $3",
        )
        .bind(merchant_id)
        .bind(reference)
        .bind(now - REPLAY_WINDOW_MS)
        .fetch_optional(self.pool())
        .await?;
        Ok(row.is_some())
    }
}

fn storage(err: StoreError) -> ApiError {
    store_error(err)
}
