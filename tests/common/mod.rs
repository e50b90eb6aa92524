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

use std::ffi::OsStr;
use std::fs::{self, OpenOptions};
use std::io::Write as _;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
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

/// A port that was free a moment ago. Another process may take it before the server binds
/// it; with the kernel handing out ephemeral ports in sequence that is rare enough for tests.
pub fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
    listener.local_addr().expect("local address").port()
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
    pub vault_extra: toml::Table,
    /// Top-level keys added to gateway.toml, replacing a generated key of the same name whole.
    pub gateway_extra: toml::Table,
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

/// A running vault and gateway, each a child process with its own log file, configured like
/// `tessera up` but on free ports, with fresh certificates and state in temporary directories.
/// Dropping it kills both children.
#[derive(Debug)]
pub struct Stack {
    binaries: Binaries,
    pki: Pki,
    options: StackOptions,
    vault_addr: SocketAddr,
    gateway_addr: SocketAddr,
    vault: Option<Child>,
    gateway: Option<Child>,
    // Last, so it is removed only after `Drop` has stopped the children that write into it.
    dir: TempDir,
}

impl Stack {
    /// Starts the default stack (the `tessera up` configuration).
    pub fn start() -> Self {
        Self::start_with(StackOptions::default())
    }

    /// Starts a stack with `options`: writes both configurations, starts the vault, waits for
    /// it to listen, then the gateway. Panics with the logs if either does not come up.
    ///
    /// Blocks the calling thread while waiting; call it before the test's requests start.
    pub fn start_with(options: StackOptions) -> Self {
        let binaries = binaries();
        let pki = Pki::new();
        let dir = tempfile::Builder::new()
            .prefix("tessera-stack-")
            .tempdir()
            .expect("temporary directory");
        let vault_port = free_port();
        // Two probes in a row can be handed the same port once it is released again.
        let gateway_port = std::iter::repeat_with(free_port)
            .find(|port| *port != vault_port)
            .unwrap();
        let vault_addr = SocketAddr::from(([127, 0, 0, 1], vault_port));
        let gateway_addr = SocketAddr::from(([127, 0, 0, 1], gateway_port));
        let mut stack = Self {
            binaries,
            pki,
            options,
            vault_addr,
            gateway_addr,
            vault: None,
            gateway: None,
            dir,
        };
        stack.write_configs();
        stack.start_vault();
        stack.start_gateway();
        stack
    }

    fn write_configs(&self) {
        let pki = &self.pki;
        let vault = VaultConfig {
            listen: self.vault_addr.to_string(),
            mode: &self.options.vault_mode,
            tls: ServerTls {
                cert: path_string(&pki.cert("vault")),
                key: path_string(&pki.key("vault")),
                client_ca: path_string(&pki.ca()),
            },
            clients: &self.options.vault_clients,
            master_key: MasterKey {
                source: "development-file".to_owned(),
                path: path_string(&self.dir.path().join("dev-master-key")),
                create_if_missing: true,
            },
        };
        let gateway = GatewayConfig {
            listen: self.gateway_addr.to_string(),
            database: self
                .options
                .database
                .clone()
                .unwrap_or_else(|| path_string(&self.dir.path().join("tessera.db"))),
            tls: ServerTls {
                cert: path_string(&pki.cert("gateway")),
                key: path_string(&pki.key("gateway")),
                client_ca: path_string(&pki.ca()),
            },
            vault: VaultEndpoint {
                endpoints: vec![format!("https://{}", self.vault_addr)],
                server_name: "tessera-vault".to_owned(),
                ca: path_string(&pki.ca()),
                client_cert: path_string(&pki.cert("gateway-client")),
                client_key: path_string(&pki.key("gateway-client")),
            },
            callers: &self.options.callers,
        };
        fs::write(
            self.vault_config_path(),
            render(&vault, &self.options.vault_extra),
        )
        .unwrap();
        fs::write(
            self.gateway_config_path(),
            render(&gateway, &self.options.gateway_extra),
        )
        .unwrap();
    }

    pub fn pki(&self) -> &Pki {
        &self.pki
    }

    pub fn vault_addr(&self) -> SocketAddr {
        self.vault_addr
    }

    pub fn gateway_addr(&self) -> SocketAddr {
        self.gateway_addr
    }

    /// The directory holding both configurations, the logs, the master key and the database.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn vault_config_path(&self) -> PathBuf {
        self.dir.path().join("vault.toml")
    }

    pub fn gateway_config_path(&self) -> PathBuf {
        self.dir.path().join("gateway.toml")
    }

    fn log_path(&self, name: &str) -> PathBuf {
        self.dir.path().join(format!("{name}.log"))
    }

    /// Everything the vault and the gateway have written so far (stdout and stderr).
    pub fn logs(&self) -> (String, String) {
        let read = |name: &str| fs::read_to_string(self.log_path(name)).unwrap_or_default();
        (read("vault"), read("gateway"))
    }

    /// Starts the vault (again) and waits until it listens. Its log is appended to, so a
    /// restart keeps what the earlier run wrote.
    pub fn start_vault(&mut self) {
        assert!(self.vault.is_none(), "the vault is already running");
        let child = self.spawn(&self.binaries.vault, &self.vault_config_path(), "vault");
        self.vault = Some(child);
        self.wait_until_listening("vault");
    }

    /// Kills the vault (SIGKILL, as a crash would) and waits for it to exit.
    pub fn kill_vault(&mut self) {
        if let Some(mut child) = self.vault.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the gateway (again) and waits until it listens.
    pub fn start_gateway(&mut self) {
        assert!(self.gateway.is_none(), "the gateway is already running");
        let child = self.spawn(&self.binaries.gateway, &self.gateway_config_path(), "gateway");
        self.gateway = Some(child);
        self.wait_until_listening("gateway");
    }

    /// Kills the gateway and waits for it to exit.
    pub fn kill_gateway(&mut self) {
        if let Some(mut child) = self.gateway.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
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

    fn wait_until_listening(&mut self, name: &str) {
        let (addr, child) = match name {
            "vault" => (self.vault_addr, self.vault.as_mut()),
            _ => (self.gateway_addr, self.gateway.as_mut()),
        };
        let child = child.expect("child was just started");
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                let (vault_log, gateway_log) = self.logs();
                panic!(
                    "{name} exited before listening on {addr} ({status})\n\
                     --- vault.log ---\n{vault_log}\n--- gateway.log ---\n{gateway_log}"
                );
            }
            if TcpStream::connect_timeout(&addr, READY_POLL).is_ok() {
                return;
            }
            if Instant::now() >= deadline {
                let (vault_log, gateway_log) = self.logs();
                panic!(
                    "{name} did not listen on {addr} within {} s\n\
                     --- vault.log ---\n{vault_log}\n--- gateway.log ---\n{gateway_log}",
                    READY_TIMEOUT.as_secs()
                );
            }
            sleep(READY_POLL);
        }
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        self.kill_gateway();
        self.kill_vault();
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
