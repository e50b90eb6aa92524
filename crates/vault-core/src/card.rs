//! Card numbers, brands and expiry dates, validated straight into zeroizing types.
//!
//! Card digits enter the vault as a protobuf string and leave this module only through
//! `Pan::digits`, which is `pub(crate)`: everything public here is either a secret type that
//! never prints, or a fact (brand, first six, last four, expiry) that PCI DSS allows to be
//! stored and shown.

use std::fmt;

use zeroize::Zeroizing;

/// Shortest primary account number accepted (ISO/IEC 7812 allows 8, but no scheme issues
/// cards below 12, and format-preserving tokens need room between the first six and last four).
const MIN_DIGITS: usize = 12;
/// Longest primary account number (ISO/IEC 7812).
const MAX_DIGITS: usize = 19;
/// Longest input looked at: 19 digits with generous separators. Longer input is refused
/// before it is scanned, so a hostile caller cannot make the vault walk megabytes.
const MAX_INPUT_BYTES: usize = 64;
/// How far ahead an expiry date may be; schemes issue cards for at most a few years, so
/// anything further is a typo or a probe, not a card.
const MAX_YEARS_AHEAD: u32 = 20;

/// A validated primary account number: 12 to 19 ASCII digits that pass the Luhn check.
///
/// The digits live in zeroizing memory, and `Debug` prints none of them.
pub struct Pan {
    digits: Zeroizing<String>,
}

impl Pan {
    /// Parses a card number, accepting spaces and dashes as separators.
    pub fn parse(input: &str) -> Result<Pan, CardError> {
        if input.len() > MAX_INPUT_BYTES {
            return Err(CardError::Length);
        }
        // Counting first lets the buffer be sized once: a `String` that grows reallocates and
        // leaves unwiped copies of the digits it held in freed memory.
        let mut count = 0usize;
        for byte in input.bytes() {
            match byte {
                b'0'..=b'9' => count += 1,
                b' ' | b'-' => {}
                _ => return Err(CardError::NotDigits),
            }
        }
        if !(MIN_DIGITS..=MAX_DIGITS).contains(&count) {
            return Err(CardError::Length);
        }
        let mut digits = Zeroizing::new(String::with_capacity(count));
        digits.extend(input.chars().filter(char::is_ascii_digit));
        if !luhn_valid(&digits) {
            return Err(CardError::Luhn);
        }
        Ok(Pan { digits })
    }

    /// Number of digits (12 to 19).
    pub fn len(&self) -> usize {
        self.digits.len()
    }

    /// Always false: a parsed card number has at least 12 digits.
    pub fn is_empty(&self) -> bool {
        self.digits.is_empty()
    }

    /// The issuer identification number as stored in token metadata (PCI DSS allows it).
    pub fn first_six(&self) -> String {
        self.digits.get(..6).unwrap_or_default().to_owned()
    }

    /// The last four digits as stored in token metadata (PCI DSS allows it).
    pub fn last_four(&self) -> String {
        let start = self.digits.len().saturating_sub(4);
        self.digits.get(start..).unwrap_or_default().to_owned()
    }

    /// The card scheme, from the issuer identification number.
    pub fn brand(&self) -> Brand {
        Brand::from_digits(&self.digits)
    }

    /// The normalised digits in clear.
    ///
    /// This is the single way card digits leave the type. It is crate-private and used only
    /// inside the vault to encrypt the record, compute the fingerprint and build a
    /// format-preserving token; no public API can hand the digits to a caller, a log or an
    /// error message, and the borrowed `&str` cannot outlive the zeroizing storage.
    pub(crate) fn digits(&self) -> &str {
        &self.digits
    }
}

impl fmt::Debug for Pan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pan").finish_non_exhaustive()
    }
}

/// The Luhn (mod 10) check. False for an empty string or any non-digit.
pub fn luhn_valid(digits: &str) -> bool {
    luhn_valid_bytes(digits.as_bytes())
}

/// The Luhn check over ASCII bytes, shared with token generation.
pub(crate) fn luhn_valid_bytes(digits: &[u8]) -> bool {
    tessera_api::data_checks::luhn_valid(digits, b"")
}

