r"""Cheaper backward passes for the engine's own trace: convolutions and max-pooling.

The engine backpropagates the gradient and every loss-Hessian column (10 for
``diag_ggn_exact`` with 10 classes) through the model. On XLA:CPU two backward operations
dominate that work on convolutional networks: a convolution's input cotangent (a transposed
convolution) and max-pooling's transpose (``select_and_scatter_add``). Inside the engine's
trace only (:func:`jaxopt_suite.curvature.layers.recording` with ``fast=True``; the
convolution's only with ``EngineConfig.banded_conv_cotangent``), both are
replaced by :func:`jax.custom_vjp` wrappers whose forward is the user's operation, unchanged
bit for bit, and whose backward computes the same cotangents another way:

* **max-pooling** with non-overlapping windows (strides = window, no padding, no dilation):
  the forward stores which entry of each window is its (first) maximum, the entry
  ``select_and_scatter_add`` picks (ties go to the first entry in row-major window order);
  the backward is that mask times the upsampled cotangent,
  :math:`\bar x = m \odot \mathrm{up}(\bar y)`.
* **convolution** (2-D, stride 1, no dilation, one feature group, non-negative padding): the
  input cotangent as matrix products along the width, with the kernel unrolled into banded
  (Toeplitz) blocks, then a sum of ``kh`` row-shifted slices:

  .. math::
     \bar x^{\mathrm{pad}}_{n, r + a, u, c} \mathrel{+}= \sum_{q, o} \bar z_{n, r, q, o}\,
     W_{a, u - q, c, o} \quad (0 \le u - q < k_w),

  cropped to the unpadded input. Other convolutions keep ``jax.vjp`` of the convolution; the
  kernel cotangent always does (the engine replaces the gradient's by a product of its
  patches, :func:`jaxopt_suite.curvature.rules.conv_kernel_gradient`, and XLA drops this one).

Forward-mode differentiation of these wrappers is not defined (``custom_vjp``), so the engine
uses them only in its reverse-mode pass, never in the Hessian-residual or KFRA traces.
"""

from __future__ import annotations

import contextlib
import itertools
import math
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

if TYPE_CHECKING:
    from jaxopt_suite.curvature.layers import ConvConfig

# Largest unrolled kernel block (entries) of the banded product; beyond it: jax.vjp.
_MAX_BAND_ENTRIES = 1 << 22


# --- convolution --------------------------------------------------------------------------


def band_supported(
    config: ConvConfig, lhs_shape: Sequence[int], kernel_shape: Sequence[int]
) -> bool:
    """Whether :func:`conv_input_cotangent` handles this convolution (channel-last layout):
    2-D, stride 1, no input or kernel dilation, one feature group, padding >= 0, and an
    unrolled kernel block of at most ``_MAX_BAND_ENTRIES`` entries."""
    if len(config.kernel_spatial) != 2 or config.feature_group_count != 1:
        return False
    if any(s != 1 for s in (*config.window_strides, *config.lhs_dilation, *config.rhs_dilation)):
        return False
    if any(lo < 0 or hi < 0 for lo, hi in config.padding):
        return False
    kh, kw, c_in, c_out = kernel_shape
    width = lhs_shape[2] + sum(config.padding[1])
    if width < kw or lhs_shape[1] + sum(config.padding[0]) < kh:
        return False
    block = _block_width(width - kw + 1, kw)
    return (block + kw - 1) * c_out * kh * block * c_in <= _MAX_BAND_ENTRIES


def _block_width(out_width: int, kw: int) -> int:
    """Output columns per banded block: about two kernel widths (fewer zero products than one
    band over the whole width, few enough blocks to keep the products large)."""
    padded = out_width + kw - 1
    blocks = max(1, math.ceil(padded / (2 * kw)))
    return math.ceil(padded / blocks)


