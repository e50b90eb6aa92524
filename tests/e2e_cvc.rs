//! CVCs that are gone, and racing uses of a token carrying one, through the real processes on
//! SQLite and on PostgreSQL (issue 14):
//! - after a vault restart, an operator's seal and unseal, or once a CVC's time ran out, a
//!   single-use card+CVC token still reveals its card, says the CVC is unavailable, and is
//!   consumed; a card-on-file use naming a CVC-only token whose CVC is gone likewise returns
//!   the card and consumes the CVC token;
//! - concurrent uses of one single-use card+CVC token (or of one CVC-only token): exactly one
//!   succeeds, with the CVC, and every other gets TOKEN_CONSUMED.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::requests::{detokenize, detokenize_for, one_off, revealed_number, tokenize_card, SHOPPER};
use common::{gateway_channel, try_tessera, Backend, Stack, StackOptions};
use tessera_api::error_details::decode_error_info;
use tessera_api::v1::tokenization_client::TokenizationClient;
use tessera_api::v1::{
    CvcStatus, DetokenizeRequest, DetokenizeResponse, GetTokenHistoryRequest, GetTokenRequest, TokenKind,
    TokenStatus, TokenizeRequest, TransactionType,
};
use tonic::transport::Channel;
use tonic::Code;

type Client = TokenizationClient<Channel>;

const MERCHANT: &str = "m_cvc";
/// Concurrent uses of one token in the race tests.
const RACERS: usize = 8;
/// Bound for waiting on a restarted vault (generous: CI is shared).
const RECOVERY_LIMIT: Duration = Duration::from_secs(60);

fn reason(status: &tonic::Status) -> String {
    decode_error_info(status.details())
        .map(|info| info.reason)
        .unwrap_or_default()
}

fn refusal(result: Result<impl std::fmt::Debug, tonic::Status>) -> (Code, String) {
    let status = result.expect_err("expected a refusal");
    (status.code(), reason(&status))
}

fn stack(backend: Backend, vault_extra: &str) -> Stack {
    Stack::start_with(StackOptions {
        backend,
        vault_extra: toml::from_str(vault_extra).unwrap(),
        ..StackOptions::default()
    })
}

async fn client(stack: &Stack) -> Client {
    TokenizationClient::new(gateway_channel(stack, "dev-client").await)
}

/// A single-use token for `number` carrying `cvc`.
fn single_use_with_cvc(number: &str, cvc: &str) -> TokenizeRequest {
    TokenizeRequest {
        kind: TokenKind::SingleUse as i32,
        cvc: cvc.into(),
        ..tokenize_card(MERCHANT, number)
    }
}

/// A CVC-only single-use token for [`SHOPPER`].
fn cvc_only(cvc: &str) -> TokenizeRequest {
    TokenizeRequest {
        merchant_id: MERCHANT.into(),
        kind: TokenKind::SingleUse as i32,
        shopper_reference: SHOPPER.into(),
        cvc: cvc.into(),
        ..Default::default()
    }
}

async fn tokenize(client: &mut Client, request: TokenizeRequest) -> String {
    client
        .tokenize(request)
        .await
        .unwrap()
        .into_inner()
        .token
        .unwrap()
        .token
}

/// A cardholder's one-off payment with a single-use token.
fn use_single(token: &str) -> DetokenizeRequest {
    detokenize_for(MERCHANT, token, one_off())
}

/// A one-click payment with a stored card, with the CVC of `cvc_token`.
fn use_stored_with_cvc(stored: &str, cvc_token: &str) -> DetokenizeRequest {
    DetokenizeRequest {
        cvc_token: cvc_token.into(),
        ..detokenize(MERCHANT, stored)
    }
}

async fn status_of(client: &mut Client, token: &str) -> TokenStatus {
    client
        .get_token(GetTokenRequest {
            merchant_id: MERCHANT.into(),
            token: token.into(),
        })
        .await
        .unwrap()
        .into_inner()
        .status()
}

