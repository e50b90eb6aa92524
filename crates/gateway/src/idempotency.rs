//! Idempotency keys and strict merchant references: duplicate protection for payment services
//! that double-submit under failure.
//!
//! A key belongs to a merchant and a caller. The first request with a key claims it (one
//! conditional insert, atomic across gateways sharing the database), runs, and stores its
//! answer; a repeat within 24 hours with the same request gets that answer back; a repeat
//! while the first is still running waits for it (bounded) and is otherwise refused with
//! ABORTED; the same key with a different request is refused. "The same request" is judged by
//! a SHA-256 of the request's non-secret fields (card facts such as first six, last four and
//! expiry stand in for the card number, which is never hashed in the clear). A refused or
//! failed first request releases its key, so nothing is stored for bad input and a retry after
//! a transient failure runs again.
//!
//! A merchant reference is taken only by a request that succeeds: the group-commit writer
//! claims it ([`claim_reference`]) in the transaction that stores what the request made (its
//! token, or its authorisation outcome), so a request that fails before (vault unavailable,
//! refused input, no free token) leaves it free for the retry, and of two concurrent requests
//! with one strict reference exactly one succeeds.

use std::time::Duration;

use prost::Message;
use ring::digest::{digest, SHA256};
use sqlx::Row;
use tonic::Code;

use crate::clock::UnixMillis;
use crate::error::ApiError;
use crate::store::{Store, StoreError, Tx};

/// How long a first answer is replayed.
const REPLAY_WINDOW_MS: i64 = 24 * 3_600_000;
/// A claim not finished within this long was abandoned (its gateway died) and may be retaken.
const CLAIM_LEASE_MS: i64 = 60_000;
/// How long a repeat waits for the first request to finish before giving up with ABORTED.
const WAIT_FOR_FIRST: Duration = Duration::from_secs(5);
const POLL: Duration = Duration::from_millis(15);

/// SHA-256 over the request's non-secret parts, each length-prefixed so fields cannot run
/// into each other.
pub fn request_hash(parts: &[&[u8]]) -> Vec<u8> {
    let mut input = Vec::new();
    for part in parts {
        input.extend_from_slice(&(part.len() as u64).to_be_bytes());
        input.extend_from_slice(part);
    }
    digest(&SHA256, &input).as_ref().to_vec()
}

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

/// A merchant reference to record with a write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MerchantReference {
    pub merchant_id: String,
    pub reference: String,
    /// When true, the write is refused if the reference was seen in the last 24 hours.
    pub strict: bool,
    pub seen_at: UnixMillis,
}

/// Records `reference` in the writer's transaction `tx`. False, with nothing changed, when it
/// is strict and was seen for the merchant in the last 24 hours: then the write it guards must
/// not happen. A reference that is not strict is recorded (or left as it was, when seen in the
/// window) and never refused. On PostgreSQL a concurrent transaction claiming the same
/// reference waits here until the first one commits or rolls back, then sees its outcome.
pub(crate) async fn claim_reference(
    tx: &mut Tx<'_>,
    reference: &MerchantReference,
) -> Result<bool, StoreError> {
    let fresh = sqlx::query(
        "INSERT INTO merchant_references (merchant_id, reference, seen_at) VALUES ($1, $2, $3) \
         ON CONFLICT (merchant_id, reference) DO UPDATE SET seen_at = excluded.seen_at \
         WHERE merchant_references.seen_at <= $4",
    )
    .bind(&reference.merchant_id)
    .bind(&reference.reference)
    .bind(reference.seen_at)
    .bind(reference.seen_at - REPLAY_WINDOW_MS)
    .execute(&mut **tx)
    .await?
    .rows_affected()
        == 1;
    Ok(fresh || !reference.strict)
}

fn storage(err: StoreError) -> ApiError {
    crate::api::store_error(err)
}

/// Runs `work` under an idempotency key (or plainly when `key` is empty): the first answer is
/// stored and replayed to repeats.
pub async fn run<T, F>(
    store: &Store,
    scope: (&str, &str),
    key: &str,
    method: &str,
    hash: Vec<u8>,
    now: UnixMillis,
    work: F,
) -> Result<T, ApiError>
where
    T: Message + Default,
    F: std::future::Future<Output = Result<T, ApiError>>,
{
    if key.is_empty() {
        return work.await;
    }
    crate::validate::idempotency_key(key)?;
    let (merchant_id, caller) = scope;
    match store
        .begin_idempotent(merchant_id, caller, key, method, &hash, now)
        .await?
    {
        Begin::Replay(bytes) => T::decode(bytes.as_slice()).map_err(|_| {
            ApiError::internal("IDEMPOTENCY_REPLAY_FAILED", "the stored answer could not be read")
        }),
        Begin::Run(claim) => {
            let result = work.await;
            let stored = result.as_ref().ok().map(Message::encode_to_vec);
            if let Err(err) = store.finish_idempotent(&claim, stored).await {
                tracing::error!(error = %err, "could not finish an idempotency key");
            }
            result
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_separate_fields() {
        assert_ne!(request_hash(&[b"ab", b"c"]), request_hash(&[b"a", b"bc"]));
        assert_eq!(request_hash(&[b"x"]).len(), 32);
    }
}
