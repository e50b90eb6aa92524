//! Crash safety through the real processes, on SQLite and on PostgreSQL: the gateway or the
//! vault is killed with SIGKILL in the middle of a steady tokenize stream (400 requests, 16 in
//! flight) and started again. Every token acknowledged to a caller still detokenizes to its
//! card, and no half-written record is visible: not through the API (every listed token
//! detokenizes) and not in the database (every token row has its TK journal entry, its key
//! and its ciphertext; no journal entry without its token). While the vault is down, requests
//! fail with UNAVAILABLE and nothing else.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use common::requests::{detokenize, revealed_number, tokenize_card};
use common::stream::{
    acknowledged, assert_all_detokenize, assert_no_half_written_records, card_number, failure_summary,
    list_all, stream_caller, Client, Outcome, Stream,
};
use common::{database_pool, gateway_channel, Backend, Stack, StackOptions};
use tessera_api::error_details::decode_error_info;
use tessera_api::v1::tokenization_client::TokenizationClient;
use tonic::Code;

const MERCHANT: &str = "m_crash";
const TOTAL: usize = 400;
const IN_FLIGHT: usize = 16;
/// The crash comes once this many requests were acknowledged: mid-stream.
const CRASH_AFTER: usize = TOTAL / 4;
/// Bounds for waiting on the stream and on a restarted process (generous: CI is shared).
const STREAM_LIMIT: Duration = Duration::from_secs(120);
const RECOVERY_LIMIT: Duration = Duration::from_secs(60);

fn stack(backend: Backend) -> Stack {
    Stack::start_with(StackOptions {
        callers: vec![stream_caller()],
        backend,
        ..StackOptions::default()
    })
}

async fn client(stack: &Stack) -> Client {
    TokenizationClient::new(gateway_channel(stack, "dev-client").await)
}

/// The whole picture after a crash and restart: acknowledged tokens detokenize, every token
/// the API lists (acknowledged or committed just before the crash) detokenizes to one of the
/// stream's cards, each card at most once, and the database holds only whole records.
async fn assert_nothing_lost_or_half_written(stack: &Stack, client: &Client, outcomes: &[Outcome]) {
    let acked = acknowledged(outcomes);
    assert!(acked.len() >= CRASH_AFTER, "only {} acknowledged", acked.len());
    assert_all_detokenize(client, MERCHANT, &acked).await;

    let listed = list_all(client, MERCHANT).await;
    let listed_set: HashSet<&String> = listed.iter().collect();
    assert_eq!(listed_set.len(), listed.len(), "a token listed twice");
    for (token, _) in &acked {
        assert!(listed_set.contains(token), "acknowledged {token} is not listed");
    }
    // Tokens committed but not acknowledged (the answer died with the process) are whole too.
    let acked_tokens: HashSet<&String> = acked.iter().map(|(token, _)| token).collect();
    let stream_cards: HashSet<String> = (0..TOTAL).map(card_number).collect();
    let mut cards_seen: HashSet<String> = acked.iter().map(|(_, number)| number.clone()).collect();
    let mut client = client.clone();
    for token in listed.iter().filter(|token| !acked_tokens.contains(token)) {
        let revealed = client
            .detokenize(detokenize(MERCHANT, token))
            .await
            .unwrap_or_else(|status| panic!("listed {token} does not detokenize: {status:?}"))
            .into_inner();
        let number = revealed_number(&revealed);
        assert!(
            stream_cards.contains(&number),
            "{token} revealed a card nobody sent"
        );
        assert!(cards_seen.insert(number), "two tokens for one request's card");
    }

    let pool = database_pool(stack).await;
    assert_no_half_written_records(&pool).await;
    let rows: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM tokens WHERE merchant_id = $1")
        .bind(MERCHANT)
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(
        usize::try_from(rows).unwrap(),
        listed.len(),
        "every stored token is a listed, usable one"
    );
    pool.close().await;
}

/// A short stream after the restart: the service is whole again.
async fn assert_serves_again(client: &Client) {
    let outcomes = Stream::start(vec![client.clone()], MERCHANT, TOTAL, 32, 8)
        .finish()
        .await;
    assert!(
        outcomes.iter().all(|o| o.result.is_ok()),
        "requests fail after the restart: {:?}",
        failure_summary(&outcomes)
    );
}

