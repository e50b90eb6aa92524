//! Request validation at the public edge. It runs before any key is created or any row is
//! written, so bad input changes nothing. The vault validates card data again on its side of
//! the trust boundary; this copy exists so a refusal costs no vault round trip. The rules for
//! free text (printable characters only; no card number in a field that is not card data) are
//! `tessera_api::data_checks`, which the vault applies too, so the two never disagree.

use tessera_api::data_checks::{
    bic_valid, contains_card_number, cvc_valid, email_valid, holder_name_valid, iban_valid, luhn_valid,
    normalise_iban, phone_valid, printable,
};

use crate::error::ApiError;

const MAX_ID_LEN: usize = 64;
const MAX_SHOPPER_REFERENCE_LEN: usize = 128;
const MAX_IDEMPOTENCY_KEY_LEN: usize = 128;

/// Checks a merchant id: 1 to 64 characters of `A-Z a-z 0-9 _ - .`, holding no card number
/// (it is stored and logged in clear).
pub fn merchant_id(id: &str) -> Result<(), ApiError> {
    if id.is_empty() {
        return Err(ApiError::missing("merchant_id"));
    }
    if id.len() > MAX_ID_LEN
        || !id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_-.".contains(&b))
    {
        return Err(ApiError::invalid(
            "merchant_id",
            "INVALID_MERCHANT_ID",
            "merchant_id must be 1 to 64 characters of letters, digits, '_', '-' or '.'",
        ));
    }
    if contains_card_number(id) {
        return Err(ApiError::invalid(
            "merchant_id",
            "INVALID_MERCHANT_ID",
            "merchant_id must not contain a card number",
        ));
    }
    Ok(())
}

/// Checks a token's syntax; whether it exists is the store's business.
pub fn token(token: &str) -> Result<(), ApiError> {
    if token.is_empty() {
        return Err(ApiError::missing("token"));
    }
    if token.len() > MAX_ID_LEN || !token.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
        return Err(ApiError::invalid(
            "token",
            "INVALID_TOKEN",
            "token is not a Tessera token",
        ));
    }
    Ok(())
}

/// Checks card data without keeping or echoing it.
pub fn card(card: &tessera_api::v1::Card, today: (u32, u32)) -> Result<(), ApiError> {
    card_number(&card.number)?;
    expiry(card.expiry_month, card.expiry_year, today)?;
    holder_name(&card.holder_name)
}

fn invalid_number(message: &'static str) -> ApiError {
    ApiError::invalid("card.number", "INVALID_CARD_NUMBER", message)
}

/// Digits only (spaces and dashes ignored), 12 to 19 of them, passing the Luhn check.
pub fn card_number(number: &str) -> Result<(), ApiError> {
    if number.is_empty() {
        return Err(ApiError::missing("card.number"));
    }
    if number.len() > 64 {
        return Err(invalid_number("card number must be 12 to 19 digits"));
    }
    let mut digits = 0usize;
    for byte in number.bytes() {
        match byte {
            b' ' | b'-' => {}
            b'0'..=b'9' => digits += 1,
            _ => {
                return Err(invalid_number(
                    "card number must contain only digits, spaces or dashes",
                ))
            }
        }
    }
    if !(12..=19).contains(&digits) {
        return Err(invalid_number("card number must be 12 to 19 digits"));
    }
    if !luhn_valid(number.as_bytes(), b" -") {
        return Err(invalid_number("card number fails the Luhn check"));
    }
    Ok(())
}

/// A card is valid through the end of its expiry month, and not more than 20 years ahead.
pub fn expiry(month: u32, year: u32, (this_year, this_month): (u32, u32)) -> Result<(), ApiError> {
    if month == 0 && year == 0 {
        return Err(ApiError::missing("card.expiry_month"));
    }
    if !(1..=12).contains(&month) {
        return Err(ApiError::invalid(
            "card.expiry_month",
            "INVALID_EXPIRY",
            "expiry_month must be 1 to 12",
        ));
    }
    if !(2000..=2099).contains(&year) || year > this_year + 20 {
        return Err(ApiError::invalid(
            "card.expiry_year",
            "INVALID_EXPIRY",
            "expiry_year must be a four-digit year at most 20 years ahead",
        ));
    }
    if (year, month) < (this_year, this_month) {
        return Err(ApiError::invalid(
            "card.expiry_year",
            "CARD_EXPIRED",
            "the card has expired",
        ));
    }
    Ok(())
}

