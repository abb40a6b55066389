"""Kronecker factors against brute-force GGN blocks (tests/reference.py); the preconditioner
against dense solves."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxopt_suite import kronecker, train, zoo
from jaxopt_suite.curvature import products
from tests import reference

ATOL = RTOL = 1e-5


def _model(activation=jnp.tanh):
    return zoo.MLP(hidden=(4,), num_classes=3, activation=activation)


@functools.cache
def _setup(n, loss="cross_entropy", seed=0):
    model = _model()
    x = jax.random.normal(jax.random.key(seed), (n, 2, 2, 1))  # flattened to 4 inputs
    params = model.init(jax.random.key(seed + 1), x)["params"]
    if loss == "cross_entropy":
        y = jax.random.randint(jax.random.key(seed + 2), (n,), 0, 3)
    else:
        y = jax.random.normal(jax.random.key(seed + 2), (n, 3))
    return model, params, x, y


@pytest.mark.parametrize(("loss", "reduction"), [("cross_entropy", "mean"), ("mse", "sum")])
def test_kronecker_product_is_the_exact_ggn_block_at_batch_size_one(loss, reduction):
    model, params, x, y = _setup(1, loss)
    fn = jax.jit(
        functools.partial(
            kronecker.mlp_value_grad_and_factors,
            loss=loss,
            reduction=reduction,
            activation=jnp.tanh,
        )
    )
    _, _, factors = fn(params, x, y)
    apply_fn = lambda p, inputs: model.apply({"params": p}, inputs)
    blocks = reference.ggn_blocks(apply_fn, params, x, y, loss, reduction)
    for layer in ("Dense_0", "Dense_1"):
        a, g = factors[layer]["kernel"]
        np.testing.assert_allclose(jnp.kron(a, g), blocks[layer]["kernel"], atol=ATOL, rtol=RTOL)
        (g_bias,) = factors[layer]["bias"]
        np.testing.assert_allclose(g_bias, blocks[layer]["bias"], atol=ATOL, rtol=RTOL)


def test_factors_at_batch_size_n_match_their_definitions():
    n = 5
    model, params, x, y = _setup(n)
    value, grads, factors = jax.jit(
        functools.partial(kronecker.mlp_value_grad_and_factors, activation=jnp.tanh)
    )(params, x, y)
    # the value and gradient of the model written with flax
    ref_loss = lambda p: reference.batch_loss("cross_entropy")(model.apply({"params": p}, x), y)
    ref_value, ref_grads = jax.value_and_grad(ref_loss)(params)
    np.testing.assert_allclose(value, ref_value, atol=ATOL, rtol=RTOL)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads), strict=True):
        np.testing.assert_allclose(a, b, atol=ATOL, rtol=RTOL)
    # A = (1/N) sum x x^T of the layer inputs; G = sum_n J_n^T H_n J_n with J_n = df_n/dz_n
    x0 = np.asarray(x).reshape(n, -1)
    w0, b0 = params["Dense_0"]["kernel"], params["Dense_0"]["bias"]
    w1, b1 = params["Dense_1"]["kernel"], params["Dense_1"]["bias"]
    z0 = x0 @ w0 + b0
    x1 = np.tanh(z0)
    out = x1 @ w1 + b1

    @jax.jit
    def per_sample_blocks(z0, out, y):
        ce = lambda o, label: optax.softmax_cross_entropy_with_integer_labels(o, label) / n
        hess = jax.vmap(jax.hessian(ce))(out, y)  # (N, C, C)
        jac0 = jax.vmap(jax.jacrev(lambda z: jnp.tanh(z) @ w1 + b1))(z0)  # (N, C, hidden)
        return jnp.einsum("nci,ncd,ndj->ij", jac0, hess, jac0), hess.sum(0)

    # the output layer's Jacobian in its own output is the identity: G = sum_n H_n
    g0, g1 = per_sample_blocks(z0, out, y)
    expected = {"Dense_0": (x0.T @ x0 / n, g0), "Dense_1": (x1.T @ x1 / n, g1)}
    for layer, (a_ref, g_ref) in expected.items():
        a, g = factors[layer]["kernel"]
        np.testing.assert_allclose(a, a_ref, atol=ATOL, rtol=RTOL)
        np.testing.assert_allclose(g, g_ref, atol=ATOL, rtol=RTOL)
        np.testing.assert_allclose(factors[layer]["bias"][0], g_ref, atol=ATOL, rtol=RTOL)


def test_monte_carlo_factors_approach_the_exact_ones():
    _, params, x, y = _setup(3)
    fn = jax.jit(
        functools.partial(kronecker.mlp_value_grad_and_factors, activation=jnp.tanh),
        static_argnames="mc_samples",
    )
    _, _, exact = fn(params, x, y)
    _, _, mc = fn(params, x, y, key=jax.random.key(7), mc_samples=20000)
    for layer in ("Dense_0", "Dense_1"):
        g_exact, g_mc = exact[layer]["kernel"][1], mc[layer]["kernel"][1]
        np.testing.assert_allclose(g_mc, g_exact, atol=0.05 * float(jnp.abs(g_exact).max()))
        np.testing.assert_allclose(mc[layer]["kernel"][0], exact[layer]["kernel"][0], rtol=1e-6)


def test_dense_factors_count_positions_as_samples():
    x = jax.random.normal(jax.random.key(0), (2, 3, 4))
    cols = jax.random.normal(jax.random.key(1), (5, 2, 3, 6))
    a, g = kronecker.dense_kronecker_factors(x, cols)
    xf, cf = np.asarray(x).reshape(6, 4), np.asarray(cols).reshape(5 * 6, 6)
    np.testing.assert_allclose(a, xf.T @ xf / 6, atol=ATOL, rtol=RTOL)
    np.testing.assert_allclose(g, cf.T @ cf, atol=ATOL, rtol=RTOL)
    with pytest.raises(ValueError, match=r"\(K, N, \.\.\., out\)"):
        kronecker.dense_kronecker_factors(x, cols[:, :1])


def _spd(key, n):
    m = jax.random.normal(key, (n, n + 2))
    return m @ m.T / (n + 2) + 0.1 * jnp.eye(n)


def _dense_kernel_solve(a, g, u, damping, pi_damping):
    """(A_d ⊗ G_d)^{-1} vec(U) by a dense solve, vec row-major as for flax's (in, out) kernels."""
    a, g = np.asarray(a, np.float64), np.asarray(g, np.float64)
    root = np.sqrt(damping)
    pi = np.sqrt((np.trace(a) / len(a)) / (np.trace(g) / len(g))) if pi_damping else 1.0
    big = np.kron(a + pi * root * np.eye(len(a)), g + root / pi * np.eye(len(g)))
    return np.linalg.solve(big, np.asarray(u, np.float64).reshape(-1)).reshape(u.shape)


