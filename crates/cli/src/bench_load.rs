//! The closed-loop load engine of `tessera bench`: a fixed number of requests in flight, each
//! worker sending its next request as soon as the previous one is answered, spread over a
//! fixed number of HTTP/2 connections. Only requests that complete inside the measured window
//! (after the warm-up) count.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use hdrhistogram::Histogram;
use prost::Message as _;
use tessera_api::bench::floor_client::FloorClient;
use tessera_api::bench::RelayRequest;
use tessera_api::v1::tokenization_client::TokenizationClient;
use tessera_api::v1::{
    import_result, tokenize_request, Card, DetokenizeRequest, ImportItem, ImportRequest, Initiator,
    ListTokensRequest, Purpose, RecurringModel, ShopperInteraction, TokenizeRequest,
};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio::time::{sleep_until, Instant};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;
use tonic::Code;

use crate::bench_cards::{current_year, random_expiry, random_pan, SplitMix64};
use crate::bench_report::{new_histogram, record_latency, CpuUse, Measurement, ServerUse, ServersUse};
use crate::bench_stack::{sample_process, ProcSample};

/// What each request of a phase does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Scenario {
    /// Tokenize a new random card (card-on-file token).
    Tokenize,
    /// Detokenize one of the tokens made in the setup phase.
    Detokenize,
    /// One tokenize for every four detokenizes.
    Mixed,
    /// List one shopper's tokens (first page).
    List,
    /// Bulk import (`ImportTokens`) of new random cards in chunks; counts items, not chunks.
    Import,
    /// The no-op relay through gateway and vault (`tessera.bench.v1.Floor/Relay`).
    Floor,
}

impl Scenario {
    pub fn name(self) -> &'static str {
        match self {
            Self::Tokenize => "tokenize",
            Self::Detokenize => "detokenize",
            Self::Mixed => "mixed",
            Self::List => "list",
            Self::Import => "import",
            Self::Floor => "floor",
        }
    }

    /// True when the scenario works on tokens made in a setup phase.
    pub fn needs_tokens(self) -> bool {
        matches!(self, Self::Detokenize | Self::Mixed | Self::List)
    }
}

/// Shopper references of the benchmark's tokens. Letters only: a reference that looks like a
/// phone or card number would be refused as personal data.
const SHOPPERS: [&str; 16] = [
    "bench-shopper-a",
    "bench-shopper-b",
    "bench-shopper-c",
    "bench-shopper-d",
    "bench-shopper-e",
    "bench-shopper-f",
    "bench-shopper-g",
    "bench-shopper-h",
    "bench-shopper-i",
    "bench-shopper-j",
    "bench-shopper-k",
    "bench-shopper-l",
    "bench-shopper-m",
    "bench-shopper-n",
    "bench-shopper-o",
    "bench-shopper-p",
];

/// Page size of the list scenario: every token of one shopper fits when the setup made at
/// most 16 per shopper (the default 256 tokens over 16 shoppers).
const LIST_PAGE_SIZE: u32 = 20;

/// A token made in the setup phase and the shopper it belongs to.
#[derive(Debug, Clone)]
pub struct SetupToken {
    pub token: String,
    pub shopper: &'static str,
}

/// Everything a phase's requests are made from; shared by all workers.
#[derive(Debug)]
pub struct Workload {
    pub scenario: Scenario,
    pub merchant: String,
    pub tokens: Arc<Vec<SetupToken>>,
    pub floor_payload: Vec<u8>,
    pub this_year: u32,
    /// Items per `ImportRequest` in the import scenario.
    pub import_chunk: usize,
}

impl Workload {
    /// A new random card for a random one of the benchmark's shoppers.
    fn tokenize_request(&self, rng: &mut SplitMix64) -> TokenizeRequest {
        let shopper = pick(rng, &SHOPPERS).copied().unwrap_or("bench-shopper");
        tokenize_request_for(&self.merchant, rng, shopper, self.this_year)
    }

