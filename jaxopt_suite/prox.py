r"""Proximal operators: pure functions on arrays.

Each operator returns the minimiser

.. math::

    \operatorname{prox}_{tR}(x) = \arg\min_u \; t\,R(u) + \tfrac12 \lVert u - x \rVert_2^2

for a regulariser :math:`R` and a strength :math:`t \ge 0` (``strength``, usually
``reg * learning_rate``). They work for any shape and floating dtype, under ``jit``, ``vmap``
and ``grad``, with ``strength`` a traced scalar; ``strength = 0`` is the identity, an all-zero
group gives zeros (never NaN) and the result is exactly zero wherever the operator says so. A
NaN in the input stays NaN in the output (it is never turned into a finite value), so a
training step that checks its updates for finiteness sees it.

A negative strength (or radius, or ``gamma``) has no prox: :math:`tR` is then concave and the
formulas would grow ``x`` instead of shrinking it. A concrete negative value raises a
ValueError naming the argument. A traced one (under ``jit``, ``vmap``, ``grad`` or
``optax.inject_hyperparams``) cannot raise, so every operator returns NaN in every entry
instead (:math:`\operatorname{prox}_{tR}(x) = \mathrm{NaN}` for :math:`t < 0` or :math:`t`
NaN): never a silently wrong value. :func:`jaxopt_suite.train.make_step` keeps every
parameter whose update is not finite, so such a step leaves the parameters unchanged.

Grouped operators (:func:`l21`, :func:`linf1`) take ``group_axis``: a group is the slice of
``x`` at one index of that axis, so for a Flax ``Dense`` kernel ``(in, out)`` and
``group_axis=-1`` the groups are the output units' incoming weights.

Example::

    >>> import jax.numpy as jnp
    >>> from jaxopt_suite import prox
    >>> prox.l1(jnp.array([-2.0, 0.5, 3.0]), 1.0)
    Array([-1.,  0.,  2.], dtype=float32)
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

ArrayLike = Any

# Groups up to this size find the l1-ball threshold by pairwise comparisons instead of a sort.
_PAIRWISE_MAX = 32


def check_nonnegative(value: Any, name: str) -> None:
    """Raises a ValueError naming ``name`` when a concrete ``value`` is negative.

    Traced values (inside ``jit`` or ``optax.inject_hyperparams``) cannot be inspected: the
    operators of this module turn a negative traced value into a NaN result (see the module
    docstring); schedules (callables) are left to the caller.
    """
    if isinstance(value, jax.core.Tracer) or callable(value):
        return
    try:
        array = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise TypeError(f"{name} must be a non-negative number, got {value!r}") from err
    if np.any(array < 0) or np.any(np.isnan(array)):
        raise ValueError(f"{name} must be >= 0, got {value!r}")


def _check_array(x: ArrayLike) -> jax.Array:
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"x must be a floating-point array, got dtype {x.dtype}")
    return x


def _strength(strength: ArrayLike, dtype: Any, name: str = "strength") -> jax.Array:
    """``strength`` as a scalar of ``dtype``; NaN when it is negative (or NaN) and traced, so
    that the operator's result is NaN (a concrete negative value raises)."""
    check_nonnegative(strength, name)
    if jnp.ndim(strength) != 0:
        raise ValueError(f"{name} must be a scalar, got shape {jnp.shape(strength)}")
    return _nan_if_negative(jnp.asarray(strength, dtype=dtype))


def _nan_if_negative(t: jax.Array) -> jax.Array:
    """``t`` where ``t >= 0``, else NaN (also for a NaN ``t``)."""
    return jnp.where(t >= 0, t, jnp.nan)


def _nan_where_nan(result: jax.Array, t: jax.Array) -> jax.Array:
    """``result``, but NaN everywhere when the strength ``t`` is NaN: for the operators whose
    comparisons with ``t`` would otherwise fall back to the identity."""
    return jnp.where(jnp.isnan(t), jnp.asarray(jnp.nan, result.dtype), result)


def _group_axis(group_axis: int, ndim: int) -> int:
    if not isinstance(group_axis, int | np.integer) or not -ndim <= group_axis < ndim:
        raise ValueError(
            f"group_axis must be an int in [-{ndim}, {ndim}) for an array of {ndim} dims, "
            f"got {group_axis!r}"
        )
    return int(group_axis) % ndim


def _compute_dtype(dtype: Any) -> Any:
    # Sums and cumulative sums over a group lose too much in half precision.
    return jnp.promote_types(dtype, jnp.float32)


