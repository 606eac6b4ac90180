"""``python -m gateway`` is the ``geopera-gateway`` command."""

from gateway.cli import main

raise SystemExit(main())
