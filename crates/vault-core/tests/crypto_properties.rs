//! Round-trip and tamper properties of the vault's cryptography, checked over generated
//! inputs: wrapped keys, sealed records and tokens.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use proptest::prelude::*;
use tessera_vault_core::card::{luhn_valid, Pan};
use tessera_vault_core::crypto::Random;
use tessera_vault_core::keys::{DataKey, FingerprintKey, KeyId, KeyPurpose, MasterKey, SecretKey};
use tessera_vault_core::record::{NonceSequence, RecordAad, RecordError};
use tessera_vault_core::token::{is_format_preserving_token, is_opaque_token, TokenRandom, OPAQUE_PREFIX};
use zeroize::Zeroizing;

fn secret(bytes: [u8; 32]) -> SecretKey {
    SecretKey::from_bytes(Zeroizing::new(bytes))
}

fn purpose() -> impl Strategy<Value = KeyPurpose> {
    prop_oneof![Just(KeyPurpose::Data), Just(KeyPurpose::Fingerprint)]
}

fn key_id() -> impl Strategy<Value = KeyId> {
    (".{0,40}", purpose(), any::<u32>()).prop_map(|(merchant_id, purpose, version)| KeyId {
        merchant_id,
        purpose,
        version,
    })
}

/// Two keys are the same key if what one seals the other opens, and they fingerprint alike.
fn same_key(a: SecretKey, b: SecretKey, a_copy: SecretKey, b_copy: SecretKey) -> bool {
    let nonces = NonceSequence::new(&Random::system()).unwrap();
    let aad = RecordAad {
        merchant_id: "m",
        token: "t",
        key_version: 1,
    };
    let sealed = DataKey::new(a).unwrap().seal(&nonces, &aad, b"probe").unwrap();
    let opens = DataKey::new(b)
        .unwrap()
        .open(&aad, &sealed)
        .is_ok_and(|plain| plain.as_slice() == b"probe");
    let pan = Pan::parse("4111111111111111").unwrap();
    opens && FingerprintKey::new(a_copy).fingerprint(&pan) == FingerprintKey::new(b_copy).fingerprint(&pan)
}

/// A Luhn-valid card number of `len` digits built from `body` digits.
fn valid_pan(body: &[u8]) -> String {
    let mut digits: String = body.iter().map(|d| char::from(b'0' + d % 10)).collect();
    for check in '0'..='9' {
        digits.push(check);
        if luhn_valid(&digits) {
            return digits;
        }
        digits.pop();
    }
    unreachable!("one check digit always completes a Luhn-valid number")
}

fn card_number() -> impl Strategy<Value = String> {
    (11usize..=18)
        .prop_flat_map(|body_len| proptest::collection::vec(0u8..10, body_len))
        .prop_map(|body| valid_pan(&body))
}

fn record_aad() -> impl Strategy<Value = (String, String, u32)> {
    (".{0,24}", "tok_[a-z2-7]{26}|[0-9]{12,19}|.{0,30}", any::<u32>())
}

