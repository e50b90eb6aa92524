//! Bulk import: a bidirectional stream of item chunks in, results and progress out. Each chunk
//! is validated item by item, protected in one vault round trip and stored in one
//! transaction; a bad item gets its own error and never fails the chunk or the stream. A few
//! chunks are processed at once, and results go back in the order the chunks came in.
//!
//! Nothing is lost silently: every item of every message read gets a result, and a message
//! that cannot be taken (over the size or item limit, or not a valid message) ends the stream
//! with an error carrying its reason, after the results of every message before it, so the
//! caller knows exactly which items were not imported.

use std::collections::HashMap;
use std::sync::Arc;

use tessera_api::limits::MAX_IMPORT_ITEMS;
use tessera_api::v1::{
    import_result, ImportError, ImportItem, ImportProgress, ImportRequest, ImportResponse, ImportResult,
    TokenizeRequest,
};
use tessera_api::vault::WrappedKey;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Status, Streaming};
use zeroize::Zeroizing;

use super::tokenize::Prepared;
use crate::error::ApiError;
use crate::mapping::token_message;
use crate::state::Gateway;
use crate::storage::store_error;
use crate::transport_errors::{explain, IMPORT_PATH};

/// Items protected and stored together.
const CHUNK_ITEMS: usize = 512;
/// Chunks in process at once: enough to overlap the vault hop of one with the commit of
/// another, few enough to bound memory.
const CHUNKS_IN_FLIGHT: usize = 4;

/// The response stream of one import.
pub type ImportStream = ReceiverStream<Result<ImportResponse, Status>>;

/// Starts an import and returns its response stream.
pub fn start(
    gateway: Arc<Gateway>,
    caller: Option<String>,
    inbound: Streaming<ImportRequest>,
) -> ImportStream {
    let (responses, stream) = mpsc::channel(CHUNKS_IN_FLIGHT);
    let (pending, in_order) = mpsc::channel(CHUNKS_IN_FLIGHT);
    tokio::spawn(read(gateway, caller, inbound, pending));
    tokio::spawn(answer(in_order, responses));
    ReceiverStream::new(stream)
}

/// What the reader hands the answerer, in the order the caller sent it.
enum Pending {
    /// A chunk being imported; its results.
    Chunk(JoinHandle<Vec<ImportResult>>),
    /// A message that could not be taken: the stream ends with this error once every chunk
    /// before it is answered.
    Refused(ApiError),
}

/// The refusal of a message with more than [`MAX_IMPORT_ITEMS`] items.
fn too_many_items(items: usize) -> ApiError {
    let mut error = ApiError::invalid(
        "items",
        "TOO_MANY_ITEMS",
        format!("an import message carries at most {MAX_IMPORT_ITEMS} items; this one had {items}"),
    );
    error.metadata = vec![("limit_items", MAX_IMPORT_ITEMS.to_string())];
    error
}

/// Why the inbound stream failed, for the caller: tonic's decoder refuses a message over the
/// size limit or one that is not an `ImportRequest` (explained like every transport refusal).
fn inbound_failure(status: &Status) -> ApiError {
    explain(status, IMPORT_PATH).unwrap_or_else(|| {
        ApiError::new(
            status.code(),
            "IMPORT_STREAM_FAILED",
            "the import stream failed; items without a result were not imported",
        )
    })
}

/// Reads request messages and starts a task per chunk; the bounded queue of started chunks is
/// the back-pressure that keeps a fast sender from queueing unbounded work.
async fn read(
    gateway: Arc<Gateway>,
    caller: Option<String>,
    mut inbound: Streaming<ImportRequest>,
    pending: mpsc::Sender<Pending>,
) {
    loop {
        let message = match inbound.message().await {
            Ok(Some(message)) => message,
            Ok(None) => return,
            Err(status) => {
                let error = inbound_failure(&status);
                tracing::warn!(code = ?error.code, reason = %error.reason, "import stream refused");
                let _ = pending.send(Pending::Refused(error)).await;
                return;
            }
        };
        if message.items.len() > MAX_IMPORT_ITEMS {
            let error = too_many_items(message.items.len());
            tracing::warn!(reason = %error.reason, "import stream refused");
            let _ = pending.send(Pending::Refused(error)).await;
            return;
        }
        let mut items = message.items;
        while !items.is_empty() {
            let rest = items.split_off(items.len().min(CHUNK_ITEMS));
            let chunk = std::mem::replace(&mut items, rest);
            let task = tokio::spawn(import_chunk(Arc::clone(&gateway), caller.clone(), chunk));
            if pending.send(Pending::Chunk(task)).await.is_err() {
                return;
            }
        }
    }
}

