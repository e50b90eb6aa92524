//! Bulk import through `tessera import` and the raw `ImportTokens` stream: a CSV (and a
//! JSON-lines file) of cards streams to the gateway; every good line gets a token that
//! detokenizes to its card, every bad line gets its own error, and the bad lines change
//! nothing for the good ones. Nothing is ever lost silently: lines of any realistic length are
//! imported, a message over a limit ends the stream with a reason after the results before
//! it, the CLI exits non-zero unless every line was imported, and the database holds exactly
//! the tokens reported. On SQLite and on PostgreSQL.
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
use common::{binaries, database_pool, gateway_channel, Backend, Stack};
use tessera_api::error_details::decode_error_info;
use tessera_api::limits::{MAX_IMPORT_ITEMS, MAX_IMPORT_MESSAGE_BYTES};
use tessera_api::v1::tokenization_client::TokenizationClient;
use tessera_api::v1::{
    import_result, tokenize_request, Card, ImportItem, ImportRequest, ImportResult, TokenizeRequest,
};
use tonic::Code;

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

/// Runs `tessera import` on `file`; returns whether it exited 0, and what it printed.
fn import(stack: &Stack, file: &std::path::Path, out: &std::path::Path) -> (bool, String) {
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
    let printed = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.success(), printed)
}

/// The active tokens of `merchant` in the database itself.
async fn stored_tokens(stack: &Stack, merchant: &str) -> std::collections::HashSet<String> {
    tokens_in(&database_pool(stack).await, merchant).await
}

