"""Compatibility alias, kept for one release: ``jaxopt_suite.cli`` is
:mod:`jaxopt_suite.harness.cli`, the same module object (private names and monkeypatching
work as before). New code imports ``jaxopt_suite.harness.cli``.
"""

import sys

from jaxopt_suite.harness import cli

sys.modules[__name__] = cli
