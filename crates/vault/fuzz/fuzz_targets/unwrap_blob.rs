//! Wrapped key blobs come from the gateway's database: any bytes must be refused without a
//! panic, and only a genuine blob for this master key and key id may unwrap.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tessera_vault::keys::{KeyId, KeyPurpose, MasterKey, SecretKey};
use zeroize::Zeroizing;

/// The fixed master key the committed seeds were wrapped under.
const MASTER_KEY: [u8; 32] = [0x42; 32];

fuzz_target!(|blob: &[u8]| {
    let master = MasterKey::new(SecretKey::from_bytes(Zeroizing::new(MASTER_KEY)));
    for purpose in [KeyPurpose::Data, KeyPurpose::Fingerprint] {
        let id = KeyId {
            merchant_id: "fuzz-merchant".into(),
            purpose,
            version: 1,
        };
        let _ = master.unwrap(&id, blob);
    }
});
