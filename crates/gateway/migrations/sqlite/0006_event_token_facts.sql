-- Events that a subscriber can use alone: each carries the facts of its token that a
-- recurring-contract or token notification carries (shopper reference, kind, data type, brand,
-- last four, card expiry) and, for a confirmation, the payment reference. Never card data: no
-- card number, no first six, no CVC.
--
-- The trigger copies the facts from the token's row, in the same statement that writes the
-- event: every code path writes the token row before its journal entry, in the same
-- transaction, and these facts never change over a token's life, so the copy is what the token
-- was when the event happened. The payment reference is the journal entry's own: a column of
-- its own (the confirmation writes it) rather than text parsed out of `detail`.
ALTER TABLE journal ADD COLUMN payment_reference TEXT NOT NULL DEFAULT '';

ALTER TABLE events ADD COLUMN shopper_reference TEXT NOT NULL DEFAULT '';
ALTER TABLE events ADD COLUMN token_kind TEXT NOT NULL DEFAULT '';
ALTER TABLE events ADD COLUMN data_type TEXT NOT NULL DEFAULT '';
ALTER TABLE events ADD COLUMN brand TEXT NOT NULL DEFAULT '';
ALTER TABLE events ADD COLUMN last_four TEXT NOT NULL DEFAULT '';
ALTER TABLE events ADD COLUMN expiry_month INTEGER NOT NULL DEFAULT 0;
ALTER TABLE events ADD COLUMN expiry_year INTEGER NOT NULL DEFAULT 0;
ALTER TABLE events ADD COLUMN payment_reference TEXT NOT NULL DEFAULT '';

-- Events stored before this migration get the same facts from their tokens (token rows are
-- never removed, only their ciphertext and fingerprint are), so a subscriber cannot tell them
-- from new ones. Their confirmations' payment references were journalled only in `detail`
-- ("RECURRING_CONTRACT payment_reference=REF", the one format the gateway ever wrote), which
-- the event copied: read back once, here (compared, not LIKE: `_` is a LIKE wildcard).
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
WHERE kind = 'TOKEN_CONFIRMED'
AND substr(detail, 1, length('RECURRING_CONTRACT payment_reference=')) = 'RECURRING_CONTRACT payment_reference=';

DROP TRIGGER journal_writes_events;

-- As in 0004 (numbered by rowid: SQLite has one writer), plus the token's facts. A journal
-- entry whose token row is missing (none is written so today) still gets its event, with
-- empty facts, rather than failing the change.
CREATE TRIGGER journal_writes_events AFTER INSERT ON journal
WHEN NEW.kind IN ('TK', 'CONFIRM', 'DL', 'EXPIRE', 'EXTEND', 'BLOCK', 'UNBLOCK')
BEGIN
    INSERT INTO events (
        merchant_id, token, kind, at, detail,
        shopper_reference, token_kind, data_type, brand, last_four, expiry_month, expiry_year,
        payment_reference
    )
    SELECT
        NEW.merchant_id,
        NEW.token,
        CASE NEW.kind
            WHEN 'TK' THEN 'TOKEN_CREATED'
            WHEN 'CONFIRM' THEN 'TOKEN_CONFIRMED'
            WHEN 'DL' THEN 'TOKEN_DELETED'
            WHEN 'EXPIRE' THEN 'TOKEN_EXPIRED'
            WHEN 'EXTEND' THEN 'RETENTION_EXTENDED'
            WHEN 'BLOCK' THEN 'CARD_BLOCKED'
            WHEN 'UNBLOCK' THEN 'CARD_UNBLOCKED'
        END,
        NEW.at,
        NEW.detail,
        COALESCE(t.shopper_reference, ''),
        COALESCE(t.kind, ''),
        COALESCE(t.data_type, ''),
        COALESCE(t.brand, ''),
        COALESCE(t.last_four, ''),
        COALESCE(t.expiry_month, 0),
        COALESCE(t.expiry_year, 0),
        CASE WHEN NEW.kind = 'CONFIRM' THEN NEW.payment_reference ELSE '' END
    FROM (SELECT 1) AS one
    LEFT JOIN tokens AS t ON t.merchant_id = NEW.merchant_id AND t.token = NEW.token;
END;
