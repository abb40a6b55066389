"""Auto-sizing: find the neurons of a Flax parameter tree, count the live ones, delete the dead.

A *layer* is a ``kernel`` leaf with (optionally) a sibling ``bias`` leaf, as Flax's ``Dense``
and ``Conv`` store them in linen dicts and nnx ``State`` alike. Its output units are the last
axis of the kernel: unit :math:`j` is the group ``kernel[..., j]`` plus ``bias[j]``. A unit whose
group is exactly zero outputs :math:`\\sigma(0)`, which is 0 for ReLU and tanh: it can be
deleted together with the matching input slice of the next layer without changing the
network's function. :func:`jaxopt_suite.group_sparsity` drives whole groups to exact zeros;
:func:`shrink` then returns the smaller parameters and widths to rebuild the model with.

Example::

    >>> import jax, jax.numpy as jnp
    >>> from jaxopt_suite import autosize, zoo
    >>> params = zoo.init_params(zoo.make_model("mlp-small"), jax.random.key(0))
    >>> autosize.live_units(params)
    {'Dense_0': 128, 'Dense_1': 10}
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxopt_suite._typing import PyTree

_WRAPPER_ATTRIBUTES = ("value", "raw_value")  # nnx Variable -> array


class Layer(NamedTuple):
    """Where a layer's leaves sit in ``jax.tree_util.tree_flatten(params)``.

    Attributes:
      name: the path of the layer's parameter dict, keys joined by ``/`` (``"Dense_0"``).
      kernel: index of the kernel leaf; its last axis holds the output units.
      bias: index of the bias leaf, or None for a layer without bias.
    """

    name: str
    kernel: int
    bias: int | None


def _key_name(key: Any) -> str:
    for attribute in ("key", "name", "idx"):
        if hasattr(key, attribute):
            return str(getattr(key, attribute))
    return str(key)


def _role(path: tuple) -> tuple[str, str] | None:
    """``(layer name, "kernel" | "bias")`` for a kernel/bias leaf path, else None."""
    names = [_key_name(k) for k in path]
    end = len(names)
    # nnx stores arrays inside Variables: the path ends in .value after the parameter name.
    while end > 0 and isinstance(path[end - 1], jax.tree_util.GetAttrKey):
        if names[end - 1] not in _WRAPPER_ATTRIBUTES:
            return None
        end -= 1
    if end == 0 or names[end - 1] not in ("kernel", "bias"):
        return None
    return "/".join(names[: end - 1]), names[end - 1]


def find_layers(params: PyTree) -> list[Layer]:
    """Finds every ``kernel`` leaf and its sibling ``bias`` in a parameter tree.

    Args:
      params: linen params (nested dicts), an nnx ``State``, or any pytree whose leaf paths end
        in ``kernel`` / ``bias``. A ``bias`` without a ``kernel`` sibling (LayerNorm) is not a
        layer.

    Returns:
      The layers in flattening order.

    Raises:
      ValueError: naming the parameter path, when a kernel has fewer than 2 axes or its bias
        is not a vector with one entry per output unit (``kernel.shape[-1]``).
    """
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    found: dict[str, dict[str, int]] = {}
    for index, (path, _) in enumerate(leaves):
        role = _role(path)
        if role is not None:
            found.setdefault(role[0], {})[role[1]] = index
    layers = []
    for name, roles in found.items():
        if "kernel" not in roles:
            continue
        kernel = leaves[roles["kernel"]][1]
        if jnp.ndim(kernel) < 2:
            raise ValueError(
                f"parameter {name}/kernel has shape {jnp.shape(kernel)}: a layer kernel needs "
                "at least 2 axes (..., inputs, outputs)"
            )
        bias = roles.get("bias")
        if bias is not None and jnp.shape(leaves[bias][1]) != (jnp.shape(kernel)[-1],):
            raise ValueError(
                f"parameter {name}/bias has shape {jnp.shape(leaves[bias][1])} but "
                f"{name}/kernel has {jnp.shape(kernel)[-1]} output units (shape "
                f"{jnp.shape(kernel)}); the bias must have shape ({jnp.shape(kernel)[-1]},)"
            )
        layers.append(Layer(name, roles["kernel"], bias))
    return layers


def unit_is_live(kernel: jax.Array, bias: jax.Array | None = None) -> jax.Array:
    """Boolean ``(units,)``: does output unit ``j`` have any non-zero weight or bias?"""
    live = jnp.any(kernel.reshape(-1, kernel.shape[-1]) != 0, axis=0)
    return live if bias is None else live | (bias != 0)


def live_masks(params: PyTree) -> dict[str, jax.Array]:
    """For each layer, a boolean ``(units,)`` array: which output units are live (jittable)."""
    leaves = jax.tree_util.tree_leaves(params)
    return {
        layer.name: unit_is_live(
            leaves[layer.kernel], None if layer.bias is None else leaves[layer.bias]
        )
        for layer in find_layers(params)
    }


def live_units(params: PyTree) -> dict[str, int]:
    """How many output units of each layer have a non-zero group (kernel slice or bias).

    Args:
      params: a Flax parameter tree (see :func:`find_layers`).

    Returns:
      ``{layer name: number of live units}`` as Python ints, in flattening order.
    """
    return {name: int(mask.sum()) for name, mask in live_masks(params).items()}


def total_units(params: PyTree) -> dict[str, int]:
    """The number of output units of each layer (``kernel.shape[-1]``)."""
    leaves = jax.tree_util.tree_leaves(params)
    return {layer.name: int(jnp.shape(leaves[layer.kernel])[-1]) for layer in find_layers(params)}


def _lookup(tree: Mapping, name: str) -> Mapping:
    node = tree
    for part in name.split("/") if name else []:
        if not isinstance(node, Mapping):
            raise ValueError(f"layer {name!r}: {part!r} is not inside a mapping")
        matches = [k for k in node if str(k) == part]
        if not matches:
            raise ValueError(f"layer {name!r} not found: no key {part!r} (keys: {list(node)})")
        node = node[matches[0]]
    if not isinstance(node, Mapping) or "kernel" not in node:
        raise ValueError(f"layer {name!r} has no 'kernel' parameter")
    return node


def _replace(tree: Any, parts: list[str], value: Mapping) -> Any:
    if not parts:
        return value
    out = dict(tree)
    key = next(k for k in tree if str(k) == parts[0])
    out[key] = _replace(tree[key], parts[1:], value)
    return out


def _slice_inputs(
    kernel: np.ndarray, keep: np.ndarray, name: str, previous: str, conv_before: bool
) -> np.ndarray:
    """Keeps the inputs of ``kernel`` (axis -2) that come from the live units ``keep``."""
    units, inputs = keep.shape[0], kernel.shape[-2]
    if inputs == units:
        return np.compress(keep, kernel, axis=-2)
    if conv_before and kernel.ndim == 2 and inputs % units == 0:
        # Conv -> flatten -> Dense: NHWC flattening puts channel c at positions p*units + c.
        blocks = kernel.reshape(inputs // units, units, kernel.shape[-1])
        return np.compress(keep, blocks, axis=1).reshape(-1, kernel.shape[-1])
    raise ValueError(
        f"shrink cannot follow {previous!r} -> {name!r}: {previous} has {units} output units "
        f"but {name}/kernel has {inputs} inputs (shape {kernel.shape}); supported are "
        "Dense -> Dense, Conv -> Conv and Conv -> flatten -> Dense"
    )


def shrink(params: Mapping, chain: Sequence[str]) -> tuple[dict, dict[str, int]]:
    """Deletes the dead units of a chain of layers, keeping the network's function.

    For each layer of ``chain`` but the last (whose outputs are the model's), the output units
    whose group (kernel slice and bias) is exactly zero are removed from its kernel and bias,
    and the matching inputs from the next layer's kernel: rows of a Dense kernel, the input
    channels of a Conv kernel, or, for Conv -> flatten -> Dense, every flattened position of
    that channel. Layers are processed in order, so a unit left without live inputs and with a
    zero bias is removed too. The outputs are unchanged when the activation maps 0 to 0
    (ReLU, tanh; pooling in between is fine).

    Args:
      params: linen parameters (nested mappings of arrays; for nnx use
        ``nnx.to_pure_dict(state)``).
      chain: layer names in data-flow order, as :func:`find_layers` names them
        (``["Dense_0", "Dense_1", "Dense_2"]``).

    Returns:
      ``(new_params, widths)``: a copy of ``params`` (plain dicts, numpy arrays for the changed
      layers) and ``{layer name: number of output units}`` to rebuild the model with.

    Raises:
      ValueError: naming the layer, for an unknown layer, a chain shorter than 2 layers, or a
        layout it cannot follow (input width that does not match the previous layer's units).

    Example::

        >>> small, widths = shrink(params, ["Dense_0", "Dense_1", "Dense_2"])
        >>> model = zoo.MLP(hidden=(widths["Dense_0"], widths["Dense_1"]))
    """
    chain = list(chain)
    if len(chain) < 2:
        raise ValueError(f"chain must name at least 2 layers in data-flow order, got {chain}")
    layers = {}
    for name in chain:
        node = _lookup(params, name)
        layers[name] = {k: np.asarray(v) for k, v in node.items()}
        kernel = layers[name]["kernel"]
        if kernel.ndim < 2:
            raise ValueError(f"parameter {name}/kernel has shape {kernel.shape}, need >= 2 axes")
        bias = layers[name].get("bias")
        if bias is not None and bias.shape != (kernel.shape[-1],):
            raise ValueError(
                f"parameter {name}/bias has shape {bias.shape}, expected ({kernel.shape[-1]},)"
            )
    widths = {}
    for previous, name in itertools.pairwise(chain):
        layer = layers[previous]
        keep = np.asarray(unit_is_live(layer["kernel"], layer.get("bias")))
        layers[name]["kernel"] = _slice_inputs(
            layers[name]["kernel"], keep, name, previous, layer["kernel"].ndim > 2
        )
        layer["kernel"] = np.compress(keep, layer["kernel"], axis=-1)
        if "bias" in layer:
            layer["bias"] = layer["bias"][keep]
        widths[previous] = int(keep.sum())
    widths[chain[-1]] = int(layers[chain[-1]]["kernel"].shape[-1])
    out = dict(params)
    for name, layer in layers.items():
        node = dict(_lookup(params, name))
        node.update(layer)
        out = _replace(out, name.split("/") if name else [], node)
    return out, widths
