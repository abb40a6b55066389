r"""Per-layer derivative rules of the structured path (Dense and Conv).

For a layer :math:`z = x W (+ b)` the per-sample gradient is
:math:`\hat g_n(W) = \sum_t x_{n,t} \delta_{n,t}^\top` (sum over sequence or spatial positions;
for a convolution :math:`x_{n,t}` is the input patch under output position :math:`t`). A rule
receives :math:`x` (N, ..., in) and a stack of cotangents :math:`\delta` (K, N, ..., out): one
column for first-order quantities, the K backpropagated columns of the loss Hessian's square
root for GGN quantities. It returns one of the :data:`STATISTICS` of the per-(column, sample)
gradients :math:`\hat g_{k,n}`:

* ``individual``: :math:`\hat g_{0,n}`, shape (N, *leaf)
* ``individual_sq_norm``: :math:`\|\hat g_{0,n}\|^2`, shape (N,)
* ``sum_sq``: :math:`\sum_{k,n} \hat g_{k,n}^{\odot 2}`, shape leaf
* ``individual_sum_sq``: :math:`\sum_k \hat g_{k,n}^{\odot 2}`, shape (N, *leaf)

A Dense layer without extra axes never forms :math:`\hat g`: e.g. ``sum_sq`` is
:math:`(x^{\odot 2})^\top (\sum_k \delta_k^{\odot 2})` and ``individual_sq_norm`` is
:math:`\|x_n\|^2 \|\delta_n\|^2`.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax

from jaxopt_suite.curvature.layers import ConvConfig, LayerCall

STATISTICS = ("individual", "individual_sq_norm", "sum_sq", "individual_sum_sq")


# Arrays up to this many entries are summed by one reduce (the strided loop costs < 0.1 ms).
_SMALL_SUM = 1 << 16


def sum_leading(a: jax.Array) -> jax.Array:
    """Sum over the leading axis of ``a``, as a tree of elementwise additions of halves.

    Same value as ``jnp.sum(a, axis=0)`` (pairwise, so no less accurate), but XLA on CPU
    reduces the leading (major) axis of a large array as a strided loop: summing 64
    per-sample conv-kernel gradients (64, 500, 50) that way took 7 ms, the halving 0.4 ms.

    Args:
      a: an array with at least one axis.

    Returns:
      ``a`` summed over axis 0, shape ``a.shape[1:]``, in ``a``'s dtype.

    Example:
      >>> import jax.numpy as jnp
      >>> sum_leading(jnp.arange(6.0).reshape(3, 2))
      Array([6., 9.], dtype=float32)
    """
    if a.size <= _SMALL_SUM:  # one reduce: fewer operations to compile, no time to gain
        return jnp.sum(a, axis=0)
    while a.shape[0] > 1:
        half = a.shape[0] // 2
        head = a[:half] + a[half : 2 * half]
        if a.shape[0] % 2:
            head = head.at[0].add(a[-1])
        a = head
    return a[0]


def reduce_individual(statistic: str, grads: jax.Array) -> jax.Array:
    """A statistic from materialised per-(column, sample) gradients ``grads`` (K, N, *leaf)."""
    if statistic == "individual":
        return grads[0]
    if statistic == "individual_sq_norm":
        g = grads[0]
        return jnp.sum(g.reshape(g.shape[0], -1) ** 2, axis=1)
    if statistic == "sum_sq":
        return sum_leading(grads.reshape(-1, *grads.shape[2:]) ** 2)
    if statistic == "individual_sum_sq":
        return sum_leading(grads**2)
    raise ValueError(f"unknown statistic {statistic!r}; valid: {STATISTICS}")


def _positions(x: jax.Array, delta: jax.Array) -> tuple[jax.Array, jax.Array]:
    """x (N, ..., in) -> (N, T, in); delta (K, N, ..., out) -> (K, N, T, out)."""
    n = x.shape[0]
    return x.reshape(n, -1, x.shape[-1]), delta.reshape(delta.shape[0], n, -1, delta.shape[-1])


def dense_kernel(statistic: str, x: jax.Array, delta: jax.Array) -> jax.Array:
    """Statistic of the kernel (in, out) of ``z = x W``; see the module docstring."""
    x, delta = _positions(x, delta)
    t, d_in = x.shape[1:]
    d_out = delta.shape[-1]
    if t == 1:
        x, delta = x[:, 0], delta[:, :, 0]
        if statistic == "individual":
            return jnp.einsum("ni,no->nio", x, delta[0])
        if statistic == "individual_sq_norm":
            return jnp.sum(x**2, axis=-1) * jnp.sum(delta[0] ** 2, axis=-1)
        delta_sq = sum_leading(delta**2)
        if statistic == "sum_sq":
            return jnp.einsum("ni,no->io", x**2, delta_sq)
        if statistic == "individual_sum_sq":
            return jnp.einsum("ni,no->nio", x**2, delta_sq)
    elif statistic == "individual_sq_norm" and t * t * (d_in + d_out) < d_in * d_out:
        # ||sum_t x_t d_t^T||^2 = sum_{t,s} (x_t . x_s)(d_t . d_s): Gram matrices, no N x in x out.
        gram_x = jnp.einsum("nti,nsi->nts", x, x)
        gram_d = jnp.einsum("nto,nso->nts", delta[0], delta[0])
        return jnp.sum(gram_x * gram_d, axis=(1, 2))
    return reduce_individual(statistic, jnp.einsum("nti,knto->knio", x, delta))


def bias(statistic: str, delta: jax.Array) -> jax.Array:
    """Statistic of a bias (out,) added to every position: ``ĝ_n = Σ_t δ_{n,t}``."""
    k, n = delta.shape[:2]
    return reduce_individual(statistic, delta.reshape(k, n, -1, delta.shape[-1]).sum(axis=2))


def conv_patches(x: jax.Array, config: ConvConfig, out_spatial: tuple[int, ...]) -> jax.Array:
    """Input patches under each output position: (N, *out_spatial, prod(kernel), C_in).

    Strided slices of the padded (and input-dilated) input, one per kernel offset, in the
    kernel's row-major order, so ``z[n, p, o] = Σ_{s,c} patches[n, p, s, c] W[s, c, o]``
    (without feature groups).
    """
    zero = jnp.zeros((), x.dtype)
    pads = [(0, 0, 0)]
    pads += [
        (lo, hi, d - 1) for (lo, hi), d in zip(config.padding, config.lhs_dilation, strict=True)
    ]
    x = lax.pad(x, zero, [*pads, (0, 0, 0)])
    slices = []
    for offset in itertools.product(*(range(k) for k in config.kernel_spatial)):
        start = [0] + [o * d for o, d in zip(offset, config.rhs_dilation, strict=True)] + [0]
        limit = [x.shape[0]]
        limit += [
            s + (p - 1) * st + 1
            for s, p, st in zip(start[1:-1], out_spatial, config.window_strides, strict=True)
        ]
        limit += [x.shape[-1]]
        slices.append(lax.slice(x, start, limit, (1, *config.window_strides, 1)))
    # one concatenation along the channels (as fast as or faster than a stack on a new axis)
    out = jnp.concatenate(slices, axis=-1)
    return out.reshape(*out.shape[:-1], len(slices), x.shape[-1])


def prepare(call: LayerCall, x: jax.Array) -> jax.Array:
    """What the kernel rule of ``call`` consumes, computed once per layer: the input itself
    for Dense, the unfolded patches (N, P, prod(kernel), C_in) for Conv."""
    if call.kind == "dense":
        return x
    patches = conv_patches(x, call.conv, call.output.shape[1:-1])
    return patches.reshape(x.shape[0], -1, *patches.shape[-2:])


# Per-sample kernel gradients of a convolution are formed for this many bytes of samples at a
# time and reduced at once: one (N, D, K·C_out) block of a whole batch (64 MB for the BackPACK
# CNN's second convolution and the 10 columns of diag_ggn_exact) leaves the caches between the
# batched product and the squares; chunks of samples in a loop stay in them (2x faster on CPU).
# One gradient column of that layer for N = 64 (6.4 MB) fits: the first-order statistics and
# diag_ggn_mc need no loop (and no copies of the patches into chunks).
_CHUNK_BYTES = 8 << 20


def _sample_chunk(n: int, per_sample_bytes: int) -> int:
    """Samples per chunk so that one chunk's per-sample gradients fit in ``_CHUNK_BYTES``,
    balanced over the chunks (64 samples in chunks of at most 41 become 2 x 32, not 41 + 23
    padded to 2 x 41)."""
    most = max(1, min(n, _CHUNK_BYTES // max(per_sample_bytes, 1)))
    chunks = -(-n // most)
    return -(-n // chunks)


def _over_sample_chunks(
    reduce: Callable[[jax.Array, jax.Array], jax.Array],
    lhs: jax.Array,
    rhs: jax.Array,
    chunk: int,
    summed: bool,
) -> jax.Array:
    """``reduce(lhs_c, rhs_c)`` over chunks of the leading (sample) axis of both arrays.

    Samples are zero-padded to a whole number of chunks (zero patches give zero gradients).
    ``summed``: the chunks' results are added (``reduce`` sums over its samples); otherwise
    they are concatenated along the sample axis and the padding is dropped.
    """
    n = lhs.shape[0]
    if chunk >= n:
        return reduce(lhs, rhs)
    m = -(-n // chunk)

    def split(a: jax.Array) -> jax.Array:
        a = jnp.pad(a, [(0, m * chunk - n)] + [(0, 0)] * (a.ndim - 1))
        return a.reshape(m, chunk, *a.shape[1:])

    lhs, rhs = split(lhs), split(rhs)
    if summed:  # from zeros over all chunks: slicing off a first chunk copied the operands
        out = jax.eval_shape(reduce, lhs[0], rhs[0])
        zeros = jnp.zeros(out.shape, out.dtype)
        total, _ = lax.scan(lambda acc, lr: (acc + reduce(*lr), None), zeros, (lhs, rhs))
        return total
    out = lax.map(lambda lr: reduce(*lr), (lhs, rhs))
    return out.reshape(m * chunk, *out.shape[2:])[:n]


def conv_kernel(
    statistic: str, patches: jax.Array, delta: jax.Array, config: ConvConfig
) -> jax.Array:
    r"""Statistic of a conv kernel (*kernel_spatial, C_in / G, C_out) from unfolded patches.

    The per-(column, sample) kernel gradient is one matrix product per sample and feature
    group, :math:`\hat g_{k,n} = X_n^\top \Delta_{k,n}` with :math:`X_n` (P, S·C_in/G) the
    patches and :math:`\Delta_{k,n}` (P, C_out/G) the output cotangents over the P output
    positions; the K columns share one product :math:`X_n^\top [\Delta_{1,n} \cdots
    \Delta_{K,n}]`. Chunks of samples are multiplied and reduced (squared, summed over
    columns and, for ``sum_sq``, over samples) in a loop, so no (N, D, K·C_out) buffer is
    formed; only the (small) result is permuted to the kernel's layout.

    Args:
      statistic: one of :data:`STATISTICS`.
      patches: (N, P, S, C_in) from :func:`prepare`.
      delta: (K, N, *out_spatial, C_out) output cotangents.
      config: the layer's :class:`~jaxopt_suite.curvature.layers.ConvConfig`.

    Returns:
      The statistic in the kernel's layout (with a leading N for per-sample statistics).
    """
    if statistic not in STATISTICS:
        raise ValueError(f"unknown statistic {statistic!r}; valid: {STATISTICS}")
    if statistic in ("individual", "individual_sq_norm"):
        delta = delta[:1]  # first-order statistics use the single gradient column
    k, n = delta.shape[:2]
    groups = config.feature_group_count
    s, c_in = patches.shape[-2:]
    c_out = delta.shape[-1]
    cg, og = c_in // groups, c_out // groups
    positions = patches.shape[1]
    if (
        statistic in ("sum_sq", "individual_sum_sq")
        and groups == 1
        and k > 1
        and positions > s * c_in
        and n * k * s * c_in * c_out * _itemsize(patches, delta) <= _CHUNK_BYTES
    ):
        return _conv_kernel_few_weights(statistic, patches, delta, config)
    if (
        statistic == "sum_sq"
        and groups == 1
        and k > 1
        and s * c_in * k * c_out >= _PER_SAMPLE_PRODUCT
    ):
        return _conv_kernel_sum_sq_per_sample(patches, delta, config)
    lhs = patches.reshape(n, -1, s, groups, cg).transpose(0, 3, 1, 2, 4)
    lhs = lhs.reshape(n, groups, -1, s * cg)  # (N, G, P, D)
    # columns innermost, so that their squares are summed by a reduction over the minor axis
    # of the product (fused with the squaring; over a middle axis XLA CPU wrote the squares out)
    rhs = delta.reshape(k, n, -1, groups, og).transpose(1, 3, 2, 4, 0)
    rhs = rhs.reshape(n, groups, -1, og * k)  # (N, G, P, Og·K)

    def reduce(lhs: jax.Array, rhs: jax.Array) -> jax.Array:
        grads = lax.dot_general(lhs, rhs, (((2,), (2,)), ((0, 1), (0, 1))))
        grads = grads.reshape(*grads.shape[:3], og, k)  # (n, G, D, Og, K)
        if statistic == "individual":
            return grads[..., 0]
        if statistic == "individual_sq_norm":
            return jnp.sum(grads[..., 0] ** 2, axis=(1, 2, 3))
        squares = grads[..., 0] ** 2 if k == 1 else jnp.sum(grads**2, axis=-1)
        return sum_leading(squares) if statistic == "sum_sq" else squares

    chunk = _sample_chunk(n, groups * s * cg * k * og * _itemsize(patches, delta))
    out = _over_sample_chunks(reduce, lhs, rhs, chunk, summed=statistic == "sum_sq")

    def to_kernel(a: jax.Array, batch: bool) -> jax.Array:
        # (..., G, D, Og) -> (..., *kernel_spatial, Cg, G·Og)
        lead = a.shape[:1] if batch else ()
        a = a.reshape(*lead, groups, s, cg, og)
        a = jnp.moveaxis(a, len(lead), len(lead) + 2)  # (..., S, Cg, G, Og)
        return a.reshape(*lead, *config.kernel_spatial, cg, c_out)

    if statistic == "individual_sq_norm":
        return out
    return to_kernel(out, batch=statistic != "sum_sq")


def _conv_kernel_few_weights(
    statistic: str, patches: jax.Array, delta: jax.Array, config: ConvConfig
) -> jax.Array:
    """:func:`conv_kernel`'s ``sum_sq`` / ``individual_sum_sq`` for several columns when the
    positions outnumber the kernel's inputs (e.g. a first layer, 576 positions, 25 weights per
    output channel): the cotangents (K, N, P, C_out) are contracted in their own layout
    (no transposition of them, the larger operand here), giving (N, K, D, C_out) at once, and
    the squares are summed over K. 18 -> 12 ms for the BackPACK CNN's first convolution with
    10 columns."""
    k, n = delta.shape[:2]
    s, c_in = patches.shape[-2:]
    c_out = delta.shape[-1]
    lhs = patches.reshape(n, -1, s * c_in)
    grads = jnp.einsum("knpo,npd->nkdo", delta.reshape(k, n, -1, c_out), lhs)
    squares = jnp.sum(grads * grads, axis=1)  # (N, D, C_out)
    if statistic == "sum_sq":
        return sum_leading(squares).reshape(*config.kernel_spatial, c_in, c_out)
    return squares.reshape(n, *config.kernel_spatial, c_in, c_out)


# A conv's multi-column ``sum_sq`` takes one 2-D product per sample in a loop
# (:func:`_conv_kernel_sum_sq_per_sample`) when that product has at least this many entries
# (the loop's per-iteration overhead is then negligible); smaller ones keep the chunks.
_PER_SAMPLE_PRODUCT = 1 << 16


def _conv_kernel_sum_sq_per_sample(
    patches: jax.Array, delta: jax.Array, config: ConvConfig
) -> jax.Array:
    r""":func:`conv_kernel`'s ``sum_sq`` for K > 1 columns and one feature group, as
    :math:`\sum_{k} \big(\sum_n (\Delta_{k,n}^\top X_n)^{\odot 2}\big)^\top`: a loop over
    the samples takes one 2-D product :math:`[\Delta_{1,n} \cdots \Delta_{K,n}]^\top X_n`
    (K·C_out, P) @ (P, D) per sample and adds its squares elementwise to a (K·C_out, D)
    accumulator; the sum over the K columns (a leading axis, :func:`sum_leading`) and the
    transposition to the kernel's layout happen once, after the loop. Each sample's
    cotangents are sliced from the (K, N, P, C_out) stack and transposed inside the loop
    (no transposed copy of the whole stack).

    On XLA:CPU these 2-D products with an elementwise accumulation ran faster than a batched
    product over chunks of samples followed by a reduction over the columns (innermost or
    not), though still below a plain product with many rows (~100 GFLOP/s here). For the
    BackPACK CNN's second convolution (64 positions, D = 500, 9 columns x 50 channels,
    N = 64; 1.8 GFLOP) the statistic took 0.47-0.87x the chunked product's time in same-run
    comparisons, and the CNN's ``diag_ggn_exact`` 5-19 % less time
    (``benchmarks/results/curvature.md``)."""
    k, n = delta.shape[:2]
    s, c_in = patches.shape[-2:]
    c_out = delta.shape[-1]
    d = s * c_in
    lhs = patches.reshape(n, -1, d)  # (N, P, D)
    delta = delta.reshape(k, n, -1, c_out)  # (K, N, P, C_out), sliced per sample in the loop
    positions = lhs.shape[1]

    def step(acc: jax.Array, xi: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, None]:
        x, i = xi
        cot = lax.dynamic_index_in_dim(delta, i, axis=1, keepdims=False)  # (K, P, C_out)
        cot = jnp.moveaxis(cot, 1, 0).reshape(positions, k * c_out)  # one sample's transpose
        grads = lax.dot_general(cot, x, (((0,), (0,)), ((), ())))  # (K·C_out, D)
        return acc + grads * grads, None

    zeros = jnp.zeros((k * c_out, d), jnp.result_type(patches, delta))
    acc, _ = lax.scan(step, zeros, (lhs, jnp.arange(n)))
    out = sum_leading(acc.reshape(k, c_out, d)).T  # (D, C_out)
    return out.reshape(*config.kernel_spatial, c_in, c_out)


def conv_kernel_gradient(patches: jax.Array, delta: jax.Array, config: ConvConfig) -> jax.Array:
    r"""The summed kernel gradient of a convolution with one feature group,
    :math:`\nabla W = \sum_n X_n^\top \delta_n`, as one 2-D product over all samples and
    positions, (N·P, D)ᵀ @ (N·P, C_out) with D = prod(kernel)·C_in.

    Args:
      patches: (N, P, S, C_in) from :func:`prepare`.
      delta: (N, *out_spatial, C_out), the output cotangent (one column, no K axis).
      config: the layer's :class:`~jaxopt_suite.curvature.layers.ConvConfig`
        (``feature_group_count`` must be 1).

    Returns:
      The gradient in the kernel's layout (*kernel_spatial, C_in, C_out).
    """
    if config.feature_group_count != 1:
        raise ValueError("conv_kernel_gradient: feature groups are not supported")
    s, c_in = patches.shape[-2:]
    c_out = delta.shape[-1]
    lhs = patches.reshape(-1, s * c_in)
    rhs = delta.reshape(-1, c_out)
    grad = lax.dot_general(lhs, rhs, (((0,), (0,)), ((), ())))  # (D, C_out)
    return grad.reshape(*config.kernel_spatial, c_in, c_out)


def _itemsize(*arrays: jax.Array) -> int:
    """Bytes per element of the product of ``arrays`` (their promoted dtype)."""
    return jnp.dtype(jnp.result_type(*arrays)).itemsize


def layer_statistic(
    statistic: str, call: LayerCall, role: str, prepared: jax.Array, delta: jax.Array
) -> jax.Array:
    """Dispatches to the rule of ``call.kind`` for the ``role`` (``"kernel"`` or ``"bias"``);
    ``prepared`` is :func:`prepare` of the layer input."""
    if role == "bias":
        return bias(statistic, delta)
    if call.kind == "dense":
        return dense_kernel(statistic, prepared, delta)
    return conv_kernel(statistic, prepared, delta, call.conv)


# Up to this many columns are backpropagated in groups (below); beyond it a sequential lax.map.
_UNROLL_COLUMNS = 16

# Groups of columns backpropagated side by side; None: one per CPU core the process may use.
_COLUMN_GROUPS: int | None = None


def _default_groups() -> int:
    """Groups when none is asked for: ``_COLUMN_GROUPS``, else this process's CPU cores."""
    if _COLUMN_GROUPS is not None:
        return _COLUMN_GROUPS
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on every platform
        return max(1, os.cpu_count() or 1)


