-- 004_functions.sql — the SECURITY DEFINER functions: emit, tail, catch-up
-- horizon, retention, epoch.
--
-- WHY: each one is a narrow door through the row-level security of 003.
-- Every SECURITY DEFINER function here runs as its owner (the role that ran
-- the migrations), has a fixed search_path so that nobody can hijack it with
-- their own objects, has EXECUTE revoked from PUBLIC, and is granted to
-- exactly one group role. Callers never need SELECT on relay.events.

-- relay.emit: the best-effort path for backends (relay_service).
--   Returns the new id, or NULL when dedupe_key was already used in this
--   organization (the caller's transaction stays usable: ON CONFLICT, no error).
--   A payload over the 2 KB cap never aborts the caller: it is replaced by
--   {"_relay_truncated": true, "original_bytes": N} and a WARNING is raised.
--   Malformed event_type/entity_type and NULL required arguments still raise:
--   those are bugs in the caller, not load.
CREATE FUNCTION relay.emit(
    organization_id uuid,
    event_type      text,
    entity_type     text,
    entity_id       text,
    payload         jsonb DEFAULT '{}',
    dedupe_key      text  DEFAULT NULL,
    actor_id        text  DEFAULT NULL
) RETURNS bigint
    LANGUAGE plpgsql VOLATILE SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    max_payload_bytes CONSTANT int := 2048;
    body       jsonb := coalesce(payload, '{}'::jsonb);
    body_bytes int   := octet_length(body::text);
    new_id     bigint;
BEGIN
    IF body_bytes > max_payload_bytes THEN
        RAISE WARNING 'relay.emit: payload of % bytes exceeds % bytes; stored a truncation marker instead',
            body_bytes, max_payload_bytes
            USING HINT = 'Signals are invalidation hints: send ids, let clients fetch state from your API.';
        body := jsonb_build_object('_relay_truncated', true, 'original_bytes', body_bytes);
    END IF;

    INSERT INTO relay.events AS e
        (organization_id, event_type, entity_type, entity_id, actor_id, payload, dedupe_key)
    VALUES
        (emit.organization_id, emit.event_type, emit.entity_type, emit.entity_id,
         emit.actor_id, body, emit.dedupe_key)
    ON CONFLICT (organization_id, dedupe_key) WHERE dedupe_key IS NOT NULL DO NOTHING
    RETURNING e.id INTO new_id;

    RETURN new_id;  -- NULL: this dedupe_key was already used
END
$$;
COMMENT ON FUNCTION relay.emit(uuid, text, text, text, jsonb, text, text) IS
    'Emit a signal; returns its id, or NULL for a repeated dedupe_key. Oversized payloads become a marker.';
REVOKE EXECUTE ON FUNCTION relay.emit(uuid, text, text, text, jsonb, text, text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION relay.emit(uuid, text, text, text, jsonb, text, text) TO relay_service;

-- relay.tail_events: the daemon's live tail (relay_daemon), all organizations.
--   Call it inside a REPEATABLE READ READ ONLY transaction together with
--   pg_current_snapshot() (S). Arguments describe the previous snapshot P:
--   since_xmax = pg_snapshot_xmax(P), since_xip = pg_snapshot_xip(P) as an
--   array. It returns the rows visible in S but not in P, in id order, at most
--   max_rows rows with id > after_id (keyset paging: a burst of 100,000 rows is
--   read in pages).
--   The query is planned with the actual values (EXECUTE ... USING makes a
--   one-shot plan), so that the planner sees how few rows lie past xmax and
--   uses events_xid_idx. A plan made without the values (a plain SQL function
--   body, a generic cached plan) walks the primary key from the first row
--   instead. The test suite EXPLAINs the text between the $tail$ markers.
CREATE FUNCTION relay.tail_events(
    since_xmax xid8, since_xip xid8[], after_id bigint, max_rows integer
) RETURNS TABLE (
    id bigint, organization_id uuid, event_type text, entity_type text, entity_id text,
    actor_id text, payload text, created_at text, xid xid8
)
    LANGUAGE plpgsql STABLE SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    RETURN QUERY EXECUTE $tail$
        SELECT e.id, e.organization_id, e.event_type, e.entity_type, e.entity_id, e.actor_id,
               e.payload::text, to_json(e.created_at) #>> '{}', e.xid
        FROM relay.events AS e
        WHERE (e.xid >= $1 OR e.xid = ANY ($2))
          AND e.id > $3
        ORDER BY e.id
        LIMIT $4
    $tail$ USING since_xmax, since_xip, after_id, max_rows;
END
$$;
COMMENT ON FUNCTION relay.tail_events(xid8, xid8[], bigint, integer) IS
    'Daemon tail: rows not visible in the previous snapshot (xmax, xip), id order, keyset-paged.';
REVOKE EXECUTE ON FUNCTION relay.tail_events(xid8, xid8[], bigint, integer) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION relay.tail_events(xid8, xid8[], bigint, integer) TO relay_daemon;

-- relay.retention_horizon: for cursor planning (relay_daemon). The newest
-- transaction whose rows of this organization retention has deleted, or NULL.
CREATE FUNCTION relay.retention_horizon(org uuid) RETURNS xid8
    LANGUAGE sql STABLE SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
AS $$
SELECT h.deleted_through FROM relay.retention_horizons AS h WHERE h.organization_id = $1
$$;
REVOKE EXECUTE ON FUNCTION relay.retention_horizon(uuid) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION relay.retention_horizon(uuid) TO relay_daemon;

-- relay.database_epoch: identifies this database's history (relay_daemon).
-- Resume cursors carry it; a cursor from a restored, failed-over or different
-- database then gets {"type":"resync","reason":"epoch_changed"}. Combines this
-- installation's id with the cluster's system identifier and timeline where
-- the server lets us read them (some managed services do not).
CREATE FUNCTION relay.database_epoch() RETURNS text
    LANGUAGE plpgsql STABLE SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    install text;
    sysid   text := '';
    tli     text := '';
BEGIN
    SELECT i.install_id::text INTO STRICT install FROM relay.installation AS i;
    BEGIN
        SELECT c.system_identifier::text INTO sysid FROM pg_control_system() AS c;
        SELECT c.timeline_id::text INTO tli FROM pg_control_checkpoint() AS c;
    EXCEPTION WHEN insufficient_privilege THEN
        NULL;  -- managed services may hide these; the installation id still tells databases apart
    END;
    RETURN install || '/' || coalesce(sysid, '') || '/' || coalesce(tli, '');
END
$$;
REVOKE EXECUTE ON FUNCTION relay.database_epoch() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION relay.database_epoch() TO relay_daemon;

-- relay.cleanup_old_events: retention (relay_daemon; pg_cron or the shipped
-- systemd timer call it hourly). Deletes rows older than `keep` in batches of
-- `batch_rows` (bounded work per statement) and returns how many it deleted.
-- For each organization it records the newest deleted transaction in
-- relay.retention_horizons, so that a resume cursor reaching behind it gets
-- "cursor_expired" instead of silently missing rows.
CREATE FUNCTION relay.cleanup_old_events(
    keep interval DEFAULT '24 hours', batch_rows integer DEFAULT 5000
) RETURNS bigint
    LANGUAGE plpgsql VOLATILE SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    cutoff  timestamptz := now() - keep;
    deleted bigint;
    total   bigint := 0;
BEGIN
    IF keep IS NULL OR keep < interval '0' THEN
        RAISE EXCEPTION 'relay.cleanup_old_events: keep must be a non-negative interval, got %', keep;
    END IF;
    IF batch_rows IS NULL OR batch_rows < 1 THEN
        RAISE EXCEPTION 'relay.cleanup_old_events: batch_rows must be at least 1, got %', batch_rows;
    END IF;
    LOOP
        WITH doomed AS (
            SELECT e.id FROM relay.events AS e
            WHERE e.created_at < cutoff
            ORDER BY e.created_at
            LIMIT batch_rows
            -- No FOR UPDATE: under row-level security it needs an UPDATE policy,
            -- and none exists. Two concurrent runs are harmless: the second
            -- DELETE skips rows the first one removed.
        ), gone AS (
            DELETE FROM relay.events AS e USING doomed AS d
            WHERE e.id = d.id
            RETURNING e.organization_id, e.xid
        ), horizon AS (
            -- max() over xid8 only exists from PG 14 on; go through numeric for PG 13.
            INSERT INTO relay.retention_horizons AS h (organization_id, deleted_through)
            SELECT g.organization_id, max(g.xid::text::numeric)::text::xid8
            FROM gone AS g GROUP BY g.organization_id
            ON CONFLICT (organization_id) DO UPDATE
                SET deleted_through = greatest(h.deleted_through, excluded.deleted_through),
                    updated_at = now()
        )
        SELECT count(*) INTO deleted FROM gone;
        total := total + deleted;
        EXIT WHEN deleted < batch_rows;
    END LOOP;
    RETURN total;
END
$$;
COMMENT ON FUNCTION relay.cleanup_old_events(interval, integer) IS
    'Retention: delete events older than keep (default 24 h) in bounded batches; returns the count.';
REVOKE EXECUTE ON FUNCTION relay.cleanup_old_events(interval, integer) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION relay.cleanup_old_events(interval, integer) TO relay_daemon;