/// Card scheme, named as in the public `tessera.v1.CardBrand` enum.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Brand {
    /// Visa.
    Visa,
    /// Mastercard.
    Mastercard,
    /// American Express.
    AmericanExpress,
    /// Discover.
    Discover,
    /// JCB.
    Jcb,
    /// China UnionPay.
    UnionPay,
    /// Diners Club.
    Diners,
    /// Maestro.
    Maestro,
    /// A number from no range above.
    Unknown,
}

impl Brand {
    /// The public `CardBrand` enum value name without its `CARD_BRAND_` prefix.
    pub fn as_str(&self) -> &'static str {
        match self {
            Brand::Visa => "VISA",
            Brand::Mastercard => "MASTERCARD",
            Brand::AmericanExpress => "AMERICAN_EXPRESS",
            Brand::Discover => "DISCOVER",
            Brand::Jcb => "JCB",
            Brand::UnionPay => "UNIONPAY",
            Brand::Diners => "DINERS",
            Brand::Maestro => "MAESTRO",
            Brand::Unknown => "UNKNOWN",
        }
    }

    /// Brand from the leading digits. Longer prefixes are tried first, so a specific range
    /// (Discover's 6011, Maestro's 6304) wins over a shorter one that would also match.
    fn from_digits(digits: &str) -> Brand {
        // 622126-622925 is co-branded UnionPay/Discover. We report UnionPay: the cards are
        // issued by UnionPay members and carry the UnionPay mark, while Discover only accepts
        // them on its network. With that choice the range falls inside UnionPay's 62 anyway;
        // the arm stays so the decision is visible and easy to flip.
        if let Some(622_126..=622_925) = leading(digits, 6) {
            return Brand::UnionPay;
        }
        match leading(digits, 4) {
            Some(2221..=2720) => return Brand::Mastercard,
            Some(6011) => return Brand::Discover,
            Some(3095) => return Brand::Diners,
            Some(3528..=3589) => return Brand::Jcb,
            Some(6304 | 6390 | 6759 | 6761..=6763) => return Brand::Maestro,
            _ => {}
        }
        match leading(digits, 3) {
            Some(300..=305) => return Brand::Diners,
            Some(644..=649) => return Brand::Discover,
            _ => {}
        }
        match leading(digits, 2) {
            Some(51..=55) => return Brand::Mastercard,
            Some(34 | 37) => return Brand::AmericanExpress,
            Some(65) => return Brand::Discover,
            Some(62 | 81) => return Brand::UnionPay,
            Some(36 | 38 | 39) => return Brand::Diners,
            Some(50 | 56..=58) => return Brand::Maestro,
            _ => {}
        }
        match leading(digits, 1) {
            Some(4) => Brand::Visa,
            _ => Brand::Unknown,
        }
    }
}

impl fmt::Display for Brand {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The first `count` digits as a number, or `None` if there are fewer or a non-digit.
fn leading(digits: &str, count: usize) -> Option<u32> {
    digits
        .as_bytes()
        .get(..count)?
        .iter()
        .try_fold(0u32, |acc, byte| {
            byte.is_ascii_digit().then(|| acc * 10 + u32::from(byte - b'0'))
        })
}

/// A card's expiry month and year (four-digit year).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Expiry {
    /// 1 to 12.
    pub month: u32,
    /// 2000 to 2099.
    pub year: u32,
}

impl Expiry {
    /// Validates an expiry date against `today`, given as `(year, month)` in UTC.
    ///
    /// A card is valid through the last day of its expiry month, so a card expiring this
    /// month is accepted. Comparing whole months in UTC can be a few hours off the issuer's
    /// local time at a month boundary; the authorisation decides in that case.
    pub fn new(month: u32, year: u32, today: (u32, u32)) -> Result<Expiry, CardError> {
        if !(1..=12).contains(&month) {
            return Err(CardError::ExpiryMonth);
        }
        if !(2000..=2099).contains(&year) {
            return Err(CardError::ExpiryYear);
        }
        let (this_year, this_month) = today;
        if (year, month) < (this_year, this_month) {
            return Err(CardError::ExpiryPast);
        }
        if year > this_year.saturating_add(MAX_YEARS_AHEAD) {
            return Err(CardError::ExpiryYear);
        }
        Ok(Expiry { month, year })
    }
}

