-- 001_events.sql — the schema, the events table, and the indexes each query needs.
--
-- WHY: backends write small, immutable, organization-scoped signals here in
-- the same transaction as the change they describe. The daemon tails this
-- table by transaction visibility (column xid), never by id, because ids are
-- handed out at INSERT but become visible at COMMIT: "id > last_seen" would
-- silently skip a row whose transaction committed late.
--
-- Everything that limits what may be stored lives here as a CHECK, so that a
-- DBA can read every rule in one place.

CREATE SCHEMA IF NOT EXISTS relay;
COMMENT ON SCHEMA relay IS 'pgrelay: org-scoped change signals relayed to WebSocket clients';

-- One row, written once: identifies this installation. Part of the cursor
-- epoch, so that a cursor issued by another database forces a resync.
CREATE TABLE relay.installation (
    singleton   boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    install_id  uuid NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);
-- gen_random_uuid() is core only from PG 13 on, which is our minimum anyway.
INSERT INTO relay.installation (install_id) VALUES (gen_random_uuid());

CREATE TABLE relay.events (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    organization_id uuid NOT NULL,
    -- dotted lower-case words: job.created, evidence.uploaded
    event_type      text NOT NULL
        CONSTRAINT events_event_type_format
        CHECK (event_type ~ '^[a-z][a-z0-9_]*(\.[a-z][a-z0-9_]*)+$' AND length(event_type) <= 100),
    entity_type     text NOT NULL
        CONSTRAINT events_entity_type_format
        CHECK (entity_type ~ '^[a-z][a-z0-9_]*$' AND length(entity_type) <= 64),
    entity_id       text NOT NULL
        CONSTRAINT events_entity_id_length CHECK (length(entity_id) BETWEEN 1 AND 256),
    actor_id        text
        CONSTRAINT events_actor_id_length CHECK (length(actor_id) <= 256),
    -- The hard limit: a signal is an invalidation hint, not a copy of the row.
    -- relay.emit() turns an oversized payload into a marker instead of failing.
    payload         jsonb NOT NULL DEFAULT '{}'
        CONSTRAINT events_payload_max_2kb CHECK (octet_length(payload::text) <= 2048)
        CONSTRAINT events_payload_is_object CHECK (jsonb_typeof(payload) = 'object'),
    dedupe_key      text
        CONSTRAINT events_dedupe_key_length CHECK (length(dedupe_key) BETWEEN 1 AND 256),
    created_at      timestamptz NOT NULL DEFAULT now(),
    -- The writing transaction. Writers cannot set it (no INSERT grant on this
    -- column): a forged xid would hide the row from the tail forever.
    xid             xid8 NOT NULL DEFAULT pg_current_xact_id()
);

COMMENT ON TABLE relay.events IS
    'Immutable org-scoped signals. Insert with relay.emit(); retention: relay.cleanup_old_events().';
COMMENT ON COLUMN relay.events.xid IS
    'Writing transaction (pg_current_xact_id()); the daemon tails by snapshot visibility of this column.';
COMMENT ON COLUMN relay.events.dedupe_key IS
    'Optional; unique per organization until retention removes the row.';

-- The live tail: rows not visible in the previous snapshot
-- (xid >= xmax OR xid = ANY(xip)), as a BitmapOr over this index.
CREATE INDEX events_xid_idx ON relay.events (xid);
-- Catch-up for one organization from a client's cursor: the same predicate
-- within one organization.
CREATE INDEX events_org_xid_idx ON relay.events (organization_id, xid);
-- Dedupe: relay.emit() uses ON CONFLICT on exactly this index.
CREATE UNIQUE INDEX events_org_dedupe_key_uidx ON relay.events (organization_id, dedupe_key)
    WHERE dedupe_key IS NOT NULL;
-- For DBAs' own queries: "what happened in org X lately", "history of entity
-- Y", "how many job.* events", and for retention's scan by age.
CREATE INDEX events_org_created_at_idx ON relay.events (organization_id, created_at DESC);
CREATE INDEX events_entity_idx ON relay.events (entity_type, entity_id);
CREATE INDEX events_event_type_idx ON relay.events (event_type);
CREATE INDEX events_created_at_idx ON relay.events (created_at);

-- Per organization, the newest transaction whose rows retention has deleted.
-- A client cursor that did not yet see such a row cannot be resumed exactly:
-- it gets {"type":"resync","reason":"cursor_expired"}.
CREATE TABLE relay.retention_horizons (
    organization_id uuid PRIMARY KEY,
    deleted_through xid8 NOT NULL,
    updated_at      timestamptz NOT NULL DEFAULT now()
);
COMMENT ON TABLE relay.retention_horizons IS
    'Written by relay.cleanup_old_events(); read by the daemon to expire resume cursors.';
