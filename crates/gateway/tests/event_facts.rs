//! The facts events carry about their tokens (migration 0006), at the storage level:
//! - events stored by the earlier schema (0004 on SQLite, 0005 on PostgreSQL) are filled in
//!   from their tokens when the store upgrades, a confirmation's payment reference from its
//!   journalled detail, so they stream like new ones;
//! - events written after the upgrade get the same facts from the trigger, through the
//!   group-commit writer, the sweeper's and the retry guard's own transactions alike (a
//!   card's block and unblock name the token whose report caused it), and a confirmation
//!   carries its payment reference and no other event does.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

mod support;

use std::path::Path;

use sqlx::migrate::Migrator;
use support::{card_record, journal_entry, PostgresDatabase};
use tessera_gateway::purpose::Kind;
use tessera_gateway::retry_guard::{Outcome, Report};
use tessera_gateway::storage::{
    DataType, EventRow, Journal, JournalEntry, JournalKind, Store, TokenRecord, TokenStatus, Transition,
};

/// The last migration before events carried their tokens' facts, per backend.
const SQLITE_BEFORE: i64 = 4;
const POSTGRES_BEFORE: i64 = 5;

const CONFIRMATION: Transition = Transition {
    from: &[TokenStatus::Provisional],
    to: TokenStatus::Active,
    destroy: false,
    clear_deadline: true,
};

