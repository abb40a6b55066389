"""``value_and_grad``: the loss, its gradient and BackPACK's quantities in one pass.

The engine runs the model once with every recognised layer recorded
(:mod:`~jaxopt_suite.curvature.discovery`), backpropagates the output cotangents of each
source (the gradient, the loss-Hessian square-root columns, Monte-Carlo columns) and asks each
layer's rule (:mod:`~jaxopt_suite.curvature.rules`) for its leaves' statistics; every other
leaf takes the generic per-sample path (:mod:`~jaxopt_suite.curvature.generic`).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxopt_suite._typing import PyTree
from jaxopt_suite.curvature import (
    backprop,
    generic,
    hessian,
    inspection,
    kfra,
    kron,
    layers,
    losses,
    rules,
)
from jaxopt_suite.curvature import columns as columns_lib
from jaxopt_suite.curvature import quantities as quantities_lib
from jaxopt_suite.curvature.config import DEFAULT, EngineConfig
from jaxopt_suite.curvature.discovery import coverage, discover, owners
from jaxopt_suite.curvature.residual import Residual, generic_hessian
from jaxopt_suite.curvature.rules.base import check_kinds, low, wide

#: Where the individual gradients are computed anyway, these come from them (same rounding).
_FROM_INDIVIDUAL = ("sum_sq", "individual_sq_norm")

ApplyFn = Callable[[PyTree, Any], jax.Array]
CurvatureFn = Callable[..., tuple[jax.Array, PyTree, dict[str, PyTree]]]

__all__ = ["coverage", "value_and_grad"]


def value_and_grad(
    apply_fn: ApplyFn,
    *,
    loss: str | losses.PerSampleLoss,
    reduction: str = "mean",
    quantities: Sequence[str] = (),
    mc_samples: int = 1,
    chunk_size: int | None = None,
    structured: bool = True,
    config: EngineConfig = DEFAULT,
    has_aux: bool = False,
) -> CurvatureFn:
    r"""Builds ``fn(params, inputs, targets, *, key=None) -> (value, grads, extras)``.

    ``value`` and ``grads`` are those of ``jax.value_and_grad`` of the mini-batch loss
    :math:`L(\theta) = c \sum_n \ell(f(\theta, x_n), y_n)` (:math:`c = 1/Z` for ``"mean"``,
    where :math:`Z` counts the terms PyTorch averages over, :math:`c = 1` for ``"sum"``);
    ``extras`` maps each requested quantity to a pytree shaped like ``params`` (per-sample
    quantities carry a leading axis N; ``batch_l2`` is an (N,) array per leaf), following
    BackPACK's conventions (individual gradients scaled by :math:`c`):

    .. math::
       \hat g_n = c \nabla_\theta \ell_n, \qquad
       \mathrm{diag\_ggn} = \sum_n \sum_k \big(J_n^\top \sqrt{c}\, S_n[:, k]\big)^{\odot 2},
       \quad S_n S_n^\top = \nabla_f^2 \ell_n .

    Dense, Conv, LayerNorm and Embed layers of flax linen and nnx models (and the layers of any
    kind registered with :func:`~jaxopt_suite.curvature.rules.register_rule`) are found while
    ``apply_fn`` is traced and use their structure (:mod:`jaxopt_suite.curvature.discovery`,
    :mod:`~jaxopt_suite.curvature.rules`, one rule per layer kind); every
    other parameter takes the generic per-sample path (:mod:`jaxopt_suite.curvature.generic`)
    with the same results (:func:`coverage` tells which), and so does a layer whose kernel or
    bias is also read outside it (weight tying), whose leading axis is not the batch axis, or
    that runs inside a transformation within the model (``vmap``, ``jvp``, an inner ``jit``).
    Samples must not interact inside the model: where they do (batch statistics, e.g.
    BatchNorm in training mode; any reduction over the batch axis on the way to the outputs,
    found in the jaxpr, :func:`~jaxopt_suite.curvature.inspection.mixing_layers`), asking for
    any quantity raises an error naming the layer; the value and gradient alone still work.
    A model that draws random numbers (dropout, a key fixed inside ``apply_fn``) gets
    per-sample quantities with exactly the batch's randomness: the rules read the batched
    forward pass, and the generic path evaluates the whole batch with one-sample cotangents
    instead of one sample at a time (:func:`~jaxopt_suite.curvature.generic.sample_vjp`;
    ``diag_h`` / ``diag_h_batch`` refuse such models). Inside the engine's
    reverse pass only, 2-D stride-1 convolutions and non-overlapping max-pooling backpropagate
    the gradient and the columns by cheaper formulations with the same values
    (:mod:`~jaxopt_suite.curvature.fastgrad`); the model's forward is unchanged. The gradient
    of a Conv kernel (float32, one feature group) is one matrix product of the patches the
    rules unfold anyway, :math:`\sum_n X_n^\top \delta_n`, equal to ``jax.grad``'s up to
    float32 rounding. For ``diag_ggn_exact`` / ``diag_ggn_mc`` the loss-Hessian columns are
    backpropagated in groups, one ``jax.vmap`` of the VJP per group
    (:func:`~jaxopt_suite.curvature.backprop.backpropagate_columns`). ``config`` tunes these
    formulations (:class:`~jaxopt_suite.curvature.EngineConfig`), never the values. The
    returned function may be differentiated in reverse mode (``jax.grad`` of its outputs)
    but, for models with such layers, not in forward mode (``jax.jvp``, ``jax.hessian``): those
    backward passes are ``jax.custom_vjp`` rules (a model that itself uses forward mode inside
    ``apply_fn`` is traced without them).

    Second-order quantities, per leaf: ``sqrt_ggn_exact`` / ``sqrt_ggn_mc`` are
    :math:`V` of shape ``(K, N, *leaf)`` (K = the loss Hessian's square-root columns, or M MC
    samples) with :math:`V V^\top` the leaf's GGN block; ``kflr`` / ``kfac`` / ``kfra`` are
    ``(A, G)`` per Dense/Conv kernel (GGN block ≈ ``kron(A, G)`` in the row-major kernel
    layout) and ``(G,)`` per bias (conventions: :mod:`jaxopt_suite.curvature.kron`; LayerNorm
    leaves and other 1-D leaves ``(B,)`` with B their exact GGN block, except for ``kfra``;
    ``None`` where no rule applies, e.g. an embedding table); ``diag_h`` / ``diag_h_batch``
    are the exact Hessian diagonal, the GGN diagonal plus the curvature of the model's
    elementwise nonlinearities found in its jaxpr, or, for models outside that mechanism
    (e.g. products of two parameter-dependent matrices), per-sample Hessian-vector products
    with one-hot tangents (exact but one product per parameter and sample; see
    :mod:`jaxopt_suite.curvature.hessian`).

    bfloat16 (or float16) parameters and inputs: the loss-Hessian square roots and second
    derivatives are computed in float32 and cast to the outputs' dtype for the backward pass;
    statistics and Kronecker factors accumulate in float32 and come back in each leaf's dtype.

    Invariants, per leaf and up to float32 rounding: ``sum(grad_batch) == grads``,
    ``batch_l2 == sum(grad_batch**2)`` over the leaf's axes, ``sum_grad_squared ==
    sum(grad_batch**2, axis=0)``, ``variance == mean((grad_batch - mean(grad_batch))**2)``
    (exactly 0 for one sample), ``diag_ggn_exact == sum(diag_ggn_exact_batch)``.

    Args:
      apply_fn: ``apply_fn(params, inputs) -> outputs`` (N, ...), pure: e.g.
        ``lambda p, x: model.apply({"params": p}, x)`` or an ``nnx.merge`` of a graphdef; with
        ``has_aux``, ``apply_fn(params, inputs) -> (outputs, aux)``.
      loss: ``"cross_entropy"`` (integer labels in [0, C), outputs (N, C) or (N, ..., C): every
        position is a term; labels are checked for shape and dtype only: one >= C gives a NaN
        loss, and PyTorch's ``ignore_index`` is not supported), ``"mse"`` (mean over all N·D
        entries), ``"bce_with_logits"``, or a callable ``loss(output, target) -> scalar`` for
        ONE sample (its output-Hessian square root comes from an eigendecomposition; negative
        eigenvalues are clipped to 0).
      reduction: ``"mean"`` or ``"sum"``.
      quantities: names among :data:`~jaxopt_suite.curvature.QUANTITIES` (static).
        ``kfra`` needs Dense layers (on (N, features) inputs) and ungrouped Conv layers in a
        chain with (N, D) outputs (ValueError otherwise).
      mc_samples: Monte-Carlo samples M of the ``*_mc`` quantities.
      chunk_size: samples per chunk of the generic path (bounds its memory); None: all at once.
      structured: False forces the generic path for every parameter (for checking).
      config: the engine's tuning options (static); the default is the standard behaviour.
      has_aux: ``apply_fn`` returns ``(outputs, aux)`` (e.g. flax's mutated ``batch_stats``);
        the built function then returns ``((value, aux), grads, extras)``, as
        ``jax.value_and_grad(..., has_aux=True)`` does, with ``aux`` from the batched forward.

    Returns:
      A jittable function; ``key`` (a PRNG key) is required by the MC quantities.

    Raises:
      ValueError: an unknown quantity, loss or reduction; ``mc_samples`` < 1; a kind in
        ``config.kinds`` without a rule; at trace time an MC quantity without ``key``,
        targets that don't fit the loss, quantities of a model whose samples interact, or
        ``diag_h`` / ``diag_h_batch`` of a model that draws random numbers.
      TypeError: ``config`` is not an :class:`~jaxopt_suite.curvature.EngineConfig`; at trace
        time integer (or other non-float) parameters, or outputs that are not one array
        (a tuple without ``has_aux``).

    Example:
      >>> import flax.linen as nn, jax, jax.numpy as jnp
      >>> model = nn.Dense(3)
      >>> x, y = jnp.ones((4, 2)), jnp.array([0, 1, 2, 0])
      >>> params = model.init(jax.random.key(0), x)["params"]
      >>> fn = value_and_grad(lambda p, x: model.apply({"params": p}, x),
      ...                     loss="cross_entropy", quantities=("batch_l2", "diag_ggn_exact"))
      >>> value, grads, extras = fn(params, x, y)
      >>> extras["batch_l2"]["kernel"].shape
      (4,)
    """
    if not callable(apply_fn):
        raise TypeError(f"apply_fn must be callable; got {type(apply_fn).__name__}")
    loss_obj = losses.get(loss)
    if reduction not in losses.REDUCTIONS:
        raise ValueError(f"unknown reduction {reduction!r}; valid: {', '.join(losses.REDUCTIONS)}")
    wanted = quantities_lib.get(quantities)
    if not isinstance(mc_samples, int | np.integer) or mc_samples < 1:
        raise ValueError(f"mc_samples must be a positive integer; got {mc_samples!r}")
    if chunk_size is not None and (not isinstance(chunk_size, int | np.integer) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive integer or None; got {chunk_size!r}")
    if not isinstance(config, EngineConfig):
        raise TypeError(f"config must be an EngineConfig; got {type(config).__name__}")
    check_kinds(config.kinds)
    if not isinstance(has_aux, bool):
        raise TypeError(f"has_aux must be True or False; got {has_aux!r}")
    spec = _Spec(
        _outputs_only(apply_fn) if has_aux else apply_fn,
        apply_fn,
        has_aux,
        loss_obj,
        reduction,
        wanted,
        _needs(wanted),
        mc_samples,
        chunk_size,
        structured,
        config,
    )

    def fn(params: PyTree, inputs: Any, targets: jax.Array, *, key: jax.Array | None = None):
        return _run(spec, params, inputs, targets, key)

    return fn


def _outputs_only(apply_fn: Callable) -> ApplyFn:
    """The model's outputs of an ``apply_fn`` that returns ``(outputs, aux)``."""

    return lambda params, inputs: _split_aux(True, apply_fn(params, inputs))[0]


@dataclasses.dataclass(frozen=True)
class _Spec:
    """What :func:`value_and_grad` was asked for (static)."""

    apply_fn: ApplyFn  # the outputs alone
    apply_aux: Callable  # the user's apply_fn: with has_aux, (outputs, aux)
    has_aux: bool
    loss: losses.PerSampleLoss
    reduction: str
    wanted: dict[str, quantities_lib.Quantity]
    needs: dict[str, list[str]]  # source -> statistics it must provide
    mc_samples: int
    chunk_size: int | None
    structured: bool
    config: EngineConfig


@dataclasses.dataclass
class _Pass:
    """One traced call: the batch, the recorded layers and the backward pass."""

    params: PyTree
    leaves: list
    treedef: Any
    inputs: Any
    targets: jax.Array
    calls: dict[int, layers.LayerCall]
    zeros: dict[int, jax.Array]
    forward: Callable
    residual: Residual | None
    outputs: jax.Array
    vjp_fn: Callable
    c: float
    columns: dict[str, jax.Array]
    owner: dict[int, tuple[int, str]]
    prepared: dict[int, jax.Array]
    free: list[int]
    apply_free: Callable
    random: bool


def _needs(wanted: dict[str, quantities_lib.Quantity]) -> dict[str, list[str]]:
    """Source -> the statistics it must provide, in the order of the quantities."""
    needs: dict[str, list[str]] = {}
    for q in wanted.values():
        needs.setdefault(q.source, [])
        if q.statistic not in needs[q.source]:
            needs[q.source].append(q.statistic)
    return needs


def _run(spec: _Spec, params: PyTree, inputs: Any, targets: jax.Array, key: jax.Array | None):
    """The function :func:`value_and_grad` returns."""
    value, aux, grad_leaves, deltas, state = _pass(spec, params, inputs, targets, key)
    batch = jax.tree.leaves(inputs)[0].shape[0]
    results = {}
    for source, stats in spec.needs.items():
        derived = _FROM_INDIVIDUAL if source == "grad" and "individual" in stats else ()
        computed = [s for s in stats if s not in derived]
        results[source] = _source_statistics(spec, state, source, computed, deltas)
        for s in set(derived) & set(stats):
            results[source][s] = [_from_individual(s, g) for g in results[source]["individual"]]
    extras = _extras(spec.wanted, results, grad_leaves, state.leaves, state.treedef, batch)
    grads = jax.tree.unflatten(state.treedef, grad_leaves)
    return ((value, aux), grads, extras) if spec.has_aux else (value, grads, extras)


def _pass(spec: _Spec, params: PyTree, inputs: Any, targets: jax.Array, key: jax.Array | None):
    """The one forward and backward pass: ``(value, aux, gradient leaves, output cotangents
    of the recognised layers, the pass's state)``."""
    if any(q.source == "ggn_mc" for q in spec.wanted.values()) and key is None:
        mc = [n for n, q in spec.wanted.items() if q.source == "ggn_mc"]
        raise ValueError(f"quantities {mc} are Monte-Carlo estimates: pass key=")
    leaves, treedef = jax.tree.flatten(params)
    _check_float_params(params)
    batch = jax.tree.leaves(inputs)[0].shape[0]
    random = _inspect(spec, leaves, treedef, inputs) if spec.wanted else False
    calls = (
        discover(spec.apply_fn, leaves, treedef, inputs, batch, spec.config.kinds)
        if spec.structured and spec.needs
        else {}
    )
    zeros = {i: jnp.zeros(c.output.shape, c.output.dtype) for i, c in calls.items()}
    forward = _recorded_forward(spec, treedef, inputs)
    residual = _residual(spec.needs, forward, leaves, zeros, inputs, spec.config)
    if residual is not None and residual.sites:
        outputs, vjp_fn, layer_inputs = residual.vjp
        aux = spec.apply_aux(params, inputs)[1] if spec.has_aux else None
    else:
        with_aux = _recorded_forward(spec, treedef, inputs, keep_aux=True)
        outputs, vjp_fn, (layer_inputs, aux) = _vjp(with_aux, leaves, zeros, spec.structured)
    spec.loss.check(outputs, targets)
    c = losses.scale(spec.reduction, spec.loss, outputs.shape)

    def total(out):
        return c * jnp.sum(spec.loss.per_sample(out, targets))

    value, g_out = jax.value_and_grad(total)(outputs)
    grad_leaves, deltas = vjp_fn(g_out)
    if residual is not None and residual.sites:
        residual.finish(g_out)
    columns = _output_columns(spec, c, outputs, targets, g_out, key)
    owner = owners(calls)
    prepared = {i: rules.prepare(calls[i], x) for i, x in layer_inputs.items()}
    grad_leaves = _summed_gradients(grad_leaves, calls, prepared, deltas, spec.config)
    free = [i for i in range(len(leaves)) if i not in owner]
    state = _Pass(
        params,
        leaves,
        treedef,
        inputs,
        targets,
        calls,
        zeros,
        forward,
        residual,
        outputs,
        vjp_fn,
        c,
        columns,
        owner,
        prepared,
        free,
        _with_free_leaves(spec.apply_fn, treedef, leaves, free),
        random,
    )
    return value, aux, grad_leaves, deltas, state


def _from_individual(statistic: str, individual: jax.Array) -> jax.Array:
    """``sum_sq`` or ``individual_sq_norm`` from the individual gradients (N, *leaf)."""
    squares = wide(individual) ** 2
    if statistic == "sum_sq":
        return jnp.sum(squares, axis=0)
    return jnp.sum(squares, axis=tuple(range(1, squares.ndim)))


def _check_float_params(params: PyTree) -> None:
    """Integer (or boolean) leaves have no gradient: refused, named, as ``jax.grad`` does."""
    bad = [
        f"{jax.tree_util.keystr(path)} ({jnp.result_type(leaf)})"
        for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]
        if not jnp.issubdtype(jnp.result_type(leaf), jnp.inexact)
    ]
    if bad:
        raise TypeError(
            "params must be floating-point arrays (the gradient of an integer parameter is "
            f"not defined); got {', '.join(bad)}. Pass integer state (counters, PRNG keys; "
            "nnx: split it off with nnx.split(model, nnx.Param, ...)) through apply_fn's "
            "closure or its inputs instead."
        )


