r"""The Conv rule: a ``lax.conv_general_dilated`` in channel-last layout (linen ``nn.Conv``,
nnx ``nnx.Conv``), kernel (*kernel_spatial, C_in / G, C_out), found through its ``lax`` call.

With the input patches :math:`X_n` (P, S·C_in) under the P output positions (:func:`prepare`,
S = prod(kernel_spatial)), the per-(column, sample) kernel gradient is one matrix product per
sample and feature group, :math:`\hat g_{k,n} = X_n^\top \Delta_{k,n}`. Kronecker factors as
BackPACK (checked against ``backpack.extensions.KFLR`` on Conv2d), with the patch index
row-major over ``(*kernel_spatial, C_in)``:

.. math::
   A = \frac1N \sum_{n,q} p_{n,q} p_{n,q}^\top, \qquad
   G = \sum_{k,n} \Big(\sum_q \delta_{k,n,q}\Big)\Big(\sum_q \delta_{k,n,q}\Big)^\top

(positions summed in A but not divided by P; G is the bias's GGN block). Grouped convolutions
get ``None`` for the kernel (BackPACK raises).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

from jaxopt_suite.curvature import kron, layers
from jaxopt_suite.curvature.config import DEFAULT, EngineConfig
from jaxopt_suite.curvature.layers import ConvConfig, LayerCall
from jaxopt_suite.curvature.rules import linear
from jaxopt_suite.curvature.rules.base import STATISTICS, Factors, LayerRule, wide, widened


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


def _sample_chunk(n: int, per_sample_bytes: int, chunk_bytes: int) -> int:
    """Samples per chunk so that one chunk's per-sample gradients fit in ``chunk_bytes``,
    balanced over the chunks (64 samples in chunks of at most 41 become 2 x 32, not 41 + 23
    padded to 2 x 41)."""
    most = max(1, min(n, chunk_bytes // max(per_sample_bytes, 1)))
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
    statistic: str,
    patches: jax.Array,
    delta: jax.Array,
    config: ConvConfig,
    options: EngineConfig = DEFAULT,
) -> jax.Array:
    r"""Statistic of a conv kernel (*kernel_spatial, C_in / G, C_out) from unfolded patches.

    The per-(column, sample) kernel gradient is one matrix product per sample and feature
    group, :math:`\hat g_{k,n} = X_n^\top \Delta_{k,n}` with :math:`X_n` (P, S·C_in/G) the
    patches and :math:`\Delta_{k,n}` (P, C_out/G) the output cotangents over the P output
    positions; the K columns share one product :math:`X_n^\top [\Delta_{1,n} \cdots
    \Delta_{K,n}]`. Chunks of samples are multiplied and reduced (squared, summed over
    columns and, for ``sum_sq``, over samples) in a loop, so no (N, D, K·C_out) buffer is
    formed; only the (small) result is permuted to the kernel's layout. For several columns
    and one feature group, ``sum_sq`` / ``individual_sum_sq`` contract the cotangents in their
    own layout when the positions outnumber the kernel's inputs
    (``options.conv_few_weights``), and a large ``sum_sq`` takes one product per sample
    (``options.per_sample_product``).

    Args:
      statistic: one of :data:`STATISTICS`.
      patches: (N, P, S, C_in) from :func:`prepare`.
      delta: (K, N, *out_spatial, C_out) output cotangents.
      config: the layer's :class:`~jaxopt_suite.curvature.layers.ConvConfig`.
      options: the engine's options.

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
        options.conv_few_weights
        and statistic in ("sum_sq", "individual_sum_sq")
        and groups == 1
        and k > 1
        and positions > s * c_in
        and n * k * s * c_in * c_out * linear.itemsize(patches, delta) <= options.sample_chunk_bytes
    ):
        return _conv_kernel_few_weights(statistic, patches, delta, config)
    if (
        statistic == "sum_sq"
        and groups == 1
        and k > 1
        and s * c_in * k * c_out >= options.per_sample_product
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
        return linear.sum_leading(squares) if statistic == "sum_sq" else squares

    per_sample = groups * s * cg * k * og * linear.itemsize(patches, delta)
    chunk = _sample_chunk(n, per_sample, options.sample_chunk_bytes)
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
    the squares are summed over K."""
    k, n = delta.shape[:2]
    s, c_in = patches.shape[-2:]
    c_out = delta.shape[-1]
    lhs = patches.reshape(n, -1, s * c_in)
    grads = jnp.einsum("knpo,npd->nkdo", delta.reshape(k, n, -1, c_out), lhs)
    squares = jnp.sum(grads * grads, axis=1)  # (N, D, C_out)
    if statistic == "sum_sq":
        return linear.sum_leading(squares).reshape(*config.kernel_spatial, c_in, c_out)
    return squares.reshape(n, *config.kernel_spatial, c_in, c_out)


def _conv_kernel_sum_sq_per_sample(
    patches: jax.Array, delta: jax.Array, config: ConvConfig
) -> jax.Array:
    r""":func:`conv_kernel`'s ``sum_sq`` for K > 1 columns and one feature group, as
    :math:`\sum_{k} \big(\sum_n (\Delta_{k,n}^\top X_n)^{\odot 2}\big)^\top`: a loop over
    the samples takes one 2-D product :math:`[\Delta_{1,n} \cdots \Delta_{K,n}]^\top X_n`
    (K·C_out, P) @ (P, D) per sample and adds its squares elementwise to a (K·C_out, D)
    accumulator; the sum over the K columns (a leading axis, :func:`linear.sum_leading`) and the
    transposition to the kernel's layout happen once, after the loop. Each sample's
    cotangents are sliced from the (K, N, P, C_out) stack and transposed inside the loop
    (no transposed copy of the whole stack)."""
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
    out = linear.sum_leading(acc.reshape(k, c_out, d)).T  # (D, C_out)
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


def prepare(call: LayerCall, x: jax.Array) -> jax.Array:
    """The unfolded patches (N, P, prod(kernel), C_in) of the input ``x`` of ``call``."""
    patches = conv_patches(x, call.conv, call.output.shape[1:-1])
    return patches.reshape(x.shape[0], -1, *patches.shape[-2:])


def kernel_gradients(patches: jax.Array, delta: jax.Array, config: ConvConfig) -> jax.Array:
    """``(K, N, *kernel_spatial, C_in / G, C_out)`` from patches (N, P, S, C_in) and delta
    (K, N, ..., C_out)."""
    k, n = delta.shape[:2]
    groups = config.feature_group_count
    s, c_in = patches.shape[-2:]
    c_out = delta.shape[-1]
    cg, og = c_in // groups, c_out // groups
    lhs = patches.reshape(n, -1, s, groups, cg)  # (N, P, S, G, Cg)
    rhs = delta.reshape(k, n, -1, groups, og)  # (K, N, P, G, Og)
    grads = jnp.einsum("npsgc,knpgo->knscgo", lhs, rhs)
    return grads.reshape(k, n, *config.kernel_spatial, cg, c_out)


def kernel_factors(patches: jax.Array, delta: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(A, G)`` of an ungrouped Conv kernel from patches (N, P, S, C_in) and columns
    (K, N, ..., C_out)."""
    n = patches.shape[0]
    a = kron.outer(patches.reshape(n, patches.shape[1], -1)) / n
    return a, linear.bias_factors(delta)[0]


class ConvRule(LayerRule):
    """Convolutions: statistics, columns and factors of the kernel (from the unfolded
    patches) and the bias; the summed kernel gradient from the same patches."""

    kind = "conv"
    interception = layers.OpInterception(
        linen=(nn.Conv,),
        nnx=(nnx.Conv,),
        attr="conv_general_dilated",
        default=lax.conv_general_dilated,
        wrap=layers.Recorder.conv,
    )
    kfra_link = True

    def prepare(self, call: LayerCall, recorded: jax.Array) -> jax.Array:
        return prepare(call, recorded)

    def statistic(self, statistic, call, role, prepared, delta, config: EngineConfig):
        prepared, delta = widened(prepared, delta)
        if role == "bias":
            return linear.bias_statistic(statistic, delta)
        return conv_kernel(statistic, prepared, delta, call.conv, config)

    def columns(self, call: LayerCall, role, prepared, delta):
        prepared, delta = widened(prepared, delta)
        if role == "bias":
            return linear.bias_gradients(delta)
        return kernel_gradients(prepared, delta, call.conv)

    def kron(self, call: LayerCall, role, prepared, delta) -> Factors:
        prepared, delta = widened(prepared, delta)
        if role == "bias":
            return linear.bias_factors(delta)
        if call.conv.feature_group_count != 1:
            return None
        return kernel_factors(prepared, delta)

    def summed_gradient(self, call, prepared, delta, gradient, config: EngineConfig):
        """:func:`conv_kernel_gradient` for a float32 kernel with one feature group (same value
        as the convolution's VJP up to float32 rounding; XLA then drops the VJP's, which
        nothing else reads) when ``config.kernel_grad_from_patches``; else ``gradient``."""
        if (
            not config.kernel_grad_from_patches
            or call.conv.feature_group_count != 1
            or any(a.dtype != jnp.float32 for a in (prepared, delta, gradient))
        ):
            return gradient
        return conv_kernel_gradient(prepared, delta, call.conv)

    def kfra_supported(self, call: LayerCall) -> bool:
        return call.conv.feature_group_count == 1

    def kfra_input_factor(self, call: LayerCall, prepared: jax.Array) -> jax.Array:
        r"""KFLR's A, :math:`\frac1N \sum_{n,q} p_{n,q} p_{n,q}^\top`."""
        n = prepared.shape[0]
        return kron.outer(wide(prepared).reshape(n, prepared.shape[1], -1)) / n

    def kfra_backpropagate(self, call, kernel, hessian, input_shape) -> jax.Array:
        r""":math:`J^\top \bar H J` with J the convolution's Jacobian on one sample,
        (P·C_out, D_in), from the patches: :math:`z_{q,o} = \sum_{s,c} p_{q,s,c} W_{s,c,o}`."""
        kernel = wide(kernel)
        out_spatial = call.output.shape[1:-1]

        def conv(x):
            patches = conv_patches(x[None], call.conv, out_spatial)
            return patches.reshape(-1, kernel[..., 0].size) @ kernel.reshape(-1, kernel.shape[-1])

        x = jnp.zeros(input_shape[1:], kernel.dtype)
        jac = jax.jacfwd(conv)(x).reshape(hessian.shape[0], -1)
        return jac.T @ hessian @ jac

    def kfra_output_factor(self, call: LayerCall, hessian: jax.Array) -> jax.Array:
        r"""BackPACK's G of a convolution: the output Hessian summed over both position
        indices, :math:`G_{oo'} = \sum_{q,q'} \bar H_{(q,o),(q',o')}`."""
        c = call.output.shape[-1]
        return hessian.reshape(-1, c, hessian.shape[0] // c, c).sum(axis=(0, 2))

    def weighted_sum(self, call: LayerCall, role, prepared, delta, weights, config: EngineConfig):
        r""":math:`\sum_n X_n^\top (w_n \delta_n)` from the patches (one product, as
        :func:`conv_kernel_gradient`); feature groups: the base class's reduction."""
        prepared, delta = wide(prepared), wide(delta)
        if role == "bias":
            return linear.bias_weighted_sum(delta, weights)
        if call.conv.feature_group_count != 1:
            return super().weighted_sum(call, role, prepared, delta, weights, config)
        scaled = linear.per_sample_scaled(delta[:1], weights)[0]
        return conv_kernel_gradient(prepared, scaled, call.conv)


CONV = ConvRule()
