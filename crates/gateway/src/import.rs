//! Bulk import: a bidirectional stream of item chunks in, results and progress out. Each chunk
//! is validated item by item, protected in one vault round trip and stored in one
//! transaction; a bad item gets its own error and never fails the chunk or the stream. A few
//! chunks are processed at once, and results go back in the order the chunks came in.

use std::collections::HashMap;
use std::sync::Arc;

use tessera_api::v1::{
    import_result, ImportError, ImportItem, ImportProgress, ImportRequest, ImportResponse, ImportResult,
};
use tessera_api::vault::WrappedKey;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Status, Streaming};
use zeroize::Zeroizing;

use crate::api::{store_error, token_message, Gateway, Prepared};
use crate::error::ApiError;

/// Items protected and stored together.
const CHUNK_ITEMS: usize = 512;
/// Most items one request message may carry.
const MAX_MESSAGE_ITEMS: usize = 5000;
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
    tokio::spawn(read(gateway, caller, inbound, pending, responses.clone()));
    tokio::spawn(answer(in_order, responses));
    ReceiverStream::new(stream)
}

type Chunk = JoinHandle<Vec<ImportResult>>;

/// Reads request messages and starts a task per chunk; the bounded queue of started chunks is
/// the back-pressure that keeps a fast sender from queueing unbounded work.
async fn read(
    gateway: Arc<Gateway>,
    caller: Option<String>,
    mut inbound: Streaming<ImportRequest>,
    pending: mpsc::Sender<Chunk>,
    responses: mpsc::Sender<Result<ImportResponse, Status>>,
) {
    loop {
        let message = match inbound.message().await {
            Ok(Some(message)) => message,
            Ok(None) => return,
            Err(status) => {
                tracing::info!(code = ?status.code(), "import stream ended by the caller");
                return;
            }
        };
        if message.items.len() > MAX_MESSAGE_ITEMS {
            let refusal = ApiError::invalid(
                "items",
                "TOO_MANY_ITEMS",
                "an import message carries at most 5000 items",
            );
            let _ = responses.send(Err(refusal.into())).await;
            return;
        }
        let mut items = message.items;
        while !items.is_empty() {
            let rest = items.split_off(items.len().min(CHUNK_ITEMS));
            let chunk = std::mem::replace(&mut items, rest);
            let task = tokio::spawn(import_chunk(Arc::clone(&gateway), caller.clone(), chunk));
            if pending.send(task).await.is_err() {
                return;
            }
        }
    }
}

/// Sends each chunk's results, in order, with the running totals.
async fn answer(
    mut in_order: mpsc::Receiver<Chunk>,
    responses: mpsc::Sender<Result<ImportResponse, Status>>,
) {
    let mut progress = ImportProgress::default();
    while let Some(task) = in_order.recv().await {
        let results = match task.await {
            Ok(results) => results,
            Err(err) => {
                tracing::error!(%err, "an import chunk failed");
                let _ = responses
                    .send(Err(Status::internal("an import chunk failed")))
                    .await;
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
    let mut results: Vec<Option<ImportResult>> = vec![None; items.len()];
    let mut batch: Vec<(usize, u64, Prepared)> = Vec::with_capacity(items.len());
    let mut one_by_one: Vec<(usize, u64, Prepared)> = Vec::new();
    for (index, item) in items.into_iter().enumerate() {
        let sequence = item.sequence;
        let outcome = match item.item {
            None => Err(ApiError::missing("item")),
            Some(mut request) => {
                // Bulk import never holds CVCs; wipe one if it was sent anyway.
                let cvc = Zeroizing::new(std::mem::take(&mut request.cvc));
                if !cvc.is_empty() {
                    Err(ApiError::invalid(
                        "cvc",
                        "CVC_NOT_ALLOWED",
                        "bulk import does not accept CVCs",
                    ))
                } else if request.provisional {
                    Err(ApiError::invalid(
                        "provisional",
                        "PROVISIONAL_NOT_ALLOWED",
                        "bulk import creates usable tokens only",
                    ))
                } else {
                    gateway.prepare(caller.as_deref(), request)
                }
            }
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
            Ok(protected) => {
                let (record, journal) = gateway.record_for(&prepared, protected, &caller_name, now);
                rows.push((record, journal));
                stored.push((index, sequence, prepared));
            }
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
        .into_iter()
        .map(|result| {
            result.unwrap_or_else(|| {
                failure(
                    0,
                    &ApiError::new(Code::Internal, "IMPORT_ERROR", "the item was not processed"),
                )
            })
        })
        .collect()
}

fn set(results: &mut [Option<ImportResult>], index: usize, result: ImportResult) {
    if let Some(slot) = results.get_mut(index) {
        *slot = Some(result);
    }
}
