//! Free-text fields through the real processes: invisible Unicode format characters
//! (bidirectional overrides and isolates, zero-width characters, the byte-order mark) are
//! refused in every free-text field, and a card number is refused in every field that is not
//! card data, each with its field's reason and a message that does not echo the value; refused
//! requests, and refused bulk-import items, store nothing. On SQLite and on PostgreSQL.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use common::requests::tokenize_card;
use common::{database_pool, gateway_channel, Backend, Stack};
use tessera_api::error_details::decode_error_info;
use tessera_api::v1::tokenization_client::TokenizationClient;
use tessera_api::v1::{
    import_result, tokenize_request, AuthorizationOutcome, BankAccount, ConfirmTokenRequest, ImportItem,
    ImportRequest, ReportAuthorizationRequest, TokenizeRequest,
};
use tonic::Code;

/// A test card number (it passes the Luhn check), spelled with separators as people type it.
const PAN: &str = "4111 1111-1111 1111";
/// The same card number's digits, which no refusal may echo.
const PAN_DIGITS: &str = "4111111111111111";

/// Every table a request could write to.
/// Every table a request could write to (not `job_leases`, which the sweeper takes on its own
/// schedule).
const TABLES: [&str; 8] = [
    "tokens",
    "merchant_keys",
    "journal",
    "events",
    "merchant_references",
    "idempotency_keys",
    "authorization_attempts",
    "card_blocks",
];

async fn row_counts(stack: &Stack) -> Vec<(&'static str, i64)> {
    let pool = database_pool(stack).await;
    let mut counts = Vec::new();
    for table in TABLES {
        let count = sqlx::query_scalar::<_, i64>(&format!("SELECT COUNT(*) FROM {table}"))
            .fetch_one(&pool)
            .await
            .unwrap();
        counts.push((table, count));
    }
    counts
}

fn reason(status: &tonic::Status) -> String {
    decode_error_info(status.details())
        .map(|info| info.reason)
        .unwrap_or_default()
}

/// Asserts the refusal's code and reason, and that it echoes neither the card number nor
/// the invisible character.
fn assert_refused(name: &str, status: &tonic::Status, expected_reason: &str) {
    assert_eq!(
        (status.code(), reason(status).as_str()),
        (Code::InvalidArgument, expected_reason),
        "{name}: {status:?}"
    );
    let printed = format!("{status:?}");
    for leak in [
        PAN_DIGITS,
        "411111",
        "1111 1111",
        "\u{202E}",
        "\u{200B}",
        "\u{FEFF}",
    ] {
        assert!(
            !printed.contains(leak),
            "{name}: the refusal echoes the value: {printed}"
        );
    }
}

fn with_holder(name: &str) -> TokenizeRequest {
    let mut request = tokenize_card("m1", "5555555555554444");
    if let Some(tokenize_request::Data::Card(card)) = request.data.as_mut() {
        card.holder_name = name.into();
    }
    request
}

fn bank_account(holder_name: &str) -> TokenizeRequest {
    TokenizeRequest {
        merchant_id: "m1".into(),
        shopper_reference: "shopper-1".into(),
        data: Some(tokenize_request::Data::BankAccount(BankAccount {
            iban: "DE89370400440532013000".into(),
            bic: String::new(),
            holder_name: holder_name.into(),
        })),
        ..Default::default()
    }
}

fn tokenize_with(change: impl FnOnce(&mut TokenizeRequest)) -> TokenizeRequest {
    let mut request = tokenize_card("m1", "5555555555554444");
    change(&mut request);
    request
}

/// Tokenize requests refused for one free-text field each, with the expected reason.
fn refused_tokenizes() -> Vec<(String, TokenizeRequest, &'static str)> {
    let mut cases = Vec::new();
    for (what, invisible) in [
        ("right-to-left override", "\u{202E}"),
        ("left-to-right embedding", "\u{202A}"),
        ("first-strong isolate", "\u{2068}"),
        ("pop directional isolate", "\u{2069}"),
        ("zero-width space", "\u{200B}"),
        ("zero-width joiner", "\u{200D}"),
        ("right-to-left mark", "\u{200F}"),
        ("word joiner", "\u{2060}"),
        ("byte-order mark", "\u{FEFF}"),
    ] {
        let name = |field: &str| format!("{field}: {what}");
        cases.push((
            name("card.holder_name"),
            with_holder(&format!("Ada{invisible} Lovelace")),
            "INVALID_HOLDER_NAME",
        ));
        cases.push((
            name("bank_account.holder_name"),
            bank_account(&format!("{invisible}Ada Lovelace")),
            "INVALID_BANK_ACCOUNT",
        ));
        cases.push((
            name("shopper_reference"),
            tokenize_with(|r| r.shopper_reference = format!("shopper{invisible}-1")),
            "INVALID_SHOPPER_REFERENCE",
        ));
        cases.push((
            name("merchant_reference"),
            tokenize_with(|r| r.merchant_reference = format!("order-7{invisible}")),
            "INVALID_REFERENCE",
        ));
    }
    cases.extend([
        (
            "shopper_reference: card number among text".to_owned(),
            tokenize_with(|r| r.shopper_reference = format!("shopper {PAN}")),
            "INVALID_SHOPPER_REFERENCE",
        ),
        (
            "merchant_reference: card number".to_owned(),
            tokenize_with(|r| r.merchant_reference = format!("order {PAN}")),
            "INVALID_REFERENCE",
        ),
        (
            "idempotency_key: card number".to_owned(),
            tokenize_with(|r| r.idempotency_key = format!("retry-{PAN_DIGITS}")),
            "INVALID_IDEMPOTENCY_KEY",
        ),
        (
            "merchant_id: card number".to_owned(),
            tokenize_with(|r| r.merchant_id = PAN_DIGITS.into()),
            "INVALID_MERCHANT_ID",
        ),
    ]);
    cases
}

