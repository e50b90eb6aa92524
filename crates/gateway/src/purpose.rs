//! Which payment purposes each token kind allows. The rules come from the card schemes'
//! credential-on-file framework as payment providers document it: a card-on-file token serves
//! cardholder one-click payments and, for callers allowed to, merchant-initiated unscheduled
//! ones; a recurrence token serves merchant-initiated subscription payments only; a
//! single-use token serves one cardholder-initiated payment.

use tessera_api::v1::{Initiator, Purpose, RecurringModel, ShopperInteraction, TokenKind};

use crate::error::ApiError;

/// A token kind as stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    CardOnFile,
    Recurrence,
    SingleUse,
}

impl Kind {
    pub fn from_proto(kind: i32) -> Result<Self, ApiError> {
        match TokenKind::try_from(kind) {
            Ok(TokenKind::Unspecified | TokenKind::CardOnFile) => Ok(Self::CardOnFile),
            Ok(TokenKind::Recurrence) => Ok(Self::Recurrence),
            Ok(TokenKind::SingleUse) => Ok(Self::SingleUse),
            Err(_) => Err(ApiError::invalid(
                "kind",
                "INVALID_KIND",
                "kind is not a known TokenKind",
            )),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::CardOnFile => "card_on_file",
            Self::Recurrence => "recurrence",
            Self::SingleUse => "single_use",
        }
    }

    /// The kind of stored text; `None` for text that names none.
    pub fn from_stored(stored: &str) -> Option<Self> {
        match stored {
            "card_on_file" => Some(Self::CardOnFile),
            "recurrence" => Some(Self::Recurrence),
            "single_use" => Some(Self::SingleUse),
            _ => None,
        }
    }

    pub fn to_proto(self) -> TokenKind {
        match self {
            Self::CardOnFile => TokenKind::CardOnFile,
            Self::Recurrence => TokenKind::Recurrence,
            Self::SingleUse => TokenKind::SingleUse,
        }
    }
}

/// A purpose that is complete and self-consistent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CheckedPurpose {
    pub initiator: Initiator,
    pub model: RecurringModel,
    pub interaction: ShopperInteraction,
}

impl CheckedPurpose {
    /// Merchant-initiated payments need their own permission.
    pub fn merchant_initiated(self) -> bool {
        self.initiator == Initiator::Merchant
    }

    /// The journal's text form, e.g. `CARDHOLDER/CARD_ON_FILE/ECOMMERCE`.
    pub fn journal_text(self) -> String {
        let strip = |name: &str, prefix: &str| name.strip_prefix(prefix).unwrap_or(name).to_owned();
        format!(
            "{}/{}/{}",
            strip(self.initiator.as_str_name(), "INITIATOR_"),
            strip(self.model.as_str_name(), "RECURRING_MODEL_"),
            strip(self.interaction.as_str_name(), "SHOPPER_INTERACTION_"),
        )
    }

    /// Parses [`Self::journal_text`] back into the API message.
    pub fn from_journal_text(text: &str) -> Option<Purpose> {
        let mut parts = text.split('/');
        let (initiator, model, interaction) = (parts.next()?, parts.next()?, parts.next()?);
        Some(Purpose {
            initiator: Initiator::from_str_name(&format!("INITIATOR_{initiator}"))? as i32,
            recurring_model: RecurringModel::from_str_name(&format!("RECURRING_MODEL_{model}"))? as i32,
            shopper_interaction: ShopperInteraction::from_str_name(&format!(
                "SHOPPER_INTERACTION_{interaction}"
            ))? as i32,
        })
    }
}

