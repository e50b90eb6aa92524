//! The retry guard: card schemes penalise merchants that retry declined cards too often, so
//! Tessera counts failed authorisations per merchant, acquiring agreement and card (by keyed
//! fingerprint, so every token of the same card counts together) and blocks merchant-initiated
//! use of a card that reached its scheme's limit or got a "do not retry" answer. Cardholder-
//! initiated use is never blocked: the cardholder is there to fix the problem.

use serde::Deserialize;

use crate::clock::UnixMillis;

/// A scheme's limit: at most `limit` failed attempts in `window_hours`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetryRule {
    pub limit: u32,
    pub window_hours: u32,
}

/// Retry-guard configuration; the defaults are the schemes' published rules.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetryGuardConfig {
    /// Mastercard: 10 failed attempts in 24 hours.
    pub mastercard: RetryRule,
    /// Visa: 15 failed attempts in 30 days.
    pub visa: RetryRule,
    /// How long a "do not retry" answer blocks the card.
    pub do_not_retry_block_hours: u32,
}

impl Default for RetryGuardConfig {
    fn default() -> Self {
        Self {
            mastercard: RetryRule {
                limit: 10,
                window_hours: 24,
            },
            visa: RetryRule {
                limit: 15,
                window_hours: 30 * 24,
            },
            do_not_retry_block_hours: 30 * 24,
        }
    }
}

impl RetryGuardConfig {
    /// The rule for a card brand (as stored, e.g. "VISA"); other brands have no attempt limit.
    pub fn rule(&self, brand: &str) -> Option<RetryRule> {
        match brand {
            "MASTERCARD" => Some(self.mastercard),
            "VISA" => Some(self.visa),
            _ => None,
        }
    }
}

/// A reported outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Approved,
    Declined,
    DoNotRetry,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Approved => "approved",
            Self::Declined => "declined",
            Self::DoNotRetry => "do_not_retry",
        }
    }
}

/// One report, as the writer applies it.
#[derive(Debug, Clone)]
pub struct Report {
    pub merchant_id: String,
    pub agreement: String,
    pub fingerprint: Vec<u8>,
    pub token: String,
    pub outcome: Outcome,
    pub at: UnixMillis,
    pub caller: String,
    pub rule: Option<RetryRule>,
    pub do_not_retry_ms: i64,
}

/// A block on merchant-initiated use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Block {
    pub agreement: String,
    /// RETRY_LIMIT or DO_NOT_RETRY.
    pub reason: String,
    pub until: UnixMillis,
}

/// The card's state after a report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReportState {
    pub failed_attempts: u32,
    pub limit: u32,
    pub block: Option<Block>,
}
