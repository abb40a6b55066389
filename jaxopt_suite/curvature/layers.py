r"""The structured path: finding Dense, Conv, LayerNorm and Embed layers while a model is traced.

**Finding layers.** While ``apply_fn`` is traced inside :func:`recording`, every call of a flax
linen ``nn.Dense`` / ``nn.Conv`` (through ``flax.linen.intercept_methods``) and of an nnx
``nnx.Linear`` / ``nnx.Conv`` (through a patch of their ``__call__`` that lasts only for the
trace) routes its ``lax.dot_general`` / ``lax.conv_general_dilated`` through a recorder. The
recorder identifies the layer's kernel and bias among the leaves of ``params`` by object
identity (flax hands the very arrays of ``params`` to the layer), reads the exact linear map
(contraction, strides, padding, dilations, feature groups) from the ``lax`` call, and, when
asked, records the layer input :math:`x` and adds a zero perturbation :math:`\varepsilon` to
the layer output :math:`z`. The cotangent of :math:`\varepsilon` is :math:`\partial L/\partial
z = \delta`, the quantity every rule below consumes.

Two more layer kinds are found at the level of the module call (linen ``nn.LayerNorm`` /
``nn.Embed`` through the same interception, nnx ``nnx.LayerNorm`` / ``nnx.Embed`` through the
same patch): the recorder adds the zero perturbation to the module's output and records

* ``layernorm`` (default ``reduction_axes`` = ``feature_axes`` = -1, no ``mask``, no
  ``axis_name``): the normalised input :math:`\hat x = (x - \mu) / \sqrt{\sigma^2 +
  \epsilon}`, computed again in float32 from ``stop_gradient(x)`` (the output is
  :math:`\hat x \odot \gamma + \beta`, so :math:`\hat x` is all the scale's rule needs);
  other axes or a mask leave the layer to the generic path;
* ``embed``: the integer indices (any leading shape).

In ``discover`` mode every recognised module call runs inside a ``jax.named_scope`` named by
:func:`call_tag`, so that the engine can find, in the jaxpr of the traced model, any read of a
layer's kernel or bias outside its own call (weight tying: a kernel also used transposed, an
``Embed`` table also used by ``attend`` or in a product): such a leaf gets no structure.

The per-layer derivative rules that consume the recorded inputs and cotangents are in
:mod:`jaxopt_suite.curvature.rules` (Dense, Conv) and
:mod:`jaxopt_suite.curvature.rules_norm` (LayerNorm, Embed).
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

from jaxopt_suite.curvature import fastgrad


class ConvConfig(NamedTuple):
    """The linear map of one ``lax.conv_general_dilated`` call in channel-last layout."""

    kernel_spatial: tuple[int, ...]
    window_strides: tuple[int, ...]
    padding: tuple[tuple[int, int], ...]
    lhs_dilation: tuple[int, ...]
    rhs_dilation: tuple[int, ...]
    feature_group_count: int


class LayerCall(NamedTuple):
    """One recognised layer call: which leaves it owns and how its output is shaped."""

    kind: str  # "dense", "conv", "layernorm" or "embed"
    # index among the flattened params leaves of the kernel (LayerNorm: the scale, None without
    # one; Embed: the table)
    kernel: int | None
    bias: int | None  # index of the bias leaf, None without bias
    # Dense/Conv: of the lax op (before the bias is added); LayerNorm/Embed: of the module
    output: jax.ShapeDtypeStruct
    conv: ConvConfig | None = None
    vocab: int | None = None  # Embed: rows of the table


class Recorder:
    """Per-trace state of :func:`recording`.

    ``discover`` mode (``leaf_ids`` given) fills ``calls``: one entry per intercepted ``lax``
    call, a :class:`LayerCall` or ``None`` when the call can't be used, and runs each module
    call inside the named scope :func:`call_tag` of its index. ``perturb`` mode
    (``perturbations`` given: call index -> zero array) records ``inputs`` and adds the
    perturbations. Calls are numbered in execution order, which is the same in every trace of
    the same function. ``fast``: convolutions and non-overlapping max-pooling get the backward
    passes of :mod:`~jaxopt_suite.curvature.fastgrad` (reverse mode only).
    """

    def __init__(
        self,
        leaf_ids: dict[int, int] | None = None,
        perturbations: dict[int, jax.Array] | None = None,
        fast: bool = False,
    ):
        self.leaf_ids = leaf_ids
        self.fast = fast
        self.perturbations = perturbations or {}
        self.calls: list[LayerCall | None] = []
        self.inputs: dict[int, jax.Array] = {}
        self.shared: set[int] = set()  # leaves whose module made an unexpected number of calls
        self.counter = 0

    @contextlib.contextmanager
    def module_scope(self, kernel: Any, bias: Any) -> Iterator[None]:
        """Around a Dense/Conv module's call, which makes exactly one recorded ``lax`` call:
        in ``discover`` mode, the named scope of that call's index (its bias is added in the
        module, outside the ``lax`` call); a module that made another number of calls has its
        leaves marked shared."""
        if self.leaf_ids is None:
            yield
            return
        index = self.counter
        with jax.named_scope(call_tag(index)):
            yield
        if self.counter != index + 1:
            self.shared.update(i for i in (self._leaf(kernel), self._leaf(bias)) if i is not None)

    def module(
        self,
        kind: str,
        call: Callable[[], jax.Array],
        record: Callable[[], jax.Array] | None,
        kernel: Any,
        bias: Any = None,
        vocab: int | None = None,
    ) -> jax.Array:
        """A LayerNorm or Embed call: ``call()`` computes the module's output; ``record()``
        what its rule consumes (None: the call is not one the rule covers)."""
        index, self.counter = self.counter, self.counter + 1
        if self.leaf_ids is not None:
            with jax.named_scope(call_tag(index)):
                out = call()
        else:
            out = call()
        if self.leaf_ids is not None:
            leaves = [leaf for leaf in (kernel, bias) if leaf is not None]
            usable = (
                record is not None
                and bool(leaves)
                and all(self._leaf(leaf) is not None for leaf in leaves)
                and _same_trace(record(), leaves[0])
            )
            self.calls.append(
                LayerCall(
                    kind,
                    self._leaf(kernel),
                    self._leaf(bias),
                    jax.ShapeDtypeStruct(out.shape, out.dtype),
                    vocab=vocab,
                )
                if usable
                else None
            )
        if index in self.perturbations:
            self.inputs[index] = record()
            return out + self.perturbations[index].astype(out.dtype)
        return out

    def _leaf(self, value: Any) -> int | None:
        return None if value is None else self.leaf_ids.get(id(value))

    def _finish(self, index: int, lhs: jax.Array, out: jax.Array) -> jax.Array:
        if index in self.perturbations:
            self.inputs[index] = lhs
            return out + self.perturbations[index]
        return out

    def dense(self, op: Callable, kernel: Any, bias: Any) -> Callable:
        def dot_general(lhs, rhs, dimension_numbers, *args, **kwargs):
            index, self.counter = self.counter, self.counter + 1
            out = op(lhs, rhs, dimension_numbers, *args, **kwargs)
            if self.leaf_ids is not None:
                contract = (((lhs.ndim - 1,), (0,)), ((), ()))
                usable = (
                    lhs.ndim >= 2
                    and _same_trace(lhs, kernel)
                    and rhs.ndim == 2
                    and _normalise_dims(dimension_numbers) == contract
                    and self._leaf(kernel) is not None
                    and (bias is None or self._leaf(bias) is not None)
                )
                self.calls.append(
                    LayerCall(
                        "dense",
                        self._leaf(kernel),
                        self._leaf(bias),
                        jax.ShapeDtypeStruct(out.shape, out.dtype),
                    )
                    if usable
                    else None
                )
            return self._finish(index, lhs, out)

        return dot_general

    def conv(self, op: Callable, kernel: Any, bias: Any) -> Callable:
        def conv_general_dilated(lhs, rhs, *args, **kwargs):
            index, self.counter = self.counter, self.counter + 1
            if self.fast:
                config = _conv_config(lhs, rhs, args, kwargs)
                out = fastgrad.fast_conv(op, config, lhs, rhs, args, kwargs)
            else:
                out = op(lhs, rhs, *args, **kwargs)
            if self.leaf_ids is not None:
                config = _conv_config(lhs, rhs, args, kwargs)
                usable = (
                    config is not None
                    and _same_trace(lhs, kernel)
                    and self._leaf(kernel) is not None
                    and (bias is None or self._leaf(bias) is not None)
                )
                self.calls.append(
                    LayerCall(
                        "conv",
                        self._leaf(kernel),
                        self._leaf(bias),
                        jax.ShapeDtypeStruct(out.shape, out.dtype),
                        config,
                    )
                    if usable
                    else None
                )
            return self._finish(index, lhs, out)

        return conv_general_dilated


def _same_trace(x: Any, leaf: Any) -> bool:
    """Whether the layer input ``x`` belongs to the trace of the parameters themselves: not to
    a transformation inside the model (``vmap``, ``jvp``, an inner ``jit``), where the input
    can't be recorded nor the output perturbed, nor a constant."""
    trace = getattr(x, "_trace", None)
    return trace is not None and trace is getattr(leaf, "_trace", None)


