"""The rule registry and the engine's options: the worked example of
``docs/curvature_rules.md`` (a user's elementwise ``Scale`` layer) registered and checked
against brute-force autodiff, malformed or duplicate registrations refused, and every
``EngineConfig`` switch leaving the values unchanged."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from jaxopt_suite import curvature
from jaxopt_suite.curvature import layers

TOL = dict(rtol=1e-4, atol=1e-6)


# --- the example of docs/curvature_rules.md --------------------------------------------------


class Scale(nn.Module):
    """y = x * w, w of shape (features,), over the last axis of x."""

    @nn.compact
    def __call__(self, x):
        w = self.param("w", nn.initializers.ones, (x.shape[-1],))
        return x * w


def scale_gradients(x, delta):
    """Per-(column, sample) gradients of w, (K, N, D): sum over positions t of x ⊙ delta."""
    k, n, d = delta.shape[0], delta.shape[1], delta.shape[-1]
    return jnp.einsum("ntd,kntd->knd", x.reshape(n, -1, d), delta.reshape(k, n, -1, d))


def bind_scale(module, args, kwargs):
    """The parameter in the kernel role and what the rule consumes: the input x."""
    x = args[0]
    return layers.ModuleCall(kernel=module.get_variable("params", "w"), record=lambda: x)


class ScaleRule(curvature.LayerRule):
    kind = "scale"
    interception = layers.ModuleInterception(linen={Scale: bind_scale})

    def statistic(self, statistic, call, role, prepared, delta, config):
        g = scale_gradients(prepared, delta)
        if statistic == "individual":
            return g[0]
        if statistic == "individual_sq_norm":
            return jnp.sum(g[0] ** 2, axis=-1)
        if statistic == "sum_sq":
            return jnp.sum(g**2, axis=(0, 1))
        if statistic == "individual_sum_sq":
            return jnp.sum(g**2, axis=0)
        raise ValueError(f"unknown statistic {statistic!r}")

    def columns(self, call, role, prepared, delta):
        return scale_gradients(prepared, delta)

    def kron(self, call, role, prepared, delta):
        g = scale_gradients(prepared, delta).reshape(-1, delta.shape[-1])
        return (g.T @ g,)  # the exact GGN block of w


# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def scale_rule():
    if "scale" not in curvature.registered_kinds():
        curvature.register_rule(ScaleRule())
    return curvature.rules.get_rule("scale")


class Model(nn.Module):
    @nn.compact
    def __call__(self, x):  # x (N, 2, 4)
        h = jnp.tanh(Scale()(x))
        return nn.Dense(3)(h.reshape(h.shape[0], -1))


def _problem():
    model = Model()
    x = jax.random.normal(jax.random.key(0), (5, 2, 4))
    y = jnp.array([0, 1, 2, 0, 1])
    params = model.init(jax.random.key(1), x)["params"]
    params["Scale_0"]["w"] = jax.random.normal(jax.random.key(2), (4,))
    return (lambda p, x: model.apply({"params": p}, x)), params, x, y


def _loss(out, y):  # cross-entropy, mean over the batch
    return -jnp.mean(jax.nn.log_softmax(out)[jnp.arange(out.shape[0]), y])


def test_registered_rule_serves_its_layer(scale_rule):
    apply, params, x, _ = _problem()
    kinds = curvature.coverage(apply, params, x)
    assert kinds["Scale_0"] == {"w": "scale"}
    assert kinds["Dense_0"] == {"bias": "dense", "kernel": "dense"}
    off = curvature.coverage(apply, params, x, kinds=("dense",))
    assert off["Scale_0"] == {"w": "generic"}


def test_registered_rule_matches_brute_force(scale_rule):
    apply, params, x, y = _problem()
    n = x.shape[0]
    quantities = ("batch_l2", "grad_batch", "diag_ggn_exact", "sqrt_ggn_exact", "kflr")
    fn = jax.jit(curvature.value_and_grad(apply, loss="cross_entropy", quantities=quantities))
    value, grads, extras = fn(params, x, y)
    want_value, want_grads = jax.value_and_grad(lambda p: _loss(apply(p, x), y))(params)
    np.testing.assert_allclose(value, want_value, **TOL)
    np.testing.assert_allclose(grads["Scale_0"]["w"], want_grads["Scale_0"]["w"], **TOL)

    # per-sample gradients, scaled by 1/N (BackPACK's convention for "mean")
    def sample_loss(p, xn, yn):
        return _loss(apply(p, xn[None]), yn[None]) / n

    per_sample = jax.vmap(jax.grad(sample_loss), in_axes=(None, 0, 0))(params, x, y)
    w_batch = per_sample["Scale_0"]["w"]
    np.testing.assert_allclose(extras["grad_batch"]["Scale_0"]["w"], w_batch, **TOL)
    np.testing.assert_allclose(
        extras["batch_l2"]["Scale_0"]["w"], jnp.sum(w_batch**2, axis=1), **TOL
    )

    # the GGN J^T H J of the whole batch from jax.jacrev, its diagonal and w's block
    flat, unravel = ravel_pytree(params)
    out = apply(params, x)
    jac = jax.jacrev(lambda f: apply(unravel(f), x))(flat).reshape(out.size, -1)
    hess = jax.hessian(lambda o: _loss(o.reshape(out.shape), y))(out.reshape(-1))
    ggn = jac.T @ hess @ jac
    want = unravel(jnp.diag(ggn))
    got = extras["diag_ggn_exact"]
    for path in (("Scale_0", "w"), ("Dense_0", "kernel"), ("Dense_0", "bias")):
        np.testing.assert_allclose(got[path[0]][path[1]], want[path[0]][path[1]], **TOL)
    # sqrt_ggn_exact: V V^T is w's GGN block; kflr: the block itself
    w_index = np.asarray(unravel(jnp.arange(flat.size, dtype=jnp.float32))["Scale_0"]["w"])
    block = ggn[np.ix_(w_index.astype(int), w_index.astype(int))]
    v = extras["sqrt_ggn_exact"]["Scale_0"]["w"].reshape(-1, 4)
    np.testing.assert_allclose(v.T @ v, block, **TOL)
    np.testing.assert_allclose(extras["kflr"]["Scale_0"]["w"][0], block, **TOL)


def test_malformed_or_duplicate_rules_are_refused(scale_rule):
    with pytest.raises(TypeError, match="LayerRule instance"):
        curvature.register_rule(object())
    with pytest.raises(ValueError, match="non-empty string"):
        curvature.register_rule(curvature.LayerRule())

    class NoInterception(curvature.LayerRule):
        kind = "no_interception"

    with pytest.raises(TypeError, match="interception must be"):
        curvature.register_rule(NoInterception())
    with pytest.raises(ValueError, match="'scale' is already registered"):
        curvature.register_rule(ScaleRule())

    class SameClass(ScaleRule):
        kind = "scale_again"

    with pytest.raises(ValueError, match="Scale is already intercepted for kind 'scale'"):
        curvature.register_rule(SameClass())
    assert "scale_again" not in curvature.registered_kinds()
    assert "no_interception" not in curvature.registered_kinds()


class _SmallCNN(nn.Module):
    @nn.compact
    def __call__(self, x):  # x (N, 8, 8, 1)
        h = nn.max_pool(nn.relu(nn.Conv(3, (3, 3))(x)), (2, 2), strides=(2, 2))
        h = nn.LayerNorm()(h.reshape(h.shape[0], -1))
        return nn.Dense(4)(jnp.tanh(nn.Dense(6)(h)))


def test_every_option_leaves_the_values_unchanged():
    model = _SmallCNN()
    x = jax.random.normal(jax.random.key(0), (3, 8, 8, 1))
    y = jnp.array([0, 3, 1])
    params = model.init(jax.random.key(1), x)["params"]
    apply = lambda p, x: model.apply({"params": p}, x)
    quantities = ("sum_grad_squared", "diag_ggn_exact", "diag_ggn_exact_batch", "diag_h", "kflr")
    variants = [
        curvature.EngineConfig(),
        curvature.EngineConfig(
            column_groups=1,
            kernel_grad_from_patches=False,
            per_sample_product=0,
            conv_few_weights=False,
            sample_chunk_bytes=64,
            residual_chunk=3,
            banded_conv_cotangent=False,
        ),
        curvature.EngineConfig(column_groups=16, unroll_columns=2),
        curvature.EngineConfig(kinds=("dense",)),
    ]
    results = []
    for config in variants:
        # the generic path has no Kronecker factors for a conv kernel: no kflr without rules
        wanted = quantities if config.kinds is None else quantities[:-1]
        fn = curvature.value_and_grad(apply, loss="cross_entropy", quantities=wanted, config=config)
        results.append(jax.jit(fn)(params, x, y))
    for value, grads, extras in results[1:]:
        want = (results[0][0], results[0][1], {q: results[0][2][q] for q in extras})
        for w, g in zip(
            jax.tree.leaves(want), jax.tree.leaves((value, grads, extras)), strict=True
        ):
            np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-6)


def test_engine_config_is_a_checked_frozen_value():
    config = curvature.EngineConfig(column_groups=2, kinds=["dense"])
    assert config.kinds == ("dense",)
    assert hash(config) == hash(curvature.EngineConfig(column_groups=2, kinds=("dense",)))
    with pytest.raises(AttributeError):
        config.column_groups = 3
    with pytest.raises(ValueError, match="column_groups"):
        curvature.EngineConfig(column_groups=0)
    with pytest.raises(ValueError, match="residual_chunk"):
        curvature.EngineConfig(residual_chunk=0)
    apply = lambda p, x: x @ p
    with pytest.raises(TypeError, match="config must be an EngineConfig"):
        curvature.value_and_grad(apply, loss="mse", config={"column_groups": 2})
    with pytest.raises(ValueError, match=r"no rule for kinds \['dens'\]"):
        curvature.value_and_grad(apply, loss="mse", config=curvature.EngineConfig(kinds=("dens",)))
