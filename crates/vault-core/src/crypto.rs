//! The one seam to the cryptographic library: every call into `ring` in the vault is in this
//! file. Everything else in the core (and in the vault process around it) goes through the
//! small types below, so a reviewer checks the primitives and their parameters in one place,
//! and a change of library touches one file.
//!
//! What is used, and nothing else: AES-256-GCM (wrapped keys, sealed records), HMAC-SHA-256
//! (fingerprints, key check values), HKDF-SHA-256 (keys derived from the master key), SHA-256
//! (key-share digests), Ed25519 signing (audit blocks) and the system's secure random source.
//!
//! ring does not wipe the expanded key schedules inside its AES-GCM and HMAC keys when they
//! drop. That residue is why the vault process locks its memory (nothing is swapped to disk)
//! and disables core dumps and ptrace: the schedules can then only be read by the process.

use std::fmt;

use ring::rand::SecureRandom as _;
use ring::signature::KeyPair as _;
use ring::{aead, digest, hkdf, hmac, rand, signature};
use zeroize::Zeroizing;

/// Length of every symmetric key: AES-256 and HMAC-SHA-256 keys alike, and derived secrets.
pub const KEY_LEN: usize = 32;
/// Length of an AES-GCM nonce.
pub const NONCE_LEN: usize = 12;
/// Length of an AES-GCM tag.
pub const TAG_LEN: usize = 16;
/// Length of an HMAC-SHA-256 tag and of a SHA-256 digest.
pub const MAC_LEN: usize = 32;

// Guards against a ring upgrade changing the sizes the blob and record formats are built on.
const _: () = assert!(aead::MAX_TAG_LEN == TAG_LEN && aead::NONCE_LEN == NONCE_LEN);

/// Why a primitive failed. Carries nothing of its inputs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum CryptoError {
    /// The system's secure random source failed.
    Random,
    /// The library refused a key or a length that cannot be wrong on valid input.
    Refused,
    /// A ciphertext failed authentication: wrong key, wrong associated data, or altered.
    Authentication,
}

impl fmt::Display for CryptoError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            CryptoError::Random => "the system random source failed",
            CryptoError::Refused => "the cryptographic library refused the operation",
            CryptoError::Authentication => "the ciphertext failed authentication",
        })
    }
}

impl std::error::Error for CryptoError {}

/// The system's cryptographically secure random source (the vault's only one).
pub struct Random(rand::SystemRandom);

impl Random {
    /// The operating system's source (getrandom).
    pub fn system() -> Random {
        Random(rand::SystemRandom::new())
    }

    /// Fills `dest` with random bytes.
    pub fn fill(&self, dest: &mut [u8]) -> Result<(), CryptoError> {
        self.0.fill(dest).map_err(|_| CryptoError::Random)
    }
}

impl fmt::Debug for Random {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Random").finish_non_exhaustive()
    }
}

/// An AES-256-GCM key with its expanded schedule.
pub struct AesGcmKey(aead::LessSafeKey);

impl AesGcmKey {
    /// Expands `key`; the caller keeps (and wipes) the raw bytes.
    pub fn new(key: &[u8; KEY_LEN]) -> Result<AesGcmKey, CryptoError> {
        let unbound = aead::UnboundKey::new(&aead::AES_256_GCM, key).map_err(|_| CryptoError::Refused)?;
        Ok(AesGcmKey(aead::LessSafeKey::new(unbound)))
    }

    /// Encrypts `in_out` in place under `nonce` and `aad`; returns the tag. Every caller must
    /// pass a nonce never used before with this key.
    pub fn seal_in_place(
        &self,
        nonce: [u8; NONCE_LEN],
        aad: &[u8],
        in_out: &mut [u8],
    ) -> Result<[u8; TAG_LEN], CryptoError> {
        let tag = self
            .0
            .seal_in_place_separate_tag(
                aead::Nonce::assume_unique_for_key(nonce),
                aead::Aad::from(aad),
                in_out,
            )
            .map_err(|_| CryptoError::Refused)?;
        let mut out = [0u8; TAG_LEN];
        out.copy_from_slice(tag.as_ref());
        Ok(out)
    }

    /// Decrypts `ciphertext || tag` in place; returns the plaintext part of `in_out`.
    pub fn open_in_place<'a>(
        &self,
        nonce: [u8; NONCE_LEN],
        aad: &[u8],
        in_out: &'a mut [u8],
    ) -> Result<&'a mut [u8], CryptoError> {
        self.0
            .open_in_place(
                aead::Nonce::assume_unique_for_key(nonce),
                aead::Aad::from(aad),
                in_out,
            )
            .map_err(|_| CryptoError::Authentication)
    }
}

impl fmt::Debug for AesGcmKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AesGcmKey").finish_non_exhaustive()
    }
}

