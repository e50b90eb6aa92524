//! What `tessera bench` reports: the numbers of one measured phase, the ratio of a scenario to
//! the floor, the JSON document for machines and the table for people.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Serialize;

/// Version of the JSON document; bumped when a field changes meaning or disappears.
pub const JSON_FORMAT: &str = "tessera-bench/1";

/// Latencies are recorded in microseconds, from 1 µs to 60 s, to 3 significant digits.
const HISTOGRAM_MAX_MICROS: u64 = 60_000_000;
const HISTOGRAM_SIGNIFICANT_DIGITS: u8 = 3;

/// An empty latency histogram in microseconds; the workers clone one so all can be merged.
pub fn new_histogram() -> Result<Histogram<u64>, hdrhistogram::CreationError> {
    Histogram::new_with_bounds(1, HISTOGRAM_MAX_MICROS, HISTOGRAM_SIGNIFICANT_DIGITS)
}

/// Records one latency, clamped into the histogram's range.
pub fn record_latency(histogram: &mut Histogram<u64>, latency: Duration) {
    let micros = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX).max(1);
    histogram.saturating_record(micros.min(HISTOGRAM_MAX_MICROS));
}

/// CPU time used by one process during a phase.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct CpuUse {
    pub user_secs: f64,
    pub system_secs: f64,
    /// (user + system) / elapsed: 1.0 is one core busy for the whole phase.
    pub cores: f64,
}

impl CpuUse {
    pub fn new(user_secs: f64, system_secs: f64, elapsed_secs: f64) -> Self {
        let cores = if elapsed_secs > 0.0 {
            (user_secs + system_secs) / elapsed_secs
        } else {
            0.0
        };
        Self {
            user_secs,
            system_secs,
            cores,
        }
    }
}

/// One server process during a phase (only known when `tessera bench` started the stack).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct ServerUse {
    pub cpu: CpuUse,
    /// Resident set size at the start and the end of the measured phase.
    pub rss_bytes_start: u64,
    pub rss_bytes_end: u64,
}

/// The gateway's and the vault's resource use during a phase.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct ServersUse {
    pub gateway: ServerUse,
    pub vault: ServerUse,
}

/// Latency percentiles of the successful requests, in microseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Latency {
    pub p50: u64,
    pub p90: u64,
    pub p99: u64,
    pub p999: u64,
    pub max: u64,
    pub mean: f64,
}

impl Latency {
    pub fn from_histogram(histogram: &Histogram<u64>) -> Self {
        if histogram.is_empty() {
            return Self::default();
        }
        Self {
            p50: histogram.value_at_quantile(0.50),
            p90: histogram.value_at_quantile(0.90),
            p99: histogram.value_at_quantile(0.99),
            p999: histogram.value_at_quantile(0.999),
            max: histogram.max(),
            mean: histogram.mean(),
        }
    }
}

/// The numbers of one measured phase (after the warm-up).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Measurement {
    /// Length of the measured window.
    pub elapsed_secs: f64,
    /// Requests that succeeded in the window.
    pub requests: u64,
    /// Requests that failed in the window; they are not in the latencies.
    pub errors: u64,
    /// Failed requests by gRPC code name (`UNAVAILABLE`, ...).
    pub errors_by_code: BTreeMap<String, u64>,
    /// Successful requests per second.
    pub throughput_rps: f64,
    pub latency_us: Latency,
    /// This load generator's own CPU use: on a shared machine it competes with the servers.
    pub client_cpu: CpuUse,
    /// The servers' use, when `tessera bench --start` started them.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub servers: Option<ServersUse>,
    /// Import scenario only: there `requests`, `throughput_rps` and `errors` count items,
    /// while the latencies are those of whole chunks.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub import: Option<ImportStats>,
}

/// The chunks of an import phase.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct ImportStats {
    /// Chunks answered in the window.
    pub chunks: u64,
    pub chunks_per_sec: f64,
}

