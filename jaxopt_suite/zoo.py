"""Compatibility alias, kept for one release: ``jaxopt_suite.zoo`` is
:mod:`jaxopt_suite.harness.zoo`, the same module object (private names and monkeypatching
work as before). New code imports ``jaxopt_suite.harness.zoo``.
"""

import sys

from jaxopt_suite.harness import zoo

sys.modules[__name__] = zoo
