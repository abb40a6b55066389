"""ProxProp ops and layers against independent computations on tiny problems.

References are float64 numpy: the damped normal system (A^T A + I/tau) d = A^T g_z solved
directly, the per-column Cauchy step, a textbook CG, and for convolutions the full Jacobian of
the plain layer from brute-force autodiff (which also checks that the channels decouple).
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxopt_suite import train, zoo
from jaxopt_suite.proxprop import (
    ProxPropConv,
    ProxPropDense,
    ProxPropLinear,
    ProxPropNNXConv,
    parse_mode,
    proxprop_dense,
    proxprop_module,
)
from jaxopt_suite.proxprop.solvers import spd_solve

RTOL, ATOL = 2e-4, 1e-6


def _jgrad(fn, **kwargs):
    """jax.grad under jit: one compilation instead of op-by-op dispatch (keeps the file fast)."""
    return jax.jit(jax.grad(fn, **kwargs))


def _rand(seed, *shape):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


# ---------------------------------------------------------------- numpy references (float64)


def np_dense_system(x, kernel, bias, target, tau):
    """A = [x, 1], the gradient G = A^T g_z of 0.5 * mean_n ||z_n - t_n||^2, M = A^T A + I/tau."""
    x = np.asarray(x, np.float64)
    n = x.shape[0]
    a = np.hstack([x, np.ones((n, 1))]) if bias is not None else x
    theta = np.vstack([kernel, bias[None]]) if bias is not None else np.asarray(kernel)
    g_z = (a @ theta - target) / n
    return a, a.T @ g_z, a.T @ a + np.eye(a.shape[1]) / tau


def np_cauchy(a, g, tau):
    """Per-column d_j = alpha_j g_j, alpha_j = |g_j|^2 / (|A g_j|^2 + |g_j|^2 / tau)."""
    alpha = (g * g).sum(0) / (((a @ g) ** 2).sum(0) + (g * g).sum(0) / tau)
    return alpha * g


def np_cg(m, g, steps):
    """Textbook CG from 0 on M d = g, every column separately, exactly `steps` iterations."""
    d = np.zeros_like(g)
    for j in range(g.shape[1]):
        r = g[:, j].copy()
        p = r.copy()
        for _ in range(steps):
            alpha = (r @ r) / (p @ m @ p)
            d[:, j] += alpha * p
            r_new = r - alpha * (m @ p)
            p = r_new + (r_new @ r_new) / (r @ r) * p
            r = r_new
    return d


def _dense_directions(x, kernel, bias, target, tau, mode):
    def loss(w, b):
        z = proxprop_dense(x, w, b, tau_prox=tau, optimization_mode=mode)
        return 0.5 * jnp.sum((z - target) ** 2) / x.shape[0]

    d_w, d_b = jax.jit(jax.grad(loss, argnums=(0, 1)))(kernel, bias)
    return np.vstack([d_w, d_b[None]]) if bias is not None else np.asarray(d_w)


def _dense_problem(n, fan_in, fan_out, seed=0):
    return (
        _rand(seed, n, fan_in),
        _rand(seed + 1, fan_in, fan_out) * 0.5,
        _rand(seed + 2, fan_out),
        _rand(seed + 3, n, fan_out),
    )


# ---------------------------------------------------------------- modes and errors


def test_parse_mode():
    assert parse_mode("gradient") == ("gradient", 0)
    assert parse_mode("prox_exact") == ("prox_exact", 0)
    assert parse_mode("prox_cg1") == ("prox_cg", 1)
    assert parse_mode("prox_cg12") == ("prox_cg", 12)


@pytest.mark.parametrize("mode", ["prox", "prox_cg", "prox_cgx", "exact", "Gradient"])
def test_unknown_mode_lists_valid_ones(mode):
    with pytest.raises(ValueError, match=r'"gradient", "prox_exact" or "prox_cg<K>"'):
        parse_mode(mode)
    with pytest.raises(ValueError, match="optimization_mode"):
        ProxPropDense(3, optimization_mode=mode)


@pytest.mark.parametrize("mode", ["prox_cg0", "prox_cg-2"])
def test_cg_steps_below_one(mode):
    with pytest.raises(ValueError, match="K must be >= 1"):
        ProxPropConv(3, (3, 3), optimization_mode=mode)


def test_mode_must_be_string():
    with pytest.raises(TypeError, match="optimization_mode must be a string"):
        parse_mode(3)


@pytest.mark.parametrize("tau", [0.0, -1.0, float("nan"), float("inf")])
def test_bad_tau(tau):
    with pytest.raises(ValueError, match="tau_prox"):
        ProxPropDense(3, tau_prox=tau)
    with pytest.raises(ValueError, match="tau_prox"):
        proxprop_dense(jnp.ones((2, 3)), jnp.ones((3, 4)), tau_prox=tau)
    with pytest.raises(ValueError, match="tau_prox"):
        ProxPropLinear(3, 4, tau_prox=tau, rngs=nnx.Rngs(0))


class _TanhDense(nn.Module):
    features: int = 3

    @nn.compact
    def __call__(self, x):
        return x @ jnp.tanh(self.param("kernel", nn.initializers.normal(), (x.shape[-1], 3)))


class _AffineDense(nn.Dense):
    def __call__(self, x):
        return super().__call__(x) + 1.0


class _QuadraticDense(nn.Module):
    @nn.compact
    def __call__(self, x):
        k = self.param("kernel", nn.initializers.normal(), (x.shape[-1], 3))
        s = self.param("scale", nn.initializers.ones, (3,))
        return (x @ k) * s


@pytest.mark.parametrize("cls", [_TanhDense, _AffineDense, _QuadraticDense])
def test_nonlinear_layer_is_rejected_at_init(cls):
    layer = proxprop_module(cls)(**({"features": 3} if cls is _AffineDense else {}))
    with pytest.raises(ValueError, match="linear in its parameters"):
        layer.init(jax.random.key(0), jnp.ones((2, 4)))


def test_proxprop_module_rejects_non_modules():
    with pytest.raises(TypeError, match="module_cls"):
        proxprop_module(lambda x: x)


# ---------------------------------------------------------------- solvers


def _spd_problem(n, rhs_shape):
    x = np.random.default_rng(n).standard_normal((n, n // 2 + 1))
    m = x @ x.T + 0.1 * np.eye(n)  # rank-deficient Gram plus damping, as in ProxProp
    return m, np.random.default_rng(1).standard_normal(rhs_shape)


# n below, at, one above and not a multiple of the block; the sizes of the reported failures
# (136, 1056 and 1089 parameters of a DenseGeneral layer, with the default block of 64).
SPD_SIZES = [(1, 64), (5, 64), (63, 64), (64, 64), (65, 64), (129, 64), (70, 32), (40, 16)]
SPD_SIZES += [(7, 3), (9, 1), (136, 64), (1056, 64), (1089, 64)]


@pytest.mark.parametrize("n, block", SPD_SIZES)
@pytest.mark.parametrize("columns", [3, None], ids=["matrix-rhs", "vector-rhs"])
def test_spd_solve_matches_numpy(n, block, columns):
    m, rhs = _spd_problem(n, (n, columns) if columns else (n,))
    expected = np.linalg.solve(m, rhs)
    solve = jax.jit(spd_solve, static_argnums=2)
    got = solve(jnp.asarray(m, jnp.float32), jnp.asarray(rhs, jnp.float32), block)
    assert got.shape == rhs.shape
    # float32 Cholesky: the error grows with the condition number (about 1e4 .. 1e5 here)
    np.testing.assert_allclose(got, expected, rtol=1e-3, atol=2e-3 * np.abs(expected).max())


@pytest.mark.parametrize(
    "matrix_shape, rhs_shape, block, match",
    [
        ((3, 4), (3,), 64, "matrix must be square"),
        ((3, 3), (4,), 64, r"rhs must have shape \(3,\) or \(3, k\)"),
        ((3, 3), (3, 1, 1), 64, "rhs must have shape"),
        ((3, 3), (3,), 0, "block must be an int >= 1"),
    ],
)
def test_spd_solve_rejects_bad_shapes(matrix_shape, rhs_shape, block, match):
    with pytest.raises(ValueError, match=match):
        spd_solve(jnp.ones(matrix_shape), jnp.ones(rhs_shape), block)


# ---------------------------------------------------------------- Dense maths


@pytest.mark.parametrize(
    "n, fan_in, use_bias",
    [(9, 4, True), (3, 6, True), (8, 3, False), (2, 5, False)],
    ids=["primal", "woodbury", "primal-nobias", "woodbury-nobias"],
)
def test_dense_exact_matches_closed_form(n, fan_in, use_bias):
    x, w, b, t = _dense_problem(n, fan_in, 3)
    b = b if use_bias else None
    tau = 0.5
    _a, g, m = np_dense_system(x, w, b, t, tau)
    expected = np.linalg.solve(m, g)
    got = _dense_directions(x, w, b, t, tau, "prox_exact")
    np.testing.assert_allclose(got, expected, rtol=RTOL, atol=ATOL)


def test_dense_gradient_mode_is_the_gradient():
    x, w, b, t = _dense_problem(5, 4, 3)
    _, g, _ = np_dense_system(x, w, b, t, 1.0)
    got = _dense_directions(x, w, b, t, 1.0, "gradient")
    np.testing.assert_allclose(got, g, rtol=RTOL, atol=ATOL)


def test_dense_cg1_is_the_per_column_cauchy_step():
    x, w, b, t = _dense_problem(7, 4, 5)
    tau = 0.2
    a, g, _ = np_dense_system(x, w, b, t, tau)
    got = _dense_directions(x, w, b, t, tau, "prox_cg1")
    np.testing.assert_allclose(got, np_cauchy(a, g, tau), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("steps", [2, 3])
def test_dense_cg_matches_textbook_cg(steps):
    # An ill-conditioned problem, so no column converges early.
    x, w, b, t = _dense_problem(12, 6, 3)
    x = x * np.geomspace(0.05, 5, 6).astype(np.float32)
    tau = 10.0
    _, g, m = np_dense_system(x, w, b, t, tau)
    got = _dense_directions(x, w, b, t, tau, f"prox_cg{steps}")
    np.testing.assert_allclose(got, np_cg(m, g, steps), rtol=1e-3, atol=1e-6)


def test_dense_many_cg_steps_reach_exact():
    x, w, b, t = _dense_problem(10, 5, 4)
    tau = 2.0
    _, g, m = np_dense_system(x, w, b, t, tau)
    exact = np.linalg.solve(m, g)
    got = _dense_directions(x, w, b, t, tau, "prox_cg30")
    # CG stops once residuals fell to 1e-2 of their start.
    np.testing.assert_allclose(got, exact, rtol=0.05, atol=0.02 * np.abs(exact).max())


def test_dense_zero_gradient_column_gives_zero_direction():
    x, w, b, t = _dense_problem(6, 3, 2)
    t[:, 1] = np.asarray(x @ w + b)[:, 1]  # column 1 fits exactly: its gradient is 0
    for mode in ("prox_cg1", "prox_cg4", "prox_exact"):
        got = _dense_directions(x, w, b, t, 1.0, mode)
        assert np.all(np.isfinite(got))
        np.testing.assert_allclose(got[:, 1], 0.0, atol=1e-6)


def test_dense_leading_axes_are_batch_rows():
    x, w, b, t = _dense_problem(6, 3, 2)
    flat = _dense_directions(x, w, b, t, 0.3, "prox_exact")

    def loss(w, b):
        z = proxprop_dense(x.reshape(2, 3, 3), w, b, tau_prox=0.3, optimization_mode="prox_exact")
        return 0.5 * jnp.sum((z - t.reshape(2, 3, 2)) ** 2) / 6

    d_w, d_b = _jgrad(loss, argnums=(0, 1))(w, b)
    np.testing.assert_allclose(np.vstack([d_w, d_b[None]]), flat, rtol=RTOL, atol=ATOL)


def test_traced_tau_matches_concrete():
    x, w, b, _t = _dense_problem(5, 3, 2)

    @jax.jit
    def direction(tau):
        return jax.grad(
            lambda w: jnp.sum(proxprop_dense(x, w, b, tau_prox=tau, optimization_mode="prox_exact"))
        )(w)

    # loss = sum(z): the output cotangent is all ones
    a = np.hstack([x, np.ones((5, 1))])
    expected = np.linalg.solve(a.T @ a + np.eye(4) / 0.7, a.T @ np.ones((5, 2)))[:3]
    np.testing.assert_allclose(direction(0.7), expected, rtol=RTOL, atol=ATOL)


# ---------------------------------------------------------------- networks: gradient and input


def _mlp(dense=nn.Dense):
    return zoo.MLP(hidden=(6, 5), num_classes=3, dense=dense)


def _mlp_batch():
    return jnp.asarray(_rand(10, 8, 2, 2, 1)), jnp.asarray([0, 1, 2, 1, 0, 2, 2, 1])


def test_gradient_mode_network_equals_plain_backprop():
    x, y = _mlp_batch()
    plain = _mlp()
    params = plain.init(jax.random.key(0), x)["params"]
    prox = _mlp(functools.partial(ProxPropDense, optimization_mode="gradient"))
    loss = lambda model: lambda p: train.cross_entropy(model.apply({"params": p}, x), y)
    expected = _jgrad(loss(plain))(params)
    got = _jgrad(loss(prox))(params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=RTOL, atol=ATOL), got, expected)


@pytest.mark.parametrize("mode", ["prox_cg1", "prox_cg3", "prox_exact"])
def test_input_cotangent_is_plain_backprop(mode):
    x, y = _mlp_batch()
    plain = _mlp()
    params = plain.init(jax.random.key(0), x)["params"]
    prox = _mlp(functools.partial(ProxPropDense, tau_prox=0.1, optimization_mode=mode))
    loss = lambda model: lambda x: train.cross_entropy(model.apply({"params": params}, x), y)
    np.testing.assert_allclose(_jgrad(loss(prox))(x), _jgrad(loss(plain))(x), rtol=RTOL, atol=ATOL)


def test_hidden_layer_direction_in_a_network_matches_closed_form():
    # The direction of Dense_1 from its own input and output cotangent, both taken from the
    # plain network by autodiff.
    x, y = _mlp_batch()
    plain = _mlp()
    params = plain.init(jax.random.key(1), x)["params"]
    tau = 0.05
    prox = _mlp(functools.partial(ProxPropDense, tau_prox=tau, optimization_mode="prox_exact"))
    got = _jgrad(lambda p: train.cross_entropy(prox.apply({"params": p}, x), y))(params)

    _, state = plain.apply({"params": params}, x, capture_intermediates=True, mutable=True)
    h0 = np.asarray(jax.nn.relu(state["intermediates"]["Dense_0"]["__call__"][0]), np.float64)

    def loss_from_z1(z1):
        h1 = jax.nn.relu(z1)
        return train.cross_entropy(nn.Dense(3).apply({"params": params["Dense_2"]}, h1), y)

    z1 = state["intermediates"]["Dense_1"]["__call__"][0]
    g_z = np.asarray(_jgrad(loss_from_z1)(z1), np.float64)
    a = np.hstack([h0, np.ones((8, 1))])
    expected = np.linalg.solve(a.T @ a + np.eye(a.shape[1]) / tau, a.T @ g_z)
    np.testing.assert_allclose(got["Dense_1"]["kernel"], expected[:-1], rtol=1e-3, atol=1e-6)
    np.testing.assert_allclose(got["Dense_1"]["bias"], expected[-1], rtol=1e-3, atol=1e-6)
    # the plain last layer keeps its plain gradient
    expected_last = _jgrad(lambda p: train.cross_entropy(plain.apply({"params": p}, x), y))(params)[
        "Dense_2"
    ]
    np.testing.assert_allclose(got["Dense_2"]["kernel"], expected_last["kernel"], rtol=RTOL)


# ---------------------------------------------------------------- generic layers


def _dense_general_pair(mode, tau=0.5):
    x, w, b, t = _dense_problem(7, 4, 3)
    structured = ProxPropDense(3, tau_prox=tau, optimization_mode=mode)
    generic = proxprop_module(nn.DenseGeneral)(3, tau_prox=tau, optimization_mode=mode)
    params = {"params": {"kernel": jnp.asarray(w), "bias": jnp.asarray(b)}}
    loss = lambda layer: lambda p: 0.5 * jnp.sum((layer.apply(p, x) - t) ** 2) / 7
    return _jgrad(loss(structured))(params), _jgrad(loss(generic))(params), (x, w, b, t)


@pytest.mark.parametrize("mode", ["gradient", "prox_exact"])
def test_generic_dense_general_agrees_with_structured_dense(mode):
    structured, generic, _ = _dense_general_pair(mode)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=RTOL, atol=ATOL), generic, structured
    )


def test_generic_many_cg_steps_agree_with_structured_exact():
    exact, _, _ = _dense_general_pair("prox_exact")
    _, generic, _ = _dense_general_pair("prox_cg40")
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=0.05, atol=1e-3), generic, exact
    )


def test_generic_cg1_is_one_cauchy_step_on_all_parameters():
    _, generic, (x, w, b, t) = _dense_general_pair("prox_cg1", tau=0.5)
    a, g, _ = np_dense_system(x, w, b, t, 0.5)
    alpha = (g * g).sum() / (((a @ g) ** 2).sum() + (g * g).sum() / 0.5)
    got = np.vstack([generic["params"]["kernel"], generic["params"]["bias"][None]])
    np.testing.assert_allclose(got, alpha * g, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize(
    "features, fan_in", [((2, 4), 16), ((32,), 32), ((3, 11), 32)], ids=["136", "1056", "1089"]
)
def test_generic_dense_general_exact_of_reported_sizes(features, fan_in):
    """The reported failures: 136, 1056 and 1089 parameters, not multiples of spd_solve's
    block of 64 (15, 20 and 2112 worked). The direction is the brute-force solve of
    (J^T J + I/tau) d = grad with J the layer's Jacobian in its parameters."""
    layer = proxprop_module(nn.DenseGeneral)(features, tau_prox=0.3, optimization_mode="prox_exact")
    plain = nn.DenseGeneral(features)
    x = jnp.asarray(_rand(30, 3, fan_in))
    params = plain.init(jax.random.key(0), x)
    t = jnp.asarray(_rand(31, *plain.apply(params, x).shape))
    flat, unravel = jax.flatten_util.ravel_pytree(params)
    assert flat.size == {(2, 4): 136, (32,): 1056, (3, 11): 1089}[tuple(features)]
    loss = lambda m: lambda p: 0.5 * jnp.sum((m.apply(p, x) - t) ** 2)
    got = jax.flatten_util.ravel_pytree(_jgrad(loss(layer))(params))[0]
    jac = jax.jit(jax.jacfwd(lambda f: plain.apply(unravel(f), x).ravel()))(flat)
    jac = np.asarray(jac, np.float64)
    g = np.asarray(jax.flatten_util.ravel_pytree(_jgrad(loss(plain))(params))[0], np.float64)
    expected = np.linalg.solve(jac.T @ jac + np.eye(len(g)) / 0.3, g)
    np.testing.assert_allclose(got, expected, rtol=1e-3, atol=1e-4 * np.abs(expected).max())


