//! The errors that refuse a whole request. Each names a reason a client can branch on and a
//! fixed message; neither ever holds card data, a key or a share. The gRPC layer of the vault
//! process maps each to its status code in one place (`crates/vault/src/grpc.rs`).

use std::fmt;

use crate::shares::SealError;

/// google.rpc.Code values of per-item errors, which travel inside the response messages
/// (`ItemError.code`); request-level codes are chosen by the gRPC layer.
pub mod code {
    pub const INVALID_ARGUMENT: i32 = 3;
    pub const NOT_FOUND: i32 = 5;
    pub const PERMISSION_DENIED: i32 = 7;
    pub const RESOURCE_EXHAUSTED: i32 = 8;
    pub const FAILED_PRECONDITION: i32 = 9;
    pub const INTERNAL: i32 = 13;
    pub const DATA_LOSS: i32 = 15;
}

/// A whole request refused.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum VaultError {
    /// No master key is loaded: a data operation while the vault is sealed.
    Sealed,
    /// The audit log cannot be written: card-data operations fail closed.
    AuditUnavailable,
    /// The audit signing key could not be derived from the master key.
    AuditKeyFailed,
    /// The system's secure random source failed.
    RandomFailed,
    /// `merchant_id` is empty or longer than 64 bytes.
    InvalidMerchantId,
    /// A key version of 0 was asked for.
    InvalidKeyVersion,
    /// A new merchant key could not be generated or wrapped.
    KeyCreationFailed,
    /// A request carries more items than one call may.
    BatchTooLarge,
    /// A sealed-start operation on a vault that does not use sealed start.
    NotASealedVault,
    /// A sealed-start operation was refused (the seal error says why).
    Seal(SealError),
}

impl VaultError {
    /// The `google.rpc.ErrorInfo` reason.
    pub fn reason(&self) -> &'static str {
        match self {
            VaultError::Sealed => "VAULT_SEALED",
            VaultError::AuditUnavailable => "AUDIT_UNAVAILABLE",
            VaultError::AuditKeyFailed => "AUDIT_KEY_FAILED",
            VaultError::RandomFailed => "RANDOM_FAILED",
            VaultError::InvalidMerchantId => "INVALID_MERCHANT_ID",
            VaultError::InvalidKeyVersion => "INVALID_KEY_VERSION",
            VaultError::KeyCreationFailed => "KEY_CREATION_FAILED",
            VaultError::BatchTooLarge => "BATCH_TOO_LARGE",
            VaultError::NotASealedVault => "NOT_A_SEALED_VAULT",
            VaultError::Seal(err) => err.reason(),
        }
    }

    /// The fixed message for the caller.
    pub fn message(&self) -> &'static str {
        match self {
            VaultError::Sealed => "the vault is sealed; operators must unseal it",
            VaultError::AuditUnavailable => {
                "the vault cannot write its audit log; card-data operations are refused (see its log and status)"
            }
            VaultError::AuditKeyFailed => "the audit signing key could not be derived",
            VaultError::RandomFailed => "the system random source failed",
            VaultError::InvalidMerchantId => "merchant_id must be 1 to 64 bytes",
            VaultError::InvalidKeyVersion => "key versions start at 1",
            VaultError::KeyCreationFailed => "the key could not be created",
            VaultError::BatchTooLarge => "a request carries at most 10000 items",
            VaultError::NotASealedVault => {
                "this vault does not use a sealed start ([master_key] source = \"sealed\")"
            }
            VaultError::Seal(err) => err.message(),
        }
    }
}

impl fmt::Display for VaultError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.message(), self.reason())
    }
}

impl std::error::Error for VaultError {}

impl From<SealError> for VaultError {
    fn from(err: SealError) -> Self {
        VaultError::Seal(err)
    }
}
