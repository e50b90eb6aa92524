//! The background sweeper: ends provisional tokens nobody confirmed, single-use tokens nobody
//! used, and tokens past retention, destroying their ciphertext and journalling each as
//! EXPIRE. Safe to run in every gateway at once: each row changes state in one conditional
//! UPDATE, so a token is expired (and journalled) exactly once whoever gets there first.

use std::sync::Arc;
use std::time::Duration;

use crate::api::Gateway;

/// The identity journalled for automatic expiry.
pub const SWEEPER_IDENTITY: &str = "tessera/sweeper";

/// Sweeps until `gateway` is dropped.
pub async fn run(gateway: std::sync::Weak<Gateway>, interval: Duration) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(gateway) = gateway.upgrade() else { return };
        sweep_once(&gateway).await;
    }
}

/// One sweep: batch after batch until nothing is due (bounded, so one sweep cannot run away).
pub async fn sweep_once(gateway: &Arc<Gateway>) -> usize {
    const MAX_BATCHES_PER_SWEEP: usize = 100;
    let mut total = 0;
    for _ in 0..MAX_BATCHES_PER_SWEEP {
        let now = gateway.clock.now_ms();
        match gateway
            .store
            .sweep(now, gateway.lifecycle.sweep_batch, SWEEPER_IDENTITY)
            .await
        {
            Ok(swept) if swept.is_empty() => break,
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
