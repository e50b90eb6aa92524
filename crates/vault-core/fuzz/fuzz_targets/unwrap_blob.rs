//! Wrapped key blobs come from the gateway's database: any bytes must be refused without a
//! panic, and only a genuine blob for this master key and key id may unwrap. The checks live in
//! `src/lib.rs`, shared with the seed replay test.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|blob: &[u8]| {
    let _ = tessera_vault_fuzz::unwrap_blob(blob);
});
