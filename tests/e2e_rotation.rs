//! Key rotation end to end: data-key rotation twice under a steady mixed load (every token
//! still detokenizes to its card, every record ends on the newest version, the old versions
//! are destroyed), and master-key (KEK) rotation with a previous key and `tessera keys
//! rewrap-all`. On SQLite and on PostgreSQL.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::requests::{self, revealed_number, tokenize_card};
use common::{database_pool, gateway_channel, run_tessera, Backend, CallerPolicy, Stack, StackOptions};
use tessera_api::v1::key_admin_client::KeyAdminClient;
use tessera_api::v1::tokenization_client::TokenizationClient;
use tessera_api::v1::{RotateKeyRequest, RotationStatusRequest};
use tonic::transport::Channel;

const MERCHANT: &str = "m-rot";

/// A valid (Luhn) 16-digit card number for `n`.
fn card_number(n: u64) -> String {
    let body = format!("411111{:09}", n % 1_000_000_000);
    let digits: Vec<u32> = body.chars().map(|c| c.to_digit(10).unwrap()).collect();
    let sum: u32 = digits
        .iter()
        .rev()
        .enumerate()
        .map(|(i, &d)| {
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

fn options(backend: Backend) -> StackOptions {
    let mut options = StackOptions {
        backend,
        callers: vec![
            CallerPolicy::all("spiffe://tessera/dev-client"),
            CallerPolicy::new(
                "spiffe://tessera/operator",
                &["*"],
                &["rotate_keys", "read_metadata"],
            ),
        ],
        ..StackOptions::default()
    };
    // A short request timeout keeps the destruction grace (timeout + a few seconds) short.
    let limits: toml::Table = toml::from_str("concurrency = 1024\nrequest_timeout_secs = 3").unwrap();
    options
        .gateway_extra
        .insert("limits".into(), toml::Value::Table(limits));
    options
}

async fn tokenize(client: &mut TokenizationClient<Channel>, number: &str) -> String {
    client
        .tokenize(tokenize_card(MERCHANT, number))
        .await
        .unwrap()
        .into_inner()
        .token
        .unwrap()
        .token
}

async fn detokenize(client: &mut TokenizationClient<Channel>, token: &str) -> Result<String, tonic::Status> {
    client
        .detokenize(requests::detokenize(MERCHANT, token))
        .await
        .map(|response| revealed_number(&response.into_inner()))
}

async fn data_key_versions(stack: &Stack) -> Vec<i64> {
    let db = database_pool(stack).await;
    let versions = sqlx::query_scalar(
        "SELECT version FROM merchant_keys WHERE merchant_id = $1 AND purpose = 'data' ORDER BY version",
    )
    .bind(MERCHANT)
    .fetch_all(&db)
    .await
    .unwrap();
    db.close().await;
    versions
}

async fn rotating_twice_under_load_reencrypts_everything_and_destroys_old_versions(backend: Backend) {
    let stack = Stack::start_with(options(backend));
    let channel = gateway_channel(&stack, "dev-client").await;
    let mut admin = KeyAdminClient::new(gateway_channel(&stack, "operator").await);
    let cards: Arc<Mutex<Vec<(String, String)>>> = Arc::default();
    {
        let mut client = TokenizationClient::new(channel.clone());
        for n in 0..40 {
            let number = card_number(n);
            let token = tokenize(&mut client, &number).await;
            cards.lock().unwrap().push((token, number));
        }
    }

    // Steady mixed load: 8 tasks in flight, each tokenizing a new card and detokenizing an
    // earlier one, until told to stop. Any failure fails the test.
    let stop = Arc::new(AtomicBool::new(false));
    let next = Arc::new(AtomicUsize::new(1_000));
    let mut tasks = Vec::new();
    for worker in 0..8 {
        let (channel, cards, stop, next) = (
            channel.clone(),
            Arc::clone(&cards),
            Arc::clone(&stop),
            Arc::clone(&next),
        );
        tasks.push(tokio::spawn(async move {
            let mut client = TokenizationClient::new(channel);
            let mut operations = 0usize;
            while !stop.load(Ordering::Relaxed) {
                let number = card_number(next.fetch_add(1, Ordering::Relaxed) as u64);
                let token = tokenize(&mut client, &number).await;
                let (old_token, old_number) = {
                    let mut cards = cards.lock().unwrap();
                    cards.push((token, number));
                    cards[(operations * 7 + worker) % cards.len()].clone()
                };
                let revealed = detokenize(&mut client, &old_token)
                    .await
                    .unwrap_or_else(|status| panic!("detokenize under load failed: {status:?}"));
                assert_eq!(revealed, old_number);
                operations += 2;
            }
            operations
        }));
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let first = admin
        .rotate_key(RotateKeyRequest {
            merchant_id: MERCHANT.into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((first.previous_version, first.data_key_version), (1, 2));
    tokio::time::sleep(Duration::from_secs(3)).await;
    let second = admin
        .rotate_key(RotateKeyRequest {
            merchant_id: MERCHANT.into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((second.previous_version, second.data_key_version), (2, 3));
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.store(true, Ordering::Relaxed);
    let mut operations = 0;
    for task in tasks {
        operations += task.await.unwrap();
    }
    assert!(
        operations > 50,
        "the load made too little progress: {operations} operations"
    );

    // The job moves every record to version 3 and destroys versions 1 and 2.
    let deadline = Instant::now() + Duration::from_secs(40);
    loop {
        let status = admin
            .rotation_status(RotationStatusRequest {
                merchant_id: MERCHANT.into(),
            })
            .await
            .unwrap()
            .into_inner();
        let versions: Vec<u32> = status.versions.iter().map(|v| v.version).collect();
        if status.pending_records == 0 && versions == [3] {
            assert_eq!(status.current_version, 3);
            assert_eq!(
                status.fingerprint_key_version, 1,
                "the fingerprint key is never rotated"
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "rotation did not finish: {status:?}\n{}",
            stack.all_logs()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert_eq!(data_key_versions(&stack).await, [3]);
    let db = database_pool(&stack).await;
    let old: i64 = sqlx::query_scalar(
        "SELECT COUNT(*) FROM tokens WHERE merchant_id = $1 AND data_key_version <> 3 AND ciphertext IS NOT NULL",
    )
    .bind(MERCHANT)
    .fetch_one(&db)
    .await
    .unwrap();
    assert_eq!(old, 0);
    db.close().await;

    let mut client = TokenizationClient::new(channel);
    let all = cards.lock().unwrap().clone();
    for (token, number) in &all {
        assert_eq!(&detokenize(&mut client, token).await.unwrap(), number);
    }

    // The operator tool shows the same.
    let output = run_tessera([
        "keys".to_owned(),
        "status".to_owned(),
        "--merchant".to_owned(),
        MERCHANT.to_owned(),
        "--gateway".to_owned(),
        stack.gateway_addr().to_string(),
        "--certs-dir".to_owned(),
        stack.pki().dir().to_str().unwrap().to_owned(),
    ]);
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(text.contains("current data key version  3"), "{text}");
    assert!(text.contains("records to re-encrypt     0"), "{text}");
}

/// Writes a development key file holding a fresh random key.
fn write_key_file(path: &std::path::Path) {
    use std::io::Read as _;
    let mut bytes = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .unwrap()
        .read_exact(&mut bytes)
        .unwrap();
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    std::fs::write(path, format!("# test master key\n{hex}\n")).unwrap();
}

fn set_master_key(stack: &Stack, current: &std::path::Path, previous: &[&std::path::Path]) {
    let path = stack.vault_config_path();
    let mut config: toml::Table = toml::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let mut master: toml::Table = toml::Table::new();
    master.insert("source".into(), "development-file".into());
    master.insert("path".into(), current.to_str().unwrap().into());
    master.insert(
        "previous_paths".into(),
        toml::Value::Array(previous.iter().map(|p| p.to_str().unwrap().into()).collect()),
    );
    config.insert("master_key".into(), toml::Value::Table(master));
    std::fs::write(&path, toml::to_string(&config).unwrap()).unwrap();
}

/// Detokenizes, retrying while the gateway reconnects to a restarted vault.
async fn detokenize_after_restart(client: &mut TokenizationClient<Channel>, token: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        match detokenize(client, token).await {
            Ok(number) => return number,
            Err(status) if status.code() == tonic::Code::Unavailable && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(status) => panic!("detokenize failed: {status:?}"),
        }
    }
}

async fn kek_rotation_rewraps_every_key_and_the_old_key_can_go(backend: Backend) {
    let keys = tempfile::tempdir().unwrap();
    let (key_a, key_b) = (keys.path().join("key-a"), keys.path().join("key-b"));
    write_key_file(&key_a);
    write_key_file(&key_b);
    let mut options = options(backend);
    let mut master: toml::Table = toml::Table::new();
    master.insert("source".into(), "development-file".into());
    master.insert("path".into(), key_a.to_str().unwrap().into());
    options
        .vault_extra
        .insert("master_key".into(), toml::Value::Table(master));
    let mut stack = Stack::start_with(options);
    let mut client = TokenizationClient::new(gateway_channel(&stack, "dev-client").await);
    let mut cards = Vec::new();
    for n in 0..20 {
        let number = card_number(n);
        cards.push((tokenize(&mut client, &number).await, number));
    }

    // B current, A previous: everything still works before the re-wrap.
    stack.stop_vault();
    set_master_key(&stack, &key_b, &[&key_a]);
    stack.start_vault();
    assert_eq!(
        detokenize_after_restart(&mut client, &cards[0].0).await,
        cards[0].1
    );

    let text = stack.rewrap_all();
    assert!(text.contains("re-wrapped 2 keys"), "{text}");
    assert!(text.contains("0 failed"), "{text}");

    // Only B: every token still detokenizes, and new ones work.
    stack.stop_vault();
    set_master_key(&stack, &key_b, &[]);
    stack.start_vault();
    for (token, number) in &cards {
        assert_eq!(&detokenize_after_restart(&mut client, token).await, number);
    }
    let token = tokenize(&mut client, &card_number(999)).await;
    assert_eq!(detokenize(&mut client, &token).await.unwrap(), card_number(999));
}

backend_tests!(
    multi_thread:
    rotating_twice_under_load_reencrypts_everything_and_destroys_old_versions,
    kek_rotation_rewraps_every_key_and_the_old_key_can_go,
);
