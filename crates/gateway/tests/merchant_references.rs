//! Merchant references taken with what their requests write, through two gateways' stores on
//! one database: of many concurrent token inserts with one strict reference exactly one goes
//! in and the others are refused with nothing written, while inserts without a reference in
//! the same group-commit batches all go in; a token insert that collides takes no reference;
//! an authorisation report with a taken strict reference records nothing; a reference that is
//! not strict is recorded and never refused.
//!
//! On SQLite, and on PostgreSQL when a server runs at 127.0.0.1:5432 (see support/mod.rs).
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

mod support;

use support::{card_record, journal_entry, PostgresDatabase};
use tessera_gateway::retry_guard::{Outcome, Report};
use tessera_gateway::storage::{JournalKind, MerchantReference, Store, StoreError};

const AT: i64 = 1_800_000_000_000;
const CONCURRENT: usize = 32;

fn reference(reference: &str, strict: bool) -> MerchantReference {
    MerchantReference {
        merchant_id: "m1".into(),
        reference: reference.into(),
        strict,
        seen_at: AT,
    }
}

fn token(index: usize) -> String {
    format!("tok_{index:026}")
}

async fn insert(store: &Store, index: usize, with: Option<&MerchantReference>) -> Result<(), StoreError> {
    let record = card_record("m1", &token(index));
    let journal = (&journal_entry(&record.token, JournalKind::Tokenize, AT)).into();
    store.insert_token_claiming(&record, &journal, with).await
}

/// Rows a query counts, read through a connection of its own.
async fn rows(database: &str, sql: &str) -> i64 {
    let pool = support::raw_pool(database).await;
    let count = sqlx::query_scalar::<_, i64>(sql).fetch_one(&pool).await.unwrap();
    pool.close().await;
    count
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn references_are_taken_with_their_writes_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tessera.db");
    references_are_taken_with_their_writes(path.to_str().unwrap()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn references_are_taken_with_their_writes_postgres() {
    let Some(database) = PostgresDatabase::create("references_are_taken_with_their_writes_postgres").await
    else {
        return;
    };
    references_are_taken_with_their_writes(&database.url()).await;
    database.drop().await;
}

async fn references_are_taken_with_their_writes(database: &str) {
    let first = Store::open(database).await.unwrap();
    let second = Store::open(database).await.unwrap();

    // Many inserts at once, half with one strict reference, half without any.
    let mut tasks = tokio::task::JoinSet::new();
    for index in 0..2 * CONCURRENT {
        let store = if index % 2 == 0 {
            first.clone()
        } else {
            second.clone()
        };
        tasks.spawn(async move {
            let strict = reference("order-1", true);
            let with = (index < CONCURRENT).then_some(&strict);
            (index, insert(&store, index, with).await)
        });
    }
    let mut taken = Vec::new();
    while let Some(result) = tasks.join_next().await {
        match result.unwrap() {
            (index, Ok(())) if index < CONCURRENT => taken.push(index),
            (_, Ok(())) => {}
            (index, Err(StoreError::ReferenceTaken)) if index < CONCURRENT => {}
            (index, Err(err)) => panic!("insert {index}: {err}"),
        }
    }
    assert_eq!(
        taken.len(),
        1,
        "inserts that took the strict reference: {taken:?}"
    );
    let tokens = rows(database, "SELECT COUNT(*) FROM tokens").await;
    let journal = rows(database, "SELECT COUNT(*) FROM journal").await;
    assert_eq!((tokens, journal), (1 + CONCURRENT as i64, 1 + CONCURRENT as i64));
    assert!(first.merchant_reference_taken("m1", "order-1", AT).await.unwrap());

    // A token that collides takes no reference; the retry with a new token does.
    let existing = 2 * CONCURRENT - 1;
    let collided = insert(&second, existing, Some(&reference("order-2", true))).await;
    assert!(matches!(collided, Err(StoreError::Duplicate)), "{collided:?}");
    assert!(!first.merchant_reference_taken("m1", "order-2", AT).await.unwrap());
    insert(&second, 1000, Some(&reference("order-2", true)))
        .await
        .unwrap();
    assert!(first.merchant_reference_taken("m1", "order-2", AT).await.unwrap());

    // A report with a taken strict reference records nothing; one that is not strict is
    // recorded.
    let report = || Report {
        merchant_id: "m1".into(),
        agreement: "acq-1".into(),
        fingerprint: vec![7; 32],
        token: token(1000),
        outcome: Outcome::Declined,
        at: AT,
        caller: "test".into(),
        rule: None,
        do_not_retry_ms: 0,
    };
    let refused = first
        .report_authorization(report(), Some(reference("order-2", true)))
        .await;
    assert!(matches!(refused, Err(StoreError::ReferenceTaken)), "{refused:?}");
    assert_eq!(
        rows(database, "SELECT COUNT(*) FROM authorization_attempts").await,
        0
    );
    first
        .report_authorization(report(), Some(reference("order-2", false)))
        .await
        .unwrap();
    first
        .report_authorization(report(), Some(reference("auth-1", false)))
        .await
        .unwrap();
    assert_eq!(
        rows(database, "SELECT COUNT(*) FROM authorization_attempts").await,
        2
    );
    assert!(first.merchant_reference_taken("m1", "auth-1", AT).await.unwrap());
}
