"""The jaxpr analyses the engine runs before computing per-sample quantities: where samples
interact (``inspection.mixing_layers``) and whether the model draws random numbers
(``inspection.is_random``). Shapes only: every case is one ``jax.make_jaxpr``."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from jaxopt_suite.curvature import inspection

IMAGES = jax.ShapeDtypeStruct((4, 6, 6, 2), jnp.float32)
SEQUENCE = jax.ShapeDtypeStruct((4, 5, 3), jnp.float32)
TOKENS = jax.ShapeDtypeStruct((4, 5), jnp.int32)
FEATURES = jax.ShapeDtypeStruct((4, 3), jnp.float32)


class CausalAttention(nn.Module):
    @nn.compact
    def __call__(self, x):
        mask = nn.make_causal_mask(jnp.ones(x.shape[:2]))
        return nn.MultiHeadDotProductAttention(num_heads=1, qkv_features=4)(x, mask=mask)


class BatchNormCNN(nn.Module):
    train: bool

    @nn.compact
    def __call__(self, x):
        h = nn.BatchNorm(use_running_average=not self.train)(nn.Conv(3, (3, 3))(x))
        return nn.Dense(2)(nn.avg_pool(h, (2, 2)).reshape(x.shape[0], -1))


class LSTM(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.RNN(nn.LSTMCell(4))(x)


class TiedEmbedding(nn.Module):
    @nn.compact
    def __call__(self, tokens):
        embed = nn.Embed(7, 4)
        return embed.attend(nn.LayerNorm()(embed(tokens)))


class VmapInside(nn.Module):
    @nn.compact
    def __call__(self, x):
        w = self.param("w", nn.initializers.ones, (3, 2))
        return jax.vmap(lambda row: jnp.tanh(row @ w))(x)


class FlattenedPositions(nn.Module):
    """The batch merged with the positions: not followed, so never reported."""

    @nn.compact
    def __call__(self, x):
        n, t, d = x.shape
        return nn.Dense(4)(x.reshape(n * t, d)).reshape(n, t, 4)


class GroupNormCNN(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(2)(nn.GroupNorm(2)(nn.Conv(4, (3, 3))(x)).mean((1, 2)))


class Dropout(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(2)(nn.Dropout(0.3, deterministic=False)(nn.Dense(4)(x)))


class CumulativeOverBatch(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(2)(jnp.cumsum(x, axis=0))


class SoftmaxOverBatch(nn.Module):
    @nn.compact
    def __call__(self, x):
        return jax.nn.softmax(nn.Dense(2)(x), axis=0)


class BatchStatisticsForAuxOnly(nn.Module):
    """A batch mean that only reaches a returned side output, not the model's outputs."""

    @nn.compact
    def __call__(self, x):
        self.sow("intermediates", "batch_mean", jnp.mean(x, axis=0))
        return nn.Dense(2)(x)


def analyse(model, x):
    """(mixing layers, random) of ``model`` on inputs shaped like ``x``."""
    rngs = {"params": jax.random.key(0), "dropout": jax.random.key(1)}
    variables = jax.eval_shape(model.init, rngs, x)
    state = {
        k: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), v)
        for k, v in variables.items()
        if k != "params"
    }
    leaves, treedef = jax.tree.flatten(variables["params"])

    def apply(leaves, x):
        variables = {"params": jax.tree.unflatten(treedef, leaves), **state}
        mutable = [*state, "intermediates"]
        out, _ = model.apply(variables, x, rngs={"dropout": rngs["dropout"]}, mutable=mutable)
        return out

    closed = jax.make_jaxpr(apply)(leaves, x)
    return inspection.mixing_layers(closed.jaxpr, len(leaves), 1), inspection.is_random(
        closed.jaxpr
    )


@pytest.mark.parametrize(
    ("model", "x", "mixing", "random"),
    [
        (CausalAttention(), SEQUENCE, [], False),
        (BatchNormCNN(train=True), IMAGES, ["BatchNormCNN/BatchNorm_0"], False),
        (BatchNormCNN(train=False), IMAGES, [], False),
        (LSTM(), SEQUENCE, [], False),
        (TiedEmbedding(), TOKENS, [], False),
        (VmapInside(), FEATURES, [], False),
        (FlattenedPositions(), SEQUENCE, [], False),
        (GroupNormCNN(), IMAGES, [], False),
        (Dropout(), FEATURES, [], True),
        (CumulativeOverBatch(), FEATURES, ["CumulativeOverBatch"], False),
        (SoftmaxOverBatch(), FEATURES, ["SoftmaxOverBatch"], False),
        (BatchStatisticsForAuxOnly(), FEATURES, [], False),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, nn.Module) else None,
)
def test_flax_models(model, x, mixing, random):
    assert analyse(model, x) == (mixing, random)


def test_plain_functions_name_the_source_line():
    def mixed(p, x):
        return (x @ x.T) @ x * p  # every sample's output reads every other sample

    closed = jax.make_jaxpr(mixed)(1.0, FEATURES)
    (site,) = inspection.mixing_layers(closed.jaxpr, 1, 1)
    assert site.startswith("dot_general at ") and "test_inspection.py:" in site, site
    closed = jax.make_jaxpr(lambda p, x: jnp.sin(x * p))(1.0, FEATURES)
    assert inspection.mixing_layers(closed.jaxpr, 1, 1) == []


def test_closed_over_key_is_random():
    key = jax.random.key(0)
    noisy = lambda p, x: x * p + jax.random.normal(key, x.shape)
    assert inspection.is_random(jax.make_jaxpr(noisy)(1.0, FEATURES).jaxpr)
    assert not inspection.is_random(jax.make_jaxpr(lambda p, x: x * p)(1.0, FEATURES).jaxpr)
