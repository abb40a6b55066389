r"""The Dense rule: :math:`z = x W (+ b)`, kernel (in, out), found through its
``lax.dot_general`` (linen ``nn.Dense``, nnx ``nnx.Linear``).

The per-(column, sample) kernel gradient is :math:`\hat g_{k,n}(W) = \sum_t x_{n,t}
\delta_{k,n,t}^\top` (t: positions of extra axes, T of them). Without extra axes it is never
formed for the statistics: e.g. ``sum_sq`` is :math:`(x^{\odot 2})^\top (\sum_k
\delta_k^{\odot 2})` and ``individual_sq_norm`` is :math:`\|x_n\|^2 \|\delta_n\|^2`. Kronecker
factors (:mod:`jaxopt_suite.curvature.kron`):

.. math::
   A = \frac{1}{NT} \sum_{n,t} x_{n,t} x_{n,t}^\top, \qquad
   G = \sum_{k,n,t} \delta_{k,n,t} \delta_{k,n,t}^\top .
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

from jaxopt_suite.curvature import kron, layers
from jaxopt_suite.curvature.config import EngineConfig
from jaxopt_suite.curvature.layers import LayerCall
from jaxopt_suite.curvature.rules import linear
from jaxopt_suite.curvature.rules.base import Factors, LayerRule, wide, widened


def positions(x: jax.Array, delta: jax.Array) -> tuple[jax.Array, jax.Array]:
    """x (N, ..., in) -> (N, T, in); delta (K, N, ..., out) -> (K, N, T, out)."""
    n = x.shape[0]
    return x.reshape(n, -1, x.shape[-1]), delta.reshape(delta.shape[0], n, -1, delta.shape[-1])


def kernel_gradients(x: jax.Array, delta: jax.Array) -> jax.Array:
    """``(K, N, in, out)``: :math:`\\sum_t x_{n,t} \\delta_{k,n,t}^\\top` for x (N, ..., in)
    and delta (K, N, ..., out)."""
    x, delta = positions(x, delta)
    k = delta.shape[0]
    if x.shape[1] == 1:
        # One outer product per (column, sample), written straight into the (K, N, in, out)
        # result: as a product with N as its batch axis XLA returned (N, in, K, out) and then
        # transposed it, a second pass over the largest array of the quantity.
        return x[None, :, 0, :, None] * delta[:, :, 0, None, :]
    # (K, N) both batch axes of the product, so that it comes out in the result's layout.
    return jnp.einsum("knti,knto->knio", jnp.broadcast_to(x, (k, *x.shape)), delta)


def kernel_statistic(statistic: str, x: jax.Array, delta: jax.Array) -> jax.Array:
    """Statistic of the kernel (in, out) of ``z = x W``; see the module docstring."""
    x, delta = positions(x, delta)
    t, d_in = x.shape[1:]
    d_out = delta.shape[-1]
    if t == 1:
        x, delta = x[:, 0], delta[:, :, 0]
        if statistic == "individual":
            return jnp.einsum("ni,no->nio", x, delta[0])
        if statistic == "individual_sq_norm":
            return jnp.sum(x**2, axis=-1) * jnp.sum(delta[0] ** 2, axis=-1)
        delta_sq = linear.sum_leading(delta**2)
        if statistic == "sum_sq":
            return jnp.einsum("ni,no->io", x**2, delta_sq)
        if statistic == "individual_sum_sq":
            return jnp.einsum("ni,no->nio", x**2, delta_sq)
    elif statistic == "individual_sq_norm" and t * t * (d_in + d_out) < d_in * d_out:
        # ||sum_t x_t d_t^T||^2 = sum_{t,s} (x_t . x_s)(d_t . d_s): Gram matrices, no N x in x out.
        gram_x = jnp.einsum("nti,nsi->nts", x, x)
        gram_d = jnp.einsum("nto,nso->nts", delta[0], delta[0])
        return jnp.sum(gram_x * gram_d, axis=(1, 2))
    return linear.reduce_individual(statistic, jnp.einsum("nti,knto->knio", x, delta))


def kernel_factors(x: jax.Array, delta: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(A, G)`` of a Dense kernel from inputs (N, ..., in) and columns (K, N, ..., out)."""
    rows = x.reshape(-1, x.shape[-1]).shape[0]
    return kron.outer(x) / rows, kron.outer(delta)


class DenseRule(LayerRule):
    """Dense layers: statistics, columns and factors of the kernel and the bias."""

    kind = "dense"
    interception = layers.OpInterception(
        linen=(nn.Dense,),
        nnx=(nnx.Linear,),
        attr="dot_general",
        default=lax.dot_general,
        wrap=layers.Recorder.dense,
    )
    kfra_link = True

    def statistic(self, statistic, call, role, prepared, delta, config: EngineConfig):
        prepared, delta = widened(prepared, delta)
        if role == "bias":
            return linear.bias_statistic(statistic, delta)
        return kernel_statistic(statistic, prepared, delta)

    def columns(self, call: LayerCall, role, prepared, delta):
        prepared, delta = widened(prepared, delta)
        if role == "bias":
            return linear.bias_gradients(delta)
        return kernel_gradients(prepared, delta)

    def kron(self, call: LayerCall, role, prepared, delta) -> Factors:
        prepared, delta = widened(prepared, delta)
        if role == "bias":
            return linear.bias_factors(delta)
        return kernel_factors(prepared, delta)

    def weighted_sum(self, call: LayerCall, role, prepared, delta, weights, config: EngineConfig):
        r""":math:`\sum_{n,t} x_{n,t} (w_n \delta_{n,t})^\top`: one product, as the gradient."""
        prepared, delta = wide(prepared), wide(delta)
        if role == "bias":
            return linear.bias_weighted_sum(delta, weights)
        x, scaled = positions(prepared, linear.per_sample_scaled(delta[:1], weights))
        return jnp.einsum("nti,nto->io", x, scaled[0])

    def kfra_supported(self, call: LayerCall) -> bool:
        return len(call.output.shape) == 2

    def kfra_input_factor(self, call: LayerCall, prepared: jax.Array) -> jax.Array:
        x = wide(prepared)
        return x.T @ x / x.shape[0]

    def kfra_backpropagate(self, call, kernel, hessian, input_shape) -> jax.Array:
        r""":math:`W \bar H W^\top` for the kernel W (in, out)."""
        kernel = wide(kernel)
        return kernel @ hessian @ kernel.T


DENSE = DenseRule()
