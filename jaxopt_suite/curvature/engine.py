"""``value_and_grad``: the loss, its gradient and BackPACK's quantities in one pass."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend.core import Var

from jaxopt_suite.curvature import columns as columns_lib
from jaxopt_suite.curvature import generic, hessian, kron, layers, losses, rules, rules_norm
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

    Dense, Conv, LayerNorm and Embed layers of flax linen and nnx models are found while
    ``apply_fn`` is traced and use their structure (:mod:`jaxopt_suite.curvature.layers`,
    :mod:`~jaxopt_suite.curvature.rules`, :mod:`~jaxopt_suite.curvature.rules_norm`); every
    other parameter takes the generic per-sample path (:mod:`jaxopt_suite.curvature.generic`)
    with the same results (:func:`coverage` tells which), and so does a layer whose kernel or
    bias is also read outside it (weight tying), whose leading axis is not the batch axis, or
    that runs inside a transformation within the model (``vmap``, ``jvp``, an inner ``jit``).
    Samples must not interact inside the model (no batch statistics). Inside the engine's
    reverse pass only, 2-D stride-1 convolutions and non-overlapping max-pooling backpropagate
    the gradient and the columns by cheaper formulations with the same values
    (:mod:`~jaxopt_suite.curvature.fastgrad`); the model's forward is unchanged. The gradient
    of a Conv kernel (float32, one feature group) is one matrix product of the patches the
    rules unfold anyway, :math:`\sum_n X_n^\top \delta_n`, equal to ``jax.grad``'s up to
    float32 rounding. For ``diag_ggn_exact`` / ``diag_ggn_mc`` the loss-Hessian columns are
    backpropagated in groups, one ``jax.vmap`` of the VJP per group
    (``rules.backpropagate_columns``). The returned function may be differentiated in reverse
    mode (``jax.grad`` of its outputs) but, for models with such layers, not in forward mode
    (``jax.jvp``, ``jax.hessian``): those backward passes are ``jax.custom_vjp`` rules (a model
    that itself uses forward mode inside ``apply_fn`` is traced without them).

    Second-order quantities, per leaf: ``sqrt_ggn_exact`` / ``sqrt_ggn_mc`` are
    :math:`V` of shape (K, N, *leaf) (K = the loss Hessian's square-root columns, or M MC
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

    Args:
      apply_fn: ``apply_fn(params, inputs) -> outputs`` (N, ...), pure: e.g.
        ``lambda p, x: model.apply({"params": p}, x)`` or an ``nnx.merge`` of a graphdef.
      loss: ``"cross_entropy"`` (integer labels in [0, C), outputs (N, C) or (N, ..., C): every
        position is a term; labels are checked for shape and dtype only: one >= C gives a NaN
        loss, and PyTorch's ``ignore_index`` is not supported), ``"mse"`` (mean over all N·D
        entries), ``"bce_with_logits"``, or a callable ``loss(output, target) -> scalar`` for
        ONE sample (its output-Hessian square root comes from an eigendecomposition; negative
        eigenvalues are clipped to 0).
      reduction: ``"mean"`` or ``"sum"``.
      quantities: names among :data:`~jaxopt_suite.curvature.QUANTITIES` (static).
        ``kfra`` needs Dense layers in a chain on (N, features) inputs (ValueError otherwise).
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
        if any(q.source == "ggn_mc" for q in wanted.values()) and key is None:
            mc = [n for n, q in wanted.items() if q.source == "ggn_mc"]
            raise ValueError(f"quantities {mc} are Monte-Carlo estimates: pass key=")
        leaves, treedef = jax.tree.flatten(params)
        batch = jax.tree.leaves(inputs)[0].shape[0]
        calls = _discover(apply_fn, leaves, treedef, inputs, batch) if structured and needs else {}
        zeros = {i: jnp.zeros(c.output.shape, c.output.dtype) for i, c in calls.items()}

        def forward(leaves, perturbations, x=inputs, fast=False):
            recorder = layers.Recorder(perturbations=perturbations, fast=fast)
            with layers.recording(recorder):
                out = apply_fn(jax.tree.unflatten(treedef, leaves), x)
            return out, recorder.inputs

        residual = None
        if "hessian" in needs:
            try:
                residual = _Residual(forward, leaves, zeros, inputs)
            except hessian.Unsupported:
                residual = None
        if residual is not None and residual.sites:
            outputs, vjp_fn, layer_inputs = residual.vjp
        else:
            outputs, vjp_fn, layer_inputs = _vjp(forward, leaves, zeros, fast=structured)
        loss_obj.check(outputs, targets)
        c = losses.scale(reduction, loss_obj, outputs.shape)

        def total(out):
            return c * jnp.sum(loss_obj.per_sample(out, targets))

        value, g_out = jax.value_and_grad(total)(outputs)
        grad_leaves, deltas = vjp_fn(g_out)
        if residual is not None and residual.sites:
            residual.finish(g_out)

        columns = {}
        if "grad" in needs:
            columns["grad"] = g_out[None]
        if needs.keys() & {"ggn_exact", "hessian", "batch_average"}:
            columns["ggn_exact"] = _columns(
                np.sqrt(c) * loss_obj.sqrt_hessian(_wide(outputs), targets), outputs.dtype
            )
        if "ggn_mc" in needs:
            draws = loss_obj.sample_sqrt_hessian(key, _wide(outputs), targets, mc_samples)
            columns["ggn_mc"] = _columns(np.sqrt(c / mc_samples) * draws, outputs.dtype)

        owner = _owners(calls)
        prepared = {i: _prepare(calls[i], x) for i, x in layer_inputs.items()}
        grad_leaves = _conv_kernel_gradients(grad_leaves, calls, prepared, deltas)
        free = [i for i in range(len(leaves)) if i not in owner]

        def apply_free(free_leaves, x):
            full = list(leaves)
            for j, leaf in zip(free, free_leaves, strict=True):
                full[j] = leaf
            return apply_fn(jax.tree.unflatten(treedef, full), x)

        results: dict[str, dict[str, list]] = {}
        for source, stats in needs.items():
            if source == "hessian" and residual is None:
                results[source] = _generic_hessian(
                    apply_fn, treedef, loss_obj, c, params, inputs, targets, stats, chunk_size
                )
                continue
            if source == "batch_average":
                results[source] = _kfra(forward, zeros, calls, leaves, owner, prepared, columns)
                continue
            cols = columns["ggn_exact" if source == "hessian" else source]
            if source in ("ggn_exact", "hessian") and "columns" not in stats:
                # statistics quadratic in the columns: any root of the same Hessian will do
                cols = _fewer_columns(loss_obj.name, cols, outputs)
            if calls:
                layer_deltas = (
                    {i: d[None] for i, d in deltas.items()}
                    if source == "grad"
                    else rules.backpropagate_columns(vjp_fn, cols, _column_groups(stats, cols))
                )
            per_leaf: dict[str, list] = {s: [None] * len(leaves) for s in stats}
            for i, (call_index, role) in owner.items():
                for s in stats:
                    per_leaf[s][i] = _layer_statistic(
                        s, calls[call_index], role, prepared[call_index], layer_deltas[call_index]
                    )
            if free:
                found = _generic_statistics(
                    apply_free, [leaves[j] for j in free], inputs, cols, stats, chunk_size
                )
                for s in stats:
                    for j, v in zip(free, found[s], strict=True):
                        per_leaf[s][j] = v
            if source == "hessian" and residual.sites:
                extra = residual.statistics(
                    stats, calls, owner, prepared, free, leaves, apply_fn, treedef, chunk_size
                )
                for s in stats:
                    per_leaf[s] = [a + b for a, b in zip(per_leaf[s], extra[s], strict=True)]
            results[source] = per_leaf

        extras = {}
        for name, q in wanted.items():
            values = results[q.source][q.statistic]
            if q.finish is not None:
                values = [q.finish(v, g, batch) for v, g in zip(values, grad_leaves, strict=True)]
            values = [_as_leaf_dtype(v, leaf) for v, leaf in zip(values, leaves, strict=True)]
            extras[name] = jax.tree.unflatten(treedef, values)
        return value, jax.tree.unflatten(treedef, grad_leaves), extras

    return fn


# The gradient of a conv kernel as one product of the engine's patches (see below); False
# keeps the kernel cotangent of the convolution's own VJP.
_KERNEL_GRAD_FROM_PATCHES = True


def _conv_kernel_gradients(
    grad_leaves: list, calls: dict[int, layers.LayerCall], prepared: dict, deltas: dict
) -> list:
    r"""``grad_leaves`` with each float32 conv kernel's gradient recomputed from the patches the
    rules use anyway: :math:`\nabla W = \sum_{n} X_n^\top \delta_n`, one 2-D product
    (N·P, D)ᵀ @ (N·P, C_out) (:func:`rules.conv_kernel_gradient`). Same value as the kernel
    cotangent of the convolution's VJP (a transposed convolution on XLA:CPU, slower) up to
    float32 rounding; XLA drops that cotangent, which nothing else reads. Feature groups and
    low-precision layers keep the VJP's. On the BackPACK CNN (N = 64) the first-order
    quantities took 0.87x the time (sum_grad_squared, same-run A/B; XLA:CPU's kernel
    cotangent of ``Conv_0``, 1 input channel, is particularly slow)."""
    if not _KERNEL_GRAD_FROM_PATCHES:
        return grad_leaves
    out = list(grad_leaves)
    for i, call in calls.items():
        if call.kind != "conv" or call.kernel is None or call.conv.feature_group_count != 1:
            continue
        if i not in prepared or i not in deltas:
            continue
        patches, delta, leaf = prepared[i], deltas[i], grad_leaves[call.kernel]
        if any(a.dtype != jnp.float32 for a in (patches, delta, leaf)):
            continue
        out[call.kernel] = rules.conv_kernel_gradient(patches, delta, call.conv)
    return out


def _column_groups(stats: Sequence[str], cols: jax.Array) -> int | None:
    """How :func:`rules.backpropagate_columns` groups the columns: by cores (None) when every
    statistic is ``sum_sq`` (``diag_ggn_exact``, ``diag_ggn_mc``), one call per column
    otherwise. Measured on the BackPACK CNN (2 cores, same-run A/Bs): ``diag_ggn_exact``
    0.85-0.96x the time with the groups, but ``diag_ggn_exact_batch`` (per-sample statistics,
    ~100 MB outputs) 1.02-1.07x, so the per-sample and Kronecker statistics keep one call per
    column."""
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
    root = jnp.sqrt(jax.nn.softmax(_wide(outputs), axis=-1))  # (N, C)
    weight = root[:, :-1] / (1.0 + root[:, -1:])  # (N, C - 1)
    return cols[:-1] - cols[-1][None] * weight.T[:, :, None].astype(cols.dtype)


def _wide(x: jax.Array) -> jax.Array:
    """``x`` in float32 at least (loss-Hessian square roots of bfloat16 outputs)."""
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _columns(cols: jax.Array, dtype: Any) -> jax.Array:
    """Columns computed in float32, cast to the outputs' dtype for the backward pass."""
    return cols.astype(dtype)


