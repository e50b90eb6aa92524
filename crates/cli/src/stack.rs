//! `tessera up`: the whole local development stack from a fresh clone in one command.
//!
//! It ensures the development PKI, writes the vault and gateway configuration into the state
//! directory, starts `tessera-vault` and then `tessera-gateway` as child processes, waits until
//! each answers a real call over mutual TLS, prints how to call the gateway with grpcurl, and on
//! Ctrl-C or SIGTERM stops them in the reverse order. While it runs it supervises both: a child
//! that exits is started again after a back-off, a bounded number of times in a row.

use std::ffi::OsStr;
use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use rustix::process::{kill_process, Pid, Signal};
use serde::Serialize;
use tessera_api::vault::vault_client::VaultClient as VaultRpcClient;
use tessera_api::vault::StatusRequest;
use tessera_gateway::storage::Backend;
use tokio::net::TcpStream;
use tokio::process::{Child, Command};
use tokio::signal::unix::{signal, SignalKind};
use tokio::time::{sleep, timeout, Instant};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;
use zeroize::Zeroizing;

use crate::pki::{self, InitOutcome, PkiError};

/// How long a child may take to become ready.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How often readiness is checked while waiting.
const READY_POLL: Duration = Duration::from_millis(100);
/// How long one readiness call may take. Generous: a probe cut off mid-handshake is exactly
/// what makes a server log a refused handshake.
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a child may take to exit after SIGTERM before it is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// Restarts of one child in a row before `up` gives up and stops the stack: a child that keeps
/// dying (a broken configuration, a port taken by someone else) is not retried forever.
const MAX_RESTARTS: u32 = 5;
/// Wait before the first restart; doubled for each further restart in a row.
const RESTART_BACKOFF_FIRST: Duration = Duration::from_secs(1);
/// Longest wait between restarts.
const RESTART_BACKOFF_MAX: Duration = Duration::from_secs(16);
/// A child that ran this long before it exited counts as healthy: its restart count starts
/// again from zero.
const STABLE_RUN: Duration = Duration::from_secs(60);

/// The development PKI's client certificate the launcher presents to the gateway's health
/// service: the dev caller, whom the gateway already trusts.
const GATEWAY_PROBE_CLIENT: &str = "dev-client";
/// The client certificate the launcher presents to the vault: the operator identity, which the
/// stack's vault serves and whose `Status` call works sealed or unsealed and reads no key.
const VAULT_PROBE_CLIENT: &str = "operator";

const VAULT_BINARY: &str = "tessera-vault";
const GATEWAY_BINARY: &str = "tessera-gateway";

/// Server name the gateway verifies the vault's certificate against (a DNS SAN of vault.pem).
const VAULT_SERVER_NAME: &str = "tessera-vault";
/// Server name grpcurl callers verify the gateway's certificate against.
const GATEWAY_SERVER_NAME: &str = "tessera-gateway";

/// Where the local stack lives. Paths are absolute so the generated configuration works no
/// matter which directory the children are started from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StackLayout {
    /// Holds vault.toml, gateway.toml, the development master key and the SQLite database.
    pub state_dir: PathBuf,
    /// The development PKI (`tessera certs init`).
    pub certs_dir: PathBuf,
    pub gateway_addr: SocketAddr,
    pub vault_addr: SocketAddr,
    /// The gateway's database: `None` for the SQLite file in the state directory, or an SQLite
    /// path or `postgres://` URL given with `tessera up --database`.
    pub database: Option<String>,
}

impl StackLayout {
    pub fn vault_config_path(&self) -> PathBuf {
        self.state_dir.join("vault.toml")
    }

    pub fn gateway_config_path(&self) -> PathBuf {
        self.state_dir.join("gateway.toml")
    }

    pub fn master_key_path(&self) -> PathBuf {
        self.state_dir.join("dev-master-key")
    }

    pub fn database_path(&self) -> PathBuf {
        self.state_dir.join("tessera.db")
    }
}

/// The two configuration files, as TOML text.
#[derive(Debug, PartialEq, Eq)]
pub struct RenderedConfigs {
    pub vault: String,
    pub gateway: String,
}

#[derive(Serialize)]
struct VaultConfig {
    listen: String,
    mode: &'static str,
    tls: ServerTls,
    clients: Vec<VaultClient>,
    master_key: MasterKey,
}

#[derive(Serialize)]
struct ServerTls {
    cert: String,
    key: String,
    client_ca: String,
}

#[derive(Serialize)]
struct VaultClient {
    identity: &'static str,
    role: &'static str,
}

#[derive(Serialize)]
struct MasterKey {
    source: &'static str,
    path: String,
    create_if_missing: bool,
}

#[derive(Serialize)]
struct GatewayConfig {
    listen: String,
    database: String,
    tls: ServerTls,
    vault: VaultEndpoint,
    callers: Vec<Caller>,
}

#[derive(Serialize)]
struct VaultEndpoint {
    endpoints: Vec<String>,
    server_name: &'static str,
    ca: String,
    client_cert: String,
    client_key: String,
}

#[derive(Serialize)]
struct Caller {
    identity: &'static str,
    merchants: Vec<&'static str>,
    operations: Vec<&'static str>,
}

