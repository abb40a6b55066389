"""Implementation modules of the methods whose public name is a function of the package.

``jaxopt_suite.alig`` and ``jaxopt_suite.proximal`` are optax transformations; their modules
live here (as optax keeps ``optax.adam`` in ``optax/_src/alias.py``) so that no submodule of
``jaxopt_suite`` shares their names and importing a module never rebinds them. Import the public
names from ``jaxopt_suite``.
"""
