"""The daemon's side of Postgres: blocking psycopg code the trio shell runs in
worker threads, plus the one connection it waits on with trio.

- `pool`: the connection pool and the LISTEN connection's settings.
- `tail`: the live tail (listener and tail loop).
- `reads`: the reads: a tail step, a catch-up page, an authorization.
- `migrate`: `pgrelay migrate`.
"""
