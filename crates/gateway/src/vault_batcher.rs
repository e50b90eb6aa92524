//! Coalesces concurrent vault calls into batched requests, so the inner mutual-TLS hop is paid
//! once per batch instead of once per public request.
//!
//! Each call is queued; whenever an endpoint in rotation has a free slot (a bounded number of
//! batches in flight per endpoint), everything queued, up to a cap, goes out as one request.
//! There is no timer: a lone call finds a free slot and leaves at once, and calls that arrive
//! while every slot is busy ride the next batch, so batches grow exactly as fast as the load.
//! The vault answers each item on its own, and each answer goes back to the call it belongs to.
//!
//! A batch that fails at the transport level takes its endpoint out of rotation and its items
//! go back to the front of the queue for another endpoint (Protect and Reveal are safe to
//! repeat: the gateway stores nothing before it has the answer). A batch the vault answered,
//! even with a refusal, is never sent again.

use std::collections::{HashSet, VecDeque};
use std::fmt;
use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use prost::Message;
use tessera_api::vault::vault_client::VaultClient as GeneratedClient;
use tessera_api::vault::WrappedKey;
use tokio::sync::oneshot;
use tonic::transport::Channel;
use tonic::Status;

use crate::error::ApiError;
use crate::vault_pool::{CallFailure, Pool};

/// Most items in one batch: large enough that the hop's cost is spread thin, small enough
/// that one batch does not hold up the calls behind it for long.
pub(crate) const MAX_BATCH_ITEMS: usize = 256;
/// Most encoded item bytes in one batch, far under the vault's 16 MiB message limit.
pub(crate) const MAX_BATCH_BYTES: usize = 4 * 1024 * 1024;
/// Batches of one kind in flight per endpoint: enough to keep a vault's cores busy while
/// answers travel back, few enough that load turns into bigger batches, not more of them.
pub(crate) const MAX_IN_FLIGHT: usize = 3;

/// One batched vault method (Protect or Reveal).
pub(crate) trait Operation: Send + Sync + 'static {
    type Item: Message + Clone + Send + Sync + 'static;
    type Output: Send + 'static;

    /// Sends one request with these keys and items and returns one outcome per item, in order.
    fn call(
        client: GeneratedClient<Channel>,
        keys: Vec<WrappedKey>,
        items: Vec<Self::Item>,
    ) -> impl Future<Output = Result<Vec<Result<Self::Output, ApiError>>, Status>> + Send;

    /// The public error for a whole request that failed.
    fn call_error(status: &Status) -> ApiError;
}

/// An item's answer and the endpoint (index in the pool) that gave it.
#[derive(Debug)]
pub(crate) struct Served<T> {
    pub value: T,
    pub endpoint: usize,
}

/// Why an item has no answer.
#[derive(Debug, Clone)]
pub(crate) enum Failed {
    /// The vault refused this item; the others of its batch are unaffected.
    Item(ApiError),
    /// The request carrying it failed as a whole (no vault could be reached, or the vault
    /// refused the request).
    Call(ApiError),
}

impl Failed {
    pub(crate) fn into_error(self) -> ApiError {
        match self {
            Self::Item(err) | Self::Call(err) => err,
        }
    }
}

pub(crate) type Reply<T> = Result<Served<T>, Failed>;

/// Bounds of batching; the constants above in the gateway, smaller ones in tests.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    pub max_items: usize,
    pub max_bytes: usize,
    pub max_in_flight: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_items: MAX_BATCH_ITEMS,
            max_bytes: MAX_BATCH_BYTES,
            max_in_flight: MAX_IN_FLIGHT,
        }
    }
}

/// Which queue a call waits in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Lane {
    /// One public request waiting for its answer.
    Interactive,
    /// Part of a bulk call (import): goes after interactive calls, with a guaranteed share.
    Bulk,
}

/// One queued item.
struct Pending<O: Operation> {
    /// The caller's keys; shared by every item of a bulk call.
    keys: Arc<[WrappedKey]>,
    item: O::Item,
    /// Encoded size, for the batch byte cap.
    size: usize,
    /// The endpoint this item must go to while it is in rotation (a reveal taking a CVC).
    pin: Option<usize>,
    /// Requests that carried this item and failed at the transport level.
    attempts: usize,
    reply: oneshot::Sender<Reply<O::Output>>,
}

