//! Detokenize: check the purpose, the token's kind and the retry guard, reveal the data in
//! the vault, journal the use (consuming a single-use token), and take a held CVC.

use tessera_api::v1::{CvcStatus, DetokenizeRequest, DetokenizeResponse};
use tessera_api::vault::RevealItem;

use super::common::{check_usable, precondition, retention_end};
use crate::clock::UnixMillis;
use crate::error::ApiError;
use crate::keyring::PURPOSE_DATA;
use crate::mapping::public_data;
use crate::policy::Operation;
use crate::purpose::{check_kind, check_purpose, CheckedPurpose, Kind};
use crate::state::Gateway;
use crate::storage::{store_error, DataType, JournalEntry, JournalKind, TokenRecord};
use crate::validate;

impl Gateway {
    /// Refuses a merchant-initiated use of a card blocked under the stated agreement (or, when
    /// none is stated, under any), with the reason and when the block ends.
    pub(crate) async fn check_retry_guard(
        &self,
        record: &TokenRecord,
        agreement: &str,
        now: UnixMillis,
    ) -> Result<(), ApiError> {
        let Some(fingerprint) = &record.fingerprint else {
            return Ok(());
        };
        let blocks = self
            .store
            .active_blocks(&record.merchant_id, fingerprint, now)
            .await
            .map_err(store_error)?;
        let Some(block) = blocks
            .into_iter()
            .find(|block| agreement.is_empty() || block.agreement == agreement)
        else {
            return Ok(());
        };
        let (reason, message) = if block.reason == "DO_NOT_RETRY" {
            (
                "DO_NOT_RETRY",
                "the issuer answered do-not-retry for this card; merchant-initiated use is blocked",
            )
        } else {
            ("RETRY_LIMIT", "the scheme's limit of failed attempts for this card is reached; merchant-initiated use is blocked")
        };
        let mut error = precondition(reason, message);
        error.metadata = vec![
            (
                "blocked_until",
                tessera_api::calendar::rfc3339_millis(block.until),
            ),
            ("blocked_until_unix_ms", block.until.to_string()),
            ("acquiring_agreement", block.agreement),
        ];
        Err(error)
    }

    pub(crate) async fn detokenize(
        &self,
        caller: Option<String>,
        request: DetokenizeRequest,
    ) -> Result<DetokenizeResponse, ApiError> {
        validate::merchant_id(&request.merchant_id)?;
        let purpose = check_purpose(request.purpose.as_ref())?;
        let operation = if purpose.merchant_initiated() {
            Operation::DetokenizeMerchantInitiated
        } else {
            Operation::Detokenize
        };
        self.policy
            .authorize(caller.as_deref(), operation, &request.merchant_id)?;
        let caller = caller.unwrap_or_default();
        validate::token(&request.token)?;
        let now = self.clock.now_ms();
        let record = self.lookup(&request.merchant_id, &request.token).await?;
        check_usable(&record, now)?;
        if record.data_type == DataType::Cvc {
            return Err(precondition(
                "CVC_ONLY_TOKEN",
                "a CVC-only token is not detokenized itself; name it as cvc_token of a card-on-file detokenize",
            ));
        }
        if request.shopper_reference != record.shopper_reference {
            return Err(precondition(
                "SHOPPER_REFERENCE_MISMATCH",
                "shopper_reference differs from the one the token was created with",
            ));
        }
        let kind = record.kind;
        check_kind(kind, purpose)?;
        if purpose.merchant_initiated() {
            self.check_retry_guard(&record, &request.acquiring_agreement, now)
                .await?;
        }
        let (other_cvc_token, other_cvc_vault) = self
            .cvc_token(&request, &record, kind, purpose, now)
            .await?
            .unzip();
        let held_cvc = match (&other_cvc_token, record.holds_cvc) {
            (Some(other), _) => Some((other.clone(), other_cvc_vault.unwrap_or_default())),
            (None, true) => Some((record.token.clone(), record.cvc_vault.clone())),
            (None, false) => None,
        };
        let ciphertext = record
            .ciphertext
            .clone()
            .ok_or_else(|| ApiError::not_found("TOKEN_DELETED", "the token was deleted"))?;
        let data_key = self
            .keys
            .key(
                &self.store,
                &record.merchant_id,
                PURPOSE_DATA,
                record.data_key_version,
            )
            .await?;
        // The data first, without the CVC: a CVC is taken from vault memory only by the use
        // that was recorded below, so a racing use that loses never burns it (it gets
        // TOKEN_CONSUMED, not CVC_UNAVAILABLE), and a reveal that fails leaves it held.
        let mut revealed = self
            .vault
            .reveal(
                vec![(*data_key).clone()],
                RevealItem {
                    merchant_id: record.merchant_id.clone(),
                    token: record.token.clone(),
                    data_key_version: record.data_key_version,
                    ciphertext,
                    cvc_token: String::new(),
                    // The vault's audit record names why the data was revealed.
                    purpose: purpose.journal_text(),
                },
            )
            .await?;
        let retain_until = (record.data_type != DataType::Card)
            .then(|| retention_end(record.data_type, (0, 0), now, record.retention_extended_months));
        let purpose_text = purpose.journal_text();
        let entry = JournalEntry {
            merchant_id: &record.merchant_id,
            token: &record.token,
            kind: JournalKind::Detokenize,
            caller: &caller,
            at: now,
            purpose: &purpose_text,
            detail: if other_cvc_token.is_some() { "WITH_CVC" } else { "" },
            payment_reference: "",
        };
        // The data is released only once its use is journalled (and a single-use token
        // consumed): if another request consumed it first, this one returns nothing.
        let used = self
            .store
            .record_use(
                &entry,
                kind == Kind::SingleUse,
                retain_until,
                other_cvc_token.as_deref(),
            )
            .await
            .map_err(store_error)?;
        if !used {
            return Err(ApiError::not_found(
                "TOKEN_CONSUMED",
                "the token was used or changed by another request",
            ));
        }
        tracing::info!(merchant_id = %record.merchant_id, token = %record.token, purpose = %purpose_text, "detokenized");
        let (cvc, cvc_status) = match held_cvc {
            Some((cvc_token, cvc_vault)) => self.take_cvc(&record, cvc_token, &cvc_vault, purpose_text).await,
            None => (String::new(), CvcStatus::Unspecified),
        };
        Ok(DetokenizeResponse {
            token: record.token,
            data: public_data(&mut revealed),
            cvc,
            cvc_status: cvc_status as i32,
        })
    }

