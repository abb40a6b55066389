r"""Kronecker factors (``kfac``, ``kflr``, ``kfra``) per Dense/Conv kernel and bias.

Dense kernel :math:`W` (flax's ``(in, out)`` layout, vectorised row-major), inputs
:math:`x_{n,t}` (t: positions of extra axes, T of them) and backpropagated columns
:math:`s_{k,n,t}` (exact for ``kflr``, Monte Carlo for ``kfac``):

.. math::
   A = \frac{1}{NT} \sum_{n,t} x_{n,t} x_{n,t}^\top, \qquad
   G = \sum_{k,n,t} s_{k,n,t} s_{k,n,t}^\top, \qquad G_W \approx A \otimes G,

exactly :func:`jaxopt_suite.kronecker.dense_kronecker_factors` (equal to the GGN block for
N = T = 1). The bias gets ``(G_b,)`` with :math:`G_b = \sum_{k,n} (\sum_t s_{k,n,t})(\sum_t
s_{k,n,t})^\top`, its exact GGN block (the same G when T = 1).

Conv kernel ``(*kernel_spatial, C_in, C_out)``, as BackPACK (checked against
``backpack.extensions.KFLR`` on Conv2d): with the unfolded input patches :math:`p_{n,q}`
(P output positions; the patch index row-major over ``(*kernel_spatial, C_in)``, the kernel's
own layout, where PyTorch's unfold is ``(C_in, *kernel)``),

.. math::
   A = \frac1N \sum_{n,q} p_{n,q} p_{n,q}^\top, \qquad
   G = \sum_{k,n} \Big(\sum_q s_{k,n,q}\Big)\Big(\sum_q s_{k,n,q}\Big)^\top

(positions summed in A but not divided by P; G is the bias's GGN block). Grouped
convolutions get ``None`` for the kernel (BackPACK raises).

KFRA (:func:`kfra`) replaces G by the batch-averaged Hessian backpropagated through the model:
at the output :math:`\bar H = \sum_n c\, \nabla_f^2 \ell_n`, then, between consecutive Dense
layers, :math:`\bar H_l = \frac1N \sum_n J_n^\top \bar H_{l+1} J_n` with :math:`J_n` the
per-sample Jacobian from layer l's output to layer l+1's output; for elementwise activations
:math:`J_n = W^\top \operatorname{diag}(\phi'(z_{n}))`, BackPACK's recursion.

Leaves no rule covers: 1-D leaves get ``(B,)`` with B their exact GGN block
:math:`\sum_{k,n} \hat g_{k,n} \hat g_{k,n}^\top` (``kfac``/``kflr``; the generic path, so the
same as the bias rule); any other leaf, and every uncovered leaf for ``kfra``, gets ``None``
(``jaxopt_suite.kronecker.scale_by_kronecker`` passes those updates through).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from jax.extend import core

from jaxopt_suite.curvature.hessian import CALLS
from jaxopt_suite.curvature.layers import LayerCall

Factors = tuple[jax.Array, ...] | None


# Symmetric products of side d >= 1.5 x this (contracting at least this many rows) are formed
# in square blocks of about this width, only on and above the diagonal, the rest
# mirrored: 10 of 16 block products for d = 1024. On 2 CPU cores, G = Dᵀ D of KFLR's
# (1280, 1024) columns takes 20 ms instead of 28 ms, the CNN's (4096, 500) patch Gram 15
# instead of 17; below it the plain product is faster.
_SYMMETRIC_BLOCK = 256


def symmetric_dot(a: jax.Array, b: jax.Array, block: int = _SYMMETRIC_BLOCK) -> jax.Array:
    r"""The product :math:`a^\top b` of two (r, d) matrices when it is known to be symmetric.

    .. math:: (a^\top b)_{IJ} = a_{:,I}^\top b_{:,J} \ (I \le J), \qquad
              (a^\top b)_{JI} = (a^\top b)_{IJ}^\top

    over column blocks I, J of width about ``block``: only the blocks on and above the
    diagonal are multiplied, those below are their transposes. Computed in the promoted
    dtype of ``a`` and ``b`` (callers widen bfloat16 to float32 first).

    Args:
      a, b: (r, d) arrays with :math:`a^\top b` symmetric (e.g. ``b = a``, or
        ``a = (K M)^\top``, ``b = K^\top`` for a symmetric M).
      block: target block width; fewer than two blocks (d < 1.5 block) or r < block: one
        plain product.

    Returns:
      The (d, d) product.

    Example:
      >>> a = jnp.arange(12.0).reshape(3, 4)
      >>> bool(jnp.allclose(symmetric_dot(a, a, block=2), a.T @ a))
      True
    """
    rows, d = a.shape
    if a.shape != b.shape:
        raise ValueError(f"symmetric_dot needs a and b of one shape; got {a.shape} and {b.shape}")
    count = round(d / block)
    if count < 2 or rows < block:
        return a.T @ b
    edges = [round(i * d / count) for i in range(count + 1)]
    cols = list(itertools.pairwise(edges))
    upper = {
        (i, j): a[:, lo_i:hi_i].T @ b[:, lo_j:hi_j]
        for i, (lo_i, hi_i) in enumerate(cols)
        for j, (lo_j, hi_j) in enumerate(cols)
        if j >= i
    }
    return jnp.block(
        [[upper[i, j] if j >= i else upper[j, i].T for j in range(count)] for i in range(count)]
    )


def _outer(a: jax.Array) -> jax.Array:
    """:math:`\\sum_r a_r a_r^\\top` over all leading axes of ``a`` (..., d) -> (d, d); in the
    accumulation dtype of ``a`` promoted to at least float32 (:func:`symmetric_dot`)."""
    a = a.reshape(-1, a.shape[-1])
    a = a.astype(jnp.promote_types(a.dtype, jnp.float32))
    return symmetric_dot(a, a)


def dense_factors(x: jax.Array, delta: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(A, G)`` of a Dense kernel from inputs (N, ..., in) and columns (K, N, ..., out)."""
    rows = x.reshape(-1, x.shape[-1]).shape[0]
    return _outer(x) / rows, _outer(delta)