/// The UTC `(year, month)` of a moment given in seconds since 1970-01-01, for [`Expiry::new`].
/// The core reads no clock: the vault process passes the current time in.
pub fn year_month_utc(unix_seconds: u64) -> (u32, u32) {
    year_month_from_days(unix_seconds / 86_400)
}

/// `(year, month)` of a day counted from 1970-01-01, by Howard Hinnant's `civil_from_days`
/// (proleptic Gregorian calendar), restricted to days on or after the epoch so it stays in
/// unsigned arithmetic.
fn year_month_from_days(days: u64) -> (u32, u32) {
    let (year, month, _) = tessera_api::calendar::civil_from_days(i64::try_from(days).unwrap_or(i64::MAX));
    (year, month)
}

/// Facts about a card that are not sensitive and are stored next to its token.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CardFacts {
    /// Card scheme.
    pub brand: Brand,
    /// Issuer identification number.
    pub first_six: String,
    /// Last four digits.
    pub last_four: String,
    /// Expiry month and year.
    pub expiry: Expiry,
}

/// A card whose number, expiry and holder name have all been validated.
pub struct ValidCard {
    /// The card number.
    pub pan: Pan,
    /// The expiry date, not in the past.
    pub expiry: Expiry,
    /// Trimmed holder name, possibly empty.
    pub holder_name: Zeroizing<String>,
}

impl ValidCard {
    /// Validates a card from the vault API. Errors name the field and never the data.
    pub fn from_proto(card: &tessera_api::vault::Card, today: (u32, u32)) -> Result<ValidCard, CardError> {
        let pan = Pan::parse(&card.number)?;
        let expiry = Expiry::new(card.expiry_month, card.expiry_year, today)?;
        // The gateway applies the same shared rule, so the two never disagree about a name.
        if !tessera_api::data_checks::holder_name_valid(&card.holder_name) {
            return Err(CardError::HolderName);
        }
        let name = card.holder_name.trim();
        let mut holder_name = Zeroizing::new(String::with_capacity(name.len()));
        holder_name.push_str(name);
        Ok(ValidCard {
            pan,
            expiry,
            holder_name,
        })
    }

    /// The non-sensitive facts stored next to the token.
    pub fn facts(&self) -> CardFacts {
        CardFacts {
            brand: self.pan.brand(),
            first_six: self.pan.first_six(),
            last_four: self.pan.last_four(),
            expiry: self.expiry,
        }
    }

    /// The normalised card as a vault API message, for sealing or returning on reveal. The
    /// message wipes its fields when dropped.
    pub fn to_proto(&self) -> tessera_api::vault::Card {
        tessera_api::vault::Card {
            number: self.pan.digits().to_owned(),
            expiry_month: self.expiry.month,
            expiry_year: self.expiry.year,
            holder_name: self.holder_name.as_str().to_owned(),
        }
    }
}

impl fmt::Debug for ValidCard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ValidCard").finish_non_exhaustive()
    }
}

/// Why card data was refused. Messages name the rule broken, never the data.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum CardError {
    /// The number holds a character other than digits, spaces and dashes.
    NotDigits,
    /// The number is not 12 to 19 digits long.
    Length,
    /// The number fails the Luhn check.
    Luhn,
    /// The expiry month is not 1 to 12.
    ExpiryMonth,
    /// The expiry year is not a four-digit year within 20 years from now.
    ExpiryYear,
    /// The expiry date has passed.
    ExpiryPast,
    /// The holder name is too long or holds control or invisible formatting characters.
    HolderName,
    /// No card was given.
    MissingCard,
}

