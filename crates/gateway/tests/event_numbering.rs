//! Token events as the journal's trigger numbers them, with two gateways' stores writing bulk
//! imports, deletions and uses to one database at once while a subscriber follows:
//! - every created or deleted token has exactly one event, and a use has none;
//! - numbers run 1, 2, 3, ... with no gap, and the events of one import follow its rows;
//! - a subscriber reading from its last number on the whole time ends with every event: no
//!   event ever appeared behind its cursor, so numbers follow commit order across gateways.
//!
//! On PostgreSQL the trigger is per statement (migration 0005) under a transaction-scoped
//! advisory lock; on SQLite it is per row and the single writer orders commits.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

mod support;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use support::{card_record, journal_entry, PostgresDatabase};
use tessera_gateway::storage::{EventRow, JournalKind, Store, TokenStatus, Transition};

const IMPORTS: usize = 8;
const ROWS_PER_IMPORT: usize = 60;
/// Of each import, the tokens deleted (and so given a second event) after it lands.
const DELETED_PER_IMPORT: usize = 5;
/// A subscriber's page, small so that it reads many times while the writers run.
const PAGE: i64 = 37;

const DELETION: Transition = Transition {
    from: &[TokenStatus::Active],
    to: TokenStatus::Deleted,
    destroy: true,
    clear_deadline: false,
};

fn token(import: usize, row: usize) -> String {
    format!("{}{row:022}", import_prefix(import))
}

fn import_prefix(import: usize) -> String {
    format!("tok_{import:02}_")
}

/// All entries at one time: numbering must follow commit order, not the entries' times.
const AT: i64 = 1_800_000_000_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_are_numbered_once_each_in_commit_order_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tessera.db");
    events_are_numbered_once_each_in_commit_order(path.to_str().unwrap()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_are_numbered_once_each_in_commit_order_postgres() {
    let Some(database) =
        PostgresDatabase::create("events_are_numbered_once_each_in_commit_order_postgres").await
    else {
        return;
    };
    events_are_numbered_once_each_in_commit_order(&database.url()).await;
    database.drop().await;
}

/// Imports one chunk, deletes its first few tokens and uses the next few.
async fn write(store: Store, import: usize) {
    let rows = (0..ROWS_PER_IMPORT)
        .map(|row| {
            let token = token(import, row);
            let journal = (&journal_entry(&token, JournalKind::Tokenize, AT)).into();
            (card_record("m1", &token), journal)
        })
        .collect();
    let inserted = store.insert_tokens(rows).await.unwrap();
    assert!(inserted.iter().all(|inserted| *inserted));
    for row in 0..DELETED_PER_IMPORT {
        let token = token(import, row);
        store
            .transition(&DELETION, &journal_entry(&token, JournalKind::Delete, AT))
            .await
            .unwrap()
            .unwrap();
    }
    for row in DELETED_PER_IMPORT..2 * DELETED_PER_IMPORT {
        let token = token(import, row);
        assert!(store
            .record_use(
                &journal_entry(&token, JournalKind::Detokenize, AT),
                false,
                None,
                None
            )
            .await
            .unwrap());
    }
}

/// Follows the events from number 0 on, as a subscriber does, until `done` and one more read.
async fn follow(store: Store, done: Arc<AtomicBool>) -> Vec<EventRow> {
    let mut seen = Vec::new();
    let mut after = 0;
    // Bounded: the writers finish in seconds; this allows minutes.
    for _ in 0..60_000 {
        let finished = done.load(Ordering::SeqCst);
        let page = store.events_after("m1", after, PAGE).await.unwrap();
        let caught_up = page.len() < usize::try_from(PAGE).unwrap();
        if let Some(last) = page.last() {
            after = last.seq;
        }
        seen.extend(page);
        if caught_up && finished {
            return seen;
        }
        if caught_up {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
    panic!("the writers did not finish");
}

async fn events_are_numbered_once_each_in_commit_order(database: &str) {
    let first = Store::open(database).await.unwrap();
    let second = Store::open(database).await.unwrap();
    let done = Arc::new(AtomicBool::new(false));
    let subscriber = tokio::spawn(follow(first.clone(), Arc::clone(&done)));
    let mut writers = tokio::task::JoinSet::new();
    for import in 0..IMPORTS {
        let store = if import % 2 == 0 {
            first.clone()
        } else {
            second.clone()
        };
        writers.spawn(write(store, import));
    }
    while let Some(result) = writers.join_next().await {
        result.unwrap();
    }
    done.store(true, Ordering::SeqCst);
    let followed = subscriber.await.unwrap();

    let all = first.events_after("m1", 0, 100_000).await.unwrap();
    let expected = IMPORTS * (ROWS_PER_IMPORT + DELETED_PER_IMPORT);
    assert_eq!(
        all.len(),
        expected,
        "one event per creation and per deletion, none per use"
    );
    let numbers: Vec<i64> = all.iter().map(|event| event.seq).collect();
    let gapless: Vec<i64> = (1..=i64::try_from(expected).unwrap()).collect();
    assert_eq!(numbers, gapless, "numbered 1, 2, 3, ... without gaps");
    assert_eq!(
        followed, all,
        "the subscriber following all along saw every event: none appeared behind its cursor"
    );

    let mut kinds: HashMap<&str, Vec<&str>> = HashMap::new();
    for event in &all {
        kinds
            .entry(event.token.as_str())
            .or_default()
            .push(event.kind.as_str());
    }
    for import in 0..IMPORTS {
        for row in 0..ROWS_PER_IMPORT {
            let token = token(import, row);
            let expected: &[&str] = if row < DELETED_PER_IMPORT {
                &["TOKEN_CREATED", "TOKEN_DELETED"]
            } else {
                &["TOKEN_CREATED"]
            };
            assert_eq!(kinds[token.as_str()], expected, "{token}");
        }
        let created: Vec<&EventRow> = all
            .iter()
            .filter(|event| event.kind == "TOKEN_CREATED" && event.token.starts_with(&import_prefix(import)))
            .collect();
        let rows: Vec<String> = created.iter().map(|event| event.token.clone()).collect();
        let in_order: Vec<String> = (0..ROWS_PER_IMPORT).map(|row| token(import, row)).collect();
        assert_eq!(rows, in_order, "import {import}'s events follow its rows");
    }
}