def _inspect(spec: _Spec, leaves: list, treedef: Any, inputs: Any) -> bool:
    """Refuses a model whose samples interact (trace time, before anything is computed), and
    ``diag_h`` of a random one; returns whether the model draws random numbers."""
    closed = jax.make_jaxpr(lambda ls, x: spec.apply_fn(jax.tree.unflatten(treedef, ls), x))(
        leaves, inputs
    )
    mixing = inspection.mixing_layers(closed.jaxpr, len(leaves), 1)
    if mixing:
        raise ValueError(
            f"quantities {list(spec.wanted)} need samples that do not interact inside the "
            f"model, but outputs depend on other samples' inputs through {', '.join(mixing)} "
            "(batch statistics, e.g. BatchNorm in training mode). Use the model in evaluation "
            "mode or with frozen statistics (flax: use_running_average=True) for these "
            "quantities; the value and gradient alone (quantities=()) still work."
        )
    random = inspection.is_random(closed.jaxpr)
    hessian_wanted = [n for n, q in spec.wanted.items() if q.source == "hessian"]
    if random and hessian_wanted:
        raise ValueError(
            f"quantities {hessian_wanted} are not computed for a model that draws random "
            "numbers (e.g. dropout): their per-sample Hessian products would see other random "
            "numbers than the batch. Make apply_fn deterministic (dropout off, "
            "deterministic=True) for them."
        )
    return random


