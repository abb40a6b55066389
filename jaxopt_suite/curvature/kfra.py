r"""KFRA: the Kronecker factor G of each Dense and Conv layer from the batch-averaged Hessian.

KFRA replaces KFLR's G by the batch-averaged Hessian backpropagated through the model, as
BackPACK computes it: at the output :math:`\bar H = \sum_n c\, \nabla_f^2 \ell_n`; at the
output :math:`z_l` of link l (a Dense or Conv layer; one sample's output flattened row-major,
:math:`d_l` entries), with :math:`T_{l+1}` the next link's input (or the model's output) and
:math:`J_n = \partial T_{l+1} / \partial z_{l,n}` per sample,

.. math:: \bar H_l = \frac1N \sum_n J_n^\top \big(L_{l+1}^\top \bar H_{l+1} L_{l+1}\big) J_n,

where :math:`L_{l+1}` is the next link's Jacobian in its input (the same for every sample; the
rule's :meth:`~jaxopt_suite.curvature.rules.base.LayerRule.kfra_backpropagate`: Dense
:math:`W \bar H W^\top`, Conv through its unfolded patches) and :math:`J_n` the map in between:
for elementwise maps and flattening :math:`\operatorname{diag}(\phi'(z_n))`, otherwise (e.g.
max-pooling) the full per-sample Jacobian by forward mode (:math:`d_l` products). G of a Dense
layer is :math:`\bar H_l`; of a Conv layer :math:`\bar H_l` summed over both position indices,
:math:`G_{oo'} = \sum_{q,q'} (\bar H_l)_{(q,o),(q',o')}` (BackPACK's convolution factor, the
bias's too). A is KFLR's (the rule's
:meth:`~jaxopt_suite.curvature.rules.base.LayerRule.kfra_input_factor`; Conv:
:math:`\frac1N \sum_{n,q} p_{n,q} p_{n,q}^\top` over the unfolded patches). :math:`\bar H_l` is
a dense :math:`d_l \times d_l` matrix, as in BackPACK: KFRA on convolutions is for small
feature maps.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from jax.extend import core

from jaxopt_suite.curvature import kron, rules
from jaxopt_suite.curvature.hessian import CALLS
from jaxopt_suite.curvature.kron import symmetric_dot
from jaxopt_suite.curvature.layers import LayerCall


def statistics(
    forward: Callable,
    zeros: dict[int, jax.Array],
    calls: dict[int, LayerCall],
    leaves: list,
    owner: dict[int, tuple[int, str]],
    prepared: dict[int, jax.Array],
    output_columns: jax.Array,
) -> dict[str, list]:
    """The ``kron`` statistic of KFRA per leaf: ``(A, G)`` per kernel and ``(G,)`` per bias of
    the chain's layers (kinds with ``kfra_link``), ``None`` for every other leaf (layers of
    other kinds are left out of the chain).

    Args:
      forward: ``(leaves, perturbations) -> (outputs, layer inputs by call index)``.
      zeros: zero perturbations by call index.
      calls: the recognised layers by call index.
      leaves: the parameter leaves.
      owner: leaf index -> (call index, role).
      prepared: the rules' prepared inputs by call index.
      output_columns: the exact loss-Hessian square-root columns (K, N, D).
    """
    out = [None] * len(leaves)
    calls = {i: c for i, c in calls.items() if rules.get_rule(c.kind).kfra_link}
    zeros = {i: zeros[i] for i in calls}
    owner = {leaf: (ci, role) for leaf, (ci, role) in owner.items() if ci in calls}
    if calls:
        hess = kron.outer(output_columns)
        g = kfra(lambda p: forward(leaves, p), zeros, calls, leaves, hess)
        for i, (call_index, role) in owner.items():
            if role == "bias":
                out[i] = (g[call_index],)
            else:
                call = calls[call_index]
                a = rules.get_rule(call.kind).kfra_input_factor(call, prepared[call_index])
                out[i] = (a, g[call_index])
    return {"kron": out}


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
            ok = (same and eqn.primitive.name in _ELEMENTWISE) or _flattening(eqn)
            for d in ins:
                for source, elementwise in d.items():
                    merged[source] = merged.get(source, True) and elementwise and ok
            outs = [merged] * len(eqn.outvars)
        for v, d in zip(eqn.outvars, outs, strict=True):
            if not isinstance(v, core.DropVar) and jnp.issubdtype(v.aval.dtype, jnp.inexact):
                write(v, d)
    return [read(v) for v in jaxpr.outvars]


def _flattening(eqn: core.JaxprEqn) -> bool:
    """A reshape that keeps the batch axis (e.g. flattening (N, H, W, C) to (N, H·W·C)): the
    identity on each sample's entries in row-major order."""
    if eqn.primitive.name != "reshape" or eqn.params.get("dimensions") is not None:
        return False
    (x,), (y,) = eqn.invars, eqn.outvars
    return bool(x.aval.shape) and bool(y.aval.shape) and x.aval.shape[0] == y.aval.shape[0]


