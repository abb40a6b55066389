"""BackPACK for JAX: per-sample and curvature quantities alongside the gradient.

:func:`value_and_grad` returns the mini-batch loss, its gradient and, in the same pass,
BackPACK's quantities (:data:`QUANTITIES`): individual gradients and their norms, the sum of
squared individual gradients and the gradient variance, the diagonal of the generalized
Gauss-Newton matrix (exact or by Monte Carlo, summed or per sample) and its square root
(``sqrt_ggn_exact``, ``sqrt_ggn_mc``), Kronecker factors (``kflr``, ``kfac``, ``kfra``) and the
exact Hessian diagonal (``diag_h``, ``diag_h_batch``).

Layout, as BackPACK's: :mod:`~jaxopt_suite.curvature.losses` (loss Hessian square roots and
sampling), :mod:`~jaxopt_suite.curvature.layers` (finding Dense/Conv/LayerNorm/Embed layers while
tracing), :mod:`~jaxopt_suite.curvature.rules` and :mod:`~jaxopt_suite.curvature.rules_norm`
(their per-sample derivative rules: Dense/Conv; LayerNorm/Embed),
:mod:`~jaxopt_suite.curvature.columns` and :mod:`~jaxopt_suite.curvature.kron` (square-root
columns and Kronecker factors), :mod:`~jaxopt_suite.curvature.hessian` (the curvature of the
model's nonlinearities, found in its jaxpr), :mod:`~jaxopt_suite.curvature.generic`
(per-sample VJPs for everything else), :mod:`~jaxopt_suite.curvature.fastgrad` (cheaper
convolution and max-pooling backward passes inside the engine's own trace),
:mod:`~jaxopt_suite.curvature.quantities` (each quantity written once against both) and
:mod:`~jaxopt_suite.curvature.engine` (the entry point).
Matrix-free GGN and Hessian products and Hutchinson diagonals live in
:mod:`~jaxopt_suite.curvature.products`.
"""

from jaxopt_suite.curvature.engine import coverage, value_and_grad
from jaxopt_suite.curvature.losses import LOSSES, REDUCTIONS
from jaxopt_suite.curvature.products import (
    ggn_matvec,
    ggn_vector_product,
    hessian_vector_product,
    hutchinson_diagonal,
)
from jaxopt_suite.curvature.quantities import QUANTITIES

__all__ = [
    "LOSSES",
    "QUANTITIES",
    "REDUCTIONS",
    "coverage",
    "ggn_matvec",
    "ggn_vector_product",
    "hessian_vector_product",
    "hutchinson_diagonal",
    "value_and_grad",
]
