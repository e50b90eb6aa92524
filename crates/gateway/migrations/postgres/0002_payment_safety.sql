-- Authorisation outcomes reported per token, counted per merchant, acquiring agreement and
-- card (keyed fingerprint: every token of the same card counts together).
CREATE TABLE authorization_attempts (
    id          BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    merchant_id TEXT NOT NULL,
    agreement   TEXT NOT NULL,
    fingerprint BYTEA NOT NULL,
    token       TEXT NOT NULL,
    outcome     TEXT NOT NULL,           -- approved, declined, do_not_retry
    at          BIGINT NOT NULL
);
CREATE INDEX authorization_attempts_by_card ON authorization_attempts (merchant_id, agreement, fingerprint, at);

-- Blocks on merchant-initiated use of a card under an agreement.
CREATE TABLE card_blocks (
    merchant_id   TEXT NOT NULL,
    agreement     TEXT NOT NULL,
    fingerprint   BYTEA NOT NULL,
    reason        TEXT NOT NULL,         -- RETRY_LIMIT or DO_NOT_RETRY
    token         TEXT NOT NULL,         -- the token whose report caused the block (journal)
    blocked_until BIGINT NOT NULL,
    PRIMARY KEY (merchant_id, agreement, fingerprint)
);
CREATE INDEX card_blocks_by_end ON card_blocks (blocked_until);

-- Idempotency keys per merchant and caller: the first answer, replayed for 24 hours.
CREATE TABLE idempotency_keys (
    merchant_id  TEXT NOT NULL,
    caller       TEXT NOT NULL,
    key          TEXT NOT NULL,
    method       TEXT NOT NULL,
    request_hash BYTEA NOT NULL,          -- SHA-256 of the request's non-secret fields
    state        TEXT NOT NULL,          -- in_flight or done
    response     BYTEA,                   -- the encoded first answer (never card data)
    error_code   BIGINT,
    error_reason TEXT,
    error_message TEXT,
    created_at   BIGINT NOT NULL,
    locked_until BIGINT NOT NULL,       -- an in-flight claim older than this was abandoned
    PRIMARY KEY (merchant_id, caller, key)
);

-- Merchant references seen, for strict duplicate checks.
CREATE TABLE merchant_references (
    merchant_id TEXT NOT NULL,
    reference   TEXT NOT NULL,
    seen_at     BIGINT NOT NULL,
    PRIMARY KEY (merchant_id, reference)
);

-- Token events, numbered in commit order (see store::insert_events).
CREATE TABLE events (
    seq         BIGINT PRIMARY KEY,
    merchant_id TEXT NOT NULL,
    token       TEXT NOT NULL,
    kind        TEXT NOT NULL,
    at          BIGINT NOT NULL,
    detail      TEXT NOT NULL
);
CREATE INDEX events_by_merchant ON events (merchant_id, seq);
