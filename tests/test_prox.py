"""The proximal operators against their definition, computed independently in numpy/scipy.

prox_{tR}(x) = argmin_u t R(u) + 1/2 ||u - x||^2: optimality conditions, brute-force
minimisation on tiny inputs, the Moreau identity against a bisection l1-ball projection, and
property tests (non-expansiveness, exact zeros).
"""

from __future__ import annotations

import functools
import itertools

import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import scipy.optimize
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxopt_suite import prox, proximal, train

RNG = np.random.default_rng(0)


# ----------------------------------------------------------------------------- references
def np_project_l1_ball(v: np.ndarray, radius: float) -> np.ndarray:
    """Projection onto the l1 ball by bisection on the threshold (float64, no sort)."""
    v = np.asarray(v, np.float64)
    a = np.abs(v)
    if a.sum() <= radius:
        return v.copy()
    lo, hi = 0.0, a.max()
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if np.maximum(a - mid, 0).sum() > radius else (lo, mid)
    return np.sign(v) * np.maximum(a - (lo + hi) / 2, 0)


def np_threshold_sorted(a: np.ndarray, radius: float) -> float:
    """Duchi et al.'s sort-based threshold (an independent formula)."""
    u = np.sort(a)[::-1].astype(np.float64)
    if u.sum() <= radius:
        return 0.0
    cssv = np.cumsum(u) - radius
    j = np.arange(1, len(u) + 1)
    active = np.nonzero(u * j > cssv)[0]
    if radius == 0:  # the ball is {0}: everything is subtracted
        return u[0]
    return cssv[active[-1]] / (active[-1] + 1)


def np_group_columns(x: np.ndarray, axis: int) -> np.ndarray:
    moved = np.moveaxis(x, axis, 0)
    return moved.reshape(moved.shape[0], -1)


REGULARISERS = {
    "l1": lambda u: np.abs(u).sum(),
    "l2": lambda u: np.linalg.norm(u.ravel()),
    "l21": lambda u: np.linalg.norm(np_group_columns(u, -1), axis=1).sum(),
    "linf": lambda u: np.abs(u).max(),
    "linf1": lambda u: np.abs(np_group_columns(u, -1)).max(axis=1).sum(),
    "elastic_net": lambda u: np.abs(u).sum() + 0.7 / 2 * (u**2).sum(),
}
OPERATORS = {
    "l1": prox.l1,
    "l2": prox.l2,
    "l21": prox.l21,
    "linf": prox.linf,
    "linf1": prox.linf1,
    "elastic_net": functools.partial(prox.elastic_net, gamma=0.7),
}
ALL_OPERATORS = {**OPERATORS, "log_barrier": prox.log_barrier, "l0": prox.l0}


def objective(name: str, u: np.ndarray, x: np.ndarray, t: float) -> float:
    return t * REGULARISERS[name](u) + 0.5 * ((u - x) ** 2).sum()


# ----------------------------------------------------------------------------- minimisers
@pytest.mark.parametrize("name", sorted(OPERATORS))
@pytest.mark.parametrize("t", [0.1, 1.5])
def test_is_the_minimiser_brute_force(name, t):
    """No perturbation and no general-purpose optimiser finds a lower objective."""
    x = RNG.normal(size=(3, 2))
    p = np.asarray(OPERATORS[name](jnp.asarray(x, jnp.float32), t), np.float64)
    best = objective(name, p, x, t)
    for scale in (1e-3, 1e-2, 1e-1, 1.0):
        for delta in RNG.normal(size=(200, 3, 2)) * scale:
            assert best <= objective(name, p + delta, x, t) + 1e-5
    found = scipy.optimize.minimize(
        lambda u: objective(name, u.reshape(x.shape), x, t),
        x.ravel(),
        method="Powell",
        options={"xtol": 1e-10, "ftol": 1e-12, "maxiter": 20000},
    )
    assert best <= found.fun + 1e-5
    # The objective is 1-strongly convex: F(u) - F(p*) >= |u - p*|^2 / 2 for the minimiser p*.
    gap = ((found.x.reshape(x.shape) - p) ** 2).sum() / 2
    assert gap <= found.fun - best + 1e-5