impl Measurement {
    /// Summarises a phase of `elapsed` from the merged latencies of the successful requests
    /// and the failures counted by code.
    pub fn new(
        histogram: &Histogram<u64>,
        errors_by_code: BTreeMap<String, u64>,
        elapsed: Duration,
        client_cpu: CpuUse,
    ) -> Self {
        let elapsed_secs = elapsed.as_secs_f64();
        let requests = histogram.len();
        let throughput_rps = if elapsed_secs > 0.0 {
            requests as f64 / elapsed_secs
        } else {
            0.0
        };
        Self {
            elapsed_secs,
            requests,
            errors: errors_by_code.values().sum(),
            errors_by_code,
            throughput_rps,
            latency_us: Latency::from_histogram(histogram),
            client_cpu,
            servers: None,
            import: None,
        }
    }

    /// Turns a measurement of import chunks into one of items: `items` imported in the
    /// window become the requests and the throughput; the chunk counts move to `import`.
    pub fn counting_import_items(mut self, items: u64) -> Self {
        let chunks = self.requests;
        let per_second = |count: u64| {
            if self.elapsed_secs > 0.0 {
                count as f64 / self.elapsed_secs
            } else {
                0.0
            }
        };
        self.import = Some(ImportStats {
            chunks,
            chunks_per_sec: per_second(chunks),
        });
        self.requests = items;
        self.throughput_rps = per_second(items);
        self
    }
}

/// A scenario's numbers divided by the floor's. Throughput above 1.0 beats the floor;
/// latencies below 1.0 beat it. `None` where the floor's value is zero, and latencies are
/// `None` when either side had no successful request (there is nothing to compare), and for
/// import, whose latencies are those of whole chunks and so not comparable with one relay.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct FloorRatio {
    pub throughput: Option<f64>,
    pub p50: Option<f64>,
    pub p90: Option<f64>,
    pub p99: Option<f64>,
    pub p999: Option<f64>,
}

fn ratio(numerator: f64, denominator: f64) -> Option<f64> {
    (denominator > 0.0).then(|| numerator / denominator)
}

impl FloorRatio {
    pub fn new(scenario: &Measurement, floor: &Measurement) -> Self {
        let comparable = scenario.requests > 0 && floor.requests > 0 && scenario.import.is_none();
        let latency = |pick: fn(&Latency) -> u64| {
            ratio(pick(&scenario.latency_us) as f64, pick(&floor.latency_us) as f64).filter(|_| comparable)
        };
        Self {
            throughput: ratio(scenario.throughput_rps, floor.throughput_rps),
            p50: latency(|l| l.p50),
            p90: latency(|l| l.p90),
            p99: latency(|l| l.p99),
            p999: latency(|l| l.p999),
        }
    }
}

/// One scenario's outcome.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ScenarioReport {
    pub scenario: String,
    /// False when the server cannot run this scenario; `note` says why.
    pub available: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub result: Option<Measurement>,
    /// The floor scenario run with the same settings right after this one (`--compare-floor`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub floor: Option<Measurement>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vs_floor: Option<FloorRatio>,
}

impl ScenarioReport {
    /// A measured scenario. A window in which nothing completed, neither answer nor error,
    /// gets a note: zeros alone would read like a server that does nothing.
    pub fn measured(scenario: &str, result: Measurement, floor: Option<Measurement>) -> Self {
        let vs_floor = floor.as_ref().map(|floor| FloorRatio::new(&result, floor));
        let note = (result.requests == 0 && result.errors == 0).then(|| {
            "nothing completed inside the measured window: each request took longer than \
             --warmup plus --duration (fewer in flight or smaller import chunks help)"
                .to_owned()
        });
        Self {
            scenario: scenario.to_owned(),
            available: true,
            note,
            result: Some(result),
            floor,
            vs_floor,
        }
    }

    pub fn not_available(scenario: &str, note: String) -> Self {
        Self {
            scenario: scenario.to_owned(),
            available: false,
            note: Some(note),
            result: None,
            floor: None,
            vs_floor: None,
        }
    }
}

/// The settings every scenario of the run used.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Settings {
    pub connections: usize,
    pub in_flight: usize,
    pub warmup_secs: f64,
    pub duration_secs: f64,
    /// Tokens created before detokenize, mixed and list scenarios.
    pub setup_tokens: usize,
    pub compare_floor: bool,
    /// Bytes each floor request carries (the size of a tokenize request).
    pub floor_payload_bytes: usize,
    /// Items per import request.
    pub import_chunk: usize,
    pub client_identity_file: String,
}