def call_tag(index: int) -> str:
    """The named scope of recorded call ``index`` in ``discover`` mode's jaxpr."""
    return f"jaxopt_suite_call_{index}"


def _normalise_dims(dims: Any) -> Any:
    return tuple(tuple(tuple(int(i) for i in part) for part in pair) for pair in dims)


_CONV_SIGNATURE = inspect.signature(lax.conv_general_dilated)


def _conv_config(lhs: jax.Array, rhs: jax.Array, args: tuple, kwargs: dict) -> ConvConfig | None:
    """The channel-last linear map of a conv call, or None when it isn't one we can unfold."""
    try:
        bound = _CONV_SIGNATURE.bind(lhs, rhs, *args, **kwargs)
    except TypeError:
        return None
    a = bound.arguments
    nd = lhs.ndim - 2
    if nd < 1 or a.get("batch_group_count", 1) != 1:
        return None
    dn = lax.conv_dimension_numbers(lhs.shape, rhs.shape, a.get("dimension_numbers"))
    channel_last = (0, nd + 1, *range(1, nd + 1))
    if (
        tuple(dn.lhs_spec) != channel_last
        or tuple(dn.out_spec) != channel_last
        or tuple(dn.rhs_spec) != (nd + 1, nd, *range(nd))
    ):
        return None
    kernel_spatial = tuple(int(k) for k in rhs.shape[:nd])
    strides = tuple(int(s) for s in a["window_strides"])
    lhs_dil = tuple(int(d) for d in (a.get("lhs_dilation") or (1,) * nd))
    rhs_dil = tuple(int(d) for d in (a.get("rhs_dilation") or (1,) * nd))
    padding = a["padding"]
    if isinstance(padding, str):
        effective = [(k - 1) * d + 1 for k, d in zip(kernel_spatial, rhs_dil, strict=True)]
        padding = lax.padtype_to_pads(lhs.shape[1:-1], effective, strides, padding)
    padding = tuple((int(lo), int(hi)) for lo, hi in padding)
    return ConvConfig(
        kernel_spatial, strides, padding, lhs_dil, rhs_dil, int(a.get("feature_group_count", 1))
    )


