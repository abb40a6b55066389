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

**Rules.** For a layer :math:`z = x W (+ b)` the per-sample gradient is
:math:`\hat g_n(W) = \sum_t x_{n,t} \delta_{n,t}^\top` (sum over sequence or spatial positions;
for a convolution :math:`x_{n,t}` is the input patch under output position :math:`t`). A rule
receives :math:`x` (N, ..., in) and a stack of cotangents :math:`\delta` (K, N, ..., out): one
column for first-order quantities, the K backpropagated columns of the loss Hessian's square
root for GGN quantities. It returns one of the :data:`STATISTICS` of the per-(column, sample)
gradients :math:`\hat g_{k,n}`:

* ``individual``: :math:`\hat g_{0,n}`, shape (N, *leaf)
* ``individual_sq_norm``: :math:`\|\hat g_{0,n}\|^2`, shape (N,)
* ``sum_sq``: :math:`\sum_{k,n} \hat g_{k,n}^{\odot 2}`, shape leaf
* ``individual_sum_sq``: :math:`\sum_k \hat g_{k,n}^{\odot 2}`, shape (N, *leaf)

A Dense layer without extra axes never forms :math:`\hat g`: e.g. ``sum_sq`` is
:math:`(x^{\odot 2})^\top (\sum_k \delta_k^{\odot 2})` and ``individual_sq_norm`` is
:math:`\|x_n\|^2 \|\delta_n\|^2`.
"""

from __future__ import annotations

import contextlib
import inspect
import itertools
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

STATISTICS = ("individual", "individual_sq_norm", "sum_sq", "individual_sum_sq")


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


# --- rules ----------------------------------------------------------------------------------


def reduce_individual(statistic: str, grads: jax.Array) -> jax.Array:
    """A statistic from materialised per-(column, sample) gradients ``grads`` (K, N, *leaf)."""
    if statistic == "individual":
        return grads[0]
    if statistic == "individual_sq_norm":
        g = grads[0]
        return jnp.sum(g.reshape(g.shape[0], -1) ** 2, axis=1)
    if statistic == "sum_sq":
        return jnp.sum(grads**2, axis=(0, 1))
    if statistic == "individual_sum_sq":
        return jnp.sum(grads**2, axis=0)
    raise ValueError(f"unknown statistic {statistic!r}; valid: {STATISTICS}")


def _positions(x: jax.Array, delta: jax.Array) -> tuple[jax.Array, jax.Array]:
    """x (N, ..., in) -> (N, T, in); delta (K, N, ..., out) -> (K, N, T, out)."""
    n = x.shape[0]
    return x.reshape(n, -1, x.shape[-1]), delta.reshape(delta.shape[0], n, -1, delta.shape[-1])


def dense_kernel(statistic: str, x: jax.Array, delta: jax.Array) -> jax.Array:
    """Statistic of the kernel (in, out) of ``z = x W``; see the module docstring."""
    x, delta = _positions(x, delta)
    t, d_in = x.shape[1:]
    d_out = delta.shape[-1]
    if t == 1:
        x, delta = x[:, 0], delta[:, :, 0]
        if statistic == "individual":
            return jnp.einsum("ni,no->nio", x, delta[0])
        if statistic == "individual_sq_norm":
            return jnp.sum(x**2, axis=-1) * jnp.sum(delta[0] ** 2, axis=-1)
        delta_sq = jnp.sum(delta**2, axis=0)
        if statistic == "sum_sq":
            return jnp.einsum("ni,no->io", x**2, delta_sq)
        if statistic == "individual_sum_sq":
            return jnp.einsum("ni,no->nio", x**2, delta_sq)
    elif statistic == "individual_sq_norm" and t * t * (d_in + d_out) < d_in * d_out:
        # ||sum_t x_t d_t^T||^2 = sum_{t,s} (x_t . x_s)(d_t . d_s): Gram matrices, no N x in x out.
        gram_x = jnp.einsum("nti,nsi->nts", x, x)
        gram_d = jnp.einsum("nto,nso->nts", delta[0], delta[0])
        return jnp.sum(gram_x * gram_d, axis=(1, 2))
    return reduce_individual(statistic, jnp.einsum("nti,knto->knio", x, delta))


def bias(statistic: str, delta: jax.Array) -> jax.Array:
    """Statistic of a bias (out,) added to every position: ``ĝ_n = Σ_t δ_{n,t}``."""
    k, n = delta.shape[:2]
    return reduce_individual(statistic, delta.reshape(k, n, -1, delta.shape[-1]).sum(axis=2))


def conv_patches(x: jax.Array, config: ConvConfig, out_spatial: tuple[int, ...]) -> jax.Array:
    """Input patches under each output position: (N, *out_spatial, prod(kernel), C_in).

    Strided slices of the padded (and input-dilated) input, one per kernel offset, in the
    kernel's row-major order, so ``z[n, p, o] = Σ_{s,c} patches[n, p, s, c] W[s, c, o]``
    (without feature groups).
    """
    zero = jnp.zeros((), x.dtype)
    pads = [(0, 0, 0)]
    pads += [
        (lo, hi, d - 1) for (lo, hi), d in zip(config.padding, config.lhs_dilation, strict=True)
    ]
    x = lax.pad(x, zero, [*pads, (0, 0, 0)])
    slices = []
    for offset in itertools.product(*(range(k) for k in config.kernel_spatial)):
        start = [0] + [o * d for o, d in zip(offset, config.rhs_dilation, strict=True)] + [0]
        limit = [x.shape[0]]
        limit += [
            s + (p - 1) * st + 1
            for s, p, st in zip(start[1:-1], out_spatial, config.window_strides, strict=True)
        ]
        limit += [x.shape[-1]]
        slices.append(lax.slice(x, start, limit, (1, *config.window_strides, 1)))
    return jnp.stack(slices, axis=-2)


def prepare(call: LayerCall, x: jax.Array) -> jax.Array:
    """What the kernel rule of ``call`` consumes, computed once per layer: the input itself
    for Dense, the unfolded patches (N, P, prod(kernel), C_in) for Conv."""
    if call.kind == "dense":
        return x
    patches = conv_patches(x, call.conv, call.output.shape[1:-1])
    return patches.reshape(x.shape[0], -1, *patches.shape[-2:])


def conv_kernel(
    statistic: str, patches: jax.Array, delta: jax.Array, config: ConvConfig
) -> jax.Array:
    """Statistic of a conv kernel (*kernel_spatial, C_in / G, C_out) from unfolded patches.

    The per-(column, sample) kernel gradients are one batched matrix product per sample and
    feature group, ``(S·C_in/G, P) @ (P, K·C_out/G)``; the statistic is reduced in that layout
    and only the (small) result is permuted to the kernel's layout.
    """
    k, n = delta.shape[:2]
    groups = config.feature_group_count
    s, c_in = patches.shape[-2:]
    c_out = delta.shape[-1]
    cg, og = c_in // groups, c_out // groups
    lhs = patches.reshape(n, -1, s, groups, cg).transpose(0, 3, 1, 2, 4)
    lhs = lhs.reshape(n, groups, -1, s * cg)  # (N, G, P, D)
    rhs = delta.reshape(k, n, -1, groups, og).transpose(1, 3, 2, 0, 4)
    rhs = rhs.reshape(n, groups, -1, k * og)  # (N, G, P, K·Og)
    grads = jax.lax.dot_general(lhs, rhs, (((2,), (2,)), ((0, 1), (0, 1))))
    grads = grads.reshape(n, groups, s * cg, k, og)  # (N, G, D, K, Og)

    def to_kernel(a: jax.Array, batch: bool) -> jax.Array:
        # (..., G, D, Og) -> (..., *kernel_spatial, Cg, G·Og)
        lead = a.shape[:1] if batch else ()
        a = a.reshape(*lead, groups, s, cg, og)
        a = jnp.moveaxis(a, len(lead), len(lead) + 2)  # (..., S, Cg, G, Og)
        return a.reshape(*lead, *config.kernel_spatial, cg, c_out)

    if statistic == "individual":
        return to_kernel(grads[:, :, :, 0], batch=True)
    if statistic == "individual_sq_norm":
        return jnp.sum(grads[:, :, :, 0] ** 2, axis=(1, 2, 3))
    if statistic == "sum_sq":
        return to_kernel(jnp.sum(grads**2, axis=(0, 3)), batch=False)
    if statistic == "individual_sum_sq":
        return to_kernel(jnp.sum(grads**2, axis=3), batch=True)
    raise ValueError(f"unknown statistic {statistic!r}; valid: {STATISTICS}")


def layer_statistic(
    statistic: str, call: LayerCall, role: str, prepared: jax.Array, delta: jax.Array
) -> jax.Array:
    """Dispatches to the rule of ``call.kind`` for the ``role`` (``"kernel"`` or ``"bias"``);
    ``prepared`` is :func:`prepare` of the layer input."""
    if role == "bias":
        return bias(statistic, delta)
    if call.kind == "dense":
        return dense_kernel(statistic, prepared, delta)
    return conv_kernel(statistic, prepared, delta, call.conv)
