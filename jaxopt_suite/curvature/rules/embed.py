r"""The Embed rule (linen ``nn.Embed``, nnx ``nnx.Embed``; ``attend`` is a read outside the
call, which leaves the table to the generic path).

:math:`y_{n,t} = E[i_{n,t}]` (recorded: the
indices :math:`i` (N, ...)): the
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

Cotangents in bfloat16 or float16 are widened to float32 (statistics accumulate in float32);
the engine casts the results to the leaf's dtype. ``kron`` is None for the table.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx

from jaxopt_suite.curvature import layers
from jaxopt_suite.curvature.config import EngineConfig
from jaxopt_suite.curvature.layers import LayerCall, ModuleCall
from jaxopt_suite.curvature.rules.base import LayerRule, check_statistic, wide


def _scatter(tokens: jax.Array, rows: jax.Array, vocab: int) -> jax.Array:
    """(K, N, V, D) with ``rows`` (K, N, T, D) added at the rows ``tokens`` (N, T)."""
    k, n, t, d = rows.shape
    samples = jnp.broadcast_to(jnp.arange(n)[:, None], (n, t))
    out = jnp.zeros((k, n, vocab, d), rows.dtype)
    return out.at[:, samples, tokens].add(rows, mode="drop")


def embed(statistic: str, tokens: jax.Array, delta: jax.Array, vocab: int) -> jax.Array:
    r"""A statistic (:data:`~jaxopt_suite.curvature.rules.base.ALL_STATISTICS`) of an embedding
    table (V, D) from its indices.

    :math:`\hat g_{k,n}[v] = \sum_{t:\, i_{n,t} = v} \delta_{k,n,t}`; norms and sums of squares
    through the token-equality matrix and first-occurrence segment sums (module docstring),
    never an (N, V, D) buffer for ``individual_sq_norm``, ``sum_sq`` or ``kron``.

    Args:
      statistic: one of :data:`~jaxopt_suite.curvature.rules.base.ALL_STATISTICS`.
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
    check_statistic(statistic)
    if not jnp.issubdtype(tokens.dtype, jnp.integer):
        raise TypeError(f"tokens must be integer indices; got dtype {tokens.dtype}")
    if statistic == "kron":
        return None
    if statistic in ("individual", "individual_sq_norm"):
        delta = delta[:1]
    k, n, d = delta.shape[0], delta.shape[1], delta.shape[-1]
    tokens = tokens.reshape(n, -1)
    delta = wide(delta).reshape(k, n, -1, d)
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


def _record(args: tuple):
    x = args[0] if args else None
    if not hasattr(x, "dtype") or not jnp.issubdtype(x.dtype, jnp.integer) or x.ndim < 1:
        return None
    return lambda: x


def _bind_linen(module: nn.Embed, args: tuple, kwargs: dict) -> ModuleCall:
    table = module.get_variable("params", "embedding")
    return ModuleCall(table, None, _record(args), vocab=table.shape[0])


def _bind_nnx(module: nnx.Embed, args: tuple, kwargs: dict) -> ModuleCall:
    table = layers.nnx_value(module.embedding)
    return ModuleCall(table, None, _record(args), vocab=table.shape[0])


class EmbedRule(LayerRule):
    """An embedding table (role ``"kernel"``) from the recorded indices (:func:`embed`)."""

    kind = "embed"
    interception = layers.ModuleInterception(
        linen={nn.Embed: _bind_linen}, nnx={nnx.Embed: _bind_nnx}
    )

    def statistic(self, statistic, call, role, prepared, delta, config: EngineConfig):
        return embed(statistic, prepared, delta, call.vocab)

    def columns(self, call: LayerCall, role, prepared, delta):
        return embed("columns", prepared, delta, call.vocab)

    def kron(self, call: LayerCall, role, prepared, delta):
        return None

    def weighted_sum(self, call: LayerCall, role, prepared, delta, weights, config: EngineConfig):
        r""":math:`\sum_{n,t} w_n \delta_{n,t}` added into row :math:`i_{n,t}`: one scatter."""
        d = delta.shape[-1]
        scaled = wide(delta[0]) * weights.astype(jnp.float32).reshape(-1, *(1,) * (delta.ndim - 2))
        rows = scaled.reshape(-1, d)
        return jax.ops.segment_sum(rows, prepared.reshape(-1), num_segments=call.vocab)


EMBED = EmbedRule()
