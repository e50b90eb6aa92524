//! What the core needs of the audit log: a call's records are built here as one batch, and a
//! sink (the vault process's hash-chained, signed log file, `crates/vault/src/audit.rs`) writes
//! them before the call's result is handed out.

use std::fmt;

use tessera_api::audit_format::push_value;

/// Where a call's audit records go. Implemented by the vault process's log file.
pub trait AuditSink: Send + Sync + fmt::Debug {
    /// Whether card-data operations may proceed (cheap; checked before any work is done).
    fn check(&self) -> Result<(), AuditUnavailable>;
    /// Starts the records of one call made by `caller`.
    fn batch(&self, caller: &str) -> AuditBatch;
    /// Writes a call's records. An error means they are not in the log: the caller must not
    /// hand out the operation's result.
    fn append(&self, batch: &AuditBatch) -> Result<(), AuditUnavailable>;
}

/// The log is unavailable; the reason is in the vault's log and in Status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AuditUnavailable;

/// The lines of one call, built before the log's lock is taken.
#[derive(Debug)]
pub struct AuditBatch {
    enabled: bool,
    prefix: String,
    text: String,
    ends: Vec<usize>,
}

impl AuditBatch {
    /// An empty batch whose records each start with `prefix` (time and caller); a disabled log
    /// gets a batch that records nothing.
    pub fn new(enabled: bool, prefix: String) -> AuditBatch {
        AuditBatch {
            enabled,
            prefix,
            text: String::new(),
            ends: Vec::new(),
        }
    }

    /// Whether records are kept at all.
    pub fn is_enabled(&self) -> bool {
        self.enabled
    }

    /// The records, in order, each without its line end.
    pub fn lines(&self) -> impl Iterator<Item = &str> {
        let starts = std::iter::once(0).chain(self.ends.iter().copied());
        starts
            .zip(&self.ends)
            .map(|(start, &end)| self.text.get(start..end).unwrap_or_default())
    }

    /// Bytes of record text, to size the write buffer.
    pub fn text_len(&self) -> usize {
        self.text.len()
    }

    /// Adds one record. `fields` with an empty value are left out. Values must never be card
    /// data, CVCs, keys or shares; they are percent-encoded here.
    pub fn record(&mut self, event: &str, result: &str, fields: &[(&str, &str)]) {
        if !self.enabled {
            return;
        }
        self.text.push_str(&self.prefix);
        self.text.push_str(" event=");
        push_value(&mut self.text, event);
        self.text.push_str(" result=");
        push_value(&mut self.text, result);
        for (key, value) in fields.iter().filter(|(_, value)| !value.is_empty()) {
            self.text.push(' ');
            self.text.push_str(key);
            self.text.push('=');
            push_value(&mut self.text, value);
        }
        self.ends.push(self.text.len());
    }

    /// Records added so far.
    pub fn len(&self) -> usize {
        self.ends.len()
    }

    /// True when no record was added.
    pub fn is_empty(&self) -> bool {
        self.ends.is_empty()
    }
}
