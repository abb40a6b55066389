"""``python -m jaxopt_suite`` is the ``jaxopt-suite`` command."""

from jaxopt_suite.cli import main

raise SystemExit(main())
