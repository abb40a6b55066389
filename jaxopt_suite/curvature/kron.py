r"""Kronecker factors (``kfac``, ``kflr``, ``kfra``): conventions and the shared products.

The rules compute the factors of their leaves (:mod:`jaxopt_suite.curvature.rules`) with
:func:`outer`; KFRA's G is in :mod:`jaxopt_suite.curvature.kfra`.

Dense kernel :math:`W` (flax's ``(in, out)`` layout, vectorised row-major), inputs
:math:`x_{n,t}` (t: positions of extra axes, T of them) and backpropagated columns
:math:`s_{k,n,t}` (exact for ``kflr``, Monte Carlo for ``kfac``):

.. math::
   A = \frac{1}{NT} \sum_{n,t} x_{n,t} x_{n,t}^\top, \qquad
   G = \sum_{k,n,t} s_{k,n,t} s_{k,n,t}^\top, \qquad G_W \approx A \otimes G,

exactly :func:`jaxopt_suite.kronecker.dense_kronecker_factors` (equal to the GGN block for
N = T = 1). The bias gets ``(G_b,)`` with :math:`G_b = \sum_{k,n} (\sum_t s_{k,n,t})(\sum_t
s_{k,n,t})^\top`, its exact GGN block (the same G when T = 1).

Conv kernel ``(*kernel_spatial, C_in, C_out)``, as BackPACK (checked against
``backpack.extensions.KFLR`` on Conv2d): with the unfolded input patches :math:`p_{n,q}`
(P output positions; the patch index row-major over ``(*kernel_spatial, C_in)``, the kernel's
own layout, where PyTorch's unfold is ``(C_in, *kernel)``),

.. math::
   A = \frac1N \sum_{n,q} p_{n,q} p_{n,q}^\top, \qquad
   G = \sum_{k,n} \Big(\sum_q s_{k,n,q}\Big)\Big(\sum_q s_{k,n,q}\Big)^\top

(positions summed in A but not divided by P; G is the bias's GGN block). Grouped
convolutions get ``None`` for the kernel (BackPACK raises).

KFRA replaces G by the batch-averaged Hessian backpropagated through the model
(:mod:`jaxopt_suite.curvature.kfra`; for a Conv layer summed over both position indices, as
BackPACK).

Leaves no rule covers: 1-D leaves get ``(B,)`` with B their exact GGN block
:math:`\sum_{k,n} \hat g_{k,n} \hat g_{k,n}^\top` (``kfac``/``kflr``; the generic path, so the
same as the bias rule); any other leaf, and every uncovered leaf for ``kfra``, gets ``None``
(``jaxopt_suite.kronecker.scale_by_kronecker`` passes those updates through).
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp

Factors = tuple[jax.Array, ...] | None


# Symmetric products of side d >= 1.5 x this (contracting at least this many rows) are formed
# in square blocks of about this width, only on and above the diagonal, the rest
# mirrored: 10 of 16 block products for d = 1024; below it the plain product is faster.
_SYMMETRIC_BLOCK = 256


def symmetric_dot(a: jax.Array, b: jax.Array, block: int = _SYMMETRIC_BLOCK) -> jax.Array:
    r"""The product :math:`a^\top b` of two (r, d) matrices when it is known to be symmetric.

    .. math:: (a^\top b)_{IJ} = a_{:,I}^\top b_{:,J} \ (I \le J), \qquad
              (a^\top b)_{JI} = (a^\top b)_{IJ}^\top

    over column blocks I, J of width about ``block``: only the blocks on and above the
    diagonal are multiplied, those below are their transposes. Computed in the promoted
    dtype of ``a`` and ``b`` (callers widen bfloat16 to float32 first).

    Args:
      a, b: (r, d) arrays with :math:`a^\top b` symmetric (e.g. ``b = a``, or
        ``a = (K M)^\top``, ``b = K^\top`` for a symmetric M).
      block: target block width; fewer than two blocks (d < 1.5 block) or r < block: one
        plain product.

    Returns:
      The (d, d) product.

    Example:
      >>> a = jnp.arange(12.0).reshape(3, 4)
      >>> bool(jnp.allclose(symmetric_dot(a, a, block=2), a.T @ a))
      True
    """
    rows, d = a.shape
    if a.shape != b.shape:
        raise ValueError(f"symmetric_dot needs a and b of one shape; got {a.shape} and {b.shape}")
    count = round(d / block)
    if count < 2 or rows < block:
        return a.T @ b
    edges = [round(i * d / count) for i in range(count + 1)]
    cols = list(itertools.pairwise(edges))
    upper = {
        (i, j): a[:, lo_i:hi_i].T @ b[:, lo_j:hi_j]
        for i, (lo_i, hi_i) in enumerate(cols)
        for j, (lo_j, hi_j) in enumerate(cols)
        if j >= i
    }
    return jnp.block(
        [[upper[i, j] if j >= i else upper[j, i].T for j in range(count)] for i in range(count)]
    )


def outer(a: jax.Array) -> jax.Array:
    """:math:`\\sum_r a_r a_r^\\top` over all leading axes of ``a`` (..., d) -> (d, d); in the
    accumulation dtype of ``a`` promoted to at least float32 (:func:`symmetric_dot`)."""
    a = a.reshape(-1, a.shape[-1])
    a = a.astype(jnp.promote_types(a.dtype, jnp.float32))
    return symmetric_dot(a, a)


def generic_factors(columns: jax.Array, leaf: jax.Array) -> Factors:
    """``(B,)`` for a 1-D leaf from its per-(column, sample) gradients (K, N, d); else None."""
    if jnp.ndim(leaf) != 1:
        return None
    return (outer(columns),)
