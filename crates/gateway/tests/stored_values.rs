//! Statuses, kinds, data types, formats and journal kinds are stored as text and read back as
//! enums: every known text reads back as itself, and text the gateway does not know (a row
//! written by something else, or by a newer version) is a storage error, never a silent
//! default such as "active".
//!
//! On SQLite, and on PostgreSQL when a server runs at 127.0.0.1:5432 (see support/mod.rs).
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

mod support;

use support::PostgresDatabase;
use tessera_gateway::storage::Store;

/// A token row of merchant `m1` with these stored texts, written past the store.
async fn write_token(
    pool: &sqlx::AnyPool,
    token: &str,
    (kind, data_type, format, status): (&str, &str, &str, &str),
) {
    sqlx::query(
        "INSERT INTO tokens (merchant_id, token, kind, data_type, format, brand, first_six, last_four, \
         expiry_month, expiry_year, shopper_reference, fingerprint, fingerprint_key_version, ciphertext, \
         data_key_version, holds_cvc, cvc_vault, status, created_at, last_used_at, ended_at, expires_at, \
         retain_until, retention_extended_months) \
         VALUES ('m1', $1, $2, $3, $4, 'VISA', '411111', '1111', 12, 2031, 'shopper-1', NULL, 1, NULL, 1, 0, '', \
         $5, 1, NULL, NULL, NULL, 9000000000000, 0)",
    )
    .bind(token)
    .bind(kind)
    .bind(data_type)
    .bind(format)
    .bind(status)
    .execute(pool)
    .await
    .unwrap();
}

/// A journal entry of `m1`'s `token` of this kind, written past the store.
async fn write_journal(pool: &sqlx::AnyPool, token: &str, kind: &str) {
    sqlx::query(
        "INSERT INTO journal (merchant_id, token, kind, caller, at, purpose, detail, payment_reference) \
         VALUES ('m1', $1, $2, 'test', 1, '', '', '')",
    )
    .bind(token)
    .bind(kind)
    .execute(pool)
    .await
    .unwrap();
}

async fn unknown_stored_values_are_errors(database: &str) {
    let store = Store::open(database).await.unwrap();
    let pool = support::raw_pool(database).await;

    // Every known text reads back as itself.
    let known = [
        ("tok_known_1", ("card_on_file", "card", "opaque", "active")),
        (
            "tok_known_2",
            ("recurrence", "bank_account", "format_preserving", "provisional"),
        ),
        ("tok_known_3", ("single_use", "email", "opaque", "consumed")),
        ("tok_known_4", ("card_on_file", "phone", "opaque", "deleted")),
        ("tok_known_5", ("single_use", "cvc", "opaque", "expired")),
    ];
    for (token, texts) in known {
        write_token(&pool, token, texts).await;
        let record = store.token("m1", token).await.unwrap().unwrap();
        assert_eq!(
            (
                record.kind.as_str(),
                record.data_type.to_string(),
                record.format.to_string(),
                record.status.to_string()
            ),
            (
                texts.0,
                texts.1.to_owned(),
                texts.2.to_owned(),
                texts.3.to_owned()
            ),
            "{token}"
        );
    }
    let journal_kinds = [
        "TK", "DT", "DL", "CONFIRM", "EXTEND", "EXPIRE", "AUTH", "BLOCK", "UNBLOCK",
    ];
    for kind in journal_kinds {
        write_journal(&pool, "tok_known_1", kind).await;
    }
    let history = store.history("m1", "tok_known_1").await.unwrap();
    let read: Vec<String> = history.iter().map(|entry| entry.kind.to_string()).collect();
    assert_eq!(read, journal_kinds);

    // One unknown text per column: the record cannot be read.
    let unknown = [
        ("tok_bad_kind", ("gift_card", "card", "opaque", "active")),
        (
            "tok_bad_data_type",
            ("card_on_file", "passport", "opaque", "active"),
        ),
        ("tok_bad_format", ("card_on_file", "card", "emoji", "active")),
        ("tok_bad_status", ("card_on_file", "card", "opaque", "archived")),
    ];
    for (token, texts) in unknown {
        write_token(&pool, token, texts).await;
        let read = store.token("m1", token).await;
        assert!(read.is_err(), "{token}: {read:?}");
        let listed = store.list_usable("m1", "shopper-1", 2, None, 100).await;
        // A shopper's list reads only active card-on-file and recurrence tokens.
        if texts.0 == "card_on_file" && texts.3 == "active" {
            assert!(listed.is_err(), "{token}: listed {listed:?}");
        }
        sqlx::query("DELETE FROM tokens WHERE token = $1")
            .bind(token)
            .execute(&pool)
            .await
            .unwrap();
    }

    // An unknown journal kind: the history cannot be read.
    write_journal(&pool, "tok_known_2", "REFUND").await;
    let history = store.history("m1", "tok_known_2").await;
    assert!(history.is_err(), "{history:?}");
    pool.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_stored_values_are_errors_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tessera.db");
    unknown_stored_values_are_errors(path.to_str().unwrap()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_stored_values_are_errors_postgres() {
    let Some(database) = PostgresDatabase::create("unknown_stored_values_are_errors_postgres").await else {
        return;
    };
    unknown_stored_values_are_errors(&database.url()).await;
    database.drop().await;
}
