//! Strict merchant references through the real processes: a reference is taken only by a
//! request that succeeds, in the transaction that stores what the request created (a token, or
//! an authorisation outcome). A tokenize that fails because the vault is down leaves its
//! reference free for the retry; of many concurrent requests with one strict reference exactly
//! one succeeds and the others are refused with ALREADY_EXISTS / DUPLICATE, having stored
//! nothing; a reference that is not strict is recorded and never refused. On SQLite and on
//! PostgreSQL.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use std::time::{Duration, Instant};

use common::requests::tokenize_card;
use common::{database_pool, gateway_channel, Backend, Stack};
use tessera_api::error_details::decode_error_info;
use tessera_api::v1::tokenization_client::TokenizationClient;
use tessera_api::v1::{AuthorizationOutcome, ReportAuthorizationRequest, TokenizeRequest};
use tonic::transport::Channel;
use tonic::Code;

type Client = TokenizationClient<Channel>;

/// How long a restarted vault may take to be back in the gateway's rotation (its probe backs
/// off from 1 s).
const RECOVERY_LIMIT: Duration = Duration::from_secs(60);
const CONCURRENT: usize = 16;

fn reason(status: &tonic::Status) -> String {
    decode_error_info(status.details())
        .map(|info| info.reason)
        .unwrap_or_default()
}

fn strict(merchant: &str, number: &str, reference: &str) -> TokenizeRequest {
    let mut request = tokenize_card(merchant, number);
    request.merchant_reference = reference.into();
    request.strict_merchant_reference = true;
    request
}

async fn count(stack: &Stack, sql: &str) -> i64 {
    let pool = database_pool(stack).await;
    let count = sqlx::query_scalar::<_, i64>(sql).fetch_one(&pool).await.unwrap();
    pool.close().await;
    count
}

async fn a_tokenize_that_fails_leaves_its_strict_reference_free_for_the_retry(backend: Backend) {
    let mut stack = Stack::start_on(backend);
    let mut client = TokenizationClient::new(gateway_channel(&stack, "dev-client").await);
    // The merchant's keys exist, so the failure below is the vault's protect itself.
    client
        .tokenize(tokenize_card("m1", "4111111111111111"))
        .await
        .unwrap();

    stack.kill_vault();
    for merchant in ["m1", "m_new"] {
        let status = client
            .tokenize(strict(merchant, "5555555555554444", "order-1"))
            .await
            .expect_err("the vault is down");
        assert_eq!(status.code(), Code::Unavailable, "{merchant}: {status:?}");
    }
    assert_eq!(
        count(&stack, "SELECT COUNT(*) FROM merchant_references").await,
        0,
        "a failed tokenize took its merchant reference"
    );

    stack.start_vault();
    for merchant in ["m1", "m_new"] {
        let deadline = Instant::now() + RECOVERY_LIMIT;
        let retried = loop {
            match client
                .tokenize(strict(merchant, "5555555555554444", "order-1"))
                .await
            {
                Err(status) if status.code() == Code::Unavailable && Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
                other => break other,
            }
        };
        let token = retried
            .unwrap_or_else(|status| panic!("{merchant}: the retry was refused: {status:?}"))
            .into_inner()
            .token
            .unwrap();
        assert_eq!(token.last_four, "4444");
        let again = client
            .tokenize(strict(merchant, "5555555555554444", "order-1"))
            .await
            .unwrap_err();
        assert_eq!(
            (again.code(), reason(&again).as_str()),
            (Code::AlreadyExists, "DUPLICATE"),
            "{merchant}: a succeeded request took the reference"
        );
    }
}

/// Runs `CONCURRENT` copies of a call at once; returns (successes, refusals as code and reason).
async fn at_once<T, F, Fut>(client: &Client, call: F) -> (usize, Vec<(Code, String)>)
where
    T: Send + 'static,
    F: Fn(Client) -> Fut,
    Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>> + Send + 'static,
{
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..CONCURRENT {
        tasks.spawn(call(client.clone()));
    }
    let (mut succeeded, mut refused) = (0, Vec::new());
    while let Some(result) = tasks.join_next().await {
        match result.unwrap() {
            Ok(_) => succeeded += 1,
            Err(status) => refused.push((status.code(), reason(&status))),
        }
    }
    (succeeded, refused)
}

async fn concurrent_requests_with_one_strict_reference_make_one_success(backend: Backend) {
    let stack = Stack::start_on(backend);
    let client = TokenizationClient::new(gateway_channel(&stack, "dev-client").await);
    // Keys first, so the concurrent requests race on the reference rather than on key creation.
    let token = client
        .clone()
        .tokenize(tokenize_card("m1", "4111111111111111"))
        .await
        .unwrap()
        .into_inner()
        .token
        .unwrap()
        .token;
    let duplicate = (Code::AlreadyExists, "DUPLICATE".to_owned());

    let (succeeded, refused) = at_once(&client, |mut client| async move {
        client.tokenize(strict("m1", "5555555555554444", "order-2")).await
    })
    .await;
    assert_eq!(succeeded, 1, "tokenize: {refused:?}");
    assert!(refused.iter().all(|r| *r == duplicate), "{refused:?}");
    assert_eq!(
        count(&stack, "SELECT COUNT(*) FROM tokens WHERE last_four = '4444'").await,
        1,
        "a refused duplicate stored a token"
    );

    let report = move |reference: &str, strict: bool| ReportAuthorizationRequest {
        merchant_id: "m1".into(),
        token: token.clone(),
        outcome: AuthorizationOutcome::Declined as i32,
        acquiring_agreement: "acq-1".into(),
        merchant_reference: reference.into(),
        strict_merchant_reference: strict,
        ..Default::default()
    };
    let strict_report = report("auth-1", true);
    let (succeeded, refused) = at_once(&client, |mut client| {
        let request = strict_report.clone();
        async move { client.report_authorization(request).await }
    })
    .await;
    assert_eq!(succeeded, 1, "report: {refused:?}");
    assert!(refused.iter().all(|r| *r == duplicate), "{refused:?}");
    assert_eq!(
        count(&stack, "SELECT COUNT(*) FROM authorization_attempts").await,
        1,
        "a refused duplicate report was recorded"
    );

    // Not strict: recorded, never refused.
    let plain_report = report("auth-2", false);
    let (succeeded, refused) = at_once(&client, |mut client| {
        let request = plain_report.clone();
        async move { client.report_authorization(request).await }
    })
    .await;
    assert_eq!((succeeded, refused), (CONCURRENT, Vec::new()));
    let (succeeded, refused) = at_once(&client, |mut client| async move {
        let mut request = strict("m1", "5555555555554444", "order-3");
        request.strict_merchant_reference = false;
        client.tokenize(request).await
    })
    .await;
    assert_eq!((succeeded, refused), (CONCURRENT, Vec::new()));
    assert_eq!(
        count(
            &stack,
            "SELECT COUNT(*) FROM merchant_references WHERE reference IN ('auth-2', 'order-3')"
        )
        .await,
        2
    );
}

backend_tests!(
    multi_thread: a_tokenize_that_fails_leaves_its_strict_reference_free_for_the_retry,
    concurrent_requests_with_one_strict_reference_make_one_success,
);