async fn gateway_killed_mid_stream_loses_no_acknowledged_token(backend: Backend) {
    let mut stack = stack(backend);
    let stream = Stream::start(vec![client(&stack).await], MERCHANT, 0, TOTAL, IN_FLIGHT);
    assert!(
        stream.wait_for_acknowledged(CRASH_AFTER, STREAM_LIMIT).await,
        "the stream did not get going"
    );
    let killed_at = Instant::now();
    stack.kill_gateway();
    let outcomes = stream.finish().await;
    let in_flight = outcomes.iter().filter(|o| o.in_flight_at(killed_at)).count();
    eprintln!(
        "gateway killed with {in_flight} requests in flight; {} of {TOTAL} acknowledged; failures: {:?}",
        acknowledged(&outcomes).len(),
        failure_summary(&outcomes)
    );
    // Nothing failed before the crash.
    for outcome in &outcomes {
        if outcome.result.is_err() {
            assert!(
                outcome.finished >= killed_at,
                "request {} failed before the crash: {:?}",
                outcome.index,
                outcome.result
            );
        }
    }

    stack.start_gateway();
    let client = client(&stack).await;
    assert_nothing_lost_or_half_written(&stack, &client, &outcomes).await;
    assert_serves_again(&client).await;
}

async fn vault_killed_mid_stream_fails_only_in_flight_and_later_requests_with_unavailable(backend: Backend) {
    let mut stack = stack(backend);
    let client = client(&stack).await;
    let stream = Stream::start(vec![client.clone()], MERCHANT, 0, TOTAL, IN_FLIGHT);
    assert!(
        stream.wait_for_acknowledged(CRASH_AFTER, STREAM_LIMIT).await,
        "the stream did not get going"
    );
    let killed_at = Instant::now();
    stack.kill_vault();
    let outcomes = stream.finish().await;
    let in_flight = outcomes.iter().filter(|o| o.in_flight_at(killed_at)).count();
    eprintln!(
        "vault killed with {in_flight} requests in flight; {} of {TOTAL} acknowledged; failures: {:?}",
        acknowledged(&outcomes).len(),
        failure_summary(&outcomes)
    );
    for outcome in &outcomes {
        if let Err(status) = &outcome.result {
            assert!(
                outcome.finished >= killed_at,
                "request {} failed before the crash: {status:?}",
                outcome.index
            );
            let reason = decode_error_info(status.details())
                .map(|info| info.reason)
                .unwrap_or_default();
            assert_eq!(
                (status.code(), reason.as_str()),
                (Code::Unavailable, "VAULT_UNAVAILABLE"),
                "request {} failed with something other than UNAVAILABLE: {status:?}",
                outcome.index
            );
        }
    }
    assert!(
        outcomes.iter().any(|o| o.result.is_err()),
        "nothing failed with the vault down: the kill missed the stream"
    );

    stack.start_vault();
    wait_until_tokenize_works(&client).await;
    assert_nothing_lost_or_half_written(&stack, &client, &outcomes).await;
    assert_serves_again(&client).await;
}

/// The gateway reconnects to a restarted vault on its own; this waits (bounded) until a
/// tokenize for another merchant (so the checks of `MERCHANT` see only the stream) works.
async fn wait_until_tokenize_works(client: &Client) {
    let deadline = Instant::now() + RECOVERY_LIMIT;
    let mut client = client.clone();
    let mut last = None;
    // Bounded twice over: by the deadline, and by the number of attempts.
    for index in 0..1000 {
        match client
            .tokenize(tokenize_card("m_probe", &card_number(index)))
            .await
        {
            Ok(_) => return,
            Err(status) => last = Some(status),
        }
        if Instant::now() >= deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    panic!(
        "the gateway did not use the restarted vault within {} s: {last:?}",
        RECOVERY_LIMIT.as_secs()
    );
}

backend_tests!(
    gateway_killed_mid_stream_loses_no_acknowledged_token,
    vault_killed_mid_stream_fails_only_in_flight_and_later_requests_with_unavailable,
);
