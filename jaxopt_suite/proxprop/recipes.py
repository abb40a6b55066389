"""The ProxProp methods of ``jaxopt-suite compare``: ProxProp hidden layers (Dense and Conv), a
plain output layer, and the paper's two optimizer settings.

* ``proxprop`` / ``proxprop-exact``: the paper's MLP setting, tau 0.05 with Nesterov SGD lr 1
  momentum 0.95 (backprop's counterpart is lr 0.05), cg3 or the exact solve;
* ``proxprop-adam``: the paper's ConvNet setting, tau 1, cg3, Adam lr 1e-3.
"""

from __future__ import annotations

import functools

import optax

from jaxopt_suite import methods
from jaxopt_suite.proxprop.linen import ProxPropConv, ProxPropDense


def _build(config: methods.RunConfig, mode: str, tau: float, adam: bool) -> methods.Setup:
    del config
    layers = {
        "dense": functools.partial(ProxPropDense, tau_prox=tau, optimization_mode=mode),
        "conv": functools.partial(ProxPropConv, tau_prox=tau, optimization_mode=mode),
    }
    tx = optax.adam(1e-3) if adam else optax.sgd(1.0, momentum=0.95, nesterov=True)
    return methods.Setup(tx=tx, layers=layers)


def compare_methods() -> list[methods.Method]:
    """``proxprop``, ``proxprop-exact`` (MLP setting) and ``proxprop-adam`` (ConvNet setting)."""
    nesterov = "Nesterov SGD lr 1 momentum 0.95"
    return [
        methods.Method(
            "proxprop",
            f"ProxProp hidden layers, cg3, tau 0.05, {nesterov} (paper's MLP setting)",
            functools.partial(_build, mode="prox_cg3", tau=0.05, adam=False),
        ),
        methods.Method(
            "proxprop-exact",
            f"ProxProp hidden layers, exact solve, tau 0.05, {nesterov}",
            functools.partial(_build, mode="prox_exact", tau=0.05, adam=False),
        ),
        methods.Method(
            "proxprop-adam",
            "ProxProp hidden layers, cg3, tau 1, Adam lr 1e-3 (paper's ConvNet setting)",
            functools.partial(_build, mode="prox_cg3", tau=1.0, adam=True),
        ),
    ]
