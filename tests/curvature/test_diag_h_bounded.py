"""``diag_h`` in bounded memory: the exact fallbacks (one-hot Hessian-vector products, the
residual of leaves no rule covers) against jax.hessian brute force (tests/reference.py), their
compiled memory against ``chunk_size``, the memory budget's error, and leaves of shape () and
(1,)."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from jaxopt_suite import curvature
from jaxopt_suite.curvature import hessian
from tests import reference
from tests.curvature.helpers import init, labels, linen_apply, rand

TOL = dict(atol=1e-5, rtol=1e-5)
fast_jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})
DIAG = ("diag_h", "diag_h_batch")


class Scaled(nn.Module):
    """A Dense output times exp(s): a node of the parameter s alone, not one per sample."""

    shape: tuple[int, ...]

    @nn.compact
    def __call__(self, x):
        s = self.param("s", nn.initializers.zeros, self.shape)
        return jnp.tanh(nn.Dense(3)(x)) * jnp.exp(s)


class GroupNormCNN(nn.Module):
    """GroupNorm's scale and bias have no rule: the residual's per-sample path."""

    @nn.compact
    def __call__(self, x):
        h = nn.Conv(4, (2, 2))(x)
        h = jnp.tanh(nn.GroupNorm(num_groups=2)(h))
        return nn.Dense(3)(h.mean(axis=(1, 2)))


def setup(model, x_shape, n, seed=0):
    x = rand((n, *x_shape), seed + 1)
    return linen_apply(model), init(model, x, seed), x, labels((n,), 3, seed + 2)


def check(apply, params, x, y, **kw):
    """diag_h and diag_h_batch against the per-sample diagonals of jax.hessian (raveled)."""
    fn = curvature.value_and_grad(apply, loss="cross_entropy", quantities=DIAG, **kw)
    extras = fast_jit(fn)(params, x, y)[2]
    want = reference.per_sample(apply, params, x, y, "cross_entropy", hessian=True)
    per_sample = jax.vmap(lambda t: ravel_pytree(t)[0])(extras["diag_h_batch"])
    np.testing.assert_allclose(np.asarray(per_sample), want["hessian_diag"], **TOL)
    total = ravel_pytree(extras["diag_h"])[0]
    np.testing.assert_allclose(np.asarray(total), want["hessian_diag"].sum(0), **TOL)


@pytest.mark.parametrize("shape", [(), (1,)])
def test_scalar_and_one_element_leaves(shape):
    apply, params, x, y = setup(Scaled(shape), (2,), 4)
    params["s"] = jnp.full(shape, 0.3)
    # exp(s) is no site of the elementwise mechanism: the whole model takes the exact fallback
    with pytest.raises(hessian.Unsupported, match="not one per sample"):
        hessian.instrument(apply, (True, False), params, x)
    check(apply, params, x, y, chunk_size=3, config=curvature.EngineConfig(residual_chunk=5))


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(3)(jnp.tanh(nn.Dense(8)(x)))


@pytest.mark.parametrize(
    "model, x_shape, structured",
    [(GroupNormCNN(), (3, 3, 1), True), (MLP(), (2,), False)],
    # GroupNorm: 8 free parameters, 150 residual columns per sample (one JVP per parameter);
    # the MLP on the generic path: 51 free parameters, 8 columns (one VJP per column)
    ids=["forward", "reverse"],
)
def test_residual_of_uncovered_leaves_in_chunks(model, x_shape, structured):
    apply, params, x, y = setup(model, x_shape, 3)
    assert hessian.instrument(apply, (True, False), params, x).sites
    # 2 samples and 5 products at a time: neither divides the batch or the product count
    config = curvature.EngineConfig(residual_chunk=5)
    check(apply, params, x, y, chunk_size=2, config=config, structured=structured)


def temp_bytes(apply, params, x, y, chunk_size):
    # structured=False: every leaf on the per-sample paths, whose steps chunk_size bounds
    fn = curvature.value_and_grad(
        apply, loss="cross_entropy", quantities=("diag_h",), chunk_size=chunk_size, structured=False
    )
    compiled = fast_jit(fn).lower(params, x, y).compile()
    return compiled.memory_analysis().temp_size_in_bytes


@pytest.mark.parametrize(
    "model, x_shape",
    [(Scaled(()), (64,)), (GroupNormCNN(), (12, 12, 1))],
    ids=["hvp_fallback", "residual_per_sample"],
)
def test_chunk_size_bounds_compiled_memory(model, x_shape):
    apply, params, x, y = setup(model, x_shape, 16)
    one, all_at_once = (temp_bytes(apply, params, x, y, c) for c in (1, None))
    # a step holds chunk_size samples' products: 16 times fewer with one sample at a time
    assert one * 4 < all_at_once, (one, all_at_once)


@pytest.mark.parametrize(
    "model, x_shape, what",
    [(Scaled(()), (2,), "one-hot Hessian-vector"), (GroupNormCNN(), (3, 3, 1), "residual")],
)
def test_memory_budget_raises_before_compiling(model, x_shape, what):
    apply, params, x, y = setup(model, x_shape, 4)
    config = curvature.EngineConfig(memory_budget_bytes=1 << 10)
    fn = curvature.value_and_grad(apply, loss="cross_entropy", quantities=DIAG, config=config)
    with pytest.raises(MemoryError, match=rf"(?s){what}.*GiB.*hutchinson_diagonal.*diag_ggn"):
        jax.eval_shape(fn, params, x, y)


def test_peak_bytes_of_a_chain():
    # x -> sin(x) -> 2 sin(x): at the product x, sin(x) and the result are live
    jaxpr = jax.make_jaxpr(lambda x: jnp.sin(x) * 2.0)(jnp.zeros(1000))
    assert hessian.peak_bytes(jaxpr.jaxpr) == 3 * 4000


def test_memory_budget_is_validated():
    with pytest.raises(ValueError, match="memory_budget_bytes"):
        curvature.EngineConfig(memory_budget_bytes=0)
    assert curvature.EngineConfig(memory_budget_bytes=None).memory_budget_bytes is None
