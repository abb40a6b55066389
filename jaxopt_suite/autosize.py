"""Auto-sizing: find the neurons of a Flax parameter tree, count the live ones, delete the dead.

A *layer* is a ``kernel`` leaf with (optionally) a sibling ``bias`` leaf, as Flax's ``Dense``
and ``Conv`` store them in linen dicts and nnx ``State`` alike. Its output units are the last
axis of the kernel: unit :math:`j` is the group ``kernel[..., j]`` plus ``bias[j]``. A unit whose
group is exactly zero outputs :math:`\\sigma(0)`, which is 0 for ReLU and tanh: it can be
deleted together with the matching input slice of the next layer without changing the
network's function. :func:`jaxopt_suite.group_sparsity` drives whole groups to exact zeros;
:func:`shrink` then returns the smaller parameters and widths to rebuild the model with,
following the deletions through normalisation layers (:class:`Norm`) where that is exact and
refusing, with the reason, where it is not.

Example::

    >>> import jax, jax.numpy as jnp
    >>> from jaxopt_suite import autosize, zoo
    >>> params = zoo.init_params(zoo.make_model("mlp-small"), jax.random.key(0))
    >>> autosize.live_units(params)
    {'Dense_0': 128, 'Dense_1': 10}
"""

from __future__ import annotations

import dataclasses
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
        raise ValueError(
            f"layer {name!r} has no 'kernel' parameter (a normalisation layer goes into the "
            "chain as autosize.Norm(name, kind))"
        )
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


NORM_KINDS = ("batch", "group", "layer", "rms")

_NORM_LEAVES = {
    "batch": ("scale", "bias", "mean", "var"),
    "group": ("scale", "bias"),
    "layer": ("scale", "bias"),
    "rms": ("scale",),
}
_NORM_TITLES = {"batch": "BatchNorm", "group": "GroupNorm", "layer": "LayerNorm", "rms": "RMSNorm"}


@dataclasses.dataclass(frozen=True)
class Norm:
    """A normalisation layer over the units of the chain layer before it, for :func:`shrink`.

    Attributes:
      name: the path of its parameters (``"GroupNorm_0"``), as for chain layers.
      kind: ``"batch"`` (``nn.BatchNorm``: per-channel statistics and running averages),
        ``"group"`` (``nn.GroupNorm``: statistics over each group of consecutive channels),
        ``"layer"`` (``nn.LayerNorm`` over the features) or ``"rms"`` (``nn.RMSNorm``).
      num_groups: for ``"group"``: the number of groups (as ``nn.GroupNorm``); give this or
        ``group_size``.
      group_size: for ``"group"``: the channels per group (as ``nn.GroupNorm(num_groups=None,
        group_size=...)``).

    Raises:
      ValueError: an unknown ``kind`` (naming the accepted ones), or group arguments that are
        missing, not positive ints, or given for another kind.
    """

    name: str
    kind: str
    num_groups: int | None = None
    group_size: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str):
            raise TypeError(f"Norm name must be a string (a parameter path), got {self.name!r}")
        if self.kind not in NORM_KINDS:
            raise ValueError(f"Norm kind must be one of {NORM_KINDS}, got {self.kind!r}")
        given = {
            k: v
            for k, v in (("num_groups", self.num_groups), ("group_size", self.group_size))
            if v is not None
        }
        if self.kind != "group":
            if given:
                raise ValueError(f"Norm {self.name!r}: {sorted(given)} only apply to kind 'group'")
            return
        if len(given) != 1:
            raise ValueError(
                f"Norm {self.name!r} of kind 'group' needs exactly one of num_groups and "
                f"group_size, got {given or 'neither'}"
            )
        ((key, value),) = given.items()
        if not isinstance(value, int | np.integer) or isinstance(value, bool) or value < 1:
            raise ValueError(f"Norm {self.name!r}: {key} must be an int >= 1, got {value!r}")

    def group_size_for(self, units: int) -> int:
        """The group size for ``units`` channels (``"group"`` only); ValueError if it does not
        divide them."""
        size = self.group_size if self.group_size is not None else units // self.num_groups
        if size < 1 or units % size or (self.num_groups and units != size * self.num_groups):
            raise ValueError(
                f"Norm {self.name!r}: {units} channels do not split into "
                + (f"{self.num_groups} groups" if self.num_groups else f"groups of {size}")
            )
        return int(size)


