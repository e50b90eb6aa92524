//! The vaults one gateway talks to: a mutual-TLS channel per configured endpoint, each with
//! its health, and the choice of which endpoint takes the next call.
//!
//! An endpoint whose call fails at the transport level, or that answers it is unavailable (a
//! sealed vault, or one that cannot write its audit log), is taken out of rotation. A watcher
//! task probes it with the vault's no-op `Echo` after a backoff that doubles from 1 s to 30 s,
//! and only a successful probe puts it back. While every endpoint is out, a call probes them
//! itself (at most a few times a second per endpoint) so a restarted single vault is used
//! again at once, not only when its backoff runs out.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::{Duration, Instant};

use tessera_api::error_details::decode_error_info;
use tessera_api::vault::vault_client::VaultClient as GeneratedClient;
use tessera_api::vault::EchoRequest;
use tonic::transport::Channel;
use tonic::{Code, Status};

use crate::error::ApiError;

/// The first wait before a failed endpoint is probed; doubled after each failed probe.
const BACKOFF_INITIAL: Duration = Duration::from_secs(1);
/// The longest wait between probes of an endpoint that stays down.
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// A probe that takes longer than this counts as failed.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);
/// While every endpoint is down, calls probe an endpoint at most this often: enough to notice
/// a restarted vault at once without every waiting call knocking on a dead one.
const DEMAND_PROBE_INTERVAL: Duration = Duration::from_millis(250);

/// The `ErrorInfo` reasons of the vault's own statuses that the gateway acts on, parsed once
/// from the text on the wire (the vault's reason strings are its API and do not change).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum VaultReason {
    /// `VAULT_SEALED`: the vault has no master key loaded until it is unsealed.
    Sealed,
    /// Any other reason, which the gateway does not tell apart.
    Other,
}

impl VaultReason {
    const SEALED: &'static str = "VAULT_SEALED";

    pub(crate) fn parse(reason: &str) -> Self {
        if reason == Self::SEALED {
            Self::Sealed
        } else {
            Self::Other
        }
    }

    /// The reason a status from the vault carries; `None` when it carries no `ErrorInfo` (the
    /// client's own transport made it).
    pub(crate) fn of(status: &Status) -> Option<Self> {
        decode_error_info(status.details()).map(|info| Self::parse(&info.reason))
    }
}

/// How a failed vault call failed, which decides what the gateway does next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CallFailure {
    /// No answer from the vault (connection refused or lost, timeout): the endpoint is taken
    /// out of rotation and the call may be retried on another one.
    Transport,
    /// The vault answered that it cannot serve at all (sealed, audit log unwritable): taken out
    /// of rotation, but the answer stands for this call.
    Refused { sealed: bool },
    /// Any other answer from the vault (a refused request): the endpoint is fine and the call
    /// is not retried.
    Answered,
}

impl CallFailure {
    /// Sorts a failed call. The vault puts an `ErrorInfo` on every status it sends, so a status
    /// without one came from the client's own transport, not from the vault.
    pub(crate) fn of(status: &Status) -> Self {
        match (status.code(), VaultReason::of(status)) {
            (Code::Unavailable, Some(reason)) => Self::Refused {
                sealed: reason == VaultReason::Sealed,
            },
            (_, Some(_)) => Self::Answered,
            (Code::Unavailable | Code::Unknown | Code::Cancelled | Code::DeadlineExceeded, None) => {
                Self::Transport
            }
            (_, None) => Self::Answered,
        }
    }
}

/// What the gateway knows about one endpoint.
#[derive(Debug)]
struct Health {
    up: bool,
    /// The last failure was the vault saying it is sealed.
    sealed: bool,
    /// The wait before the next probe once the endpoint is down.
    backoff: Duration,
    /// When the watcher probes next.
    probe_at: Instant,
    last_probe: Option<Instant>,
    /// A watcher task is probing this endpoint.
    watched: bool,
}

/// One vault endpoint: its channel (one HTTP/2 connection, made lazily) and its health.
#[derive(Debug)]
pub(crate) struct VaultEndpoint {
    url: Arc<str>,
    client: GeneratedClient<Channel>,
    health: Mutex<Health>,
    /// Held while a probe is on the wire, so concurrent callers share one probe.
    probing: tokio::sync::Mutex<()>,
}

impl VaultEndpoint {
    fn new(url: String, channel: Channel) -> Self {
        Self {
            url: url.into(),
            client: GeneratedClient::new(channel),
            health: Mutex::new(Health {
                up: true,
                sealed: false,
                backoff: BACKOFF_INITIAL,
                probe_at: Instant::now(),
                last_probe: None,
                watched: false,
            }),
            probing: tokio::sync::Mutex::new(()),
        }
    }

    /// The endpoint as configured, e.g. `https://10.0.0.5:7443`.
    pub(crate) fn url(&self) -> &Arc<str> {
        &self.url
    }

    /// A client on this endpoint's channel (cheap: the channel is shared).
    pub(crate) fn client(&self) -> GeneratedClient<Channel> {
        self.client.clone()
    }

