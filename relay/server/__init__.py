"""`pgrelay serve`: the trio shell around the pure core.

- `app`: the daemon's wiring, start-up order and shutdown.
- `hub`: the fan-out index and the delivery of tail pages.
- `connection`: one WebSocket client; carries out its Session's actions.
- `admission`: every connection count (total, per address, per user, stopping).
- `scheduler`: one timer task and one nursery for every connection.
- `jwt`: token verification (PyJWT).
- `admin`: /healthz, /readyz, /metrics; `metrics`: the Prometheus registry.
- `sdnotify`: systemd's READY/WATCHDOG notifications.
- `workers`: `--workers N`, the supervisor and its worker processes on one port.
"""
