"""AliG against an independent numpy implementation of its formulas (REFERENCE.md §1).

The numpy optimizer below follows the reference's order of operations (θ -= γg, then the
momentum correction, then the projection) in float64 with closed-form least-squares gradients;
the JAX side uses autodiff and ``optax.apply_updates`` in float32.
"""

from __future__ import annotations

import functools
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxopt_suite
from jaxopt_suite._src.alig import (
    AligState,
    ScaleByAligState,
    alig,
    global_sq_norm,
    project_l2_ball,
    scale_by_alig,
)
from jaxopt_suite.harness import recipes, train

# --- a small least-squares problem with two parameter leaves -------------------------------

N_IN, N_OUT, N_SAMPLES, N_BATCHES = 5, 3, 32, 4


def make_problem(seed: int = 0, noise: float = 0.0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(N_SAMPLES, N_IN))
    w_true = rng.normal(size=(N_IN, N_OUT))
    y = x @ w_true + 0.5 + noise * rng.normal(size=(N_SAMPLES, N_OUT))
    params = {"w": 0.1 * rng.normal(size=(N_IN, N_OUT)), "b": np.zeros(N_OUT)}
    return x, y, params


def np_loss_and_grad(params, x, y):
    residual = x @ params["w"] + params["b"] - y
    n = len(x)
    loss = 0.5 * np.sum(residual**2) / n
    return loss, {"w": x.T @ residual / n, "b": residual.sum(0) / n}


def jax_loss(params, x, y):
    return 0.5 * jnp.sum((x @ params["w"] + params["b"] - y) ** 2) / x.shape[0]


def batch(x, y, t):
    size = N_SAMPLES // N_BATCHES
    sl = slice((t % N_BATCHES) * size, (t % N_BATCHES + 1) * size)
    return x[sl], y[sl]


class NumpyAlig:
    """The reference optimizer's step, written from REFERENCE.md in float64."""

    def __init__(
        self, params, max_lr=None, momentum=0.0, adjusted=False, eps=1e-5, f_min=0.0, max_norm=None
    ):
        self.max_lr, self.momentum, self.adjusted = max_lr, momentum, adjusted
        self.eps, self.f_min, self.max_norm = eps, f_min, max_norm
        self.velocity = {k: np.zeros_like(v) for k, v in params.items()}

    def step(self, params, loss, grads):
        sq = sum(float(np.sum(g**2)) for g in grads.values())
        unclipped = max(loss - self.f_min, 0.0) / (sq + self.eps)
        gamma = unclipped if self.max_lr is None else min(unclipped, self.max_lr)
        new = {}
        for k, p in params.items():
            g, v = grads[k], self.velocity[k]
            p = p - gamma * g
            if self.momentum:
                if self.adjusted:
                    v = self.momentum * v - g
                    p = p + gamma * self.momentum * v
                else:
                    v = self.momentum * v - gamma * g
                    p = p + self.momentum * v
                self.velocity[k] = v
            new[k] = p
        if self.max_norm is not None:
            norm = np.sqrt(sum(np.sum(p**2) for p in new.values()))
            if norm > self.max_norm:
                new = {k: p * self.max_norm / norm for k, p in new.items()}
        return new, gamma, unclipped


def run_jax(tx, params, x, y, steps, dtype=jnp.float32):
    params = jax.tree.map(lambda a: jnp.asarray(a, dtype), params)
    state = tx.init(params)

    @jax.jit
    def step(params, state, xb, yb):
        value, grads = jax.value_and_grad(jax_loss)(params, xb, yb)
        updates, state = tx.update(grads, state, params, value=value)
        return optax.apply_updates(params, updates), state, updates

    trajectory, states = [], []
    for t in range(steps):
        xb, yb = batch(x, y, t)
        params, state, _ = step(params, state, jnp.asarray(xb, dtype), jnp.asarray(yb, dtype))
        trajectory.append(params)
        states.append(state)
    return trajectory, states


