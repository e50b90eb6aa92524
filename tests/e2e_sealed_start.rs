//! Sealed start through the real binaries: `tessera vault init` splits a master key made in
//! the vault into 5 shares (threshold 3); after a restart the vault is sealed and the gateway
//! answers UNAVAILABLE/VAULT_SEALED; a wrong or repeated share is refused without losing the
//! others' progress; the third valid share unseals; a restart (or `tessera vault seal`) seals
//! it again, and any three shares bring back the same key.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::Output;

use common::requests::{detokenize, revealed_number, tokenize_card};
use common::{gateway_channel, run_tessera, try_tessera, CallerPolicy, Stack, StackOptions};
use tessera_api::error_details::decode_error_info;
use tessera_api::v1::tokenization_client::TokenizationClient;
use tonic::transport::Channel;
use tonic::Code;

const PAN: &str = "4111111111111111";

fn reason(status: &tonic::Status) -> String {
    decode_error_info(status.details())
        .map(|info| info.reason)
        .unwrap_or_default()
}

/// A stack whose vault starts sealed, with its seal state and audit log in `state`; the
/// operator may rotate keys through the gateway.
fn sealed_stack(state: &Path) -> Stack {
    let mut extra = toml::Table::new();
    let mut master_key = toml::Table::new();
    master_key.insert("source".into(), "sealed".into());
    master_key.insert(
        "state_file".into(),
        state.join("seal.toml").to_str().unwrap().into(),
    );
    extra.insert("master_key".into(), master_key.into());
    let mut audit = toml::Table::new();
    audit.insert("path".into(), state.join("audit.log").to_str().unwrap().into());
    extra.insert("audit".into(), audit.into());
    Stack::start_with(StackOptions {
        vault_extra: extra,
        callers: vec![
            CallerPolicy::all("spiffe://tessera/dev-client"),
            CallerPolicy::new("spiffe://tessera/operator", &["*"], &["rotate_keys"]),
        ],
        ..StackOptions::default()
    })
}