/// Sends each chunk's results, in order, with the running totals; ends the stream with the
/// error of a refused message after the results of everything before it.
async fn answer(
    mut in_order: mpsc::Receiver<Pending>,
    responses: mpsc::Sender<Result<ImportResponse, Status>>,
) {
    let mut progress = ImportProgress::default();
    while let Some(pending) = in_order.recv().await {
        let results = match pending {
            Pending::Chunk(task) => match task.await {
                Ok(results) => results,
                Err(err) => {
                    tracing::error!(%err, "an import chunk failed");
                    let error = ApiError::internal(
                        "IMPORT_CHUNK_FAILED",
                        "an import chunk failed; items without a result were not imported",
                    );
                    let _ = responses.send(Err(error.into())).await;
                    return;
                }
            },
            Pending::Refused(error) => {
                let _ = responses.send(Err(error.into())).await;
                return;
            }
        };
        for result in &results {
            progress.received += 1;
            match result.outcome {
                Some(import_result::Outcome::Token(_)) => progress.succeeded += 1,
                _ => progress.failed += 1,
            }
        }
        if responses
            .send(Ok(ImportResponse {
                results,
                progress: Some(progress),
            }))
            .await
            .is_err()
        {
            return;
        }
    }
}

/// Why an item cannot be imported at all, whatever its data: the fields of a single tokenize
/// that bulk import does not honour are refused rather than ignored. Wipes a CVC sent anyway.
fn unsupported_field(request: &mut TokenizeRequest) -> Option<ApiError> {
    // First, so the CVC's buffer is wiped whatever happens next.
    let cvc = Zeroizing::new(std::mem::take(&mut request.cvc));
    let (field, reason, message) = if !cvc.is_empty() {
        ("cvc", "CVC_NOT_ALLOWED", "bulk import does not accept CVCs")
    } else if request.provisional {
        (
            "provisional",
            "PROVISIONAL_NOT_ALLOWED",
            "bulk import creates usable tokens only",
        )
    } else if !request.idempotency_key.is_empty() {
        (
            "idempotency_key",
            "FIELD_NOT_SUPPORTED",
            "bulk import items take no idempotency key; the results file says which items were imported",
        )
    } else if !request.merchant_reference.is_empty() || request.strict_merchant_reference {
        (
            "merchant_reference",
            "FIELD_NOT_SUPPORTED",
            "bulk import items take no merchant reference",
        )
    } else {
        return None;
    };
    Some(ApiError::invalid(field, reason, message))
}

fn failure(sequence: u64, err: &ApiError) -> ImportResult {
    ImportResult {
        sequence,
        outcome: Some(import_result::Outcome::Error(ImportError {
            code: err.code as i32,
            reason: err.reason.to_string(),
            message: err.message.clone(),
            field: err.field.unwrap_or_default().to_owned(),
        })),
    }
}

