"""ProxProp layers for flax linen: drop-in replacements for ``nn.Dense`` and ``nn.Conv``, and
:func:`proxprop_module` for any other layer that is linear in its parameters.

The layers only hold parameters and call the pure ops of :mod:`jaxopt_suite.proxprop.ops`. They
are subclasses of the plain layers with two more attributes, ``tau_prox`` and
``optimization_mode``, and create the same parameters (names, shapes, initialisers), so
parameters trained with one load into the other.

They also take the plain layer's automatic name: flax names an unnamed submodule of a compact
method ``f"{type(layer).__name__}_{i}"`` with one counter per prefix, so a ``ProxPropDense``
would be ``ProxPropDense_0`` and a checkpoint of the plain model would not load. A ProxProp
layer instead counts and names itself as the layer it replaces (``Dense_0``, ``Conv_1``,
``DenseGeneral_0``; a flax lifted version such as ``nn.remat(ProxPropDense)`` as
``CheckpointDense_0``), so swapping ``nn.Dense`` for ``ProxPropDense`` keeps the parameter tree,
also in a model that mixes both. Explicit names (``name=`` or ``setup`` attributes) are kept as
they are; nnx has no automatic names (attributes name the parameters).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
from flax.linen import module as linen_module

from jaxopt_suite.proxprop import ops, solvers

PROXPROP_FIELDS = ("tau_prox", "optimization_mode")


def _validate(module: nn.Module) -> None:
    solvers.parse_mode(module.optimization_mode)
    solvers.check_tau(module.tau_prox)


def _autoname_as_plain(module: nn.Module, proxprop_name: str, plain_name: str) -> None:
    """Names an unnamed ``module`` as flax would name the plain layer it replaces.

    Called before ``nn.Module.__post_init__``, which otherwise names it
    ``f"{type(module).__name__}_{i}"`` from the parent's per-prefix counter; this takes the
    same counter and the same rule with ``proxprop_name`` replaced by ``plain_name`` in the
    class name. Only for submodules created in a compact method: ``setup`` attributes, top-level
    and explicitly named modules are left to flax.
    """
    if module.name is not None:
        return
    parent = module.parent
    if parent is linen_module._unspecified_parent:
        parent = linen_module._context.module_stack[-1]
    if not isinstance(parent, nn.Module) or parent._state.in_setup:
        return
    if not parent._initialization_allowed:
        return  # flax raises its own error (a submodule outside setup or a compact method)
    prefix = type(module).__name__.replace(proxprop_name, plain_name)
    cursor = parent._state.autoname_cursor.get(prefix, 0)
    object.__setattr__(module, "name", f"{prefix}_{cursor}")
    parent._state.autoname_cursor[prefix] = cursor + 1


def _plain_fields(module: nn.Module, base: type[nn.Module]) -> dict[str, Any]:
    """The dataclass attributes ``base`` knows, read from ``module`` (a ProxProp subclass)."""
    skip = {"parent", "name", *PROXPROP_FIELDS}
    return {
        f.name: getattr(module, f.name)
        for f in dataclasses.fields(base)
        if f.init and f.name not in skip
    }


class ProxPropDense(nn.Dense):
    """``nn.Dense`` whose backward pass hands the optimizer the ProxProp direction.

    .. math::

      d = (A^\\top A + \\tau^{-1} I)^{-1} \\nabla_{[W; b]} L, \\qquad A = [x, 1],

    exactly (``"prox_exact"``), by K conjugate-gradient steps per output unit
    (``"prox_cg<K>"``) or not at all (``"gradient"``); the input cotangent is plain backprop.
    With bfloat16 parameters or ``dtype=jnp.bfloat16`` the solve runs in float32 and the
    direction comes back in the parameters' dtype.
    Same constructor arguments and parameters as ``nn.Dense`` plus:

    Attributes:
      tau_prox: the proximal step size :math:`\\tau > 0` (default 1).
      optimization_mode: ``"gradient"``, ``"prox_exact"`` or ``"prox_cg<K>"`` (default
        ``"prox_cg1"``).

    Example:
      >>> import functools, jax, jax.numpy as jnp
      >>> layer = ProxPropDense(4, tau_prox=0.05, optimization_mode="prox_exact")
      >>> params = layer.init(jax.random.key(0), jnp.ones((2, 3)))
      >>> model = zoo.make_model("proxprop-mlp",  # doctest: +SKIP
      ...     dense=functools.partial(ProxPropDense, tau_prox=0.05))
    """

    tau_prox: float = 1.0
    optimization_mode: str = "prox_cg1"

    def __post_init__(self) -> None:
        _validate(self)
        _autoname_as_plain(self, "ProxPropDense", "Dense")
        super().__post_init__()

    @nn.compact
    def __call__(self, inputs: jax.Array) -> jax.Array:
        if self.dot_general is not None or self.dot_general_cls is not None:
            raise ValueError("ProxPropDense computes its own products: dot_general must be None")
        kernel = self.param(
            "kernel", self.kernel_init, (inputs.shape[-1], self.features), self.param_dtype
        )
        bias = (
            self.param("bias", self.bias_init, (self.features,), self.param_dtype)
            if self.use_bias
            else None
        )
        inputs, kernel, bias = self.promote_dtype(inputs, kernel, bias, dtype=self.dtype)
        return ops.proxprop_dense(
            inputs,
            kernel,
            bias,
            tau_prox=self.tau_prox,
            optimization_mode=self.optimization_mode,
            precision=self.precision,
        )


def _conv_fn(plain: nn.Conv):
    """``(inputs, kernel) -> conv`` of an unbiased, unmasked copy of ``plain``, for kernels
    with any number of output channels."""

    def conv(x: jax.Array, kernel: jax.Array) -> jax.Array:
        layer = plain.clone(features=kernel.shape[-1], use_bias=False, mask=None, parent=None)
        return layer.apply({"params": {"kernel": kernel}}, x)

    return conv


def _kernel_shape(kernel_size: Any, in_features: int, groups: int, features: int) -> tuple:
    window = (kernel_size,) if isinstance(kernel_size, int) else tuple(kernel_size)
    return (*window, in_features // groups, features)


class ProxPropConv(nn.Conv):
    """``nn.Conv`` whose backward pass hands the optimizer the ProxProp direction.

    Output channels do not interact, so the normal operator is block-diagonal over them: one
    system per output channel (its filter plus its bias),

    .. math::

      d_c = (A^\\top A + \\tau^{-1} I)^{-1} \\nabla_{[W_c; b_c]} L,

    with :math:`A` the unfolded input patches plus a column of ones; CG (``"prox_cg<K>"``) is
    matrix-free through the convolution and its transpose, ``"prox_exact"`` factors the patch
    Gram matrix (no ``mask``, ``feature_group_count=1``). Same constructor arguments and
    parameters as ``nn.Conv`` plus ``tau_prox`` (default 1) and ``optimization_mode``
    (default ``"prox_cg1"``). With bfloat16 parameters or inputs the solve runs in float32
    and the direction comes back in the parameters' dtype.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> layer = ProxPropConv(8, (3, 3), tau_prox=1.0, optimization_mode="prox_cg3")
      >>> params = layer.init(jax.random.key(0), jnp.ones((2, 6, 6, 1)))
    """

    tau_prox: float = 1.0
    optimization_mode: str = "prox_cg1"

    def __post_init__(self) -> None:
        _validate(self)
        _autoname_as_plain(self, "ProxPropConv", "Conv")
        super().__post_init__()

    @nn.compact
    def __call__(self, inputs: jax.Array) -> jax.Array:
        shape = _kernel_shape(
            self.kernel_size, inputs.shape[-1], self.feature_group_count, self.features
        )
        kernel = self.param("kernel", self.kernel_init, shape, self.param_dtype)
        bias = (
            self.param("bias", self.bias_init, (self.features,), self.param_dtype)
            if self.use_bias
            else None
        )
        inputs, kernel, bias = self.promote_dtype(inputs, kernel, bias, dtype=self.dtype)
        plain = nn.Conv(**{**_plain_fields(self, nn.Conv), "dtype": None}, parent=None)
        return ops.proxprop_conv(
            _conv_fn(plain),
            inputs,
            kernel,
            bias,
            tau_prox=self.tau_prox,
            optimization_mode=self.optimization_mode,
            mask=self.mask,
            grouped=self.feature_group_count != 1,
        )


def _constant(value: Any):
    return lambda rng: value


def proxprop_module(module_cls: type[nn.Module]) -> type[nn.Module]:
    """A ProxProp version of any linen layer that is linear in its parameters.

    The returned class subclasses ``module_cls``, takes the same arguments plus ``tau_prox``
    (default 1) and ``optimization_mode`` (default ``"prox_cg1"``), creates the same
    parameters under the same automatic name (``DenseGeneral_0``, see the module docstring),
    and computes its output with the original layer. Its backward pass treats all
    parameters as one vector :math:`\\Theta` and hands the optimizer

    .. math::

      d = (J_\\Theta^\\top J_\\Theta + \\tau^{-1} I)^{-1} \\nabla_\\Theta L,

    by CG with :math:`J^\\top J` applied matrix-free (jvp, then vjp), or exactly for small
    layers. At initialisation a probe checks that the layer is linear in its parameters
    (ValueError otherwise). For Dense and Conv prefer :class:`ProxPropDense` and
    :class:`ProxPropConv`, which use their structure (one system per output unit). With
    bfloat16 parameters or inputs the solve runs in float32 (the layer's own ``dtype`` decides
    the products with :math:`J`); the direction comes back in the parameters' dtype.

    Args:
      module_cls: a linen layer class, e.g. ``nn.DenseGeneral``, ``nn.ConvTranspose``,
        ``nn.Einsum``; its ``__call__`` takes the input first (further call arguments are
        passed through and not differentiated).

    Returns:
      The subclass ``ProxProp<Name>``.

    Example:
      >>> import flax.linen as nn, jax, jax.numpy as jnp
      >>> ProxPropDenseGeneral = proxprop_module(nn.DenseGeneral)
      >>> layer = ProxPropDenseGeneral((2, 3), optimization_mode="prox_cg2")
      >>> params = layer.init(jax.random.key(0), jnp.ones((4, 5)))
    """
    if not (isinstance(module_cls, type) and issubclass(module_cls, nn.Module)):
        raise TypeError(f"module_cls must be a flax linen Module class, got {module_cls!r}")
    clash = [f for f in PROXPROP_FIELDS if f in {g.name for g in dataclasses.fields(module_cls)}]
    if clash:
        raise ValueError(f"module_cls {module_cls.__name__} already has attributes {clash}")

    def __post_init__(self) -> None:
        _validate(self)
        _autoname_as_plain(self, name, module_cls.__name__)
        module_cls.__post_init__(self)

    @nn.compact
    def __call__(self, inputs: jax.Array, *args: Any, **kwargs: Any) -> jax.Array:
        plain = module_cls(**_plain_fields(self, module_cls), parent=None)
        layer_fn = lambda p, x: plain.apply({"params": p}, x, *args, **kwargs)
        spec = jax.eval_shape(
            lambda x: plain.init(jax.random.key(0), x, *args, **kwargs)["params"], inputs
        )
        values = {}
        if self.is_initializing():
            values = plain.init({"params": self.make_rng("params")}, inputs, *args, **kwargs)
            values = values["params"]
            ops.check_linear(layer_fn, values, inputs, name=module_cls.__name__)
        # Outside initialisation the stored values are returned and the initialiser is unused.
        params = {name: self.param(name, _constant(values.get(name))) for name in spec}
        return ops.proxprop_linear(
            layer_fn,
            params,
            inputs,
            tau_prox=self.tau_prox,
            optimization_mode=self.optimization_mode,
        )

    name = f"ProxProp{module_cls.__name__}"
    namespace = {
        "__annotations__": {"tau_prox": float, "optimization_mode": str},
        "tau_prox": 1.0,
        "optimization_mode": "prox_cg1",
        "__post_init__": __post_init__,
        "__call__": __call__,
        "__module__": __name__,
        "__qualname__": name,
        "__doc__": f"ProxProp version of ``{module_cls.__module__}.{module_cls.__qualname__}``"
        " (see :func:`proxprop_module`).",
    }
    return type(name, (module_cls,), namespace)