def test_l0_is_the_minimiser_over_all_supports():
    x = np.array([0.3, -1.2, 0.05, 2.0])
    for t in (0.01, 0.1, 0.5, 1.5):
        p = np.asarray(prox.l0(jnp.asarray(x, jnp.float32), t), np.float64)
        best = min(
            t * sum(s) + 0.5 * sum(xi**2 for xi, keep in zip(x, s, strict=True) if not keep)
            for s in itertools.product([0, 1], repeat=len(x))
        )
        value = t * np.count_nonzero(p) + 0.5 * ((p - x) ** 2).sum()
        assert value == pytest.approx(best, abs=1e-6)
        np.testing.assert_allclose(p, np.where(x**2 / 2 > t, x, 0), atol=1e-7)


def test_log_barrier_solves_its_optimality_condition():
    # d/du [-t log u + (u - x)^2 / 2] = 0  <=>  u^2 - x u - t = 0 with u > 0.
    x = np.array([-1e3, -3.0, -0.1, 0.0, 0.2, 5.0])
    for t in (1e-4, 0.1, 2.0):
        p = np.asarray(prox.log_barrier(jnp.asarray(x, jnp.float32), t), np.float64)
        assert np.all(p > 0)
        # float32 rounding of p, relative to |x|, limits the accuracy of p - x.
        assert np.all(np.abs((p - x) - t / p) <= 1e-5 * t / p + 4e-7 * np.abs(x))
        grid = p[:, None] * np.linspace(0.5, 1.5, 101)[None]
        values = -t * np.log(grid) + 0.5 * (grid - x[:, None]) ** 2
        assert np.all(-t * np.log(p) + 0.5 * (p - x) ** 2 <= values.min(axis=1) + 1e-6)


# ------------------------------------------------------------------- optimality conditions
def test_l1_and_elastic_net_optimality():
    x = RNG.normal(size=50)
    t, gamma = 0.4, 0.7
    p = np.asarray(prox.l1(jnp.asarray(x, jnp.float32), t), np.float64)
    nz = p != 0
    np.testing.assert_allclose(x[nz] - p[nz], t * np.sign(p[nz]), atol=1e-6)
    assert np.all(np.abs(x[~nz]) <= t)
    q = np.asarray(prox.elastic_net(jnp.asarray(x, jnp.float32), t, gamma), np.float64)
    nz = q != 0
    np.testing.assert_allclose(x[nz] - q[nz] - t * gamma * q[nz], t * np.sign(q[nz]), atol=1e-6)
    assert np.all(np.abs(x[~nz]) <= t)


@pytest.mark.parametrize("group_axis", [0, -1])
def test_l21_optimality(group_axis):
    x = RNG.normal(size=(6, 5, 2)) * np.linspace(0.1, 1.5, 5)[None, :, None]
    t = 1.0
    p = np.asarray(prox.l21(jnp.asarray(x, jnp.float32), t, group_axis), np.float64)
    for xg, pg in zip(
        np_group_columns(x, group_axis), np_group_columns(p, group_axis), strict=True
    ):
        if np.any(pg != 0):
            np.testing.assert_allclose(xg - pg, t * pg / np.linalg.norm(pg), atol=1e-5)
        else:
            assert np.linalg.norm(xg) <= t + 1e-6


@pytest.mark.parametrize(("group_axis", "t"), [(0, 0.01), (1, 0.5), (-1, 2.5)])
def test_linf1_optimality(group_axis, t):
    """v = x - p is in t * subdifferential of ||.||_inf at p: ||v||_1 <= t, and for p != 0
    ||v||_1 = t with <v, p> = t ||p||_inf (the dual-norm pairing)."""
    x = RNG.normal(size=(4, 6, 3)) * np.array([0.02, 0.3, 1.0])[None, None, :]
    p = np.asarray(prox.linf1(jnp.asarray(x, jnp.float32), t, group_axis), np.float64)
    for xg, pg in zip(
        np_group_columns(x, group_axis), np_group_columns(p, group_axis), strict=True
    ):
        v = xg - pg
        if np.any(pg != 0):
            assert np.abs(v).sum() == pytest.approx(t, rel=1e-4, abs=1e-6)
            assert v @ pg == pytest.approx(t * np.abs(pg).max(), rel=1e-4, abs=1e-6)
        else:
            assert np.abs(xg).sum() <= t * (1 + 1e-6)


# ------------------------------------------------------------------------- Moreau identity
@pytest.mark.parametrize("shape", [(3, 4), (50,)])  # both threshold algorithms
def test_linf_moreau_identity(shape):
    for t in (0.0, 0.05, 1.0, 100.0):
        x = RNG.normal(size=shape)
        projected = np_project_l1_ball(x.ravel(), t).reshape(shape)
        p = np.asarray(prox.linf(jnp.asarray(x, jnp.float32), t), np.float64)
        np.testing.assert_allclose(p, x - projected, atol=1e-5)
        np.testing.assert_allclose(
            prox.project_l1_ball(jnp.asarray(x, jnp.float32), t), projected, atol=1e-5
        )