def run_numpy(opt, params, x, y, steps):
    trajectory, gammas, unclipped = [], [], []
    for t in range(steps):
        xb, yb = batch(x, y, t)
        loss, grads = np_loss_and_grad(params, xb, yb)
        params, gamma, raw = opt.step(params, loss, grads)
        trajectory.append(params)
        gammas.append(gamma)
        unclipped.append(raw)
    return trajectory, np.array(gammas), np.array(unclipped)


def assert_trajectories_close(jax_traj, np_traj, rtol=2e-4, atol=2e-5):
    for t, (pj, pn) in enumerate(zip(jax_traj, np_traj, strict=True)):
        for k in pn:
            np.testing.assert_allclose(
                np.asarray(pj[k], np.float64),
                pn[k],
                rtol=rtol,
                atol=atol,
                err_msg=f"leaf {k} after step {t + 1}",
            )


STEPS = 40
CASES = {
    # name: (alig kwargs, numpy kwargs, problem noise)
    "plain": (dict(), dict(), 0.0),
    "clipped": (dict(max_lr=0.3), dict(max_lr=0.3), 0.0),
    "momentum": (dict(max_lr=0.3, momentum=0.8), dict(max_lr=0.3, momentum=0.8), 0.0),
    "momentum-unclipped": (dict(momentum=0.5), dict(momentum=0.5), 0.0),
    "adjusted": (
        dict(max_lr=0.3, momentum=0.8, adjusted_momentum=True),
        dict(max_lr=0.3, momentum=0.8, adjusted=True),
        0.0,
    ),
    "f_min": (dict(max_lr=0.5, f_min=0.02), dict(max_lr=0.5, f_min=0.02), 0.3),
    "eps": (dict(eps=0.5), dict(eps=0.5), 0.0),
    "projection": (
        dict(max_lr=0.3, momentum=0.8, projection=functools.partial(project_l2_ball, max_norm=2.0)),
        dict(max_lr=0.3, momentum=0.8, max_norm=2.0),
        0.0,
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_alig_matches_numpy_reference(case):
    kwargs, np_kwargs, noise = CASES[case]
    x, y, params = make_problem(noise=noise)
    jax_traj, states = run_jax(alig(**kwargs), params, x, y, STEPS)
    np_traj, gammas, unclipped = run_numpy(NumpyAlig(params, **np_kwargs), params, x, y, STEPS)
    assert_trajectories_close(jax_traj, np_traj)
    floats = (jax_traj[-1], states[-1].velocity, states[-1].alig.step_size)
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(floats))
    np.testing.assert_allclose([float(s.alig.step_size) for s in states], gammas, rtol=1e-3)
    np.testing.assert_allclose(
        [float(s.alig.unclipped_step_size) for s in states], unclipped, rtol=1e-3
    )
    if "max_lr" in np_kwargs:  # the clip must both bind and not bind along the trajectory
        clipped = unclipped > np_kwargs["max_lr"]
        assert clipped.any() and not clipped.all()
    if "max_norm" in np_kwargs:  # the projection must be active
        unprojected = NumpyAlig(params, **{**np_kwargs, "max_norm": None})
        free = run_numpy(unprojected, params, x, y, STEPS)[0][-1]
        assert np.sqrt(sum(np.sum(p**2) for p in free.values())) > 2.0
        final = jax_traj[-1]
        assert float(jnp.sqrt(global_sq_norm(final))) <= 2.0 * (1 + 1e-5)


def test_scale_by_alig_multiplies_by_step_size():
    x, y, params = make_problem()
    loss, grads = np_loss_and_grad(params, x, y)
    sq = sum(np.sum(g**2) for g in grads.values())
    for max_lr in (None, 1e-3):
        tx = scale_by_alig(max_lr=max_lr, eps=1e-3, f_min=0.1)
        jgrads = jax.tree.map(jnp.asarray, grads)
        out, state = tx.update(jgrads, tx.init(jgrads), value=jnp.asarray(loss))
        gamma = (loss - 0.1) / (sq + 1e-3)
        if max_lr is not None:
            gamma = min(gamma, max_lr)
        for k in grads:
            np.testing.assert_allclose(out[k], gamma * grads[k], rtol=1e-5, atol=1e-7)
        assert isinstance(state, ScaleByAligState)
        np.testing.assert_allclose(state.step_size, gamma, rtol=1e-5)
        np.testing.assert_allclose(state.unclipped_step_size, (loss - 0.1) / (sq + 1e-3), rtol=1e-5)


def test_loss_below_f_min_gives_no_step():
    grads = {"w": jnp.ones(3)}
    tx = alig(f_min=1.0)
    updates, state = tx.update(grads, tx.init(grads), grads, value=jnp.asarray(0.5))
    np.testing.assert_array_equal(updates["w"], np.zeros(3))
    assert float(state.alig.step_size) == 0.0


def test_squared_norm_is_global_over_leaves():
    tree = {"a": jnp.array([3.0]), "b": jnp.array([[4.0, 12.0]])}
    np.testing.assert_allclose(global_sq_norm(tree), 9.0 + 16.0 + 144.0)
    tx = scale_by_alig()
    # γ = 169 / (169 + eps): one norm over both leaves; per-leaf norms would give 169/9 etc.
    out, _ = tx.update(tree, tx.init(tree), value=jnp.asarray(169.0))
    np.testing.assert_allclose(out["a"], 3.0 * 169 / (169 + 1e-5), rtol=1e-6)
    np.testing.assert_allclose(out["b"], np.array([[4.0, 12.0]]) * 169 / (169 + 1e-5), rtol=1e-6)


def test_project_l2_ball_whole_tree():
    tree = {"a": jnp.array([3.0, 0.0]), "b": jnp.array([4.0])}  # norm 5
    out = project_l2_ball(tree, 2.5)
    np.testing.assert_allclose(out["a"], [1.5, 0.0], rtol=1e-6)
    np.testing.assert_allclose(out["b"], [2.0], rtol=1e-6)
    same = project_l2_ball(tree, 10.0)
    np.testing.assert_array_equal(same["a"], tree["a"])
    # optax's projection is also joint over the tree; both agree
    ref = optax.projections.projection_l2_ball(tree, 2.5)
    np.testing.assert_allclose(out["a"], ref["a"], rtol=1e-6)
    bf16 = project_l2_ball({"a": jnp.ones(4, jnp.bfloat16)}, 1.0)
    assert bf16["a"].dtype == jnp.bfloat16
    np.testing.assert_allclose(bf16["a"].astype(np.float32), 0.5, rtol=1e-2)


@pytest.mark.parametrize(
    ("kwargs", "np_kwargs"),
    [
        (dict(max_lr=0.3, momentum=0.8), dict(max_lr=0.3, momentum=0.8)),
        (
            dict(
                max_lr=0.3,
                momentum=0.8,
                adjusted_momentum=True,
                projection=functools.partial(project_l2_ball, max_norm=2.0),
            ),
            dict(max_lr=0.3, momentum=0.8, adjusted=True, max_norm=2.0),
        ),
    ],
)
def test_bfloat16_is_kept(kwargs, np_kwargs):
    x, y, params = make_problem()
    traj, states = run_jax(alig(**kwargs), params, x, y, 5, dtype=jnp.bfloat16)
    for leaf in jax.tree.leaves((traj[-1], states[-1].velocity)):
        assert leaf.dtype == jnp.bfloat16
        assert np.all(np.isfinite(np.asarray(leaf, np.float32)))
    assert states[-1].alig.step_size.dtype == jnp.float32
    # bfloat16 keeps ~3 significant digits: the run still follows the exact one loosely
    np_traj, _, _ = run_numpy(NumpyAlig(params, **np_kwargs), params, x, y, 5)
    for k in params:
        np.testing.assert_allclose(
            np.asarray(traj[-1][k], np.float32), np_traj[-1][k], rtol=5e-2, atol=5e-2
        )
    sbs = scale_by_alig()
    g = jax.tree.map(lambda a: jnp.asarray(a, jnp.bfloat16), params)
    out, _ = sbs.update(g, sbs.init(g), value=jnp.asarray(1.0, jnp.bfloat16))
    assert all(leaf.dtype == jnp.bfloat16 for leaf in jax.tree.leaves(out))


def test_bfloat16_norm_and_step_size_are_float32():
    # 4097 is not a bfloat16 number (neighbours 4096 and 4112): an exact sum of 4097 squared
    # ones proves float32 accumulation; the step 1 / (4097 + eps) is then float32 as well.
    ones = {"a": jnp.ones(4000, jnp.bfloat16), "b": jnp.ones(97, jnp.bfloat16)}
    sq = global_sq_norm(ones)
    assert sq.dtype == jnp.float32 and float(sq) == 4097.0
    _, state = scale_by_alig(eps=0.0).update(ones, scale_by_alig().init(ones), value=1.0)
    assert state.step_size.dtype == jnp.float32
    np.testing.assert_allclose(float(state.step_size), 1 / 4097, rtol=1e-6)


def test_no_recompilation_on_second_call():
    traces = []
    tx = alig(max_lr=0.3, momentum=0.9)
    x, y, params = make_problem()
    params = jax.tree.map(jnp.asarray, params)

    @jax.jit
    def step(params, state, xb, yb):
        traces.append(1)
        value, grads = jax.value_and_grad(jax_loss)(params, xb, yb)
        updates, state = tx.update(grads, state, params, value=value)
        return optax.apply_updates(params, updates), state

    state = tx.init(params)
    for t in range(3):
        params, state = step(params, state, *batch(x, y, t))
    assert len(traces) == 1


def test_inject_hyperparams_traced_and_changed():
    x, y, params = make_problem()
    tx = optax.inject_hyperparams(alig)(max_lr=0.3, momentum=0.8)
    traces = []
    jparams = jax.tree.map(jnp.asarray, params)
    state = tx.init(jparams)

    @jax.jit
    def step(params, state, xb, yb):
        traces.append(1)
        value, grads = jax.value_and_grad(jax_loss)(params, xb, yb)
        updates, state = tx.update(grads, state, params, value=value)
        return optax.apply_updates(params, updates), state

    ref = NumpyAlig(params, max_lr=0.3, momentum=0.8)
    np_params = params
    for t in range(20):
        if t == 10:  # change both traced hyper-parameters mid-run
            state.hyperparams["max_lr"] = jnp.asarray(0.1, jnp.float32)
            state.hyperparams["momentum"] = jnp.asarray(0.5, jnp.float32)
            ref.max_lr, ref.momentum = 0.1, 0.5
        xb, yb = batch(x, y, t)
        jparams, state = step(jparams, state, xb, yb)
        loss, grads = np_loss_and_grad(np_params, xb, yb)
        np_params, _, _ = ref.step(np_params, loss, grads)
        for k in params:
            np.testing.assert_allclose(jparams[k], np_params[k], rtol=2e-4, atol=2e-5)
    assert len(traces) == 1


def test_inject_hyperparams_with_static_projection():
    proj = functools.partial(project_l2_ball, max_norm=2.0)
    tx = optax.inject_hyperparams(alig, static_args=("projection",))(max_lr=0.3, projection=proj)
    x, y, params = make_problem()
    traj, _ = run_jax(tx, params, x, y, 10)
    np_traj, _, _ = run_numpy(NumpyAlig(params, max_lr=0.3, max_norm=2.0), params, x, y, 10)
    assert_trajectories_close(traj, np_traj)


def test_multisteps_uses_mean_gradient_and_last_value():
    x, y, params = make_problem()
    tx = optax.MultiSteps(alig(max_lr=10.0), every_k_schedule=2)
    jparams = jax.tree.map(jnp.asarray, params)
    state = tx.init(jparams)
    losses, grads = [], []
    for t in range(2):
        xb, yb = batch(x, y, t)
        loss, g = np_loss_and_grad(params, xb, yb)
        losses.append(loss)
        grads.append(g)
        value, jg = jax.value_and_grad(jax_loss)(jparams, jnp.asarray(xb), jnp.asarray(yb))
        updates, state = tx.update(jg, state, jparams, value=value)
        if t == 0:
            assert all(np.all(np.asarray(u) == 0) for u in jax.tree.leaves(updates))
    mean = {k: (grads[0][k] + grads[1][k]) / 2 for k in params}
    gamma = losses[1] / (sum(np.sum(g**2) for g in mean.values()) + 1e-5)
    for k in params:
        np.testing.assert_allclose(updates[k], -gamma * mean[k], rtol=1e-4, atol=1e-7)


def test_chain_after_adam_uses_adam_direction():
    grads = {"w": jnp.array([0.5, -2.0, 1e-3])}
    tx = optax.chain(optax.scale_by_adam(), scale_by_alig(max_lr=10.0), optax.scale(-1.0))
    state = tx.init(grads)
    updates, state = tx.update(grads, state, grads, value=jnp.asarray(0.7))
    # Adam's first direction: m̂ / (sqrt(v̂) + eps) = g / (|g| + 1e-8)
    g = np.array([0.5, -2.0, 1e-3])
    d = g / (np.abs(g) + 1e-8)
    gamma = min(0.7 / (np.sum(d**2) + 1e-5), 10.0)
    np.testing.assert_allclose(updates["w"], -gamma * d, rtol=1e-5)


def test_alig_inside_a_chain_gets_value():
    """optax.chain forwards ``value=`` to alig; a transform before it changes its input."""
    x, y, params = make_problem()
    tx = optax.chain(optax.scale(0.5), alig(max_lr=0.3, momentum=0.8))
    traj, _ = run_jax(tx, params, x, y, 10)
    ref = NumpyAlig(params, max_lr=0.3, momentum=0.8)
    np_params = params
    for t in range(10):  # the reference, fed half the gradient
        loss, grads = np_loss_and_grad(np_params, *batch(x, y, t))
        np_params, _, _ = ref.step(np_params, loss, {k: 0.5 * g for k, g in grads.items()})
    for k in params:
        np.testing.assert_allclose(traj[-1][k], np_params[k], rtol=2e-4, atol=2e-5)


def test_extra_arguments_are_ignored():
    x, y, params = make_problem()
    params = jax.tree.map(jnp.asarray, params)
    grads = jax.tree.map(jnp.asarray, np_loss_and_grad(params, x, y)[1])
    for tx in (alig(max_lr=0.1, momentum=0.5), scale_by_alig(max_lr=0.1)):
        state = tx.init(params)
        plain, _ = tx.update(grads, state, params, value=1.0)
        extra, _ = tx.update(grads, state, params, value=1.0, key=jax.random.key(0), foo="bar")
        for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(extra), strict=True):
            np.testing.assert_array_equal(a, b)


