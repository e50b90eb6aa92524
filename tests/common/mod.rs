//! End-to-end test harness: builds the three binaries once per test process, creates a fresh
//! development PKI per test, starts the vault and gateway as real child processes on free
//! ports and connects to them with mutual TLS.
//!
//! Compiled into every test binary that says `mod common;`, so not every helper is used by
//! every file.
#![allow(dead_code)]
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

pub mod requests;
pub mod stream;

use std::collections::BTreeSet;
use std::ffi::OsStr;
use std::fs::{self, OpenOptions};
use std::io::Write as _;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Mutex, OnceLock, PoisonError};
use std::thread::sleep;
use std::time::{Duration, Instant};

use serde::Serialize;
use tempfile::TempDir;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

/// How long a server may take to start listening.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
const READY_POLL: Duration = Duration::from_millis(100);

/// Set to `1` (CI does) to turn a missing grpcurl into a failure instead of a skip.
pub const REQUIRE_GRPCURL_ENV: &str = "TESSERA_REQUIRE_GRPCURL";

/// Paths of the binaries under test.
#[derive(Clone, Debug)]
pub struct Binaries {
    pub vault: PathBuf,
    pub gateway: PathBuf,
    pub tessera: PathBuf,
}

/// Builds `tessera-vault`, `tessera-gateway` and `tessera` once per test process and returns
/// their paths.
///
/// `cargo test` builds only the binaries of the package under test, and these live in other
/// packages, so the harness runs `cargo build` itself. Cargo has released its build lock by
/// the time tests run, so the nested build does not deadlock; it uses the same profile and
/// target directory as the test executable, so an up-to-date build is a quick no-op.
pub fn binaries() -> Binaries {
    static BINARIES: OnceLock<Binaries> = OnceLock::new();
    BINARIES.get_or_init(build_binaries).clone()
}

fn build_binaries() -> Binaries {
    // The test executable is target/<profile>/deps/<name>-<hash>; binaries are in target/<profile>.
    let exe = std::env::current_exe().expect("test executable path");
    let bin_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("test executable is in target/<profile>/deps");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut command = Command::new(&cargo);
    command.current_dir(env!("CARGO_MANIFEST_DIR")).args([
        "build",
        "-p",
        "tessera-vault",
        "-p",
        "tessera-gateway",
        "-p",
        "tessera-cli",
    ]);
    if bin_dir.file_name() == Some(OsStr::new("release")) {
        command.arg("--release");
    }
    remove_cargo_run_env(&mut command);
    // Straight to stderr, not through the test's captured output: a first build can take
    // minutes and whoever is waiting should see why.
    let _ = writeln!(
        std::io::stderr(),
        "test harness: building tessera-vault, tessera-gateway and tessera ({} build ...)",
        Path::new(&cargo).display()
    );
    let status = command.status().expect("run cargo build");
    assert!(
        status.success(),
        "cargo build of the binaries under test failed ({status})"
    );
    let binaries = Binaries {
        vault: bin_dir.join("tessera-vault"),
        gateway: bin_dir.join("tessera-gateway"),
        tessera: bin_dir.join("tessera"),
    };
    for path in [&binaries.vault, &binaries.gateway, &binaries.tessera] {
        assert!(path.is_file(), "{} was not built", path.display());
    }
    binaries
}

/// Removes the variables cargo sets for the test process it runs (`CARGO_PKG_NAME`,
/// `CARGO_MANIFEST_DIR`, `OUT_DIR`, ...). Build scripts such as ring's declare
/// `rerun-if-env-changed` on them, so a nested build that inherits them would see a different
/// environment than the outer `cargo test` and rebuild those crates (and everything above
/// them) every time the two alternate.
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