impl<O: Operation> Pending<O> {
    fn new(
        keys: Arc<[WrappedKey]>,
        item: O::Item,
        pin: Option<usize>,
        reply: oneshot::Sender<Reply<O::Output>>,
    ) -> Self {
        Self {
            keys,
            size: item.encoded_len(),
            item,
            pin,
            attempts: 0,
            reply,
        }
    }

    fn fail(self, failed: Failed) {
        // The caller may have gone (its request timed out); nobody is left to tell.
        let _ = self.reply.send(Err(failed));
    }
}

/// Everything waiting, and what is in flight, for one operation.
struct Queues<O: Operation> {
    interactive: VecDeque<Pending<O>>,
    bulk: VecDeque<Pending<O>>,
    /// Per endpoint: items that must go to it.
    pinned: Vec<VecDeque<Pending<O>>>,
    /// Per endpoint: batches in flight.
    in_flight: Vec<usize>,
    /// A task is probing the endpoints because none is in rotation.
    recovering: bool,
}

impl<O: Operation> Queues<O> {
    fn has_shared_work(&self) -> bool {
        !self.interactive.is_empty() || !self.bulk.is_empty()
    }

    fn is_empty(&self) -> bool {
        !self.has_shared_work() && self.pinned.iter().all(VecDeque::is_empty)
    }

    /// Takes the next batch for `endpoint`: its pinned items, then interactive calls, then
    /// bulk items. Items whose caller has gone are dropped here, unsent.
    fn take_batch(&mut self, endpoint: usize, limits: &Limits) -> Vec<Pending<O>> {
        let mut batch = Vec::new();
        let mut bytes = 0;
        if let Some(pinned) = self.pinned.get_mut(endpoint) {
            take_from(pinned, &mut batch, &mut bytes, limits.max_items, limits);
        }
        // Waiting bulk work keeps a quarter of the batch, so an import moves on under load.
        let reserved = self.bulk.len().min(limits.max_items / 4);
        let interactive_limit = limits.max_items.saturating_sub(reserved).max(1);
        take_from(
            &mut self.interactive,
            &mut batch,
            &mut bytes,
            interactive_limit,
            limits,
        );
        take_from(&mut self.bulk, &mut batch, &mut bytes, limits.max_items, limits);
        take_from(
            &mut self.interactive,
            &mut batch,
            &mut bytes,
            limits.max_items,
            limits,
        );
        batch
    }

    fn drain(&mut self) -> Vec<Pending<O>> {
        let mut all: Vec<_> = self.interactive.drain(..).chain(self.bulk.drain(..)).collect();
        for pinned in &mut self.pinned {
            all.extend(pinned.drain(..));
        }
        all
    }
}

fn take_from<O: Operation>(
    queue: &mut VecDeque<Pending<O>>,
    batch: &mut Vec<Pending<O>>,
    bytes: &mut usize,
    limit: usize,
    limits: &Limits,
) {
    while batch.len() < limit {
        let Some(next) = queue.front() else { return };
        if next.reply.is_closed() {
            queue.pop_front();
            continue;
        }
        // The first item always goes, whatever its size: it has to go some time.
        if !batch.is_empty() && *bytes + next.size > limits.max_bytes {
            return;
        }
        if let Some(next) = queue.pop_front() {
            *bytes += next.size;
            batch.push(next);
        }
    }
}

struct Inner<O: Operation> {
    pool: Arc<Pool>,
    limits: Limits,
    queues: Mutex<Queues<O>>,
}

impl<O: Operation> Inner<O> {
    fn queues(&self) -> MutexGuard<'_, Queues<O>> {
        // Critical sections only move items between queues and never panic, so a poisoned
        // lock still holds consistent queues.
        self.queues.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The batching queue of one operation over all endpoints of a pool; cheap to clone.
pub(crate) struct Batcher<O: Operation> {
    inner: Arc<Inner<O>>,
}

impl<O: Operation> Clone for Batcher<O> {
    fn clone(&self) -> Self {
        Self {
            inner: Arc::clone(&self.inner),
        }
    }
}

impl<O: Operation> fmt::Debug for Batcher<O> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Batcher")
            .field("limits", &self.inner.limits)
            .finish_non_exhaustive()
    }
}

