"""Pytree helpers shared by the library and the harness."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxopt_suite._typing import PyTree


def all_finite(tree: PyTree) -> jax.Array:
    """True when every entry of ``tree`` is finite, as ONE float reduction per leaf.

    ``x * 0`` is 0 for every finite ``x`` and NaN for ±inf and NaN, so
    ``isfinite(Σ_leaves Σ x·0)`` is exact (huge finite values do not overflow it). Leaves that
    are not floating (integers, booleans) count as finite; so does an empty tree.
    """
    total = jnp.zeros((), jnp.float32)
    for x in jax.tree.leaves(tree):
        if jnp.issubdtype(jnp.result_type(x), jnp.inexact):
            total = total + jnp.sum(jnp.asarray(x) * 0).astype(jnp.float32)
    return jnp.isfinite(total)