fn tessera_vault(stack: &Stack, command: &[&str]) -> Output {
    let mut args: Vec<String> = ["vault"]
        .iter()
        .chain(command)
        .map(|word| (*word).to_owned())
        .collect();
    args.extend(stack.operator_args());
    try_tessera(args)
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

fn unseal(stack: &Stack, share: &Path) -> Output {
    tessera_vault(stack, &["unseal", "--share-file", share.to_str().unwrap()])
}

/// Unseals with `share` and expects the vault to take it, returning what it printed.
fn unseal_ok(stack: &Stack, share: &Path) -> String {
    let output = unseal(stack, share);
    assert!(output.status.success(), "{}", stderr(&output));
    stdout(&output)
}

/// Unseals with `share` and expects a refusal with `reason`.
fn unseal_refused(stack: &Stack, share: &Path, reason: &str) {
    let output = unseal(stack, share);
    assert!(!output.status.success(), "{}", stdout(&output));
    assert!(stderr(&output).contains(reason), "{}", stderr(&output));
}

async fn expect_sealed(client: &mut TokenizationClient<Channel>) {
    let err = client.tokenize(tokenize_card("m_sealed", PAN)).await.unwrap_err();
    assert_eq!(
        (err.code(), reason(&err).as_str()),
        (Code::Unavailable, "VAULT_SEALED"),
        "{err:?}"
    );
}

/// Waits until the gateway uses the vault again after an unseal. The gateway takes a sealed
/// vault out of rotation and probes it (several times a second while no vault is in rotation),
/// so the first call right after the unseal may still read VAULT_SEALED.
async fn wait_until_served(client: &mut TokenizationClient<Channel>) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    loop {
        match client.tokenize(tokenize_card("m_probe", PAN)).await {
            Ok(_) => return,
            Err(err) if reason(&err) == "VAULT_SEALED" && std::time::Instant::now() < deadline => {
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
            Err(err) => panic!("the gateway does not use the unsealed vault: {err:?}"),
        }
    }
}

fn share_files(dir: &Path) -> Vec<PathBuf> {
    (1..=5)
        .map(|index| dir.join(format!("share-{index}-of-5.txt")))
        .collect()
}

#[tokio::test]
async fn sealed_start_needs_three_of_five_shares_after_every_start() {
    let state = tempfile::tempdir().unwrap();
    let shares_dir = state.path().join("shares");
    let mut stack = sealed_stack(state.path());
    let mut client = TokenizationClient::new(gateway_channel(&stack, "dev-client").await);

    // Before init there is no key at all.
    expect_sealed(&mut client).await;
    let status = stdout(&tessera_vault(&stack, &["status"]));
    assert!(
        status.contains("sealed: true") && status.contains("initialized: false"),
        "{status}"
    );

    let init = tessera_vault(
        &stack,
        &[
            "init",
            "--shares",
            "5",
            "--threshold",
            "3",
            "--out-dir",
            shares_dir.to_str().unwrap(),
        ],
    );
    assert!(init.status.success(), "{}", stderr(&init));
    let init_out = stdout(&init);
    let kcv = init_out
        .lines()
        .find_map(|line| line.strip_prefix("key check value: "))
        .unwrap()
        .to_owned();
    let shares = share_files(&shares_dir);
    let mut share_values = Vec::new();
    for share in &shares {
        let mode = std::fs::metadata(share).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "{}", share.display());
        let text = std::fs::read_to_string(share).unwrap();
        let line = text
            .lines()
            .find(|line| line.starts_with("tessera-share-v1 "))
            .unwrap();
        assert!(line.contains(&kcv));
        share_values.push(line.rsplit(' ').next().unwrap().to_owned());
    }
    // The master key is written nowhere: the seal state holds public values only.
    let seal_state = std::fs::read_to_string(state.path().join("seal.toml")).unwrap();
    assert!(seal_state.contains(&kcv));
    for value in &share_values {
        assert!(!seal_state.contains(value.as_str()));
    }
    // A second init is refused and does not touch the shares.
    let again = tessera_vault(
        &stack,
        &[
            "init",
            "--shares",
            "5",
            "--threshold",
            "3",
            "--out-dir",
            state.path().join("other").to_str().unwrap(),
        ],
    );
    assert!(!again.status.success());
    assert!(
        stderr(&again).contains("ALREADY_INITIALIZED"),
        "{}",
        stderr(&again)
    );

    // Init leaves the vault sealed; so does a restart.
    expect_sealed(&mut client).await;
    stack.stop_vault();
    stack.start_vault();
    expect_sealed(&mut client).await;

    assert!(unseal_ok(&stack, &shares[0]).contains("1 of 3"));
    assert!(unseal_ok(&stack, &shares[1]).contains("2 of 3"));
    expect_sealed(&mut client).await;

    // A wrong share (one digit changed) is refused; the two good shares stay.
    let wrong = state.path().join("wrong-share.txt");
    let text = std::fs::read_to_string(&shares[2]).unwrap();
    let flipped = text.trim_end().to_owned();
    let (head, last) = flipped.split_at(flipped.len() - 1);
    let replacement = if last == "0" { "1" } else { "0" };
    std::fs::write(&wrong, format!("{head}{replacement}\n")).unwrap();
    unseal_refused(&stack, &wrong, "INVALID_SHARE");
    // A repeated share is refused too.
    unseal_refused(&stack, &shares[0], "DUPLICATE_SHARE");
    let status = stdout(&tessera_vault(&stack, &["status"]));
    assert!(status.contains("unseal progress: 2 of 3"), "{status}");
    expect_sealed(&mut client).await;

    let unsealed = unseal_ok(&stack, &shares[3]);
    assert!(
        unsealed.contains("UNSEALED") && unsealed.contains(&kcv),
        "{unsealed}"
    );
    unseal_refused(&stack, &shares[4], "ALREADY_UNSEALED");
    wait_until_served(&mut client).await;

    let token = client
        .tokenize(tokenize_card("m_sealed", PAN))
        .await
        .unwrap()
        .into_inner()
        .token
        .unwrap()
        .token;
    let revealed = client
        .detokenize(detokenize("m_sealed", &token))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(revealed_number(&revealed), PAN);

    // A restart is sealed again; any other three shares bring back the same key.
    stack.kill_vault();
    stack.start_vault();
    expect_sealed(&mut client).await;
    let err = client
        .detokenize(detokenize("m_sealed", &token))
        .await
        .unwrap_err();
    assert_eq!(reason(&err), "VAULT_SEALED", "{err:?}");
    for share in [&shares[4], &shares[2], &shares[1]] {
        unseal_ok(&stack, share);
    }
    wait_until_served(&mut client).await;
    let revealed = client
        .detokenize(detokenize("m_sealed", &token))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(revealed_number(&revealed), PAN);

    // An operator can seal a running vault at once.
    let sealed = tessera_vault(&stack, &["seal"]);
    assert!(sealed.status.success(), "{}", stderr(&sealed));
    expect_sealed(&mut client).await;
    for share in [&shares[0], &shares[2], &shares[4]] {
        unseal_ok(&stack, share);
    }
    wait_until_served(&mut client).await;
    client.detokenize(detokenize("m_sealed", &token)).await.unwrap();

    // Shares never reach a log; the unseal attempts are in the audit log (without them).
    stack.stop_vault();
    let (vault_log, gateway_log) = stack.logs();
    let audit = std::fs::read_to_string(state.path().join("audit.log")).unwrap();
    for value in &share_values {
        for text in [&vault_log, &gateway_log, &audit] {
            assert!(!text.contains(value.as_str()), "a share leaked into a log");
        }
    }
    for event in [
        "event=init result=ok",
        "event=unseal-share result=accepted",
        "event=unseal-share result=INVALID_SHARE",
        "event=unseal-share result=DUPLICATE_SHARE",
        "event=unseal result=ok",
        "event=seal result=ok",
    ] {
        assert!(audit.contains(event), "{event} missing from the audit log");
    }
    let public_key = init_out
        .lines()
        .find_map(|line| line.strip_prefix("audit public key: "))
        .unwrap()
        .to_owned();
    run_tessera([
        "audit",
        "verify",
        state.path().join("audit.log").to_str().unwrap(),
        "--public-key",
        &public_key,
    ]);
}