# --- interception ---------------------------------------------------------------------------

_ACTIVE: list[Recorder] = []
_OPS = {
    "dense": ("dot_general", lax.dot_general),
    "conv": ("conv_general_dilated", lax.conv_general_dilated),
}
_LINEN_KINDS = {nn.Dense: "dense", nn.Conv: "conv"}
_NNX_KINDS = {nnx.Linear: "dense", nnx.Conv: "conv"}
_LINEN_MODULES = {nn.LayerNorm: "layernorm", nn.Embed: "embed"}
_NNX_MODULES = {nnx.LayerNorm: "layernorm", nnx.Embed: "embed"}


def normalised(x: jax.Array, epsilon: float, fast_variance: bool, dtype: Any) -> jax.Array:
    r"""LayerNorm's normalised input over the last axis, without scale and bias.

    .. math:: \hat x = (x - \mu) / \sqrt{\sigma^2 + \epsilon}, \quad \mu = \bar x, \quad
       \sigma^2 = \overline{x^2} - \mu^2 \ (\text{clipped at 0; fast}) \text{ or }
       \overline{(x - \mu)^2}

    as flax computes it, in float32 at least (``dtype``: the module's, or None for ``x``'s);
    ``stop_gradient`` on ``x``: only the value is recorded, and it adds no nonlinear nodes to
    the model's differentiated graph.

    Args:
      x: the LayerNorm input (..., D).
      epsilon: the module's epsilon.
      fast_variance: the module's ``use_fast_variance``.
      dtype: the module's ``dtype`` (None: ``x.dtype``).

    Returns:
      :math:`\hat x`, shaped like ``x``.
    """
    x = lax.stop_gradient(x)
    x = x.astype(jnp.promote_types(dtype or x.dtype, jnp.float32))
    mean = jnp.mean(x, axis=-1, keepdims=True)
    if fast_variance:
        var = jnp.maximum(0.0, jnp.mean(lax.square(x), axis=-1, keepdims=True) - mean**2)
    else:
        var = jnp.mean(lax.square(x - mean), axis=-1, keepdims=True)
    return (x - mean) * lax.rsqrt(var + epsilon)


