"""Zeroth-order (SPSA) estimates: the forward-gradient estimate of the same directions on a
quadratic (where the central difference is exact), the closed-form O(epsilon^2) term on a
cubic, and the optax transformation."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxopt_suite import fwdgrad

A = jnp.asarray(np.random.default_rng(0).normal(size=(4, 4)), jnp.float32)
X0 = jnp.asarray([0.5, -1.0, 0.3, 0.8], jnp.float32)


def quadratic(x, w):
    return 0.5 * x @ A @ A.T @ x + jnp.sum(w * x) + jnp.sum(w**2)


@pytest.mark.parametrize("distribution", ["rademacher", "normal"])
def test_spsa_is_the_forward_gradient_on_a_quadratic(distribution):
    w = jnp.asarray([0.1, 0.2, -0.3, 0.4], jnp.float32)
    options = {"num_directions": 3, "distribution": distribution}
    spsa = fwdgrad.value_and_spsa_grad(quadratic, (0, 1), epsilon=0.1, **options)
    fwd = fwdgrad.value_and_forward_grad(quadratic, (0, 1), batching="scan", **options)
    for seed in range(3):
        key = jax.random.key(seed)
        (value, est), (fwd_value, fwd_est) = spsa(key, X0, w), fwd(key, X0, w)
        np.testing.assert_allclose(value, fwd_value, rtol=1e-6)
        for a, b in zip(est, fwd_est, strict=True):
            np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-4)


def test_spsa_bias_on_a_cubic_is_the_closed_form():
    """f = sum(x^3) / 3: the quotient is grad f . v + (eps^2 / 3) sum(v^3) exactly."""
    eps = 0.1
    g = fwdgrad.spsa_grad(lambda x: jnp.sum(x**3) / 3, epsilon=eps)
    key = jax.random.key(4)
    v = fwdgrad.random_direction(jax.random.split(key, 1)[0], (X0,), "rademacher")[0]
    expected = (jnp.sum(X0**2 * v) + eps**2 / 3 * jnp.sum(v**3)) * v
    np.testing.assert_allclose(g(key, X0), expected, rtol=1e-4, atol=1e-4)


def test_spsa_gradient_transform_trains_and_guards():
    tx = optax.chain(fwdgrad.spsa_gradient(jax.random.key(0), num_directions=2), optax.sgd(0.05))
    loss = lambda p: jnp.sum((p - 1.0) ** 2)
    params = jnp.zeros(4)
    state = tx.init(params)

    @jax.jit
    def step(params, state):
        updates, state = tx.update(jnp.zeros(4), state, params, value_fn=loss)
        return optax.apply_updates(params, updates), state

    for _ in range(100):
        params, state = step(params, state)
    assert loss(params) < 1e-2 * loss(jnp.zeros(4))
    updates, state = tx.update(jnp.zeros(4), state, params, value_fn=lambda p: jnp.nan * p[0])
    assert np.all(updates == 0) and int(state[0].nonfinite) == 1
    with pytest.raises(ValueError, match="value_fn"):
        tx.update(jnp.zeros(4), state, params)


def test_spsa_refuses_bad_arguments():
    with pytest.raises(ValueError, match="epsilon"):
        fwdgrad.spsa_grad(jnp.sum, epsilon=0.0)
    with pytest.raises(ValueError, match="distribution"):
        fwdgrad.spsa_gradient(jax.random.key(0), distribution="uniform")
    with pytest.raises(ValueError, match="num_directions"):
        fwdgrad.value_and_spsa_grad(jnp.sum, num_directions=0)
    with pytest.raises(TypeError, match="real floating scalar"):
        fwdgrad.spsa_grad(lambda x: x)(jax.random.key(0), X0)
    with pytest.raises(TypeError, match="argnums"):
        fwdgrad.spsa_grad(jnp.sum)(jax.random.key(0), jnp.arange(3))
