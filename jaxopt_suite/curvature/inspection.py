"""What the engine must know about a model before computing per-sample quantities, read from
the jaxpr of ``apply_fn`` (shapes only, at trace time).

* :func:`is_random`: whether the model draws random numbers (dropout, any ``jax.random`` call
  on a key passed in or closed over): a ``random_bits``, ``threefry2x32``,
  ``rng_bit_generator`` or ``rng_uniform`` equation anywhere in the jaxpr.
* :func:`mixing_layers`: where samples interact. Each value of the jaxpr is followed with the
  axis that carries the batch (the inputs' leading axis): elementwise operations, transposes,
  broadcasts, reshapes that keep the batch axis whole, Dense-style ``dot_general`` and
  convolutions move it; an equation that reduces, contracts, accumulates or pools over it,
  or multiplies two samples' values together, makes its result depend on several samples,
  and so does everything computed from that result. Equations whose batch axis cannot be
  followed (e.g. a reshape that merges it with another axis, a slice of the batch, a loop)
  are not reported: the analysis errs towards saying nothing, so models that work are never
  refused; it finds batch statistics of the usual layers (BatchNorm in training mode, any
  reduction over the batch axis).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from jax.extend.core import ClosedJaxpr, Jaxpr, Literal

RANDOM_PRIMITIVES = frozenset({"random_bits", "threefry2x32", "rng_bit_generator", "rng_uniform"})

_LIBRARIES = tuple(f"{sep}{name}{sep}" for name in ("jax", "jaxlib", "flax") for sep in "/\\")

#: A value whose batch axis could not be followed (it depends on samples, somewhere).
LOST = -1

_REDUCTIONS = frozenset(
    {"reduce_sum", "reduce_max", "reduce_min", "reduce_prod", "reduce_and", "reduce_or"}
)
_ACCUMULATIONS = {
    "cumsum": "axis",
    "cumprod": "axis",
    "cummax": "axis",
    "cummin": "axis",
    "cumlogsumexp": "axis",
    "sort": "dimension",
}
# Equations whose batch axis this analysis reads from their first operand.
_FIRST_OPERAND = frozenset(
    {
        *_REDUCTIONS,
        *_ACCUMULATIONS,
        "argmax",
        "argmin",
        "transpose",
        "broadcast_in_dim",
        "reshape",
        "squeeze",
        "reduce_window",
        "reduce_window_sum",
        "reduce_window_max",
        "reduce_window_min",
    }
)
_MOVERS = frozenset(
    {
        "dynamic_slice",
        "dynamic_update_slice",
        "scatter",
        "scatter-add",
        "scatter_add",
        "top_k",
        "argsort",
        "scan",
        "while",
        "cond",
        "select_and_scatter_add",
    }
)


def is_random(jaxpr: Jaxpr) -> bool:
    """Whether ``jaxpr`` (or any jaxpr nested in it) draws random bits."""
    return any(
        eqn.primitive.name in RANDOM_PRIMITIVES or any(is_random(j) for j in _inner(eqn))
        for eqn in jaxpr.eqns
    )


def mixing_layers(jaxpr: Jaxpr, n_params: int, n_outputs: int) -> list[str]:
    """The places (name stack, or the primitive and source line) where samples start to
    interact on the way to the first ``n_outputs`` outputs of ``jaxpr``, whose first
    ``n_params`` inputs are the parameters and the rest the batch (leading axis)."""
    state = {v: (None, None) for v in jaxpr.invars[:n_params]}
    state.update({v: (0, None) for v in jaxpr.invars[n_params:]})
    found = _run(jaxpr, state)
    return sorted({found[k][1] for k in range(n_outputs) if found[k][1] is not None})


def _inner(eqn) -> list[Jaxpr]:
    out = []
    for value in eqn.params.values():
        for item in value if isinstance(value, tuple | list) else (value,):
            if isinstance(item, ClosedJaxpr):
                out.append(item.jaxpr)
            elif isinstance(item, Jaxpr):
                out.append(item)
    return out


def _run(jaxpr: Jaxpr, state: dict, outer: tuple[str, str] = ("", "")) -> list[tuple]:
    """Follows (batch axis, where samples started to interact) through ``jaxpr``; ``outer``:
    the name stack and the site of the equation that calls it (a nested jaxpr's name stacks
    are relative to it; its site stands in where an equation has neither)."""
    env = dict(state)

    def read(v):
        return (None, None) if isinstance(v, Literal) else env.get(v, (None, None))

    for eqn in jaxpr.eqns:
        ins = [read(v) for v in eqn.invars]
        outs = _transfer(eqn, ins, outer)
        for v, s in zip(eqn.outvars, outs, strict=True):
            env[v] = s
    return [read(v) for v in jaxpr.outvars]


def _stack(eqn, outer: tuple[str, str]) -> str:
    return "/".join(part for part in (outer[0], str(eqn.source_info.name_stack)) if part)


def _site(eqn, outer: tuple[str, str]) -> str:
    """The layer (name stack) of ``eqn``, else its primitive and source line, else the
    calling equation's site."""
    stack = _stack(eqn, outer)
    if stack:
        return stack
    frames = eqn.source_info.traceback.frames if eqn.source_info.traceback else []
    for frame in frames:  # innermost first: the first outside jax and flax is the user's line
        if not any(lib in frame.file_name for lib in _LIBRARIES):
            return f"{eqn.primitive.name} at {frame.file_name}:{frame.line_num}"
    return outer[1] or eqn.primitive.name


