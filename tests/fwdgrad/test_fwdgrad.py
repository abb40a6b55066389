"""Forward gradient: every estimate checked against reverse-mode gradients (``jax.grad``) or
closed forms, the statistics against the variance formulas of the docstrings."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxopt_suite import fwdgrad, train, zoo
from jaxopt_suite.fwdgrad import directions, interpreter
from jaxopt_suite.harness import recipes

CONFIGS = [
    ("normal", "dense"),
    ("rademacher", "dense"),
    ("normal", "rank_one"),
    ("rademacher", "rank_one"),
]

X = jnp.asarray(np.random.default_rng(0).normal(size=(5, 3)), jnp.float32)


def small_loss(params):
    """A non-quadratic function of a pytree with a matrix, a vector and a scalar leaf."""
    hidden = jnp.tanh(X @ params["w"] + params["b"])
    return jnp.sum(hidden**2) * params["s"] + jnp.sum(jnp.sin(hidden))


PARAMS = {
    "w": jnp.asarray(np.random.default_rng(1).normal(size=(3, 2)), jnp.float32),
    "b": jnp.asarray([0.3, -0.2], jnp.float32),
    "s": jnp.asarray(0.7, jnp.float32),
}


def flat(tree):
    return np.concatenate([np.ravel(x) for x in jax.tree.leaves(tree)]).astype(np.float64)


def sample_estimates(fun, params, num, **kwargs):
    g = fwdgrad.forward_grad(fun, **kwargs)
    keys = jax.random.split(jax.random.key(42), num)
    out = jax.jit(jax.vmap(lambda k: g(k, params)))(keys)
    leaves = [np.asarray(x, np.float64).reshape(num, -1) for x in jax.tree.leaves(out)]
    return np.concatenate(leaves, axis=1)


# --- unbiasedness and variance ----------------------------------------------------------------


@pytest.mark.parametrize("distribution,structure", CONFIGS)
def test_unbiased_with_variance_as_stated_and_divided_by_k(distribution, structure):
    """Mean of many estimates -> ∇f (from jax.grad) within 5 standard errors; total variance
    (n - 1)||∇f||² for signs, (n + 1)||∇f||² for dense normals; K = 4 divides it by 4."""
    true = flat(jax.grad(small_loss)(PARAMS))
    n = true.size
    samples = {}
    # K = 4 on two configurations only: each compilation of a normal sampler costs seconds.
    with_k = (distribution, structure) in (CONFIGS[0], CONFIGS[3])
    for k, num in ((1, 20000), (4, 5000))[: 2 if with_k else 1]:
        samples[k] = sample_estimates(
            small_loss,
            PARAMS,
            num,
            num_directions=k,
            distribution=distribution,
            structure=structure,
        )
    one = samples[1]
    stderr = one.std(axis=0) / np.sqrt(len(one))
    np.testing.assert_array_less(np.abs(one.mean(axis=0) - true), 5 * stderr + 1e-6)
    total = {k: np.mean(np.sum((x - true) ** 2, axis=1)) for k, x in samples.items()}
    if with_k:
        assert total[1] / total[4] == pytest.approx(4.0, rel=0.15)
    if distribution == "rademacher":  # ||v||² = n exactly, dense or rank-one
        assert total[1] == pytest.approx((n - 1) * np.sum(true**2), rel=0.05)
        per_coordinate = np.sum(true**2) - true**2
    elif structure == "dense":
        assert total[1] == pytest.approx((n + 1) * np.sum(true**2), rel=0.06)
        per_coordinate = np.sum(true**2) + true**2
    else:
        return
    # Var(g_i) = ||∇f||² ± ∇f_i² coordinate by coordinate for dense directions
    if structure == "dense":
        np.testing.assert_allclose(one.var(axis=0), per_coordinate, rtol=0.1)


def test_rank_one_directions_are_isotropic():
    """E[v vᵀ] = I for rank-one directions a ⊗ b (the premise of their unbiasedness), estimated
    from samples on a tree with a 3-D leaf."""
    tree = {"k": jnp.zeros((2, 2, 3)), "v": jnp.zeros((2,))}
    num = 8000
    for distribution, structure in CONFIGS[2:]:
        keys = jax.random.split(jax.random.key(1), num)
        draw = lambda k, d=distribution, s=structure: fwdgrad.random_direction(k, tree, d, s)
        vs = jax.jit(jax.vmap(draw))(keys)
        v = np.concatenate([np.asarray(x).reshape(num, -1) for x in jax.tree.leaves(vs)], 1)
        second = v.T @ v / num
        np.testing.assert_allclose(second, np.eye(v.shape[1]), atol=0.08)


def test_one_layer_directions_are_unbiased_with_the_stated_variance():
    """perturb="one_layer" (here the layers are the leaves w, b, s): the mean of many estimates
    -> ∇f (jax.grad) within 5 standard errors, and the total variance is
    sum_l n_l ||∇_l f||² / p_l - ||∇f||² for sign directions: (n - 1)||∇f||² with p_l ∝ n_l
    (the same as perturbing every layer), 3 sum_l n_l ||∇_l f||² - ||∇f||² with p_l = 1/3."""
    grads = jax.grad(small_loss)(PARAMS)
    true = flat(grads)
    n = true.size
    sizes = {k: np.size(v) for k, v in grads.items()}
    squares = {k: float(np.sum(np.asarray(v, np.float64) ** 2)) for k, v in grads.items()}
    for probabilities in ("uniform", "size"):
        one = sample_estimates(
            small_loss,
            PARAMS,
            20000,
            distribution="rademacher",
            structure="rank_one",
            perturb="one_layer",
            layer_probabilities=probabilities,
        )
        stderr = one.std(axis=0) / np.sqrt(len(one))
        np.testing.assert_array_less(np.abs(one.mean(axis=0) - true), 5 * stderr + 1e-6)
        p = {k: 1 / 3 if probabilities == "uniform" else sizes[k] / n for k in sizes}
        expected = sum(sizes[k] * squares[k] / p[k] for k in sizes) - sum(squares.values())
        if probabilities == "size":
            assert expected == pytest.approx((n - 1) * np.sum(true**2), rel=1e-9)
        errors = np.sum((one - true) ** 2, axis=1)
        assert abs(errors.mean() - expected) < 5 * errors.std() / np.sqrt(len(errors))


def test_rademacher_signs_are_fair_and_unpacked_correctly():
    signs = np.asarray(fwdgrad.rademacher(jax.random.key(0), (1000, 37), jnp.float32))
    assert signs.shape == (1000, 37)
    assert set(np.unique(signs)) == {-1.0, 1.0}
    assert abs(signs.mean()) < 0.01
    flat_signs = signs.ravel()
    # neighbouring bits of one word are uncorrelated
    assert abs(np.mean(flat_signs[1:] * flat_signs[:-1])) < 0.01
    words = np.asarray(jax.random.bits(jax.random.key(0), (-(-37000 // 32),), jnp.uint32))
    bits = (words[:, None] >> np.arange(32, dtype=np.uint32)) & 1
    np.testing.assert_array_equal(flat_signs, 1 - 2 * bits.ravel()[:37000].astype(np.float32))


# --- exactness of the forward pass ------------------------------------------------------------


def test_estimate_is_exact_directional_derivative_times_direction():
    """With sign directions every |g_i| equals |∇f·v| and ∇f·g = (∇f·v)², for the true ∇f
    (rank-one directions through a flax MLP; dense ones in the while-loop and pytree tests)."""
    structure = "rank_one"
    model = zoo.MLP(hidden=(7,))
    params = model.init(jax.random.key(0), jnp.zeros((1, 4)))["params"]
    x = jax.random.normal(jax.random.key(1), (6, 4))
    labels = jnp.arange(6) % 10
    loss = lambda p: train.cross_entropy(model.apply({"params": p}, x), labels)
    true = flat(jax.grad(loss)(params))
    estimate = jax.jit(fwdgrad.forward_grad(loss, distribution="rademacher", structure=structure))
    for seed in range(3):
        g = flat(estimate(jax.random.key(seed), params))
        d = np.abs(g[0])
        np.testing.assert_allclose(np.abs(g), d, rtol=1e-5)
        np.testing.assert_allclose(true @ g, d**2, rtol=1e-4)
    # one random layer of two (p = 1/2), its signs scaled by sqrt(2): |g_i| = sqrt(2)|∇f·v| on
    # that layer, zero elsewhere, and ∇f·g = (∇f·v)² = g_i² / 2
    one_layer = jax.jit(
        fwdgrad.forward_grad(
            loss, distribution="rademacher", structure="rank_one", perturb="one_layer"
        )
    )
    chosen = set()
    for seed in range(4):
        g = one_layer(jax.random.key(seed), params)
        moved = [name for name, layer in g.items() if np.any(flat(layer) != 0)]
        assert len(moved) == 1
        chosen.add(moved[0])
        g = flat(g)
        d = np.abs(g[g != 0])
        np.testing.assert_allclose(d, d[0], rtol=1e-5)
        np.testing.assert_allclose(true @ g, d[0] ** 2 / 2, rtol=1e-4)
    assert chosen == {"Dense_0", "Dense_1"}


class _ConvNet(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(3, (3, 3), padding=1)(x))
        x = nn.Conv(2, (2, 2), strides=2, padding="VALID")(x)
        x = nn.Dense(4)(x.reshape(x.shape[0], -1))
        return nn.Dense(3)(nn.tanh(x))


def _rank_one_cases():
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.normal(size=(4, 5)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(5, 3)), jnp.float32)
    wt = jnp.asarray(rng.normal(size=(3, 5)), jnp.float32)
    t = jnp.asarray(rng.normal(size=(2, 5, 3)), jnp.float32)
    t2 = jnp.asarray(rng.normal(size=(2, 4, 5)), jnp.float32)
    conv = _ConvNet()
    images = jnp.asarray(rng.normal(size=(2, 6, 6, 2)), jnp.float32)
    conv_params = conv.init(jax.random.key(0), images)["params"]
    return {
        "dense": (lambda p: jnp.sum(jnp.tanh(x @ p["w"])), {"w": w}),
        "transposed": (lambda p: jnp.sum(jnp.tanh(x @ p["w"].T)), {"w": wt}),
        "left_operand": (lambda p: jnp.sum(jnp.tanh(p["w"] @ x.T)), {"w": wt}),
        "twice_and_elementwise": (
            lambda p: jnp.sum(jnp.tanh(x @ p["w"]) @ p["w"].T) + jnp.sum(p["w"] ** 3),
            {"w": w},
        ),
        "inside_jit": (jax.jit(lambda p: jnp.sum(jnp.sin(jnp.dot(x, p["w"])))), {"w": w}),
        "batched_dot": (lambda p: jnp.sum(jnp.einsum("bij,jk->bik", t2, p["w"]) ** 2), {"w": w}),
        "rank3_leaf": (lambda p: jnp.sum(jnp.einsum("i,bij->j", x[0], p["t"]) ** 2), {"t": t}),
        "conv_net": (lambda p: jnp.sum(conv.apply({"params": p}, images) ** 2), conv_params),
    }


@pytest.mark.parametrize("case", list(_rank_one_cases()))
def test_rank_one_tangents_give_exact_directional_derivative(case):
    """The rank-one interpreter's ∇f·v equals ∇f·dense(v) from jax.grad, whatever way the
    factored leaf is used."""
    fun, params = _rank_one_cases()[case]
    true = flat(jax.grad(fun)(params))
    for seed in range(2):
        v = directions._direction(jax.random.key(seed), params, "normal", "rank_one")
        value, _, dot = interpreter._jvp(lambda p: (fun(p), None), params, v)
        dense = flat(directions._densify(v))
        np.testing.assert_allclose(float(value), float(fun(params)), rtol=1e-6)
        np.testing.assert_allclose(float(dot), true @ dense, rtol=2e-4, atol=1e-5)


def _dot_generals(jaxpr):
    """(lhs shape, rhs shape, contracting dims) of every dot_general, sub-jaxprs included."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            (contract, _), _ = eqn.params["dimension_numbers"]
            found.append((eqn.invars[0].aval.shape, eqn.invars[1].aval.shape, tuple(contract)))
        for param in eqn.params.values():
            inner = getattr(param, "jaxpr", param)
            if hasattr(inner, "eqns"):
                found += _dot_generals(inner)
    return found


