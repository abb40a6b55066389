r"""Proximal steps as optax transformations, chained after any optimizer.

A proximal gradient method takes the optimizer's step and then applies the proximal operator
of the regulariser :math:`R` with strength :math:`t_k = \mathrm{reg}\cdot\eta_k`:

.. math:: \theta_{k+1} = \operatorname{prox}_{t_k R}(\theta_k + u_k)

where :math:`u_k` are the incoming updates. As an optax transformation placed last in a
chain, it returns :math:`\operatorname{prox}_{t_k R}(\theta_k + u_k) - \theta_k`, so that
``optax.apply_updates`` lands on the proximal point (exact zeros stay exact).

* :func:`proximal`: any operator of :mod:`jaxopt_suite.prox`, applied to every leaf.
* :func:`group_sparsity`: the auto-sizing regulariser, a grouped prox over the neurons of the
  Dense and Conv layers of a Flax parameter tree (see :mod:`jaxopt_suite.autosize`).

References:
  Parikh & Boyd, *Proximal Algorithms*, 2014. Murray & Chiang, *Auto-sizing neural networks*,
  EMNLP 2015. Murray et al., *Auto-Sizing the Transformer Network*, WNGT 2019.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxopt_suite import autosize, prox
from jaxopt_suite._src.checks import check_floating

ProxFn = Callable[[jax.Array, jax.Array], jax.Array]
ScalarOrSchedule = float | jax.Array | optax.Schedule
Mask = Any  # a prefix pytree of bools, or a callable params -> such a tree (optax.masked)

NORMS = ("l21", "linf1")


class ProximalState(NamedTuple):
    """State of :func:`proximal` and :func:`group_sparsity`.

    Attributes:
      count: number of updates done so far (int32); the learning-rate schedule is evaluated
        at it.
    """

    count: jax.Array


def _check_learning_rate(learning_rate: ScalarOrSchedule) -> None:
    if not callable(learning_rate):
        prox.check_nonnegative(learning_rate, "learning_rate")


def _strength(reg: Any, learning_rate: ScalarOrSchedule, count: jax.Array) -> jax.Array:
    rate = learning_rate(count) if callable(learning_rate) else learning_rate
    return jnp.asarray(reg) * jnp.asarray(rate)


def _missing_params(name: str) -> ValueError:
    return ValueError(
        f"{name} needs the current parameters: call tx.update(updates, state, params) "
        "(the proximal point is computed from params + updates)"
    )


def _init(params: Any) -> ProximalState:
    check_floating(params, "params", "proximal / group_sparsity")
    return ProximalState(count=jnp.zeros([], jnp.int32))


def proximal(
    prox_fn: ProxFn,
    reg: float | jax.Array,
    learning_rate: ScalarOrSchedule,
    mask: Mask | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""A proximal step after the optimizer's update, leaf by leaf.

    .. math::

        u_k \mapsto \operatorname{prox}_{t_k R}(\theta_k + u_k) - \theta_k,
        \qquad t_k = \mathrm{reg}\cdot\eta_k

    with :math:`\eta_k` the learning rate at step :math:`k` (a constant or an optax schedule
    evaluated at the transformation's own step count). The operators of :mod:`jaxopt_suite.prox`
    compute their sums and thresholds in at least float32 and return the input dtype.

    Args:
      prox_fn: ``(x, strength) -> prox``, e.g. :func:`jaxopt_suite.prox.l1`; applied to each
        parameter leaf separately (so :func:`~jaxopt_suite.prox.l2` treats each leaf as one
        group). Use ``functools.partial`` for extra arguments (``group_axis``, ``gamma``).
      reg: regularisation strength, >= 0 (may be traced).
      learning_rate: the step size the prox is scaled by, >= 0, or an optax schedule. For the
        textbook proximal gradient method it is the optimizer's learning rate.
      mask: as in ``optax.masked``: a prefix tree of bools, or a callable returning one;
        leaves mapped to False get their updates passed through unchanged.

    Returns:
      An ``optax.GradientTransformationExtraArgs``; its ``update`` needs ``params``.

    Raises:
      ValueError: a negative ``reg`` or ``learning_rate``; (from ``update``) ``params``
        missing, or ``prox_fn`` refusing a leaf (e.g. a grouped operator on a 0-d leaf), naming
        the leaf.
      TypeError: ``prox_fn`` not callable; (from ``init`` / ``update``) a leaf that is not
        floating.

    Example::

        >>> import optax, jax.numpy as jnp
        >>> from jaxopt_suite import prox, proximal
        >>> tx = optax.chain(optax.sgd(0.1), proximal(prox.l1, reg=0.01, learning_rate=0.1))
        >>> params = {"w": jnp.array([1.0, -0.0005])}
        >>> updates, _ = tx.update({"w": jnp.zeros(2)}, tx.init(params), params)
        >>> optax.apply_updates(params, updates)["w"]
        Array([0.999, 0.   ], dtype=float32)

    Under ``optax.inject_hyperparams`` mark the operator static:
    ``optax.inject_hyperparams(proximal, static_args="prox_fn")(prox.l1, 0.01, 0.1)``.
    """
    if not callable(prox_fn):
        raise TypeError(f"prox_fn must be a callable (x, strength) -> array, got {prox_fn!r}")
    prox.check_nonnegative(reg, "reg")
    _check_learning_rate(learning_rate)

    def update_fn(updates, state, params=None, **extra_args):
        del extra_args
        if params is None:
            raise _missing_params("proximal")
        check_floating(params, "params", "proximal")
        check_floating(updates, "updates", "proximal")
        t = _strength(reg, learning_rate, state.count)

        def step(path, u, p):
            try:
                return prox_fn(p + u, t) - p
            except (TypeError, ValueError) as err:
                kind = TypeError if isinstance(err, TypeError) else ValueError
                raise kind(
                    f"proximal: prox_fn failed on the parameter {jax.tree_util.keystr(path)} "
                    f"of shape {jnp.shape(p)}: {err}. Leave such leaves out with mask="
                ) from err

        new_updates = jax.tree_util.tree_map_with_path(step, updates, params)
        return new_updates, ProximalState(count=optax.safe_increment(state.count))

    tx = optax.GradientTransformationExtraArgs(_init, update_fn)
    return tx if mask is None else optax.masked(tx, mask)