# Primitives whose jax.vmap batching runs far slower on CPU than separate calls.
_SLOW_BATCHED = ("select_and_scatter_add",)


def _batches_poorly(vjp_fn: Callable, column: jax.Array) -> bool:
    """Whether the jaxpr of ``vjp_fn`` (nested jaxprs included) holds a
    :data:`_SLOW_BATCHED` primitive."""
    text = str(jax.make_jaxpr(vjp_fn)(column))
    return any(name in text for name in _SLOW_BATCHED)


def backpropagate_columns(
    vjp_fn: Callable, columns: jax.Array, groups: int | None = None
) -> dict[int, jax.Array]:
    """Layer-output cotangents (K, ...) of the K output cotangent ``columns``.

    The columns are split into ``groups`` groups of consecutive columns (None: as many as
    the machine has cores, at least two when K > 1; K: one call of ``vjp_fn`` per column, the
    results stacked); each group of several columns is backpropagated by one ``jax.vmap``
    of ``vjp_fn``, and the groups' cotangents are concatenated along K. XLA runs the groups
    side by side, and inside a group the columns share the products (e.g. one matrix product
    of a Dense layer for 5 columns instead of 5), which on 2 cores ran faster than both one
    ``vjp_fn`` call per column and one ``vmap`` over all of them (BackPACK CNN, 9 columns:
    0.87-0.93x the time of the separate calls for the whole ``diag_ggn_exact``, while one
    ``vmap`` took ~1.2x; ``benchmarks/results/curvature.md``, session 5). Beyond
    ``_UNROLL_COLUMNS`` columns, a sequential ``lax.map`` bounds the memory. A VJP holding
    an operation that ``vmap`` batches poorly (:data:`_SLOW_BATCHED`: max-pooling's plain
    transpose, left where the fast mask backward does not apply, e.g. overlapping windows;
    ~2x the time of the whole ``diag_ggn_exact`` of such a CNN in groups) takes one call per
    column."""
    k = columns.shape[0]
    if k > _UNROLL_COLUMNS:
        return jax.lax.map(lambda column: vjp_fn(column)[1], columns)
    groups = min(k, max(2, _default_groups()) if groups is None else max(1, groups))
    if groups < k and _batches_poorly(vjp_fn, columns[0]):
        groups = k
    size = -(-k // groups)
    parts = []
    for start in range(0, k, size):
        group = columns[start : start + size]
        if group.shape[0] == 1:
            parts.append(jax.tree.map(lambda a: a[None], vjp_fn(group[0])[1]))
        else:
            parts.append(jax.vmap(lambda column: vjp_fn(column)[1])(group))
    if len(parts) == 1:
        return parts[0]
    return jax.tree.map(lambda *a: jnp.concatenate(a), *parts)