/// Renders vault.toml and gateway.toml for `layout`.
///
/// Serialised with `toml` rather than formatted by hand so that a path containing quotes or
/// backslashes is escaped correctly. Fails only for paths that are not UTF-8 (TOML strings are).
pub fn render_configs(layout: &StackLayout) -> Result<RenderedConfigs, StackError> {
    let certs = |file: &str| utf8(&layout.certs_dir.join(file));
    let vault = VaultConfig {
        listen: layout.vault_addr.to_string(),
        mode: "development",
        tls: ServerTls {
            cert: certs(&pki::cert_file("vault"))?,
            key: certs(&pki::key_file("vault"))?,
            client_ca: certs(pki::CA_CERT)?,
        },
        clients: vec![
            VaultClient {
                identity: "spiffe://tessera/gateway",
                role: "gateway",
            },
            VaultClient {
                identity: "spiffe://tessera/operator",
                role: "operator",
            },
        ],
        master_key: MasterKey {
            source: "development-file",
            path: utf8(&layout.master_key_path())?,
            // The vault, not this tool, creates the development key: key material is only
            // ever generated inside the process that holds it.
            create_if_missing: true,
        },
    };
    let gateway = GatewayConfig {
        listen: layout.gateway_addr.to_string(),
        database: match &layout.database {
            Some(database) => database.clone(),
            None => utf8(&layout.database_path())?,
        },
        tls: ServerTls {
            cert: certs(&pki::cert_file("gateway"))?,
            key: certs(&pki::key_file("gateway"))?,
            client_ca: certs(pki::CA_CERT)?,
        },
        vault: VaultEndpoint {
            endpoints: vec![format!("https://{}", layout.vault_addr)],
            server_name: VAULT_SERVER_NAME,
            ca: certs(pki::CA_CERT)?,
            client_cert: certs(&pki::cert_file("gateway-client"))?,
            client_key: certs(&pki::key_file("gateway-client"))?,
        },
        callers: vec![
            Caller {
                identity: "spiffe://tessera/dev-client",
                merchants: vec!["*"],
                // The development caller may do everything, so every flow can be tried by hand.
                operations: vec![
                    "tokenize",
                    "read_metadata",
                    "list",
                    "detokenize",
                    "detokenize_merchant_initiated",
                    "delete",
                    "extend",
                ],
            },
            // The operator identity of `tessera keys ...` (key rotation and its status).
            Caller {
                identity: "spiffe://tessera/operator",
                merchants: vec!["*"],
                operations: vec!["rotate_keys", "read_metadata"],
            },
        ],
    };
    Ok(RenderedConfigs {
        vault: toml::to_string(&vault).map_err(StackError::Render)?,
        gateway: toml::to_string(&gateway).map_err(StackError::Render)?,
    })
}

fn utf8(path: &Path) -> Result<String, StackError> {
    path.to_str()
        .map(str::to_owned)
        .ok_or_else(|| StackError::NonUtf8Path(path.to_owned()))
}

/// Why `tessera up` failed.
#[derive(Debug)]
#[non_exhaustive]
pub enum StackError {
    /// Creating the development PKI failed.
    Pki(PkiError),
    /// The certificate directory has a CA but lacks other files.
    IncompletePki { dir: PathBuf, missing: Vec<PathBuf> },
    /// A file, directory or process operation failed.
    Io { what: String, source: io::Error },
    /// A path that TOML cannot hold.
    NonUtf8Path(PathBuf),
    /// Serialising a configuration failed.
    Render(toml::ser::Error),
    /// A server binary was not found next to `tessera`.
    MissingBinary(PathBuf),
    /// `cargo build` of the server binaries failed.
    Build(ExitStatus),
    /// Something already accepts connections on an address the stack needs.
    AddressInUse { name: &'static str, addr: SocketAddr },
    /// A child exited before it started listening.
    ExitedEarly { name: &'static str, status: ExitStatus },
    /// A child did not answer the readiness call in time.
    NotReady {
        name: &'static str,
        addr: SocketAddr,
        last_error: String,
    },
    /// A child kept exiting while the stack was running, and `up` gave up restarting it.
    ChildExited {
        name: &'static str,
        status: ExitStatus,
        restarts: u32,
    },
}

impl fmt::Display for StackError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Pki(err) => write!(f, "development PKI: {err}"),
            Self::IncompletePki { dir, missing } => {
                let names: Vec<String> = missing.iter().map(|path| path.display().to_string()).collect();
                write!(
                    f,
                    "{} has a CA but is missing {}; run `tessera certs init --dir {} --force` to recreate it",
                    dir.display(),
                    names.join(", "),
                    dir.display()
                )
            }
            Self::Io { what, source } => write!(f, "{what}: {source}"),
            Self::NonUtf8Path(path) => write!(f, "path {} is not UTF-8", path.display()),
            Self::Render(err) => write!(f, "cannot render configuration: {err}"),
            Self::MissingBinary(path) => write!(
                f,
                "{} not found; build the servers first: cargo build -p tessera-vault -p tessera-gateway \
                 (or start this command with `cargo run -p tessera-cli -- up`, which builds them)",
                path.display()
            ),
            Self::Build(status) => write!(f, "building the servers failed ({status})"),
            Self::AddressInUse { name, addr } => write!(
                f,
                "{addr} (for {name}) already accepts connections: is another stack running? \
                 Stop it or choose another address"
            ),
            Self::ExitedEarly { name, status } => {
                write!(
                    f,
                    "{name} exited before it started listening ({status}); see its log above"
                )
            }
            Self::NotReady {
                name,
                addr,
                last_error,
            } => write!(
                f,
                "{name} did not answer on {addr} within {} s (last attempt: {last_error})",
                READY_TIMEOUT.as_secs()
            ),
            Self::ChildExited {
                name,
                status,
                restarts,
            } => write!(
                f,
                "{name} exited unexpectedly ({status}) after {restarts} restarts in a row; giving up"
            ),
        }
    }
}

impl std::error::Error for StackError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Pki(err) => Some(err),
            Self::Io { source, .. } => Some(source),
            Self::Render(err) => Some(err),
            _ => None,
        }
    }
}

fn io_error(what: impl Into<String>) -> impl FnOnce(io::Error) -> StackError {
    let what = what.into();
    move |source| StackError::Io { what, source }
}

/// Options of `tessera up`, as the user gave them (paths may be relative).
#[derive(Clone, Debug)]
pub struct UpOptions {
    pub state_dir: PathBuf,
    pub certs_dir: PathBuf,
    pub gateway_addr: SocketAddr,
    pub vault_addr: SocketAddr,
    /// `--database`: the gateway's database instead of the SQLite file in the state directory.
    pub database: Option<String>,
}

