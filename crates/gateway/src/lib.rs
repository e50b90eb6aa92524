//! Tessera's gateway: the public gRPC API. It authenticates callers by client certificate,
//! applies their policy, validates requests, owns all storage, and asks the vault for every
//! operation that touches card data. It holds no usable key and does not link the vault crate.
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