/// Validates, protects (one vault call) and stores (one transaction) a chunk.
async fn import_chunk(
    gateway: Arc<Gateway>,
    caller: Option<String>,
    items: Vec<ImportItem>,
) -> Vec<ImportResult> {
    let caller_name = caller.clone().unwrap_or_default();
    // Every item starts as "not processed" under its own sequence, so an item no step below
    // reaches is still answered, never dropped.
    let mut results: Vec<ImportResult> = items
        .iter()
        .map(|item| {
            failure(
                item.sequence,
                &ApiError::internal("IMPORT_ERROR", "the item was not processed"),
            )
        })
        .collect();
    let mut batch: Vec<(usize, u64, Prepared)> = Vec::with_capacity(items.len());
    let mut one_by_one: Vec<(usize, u64, Prepared)> = Vec::new();
    for (index, item) in items.into_iter().enumerate() {
        let sequence = item.sequence;
        let outcome = match item.item {
            None => Err(ApiError::missing("item")),
            Some(mut request) => match unsupported_field(&mut request) {
                Some(refusal) => Err(refusal),
                None => gateway.prepare(caller.as_deref(), request),
            },
        };
        match outcome {
            // Deduplication needs a lookup per item; those go the single-tokenize way.
            Ok(prepared) if prepared.deduplicate => one_by_one.push((index, sequence, prepared)),
            Ok(prepared) => batch.push((index, sequence, prepared)),
            Err(err) => set(&mut results, index, failure(sequence, &err)),
        }
    }

    // Keys once per merchant; a merchant whose keys cannot be had fails only its own items.
    let mut keys: HashMap<String, Result<Vec<WrappedKey>, ApiError>> = HashMap::new();
    for (_, _, prepared) in &batch {
        if !keys.contains_key(&prepared.merchant_id) {
            keys.insert(prepared.merchant_id.clone(), gateway.keys_for(prepared).await);
        }
    }
    let mut ready = Vec::with_capacity(batch.len());
    for (index, sequence, prepared) in batch {
        match keys.get(&prepared.merchant_id) {
            Some(Err(err)) => set(&mut results, index, failure(sequence, err)),
            _ => ready.push((index, sequence, prepared)),
        }
    }
    let all_keys: Vec<WrappedKey> = keys.into_values().filter_map(Result::ok).flatten().collect();
    let items = ready
        .iter()
        .map(|(_, _, prepared)| prepared.item.clone())
        .collect();
    let protected = match gateway.vault.protect_batch(all_keys, items).await {
        Ok(protected) => protected,
        Err(err) => {
            for (index, sequence, _) in &ready {
                set(&mut results, *index, failure(*sequence, &err));
            }
            Vec::new()
        }
    };
    let now = gateway.clock.now_ms();
    let mut rows = Vec::with_capacity(protected.len());
    let mut stored = Vec::with_capacity(protected.len());
    for ((index, sequence, prepared), protected) in ready.into_iter().zip(protected) {
        match protected {
            Ok(protected) => match gateway.record_for(&prepared, protected, &caller_name, now) {
                Ok(row) => {
                    rows.push(row);
                    stored.push((index, sequence, prepared));
                }
                Err(err) => set(&mut results, index, failure(sequence, &err)),
            },
            Err(err) => set(&mut results, index, failure(sequence, &err)),
        }
    }
    let records: Vec<_> = rows.iter().map(|(record, _)| token_message(record)).collect();
    match gateway.store.insert_tokens(rows).await {
        Ok(inserted) => {
            for (((index, sequence, prepared), token), inserted) in
                stored.into_iter().zip(records).zip(inserted)
            {
                if inserted {
                    set(
                        &mut results,
                        index,
                        ImportResult {
                            sequence,
                            outcome: Some(import_result::Outcome::Token(token)),
                        },
                    );
                } else {
                    // A format-preserving token collided with an existing one: draw another.
                    one_by_one.push((index, sequence, prepared));
                }
            }
        }
        Err(err) => {
            let err = store_error(err);
            for (index, sequence, _) in &stored {
                set(&mut results, *index, failure(*sequence, &err));
            }
        }
    }
    for (index, sequence, prepared) in one_by_one {
        let result = match gateway.tokenize_prepared(&prepared, &caller_name, None).await {
            Ok(response) => ImportResult {
                sequence,
                outcome: response.token.map(import_result::Outcome::Token),
            },
            Err(err) => failure(sequence, &err),
        };
        set(&mut results, index, result);
    }
    results
}

fn set(results: &mut [ImportResult], index: usize, result: ImportResult) {
    if let Some(slot) = results.get_mut(index) {
        *slot = result;
    }
}

#[cfg(test)]
mod tests {
    use prost::Message;
    use tessera_api::limits::MAX_IMPORT_MESSAGE_BYTES;
    use tessera_api::v1::{tokenize_request, BankAccount, Card, TokenFormat, TokenKind};

    use super::*;
    use crate::validate;

    /// `value` with `n` copies of `fill` appended: the longest value a check takes when `n` is
    /// its limit, and one too long at `n + 1`.
    fn padded(value: &str, fill: char, n: usize) -> String {
        let mut text = value.to_owned();
        text.extend(std::iter::repeat_n(fill, n));
        text
    }