    /// Sends one request of the scenario; `sequence` numbers the worker's requests.
    async fn call(
        &self,
        tokenization: &mut TokenizationClient<Channel>,
        floor: &mut FloorClient<Channel>,
        rng: &mut SplitMix64,
        sequence: u64,
    ) -> Result<(), Code> {
        let status = match self.scenario {
            Scenario::Tokenize => tokenization.tokenize(self.tokenize_request(rng)).await.err(),
            Scenario::Mixed if sequence % 5 == 0 => {
                tokenization.tokenize(self.tokenize_request(rng)).await.err()
            }
            Scenario::Detokenize | Scenario::Mixed => {
                let token = pick(rng, &self.tokens).ok_or(Code::FailedPrecondition)?;
                tokenization
                    .detokenize(self.detokenize_request(token))
                    .await
                    .err()
            }
            Scenario::List => {
                let shopper = pick(rng, &SHOPPERS).unwrap_or(&"bench-shopper");
                let request = ListTokensRequest {
                    merchant_id: self.merchant.clone(),
                    shopper_reference: (*shopper).to_owned(),
                    page_size: LIST_PAGE_SIZE,
                    page_token: String::new(),
                };
                tokenization.list_tokens(request).await.err()
            }
            Scenario::Floor => {
                let request = RelayRequest {
                    payload: self.floor_payload.clone(),
                };
                floor.relay(request).await.err()
            }
            // Streams, not unary calls: see `import_worker`.
            Scenario::Import => return Err(Code::Internal),
        };
        match status {
            None => Ok(()),
            Some(status) => Err(status.code()),
        }
    }

    /// One chunk of new random cards for the import scenario, numbered from `*sequence`.
    fn import_request(&self, rng: &mut SplitMix64, sequence: &mut u64) -> ImportRequest {
        let items = (0..self.import_chunk.max(1))
            .map(|_| {
                *sequence += 1;
                ImportItem {
                    sequence: *sequence,
                    item: Some(self.tokenize_request(rng)),
                }
            })
            .collect();
        ImportRequest { items }
    }

    /// A cardholder-initiated one-click use of a card-on-file token: the purpose such a
    /// token always allows.
    fn detokenize_request(&self, token: &SetupToken) -> DetokenizeRequest {
        DetokenizeRequest {
            merchant_id: self.merchant.clone(),
            token: token.token.clone(),
            purpose: Some(Purpose {
                initiator: Initiator::Cardholder.into(),
                recurring_model: RecurringModel::CardOnFile.into(),
                shopper_interaction: ShopperInteraction::Ecommerce.into(),
            }),
            shopper_reference: token.shopper.to_owned(),
            cvc_token: String::new(),
            acquiring_agreement: String::new(),
        }
    }
}

fn tokenize_request_for(
    merchant: &str,
    rng: &mut SplitMix64,
    shopper: &str,
    this_year: u32,
) -> TokenizeRequest {
    let (expiry_month, expiry_year) = random_expiry(rng, this_year);
    TokenizeRequest {
        merchant_id: merchant.to_owned(),
        data: Some(tokenize_request::Data::Card(Card {
            number: random_pan(rng),
            expiry_month,
            expiry_year,
            holder_name: "Bench Shopper".to_owned(),
        })),
        shopper_reference: shopper.to_owned(),
        ..TokenizeRequest::default()
    }
}

/// Bytes of a typical tokenize request: what each floor request carries, so the floor moves
/// as much data over both hops as the scenario it is compared with.
pub fn tokenize_request_size(merchant: &str) -> usize {
    let mut rng = SplitMix64::new(1);
    tokenize_request_for(merchant, &mut rng, "bench-shopper-a", current_year()).encoded_len()
}

fn pick<'a, T>(rng: &mut SplitMix64, items: &'a [T]) -> Option<&'a T> {
    let index = usize::try_from(rng.below(items.len() as u64)).ok()?;
    items.get(index)
}

/// The canonical name of a gRPC code, as in the gRPC specification.
pub fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

/// A seed that differs between runs and between workers.
pub fn base_seed() -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|elapsed| elapsed.as_nanos())
        .unwrap_or(0);
    // Truncation is fine: only the low bits vary anyway.
    (nanos as u64) ^ u64::from(std::process::id()).rotate_left(32)
}

