//! `tessera up` run as a real process, as a new user runs it: its start-up log, the gateway on
//! PostgreSQL with `--database`, and its supervision of the vault and the gateway (each killed
//! with SIGKILL comes back by itself).
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use std::fs::{self, File};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;
use tessera_api::v1::tokenization_client::TokenizationClient;

use common::requests::tokenize_card;
use common::{binaries, free_port, require_postgres, try_channel, TestDatabase};

/// How long `up` may take to build nothing, create a PKI and start both servers.
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a killed server may take to be answering again: `up`'s first restart waits 1 s,
/// the gateway probes a vault that went away after 1 s, then 2 s, 4 s; the rest is margin for
/// a loaded machine.
const RECOVERY_TIMEOUT: Duration = Duration::from_secs(45);
/// The last line `up` prints once both servers are ready.
const READY_LINE: &str = "Press Ctrl-C to stop the stack.";

/// The vault's deliberate development-mode labels (a development master key, no audit log
/// configured, a memory-lock limit of the machine). They describe the development stack, not a
/// fault, and `up`'s banner says the same; every other WARN or ERROR line is a failure.
const DEVELOPMENT_LABELS: [&str; 4] = [
    "CREATED A DEVELOPMENT MASTER KEY - NOT FOR PRODUCTION",
    "USING A DEVELOPMENT MASTER KEY FROM A FILE - NOT FOR PRODUCTION",
    "no [audit] log configured: operations are NOT audited (development only)",
    "MEMORY NOT LOCKED: the memory-lock limit is",
];

/// A running `tessera up` in a directory of its own, its output (and its children's, which
/// inherit it) in `up.log`.
struct Up {
    child: Child,
    dir: TempDir,
    gateway_addr: SocketAddr,
}

impl Up {
    fn start(extra_args: &[&str]) -> Self {
        let tessera = binaries().tessera;
        let dir = tempfile::tempdir().unwrap();
        let log = File::create(dir.path().join("up.log")).unwrap();
        let gateway_addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let vault_addr = format!("127.0.0.1:{}", free_port());
        let child = Command::new(tessera)
            .current_dir(dir.path())
            .args([
                "up",
                "--gateway-addr",
                &gateway_addr.to_string(),
                "--vault-addr",
                &vault_addr,
            ])
            .args(extra_args)
            // Without CARGO, `up` runs the servers next to it instead of running cargo build
            // (the harness has built them).
            .env_remove("CARGO")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let mut up = Self {
            child,
            dir,
            gateway_addr,
        };
        let deadline = Instant::now() + START_TIMEOUT;
        while !up.log().contains(READY_LINE) {
            if let Some(status) = up.child.try_wait().unwrap() {
                panic!("tessera up exited during start ({status}):\n{}", up.log());
            }
            assert!(Instant::now() < deadline, "tessera up not ready:\n{}", up.log());
            std::thread::sleep(Duration::from_millis(100));
        }
        up
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("up.log")
    }

    /// Everything `up` and its children printed so far, without terminal colour codes.
    fn log(&self) -> String {
        strip_ansi(&fs::read_to_string(self.log_path()).unwrap_or_default())
    }

    /// The process id of `up`'s running child `name`, from the kernel's process table (not
    /// from `up`'s own report, which a launcher that does not supervise would not give).
    fn pid_of(&self, name: &str) -> u32 {
        let up = self.child.id();
        let tasks = fs::read_dir(format!("/proc/{up}/task")).unwrap();
        let children: Vec<u32> = tasks
            .flatten()
            .filter_map(|task| fs::read_to_string(task.path().join("children")).ok())
            .flat_map(|list| {
                list.split_whitespace()
                    .filter_map(|pid| pid.parse().ok())
                    .collect::<Vec<u32>>()
            })
            .collect();
        children
            .into_iter()
            .find(|pid| {
                fs::read_link(format!("/proc/{pid}/exe"))
                    .is_ok_and(|exe| exe.file_name().is_some_and(|file| file == name))
            })
            .unwrap_or_else(|| panic!("tessera up has no running {name}:\n{}", self.log()))
    }

    async fn tokenize(&self) -> Result<String, String> {
        let certs = self.dir.path().join("certs");
        let channel = try_channel(
            self.gateway_addr,
            "tessera-gateway",
            &certs.join("ca.pem"),
            &certs.join("dev-client.pem"),
            &certs.join("dev-client-key.pem"),
        )
        .await
        .map_err(|err| format!("connect: {err:?}"))?;
        let response = TokenizationClient::new(channel)
            .tokenize(tokenize_card("m_demo", "4111111111111111"))
            .await
            .map_err(|status| format!("{:?}: {}", status.code(), status.message()))?;
        Ok(response.into_inner().token.unwrap().token)
    }

