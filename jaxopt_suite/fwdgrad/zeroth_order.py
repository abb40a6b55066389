r"""Zeroth-order gradient estimates (SPSA, MeZO-style): two evaluations per direction, no jvp.

For code that forward mode cannot run (a ``pure_callback``, a custom primitive without a jvp
rule), a central difference along a random direction :math:`v` replaces the directional
derivative:

.. math::

  \hat g = \frac1K \sum_{k=1}^K \frac{f(\theta + \epsilon v_k) - f(\theta - \epsilon v_k)}
  {2\epsilon}\, v_k

(Spall's SPSA; Malladi et al., "Fine-tuning language models with just forward passes", 2023).
The directions are drawn exactly as :func:`~jaxopt_suite.fwdgrad.value_and_forward_grad` draws
its dense ones with ``batching="scan"``, one after the other in ``lax.scan``: the memory is that
of inference plus one direction.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxopt_suite.fwdgrad.directions import DISTRIBUTIONS, _check_choice, random_direction
from jaxopt_suite.fwdgrad.estimator import (
    _check_num_directions,
    _check_scalar,
    _differentiated,
)


def _check_epsilon(epsilon: Any) -> None:
    if isinstance(epsilon, bool) or not isinstance(epsilon, int | float) or not epsilon > 0:
        raise ValueError(f"epsilon must be a Python float > 0, got {epsilon!r}")


def value_and_spsa_grad(
    fun: Callable,
    argnums: int | Sequence[int] = 0,
    *,
    num_directions: int = 1,
    distribution: str = "rademacher",
    epsilon: float = 1e-3,
) -> Callable:
    r"""Like ``jax.value_and_grad``, with the zeroth-order (SPSA) estimate in place of the
    gradient; forward evaluations of ``fun`` only.

    .. math::

      \hat g = \frac1K \sum_k \frac{f(\theta + \epsilon v_k) - f(\theta - \epsilon v_k)}
      {2\epsilon} v_k = \frac1K \sum_k \Big(\nabla f \cdot v_k + \frac{\epsilon^2}{6}
      D^3 f[v_k, v_k, v_k] + O(\epsilon^4)\Big) v_k

    For a quadratic :math:`f` the difference quotient is exactly :math:`\nabla f \cdot v_k`, so
    :math:`\hat g` is the forward-gradient estimate of the same directions (unbiased, variance
    :math:`(c - 1)\|\nabla f\|^2 / K` with :math:`c = n` for Rademacher and :math:`n + 2` for
    normal directions). Otherwise :math:`\hat g` is biased by :math:`O(\epsilon^2)`; with
    normal directions it is exactly unbiased for the gradient of the Gaussian smoothing
    :math:`f_\epsilon(\theta) = \mathbb{E}_u f(\theta + \epsilon u)` (Stein's lemma). In
    floating point the difference loses :math:`\approx \mathrm{eps}\,|f| / \epsilon` of
    absolute precision in the quotient, so :math:`\epsilon` trades this rounding against the
    :math:`\epsilon^2` bias.

    The value is :math:`f(\theta)` from one more evaluation: :math:`2K + 1` evaluations in all
    (:func:`spsa_grad`: :math:`2K`).

    Args:
      fun: the function; it returns a real floating scalar.
      argnums: which positional argument(s) to differentiate (an int or a sequence of ints).
      num_directions: K >= 1 directions averaged.
      distribution: ``"rademacher"`` (MeZO uses normal; signs give the lower variance) or
        ``"normal"``.
      epsilon: the step :math:`\epsilon > 0` of the difference (in the parameters' units).

    Returns:
      ``g(key, *args, **kwargs) -> (value, estimate)``; ``estimate`` has the structure of the
      differentiated argument (a tuple of them when ``argnums`` is a sequence).

    Example:
      >>> f = lambda x: jnp.sum(x**2)
      >>> value, g = value_and_spsa_grad(f)(jax.random.key(0), jnp.ones(3))
      >>> float(value)
      3.0
    """
    estimate = _spsa(fun, argnums, num_directions, distribution, epsilon, with_value=True)
    return lambda key, *args, **kwargs: estimate(key, *args, **kwargs)[:2]


def spsa_grad(
    fun: Callable,
    argnums: int | Sequence[int] = 0,
    *,
    num_directions: int = 1,
    distribution: str = "rademacher",
    epsilon: float = 1e-3,
) -> Callable:
    r"""Like ``jax.grad``, with the zeroth-order estimate :math:`\hat g` of
    :func:`value_and_spsa_grad` (2K evaluations of ``fun``, no value).

    Example:
      >>> g = spsa_grad(lambda x: jnp.sum(x**2), num_directions=4)
      >>> g(jax.random.key(0), jnp.zeros(3)).shape
      (3,)
    """
    estimate = _spsa(fun, argnums, num_directions, distribution, epsilon, with_value=False)
    return lambda key, *args, **kwargs: estimate(key, *args, **kwargs)[1]


def _spsa(fun, argnums, num_directions, distribution, epsilon, with_value):
    """``(key, *args, **kwargs) -> (value or None, estimate, ok)``; ``ok``: the evaluations
    are finite."""
    _check_choice("distribution", distribution, DISTRIBUTIONS)
    num_directions = _check_num_directions(num_directions)
    _check_epsilon(epsilon)
    if not callable(fun):
        raise TypeError(f"fun must be callable, got {type(fun).__name__}")

    def estimate(key: jax.Array, *args: Any, **kwargs: Any):
        diff, substitute = _differentiated(args, argnums)

        def f(d):
            value = fun(*substitute(d), **kwargs)
            _check_scalar(value)
            return value

        def shifted(v, sign):
            return jax.tree.map(lambda x, d: x + (sign * epsilon) * d.astype(x.dtype), diff, v)

        def body(total, k):
            v = random_direction(k, diff, distribution)
            up, down = f(shifted(v, 1.0)), f(shifted(v, -1.0))
            slope = (up - down) / (2 * epsilon)
            total = jax.tree.map(lambda t, d: t + (slope * d).astype(t.dtype), total, v)
            return total, slope

        keys = jax.random.split(key, num_directions)
        total, slopes = jax.lax.scan(body, jax.tree.map(jnp.zeros_like, diff), keys)
        grads = jax.tree.map(lambda t: t / num_directions, total)
        grads = grads[0] if isinstance(argnums, int) else grads
        value = f(diff) if with_value else None
        ok = jnp.all(jnp.isfinite(slopes))
        if with_value:
            ok = ok & jnp.isfinite(value)
        return value, grads, ok

    return estimate


class SPSAGradientState(NamedTuple):
    """State of :func:`spsa_gradient`.

    Attributes:
      key: the PRNG key that the next update splits to draw its directions.
      nonfinite: number of updates with a non-finite evaluation (their estimate was replaced
        by zeros).
    """

    key: jax.Array
    nonfinite: jax.Array


def spsa_gradient(
    key: jax.Array,
    num_directions: int = 1,
    distribution: str = "rademacher",
    *,
    epsilon: float = 1e-3,
) -> optax.GradientTransformationExtraArgs:
    r"""Replaces the incoming updates by the zeroth-order estimate of ``value_fn`` at
    ``params`` (:func:`spsa_grad`), as :func:`~jaxopt_suite.fwdgrad.forward_gradient` does
    with the forward gradient.

    .. math::

      u_t = \frac1K \sum_k \frac{f(\theta_t + \epsilon v_{t,k}) - f(\theta_t - \epsilon
      v_{t,k})}{2\epsilon} v_{t,k}, \qquad f = \texttt{value\_fn}

    A non-finite evaluation yields a zero update and increments ``state.nonfinite``.

    Args:
      key: PRNG key; the state carries it and splits it at every update.
      num_directions: K >= 1 directions averaged per update.
      distribution: ``"rademacher"`` or ``"normal"``.
      epsilon: the step of the central difference.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose
      ``update(updates, state, params, *, value_fn)`` needs ``value_fn(params) -> scalar``.

    Example:
      >>> tx = optax.chain(spsa_gradient(jax.random.key(0)), optax.sgd(1e-2))
      >>> params = jnp.array([1.0, 2.0])
      >>> state = tx.init(params)
      >>> loss = lambda p: jnp.sum(p**2)
      >>> updates, state = tx.update(jnp.zeros(2), state, params, value_fn=loss)
    """
    estimate = _spsa(
        lambda params, value_fn: value_fn(params),
        0,
        num_directions,
        distribution,
        epsilon,
        with_value=False,
    )

    def init_fn(params: optax.Params) -> SPSAGradientState:
        del params
        return SPSAGradientState(key=key, nonfinite=jnp.zeros((), jnp.int32))

    def update_fn(updates, state, params=None, *, value_fn=None, **extra_args):
        del updates, extra_args
        if value_fn is None:
            raise ValueError(
                "spsa_gradient needs the loss: call update(updates, state, params, "
                "value_fn=lambda p: loss(p, batch))"
            )
        if params is None:
            raise ValueError("spsa_gradient needs params: update(updates, state, params, ...)")
        next_key, subkey = jax.random.split(state.key)
        _, grads, ok = estimate(subkey, params, value_fn)
        grads = jax.tree.map(lambda g: jnp.where(ok, g, jnp.zeros_like(g)), grads)
        return grads, SPSAGradientState(next_key, state.nonfinite + (~ok).astype(jnp.int32))

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