def test_missing_value_is_a_type_error():
    params = {"w": jnp.ones(2)}
    for tx in (alig(0.1), scale_by_alig(0.1)):
        with pytest.raises(TypeError, match="value="):
            tx.update(params, tx.init(params), params)
    with pytest.raises(ValueError, match="scalar"):
        alig(0.1).update(params, alig(0.1).init(params), params, value=jnp.ones(3))


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        (dict(max_lr=0.0), "max_lr"),
        (dict(max_lr=-1.0), "max_lr"),
        (dict(max_lr=float("nan")), "max_lr"),
        (dict(eps=-1e-3), "eps"),
        (dict(momentum=-0.1), "momentum"),
        (dict(momentum=1.0), "momentum"),
        (dict(f_min=float("inf")), "f_min"),
        (dict(projection=3.0), "projection"),
    ],
)
def test_bad_hyperparameters(kwargs, name):
    with pytest.raises(ValueError, match=name):
        alig(**kwargs)
    scale_kwargs = {k: v for k, v in kwargs.items() if k in ("max_lr", "eps", "f_min")}
    if scale_kwargs:
        with pytest.raises(ValueError, match=name):
            scale_by_alig(**scale_kwargs)


def test_other_bad_input():
    with pytest.raises(TypeError, match="max_lr"):
        alig(max_lr="big")
    with pytest.raises(TypeError, match="adjusted_momentum"):
        alig(adjusted_momentum="yes")
    with pytest.raises(ValueError, match="max_norm"):
        project_l2_ball({"a": jnp.ones(2)}, 0.0)
    with pytest.raises(TypeError, match=r"project_l2_ball: .*\['a'\] \(int32\)"):
        project_l2_ball({"a": jnp.ones(2, jnp.int32)}, 1.0)
    tx = alig(0.1, projection=functools.partial(project_l2_ball, max_norm=1.0))
    grads = {"w": jnp.ones(2)}
    with pytest.raises(ValueError, match="params"):
        tx.update(grads, tx.init(grads), value=1.0)


