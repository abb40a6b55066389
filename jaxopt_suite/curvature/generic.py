r"""The generic path: per-sample vector-Jacobian products, for any function and any leaf.

For sample :math:`n` and cotangent columns :math:`s_{k,n}` it evaluates
:math:`\hat g_{k,n} = J_n^\top s_{k,n}` with one ``jax.vjp`` of the model on that sample alone,
``vmap``-ed over the columns and over the samples. With ``chunk_size`` the samples are processed
in chunks inside a ``lax.scan``, so the memory is that of ``chunk_size`` samples; sums over
samples are accumulated across chunks. It assumes, as BackPACK does, that samples do not
interact inside the model (no batch statistics; the engine refuses models where they do,
:func:`~jaxopt_suite.curvature.inspection.mixing_layers`).

A model that draws random numbers (dropout) sees other random numbers on one sample alone
than in the batch. With ``batched=True`` the model is instead evaluated once on the whole
batch and sample :math:`n`'s gradients are VJPs with the cotangent :math:`e_n \otimes
s_{k,n}` (zero on every other sample), :math:`\hat g_{k,n} = J^\top (e_n \otimes
s_{k,n})`, so they use exactly the batch's randomness; since samples do not interact this is
:math:`J_n^\top s_{k,n}`. It costs N backward passes of the whole batch instead of one per
sample (``chunk_size`` bounds how many run at once).
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


def sample_vjp(
    apply_leaves: Callable[[list[jax.Array], Any], jax.Array],
    leaves: list[jax.Array],
    inputs: Any,
    batched: bool,
) -> tuple[Callable, Any]:
    """``(one, samples)``: ``one(sample, cols_n)`` gives one sample's gradients per leaf,
    (K, *leaf), for its cotangent columns ``cols_n`` (K, *outputs.shape[1:]); ``samples``
    is what is ``vmap``-ed over, the inputs (one sample alone) or, with ``batched``, the sample
    indices (the whole batch's VJP with the cotangent zero on every other sample)."""
    if not batched:

        def one(x_n, cols_n):
            single = jax.tree.map(lambda a: a[None], x_n)
            _, vjp = jax.vjp(lambda ls: apply_leaves(ls, single), leaves)
            return jax.vmap(lambda c: vjp(c[None])[0])(cols_n)

        return one, inputs
    out, vjp = jax.vjp(lambda ls: apply_leaves(ls, inputs), leaves)

    def one_of_batch(n, cols_n):
        return jax.vmap(lambda c: vjp(jnp.zeros_like(out).at[n].set(c.astype(out.dtype)))[0])(
            cols_n
        )

    return one_of_batch, jnp.arange(out.shape[0])


def statistics(
    apply_leaves: Callable[[list[jax.Array], Any], jax.Array],
    leaves: Sequence[jax.Array],
    inputs: Any,
    columns: jax.Array,
    wanted: Sequence[str],
    chunk_size: int | None = None,
    batched: bool = False,
) -> dict[str, list[jax.Array]]:
    """Statistics of the per-(column, sample) gradients w.r.t. ``leaves``.

    Args:
      apply_leaves: ``(leaves, inputs) -> outputs`` for a batch (here batches of one sample).
      leaves: the differentiated leaves.
      inputs: the batch (a pytree of arrays with a leading axis N).
      columns: output cotangents (K, N, *outputs.shape[1:]).
      wanted: statistics to return (see :data:`jaxopt_suite.curvature.rules.STATISTICS`).
      chunk_size: samples per chunk; None processes the whole batch at once.
      batched: evaluate the model on the whole batch (exact for random models; see above).

    Returns:
      statistic -> one array per leaf.
    """
    wanted = tuple(dict.fromkeys(wanted))
    grads_of, samples = sample_vjp(apply_leaves, list(leaves), inputs, batched)

    def one(sample, cols_n):
        grads = grads_of(sample, cols_n)  # per leaf (K, *leaf)
        return {s: [_per_sample(s, g) for g in grads] for s in wanted}

    per_sample = jax.vmap(one, in_axes=(0, 1))
    n = columns.shape[1]
    if chunk_size is None or chunk_size >= n:
        out = per_sample(samples, columns)
    else:
        out = _chunked(per_sample, samples, columns, wanted, chunk_size)
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
