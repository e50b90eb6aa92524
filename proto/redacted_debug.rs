//! `Debug` for the generated messages that carry card data, bank data, contact data or a CVC:
//! the type name and nothing else, so a stray `{:?}` in a log line or panic can never print
//! them.

use std::fmt;

macro_rules! redacted_debug {
    ($($name:literal => $type:ty),* $(,)?) => {
        $(
            impl fmt::Debug for $type {
                fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                    f.debug_struct($name).finish_non_exhaustive()
                }
            }
        )*
    };
}

redacted_debug! {
    "Card" => crate::v1::Card,
    "BankAccount" => crate::v1::BankAccount,
    "Contact" => crate::v1::Contact,
    "TokenizeRequest" => crate::v1::TokenizeRequest,
    "DetokenizeResponse" => crate::v1::DetokenizeResponse,
    "Card" => crate::vault::Card,
    "BankAccount" => crate::vault::BankAccount,
    "Contact" => crate::vault::Contact,
    "SecretData" => crate::vault::SecretData,
    "ProtectItem" => crate::vault::ProtectItem,
    "Revealed" => crate::vault::Revealed,
    "InitResponse" => crate::vault::InitResponse,
    "UnsealRequest" => crate::vault::UnsealRequest,
}

#[cfg(test)]
mod tests {
    use crate::v1::{tokenize_request, Card, TokenizeRequest};

    fn card() -> Card {
        Card {
            number: "4111111111111111".into(),
            expiry_month: 12,
            expiry_year: 2031,
            holder_name: "Ada Lovelace".into(),
        }
    }

    #[test]
    fn debug_prints_no_card_data() {
        let request = TokenizeRequest {
            merchant_id: "m1".into(),
            data: Some(tokenize_request::Data::Card(card())),
            cvc: "737".into(),
            ..Default::default()
        };
        let card = card();
        for printed in [
            format!("{card:?}"),
            format!("{request:?}"),
            format!("{request:#?}"),
        ] {
            assert!(!printed.contains("4111"), "{printed}");
            assert!(!printed.contains("Ada"), "{printed}");
            assert!(!printed.contains("737"), "{printed}");
        }
        let vault_card = crate::vault::Card {
            number: "5555555555554444".into(),
            expiry_month: 1,
            expiry_year: 2030,
            holder_name: String::new(),
        };
        let item = crate::vault::ProtectItem {
            merchant_id: "m1".into(),
            data: Some(crate::vault::SecretData {
                data: Some(crate::vault::secret_data::Data::Card(vault_card.clone())),
            }),
            format: 0,
            cvc: "1234".into(),
        };
        let batch = crate::vault::ProtectRequest {
            keys: vec![],
            items: vec![item],
        };
        for printed in [format!("{vault_card:?}"), format!("{batch:?}")] {
            assert!(
                !printed.contains("5555") && !printed.contains("1234"),
                "{printed}"
            );
        }
    }
}
