//! What every flow shares: finding a merchant's token, authorising a call about one token,
//! applying a state change, checking a merchant reference, and the lifecycle rules (whether a
//! token still exists, whether it may be used, when retention ends).

use tonic::Code;

use crate::clock::{add_months, end_of_month, UnixMillis};
use crate::error::ApiError;
use crate::idempotency::MerchantReference;
use crate::policy::Operation;
use crate::state::Gateway;
use crate::storage::{store_error, DataType, JournalEntry, StoreError, TokenRecord, TokenStatus, Transition};
use crate::validate;

/// Card tokens are kept this long after the card expires; other tokens this long after their
/// last use.
const RETENTION_MONTHS: u32 = 14;

pub(crate) fn duplicate_reference() -> ApiError {
    ApiError::new(
        Code::AlreadyExists,
        "DUPLICATE",
        "this merchant_reference was already used for this merchant in the last 24 hours",
    )
}

/// A write that claimed a merchant reference failed: DUPLICATE when the strict reference was
/// taken (by a concurrent request that got there first), else a storage failure.
pub(crate) fn reference_error(err: StoreError) -> ApiError {
    match err {
        StoreError::ReferenceTaken => duplicate_reference(),
        err => store_error(err),
    }
}

pub(crate) fn precondition(reason: &'static str, message: &'static str) -> ApiError {
    ApiError::new(Code::FailedPrecondition, reason, message)
}

/// Whether the record's own deadlines have passed, whether or not the sweeper has run yet.
pub(crate) fn past_deadline(record: &TokenRecord, now: UnixMillis) -> bool {
    record.expires_at.is_some_and(|at| at <= now) || record.retain_until <= now
}

/// Refuses a token that no longer exists for its caller: deleted, expired or consumed.
pub(crate) fn check_exists(record: &TokenRecord, now: UnixMillis) -> Result<(), ApiError> {
    match record.status {
        TokenStatus::Deleted => Err(ApiError::not_found("TOKEN_DELETED", "the token was deleted")),
        TokenStatus::Expired => Err(ApiError::not_found("TOKEN_EXPIRED", "the token expired")),
        TokenStatus::Provisional | TokenStatus::Active if past_deadline(record, now) => {
            Err(ApiError::not_found("TOKEN_EXPIRED", "the token expired"))
        }
        _ => Ok(()),
    }
}

/// Refuses a token that cannot be used now.
pub(crate) fn check_usable(record: &TokenRecord, now: UnixMillis) -> Result<(), ApiError> {
    check_exists(record, now)?;
    match record.status {
        TokenStatus::Consumed => Err(ApiError::not_found(
            "TOKEN_CONSUMED",
            "the single-use token was already used",
        )),
        TokenStatus::Provisional => Err(precondition(
            "TOKEN_PROVISIONAL",
            "the token is provisional until ConfirmToken confirms the payment that created it",
        )),
        _ => Ok(()),
    }
}

/// When a token with these facts is deleted by the retention rules, counted from `from` for
/// data other than cards.
pub(crate) fn retention_end(
    data_type: DataType,
    expiry: (u32, u32),
    from: UnixMillis,
    extended_months: u32,
) -> UnixMillis {
    let base = if data_type == DataType::Card {
        end_of_month(expiry.1, expiry.0)
    } else {
        from
    };
    add_months(base, RETENTION_MONTHS + extended_months)
}

impl Gateway {
    /// The record of a token of this merchant, whatever its state, or NOT_FOUND (also for
    /// another merchant's token, so existence does not leak across merchants).
    pub(crate) async fn lookup(&self, merchant_id: &str, token: &str) -> Result<TokenRecord, ApiError> {
        self.store
            .token(merchant_id, token)
            .await
            .map_err(store_error)?
            .ok_or_else(|| ApiError::not_found("TOKEN_NOT_FOUND", "no such token for this merchant"))
    }

    /// The common start of a call about one token: a valid merchant id the caller may act
    /// for with `operation`, and a token of valid syntax. Returns the caller's identity.
    pub(crate) fn authorized(
        &self,
        caller: Option<String>,
        operation: Operation,
        merchant_id: &str,
        token: &str,
    ) -> Result<String, ApiError> {
        validate::merchant_id(merchant_id)?;
        self.policy.authorize(caller.as_deref(), operation, merchant_id)?;
        validate::token(token)?;
        Ok(caller.unwrap_or_default())
    }

    /// Applies a state change; ABORTED when the token changed under it (a concurrent request
    /// got there first), so the caller retries against the new state.
    pub(crate) async fn apply(
        &self,
        change: &Transition,
        entry: &JournalEntry<'_>,
        during: &str,
    ) -> Result<TokenRecord, ApiError> {
        self.store
            .transition(change, entry)
            .await
            .map_err(store_error)?
            .ok_or_else(|| {
                ApiError::new(
                    Code::Aborted,
                    "CONCURRENT_CHANGE",
                    format!("the token changed during {during}; retry"),
                )
            })
    }

    /// Checks a request's merchant reference and returns it for the store to take with what
    /// the request writes (see crate::idempotency): it is not recorded here, so a request that
    /// fails later leaves it free. A strict one already seen in the last 24 hours is refused
    /// now, before any vault work; the store's claim decides between concurrent requests.
    pub(crate) async fn check_reference(
        &self,
        merchant_id: &str,
        reference: &str,
        strict: bool,
    ) -> Result<Option<MerchantReference>, ApiError> {
        if reference.is_empty() {
            return if strict {
                Err(ApiError::missing("merchant_reference"))
            } else {
                Ok(None)
            };
        }
        validate::reference("merchant_reference", reference)?;
        let now = self.clock.now_ms();
        if strict
            && self
                .store
                .merchant_reference_taken(merchant_id, reference, now)
                .await
                .map_err(store_error)?
        {
            return Err(duplicate_reference());
        }
        Ok(Some(MerchantReference {
            merchant_id: merchant_id.to_owned(),
            reference: reference.to_owned(),
            strict,
            seen_at: now,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn card_retention_counts_from_the_end_of_the_expiry_month() {
        let until = retention_end(DataType::Card, (12, 2030), 0, 0);
        assert_eq!(until, add_months(end_of_month(2030, 12), 14));
        assert_eq!(
            retention_end(DataType::Card, (12, 2030), 0, 3),
            add_months(until, 3)
        );
        assert_eq!(
            retention_end(DataType::Email, (0, 0), 1_000, 0),
            add_months(1_000, 14)
        );
    }
}