@pytest.mark.parametrize("pi_damping", [True, False])
def test_update_solves_the_dense_kronecker_system(pi_damping):
    keys = jax.random.split(jax.random.key(0), 8)
    params = {
        "dense": {"kernel": jnp.zeros((3, 2)), "bias": jnp.zeros(2)},
        "conv": {"kernel": jnp.zeros((2, 2, 1, 3))},  # A over the (kh, kw, in) patch index
    }
    updates = jax.tree.map(
        lambda p, k: jax.random.normal(k, p.shape),
        params,
        jax.tree.unflatten(jax.tree.structure(params), list(keys[:3])),
    )
    a, g, g_bias = _spd(keys[3], 3), _spd(keys[4], 2), _spd(keys[5], 2)
    a_conv, g_conv = 5.0 * _spd(keys[6], 4), _spd(keys[7], 3)
    factors = {
        "dense": {"kernel": (a, g), "bias": (g_bias,)},
        "conv": {"kernel": (a_conv, g_conv)},
    }
    damping = 0.05
    tx = kronecker.scale_by_kronecker(damping, pi_damping=pi_damping)
    out, _ = jax.jit(tx.update)(updates, tx.init(params), factors=factors)
    expected_kernel = _dense_kernel_solve(a, g, updates["dense"]["kernel"], damping, pi_damping)
    np.testing.assert_allclose(out["dense"]["kernel"], expected_kernel, atol=ATOL, rtol=1e-4)
    expected_bias = np.linalg.solve(
        np.asarray(g_bias, np.float64) + damping * np.eye(2), updates["dense"]["bias"]
    )
    np.testing.assert_allclose(out["dense"]["bias"], expected_bias, atol=ATOL, rtol=1e-4)
    expected_conv = _dense_kernel_solve(
        a_conv, g_conv, updates["conv"]["kernel"], damping, pi_damping
    )
    np.testing.assert_allclose(out["conv"]["kernel"], expected_conv, atol=ATOL, rtol=1e-4)


def test_moving_averages_and_refresh_every_k_steps():
    decay, damping, k = 0.8, 0.1, 2
    params = {"kernel": jnp.zeros((3, 2))}
    tx = kronecker.scale_by_kronecker(damping, decay, inverse_every=k, pi_damping=False)
    state = tx.init(params)
    update = jax.jit(tx.update)
    u = {"kernel": jnp.arange(6.0).reshape(3, 2) - 2.0}
    ema_a = ema_g = None
    used = None
    for t in range(5):
        a, g = _spd(jax.random.key(10 + t), 3), _spd(jax.random.key(20 + t), 2)
        out, state = update(u, state, factors={"kernel": (a, g)})
        ema_a = a if t == 0 else decay * ema_a + (1 - decay) * a
        ema_g = g if t == 0 else decay * ema_g + (1 - decay) * g
        if t % k == 0:  # refreshed on the 1st, 3rd, 5th update; stale in between
            used = (ema_a, ema_g)
        np.testing.assert_allclose(state.factors["kernel"][0], ema_a, atol=ATOL, rtol=RTOL)
        np.testing.assert_allclose(state.factors["kernel"][1], ema_g, atol=ATOL, rtol=RTOL)
        expected = _dense_kernel_solve(*used, u["kernel"], damping, pi_damping=False)
        np.testing.assert_allclose(out["kernel"], expected, atol=ATOL, rtol=1e-4)
    assert int(state.count) == 5


