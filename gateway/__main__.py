"""``python -m gateway`` is the ``geopera-gateway`` command."""

from gateway.cli.main import main

raise SystemExit(main())