    /// Takes the CVC held under `cvc_token` from vault memory, once the use it goes with is
    /// recorded. The CVC lives only in the vault that took it, so the call goes there. The use
    /// stands whatever happens here: a CVC that is gone (that vault restarted, was sealed or
    /// cannot be reached, or the CVC's time ran out) is reported as unavailable, so the caller
    /// still gets the data and can ask the shopper for the CVC again.
    pub(crate) async fn take_cvc(
        &self,
        record: &TokenRecord,
        cvc_token: String,
        cvc_vault: &str,
        purpose_text: String,
    ) -> (String, CvcStatus) {
        let taken = self
            .vault
            .reveal_on(
                cvc_vault,
                Vec::new(),
                RevealItem {
                    merchant_id: record.merchant_id.clone(),
                    token: record.token.clone(),
                    data_key_version: 0,
                    ciphertext: Vec::new(),
                    cvc_token,
                    purpose: purpose_text,
                },
            )
            .await;
        match taken {
            Ok(mut revealed) if !revealed.cvc.is_empty() => {
                (std::mem::take(&mut revealed.cvc), CvcStatus::Returned)
            }
            Ok(_) => (String::new(), CvcStatus::Unavailable),
            Err(err) => {
                tracing::warn!(merchant_id = %record.merchant_id, token = %record.token, reason = %err.reason, "the CVC is unavailable; the data was returned without it");
                (String::new(), CvcStatus::Unavailable)
            }
        }
    }

    /// The CVC-only token a detokenize names, checked: only a cardholder-initiated use of a
    /// card-on-file token may ask for a CVC, and only for the same merchant and shopper.
    /// Returns the token and the vault holding its CVC.
    pub(crate) async fn cvc_token(
        &self,
        request: &DetokenizeRequest,
        record: &TokenRecord,
        kind: Kind,
        purpose: CheckedPurpose,
        now: UnixMillis,
    ) -> Result<Option<(String, String)>, ApiError> {
        if request.cvc_token.is_empty() {
            return Ok(None);
        }
        if kind != Kind::CardOnFile || purpose.merchant_initiated() {
            return Err(precondition(
                "CVC_NOT_ALLOWED",
                "a CVC is returned only with a cardholder-initiated use of a card-on-file token",
            ));
        }
        validate::token(&request.cvc_token)?;
        let cvc = self
            .store
            .token(&request.merchant_id, &request.cvc_token)
            .await
            .map_err(store_error)?
            .ok_or_else(|| {
                ApiError::not_found("CVC_TOKEN_NOT_FOUND", "no such CVC token for this merchant")
            })?;
        check_usable(&cvc, now)?;
        if cvc.data_type != DataType::Cvc || !cvc.holds_cvc {
            return Err(precondition(
                "NOT_A_CVC_TOKEN",
                "cvc_token does not name a CVC-only single-use token",
            ));
        }
        if cvc.shopper_reference != record.shopper_reference {
            return Err(precondition(
                "SHOPPER_REFERENCE_MISMATCH",
                "the CVC token belongs to another shopper than the card token",
            ));
        }
        Ok(Some((cvc.token, cvc.cvc_vault)))
    }
}
