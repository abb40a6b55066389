r"""Losses of the curvature engine: per-sample values, Hessian square roots, MC sampling.

Every loss is a sum of per-sample terms, :math:`L = c \sum_n \ell_n`, with :math:`c = 1/Z` for
``reduction="mean"`` (:math:`Z` the number of terms PyTorch averages over) and :math:`c = 1` for
``"sum"``. The engine needs, besides :math:`L`, a square root of each sample's output Hessian,
:math:`\nabla_f^2 \ell_n = S_n S_n^\top`, stored column-wise over the whole batch as an array
``(K, *outputs.shape)`` (column ``k`` of every sample at once), and a Monte-Carlo version
:math:`\tilde S_n` with :math:`\mathbb{E}[\tilde S_n \tilde S_n^\top] = \nabla_f^2 \ell_n`.
Square roots here are *unscaled*; the engine multiplies them by :math:`\sqrt{c}` (and
:math:`1/\sqrt{M}` for ``M`` MC samples).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

LOSSES = ("cross_entropy", "mse", "bce_with_logits")
REDUCTIONS = ("mean", "sum")

PerSampleLoss = Callable[[jax.Array, jax.Array], jax.Array]


class Loss(NamedTuple):
    r"""A loss as the engine sees it (all functions are pure and jittable).

    Attributes:
      name: ``"cross_entropy"``, ``"mse"``, ``"bce_with_logits"`` or ``"callable"``.
      check: ``(outputs, targets) -> None``; raises ``ValueError`` for targets that don't fit.
      per_sample: ``(outputs, targets) -> (N,)`` the unreduced :math:`\ell_n`.
      count: ``outputs.shape -> Z``, the number of terms the ``"mean"`` reduction divides by.
      sqrt_hessian: ``(outputs, targets) -> (K, *outputs.shape)`` exact square-root columns.
      sample_sqrt_hessian: ``(key, outputs, targets, M) -> (M, *outputs.shape)`` MC columns
        (each one a draw with :math:`\mathbb{E}[s s^\top] = \nabla_f^2 \ell`).
    """

    name: str
    check: Callable[[jax.Array, jax.Array], None]
    per_sample: Callable[[jax.Array, jax.Array], jax.Array]
    count: Callable[[tuple[int, ...]], int]
    sqrt_hessian: Callable[[jax.Array, jax.Array], jax.Array]
    sample_sqrt_hessian: Callable[[jax.Array, jax.Array, jax.Array, int], jax.Array]


def _sum_but_batch(x: jax.Array) -> jax.Array:
    return x.reshape(x.shape[0], -1).sum(axis=1)


def _one_hot_columns(values: jax.Array) -> jax.Array:
    """``values`` (N, *E) -> (prod(E), N, *E): column k carries entry k of every sample, 0 else.

    The square root of a Hessian that is diagonal per entry (MSE, BCE), and the block structure
    of per-position losses (cross-entropy over (N, ..., C) outputs), both use this layout.
    """
    entries = values.shape[1:]
    k = int(np.prod(entries, dtype=np.int64))
    eye = jnp.eye(k, dtype=values.dtype).reshape(k, 1, *entries)
    return eye * values[None]


# --- cross-entropy --------------------------------------------------------------------------


def _ce_check(outputs: jax.Array, targets: jax.Array) -> None:
    if outputs.ndim < 2:
        raise ValueError(
            f"loss='cross_entropy' needs outputs of shape (N, ..., C); got {outputs.shape}"
        )
    if targets.shape != outputs.shape[:-1] or not jnp.issubdtype(targets.dtype, jnp.integer):
        raise ValueError(
            "loss='cross_entropy' needs integer class labels of shape outputs.shape[:-1] = "
            f"{outputs.shape[:-1]}; got targets of shape {targets.shape} and dtype {targets.dtype}"
        )


def _ce_per_sample(outputs: jax.Array, targets: jax.Array) -> jax.Array:
    logp = jax.nn.log_softmax(outputs, axis=-1)
    picked = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    return -_sum_but_batch(picked) if picked.ndim > 1 else -picked


def _ce_sqrt_hessian(outputs: jax.Array, targets: jax.Array) -> jax.Array:
    # Per position: S = diag(sqrt p) - p sqrt(p)^T, column c = sqrt(p_c) (e_c - p).
    del targets
    p = jax.nn.softmax(outputs, axis=-1)
    c = outputs.shape[-1]
    eye = jnp.eye(c, dtype=p.dtype)
    # cols[c, ..., j] = sqrt(p_c) (delta_cj - p_j) at each position
    cols = jnp.sqrt(p)[..., :, None] * (eye - p[..., None, :])  # (*positions, c, j)
    cols = jnp.moveaxis(cols, -2, 0)  # (c, N, *pos, C)
    if outputs.ndim == 2:
        return cols
    # Positions are separate loss terms: every (position, class) pair is its own column.
    n, pos = outputs.shape[0], outputs.shape[1:-1]
    t = int(np.prod(pos, dtype=np.int64))
    cols = cols.reshape(c, n, t, c)
    eye_t = jnp.eye(t, dtype=p.dtype)
    # full[s, c, n, t, j] = [s == t] cols[c, n, t, j]
    full = eye_t[:, None, None, :, None] * cols[None]
    return full.reshape(t * c, n, *pos, c)


def _ce_sample(key: jax.Array, outputs: jax.Array, targets: jax.Array, m: int) -> jax.Array:
    del targets
    p = jax.nn.softmax(outputs, axis=-1)
    draws = jax.random.categorical(key, outputs, axis=-1, shape=(m, *outputs.shape[:-1]))
    return p[None] - jax.nn.one_hot(draws, outputs.shape[-1], dtype=p.dtype)


def _ce_count(shape: tuple[int, ...]) -> int:
    return int(np.prod(shape[:-1], dtype=np.int64))


# --- mean squared error ---------------------------------------------------------------------


def _same_shape_check(name: str) -> Callable[[jax.Array, jax.Array], None]:
    def check(outputs: jax.Array, targets: jax.Array) -> None:
        if targets.shape != outputs.shape:
            raise ValueError(
                f"loss={name!r} needs targets of the outputs' shape {outputs.shape}; "
                f"got {targets.shape}"
            )

    return check


def _mse_per_sample(outputs: jax.Array, targets: jax.Array) -> jax.Array:
    return _sum_but_batch((outputs - targets) ** 2)


def _mse_sqrt_hessian(outputs: jax.Array, targets: jax.Array) -> jax.Array:
    del targets
    return _one_hot_columns(jnp.full_like(outputs, np.sqrt(2.0)))


def _mse_sample(key: jax.Array, outputs: jax.Array, targets: jax.Array, m: int) -> jax.Array:
    # y ~ N(f, 1/2): -log p = (y - f)^2 + const, gradient 2 (f - y) ~ N(0, 2).
    del targets
    return np.sqrt(2.0) * jax.random.normal(key, (m, *outputs.shape), outputs.dtype)


def _all_but_batch_count(shape: tuple[int, ...]) -> int:
    return int(np.prod(shape, dtype=np.int64))


# --- binary cross-entropy with logits -------------------------------------------------------


def _bce_per_sample(outputs: jax.Array, targets: jax.Array) -> jax.Array:
    # log(1 + e^f) - y f, stable for large |f|
    return _sum_but_batch(jax.nn.softplus(outputs) - targets * outputs)


def _bce_sqrt_hessian(outputs: jax.Array, targets: jax.Array) -> jax.Array:
    del targets
    s = jax.nn.sigmoid(outputs)
    return _one_hot_columns(jnp.sqrt(s * (1.0 - s)))


def _bce_sample(key: jax.Array, outputs: jax.Array, targets: jax.Array, m: int) -> jax.Array:
    del targets
    s = jax.nn.sigmoid(outputs)
    draws = jax.random.bernoulli(key, s, (m, *outputs.shape)).astype(s.dtype)
    return s[None] - draws


# --- a user's per-sample loss ---------------------------------------------------------------


def _callable_loss(fn: PerSampleLoss) -> Loss:
    def check(outputs: jax.Array, targets: jax.Array) -> None:
        if outputs.ndim < 1 or targets.ndim < 1 or targets.shape[0] != outputs.shape[0]:
            raise ValueError(
                "a callable loss needs outputs and targets with the same leading batch axis; "
                f"got outputs {outputs.shape} and targets {targets.shape}"
            )
        try:
            out = jax.eval_shape(fn, outputs[0], targets[0])
        except (TypeError, ValueError) as err:
            raise ValueError(
                f"the callable loss failed on one sample (output shape {outputs.shape[1:]}, "
                f"target shape {targets.shape[1:]}): do the targets fit the outputs? {err}"
            ) from err
        if getattr(out, "shape", None) != ():
            raise ValueError(
                "a callable loss must be per-sample: loss(output, target) for ONE sample "
                f"(output shape {outputs.shape[1:]}) must return a scalar; it returned "
                f"shape {getattr(out, 'shape', type(out))}"
            )

    def per_sample(outputs: jax.Array, targets: jax.Array) -> jax.Array:
        return jax.vmap(fn)(outputs, targets)

    def sqrt_one(output: jax.Array, target: jax.Array) -> jax.Array:
        # H = V diag(lam) V^T  ->  S = V diag(sqrt(max(lam, 0))), columns as (D, *output.shape).
        d = output.size
        hess = jax.hessian(fn)(output, target).reshape(d, d)
        lam, vec = jnp.linalg.eigh(0.5 * (hess + hess.T))
        cols = vec * jnp.sqrt(jnp.maximum(lam, 0.0))[None, :]
        return cols.T.reshape(d, *output.shape)

    def sqrt_hessian(outputs: jax.Array, targets: jax.Array) -> jax.Array:
        return jnp.moveaxis(jax.vmap(sqrt_one)(outputs, targets), 1, 0)

    def sample(key: jax.Array, outputs: jax.Array, targets: jax.Array, m: int) -> jax.Array:
        # No distribution is known: mix the exact columns with Gaussian weights, s = S z,
        # z ~ N(0, I), so that E[s s^T] = S S^T.
        cols = sqrt_hessian(outputs, targets)  # (D, N, ...)
        z = jax.random.normal(key, (m, *cols.shape[:2]), cols.dtype)  # (M, D, N)
        return jnp.einsum("mdn,dn...->mn...", z, cols)

    return Loss(
        name="callable",
        check=check,
        per_sample=per_sample,
        count=lambda shape: shape[0],
        sqrt_hessian=sqrt_hessian,
        sample_sqrt_hessian=sample,
    )


_BUILTIN = {
    "cross_entropy": Loss(
        "cross_entropy", _ce_check, _ce_per_sample, _ce_count, _ce_sqrt_hessian, _ce_sample
    ),
    "mse": Loss(
        "mse",
        _same_shape_check("mse"),
        _mse_per_sample,
        _all_but_batch_count,
        _mse_sqrt_hessian,
        _mse_sample,
    ),
    "bce_with_logits": Loss(
        "bce_with_logits",
        _same_shape_check("bce_with_logits"),
        _bce_per_sample,
        _all_but_batch_count,
        _bce_sqrt_hessian,
        _bce_sample,
    ),
}


def get(loss: str | PerSampleLoss) -> Loss:
    """Resolves ``loss`` (a name of :data:`LOSSES` or a per-sample callable) to a :class:`Loss`.

    Raises:
      ValueError: an unknown name (the message lists the valid ones).
      TypeError: neither a string nor a callable.
    """
    if isinstance(loss, str):
        if loss not in _BUILTIN:
            raise ValueError(
                f"unknown loss {loss!r}; valid names: {', '.join(LOSSES)}, or a callable "
                "loss(output, target) -> scalar for one sample"
            )
        return _BUILTIN[loss]
    if callable(loss):
        return _callable_loss(loss)
    raise TypeError(f"loss must be one of {LOSSES} or a callable; got {type(loss).__name__}")


def scale(reduction: str, loss: Loss, shape: tuple[int, ...]) -> float:
    r"""The factor :math:`c` of :math:`L = c \sum_n \ell_n` for ``reduction``."""
    return 1.0 / loss.count(shape) if reduction == "mean" else 1.0
