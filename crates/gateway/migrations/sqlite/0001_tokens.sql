-- Wrapped merchant keys: blobs sealed by the vault's master key. Useless without the vault.
CREATE TABLE merchant_keys (
    merchant_id TEXT NOT NULL,
    purpose     TEXT NOT NULL,          -- 'data' or 'fingerprint'
    version     INTEGER NOT NULL,
    blob        BLOB NOT NULL,
    created_at  INTEGER NOT NULL,       -- Unix milliseconds
    PRIMARY KEY (merchant_id, purpose, version)
);

-- One row per token. `ciphertext` and `fingerprint` are set to NULL when the token is
-- deleted: deletion destroys the data, not just a flag.
CREATE TABLE tokens (
    merchant_id             TEXT NOT NULL,
    token                   TEXT NOT NULL,
    format                  TEXT NOT NULL,   -- 'opaque' or 'format_preserving'
    brand                   TEXT NOT NULL,
    first_six               TEXT NOT NULL,
    last_four               TEXT NOT NULL,
    expiry_month            INTEGER NOT NULL,
    expiry_year             INTEGER NOT NULL,
    shopper_reference       TEXT NOT NULL DEFAULT '',
    fingerprint             BLOB,
    fingerprint_key_version INTEGER NOT NULL,
    ciphertext              BLOB,
    data_key_version        INTEGER NOT NULL,
    status                  TEXT NOT NULL,   -- 'active' or 'deleted'
    created_at              INTEGER NOT NULL,
    deleted_at              INTEGER,
    PRIMARY KEY (merchant_id, token)
);

CREATE INDEX tokens_by_fingerprint ON tokens (merchant_id, fingerprint, shopper_reference);

-- Every operation on a token, without card data.
CREATE TABLE journal (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    merchant_id TEXT NOT NULL,
    token       TEXT NOT NULL,
    kind        TEXT NOT NULL,           -- TK, DT, DL, ...
    caller      TEXT NOT NULL,
    at          INTEGER NOT NULL,
    detail      TEXT NOT NULL DEFAULT ''
);

CREATE INDEX journal_by_token ON journal (merchant_id, token, id);
