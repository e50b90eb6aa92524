//! Token generation: opaque random tokens, and format-preserving digit tokens that can never
//! pass for a card number.
//!
//! Tokens carry no information about the card beyond what the format-preserving kind keeps on
//! purpose (first six and last four, which PCI DSS allows to be shown): everything else is
//! fresh randomness, so a token cannot be reversed without the vault's records.

use std::fmt;

use zeroize::Zeroizing;

use crate::card::{luhn_valid_bytes, Pan};
use crate::crypto::Random;

/// Prefix of every opaque token, so a token is recognisable in logs and never mistaken for
/// other identifiers.
pub const OPAQUE_PREFIX: &str = "tok_";
/// Random bytes in an opaque token: 128 bits, beyond any guessing.
const OPAQUE_RANDOM_BYTES: usize = 16;
/// Base32 characters for 16 bytes: ceil(128 / 5).
const OPAQUE_CHARS: usize = 26;
/// Random bytes drawn per token: 16 for an opaque token; a format-preserving token uses 2 per
/// middle digit (at most 9 digits, so 18 bytes) and the rest covers rejected draws.
const BYTES_PER_TOKEN: usize = 24;
/// Largest batch served by one draw, so a malformed request cannot ask for gigabytes.
const MAX_BATCH_TOKENS: usize = 1 << 16;
/// Digits kept from the card at each end of a format-preserving token.
const KEEP_FIRST: usize = 6;
const KEEP_LAST: usize = 4;
/// Shortest and longest format-preserving token, as for card numbers.
const MIN_FP_LEN: usize = 12;
const MAX_FP_LEN: usize = 19;
/// The largest multiple of 10 that fits in a u16: draws at or above it are rejected so every
/// digit is equally likely.
const DIGIT_DRAW_LIMIT: u16 = 65_530;

/// Random bytes for a batch of tokens, drawn with a single call to the random source.
///
/// One system call per batch instead of one per token keeps the random source off the
/// per-item cost of a large batch.
pub struct TokenRandom {
    // Zeroizing because unused bytes would reveal tokens not yet issued in this batch.
    bytes: Zeroizing<Vec<u8>>,
    used: usize,
}

impl TokenRandom {
    /// Draws enough randomness for `tokens` tokens of either kind.
    pub fn for_batch(rng: &Random, tokens: usize) -> Result<TokenRandom, TokenError> {
        if tokens > MAX_BATCH_TOKENS {
            return Err(TokenError::BatchTooLarge);
        }
        let mut bytes = Zeroizing::new(vec![0u8; tokens * BYTES_PER_TOKEN]);
        rng.fill(bytes.as_mut_slice()).map_err(|_| TokenError::Random)?;
        Ok(TokenRandom { bytes, used: 0 })
    }

    fn take<const N: usize>(&mut self) -> Result<[u8; N], TokenError> {
        let end = self.used.checked_add(N).ok_or(TokenError::Exhausted)?;
        let chunk = self.bytes.get(self.used..end).ok_or(TokenError::Exhausted)?;
        let chunk: [u8; N] = chunk.try_into().map_err(|_| TokenError::Exhausted)?;
        self.used = end;
        Ok(chunk)
    }

    /// A uniformly distributed decimal digit, by rejection sampling.
    fn digit(&mut self) -> Result<u8, TokenError> {
        loop {
            let draw = u16::from_be_bytes(self.take()?);
            if draw < DIGIT_DRAW_LIMIT {
                // `draw % 10` is below 10, so the narrowing cannot lose anything.
                return Ok((draw % 10) as u8);
            }
        }
    }

    /// A new opaque token: [`OPAQUE_PREFIX`] and 26 lowercase base32 characters.
    pub fn next_opaque(&mut self) -> Result<String, TokenError> {
        let random: [u8; OPAQUE_RANDOM_BYTES] = self.take()?;
        let mut token = String::with_capacity(OPAQUE_PREFIX.len() + OPAQUE_CHARS);
        token.push_str(OPAQUE_PREFIX);
        base32_lower(&random, &mut token);
        Ok(token)
    }

