//! The part of Tessera's vault that touches card data in clear or key material, and nothing
//! else: synchronous, no I/O (no network, no files, no clock reads; time comes in as
//! arguments), small enough for a compliance reviewer to read in one sitting. The vault process
//! (`crates/vault`) adds configuration, TLS, the audit file, the sealed-start state file,
//! process hardening and the gRPC server around it.
//!
//! Reading order, smallest and most reviewed first:
//! - [`crypto`]: the one seam to the cryptographic library (`ring`): AES-256-GCM, HMAC-SHA-256,
//!   HKDF, SHA-256, Ed25519 and the secure random source. No other module calls `ring`.
//! - [`card`]: parsing and validating card numbers into zeroizing types; brand and card facts.
//! - [`payload`]: bank accounts and contact data, validated like cards.
//! - [`keys`]: the master key, wrapped merchant keys, fingerprints and the bounded key cache.
//! - [`record`]: AES-256-GCM record sealing bound to merchant, token and key version.
//! - [`token`]: opaque and format-preserving token generation.
//! - [`cvc`]: CVCs held in memory only, for a limited time, returned at most once.
//! - [`shares`]: the master key split into Shamir shares and rebuilt from them.
//! - [`audit_key`]: the audit signing key derived from the master key.
//! - [`error`]: the typed errors that refuse a whole request.
//! - [`audit`]: a call's audit records and the [`audit::AuditSink`] the process writes them to.
//! - [`vault`]: the [`vault::Vault`] facade of the data operations over batches, with one
//!   batch-and-audit step.
#![forbid(unsafe_code)]

pub mod audit;
pub mod audit_key;
pub mod card;
pub mod crypto;
pub mod cvc;
pub mod error;
pub mod keys;
pub mod payload;
pub mod record;
pub mod shares;
pub mod token;
pub mod vault;
