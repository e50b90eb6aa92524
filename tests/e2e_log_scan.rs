//! With both processes logging at the most verbose level, tokenizing and detokenizing known
//! test cards leaves none of their numbers (or holder names) in any log line, whichever
//! database the gateway logs its queries for.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use common::requests::{detokenize, revealed_number, SHOPPER};
use common::{gateway_channel, Backend, Stack, StackOptions};
use tessera_api::v1::tokenization_client::TokenizationClient;
use tessera_api::v1::{tokenize_request, Card, TokenFormat, TokenizeRequest};

const CARDS: &[&str] = &[
    "4111111111111111",
    "5555555555554444",
    "378282246310005",
    "6011111111111117",
    "3530111333300000",
];
const HOLDER: &str = "Grace Hopper-Logscan";

async fn no_card_number_reaches_any_log_at_trace_level(backend: Backend) {
    let stack = Stack::start_with(StackOptions {
        rust_log: Some("trace".into()),
        backend,
        ..StackOptions::default()
    });
    let mut client = TokenizationClient::new(gateway_channel(&stack, "dev-client").await);
    for (i, number) in CARDS.iter().enumerate() {
        let format = if i % 2 == 0 {
            TokenFormat::Opaque
        } else {
            TokenFormat::FormatPreserving
        };
        let token = client
            .tokenize(TokenizeRequest {
                merchant_id: "m_logs".into(),
                data: Some(tokenize_request::Data::Card(Card {
                    number: (*number).into(),
                    expiry_month: 6,
                    expiry_year: 2032,
                    holder_name: HOLDER.into(),
                })),
                shopper_reference: SHOPPER.into(),
                format: format as i32,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .token
            .unwrap()
            .token;
        let revealed = client
            .detokenize(detokenize("m_logs", &token))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(revealed_number(&revealed), *number);
    }
    // Refused input is logged too; it must not carry the number either.
    let _ = client
        .tokenize(TokenizeRequest {
            merchant_id: "m_logs".into(),
            data: Some(tokenize_request::Data::Card(Card {
                number: "4111111111111112".into(),
                expiry_month: 6,
                expiry_year: 2032,
                holder_name: HOLDER.into(),
            })),
            ..Default::default()
        })
        .await
        .unwrap_err();

    let (vault_log, gateway_log) = stack.logs();
    assert!(
        vault_log.contains("TRACE") || vault_log.contains("DEBUG"),
        "logging was not verbose:\n{vault_log}"
    );
    assert!(gateway_log.contains("TRACE"), "logging was not verbose");
    for (name, log) in [("vault", &vault_log), ("gateway", &gateway_log)] {
        for number in CARDS.iter().chain(&["4111111111111112"]) {
            let leaked: Vec<&str> = log.lines().filter(|line| line.contains(number)).take(3).collect();
            assert!(leaked.is_empty(), "{name} log contains a card number: {leaked:?}");
        }
        assert!(!log.contains(HOLDER), "{name} log contains a holder name");
    }
}

backend_tests!(no_card_number_reaches_any_log_at_trace_level);
