r"""Forward gradient: unbiased gradient estimates from forward-mode autodiff only.

For a scalar function :math:`f(\theta)` and a random direction :math:`v` with
:math:`\mathbb{E}[v v^\top] = I`, one ``jax.jvp`` gives :math:`f(\theta)` and the directional
derivative :math:`\nabla f \cdot v`, and

.. math::

  g = (\nabla f \cdot v)\, v, \qquad \mathbb{E}[g] = \mathbb{E}[v v^\top] \nabla f = \nabla f

(Baydin et al., "Gradients without backpropagation", 2022). Averaging :math:`K` independent
directions divides the variance by :math:`K`. No reverse-mode pass is ever made: the estimate
works for functions that reverse mode cannot differentiate (``lax.while_loop``) and needs no
stored activations.

Directions (``distribution`` x ``structure``), for :math:`n` parameters in total; the variance
is the total one, :math:`\mathbb{E}\|g - \nabla f\|^2`, for ``K = 1``:

* ``dense`` / ``normal``: i.i.d. :math:`N(0, 1)` entries (the paper's);
  :math:`(n + 1)\|\nabla f\|^2`.
* ``dense`` / ``rademacher``: i.i.d. signs, 32 per random ``uint32`` word;
  :math:`(n - 1)\|\nabla f\|^2`.
* ``rank_one`` / ``rademacher``: per leaf :math:`a \otimes b` of signs;
  :math:`(n - 1)\|\nabla f\|^2` (as dense signs: :math:`\|v\|^2 = n` in both).
* ``rank_one`` / ``normal``: per leaf :math:`a \otimes b` of normals; for one ``(p, q)`` leaf
  :math:`((p + 2)(q + 2) - 1)\|\nabla f\|^2`, a little above dense normals.

``perturb="one_layer"`` perturbs ONE random layer ``l`` per direction (probability
:math:`p_l`, uniform or proportional to its size :math:`n_l`), its entries scaled by
:math:`1/\sqrt{p_l}`: :math:`\mathbb{E}[v v^\top] = \sum_l p_l \, p_l^{-1} I_l = I`, so the
estimate stays unbiased, with total variance :math:`\sum_l c_l \|\nabla_l f\|^2 / p_l -
\|\nabla f\|^2` (:math:`c_l = n_l` for signs; :math:`n_l + 2` for dense normals). For signs
with :math:`p_l \propto n_l` that is :math:`(n - 1)\|\nabla f\|^2`, exactly the variance of
perturbing every layer; uniform :math:`p_l = 1/L` gives
:math:`L \sum_l n_l \|\nabla_l f\|^2 - \|\nabla f\|^2`. Its use is speed: the tangent starts
at the chosen layer, and the full matrix products that carry a tangent through later layers
run under ``lax.cond`` only when an earlier layer is the perturbed one (for the MLP
784-1024-1024-10, the only such product is layer 1's tangent through layer 2).

``rank_one`` directions draw, for a leaf of shape ``(..., m)``, one vector :math:`a` over the
leading axes and one :math:`b` over the last axis (vectors and scalars stay dense). Entries
:math:`a_i b_j` are uncorrelated with unit variance, so :math:`\mathbb{E}[v v^\top] = I` still
holds and the estimate stays unbiased. Its use is speed: a Dense kernel's tangent term
:math:`x (a b^\top) = (x a) b^\top` and a convolution's ``conv(x, a ⊗ b) = conv(x, a) ⊗ b`` cost a
matrix-vector product instead of a second matrix product; this module's forward-mode interpreter
applies those identities, and only ``jax.jvp`` differentiates anything else.

Precision: nothing is widened. Directions are drawn in the parameters' dtype (random signs are
exact in bfloat16), the jvp runs in the function's own dtypes, and the estimate has each leaf's
dtype; with bfloat16 parameters the directional derivative carries bfloat16 rounding, far below
the estimator's own variance.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.extend import core as jex_core
from jax.extend.core import primitives as prims

from jaxopt_suite._typing import PyTree

DISTRIBUTIONS = ("normal", "rademacher")
STRUCTURES = ("dense", "rank_one")
BATCHING = ("vmap", "scan")
PERTURB = ("all", "one_layer")
LAYER_PROBABILITIES = ("uniform", "size")


# ---------------------------------------------------------------------------------------------
# Directions


class RankOne(NamedTuple):
    """A rank-one direction for one leaf: ``a[..., None] * b`` (``a``: leaf.shape[:-1], ``b``:
    leaf.shape[-1:]), kept factored so that linear layers can use it cheaply."""

    a: jax.Array
    b: jax.Array

    def dense(self) -> jax.Array:
        return self.a[..., None] * self.b


def rademacher(key: jax.Array, shape: Sequence[int], dtype: Any = jnp.float32) -> jax.Array:
    r"""I.i.d. random signs :math:`\pm 1`, unpacked 32 per random ``uint32`` word.

    Every bit of ``jax.random.bits`` is an independent fair coin, so this draws 32x fewer random
    words than ``jax.random.rademacher`` (one word per sign) and costs a shift and a mask per sign.

    Args:
      key: a PRNG key (any implementation).
      shape: shape of the result.
      dtype: floating dtype of the result.

    Returns:
      An array of ``shape`` with entries ``+1`` or ``-1`` with probability 1/2 each.
    """
    size = math.prod(shape)
    words = jax.random.bits(key, (-(-size // 32),), jnp.uint32)
    bits = (words[:, None] >> jnp.arange(32, dtype=jnp.uint32)) & jnp.uint32(1)
    signs = 1 - 2 * bits.reshape(-1)[:size].astype(dtype)
    return signs.reshape(shape)


def _materialise(x: jax.Array) -> jax.Array:
    """``x`` itself (1-D), computed as ``x @ I`` in blocks of 32 (exact: every product is with
    1 or 0), so that XLA stores it once: it does not fuse a matrix product into its consumers,
    and the CPU compiler drops optimization barriers before fusion."""
    n = x.shape[0]
    blocks = jnp.pad(x, (0, -n % 32)).reshape(-1, 32)
    eye = jnp.eye(32, dtype=x.dtype)
    return jnp.matmul(blocks, eye, precision=jax.lax.Precision.HIGHEST).reshape(-1)[:n]


def _direction(key: jax.Array, tree: PyTree, distribution: str, structure: str) -> PyTree:
    """A direction shaped like ``tree``; rank-one leaves stay :class:`RankOne`.

    All the random numbers come from ONE draw, sliced per leaf: a single generator call costs far
    less than one per leaf (each is a separate small kernel with its own key split).
    """
    leaves, treedef = jax.tree.flatten(tree)
    if not leaves:
        return tree
    dtype = jnp.result_type(*leaves)
    pieces = []  # (leaf index, shape) of each block of random numbers
    for i, leaf in enumerate(leaves):
        shape = jnp.shape(leaf)
        if structure == "rank_one" and len(shape) >= 2:
            pieces += [(i, shape[:-1]), (i, shape[-1:])]
        else:
            pieces.append((i, shape))
    total = sum(math.prod(shape) for _, shape in pieces)
    if distribution == "normal":
        flat = jax.random.normal(key, (total,), dtype)
    else:
        flat = rademacher(key, (total,), dtype)
    if structure == "rank_one":
        # Store the factors once: otherwise XLA recomputes each entry (bit unpacking, slicing)
        # inside every fusion that broadcasts it, i.e. once per parameter of the estimate
        # a ⊗ b (the MLP's update fusions were 4x slower). Dense draws are used elementwise.
        flat = _materialise(flat)
    blocks: list[list[jax.Array]] = [[] for _ in leaves]
    offset = 0
    for i, shape in pieces:
        size = math.prod(shape)
        block = flat[offset : offset + size].reshape(shape).astype(jnp.result_type(leaves[i]))
        blocks[i].append(block)
        offset += size
    out = [RankOne(*b) if len(b) == 2 else b[0] for b in blocks]
    return jax.tree.unflatten(treedef, out)


def _densify(direction: PyTree) -> PyTree:
    return jax.tree.map(
        lambda d: d.dense() if isinstance(d, RankOne) else d,
        direction,
        is_leaf=lambda d: isinstance(d, RankOne),
    )


def random_direction(
    key: jax.Array, tree: PyTree, distribution: str = "normal", structure: str = "dense"
) -> PyTree:
    r"""A random direction :math:`v` shaped like ``tree`` with :math:`\mathbb{E}[v v^\top] = I`.

    Args:
      key: a PRNG key.
      tree: a pytree of floating arrays (only shapes and dtypes are used).
      distribution: ``"normal"`` or ``"rademacher"``.
      structure: ``"dense"`` (i.i.d. entries) or ``"rank_one"`` (``a ⊗ b`` per leaf of rank >= 2).

    Returns:
      A pytree of dense arrays like ``tree``.

    Example:
      >>> v = random_direction(jax.random.key(0), {"w": jnp.zeros((3, 2))}, "rademacher")
    """
    _check_choice("distribution", distribution, DISTRIBUTIONS)
    _check_choice("structure", structure, STRUCTURES)
    return _densify(_direction(key, tree, distribution, structure))


# ---------------------------------------------------------------------------------------------
# Forward mode with rank-one tangents: a jaxpr interpreter that applies jax.jvp equation by
# equation, except where a RankOne tangent enters a contraction that can keep it factored.


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


# ---------------------------------------------------------------------------------------------
# The estimator


def _check_choice(name: str, value: Any, accepted: Sequence[str]) -> None:
    if not isinstance(value, str) or value not in accepted:
        raise ValueError(f"{name} must be one of {list(accepted)}, got {value!r}")


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
        scaled by :math:`1/\sqrt{p_l}` (unbiased; variance in the module docstring). A layer is
        one top-level entry of a differentiated argument (``params["Dense_0"]``), or the whole
        argument when it is an array.
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
      ``has_aux``); ``estimate`` has the structure of the differentiated argument (a tuple of
      them when ``argnums`` is a sequence).

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


def _layers(diff: tuple) -> tuple[list[int], list[int]]:
    """Layer index of every leaf of ``diff`` (a tuple of differentiated arguments) and the
    number of parameters of each layer: a layer is one top-level entry of an argument (a flax
    layer in ``{"params": ...}``-free parameter dicts such as ``{"Dense_0": {...}, ...}``), or
    the whole argument when it is a single array."""
    ids: dict[Any, int] = {}
    layer_of, sizes = [], []
    for path, leaf in jax.tree_util.tree_flatten_with_path(diff)[0]:
        if path[:2] not in ids:
            ids[path[:2]] = len(ids)
            sizes.append(0)
        layer_of.append(ids[path[:2]])
        sizes[ids[path[:2]]] += math.prod(jnp.shape(leaf))
    return layer_of, sizes


def _one_layer_direction(key, diff, distribution, structure, layer_probabilities):
    """A direction that perturbs one random layer ``l`` (probability ``p_l``) scaled by
    ``1/sqrt(p_l)``, so that ``E[v vᵀ] = sum_l p_l (1/p_l) I_l = I``. Returns the direction, the
    layer set of every leaf and ``gate(set) -> traced bool | None``, whether the chosen layer is
    in the set (None: always)."""
    layer_of, sizes = _layers(diff)
    if layer_probabilities == "size":
        probs = np.asarray(sizes, np.float64) / sum(sizes)
    else:
        probs = np.full(len(sizes), 1.0 / len(sizes))
    layer_key, direction_key = jax.random.split(key)
    layer = jax.random.choice(layer_key, len(sizes), p=jnp.asarray(probs, jnp.float32))
    scale = jnp.asarray(1.0 / np.sqrt(probs), jnp.float32)[layer]
    v = _direction(direction_key, diff, distribution, structure)
    is_rank_one = lambda d: isinstance(d, RankOne)
    leaves, treedef = jax.tree.flatten(v, is_leaf=is_rank_one)
    scaled = []
    for d, i in zip(leaves, layer_of, strict=True):
        m = jnp.where(layer == i, scale, 0.0)
        if is_rank_one(d):
            scaled.append(RankOne(d.a * m.astype(d.a.dtype), d.b))
        else:
            scaled.append(d * m.astype(d.dtype))

    def gate(layers: frozenset) -> jax.Array | None:
        if len(layers) == len(sizes):
            return None
        return jnp.any(jnp.asarray(sorted(layers)) == layer)

    deps = [frozenset({i}) for i in layer_of]
    return jax.tree.unflatten(treedef, scaled), deps, gate


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
        nums = _normalize_argnums(argnums, len(args))
        diff = tuple(args[i] for i in nums)
        for i, leaf in zip(nums, diff, strict=True):
            for x in jax.tree.leaves(leaf):
                if not jnp.issubdtype(jnp.result_type(x), jnp.floating):
                    raise TypeError(
                        f"argnums: argument {i} must hold floating arrays to be "
                        f"differentiated, got dtype {jnp.result_type(x)}"
                    )

        def f(d):
            full = list(args)
            for i, x in zip(nums, d, strict=True):
                full[i] = x
            out = fun(*full, **kwargs)
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


# ---------------------------------------------------------------------------------------------
# optax transformation


class ForwardGradientState(NamedTuple):
    """State of :func:`forward_gradient`.

    Attributes:
      key: the PRNG key that the next update splits to draw its directions.
      nonfinite: number of updates whose loss or directional derivative was not finite (their
        estimate was replaced by zeros, so parameters are never corrupted).
    """

    key: jax.Array
    nonfinite: jax.Array


def forward_gradient(
    key: jax.Array,
    num_directions: int = 1,
    distribution: str = "normal",
    *,
    structure: str = "dense",
    perturb: str = "all",
    layer_probabilities: str = "uniform",
    batching: str = "vmap",
) -> optax.GradientTransformationExtraArgs:
    r"""Replaces the incoming updates by a forward-gradient estimate of ``value_fn`` at ``params``.

    .. math::

      u_t = \frac1K \sum_{k=1}^K (\nabla f(\theta_t) \cdot v_{t,k})\, v_{t,k}, \qquad
      f = \texttt{value\_fn}

    The incoming updates are ignored (pass zeros), so ``optax.chain(forward_gradient(key),
    optax.sgd(lr))`` trains without any backward pass. A non-finite loss or directional
    derivative yields a zero update and increments ``state.nonfinite``.

    Args:
      key: PRNG key; the state carries it and splits it at every update.
      num_directions: K >= 1 directions averaged per update.
      distribution: ``"normal"`` or ``"rademacher"``.
      structure: ``"dense"`` or ``"rank_one"`` (fast; see :func:`value_and_forward_grad`).
      perturb: ``"all"`` or ``"one_layer"`` (faster; see :func:`value_and_forward_grad`).
      layer_probabilities: ``"uniform"`` or ``"size"``, for ``"one_layer"``.
      batching: ``"vmap"`` or ``"scan"`` (memory-saving; with ``"one_layer"`` and K > 1, also
        the fast one).

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose
      ``update(updates, state, params, *, value_fn)`` needs ``value_fn(params) -> scalar``.

    Example:
      >>> tx = optax.chain(forward_gradient(jax.random.key(0)), optax.sgd(1e-2))
      >>> params = jnp.array([1.0, 2.0])
      >>> state = tx.init(params)
      >>> loss = lambda p: jnp.sum(p**2)
      >>> updates, state = tx.update(jnp.zeros(2), state, params, value_fn=loss)
    """
    _check_choice("distribution", distribution, DISTRIBUTIONS)
    _check_choice("structure", structure, STRUCTURES)
    _check_choice("batching", batching, BATCHING)
    _check_choice("perturb", perturb, PERTURB)
    _check_choice("layer_probabilities", layer_probabilities, LAYER_PROBABILITIES)
    num_directions = _check_num_directions(num_directions)
    estimate = _estimator(
        lambda params, value_fn: value_fn(params),
        0,
        num_directions,
        distribution,
        structure,
        batching,
        False,
        perturb=perturb,
        layer_probabilities=layer_probabilities,
        guard=True,
    )

    def init_fn(params: optax.Params) -> ForwardGradientState:
        del params
        return ForwardGradientState(key=key, nonfinite=jnp.zeros((), jnp.int32))

    def update_fn(updates, state, params=None, *, value_fn=None, **extra_args):
        del updates, extra_args
        if value_fn is None:
            raise ValueError(
                "forward_gradient needs the loss: call update(updates, state, params, "
                "value_fn=lambda p: loss(p, batch))"
            )
        if params is None:
            raise ValueError("forward_gradient needs params: update(updates, state, params, ...)")
        next_key, subkey = jax.random.split(state.key)
        _, _, grads, ok = estimate(subkey, params, value_fn)
        return grads, ForwardGradientState(next_key, state.nonfinite + (~ok).astype(jnp.int32))

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