def _default_axes(ndim: int, axes: Any) -> bool:
    """True when ``axes`` names the last axis only (LayerNorm's default)."""
    axes = axes if isinstance(axes, tuple | list) else (axes,)
    return ndim >= 2 and {ndim + a if a < 0 else a for a in axes} == {ndim - 1}


def _layernorm_record(module: Any, x: Any, kwargs: dict) -> Callable[[], jax.Array] | None:
    """What the LayerNorm rule records, or None when the call is outside it."""
    if (
        not isinstance(x, jax.Array)
        or kwargs.get("mask") is not None
        or getattr(module, "axis_name", None) is not None
        or not _default_axes(x.ndim, module.reduction_axes)
        or not _default_axes(x.ndim, module.feature_axes)
    ):
        return None
    fast = getattr(module, "use_fast_variance", True)
    return lambda: normalised(x, module.epsilon, fast, module.dtype)


def _embed_record(x: Any) -> Callable[[], jax.Array] | None:
    if not hasattr(x, "dtype") or not jnp.issubdtype(x.dtype, jnp.integer) or x.ndim < 1:
        return None
    return lambda: x


@contextlib.contextmanager
def _swapped(module: Any, name: str, value: Any) -> Iterator[None]:
    old = module.__dict__.get(name, _MISSING)
    object.__setattr__(module, name, value)
    try:
        yield
    finally:
        if old is _MISSING:
            object.__delattr__(module, name)
        else:
            object.__setattr__(module, name, old)


_MISSING = object()


def _linen_module(next_fun, args, kwargs, context, kind):
    """LayerNorm / Embed calls of linen, routed through the active recorder."""
    module = context.module
    recorder = _ACTIVE[-1]
    if context.method_name != "__call__":  # e.g. Embed.attend: a read outside the call
        return next_fun(*args, **kwargs)
    if kind == "embed":
        table = module.get_variable("params", "embedding")
        record = _embed_record(args[0]) if args else None
        return recorder.module(
            kind, lambda: next_fun(*args, **kwargs), record, table, vocab=table.shape[0]
        )
    scale = module.get_variable("params", "scale") if module.use_scale else None
    bias = module.get_variable("params", "bias") if module.use_bias else None
    record = _layernorm_record(module, args[0], kwargs) if args else None
    return recorder.module(kind, lambda: next_fun(*args, **kwargs), record, scale, bias)


