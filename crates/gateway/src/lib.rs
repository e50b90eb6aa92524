//! Tessera's gateway: the public gRPC API. It authenticates callers by client certificate,
//! applies their policy, validates requests, owns all storage, and asks the vault for every
//! operation that touches card data. It holds no usable key and does not link the vault crate.
//!
//! # Layout
//!
//! Modules import each other in one direction, from the wiring down to the foundations
//! (`tests/layers.rs` checks there is no import circle, also inside `handlers/` and
//! `storage/`, and that no SQL is outside `storage/`):
//!
//! - [`server`] wires everything together: TLS, the tonic services, the background jobs.
//! - [`service`] is the tonic adapter of `tessera.v1.Tokenization`: callers from client
//!   certificates, message size limits, the idempotent call wrapper, errors to statuses.
//!   [`admin`] is the adapter (and the handlers) of `tessera.v1.KeyAdmin`.
//! - [`handlers`], one module per flow, add the handlers to [`state::Gateway`]: `tokenize`,
//!   `detokenize`, `lifecycle` (delete, confirm, extend retention, report an authorisation),
//!   `listing` (get, list, history), `import` (bulk import), `events` (SubscribeEvents), and
//!   `common` (what they share: lookups, authorisation, the token lifecycle rules).
//! - The background jobs: [`sweeper`] (retention and deadlines) and [`reencrypt`] (key
//!   rotation).
//! - [`idempotency`]: idempotency keys and request hashes; `mapping` (crate-private): stored
//!   records to and from the public and the vault messages.
//! - [`state`]: [`state::Gateway`], the state every handler and job shares.
//! - [`keyring`]: merchants' wrapped keys, cached, created through the vault.
//! - [`storage`]: every SQL statement (the store, the batching writer, WAL checkpoints, and
//!   the statements of idempotency, events, the retry guard and key rotation), and the stored
//!   records with their enums (statuses, data types, formats, journal kinds).
//! - The vault hop: [`vault_client`] (with its endpoint pool and call batcher) and [`floor`].
//! - Foundations: [`config`], [`policy`], [`validate`], [`purpose`], [`retry_guard`] (the
//!   schemes' rules), [`clock`], [`error`], [`transport_errors`].
#![forbid(unsafe_code)]

pub mod admin;
pub mod clock;
pub mod config;
pub mod error;
pub mod floor;
pub mod handlers;
pub mod idempotency;
pub mod keyring;
pub(crate) mod mapping;
pub mod policy;
pub mod purpose;
pub mod reencrypt;
pub mod retry_guard;
pub mod server;
pub mod service;
pub mod state;
pub mod storage;
pub mod sweeper;
pub mod transport_errors;
pub mod validate;
mod vault_batcher;
pub mod vault_client;
mod vault_pool;