def _recorded_forward(spec: _Spec, treedef: Any, inputs: Any, keep_aux: bool = False):
    """``forward(leaves, perturbations, x=inputs, fast=False) -> (outputs, layer inputs)``:
    the model with every recognised layer's input recorded and its output perturbed; with
    ``keep_aux``, ``(outputs, (layer inputs, aux))`` (``aux`` None without ``has_aux``)."""

    def forward(leaves, perturbations, x=inputs, fast=False):
        recorder = layers.Recorder(
            perturbations=perturbations, fast=fast, banded=spec.config.banded_conv_cotangent
        )
        with layers.recording(recorder):
            found = spec.apply_aux(jax.tree.unflatten(treedef, leaves), x)
        out, aux = _split_aux(spec.has_aux, found)
        return out, (recorder.inputs, aux) if keep_aux else recorder.inputs

    return forward


def _split_aux(has_aux: bool, found: Any) -> tuple[jax.Array, Any]:
    """``(outputs, aux)`` of what ``apply_fn`` returned; outputs must be one array."""
    if has_aux:
        if not isinstance(found, tuple | list) or len(found) != 2:
            raise TypeError(
                "with has_aux=True, apply_fn must return a pair (outputs, aux); got "
                f"{type(found).__name__}"
            )
        found, aux = found
    else:
        aux = None
    if not isinstance(found, jax.Array):
        hint = "" if has_aux else "; if it also returns state, pass has_aux=True"
        raise TypeError(
            f"apply_fn must return the model's outputs as one array, got {type(found).__name__}"
            + hint
        )
    return found, aux