#[tokio::test]
async fn unseal_before_init_and_bad_parameters_are_refused() {
    let state = tempfile::tempdir().unwrap();
    let stack = sealed_stack(state.path());
    let share = state.path().join("share.txt");
    std::fs::write(
        &share,
        format!("tessera-share-v1 0011223344556677 1 {}\n", "ab".repeat(32)),
    )
    .unwrap();
    unseal_refused(&stack, &share, "NOT_INITIALIZED");
    let bad = tessera_vault(
        &stack,
        &[
            "init",
            "--shares",
            "3",
            "--threshold",
            "1",
            "--out-dir",
            state.path().join("shares").to_str().unwrap(),
        ],
    );
    assert!(!bad.status.success());
    assert!(
        !state.path().join("seal.toml").exists(),
        "a refused init must not initialise the vault"
    );
}

fn share_files_of(dir: &Path, count: u32) -> Vec<PathBuf> {
    (1..=count)
        .map(|index| dir.join(format!("share-{index}-of-{count}.txt")))
        .collect()
}

/// Every token (all of merchant `m_rekey`) reveals `PAN`.
async fn assert_all_reveal(client: &mut TokenizationClient<Channel>, tokens: &[String]) {
    for token in tokens {
        let revealed = client.detokenize(detokenize("m_rekey", token)).await.unwrap();
        assert_eq!(revealed_number(&revealed.into_inner()), PAN);
    }
}

fn printed<'a>(output: &'a str, prefix: &str) -> &'a str {
    output
        .lines()
        .find_map(|line| line.strip_prefix(prefix))
        .unwrap_or_else(|| panic!("no {prefix:?} in {output}"))
}