def safe_norm(sum_of_squares: jax.Array) -> jax.Array:
    """``sqrt(sum_of_squares)`` whose gradient at 0 is 0, not NaN (NaN stays NaN)."""
    zero = sum_of_squares == 0
    return jnp.where(zero, 0.0, jnp.sqrt(jnp.where(zero, 1.0, sum_of_squares)))


def l2_shrinkage(norm: jax.Array, strength: jax.Array) -> jax.Array:
    r"""The factor :math:`\max(0, 1 - t/\lVert x \rVert)` of the l2 prox, exactly 0 when
    :math:`\lVert x \rVert \le t` (also for a zero group) and NaN when the norm is NaN or
    :math:`t` is negative or NaN (no check is done here: ``strength`` may be traced)."""
    strength = _nan_if_negative(jnp.asarray(strength))
    small = norm <= strength
    return jnp.where(small, 0.0, 1.0 - strength / jnp.where(small, 1.0, norm))


def l1_ball_threshold(columns: jax.Array | Sequence[jax.Array], radius: ArrayLike) -> jax.Array:
    r"""The threshold :math:`\theta \ge 0` of the Euclidean projection onto an l1 ball, per
    column.

    For a non-negative vector :math:`a` (one column), :math:`\theta` is the root of the
    decreasing, convex, piecewise-linear :math:`\varphi(\theta) = \sum_i \max(a_i - \theta, 0)
    - r` when :math:`\lVert a \rVert_1 > r`, and 0 otherwise; the projection is then
    :math:`\operatorname{sign}(x)\max(\lvert x \rvert - \theta, 0)`. Equivalently, with
    :math:`u` the entries in decreasing order (Duchi et al., 2008),

    .. math:: \theta = \max\Bigl(0, \max_j \frac{\sum_{i \le j} u_i - r}{j}\Bigr).

    No sort is done (XLA's sort is slow on CPU). Columns of at most ``_PAIRWISE_MAX`` entries
    use pairwise comparisons: the :math:`j`-th prefix is the set of entries
    :math:`\ge a_i`. Longer columns use Newton's method on :math:`\varphi` from the lower
    bound :math:`\max(\max_i a_i - r, 0)`,
    :math:`\theta \leftarrow \theta + \varphi(\theta) / \lvert\{a_i > \theta\}\rvert`
    (Michelot's iteration), which increases monotonically and stops exactly, after at most
    :math:`n` steps, when the set :math:`\{a_i > \theta\}` no longer changes (with a small
    :math:`r`, as in auto-sizing, after two or three). All columns are solved at once.
    Derivatives follow from :math:`\theta = (\sum_{a_i > \theta} a_i - r) / \lvert\{a_i >
    \theta\}\rvert` with the active set held fixed (a custom JVP, so ``jax.grad`` works).

    Args:
      columns: non-negative values ``(n, groups)``; or a sequence of such arrays with the same
        number of columns, which then form one vector per column together (a kernel and its
        bias), without being concatenated. Computed in at least float32.
      radius: the radius :math:`r \ge 0` (a scalar, may be traced).

    Returns:
      :math:`\theta`, shape ``(groups,)``; NaN when :math:`r` is negative or NaN (no check is
      done here: ``radius`` may be traced).
    """
    parts = [columns] if isinstance(columns, jax.Array | np.ndarray) else list(columns)
    cd = _compute_dtype(jnp.result_type(*parts))
    r = jnp.asarray(radius, cd)
    theta = _jitted_threshold([jnp.asarray(p, cd) for p in parts], _nan_if_negative(r))
    return _nan_where_nan(theta, _nan_if_negative(r))


@jax.custom_jvp
def _threshold(parts: list[jax.Array], r: jax.Array) -> jax.Array:
    if sum(p.shape[0] for p in parts) > _PAIRWISE_MAX:
        return _newton_threshold(parts, r)
    a = jnp.concatenate(parts, axis=0) if len(parts) > 1 else parts[0]
    # above[i, k, g]: entry k is in the prefix of the sorted column that ends at entry i.
    above = a[None, :, :] >= a[:, None, :]
    count = jnp.sum(above, axis=1).astype(a.dtype)
    excess = jnp.sum(jnp.where(above, a[None, :, :], 0), axis=1) - r
    theta = jnp.max(excess / count, axis=0)
    return jnp.where(jnp.sum(a, axis=0) <= r, 0.0, jnp.maximum(theta, 0.0))


