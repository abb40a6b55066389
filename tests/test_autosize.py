"""Auto-sizing: live units, shrinking that keeps the network's function, and the seed's XOR."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxopt_suite import autosize, group_sparsity, zoo

RNG = np.random.default_rng(0)


def kill(params, layer, units):
    """Zeroes the groups (kernel slice and bias) of some output units."""
    node = dict(params[layer])
    units = jnp.asarray(units)
    node["kernel"] = node["kernel"].at[..., units].set(0.0)
    node["bias"] = node["bias"].at[units].set(0.0)
    return {**params, layer: node}


class TinyCNN(nn.Module):
    """Conv -> Conv -> pool -> flatten -> Dense -> Dense, widths as attributes."""

    widths: tuple[int, int, int] = (4, 5, 6)

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(self.widths[0], (3, 3), name="Conv_0")(x))
        x = nn.relu(nn.Conv(self.widths[1], (3, 3), padding="VALID", name="Conv_1")(x))
        x = nn.max_pool(x, (2, 2), strides=(2, 2)).reshape(x.shape[0], -1)
        x = nn.relu(nn.Dense(self.widths[2], name="Dense_0")(x))
        return nn.Dense(3, name="Dense_1")(x)


def test_find_layers_and_live_units():
    x = jnp.zeros((1, 8, 8, 1))
    params = TinyCNN(widths=(4, 50, 6)).init(jax.random.key(0), x)["params"]
    names = [layer.name for layer in autosize.find_layers(params)]
    assert sorted(names) == ["Conv_0", "Conv_1", "Dense_0", "Dense_1"]
    params = kill(params, "Conv_1", [0, 3, 7])
    live = autosize.live_units(params)
    assert live == {"Conv_0": 4, "Conv_1": 47, "Dense_0": 6, "Dense_1": 3}
    assert autosize.total_units(params)["Conv_1"] == 50
    # A unit with a zero kernel slice but a non-zero bias is live (it outputs a constant).
    node = dict(params["Conv_1"])
    node["bias"] = node["bias"].at[3].set(0.5)
    assert autosize.live_units({**params, "Conv_1": node})["Conv_1"] == 48


def test_shrink_mlp_keeps_outputs():
    model = zoo.make_model("mlp-small")  # 784-128-10
    params = zoo.init_params(model, jax.random.key(1))
    dead = RNG.choice(128, size=100, replace=False)
    params = kill(params, "Dense_0", dead)
    small, widths = autosize.shrink(params, ["Dense_0", "Dense_1"])
    assert widths == {"Dense_0": 28, "Dense_1": 10}
    assert small["Dense_0"]["kernel"].shape == (784, 28)
    assert small["Dense_1"]["kernel"].shape == (28, 10)
    x = jnp.asarray(RNG.normal(size=(5, 28, 28, 1)), jnp.float32)
    expected = model.apply({"params": params}, x)
    got = zoo.MLP(hidden=(widths["Dense_0"],)).apply({"params": small}, x)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_shrink_conv_chain_and_flatten_keeps_outputs():
    model = TinyCNN()
    x = jnp.asarray(RNG.normal(size=(3, 8, 8, 1)), jnp.float32)
    params = model.init(jax.random.key(2), x)["params"]
    params = kill(params, "Conv_0", [1])
    params = kill(params, "Conv_1", [2, 4])
    params = kill(params, "Dense_0", [0])
    small, widths = autosize.shrink(params, ["Conv_0", "Conv_1", "Dense_0", "Dense_1"])
    assert widths == {"Conv_0": 3, "Conv_1": 3, "Dense_0": 5, "Dense_1": 3}
    assert small["Conv_1"]["kernel"].shape == (3, 3, 3, 3)
    assert small["Dense_0"]["kernel"].shape == (3 * 3 * 3, 5)
    rebuilt = TinyCNN(widths=(widths["Conv_0"], widths["Conv_1"], widths["Dense_0"]))
    np.testing.assert_allclose(
        rebuilt.apply({"params": small}, x),
        model.apply({"params": params}, x),
        rtol=1e-5,
        atol=1e-5,
    )


def test_shrink_removes_units_fed_only_by_dead_units():
    params = {
        "Dense_0": {"kernel": jnp.ones((2, 3)), "bias": jnp.ones(3)},
        "Dense_1": {"kernel": jnp.ones((3, 2)), "bias": jnp.zeros(2)},
        "Dense_2": {"kernel": jnp.ones((2, 1)), "bias": jnp.zeros(1)},
    }
    params = kill(params, "Dense_0", [1])
    # Unit 0 of Dense_1 only listens to the dead unit 1 of Dense_0 and has no bias.
    params["Dense_1"]["kernel"] = params["Dense_1"]["kernel"].at[:, 0].set(jnp.array([0, 1, 0]))
    small, widths = autosize.shrink(params, ["Dense_0", "Dense_1", "Dense_2"])
    assert widths == {"Dense_0": 2, "Dense_1": 1, "Dense_2": 1}
    np.testing.assert_array_equal(small["Dense_2"]["kernel"], [[1.0]])


def test_shrink_bad_input():
    params = {
        "Dense_0": {"kernel": jnp.ones((2, 3)), "bias": jnp.ones(3)},
        "Dense_1": {"kernel": jnp.ones((4, 2)), "bias": jnp.ones(2)},
    }
    with pytest.raises(ValueError, match="cannot follow 'Dense_0' -> 'Dense_1'"):
        autosize.shrink(params, ["Dense_0", "Dense_1"])
    with pytest.raises(ValueError, match="not found"):
        autosize.shrink(params, ["Dense_0", "Dense_9"])
    with pytest.raises(ValueError, match="at least 2"):
        autosize.shrink(params, ["Dense_0"])
    bad = {"Dense_0": {"kernel": jnp.ones((2, 3)), "bias": jnp.ones(2)}}
    with pytest.raises(ValueError, match="Dense_0/bias"):
        autosize.live_units(bad)
    with pytest.raises(ValueError, match="Dense_0/kernel"):
        autosize.live_units({"Dense_0": {"kernel": jnp.ones(3)}})


# ------------------------------------------------------------------------------------ XOR
XOR_X = jnp.array([[0, 0], [0, 1], [1, 0], [1, 1]], jnp.float32)
XOR_Y = jnp.array([[0], [1], [1], [0]], jnp.float32)


def _torch_like_init(key, hidden=100):
    """PyTorch's nn.Linear default: weight and bias uniform in +-1/sqrt(fan_in)."""
    keys = jax.random.split(key, 4)
    uniform = lambda k, shape, fan_in: jax.random.uniform(
        k, shape, minval=-1 / np.sqrt(fan_in), maxval=1 / np.sqrt(fan_in)
    )
    return {
        "Dense_0": {
            "kernel": uniform(keys[0], (2, hidden), 2),
            "bias": uniform(keys[1], (hidden,), 2),
        },
        "Dense_1": {
            "kernel": uniform(keys[2], (hidden, 1), hidden),
            "bias": uniform(keys[3], (1,), hidden),
        },
    }