def test_hyperparameters_can_be_injected_and_changed():
    params = {"kernel": jnp.zeros((3, 2))}
    a, g = _spd(jax.random.key(0), 3), _spd(jax.random.key(1), 2)
    u = {"kernel": jnp.ones((3, 2))}
    tx = optax.inject_hyperparams(kronecker.scale_by_kronecker, static_args="pi_damping")(
        damping=0.1, decay=0.9, inverse_every=1, pi_damping=False
    )
    state = tx.init(params)
    state.hyperparams["damping"] = jnp.asarray(0.5)
    out, state = jax.jit(tx.update)(u, state, factors={"kernel": (a, g)})
    expected = _dense_kernel_solve(a, g, u["kernel"], 0.5, pi_damping=False)
    np.testing.assert_allclose(out["kernel"], expected, atol=ATOL, rtol=1e-4)


def test_non_finite_factors_leave_the_state_untouched():
    params = {"kernel": jnp.zeros((3, 2))}
    tx = kronecker.scale_by_kronecker(0.1, pi_damping=False)
    a, g = _spd(jax.random.key(0), 3), _spd(jax.random.key(1), 2)
    u = {"kernel": jnp.ones((3, 2))}
    _, state = tx.update(u, tx.init(params), factors={"kernel": (a, g)})
    bad = (a.at[0, 0].set(jnp.nan), g)
    out, new_state = jax.jit(tx.update)(u, state, factors={"kernel": bad})
    for x, y in zip(jax.tree.leaves(new_state), jax.tree.leaves(state), strict=True):
        np.testing.assert_array_equal(x, y)
    expected = _dense_kernel_solve(a, g, u["kernel"], 0.1, pi_damping=False)
    np.testing.assert_allclose(out["kernel"], expected, atol=ATOL, rtol=1e-4)


def test_leaves_without_factors_pass_through():
    params = {"kernel": jnp.zeros((3, 2)), "scale": jnp.zeros(()), "embed": jnp.zeros((50, 2))}
    mask = {"kernel": True, "scale": True, "embed": False}
    tx = kronecker.scale_by_kronecker(0.1, mask=mask)
    state = tx.init(params)
    assert state.factors["scale"] is None and state.factors["embed"] is None
    u = {"kernel": jnp.ones((3, 2)), "scale": jnp.array(2.0), "embed": jnp.ones((50, 2))}
    # no factors for the kernel this step either: it passes through too
    out, _ = tx.update(u, state, factors={"kernel": None, "scale": None, "embed": None})
    for x, y in zip(jax.tree.leaves(out), jax.tree.leaves(u), strict=True):
        np.testing.assert_array_equal(x, y)


def test_bad_factors_and_hyperparameters_raise_clear_errors():
    params = {"Dense_0": {"kernel": jnp.zeros((3, 2)), "bias": jnp.zeros(2)}}
    tx = kronecker.scale_by_kronecker()
    state = tx.init(params)
    good = {"Dense_0": {"kernel": (jnp.eye(3), jnp.eye(2)), "bias": (jnp.eye(2),)}}
    with pytest.raises(ValueError, match="factors="):
        tx.update(params, state)
    wrong_shape = {"Dense_0": {"kernel": (jnp.eye(2), jnp.eye(2)), "bias": (jnp.eye(2),)}}
    with pytest.raises(ValueError, match=r"factors\['Dense_0'\]\['kernel'\] has shapes A \(2, 2\)"):
        tx.update(params, state, factors=wrong_shape)
    wrong_arity = {"Dense_0": {"kernel": (jnp.eye(3), jnp.eye(2)), "bias": (jnp.eye(2),) * 2}}
    with pytest.raises(ValueError, match=r"factors\['Dense_0'\]\['bias'\] must be a tuple \(G,\)"):
        tx.update(params, state, factors=wrong_arity)
    with pytest.raises(ValueError, match="structure of the parameters"):
        tx.update(params, state, factors={"Dense_1": good["Dense_0"]})
    masked = kronecker.scale_by_kronecker(mask={"Dense_0": {"kernel": True, "bias": False}})
    with pytest.raises(ValueError, match=r"factors\['Dense_0'\]\['bias'\] is given"):
        masked.update(params, masked.init(params), factors=good)
    with pytest.raises(ValueError, match="damping must be > 0"):
        kronecker.scale_by_kronecker(damping=0.0)
    with pytest.raises(ValueError, match=r"decay must be in \[0, 1\)"):
        kronecker.scale_by_kronecker(decay=1.0)
    with pytest.raises(ValueError, match="inverse_every must be an integer >= 1"):
        kronecker.scale_by_kronecker(inverse_every=0)
    with pytest.raises(ValueError, match=r"layout of zoo\.MLP"):
        kronecker.mlp_value_grad_and_factors({"layer": params["Dense_0"]}, jnp.ones((1, 3)), 0)


