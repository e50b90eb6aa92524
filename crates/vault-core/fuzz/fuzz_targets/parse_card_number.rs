//! Card numbers come straight from callers: any input must be refused or accepted without a
//! panic, and an accepted number must keep the invariants the rest of the vault relies on. The
//! checks live in `src/lib.rs`, shared with the seed replay test.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = tessera_vault_fuzz::parse_card_number(data);
});