def _residual(needs, forward, leaves, zeros, inputs, config: EngineConfig) -> Residual | None:
    """The residual term of ``diag_h`` when asked for and the model's nonlinearities are
    supported (:class:`~jaxopt_suite.curvature.residual.Residual`); None otherwise."""
    if "hessian" not in needs:
        return None
    try:
        return Residual(forward, leaves, zeros, inputs, config)
    except hessian.Unsupported:
        return None


def _output_columns(spec: _Spec, c, outputs, targets, g_out, key) -> dict[str, jax.Array]:
    """Output cotangent columns per source: the gradient's (1, ...), the loss Hessian's square
    root (K, ...) and its Monte-Carlo draws (M, ...), each scaled by the reduction."""
    columns = {}
    if "grad" in spec.needs:
        columns["grad"] = g_out[None]
    if spec.needs.keys() & {"ggn_exact", "hessian", "batch_average"}:
        columns["ggn_exact"] = _columns(
            np.sqrt(c) * spec.loss.sqrt_hessian(wide(outputs), targets), outputs.dtype
        )
    if "ggn_mc" in spec.needs:
        m = spec.mc_samples
        draws = spec.loss.sample_sqrt_hessian(key, wide(outputs), targets, m)
        columns["ggn_mc"] = _columns(np.sqrt(c / m) * draws, outputs.dtype)
    return columns