def bias_factors(delta: jax.Array) -> tuple[jax.Array]:
    """``(G_b,)``: the exact GGN block of a bias added at every position."""
    k, n = delta.shape[:2]
    return (_outer(delta.reshape(k, n, -1, delta.shape[-1]).sum(axis=2)),)


def conv_factors(patches: jax.Array, delta: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(A, G)`` of an ungrouped Conv kernel from patches (N, P, S, C_in) and columns
    (K, N, ..., C_out)."""
    n = patches.shape[0]
    a = _outer(patches.reshape(n, patches.shape[1], -1)) / n
    return a, bias_factors(delta)[0]


def layer_factors(call: LayerCall, role: str, prepared: jax.Array, delta: jax.Array) -> Factors:
    """The ``kron`` statistic of one leaf of a recognised layer."""
    if role == "bias":
        return bias_factors(delta)
    if call.kind == "dense":
        return dense_factors(prepared, delta)
    if call.conv.feature_group_count != 1:
        return None
    return conv_factors(prepared, delta)


def generic_factors(columns: jax.Array, leaf: jax.Array) -> Factors:
    """``(B,)`` for a 1-D leaf from its per-(column, sample) gradients (K, N, d); else None."""
    if jnp.ndim(leaf) != 1:
        return None
    return (_outer(columns),)


# --- KFRA -------------------------------------------------------------------------------------

_ELEMENTWISE = {
    "add", "add_any", "sub", "neg", "mul", "div", "max", "min", "abs", "sign", "select_n",
    "convert_element_type", "copy", "copy_p", "integer_pow", "square", "clamp", "exp", "exp2",
    "log", "log1p", "expm1", "tanh", "logistic", "erf", "erfc", "sin", "cos", "sqrt", "rsqrt",
    "pow", "atan", "sinh", "cosh", "asinh", "atanh", "reduce_precision",
}  # fmt: skip


def _dependencies(
    jaxpr: core.Jaxpr, inputs: Sequence[dict], cuts: dict | None = None, before: dict | None = None
) -> list:
    """Per output of ``jaxpr``: ``{source: elementwise}``, the sources it depends on and whether
    only through shape-preserving elementwise operations. A variable in ``cuts`` becomes the
    source ``cuts[var]`` for what follows (its own entry reports its dependencies before)."""
    cuts = cuts or {}
    before = {} if before is None else before
    env: dict = {}

    def read(v):
        return {} if isinstance(v, core.Literal) else env.get(v, {})

    def write(v, d):
        if v in cuts:
            before[v] = d
            d = {cuts[v]: True}
        env[v] = d

    for v, d in zip(jaxpr.invars, inputs, strict=True):
        write(v, d)
    for eqn in jaxpr.eqns:
        ins = [read(v) for v in eqn.invars]
        if not any(ins) or eqn.primitive.name == "stop_gradient":
            for v in eqn.outvars:
                if v in cuts:
                    write(v, {})
            continue
        nested = next(
            (eqn.params[k] for k in ("jaxpr", "call_jaxpr", "fun_jaxpr") if k in eqn.params),
            None,
        )
        if nested is not None and eqn.primitive.name in CALLS:
            inner = nested.jaxpr if isinstance(nested, core.ClosedJaxpr) else nested
            outs = _dependencies(inner, ins)
        else:
            merged: dict = {}
            same = all(
                tuple(v.aval.shape) == tuple(o.aval.shape)
                for v in eqn.invars
                if not isinstance(v, core.Literal) and read(v)
                for o in eqn.outvars
            )
            ok = same and eqn.primitive.name in _ELEMENTWISE
            for d in ins:
                for source, elementwise in d.items():
                    merged[source] = merged.get(source, True) and elementwise and ok
            outs = [merged] * len(eqn.outvars)
        for v, d in zip(eqn.outvars, outs, strict=True):
            if not isinstance(v, core.DropVar) and jnp.issubdtype(v.aval.dtype, jnp.inexact):
                write(v, d)
    return [read(v) for v in jaxpr.outvars]


def _kfra_error(reason: str) -> ValueError:
    return ValueError(
        "kfra needs the recognised Dense layers to form a chain on (N, features) inputs: "
        "each layer's output may reach the loss only through the next layer's input (any "
        f"per-sample function in between, e.g. activations); {reason}. Use kflr or kfac."
    )


def kfra(
    forward: Callable[[dict], tuple[jax.Array, dict]],
    perturbations: dict[int, jax.Array],
    calls: dict[int, LayerCall],
    leaves: Sequence[jax.Array],
    output_hessian: jax.Array,
) -> dict[int, jax.Array]:
    r"""KFRA's G per Dense layer (by call index): the backpropagated batch-averaged Hessian.

    Args:
      forward: ``perturbations -> (outputs, layer inputs by call index)``, the engine's forward.
      perturbations: zeros at each layer output.
      calls: the recognised layers.
      leaves: the parameter leaves (for the kernels).
      output_hessian: :math:`\sum_n c \nabla_f^2 \ell_n`, (D, D) for outputs (N, D).

    Returns:
      call index -> G (out, out), in float32 at least.

    Raises:
      ValueError: a layer that isn't Dense on 2-D inputs, or layers that don't form a chain.
    """
    for c in calls.values():
        if c.kind != "dense" or len(c.output.shape) != 2:
            raise _kfra_error(f"found a {c.kind} layer with output shape {c.output.shape}")
    order = sorted(calls)
    flat, in_tree = jax.tree.flatten(perturbations)
    index_of = {k: i for i, k in enumerate(sorted(perturbations))}

    def flat_forward(*flat):
        return forward(jax.tree.unflatten(in_tree, list(flat)))

    closed, out_shape = jax.make_jaxpr(flat_forward, return_shape=True)(*flat)
    outputs_shape, inputs_shape = out_shape
    if len(outputs_shape.shape) != 2:
        raise _kfra_error(f"the model's outputs have shape {outputs_shape.shape}, not (N, D)")
    for i in order:
        if len(inputs_shape[i].shape) != 2:
            raise _kfra_error(f"layer call {i} has inputs of shape {inputs_shape[i].shape}")
    # Cut the graph at every layer input x_i (outputs 1...) and output z_i (the sum with the
    # perturbation): each becomes a source of its own, and the chain condition reads: x_i
    # reaches only z_i, z_i only x_(next) (the last one only the outputs).
    jaxpr = closed.jaxpr
    cuts = {}
    for v, k in zip(jaxpr.outvars[1:], sorted(inputs_shape), strict=True):
        if not isinstance(v, core.Literal):
            cuts[v] = ("x", k)
    pert_vars = {v: k for v, k in zip(jaxpr.invars, sorted(perturbations), strict=True)}
    for eqn in jaxpr.eqns:
        hits = [
            pert_vars[v] for v in eqn.invars if not isinstance(v, core.Literal) and v in pert_vars
        ]
        if eqn.primitive.name == "add" and len(hits) == 1:
            cuts[eqn.outvars[0]] = ("z", hits[0])
    if sorted(k for kind, k in cuts.values() if kind == "z") != order:
        raise _kfra_error("a layer output could not be located in the traced model")
    sources = [{} for _ in flat]
    before: dict = {}
    outs_deps = _dependencies(jaxpr, sources, cuts, before)[0]
    reach: dict = {}
    for v, (kind, k) in cuts.items():
        for source in before.get(v, {}):
            reach.setdefault(source, set()).add((kind, k))
    for source in outs_deps:
        reach.setdefault(source, set()).add("outputs")
    targets, elementwise = {}, {}
    for pos, i in enumerate(order):
        nxt = ("x", order[pos + 1]) if pos + 1 < len(order) else "outputs"
        if reach.get(("x", i), {("z", i)}) != {("z", i)}:
            raise _kfra_error(f"the input of layer call {i} also reaches {reach[('x', i)]}")
        if reach.get(("z", i), set()) != {nxt}:
            raise _kfra_error(f"the output of layer call {i} reaches {reach.get(('z', i))}")
        targets[i] = nxt[1] if nxt != "outputs" else "outputs"
        dest = (
            jaxpr.outvars[0] if nxt == "outputs" else next(v for v, c in cuts.items() if c == nxt)
        )
        elementwise[i] = (
            before.get(dest, {}).get(("z", i), False)
            if nxt != "outputs"
            else outs_deps.get(("z", i), False)
        )

    def jacobians(i):
        """d(target of layer i)/d(output of layer i) per sample: (N, out_i) diagonal if the
        path is elementwise, else (N, target_dim, out_i). Forward mode in layer i's output
        alone: the other layers' tangents are symbolic zeros (a linearisation in every
        perturbation multiplied zero tangents by the kernels after layer i)."""
        target = targets[i]
        pick = (lambda r: r[0]) if target == "outputs" else (lambda r: r[1][target])
        own = flat[index_of[i]]

        def from_output(p_i):
            full = list(flat)
            full[index_of[i]] = p_i
            return pick(flat_forward(*full))

        def push(t):
            return jax.jvp(from_output, (own,), (t,))[1]

        n, d = perturbations[i].shape
        if elementwise[i]:
            return True, push(jnp.ones((n, d), own.dtype))
        eye = jnp.eye(d, dtype=own.dtype)
        cols = jax.vmap(lambda e: push(jnp.broadcast_to(e, (n, d))))(eye)  # (d, N, target)
        return False, jnp.moveaxis(cols, 0, -1)

    result = {}
    hess = output_hessian.astype(jnp.promote_types(output_hessian.dtype, jnp.float32))
    for pos in range(len(order) - 1, -1, -1):
        i = order[pos]
        if targets[i] == "outputs":
            mat = hess
        else:
            kernel = leaves[calls[targets[i]].kernel]
            kernel = kernel.astype(jnp.promote_types(kernel.dtype, jnp.float32))
            mat = kernel @ result[targets[i]] @ kernel.T
        diagonal, jac = jacobians(i)
        jac = jac.astype(mat.dtype)
        n = jac.shape[0]
        if diagonal:
            result[i] = mat * symmetric_dot(jac / n, jac)
        else:
            result[i] = jnp.einsum("nai,ab,nbj->ij", jac, mat, jac) / n
    return result
