//! The vault's audit log through the real binaries: every tokenize and detokenize is recorded
//! (who, merchant, token, result) without card data, `tessera audit verify` accepts the log and
//! finds every kind of tampering (a deleted, edited or swapped record, a truncated tail), and a
//! vault that cannot write its log refuses card data (fail closed).
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use std::path::Path;
use std::process::Output;

use common::requests::{detokenize, revealed_number, tokenize_card};
use common::{gateway_channel, try_tessera, vault_channel, Stack, StackOptions};
use tessera_api::error_details::decode_error_info;
use tessera_api::v1::tokenization_client::TokenizationClient;
use tessera_api::vault::vault_client::VaultClient;
use tessera_api::vault::{ProtectRequest, UnsealRequest};
use tonic::Code;

const PANS: [&str; 3] = ["4111111111111111", "5555555555554444", "378282246310005"];

fn reason(status: &tonic::Status) -> String {
    decode_error_info(status.details())
        .map(|info| info.reason)
        .unwrap_or_default()
}

/// A development stack (key file) whose vault writes its audit log to `log`.
fn audited_stack(log: &Path) -> Stack {
    let mut extra = toml::Table::new();
    let mut audit = toml::Table::new();
    audit.insert("path".into(), log.to_str().unwrap().into());
    audit.insert("seal_interval_ms".into(), 100.into());
    extra.insert("audit".into(), audit.into());
    Stack::start_with(StackOptions {
        vault_extra: extra,
        ..StackOptions::default()
    })
}

