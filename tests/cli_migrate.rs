//! `tessera migrate --database URL_OR_PATH` applies the gateway's migrations and exits, on
//! SQLite and on PostgreSQL: the schema is there afterwards, a second run changes nothing, and
//! a gateway started on the migrated database serves at once.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use common::requests::{detokenize, revealed_number, tokenize_card};
use common::{
    database_pool, gateway_channel, run_tessera, try_tessera, Backend, Stack, StackOptions, TestDatabase,
};
use tessera_api::v1::tokenization_client::TokenizationClient;

const TABLES: [&str; 4] = ["job_leases", "journal", "merchant_keys", "tokens"];

/// The tables the migrated database holds, and how many migrations it records as applied.
async fn schema(stack_or_url: &str, backend: Backend) -> (Vec<String>, i64) {
    sqlx::any::install_default_drivers();
    let pool = sqlx::AnyPool::connect(stack_or_url).await.unwrap();
    let query = match backend {
        Backend::Sqlite => "SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name",
        Backend::Postgres => "SELECT tablename::text FROM pg_tables WHERE schemaname = 'public' ORDER BY 1",
    };
    let tables: Vec<String> = sqlx::query_scalar(query).fetch_all(&pool).await.unwrap();
    let applied: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM _sqlx_migrations WHERE success")
        .fetch_one(&pool)
        .await
        .unwrap();
    pool.close().await;
    (tables, applied)
}

async fn migrate_creates_the_schema_once_and_the_gateway_starts_on_it(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    // Declared before the stack, so the stack (and its gateway) goes first on drop.
    let postgres = (backend == Backend::Postgres).then(TestDatabase::create);
    let (database, url) = match &postgres {
        Some(postgres) => (postgres.url(), postgres.url()),
        None => {
            let path = dir.path().join("tessera.db").to_str().unwrap().to_owned();
            (path.clone(), format!("sqlite://{path}"))
        }
    };

    let output = run_tessera(["migrate", "--database", &database]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains("migrated"), "{stdout}");
    assert!(
        !stdout.contains(&database) || backend == Backend::Sqlite,
        "the URL is not echoed: {stdout}"
    );
    let (tables, applied) = schema(&url, backend).await;
    for table in TABLES {
        assert!(tables.iter().any(|t| t == table), "{table} missing: {tables:?}");
    }
    assert!(applied >= 1);

    // Again: nothing to do, nothing changes.
    run_tessera(["migrate", "--database", &database]);
    assert_eq!(schema(&url, backend).await, (tables, applied));

    // A gateway on the migrated database serves at once.
    let stack = Stack::start_with(StackOptions {
        database: Some(database.clone()),
        ..StackOptions::default()
    });
    assert_eq!(stack.backend(), backend);
    let mut client = TokenizationClient::new(gateway_channel(&stack, "dev-client").await);
    let token = client
        .tokenize(tokenize_card("m_migrated", "4111111111111111"))
        .await
        .unwrap()
        .into_inner()
        .token
        .unwrap()
        .token;
    let revealed = client
        .detokenize(detokenize("m_migrated", &token))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(revealed_number(&revealed), "4111111111111111");
    let pool = database_pool(&stack).await;
    let stored: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM tokens")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(stored, 1);
    pool.close().await;
}

backend_tests!(migrate_creates_the_schema_once_and_the_gateway_starts_on_it);

#[test]
fn migrate_reports_a_database_it_cannot_open() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-such-directory").join("tessera.db");
    let output = try_tessera(["migrate", "--database", missing.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "migrated a database it cannot create");
    assert!(stderr.contains("cannot open the database"), "{stderr}");
    assert!(!missing.exists());
}
