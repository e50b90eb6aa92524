//! The payment flows of issue 4, one test per flow, through the real processes: standalone
//! tokenization, provisional tokens confirmed or discarded, one-click listing, purposes per
//! token kind and caller, single-use tokens, CVCs, deletion, retention, non-card data and the
//! journal. Time-dependent rules move the gateway's clock through its offset file. Every flow
//! runs on SQLite and on PostgreSQL (`NAME::sqlite`, `NAME::postgres`).
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::requests::{
    card, detokenize, detokenize_for, one_click, one_off, revealed_number, subscription, tokenize_card,
    unscheduled, SHOPPER,
};
use common::{database_contents, database_pool, gateway_channel, Backend, CallerPolicy, Stack, StackOptions};
use prost::Message as _;
use tessera_api::error_details::decode_error_info;
use tessera_api::v1::tokenization_client::TokenizationClient;
use tessera_api::v1::{
    detokenize_response, tokenize_request, AuthorizationOutcome, BankAccount, CardBrand, ConfirmTokenRequest,
    Contact, DataType, DeleteTokenRequest, DetokenizeRequest, EventType, ExtendRetentionRequest,
    GetTokenHistoryRequest, GetTokenRequest, ListTokensRequest, Purpose, ReportAuthorizationRequest,
    SubscribeEventsRequest, Token, TokenEvent, TokenFormat, TokenKind, TokenStatus, TokenizeRequest,
    TransactionType,
};
use tonic::transport::Channel;
use tonic::Code;

type Client = TokenizationClient<Channel>;

const DAY_MS: i64 = 86_400_000;

fn reason(status: &tonic::Status) -> String {
    decode_error_info(status.details())
        .map(|info| info.reason)
        .unwrap_or_default()
}

fn refusal(result: Result<impl std::fmt::Debug, tonic::Status>) -> (Code, String) {
    let status = result.expect_err("expected a refusal");
    (status.code(), reason(&status))
}

/// A stack whose gateway reads its clock offset from a file and sweeps every second; a
/// second caller may detokenize only for cardholder-initiated payments.
struct FlowStack {
    stack: Stack,
    clock_file: PathBuf,
}

impl FlowStack {
    fn start(backend: Backend) -> Self {
        let clock_dir = tempfile::tempdir().unwrap().keep();
        let clock_file = clock_dir.join("clock-offset-ms");
        std::fs::write(&clock_file, "0").unwrap();
        let mut options = StackOptions {
            backend,
            ..StackOptions::default()
        };
        options.callers.push(CallerPolicy::new(
            "spiffe://tessera/checkout",
            &["*"],
            &[
                "tokenize",
                "read_metadata",
                "list",
                "detokenize",
                "delete",
                "extend",
            ],
        ));
        options.callers[0] = CallerPolicy::new(
            "spiffe://tessera/dev-client",
            &["*"],
            &[
                "tokenize",
                "read_metadata",
                "list",
                "detokenize",
                "detokenize_merchant_initiated",
                "delete",
                "extend",
            ],
        );
        let testing: toml::Table = toml::from_str(&format!("clock_offset_file = {:?}", clock_file)).unwrap();
        options
            .gateway_extra
            .insert("testing".into(), toml::Value::Table(testing));
        let lifecycle: toml::Table =
            toml::from_str("sweep_interval_secs = 1\nprovisional_ttl_secs = 3600").unwrap();
        options
            .gateway_extra
            .insert("lifecycle".into(), toml::Value::Table(lifecycle));
        let stack = Stack::start_with(options);
        stack.pki().client("checkout", "spiffe://tessera/checkout");
        Self { stack, clock_file }
    }

    async fn client(&self) -> Client {
        TokenizationClient::new(gateway_channel(&self.stack, "dev-client").await)
    }

    async fn checkout_client(&self) -> Client {
        TokenizationClient::new(gateway_channel(&self.stack, "checkout").await)
    }

    /// Moves the gateway's clock to `offset_ms` after real time and waits until it took effect
    /// and the sweeper (every second) ran at least once on the new time.
    async fn set_clock(&self, offset_ms: i64) {
        std::fs::write(&self.clock_file, offset_ms.to_string()).unwrap();
        tokio::time::sleep(Duration::from_millis(2500)).await;
    }
}

fn now_ms() -> i64 {
    i64::try_from(SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis()).unwrap()
}

async fn tokenize(client: &mut Client, request: TokenizeRequest) -> Token {
    client
        .tokenize(request)
        .await
        .unwrap()
        .into_inner()
        .token
        .unwrap()
}

fn with_kind(mut request: TokenizeRequest, kind: TokenKind) -> TokenizeRequest {
    request.kind = kind as i32;
    request
}

