//! AES-256-GCM sealing of token records, bound to merchant, token and key version.
//!
//! A sealed record is `0x01 || nonce (12) || ciphertext || tag (16)`. The associated data names
//! the merchant, the token and the data-key version, so a ciphertext copied to another token's
//! row, another merchant or another key version fails to open instead of revealing the wrong
//! card.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};

use prost::Message;
use zeroize::Zeroizing;

use tessera_api::vault::{secret_data, SecretData};

use crate::card::ValidCard;
use crate::crypto::{Random, NONCE_LEN, TAG_LEN};
use crate::keys::{length_prefixed, DataKey};

/// First byte of a sealed record, so the format can change without guessing.
const RECORD_FORMAT_V1: u8 = 0x01;
/// The smallest sealed record: format byte, nonce and tag around an empty plaintext.
const MIN_SEALED_LEN: usize = 1 + NONCE_LEN + TAG_LEN;
const RECORD_LABEL: &[u8] = b"tessera/record/v1";
/// Counters start below this so at least 2^63 records can be sealed before exhaustion.
const COUNTER_START_LIMIT: u64 = 1 << 63;

/// Unique AES-GCM nonces for one vault process: a 4-byte random prefix followed by an 8-byte
/// big-endian counter.
///
/// Within a process the counter never repeats: it is atomic, and it stops with an error
/// instead of wrapping at `u64::MAX`. Across processes, every vault process draws its own
/// random prefix, and also starts its counter at a random point below 2^63, so two processes
/// sharing a merchant key collide only if both their prefixes match (2^-32 per pair) and
/// their counter ranges overlap (about 2n/2^63 for n records each). Merchant keys are also
/// rotated, which bounds how many processes and records ever share one key. Counting instead
/// of drawing 12 random bytes per record keeps a system call off the per-record path.
pub struct NonceSequence {
    prefix: [u8; 4],
    counter: AtomicU64,
}

impl NonceSequence {
    /// A new sequence with its prefix and starting point drawn once from `rng`.
    pub fn new(rng: &Random) -> Result<NonceSequence, RecordError> {
        let mut seed = [0u8; 12];
        rng.fill(&mut seed).map_err(|_| RecordError::Random)?;
        let [p0, p1, p2, p3, start @ ..] = seed;
        Ok(NonceSequence::starting_at(
            [p0, p1, p2, p3],
            u64::from_be_bytes(start) % COUNTER_START_LIMIT,
        ))
    }

    fn starting_at(prefix: [u8; 4], counter: u64) -> NonceSequence {
        NonceSequence {
            prefix,
            counter: AtomicU64::new(counter),
        }
    }

    /// The next nonce, or an error once the counter is used up.
    fn next(&self) -> Result<[u8; NONCE_LEN], RecordError> {
        // Relaxed suffices: uniqueness needs only the atomicity of the update, not ordering
        // with other memory.
        let count = self
            .counter
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |count| count.checked_add(1))
            .map_err(|_| RecordError::NoncesExhausted)?;
        let [p0, p1, p2, p3] = self.prefix;
        let [c0, c1, c2, c3, c4, c5, c6, c7] = count.to_be_bytes();
        Ok([p0, p1, p2, p3, c0, c1, c2, c3, c4, c5, c6, c7])
    }
}

impl fmt::Debug for NonceSequence {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NonceSequence").finish_non_exhaustive()
    }
}

/// What a sealed record is bound to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RecordAad<'a> {
    /// The merchant that owns the token.
    pub merchant_id: &'a str,
    /// The token the record belongs to.
    pub token: &'a str,
    /// The data-key version the record is sealed under.
    pub key_version: u32,
}

impl RecordAad<'_> {
    fn encode(&self) -> Vec<u8> {
        length_prefixed(&[
            RECORD_LABEL,
            self.merchant_id.as_bytes(),
            self.token.as_bytes(),
            &self.key_version.to_be_bytes(),
        ])
    }
}

impl DataKey {
    /// Encrypts `plaintext` into a sealed record bound to `aad`.
    pub fn seal(
        &self,
        nonces: &NonceSequence,
        aad: &RecordAad,
        plaintext: &[u8],
    ) -> Result<Vec<u8>, RecordError> {
        let nonce = nonces.next()?;
        // The plaintext is copied in and encrypted in place; the buffer is zeroizing until
        // then, and sized up front so it never reallocates and leaves a clear copy behind.
        let mut out = Zeroizing::new(Vec::with_capacity(MIN_SEALED_LEN + plaintext.len()));
        out.push(RECORD_FORMAT_V1);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(plaintext);
        let (_, in_out) = out.split_at_mut_checked(1 + NONCE_LEN).ok_or(RecordError::Seal)?;
        let tag = self
            .cipher
            .seal_in_place(nonce, &aad.encode(), in_out)
            .map_err(|_| RecordError::Seal)?;
        out.extend_from_slice(&tag);
        Ok(std::mem::take(&mut *out))
    }

