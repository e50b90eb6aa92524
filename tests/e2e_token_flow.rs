//! End to end through the real processes: tokenize → get → detokenize → delete → detokenize
//! fails, with the vault and the gateway as separate binaries speaking mutual TLS. Every test
//! runs on SQLite and on PostgreSQL (`NAME::sqlite`, `NAME::postgres`).
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use common::requests::{card, detokenize, revealed_card, revealed_number, tokenize_card};
use common::{gateway_channel, Backend, Stack};
use tessera_api::error_details::decode_error_info;
use tessera_api::v1::tokenization_client::TokenizationClient;
use tessera_api::v1::{
    tokenize_request, CardBrand, DeleteTokenRequest, GetTokenRequest, TokenFormat, TokenStatus,
    TokenizeRequest,
};
use tonic::Code;

fn reason(status: &tonic::Status) -> String {
    decode_error_info(status.details())
        .map(|info| info.reason)
        .unwrap_or_default()
}

async fn tokenize_get_detokenize_delete(backend: Backend) {
    let stack = Stack::start_on(backend);
    let mut client = TokenizationClient::new(gateway_channel(&stack, "dev-client").await);

    let created = client
        .tokenize(tokenize_card("m_demo", "4111 1111 1111 1111"))
        .await
        .unwrap()
        .into_inner();
    let token = created.token.unwrap();
    assert!(token.token.starts_with("tok_"), "{}", token.token);
    assert!(!created.existing);
    assert_eq!(token.brand, CardBrand::Visa as i32);
    assert_eq!(
        (token.first_six.as_str(), token.last_four.as_str()),
        ("411111", "1111")
    );
    assert_eq!(token.status, TokenStatus::Active as i32);

    let fetched = client
        .get_token(GetTokenRequest {
            merchant_id: "m_demo".into(),
            token: token.token.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(fetched.token, token.token);
    assert_eq!((fetched.expiry_month, fetched.expiry_year), (12, 2031));
    assert!(fetched.created_at.is_some());

    let revealed = client
        .detokenize(detokenize("m_demo", &token.token))
        .await
        .unwrap()
        .into_inner();
    let revealed = revealed_card(&revealed);
    assert_eq!(revealed.number, "4111111111111111");
    assert_eq!((revealed.expiry_month, revealed.expiry_year), (12, 2031));
    assert_eq!(revealed.holder_name, "Ada Lovelace");

    let deleted = client
        .delete_token(DeleteTokenRequest {
            merchant_id: "m_demo".into(),
            token: token.token.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let deleted = deleted.token.unwrap();
    assert_eq!(deleted.status, TokenStatus::Deleted as i32);

    // A metadata read answers as the deletion did: the token, flagged deleted.
    let read = client
        .get_token(GetTokenRequest {
            merchant_id: "m_demo".into(),
            token: token.token.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (read.token.as_str(), read.last_four.as_str(), read.status()),
        (token.token.as_str(), "1111", TokenStatus::Deleted)
    );
    assert_eq!(read, deleted);
    // For another merchant it still does not exist.
    let foreign = client
        .get_token(GetTokenRequest {
            merchant_id: "m_other".into(),
            token: token.token.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(
        (foreign.code(), reason(&foreign).as_str()),
        (Code::NotFound, "TOKEN_NOT_FOUND")
    );

    let after = client
        .detokenize(detokenize("m_demo", &token.token))
        .await
        .unwrap_err();
    assert_eq!(
        (after.code(), reason(&after).as_str()),
        (Code::NotFound, "TOKEN_DELETED")
    );
    let again = client
        .delete_token(DeleteTokenRequest {
            merchant_id: "m_demo".into(),
            token: token.token.clone(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(
        (again.code(), reason(&again).as_str()),
        (Code::NotFound, "TOKEN_DELETED")
    );
}

async fn format_preserving_tokens_keep_bin_and_last_four_and_fail_luhn(backend: Backend) {
    let stack = Stack::start_on(backend);
    let mut client = TokenizationClient::new(gateway_channel(&stack, "dev-client").await);
    let mut request = tokenize_card("m_fpe", "5555555555554444");
    request.format = TokenFormat::FormatPreserving as i32;
    let token = client
        .tokenize(request)
        .await
        .unwrap()
        .into_inner()
        .token
        .unwrap();
    assert_eq!(token.token.len(), 16);
    assert!(
        token.token.starts_with("555555") && token.token.ends_with("4444"),
        "{}",
        token.token
    );
    assert!(
        !luhn(&token.token),
        "a format-preserving token must never pass Luhn"
    );
    assert_eq!(token.brand, CardBrand::Mastercard as i32);
    let revealed = client
        .detokenize(detokenize("m_fpe", &token.token))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(revealed_number(&revealed), "5555555555554444");
}

async fn deduplicate_returns_the_existing_token_per_merchant_and_shopper(backend: Backend) {
    let stack = Stack::start_on(backend);
    let mut client = TokenizationClient::new(gateway_channel(&stack, "dev-client").await);
    let request = |merchant: &str, shopper: &str| TokenizeRequest {
        merchant_id: merchant.into(),
        data: Some(tokenize_request::Data::Card(card("378282246310005"))),
        shopper_reference: shopper.into(),
        deduplicate: true,
        ..Default::default()
    };
    let first = client
        .tokenize(request("m_a", "shopper-1"))
        .await
        .unwrap()
        .into_inner();
    let second = client
        .tokenize(request("m_a", "shopper-1"))
        .await
        .unwrap()
        .into_inner();
    assert!(second.existing);
    assert_eq!(
        first.token.as_ref().unwrap().token,
        second.token.as_ref().unwrap().token
    );
    let other_shopper = client
        .tokenize(request("m_a", "shopper-2"))
        .await
        .unwrap()
        .into_inner();
    assert!(!other_shopper.existing);
    let other_merchant = client
        .tokenize(request("m_b", "shopper-1"))
        .await
        .unwrap()
        .into_inner();
    assert!(!other_merchant.existing);
    assert_ne!(other_merchant.token.unwrap().token, first.token.unwrap().token);
}

async fn another_merchants_token_is_not_found(backend: Backend) {
    let stack = Stack::start_on(backend);
    let mut client = TokenizationClient::new(gateway_channel(&stack, "dev-client").await);
    let token = client
        .tokenize(tokenize_card("m_owner", "4111111111111111"))
        .await
        .unwrap()
        .into_inner();
    let token = token.token.unwrap().token;
    let unknown = client
        .get_token(GetTokenRequest {
            merchant_id: "m_owner".into(),
            token: "tok_aaaaaaaaaaaaaaaaaaaaaaaaaa".into(),
        })
        .await
        .unwrap_err();
    let foreign = client
        .get_token(GetTokenRequest {
            merchant_id: "m_other".into(),
            token: token.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(
        (unknown.code(), reason(&unknown)),
        (Code::NotFound, "TOKEN_NOT_FOUND".to_owned())
    );
    assert_eq!(
        (foreign.code(), reason(&foreign)),
        (unknown.code(), reason(&unknown))
    );
    assert_eq!(
        foreign.message(),
        unknown.message(),
        "existence must not leak across merchants"
    );
    let detokenized = client
        .detokenize(detokenize("m_other", &token))
        .await
        .unwrap_err();
    assert_eq!(detokenized.code(), Code::NotFound);
}

fn luhn(digits: &str) -> bool {
    let sum: u32 = digits
        .bytes()
        .rev()
        .enumerate()
        .map(|(i, b)| {
            let d = u32::from(b - b'0');
            match (i % 2 == 1, d * 2) {
                (true, doubled) if doubled > 9 => doubled - 9,
                (true, doubled) => doubled,
                (false, _) => d,
            }
        })
        .sum();
    sum % 10 == 0
}

backend_tests!(
    tokenize_get_detokenize_delete,
    format_preserving_tokens_keep_bin_and_last_four_and_fail_luhn,
    deduplicate_returns_the_existing_token_per_merchant_and_shopper,
    another_merchants_token_is_not_found,
);