/// Runs `tessera ARGS`, panicking with its output if it fails.
pub fn run_tessera<I, S>(args: I) -> Output
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let output = Command::new(binaries().tessera)
        .args(args)
        .output()
        .expect("run tessera");
    assert!(
        output.status.success(),
        "tessera failed ({}):\nstdout:\n{}\nstderr:\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

/// A port that was free a moment ago and that no other stack of this test process was given.
/// The tests of one binary run in parallel in one process (cargo runs the binaries one after
/// another), and the kernel may hand a released ephemeral port out again: two stacks once got
/// the same port, and a test's client reached the other test's gateway (`BadSignature`: a CA it
/// did not trust). Remembering every port handed out rules that out; another process taking
/// the port before the server binds it is caught by `wait_until_listening`.
pub fn free_port() -> u16 {
    static GIVEN: Mutex<BTreeSet<u16>> = Mutex::new(BTreeSet::new());
    let mut given = GIVEN.lock().unwrap_or_else(PoisonError::into_inner);
    // Bounded: a fresh ephemeral port is almost always new; the range has thousands.
    for _ in 0..1000 {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
        let port = listener.local_addr().expect("local address").port();
        if given.insert(port) {
            return port;
        }
    }
    panic!("no ephemeral port left that this test process has not handed out");
}

/// Whether process `pid` holds a socket listening on TCP `port`, from the kernel's socket
/// tables and the process's file descriptors. Where `/proc` cannot be read, assume so.
fn listens_on(pid: u32, port: u16) -> bool {
    let Ok(table) = fs::read_to_string("/proc/net/tcp") else {
        return true;
    };
    let table = table + &fs::read_to_string("/proc/net/tcp6").unwrap_or_default();
    // Columns: sl, local address (hex address:port), remote address, state (0A: LISTEN), ...,
    // inode.
    let wanted = format!(":{port:04X}");
    let inodes: Vec<String> = table
        .lines()
        .map(|line| line.split_whitespace().collect::<Vec<_>>())
        .filter(|fields| {
            fields.get(1).is_some_and(|local| local.ends_with(&wanted)) && fields.get(3) == Some(&"0A")
        })
        .filter_map(|fields| fields.get(9).map(|inode| format!("socket:[{inode}]")))
        .collect();
    let Ok(descriptors) = fs::read_dir(format!("/proc/{pid}/fd")) else {
        return true;
    };
    descriptors.flatten().any(|descriptor| {
        fs::read_link(descriptor.path())
            .is_ok_and(|target| inodes.iter().any(|inode| target.as_os_str() == inode.as_str()))
    })
}

/// A development PKI made by `tessera certs init` in its own temporary directory, so every
/// test has fresh certificates (and a CA no other test trusts).
#[derive(Debug)]
pub struct Pki {
    dir: PathBuf,
    _tmp: TempDir,
}

impl Pki {
    pub fn new() -> Self {
        let tmp = tempfile::Builder::new()
            .prefix("tessera-pki-")
            .tempdir()
            .expect("temporary directory");
        let dir = tmp.path().join("certs");
        run_tessera([
            OsStr::new("certs"),
            OsStr::new("init"),
            OsStr::new("--dir"),
            dir.as_os_str(),
        ]);
        Self { dir, _tmp: tmp }
    }

    /// The directory holding the certificates.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// `ca.pem`.
    pub fn ca(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    /// `NAME.pem`, e.g. `cert("dev-client")`.
    pub fn cert(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.pem"))
    }

    /// `NAME-key.pem`.
    pub fn key(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}-key.pem"))
    }

    /// Issues one more client certificate `NAME.pem`/`NAME-key.pem` with URI SAN `identity`
    /// from this PKI's CA (`tessera certs client`).
    pub fn client(&self, name: &str, identity: &str) {
        run_tessera([
            OsStr::new("certs"),
            OsStr::new("client"),
            OsStr::new("--dir"),
            self.dir.as_os_str(),
            OsStr::new("--name"),
            OsStr::new(name),
            OsStr::new("--identity"),
            OsStr::new(identity),
        ]);
    }
}

impl Default for Pki {
    fn default() -> Self {
        Self::new()
    }
}

/// One `[[callers]]` entry of gateway.toml.
#[derive(Clone, Debug, Serialize)]
pub struct CallerPolicy {
    pub identity: String,
    pub merchants: Vec<String>,
    pub operations: Vec<String>,
}

impl CallerPolicy {
    pub fn new(identity: &str, merchants: &[&str], operations: &[&str]) -> Self {
        Self {
            identity: identity.to_owned(),
            merchants: merchants.iter().map(|m| (*m).to_owned()).collect(),
            operations: operations.iter().map(|o| (*o).to_owned()).collect(),
        }
    }

    /// Every operation for every merchant.
    pub fn all(identity: &str) -> Self {
        Self::new(
            identity,
            &["*"],
            &["tokenize", "read_metadata", "detokenize", "delete"],
        )
    }
}

/// One `[[clients]]` entry of vault.toml.
#[derive(Clone, Debug, Serialize)]
pub struct VaultClient {
    pub identity: String,
    pub role: String,
}

impl VaultClient {
    pub fn new(identity: &str, role: &str) -> Self {
        Self {
            identity: identity.to_owned(),
            role: role.to_owned(),
        }
    }
}

/// What a test may change about the stack; `Default` is the `tessera up` configuration.
#[derive(Clone, Debug)]
pub struct StackOptions {
    /// The gateway's caller policy.
    pub callers: Vec<CallerPolicy>,
    /// The vault's allow-list.
    pub vault_clients: Vec<VaultClient>,
    /// The vault's `mode`.
    pub vault_mode: String,
    /// `RUST_LOG` for both children (`None`: inherited from the test process).
    pub rust_log: Option<String>,
    /// The gateway's `database` (`None`: a SQLite file in the stack's directory).
    pub database: Option<String>,
    /// Top-level keys added to vault.toml, replacing a generated key of the same name whole.
    /// Applied to every vault (give several vaults one audit log path only on purpose).
    pub vault_extra: toml::Table,
    /// Top-level keys added to gateway.toml, replacing a generated key of the same name whole.
    /// Applied to every gateway.
    pub gateway_extra: toml::Table,
    /// The gateways' database engine. `Postgres` gives the stack a fresh database of its own
    /// on the local server (see [`TestDatabase`]); `database` overrides both.
    pub backend: Backend,
    /// How many vaults to start (all share the master key; every gateway uses all of them).
    pub vaults: usize,
    /// How many gateways to start (all share the database).
    pub gateways: usize,
}

impl Default for StackOptions {
    fn default() -> Self {
        Self {
            callers: vec![CallerPolicy::all("spiffe://tessera/dev-client")],
            vault_clients: vec![
                VaultClient::new("spiffe://tessera/gateway", "gateway"),
                VaultClient::new("spiffe://tessera/operator", "operator"),
            ],
            vault_mode: "development".to_owned(),
            rust_log: None,
            database: None,
            vault_extra: toml::Table::new(),
            gateway_extra: toml::Table::new(),
            backend: Backend::Sqlite,
            vaults: 1,
            gateways: 1,
        }
    }
}

#[derive(Serialize)]
struct ServerTls {
    cert: String,
    key: String,
    client_ca: String,
}

#[derive(Serialize)]
struct MasterKey {
    source: String,
    path: String,
    create_if_missing: bool,
}

#[derive(Serialize)]
struct VaultConfig<'a> {
    listen: String,
    mode: &'a str,
    tls: ServerTls,
    clients: &'a [VaultClient],
    master_key: MasterKey,
}

#[derive(Serialize)]
struct VaultEndpoint {
    endpoints: Vec<String>,
    server_name: String,
    ca: String,
    client_cert: String,
    client_key: String,
}