def _node(tree: Mapping, name: str, what: str) -> Mapping | None:
    """The mapping at path ``name`` (keys joined by ``/``), or None if it is absent."""
    node: Any = tree
    for part in name.split("/") if name else []:
        if not isinstance(node, Mapping):
            raise ValueError(f"{what} {name!r}: {part!r} is not inside a mapping")
        matches = [k for k in node if str(k) == part]
        if not matches:
            return None
        node = node[matches[0]]
    if not isinstance(node, Mapping):
        raise ValueError(f"{what} {name!r} is an array, not a layer's mapping of parameters")
    return node


def _norm_leaves(norm: Norm, params: Mapping, batch_stats: Mapping | None, units: int, before: str):
    """The normalisation layer's per-unit arrays, by role (``scale``, ``bias``, ``mean``,
    ``var``), from its parameters and, for a linen BatchNorm, ``batch_stats``."""
    title = _NORM_TITLES[norm.kind]
    node = _node(params, norm.name, "normalisation layer")
    if node is None:
        raise ValueError(f"normalisation layer {norm.name!r} not found in params")
    leaves = {str(k): v for k, v in node.items()}
    if norm.kind == "batch" and not {"mean", "var"} <= set(leaves):
        stats = None if batch_stats is None else _node(batch_stats, norm.name, "batch_stats of")
        if stats is None:
            raise ValueError(
                f"{title} {norm.name!r} keeps running averages (mean, var) that shrink must "
                "slice too, but they are not among its parameters (nnx keeps them there) and "
                "no batch_stats were given: use shrink_variables(variables, chain) with linen's "
                "{'params': ..., 'batch_stats': ...}"
            )
        leaves.update({f"stats/{k}": v for k, v in stats.items()})
    allowed = set(_NORM_LEAVES[norm.kind]) | {f"stats/{k}" for k in ("mean", "var")}
    unknown = sorted(set(leaves) - allowed)
    if unknown:
        raise ValueError(
            f"{title} {norm.name!r} has entries {unknown}; a {title} has "
            f"{list(_NORM_LEAVES[norm.kind])} (is the kind {norm.kind!r} right?)"
        )
    arrays = {k: np.asarray(v) for k, v in leaves.items()}
    for key, value in arrays.items():
        if value.shape != (units,):
            raise ValueError(
                f"{title} {norm.name!r}: {key} has shape {value.shape}, but it follows "
                f"{before!r} with {units} output units; shrink follows a normalisation over "
                f"the last axis only, with entries of shape ({units},)"
            )
    return arrays


def _units(indices: np.ndarray) -> str:
    shown = ", ".join(str(int(i)) for i in indices[:8])
    return f"[{shown}{', ...' if len(indices) > 8 else ''}]"