async fn detokenize_entries(client: &mut Client, token: &str) -> usize {
    client
        .get_token_history(GetTokenHistoryRequest {
            merchant_id: MERCHANT.into(),
            token: token.into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .entries
        .iter()
        .filter(|entry| entry.r#type() == TransactionType::Detokenize)
        .count()
}

/// What a detokenize that found its CVC gone must answer: the card, no CVC, and the status
/// that says so.
fn assert_card_without_cvc(revealed: &DetokenizeResponse, number: &str) {
    assert_eq!(
        (
            revealed_number(revealed).as_str(),
            revealed.cvc.as_str(),
            revealed.cvc_status()
        ),
        (number, "", CvcStatus::Unavailable)
    );
}

/// Restarts the vault (its memory, with every CVC, is lost) and waits until a tokenize works
/// again.
async fn restart_vault(stack: &mut Stack, client: &Client) {
    stack.kill_vault();
    stack.start_vault();
    let deadline = Instant::now() + RECOVERY_LIMIT;
    let mut client = client.clone();
    let mut last = None;
    // Bounded twice over: by the deadline, and by the number of attempts.
    for _ in 0..300 {
        match client
            .tokenize(tokenize_card("m_probe", "4111111111111111"))
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
    panic!("the gateway did not use the restarted vault: {last:?}");
}

async fn after_a_vault_restart_the_card_is_revealed_and_the_cvc_reported_gone(backend: Backend) {
    let mut stack = stack(backend, "");
    let mut client = client(&stack).await;
    let single = tokenize(&mut client, single_use_with_cvc("378282246310005", "8642")).await;
    let stored = tokenize(&mut client, tokenize_card(MERCHANT, "4111111111111111")).await;
    let cvc_token = tokenize(&mut client, cvc_only("737")).await;

    restart_vault(&mut stack, &client).await;

    // The single-use token's own CVC: the card comes back, the CVC is reported gone, and
    // the token is consumed by this use as by any other.
    let revealed = client.detokenize(use_single(&single)).await.unwrap().into_inner();
    assert_card_without_cvc(&revealed, "378282246310005");
    assert_eq!(
        refusal(client.detokenize(use_single(&single)).await),
        (Code::NotFound, "TOKEN_CONSUMED".into())
    );
    assert_eq!(status_of(&mut client, &single).await, TokenStatus::Consumed);
    assert_eq!(detokenize_entries(&mut client, &single).await, 1);

    // A stored card asking for a CVC whose CVC-only token lost it: the card comes back, the
    // CVC is reported gone, and the CVC token is consumed.
    let revealed = client
        .detokenize(use_stored_with_cvc(&stored, &cvc_token))
        .await
        .unwrap()
        .into_inner();
    assert_card_without_cvc(&revealed, "4111111111111111");
    assert_eq!(
        refusal(client.detokenize(use_stored_with_cvc(&stored, &cvc_token)).await),
        (Code::NotFound, "TOKEN_CONSUMED".into())
    );
    assert_eq!(status_of(&mut client, &cvc_token).await, TokenStatus::Consumed);
    // Without a CVC the stored card says no CVC was involved.
    let plain = client
        .detokenize(detokenize(MERCHANT, &stored))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (revealed_number(&plain).as_str(), plain.cvc_status()),
        ("4111111111111111", CvcStatus::Unspecified)
    );

    // CVCs taken by the restarted vault come back as before.
    let fresh = tokenize(&mut client, single_use_with_cvc("378282246310005", "1234")).await;
    let revealed = client.detokenize(use_single(&fresh)).await.unwrap().into_inner();
    assert_eq!(
        (revealed.cvc.as_str(), revealed.cvc_status()),
        ("1234", CvcStatus::Returned)
    );
}

async fn a_cvc_whose_time_ran_out_is_reported_gone_and_the_card_revealed(backend: Backend) {
    let stack = stack(backend, "cvc_ttl_secs = 1");
    let mut client = client(&stack).await;
    let single = tokenize(&mut client, single_use_with_cvc("5555555555554444", "321")).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let revealed = client.detokenize(use_single(&single)).await.unwrap().into_inner();
    assert_card_without_cvc(&revealed, "5555555555554444");
    assert_eq!(status_of(&mut client, &single).await, TokenStatus::Consumed);
}

/// `tessera vault ARGS` against the stack's vault as the operator; panics if it fails.
fn tessera_vault(stack: &Stack, args: &[&str]) {
    let mut all: Vec<String> = std::iter::once("vault")
        .chain(args.iter().copied())
        .map(str::to_owned)
        .collect();
    all.extend(stack.operator_args());
    let output = try_tessera(all);
    assert!(
        output.status.success(),
        "tessera vault {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Unseals the vault with both shares of a 2-of-2 split and waits until the gateway uses it.
async fn unseal(stack: &Stack, client: &Client, shares: &Path) {
    for index in 1..=2 {
        let share = shares.join(format!("share-{index}-of-2.txt"));
        tessera_vault(stack, &["unseal", "--share-file", share.to_str().unwrap()]);
    }
    let deadline = Instant::now() + RECOVERY_LIMIT;
    let mut client = client.clone();
    loop {
        match client
            .tokenize(tokenize_card("m_probe", "4111111111111111"))
            .await
        {
            Ok(_) => return,
            Err(status) if reason(&status) == "VAULT_SEALED" && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(status) => panic!("the gateway does not use the unsealed vault: {status:?}"),
        }
    }
}

async fn after_a_seal_and_unseal_the_card_is_revealed_and_the_cvc_reported_gone(backend: Backend) {
    let state = tempfile::tempdir().unwrap();
    let shares = state.path().join("shares");
    let mut vault_extra = toml::Table::new();
    let mut master_key = toml::Table::new();
    master_key.insert("source".into(), "sealed".into());
    master_key.insert(
        "state_file".into(),
        state.path().join("seal.toml").to_str().unwrap().into(),
    );
    vault_extra.insert("master_key".into(), master_key.into());
    let stack = Stack::start_with(StackOptions {
        backend,
        vault_extra,
        ..StackOptions::default()
    });
    let mut client = client(&stack).await;
    tessera_vault(
        &stack,
        &[
            "init",
            "--shares",
            "2",
            "--threshold",
            "2",
            "--out-dir",
            shares.to_str().unwrap(),
        ],
    );
    unseal(&stack, &client, &shares).await;
    let single = tokenize(&mut client, single_use_with_cvc("378282246310005", "8642")).await;

    // Sealing wipes the held CVCs with the keys.
    tessera_vault(&stack, &["seal"]);
    unseal(&stack, &client, &shares).await;
    let revealed = client.detokenize(use_single(&single)).await.unwrap().into_inner();
    assert_card_without_cvc(&revealed, "378282246310005");
    assert_eq!(
        refusal(client.detokenize(use_single(&single)).await),
        (Code::NotFound, "TOKEN_CONSUMED".into())
    );
}

/// Sends `request` [`RACERS`] times at once; returns each answer.
async fn race(
    client: &Client,
    request: &DetokenizeRequest,
) -> Vec<Result<DetokenizeResponse, tonic::Status>> {
    let racers: Vec<_> = (0..RACERS)
        .map(|_| {
            let mut client = client.clone();
            let request = request.clone();
            tokio::spawn(async move { client.detokenize(request).await.map(tonic::Response::into_inner) })
        })
        .collect();
    let mut results = Vec::with_capacity(RACERS);
    for racer in racers {
        results.push(racer.await.unwrap());
    }
    results
}

/// Every loser got TOKEN_CONSUMED; exactly one winner, which got the card and the CVC.
fn assert_one_winner(
    results: &[Result<DetokenizeResponse, tonic::Status>],
    number: &str,
    cvc: &str,
    round: usize,
) {
    for result in results {
        if let Err(status) = result {
            assert_eq!(
                (status.code(), reason(status).as_str()),
                (Code::NotFound, "TOKEN_CONSUMED"),
                "round {round}: a losing use: {status:?}"
            );
        }
    }
    let winners: Vec<&DetokenizeResponse> = results.iter().filter_map(|r| r.as_ref().ok()).collect();
    assert_eq!(winners.len(), 1, "round {round}: {results:?}");
    assert_eq!(
        (
            revealed_number(winners[0]).as_str(),
            winners[0].cvc.as_str(),
            winners[0].cvc_status()
        ),
        (number, cvc, CvcStatus::Returned),
        "round {round}: the winner must get the CVC"
    );
}

async fn racing_uses_of_a_token_with_a_cvc_all_lose_with_token_consumed(backend: Backend) {
    let stack = stack(backend, "");
    let mut client = client(&stack).await;
    // Several rounds, so that the racers overlap in every way the scheduling allows.
    for round in 0..4 {
        let cvc = format!("{}", 500 + round);
        let single = tokenize(&mut client, single_use_with_cvc("378282246310005", &cvc)).await;
        let results = race(&client, &use_single(&single)).await;
        assert_one_winner(&results, "378282246310005", &cvc, round);
        assert_eq!(detokenize_entries(&mut client, &single).await, 1, "round {round}");
    }
    // One CVC-only token named by concurrent one-click uses of a stored card.
    let stored = tokenize(&mut client, tokenize_card(MERCHANT, "4111111111111111")).await;
    for round in 0..4 {
        let cvc = format!("{}", 9000 + round);
        let cvc_token = tokenize(&mut client, cvc_only(&cvc)).await;
        let results = race(&client, &use_stored_with_cvc(&stored, &cvc_token)).await;
        assert_one_winner(&results, "4111111111111111", &cvc, round);
        assert_eq!(status_of(&mut client, &cvc_token).await, TokenStatus::Consumed);
    }
}

backend_tests!(
    after_a_vault_restart_the_card_is_revealed_and_the_cvc_reported_gone,
    after_a_seal_and_unseal_the_card_is_revealed_and_the_cvc_reported_gone,
    a_cvc_whose_time_ran_out_is_reported_gone_and_the_card_revealed,
    racing_uses_of_a_token_with_a_cvc_all_lose_with_token_consumed,
);