    /// A new format-preserving token for `pan`: as many digits as the card, the same first
    /// six and last four, random digits between, and a failing Luhn check.
    ///
    /// Short cards leave few random digits (two for a 12-digit card), so tokens of one BIN and
    /// last four can repeat: the store must check uniqueness and ask again on a clash.
    pub fn next_format_preserving(&mut self, pan: &Pan) -> Result<String, TokenError> {
        let digits = pan.digits().as_bytes();
        if !(MIN_FP_LEN..=MAX_FP_LEN).contains(&digits.len()) {
            return Err(TokenError::CardLength);
        }
        let (first, rest) = digits
            .split_at_checked(KEEP_FIRST)
            .ok_or(TokenError::CardLength)?;
        let middle_len = rest.len().checked_sub(KEEP_LAST).ok_or(TokenError::CardLength)?;
        let (_, last) = rest.split_at_checked(middle_len).ok_or(TokenError::CardLength)?;

        let mut token = Vec::with_capacity(digits.len());
        token.extend_from_slice(first);
        for _ in 0..middle_len {
            token.push(b'0' + self.digit()?);
        }
        token.extend_from_slice(last);
        if luhn_valid_bytes(&token) {
            // Luhn detects every single-digit change: at an undoubled position the digit's
            // contribution moves by +1 or -9, and at a doubled position by the difference of
            // two distinct values of d -> 2d (minus 9 above 9), which is a bijection on 0..=9;
            // neither difference is a multiple of 10. So one step on one digit always turns a
            // passing checksum into a failing one.
            if let Some(digit) = token.get_mut(KEEP_FIRST + middle_len - 1) {
                *digit = b'0' + (*digit - b'0' + 1) % 10;
            }
        }
        Ok(token.into_iter().map(char::from).collect())
    }
}

impl fmt::Debug for TokenRandom {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenRandom").finish_non_exhaustive()
    }
}

/// RFC 4648 base32, lowercase, without padding. Written here because it is a dozen lines and
/// a dependency would be one more thing for reviewers to read.
fn base32_lower(bytes: &[u8], out: &mut String) {
    let mut buffer: u16 = 0;
    let mut bits = 0u32;
    for &byte in bytes {
        buffer = (buffer << 8) | u16::from(byte);
        bits += 8;
        while bits >= 5 {
            bits -= 5;
            out.push(base32_char((buffer >> bits) as u8 & 0x1f));
        }
        // Keep only the bits not yet written, so the shift above never overflows.
        buffer &= (1 << bits) - 1;
    }
    if bits > 0 {
        out.push(base32_char((buffer << (5 - bits)) as u8 & 0x1f));
    }
}

fn base32_char(value: u8) -> char {
    char::from(if value < 26 {
        b'a' + value
    } else {
        b'2' + (value - 26)
    })
}

fn base32_value(c: u8) -> Option<u8> {
    match c {
        b'a'..=b'z' => Some(c - b'a'),
        b'2'..=b'7' => Some(c - b'2' + 26),
        _ => None,
    }
}

/// True for a string shaped like an opaque token this vault issues: the prefix, then 26
/// lowercase base32 characters whose unused trailing bits are zero.
pub fn is_opaque_token(s: &str) -> bool {
    let Some(body) = s.strip_prefix(OPAQUE_PREFIX) else {
        return false;
    };
    if body.len() != OPAQUE_CHARS {
        return false;
    }
    let mut values = body.bytes().map(base32_value);
    let all_valid = values
        .by_ref()
        .take(OPAQUE_CHARS - 1)
        .all(|value| value.is_some());
    // 26 characters carry 130 bits for 128: the last character's two low bits are padding,
    // always zero in an encoding this vault wrote.
    all_valid && matches!(values.next(), Some(Some(last)) if last & 0b11 == 0)
}

