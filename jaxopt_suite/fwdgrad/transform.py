"""The forward gradient as an optax transformation: :func:`forward_gradient`."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxopt_suite.fwdgrad.directions import (
    DISTRIBUTIONS,
    LAYER_PROBABILITIES,
    PERTURB,
    STRUCTURES,
    _check_choice,
)
from jaxopt_suite.fwdgrad.estimator import BATCHING, _check_num_directions, _estimator


class ForwardGradientState(NamedTuple):
    """State of :func:`forward_gradient`.

    Attributes:
      key: the PRNG key that the next update splits to draw its directions.
      nonfinite: number of updates whose loss or directional derivative was not finite (their
        estimate was replaced by zeros, so parameters are never corrupted).
    """

    key: jax.Array
    nonfinite: jax.Array


def forward_gradient(
    key: jax.Array,
    num_directions: int = 1,
    distribution: str = "normal",
    *,
    structure: str = "dense",
    perturb: str = "all",
    layer_probabilities: str = "uniform",
    batching: str = "vmap",
) -> optax.GradientTransformationExtraArgs:
    r"""Replaces the incoming updates by a forward-gradient estimate of ``value_fn`` at ``params``.

    .. math::

      u_t = \frac1K \sum_{k=1}^K (\nabla f(\theta_t) \cdot v_{t,k})\, v_{t,k}, \qquad
      f = \texttt{value\_fn}

    The incoming updates are ignored (pass zeros), so ``optax.chain(forward_gradient(key),
    optax.sgd(lr))`` trains without any backward pass. A non-finite loss or directional
    derivative yields a zero update and increments ``state.nonfinite``.

    Args:
      key: PRNG key; the state carries it and splits it at every update.
      num_directions: K >= 1 directions averaged per update.
      distribution: ``"normal"`` or ``"rademacher"``.
      structure: ``"dense"`` or ``"rank_one"`` (fast; see :func:`value_and_forward_grad`).
      perturb: ``"all"`` or ``"one_layer"`` (faster; see :func:`value_and_forward_grad`).
      layer_probabilities: ``"uniform"`` or ``"size"``, for ``"one_layer"``.
      batching: ``"vmap"`` or ``"scan"`` (memory-saving; with ``"one_layer"`` and K > 1, also
        the fast one).

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose
      ``update(updates, state, params, *, value_fn)`` needs ``value_fn(params) -> scalar``.

    Example:
      >>> tx = optax.chain(forward_gradient(jax.random.key(0)), optax.sgd(1e-2))
      >>> params = jnp.array([1.0, 2.0])
      >>> state = tx.init(params)
      >>> loss = lambda p: jnp.sum(p**2)
      >>> updates, state = tx.update(jnp.zeros(2), state, params, value_fn=loss)
    """
    _check_choice("distribution", distribution, DISTRIBUTIONS)
    _check_choice("structure", structure, STRUCTURES)
    _check_choice("batching", batching, BATCHING)
    _check_choice("perturb", perturb, PERTURB)
    _check_choice("layer_probabilities", layer_probabilities, LAYER_PROBABILITIES)
    num_directions = _check_num_directions(num_directions)
    estimate = _estimator(
        lambda params, value_fn: value_fn(params),
        0,
        num_directions,
        distribution,
        structure,
        batching,
        False,
        perturb=perturb,
        layer_probabilities=layer_probabilities,
        guard=True,
    )

    def init_fn(params: optax.Params) -> ForwardGradientState:
        del params
        return ForwardGradientState(key=key, nonfinite=jnp.zeros((), jnp.int32))

    def update_fn(updates, state, params=None, *, value_fn=None, **extra_args):
        del updates, extra_args
        if value_fn is None:
            raise ValueError(
                "forward_gradient needs the loss: call update(updates, state, params, "
                "value_fn=lambda p: loss(p, batch))"
            )
        if params is None:
            raise ValueError("forward_gradient needs params: update(updates, state, params, ...)")
        next_key, subkey = jax.random.split(state.key)
        _, _, grads, ok = estimate(subkey, params, value_fn)
        return grads, ForwardGradientState(next_key, state.nonfinite + (~ok).astype(jnp.int32))

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
