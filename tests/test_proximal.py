"""The proximal transformations against the same steps done by hand in numpy."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxopt_suite import autosize, prox, train
from jaxopt_suite._src.proximal import ProximalState, group_sparsity, proximal
from jaxopt_suite.harness import recipes

RNG = np.random.default_rng(0)


def np_soft(x, t):
    return np.sign(x) * np.maximum(np.abs(x) - t, 0)


def np_project_l1_ball(v, radius):
    """Bisection on the threshold, float64 (independent of the library's algorithm)."""
    a = np.abs(v)
    if a.sum() <= radius:
        return v.copy()
    lo, hi = 0.0, a.max()
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if np.maximum(a - mid, 0).sum() > radius else (lo, mid)
    return np.sign(v) * np.maximum(a - (lo + hi) / 2, 0)


def np_rows_prox(rows, t, norm):
    """The textbook grouped prox on PyTorch-layout rows [W_j, b_j]."""
    out = np.empty_like(rows)
    for j, row in enumerate(rows):
        if norm == "l21":
            n = np.linalg.norm(row)
            out[j] = 0 if n <= t else row * (1 - t / n)
        else:
            out[j] = row - np_project_l1_ball(row, t)
    return out


def np_layer_prox(kernel, bias, t, norm):
    """Flax layer -> PyTorch rows [W_j, b_j] -> textbook prox -> back to Flax layout."""
    out_units = kernel.shape[-1]
    weight = kernel.reshape(-1, out_units).T.astype(np.float64)  # (out, in) like torch
    rows = np.concatenate([weight, bias[:, None]], axis=1)
    new = np_rows_prox(rows, t, norm)
    return new[:, :-1].T.reshape(kernel.shape), new[:, -1]


def layer(shape, scale=1.0):
    return {
        "kernel": jnp.asarray(RNG.normal(size=shape) * scale, jnp.float32),
        "bias": jnp.asarray(RNG.normal(size=shape[-1]) * scale, jnp.float32),
    }


# ------------------------------------------------------------------------------- proximal
def test_proximal_l1_after_sgd_is_the_hand_step():
    params = {"w": jnp.asarray(RNG.normal(size=(4, 3)), jnp.float32), "b": jnp.ones(3)}
    grads = jax.tree.map(lambda p: jnp.asarray(RNG.normal(size=p.shape), jnp.float32), params)
    lr, reg = 0.1, 2.0
    tx = optax.chain(optax.sgd(lr), proximal(prox.l1, reg, lr))
    updates, _ = tx.update(grads, tx.init(params), params)
    new = optax.apply_updates(params, updates)
    for name in params:
        expected = np_soft(np.asarray(params[name]) - lr * np.asarray(grads[name]), reg * lr)
        np.testing.assert_allclose(new[name], expected, atol=1e-6)
        # exact zeros survive apply_updates
        assert np.all(np.asarray(new[name])[expected == 0] == 0)


def test_proximal_schedule_uses_its_own_step_count():
    schedule = lambda count: 0.5 / (1.0 + count)
    reg = 0.3
    tx = proximal(prox.l1, reg, schedule)
    params = {"w": jnp.asarray(RNG.normal(size=8), jnp.float32)}
    state = tx.init(params)
    p = np.asarray(params["w"], np.float64)
    update = jax.jit(tx.update)
    for k in range(3):
        g = RNG.normal(size=8) * 0.1
        updates, state = update({"w": jnp.asarray(g, jnp.float32)}, state, params)
        params = optax.apply_updates(params, updates)
        p = np_soft(p + g, reg * 0.5 / (1.0 + k))
        np.testing.assert_allclose(params["w"], p, atol=1e-6)
        assert int(state.count) == k + 1
    assert isinstance(state, ProximalState)


def test_proximal_mask_passes_other_leaves_through():
    params = {"a": jnp.full(3, 0.05), "b": jnp.full(3, 0.05)}
    grads = {"a": jnp.zeros(3), "b": jnp.zeros(3)}
    tx = proximal(prox.l1, 1.0, 0.1, mask={"a": True, "b": False})
    updates, _ = tx.update(grads, tx.init(params), params)
    new = optax.apply_updates(params, updates)
    np.testing.assert_array_equal(new["a"], 0.0)
    np.testing.assert_array_equal(new["b"], params["b"])
    tx = proximal(prox.l1, 1.0, 0.1, mask=lambda p: {"a": False, "b": True})
    updates, _ = tx.update(grads, tx.init(params), params)
    np.testing.assert_array_equal(optax.apply_updates(params, updates)["a"], params["a"])


def test_proximal_under_inject_hyperparams_and_partial():
    tx = optax.inject_hyperparams(proximal, static_args="prox_fn")(
        functools.partial(prox.l21, group_axis=0), reg=1.0, learning_rate=0.1
    )
    params = {"w": jnp.asarray([[3.0, 4.0], [0.01, 0.02]])}
    state = tx.init(params)
    state.hyperparams["reg"] = jnp.asarray(10.0)
    updates, _ = jax.jit(tx.update)({"w": jnp.zeros((2, 2))}, state, params)
    new = np.asarray(optax.apply_updates(params, updates)["w"])
    np.testing.assert_allclose(new[0], np.array([3.0, 4.0]) * (1 - 1.0 / 5.0), rtol=1e-6)
    np.testing.assert_array_equal(new[1], 0.0)


def test_proximal_bad_input():
    with pytest.raises(ValueError, match="params"):
        tx = proximal(prox.l1, 0.1, 0.1)
        tx.update({"w": jnp.ones(2)}, tx.init({"w": jnp.ones(2)}))
    with pytest.raises(ValueError, match="reg"):
        proximal(prox.l1, -0.1, 0.1)
    with pytest.raises(ValueError, match="learning_rate"):
        proximal(prox.l1, 0.1, -1.0)
    with pytest.raises(TypeError, match="prox_fn"):
        proximal("l1", 0.1, 0.1)


def test_nan_updates_stay_non_finite():
    params = {"Dense_0": layer((3, 4))}
    grads = jax.tree.map(jnp.zeros_like, params)
    grads["Dense_0"]["kernel"] = grads["Dense_0"]["kernel"].at[0, 1].set(jnp.nan)
    for tx in (
        proximal(prox.linf1, 0.1, 0.1),
        group_sparsity(0.1, 0.1, "linf1"),
        group_sparsity(0.1, 0.1, "l21"),
        proximal(prox.l2, 0.1, 0.1),
    ):
        updates, _ = tx.update(grads, tx.init(params), params)
        assert not all(bool(jnp.all(jnp.isfinite(u))) for u in jax.tree.leaves(updates))


# ------------------------------------------------------------------------- group_sparsity
@pytest.mark.parametrize("norm", ["linf1", "l21"])
def test_group_sparsity_matches_the_textbook_rows(norm):
    """ProxGradPytorch's linf1(weight, bias, reg=0.005) (lr 0.1) in Flax layout, and l21."""
    params = {
        "Dense_0": layer((6, 5), 0.01),  # small weights: some neurons vanish
        "Dense_1": layer((5, 40), 0.2),  # 41-entry groups: the Newton threshold
        "Conv_0": layer((3, 3, 2, 4), 0.05),
    }
    params["Dense_0"]["kernel"] = params["Dense_0"]["kernel"].at[:, 0].multiply(1e-3)
    params["Dense_0"]["bias"] = params["Dense_0"]["bias"].at[0].set(1e-5)
    grads = jax.tree.map(
        lambda p: jnp.asarray(RNG.normal(size=p.shape) * 0.01, jnp.float32), params
    )
    grads["Dense_0"]["kernel"] = grads["Dense_0"]["kernel"].at[:, 0].set(0.0)
    grads["Dense_0"]["bias"] = grads["Dense_0"]["bias"].at[0].set(0.0)
    sgd_lr, reg, lr = 0.01, 0.005, 0.1
    tx = optax.chain(optax.sgd(sgd_lr), group_sparsity(reg, lr, norm=norm))
    updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
    new = optax.apply_updates(params, updates)
    for name, leaves in params.items():
        stepped = {
            k: np.asarray(v) - sgd_lr * np.asarray(grads[name][k]) for k, v in leaves.items()
        }
        kernel, bias = np_layer_prox(stepped["kernel"], stepped["bias"], reg * lr, norm)
        np.testing.assert_allclose(new[name]["kernel"], kernel, atol=1e-6)
        np.testing.assert_allclose(new[name]["bias"], bias, atol=1e-6)
    assert autosize.live_units(new)["Dense_0"] < 5  # the tiny neuron is exactly zero


def test_group_sparsity_without_bias_and_other_leaves():
    params = {
        "Dense_0": layer((4, 3)),
        "LayerNorm_0": {"scale": jnp.ones(3), "bias": jnp.ones(3)},
        "embedding": jnp.ones((2, 2)),
    }
    grads = jax.tree.map(lambda p: jnp.full(p.shape, 0.1, p.dtype), params)
    tx = group_sparsity(2.0, 0.5, norm="l21", include_bias=False)
    updates, _ = tx.update(grads, tx.init(params), params)
    # Leaves outside a layer, and the bias when it is not grouped, pass through exactly.
    for path in (("LayerNorm_0", "scale"), ("LayerNorm_0", "bias"), ("Dense_0", "bias")):
        np.testing.assert_array_equal(updates[path[0]][path[1]], grads[path[0]][path[1]])
    np.testing.assert_array_equal(updates["embedding"], grads["embedding"])
    stepped = np.asarray(params["Dense_0"]["kernel"]) + 0.1
    norms = np.linalg.norm(stepped, axis=0)
    expected = stepped * np.maximum(0, 1 - 1.0 / norms)
    np.testing.assert_allclose(
        params["Dense_0"]["kernel"] + updates["Dense_0"]["kernel"], expected, atol=1e-6
    )


def test_group_sparsity_mask():
    params = {"Dense_0": layer((4, 3), 0.01), "Dense_1": layer((3, 2), 0.01)}
    grads = jax.tree.map(jnp.zeros_like, params)
    tx = group_sparsity(10.0, 1.0, "linf1", mask={"Dense_0": True, "Dense_1": False})
    updates, _ = tx.update(grads, tx.init(params), params)
    new = optax.apply_updates(params, updates)
    assert autosize.live_units(new) == {"Dense_0": 0, "Dense_1": 2}


def test_group_sparsity_on_nnx_state_equals_linen_dicts():
    model = nnx.Sequential(nnx.Linear(3, 4, rngs=nnx.Rngs(0)), nnx.Linear(4, 2, rngs=nnx.Rngs(1)))
    state = nnx.state(model, nnx.Param)
    grads = jax.tree.map(lambda p: jnp.full(p.shape, 0.05, p.dtype), state)
    tx = optax.chain(optax.sgd(0.1), group_sparsity(1.0, 0.5, norm="linf1"))
    updates, _ = jax.jit(tx.update)(grads, tx.init(state), state)
    new = optax.apply_updates(state, updates)
    as_dict = nnx.to_pure_dict(state)
    for i in (0, 1):
        leaves = as_dict["layers"][i]
        stepped = {k: np.asarray(v) - 0.1 * 0.05 for k, v in leaves.items()}
        kernel, bias = np_layer_prox(stepped["kernel"], stepped["bias"], 0.5, "linf1")
        np.testing.assert_allclose(new["layers"][i]["kernel"][...], kernel, atol=1e-6)
        np.testing.assert_allclose(new["layers"][i]["bias"][...], bias, atol=1e-6)
    assert set(autosize.live_units(new)) == {"layers/0", "layers/1"}


def test_group_sparsity_jit_compiles_once_and_keeps_dtypes():
    traces = []
    params = {"Dense_0": jax.tree.map(lambda x: x.astype(jnp.bfloat16), layer((4, 3)))}
    tx = group_sparsity(0.1, optax.linear_schedule(0.1, 0.0, 10), "linf1")

    @jax.jit
    def update(grads, state, params):
        traces.append(1)
        return tx.update(grads, state, params)

    state = tx.init(params)
    grads = jax.tree.map(jnp.zeros_like, params)
    for _ in range(3):
        updates, state = update(grads, state, params)
    assert len(traces) == 1
    assert all(u.dtype == jnp.bfloat16 for u in jax.tree.leaves(updates))
    assert int(state.count) == 3


def test_group_sparsity_bad_input():
    with pytest.raises(ValueError, match="norm"):
        group_sparsity(0.1, 0.1, norm="l1")
    with pytest.raises(ValueError, match="reg"):
        group_sparsity(-0.1, 0.1)
    with pytest.raises(ValueError, match="learning_rate"):
        group_sparsity(0.1, -0.1)
    tx = group_sparsity(0.1, 0.1)
    bad = {"block": {"Dense_0": {"kernel": jnp.ones((3, 4)), "bias": jnp.ones(3)}}}
    with pytest.raises(ValueError, match="block/Dense_0/bias"):
        tx.update(bad, tx.init(bad), bad)
    with pytest.raises(ValueError, match="params"):
        tx.update(bad, tx.init(bad))


def test_training_step_skips_non_finite_updates():
    """With train.make_step, a NaN gradient leaves the parameters untouched."""
    params = {"Dense_0": layer((4, 3))}

    def apply_fn(p, x):
        return x.reshape(x.shape[0], -1)[:, :4] @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"]

    def nan_gradient(problem, params, batch, key):
        value, grads = jax.value_and_grad(problem.loss_fn)(params, *batch)
        return value, jax.tree.map(lambda g: g * jnp.nan, grads), {}

    tx = optax.chain(optax.sgd(0.1), group_sparsity(0.1, 0.1, "linf1"))
    step = jax.jit(train.make_step(train.Problem(apply_fn), tx, nan_gradient))
    state = train.init_state(params, tx, jax.random.key(0))
    images = jnp.zeros((2, 2, 2), jnp.uint8)
    state, _ = step(state, images, jnp.zeros(2, jnp.int32))
    assert int(state.skipped) == 1
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(params), strict=True):
        np.testing.assert_array_equal(a, b)