/// True for a string shaped like a format-preserving token: 12 to 19 ASCII digits that fail
/// the Luhn check. A digit string that passes Luhn is treated as a card number, never a token.
pub fn is_format_preserving_token(s: &str) -> bool {
    (MIN_FP_LEN..=MAX_FP_LEN).contains(&s.len())
        && s.bytes().all(|b| b.is_ascii_digit())
        && !luhn_valid_bytes(s.as_bytes())
}

/// Why a token could not be made. Never carries card data.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum TokenError {
    /// The system's secure random source failed.
    Random,
    /// The batch's random bytes are used up: more tokens were asked for than drawn.
    Exhausted,
    /// The batch asks for more tokens than one draw serves.
    BatchTooLarge,
    /// The card number is not 12 to 19 digits, so no format-preserving token fits it.
    CardLength,
}

impl TokenError {
    /// The machine-readable `google.rpc.ErrorInfo` reason.
    pub fn reason(&self) -> &'static str {
        match self {
            TokenError::Random => "RANDOM_UNAVAILABLE",
            TokenError::Exhausted => "TOKEN_RANDOM_EXHAUSTED",
            TokenError::BatchTooLarge => "BATCH_TOO_LARGE",
            TokenError::CardLength => "INVALID_CARD_NUMBER",
        }
    }
}

impl fmt::Display for TokenError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TokenError::Random => "the system random source failed",
            TokenError::Exhausted => "random bytes for this batch are used up",
            TokenError::BatchTooLarge => "too many tokens requested in one batch",
            TokenError::CardLength => "card number must be 12 to 19 digits for a format-preserving token",
        })
    }
}

impl std::error::Error for TokenError {}