BAD = {
    "nan value": (np.nan, None),
    "inf value": (np.inf, None),
    "nan gradient": (1.0, np.nan),
    "inf gradient": (1.0, np.inf),
}


@pytest.mark.parametrize("bad", list(BAD))
@pytest.mark.parametrize(
    "kwargs",
    [dict(max_lr=0.3), dict(max_lr=0.3, momentum=0.8), dict(momentum=0.8, adjusted_momentum=True)],
)
def test_non_finite_step_is_skipped(bad, kwargs):
    """A bad step gives zero updates, leaves the state alone but for the counter, and the run
    continues exactly as if the bad step had never happened."""
    value, poison = BAD[bad]
    x, y, params = make_problem()
    tx = jax.jit(alig(**kwargs).update)
    init = alig(**kwargs).init
    jparams = jax.tree.map(jnp.asarray, params)

    def good_step(p, s, t):
        xb, yb = batch(x, y, t)
        v, g = jax.value_and_grad(jax_loss)(p, jnp.asarray(xb), jnp.asarray(yb))
        u, s = tx(g, s, p, value=v)
        return optax.apply_updates(p, u), s

    clean_p, clean_s = jparams, init(jparams)
    for t in range(4):
        clean_p, clean_s = good_step(clean_p, clean_s, t)

    p, s = jparams, init(jparams)
    for t in range(2):
        p, s = good_step(p, s, t)
    grads = {"w": jnp.ones((N_IN, N_OUT)), "b": jnp.ones(N_OUT)}
    if poison is not None:
        grads["w"] = grads["w"].at[1, 2].set(poison)
    updates, s_bad = tx(grads, s, p, value=jnp.asarray(value))
    for u in jax.tree.leaves(updates):
        np.testing.assert_array_equal(u, np.zeros_like(u))
    assert int(s_bad.alig.skipped) == 1
    for a, b in zip(
        jax.tree.leaves(s_bad._replace(alig=s_bad.alig._replace(skipped=0))),
        jax.tree.leaves(s),
        strict=True,
    ):
        np.testing.assert_array_equal(a, b)
    p = optax.apply_updates(p, updates)
    for t in range(2, 4):
        p, s_bad = good_step(p, s_bad, t)
    for k in params:
        np.testing.assert_allclose(p[k], clean_p[k], rtol=1e-6, atol=1e-7)
        assert np.all(np.isfinite(p[k]))

    sbs = scale_by_alig(max_lr=0.3)
    out, st = sbs.update(grads, sbs.init(grads), value=jnp.asarray(value))
    assert all(np.all(np.asarray(u) == 0) for u in jax.tree.leaves(out))
    assert int(st.skipped) == 1 and float(st.step_size) == 0.0