def _xor_net(params, x):
    hidden = jax.nn.relu(x @ params["Dense_0"]["kernel"] + params["Dense_0"]["bias"])
    return hidden @ params["Dense_1"]["kernel"] + params["Dense_1"]["bias"]


@pytest.mark.slow
def test_xor_auto_sizing_seed_example():
    """ProxGradPytorch's XOR: 2-100-1 ReLU, summed MSE, SGD lr 0.01, 5000 epochs of the four
    samples one at a time, linf1 (reg 0.005, lr 0.1) on the hidden layer after every step;
    20 seeds in one vmapped lax.scan."""
    tx = optax.chain(
        optax.sgd(0.01),
        group_sparsity(0.005, 0.1, norm="linf1", mask={"Dense_0": True, "Dense_1": False}),
    )

    def train(key):
        params = _torch_like_init(key)

        def step(carry, i):
            params, state = carry
            loss = lambda p: jnp.sum((_xor_net(p, XOR_X[i][None]) - XOR_Y[i][None]) ** 2)
            updates, state = tx.update(jax.grad(loss)(params), state, params)
            return (optax.apply_updates(params, updates), state), None

        samples = jnp.arange(4 * 5000) % 4
        (params, _), _ = jax.lax.scan(step, (params, tx.init(params)), samples)
        return params

    trained = jax.jit(jax.vmap(train))(jax.random.split(jax.random.key(0), 20))
    live = [
        autosize.live_units(jax.tree.map(lambda x, i=i: x[i], trained))["Dense_0"]
        for i in range(20)
    ]
    predictions = np.asarray(jax.vmap(_xor_net, in_axes=(0, None))(trained, XOR_X))[..., 0]
    assert np.median(live) <= 20, live
    assert min(live) >= 2  # XOR needs two ReLU units
    np.testing.assert_array_less(np.abs(predictions - np.asarray(XOR_Y)[:, 0]), 0.5)
    # The dead units really can go: the shrunk nets compute the same outputs.
    first = jax.tree.map(lambda x: x[0], trained)
    small, widths = autosize.shrink(first, ["Dense_0", "Dense_1"])
    assert widths["Dense_0"] == live[0]
    np.testing.assert_allclose(_xor_net(small, XOR_X), _xor_net(first, XOR_X), atol=1e-6)