def conv_input_cotangent(
    cotangent: jax.Array,
    kernel: jax.Array,
    config: ConvConfig,
    lhs_shape: Sequence[int],
    precision: Any = None,
) -> jax.Array:
    r"""Input cotangent of a 2-D stride-1 convolution by banded matrix products.

    For :math:`z_{n,p,q,o} = \sum_{a,b,c} x^{\mathrm{pad}}_{n,p+a,q+b,c} W_{a,b,c,o}`:

    .. math::
       \bar x^{\mathrm{pad}}_{n,p+a,u,c} \mathrel{+}= \sum_{q,o} \bar z_{n,p,q,o}
       W_{a,u-q,c,o}\,[0 \le u - q < k_w],

    computed per block of output columns :math:`u` as one product of the cotangent columns
    that reach the block with the kernel unrolled into a banded block
    ((columns·C_out) × (k_h·block·C_in)); the :math:`k_h` row offsets are then summed as
    shifted slices, and the padding is cropped. Same value as ``jax.vjp`` of
    ``lax.conv_general_dilated`` w.r.t. its input, up to float rounding; the products
    accumulate in float32 for bfloat16/float16 operands and return the cotangent's dtype.

    Args:
      cotangent: :math:`\bar z` (N, P, Q, C_out), channel-last.
      kernel: W (k_h, k_w, C_in, C_out).
      config: the call's :class:`~jaxopt_suite.curvature.layers.ConvConfig`; must satisfy
        :func:`band_supported`.
      lhs_shape: the input's shape (N, H, W, C_in).
      precision: the call's ``precision`` (passed to the products).

    Returns:
      :math:`\bar x`, shape ``lhs_shape``, in the cotangent's dtype.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from jaxopt_suite.curvature.layers import ConvConfig
      >>> cfg = ConvConfig((3, 3), (1, 1), ((0, 0), (0, 0)), (1, 1), (1, 1), 1)
      >>> ct, w = jnp.ones((2, 4, 4, 5)), jnp.ones((3, 3, 2, 5))
      >>> conv_input_cotangent(ct, w, cfg, (2, 6, 6, 2)).shape
      (2, 6, 6, 2)
    """
    if not band_supported(config, lhs_shape, kernel.shape):
        raise ValueError(f"config: not a convolution the banded product handles: {config}")
    kh, kw, c_in, c_out = kernel.shape
    n, rows, cols, _ = cotangent.shape
    (top, _), (left, _) = config.padding
    padded_cols = cols + kw - 1
    acc = jnp.promote_types(jnp.result_type(cotangent, kernel), jnp.float32)
    block = _block_width(cols, kw)
    flat = cotangent.reshape(n * rows, cols, c_out)
    pieces = []
    for u0 in range(0, padded_cols, block):
        u1 = min(u0 + block, padded_cols)
        q0, q1 = max(0, u0 - kw + 1), min(cols, u1)
        # band[q, u] = tap u - q of the kernel's width (zero outside 0 <= u - q < kw)
        tap = np.arange(u0, u1)[None, :] - np.arange(q0, q1)[:, None]
        valid = (tap >= 0) & (tap < kw)
        unrolled = kernel[:, np.clip(tap, 0, kw - 1)]  # (kh, q, u, C_in, C_out)
        unrolled = jnp.where(valid[None, :, :, None, None], unrolled, jnp.zeros((), kernel.dtype))
        unrolled = unrolled.transpose(1, 4, 0, 2, 3).reshape((q1 - q0) * c_out, -1)
        lhs = flat[:, q0:q1].reshape(n * rows, -1)
        product = jnp.matmul(lhs, unrolled, precision=precision, preferred_element_type=acc)
        pieces.append(product.reshape(n, rows, kh, u1 - u0, c_in))
    wide = pieces[0] if len(pieces) == 1 else jnp.concatenate(pieces, axis=3)
    total = None
    for a in range(kh):
        shifted = jnp.pad(wide[:, :, a], ((0, 0), (a, kh - 1 - a), (0, 0), (0, 0)))
        total = shifted if total is None else total + shifted
    _, height, width, _ = lhs_shape
    return total[:, top : top + height, left : left + width].astype(cotangent.dtype)


def fast_conv(
    op: Callable,
    config: ConvConfig | None,
    lhs: jax.Array,
    rhs: jax.Array,
    args: tuple,
    kwargs: dict,
) -> jax.Array:
    """``op(lhs, rhs, *args, **kwargs)`` with :func:`conv_input_cotangent` as the input's
    backward when ``op`` is ``lax.conv_general_dilated`` on a supported config (else the
    plain call). The forward value is the plain call's, bit for bit."""
    if (
        op is not lax.conv_general_dilated
        or config is None
        or lhs.ndim != 4
        or not band_supported(config, lhs.shape, rhs.shape)
        or kwargs.get("preferred_element_type") is not None
    ):
        return op(lhs, rhs, *args, **kwargs)
    precision = kwargs.get("precision")

    @jax.custom_vjp
    def conv(x, w):
        return op(x, w, *args, **kwargs)

    def forward(x, w):
        return conv(x, w), (x, w)

    def backward(saved, ct):
        x, w = saved
        ct_x = conv_input_cotangent(ct, w, config, x.shape, precision).astype(x.dtype)
        ct_w = jax.vjp(lambda w: op(x, w, *args, **kwargs), w)[1](ct)[0]
        return ct_x, ct_w

    conv.defvjp(forward, backward)
    return conv(lhs, rhs)


# --- max-pooling --------------------------------------------------------------------------


