-- Token events are written by the database itself, with the journal entry of the change that
-- causes them: same transaction, no statements of their own per batch.
--
-- Numbered in commit order: with several writers (several gateways) an identity column would
-- hand out numbers in insert order, so a slow transaction could commit number 7 after 8 was
-- already read. So the first event of a transaction takes a transaction-scoped advisory lock
-- and every event is numbered after the current maximum; the lock is held until the
-- transaction commits, so numbers are given in commit order and a subscriber that has seen N
-- never later finds an event below N. The kinds here are every journal kind that is an event;
-- a detokenize (DT) or an authorisation report is journalled but is not an event.
CREATE FUNCTION journal_writes_events() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    event_kind TEXT := CASE NEW.kind
        WHEN 'TK' THEN 'TOKEN_CREATED'
        WHEN 'CONFIRM' THEN 'TOKEN_CONFIRMED'
        WHEN 'DL' THEN 'TOKEN_DELETED'
        WHEN 'EXPIRE' THEN 'TOKEN_EXPIRED'
        WHEN 'EXTEND' THEN 'RETENTION_EXTENDED'
        WHEN 'BLOCK' THEN 'CARD_BLOCKED'
        WHEN 'UNBLOCK' THEN 'CARD_UNBLOCKED'
    END;
BEGIN
    IF event_kind IS NOT NULL THEN
        -- 0x7e55e7a0: any constant works, as long as every gateway uses the same one.
        PERFORM pg_advisory_xact_lock(2119559072);
        INSERT INTO events (seq, merchant_id, token, kind, at, detail)
        SELECT COALESCE(MAX(seq), 0) + 1, NEW.merchant_id, NEW.token, event_kind, NEW.at, NEW.detail
        FROM events;
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER journal_writes_events AFTER INSERT ON journal
FOR EACH ROW EXECUTE FUNCTION journal_writes_events();