#[derive(Serialize)]
struct GatewayConfig<'a> {
    listen: String,
    database: String,
    tls: ServerTls,
    vault: VaultEndpoint,
    callers: &'a [CallerPolicy],
}

fn path_string(path: &Path) -> String {
    path.to_str().expect("temporary paths are UTF-8").to_owned()
}

/// Serialises `config` and lays `extra` over its top-level keys.
fn render(config: &impl Serialize, extra: &toml::Table) -> String {
    let mut table = toml::Table::try_from(config).expect("configuration serialises");
    for (key, value) in extra {
        table.insert(key.clone(), value.clone());
    }
    toml::to_string(&table).expect("configuration renders")
}

/// One server process of a stack: its name (`vault`, `vault-1`, `gateway`, ...), which names
/// its configuration file and log, its address, and the child while it runs.
#[derive(Debug)]
struct Process {
    name: String,
    addr: SocketAddr,
    child: Option<Child>,
}

impl Process {
    fn new(kind: &str, index: usize, addr: SocketAddr) -> Self {
        let name = if index == 0 {
            kind.to_owned()
        } else {
            format!("{kind}-{index}")
        };
        Self {
            name,
            addr,
            child: None,
        }
    }
}

/// Running vaults and gateways, each a child process with its own log file, configured like
/// `tessera up` but on free ports, with fresh certificates and state in temporary directories.
/// By default one of each on a fresh SQLite file; [`StackOptions`] asks for PostgreSQL (a
/// fresh database per stack, dropped with it) and for several vaults and gateways, which then
/// share the database, the PKI and the master key, every gateway configured with every vault.
///
/// The single-process methods (`vault_addr`, `kill_gateway`, ...) act on vault 0 and gateway 0;
/// the `_at` forms take an index. Dropping the stack kills every child, then drops the
/// PostgreSQL database.
#[derive(Debug)]
pub struct Stack {
    binaries: Binaries,
    pki: Pki,
    options: StackOptions,
    vaults: Vec<Process>,
    gateways: Vec<Process>,
    postgres: Option<TestDatabase>,
    // Last, so it is removed only after `Drop` has stopped the children that write into it.
    dir: TempDir,
}

/// `count` distinct ports that were free a moment ago.
fn distinct_free_ports(count: usize) -> Vec<u16> {
    let mut ports: Vec<u16> = Vec::with_capacity(count);
    // Two probes in a row can be handed the same port once it is released again; bounded
    // retries, the kernel has thousands of ephemeral ports.
    for _ in 0..count * 100 {
        if ports.len() == count {
            break;
        }
        let port = free_port();
        if !ports.contains(&port) {
            ports.push(port);
        }
    }
    assert_eq!(ports.len(), count, "could not find {count} distinct free ports");
    ports
}

impl Stack {
    /// Starts the default stack (the `tessera up` configuration).
    pub fn start() -> Self {
        Self::start_with(StackOptions::default())
    }

    /// Starts the default stack on `backend`.
    pub fn start_on(backend: Backend) -> Self {
        Self::start_with(StackOptions {
            backend,
            ..StackOptions::default()
        })
    }

    /// Starts a stack with `options`: creates the PostgreSQL database if asked for, writes
    /// every configuration, starts the vaults one after the other (the first creates the
    /// shared development master key) and waits for each to listen, then the gateways.
    /// Panics with the logs if one does not come up.
    ///
    /// Blocks the calling thread while waiting; call it before the test's requests start.
    pub fn start_with(options: StackOptions) -> Self {
        assert!(
            options.vaults >= 1 && options.gateways >= 1,
            "a stack needs at least one vault and one gateway"
        );
        let binaries = binaries();
        let pki = Pki::new();
        let dir = tempfile::Builder::new()
            .prefix("tessera-stack-")
            .tempdir()
            .expect("temporary directory");
        let postgres =
            (options.backend == Backend::Postgres && options.database.is_none()).then(TestDatabase::create);
        let ports = distinct_free_ports(options.vaults + options.gateways);
        let addr = |port: u16| SocketAddr::from(([127, 0, 0, 1], port));
        let vaults = (0..options.vaults)
            .map(|i| Process::new("vault", i, addr(ports[i])))
            .collect();
        let gateways = (0..options.gateways)
            .map(|i| Process::new("gateway", i, addr(ports[options.vaults + i])))
            .collect();
        let mut stack = Self {
            binaries,
            pki,
            options,
            vaults,
            gateways,
            postgres,
            dir,
        };
        stack.write_configs();
        for index in 0..stack.vaults.len() {
            stack.start_vault_at(index);
        }
        for index in 0..stack.gateways.len() {
            stack.start_gateway_at(index);
        }
        stack
    }

    /// The gateway's `database` setting: the options' database, the stack's PostgreSQL
    /// database, or the SQLite file in the stack's directory.
    fn gateway_database(&self) -> String {
        if let Some(database) = &self.options.database {
            return database.clone();
        }
        match &self.postgres {
            Some(postgres) => postgres.url(),
            None => path_string(&self.dir.path().join("tessera.db")),
        }
    }

