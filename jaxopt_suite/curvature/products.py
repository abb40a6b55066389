"""Matrix-free curvature products: GGN- and Hessian-vector products, Hutchinson diagonals.

Nothing here forms a matrix over the parameters. A product costs about as much as a gradient:

* :func:`hessian_vector_product`: forward-over-reverse, :math:`Hv = \\partial_\\epsilon
  \\nabla L(\\theta + \\epsilon v)`.
* :func:`ggn_vector_product`: :math:`Gv = J^\\top H_f J v`, with :math:`J` the Jacobian of the
  model outputs with respect to the parameters (one linearisation, applied forward and
  transposed) and :math:`H_f` the Hessian of the loss with respect to the outputs, applied as a
  jvp of the output gradient.
* :func:`hutchinson_diagonal`: the diagonal of any symmetric linear operator from Rademacher
  probes, :math:`\\operatorname{diag}(M) \\approx \\frac1S\\sum_s v_s \\odot M v_s`.
* :func:`loss_hessian_sqrt`: columns :math:`S` with :math:`S S^\\top = H_f` (exact or Monte
  Carlo), the factor that Kronecker-factored curvature backpropagates.

Losses are those of the curvature engine, :mod:`jaxopt_suite.curvature.losses` (one definition
of each): ``"cross_entropy"`` (integer labels, outputs ``(N, ..., C)``, every position a term),
``"mse"`` (PyTorch: squared error averaged over all entries), ``"bce_with_logits"`` (targets in
[0, 1], shaped like the outputs), or a callable ``loss(output, target)`` for ONE sample, summed
over the batch. ``reduction="mean"`` divides by the number of terms (N for a callable, every
position of a cross-entropy, every entry of MSE and BCE), ``"sum"`` does not.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxopt_suite._typing import PyTree
from jaxopt_suite.curvature import losses

Loss = str | losses.PerSampleLoss
MatVec = Callable[[PyTree], PyTree]

LOSSES = losses.LOSSES
REDUCTIONS = losses.REDUCTIONS


# ---------------------------------------------------------------------------------------------
# losses (thin front ends over curvature.losses)


def _resolve(loss: Loss, reduction: str) -> losses.Loss:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    return losses.get(loss)


def batch_loss(loss: Loss, reduction: str = "mean") -> Callable[[jax.Array, jax.Array], jax.Array]:
    """The mini-batch loss :math:`L = c \\sum_t \\ell_t` as a function of outputs and targets.

    :math:`c = 1/T` for ``"mean"`` (T the number of terms: samples for a callable, every
    position of a cross-entropy, every entry of MSE and BCE) and :math:`c = 1` for ``"sum"``;
    the per-sample terms are :mod:`jaxopt_suite.curvature.losses`'.

    Args:
      loss: ``"cross_entropy"``, ``"mse"``, ``"bce_with_logits"`` or a per-sample callable
        ``loss(output, target) -> scalar``.
      reduction: ``"mean"`` or ``"sum"``.

    Returns:
      ``fn(outputs, targets) -> scalar``; it checks the targets' shape when traced.

    Raises:
      ValueError: an unknown loss name or reduction; at trace time, targets that don't fit.

    Example:
      >>> fn = batch_loss("mse")
      >>> float(fn(jnp.ones((2, 3)), jnp.zeros((2, 3))))
      1.0
    """
    spec = _resolve(loss, reduction)

    def fn(outputs: jax.Array, targets: jax.Array) -> jax.Array:
        outputs, targets = jnp.asarray(outputs), jnp.asarray(targets)
        spec.check(outputs, targets)
        c = losses.scale(reduction, spec, outputs.shape)
        return c * jnp.sum(spec.per_sample(outputs, targets))

    return fn


def loss_hessian_sqrt(
    loss: Loss,
    outputs: jax.Array,
    targets: jax.Array,
    reduction: str = "mean",
    *,
    key: jax.Array | None = None,
    mc_samples: int | None = None,
) -> jax.Array:
    """Columns :math:`S` of a square root of the loss Hessian in the outputs, :math:`SS^\\top=H`.

    Exact (``mc_samples=None``), per sample :math:`n` and position:

    * cross-entropy: :math:`S = \\operatorname{diag}(\\sqrt p) - p\\sqrt p^\\top`,
      :math:`p = \\operatorname{softmax}(f)`;
    * MSE: :math:`S = \\sqrt2\\, I`; BCE with logits: :math:`S = \\sqrt{\\sigma(1-\\sigma)}`;
    * a callable: :math:`S = V\\operatorname{diag}(\\sqrt{\\max(\\lambda, 0)})` from the
      eigendecomposition of the per-sample Hessian ``jax.hessian(loss)``.

    Monte Carlo (``mc_samples=M``): :math:`\\tilde S_m = \\nabla_f(-\\log p(\\tilde y_m\\mid f))
    /\\sqrt M` with :math:`\\tilde y_m` drawn from the model's predictive distribution
    (categorical; Gaussian :math:`\\mathcal N(f, 1/2)`; Bernoulli; for a callable, Gaussian
    mixtures :math:`S z` of the exact columns, :math:`z \\sim \\mathcal N(0, I)`), so
    :math:`\\mathbb E[\\tilde S\\tilde S^\\top] = H`. Both are multiplied by :math:`\\sqrt c`
    (``1/sqrt(T)`` for ``"mean"``, see :func:`batch_loss`). The columns come from
    :mod:`jaxopt_suite.curvature.losses` and are returned in ``outputs.dtype``.

    Args:
      loss: a loss name of :data:`LOSSES` or a per-sample callable.
      outputs: model outputs ``(N, ...)``.
      targets: as for :func:`batch_loss` (only the callable's Hessian depends on them).
      reduction: ``"mean"`` or ``"sum"``.
      key: PRNG key, required with ``mc_samples``.
      mc_samples: number of Monte Carlo columns M, or None for the exact square root.

    Returns:
      ``(K, *outputs.shape)``: K columns, each shaped like the outputs. Exact: K is the size of
      one sample's output (for a cross-entropy over positions, column ``(position, class)`` is
      non-zero at that position only). Monte Carlo: K = M.

    Example:
      >>> s = loss_hessian_sqrt("mse", jnp.zeros((4, 3)), jnp.ones((4, 3)), "sum")
      >>> s.shape
      (3, 4, 3)
    """
    spec = _resolve(loss, reduction)
    outputs, targets = jnp.asarray(outputs), jnp.asarray(targets)
    spec.check(outputs, targets)
    c = losses.scale(reduction, spec, outputs.shape)
    if mc_samples is None:
        cols = spec.sqrt_hessian(outputs, targets)
        return (math.sqrt(c) * cols).astype(outputs.dtype)
    if not isinstance(mc_samples, int) or mc_samples < 1:
        raise ValueError(f"mc_samples must be a positive int or None, got {mc_samples!r}")
    if key is None:
        raise ValueError("key is required for Monte Carlo columns (mc_samples is set)")
    cols = spec.sample_sqrt_hessian(key, outputs, targets, mc_samples)
    return (math.sqrt(c / mc_samples) * cols).astype(outputs.dtype)


# ---------------------------------------------------------------------------------------------
# products


def _check_like(name: str, tree: PyTree, params: PyTree) -> None:
    """ValueError naming the first leaf of ``tree`` whose structure/shape differs from params."""
    p_leaves, p_def = jax.tree.flatten_with_path(params)
    t_leaves, t_def = jax.tree.flatten_with_path(tree)
    if p_def != t_def:
        raise ValueError(
            f"{name} must have the pytree structure of params; got {t_def}, expected {p_def}"
        )
    for (path, p), (_, t) in zip(p_leaves, t_leaves, strict=True):
        if jnp.shape(t) != jnp.shape(p):
            raise ValueError(
                f"{name}{jax.tree_util.keystr(path)} has shape {jnp.shape(t)}, expected "
                f"{jnp.shape(p)} (the shape of params{jax.tree_util.keystr(path)})"
            )


def ggn_matvec(
    apply_fn: Callable[[PyTree, jax.Array], jax.Array],
    loss: Loss,
    params: PyTree,
    inputs: jax.Array,
    targets: jax.Array,
    reduction: str = "mean",
) -> MatVec:
    """The generalized Gauss-Newton operator at ``params`` as a function ``v -> G v``.

    .. math:: G v = J^\\top H_f J v, \\qquad J = \\partial f(\\theta, x)/\\partial\\theta,
       \\quad H_f = \\nabla^2_f L(f, y)

    The model is linearised once (``jax.linearize``); every call then costs one
    Jacobian-vector product, one Hessian-vector product of the loss in the outputs (a jvp of
    its gradient) and one transposed Jacobian product. Use it to apply G to many vectors (e.g.
    :func:`hutchinson_diagonal` or conjugate gradients).

    Args:
      apply_fn: ``apply_fn(params, inputs) -> outputs``, any pure function.
      loss: a name of :data:`LOSSES` or a per-sample callable (see :func:`batch_loss`).
      params: the point of linearisation.
      inputs: model inputs.
      targets: labels/targets for the loss.
      reduction: ``"mean"`` or ``"sum"``.

    Returns:
      ``matvec(v) -> G v``, ``v`` and the result shaped like ``params``.

    Example:
      >>> apply_fn = lambda p, x: x @ p
      >>> mv = ggn_matvec(apply_fn, "mse", jnp.ones((3, 2)), jnp.eye(3), jnp.zeros((3, 2)))
      >>> mv(jnp.ones((3, 2))).shape
      (3, 2)
    """
    loss_of_outputs = batch_loss(loss, reduction)
    outputs, jvp_fn = jax.linearize(lambda p: apply_fn(p, inputs), params)
    vjp_fn = jax.linear_transpose(jvp_fn, params)
    output_grad = jax.grad(lambda o: loss_of_outputs(o, targets))

    def matvec(vector: PyTree) -> PyTree:
        _check_like("vector", vector, params)
        jv = jvp_fn(vector)
        hjv = jax.jvp(output_grad, (outputs,), (jv,))[1]
        (gv,) = vjp_fn(hjv)
        return gv

    return matvec


def ggn_vector_product(
    apply_fn: Callable[[PyTree, jax.Array], jax.Array],
    loss: Loss,
    params: PyTree,
    inputs: jax.Array,
    targets: jax.Array,
    vector: PyTree,
    reduction: str = "mean",
) -> PyTree:
    """The GGN-vector product :math:`G v = J^\\top H_f J v` without forming G.

    .. math:: G = \\sum_n J_n^\\top H_n J_n,\\quad J_n = \\frac{\\partial f(\\theta, x_n)}
       {\\partial \\theta},\\quad H_n = \\nabla^2_{f} \\, c\\,\\ell(f, y_n)

    One call of :func:`ggn_matvec`; to apply G to many vectors build the matvec once.

    Args:
      apply_fn: ``apply_fn(params, inputs) -> outputs``.
      loss: a name of :data:`LOSSES` or a per-sample callable.
      params: parameters (any pytree).
      inputs: model inputs.
      targets: targets of the loss.
      vector: a pytree shaped like ``params``.
      reduction: ``"mean"`` (BackPACK's default, 1/N) or ``"sum"``.

    Returns:
      ``G v``, shaped like ``params``.

    Example:
      >>> apply_fn = lambda p, x: x @ p
      >>> gv = ggn_vector_product(apply_fn, "mse", jnp.ones((3, 2)), jnp.eye(3),
      ...                         jnp.zeros((3, 2)), jnp.ones((3, 2)), reduction="sum")
      >>> gv.tolist()  # G = 2 I for a linear model under summed squared error
      [[2.0, 2.0], [2.0, 2.0], [2.0, 2.0]]
    """
    return ggn_matvec(apply_fn, loss, params, inputs, targets, reduction)(vector)


def hessian_vector_product(
    loss_fn: Callable[..., jax.Array], params: PyTree, vector: PyTree, *args: Any
) -> PyTree:
    """The Hessian-vector product of a scalar function, forward-over-reverse.

    .. math:: H v = \\frac{\\partial}{\\partial\\epsilon}\\nabla_\\theta
       L(\\theta + \\epsilon v, \\ldots)\\Big|_{\\epsilon=0}

    Args:
      loss_fn: ``loss_fn(params, *args) -> scalar``.
      params: where the Hessian is taken.
      vector: a pytree shaped like ``params``.
      *args: further arguments of ``loss_fn`` (held fixed).

    Returns:
      ``H v``, shaped like ``params``.

    Example:
      >>> f = lambda x: jnp.sum(x**3)
      >>> hessian_vector_product(f, jnp.array([1.0, 2.0]), jnp.array([1.0, 1.0])).tolist()
      [6.0, 12.0]
    """
    _check_like("vector", vector, params)
    grad_fn = jax.grad(lambda p: loss_fn(p, *args))
    return jax.jvp(grad_fn, (params,), (vector,))[1]


def rademacher_like(key: jax.Array, params: PyTree) -> PyTree:
    """A pytree of independent ±1 entries shaped and typed like ``params``."""
    leaves, treedef = jax.tree.flatten(params)
    sizes = [math.prod(jnp.shape(x)) for x in leaves]
    # one draw for the whole tree: far cheaper to compile than one per leaf
    signs = jax.random.rademacher(key, (sum(sizes),), jnp.int8)
    probes, start = [], 0
    for x, size in zip(leaves, sizes, strict=True):
        chunk = signs[start : start + size].reshape(jnp.shape(x))
        probes.append(chunk.astype(jnp.result_type(x)))
        start += size
    return jax.tree.unflatten(treedef, probes)


def hutchinson_diagonal(
    matvec: MatVec,
    params: PyTree,
    key: jax.Array,
    num_samples: int,
    *,
    chunk_size: int | None = None,
) -> PyTree:
    """Hutchinson's unbiased estimate of the diagonal of a symmetric linear operator.

    .. math:: \\widehat{\\operatorname{diag}}(M) = \\frac1S \\sum_{s=1}^S v_s \\odot M v_s,
       \\qquad v_s \\in \\{-1, 1\\}^P \\text{ Rademacher}

    Entry i of one probe's estimate has mean :math:`M_{ii}` and variance
    :math:`\\sum_{j \\ne i} M_{ij}^2`, so a diagonal operator is recovered exactly.

    Args:
      matvec: ``v -> M v`` on pytrees shaped like ``params`` (e.g. :func:`ggn_matvec`, or
        ``lambda v: hessian_vector_product(loss_fn, params, v, *args)``); any function.
      params: gives the structure, shapes and dtypes of the probes.
      key: PRNG key for the probes.
      num_samples: number of probes S (>= 1).
      chunk_size: probes evaluated together with ``vmap`` (memory ~ chunk_size products);
        None evaluates all S at once.

    Returns:
      The estimated diagonal, shaped like ``params``.

    Example:
      >>> mv = lambda v: 3.0 * v
      >>> hutchinson_diagonal(mv, jnp.zeros(2), jax.random.key(0), 4).tolist()
      [3.0, 3.0]
    """
    if not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples must be a positive int, got {num_samples!r}")
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")

    def one_probe(probe_key):
        v = rademacher_like(probe_key, params)
        return jax.tree.map(jnp.multiply, v, matvec(v))

    keys = jax.random.split(key, num_samples)
    estimates = jax.lax.map(one_probe, keys, batch_size=chunk_size or num_samples)
    return jax.tree.map(lambda e: jnp.mean(e, axis=0), estimates)


# ---------------------------------------------------------------------------------------------
# an estimator for optax.contrib.sophia


class HutchinsonState(NamedTuple):
    """State of :func:`hutchinson_estimator`."""

    key: jax.Array  # PRNG key for the next probes


def hutchinson_estimator(
    num_samples: int = 1,
    key: jax.Array | None = None,
    *,
    chunk_size: int | None = None,
) -> optax.GradientTransformationExtraArgs:
    """A transformation whose output is a Hutchinson curvature diagonal (Sophia's interface).

    ``update(updates, state, params, *, matvec=None, obj_fn=None)`` returns
    :func:`hutchinson_diagonal` of ``matvec`` (``v -> M v`` at ``params``: a GGN product from
    :func:`ggn_matvec`, or any other) or, when only ``obj_fn(params) -> scalar`` is given, of
    its Hessian (as optax's own estimator). The incoming ``updates`` are ignored. Pass it as
    ``optax.contrib.sophia(..., hessian_diagonal_fn=hutchinson_estimator())``; the extra
    keyword arguments of Sophia's ``update`` reach it.

    Args:
      num_samples: probes per estimate.
      key: PRNG key of the first probes (default ``jax.random.key(0)``).
      chunk_size: see :func:`hutchinson_diagonal`.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` with state :class:`HutchinsonState`.

    Example:
      >>> est = hutchinson_estimator(num_samples=2)
      >>> p = jnp.ones(3)
      >>> d, _ = est.update(p, est.init(p), p, obj_fn=lambda q: jnp.sum(q**2))
      >>> d.tolist()
      [2.0, 2.0, 2.0]
    """
    if not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples must be a positive int, got {num_samples!r}")

    def init_fn(params):
        del params
        return HutchinsonState(key=jax.random.key(0) if key is None else key)

    def update_fn(updates, state, params=None, *, matvec=None, obj_fn=None, **extra):
        del updates, extra
        if params is None:
            raise ValueError("params are required by hutchinson_estimator's update")
        if matvec is None and obj_fn is None:
            raise ValueError(
                "hutchinson_estimator's update needs matvec=(v -> M v) or obj_fn=(params -> "
                "scalar) as an extra keyword argument"
            )
        if matvec is None:
            matvec = lambda v: hessian_vector_product(obj_fn, params, v)
        next_key, probe_key = jax.random.split(state.key)
        diagonal = hutchinson_diagonal(
            matvec, params, probe_key, num_samples, chunk_size=chunk_size
        )
        return diagonal, HutchinsonState(key=next_key)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


class EngineDiagonalState(NamedTuple):
    """State of :func:`engine_diagonal_estimator`."""

    key: jax.Array  # PRNG key for the next Monte Carlo draws


ENGINE_DIAGONALS = ("diag_ggn_mc", "diag_ggn_exact", "diag_h")


def engine_diagonal_estimator(
    apply_fn: Callable[[PyTree, jax.Array], jax.Array],
    loss: Loss = "cross_entropy",
    quantity: str = "diag_ggn_mc",
    *,
    reduction: str = "mean",
    mc_samples: int = 1,
    key: jax.Array | None = None,
) -> optax.GradientTransformationExtraArgs:
    """Sophia's ``hessian_diagonal_fn`` from the curvature engine (no probes).

    ``update(updates, state, params, *, inputs, targets)`` returns ``extras[quantity]`` of
    ``curvature.value_and_grad(apply_fn, loss=loss, quantities=(quantity,))`` on the batch:

    * ``"diag_ggn_mc"``: :math:`\\sum_n \\sum_m (J_n^\\top \\tilde s_{m,n})^{\\odot 2}`, labels
      sampled from the model, the per-sample form of Sophia-G's Gauss-Newton-Bartlett
      estimator (which squares one gradient of the whole batch's sampled loss);
    * ``"diag_ggn_exact"``: the exact GGN diagonal (C backpropagated columns);
    * ``"diag_h"``: the exact Hessian diagonal (what Sophia-H estimates with Hutchinson).

    Sophia calls it inside a ``lax.cond`` every ``update_interval`` steps, so the engine runs
    only then; ``inputs=`` and ``targets=`` are passed through Sophia's ``update``. The
    incoming ``updates`` are ignored.

    Args:
      apply_fn: ``apply_fn(params, inputs) -> outputs``.
      loss: a loss name or per-sample callable (as for ``curvature.value_and_grad``).
      quantity: one of :data:`ENGINE_DIAGONALS`.
      reduction: ``"mean"`` or ``"sum"``.
      mc_samples: Monte Carlo samples of ``"diag_ggn_mc"``.
      key: PRNG key of the first draws (default ``jax.random.key(0)``).

    Returns:
      An ``optax.GradientTransformationExtraArgs`` with state :class:`EngineDiagonalState`.

    Example:
      >>> import optax
      >>> apply_fn = lambda p, x: x @ p
      >>> est = engine_diagonal_estimator(apply_fn, "mse", "diag_ggn_exact", reduction="sum")
      >>> tx = optax.contrib.sophia(0.1, hessian_diagonal_fn=est, update_interval=1)
      >>> w, x, y = jnp.zeros((2, 1)), jnp.eye(2), jnp.ones((2, 1))
      >>> updates, _ = tx.update(w, tx.init(w), w, inputs=x, targets=y)
    """
    if quantity not in ENGINE_DIAGONALS:
        raise ValueError(f"quantity must be one of {ENGINE_DIAGONALS}, got {quantity!r}")
    from jaxopt_suite.curvature import engine

    fn = engine.value_and_grad(
        apply_fn, loss=loss, reduction=reduction, quantities=(quantity,), mc_samples=mc_samples
    )

    def init_fn(params):
        del params
        return EngineDiagonalState(key=jax.random.key(0) if key is None else key)

    def update_fn(updates, state, params=None, *, inputs=None, targets=None, **extra):
        del updates, extra
        if params is None or inputs is None or targets is None:
            raise ValueError(
                "engine_diagonal_estimator's update needs params and the batch as the extra "
                "keyword arguments inputs= and targets= (pass them to sophia's update)"
            )
        next_key, draw_key = jax.random.split(state.key)
        _, _, extras = fn(params, inputs, targets, key=draw_key)
        return extras[quantity], EngineDiagonalState(key=next_key)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