def _check_norm(
    norm: Norm, arrays: dict[str, np.ndarray], dead: np.ndarray, layer: str, after: str
) -> None:
    """Raises a ValueError, naming the layer and the units, unless deleting the ``dead`` units
    (whose input to the normalisation is exactly 0) leaves every other output unchanged and
    the deleted outputs of the normalisation are exactly 0."""
    title = _NORM_TITLES[norm.kind]
    split = (
        f"to keep {layer!r} whole, split the chain into one that ends at {layer!r} and one "
        f"that starts at {after!r}"
    )
    if not dead.any():
        return
    if norm.kind in ("layer", "rms"):
        statistic = "mean and variance" if norm.kind == "layer" else "mean square"
        raise ValueError(
            f"shrink cannot delete units {_units(np.flatnonzero(dead))} of {layer!r}: "
            f"{title} {norm.name!r} normalises over all {dead.size} of its units, and a "
            f"deleted unit, although exactly 0, counts in the {statistic} (a sum divided by "
            f"{dead.size}), so every other output would change; {split}"
        )
    bias = arrays.get("bias", np.zeros(dead.size))
    if norm.kind == "group":
        size = norm.group_size_for(dead.size)
        per_group = dead.reshape(-1, size)
        partial = per_group.any(1) & ~per_group.all(1)
        if partial.any():
            raise ValueError(
                f"shrink cannot delete units {_units(np.flatnonzero(dead))} of {layer!r}: "
                f"{title} {norm.name!r} takes its statistics over groups of {size} channels, "
                f"and groups {_units(np.flatnonzero(partial))} mix dead and live channels, so "
                f"deleting the dead ones would change the others; only whole groups can go "
                f"(group the sparsity by norm group, or {split})"
            )
        # A whole zero group normalises to 0 and leaves as its bias.
        nonzero = dead & (bias != 0)
        reason = "its bias, which is not 0"
    else:
        # 0 leaves BatchNorm as bias in training mode (batch mean and variance 0) and as
        # bias - mean * scale / sqrt(var + eps) with the running averages.
        mean = arrays.get("mean", arrays.get("stats/mean"))
        scale = arrays.get("scale", np.ones(dead.size))
        nonzero = dead & ((bias != 0) | ((scale != 0) & (mean != 0)))
        reason = (
            "bias (training mode) or bias - mean * scale / sqrt(var + eps) (running averages), "
            "not both 0; that needs bias = 0 and scale * mean = 0"
        )
    if nonzero.any():
        raise ValueError(
            f"shrink cannot delete units {_units(np.flatnonzero(nonzero))} of {layer!r}: their "
            f"input to {title} {norm.name!r} is 0 but they leave it as {reason}, so {after!r} "
            f"receives a constant from them and its outputs would change; {split}"
        )


def _parse_chain(chain: Sequence[str | Norm]) -> list[tuple[str, list[Norm], str]]:
    """``[(layer, norms after it, next layer), ...]`` from a chain of names and Norms."""
    chain = list(chain)
    for entry in chain:
        if not isinstance(entry, str | Norm):
            raise TypeError(
                f"chain entries must be layer names (str) or autosize.Norm, got {entry!r}"
            )
    layers = [i for i, entry in enumerate(chain) if isinstance(entry, str)]
    if len(layers) < 2 or layers[0] != 0 or layers[-1] != len(chain) - 1:
        raise ValueError(
            "chain must name at least 2 layers in data-flow order, starting and ending with a "
            f"layer (Norm entries only between layers), got {chain}"
        )
    names = [entry.name if isinstance(entry, Norm) else entry for entry in chain]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"chain names {repeated} more than once")
    return [(chain[i], list(chain[i + 1 : j]), chain[j]) for i, j in itertools.pairwise(layers)]


def _shrink(
    params: Mapping, chain: Sequence[str | Norm], batch_stats: Mapping | None
) -> tuple[dict, dict[str, int], dict | None]:
    segments = _parse_chain(chain)
    layers = {}
    for name in [s[0] for s in segments] + [segments[-1][2]]:
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
    norms: dict[str, dict[str, np.ndarray]] = {}
    widths = {}
    for previous, between, name in segments:
        layer = layers[previous]
        keep = np.asarray(unit_is_live(layer["kernel"], layer.get("bias")))
        if not keep.any():
            raise ValueError(
                f"every unit of {previous!r} is dead (all {keep.size} groups exactly 0): "
                f"{name!r} and everything after it compute a constant, and a layer of width 0 "
                "cannot be rebuilt (flax's initialisers divide by the fan-in); shrink refuses "
                "rather than return width 0"
            )
        for norm in between:
            norms[norm.name] = _norm_leaves(norm, params, batch_stats, keep.size, previous)
            _check_norm(norm, norms[norm.name], ~keep, previous, name)
        layers[name]["kernel"] = _slice_inputs(
            layers[name]["kernel"], keep, name, previous, layer["kernel"].ndim > 2
        )
        layer["kernel"] = np.compress(keep, layer["kernel"], axis=-1)
        if "bias" in layer:
            layer["bias"] = layer["bias"][keep]
        for norm in between:
            norms[norm.name] = {k: v[keep] for k, v in norms[norm.name].items()}
            widths[norm.name] = int(keep.sum())
        widths[previous] = int(keep.sum())
    last = segments[-1][2]
    widths[last] = int(layers[last]["kernel"].shape[-1])
    out = dict(params)
    stats_out = None if batch_stats is None else dict(batch_stats)
    for name, node in [*layers.items(), *norms.items()]:
        own = {k: v for k, v in node.items() if not k.startswith("stats/")}
        merged = dict(_node(params, name, "layer"))
        merged.update({next(k for k in merged if str(k) == key): v for key, v in own.items()})
        out = _replace(out, name.split("/") if name else [], merged)
        stats = {k[len("stats/") :]: v for k, v in node.items() if k.startswith("stats/")}
        if stats:
            merged = dict(_node(batch_stats, name, "batch_stats of"))
            merged.update({next(k for k in merged if str(k) == key): v for key, v in stats.items()})
            stats_out = _replace(stats_out, name.split("/") if name else [], merged)
    return out, widths, stats_out