    fn write_configs(&self) {
        let pki = &self.pki;
        for vault in &self.vaults {
            let config = VaultConfig {
                listen: vault.addr.to_string(),
                mode: &self.options.vault_mode,
                tls: ServerTls {
                    cert: path_string(&pki.cert("vault")),
                    key: path_string(&pki.key("vault")),
                    client_ca: path_string(&pki.ca()),
                },
                clients: &self.options.vault_clients,
                // One master key for every vault: they are interchangeable.
                master_key: MasterKey {
                    source: "development-file".to_owned(),
                    path: path_string(&self.dir.path().join("dev-master-key")),
                    create_if_missing: true,
                },
            };
            fs::write(
                self.config_path(&vault.name),
                render(&config, &self.options.vault_extra),
            )
            .unwrap();
        }
        let endpoints: Vec<String> = self
            .vaults
            .iter()
            .map(|vault| format!("https://{}", vault.addr))
            .collect();
        for gateway in &self.gateways {
            let config = GatewayConfig {
                listen: gateway.addr.to_string(),
                database: self.gateway_database(),
                tls: ServerTls {
                    cert: path_string(&pki.cert("gateway")),
                    key: path_string(&pki.key("gateway")),
                    client_ca: path_string(&pki.ca()),
                },
                vault: VaultEndpoint {
                    endpoints: endpoints.clone(),
                    server_name: "tessera-vault".to_owned(),
                    ca: path_string(&pki.ca()),
                    client_cert: path_string(&pki.cert("gateway-client")),
                    client_key: path_string(&pki.key("gateway-client")),
                },
                callers: &self.options.callers,
            };
            fs::write(
                self.config_path(&gateway.name),
                render(&config, &self.options.gateway_extra),
            )
            .unwrap();
        }
    }

    pub fn pki(&self) -> &Pki {
        &self.pki
    }

    /// Vault 0's address.
    pub fn vault_addr(&self) -> SocketAddr {
        self.vault_addr_at(0)
    }

    /// Gateway 0's address.
    pub fn gateway_addr(&self) -> SocketAddr {
        self.gateway_addr_at(0)
    }

    pub fn vault_addr_at(&self, index: usize) -> SocketAddr {
        self.vaults[index].addr
    }

    pub fn gateway_addr_at(&self, index: usize) -> SocketAddr {
        self.gateways[index].addr
    }

    /// How many vaults and gateways the stack has (running or not).
    pub fn vault_count(&self) -> usize {
        self.vaults.len()
    }

    pub fn gateway_count(&self) -> usize {
        self.gateways.len()
    }

    /// The database backend the gateways use.
    pub fn backend(&self) -> Backend {
        if self.postgres.is_some() {
            Backend::Postgres
        } else {
            self.options
                .database
                .as_deref()
                .map_or(Backend::Sqlite, Backend::of)
        }
    }

    /// A URL sqlx opens the gateways' database with: the PostgreSQL URL, or `sqlite://PATH`.
    pub fn database_url(&self) -> String {
        let database = self.gateway_database();
        match Backend::of(&database) {
            Backend::Postgres => database,
            Backend::Sqlite if database.starts_with("sqlite:") => database,
            Backend::Sqlite => format!("sqlite://{database}"),
        }
    }

    /// The directory holding the configurations, the logs, the master key and the SQLite
    /// database.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    fn config_path(&self, name: &str) -> PathBuf {
        self.dir.path().join(format!("{name}.toml"))
    }

    /// Vault 0's configuration.
    pub fn vault_config_path(&self) -> PathBuf {
        self.config_path("vault")
    }

    /// Gateway 0's configuration.
    pub fn gateway_config_path(&self) -> PathBuf {
        self.config_path("gateway")
    }

    pub fn gateway_config_path_at(&self, index: usize) -> PathBuf {
        self.config_path(&self.gateways[index].name)
    }

    fn log_path(&self, name: &str) -> PathBuf {
        self.dir.path().join(format!("{name}.log"))
    }

    fn read_log(&self, name: &str) -> String {
        fs::read_to_string(self.log_path(name)).unwrap_or_default()
    }

    /// Everything vault 0 and gateway 0 have written so far (stdout and stderr).
    pub fn logs(&self) -> (String, String) {
        (self.read_log("vault"), self.read_log("gateway"))
    }

    /// Everything vault `index` has written so far, across restarts.
    pub fn vault_log(&self, index: usize) -> String {
        self.read_log(&self.vaults[index].name)
    }

    /// Everything gateway `index` has written so far, across restarts.
    pub fn gateway_log(&self, index: usize) -> String {
        self.read_log(&self.gateways[index].name)
    }

    /// Every process's log, for a failure message.
    pub fn all_logs(&self) -> String {
        self.vaults
            .iter()
            .chain(&self.gateways)
            .map(|process| format!("--- {}.log ---\n{}\n", process.name, self.read_log(&process.name)))
            .collect()
    }

    /// Starts vault 0 (again) and waits until it listens. Its log is appended to, so a
    /// restart keeps what the earlier run wrote.
    pub fn start_vault(&mut self) {
        self.start_vault_at(0);
    }

    /// Kills vault 0 (SIGKILL, as a crash would) and waits for it to exit.
    pub fn kill_vault(&mut self) {
        self.kill_vault_at(0);
    }

    /// Starts gateway 0 (again) and waits until it listens.
    pub fn start_gateway(&mut self) {
        self.start_gateway_at(0);
    }

    /// Kills gateway 0 (SIGKILL) and waits for it to exit.
    pub fn kill_gateway(&mut self) {
        self.kill_gateway_at(0);
    }

    /// Starts vault `index` (again) and waits until it listens.
    pub fn start_vault_at(&mut self, index: usize) {
        let binary = self.binaries.vault.clone();
        self.start_process(true, index, &binary);
    }

    /// Starts gateway `index` (again) and waits until it listens.
    pub fn start_gateway_at(&mut self, index: usize) {
        let binary = self.binaries.gateway.clone();
        self.start_process(false, index, &binary);
    }

    /// Kills vault `index` with SIGKILL, as a crash would, and waits for it to exit.
    pub fn kill_vault_at(&mut self, index: usize) {
        kill(&mut self.vaults[index]);
    }

    /// Kills gateway `index` with SIGKILL and waits for it to exit.
    pub fn kill_gateway_at(&mut self, index: usize) {
        kill(&mut self.gateways[index]);
    }

    fn start_process(&mut self, vault: bool, index: usize, binary: &Path) {
        let process = if vault {
            &self.vaults[index]
        } else {
            &self.gateways[index]
        };
        assert!(process.child.is_none(), "{} is already running", process.name);
        let name = process.name.clone();
        let child = self.spawn(binary, &self.config_path(&name), &name);
        let process = if vault {
            &mut self.vaults[index]
        } else {
            &mut self.gateways[index]
        };
        process.child = Some(child);
        self.wait_until_listening(vault, index);
    }

    fn spawn(&self, binary: &Path, config: &Path, name: &str) -> Child {
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path(name))
            .unwrap();
        let log_err = log.try_clone().unwrap();
        let mut command = Command::new(binary);
        command
            .arg("--config")
            .arg(config)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err);
        if let Some(filter) = &self.options.rust_log {
            command.env("RUST_LOG", filter);
        }
        command
            .spawn()
            .unwrap_or_else(|err| panic!("cannot start {}: {err}", binary.display()))
    }

    fn wait_until_listening(&mut self, vault: bool, index: usize) {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            let process = if vault {
                &mut self.vaults[index]
            } else {
                &mut self.gateways[index]
            };
            let (name, addr) = (process.name.clone(), process.addr);
            let child = process.child.as_mut().expect("child was just started");
            if let Some(status) = child.try_wait().unwrap() {
                panic!(
                    "{name} exited before listening on {addr} ({status})\n{}",
                    self.all_logs()
                );
            }
            // Listening, and by this process: not by another that took the port first.
            if TcpStream::connect_timeout(&addr, READY_POLL).is_ok() && listens_on(child.id(), addr.port()) {
                return;
            }
            if Instant::now() >= deadline {
                panic!(
                    "{name} did not listen on {addr} within {} s\n{}",
                    READY_TIMEOUT.as_secs(),
                    self.all_logs()
                );
            }
            sleep(READY_POLL);
        }
    }
}

