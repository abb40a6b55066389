r"""The ``columns`` statistic: every per-(column, sample) gradient, kept (GGN square roots).

With the K cotangent columns :math:`s_{k,n}` of a source, the per-(column, sample) gradients
:math:`\hat g_{k,n} = J_n^\top s_{k,n}` of a leaf, stacked as ``(K, N, *leaf.shape)``, are a
square root of that leaf's GGN block: :math:`G = \sum_{k,n} \operatorname{vec}\hat g_{k,n}\,
\operatorname{vec}\hat g_{k,n}^\top = V V^\top` (exact columns: ``sqrt_ggn_exact``; Monte Carlo
columns: ``sqrt_ggn_mc``, :math:`\mathbb{E}[V V^\top] = G`).

The rules give them for their leaves (``LayerRule.columns``, :mod:`jaxopt_suite.curvature.rules`);
:func:`per_sample_gradients` is the generic per-sample ``jax.vjp`` equivalent, used for every
other leaf and by ``structured=False``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from jaxopt_suite.curvature.generic import sample_vjp


def per_sample_gradients(
    apply_leaves: Callable[[list[jax.Array], Any], jax.Array],
    leaves: Sequence[jax.Array],
    inputs: Any,
    columns: jax.Array,
    chunk_size: int | None = None,
    batched: bool = False,
) -> list[jax.Array]:
    """The generic path: :math:`J_n^\\top s_{k,n}` per leaf, ``(K, N, *leaf.shape)``.

    One ``jax.vjp`` of ``apply_leaves`` on each sample alone, ``vmap``-ed over the K columns
    and the samples; with ``chunk_size``, ``lax.map`` over chunks of samples bounds the memory.

    Args:
      apply_leaves: ``(leaves, inputs) -> outputs`` for a batch (called on batches of one).
      leaves: the differentiated leaves.
      inputs: the batch (a pytree of arrays with leading axis N).
      columns: output cotangents ``(K, N, *outputs.shape[1:])``.
      chunk_size: samples per chunk; None: all at once.
      batched: the whole batch's VJP per sample instead of the model on one sample alone
        (exact for random models, :func:`~jaxopt_suite.curvature.generic.sample_vjp`).

    Returns:
      One array ``(K, N, *leaf.shape)`` per leaf.
    """
    one, samples = sample_vjp(apply_leaves, list(leaves), inputs, batched)
    per_sample = jax.vmap(one, in_axes=(0, 1))
    n = columns.shape[1]
    if chunk_size is None or chunk_size >= n:
        out = per_sample(samples, columns)  # per leaf (N, K, *leaf)
    else:
        chunks = -(-n // chunk_size)
        pad = chunks * chunk_size - n

        def split(a, axis):
            widths = [(0, 0)] * a.ndim
            widths[axis] = (0, pad)
            a = jnp.pad(a, widths)
            shape = (*a.shape[:axis], chunks, chunk_size, *a.shape[axis + 1 :])
            return jnp.moveaxis(a.reshape(shape), axis, 0)

        stacked = jax.lax.map(
            lambda chunk: per_sample(*chunk),
            (jax.tree.map(lambda a: split(a, 0), samples), split(columns, 1)),
        )
        out = [v.reshape(chunks * chunk_size, *v.shape[2:])[:n] for v in stacked]
    return [jnp.moveaxis(v, 0, 1) for v in out]
