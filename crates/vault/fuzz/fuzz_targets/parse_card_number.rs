//! Card numbers come straight from callers: any input must be refused or accepted without a
//! panic, and an accepted number must keep the invariants the rest of the vault relies on.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tessera_vault::card::{luhn_valid, Pan};
use tessera_vault::token::{is_format_preserving_token, is_opaque_token};

fuzz_target!(|data: &[u8]| {
    let Ok(input) = std::str::from_utf8(data) else {
        return;
    };
    let _ = luhn_valid(input);
    let _ = is_opaque_token(input);
    let _ = is_format_preserving_token(input);
    let Ok(pan) = Pan::parse(input) else {
        return;
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
});
