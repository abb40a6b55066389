"""Compatibility alias, kept for one release: ``jaxopt_suite.benchmarking`` is
:mod:`jaxopt_suite.harness.benchmarking`, the same module object (private names and monkeypatching
work as before). New code imports ``jaxopt_suite.harness.benchmarking``.
"""

import sys

from jaxopt_suite.harness import benchmarking

sys.modules[__name__] = benchmarking