async fn free_text_with_invisible_characters_or_card_numbers_is_refused_and_stores_nothing(backend: Backend) {
    let stack = Stack::start_on(backend);
    let mut client = TokenizationClient::new(gateway_channel(&stack, "dev-client").await);

    // What must still pass: references with short digit runs, names in any script.
    let accepted = client
        .tokenize(tokenize_with(|r| {
            r.shopper_reference = "shopper-000123".into();
            r.merchant_reference = "order-2026-000123".into();
            r.idempotency_key = "order-2026-000123/1".into();
            if let Some(tokenize_request::Data::Card(card)) = r.data.as_mut() {
                card.holder_name = "Zoë Łukasiewicz-O'Brien ابن سينا".into();
            }
        }))
        .await
        .expect("ordinary free text is accepted")
        .into_inner();
    let token = accepted.token.unwrap().token;
    let before = row_counts(&stack).await;

    for (name, request, expected_reason) in refused_tokenizes() {
        let status = client.tokenize(request).await.expect_err(&name);
        assert_refused(&name, &status, expected_reason);
    }

    // ReportAuthorization: the acquiring agreement and the merchant reference.
    let report = |agreement: &str, reference: &str| ReportAuthorizationRequest {
        merchant_id: "m1".into(),
        token: token.clone(),
        outcome: AuthorizationOutcome::Declined as i32,
        acquiring_agreement: agreement.into(),
        merchant_reference: reference.into(),
        ..Default::default()
    };
    for (name, request) in [
        ("acquiring_agreement: override", report("acq\u{202E}-1", "")),
        (
            "acquiring_agreement: card number",
            report(&format!("acq {PAN}"), ""),
        ),
        (
            "report merchant_reference: zero-width",
            report("acq-1", "order\u{200B}-8"),
        ),
        ("report merchant_reference: card number", report("acq-1", PAN)),
    ] {
        let status = client.report_authorization(request).await.expect_err(name);
        assert_refused(name, &status, "INVALID_REFERENCE");
    }

    // ConfirmToken's payment reference.
    let status = client
        .confirm_token(ConfirmTokenRequest {
            merchant_id: "m1".into(),
            token: token.clone(),
            payment_reference: "psp-\u{FEFF}42".into(),
            ..Default::default()
        })
        .await
        .expect_err("payment_reference");
    assert_refused("payment_reference", &status, "INVALID_REFERENCE");

    // Bulk import items go through the same checks, item by item.
    let items: Vec<ImportItem> = refused_tokenizes()
        .into_iter()
        .zip(1u64..)
        .map(|((_, item, _), sequence)| ImportItem {
            sequence,
            item: Some(item),
        })
        .collect();
    // Bulk import takes no merchant reference or idempotency key at all: an item carrying one
    // is refused for carrying it, whatever its value.
    let expected: Vec<(String, &str)> = refused_tokenizes()
        .into_iter()
        .map(|(name, _, reason)| {
            let unsupported = name.starts_with("merchant_reference") || name.starts_with("idempotency_key");
            let reason = if unsupported {
                "FIELD_NOT_SUPPORTED"
            } else {
                reason
            };
            (name, reason)
        })
        .collect();
    let mut responses = client
        .import_tokens(tonic::codegen::tokio_stream::iter(vec![ImportRequest { items }]))
        .await
        .unwrap()
        .into_inner();
    let results = responses.message().await.unwrap().unwrap().results;
    assert_eq!(results.len(), expected.len());
    for (result, (name, expected_reason)) in results.iter().zip(expected) {
        match &result.outcome {
            Some(import_result::Outcome::Error(error)) => {
                assert_eq!(
                    (error.code, error.reason.as_str()),
                    (Code::InvalidArgument as i32, expected_reason),
                    "import {name}"
                );
                assert!(
                    !error.message.contains(PAN_DIGITS),
                    "import {name}: {}",
                    error.message
                );
            }
            other => panic!("import {name}: not refused: {other:?}"),
        }
    }

    assert_eq!(
        row_counts(&stack).await,
        before,
        "refused requests and items must store nothing"
    );
}

backend_tests!(free_text_with_invisible_characters_or_card_numbers_is_refused_and_stores_nothing);
