"""ProxProp layers for flax nnx: drop-in replacements for ``nnx.Linear`` and ``nnx.Conv``.

They subclass the plain layers (same constructor, same ``kernel``/``bias`` parameters) with two
more keyword arguments, ``tau_prox`` and ``optimization_mode``, and call the pure ops of
:mod:`jaxopt_suite.proxprop.ops`, exactly as the linen layers do. nnx has no automatic names:
the attribute that holds a layer names its parameters, so a ``ProxPropLinear`` assigned to the
attribute that held the ``nnx.Linear`` gives the same state tree, and the plain model's state
loads into it.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
from flax import nnx

from jaxopt_suite.proxprop import ops, solvers
from jaxopt_suite.proxprop.linen import _conv_fn


class ProxPropLinear(nnx.Linear):
    """``nnx.Linear`` whose backward pass hands the optimizer the ProxProp direction
    :math:`d = (A^\\top A + \\tau^{-1} I)^{-1} \\nabla_{[W; b]} L`, :math:`A = [x, 1]`
    (see :func:`jaxopt_suite.proxprop.proxprop_dense`).
    bfloat16 parameters or inputs: the solve runs in float32, the direction comes back in the
    parameters' dtype.

    Args:
      in_features, out_features, ``**kwargs``: as ``nnx.Linear`` (``dot_general`` must stay the
        default).
      tau_prox: the proximal step size :math:`\\tau > 0` (default 1).
      optimization_mode: ``"gradient"``, ``"prox_exact"`` or ``"prox_cg<K>"`` (default
        ``"prox_cg1"``).

    Example:
      >>> from flax import nnx
      >>> layer = ProxPropLinear(3, 4, tau_prox=0.05, rngs=nnx.Rngs(0))
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        tau_prox: float = 1.0,
        optimization_mode: str = "prox_cg1",
        **kwargs: Any,
    ) -> None:
        solvers.parse_mode(optimization_mode)
        solvers.check_tau(tau_prox)
        if kwargs.get("dot_general", jax.lax.dot_general) is not jax.lax.dot_general:
            raise ValueError("ProxPropLinear computes its own products: leave dot_general unset")
        super().__init__(in_features, out_features, **kwargs)
        self.tau_prox = tau_prox
        self.optimization_mode = optimization_mode

    def __call__(self, inputs: jax.Array) -> jax.Array:
        kernel = self.kernel[...]
        bias = self.bias[...] if self.bias is not None else None
        inputs, kernel, bias = self.promote_dtype((inputs, kernel, bias), dtype=self.dtype)
        return ops.proxprop_dense(
            inputs,
            kernel,
            bias,
            tau_prox=self.tau_prox,
            optimization_mode=self.optimization_mode,
            precision=self.precision,
        )


class ProxPropConv(nnx.Conv):
    """``nnx.Conv`` whose backward pass hands the optimizer the ProxProp direction, one system
    per output channel (see :func:`jaxopt_suite.proxprop.proxprop_conv`).
    bfloat16 parameters or inputs: the solve runs in float32, the direction comes back in the
    parameters' dtype.

    Args:
      in_features, out_features, kernel_size, strides, **kwargs: as ``nnx.Conv`` (the
        convolution itself must stay ``lax.conv_general_dilated``).
      tau_prox: the proximal step size :math:`\\tau > 0` (default 1).
      optimization_mode: ``"gradient"``, ``"prox_exact"`` or ``"prox_cg<K>"`` (default
        ``"prox_cg1"``).

    Example:
      >>> from flax import nnx
      >>> layer = ProxPropConv(1, 8, (3, 3), optimization_mode="prox_cg3", rngs=nnx.Rngs(0))
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        kernel_size: int | tuple[int, ...],
        strides: int | tuple[int, ...] | None = 1,
        *,
        tau_prox: float = 1.0,
        optimization_mode: str = "prox_cg1",
        **kwargs: Any,
    ) -> None:
        solvers.parse_mode(optimization_mode)
        solvers.check_tau(tau_prox)
        conv = kwargs.get("conv_general_dilated", jax.lax.conv_general_dilated)
        if conv is not jax.lax.conv_general_dilated:
            raise ValueError("ProxPropConv needs the default conv_general_dilated")
        super().__init__(in_features, out_features, kernel_size, strides, **kwargs)
        self.tau_prox = tau_prox
        self.optimization_mode = optimization_mode

    def __call__(self, inputs: jax.Array) -> jax.Array:
        kernel = self.kernel[...]
        bias = self.bias[...] if self.bias is not None else None
        inputs, kernel, bias = self.promote_dtype((inputs, kernel, bias), dtype=self.dtype)
        plain = nn.Conv(
            features=self.out_features,
            kernel_size=self.kernel_size,
            strides=self.strides,
            padding=self.padding,
            input_dilation=self.input_dilation,
            kernel_dilation=self.kernel_dilation,
            feature_group_count=self.feature_group_count,
            precision=self.precision,
            parent=None,
        )
        mask = None if self.mask is None else self.mask[...]
        return ops.proxprop_conv(
            _conv_fn(plain),
            inputs,
            kernel,
            bias,
            tau_prox=self.tau_prox,
            optimization_mode=self.optimization_mode,
            mask=mask,
            grouped=self.feature_group_count != 1,
        )
