//! Two gateways sweeping one database at once expire each due token exactly once: one state
//! change and one EXPIRE journal entry per token, whoever gets there first.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use tessera_gateway::store::{JournalEntry, Store, TokenRecord, STATUS_ACTIVE};

fn due_record(index: usize) -> TokenRecord {
    TokenRecord {
        merchant_id: "m1".into(),
        token: format!("tok_{index:026}"),
        kind: "card_on_file".into(),
        data_type: "card".into(),
        format: "opaque".into(),
        brand: "VISA".into(),
        first_six: "411111".into(),
        last_four: "1111".into(),
        expiry_month: 1,
        expiry_year: 2020,
        shopper_reference: "shopper-1".into(),
        fingerprint: Some(vec![1; 32]),
        fingerprint_key_version: 1,
        ciphertext: Some(vec![2; 64]),
        data_key_version: 1,
        holds_cvc: false,
        cvc_vault: String::new(),
        status: STATUS_ACTIVE.into(),
        created_at: 0,
        last_used_at: None,
        ended_at: None,
        expires_at: None,
        retain_until: 1_000,
        retention_extended_months: 0,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_sweepers_expire_each_token_once() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tessera.db");
    let first = Store::open(path.to_str().unwrap()).await.unwrap();
    let second = Store::open(path.to_str().unwrap()).await.unwrap();
    const TOKENS: usize = 300;
    for index in 0..TOKENS {
        let record = due_record(index);
        let entry = JournalEntry {
            merchant_id: "m1",
            token: &record.token,
            kind: "TK",
            caller: "test",
            at: 0,
            purpose: "",
            detail: "",
        };
        first.insert_token(&record, &entry).await.unwrap();
    }
    let sweep = |store: Store, name: &'static str| async move {
        let mut total = 0;
        for _ in 0..50 {
            let swept = store.sweep(10_000, 7, name).await.unwrap();
            if swept.is_empty() {
                break;
            }
            total += swept.len();
        }
        total
    };
    let (a, b) = tokio::join!(
        tokio::spawn(sweep(first.clone(), "gateway-a")),
        tokio::spawn(sweep(second, "gateway-b"))
    );
    let (a, b) = (a.unwrap(), b.unwrap());
    assert_eq!(
        a + b,
        TOKENS,
        "every due token expired once (a swept {a}, b swept {b})"
    );
    for index in 0..TOKENS {
        let token = due_record(index).token;
        let expiries = first
            .history("m1", &token)
            .await
            .unwrap()
            .into_iter()
            .filter(|e| e.kind == "EXPIRE")
            .count();
        assert_eq!(expiries, 1, "{token}");
        let record = first.token("m1", &token).await.unwrap().unwrap();
        assert_eq!(
            (record.status.as_str(), record.ciphertext, record.fingerprint),
            ("expired", None, None)
        );
    }
}
