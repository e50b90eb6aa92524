//! What the gateway's storage tests (and its benches, by `#[path]`) share: token records and
//! a fresh PostgreSQL database per test.
// Each test file uses its own part of this module.
#![allow(dead_code)]

use std::io::Write as _;
use std::time::Duration;

use sqlx::{Connection as _, Executor as _};
use tessera_gateway::purpose::Kind;
use tessera_gateway::storage::{DataType, JournalEntry, JournalKind, TokenFormat, TokenRecord, TokenStatus};

/// An active card-on-file token of a Visa card expiring in December 2031, retained for good.
pub fn card_record(merchant_id: &str, token: &str) -> TokenRecord {
    TokenRecord {
        merchant_id: merchant_id.into(),
        token: token.into(),
        kind: Kind::CardOnFile,
        data_type: DataType::Card,
        format: TokenFormat::Opaque,
        brand: "VISA".into(),
        first_six: "411111".into(),
        last_four: "1111".into(),
        expiry_month: 12,
        expiry_year: 2031,
        shopper_reference: "shopper-1".into(),
        fingerprint: Some(vec![7; 32]),
        fingerprint_key_version: 1,
        ciphertext: Some(vec![9; 96]),
        data_key_version: 1,
        holds_cvc: false,
        cvc_vault: String::new(),
        status: TokenStatus::Active,
        created_at: 1,
        last_used_at: None,
        ended_at: None,
        expires_at: None,
        retain_until: i64::MAX,
        retention_extended_months: 0,
    }
}

/// An active card-on-file token of merchant `m1` whose card expired in January 2020 and whose
/// retention ended at 1,000 ms: due for the sweeper.
pub fn due_record(index: usize) -> TokenRecord {
    TokenRecord {
        expiry_month: 1,
        expiry_year: 2020,
        created_at: 0,
        retain_until: 1_000,
        ..card_record("m1", &format!("tok_{index:026}"))
    }
}

/// A journal entry of merchant `m1` by caller `test`, with no purpose or detail.
pub fn journal_entry<'a>(token: &'a str, kind: JournalKind, at: i64) -> JournalEntry<'a> {
    JournalEntry {
        merchant_id: "m1",
        token,
        kind,
        caller: "test",
        at,
        purpose: "",
        detail: "",
        payment_reference: "",
    }
}

/// Maintenance connections tried in order (see tests/common/mod.rs, which this mirrors).
const POSTGRES_MAINTENANCE_URLS: [&str; 2] = [
    "postgres://postgres@127.0.0.1:5432/test?sslmode=disable",
    "postgres://postgres@127.0.0.1:5432/postgres?sslmode=disable",
];

/// A fresh PostgreSQL database for one test, named like the end-to-end harness's
/// (`tessera_t_<pid>_...`) so a run killed before `drop` leaves nothing the harness's stale
/// sweep would not remove.
pub struct PostgresDatabase {
    maintenance: &'static str,
    name: String,
}

impl PostgresDatabase {
    /// `None` (after a `SKIPPED` notice) when no server answers, unless
    /// `TESSERA_REQUIRE_POSTGRES=1`, which makes that a failure.
    pub async fn create(test: &str) -> Option<Self> {
        for maintenance in POSTGRES_MAINTENANCE_URLS {
            let Ok(Ok(mut connection)) =
                tokio::time::timeout(Duration::from_secs(5), sqlx::PgConnection::connect(maintenance)).await
            else {
                continue;
            };
            let name = format!("tessera_t_{}_{test}", std::process::id());
            connection
                .execute(format!("CREATE DATABASE \"{name}\"").as_str())
                .await
                .unwrap();
            connection.close().await.unwrap();
            return Some(Self { maintenance, name });
        }
        assert!(
            std::env::var("TESSERA_REQUIRE_POSTGRES").as_deref() != Ok("1"),
            "no PostgreSQL at 127.0.0.1:5432 but TESSERA_REQUIRE_POSTGRES=1 requires it ({test})"
        );
        // Straight to stderr, past the test harness's capture, so the skip is seen.
        let _ = writeln!(
            std::io::stderr(),
            "SKIPPED (no PostgreSQL at 127.0.0.1:5432): {test}"
        );
        None
    }

    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:5432/{}?sslmode=disable", self.name)
    }

    pub async fn drop(self) {
        let mut connection = sqlx::PgConnection::connect(self.maintenance).await.unwrap();
        connection
            .execute(format!("DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)", self.name).as_str())
            .await
            .unwrap();
        connection.close().await.unwrap();
    }
}

/// A one-connection pool on `database` (an SQLite path or a `postgres://` URL) that bypasses
/// the store, for reading or planting rows directly.
pub async fn raw_pool(database: &str) -> sqlx::AnyPool {
    sqlx::any::install_default_drivers();
    let url = if database.starts_with("postgres") {
        database.to_owned()
    } else {
        format!("sqlite://{database}")
    };
    sqlx::any::AnyPoolOptions::new()
        .max_connections(1)
        .connect(&url)
        .await
        .unwrap()
}
