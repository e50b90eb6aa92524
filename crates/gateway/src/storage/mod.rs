//! Storage: every SQL statement of the gateway, in SQLite or PostgreSQL through sqlx with
//! embedded migrations (`migrations/{sqlite,postgres}`). Nothing outside this module talks to
//! the database (`tests/layers.rs` checks it).
//!
//! - `records`: the records stored (tokens, journal entries, wrapped keys, merchant
//!   references, statuses as enums stored as text), their row decoding, and the statements a
//!   single transaction runs for them.
//! - `store`: [`Store`], the database handle: opening and migrating, reads on a pool, writes
//!   through the write queue, the sweeper's sweep and job leases.
//! - `write_queue`: the batching writer (group commit): every write of every concurrent
//!   request is queued and committed with its neighbours in one transaction.
//! - `wal_checkpoint`: SQLite's WAL checkpoints, run beside the writer.
//! - `retry_guard`: the retry guard's statements inside the writer's transaction;
//!   `blocks`: card blocks as handlers and the sweeper read and end them.
//! - `idempotency`: idempotency keys and the merchant-reference hint.
//! - `events`: the events table as subscribers read it.
//! - `keys`: key rotation's statements (status, re-wrapping, re-encryption, destruction).
//!
//! Submodules depend on each other in one direction: `records` and `wal_checkpoint` on no
//! sibling, `retry_guard` on `records`, `write_queue` on those three, `store` on
//! `write_queue`, and `blocks`, `events`, `idempotency` and `keys` on `store` (whose
//! [`Store`] they add methods to); this file only re-exports.

mod blocks;
mod events;
mod idempotency;
mod keys;
pub mod records;
mod retry_guard;
mod store;
pub mod wal_checkpoint;
pub mod write_queue;

pub use events::EventRow;
pub use idempotency::{Begin, Claim};
pub use keys::{KeyRow, Reencrypted, Rewrapped, SealedRecord};
pub(crate) use records::store_error;
pub use records::{
    Backend, DataType, Journal, JournalEntry, JournalKind, JournalRecord, ListCursor, MerchantReference,
    StoreError, StoredKey, Swept, TokenFormat, TokenRecord, TokenStatus, Transition,
};
pub use store::Store;