/// The error of an item whose answer was lost inside the gateway (its runtime shutting down).
fn lost() -> ApiError {
    ApiError::unavailable("VAULT_UNAVAILABLE", "the vault is unavailable; retry later")
}

impl<O: Operation> Batcher<O> {
    pub(crate) fn new(pool: Arc<Pool>, limits: Limits) -> Self {
        let endpoints = pool.len();
        Self {
            inner: Arc::new(Inner {
                pool,
                limits,
                queues: Mutex::new(Queues {
                    interactive: VecDeque::new(),
                    bulk: VecDeque::new(),
                    pinned: (0..endpoints).map(|_| VecDeque::new()).collect(),
                    in_flight: vec![0; endpoints],
                    recovering: false,
                }),
            }),
        }
    }

    /// Sends one item, batched with whatever else is waiting. `pin` names the endpoint it
    /// must go to while that endpoint is in rotation.
    pub(crate) async fn one(
        &self,
        keys: Vec<WrappedKey>,
        item: O::Item,
        pin: Option<usize>,
    ) -> Reply<O::Output> {
        let (reply, answer) = oneshot::channel();
        self.enqueue(
            Lane::Interactive,
            vec![Pending::new(keys.into(), item, pin, reply)],
        );
        answer.await.unwrap_or_else(|_| Err(Failed::Call(lost())))
    }

    /// Sends many items that share `keys`, in batches with whatever else is waiting; answers
    /// come back in item order.
    pub(crate) async fn many(&self, keys: Vec<WrappedKey>, items: Vec<O::Item>) -> Vec<Reply<O::Output>> {
        let keys: Arc<[WrappedKey]> = keys.into();
        let mut answers = Vec::with_capacity(items.len());
        let pending = items
            .into_iter()
            .map(|item| {
                let (reply, answer) = oneshot::channel();
                answers.push(answer);
                Pending::new(Arc::clone(&keys), item, None, reply)
            })
            .collect();
        self.enqueue(Lane::Bulk, pending);
        let mut replies = Vec::with_capacity(answers.len());
        for answer in answers {
            replies.push(answer.await.unwrap_or_else(|_| Err(Failed::Call(lost()))));
        }
        replies
    }

    fn enqueue(&self, lane: Lane, items: Vec<Pending<O>>) {
        let mut queues = self.inner.queues();
        for item in items {
            match item.pin {
                Some(endpoint) if endpoint < queues.pinned.len() => {
                    if let Some(pinned) = queues.pinned.get_mut(endpoint) {
                        pinned.push_back(item);
                    }
                }
                _ if lane == Lane::Bulk => queues.bulk.push_back(item),
                _ => queues.interactive.push_back(item),
            }
        }
        dispatch(&self.inner, &mut queues);
    }
}

/// Sends batches while an endpoint in rotation has a free slot and there is work for it.
/// Called with the queues locked, after anything is queued and after any batch ends.
fn dispatch<O: Operation>(inner: &Arc<Inner<O>>, queues: &mut Queues<O>) {
    let pool = &inner.pool;
    // Items pinned to an endpoint out of rotation go anywhere: the data is revealed by any
    // vault, only the CVC held by the lost one is reported unavailable.
    for endpoint in 0..pool.len() {
        if !pool.is_up(endpoint) {
            if let Some(pinned) = queues.pinned.get_mut(endpoint) {
                let moved: Vec<_> = pinned.drain(..).collect();
                for mut item in moved {
                    item.pin = None;
                    queues.interactive.push_back(item);
                }
            }
        }
    }
    loop {
        let shared = queues.has_shared_work();
        let chosen = pool.pick(|endpoint| {
            let in_flight = *queues.in_flight.get(endpoint)?;
            let pinned = queues.pinned.get(endpoint).is_some_and(|queue| !queue.is_empty());
            (in_flight < inner.limits.max_in_flight && (pinned || shared)).then_some(in_flight)
        });
        let Some(endpoint) = chosen else { break };
        let batch = queues.take_batch(endpoint, &inner.limits);
        if batch.is_empty() {
            // Every candidate's caller had gone; they were dropped, look again.
            continue;
        }
        if let Some(in_flight) = queues.in_flight.get_mut(endpoint) {
            *in_flight += 1;
        }
        tokio::spawn(run(Arc::clone(inner), endpoint, batch));
    }
    let none_in_rotation = !(0..pool.len()).any(|endpoint| pool.is_up(endpoint));
    if none_in_rotation && !queues.is_empty() && !queues.recovering {
        queues.recovering = true;
        tokio::spawn(recover(Arc::clone(inner)));
    }
}

