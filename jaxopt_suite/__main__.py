"""``python -m jaxopt_suite`` is the ``jaxopt-suite`` command."""

from jaxopt_suite.harness.cli import main

raise SystemExit(main())
