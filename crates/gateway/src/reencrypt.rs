//! The re-encryption job of key rotation: moves records sealed under a merchant's older
//! data-key versions to its current one, in batches, and destroys a version once no record
//! uses it.
//!
//! Like the sweeper (crate::sweeper), gateways sharing a database coordinate through the
//! `job_leases` row of [`REENCRYPT_JOB`], renewed before each batch, so the work is done once.
//! Correctness does not rest on the lease: each record is replaced by a conditional UPDATE
//! (`WHERE ciphertext = old AND data_key_version = old`), so a record deleted, expired or
//! re-encrypted meanwhile is left alone, and a version is deleted by a conditional DELETE that
//! checks, in the same statement, that no record references it and a newer version exists.
//!
//! Traffic is never blocked: reads name their record's version and keep working on old and new
//! versions alike; each batch is one vault call and one short transaction.
//!
//! Destruction waits [`grace`] after the newer version was created and after the version was
//! last seen referenced: a gateway that has not yet re-read its merchant's current version
//! (crate::keyring::CURRENT_TTL) or a request still in flight could otherwise store a record
//! under a version just destroyed, or need a blob just deleted.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use tessera_api::vault::{ReencryptItem, WrappedKey};

use crate::clock::Clock;
use crate::keyring::{CURRENT_TTL, PURPOSE_DATA};
use crate::state::Gateway;
use crate::storage::{Reencrypted, StoreError};
use crate::sweeper::lease_ttl;

/// The job's row in `job_leases`.
pub const REENCRYPT_JOB: &str = "reencrypt";

/// How often the job looks for work.
pub const INTERVAL: Duration = Duration::from_secs(2);

/// Records per vault call and per transaction.
const BATCH: i64 = 200;

/// Most batches per round, so one round cannot run away; the next round continues.
const MAX_BATCHES_PER_ROUND: usize = 50;

/// A pause between batches leaves the vault and the database to traffic.
const PAUSE_BETWEEN_BATCHES: Duration = Duration::from_millis(20);

/// How long a superseded, unreferenced version is kept before it is destroyed: longer than a
/// request may take plus the time other gateways need to notice a rotation.
pub fn grace(request_timeout: Duration) -> Duration {
    request_timeout
        .saturating_add(CURRENT_TTL)
        .saturating_add(Duration::from_secs(2))
}

/// What the job remembers between rounds: since when each superseded version has had no
/// record. Lost when the lease moves to another gateway, which then simply waits again.
#[derive(Debug, Default)]
pub struct JobState {
    unreferenced_since: HashMap<(String, u32), Instant>,
}

/// Runs the job every [`INTERVAL`] as `holder` until `gateway` is dropped.
pub async fn run(gateway: Weak<Gateway>, holder: String, grace: Duration) {
    let ttl = lease_ttl(INTERVAL);
    let mut state = JobState::default();
    let mut tick = tokio::time::interval(INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(gateway) = gateway.upgrade() else { return };
        if let Err(err) = run_once(&gateway, &holder, ttl, grace, &mut state).await {
            tracing::warn!(error = %err, "re-encryption round failed; will retry");
        }
    }
}

async fn take_lease(gateway: &Gateway, holder: &str, ttl: Duration) -> Result<bool, StoreError> {
    // Wall-clock time: leases compare times written by different gateways.
    gateway
        .store
        .try_take_lease(REENCRYPT_JOB, holder, Clock::system().now_ms(), ttl)
        .await
}

/// One round: for every merchant with more than one data-key version, re-encrypt records
/// under older versions, then destroy versions nothing references. Returns the records moved.
pub async fn run_once(
    gateway: &Arc<Gateway>,
    holder: &str,
    ttl: Duration,
    grace: Duration,
    state: &mut JobState,
) -> Result<usize, StoreError> {
    if !take_lease(gateway, holder, ttl).await? {
        tracing::debug!("another gateway holds the re-encryption lease; skipping this round");
        return Ok(0);
    }
    let merchants = gateway.store.merchants_with_old_data_keys().await?;
    let mut moved = 0;
    let mut batches = 0;
    for (merchant_id, current) in merchants {
        let mut after = String::new();
        loop {
            if batches >= MAX_BATCHES_PER_ROUND {
                return Ok(moved);
            }
            if batches > 0 {
                tokio::time::sleep(PAUSE_BETWEEN_BATCHES).await;
                if !take_lease(gateway, holder, ttl).await? {
                    return Ok(moved);
                }
            }
            batches += 1;
            let Some((count, last)) = reencrypt_batch(gateway, &merchant_id, current, &after).await? else {
                break;
            };
            moved += count;
            after = last;
        }
        destroy_unreferenced(gateway, &merchant_id, current, grace, state).await?;
    }
    if moved > 0 {
        tracing::info!(records = moved, "re-encrypted records under current data keys");
    }
    Ok(moved)
}

