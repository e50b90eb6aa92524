//! `tessera bench --start`: the local stack of `tessera up` (crate::stack) on free ports with
//! a fresh state directory and the benchmark floor turned on; and reading CPU time and
//! resident memory of this process and of the servers from /proc.

use std::fmt;
use std::net::{SocketAddr, TcpListener};
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use crate::pki::{self, InitOutcome};
use crate::stack::{self, BackgroundStack, StackError, StackLayout};

/// Why the stack could not be prepared or started.
#[derive(Debug)]
#[non_exhaustive]
pub enum BenchStackError {
    /// Preparing the state directory, the ports or the configuration failed.
    Prepare(String),
    /// The vault or the gateway did not come up; their logs are in `state_dir`.
    Start { source: StackError, state_dir: PathBuf },
}

impl fmt::Display for BenchStackError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Prepare(why) => write!(f, "cannot prepare the stack: {why}"),
            Self::Start { source, state_dir } => write!(
                f,
                "cannot start the stack: {source} (logs kept in {})",
                state_dir.display()
            ),
        }
    }
}

impl std::error::Error for BenchStackError {}

/// A stack started for one benchmark run.
#[derive(Debug)]
pub struct StartedStack {
    pub gateway_addr: SocketAddr,
    state_dir: PathBuf,
    stack: BackgroundStack,
}

impl StartedStack {
    /// Ensures the development PKI in `certs_dir`, writes the configuration of `tessera up`
    /// into a fresh state directory with free ports, `database` (default: an SQLite file in
    /// the state directory) and `benchmark_floor = true`, then starts vault and gateway.
    pub async fn start(certs_dir: &Path, database: Option<&str>) -> Result<Self, BenchStackError> {
        let prepare = |what: &str, err: &dyn fmt::Display| BenchStackError::Prepare(format!("{what}: {err}"));
        match pki::init(certs_dir, false).map_err(|err| prepare("development PKI", &err))? {
            InitOutcome::Created(_) => {
                eprintln!("created a development PKI in {}", certs_dir.display());
            }
            InitOutcome::AlreadyPresent { missing } if missing.is_empty() => {}
            InitOutcome::AlreadyPresent { missing } => {
                let names: Vec<String> = missing.iter().map(|p| p.display().to_string()).collect();
                return Err(BenchStackError::Prepare(format!(
                    "{} lacks {}; run `tessera certs init --dir {} --force`",
                    certs_dir.display(),
                    names.join(", "),
                    certs_dir.display()
                )));
            }
        }
        let state_dir = fresh_state_dir().map_err(|err| prepare("state directory", &err))?;
        let (vault_addr, gateway_addr) = free_addrs().map_err(|err| prepare("free ports", &err))?;
        let layout = StackLayout {
            state_dir: state_dir.clone(),
            certs_dir: std::path::absolute(certs_dir)
                .map_err(|err| prepare("certificate directory", &err))?,
            gateway_addr,
            vault_addr,
            // `bench_gateway_config` below sets the benchmark's database.
            database: None,
        };
        let configs = stack::render_configs(&layout).map_err(|err| prepare("configuration", &err))?;
        let gateway = bench_gateway_config(&configs.gateway, database)
            .map_err(|err| prepare("gateway configuration", &err))?;
        for (path, text) in [
            (layout.vault_config_path(), configs.vault),
            (layout.gateway_config_path(), gateway),
        ] {
            std::fs::write(&path, text).map_err(|err| prepare(&path.display().to_string(), &err))?;
        }
        match BackgroundStack::start(&layout).await {
            Ok(stack) => Ok(Self {
                gateway_addr,
                state_dir,
                stack,
            }),
            Err(source) => Err(BenchStackError::Start { source, state_dir }),
        }
    }

    /// Process ids of the vault and the gateway.
    pub fn pids(&self) -> (Option<u32>, Option<u32>) {
        self.stack.pids()
    }

    /// Stops both servers; removes the state directory unless `keep` (it holds their logs).
    pub async fn stop(self, keep: bool) {
        self.stack.stop().await;
        if keep {
            eprintln!("stack state and logs kept in {}", self.state_dir.display());
        } else if let Err(err) = std::fs::remove_dir_all(&self.state_dir) {
            eprintln!("cannot remove {}: {err}", self.state_dir.display());
        }
    }
}

/// Operations the benchmark's scenarios call, added to each caller of the generated policy
/// that lacks them.
const BENCH_OPERATIONS: [&str; 3] = ["tokenize", "detokenize", "list"];

/// The generated gateway.toml with the benchmark's changes: the floor service on, the
/// database the user chose, and the callers allowed every operation a scenario uses.
pub fn bench_gateway_config(rendered: &str, database: Option<&str>) -> Result<String, String> {
    let mut table: toml::Table = rendered.parse().map_err(|err: toml::de::Error| err.to_string())?;
    table.insert("benchmark_floor".to_owned(), toml::Value::Boolean(true));
    if let Some(database) = database {
        table.insert("database".to_owned(), toml::Value::String(database.to_owned()));
    }
    let callers = table.get_mut("callers").and_then(toml::Value::as_array_mut);
    for caller in callers.into_iter().flatten() {
        let operations = caller.get_mut("operations").and_then(toml::Value::as_array_mut);
        if let Some(operations) = operations {
            for operation in BENCH_OPERATIONS {
                if !operations.iter().any(|op| op.as_str() == Some(operation)) {
                    operations.push(toml::Value::from(operation));
                }
            }
        }
    }
    toml::to_string(&table).map_err(|err| err.to_string())
}