def _with_free_leaves(apply_fn: ApplyFn, treedef: Any, leaves: list, free: list[int]):
    """``apply_free(free_leaves, x)``: the model as a function of the leaves no rule serves."""

    def apply_free(free_leaves, x):
        full = list(leaves)
        for j, leaf in zip(free, free_leaves, strict=True):
            full[j] = leaf
        return apply_fn(jax.tree.unflatten(treedef, full), x)

    return apply_free


def _source_statistics(
    spec: _Spec, state: _Pass, source: str, stats: list[str], deltas: dict
) -> dict[str, list]:
    """Each statistic in ``stats`` of the source ``source``, per leaf: the rules' for the
    recognised layers, the generic path's for the free leaves (plus the residual term for
    the Hessian)."""
    if source == "hessian" and state.residual is None:
        return generic_hessian(
            spec.apply_fn,
            state.treedef,
            spec.loss,
            state.c,
            state.params,
            state.inputs,
            state.targets,
            stats,
            spec.chunk_size,
            spec.config,
        )
    if source == "batch_average":
        return kfra.statistics(
            state.forward,
            state.zeros,
            state.calls,
            state.leaves,
            state.owner,
            state.prepared,
            state.columns["ggn_exact"],
        )
    cols = state.columns["ggn_exact" if source == "hessian" else source]
    if source in ("ggn_exact", "hessian") and "columns" not in stats:
        # statistics quadratic in the columns: any root of the same Hessian will do
        cols = _fewer_columns(spec.loss.name, cols, state.outputs)
    if state.calls:
        layer_deltas = (
            {i: d[None] for i, d in deltas.items()}
            if source == "grad"
            else backprop.backpropagate_columns(
                state.vjp_fn, cols, _column_groups(stats, cols), spec.config
            )
        )
    per_leaf: dict[str, list] = {s: [None] * len(state.leaves) for s in stats}
    for i, (call_index, role) in state.owner.items():
        call, prepared = state.calls[call_index], state.prepared[call_index]
        for s in stats:
            per_leaf[s][i] = rules.layer_statistic(
                s, call, role, prepared, layer_deltas[call_index], spec.config
            )
    if state.free:
        found = _generic_statistics(
            state.apply_free,
            [state.leaves[j] for j in state.free],
            state.inputs,
            cols,
            stats,
            spec.chunk_size,
            state.random,
        )
        for s in stats:
            for j, v in zip(state.free, found[s], strict=True):
                per_leaf[s][j] = v
    if source == "hessian" and state.residual.sites:
        extra = state.residual.statistics(
            stats,
            state.calls,
            state.owner,
            state.prepared,
            state.free,
            state.leaves,
            spec.apply_fn,
            state.treedef,
            spec.chunk_size,
        )
        for s in stats:
            per_leaf[s] = [a + b for a, b in zip(per_leaf[s], extra[s], strict=True)]
    return per_leaf


