//! A steady, bounded stream of tokenize requests for the crash and scale-out tests, and the
//! checks that follow a crash: every acknowledged token detokenizes to its card, and the
//! database holds no half-written record.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sqlx::AnyPool;
use tessera_api::v1::tokenization_client::TokenizationClient;
use tessera_api::v1::ListTokensRequest;
use tonic::transport::Channel;

use super::requests::{detokenize, revealed_number, tokenize_card, SHOPPER};
use super::CallerPolicy;

pub type Client = TokenizationClient<Channel>;

/// The caller the stream tests use: every operation, listing included.
pub fn stream_caller() -> CallerPolicy {
    CallerPolicy::new(
        "spiffe://tessera/dev-client",
        &["*"],
        &["tokenize", "read_metadata", "list", "detokenize", "delete"],
    )
}

/// A distinct, Luhn-valid 16-digit Visa number for each `index`.
pub fn card_number(index: usize) -> String {
    let body = format!("4{:014}", index % 100_000_000_000_000);
    let sum: u32 = body
        .bytes()
        .rev()
        .enumerate()
        .map(|(i, b)| {
            let d = u32::from(b - b'0');
            // Positions counted from the check digit: the rightmost body digit is doubled.
            if i % 2 == 0 {
                let doubled = d * 2;
                if doubled > 9 {
                    doubled - 9
                } else {
                    doubled
                }
            } else {
                d
            }
        })
        .sum();
    format!("{body}{}", (10 - sum % 10) % 10)
}

/// One request of the stream and what became of it.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub index: usize,
    pub number: String,
    /// Which client (gateway) it went through.
    pub client: usize,
    pub started: Instant,
    pub finished: Instant,
    /// The token when the gateway acknowledged it, else the status it failed with.
    pub result: Result<String, tonic::Status>,
}

impl Outcome {
    /// Whether the request was sent before `at` and answered after it: in flight at `at`.
    pub fn in_flight_at(&self, at: Instant) -> bool {
        self.started <= at && self.finished >= at
    }
}

/// A running stream: `acknowledged` counts successes so far, for deciding when to crash
/// something; `finish` waits for it to end.
#[derive(Debug)]
pub struct Stream {
    pub acknowledged: Arc<AtomicUsize>,
    pub completed: Arc<AtomicUsize>,
    workers: tokio::task::JoinSet<()>,
    outcomes: Arc<Mutex<Vec<Outcome>>>,
}

/// How long one request may take before the stream gives up on it (a hung call must not hang
/// the test).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(20);