    /// Decrypts a sealed record, checking that it is bound to `aad` and unaltered.
    pub fn open(&self, aad: &RecordAad, sealed: &[u8]) -> Result<Zeroizing<Vec<u8>>, RecordError> {
        if sealed.len() < MIN_SEALED_LEN {
            return Err(RecordError::Truncated);
        }
        let (format, rest) = sealed.split_first().ok_or(RecordError::Truncated)?;
        if *format != RECORD_FORMAT_V1 {
            return Err(RecordError::Format);
        }
        let (nonce, ciphertext) = rest.split_at_checked(NONCE_LEN).ok_or(RecordError::Truncated)?;
        let nonce: [u8; NONCE_LEN] = nonce.try_into().map_err(|_| RecordError::Truncated)?;
        let mut buffer = Zeroizing::new(ciphertext.to_vec());
        let plain_len = self
            .cipher
            .open_in_place(nonce, &aad.encode(), buffer.as_mut_slice())
            .map_err(|_| RecordError::Integrity)?
            .len();
        // Shrinking only moves the length; the tag bytes left in capacity are wiped with the
        // rest when the buffer drops.
        buffer.truncate(plain_len);
        Ok(buffer)
    }
}

/// Seals any record message (e.g. [`SecretData`]) under `aad`.
pub fn seal_message(
    key: &DataKey,
    nonces: &NonceSequence,
    aad: &RecordAad,
    message: &impl Message,
) -> Result<Vec<u8>, RecordError> {
    // Sized exactly so encoding never reallocates and leaves a clear copy in freed memory.
    let mut plaintext = Zeroizing::new(Vec::with_capacity(message.encoded_len()));
    message.encode(&mut *plaintext).map_err(|_| RecordError::Encode)?;
    key.seal(nonces, aad, &plaintext)
}

/// Seals a record holding any kind of data.
pub fn seal_data(
    key: &DataKey,
    nonces: &NonceSequence,
    aad: &RecordAad,
    data: &SecretData,
) -> Result<Vec<u8>, RecordError> {
    seal_message(key, nonces, aad, data)
}

/// Opens a record sealed by [`seal_data`] (or [`seal_card`]). The returned message wipes
/// itself when dropped.
pub fn open_data(key: &DataKey, aad: &RecordAad, sealed: &[u8]) -> Result<SecretData, RecordError> {
    let plaintext = key.open(aad, sealed)?;
    SecretData::decode(plaintext.as_slice()).map_err(|_| RecordError::Malformed)
}

/// Seals a card record.
pub fn seal_card(
    key: &DataKey,
    nonces: &NonceSequence,
    aad: &RecordAad,
    card: &ValidCard,
) -> Result<Vec<u8>, RecordError> {
    seal_message(
        key,
        nonces,
        aad,
        &SecretData {
            data: Some(secret_data::Data::Card(card.to_proto())),
        },
    )
}

/// Opens a card record; a record holding other data is `Malformed` here.
pub fn open_card(
    key: &DataKey,
    aad: &RecordAad,
    sealed: &[u8],
) -> Result<tessera_api::vault::Card, RecordError> {
    let mut data = open_data(key, aad, sealed)?;
    match data.data.as_mut() {
        Some(secret_data::Data::Card(card)) => Ok(std::mem::take(card)),
        _ => Err(RecordError::Malformed),
    }
}

/// Why a record could not be sealed or opened. Never carries record contents.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum RecordError {
    /// The record is shorter than its format byte, nonce and tag.
    Truncated,
    /// The record's format byte is not one this vault writes.
    Format,
    /// The record failed authentication under this key and associated data.
    Integrity,
    /// The record opened but does not hold a valid card message.
    Malformed,
    /// This process has used up its nonce counter; restart to draw a new prefix.
    NoncesExhausted,
    /// The system's secure random source failed.
    Random,
    /// The card could not be encoded for sealing.
    Encode,
    /// The cryptographic library refused to seal the record.
    Seal,
}

impl RecordError {
    /// The machine-readable `google.rpc.ErrorInfo` reason.
    pub fn reason(&self) -> &'static str {
        match self {
            RecordError::Truncated
            | RecordError::Format
            | RecordError::Integrity
            | RecordError::Malformed => "RECORD_INTEGRITY",
            RecordError::NoncesExhausted => "NONCES_EXHAUSTED",
            RecordError::Random => "RANDOM_UNAVAILABLE",
            RecordError::Encode | RecordError::Seal => "RECORD_SEAL_FAILED",
        }
    }
}

impl fmt::Display for RecordError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            RecordError::Truncated => "record is too short to be a sealed record",
            RecordError::Format => "record has an unknown format",
            RecordError::Integrity => {
                "record failed its integrity check: it does not belong to this merchant, token and key version, or was altered"
            }
            RecordError::Malformed => "record does not hold a valid card",
            RecordError::NoncesExhausted => "this vault process has used up its record nonces",
            RecordError::Random => "the system random source failed",
            RecordError::Encode => "card could not be encoded for sealing",
            RecordError::Seal => "record could not be encrypted",
        })
    }
}

impl std::error::Error for RecordError {}

