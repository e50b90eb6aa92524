//! The background sweeper: ends provisional tokens nobody confirmed, single-use tokens nobody
//! used, and tokens past retention, destroying their ciphertext and journalling each as
//! EXPIRE.
//!
//! Gateways sharing a database coordinate through it so the work is done once: before each
//! batch the sweeper takes (or renews) the `job_leases` row of [`SWEEPER_JOB`], and a gateway
//! that does not hold the lease skips the round. The lease is the efficiency guard; the
//! correctness guard stays underneath it: each row changes state in one conditional UPDATE,
//! so even two sweepers that both believe they hold the lease (a holder stalled past its
//! lease, clocks far apart) expire and journal a token exactly once.

use std::sync::Arc;
use std::time::Duration;

use crate::clock::Clock;
use crate::state::Gateway;

/// The identity journalled for automatic expiry.
pub const SWEEPER_IDENTITY: &str = "tessera/sweeper";

/// The sweeper's row in `job_leases`.
pub const SWEEPER_JOB: &str = "sweeper";

/// Shortest lease: long enough that a holder alive on a loaded machine keeps it between
/// rounds, short enough that another gateway takes over soon after the holder dies.
const MIN_LEASE: Duration = Duration::from_secs(10);

/// How long a lease lasts: three sweep intervals (a holder may miss two ticks and keep it),
/// and never less than [`MIN_LEASE`].
pub fn lease_ttl(interval: Duration) -> Duration {
    interval.saturating_mul(3).max(MIN_LEASE)
}

/// A lease-holder name for this gateway process: unique among the gateways sharing a
/// database (host, listen address, process id and start time), and readable in the table.
pub fn holder_name(listen: std::net::SocketAddr) -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|name| name.trim().to_owned())
        .unwrap_or_else(|_| "unknown-host".to_owned());
    format!(
        "{host} {listen} pid {} started {}",
        std::process::id(),
        Clock::system().now_ms()
    )
}

/// Sweeps every `interval` as `holder` until `gateway` is dropped.
pub async fn run(gateway: std::sync::Weak<Gateway>, interval: Duration, holder: String) {
    let ttl = lease_ttl(interval);
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(gateway) = gateway.upgrade() else { return };
        sweep_once(&gateway, &holder, ttl).await;
    }
}

/// One sweep: batch after batch until nothing is due (bounded, so one sweep cannot run away),
/// renewing the lease before each batch and stopping as soon as another gateway holds it.
pub async fn sweep_once(gateway: &Arc<Gateway>, holder: &str, ttl: Duration) -> usize {
    const MAX_BATCHES_PER_SWEEP: usize = 100;
    let mut total = 0;
    for _ in 0..MAX_BATCHES_PER_SWEEP {
        // Wall-clock time, not the gateway's (test-adjustable) clock: leases compare times
        // written by different gateways.
        match gateway
            .store
            .try_take_lease(SWEEPER_JOB, holder, Clock::system().now_ms(), ttl)
            .await
        {
            Ok(true) => {}
            Ok(false) => {
                tracing::debug!("another gateway holds the sweeper lease; skipping this round");
                break;
            }
            Err(err) => {
                tracing::warn!(error = %err, "cannot take the sweeper lease; will retry");
                break;
            }
        }
        let now = gateway.clock.now_ms();
        match gateway
            .store
            .sweep(now, gateway.lifecycle.sweep_batch, SWEEPER_IDENTITY)
            .await
        {
            Ok(swept) if swept.is_empty() => {
                // Retry-guard blocks whose time ran out end here too, under the same lease.
                match gateway.store.expire_blocks(now, SWEEPER_IDENTITY).await {
                    Ok(0) => {}
                    Ok(ended) => tracing::info!(ended, "card blocks ended"),
                    Err(err) => tracing::warn!(error = %err, "ending card blocks failed; will retry"),
                }
                break;
            }
            Ok(swept) => {
                for token in &swept {
                    tracing::info!(merchant_id = %token.merchant_id, token = %token.token, reason = token.reason, "expired");
                }
                total += swept.len();
            }
            Err(err) => {
                tracing::warn!(error = %err, "sweep failed; will retry");
                break;
            }
        }
    }
    total
}
