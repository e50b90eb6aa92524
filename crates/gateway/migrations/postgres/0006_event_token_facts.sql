-- Events that a subscriber can use alone: each carries the facts of its token that a
-- recurring-contract or token notification carries (shopper reference, kind, data type, brand,
-- last four, card expiry) and, for a confirmation, the payment reference. Never card data: no
-- card number, no first six, no CVC.
--
-- The trigger copies the facts from the token's row, in the statement that writes the events:
-- every code path writes the token row before its journal entry, in the same transaction, and
-- these facts never change over a token's life, so the copy is what the token was when the
-- event happened. The payment reference is the journal entry's own: a column of its own (the
-- confirmation writes it) rather than text parsed out of `detail`.
ALTER TABLE journal ADD COLUMN payment_reference TEXT NOT NULL DEFAULT '';

ALTER TABLE events
    ADD COLUMN shopper_reference TEXT NOT NULL DEFAULT '',
    ADD COLUMN token_kind TEXT NOT NULL DEFAULT '',
    ADD COLUMN data_type TEXT NOT NULL DEFAULT '',
    ADD COLUMN brand TEXT NOT NULL DEFAULT '',
    ADD COLUMN last_four TEXT NOT NULL DEFAULT '',
    ADD COLUMN expiry_month BIGINT NOT NULL DEFAULT 0,
    ADD COLUMN expiry_year BIGINT NOT NULL DEFAULT 0,
    ADD COLUMN payment_reference TEXT NOT NULL DEFAULT '';

-- Events stored before this migration get the same facts from their tokens (token rows are
-- never removed, only their ciphertext and fingerprint are), so a subscriber cannot tell them
-- from new ones. Their confirmations' payment references were journalled only in `detail`
-- ("RECURRING_CONTRACT payment_reference=REF", the one format the gateway ever wrote), which
-- the event copied: read back once, here.
UPDATE events SET
    shopper_reference = t.shopper_reference,
    token_kind = t.kind,
    data_type = t.data_type,
    brand = t.brand,
    last_four = t.last_four,
    expiry_month = t.expiry_month,
    expiry_year = t.expiry_year
FROM tokens AS t
WHERE t.merchant_id = events.merchant_id AND t.token = events.token;

UPDATE events SET payment_reference = substr(detail, length('RECURRING_CONTRACT payment_reference=') + 1)
WHERE kind = 'TOKEN_CONFIRMED' AND starts_with(detail, 'RECURRING_CONTRACT payment_reference=');

-- As in 0005 (once per journal statement, numbered under the advisory lock in commit order),
-- plus the token's facts: one primary-key lookup per event in the same statement. A journal
-- entry whose token row is missing (none is written so today) still gets its event, with empty
-- facts, rather than failing the change. The trigger itself is unchanged; it runs this body.
CREATE OR REPLACE FUNCTION journal_writes_events() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    -- A statement with no event (a batch of detokenizes) takes no lock.
    IF EXISTS (SELECT 1 FROM new_entries WHERE journal_event_kind(kind) IS NOT NULL) THEN
        -- 0x7e55e7a0, as in 0004: every gateway must use the same constant.
        PERFORM pg_advisory_xact_lock(2119559072);
        INSERT INTO events (
            seq, merchant_id, token, kind, at, detail,
            shopper_reference, token_kind, data_type, brand, last_four, expiry_month, expiry_year,
            payment_reference
        )
        SELECT
            (SELECT COALESCE(MAX(seq), 0) FROM events) + ROW_NUMBER() OVER (ORDER BY entry.id),
            entry.merchant_id,
            entry.token,
            journal_event_kind(entry.kind),
            entry.at,
            entry.detail,
            COALESCE(t.shopper_reference, ''),
            COALESCE(t.kind, ''),
            COALESCE(t.data_type, ''),
            COALESCE(t.brand, ''),
            COALESCE(t.last_four, ''),
            COALESCE(t.expiry_month, 0),
            COALESCE(t.expiry_year, 0),
            CASE WHEN entry.kind = 'CONFIRM' THEN entry.payment_reference ELSE '' END
        FROM new_entries AS entry
        LEFT JOIN tokens AS t ON t.merchant_id = entry.merchant_id AND t.token = entry.token
        WHERE journal_event_kind(entry.kind) IS NOT NULL;
    END IF;
    RETURN NULL;
END
$$;