proptest! {
    #[test]
    fn wrap_then_unwrap_returns_the_key(master in any::<[u8; 32]>(), key in any::<[u8; 32]>(), id in key_id()) {
        let rng = Random::system();
        let master = MasterKey::new(secret(master));
        let blob = master.wrap(&id, &secret(key), &rng).unwrap();
        let unwrapped = master.unwrap(&id, &blob).unwrap();
        let unwrapped_copy = master.unwrap(&id, &blob).unwrap();
        prop_assert!(same_key(secret(key), unwrapped, secret(key), unwrapped_copy));
    }

    #[test]
    fn unwrap_fails_for_another_merchant_purpose_or_version(
        master in any::<[u8; 32]>(),
        id in key_id(),
        other_merchant in ".{0,40}",
        other_version in any::<u32>(),
    ) {
        let rng = Random::system();
        let master = MasterKey::new(secret(master));
        let blob = master.create_key(&id, &rng).unwrap();
        prop_assert!(master.unwrap(&id, &blob).is_ok());
        let other_purpose = match id.purpose {
            KeyPurpose::Data => KeyPurpose::Fingerprint,
            KeyPurpose::Fingerprint => KeyPurpose::Data,
        };
        let mut others = vec![KeyId { purpose: other_purpose, ..id.clone() }];
        if other_merchant != id.merchant_id {
            others.push(KeyId { merchant_id: other_merchant, ..id.clone() });
        }
        if other_version != id.version {
            others.push(KeyId { version: other_version, ..id.clone() });
        }
        for other in others {
            prop_assert!(master.unwrap(&other, &blob).is_err(), "{:?}", other);
        }
    }

    #[test]
    fn seal_then_open_returns_the_plaintext(
        key in any::<[u8; 32]>(),
        plaintext in proptest::collection::vec(any::<u8>(), 0..512),
        (merchant, token, version) in record_aad(),
    ) {
        let key = DataKey::new(secret(key)).unwrap();
        let nonces = NonceSequence::new(&Random::system()).unwrap();
        let aad = RecordAad { merchant_id: &merchant, token: &token, key_version: version };
        let sealed = key.seal(&nonces, &aad, &plaintext).unwrap();
        let opened = key.open(&aad, &sealed).unwrap();
        prop_assert_eq!(opened.as_slice(), plaintext.as_slice());
    }

    #[test]
    fn open_fails_for_any_changed_binding(
        key in any::<[u8; 32]>(),
        plaintext in proptest::collection::vec(any::<u8>(), 0..64),
        (merchant, token, version) in record_aad(),
        (other_merchant, other_token, other_version) in record_aad(),
    ) {
        let key = DataKey::new(secret(key)).unwrap();
        let nonces = NonceSequence::new(&Random::system()).unwrap();
        let aad = RecordAad { merchant_id: &merchant, token: &token, key_version: version };
        let sealed = key.seal(&nonces, &aad, &plaintext).unwrap();
        if other_merchant != merchant {
            let changed = RecordAad { merchant_id: &other_merchant, ..aad };
            prop_assert_eq!(key.open(&changed, &sealed).unwrap_err(), RecordError::Integrity);
        }
        if other_token != token {
            let changed = RecordAad { token: &other_token, ..aad };
            prop_assert_eq!(key.open(&changed, &sealed).unwrap_err(), RecordError::Integrity);
        }
        if other_version != version {
            let changed = RecordAad { key_version: other_version, ..aad };
            prop_assert_eq!(key.open(&changed, &sealed).unwrap_err(), RecordError::Integrity);
        }
    }

    #[test]
    fn open_fails_for_any_truncation_or_flipped_byte(
        key in any::<[u8; 32]>(),
        plaintext in proptest::collection::vec(any::<u8>(), 0..64),
        cut in any::<prop::sample::Index>(),
        flip_at in any::<prop::sample::Index>(),
        flip in 1u8..=255,
    ) {
        let key = DataKey::new(secret(key)).unwrap();
        let nonces = NonceSequence::new(&Random::system()).unwrap();
        let aad = RecordAad { merchant_id: "m1", token: "tok_x", key_version: 3 };
        let sealed = key.seal(&nonces, &aad, &plaintext).unwrap();
        let cut = cut.index(sealed.len());
        prop_assert!(key.open(&aad, &sealed[..cut]).is_err());
        let mut flipped = sealed.clone();
        flipped[flip_at.index(sealed.len())] ^= flip;
        prop_assert!(key.open(&aad, &flipped).is_err());
        let mut extended = sealed;
        extended.push(flip);
        prop_assert!(key.open(&aad, &extended).is_err());
    }

    #[test]
    fn ciphertexts_swapped_between_tokens_fail_both(
        key in any::<[u8; 32]>(),
        first in proptest::collection::vec(any::<u8>(), 0..64),
        second in proptest::collection::vec(any::<u8>(), 0..64),
        token_a in "tok_[a-z2-7]{26}",
        token_b in "tok_[a-z2-7]{26}",
    ) {
        prop_assume!(token_a != token_b);
        let key = DataKey::new(secret(key)).unwrap();
        let nonces = NonceSequence::new(&Random::system()).unwrap();
        let aad_a = RecordAad { merchant_id: "m1", token: &token_a, key_version: 1 };
        let aad_b = RecordAad { token: &token_b, ..aad_a };
        let sealed_a = key.seal(&nonces, &aad_a, &first).unwrap();
        let sealed_b = key.seal(&nonces, &aad_b, &second).unwrap();
        prop_assert_eq!(key.open(&aad_a, &sealed_b).unwrap_err(), RecordError::Integrity);
        prop_assert_eq!(key.open(&aad_b, &sealed_a).unwrap_err(), RecordError::Integrity);
    }

    #[test]
    fn format_preserving_tokens_keep_shape_and_fail_luhn(number in card_number(), count in 1usize..8) {
        let pan = Pan::parse(&number).unwrap();
        let mut random = TokenRandom::for_batch(&Random::system(), count).unwrap();
        for _ in 0..count {
            let token = random.next_format_preserving(&pan).unwrap();
            prop_assert_eq!(token.len(), number.len());
            prop_assert!(token.bytes().all(|b| b.is_ascii_digit()), "{}", token);
            prop_assert!(!luhn_valid(&token), "{}", token);
            prop_assert_eq!(&token[..6], &number[..6]);
            prop_assert_eq!(&token[token.len() - 4..], &number[number.len() - 4..]);
            prop_assert!(is_format_preserving_token(&token));
            prop_assert!(!is_opaque_token(&token));
        }
    }

    #[test]
    fn opaque_tokens_are_prefix_and_26_base32_chars(count in 1usize..32) {
        let mut random = TokenRandom::for_batch(&Random::system(), count).unwrap();
        for _ in 0..count {
            let token = random.next_opaque().unwrap();
            let body = token.strip_prefix(OPAQUE_PREFIX).unwrap();
            prop_assert_eq!(body.len(), 26);
            prop_assert!(body.bytes().all(|b| b.is_ascii_lowercase() || (b'2'..=b'7').contains(&b)), "{}", token);
            prop_assert!(is_opaque_token(&token));
            prop_assert!(!is_format_preserving_token(&token));
        }
    }

    #[test]
    fn token_syntax_checks_never_panic(s in ".{0,40}") {
        let _ = is_opaque_token(&s);
        let _ = is_format_preserving_token(&s);
    }

    #[test]
    fn card_parsing_never_panics_and_round_trips(s in "[0-9 -]{0,70}|.{0,70}") {
        if let Ok(pan) = Pan::parse(&s) {
            let digits: String = s.chars().filter(char::is_ascii_digit).collect();
            prop_assert_eq!(pan.len(), digits.len());
            prop_assert!(luhn_valid(&digits));
            prop_assert_eq!(pan.first_six(), &digits[..6]);
        }
    }
}
