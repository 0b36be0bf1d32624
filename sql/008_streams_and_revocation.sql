-- 008_streams_and_revocation.sql — single-use tickets for event streams, and
-- the hint that a membership changed.
--
-- WHY (tickets): a browser's EventSource cannot send an Authorization header,
-- and a JWT must never travel in a URL (proxies and servers log URLs). So the
-- app first POSTs its token to /v1/tickets and gets a random ticket, valid 30
-- seconds and usable once, which the stream's URL carries instead. The ticket
-- must work on whichever daemon the load balancer picks: the database is the
-- only thing the daemons share, so tickets live here. A ticket row holds the
-- token it stands for (re-verified when redeemed) for at most 30 seconds.
--
-- WHY (revocation): a membership revoked in the application's own tables
-- should stop delivery within a second, not at the next periodic recheck. A
-- trigger on the DBA's membership table calls relay.notify_membership_changed
-- with the user (the token's `sub`); the daemons recheck that user's
-- subscriptions in SQL. The notification is only a hint: anyone who can
-- connect can NOTIFY, so a forged one costs a recheck and nothing more.

CREATE TABLE IF NOT EXISTS relay.stream_tickets (
    ticket     text PRIMARY KEY CHECK (length(ticket) BETWEEN 16 AND 128),
    token      text NOT NULL CHECK (length(token) <= 16384),
    expires_at timestamptz NOT NULL
);
COMMENT ON TABLE relay.stream_tickets IS
    'Single-use tickets for GET /v1/stream (30 s). No role is granted anything on it:
     only the two SECURITY DEFINER functions below (run as the owner) touch it.';

-- relay.create_stream_ticket: the daemon (relay_daemon) stores a verified token
-- under a random ticket; expired tickets are swept on the way (bounded work).
CREATE OR REPLACE FUNCTION relay.create_stream_ticket(ticket text, token text, ttl interval)
    RETURNS void
    LANGUAGE plpgsql VOLATILE SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF ttl IS NULL OR ttl <= interval '0' OR ttl > interval '5 minutes' THEN
        RAISE EXCEPTION 'relay.create_stream_ticket: ttl must be in (0, 5 minutes], got %', ttl;
    END IF;
    DELETE FROM relay.stream_tickets AS t
    WHERE t.ctid IN (SELECT s.ctid FROM relay.stream_tickets AS s
                     WHERE s.expires_at < now() LIMIT 100);
    INSERT INTO relay.stream_tickets (ticket, token, expires_at)
    VALUES (create_stream_ticket.ticket, create_stream_ticket.token, now() + ttl);
END
$$;
REVOKE EXECUTE ON FUNCTION relay.create_stream_ticket(text, text, interval) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION relay.create_stream_ticket(text, text, interval) TO relay_daemon;

-- relay.redeem_stream_ticket: the token a live ticket stands for, once
-- (the row is deleted); NULL for an unknown, used or expired ticket.
CREATE OR REPLACE FUNCTION relay.redeem_stream_ticket(ticket text) RETURNS text
    LANGUAGE sql VOLATILE SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
AS $$
    DELETE FROM relay.stream_tickets AS t
    WHERE t.ticket = redeem_stream_ticket.ticket
    RETURNING CASE WHEN t.expires_at > now() THEN t.token END
$$;
REVOKE EXECUTE ON FUNCTION relay.redeem_stream_ticket(text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION relay.redeem_stream_ticket(text) TO relay_daemon;

-- relay.notify_membership_changed: call it (from a trigger on your membership
-- table, or from your backend) when what relay.user_organizations() returns for
-- `subject` (the token's `sub`) may have changed. Every daemon rechecks that
-- subject's subscriptions within about a second. EXECUTE for relay_service.
CREATE OR REPLACE FUNCTION relay.notify_membership_changed(subject text) RETURNS void
    LANGUAGE plpgsql VOLATILE SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF subject IS NULL OR length(subject) NOT BETWEEN 1 AND 256 THEN
        RAISE EXCEPTION 'relay.notify_membership_changed: subject must be 1 to 256 characters';
    END IF;
    PERFORM pg_notify('relay_membership', subject);
END
$$;
COMMENT ON FUNCTION relay.notify_membership_changed(text) IS
    'Hint to the daemons: recheck this subject''s subscriptions now (e.g. after a revoked membership).';
REVOKE EXECUTE ON FUNCTION relay.notify_membership_changed(text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION relay.notify_membership_changed(text) TO relay_service;
