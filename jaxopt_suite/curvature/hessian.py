r"""The Hessian diagonal: the GGN diagonal plus the curvature of the model's nonlinearities.

For :math:`L = c\sum_n \ell(f(\theta, x_n), y_n)` the Hessian splits, by the chain rule through
the model's computation graph, into the GGN and one *residual* term per nonlinear node
:math:`v = \phi(u_1, \ldots, u_m)`:

.. math::
   \nabla^2_\theta L = \sum_n J_n^\top (c\, \nabla_f^2 \ell_n) J_n
   + \sum_{\text{nodes}} \sum_{n, j} \frac{\partial L}{\partial v_{n,j}}\,
     \big(\tfrac{\partial u_{n,j}}{\partial \theta}\big)^\top
     \nabla^2_{u} \phi\, \big(\tfrac{\partial u_{n,j}}{\partial \theta}\big).

Only second derivatives in a single parameter count for the diagonal, so a bilinear node whose
operands depend on disjoint sets of parameter leaves (every Dense/Conv layer's :math:`xW`,
LayerNorm's scale times its normalised input) contributes nothing. For an *elementwise* node
the local Hessian is a scalar (one operand: :math:`\phi''`) or a 2×2
matrix (two operands, e.g. ``x * sigmoid(x)``) per unit j. Writing :math:`g \nabla^2\phi =
\sum_d \lambda_d w_d w_d^\top` (its eigen-decomposition), the residual's diagonal is

.. math:: \sum_{n,j,d} \lambda_{d,n,j} \Big(\big(\tfrac{\partial (w_d^\top u)_{n,j}}
          {\partial\theta}\big)^{\odot 2}\Big),

i.e. the ``sum_sq`` statistic of the cotangent columns :math:`\sqrt{\max(\lambda,0)}\, w\, e_j`
minus that of :math:`\sqrt{\max(-\lambda,0)}\, w\, e_j`, backpropagated from the node's
operands (BackPACK does the same for its activation modules). Piecewise-linear nodes (``max``,
``abs``, ``select_n``, ReLU, max-pooling, ...) have zero second derivative almost everywhere and
cost nothing, so a ReLU network's ``diag_h`` costs its ``diag_ggn_exact``.

The nodes are found by interpreting the jaxpr of the model (:func:`instrument`); nested
``jit``, ``custom_jvp`` and ``custom_vjp`` calls are inlined (their primal computation is
differentiated). A dependent node the mechanism can't express exactly (a product of two
parameter-dependent matrices such as attention scores, loops, unknown primitives), or a node
that is not one value per sample along the batch axis (a function of the parameters alone, such
as ``exp(s)`` of a scalar leaf scaling the outputs), raises :class:`Unsupported`, and the
engine falls back to :func:`generic_diagonal`: exact per-sample Hessian diagonals from
Hessian-vector products with one-hot tangents (cost: one HVP per parameter and sample; for
small models). The exact fallbacks run in steps of a fixed number of samples and tangents (or
columns), so their memory does not grow with the parameters or the batch; a step estimated
(:func:`peak_bytes`) to need more than ``EngineConfig.memory_budget_bytes`` raises
``MemoryError`` before anything is compiled (:func:`check_budget`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core
from jax.flatten_util import ravel_pytree

# Linear in every operand (or in the dependent one): no residual term.
_LINEAR = {
    "add", "add_any", "sub", "neg", "convert_element_type", "reduce_sum", "broadcast_in_dim",
    "reshape", "transpose", "squeeze", "expand_dims", "slice", "dynamic_slice",
    "dynamic_update_slice", "concatenate", "pad", "rev", "copy", "copy_p", "reduce_precision",
    "real", "imag", "conj", "cumsum", "gather", "scatter-add", "scatter_add", "select_n",
    "reduce_and", "reduce_or", "split", "sharding_constraint", "optimization_barrier",
}  # fmt: skip
# Piecewise linear: second derivative zero almost everywhere.
_PIECEWISE = {
    "max", "min", "abs", "sign", "floor", "ceil", "round", "clamp", "reduce_max", "reduce_min",
    "argmax", "argmin", "sort", "cummax", "cummin", "rem", "reduce_window_max",
    "reduce_window_min", "select_and_gather_add", "nextafter", "reduce_window_sum",
    "reduce_window",
}  # fmt: skip
# Elementwise with a generally non-zero second derivative.
_SMOOTH = {
    "exp", "exp2", "log", "log1p", "expm1", "tanh", "logistic", "erf", "erfc", "erf_inv",
    "sin", "cos", "tan", "asin", "acos", "atan", "sinh", "cosh", "asinh", "acosh", "atanh",
    "sqrt", "rsqrt", "cbrt", "integer_pow", "square", "lgamma", "digamma", "pow", "atan2",
    "mul", "div",
}  # fmt: skip
# Bilinear maps: linear unless both operands depend on the parameters.
_BILINEAR = {"dot_general", "conv_general_dilated", "mul"}
_NESTED = ("jaxpr", "call_jaxpr", "fun_jaxpr")
# Calls whose body runs once on the call's operands (inlined); loops and conditionals are not.
CALLS = {
    "pjit", "jit", "closed_call", "core_call", "custom_jvp_call", "custom_vjp_call",
    "custom_vjp_call_jaxpr", "remat", "checkpoint",
}  # fmt: skip
_NO_DERIVATIVE = {"stop_gradient", "iota", "random_bits", "random_seed", "random_wrap"}
# Marks, in a value's dependency set, that it depends on the data (a non-parameter argument).
_DATA = -1


class Unsupported(Exception):
    """A parameter-dependent node whose residual the elementwise mechanism can't express."""


