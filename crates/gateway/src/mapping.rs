//! Mapping between stored records, the public API's messages and the vault's messages: a
//! record's public metadata, stored text to API enums, and card data moved (never copied)
//! between the public and the vault messages.

use tessera_api::v1::{
    detokenize_response, tokenize_request, BankAccount, Card, CardBrand, Contact, DataType, Token,
    TokenFormat, TokenStatus, TransactionType,
};
use tessera_api::vault::{self, secret_data, SecretData};

use crate::clock::UnixMillis;
use crate::error::ApiError;
use crate::storage::{self, JournalKind, TokenRecord};
use crate::validate;

/// The stored format of a requested one (unspecified means opaque).
pub(crate) fn stored_format(format: TokenFormat) -> storage::TokenFormat {
    match format {
        TokenFormat::FormatPreserving => storage::TokenFormat::FormatPreserving,
        TokenFormat::Opaque | TokenFormat::Unspecified => storage::TokenFormat::Opaque,
    }
}

/// The data type the vault named for protected data. The vault and the gateway share these
/// names; one the gateway does not know is refused rather than stored.
pub(crate) fn stored_data_type(named: &str) -> Result<storage::DataType, ApiError> {
    storage::DataType::parse(named).map_err(|_| {
        tracing::error!(data_type = named, "the vault named an unknown data type");
        ApiError::internal("VAULT_ERROR", "the vault answered with an unknown data type")
    })
}

pub(crate) fn timestamp(ms: UnixMillis) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: ms.div_euclid(1000),
        nanos: i32::try_from(ms.rem_euclid(1000) * 1_000_000).unwrap_or(0),
    }
}

pub(crate) fn status_of(record: &TokenRecord) -> TokenStatus {
    match record.status {
        storage::TokenStatus::Provisional => TokenStatus::Provisional,
        storage::TokenStatus::Active => TokenStatus::Active,
        storage::TokenStatus::Deleted => TokenStatus::Deleted,
        storage::TokenStatus::Expired => TokenStatus::Expired,
        storage::TokenStatus::Consumed => TokenStatus::Consumed,
    }
}

pub(crate) fn data_type_of(stored: storage::DataType) -> DataType {
    match stored {
        storage::DataType::Card => DataType::Card,
        storage::DataType::BankAccount => DataType::BankAccount,
        storage::DataType::Email => DataType::Email,
        storage::DataType::Phone => DataType::Phone,
        storage::DataType::Cvc => DataType::Cvc,
    }
}

/// A stored brand ("VISA"); no brand at all for data that is not a card.
pub(crate) fn brand_of(stored: &str) -> CardBrand {
    if stored.is_empty() {
        CardBrand::Unspecified
    } else {
        CardBrand::from_str_name(&format!("CARD_BRAND_{stored}")).unwrap_or(CardBrand::Unknown)
    }
}

/// The public metadata of a record.
pub(crate) fn token_message(record: &TokenRecord) -> Token {
    let brand = brand_of(&record.brand);
    let format = match record.format {
        storage::TokenFormat::FormatPreserving => TokenFormat::FormatPreserving,
        storage::TokenFormat::Opaque => TokenFormat::Opaque,
    };
    Token {
        token: record.token.clone(),
        merchant_id: record.merchant_id.clone(),
        brand: brand as i32,
        first_six: record.first_six.clone(),
        last_four: record.last_four.clone(),
        expiry_month: record.expiry_month,
        expiry_year: record.expiry_year,
        status: status_of(record) as i32,
        created_at: Some(timestamp(record.created_at)),
        format: format as i32,
        shopper_reference: record.shopper_reference.clone(),
        kind: record.kind.to_proto() as i32,
        data_type: data_type_of(record.data_type) as i32,
        last_used_at: record.last_used_at.map(timestamp),
        retain_until: Some(timestamp(record.retain_until)),
        expires_at: record.expires_at.map(timestamp),
        retention_extended_months: record.retention_extended_months,
        blocks: Vec::new(),
    }
}

/// Moves card data from the public message into the vault message without copying it.
pub(crate) fn vault_card(card: &mut Card) -> vault::Card {
    vault::Card {
        number: std::mem::take(&mut card.number),
        expiry_month: card.expiry_month,
        expiry_year: card.expiry_year,
        holder_name: std::mem::take(&mut card.holder_name),
    }
}

/// Validates the data of a tokenize and moves it into the vault's message.
pub(crate) fn secret_data(
    data: Option<tokenize_request::Data>,
    today: (u32, u32),
) -> Result<Option<SecretData>, ApiError> {
    let data = match data {
        Some(tokenize_request::Data::Card(mut card)) => {
            validate::card(&card, today)?;
            secret_data::Data::Card(vault_card(&mut card))
        }
        Some(tokenize_request::Data::BankAccount(mut account)) => {
            validate::bank_account(&account)?;
            secret_data::Data::BankAccount(vault::BankAccount {
                iban: std::mem::take(&mut account.iban),
                bic: std::mem::take(&mut account.bic),
                holder_name: std::mem::take(&mut account.holder_name),
            })
        }
        Some(tokenize_request::Data::Contact(mut contact)) => {
            validate::contact(&contact)?;
            secret_data::Data::Contact(vault::Contact {
                email: std::mem::take(&mut contact.email),
                phone: std::mem::take(&mut contact.phone),
            })
        }
        None => return Ok(None),
    };
    Ok(Some(SecretData { data: Some(data) }))
}

/// Moves revealed data into the public response's oneof without copying it.
pub(crate) fn public_data(revealed: &mut vault::Revealed) -> Option<detokenize_response::Data> {
    match revealed.data.as_mut().and_then(|data| data.data.as_mut())? {
        secret_data::Data::Card(card) => Some(detokenize_response::Data::Card(Card {
            number: std::mem::take(&mut card.number),
            expiry_month: card.expiry_month,
            expiry_year: card.expiry_year,
            holder_name: std::mem::take(&mut card.holder_name),
        })),
        secret_data::Data::BankAccount(account) => {
            Some(detokenize_response::Data::BankAccount(BankAccount {
                iban: std::mem::take(&mut account.iban),
                bic: std::mem::take(&mut account.bic),
                holder_name: std::mem::take(&mut account.holder_name),
            }))
        }
        secret_data::Data::Contact(contact) => Some(detokenize_response::Data::Contact(Contact {
            email: std::mem::take(&mut contact.email),
            phone: std::mem::take(&mut contact.phone),
        })),
    }
}

pub(crate) fn transaction_type(kind: JournalKind) -> TransactionType {
    match kind {
        JournalKind::Tokenize => TransactionType::Tokenize,
        JournalKind::Detokenize => TransactionType::Detokenize,
        JournalKind::Delete => TransactionType::Delete,
        JournalKind::Confirm => TransactionType::Confirm,
        JournalKind::Extend => TransactionType::Extend,
        JournalKind::Expire => TransactionType::Expire,
        JournalKind::Authorization => TransactionType::Authorization,
        JournalKind::Block => TransactionType::Block,
        JournalKind::Unblock => TransactionType::Unblock,
    }
}