def column_sum(x: jax.Array) -> jax.Array:
    """``x.sum(axis=0)`` for a matrix, as a product with a row of ones: XLA's CPU column
    reductions fused with elementwise work are several times slower than this matrix-vector
    product."""
    ones = jnp.ones((1, x.shape[0]), x.dtype)
    return jnp.matmul(ones, x, precision=jax.lax.Precision.HIGHEST)[0]


def _newton_threshold(parts: list[jax.Array], r: jax.Array) -> jax.Array:
    # max a - r is a lower bound of theta, and 0 when the column is inside the ball: then
    # phi(0) <= 0 and the iteration stays at exactly 0.
    amax = functools.reduce(jnp.maximum, [jnp.max(p, axis=0) for p in parts])

    def body(carry):
        theta, _, k = carry
        excess = sum(column_sum(jnp.maximum(p - theta, 0)) for p in parts) - r
        count = sum(column_sum(jnp.where(p > theta, 1.0, 0.0).astype(p.dtype)) for p in parts)
        # count = 0 only for r = 0, where theta = max a is the answer.
        new = theta + jnp.where(count > 0, excess / jnp.maximum(count, 1), 0.0)
        new = jnp.maximum(new, theta)
        return new, jnp.any(new > theta), k + 1

    n = sum(p.shape[0] for p in parts)
    start = jnp.maximum(amax - r, 0.0)
    return jax.lax.while_loop(lambda c: c[1] & (c[2] <= n), body, (start, True, 0))[0]


@_threshold.defjvp
def _threshold_jvp(primals, tangents):
    parts, r = primals
    d_parts, d_r = tangents
    theta = _threshold(parts, r)
    active = [p > theta for p in parts]
    count = sum(jnp.sum(m, axis=0) for m in active)
    # With r = 0, theta is the largest entry and nothing is strictly above it.
    ties = [p >= theta for p in parts]
    active = [jnp.where(count > 0, m, t) for m, t in zip(active, ties, strict=True)]
    count = sum(jnp.sum(m, axis=0) for m in active).astype(theta.dtype)
    mass = sum(jnp.sum(jnp.where(m, d, 0), axis=0) for m, d in zip(active, d_parts, strict=True))
    d_theta = (mass - d_r) / jnp.maximum(count, 1)
    total = sum(jnp.sum(p, axis=0) for p in parts)
    return theta, jnp.where((total <= r) | (theta <= 0), 0.0, d_theta)


# Compiled once per shape when called eagerly; inlined when traced inside a caller's jit.
_jitted_threshold = jax.jit(_threshold)


def _columns(x: jax.Array, group_axis: int) -> jax.Array:
    """``x`` as ``(group_size, groups)`` columns, in the compute dtype."""
    columns = jnp.moveaxis(x, group_axis, -1)
    return columns.reshape(-1, columns.shape[-1]).astype(_compute_dtype(x.dtype))


def _per_group(values: jax.Array, x: jax.Array, group_axis: int) -> jax.Array:
    """Reshapes one value per group, ``(groups,)``, to broadcast against ``x``."""
    shape = [1] * x.ndim
    shape[group_axis] = x.shape[group_axis]
    return values.reshape(shape)


def l1(x: ArrayLike, strength: ArrayLike) -> jax.Array:
    r"""Soft thresholding, the prox of :math:`t\lVert x \rVert_1`.

    .. math:: \operatorname{prox}(x)_i = \operatorname{sign}(x_i)\max(\lvert x_i \rvert - t, 0)

    Args:
      x: a floating-point array of any shape.
      strength: :math:`t \ge 0`, a scalar (traced and negative: the result is NaN).

    Returns:
      An array like ``x``; exactly 0 where :math:`\lvert x_i \rvert \le t`.

    Example::

        >>> l1(jnp.array([-2.0, 0.5]), 1.0)
        Array([-1.,  0.], dtype=float32)
    """
    x = _check_array(x)
    t = _strength(strength, x.dtype)
    return jnp.sign(x) * jnp.maximum(jnp.abs(x) - t, 0)


def l2(x: ArrayLike, strength: ArrayLike) -> jax.Array:
    r"""Block soft thresholding, the prox of :math:`t\lVert x \rVert_2` (the whole array is
    one group).

    .. math:: \operatorname{prox}(x) = x\,\max\Bigl(0, 1 - \frac{t}{\lVert x \rVert_2}\Bigr)

    Args:
      x: a floating-point array of any shape.
      strength: :math:`t \ge 0`, a scalar (traced and negative: the result is NaN).

    Returns:
      An array like ``x``; exactly 0 when :math:`\lVert x \rVert_2 \le t`.

    Example::

        >>> l2(jnp.array([3.0, 4.0]), 1.0)
        Array([2.4, 3.2], dtype=float32)
    """
    x = _check_array(x)
    cd = _compute_dtype(x.dtype)
    t = _strength(strength, cd)
    norm = safe_norm(jnp.sum(jnp.square(x.astype(cd))))
    return (x * l2_shrinkage(norm, t)).astype(x.dtype)