#[cfg(test)]
mod tests {
    #![allow(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::panic,
        clippy::indexing_slicing
    )]

    use super::*;
    use crate::card::luhn_valid;
    use crate::crypto::Random;

    /// Randomness for one token that repeats `pattern`, to steer draws in tests (ring's
    /// `SecureRandom` is sealed, so a fake source cannot be written).
    fn fixed(pattern: &[u8]) -> TokenRandom {
        let bytes = pattern.iter().copied().cycle().take(BYTES_PER_TOKEN).collect();
        TokenRandom {
            bytes: Zeroizing::new(bytes),
            used: 0,
        }
    }

    #[test]
    fn base32_matches_rfc4648_vectors() {
        for (input, expected) in [
            ("", ""),
            ("f", "my"),
            ("fo", "mzxq"),
            ("foo", "mzxw6"),
            ("foob", "mzxw6yq"),
            ("fooba", "mzxw6ytb"),
            ("foobar", "mzxw6ytboi"),
        ] {
            let mut out = String::new();
            base32_lower(input.as_bytes(), &mut out);
            assert_eq!(out, expected, "{input}");
        }
        let mut out = String::new();
        base32_lower(&[0xff; 16], &mut out);
        assert_eq!(out, "77777777777777777777777774");
    }

    #[test]
    fn opaque_tokens() {
        let mut random = TokenRandom::for_batch(&Random::system(), 3).unwrap();
        let a = random.next_opaque().unwrap();
        let b = random.next_opaque().unwrap();
        assert_ne!(a, b);
        for token in [&a, &b] {
            assert!(token.starts_with("tok_"), "{token}");
            assert_eq!(token.len(), 30);
            assert!(is_opaque_token(token), "{token}");
        }
        assert!(!is_opaque_token("tok_77777777777777777777777777"));
        assert!(is_opaque_token("tok_77777777777777777777777774"));
        assert!(!is_opaque_token("tok_7777777777777777777777777"));
        assert!(!is_opaque_token("tok_A7777777777777777777777774"));
        assert!(!is_opaque_token("tok_17777777777777777777777774"));
        assert!(!is_opaque_token("tak_77777777777777777777777774"));
        assert!(!is_opaque_token("4111111111111111"));
    }

    #[test]
    fn batch_draws_are_bounded() {
        let mut random = TokenRandom::for_batch(&Random::system(), 1).unwrap();
        random.next_opaque().unwrap();
        assert_eq!(random.next_opaque().unwrap_err(), TokenError::Exhausted);
        let mut empty = TokenRandom::for_batch(&Random::system(), 0).unwrap();
        assert_eq!(empty.next_opaque().unwrap_err(), TokenError::Exhausted);
        assert_eq!(
            TokenRandom::for_batch(&Random::system(), MAX_BATCH_TOKENS + 1).unwrap_err(),
            TokenError::BatchTooLarge
        );
        assert_eq!(TokenError::BatchTooLarge.reason(), "BATCH_TOO_LARGE");
    }

    #[test]
    fn format_preserving_tokens() {
        let rng = Random::system();
        for number in [
            "4111111111111111",
            "378282246310005",
            "36227206271667",
            "4000000000000000006",
            "000000000000",
        ] {
            let pan = Pan::parse(number).unwrap();
            let mut random = TokenRandom::for_batch(&rng, 50).unwrap();
            for _ in 0..50 {
                let token = random.next_format_preserving(&pan).unwrap();
                assert_eq!(token.len(), number.len());
                assert_eq!(token[..6], number[..6]);
                assert_eq!(token[token.len() - 4..], number[number.len() - 4..]);
                assert!(!luhn_valid(&token), "{token}");
                assert!(is_format_preserving_token(&token), "{token}");
            }
        }
    }

    #[test]
    fn luhn_passing_draw_is_broken() {
        // 12-digit card 000000000000: middle digits come from two draws of 0x0000 -> "00",
        // giving 000000000000, which passes Luhn, so the last middle digit must be bumped.
        let pan = Pan::parse("000000000000").unwrap();
        let mut random = fixed(&[0]);
        assert_eq!(random.next_format_preserving(&pan).unwrap(), "000000010000");
        // Draws of 0x0009 give 000000990000, whose Luhn sum is 9 + (18 - 9) = 18: it fails
        // already and is kept as drawn.
        let mut random = fixed(&[0, 9]);
        assert_eq!(random.next_format_preserving(&pan).unwrap(), "000000990000");
        // Draws 5 and 9 give 000000590000, which passes (9 + (10 - 9) = 10); the bump wraps the
        // last middle digit from 9 to 0.
        let mut random = fixed(&[0, 5, 0, 9]);
        assert_eq!(random.next_format_preserving(&pan).unwrap(), "000000500000");
    }

    #[test]
    fn digit_draws_reject_the_biased_tail() {
        // 0xffff and 0xfffa are rejected; 0x0007 gives 7.
        let mut random = fixed(&[0xff, 0xff, 0xff, 0xfa, 0x00, 0x07]);
        assert_eq!(random.digit().unwrap(), 7);
        let mut random = fixed(&[0xff, 0xf9]);
        assert_eq!(random.digit().unwrap(), 9, "65529 is the largest accepted draw");
        let mut always_rejected = fixed(&[0xff]);
        assert_eq!(always_rejected.digit().unwrap_err(), TokenError::Exhausted);
    }

    #[test]
    fn format_preserving_syntax() {
        assert!(!is_format_preserving_token("4111111111111111"));
        assert!(is_format_preserving_token("4111111111111112"));
        assert!(!is_format_preserving_token("41111111111"));
        assert!(!is_format_preserving_token("41111111111111111111"));
        assert!(!is_format_preserving_token("4111 11111111112"));
        assert!(!is_format_preserving_token("tok_77777777777777777777777774"));
    }

    #[test]
    fn debug_prints_no_random_bytes() {
        let random = fixed(&[0xab]);
        assert_eq!(format!("{random:?}"), "TokenRandom { .. }");
    }
}
