"""pgrelay: relay org-scoped signals from Postgres to WebSocket clients."""

__version__ = "0.1.0"
