"""BackPACK for JAX: per-sample and curvature quantities alongside the gradient.

:func:`value_and_grad` returns the mini-batch loss, its gradient and, in the same pass,
BackPACK's quantities (:data:`QUANTITIES`): individual gradients and their norms, the sum of
squared individual gradients and the gradient variance, the diagonal of the generalized
Gauss-Newton matrix (exact or by Monte Carlo, summed or per sample) and its square root
(``sqrt_ggn_exact``, ``sqrt_ggn_mc``), Kronecker factors (``kflr``, ``kfac``, ``kfra``) and the
exact Hessian diagonal (``diag_h``, ``diag_h_batch``).

Layout, as BackPACK's (derivatives apart from the quantities):
:mod:`~jaxopt_suite.curvature.losses` (loss Hessian square roots and sampling),
:mod:`~jaxopt_suite.curvature.layers` (intercepting flax layers while tracing) and
:mod:`~jaxopt_suite.curvature.discovery` (which layer calls and leaves are usable),
:mod:`~jaxopt_suite.curvature.inspection` (whether samples interact or the model is random,
read from its jaxpr),
:mod:`~jaxopt_suite.curvature.rules` (one rule per layer kind, ``rules/dense.py``,
``conv.py``, ``layernorm.py``, ``embed.py``, and the registry: :func:`register_rule`),
:mod:`~jaxopt_suite.curvature.backprop` (backpropagating stacks of columns),
:mod:`~jaxopt_suite.curvature.kron` (Kronecker conventions) and
:mod:`~jaxopt_suite.curvature.kfra` (KFRA's backpropagated G),
:mod:`~jaxopt_suite.curvature.hessian` and :mod:`~jaxopt_suite.curvature.residual` (the
curvature of the model's nonlinearities, found in its jaxpr),
:mod:`~jaxopt_suite.curvature.generic` and :mod:`~jaxopt_suite.curvature.columns` (per-sample
VJPs for everything else), :mod:`~jaxopt_suite.curvature.fastgrad` (cheaper convolution and
max-pooling backward passes inside the engine's own trace),
:mod:`~jaxopt_suite.curvature.quantities` (each quantity written once against all of them),
:mod:`~jaxopt_suite.curvature.config` (:class:`EngineConfig`, the tuning options) and
:mod:`~jaxopt_suite.curvature.engine` (the entry point).
Matrix-free GGN and Hessian products and Hutchinson diagonals live in
:mod:`~jaxopt_suite.curvature.products`.
"""

from jaxopt_suite.curvature.config import EngineConfig
from jaxopt_suite.curvature.engine import coverage, value_and_grad
from jaxopt_suite.curvature.losses import LOSSES, REDUCTIONS
from jaxopt_suite.curvature.products import (
    ggn_matvec,
    ggn_vector_product,
    hessian_vector_product,
    hutchinson_diagonal,
)
from jaxopt_suite.curvature.quantities import QUANTITIES
from jaxopt_suite.curvature.rules import LayerRule, register_rule, registered_kinds

__all__ = [
    "LOSSES",
    "QUANTITIES",
    "REDUCTIONS",
    "EngineConfig",
    "LayerRule",
    "coverage",
    "ggn_matvec",
    "ggn_vector_product",
    "hessian_vector_product",
    "hutchinson_diagonal",
    "register_rule",
    "registered_kinds",
    "value_and_grad",
]
