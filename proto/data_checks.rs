//! Syntax checks for non-card payment data (bank accounts, e-mail addresses, phone numbers,
//! CVCs) and the rules for free text (printable characters only, no card number where card
//! data does not belong), shared by the gateway (to refuse bad input before anything is
//! stored) and the vault (which checks again on its side of the trust boundary), so the two
//! never disagree. Pure functions over borrowed text; they never copy or echo what they check.

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

/// Longest holder name (of a card or a bank account) kept, in characters after trimming (EMV
/// track data allows 26; forms allow more).
pub const MAX_HOLDER_NAME_CHARS: usize = 100;

/// Fewest and most digits of a card number (ISO/IEC 7812 allows 8 to 19, but no scheme issues
/// cards below 12): the digit runs [`contains_card_number`] screens.
const CARD_NUMBER_DIGITS: std::ops::RangeInclusive<usize> = 12..=19;
/// Longest card number, the size of the window [`contains_card_number`] keeps.
const MAX_CARD_NUMBER_DIGITS: usize = 19;
/// Stands in [`contains_card_number`]'s window for a numeric character other than `0`-`9`,
/// whose digit value (if it has one) is not worked out here.
const UNKNOWN_DIGIT: u8 = b'?';

/// True for a character that is not seen but changes how the text around it displays, joins
/// or compares, so stored text could read differently from what was checked: the Unicode
/// format characters (general category Cf, Unicode 15.1) — among them the bidirectional
/// embeddings and overrides U+202A–U+202E and isolates U+2066–U+2069, the zero-width space,
/// joiners and direction marks U+200B–U+200F, the word joiner U+2060 and the byte-order mark
/// U+FEFF — and the line and paragraph separators U+2028 and U+2029.
pub fn is_invisible(c: char) -> bool {
    matches!(
        c,
        '\u{00AD}'
            | '\u{0600}'..='\u{0605}'
            | '\u{061C}'
            | '\u{06DD}'
            | '\u{070F}'
            | '\u{0890}'..='\u{0891}'
            | '\u{08E2}'
            | '\u{180E}'
            | '\u{200B}'..='\u{200F}'
            | '\u{2028}'..='\u{202E}'
            | '\u{2060}'..='\u{2064}'
            | '\u{2066}'..='\u{206F}'
            | '\u{FEFF}'
            | '\u{FFF9}'..='\u{FFFB}'
            | '\u{110BD}'
            | '\u{110CD}'
            | '\u{13430}'..='\u{1343F}'
            | '\u{1BCA0}'..='\u{1BCA3}'
            | '\u{1D173}'..='\u{1D17A}'
            | '\u{E0001}'
            | '\u{E0020}'..='\u{E007F}'
    )
}

/// True when every character of `text` is one a person sees: no control character (Cc) and
/// no invisible formatting character ([`is_invisible`]). The rule for every free-text field.
pub fn printable(text: &str) -> bool {
    !text.chars().any(|c| c.is_control() || is_invisible(c))
}

/// A holder name: at most [`MAX_HOLDER_NAME_CHARS`] characters once surrounding whitespace
/// (which the vault drops) is trimmed, and every character [`printable`], the trimmed ones
/// too (a line separator is whitespace, but not one a caller should send). Empty is allowed.
pub fn holder_name_valid(name: &str) -> bool {
    name.trim().chars().count() <= MAX_HOLDER_NAME_CHARS && printable(name)
}

