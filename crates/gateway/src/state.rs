//! The state every handler shares: [`Gateway`].

use crate::clock::Clock;
use crate::config::Lifecycle;
use crate::keyring::KeyRing;
use crate::policy::Policy;
use crate::retry_guard::RetryGuardConfig;
use crate::storage::Store;
use crate::vault_client::VaultClient;

/// The state every handler shares.
#[derive(Debug)]
pub struct Gateway {
    pub policy: Policy,
    pub store: Store,
    pub vault: VaultClient,
    pub keys: KeyRing,
    pub clock: Clock,
    pub lifecycle: Lifecycle,
    pub retry_guard: RetryGuardConfig,
}