def _extras(wanted, results, grad_leaves, leaves, treedef, batch) -> dict[str, PyTree]:
    """Each quantity from its source's statistic (finished, e.g. the variance from the sum of
    squares and the gradient, or from the individual gradients when they were computed), in
    the leaves' dtypes and structure."""
    extras = {}
    for name, q in wanted.items():
        individual = results[q.source].get("individual")
        if q.from_individual is not None and individual is not None:
            values = [q.from_individual(v, batch) for v in individual]
        else:
            values = results[q.source][q.statistic]
            if q.finish is not None:
                values = [q.finish(v, g, batch) for v, g in zip(values, grad_leaves, strict=True)]
        values = [_as_leaf_dtype(v, leaf) for v, leaf in zip(values, leaves, strict=True)]
        extras[name] = jax.tree.unflatten(treedef, values)
    return extras


def _summed_gradients(
    grad_leaves: list,
    calls: dict[int, layers.LayerCall],
    prepared: dict,
    deltas: dict,
    config: EngineConfig,
) -> list:
    """``grad_leaves`` with each recognised kernel's gradient as its rule gives it from what it
    prepared (``LayerRule.summed_gradient``; e.g. a Conv kernel's from its patches)."""
    out = list(grad_leaves)
    for i, call in calls.items():
        if call.kernel is None or i not in prepared or i not in deltas:
            continue
        rule = rules.get_rule(call.kind)
        out[call.kernel] = rule.summed_gradient(
            call, prepared[i], deltas[i], grad_leaves[call.kernel], config
        )
    return out


