"""The ``proxprop`` method of ``jaxopt-suite compare``: ProxProp hidden layers (Dense and
Conv), a plain output layer, Nesterov momentum 0.95, as in the paper's MLP experiment."""

from __future__ import annotations

import functools

import optax

from jaxopt_suite import methods
from jaxopt_suite.proxprop.linen import ProxPropConv, ProxPropDense

# The paper's MLP setting: tau = 0.05 with learning rate 1 (against backprop at lr 0.05).
TAU_PROX = 0.05
LEARNING_RATE = 1.0
MOMENTUM = 0.95


def _build(config: methods.RunConfig, mode: str) -> methods.Setup:
    del config
    layers = {
        "dense": functools.partial(ProxPropDense, tau_prox=TAU_PROX, optimization_mode=mode),
        "conv": functools.partial(ProxPropConv, tau_prox=TAU_PROX, optimization_mode=mode),
    }
    tx = optax.sgd(LEARNING_RATE, momentum=MOMENTUM, nesterov=True)
    return methods.Setup(tx=tx, layers=layers)


def compare_methods() -> list[methods.Method]:
    """``proxprop`` (cg3) and ``proxprop-exact``: ProxProp hidden layers, tau 0.05, Nesterov
    SGD lr 1 momentum 0.95; the output layer stays plain."""
    return [
        methods.Method(
            "proxprop",
            f"ProxProp cg3 hidden layers, tau {TAU_PROX}, Nesterov lr {LEARNING_RATE} m {MOMENTUM}",
            functools.partial(_build, mode="prox_cg3"),
        ),
        methods.Method(
            "proxprop-exact",
            f"ProxProp exact hidden layers, tau {TAU_PROX}, Nesterov lr {LEARNING_RATE} "
            f"m {MOMENTUM}",
            functools.partial(_build, mode="prox_exact"),
        ),
    ]
