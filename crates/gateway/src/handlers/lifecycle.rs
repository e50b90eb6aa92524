//! A token's lifecycle after it was created: delete, confirm a provisional token, extend
//! retention, and report an authorisation outcome (the retry guard).

use tessera_api::v1::{
    AuthorizationOutcome, CardBlock, ConfirmTokenRequest, DeleteTokenRequest, DeleteTokenResponse,
    ExtendRetentionRequest, ReportAuthorizationRequest, ReportAuthorizationResponse, Token,
};

use super::common::{check_exists, check_usable, precondition, reference_error};
use crate::clock::add_months;
use crate::error::ApiError;
use crate::mapping::{timestamp, token_message};
use crate::policy::Operation;
use crate::retry_guard::{Outcome, Report};
use crate::state::Gateway;
use crate::storage::{store_error, JournalEntry, JournalKind, TokenStatus, Transition};
use crate::validate;

/// The most retention ExtendRetention may add over a token's life.
const MAX_EXTENSION_MONTHS: u32 = 24;

impl Gateway {
    pub(crate) async fn report_authorization(
        &self,
        caller: Option<String>,
        request: ReportAuthorizationRequest,
    ) -> Result<ReportAuthorizationResponse, ApiError> {
        validate::merchant_id(&request.merchant_id)?;
        // Reporting an outcome is part of paying with a token.
        let allowed = self
            .policy
            .authorize(
                caller.as_deref(),
                Operation::DetokenizeMerchantInitiated,
                &request.merchant_id,
            )
            .or_else(|_| {
                self.policy
                    .authorize(caller.as_deref(), Operation::Detokenize, &request.merchant_id)
            });
        allowed?;
        let caller = caller.unwrap_or_default();
        validate::token(&request.token)?;
        let outcome = match AuthorizationOutcome::try_from(request.outcome) {
            Ok(AuthorizationOutcome::Approved) => Outcome::Approved,
            Ok(AuthorizationOutcome::Declined) => Outcome::Declined,
            Ok(AuthorizationOutcome::DeclinedDoNotRetry) => Outcome::DoNotRetry,
            Ok(AuthorizationOutcome::Unspecified) => return Err(ApiError::missing("outcome")),
            Err(_) => {
                return Err(ApiError::invalid(
                    "outcome",
                    "INVALID_OUTCOME",
                    "outcome is not a known AuthorizationOutcome",
                ))
            }
        };
        if request.acquiring_agreement.is_empty() {
            return Err(ApiError::missing("acquiring_agreement"));
        }
        validate::reference("acquiring_agreement", &request.acquiring_agreement)?;
        let now = self.clock.now_ms();
        let record = self.lookup(&request.merchant_id, &request.token).await?;
        check_exists(&record, now)?;
        let fingerprint = record.fingerprint.clone().ok_or_else(|| {
            precondition(
                "NO_CARD_FINGERPRINT",
                "this token has no card to count attempts for",
            )
        })?;
        let reference = self
            .check_reference(
                &request.merchant_id,
                &request.merchant_reference,
                request.strict_merchant_reference,
            )
            .await?;
        let config = &self.retry_guard;
        let report = Report {
            merchant_id: record.merchant_id.clone(),
            agreement: request.acquiring_agreement.clone(),
            fingerprint,
            token: record.token.clone(),
            outcome,
            at: now,
            caller,
            rule: config.rule(&record.brand),
            do_not_retry_ms: i64::from(config.do_not_retry_block_hours) * 3_600_000,
        };
        let state = self
            .store
            .report_authorization(report, reference)
            .await
            .map_err(reference_error)?;
        Ok(ReportAuthorizationResponse {
            failed_attempts: state.failed_attempts,
            limit: state.limit,
            block: state.block.map(|block| CardBlock {
                acquiring_agreement: block.agreement,
                reason: block.reason,
                blocked_until: Some(timestamp(block.until)),
            }),
        })
    }