/// SIGKILLs a process's child, if it runs, and reaps it.
fn kill(process: &mut Process) {
    if let Some(mut child) = process.child.take() {
        let _ = child.kill();
        let _ = child.wait();
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        for process in self.gateways.iter_mut().chain(self.vaults.iter_mut()) {
            kill(process);
        }
        // `postgres` drops after this: its database goes once nothing is connected to it.
    }
}

/// Connects over mutual TLS to `addr`, verifying the server as `domain` against `ca` and
/// presenting `cert`/`key`. Errors are returned, for tests that expect a refusal.
pub async fn try_channel(
    addr: SocketAddr,
    domain: &str,
    ca: &Path,
    cert: &Path,
    key: &Path,
) -> Result<Channel, tonic::transport::Error> {
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(fs::read(ca).unwrap()))
        .identity(Identity::from_pem(
            fs::read(cert).unwrap(),
            fs::read(key).unwrap(),
        ))
        .domain_name(domain);
    Endpoint::from_shared(format!("https://{addr}"))
        .unwrap()
        .connect_timeout(Duration::from_secs(5))
        .tls_config(tls)?
        .connect()
        .await
}

/// A channel to the gateway as the client certificate `client_cert_name` of the stack's PKI
/// (e.g. `"dev-client"`, or a name issued with [`Pki::client`]).
pub async fn gateway_channel(stack: &Stack, client_cert_name: &str) -> Channel {
    let pki = stack.pki();
    try_channel(
        stack.gateway_addr(),
        "tessera-gateway",
        &pki.ca(),
        &pki.cert(client_cert_name),
        &pki.key(client_cert_name),
    )
    .await
    .unwrap_or_else(|err| panic!("cannot connect to the gateway as {client_cert_name}: {err:?}"))
}

/// A channel to the vault as the client certificate `client_cert_name` (e.g. `"operator"`).
pub async fn vault_channel(stack: &Stack, client_cert_name: &str) -> Channel {
    let pki = stack.pki();
    try_channel(
        stack.vault_addr(),
        "tessera-vault",
        &pki.ca(),
        &pki.cert(client_cert_name),
        &pki.key(client_cert_name),
    )
    .await
    .unwrap_or_else(|err| panic!("cannot connect to the vault as {client_cert_name}: {err:?}"))
}

/// The grpcurl executable on PATH, if any.
pub fn grpcurl_path() -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join("grpcurl"))
        .find(|candidate| {
            fs::metadata(candidate).is_ok_and(|meta| meta.is_file() && meta.permissions().mode() & 0o111 != 0)
        })
}

/// True when grpcurl is available. Otherwise prints a skip notice and returns false, unless
/// `TESSERA_REQUIRE_GRPCURL=1` (set by CI), in which case it panics: CI must not pass by
/// silently skipping the grpcurl tests.
pub fn require_grpcurl() -> bool {
    if grpcurl_path().is_some() {
        return true;
    }
    if std::env::var(REQUIRE_GRPCURL_ENV).as_deref() == Ok("1") {
        panic!("grpcurl is not on PATH but {REQUIRE_GRPCURL_ENV}=1 requires it");
    }
    // Straight to stderr so the skip shows even when the test's output is captured.
    let _ = writeln!(std::io::stderr(), "SKIPPED: grpcurl not on PATH");
    false
}

/// Runs grpcurl with `args`; `None` when grpcurl is not on PATH.
pub fn run_grpcurl<I, S>(args: I) -> Option<Output>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let grpcurl = grpcurl_path()?;
    Some(
        Command::new(grpcurl)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run grpcurl"),
    )
}