def test_one_kfac_step_solves_linear_least_squares():
    # f = x W with summed squared error: the GGN is exactly A ⊗ G, so one undamped step with
    # learning rate 1 is Newton's step and lands on the least-squares solution.
    x = jax.random.normal(jax.random.key(0), (20, 4))
    y = jax.random.normal(jax.random.key(1), (20, 3))
    params = {"kernel": jnp.zeros((4, 3))}
    loss_fn = lambda p: jnp.sum((x @ p["kernel"] - y) ** 2)
    grads = jax.grad(loss_fn)(params)
    cols = products.loss_hessian_sqrt("mse", x @ params["kernel"], y, "sum")
    factors = {"kernel": kronecker.dense_kronecker_factors(x, cols)}
    tx = kronecker.kfac_sgd(1.0, damping=1e-8, pi_damping=False)
    updates, _ = tx.update(grads, tx.init(params), factors=factors)
    solved = optax.apply_updates(params, updates)["kernel"]
    lstsq = np.linalg.lstsq(np.asarray(x, np.float64), np.asarray(y, np.float64), rcond=None)[0]
    np.testing.assert_allclose(solved, lstsq, atol=1e-4, rtol=1e-4)


def test_kfac_sgd_trains_a_small_mlp():
    model = zoo.MLP(hidden=(16,), num_classes=3)
    x = jax.random.normal(jax.random.key(0), (64, 5))
    y = jnp.argmax(x[:, :3] + 0.3 * x[:, 3:4], axis=1)
    params = model.init(jax.random.key(1), x)["params"]
    tx = kronecker.kfac_sgd(0.3, damping=0.1, decay=0.9, inverse_every=2, momentum=0.5)

    @jax.jit
    def step(params, state):
        value, grads, factors = kronecker.mlp_value_grad_and_factors(params, x, y)
        updates, state = tx.update(grads, state, params, factors=factors)
        return optax.apply_updates(params, updates), state, value

    state = tx.init(params)
    losses = []
    for _ in range(30):
        params, state, value = step(params, state)
        losses.append(float(value))
    assert np.all(np.isfinite(losses))
    assert losses[-1] < 0.1 * losses[0], losses


def test_engine_factors_drive_the_same_update_as_the_reference():
    from jaxopt_suite import curvature

    n = 5
    model, params, x, y = _setup(n)
    apply_fn = lambda p, inputs: model.apply({"params": p}, inputs)
    engine = curvature.value_and_grad(apply_fn, loss="cross_entropy", quantities=("kflr",))
    tx = kronecker.kfac_sgd(0.1, damping=1e-2, inverse_every=1)

    @jax.jit
    def both(params):
        _, grads, extras = engine(params, x, y)
        _, ref_grads, ref = kronecker.mlp_value_grad_and_factors(params, x, y, activation=jnp.tanh)
        state = tx.init(params)
        ours, _ = tx.update(grads, state, params, factors=extras["kflr"])
        theirs, _ = tx.update(ref_grads, state, params, factors=ref)
        return extras["kflr"], ref, ours, theirs

    factors, ref, ours, theirs = both(params)
    for a, b in zip(jax.tree.leaves(factors), jax.tree.leaves(ref), strict=True):
        np.testing.assert_allclose(a, b, atol=ATOL, rtol=RTOL)
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs), strict=True):
        np.testing.assert_allclose(a, b, atol=ATOL, rtol=1e-4)
    # leaves the engine gives no factors (an embedding) get no state through factor_mask
    embed = {"emb": jnp.zeros((7, 2)), "w": jnp.zeros((2, 3))}
    mask = kronecker.factor_mask({"emb": None, "w": (jnp.eye(2), jnp.eye(3))}, embed)
    assert mask == {"emb": False, "w": True}
    state = kronecker.scale_by_kronecker(mask=mask).init(embed)
    assert state.factors["emb"] is None and state.factors["w"][0].shape == (2, 2)
    with pytest.raises(ValueError, match="structure of params"):
        kronecker.factor_mask({"w": None}, embed)
    with pytest.raises(ValueError, match="quantity must be one of"):
        train.curvature_gradient("diag_h")
