//! Syntax checks for non-card payment data (bank accounts, e-mail addresses, phone numbers,
//! CVCs), shared by the gateway (to refuse bad input before anything is stored) and the vault
//! (which checks again on its side of the trust boundary). Pure functions over borrowed text;
//! they never copy or echo what they check.

/// The Luhn (mod 10) check over ASCII digits, skipping any byte in `separators`. False when
/// there is no digit or any other byte. The gateway (which accepts `4111 1111-…`) and the
/// vault (which checks normalised digits and builds Luhn-failing tokens) share it.
pub fn luhn_valid(number: &[u8], separators: &[u8]) -> bool {
    let mut sum = 0u32;
    let mut position = 0usize;
    // From the right, so every second digit from the check digit is doubled.
    for byte in number.iter().rev() {
        if separators.contains(byte) {
            continue;
        }
        if !byte.is_ascii_digit() {
            return false;
        }
        let digit = u32::from(byte - b'0');
        let value = if position % 2 == 1 {
            let doubled = digit * 2;
            if doubled > 9 {
                doubled - 9
            } else {
                doubled
            }
        } else {
            digit
        };
        // Reducing as we go keeps the sum bounded whatever the input length.
        sum = (sum + value) % 10;
        position += 1;
    }
    position > 0 && sum == 0
}

/// Removes the spaces people type into IBANs and upper-cases the letters.
pub fn normalise_iban(iban: &str) -> String {
    iban.chars()
        .filter(|c| !c.is_whitespace())
        .map(|c| c.to_ascii_uppercase())
        .collect()
}

/// ISO 13616: two letters, two check digits, 11 to 30 alphanumerics, and the mod-97 remainder
/// of the rearranged number is 1. Takes a normalised IBAN.
pub fn iban_valid(iban: &str) -> bool {
    let bytes = iban.as_bytes();
    if !(15..=34).contains(&bytes.len()) || !bytes.iter().all(u8::is_ascii_alphanumeric) {
        return false;
    }
    let (head, tail) = bytes.split_at(4);
    if !head.iter().take(2).all(u8::is_ascii_uppercase) || !head.iter().skip(2).all(u8::is_ascii_digit) {
        return false;
    }
    // Moving the first four characters to the end and reading letters as 10..35 gives a number
    // whose remainder modulo 97 must be 1; computed digit by digit to stay in a u32.
    let mut remainder = 0u32;
    for byte in tail.iter().chain(head) {
        let value = match byte {
            b'0'..=b'9' => u32::from(byte - b'0'),
            b'A'..=b'Z' => u32::from(byte - b'A') + 10,
            _ => return false,
        };
        remainder = if value >= 10 {
            (remainder * 100 + value) % 97
        } else {
            (remainder * 10 + value) % 97
        };
    }
    remainder == 1
}

/// A BIC: 4 letters (bank), 2 letters (country), 2 alphanumerics (location), optionally 3
/// alphanumerics (branch).
pub fn bic_valid(bic: &str) -> bool {
    let bytes = bic.as_bytes();
    (bytes.len() == 8 || bytes.len() == 11)
        && bytes.iter().take(6).all(u8::is_ascii_uppercase)
        && bytes
            .iter()
            .skip(6)
            .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit())
}

/// A plausible e-mail address: one `@`, a non-empty local part, a dotted domain, no spaces,
/// at most 254 characters. Deliverability is the payment method's business.
pub fn email_valid(email: &str) -> bool {
    if email.len() > 254 || email.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return false;
    }
    match email.split_once('@') {
        Some((local, domain)) => {
            !local.is_empty()
                && local.len() <= 64
                && !domain.contains('@')
                && domain.contains('.')
                && !domain.starts_with('.')
                && !domain.ends_with('.')
        }
        None => false,
    }
}

/// An E.164 phone number: `+` then 8 to 15 digits, the first not zero.
pub fn phone_valid(phone: &str) -> bool {
    match phone.strip_prefix('+') {
        Some(digits) => {
            (8..=15).contains(&digits.len())
                && digits.bytes().all(|b| b.is_ascii_digit())
                && !digits.starts_with('0')
        }
        None => false,
    }
}

/// A card verification code: 3 or 4 digits.
pub fn cvc_valid(cvc: &str) -> bool {
    (3..=4).contains(&cvc.len()) && cvc.bytes().all(|b| b.is_ascii_digit())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn luhn() {
        assert!(luhn_valid(b"79927398713", b""));
        assert!(!luhn_valid(b"79927398710", b""));
        assert!(luhn_valid(b"4111 1111-1111 1111", b" -"));
        assert!(!luhn_valid(b"4111 1111", b""));
        assert!(!luhn_valid(b"", b""));
        assert!(!luhn_valid(b" - ", b" -"));
    }

    #[test]
    fn ibans() {
        for good in [
            "GB82 WEST 1234 5698 7654 32",
            "DE89370400440532013000",
            "fr1420041010050500013m02606",
        ] {
            assert!(iban_valid(&normalise_iban(good)), "{good}");
        }
        for bad in [
            "GB82WEST12345698765433",
            "GB82",
            "1234WEST12345698765432",
            "GB82-WEST1234569876543",
            "",
        ] {
            assert!(!iban_valid(&normalise_iban(bad)), "{bad}");
        }
    }

    #[test]
    fn bics_emails_phones_cvcs() {
        assert!(
            bic_valid("DEUTDEFF") && bic_valid("DEUTDEFF500") && !bic_valid("DEUT") && !bic_valid("deutdeff")
        );
        assert!(email_valid("ada@example.com") && !email_valid("ada@") && !email_valid("a b@example.com"));
        assert!(phone_valid("+819012345678") && !phone_valid("09012345678") && !phone_valid("+0123456789"));
        assert!(cvc_valid("737") && cvc_valid("1234") && !cvc_valid("12") && !cvc_valid("12a"));
    }
}