/// The whole run, as `--json` prints it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Report {
    pub format: &'static str,
    /// The gateway address measured.
    pub target: String,
    /// `"started"` when this command started the stack, `"external"` for `--target`.
    pub stack: &'static str,
    /// `"sqlite"`, `"postgres"` or `"unknown"` (an external stack's database is not visible).
    pub database: &'static str,
    pub settings: Settings,
    pub scenarios: Vec<ScenarioReport>,
}

impl Report {
    pub fn to_json(&self) -> Result<String, serde_json::Error> {
        serde_json::to_string_pretty(self)
    }

    /// The table for people.
    pub fn to_table(&self) -> String {
        let settings = &self.settings;
        let mut out = String::new();
        let _ = writeln!(
            out,
            "tessera bench: {} ({} stack, database {}), {} connection(s), {} in flight, \
             warm-up {}, {} per scenario",
            self.target,
            self.stack,
            self.database,
            settings.connections,
            settings.in_flight,
            seconds(settings.warmup_secs),
            seconds(settings.duration_secs),
        );
        let _ = writeln!(out);
        let _ = writeln!(
            out,
            "{:<18} {:>10} {:>9} {:>9} {:>9} {:>9} {:>9} {:>7} {:>9}",
            "scenario", "req/s", "p50 ms", "p90 ms", "p99 ms", "p99.9 ms", "max ms", "errors", "client"
        );
        for scenario in &self.scenarios {
            match (&scenario.result, &scenario.note) {
                (Some(result), note) => {
                    row(&mut out, &scenario.scenario, result);
                    if let Some(note) = note {
                        let _ = writeln!(out, "  {note}");
                    }
                    if let Some(floor) = &scenario.floor {
                        row(&mut out, "  floor", floor);
                    }
                    if let Some(vs) = &scenario.vs_floor {
                        let _ = writeln!(
                            out,
                            "{:<18} {:>10} {:>9} {:>9} {:>9} {:>9}",
                            "  ratio to floor",
                            times(vs.throughput),
                            times(vs.p50),
                            times(vs.p90),
                            times(vs.p99),
                            times(vs.p999),
                        );
                    }
                }
                (None, note) => {
                    let _ = writeln!(
                        out,
                        "{:<18} {}",
                        scenario.scenario,
                        note.as_deref().unwrap_or("not measured")
                    );
                }
            }
        }
        let _ = writeln!(out);
        let _ = writeln!(
            out,
            "ratio to floor: req/s above 1.00x and latencies below 1.00x beat a no-op relay \
             through the same processes and hops; client = the load generator's CPU (cores)"
        );
        for scenario in &self.scenarios {
            for (label, measurement) in [("", &scenario.result), (" floor", &scenario.floor)] {
                let Some(measurement) = measurement else { continue };
                if let Some(servers) = &measurement.servers {
                    let _ = writeln!(
                        out,
                        "{}{label}: gateway {:.2} cores, RSS {} -> {}; vault {:.2} cores, RSS {} -> {}",
                        scenario.scenario,
                        servers.gateway.cpu.cores,
                        mebibytes(servers.gateway.rss_bytes_start),
                        mebibytes(servers.gateway.rss_bytes_end),
                        servers.vault.cpu.cores,
                        mebibytes(servers.vault.rss_bytes_start),
                        mebibytes(servers.vault.rss_bytes_end),
                    );
                }
                if !measurement.errors_by_code.is_empty() {
                    let codes: Vec<String> = measurement
                        .errors_by_code
                        .iter()
                        .map(|(code, count)| format!("{code} {count}"))
                        .collect();
                    let _ = writeln!(out, "{}{label} errors: {}", scenario.scenario, codes.join(", "));
                }
            }
        }
        out
    }
}

fn row(out: &mut String, label: &str, m: &Measurement) {
    let ms = |micros: u64| format!("{:.3}", micros as f64 / 1000.0);
    let _ = writeln!(
        out,
        "{:<18} {:>10.1} {:>9} {:>9} {:>9} {:>9} {:>9} {:>7} {:>9.2}",
        label,
        m.throughput_rps,
        ms(m.latency_us.p50),
        ms(m.latency_us.p90),
        ms(m.latency_us.p99),
        ms(m.latency_us.p999),
        ms(m.latency_us.max),
        m.errors,
        m.client_cpu.cores,
    );
}

fn times(value: Option<f64>) -> String {
    value.map_or_else(|| "-".to_owned(), |v| format!("{v:.2}x"))
}

