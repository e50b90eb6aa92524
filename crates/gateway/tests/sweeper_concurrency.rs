//! Two gateways sweeping one database at once expire each due token exactly once: one state
//! change and one EXPIRE journal entry per token, whoever gets there first. And the sweeper's
//! lease in `job_leases` goes to exactly one of several gateways asking at once, stays with
//! it while it renews, and passes on only once it runs out.
//!
//! On SQLite, and on PostgreSQL when a server runs at 127.0.0.1:5432 (each test in a fresh
//! database of its own, dropped afterwards); without one the PostgreSQL tests print a
//! `SKIPPED` notice, or fail when `TESSERA_REQUIRE_POSTGRES=1` (as in CI).
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod support;

use std::time::Duration;

use support::{due_record, journal_entry, PostgresDatabase};
use tessera_gateway::storage::{JournalKind, Store};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_sweepers_expire_each_token_once_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tessera.db");
    two_sweepers_expire_each_token_once(path.to_str().unwrap()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_sweepers_expire_each_token_once_postgres() {
    let Some(database) = PostgresDatabase::create("two_sweepers_expire_each_token_once_postgres").await
    else {
        return;
    };
    two_sweepers_expire_each_token_once(&database.url()).await;
    database.drop().await;
}

async fn two_sweepers_expire_each_token_once(database: &str) {
    let first = Store::open(database).await.unwrap();
    let second = Store::open(database).await.unwrap();
    const TOKENS: usize = 300;
    for index in 0..TOKENS {
        let record = due_record(index);
        let entry = journal_entry(&record.token, JournalKind::Tokenize, 0);
        first.insert_token(&record, &(&entry).into()).await.unwrap();
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
            .filter(|e| e.kind == JournalKind::Expire)
            .count();
        assert_eq!(expiries, 1, "{token}");
        let record = first.token("m1", &token).await.unwrap().unwrap();
        assert_eq!(
            (record.status.as_str(), record.ciphertext, record.fingerprint),
            ("expired", None, None)
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_lease_holder_at_a_time_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tessera.db");
    one_lease_holder_at_a_time(path.to_str().unwrap()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_lease_holder_at_a_time_postgres() {
    let Some(database) = PostgresDatabase::create("one_lease_holder_at_a_time_postgres").await else {
        return;
    };
    one_lease_holder_at_a_time(&database.url()).await;
    database.drop().await;
}

async fn one_lease_holder_at_a_time(database: &str) {
    let first = Store::open(database).await.unwrap();
    let second = Store::open(database).await.unwrap();
    let ttl = Duration::from_secs(10);
    const NOW: i64 = 1_000_000;

    // Eight gateways ask at the same instant, round after round: one gets it each time.
    for round in 0..20_i64 {
        let now = NOW + round * 20_000; // every round starts after the last lease ran out
        let mut asks = tokio::task::JoinSet::new();
        for asker in 0..8 {
            let store = if asker % 2 == 0 {
                first.clone()
            } else {
                second.clone()
            };
            asks.spawn(async move {
                let holder = format!("gateway-{asker}");
                let taken = store.try_take_lease("sweeper", &holder, now, ttl).await.unwrap();
                (holder, taken)
            });
        }
        let mut winners = Vec::new();
        while let Some(ask) = asks.join_next().await {
            let (holder, taken) = ask.unwrap();
            if taken {
                winners.push(holder);
            }
        }
        assert_eq!(winners.len(), 1, "round {round}: {winners:?}");
    }

    // The holder renews; nobody else gets it before it runs out; then someone else does.
    let now = NOW + 1_000_000;
    assert!(first.try_take_lease("job", "a", now, ttl).await.unwrap());
    assert!(!second.try_take_lease("job", "b", now + 1, ttl).await.unwrap());
    assert!(
        first.try_take_lease("job", "a", now + 9_000, ttl).await.unwrap(),
        "renewal"
    );
    assert!(
        !second
            .try_take_lease("job", "b", now + 18_999, ttl)
            .await
            .unwrap(),
        "the renewal extended the lease to now + 9 s + ttl"
    );
    assert!(
        second
            .try_take_lease("job", "b", now + 19_000, ttl)
            .await
            .unwrap(),
        "expired lease"
    );
    assert!(!first.try_take_lease("job", "a", now + 19_001, ttl).await.unwrap());
    // Leases of different jobs are independent.
    assert!(first
        .try_take_lease("other-job", "a", now + 19_001, ttl)
        .await
        .unwrap());
}