def shrink(params: Mapping, chain: Sequence[str | Norm]) -> tuple[dict, dict[str, int]]:
    r"""Deletes the dead units of a chain of layers, keeping the network's function.

    For each layer of ``chain`` but the last (whose outputs are the model's), the output units
    whose group (kernel slice and bias) is exactly zero are removed from its kernel and bias,
    and the matching inputs from the next layer's kernel: rows of a Dense kernel, the input
    channels of a Conv kernel, or, for Conv -> flatten -> Dense, every flattened position of
    that channel. Layers are processed in order, so a unit left without live inputs and with a
    zero bias is removed too. The outputs are unchanged when the activation maps 0 to 0
    (ReLU, tanh; pooling in between is fine).

    Normalisation layers between two chain layers must be listed in the chain as
    :class:`Norm` entries (shrink cannot see the model's data flow; a norm left out keeps its
    old width and the rebuilt model fails to load). A dead unit reaches the normalisation as
    an exact 0, and shrink deletes it there too only when that is exact:

    * BatchNorm normalises each channel alone, :math:`y_j = (x_j - \mu_j)\,\gamma_j /
      \sqrt{\sigma_j^2 + \epsilon} + \beta_j`; a zero channel leaves it as :math:`\beta_j`
      (batch statistics 0) or :math:`\beta_j - \mu_j \gamma_j / \sqrt{\sigma_j^2 +
      \epsilon}` (running averages), so it is deleted (with its scale, bias, mean and var)
      when :math:`\beta_j = 0` and :math:`\gamma_j \mu_j = 0`;
    * GroupNorm's statistics mix the channels of a group: only whole dead groups whose bias is
      0 are deleted (the remaining groups keep their statistics; rebuild with the same
      ``group_size``, i.e. ``num_groups = widths[name] // group_size``);
    * LayerNorm and RMSNorm average over all units: a deleted zero still changes the count
      in the mean and variance (mean square), so no unit can go.

    Anything else raises a ValueError naming the layers, the units and the reason.

    Args:
      params: parameters (nested mappings of arrays): linen's ``variables["params"]`` (a
        linen BatchNorm needs :func:`shrink_variables`), or ``nnx.to_pure_dict(state)``.
      chain: layer names in data-flow order, as :func:`find_layers` names them
        (``["Dense_0", "Dense_1", "Dense_2"]``), with a :class:`Norm` for each normalisation
        layer between two of them (``["Conv_0", Norm("GroupNorm_0", "group", num_groups=4),
        "Conv_1"]``).

    Returns:
      ``(new_params, widths)``: a copy of ``params`` (plain dicts, numpy arrays for the changed
      layers) and ``{layer name: number of output units}`` to rebuild the model with (for a
      :class:`Norm`, its number of channels).

    Raises:
      ValueError: naming the layer, for an unknown layer, a chain shorter than 2 layers, a
        layout it cannot follow (input width that does not match the previous layer's units),
        a deletion through a normalisation that would change the outputs (above), or a layer
        all of whose units are dead: shrink never returns width 0 (the rest of the network
        would compute a constant, and flax cannot rebuild a layer of width 0).

    Example: unit 1 of ``Dense_0`` (kernel column and bias both 0) is deleted, and with it row 1
    of ``Dense_1``'s kernel; the ReLU network computes the same outputs::

        >>> import numpy as np
        >>> params = {
        ...     "Dense_0": {"kernel": np.array([[1.0, 0.0, 2.0], [3.0, 0.0, -1.0]]),
        ...                 "bias": np.array([0.5, 0.0, 0.0])},
        ...     "Dense_1": {"kernel": np.array([[1.0], [7.0], [2.0]]), "bias": np.array([0.1])},
        ... }
        >>> small, widths = shrink(params, ["Dense_0", "Dense_1"])
        >>> widths
        {'Dense_0': 2, 'Dense_1': 1}
        >>> small["Dense_1"]["kernel"]
        array([[1.],
               [2.]])
        >>> def mlp(p, x):
        ...     h = np.maximum(x @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"], 0.0)
        ...     return h @ p["Dense_1"]["kernel"] + p["Dense_1"]["bias"]
        >>> x = np.array([[0.3, -1.2], [2.0, 0.5]])
        >>> bool(np.allclose(mlp(small, x), mlp(params, x)))
        True

    With flax, rebuild the model from ``widths`` (e.g. ``MLP(hidden=(widths["Dense_0"],))``)
    and load ``small`` into it.
    """
    new_params, widths, _ = _shrink(params, chain, None)
    return new_params, widths