def _group_updates(
    params: list[jax.Array], updates: list[jax.Array], t: jax.Array, norm: str
) -> list[jax.Array]:
    """The grouped prox of one layer, as updates: ``prox(p + u) - p`` for each part.

    ``params`` and ``updates`` are the layer's parts as ``(rows, units)`` matrices (the
    kernel's columns and, when grouped with it, the bias as one row): group j is column j of
    every part together; the parts are never concatenated. Computed in at least float32.

    Written for XLA's CPU fusion, so that a step costs one extra pass over the parameters for
    l21: the column sums of ``(p + u)**2`` are a single fused reduction that reads ``p`` and
    ``u`` (``jnp.sum`` along axis 0; nothing is materialised), and the update is returned as
    ``u * s + p * (s - 1)`` rather than ``(p + u) * s - p``, so ``p + u`` has one consumer and
    the caller's ``apply_updates`` and finiteness check fuse with the scaling (same value; with
    ``s = 0`` the update is exactly ``-p``, so the new parameters are exactly 0).
    """
    cd = jnp.promote_types(params[0].dtype, jnp.float32)  # sums lose too much in half precision
    t = t.astype(cd)
    ps = [p.astype(cd) for p in params]
    us = [u.astype(cd) for u in updates]
    if norm == "l21":
        sum_of_squares = sum(
            jnp.sum(jnp.square(p + u), axis=0) for p, u in zip(ps, us, strict=True)
        )
        scale = prox.l2_shrinkage(prox.safe_norm(sum_of_squares), t)
        new = [u * scale + p * (scale - 1) for p, u in zip(ps, us, strict=True)]
    else:
        points = [p + u for p, u in zip(ps, us, strict=True)]
        theta = prox.l1_ball_threshold([jnp.abs(x) for x in points], t)
        new = [jnp.clip(x, -theta, theta) - p for x, p in zip(points, ps, strict=True)]
    return [n.astype(p.dtype) for n, p in zip(new, params, strict=True)]


