"""KFRA on convolutions against an independent computation: BackPACK's recursion of the
batch-averaged Hessian written out with per-sample Jacobians from jax.jacrev, the loss Hessian
from jax.hessian, and the convolution from lax.conv_general_dilated."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from jaxopt_suite import curvature
from tests.curvature.helpers import init, labels, linen_apply, rand
from tests.reference import cross_entropy_one as ce_one

TOL = dict(atol=1e-5, rtol=1e-5)
fast_jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})


class OneConv(nn.Module):
    """A 1-D convolution whose flattened output is the logits."""

    @nn.compact
    def __call__(self, x):
        z = nn.Conv(3, (2,), padding="VALID")(x)
        return z.reshape(z.shape[0], -1)


class ConvChain(nn.Module):
    """Conv - ReLU - max-pool - Conv - tanh - flatten - Dense."""

    @nn.compact
    def __call__(self, x):
        h = nn.max_pool(nn.relu(nn.Conv(3, (2, 2), padding="VALID")(x)), (2, 2), (2, 2))
        h = jnp.tanh(nn.Conv(2, (2, 2), padding="SAME")(h))
        return nn.Dense(3)(h.reshape(h.shape[0], -1))


class Grouped(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.Conv(2, (2, 2), feature_group_count=2)(x)
        return nn.Dense(3)(h.reshape(h.shape[0], -1))


def kfra(apply, params, x, y):
    fn = curvature.value_and_grad(apply, loss="cross_entropy", quantities=("kfra", "kflr"))
    return fast_jit(fn)(params, x, y)[2]


def output_hessian(out, y):
    """:math:`\\sum_n c \\nabla^2 \\ell_n` for the mean cross-entropy, by jax.hessian."""
    return jax.vmap(jax.hessian(ce_one))(out, y).sum(0) / out.shape[0]


def conv(x, kernel, padding):
    return lax.conv_general_dilated(
        x, kernel, (1,) * (x.ndim - 2), padding, dimension_numbers=_channels_last(x.ndim)
    )


def _channels_last(ndim):
    spatial = "DHW"[3 - (ndim - 2) :]
    return (f"N{spatial}C", f"{spatial}IO", f"N{spatial}C")


def spatial_sum(h, channels):
    """BackPACK's conv G: the (P·C, P·C) Hessian summed over both position indices."""
    return h.reshape(-1, channels, h.shape[0] // channels, channels).sum(axis=(0, 2))


def averaged(fn, z, h):
    """:math:`\\frac1N \\sum_n J_n^\\top H J_n` with :math:`J_n` the Jacobian of ``fn`` (one
    sample, flattened output) at :math:`z_n`."""
    jac = jax.vmap(jax.jacrev(lambda zn: fn(zn).reshape(-1)))(z)
    jac = jac.reshape(z.shape[0], jac.shape[1], -1)
    return jnp.einsum("nai,ab,nbj->ij", jac, h, jac) / z.shape[0]


def test_single_conv_g_is_the_spatially_summed_output_hessian():
    model = OneConv()
    x, y = rand((3, 5, 2)), labels((3,), 12)
    apply, params = linen_apply(model), init(model, x)
    extras = kfra(apply, params, x, y)
    g = spatial_sum(output_hessian(apply(params, x), y), 3)
    a, g_kernel = extras["kfra"]["Conv_0"]["kernel"]
    np.testing.assert_allclose(g_kernel, g, **TOL)
    np.testing.assert_allclose(extras["kfra"]["Conv_0"]["bias"][0], g, **TOL)
    np.testing.assert_allclose(a, extras["kflr"]["Conv_0"]["kernel"][0], **TOL)


def test_conv_chain_against_the_recursion_by_autodiff():
    model = ConvChain()
    x, y = rand((3, 5, 5, 1)), labels((3,), 3)
    apply, params = linen_apply(model), init(model, x)
    extras = kfra(apply, params, x, y)

    @fast_jit
    def by_hand(params, x, y):
        p0, p1, p2 = (params[k] for k in ("Conv_0", "Conv_1", "Dense_0"))
        z0 = conv(x, p0["kernel"], "VALID")
        pool = lambda z: nn.max_pool(jax.nn.relu(z + p0["bias"]), (2, 2), (2, 2))
        h0 = jax.vmap(lambda z: pool(z[None])[0])(z0)
        z1 = conv(h0, p1["kernel"], "SAME")
        h1 = jnp.tanh(z1 + p1["bias"]).reshape(3, -1)
        out = h1 @ p2["kernel"] + p2["bias"]
        g2 = output_hessian(out, y)
        g1_full = averaged(
            lambda z: jnp.tanh(z + p1["bias"]), z1, p2["kernel"] @ g2 @ p2["kernel"].T
        )
        into = jax.jacrev(lambda h: conv(h[None], p1["kernel"], "SAME")[0].reshape(-1))(h0[0])
        into = into.reshape(g1_full.shape[0], -1)  # conv1's Jacobian in its input (linear)
        g0_full = averaged(lambda z: pool(z[None])[0], z0, into.T @ g1_full @ into)
        return g2, spatial_sum(g1_full, 2), spatial_sum(g0_full, 3)

    g2, g1, g0 = by_hand(params, x, y)
    got = extras["kfra"]
    for name, g in (("Dense_0", g2), ("Conv_1", g1), ("Conv_0", g0)):
        np.testing.assert_allclose(got[name]["kernel"][1], g, **TOL)
        np.testing.assert_allclose(got[name]["bias"][0], g, **TOL)
        np.testing.assert_allclose(got[name]["kernel"][0], extras["kflr"][name]["kernel"][0])


def test_grouped_conv_is_refused():
    model = Grouped()
    x, y = rand((2, 3, 3, 2)), labels((2,), 3)
    apply, params = linen_apply(model), init(model, x)
    fn = curvature.value_and_grad(apply, loss="cross_entropy", quantities=("kfra",))
    with pytest.raises(ValueError, match=r"kfra needs.*conv layer"):
        jax.eval_shape(fn, params, x, y)
