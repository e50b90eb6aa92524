//! Several gateways and vaults side by side against one PostgreSQL database (PostgreSQL only:
//! SQLite is the one-box backend):
//! - tokens created through one gateway are listed and detokenized through the other;
//! - a vault killed (SIGKILL) during a steady stream of requests through both gateways
//!   fails no request that was not in flight at that moment, and loses none;
//! - the retention sweeper runs under a lease in the database: with two gateways, each due
//!   token is expired and journalled exactly once, all by the lease holder, and the other
//!   gateway takes over when the holder dies.
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
    list_all, stream_caller, Client, Stream,
};
use common::{database_pool, gateway_channel_at, require_postgres, Backend, Stack, StackOptions};
use tessera_api::v1::tokenization_client::TokenizationClient;

const MERCHANT: &str = "m_scale";

async fn client(stack: &Stack, index: usize) -> Client {
    TokenizationClient::new(gateway_channel_at(stack, index, "dev-client").await)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_gateways_share_tokens_and_a_killed_vault_fails_only_requests_in_flight() {
    if !require_postgres(
        "e2e_scale_out::two_gateways_share_tokens_and_a_killed_vault_fails_only_requests_in_flight",
    ) {
        return;
    }
    let mut stack = Stack::start_with(StackOptions {
        backend: Backend::Postgres,
        vaults: 2,
        gateways: 2,
        callers: vec![stream_caller()],
        ..StackOptions::default()
    });
    let clients = [client(&stack, 0).await, client(&stack, 1).await];

    // Created through one gateway, listed and detokenized through the other.
    let mut created: [Vec<(String, String)>; 2] = [Vec::new(), Vec::new()];
    for i in 0..10 {
        let through = i % 2;
        let number = card_number(1_000_000 + i);
        let token = clients[through]
            .clone()
            .tokenize(tokenize_card(MERCHANT, &number))
            .await
            .unwrap()
            .into_inner()
            .token
            .unwrap()
            .token;
        created[through].push((token, number));
    }
    for (through, other) in [(0, 1), (1, 0)] {
        let listed: HashSet<String> = list_all(&clients[other], MERCHANT).await.into_iter().collect();
        for (token, number) in &created[through] {
            assert!(
                listed.contains(token),
                "{token} made through gateway {through} is not listed by gateway {other}"
            );
            let revealed = clients[other]
                .clone()
                .detokenize(detokenize(MERCHANT, token))
                .await
                .unwrap()
                .into_inner();
            assert_eq!(&revealed_number(&revealed), number);
        }
    }

    // A steady stream through both gateways; vault 1 dies a quarter of the way in.
    const TOTAL: usize = 400;
    let stream = Stream::start(clients.to_vec(), MERCHANT, 0, TOTAL, 16);
    assert!(
        stream
            .wait_for_acknowledged(TOTAL / 4, Duration::from_secs(120))
            .await,
        "the stream did not get going"
    );
    let kill_started = Instant::now();
    stack.kill_vault_at(1);
    let kill_done = Instant::now();
    let outcomes = stream.finish().await;
    let started_after = outcomes.iter().filter(|o| o.started > kill_done).count();
    eprintln!(
        "vault 1 killed; {} of {TOTAL} acknowledged, {started_after} sent after the kill; failures: {:?}",
        acknowledged(&outcomes).len(),
        failure_summary(&outcomes)
    );
    assert!(
        started_after > 0,
        "the stream ended before the kill; nothing shows that it went on"
    );
    let wrongly_failed: Vec<String> = outcomes
        .iter()
        .filter(|o| o.result.is_err())
        .filter(|o| !(o.started <= kill_done && o.finished >= kill_started))
        .map(|o| {
            format!(
                "request {} via gateway {} ({} ms after the kill): {:?}",
                o.index,
                o.client,
                o.started.saturating_duration_since(kill_done).as_millis(),
                o.result.as_ref().unwrap_err()
            )
        })
        .collect();
    assert!(
        wrongly_failed.is_empty(),
        "{} requests that were not in flight when vault 1 died failed (the gateway must stop \
         using a dead vault and retry elsewhere): {:?}",
        wrongly_failed.len(),
        &wrongly_failed[..wrongly_failed.len().min(10)]
    );

    // None lost: every acknowledged token detokenizes through the gateway it did not use.
    for through in 0..2 {
        let acked: Vec<(String, String)> = outcomes
            .iter()
            .filter(|o| o.client == through)
            .filter_map(|o| o.result.as_ref().ok().map(|t| (t.clone(), o.number.clone())))
            .collect();
        assert_all_detokenize(&clients[1 - through], MERCHANT, &acked).await;
    }
    let pool = database_pool(&stack).await;
    assert_no_half_written_records(&pool).await;
    pool.close().await;
}

/// Lines of `log` that record the sweeper expiring `token`.
fn swept_in(log: &str, token: &str) -> bool {
    log.lines()
        .any(|line| line.contains("expired") && line.contains(token))
}

async fn tokenize_provisional(clients: &[Client], merchant: &str, first: usize, count: usize) -> Vec<String> {
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..count {
        let mut client = clients[i % clients.len()].clone();
        let merchant = merchant.to_owned();
        tasks.spawn(async move {
            let mut request = tokenize_card(&merchant, &card_number(first + i));
            request.provisional = true;
            client
                .tokenize(request)
                .await
                .unwrap()
                .into_inner()
                .token
                .unwrap()
                .token
        });
    }
    let mut tokens = Vec::with_capacity(count);
    while let Some(token) = tasks.join_next().await {
        tokens.push(token.unwrap());
    }
    tokens
}

/// Waits (bounded) until none of `merchant`'s tokens is still provisional.
async fn wait_until_all_expired(pool: &sqlx::AnyPool, merchant: &str, limit: Duration) {
    let deadline = Instant::now() + limit;
    loop {
        let left: i64 =
            sqlx::query_scalar("SELECT COUNT(*) FROM tokens WHERE merchant_id = $1 AND status <> 'expired'")
                .bind(merchant)
                .fetch_one(pool)
                .await
                .unwrap();
        if left == 0 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{left} tokens of {merchant} were not swept within {} s",
            limit.as_secs()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn lease_holder(pool: &sqlx::AnyPool) -> String {
    sqlx::query_scalar("SELECT holder FROM job_leases WHERE job = 'sweeper'")
        .fetch_one(pool)
        .await
        .unwrap()
}

/// EXPIRE journal entries per token of `merchant`.
async fn expiries(pool: &sqlx::AnyPool, merchant: &str) -> Vec<(String, i64)> {
    sqlx::query_as(
        "SELECT t.token, (SELECT COUNT(*) FROM journal j WHERE j.merchant_id = t.merchant_id \
         AND j.token = t.token AND j.kind = 'EXPIRE') FROM tokens t WHERE t.merchant_id = $1",
    )
    .bind(merchant)
    .fetch_all(pool)
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_gateways_sweep_each_token_once_under_one_lease() {
    if !require_postgres("e2e_scale_out::two_gateways_sweep_each_token_once_under_one_lease") {
        return;
    }
    let mut gateway_extra = toml::Table::new();
    let lifecycle: toml::Table = toml::from_str("sweep_interval_secs = 1\nprovisional_ttl_secs = 1").unwrap();
    gateway_extra.insert("lifecycle".into(), toml::Value::Table(lifecycle));
    let mut stack = Stack::start_with(StackOptions {
        backend: Backend::Postgres,
        gateways: 2,
        callers: vec![stream_caller()],
        gateway_extra,
        // The sweeper's "expired" lines are at info; a RUST_LOG of the test run must not hide them.
        rust_log: Some("info".into()),
        ..StackOptions::default()
    });
    let clients = [client(&stack, 0).await, client(&stack, 1).await];
    let pool = database_pool(&stack).await;

    // Provisional tokens nobody confirms are due a second later.
    const TOKENS: usize = 200;
    let tokens = tokenize_provisional(&clients, "m_sweep", 0, TOKENS).await;
    wait_until_all_expired(&pool, "m_sweep", Duration::from_secs(60)).await;
    // A few more sweep rounds of both gateways, so double work would have time to show.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let counts = expiries(&pool, "m_sweep").await;
    assert_eq!(counts.len(), TOKENS);
    let wrong: Vec<_> = counts.iter().filter(|(_, n)| *n != 1).collect();
    assert!(wrong.is_empty(), "tokens not expired exactly once: {wrong:?}");

    let logs = [stack.gateway_log(0), stack.gateway_log(1)];
    let swept_by: Vec<usize> = (0..2)
        .map(|g| tokens.iter().filter(|t| swept_in(&logs[g], t)).count())
        .collect();
    let holder = lease_holder(&pool).await;
    let holder_index = (0..2)
        .find(|g| holder.contains(&stack.gateway_addr_at(*g).to_string()))
        .unwrap_or_else(|| panic!("lease holder {holder:?} is neither gateway"));
    assert_eq!(
        (swept_by[holder_index], swept_by[1 - holder_index]),
        (TOKENS, 0),
        "the lease holder (gateway {holder_index}) must do all the sweeping: {swept_by:?}"
    );

    // The holder dies; once its lease runs out the other gateway sweeps.
    let other = 1 - holder_index;
    stack.kill_gateway_at(holder_index);
    let later = tokenize_provisional(&clients[other..=other], "m_sweep_later", TOKENS, 20).await;
    // The lease lasts at least 10 s (sweeper::lease_ttl); allow for a loaded machine.
    wait_until_all_expired(&pool, "m_sweep_later", Duration::from_secs(60)).await;
    // The sweeper logs a batch just after committing it; give the lines a (bounded) moment.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !later.iter().all(|t| swept_in(&stack.gateway_log(other), t)) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        later.iter().all(|t| swept_in(&stack.gateway_log(other), t)),
        "the surviving gateway did not take over the sweeping"
    );
    assert!(lease_holder(&pool)
        .await
        .contains(&stack.gateway_addr_at(other).to_string()));
    let counts = expiries(&pool, "m_sweep_later").await;
    assert!(counts.iter().all(|(_, n)| *n == 1), "{counts:?}");
    pool.close().await;
}
