//! Tessera's vault process: the only process that holds keys and sees card data in clear.
//!
//! Everything that touches card data or keys is in `tessera-vault-core` (`crates/vault-core`,
//! read it first); this crate runs it:
//! - [`kek_source`]: where the master key comes from (development file).
//! - [`sealing`]: sealed start: the state machine of unseal and its public state file.
//! - [`audit`]: the hash-chained, block-signed audit log file of every card-data and key
//!   operation.
//! - [`hardening`]: no core dumps, no ptrace, locked memory.
//! - [`config`], [`tls`]: the configuration file and the mutual-TLS listener setup.
//! - [`service`]: sealed start (init, unseal, seal, rekey, retire), status and the start and
//!   stop records; data calls go to the core's `Vault`.
//! - [`grpc`]: a small gRPC-over-HTTP/2 server on mutual TLS that dispatches to [`service`] and
//!   maps every error to its gRPC status code in one place.
#![forbid(unsafe_code)]

pub mod audit;
pub mod config;
pub mod grpc;
pub mod hardening;
pub mod kek_source;
pub mod sealing;
pub mod service;
pub mod tls;