async fn tokens_in(pool: &sqlx::AnyPool, merchant: &str) -> std::collections::HashSet<String> {
    sqlx::query_scalar::<_, String>("SELECT token FROM tokens WHERE merchant_id = $1 AND status = 'active'")
        .bind(merchant)
        .fetch_all(pool)
        .await
        .unwrap()
        .into_iter()
        .collect()
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
    let (exited_zero, summary) = import(&stack, &csv, &out);
    assert!(
        summary.contains(&format!("imported {} of {LINES} lines (3 failed)", LINES - 3)),
        "{summary}"
    );
    assert!(
        !exited_zero,
        "3 lines were not imported, so the command fails: {summary}"
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
    let (exited_zero, summary) = import(&stack, &jsonl, &out);
    assert!(summary.contains("imported 3 of 5 lines (2 failed)"), "{summary}");
    assert!(!exited_zero, "{summary}");
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

/// A CSV as a merchant migrating cards would have it: odd lines as in the acceptance run's
/// file (38-character holder names, 34-character shopper references: 1,200 of them once
/// printed "imported 0 of 1200 lines" and exited 0), even lines as long as valid lines get
/// (100-character holder names of two-byte letters, 128-character shopper references).
fn migration_csv(lines: u64) -> String {
    let mut text = String::from("number,expiry_month,expiry_year,holder_name,shopper_reference\n");
    for line in 1..=lines {
        let (holder, shopper) = if line % 2 == 1 {
            let holder = format!("Cardholder With A Long Name No {line:07}");
            let shopper = format!("shopper-ref-of-customer-{line:010}");
            assert_eq!((holder.len(), shopper.len()), (38, 34));
            (holder, shopper)
        } else {
            let holder = format!("{}{line:07}", "Ä".repeat(93));
            let shopper = format!("{}{line:010}", "s".repeat(118));
            assert_eq!((holder.chars().count(), shopper.len()), (100, 128));
            (holder, shopper)
        };
        text.push_str(&format!(
            "{},{},2031,{holder},{shopper}\n",
            card_number(line),
            line % 12 + 1
        ));
    }
    text
}

async fn csv_with_realistic_line_lengths_is_imported_whole(backend: Backend) {
    let stack = Stack::start_on(backend);
    let dir = tempfile::tempdir().unwrap();
    let csv = dir.path().join("migration.csv");
    const LINES: u64 = 1200;
    std::fs::write(&csv, migration_csv(LINES)).unwrap();
    let out = dir.path().join("results.csv");
    let (exited_zero, summary) = import(&stack, &csv, &out);
    assert!(exited_zero, "{summary}");
    assert!(
        summary.contains("imported 1200 of 1200 lines (0 failed)"),
        "{summary}"
    );
    let results = results(&out);
    assert_eq!(results.len() as u64, LINES, "one result line per input line");
    let reported: std::collections::HashSet<String> =
        results.values().map(|(token, _)| token.clone()).collect();
    assert!(results
        .values()
        .all(|(token, error)| token.starts_with("tok_") && error.is_empty()));
    assert_eq!(
        stored_tokens(&stack, "m_import").await,
        reported,
        "the database holds exactly the tokens reported"
    );
}

/// An import item as the raw RPC carries it.
fn item(sequence: u64, holder_name: String) -> ImportItem {
    ImportItem {
        sequence,
        item: Some(TokenizeRequest {
            merchant_id: "m_raw".into(),
            data: Some(tokenize_request::Data::Card(Card {
                number: card_number(sequence),
                expiry_month: 12,
                expiry_year: 2031,
                holder_name,
            })),
            shopper_reference: format!("shopper-ref-of-customer-{sequence:010}"),
            ..Default::default()
        }),
    }
}

/// Streams `messages` to ImportTokens; returns every result received and the error that
/// ended the stream, if one did.
async fn raw_import(
    stack: &Stack,
    messages: Vec<ImportRequest>,
) -> (Vec<ImportResult>, Option<tonic::Status>) {
    let mut client = TokenizationClient::new(gateway_channel(stack, "dev-client").await);
    let mut responses = client
        .import_tokens(tokio_stream::iter(messages))
        .await
        .unwrap()
        .into_inner();
    let mut results = Vec::new();
    loop {
        match responses.message().await {
            Ok(Some(response)) => results.extend(response.results),
            Ok(None) => return (results, None),
            Err(status) => return (results, Some(status)),
        }
    }
}

/// (reason, metadata value of `key`) of a status's ErrorInfo.
fn reason_and(status: &tonic::Status, key: &str) -> (String, String) {
    let info = decode_error_info(status.details()).expect("every refusal carries an ErrorInfo");
    (info.reason, info.metadata.get(key).cloned().unwrap_or_default())
}

async fn raw_stream_refuses_an_oversized_or_overfull_message_after_answering_the_ones_before(
    backend: Backend,
) {
    let stack = Stack::start_on(backend);
    let realistic = |sequence: u64| item(sequence, format!("Cardholder With A Long Name No {sequence:07}"));
    let good = ImportRequest {
        items: (1..=600).map(realistic).collect(),
    };
    // Valid items cannot make a message this large, so the filler is a long (invalid)
    // holder name: it is the size that is refused, before any item is looked at.
    let oversized = ImportRequest {
        items: (601..=700)
            .map(|sequence| item(sequence, "x".repeat(11_000)))
            .collect(),
    };
    assert!(prost::Message::encoded_len(&oversized) > MAX_IMPORT_MESSAGE_BYTES);
    let after = ImportRequest {
        items: (701..=710).map(realistic).collect(),
    };
    let (results, error) = raw_import(&stack, vec![good, oversized, after]).await;
    let error = error.expect("the oversized message ends the stream with an error");
    assert_eq!(error.code(), Code::InvalidArgument, "{error:?}");
    assert_eq!(
        reason_and(&error, "limit_bytes"),
        (
            "REQUEST_TOO_LARGE".to_owned(),
            MAX_IMPORT_MESSAGE_BYTES.to_string()
        )
    );
    let sequences: Vec<u64> = results.iter().map(|result| result.sequence).collect();
    assert_eq!(
        sequences,
        (1..=600).collect::<Vec<_>>(),
        "the message before is answered in full, first"
    );
    let tokens: std::collections::HashSet<String> = results
        .iter()
        .map(|result| match &result.outcome {
            Some(import_result::Outcome::Token(token)) => token.token.clone(),
            other => panic!("item {}: {other:?}", result.sequence),
        })
        .collect();
    assert_eq!(
        stored_tokens(&stack, "m_raw").await,
        tokens,
        "nothing of the refused message or after it is stored"
    );

    let overfull = ImportRequest {
        items: (1..=MAX_IMPORT_ITEMS as u64 + 1)
            .map(|sequence| item(sequence, String::new()))
            .collect(),
    };
    assert!(prost::Message::encoded_len(&overfull) <= MAX_IMPORT_MESSAGE_BYTES);
    let (results, error) = raw_import(&stack, vec![overfull]).await;
    let error = error.expect("a message over the item limit ends the stream with an error");
    assert_eq!(error.code(), Code::InvalidArgument);
    assert_eq!(
        reason_and(&error, "limit_items"),
        ("TOO_MANY_ITEMS".to_owned(), MAX_IMPORT_ITEMS.to_string())
    );
    assert!(results.is_empty());
    assert_eq!(
        stored_tokens(&stack, "m_raw").await,
        tokens,
        "the overfull message stored nothing"
    );
}

async fn an_import_cut_short_names_every_line_not_imported_and_fails(backend: Backend) {
    let mut stack = Stack::start_on(backend);
    let dir = tempfile::tempdir().unwrap();
    let csv = dir.path().join("migration.csv");
    const LINES: u64 = 30_000;
    std::fs::write(&csv, migration_csv(LINES)).unwrap();
    let out = dir.path().join("results.csv");
    let child = Command::new(binaries().tessera)
        .args([
            "import",
            csv.to_str().unwrap(),
            "--merchant",
            "m_import",
            "--quiet",
        ])
        .args(["--gateway", &stack.gateway_addr().to_string()])
        .args(["--certs-dir", stack.pki().dir().to_str().unwrap()])
        .args(["--out", out.to_str().unwrap()])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Stop the gateway once the import is under way: some lines are in, most are not.
    let pool = database_pool(&stack).await;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while tokens_in(&pool, "m_import").await.is_empty() {
        assert!(std::time::Instant::now() < deadline, "the import never started");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    stack.kill_gateway();
    let output = child.wait_with_output().unwrap();
    let printed = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        !output.status.success(),
        "an import cut short must fail: {printed}"
    );
    let results = results(&out);
    assert_eq!(
        results.len() as u64,
        LINES,
        "every line is in the results file: {printed}"
    );
    let reported: std::collections::HashSet<String> = results
        .values()
        .filter(|(token, _)| !token.is_empty())
        .map(|(token, _)| token.clone())
        .collect();
    let not_imported = results.values().filter(|(token, _)| token.is_empty()).count();
    assert!(
        not_imported > 0,
        "the cut came too late to test anything: {printed}"
    );
    assert!(
        results
            .values()
            .all(|(token, error)| !token.is_empty() || error.starts_with("NOT_IMPORTED")),
        "each line not imported says so"
    );
    // The database holds every reported token; a line whose commit raced the cut may be
    // stored although reported as not imported, never the other way round.
    let stored = tokens_in(&pool, "m_import").await;
    assert!(
        reported.is_subset(&stored),
        "a token reported as imported is missing"
    );
}

backend_tests!(
    csv_import_tokenizes_every_good_line_and_reports_each_bad_one,
    json_lines_import_takes_cards_bank_accounts_and_contacts,
    csv_with_realistic_line_lengths_is_imported_whole,
    raw_stream_refuses_an_oversized_or_overfull_message_after_answering_the_ones_before,
    an_import_cut_short_names_every_line_not_imported_and_fails,
);
