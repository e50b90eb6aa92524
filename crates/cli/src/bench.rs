//! `tessera bench`: a closed-loop load generator for the gateway's public API, with a floor
//! to compare against. The floor (`tessera.bench.v1.Floor/Relay`) goes through the same
//! processes, certificates and mutual-TLS hops with handlers that do no work, and each
//! scenario is followed by a floor run with the same settings, so the report can state
//! Tessera's numbers as a ratio that holds on a shared, drifting machine.
//!
//! See docs/benchmarks.md for the commands and the latest results.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tessera_api::bench::floor_client::FloorClient;
use tessera_api::bench::RelayRequest;
use tessera_api::limits::MAX_IMPORT_ITEMS;
use tessera_api::v1::tokenization_client::TokenizationClient;
use tessera_api::v1::ImportRequest;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic::Code;

use crate::bench_cards::current_year;
use crate::bench_load::{
    base_seed, code_name, make_tokens, run_phase, tokenize_request_size, PhaseSettings, Scenario, ServerPids,
    SetupToken, Workload,
};
use crate::bench_report::{Measurement, Report, ScenarioReport, Settings, JSON_FORMAT};
use crate::bench_stack::StartedStack;

/// A request that takes longer than this fails (DEADLINE_EXCEEDED) instead of stalling a
/// worker until the end of the run.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Options of `tessera bench`.
#[derive(Debug, Clone, clap::Args)]
pub struct BenchArgs {
    /// Measure the gateway listening at ADDR (host:port); see --certs-dir and --client-cert.
    #[arg(
        long,
        value_name = "ADDR",
        conflicts_with = "start",
        required_unless_present = "start"
    )]
    pub target: Option<String>,
    /// Start the local stack like `tessera up`, on free ports with a fresh state directory and
    /// the benchmark floor on; stop it afterwards.
    #[arg(long)]
    pub start: bool,
    /// With --start: the gateway's database, e.g. a postgres:// URL (default: an SQLite file in
    /// the fresh state directory).
    #[arg(long, value_name = "URL", requires = "start")]
    pub database: Option<String>,
    /// With --start: keep the state directory (configuration, logs, database) afterwards.
    #[arg(long, requires = "start")]
    pub keep_state: bool,
    /// The development PKI: ca.pem and the client certificate (created with --start if missing).
    #[arg(long, default_value = "certs")]
    pub certs_dir: PathBuf,
    /// Client certificate NAME.pem / NAME-key.pem in --certs-dir.
    #[arg(long, value_name = "NAME", default_value = "dev-client")]
    pub client_cert: String,
    /// The name the gateway's certificate is verified against.
    #[arg(long, default_value = "tessera-gateway")]
    pub server_name: String,
    /// HTTP/2 connections to the gateway; requests in flight are spread over them.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..))]
    pub connections: u16,
    /// Requests in flight (closed loop: each worker sends its next request when the last is answered).
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u16).range(1..))]
    pub in_flight: u16,
    /// Load before measuring, not counted (e.g. 2s, 500ms, 0s).
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    pub warmup: Duration,
    /// Measured time of each scenario (e.g. 10s, 1m).
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub duration: Duration,
    /// Scenarios to run in order, comma-separated; mixed is 1 tokenize : 4 detokenize; import
    /// runs one stream per request in flight, one chunk outstanding on each.
    #[arg(long, value_enum, value_delimiter = ',', default_value = "tokenize")]
    pub scenario: Vec<Scenario>,
    /// Run the floor with the same settings right after each scenario and report the ratio
    /// [default: on with --start, off with --target].
    #[arg(long, num_args = 0..=1, default_missing_value = "true", value_name = "BOOL")]
    pub compare_floor: Option<bool>,
    /// Tokens created before the detokenize, mixed and list scenarios.
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u32).range(1..))]
    pub setup_tokens: u32,
    /// Items per import request in the import scenario (the API takes at most 1000).
    #[arg(long, default_value_t = 500, value_parser = clap::value_parser!(u16).range(1..=MAX_IMPORT_ITEMS as i64))]
    pub import_chunk: u16,
    /// The merchant the benchmark's tokens belong to.
    #[arg(long, default_value = "m_bench")]
    pub merchant: String,
    /// Print the report as JSON (progress goes to stderr).
    #[arg(long)]
    pub json: bool,
}

/// Parses `500ms`, `2s`, `1.5s`, `2m`, `1h` or a bare number of seconds.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let value: f64 = number
        .parse()
        .map_err(|_| format!("`{text}` is not a duration such as 500ms, 10s or 2m"))?;
    let seconds = match unit.trim() {
        "ms" => value / 1000.0,
        "" | "s" => value,
        "m" => value * 60.0,
        "h" => value * 3600.0,
        other => return Err(format!("unknown unit `{other}` in `{text}` (use ms, s, m or h)")),
    };
    Duration::try_from_secs_f64(seconds).map_err(|err| format!("`{text}`: {err}"))
}