fn status(stack: &Stack) -> String {
    let mut args = vec!["vault".to_owned(), "status".to_owned()];
    args.extend(stack.operator_args());
    let output = try_tessera(args);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

fn verify(log: &Path, public_key: &str, extra: &[&str]) -> Output {
    let mut args = vec![
        "audit",
        "verify",
        log.to_str().unwrap(),
        "--public-key",
        public_key,
    ];
    args.extend(extra);
    try_tessera(args)
}

/// Verifies a tampered copy of the log and expects the break to be reported at `seq`.
fn expect_break(dir: &Path, name: &str, lines: &[String], public_key: &str, seq: u64) {
    let path = dir.join(name);
    let text: String = lines.iter().map(|line| format!("{line}\n")).collect();
    std::fs::write(&path, text).unwrap();
    let output = verify(&path, public_key, &[]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{name}: tampering went unnoticed");
    assert!(
        stderr.contains(&format!("AUDIT LOG BROKEN at record {seq}:")),
        "{name}: {stderr}"
    );
}

#[tokio::test]
async fn the_audit_log_records_every_operation_and_reveals_tampering() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("audit.log");
    let mut stack = audited_stack(&log);
    let mut client = TokenizationClient::new(gateway_channel(&stack, "dev-client").await);
    let mut tokens = Vec::new();
    for pan in PANS {
        let token = client
            .tokenize(tokenize_card("m_audit", pan))
            .await
            .unwrap()
            .into_inner()
            .token
            .unwrap()
            .token;
        let revealed = client
            .detokenize(detokenize("m_audit", &token))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(revealed_number(&revealed), pan);
        tokens.push(token);
    }
    // An identity calling a method its role does not allow is a recorded refusal.
    let mut as_gateway = VaultClient::new(vault_channel(&stack, "gateway-client").await);
    let refused = as_gateway
        .unseal(UnsealRequest { share: String::new() })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied);

    let status_text = status(&stack);
    assert!(status_text.contains("audit state: ok"), "{status_text}");
    let public_key = status_text
        .lines()
        .find_map(|line| line.strip_prefix("audit public key: "))
        .unwrap()
        .to_owned();
    assert_eq!(public_key.len(), 64, "{status_text}");

    // While the vault runs the log is open: accepted only with --allow-open-tail.
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let open = verify(&log, &public_key, &["--allow-open-tail"]);
    assert!(open.status.success(), "{}", String::from_utf8_lossy(&open.stderr));
    assert!(!verify(&log, &public_key, &[]).status.success());

    // A clean shutdown seals the log.
    stack.stop_vault();
    let clean = verify(&log, &public_key, &[]);
    let clean_out = String::from_utf8_lossy(&clean.stdout);
    assert!(
        clean.status.success(),
        "{}",
        String::from_utf8_lossy(&clean.stderr)
    );
    assert!(clean_out.contains("shutdown seal"), "{clean_out}");

    let text = std::fs::read_to_string(&log).unwrap();
    for pan in PANS {
        assert!(!text.contains(pan), "a card number is in the audit log");
    }
    for token in &tokens {
        let records: Vec<&str> = text
            .lines()
            .filter(|line| line.contains(token.as_str()))
            .collect();
        assert!(
            records
                .iter()
                .any(|line| line.contains("event=protect result=ok")),
            "{records:?}"
        );
        assert!(
            records.iter().any(|line| line.contains("event=reveal result=ok")),
            "{records:?}"
        );
        assert!(
            records
                .iter()
                .all(|line| line.contains("caller=spiffe://tessera/gateway")
                    && line.contains("merchant=m_audit")),
            "{records:?}"
        );
    }
    assert!(text.contains("event=create-keys result=ok"));
    assert!(text.contains("event=refused result=METHOD_NOT_ALLOWED"));
    assert!(text.contains("event=vault-start") && text.contains("event=vault-stop"));

    // Every kind of tampering is found, and where.
    let lines: Vec<String> = text.lines().map(str::to_owned).collect();
    let target = lines
        .iter()
        .position(|line| line.contains(tokens[1].as_str()))
        .unwrap();
    let seq = |index: usize| u64::try_from(index + 1).unwrap();

    let mut deleted = lines.clone();
    deleted.remove(target);
    expect_break(dir.path(), "deleted.log", &deleted, &public_key, seq(target));

    let mut edited = lines.clone();
    edited[target] = edited[target].replace("merchant=m_audit", "merchant=m_other");
    expect_break(dir.path(), "edited.log", &edited, &public_key, seq(target + 1));

    let mut swapped = lines.clone();
    swapped.swap(target, target + 1);
    expect_break(dir.path(), "swapped.log", &swapped, &public_key, seq(target));

    // Cutting off the shutdown seal and the record before it: either records are left that no
    // signature covers (reported at the first of them), or the log now ends with an ordinary
    // block seal (reported there).
    let mut truncated = lines.clone();
    truncated.truncate(lines.len() - 2);
    let last_seal = truncated
        .iter()
        .rposition(|line| line.contains(" seal key="))
        .unwrap();
    let reported = if last_seal == truncated.len() - 1 {
        seq(last_seal)
    } else {
        seq(last_seal + 1)
    };
    expect_break(dir.path(), "truncated.log", &truncated, &public_key, reported);

    // A byte flipped anywhere, e.g. in a block seal's signature, is found as well.
    let seal = lines.iter().position(|line| line.contains(" seal key=")).unwrap();
    let mut forged = lines.clone();
    let flipped = if forged[seal].ends_with('0') { '1' } else { '0' };
    forged[seal].pop();
    forged[seal].push(flipped);
    expect_break(dir.path(), "forged.log", &forged, &public_key, seq(seal));

    // A key that is not the vault's proves nothing.
    let other_key = "ab".repeat(32);
    assert!(!verify(&log, &other_key, &[]).status.success());
}

#[tokio::test]
async fn a_vault_that_cannot_write_its_audit_log_refuses_card_data() {
    let dir = tempfile::tempdir().unwrap();
    // The log's parent is a regular file, so the log can never be created (even as root).
    let blocker = dir.path().join("not-a-directory");
    std::fs::write(&blocker, b"").unwrap();
    let stack = audited_stack(&blocker.join("audit.log"));

    let mut client = TokenizationClient::new(gateway_channel(&stack, "dev-client").await);
    let err = client
        .tokenize(tokenize_card("m_closed", PANS[0]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");

    // Straight to the vault: the reason names the audit log.
    let mut vault = VaultClient::new(vault_channel(&stack, "gateway-client").await);
    let err = vault.protect(ProtectRequest::default()).await.unwrap_err();
    assert_eq!(
        (err.code(), reason(&err).as_str()),
        (Code::Unavailable, "AUDIT_UNAVAILABLE"),
        "{err:?}"
    );

    let status_text = status(&stack);
    assert!(status_text.contains("audit state: unavailable"), "{status_text}");
    assert!(status_text.contains("audit error: cannot open"), "{status_text}");
    let (vault_log, _) = stack.logs();
    assert!(vault_log.contains("AUDIT LOG UNAVAILABLE"), "{vault_log}");
}
