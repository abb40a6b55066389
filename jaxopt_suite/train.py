"""Compatibility alias, kept for one release: ``jaxopt_suite.train`` is
:mod:`jaxopt_suite.harness.train`, the same module object (private names and monkeypatching
work as before). New code imports ``jaxopt_suite.harness.train``.
"""

import sys

from jaxopt_suite.harness import train

sys.modules[__name__] = train