/// The mutual-TLS flags for calling the gateway as `client_cert_name`; append `-d DATA`
/// if needed, then `stack.gateway_addr().to_string()` and the method.
pub fn grpcurl_tls_args(stack: &Stack, client_cert_name: &str) -> Vec<String> {
    let pki = stack.pki();
    vec![
        "-cacert".to_owned(),
        path_string(&pki.ca()),
        "-cert".to_owned(),
        path_string(&pki.cert(client_cert_name)),
        "-key".to_owned(),
        path_string(&pki.key(client_cert_name)),
        "-authority".to_owned(),
        "tessera-gateway".to_owned(),
    ]
}

/// Runs grpcurl against the gateway as `client_cert_name`: `data` (JSON) goes to `-d`, then
/// the address and `method` (or `list`/`describe ...` words). `None` without grpcurl.
pub fn grpcurl_gateway(
    stack: &Stack,
    client_cert_name: &str,
    data: Option<&str>,
    method: &[&str],
) -> Option<Output> {
    let mut args = grpcurl_tls_args(stack, client_cert_name);
    if let Some(data) = data {
        args.push("-d".to_owned());
        args.push(data.to_owned());
    }
    args.push(stack.gateway_addr().to_string());
    args.extend(method.iter().map(|word| (*word).to_owned()));
    run_grpcurl(&args)
}

// --- Sealed start and audit log (issue 8) ---

/// Runs `tessera ARGS` and returns its output whatever its exit status, for commands a test
/// expects to fail.
pub fn try_tessera<I, S>(args: I) -> Output
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    Command::new(binaries().tessera)
        .args(args)
        .output()
        .expect("run tessera")
}

impl Stack {
    /// Stops vault 0 with SIGTERM, as an operator would (a clean shutdown: the audit log gets
    /// its shutdown seal), waits for it to exit (SIGKILL after 20 s) and reaps it.
    ///
    /// Written against the stack's public methods only: the process is found by the
    /// configuration path on its command line.
    pub fn stop_vault(&mut self) {
        let config = self.vault_config_path();
        if let Some(pid) = pid_with_argument(config.as_os_str()) {
            let _ = Command::new("kill").args(["-TERM", &pid]).status();
            let deadline = Instant::now() + Duration::from_secs(20);
            while Path::new("/proc").join(&pid).join("cmdline").exists() && !is_zombie(&pid) {
                if Instant::now() >= deadline {
                    break;
                }
                sleep(Duration::from_millis(50));
            }
        }
        // Reaps the exited child (or kills it if it did not stop in time).
        self.kill_vault();
    }

    /// `--vault ADDR --certs-dir DIR`: the connection flags of `tessera vault ...` commands
    /// against vault 0 as the operator identity.
    pub fn operator_args(&self) -> Vec<String> {
        vec![
            "--vault".to_owned(),
            self.vault_addr().to_string(),
            "--certs-dir".to_owned(),
            path_string(self.pki().dir()),
        ]
    }

    /// Runs `tessera keys rewrap-all` against gateway 0 as the operator (which needs
    /// `rotate_keys` for `"*"`); returns what it printed.
    pub fn rewrap_all(&self) -> String {
        let output = run_tessera([
            "keys".to_owned(),
            "rewrap-all".to_owned(),
            "--gateway".to_owned(),
            self.gateway_addr().to_string(),
            "--certs-dir".to_owned(),
            path_string(self.pki().dir()),
        ]);
        String::from_utf8_lossy(&output.stdout).into_owned()
    }
}

/// The pid of a running process that has `argument` on its command line.
fn pid_with_argument(argument: &OsStr) -> Option<String> {
    use std::os::unix::ffi::OsStrExt as _;
    let wanted = argument.as_bytes();
    fs::read_dir("/proc").ok()?.flatten().find_map(|entry| {
        let pid = entry.file_name().to_str()?.to_owned();
        pid.bytes().all(|b| b.is_ascii_digit()).then_some(())?;
        let cmdline = fs::read(entry.path().join("cmdline")).ok()?;
        (cmdline.split(|&b| b == 0).any(|arg| arg == wanted) && !is_zombie(&pid)).then_some(pid)
    })
}

/// Whether `pid` has exited but is not reaped yet.
fn is_zombie(pid: &str) -> bool {
    fs::read_to_string(Path::new("/proc").join(pid).join("stat"))
        .ok()
        .and_then(|stat| stat.rsplit_once(") ").map(|(_, rest)| rest.starts_with('Z')))
        .unwrap_or(true)
}

// --- PostgreSQL backend, several processes, per-backend tests (issue 5) ---

/// Which database engine a stack's gateways use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// A file in the stack's directory (the embedded default).
    Sqlite,
    /// A fresh database on the local PostgreSQL server at [`POSTGRES_ADDR`].
    Postgres,
}

impl Backend {
    /// The backend a gateway's `database` setting selects (the gateway's own rule).
    pub fn of(database: &str) -> Self {
        if database.starts_with("postgres://") || database.starts_with("postgresql://") {
            Self::Postgres
        } else {
            Self::Sqlite
        }
    }
}

/// Where the PostgreSQL tests expect a server (trust authentication, as CI's local cluster).
pub const POSTGRES_ADDR: &str = "127.0.0.1:5432";

/// Set to `1` (CI does, once PostgreSQL accepts connections) to turn a missing PostgreSQL into
/// a failure instead of a skip.
pub const REQUIRE_POSTGRES_ENV: &str = "TESSERA_REQUIRE_POSTGRES";

/// Maintenance connections tried in order: the `test` database CI provides, then the
/// `postgres` database every cluster has. TLS is off: the server is on 127.0.0.1 and the
/// tests are about storage, not about the connection.
const POSTGRES_MAINTENANCE_URLS: [&str; 2] = [
    "postgres://postgres@127.0.0.1:5432/test?sslmode=disable",
    "postgres://postgres@127.0.0.1:5432/postgres?sslmode=disable",
];

