//! Request builders for the public API, so each test states only what it is about.

use tessera_api::v1::{
    detokenize_response, tokenize_request, Card, DetokenizeRequest, DetokenizeResponse, Initiator, Purpose,
    RecurringModel, ShopperInteraction, TokenizeRequest,
};

pub const SHOPPER: &str = "shopper-1";

pub fn card(number: &str) -> Card {
    Card {
        number: number.into(),
        expiry_month: 12,
        expiry_year: 2031,
        holder_name: "Ada Lovelace".into(),
    }
}

/// A card-on-file tokenize for `merchant` and [`SHOPPER`].
pub fn tokenize_card(merchant: &str, number: &str) -> TokenizeRequest {
    TokenizeRequest {
        merchant_id: merchant.into(),
        data: Some(tokenize_request::Data::Card(card(number))),
        shopper_reference: SHOPPER.into(),
        ..Default::default()
    }
}

pub fn purpose(initiator: Initiator, model: RecurringModel, interaction: ShopperInteraction) -> Purpose {
    Purpose {
        initiator: initiator as i32,
        recurring_model: model as i32,
        shopper_interaction: interaction as i32,
    }
}

/// A cardholder's one-click payment with a stored card.
pub fn one_click() -> Purpose {
    purpose(
        Initiator::Cardholder,
        RecurringModel::CardOnFile,
        ShopperInteraction::Ecommerce,
    )
}

/// A merchant-initiated unscheduled card-on-file payment.
pub fn unscheduled() -> Purpose {
    purpose(
        Initiator::Merchant,
        RecurringModel::UnscheduledCardOnFile,
        ShopperInteraction::ContinuedAuthority,
    )
}

/// A merchant-initiated subscription payment.
pub fn subscription() -> Purpose {
    purpose(
        Initiator::Merchant,
        RecurringModel::Subscription,
        ShopperInteraction::ContinuedAuthority,
    )
}

/// A cardholder-initiated one-off payment.
pub fn one_off() -> Purpose {
    purpose(
        Initiator::Cardholder,
        RecurringModel::Unspecified,
        ShopperInteraction::Ecommerce,
    )
}

/// A one-click detokenize of `token` for `merchant` and [`SHOPPER`].
pub fn detokenize(merchant: &str, token: &str) -> DetokenizeRequest {
    detokenize_for(merchant, token, one_click())
}

pub fn detokenize_for(merchant: &str, token: &str, purpose: Purpose) -> DetokenizeRequest {
    DetokenizeRequest {
        merchant_id: merchant.into(),
        token: token.into(),
        purpose: Some(purpose),
        shopper_reference: SHOPPER.into(),
        cvc_token: String::new(),
        acquiring_agreement: String::new(),
    }
}

/// The card number a detokenize returned.
pub fn revealed_number(response: &DetokenizeResponse) -> String {
    match &response.data {
        Some(detokenize_response::Data::Card(card)) => card.number.clone(),
        other => panic!(
            "expected a card, got {}",
            if other.is_some() { "other data" } else { "nothing" }
        ),
    }
}

/// The card a detokenize returned.
pub fn revealed_card(response: &DetokenizeResponse) -> &Card {
    match &response.data {
        Some(detokenize_response::Data::Card(card)) => card,
        _ => panic!("expected a card"),
    }
}