const DELETION: Transition = Transition {
    from: &[TokenStatus::Active],
    to: TokenStatus::Deleted,
    destroy: true,
    clear_deadline: false,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_carry_their_tokens_facts_before_and_after_the_upgrade_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tessera.db");
    let url = format!("sqlite://{}?mode=rwc", path.display());
    events_carry_their_tokens_facts_before_and_after_the_upgrade(
        &url,
        path.to_str().unwrap(),
        "migrations/sqlite",
        SQLITE_BEFORE,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_carry_their_tokens_facts_before_and_after_the_upgrade_postgres() {
    let Some(database) =
        PostgresDatabase::create("events_carry_their_tokens_facts_before_and_after_the_upgrade_postgres")
            .await
    else {
        return;
    };
    let url = database.url();
    events_carry_their_tokens_facts_before_and_after_the_upgrade(
        &url,
        &url,
        "migrations/postgres",
        POSTGRES_BEFORE,
    )
    .await;
    database.drop().await;
}

/// A Mastercard token of shopper-2 expiring in March 2029, still provisional.
fn provisional_record(token: &str) -> TokenRecord {
    TokenRecord {
        brand: "MASTERCARD".into(),
        first_six: "555555".into(),
        last_four: "4444".into(),
        expiry_month: 3,
        expiry_year: 2029,
        shopper_reference: "shopper-2".into(),
        status: TokenStatus::Provisional,
        ..card_record("m1", token)
    }
}

/// A bank-account token (no brand, no expiry) of shopper-3.
fn bank_record(token: &str) -> TokenRecord {
    TokenRecord {
        kind: Kind::Recurrence,
        data_type: DataType::BankAccount,
        brand: String::new(),
        first_six: String::new(),
        last_four: "5432".into(),
        expiry_month: 0,
        expiry_year: 0,
        shopper_reference: "shopper-3".into(),
        ..card_record("m1", token)
    }
}

/// What an event says about its token: (token, kind, shopper, token kind, data type, brand,
/// last four, expiry month, expiry year, payment reference).
type Facts = (
    String,
    String,
    String,
    Option<Kind>,
    Option<DataType>,
    String,
    String,
    u32,
    u32,
    String,
);

fn facts(event: &EventRow) -> Facts {
    (
        event.token.clone(),
        event.kind.clone(),
        event.shopper_reference.clone(),
        event.token_kind,
        event.data_type,
        event.brand.clone(),
        event.last_four.clone(),
        event.expiry_month,
        event.expiry_year,
        event.payment_reference.clone(),
    )
}

fn expected(record: &TokenRecord, kind: &str, payment_reference: &str) -> Facts {
    (
        record.token.clone(),
        kind.into(),
        record.shopper_reference.clone(),
        Some(record.kind),
        Some(record.data_type),
        record.brand.clone(),
        record.last_four.clone(),
        record.expiry_month,
        record.expiry_year,
        payment_reference.into(),
    )
}

/// Writes a token row and journal entries the way the gateway did before migration 0006:
/// the journal without a payment reference column, the reference only in the detail.
async fn write_as_before(pool: &sqlx::AnyPool, record: &TokenRecord, entries: &[(&str, &str)]) {
    sqlx::query(
        "INSERT INTO tokens (merchant_id, token, kind, data_type, format, brand, first_six, last_four, \
         expiry_month, expiry_year, shopper_reference, fingerprint, fingerprint_key_version, ciphertext, \
         data_key_version, holds_cvc, cvc_vault, status, created_at, last_used_at, ended_at, expires_at, \
         retain_until, retention_extended_months) \
         VALUES ($1, $2, $3, $4, 'opaque', $5, $6, $7, $8, $9, $10, NULL, 1, NULL, 1, 0, '', $11, 1, NULL, NULL, \
         NULL, 9000000000000, 0)",
    )
    .bind(&record.merchant_id)
    .bind(&record.token)
    .bind(record.kind.as_str())
    .bind(record.data_type.as_str())
    .bind(&record.brand)
    .bind(&record.first_six)
    .bind(&record.last_four)
    .bind(i64::from(record.expiry_month))
    .bind(i64::from(record.expiry_year))
    .bind(&record.shopper_reference)
    .bind(record.status.as_str())
    .execute(pool)
    .await
    .unwrap();
    for (kind, detail) in entries {
        sqlx::query(
            "INSERT INTO journal (merchant_id, token, kind, caller, at, purpose, detail) \
             VALUES ($1, $2, $3, 'test', 1, '', $4)",
        )
        .bind(&record.merchant_id)
        .bind(&record.token)
        .bind(*kind)
        .bind(*detail)
        .execute(pool)
        .await
        .unwrap();
    }
}

async fn events_carry_their_tokens_facts_before_and_after_the_upgrade(
    url: &str,
    database: &str,
    migrations: &str,
    before: i64,
) {
    // The schema as it was before 0006, with events written by its trigger.
    sqlx::any::install_default_drivers();
    let pool = sqlx::any::AnyPoolOptions::new()
        .max_connections(1)
        .connect(url)
        .await
        .unwrap();
    let mut old = Migrator::new(Path::new(env!("CARGO_MANIFEST_DIR")).join(migrations))
        .await
        .unwrap();
    old.migrations = old
        .migrations
        .iter()
        .filter(|migration| migration.version <= before)
        .cloned()
        .collect::<Vec<_>>()
        .into();
    assert_eq!(old.migrations.last().unwrap().version, before);
    old.run(&pool).await.unwrap();
    // Confirmed (active) by the time the upgrade runs.
    let contract = TokenRecord {
        status: TokenStatus::Active,
        ..provisional_record("tok_contract")
    };
    let bank = bank_record("tok_bank");
    let plain = card_record("m1", "tok_plain");
    write_as_before(
        &pool,
        &contract,
        &[
            ("TK", "PROVISIONAL"),
            ("CONFIRM", "RECURRING_CONTRACT payment_reference=psp_ref-1 a=b"),
        ],
    )
    .await;
    write_as_before(&pool, &bank, &[("TK", ""), ("DT", ""), ("DL", "")]).await;
    write_as_before(&pool, &plain, &[("TK", ""), ("CONFIRM", "RECURRING_CONTRACT")]).await;
    pool.close().await;

    // The upgrade fills in the stored events.
    let store = Store::open(database).await.unwrap();
    let upgraded: Vec<Facts> = store
        .events_after("m1", 0, 100)
        .await
        .unwrap()
        .iter()
        .map(facts)
        .collect();
    assert_eq!(
        upgraded,
        vec![
            expected(&contract, "TOKEN_CREATED", ""),
            expected(&contract, "TOKEN_CONFIRMED", "psp_ref-1 a=b"),
            expected(&bank, "TOKEN_CREATED", ""),
            expected(&bank, "TOKEN_DELETED", ""),
            expected(&plain, "TOKEN_CREATED", ""),
            expected(&plain, "TOKEN_CONFIRMED", ""),
        ]
    );

    // New events get the facts from the trigger: a bulk insert and a confirmation through the
    // group-commit writer, an expiry by the sweeper, a block by the retry guard's report.
    let fresh = provisional_record("tok_fresh");
    let journal: Journal = (&journal_entry(&fresh.token, JournalKind::Tokenize, 2)).into();
    assert_eq!(
        store.insert_tokens(vec![(fresh.clone(), journal)]).await.unwrap(),
        vec![true]
    );
    let confirmation = JournalEntry {
        detail: "RECURRING_CONTRACT payment_reference=psp-2",
        payment_reference: "psp-2",
        ..journal_entry(&fresh.token, JournalKind::Confirm, 3)
    };
    store
        .transition(&CONFIRMATION, &confirmation)
        .await
        .unwrap()
        .unwrap();
    // A payment reference on any other kind of entry is not an event's business.
    let deletion = JournalEntry {
        payment_reference: "not-on-a-deletion",
        ..journal_entry(&contract.token, JournalKind::Delete, 4)
    };
    store.transition(&DELETION, &deletion).await.unwrap().unwrap();
    let due = support::due_record(1);
    let journal: Journal = (&journal_entry(&due.token, JournalKind::Tokenize, 5)).into();
    store.insert_tokens(vec![(due.clone(), journal)]).await.unwrap();
    let swept = store.sweep(1_000, 10, "tessera/sweeper").await.unwrap();
    assert_eq!(swept.len(), 1, "{swept:?}");
    // A block is about a card: its events name the token whose report caused it.
    store
        .report_authorization(
            Report {
                merchant_id: "m1".into(),
                agreement: "acq-1".into(),
                fingerprint: vec![7; 32],
                token: fresh.token.clone(),
                outcome: Outcome::DoNotRetry,
                at: 6,
                caller: "test".into(),
                rule: None,
                do_not_retry_ms: 1_000,
            },
            None,
        )
        .await
        .unwrap();
    assert_eq!(store.expire_blocks(2_000, "tessera/sweeper").await.unwrap(), 1);
    let after = store.events_after("m1", 6, 100).await.unwrap();
    assert_eq!(
        after.iter().map(facts).collect::<Vec<_>>(),
        vec![
            expected(&fresh, "TOKEN_CREATED", ""),
            expected(&fresh, "TOKEN_CONFIRMED", "psp-2"),
            expected(&contract, "TOKEN_DELETED", ""),
            expected(&due, "TOKEN_CREATED", ""),
            expected(&due, "TOKEN_EXPIRED", ""),
            expected(&fresh, "CARD_BLOCKED", ""),
            expected(&fresh, "CARD_UNBLOCKED", ""),
        ]
    );
    assert!(
        after.windows(2).all(|pair| pair[1].seq == pair[0].seq + 1) && after[0].seq == 7,
        "numbers still run on without a gap: {after:?}"
    );
}