    fn health(&self) -> MutexGuard<'_, Health> {
        // Every critical section below is a few field assignments that cannot panic, so a
        // poisoned lock still holds consistent state.
        self.health.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(crate) fn is_up(&self) -> bool {
        self.health().up
    }

    /// Sends one `Echo` and records the outcome. `min_interval` skips the probe (answering
    /// "still down") when the last one was more recent than that.
    async fn probe(&self, min_interval: Duration) -> bool {
        let _one_at_a_time = self.probing.lock().await;
        {
            let mut health = self.health();
            if health.up {
                // Another caller's probe succeeded while this one waited for it.
                return true;
            }
            let now = Instant::now();
            if health
                .last_probe
                .is_some_and(|last| now.duration_since(last) < min_interval)
            {
                return false;
            }
            health.last_probe = Some(now);
        }
        let outcome = tokio::time::timeout(PROBE_TIMEOUT, self.client().echo(EchoRequest::default())).await;
        let mut health = self.health();
        match outcome {
            Ok(Ok(_)) => {
                tracing::info!(vault = %self.url, "vault endpoint is back in rotation");
                health.up = true;
                health.sealed = false;
                true
            }
            failed => {
                health.sealed = matches!(
                    &failed,
                    Ok(Err(status)) if CallFailure::of(status) == (CallFailure::Refused { sealed: true })
                );
                health.backoff = (health.backoff * 2).min(BACKOFF_MAX);
                health.probe_at = Instant::now() + health.backoff;
                tracing::debug!(vault = %self.url, backoff = ?health.backoff, "vault endpoint still down");
                false
            }
        }
    }
}

/// Probes a down endpoint each time its backoff runs out until it is back, then ends. Holds
/// the endpoint weakly so a dropped client ends it too.
async fn watch(endpoint: Weak<VaultEndpoint>) {
    loop {
        let Some(probe_at) = endpoint.upgrade().map(|endpoint| endpoint.health().probe_at) else {
            return;
        };
        tokio::time::sleep_until(probe_at.into()).await;
        let Some(endpoint) = endpoint.upgrade() else {
            return;
        };
        endpoint.probe(Duration::ZERO).await;
        let mut health = endpoint.health();
        // Checked and cleared under the lock that `mark_down` takes, so an endpoint that fails
        // again right after coming back always gets a watcher.
        if health.up {
            health.watched = false;
            return;
        }
    }
}

/// All configured vault endpoints.
#[derive(Debug)]
pub(crate) struct Pool {
    endpoints: Vec<Arc<VaultEndpoint>>,
    /// Rotates the starting point of each pick so equal choices take turns.
    cursor: AtomicUsize,
}

impl Pool {
    /// One endpoint per `(url, channel)`; all start in rotation.
    pub(crate) fn new(channels: Vec<(String, Channel)>) -> Self {
        Self {
            endpoints: channels
                .into_iter()
                .map(|(url, channel)| Arc::new(VaultEndpoint::new(url, channel)))
                .collect(),
            cursor: AtomicUsize::new(0),
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.endpoints.len()
    }

    pub(crate) fn endpoint(&self, index: usize) -> Option<&Arc<VaultEndpoint>> {
        self.endpoints.get(index)
    }

    /// The endpoint configured as `url`, if any.
    pub(crate) fn index_of(&self, url: &str) -> Option<usize> {
        self.endpoints.iter().position(|endpoint| &*endpoint.url == url)
    }

    pub(crate) fn is_up(&self, index: usize) -> bool {
        self.endpoint(index).is_some_and(|endpoint| endpoint.is_up())
    }

    /// The endpoint in rotation with the lowest load, among those `load` accepts (`None`:
    /// not eligible). Ties go round robin.
    pub(crate) fn pick(&self, load: impl Fn(usize) -> Option<usize>) -> Option<usize> {
        let count = self.endpoints.len();
        if count == 0 {
            return None;
        }
        let start = self.cursor.fetch_add(1, Ordering::Relaxed) % count;
        let mut best: Option<(usize, usize)> = None;
        for offset in 0..count {
            let index = (start + offset) % count;
            if !self.is_up(index) {
                continue;
            }
            let Some(load) = load(index) else { continue };
            if best.is_none_or(|(_, lowest)| load < lowest) {
                best = Some((index, load));
            }
        }
        best.map(|(index, _)| index)
    }

    /// A call on `index` was answered: its backoff starts over.
    pub(crate) fn mark_ok(&self, index: usize) {
        if let Some(endpoint) = self.endpoint(index) {
            endpoint.health().backoff = BACKOFF_INITIAL;
        }
    }

    /// Takes `index` out of rotation and makes sure a watcher will probe it.
    pub(crate) fn mark_down(&self, index: usize, sealed: bool) {
        let Some(endpoint) = self.endpoint(index) else {
            return;
        };
        let mut health = endpoint.health();
        health.sealed = sealed;
        if health.up {
            tracing::warn!(vault = %endpoint.url, sealed, "vault endpoint taken out of rotation");
            health.up = false;
            health.probe_at = Instant::now() + health.backoff;
        }
        if !health.watched {
            // Without a runtime (not the case in the gateway) the endpoint is still probed on
            // demand when every endpoint is down.
            if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                health.watched = true;
                runtime.spawn(watch(Arc::downgrade(endpoint)));
            }
        }
    }

