//! What a record can hold: a card, a bank account, or contact data used as a payment
//! credential. Each is validated and normalised into zeroizing memory before it is sealed,
//! fingerprinted or described.

use std::fmt;

use tessera_api::data_checks::{
    bic_valid, email_valid, holder_name_valid, iban_valid, normalise_iban, phone_valid,
};
use tessera_api::vault::{secret_data, BankAccount, Contact, DataFacts, SecretData};
use zeroize::Zeroizing;

use crate::card::{CardError, ValidCard};
use crate::keys::FingerprintKey;

/// Validated data to protect.
pub enum ValidData {
    Card(ValidCard),
    BankAccount {
        iban: Zeroizing<String>,
        bic: Zeroizing<String>,
        holder_name: Zeroizing<String>,
    },
    Email(Zeroizing<String>),
    Phone(Zeroizing<String>),
}

impl fmt::Debug for ValidData {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.data_type())
    }
}

/// Why data was refused. Names the field, never the value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum DataError {
    /// The card is invalid.
    Card(CardError),
    /// The IBAN fails its syntax or check digits.
    Iban,
    /// The BIC is malformed.
    Bic,
    /// The holder name is too long or holds control or invisible formatting characters.
    HolderName,
    /// The contact data is neither a valid e-mail address nor an E.164 phone number.
    Contact,
    /// No data was given.
    Missing,
}

impl fmt::Display for DataError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Card(err) => err.fmt(f),
            Self::Iban => f.write_str("iban is not a valid IBAN"),
            Self::Bic => f.write_str("bic must be 8 or 11 characters"),
            Self::HolderName => f.write_str(
                "holder_name must be at most 100 characters without control or invisible formatting characters",
            ),
            Self::Contact => f.write_str("contact must be one e-mail address or one E.164 phone number"),
            Self::Missing => f.write_str("no data to protect"),
        }
    }
}

impl std::error::Error for DataError {}

impl DataError {
    /// The `ErrorInfo` reason.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Card(err) => err.reason(),
            Self::Iban | Self::Bic | Self::HolderName => "INVALID_BANK_ACCOUNT",
            Self::Contact => "INVALID_CONTACT",
            Self::Missing => "MISSING_FIELD",
        }
    }

    /// The request field at fault.
    pub fn field(&self) -> &'static str {
        match self {
            Self::Card(err) => err.field(),
            Self::Iban => "bank_account.iban",
            Self::Bic => "bank_account.bic",
            Self::HolderName => "bank_account.holder_name",
            Self::Contact => "contact",
            Self::Missing => "data",
        }
    }
}

fn zeroizing(text: &str) -> Zeroizing<String> {
    let mut out = Zeroizing::new(String::with_capacity(text.len()));
    out.push_str(text);
    out
}

fn last_four(text: &str) -> String {
    let digits: Vec<char> = text.chars().filter(char::is_ascii_alphanumeric).collect();
    digits.iter().skip(digits.len().saturating_sub(4)).collect()
}

impl ValidData {
    /// Validates and normalises the data of a Protect item.
    pub fn from_proto(data: &SecretData, today: (u32, u32)) -> Result<ValidData, DataError> {
        match &data.data {
            Some(secret_data::Data::Card(card)) => ValidCard::from_proto(card, today)
                .map(Self::Card)
                .map_err(DataError::Card),
            Some(secret_data::Data::BankAccount(account)) => Self::bank_account(account),
            Some(secret_data::Data::Contact(contact)) => Self::contact(contact),
            None => Err(DataError::Missing),
        }
    }

    fn bank_account(account: &BankAccount) -> Result<ValidData, DataError> {
        let iban = Zeroizing::new(normalise_iban(&account.iban));
        if !iban_valid(&iban) {
            return Err(DataError::Iban);
        }
        let bic = zeroizing(account.bic.trim());
        if !bic.is_empty() && !bic_valid(&bic) {
            return Err(DataError::Bic);
        }
        // The gateway applies the same shared rule, so the two never disagree about a name.
        if !holder_name_valid(&account.holder_name) {
            return Err(DataError::HolderName);
        }
        let name = account.holder_name.trim();
        Ok(Self::BankAccount {
            iban,
            bic,
            holder_name: zeroizing(name),
        })
    }

    fn contact(contact: &Contact) -> Result<ValidData, DataError> {
        match (contact.email.trim(), contact.phone.trim()) {
            (email, "") if email_valid(email) => Ok(Self::Email(Zeroizing::new(email.to_ascii_lowercase()))),
            ("", phone) if phone_valid(phone) => Ok(Self::Phone(zeroizing(phone))),
            _ => Err(DataError::Contact),
        }
    }

