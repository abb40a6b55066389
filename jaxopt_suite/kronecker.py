"""Kronecker-factored preconditioning (KFAC/KFLR) as an optax transformation.

For a Dense kernel :math:`W` in flax's ``(in, out)`` layout, the per-sample gradient is
:math:`x_n \\delta_n^\\top` and, vectorising ``W`` row-major (``W.reshape(-1)``),
:math:`\\operatorname{vec}(x s^\\top) = x \\otimes s`. The GGN block of the kernel is therefore
:math:`\\sum_n \\sum_c (x_n x_n^\\top) \\otimes (s_{nc} s_{nc}^\\top)`, with :math:`s_{nc}` the
loss-Hessian square-root columns backpropagated to the layer output, and Kronecker-factored
curvature approximates it by

.. math:: G_W \\approx A \\otimes G, \\qquad A = \\frac1N \\sum_n x_n x_n^\\top, \\qquad
   G = \\sum_n \\sum_c s_{nc} s_{nc}^\\top

(exact for N = 1). Since :math:`(A \\otimes G)^{-1} \\operatorname{vec}(U) =
\\operatorname{vec}(A^{-1} U G^{-1})`, a kernel update costs two small matrix products. The
bias block is :math:`G` alone.

* :func:`dense_kronecker_factors`: ``(A, G)`` from layer inputs and backpropagated columns;
  the reference the curvature engine's ``kfac``/``kflr`` extras must match.
* :func:`mlp_value_grad_and_factors`: value, gradient and factors of a hand-written MLP with
  the zoo's parameter layout, in one backward pass over the columns.
* :func:`scale_by_kronecker` / :func:`kfac_sgd`: the preconditioner, fed by ``factors=``:
  ``extras["kfac"]`` (or ``"kflr"``, ``"kfra"``) of ``curvature.value_and_grad`` for any flax
  model (in a training step: ``jaxopt_suite.harness.train.curvature_gradient``), with
  :func:`factor_mask`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxopt_suite._src.checks import check_floating
from jaxopt_suite._tree import all_finite
from jaxopt_suite._typing import PyTree
from jaxopt_suite.curvature import products

Factors = tuple[jax.Array, ...]


# ---------------------------------------------------------------------------------------------
# factors


def dense_kronecker_factors(
    inputs: jax.Array, output_cotangent_columns: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """The Kronecker factors ``(A, G)`` of a Dense kernel, from its inputs and columns.

    .. math:: A = \\frac1N \\sum_n x_n x_n^\\top, \\qquad
       G = \\sum_c \\sum_n s_{cn} s_{cn}^\\top

    :math:`s_{cn}` is column c of the loss-Hessian square root (already scaled by the
    reduction, see :func:`jaxopt_suite.curvature.products.loss_hessian_sqrt`) backpropagated
    to the layer output of sample n: exact columns give KFLR, Monte Carlo columns KFAC. The
    GGN block of the kernel, flattened row-major, is then approximately ``jnp.kron(A, G)``,
    exactly so for a batch of one. Inputs with extra axes ``(N, T, ..., in)`` count every
    position as a sample of the batch (A is divided by N·T; the "expand" convention).

    Args:
      inputs: the layer's inputs ``(N, ..., in)``.
      output_cotangent_columns: ``(K, N, ..., out)``: K backpropagated columns.

    Returns:
      ``A`` of shape ``(in, in)`` and ``G`` of shape ``(out, out)``.

    Example:
      >>> a, g = dense_kronecker_factors(jnp.ones((2, 3)), jnp.ones((1, 2, 4)))
      >>> a.shape, g.shape, float(a[0, 0]), float(g[0, 0])
      ((3, 3), (4, 4), 1.0, 2.0)
    """
    inputs = jnp.asarray(inputs)
    columns = jnp.asarray(output_cotangent_columns)
    if inputs.ndim < 2:
        raise ValueError(f"inputs must be (N, ..., in), got shape {inputs.shape}")
    if columns.ndim != inputs.ndim + 1 or columns.shape[1:-1] != inputs.shape[:-1]:
        raise ValueError(
            "output_cotangent_columns must be (K, N, ..., out) with (N, ...) = "
            f"{inputs.shape[:-1]} as for inputs, got shape {columns.shape}"
        )
    x = inputs.reshape(-1, inputs.shape[-1])
    s = columns.reshape(-1, columns.shape[-1])
    return x.T @ x / x.shape[0], s.T @ s


def mlp_value_grad_and_factors(
    params: PyTree,
    inputs: jax.Array,
    targets: jax.Array,
    *,
    loss: products.Loss = "cross_entropy",
    reduction: str = "mean",
    activation: Callable[[jax.Array], jax.Array] = jax.nn.relu,
    key: jax.Array | None = None,
    mc_samples: int | None = None,
) -> tuple[jax.Array, PyTree, PyTree]:
    """Loss, gradient and Kronecker factors of an MLP in one pass (a reference implementation).

    The MLP is ``Dense_0 - act - ... - Dense_{L-1}`` with the parameter layout of
    :class:`jaxopt_suite.harness.zoo.MLP` (``{"Dense_i": {"kernel": (in, out), "bias": (out,)}}``);
    inputs are flattened to ``(N, -1)``. A zero perturbation added to every layer output gives,
    through one ``jax.vjp``, the output gradients (for the gradient) and, vmapped over the
    loss-Hessian columns, the backpropagated columns (for G).

    Args:
      params: the MLP parameters.
      inputs: ``(N, ...)``.
      targets: targets of ``loss``.
      loss: a loss name or per-sample callable (see
        :func:`jaxopt_suite.curvature.products.batch_loss`).
      reduction: ``"mean"`` or ``"sum"``.
      activation: the hidden activation.
      key: PRNG key, needed with ``mc_samples``.
      mc_samples: None for exact columns (KFLR), M for M Monte Carlo columns (KFAC).

    Returns:
      ``(value, grads, factors)``: ``grads`` shaped like ``params``; ``factors`` with the same
      structure, ``(A, G)`` per kernel and ``(G,)`` per bias (the ``factors=`` of
      :func:`scale_by_kronecker`).
    """
    names = [f"Dense_{i}" for i in range(len(params))]
    if sorted(params) != sorted(names) or any(
        sorted(params[name]) != ["bias", "kernel"] for name in names
    ):
        raise ValueError(
            "params must be {'Dense_0': {'kernel', 'bias'}, ..., 'Dense_{L-1}': ...} "
            f"(the layout of zoo.MLP); got keys {sorted(params)}"
        )
    x = jnp.asarray(inputs).reshape(inputs.shape[0], -1)
    last = len(names) - 1
    zeros = [
        jnp.zeros((x.shape[0], params[name]["bias"].shape[0]), params[name]["bias"].dtype)
        for name in names
    ]

    def forward(perturbations):
        h, layer_inputs = x, []
        for i, name in enumerate(names):
            layer_inputs.append(h)
            z = h @ params[name]["kernel"] + params[name]["bias"] + perturbations[i]
            h = z if i == last else activation(z)
        return h, layer_inputs

    outputs, vjp_fn, layer_inputs = jax.vjp(forward, zeros, has_aux=True)
    value, output_grad = jax.value_and_grad(products.batch_loss(loss, reduction))(outputs, targets)
    (deltas,) = vjp_fn(output_grad)
    columns = products.loss_hessian_sqrt(
        loss, outputs, targets, reduction, key=key, mc_samples=mc_samples
    )
    (column_deltas,) = jax.vmap(vjp_fn)(columns)
    grads, factors = {}, {}
    for name, h, delta, cols in zip(names, layer_inputs, deltas, column_deltas, strict=True):
        grads[name] = {"kernel": h.T @ delta, "bias": delta.sum(0)}
        a, g = dense_kronecker_factors(h, cols)
        factors[name] = {"kernel": (a, g), "bias": (g,)}
    return value, grads, factors


# ---------------------------------------------------------------------------------------------
# damped inverses


def damped_inverses(
    factors: Factors, damping: jax.typing.ArrayLike, pi_damping: bool = True
) -> Factors:
    """Inverses of the damped Kronecker factors of one parameter.

    Kernel ``(A, G)``, with :math:`\\lambda` = ``damping``:

    * ``pi_damping=True`` (factored Tikhonov damping, Martens & Grosse 2015):
      :math:`\\pi = \\sqrt{(\\operatorname{tr}A / d_A) / (\\operatorname{tr}G / d_G)}`,
      returns :math:`((A + \\pi\\sqrt\\lambda I)^{-1}, (G + \\sqrt\\lambda/\\pi\\, I)^{-1})`
      (π falls back to 1 when a trace is zero);
    * ``pi_damping=False``: :math:`((A + \\sqrt\\lambda I)^{-1}, (G + \\sqrt\\lambda I)^{-1})`.

    Bias ``(G,)``: :math:`((G + \\lambda I)^{-1},)`, the damped block itself.

    Args:
      factors: ``(A, G)`` or ``(G,)``, symmetric positive semi-definite.
      damping: :math:`\\lambda > 0` (may be traced).
      pi_damping: static choice of the kernel's damping split.

    Returns:
      The inverses, in the same tuple layout (from a Cholesky factor, symmetric) and dtype;
      bfloat16/float16 factors are inverted in float32 and cast back.
    """
    damping = jnp.asarray(damping)
    if len(factors) == 1:
        (g,) = factors
        return (_spd_inverse(g, damping),)
    a, g = factors
    root = jnp.sqrt(damping)
    if pi_damping:
        mean_a = jnp.trace(a) / a.shape[0]
        mean_g = jnp.trace(g) / g.shape[0]
        pi = jnp.sqrt(mean_a / mean_g)
        pi = jnp.where(jnp.isfinite(pi) & (pi > 0), pi, 1.0)
        return _spd_inverse(a, pi * root), _spd_inverse(g, root / pi)
    return _spd_inverse(a, root), _spd_inverse(g, root)


def _spd_inverse(matrix: jax.Array, shift: jax.Array) -> jax.Array:
    """``(matrix + shift I)^-1`` by Cholesky, computed in at least float32 and returned in
    ``matrix.dtype`` (LAPACK has no bfloat16/float16 Cholesky, and half precision would lose
    the factor's small eigenvalues anyway)."""
    work = jnp.promote_types(matrix.dtype, jnp.float32)
    eye = jnp.eye(matrix.shape[0], dtype=work)
    chol = jnp.linalg.cholesky(matrix.astype(work) + shift.astype(work) * eye)
    # M^-1 = L^-T L^-1: one triangular solve and a product, several times faster on CPU than
    # cho_solve's two solves against the identity, and symmetric by construction
    chol_inv = jax.scipy.linalg.solve_triangular(chol, eye, lower=True)
    return (chol_inv.T @ chol_inv).astype(matrix.dtype)


def precondition(update: jax.Array, inverses: Factors) -> jax.Array:
    """Applies inverse Kronecker factors to one update.

    .. math:: \\text{kernel: } A^{-1} U G^{-1} \\ (U \\text{ reshaped to } (d_A, d_G)), \\qquad
       \\text{bias: } G^{-1} u

    Args:
      update: the leaf's update (kernel ``(..., out)`` or bias ``(out,)``).
      inverses: ``(A⁻¹, G⁻¹)`` or ``(G⁻¹,)`` from :func:`damped_inverses`.

    Returns:
      The preconditioned update, shaped like ``update``.
    """
    if len(inverses) == 1:
        return update @ inverses[0]
    a_inv, g_inv = inverses
    flat = update.reshape(a_inv.shape[0], g_inv.shape[0])
    return (a_inv @ flat @ g_inv).reshape(update.shape)


# ---------------------------------------------------------------------------------------------
# the transformation


class KroneckerState(NamedTuple):
    """State of :func:`scale_by_kronecker`.

    ``factors`` and ``inverses`` mirror the parameters: ``(A, G)`` per covered kernel, ``(G,)``
    per covered vector (bias) and ``None`` for leaves that pass through.
    """

    count: jax.Array  # int32: number of accepted (finite) factor updates so far
    factors: PyTree  # exponential moving averages of the factors
    inverses: PyTree  # damped inverses of ``factors`` as of the last refresh


def factor_shapes(shape: tuple[int, ...]) -> tuple[tuple[int, int], ...] | None:
    """The factor shapes a parameter of ``shape`` gets: ``((P, P), (out, out))`` for a kernel
    (P the product of all but the last axis, so a Conv kernel (kh, kw, in, out) has its A over
    the row-major patch index), ``((out, out),)`` for a vector, None for a scalar."""
    if len(shape) == 0:
        return None
    out = shape[-1]
    if len(shape) == 1:
        return ((out, out),)
    inner = math.prod(shape[:-1])
    return ((inner, inner), (out, out))


def _check_static(name: str, value: Any, ok: Callable[[float], bool], accepted: str) -> None:
    if isinstance(value, int | float) and not ok(value):
        raise ValueError(f"{name} must be {accepted}, got {value!r}")


def _resolve_mask(mask: Any, params: PyTree) -> PyTree:
    if mask is None:
        return jax.tree.map(lambda p: jnp.ndim(p) >= 1, params)
    tree = mask(params) if callable(mask) else mask
    try:
        return jax.tree.map(lambda p, m: bool(m) and jnp.ndim(p) >= 1, params, tree)
    except ValueError as err:
        raise ValueError(
            f"mask must be a pytree of bools with the structure of params (or a callable "
            f"params -> such a tree): {err}"
        ) from None


def _state_dtype(param: Any) -> Any:
    # half-precision parameters keep float32 factors: an average with (1 - decay) = 0.05 steps
    # would round away in bfloat16's 8-bit mantissa, and the inverses need float32 anyway
    return jnp.promote_types(jnp.result_type(param), jnp.float32)


def scale_by_kronecker(
    damping: jax.typing.ArrayLike = 1e-3,
    decay: jax.typing.ArrayLike = 0.95,
    inverse_every: jax.typing.ArrayLike = 10,
    *,
    pi_damping: bool = True,
    mask: PyTree | Callable[[PyTree], PyTree] | None = None,
) -> optax.GradientTransformationExtraArgs:
    """Preconditions updates by damped Kronecker factors of the GGN (KFAC / KFLR).

    At every update the factors passed as ``factors=`` enter exponential moving averages
    (the first accepted update sets them),

    .. math:: \\bar A_t = \\beta \\bar A_{t-1} + (1-\\beta) A_t, \\quad
       \\bar G_t = \\beta \\bar G_{t-1} + (1-\\beta) G_t,

    every ``inverse_every`` accepted updates (the first included) the damped inverses are
    recomputed from the averages inside ``jax.lax.cond`` (see :func:`damped_inverses`), and each
    covered leaf's update becomes :math:`\\bar A^{-1} U \\bar G^{-1}` (kernel) or
    :math:`\\bar G^{-1} u` (bias), with the inverses of the last refresh.

    ``factors`` mirrors the parameters: a tuple ``(A, G)`` per kernel (A over the row-major
    flattening of all axes but the last), ``(G,)`` per vector, ``None`` for a leaf without
    factors, whose update passes through unchanged. This is the layout of the curvature
    engine's ``kfac``/``kflr``/``kfra`` extras (``curvature.value_and_grad(...,
    quantities=("kfac",))``, pass ``factors=extras["kfac"]``), Conv kernels
    ``(*kernel_spatial, C_in, C_out)`` included (A over the unfolded patch); use
    :func:`factor_mask` so that leaves the engine serves without factors get no state.
    Factors, averages and inverses are kept in float32 for bfloat16/float16 parameters (the
    preconditioned update is cast back to the update's dtype). Factors with a non-finite entry are
    ignored for that step (averages, counter and inverses stay as they were); a refresh that
    produces a non-finite inverse keeps the previous one.

    Args:
      damping: :math:`\\lambda > 0`, Tikhonov damping of the GGN block.
      decay: :math:`\\beta \\in [0, 1)`, the averages' decay.
      inverse_every: k >= 1, refresh period of the inverses (may be traced).
      pi_damping: split the damping between A and G by the traces' ratio (static).
      mask: which leaves get a state (a pytree of bools or ``params -> pytree``); by default
        every leaf with at least one axis. Exclude large leaves without factors (embeddings).

    Returns:
      An ``optax.GradientTransformationExtraArgs``; ``update(updates, state, params=None, *,
      factors)``. A parameter or update leaf that is not floating (integer parameters) is a
      ``TypeError`` naming the leaves.

    Example:
      >>> tx = scale_by_kronecker(damping=1e-2)
      >>> params = {"kernel": jnp.ones((3, 2)), "bias": jnp.ones(2)}
      >>> state = tx.init(params)
      >>> factors = {"kernel": (jnp.eye(3), jnp.eye(2)), "bias": (jnp.eye(2),)}
      >>> updates, state = tx.update(params, state, factors=factors)
      >>> round(float(updates["bias"][0]), 4)  # (1 + 0.01)^-1
      0.9901
    """
    _check_static("damping", damping, lambda v: v > 0, "> 0")
    _check_static("decay", decay, lambda v: 0 <= v < 1, "in [0, 1)")
    _check_static("inverse_every", inverse_every, lambda v: v >= 1, "an integer >= 1")

    def init_fn(params):
        check_floating(params, "params", "scale_by_kronecker")
        covered = _resolve_mask(mask, params)

        def zeros(p, on):
            shapes = factor_shapes(jnp.shape(p)) if on else None
            if shapes is None:
                return None
            return tuple(jnp.zeros(s, _state_dtype(p)) for s in shapes)

        def eyes(p, on):
            shapes = factor_shapes(jnp.shape(p)) if on else None
            if shapes is None:
                return None
            return tuple(jnp.eye(s[0], dtype=_state_dtype(p)) for s in shapes)

        return KroneckerState(
            count=jnp.zeros((), jnp.int32),
            factors=jax.tree.map(zeros, params, covered),
            inverses=jax.tree.map(eyes, params, covered),
        )

    def update_fn(updates, state, params=None, *, factors=None, **extra):
        del params, extra
        if factors is None:
            raise ValueError(
                "scale_by_kronecker needs the Kronecker factors as the extra keyword argument "
                "factors= of update (a pytree like the params: (A, G) per kernel, (G,) per "
                "bias, None elsewhere)"
            )
        check_floating(updates, "updates", "scale_by_kronecker")
        new = _match_factors(updates, state.factors, factors)
        finite = all_finite(new)
        weight = jnp.where(state.count == 0, 1.0, 1.0 - jnp.asarray(decay))

        def average(old, fresh):
            if old is None or fresh is None:
                return old
            return tuple(
                jnp.where(finite, o + weight.astype(o.dtype) * (f.astype(o.dtype) - o), o)
                for o, f in zip(old, fresh, strict=True)
            )

        leaf = lambda x: x is None or isinstance(x, tuple)
        ema = jax.tree.map(average, state.factors, new, is_leaf=leaf)

        def refresh(ema, old_inverses):
            def one(f, old):
                if f is None:
                    return None
                inv = damped_inverses(f, damping, pi_damping)
                ok = all_finite(inv)
                return tuple(jnp.where(ok, i, o) for i, o in zip(inv, old, strict=True))

            return jax.tree.map(one, ema, old_inverses, is_leaf=leaf)

        due = finite & (state.count % jnp.asarray(inverse_every) == 0)
        inverses = jax.lax.cond(due, refresh, lambda e, old: old, ema, state.inverses)

        def apply(u, inv, fresh):
            if inv is None or fresh is None:
                return u
            return precondition(u.astype(inv[0].dtype), inv).astype(u.dtype)

        new_updates = jax.tree.map(apply, updates, inverses, new)
        count = state.count + finite.astype(jnp.int32)
        return new_updates, KroneckerState(count=count, factors=ema, inverses=inverses)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _match_factors(updates: PyTree, state_factors: PyTree, factors: PyTree) -> PyTree:
    """Validates ``factors`` against the updates and the state; returns it per update leaf."""
    paths_leaves, treedef = jax.tree.flatten_with_path(updates)
    try:
        given = treedef.flatten_up_to(factors)
    except (ValueError, TypeError) as err:
        raise ValueError(
            "factors must have the structure of the parameters, with (A, G), (G,) or None in "
            f"place of each leaf: {err}"
        ) from None
    held = treedef.flatten_up_to(state_factors)
    out = []
    for (path, u), f, h in zip(paths_leaves, given, held, strict=True):
        where = f"factors{jax.tree_util.keystr(path)}"
        if f is None:
            out.append(None)
            continue
        if h is None:
            raise ValueError(
                f"{where} is given but this leaf (shape {jnp.shape(u)}) has no Kronecker state "
                "(masked out or a scalar); pass None for it"
            )
        if isinstance(f, list):
            f = tuple(f)
        expected = tuple(x.shape for x in h)
        if not isinstance(f, tuple) or len(f) != len(expected):
            kind = "(A, G)" if len(expected) == 2 else "(G,)"
            raise ValueError(
                f"{where} must be a tuple {kind} for a parameter of shape {jnp.shape(u)}, "
                f"got {type(f).__name__} of length {len(f) if isinstance(f, tuple) else '-'}"
            )
        shapes = tuple(jnp.shape(x) for x in f)
        if shapes != expected:
            names = ("A", "G") if len(expected) == 2 else ("G",)
            described = ", ".join(f"{n} {s}" for n, s in zip(names, shapes, strict=True))
            wanted = ", ".join(f"{n} {s}" for n, s in zip(names, expected, strict=True))
            raise ValueError(
                f"{where} has shapes {described}; a parameter of shape {jnp.shape(u)} needs "
                f"{wanted}"
            )
        out.append(f)
    return jax.tree.unflatten(treedef, out)


def kfac_sgd(
    learning_rate: optax.ScalarOrSchedule,
    damping: jax.typing.ArrayLike = 1e-3,
    decay: jax.typing.ArrayLike = 0.95,
    inverse_every: jax.typing.ArrayLike = 10,
    momentum: float | None = None,
    nesterov: bool = False,
    *,
    pi_damping: bool = True,
    mask: PyTree | Callable[[PyTree], PyTree] | None = None,
) -> optax.GradientTransformationExtraArgs:
    """SGD on Kronecker-preconditioned gradients (KFAC with MC factors, KFLR with exact ones).

    .. math:: \\theta \\leftarrow \\theta - \\alpha\\, \\bar A^{-1} \\nabla_W L\\, \\bar G^{-1}

    ``chain(scale_by_kronecker(...), [trace(momentum)], scale_by_learning_rate(lr))``.

    Args:
      learning_rate: step size α or schedule.
      damping, decay, inverse_every, pi_damping, mask: see :func:`scale_by_kronecker`.
      momentum: optional heavy-ball momentum on the preconditioned direction.
      nesterov: Nesterov momentum (with ``momentum``).

    Returns:
      An ``optax.GradientTransformationExtraArgs``; pass ``factors=`` to ``update``.

    Example:
      >>> import optax
      >>> tx = kfac_sgd(0.1, damping=1e-2)
      >>> params = {"kernel": jnp.ones((3, 2))}
      >>> factors = {"kernel": (2.0 * jnp.eye(3), jnp.eye(2))}
      >>> updates, _ = tx.update(params, tx.init(params), factors=factors)
      >>> params = optax.apply_updates(params, updates)
    """
    parts = [scale_by_kronecker(damping, decay, inverse_every, pi_damping=pi_damping, mask=mask)]
    if momentum is not None:
        parts.append(optax.trace(decay=momentum, nesterov=nesterov))
    parts.append(optax.scale_by_learning_rate(learning_rate))
    return optax.chain(*parts)


# ---------------------------------------------------------------------------------------------
# fed by the curvature engine


def factor_mask(factors: PyTree, params: PyTree) -> PyTree:
    """Which parameters get Kronecker factors: a pytree of bools shaped like ``params``.

    ``factors`` is a factors tree as :func:`scale_by_kronecker` takes it (``(A, G)``, ``(G,)``
    or ``None`` per leaf), e.g. ``extras["kfac"]`` of ``curvature.value_and_grad``, or its
    shapes from ``jax.eval_shape`` (no computation). Use it as ``mask=`` so that leaves the
    engine leaves without factors (an embedding) hold no state.

    Args:
      factors: the factors tree.
      params: the parameters (gives the structure).

    Returns:
      ``True`` where ``factors`` has a tuple, ``False`` where it has ``None``.

    Example:
      >>> params = {"w": jnp.zeros((3, 2)), "emb": jnp.zeros((9, 2))}
      >>> factor_mask({"w": (jnp.eye(3), jnp.eye(2)), "emb": None}, params)
      {'emb': False, 'w': True}
    """
    treedef = jax.tree.structure(params)
    try:
        given = treedef.flatten_up_to(factors)
    except (ValueError, TypeError) as err:
        raise ValueError(
            "factors must have the structure of params, with (A, G), (G,) or None in place of "
            f"each leaf: {err}"
        ) from None
    return jax.tree.unflatten(treedef, [f is not None for f in given])
