//! The records storage reads and writes (tokens, journal entries, wrapped keys), their row
//! decoding, and the statements one transaction runs for them, shared by the store's reads and
//! the write queue.

use std::fmt;

use sqlx::any::AnyRow;
use sqlx::Row;

use crate::clock::UnixMillis;
use crate::error::ApiError;
use crate::purpose::Kind;

/// How long a first answer is replayed.
pub(crate) const REPLAY_WINDOW_MS: i64 = 24 * 3_600_000;

/// A storage failure. Messages name tables and operations, never card data.
#[derive(Debug)]
#[non_exhaustive]
pub enum StoreError {
    /// The row to insert already exists (same merchant and token).
    Duplicate,
    /// The write's strict merchant reference was seen in the last 24 hours; nothing was
    /// written.
    ReferenceTaken,
    /// The database could not be opened or migrated.
    Open(String),
    /// A query failed.
    Query(String),
}

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Duplicate => f.write_str("row already exists"),
            Self::ReferenceTaken => f.write_str("the merchant reference was seen in the last 24 hours"),
            Self::Open(why) => write!(f, "cannot open the database: {why}"),
            Self::Query(why) => write!(f, "database query failed: {why}"),
        }
    }
}

impl std::error::Error for StoreError {}

impl From<sqlx::Error> for StoreError {
    fn from(err: sqlx::Error) -> Self {
        match &err {
            sqlx::Error::Database(db) if db.is_unique_violation() => Self::Duplicate,
            _ => Self::Query(err.to_string()),
        }
    }
}

/// A wrapped key as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredKey {
    pub merchant_id: String,
    pub purpose: &'static str,
    pub version: u32,
    pub blob: Vec<u8>,
}