/// KEK rotation of a sealed vault: `tessera vault rekey` hands out new shares and retires the
/// old key to unwrap-only; old tokens keep detokenizing (also after a restart unsealed with
/// the new shares, while the old shares are refused); `keys rewrap-all` moves every merchant
/// key and `vault retire-keys` forgets the old key; the audit log verifies with the original
/// public key across the audit key's roll-over.
#[tokio::test]
async fn rekey_rotates_the_master_key_of_a_sealed_vault() {
    let state = tempfile::tempdir().unwrap();
    let (first_dir, second_dir) = (state.path().join("first"), state.path().join("second"));
    let mut stack = sealed_stack(state.path());
    let mut client = TokenizationClient::new(gateway_channel(&stack, "dev-client").await);
    let dir = |path: &Path| path.to_str().unwrap().to_owned();
    let init = tessera_vault(
        &stack,
        &[
            "init",
            "--shares",
            "3",
            "--threshold",
            "2",
            "--out-dir",
            &dir(&first_dir),
        ],
    );
    assert!(init.status.success(), "{}", stderr(&init));
    let init_out = stdout(&init);
    let (old_kcv, public_key) = (
        printed(&init_out, "key check value: ").to_owned(),
        printed(&init_out, "audit public key: ").to_owned(),
    );
    let first = share_files_of(&first_dir, 3);
    unseal_ok(&stack, &first[0]);
    unseal_ok(&stack, &first[1]);
    wait_until_served(&mut client).await;
    let mut tokens = Vec::new();
    for _ in 0..5 {
        let token = client.tokenize(tokenize_card("m_rekey", PAN)).await.unwrap();
        tokens.push(token.into_inner().token.unwrap().token);
    }

    let rekey = tessera_vault(
        &stack,
        &[
            "rekey",
            "--shares",
            "4",
            "--threshold",
            "3",
            "--out-dir",
            &dir(&second_dir),
        ],
    );
    assert!(rekey.status.success(), "{}", stderr(&rekey));
    let rekey_out = stdout(&rekey);
    let new_kcv = printed(&rekey_out, "key check value: ").to_owned();
    assert_ne!(new_kcv, old_kcv);
    assert_eq!(printed(&rekey_out, "retiring (unwrap only): "), old_kcv);
    let status = stdout(&tessera_vault(&stack, &["status"]));
    assert!(
        status.contains(&format!("key check value: {new_kcv}")),
        "{status}"
    );
    assert!(
        status.contains(&format!("retiring key check values: {old_kcv}")),
        "{status}"
    );
    // Traffic goes on: old tokens reveal, new ones are made under the new key.
    assert_all_reveal(&mut client, &tokens).await;
    let token = client.tokenize(tokenize_card("m_rekey", PAN)).await.unwrap();
    tokens.push(token.into_inner().token.unwrap().token);

    // After a restart only the new shares unseal; the old key comes back as retiring.
    stack.kill_vault();
    stack.start_vault();
    unseal_refused(&stack, &first[2], "WRONG_VAULT_SHARE");
    let second = share_files_of(&second_dir, 4);
    for share in &second[1..] {
        unseal_ok(&stack, share);
    }
    wait_until_served(&mut client).await;
    assert_all_reveal(&mut client, &tokens).await;

    let rewrap_out = stack.rewrap_all();
    assert!(rewrap_out.contains("(0 failed"), "{rewrap_out}");
    let retire = tessera_vault(&stack, &["retire-keys"]);
    assert!(retire.status.success(), "{}", stderr(&retire));
    assert!(stdout(&retire).contains(&old_kcv), "{}", stdout(&retire));

    // The old key is gone for good; every token still reveals under the new one.
    stack.stop_vault();
    stack.start_vault();
    for share in &second[..3] {
        unseal_ok(&stack, share);
    }
    wait_until_served(&mut client).await;
    let status = stdout(&tessera_vault(&stack, &["status"]));
    assert!(!status.contains("retiring"), "{status}");
    assert_all_reveal(&mut client, &tokens).await;

    // One published key verifies the whole log: the old audit key vouched for the new one.
    stack.stop_vault();
    let audit = std::fs::read_to_string(state.path().join("audit.log")).unwrap();
    for event in ["event=rekey result=ok", "event=retire-master-keys result=ok"] {
        assert!(audit.contains(event), "{event} missing from the audit log");
    }
    let verified = run_tessera([
        "audit",
        "verify",
        state.path().join("audit.log").to_str().unwrap(),
        "--public-key",
        &public_key,
    ]);
    let verified = String::from_utf8_lossy(&verified.stdout).into_owned();
    assert!(verified.contains("audit key rolled over"), "{verified}");
}