class Site(NamedTuple):
    """A nonlinear elementwise node: its dependent operands' shape and their count (1 or 2)."""

    shape: tuple[int, ...]
    dtype: Any
    operands: int


class _Context:
    def __init__(self, perturbations: Sequence[jax.Array] | None, batch: int | None):
        self.perturbations = perturbations
        self.batch = batch
        self.sites: list[Site] = []
        self.operands: list[tuple[jax.Array, ...]] = []
        self.hessians: list[tuple[jax.Array, ...]] = []


def _is_float(x: Any) -> bool:
    return jnp.issubdtype(jnp.result_type(x), jnp.inexact)


def _second_derivatives(fn: Callable, values: list, which: list[int]) -> tuple[jax.Array, ...]:
    """Per-element second derivatives of an elementwise ``fn`` in the operands ``which``:
    ``(φ'',)`` for one operand, ``(∂aa, ∂ab, ∂bb)`` for two; computed in float32 at least."""
    values = [
        v.astype(jnp.promote_types(v.dtype, jnp.float32)) if i in which else v
        for i, v in enumerate(values)
    ]

    def along(tangents):
        def first(*ops):
            full = list(values)
            for i, o in zip(which, ops, strict=True):
                full[i] = o
            return fn(*full)

        primals = tuple(values[i] for i in which)
        return lambda t2: jax.jvp(lambda *ops: jax.jvp(first, ops, tangents)[1], primals, t2)[1]

    ones = [jnp.ones_like(values[i]) for i in which]
    zeros = [jnp.zeros_like(values[i]) for i in which]
    if len(which) == 1:
        return (along((ones[0],))((ones[0],)),)
    ea, eb = (ones[0], zeros[1]), (zeros[0], ones[1])
    return along(ea)(ea), along(ea)(eb), along(eb)(eb)