async fn history(client: &mut Client, merchant: &str, token: &str) -> Vec<(TransactionType, String, String)> {
    client
        .get_token_history(GetTokenHistoryRequest {
            merchant_id: merchant.into(),
            token: token.into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .entries
        .into_iter()
        .map(|entry| (entry.r#type(), entry.caller, entry.detail))
        .collect()
}

async fn get(client: &mut Client, merchant: &str, token: &str) -> Result<Token, tonic::Status> {
    client
        .get_token(GetTokenRequest {
            merchant_id: merchant.into(),
            token: token.into(),
        })
        .await
        .map(tonic::Response::into_inner)
}

async fn flow_1_standalone_tokenization_is_journalled_tk(backend: Backend) {
    let flows = FlowStack::start(backend);
    let mut client = flows.client().await;
    let token = tokenize(&mut client, tokenize_card("m1", "4111111111111111")).await;
    assert_eq!(token.kind, TokenKind::CardOnFile as i32);
    assert_eq!(token.data_type, DataType::Card as i32);
    let entries = history(&mut client, "m1", &token.token).await;
    assert_eq!(
        entries,
        vec![(
            TransactionType::Tokenize,
            "spiffe://tessera/dev-client".into(),
            String::new()
        )]
    );
}

async fn flow_2_provisional_tokens_are_confirmed_discarded_or_time_out(backend: Backend) {
    let flows = FlowStack::start(backend);
    let mut client = flows.client().await;
    let provisional = |number: &str| {
        let mut request = tokenize_card("m1", number);
        request.provisional = true;
        request
    };

    let confirmed = tokenize(&mut client, provisional("4111111111111111")).await;
    assert_eq!(confirmed.status, TokenStatus::Provisional as i32);
    assert!(confirmed.expires_at.is_some());
    assert_eq!(
        refusal(client.detokenize(detokenize("m1", &confirmed.token)).await),
        (Code::FailedPrecondition, "TOKEN_PROVISIONAL".into())
    );
    let listed = list(&mut client, "m1", SHOPPER).await;
    assert!(listed.is_empty(), "provisional tokens are not listed");
    let active = client
        .confirm_token(ConfirmTokenRequest {
            merchant_id: "m1".into(),
            token: confirmed.token.clone(),
            payment_reference: "psp-ref-1".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(active.status, TokenStatus::Active as i32);
    assert!(active.expires_at.is_none());
    let revealed = client
        .detokenize(detokenize("m1", &confirmed.token))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(revealed_number(&revealed), "4111111111111111");
    let entries = history(&mut client, "m1", &confirmed.token).await;
    assert_eq!(entries[1].0, TransactionType::Confirm);
    assert!(entries[1].2.starts_with("RECURRING_CONTRACT"), "{entries:?}");
    assert_eq!(
        refusal(
            client
                .confirm_token(ConfirmTokenRequest {
                    merchant_id: "m1".into(),
                    token: confirmed.token.clone(),
                    payment_reference: String::new(),
                    ..Default::default()
                })
                .await
        ),
        (Code::FailedPrecondition, "TOKEN_NOT_PROVISIONAL".into())
    );

    // A refused payment discards its provisional token explicitly.
    let refused = tokenize(&mut client, provisional("5555555555554444")).await;
    client
        .delete_token(DeleteTokenRequest {
            merchant_id: "m1".into(),
            token: refused.token.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
    let entries = history(&mut client, "m1", &refused.token).await;
    assert_eq!(entries.last().unwrap().0, TransactionType::Delete);
    assert_eq!(entries.last().unwrap().2, "DISCARDED");

    // Or automatically, when nobody confirms it within the hour.
    let forgotten = tokenize(&mut client, provisional("378282246310005")).await;
    flows.set_clock(61 * 60 * 1000).await;
    assert_eq!(
        get(&mut client, "m1", &forgotten.token).await.unwrap().status,
        TokenStatus::Expired as i32
    );
    let entries = history(&mut client, "m1", &forgotten.token).await;
    assert_eq!(
        entries.last().unwrap(),
        &(
            TransactionType::Expire,
            "tessera/sweeper".to_owned(),
            "PROVISIONAL_TIMEOUT".to_owned()
        )
    );
    assert_eq!(
        refusal(
            client
                .confirm_token(ConfirmTokenRequest {
                    merchant_id: "m1".into(),
                    token: forgotten.token.clone(),
                    payment_reference: String::new(),
                    ..Default::default()
                })
                .await
        ),
        (Code::NotFound, "TOKEN_EXPIRED".into())
    );
    // The confirmed token was not touched by the sweep.
    assert_eq!(
        get(&mut client, "m1", &confirmed.token).await.unwrap().status,
        TokenStatus::Active as i32
    );
}

async fn list(client: &mut Client, merchant: &str, shopper: &str) -> Vec<Token> {
    client
        .list_tokens(ListTokensRequest {
            merchant_id: merchant.into(),
            shopper_reference: shopper.into(),
            page_size: 0,
            page_token: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .tokens
}

async fn flow_3_one_click_lists_usable_tokens_newest_first_paginated(backend: Backend) {
    let flows = FlowStack::start(backend);
    let mut client = flows.client().await;
    let mut expected = Vec::new();
    for number in ["4111111111111111", "5555555555554444", "378282246310005"] {
        expected.push(tokenize(&mut client, tokenize_card("m1", number)).await.token);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    expected.push(
        tokenize(
            &mut client,
            with_kind(tokenize_card("m1", "6011111111111117"), TokenKind::Recurrence),
        )
        .await
        .token,
    );
    // Not listed: another shopper, another merchant, deleted, provisional, single-use.
    let mut other_shopper = tokenize_card("m1", "4111111111111111");
    other_shopper.shopper_reference = "shopper-2".into();
    tokenize(&mut client, other_shopper).await;
    tokenize(&mut client, tokenize_card("m2", "4111111111111111")).await;
    let deleted = tokenize(&mut client, tokenize_card("m1", "3530111333300000")).await;
    client
        .delete_token(DeleteTokenRequest {
            merchant_id: "m1".into(),
            token: deleted.token,
            ..Default::default()
        })
        .await
        .unwrap();
    let mut provisional = tokenize_card("m1", "3530111333300000");
    provisional.provisional = true;
    tokenize(&mut client, provisional).await;
    tokenize(
        &mut client,
        with_kind(tokenize_card("m1", "3530111333300000"), TokenKind::SingleUse),
    )
    .await;

    expected.reverse();
    let mut seen = Vec::new();
    let mut page_token = String::new();
    for _ in 0..5 {
        let page = client
            .list_tokens(ListTokensRequest {
                merchant_id: "m1".into(),
                shopper_reference: SHOPPER.into(),
                page_size: 3,
                page_token: page_token.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        assert!(page.tokens.len() <= 3);
        for token in &page.tokens {
            assert!(!token.last_four.is_empty() && token.brand != 0 && token.expiry_year == 2031);
        }
        seen.extend(page.tokens.into_iter().map(|t| t.token));
        if page.next_page_token.is_empty() {
            break;
        }
        page_token = page.next_page_token;
    }
    assert_eq!(seen, expected, "usable tokens, newest first, each once");
    assert_eq!(
        refusal(
            client
                .list_tokens(ListTokensRequest {
                    merchant_id: "m1".into(),
                    shopper_reference: SHOPPER.into(),
                    page_size: 3,
                    page_token: "garbage".into()
                })
                .await
        ),
        (Code::InvalidArgument, "INVALID_PAGE_TOKEN".into())
    );
}

async fn flow_4_detokenize_states_its_purpose_and_shopper_and_is_journalled(backend: Backend) {
    let flows = FlowStack::start(backend);
    let mut client = flows.client().await;
    let token = tokenize(&mut client, tokenize_card("m1", "4111111111111111"))
        .await
        .token;
    let mut missing = detokenize("m1", &token);
    missing.purpose = None;
    assert_eq!(
        refusal(client.detokenize(missing).await),
        (Code::InvalidArgument, "MISSING_FIELD".into())
    );
    let mut inconsistent = detokenize("m1", &token);
    inconsistent.purpose.as_mut().unwrap().shopper_interaction = 2;
    assert_eq!(
        refusal(client.detokenize(inconsistent).await),
        (Code::InvalidArgument, "INCONSISTENT_PURPOSE".into())
    );
    let mut other_shopper = detokenize("m1", &token);
    other_shopper.shopper_reference = "shopper-2".into();
    assert_eq!(
        refusal(client.detokenize(other_shopper).await),
        (Code::FailedPrecondition, "SHOPPER_REFERENCE_MISMATCH".into())
    );
    client.detokenize(detokenize("m1", &token)).await.unwrap();
    let entries = client
        .get_token_history(GetTokenHistoryRequest {
            merchant_id: "m1".into(),
            token: token.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .entries;
    let detokenized: Vec<_> = entries
        .iter()
        .filter(|e| e.r#type() == TransactionType::Detokenize)
        .collect();
    assert_eq!(detokenized.len(), 1, "refusals are not journalled as uses");
    assert_eq!(detokenized[0].caller, "spiffe://tessera/dev-client");
    assert_eq!(detokenized[0].purpose, Some(one_click()));
}

/// Allowed, or refused with this reason.
type Expected = Result<(), &'static str>;

/// Token kind × purpose × caller permission.
async fn flow_5_kinds_allow_only_their_purposes_and_callers(backend: Backend) {
    let flows = FlowStack::start(backend);
    let mut mit_allowed = flows.client().await;
    let mut cit_only = flows.checkout_client().await;
    let purposes: [(&str, Purpose); 4] = [
        ("one-click", one_click()),
        ("unscheduled", unscheduled()),
        ("subscription", subscription()),
        ("one-off", one_off()),
    ];
    // (kind, purpose, allowed for a caller with MIT permission, allowed for a CIT-only caller)
    let table: [(TokenKind, &str, Expected, Expected); 12] = [
        (TokenKind::CardOnFile, "one-click", Ok(()), Ok(())),
        (
            TokenKind::CardOnFile,
            "unscheduled",
            Ok(()),
            Err("OPERATION_NOT_ALLOWED"),
        ),
        (
            TokenKind::CardOnFile,
            "subscription",
            Err("PURPOSE_NOT_ALLOWED"),
            Err("OPERATION_NOT_ALLOWED"),
        ),
        (
            TokenKind::CardOnFile,
            "one-off",
            Err("PURPOSE_NOT_ALLOWED"),
            Err("PURPOSE_NOT_ALLOWED"),
        ),
        (
            TokenKind::Recurrence,
            "one-click",
            Err("PURPOSE_NOT_ALLOWED"),
            Err("PURPOSE_NOT_ALLOWED"),
        ),
        (
            TokenKind::Recurrence,
            "unscheduled",
            Err("PURPOSE_NOT_ALLOWED"),
            Err("OPERATION_NOT_ALLOWED"),
        ),
        (
            TokenKind::Recurrence,
            "subscription",
            Ok(()),
            Err("OPERATION_NOT_ALLOWED"),
        ),
        (
            TokenKind::Recurrence,
            "one-off",
            Err("PURPOSE_NOT_ALLOWED"),
            Err("PURPOSE_NOT_ALLOWED"),
        ),
        (TokenKind::SingleUse, "one-click", Ok(()), Ok(())),
        (
            TokenKind::SingleUse,
            "unscheduled",
            Err("PURPOSE_NOT_ALLOWED"),
            Err("OPERATION_NOT_ALLOWED"),
        ),
        (
            TokenKind::SingleUse,
            "subscription",
            Err("PURPOSE_NOT_ALLOWED"),
            Err("OPERATION_NOT_ALLOWED"),
        ),
        (TokenKind::SingleUse, "one-off", Ok(()), Ok(())),
    ];
    for (kind, purpose_name, with_mit, without_mit) in table {
        let purpose = purposes.iter().find(|(name, _)| *name == purpose_name).unwrap().1;
        for (client, expected, who) in [
            (&mut mit_allowed, with_mit, "mit"),
            (&mut cit_only, without_mit, "cit"),
        ] {
            // A fresh token per cell: single-use tokens are consumed by an allowed use.
            let token = tokenize(client, with_kind(tokenize_card("m1", "4111111111111111"), kind))
                .await
                .token;
            let result = client.detokenize(detokenize_for("m1", &token, purpose)).await;
            match (expected, result) {
                (Ok(()), Ok(response)) => {
                    assert_eq!(revealed_number(&response.into_inner()), "4111111111111111")
                }
                (Err(expected_reason), Err(status)) => {
                    let code = if expected_reason == "OPERATION_NOT_ALLOWED" {
                        Code::PermissionDenied
                    } else {
                        Code::FailedPrecondition
                    };
                    assert_eq!(
                        (status.code(), reason(&status).as_str()),
                        (code, expected_reason),
                        "{kind:?} {purpose_name} {who}"
                    );
                }
                (expected, result) => panic!(
                    "{kind:?} {purpose_name} {who}: expected {expected:?}, got {:?}",
                    result.map(|_| ())
                ),
            }
        }
    }
}

async fn single_use_tokens_are_consumed_once_and_expire_after_24_hours(backend: Backend) {
    let flows = FlowStack::start(backend);
    let mut client = flows.client().await;
    let single = || with_kind(tokenize_card("m1", "4111111111111111"), TokenKind::SingleUse);
    let used = tokenize(&mut client, single()).await;
    assert!(used.expires_at.is_some());
    let revealed = client
        .detokenize(detokenize_for("m1", &used.token, one_off()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(revealed_number(&revealed), "4111111111111111");
    assert_eq!(
        refusal(
            client
                .detokenize(detokenize_for("m1", &used.token, one_off()))
                .await
        ),
        (Code::NotFound, "TOKEN_CONSUMED".into())
    );
    assert_eq!(
        get(&mut client, "m1", &used.token).await.unwrap().status,
        TokenStatus::Consumed as i32
    );

    let unused = tokenize(&mut client, single()).await;
    flows.set_clock(23 * 3600 * 1000).await;
    assert_eq!(
        get(&mut client, "m1", &unused.token).await.unwrap().status,
        TokenStatus::Active as i32
    );
    flows.set_clock(24 * 3600 * 1000 + 60_000).await;
    assert_eq!(
        refusal(
            client
                .detokenize(detokenize_for("m1", &unused.token, one_off()))
                .await
        ),
        (Code::NotFound, "TOKEN_EXPIRED".into())
    );
    let entries = history(&mut client, "m1", &unused.token).await;
    assert_eq!(entries.last().unwrap().2, "SINGLE_USE_TIMEOUT");
}

async fn flow_6_cvc_is_held_only_in_the_vault_and_returned_once(backend: Backend) {
    let flows = FlowStack::start(backend);
    let mut client = flows.client().await;
    const CVC: &str = "8642";

    // With full card data into a single-use token.
    let mut request = with_kind(tokenize_card("m1", "378282246310005"), TokenKind::SingleUse);
    request.cvc = CVC.into();
    let single = tokenize(&mut client, request).await;
    let revealed = client
        .detokenize(detokenize_for("m1", &single.token, one_off()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (revealed_number(&revealed).as_str(), revealed.cvc.as_str()),
        ("378282246310005", CVC)
    );

    // Alone, for a returning shopper's stored card.
    let stored = tokenize(&mut client, tokenize_card("m1", "4111111111111111"))
        .await
        .token;
    let mut cvc_only = TokenizeRequest {
        merchant_id: "m1".into(),
        kind: TokenKind::SingleUse as i32,
        shopper_reference: SHOPPER.into(),
        cvc: "737".into(),
        ..Default::default()
    };
    let cvc_token = tokenize(&mut client, cvc_only.clone()).await;
    assert_eq!(cvc_token.data_type, DataType::Cvc as i32);
    let with_cvc = DetokenizeRequest {
        cvc_token: cvc_token.token.clone(),
        ..detokenize("m1", &stored)
    };
    // A merchant-initiated use may not ask for a CVC.
    let mut merchant_initiated = with_cvc.clone();
    merchant_initiated.purpose = Some(unscheduled());
    assert_eq!(
        refusal(client.detokenize(merchant_initiated).await),
        (Code::FailedPrecondition, "CVC_NOT_ALLOWED".into())
    );
    let revealed = client.detokenize(with_cvc.clone()).await.unwrap().into_inner();
    assert_eq!(
        (revealed_number(&revealed).as_str(), revealed.cvc.as_str()),
        ("4111111111111111", "737")
    );
    assert_eq!(
        refusal(client.detokenize(with_cvc).await),
        (Code::NotFound, "TOKEN_CONSUMED".into())
    );
    // The stored card still works, without a CVC.
    let again = client
        .detokenize(detokenize("m1", &stored))
        .await
        .unwrap()
        .into_inner();
    assert!(again.cvc.is_empty());

    // A CVC offered with a multi-use token is refused, and so is a malformed one.
    let mut multi = tokenize_card("m1", "4111111111111111");
    multi.cvc = "123".into();
    assert_eq!(
        refusal(client.tokenize(multi).await),
        (Code::InvalidArgument, "CVC_NOT_ALLOWED".into())
    );
    cvc_only.cvc = "12a".into();
    assert_eq!(
        refusal(client.tokenize(cvc_only).await),
        (Code::InvalidArgument, "INVALID_CVC".into())
    );

    // Never in the database, never in a log.
    let db = database_contents(&flows.stack).await;
    assert!(
        !db.windows(CVC.len()).any(|w| w == CVC.as_bytes()),
        "the CVC reached the database"
    );
    let (vault_log, gateway_log) = flows.stack.logs();
    assert!(
        !vault_log.contains(CVC) && !gateway_log.contains(CVC),
        "the CVC reached a log"
    );
}

async fn flow_7_deletion_destroys_the_ciphertext(backend: Backend) {
    let flows = FlowStack::start(backend);
    let mut client = flows.client().await;
    let token = tokenize(&mut client, tokenize_card("m1", "4111111111111111"))
        .await
        .token;
    client
        .delete_token(DeleteTokenRequest {
            merchant_id: "m1".into(),
            token: token.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
    let pool = database_pool(&flows.stack).await;
    let (ciphertext, fingerprint): (Option<Vec<u8>>, Option<Vec<u8>>) =
        sqlx::query_as("SELECT ciphertext, fingerprint FROM tokens WHERE token = $1")
            .bind(&token)
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(
        (ciphertext, fingerprint),
        (None, None),
        "deletion must destroy the data, not flag it"
    );
    assert_eq!(
        refusal(client.detokenize(detokenize("m1", &token)).await),
        (Code::NotFound, "TOKEN_DELETED".into())
    );
    assert_eq!(
        history(&mut client, "m1", &token).await.last().unwrap().0,
        TransactionType::Delete
    );
}

/// Milliseconds from now until the first instant after `year`-`month` plus `months` months.
fn until_month_end_plus(year: i32, month: u32, months: u32) -> i64 {
    let total = year * 12 + i32::try_from(month).unwrap() + i32::try_from(months).unwrap();
    let (y, m) = (total.div_euclid(12), total.rem_euclid(12) + 1);
    days_from_civil(i64::from(y), m, 1) * DAY_MS - now_ms()
}

fn days_from_civil(year: i64, month: i32, day: i64) -> i64 {
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let yoe = year.rem_euclid(400);
    let mp = i64::from((month + 9) % 12);
    let doy = (153 * mp + 2) / 5 + day - 1;
    era * 146_097 + yoe * 365 + yoe / 4 - yoe / 100 + doy - 719_468
}

async fn flow_8_retention_deletes_card_tokens_14_months_after_expiry_unless_extended(backend: Backend) {
    let flows = FlowStack::start(backend);
    let mut client = flows.client().await;
    let kept = tokenize(&mut client, tokenize_card("m1", "4111111111111111")).await;
    let extended = tokenize(&mut client, tokenize_card("m1", "5555555555554444")).await;
    let email = tokenize(&mut client, contact_request("m1", "ada@example.com", "")).await;

    // Extension: at most 24 months in total.
    let extend = |token: &str, months: u32| ExtendRetentionRequest {
        merchant_id: "m1".into(),
        token: token.into(),
        months,
        ..Default::default()
    };
    let after = client
        .extend_retention(extend(&extended.token, 12))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(after.retention_extended_months, 12);
    assert!(after.retain_until.as_ref().unwrap().seconds > kept.retain_until.as_ref().unwrap().seconds);
    assert_eq!(
        refusal(client.extend_retention(extend(&extended.token, 13)).await),
        (Code::FailedPrecondition, "RETENTION_LIMIT".into())
    );
    client
        .extend_retention(extend(&extended.token, 12))
        .await
        .unwrap();
    assert_eq!(
        refusal(client.extend_retention(extend(&extended.token, 1)).await),
        (Code::FailedPrecondition, "RETENTION_LIMIT".into())
    );
    assert_eq!(
        refusal(client.extend_retention(extend(&extended.token, 25)).await),
        (Code::InvalidArgument, "INVALID_MONTHS".into())
    );
    assert!(history(&mut client, "m1", &extended.token)
        .await
        .iter()
        .any(|e| e.0 == TransactionType::Extend));

    // A non-card token's retention counts from its last use: use it 13 months in.
    flows.set_clock(396 * DAY_MS).await;
    let used = client
        .detokenize(DetokenizeRequest {
            ..detokenize("m1", &email.token)
        })
        .await
        .unwrap()
        .into_inner();
    assert!(matches!(used.data, Some(detokenize_response::Data::Contact(_))));

    // The card expires 12/2031: its token goes 14 months later, in March 2033.
    flows.set_clock(until_month_end_plus(2031, 12, 14) - DAY_MS).await;
    assert_eq!(
        get(&mut client, "m1", &kept.token).await.unwrap().status,
        TokenStatus::Active as i32
    );
    flows.set_clock(until_month_end_plus(2031, 12, 14) + DAY_MS).await;
    assert_eq!(
        get(&mut client, "m1", &kept.token).await.unwrap().status,
        TokenStatus::Expired as i32
    );
    let entries = history(&mut client, "m1", &kept.token).await;
    assert_eq!(
        entries.last().unwrap(),
        &(
            TransactionType::Expire,
            "tessera/sweeper".to_owned(),
            "RETENTION".to_owned()
        )
    );
    // The extended one lives 24 months longer.
    assert_eq!(
        get(&mut client, "m1", &extended.token).await.unwrap().status,
        TokenStatus::Active as i32
    );
    flows.set_clock(until_month_end_plus(2031, 12, 38) + DAY_MS).await;
    assert_eq!(
        get(&mut client, "m1", &extended.token).await.unwrap().status,
        TokenStatus::Expired as i32
    );
    // The e-mail token, last used 13 months in, was gone 14 months after that use.
    assert_eq!(
        get(&mut client, "m1", &email.token).await.unwrap().status,
        TokenStatus::Expired as i32
    );
}

fn contact_request(merchant: &str, email: &str, phone: &str) -> TokenizeRequest {
    TokenizeRequest {
        merchant_id: merchant.into(),
        data: Some(tokenize_request::Data::Contact(Contact {
            email: email.into(),
            phone: phone.into(),
        })),
        shopper_reference: SHOPPER.into(),
        ..Default::default()
    }
}

async fn flow_9_bank_accounts_and_contact_data_tokenize_like_cards(backend: Backend) {
    let flows = FlowStack::start(backend);
    let mut client = flows.client().await;
    let account = |iban: &str| TokenizeRequest {
        merchant_id: "m1".into(),
        data: Some(tokenize_request::Data::BankAccount(BankAccount {
            iban: iban.into(),
            bic: "NWBKGB2L".into(),
            holder_name: "Ada Lovelace".into(),
        })),
        shopper_reference: SHOPPER.into(),
        ..Default::default()
    };
    let bank = tokenize(&mut client, account("GB82 WEST 1234 5698 7654 32")).await;
    assert_eq!(
        (bank.data_type, bank.last_four.as_str()),
        (DataType::BankAccount as i32, "5432")
    );
    let revealed = client
        .detokenize(detokenize("m1", &bank.token))
        .await
        .unwrap()
        .into_inner();
    match revealed.data {
        Some(detokenize_response::Data::BankAccount(ref account)) => {
            assert_eq!(account.iban, "GB82WEST12345698765432")
        }
        _ => panic!("expected a bank account"),
    }
    let phone = tokenize(&mut client, contact_request("m1", "", "+819012345678")).await;
    assert_eq!(
        (phone.data_type, phone.last_four.as_str()),
        (DataType::Phone as i32, "5678")
    );
    let email = tokenize(
        &mut client,
        with_kind(contact_request("m1", "ada@example.com", ""), TokenKind::SingleUse),
    )
    .await;
    let revealed = client
        .detokenize(detokenize_for("m1", &email.token, one_off()))
        .await
        .unwrap()
        .into_inner();
    match revealed.data {
        Some(detokenize_response::Data::Contact(ref contact)) => assert_eq!(contact.email, "ada@example.com"),
        _ => panic!("expected contact data"),
    }
    assert_eq!(
        history(&mut client, "m1", &email.token).await.len(),
        2,
        "TK and DT, like a card"
    );

    assert_eq!(
        refusal(client.tokenize(account("GB82WEST12345698765433")).await),
        (Code::InvalidArgument, "INVALID_BANK_ACCOUNT".into())
    );
    assert_eq!(
        refusal(client.tokenize(contact_request("m1", "not-an-email", "")).await),
        (Code::InvalidArgument, "INVALID_CONTACT".into())
    );
    assert_eq!(
        refusal(
            client
                .tokenize(contact_request("m1", "a@b.co", "+819012345678"))
                .await
        ),
        (Code::InvalidArgument, "INVALID_CONTACT".into())
    );
    let mut fpe = account("GB82WEST12345698765432");
    fpe.format = TokenFormat::FormatPreserving as i32;
    assert_eq!(
        refusal(client.tokenize(fpe).await),
        (Code::InvalidArgument, "INVALID_FORMAT".into())
    );
}

async fn flow_10_history_lists_every_operation_without_card_data(backend: Backend) {
    let flows = FlowStack::start(backend);
    let mut client = flows.client().await;
    let token = tokenize(&mut client, tokenize_card("m1", "4111111111111111"))
        .await
        .token;
    client.detokenize(detokenize("m1", &token)).await.unwrap();
    client
        .extend_retention(ExtendRetentionRequest {
            merchant_id: "m1".into(),
            token: token.clone(),
            months: 3,
            ..Default::default()
        })
        .await
        .unwrap();
    client
        .delete_token(DeleteTokenRequest {
            merchant_id: "m1".into(),
            token: token.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
    let entries = client
        .get_token_history(GetTokenHistoryRequest {
            merchant_id: "m1".into(),
            token: token.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .entries;
    let types: Vec<_> = entries.iter().map(|e| e.r#type()).collect();
    assert_eq!(
        types,
        [
            TransactionType::Tokenize,
            TransactionType::Detokenize,
            TransactionType::Extend,
            TransactionType::Delete
        ]
    );
    assert!(entries
        .windows(2)
        .all(|w| w[0].transaction_id < w[1].transaction_id));
    assert!(entries
        .iter()
        .all(|e| e.at.is_some() && e.caller == "spiffe://tessera/dev-client"));
    assert!(
        !format!("{entries:?}").contains("4111"),
        "journal entries carry no card data"
    );
    assert_eq!(
        refusal(
            client
                .get_token_history(GetTokenHistoryRequest {
                    merchant_id: "m2".into(),
                    token: token.clone(),
                    ..Default::default()
                })
                .await
        ),
        (Code::NotFound, "TOKEN_NOT_FOUND".into())
    );
}

async fn shopper_references_that_look_like_personal_data_are_refused(backend: Backend) {
    let flows = FlowStack::start(backend);
    let mut client = flows.client().await;
    for bad in ["ab", "ada@example.com", "+44 20 7946 0958", "4111 1111 1111 1111"] {
        let mut request = tokenize_card("m1", "4111111111111111");
        request.shopper_reference = bad.into();
        assert_eq!(
            refusal(client.tokenize(request).await),
            (Code::InvalidArgument, "INVALID_SHOPPER_REFERENCE".into()),
            "{bad}"
        );
    }
    let mut request = tokenize_card("m1", "4111111111111111");
    request.shopper_reference = String::new();
    assert_eq!(
        refusal(client.tokenize(request).await),
        (Code::InvalidArgument, "MISSING_FIELD".into())
    );
    let _ = card("4111111111111111");
}

/// What a subscriber learns from one event alone: (type, token, shopper reference, kind, data
/// type, brand, last four, expiry month, expiry year, payment reference).
type EventFacts = (
    EventType,
    String,
    String,
    TokenKind,
    DataType,
    CardBrand,
    String,
    u32,
    u32,
    String,
);

fn event_facts(event: &TokenEvent) -> EventFacts {
    (
        event.r#type(),
        event.token.clone(),
        event.shopper_reference.clone(),
        event.token_kind(),
        event.data_type(),
        event.brand(),
        event.last_four.clone(),
        event.expiry_month,
        event.expiry_year,
        event.payment_reference.clone(),
    )
}

/// Reads `count` events of `merchant` after sequence `after`.
async fn collect_events(client: &mut Client, merchant: &str, after: u64, count: usize) -> Vec<TokenEvent> {
    let mut stream = client
        .subscribe_events(SubscribeEventsRequest {
            merchant_id: merchant.into(),
            after_sequence: after,
        })
        .await
        .unwrap()
        .into_inner();
    let mut events = Vec::new();
    while events.len() < count {
        match tokio::time::timeout(Duration::from_secs(10), stream.message()).await {
            Ok(Ok(Some(event))) => events.push(event),
            other => panic!("the event stream ended early: {other:?}"),
        }
    }
    events
}

/// A subscriber (e.g. a recurring-contract consumer) gets every fact it needs from the event
/// itself, for each kind of event, with the right values; and neither the stream nor the
/// stored events hold a card number or its first six digits.
async fn events_carry_the_token_facts_a_consumer_needs_and_no_card_data(backend: Backend) {
    const MASTERCARD: &str = "5555555555554444";
    const VISA: &str = "4111111111111111";
    const AMEX: &str = "378282246310005";
    let flows = FlowStack::start(backend);
    let mut client = flows.client().await;
    let card_event =
        |kind: EventType, token: &Token, token_kind: TokenKind, brand: CardBrand, number: &str| {
            (
                kind,
                token.token.clone(),
                SHOPPER.to_owned(),
                token_kind,
                DataType::Card,
                brand,
                number[number.len() - 4..].to_owned(),
                12,
                2031,
                String::new(),
            )
        };
    let mut expected: Vec<EventFacts> = Vec::new();

    // Tokenized during a payment, confirmed with the payment's reference, then kept longer.
    let mut during_payment = tokenize_card("m1", MASTERCARD);
    during_payment.provisional = true;
    let contract = tokenize(&mut client, during_payment).await;
    let contract_event = |kind| {
        card_event(
            kind,
            &contract,
            TokenKind::CardOnFile,
            CardBrand::Mastercard,
            MASTERCARD,
        )
    };
    expected.push(contract_event(EventType::TokenCreated));
    // A payment reference that is not a reference changes nothing: no confirmation, no event.
    for bad in ["4111 1111 1111 1111", "psp\n7781"] {
        let status = client
            .confirm_token(ConfirmTokenRequest {
                merchant_id: "m1".into(),
                token: contract.token.clone(),
                payment_reference: bad.into(),
                ..Default::default()
            })
            .await
            .expect_err("refused");
        assert_eq!(
            (status.code(), reason(&status)),
            (Code::InvalidArgument, "INVALID_REFERENCE".into())
        );
        assert!(!status.message().contains("4111"), "{status:?}");
    }
    assert_eq!(
        get(&mut client, "m1", &contract.token).await.unwrap().status,
        TokenStatus::Provisional as i32
    );
    client
        .confirm_token(ConfirmTokenRequest {
            merchant_id: "m1".into(),
            token: contract.token.clone(),
            payment_reference: "psp-7781-auth".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let mut confirmed = contract_event(EventType::TokenConfirmed);
    confirmed.9 = "psp-7781-auth".into();
    expected.push(confirmed);
    client
        .extend_retention(ExtendRetentionRequest {
            merchant_id: "m1".into(),
            token: contract.token.clone(),
            months: 3,
            ..Default::default()
        })
        .await
        .unwrap();
    expected.push(contract_event(EventType::RetentionExtended));

    // A subscription token, deleted.
    let recurring = tokenize(
        &mut client,
        with_kind(tokenize_card("m1", VISA), TokenKind::Recurrence),
    )
    .await;
    expected.push(card_event(
        EventType::TokenCreated,
        &recurring,
        TokenKind::Recurrence,
        CardBrand::Visa,
        VISA,
    ));
    client
        .delete_token(DeleteTokenRequest {
            merchant_id: "m1".into(),
            token: recurring.token.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
    expected.push(card_event(
        EventType::TokenDeleted,
        &recurring,
        TokenKind::Recurrence,
        CardBrand::Visa,
        VISA,
    ));

    // A bank account: no brand and no expiry, the IBAN's last four.
    let bank = tokenize(
        &mut client,
        TokenizeRequest {
            merchant_id: "m1".into(),
            data: Some(tokenize_request::Data::BankAccount(BankAccount {
                iban: "GB82 WEST 1234 5698 7654 32".into(),
                bic: String::new(),
                holder_name: "Ada Lovelace".into(),
            })),
            shopper_reference: "shopper-2".into(),
            ..Default::default()
        },
    )
    .await;
    expected.push((
        EventType::TokenCreated,
        bank.token.clone(),
        "shopper-2".into(),
        TokenKind::CardOnFile,
        DataType::BankAccount,
        CardBrand::Unspecified,
        "5432".into(),
        0,
        0,
        String::new(),
    ));

    // A "do not retry" answer blocks the card; the event names the token reported.
    client
        .report_authorization(ReportAuthorizationRequest {
            merchant_id: "m1".into(),
            token: contract.token.clone(),
            outcome: AuthorizationOutcome::DeclinedDoNotRetry as i32,
            acquiring_agreement: "acq-1".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    expected.push(contract_event(EventType::CardBlocked));

    // A single-use token nobody uses expires after 24 hours.
    let single = tokenize(
        &mut client,
        with_kind(tokenize_card("m1", AMEX), TokenKind::SingleUse),
    )
    .await;
    let single_event = |kind| {
        card_event(
            kind,
            &single,
            TokenKind::SingleUse,
            CardBrand::AmericanExpress,
            AMEX,
        )
    };
    expected.push(single_event(EventType::TokenCreated));
    flows.set_clock(25 * 3_600_000).await;
    expected.push(single_event(EventType::TokenExpired));

    let events = collect_events(&mut client, "m1", 0, expected.len()).await;
    let seen: Vec<EventFacts> = events.iter().map(event_facts).collect();
    assert_eq!(seen, expected);
    let blocked = events
        .iter()
        .find(|event| event.r#type() == EventType::CardBlocked)
        .unwrap();
    assert!(blocked.detail.contains("acq-1"), "{blocked:?}");

    // No card number and no first six digits, neither on the wire nor in the events table.
    let stored: Vec<String> = sqlx::query_scalar(
        "SELECT merchant_id || '|' || token || '|' || kind || '|' || detail || '|' || shopper_reference \
         || '|' || token_kind || '|' || data_type || '|' || brand || '|' || last_four || '|' \
         || CAST(expiry_month AS TEXT) || '|' || CAST(expiry_year AS TEXT) || '|' || payment_reference \
         FROM events ORDER BY seq",
    )
    .fetch_all(&database_pool(&flows.stack).await)
    .await
    .unwrap();
    assert_eq!(stored.len(), expected.len(), "{stored:?}");
    assert!(
        stored.iter().any(|row| row.contains("psp-7781-auth")),
        "{stored:?}"
    );
    for number in [MASTERCARD, VISA, AMEX] {
        for secret in [number, &number[..6]] {
            for event in &events {
                assert!(!format!("{event:?}").contains(secret), "{event:?}");
                assert!(
                    !event
                        .encode_to_vec()
                        .windows(secret.len())
                        .any(|window| window == secret.as_bytes()),
                    "{event:?}"
                );
            }
            assert!(stored.iter().all(|row| !row.contains(secret)), "{stored:?}");
        }
    }
}

backend_tests!(
    flow_1_standalone_tokenization_is_journalled_tk,
    flow_2_provisional_tokens_are_confirmed_discarded_or_time_out,
    flow_3_one_click_lists_usable_tokens_newest_first_paginated,
    flow_4_detokenize_states_its_purpose_and_shopper_and_is_journalled,
    flow_5_kinds_allow_only_their_purposes_and_callers,
    single_use_tokens_are_consumed_once_and_expire_after_24_hours,
    flow_6_cvc_is_held_only_in_the_vault_and_returned_once,
    flow_7_deletion_destroys_the_ciphertext,
    flow_8_retention_deletes_card_tokens_14_months_after_expiry_unless_extended,
    flow_9_bank_accounts_and_contact_data_tokenize_like_cards,
    flow_10_history_lists_every_operation_without_card_data,
    shopper_references_that_look_like_personal_data_are_refused,
    events_carry_the_token_facts_a_consumer_needs_and_no_card_data,
);