def _linen_interceptor(next_fun, args, kwargs, context):
    module = context.module
    if _ACTIVE and type(module) in _LINEN_MODULES:
        return _linen_module(next_fun, args, kwargs, context, _LINEN_MODULES[type(module)])
    kind = _LINEN_KINDS.get(type(module))
    if not _ACTIVE or kind is None or context.method_name != "__call__":
        return next_fun(*args, **kwargs)
    attr, default = _OPS[kind]
    if (
        getattr(module, f"{attr}_cls", None) is not None
        or getattr(module, "mask", None) is not None
    ):
        return next_fun(*args, **kwargs)
    kernel = module.get_variable("params", "kernel")
    bias = module.get_variable("params", "bias") if module.use_bias else None
    op = getattr(module, attr) or default
    recorder = _ACTIVE[-1]
    wrapped = getattr(recorder, kind)(op, kernel, bias)
    with _swapped(module, attr, wrapped), recorder.module_scope(kernel, bias):
        return next_fun(*args, **kwargs)


def _nnx_value(variable: Any) -> Any:
    if variable is None:
        return None
    return variable.get_value() if hasattr(variable, "get_value") else variable


def _nnx_patch(cls: type, kind: str) -> Callable:
    original = cls.__call__
    attr, _ = _OPS[kind]

    def __call__(self, *args, **kwargs):
        if not _ACTIVE or type(self) is not cls or getattr(self, "mask", None) is not None:
            return original(self, *args, **kwargs)
        kernel, bias = _nnx_value(self.kernel), _nnx_value(getattr(self, "bias", None))
        recorder = _ACTIVE[-1]
        wrapped = getattr(recorder, kind)(getattr(self, attr), kernel, bias)
        with _swapped(self, attr, wrapped), recorder.module_scope(kernel, bias):
            return original(self, *args, **kwargs)

    return __call__


def _nnx_module_patch(cls: type, kind: str) -> Callable:
    original = cls.__call__

    def __call__(self, *args, **kwargs):
        if not _ACTIVE or type(self) is not cls:
            return original(self, *args, **kwargs)
        call = lambda: original(self, *args, **kwargs)
        if kind == "embed":
            table = _nnx_value(self.embedding)
            record = _embed_record(args[0]) if args else None
            return _ACTIVE[-1].module(kind, call, record, table, vocab=table.shape[0])
        scale, bias = _nnx_value(self.scale), _nnx_value(self.bias)
        record = _layernorm_record(self, args[0], kwargs) if args else None
        return _ACTIVE[-1].module(kind, call, record, scale, bias)

    return __call__


@contextlib.contextmanager
def recording(recorder: Recorder) -> Iterator[Recorder]:
    """Routes the Dense/Conv/LayerNorm/Embed layers that run inside the block through
    ``recorder``.

    Only meant around the tracing of a pure function: the nnx patch is process-wide while the
    block runs.
    """
    originals = [(cls, "__call__", cls.__call__) for cls in (*_NNX_KINDS, *_NNX_MODULES)]
    _ACTIVE.append(recorder)
    try:
        for cls, kind in _NNX_KINDS.items():
            cls.__call__ = _nnx_patch(cls, kind)
        for cls, kind in _NNX_MODULES.items():
            cls.__call__ = _nnx_module_patch(cls, kind)
        pooling = fastgrad.patched_pooling() if recorder.fast else contextlib.nullcontext()
        with nn.intercept_methods(_linen_interceptor), pooling:
            yield recorder
    finally:
        for cls, name, method in originals:
            setattr(cls, name, method)
        _ACTIVE.pop()
