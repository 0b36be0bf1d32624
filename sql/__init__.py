"""The migration files, shipped inside the package as relay.sql (see pyproject.toml)."""
