//! Tessera's vault: the only process that holds keys and sees card data in clear.
//!
//! Layout, smallest and most reviewed first:
//! - [`card`]: parsing and validating card numbers into zeroizing types; brand and card facts.
//! - [`keys`]: the master key, wrapped merchant keys and the bounded key cache.
//! - [`payload`]: bank accounts and contact data, validated like cards.
//! - [`cvc`]: CVCs held in memory only, for a limited time, returned at most once.
//! - [`record`]: AES-256-GCM record sealing bound to merchant, token and key version.
//! - [`token`]: opaque and format-preserving token generation.
//! - [`kek_source`]: where the master key comes from (development file).
//! - [`sealing`]: sealed start: the master key split into Shamir shares, rebuilt at unseal.
//! - [`audit`]: the hash-chained, block-signed audit log of every card-data and key operation.
//! - [`hardening`]: no core dumps, no ptrace, locked memory.
//! - [`config`], [`tls`]: the configuration file and the mutual-TLS listener setup.
//! - [`service`]: the vault operations over batches, with caller authorisation.
//! - [`grpc`]: a small gRPC-over-HTTP/2 server on mutual TLS that dispatches to [`service`].
#![forbid(unsafe_code)]

pub mod audit;
pub mod card;
pub mod config;
pub mod cvc;
pub mod grpc;
pub mod hardening;
pub mod kek_source;
pub mod keys;
pub mod payload;
pub mod record;
pub mod sealing;
pub mod service;
pub mod tls;
pub mod token;