#[cfg(test)]
mod tests {
    #![allow(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::panic,
        clippy::indexing_slicing
    )]

    use super::*;
    use crate::crypto::Random;
    use crate::keys::{SecretKey, KEY_LEN};

    fn key(byte: u8) -> DataKey {
        DataKey::new(SecretKey::from_bytes(Zeroizing::new([byte; KEY_LEN]))).unwrap()
    }

    const AAD: RecordAad<'static> = RecordAad {
        merchant_id: "m1",
        token: "tok_a",
        key_version: 1,
    };

    #[test]
    fn seal_open_round_trip() {
        let nonces = NonceSequence::new(&Random::system()).unwrap();
        let key = key(1);
        for plaintext in [&b""[..], b"x", &[0xff; 1000]] {
            let sealed = key.seal(&nonces, &AAD, plaintext).unwrap();
            assert_eq!(sealed.len(), MIN_SEALED_LEN + plaintext.len());
            assert_eq!(sealed[0], RECORD_FORMAT_V1);
            assert_eq!(key.open(&AAD, &sealed).unwrap().as_slice(), plaintext);
        }
    }

    #[test]
    fn open_refuses_other_bindings_keys_and_damage() {
        let nonces = NonceSequence::new(&Random::system()).unwrap();
        let key = key(1);
        let sealed = key.seal(&nonces, &AAD, b"secret").unwrap();
        for aad in [
            RecordAad {
                merchant_id: "m2",
                ..AAD
            },
            RecordAad {
                token: "tok_b",
                ..AAD
            },
            RecordAad {
                key_version: 2,
                ..AAD
            },
        ] {
            assert_eq!(key.open(&aad, &sealed).unwrap_err(), RecordError::Integrity);
        }
        assert_eq!(
            self::key(2).open(&AAD, &sealed).unwrap_err(),
            RecordError::Integrity
        );
        for len in 0..MIN_SEALED_LEN {
            assert_eq!(
                key.open(&AAD, &sealed[..len]).unwrap_err(),
                RecordError::Truncated
            );
        }
        assert_eq!(
            key.open(&AAD, &sealed[..sealed.len() - 1]).unwrap_err(),
            RecordError::Integrity
        );
        let mut format = sealed.clone();
        format[0] = 2;
        assert_eq!(key.open(&AAD, &format).unwrap_err(), RecordError::Format);
        let mut flipped = sealed;
        flipped[14] ^= 0x80;
        assert_eq!(key.open(&AAD, &flipped).unwrap_err(), RecordError::Integrity);
    }

    #[test]
    fn nonces_are_distinct_and_stop_before_wrapping() {
        let nonces = NonceSequence::starting_at([1, 2, 3, 4], u64::MAX - 2);
        let first = nonces.next().unwrap();
        assert_eq!(first[..4], [1, 2, 3, 4]);
        assert_eq!(first[4..], (u64::MAX - 2).to_be_bytes());
        assert_eq!(nonces.next().unwrap()[4..], (u64::MAX - 1).to_be_bytes());
        assert_eq!(nonces.next().unwrap_err(), RecordError::NoncesExhausted);
        assert_eq!(nonces.next().unwrap_err(), RecordError::NoncesExhausted);
        assert_eq!(
            key(1).seal(&nonces, &AAD, b"x").unwrap_err(),
            RecordError::NoncesExhausted
        );

        let a = NonceSequence::new(&Random::system()).unwrap();
        let b = NonceSequence::new(&Random::system()).unwrap();
        let (x, y) = (a.next().unwrap(), a.next().unwrap());
        assert_ne!(x, y);
        assert_ne!(x[..4], b.next().unwrap()[..4]);
        assert!(u64::from_be_bytes(x[4..].try_into().unwrap()) < COUNTER_START_LIMIT);
    }

    #[test]
    fn card_round_trip() {
        let nonces = NonceSequence::new(&Random::system()).unwrap();
        let key = key(3);
        let input = tessera_api::vault::Card {
            number: "5555 5555 5555 4444".into(),
            expiry_month: 4,
            expiry_year: 2031,
            holder_name: "Grace Hopper".into(),
        };
        let card = ValidCard::from_proto(&input, (2025, 1)).unwrap();
        let sealed = seal_card(&key, &nonces, &AAD, &card).unwrap();
        assert!(!sealed.windows(4).any(|w| w == b"5555"));
        let opened = open_card(&key, &AAD, &sealed).unwrap();
        assert_eq!(opened.number, "5555555555554444");
        assert_eq!((opened.expiry_month, opened.expiry_year), (4, 2031));
        assert_eq!(opened.holder_name, "Grace Hopper");

        let not_a_card = key.seal(&nonces, &AAD, &[0xff, 0xff, 0xff]).unwrap();
        assert_eq!(
            open_card(&key, &AAD, &not_a_card).unwrap_err(),
            RecordError::Malformed
        );
    }

    #[test]
    fn reasons() {
        for error in [
            RecordError::Truncated,
            RecordError::Format,
            RecordError::Integrity,
            RecordError::Malformed,
        ] {
            assert_eq!(error.reason(), "RECORD_INTEGRITY");
        }
    }
}
