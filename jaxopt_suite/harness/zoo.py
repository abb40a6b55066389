"""The seeds' networks in flax linen, for examples, benchmarks and ``compare``.

Every model takes images ``(N, H, W, C)`` (an MLP flattens them) and returns logits ``(N, C)``.
Layers carry fixed names (``Dense_0``, ``Conv_0``, ...) and the layer classes are attributes,
so a ProxProp model (``dense=ProxPropDense``) has exactly the parameter tree of the plain one.

Example::

    >>> import jax, jax.numpy as jnp
    >>> from jaxopt_suite.harness import zoo
    >>> model = zoo.make_model("mlp-small")
    >>> params = zoo.init_params(model, jax.random.key(0))
    >>> jax.tree.map(jnp.shape, params)["Dense_0"]
    {'bias': (128,), 'kernel': (784, 128)}
    >>> model.apply({"params": params}, jnp.zeros((2, 28, 28, 1))).shape
    (2, 10)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Activation = Callable[[jax.Array], jax.Array]


class MLP(nn.Module):
    """Fully connected network: ``Dense(h) - act`` for each hidden width, then ``Dense(classes)``.

    ``dense`` builds the hidden layers and ``last`` the output layer (ProxProp keeps it plain).
    """

    hidden: Sequence[int] = (1024, 1024)
    num_classes: int = 10
    activation: Activation = nn.relu
    dense: Any = nn.Dense
    last: Any = nn.Dense

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.reshape(x.shape[0], -1)
        for i, width in enumerate(self.hidden):
            x = self.activation(self.dense(width, name=f"Dense_{i}")(x))
        return self.last(self.num_classes, name=f"Dense_{len(self.hidden)}")(x)


def _max_pool(x: jax.Array) -> jax.Array:
    return nn.max_pool(x, (2, 2), strides=(2, 2))


class BackpackCNN(nn.Module):
    """BackPACK's MNIST example: Conv 20 5x5 - pool - Conv 50 5x5 - pool - Dense 500 - Dense 10.

    Valid convolutions, ReLU, 2x2 max-pooling: 28 -> 24 -> 12 -> 8 -> 4, so the flattened
    feature vector has 4 * 4 * 50 = 800 entries.
    """

    num_classes: int = 10
    activation: Activation = nn.relu
    dense: Any = nn.Dense
    conv: Any = nn.Conv
    last: Any = nn.Dense

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = _max_pool(self.activation(self.conv(20, (5, 5), padding="VALID", name="Conv_0")(x)))
        x = _max_pool(self.activation(self.conv(50, (5, 5), padding="VALID", name="Conv_1")(x)))
        x = x.reshape(x.shape[0], -1)
        x = self.activation(self.dense(500, name="Dense_0")(x))
        return self.last(self.num_classes, name="Dense_1")(x)


class FwdGradCNN(nn.Module):
    """The forward-gradient seed's CNN: 4 x Conv 3x3 64 (pool after the 2nd, 4th), 3136-1024-10."""

    channels: int = 64
    hidden: int = 1024
    num_classes: int = 10
    activation: Activation = nn.relu
    dense: Any = nn.Dense
    conv: Any = nn.Conv
    last: Any = nn.Dense

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for i in range(4):
            x = self.activation(self.conv(self.channels, (3, 3), padding=1, name=f"Conv_{i}")(x))
            if i % 2 == 1:
                x = _max_pool(x)
        x = x.reshape(x.shape[0], -1)
        x = self.activation(self.dense(self.hidden, name="Dense_0")(x))
        return self.last(self.num_classes, name="Dense_1")(x)


class ProxPropConvNet(nn.Module):
    """ProxProp's ConvNet: three Conv 5x5 layers (16, 20, 20 channels) with ReLU, 2x2 pooling
    after the first two, then a Dense layer to the classes (the paper's CIFAR net, here on
    28x28 inputs: 28 -> 14 -> 7, so 7 * 7 * 20 = 980 features)."""

    channels: Sequence[int] = (16, 20, 20)
    num_classes: int = 10
    activation: Activation = nn.relu
    conv: Any = nn.Conv
    last: Any = nn.Dense

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for i, c in enumerate(self.channels):
            x = self.activation(self.conv(c, (5, 5), padding=2, name=f"Conv_{i}")(x))
            if i < len(self.channels) - 1:
                x = _max_pool(x)
        x = x.reshape(x.shape[0], -1)
        return self.last(self.num_classes, name="Dense_0")(x)


# name -> (constructor, one-line description). Constructors take the layer-class overrides.
MODELS: dict[str, tuple[Callable[..., nn.Module], str]] = {
    "mlp": (lambda **kw: MLP(hidden=(1024, 1024), **kw), "MLP 784-1024-1024-10 (fwdgrad seed)"),
    "mlp-small": (lambda **kw: MLP(hidden=(128,), **kw), "MLP 784-128-10 (fast smoke runs)"),
    "proxprop-mlp": (
        lambda **kw: MLP(hidden=(1000, 1000), **kw),
        "MLP 784-1000-1000-10 (ProxProp benchmark, MNIST scale)",
    ),
    "backpack-cnn": (BackpackCNN, "Conv20-pool-Conv50-pool-500-10 (BackPACK example)"),
    "fwdgrad-cnn": (FwdGradCNN, "4 x Conv64 3x3 + 2 pools, 3136-1024-10 (fwdgrad seed)"),
    "proxprop-convnet": (ProxPropConvNet, "3 x Conv 5x5 (16, 20, 20), 2 pools, Dense 10"),
}


LAYER_OVERRIDES = ("dense", "conv", "last")


def make_model(name: str, **layers: Any) -> nn.Module:
    """Builds a zoo model by name (see :data:`MODELS`).

    Args:
      name: a key of :data:`MODELS`.
      **layers: layer classes to substitute, among ``dense`` (hidden Dense layers), ``conv``
        and ``last`` (the output layer). A model without such a layer ignores the override,
        so one method can say "ProxProp for every hidden linear layer" for any model.

    Raises:
      ValueError: an unknown ``name`` or override, naming the valid ones.

    Example: the ProxProp version of a model has the plain model's parameter tree::

        >>> import jax
        >>> from jaxopt_suite.harness import zoo
        >>> from jaxopt_suite.proxprop import ProxPropDense
        >>> plain = zoo.make_model("mlp-small")
        >>> proxprop = zoo.make_model("mlp-small", dense=ProxPropDense)
        >>> tree = lambda m: jax.tree.structure(zoo.init_params(m, jax.random.key(0)))
        >>> tree(proxprop) == tree(plain)
        True
    """
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; valid names: {', '.join(MODELS)}")
    unknown = set(layers) - set(LAYER_OVERRIDES)
    if unknown:
        raise ValueError(f"unknown layer overrides {sorted(unknown)}; valid: {LAYER_OVERRIDES}")
    model = MODELS[name][0]()
    fields = {k: v for k, v in layers.items() if hasattr(model, k)}
    return model.clone(**fields) if fields else model


def init_params(model: nn.Module, key: jax.Array, image_shape=(28, 28, 1)) -> Any:
    """Initialises a model's parameters for inputs of ``image_shape`` (batch of one)."""
    return model.init(key, jnp.zeros((1, *image_shape), jnp.float32))["params"]
