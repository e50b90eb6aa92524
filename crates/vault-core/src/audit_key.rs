//! The audit signing key: an Ed25519 key derived from the master key, so it needs no storage
//! of its own and exists only while the vault is unsealed. The log that it signs (the file, its
//! chain and block seals) is in the vault process (`crates/vault/src/audit.rs`); the format and
//! its verification are in `tessera_api::audit_format`.

use std::fmt;

use tessera_api::audit_format::{hex, key_id};

use crate::crypto::Ed25519Signer;
use crate::keys::{KeyError, MasterKey};

/// The HKDF label of the audit signing key: a fixed label, so the key is the same on every
/// start with the same master key and needs no storage.
const AUDIT_KEY_LABEL: &[u8] = b"tessera/audit-signing-key/v1";

/// The Ed25519 key that signs audit blocks. Its private half is derived from the master key
/// and exists only while the vault is unsealed.
pub struct AuditSigner {
    pair: Ed25519Signer,
    key_id: String,
    public_key: String,
}

impl AuditSigner {
    /// Derives the audit key from the master key.
    pub fn from_master(master: &MasterKey) -> Result<AuditSigner, KeyError> {
        let seed = master.derive_secret(AUDIT_KEY_LABEL)?;
        let pair = Ed25519Signer::from_seed(&seed).map_err(|_| KeyError::Crypto)?;
        let public = pair.public_key();
        Ok(AuditSigner {
            key_id: key_id(public),
            public_key: hex(public),
            pair,
        })
    }

    /// The public key, hex: what `tessera audit verify --public-key` takes.
    pub fn public_key_hex(&self) -> &str {
        &self.public_key
    }

    /// The key's short identifier, named in every block seal.
    pub fn key_id(&self) -> &str {
        &self.key_id
    }

    /// The signature of a block seal's message.
    pub fn sign(&self, message: &[u8]) -> [u8; 64] {
        self.pair.sign(message)
    }
}

impl fmt::Debug for AuditSigner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuditSigner")
            .field("key_id", &self.key_id)
            .finish_non_exhaustive()
    }
}
