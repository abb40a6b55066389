r"""The ``columns`` statistic: every per-(column, sample) gradient, kept (GGN square roots).

With the K cotangent columns :math:`s_{k,n}` of a source, the per-(column, sample) gradients
:math:`\hat g_{k,n} = J_n^\top s_{k,n}` of a leaf, stacked as ``(K, N, *leaf.shape)``, are a
square root of that leaf's GGN block: :math:`G = \sum_{k,n} \operatorname{vec}\hat g_{k,n}\,
\operatorname{vec}\hat g_{k,n}^\top = V V^\top` (exact columns: ``sqrt_ggn_exact``; Monte Carlo
columns: ``sqrt_ggn_mc``, :math:`\mathbb{E}[V V^\top] = G`).

Structured rules (Dense :math:`\hat g_{k,n} = \sum_t x_{n,t} \delta_{k,n,t}^\top`, bias
:math:`\sum_t \delta_{k,n,t}`, Conv from the unfolded patches) and a generic per-sample
``jax.vjp`` equivalent, used for every other leaf and by ``structured=False``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from jaxopt_suite.curvature.layers import ConvConfig, LayerCall


def dense_kernel(x: jax.Array, delta: jax.Array) -> jax.Array:
    """``(K, N, in, out)``: :math:`\\sum_t x_{n,t} \\delta_{k,n,t}^\\top` for x (N, ..., in)
    and delta (K, N, ..., out)."""
    n, k = x.shape[0], delta.shape[0]
    x = x.reshape(n, -1, x.shape[-1])
    delta = delta.reshape(k, n, -1, delta.shape[-1])
    if x.shape[1] == 1:
        # One outer product per (column, sample), written straight into the (K, N, in, out)
        # result: as a product with N as its batch axis XLA returned (N, in, K, out) and then
        # transposed it, a second pass over the largest array of the quantity.
        return x[None, :, 0, :, None] * delta[:, :, 0, None, :]
    # (K, N) both batch axes of the product, so that it comes out in the result's layout.
    return jnp.einsum("knti,knto->knio", jnp.broadcast_to(x, (k, *x.shape)), delta)


def bias(delta: jax.Array) -> jax.Array:
    """``(K, N, out)``: the bias gradient :math:`\\sum_t \\delta_{k,n,t}` of every column."""
    k, n = delta.shape[:2]
    return delta.reshape(k, n, -1, delta.shape[-1]).sum(axis=2)


def conv_kernel(patches: jax.Array, delta: jax.Array, config: ConvConfig) -> jax.Array:
    """``(K, N, *kernel_spatial, C_in / G, C_out)`` from patches (N, P, S, C_in) (see
    :func:`jaxopt_suite.curvature.rules.prepare`) and delta (K, N, ..., C_out)."""
    k, n = delta.shape[:2]
    groups = config.feature_group_count
    s, c_in = patches.shape[-2:]
    c_out = delta.shape[-1]
    cg, og = c_in // groups, c_out // groups
    lhs = patches.reshape(n, -1, s, groups, cg)  # (N, P, S, G, Cg)
    rhs = delta.reshape(k, n, -1, groups, og)  # (K, N, P, G, Og)
    grads = jnp.einsum("npsgc,knpgo->knscgo", lhs, rhs)
    return grads.reshape(k, n, *config.kernel_spatial, cg, c_out)


def layer_columns(call: LayerCall, role: str, prepared: jax.Array, delta: jax.Array) -> jax.Array:
    """The ``columns`` statistic of one leaf of a recognised layer (``role`` ``"kernel"`` or
    ``"bias"``; ``prepared`` from :func:`jaxopt_suite.curvature.rules.prepare`)."""
    if role == "bias":
        return bias(delta)
    if call.kind == "dense":
        return dense_kernel(prepared, delta)
    return conv_kernel(prepared, delta, call.conv)


def per_sample_gradients(
    apply_leaves: Callable[[list[jax.Array], Any], jax.Array],
    leaves: Sequence[jax.Array],
    inputs: Any,
    columns: jax.Array,
    chunk_size: int | None = None,
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

    Returns:
      One array ``(K, N, *leaf.shape)`` per leaf.
    """
    leaves = list(leaves)

    def one(x_n, cols_n):
        single = jax.tree.map(lambda a: a[None], x_n)
        _, vjp = jax.vjp(lambda ls: apply_leaves(ls, single), leaves)
        return jax.vmap(lambda c: vjp(c[None])[0])(cols_n)  # (K, *leaf)

    per_sample = jax.vmap(one, in_axes=(0, 1))
    n = columns.shape[1]
    if chunk_size is None or chunk_size >= n:
        out = per_sample(inputs, columns)  # per leaf (N, K, *leaf)
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
            (jax.tree.map(lambda a: split(a, 0), inputs), split(columns, 1)),
        )
        out = [v.reshape(chunks * chunk_size, *v.shape[2:])[:n] for v in stacked]
    return [jnp.moveaxis(v, 0, 1) for v in out]
