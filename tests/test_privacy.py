"""Per-sample clipping and DP-SGD (jaxopt_suite.privacy) against independent computations:
clipping of brute-force per-sample gradients (tests/reference.py), dp-accounting called
directly, the binomial tail from scipy, and the noise's sample statistics."""

from __future__ import annotations

import dp_accounting as dpa
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import scipy.stats
from flax import nnx

from jaxopt_suite import privacy
from tests import reference
from tests.curvature.helpers import init, labels, linen_apply, rand
from tests.multidevice import run_on_devices

TOL = dict(atol=2e-5, rtol=2e-5)


def clipped_reference(apply_fn, params, x, y, loss, max_norm, weights, reduction, per_layer):
    """Clipping of the brute-force per-sample gradients :math:`\\nabla \\ell_n` (float64)."""
    grads = reference.per_sample(apply_fn, params, x, y, loss, "sum")["grads"]  # (N, P)
    weights = np.asarray(weights, np.float64)
    if per_layer:
        parts = [grads[:, s] for s in reference.leaf_slices(params)]
        norms = [np.linalg.norm(g, axis=1) for g in parts]
        clipped = np.concatenate(
            [g * np.minimum(1, max_norm / n)[:, None] for g, n in zip(parts, norms, strict=True)],
            axis=1,
        )
        norms = jax.tree.unflatten(jax.tree.structure(params), norms)
    else:
        norms = np.linalg.norm(grads, axis=1)
        clipped = grads * np.minimum(1, max_norm / norms)[:, None]
    total = weights @ clipped
    if reduction == "mean":
        total = total / weights.sum()
    return reference.unflat(params, total), norms


def check_clipped(apply_fn, params, x, y, loss, *, max_norm, weights, reduction="mean", **kw):
    fn = jax.jit(
        privacy.clipped_value_and_grad(
            apply_fn, loss=loss, max_norm=max_norm, reduction=reduction, **kw
        )
    )
    value, grads, norms = fn(params, x, y, weights=weights)
    want, want_norms = clipped_reference(
        apply_fn, params, x, y, loss, max_norm, weights, reduction, kw.get("per_layer", False)
    )
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(np.asarray(a), b, **TOL)
    for a, b in zip(jax.tree.leaves(norms), jax.tree.leaves(want_norms), strict=True):
        np.testing.assert_allclose(np.asarray(a), b, **TOL)
    return value, grads, norms


class ConvNet(nn.Module):
    """Conv (rule), GroupNorm (generic path), Dense (rule)."""

    @nn.compact
    def __call__(self, x):
        x = nn.tanh(nn.Conv(3, (3, 3))(x))
        x = nn.GroupNorm(num_groups=1)(x)
        return nn.Dense(4)(x.reshape(x.shape[0], -1))


def test_linen_conv_groupnorm_mask_matches_vmap_clipping():
    """Conv and Dense by their rules, GroupNorm by the generic path; some samples clipped,
    some not; a padded sample (weight 0) with garbage changes nothing."""
    model = ConvNet()
    x, y = rand((5, 4, 4, 2)), labels((5,), 4)
    x = x.at[4].set(100.0)  # the padded sample: a huge gradient that must not count
    params = init(model, x)
    apply_fn = linen_apply(model)
    weights = jnp.array([1.0, 1.0, 1.0, 1.0, 0.0])
    value, grads, norms = check_clipped(
        apply_fn, params, x, y, "cross_entropy", max_norm=4.5, weights=weights
    )
    assert np.sum(np.asarray(norms[:4]) > 4.5) not in (0, 4)  # both branches of the clip
    real = jax.jit(privacy.clipped_value_and_grad(apply_fn, loss="cross_entropy", max_norm=4.5))(
        params, x[:4], y[:4]
    )
    np.testing.assert_allclose(value, real[0], **TOL)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(real[1]), strict=True):
        np.testing.assert_allclose(a, b, **TOL)