def group_sparsity(
    reg: float | jax.Array,
    learning_rate: ScalarOrSchedule,
    norm: str = "l21",
    include_bias: bool = True,
    mask: Mask | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""The auto-sizing regulariser: a grouped proximal step over the neurons of every layer.

    Every ``kernel`` leaf with its sibling ``bias`` (Flax ``Dense``/``Conv``, linen dicts and
    nnx ``State``; see :func:`jaxopt_suite.autosize.find_layers`) is a layer; its output unit
    :math:`j` is the group :math:`g_j = (\mathrm{kernel}[\dots, j], \mathrm{bias}[j])`.
    After the optimizer's update, with :math:`t_k = \mathrm{reg}\cdot\eta_k`,

    .. math::

        \text{l21: } g_j \leftarrow g_j \max\Bigl(0, 1 - \frac{t_k}{\lVert g_j \rVert_2}\Bigr),
        \qquad
        \text{linf1: } g_j \leftarrow g_j - \Pi_{\lVert\cdot\rVert_1 \le t_k}(g_j)

    so whole neurons become exactly zero and can be deleted (:func:`autosize.shrink`). Leaves
    that are not part of a layer pass through unchanged, and so does a layer without units
    (a zero-size last axis: it has no group). Group norms and thresholds are
    computed in at least float32 (bfloat16 parameters stay bfloat16). With
    ``reg=0.005, learning_rate=0.1, norm="linf1"`` it is ProxGradPytorch's
    ``linf1(weight, bias, reg=0.005)`` in Flax layout (kernel columns instead of weight rows).

    Args:
      reg: regularisation strength, >= 0 (may be traced).
      learning_rate: the step size the prox is scaled by, >= 0, or an optax schedule
        (ProxGradPytorch's default is 0.1, independent of the optimizer's).
      norm: ``"l21"`` (group l2 norms; one extra pass over the parameters) or ``"linf1"``
        (group l-infinity norms; an exact l1-ball threshold per group, a few more passes).
      include_bias: the bias entry belongs to the group; with False the groups are the kernel
        slices alone and biases are left alone.
      mask: as in ``optax.masked``; leaves mapped to False are neither regularised nor part
        of a group (a kernel whose bias is masked out is grouped alone).

    Returns:
      An ``optax.GradientTransformationExtraArgs``; its ``update`` needs ``params``.

    Raises:
      ValueError: for a negative ``reg`` or ``learning_rate``, an unknown ``norm``, or (at
        the first update) a kernel whose bias does not have one entry per output unit.

    Example::

        >>> import optax
        >>> from jaxopt_suite import group_sparsity
        >>> tx = optax.chain(optax.sgd(0.01), group_sparsity(0.005, 0.1, norm="linf1"))
    """
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    prox.check_nonnegative(reg, "reg")
    _check_learning_rate(learning_rate)

    def update_fn(updates, state, params=None, **extra_args):
        del extra_args
        if params is None:
            raise _missing_params("group_sparsity")
        check_floating(params, "params", "group_sparsity")
        check_floating(updates, "updates", "group_sparsity")
        t = _strength(reg, learning_rate, state.count)
        param_leaves, treedef = jax.tree.flatten(params)
        update_leaves = treedef.flatten_up_to(updates)
        new_updates = list(update_leaves)
        for layer in autosize.find_layers(params):
            b = layer.bias if include_bias else None
            leaves = [layer.kernel] if b is None else [layer.kernel, b]
            # The kernel as (fan_in, units) columns, the bias as one row.
            units = param_leaves[layer.kernel].shape[-1]
            if units == 0:  # a layer without units has no group to shrink
                continue
            rows = lambda x: x.reshape(math.prod(x.shape[:-1]), x.shape[-1])
            new = _group_updates(
                [rows(param_leaves[i]) for i in leaves],
                [rows(update_leaves[i]) for i in leaves],
                t,
                norm,
            )
            for i, n in zip(leaves, new, strict=True):
                new_updates[i] = n.reshape(param_leaves[i].shape)
        return treedef.unflatten(new_updates), ProximalState(optax.safe_increment(state.count))

    tx = optax.GradientTransformationExtraArgs(_init, update_fn)
    return tx if mask is None else optax.masked(tx, mask)
