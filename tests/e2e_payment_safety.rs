//! Payment safety rules through the real processes: the retry guard (Mastercard 10 failures in
//! 24 hours, Visa 15 in 30 days, approvals reset, do-not-retry blocks at once, every token of a
//! card counts, agreements are separate, time unblocks), idempotency keys under concurrency,
//! strict merchant references, and resumable durable events. On SQLite and on PostgreSQL.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use std::collections::HashSet;
use std::path::PathBuf;
use std::time::Duration;

use common::requests::{detokenize, detokenize_for, one_click, tokenize_card, unscheduled, SHOPPER};
use common::{gateway_channel, Backend, CallerPolicy, Stack, StackOptions};
use tessera_api::error_details::decode_error_info;
use tessera_api::v1::tokenization_client::TokenizationClient;
use tessera_api::v1::{
    AuthorizationOutcome, ConfirmTokenRequest, DeleteTokenRequest, EventType, ExtendRetentionRequest,
    GetTokenHistoryRequest, GetTokenRequest, ReportAuthorizationRequest, SubscribeEventsRequest, TokenEvent,
    TransactionType,
};
use tonic::transport::Channel;
use tonic::Code;

type Client = TokenizationClient<Channel>;

const HOUR_MS: i64 = 3_600_000;

struct SafetyStack {
    stack: Stack,
    clock_file: PathBuf,
}

impl SafetyStack {
    fn start(backend: Backend) -> Self {
        let clock_file = tempfile::tempdir().unwrap().keep().join("clock-offset-ms");
        std::fs::write(&clock_file, "0").unwrap();
        let mut options = StackOptions {
            backend,
            ..StackOptions::default()
        };
        options.callers = vec![CallerPolicy::new(
            "spiffe://tessera/dev-client",
            &["*"],
            &[
                "tokenize",
                "read_metadata",
                "list",
                "detokenize",
                "detokenize_merchant_initiated",
                "delete",
                "extend",
            ],
        )];
        let testing: toml::Table = toml::from_str(&format!("clock_offset_file = {clock_file:?}")).unwrap();
        options
            .gateway_extra
            .insert("testing".into(), toml::Value::Table(testing));
        let lifecycle: toml::Table = toml::from_str("sweep_interval_secs = 1").unwrap();
        options
            .gateway_extra
            .insert("lifecycle".into(), toml::Value::Table(lifecycle));
        Self {
            stack: Stack::start_with(options),
            clock_file,
        }
    }

    async fn client(&self) -> Client {
        TokenizationClient::new(gateway_channel(&self.stack, "dev-client").await)
    }

    async fn set_clock(&self, offset_ms: i64) {
        std::fs::write(&self.clock_file, offset_ms.to_string()).unwrap();
        tokio::time::sleep(Duration::from_millis(2500)).await;
    }
}

fn reason(status: &tonic::Status) -> String {
    decode_error_info(status.details())
        .map(|info| info.reason)
        .unwrap_or_default()
}

async fn token_for(client: &mut Client, number: &str) -> String {
    client
        .tokenize(tokenize_card("m1", number))
        .await
        .unwrap()
        .into_inner()
        .token
        .unwrap()
        .token
}

