r"""Intercepting layers while a model is traced: the recorder behind discovery.

Each registered rule (:mod:`jaxopt_suite.curvature.rules`) names how its layers are found
(:func:`intercept`), in one of two ways:

* :class:`OpInterception` (Dense, Conv): every call of a flax linen ``nn.Dense`` / ``nn.Conv``
  (through ``flax.linen.intercept_methods``) and of an nnx ``nnx.Linear`` / ``nnx.Conv``
  (through a patch of their ``__call__`` that lasts only for the trace) routes its
  ``lax.dot_general`` / ``lax.conv_general_dilated`` through the recorder, which reads the
  exact linear map (contraction, strides, padding, dilations, feature groups) from the ``lax``
  call;
* :class:`ModuleInterception` (LayerNorm, Embed, a user's layer): the module's ``__call__``
  runs through the recorder, and the rule's binder names the module's parameters and what to
  record (LayerNorm: the normalised input; Embed: the integer indices).

The recorder identifies the layer's kernel and bias among the leaves of ``params`` by object
identity (flax hands the very arrays of ``params`` to the layer) and, when asked, records what
the rule consumes and adds a zero perturbation :math:`\varepsilon` to the layer output
:math:`z`. The cotangent of :math:`\varepsilon` is :math:`\partial L/\partial z = \delta`, the
quantity every rule consumes.

In ``discover`` mode every recognised module call runs inside a ``jax.named_scope`` named by
:func:`call_tag`, so that discovery (:mod:`jaxopt_suite.curvature.discovery`) can find, in the
jaxpr of the traced model, any read of a layer's kernel or bias outside its own call (weight
tying: a kernel also used transposed, an ``Embed`` table also used by ``attend`` or in a
product): such a leaf gets no structure.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterator, Mapping
from typing import Any, NamedTuple

import flax.linen as nn
import jax
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

    kind: str  # the registered kind of its rule (jaxopt_suite.curvature.rules)
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
    passes of :mod:`~jaxopt_suite.curvature.fastgrad` (reverse mode only); ``banded``: with
    ``fast``, 2-D convolutions take the banded input cotangent.
    """

    def __init__(
        self,
        leaf_ids: dict[int, int] | None = None,
        perturbations: dict[int, jax.Array] | None = None,
        fast: bool = False,
        banded: bool = True,
    ):
        self.leaf_ids = leaf_ids
        self.fast = fast
        self.banded = banded
        self.perturbations = perturbations or {}
        self.calls: list[LayerCall | None] = []
        self.inputs: dict[int, jax.Array] = {}
        self.shared: set[int] = set()  # leaves whose module made an unexpected number of calls
        self.counter = 0

    @contextlib.contextmanager
    def module_scope(self, kernel: Any, bias: Any) -> Iterator[None]:
        """Around the call of a module found through its ``lax`` call (:class:`OpInterception`:
        Dense, Conv), which makes exactly one recorded ``lax`` call: in ``discover`` mode, the
        named scope of that call's index (its bias is added in the module, outside the ``lax``
        call); a module that made another number of calls has its leaves marked shared."""
        if self.leaf_ids is None:
            yield
            return
        index = self.counter
        with jax.named_scope(call_tag(index)):
            yield
        if self.counter != index + 1:
            self.shared.update(i for i in (self._leaf(kernel), self._leaf(bias)) if i is not None)

    def module(self, kind: str, call: Callable[[], jax.Array], bound: ModuleCall) -> jax.Array:
        """A module-level call (:class:`ModuleInterception`): ``call()`` computes the module's
        output; ``bound`` names its parameters and what its rule consumes."""
        index, self.counter = self.counter, self.counter + 1
        if self.leaf_ids is not None:
            with jax.named_scope(call_tag(index)):
                out = call()
        else:
            out = call()
        if self.leaf_ids is not None:
            leaves = [leaf for leaf in (bound.kernel, bound.bias) if leaf is not None]
            usable = (
                bound.record is not None
                and bool(leaves)
                and all(self._leaf(leaf) is not None for leaf in leaves)
                and _same_trace(bound.record(), leaves[0])
            )
            self.calls.append(
                LayerCall(
                    kind,
                    self._leaf(bound.kernel),
                    self._leaf(bound.bias),
                    jax.ShapeDtypeStruct(out.shape, out.dtype),
                    vocab=bound.vocab,
                )
                if usable
                else None
            )
        if index in self.perturbations:
            self.inputs[index] = bound.record()
            return out + self.perturbations[index].astype(out.dtype)
        return out

    def _leaf(self, value: Any) -> int | None:
        return None if value is None else self.leaf_ids.get(id(value))

    def _finish(self, index: int, lhs: jax.Array, out: jax.Array) -> jax.Array:
        if index in self.perturbations:
            self.inputs[index] = lhs
            return out + self.perturbations[index]
        return out

    def dense(self, kind: str, op: Callable, kernel: Any, bias: Any) -> Callable:
        """``op`` (a ``lax.dot_general``) recorded as a layer of ``kind`` when it contracts
        the last axis of the input with the first of a 2-D kernel."""

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
                        kind,
                        self._leaf(kernel),
                        self._leaf(bias),
                        jax.ShapeDtypeStruct(out.shape, out.dtype),
                    )
                    if usable
                    else None
                )
            return self._finish(index, lhs, out)

        return dot_general

    def conv(self, kind: str, op: Callable, kernel: Any, bias: Any) -> Callable:
        """``op`` (a ``lax.conv_general_dilated``) recorded as a layer of ``kind`` when it is a
        channel-last convolution that the rules can unfold (:class:`ConvConfig`)."""

        def conv_general_dilated(lhs, rhs, *args, **kwargs):
            index, self.counter = self.counter, self.counter + 1
            if self.fast and self.banded:
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
                        kind,
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


