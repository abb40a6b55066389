"""The linear algebra of a ProxProp step: mode parsing, batched conjugate gradients, exact solves.

Every solver works on the damped normal system of a layer that is linear in its parameters,

.. math::

  (A^\\top A + \\beta I)\\, d = g, \\qquad \\beta = 1 / \\tau_{\\text{prox}},

where :math:`A` maps parameters to layer outputs and :math:`g = A^\\top g_z` is the ordinary
parameter gradient. The operator is only ever applied, never inverted, except by the exact
solvers, which factor a Gram matrix with a Cholesky decomposition.

Parameters are pytrees. With ``per_unit=True`` every leaf's last axis indexes independent output
units (the columns of a Dense kernel, the output channels of a Conv kernel, the bias entries), the
layer output's last axis indexes the same units, and the system splits into one independent
system per unit: inner products are taken per unit, so one batched CG runs all of them at once.
With ``per_unit=False`` all parameters form one vector.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jaxopt_suite._typing import PyTree

MODES_HELP = '"gradient", "prox_exact" or "prox_cg<K>" with an integer K >= 1 (e.g. "prox_cg3")'

# CG stops once every unit's residual norm fell below this fraction of its initial norm.
CG_RTOL = 1e-2


class Mode(NamedTuple):
    """A parsed ``optimization_mode``.

    Attributes:
      kind: ``"gradient"``, ``"prox_exact"`` or ``"prox_cg"``.
      cg_steps: the number K of conjugate-gradient iterations (0 unless ``kind == "prox_cg"``).
    """

    kind: str
    cg_steps: int = 0


def parse_mode(optimization_mode: str) -> Mode:
    """Parses ``"gradient"``, ``"prox_exact"`` or ``"prox_cg<K>"`` (K >= 1).

    Raises:
      TypeError: ``optimization_mode`` is not a string.
      ValueError: an unknown mode, or K < 1; the message lists the valid modes.
    """
    if not isinstance(optimization_mode, str):
        raise TypeError(
            f"optimization_mode must be a string, one of {MODES_HELP}; "
            f"got {type(optimization_mode).__name__}"
        )
    if optimization_mode in ("gradient", "prox_exact"):
        return Mode(optimization_mode)
    match = re.fullmatch(r"prox_cg(-?\d+)", optimization_mode)
    if match is None:
        raise ValueError(f"unknown optimization_mode {optimization_mode!r}; valid: {MODES_HELP}")
    steps = int(match.group(1))
    if steps < 1:
        raise ValueError(
            f"optimization_mode {optimization_mode!r} asks for {steps} CG steps; K must be >= 1 "
            f"(valid: {MODES_HELP})"
        )
    return Mode("prox_cg", steps)


def check_tau(tau_prox: Any) -> None:
    """Raises a ValueError if a concrete ``tau_prox`` is not a positive finite number.

    A traced value (under ``jit`` or ``inject_hyperparams``) cannot be checked at trace time
    and is accepted as it is.
    """
    try:
        value = float(tau_prox)
    except (TypeError, jax.errors.ConcretizationTypeError):
        if isinstance(tau_prox, jax.core.Tracer):
            return
        raise TypeError(
            f"tau_prox must be a positive number, got {type(tau_prox).__name__}"
        ) from None
    if not value > 0 or value == float("inf"):
        raise ValueError(f"tau_prox must be a positive finite number, got {value}")


def unit_dot(u: PyTree, v: PyTree, per_unit: bool) -> jax.Array:
    """Inner products of two parameter pytrees, one per output unit (last axis) or one in all."""
    leaves = zip(jax.tree.leaves(u), jax.tree.leaves(v), strict=True)
    if per_unit:
        return sum(jnp.sum(a * b, axis=tuple(range(a.ndim - 1))) for a, b in leaves)
    return sum(jnp.vdot(a, b) for a, b in leaves)


def _safe_div(num: jax.Array, den: jax.Array) -> jax.Array:
    # den == 0 only where the search direction is 0 (the operator is positive definite); the
    # step is then 0 as well, instead of 0/0.
    return jnp.where(den > 0, num / jnp.where(den > 0, den, 1), 0)


def _axpy(alpha: jax.Array, x: PyTree, y: PyTree) -> PyTree:
    """alpha * x + y with ``alpha`` a scalar or one value per unit (broadcast on the last axis)."""
    return jax.tree.map(lambda a, b: (alpha * a + b).astype(b.dtype), x, y)


def cg_solve(
    apply_a: Callable[[PyTree], Any],
    apply_at: Callable[[Any], PyTree],
    beta: jax.Array,
    g: PyTree,
    steps: int,
    *,
    per_unit: bool,
    rtol: float = CG_RTOL,
) -> PyTree:
    """At most ``steps`` conjugate-gradient iterations on :math:`(A^\\top A + \\beta I) d = g`.

    CG starts at :math:`d_0 = 0`; iteration :math:`k` computes :math:`q = A p_k`, the step
    :math:`\\alpha_k = r_k^\\top r_k / (\\|q\\|^2 + \\beta \\|p_k\\|^2)` and
    :math:`d_{k+1} = d_k + \\alpha_k p_k`. The residual update
    :math:`r_{k+1} = r_k - \\alpha_k (A^\\top q + \\beta p_k)` is skipped on the last iteration,
    so K iterations cost K products with :math:`A` and K - 1 with :math:`A^\\top`; one step is
    the Cauchy step :math:`d = \\alpha g`, :math:`\\alpha = \\|g\\|^2 / (\\|A g\\|^2 +
    \\beta \\|g\\|^2)`. Iterations stop early once every unit's residual norm is below ``rtol``
    times its initial norm.

    Args:
      apply_a: ``u -> A u``, parameters to outputs (the output's last axis indexes the units
        when ``per_unit``).
      apply_at: ``z -> A^T z``, outputs to parameters.
      beta: the damping :math:`1/\\tau` (a scalar, may be traced).
      g: the right-hand side (the parameter gradient), a pytree.
      steps: the maximum number K >= 1 of iterations (static).
      per_unit: one independent system per output unit (see the module docstring), or one
        system for all parameters.
      rtol: the relative residual norm at which to stop.

    Returns:
      The approximate solution, a pytree like ``g``.
    """

    def out_sq(z):
        return unit_dot(z, z, per_unit)

    def step_size(p, rr):
        q = apply_a(p)
        return q, _safe_div(rr, out_sq(q) + beta * unit_dot(p, p, per_unit))

    rr0 = unit_dot(g, g, per_unit)
    if steps == 1:
        _, alpha = step_size(g, rr0)
        return jax.tree.map(lambda a: (alpha * a).astype(a.dtype), g)

    def converged(rr):
        return jnp.all(rr <= (rtol * rtol) * rr0)

    def cond(carry):
        k, _, _, _, rr = carry
        return (k < steps - 1) & ~converged(rr)

    def body(carry):
        k, d, r, p, rr = carry
        q, alpha = step_size(p, rr)
        d = _axpy(alpha, p, d)
        r = _axpy(-alpha, _axpy(beta, p, apply_at(q)), r)
        rr_new = unit_dot(r, r, per_unit)
        p = _axpy(_safe_div(rr_new, rr), p, r)
        return k + 1, d, r, p, rr_new

    zeros = jax.tree.map(jnp.zeros_like, g)
    _, d, _, p, rr = jax.lax.while_loop(cond, body, (jnp.asarray(0), zeros, g, g, rr0))
    # The last iteration needs no new residual; it is skipped when CG has already converged.
    _, alpha = step_size(p, rr)
    return _axpy(jnp.where(converged(rr), 0, alpha), p, d)


def _unblocked_cholesky(a: jax.Array) -> jax.Array:
    """Lower Cholesky factor of a small SPD block, one column per iteration (left-looking)."""
    idx = jnp.arange(a.shape[0])

    def body(k, low):
        done = jnp.where(idx[None, :] < k, low, 0)
        v = a[:, k] - done @ done[k]
        return low.at[:, k].set(jnp.where(idx >= k, v, 0) / jnp.sqrt(v[k]))

    return jax.lax.fori_loop(0, a.shape[0], body, jnp.zeros_like(a))


def _lower_inverse(low: jax.Array) -> jax.Array:
    """Inverse of a small lower-triangular block by forward substitution on the identity."""
    idx = jnp.arange(low.shape[0])
    eye = jnp.eye(low.shape[0], dtype=low.dtype)

    def body(k, inv):
        row = (eye[k] - low[k] @ jnp.where(idx[:, None] < k, inv, 0)) / low[k, k]
        return inv.at[k].set(row)

    return jax.lax.fori_loop(0, low.shape[0], body, jnp.zeros_like(low))


def spd_solve(matrix: jax.Array, rhs: jax.Array, block: int = 64) -> jax.Array:
    """Solves :math:`M X = B` for a symmetric positive definite :math:`M` by a blocked
    Cholesky factorisation :math:`M = L L^\\top` written in XLA operations.

    Right-looking blocked Cholesky; the off-diagonal panels and both substitutions use the
    inverses of the small diagonal blocks, so almost all the work is matrix products. It avoids
    LAPACK on purpose: on CPU jaxlib calls scipy's OpenBLAS, whose threads contend with XLA's
    (timings: ``benchmarks/results/proxprop.md``); accuracy matches LAPACK's.

    When ``n`` is not a multiple of the block, :math:`M` is padded to
    :math:`\\operatorname{diag}(M, I)` and :math:`B` with zero rows; the padded unknowns are 0
    and are dropped.

    Args:
      matrix: ``(n, n)``, symmetric positive definite.
      rhs: ``(n, k)``, or ``(n,)`` for one right-hand side.
      block: the block size (static), an int >= 1.

    Returns:
      ``X``, shaped like ``rhs``.

    Raises:
      ValueError: ``matrix`` is not square, ``rhs`` is not ``(n,)`` or ``(n, k)``, or
        ``block`` is not a positive int.
    """
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
        raise ValueError(f"matrix must be square (n, n), got shape {matrix.shape}")
    n = matrix.shape[0]
    if rhs.ndim not in (1, 2) or rhs.shape[0] != n:
        raise ValueError(
            f"rhs must have shape ({n},) or ({n}, k) for a {n} x {n} matrix, got {rhs.shape}"
        )
    if not isinstance(block, int) or block < 1:
        raise ValueError(f"block must be an int >= 1, got {block!r}")
    if rhs.ndim == 1:  # one right-hand side: solve it as a column
        return spd_solve(matrix, rhs[:, None], block)[:, 0]
    if n == 0:
        return rhs
    block = min(block, n)
    count = -(-n // block)
    size = count * block
    if size != n:  # pad with an identity block
        pad = size - n
        matrix = jnp.block(
            [
                [matrix, jnp.zeros((n, pad), matrix.dtype)],
                [jnp.zeros((pad, n), matrix.dtype), jnp.eye(pad, dtype=matrix.dtype)],
            ]
        )
        rhs = jnp.concatenate([rhs, jnp.zeros((pad, rhs.shape[1]), rhs.dtype)])
    low = jnp.zeros_like(matrix)
    inverses = []
    for j in range(count):
        start, stop = j * block, (j + 1) * block
        left = low[start:, :start]
        panel = matrix[start:, start:stop] - left @ left[:block].T
        diag = _unblocked_cholesky(panel[:block])
        inverses.append(_lower_inverse(diag))
        low = low.at[start:stop, start:stop].set(diag)
        low = low.at[stop:, start:stop].set(panel[block:] @ inverses[j].T)
    ys: list[jax.Array] = []  # L Y = B
    for j in range(count):
        start, stop = j * block, (j + 1) * block
        r = rhs[start:stop]
        if j:
            r = r - low[start:stop, :start] @ jnp.concatenate(ys)
        ys.append(inverses[j] @ r)
    xs: list[jax.Array] = []  # L^T X = Y, from the last block up
    for j in reversed(range(count)):
        start, stop = j * block, (j + 1) * block
        r = ys[j]
        if xs:
            r = r - low[stop:, start:stop].T @ jnp.concatenate(xs)
        xs.insert(0, inverses[j].T @ r)
    return jnp.concatenate(xs)[:n]


def damped_solve(gram: jax.Array, beta: jax.Array, rhs: jax.Array) -> jax.Array:
    """Solves :math:`(G + \\beta I) X = B` for a symmetric positive semi-definite Gram matrix
    :math:`G` (all columns of ``rhs`` at once; ``rhs`` is ``(n, k)`` or ``(n,)``), by
    :func:`spd_solve`."""
    return spd_solve(gram + beta * jnp.eye(gram.shape[0], dtype=gram.dtype), rhs)


def dense_exact(
    x: jax.Array, g_z: jax.Array, beta: jax.Array, use_bias: bool, precision: Any = None
) -> tuple[jax.Array, jax.Array | None]:
    """The exact ProxProp direction of a Dense layer, :math:`d = (A^\\top A + \\beta I)^{-1}
    A^\\top g_z` with :math:`A = [x, 1]`.

    Two equivalent forms, the cheaper chosen from the static shapes:

    * primal: factor the ``(in + 1) x (in + 1)`` matrix :math:`A^\\top A + \\beta I`;
    * dual (Woodbury / push-through, for batches smaller than the input):
      :math:`d = A^\\top (A A^\\top + \\beta I_N)^{-1} g_z`, an ``N x N`` system.

    Args:
      x: layer inputs ``(N, in)``.
      g_z: output cotangent ``(N, out)``.
      beta: :math:`1/\\tau`.
      use_bias: whether :math:`A` has the column of ones (and the result a bias part).
      precision: matmul precision.

    Returns:
      ``(d_kernel (in, out), d_bias (out,) or None)``.
    """
    n, fan_in = x.shape
    fan_out = g_z.shape[1]
    p = fan_in + int(use_bias)
    primal_flops = n * p * p + p**3 / 3 + 2 * p * p * fan_out + n * p * fan_out
    dual_flops = n * n * p + n**3 / 3 + 2 * n * n * fan_out + n * p * fan_out
    mm = lambda a, b: jnp.matmul(a, b, precision=precision)
    if dual_flops < primal_flops:
        gram = mm(x, x.T)
        if use_bias:
            gram = gram + 1
        y = damped_solve(gram, beta, g_z)
        return mm(x.T, y), (y.sum(0) if use_bias else None)
    a = jnp.concatenate([x, jnp.ones((n, 1), x.dtype)], axis=1) if use_bias else x
    theta = damped_solve(mm(a.T, a), beta, mm(a.T, g_z))
    return (theta[:fan_in], theta[fan_in]) if use_bias else (theta, None)
