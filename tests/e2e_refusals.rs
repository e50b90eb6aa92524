//! Every refusal of the first slice, through the real processes: bad input gets the right
//! code, an ErrorInfo reason and a message without the card number, and stores nothing;
//! callers without a certificate, from another CA, or without the permission are refused on
//! both hops; the vault will not start without TLS and client authentication. The gateway's
//! refusals are tested on SQLite and on PostgreSQL; the vault's own do not involve a database.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use std::fs;
use std::process::Command;

use common::requests::detokenize;
use common::{
    binaries, database_pool, gateway_channel, try_channel, vault_channel, Backend, CallerPolicy, Pki, Stack,
    StackOptions,
};
use tessera_api::error_details::decode_error_info;
use tessera_api::v1::tokenization_client::TokenizationClient;
use tessera_api::v1::{tokenize_request, Card, GetTokenRequest, TokenizeRequest};
use tessera_api::vault::vault_client::VaultClient;
use tessera_api::vault::{ProtectItem, ProtectRequest, StatusRequest};
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};
use tonic::Code;

fn reason(status: &tonic::Status) -> String {
    decode_error_info(status.details())
        .map(|info| info.reason)
        .unwrap_or_default()
}

/// Rows in the gateway's tables: (tokens, merchant keys, journal).
async fn row_counts(stack: &Stack) -> (i64, i64, i64) {
    let pool = database_pool(stack).await;
    let count = |table: &'static str| {
        let pool = pool.clone();
        async move {
            sqlx::query_scalar::<_, i64>(&format!("SELECT COUNT(*) FROM {table}"))
                .fetch_one(&pool)
                .await
                .unwrap()
        }
    };
    (
        count("tokens").await,
        count("merchant_keys").await,
        count("journal").await,
    )
}

fn card(number: &str, month: u32, year: u32) -> Option<tokenize_request::Data> {
    Some(tokenize_request::Data::Card(Card {
        number: number.into(),
        expiry_month: month,
        expiry_year: year,
        holder_name: "Ada".into(),
    }))
}

