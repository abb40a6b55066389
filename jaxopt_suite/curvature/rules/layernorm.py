r"""The LayerNorm rule (linen ``nn.LayerNorm``, nnx ``nnx.LayerNorm``; default
``reduction_axes`` = ``feature_axes`` = -1, no ``mask``, no ``axis_name``: other calls take the
generic path).

:math:`y = \hat x \odot \gamma + \beta` over the last axis (recorded: :math:`\hat x`
(N, ..., D), :func:`normalised`): the
per-sample gradients are small (N, D), so they are formed and reduced,

.. math:: \hat g_{k,n}(\gamma) = \sum_t \delta_{k,n,t} \odot \hat x_{n,t}, \qquad
          \hat g_{k,n}(\beta) = \sum_t \delta_{k,n,t}.

Inputs in bfloat16 or float16 are widened to float32 (statistics accumulate in float32); the
engine casts the results to the leaf's dtype. ``kron`` (``kfac``/``kflr``) is the exact GGN
block :math:`(\sum_{k,n} \hat g_{k,n} \hat g_{k,n}^\top,)` of each 1-D leaf, what the generic
path gives uncovered 1-D leaves (:func:`jaxopt_suite.curvature.kron.generic_factors`).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

from jaxopt_suite.curvature import layers
from jaxopt_suite.curvature.config import EngineConfig
from jaxopt_suite.curvature.layers import LayerCall, ModuleCall
from jaxopt_suite.curvature.rules.base import LayerRule, check_statistic, wide


def _reduce(statistic: str, grads: jax.Array) -> jax.Array:
    """A statistic of materialised per-(column, sample) gradients ``grads`` (K, N, *leaf)."""
    if statistic == "individual":
        return grads[0]
    if statistic == "individual_sq_norm":
        return jnp.sum(grads[0].reshape(grads.shape[1], -1) ** 2, axis=1)
    if statistic == "sum_sq":
        return jnp.sum(grads**2, axis=(0, 1))
    if statistic == "individual_sum_sq":
        return jnp.sum(grads**2, axis=0)
    if statistic == "columns":
        return grads
    flat = grads.reshape(-1, grads.shape[-1])  # kron: 1-D leaves only
    return (flat.T @ flat,)


def layernorm_gradients(role: str, normalised: jax.Array, delta: jax.Array) -> jax.Array:
    r"""Per-(column, sample) gradients (K, N, D) of LayerNorm's scale or bias.

    .. math:: \hat g_{k,n}(\gamma) = \sum_t \delta_{k,n,t} \odot \hat x_{n,t}, \qquad
              \hat g_{k,n}(\beta) = \sum_t \delta_{k,n,t}

    Args:
      role: ``"kernel"`` (the scale :math:`\gamma`) or ``"bias"`` (:math:`\beta`).
      normalised: :math:`\hat x` (N, ..., D).
      delta: output cotangents (K, N, ..., D).

    Returns:
      (K, N, D), in float32 at least.

    Example:
      >>> import jax.numpy as jnp
      >>> layernorm_gradients("kernel", jnp.ones((2, 3, 4)), jnp.ones((1, 2, 3, 4))).shape
      (1, 2, 4)
    """
    if role not in ("kernel", "bias"):
        raise ValueError(f"role must be 'kernel' (the scale) or 'bias'; got {role!r}")
    k, n, d = delta.shape[0], delta.shape[1], delta.shape[-1]
    delta = wide(delta).reshape(k, n, -1, d)
    if role == "bias":
        return jnp.sum(delta, axis=2)
    x = wide(normalised).reshape(n, -1, d)
    return jnp.einsum("ntd,kntd->knd", x, delta)


def layernorm(statistic: str, role: str, normalised: jax.Array, delta: jax.Array) -> jax.Array:
    """A statistic (:data:`~jaxopt_suite.curvature.rules.base.ALL_STATISTICS`) of LayerNorm's
    scale (``role="kernel"``) or bias from :func:`layernorm_gradients`."""
    check_statistic(statistic)
    if statistic in ("individual", "individual_sq_norm"):
        delta = delta[:1]  # first-order statistics use the single gradient column
    return _reduce(statistic, layernorm_gradients(role, normalised, delta))


def normalised(x: jax.Array, epsilon: float, fast_variance: bool, dtype: Any) -> jax.Array:
    r"""LayerNorm's normalised input over the last axis, without scale and bias.

    .. math:: \hat x = (x - \mu) / \sqrt{\sigma^2 + \epsilon}, \quad \mu = \bar x, \quad
       \sigma^2 = \overline{x^2} - \mu^2 \ (\text{clipped at 0; fast}) \text{ or }
       \overline{(x - \mu)^2}

    as flax computes it, in float32 at least (``dtype``: the module's, or None for ``x``'s);
    ``stop_gradient`` on ``x``: only the value is recorded, and it adds no nonlinear nodes to
    the model's differentiated graph.

    Args:
      x: the LayerNorm input (..., D).
      epsilon: the module's epsilon.
      fast_variance: the module's ``use_fast_variance``.
      dtype: the module's ``dtype`` (None: ``x.dtype``).

    Returns:
      :math:`\hat x`, shaped like ``x``.
    """
    x = lax.stop_gradient(x)
    x = x.astype(jnp.promote_types(dtype or x.dtype, jnp.float32))
    mean = jnp.mean(x, axis=-1, keepdims=True)
    if fast_variance:
        var = jnp.maximum(0.0, jnp.mean(lax.square(x), axis=-1, keepdims=True) - mean**2)
    else:
        var = jnp.mean(lax.square(x - mean), axis=-1, keepdims=True)
    return (x - mean) * lax.rsqrt(var + epsilon)


def _default_axes(ndim: int, axes: Any) -> bool:
    """True when ``axes`` names the last axis only (LayerNorm's default)."""
    axes = axes if isinstance(axes, tuple | list) else (axes,)
    return ndim >= 2 and {ndim + a if a < 0 else a for a in axes} == {ndim - 1}


def _record(module: Any, args: tuple, kwargs: dict):
    """What the rule records (:func:`normalised`), or None when the call is outside it."""
    x = args[0] if args else None
    if (
        not isinstance(x, jax.Array)
        or kwargs.get("mask") is not None
        or getattr(module, "axis_name", None) is not None
        or not _default_axes(x.ndim, module.reduction_axes)
        or not _default_axes(x.ndim, module.feature_axes)
    ):
        return None
    fast = getattr(module, "use_fast_variance", True)
    return lambda: normalised(x, module.epsilon, fast, module.dtype)


def _bind_linen(module: nn.LayerNorm, args: tuple, kwargs: dict) -> ModuleCall:
    scale = module.get_variable("params", "scale") if module.use_scale else None
    bias = module.get_variable("params", "bias") if module.use_bias else None
    return ModuleCall(scale, bias, _record(module, args, kwargs))


def _bind_nnx(module: nnx.LayerNorm, args: tuple, kwargs: dict) -> ModuleCall:
    scale, bias = layers.nnx_value(module.scale), layers.nnx_value(module.bias)
    return ModuleCall(scale, bias, _record(module, args, kwargs))


class LayerNormRule(LayerRule):
    """LayerNorm's scale (role ``"kernel"``) and bias: per-sample gradients formed and
    reduced (:func:`layernorm`)."""

    kind = "layernorm"
    interception = layers.ModuleInterception(
        linen={nn.LayerNorm: _bind_linen}, nnx={nnx.LayerNorm: _bind_nnx}
    )

    def statistic(self, statistic, call, role, prepared, delta, config: EngineConfig):
        return layernorm(statistic, role, prepared, delta)

    def columns(self, call: LayerCall, role, prepared, delta):
        return layernorm("columns", role, prepared, delta)

    def kron(self, call: LayerCall, role, prepared, delta):
        return layernorm("kron", role, prepared, delta)

    def weighted_sum(self, call: LayerCall, role, prepared, delta, weights, config: EngineConfig):
        grads = layernorm_gradients(role, prepared, delta[:1])[0]  # (N, D)
        return jnp.einsum("n,nd->d", weights.astype(grads.dtype), grads)


LAYERNORM = LayerNormRule()
