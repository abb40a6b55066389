r"""The generic path: per-sample vector-Jacobian products, for any function and any leaf.

For sample :math:`n` and cotangent columns :math:`s_{k,n}` it evaluates
:math:`\hat g_{k,n} = J_n^\top s_{k,n}` with one ``jax.vjp`` of the model on that sample alone,
``vmap``-ed over the columns and over the samples. With ``chunk_size`` the samples are processed
in chunks inside a ``lax.scan``, so the memory is that of ``chunk_size`` samples; sums over
samples are accumulated across chunks. It assumes, as BackPACK does, that samples do not
interact inside the model (no batch statistics).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp


def _per_sample(statistic: str, grads: jax.Array) -> jax.Array:
    """Per-sample part of ``statistic`` from one sample's column gradients (K, *leaf)."""
    if statistic == "individual":
        return grads[0]
    if statistic == "individual_sq_norm":
        return jnp.sum(grads[0] ** 2)
    return jnp.sum(grads**2, axis=0)  # sum_sq (summed over samples later), individual_sum_sq


def statistics(
    apply_leaves: Callable[[list[jax.Array], Any], jax.Array],
    leaves: Sequence[jax.Array],
    inputs: Any,
    columns: jax.Array,
    wanted: Sequence[str],
    chunk_size: int | None = None,
) -> dict[str, list[jax.Array]]:
    """Statistics of the per-(column, sample) gradients w.r.t. ``leaves``.

    Args:
      apply_leaves: ``(leaves, inputs) -> outputs`` for a batch (here batches of one sample).
      leaves: the differentiated leaves.
      inputs: the batch (a pytree of arrays with a leading axis N).
      columns: output cotangents (K, N, *outputs.shape[1:]).
      wanted: statistics to return (see :data:`jaxopt_suite.curvature.rules.STATISTICS`).
      chunk_size: samples per chunk; None processes the whole batch at once.

    Returns:
      statistic -> one array per leaf.
    """
    wanted = tuple(dict.fromkeys(wanted))
    leaves = list(leaves)

    def one(x_n, cols_n):
        single = jax.tree.map(lambda a: a[None], x_n)
        _, vjp = jax.vjp(lambda ls: apply_leaves(ls, single), leaves)
        grads = jax.vmap(lambda c: vjp(c[None])[0])(cols_n)  # per leaf (K, *leaf)
        return {s: [_per_sample(s, g) for g in grads] for s in wanted}

    per_sample = jax.vmap(one, in_axes=(0, 1))
    n = columns.shape[1]
    if chunk_size is None or chunk_size >= n:
        out = per_sample(inputs, columns)
    else:
        out = _chunked(per_sample, inputs, columns, wanted, chunk_size)
    if "sum_sq" in out:
        out["sum_sq"] = [jnp.sum(v, axis=0) for v in out["sum_sq"]]
    return out


def _chunked(per_sample, inputs, columns, wanted, chunk_size):
    n = columns.shape[1]
    chunks = -(-n // chunk_size)
    pad = chunks * chunk_size - n

    def split(a, axis):
        # zero padding: padded samples get zero cotangents, so they add nothing to the sums
        widths = [(0, 0)] * a.ndim
        widths[axis] = (0, pad)
        a = jnp.pad(a, widths)
        shape = (*a.shape[:axis], chunks, chunk_size, *a.shape[axis + 1 :])
        return jnp.moveaxis(a.reshape(shape), axis, 0)

    xs = jax.tree.map(lambda a: split(a, 0), inputs)
    cols = split(columns, 1)

    def body(carry, chunk):
        x_c, c_c = chunk
        out = per_sample(x_c, c_c)
        sums = [jnp.sum(v, axis=0) for v in out.pop("sum_sq", [])]
        carry = sums if carry is None else [a + b for a, b in zip(carry, sums, strict=True)]
        return carry, out

    if "sum_sq" in wanted:
        shapes = jax.eval_shape(lambda: per_sample(*jax.tree.map(lambda a: a[0], (xs, cols))))
        zeros = [jnp.zeros(s.shape[1:], s.dtype) for s in shapes["sum_sq"]]
        carry, stacked = jax.lax.scan(body, zeros, (xs, cols))
    else:
        carry, stacked = jax.lax.scan(lambda c, ch: (c, body(None, ch)[1]), 0, (xs, cols))
    out = {
        s: [v.reshape(chunks * chunk_size, *v.shape[2:])[:n] for v in vs]
        for s, vs in stacked.items()
    }
    if "sum_sq" in wanted:
        out["sum_sq"] = [s[None] for s in carry]  # summed over samples by the caller
    return out