def test_generic_conv_transpose_exact_matches_jacobian_system():
    layer_cls = proxprop_module(nn.ConvTranspose)
    x = jnp.asarray(_rand(20, 2, 3, 3, 2))
    t = jnp.asarray(_rand(21, 2, 6, 6, 2))
    kw = dict(features=2, kernel_size=(2, 2), strides=(2, 2))
    plain = nn.ConvTranspose(**kw)
    params = plain.init(jax.random.key(0), x)
    layer = layer_cls(**kw, tau_prox=0.3, optimization_mode="prox_exact")
    loss = lambda m: lambda p: 0.5 * jnp.sum((m.apply(p, x) - t) ** 2)
    got = _jgrad(loss(layer))(params)
    flat, unravel = jax.flatten_util.ravel_pytree(params)
    jac = jax.jit(jax.jacfwd(lambda f: plain.apply(unravel(f), x).ravel()))(flat)
    jac = np.asarray(jac, np.float64)
    g = np.asarray(jax.flatten_util.ravel_pytree(_jgrad(loss(plain))(params))[0], np.float64)
    expected = np.linalg.solve(jac.T @ jac + np.eye(len(g)) / 0.3, g)
    np.testing.assert_allclose(
        jax.flatten_util.ravel_pytree(got)[0], expected, rtol=1e-3, atol=1e-5
    )


