"""precondition: the diagonal-curvature transformation, its SGD alias and gradient function."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxopt_suite import precondition, train


def test_divides_by_curvature_plus_damping():
    g = {"a": jnp.array([2.0, -4.0]), "b": jnp.array(3.0)}
    d = {"a": jnp.array([1.0, 3.0]), "b": jnp.array(0.5)}
    tx = precondition.scale_by_diagonal_curvature(damping=0.5)
    u, _ = tx.update(g, tx.init(g), curvature=d, value=1.0)  # unknown extras are ignored
    np.testing.assert_allclose(u["a"], np.array([2.0, -4.0]) / (np.array([1.0, 3.0]) + 0.5))
    np.testing.assert_allclose(u["b"], 3.0 / 1.0)


def test_alias_is_preconditioned_sgd_and_works_under_inject_hyperparams():
    p = {"w": jnp.array([1.0, 2.0])}
    g, d = {"w": jnp.array([0.3, -0.6])}, {"w": jnp.array([2.0, 0.0])}
    tx = optax.inject_hyperparams(precondition.diag_ggn_sgd)(learning_rate=0.1, damping=1.0)
    u, _ = jax.jit(lambda g, s, d: tx.update(g, s, p, curvature=d))(g, tx.init(p), d)
    np.testing.assert_allclose(u["w"], -0.1 * np.array([0.3 / 3.0, -0.6 / 1.0]), rtol=1e-6)


def test_converges_on_a_quadratic_with_its_exact_diagonal():
    # f(w) = 0.5 sum h w^2: the Newton-like step lr * h w / (h + damping) contracts every axis.
    h = jnp.array([100.0, 1.0, 0.01])
    w = jnp.ones(3)
    tx = precondition.diag_ggn_sgd(1.0, damping=1e-3)
    state = tx.init(w)
    for _ in range(20):
        u, state = tx.update(h * w, state, w, curvature=h)
        w = w + u
    np.testing.assert_allclose(w, 0.0, atol=1e-3)


def test_errors():
    tx = precondition.scale_by_diagonal_curvature()
    g = {"w": jnp.ones(2)}
    with pytest.raises(TypeError, match="curvature="):
        tx.update(g, tx.init(g))
    with pytest.raises(ValueError, match="structure"):
        tx.update(g, tx.init(g), curvature=jnp.ones(2))
    with pytest.raises(ValueError, match=r"shapes of the updates; at \['w'\] got \(4, 2\)"):
        tx.update(g, tx.init(g), curvature={"w": jnp.ones((4, 2))})  # a per-sample quantity
    for bad in (0.0, -1, np.float32(-1.0), jnp.array(-1.0), jnp.array([1.0, -1.0])):
        with pytest.raises(ValueError, match="damping must be positive"):
            precondition.scale_by_diagonal_curvature(damping=bad)
    with pytest.raises(ValueError, match="quantity"):
        train.curvature_gradient("grad_batch")


def test_jit_keeps_dtype_and_does_not_retrace():
    traces = []
    tx = precondition.diag_ggn_sgd(0.1, damping=1.0)

    @jax.jit
    def update(g, d):
        traces.append(1)
        return tx.update(g, tx.init(g), g, curvature=d)[0]

    for scale in (1.0, 2.0):
        g = {"w": jnp.full((3,), scale, jnp.bfloat16)}
        u = update(g, {"w": jnp.full((3,), 3.0, jnp.bfloat16)})
        assert u["w"].dtype == jnp.bfloat16
        np.testing.assert_allclose(np.asarray(u["w"], np.float32), -0.1 * scale / 4.0, rtol=1e-2)
    assert len(traces) == 1


def test_training_step_uses_the_mc_diagonal_and_learns():
    # a linear softmax model on separable data; the step is the library's train.make_step
    key = jax.random.key(0)
    x = jax.random.normal(key, (64, 4))
    y = (x[:, 0] > 0).astype(jnp.int32)
    apply_fn = lambda p, x: x @ p["w"] + p["b"]
    params = {"w": jnp.zeros((4, 2)), "b": jnp.zeros(2)}
    problem = train.Problem(apply_fn)
    tx = precondition.diag_ggn_sgd(0.5, damping=0.1)
    step = jax.jit(train.make_step(problem, tx, train.curvature_gradient(), preprocess=lambda a: a))
    state = train.init_state(params, tx, key)
    losses = []
    for _ in range(30):
        state, loss = step(state, x, y)
        losses.append(float(loss))
    assert losses[-1] < 0.5 * losses[0]
    assert int(state.skipped) == 0
