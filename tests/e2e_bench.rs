//! `tessera bench` against a running stack: the floor and the tokenize scenario produce a JSON
//! report with requests answered and no errors. Performance targets are never asserted here:
//! test machines are shared and slow, and the numbers belong in docs/benchmarks.md.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use std::process::Command;

use common::{binaries, Backend, Stack, StackOptions};

/// Runs `tessera bench --target <gateway> ... --json` for one scenario and returns its report.
fn bench(stack: &Stack, scenario: &str) -> serde_json::Value {
    let output = Command::new(binaries().tessera)
        .args([
            "bench",
            "--target",
            &stack.gateway_addr().to_string(),
            "--certs-dir",
        ])
        .arg(stack.pki().dir())
        .args([
            "--scenario",
            scenario,
            "--duration",
            "2s",
            "--warmup",
            "0s",
            "--in-flight",
            "8",
        ])
        .arg("--json")
        .output()
        .expect("run tessera bench");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "tessera bench failed ({}):\nstdout:\n{stdout}\nstderr:\n{stderr}",
        output.status
    );
    serde_json::from_str(&stdout)
        .unwrap_or_else(|err| panic!("not JSON ({err}):\n{stdout}\nstderr:\n{stderr}"))
}

fn assert_answered_without_errors(report: &serde_json::Value, scenario: &str) {
    assert_eq!(report["format"], "tessera-bench/1", "{report:#}");
    assert_eq!(report["stack"], "external");
    let measured = &report["scenarios"][0];
    assert_eq!(measured["scenario"], scenario, "{report:#}");
    assert_eq!(measured["available"], true, "{report:#}");
    let result = &measured["result"];
    assert!(result["throughput_rps"].as_f64().unwrap() > 0.0, "{report:#}");
    assert!(result["requests"].as_u64().unwrap() > 0, "{report:#}");
    assert_eq!(result["errors"], 0, "{report:#}");
    assert!(result["latency_us"]["p50"].as_u64().unwrap() > 0, "{report:#}");
    assert!(
        result["latency_us"]["max"].as_u64() >= result["latency_us"]["p99"].as_u64(),
        "{report:#}"
    );
    assert!(result["client_cpu"]["cores"].is_number(), "{report:#}");
}

fn bench_measures_the_floor_and_tokenize_against_a_running_stack(backend: Backend) {
    let mut gateway_extra = toml::Table::new();
    gateway_extra.insert("benchmark_floor".to_owned(), toml::Value::Boolean(true));
    let stack = Stack::start_with(StackOptions {
        gateway_extra,
        backend,
        ..StackOptions::default()
    });

    let floor = bench(&stack, "floor");
    assert_answered_without_errors(&floor, "floor");

    let tokenize = bench(&stack, "tokenize");
    assert_answered_without_errors(&tokenize, "tokenize");
}

// On both backends: the tokenize scenario writes through the gateway's store.
backend_tests_sync!(bench_measures_the_floor_and_tokenize_against_a_running_stack);