# ---------------------------------------------------------------- Conv


def _conv_setup(kw, seed=0):
    x = jnp.asarray(_rand(seed, 2, 5, 5, 2))
    plain = nn.Conv(**kw)
    params = plain.init(jax.random.key(seed), x)
    t = jnp.asarray(_rand(seed + 1, *plain.apply(params, x).shape))
    loss = lambda m: lambda p: 0.5 * jnp.sum((m.apply(p, x) - t) ** 2) / 2
    flat, unravel = jax.flatten_util.ravel_pytree(params)
    out = plain.apply(params, x)
    jac = np.asarray(
        jax.jit(jax.jacfwd(lambda f: plain.apply(unravel(f), x).ravel()))(flat), np.float64
    )
    g = np.asarray(jax.flatten_util.ravel_pytree(_jgrad(loss(plain))(params))[0], np.float64)
    # which output channel each parameter and each output entry belongs to
    param_unit = jax.flatten_util.ravel_pytree(
        jax.tree.map(lambda p: jnp.broadcast_to(jnp.arange(p.shape[-1]), p.shape), params)
    )[0]
    out_unit = np.broadcast_to(np.arange(out.shape[-1]), out.shape).ravel()
    return params, loss, unravel, jac, g, np.asarray(param_unit), out_unit