/// Runs the local stack until Ctrl-C, SIGTERM or SIGHUP (`Ok`), restarting a child that exits;
/// `Err` when a child cannot be started or keeps exiting ([`MAX_RESTARTS`] restarts in a row).
pub async fn up(options: &UpOptions) -> Result<(), StackError> {
    // Signal handlers go in first: from here on, Ctrl-C during start-up still stops the
    // children instead of killing this process and leaving them orphaned.
    let mut shutdown = ShutdownSignals::new()?;

    ensure_pki(&options.certs_dir)?;
    let layout = StackLayout {
        state_dir: absolute(&options.state_dir)?,
        certs_dir: absolute(&options.certs_dir)?,
        gateway_addr: options.gateway_addr,
        vault_addr: options.vault_addr,
        database: options.database.clone(),
    };
    write_configs(&layout)?;
    let binaries = locate_binaries().await?;

    let mut children = Children::default();
    let started = tokio::select! {
        result = children.start(&binaries, &layout) => result.map(|()| true),
        signal = shutdown.recv() => {
            println!("\n{signal} during start-up; stopping");
            Ok(false)
        }
    };
    if !matches!(started, Ok(true)) {
        children.stop().await;
        return started.map(|_| ());
    }

    print_banner(options, &layout);

    let outcome = supervise(&mut children, &binaries, &layout, &mut shutdown).await;
    children.stop().await;
    outcome
}

/// Waits for a stop signal (`Ok`) while restarting whichever child exits, with a back-off,
/// until one has been restarted [`MAX_RESTARTS`] times in a row (`Err`). The children are
/// left for the caller to stop.
async fn supervise(
    children: &mut Children,
    binaries: &Binaries,
    layout: &StackLayout,
    shutdown: &mut ShutdownSignals,
) -> Result<(), StackError> {
    let mut vault_restarts = RestartCount::default();
    let mut gateway_restarts = RestartCount::default();
    loop {
        let (server, status) = tokio::select! {
            signal = shutdown.recv() => {
                println!("\n{signal}; stopping the stack");
                return Ok(());
            }
            exited = children.wait_any() => exited,
        };
        let name = server.binary_name();
        let status = status.map_err(io_error(format!("waiting for {name}")))?;
        children.forget(server);
        let restarts = match server {
            Server::Vault => &mut vault_restarts,
            Server::Gateway => &mut gateway_restarts,
        };
        restarts.child_exited();
        eprintln!("tessera up: {name} exited unexpectedly ({status})");
        // A child that fails to come back counts as another restart in a row, with a longer
        // wait, until the budget is spent.
        loop {
            let Some(delay) = restarts.next_delay() else {
                return Err(StackError::ChildExited {
                    name,
                    status,
                    restarts: MAX_RESTARTS,
                });
            };
            eprintln!(
                "tessera up: restarting {name} in {} ms (restart {} of at most {MAX_RESTARTS} in a row)",
                delay.as_millis(),
                restarts.in_a_row
            );
            let restarted = tokio::select! {
                signal = shutdown.recv() => {
                    println!("\n{signal}; stopping the stack");
                    return Ok(());
                }
                result = async {
                    sleep(delay).await;
                    children.start_one(server, binaries, layout).await
                } => result,
            };
            match restarted {
                Ok(()) => {
                    restarts.started();
                    break;
                }
                Err(err) => {
                    eprintln!("tessera up: {name} did not come back: {err}");
                    if let Some(child) = children.take(server) {
                        terminate(name, child).await;
                    }
                }
            }
        }
    }
}

/// Restarts of one child in a row, for the back-off and the budget.
#[derive(Debug)]
struct RestartCount {
    in_a_row: u32,
    last_start: Instant,
}

impl Default for RestartCount {
    fn default() -> Self {
        Self {
            in_a_row: 0,
            last_start: Instant::now(),
        }
    }
}

impl RestartCount {
    /// A child that had run for [`STABLE_RUN`] was healthy: its next crash starts a new series.
    fn child_exited(&mut self) {
        if self.last_start.elapsed() >= STABLE_RUN {
            self.in_a_row = 0;
        }
    }

    /// Counts one more restart and says how long to wait first; `None` once the budget is spent.
    fn next_delay(&mut self) -> Option<Duration> {
        if self.in_a_row >= MAX_RESTARTS {
            return None;
        }
        self.in_a_row += 1;
        let doublings = self.in_a_row - 1;
        Some(
            RESTART_BACKOFF_FIRST
                .saturating_mul(2u32.saturating_pow(doublings))
                .min(RESTART_BACKOFF_MAX),
        )
    }

    fn started(&mut self) {
        self.last_start = Instant::now();
    }
}

/// Creates the development PKI unless it exists; refuses a partial one.
fn ensure_pki(certs_dir: &Path) -> Result<(), StackError> {
    match pki::init(certs_dir, false).map_err(StackError::Pki)? {
        InitOutcome::Created(files) => {
            println!("Created a development PKI in {}:", certs_dir.display());
            for file in files {
                println!("  {}", file.display());
            }
            Ok(())
        }
        InitOutcome::AlreadyPresent { missing } if missing.is_empty() => {
            println!("Using the existing PKI in {}", certs_dir.display());
            Ok(())
        }
        InitOutcome::AlreadyPresent { missing } => Err(StackError::IncompletePki {
            dir: certs_dir.to_owned(),
            missing,
        }),
    }
}

fn absolute(path: &Path) -> Result<PathBuf, StackError> {
    std::path::absolute(path).map_err(io_error(format!("cannot resolve {}", path.display())))
}