def test_converges_on_interpolating_least_squares_without_tuning():
    """Over-parameterised least squares (20 equations, 100 unknowns), mini-batches of 5,
    AliG at its defaults (no max_lr): the loss over all equations falls below 1e-6."""
    rng = np.random.default_rng(0)
    a = jnp.asarray(rng.normal(size=(20, 100)), jnp.float32)
    y = a @ jnp.asarray(rng.normal(size=100), jnp.float32)
    loss = lambda w, idx: 0.5 * jnp.mean((a[idx] @ w - y[idx]) ** 2)
    tx = alig()

    def body(carry, key):
        w, state = carry
        idx = jax.random.choice(key, 20, (5,), replace=False)
        value, grads = jax.value_and_grad(loss)(w, idx)
        updates, state = tx.update(grads, state, w, value=value)
        return (optax.apply_updates(w, updates), state), value

    w0 = jnp.zeros(100)
    keys = jax.random.split(jax.random.key(0), 300)
    (w, _), _ = jax.jit(lambda w: jax.lax.scan(body, (w, tx.init(w)), keys))(w0)
    full = 0.5 * np.mean(
        (np.asarray(a, np.float64) @ np.asarray(w, np.float64) - np.asarray(y, np.float64)) ** 2
    )
    assert full < 1e-6