def l21(x: ArrayLike, strength: ArrayLike, group_axis: int = -1) -> jax.Array:
    r"""Group soft thresholding, the prox of :math:`t\sum_g \lVert x_g \rVert_2`.

    .. math:: \operatorname{prox}(x)_g = x_g\,\max\Bigl(0, 1 - \frac{t}{\lVert x_g \rVert_2}\Bigr)

    Args:
      x: a floating-point array with at least one axis.
      strength: :math:`t \ge 0`, a scalar (traced and negative: the result is NaN).
      group_axis: group :math:`g` is ``x`` at index :math:`g` of this axis (every other axis
        belongs to the group).

    Returns:
      An array like ``x``; a group is exactly 0 when :math:`\lVert x_g \rVert_2 \le t`.

    Example::

        >>> l21(jnp.array([[3.0, 0.1], [4.0, 0.1]]), 1.0)  # columns are the groups
        Array([[2.4, 0. ],
               [3.2, 0. ]], dtype=float32)
    """
    x = _check_array(x)
    axis = _group_axis(group_axis, x.ndim)
    cd = _compute_dtype(x.dtype)
    t = _strength(strength, cd)
    other = tuple(i for i in range(x.ndim) if i != axis)
    norm = safe_norm(jnp.sum(jnp.square(x.astype(cd)), axis=other, keepdims=True))
    return (x * l2_shrinkage(norm, t)).astype(x.dtype)


def project_l1_ball(x: ArrayLike, radius: ArrayLike) -> jax.Array:
    r"""Euclidean projection of the whole array onto :math:`\{u : \lVert u \rVert_1 \le r\}`.

    .. math:: \Pi(x)_i = \operatorname{sign}(x_i)\max(\lvert x_i \rvert - \theta, 0)

    with :math:`\theta` from :func:`l1_ball_threshold` (0 when :math:`x` is inside the ball).

    Args:
      x: a floating-point array of any shape.
      radius: :math:`r \ge 0`, a scalar (traced and negative: the result is NaN).

    Returns:
      An array like ``x``.
    """
    x = _check_array(x)
    cd = _compute_dtype(x.dtype)
    r = _strength(radius, cd, name="radius")
    if x.size == 0:
        return x
    theta = l1_ball_threshold(jnp.abs(x.astype(cd)).reshape(-1, 1), r)[0]
    return (jnp.sign(x) * jnp.maximum(jnp.abs(x) - theta, 0)).astype(x.dtype)


def linf(x: ArrayLike, strength: ArrayLike) -> jax.Array:
    r"""The prox of :math:`t\lVert x \rVert_\infty` (the whole array is one group).

    By the Moreau decomposition, since the dual of the l-infinity norm is the l1 norm,

    .. math::

        \operatorname{prox}(x) = x - \Pi_{\lVert\cdot\rVert_1 \le t}(x)
        = \operatorname{clip}(x, -\theta, \theta)

    with :math:`\theta` the threshold of the l1-ball projection (:func:`l1_ball_threshold`).

    Args:
      x: a floating-point array of any shape.
      strength: :math:`t \ge 0`, a scalar (traced and negative: the result is NaN).

    Returns:
      An array like ``x``; exactly 0 when :math:`\lVert x \rVert_1 \le t`.

    Example::

        >>> linf(jnp.array([3.0, -1.0, 0.5]), 1.0)
        Array([ 2. , -1. ,  0.5], dtype=float32)
    """
    x = _check_array(x)
    cd = _compute_dtype(x.dtype)
    t = _strength(strength, cd)
    if x.size == 0:
        return x
    theta = l1_ball_threshold(jnp.abs(x.astype(cd)).reshape(-1, 1), t)[0]
    return jnp.clip(x, -theta, theta).astype(x.dtype)