/// Writes both configuration files, replacing earlier ones: they are generated from the
/// command line every time, so edits belong in the options, not the files.
fn write_configs(layout: &StackLayout) -> Result<(), StackError> {
    // Owner-only: the state directory will hold the development master key and the database.
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&layout.state_dir)
        .map_err(io_error(format!("cannot create {}", layout.state_dir.display())))?;
    let configs = render_configs(layout)?;
    for (path, text) in [
        (layout.vault_config_path(), configs.vault),
        (layout.gateway_config_path(), configs.gateway),
    ] {
        std::fs::write(&path, text).map_err(io_error(format!("cannot write {}", path.display())))?;
    }
    Ok(())
}

/// Paths of the two server binaries.
#[derive(Debug)]
struct Binaries {
    vault: PathBuf,
    gateway: PathBuf,
}

/// Finds the server binaries next to this executable. Under `cargo run` it builds them first
/// (a no-op when they are up to date), so a fresh clone works and an edited server is never
/// run stale; outside cargo it uses what is there.
async fn locate_binaries() -> Result<Binaries, StackError> {
    let exe = std::env::current_exe().map_err(io_error("cannot locate the tessera executable"))?;
    let dir = exe.parent().unwrap_or(Path::new("."));
    let binaries = Binaries {
        vault: dir.join(VAULT_BINARY),
        gateway: dir.join(GATEWAY_BINARY),
    };
    let missing = || {
        [&binaries.vault, &binaries.gateway]
            .into_iter()
            .find(|path| !path.is_file())
            .cloned()
    };
    let Some(cargo) = std::env::var_os("CARGO") else {
        return match missing() {
            None => Ok(binaries),
            Some(absent) => Err(StackError::MissingBinary(absent)),
        };
    };

    let mut command = Command::new(&cargo);
    command.args(["build", "-p", VAULT_BINARY, "-p", GATEWAY_BINARY]);
    if dir.file_name() == Some(OsStr::new("release")) {
        command.arg("--release");
    }
    remove_cargo_run_env(&mut command);
    // Build in this workspace even when `up` was started from another directory.
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    if workspace.join("Cargo.toml").is_file() {
        command.current_dir(&workspace);
    }
    eprintln!("running cargo build -p {VAULT_BINARY} -p {GATEWAY_BINARY}");
    let status = command
        .status()
        .await
        .map_err(io_error("cannot run cargo build"))?;
    if !status.success() {
        return Err(StackError::Build(status));
    }
    match missing() {
        None => Ok(binaries),
        Some(absent) => Err(StackError::MissingBinary(absent)),
    }
}

/// Removes the variables `cargo run` set for this process (`CARGO_PKG_NAME`,
/// `CARGO_MANIFEST_DIR`, ...). Build scripts such as ring's declare `rerun-if-env-changed` on
/// them, so a nested build inheriting them would rebuild those crates, and the developer's next
/// plain `cargo build` would rebuild them back.
fn remove_cargo_run_env(command: &mut Command) {
    const SET_BY_CARGO: [&str; 9] = [
        "OUT_DIR",
        "CARGO_MANIFEST_DIR",
        "CARGO_MANIFEST_PATH",
        "CARGO_MANIFEST_LINKS",
        "CARGO_CRATE_NAME",
        "CARGO_BIN_NAME",
        "CARGO_PRIMARY_PACKAGE",
        "CARGO_TARGET_TMPDIR",
        "CARGO_RUSTC_CURRENT_DIR",
    ];
    for (key, _) in std::env::vars_os() {
        let Some(key) = key.to_str() else { continue };
        if SET_BY_CARGO.contains(&key) || key.starts_with("CARGO_PKG_") || key.starts_with("CARGO_BIN_EXE_") {
            command.env_remove(key);
        }
    }
}

/// One of the two servers of the stack.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Server {
    Vault,
    Gateway,
}

impl Server {
    fn binary_name(self) -> &'static str {
        match self {
            Self::Vault => VAULT_BINARY,
            Self::Gateway => GATEWAY_BINARY,
        }
    }
}

/// The running children. Each is `None` until started and after it has been stopped.
#[derive(Debug, Default)]
struct Children {
    vault: Option<Child>,
    gateway: Option<Child>,
    /// Where the children write `NAME.log`; `None`: to this process's terminal, and `up`
    /// reports each start there.
    log_dir: Option<PathBuf>,
}

impl Children {
    /// Starts the vault, waits until it answers, then the gateway (which connects to it).
    async fn start(&mut self, binaries: &Binaries, layout: &StackLayout) -> Result<(), StackError> {
        // A process already listening would answer in the child's place (or make it fail to
        // bind); both addresses are checked before anything starts.
        for (name, addr) in [
            (VAULT_BINARY, layout.vault_addr),
            (GATEWAY_BINARY, layout.gateway_addr),
        ] {
            if accepts_connections(addr).await {
                return Err(StackError::AddressInUse { name, addr });
            }
        }
        self.start_one(Server::Vault, binaries, layout).await?;
        self.start_one(Server::Gateway, binaries, layout).await
    }

    /// Starts one server and waits until it answers a call over mutual TLS.
    async fn start_one(
        &mut self,
        server: Server,
        binaries: &Binaries,
        layout: &StackLayout,
    ) -> Result<(), StackError> {
        let (binary, config, addr) = match server {
            Server::Vault => (&binaries.vault, layout.vault_config_path(), layout.vault_addr),
            Server::Gateway => (
                &binaries.gateway,
                layout.gateway_config_path(),
                layout.gateway_addr,
            ),
        };
        let child = spawn(binary, &config, self.log_dir.as_deref())?;
        let pid = child.id();
        let slot = match server {
            Server::Vault => &mut self.vault,
            Server::Gateway => &mut self.gateway,
        };
        let child = slot.insert(child);
        wait_until_ready(server, child, addr, layout).await?;
        if self.log_dir.is_none() {
            if let Some(pid) = pid {
                println!("tessera up: {} is ready (pid {pid})", server.binary_name());
            }
        }
        Ok(())
    }

