-- Token events, written once per journal INSERT statement instead of once per journal row.
--
-- The row trigger of 0004 ran a PL/pgSQL call, an advisory-lock call and a MAX(seq) lookup for
-- every journal row: a 500-row insert (one bulk import chunk, or a busy group-commit batch)
-- took 10-12 ms with it and 3-5 ms without it. This statement trigger reads the statement's
-- new journal rows from a transition table and inserts all their events in one statement:
-- 4.5 ms for the same 500 rows.
--
-- Numbering is unchanged: the same transaction-scoped advisory lock as 0004, held until
-- commit, so numbers follow commit order across gateways; within a statement the events
-- follow the journal's own order (its identity `id`).
DROP TRIGGER journal_writes_events ON journal;
DROP FUNCTION journal_writes_events();

-- The event a journal entry of this kind stands for; NULL for a detokenize or an authorisation
-- report, which are journalled but are not events. Plain SQL, so PostgreSQL inlines it.
CREATE FUNCTION journal_event_kind(kind TEXT) RETURNS TEXT LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE kind
        WHEN 'TK' THEN 'TOKEN_CREATED'
        WHEN 'CONFIRM' THEN 'TOKEN_CONFIRMED'
        WHEN 'DL' THEN 'TOKEN_DELETED'
        WHEN 'EXPIRE' THEN 'TOKEN_EXPIRED'
        WHEN 'EXTEND' THEN 'RETENTION_EXTENDED'
        WHEN 'BLOCK' THEN 'CARD_BLOCKED'
        WHEN 'UNBLOCK' THEN 'CARD_UNBLOCKED'
    END
$$;

CREATE FUNCTION journal_writes_events() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    -- A statement with no event (a batch of detokenizes) takes no lock.
    IF EXISTS (SELECT 1 FROM new_entries WHERE journal_event_kind(kind) IS NOT NULL) THEN
        -- 0x7e55e7a0, as in 0004: every gateway must use the same constant.
        PERFORM pg_advisory_xact_lock(2119559072);
        INSERT INTO events (seq, merchant_id, token, kind, at, detail)
        SELECT
            (SELECT COALESCE(MAX(seq), 0) FROM events) + ROW_NUMBER() OVER (ORDER BY entry.id),
            entry.merchant_id,
            entry.token,
            journal_event_kind(entry.kind),
            entry.at,
            entry.detail
        FROM new_entries AS entry
        WHERE journal_event_kind(entry.kind) IS NOT NULL;
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER journal_writes_events AFTER INSERT ON journal
REFERENCING NEW TABLE AS new_entries
FOR EACH STATEMENT EXECUTE FUNCTION journal_writes_events();
