//! Size limits of the public API, in one place: the gateway enforces them, `tessera import`
//! sizes its messages by them, and `tessera.proto` documents them. A message over a limit is
//! refused as bad input (INVALID_ARGUMENT, not retryable, where tonic alone would answer
//! OUT_OF_RANGE) with the `ErrorInfo` reason [`REQUEST_TOO_LARGE`], whose metadata names the
//! limit; nothing is ever silently cut.

/// Largest message of any unary RPC (and of `SubscribeEvents`' request). A tokenize with the
/// longest valid fields is under 1 KiB; the margin is for future fields.
pub const MAX_REQUEST_BYTES: usize = 64 * 1024;

/// Largest `ImportRequest` message. Chosen with [`MAX_IMPORT_ITEMS`] so that the most items a
/// message may carry, each as large as a valid item can be, always fit (the gateway's tests
/// check this against its validation limits).
pub const MAX_IMPORT_MESSAGE_BYTES: usize = 1024 * 1024;

/// Most items one `ImportRequest` message may carry.
pub const MAX_IMPORT_ITEMS: usize = 1000;

/// The `ErrorInfo` reason of a request over a size limit.
pub const REQUEST_TOO_LARGE: &str = "REQUEST_TOO_LARGE";