/// Runs `tessera bench` and prints the report.
pub async fn run(args: BenchArgs) -> Result<(), Box<dyn std::error::Error>> {
    // One process-wide rustls provider, ring, as everywhere in Tessera.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let report = if args.start {
        let stack = StartedStack::start(&args.certs_dir, args.database.as_deref()).await?;
        let target = stack.gateway_addr.to_string();
        eprintln!("started the stack: gateway {target}");
        let database = match args.database.as_deref() {
            Some(url) if url.starts_with("postgres") => "postgres",
            Some(_) => "unknown",
            None => "sqlite",
        };
        // Ctrl-C must stop the children too: they run in their own process group, so the
        // terminal's SIGINT does not reach them.
        let outcome = tokio::select! {
            report = measure(&args, &target, "started", database, Some(stack.pids())) => report,
            _ = tokio::signal::ctrl_c() => Err("interrupted".into()),
        };
        stack.stop(args.keep_state || outcome.is_err()).await;
        outcome?
    } else {
        let target = args.target.clone().unwrap_or_default();
        measure(&args, &target, "external", "unknown", None).await?
    };
    if args.json {
        println!("{}", report.to_json()?);
    } else {
        print!("{}", report.to_table());
    }
    Ok(())
}

/// Connects, runs every scenario (and its floor) in order and gathers the report.
async fn measure(
    args: &BenchArgs,
    target: &str,
    stack: &'static str,
    database: &'static str,
    servers: Option<ServerPids>,
) -> Result<Report, Box<dyn std::error::Error>> {
    let compare_floor = args.compare_floor.unwrap_or(args.start);
    let channels = connect(args, target).await?;
    let floor_payload_bytes = tokenize_request_size(&args.merchant);
    let phase = PhaseSettings {
        in_flight: usize::from(args.in_flight),
        warmup: args.warmup,
        duration: args.duration,
        seed: base_seed(),
    };
    let workload = |scenario: Scenario, tokens: &Arc<Vec<SetupToken>>| {
        Arc::new(Workload {
            scenario,
            merchant: args.merchant.clone(),
            tokens: Arc::clone(tokens),
            floor_payload: vec![0x5a; floor_payload_bytes],
            this_year: current_year(),
            import_chunk: usize::from(args.import_chunk),
        })
    };

    let mut tokens: Option<Arc<Vec<SetupToken>>> = None;
    let mut floor_available: Option<Result<(), String>> = None;
    let mut reports = Vec::new();
    for &scenario in &args.scenario {
        let name = scenario.name();
        if scenario == Scenario::Import {
            if let Err(note) = probe_import(&channels).await {
                eprintln!("{name}: {note}");
                reports.push(ScenarioReport::not_available(name, note));
                continue;
            }
        }
        if scenario == Scenario::Floor || compare_floor {
            let probe = match &floor_available {
                Some(probe) => probe.clone(),
                None => floor_available.insert(probe_floor(&channels).await).clone(),
            };
            if let (Scenario::Floor, Err(note)) = (scenario, &probe) {
                eprintln!("{name}: {note}");
                reports.push(ScenarioReport::not_available(name, note.clone()));
                continue;
            }
        }
        let setup = if scenario.needs_tokens() {
            match &tokens {
                Some(made) => Ok(Arc::clone(made)),
                None => {
                    eprintln!(
                        "setup: tokenizing {} cards for merchant {}",
                        args.setup_tokens, args.merchant
                    );
                    let count = usize::try_from(args.setup_tokens).unwrap_or(usize::MAX);
                    let made =
                        make_tokens(&channels, &args.merchant, count, phase.in_flight, phase.seed).await;
                    made.map(|made| Arc::clone(tokens.insert(Arc::new(made))))
                }
            }
        } else {
            Ok(Arc::new(Vec::new()))
        };
        let setup = match setup {
            Ok(setup) => setup,
            Err(err) => {
                eprintln!("{name}: {err}");
                reports.push(ScenarioReport::not_available(
                    name,
                    format!("not measured: {err}"),
                ));
                continue;
            }
        };

        let result = run_logged(name, &channels, workload(scenario, &setup), phase, servers).await?;
        let floor = match (&floor_available, compare_floor && scenario != Scenario::Floor) {
            (Some(Ok(())), true) => {
                let floor = workload(Scenario::Floor, &setup);
                Some(run_logged("floor", &channels, floor, phase, servers).await?)
            }
            (Some(Err(note)), true) => {
                eprintln!("{name}: no floor to compare with: {note}");
                None
            }
            _ => None,
        };
        reports.push(ScenarioReport::measured(name, result, floor));
    }

    Ok(Report {
        format: JSON_FORMAT,
        target: target.to_owned(),
        stack,
        database,
        settings: Settings {
            connections: usize::from(args.connections),
            in_flight: usize::from(args.in_flight),
            warmup_secs: args.warmup.as_secs_f64(),
            duration_secs: args.duration.as_secs_f64(),
            setup_tokens: usize::try_from(args.setup_tokens).unwrap_or(usize::MAX),
            compare_floor,
            floor_payload_bytes,
            import_chunk: usize::from(args.import_chunk),
            client_identity_file: args
                .certs_dir
                .join(format!("{}.pem", args.client_cert))
                .display()
                .to_string(),
        },
        scenarios: reports,
    })
}

