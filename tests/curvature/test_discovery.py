"""Which layer calls the structured path may use: models where a rule would silently give
wrong per-sample quantities (weight tying, a leading axis of size N that is not the batch axis,
layers inside a transformation of the model) must fall back to the generic path, and the
values must equal brute force (``tests.test_curvature.check_all``)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx

from jaxopt_suite import curvature
from tests.curvature.helpers import check_all

N = 3


def _kinds(apply_fn, params, x):
    return curvature.coverage(apply_fn, params, x)


def test_tied_dense_kernel_read_outside_its_call_is_generic():
    class Tied(nn.Module):  # a decoder that reuses the encoder's kernel, transposed
        @nn.compact
        def __call__(self, x):
            enc = nn.Dense(4)
            return jnp.tanh(enc(x)) @ enc.variables["params"]["kernel"].T + nn.Dense(3)(x)

    model = Tied()
    x = jax.random.normal(jax.random.key(0), (N, 3))
    params = model.init(jax.random.key(1), x)["params"]
    apply_fn = lambda p, x: model.apply({"params": p}, x)
    kinds = _kinds(apply_fn, params, x)
    assert kinds["Dense_0"] == {"kernel": "generic", "bias": "generic"}  # the whole call
    assert kinds["Dense_1"] == {"kernel": "dense", "bias": "dense"}
    check_all(apply_fn, params, x, jax.random.normal(jax.random.key(2), (N, 3)), "mse")


def test_tied_nnx_kernel_and_embedding_product_are_generic():
    class LM(nnx.Module):  # output logits from the embedding table (no ``attend``)
        def __init__(self, rngs):
            self.embed = nnx.Embed(7, 4, rngs=rngs)
            self.hidden = nnx.Linear(4, 4, rngs=rngs)
            self.out = nnx.Linear(4, 4, rngs=rngs)

        def __call__(self, tokens):
            h = jnp.tanh(self.hidden(self.embed(tokens)))
            tied = h @ self.hidden.kernel[...].T  # the hidden kernel read a second way
            return self.out(tied) @ self.embed.embedding[...].T

    graph, params = nnx.split(LM(nnx.Rngs(0)), nnx.Param)
    apply_fn = lambda p, x: nnx.merge(graph, p)(x)
    tokens = jax.random.randint(jax.random.key(1), (N, 2), 0, 7)
    kinds = _kinds(apply_fn, params, tokens)
    assert kinds["embed"]["embedding"] == "generic"
    assert kinds["hidden"] == {"kernel": "generic", "bias": "generic"}
    assert kinds["out"] == {"kernel": "dense", "bias": "dense"}
    labels = jax.random.randint(jax.random.key(2), (N, 2), 0, 7)
    check_all(apply_fn, params, tokens, labels, "cross_entropy")


def test_time_major_axis_of_size_n_is_not_the_batch_axis():
    class TimeMajor(nn.Module):  # a Dense on (T, N, D) with T == N, summed over time
        @nn.compact
        def __call__(self, x):
            return nn.Dense(2)(jnp.swapaxes(x, 0, 1)).sum(0) + nn.Dense(2)(x[:, 0])

    model = TimeMajor()
    x = jax.random.normal(jax.random.key(0), (N, N, 4))
    params = model.init(jax.random.key(1), x)["params"]
    apply_fn = lambda p, x: model.apply({"params": p}, x)
    kinds = _kinds(apply_fn, params, x)
    assert set(jax.tree.leaves(kinds["Dense_0"])) == {"generic"}
    assert set(jax.tree.leaves(kinds["Dense_1"])) == {"dense"}
    check_all(apply_fn, params, x, jax.random.normal(jax.random.key(2), (N, 2)), "mse")


def test_layer_on_a_constant_with_n_rows_is_generic():
    class Positional(nn.Module):  # a learned map of a fixed grid of T == N positions
        @nn.compact
        def __call__(self, x):
            grid = jnp.linspace(0.0, 1.0, x.shape[1])[:, None]
            return nn.Dense(3)((x + nn.Dense(x.shape[-1])(grid)).reshape(x.shape[0], -1))

    model = Positional()
    x = jax.random.normal(jax.random.key(0), (N, N, 2))
    params = model.init(jax.random.key(1), x)["params"]
    apply_fn = lambda p, x: model.apply({"params": p}, x)
    kinds = _kinds(apply_fn, params, x)  # Dense_0 is the outer layer, created first
    assert set(jax.tree.leaves(kinds["Dense_1"])) == {"generic"}
    assert set(jax.tree.leaves(kinds["Dense_0"])) == {"dense"}
    check_all(apply_fn, params, x, jnp.array([0, 2, 1]), "cross_entropy")


def test_vmapped_per_sample_model_with_n_positions():
    model = nn.Dense(2)
    x = jax.random.normal(jax.random.key(0), (N, N, 4))
    params = model.init(jax.random.key(1), x[0])["params"]
    apply_fn = lambda p, x: jax.vmap(lambda xi: model.apply({"params": p}, xi).sum(0))(x)
    check_all(apply_fn, params, x, jax.random.normal(jax.random.key(2), (N, 2)), "mse")


def test_forward_mode_inside_the_model_through_a_conv():
    class Conv(nn.Module):
        @nn.compact
        def __call__(self, x):
            h = nn.relu(nn.Conv(2, (3, 3))(x))
            return nn.Dense(3)(h.reshape(x.shape[0], -1))

    model = Conv()
    x = jax.random.normal(jax.random.key(0), (2, 5, 5, 1))
    params = model.init(jax.random.key(1), x)["params"]

    def apply_fn(p, x):  # the output plus a directional derivative along the inputs
        out, tangent = jax.jvp(lambda x: model.apply({"params": p}, x), (x,), (jnp.ones_like(x),))
        return out + 0.1 * tangent

    check_all(apply_fn, params, x, jnp.array([0, 2]), "cross_entropy", generic=True)