impl CardError {
    /// The machine-readable `google.rpc.ErrorInfo` reason.
    pub fn reason(&self) -> &'static str {
        match self {
            CardError::NotDigits | CardError::Length | CardError::Luhn => "INVALID_CARD_NUMBER",
            CardError::ExpiryMonth | CardError::ExpiryYear | CardError::ExpiryPast => "INVALID_EXPIRY",
            CardError::HolderName => "INVALID_HOLDER_NAME",
            CardError::MissingCard => "MISSING_FIELD",
        }
    }

    /// The request field the error is about.
    pub fn field(&self) -> &'static str {
        match self {
            CardError::NotDigits | CardError::Length | CardError::Luhn => "card.number",
            CardError::ExpiryMonth => "card.expiry_month",
            // A past date is reported against the year, the coarser half of the date.
            CardError::ExpiryYear | CardError::ExpiryPast => "card.expiry_year",
            CardError::HolderName => "card.holder_name",
            CardError::MissingCard => "card",
        }
    }
}

impl fmt::Display for CardError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            CardError::NotDigits => "card number may contain only digits, spaces and dashes",
            CardError::Length => "card number must be 12 to 19 digits",
            CardError::Luhn => "card number fails the Luhn check",
            CardError::ExpiryMonth => "card expiry month must be 1 to 12",
            CardError::ExpiryYear => "card expiry year must be a four-digit year at most 20 years ahead",
            CardError::ExpiryPast => "card has expired",
            CardError::HolderName => {
                "card holder name must be at most 100 characters without control or invisible formatting characters"
            }
            CardError::MissingCard => "card is required",
        })
    }
}

impl std::error::Error for CardError {}