class ModuleCall(NamedTuple):
    """What a module-level interception binds for one call of its module."""

    kernel: Any  # the parameter array in the kernel role (LayerNorm: the scale; Embed: the table)
    bias: Any = None
    # what the kind's rule consumes (its ``prepare`` input); None: a call the rule doesn't cover
    record: Callable[[], jax.Array] | None = None
    vocab: int | None = None  # Embed: rows of the table


#: ``(module, args, kwargs) -> ModuleCall``: binds one ``__call__`` of a module.
Binder = Callable[[Any, tuple, dict], ModuleCall]


class ModuleInterception(NamedTuple):
    """A layer kind found at the level of its module's ``__call__`` (LayerNorm, Embed, a
    user's layer): the recorder runs the call, adds the zero perturbation to its output and
    records ``ModuleCall.record()``. ``linen``: linen classes (through
    ``flax.linen.intercept_methods``) and ``nnx``: nnx classes (``__call__`` patched while a
    trace runs), each with its binder."""

    linen: Mapping[type, Binder] = {}
    nnx: Mapping[type, Binder] = {}


class OpInterception(NamedTuple):
    """A layer kind found through the one ``lax`` call its module makes (Dense, Conv): the
    module attribute ``attr`` (e.g. ``"dot_general"``, defaulting to ``default``) is swapped
    for ``wrap(recorder, kind, op, kernel, bias)`` during the call (a :class:`Recorder`
    method such as :meth:`Recorder.dense`)."""

    linen: tuple[type, ...]
    nnx: tuple[type, ...]
    attr: str
    default: Callable
    wrap: Callable[..., Callable]


_ACTIVE: list[Recorder] = []
# Interception tables, filled by :func:`intercept` (class -> (kind, binder or interception)).
_LINEN_OPS: dict[type, tuple[str, OpInterception]] = {}
_NNX_OPS: dict[type, tuple[str, OpInterception]] = {}
_LINEN_MODULES: dict[type, tuple[str, Binder]] = {}
_NNX_MODULES: dict[type, tuple[str, Binder]] = {}


