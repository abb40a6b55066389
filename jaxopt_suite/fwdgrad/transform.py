"""The forward gradient as an optax transformation: :func:`forward_gradient`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxopt_suite._src.checks import check_floating, has_masked_nodes
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
    mask: Any | Callable[[optax.Params], Any] | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Replaces the incoming updates by a forward-gradient estimate of ``value_fn`` at ``params``.

    .. math::

      u_t = \frac1K \sum_{k=1}^K (\nabla f(\theta_t) \cdot v_{t,k})\, v_{t,k}, \qquad
      f = \texttt{value\_fn}

    The incoming updates are ignored (pass zeros), so ``optax.chain(forward_gradient(key),
    optax.sgd(lr))`` trains without any backward pass. A non-finite loss or directional
    derivative yields a zero update and increments ``state.nonfinite``.

    To train only part of the parameters, pass ``mask``: the directions are drawn for the
    selected leaves only (the others get zero tangents and a zero estimate), and ``value_fn``
    still receives the whole tree. Inside ``optax.masked`` this transformation would see only
    the selected leaves, so ``value_fn`` could not be evaluated; that is an error (raised at
    trace time) that names ``mask=`` as the remedy:
    ``optax.chain(forward_gradient(key, mask=mask), optax.sgd(lr))``.

    Args:
      key: PRNG key; the state carries it and splits it at every update.
      num_directions: K >= 1 directions averaged per update.
      distribution: ``"normal"`` or ``"rademacher"``.
      structure: ``"dense"`` or ``"rank_one"`` (fast; see :func:`value_and_forward_grad`).
      perturb: ``"all"`` or ``"one_layer"`` (faster; see :func:`value_and_forward_grad`).
      layer_probabilities: ``"uniform"`` or ``"size"``, for ``"one_layer"``.
      batching: ``"vmap"`` or ``"scan"`` (memory-saving; with ``"one_layer"`` and K > 1, also
        the fast one).
      mask: as in ``optax.masked``, a prefix tree of bools (or ``params -> tree``): leaves
        mapped to True are estimated, the others get a zero update (the variance is that of
        the selected parameters alone: n counts only them).

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose
      ``update(updates, state, params, *, value_fn)`` needs ``value_fn(params) -> scalar``.

    Raises:
      ValueError: an unknown choice, ``num_directions < 1``; (from ``update``) no
        ``value_fn`` or ``params``, or ``params`` cut by ``optax.masked``.
      TypeError: (from ``init`` / ``update``) a parameter leaf that is not floating.

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
        check_floating(params, "params", "forward_gradient")
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
        if has_masked_nodes(params):
            raise ValueError(
                "forward_gradient inside optax.masked receives only the unmasked parameters, "
                "so value_fn (a function of all of them) cannot be evaluated. Give the mask to "
                "forward_gradient instead: optax.chain(forward_gradient(key, mask=mask), "
                "optax.sgd(lr)) estimates the masked-in leaves and leaves the others at zero"
            )
        check_floating(params, "params", "forward_gradient")
        next_key, subkey = jax.random.split(state.key)
        if mask is None:
            _, _, grads, ok = estimate(subkey, params, value_fn)
        else:
            grads, ok = _masked_estimate(estimate, subkey, params, value_fn, mask)
        return grads, ForwardGradientState(next_key, state.nonfinite + (~ok).astype(jnp.int32))

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _masked_estimate(estimate, key, params, value_fn, mask):
    """The estimate for the leaves that ``mask`` selects, zeros for the others: the selected
    leaves are differentiated as a tree whose other entries are ``None``, and ``value_fn`` gets
    them merged back with the unselected values."""
    leaves, treedef = jax.tree.flatten(params)
    mask_tree = mask(params) if callable(mask) else mask
    try:
        selected = jax.tree.leaves(
            jax.tree.map(lambda m, p: jax.tree.map(lambda _: bool(m), p), mask_tree, params)
        )
    except ValueError as err:
        raise ValueError(
            "mask must be a prefix of the params tree (one bool per leaf or subtree), got "
            f"{jax.tree.structure(mask_tree)} for params {treedef}"
        ) from err
    positions = [i for i, on in enumerate(selected) if on]
    part = treedef.unflatten([x if on else None for x, on in zip(leaves, selected, strict=True)])

    def merged(sub):
        full = list(leaves)
        for i, x in zip(positions, jax.tree.leaves(sub), strict=True):
            full[i] = x
        return value_fn(treedef.unflatten(full))

    _, _, sub_grads, ok = estimate(key, part, merged)
    estimates = dict(zip(positions, jax.tree.leaves(sub_grads), strict=True))
    grads = [estimates.get(i, jnp.zeros_like(x)) for i, x in enumerate(leaves)]
    return treedef.unflatten(grads), ok
