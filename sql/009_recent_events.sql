-- 009_recent_events.sql — where a starting daemon's memory of recent events begins.
--
-- WHY: a daemon answers resumes from recent cursors out of memory (the newest
-- PGRELAY_RECENT_EVENTS rows it tailed), without a catch-up query each. A
-- deploy restarts every daemon, and its clients come back within seconds with
-- cursors from before the restart: so a starting daemon reads the newest rows
-- once, in the transaction of its first snapshot, instead of starting with an
-- empty memory. This function tells it where they begin: every row with a
-- larger xid than the one returned is among the newest `max_rows` (NULL: the
-- table holds fewer, read them all). One backward range of events_xid_idx.
CREATE OR REPLACE FUNCTION relay.recent_events_start(max_rows integer) RETURNS xid8
    LANGUAGE sql STABLE SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
AS $$
SELECT e.xid FROM relay.events AS e ORDER BY e.xid DESC OFFSET greatest(max_rows, 0) LIMIT 1
$$;
COMMENT ON FUNCTION relay.recent_events_start(integer) IS
    'Daemon start: rows with a larger xid are among the newest max_rows (NULL: fewer rows).';
REVOKE EXECUTE ON FUNCTION relay.recent_events_start(integer) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION relay.recent_events_start(integer) TO relay_daemon;