def _apply(eqn: core.JaxprEqn, vals: list, deps: list[frozenset], ctx: _Context):
    name = eqn.primitive.name
    params = dict(eqn.params)
    nested = next((params[k] for k in _NESTED if k in params), None)
    if nested is not None and any(deps) and name in CALLS:
        closed = nested if isinstance(nested, core.ClosedJaxpr) else core.ClosedJaxpr(nested, ())
        outs = _eval(closed.jaxpr, closed.consts, vals, deps, ctx)
        return [o for o, _ in outs], [d for _, d in outs]
    out = eqn.primitive.bind(*vals, **params)
    outs = out if eqn.primitive.multiple_results else [out]
    data = frozenset({_DATA}) if any(_DATA in d for d in deps) else frozenset()
    leaves = [d - {_DATA} for d in deps]
    union = frozenset().union(*leaves) if name not in _NO_DERIVATIVE else frozenset()
    out_deps = [(union if _is_float(o) else frozenset()) | data for o in outs]
    if not union or not any(_is_float(o) for o in outs):
        return outs, out_deps  # no parameter dependence, or a boolean / integer result
    which = [i for i, d in enumerate(leaves) if d]
    # A product of operands that depend on disjoint sets of leaves has no second derivative in
    # any single parameter (its only curvature is between the two sets): nothing on the
    # diagonal, e.g. a Dense layer's x W, or LayerNorm's scale times its normalised input.
    disjoint = len(which) == 2 and not leaves[which[0]] & leaves[which[1]]
    linear = (
        name in _LINEAR
        or name in _PIECEWISE
        or (name in _BILINEAR and (len(which) == 1 or disjoint))
        or (name == "div" and which == [0])
        or (name == "integer_pow" and params["y"] in (0, 1))
    )
    if linear:
        return outs, out_deps
    if name not in _SMOOTH or len(which) > 2:
        raise Unsupported(
            f"the primitive {name!r} with {len(which)} parameter-dependent operand(s)"
        )
    # Operands with size-1 axes (a parameter broadcast over the batch, e.g. LayerNorm's scale)
    # enter the site broadcast to the output's shape; their cotangents sum back through it.
    shape = tuple(outs[0].shape)
    # The columns of a site are per sample: its value must be one per sample along axis 0. A
    # node of the parameters alone (e.g. exp(scalar) scaling the outputs) is not.
    if not data or not shape or shape[0] != ctx.batch:
        raise Unsupported(
            f"the primitive {name!r} on a value of shape {shape} that is not one per sample"
        )
    for i in which:
        own = tuple(vals[i].shape)
        if len(own) != len(shape) or any(a not in (b, 1) for a, b in zip(own, shape, strict=True)):
            raise Unsupported(f"the primitive {name!r} with operands of shapes {own} -> {shape}")
    vals = [jnp.broadcast_to(v, shape) if i in which else v for i, v in enumerate(vals)]
    index = len(ctx.sites)
    ctx.sites.append(Site(shape, vals[which[0]].dtype, len(which)))
    if ctx.perturbations is None:
        return outs, out_deps
    ctx.operands.append(tuple(vals[i] for i in which))
    fn = lambda *ops: eqn.primitive.bind(*ops, **params)
    ctx.hessians.append(
        tuple(jax.lax.stop_gradient(h) for h in _second_derivatives(fn, vals, which))
    )
    return [outs[0] + ctx.perturbations[index].astype(outs[0].dtype)], out_deps


def _eval(jaxpr: core.Jaxpr, consts: Sequence, args: Sequence, deps: Sequence[frozenset], ctx):
    env: dict = {}

    def read(v):
        if isinstance(v, core.Literal):
            return v.val, frozenset()
        return env[v]

    for v, c in zip(jaxpr.constvars, consts, strict=True):
        env[v] = (c, frozenset())
    for v, a, d in zip(jaxpr.invars, args, deps, strict=True):
        env[v] = (a, d)
    for eqn in jaxpr.eqns:
        read_in = [read(v) for v in eqn.invars]
        vals = [x for x, _ in read_in]
        ds = [d for _, d in read_in]
        outs, out_deps = _apply(eqn, vals, ds, ctx)
        for v, o, d in zip(eqn.outvars, outs, out_deps, strict=True):
            if not isinstance(v, core.DropVar):
                env[v] = (o, d)
    return [read(v) for v in jaxpr.outvars]


class Instrumented(NamedTuple):
    """``fn`` with its nonlinear elementwise nodes exposed (see :func:`instrument`)."""

    sites: list[Site]
    run: Callable[..., tuple[Any, list[tuple[jax.Array, ...]], list[tuple[jax.Array, ...]]]]


