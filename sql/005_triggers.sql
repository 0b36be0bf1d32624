-- 005_triggers.sql — the NOTIFY doorbell and the immutability guard.
--
-- WHY: a statement-level AFTER INSERT trigger sends one NOTIFY on channel
-- relay_events per INSERT statement (100 rows in one statement ring once; the
-- server also folds identical notifications within a transaction). The
-- notification is only a doorbell: it carries no data, and the daemon never
-- trusts one (any role that can connect can NOTIFY any channel). The daemon
-- re-reads the table by snapshot on every ring, on a fallback timer, and after
-- every reconnect, so a lost doorbell costs latency, never events.
--
-- NOTIFY serialises committing transactions cluster-wide. On write-heavy
-- databases, switch the doorbell off and run the daemon in poll mode:
--     ALTER TABLE relay.events DISABLE TRIGGER events_doorbell;
-- Later migrations create the trigger only when it is missing and never
-- re-enable it.

CREATE OR REPLACE FUNCTION relay.ring_doorbell() RETURNS trigger
    LANGUAGE plpgsql
    SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    PERFORM pg_notify('relay_events', '');
    RETURN NULL;
END
$$;
REVOKE EXECUTE ON FUNCTION relay.ring_doorbell() FROM PUBLIC;

-- Rows are immutable: an UPDATE would change a signal clients already acted
-- on. With FORCE ROW LEVEL SECURITY and no UPDATE policy an UPDATE already
-- matches no rows; this guard turns that silent no-op into a clear error (and
-- also stops superusers, who bypass row-level security).
CREATE OR REPLACE FUNCTION relay.reject_update() RETURNS trigger
    LANGUAGE plpgsql
    SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    RAISE EXCEPTION 'relay.events rows are immutable'
        USING ERRCODE = 'insufficient_privilege',
              HINT = 'Emit a new signal with relay.emit() instead of updating one.';
END
$$;
REVOKE EXECUTE ON FUNCTION relay.reject_update() FROM PUBLIC;

DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_catalog.pg_trigger
                   WHERE tgrelid = 'relay.events'::regclass AND tgname = 'events_doorbell') THEN
        CREATE TRIGGER events_doorbell
            AFTER INSERT ON relay.events
            FOR EACH STATEMENT EXECUTE FUNCTION relay.ring_doorbell();
    END IF;
    IF NOT EXISTS (SELECT FROM pg_catalog.pg_trigger
                   WHERE tgrelid = 'relay.events'::regclass AND tgname = 'events_immutable') THEN
        CREATE TRIGGER events_immutable
            BEFORE UPDATE ON relay.events
            FOR EACH STATEMENT EXECUTE FUNCTION relay.reject_update();
    END IF;
END
$$;
