//! What each fuzz target checks. The libFuzzer targets in `fuzz_targets/` call these functions,
//! and `crates/vault-core/tests/fuzz_seeds.rs` includes this file by path to replay the committed
//! seeds through the very same checks on every `cargo test`, without libFuzzer.
//!
//! Each function must return normally for any input: a panic (including a failed `assert!`) is
//! a finding. The return values tell the seed test what happened, so it can check that the
//! seeds still reach the paths they were written for.
#![forbid(unsafe_code)]

use tessera_api::vault::secret_data;
use tessera_vault_core::card::{luhn_valid, Pan};
use tessera_vault_core::keys::{DataKey, KeyId, KeyPurpose, MasterKey, SecretKey};
use tessera_vault_core::record::{open_card, open_data, RecordAad, RecordError};
use tessera_vault_core::token::{is_format_preserving_token, is_opaque_token};
use zeroize::Zeroizing;

/// The fixed master key the committed `unwrap_blob` seeds were wrapped under.
pub const MASTER_KEY: [u8; 32] = [0x42; 32];
/// The fixed data key the committed `open_record` seeds were sealed under.
pub const DATA_KEY: [u8; 32] = [0x24; 32];
/// The merchant every seed key and record is bound to.
pub const MERCHANT: &str = "fuzz-merchant";
/// The binding the committed `open_record` seeds were sealed under.
pub const AAD: RecordAad<'static> = RecordAad {
    merchant_id: MERCHANT,
    token: "tok_aaaaaaaaaaaaaaaaaaaaaaaaaa",
    key_version: 1,
};

/// Wrapped key blobs come from the gateway's database: any bytes must be refused without a
/// panic, and a blob may unwrap for at most one purpose (the purpose is bound into it).
///
/// Returns the purpose the blob unwrapped for, if any.
pub fn unwrap_blob(blob: &[u8]) -> Option<KeyPurpose> {
    let master = MasterKey::new(SecretKey::from_bytes(Zeroizing::new(MASTER_KEY)));
    let mut unwrapped = None;
    for purpose in [KeyPurpose::Data, KeyPurpose::Fingerprint] {
        let id = KeyId {
            merchant_id: MERCHANT.into(),
            purpose,
            version: 1,
        };
        if master.unwrap(&id, blob).is_ok() {
            assert!(unwrapped.is_none(), "a blob unwrapped for two purposes");
            unwrapped = Some(purpose);
        }
    }
    unwrapped
}

/// Sealed records come from the gateway's database: any bytes must be refused without a
/// panic, and whatever authenticates must go through decoding without one either. Reveal opens
/// records with `open_data`; `open_card` must agree with it.
///
/// Returns what the record holds once opened: "card", "bank_account", "contact", "empty" (no
/// data set) or "undecodable" (authentic, but not a record message).
pub fn open_record(sealed: &[u8]) -> Result<&'static str, RecordError> {
    let key = DataKey::new(SecretKey::from_bytes(Zeroizing::new(DATA_KEY))).map_err(|_| RecordError::Seal)?;
    let opened = key.open(&AAD, sealed).map(|_| ());
    let data = open_data(&key, &AAD, sealed);
    let card = open_card(&key, &AAD, sealed);
    if let Err(err) = opened {
        assert_eq!(data.err(), Some(err), "open_data disagrees with open");
        assert_eq!(card.err(), Some(err), "open_card disagrees with open");
        return Err(err);
    }
    let kind = match data.as_ref().map(|data| &data.data) {
        Ok(Some(secret_data::Data::Card(_))) => "card",
        Ok(Some(secret_data::Data::BankAccount(_))) => "bank_account",
        Ok(Some(secret_data::Data::Contact(_))) => "contact",
        Ok(None) => "empty",
        Err(err) => {
            assert_eq!(
                *err,
                RecordError::Malformed,
                "an authentic record can only fail to decode"
            );
            "undecodable"
        }
    };
    match card {
        Ok(_) => assert_eq!(kind, "card", "open_card accepted a record without a card"),
        Err(err) => {
            assert_ne!(kind, "card", "open_card refused a card record");
            assert_eq!(
                err,
                RecordError::Malformed,
                "open_card refused an authentic record"
            );
        }
    }
    Ok(kind)
}

/// Card numbers come straight from callers: any input must be refused or accepted without a
/// panic, and an accepted number must keep the invariants the rest of the vault relies on.
///
/// Returns whether the input was accepted as a card number.
pub fn parse_card_number(data: &[u8]) -> bool {
    let Ok(input) = std::str::from_utf8(data) else {
        return false;
    };
    let _ = luhn_valid(input);
    let _ = is_opaque_token(input);
    let _ = is_format_preserving_token(input);
    let Ok(pan) = Pan::parse(input) else {
        return false;
    };
    let digits: String = input.chars().filter(char::is_ascii_digit).collect();
    assert!((12..=19).contains(&pan.len()));
    assert_eq!(pan.len(), digits.len());
    assert!(luhn_valid(&digits));
    assert!(!is_format_preserving_token(&digits));
    assert!(digits.starts_with(&pan.first_six()));
    assert!(digits.ends_with(&pan.last_four()));
    assert!(!format!("{pan:?}").contains(&pan.last_four()));
    let _ = pan.brand().as_str();
    true
}