def instrument(fn: Callable, dependent: Sequence[bool], *example: Any) -> Instrumented:
    """Finds the residual sites of ``fn(*args)`` (a pytree-valued function of pytrees).

    Args:
      fn: the function to interpret.
      dependent: per positional argument, whether it counts as a parameter (a source of
        residual terms) or as data (its leaves' leading axis is the batch axis N; every site
        must depend on the data and have N along its axis 0).
      *example: arguments (arrays or ShapeDtypeStructs) fixing the shapes.

    Returns:
      ``Instrumented(sites, run)``: ``run(site_perturbations, *args) -> (fn(*args) with each
      site's output shifted by its perturbation, dependent operands per site, second
      derivatives per site)``.

    Raises:
      Unsupported: a node the mechanism can't handle exactly.
    """
    flat_example, in_tree = jax.tree.flatten(example)
    flags: list[frozenset] = []  # the leaves each flat argument depends on: itself, or data
    batch = None
    for arg, d in zip(example, dependent, strict=True):
        for leaf in jax.tree.leaves(arg):
            flags.append(frozenset({len(flags)}) if d else frozenset({_DATA}))
            if not d and batch is None and jnp.ndim(leaf):
                batch = jnp.shape(leaf)[0]

    def flat_fn(*flat):
        return fn(*jax.tree.unflatten(in_tree, flat))

    closed, out_shape = jax.make_jaxpr(flat_fn, return_shape=True)(*flat_example)
    out_tree = jax.tree.structure(out_shape)
    probe = _Context(None, batch)
    jax.eval_shape(
        lambda *flat: [o for o, _ in _eval(closed.jaxpr, closed.consts, flat, flags, probe)],
        *flat_example,
    )
    sites = probe.sites

    def run(perturbations, *args):
        ctx = _Context(perturbations, batch)
        outs = _eval(closed.jaxpr, closed.consts, jax.tree.leaves(args), flags, ctx)
        return jax.tree.unflatten(out_tree, [o for o, _ in outs]), ctx.operands, ctx.hessians

    return Instrumented(sites, run)


def directions(
    hessians: tuple[jax.Array, ...], cotangent: jax.Array
) -> list[tuple[jax.Array, tuple[jax.Array, ...]]]:
    r"""The eigen-directions :math:`(\lambda_d, w_d)` of :math:`g \nabla^2\phi` per element.

    One operand: :math:`(g\phi'', (1,))`. Two operands: the eigen-pairs of the symmetric
    2×2 matrix :math:`g\,[[h_{aa}, h_{ab}], [h_{ab}, h_{bb}]]` in closed form (rotation angle
    :math:`\tfrac12 \operatorname{atan2}(2m_{ab}, m_{aa} - m_{bb})`).
    """
    g = cotangent.astype(hessians[0].dtype)
    if len(hessians) == 1:
        return [(g * hessians[0], (jnp.ones_like(g),))]
    maa, mab, mbb = (g * h for h in hessians)
    angle = 0.5 * jnp.arctan2(2.0 * mab, maa - mbb)
    cos, sin = jnp.cos(angle), jnp.sin(angle)
    first = maa * cos**2 + 2.0 * mab * sin * cos + mbb * sin**2
    second = maa * sin**2 - 2.0 * mab * sin * cos + mbb * cos**2
    return [(first, (cos, sin)), (second, (-sin, cos))]


def _nbytes(aval: Any) -> int:
    shape = getattr(aval, "shape", None)
    if shape is None:
        return 0
    return int(np.prod(shape, dtype=np.int64)) * np.dtype(aval.dtype).itemsize


def _inner_jaxprs(params: dict):
    for value in params.values():
        for v in value if isinstance(value, tuple | list) else (value,):
            if isinstance(v, core.ClosedJaxpr):
                yield v.jaxpr
            elif isinstance(v, core.Jaxpr):
                yield v


def _vars(atoms) -> list:
    return [v for v in atoms if not isinstance(v, core.Literal)]


def peak_bytes(jaxpr: core.Jaxpr) -> int:
    """The most bytes live at once while ``jaxpr`` runs its equations in order, each value
    freed after its last use (arguments and constants live throughout), plus the peak of a
    nested jaxpr (a call's, a loop's body) at its equation: an estimate of the memory of a
    program without XLA's fusion and buffer reuse, which only lower it."""
    last: dict = {}
    for k, eqn in enumerate(jaxpr.eqns):
        for v in _vars(eqn.invars):
            last[v] = k
    for v in _vars(jaxpr.outvars):
        last[v] = len(jaxpr.eqns)
    held = set(jaxpr.invars) | set(jaxpr.constvars)
    live = sum(_nbytes(v.aval) for v in held)
    peak = live
    for k, eqn in enumerate(jaxpr.eqns):
        inner = max((peak_bytes(j) for j in _inner_jaxprs(eqn.params)), default=0)
        outs = [v for v in eqn.outvars if not isinstance(v, core.DropVar)]
        peak = max(peak, live + inner + sum(_nbytes(v.aval) for v in outs))
        live += sum(_nbytes(v.aval) for v in outs if last.get(v, -1) > k)
        live -= sum(_nbytes(v.aval) for v in set(_vars(eqn.invars)) - held if last[v] == k)
    return peak