    /// Resolves when either child exits.
    async fn wait_any(&mut self) -> (Server, io::Result<ExitStatus>) {
        async fn wait(child: Option<&mut Child>) -> io::Result<ExitStatus> {
            match child {
                Some(child) => child.wait().await,
                None => std::future::pending().await,
            }
        }
        tokio::select! {
            status = wait(self.vault.as_mut()) => (Server::Vault, status),
            status = wait(self.gateway.as_mut()) => (Server::Gateway, status),
        }
    }

    /// Takes a child out of the stack (to stop it, or because it has exited).
    fn take(&mut self, server: Server) -> Option<Child> {
        match server {
            Server::Vault => self.vault.take(),
            Server::Gateway => self.gateway.take(),
        }
    }

    /// Drops a child that has exited and been reaped.
    fn forget(&mut self, server: Server) {
        drop(self.take(server));
    }

    /// Stops the gateway first, so no request is in flight towards a vault that is gone.
    async fn stop(&mut self) {
        if let Some(gateway) = self.gateway.take() {
            terminate(GATEWAY_BINARY, gateway).await;
        }
        if let Some(vault) = self.vault.take() {
            terminate(VAULT_BINARY, vault).await;
        }
    }
}

/// A stack started for another command (`tessera bench --start`) rather than for a person: the
/// children write `tessera-vault.log` and `tessera-gateway.log` into the state directory
/// instead of this terminal, nothing is printed on stdout, and it runs until [`Self::stop`]
/// rather than until a signal. The caller writes the configuration files first.
#[derive(Debug)]
pub struct BackgroundStack {
    children: Children,
}

impl BackgroundStack {
    /// Starts the vault and then the gateway from the configuration files in `layout.state_dir`.
    pub async fn start(layout: &StackLayout) -> Result<Self, StackError> {
        let binaries = locate_binaries().await?;
        let mut children = Children {
            log_dir: Some(layout.state_dir.clone()),
            ..Children::default()
        };
        if let Err(err) = children.start(&binaries, layout).await {
            children.stop().await;
            return Err(err);
        }
        Ok(Self { children })
    }

    /// Process ids of the vault and the gateway, for reading their CPU use.
    pub fn pids(&self) -> (Option<u32>, Option<u32>) {
        (
            self.children.vault.as_ref().and_then(Child::id),
            self.children.gateway.as_ref().and_then(Child::id),
        )
    }

    /// Stops the gateway, then the vault.
    pub async fn stop(mut self) {
        self.children.stop().await;
    }
}

fn spawn(binary: &Path, config: &Path, log_dir: Option<&Path>) -> Result<Child, StackError> {
    let (stdout, stderr) = match log_dir {
        Some(dir) => {
            let name = binary.file_name().unwrap_or(OsStr::new("child"));
            let path = dir.join(name).with_extension("log");
            let log = std::fs::File::create(&path)
                .map_err(io_error(format!("cannot create {}", path.display())))?;
            let log_err = log
                .try_clone()
                .map_err(io_error(format!("cannot open {}", path.display())))?;
            (Stdio::from(log), Stdio::from(log_err))
        }
        None => (Stdio::inherit(), Stdio::inherit()),
    };
    Command::new(binary)
        .arg("--config")
        .arg(config)
        .stdin(Stdio::null())
        .stdout(stdout)
        .stderr(stderr)
        // Own process group: a terminal Ctrl-C reaches only this process, which then stops
        // the gateway before the vault instead of both dying at once in arbitrary order.
        .process_group(0)
        // If `up` returns early on an error path, no child outlives it.
        .kill_on_drop(true)
        .spawn()
        .map_err(io_error(format!("cannot start {}", binary.display())))
}

async fn accepts_connections(addr: SocketAddr) -> bool {
    matches!(timeout(READY_POLL, TcpStream::connect(addr)).await, Ok(Ok(_)))
}

/// Waits until `server` answers its readiness call, failing early if the child exits.
///
/// Readiness is a real call over mutual TLS, not a bare TCP connect: a connection closed
/// before the TLS handshake is logged by the servers as a refused handshake, and a listening
/// socket does not prove that the server can authenticate callers or reach its database.
async fn wait_until_ready(
    server: Server,
    child: &mut Child,
    addr: SocketAddr,
    layout: &StackLayout,
) -> Result<(), StackError> {
    let name = server.binary_name();
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        if let Some(status) = child
            .try_wait()
            .map_err(io_error(format!("checking on {name}")))?
        {
            return Err(StackError::ExitedEarly { name, status });
        }
        // No bare TCP connect first: a server logs a connection closed before the handshake as
        // a refused handshake, and a closed port fails the TLS connect at once anyway.
        let last_error = match probe(server, addr, layout).await {
            Ok(()) => return Ok(()),
            Err(err) => err,
        };
        if Instant::now() >= deadline {
            return Err(StackError::NotReady {
                name,
                addr,
                last_error,
            });
        }
        sleep(READY_POLL).await;
    }
}

/// One readiness call: the standard `grpc.health.v1.Health/Check` of the gateway's public
/// service as the dev client, or the vault's `Status` as the operator.
async fn probe(server: Server, addr: SocketAddr, layout: &StackLayout) -> Result<(), String> {
    match server {
        Server::Gateway => {
            let channel = probe_channel(layout, addr, GATEWAY_SERVER_NAME, GATEWAY_PROBE_CLIENT).await?;
            let answer = HealthClient::new(channel)
                .check(HealthCheckRequest {
                    service: "tessera.v1.Tokenization".to_owned(),
                })
                .await
                .map_err(|status| format!("health check: {}", status.message()))?;
            match answer.into_inner().status() {
                ServingStatus::Serving => Ok(()),
                other => Err(format!("health check: {}", other.as_str_name())),
            }
        }
        Server::Vault => {
            let channel = probe_channel(layout, addr, VAULT_SERVER_NAME, VAULT_PROBE_CLIENT).await?;
            let status = VaultRpcClient::new(channel)
                .status(StatusRequest {})
                .await
                .map_err(|status| format!("vault status: {}", status.message()))?
                .into_inner();
            // The stack's vault loads the development key file at start, so it is never
            // sealed; a sealed vault would answer every data call with VAULT_SEALED.
            if status.sealed {
                return Err("the vault is sealed (unseal it with `tessera vault unseal`)".to_owned());
            }
            Ok(())
        }
    }
}