def intercept(kind: str, interception: ModuleInterception | OpInterception) -> None:
    """Makes :func:`recording` find the layers of ``kind`` as ``interception`` says.

    Raises:
      ValueError: a class already intercepted for another kind.
    """
    if isinstance(interception, OpInterception):
        tables = [(_LINEN_OPS, dict.fromkeys(interception.linen, interception))]
        tables.append((_NNX_OPS, dict.fromkeys(interception.nnx, interception)))
    elif isinstance(interception, ModuleInterception):
        tables = [(_LINEN_MODULES, interception.linen), (_NNX_MODULES, interception.nnx)]
    else:
        raise TypeError(
            "interception must be a ModuleInterception or an OpInterception; got "
            f"{type(interception).__name__}"
        )
    every = (_LINEN_OPS, _NNX_OPS, _LINEN_MODULES, _NNX_MODULES)
    for _, entries in tables:
        for cls in entries:
            taken = [t[cls][0] for t in every if cls in t and t[cls][0] != kind]
            if taken:
                raise ValueError(f"{cls.__name__} is already intercepted for kind {taken[0]!r}")
    for table, entries in tables:
        for cls, value in entries.items():
            table[cls] = (kind, value)


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
    # only ``__call__``: another method (e.g. ``Embed.attend``) is a read outside the call
    if not _ACTIVE or context.method_name != "__call__":
        return next_fun(*args, **kwargs)
    recorder = _ACTIVE[-1]
    if type(module) in _LINEN_MODULES:
        kind, bind = _LINEN_MODULES[type(module)]
        return recorder.module(kind, lambda: next_fun(*args, **kwargs), bind(module, args, kwargs))
    if type(module) not in _LINEN_OPS:
        return next_fun(*args, **kwargs)
    kind, spec = _LINEN_OPS[type(module)]
    if (
        getattr(module, f"{spec.attr}_cls", None) is not None
        or getattr(module, "mask", None) is not None
    ):
        return next_fun(*args, **kwargs)
    kernel = module.get_variable("params", "kernel")
    bias = module.get_variable("params", "bias") if module.use_bias else None
    op = getattr(module, spec.attr) or spec.default
    wrapped = spec.wrap(recorder, kind, op, kernel, bias)
    with _swapped(module, spec.attr, wrapped), recorder.module_scope(kernel, bias):
        return next_fun(*args, **kwargs)


def nnx_value(variable: Any) -> Any:
    """The array of an nnx ``Variable`` (or ``variable`` itself; None stays None)."""
    if variable is None:
        return None
    return variable.get_value() if hasattr(variable, "get_value") else variable


def _nnx_op_patch(cls: type, kind: str, spec: OpInterception) -> Callable:
    original = cls.__call__

    def __call__(self, *args, **kwargs):
        if not _ACTIVE or type(self) is not cls or getattr(self, "mask", None) is not None:
            return original(self, *args, **kwargs)
        kernel, bias = nnx_value(self.kernel), nnx_value(getattr(self, "bias", None))
        recorder = _ACTIVE[-1]
        wrapped = spec.wrap(recorder, kind, getattr(self, spec.attr), kernel, bias)
        with _swapped(self, spec.attr, wrapped), recorder.module_scope(kernel, bias):
            return original(self, *args, **kwargs)

    return __call__


def _nnx_module_patch(cls: type, kind: str, bind: Binder) -> Callable:
    original = cls.__call__

    def __call__(self, *args, **kwargs):
        if not _ACTIVE or type(self) is not cls:
            return original(self, *args, **kwargs)
        call = lambda: original(self, *args, **kwargs)
        return _ACTIVE[-1].module(kind, call, bind(self, args, kwargs))

    return __call__


@contextlib.contextmanager
def recording(recorder: Recorder) -> Iterator[Recorder]:
    """Routes the layers of every intercepted kind (:func:`intercept`) that run inside the
    block through ``recorder``.

    Only meant around the tracing of a pure function: the nnx patch is process-wide while the
    block runs.
    """
    originals = [(cls, cls.__call__) for cls in (*_NNX_OPS, *_NNX_MODULES)]
    _ACTIVE.append(recorder)
    try:
        for cls, (kind, spec) in _NNX_OPS.items():
            cls.__call__ = _nnx_op_patch(cls, kind, spec)
        for cls, (kind, bind) in _NNX_MODULES.items():
            cls.__call__ = _nnx_module_patch(cls, kind, bind)
        pooling = fastgrad.patched_pooling() if recorder.fast else contextlib.nullcontext()
        with nn.intercept_methods(_linen_interceptor), pooling:
            yield recorder
    finally:
        for cls, method in originals:
            cls.__call__ = method
        _ACTIVE.pop()
