//! Size limits and paging through the real gateway: nothing is silently cut. A request over a
//! size limit is refused as bad input with the reason REQUEST_TOO_LARGE and the limit, whether
//! the handler or tonic's decoder finds it, and stores nothing; a token's history longer than
//! a page is paged, never truncated. On SQLite and on PostgreSQL.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use common::requests::{detokenize, tokenize_card};
use common::{database_pool, gateway_channel, Backend, Stack};
use tessera_api::error_details::decode_error_info;
use tessera_api::limits::MAX_REQUEST_BYTES;
use tessera_api::v1::key_admin_client::KeyAdminClient;
use tessera_api::v1::tokenization_client::TokenizationClient;
use tessera_api::v1::{tokenize_request, GetTokenHistoryRequest, RotateKeyRequest, TransactionType};
use tonic::Code;

/// Asserts `status` is the refusal of a message over `MAX_REQUEST_BYTES`.
fn assert_too_large(status: &tonic::Status, what: &str) {
    assert_eq!(status.code(), Code::InvalidArgument, "{what}: {status:?}");
    let info = decode_error_info(status.details()).unwrap_or_else(|| panic!("{what}: no ErrorInfo"));
    assert_eq!(info.reason, "REQUEST_TOO_LARGE", "{what}");
    assert_eq!(info.domain, tessera_api::ERROR_DOMAIN, "{what}");
    assert_eq!(
        info.metadata.get("limit_bytes").map(String::as_str),
        Some(MAX_REQUEST_BYTES.to_string().as_str()),
        "{what}"
    );
    assert!(
        !status.message().contains("4111"),
        "{what}: the message echoes no card data"
    );
}

async fn oversized_requests_are_refused_with_a_reason_and_store_nothing(backend: Backend) {
    let stack = Stack::start_on(backend);
    let channel = gateway_channel(&stack, "dev-client").await;
    let mut client = TokenizationClient::new(channel.clone());
    // Just over the unary limit (the handler's check) and over the import limit too
    // (tonic's decoder, answered by the gateway's transport layer).
    for (what, filler) in [("70 KB", 70_000), ("2 MB", 2_000_000)] {
        let mut request = tokenize_card("m_limits", "4111111111111111");
        if let Some(tokenize_request::Data::Card(card)) = request.data.as_mut() {
            card.holder_name = "x".repeat(filler);
        }
        let refused = client.tokenize(request).await.unwrap_err();
        assert_too_large(&refused, &format!("tokenize {what}"));
        let refused = client
            .get_token_history(GetTokenHistoryRequest {
                merchant_id: "m_limits".into(),
                token: "t".repeat(filler),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_too_large(&refused, &format!("history {what}"));
        let refused = KeyAdminClient::new(channel.clone())
            .rotate_key(RotateKeyRequest {
                merchant_id: "m".repeat(filler),
            })
            .await
            .unwrap_err();
        assert_too_large(&refused, &format!("rotate key {what}"));
    }
    let pool = database_pool(&stack).await;
    for table in ["tokens", "journal", "merchant_keys"] {
        let rows: i64 = sqlx::query_scalar(&format!("SELECT COUNT(*) FROM {table}"))
            .fetch_one(&pool)
            .await
            .unwrap();
        assert_eq!(rows, 0, "{table}: an oversized request changes nothing");
    }
}

async fn a_long_history_is_paged_not_truncated(backend: Backend) {
    let stack = Stack::start_on(backend);
    let mut client = TokenizationClient::new(gateway_channel(&stack, "dev-client").await);
    let token = client
        .tokenize(tokenize_card("m_limits", "4111111111111111"))
        .await
        .unwrap()
        .into_inner()
        .token
        .unwrap()
        .token;
    const USES: usize = 6;
    for _ in 0..USES {
        client.detokenize(detokenize("m_limits", &token)).await.unwrap();
    }
    let request = |page_size: u32, page_token: String| GetTokenHistoryRequest {
        merchant_id: "m_limits".into(),
        token: token.clone(),
        page_size,
        page_token,
    };
    let whole = client
        .get_token_history(request(0, String::new()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(whole.entries.len(), 1 + USES);
    assert!(whole.next_page_token.is_empty(), "one page holds it all");

    let mut paged = Vec::new();
    let mut page_token = String::new();
    let mut pages = 0;
    loop {
        let page = client
            .get_token_history(request(2, page_token))
            .await
            .unwrap()
            .into_inner();
        assert!(page.entries.len() <= 2);
        paged.extend(page.entries);
        pages += 1;
        assert!(pages <= 10, "paging must end");
        if page.next_page_token.is_empty() {
            break;
        }
        page_token = page.next_page_token;
    }
    assert_eq!(pages, 4, "7 entries in pages of 2");
    assert_eq!(
        paged, whole.entries,
        "the pages together are the whole history, in order"
    );
    assert_eq!(paged[0].r#type, TransactionType::Tokenize as i32);

    let refused = client
        .get_token_history(request(2, "h1.not-a-number".into()))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument);
}

backend_tests!(
    oversized_requests_are_refused_with_a_reason_and_store_nothing,
    a_long_history_is_paged_not_truncated,
);
