//! The gateway as a developer meets it with grpcurl: reflection lists and describes the API,
//! and JSON calls tokenize and detokenize with the development client certificate (on SQLite
//! and on PostgreSQL).
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use common::{grpcurl_gateway, require_grpcurl, Backend, Stack};

fn stdout(output: &std::process::Output) -> String {
    assert!(
        output.status.success(),
        "grpcurl failed ({}): {}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn grpcurl_lists_describes_tokenizes_and_detokenizes(backend: Backend) {
    if !require_grpcurl() {
        return;
    }
    let stack = Stack::start_on(backend);

    let services = stdout(&grpcurl_gateway(&stack, "dev-client", None, &["list"]).unwrap());
    for service in ["tessera.v1.Tokenization", "grpc.health.v1.Health"] {
        assert!(
            services.lines().any(|line| line.trim() == service),
            "{service} not listed:\n{services}"
        );
    }
    assert!(
        !services.contains("tessera.vault"),
        "the internal vault API must not be advertised:\n{services}"
    );

    let described = stdout(
        &grpcurl_gateway(
            &stack,
            "dev-client",
            None,
            &["describe", "tessera.v1.Tokenization"],
        )
        .unwrap(),
    );
    for rpc in ["Tokenize", "GetToken", "Detokenize", "DeleteToken"] {
        assert!(
            described.contains(&format!("rpc {rpc}")),
            "{rpc} missing:\n{described}"
        );
    }
    let message =
        stdout(&grpcurl_gateway(&stack, "dev-client", None, &["describe", "tessera.v1.Token"]).unwrap());
    assert!(message.contains("created_at"), "{message}");

    let health =
        stdout(&grpcurl_gateway(&stack, "dev-client", None, &["grpc.health.v1.Health/Check"]).unwrap());
    assert!(health.contains("SERVING"), "{health}");

    let tokenized = stdout(
        &grpcurl_gateway(
            &stack,
            "dev-client",
            Some(r#"{"merchant_id":"m_demo","shopper_reference":"shopper-42","card":{"number":"4111111111111111","expiry_month":12,"expiry_year":2030,"holder_name":"Ada Lovelace"}}"#),
            &["tessera.v1.Tokenization/Tokenize"],
        )
        .unwrap(),
    );
    let json: serde_json::Value = serde_json::from_str(&tokenized).unwrap();
    let token = json["token"]["token"].as_str().unwrap().to_owned();
    assert!(token.starts_with("tok_"), "{tokenized}");
    assert_eq!(json["token"]["brand"], "CARD_BRAND_VISA", "{tokenized}");
    assert!(
        !tokenized.contains("4111111111111111"),
        "tokenize must not return the card number"
    );

    let request = format!(
        r#"{{"merchant_id":"m_demo","token":"{token}","shopper_reference":"shopper-42","purpose":{{"initiator":"INITIATOR_CARDHOLDER","recurring_model":"RECURRING_MODEL_CARD_ON_FILE","shopper_interaction":"SHOPPER_INTERACTION_ECOMMERCE"}}}}"#
    );
    let revealed = stdout(
        &grpcurl_gateway(
            &stack,
            "dev-client",
            Some(&request),
            &["tessera.v1.Tokenization/Detokenize"],
        )
        .unwrap(),
    );
    let json: serde_json::Value = serde_json::from_str(&revealed).unwrap();
    assert_eq!(json["card"]["number"], "4111111111111111", "{revealed}");

    // A refusal shows the code and the ErrorInfo reason (grpcurl prints details with -v style
    // formatting; the code and message are always there).
    let refused = grpcurl_gateway(
        &stack,
        "dev-client",
        Some(r#"{"merchant_id":"m_demo","card":{"number":"4111111111111112","expiry_month":12,"expiry_year":2030}}"#),
        &["tessera.v1.Tokenization/Tokenize"],
    )
    .unwrap();
    assert!(!refused.status.success());
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&refused.stdout),
        String::from_utf8_lossy(&refused.stderr)
    );
    assert!(
        text.contains("InvalidArgument") && text.contains("Luhn"),
        "{text}"
    );
    assert!(
        !text.contains("4111111111111112"),
        "the refusal echoes the card number: {text}"
    );
}

backend_tests_sync!(grpcurl_lists_describes_tokenizes_and_detokenizes);
