//! What the audit log adds to each protect or reveal item: building the record, chaining it
//! (one SHA-256) and one write per batch. Compare with `vault_crypto`'s per-item costs.
//! Run with `cargo bench -p tessera-vault --bench audit_log`.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use tessera_vault::audit::AuditLog;
use tessera_vault::config::AuditConfig;

/// Items per call, like a coalesced gateway batch.
const BATCH: usize = 64;

fn audit_per_item(c: &mut Criterion) {
    let dir = std::env::temp_dir().join(format!("tessera-audit-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = AuditConfig {
        path: dir.join("audit.log"),
        block_lines: 1000,
        seal_interval_ms: 1000,
        sync_every_batch: false,
    };
    let (log, _) = AuditLog::open(&config);
    let tokens: Vec<String> = (0..BATCH).map(|i| format!("tok_{i:026}")).collect();
    let mut group = c.benchmark_group("audit");
    group.throughput(Throughput::Elements(BATCH as u64));
    group.bench_function("record_and_append_per_batch_of_64", |b| {
        b.iter_custom(|batches| {
            let start = Instant::now();
            for _ in 0..batches {
                let mut batch = log.batch("spiffe://tessera/gateway");
                for token in &tokens {
                    batch.record(
                        "protect",
                        "ok",
                        &[("merchant", "merchant-1"), ("token", token), ("data", "card")],
                    );
                }
                log.append(black_box(&batch)).unwrap();
            }
            start.elapsed()
        });
    });
    group.finish();
    std::fs::remove_dir_all(dir).unwrap();
}

criterion_group! {
    name = benches;
    config = Criterion::default().measurement_time(Duration::from_secs(3)).warm_up_time(Duration::from_secs(1));
    targets = audit_per_item
}
criterion_main!(benches);
