"""jaxopt_suite: research optimisation methods as optax transformations.

* AliG: :func:`scale_by_alig`, :func:`alig` (step size from the loss value).
* Proximal steps and auto-sizing: :mod:`jaxopt_suite.prox` (operators), :func:`proximal`,
  :func:`group_sparsity`, :mod:`jaxopt_suite.autosize` (``live_units``, ``shrink``).
* BackPACK quantities: :mod:`jaxopt_suite.curvature` (``value_and_grad`` with per-sample and
  curvature extras) and the preconditioners fed by them.
* Forward gradient: :func:`forward_grad`, :func:`value_and_forward_grad`,
  :func:`forward_gradient`.
* ProxProp: :mod:`jaxopt_suite.proxprop` (``custom_vjp`` ops, linen and nnx layers).
* Per-sample clipping and DP-SGD from the curvature engine's pass, with the privacy account:
  :mod:`jaxopt_suite.privacy`.
* Extra arguments of ``update`` through flax and optax wrappers: :class:`TrainState` (linen),
  :func:`bind_extra_args` (e.g. inside ``optax.lookahead``).
* The harness around them: :mod:`jaxopt_suite.harness` (training loop, models, datasets,
  ``compare`` recipes, CLI); ``train``, ``zoo``, ``data``, ``benchmarking``, ``cli`` and
  ``methods`` (the recipes) are its modules under their former names.

Names are imported on first use, so ``import jaxopt_suite`` stays fast and pulls in only
jax, optax and flax as they are needed. ``alig`` and ``proximal`` are always the functions:
their modules live in ``jaxopt_suite._src``, so no submodule import rebinds those names.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public modules: name -> the module itself
_MODULES: dict[str, str] = {
    # the harness (training loop, models, data, recipes, CLI); the library never imports it
    "harness": "jaxopt_suite.harness",
    "data": "jaxopt_suite.harness.data",
    "zoo": "jaxopt_suite.harness.zoo",
    "train": "jaxopt_suite.harness.train",
    "methods": "jaxopt_suite.harness.recipes",
    "benchmarking": "jaxopt_suite.harness.benchmarking",
    "cli": "jaxopt_suite.harness.cli",
    # the library's modules
    "sharding": "jaxopt_suite.sharding",
    "prox": "jaxopt_suite.prox",
    "autosize": "jaxopt_suite.autosize",
    "curvature": "jaxopt_suite.curvature",
    "precondition": "jaxopt_suite.precondition",
    "kronecker": "jaxopt_suite.kronecker",
    "fwdgrad": "jaxopt_suite.fwdgrad",
    "proxprop": "jaxopt_suite.proxprop",
    "privacy": "jaxopt_suite.privacy",
    "train_state": "jaxopt_suite.train_state",
}

# public functions and classes: name -> the module that defines it
_NAMES: dict[str, str] = {
    # AliG
    "alig": "jaxopt_suite._src.alig",
    "scale_by_alig": "jaxopt_suite._src.alig",
    "ScaleByAligState": "jaxopt_suite._src.alig",
    "project_l2_ball": "jaxopt_suite._src.alig",
    # proximal steps
    "proximal": "jaxopt_suite._src.proximal",
    "group_sparsity": "jaxopt_suite._src.proximal",
    # curvature-fed preconditioners
    "scale_by_diagonal_curvature": "jaxopt_suite.precondition",
    "diag_ggn_sgd": "jaxopt_suite.precondition",
    "scale_by_kronecker": "jaxopt_suite.kronecker",
    "kfac_sgd": "jaxopt_suite.kronecker",
    # forward gradient
    "forward_grad": "jaxopt_suite.fwdgrad",
    "value_and_forward_grad": "jaxopt_suite.fwdgrad",
    "forward_gradient": "jaxopt_suite.fwdgrad",
    # extra arguments of update through flax's TrainState and optax wrappers
    "TrainState": "jaxopt_suite.train_state",
    "bind_extra_args": "jaxopt_suite.train_state",
}

__all__ = sorted({*_MODULES, *_NAMES})


def __getattr__(name: str) -> Any:
    # A module is looked up as such, never as an attribute of itself: ``train_state`` is also
    # the name of the flax module that jaxopt_suite.train_state imports.
    if name in _MODULES:
        value = importlib.import_module(_MODULES[name])
    elif name in _NAMES:
        value = getattr(importlib.import_module(_NAMES[name]), name)
    else:
        raise AttributeError(f"module 'jaxopt_suite' has no attribute {name!r}")
    globals()[name] = value
    return value