def shrink_variables(
    variables: Mapping, chain: Sequence[str | Norm]
) -> tuple[dict, dict[str, int]]:
    """:func:`shrink` for linen's full variables, which also slices a BatchNorm's running
    averages in ``variables["batch_stats"]``.

    Args:
      variables: ``{"params": ..., "batch_stats": ...}`` as ``model.init`` returns them.
        Other collections are copied unchanged; one with an entry for a chain layer raises
        (shrink would not know its layout).
      chain: as for :func:`shrink`.

    Returns:
      ``(new_variables, widths)``.

    Example: ``Dense -> BatchNorm -> relu -> Dense`` whose unit 1 is dead (zero kernel column
    and bias; its running mean is 0 and its BatchNorm bias 0, so the deletion is exact)::

        >>> import numpy as np
        >>> variables = {
        ...     "params": {
        ...         "Dense_0": {"kernel": np.array([[1.0, 0.0, 2.0]]), "bias": np.zeros(3)},
        ...         "BatchNorm_0": {"scale": np.ones(3), "bias": np.array([0.1, 0.0, 0.2])},
        ...         "Dense_1": {"kernel": np.ones((3, 2)), "bias": np.zeros(2)},
        ...     },
        ...     "batch_stats": {"BatchNorm_0": {"mean": np.array([0.5, 0.0, 1.0]),
        ...                                     "var": np.array([1.0, 1.0, 4.0])}},
        ... }
        >>> small, widths = shrink_variables(
        ...     variables, ["Dense_0", Norm("BatchNorm_0", "batch"), "Dense_1"])
        >>> widths
        {'BatchNorm_0': 2, 'Dense_0': 2, 'Dense_1': 2}
        >>> small["batch_stats"]["BatchNorm_0"]["mean"]
        array([0.5, 1. ])
    """
    if not isinstance(variables, Mapping) or "params" not in variables:
        raise ValueError(
            "variables must be a mapping with a 'params' collection (and 'batch_stats' for "
            f"BatchNorm), got {type(variables).__name__}"
            + (f" with keys {list(variables)}" if isinstance(variables, Mapping) else "")
        )
    names = [entry.name if isinstance(entry, Norm) else entry for entry in chain]
    for collection, tree in variables.items():
        if collection in ("params", "batch_stats") or not isinstance(tree, Mapping):
            continue
        held = [n for n in names if _has_node(tree, n)]
        if held:
            raise ValueError(
                f"variables[{collection!r}] has entries for {held}; shrink_variables slices "
                "'params' and 'batch_stats' only"
            )
    params, widths, stats = _shrink(variables["params"], chain, variables.get("batch_stats"))
    out = dict(variables)
    out["params"] = params
    if stats is not None:
        out["batch_stats"] = stats
    return out, widths


def _has_node(tree: Mapping, name: str) -> bool:
    try:
        return _node(tree, name, "layer") is not None
    except ValueError:
        return True
