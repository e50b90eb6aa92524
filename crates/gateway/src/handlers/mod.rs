//! The handlers of `tessera.v1.Tokenization`, one module per flow, each adding its methods to
//! [`crate::state::Gateway`]. They validate and authorise, call the vault, and read and write
//! through crate::storage; the tonic adapter (crate::service) calls them.

pub(crate) mod common;
pub(crate) mod detokenize;
pub mod events;
pub mod import;
pub(crate) mod lifecycle;
pub(crate) mod listing;
pub(crate) mod tokenize;