def _pool_windows(
    operand: Any,
    init_value: Any,
    computation: Any,
    window_dimensions: Sequence[int],
    window_strides: Sequence[int],
    padding: Any,
    base_dilation: Any,
    window_dilation: Any,
) -> tuple[int, ...] | None:
    """The window of a non-overlapping max-pooling ``lax.reduce_window`` call, or None."""
    if computation is not lax.max or not isinstance(operand, jax.Array):
        return None
    if not jnp.issubdtype(operand.dtype, jnp.floating):
        return None
    try:
        if float(init_value) != -np.inf:
            return None
    except (TypeError, jax.errors.ConcretizationTypeError):
        return None
    window = tuple(int(w) for w in window_dimensions)
    if len(window) != operand.ndim or tuple(int(s) for s in window_strides) != window:
        return None
    for dilation in (base_dilation, window_dilation):
        if dilation is not None and any(int(d) != 1 for d in dilation):
            return None
    if isinstance(padding, str):
        padding = lax.padtype_to_pads(operand.shape, window, window, padding)
    if any(int(lo) != 0 or int(hi) != 0 for lo, hi in padding):
        return None
    if any(size < w for size, w in zip(operand.shape, window, strict=True)):
        return None
    return window


def first_max_mask(x: jax.Array, y: jax.Array, window: Sequence[int]) -> jax.Array:
    r"""Where each non-overlapping window of ``x`` has its first maximum.

    .. math:: m_i = [x_i = y_{w(i)}] \prod_{j \prec i,\ j \in w(i)} [x_j \ne y_{w(i)}]

    (:math:`\prec`: row-major order inside the window), the entry ``select_and_scatter_add``
    (max-pooling's transpose in JAX) sends each window's cotangent to. Windows holding NaN have
    no entry equal to their maximum and get no cotangent.

    Args:
      x: the pooling input, each axis at least its window.
      y: the pooled output (``x``'s shape divided by ``window``, rounded down).
      window: the window (= strides) per axis.

    Returns:
      A 0/1 array in ``x``'s dtype shaped ``(y.shape[0], window[0], y.shape[1], ...)``.
    """
    interleaved = [d for pair in zip(y.shape, window, strict=True) for d in pair]
    x = x[tuple(slice(0, s * w) for s, w in zip(y.shape, window, strict=True))]
    x = x.reshape(interleaved)
    top = y.reshape([d for s in y.shape for d in (s, 1)])
    pooled = [i for i, w in enumerate(window) if w > 1]
    taken = None
    picks = {}
    for offset in itertools.product(*(range(window[i]) for i in pooled)):
        index = [slice(None)] * x.ndim
        for axis, o in zip(pooled, offset, strict=True):
            index[2 * axis + 1] = slice(o, o + 1)
        hit = x[tuple(index)] == top
        picks[offset] = hit if taken is None else hit & ~taken
        taken = hit if taken is None else taken | hit

    def assemble(level: int, prefix: tuple[int, ...]) -> jax.Array:
        if level == len(pooled):
            return picks[prefix]
        parts = [assemble(level + 1, (*prefix, o)) for o in range(window[pooled[level]])]
        return jnp.concatenate(parts, axis=2 * pooled[level] + 1)

    return assemble(0, ()).astype(x.dtype)


def fast_max_pool(
    original: Callable, window: tuple[int, ...], operand: jax.Array, *args
) -> jax.Array:
    """``original(operand, *args)`` (a max-pooling ``lax.reduce_window``) whose backward is
    :func:`first_max_mask` times the upsampled cotangent."""

    @jax.custom_vjp
    def pool(x):
        return original(x, *args)

    def forward(x):
        y = original(x, *args)
        return y, first_max_mask(x, y, window)

    def backward(mask, ct):
        spread = ct.reshape([d for s in ct.shape for d in (s, 1)]) * mask
        grad = spread.reshape([s * w for s, w in zip(ct.shape, window, strict=True)])
        pads = [(0, size - g, 0) for size, g in zip(operand.shape, grad.shape, strict=True)]
        return (lax.pad(grad, jnp.zeros((), grad.dtype), pads),)

    pool.defvjp(forward, backward)
    return pool(operand)


_ORIGINAL_REDUCE_WINDOW = lax.reduce_window


def _reduce_window(
    operand,
    init_value,
    computation,
    window_dimensions,
    window_strides,
    padding,
    base_dilation=None,
    window_dilation=None,
):
    args = (
        init_value,
        computation,
        window_dimensions,
        window_strides,
        padding,
        base_dilation,
        window_dilation,
    )
    window = _pool_windows(operand, *args)
    if window is None:
        return _ORIGINAL_REDUCE_WINDOW(operand, *args)
    return fast_max_pool(_ORIGINAL_REDUCE_WINDOW, window, operand, *args)


@contextlib.contextmanager
def patched_pooling() -> Iterator[None]:
    """Routes ``jax.lax.reduce_window`` (what ``flax.linen.max_pool`` / ``nnx.max_pool`` call)
    through :func:`fast_max_pool` for non-overlapping max-pooling while the block runs; every
    other call goes to the original unchanged. Process-wide while the block runs: only meant
    around the tracing of a pure function."""
    old = lax.reduce_window
    lax.reduce_window = _reduce_window
    try:
        yield
    finally:
        lax.reduce_window = old
