//! Reading tokens: one token's metadata, a shopper's tokens page by page, and a token's
//! history.

use tessera_api::v1::{
    CardBlock, GetTokenHistoryRequest, GetTokenHistoryResponse, GetTokenRequest,
    JournalEntry as ApiJournalEntry, ListTokensRequest, ListTokensResponse, Token, TokenStatus,
};

use super::common::past_deadline;
use crate::error::ApiError;
use crate::mapping::{timestamp, token_message, transaction_type};
use crate::policy::Operation;
use crate::purpose::CheckedPurpose;
use crate::state::Gateway;
use crate::storage::{self, store_error, ListCursor};
use crate::validate;

const DEFAULT_PAGE_SIZE: u32 = 20;
const MAX_PAGE_SIZE: u32 = 100;
const DEFAULT_HISTORY_PAGE_SIZE: u32 = 100;
const MAX_HISTORY_PAGE_SIZE: u32 = 1000;

fn parse_cursor(page_token: &str) -> Result<Option<ListCursor>, ApiError> {
    if page_token.is_empty() {
        return Ok(None);
    }
    let invalid = || {
        ApiError::invalid(
            "page_token",
            "INVALID_PAGE_TOKEN",
            "page_token is not one this API returned",
        )
    };
    let rest = page_token.strip_prefix("v1.").ok_or_else(invalid)?;
    let (created, token) = rest.split_once('.').ok_or_else(invalid)?;
    let created = created.parse::<i64>().map_err(|_| invalid())?;
    validate::token(token).map_err(|_| invalid())?;
    Ok(Some((created, token.to_owned())))
}

/// The journal entry a history page continues after (0 for the first page).
fn parse_history_cursor(page_token: &str) -> Result<i64, ApiError> {
    if page_token.is_empty() {
        return Ok(0);
    }
    page_token
        .strip_prefix("h1.")
        .and_then(|id| id.parse::<i64>().ok())
        .filter(|id| *id > 0)
        .ok_or_else(|| {
            ApiError::invalid(
                "page_token",
                "INVALID_PAGE_TOKEN",
                "page_token is not one this API returned",
            )
        })
}

impl Gateway {
    pub(crate) async fn get_token(
        &self,
        caller: Option<String>,
        request: GetTokenRequest,
    ) -> Result<Token, ApiError> {
        self.authorized(
            caller,
            Operation::ReadMetadata,
            &request.merchant_id,
            &request.token,
        )?;
        let record = self.lookup(&request.merchant_id, &request.token).await?;
        let now = self.clock.now_ms();
        // A metadata read answers for a token that is no longer usable too, flagged with its
        // status (as DeleteToken's answer is); only the operations that use a token refuse it.
        let mut token = token_message(&record);
        if matches!(
            record.status,
            storage::TokenStatus::Provisional | storage::TokenStatus::Active
        ) && past_deadline(&record, now)
        {
            // Past its deadline, the token is expired even before the sweeper records it.
            token.status = TokenStatus::Expired as i32;
        }
        if let Some(fingerprint) = &record.fingerprint {
            token.blocks = self
                .store
                .active_blocks(&record.merchant_id, fingerprint, now)
                .await
                .map_err(store_error)?
                .into_iter()
                .map(|block| CardBlock {
                    acquiring_agreement: block.agreement,
                    reason: block.reason,
                    blocked_until: Some(timestamp(block.until)),
                })
                .collect();
        }
        Ok(token)
    }

    pub(crate) async fn list_tokens(
        &self,
        caller: Option<String>,
        request: ListTokensRequest,
    ) -> Result<ListTokensResponse, ApiError> {
        validate::merchant_id(&request.merchant_id)?;
        self.policy
            .authorize(caller.as_deref(), Operation::List, &request.merchant_id)?;
        if request.shopper_reference.is_empty() {
            return Err(ApiError::missing("shopper_reference"));
        }
        validate::shopper_reference(&request.shopper_reference)?;
        let size = match request.page_size {
            0 => DEFAULT_PAGE_SIZE,
            size => size.min(MAX_PAGE_SIZE),
        };
        let cursor = parse_cursor(&request.page_token)?;
        let mut records = self
            .store
            .list_usable(
                &request.merchant_id,
                &request.shopper_reference,
                self.clock.now_ms(),
                cursor.as_ref(),
                size + 1,
            )
            .await
            .map_err(store_error)?;
        let more = records.len() > size as usize;
        records.truncate(size as usize);
        let next_page_token = match records.last() {
            Some(last) if more => format!("v1.{}.{}", last.created_at, last.token),
            _ => String::new(),
        };
        Ok(ListTokensResponse {
            tokens: records.iter().map(token_message).collect(),
            next_page_token,
        })
    }

    pub(crate) async fn token_history(
        &self,
        caller: Option<String>,
        request: GetTokenHistoryRequest,
    ) -> Result<GetTokenHistoryResponse, ApiError> {
        self.authorized(
            caller,
            Operation::ReadMetadata,
            &request.merchant_id,
            &request.token,
        )?;
        let size = match request.page_size {
            0 => DEFAULT_HISTORY_PAGE_SIZE,
            size => size.min(MAX_HISTORY_PAGE_SIZE),
        };
        let after = parse_history_cursor(&request.page_token)?;
        // Existence first, so an unknown token answers NOT_FOUND and not an empty history.
        self.lookup(&request.merchant_id, &request.token).await?;
        let mut entries = self
            .store
            .history_page(&request.merchant_id, &request.token, after, i64::from(size) + 1)
            .await
            .map_err(store_error)?;
        let more = entries.len() > size as usize;
        entries.truncate(size as usize);
        let next_page_token = match entries.last() {
            Some(last) if more => format!("h1.{}", last.id),
            _ => String::new(),
        };
        Ok(GetTokenHistoryResponse {
            next_page_token,
            entries: entries
                .into_iter()
                .map(|entry| ApiJournalEntry {
                    transaction_id: u64::try_from(entry.id).unwrap_or(0),
                    r#type: transaction_type(entry.kind) as i32,
                    at: Some(timestamp(entry.at)),
                    caller: entry.caller,
                    purpose: CheckedPurpose::from_journal_text(&entry.purpose),
                    detail: entry.detail,
                })
                .collect(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip_and_refuse_garbage() {
        assert_eq!(parse_cursor("").map_err(|e| e.reason), Ok(None));
        assert_eq!(
            parse_cursor("v1.123.tok_abc").map_err(|e| e.reason),
            Ok(Some((123, "tok_abc".into())))
        );
        for bad in ["123.tok", "v1.x.tok", "v1.1.bad token", "v2.1.tok"] {
            assert!(parse_cursor(bad).is_err(), "{bad}");
        }
        assert_eq!(parse_history_cursor("").map_err(|e| e.reason), Ok(0));
        assert_eq!(parse_history_cursor("h1.42").map_err(|e| e.reason), Ok(42));
        for bad in ["42", "h1.", "h1.-3", "h1.x", "v1.1.tok"] {
            assert!(parse_history_cursor(bad).is_err(), "{bad}");
        }
    }
}