    /// "card", "bank_account", "email" or "phone".
    pub fn data_type(&self) -> &'static str {
        match self {
            Self::Card(_) => "card",
            Self::BankAccount { .. } => "bank_account",
            Self::Email(_) => "email",
            Self::Phone(_) => "phone",
        }
    }

    /// The non-sensitive facts the gateway stores beside the token.
    pub fn facts(&self) -> DataFacts {
        let data_type = self.data_type().to_owned();
        match self {
            Self::Card(card) => {
                let facts = card.facts();
                DataFacts {
                    brand: facts.brand.as_str().to_owned(),
                    first_six: facts.first_six,
                    last_four: facts.last_four,
                    expiry_month: facts.expiry.month,
                    expiry_year: facts.expiry.year,
                    data_type,
                }
            }
            Self::BankAccount { iban, .. } => DataFacts {
                last_four: last_four(iban),
                data_type,
                ..DataFacts::default()
            },
            Self::Phone(phone) => DataFacts {
                last_four: last_four(phone),
                data_type,
                ..DataFacts::default()
            },
            Self::Email(_) => DataFacts {
                data_type,
                ..DataFacts::default()
            },
        }
    }

    /// The keyed fingerprint: HMAC of the normalised PAN for cards (PCI DSS 3.5.1.1), and of
    /// a type-prefixed normalised value otherwise.
    pub fn fingerprint(&self, key: &FingerprintKey) -> [u8; 32] {
        let prefixed = |prefix: &str, value: &str| {
            let mut input = Zeroizing::new(Vec::with_capacity(prefix.len() + value.len()));
            input.extend_from_slice(prefix.as_bytes());
            input.extend_from_slice(value.as_bytes());
            key.fingerprint_bytes(&input)
        };
        match self {
            Self::Card(card) => key.fingerprint(&card.pan),
            Self::BankAccount { iban, .. } => prefixed("iban:", iban),
            Self::Email(email) => prefixed("email:", email),
            Self::Phone(phone) => prefixed("phone:", phone),
        }
    }

    /// The normalised data as the message that is sealed into the record.
    pub fn to_proto(&self) -> SecretData {
        let data = match self {
            Self::Card(card) => secret_data::Data::Card(card.to_proto()),
            Self::BankAccount {
                iban,
                bic,
                holder_name,
            } => secret_data::Data::BankAccount(BankAccount {
                iban: iban.as_str().to_owned(),
                bic: bic.as_str().to_owned(),
                holder_name: holder_name.as_str().to_owned(),
            }),
            Self::Email(email) => secret_data::Data::Contact(Contact {
                email: email.as_str().to_owned(),
                phone: String::new(),
            }),
            Self::Phone(phone) => secret_data::Data::Contact(Contact {
                email: String::new(),
                phone: phone.as_str().to_owned(),
            }),
        };
        SecretData { data: Some(data) }
    }

    /// The card, for token formats that derive from it.
    pub fn card(&self) -> Option<&ValidCard> {
        match self {
            Self::Card(card) => Some(card),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn secret(data: secret_data::Data) -> SecretData {
        SecretData { data: Some(data) }
    }

    #[test]
    fn bank_accounts_and_contacts() {
        let account = secret(secret_data::Data::BankAccount(BankAccount {
            iban: "gb82 west 1234 5698 7654 32".into(),
            bic: "NWBKGB2L".into(),
            holder_name: "Ada".into(),
        }));
        let valid = ValidData::from_proto(&account, (2026, 11)).unwrap();
        assert_eq!(valid.facts().last_four, "5432");
        assert_eq!(valid.facts().data_type, "bank_account");
        let bad = secret(secret_data::Data::BankAccount(BankAccount {
            iban: "GB82WEST12345698765433".into(),
            bic: String::new(),
            holder_name: String::new(),
        }));
        assert_eq!(
            ValidData::from_proto(&bad, (2026, 11)).unwrap_err(),
            DataError::Iban
        );
        let hidden_override = secret(secret_data::Data::BankAccount(BankAccount {
            iban: "DE89370400440532013000".into(),
            bic: String::new(),
            holder_name: "Ada\u{202E} Lovelace".into(),
        }));
        let err = ValidData::from_proto(&hidden_override, (2026, 11)).unwrap_err();
        assert_eq!(
            (err, err.reason(), err.field()),
            (
                DataError::HolderName,
                "INVALID_BANK_ACCOUNT",
                "bank_account.holder_name"
            )
        );
        let email = secret(secret_data::Data::Contact(Contact {
            email: "Ada@Example.com".into(),
            phone: String::new(),
        }));
        assert_eq!(
            ValidData::from_proto(&email, (2026, 11)).unwrap().data_type(),
            "email"
        );
        let both = secret(secret_data::Data::Contact(Contact {
            email: "a@b.co".into(),
            phone: "+819012345678".into(),
        }));
        assert_eq!(
            ValidData::from_proto(&both, (2026, 11)).unwrap_err(),
            DataError::Contact
        );
        assert_eq!(
            ValidData::from_proto(&SecretData { data: None }, (2026, 11)).unwrap_err(),
            DataError::Missing
        );
    }

    #[test]
    fn debug_names_the_type_only() {
        let email = secret(secret_data::Data::Contact(Contact {
            email: "ada@example.com".into(),
            phone: String::new(),
        }));
        let valid = ValidData::from_proto(&email, (2026, 11)).unwrap();
        assert_eq!(format!("{valid:?}"), "email");
    }
}
