r"""The structured path: finding Dense and Conv layers, and their per-sample derivatives.

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

The per-layer derivative rules that consume the recorded inputs and cotangents are in
:mod:`jaxopt_suite.curvature.rules`.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import flax.linen as nn
import jax
from flax import nnx
from jax import lax


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

    kind: str  # "dense" or "conv"
    kernel: int  # index of the kernel among the flattened params leaves
    bias: int | None  # index of the bias leaf, None without bias
    output: jax.ShapeDtypeStruct  # of the lax op (before the bias is added)
    conv: ConvConfig | None = None


class Recorder:
    """Per-trace state of :func:`recording`.

    ``discover`` mode (``leaf_ids`` given) fills ``calls``: one entry per intercepted ``lax``
    call, a :class:`LayerCall` or ``None`` when the call can't be used. ``perturb`` mode
    (``perturbations`` given: call index -> zero array) records ``inputs`` and adds the
    perturbations. Calls are numbered in execution order, which is the same in every trace of
    the same function.
    """

    def __init__(
        self,
        leaf_ids: dict[int, int] | None = None,
        perturbations: dict[int, jax.Array] | None = None,
    ):
        self.leaf_ids = leaf_ids
        self.perturbations = perturbations or {}
        self.calls: list[LayerCall | None] = []
        self.inputs: dict[int, jax.Array] = {}
        self.counter = 0

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
            out = op(lhs, rhs, *args, **kwargs)
            if self.leaf_ids is not None:
                config = _conv_config(lhs, rhs, args, kwargs)
                usable = (
                    config is not None
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


def _linen_interceptor(next_fun, args, kwargs, context):
    module = context.module
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
    wrapped = getattr(_ACTIVE[-1], kind)(op, kernel, bias)
    with _swapped(module, attr, wrapped):
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
        wrapped = getattr(_ACTIVE[-1], kind)(getattr(self, attr), kernel, bias)
        with _swapped(self, attr, wrapped):
            return original(self, *args, **kwargs)

    return __call__


@contextlib.contextmanager
def recording(recorder: Recorder) -> Iterator[Recorder]:
    """Routes the Dense/Conv layers that run inside the block through ``recorder``.

    Only meant around the tracing of a pure function: the nnx patch is process-wide while the
    block runs.
    """
    originals = {cls: cls.__call__ for cls in _NNX_KINDS}
    _ACTIVE.append(recorder)
    try:
        for cls, kind in _NNX_KINDS.items():
            cls.__call__ = _nnx_patch(cls, kind)
        with nn.intercept_methods(_linen_interceptor):
            yield recorder
    finally:
        for cls, method in originals.items():
            cls.__call__ = method
        _ACTIVE.pop()