/// Re-encrypts the next batch of the merchant's records (tokens after `after`) that are sealed
/// under a version older than `current`. `None` when there are none left; otherwise how many
/// were replaced and the last token looked at.
async fn reencrypt_batch(
    gateway: &Gateway,
    merchant_id: &str,
    current: u32,
    after: &str,
) -> Result<Option<(usize, String)>, StoreError> {
    let rows = gateway
        .store
        .records_under_older_keys(merchant_id, current, after, BATCH)
        .await?;
    let items: Vec<ReencryptItem> = rows
        .into_iter()
        .map(|row| ReencryptItem {
            merchant_id: merchant_id.to_owned(),
            token: row.token,
            from_version: row.data_key_version,
            ciphertext: row.ciphertext,
            to_version: current,
        })
        .collect();
    let Some(last) = items.last().map(|item| item.token.clone()) else {
        return Ok(None);
    };
    let versions: BTreeSet<u32> = items
        .iter()
        .map(|item| item.from_version)
        .chain([current])
        .collect();
    let mut keys: Vec<WrappedKey> = Vec::with_capacity(versions.len());
    for version in versions {
        match gateway
            .keys
            .key(&gateway.store, merchant_id, PURPOSE_DATA, version)
            .await
        {
            Ok(key) => keys.push((*key).clone()),
            Err(err) => {
                tracing::warn!(merchant_id, version, reason = %err.reason, "a data key for re-encryption is missing; skipping the batch");
                return Ok(Some((0, last)));
            }
        }
    }
    let results = match gateway.vault.reencrypt(keys, items.clone()).await {
        Ok(results) => results,
        Err(err) => {
            return Err(StoreError::Query(format!(
                "the vault did not re-encrypt ({})",
                err.reason
            )))
        }
    };
    let mut reencrypted = Vec::with_capacity(items.len());
    for (item, result) in items.iter().zip(results) {
        match result {
            Ok(sealed) => reencrypted.push(Reencrypted {
                token: &item.token,
                from_version: item.from_version,
                old_ciphertext: &item.ciphertext,
                ciphertext: sealed.ciphertext,
                data_key_version: sealed.data_key_version,
            }),
            // Left on its old version (which then is never destroyed) and reported each round.
            Err(err) => {
                tracing::warn!(merchant_id, token = %item.token, reason = %err.reason, "record could not be re-encrypted")
            }
        }
    }
    let replaced = gateway
        .store
        .replace_ciphertexts(merchant_id, reencrypted)
        .await?;
    Ok(Some((usize::try_from(replaced).unwrap_or(usize::MAX), last)))
}

/// Destroys the merchant's versions older than `current` that no record references and that
/// have been superseded and unreferenced for `grace`.
async fn destroy_unreferenced(
    gateway: &Gateway,
    merchant_id: &str,
    current: u32,
    grace: Duration,
    state: &mut JobState,
) -> Result<(), StoreError> {
    let current_created = gateway.store.data_key_created_at(merchant_id, current).await?;
    let grace_ms = i64::try_from(grace.as_millis()).unwrap_or(i64::MAX);
    let superseded_long_enough = gateway.clock.now_ms().saturating_sub(current_created) >= grace_ms;
    let versions = gateway
        .store
        .data_key_versions_before(merchant_id, current)
        .await?;
    for version in versions {
        let address = (merchant_id.to_owned(), version);
        let references = gateway.store.records_under_key(merchant_id, version).await?;
        if references > 0 {
            state.unreferenced_since.remove(&address);
            continue;
        }
        let since = *state
            .unreferenced_since
            .entry(address.clone())
            .or_insert_with(Instant::now);
        if !superseded_long_enough || since.elapsed() < grace {
            continue;
        }
        let deleted = gateway
            .store
            .destroy_unreferenced_data_key(merchant_id, version)
            .await?;
        state.unreferenced_since.remove(&address);
        gateway.keys.evict(merchant_id, PURPOSE_DATA, version);
        if deleted > 0 {
            tracing::info!(
                merchant_id,
                version,
                "data-key version destroyed: no record uses it"
            );
        }
    }
    Ok(())
}