def _kfra_error(reason: str) -> ValueError:
    return ValueError(
        "kfra needs the recognised Dense layers (on (N, features) inputs) and Conv layers (one "
        "feature group) to form a chain with (N, D) outputs: each layer's output may reach "
        "the loss only through the next layer's input (any per-sample function in between, "
        f"e.g. activations, pooling, flattening); {reason}. Use kflr or kfac."
    )


def kfra(
    forward: Callable[[dict], tuple[jax.Array, dict]],
    perturbations: dict[int, jax.Array],
    calls: dict[int, LayerCall],
    leaves: Sequence[jax.Array],
    output_hessian: jax.Array,
) -> dict[int, jax.Array]:
    r"""KFRA's G per link (by call index), from the backpropagated batch-averaged Hessian.

    Args:
      forward: ``perturbations -> (outputs, layer inputs by call index)``, the engine's forward.
      perturbations: zeros at each layer output.
      calls: the layers of the chain (kinds with ``kfra_link``).
      leaves: the parameter leaves (for the kernels).
      output_hessian: :math:`\sum_n c \nabla_f^2 \ell_n`, (D, D) for outputs (N, D).

    Returns:
      call index -> G (out, out) (output features or channels), in float32 at least.

    Raises:
      ValueError: a layer its rule doesn't support (a Dense layer on 2-D inputs and an
        ungrouped Conv layer are), or layers that don't form a chain.
    """
    for c in calls.values():
        if not rules.get_rule(c.kind).kfra_supported(c):
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
        """d(target of layer i)/d(output of layer i) per sample, both flattened: (N, d_i)
        diagonal if the path is elementwise, else (N, target_dim, d_i). Forward mode in layer
        i's output alone: the other layers' tangents are symbolic zeros (a linearisation in
        every perturbation multiplied zero tangents by the kernels after layer i)."""
        target = targets[i]
        pick = (lambda r: r[0]) if target == "outputs" else (lambda r: r[1][target])
        own = flat[index_of[i]]

        def from_output(p_i):
            full = list(flat)
            full[index_of[i]] = p_i
            return pick(flat_forward(*full))

        shape = perturbations[i].shape
        n, d = shape[0], math.prod(shape[1:])

        def push(t):
            return jax.jvp(from_output, (own,), (t,))[1].reshape(n, -1)

        if elementwise[i]:
            return True, push(jnp.ones(shape, own.dtype))
        eye = jnp.eye(d, dtype=own.dtype)
        cols = jax.vmap(lambda e: push(jnp.broadcast_to(e.reshape(shape[1:]), shape)))(eye)
        return False, jnp.moveaxis(cols, 0, -1)  # (d, N, target) -> (N, target, d)

    hessians, result = {}, {}
    hess = output_hessian.astype(jnp.promote_types(output_hessian.dtype, jnp.float32))
    for pos in range(len(order) - 1, -1, -1):
        i = order[pos]
        if targets[i] == "outputs":
            mat = hess
        else:
            after = calls[targets[i]]
            mat = rules.get_rule(after.kind).kfra_backpropagate(
                after, leaves[after.kernel], hessians[targets[i]], inputs_shape[targets[i]].shape
            )
        diagonal, jac = jacobians(i)
        jac = jac.astype(mat.dtype)
        n = jac.shape[0]
        if diagonal:
            hessians[i] = mat * symmetric_dot(jac / n, jac)
        else:
            hessians[i] = jnp.einsum("nai,ab,nbj->ij", jac, mat, jac) / n
        result[i] = rules.get_rule(calls[i].kind).kfra_output_factor(calls[i], hessians[i])
    return result
