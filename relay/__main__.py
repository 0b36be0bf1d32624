"""`python -m relay` is the same as the `pgrelay` command."""

from relay.cli import main

raise SystemExit(main())
