-- Wrapped merchant keys: blobs sealed by the vault's master key. Useless without the vault.
CREATE TABLE merchant_keys (
    merchant_id TEXT NOT NULL,
    purpose     TEXT NOT NULL,          -- 'data' or 'fingerprint'
    version     BIGINT NOT NULL,
    blob        BYTEA NOT NULL,
    created_at  BIGINT NOT NULL,       -- Unix milliseconds, as every time here
    PRIMARY KEY (merchant_id, purpose, version)
);

-- One row per token. `ciphertext` and `fingerprint` are set to NULL when the token is
-- deleted, expires or is consumed: deletion destroys the data, not just a flag. Card data
-- is never here in clear, and a CVC is never here at all.
CREATE TABLE tokens (
    merchant_id               TEXT NOT NULL,
    token                     TEXT NOT NULL,
    kind                      TEXT NOT NULL,     -- card_on_file, recurrence, single_use
    data_type                 TEXT NOT NULL,     -- card, bank_account, email, phone, cvc
    format                    TEXT NOT NULL,     -- opaque, format_preserving
    brand                     TEXT NOT NULL,
    first_six                 TEXT NOT NULL,
    last_four                 TEXT NOT NULL,
    expiry_month              BIGINT NOT NULL,
    expiry_year               BIGINT NOT NULL,
    shopper_reference         TEXT NOT NULL,
    fingerprint               BYTEA,
    fingerprint_key_version   BIGINT NOT NULL,
    ciphertext                BYTEA,
    data_key_version          BIGINT NOT NULL,
    holds_cvc                 BIGINT NOT NULL,  -- 1 while the vault may hold a CVC for it
    cvc_vault                 TEXT NOT NULL,     -- the vault endpoint holding that CVC
    status                    TEXT NOT NULL,     -- provisional, active, deleted, expired, consumed
    created_at                BIGINT NOT NULL,
    last_used_at              BIGINT,
    ended_at                  BIGINT,           -- when it was deleted, expired or consumed
    expires_at                BIGINT,           -- provisional or single-use deadline
    retain_until              BIGINT NOT NULL,  -- the retention rules delete it after this
    retention_extended_months BIGINT NOT NULL,
    PRIMARY KEY (merchant_id, token)
);

CREATE INDEX tokens_by_fingerprint ON tokens (merchant_id, fingerprint);
-- One-click listing: a shopper's tokens, newest first.
CREATE INDEX tokens_by_shopper ON tokens (merchant_id, shopper_reference, created_at, token);
-- The sweeper's two scans.
CREATE INDEX tokens_by_deadline ON tokens (status, expires_at);
CREATE INDEX tokens_by_retention ON tokens (status, retain_until);

-- Every operation on a token, without card data.
CREATE TABLE journal (
    id          BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    merchant_id TEXT NOT NULL,
    token       TEXT NOT NULL,
    kind        TEXT NOT NULL,           -- TK, DT, DL, CONFIRM, EXTEND, EXPIRE
    caller      TEXT NOT NULL,
    at          BIGINT NOT NULL,
    purpose     TEXT NOT NULL,           -- INITIATOR/MODEL/INTERACTION for DT, else empty
    detail      TEXT NOT NULL
);

CREATE INDEX journal_by_token ON journal (merchant_id, token, id);

-- Leases for background jobs, so several gateways sharing a database never run the same job
-- at the same time.
CREATE TABLE job_leases (
    job         TEXT PRIMARY KEY,
    holder      TEXT NOT NULL,
    lease_until BIGINT NOT NULL
);