/// True when `text` may hold a card number, for fields that are not card data and so are
/// stored and logged in clear (references, ids, keys).
///
/// The rule: a *digit run* is a sequence of digits in which spaces and dashes may stand
/// between digits (as people type card numbers: `4111 1111-1111 1111`); any other character
/// ends it. The text may hold a card number when some 12 to 19 consecutive digits of a run
/// pass the Luhn check. Numeric characters other than `0`-`9` (e.g. full-width or
/// Arabic-Indic digits) count as digits that pass, since their values are not checked here.
///
/// So a run of fewer than 12 digits always passes (`shopper-000123`, `order-2026-000123`);
/// a longer run is refused if any stretch of 12 to 19 of its digits is Luhn-valid, which for
/// an arbitrary run of 12 digits happens one time in ten and becomes likely as runs grow.
/// Callers that need long numbers in a reference should split them with another character
/// (`/`, `_`, `.`, a letter).
pub fn contains_card_number(text: &str) -> bool {
    // The run's last digits, oldest first; only windows ending at the newest digit are new.
    let mut window = [0u8; MAX_CARD_NUMBER_DIGITS];
    let mut len = 0usize;
    for c in text.chars() {
        let digit = match c {
            ' ' | '-' => continue,
            '0'..='9' => c as u8,
            _ if c.is_numeric() => UNKNOWN_DIGIT,
            _ => {
                len = 0;
                continue;
            }
        };
        if len == MAX_CARD_NUMBER_DIGITS {
            window.copy_within(1.., 0);
        } else {
            len += 1;
        }
        if let Some(newest) = window.get_mut(len - 1) {
            *newest = digit;
        }
        let run = window.get(..len).unwrap_or_default();
        for count in CARD_NUMBER_DIGITS {
            let Some(start) = len.checked_sub(count) else {
                break;
            };
            let candidate = run.get(start..).unwrap_or_default();
            if candidate.contains(&UNKNOWN_DIGIT) || luhn_valid(candidate, b"") {
                return true;
            }
        }
    }
    false
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
    if email.len() > 254 || email.chars().any(char::is_whitespace) || !printable(email) {
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

    /// Every invisible character the acceptance run sent, and a few more of category Cf.
    const INVISIBLE: [char; 20] = [
        '\u{202A}',
        '\u{202B}',
        '\u{202C}',
        '\u{202D}',
        '\u{202E}',
        '\u{2066}',
        '\u{2067}',
        '\u{2068}',
        '\u{2069}',
        '\u{200B}',
        '\u{200C}',
        '\u{200D}',
        '\u{200E}',
        '\u{200F}',
        '\u{2060}',
        '\u{FEFF}',
        '\u{00AD}',
        '\u{061C}',
        '\u{2028}',
        '\u{E0041}',
    ];

    #[test]
    fn invisible_characters_are_not_printable() {
        for c in INVISIBLE {
            assert!(is_invisible(c), "U+{:04X}", u32::from(c));
            let name = format!("Ada{c} Lovelace");
            assert!(
                !printable(&name) && !holder_name_valid(&name),
                "U+{:04X}",
                u32::from(c)
            );
        }
        for visible in ['a', 'é', 'Ł', 'ß', '中', 'ب', '\'', '-', ' ', '\u{00A0}', '😀'] {
            assert!(
                !is_invisible(visible) && printable(&visible.to_string()),
                "{visible}"
            );
        }
        assert!(!printable("Ada\nLovelace") && !printable("Ada\u{7F}"));
    }

    #[test]
    fn holder_names() {
        assert!(holder_name_valid("Zoë Łukasiewicz-O'Brien") && holder_name_valid("ابن سينا"));
        assert!(holder_name_valid(""));
        // Found by the property test below: separators that trim() removes are still refused.
        for only in ["\u{2028}", "\u{2029}", " \u{2028} "] {
            assert!(!holder_name_valid(only), "{only:?}");
        }
        assert!(holder_name_valid(&"é".repeat(MAX_HOLDER_NAME_CHARS)));
        assert!(holder_name_valid(&format!(
            "  {}  ",
            "x".repeat(MAX_HOLDER_NAME_CHARS)
        )));
        assert!(!holder_name_valid(&"é".repeat(MAX_HOLDER_NAME_CHARS + 1)));
    }

    #[test]
    fn card_numbers_in_free_text() {
        for with_card in [
            "4111111111111111",
            "4111 1111-1111 1111",
            "order 4111-1111-1111-1111 for Ada",
            "shopper-4111111111111111",
            // Hidden behind a digit before or after it: every stretch of a run is checked.
            "94111111111111111",
            "41111111111111119",
            "378282246310005",
            // 12 digits that pass the Luhn check.
            "order-100000000008",
            // Numeric characters other than 0-9 are not given the benefit of the doubt.
            "４１１１１１１１１１１１１１１１",
        ] {
            assert!(contains_card_number(with_card), "{with_card}");
        }
        for without in [
            "",
            "shopper-000123",
            "order-2026-000123",
            "m_demo",
            // 12 digits that fail the Luhn check.
            "order-100000000007",
            // Other characters split runs.
            "4111_1111_1111_1111",
            "4111/1111/1111/1111",
            "4111.1111.1111.1111",
            "12345678901",
        ] {
            assert!(!contains_card_number(without), "{without}");
        }
    }

    /// A Luhn-valid number of `body` plus its check digit.
    fn with_check_digit(body: &str) -> String {
        (b'0'..=b'9')
            .map(|digit| format!("{body}{}", char::from(digit)))
            .find(|number| luhn_valid(number.as_bytes(), b""))
            .unwrap_or_default()
    }

    proptest::proptest! {
        // Seeds of past failures live beside this file, not in a directory at the top of the
        // repository.
        #![proptest_config(proptest::test_runner::Config {
            failure_persistence: Some(Box::new(
                proptest::test_runner::FileFailurePersistence::WithSource("proptest-regressions"),
            )),
            ..proptest::test_runner::Config::default()
        })]

        /// A card number is found wherever it sits in the text and however it is split by
        /// spaces and dashes.
        #[test]
        fn any_card_number_in_any_text_is_found(
            body in "[0-9]{11,18}",
            splits in proptest::collection::vec((0usize..19, "[ -]{1,2}"), 0..4),
            before in "([a-z/_.]{1,3}[0-9]{0,11}){0,3}[a-z/_.]{0,3}",
            after in "[a-z/_.]{0,3}([a-z/_.]{1,3}[0-9]{0,11}){0,3}",
        ) {
            let mut number = with_check_digit(&body);
            for (at, separator) in splits {
                let at = at % (number.len() + 1);
                number.insert_str(at, &separator);
            }
            // Letters around it, so the number is a run of its own.
            let text = format!("{before}x{number}x{after}");
            proptest::prop_assert!(contains_card_number(&text), "{}", text);
        }

        /// Text whose digit runs are all shorter than a card number is never refused.
        #[test]
        fn short_digit_runs_always_pass(text in "([a-zA-Z/_.:#]{1,4}[0-9]{0,11}){0,8}") {
            proptest::prop_assert!(!contains_card_number(&text), "{}", text);
        }

        /// One invisible character anywhere makes text unprintable.
        #[test]
        fn one_invisible_character_anywhere_is_refused(
            text in "[a-zA-Z ,.'éŁ中ب-]{0,40}",
            at in 0usize..41,
            which in 0usize..INVISIBLE.len(),
        ) {
            proptest::prop_assert!(printable(&text));
            let mut chars: Vec<char> = text.chars().collect();
            let invisible = INVISIBLE.get(which).copied().unwrap_or('\u{202E}');
            chars.insert(at.min(chars.len()), invisible);
            let spoiled: String = chars.into_iter().collect();
            proptest::prop_assert!(!printable(&spoiled) && !holder_name_valid(&spoiled));
        }
    }
}
