r"""Local losses: each block of a model trained by the activity forward gradient of its own loss.

A model is split into blocks :math:`b = 1, \dots, B`; block :math:`b` maps its input
:math:`h_{b-1}` (:math:`h_0` the model's inputs) to the next block's input :math:`h_b` and to a
local prediction :math:`o_b` (e.g. a linear classifier head on :math:`h_b`), scored by the
local loss :math:`L_b = \frac1N \sum_n \ell(o_{b,n}, y_n)`. The blocks' inputs are
stop-gradient'ed, so the objective

.. math::

  \mathcal{L}(\theta) = \sum_b L_b\big(\theta_b;\ \operatorname{sg}(h_{b-1})\big), \qquad
  \nabla_{\theta_b} \mathcal{L} = \nabla_{\theta_b} L_b

couples no two blocks' parameters: each block's gradient is estimated by
:func:`~jaxopt_suite.fwdgrad.activity.value_and_activity_grad` on its own local loss, whose
variance grows with the block's activations only (Ren et al., "Scaling forward gradient with
local losses", ICLR 2023). The last block's prediction is the model's.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from jaxopt_suite.fwdgrad.activity import value_and_activity_grad
from jaxopt_suite.fwdgrad.directions import DISTRIBUTIONS, _check_choice
from jaxopt_suite.fwdgrad.estimator import _check_num_directions

#: ``block(params_b, h) -> (next_h, outputs)``: one block of a model with a local loss.
Block = Callable[[Any, Any], tuple[Any, Any]]


def _check_blocks(blocks: Any) -> tuple[Block, ...]:
    if not isinstance(blocks, Sequence) or not blocks or not all(map(callable, blocks)):
        raise TypeError(
            "blocks must be a non-empty sequence of callables block(params_b, h) -> "
            f"(next_h, outputs); got {blocks!r}"
        )
    return tuple(blocks)


def _check_params(blocks: tuple, params: Any) -> None:
    if not isinstance(params, list | tuple) or len(params) != len(blocks):
        raise ValueError(
            f"params must be a list or tuple with one entry per block ({len(blocks)}); got "
            f"{type(params).__name__}"
            + (f" of length {len(params)}" if isinstance(params, list | tuple) else "")
        )


def chain_blocks(blocks: Sequence[Block]) -> Callable[[Sequence, Any], Any]:
    r"""The model the blocks make: ``apply(params, inputs)`` (``params`` a list or tuple with
    one entry per block) feeds each block's :math:`h_b` to the next and returns the last
    block's outputs :math:`o_B`.

    Example:
      >>> blocks = [lambda p, h: (h * p, h * p), lambda p, h: (h + p, h + p)]
      >>> chain_blocks(blocks)([2.0, 1.0], jnp.ones(3))
      Array([3., 3., 3.], dtype=float32)
    """
    blocks = _check_blocks(blocks)

    def apply(params: list | tuple, inputs: Any) -> Any:
        _check_params(blocks, params)
        h, outputs = inputs, None
        for block, p in zip(blocks, params, strict=True):
            h, outputs = block(p, h)
        return outputs

    return apply


def value_and_local_grad(
    blocks: Sequence[Block],
    loss_fn: Callable[[Any, Any], jax.Array],
    *,
    num_directions: int = 1,
    distribution: str = "normal",
) -> Callable:
    r"""The local losses :math:`L_b` and the activity forward-gradient estimate of
    :math:`\nabla_{\theta_b} L_b(\theta_b; \operatorname{sg}(h_{b-1}))` for every block.

    .. math::

      \hat G_b = \frac1N \sum_n J_{b,n}^\top \Big(\frac1K \sum_k (g_{b,n} \cdot u_{b,n,k})\,
      u_{b,n,k}\Big), \qquad \mathbb{E}[\hat G_b] = \nabla_{\theta_b} L_b

    with independent tangents per block; the variance of each block is the formula of
    :func:`~jaxopt_suite.fwdgrad.activity.value_and_activity_grad` with :math:`M` the block's
    own activations. Each block is one ``jax.jvp`` (its primal pass shared with its tangents)
    and its input enters through ``lax.stop_gradient``: no derivative crosses a block boundary,
    and nothing is propagated backwards through the network.

    Args:
      blocks: a sequence of ``block(params_b, h) -> (next_h, outputs)``; every parameter leaf
        of a block is the kernel or bias of a flax Dense/Conv call inside it.
      loss_fn: ``loss_fn(outputs, targets) -> per-sample losses`` of shape ``(N,)``, the local
        loss of every block.
      num_directions: K >= 1 tangents per sample and block, averaged (variance / K).
      distribution: ``"normal"`` or ``"rademacher"``.

    Returns:
      ``g(key, params, inputs, targets) -> (losses, estimate)``: ``params`` a list or tuple
      with one entry per block, ``losses`` the ``(B,)`` local losses (the last one the
      model's loss), ``estimate`` shaped like ``params``.

    Example:
      >>> import flax.linen as nn, optax
      >>> hidden, head = nn.Dense(4), nn.Dense(3)
      >>> def first(p, h):
      ...     h = nn.relu(hidden.apply(p["hidden"], h))
      ...     return h, head.apply(p["head"], h)
      >>> last = lambda p, h: (h, head.apply(p, h))
      >>> x, h = jnp.ones((5, 2)), jnp.ones((5, 4))
      >>> keys = jax.random.split(jax.random.key(0), 3)
      >>> p1 = {"hidden": hidden.init(keys[0], x), "head": head.init(keys[1], h)}
      >>> params = [p1, head.init(keys[2], h)]
      >>> loss = optax.softmax_cross_entropy_with_integer_labels
      >>> g = value_and_local_grad([first, last], loss)
      >>> losses, grads = g(jax.random.key(3), params, x, jnp.zeros(5, int))
      >>> losses.shape
      (2,)
    """
    blocks = _check_blocks(blocks)
    _check_choice("distribution", distribution, DISTRIBUTIONS)
    num_directions = _check_num_directions(num_directions)
    estimators = [
        value_and_activity_grad(
            lambda p, h, block=block: block(p, h)[::-1],
            loss_fn,
            num_directions=num_directions,
            distribution=distribution,
            has_aux=True,
        )
        for block in blocks
    ]

    def estimate(key: jax.Array, params: list | tuple, inputs: Any, targets: Any):
        _check_params(blocks, params)
        keys = jax.random.split(key, len(blocks))
        h, losses, grads = inputs, [], []
        for estimator, p, k in zip(estimators, params, keys, strict=True):
            (value, h), g = estimator(k, p, jax.lax.stop_gradient(h), targets)
            losses.append(value)
            grads.append(g)
        return jnp.stack(losses), type(params)(grads)

    return estimate
