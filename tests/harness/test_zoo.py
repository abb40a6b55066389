import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxopt_suite import zoo

# Parameter counts worked out by hand from each architecture.
EXPECTED = {
    "mlp": (784 * 1024 + 1024) + (1024 * 1024 + 1024) + (1024 * 10 + 10),
    "mlp-small": (784 * 128 + 128) + (128 * 10 + 10),
    "proxprop-mlp": (784 * 1000 + 1000) + (1000 * 1000 + 1000) + (1000 * 10 + 10),
    "backpack-cnn": (25 * 20 + 20) + (25 * 20 * 50 + 50) + (800 * 500 + 500) + (500 * 10 + 10),
    "fwdgrad-cnn": (9 * 64 + 64) + 3 * (9 * 64 * 64 + 64) + (3136 * 1024 + 1024) + (1024 * 10 + 10),
    "proxprop-convnet": (25 * 16 + 16)
    + (25 * 16 * 20 + 20)
    + (25 * 20 * 20 + 20)
    + (7 * 7 * 20 * 10 + 10),
}


@pytest.mark.parametrize("name", sorted(zoo.MODELS))
def test_models_shapes_and_sizes(name):
    model = zoo.make_model(name)
    params = jax.eval_shape(lambda k: zoo.init_params(model, k), jax.random.key(0))
    size = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    assert size == EXPECTED[name]
    out = jax.eval_shape(
        lambda p, x: model.apply({"params": p}, x),
        params,
        jax.ShapeDtypeStruct((3, 28, 28, 1), jnp.float32),
    )
    assert out.shape == (3, 10)


def test_layer_overrides_keep_parameter_names():
    class Doubled(nn.Dense):
        def __call__(self, x):
            return 2 * super().__call__(x)

    plain = zoo.make_model("mlp-small")
    doubled = zoo.make_model("mlp-small", dense=Doubled, conv=nn.Conv)  # conv: not in an MLP
    params = zoo.init_params(plain, jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (2, 28, 28, 1))
    hidden = lambda p: jax.nn.relu(x.reshape(2, -1) @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"])
    ref = 2 * hidden(params) @ params["Dense_1"]["kernel"] + params["Dense_1"]["bias"]
    out = doubled.apply({"params": params}, x)
    assert jnp.allclose(out, ref, atol=1e-5)
    with pytest.raises(ValueError, match="unknown layer overrides"):
        zoo.make_model("mlp", norm=nn.LayerNorm)
    with pytest.raises(ValueError, match="valid names"):
        zoo.make_model("resnet")