def _column_groups(stats: Sequence[str], cols: jax.Array) -> int | None:
    """How :func:`~jaxopt_suite.curvature.backprop.backpropagate_columns` groups the columns:
    by cores (None) when every statistic is ``sum_sq`` (``diag_ggn_exact``, ``diag_ggn_mc``),
    one call per column otherwise (per-sample and Kronecker statistics)."""
    return None if set(stats) <= {"sum_sq"} else cols.shape[0]


def _vjp(forward: Callable, leaves: list, zeros: dict, fast: bool) -> tuple:
    """``jax.vjp`` of the recorded forward; ``fast``: with the faster conv / max-pool backward
    passes of :mod:`~jaxopt_suite.curvature.fastgrad` (``custom_vjp`` rules), and without them
    when the model itself differentiates through those layers in forward mode (``jax.jvp``
    inside ``apply_fn``), which ``custom_vjp`` rules do not support."""
    if fast:
        try:
            return jax.vjp(functools.partial(forward, fast=True), leaves, zeros, has_aux=True)
        except (NotImplementedError, TypeError):
            pass  # the plain backward passes below; a genuine error is raised again there
    return jax.vjp(forward, leaves, zeros, has_aux=True)


def _fewer_columns(loss_name: str, cols: jax.Array, outputs: jax.Array) -> jax.Array:
    r"""Cross-entropy's C - 1 square-root columns with the same :math:`S S^\top`.

    The root :math:`S = \mathrm{diag}(\sqrt p) - p \sqrt p^\top` (C columns, ``cols`` (C, N, C)
    up to the scale :math:`\sqrt c`) has :math:`S \sqrt p = 0`. The Householder reflection
    :math:`Q = I - 2 v v^\top / v^\top v`, :math:`v = \sqrt p + e_C`, maps :math:`\sqrt p` to
    :math:`-e_C`, so the last column of :math:`S Q` is zero and the first C - 1,

    .. math:: S'_{:, k} = S_{:, k} - S_{:, C} \sqrt{p_k} / (1 + \sqrt{p_C}),

    satisfy :math:`S' S'^\top = S Q Q^\top S^\top = S S^\top` (the denominator is >= 1).
    Statistics quadratic in the columns (sums of squares, Kronecker factors) are unchanged and
    one backpropagation in C is saved. Other losses, outputs with positions, C < 2: ``cols``.
    """
    classes = outputs.shape[-1]
    if loss_name != "cross_entropy" or outputs.ndim != 2 or classes < 2:
        return cols
    root = jnp.sqrt(jax.nn.softmax(wide(outputs), axis=-1))  # (N, C)
    weight = root[:, :-1] / (1.0 + root[:, -1:])  # (N, C - 1)
    return cols[:-1] - cols[-1][None] * weight.T[:, :, None].astype(cols.dtype)


def _columns(cols: jax.Array, dtype: Any) -> jax.Array:
    """Columns computed in float32, cast to the outputs' dtype for the backward pass."""
    return cols.astype(dtype)


def _as_leaf_dtype(value: Any, leaf: jax.Array) -> Any:
    return jax.tree.map(lambda v: v.astype(leaf.dtype) if low(leaf) else v, value)


