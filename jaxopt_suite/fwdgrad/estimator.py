"""The forward-gradient estimator and its jax-style API: :func:`value_and_forward_grad`,
:func:`forward_grad`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxopt_suite._typing import PyTree
from jaxopt_suite.fwdgrad.directions import (
    DISTRIBUTIONS,
    LAYER_PROBABILITIES,
    PERTURB,
    STRUCTURES,
    RankOne,
    _check_choice,
    _direction,
    _one_layer_direction,
)
from jaxopt_suite.fwdgrad.interpreter import _jvp

BATCHING = ("vmap", "scan")


def _check_num_directions(num_directions: Any) -> int:
    if isinstance(num_directions, bool) or not isinstance(num_directions, int | np.integer):
        raise TypeError(
            f"num_directions must be a Python int >= 1, got {type(num_directions).__name__}"
        )
    if num_directions < 1:
        raise ValueError(f"num_directions must be >= 1, got {num_directions}")
    return int(num_directions)


def _normalize_argnums(argnums: int | Sequence[int], num_args: int) -> tuple[int, ...]:
    items = (argnums,) if isinstance(argnums, int) else tuple(argnums)
    if not items:
        raise ValueError("argnums must name at least one positional argument")
    out = []
    for i in items:
        if isinstance(i, bool) or not isinstance(i, int):
            raise TypeError(f"argnums must be an int or a sequence of ints, got {argnums!r}")
        if not -num_args <= i < num_args:
            raise ValueError(
                f"argnums {argnums!r} out of range: the function was called with "
                f"{num_args} positional argument(s)"
            )
        out.append(i % num_args)
    return tuple(out)


def _differentiated(args: tuple, argnums: int | Sequence[int]) -> tuple[tuple, Callable]:
    """The arguments selected by ``argnums`` (checked to hold floating arrays) and a function
    that puts replacements for them back among ``args``."""
    nums = _normalize_argnums(argnums, len(args))
    diff = tuple(args[i] for i in nums)
    for i, leaf in zip(nums, diff, strict=True):
        for x in jax.tree.leaves(leaf):
            if not jnp.issubdtype(jnp.result_type(x), jnp.floating):
                raise TypeError(
                    f"argnums: argument {i} must hold floating arrays to be "
                    f"differentiated, got dtype {jnp.result_type(x)}"
                )

    def substitute(replacements: tuple) -> list:
        full = list(args)
        for i, x in zip(nums, replacements, strict=True):
            full[i] = x
        return full

    return diff, substitute


def _check_scalar(value: Any) -> None:
    shape, dtype = jnp.shape(value), jnp.result_type(value)
    if shape != () or not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(
            "fun must return a real floating scalar (shape ()) to have a gradient; got "
            f"shape {shape} and dtype {dtype}"
        )


def value_and_forward_grad(
    fun: Callable,
    argnums: int | Sequence[int] = 0,
    *,
    num_directions: int = 1,
    distribution: str = "normal",
    structure: str = "dense",
    perturb: str = "all",
    layer_probabilities: str = "uniform",
    batching: str = "vmap",
    has_aux: bool = False,
) -> Callable:
    r"""Like ``jax.value_and_grad``, but the gradient is a forward-gradient estimate.

    .. math::

      \hat g = \frac{1}{K} \sum_{k=1}^{K} (\nabla f \cdot v_k)\, v_k, \qquad
      \mathbb{E}[\hat g] = \nabla f, \qquad
      \mathbb{E}\|\hat g - \nabla f\|^2 = \frac{c - 1}{K} \|\nabla f\|^2

    with :math:`c = \mathbb{E}[(\nabla f \cdot v)^2 \|v\|^2] / \|\nabla f\|^2`: :math:`n + 2`
    for dense normal directions, exactly :math:`n` for Rademacher ones (dense or rank-one, since
    then :math:`\|v\|^2 = n`), and for rank-one normal directions on a single ``(p, q)`` leaf
    :math:`(p + 2)(q + 2)`, slightly above :math:`n + 2`. Each :math:`\nabla f \cdot v_k` comes
    from forward mode (``jax.jvp``) only.

    Args:
      fun: the function; it returns a real scalar (or ``(scalar, aux)`` with ``has_aux``).
      argnums: which positional argument(s) to differentiate (an int or a sequence of ints).
      num_directions: K >= 1 independent directions averaged (variance / K).
      distribution: ``"normal"`` (the paper's) or ``"rademacher"`` (signs; 32 per random word).
      structure: ``"dense"`` (i.i.d. entries) or ``"rank_one"`` (``a ⊗ b`` per leaf of rank >= 2,
        with cheap tangents through ``dot_general`` and convolutions: the fast choice).
      perturb: ``"all"`` (every parameter) or ``"one_layer"``: one random layer per direction,
        scaled by :math:`1/\sqrt{p_l}` (unbiased; variance in
        :mod:`~jaxopt_suite.fwdgrad.directions`). A layer is one top-level entry of a
        differentiated argument (``params["Dense_0"]``), or the whole argument when it is an
        array.
      layer_probabilities: with ``"one_layer"``, ``"uniform"`` (:math:`p_l = 1/L`) or
        ``"size"`` (:math:`p_l = n_l / n`: for signs, the variance of ``perturb="all"``).
      batching: ``"vmap"`` evaluates the K tangents together (the primal pass shared, memory for K
        tangents); ``"scan"`` one after the other in ``lax.scan`` (memory of one tangent, K
        primal passes). Both give the same estimate for the same key. With ``"one_layer"`` and
        K > 1 prefer ``"scan"``: under ``vmap`` the ``lax.cond`` that skips the other layers'
        products becomes a select that computes them all (same result, no saving).
      has_aux: ``fun`` returns ``(value, aux)``; ``aux`` is returned with the value.

    Returns:
      ``g(key, *args, **kwargs) -> (value, estimate)`` (``((value, aux), estimate)`` with
      ``has_aux``); ``estimate`` has the structure and dtypes of the differentiated argument
      (a tuple of them when ``argnums`` is a sequence), as ``jax.grad``'s: with float16 or
      bfloat16 parameters and a float32 loss, :math:`(\nabla f \cdot v)\, v` is formed in
      float32 and rounded to each leaf's dtype.

    Example:
      >>> f = lambda x: jnp.sum(x**2)
      >>> value, g = value_and_forward_grad(f, distribution="rademacher")(
      ...     jax.random.key(0), jnp.ones(3))
    """
    _check_choice("distribution", distribution, DISTRIBUTIONS)
    _check_choice("structure", structure, STRUCTURES)
    _check_choice("batching", batching, BATCHING)
    _check_choice("perturb", perturb, PERTURB)
    _check_choice("layer_probabilities", layer_probabilities, LAYER_PROBABILITIES)
    num_directions = _check_num_directions(num_directions)
    if not callable(fun):
        raise TypeError(f"fun must be callable, got {type(fun).__name__}")

    estimator = _estimator(
        fun,
        argnums,
        num_directions,
        distribution,
        structure,
        batching,
        has_aux,
        perturb=perturb,
        layer_probabilities=layer_probabilities,
    )

    def estimate(key: jax.Array, *args: Any, **kwargs: Any):
        value, aux, grads, _ = estimator(key, *args, **kwargs)
        return ((value, aux) if has_aux else value), grads

    return estimate


def _estimator(
    fun,
    argnums,
    num_directions,
    distribution,
    structure,
    batching,
    has_aux,
    perturb="all",
    layer_probabilities="uniform",
    guard=False,
):
    """``(key, *args, **kwargs) -> (value, aux, estimate, ok)``; ``ok``: the value and the K
    directional derivatives are finite. With ``guard``, a step that is not ok estimates zeros
    (the directions are finite, so checking K + 1 scalars guards the whole estimate)."""

    def estimate(key: jax.Array, *args: Any, **kwargs: Any):
        diff, substitute = _differentiated(args, argnums)

        def f(d):
            out = fun(*substitute(d), **kwargs)
            if has_aux:
                if not (isinstance(out, tuple) and len(out) == 2):
                    raise TypeError("with has_aux=True, fun must return a pair (value, aux)")
                value, aux = out
            else:
                value, aux = out, None
            _check_scalar(value)
            return value, aux

        def one(k):
            if perturb == "all":
                v = _direction(k, diff, distribution, structure)
                value, aux, dot = _jvp(f, diff, v)
            else:
                v, deps, gate = _one_layer_direction(
                    k, diff, distribution, structure, layer_probabilities
                )
                value, aux, dot = _jvp(f, diff, v, deps, gate)
            return value, aux, dot, v

        keys = jax.random.split(key, num_directions)
        if batching == "vmap":
            if num_directions == 1:  # no vmap: it would turn lax.cond into select
                value, aux, dot, v = one(keys[0])
                dots, vs = dot[None], jax.tree.map(lambda x: x[None], v)
            else:
                value, aux, dots, vs = jax.vmap(one, out_axes=(None, None, 0, 0))(keys)
            ok = jnp.isfinite(value) & jnp.all(jnp.isfinite(dots))
            if guard:
                dots = jnp.where(ok, dots, jnp.zeros_like(dots))
            grads = _combine(dots, vs, num_directions)
        else:
            value_shape, aux_shape = jax.eval_shape(f, diff)
            zeros = lambda s: jnp.zeros(s.shape, s.dtype)

            def body(carry, k):
                total, _, _ = carry
                value, aux, dot, v = one(k)
                total = jax.tree.map(lambda t, d: t + d, total, _scale(dot, v))
                return (total, value, aux), dot

            init = (
                jax.tree.map(jnp.zeros_like, diff),
                zeros(value_shape),
                jax.tree.map(zeros, aux_shape),
            )
            (total, value, aux), dots = jax.lax.scan(body, init, keys)
            ok = jnp.isfinite(value) & jnp.all(jnp.isfinite(dots))
            if guard:
                total = jax.tree.map(lambda t: jnp.where(ok, t, jnp.zeros_like(t)), total)
            grads = jax.tree.map(lambda t: t / num_directions, total)
        grads = jax.tree.map(lambda g, x: g.astype(jnp.result_type(x)), grads, diff)
        grads = grads[0] if isinstance(argnums, int) else grads
        return value, aux, grads, ok

    return estimate


def _scale(dot: jax.Array, v: PyTree) -> PyTree:
    return jax.tree.map(
        lambda d: (dot * d.a)[..., None] * d.b if isinstance(d, RankOne) else dot * d,
        v,
        is_leaf=lambda d: isinstance(d, RankOne),
    )


def _combine(dots: jax.Array, vs: PyTree, k: int) -> PyTree:
    """``(1/K) sum_k dots[k] v_k`` for directions stacked on a leading axis of size K.

    For small K this is elementwise (a broadcast product summed over K), so XLA fuses it into
    whatever consumes the estimate (the optimizer update) instead of writing it to memory; a
    matrix product with an inner dimension K would not fuse.
    """

    def expand(x, ndim):
        return x.reshape(x.shape + (1,) * (ndim - x.ndim))

    def leaf(d):
        if isinstance(d, RankOne):
            if k > 8:
                a = (expand(dots, d.a.ndim) * d.a).reshape(k, -1)
                return (a.T @ d.b).reshape(d.a.shape[1:] + d.b.shape[1:]) / k
            a = (expand(dots, d.a.ndim) * d.a)[..., None]
            b = d.b.reshape((k,) + (1,) * (d.a.ndim - 1) + d.b.shape[1:])
            return jnp.sum(a * b, axis=0) / k
        if k > 8:
            return jnp.tensordot(dots, d, axes=1) / k
        return jnp.sum(expand(dots, d.ndim) * d, axis=0) / k

    return jax.tree.map(leaf, vs, is_leaf=lambda d: isinstance(d, RankOne))


def forward_grad(
    fun: Callable,
    argnums: int | Sequence[int] = 0,
    *,
    num_directions: int = 1,
    distribution: str = "normal",
    structure: str = "dense",
    perturb: str = "all",
    layer_probabilities: str = "uniform",
    batching: str = "vmap",
    has_aux: bool = False,
) -> Callable:
    r"""Like ``jax.grad``, but returns the forward-gradient estimate
    :math:`\hat g = \frac1K \sum_k (\nabla f \cdot v_k) v_k` computed with ``jax.jvp`` only.

    Arguments, variance and directions as in :func:`value_and_forward_grad`.

    Returns:
      ``g(key, *args, **kwargs) -> estimate`` (``(estimate, aux)`` with ``has_aux``), shaped
      like the differentiated argument(s).

    Example:
      >>> g = forward_grad(lambda x: jnp.sum(jnp.sin(x)), num_directions=4)
      >>> g(jax.random.key(0), jnp.zeros(3)).shape
      (3,)
    """
    value_and_grad = value_and_forward_grad(
        fun,
        argnums,
        num_directions=num_directions,
        distribution=distribution,
        structure=structure,
        perturb=perturb,
        layer_probabilities=layer_probabilities,
        batching=batching,
        has_aux=has_aux,
    )

    def estimate(key: jax.Array, *args: Any, **kwargs: Any):
        value, grads = value_and_grad(key, *args, **kwargs)
        return (grads, value[1]) if has_aux else grads

    return estimate