async fn run_logged(
    name: &str,
    channels: &[Channel],
    workload: Arc<Workload>,
    phase: PhaseSettings,
    servers: Option<ServerPids>,
) -> Result<Measurement, String> {
    eprintln!(
        "{name}: {} in flight, warm-up {} s, measuring {} s",
        phase.in_flight,
        phase.warmup.as_secs_f64(),
        phase.duration.as_secs_f64()
    );
    let measurement = run_phase(channels, workload, phase, servers).await?;
    eprintln!(
        "{name}: {:.1} req/s, p99 {:.3} ms, {} errors",
        measurement.throughput_rps,
        measurement.latency_us.p99 as f64 / 1000.0,
        measurement.errors
    );
    Ok(measurement)
}

/// Opens `args.connections` mutual-TLS HTTP/2 connections to the gateway.
async fn connect(args: &BenchArgs, target: &str) -> Result<Vec<Channel>, String> {
    let read =
        |path: &Path| std::fs::read(path).map_err(|err| format!("cannot read {}: {err}", path.display()));
    let dir = &args.certs_dir;
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(read(&dir.join("ca.pem"))?))
        .identity(Identity::from_pem(
            read(&dir.join(format!("{}.pem", args.client_cert)))?,
            read(&dir.join(format!("{}-key.pem", args.client_cert)))?,
        ))
        .domain_name(args.server_name.clone());
    let endpoint = Endpoint::from_shared(format!("https://{target}"))
        .map_err(|err| format!("bad target {target}: {err}"))?
        .tls_config(tls)
        .map_err(|err| format!("TLS configuration: {err}"))?
        .connect_timeout(CONNECT_TIMEOUT)
        .timeout(REQUEST_TIMEOUT)
        .tcp_nodelay(true);
    let mut channels = Vec::with_capacity(usize::from(args.connections));
    for _ in 0..args.connections {
        // Each `connect` makes its own HTTP/2 connection (and TLS session).
        let channel = endpoint
            .connect()
            .await
            .map_err(|err| format!("cannot connect to {target}: {}", error_chain(&err)))?;
        channels.push(channel);
    }
    Ok(channels)
}

fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// One floor call: `Err` with a note saying why the floor cannot be measured.
async fn probe_floor(channels: &[Channel]) -> Result<(), String> {
    let channel = channels
        .first()
        .cloned()
        .ok_or_else(|| "no connection to the gateway".to_owned())?;
    match FloorClient::new(channel)
        .relay(RelayRequest { payload: vec![0; 16] })
        .await
    {
        Ok(_) => Ok(()),
        Err(status) if status.code() == Code::Unimplemented => Err(
            "not available: the gateway does not serve tessera.bench.v1.Floor \
             (set `benchmark_floor = true` in its configuration, or use --start)"
                .to_owned(),
        ),
        Err(status) => Err(format!(
            "not available: the floor relay failed: {} {}",
            code_name(status.code()),
            status.message()
        )),
    }
}

/// An import stream with no items: `Err` with a note when the server has no bulk import.
async fn probe_import(channels: &[Channel]) -> Result<(), String> {
    let channel = channels
        .first()
        .cloned()
        .ok_or_else(|| "no connection to the gateway".to_owned())?;
    let no_items = tokio_stream::empty::<ImportRequest>();
    let outcome = match TokenizationClient::new(channel).import_tokens(no_items).await {
        Ok(response) => {
            // Drain the (empty) answer so a failure after the headers shows too.
            let mut results = response.into_inner();
            loop {
                match results.message().await {
                    Ok(Some(_)) => {}
                    Ok(None) => break Ok(()),
                    Err(status) => break Err(status),
                }
            }
        }
        Err(status) => Err(status),
    };
    match outcome {
        Ok(()) => Ok(()),
        Err(status) if status.code() == Code::Unimplemented => {
            Err("not available: the server has no bulk import RPC".to_owned())
        }
        Err(status) => Err(format!(
            "not available: the bulk import RPC failed: {} {}",
            code_name(status.code()),
            status.message()
        )),
    }
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
    fn durations() {
        assert_eq!(parse_duration("2s").unwrap(), Duration::from_secs(2));
        assert_eq!(parse_duration("0s").unwrap(), Duration::ZERO);
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("1.5s").unwrap(), Duration::from_millis(1500));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("3").unwrap(), Duration::from_secs(3));
        assert!(parse_duration("fast").is_err());
        assert!(parse_duration("2 fortnights").is_err());
        assert!(parse_duration("").is_err());
    }
}