class Net(nnx.Module):
    def __init__(self, rngs):
        self.lin1 = nnx.Linear(3, 6, rngs=rngs)
        self.norm = nnx.LayerNorm(6, rngs=rngs)
        self.lin2 = nnx.Linear(6, 2, rngs=rngs)

    def __call__(self, x):
        return self.lin2(jnp.tanh(self.norm(self.lin1(x))))


def test_nnx_per_layer_weights_sum():
    """nnx Linear and LayerNorm, mse, per-leaf clipping, fractional weights, reduction sum."""
    graphdef, params = nnx.split(Net(nnx.Rngs(0)), nnx.Param)
    apply_fn = lambda p, x: nnx.merge(graphdef, p)(x)
    x, y = rand((4, 3)), rand((4, 2), seed=3)
    weights = jnp.array([0.5, 1.0, 2.0, 0.0])
    _, _, norms = check_clipped(
        apply_fn,
        params,
        x,
        y,
        "mse",
        max_norm=0.3,
        weights=weights,
        reduction="sum",
        per_layer=True,
    )
    assert jax.tree.structure(norms) == jax.tree.structure(params)


class TinyLM(nn.Module):
    """Embed, causal self-attention (DenseGeneral: generic path), LayerNorm, Dense."""

    @nn.compact
    def __call__(self, tokens):
        h = nn.Embed(7, 8)(tokens)
        mask = nn.make_causal_mask(tokens)
        h = h + nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=8)(h, mask=mask)
        return nn.Dense(7)(nn.LayerNorm()(h))


def masked_token_loss(out, target):
    """One sample's cross-entropy over its tokens; label -1 marks a padded token (absent)."""
    real = target >= 0
    logp = jax.nn.log_softmax(out, axis=-1)
    picked = jnp.take_along_axis(logp, jnp.where(real, target, 0)[:, None], axis=-1)[:, 0]
    return -jnp.sum(jnp.where(real, picked, 0.0))


def test_transformer_with_padded_tokens_and_samples():
    model = TinyLM()
    tokens = labels((4, 5), 7, seed=4)
    params = init(model, tokens)
    targets = labels((4, 5), 7, seed=5).at[1, 3:].set(-1)  # sample 1: two padded tokens
    weights = jnp.array([1.0, 1.0, 1.0, 0.0])  # sample 3 is padding
    check_clipped(
        linen_apply(model),
        params,
        tokens,
        targets,
        masked_token_loss,
        max_norm=1.0,
        weights=weights,
    )


def test_unclipped_equals_gradient_and_all_masked_is_zero():
    model = nn.Dense(3)
    x, y = rand((4, 2)), labels((4,), 3)
    params = init(model, x)
    apply_fn = linen_apply(model)
    fn = jax.jit(privacy.clipped_value_and_grad(apply_fn, loss="cross_entropy", max_norm=1e6))
    value, grads, _ = fn(params, x, y)
    want_value, want = jax.value_and_grad(
        lambda p: optax.softmax_cross_entropy_with_integer_labels(apply_fn(p, x), y).mean()
    )(params)
    np.testing.assert_allclose(value, want_value, **TOL)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(a, b, **TOL)
    value, grads, _ = fn(params, x, y, weights=jnp.zeros(4, bool))
    assert float(value) == 0 and all(float(jnp.abs(g).max()) == 0 for g in jax.tree.leaves(grads))


