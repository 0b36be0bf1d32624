"""Pure core: no trio, no psycopg, no sockets, no clock reads (`now` is passed in).

- `protocol`: wire protocol v1 codec (client messages, server frames, codes).
- `cursor`: pg snapshots, resume cursors, `plan_resume`.
- `session`: the per-connection state machine (inputs in, actions out).
- `registry`: org -> subscriptions for fan-out; event-type filters.
- `coalesce`: per-subscription `coalesce_ms` window.
- `outbox`: bounded per-connection queue for slow clients.
- `ratelimit`: token bucket.

Nothing is re-exported here, so importing one module stays cheap.
"""