/// An HMAC-SHA-256 key with its precomputed pad states.
pub struct HmacKey(hmac::Key);

impl HmacKey {
    /// Prepares `key`; the caller keeps (and wipes) the raw bytes.
    pub fn new(key: &[u8; KEY_LEN]) -> HmacKey {
        HmacKey(hmac::Key::new(hmac::HMAC_SHA256, key))
    }

    /// HMAC-SHA-256 of `data`.
    pub fn sign(&self, data: &[u8]) -> [u8; MAC_LEN] {
        let tag = hmac::sign(&self.0, data);
        let mut out = [0u8; MAC_LEN];
        out.copy_from_slice(tag.as_ref());
        out
    }
}

impl fmt::Debug for HmacKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HmacKey").finish_non_exhaustive()
    }
}

/// HKDF-SHA-256 output length of a derived key.
struct DerivedLen;

impl hkdf::KeyType for DerivedLen {
    fn len(&self) -> usize {
        KEY_LEN
    }
}

/// HKDF-SHA-256 (extract with `salt`, expand with `info`) of `secret` into a 32-byte secret.
pub fn hkdf_sha256(
    salt: &[u8],
    secret: &[u8; KEY_LEN],
    info: &[u8],
) -> Result<Zeroizing<[u8; KEY_LEN]>, CryptoError> {
    let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, salt).extract(secret);
    let info = [info];
    let okm = prk.expand(&info, DerivedLen).map_err(|_| CryptoError::Refused)?;
    let mut out = Zeroizing::new([0u8; KEY_LEN]);
    okm.fill(out.as_mut_slice()).map_err(|_| CryptoError::Refused)?;
    Ok(out)
}

/// SHA-256 of `parts` concatenated.
pub fn sha256(parts: &[&[u8]]) -> [u8; MAC_LEN] {
    let mut context = digest::Context::new(&digest::SHA256);
    for part in parts {
        context.update(part);
    }
    let mut out = [0u8; MAC_LEN];
    out.copy_from_slice(context.finish().as_ref());
    out
}

/// An Ed25519 signing key.
pub struct Ed25519Signer(signature::Ed25519KeyPair);

impl Ed25519Signer {
    /// The key whose private half is `seed` (RFC 8032 secret key).
    pub fn from_seed(seed: &[u8; KEY_LEN]) -> Result<Ed25519Signer, CryptoError> {
        signature::Ed25519KeyPair::from_seed_unchecked(seed)
            .map(Ed25519Signer)
            .map_err(|_| CryptoError::Refused)
    }

    /// The public half.
    pub fn public_key(&self) -> &[u8] {
        self.0.public_key().as_ref()
    }

    /// The signature of `message`.
    pub fn sign(&self, message: &[u8]) -> [u8; 64] {
        let signature = self.0.sign(message);
        let mut out = [0u8; 64];
        out.copy_from_slice(signature.as_ref());
        out
    }
}

impl fmt::Debug for Ed25519Signer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ed25519Signer").finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::indexing_slicing)]
    use super::*;

    #[test]
    fn aes_gcm_round_trip_and_refusal() {
        let key = AesGcmKey::new(&[7; KEY_LEN]).unwrap();
        let mut buffer = b"secret".to_vec();
        let tag = key.seal_in_place([1; NONCE_LEN], b"aad", &mut buffer).unwrap();
        assert_ne!(buffer, b"secret");
        buffer.extend_from_slice(&tag);
        let mut copy = buffer.clone();
        assert_eq!(
            key.open_in_place([1; NONCE_LEN], b"aad", &mut buffer).unwrap(),
            b"secret"
        );
        assert_eq!(
            key.open_in_place([1; NONCE_LEN], b"other", &mut copy)
                .unwrap_err(),
            CryptoError::Authentication
        );
    }

    #[test]
    fn known_answers() {
        // SHA-256 against its FIPS 180-2 vector; RFC 4231's HMAC vectors use keys of other
        // lengths than 32 bytes, so HMAC is checked for determinism and key dependence.
        assert_eq!(
            sha256(&[b"a", b"bc"])[..4],
            [0xba, 0x78, 0x16, 0xbf],
            "SHA-256(\"abc\")"
        );
        assert_eq!(
            HmacKey::new(&[1; 32]).sign(b"x"),
            HmacKey::new(&[1; 32]).sign(b"x")
        );
        assert_ne!(
            HmacKey::new(&[1; 32]).sign(b"x"),
            HmacKey::new(&[2; 32]).sign(b"x")
        );
        let signer = Ed25519Signer::from_seed(&[3; 32]).unwrap();
        assert_eq!(signer.public_key().len(), 32);
        assert_ne!(signer.sign(b"m"), signer.sign(b"n"));
    }
}
