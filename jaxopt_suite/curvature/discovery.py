"""Finding the layers the rules serve: which layer calls of a model are usable, and which
parameter leaves each owns.

Layers are found by tracing the model inside :func:`jaxopt_suite.curvature.layers.recording`
(the flax classes each rule intercepts); :func:`discover` then keeps the calls whose leading
axis is the batch axis and whose leaves no other part of the model reads.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
from jax.extend.core import Var

from jaxopt_suite._typing import PyTree
from jaxopt_suite.curvature import layers
from jaxopt_suite.curvature.rules.base import check_kinds

#: The kind :func:`coverage` reports for leaves no rule serves.
GENERIC = "generic"


def discover(
    apply_fn: Callable,
    leaves: list,
    treedef: Any,
    inputs: Any,
    batch: int,
    kinds: Sequence[str] | None = None,
) -> dict[int, layers.LayerCall]:
    """Traces ``apply_fn`` (shapes only) and returns the usable layer calls by index.

    A call is usable when its leading axis is the batch axis: the output's leading dimension is
    N in a trace with the inputs and N + 1 in a second trace with a batch of N + 1 (a
    time-major axis or a ``vmap`` inside the model can have N entries by coincidence; a model
    that cannot be traced with N + 1 samples skips this check). A kernel or bias gets no
    structure when it is used by several calls (a shared layer) or read outside its call in the
    model's jaxpr (weight tying, ``Embed.attend``): per-sample gradients are then sums over the
    uses, which the rules can't square separately. ``kinds``: only calls of these kinds are
    returned (None: all).
    """
    found: list[list] = []
    shared: set[int] = set()

    def probe(leaves, inputs):
        recorder = layers.Recorder(leaf_ids={id(leaf): i for i, leaf in enumerate(leaves)})
        with layers.recording(recorder):
            out = apply_fn(jax.tree.unflatten(treedef, leaves), inputs)
        found.append(recorder.calls)
        shared.update(recorder.shared)
        return out

    structs = [jax.ShapeDtypeStruct(leaf.shape, leaf.dtype) for leaf in leaves]
    as_struct = lambda a, n: jax.ShapeDtypeStruct((n, *a.shape[1:]), a.dtype)
    closed = jax.make_jaxpr(probe)(structs, jax.tree.map(lambda a: as_struct(a, batch), inputs))
    try:
        jax.eval_shape(probe, structs, jax.tree.map(lambda a: as_struct(a, batch + 1), inputs))
        wider = found[1] if len(found[1]) == len(found[0]) else None
    except Exception:  # e.g. a reshape to a fixed batch size
        wider = None
    calls = {
        i: c
        for i, c in enumerate(found[0])
        if c is not None
        and (kinds is None or c.kind in kinds)
        and len(c.output.shape) >= 2
        and c.output.shape[0] == batch
        and (wider is None or (wider[i] is not None and wider[i].output.shape[0] == batch + 1))
    }
    uses: dict[int, int] = dict.fromkeys(shared, 2)
    leaf_owners: dict[int, set[str]] = {}
    for i, c in enumerate(found[0]):
        for leaf in (c.kernel, c.bias) if c is not None else ():
            if leaf is not None:
                uses[leaf] = uses.get(leaf, 0) + 1
                leaf_owners.setdefault(leaf, set()).add(layers.call_tag(i))
    for leaf in _read_outside(
        closed.jaxpr,
        dict(zip(closed.jaxpr.invars[: len(leaves)], range(len(leaves)), strict=True)),
        leaf_owners,
    ):
        uses[leaf] = 2
    return {
        i: c
        for i, c in calls.items()
        if all(uses.get(leaf, 0) == 1 for leaf in (c.kernel, c.bias) if leaf is not None)
    }


def _read_outside(jaxpr: Any, tracked: dict[Any, int], owners: dict[int, set[str]]) -> set[int]:
    """The tracked leaves (jaxpr variable -> leaf index) that an equation outside their own
    calls' named scopes reads, or that are outputs; nested ``jit`` equations are followed."""
    found = {tracked[v] for v in jaxpr.outvars if isinstance(v, Var) and v in tracked}
    for eqn in jaxpr.eqns:
        read = [
            (k, tracked[v]) for k, v in enumerate(eqn.invars) if isinstance(v, Var) and v in tracked
        ]
        if not read:
            continue
        scopes = set(str(eqn.source_info.name_stack).split("/"))
        inner = eqn.params.get("jaxpr") if eqn.primitive.name in ("jit", "pjit") else None
        for k, leaf in read:
            if scopes & owners.get(leaf, set()):
                continue
            if inner is not None:
                found |= _read_outside(inner.jaxpr, {inner.jaxpr.invars[k]: leaf}, owners)
            else:
                found.add(leaf)
    return found


def owners(calls: dict[int, layers.LayerCall]) -> dict[int, tuple[int, str]]:
    """Leaf index -> (call index, ``"kernel"`` or ``"bias"``); LayerNorm's scale is its
    ``"kernel"``, an embedding table too."""
    owner = {}
    for index, call in calls.items():
        if call.kernel is not None:
            owner[call.kernel] = (index, "kernel")
        if call.bias is not None:
            owner[call.bias] = (index, "bias")
    return owner


def coverage(
    apply_fn: Callable[[PyTree, Any], jax.Array],
    params: PyTree,
    inputs: Any,
    kinds: Sequence[str] | None = None,
) -> PyTree:
    """Which path serves each parameter: a pytree like ``params`` of the kind of the rule
    that serves the leaf (``"dense"``, ``"conv"``, ``"layernorm"``, ``"embed"`` or a
    registered kind) or ``"generic"`` (for inspecting a model;
    :func:`~jaxopt_suite.curvature.value_and_grad` decides the same way).

    Args:
      apply_fn: ``apply_fn(params, inputs) -> outputs``.
      params: the parameters.
      inputs: a batch.
      kinds: the kinds that get their rule (``EngineConfig.kinds``); None: every registered one.

    Raises:
      ValueError: a kind in ``kinds`` without a rule.

    Example:
      >>> import flax.linen as nn, jax, jax.numpy as jnp
      >>> model = nn.Sequential([nn.Embed(5, 3), nn.LayerNorm()])
      >>> tokens = jnp.zeros((2, 4), jnp.int32)
      >>> params = model.init(jax.random.key(0), tokens)["params"]
      >>> coverage(lambda p, x: model.apply({"params": p}, x), params, tokens)["layers_1"]
      {'bias': 'layernorm', 'scale': 'layernorm'}
    """
    check_kinds(kinds)
    leaves, treedef = jax.tree.flatten(params)
    batch = jax.tree.leaves(inputs)[0].shape[0]
    owner = owners(calls := discover(apply_fn, leaves, treedef, inputs, batch, kinds))
    found = [calls[owner[i][0]].kind if i in owner else GENERIC for i in range(len(leaves))]
    return jax.tree.unflatten(treedef, found)
