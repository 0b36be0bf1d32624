-- 002_roles.sql — the three NOLOGIN group roles and what each may do.
--
-- WHY: least privilege, expressed as grants a DBA can audit. DBAs grant these
-- group roles to login roles; pgrelay never creates login roles.
--   relay_service    backends that emit signals: INSERT on the writer-owned
--                    columns and EXECUTE on relay.emit; no SELECT.
--   relay_subscriber reads under row-level security (003). Grant it only to
--                    roles that cannot run their own SQL (the daemon, PostgREST's
--                    authenticator): whoever can set request.jwt.claims can claim
--                    any organization.
--   relay_daemon     LISTEN, the tail/retention/epoch functions (004), and
--                    SET ROLE relay_subscriber. No direct SELECT: if a role
--                    switch silently failed, the daemon would read nothing
--                    instead of everything (fail closed).
-- Roles are cluster-wide: they are created only when missing, and never altered
-- afterwards except for the one attribute the design depends on (NOINHERIT).

DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = 'relay_service') THEN
        CREATE ROLE relay_service NOLOGIN;
    END IF;
    IF NOT EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = 'relay_subscriber') THEN
        CREATE ROLE relay_subscriber NOLOGIN;
    END IF;
    IF NOT EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = 'relay_daemon') THEN
        -- NOINHERIT: membership in relay_subscriber lets the daemon SET ROLE to
        -- it, but never read with its privileges implicitly.
        CREATE ROLE relay_daemon NOLOGIN NOINHERIT;
    END IF;
    IF NOT EXISTS (
        SELECT FROM pg_catalog.pg_auth_members m
        WHERE m.roleid = 'relay_subscriber'::regrole AND m.member = 'relay_daemon'::regrole
    ) THEN
        GRANT relay_subscriber TO relay_daemon;
    END IF;
END
$$;

REVOKE ALL ON SCHEMA relay FROM PUBLIC;
GRANT USAGE ON SCHEMA relay TO relay_service, relay_subscriber, relay_daemon;

REVOKE ALL ON relay.events FROM PUBLIC;
-- Writers own exactly these columns; never id, created_at or xid.
GRANT INSERT (organization_id, event_type, entity_type, entity_id, actor_id, payload, dedupe_key)
    ON relay.events TO relay_service;
-- Filtered by the row-level security policies in 003.
GRANT SELECT ON relay.events TO relay_subscriber;

REVOKE ALL ON relay.installation, relay.retention_horizons FROM PUBLIC;
