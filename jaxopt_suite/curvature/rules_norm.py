r"""Per-layer derivative rules of the structured path for LayerNorm and Embed.

Both receive, like the Dense/Conv rules of :mod:`jaxopt_suite.curvature.rules`, a stack of
cotangents :math:`\delta` (K, N, ..., D) of the layer's output (one column for first-order
quantities, K backpropagated columns for GGN and Hessian quantities) and return a statistic
(:data:`STATISTICS`) of the per-(column, sample) gradients :math:`\hat g_{k,n}`.

**LayerNorm** :math:`y = \hat x \odot \gamma + \beta` over the last axis (``recorded``:
:math:`\hat x` (N, ..., D), see :func:`jaxopt_suite.curvature.layers.normalised`): the
per-sample gradients are small (N, D), so they are formed and reduced,

.. math:: \hat g_{k,n}(\gamma) = \sum_t \delta_{k,n,t} \odot \hat x_{n,t}, \qquad
          \hat g_{k,n}(\beta) = \sum_t \delta_{k,n,t}.

**Embed** :math:`y_{n,t} = E[i_{n,t}]` (``recorded``: the indices :math:`i` (N, ...)): the
per-sample gradient is row-sparse, :math:`\hat g_{k,n}[v] = \sum_{t: i_{n,t} = v}
\delta_{k,n,t}`. With the token-equality matrix :math:`S_{n,t,s} = [i_{n,t} = i_{n,s}]`
(N, T, T), :math:`r_{k,n,t} = \sum_s S_{n,t,s} \delta_{k,n,s}` is the row of token
:math:`i_{n,t}` in :math:`\hat g_{k,n}`, and with :math:`f_{n,t}` = 1 at the first occurrence
of each token in sample n (0 at repeats)

.. math::
   \|\hat g_{0,n}\|^2 = \sum_{t,s} S_{n,t,s}\, \delta_{0,n,t} \cdot \delta_{0,n,s}, \qquad
   \sum_{k,n} \hat g_{k,n}[v]^{\odot 2} = \sum_{n,t:\, i_{n,t} = v} f_{n,t}
       \sum_k r_{k,n,t}^{\odot 2},

a segment sum over the N·T positions: no (N, V, D) buffer for ``individual_sq_norm`` and
``sum_sq``. ``individual``, ``individual_sum_sq`` and ``columns`` are (N, V, D) or
(K, N, V, D) by definition and are scattered directly. Indices must lie in ``[0, V)``
(flax's ``jnp.take`` returns NaN rows for others).

Inputs in bfloat16 or float16 are widened to float32 (statistics accumulate in float32);
the engine casts the results to the leaf's dtype. ``kron`` (``kfac``/``kflr``) is what the
generic path gives uncovered leaves (:func:`jaxopt_suite.curvature.kron.generic_factors`): the
exact GGN block :math:`(\sum_{k,n} \hat g_{k,n} \hat g_{k,n}^\top,)` for LayerNorm's 1-D
leaves, None for the embedding table.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxopt_suite.curvature.layers import LayerCall

KINDS = ("layernorm", "embed")
STATISTICS = ("individual", "individual_sq_norm", "sum_sq", "individual_sum_sq", "columns", "kron")


def _wide(x: jax.Array) -> jax.Array:
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _check(statistic: str) -> None:
    if statistic not in STATISTICS:
        raise ValueError(f"unknown statistic {statistic!r}; valid: {', '.join(STATISTICS)}")


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
    delta = _wide(delta).reshape(k, n, -1, d)
    if role == "bias":
        return jnp.sum(delta, axis=2)
    x = _wide(normalised).reshape(n, -1, d)
    return jnp.einsum("ntd,kntd->knd", x, delta)


def layernorm(statistic: str, role: str, normalised: jax.Array, delta: jax.Array) -> jax.Array:
    """A statistic (:data:`STATISTICS`) of LayerNorm's scale (``role="kernel"``) or bias from
    :func:`layernorm_gradients`."""
    _check(statistic)
    if statistic in ("individual", "individual_sq_norm"):
        delta = delta[:1]  # first-order statistics use the single gradient column
    return _reduce(statistic, layernorm_gradients(role, normalised, delta))


def _scatter(tokens: jax.Array, rows: jax.Array, vocab: int) -> jax.Array:
    """(K, N, V, D) with ``rows`` (K, N, T, D) added at the rows ``tokens`` (N, T)."""
    k, n, t, d = rows.shape
    samples = jnp.broadcast_to(jnp.arange(n)[:, None], (n, t))
    out = jnp.zeros((k, n, vocab, d), rows.dtype)
    return out.at[:, samples, tokens].add(rows, mode="drop")


def embed(statistic: str, tokens: jax.Array, delta: jax.Array, vocab: int) -> jax.Array:
    r"""A statistic (:data:`STATISTICS`) of an embedding table (V, D) from its indices.

    :math:`\hat g_{k,n}[v] = \sum_{t:\, i_{n,t} = v} \delta_{k,n,t}`; norms and sums of squares
    through the token-equality matrix and first-occurrence segment sums (module docstring),
    never an (N, V, D) buffer for ``individual_sq_norm``, ``sum_sq`` or ``kron``.

    Args:
      statistic: one of :data:`STATISTICS`.
      tokens: integer indices (N, ...).
      delta: output cotangents (K, N, ..., D).
      vocab: V, the rows of the table.

    Returns:
      The statistic: (N, V, D), (N,), (V, D), (N, V, D), (K, N, V, D), or None for ``kron``.

    Example:
      >>> import jax.numpy as jnp
      >>> tokens = jnp.array([[0, 2, 0]])
      >>> embed("individual_sq_norm", tokens, jnp.ones((1, 1, 3, 2)), vocab=4)
      Array([10.], dtype=float32)
    """
    _check(statistic)
    if not jnp.issubdtype(tokens.dtype, jnp.integer):
        raise TypeError(f"tokens must be integer indices; got dtype {tokens.dtype}")
    if statistic == "kron":
        return None
    if statistic in ("individual", "individual_sq_norm"):
        delta = delta[:1]
    k, n, d = delta.shape[0], delta.shape[1], delta.shape[-1]
    tokens = tokens.reshape(n, -1)
    delta = _wide(delta).reshape(k, n, -1, d)
    if statistic in ("individual", "columns"):
        grads = _scatter(tokens, delta, vocab)
        return grads[0] if statistic == "individual" else grads
    same = (tokens[:, :, None] == tokens[:, None, :]).astype(delta.dtype)  # (N, T, T)
    if statistic == "individual_sq_norm":
        gram = jnp.einsum("ntd,nsd->nts", delta[0], delta[0])
        return jnp.sum(same * gram, axis=(1, 2))
    t = tokens.shape[1]
    earlier = jnp.tril(jnp.ones((t, t), delta.dtype), k=-1)  # s < t
    first = (jnp.sum(same * earlier, axis=2) == 0).astype(delta.dtype)  # (N, T)
    rows = jnp.einsum("nts,knsd->kntd", same, delta)
    squares = jnp.sum(rows**2, axis=0) * first[..., None]  # (N, T, D)
    if statistic == "sum_sq":
        return jax.ops.segment_sum(squares.reshape(-1, d), tokens.reshape(-1), num_segments=vocab)
    return _scatter(tokens, squares[None], vocab)[0]  # individual_sum_sq


def layer_statistic(
    statistic: str, call: LayerCall, role: str, recorded: jax.Array, delta: jax.Array
) -> jax.Array | tuple[jax.Array, ...] | None:
    """Dispatches on ``call.kind`` (one of :data:`KINDS`); ``recorded`` is what
    :mod:`jaxopt_suite.curvature.layers` recorded for the call."""
    if call.kind == "layernorm":
        return layernorm(statistic, role, recorded, delta)
    if call.kind == "embed":
        return embed(statistic, recorded, delta, call.vocab)
    raise ValueError(f"call.kind must be one of {KINDS}; got {call.kind!r}")
