"""What the curvature tests share: tolerances, the brute-force comparison of every exact
quantity (:func:`check_all`, against ``tests/reference.py``), parameter and data helpers."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxopt_suite import curvature
from tests import reference
from tests.reference import random_like

TOL = dict(atol=1e-5, rtol=1e-5)
EXACT = (
    "grad_batch",
    "batch_l2",
    "sum_grad_squared",
    "variance",
    "diag_ggn_exact",
    "diag_ggn_exact_batch",
)


def huber_one(out, y):  # a user's loss, strictly convex
    r = out - y
    return jnp.sum(jnp.sqrt(1.0 + r**2) - 1.0 + 0.1 * r**2)


def assert_tree_close(a, b, **tol):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(u), np.asarray(v), **(tol or TOL))


def check_all(apply_fn, params, x, y, loss, reduction="mean", expect=None, generic=False, **kw):
    """The structured path (and the generic one when ``generic``) against brute force, for
    every exact quantity."""
    want = reference.quantities(apply_fn, params, x, y, loss, reduction)
    if expect is not None:
        kinds = jax.tree.leaves(curvature.coverage(apply_fn, params, x))
        assert sorted(set(kinds)) == sorted(expect), kinds
    for structured in (True, False) if generic else (True,):
        fn = curvature.value_and_grad(
            apply_fn, loss=loss, reduction=reduction, quantities=EXACT, structured=structured, **kw
        )
        value, grads, extras = jax.jit(fn)(params, x, y)
        np.testing.assert_allclose(value, want["value"], **TOL)
        assert_tree_close(grads, want["grad"])
        for name in EXACT:
            assert_tree_close(extras[name], want[name])


def linen_apply(model):
    return lambda p, x: model.apply({"params": p}, x)


def init(model, x, seed=0):
    """Parameters shaped by ``model.init`` but drawn with numpy (flax's initializers take
    seconds to compile, which would dominate these tiny tests)."""
    shapes = jax.eval_shape(model.init, jax.random.key(seed), x)["params"]
    return random_like(shapes, seed)


def rand(shape, seed=1):
    return jax.random.normal(jax.random.key(seed), shape)


def labels(shape, classes, seed=2):
    return jax.random.randint(jax.random.key(seed), shape, 0, classes)


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(3)(nn.tanh(nn.Dense(4)(x)))