def _transfer(eqn, ins: list[tuple], outer: tuple[str, str]) -> list[tuple]:
    """Each output's (batch axis or None or LOST, origin of interaction or None)."""
    origin = next((o for _, o in ins if o is not None), None)
    n_out = len(eqn.outvars)
    if all(a is None for a, _ in ins):
        return [(None, origin)] * n_out
    name, p = eqn.primitive.name, eqn.params
    inner = _inner(eqn) if name not in _MOVERS else []
    if len(inner) == 1 and len(inner[0].invars) == len(ins) and len(inner[0].outvars) == n_out:
        state = dict(zip(inner[0].invars, ins, strict=True))
        return _run(inner[0], state, (_stack(eqn, outer), _site(eqn, outer)))
    mixed = (None, origin or _site(eqn, outer))
    axes = [a for a, _ in ins if a is not None]
    if LOST in axes:
        return [(LOST, origin)] * n_out
    shapes = [getattr(v.aval, "shape", ()) for v in eqn.invars]
    a = ins[0][0]
    if a is None and name in _FIRST_OPERAND:
        return [(LOST, origin)] * n_out  # batched through another operand (a shape, a key)
    if name in _REDUCTIONS or name in ("argmax", "argmin"):
        reduced = p["axes"]
        if a in reduced:
            return [mixed] * n_out
        return [(a - sum(r < a for r in reduced), origin)] * n_out
    if name in _ACCUMULATIONS:
        if p[_ACCUMULATIONS[name]] == a:
            return [(a, mixed[1])] * n_out
        return [(a, origin)] * n_out
    if name == "dot_general":
        return [_dot_general(p["dimension_numbers"], ins, shapes, origin, mixed)]
    if name == "conv_general_dilated":
        lhs_spec, _, out_spec = p["dimension_numbers"]
        a, b = ins[0][0], ins[1][0]
        if b is not None:
            return [(LOST, origin)]
        if a != lhs_spec[0] or p.get("batch_group_count", 1) != 1:
            return [mixed]
        return [(out_spec[0], origin)]
    if name == "transpose":
        return [(list(p["permutation"]).index(ins[0][0]), origin)]
    if name == "broadcast_in_dim":
        return [(p["broadcast_dimensions"][ins[0][0]], origin)]
    if name == "reshape":
        return [(_reshape_axis(shapes[0], p["new_sizes"], ins[0][0]), origin)]
    if name == "squeeze":
        if a in p["dimensions"]:
            return [(LOST, origin)]
        return [(a - sum(d < a for d in p["dimensions"]), origin)]
    if name.startswith("reduce_window"):
        if p["window_dimensions"][a] != 1:
            return [mixed] * n_out
        whole = p["window_strides"][a] == 1 and tuple(p["padding"][a]) == (0, 0)
        return [(a if whole else LOST, origin)] * n_out
    if name == "gather":
        operand, indices = ins[0][0], ins[1][0]
        if operand is not None or indices is None or indices == len(shapes[1]) - 1:
            return [(LOST, origin)]  # the last axis of the indices is the index vector
        batch_dims = [
            d
            for d in range(len(eqn.outvars[0].aval.shape))
            if d not in p["dimension_numbers"].offset_dims
        ]
        return [(batch_dims[indices], origin)] if indices < len(batch_dims) else [(LOST, origin)]
    return _elementwise(eqn, ins, origin)


