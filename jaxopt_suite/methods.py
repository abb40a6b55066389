"""Compatibility alias, kept for one release: ``jaxopt_suite.methods`` is
:mod:`jaxopt_suite.harness.recipes` (the same module object). New code imports
``jaxopt_suite.harness.recipes``.
"""

import sys

from jaxopt_suite.harness import recipes

sys.modules[__name__] = recipes
