-- 003_row_security.sql — who may see which rows: row-level security.
--
-- WHY: the daemon never decides who may see what; it asks SQL under the
-- client's own claims. RLS is enabled and FORCED, so that even the table owner
-- goes through policies (the SECURITY DEFINER functions in 004 run as the owner,
-- who is not assumed to be a superuser, and get explicit owner policies).
-- No UPDATE policy exists: rows are immutable. Only the owner may DELETE, and
-- only relay.cleanup_old_events() does.
--
-- relay.user_organizations() is THE hook DBAs own: replace it with a lookup in
-- your membership table (README shows how). This file creates it, and each
-- policy, only when missing, and never replaces them: later migrations keep
-- your version.

ALTER TABLE relay.events ENABLE ROW LEVEL SECURITY;
ALTER TABLE relay.events FORCE ROW LEVEL SECURITY;

DO $body$
BEGIN
    IF to_regprocedure('relay.user_organizations()') IS NULL THEN
        -- Default: the organizations named in the request's JWT claims, as set
        -- by PostgREST/Supabase or by pgrelay: claim "org_id" (one uuid) and
        -- claim "org_ids" (array of uuids). Missing, empty or malformed claims
        -- and non-uuid entries mean "no organizations", never an error.
        CREATE FUNCTION relay.user_organizations() RETURNS SETOF uuid
            LANGUAGE plpgsql STABLE
            SET search_path = pg_catalog, pg_temp
        AS $fn$
        DECLARE
            claims jsonb;
            uuid_re CONSTANT text :=
                '^\{?[0-9a-fA-F]{8}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{12}\}?$';
        BEGIN
            BEGIN
                claims := nullif(current_setting('request.jwt.claims', true), '')::jsonb;
            EXCEPTION WHEN invalid_text_representation THEN
                RETURN;  -- malformed JSON: no organizations
            END;
            IF claims IS NULL OR jsonb_typeof(claims) <> 'object' THEN
                RETURN;
            END IF;
            IF jsonb_typeof(claims -> 'org_id') = 'string' AND (claims ->> 'org_id') ~ uuid_re THEN
                RETURN NEXT (claims ->> 'org_id')::uuid;
            END IF;
            IF jsonb_typeof(claims -> 'org_ids') = 'array' THEN
                RETURN QUERY
                    SELECT DISTINCT (e #>> '{}')::uuid
                    FROM jsonb_array_elements(claims -> 'org_ids') AS e
                    WHERE jsonb_typeof(e) = 'string' AND (e #>> '{}') ~ uuid_re;
            END IF;
            RETURN;
        END
        $fn$;
        COMMENT ON FUNCTION relay.user_organizations() IS
            'DBA-owned hook: organizations the current request may read. Default: claims org_id/org_ids.';
        REVOKE EXECUTE ON FUNCTION relay.user_organizations() FROM PUBLIC;
        GRANT EXECUTE ON FUNCTION relay.user_organizations() TO relay_subscriber;
    END IF;

    -- Subscribers read only their organizations.
    IF NOT EXISTS (SELECT FROM pg_catalog.pg_policy
                   WHERE polrelid = 'relay.events'::regclass AND polname = 'subscriber_read_own_orgs') THEN
        CREATE POLICY subscriber_read_own_orgs ON relay.events
            FOR SELECT TO relay_subscriber
            USING (organization_id IN (SELECT relay.user_organizations()));
    END IF;

    -- Backends insert (column grants in 002 limit what they may set).
    IF NOT EXISTS (SELECT FROM pg_catalog.pg_policy
                   WHERE polrelid = 'relay.events'::regclass AND polname = 'service_insert') THEN
        CREATE POLICY service_insert ON relay.events
            FOR INSERT TO relay_service
            WITH CHECK (true);
    END IF;

    -- The owner: the role running these migrations, which also owns the
    -- SECURITY DEFINER functions in 004 (tail, emit, retention).
    IF NOT EXISTS (SELECT FROM pg_catalog.pg_policy
                   WHERE polrelid = 'relay.events'::regclass AND polname = 'owner_select') THEN
        CREATE POLICY owner_select ON relay.events FOR SELECT TO CURRENT_USER USING (true);
    END IF;
    IF NOT EXISTS (SELECT FROM pg_catalog.pg_policy
                   WHERE polrelid = 'relay.events'::regclass AND polname = 'owner_insert') THEN
        CREATE POLICY owner_insert ON relay.events FOR INSERT TO CURRENT_USER WITH CHECK (true);
    END IF;
    IF NOT EXISTS (SELECT FROM pg_catalog.pg_policy
                   WHERE polrelid = 'relay.events'::regclass AND polname = 'owner_delete') THEN
        CREATE POLICY owner_delete ON relay.events FOR DELETE TO CURRENT_USER USING (true);
    END IF;
END
$body$;