/// Tokenizes `count` cards, `in_flight` at a time, over `channels`; returns the tokens. Fails
/// with the first error, because detokenize and list results mean nothing without them.
pub async fn make_tokens(
    channels: &[Channel],
    merchant: &str,
    count: usize,
    in_flight: usize,
    seed: u64,
) -> Result<Vec<SetupToken>, String> {
    let next = Arc::new(AtomicUsize::new(0));
    let this_year = current_year();
    let mut tasks = JoinSet::new();
    for worker in 0..in_flight.min(count).max(1) {
        let Some(channel) = channels.get(worker % channels.len().max(1)).cloned() else {
            return Err("no connection to the gateway".to_owned());
        };
        let next = Arc::clone(&next);
        let merchant = merchant.to_owned();
        let mut rng = SplitMix64::new(seed.wrapping_add(worker as u64));
        tasks.spawn(async move {
            let mut client = TokenizationClient::new(channel);
            let mut made = Vec::new();
            loop {
                let index = next.fetch_add(1, Ordering::Relaxed);
                if index >= count {
                    return Ok::<_, String>(made);
                }
                let shopper = SHOPPERS
                    .get(index % SHOPPERS.len())
                    .copied()
                    .unwrap_or("bench-shopper");
                let request = tokenize_request_for(&merchant, &mut rng, shopper, this_year);
                let response = client.tokenize(request).await.map_err(|status| {
                    format!(
                        "setup tokenize failed: {} {}",
                        code_name(status.code()),
                        status.message()
                    )
                })?;
                let token = response
                    .into_inner()
                    .token
                    .map(|token| token.token)
                    .ok_or_else(|| "setup tokenize returned no token".to_owned())?;
                made.push(SetupToken { token, shopper });
            }
        });
    }
    let mut tokens = Vec::with_capacity(count);
    while let Some(joined) = tasks.join_next().await {
        let made = joined.map_err(|err| format!("setup worker failed: {err}"))??;
        tokens.extend(made);
    }
    Ok(tokens)
}

/// How long and how hard one phase runs.
#[derive(Debug, Clone, Copy)]
pub struct PhaseSettings {
    pub in_flight: usize,
    pub warmup: Duration,
    pub duration: Duration,
    pub seed: u64,
}

/// Process ids whose CPU and memory are reported: the vault's and the gateway's.
pub type ServerPids = (Option<u32>, Option<u32>);

/// What one worker saw in the measured window.
struct WorkerOutcome {
    histogram: Histogram<u64>,
    errors: BTreeMap<&'static str, u64>,
    /// Items imported (import scenario only).
    items: u64,
}

/// The measured window: requests that complete inside it count.
#[derive(Debug, Clone, Copy)]
struct Window {
    start: Instant,
    end: Instant,
}

impl Window {
    fn contains(self, instant: Instant) -> bool {
        instant >= self.start && instant <= self.end
    }
}