    /// Probes every down endpoint not probed in the last moment, at once; true if any endpoint
    /// is in rotation afterwards.
    pub(crate) async fn probe_down(&self) -> bool {
        let mut probes = tokio::task::JoinSet::new();
        for endpoint in &self.endpoints {
            if !endpoint.is_up() {
                let endpoint = Arc::clone(endpoint);
                probes.spawn(async move { endpoint.probe(DEMAND_PROBE_INTERVAL).await });
            }
        }
        while probes.join_next().await.is_some() {}
        self.endpoints.iter().any(|endpoint| endpoint.is_up())
    }

    /// An endpoint for a call that is not batched: round robin over those in rotation,
    /// probing the others first when none is.
    pub(crate) async fn route(&self) -> Result<usize, ApiError> {
        if let Some(index) = self.pick(|_| Some(0)) {
            return Ok(index);
        }
        self.probe_down().await;
        self.pick(|_| Some(0)).ok_or_else(|| self.down_error())
    }

    /// What callers get when no endpoint can take a call: `VAULT_SEALED` when every vault
    /// said it is sealed, else `VAULT_UNAVAILABLE`.
    pub(crate) fn down_error(&self) -> ApiError {
        let all_sealed = !self.endpoints.is_empty()
            && self.endpoints.iter().all(|endpoint| {
                let health = endpoint.health();
                !health.up && health.sealed
            });
        if all_sealed {
            ApiError::unavailable("VAULT_SEALED", "the vault is sealed; retry later")
        } else {
            ApiError::unavailable("VAULT_UNAVAILABLE", "the vault is unavailable; retry later")
        }
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
    use tessera_api::error_details::encode_status_details;

    fn status(code: Code, reason: Option<&str>) -> Status {
        match reason {
            Some(reason) => Status::with_details(
                code,
                "x",
                encode_status_details(code as i32, "x", reason, &[]).into(),
            ),
            None => Status::new(code, "x"),
        }
    }

    #[test]
    fn failures_are_sorted_by_who_answered() {
        for code in [
            Code::Unavailable,
            Code::Unknown,
            Code::Cancelled,
            Code::DeadlineExceeded,
        ] {
            assert_eq!(
                CallFailure::of(&status(code, None)),
                CallFailure::Transport,
                "{code:?}"
            );
        }
        assert_eq!(
            CallFailure::of(&status(Code::Unavailable, Some("VAULT_SEALED"))),
            CallFailure::Refused { sealed: true }
        );
        assert_eq!(
            CallFailure::of(&status(Code::Unavailable, Some("AUDIT_UNAVAILABLE"))),
            CallFailure::Refused { sealed: false }
        );
        for (code, reason) in [
            (Code::PermissionDenied, Some("CALLER_NOT_ALLOWED")),
            (Code::InvalidArgument, Some("BATCH_TOO_LARGE")),
            (Code::Internal, None),
            (Code::PermissionDenied, None),
        ] {
            assert_eq!(
                CallFailure::of(&status(code, reason)),
                CallFailure::Answered,
                "{code:?}"
            );
        }
    }

    fn lazy_pool(count: usize) -> Pool {
        Pool::new(
            (0..count)
                .map(|i| {
                    let url = format!("http://127.0.0.1:{}", 1 + i);
                    let channel = tonic::transport::Endpoint::from_shared(url.clone())
                        .unwrap()
                        .connect_lazy();
                    (url, channel)
                })
                .collect(),
        )
    }

    #[tokio::test]
    async fn picks_take_turns_and_skip_down_endpoints() {
        let pool = lazy_pool(3);
        let picks: Vec<_> = (0..6).map(|_| pool.pick(|_| Some(0)).unwrap()).collect();
        for index in 0..3 {
            assert_eq!(picks.iter().filter(|p| **p == index).count(), 2, "{picks:?}");
        }
        pool.mark_down(1, false);
        assert!(!pool.is_up(1));
        assert!((0..6).all(|_| pool.pick(|_| Some(0)) != Some(1)));
        // The least loaded endpoint wins.
        assert_eq!(pool.pick(|i| Some(if i == 2 { 0 } else { 5 })), Some(2));
        // Not eligible anywhere.
        assert_eq!(pool.pick(|_| None), None);
    }

    #[tokio::test]
    async fn all_sealed_reports_sealed() {
        let pool = lazy_pool(2);
        pool.mark_down(0, true);
        assert_eq!(pool.down_error().reason, "VAULT_UNAVAILABLE");
        pool.mark_down(1, true);
        assert_eq!(pool.down_error().reason, "VAULT_SEALED");
        pool.mark_down(1, false);
        assert_eq!(pool.down_error().reason, "VAULT_UNAVAILABLE");
    }
}