/// An enum stored as text: `as_str` is the text written, `parse` reads it back, and text that
/// names no value is an error (the database holds something this gateway does not know), never
/// a silent default.
macro_rules! stored_text {
    (
        $(#[$meta:meta])*
        $name:ident in $column:literal {
            $($(#[$variant_meta:meta])* $variant:ident => $text:literal,)+
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum $name {
            $($(#[$variant_meta])* $variant,)+
        }

        impl $name {
            /// The text stored for this value.
            pub const fn as_str(self) -> &'static str {
                match self {
                    $(Self::$variant => $text,)+
                }
            }

            /// The value of stored text.
            pub fn parse(stored: &str) -> Result<Self, StoreError> {
                match stored {
                    $($text => Ok(Self::$variant),)+
                    other => Err(StoreError::Query(format!(
                        concat!("unknown ", $column, " {:?} in storage"),
                        other
                    ))),
                }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

stored_text! {
    /// A token's lifecycle state (`tokens.status`).
    TokenStatus in "tokens.status" {
        /// Created by a payment not yet confirmed (ConfirmToken); not usable.
        Provisional => "provisional",
        Active => "active",
        Deleted => "deleted",
        Expired => "expired",
        /// A single-use token that was used.
        Consumed => "consumed",
    }
}

stored_text! {
    /// What a token stands for (`tokens.data_type`), as the vault names it.
    DataType in "tokens.data_type" {
        Card => "card",
        BankAccount => "bank_account",
        Email => "email",
        Phone => "phone",
        /// A CVC-only single-use token.
        Cvc => "cvc",
    }
}

stored_text! {
    /// A token's format (`tokens.format`).
    TokenFormat in "tokens.format" {
        FormatPreserving => "format_preserving",
        Opaque => "opaque",
    }
}

stored_text! {
    /// A journal entry's transaction type (`journal.kind`).
    JournalKind in "journal.kind" {
        Tokenize => "TK",
        Detokenize => "DT",
        Delete => "DL",
        Confirm => "CONFIRM",
        Extend => "EXTEND",
        Expire => "EXPIRE",
        Authorization => "AUTH",
        Block => "BLOCK",
        Unblock => "UNBLOCK",
    }
}

/// A token's kind as stored (`tokens.kind`); unknown text is an error.
pub(crate) fn kind_of(stored: &str) -> Result<Kind, StoreError> {
    Kind::from_stored(stored)
        .ok_or_else(|| StoreError::Query(format!("unknown tokens.kind {stored:?} in storage")))
}

/// A string column decoded as a stored enum.
pub(crate) fn enum_column<T>(
    row: &AnyRow,
    name: &str,
    parse: impl FnOnce(&str) -> Result<T, StoreError>,
) -> Result<T, StoreError> {
    let text: String = row.try_get(name)?;
    parse(&text)
}

/// A token record. `ciphertext` is `None` once the token is deleted, expired or consumed.
#[derive(Clone, PartialEq, Eq)]
pub struct TokenRecord {
    pub merchant_id: String,
    pub token: String,
    pub kind: Kind,
    pub data_type: DataType,
    pub format: TokenFormat,
    pub brand: String,
    pub first_six: String,
    pub last_four: String,
    pub expiry_month: u32,
    pub expiry_year: u32,
    pub shopper_reference: String,
    pub fingerprint: Option<Vec<u8>>,
    pub fingerprint_key_version: u32,
    pub ciphertext: Option<Vec<u8>>,
    pub data_key_version: u32,
    pub holds_cvc: bool,
    /// The vault endpoint that holds this token's CVC; empty when none does.
    pub cvc_vault: String,
    pub status: TokenStatus,
    pub created_at: UnixMillis,
    pub last_used_at: Option<UnixMillis>,
    pub ended_at: Option<UnixMillis>,
    pub expires_at: Option<UnixMillis>,
    pub retain_until: UnixMillis,
    pub retention_extended_months: u32,
}

impl fmt::Debug for TokenRecord {
    // Ciphertext and fingerprint are not secrets, but they are nobody's business in a log.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenRecord")
            .field("merchant_id", &self.merchant_id)
            .field("token", &self.token)
            .field("kind", &self.kind)
            .field("status", &self.status)
            .finish_non_exhaustive()
    }
}

/// A journal entry to write beside a change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JournalEntry<'a> {
    pub merchant_id: &'a str,
    pub token: &'a str,
    pub kind: JournalKind,
    pub caller: &'a str,
    pub at: UnixMillis,
    /// For DT, the stated purpose as `INITIATOR/MODEL/INTERACTION`.
    pub purpose: &'a str,
    pub detail: &'a str,
    /// For CONFIRM, the payment reference it was confirmed with (empty if none, and for every
    /// other kind); the journal's trigger puts it on the TOKEN_CONFIRMED event.
    pub payment_reference: &'a str,
}

/// A journal entry as read back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JournalRecord {
    pub id: i64,
    pub kind: JournalKind,
    pub caller: String,
    pub at: UnixMillis,
    pub purpose: String,
    pub detail: String,
}

/// A token the sweeper ended, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Swept {
    pub merchant_id: String,
    pub token: String,
    pub reason: &'static str,
}

/// A page position in a shopper's token list: (created_at, token) of the last item shown.
pub type ListCursor = (UnixMillis, String);

/// Which database the gateway uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

impl Backend {
    /// `postgres://` and `postgresql://` URLs select PostgreSQL; anything else is an SQLite
    /// file path (or `sqlite://` URL).
    pub fn of(database: &str) -> Self {
        if database.starts_with("postgres://") || database.starts_with("postgresql://") {
            Self::Postgres
        } else {
            Self::Sqlite
        }
    }

    /// The backend of an open connection (or transaction), for SQL that differs between them.
    pub(crate) fn of_connection(conn: &sqlx::AnyConnection) -> Self {
        if conn.backend_name() == "PostgreSQL" {
            Self::Postgres
        } else {
            Self::Sqlite
        }
    }
}

pub(crate) fn u32_column(row: &AnyRow, name: &str) -> Result<u32, sqlx::Error> {
    let value: i64 = row.try_get(name)?;
    u32::try_from(value).map_err(|err| sqlx::Error::ColumnDecode {
        index: name.to_owned(),
        source: Box::new(err),
    })
}

pub(crate) const TOKEN_COLUMNS: &str =
    "merchant_id, token, kind, data_type, format, brand, first_six, last_four, \
     expiry_month, expiry_year, shopper_reference, fingerprint, fingerprint_key_version, ciphertext, \
     data_key_version, holds_cvc, cvc_vault, status, created_at, last_used_at, ended_at, expires_at, \
     retain_until, retention_extended_months";

/// Columns per token row, for multi-row inserts.
pub(crate) const TOKEN_COLUMN_COUNT: usize = 24;

pub(crate) fn token_from_row(row: &AnyRow) -> Result<TokenRecord, StoreError> {
    Ok(TokenRecord {
        merchant_id: row.try_get("merchant_id")?,
        token: row.try_get("token")?,
        kind: enum_column(row, "kind", kind_of)?,
        data_type: enum_column(row, "data_type", DataType::parse)?,
        format: enum_column(row, "format", TokenFormat::parse)?,
        brand: row.try_get("brand")?,
        first_six: row.try_get("first_six")?,
        last_four: row.try_get("last_four")?,
        expiry_month: u32_column(row, "expiry_month")?,
        expiry_year: u32_column(row, "expiry_year")?,
        shopper_reference: row.try_get("shopper_reference")?,
        fingerprint: row.try_get("fingerprint")?,
        fingerprint_key_version: u32_column(row, "fingerprint_key_version")?,
        ciphertext: row.try_get("ciphertext")?,
        data_key_version: u32_column(row, "data_key_version")?,
        holds_cvc: row.try_get::<i64, _>("holds_cvc")? != 0,
        cvc_vault: row.try_get("cvc_vault")?,
        status: enum_column(row, "status", TokenStatus::parse)?,
        created_at: row.try_get("created_at")?,
        last_used_at: row.try_get("last_used_at")?,
        ended_at: row.try_get("ended_at")?,
        expires_at: row.try_get("expires_at")?,
        retain_until: row.try_get("retain_until")?,
        retention_extended_months: u32_column(row, "retention_extended_months")?,
    })
}

pub(crate) type Tx<'a> = sqlx::Transaction<'a, sqlx::Any>;

/// A state change of one token, applied only if the token is in one of `from` states.
#[derive(Debug, Clone)]
pub struct Transition {
    pub from: &'static [TokenStatus],
    pub to: TokenStatus,
    /// Destroy ciphertext and fingerprint (deletion, expiry, consumption).
    pub destroy: bool,
    /// Clear the provisional or single-use deadline (confirmation).
    pub clear_deadline: bool,
}

/// The `VALUES` list of a multi-row INSERT: `rows` tuples of `columns` parameters.
///
/// SQLite gets anonymous `?` parameters. With numbered ones (`$7`) every bind looks its
/// parameter's name up with `sqlite3_bind_parameter_name`, a linear scan of the statement's
/// parameter list, so binding a statement of n parameters costs O(n²): at 256 rows × 24 columns
/// that scan took three quarters of the gateway's CPU during bulk import. PostgreSQL needs `$N`.
pub(crate) fn values_rows(tx: &Tx<'_>, rows: usize, columns: usize) -> String {
    let numbered = Backend::of_connection(tx) == Backend::Postgres;
    let mut out = String::with_capacity(rows * columns * 6);
    for row in 0..rows {
        out.push_str(if row == 0 { "(" } else { ", (" });
        for column in 0..columns {
            if column > 0 {
                out.push_str(", ");
            }
            if numbered {
                out.push('$');
                out.push_str(&(row * columns + column + 1).to_string());
            } else {
                out.push('?');
            }
        }
        out.push(')');
    }
    out
}

pub(crate) async fn select_token(
    tx: &mut Tx<'_>,
    merchant_id: &str,
    token: &str,
) -> Result<TokenRecord, StoreError> {
    let row = sqlx::query(&format!(
        "SELECT {TOKEN_COLUMNS} FROM tokens WHERE merchant_id = $1 AND token = $2"
    ))
    .bind(merchant_id)
    .bind(token)
    .fetch_one(&mut **tx)
    .await?;
    token_from_row(&row)
}

pub(crate) async fn apply_transition(
    tx: &mut Tx<'_>,
    merchant_id: &str,
    token: &str,
    change: &Transition,
    at: UnixMillis,
) -> Result<bool, StoreError> {
    let from = change
        .from
        .iter()
        .map(|state| format!("'{}'", state.as_str()))
        .collect::<Vec<_>>()
        .join(", ");
    let changed = sqlx::query(&format!(
        "UPDATE tokens SET status = $1, \
         ended_at = CASE WHEN $2 = 1 THEN $3 ELSE ended_at END, \
         ciphertext = CASE WHEN $2 = 1 THEN NULL ELSE ciphertext END, \
         fingerprint = CASE WHEN $2 = 1 THEN NULL ELSE fingerprint END, \
         expires_at = CASE WHEN $4 = 1 THEN NULL ELSE expires_at END \
         WHERE merchant_id = $5 AND token = $6 AND status IN ({from})"
    ))
    .bind(change.to.as_str())
    .bind(i64::from(change.destroy))
    .bind(at)
    .bind(i64::from(change.clear_deadline))
    .bind(merchant_id)
    .bind(token)
    .execute(&mut **tx)
    .await?
    .rows_affected();
    Ok(changed == 1)
}

pub(crate) async fn insert_journal(tx: &mut Tx<'_>, entry: &Journal) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO journal (merchant_id, token, kind, caller, at, purpose, detail, payment_reference) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
    )
    .bind(&entry.merchant_id)
    .bind(&entry.token)
    .bind(entry.kind.as_str())
    .bind(&entry.caller)
    .bind(entry.at)
    .bind(&entry.purpose)
    .bind(&entry.detail)
    .bind(&entry.payment_reference)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// A journal entry owned by a queued write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Journal {
    pub merchant_id: String,
    pub token: String,
    pub kind: JournalKind,
    pub caller: String,
    pub at: UnixMillis,
    pub purpose: String,
    pub detail: String,
    /// CONFIRM only: the payment reference it was confirmed with (carried by its event).
    pub payment_reference: String,
}

impl From<&JournalEntry<'_>> for Journal {
    fn from(entry: &JournalEntry<'_>) -> Self {
        Self {
            merchant_id: entry.merchant_id.to_owned(),
            token: entry.token.to_owned(),
            kind: entry.kind,
            caller: entry.caller.to_owned(),
            at: entry.at,
            purpose: entry.purpose.to_owned(),
            detail: entry.detail.to_owned(),
            payment_reference: entry.payment_reference.to_owned(),
        }
    }
}

/// A merchant reference to record with a write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MerchantReference {
    pub merchant_id: String,
    pub reference: String,
    /// When true, the write is refused if the reference was seen in the last 24 hours.
    pub strict: bool,
    pub seen_at: UnixMillis,
}

/// Records `reference` in the writer's transaction `tx`. False, with nothing changed, when it
/// is strict and was seen for the merchant in the last 24 hours: then the write it guards must
/// not happen. A reference that is not strict is recorded (or left as it was, when seen in the
/// window) and never refused. On PostgreSQL a concurrent transaction claiming the same
/// reference waits here until the first one commits or rolls back, then sees its outcome.
pub(crate) async fn claim_reference(
    tx: &mut Tx<'_>,
    reference: &MerchantReference,
) -> Result<bool, StoreError> {
    let fresh = sqlx::query(
        "INSERT INTO merchant_references (merchant_id, reference, seen_at) VALUES ($1, $2, $3) \
         ON CONFLICT (merchant_id, reference) DO UPDATE SET seen_at = excluded.seen_at \
         WHERE merchant_references.seen_at <= $4",
    )
    .bind(&reference.merchant_id)
    .bind(&reference.reference)
    .bind(reference.seen_at)
    .bind(reference.seen_at - REPLAY_WINDOW_MS)
    .execute(&mut **tx)
    .await?
    .rows_affected()
        == 1;
    Ok(fresh || !reference.strict)
}

/// The answer to a request whose storage failed: logged here, and UNAVAILABLE to the caller
/// without the database's own words.
pub(crate) fn store_error(err: StoreError) -> ApiError {
    tracing::error!(error = %err, "storage failed");
    ApiError::unavailable("STORAGE_UNAVAILABLE", "storage is unavailable; retry later")
}
