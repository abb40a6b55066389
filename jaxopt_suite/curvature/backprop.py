"""Backpropagating a stack of output cotangents (loss-Hessian columns) to the layers."""

from __future__ import annotations

import os
from collections.abc import Callable

import jax
import jax.numpy as jnp

from jaxopt_suite.curvature.config import DEFAULT, EngineConfig

# Primitives whose jax.vmap batching runs far slower on CPU than separate calls.
_SLOW_BATCHED = ("select_and_scatter_add",)


def _default_groups(config: EngineConfig) -> int:
    """Groups when none is asked for: ``config.column_groups``, else this process's cores."""
    if config.column_groups is not None:
        return config.column_groups
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on every platform
        return max(1, os.cpu_count() or 1)


def _batches_poorly(vjp_fn: Callable, column: jax.Array) -> bool:
    """Whether the jaxpr of ``vjp_fn`` (nested jaxprs included) holds a
    :data:`_SLOW_BATCHED` primitive."""
    text = str(jax.make_jaxpr(vjp_fn)(column))
    return any(name in text for name in _SLOW_BATCHED)


def backpropagate_columns(
    vjp_fn: Callable,
    columns: jax.Array,
    groups: int | None = None,
    config: EngineConfig = DEFAULT,
) -> dict[int, jax.Array]:
    """Layer-output cotangents (K, ...) of the K output cotangent ``columns``.

    The columns are split into ``groups`` groups of consecutive columns (None: as many as
    ``config.column_groups`` or, without it, the machine's cores, at least two when K > 1; K:
    one call of ``vjp_fn`` per column, the results stacked); each group of several columns is
    backpropagated by one ``jax.vmap`` of ``vjp_fn``, and the groups' cotangents are
    concatenated along K. XLA runs the groups side by side, and inside a group the columns
    share the products (e.g. one matrix product of a Dense layer for 5 columns instead of 5).
    Beyond ``config.unroll_columns`` columns, a sequential ``lax.map`` bounds the memory. A VJP
    holding an operation that ``vmap`` batches poorly (:data:`_SLOW_BATCHED`: max-pooling's
    plain transpose, left where the fast mask backward does not apply, e.g. overlapping
    windows) takes one call per column.

    Args:
      vjp_fn: ``cotangent -> (leaf cotangents, layer-output cotangents by call index)``.
      columns: (K, *outputs.shape).
      groups: see above.
      config: the engine's options.

    Returns:
      call index -> (K, *layer output shape).
    """
    k = columns.shape[0]
    if k > config.unroll_columns:
        return jax.lax.map(lambda column: vjp_fn(column)[1], columns)
    groups = min(k, max(2, _default_groups(config)) if groups is None else max(1, groups))
    if groups < k and _batches_poorly(vjp_fn, columns[0]):
        groups = k
    size = -(-k // groups)
    parts = []
    for start in range(0, k, size):
        group = columns[start : start + size]
        if group.shape[0] == 1:
            parts.append(jax.tree.map(lambda a: a[None], vjp_fn(group[0])[1]))
        else:
            parts.append(jax.vmap(lambda column: vjp_fn(column)[1])(group))
    if len(parts) == 1:
        return parts[0]
    return jax.tree.map(lambda *a: jnp.concatenate(a), *parts)
