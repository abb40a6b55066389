"""Compatibility alias, kept for one release: ``jaxopt_suite.data`` is
:mod:`jaxopt_suite.harness.data`, the same module object (private names and monkeypatching
work as before). New code imports ``jaxopt_suite.harness.data``.
"""

import sys

from jaxopt_suite.harness import data

sys.modules[__name__] = data