/// A new owner-only directory under the system's temporary directory.
fn fresh_state_dir() -> std::io::Result<PathBuf> {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|elapsed| elapsed.subsec_nanos())
        .unwrap_or(0);
    let dir = std::env::temp_dir().join(format!("tessera-bench-{}-{nanos:09}", std::process::id()));
    // Owner-only, and `create` (not `recursive`) fails if the name is already taken.
    std::fs::DirBuilder::new().mode(0o700).create(&dir)?;
    Ok(dir)
}

/// Two distinct ports that were free a moment ago. Both listeners are held at once so the
/// kernel cannot hand out the same port twice; a race with another process remains possible
/// and shows up as a start-up error.
fn free_addrs() -> std::io::Result<(SocketAddr, SocketAddr)> {
    let first = TcpListener::bind("127.0.0.1:0")?;
    let second = TcpListener::bind("127.0.0.1:0")?;
    Ok((first.local_addr()?, second.local_addr()?))
}

/// CPU time and resident memory of one process, read from /proc.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ProcSample {
    pub user_secs: f64,
    pub system_secs: f64,
    pub rss_bytes: u64,
}

/// Reads `/proc/PID/stat` and `/proc/PID/statm` (`None` for this process: `/proc/self`).
pub fn sample_process(pid: Option<u32>) -> std::io::Result<ProcSample> {
    let dir = match pid {
        Some(pid) => PathBuf::from(format!("/proc/{pid}")),
        None => PathBuf::from("/proc/self"),
    };
    let stat = std::fs::read_to_string(dir.join("stat"))?;
    let statm = std::fs::read_to_string(dir.join("statm"))?;
    parse_proc(
        &stat,
        &statm,
        rustix::param::clock_ticks_per_second(),
        rustix::param::page_size(),
    )
    .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidData, "unexpected /proc format"))
}

/// Parses the `stat` and `statm` texts (proc(5)).
fn parse_proc(stat: &str, statm: &str, ticks_per_second: u64, page_size: usize) -> Option<ProcSample> {
    // The command name (field 2) is in parentheses and may contain spaces and parentheses,
    // so fields are counted from after the last ')': there, field 3 (state) is index 0 and
    // utime and stime (fields 14 and 15) are indexes 11 and 12.
    let (_, rest) = stat.rsplit_once(')')?;
    let mut fields = rest.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    // statm: size resident shared ... in pages.
    let resident: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    let ticks = ticks_per_second.max(1) as f64;
    Some(ProcSample {
        user_secs: utime as f64 / ticks,
        system_secs: stime as f64 / ticks,
        rss_bytes: resident.saturating_mul(u64::try_from(page_size).ok()?),
    })
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

    #[test]
    fn proc_stat_with_odd_command_names() {
        let stat = "1234 (tessera) gw (x)) S 1 1234 1234 0 -1 4194560 100 0 0 0 250 75 0 0 20 0 5 0 1 0 0";
        let statm = "5000 1200 300 10 0 900 0\n";
        let sample = parse_proc(stat, statm, 100, 4096).unwrap();
        assert!((sample.user_secs - 2.5).abs() < 1e-9);
        assert!((sample.system_secs - 0.75).abs() < 1e-9);
        assert_eq!(sample.rss_bytes, 1200 * 4096);
        assert_eq!(parse_proc("garbage", statm, 100, 4096), None);
    }

    #[test]
    fn this_process_can_be_sampled() {
        let sample = sample_process(None).unwrap();
        assert!(sample.rss_bytes > 0);
    }

    #[test]
    fn gateway_config_gets_the_floor_and_the_database() {
        let rendered = "listen = \"127.0.0.1:1\"\ndatabase = \"/tmp/x.db\"\n[tls]\ncert = \"c\"\n\
                        [[callers]]\nidentity = \"spiffe://tessera/dev-client\"\nmerchants = [\"*\"]\n\
                        operations = [\"tokenize\", \"detokenize\", \"delete\"]\n";
        let text = bench_gateway_config(rendered, Some("postgres://localhost/bench")).unwrap();
        let table: toml::Table = text.parse().unwrap();
        assert_eq!(table["benchmark_floor"].as_bool(), Some(true));
        assert_eq!(table["database"].as_str(), Some("postgres://localhost/bench"));
        assert_eq!(table["tls"]["cert"].as_str(), Some("c"));
        let operations: Vec<&str> = table["callers"][0]["operations"]
            .as_array()
            .unwrap()
            .iter()
            .map(|op| op.as_str().unwrap())
            .collect();
        assert_eq!(operations, ["tokenize", "detokenize", "delete", "list"]);
        let text = bench_gateway_config(rendered, None).unwrap();
        let table: toml::Table = text.parse().unwrap();
        assert_eq!(table["database"].as_str(), Some("/tmp/x.db"));
    }
}
