-- 006_health.sql — read-only health doors for `pgrelay check` and the daemon.
--
-- WHY: the daemon's role cannot read relay.events (fail closed, 002), yet an
-- operator must be able to tell whether retention runs and whether the schema
-- is current, from the daemon's own settings. Each door returns one
-- aggregate, never a row.

-- Age of the oldest event (NULL when empty). Retention keeps 24 h and runs
-- hourly, so over 25 h means it stopped. min() is one probe of
-- events_created_at_idx.
CREATE FUNCTION relay.oldest_event_age() RETURNS interval
    LANGUAGE sql STABLE SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
AS $$
SELECT now() - min(e.created_at) FROM relay.events AS e
$$;
COMMENT ON FUNCTION relay.oldest_event_age() IS
    'Health: age of the oldest event (NULL when empty); over 25 h means retention stopped.';
REVOKE EXECUTE ON FUNCTION relay.oldest_event_age() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION relay.oldest_event_age() TO relay_daemon;

-- `pgrelay check` compares the applied migrations with the shipped files.
-- Versions, file names and checksums only: nothing about any organization.
GRANT SELECT ON relay.schema_migrations TO relay_daemon;