impl Stream {
    /// Starts `total` tokenize requests for `merchant`, `in_flight` at a time, request `i`
    /// going through `clients[i % clients.len()]` with card [`card_number`]`(first_index + i)`.
    /// A failed request is followed by a short pause on that worker so a stream against a
    /// dead process does not spin; every request is made once (no retries: a test judges
    /// each outcome).
    pub fn start(
        clients: Vec<Client>,
        merchant: &str,
        first_index: usize,
        total: usize,
        in_flight: usize,
    ) -> Self {
        let next = Arc::new(AtomicUsize::new(0));
        let acknowledged = Arc::new(AtomicUsize::new(0));
        let completed = Arc::new(AtomicUsize::new(0));
        let outcomes = Arc::new(Mutex::new(Vec::with_capacity(total)));
        let mut workers = tokio::task::JoinSet::new();
        for _ in 0..in_flight {
            let (next, acknowledged, completed, outcomes) = (
                Arc::clone(&next),
                Arc::clone(&acknowledged),
                Arc::clone(&completed),
                Arc::clone(&outcomes),
            );
            let clients = clients.clone();
            let merchant = merchant.to_owned();
            workers.spawn(async move {
                loop {
                    let i = next.fetch_add(1, Ordering::SeqCst);
                    if i >= total {
                        return;
                    }
                    let client = i % clients.len();
                    let number = card_number(first_index + i);
                    let mut channel = clients[client].clone();
                    let started = Instant::now();
                    let call = channel.tokenize(tokenize_card(&merchant, &number));
                    let result = match tokio::time::timeout(REQUEST_TIMEOUT, call).await {
                        Ok(Ok(response)) => response
                            .into_inner()
                            .token
                            .map(|token| token.token)
                            .ok_or_else(|| tonic::Status::internal("no token in the answer")),
                        Ok(Err(status)) => Err(status),
                        Err(_) => Err(tonic::Status::deadline_exceeded("the test gave up waiting")),
                    };
                    let failed = result.is_err();
                    if !failed {
                        acknowledged.fetch_add(1, Ordering::SeqCst);
                    }
                    outcomes.lock().unwrap().push(Outcome {
                        index: i,
                        number,
                        client,
                        started,
                        finished: Instant::now(),
                        result,
                    });
                    completed.fetch_add(1, Ordering::SeqCst);
                    if failed {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            });
        }
        Self {
            acknowledged,
            completed,
            workers,
            outcomes,
        }
    }

    /// Waits (bounded by `limit`) until at least `count` requests were acknowledged; false if
    /// the stream ended or the time ran out first.
    pub async fn wait_for_acknowledged(&self, count: usize, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if self.acknowledged.load(Ordering::SeqCst) >= count {
                return true;
            }
            if self.workers.is_empty() {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        false
    }

    /// Waits for every request to finish and returns the outcomes in request order.
    pub async fn finish(mut self) -> Vec<Outcome> {
        while let Some(joined) = self.workers.join_next().await {
            joined.expect("a stream worker panicked");
        }
        let mut outcomes = std::mem::take(&mut *self.outcomes.lock().unwrap());
        outcomes.sort_by_key(|outcome| outcome.index);
        outcomes
    }
}

/// The (token, card number) pairs the gateway acknowledged.
pub fn acknowledged(outcomes: &[Outcome]) -> Vec<(String, String)> {
    outcomes
        .iter()
        .filter_map(|o| {
            o.result
                .as_ref()
                .ok()
                .map(|token| (token.clone(), o.number.clone()))
        })
        .collect()
}

/// Detokenizes every `(token, number)` through `client`, 8 at a time, and panics listing the
/// tokens that did not come back as their card.
pub async fn assert_all_detokenize(client: &Client, merchant: &str, expected: &[(String, String)]) {
    let queue = Arc::new(Mutex::new(expected.to_vec()));
    let failures = Arc::new(Mutex::new(Vec::new()));
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..8 {
        let (queue, failures, mut client, merchant) = (
            Arc::clone(&queue),
            Arc::clone(&failures),
            client.clone(),
            merchant.to_owned(),
        );
        workers.spawn(async move {
            loop {
                let Some((token, number)) = queue.lock().unwrap().pop() else {
                    return;
                };
                let result = client.detokenize(detokenize(&merchant, &token)).await;
                match result {
                    Ok(response) if revealed_number(response.get_ref()) == number => {}
                    Ok(_) => failures
                        .lock()
                        .unwrap()
                        .push(format!("{token}: a different card")),
                    Err(status) => failures.lock().unwrap().push(format!(
                        "{token}: {:?} {}",
                        status.code(),
                        status.message()
                    )),
                }
            }
        });
    }
    while let Some(joined) = workers.join_next().await {
        joined.unwrap();
    }
    let failures = failures.lock().unwrap();
    assert!(
        failures.is_empty(),
        "{} of {} acknowledged tokens do not detokenize to their card: {:?}",
        failures.len(),
        expected.len(),
        &failures[..failures.len().min(10)]
    );
}

/// Every token the gateway lists for `merchant` and the test shopper (paged, bounded).
pub async fn list_all(client: &Client, merchant: &str) -> Vec<String> {
    let mut client = client.clone();
    let mut tokens = Vec::new();
    let mut page_token = String::new();
    for _ in 0..1000 {
        let page = client
            .list_tokens(ListTokensRequest {
                merchant_id: merchant.into(),
                shopper_reference: SHOPPER.into(),
                page_size: 100,
                page_token: page_token.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        tokens.extend(page.tokens.into_iter().map(|token| token.token));
        if page.next_page_token.is_empty() {
            return tokens;
        }
        page_token = page.next_page_token;
    }
    panic!("more than 1000 pages of tokens");
}

async fn count(pool: &AnyPool, query: &str) -> i64 {
    sqlx::query_scalar::<_, i64>(query)
        .fetch_one(pool)
        .await
        .unwrap_or_else(|err| panic!("{query}: {err}"))
}

/// The database holds only whole records: every token row has exactly one TK journal entry,
/// its merchant's data key, and (unless it has ended) a ciphertext and a fingerprint; no
/// journal entry names a token that does not exist.
pub async fn assert_no_half_written_records(pool: &AnyPool) {
    let checks = [
        (
            "token rows without their TK journal entry",
            "SELECT COUNT(*) FROM tokens t WHERE NOT EXISTS (SELECT 1 FROM journal j \
             WHERE j.merchant_id = t.merchant_id AND j.token = t.token AND j.kind = 'TK')",
        ),
        (
            "tokens journalled TK more than once",
            "SELECT COUNT(*) FROM (SELECT merchant_id, token FROM journal WHERE kind = 'TK' \
             GROUP BY merchant_id, token HAVING COUNT(*) > 1) twice",
        ),
        (
            "journal entries without their token row",
            "SELECT COUNT(*) FROM journal j WHERE NOT EXISTS (SELECT 1 FROM tokens t \
             WHERE t.merchant_id = j.merchant_id AND t.token = j.token)",
        ),
        (
            "live tokens without ciphertext or fingerprint",
            "SELECT COUNT(*) FROM tokens WHERE status IN ('active', 'provisional') \
             AND (ciphertext IS NULL OR length(ciphertext) = 0 OR fingerprint IS NULL)",
        ),
        (
            "tokens whose data key is not stored",
            "SELECT COUNT(*) FROM tokens t WHERE NOT EXISTS (SELECT 1 FROM merchant_keys k \
             WHERE k.merchant_id = t.merchant_id AND k.purpose = 'data' AND k.version = t.data_key_version)",
        ),
    ];
    for (what, query) in checks {
        assert_eq!(count(pool, query).await, 0, "{what}");
    }
}

/// Outcomes grouped by failure code, for assertion messages.
pub fn failure_summary(outcomes: &[Outcome]) -> HashMap<String, usize> {
    let mut summary = HashMap::new();
    for outcome in outcomes {
        if let Err(status) = &outcome.result {
            *summary
                .entry(format!("{:?}: {}", status.code(), status.message()))
                .or_insert(0) += 1;
        }
    }
    summary
}
