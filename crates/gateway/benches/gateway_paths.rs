//! Criterion benches of the gateway's own work, without the vault or the network: request
//! validation, and the durable storage write path (group commit into SQLite), alone and with
//! 64 writes in flight. Run with `cargo bench -p tessera-gateway`.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    missing_docs
)]

use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use tessera_api::v1::{Card, Initiator, Purpose, RecurringModel, ShopperInteraction};
use tessera_gateway::purpose::check_purpose;
use tessera_gateway::storage::{Journal, JournalKind, Store, TokenRecord};

#[path = "../tests/support/mod.rs"]
mod support;
use tessera_gateway::validate;

fn validation(c: &mut Criterion) {
    let card = Card {
        number: "4111 1111 1111 1111".into(),
        expiry_month: 12,
        expiry_year: 2031,
        holder_name: "Ada Lovelace".into(),
    };
    let purpose = Purpose {
        initiator: Initiator::Cardholder as i32,
        recurring_model: RecurringModel::CardOnFile as i32,
        shopper_interaction: ShopperInteraction::Ecommerce as i32,
    };
    let mut group = c.benchmark_group("validation");
    group.bench_function("tokenize request (merchant, card, shopper)", |b| {
        b.iter(|| {
            validate::merchant_id(black_box("m_demo")).unwrap();
            validate::card(black_box(&card), (2026, 11)).unwrap();
            validate::shopper_reference(black_box("shopper-42")).unwrap();
        })
    });
    group.bench_function("detokenize request (token, purpose)", |b| {
        b.iter(|| {
            validate::token(black_box("tok_abcdefghijklmnopqrstuvwxyz")).unwrap();
            check_purpose(Some(black_box(&purpose))).unwrap();
        })
    });
    group.finish();
}

fn record(counter: &AtomicU64) -> (TokenRecord, Journal) {
    let n = counter.fetch_add(1, Ordering::Relaxed);
    let token = format!("tok_{n:026}");
    let record = support::card_record("m_bench", &token);
    let journal = Journal {
        merchant_id: "m_bench".into(),
        token,
        kind: JournalKind::Tokenize,
        caller: "bench".into(),
        at: 1,
        purpose: String::new(),
        detail: String::new(),
        payment_reference: String::new(),
    };
    (record, journal)
}

fn storage(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bench.db");
    let store = runtime.block_on(Store::open(path.to_str().unwrap())).unwrap();
    let counter = AtomicU64::new(0);
    let mut group = c.benchmark_group("storage (SQLite, durable)");
    group.measurement_time(Duration::from_secs(5)).sample_size(20);
    group.throughput(Throughput::Elements(1));
    group.bench_function("insert token + journal, 1 in flight", |b| {
        b.iter(|| {
            let (record, journal) = record(&counter);
            runtime.block_on(store.insert_token(&record, &journal)).unwrap();
        })
    });
    group.throughput(Throughput::Elements(64));
    group.bench_function("insert token + journal, 64 in flight (group commit)", |b| {
        b.iter(|| {
            runtime.block_on(async {
                let writes: Vec<_> = (0..64)
                    .map(|_| {
                        let store = store.clone();
                        let (record, journal) = record(&counter);
                        tokio::spawn(async move { store.insert_token(&record, &journal).await })
                    })
                    .collect();
                for write in writes {
                    write.await.unwrap().unwrap();
                }
            })
        })
    });
    group.finish();
}

criterion_group!(benches, validation, storage);
criterion_main!(benches);