def test_rank_one_directions_make_linear_layers_cheap():
    """The tangent of x (a ⊗ b) is computed as (x a) ⊗ b: besides the primal product, no
    (8, 64) x (64, 32) matrix product is traced, only a matrix-vector one."""
    x = jnp.ones((8, 64))
    fun = lambda p: jnp.sum(jnp.tanh(x @ p["w"]))
    params = {"w": jnp.ones((64, 32))}

    def dot_of(p, k):
        v = directions._direction(k, p, "rademacher", "rank_one")
        return interpreter._jvp(lambda q: (fun(q), None), p, v)[2]

    dots = _dot_generals(jax.make_jaxpr(dot_of)(params, jax.random.key(0)).jaxpr)
    assert sum(rhs == (64, 32) for _, rhs, _ in dots) == 1
    assert ((8, 64), (64,), (1,)) in dots


def _dot_generals_by_cond(jaxpr, in_cond=False):
    """(rhs shape, inside a lax.cond branch?) of every dot_general, sub-jaxprs included."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            found.append((eqn.invars[1].aval.shape, in_cond))
        inner_cond = in_cond or eqn.primitive.name == "cond"
        for param in eqn.params.values():
            for sub in param if isinstance(param, tuple) else (param,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    found += _dot_generals_by_cond(inner, inner_cond)
    return found


def test_one_layer_skips_the_tangent_products_of_other_layers():
    """With perturb="one_layer" the full (6, 7) x (7, 10) product of a tangent (the first
    layer's perturbation carried through the second layer) sits in a lax.cond branch taken only
    when the first layer is the perturbed one; outside conds, only the primal product."""
    model = zoo.MLP(hidden=(7,))
    params = model.init(jax.random.key(0), jnp.zeros((1, 4)))["params"]
    x = jnp.ones((6, 4))
    loss = lambda p: jnp.sum(model.apply({"params": p}, x) ** 2)
    g = fwdgrad.forward_grad(loss, structure="rank_one", perturb="one_layer")
    dots = _dot_generals_by_cond(jax.make_jaxpr(g)(jax.random.key(0), params).jaxpr)
    assert dots.count(((7, 10), True)) >= 1  # (the branch also traces the unused primal)
    assert dots.count(((7, 10), False)) == 1


# --- no reverse mode --------------------------------------------------------------------------


def _power_sum(x, n):
    """sum(x**n) computed by a while loop (n is traced): reverse mode cannot differentiate it."""
    return jnp.sum(jax.lax.fori_loop(0, n, lambda i, y: y * x, jnp.ones_like(x)))


def test_works_where_reverse_mode_cannot():
    x = jnp.asarray([0.5, -1.2, 2.0], jnp.float32)
    n = jnp.asarray(3)
    with pytest.raises(ValueError, match="Reverse-mode"):
        jax.jit(jax.grad(_power_sum))(x, n)
    true = 3 * np.asarray(x, np.float64) ** 2
    for structure in ("dense", "rank_one"):
        g = fwdgrad.forward_grad(_power_sum, distribution="rademacher", structure=structure)
        est = np.asarray(jax.jit(g)(jax.random.key(0), x, n), np.float64)
        d = np.abs(est[0])
        np.testing.assert_allclose(np.abs(est), d, rtol=1e-6)
        np.testing.assert_allclose(true @ est, d**2, rtol=1e-5)


def test_no_reverse_mode_in_rank_one_mlp_estimate():
    """The rank-one estimator on a flax MLP traces with a function whose reverse mode raises:
    a custom_jvp activation whose jvp rule cannot be transposed."""

    @jax.custom_jvp
    def act(z):
        return jnp.tanh(z)

    @act.defjvp
    def act_jvp(primals, tangents):
        (z,), (dz,) = primals, tangents
        # a while loop on the tangent path: forward mode only
        scale = jax.lax.fori_loop(0, jnp.asarray(1), lambda i, s: s * (1 - jnp.tanh(z) ** 2), dz)
        return jnp.tanh(z), scale

    model = zoo.MLP(hidden=(5,), activation=act)
    params = model.init(jax.random.key(0), jnp.zeros((1, 3)))["params"]
    x = jax.random.normal(jax.random.key(1), (4, 3))
    loss = lambda p: jnp.sum(model.apply({"params": p}, x) ** 2)
    with pytest.raises(ValueError, match="Reverse-mode"):
        jax.grad(loss)(params)
    reference = zoo.MLP(hidden=(5,), activation=jnp.tanh)
    ref_loss = lambda p: jnp.sum(reference.apply({"params": p}, x) ** 2)
    true = flat(jax.grad(ref_loss)(params))
    est = flat(
        fwdgrad.forward_grad(loss, distribution="rademacher", structure="rank_one")(
            jax.random.key(3), params
        )
    )
    d = np.abs(est[0])
    np.testing.assert_allclose(true @ est, d**2, rtol=1e-4)


# --- API: pytrees, argnums, has_aux, jit, K batching -------------------------------------------


def test_pytree_of_mixed_shapes_and_argnums():
    tree = {
        "scalar": jnp.asarray(0.5),
        "vec": jnp.arange(3.0),
        "mat": jnp.ones((2, 3)),
        "cube": jnp.full((2, 1, 2), 0.3),
    }
    fun = lambda t, y: (
        jnp.sum(jnp.sin(t["mat"] @ t["vec"]))
        + t["scalar"] ** 2 * jnp.sum(t["cube"])
        + jnp.sum(y**2)
    )
    y = jnp.asarray([1.0, -2.0])
    g = fwdgrad.forward_grad(fun, argnums=(0, 1), distribution="rademacher", structure="rank_one")
    est_tree, est_y = g(jax.random.key(0), tree, y)
    assert jax.tree.structure(est_tree) == jax.tree.structure(tree)
    for a, b in zip(jax.tree.leaves(est_tree), jax.tree.leaves(tree), strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype
    assert est_y.shape == (2,)
    true = np.concatenate([flat(t) for t in jax.grad(fun, argnums=(0, 1))(tree, y)])
    est = np.concatenate([flat(est_tree), flat(est_y)])
    np.testing.assert_allclose(true @ est, est[0] ** 2, rtol=1e-5)
    # argnums=1 differentiates y only; a negative index names the same argument
    g1 = fwdgrad.forward_grad(fun, argnums=-1, distribution="rademacher")
    est1 = np.asarray(g1(jax.random.key(1), tree, y), np.float64)
    np.testing.assert_allclose(2 * np.asarray(y) @ est1, est1[0] ** 2, rtol=1e-5)


def test_value_and_has_aux():
    fun = lambda p, scale: (scale * jnp.sum(p**2), {"norm": jnp.linalg.norm(p)})
    p = jnp.asarray([1.0, 2.0, -0.5])
    (value, aux), est = fwdgrad.value_and_forward_grad(fun, has_aux=True, num_directions=3)(
        jax.random.key(0), p, 2.0
    )
    assert float(value) == pytest.approx(2.0 * 5.25)
    assert float(aux["norm"]) == pytest.approx(float(np.linalg.norm(p)))
    assert est.shape == (3,)
    est2, aux2 = fwdgrad.forward_grad(fun, has_aux=True)(jax.random.key(0), p, 2.0)
    assert est2.shape == (3,) and float(aux2["norm"]) == pytest.approx(float(aux["norm"]))
    # kwargs pass through
    value3, _ = fwdgrad.value_and_forward_grad(lambda p, scale=1.0: scale * jnp.sum(p))(
        jax.random.key(0), p, scale=3.0
    )
    assert float(value3) == pytest.approx(3 * float(jnp.sum(p)))


@pytest.mark.parametrize("distribution,structure", [CONFIGS[0], CONFIGS[3]])
def test_k_directions_by_vmap_and_scan_are_the_same_average(distribution, structure):
    """Both batchings give (1/K) sum_k (∇f·v_k) v_k for the directions of the split keys,
    rebuilt here with jax.grad; jit and eager agree."""
    kw = dict(num_directions=3, distribution=distribution, structure=structure)
    key = jax.random.key(5)
    by_vmap = fwdgrad.forward_grad(small_loss, batching="vmap", **kw)
    by_scan = jax.jit(fwdgrad.forward_grad(small_loss, batching="scan", **kw))
    a, b = flat(jax.jit(by_vmap)(key, PARAMS)), flat(by_scan(key, PARAMS))
    true = flat(jax.grad(small_loss)(PARAMS))
    vs = [
        flat(fwdgrad.random_direction(k, (PARAMS,), distribution, structure))
        for k in jax.random.split(key, 3)
    ]
    expected = np.mean([(true @ v) * v for v in vs], axis=0)
    np.testing.assert_allclose(a, expected, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(b, expected, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(flat(by_vmap(key, PARAMS)), a, rtol=1e-5, atol=1e-6)


# --- optax transformation ---------------------------------------------------------------------


def test_transformation_ignores_updates_and_advances_key():
    tx = fwdgrad.forward_gradient(jax.random.key(0), distribution="rademacher")
    params = {"w": jnp.asarray([1.0, -2.0, 0.5])}
    loss = lambda p: jnp.sum(p["w"] ** 2 * jnp.asarray([1.0, 2.0, 3.0]))
    state = tx.init(params)
    u1, s1 = tx.update({"w": jnp.zeros(3)}, state, params, value_fn=loss)
    u2, _ = tx.update({"w": jnp.full(3, 7.0)}, state, params, value_fn=loss, value=1.0)
    np.testing.assert_array_equal(u1["w"], u2["w"])
    true = flat(jax.grad(loss)(params))
    np.testing.assert_allclose(true @ flat(u1), flat(u1)[0] ** 2, rtol=1e-5)
    u3, _ = tx.update({"w": jnp.zeros(3)}, s1, params, value_fn=loss)
    assert not np.allclose(u1["w"], u3["w"])


def test_chain_with_sgd_minimises_a_quadratic_under_jit():
    target = jnp.asarray([1.0, -2.0, 3.0, 0.5])
    loss = lambda p: 0.5 * jnp.sum((p - target) ** 2)
    tx = optax.chain(fwdgrad.forward_gradient(jax.random.key(0), num_directions=2), optax.sgd(0.1))
    traces = []

    @jax.jit
    def step(params, state):
        traces.append(None)
        updates, state = tx.update(jnp.zeros_like(params), state, params, value_fn=loss)
        return optax.apply_updates(params, updates), state

    params = jnp.zeros(4)
    state = tx.init(params)
    for _ in range(300):
        params, state = step(params, state)
    assert len(traces) == 1  # compiled once
    np.testing.assert_allclose(params, target, atol=1e-2)


def test_non_finite_loss_gives_zero_update_and_is_counted():
    tx = fwdgrad.forward_gradient(jax.random.key(0))
    params = jnp.asarray([1.0, 2.0])
    state = tx.init(params)
    updates, state = tx.update(params, state, params, value_fn=lambda p: jnp.sum(jnp.log(-p)))
    np.testing.assert_array_equal(updates, np.zeros(2))
    assert int(state.nonfinite) == 1


def test_train_step_with_value_fn_gradient_matches_loss():
    model = zoo.make_model("mlp-small")
    problem = train.Problem(lambda p, x: model.apply({"params": p}, x))
    params = zoo.init_params(model, jax.random.key(0))
    lr = 1e-3
    tx = optax.chain(
        fwdgrad.forward_gradient(
            jax.random.key(1), distribution="rademacher", structure="rank_one", perturb="one_layer"
        ),
        optax.sgd(lr),
    )
    step = train.jit_step(train.make_step(problem, tx, train.value_fn_gradient))
    images = jax.random.randint(jax.random.key(2), (8, 28, 28), 0, 256).astype(jnp.uint8)
    labels = jnp.arange(8) % 10
    # one compiled reverse-mode call for the reference loss and gradient (eager is slower)
    expected, true = jax.jit(jax.value_and_grad(problem.loss_fn))(
        params, train.data_lib.normalize(images), labels
    )
    expected, true = float(expected), flat(true)
    state = train.init_state(params, tx, jax.random.key(3))
    state, value = step(state, images, labels)
    assert float(value) == pytest.approx(expected, rel=1e-5)
    assert int(state.skipped) == 0
    assert int(state.step) == 1
    # one layer of two moved by -lr (∇f·v) v with |v_i| = sqrt(2): ∇f·Δ = -lr (∇f·v)² = -Δ_i²/(2 lr)
    delta = jax.tree.map(lambda a, b: np.asarray(a, np.float64) - b, state.params, params)
    assert sum(np.any(flat(layer) != 0) for layer in delta.values()) == 1
    delta = flat(delta)
    d = np.abs(delta[delta != 0])
    np.testing.assert_allclose(d, d[0], rtol=1e-3)
    np.testing.assert_allclose(true @ delta, -(d[0] ** 2) / (2 * lr), rtol=1e-2)


def test_compare_methods_build():
    found = [m for m in recipes.METHODS if m.name.startswith("fwdgrad")]
    assert {"fwdgrad", "fwdgrad-activity"} <= {m.name for m in found}
    for method in found:
        setup = method.build(recipes.RunConfig(steps=10, batch_size=8, seed=0))
        if method.name == "fwdgrad-activity":  # the estimate arrives as the direction
            assert setup.gradient is not train.value_fn_gradient
        else:
            assert setup.gradient is train.value_fn_gradient


# --- seeds' global optimisation examples ------------------------------------------------------


def beale(p):
    x, y = p[0], p[1]
    return (1.5 - x + x * y) ** 2 + (2.25 - x + x * y**2) ** 2 + (2.625 - x + x * y**3) ** 2


def rosenbrock(p):
    return (1 - p[0]) ** 2 + 100 * (p[1] - p[0] ** 2) ** 2


def _descend(lr, steps, key, estimate):
    def body(p, k):
        return p - lr * estimate(k, p), None

    start = jnp.asarray([0.8823, 0.9150])
    final, _ = jax.lax.scan(body, start, jax.random.split(key, steps))
    return final


@pytest.mark.parametrize(
    "fun,lr,steps,optimum,tol",
    [(beale, 1e-2, 1000, (3.0, 0.5), 0.05), (rosenbrock, 1e-3, 3000, (1.0, 1.0), 0.15)],
)
def test_seed_functions_converge_with_forward_and_true_gradient(fun, lr, steps, optimum, tol):
    """The seed's setups: plain descent from (0.8823, 0.9150) reaches the minimum with the
    true gradient and with forward gradients (8 random streams each)."""
    start_value = float(fun(jnp.asarray([0.8823, 0.9150])))
    final = jax.jit(lambda k: _descend(lr, steps, k, lambda _, p: jax.grad(fun)(p)))(
        jax.random.key(0)
    )
    np.testing.assert_allclose(final, optimum, atol=tol)
    keys = jax.random.split(jax.random.key(1), 8)
    for distribution in ("normal", "rademacher"):
        est = fwdgrad.forward_grad(fun, distribution=distribution)
        finals = jax.jit(jax.vmap(lambda k, e=est: _descend(lr, steps, k, e)))(keys)
        np.testing.assert_allclose(finals, np.broadcast_to(optimum, (8, 2)), atol=tol)
        assert float(jnp.max(jax.vmap(fun)(finals))) < 0.01 * start_value


# --- errors -----------------------------------------------------------------------------------


def test_bad_construction_arguments():
    f = lambda x: jnp.sum(x)
    with pytest.raises(ValueError, match="distribution"):
        fwdgrad.forward_grad(f, distribution="uniform")
    with pytest.raises(ValueError, match="structure"):
        fwdgrad.forward_grad(f, structure="low_rank")
    with pytest.raises(ValueError, match="batching"):
        fwdgrad.value_and_forward_grad(f, batching="pmap")
    with pytest.raises(ValueError, match="perturb"):
        fwdgrad.forward_grad(f, perturb="one_leaf")
    with pytest.raises(ValueError, match="layer_probabilities"):
        fwdgrad.forward_gradient(jax.random.key(0), layer_probabilities="gradient")
    with pytest.raises(ValueError, match="num_directions"):
        fwdgrad.forward_grad(f, num_directions=0)
    with pytest.raises(TypeError, match="num_directions"):
        fwdgrad.forward_grad(f, num_directions=2.0)
    with pytest.raises(TypeError, match="num_directions"):
        fwdgrad.forward_gradient(jax.random.key(0), num_directions=True)
    with pytest.raises(ValueError, match="distribution"):
        fwdgrad.forward_gradient(jax.random.key(0), distribution="bernoulli")
    with pytest.raises(TypeError, match="callable"):
        fwdgrad.forward_grad(3.0)


def test_bad_call_arguments_raise_at_trace_time():
    key = jax.random.key(0)
    x = jnp.ones(3)
    with pytest.raises(ValueError, match="argnums"):
        jax.jit(fwdgrad.forward_grad(lambda x: jnp.sum(x), argnums=1))(key, x)
    with pytest.raises(TypeError, match="scalar"):
        jax.jit(fwdgrad.forward_grad(lambda x: x**2))(key, x)
    with pytest.raises(TypeError, match="scalar"):
        fwdgrad.forward_grad(lambda x: x**2, structure="rank_one")(key, jnp.ones((2, 2)))
    with pytest.raises(TypeError, match="argnums"):
        fwdgrad.forward_grad(lambda n: jnp.sum(n * 1.0))(key, jnp.arange(3))
    with pytest.raises(TypeError, match="has_aux"):
        fwdgrad.forward_grad(lambda x: jnp.sum(x), has_aux=True)(key, x)
    tx = fwdgrad.forward_gradient(key)
    state = tx.init(x)
    with pytest.raises(ValueError, match="value_fn"):
        tx.update(x, state, x)
    with pytest.raises(ValueError, match="params"):
        tx.update(x, state, value_fn=lambda p: jnp.sum(p))


@pytest.mark.parametrize("n", [31, 100])
def test_materialised_draw_is_the_draw_itself(n):
    # The rank-one factors go through a product with the identity (so XLA stores them once):
    # it must not change a single bit, for tiny, huge and negative values alike.
    x = jax.random.normal(jax.random.key(n), (n,)) * jnp.logspace(-30, 30, n)
    np.testing.assert_array_equal(np.asarray(directions._materialise(x)), np.asarray(x))


FAST = {"structure": "rank_one", "perturb": "one_layer"}


def test_mask_estimates_the_selected_leaves_and_value_fn_sees_them_all():
    """One Rademacher direction on a single scalar leaf is ±1, so its estimate (∇f·v)v is the
    exact partial derivative; the unselected leaves (which value_fn still reads) get exact
    zeros. A callable mask and a prefix mask select the same leaves; with one_layer the
    selected leaf is the only layer, drawn with probability 1."""
    exact = jax.grad(small_loss)(PARAMS)
    masks = [({"w": False, "b": False, "s": True}, {}), (lambda p: {k: k == "s" for k in p}, FAST)]
    for mask, options in masks:
        tx = fwdgrad.forward_gradient(
            jax.random.key(3), distribution="rademacher", mask=mask, **options
        )
        update = jax.jit(lambda p, s, tx=tx: tx.update(p, s, p, value_fn=small_loss)[0])
        grads = update(PARAMS, tx.init(PARAMS))
        np.testing.assert_allclose(grads["s"], exact["s"], rtol=1e-5)
        np.testing.assert_array_equal(grads["w"], np.zeros((3, 2)))
        np.testing.assert_array_equal(grads["b"], np.zeros(2))


def test_inside_optax_masked_is_an_error_naming_the_mask_argument():
    """optax.masked hands the inner transformation only the selected leaves (the rest are
    MaskedNode placeholders), so value_fn cannot run; the error names the remedy."""
    mask = {"w": True, "b": True, "s": False}
    tx = optax.masked(fwdgrad.forward_gradient(jax.random.key(0)), mask)
    state = tx.init(PARAMS)
    with pytest.raises(ValueError, match=r"forward_gradient\(key, mask=mask\)"):
        jax.jit(lambda p, s: tx.update(p, s, p, value_fn=small_loss))(PARAMS, state)
    with pytest.raises(ValueError, match="mask must be a prefix"):
        bad = fwdgrad.forward_gradient(jax.random.key(0), mask={"w": True, "x": False})
        bad.update(PARAMS, bad.init(PARAMS), PARAMS, value_fn=small_loss)


def test_integer_parameters_are_refused_naming_the_leaf():
    params = {**PARAMS, "count": jnp.array(2)}
    tx = fwdgrad.forward_gradient(jax.random.key(0))
    with pytest.raises(TypeError, match=r"\['count'\] \(int32\)"):
        tx.init(params)
    state = tx.init(PARAMS)
    with pytest.raises(TypeError, match=r"forward_gradient: .*\['count'\]"):
        tx.update(params, state, params, value_fn=lambda p: small_loss(p) + p["count"])


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
def test_estimate_keeps_the_parameters_dtype_like_jax_grad(dtype):
    """With half-precision parameters and a float32 loss, the estimate is formed in float32
    and rounded to the leaf's dtype (jax.grad's dtype), for the function and the transform."""
    params = jax.tree.map(lambda x: x.astype(dtype), PARAMS)
    loss = lambda p: small_loss(jax.tree.map(lambda x: x.astype(jnp.float32), p))
    subkey = jax.random.split(jax.random.key(0))[1]  # the transform's first draw
    _, g = fwdgrad.value_and_forward_grad(loss, structure="rank_one")(subkey, params)
    tx = fwdgrad.forward_gradient(jax.random.key(0), structure="rank_one")
    u, _ = tx.update(params, tx.init(params), params, value_fn=loss)
    exact = jax.grad(loss)(params)
    for tree in (g, u):
        assert jax.tree.map(lambda x: x.dtype, tree) == jax.tree.map(lambda x: x.dtype, exact)
    # the same direction (same key): the same estimate, rounded once
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), g, u)
