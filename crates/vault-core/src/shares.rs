//! The pure half of sealed start: the master key split into Shamir shares and rebuilt from
//! them (`blahaj`, GF(256), one polynomial per key byte), the share line format, and the
//! per-share digests that let the vault check each share on arrival. No file, no clock: the
//! state machine and the public state file are in the vault process (`crates/vault`).
//!
//! The digests reveal nothing usable: fewer than `threshold` shares leave every byte of any
//! other share uniformly random, so a digest cannot be inverted by search.

use std::convert::Infallible;
use std::fmt;

use tessera_api::audit_format::{decode_hex, hex, push_hex};
use zeroize::Zeroizing;

use crate::crypto::{self, Random};
use crate::keys::{MasterKey, SecretKey, KEY_LEN};

/// First word of every share line, naming the format.
pub const SHARE_PREFIX: &str = "tessera-share-v1";
/// Domain label of the per-share digests in the state file.
const SHARE_DIGEST_LABEL: &[u8] = b"tessera/key-share-digest/v1";
/// Most shares GF(256) allows: x = 1..=255.
pub const MAX_SHARES: u32 = 255;

/// A sealed-start operation that cannot be done. Never contains share or key material.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum SealError {
    /// Init has not run: there is no key to unseal.
    NotInitialized,
    /// Init already ran: the vault refuses to create a second master key.
    AlreadyInitialized,
    /// The vault is already unsealed.
    AlreadyUnsealed,
    /// Share count or threshold outside 2 <= threshold <= shares <= 255.
    BadParameters,
    /// The text is not a share line.
    Malformed,
    /// The share belongs to another master key (its check value differs).
    WrongVault,
    /// The share does not match any share this vault issued.
    InvalidShare,
    /// This share was already submitted.
    DuplicateShare,
    /// This operator identity already submitted a share (`distinct_custodians`).
    SameCustodian,
    /// Valid shares combined to a key with another check value: the state file was altered.
    Inconsistent,
    /// The state file could not be read or written.
    State(String),
    /// The system random source failed.
    Random,
    /// Rekey was asked with a master key other than the one the state file names.
    NotCurrentKey,
}

impl SealError {
    /// The `ErrorInfo` reason a client can branch on.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::NotInitialized => "NOT_INITIALIZED",
            Self::AlreadyInitialized => "ALREADY_INITIALIZED",
            Self::AlreadyUnsealed => "ALREADY_UNSEALED",
            Self::BadParameters => "INVALID_SHARE_PARAMETERS",
            Self::Malformed => "MALFORMED_SHARE",
            Self::WrongVault => "WRONG_VAULT_SHARE",
            Self::InvalidShare => "INVALID_SHARE",
            Self::DuplicateShare => "DUPLICATE_SHARE",
            Self::SameCustodian => "SAME_CUSTODIAN",
            Self::Inconsistent => "SEAL_STATE_INCONSISTENT",
            Self::State(_) => "SEAL_STATE_UNAVAILABLE",
            Self::Random => "RANDOM_FAILED",
            Self::NotCurrentKey => "NOT_CURRENT_MASTER_KEY",
        }
    }
}

impl SealError {
    /// A fixed message for the caller (the state file's detail goes to the vault's log only).
    pub fn message(&self) -> &'static str {
        match self {
            Self::NotInitialized => "the vault is not initialised; run `tessera vault init` first",
            Self::AlreadyInitialized => "the vault is already initialised; its master key exists",
            Self::AlreadyUnsealed => "the vault is already unsealed",
            Self::BadParameters => "threshold must be at least 2 and at most shares, shares at most 255",
            Self::Malformed => "this is not a key share (expected a tessera-share-v1 line)",
            Self::WrongVault => "this share belongs to another master key (its check value differs)",
            Self::InvalidShare => {
                "this share is not one this vault issued (wrong or corrupted); progress is kept"
            }
            Self::DuplicateShare => "this share was already submitted; progress is kept",
            Self::SameCustodian => {
                "this operator already submitted a share; another custodian must submit the next"
            }
            Self::Inconsistent => {
                "the shares rebuild a key with another check value; the seal state file was altered"
            }
            Self::State(_) => "the seal state file cannot be used; see the vault's log",
            Self::Random => "the system random source failed",
            Self::NotCurrentKey => {
                "the vault runs with a master key other than the one its seal state file names"
            }
        }
    }
}

impl fmt::Display for SealError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::State(why) => write!(f, "seal state file: {why}"),
            other => f.write_str(other.message()),
        }
    }
}

impl std::error::Error for SealError {}

/// One share as submitted: its index (x) and the 32 share bytes (y), in zeroizing memory.
pub struct ShareValue {
    pub index: u8,
    value: Zeroizing<[u8; KEY_LEN]>,
}

impl fmt::Debug for ShareValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ShareValue")
            .field("index", &self.index)
            .finish_non_exhaustive()
    }
}