/// The refusal text of a holder name, the same for a card's and a bank account's.
const HOLDER_NAME_RULE: &str =
    "holder_name must be at most 100 characters without control or invisible formatting characters";

fn holder_name(name: &str) -> Result<(), ApiError> {
    if !holder_name_valid(name) {
        return Err(ApiError::invalid(
            "card.holder_name",
            "INVALID_HOLDER_NAME",
            HOLDER_NAME_RULE,
        ));
    }
    Ok(())
}

/// Checks a bank account: IBAN with valid check digits, optional BIC, printable holder name.
pub fn bank_account(account: &tessera_api::v1::BankAccount) -> Result<(), ApiError> {
    if account.iban.is_empty() {
        return Err(ApiError::missing("bank_account.iban"));
    }
    if account.iban.len() > 64 || !iban_valid(&normalise_iban(&account.iban)) {
        return Err(ApiError::invalid(
            "bank_account.iban",
            "INVALID_BANK_ACCOUNT",
            "iban is not a valid IBAN",
        ));
    }
    if !account.bic.trim().is_empty() && !bic_valid(account.bic.trim()) {
        return Err(ApiError::invalid(
            "bank_account.bic",
            "INVALID_BANK_ACCOUNT",
            "bic must be 8 or 11 characters",
        ));
    }
    if !holder_name_valid(&account.holder_name) {
        return Err(ApiError::invalid(
            "bank_account.holder_name",
            "INVALID_BANK_ACCOUNT",
            HOLDER_NAME_RULE,
        ));
    }
    Ok(())
}

/// Checks contact data: exactly one of an e-mail address or an E.164 phone number.
pub fn contact(contact: &tessera_api::v1::Contact) -> Result<(), ApiError> {
    let (email, phone) = (contact.email.trim(), contact.phone.trim());
    let valid = match (email.is_empty(), phone.is_empty()) {
        (false, true) => email_valid(email),
        (true, false) => phone_valid(phone),
        _ => false,
    };
    if !valid {
        return Err(ApiError::invalid(
            "contact",
            "INVALID_CONTACT",
            "contact must be one e-mail address or one E.164 phone number (+ and 8 to 15 digits)",
        ));
    }
    Ok(())
}

/// An optional caller reference (a merchant reference, an acquiring agreement, a payment
/// reference), stored in clear: at most 128 characters without control or invisible
/// formatting characters, and holding no card number (see
/// `tessera_api::data_checks::contains_card_number`).
pub fn reference(field: &'static str, value: &str) -> Result<(), ApiError> {
    if value.chars().count() > MAX_SHOPPER_REFERENCE_LEN || !printable(value) {
        return Err(ApiError::invalid(
            field,
            "INVALID_REFERENCE",
            "references are at most 128 characters without control or invisible formatting characters",
        ));
    }
    if contains_card_number(value) {
        return Err(ApiError::invalid(
            field,
            "INVALID_REFERENCE",
            "references must not contain a card number",
        ));
    }
    Ok(())
}

/// An idempotency key: 1 to 128 printable ASCII characters, holding no card number (it is
/// stored in clear).
pub fn idempotency_key(key: &str) -> Result<(), ApiError> {
    let invalid =
        |message: &'static str| ApiError::invalid("idempotency_key", "INVALID_IDEMPOTENCY_KEY", message);
    if key.len() > MAX_IDEMPOTENCY_KEY_LEN || !key.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(invalid(
            "idempotency_key must be 1 to 128 printable ASCII characters",
        ));
    }
    if contains_card_number(key) {
        return Err(invalid("idempotency_key must not contain a card number"));
    }
    Ok(())
}

