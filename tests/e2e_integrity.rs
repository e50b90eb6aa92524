//! Tampering with the gateway's database is detected by the vault: ciphertexts swapped
//! between two rows, a wrapped key moved to another merchant, a truncated ciphertext, a
//! record pointing at the wrong key version. Each detokenize fails with a clear integrity
//! error and no card data. On SQLite and on PostgreSQL.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use common::requests::{self, revealed_number, tokenize_card};
use common::{database_pool, gateway_channel, Backend, Stack};
use sqlx::AnyPool;
use tessera_api::error_details::decode_error_info;
use tessera_api::v1::tokenization_client::TokenizationClient;
use tonic::transport::Channel;
use tonic::Code;

async fn tokenize(client: &mut TokenizationClient<Channel>, merchant: &str, number: &str) -> String {
    client
        .tokenize(tokenize_card(merchant, number))
        .await
        .unwrap()
        .into_inner()
        .token
        .unwrap()
        .token
}

async fn detokenize(
    client: &mut TokenizationClient<Channel>,
    merchant: &str,
    token: &str,
) -> Result<String, (Code, String)> {
    client
        .detokenize(requests::detokenize(merchant, token))
        .await
        .map(|response| revealed_number(&response.into_inner()))
        .map_err(|status| {
            assert!(!status.message().contains("4111") && !status.message().contains("5555"));
            (
                status.code(),
                decode_error_info(status.details())
                    .map(|info| info.reason)
                    .unwrap_or_default(),
            )
        })
}

async fn ciphertext(db: &AnyPool, token: &str) -> Vec<u8> {
    sqlx::query_scalar("SELECT ciphertext FROM tokens WHERE token = $1")
        .bind(token)
        .fetch_one(db)
        .await
        .unwrap()
}

async fn set_ciphertext(db: &AnyPool, token: &str, value: &[u8]) {
    sqlx::query("UPDATE tokens SET ciphertext = $1 WHERE token = $2")
        .bind(value)
        .bind(token)
        .execute(db)
        .await
        .unwrap();
}

async fn swapped_rows_fail_both_detokenizes(backend: Backend) {
    let stack = Stack::start_on(backend);
    let mut client = TokenizationClient::new(gateway_channel(&stack, "dev-client").await);
    let first = tokenize(&mut client, "m1", "4111111111111111").await;
    let second = tokenize(&mut client, "m1", "5555555555554444").await;
    let db = database_pool(&stack).await;
    let (a, b) = (ciphertext(&db, &first).await, ciphertext(&db, &second).await);
    set_ciphertext(&db, &first, &b).await;
    set_ciphertext(&db, &second, &a).await;
    for token in [&first, &second] {
        assert_eq!(
            detokenize(&mut client, "m1", token).await,
            Err((Code::DataLoss, "RECORD_INTEGRITY".into()))
        );
    }
    // Put them back: the records were never damaged, only misplaced.
    set_ciphertext(&db, &first, &a).await;
    set_ciphertext(&db, &second, &b).await;
    assert_eq!(
        detokenize(&mut client, "m1", &first).await.unwrap(),
        "4111111111111111"
    );

    // Truncated, and flipped.
    set_ciphertext(&db, &first, &a[..a.len() - 1]).await;
    assert_eq!(
        detokenize(&mut client, "m1", &first).await,
        Err((Code::DataLoss, "RECORD_INTEGRITY".into()))
    );
    set_ciphertext(&db, &first, &a[..10]).await;
    assert_eq!(
        detokenize(&mut client, "m1", &first).await,
        Err((Code::DataLoss, "RECORD_INTEGRITY".into()))
    );
    let mut flipped = a.clone();
    let middle = flipped.len() / 2;
    flipped[middle] ^= 1;
    set_ciphertext(&db, &first, &flipped).await;
    assert_eq!(
        detokenize(&mut client, "m1", &first).await,
        Err((Code::DataLoss, "RECORD_INTEGRITY".into()))
    );
}

async fn a_key_moved_to_another_merchant_or_version_does_not_unwrap(backend: Backend) {
    let mut stack = Stack::start_on(backend);
    let mut client = TokenizationClient::new(gateway_channel(&stack, "dev-client").await);
    let token_a = tokenize(&mut client, "m_a", "4111111111111111").await;
    let token_b = tokenize(&mut client, "m_b", "4111111111111111").await;
    // The gateway caches wrapped keys; restart it so it reads the tampered rows.
    stack.kill_gateway();
    let db = database_pool(&stack).await;
    sqlx::query(
        "UPDATE merchant_keys SET blob = (SELECT blob FROM merchant_keys WHERE merchant_id = 'm_a' AND purpose = 'data') \
         WHERE merchant_id = 'm_b' AND purpose = 'data'",
    )
    .execute(&db)
    .await
    .unwrap();
    // A record that claims a key version its merchant does not have.
    sqlx::query("UPDATE tokens SET data_key_version = 2 WHERE token = $1")
        .bind(&token_a)
        .execute(&db)
        .await
        .unwrap();
    sqlx::query(
        "INSERT INTO merchant_keys (merchant_id, purpose, version, blob, created_at) \
         SELECT merchant_id, purpose, 2, blob, created_at FROM merchant_keys WHERE merchant_id = 'm_a' AND purpose = 'data'",
    )
    .execute(&db)
    .await
    .unwrap();
    stack.start_gateway();
    let mut client = TokenizationClient::new(gateway_channel(&stack, "dev-client").await);
    assert_eq!(
        detokenize(&mut client, "m_b", &token_b).await,
        Err((Code::FailedPrecondition, "KEY_UNWRAP_FAILED".into()))
    );
    assert_eq!(
        detokenize(&mut client, "m_a", &token_a).await,
        Err((Code::FailedPrecondition, "KEY_UNWRAP_FAILED".into()))
    );
}

backend_tests!(
    swapped_rows_fail_both_detokenizes,
    a_key_moved_to_another_merchant_or_version_does_not_unwrap,
);