def _dot_general(dimension_numbers, ins, shapes, origin, mixed) -> tuple:
    (lc, rc), (lb, rb) = dimension_numbers
    a, b = ins[0][0], ins[1][0]
    if (a is not None and a in lc) or (b is not None and b in rc):
        return mixed
    if a is not None and b is not None:
        if a in lb and b in rb and lb.index(a) == rb.index(b):
            return (lb.index(a), origin)
        return mixed  # two samples' values multiplied together
    if a is not None:
        if a in lb:
            return (LOST, origin)  # batched against an unbatched operand's batch dim
        free = [d for d in range(len(shapes[0])) if d not in lc and d not in lb]
        return (len(lb) + free.index(a), origin)
    if b in rb:
        return (LOST, origin)
    lhs_free = len(shapes[0]) - len(lc) - len(lb)
    free = [d for d in range(len(shapes[1])) if d not in rc and d not in rb]
    return (len(lb) + lhs_free + free.index(b), origin)


def _reshape_axis(old: tuple, new: tuple, a: int) -> int:
    """Where the batch axis ``a`` of shape ``old`` is after a reshape to ``new``, or LOST when
    it is merged with or split into other axes."""
    before = int(np.prod(old[:a]))
    for j, size in enumerate(new):
        if int(np.prod(new[:j])) == before and size == old[a]:
            return j
    return LOST


def _elementwise(eqn, ins: list[tuple], origin: Any) -> list[tuple]:
    """Any other equation: the batch axis stays where it is when every batched operand has it
    at the same place as every output (elementwise operations, ``select_n``, ``clamp``,
    ``convert_element_type``, ...); otherwise it is LOST."""
    axes = {a for a, _ in ins if a is not None}
    if len(axes) == 1:
        (a,) = axes
        sizes = {
            v.aval.shape[a]
            for v, (b, _) in zip(eqn.invars, ins, strict=True)
            if b is not None and len(getattr(v.aval, "shape", ())) > a
        }
        outs = [getattr(v.aval, "shape", ()) for v in eqn.outvars]
        if len(sizes) == 1 and all(len(s) > a and s[a] in sizes for s in outs):
            ranks = {
                len(v.aval.shape)
                for v, (b, _) in zip(eqn.invars, ins, strict=True)
                if b is not None
            }
            if all(len(s) in ranks for s in outs) and not _moves_batch(eqn, a):
                return [(a, origin)] * len(eqn.outvars)
    return [(LOST, origin)] * len(eqn.outvars)


def _moves_batch(eqn, a: int) -> bool:
    """Shape-preserving equations that still move values along the batch axis."""
    name, p = eqn.primitive.name, eqn.params
    if name == "rev":
        return a in p["dimensions"]
    if name == "pad":
        return tuple(p["padding_config"][a]) != (0, 0, 0)
    if name == "slice":
        strides = p["strides"] or (1,) * len(p["start_indices"])
        return (p["start_indices"][a], strides[a]) != (0, 1)
    if name == "concatenate":
        return p["dimension"] == a
    if name == "split":
        return p["axis"] == a
    return name in _MOVERS