/// Prefix of every database the harness creates: `tessera_t_<pid>_<counter>`.
const TEST_DATABASE_PREFIX: &str = "tessera_t_";

/// Runs `future` to completion on a runtime of its own in a thread of its own, so the
/// synchronous harness (stack start, `Drop`) can use sqlx from inside a test's runtime.
fn run_on_side_runtime<T, F>(future: F) -> T
where
    T: Send + 'static,
    F: std::future::Future<Output = T> + Send + 'static,
{
    std::thread::spawn(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime for the database harness")
            .block_on(future)
    })
    .join()
    .expect("the database harness thread panicked")
}

/// The maintenance URL that answered, probed once per test process; `None` without a server.
fn postgres_maintenance_url() -> Option<&'static str> {
    static URL: OnceLock<Option<&'static str>> = OnceLock::new();
    *URL.get_or_init(|| {
        let addr: SocketAddr = POSTGRES_ADDR.parse().expect("valid address");
        // A quick TCP probe first, so machines without PostgreSQL do not wait for sqlx.
        TcpStream::connect_timeout(&addr, Duration::from_secs(1)).ok()?;
        run_on_side_runtime(async {
            use sqlx::Connection as _;
            for url in POSTGRES_MAINTENANCE_URLS {
                let attempt =
                    tokio::time::timeout(Duration::from_secs(5), sqlx::PgConnection::connect(url)).await;
                if let Ok(Ok(connection)) = attempt {
                    let _ = connection.close().await;
                    return Some(url);
                }
            }
            None
        })
    })
}

/// Whether a PostgreSQL server accepts connections at [`POSTGRES_ADDR`] (probed once per
/// process).
pub fn postgres_available() -> bool {
    postgres_maintenance_url().is_some()
}

/// True when PostgreSQL is available. Otherwise prints
/// `SKIPPED (no PostgreSQL at 127.0.0.1:5432): TEST` to stderr and returns false, unless
/// `TESSERA_REQUIRE_POSTGRES=1` (set by CI), in which case it panics: CI must not pass by
/// skipping the PostgreSQL half of the suite.
pub fn require_postgres(test_name: &str) -> bool {
    if postgres_available() {
        return true;
    }
    if std::env::var(REQUIRE_POSTGRES_ENV).as_deref() == Ok("1") {
        panic!("no PostgreSQL at {POSTGRES_ADDR} but {REQUIRE_POSTGRES_ENV}=1 requires it ({test_name})");
    }
    // Straight to stderr so the skip shows even when the test's output is captured.
    let _ = writeln!(
        std::io::stderr(),
        "SKIPPED (no PostgreSQL at {POSTGRES_ADDR}): {test_name}"
    );
    false
}

/// A database of its own on the local PostgreSQL server, named `tessera_t_<pid>_<counter>`,
/// created empty (the gateway migrates it) and dropped with `WITH (FORCE)` on `Drop`, which
/// also ends any connection a test still holds.
#[derive(Debug)]
pub struct TestDatabase {
    name: String,
    maintenance: &'static str,
}

impl TestDatabase {
    /// Creates a fresh database; panics when PostgreSQL is not available. The first database
    /// of a test process also drops those left behind by test processes that no longer run
    /// (killed before their `Drop`).
    pub fn create() -> Self {
        static COUNTER: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        static SWEPT: std::sync::Once = std::sync::Once::new();
        let maintenance = postgres_maintenance_url()
            .unwrap_or_else(|| panic!("a PostgreSQL test needs a server at {POSTGRES_ADDR}"));
        let name = format!(
            "{TEST_DATABASE_PREFIX}{}_{}",
            std::process::id(),
            COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        );
        SWEPT.call_once(|| run_on_side_runtime(drop_stale_databases(maintenance)));
        let create = format!("CREATE DATABASE \"{name}\"");
        let result = run_on_side_runtime(async move {
            use sqlx::{Connection as _, Executor as _};
            let mut last_error = String::new();
            // CREATE DATABASE copies a template and can collide with another copy of it in
            // progress; a few spaced retries (bounded) ride that out.
            for attempt in 0..5u64 {
                if attempt > 0 {
                    tokio::time::sleep(Duration::from_millis(200 * attempt)).await;
                }
                match sqlx::PgConnection::connect(maintenance).await {
                    Ok(mut connection) => {
                        let created = connection.execute(create.as_str()).await;
                        let _ = connection.close().await;
                        match created {
                            Ok(_) => return Ok(()),
                            Err(err) => last_error = err.to_string(),
                        }
                    }
                    Err(err) => last_error = err.to_string(),
                }
            }
            Err(last_error)
        });
        if let Err(err) = result {
            panic!("cannot create the test database {name}: {err}");
        }
        Self { name, maintenance }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The URL a gateway or a test connects with.
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:5432/{}?sslmode=disable", self.name)
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        let drop = format!("DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)", self.name);
        let maintenance = self.maintenance;
        let result = run_on_side_runtime(async move {
            use sqlx::{Connection as _, Executor as _};
            let mut connection = sqlx::PgConnection::connect(maintenance)
                .await
                .map_err(|err| err.to_string())?;
            let dropped = connection.execute(drop.as_str()).await.map(|_| ());
            let _ = connection.close().await;
            dropped.map_err(|err| err.to_string())
        });
        // Never panic in `Drop` (it may run while a failed test unwinds); say it instead.
        if let Err(err) = result {
            let _ = writeln!(
                std::io::stderr(),
                "warning: could not drop test database {}: {err}",
                self.name
            );
        }
    }
}