async fn report(
    client: &mut Client,
    token: &str,
    outcome: AuthorizationOutcome,
    agreement: &str,
) -> (u32, Option<String>) {
    let response = client
        .report_authorization(ReportAuthorizationRequest {
            merchant_id: "m1".into(),
            token: token.into(),
            outcome: outcome as i32,
            acquiring_agreement: agreement.into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    (response.failed_attempts, response.block.map(|block| block.reason))
}

/// Whether a merchant-initiated use under `agreement` goes through; the refusal's reason if not.
async fn merchant_initiated(client: &mut Client, token: &str, agreement: &str) -> Result<(), String> {
    let mut request = detokenize_for("m1", token, unscheduled());
    request.acquiring_agreement = agreement.into();
    client.detokenize(request).await.map(|_| ()).map_err(|status| {
        assert_eq!(status.code(), Code::FailedPrecondition);
        let info = decode_error_info(status.details()).unwrap();
        assert!(
            info.metadata.contains_key("blocked_until"),
            "the refusal says when the block ends"
        );
        info.reason
    })
}

async fn mastercard_blocks_after_10_failures_in_24_hours_for_every_token_of_the_card(backend: Backend) {
    let safety = SafetyStack::start(backend);
    let mut client = safety.client().await;
    let token = token_for(&mut client, "5555555555554444").await;
    let same_card = token_for(&mut client, "5555 5555 5555 4444").await;
    for attempt in 1..=9 {
        assert_eq!(
            report(&mut client, &token, AuthorizationOutcome::Declined, "acq-1").await,
            (attempt, None)
        );
    }
    assert_eq!(merchant_initiated(&mut client, &token, "acq-1").await, Ok(()));
    assert_eq!(
        report(&mut client, &same_card, AuthorizationOutcome::Declined, "acq-1").await,
        (10, Some("RETRY_LIMIT".into())),
        "the 10th failure, through another token of the same card, blocks"
    );
    assert_eq!(
        merchant_initiated(&mut client, &token, "acq-1").await,
        Err("RETRY_LIMIT".into())
    );
    assert_eq!(
        merchant_initiated(&mut client, &same_card, "acq-1").await,
        Err("RETRY_LIMIT".into())
    );
    assert_eq!(
        merchant_initiated(&mut client, &token, "").await,
        Err("RETRY_LIMIT".into()),
        "no agreement: any block counts"
    );
    assert_eq!(
        merchant_initiated(&mut client, &token, "acq-2").await,
        Ok(()),
        "another agreement is not blocked"
    );
    client
        .detokenize(detokenize("m1", &token))
        .await
        .expect("cardholder-initiated use is never blocked");

    let shown = client
        .get_token(GetTokenRequest {
            merchant_id: "m1".into(),
            token: token.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(shown.blocks.len(), 1);
    assert_eq!(
        (
            shown.blocks[0].acquiring_agreement.as_str(),
            shown.blocks[0].reason.as_str()
        ),
        ("acq-1", "RETRY_LIMIT")
    );
    let history = client
        .get_token_history(GetTokenHistoryRequest {
            merchant_id: "m1".into(),
            token: same_card.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .entries;
    assert!(
        history.iter().any(|e| e.r#type() == TransactionType::Block),
        "the block is journalled"
    );

    // The window slides: 24 hours after the first failure the card is usable again.
    safety.set_clock(24 * HOUR_MS + 60_000).await;
    assert_eq!(merchant_initiated(&mut client, &token, "acq-1").await, Ok(()));
    let history = client
        .get_token_history(GetTokenHistoryRequest {
            merchant_id: "m1".into(),
            token: same_card,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .entries;
    assert!(
        history.iter().any(|e| e.r#type() == TransactionType::Unblock),
        "the end of the block is journalled"
    );
}

async fn visa_allows_15_failures_in_30_days_and_an_approval_resets_the_count(backend: Backend) {
    let safety = SafetyStack::start(backend);
    let mut client = safety.client().await;
    let token = token_for(&mut client, "4111111111111111").await;
    for _ in 0..14 {
        report(&mut client, &token, AuthorizationOutcome::Declined, "acq-1").await;
    }
    assert_eq!(
        report(&mut client, &token, AuthorizationOutcome::Approved, "acq-1").await,
        (0, None)
    );
    for attempt in 1..=14 {
        assert_eq!(
            report(&mut client, &token, AuthorizationOutcome::Declined, "acq-1").await,
            (attempt, None)
        );
    }
    assert_eq!(merchant_initiated(&mut client, &token, "acq-1").await, Ok(()));
    assert_eq!(
        report(&mut client, &token, AuthorizationOutcome::Declined, "acq-1").await,
        (15, Some("RETRY_LIMIT".into()))
    );
    assert_eq!(
        merchant_initiated(&mut client, &token, "acq-1").await,
        Err("RETRY_LIMIT".into())
    );
    // 29 days later the failures still count; after 30 days they do not.
    safety.set_clock(29 * 24 * HOUR_MS).await;
    assert_eq!(
        merchant_initiated(&mut client, &token, "acq-1").await,
        Err("RETRY_LIMIT".into())
    );
    safety.set_clock(30 * 24 * HOUR_MS + 60_000).await;
    assert_eq!(merchant_initiated(&mut client, &token, "acq-1").await, Ok(()));
}

async fn do_not_retry_blocks_at_once_and_an_approval_does_not_lift_it(backend: Backend) {
    let safety = SafetyStack::start(backend);
    let mut client = safety.client().await;
    let token = token_for(&mut client, "5555555555554444").await;
    assert_eq!(
        report(
            &mut client,
            &token,
            AuthorizationOutcome::DeclinedDoNotRetry,
            "acq-1"
        )
        .await
        .1,
        Some("DO_NOT_RETRY".into())
    );
    assert_eq!(
        merchant_initiated(&mut client, &token, "acq-1").await,
        Err("DO_NOT_RETRY".into())
    );
    report(&mut client, &token, AuthorizationOutcome::Approved, "acq-1").await;
    assert_eq!(
        merchant_initiated(&mut client, &token, "acq-1").await,
        Err("DO_NOT_RETRY".into())
    );
    assert_eq!(merchant_initiated(&mut client, &token, "acq-2").await, Ok(()));
    let bad = client
        .report_authorization(ReportAuthorizationRequest {
            merchant_id: "m1".into(),
            token: token.clone(),
            outcome: AuthorizationOutcome::Declined as i32,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(
        (bad.code(), reason(&bad).as_str()),
        (Code::InvalidArgument, "MISSING_FIELD")
    );
}

async fn fifty_concurrent_identical_requests_with_one_key_make_one_token(backend: Backend) {
    let safety = SafetyStack::start(backend);
    let channel = gateway_channel(&safety.stack, "dev-client").await;
    let mut tasks = Vec::new();
    for _ in 0..50 {
        let mut client = TokenizationClient::new(channel.clone());
        tasks.push(tokio::spawn(async move {
            let mut request = tokenize_card("m1", "4111111111111111");
            request.idempotency_key = "order-42".into();
            client.tokenize(request).await
        }));
    }
    let mut tokens = HashSet::new();
    for task in tasks {
        match task.await.unwrap() {
            Ok(response) => {
                tokens.insert(response.into_inner().token.unwrap().token);
            }
            Err(status) => assert_eq!(
                (status.code(), reason(&status).as_str()),
                (Code::Aborted, "IDEMPOTENCY_IN_FLIGHT")
            ),
        }
    }
    assert_eq!(tokens.len(), 1, "one token for one key: {tokens:?}");
    let mut client = safety.client().await;
    let mut again = tokenize_card("m1", "4111111111111111");
    again.idempotency_key = "order-42".into();
    let replayed = client
        .tokenize(again)
        .await
        .unwrap()
        .into_inner()
        .token
        .unwrap()
        .token;
    assert!(tokens.contains(&replayed), "a later repeat gets the first answer");
    let mut different = tokenize_card("m1", "5555555555554444");
    different.idempotency_key = "order-42".into();
    let refused = client.tokenize(different).await.unwrap_err();
    assert_eq!(
        (refused.code(), reason(&refused).as_str()),
        (Code::InvalidArgument, "IDEMPOTENCY_KEY_REUSED")
    );
    // Only one token exists for the shopper.
    let listed = client
        .list_tokens(tessera_api::v1::ListTokensRequest {
            merchant_id: "m1".into(),
            shopper_reference: SHOPPER.into(),
            page_size: 100,
            page_token: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .tokens;
    assert_eq!(listed.len(), 1);
    // Keys cover the other mutating calls too: a repeated delete returns the first answer.
    let delete = DeleteTokenRequest {
        merchant_id: "m1".into(),
        token: replayed.clone(),
        idempotency_key: "del-1".into(),
    };
    let first = client.delete_token(delete.clone()).await.unwrap().into_inner();
    let second = client.delete_token(delete).await.unwrap().into_inner();
    assert_eq!(first, second);
}

async fn a_strict_merchant_reference_is_refused_as_a_duplicate_within_24_hours(backend: Backend) {
    let safety = SafetyStack::start(backend);
    let mut client = safety.client().await;
    let with_reference = |strict: bool| {
        let mut request = tokenize_card("m1", "4111111111111111");
        request.merchant_reference = "order-7".into();
        request.strict_merchant_reference = strict;
        request
    };
    client.tokenize(with_reference(true)).await.unwrap();
    let duplicate = client.tokenize(with_reference(true)).await.unwrap_err();
    assert_eq!(
        (duplicate.code(), reason(&duplicate).as_str()),
        (Code::AlreadyExists, "DUPLICATE")
    );
    client
        .tokenize(with_reference(false))
        .await
        .expect("not strict: allowed");
    let mut other_merchant = with_reference(true);
    other_merchant.merchant_id = "m2".into();
    client
        .tokenize(other_merchant)
        .await
        .expect("references are per merchant");
    safety.set_clock(24 * HOUR_MS + 60_000).await;
    client
        .tokenize(with_reference(true))
        .await
        .expect("24 hours later the reference is free again");
}

async fn collect(client: &mut Client, after: u64, count: usize) -> Vec<TokenEvent> {
    let mut stream = client
        .subscribe_events(SubscribeEventsRequest {
            merchant_id: "m1".into(),
            after_sequence: after,
        })
        .await
        .unwrap()
        .into_inner();
    let mut events = Vec::new();
    while events.len() < count {
        match tokio::time::timeout(Duration::from_secs(10), stream.message()).await {
            Ok(Ok(Some(event))) => events.push(event),
            other => panic!("the event stream ended early: {other:?}"),
        }
    }
    events
}

async fn events_resume_from_a_sequence_without_gaps_or_duplicates(backend: Backend) {
    let safety = SafetyStack::start(backend);
    let mut client = safety.client().await;
    let mut expected = Vec::new();
    for number in ["4111111111111111", "5555555555554444", "378282246310005"] {
        let mut request = tokenize_card("m1", number);
        request.provisional = true;
        let token = client
            .tokenize(request)
            .await
            .unwrap()
            .into_inner()
            .token
            .unwrap()
            .token;
        expected.push((token.clone(), EventType::TokenCreated));
        client
            .confirm_token(ConfirmTokenRequest {
                merchant_id: "m1".into(),
                token: token.clone(),
                ..Default::default()
            })
            .await
            .unwrap();
        expected.push((token.clone(), EventType::TokenConfirmed));
        client
            .extend_retention(ExtendRetentionRequest {
                merchant_id: "m1".into(),
                token: token.clone(),
                months: 2,
                ..Default::default()
            })
            .await
            .unwrap();
        expected.push((token.clone(), EventType::RetentionExtended));
    }
    let blocked = expected[0].0.clone();
    report(
        &mut client,
        &blocked,
        AuthorizationOutcome::DeclinedDoNotRetry,
        "acq-1",
    )
    .await;
    expected.push((blocked.clone(), EventType::CardBlocked));
    client
        .delete_token(DeleteTokenRequest {
            merchant_id: "m1".into(),
            token: expected[3].0.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
    expected.push((expected[3].0.clone(), EventType::TokenDeleted));
    // Another merchant's events are not this subscriber's business.
    client
        .tokenize(tokenize_card("m2", "4111111111111111"))
        .await
        .unwrap();
    // A detokenize is journalled but is not an event.
    client
        .detokenize(detokenize_for("m1", &expected[6].0, one_click()))
        .await
        .unwrap();

    // The subscriber reads part of the stream and dies; it comes back with its last sequence.
    let first = collect(&mut client, 0, 5).await;
    let last = first.last().unwrap().sequence;
    let rest = collect(&mut client, last, expected.len() - 5).await;
    let all: Vec<_> = first.iter().chain(&rest).collect();
    assert!(
        all.windows(2).all(|w| w[0].sequence < w[1].sequence),
        "strictly increasing"
    );
    let seen: Vec<(String, EventType)> = all.iter().map(|e| (e.token.clone(), e.r#type())).collect();
    assert_eq!(seen, expected, "no gap, no duplicate, in order");
    assert!(all
        .iter()
        .all(|e| e.merchant_id == "m1" && e.at.is_some() && !e.detail.contains("4111")));

    // Events written while nobody listens are there when the subscriber comes back.
    let latest = all.last().unwrap().sequence;
    let mut unconfirmed = tokenize_card("m1", "6011111111111117");
    unconfirmed.provisional = true;
    let token = client
        .tokenize(unconfirmed)
        .await
        .unwrap()
        .into_inner()
        .token
        .unwrap()
        .token;
    let next = collect(&mut client, latest, 1).await;
    assert_eq!(
        (next[0].token.as_str(), next[0].r#type()),
        (token.as_str(), EventType::TokenCreated)
    );

    // Expiry is an event too, written by the sweeper in the transaction that expires.
    safety.set_clock(2 * HOUR_MS).await;
    let expired = collect(&mut client, next[0].sequence, 1).await;
    assert_eq!(
        (expired[0].token.as_str(), expired[0].r#type()),
        (token.as_str(), EventType::TokenExpired)
    );
}

backend_tests!(
    mastercard_blocks_after_10_failures_in_24_hours_for_every_token_of_the_card,
    visa_allows_15_failures_in_30_days_and_an_approval_resets_the_count,
    do_not_retry_blocks_at_once_and_an_approval_does_not_lift_it,
    fifty_concurrent_identical_requests_with_one_key_make_one_token,
    a_strict_merchant_reference_is_refused_as_a_duplicate_within_24_hours,
    events_resume_from_a_sequence_without_gaps_or_duplicates,
);