#[cfg(test)]
mod tests {
    #![allow(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::panic,
        clippy::indexing_slicing
    )]

    use super::*;

    const TODAY: (u32, u32) = (2025, 6);

    #[test]
    fn test_cards_by_brand() {
        let cases = [
            ("4111111111111111", Brand::Visa),
            ("5555555555554444", Brand::Mastercard),
            ("2223003122003222", Brand::Mastercard),
            ("378282246310005", Brand::AmericanExpress),
            ("6011111111111117", Brand::Discover),
            ("3530111333300000", Brand::Jcb),
            ("6200000000000005", Brand::UnionPay),
            ("36227206271667", Brand::Diners),
            ("6759649826438453", Brand::Maestro),
        ];
        for (number, brand) in cases {
            let pan = Pan::parse(number).unwrap_or_else(|e| panic!("{number}: {e}"));
            assert_eq!(pan.brand(), brand, "{number}");
            assert_eq!(pan.len(), number.len());
            assert_eq!(pan.first_six(), number[..6]);
            assert_eq!(pan.last_four(), number[number.len() - 4..]);
        }
    }

    #[test]
    fn brand_prefix_ranges() {
        let cases = [
            ("2221", Brand::Mastercard),
            ("2720", Brand::Mastercard),
            ("2220", Brand::Unknown),
            ("2721", Brand::Unknown),
            ("51", Brand::Mastercard),
            ("55", Brand::Mastercard),
            ("34", Brand::AmericanExpress),
            ("6011", Brand::Discover),
            ("6012", Brand::Unknown),
            ("644", Brand::Discover),
            ("649", Brand::Discover),
            ("65", Brand::Discover),
            ("622126", Brand::UnionPay),
            ("622925", Brand::UnionPay),
            ("62", Brand::UnionPay),
            ("81", Brand::UnionPay),
            ("3528", Brand::Jcb),
            ("3589", Brand::Jcb),
            ("3527", Brand::Unknown),
            ("300", Brand::Diners),
            ("305", Brand::Diners),
            ("306", Brand::Unknown),
            ("3095", Brand::Diners),
            ("38", Brand::Diners),
            ("39", Brand::Diners),
            ("50", Brand::Maestro),
            ("56", Brand::Maestro),
            ("58", Brand::Maestro),
            ("6304", Brand::Maestro),
            ("6390", Brand::Maestro),
            ("6761", Brand::Maestro),
            ("6763", Brand::Maestro),
            ("6764", Brand::Unknown),
            ("4", Brand::Visa),
            ("1", Brand::Unknown),
            ("9", Brand::Unknown),
        ];
        for (prefix, brand) in cases {
            let digits = format!("{prefix:0<16}");
            assert_eq!(Brand::from_digits(&digits), brand, "{prefix}");
        }
    }

    #[test]
    fn brand_names_match_public_enum() {
        assert_eq!(Brand::AmericanExpress.as_str(), "AMERICAN_EXPRESS");
        assert_eq!(Brand::UnionPay.as_str(), "UNIONPAY");
        assert_eq!(Brand::Unknown.to_string(), "UNKNOWN");
    }

    #[test]
    fn separators_are_stripped() {
        let pan = Pan::parse("4111 1111-1111 1111").unwrap();
        assert_eq!(pan.digits(), "4111111111111111");
    }

    #[test]
    fn luhn_failures_are_refused() {
        assert_eq!(Pan::parse("4111111111111112").unwrap_err(), CardError::Luhn);
        assert_eq!(Pan::parse("5555555555554445").unwrap_err(), CardError::Luhn);
        assert!(!luhn_valid(""));
        assert!(!luhn_valid("41111111111111a1"));
        assert!(luhn_valid("0"));
        assert!(luhn_valid("79927398713"));
        assert!(!luhn_valid("79927398710"));
    }

    #[test]
    fn non_digits_are_refused() {
        for input in [
            "4111x11111111111",
            "4111.1111.1111.1111",
            "٤١١١١١١١١١١١١١١١",
            "4111\u{0}111111111111",
            "+4111111111111111",
        ] {
            assert_eq!(Pan::parse(input).unwrap_err(), CardError::NotDigits, "{input:?}");
        }
    }

    #[test]
    fn lengths_are_enforced() {
        assert_eq!(Pan::parse("").unwrap_err(), CardError::Length);
        assert_eq!(Pan::parse(" - ").unwrap_err(), CardError::Length);
        // 11 digits, Luhn-valid.
        assert_eq!(Pan::parse("79927398713").unwrap_err(), CardError::Length);
        // 12 and 19 digits, Luhn-valid.
        assert!(Pan::parse("000000000000").is_ok());
        assert!(Pan::parse("4000000000000000006").is_ok());
        assert_eq!(Pan::parse("40000000000000000006").unwrap_err(), CardError::Length);
        let long = format!("4111111111111111{}", " ".repeat(49));
        assert_eq!(long.len(), 65);
        assert_eq!(Pan::parse(&long).unwrap_err(), CardError::Length);
        assert!(Pan::parse(&long[..64]).is_ok());
    }

    #[test]
    fn expiry_edges() {
        assert_eq!(Expiry::new(6, 2025, TODAY), Ok(Expiry { month: 6, year: 2025 }));
        assert_eq!(Expiry::new(5, 2025, TODAY), Err(CardError::ExpiryPast));
        assert_eq!(Expiry::new(12, 2024, TODAY), Err(CardError::ExpiryPast));
        assert_eq!(Expiry::new(1, 2026, TODAY), Ok(Expiry { month: 1, year: 2026 }));
        assert_eq!(Expiry::new(0, 2030, TODAY), Err(CardError::ExpiryMonth));
        assert_eq!(Expiry::new(13, 2030, TODAY), Err(CardError::ExpiryMonth));
        assert_eq!(Expiry::new(1, 30, TODAY), Err(CardError::ExpiryYear));
        assert_eq!(Expiry::new(1, 2100, TODAY), Err(CardError::ExpiryYear));
        assert_eq!(
            Expiry::new(12, 2045, TODAY),
            Ok(Expiry {
                month: 12,
                year: 2045
            })
        );
        assert_eq!(Expiry::new(1, 2046, TODAY), Err(CardError::ExpiryYear));
        assert_eq!(Expiry::new(1, 1999, TODAY), Err(CardError::ExpiryYear));
    }

    #[test]
    fn civil_dates() {
        assert_eq!(year_month_from_days(0), (1970, 1));
        assert_eq!(year_month_from_days(30), (1970, 1));
        assert_eq!(year_month_from_days(31), (1970, 2));
        // 2000-02-29 and 2000-03-01.
        assert_eq!(year_month_from_days(11_016), (2000, 2));
        assert_eq!(year_month_from_days(11_017), (2000, 3));
        // 2024-02-29, 2024-12-31, 2025-01-01.
        assert_eq!(year_month_from_days(19_782), (2024, 2));
        assert_eq!(year_month_from_days(20_088), (2024, 12));
        assert_eq!(year_month_from_days(20_089), (2025, 1));
        // 2025-01-01T00:00:00Z, and one second before it.
        assert_eq!(year_month_utc(1_735_689_600), (2025, 1));
        assert_eq!(year_month_utc(1_735_689_599), (2024, 12));
    }

    fn proto(number: &str, month: u32, year: u32, name: &str) -> tessera_api::vault::Card {
        tessera_api::vault::Card {
            number: number.into(),
            expiry_month: month,
            expiry_year: year,
            holder_name: name.into(),
        }
    }

    #[test]
    fn valid_card_round_trip_and_facts() {
        let card =
            ValidCard::from_proto(&proto("4111-1111-1111-1111", 12, 2031, "  Ada Lovelace "), TODAY).unwrap();
        assert_eq!(card.holder_name.as_str(), "Ada Lovelace");
        let facts = card.facts();
        assert_eq!(facts.brand, Brand::Visa);
        assert_eq!(facts.first_six, "411111");
        assert_eq!(facts.last_four, "1111");
        assert_eq!(
            facts.expiry,
            Expiry {
                month: 12,
                year: 2031
            }
        );
        let back = card.to_proto();
        assert_eq!(back.number, "4111111111111111");
        assert_eq!((back.expiry_month, back.expiry_year), (12, 2031));
        assert_eq!(back.holder_name, "Ada Lovelace");
    }

    #[test]
    fn holder_name_rules() {
        let ok = "x".repeat(100);
        assert!(ValidCard::from_proto(&proto("4111111111111111", 1, 2030, &ok), TODAY).is_ok());
        let long = "é".repeat(101);
        let err = ValidCard::from_proto(&proto("4111111111111111", 1, 2030, &long), TODAY).unwrap_err();
        assert_eq!(
            (err, err.reason(), err.field()),
            (CardError::HolderName, "INVALID_HOLDER_NAME", "card.holder_name")
        );
        let err =
            ValidCard::from_proto(&proto("4111111111111111", 1, 2030, "Ada\nLovelace"), TODAY).unwrap_err();
        assert_eq!(err, CardError::HolderName);
        for invisible in [
            '\u{202E}', '\u{2067}', '\u{200B}', '\u{200D}', '\u{2060}', '\u{FEFF}',
        ] {
            let name = format!("Ada{invisible} Lovelace");
            let err = ValidCard::from_proto(&proto("4111111111111111", 1, 2030, &name), TODAY).unwrap_err();
            assert_eq!(err, CardError::HolderName, "U+{:04X}", u32::from(invisible));
            assert!(!err.to_string().contains(invisible));
        }
        assert!(ValidCard::from_proto(&proto("4111111111111111", 1, 2030, "Zoë Łukasiewicz"), TODAY).is_ok());
        assert!(ValidCard::from_proto(&proto("4111111111111111", 1, 2030, ""), TODAY).is_ok());
    }

    #[test]
    fn reasons_and_fields() {
        assert_eq!(CardError::Luhn.reason(), "INVALID_CARD_NUMBER");
        assert_eq!(CardError::Length.field(), "card.number");
        assert_eq!(CardError::ExpiryPast.reason(), "INVALID_EXPIRY");
        assert_eq!(CardError::ExpiryMonth.field(), "card.expiry_month");
        assert_eq!(CardError::ExpiryYear.field(), "card.expiry_year");
        assert_eq!(
            (CardError::MissingCard.reason(), CardError::MissingCard.field()),
            ("MISSING_FIELD", "card")
        );
        assert_eq!(
            CardError::Length.to_string(),
            "card number must be 12 to 19 digits"
        );
    }

    #[test]
    fn debug_prints_no_card_data() {
        let card = ValidCard::from_proto(&proto("5555555555554444", 1, 2030, "Ada Lovelace"), TODAY).unwrap();
        for printed in [
            format!("{:?}", card.pan),
            format!("{card:?}"),
            format!("{card:#?}"),
        ] {
            assert!(!printed.bytes().any(|b| b.is_ascii_digit()), "{printed}");
            assert!(!printed.contains("Ada"), "{printed}");
        }
        assert_eq!(format!("{:?}", card.pan), "Pan { .. }");
    }
}