/// A CVC is 3 or 4 digits.
pub fn cvc(cvc: &str) -> Result<(), ApiError> {
    if !cvc_valid(cvc) {
        return Err(ApiError::invalid(
            "cvc",
            "INVALID_CVC",
            "cvc must be 3 or 4 digits",
        ));
    }
    Ok(())
}

/// A shopper reference identifies a shopper to the merchant without being personal data.
pub fn shopper_reference(reference: &str) -> Result<(), ApiError> {
    if reference.is_empty() {
        return Ok(());
    }
    let invalid =
        |message: &'static str| ApiError::invalid("shopper_reference", "INVALID_SHOPPER_REFERENCE", message);
    if reference.chars().count() < 3 || reference.len() > MAX_SHOPPER_REFERENCE_LEN {
        return Err(invalid("shopper_reference must be 3 to 128 characters"));
    }
    if !printable(reference) {
        return Err(invalid(
            "shopper_reference must not hold control or invisible formatting characters",
        ));
    }
    if reference.contains('@') {
        return Err(invalid("shopper_reference must not be an e-mail address"));
    }
    let digits = reference.bytes().filter(u8::is_ascii_digit).count();
    let phone_like = reference
        .bytes()
        .all(|b| b.is_ascii_digit() || b" +-().".contains(&b));
    if contains_card_number(reference) {
        return Err(invalid("shopper_reference must not contain a card number"));
    }
    if phone_like && digits >= 7 {
        return Err(invalid("shopper_reference must not be a phone number"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const TODAY: (u32, u32) = (2026, 11);

    fn reason<T>(result: Result<T, ApiError>) -> String {
        result.err().map_or("OK".to_owned(), |e| e.reason.into_owned())
    }

    #[test]
    fn card_numbers() {
        assert_eq!(reason(card_number("4111 1111-1111 1111")), "OK");
        assert_eq!(reason(card_number("378282246310005")), "OK");
        assert_eq!(reason(card_number("4111111111111112")), "INVALID_CARD_NUMBER");
        assert_eq!(reason(card_number("4111x11111111111")), "INVALID_CARD_NUMBER");
        assert_eq!(reason(card_number("42")), "INVALID_CARD_NUMBER");
        assert_eq!(reason(card_number("41111111111111111111")), "INVALID_CARD_NUMBER");
        assert_eq!(reason(card_number("")), "MISSING_FIELD");
    }

    #[test]
    fn refusals_never_echo_the_number() {
        for bad in ["4111111111111112", "4111x11111111111", "411111111111111111111111"] {
            let err = card_number(bad).err().map(|e| e.message).unwrap_or_default();
            assert!(!err.contains("4111"), "{err}");
        }
    }

    #[test]
    fn expiries() {
        assert_eq!(reason(expiry(11, 2026, TODAY)), "OK");
        assert_eq!(reason(expiry(10, 2026, TODAY)), "CARD_EXPIRED");
        assert_eq!(reason(expiry(13, 2027, TODAY)), "INVALID_EXPIRY");
        assert_eq!(reason(expiry(1, 2047, TODAY)), "INVALID_EXPIRY");
        assert_eq!(reason(expiry(1, 27, TODAY)), "INVALID_EXPIRY");
        assert_eq!(reason(expiry(0, 0, TODAY)), "MISSING_FIELD");
    }

    #[test]
    fn shopper_references() {
        assert_eq!(reason(shopper_reference("")), "OK");
        assert_eq!(reason(shopper_reference("shopper-42")), "OK");
        assert_eq!(reason(shopper_reference("ab")), "INVALID_SHOPPER_REFERENCE");
        assert_eq!(
            reason(shopper_reference("ada@example.com")),
            "INVALID_SHOPPER_REFERENCE"
        );
        assert_eq!(
            reason(shopper_reference("+44 20 7946 0958")),
            "INVALID_SHOPPER_REFERENCE"
        );
        assert_eq!(
            reason(shopper_reference("4111111111111111")),
            "INVALID_SHOPPER_REFERENCE"
        );
    }

    #[test]
    fn idempotency_keys() {
        assert_eq!(reason(idempotency_key("order-42/attempt-1")), "OK");
        assert_eq!(reason(idempotency_key("has space")), "INVALID_IDEMPOTENCY_KEY");
        assert_eq!(
            reason(idempotency_key(&"k".repeat(129))),
            "INVALID_IDEMPOTENCY_KEY"
        );
        assert_eq!(
            reason(idempotency_key("retry-4111111111111111")),
            "INVALID_IDEMPOTENCY_KEY"
        );
    }

    /// Each free-text field refuses invisible formatting characters and card numbers with its
    /// own reason, and no refusal repeats the value.
    #[test]
    fn free_text_fields() {
        let card = |holder_name: &str| tessera_api::v1::Card {
            number: "4111111111111111".into(),
            expiry_month: 12,
            expiry_year: 2030,
            holder_name: holder_name.into(),
        };
        let account = |holder_name: &str| tessera_api::v1::BankAccount {
            iban: "DE89370400440532013000".into(),
            bic: String::new(),
            holder_name: holder_name.into(),
        };
        assert_eq!(reason(super::card(&card("Zoë O'Brien"), TODAY)), "OK");
        assert_eq!(reason(bank_account(&account("Zoë O'Brien"))), "OK");
        assert_eq!(reason(shopper_reference("shopper-000123")), "OK");
        assert_eq!(reason(reference("merchant_reference", "order-2026-000123")), "OK");
        for invisible in [
            '\u{202E}', '\u{2066}', '\u{200B}', '\u{200F}', '\u{2060}', '\u{FEFF}',
        ] {
            let text = format!("ab{invisible}c-1");
            let refusals = [
                (super::card(&card(&text), TODAY), "INVALID_HOLDER_NAME"),
                (bank_account(&account(&text)), "INVALID_BANK_ACCOUNT"),
                (shopper_reference(&text), "INVALID_SHOPPER_REFERENCE"),
                (reference("merchant_reference", &text), "INVALID_REFERENCE"),
                (reference("acquiring_agreement", &text), "INVALID_REFERENCE"),
                (idempotency_key(&text), "INVALID_IDEMPOTENCY_KEY"),
                (merchant_id(&text), "INVALID_MERCHANT_ID"),
            ];
            for (result, expected) in refusals {
                let err = result.err();
                assert_eq!(err.as_ref().map(|e| e.reason.as_ref()), Some(expected));
                let message = err.map(|e| e.message).unwrap_or_default();
                assert!(!message.contains(invisible), "{message}");
            }
        }
        let pan = "4111-1111-1111-1111";
        let text = format!("ref {pan}");
        for (result, expected) in [
            (shopper_reference(&text), "INVALID_SHOPPER_REFERENCE"),
            (reference("merchant_reference", &text), "INVALID_REFERENCE"),
            (
                idempotency_key(&text.replace(' ', "-")),
                "INVALID_IDEMPOTENCY_KEY",
            ),
            (merchant_id(&pan.replace('-', "")), "INVALID_MERCHANT_ID"),
        ] {
            let err = result.err();
            assert_eq!(err.as_ref().map(|e| e.reason.as_ref()), Some(expected));
            let message = err.map(|e| e.message).unwrap_or_default();
            assert!(!message.contains("1111"), "{message}");
        }
    }

    #[test]
    fn ids() {
        assert_eq!(reason(merchant_id("m_demo")), "OK");
        assert_eq!(reason(merchant_id("")), "MISSING_FIELD");
        assert_eq!(reason(merchant_id("m demo")), "INVALID_MERCHANT_ID");
        assert_eq!(reason(token("tok_abc234")), "OK");
        assert_eq!(reason(token("tok-abc")), "INVALID_TOKEN");
    }
}
