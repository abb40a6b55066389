"""Auto-sizing: live units, shrinking that keeps the network's function, and the seed's XOR."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

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


# ------------------------------------------------------------------- normalisation layers
class NormCNN(nn.Module):
    """Conv -> norm -> ReLU -> Conv -> norm -> ReLU -> flatten -> Dense, the norms per-channel
    (BatchNorm) or grouped (GroupNorm)."""

    widths: tuple[int, int] = (8, 6)
    kind: str = "group"
    train: bool = False

    def _norm(self, name):
        if self.kind == "group":
            return nn.GroupNorm(num_groups=None, group_size=2, name=name)
        return nn.BatchNorm(use_running_average=not self.train, name=name)

    @nn.compact
    def __call__(self, x):
        x = nn.relu(self._norm("Norm_0")(nn.Conv(self.widths[0], (3, 3), name="Conv_0")(x)))
        x = nn.relu(self._norm("Norm_1")(nn.Conv(self.widths[1], (3, 3), name="Conv_1")(x)))
        return nn.Dense(3, name="Dense_0")(x.reshape(x.shape[0], -1))


class NormMLP(nn.Module):
    """Dense -> LayerNorm/RMSNorm -> ReLU -> Dense -> ReLU -> Dense."""

    widths: tuple[int, int] = (6, 5)
    kind: str = "layer"

    @nn.compact
    def __call__(self, x):
        norm = nn.LayerNorm if self.kind == "layer" else nn.RMSNorm
        x = nn.relu(norm(name="Norm_0")(nn.Dense(self.widths[0], name="Dense_0")(x)))
        x = nn.relu(nn.Dense(self.widths[1], name="Dense_1")(x))
        return nn.Dense(3, name="Dense_2")(x)


def _randomise(tree, seed):
    """Random values of the same shapes; variances positive."""
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map_with_path(
        lambda path, x: jnp.asarray(
            np.abs(rng.normal(size=x.shape)) + 0.1
            if path[-1].key == "var"
            else rng.normal(size=x.shape),
            x.dtype,
        ),
        tree,
    )


def _set(tree, layer, leaf, units, value):
    node = dict(tree[layer])
    node[leaf] = jnp.asarray(node[leaf]).at[jnp.asarray(units)].set(value)
    return {**tree, layer: node}


def _group_chain(kind="group"):
    norm = lambda name: autosize.Norm(name, kind, group_size=2 if kind == "group" else None)
    return ["Conv_0", norm("Norm_0"), "Conv_1", norm("Norm_1"), "Dense_0"]


X_IMAGES = jnp.asarray(RNG.normal(size=(4, 5, 5, 2)), jnp.float32)


def test_shrink_through_group_norm_deletes_whole_groups_exactly():
    model = NormCNN()
    params = _randomise(model.init(jax.random.key(0), X_IMAGES)["params"], 1)
    params = kill(params, "Conv_0", [2, 3, 6, 7])  # groups 1 and 3 of Norm_0
    params = _set(params, "Norm_0", "bias", [2, 3, 6, 7], 0.0)  # a zero group leaves as bias
    params = kill(params, "Conv_1", [0, 1])  # group 0 of Norm_1, then flatten -> Dense
    params = _set(params, "Norm_1", "bias", [0, 1], 0.0)
    small, widths = autosize.shrink(params, _group_chain())
    assert widths == {"Conv_0": 4, "Norm_0": 4, "Conv_1": 4, "Norm_1": 4, "Dense_0": 3}
    np.testing.assert_array_equal(
        small["Norm_0"]["scale"], np.asarray(params["Norm_0"]["scale"])[[0, 1, 4, 5]]
    )
    rebuilt = NormCNN(widths=(widths["Conv_0"], widths["Conv_1"]))
    np.testing.assert_allclose(
        rebuilt.apply({"params": small}, X_IMAGES),
        model.apply({"params": params}, X_IMAGES),
        rtol=1e-5,
        atol=1e-5,
    )


def test_shrink_refuses_group_norm_groups_with_live_channels_or_a_bias():
    params = _randomise(NormCNN().init(jax.random.key(0), X_IMAGES)["params"], 1)
    half = kill(params, "Conv_0", [2])  # channel 3 of the same group lives
    with pytest.raises(ValueError, match=r"units \[2\] of 'Conv_0'.*'Norm_0'.*groups \[1\]"):
        autosize.shrink(half, _group_chain())
    whole = kill(params, "Conv_0", [2, 3])  # a whole group, but Norm_0's bias is not 0 there
    with pytest.raises(ValueError, match=r"GroupNorm 'Norm_0'.*its bias, which is not 0"):
        autosize.shrink(whole, _group_chain())


@pytest.mark.parametrize("train", [False, True], ids=["running-averages", "batch-statistics"])
def test_shrink_variables_through_batch_norm_is_exact(train):
    model = NormCNN(kind="batch")
    variables = _randomise(model.init(jax.random.key(0), X_IMAGES), 2)
    params = kill(variables["params"], "Conv_0", [1, 4, 5])
    params = _set(params, "Norm_0", "bias", [1, 4, 5], 0.0)
    params = _set(params, "Norm_0", "scale", [4], 0.0)  # scale * mean = 0 by the scale ...
    stats = _set(variables["batch_stats"], "Norm_0", "mean", [1, 5], 0.0)  # ... or the mean
    params = kill(params, "Conv_1", [3])
    params = _set(params, "Norm_1", "bias", [3], 0.0)
    stats = _set(stats, "Norm_1", "mean", [3], 0.0)
    variables = {"params": params, "batch_stats": stats}
    small, widths = autosize.shrink_variables(variables, _group_chain("batch"))
    assert widths == {"Conv_0": 5, "Norm_0": 5, "Conv_1": 5, "Norm_1": 5, "Dense_0": 3}
    kept = [0, 2, 3, 6, 7]
    np.testing.assert_array_equal(
        small["batch_stats"]["Norm_0"]["var"], np.asarray(stats["Norm_0"]["var"])[kept]
    )
    rebuilt = NormCNN(widths=(5, 5), kind="batch", train=train)
    original = NormCNN(kind="batch", train=train)
    mutable = ["batch_stats"] if train else False
    got = rebuilt.apply(small, X_IMAGES, mutable=mutable)
    expected = original.apply(variables, X_IMAGES, mutable=mutable)
    if train:  # the updated running averages of the kept channels agree as well
        (got, new_small), (expected, new_full) = got, expected
        np.testing.assert_allclose(
            new_small["batch_stats"]["Norm_0"]["mean"],
            new_full["batch_stats"]["Norm_0"]["mean"][jnp.asarray(kept)],
            rtol=1e-5,
            atol=1e-6,
        )
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


class NnxNormMLP(nnx.Module):
    """nnx Linear -> BatchNorm -> ReLU -> Linear: the running averages sit in the state."""

    def __init__(self, width, rngs):
        self.first = nnx.Linear(3, width, rngs=rngs)
        self.norm = nnx.BatchNorm(width, use_running_average=True, rngs=rngs)
        self.last = nnx.Linear(width, 2, rngs=rngs)

    def __call__(self, x):
        return self.last(nnx.relu(self.norm(self.first(x))))


def _load_pure(model, pure):
    state = nnx.state(model)
    nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, pure))
    nnx.update(model, state)


def test_shrink_through_nnx_batch_norm_state():
    model = NnxNormMLP(5, nnx.Rngs(0))
    pure = _randomise(nnx.to_pure_dict(nnx.state(model)), 4)
    pure = _set(kill(pure, "first", [0, 3]), "norm", "bias", [0, 3], 0.0)
    pure = _set(pure, "norm", "mean", [0, 3], 0.0)
    _load_pure(model, pure)
    chain = ["first", autosize.Norm("norm", "batch"), "last"]
    with pytest.raises(ValueError, match=r"no 'kernel' parameter.*autosize\.Norm"):
        autosize.shrink(pure, ["first", "norm", "last"])
    small, widths = autosize.shrink(pure, chain)
    assert widths == {"first": 3, "norm": 3, "last": 2}
    rebuilt = NnxNormMLP(3, nnx.Rngs(1))
    _load_pure(rebuilt, small)
    x = jnp.asarray(RNG.normal(size=(4, 3)), jnp.float32)
    np.testing.assert_allclose(rebuilt(x), model(x), rtol=1e-5, atol=1e-5)


def test_shrink_refuses_batch_norm_without_statistics_or_with_a_constant_output():
    variables = _randomise(NormCNN(kind="batch").init(jax.random.key(0), X_IMAGES), 2)
    params = kill(variables["params"], "Conv_0", [1])
    with pytest.raises(ValueError, match=r"BatchNorm 'Norm_0'.*shrink_variables"):
        autosize.shrink(params, _group_chain("batch"))
    params = _set(params, "Norm_0", "bias", [1], 0.0)  # but scale * mean != 0
    with pytest.raises(ValueError, match=r"units \[1\] of 'Conv_0'.*BatchNorm 'Norm_0'"):
        autosize.shrink_variables({**variables, "params": params}, _group_chain("batch"))


@pytest.mark.parametrize("kind", ["layer", "rms"])
def test_shrink_through_layer_and_rms_norm(kind):
    """A deleted zero would still count in the statistic over all units: refused. Dead units
    of the layers after the norm go, and the norm is passed through unchanged."""
    model = NormMLP(kind=kind)
    x = jnp.asarray(RNG.normal(size=(4, 3)), jnp.float32)
    params = _randomise(model.init(jax.random.key(0), x)["params"], 3)
    chain = ["Dense_0", autosize.Norm("Norm_0", kind), "Dense_1", "Dense_2"]
    statistic = "mean and variance" if kind == "layer" else "mean square"
    with pytest.raises(ValueError, match=rf"units \[2\] of 'Dense_0'.*'Norm_0'.*{statistic}"):
        autosize.shrink(kill(params, "Dense_0", [2]), chain)
    params = kill(params, "Dense_1", [0, 3])
    small, widths = autosize.shrink(params, chain)
    assert widths == {"Dense_0": 6, "Norm_0": 6, "Dense_1": 3, "Dense_2": 3}
    np.testing.assert_allclose(
        NormMLP(widths=(6, 3), kind=kind).apply({"params": small}, x),
        model.apply({"params": params}, x),
        rtol=1e-5,
        atol=1e-5,
    )


def test_shrink_refuses_a_layer_with_no_live_unit():
    params = {
        "Dense_0": {"kernel": jnp.ones((2, 3)), "bias": jnp.ones(3)},
        "Dense_1": {"kernel": jnp.ones((3, 2)), "bias": jnp.ones(2)},
    }
    with pytest.raises(ValueError, match=r"every unit of 'Dense_0' is dead.*width 0"):
        autosize.shrink(kill(params, "Dense_0", [0, 1, 2]), ["Dense_0", "Dense_1"])


def test_norm_and_chain_bad_input():
    with pytest.raises(ValueError, match="kind must be one of"):
        autosize.Norm("Norm_0", "instance")
    with pytest.raises(ValueError, match="exactly one of num_groups and group_size"):
        autosize.Norm("Norm_0", "group")
    with pytest.raises(ValueError, match="only apply to kind 'group'"):
        autosize.Norm("Norm_0", "layer", num_groups=2)
    with pytest.raises(ValueError, match="num_groups must be an int >= 1"):
        autosize.Norm("Norm_0", "group", num_groups=0)
    params = _randomise(NormCNN().init(jax.random.key(0), X_IMAGES)["params"], 1)
    with pytest.raises(ValueError, match="starting and ending with a layer"):
        autosize.shrink(params, [autosize.Norm("Norm_0", "layer"), "Conv_0", "Conv_1"])
    with pytest.raises(TypeError, match="chain entries"):
        autosize.shrink(params, ["Conv_0", 3, "Conv_1"])
    with pytest.raises(ValueError, match="do not split into 3 groups"):
        autosize.shrink(
            kill(params, "Conv_0", [0]),
            ["Conv_0", autosize.Norm("Norm_0", "group", num_groups=3), "Conv_1"],
        )
    with pytest.raises(ValueError, match=r"'Norm_1'.*\(6,\).*'Conv_0' with 8 output units"):
        autosize.shrink(params, ["Conv_0", autosize.Norm("Norm_1", "layer"), "Conv_1"])
    with pytest.raises(ValueError, match="has entries \\['kernel'\\]"):
        autosize.shrink(params, ["Conv_0", autosize.Norm("Conv_1", "layer"), "Dense_0"])
    variables = {"params": params, "cache": {"Conv_0": {"x": jnp.ones(8)}}}
    with pytest.raises(ValueError, match=r"variables\['cache'\] has entries for \['Conv_0'\]"):
        autosize.shrink_variables(variables, _group_chain())


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