    /// Asserts `check` takes `longest` and refuses it with one more `fill`: `longest` is as
    /// long as that field can validly be.
    fn assert_longest<E>(check: impl Fn(&str) -> Result<(), E>, longest: &str, fill: char) {
        assert!(check(longest).is_ok(), "the longest value must be valid");
        assert!(
            check(&padded(longest, fill, 1)).is_err(),
            "one more must be refused"
        );
    }

    /// The largest item an import message can carry that is valid: every field at the longest
    /// its check takes (proved by one more character being refused), four-byte characters
    /// where any printable character is allowed, and every number at its widest encoding.
    fn largest_valid_items() -> Vec<ImportItem> {
        let today = (2026, 1);
        let merchant = padded("", 'm', 64);
        assert_longest(validate::merchant_id, &merchant, 'm');
        let shopper = padded("shopper-", 'r', 128 - 8);
        assert_longest(validate::shopper_reference, &shopper, 'r');
        // U+20000, a CJK ideograph: four bytes in UTF-8.
        let name = padded("", '\u{20000}', 100);
        let card_with = |number: &str, holder_name: &str| Card {
            number: number.to_owned(),
            expiry_month: 12,
            expiry_year: 2045,
            holder_name: holder_name.to_owned(),
        };
        let number = padded("4111111111111111", ' ', 64 - 16);
        assert_longest(|n| validate::card(&card_with(n, &name), today), &number, ' ');
        assert_longest(
            |h| validate::card(&card_with(&number, h), today),
            &name,
            '\u{20000}',
        );
        let account_with = |iban: &str, holder_name: &str| BankAccount {
            iban: iban.to_owned(),
            bic: "NWBKGB2LXXX".to_owned(),
            holder_name: holder_name.to_owned(),
        };
        let iban = padded("GB82WEST12345698765432", ' ', 64 - 22);
        assert_longest(|i| validate::bank_account(&account_with(i, &name)), &iban, ' ');
        assert_longest(
            |h| validate::bank_account(&account_with(&iban, h)),
            &name,
            '\u{20000}',
        );
        [
            tokenize_request::Data::Card(card_with(&number, &name)),
            tokenize_request::Data::BankAccount(account_with(&iban, &name)),
        ]
        .into_iter()
        .map(|data| ImportItem {
            sequence: u64::MAX,
            item: Some(TokenizeRequest {
                merchant_id: merchant.clone(),
                data: Some(data),
                format: TokenFormat::FormatPreserving as i32,
                shopper_reference: shopper.clone(),
                deduplicate: true,
                kind: TokenKind::SingleUse as i32,
                ..Default::default()
            }),
        })
        .collect()
    }

    #[test]
    fn the_most_items_a_message_may_carry_always_fit_in_its_byte_limit() {
        for item in largest_valid_items() {
            let message = ImportRequest {
                items: vec![item; MAX_IMPORT_ITEMS],
            };
            let size = message.encoded_len();
            assert!(
                size <= MAX_IMPORT_MESSAGE_BYTES,
                "{MAX_IMPORT_ITEMS} items of {} bytes take {size} bytes, over {MAX_IMPORT_MESSAGE_BYTES}",
                size / MAX_IMPORT_ITEMS
            );
        }
    }

    #[test]
    fn fields_bulk_import_does_not_honour_are_refused_not_ignored() {
        let refused = |request: TokenizeRequest| unsupported_field(&mut request.clone()).map(|e| e.field);
        assert_eq!(refused(TokenizeRequest::default()), None);
        let with = |edit: fn(&mut TokenizeRequest)| {
            let mut request = TokenizeRequest::default();
            edit(&mut request);
            refused(request)
        };
        assert_eq!(with(|r| r.cvc = "123".into()), Some(Some("cvc")));
        assert_eq!(with(|r| r.provisional = true), Some(Some("provisional")));
        assert_eq!(
            with(|r| r.idempotency_key = "k-1".into()),
            Some(Some("idempotency_key"))
        );
        assert_eq!(
            with(|r| r.merchant_reference = "order-1".into()),
            Some(Some("merchant_reference"))
        );
        assert_eq!(
            with(|r| r.strict_merchant_reference = true),
            Some(Some("merchant_reference"))
        );
    }
}