/// Runs one phase: warm-up, then the measured window, with `settings.in_flight` workers over
/// `channels` (worker `i` uses connection `i mod n`).
pub async fn run_phase(
    channels: &[Channel],
    workload: Arc<Workload>,
    settings: PhaseSettings,
    servers: Option<ServerPids>,
) -> Result<Measurement, String> {
    if channels.is_empty() {
        return Err("no connection to the gateway".to_owned());
    }
    let template = new_histogram().map_err(|err| format!("histogram: {err}"))?;
    let measure_start = Instant::now() + settings.warmup;
    let end = measure_start + settings.duration;

    // Samples CPU and memory at the window's edges, off the workers' path.
    let sampler = tokio::spawn(async move {
        sleep_until(measure_start).await;
        let before = Samples::take(servers);
        sleep_until(end).await;
        let after = Samples::take(servers);
        (before, after)
    });

    let mut workers = JoinSet::new();
    for index in 0..settings.in_flight.max(1) {
        let channel = channels
            .get(index % channels.len())
            .cloned()
            .ok_or_else(|| "no connection to the gateway".to_owned())?;
        let workload = Arc::clone(&workload);
        let histogram = template.clone();
        let seed = settings
            .seed
            .wrapping_add((index as u64).wrapping_mul(0x9E37_79B9));
        let window = Window {
            start: measure_start,
            end,
        };
        if workload.scenario == Scenario::Import {
            workers.spawn(import_worker(channel, workload, histogram, seed, window));
        } else {
            workers.spawn(worker(index as u64, channel, workload, histogram, seed, window));
        }
    }
    let import = workload.scenario == Scenario::Import;

    let mut histogram = template;
    let mut errors: BTreeMap<String, u64> = BTreeMap::new();
    let mut items = 0;
    while let Some(joined) = workers.join_next().await {
        let outcome = joined.map_err(|err| format!("load worker failed: {err}"))?;
        histogram
            .add(&outcome.histogram)
            .map_err(|err| format!("merging histograms: {err:?}"))?;
        for (code, count) in outcome.errors {
            *errors.entry(code.to_owned()).or_default() += count;
        }
        items += outcome.items;
    }
    let (before, after) = sampler.await.map_err(|err| format!("sampler failed: {err}"))?;
    let elapsed = settings.duration;
    let secs = elapsed.as_secs_f64();
    let client_cpu = cpu_between(before.client, after.client, secs);
    let mut measurement = Measurement::new(&histogram, errors, elapsed, client_cpu);
    if import {
        measurement = measurement.counting_import_items(items);
    }
    if servers.is_some() {
        measurement.servers = Some(ServersUse {
            gateway: server_use(before.gateway, after.gateway, secs),
            vault: server_use(before.vault, after.vault, secs),
        });
    }
    Ok(measurement)
}

async fn worker(
    index: u64,
    channel: Channel,
    workload: Arc<Workload>,
    mut histogram: Histogram<u64>,
    seed: u64,
    window: Window,
) -> WorkerOutcome {
    let mut tokenization = TokenizationClient::new(channel.clone());
    let mut floor = FloorClient::new(channel);
    let mut rng = SplitMix64::new(seed);
    let mut errors = BTreeMap::new();
    // Staggered so that in the mixed scenario the workers do not all tokenize at once.
    let mut sequence = index;
    loop {
        let started = Instant::now();
        if started >= window.end {
            break;
        }
        let outcome = workload
            .call(&mut tokenization, &mut floor, &mut rng, sequence)
            .await;
        sequence = sequence.wrapping_add(1);
        let finished = Instant::now();
        if !window.contains(finished) {
            continue;
        }
        match outcome {
            Ok(()) => record_latency(&mut histogram, finished - started),
            Err(code) => *errors.entry(code_name(code)).or_default() += 1,
        }
    }
    WorkerOutcome {
        histogram,
        errors,
        items: 0,
    }
}

/// Pause after a failed import stream before opening the next, so a failing server is not
/// hammered in a tight loop.
const IMPORT_RETRY_PAUSE: Duration = Duration::from_millis(10);

