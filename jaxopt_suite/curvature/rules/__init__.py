"""Per-layer-kind derivative rules and their registry.

One module per kind (:mod:`~jaxopt_suite.curvature.rules.dense`,
:mod:`~jaxopt_suite.curvature.rules.conv`, :mod:`~jaxopt_suite.curvature.rules.layernorm`,
:mod:`~jaxopt_suite.curvature.rules.embed`), each exporting one rule object (a
:class:`~jaxopt_suite.curvature.rules.base.LayerRule`) with every operation the engine needs;
:mod:`~jaxopt_suite.curvature.rules.linear` holds what Dense and Conv share. The engine finds a
layer's rule by its kind (:func:`get_rule`); :func:`register_rule` adds a kind
(``docs/curvature_rules.md``).
"""

from typing import Any

import jax

from jaxopt_suite.curvature.config import DEFAULT, EngineConfig
from jaxopt_suite.curvature.layers import LayerCall
from jaxopt_suite.curvature.rules.base import (
    ALL_STATISTICS,
    ROLES,
    STATISTICS,
    LayerRule,
    get_rule,
    register_rule,
    registered_kinds,
)
from jaxopt_suite.curvature.rules.conv import CONV
from jaxopt_suite.curvature.rules.dense import DENSE
from jaxopt_suite.curvature.rules.embed import EMBED
from jaxopt_suite.curvature.rules.layernorm import LAYERNORM

for _rule in (DENSE, CONV, LAYERNORM, EMBED):
    register_rule(_rule)


def prepare(call: LayerCall, x: jax.Array) -> jax.Array:
    """What the rule of ``call`` consumes, from the recorded layer input ``x``."""
    return get_rule(call.kind).prepare(call, x)


def layer_statistic(
    statistic: str,
    call: LayerCall,
    role: str,
    prepared: jax.Array,
    delta: jax.Array,
    config: EngineConfig = DEFAULT,
) -> Any:
    """One statistic (:data:`ALL_STATISTICS`) of the leaf in ``role`` of ``call``, by its rule;
    ``prepared`` is :func:`prepare` of the layer input, ``delta`` the (K, N, ...) cotangents."""
    rule = get_rule(call.kind)
    if statistic == "columns":
        return rule.columns(call, role, prepared, delta)
    if statistic == "kron":
        return rule.kron(call, role, prepared, delta)
    return rule.statistic(statistic, call, role, prepared, delta, config)


__all__ = [
    "ALL_STATISTICS",
    "ROLES",
    "STATISTICS",
    "LayerRule",
    "get_rule",
    "layer_statistic",
    "prepare",
    "register_rule",
    "registered_kinds",
]