def linf1(x: ArrayLike, strength: ArrayLike, group_axis: int = -1) -> jax.Array:
    r"""The prox of :math:`t\sum_g \lVert x_g \rVert_\infty`: :func:`linf` on every group.

    .. math::

        \operatorname{prox}(x)_g = x_g - \Pi_{\lVert\cdot\rVert_1 \le t}(x_g)
        = \operatorname{clip}(x_g, -\theta_g, \theta_g)

    All groups at once (:func:`l1_ball_threshold`).

    Args:
      x: a floating-point array with at least one axis.
      strength: :math:`t \ge 0`, a scalar (traced and negative: the result is NaN).
      group_axis: group :math:`g` is ``x`` at index :math:`g` of this axis.

    Returns:
      An array like ``x``; a group is exactly 0 when :math:`\lVert x_g \rVert_1 \le t`.

    Example::

        >>> linf1(jnp.array([[3.0, 0.2], [-1.0, 0.3]]), 1.0)  # columns are the groups
        Array([[ 2., 0.],
               [-1., 0.]], dtype=float32)
    """
    x = _check_array(x)
    axis = _group_axis(group_axis, x.ndim)
    t = _strength(strength, _compute_dtype(x.dtype))
    if x.size == 0:
        return x
    theta = _per_group(l1_ball_threshold(jnp.abs(_columns(x, axis)), t), x, axis)
    return jnp.clip(x, -theta, theta).astype(x.dtype)


def elastic_net(x: ArrayLike, strength: ArrayLike, gamma: ArrayLike = 1.0) -> jax.Array:
    r"""The prox of :math:`t(\lVert x \rVert_1 + \tfrac{\gamma}{2}\lVert x \rVert_2^2)`.

    .. math::

        \operatorname{prox}(x)_i = \frac{\operatorname{sign}(x_i)
        \max(\lvert x_i \rvert - t, 0)}{1 + t\gamma}

    Args:
      x: a floating-point array of any shape.
      strength: :math:`t \ge 0`, a scalar (traced and negative: the result is NaN).
      gamma: :math:`\gamma \ge 0`, the weight of the quadratic term (a scalar; traced and
        negative: the result is NaN).

    Returns:
      An array like ``x``; exactly 0 where :math:`\lvert x_i \rvert \le t`.
    """
    x = _check_array(x)
    t = _strength(strength, x.dtype)
    g = _strength(gamma, x.dtype, name="gamma")
    return l1(x, t) / (1 + t * g)


def log_barrier(x: ArrayLike, strength: ArrayLike) -> jax.Array:
    r"""The prox of :math:`-t\sum_i \log x_i`, which keeps every entry positive.

    .. math:: \operatorname{prox}(x)_i = \frac{x_i + \sqrt{x_i^2 + 4t}}{2}

    evaluated as :math:`2t / (\sqrt{x_i^2 + 4t} - x_i)` for negative :math:`x_i` to avoid
    cancellation. For :math:`t = 0` it is the identity (the regulariser vanishes).

    Args:
      x: a floating-point array of any shape.
      strength: :math:`t \ge 0`, a scalar (traced and negative: the result is NaN).

    Returns:
      An array like ``x``, positive where :math:`t > 0`.
    """
    x = _check_array(x)
    cd = _compute_dtype(x.dtype)
    t = _strength(strength, cd)
    xc = x.astype(cd)
    positive = t > 0
    root = jnp.sqrt(jnp.where(positive, jnp.square(xc) + 4 * t, 1.0))
    denominator = jnp.where(positive & ~(xc >= 0), root - xc, 1.0)  # NaN stays NaN
    value = jnp.where(xc >= 0, (xc + root) / 2, 2 * t / denominator)
    return _nan_where_nan(jnp.where(positive, value, xc), t).astype(x.dtype)


def l0(x: ArrayLike, strength: ArrayLike) -> jax.Array:
    r"""Hard thresholding, a prox of :math:`t\lVert x \rVert_0` (the number of non-zeros).

    .. math:: \operatorname{prox}(x)_i = x_i \text{ if } \lvert x_i \rvert > \sqrt{2t}
        \text{ else } 0

    (at :math:`\lvert x_i \rvert = \sqrt{2t}` both 0 and :math:`x_i` are minimisers; 0 is
    returned).

    Args:
      x: a floating-point array of any shape.
      strength: :math:`t \ge 0`, a scalar (traced and negative: the result is NaN).

    Returns:
      An array like ``x``.
    """
    x = _check_array(x)
    cd = _compute_dtype(x.dtype)
    t = _strength(strength, cd)
    small = jnp.abs(x.astype(cd)) <= jnp.sqrt(2 * t)
    return _nan_where_nan(jnp.where(small, jnp.zeros_like(x), x), t)
