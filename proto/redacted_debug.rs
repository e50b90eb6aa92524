//! `Debug` for the generated messages that carry card data: field names only, no values, so a
//! stray `{:?}` in a log line or panic can never print a card number or holder name.

use std::fmt;

impl fmt::Debug for crate::v1::Card {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Card").finish_non_exhaustive()
    }
}

impl fmt::Debug for crate::vault::Card {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Card").finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn debug_prints_no_card_data() {
        let card = crate::v1::Card {
            number: "4111111111111111".into(),
            expiry_month: 12,
            expiry_year: 2031,
            holder_name: "Ada Lovelace".into(),
        };
        let request = crate::v1::TokenizeRequest {
            card: Some(card.clone()),
            ..Default::default()
        };
        for printed in [
            format!("{card:?}"),
            format!("{request:?}"),
            format!("{request:#?}"),
        ] {
            assert!(!printed.contains("4111"), "{printed}");
            assert!(!printed.contains("Ada"), "{printed}");
        }
        let vault_card = crate::vault::Card {
            number: "5555555555554444".into(),
            expiry_month: 1,
            expiry_year: 2030,
            holder_name: String::new(),
        };
        assert!(!format!("{vault_card:?}").contains("5555"));
    }
}