/// One import stream at a time, one chunk outstanding on it: send a chunk, wait for its
/// results, send the next. Latency is per chunk; each item's outcome is counted. A stream
/// that fails is counted once by its code and replaced by a new one.
async fn import_worker(
    channel: Channel,
    workload: Arc<Workload>,
    mut histogram: Histogram<u64>,
    seed: u64,
    window: Window,
) -> WorkerOutcome {
    let mut client = TokenizationClient::new(channel);
    let mut rng = SplitMix64::new(seed);
    let mut errors: BTreeMap<&'static str, u64> = BTreeMap::new();
    let mut items = 0;
    let mut sequence = 0;
    'streams: while Instant::now() < window.end {
        let (chunks, receiver) = mpsc::channel(1);
        // The first chunk is queued before the call, so a server that answers only once it
        // has data cannot leave the call waiting.
        let mut started = Instant::now();
        if chunks
            .send(workload.import_request(&mut rng, &mut sequence))
            .await
            .is_err()
        {
            break;
        }
        let mut results = match client.import_tokens(ReceiverStream::new(receiver)).await {
            Ok(response) => response.into_inner(),
            Err(status) => {
                if window.contains(Instant::now()) {
                    *errors.entry(code_name(status.code())).or_default() += 1;
                }
                tokio::time::sleep(IMPORT_RETRY_PAUSE).await;
                continue;
            }
        };
        loop {
            let answer = results.message().await;
            let finished = Instant::now();
            let counted = window.contains(finished);
            match answer {
                Ok(Some(response)) if counted => {
                    record_latency(&mut histogram, finished - started);
                    for result in response.results {
                        match result.outcome {
                            Some(import_result::Outcome::Token(_)) => items += 1,
                            Some(import_result::Outcome::Error(error)) => {
                                *errors.entry(code_name(Code::from_i32(error.code))).or_default() += 1;
                            }
                            None => *errors.entry(code_name(Code::Unknown)).or_default() += 1,
                        }
                    }
                }
                Ok(Some(_)) => {}
                // The server ended the stream early: open another.
                Ok(None) => continue 'streams,
                Err(status) => {
                    if counted {
                        *errors.entry(code_name(status.code())).or_default() += 1;
                    }
                    tokio::time::sleep(IMPORT_RETRY_PAUSE).await;
                    continue 'streams;
                }
            }
            if finished >= window.end {
                // Dropping the sender ends the stream.
                break 'streams;
            }
            started = Instant::now();
            if chunks
                .send(workload.import_request(&mut rng, &mut sequence))
                .await
                .is_err()
            {
                continue 'streams;
            }
        }
    }
    WorkerOutcome {
        histogram,
        errors,
        items,
    }
}

/// CPU and memory of this process and the servers at one moment.
#[derive(Debug, Clone, Copy, Default)]
struct Samples {
    client: Option<ProcSample>,
    gateway: Option<ProcSample>,
    vault: Option<ProcSample>,
}

impl Samples {
    fn take(servers: Option<ServerPids>) -> Self {
        let server = |pid: Option<u32>| pid.and_then(|pid| sample_process(Some(pid)).ok());
        let (vault, gateway) = servers.unwrap_or((None, None));
        Self {
            client: sample_process(None).ok(),
            gateway: server(gateway),
            vault: server(vault),
        }
    }
}

fn cpu_between(before: Option<ProcSample>, after: Option<ProcSample>, secs: f64) -> CpuUse {
    match (before, after) {
        (Some(before), Some(after)) => CpuUse::new(
            after.user_secs - before.user_secs,
            after.system_secs - before.system_secs,
            secs,
        ),
        _ => CpuUse::default(),
    }
}

fn server_use(before: Option<ProcSample>, after: Option<ProcSample>, secs: f64) -> ServerUse {
    ServerUse {
        cpu: cpu_between(before, after, secs),
        rss_bytes_start: before.map_or(0, |sample| sample.rss_bytes),
        rss_bytes_end: after.map_or(0, |sample| sample.rss_bytes),
    }
}

#[cfg(test)]
mod tests {
    #![allow(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::panic,
        clippy::indexing_slicing
    )]

    use super::*;
    use crate::bench_cards::luhn_valid;

    #[test]
    fn tokenize_requests_carry_a_valid_card_and_a_shopper() {
        let mut rng = SplitMix64::new(3);
        let request = tokenize_request_for("m_bench", &mut rng, "bench-shopper-a", 2030);
        assert_eq!(request.merchant_id, "m_bench");
        assert_eq!(request.shopper_reference, "bench-shopper-a");
        let Some(tokenize_request::Data::Card(card)) = &request.data else {
            panic!("no card")
        };
        assert!(luhn_valid(&card.number));
        assert!(card.expiry_year > 2030);
        assert!(tokenize_request_size("m_bench") > 40);
    }

    #[test]
    fn shopper_references_are_long_enough_and_not_numbers() {
        for shopper in SHOPPERS {
            assert!(shopper.len() >= 3);
            assert!(!shopper.chars().any(|c| c.is_ascii_digit()), "{shopper}");
        }
    }

    #[test]
    fn code_names_follow_the_grpc_spelling() {
        assert_eq!(code_name(Code::Unavailable), "UNAVAILABLE");
        assert_eq!(code_name(Code::FailedPrecondition), "FAILED_PRECONDITION");
    }
}