    /// Tokenizes until it succeeds, failing after [`RECOVERY_TIMEOUT`]; returns how long it took.
    async fn tokenize_within_recovery_time(&self) -> Duration {
        let started = Instant::now();
        loop {
            match self.tokenize().await {
                Ok(_) => return started.elapsed(),
                Err(err) if started.elapsed() > RECOVERY_TIMEOUT => panic!(
                    "no successful tokenize within {RECOVERY_TIMEOUT:?} (last: {err}):\n{}",
                    self.log()
                ),
                Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
    }

    /// SIGTERM, as Ctrl-C would, and waits for `up` to stop both servers and exit.
    fn stop(&mut self) -> ExitStatus {
        signal(self.child.id(), "TERM");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("tessera up did not stop on SIGTERM:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Up {
    fn drop(&mut self) {
        // SIGTERM, not SIGKILL: `up` must live to stop its children, or they outlive the test.
        if matches!(self.child.try_wait(), Ok(None)) {
            signal(self.child.id(), "TERM");
            let deadline = Instant::now() + Duration::from_secs(20);
            while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Sends signal `name` with the `kill` program (procps), as a user at a terminal would; the
/// test crate has no signal API of its own.
fn signal(pid: u32, name: &str) {
    let status = Command::new("kill")
        .args([format!("-{name}"), pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success(), "kill -{name} {pid} failed");
}

/// Removes `ESC [ ... letter` sequences (the servers colour their log levels).
fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for next in chars.by_ref() {
                if next.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Log lines at WARN or ERROR (tracing's format: timestamp, level, target), and any line
/// mentioning a refused or failed TLS handshake, other than the development-mode labels.
fn warnings(log: &str) -> Vec<&str> {
    log.lines()
        .filter(|line| {
            let level = line.split_whitespace().nth(1);
            matches!(level, Some("WARN" | "ERROR")) || line.contains("handshake")
        })
        .filter(|line| !DEVELOPMENT_LABELS.iter().any(|label| line.contains(label)))
        .collect()
}

#[tokio::test]
async fn a_normal_start_logs_no_warning_and_serves() {
    let mut up = Up::start(&[]);
    up.tokenize().await.unwrap();
    let log = up.log();
    let warnings = warnings(&log);
    assert!(
        warnings.is_empty(),
        "warnings on a normal start: {warnings:#?}\nfull log:\n{log}"
    );
    // The SQLite default: the database file in the state directory.
    assert!(up.dir.path().join(".tessera/tessera.db").is_file(), "{log}");
    let status = up.stop();
    assert!(status.success(), "{status}:\n{}", up.log());
}

#[tokio::test]
async fn database_option_runs_the_gateway_on_postgres() {
    if !require_postgres("database_option_runs_the_gateway_on_postgres") {
        return;
    }
    let database = TestDatabase::create();
    let url = database.url();
    let mut up = Up::start(&["--database", &url]);
    let token = up.tokenize().await.unwrap();

    // The token is in PostgreSQL, and no SQLite file was made next to the configuration.
    sqlx::any::install_default_drivers();
    let pool = sqlx::any::AnyPoolOptions::new()
        .max_connections(1)
        .connect(&url)
        .await
        .unwrap();
    let stored: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM tokens WHERE token = $1")
        .bind(&token)
        .fetch_one(&pool)
        .await
        .unwrap();
    pool.close().await;
    assert_eq!(stored, 1, "{}", up.log());
    assert!(!up.dir.path().join(".tessera/tessera.db").exists());
    let gateway_toml = fs::read_to_string(up.dir.path().join(".tessera/gateway.toml")).unwrap();
    assert!(gateway_toml.contains(&url), "{gateway_toml}");

    let status = up.stop();
    assert!(status.success(), "{status}:\n{}", up.log());
}

#[tokio::test]
async fn up_restarts_a_killed_gateway_and_a_killed_vault() {
    let mut up = Up::start(&[]);
    up.tokenize().await.unwrap();

    let gateway = up.pid_of("tessera-gateway");
    signal(gateway, "KILL");
    let took = up.tokenize_within_recovery_time().await;
    assert_ne!(up.pid_of("tessera-gateway"), gateway, "{}", up.log());
    eprintln!("tokenize succeeded again {took:?} after the gateway was killed");

    // Tokenize needs the vault, so a success proves the restarted vault serves the gateway.
    let vault = up.pid_of("tessera-vault");
    signal(vault, "KILL");
    let took = up.tokenize_within_recovery_time().await;
    assert_ne!(up.pid_of("tessera-vault"), vault, "{}", up.log());
    eprintln!("tokenize succeeded again {took:?} after the vault was killed");

    let log = up.log();
    for name in ["tessera-gateway", "tessera-vault"] {
        assert!(
            log.contains(&format!("tessera up: {name} exited unexpectedly (signal: 9")),
            "{log}"
        );
        assert!(
            log.contains(&format!("tessera up: restarting {name} in ")),
            "{log}"
        );
    }
    let status = up.stop();
    assert!(status.success(), "{status}:\n{}", up.log());
}