@pytest.mark.parametrize("size", [3, 300])  # both threshold algorithms
def test_linf1_moreau_identity_per_group(size):
    x = RNG.normal(size=(size, 5)) * np.array([1e-3, 0.01, 0.1, 1.0, 3.0])
    linf1 = jax.jit(prox.linf1)
    for t in (0.001, 0.3, 5.0):
        p = np.asarray(linf1(jnp.asarray(x, jnp.float32), t), np.float64)
        for j in range(5):
            expected = x[:, j] - np_project_l1_ball(x[:, j], t)
            np.testing.assert_allclose(p[:, j], expected, atol=2e-5)


@pytest.mark.parametrize("size", [2, 32, 33, 500])  # pairwise up to 32, then Newton
def test_l1_ball_threshold_matches_sort_formula(size):
    a = np.abs(RNG.normal(size=(size, 8))).astype(np.float32)
    a[:, 0] = 0.0  # a zero column
    a[:, 1] = 0.25  # all ties
    a[: size // 2, 2] = a[0, 2]  # half ties
    for radius in (0.0, 1e-4, 0.1, 1.0, 1e4):
        theta = np.asarray(prox.l1_ball_threshold(jnp.asarray(a), radius))
        expected = [np_threshold_sorted(a[:, j], radius) for j in range(8)]
        np.testing.assert_allclose(theta, expected, rtol=1e-5, atol=1e-7)
        # A kernel and its bias row, given separately, form one vector per column.
        split = prox.l1_ball_threshold([jnp.asarray(a[:-1]), jnp.asarray(a[-1:])], radius)
        np.testing.assert_allclose(split, expected, rtol=1e-5, atol=1e-7)


# --------------------------------------------------------------------------- property tests
# No subnormals: XLA on CPU flushes them to zero (a strength of 4e-45 acts as 0 there).
finite = st.floats(-10, 10, allow_nan=False, allow_subnormal=False, width=32)
pairs = hnp.arrays(np.float32, (2, 4, 3), elements=finite)
strengths = st.floats(0, 5, allow_subnormal=False, width=32)


@functools.cache
def _jitted(name):
    return jax.jit(ALL_OPERATORS[name])


@pytest.mark.parametrize("name", sorted(OPERATORS))
@settings(max_examples=40, deadline=None)
@given(xy=pairs, t=strengths)
def test_non_expansive(name, xy, t):
    px, py = (np.asarray(_jitted(name)(jnp.asarray(v), t), np.float64) for v in xy)
    diff = np.linalg.norm(xy[0].astype(np.float64) - xy[1])
    assert np.linalg.norm(px - py) <= diff * (1 + 1e-5) + 1e-5


@settings(max_examples=60, deadline=None)
@given(x=hnp.arrays(np.float32, (4, 3), elements=finite), t=strengths)
def test_exact_zeros(x, t):
    t = np.float32(t)
    x64 = x.astype(np.float64)
    p = np.asarray(_jitted("l1")(jnp.asarray(x), t))
    assert np.all(p[np.abs(x64) < t * (1 - 1e-6)] == 0)
    q = np.asarray(_jitted("l21")(jnp.asarray(x), t))
    small = np.linalg.norm(x64, axis=0) < t * (1 - 1e-5)
    assert np.all(q[:, small] == 0)
    r = np.asarray(_jitted("linf1")(jnp.asarray(x), t))
    small = np.abs(x64).sum(axis=0) < t * (1 - 1e-5)
    assert np.all(r[:, small] == 0)
    assert np.all(np.isfinite(r)) and np.all(np.isfinite(q))
    s = np.asarray(_jitted("l0")(jnp.asarray(x), t))
    assert np.all(s[np.abs(x64) <= np.sqrt(2 * t) * (1 - 1e-6)] == 0)


# ---------------------------------------------------------------- transformations of jax
@pytest.mark.parametrize("name", sorted(ALL_OPERATORS))
def test_zero_strength_is_the_identity(name):
    x = jnp.asarray(RNG.normal(size=(5, 3)), jnp.float32)
    np.testing.assert_array_equal(ALL_OPERATORS[name](x, 0.0), x)
    np.testing.assert_array_equal(jax.jit(ALL_OPERATORS[name])(x, 0.0), x)


@pytest.mark.parametrize("name", sorted(OPERATORS))
def test_zero_group_gives_zeros_and_finite_gradients(name):
    fn = OPERATORS[name]
    x = jnp.zeros((4, 3)).at[:, 0].set(1.0)
    grads = jax.jit(jax.grad(lambda x, t: fn(x, t).sum(), argnums=(0, 1)))
    for t in (0.0, 0.5):
        out = fn(x, t)
        assert np.all(np.isfinite(out))
        np.testing.assert_array_equal(out[:, 1:], 0.0)
        for point in (x, jnp.zeros((4, 3))):
            grad_x, grad_t = grads(point, jnp.float32(t + 0.1))
            assert np.all(np.isfinite(grad_x)) and np.isfinite(grad_t)
        grad_x, _ = grads(jnp.zeros((4, 3)), jnp.float32(t))
        assert np.all(np.isfinite(grad_x))


@pytest.mark.parametrize("name", sorted(ALL_OPERATORS))
def test_traced_strength_jit_and_vmap(name):
    fn = ALL_OPERATORS[name]
    xs = jnp.asarray(RNG.normal(size=(3, 40, 2)), jnp.float32)
    ts = jnp.array([0.0, 0.3, 2.0], jnp.float32)
    eager = np.stack([fn(x, float(t)) for x, t in zip(xs, ts, strict=True)])
    np.testing.assert_allclose(jax.jit(jax.vmap(fn))(xs, ts), eager, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", sorted(ALL_OPERATORS))
def test_gradients_match_finite_differences(name):
    fn = ALL_OPERATORS[name]
    rng = np.random.default_rng(1)
    x = rng.normal(size=(40, 3)) * np.array([0.05, 0.5, 2.0])
    w = rng.normal(size=x.shape)
    direction = rng.normal(size=x.shape)
    t = 0.3
    f = jax.jit(lambda x, t: jnp.vdot(fn(x, t), jnp.asarray(w, jnp.float32)))
    gx, gt = jax.jit(jax.grad(f, argnums=(0, 1)))(jnp.asarray(x, jnp.float32), jnp.float32(t))
    eps = 1e-3
    f64 = lambda x, t: float(f(jnp.asarray(x, jnp.float32), t))
    fd_x = (f64(x + eps * direction, t) - f64(x - eps * direction, t)) / (2 * eps)
    fd_t = (f64(x, t + eps) - f64(x, t - eps)) / (2 * eps)
    assert float(jnp.vdot(gx, direction)) == pytest.approx(fd_x, rel=2e-2, abs=2e-2)
    assert float(gt) == pytest.approx(fd_t, rel=2e-2, abs=2e-2)


@pytest.mark.parametrize("name", sorted(ALL_OPERATORS))
def test_dtypes_are_kept(name):
    x32 = jnp.asarray(RNG.normal(size=(6, 40)), jnp.float32)
    fn = jax.jit(ALL_OPERATORS[name])
    for dtype, tolerance in ((jnp.bfloat16, 2e-2), (jnp.float16, 2e-3)):
        out = fn(x32.astype(dtype), 0.2)
        assert out.dtype == dtype
        reference = fn(x32.astype(dtype).astype(jnp.float32), 0.2)
        np.testing.assert_allclose(
            out.astype(jnp.float32), reference, rtol=tolerance, atol=tolerance
        )


@pytest.mark.parametrize("name", sorted(ALL_OPERATORS))
def test_nan_is_never_hidden(name):
    x = jnp.asarray(RNG.normal(size=(5, 3)), jnp.float32).at[2, 1].set(jnp.nan)
    assert not np.all(np.isfinite(ALL_OPERATORS[name](x, 0.3)))


NEGATIVE_STRENGTH_OPERATORS = {
    **ALL_OPERATORS,
    "project_l1_ball": prox.project_l1_ball,
    "elastic_net_negative_gamma": lambda x, t: prox.elastic_net(x, jnp.abs(t), gamma=t),
}


@pytest.mark.parametrize("name", sorted(NEGATIVE_STRENGTH_OPERATORS))
@pytest.mark.parametrize("size", [6, 60], ids=["pairwise", "newton"])  # both l1-ball paths
def test_traced_negative_strength_gives_nan_everywhere(name, size):
    """Under jit a negative strength cannot raise; every entry is NaN instead of the grown
    (l1 with t < 0 would give sign(x)(|x| + |t|)) or unchanged (l0, log_barrier) values, and
    zeros of x are NaN too. A valid strength in the same compiled function is unaffected."""
    fn = jax.jit(NEGATIVE_STRENGTH_OPERATORS[name])
    x = jnp.asarray(RNG.normal(size=(size, 2)), jnp.float32).at[0].set(0.0)
    for t in (-1.0, -1e-30, np.nan):
        out = fn(x, jnp.float32(t))
        assert out.shape == x.shape
        assert np.all(np.isnan(out)), (t, out)
    valid = NEGATIVE_STRENGTH_OPERATORS[name](x, 0.3)
    np.testing.assert_allclose(fn(x, jnp.float32(0.3)), valid, rtol=1e-6, atol=1e-7)
    assert np.all(np.isfinite(valid))


def test_traced_negative_strength_through_vmap_only_hits_its_own_row():
    xs = jnp.asarray(RNG.normal(size=(2, 5)), jnp.float32)
    out = jax.jit(jax.vmap(prox.l1))(xs, jnp.array([0.5, -0.5], jnp.float32))
    np.testing.assert_array_equal(out[0], prox.l1(xs[0], 0.5))
    assert np.all(np.isnan(out[1]))


def test_public_helpers_give_nan_for_a_negative_strength():
    norm = jnp.array([0.0, 0.5, 2.0])
    np.testing.assert_allclose(prox.l2_shrinkage(norm, 1.0), [0.0, 0.0, 0.5])
    assert np.all(np.isnan(jax.jit(prox.l2_shrinkage)(norm, -1.0)))
    columns = jnp.abs(jnp.asarray(RNG.normal(size=(40, 3)), jnp.float32))
    for rows in (5, 40):  # the pairwise and the Newton path
        theta = jax.jit(prox.l1_ball_threshold)(columns[:rows], -0.5)
        assert theta.shape == (3,) and np.all(np.isnan(theta))


def test_training_step_refuses_a_negative_traced_strength():
    """proximal(prox.l1) with an injected negative reg: the updates are NaN, and
    train.make_step keeps every parameter (a positive reg does move them)."""
    params = {"w": jnp.asarray(RNG.normal(size=(3, 2)), jnp.float32)}
    problem = train.Problem(lambda p, x: x @ p["w"])
    images = jnp.asarray(RNG.normal(size=(4, 3)), jnp.float32)
    labels = jnp.array([0, 1, 0, 1])
    for reg, moved in ((-0.1, False), (0.1, True)):
        tx = optax.chain(
            optax.sgd(0.1),
            optax.inject_hyperparams(proximal, static_args="prox_fn")(prox.l1, 0.1, 0.1),
        )
        state = train.init_state(params, tx, jax.random.key(0))
        state.opt_state[1].hyperparams["reg"] = jnp.float32(reg)
        step = jax.jit(train.make_step(problem, tx, preprocess=lambda x: x))
        new_state, _ = step(state, images, labels)
        assert np.all(np.isfinite(new_state.params["w"]))
        assert np.any(new_state.params["w"] != params["w"]) == moved


def test_any_shape():
    for shape in [(), (2, 3, 4, 5)]:
        x = jnp.asarray(RNG.normal(size=shape), jnp.float32)
        for name in ("l1", "l2", "linf", "elastic_net", "log_barrier", "l0"):
            assert _jitted(name)(x, 0.1).shape == shape
    x = jnp.asarray(RNG.normal(size=(2, 3, 4, 5)), jnp.float32)
    assert jax.jit(prox.l21, static_argnums=2)(x, 0.1, 1).shape == x.shape
    assert jax.jit(prox.linf1, static_argnums=2)(x, 0.1, 2).shape == x.shape
    assert prox.linf(jnp.zeros((0,)), 0.1).shape == (0,)


# ------------------------------------------------------------------------------ bad input
def test_bad_input():
    x = jnp.ones((3, 2))
    for name, fn in ALL_OPERATORS.items():
        with pytest.raises(ValueError, match="strength"):
            fn(x, -0.1)
        with pytest.raises(TypeError, match="floating"):
            fn(jnp.ones(3, jnp.int32), 0.1)
        assert name
    with pytest.raises(ValueError, match="strength must be a scalar"):
        prox.l1(x, jnp.ones(2))
    for fn in (prox.l21, prox.linf1):
        with pytest.raises(ValueError, match="group_axis"):
            fn(x, 0.1, group_axis=2)
        with pytest.raises(ValueError, match="group_axis"):
            fn(jnp.float32(1.0), 0.1)
    with pytest.raises(ValueError, match="gamma"):
        prox.elastic_net(x, 0.1, gamma=-1.0)
    with pytest.raises(ValueError, match="radius"):
        prox.project_l1_ball(x, -1.0)