/// A mutual-TLS channel to `addr` presenting the development PKI's `client` certificate.
async fn probe_channel(
    layout: &StackLayout,
    addr: SocketAddr,
    server_name: &str,
    client: &str,
) -> Result<Channel, String> {
    let read = |file: &str| {
        let path = layout.certs_dir.join(file);
        std::fs::read(&path).map_err(|err| format!("cannot read {}: {err}", path.display()))
    };
    let ca = read(pki::CA_CERT)?;
    let cert = read(&pki::cert_file(client))?;
    let key = Zeroizing::new(read(&pki::key_file(client))?);
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca))
        .identity(Identity::from_pem(cert, key.as_slice()))
        .domain_name(server_name);
    Endpoint::from_shared(format!("https://{addr}"))
        .map_err(|err| err.to_string())?
        .connect_timeout(PROBE_TIMEOUT)
        .timeout(PROBE_TIMEOUT)
        .tls_config(tls)
        .map_err(|err| err.to_string())?
        .connect()
        .await
        .map_err(|err| format!("connect: {err}"))
}

/// SIGTERM, then up to [`STOP_TIMEOUT`] for a clean exit, then SIGKILL.
async fn terminate(name: &'static str, mut child: Child) {
    if let Ok(Some(status)) = child.try_wait() {
        eprintln!("{name} had already exited ({status})");
        return;
    }
    // The PID cannot have been reused: tokio reaps a child only in `wait`/`try_wait`, and
    // neither has seen it exit, so the PID still names this child (at worst a zombie).
    let pid = child
        .id()
        .and_then(|id| i32::try_from(id).ok())
        .and_then(Pid::from_raw);
    if let Some(pid) = pid {
        if let Err(err) = kill_process(pid, Signal::TERM) {
            eprintln!("cannot send SIGTERM to {name} ({pid:?}): {err}");
        }
    }
    match timeout(STOP_TIMEOUT, child.wait()).await {
        Ok(Ok(status)) => eprintln!("{name} stopped ({status})"),
        Ok(Err(err)) => eprintln!("waiting for {name}: {err}"),
        Err(_) => {
            eprintln!(
                "{name} did not stop within {} s; killing it",
                STOP_TIMEOUT.as_secs()
            );
            if let Err(err) = child.kill().await {
                eprintln!("cannot kill {name}: {err}");
            }
        }
    }
}

/// The signals that stop the stack. Registered eagerly (unlike `tokio::signal::ctrl_c`, which
/// installs its handler on first poll) so none is lost to the default action during start-up.
struct ShutdownSignals {
    interrupt: tokio::signal::unix::Signal,
    terminate: tokio::signal::unix::Signal,
    hangup: tokio::signal::unix::Signal,
}

impl ShutdownSignals {
    fn new() -> Result<Self, StackError> {
        let install = |kind: SignalKind| signal(kind).map_err(io_error("cannot install a signal handler"));
        Ok(Self {
            interrupt: install(SignalKind::interrupt())?,
            terminate: install(SignalKind::terminate())?,
            hangup: install(SignalKind::hangup())?,
        })
    }

    /// Waits for the next stop signal and names it.
    async fn recv(&mut self) -> &'static str {
        tokio::select! {
            _ = self.interrupt.recv() => "interrupted (Ctrl-C)",
            _ = self.terminate.recv() => "SIGTERM received",
            _ = self.hangup.recv() => "SIGHUP received",
        }
    }
}

/// Quotes `text` for a POSIX shell when it holds anything but plain path characters.
fn shell_word(text: &str) -> String {
    let plain = !text.is_empty()
        && text.chars().all(|c| {
            c.is_ascii_alphanumeric() || matches!(c, '/' | '.' | '-' | '_' | ':' | '@' | '+' | '=' | ',')
        });
    if plain {
        text.to_owned()
    } else {
        format!("'{}'", text.replace('\'', r"'\''"))
    }
}

/// The grpcurl commands printed by `up`, using the certificate paths as the user gave them so
/// they can be pasted into the same shell.
pub fn grpcurl_examples(certs_dir: &Path, gateway_addr: SocketAddr) -> Vec<String> {
    let path = |file: &str| shell_word(&certs_dir.join(file).display().to_string());
    let base = format!(
        "grpcurl -cacert {} -cert {} -key {} -authority {GATEWAY_SERVER_NAME} {gateway_addr}",
        path(pki::CA_CERT),
        path(&pki::cert_file("dev-client")),
        path(&pki::key_file("dev-client")),
    );
    // The -d flag must come before the address, so data calls are assembled separately.
    let with_data = |data: &str, method: &str| {
        format!(
            "grpcurl -cacert {} -cert {} -key {} -authority {GATEWAY_SERVER_NAME} -d '{data}' {gateway_addr} tessera.v1.Tokenization/{method}",
            path(pki::CA_CERT),
            path(&pki::cert_file("dev-client")),
            path(&pki::key_file("dev-client")),
        )
    };
    let card = r#"{"merchant_id":"m_demo","shopper_reference":"shopper-1","card":{"number":"4111111111111111","expiry_month":12,"expiry_year":2030,"holder_name":"Ada Lovelace"}}"#;
    let token = r#"{"merchant_id":"m_demo","token":"<token from above>"}"#;
    // A detokenize states why: here a cardholder's one-click payment with a stored card.
    let one_click = r#"{"merchant_id":"m_demo","token":"<token from above>","shopper_reference":"shopper-1","purpose":{"initiator":"INITIATOR_CARDHOLDER","recurring_model":"RECURRING_MODEL_CARD_ON_FILE","shopper_interaction":"SHOPPER_INTERACTION_ECOMMERCE"}}"#;
    let list = r#"{"merchant_id":"m_demo","shopper_reference":"shopper-1"}"#;
    vec![
        format!("{base} list"),
        format!("{base} describe tessera.v1.Tokenization"),
        with_data(card, "Tokenize"),
        with_data(token, "GetToken"),
        with_data(one_click, "Detokenize"),
        with_data(list, "ListTokens"),
        with_data(token, "GetTokenHistory"),
    ]
}