impl ShareValue {
    /// Parses `tessera-share-v1 <kcv> <index> <64 hex>`; returns the check value too.
    pub fn parse(text: &str) -> Result<(ShareValue, &str), SealError> {
        let line = text
            .lines()
            .map(str::trim)
            .find(|line| line.starts_with(SHARE_PREFIX))
            .ok_or(SealError::Malformed)?;
        let mut words = line.split_ascii_whitespace();
        let (Some(SHARE_PREFIX), Some(kcv), Some(index), Some(value), None) = (
            words.next(),
            words.next(),
            words.next(),
            words.next(),
            words.next(),
        ) else {
            return Err(SealError::Malformed);
        };
        let index: u8 = index.parse().map_err(|_| SealError::Malformed)?;
        if index == 0 {
            return Err(SealError::Malformed);
        }
        let value = Zeroizing::new(decode_hex::<KEY_LEN>(value).ok_or(SealError::Malformed)?);
        Ok((ShareValue { index, value }, kcv))
    }

    /// The share line handed to a custodian.
    pub fn line(&self, kcv: &str) -> Zeroizing<String> {
        let mut line = Zeroizing::new(String::with_capacity(128));
        line.push_str(SHARE_PREFIX);
        line.push(' ');
        line.push_str(kcv);
        line.push(' ');
        line.push_str(&self.index.to_string());
        line.push(' ');
        push_hex(&mut line, self.value.as_slice());
        line
    }

    /// The labelled SHA-256 (hex) kept in the public state file to check this share.
    pub fn digest(&self, kcv: &str) -> String {
        hex(&crypto::sha256(&[
            SHARE_DIGEST_LABEL,
            kcv.as_bytes(),
            &[self.index],
            self.value.as_slice(),
        ]))
    }
}

/// Adapts the vault's [`Random`] to the RNG traits blahaj takes. rand's traits cannot report
/// failure, so a failed fill sets `failed` (and yields zeros), and the caller throws away
/// everything produced once it is set.
struct RandomAdapter<'a> {
    rng: &'a Random,
    failed: bool,
}

impl rand_core::TryRng for RandomAdapter<'_> {
    type Error = Infallible;

    fn try_next_u32(&mut self) -> Result<u32, Infallible> {
        let mut bytes = [0u8; 4];
        self.try_fill_bytes(&mut bytes)?;
        Ok(u32::from_le_bytes(bytes))
    }

    fn try_next_u64(&mut self) -> Result<u64, Infallible> {
        let mut bytes = [0u8; 8];
        self.try_fill_bytes(&mut bytes)?;
        Ok(u64::from_le_bytes(bytes))
    }

    fn try_fill_bytes(&mut self, dst: &mut [u8]) -> Result<(), Infallible> {
        if self.rng.fill(dst).is_err() {
            self.failed = true;
            dst.fill(0);
        }
        Ok(())
    }
}

impl rand_core::TryCryptoRng for RandomAdapter<'_> {}
/// Creates a master key and splits it into `shares` shares, any `threshold` of which rebuild it.
pub fn deal(shares: u32, threshold: u32, rng: &Random) -> Result<(MasterKey, Vec<ShareValue>), SealError> {
    if !(2..=shares).contains(&threshold) || shares > MAX_SHARES {
        return Err(SealError::BadParameters);
    }
    let threshold_u8 = u8::try_from(threshold).map_err(|_| SealError::BadParameters)?;
    let count = usize::try_from(shares).map_err(|_| SealError::BadParameters)?;
    let mut secret = Zeroizing::new([0u8; KEY_LEN]);
    rng.fill(secret.as_mut_slice()).map_err(|_| SealError::Random)?;
    let mut source = RandomAdapter { rng, failed: false };
    let dealt: Vec<blahaj::Share> = blahaj::Sharks(threshold_u8)
        .dealer_rng(secret.as_slice(), &mut source)
        .take(count)
        .collect();
    if source.failed {
        return Err(SealError::Random);
    }
    let mut values = Vec::with_capacity(count);
    for share in &dealt {
        let bytes = Zeroizing::new(Vec::from(share));
        let (index, value) = bytes.split_first().ok_or(SealError::Random)?;
        let value: &[u8; KEY_LEN] = value.try_into().map_err(|_| SealError::Random)?;
        values.push(ShareValue {
            index: *index,
            value: Zeroizing::new(*value),
        });
    }
    Ok((MasterKey::new(SecretKey::from_bytes(secret)), values))
}
/// Rebuilds the master key from `threshold` checked shares and confirms it has
/// `key_check_value`.
pub fn combine<'a>(
    shares: impl Iterator<Item = &'a ShareValue>,
    threshold: u32,
    key_check_value: &str,
) -> Result<MasterKey, SealError> {
    let shares = shares
        .map(|share| {
            let mut bytes = Zeroizing::new(Vec::with_capacity(1 + KEY_LEN));
            bytes.push(share.index);
            bytes.extend_from_slice(share.value.as_slice());
            blahaj::Share::try_from(bytes.as_slice())
        })
        .collect::<Result<Vec<_>, _>>()
        .map_err(|_| SealError::Inconsistent)?;
    let threshold = u8::try_from(threshold).map_err(|_| SealError::Inconsistent)?;
    let secret = Zeroizing::new(
        blahaj::Sharks(threshold)
            .recover(&shares)
            .map_err(|_| SealError::Inconsistent)?,
    );
    let bytes: &[u8; KEY_LEN] = secret
        .as_slice()
        .try_into()
        .map_err(|_| SealError::Inconsistent)?;
    let key = MasterKey::new(SecretKey::from_bytes(Zeroizing::new(*bytes)));
    if key.key_check_value() != key_check_value {
        return Err(SealError::Inconsistent);
    }
    Ok(key)
}