    pub(crate) async fn delete_token(
        &self,
        caller: Option<String>,
        request: DeleteTokenRequest,
    ) -> Result<DeleteTokenResponse, ApiError> {
        let caller = self.authorized(caller, Operation::Delete, &request.merchant_id, &request.token)?;
        let now = self.clock.now_ms();
        let record = self.lookup(&request.merchant_id, &request.token).await?;
        check_exists(&record, now)?;
        let entry = JournalEntry {
            merchant_id: &request.merchant_id,
            token: &request.token,
            kind: JournalKind::Delete,
            caller: &caller,
            at: now,
            purpose: "",
            detail: if record.status == TokenStatus::Provisional {
                "DISCARDED"
            } else {
                ""
            },
            payment_reference: "",
        };
        let change = Transition {
            from: &[
                TokenStatus::Provisional,
                TokenStatus::Active,
                TokenStatus::Consumed,
            ],
            to: TokenStatus::Deleted,
            destroy: true,
            clear_deadline: false,
        };
        let deleted = self.apply(&change, &entry, "deletion").await?;
        tracing::info!(merchant_id = %deleted.merchant_id, token = %deleted.token, "deleted");
        Ok(DeleteTokenResponse {
            token: Some(token_message(&deleted)),
        })
    }

    pub(crate) async fn confirm_token(
        &self,
        caller: Option<String>,
        request: ConfirmTokenRequest,
    ) -> Result<Token, ApiError> {
        let caller = self.authorized(caller, Operation::Tokenize, &request.merchant_id, &request.token)?;
        validate::reference("payment_reference", &request.payment_reference)?;
        let now = self.clock.now_ms();
        let record = self.lookup(&request.merchant_id, &request.token).await?;
        check_exists(&record, now)?;
        if record.status != TokenStatus::Provisional {
            return Err(precondition(
                "TOKEN_NOT_PROVISIONAL",
                "only a provisional token can be confirmed",
            ));
        }
        let detail = if request.payment_reference.is_empty() {
            "RECURRING_CONTRACT".to_owned()
        } else {
            format!(
                "RECURRING_CONTRACT payment_reference={}",
                request.payment_reference
            )
        };
        let entry = JournalEntry {
            merchant_id: &request.merchant_id,
            token: &request.token,
            kind: JournalKind::Confirm,
            caller: &caller,
            at: now,
            purpose: "",
            detail: &detail,
            payment_reference: &request.payment_reference,
        };
        let change = Transition {
            from: &[TokenStatus::Provisional],
            to: TokenStatus::Active,
            destroy: false,
            clear_deadline: true,
        };
        let confirmed = self.apply(&change, &entry, "confirmation").await?;
        tracing::info!(merchant_id = %confirmed.merchant_id, token = %confirmed.token, "confirmed: recurring contract");
        Ok(token_message(&confirmed))
    }

    pub(crate) async fn extend_retention(
        &self,
        caller: Option<String>,
        request: ExtendRetentionRequest,
    ) -> Result<Token, ApiError> {
        let caller = self.authorized(caller, Operation::Extend, &request.merchant_id, &request.token)?;
        if !(1..=MAX_EXTENSION_MONTHS).contains(&request.months) {
            return Err(ApiError::invalid(
                "months",
                "INVALID_MONTHS",
                "months must be 1 to 24",
            ));
        }
        let now = self.clock.now_ms();
        let record = self.lookup(&request.merchant_id, &request.token).await?;
        check_usable(&record, now)?;
        if record.retention_extended_months + request.months > MAX_EXTENSION_MONTHS {
            return Err(precondition(
                "RETENTION_LIMIT",
                "retention can be extended by at most 24 months in total",
            ));
        }
        let detail = format!("+{} months", request.months);
        let entry = JournalEntry {
            merchant_id: &request.merchant_id,
            token: &request.token,
            kind: JournalKind::Extend,
            caller: &caller,
            at: now,
            purpose: "",
            detail: &detail,
            payment_reference: "",
        };
        let retain_until = add_months(record.retain_until, request.months);
        let extended = self
            .store
            .extend_retention(&entry, request.months, retain_until, MAX_EXTENSION_MONTHS)
            .await
            .map_err(store_error)?
            .ok_or_else(|| {
                precondition(
                    "RETENTION_LIMIT",
                    "retention can be extended by at most 24 months in total",
                )
            })?;
        Ok(token_message(&extended))
    }
}