/// Checks that a detokenize states a complete, self-consistent purpose.
pub fn check_purpose(purpose: Option<&Purpose>) -> Result<CheckedPurpose, ApiError> {
    let purpose = purpose.ok_or_else(|| ApiError::missing("purpose"))?;
    let initiator = Initiator::try_from(purpose.initiator).unwrap_or(Initiator::Unspecified);
    let model = RecurringModel::try_from(purpose.recurring_model).map_err(|_| {
        ApiError::invalid(
            "purpose.recurring_model",
            "INVALID_PURPOSE",
            "unknown recurring_model",
        )
    })?;
    let interaction =
        ShopperInteraction::try_from(purpose.shopper_interaction).unwrap_or(ShopperInteraction::Unspecified);
    if initiator == Initiator::Unspecified {
        return Err(ApiError::missing("purpose.initiator"));
    }
    if interaction == ShopperInteraction::Unspecified {
        return Err(ApiError::missing("purpose.shopper_interaction"));
    }
    // The cardholder is present in e-commerce; a merchant acts on continued authority.
    let consistent = match initiator {
        Initiator::Cardholder => {
            interaction == ShopperInteraction::Ecommerce
                && !matches!(model, RecurringModel::UnscheduledCardOnFile)
        }
        Initiator::Merchant => {
            interaction == ShopperInteraction::ContinuedAuthority
                && matches!(
                    model,
                    RecurringModel::UnscheduledCardOnFile | RecurringModel::Subscription
                )
        }
        Initiator::Unspecified => false,
    };
    if !consistent {
        return Err(ApiError::invalid(
            "purpose",
            "INCONSISTENT_PURPOSE",
            "a cardholder-initiated payment is e-commerce (not unscheduled); a merchant-initiated one is \
             continued authority, unscheduled card-on-file or subscription",
        ));
    }
    Ok(CheckedPurpose {
        initiator,
        model,
        interaction,
    })
}

/// Whether a token of `kind` may be used for `purpose`.
pub fn allows(kind: Kind, purpose: CheckedPurpose) -> bool {
    match kind {
        Kind::CardOnFile => matches!(
            (purpose.initiator, purpose.model),
            (Initiator::Cardholder, RecurringModel::CardOnFile)
                | (Initiator::Merchant, RecurringModel::UnscheduledCardOnFile)
        ),
        Kind::Recurrence => {
            (purpose.initiator, purpose.model) == (Initiator::Merchant, RecurringModel::Subscription)
        }
        Kind::SingleUse => {
            purpose.initiator == Initiator::Cardholder
                && matches!(
                    purpose.model,
                    RecurringModel::Unspecified | RecurringModel::CardOnFile
                )
        }
    }
}

/// Refuses a purpose the kind does not allow, with a reason a program can branch on.
pub fn check_kind(kind: Kind, purpose: CheckedPurpose) -> Result<(), ApiError> {
    if allows(kind, purpose) {
        return Ok(());
    }
    Err(ApiError::new(
        tonic::Code::FailedPrecondition,
        "PURPOSE_NOT_ALLOWED",
        format!(
            "a {} token may not be used for {}",
            kind.as_str(),
            purpose.journal_text()
        ),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn purpose(initiator: Initiator, model: RecurringModel, interaction: ShopperInteraction) -> Purpose {
        Purpose {
            initiator: initiator as i32,
            recurring_model: model as i32,
            shopper_interaction: interaction as i32,
        }
    }

    #[test]
    fn inconsistent_purposes_are_invalid() {
        use Initiator::*;
        use RecurringModel as M;
        use ShopperInteraction as S;
        for (p, ok) in [
            (purpose(Cardholder, M::CardOnFile, S::Ecommerce), true),
            (purpose(Cardholder, M::Unspecified, S::Ecommerce), true),
            (purpose(Cardholder, M::Subscription, S::Ecommerce), true),
            (purpose(Cardholder, M::CardOnFile, S::ContinuedAuthority), false),
            (purpose(Cardholder, M::UnscheduledCardOnFile, S::Ecommerce), false),
            (
                purpose(Merchant, M::UnscheduledCardOnFile, S::ContinuedAuthority),
                true,
            ),
            (purpose(Merchant, M::Subscription, S::ContinuedAuthority), true),
            (purpose(Merchant, M::CardOnFile, S::ContinuedAuthority), false),
            (purpose(Merchant, M::Subscription, S::Ecommerce), false),
            (purpose(Unspecified, M::CardOnFile, S::Ecommerce), false),
        ] {
            assert_eq!(check_purpose(Some(&p)).is_ok(), ok, "{p:?}");
        }
        assert!(check_purpose(None).is_err());
    }

    #[test]
    fn journal_text_round_trips() {
        let p = purpose(
            Initiator::Merchant,
            RecurringModel::Subscription,
            ShopperInteraction::ContinuedAuthority,
        );
        let checked = check_purpose(Some(&p)).map_err(|e| e.reason.into_owned());
        assert_eq!(
            checked.map(CheckedPurpose::journal_text),
            Ok("MERCHANT/SUBSCRIPTION/CONTINUED_AUTHORITY".into())
        );
        assert_eq!(
            CheckedPurpose::from_journal_text("MERCHANT/SUBSCRIPTION/CONTINUED_AUTHORITY"),
            Some(p)
        );
    }
}
