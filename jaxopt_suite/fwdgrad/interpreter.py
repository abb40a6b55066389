"""Forward mode with rank-one tangents: a jaxpr interpreter that applies ``jax.jvp`` equation
by equation, except where a :class:`~jaxopt_suite.fwdgrad.directions.RankOne` tangent enters a
contraction that can keep it factored (``dot_general``: ``x (a b^T) = (x a) b^T``; a
convolution over its kernel: ``conv(x, a ⊗ b) = conv(x, a) ⊗ b``), and where only one layer is
perturbed (the products that carry a zero tangent are skipped by ``lax.cond``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.extend import core as jex_core
from jax.extend.core import primitives as prims

from jaxopt_suite._typing import PyTree
from jaxopt_suite.fwdgrad.directions import RankOne


def _bind(eqn, args: Sequence[Any]) -> list[Any]:
    out = eqn.primitive.bind(*args, **eqn.primitive.get_bind_params(eqn.params))
    return list(out) if eqn.primitive.multiple_results else [out]


def _is_float(x: Any) -> bool:
    return jnp.issubdtype(jnp.result_type(x), jnp.inexact)


def _jvp_eqn(eqn, primals: list, tangents: list) -> tuple[list, list]:
    """``jax.jvp`` of one equation w.r.t. the operands that have a tangent (others constant)."""
    tangents = [t.dense() if isinstance(t, RankOne) else t for t in tangents]
    active = [i for i, t in enumerate(tangents) if t is not None]

    def call(*dynamic):
        args = list(primals)
        for i, x in zip(active, dynamic, strict=True):
            args[i] = x
        return _bind(eqn, args)

    out, out_t = jax.jvp(call, [primals[i] for i in active], [tangents[i] for i in active])
    return out, list(out_t)


def _dot_rank_one_term(eqn, primals, factored: int, tangent: RankOne) -> jax.Array:
    """The tangent term of ``dot_general`` for a :class:`RankOne` tangent of operand
    ``factored``: ``dot(x, a ⊗ b)`` as an einsum that contracts ``x`` with ``a`` first (a
    matrix-vector product), then takes the outer product with ``b``."""
    (lhs_c, rhs_c), (lhs_b, rhs_b) = eqn.params["dimension_numbers"]
    lhs, rhs = primals
    letters = iter("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
    lhs_s = [next(letters) for _ in range(jnp.ndim(lhs))]
    rhs_s = [next(letters) for _ in range(jnp.ndim(rhs))]
    for i, j in zip(tuple(lhs_c) + tuple(lhs_b), tuple(rhs_c) + tuple(rhs_b), strict=True):
        rhs_s[j] = lhs_s[i]
    out_s = [lhs_s[i] for i in lhs_b]
    out_s += [s for i, s in enumerate(lhs_s) if i not in lhs_c and i not in lhs_b]
    out_s += [s for j, s in enumerate(rhs_s) if j not in rhs_c and j not in rhs_b]
    other_s, fact_s = (lhs_s, rhs_s) if factored == 1 else (rhs_s, lhs_s)
    spec = f"{''.join(other_s)},{''.join(fact_s[:-1])},{fact_s[-1]}->{''.join(out_s)}"
    return jnp.einsum(spec, primals[1 - factored], tangent.a, tangent.b, optimize="greedy")


def _conv_rank_one_term(eqn, primals, tangent: RankOne) -> jax.Array | None:
    """The tangent term of a convolution for a :class:`RankOne` kernel tangent whose last axis
    is the output-feature axis: ``conv(x, a ⊗ b) = conv(x, a) ⊗ b`` (one output channel instead
    of all of them); None where that does not apply."""
    params = eqn.params
    dims = params["dimension_numbers"]
    lhs, rhs = primals
    if (
        params["feature_group_count"] != 1
        or params["batch_group_count"] != 1
        or dims.rhs_spec[0] != jnp.ndim(rhs) - 1
    ):
        return None
    (single,) = _bind(eqn, [lhs, tangent.a[..., None]])
    out_shape = [1] * single.ndim
    out_shape[dims.out_spec[1]] = tangent.b.shape[0]
    return single * tangent.b.reshape(out_shape)


_BILINEAR = (prims.dot_general_p, prims.conv_general_dilated_p)


def _bilinear_jvp(eqn, primals, tangents, deps, gate) -> tuple[list, list]:
    """jvp of ``dot_general`` / ``conv``, one term per operand with a tangent (the map is
    bilinear). A :class:`RankOne` tangent gives a cheap factored term; a dense tangent a full
    product, skipped by ``lax.cond`` when ``gate(deps[i])`` says that tangent is zero this time
    (only the randomly chosen layer is perturbed)."""
    out = _bind(eqn, primals)
    total = None
    for i, t in enumerate(tangents):
        if t is None:
            continue
        term = None
        if isinstance(t, RankOne):
            if eqn.primitive is prims.dot_general_p:
                term = _dot_rank_one_term(eqn, primals, i, t)
            elif i == 1:
                term = _conv_rank_one_term(eqn, primals, t)
            t = t.dense() if term is None else t
        if term is None:

            def full(ps, t, i=i):
                rest = [None, None]
                rest[i] = t
                return _jvp_eqn(eqn, ps, rest)[1][0]

            pred = None if gate is None else gate(deps[i])
            if pred is None:
                term = full(primals, t)
            else:
                zeros = lambda ps, t: jnp.zeros(out[0].shape, out[0].dtype)
                term = jax.lax.cond(pred, full, zeros, primals, t)
        term = term.astype(out[0].dtype)
        total = term if total is None else total + term
    return out, [total]


def _sub_jaxpr(eqn):
    if eqn.primitive is prims.jit_p:
        return eqn.params["jaxpr"]
    if eqn.primitive is prims.closed_call_p:
        return eqn.params["call_jaxpr"]
    return None


def _jvp_jaxpr(
    jaxpr,
    consts: Sequence[Any],
    primals: Sequence[Any],
    tangents: Sequence[Any],
    deps: Sequence[frozenset] | None = None,
    gate: Callable[[frozenset], jax.Array | None] | None = None,
):
    """Evaluates ``jaxpr`` and its forward derivative; a tangent is None (zero), an array, or a
    :class:`RankOne`.

    With ``gate``, ``deps[i]`` is the set of blocks (layers) whose perturbation tangent ``i``
    depends on; the sets are propagated statically through the equations, and
    ``gate(set)`` is a traced boolean (is one of those blocks the perturbed one?) or None (always
    true). Returns ``(outputs, output tangents, output dependency sets)``.
    """
    primal_env: dict[Any, Any] = {}
    tangent_env: dict[Any, Any] = {}
    deps_env: dict[Any, frozenset] = {}
    no_deps: frozenset = frozenset()

    def read(var):
        if isinstance(var, jex_core.Literal):
            return var.val, None, no_deps
        return primal_env[var], tangent_env.get(var), deps_env.get(var, no_deps)

    for var, value in zip(jaxpr.constvars, consts, strict=True):
        primal_env[var] = value
    deps = [no_deps] * len(primals) if deps is None else deps
    for var, value, tangent, dep in zip(jaxpr.invars, primals, tangents, deps, strict=True):
        primal_env[var] = value
        tangent_env[var] = tangent
        deps_env[var] = dep

    for eqn in jaxpr.eqns:
        if eqn.invars:
            ps, ts, ds = map(list, zip(*map(read, eqn.invars), strict=True))
        else:
            ps, ts, ds = [], [], []
        live = frozenset().union(*[d for d, t in zip(ds, ts, strict=True) if t is not None])
        out_deps = [live] * len(eqn.outvars)
        sub = _sub_jaxpr(eqn)
        if all(t is None for t in ts):
            outs, out_ts = _bind(eqn, ps), [None] * len(eqn.outvars)
        elif sub is not None and (gate is not None or any(isinstance(t, RankOne) for t in ts)):
            outs, out_ts, out_deps = _jvp_jaxpr(sub.jaxpr, sub.consts, ps, ts, ds, gate)
        elif eqn.primitive in _BILINEAR:
            outs, out_ts = _bilinear_jvp(eqn, ps, ts, ds, gate)
        else:
            outs, out_ts = _jvp_eqn(eqn, ps, ts)
        for var, value, tangent, dep in zip(eqn.outvars, outs, out_ts, out_deps, strict=True):
            if isinstance(var, jex_core.DropVar):
                continue
            primal_env[var] = value
            tangent_env[var] = tangent if _is_float(value) else None
            deps_env[var] = dep

    results = [read(v) for v in jaxpr.outvars]
    return [r[0] for r in results], [r[1] for r in results], [r[2] for r in results]


def _jvp(fun: Callable, primals: PyTree, tangent: PyTree, deps=None, gate=None):
    """``(fun(primals), aux, d fun(primals)[tangent])``; ``tangent`` may hold :class:`RankOne`
    leaves, and with ``gate`` (one perturbed layer) ``deps`` gives each leaf's layer set.

    ``fun`` returns ``(scalar, aux)``; the derivative of the scalar is returned.
    """
    is_rank_one = lambda t: isinstance(t, RankOne)
    plain = not any(is_rank_one(t) for t in jax.tree.leaves(tangent, is_leaf=is_rank_one))
    if plain and gate is None:
        (value, aux), (dot, _) = jax.jvp(fun, (primals,), (tangent,))
        return value, aux, dot
    flat_primals, treedef = jax.tree.flatten(primals)
    flat_tangents = treedef.flatten_up_to(tangent)
    closed, out_shape = jax.make_jaxpr(
        lambda *xs: fun(jax.tree.unflatten(treedef, xs)), return_shape=True
    )(*flat_primals)
    outs, out_tangents, _ = _jvp_jaxpr(
        closed.jaxpr, closed.consts, flat_primals, flat_tangents, deps, gate
    )
    value, aux = jax.tree.unflatten(jax.tree.structure(out_shape), outs)
    dot = out_tangents[0]
    return value, aux, jnp.zeros_like(value) if dot is None else dot