def check_budget(fn: Callable, args: Sequence, budget: int | None, what: str) -> None:
    """Raises :class:`MemoryError` before anything is compiled when one step ``fn(*args)`` of
    an exact ``diag_h`` fallback is estimated (:func:`peak_bytes` of its jaxpr) to need more
    than ``budget`` bytes; None: no check."""
    if budget is None:
        return
    estimate = peak_bytes(jax.make_jaxpr(fn)(*args).jaxpr)
    if estimate > budget:
        raise MemoryError(
            f"diag_h: {what} would need about {estimate / 2**30:.2f} GiB per step, over "
            f"EngineConfig.memory_budget_bytes = {budget / 2**30:.2f} GiB. Lower chunk_size "
            "(samples at once) or EngineConfig.residual_chunk (columns or tangents at once), "
            "raise memory_budget_bytes (None: no check), or ask for an estimate instead: "
            "curvature.products.hutchinson_diagonal (unbiased, with Hessian-vector products) "
            "or diag_ggn_exact / diag_ggn_mc (the Gauss-Newton part of the Hessian)"
        )


def generic_diagonal(
    per_sample_loss: Callable[[Any, Any, Any], jax.Array],
    params: Any,
    inputs: Any,
    targets: Any,
    per_sample: bool,
    chunk_size: int | None = None,
    tangents: int = 32,
    budget: int | None = None,
) -> Any:
    r"""Exact Hessian diagonals by Hessian-vector products with one-hot tangents.

    :math:`[\nabla^2 h_n]_{ii} = e_i^\top \nabla^2 h_n\, e_i` for every parameter i and sample n,
    with :math:`h_n` = ``per_sample_loss(params, x_n, y_n)`` (the scaled loss term of one
    sample). Costs one forward-over-reverse product per parameter and sample: for small models.
    Each step of a loop takes ``chunk_size`` samples and ``tangents`` one-hot tangents at once
    (``vmap``), so the memory is that of ``chunk_size * tangents`` products, whatever the
    number of parameters and samples.

    Args:
      per_sample_loss: ``(params, x, y) -> scalar`` for a batch of one.
      params: the parameters.
      inputs, targets: the batch (leading axis N).
      per_sample: return ``(N, *leaf)`` per leaf (``diag_h_batch``) or the sum (``diag_h``).
      chunk_size: samples processed at once (None: all).
      tangents: one-hot tangents processed at once.
      budget: bytes one step may be estimated to need (:func:`check_budget`); None: no check.

    Returns:
      A pytree like ``params``.

    Raises:
      MemoryError: one step is estimated to need more than ``budget``.
    """
    flat, unravel = ravel_pytree(params)
    size = flat.shape[0]
    width = min(size, tangents)
    steps = -(-size // width)
    n = jax.tree.leaves(inputs)[0].shape[0]
    batch = n if chunk_size is None else min(chunk_size, n)

    def entries(x_n, y_n, ids):
        """The diagonal entries ``ids`` (width,) of one sample's Hessian (past the end: 0)."""
        single = jax.tree.map(lambda a: a[None], (x_n, y_n))
        grad = jax.grad(lambda v: per_sample_loss(unravel(v), *single))

        def entry(i):
            e = jax.nn.one_hot(i, size, dtype=flat.dtype)
            return jnp.vdot(e, jax.jvp(grad, (flat,), (e,))[1])

        return jax.vmap(entry)(ids)

    step = jax.vmap(entries, in_axes=(0, 0, None))
    example = jax.tree.map(
        lambda a: jax.ShapeDtypeStruct((batch, *a.shape[1:]), a.dtype), (inputs, targets)
    )
    check_budget(
        step,
        (*example, jax.ShapeDtypeStruct((width,), jnp.int32)),
        budget,
        f"the exact fallback (one-hot Hessian-vector products: {size} parameters x {n} samples, "
        f"{batch} samples x {width} tangents at once)",
    )
    ids = jnp.arange(steps * width).reshape(steps, width)

    def one(x_n, y_n):
        return jax.lax.map(lambda i: entries(x_n, y_n, i), ids).reshape(-1)[:size]

    diag = jax.lax.map(lambda xy: one(*xy), (inputs, targets), batch_size=batch)
    if per_sample:
        return jax.vmap(unravel)(diag)
    return unravel(diag.sum(axis=0))


def site_units(site: Site) -> int:
    """Units per sample of a site (its columns per direction)."""
    return int(np.prod(site.shape[1:], dtype=np.int64))