def _as_leaf_dtype(value: Any, leaf: jax.Array) -> Any:
    return jax.tree.map(lambda v: v.astype(leaf.dtype) if _low(leaf) else v, value)


def _low(a: Any) -> bool:
    return jnp.dtype(a.dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def _layer_statistic(
    statistic: str, call: layers.LayerCall, role: str, prepared: jax.Array, delta: jax.Array
) -> Any:
    """One statistic of a recognised layer's leaf; low-precision inputs are widened to float32
    first, so sums of squares and factors accumulate in float32."""
    if call.kind in rules_norm.KINDS:  # widens itself (an Embed's recorded input is integer)
        return rules_norm.layer_statistic(statistic, call, role, prepared, delta)
    if _low(prepared) or _low(delta):
        prepared, delta = _wide(prepared), _wide(delta)
    if statistic == "columns":
        return columns_lib.layer_columns(call, role, prepared, delta)
    if statistic == "kron":
        return kron.layer_factors(call, role, prepared, delta)
    return rules.layer_statistic(statistic, call, role, prepared, delta)


def _prepare(call: layers.LayerCall, x: jax.Array) -> jax.Array:
    """What the rule of ``call`` consumes, computed once per layer (:func:`rules.prepare` for
    Dense and Conv; LayerNorm's normalised input and Embed's indices as recorded)."""
    return x if call.kind in rules_norm.KINDS else rules.prepare(call, x)


def _generic_statistics(apply_free, free_leaves, inputs, cols, stats, chunk_size):
    """The generic path for every statistic: :mod:`generic` for the first-part ones,
    per-sample column gradients (:mod:`columns`) for ``columns`` and ``kron``."""
    base = [s for s in stats if s in rules.STATISTICS]
    found = (
        generic.statistics(apply_free, free_leaves, inputs, cols, base, chunk_size) if base else {}
    )
    if set(stats) - set(base):
        grads = columns_lib.per_sample_gradients(apply_free, free_leaves, inputs, cols, chunk_size)
        if "columns" in stats:
            found["columns"] = grads
        if "kron" in stats:
            found["kron"] = [
                kron.generic_factors(g, leaf) for g, leaf in zip(grads, free_leaves, strict=True)
            ]
    return found


def _kfra(forward, zeros, calls, leaves, owner, prepared, columns) -> dict[str, list]:
    """``kron`` statistic of KFRA: A as KFLR's, G backpropagated by :func:`kron.kfra`;
    ``None`` for leaves without a Dense rule (LayerNorm and Embed leaves included: their
    calls are left out of the chain, as before they had rules)."""
    out = [None] * len(leaves)
    calls = {i: c for i, c in calls.items() if c.kind not in rules_norm.KINDS}
    zeros = {i: zeros[i] for i in calls}
    owner = {leaf: (ci, role) for leaf, (ci, role) in owner.items() if ci in calls}
    if calls:
        hess = kron._outer(columns["ggn_exact"])
        g = kron.kfra(lambda p: forward(leaves, p), zeros, calls, leaves, hess)
        for i, (call_index, role) in owner.items():
            if role == "bias":
                out[i] = (g[call_index],)
            else:
                x = _wide(prepared[call_index])
                out[i] = (x.T @ x / x.shape[0], g[call_index])
    return {"kron": out}


def _generic_hessian(apply_fn, treedef, loss_obj, c, params, inputs, targets, stats, chunk_size):
    """Exact Hessian diagonals by one-hot HVPs (:func:`hessian.generic_diagonal`)."""

    def per_sample_loss(p, x, y):
        return c * loss_obj.per_sample(apply_fn(p, x), y)[0]

    out = {}
    for s in stats:
        tree = hessian.generic_diagonal(
            per_sample_loss, params, inputs, targets, s == "individual_sum_sq", chunk_size
        )
        out[s] = jax.tree.leaves(tree)
    return out


# Residual columns backpropagated together (vmap) per step of the scan over all of them.
_RESIDUAL_CHUNK = 32


class _Residual:
    """The residual (activation-curvature) part of ``diag_h`` on the engine's forward pass.

    Builds the instrumented forward (:func:`hessian.instrument`), runs the one VJP with a zero
    perturbation at every site output, and after :meth:`finish` has the output cotangent,
    backpropagates the eigen-columns of each site's local Hessian to the layers
    (:meth:`statistics`)."""

    def __init__(self, forward, leaves, zeros, inputs):
        self.inputs = inputs
        inst = hessian.instrument(forward, (True, True, False), leaves, zeros, inputs)
        self.sites = inst.sites
        if not self.sites:
            return
        site_zeros = [jnp.zeros(s.shape, s.dtype) for s in self.sites]

        def run(leaves, perts, site_perts):
            (out, rec), operands, hessians = inst.run(site_perts, leaves, perts, inputs)
            return (out, operands), (rec, hessians)

        (outputs, operands), full_vjp, (rec, self.hessians) = jax.vjp(
            run, leaves, zeros, site_zeros, has_aux=True
        )
        self.operand_zeros = jax.tree.map(jnp.zeros_like, operands)
        self.outputs = outputs
        self.full_vjp = full_vjp

        def vjp_fn(ct):
            g_leaves, g_perts, _ = full_vjp((ct, self.operand_zeros))
            return g_leaves, g_perts

        self.vjp = (outputs, vjp_fn, rec)

    def finish(self, g_out):
        """Second derivatives times the site cotangents -> one table of signed columns: for each
        (site, eigen-direction) a block of as many columns as the site has units."""
        site_grads = self.full_vjp((g_out, self.operand_zeros))[2]
        self.blocks = []
        offset = 0
        for s, (h, g) in enumerate(zip(self.hessians, site_grads, strict=True)):
            units = hessian.site_units(self.sites[s])
            n = g.shape[0]
            for lam, weights in hessian.directions(h, g):
                flat_w = tuple(w.reshape(n, -1) for w in weights)
                self.blocks.append((s, offset, units, lam.reshape(n, -1), flat_w))
                offset += units
        self.total = offset

    def _column(self, k):
        """Column k: cotangents of every site's operands and its sign per sample (N,)."""
        cots = [[None] * t.operands for t in self.sites]
        sign = 0.0
        for s, offset, units, lam, weights in self.blocks:
            local = k - offset
            inside = ((local >= 0) & (local < units)).astype(lam.dtype)
            j = jnp.clip(local, 0, units - 1)
            onehot = jax.nn.one_hot(j, units, dtype=lam.dtype) * inside
            scale = jnp.sqrt(jnp.abs(lam[:, j]))
            for o, w in enumerate(weights):
                part = (w[:, j] * scale)[:, None] * onehot[None]
                cots[s][o] = part if cots[s][o] is None else cots[s][o] + part
            sign = sign + inside * jnp.sign(lam[:, j])
        return cots, sign

    def _site_cotangents(self, cots):
        return [
            tuple(c.reshape(t.shape).astype(t.dtype) for c in ops)
            for t, ops in zip(self.sites, cots, strict=True)
        ]

    def statistics(self, stats, calls, owner, prepared, free, leaves, apply_fn, treedef, chunk):
        """The residual part of each statistic per leaf (to add to the GGN's)."""
        out = {st: [jnp.zeros(()) for _ in leaves] for st in stats}
        if owner:
            for i, values in self._structured(stats, calls, owner, prepared).items():
                for st in stats:
                    out[st][i] = values[st]
        if free:
            self._generic(stats, free, leaves, apply_fn, treedef, chunk, out)
        return out

    def _structured(self, stats, calls, owner, prepared):
        """Backpropagates the columns to the layers, :data:`_RESIDUAL_CHUNK` at a time
        (``lax.scan`` over chunks, ``vmap`` inside: the memory of one chunk), and accumulates
        the statistics of the positive columns minus those of the negative ones."""
        out_zero = jnp.zeros_like(self.outputs)
        order = sorted(owner.items())
        chunk = min(_RESIDUAL_CHUNK, self.total)
        steps = -(-self.total // chunk)

        def stat(ci, role, delta):
            return {st: _layer_statistic(st, calls[ci], role, prepared[ci], delta) for st in stats}

        def backward(k):
            cots, sign = self._column(k)
            return self.full_vjp((out_zero, self._site_cotangents(cots)))[1], sign

        def body(acc, ks):
            deltas, sign = jax.vmap(backward)(ks)  # (B, N, ...) per layer, (B, N)
            new = []
            for (_, (ci, role)), old in zip(order, acc, strict=True):
                d = _wide(deltas[ci])
                shape = (*sign.shape, *([1] * (d.ndim - 2)))
                pos = stat(ci, role, d * (sign > 0).reshape(shape))
                neg = stat(ci, role, d * (sign < 0).reshape(shape))
                new.append({st: old[st] + pos[st] - neg[st] for st in stats})
            return new, None

        init = []
        for _, (ci, role) in order:
            zero = jnp.zeros((1, *calls[ci].output.shape), jnp.float32)
            shapes = jax.eval_shape(lambda ci=ci, role=role, zero=zero: stat(ci, role, zero))
            init.append({st: jnp.zeros(v.shape, v.dtype) for st, v in shapes.items()})
        # columns past the end fall in no block: zero cotangents and sign 0
        ks = jnp.arange(steps * chunk).reshape(steps, chunk)
        acc, _ = jax.lax.scan(body, init, ks)
        return {i: a for (i, _), a in zip(order, acc, strict=True)}

    def _generic(self, stats, free, leaves, apply_fn, treedef, chunk, out):
        """Free leaves: the same columns through :func:`generic.statistics`, with the model
        re-interpreted on one sample and every site's operands as its output."""
        single = jax.tree.map(
            lambda a: jax.ShapeDtypeStruct((1, *a.shape[1:]), a.dtype), self.inputs
        )
        inst = hessian.instrument(
            lambda ls, x: apply_fn(jax.tree.unflatten(treedef, ls), x),
            (True, False),
            [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in leaves],
            single,
        )
        if [(t.shape[1:], t.operands) for t in self.sites] != [
            (t.shape[1:], t.operands) for t in inst.sites
        ]:
            raise ValueError(
                "diag_h: the model's nonlinear nodes differ between a batch of one sample and "
                "the full batch; the model must treat samples alike"
            )
        site_zeros = [jnp.zeros((1, *t.shape[1:]), t.dtype) for t in inst.sites]

        def apply_sites(free_leaves, x):
            full = list(leaves)
            for j, leaf in zip(free, free_leaves, strict=True):
                full[j] = leaf
            operands = inst.run(site_zeros, full, x)[1]
            return jnp.concatenate([o.reshape(1, -1) for ops in operands for o in ops], axis=-1)

        def column(k):
            cots, sign = self._column(k)
            return jnp.concatenate([c for ops in cots for c in ops], axis=-1), sign

        cols, signs = jax.vmap(column)(jnp.arange(self.total))  # (K, N, D), (K, N)
        free_leaves = [leaves[j] for j in free]
        for sign in (1.0, -1.0):
            masked = cols * (signs * sign > 0)[..., None].astype(cols.dtype)
            found = generic.statistics(apply_sites, free_leaves, self.inputs, masked, stats, chunk)
            for st in stats:
                for j, v in zip(free, found[st], strict=True):
                    out[st][j] = out[st][j] + sign * v


def _discover(apply_fn, leaves, treedef, inputs, batch) -> dict[int, layers.LayerCall]:
    """Traces ``apply_fn`` (shapes only) and returns the usable layer calls by index.

    A call is usable when its leading axis is the batch axis: the output's leading dimension is
    N in a trace with the inputs and N + 1 in a second trace with a batch of N + 1 (a
    time-major axis or a ``vmap`` inside the model can have N entries by coincidence; a model
    that cannot be traced with N + 1 samples skips this check). A kernel or bias gets no
    structure when it is used by several calls (a shared layer) or read outside its call in the
    model's jaxpr (weight tying, ``Embed.attend``): per-sample gradients are then sums over the
    uses, which the rules can't square separately.
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
        and len(c.output.shape) >= 2
        and c.output.shape[0] == batch
        and (wider is None or (wider[i] is not None and wider[i].output.shape[0] == batch + 1))
    }
    uses: dict[int, int] = dict.fromkeys(shared, 2)
    owners: dict[int, set[str]] = {}
    for i, c in enumerate(found[0]):
        for leaf in (c.kernel, c.bias) if c is not None else ():
            if leaf is not None:
                uses[leaf] = uses.get(leaf, 0) + 1
                owners.setdefault(leaf, set()).add(layers.call_tag(i))
    for leaf in _read_outside(
        closed.jaxpr,
        dict(zip(closed.jaxpr.invars[: len(leaves)], range(len(leaves)), strict=True)),
        owners,
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


def _owners(calls: dict[int, layers.LayerCall]) -> dict[int, tuple[int, str]]:
    """Leaf index -> (call index, ``"kernel"`` or ``"bias"``); LayerNorm's scale is its
    ``"kernel"``, an embedding table too."""
    owner = {}
    for index, call in calls.items():
        if call.kernel is not None:
            owner[call.kernel] = (index, "kernel")
        if call.bias is not None:
            owner[call.bias] = (index, "bias")
    return owner


def coverage(apply_fn: ApplyFn, params: PyTree, inputs: Any) -> PyTree:
    """Which path serves each parameter: a pytree like ``params`` of ``"dense"``, ``"conv"``,
    ``"layernorm"``, ``"embed"`` or ``"generic"`` (for inspecting a model;
    :func:`value_and_grad` decides the same way).

    Example:
      >>> import flax.linen as nn, jax, jax.numpy as jnp
      >>> model = nn.Sequential([nn.Embed(5, 3), nn.LayerNorm()])
      >>> tokens = jnp.zeros((2, 4), jnp.int32)
      >>> params = model.init(jax.random.key(0), tokens)["params"]
      >>> coverage(lambda p, x: model.apply({"params": p}, x), params, tokens)["layers_1"]
      {'bias': 'layernorm', 'scale': 'layernorm'}
    """
    leaves, treedef = jax.tree.flatten(params)
    batch = jax.tree.leaves(inputs)[0].shape[0]
    owner = _owners(calls := _discover(apply_fn, leaves, treedef, inputs, batch))
    kinds = [calls[owner[i][0]].kind if i in owner else "generic" for i in range(len(leaves))]
    return jax.tree.unflatten(treedef, kinds)