/// No endpoint is in rotation but calls are waiting: probe the endpoints now, then send the
/// waiting calls, or fail them if every vault is still down.
async fn recover<O: Operation>(inner: Arc<Inner<O>>) {
    let any_up = inner.pool.probe_down().await;
    let mut queues = inner.queues();
    queues.recovering = false;
    if any_up {
        dispatch(&inner, &mut queues);
        return;
    }
    let error = inner.pool.down_error();
    for item in queues.drain() {
        item.fail(Failed::Call(error.clone()));
    }
}

/// The request of a batch: each distinct key once (by merchant, purpose and version), and the
/// items in order. Items are cloned because a transport failure sends them again.
fn request_parts<O: Operation>(batch: &[Pending<O>]) -> (Vec<WrappedKey>, Vec<O::Item>) {
    let mut seen: HashSet<(&str, i32, u32)> = HashSet::new();
    let mut keys = Vec::new();
    let mut previous: Option<&Arc<[WrappedKey]>> = None;
    for pending in batch {
        // Consecutive items of one bulk call share their keys; look at them once.
        if previous.is_some_and(|previous| Arc::ptr_eq(previous, &pending.keys)) {
            continue;
        }
        previous = Some(&pending.keys);
        for key in pending.keys.iter() {
            if seen.insert((key.merchant_id.as_str(), key.purpose, key.version)) {
                keys.push(key.clone());
            }
        }
    }
    let items = batch.iter().map(|pending| pending.item.clone()).collect();
    (keys, items)
}

/// Sends one batch to `endpoint` and hands each item its answer, or queues the items again
/// when the endpoint could not be reached.
async fn run<O: Operation>(inner: Arc<Inner<O>>, endpoint: usize, batch: Vec<Pending<O>>) {
    let pool = &inner.pool;
    let (keys, items) = request_parts(&batch);
    let outcome = match pool.endpoint(endpoint) {
        Some(vault) => O::call(vault.client(), keys, items).await,
        None => Err(Status::internal("no such vault endpoint")),
    };
    let mut again = Vec::new();
    match outcome {
        Ok(results) if results.len() == batch.len() => {
            pool.mark_ok(endpoint);
            for (pending, result) in batch.into_iter().zip(results) {
                let reply = result
                    .map(|value| Served { value, endpoint })
                    .map_err(Failed::Item);
                let _ = pending.reply.send(reply);
            }
        }
        Ok(_) => {
            let error = ApiError::internal("VAULT_ERROR", "the vault answered a different number of items");
            for pending in batch {
                pending.fail(Failed::Call(error.clone()));
            }
        }
        Err(status) => {
            let failure = CallFailure::of(&status);
            let error = O::call_error(&status);
            match failure {
                CallFailure::Transport => pool.mark_down(endpoint, false),
                CallFailure::Refused { sealed } => pool.mark_down(endpoint, sealed),
                CallFailure::Answered => {}
            }
            // Each endpoint gets one chance at an item; more would only add latency.
            let max_attempts = pool.len().max(1);
            for mut pending in batch {
                pending.attempts += 1;
                if failure == CallFailure::Transport && pending.attempts < max_attempts {
                    pending.pin = None;
                    again.push(pending);
                } else {
                    pending.fail(Failed::Call(error.clone()));
                }
            }
            if !again.is_empty() {
                tracing::info!(
                    items = again.len(),
                    "vault endpoint failed; sending its items to another"
                );
            }
        }
    }
    let mut queues = inner.queues();
    if let Some(in_flight) = queues.in_flight.get_mut(endpoint) {
        *in_flight = in_flight.saturating_sub(1);
    }
    // Back to the front, in their order: they have waited longest.
    for pending in again.into_iter().rev() {
        queues.interactive.push_front(pending);
    }
    dispatch(&inner, &mut queues);
}
