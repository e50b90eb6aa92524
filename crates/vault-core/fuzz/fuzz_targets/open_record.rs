//! Sealed records come from the gateway's database: any bytes must be refused without a
//! panic, and whatever authenticates must go through card decoding without one either. The
//! checks live in `src/lib.rs`, shared with the seed replay test.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|sealed: &[u8]| {
    let _ = tessera_vault_fuzz::open_record(sealed);
});
