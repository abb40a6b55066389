r"""Maths shared by the rules of linear layers (Dense, Conv): reductions of per-(column,
sample) gradients and the bias, :math:`\hat g_{k,n}(b) = \sum_t \delta_{k,n,t}` for a bias
added at every position t."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxopt_suite.curvature import kron
from jaxopt_suite.curvature.rules.base import STATISTICS

# Arrays up to this many entries are summed by one reduce (the strided loop saves nothing there).
_SMALL_SUM = 1 << 16


def sum_leading(a: jax.Array) -> jax.Array:
    """Sum over the leading axis of ``a``, as a tree of elementwise additions of halves.

    Same value as ``jnp.sum(a, axis=0)`` (pairwise, so no less accurate), but XLA on CPU
    reduces the leading (major) axis of a large array as a strided loop, which the halving
    avoids.

    Args:
      a: an array with at least one axis.

    Returns:
      ``a`` summed over axis 0, shape ``a.shape[1:]``, in ``a``'s dtype.

    Example:
      >>> import jax.numpy as jnp
      >>> sum_leading(jnp.arange(6.0).reshape(3, 2))
      Array([6., 9.], dtype=float32)
    """
    if a.size <= _SMALL_SUM:  # one reduce: fewer operations to compile, no time to gain
        return jnp.sum(a, axis=0)
    while a.shape[0] > 1:
        half = a.shape[0] // 2
        head = a[:half] + a[half : 2 * half]
        if a.shape[0] % 2:
            head = head.at[0].add(a[-1])
        a = head
    return a[0]


def reduce_individual(statistic: str, grads: jax.Array) -> jax.Array:
    """A statistic from materialised per-(column, sample) gradients ``grads`` (K, N, *leaf)."""
    if statistic == "individual":
        return grads[0]
    if statistic == "individual_sq_norm":
        g = grads[0]
        return jnp.sum(g.reshape(g.shape[0], -1) ** 2, axis=1)
    if statistic == "sum_sq":
        return sum_leading(grads.reshape(-1, *grads.shape[2:]) ** 2)
    if statistic == "individual_sum_sq":
        return sum_leading(grads**2)
    raise ValueError(f"unknown statistic {statistic!r}; valid: {STATISTICS}")


def bias_gradients(delta: jax.Array) -> jax.Array:
    """``(K, N, out)``: the bias gradient :math:`\\sum_t \\delta_{k,n,t}` of every column."""
    k, n = delta.shape[:2]
    return delta.reshape(k, n, -1, delta.shape[-1]).sum(axis=2)


def bias_statistic(statistic: str, delta: jax.Array) -> jax.Array:
    """A statistic of a bias (out,) added to every position."""
    return reduce_individual(statistic, bias_gradients(delta))


def bias_factors(delta: jax.Array) -> tuple[jax.Array]:
    """``(G_b,)``: the exact GGN block of a bias added at every position."""
    return (kron.outer(bias_gradients(delta)),)


def per_sample_scaled(delta: jax.Array, weights: jax.Array) -> jax.Array:
    """``delta`` (K, N, ...) with sample n's cotangents multiplied by ``weights[n]``."""
    shape = (1, weights.shape[0]) + (1,) * (delta.ndim - 2)
    return delta * weights.astype(delta.dtype).reshape(shape)


def bias_weighted_sum(delta: jax.Array, weights: jax.Array) -> jax.Array:
    r""":math:`\sum_{n,t} w_n \delta_{0,n,t}`: the weighted sum of a bias's gradients."""
    scaled = per_sample_scaled(delta[:1], weights)
    return jnp.sum(scaled.reshape(-1, delta.shape[-1]), axis=0)


def itemsize(*arrays: jax.Array) -> int:
    """Bytes per element of the product of ``arrays`` (their promoted dtype)."""
    return jnp.dtype(jnp.result_type(*arrays)).itemsize