fn print_banner(options: &UpOptions, layout: &StackLayout) {
    let rule = "=".repeat(88);
    let master_key = options.state_dir.join("dev-master-key");
    println!();
    println!("{rule}");
    println!("  TESSERA DEVELOPMENT STACK -- NOT FOR REAL CARD DATA");
    println!();
    println!("  The vault runs in development mode with a DEVELOPMENT MASTER KEY stored unencrypted");
    println!(
        "  in {}. Anyone who can read that file can decrypt every token.",
        master_key.display()
    );
    println!(
        "  The certificates in {} come from a development CA.",
        options.certs_dir.display()
    );
    println!("  Never put production card data into this stack.");
    println!("{rule}");
    println!();
    println!(
        "  gateway  {}  (mTLS; server name {GATEWAY_SERVER_NAME})",
        layout.gateway_addr
    );
    println!(
        "  vault    {}  (mTLS; serves the gateway and operator identities only)",
        layout.vault_addr
    );
    println!(
        "  config   {}, {}",
        options.state_dir.join("vault.toml").display(),
        options.state_dir.join("gateway.toml").display()
    );
    // A URL may carry a password: name the backend, not the URL.
    let database = match &options.database {
        Some(url) if Backend::of(url) == Backend::Postgres => "PostgreSQL (--database)".to_owned(),
        Some(path) => format!("SQLite {path}"),
        None => format!("SQLite {}", options.state_dir.join("tessera.db").display()),
    };
    println!("  database {database}");
    println!();
    println!(
        "  A vault or gateway that exits is restarted (after 1 s, doubling; at most {MAX_RESTARTS} times in a row)."
    );
    println!();
    println!("Try it (as spiffe://tessera/dev-client, allowed every operation for every merchant):");
    println!();
    for command in grpcurl_examples(&options.certs_dir, layout.gateway_addr) {
        println!("  {command}");
        println!();
    }
    println!("Press Ctrl-C to stop the stack.");
}