def test_bad_input_raises():
    apply_fn = linen_apply(nn.Dense(3))
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="max_norm"):
            privacy.clipped_value_and_grad(apply_fn, loss="cross_entropy", max_norm=bad)
    with pytest.raises(TypeError, match="max_norm"):
        privacy.clipped_value_and_grad(apply_fn, loss="cross_entropy", max_norm="1")
    with pytest.raises(ValueError, match="reduction"):
        privacy.clipped_value_and_grad(
            apply_fn, loss="cross_entropy", max_norm=1.0, reduction="max"
        )
    x, y = rand((4, 2)), labels((4,), 3)
    params = init(nn.Dense(3), x)
    fn = privacy.clipped_value_and_grad(apply_fn, loss="cross_entropy", max_norm=1.0)
    with pytest.raises(ValueError, match=r"weights must have shape \(N,\) = \(4,\)"):
        fn(params, x, y, weights=jnp.ones(3))
    with pytest.raises(ValueError, match="key"):
        privacy.dp_sgd(0.1, noise_multiplier=1.0, max_norm=1.0, expected_batch_size=4, key=None)
    with pytest.raises(ValueError, match="noise_multiplier"):
        privacy.dp_aggregate(-0.5, 1.0, 4, jax.random.key(0))
    with pytest.raises(ValueError, match="max_norm"):
        privacy.dp_aggregate(1.0, 0.0, 4, jax.random.key(0))
    with pytest.raises(ValueError, match="expected_batch_size"):
        privacy.dp_aggregate(1.0, 1.0, 0, jax.random.key(0))
    with pytest.raises(ValueError, match="delta"):
        privacy.epsilon(1.0, 0.01, 100, 0.0)
    with pytest.raises(ValueError, match="sampling_rate"):
        privacy.noise_multiplier_for(1.0, 1e-5, 1.5, 100)


def test_noise_scale_and_average():
    """(sum + sigma C xi) / B: mean and standard deviation of 40000 coordinates, fixed key."""
    sigma, c, b = 2.0, 0.5, 4.0
    tx = privacy.dp_aggregate(sigma, c, b, jax.random.key(0))
    summed = {"a": jnp.full((200, 100), 3.0), "b": jnp.full((20000,), 3.0)}
    state = tx.init(summed)
    out, state = jax.jit(tx.update)(summed, state)
    noise = np.concatenate([np.ravel(v) - 3.0 / b for v in jax.tree.leaves(out)])
    # standard errors: mean sd/sqrt(n) = 0.00125, sd about sd/sqrt(2n) = 0.0009
    assert abs(noise.mean()) < 5 * 0.00125
    np.testing.assert_allclose(noise.std(), sigma * c / b, rtol=0.02)
    again, _ = jax.jit(tx.update)(summed, state)
    assert not np.allclose(again["b"], out["b"])  # the key moved on
    quiet = privacy.dp_aggregate(0.0, c, b, jax.random.key(0))
    np.testing.assert_array_equal(quiet.update(summed, quiet.init(summed))[0]["b"], 3.0 / b)


def test_dp_sgd_and_dp_adam_train_under_jit_and_inject_hyperparams():
    model = nn.Dense(3)
    x, y = rand((8, 2)), labels((8,), 3)
    params = init(model, x)
    grad_fn = privacy.clipped_value_and_grad(
        linen_apply(model), loss="cross_entropy", max_norm=1.0, reduction="sum"
    )
    key = jax.random.key(1)
    injected = optax.inject_hyperparams(privacy.dp_sgd, static_args=("key",))(
        learning_rate=0.5, noise_multiplier=0.1, max_norm=1.0, expected_batch_size=8, key=key
    )

    def losses(tx):
        @jax.jit
        def step(params, state):
            value, grads, _ = grad_fn(params, x, y)
            updates, state = tx.update(grads, state, params)
            return optax.apply_updates(params, updates), state, value

        p, state, values = params, tx.init(params), []
        for _ in range(5):
            p, state, value = step(p, state)
            values.append(float(value))
        return values

    for tx in (
        privacy.dp_sgd(0.5, noise_multiplier=0.1, max_norm=1.0, expected_batch_size=8, key=key),
        injected,
        privacy.dp_adam(0.05, noise_multiplier=0.1, max_norm=1.0, expected_batch_size=8, key=key),
    ):
        values = losses(tx)
        assert values[-1] < values[0]
    # the injected learning rate and noise multiplier are live hyperparameters
    state = injected.init(params)
    assert set(state.hyperparams) >= {"learning_rate", "noise_multiplier"}


