//! Bulk import through `tessera import`: a CSV (and a JSON-lines file) of cards streams to the
//! gateway; every good line gets a token that detokenizes to its card, every bad line gets its
//! own error, and the bad lines change nothing for the good ones. On SQLite and on PostgreSQL.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use std::collections::HashMap;
use std::process::Command;

use common::requests::{detokenize, revealed_number};
use common::{binaries, gateway_channel, Backend, Stack};
use tessera_api::v1::tokenization_client::TokenizationClient;

/// A valid test card number: a Visa BIN, a counter, and the Luhn check digit.
fn card_number(index: u64) -> String {
    let body = format!("411111{index:09}");
    let sum: u32 = body
        .bytes()
        .rev()
        .enumerate()
        .map(|(i, b)| {
            let d = u32::from(b - b'0');
            if i % 2 == 0 {
                let doubled = d * 2;
                if doubled > 9 {
                    doubled - 9
                } else {
                    doubled
                }
            } else {
                d
            }
        })
        .sum();
    format!("{body}{}", (10 - sum % 10) % 10)
}

fn import(stack: &Stack, file: &std::path::Path, out: &std::path::Path) -> String {
    let output = Command::new(binaries().tessera)
        .args([
            "import",
            file.to_str().unwrap(),
            "--merchant",
            "m_import",
            "--quiet",
            "--client",
            "dev-client",
        ])
        .args([
            "--gateway",
            &stack.gateway_addr().to_string(),
            "--certs-dir",
            stack.pki().dir().to_str().unwrap(),
        ])
        .args(["--out", out.to_str().unwrap()])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

/// line → (token, error) from a results file.
fn results(path: &std::path::Path) -> HashMap<u64, (String, String)> {
    let text = std::fs::read_to_string(path).unwrap();
    let mut lines = text.lines();
    assert_eq!(lines.next(), Some("line,token,error"));
    lines
        .map(|line| {
            let mut parts = line.splitn(3, ',');
            let number = parts.next().unwrap().parse().unwrap();
            (
                number,
                (
                    parts.next().unwrap().to_owned(),
                    parts.next().unwrap_or("").to_owned(),
                ),
            )
        })
        .collect()
}

async fn csv_import_tokenizes_every_good_line_and_reports_each_bad_one(backend: Backend) {
    let stack = Stack::start_on(backend);
    let dir = tempfile::tempdir().unwrap();
    let csv = dir.path().join("cards.csv");
    const LINES: u64 = 2000;
    let mut text = String::from("number,expiry_month,expiry_year,holder_name,shopper_reference\n");
    let bad: HashMap<u64, &str> = [
        (7, "INVALID_CARD_NUMBER"),
        (500, "CARD_EXPIRED"),
        (1999, "INVALID_SHOPPER_REFERENCE"),
    ]
    .into();
    for line in 1..=LINES {
        let number = if line == 7 {
            "4111111111111112".to_owned()
        } else {
            card_number(line)
        };
        let year = if line == 500 { 2020 } else { 2031 };
        let shopper = if line == 1999 {
            "ab".to_owned()
        } else {
            format!("shopper-{line}")
        };
        text.push_str(&format!(
            "{number},{},{year},\"Holder, {line}\",{shopper}\n",
            line % 12 + 1
        ));
    }
    std::fs::write(&csv, text).unwrap();
    let out = dir.path().join("results.csv");
    let summary = import(&stack, &csv, &out);
    assert!(
        summary.contains(&format!("imported {} of {LINES} lines (3 failed)", LINES - 3)),
        "{summary}"
    );

    let results = results(&out);
    assert_eq!(results.len() as u64, LINES);
    for (line, reason) in &bad {
        let (token, error) = &results[line];
        assert!(
            token.is_empty() && error.starts_with(reason),
            "line {line}: {error}"
        );
        assert!(!error.contains("4111111111111112"), "errors never echo card data");
    }
    let mut client = TokenizationClient::new(gateway_channel(&stack, "dev-client").await);
    for line in [1, 2, 8, 499, 1000, 2000] {
        let (token, error) = &results[&line];
        assert!(error.is_empty() && token.starts_with("tok_"), "line {line}");
        let mut request = detokenize("m_import", token);
        request.shopper_reference = format!("shopper-{line}");
        let revealed = client.detokenize(request).await.unwrap().into_inner();
        assert_eq!(revealed_number(&revealed), card_number(line), "line {line}");
    }
    let tokens: std::collections::HashSet<_> = results
        .values()
        .filter(|(t, _)| !t.is_empty())
        .map(|(t, _)| t)
        .collect();
    assert_eq!(tokens.len() as u64, LINES - 3, "every token is distinct");
}

async fn json_lines_import_takes_cards_bank_accounts_and_contacts(backend: Backend) {
    let stack = Stack::start_on(backend);
    let dir = tempfile::tempdir().unwrap();
    let jsonl = dir.path().join("mixed.jsonl");
    std::fs::write(
        &jsonl,
        [
            r#"{"number":"5555555555554444","expiry_month":4,"expiry_year":2030,"shopper_reference":"shopper-1"}"#,
            r#"{"iban":"GB82 WEST 1234 5698 7654 32","bic":"NWBKGB2L","holder_name":"Ada","shopper_reference":"shopper-1"}"#,
            r#"{"email":"ada@example.com","shopper_reference":"shopper-1"}"#,
            r#"{"number": 42}"#,
            r#"{"iban":"GB00WEST12345698765432","shopper_reference":"shopper-1"}"#,
        ]
        .join("\n"),
    )
    .unwrap();
    let out = dir.path().join("results.csv");
    let summary = import(&stack, &jsonl, &out);
    assert!(summary.contains("imported 3 of 5 lines (2 failed)"), "{summary}");
    let results = results(&out);
    assert!(
        results[&1].0.starts_with("tok_")
            && results[&2].0.starts_with("tok_")
            && results[&3].0.starts_with("tok_")
    );
    assert!(results[&4].1.starts_with("INVALID_LINE"), "{:?}", results[&4]);
    assert!(
        results[&5].1.starts_with("INVALID_BANK_ACCOUNT"),
        "{:?}",
        results[&5]
    );
    let mut client = TokenizationClient::new(gateway_channel(&stack, "dev-client").await);
    let revealed = client
        .detokenize(detokenize("m_import", &results[&1].0))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(revealed_number(&revealed), "5555555555554444");
}

backend_tests!(
    csv_import_tokenizes_every_good_line_and_reports_each_bad_one,
    json_lines_import_takes_cards_bank_accounts_and_contacts,
);