#[cfg(test)]
mod tests {
    #![allow(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::panic,
        clippy::indexing_slicing
    )]

    use super::*;

    fn layout(root: &str) -> StackLayout {
        StackLayout {
            state_dir: PathBuf::from(format!("{root}/.tessera")),
            certs_dir: PathBuf::from(format!("{root}/certs")),
            gateway_addr: "127.0.0.1:8443".parse().unwrap(),
            vault_addr: "127.0.0.1:7443".parse().unwrap(),
            database: None,
        }
    }

    fn get<'a>(table: &'a toml::Table, path: &str) -> &'a toml::Value {
        let mut parts = path.split('.');
        let mut value = table
            .get(parts.next().unwrap())
            .unwrap_or_else(|| panic!("{path}"));
        for part in parts {
            value = value.get(part).unwrap_or_else(|| panic!("{path}"));
        }
        value
    }

    fn str_at<'a>(table: &'a toml::Table, path: &str) -> &'a str {
        get(table, path)
            .as_str()
            .unwrap_or_else(|| panic!("{path} is not a string"))
    }

    #[test]
    fn vault_config_has_the_documented_shape() {
        let configs = render_configs(&layout("/abs")).unwrap();
        let vault: toml::Table = configs.vault.parse().unwrap();
        assert_eq!(str_at(&vault, "listen"), "127.0.0.1:7443");
        assert_eq!(str_at(&vault, "mode"), "development");
        assert_eq!(str_at(&vault, "tls.cert"), "/abs/certs/vault.pem");
        assert_eq!(str_at(&vault, "tls.key"), "/abs/certs/vault-key.pem");
        assert_eq!(str_at(&vault, "tls.client_ca"), "/abs/certs/ca.pem");
        let clients = get(&vault, "clients").as_array().unwrap();
        let clients: Vec<(&str, &str)> = clients
            .iter()
            .map(|client| {
                (
                    client["identity"].as_str().unwrap(),
                    client["role"].as_str().unwrap(),
                )
            })
            .collect();
        assert_eq!(
            clients,
            [
                ("spiffe://tessera/gateway", "gateway"),
                ("spiffe://tessera/operator", "operator")
            ]
        );
        assert_eq!(str_at(&vault, "master_key.source"), "development-file");
        assert_eq!(str_at(&vault, "master_key.path"), "/abs/.tessera/dev-master-key");
        assert_eq!(get(&vault, "master_key.create_if_missing").as_bool(), Some(true));
        assert_eq!(vault.len(), 5, "no unexpected keys: {vault:?}");
    }

    #[test]
    fn gateway_config_has_the_documented_shape() {
        let configs = render_configs(&layout("/abs")).unwrap();
        let gateway: toml::Table = configs.gateway.parse().unwrap();
        assert_eq!(str_at(&gateway, "listen"), "127.0.0.1:8443");
        assert_eq!(str_at(&gateway, "database"), "/abs/.tessera/tessera.db");
        assert_eq!(str_at(&gateway, "tls.cert"), "/abs/certs/gateway.pem");
        assert_eq!(str_at(&gateway, "tls.key"), "/abs/certs/gateway-key.pem");
        assert_eq!(str_at(&gateway, "tls.client_ca"), "/abs/certs/ca.pem");
        let endpoints = get(&gateway, "vault.endpoints").as_array().unwrap();
        assert_eq!(endpoints, &[toml::Value::from("https://127.0.0.1:7443")]);
        assert_eq!(str_at(&gateway, "vault.server_name"), "tessera-vault");
        assert_eq!(str_at(&gateway, "vault.ca"), "/abs/certs/ca.pem");
        assert_eq!(
            str_at(&gateway, "vault.client_cert"),
            "/abs/certs/gateway-client.pem"
        );
        assert_eq!(
            str_at(&gateway, "vault.client_key"),
            "/abs/certs/gateway-client-key.pem"
        );
        let callers = get(&gateway, "callers").as_array().unwrap();
        assert_eq!(callers.len(), 2);
        assert_eq!(callers[1]["identity"].as_str(), Some("spiffe://tessera/operator"));
        let caller = &callers[0];
        assert_eq!(caller["identity"].as_str(), Some("spiffe://tessera/dev-client"));
        assert_eq!(caller["merchants"].as_array().unwrap(), &[toml::Value::from("*")]);
        let operations: Vec<&str> = caller["operations"]
            .as_array()
            .unwrap()
            .iter()
            .map(|op| op.as_str().unwrap())
            .collect();
        assert_eq!(
            operations,
            [
                "tokenize",
                "read_metadata",
                "list",
                "detokenize",
                "detokenize_merchant_initiated",
                "delete",
                "extend"
            ]
        );
        assert_eq!(gateway.len(), 5, "no unexpected keys: {gateway:?}");
    }

    #[test]
    fn database_option_replaces_the_sqlite_file() {
        let mut layout = layout("/abs");
        let url = "postgres://postgres@127.0.0.1:5432/tessera_dev?sslmode=disable";
        layout.database = Some(url.to_owned());
        let configs = render_configs(&layout).unwrap();
        let gateway: toml::Table = configs.gateway.parse().unwrap();
        assert_eq!(str_at(&gateway, "database"), url);
    }

    #[test]
    fn restarts_back_off_and_are_bounded() {
        let mut restarts = RestartCount::default();
        let delays: Vec<Duration> = std::iter::from_fn(|| restarts.next_delay()).collect();
        assert_eq!(
            delays,
            [1, 2, 4, 8, 16].map(Duration::from_secs),
            "doubling from {RESTART_BACKOFF_FIRST:?}, capped at {RESTART_BACKOFF_MAX:?}"
        );
        assert_eq!(delays.len(), MAX_RESTARTS as usize);
        // A crash soon after a restart continues the series; only a stable run resets it.
        restarts.started();
        restarts.child_exited();
        assert_eq!(restarts.next_delay(), None);
        restarts.last_start = Instant::now() - STABLE_RUN;
        restarts.child_exited();
        assert_eq!(restarts.next_delay(), Some(RESTART_BACKOFF_FIRST));
    }

    #[test]
    fn paths_with_quotes_and_backslashes_survive_the_round_trip() {
        let root = r#"/tmp/it's "quoted" \ odd"#;
        let configs = render_configs(&layout(root)).unwrap();
        let vault: toml::Table = configs.vault.parse().unwrap();
        let gateway: toml::Table = configs.gateway.parse().unwrap();
        assert_eq!(str_at(&vault, "tls.cert"), format!("{root}/certs/vault.pem"));
        assert_eq!(
            str_at(&gateway, "database"),
            format!("{root}/.tessera/tessera.db")
        );
    }

    #[test]
    fn addresses_flow_into_both_configs() {
        let mut layout = layout("/abs");
        layout.vault_addr = "127.0.0.1:17443".parse().unwrap();
        layout.gateway_addr = "[::1]:18443".parse().unwrap();
        let configs = render_configs(&layout).unwrap();
        let vault: toml::Table = configs.vault.parse().unwrap();
        let gateway: toml::Table = configs.gateway.parse().unwrap();
        assert_eq!(str_at(&vault, "listen"), "127.0.0.1:17443");
        assert_eq!(str_at(&gateway, "listen"), "[::1]:18443");
        assert_eq!(
            get(&gateway, "vault.endpoints").as_array().unwrap()[0].as_str(),
            Some("https://127.0.0.1:17443")
        );
    }

    #[test]
    fn non_utf8_paths_are_an_error_not_a_panic() {
        use std::os::unix::ffi::OsStrExt;
        let mut layout = layout("/abs");
        layout.certs_dir = PathBuf::from(OsStr::from_bytes(b"/abs/\xff"));
        assert!(matches!(render_configs(&layout), Err(StackError::NonUtf8Path(_))));
    }

    #[test]
    fn grpcurl_examples_use_the_dev_client_and_quote_odd_paths() {
        let examples = grpcurl_examples(Path::new("certs"), "127.0.0.1:8443".parse().unwrap());
        assert_eq!(
            examples[0],
            "grpcurl -cacert certs/ca.pem -cert certs/dev-client.pem -key certs/dev-client-key.pem \
             -authority tessera-gateway 127.0.0.1:8443 list"
        );
        assert!(examples[2].ends_with("127.0.0.1:8443 tessera.v1.Tokenization/Tokenize"));
        assert!(examples[2].contains(r#"-d '{"merchant_id":"m_demo","shopper_reference":"shopper-1","card":{"number":"4111111111111111""#));
        assert!(examples[4].ends_with("tessera.v1.Tokenization/Detokenize"));

        let odd = grpcurl_examples(Path::new("my certs/it's"), "127.0.0.1:8443".parse().unwrap());
        assert!(odd[0].contains(r"-cacert 'my certs/it'\''s/ca.pem'"));
    }
}
