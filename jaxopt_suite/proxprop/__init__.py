"""ProxProp (proximal backpropagation, Frerix et al., ICLR 2018) for JAX and flax.

Layers that are linear in their parameters take an implicit (proximal) step in their backward
pass: the parameter cotangent handed to the optimizer is

.. math::

  d = (A^\\top A + \\tau^{-1} I)^{-1} \\nabla_\\Theta L

(exactly, by K conjugate-gradient steps, or the plain gradient), while the input cotangent is
ordinary backprop. Any first-order optax optimizer consumes ``d``.
With bfloat16 (or float16) parameters and activations the forward pass stays in that dtype
and the proximal solve runs in float32 (:mod:`jaxopt_suite.proxprop.ops`).

* pure ops (``jax.custom_vjp``): :func:`proxprop_dense`, :func:`proxprop_conv`,
  :func:`proxprop_linear`;
* flax linen layers: :class:`ProxPropDense`, :class:`ProxPropConv`, :func:`proxprop_module`;
* flax nnx layers: :class:`ProxPropLinear`, :class:`ProxPropNNXConv`
  (also as ``jaxopt_suite.proxprop.nnx.ProxPropConv``);
* :func:`parse_mode` and the solvers in :mod:`jaxopt_suite.proxprop.solvers`.

The ``proxprop`` methods of ``jaxopt-suite compare`` are in :mod:`jaxopt_suite.harness.recipes`.
"""

from jaxopt_suite.proxprop.linen import ProxPropConv, ProxPropDense, proxprop_module
from jaxopt_suite.proxprop.nnx import ProxPropConv as ProxPropNNXConv
from jaxopt_suite.proxprop.nnx import ProxPropLinear
from jaxopt_suite.proxprop.ops import (
    check_linear,
    proxprop_conv,
    proxprop_dense,
    proxprop_linear,
)
from jaxopt_suite.proxprop.solvers import Mode, cg_solve, parse_mode

__all__ = [
    "Mode",
    "ProxPropConv",
    "ProxPropDense",
    "ProxPropLinear",
    "ProxPropNNXConv",
    "cg_solve",
    "check_linear",
    "parse_mode",
    "proxprop_conv",
    "proxprop_dense",
    "proxprop_linear",
    "proxprop_module",
]