/// Drops `tessera_t_<pid>_*` databases whose test process is gone.
async fn drop_stale_databases(maintenance: &'static str) {
    use sqlx::{Connection as _, Executor as _};
    let Ok(mut connection) = sqlx::PgConnection::connect(maintenance).await else {
        return;
    };
    let names: Vec<String> = sqlx::query_scalar("SELECT datname FROM pg_database WHERE datname LIKE $1")
        .bind(format!("{}%", TEST_DATABASE_PREFIX.replace('_', "\\_")))
        .fetch_all(&mut connection)
        .await
        .unwrap_or_default();
    for name in names {
        let pid = name
            .strip_prefix(TEST_DATABASE_PREFIX)
            .and_then(|rest| rest.split('_').next())
            .and_then(|pid| pid.parse::<u32>().ok());
        let Some(pid) = pid else { continue };
        if pid == std::process::id() || Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        let _ = connection
            .execute(format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)").as_str())
            .await;
    }
    let _ = connection.close().await;
}

/// A small pool on the stack's database (either backend) for tests that look at or tamper
/// with stored rows. Queries use `$1` placeholders, which both backends accept.
pub async fn database_pool(stack: &Stack) -> sqlx::AnyPool {
    sqlx::any::install_default_drivers();
    let url = stack.database_url();
    sqlx::any::AnyPoolOptions::new()
        .max_connections(2)
        .connect(&url)
        .await
        .unwrap_or_else(|err| panic!("cannot open the test database {url}: {err}"))
}

/// Everything the database stores, as bytes to scan for data that must never be there: the
/// SQLite file and its write-ahead log raw, or every PostgreSQL table's rows as text (bytea in
/// escape format, so bytes appear as themselves, not as hex digits that could spell anything).
pub async fn database_contents(stack: &Stack) -> Vec<u8> {
    let url = stack.database_url();
    match stack.backend() {
        Backend::Sqlite => {
            let path = PathBuf::from(url.trim_start_matches("sqlite://"));
            let mut bytes = fs::read(&path).unwrap();
            let mut wal = path.into_os_string();
            wal.push("-wal");
            if let Ok(log) = fs::read(&wal) {
                bytes.extend(log);
            }
            bytes
        }
        Backend::Postgres => {
            use sqlx::{Connection as _, Executor as _};
            let mut connection = sqlx::PgConnection::connect(&url).await.unwrap();
            connection.execute("SET bytea_output = 'escape'").await.unwrap();
            let tables: Vec<String> = sqlx::query_scalar(
                "SELECT tablename::text FROM pg_tables WHERE schemaname = 'public' ORDER BY 1",
            )
            .fetch_all(&mut connection)
            .await
            .unwrap();
            assert!(tables.iter().any(|t| t == "tokens"), "{tables:?}");
            let mut bytes = Vec::new();
            for table in tables {
                let rows: String = sqlx::query_scalar(&format!(
                    "SELECT coalesce(string_agg(t::text, '|'), '') FROM \"{table}\" t"
                ))
                .fetch_one(&mut connection)
                .await
                .unwrap();
                bytes.extend(rows.into_bytes());
            }
            let _ = connection.close().await;
            bytes
        }
    }
}

/// A channel to gateway `index` as the client certificate `client_cert_name`.
pub async fn gateway_channel_at(stack: &Stack, index: usize, client_cert_name: &str) -> Channel {
    let pki = stack.pki();
    try_channel(
        stack.gateway_addr_at(index),
        "tessera-gateway",
        &pki.ca(),
        &pki.cert(client_cert_name),
        &pki.key(client_cert_name),
    )
    .await
    .unwrap_or_else(|err| panic!("cannot connect to gateway {index} as {client_cert_name}: {err:?}"))
}

/// Runs each named `async fn NAME(backend: Backend)` as two tests, `NAME::sqlite` and
/// `NAME::postgres`; the PostgreSQL one skips with a notice when there is no server (see
/// [`require_postgres`]). `cargo test NAME` runs both.
///
/// ```ignore
/// async fn tokenize_works(backend: Backend) {
///     let stack = Stack::start_on(backend);
///     // ...
/// }
/// backend_tests!(tokenize_works);
/// ```
/// `backend_tests!(multi_thread: NAME, ...)` runs them on tokio's multi-thread runtime (two
/// workers), for tests that block a thread while their load keeps running.
#[macro_export]
macro_rules! backend_tests {
    (multi_thread: $($name:ident),+ $(,)?) => {$(
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sqlite() {
                super::$name($crate::common::Backend::Sqlite).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn postgres() {
                if $crate::common::require_postgres(concat!(module_path!(), "::postgres")) {
                    super::$name($crate::common::Backend::Postgres).await;
                }
            }
        }
    )+};
    ($($name:ident),+ $(,)?) => {$(
        mod $name {
            #[tokio::test]
            async fn sqlite() {
                super::$name($crate::common::Backend::Sqlite).await;
            }

            #[tokio::test]
            async fn postgres() {
                if $crate::common::require_postgres(concat!(module_path!(), "::postgres")) {
                    super::$name($crate::common::Backend::Postgres).await;
                }
            }
        }
    )+};
}

/// [`backend_tests!`] for synchronous `fn NAME(backend: Backend)` tests.
#[macro_export]
macro_rules! backend_tests_sync {
    ($($name:ident),+ $(,)?) => {$(
        mod $name {
            #[test]
            fn sqlite() {
                super::$name($crate::common::Backend::Sqlite);
            }

            #[test]
            fn postgres() {
                if $crate::common::require_postgres(concat!(module_path!(), "::postgres")) {
                    super::$name($crate::common::Backend::Postgres);
                }
            }
        }
    )+};
}
