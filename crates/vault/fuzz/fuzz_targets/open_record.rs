//! Sealed records come from the gateway's database: any bytes must be refused without a
//! panic, and whatever authenticates must go through card decoding without one either.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tessera_vault::keys::{DataKey, SecretKey};
use tessera_vault::record::{open_card, RecordAad};
use zeroize::Zeroizing;

/// The fixed data key and binding the committed seeds were sealed under.
const DATA_KEY: [u8; 32] = [0x24; 32];
const AAD: RecordAad<'static> = RecordAad {
    merchant_id: "fuzz-merchant",
    token: "tok_aaaaaaaaaaaaaaaaaaaaaaaaaa",
    key_version: 1,
};

fuzz_target!(|sealed: &[u8]| {
    let Ok(key) = DataKey::new(SecretKey::from_bytes(Zeroizing::new(DATA_KEY))) else {
        return;
    };
    let _ = key.open(&AAD, sealed);
    let _ = open_card(&key, &AAD, sealed);
});
