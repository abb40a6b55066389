"""``value_and_grad``: the loss, its gradient and BackPACK's quantities in one pass."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxopt_suite.curvature import generic, layers, losses, rules
from jaxopt_suite.curvature import quantities as quantities_lib

PyTree = Any
ApplyFn = Callable[[PyTree, Any], jax.Array]
CurvatureFn = Callable[..., tuple[jax.Array, PyTree, dict[str, PyTree]]]


def value_and_grad(
    apply_fn: ApplyFn,
    *,
    loss: str | losses.PerSampleLoss,
    reduction: str = "mean",
    quantities: Sequence[str] = (),
    mc_samples: int = 1,
    chunk_size: int | None = None,
    structured: bool = True,
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

    Dense and Conv layers of flax linen and nnx models are found while ``apply_fn`` is traced
    and use their outer-product structure (:mod:`jaxopt_suite.curvature.layers`); every other
    parameter takes the generic per-sample path (:mod:`jaxopt_suite.curvature.generic`) with
    the same results. Samples must not interact inside the model (no batch statistics).

    Args:
      apply_fn: ``apply_fn(params, inputs) -> outputs`` (N, ...), pure: e.g.
        ``lambda p, x: model.apply({"params": p}, x)`` or an ``nnx.merge`` of a graphdef.
      loss: ``"cross_entropy"`` (integer labels, outputs (N, C) or (N, ..., C): every position
        is a term), ``"mse"`` (mean over all N·D entries), ``"bce_with_logits"``, or a callable
        ``loss(output, target) -> scalar`` for ONE sample (its output-Hessian square root comes
        from an eigendecomposition; negative eigenvalues are clipped to 0).
      reduction: ``"mean"`` or ``"sum"``.
      quantities: names among :data:`~jaxopt_suite.curvature.QUANTITIES` (static).
      mc_samples: Monte-Carlo samples M of the ``*_mc`` quantities.
      chunk_size: samples per chunk of the generic path (bounds its memory); None: all at once.
      structured: False forces the generic path for every parameter (for checking).

    Returns:
      A jittable function; ``key`` (a PRNG key) is required by the MC quantities.

    Raises:
      ValueError: an unknown quantity, loss or reduction; ``mc_samples`` < 1; at trace time an
        MC quantity without ``key`` or targets that don't fit the loss.

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
    # source -> statistics it must provide
    needs: dict[str, list[str]] = {}
    for q in wanted.values():
        needs.setdefault(q.source, [])
        if q.statistic not in needs[q.source]:
            needs[q.source].append(q.statistic)

    def fn(params: PyTree, inputs: Any, targets: jax.Array, *, key: jax.Array | None = None):
        if "ggn_mc" in needs and key is None:
            mc = [n for n, q in wanted.items() if q.source == "ggn_mc"]
            raise ValueError(f"quantities {mc} are Monte-Carlo estimates: pass key=")
        leaves, treedef = jax.tree.flatten(params)
        batch = jax.tree.leaves(inputs)[0].shape[0]
        calls = _discover(apply_fn, leaves, treedef, inputs, batch) if structured and needs else {}
        zeros = {i: jnp.zeros(c.output.shape, c.output.dtype) for i, c in calls.items()}

        def forward(leaves, perturbations):
            recorder = layers.Recorder(perturbations=perturbations)
            with layers.recording(recorder):
                out = apply_fn(jax.tree.unflatten(treedef, leaves), inputs)
            return out, recorder.inputs

        outputs, vjp_fn, layer_inputs = jax.vjp(forward, leaves, zeros, has_aux=True)
        loss_obj.check(outputs, targets)
        c = losses.scale(reduction, loss_obj, outputs.shape)

        def total(out):
            return c * jnp.sum(loss_obj.per_sample(out, targets))

        value, g_out = jax.value_and_grad(total)(outputs)
        grad_leaves, deltas = vjp_fn(g_out)

        columns = {}
        if "grad" in needs:
            columns["grad"] = g_out[None]
        if "ggn_exact" in needs:
            columns["ggn_exact"] = np.sqrt(c) * loss_obj.sqrt_hessian(outputs, targets)
        if "ggn_mc" in needs:
            draws = loss_obj.sample_sqrt_hessian(key, outputs, targets, mc_samples)
            columns["ggn_mc"] = np.sqrt(c / mc_samples) * draws

        owner = _owners(calls)
        prepared = {i: rules.prepare(calls[i], x) for i, x in layer_inputs.items()}
        free = [i for i in range(len(leaves)) if i not in owner]
        results: dict[str, dict[str, list]] = {}
        for source, stats in needs.items():
            cols = columns[source]
            if calls:
                layer_deltas = (
                    {i: d[None] for i, d in deltas.items()}
                    if source == "grad"
                    else rules.backpropagate_columns(vjp_fn, cols)
                )
            per_leaf: dict[str, list] = {s: [None] * len(leaves) for s in stats}
            for i, (call_index, role) in owner.items():
                call = calls[call_index]
                for s in stats:
                    per_leaf[s][i] = rules.layer_statistic(
                        s, call, role, prepared[call_index], layer_deltas[call_index]
                    )
            if free:
                fixed = list(leaves)

                def apply_free(free_leaves, x, fixed=fixed):
                    full = list(fixed)
                    for j, leaf in zip(free, free_leaves, strict=True):
                        full[j] = leaf
                    return apply_fn(jax.tree.unflatten(treedef, full), x)

                found = generic.statistics(
                    apply_free, [leaves[j] for j in free], inputs, cols, stats, chunk_size
                )
                for s in stats:
                    for j, v in zip(free, found[s], strict=True):
                        per_leaf[s][j] = v
            results[source] = per_leaf

        extras = {}
        for name, q in wanted.items():
            values = results[q.source][q.statistic]
            if q.finish is not None:
                values = [q.finish(v, g, batch) for v, g in zip(values, grad_leaves, strict=True)]
            extras[name] = jax.tree.unflatten(treedef, values)
        return value, jax.tree.unflatten(treedef, grad_leaves), extras

    return fn


def _discover(apply_fn, leaves, treedef, inputs, batch) -> dict[int, layers.LayerCall]:
    """Traces ``apply_fn`` once (shapes only) and returns the usable layer calls by index."""
    found: list[list] = []

    def probe(leaves, inputs):
        recorder = layers.Recorder(leaf_ids={id(leaf): i for i, leaf in enumerate(leaves)})
        with layers.recording(recorder):
            apply_fn(jax.tree.unflatten(treedef, leaves), inputs)
        found.append(recorder.calls)

    jax.eval_shape(probe, leaves, inputs)
    calls = {
        i: c
        for i, c in enumerate(found[0])
        if c is not None and len(c.output.shape) >= 2 and c.output.shape[0] == batch
    }
    # A leaf used by several calls (shared layers) gets no structure: per-sample gradients
    # are then sums over the calls, which the rules can't square separately.
    uses: dict[int, int] = {}
    for c in calls.values():
        for leaf in (c.kernel, c.bias):
            if leaf is not None:
                uses[leaf] = uses.get(leaf, 0) + 1
    return {
        i: c
        for i, c in calls.items()
        if all(uses.get(leaf, 0) == 1 for leaf in (c.kernel, c.bias) if leaf is not None)
    }


def _owners(calls: dict[int, layers.LayerCall]) -> dict[int, tuple[int, str]]:
    owner = {}
    for index, call in calls.items():
        owner[call.kernel] = (index, "kernel")
        if call.bias is not None:
            owner[call.bias] = (index, "bias")
    return owner


def coverage(apply_fn: ApplyFn, params: PyTree, inputs: Any) -> PyTree:
    """Which path serves each parameter: a pytree like ``params`` of ``"dense"``, ``"conv"``
    or ``"generic"`` (for inspecting a model; :func:`value_and_grad` decides the same way)."""
    leaves, treedef = jax.tree.flatten(params)
    batch = jax.tree.leaves(inputs)[0].shape[0]
    owner = _owners(calls := _discover(apply_fn, leaves, treedef, inputs, batch))
    kinds = [calls[owner[i][0]].kind if i in owner else "generic" for i in range(len(leaves))]
    return jax.tree.unflatten(treedef, kinds)
