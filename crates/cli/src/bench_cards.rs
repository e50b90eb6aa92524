//! Test card data for `tessera bench`: random card numbers with a valid Luhn digit on the
//! card schemes' published test BINs, so every request passes validation and no two requests
//! (almost) ever carry the same card.

/// A small, fast pseudo-random generator (SplitMix64). The numbers it yields are test data
/// for load, never secrets, so a cryptographic generator per request would only cost the load
/// generator CPU that the machine's servers need.
#[derive(Debug, Clone)]
pub struct SplitMix64 {
    state: u64,
}

impl SplitMix64 {
    pub fn new(seed: u64) -> Self {
        Self { state: seed }
    }

    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A number in `0..bound` (`bound` > 0; 0 yields 0). The modulo bias is irrelevant for
    /// test data.
    pub fn below(&mut self, bound: u64) -> u64 {
        self.next_u64().checked_rem(bound).unwrap_or(0)
    }
}

/// Test BINs (first digits) and card lengths of the major schemes, from their published test
/// card ranges.
const TEST_RANGES: [(&str, usize); 6] = [
    ("411111", 16), // Visa
    ("400000", 16), // Visa
    ("555555", 16), // Mastercard
    ("222300", 16), // Mastercard 2-series
    ("378282", 15), // American Express
    ("601111", 16), // Discover
];

/// The Luhn check digit for `payload` (the number without its last digit), as an ASCII digit.
pub fn luhn_check_digit(payload: &[u8]) -> u8 {
    // From the right, every second digit starting with the one next to the check digit is
    // doubled.
    let sum: u32 = payload
        .iter()
        .rev()
        .enumerate()
        .map(|(position, digit)| {
            let value = u32::from(digit.saturating_sub(b'0'));
            if position % 2 == 0 {
                let doubled = value * 2;
                if doubled > 9 {
                    doubled - 9
                } else {
                    doubled
                }
            } else {
                value
            }
        })
        .sum();
    let check = (10 - sum % 10) % 10;
    // `check` is below 10, so this is one ASCII digit.
    b'0' + u8::try_from(check).unwrap_or(0)
}

/// True when `number` (ASCII digits) passes the Luhn check; the tests' oracle.
#[cfg(test)]
pub fn luhn_valid(number: &str) -> bool {
    match number.as_bytes().split_last() {
        Some((last, payload)) if number.bytes().all(|b| b.is_ascii_digit()) => {
            luhn_check_digit(payload) == *last
        }
        _ => false,
    }
}

/// A random card number on one of [`TEST_RANGES`] with a valid check digit.
pub fn random_pan(rng: &mut SplitMix64) -> String {
    let index = usize::try_from(rng.below(TEST_RANGES.len() as u64)).unwrap_or(0);
    let (bin, length) = TEST_RANGES.get(index).copied().unwrap_or(("411111", 16));
    let mut digits: Vec<u8> = bin.as_bytes().to_vec();
    while digits.len() < length - 1 {
        // `below(10)` is a single digit.
        digits.push(b'0' + u8::try_from(rng.below(10)).unwrap_or(0));
    }
    let check = luhn_check_digit(&digits);
    digits.push(check);
    // Only ASCII digits were pushed.
    String::from_utf8(digits).unwrap_or_default()
}

/// A random expiry (month, year) one to five years ahead of `this_year`, so the card is valid
/// for the whole run.
pub fn random_expiry(rng: &mut SplitMix64, this_year: u32) -> (u32, u32) {
    let month = 1 + u32::try_from(rng.below(12)).unwrap_or(0);
    let year = this_year + 1 + u32::try_from(rng.below(5)).unwrap_or(0);
    (month, year)
}

/// The current calendar year (UTC), close enough for choosing expiry dates.
pub fn current_year() -> u32 {
    const SECONDS_PER_YEAR: u64 = 31_556_952; // 365.2425 days
    let seconds = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|elapsed| elapsed.as_secs())
        .unwrap_or(0);
    1970 + u32::try_from(seconds / SECONDS_PER_YEAR).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    #![allow(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::panic,
        clippy::indexing_slicing
    )]

    use super::*;

    #[test]
    fn known_numbers_pass_and_altered_ones_fail() {
        for number in [
            "4111111111111111",
            "5555555555554444",
            "378282246310005",
            "6011111111111117",
        ] {
            assert!(luhn_valid(number), "{number}");
        }
        for number in ["4111111111111112", "", "41111111111111a1"] {
            assert!(!luhn_valid(number), "{number}");
        }
    }

    #[test]
    fn random_pans_are_valid_and_on_test_bins() {
        let mut rng = SplitMix64::new(7);
        let mut seen = std::collections::HashSet::new();
        for _ in 0..1000 {
            let pan = random_pan(&mut rng);
            assert!(luhn_valid(&pan), "{pan}");
            assert!(
                TEST_RANGES
                    .iter()
                    .any(|(bin, length)| pan.starts_with(bin) && pan.len() == *length),
                "{pan}"
            );
            seen.insert(pan);
        }
        assert!(seen.len() > 990, "numbers repeat too often: {}", seen.len());
    }

    #[test]
    fn expiry_is_in_the_future() {
        let mut rng = SplitMix64::new(1);
        for _ in 0..100 {
            let (month, year) = random_expiry(&mut rng, 2030);
            assert!((1..=12).contains(&month));
            assert!((2031..=2035).contains(&year));
        }
        assert!(current_year() >= 2025);
    }
}
