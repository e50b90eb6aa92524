-- Token events are written by the database itself, with the journal entry of the change that
-- causes them: same transaction, no statement of their own per batch (one round trip less on
-- the single writer). SQLite has one writer, so `seq` (the rowid, MAX + 1) follows commit
-- order. The kinds here are every journal kind that is an event; a detokenize (DT) or an
-- authorisation report is journalled but is not an event.
CREATE TRIGGER journal_writes_events AFTER INSERT ON journal
WHEN NEW.kind IN ('TK', 'CONFIRM', 'DL', 'EXPIRE', 'EXTEND', 'BLOCK', 'UNBLOCK')
BEGIN
    INSERT INTO events (merchant_id, token, kind, at, detail) VALUES (
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
        NEW.detail
    );
END;
