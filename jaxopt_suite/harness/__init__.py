"""The harness around the library: everything that trains, measures and compares methods.

* :mod:`~jaxopt_suite.harness.train`: the jitted training step, its gradient functions
  (``backprop``, ``curvature_gradient``, ``value_fn_gradient``) and the timed loop;
* :mod:`~jaxopt_suite.harness.zoo`: the models; :mod:`~jaxopt_suite.harness.data`: the datasets;
* :mod:`~jaxopt_suite.harness.recipes`: the methods of ``compare``, one explicit list;
* :mod:`~jaxopt_suite.harness.benchmarking`: timing and memory helpers of ``benchmarks/``;
* :mod:`~jaxopt_suite.harness.cli`: the ``jaxopt-suite`` command.

The harness imports the library; no library module imports the harness
(``tests/test_architecture.py`` checks it).
"""