fn seconds(value: f64) -> String {
    format!("{value}s")
}

fn mebibytes(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
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

    fn histogram_of(micros: impl IntoIterator<Item = u64>) -> Histogram<u64> {
        let mut histogram = new_histogram().unwrap();
        for value in micros {
            record_latency(&mut histogram, Duration::from_micros(value));
        }
        histogram
    }

    #[test]
    fn percentiles_throughput_and_errors() {
        // 1..=1000 µs: each percentile is the value of that rank, to 3 significant digits.
        let histogram = histogram_of(1..=1000);
        let errors = BTreeMap::from([("UNAVAILABLE".to_owned(), 3), ("INTERNAL".to_owned(), 2)]);
        let m = Measurement::new(
            &histogram,
            errors,
            Duration::from_secs(2),
            CpuUse::new(0.5, 0.25, 2.0),
        );
        assert_eq!(m.requests, 1000);
        assert_eq!(m.errors, 5);
        assert!((m.throughput_rps - 500.0).abs() < 1e-9);
        assert_eq!(m.latency_us.p50, 500);
        assert_eq!(m.latency_us.p90, 900);
        assert_eq!(m.latency_us.p99, 990);
        assert_eq!(m.latency_us.p999, 999);
        assert_eq!(m.latency_us.max, 1000);
        assert!((m.latency_us.mean - 500.5).abs() < 0.5);
        assert!((m.client_cpu.cores - 0.375).abs() < 1e-9);
    }

    #[test]
    fn import_counts_items_and_keeps_chunk_latencies() {
        let m = Measurement::new(
            &histogram_of([10_000, 20_000]),
            BTreeMap::new(),
            Duration::from_secs(2),
            CpuUse::default(),
        )
        .counting_import_items(1000);
        assert_eq!(m.requests, 1000);
        assert!((m.throughput_rps - 500.0).abs() < 1e-9);
        let import = m.import.unwrap();
        assert_eq!(import.chunks, 2);
        assert!((import.chunks_per_sec - 1.0).abs() < 1e-9);
        // Three significant digits: within 0.1% of the largest chunk latency.
        assert!(
            (20_000..=20_020).contains(&m.latency_us.max),
            "{}",
            m.latency_us.max
        );
        let floor = Measurement::new(
            &histogram_of([100; 10]),
            BTreeMap::new(),
            Duration::from_secs(1),
            CpuUse::default(),
        );
        let vs = FloorRatio::new(&m, &floor);
        assert_eq!(
            vs.throughput,
            Some(50.0),
            "items per second against relays per second"
        );
        assert_eq!(
            vs.p50, None,
            "a chunk's latency is not comparable with one relay's"
        );
    }

    #[test]
    fn an_empty_window_is_explained() {
        let nothing = Measurement::new(
            &new_histogram().unwrap(),
            BTreeMap::new(),
            Duration::from_secs(1),
            CpuUse::default(),
        );
        let report = ScenarioReport::measured("import", nothing, None);
        assert!(report.available);
        assert!(report.note.unwrap().starts_with("nothing completed"));
        let answered = Measurement::new(
            &histogram_of([5]),
            BTreeMap::new(),
            Duration::from_secs(1),
            CpuUse::default(),
        );
        assert_eq!(ScenarioReport::measured("tokenize", answered, None).note, None);
    }

    #[test]
    fn latencies_are_clamped_into_range() {
        let mut histogram = new_histogram().unwrap();
        record_latency(&mut histogram, Duration::from_nanos(10));
        record_latency(&mut histogram, Duration::from_secs(3600));
        assert_eq!(histogram.len(), 2);
        assert_eq!(histogram.min(), 1);
        assert!(histogram.max() >= HISTOGRAM_MAX_MICROS);
    }

    #[test]
    fn an_empty_phase_is_all_zero_not_nan() {
        let m = Measurement::new(
            &new_histogram().unwrap(),
            BTreeMap::new(),
            Duration::ZERO,
            CpuUse::new(0.0, 0.0, 0.0),
        );
        assert_eq!(m.requests, 0);
        assert_eq!(m.throughput_rps, 0.0);
        assert_eq!(m.latency_us, Latency::default());
        assert_eq!(m.client_cpu.cores, 0.0);
    }

    #[test]
    fn ratio_to_floor() {
        let cpu = CpuUse::default();
        let tessera = Measurement::new(
            &histogram_of([2000; 10]),
            BTreeMap::new(),
            Duration::from_secs(1),
            cpu,
        );
        let floor = Measurement::new(
            &histogram_of([1000; 20]),
            BTreeMap::new(),
            Duration::from_secs(1),
            cpu,
        );
        let vs = FloorRatio::new(&tessera, &floor);
        assert_eq!(vs.throughput, Some(0.5));
        assert_eq!(vs.p50, Some(2.0));
        assert_eq!(vs.p99, Some(2.0));
        let empty = Measurement::new(
            &new_histogram().unwrap(),
            BTreeMap::new(),
            Duration::from_secs(1),
            cpu,
        );
        assert_eq!(FloorRatio::new(&tessera, &empty).throughput, None);
        let failed = FloorRatio::new(&empty, &floor);
        assert_eq!(failed.throughput, Some(0.0));
        assert_eq!(failed.p50, None, "no successful request: no latency to compare");
    }

    fn sample_report() -> Report {
        let cpu = CpuUse::new(0.1, 0.1, 1.0);
        let tessera = Measurement::new(
            &histogram_of([800, 900, 1000]),
            BTreeMap::from([("UNAVAILABLE".to_owned(), 1)]),
            Duration::from_secs(1),
            cpu,
        );
        let floor = Measurement::new(
            &histogram_of([400, 500, 600]),
            BTreeMap::new(),
            Duration::from_secs(1),
            cpu,
        );
        Report {
            format: JSON_FORMAT,
            target: "127.0.0.1:8443".to_owned(),
            stack: "external",
            database: "unknown",
            settings: Settings {
                connections: 1,
                in_flight: 64,
                warmup_secs: 0.0,
                duration_secs: 1.0,
                setup_tokens: 16,
                compare_floor: true,
                floor_payload_bytes: 80,
                import_chunk: 500,
                client_identity_file: "certs/dev-client.pem".to_owned(),
            },
            scenarios: vec![
                ScenarioReport::measured("tokenize", tessera, Some(floor)),
                ScenarioReport::not_available(
                    "import",
                    "not available: the server has no bulk import RPC".to_owned(),
                ),
            ],
        }
    }

    #[test]
    fn json_has_the_documented_shape() {
        let json: serde_json::Value = serde_json::from_str(&sample_report().to_json().unwrap()).unwrap();
        assert_eq!(json["format"], "tessera-bench/1");
        assert_eq!(json["settings"]["in_flight"], 64);
        let tokenize = &json["scenarios"][0];
        assert_eq!(tokenize["scenario"], "tokenize");
        assert_eq!(tokenize["available"], true);
        let result = &tokenize["result"];
        assert_eq!(result["requests"], 3);
        assert_eq!(result["errors"], 1);
        assert_eq!(result["errors_by_code"]["UNAVAILABLE"], 1);
        assert_eq!(result["throughput_rps"], 3.0);
        for key in ["p50", "p90", "p99", "p999", "max", "mean"] {
            assert!(result["latency_us"][key].is_number(), "{key}");
        }
        assert!(result["client_cpu"]["cores"].is_number());
        assert!(
            result.get("servers").is_none(),
            "servers only for a started stack"
        );
        assert_eq!(tokenize["floor"]["requests"], 3);
        assert_eq!(tokenize["vs_floor"]["throughput"], 1.0);
        assert_eq!(tokenize["vs_floor"]["p50"], 900.0 / 500.0);
        let import = &json["scenarios"][1];
        assert_eq!(import["available"], false);
        assert_eq!(import["note"], "not available: the server has no bulk import RPC");
        assert!(import.get("result").is_none());
    }

    #[test]
    fn table_shows_every_scenario_and_the_ratio() {
        let table = sample_report().to_table();
        assert!(table.contains("tokenize"), "{table}");
        assert!(table.contains("  floor"), "{table}");
        assert!(table.contains("ratio to floor"), "{table}");
        assert!(table.contains("1.00x"), "{table}");
        assert!(table.contains("1.80x"), "{table}");
        assert!(
            table.contains("import             not available: the server has no bulk import RPC"),
            "{table}"
        );
        assert!(table.contains("tokenize errors: UNAVAILABLE 1"), "{table}");
    }
}