@pytest.mark.parametrize("accountant", ["rdp", "pld"])
def test_epsilon_matches_dp_accounting(accountant):
    for sigma, q, steps, delta in ((1.1, 256 / 60000, 1000, 1e-5), (4.0, 0.01, 10000, 1e-5)):
        acc = dpa.rdp.RdpAccountant() if accountant == "rdp" else dpa.pld.PLDAccountant()
        event = dpa.PoissonSampledDpEvent(q, dpa.GaussianDpEvent(sigma))
        acc.compose(dpa.SelfComposedDpEvent(event, steps))
        np.testing.assert_allclose(
            privacy.epsilon(sigma, q, steps, delta, accountant=accountant),
            acc.get_epsilon(delta),
            rtol=1e-9,
        )
    assert privacy.epsilon(0.0, 0.01, 10, 1e-5) == np.inf
    assert privacy.epsilon(1.0, 0.01, 0, 1e-5) == 0.0


def test_noise_multiplier_for_is_the_smallest_within_budget():
    sigma = privacy.noise_multiplier_for(2.0, 1e-5, 0.02, 500)
    assert privacy.epsilon(sigma, 0.02, 500, 1e-5) <= 2.0
    assert privacy.epsilon(sigma * 0.99, 0.02, 500, 1e-5) > 2.0


def test_poisson_batch_and_padded_size():
    rng = np.random.default_rng(0)
    sizes = []
    for _ in range(200):
        indices, mask = privacy.poisson_batch(rng, 100, 0.1, 40)
        drawn = indices[mask]
        assert mask.shape == (40,) and np.all(mask[: drawn.size])
        assert np.all(np.diff(drawn) > 0) and np.all(indices[~mask] == 0)
        sizes.append(drawn.size)
    assert abs(np.mean(sizes) - 10) < 4 * np.sqrt(9 / 200)  # Binomial(100, 0.1)
    with pytest.raises(ValueError, match="batch_size"):
        privacy.poisson_batch(np.random.default_rng(0), 100, 0.9, 10)
    for n, q, overflow in ((60000, 256 / 60000, 1e-9), (500, 0.3, 1e-3)):
        b = privacy.padded_batch_size(n, q, overflow)
        assert scipy.stats.binom.sf(b, n, q) <= overflow < scipy.stats.binom.sf(b - 1, n, q)


def test_dp_step_on_a_sharded_batch_equals_one_device():
    """The clipped sum and one DP-SGD step with the batch (and mask) split over 8 devices
    equal the single-device step (same key, so the same noise)."""
    run_on_devices(
        """
        import flax.linen as nn, jax.numpy as jnp, numpy as np, optax
        from jax.sharding import NamedSharding, PartitionSpec as P
        from jaxopt_suite import privacy, sharding

        model = nn.Sequential([nn.Dense(8), nn.tanh, nn.Dense(3)])
        x = jnp.asarray(np.random.default_rng(0).normal(size=(16, 4)), jnp.float32)
        y = jnp.asarray(np.random.default_rng(1).integers(0, 3, 16), jnp.int32)
        mask = jnp.arange(16) < 13
        params = model.init(jax.random.key(0), x)["params"]
        grad_fn = privacy.clipped_value_and_grad(
            lambda p, x: model.apply({"params": p}, x), loss="cross_entropy", max_norm=0.5,
            reduction="sum")
        tx = privacy.dp_sgd(0.1, noise_multiplier=1.0, max_norm=0.5, expected_batch_size=12,
                            key=jax.random.key(2))

        def step(params, state, x, y, mask):
            _, summed, norms = grad_fn(params, x, y, weights=mask)
            updates, state = tx.update(summed, state, params)
            return optax.apply_updates(params, updates), norms

        state = tx.init(params)
        want = jax.jit(step)(params, state, x, y, mask)
        rows = NamedSharding(sharding.make_mesh(), P("data"))
        put = lambda a: jax.device_put(a, rows)
        got = jax.jit(step)(params, state, put(x), put(y), put(mask))
        assert got[1].sharding.spec == P("data"), got[1].sharding
        for u, v in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
            np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=2e-5, atol=2e-6)
        """
    )