def _generic_statistics(apply_free, free_leaves, inputs, cols, stats, chunk_size, batched):
    """The generic path for every statistic: :mod:`generic` for the first-part ones,
    per-sample column gradients (:mod:`columns`) for ``columns`` and ``kron``; ``batched``:
    on the whole batch with one-sample cotangents (random models)."""
    base = [s for s in stats if s in rules.STATISTICS]
    found = (
        generic.statistics(apply_free, free_leaves, inputs, cols, base, chunk_size, batched)
        if base
        else {}
    )
    if set(stats) - set(base):
        grads = columns_lib.per_sample_gradients(
            apply_free, free_leaves, inputs, cols, chunk_size, batched
        )
        if "columns" in stats:
            found["columns"] = grads
        if "kron" in stats:
            found["kron"] = [
                kron.generic_factors(g, leaf) for g, leaf in zip(grads, free_leaves, strict=True)
            ]
    return found


def weighted_gradient(
    apply_fn: ApplyFn,
    *,
    loss: str | losses.PerSampleLoss,
    weigh: Callable[[PyTree], PyTree],
    chunk_size: int | None = None,
    structured: bool = True,
    config: EngineConfig = DEFAULT,
) -> Callable[[PyTree, Any, jax.Array], tuple[jax.Array, PyTree, PyTree]]:
    r"""Builds ``fn(params, inputs, targets) -> (losses, sq_norms, weighted)`` from one pass.

    With :math:`g_n = \nabla_\theta \ell_n` the gradient of sample n's own loss (the
    unreduced per-sample term of ``loss``), ``losses`` is :math:`\ell_n` (N,), ``sq_norms``
    holds :math:`\|g_n\|^2` (N,) per leaf (``batch_l2`` with ``reduction="sum"``), and
    ``weighted`` is :math:`\sum_n w_n g_n` per leaf with ``w = weigh(sq_norms)`` ((N,) per
    leaf). A recognised layer's leaves take :meth:`~jaxopt_suite.curvature.rules.LayerRule.
    weighted_sum` of the output cotangents the pass recorded (no second backward pass); the
    other leaves take the generic path's per-sample gradients (an (N, *leaf) buffer each),
    summed with the weights. The per-sample gradients of the recognised layers are never formed.

    Args:
      apply_fn, loss, chunk_size, structured, config: as :func:`value_and_grad`.
      weigh: ``sq_norms -> weights``, traced once per call.

    Returns:
      A jittable function.
    """
    spec = _Spec(
        apply_fn,
        apply_fn,
        False,
        losses.get(loss),
        "sum",
        quantities_lib.get(("batch_l2",)),
        {"grad": ["individual_sq_norm"]},
        1,
        chunk_size,
        structured,
        config,
    )

    def fn(params: PyTree, inputs: Any, targets: jax.Array):
        _, _, _, deltas, state = _pass(spec, params, inputs, targets, None)
        n_leaves = len(state.leaves)
        sq_norms: list = [None] * n_leaves
        for i, (call_index, role) in state.owner.items():
            sq_norms[i] = rules.layer_statistic(
                "individual_sq_norm",
                state.calls[call_index],
                role,
                state.prepared[call_index],
                deltas[call_index][None],
                config,
            )
        individual = {}
        if state.free:
            found = generic.statistics(
                state.apply_free,
                [state.leaves[j] for j in state.free],
                inputs,
                state.columns["grad"],
                ["individual"],
                chunk_size,
                state.random,
            )["individual"]
            for j, g in zip(state.free, found, strict=True):
                individual[j] = g
                sq_norms[j] = _from_individual("individual_sq_norm", g)
        weights = jax.tree.leaves(weigh(jax.tree.unflatten(state.treedef, sq_norms)))
        weighted = [None] * n_leaves
        for i, (call_index, role) in state.owner.items():
            call = state.calls[call_index]
            weighted[i] = rules.get_rule(call.kind).weighted_sum(
                call, role, state.prepared[call_index], deltas[call_index][None], weights[i], config
            )
        for j, g in individual.items():
            weighted[j] = jnp.tensordot(weights[j].astype(wide(g).dtype), wide(g), axes=1)
        weighted = [_as_leaf_dtype(w, leaf) for w, leaf in zip(weighted, state.leaves, strict=True)]
        per_sample = spec.loss.per_sample(wide(state.outputs), targets)
        return (
            per_sample,
            jax.tree.unflatten(state.treedef, sq_norms),
            jax.tree.unflatten(state.treedef, weighted),
        )

    return fn
