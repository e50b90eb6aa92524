//! Many detokenize uses recorded at once, through two gateways' stores on one database, while
//! some of the tokens are deleted: each use of a live token is journalled and answered `true`,
//! a use of a token deleted before is refused and leaves nothing, and no token's journal shows
//! a use after its deletion. The group-commit writers put concurrent uses into one batch: on
//! SQLite they are marked together (`mark_used_together`), on PostgreSQL one by one in key
//! order, each waiting (`FOR SHARE`) for another gateway's transaction that is changing its
//! token. Without that wait this test saw "TK, DL, DT" on PostgreSQL in about half its runs.
//!
//! On SQLite, and on PostgreSQL when a server runs at 127.0.0.1:5432 (see support/mod.rs).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

mod support;

use support::{due_record, journal_entry, PostgresDatabase};
use tessera_gateway::storage::{JournalKind, Store, TokenStatus, Transition};

const TOKENS: usize = 40;
/// Deleted before the uses start.
const DELETED_BEFORE: usize = 8;
/// Deleted while the uses run.
const DELETED_DURING: usize = 8;
const USES: usize = 400;
/// All uses fall within one minute, so each live token's `last_used_at` is set once.
const START: i64 = 1_800_000_000_000;

const DELETION: Transition = Transition {
    from: &[TokenStatus::Active],
    to: TokenStatus::Deleted,
    destroy: true,
    clear_deadline: false,
};

fn token(index: usize) -> String {
    due_record(index).token
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_uses_are_journalled_once_each_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tessera.db");
    concurrent_uses_are_journalled_once_each(path.to_str().unwrap()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_uses_are_journalled_once_each_postgres() {
    let Some(database) = PostgresDatabase::create("concurrent_uses_are_journalled_once_each_postgres").await
    else {
        return;
    };
    concurrent_uses_are_journalled_once_each(&database.url()).await;
    database.drop().await;
}

async fn concurrent_uses_are_journalled_once_each(database: &str) {
    let first = Store::open(database).await.unwrap();
    let second = Store::open(database).await.unwrap();
    let rows = (0..TOKENS)
        .map(|index| {
            let record = due_record(index);
            let journal = (&journal_entry(&record.token, JournalKind::Tokenize, START)).into();
            (record, journal)
        })
        .collect();
    assert!(first
        .insert_tokens(rows)
        .await
        .unwrap()
        .iter()
        .all(|inserted| *inserted));
    for index in 0..DELETED_BEFORE {
        let token = token(index);
        first
            .transition(&DELETION, &journal_entry(&token, JournalKind::Delete, START))
            .await
            .unwrap()
            .unwrap();
    }

    let mut tasks = tokio::task::JoinSet::new();
    for index in 0..USES {
        let store = if index % 2 == 0 {
            first.clone()
        } else {
            second.clone()
        };
        tasks.spawn(async move {
            let token = token(index % TOKENS);
            let at = START + 1 + i64::try_from(index).unwrap();
            let used = store
                .record_use(
                    &journal_entry(&token, JournalKind::Detokenize, at),
                    false,
                    None,
                    None,
                )
                .await
                .unwrap();
            (index % TOKENS, Some(used))
        });
    }
    for index in DELETED_BEFORE..DELETED_BEFORE + DELETED_DURING {
        let store = second.clone();
        tasks.spawn(async move {
            let token = token(index);
            let at = START + 200;
            let deleted = store
                .transition(&DELETION, &journal_entry(&token, JournalKind::Delete, at))
                .await
                .unwrap();
            assert!(deleted.is_some(), "{token} was deleted by this request alone");
            (index, None)
        });
    }
    let mut answered_uses = vec![0_usize; TOKENS];
    while let Some(result) = tasks.join_next().await {
        let (index, used) = result.unwrap();
        if index < DELETED_BEFORE {
            assert_eq!(
                used,
                Some(false),
                "a use of {} deleted before was refused",
                token(index)
            );
        }
        if used == Some(true) {
            answered_uses[index] += 1;
        }
    }

    for (index, answered) in answered_uses.iter().enumerate() {
        let token = token(index);
        let history = first.history("m1", &token).await.unwrap();
        let kinds: Vec<&str> = history.iter().map(|entry| entry.kind.as_str()).collect();
        let uses = kinds.iter().filter(|kind| **kind == "DT").count();
        assert_eq!(
            uses, *answered,
            "{token}: every use answered true is journalled, once"
        );
        if let Some(deleted_at) = kinds.iter().position(|kind| *kind == "DL") {
            assert!(
                !kinds[deleted_at..].contains(&"DT"),
                "{token}: no use journalled after its deletion: {kinds:?}"
            );
        }
        let record = first.token("m1", &token).await.unwrap().unwrap();
        if index < DELETED_BEFORE + DELETED_DURING {
            assert_eq!(record.status, TokenStatus::Deleted);
        } else {
            assert_eq!(uses, USES / TOKENS, "{token}: all its uses went through");
            assert!(
                history
                    .iter()
                    .any(|entry| entry.kind == JournalKind::Detokenize
                        && Some(entry.at) == record.last_used_at),
                "{token}: last_used_at {:?} is the time of one of its uses",
                record.last_used_at
            );
        }
    }
}
