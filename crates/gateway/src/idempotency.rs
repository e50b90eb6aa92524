//! Idempotency keys and strict merchant references: duplicate protection for payment services
//! that double-submit under failure.
//!
//! A key belongs to a merchant and a caller. The first request with a key claims it (one
//! conditional insert, atomic across gateways sharing the database), runs, and stores its
//! answer; a repeat within 24 hours with the same request gets that answer back; a repeat
//! while the first is still running waits for it (bounded) and is otherwise refused with
//! ABORTED; the same key with a different request is refused. "The same request" is judged by
//! a SHA-256 of the request's non-secret fields (card facts such as first six, last four and
//! expiry stand in for the card number, which is never hashed in the clear). A refused or
//! failed first request releases its key, so nothing is stored for bad input and a retry after
//! a transient failure runs again. The statements are in `crate::storage` (`idempotency.rs`
//! there); this module holds the rules, the request hashes and the wrapper a handler runs in.
//!
//! A merchant reference is taken only by a request that succeeds: the write queue claims it
//! (`storage::records::claim_reference`) in the transaction that stores what the request made
//! (its token, or its authorisation outcome), so a request that fails before (vault unavailable,
//! refused input, no free token) leaves it free for the retry, and of two concurrent requests
//! with one strict reference exactly one succeeds.

use prost::Message;
use ring::digest::{digest, SHA256};
use tessera_api::v1::{
    tokenize_request, ConfirmTokenRequest, DeleteTokenRequest, ExtendRetentionRequest,
    ReportAuthorizationRequest, TokenizeRequest,
};

use crate::clock::UnixMillis;
use crate::error::ApiError;
use crate::storage::{Begin, Store};

pub use crate::storage::MerchantReference;

/// SHA-256 over the request's non-secret parts, each length-prefixed so fields cannot run
/// into each other.
pub fn request_hash(parts: &[&[u8]]) -> Vec<u8> {
    let mut input = Vec::new();
    for part in parts {
        input.extend_from_slice(&(part.len() as u64).to_be_bytes());
        input.extend_from_slice(part);
    }
    digest(&SHA256, &input).as_ref().to_vec()
}

/// Runs `work` under an idempotency key (or plainly when `key` is empty): the first answer is
/// stored and replayed to repeats.
pub async fn run<T, F>(
    store: &Store,
    scope: (&str, &str),
    key: &str,
    method: &str,
    hash: Vec<u8>,
    now: UnixMillis,
    work: F,
) -> Result<T, ApiError>
where
    T: Message + Default,
    F: std::future::Future<Output = Result<T, ApiError>>,
{
    if key.is_empty() {
        return work.await;
    }
    crate::validate::idempotency_key(key)?;
    let (merchant_id, caller) = scope;
    match store
        .begin_idempotent(merchant_id, caller, key, method, &hash, now)
        .await?
    {
        Begin::Replay(bytes) => T::decode(bytes.as_slice()).map_err(|_| {
            ApiError::internal("IDEMPOTENCY_REPLAY_FAILED", "the stored answer could not be read")
        }),
        Begin::Run(claim) => {
            let result = work.await;
            let stored = result.as_ref().ok().map(Message::encode_to_vec);
            if let Err(err) = store.finish_idempotent(&claim, stored).await {
                tracing::error!(error = %err, "could not finish an idempotency key");
            }
            result
        }
    }
}

/// A mutating request that may carry an idempotency key: its method name, its merchant, and
/// a hash of its non-secret fields that tells a repeat from a different request.
pub(crate) trait IdempotentRequest: prost::Message + Send + 'static {
    const METHOD: &'static str;
    fn take_key(&mut self) -> String;
    fn merchant_id(&self) -> &str;
    fn hash(&self) -> Vec<u8>;
}

impl IdempotentRequest for TokenizeRequest {
    const METHOD: &'static str = "Tokenize";

    fn take_key(&mut self) -> String {
        std::mem::take(&mut self.idempotency_key)
    }

    fn merchant_id(&self) -> &str {
        &self.merchant_id
    }

    /// Every field but the secret data, which is represented by the facts PCI DSS allows to
    /// be kept (first six, last four, length, expiry), so no card number is ever hashed in the
    /// clear.
    fn hash(&self) -> Vec<u8> {
        let digits = |text: &str| text.chars().filter(char::is_ascii_digit).collect::<String>();
        let edges = |text: &str| {
            let chars: Vec<char> = text.chars().collect();
            let head: String = chars.iter().take(6).collect();
            let tail: String = chars.iter().skip(chars.len().saturating_sub(4)).collect();
            format!("{head}|{tail}|{}", chars.len())
        };
        let facts = match &self.data {
            Some(tokenize_request::Data::Card(card)) => {
                format!(
                    "card|{}|{}|{}",
                    edges(&digits(&card.number)),
                    card.expiry_month,
                    card.expiry_year
                )
            }
            Some(tokenize_request::Data::BankAccount(account)) => {
                let iban: String = account.iban.chars().filter(|c| !c.is_whitespace()).collect();
                format!("bank|{}|{}", edges(&iban), account.bic)
            }
            Some(tokenize_request::Data::Contact(contact)) => {
                format!("contact|{}|{}", edges(&contact.email), edges(&contact.phone))
            }
            None => "none".to_owned(),
        };
        request_hash(&[
            Self::METHOD.as_bytes(),
            self.merchant_id.as_bytes(),
            facts.as_bytes(),
            &self.format.to_be_bytes(),
            self.shopper_reference.as_bytes(),
            &[
                u8::from(self.deduplicate),
                u8::from(self.provisional),
                u8::from(!self.cvc.is_empty()),
            ],
            &self.kind.to_be_bytes(),
            self.merchant_reference.as_bytes(),
            &[u8::from(self.strict_merchant_reference)],
        ])
    }
}

/// Implements [`IdempotentRequest`] for a request whose hash covers the listed fields.
macro_rules! idempotent_request {
    ($type:ty, $method:literal, |$request:ident| [$($part:expr),* $(,)?]) => {
        impl IdempotentRequest for $type {
            const METHOD: &'static str = $method;

            fn take_key(&mut self) -> String {
                std::mem::take(&mut self.idempotency_key)
            }

            fn merchant_id(&self) -> &str {
                &self.merchant_id
            }

            fn hash(&self) -> Vec<u8> {
                let $request = self;
                request_hash(&[Self::METHOD.as_bytes(), $request.merchant_id.as_bytes(), $($part),*])
            }
        }
    };
}

idempotent_request!(DeleteTokenRequest, "DeleteToken", |r| [r.token.as_bytes()]);
idempotent_request!(ConfirmTokenRequest, "ConfirmToken", |r| [
    r.token.as_bytes(),
    r.payment_reference.as_bytes()
]);
idempotent_request!(ExtendRetentionRequest, "ExtendRetention", |r| [
    r.token.as_bytes(),
    &r.months.to_be_bytes()
]);
idempotent_request!(ReportAuthorizationRequest, "ReportAuthorization", |r| [
    r.token.as_bytes(),
    &r.outcome.to_be_bytes(),
    r.acquiring_agreement.as_bytes(),
    r.merchant_reference.as_bytes(),
    &[u8::from(r.strict_merchant_reference)],
]);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_separate_fields() {
        assert_ne!(request_hash(&[b"ab", b"c"]), request_hash(&[b"a", b"bc"]));
        assert_eq!(request_hash(&[b"x"]).len(), 32);
    }
}