def test_package_level_names():
    """``jaxopt_suite.alig`` is the optimizer even after its implementation module is imported."""
    importlib.import_module("jaxopt_suite._src.alig")
    for factory in (jaxopt_suite.alig, alig):
        tx = factory(max_lr=0.1, momentum=0.5)
        assert isinstance(tx, optax.GradientTransformationExtraArgs)
        assert isinstance(tx.init({"w": jnp.ones(2)}), AligState)
    assert jaxopt_suite.scale_by_alig is scale_by_alig
    assert jaxopt_suite.ScaleByAligState is ScaleByAligState
    tx = optax.inject_hyperparams(jaxopt_suite.alig)(max_lr=0.1)
    assert "max_lr" in tx.init({"w": jnp.ones(2)}).hyperparams


def test_trains_in_the_shared_loop_and_compare_method():
    method = recipes.registry()["alig"]
    setup = method.build(recipes.RunConfig(steps=20, batch_size=32, seed=0))
    # softmax regression on 64 random images with random labels (memorisable): no flax compile
    problem = train.Problem(lambda p, x: x.reshape(x.shape[0], -1) @ p["w"] + p["b"])
    params = {"w": jnp.zeros((784, 10)), "b": jnp.zeros(10)}
    step = train.jit_step(train.make_step(problem, setup.tx, setup.gradient))
    state = train.init_state(params, setup.tx, jax.random.key(1))
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(64, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, size=64).astype(np.int32)
    losses = []
    for t in range(20):
        sl = slice((t % 2) * 32, (t % 2 + 1) * 32)
        state, loss = step(state, images[sl], labels[sl])
        losses.append(float(loss))
    assert np.mean(losses[-4:]) < 0.5 * np.mean(losses[:4])
    assert int(state.opt_state.alig.skipped) == 0


@pytest.mark.parametrize("make", [lambda: alig(0.1, momentum=0.9), lambda: scale_by_alig(0.1)])
def test_integer_parameters_are_refused_naming_the_leaf(make):
    """An int32 leaf would get an int32 update that rounds every step to 0 (training never
    moves), and jax.grad(..., allow_int=True) gives it a float0 gradient: both are refused at
    trace time, naming the leaf."""
    params = {"w": jnp.ones(2), "steps": jnp.array([3, 4])}
    tx = make()
    with pytest.raises(TypeError, match=r"\['steps'\] \(int32\)"):
        tx.init(params)
    floats = {"w": jnp.ones(2), "steps": jnp.ones(2)}
    state = tx.init(floats)
    loss = lambda p: jnp.sum(p["w"] ** 2) + jnp.sum(p["steps"])
    value, grads = jax.value_and_grad(loss, allow_int=True)(params)
    with pytest.raises(TypeError, match=r"\['steps'\] \(float0\)"):
        jax.jit(lambda g, s: tx.update(g, s, floats, value=value))(grads, state)