def test_compare_methods_report_live_units():
    found = recipes.registry()
    assert {"sgd+linf1", "sgd+l21"} <= set(found)
    setup = found["sgd+linf1"].build(None)
    params = {"Dense_0": layer((4, 3)), "Dense_1": layer((3, 2))}
    params["Dense_0"]["kernel"] = params["Dense_0"]["kernel"].at[:, 1].set(0.0)
    params["Dense_0"]["bias"] = params["Dense_0"]["bias"].at[1].set(0.0)
    assert setup.report(params) == {"live_units": "Dense_0 2/3, Dense_1 2/2"}
    # The output layer (the last Dense) is not regularised: its tiny units survive.
    tiny = {"Dense_0": layer((4, 3), 1e-3), "Dense_1": layer((3, 2), 1e-3)}
    zeros = jax.tree.map(jnp.zeros_like, tiny)
    updates, _ = setup.tx.update(zeros, setup.tx.init(tiny), tiny)
    assert autosize.live_units(optax.apply_updates(tiny, updates)) == {"Dense_0": 0, "Dense_1": 2}


def test_group_sparsity_on_layers_with_empty_axes():
    """A layer with no units has no group (its empty leaves pass through); a kernel with no
    inputs leaves each group as its bias entry alone: the l21 prox of a scalar, the
    soft-threshold sign(x) max(|x| - t, 0)."""
    params = {
        "Dense_0": {"kernel": jnp.ones((3, 0)), "bias": jnp.ones(0)},
        "Dense_1": {"kernel": jnp.ones((0, 2)), "bias": jnp.array([0.5, -0.05])},
    }
    updates = jax.tree.map(jnp.zeros_like, params)
    tx = group_sparsity(0.2, 0.5)  # t = 0.1
    new, _ = jax.jit(tx.update)(updates, tx.init(params), params)
    np.testing.assert_allclose(new["Dense_1"]["bias"] + params["Dense_1"]["bias"], [0.4, 0.0])
    assert new["Dense_0"]["kernel"].shape == (3, 0) and new["Dense_1"]["kernel"].shape == (0, 2)


def test_a_prox_that_refuses_a_leaf_is_an_error_naming_it():
    """A grouped operator needs an axis: on a 0-d leaf the error names the leaf and mask=."""
    params = {"w": jnp.ones((2, 2)), "scale": jnp.array(1.0)}
    tx = proximal(prox.linf1, reg=0.1, learning_rate=0.1)
    with pytest.raises(ValueError, match=r"\['scale'\] of shape \(\).*mask="):
        tx.update(params, tx.init(params), params)
    masked = proximal(prox.linf1, 0.1, 0.1, mask={"w": True, "scale": False})
    updates, _ = masked.update(params, masked.init(params), params)
    assert updates["scale"] is params["scale"]
