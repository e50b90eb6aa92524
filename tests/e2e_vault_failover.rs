//! One gateway over two vaults (real binaries, SQLite):
//! - a vault killed (SIGKILL) during a steady stream of tokenize and detokenize calls fails no
//!   request (its in-flight vault calls are retried on the other vault) and loses no token;
//! - a CVC, held only in the memory of the vault that took it, is revealed through that vault.
//!
//! The second vault is started here, next to the harness's first, with the same PKI and master
//! key file; the gateway is restarted with both endpoints in its configuration.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use std::fs::{self, OpenOptions};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::requests::{detokenize, detokenize_for, one_off, revealed_number, tokenize_card, SHOPPER};
use common::{binaries, free_port, gateway_channel, Stack, StackOptions};
use tessera_api::v1::tokenization_client::TokenizationClient;
use tessera_api::v1::{DetokenizeRequest, TokenKind, TokenizeRequest};
use tonic::transport::Channel;

const MERCHANT: &str = "m_failover";
/// Operations in the stream (each a tokenize then a detokenize of the new token).
const OPERATIONS: usize = 300;
/// Operations in flight at once.
const IN_FLIGHT: usize = 16;
/// The second vault is killed once this many operations have finished.
const KILL_AFTER: usize = 100;

/// A second vault beside the stack's, killed (SIGKILL) when dropped.
struct SecondVault {
    child: Option<Child>,
    addr: SocketAddr,
}

impl SecondVault {
    /// Starts a vault with the stack's vault configuration on another port (and its own audit
    /// log, if the configuration has one), then restarts the gateway with both vaults.
    fn start(stack: &mut Stack) -> Self {
        let text = fs::read_to_string(stack.vault_config_path()).unwrap();
        let mut config: toml::Table = toml::from_str(&text).unwrap();
        let port = std::iter::repeat_with(free_port)
            .find(|port| *port != stack.vault_addr().port() && *port != stack.gateway_addr().port())
            .unwrap();
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        config.insert("listen".into(), addr.to_string().into());
        if let Some(toml::Value::Table(audit)) = config.get_mut("audit") {
            let path = stack.dir().join("audit-2.log");
            audit.insert("path".into(), path.to_str().unwrap().into());
        }
        let config_path = stack.dir().join("vault-2.toml");
        fs::write(&config_path, toml::to_string(&config).unwrap()).unwrap();
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(stack.dir().join("vault-2.log"))
            .unwrap();
        let child = Command::new(binaries().vault)
            .arg("--config")
            .arg(&config_path)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let mut vault = Self {
            child: Some(child),
            addr,
        };
        vault.wait_until_listening(stack);

        let text = fs::read_to_string(stack.gateway_config_path()).unwrap();
        let mut gateway: toml::Table = toml::from_str(&text).unwrap();
        let endpoints = toml::Value::Array(vec![
            format!("https://{}", stack.vault_addr()).into(),
            format!("https://{addr}").into(),
        ]);
        match gateway.get_mut("vault") {
            Some(toml::Value::Table(vault)) => vault.insert("endpoints".into(), endpoints),
            _ => panic!("gateway.toml has no [vault] table"),
        };
        fs::write(stack.gateway_config_path(), toml::to_string(&gateway).unwrap()).unwrap();
        stack.kill_gateway();
        stack.start_gateway();
        vault
    }

