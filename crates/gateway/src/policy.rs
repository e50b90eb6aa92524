//! Caller policy: which certificate identities may act for which merchants, and do what.

use std::collections::{BTreeSet, HashMap};

use serde::Deserialize;

use crate::error::ApiError;

/// An operation of the public API that policy grants or withholds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Operation {
    /// Create tokens.
    Tokenize,
    /// Read token metadata and history (never card data).
    ReadMetadata,
    /// List a shopper's stored tokens (one-click).
    List,
    /// Turn a token back into card data for a cardholder-initiated payment.
    Detokenize,
    /// Turn a token back into card data for a merchant-initiated payment.
    DetokenizeMerchantInitiated,
    /// Delete tokens (and discard provisional ones).
    Delete,
    /// Extend a token's retention.
    Extend,
    /// Rotate a merchant's data key; with merchant `"*"`, re-wrap every key (KEK rotation).
    RotateKeys,
}

impl Operation {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Tokenize => "tokenize",
            Self::ReadMetadata => "read_metadata",
            Self::List => "list",
            Self::Detokenize => "detokenize",
            Self::DetokenizeMerchantInitiated => "detokenize_merchant_initiated",
            Self::Delete => "delete",
            Self::Extend => "extend",
            Self::RotateKeys => "rotate_keys",
        }
    }
}

/// One caller's grant, as written in the configuration file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CallerPolicy {
    /// The URI subject alternative name of the caller's client certificate.
    pub identity: String,
    /// Merchant ids the caller may act for; `"*"` means every merchant.
    pub merchants: BTreeSet<String>,
    pub operations: BTreeSet<Operation>,
}

impl CallerPolicy {
    pub(crate) fn check(&self) -> Result<(), String> {
        if self.identity.is_empty() {
            return Err("a caller's identity must not be empty".into());
        }
        if self.merchants.is_empty() {
            return Err(format!("caller {} has no merchants", self.identity));
        }
        Ok(())
    }

    fn allows_merchant(&self, merchant_id: &str) -> bool {
        self.merchants.contains("*") || self.merchants.contains(merchant_id)
    }
}

/// All callers' grants, looked up by certificate identity.
#[derive(Debug, Clone, Default)]
pub struct Policy {
    callers: HashMap<String, CallerPolicy>,
}

impl Policy {
    pub fn new(callers: &[CallerPolicy]) -> Self {
        Self {
            callers: callers.iter().map(|c| (c.identity.clone(), c.clone())).collect(),
        }
    }

    /// Allows `identity` to perform `operation` for `merchant_id`, or says why not.
    ///
    /// The refusal names the identity and operation but not whether the merchant has tokens,
    /// so it leaks nothing about other merchants.
    pub fn authorize(
        &self,
        identity: Option<&str>,
        operation: Operation,
        merchant_id: &str,
    ) -> Result<(), ApiError> {
        let identity = identity.ok_or_else(|| {
            ApiError::unauthenticated(
                "CALLER_UNIDENTIFIED",
                "client certificate carries no URI identity",
            )
        })?;
        let caller = self.callers.get(identity).ok_or_else(|| {
            ApiError::permission_denied(
                "CALLER_NOT_ALLOWED",
                format!("caller {identity} is not configured"),
            )
        })?;
        if !caller.operations.contains(&operation) {
            return Err(ApiError::permission_denied(
                "OPERATION_NOT_ALLOWED",
                format!("caller {identity} may not {}", operation.as_str()),
            ));
        }
        if !caller.allows_merchant(merchant_id) {
            return Err(ApiError::permission_denied(
                "MERCHANT_NOT_ALLOWED",
                format!("caller {identity} may not act for this merchant"),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> Policy {
        Policy::new(&[
            CallerPolicy {
                identity: "spiffe://t/checkout".into(),
                merchants: ["m1".to_owned()].into(),
                operations: [Operation::Tokenize, Operation::ReadMetadata].into(),
            },
            CallerPolicy {
                identity: "spiffe://t/payments".into(),
                merchants: ["*".to_owned()].into(),
                operations: [Operation::Detokenize].into(),
            },
        ])
    }

    fn reason(result: Result<(), ApiError>) -> String {
        result.err().map_or("OK".to_owned(), |e| e.reason.into_owned())
    }

    #[test]
    fn grants_and_refusals() {
        let p = policy();
        assert_eq!(
            reason(p.authorize(Some("spiffe://t/checkout"), Operation::Tokenize, "m1")),
            "OK"
        );
        assert_eq!(
            reason(p.authorize(Some("spiffe://t/checkout"), Operation::Tokenize, "m2")),
            "MERCHANT_NOT_ALLOWED"
        );
        assert_eq!(
            reason(p.authorize(Some("spiffe://t/checkout"), Operation::Detokenize, "m1")),
            "OPERATION_NOT_ALLOWED"
        );
        assert_eq!(
            reason(p.authorize(Some("spiffe://t/payments"), Operation::Detokenize, "any")),
            "OK"
        );
        assert_eq!(
            reason(p.authorize(Some("spiffe://t/other"), Operation::Tokenize, "m1")),
            "CALLER_NOT_ALLOWED"
        );
        assert_eq!(
            reason(p.authorize(None, Operation::Tokenize, "m1")),
            "CALLER_UNIDENTIFIED"
        );
    }
}