async fn bad_input_is_refused_with_a_reason_and_stores_nothing(backend: Backend) {
    let stack = Stack::start_on(backend);
    let mut client = TokenizationClient::new(gateway_channel(&stack, "dev-client").await);
    let cases: Vec<(&str, TokenizeRequest, Code, &str)> = vec![
        (
            "non-digits",
            TokenizeRequest {
                merchant_id: "m1".into(),
                data: card("4111-1111-1111-111x", 12, 2031),
                ..Default::default()
            },
            Code::InvalidArgument,
            "INVALID_CARD_NUMBER",
        ),
        (
            "too short",
            TokenizeRequest {
                merchant_id: "m1".into(),
                data: card("41111111111", 12, 2031),
                ..Default::default()
            },
            Code::InvalidArgument,
            "INVALID_CARD_NUMBER",
        ),
        (
            "too long",
            TokenizeRequest {
                merchant_id: "m1".into(),
                data: card("41111111111111111111", 12, 2031),
                ..Default::default()
            },
            Code::InvalidArgument,
            "INVALID_CARD_NUMBER",
        ),
        (
            "luhn",
            TokenizeRequest {
                merchant_id: "m1".into(),
                data: card("4111111111111112", 12, 2031),
                ..Default::default()
            },
            Code::InvalidArgument,
            "INVALID_CARD_NUMBER",
        ),
        (
            "expired",
            TokenizeRequest {
                merchant_id: "m1".into(),
                data: card("4111111111111111", 1, 2020),
                ..Default::default()
            },
            Code::InvalidArgument,
            "CARD_EXPIRED",
        ),
        (
            "month 13",
            TokenizeRequest {
                merchant_id: "m1".into(),
                data: card("4111111111111111", 13, 2031),
                ..Default::default()
            },
            Code::InvalidArgument,
            "INVALID_EXPIRY",
        ),
        (
            "year 99",
            TokenizeRequest {
                merchant_id: "m1".into(),
                data: card("4111111111111111", 1, 99),
                ..Default::default()
            },
            Code::InvalidArgument,
            "INVALID_EXPIRY",
        ),
        (
            "no card",
            TokenizeRequest {
                merchant_id: "m1".into(),
                data: None,
                ..Default::default()
            },
            Code::InvalidArgument,
            "MISSING_FIELD",
        ),
        (
            "no number",
            TokenizeRequest {
                merchant_id: "m1".into(),
                data: card("", 12, 2031),
                ..Default::default()
            },
            Code::InvalidArgument,
            "MISSING_FIELD",
        ),
        (
            "no merchant",
            TokenizeRequest {
                merchant_id: String::new(),
                data: card("4111111111111111", 12, 2031),
                ..Default::default()
            },
            Code::InvalidArgument,
            "MISSING_FIELD",
        ),
        (
            "bad shopper",
            TokenizeRequest {
                merchant_id: "m1".into(),
                data: card("4111111111111111", 12, 2031),
                shopper_reference: "ada@example.com".into(),
                ..Default::default()
            },
            Code::InvalidArgument,
            "INVALID_SHOPPER_REFERENCE",
        ),
    ];
    for (name, request, code, expected_reason) in cases {
        let number = match &request.data {
            Some(tokenize_request::Data::Card(card)) => card.number.clone(),
            _ => String::new(),
        };
        let status = client.tokenize(request).await.expect_err(name);
        assert_eq!(status.code(), code, "{name}: {status:?}");
        assert_eq!(reason(&status), expected_reason, "{name}");
        let digits: String = number.chars().filter(char::is_ascii_digit).collect();
        if digits.len() >= 6 {
            assert!(
                !status.message().contains(&digits[..6]),
                "{name}: message echoes card data: {}",
                status.message()
            );
            assert!(
                !format!("{status:?}").contains(&digits),
                "{name}: status echoes card data"
            );
        }
    }
    let unknown = client
        .detokenize(detokenize("m1", "tok_aaaaaaaaaaaaaaaaaaaaaaaaaa"))
        .await
        .unwrap_err();
    assert_eq!(
        (unknown.code(), reason(&unknown).as_str()),
        (Code::NotFound, "TOKEN_NOT_FOUND")
    );
    let malformed = client
        .get_token(GetTokenRequest {
            merchant_id: "m1".into(),
            token: "not a token!".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(
        (malformed.code(), reason(&malformed).as_str()),
        (Code::InvalidArgument, "INVALID_TOKEN")
    );

    assert_eq!(
        row_counts(&stack).await,
        (0, 0, 0),
        "refused requests must store nothing"
    );
}

async fn gateway_refuses_callers_without_a_valid_allowed_certificate(backend: Backend) {
    let options = StackOptions {
        callers: vec![
            CallerPolicy::all("spiffe://tessera/dev-client"),
            CallerPolicy::new("spiffe://tessera/reader", &["m1"], &["read_metadata"]),
        ],
        backend,
        ..StackOptions::default()
    };
    let stack = Stack::start_with(options);
    let pki = stack.pki();
    pki.client("reader", "spiffe://tessera/reader");
    pki.client("stranger", "spiffe://tessera/stranger");
    let request = || TokenizeRequest {
        merchant_id: "m1".into(),
        data: card("4111111111111111", 12, 2031),
        ..Default::default()
    };

    // No client certificate: the TLS handshake (or the first call on it) fails.
    let anonymous = Endpoint::from_shared(format!("https://{}", stack.gateway_addr()))
        .unwrap()
        .tls_config(
            ClientTlsConfig::new()
                .ca_certificate(Certificate::from_pem(fs::read(pki.ca()).unwrap()))
                .domain_name("tessera-gateway"),
        )
        .unwrap()
        .connect()
        .await;
    if let Ok(channel) = anonymous {
        let refused = TokenizationClient::new(channel).tokenize(request()).await;
        assert!(refused.is_err(), "a caller without a certificate was served");
    }

    // A certificate from another CA.
    let other = Pki::new();
    let foreign = try_channel(
        stack.gateway_addr(),
        "tessera-gateway",
        &pki.ca(),
        &other.cert("dev-client"),
        &other.key("dev-client"),
    )
    .await;
    if let Ok(channel) = foreign {
        let refused = TokenizationClient::new(channel).tokenize(request()).await;
        assert!(refused.is_err(), "a certificate from another CA was accepted");
    }

    // Same CA, identity not configured.
    let mut stranger = TokenizationClient::new(gateway_channel(&stack, "stranger").await);
    let status = stranger.tokenize(request()).await.unwrap_err();
    assert_eq!(
        (status.code(), reason(&status).as_str()),
        (Code::PermissionDenied, "CALLER_NOT_ALLOWED")
    );

    // Configured identity without the permission, or for another merchant.
    let mut reader = TokenizationClient::new(gateway_channel(&stack, "reader").await);
    let status = reader.tokenize(request()).await.unwrap_err();
    assert_eq!(
        (status.code(), reason(&status).as_str()),
        (Code::PermissionDenied, "OPERATION_NOT_ALLOWED")
    );
    let status = reader
        .get_token(GetTokenRequest {
            merchant_id: "m2".into(),
            token: "tok_aaaaaaaaaaaaaaaaaaaaaaaaaa".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(
        (status.code(), reason(&status).as_str()),
        (Code::PermissionDenied, "MERCHANT_NOT_ALLOWED")
    );
    let status = reader
        .detokenize(detokenize("m1", "tok_aaaaaaaaaaaaaaaaaaaaaaaaaa"))
        .await
        .unwrap_err();
    assert_eq!(
        (status.code(), reason(&status).as_str()),
        (Code::PermissionDenied, "OPERATION_NOT_ALLOWED")
    );
}

backend_tests!(
    bad_input_is_refused_with_a_reason_and_stores_nothing,
    gateway_refuses_callers_without_a_valid_allowed_certificate,
);

fn protect_request() -> ProtectRequest {
    ProtectRequest {
        keys: vec![],
        items: vec![ProtectItem {
            merchant_id: "m1".into(),
            data: Some(tessera_api::vault::SecretData {
                data: Some(tessera_api::vault::secret_data::Data::Card(
                    tessera_api::vault::Card {
                        number: "4111111111111111".into(),
                        expiry_month: 12,
                        expiry_year: 2031,
                        holder_name: String::new(),
                    },
                )),
            }),
            format: 0,
            cvc: String::new(),
        }],
    }
}

#[tokio::test]
async fn vault_serves_only_its_allow_list() {
    let stack = Stack::start();
    let pki = stack.pki();

    // The operator may read status, and only status.
    let mut operator = VaultClient::new(vault_channel(&stack, "operator").await);
    let status = operator.status(StatusRequest {}).await.unwrap().into_inner();
    assert_eq!(status.mode, "development");
    assert!(status.master_key_loaded);
    assert_eq!(status.master_key_source, "development key file");
    assert!(status.core_dumps_disabled && status.ptrace_attach_blocked);
    assert!(status.debug_build == cfg!(debug_assertions));
    assert!(status.memory_locked || !status.memory_lock_error.is_empty());
    let refused = operator.protect(protect_request()).await.unwrap_err();
    assert_eq!(
        (refused.code(), reason(&refused).as_str()),
        (Code::PermissionDenied, "METHOD_NOT_ALLOWED")
    );

    // The gateway's identity may not read status.
    let mut gateway = VaultClient::new(vault_channel(&stack, "gateway-client").await);
    let refused = gateway.status(StatusRequest {}).await.unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied);

    // An identity of the right CA that is not in the allow-list.
    let mut dev_client = VaultClient::new(vault_channel(&stack, "dev-client").await);
    let refused = dev_client.protect(protect_request()).await.unwrap_err();
    assert_eq!(
        (refused.code(), reason(&refused).as_str()),
        (Code::PermissionDenied, "CALLER_NOT_ALLOWED")
    );

    // Another CA, or no certificate at all.
    let other = Pki::new();
    if let Ok(channel) = try_channel(
        stack.vault_addr(),
        "tessera-vault",
        &pki.ca(),
        &other.cert("gateway-client"),
        &other.key("gateway-client"),
    )
    .await
    {
        assert!(
            VaultClient::new(channel)
                .protect(protect_request())
                .await
                .is_err(),
            "a foreign CA was accepted"
        );
    }
    let anonymous = Endpoint::from_shared(format!("https://{}", stack.vault_addr()))
        .unwrap()
        .tls_config(
            ClientTlsConfig::new()
                .ca_certificate(Certificate::from_pem(fs::read(pki.ca()).unwrap()))
                .domain_name("tessera-vault"),
        )
        .unwrap()
        .connect()
        .await;
    if let Ok(channel) = anonymous {
        assert!(
            VaultClient::new(channel)
                .protect(protect_request())
                .await
                .is_err(),
            "an anonymous caller was served"
        );
    }
    let (vault_log, _) = stack.logs();
    assert!(vault_log.contains("TLS handshake refused"), "{vault_log}");
}

/// Runs the vault binary on `config` and returns (exit success, stderr).
/// Runs a server binary on `config` (written to `dir`) until it exits: whether it exited 0,
/// and what it printed on stderr.
fn run_server(binary: &std::path::Path, dir: &std::path::Path, config: &str) -> (bool, String) {
    let path = dir.join("server.toml");
    fs::write(&path, config).unwrap();
    let output = Command::new(binary).arg("--config").arg(&path).output().unwrap();
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

fn run_vault(dir: &std::path::Path, config: &str) -> (bool, String) {
    run_server(&binaries().vault, dir, config)
}

#[test]
fn vault_refuses_to_start_without_tls_client_auth_or_in_debug_production() {
    let pki = Pki::new();
    let dir = tempfile::tempdir().unwrap();
    let tls = format!(
        "[tls]\ncert = {:?}\nkey = {:?}\nclient_ca = {:?}\n",
        pki.cert("vault"),
        pki.key("vault"),
        pki.ca()
    );
    let rest = format!(
        "[[clients]]\nidentity = \"spiffe://tessera/gateway\"\nrole = \"gateway\"\n\
         [master_key]\nsource = \"development-file\"\npath = {:?}\ncreate_if_missing = true\n",
        dir.path().join("key")
    );

    let (ok, stderr) = run_vault(dir.path(), &format!("listen = \"127.0.0.1:0\"\n{rest}"));
    assert!(!ok && stderr.contains("tls"), "started without TLS: {stderr}");

    let no_client_ca = tls
        .lines()
        .filter(|line| !line.starts_with("client_ca"))
        .collect::<Vec<_>>()
        .join("\n");
    let (ok, stderr) = run_vault(
        dir.path(),
        &format!("listen = \"127.0.0.1:0\"\n{no_client_ca}\n{rest}"),
    );
    assert!(
        !ok && stderr.contains("client_ca"),
        "started without client authentication: {stderr}"
    );

    let (ok, stderr) = run_vault(
        dir.path(),
        &format!(
            "listen = \"127.0.0.1:0\"\n{tls}{}",
            &rest[rest.find("[master_key]").unwrap()..]
        ),
    );
    assert!(
        !ok && stderr.contains("clients"),
        "started with an empty allow-list: {stderr}"
    );

    if cfg!(debug_assertions) {
        let (ok, stderr) = run_vault(
            dir.path(),
            &format!("listen = \"127.0.0.1:0\"\nmode = \"production\"\n{tls}{rest}"),
        );
        assert!(
            !ok && stderr.contains("debug build"),
            "a debug build ran in production mode: {stderr}"
        );
    }
    assert!(
        !dir.path().join("key").exists(),
        "a refused start must not create a master key"
    );
}

fn run_gateway(dir: &std::path::Path, config: &str) -> (bool, String) {
    run_server(&binaries().gateway, dir, config)
}

#[test]
fn production_gateway_refuses_test_and_benchmark_switches() {
    let pki = Pki::new();
    let dir = tempfile::tempdir().unwrap();
    let database = dir.path().join("gateway.db");
    let base = format!(
        "listen = \"127.0.0.1:0\"\nmode = \"production\"\ndatabase = {database:?}\n\
         [tls]\ncert = {:?}\nkey = {:?}\nclient_ca = {:?}\n\
         [vault]\nendpoints = [\"https://127.0.0.1:1\"]\nserver_name = \"tessera-vault\"\nca = {:?}\n\
         client_cert = {:?}\nclient_key = {:?}\n",
        pki.cert("gateway"),
        pki.key("gateway"),
        pki.ca(),
        pki.ca(),
        pki.cert("gateway-client"),
        pki.key("gateway-client"),
    );
    let floor = base.replacen("database =", "benchmark_floor = true\ndatabase =", 1);
    let (ok, stderr) = run_gateway(dir.path(), &floor);
    assert!(
        !ok && stderr.contains("benchmark_floor is for benchmarks and is refused in production mode"),
        "{stderr}"
    );
    let clock = format!(
        "{base}[testing]\nclock_offset_file = {:?}\n",
        dir.path().join("offset")
    );
    let (ok, stderr) = run_gateway(dir.path(), &clock);
    assert!(
        !ok && stderr.contains("clock_offset_file is for tests and is refused in production mode"),
        "{stderr}"
    );
    if cfg!(debug_assertions) {
        let (ok, stderr) = run_gateway(dir.path(), &base);
        assert!(
            !ok && stderr.contains("debug build"),
            "a debug build ran in production mode: {stderr}"
        );
    }
    assert!(!database.exists(), "a refused start must not create the database");
}