CONV_CASES = [
    dict(features=3, kernel_size=(3, 3)),
    dict(features=2, kernel_size=(2, 3), strides=2, padding="CIRCULAR", use_bias=False),
]


@pytest.mark.parametrize("kw", CONV_CASES, ids=["same", "circular-stride-nobias"])
def test_conv_exact_matches_full_jacobian_system(kw):
    params, loss, _unravel, jac, g, _, _ = _conv_setup(kw)
    tau = 0.5
    expected = np.linalg.solve(jac.T @ jac + np.eye(len(g)) / tau, g)
    layer = ProxPropConv(**kw, tau_prox=tau, optimization_mode="prox_exact")
    got = jax.flatten_util.ravel_pytree(_jgrad(loss(layer))(params))[0]
    np.testing.assert_allclose(got, expected, rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize(
    "kw",
    [CONV_CASES[0], dict(features=2, kernel_size=(2, 3), strides=2, padding="VALID")],
    ids=["same", "valid-stride"],
)
def test_conv_cg1_is_the_per_channel_cauchy_step(kw):
    params, loss, _, jac, g, param_unit, out_unit = _conv_setup(kw)
    tau = 0.5
    expected = np.zeros_like(g)
    for c in range(kw["features"]):
        cols, rows = param_unit == c, out_unit == c
        g_c = g[cols]
        a_g = jac[np.ix_(rows, cols)] @ g_c
        expected[cols] = (g_c @ g_c) / (a_g @ a_g + (g_c @ g_c) / tau) * g_c
    layer = ProxPropConv(**kw, tau_prox=tau, optimization_mode="prox_cg1")
    got = jax.flatten_util.ravel_pytree(_jgrad(loss(layer))(params))[0]
    np.testing.assert_allclose(got, expected, rtol=RTOL, atol=ATOL)


def test_conv_gradient_mode_and_many_cg_steps():
    kw = CONV_CASES[0]
    params, loss, _, jac, g, _, _ = _conv_setup(kw, seed=3)
    grad = jax.flatten_util.ravel_pytree(
        _jgrad(loss(ProxPropConv(**kw, optimization_mode="gradient")))(params)
    )[0]
    np.testing.assert_allclose(grad, g, rtol=RTOL, atol=ATOL)
    exact = np.linalg.solve(jac.T @ jac + np.eye(len(g)), g)
    cg = jax.flatten_util.ravel_pytree(
        _jgrad(loss(ProxPropConv(**kw, optimization_mode="prox_cg40")))(params)
    )[0]
    np.testing.assert_allclose(cg, exact, rtol=0.05, atol=0.02 * np.abs(exact).max())


def test_conv_exact_rejects_mask_and_groups():
    x = jnp.ones((1, 4, 4, 2))
    grouped = ProxPropConv(2, (3, 3), feature_group_count=2, optimization_mode="prox_exact")
    with pytest.raises(ValueError, match="feature_group_count=1"):
        grouped.init(jax.random.key(0), x)


# ---------------------------------------------------------------- parameters interchange


def test_parameters_interchange_with_plain_layers():
    x = jnp.asarray(_rand(5, 2, 6, 6, 1))
    for plain, prox in [
        (nn.Dense(4), ProxPropDense(4, tau_prox=0.1)),
        (nn.Conv(3, (3, 3)), ProxPropConv(3, (3, 3), optimization_mode="prox_cg2")),
    ]:
        p_plain = plain.init(jax.random.key(7), x)
        p_prox = prox.init(jax.random.key(7), x)
        jax.tree.map(np.testing.assert_array_equal, p_plain, p_prox)  # same init, too
        np.testing.assert_allclose(prox.apply(p_plain, x), plain.apply(p_plain, x), rtol=1e-6)


class _AutoNamed(nn.Module):
    """Unnamed layers in a compact method, as a user writes them: flax names them."""

    dense: Any = nn.Dense
    conv: Any = nn.Conv
    general: Any = nn.DenseGeneral

    @nn.compact
    def __call__(self, x):
        x = nn.relu(self.conv(3, (3, 3))(x))
        x = nn.relu(self.conv(2, (3, 3), padding="VALID")(x)).reshape(x.shape[0], -1)
        x = nn.relu(self.dense(5)(x))
        x = nn.relu(nn.Dense(4)(x))  # stays plain: shares the Dense_<i> counter
        x = self.general((2, 2))(x).reshape(x.shape[0], -1)
        x = nn.remat(self.dense)(3)(x)
        return self.dense(2, name="head")(x)


def test_auto_named_proxprop_layers_take_the_plain_names():
    x = jnp.asarray(_rand(40, 2, 5, 5, 1))
    plain = _AutoNamed()
    prox = _AutoNamed(
        dense=functools.partial(ProxPropDense, tau_prox=0.1, optimization_mode="prox_exact"),
        conv=functools.partial(ProxPropConv, optimization_mode="prox_cg2"),
        general=proxprop_module(nn.DenseGeneral),
    )
    params = plain.init(jax.random.key(0), x)
    names = {"Conv_0", "Conv_1", "Dense_0", "Dense_1", "DenseGeneral_0", "CheckpointDense_0"}
    assert set(params["params"]) == names | {"head"}
    shapes = lambda tree: jax.tree.map(jnp.shape, tree)
    assert shapes(prox.init(jax.random.key(0), x)) == shapes(params)
    # the plain model's parameters (a checkpoint of it) run the ProxProp model unchanged
    np.testing.assert_allclose(prox.apply(params, x), plain.apply(params, x), rtol=1e-6)


def test_setup_and_explicit_names_are_kept():
    class Named(nn.Module):
        def setup(self):
            self.first = ProxPropDense(3)
            self.second = proxprop_module(nn.DenseGeneral)(2)

        def __call__(self, x):
            return self.second(self.first(x))

    class Explicit(nn.Module):
        @nn.compact
        def __call__(self, x):
            return ProxPropDense(2, name="ProxPropDense_0")(ProxPropDense(3, name="mine")(x))

    x = jnp.ones((2, 4))
    assert set(Named().init(jax.random.key(0), x)["params"]) == {"first", "second"}
    assert set(Explicit().init(jax.random.key(0), x)["params"]) == {"mine", "ProxPropDense_0"}


def test_zoo_models_take_proxprop_layers():
    key = jax.random.key(0)
    shapes = lambda model: jax.eval_shape(functools.partial(zoo.init_params, model), key)
    for name, layers in [
        ("proxprop-mlp", {"dense": functools.partial(ProxPropDense, tau_prox=0.05)}),
        (
            "proxprop-convnet",
            {"conv": functools.partial(ProxPropConv, optimization_mode="prox_cg3")},
        ),
    ]:
        assert shapes(zoo.make_model(name, **layers)) == shapes(zoo.make_model(name))
    plain = zoo.make_model("mlp-small")
    prox = zoo.make_model("mlp-small", dense=functools.partial(ProxPropDense, tau_prox=0.05))
    params = {"params": zoo.init_params(plain, key)}
    x = jnp.asarray(_rand(3, 2, 28, 28, 1))
    np.testing.assert_allclose(
        jax.jit(prox.apply)(params, x), jax.jit(plain.apply)(params, x), rtol=1e-5, atol=1e-6
    )


# ---------------------------------------------------------------- nnx


def test_nnx_linear_matches_closed_form_and_interchanges():
    x, w, b, t = _dense_problem(3, 5, 2)
    layer = ProxPropLinear(5, 2, tau_prox=0.4, optimization_mode="prox_exact", rngs=nnx.Rngs(0))
    plain = nnx.Linear(5, 2, rngs=nnx.Rngs(0))
    assert jax.tree.map(jnp.shape, nnx.state(layer, nnx.Param)) == jax.tree.map(
        jnp.shape, nnx.state(plain, nnx.Param)
    )
    layer.kernel[...] = jnp.asarray(w)
    layer.bias[...] = jnp.asarray(b)
    grads = nnx.grad(lambda m: 0.5 * jnp.sum((m(x) - t) ** 2) / 3)(layer)
    _a, g, m = np_dense_system(x, w, b, t, 0.4)
    expected = np.linalg.solve(m, g)
    np.testing.assert_allclose(grads.kernel[...], expected[:-1], rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(grads.bias[...], expected[-1], rtol=RTOL, atol=ATOL)


def test_nnx_conv_matches_linen_conv():
    kw = CONV_CASES[0]
    params, loss, *_ = _conv_setup(kw, seed=4)
    linen = _jgrad(loss(ProxPropConv(**kw, tau_prox=0.5, optimization_mode="prox_cg2")))(params)
    layer = ProxPropNNXConv(
        2, 3, (3, 3), tau_prox=0.5, optimization_mode="prox_cg2", rngs=nnx.Rngs(0)
    )
    layer.kernel[...] = params["params"]["kernel"]
    layer.bias[...] = params["params"]["bias"]
    x = jnp.asarray(_rand(4, 2, 5, 5, 2))
    t = jnp.asarray(_rand(5, 2, 5, 5, 3))
    grads = nnx.grad(lambda m: 0.5 * jnp.sum((m(x) - t) ** 2) / 2)(layer)
    np.testing.assert_allclose(grads.kernel[...], linen["params"]["kernel"], rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(grads.bias[...], linen["params"]["bias"], rtol=RTOL, atol=ATOL)


# ---------------------------------------------------------------- training with optax


@pytest.mark.parametrize(
    "tx",
    [optax.sgd(0.5), optax.sgd(0.5, momentum=0.9, nesterov=True), optax.adam(1e-2)],
    ids=["sgd", "nesterov", "adam"],
)
def test_jitted_training_with_optax(tx):
    images = jnp.asarray(np.random.default_rng(0).integers(0, 255, (16, 4, 4), np.uint8))
    labels = jnp.arange(16) % 3
    model = zoo.MLP(
        hidden=(8,), num_classes=3, dense=functools.partial(ProxPropDense, tau_prox=0.5)
    )
    problem = train.Problem(lambda p, x: model.apply({"params": p}, x))
    params = model.init(jax.random.key(0), jnp.zeros((1, 4, 4, 1)))["params"]
    step = train.jit_step(train.make_step(problem, tx))
    state = train.init_state(params, tx, jax.random.key(1))
    losses = []
    for _ in range(25):
        state, loss = step(state, images, labels)
        losses.append(float(loss))
    assert step._cache_size() == 1  # no recompilation after the first call
    assert int(state.skipped) == 0
    assert losses[-1] < 0.7 * losses[0]


def test_non_finite_batch_leaves_parameters_untouched():
    model = zoo.MLP(hidden=(4,), num_classes=2, dense=ProxPropDense)
    problem = train.Problem(lambda p, x: model.apply({"params": p}, x))
    params = model.init(jax.random.key(0), jnp.zeros((1, 2, 2, 1)))["params"]
    tx = optax.sgd(0.1)
    step = jax.jit(train.make_step(problem, tx, preprocess=lambda x: x))
    state = train.init_state(params, tx, jax.random.key(1))
    bad = jnp.full((3, 2, 2, 1), jnp.nan)
    state, _ = step(state, bad, jnp.array([0, 1, 0]))
    assert int(state.skipped) == 1
    jax.tree.map(np.testing.assert_array_equal, state.params, params)


# ---------------------------------------------------------------- bfloat16


def _bf16_exact(a):
    """float32 values that bfloat16 represents exactly (so the reference sees the same data)."""
    return np.asarray(jnp.asarray(a, jnp.bfloat16).astype(jnp.float32))


def test_bfloat16_dense_exact_solves_in_float32():
    # A bfloat16 solve loses 1-2 % of the direction; in float32 only the final rounding to
    # bfloat16 remains (half an ulp, 2^-9 relative).
    n, fan_in, fan_out, tau = 48, 24, 4, 0.5
    x = _bf16_exact(_rand(40, n, fan_in))
    w = _bf16_exact(_rand(41, fan_in, fan_out) * 0.5)
    b = np.zeros(fan_out, np.float32)
    g_z = _bf16_exact(_rand(42, n, fan_out) / n)

    def direction(x, w, b):
        out = lambda w, b: jnp.vdot(
            proxprop_dense(x, w, b, tau_prox=tau, optimization_mode="prox_exact").astype(
                jnp.float32
            ),
            g_z,
        )
        return jax.grad(out, argnums=(0, 1))(w, b)

    bf = [jnp.asarray(a, jnp.bfloat16) for a in (x, w, b)]
    d_w, d_b = jax.jit(direction)(*bf)
    assert d_w.dtype == d_b.dtype == jnp.bfloat16
    a = np.hstack([x, np.ones((n, 1))]).astype(np.float64)
    expected = np.linalg.solve(a.T @ a + np.eye(fan_in + 1) / tau, a.T @ g_z)
    got = np.vstack([np.asarray(d_w, np.float64), np.asarray(d_b, np.float64)[None]])
    np.testing.assert_allclose(got, expected, rtol=2**-8, atol=1e-7)


def test_bfloat16_layers_keep_dtypes_and_solve_in_float32():
    # The generic op (one CG over all parameters) and the linen layer with bfloat16 parameters:
    # directions come back in bfloat16 and equal the float32 computation on the same values,
    # rounded once.
    x = jnp.asarray(_bf16_exact(_rand(43, 6, 5)))
    t = jnp.asarray(_bf16_exact(_rand(44, 6, 3)))
    layer_cls = proxprop_module(nn.DenseGeneral)
    for module in (
        layer_cls(3, tau_prox=0.5, optimization_mode="prox_cg3"),
        ProxPropDense(3, tau_prox=0.5, optimization_mode="prox_cg3"),
    ):
        params = module.init(jax.random.key(0), x)
        params = jax.tree.map(lambda p: jnp.asarray(_bf16_exact(p)), params)
        # a linear loss: the output cotangent is t in both dtypes
        loss = lambda p, x, m=module: jnp.vdot(m.apply(p, x).astype(jnp.float32), t)
        grad = _jgrad(loss)
        low = grad(jax.tree.map(lambda p: p.astype(jnp.bfloat16), params), x.astype(jnp.bfloat16))
        high = grad(params, x)
        for lo, hi in zip(jax.tree.leaves(low), jax.tree.leaves(high), strict=True):
            assert lo.dtype == jnp.bfloat16
            np.testing.assert_allclose(np.asarray(lo, np.float32), hi, rtol=2**-8, atol=1e-6)