    fn wait_until_listening(&mut self, stack: &Stack) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                let log = fs::read_to_string(stack.dir().join("vault-2.log")).unwrap_or_default();
                panic!("the second vault exited ({status}):\n{log}");
            }
            if TcpStream::connect_timeout(&self.addr, Duration::from_millis(100)).is_ok() {
                return;
            }
            assert!(Instant::now() < deadline, "the second vault did not listen");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for SecondVault {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A 16-digit Visa-range number with a valid Luhn check digit, distinct for each `n`.
fn card_number(n: usize) -> String {
    let body = format!("4{:014}", n);
    let sum: u32 = body
        .chars()
        .rev()
        .enumerate()
        .map(|(i, c)| {
            let d = c.to_digit(10).unwrap();
            if i % 2 == 0 {
                let doubled = d * 2;
                if doubled > 9 {
                    doubled - 9
                } else {
                    doubled
                }
            } else {
                d
            }
        })
        .sum();
    format!("{body}{}", (10 - sum % 10) % 10)
}

fn stack_with_logs() -> Stack {
    Stack::start_with(StackOptions {
        // The gateway's warning when it takes a vault out of rotation is part of what is checked.
        rust_log: Some("info".into()),
        ..StackOptions::default()
    })
}

/// One operation: tokenize card `n`, then detokenize the token. Returns the token once it was
/// acknowledged (even if the detokenize then failed), and the first failure.
async fn operation(client: &mut TokenizationClient<Channel>, n: usize) -> (Option<String>, Option<String>) {
    let number = card_number(n);
    let token = match client.tokenize(tokenize_card(MERCHANT, &number)).await {
        Ok(response) => response.into_inner().token.unwrap().token,
        Err(status) => return (None, Some(format!("tokenize {n}: {status:?}"))),
    };
    match client.detokenize(detokenize(MERCHANT, &token)).await {
        Ok(response) if revealed_number(response.get_ref()) == number => (Some(token), None),
        Ok(_) => (
            Some(token),
            Some(format!("detokenize {n}: another card came back")),
        ),
        Err(status) => (Some(token), Some(format!("detokenize {n}: {status:?}"))),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_vault_fails_no_request_and_loses_no_token() {
    let mut stack = stack_with_logs();
    let second = Arc::new(Mutex::new(SecondVault::start(&mut stack)));
    let client = TokenizationClient::new(gateway_channel(&stack, "dev-client").await);

    let next = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(AtomicUsize::new(0));
    let acknowledged = Arc::new(Mutex::new(Vec::new()));
    let failures = Arc::new(Mutex::new(Vec::new()));
    let killer = {
        let done = Arc::clone(&done);
        let second = Arc::clone(&second);
        tokio::spawn(async move {
            while done.load(Ordering::SeqCst) < KILL_AFTER {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            tokio::task::spawn_blocking(move || second.lock().unwrap().kill())
                .await
                .unwrap();
            done.load(Ordering::SeqCst)
        })
    };
    let workers: Vec<_> = (0..IN_FLIGHT)
        .map(|_| {
            let mut client = client.clone();
            let (next, done) = (Arc::clone(&next), Arc::clone(&done));
            let (acknowledged, failures) = (Arc::clone(&acknowledged), Arc::clone(&failures));
            tokio::spawn(async move {
                loop {
                    let n = next.fetch_add(1, Ordering::SeqCst);
                    if n >= OPERATIONS {
                        return;
                    }
                    let (token, failure) = operation(&mut client, n).await;
                    if let Some(token) = token {
                        acknowledged.lock().unwrap().push((n, token));
                    }
                    if let Some(failure) = failure {
                        failures.lock().unwrap().push(failure);
                    }
                    done.fetch_add(1, Ordering::SeqCst);
                }
            })
        })
        .collect();
    for worker in workers {
        worker.await.unwrap();
    }
    let killed_at = killer.await.unwrap();
    assert!(
        killed_at < OPERATIONS,
        "the vault was killed after the stream ended"
    );

    let gateway_log = stack.logs().1;
    let failures = failures.lock().unwrap().clone();
    assert!(
        failures.is_empty(),
        "{} of {OPERATIONS} operations failed (vault killed after {killed_at}):\n{}\n--- gateway.log ---\n{gateway_log}",
        failures.len(),
        failures.join("\n")
    );
    // The gateway did send calls to the killed vault, noticed, and stopped using it.
    assert!(
        gateway_log.contains("vault endpoint taken out of rotation"),
        "the gateway never noticed the killed vault:\n{gateway_log}"
    );

    // Every acknowledged token still detokenizes to its card, through the surviving vault.
    let acknowledged = acknowledged.lock().unwrap().clone();
    assert_eq!(acknowledged.len(), OPERATIONS);
    let mut client = client.clone();
    for (n, token) in acknowledged {
        let response = client
            .detokenize(detokenize(MERCHANT, &token))
            .await
            .unwrap_or_else(|status| panic!("token {token} of card {n} no longer detokenizes: {status:?}"));
        assert_eq!(revealed_number(&response.into_inner()), card_number(n));
    }
}

fn single_use_with_cvc(number: &str, cvc: &str) -> TokenizeRequest {
    TokenizeRequest {
        kind: TokenKind::SingleUse as i32,
        cvc: cvc.into(),
        ..tokenize_card(MERCHANT, number)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cvc_is_revealed_by_the_vault_that_holds_it() {
    let mut stack = stack_with_logs();
    let _second = SecondVault::start(&mut stack);
    let mut client = TokenizationClient::new(gateway_channel(&stack, "dev-client").await);

    // Single-use tokens with their own CVC: tokenizes alternate between the vaults, and each
    // detokenize must reach the one that took the CVC.
    for i in 0..12 {
        let number = card_number(5000 + i);
        let cvc = format!("{:03}", 100 + i);
        let token = client
            .tokenize(single_use_with_cvc(&number, &cvc))
            .await
            .unwrap()
            .into_inner()
            .token
            .unwrap()
            .token;
        let revealed = client
            .detokenize(detokenize_for(MERCHANT, &token, one_off()))
            .await
            .unwrap_or_else(|status| panic!("single-use token {i}: {status:?}"))
            .into_inner();
        assert_eq!((revealed_number(&revealed), revealed.cvc.clone()), (number, cvc));
    }

    // A CVC-only token named with a stored card: the CVC comes from the vault that holds it,
    // whichever vault the stored card was tokenized on.
    let stored = client
        .tokenize(tokenize_card(MERCHANT, &card_number(6000)))
        .await
        .unwrap()
        .into_inner()
        .token
        .unwrap()
        .token;
    for i in 0..8 {
        let cvc = format!("{}", 7000 + i);
        let cvc_only = TokenizeRequest {
            merchant_id: MERCHANT.into(),
            kind: TokenKind::SingleUse as i32,
            shopper_reference: SHOPPER.into(),
            cvc: cvc.clone(),
            ..Default::default()
        };
        let cvc_token = client
            .tokenize(cvc_only)
            .await
            .unwrap()
            .into_inner()
            .token
            .unwrap()
            .token;
        let revealed = client
            .detokenize(DetokenizeRequest {
                cvc_token,
                ..detokenize(MERCHANT, &stored)
            })
            .await
            .unwrap_or_else(|status| panic!("CVC-only token {i}: {status:?}"))
            .into_inner();
        assert_eq!(
            (revealed_number(&revealed), revealed.cvc.clone()),
            (card_number(6000), cvc)
        );
    }
}
