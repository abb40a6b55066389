r"""Forward gradient: unbiased gradient estimates from forward-mode autodiff only.

For a scalar function :math:`f(\theta)` and a random direction :math:`v` with
:math:`\mathbb{E}[v v^\top] = I`, one ``jax.jvp`` gives :math:`f(\theta)` and the directional
derivative :math:`\nabla f \cdot v`, and

.. math::

  g = (\nabla f \cdot v)\, v, \qquad \mathbb{E}[g] = \mathbb{E}[v v^\top] \nabla f = \nabla f

(Baydin et al., "Gradients without backpropagation", 2022). Averaging :math:`K` independent
directions divides the variance by :math:`K`. No reverse-mode pass is ever made: the estimate
works for functions that reverse mode cannot differentiate (``lax.while_loop``) and needs no
stored activations.

Precision: nothing is widened. Directions are drawn in the parameters' dtype (random signs are
exact in bfloat16), the jvp runs in the function's own dtypes, and the estimate has each leaf's
dtype; with bfloat16 parameters the directional derivative carries bfloat16 rounding, far below
the estimator's own variance.

Layout: :mod:`~jaxopt_suite.fwdgrad.directions` (sampling: :func:`random_direction`,
:func:`rademacher`, :class:`RankOne`, one-layer perturbations and their variance),
:mod:`~jaxopt_suite.fwdgrad.interpreter` (the forward-mode jaxpr interpreter for rank-one and
one-layer tangents), :mod:`~jaxopt_suite.fwdgrad.estimator` (:func:`value_and_forward_grad`,
:func:`forward_grad`) and :mod:`~jaxopt_suite.fwdgrad.transform` (:func:`forward_gradient`);
the activity-perturbed estimate (tangents on the layers' pre-activations) in
:mod:`~jaxopt_suite.fwdgrad.activity` (:func:`value_and_activity_grad`, :func:`activity_grad`)
and its local losses per block in :mod:`~jaxopt_suite.fwdgrad.local`
(:func:`value_and_local_grad`, :func:`chain_blocks`); the zeroth-order estimate (two
evaluations per direction, no jvp) in :mod:`~jaxopt_suite.fwdgrad.zeroth_order`
(:func:`value_and_spsa_grad`, :func:`spsa_grad`, :func:`spsa_gradient`).
"""

from jaxopt_suite.fwdgrad.activity import ACTIVITY_KINDS, activity_grad, value_and_activity_grad
from jaxopt_suite.fwdgrad.directions import (
    DISTRIBUTIONS,
    LAYER_PROBABILITIES,
    PERTURB,
    STRUCTURES,
    RankOne,
    rademacher,
    random_direction,
)
from jaxopt_suite.fwdgrad.estimator import BATCHING, forward_grad, value_and_forward_grad
from jaxopt_suite.fwdgrad.local import Block, chain_blocks, value_and_local_grad
from jaxopt_suite.fwdgrad.transform import ForwardGradientState, forward_gradient
from jaxopt_suite.fwdgrad.zeroth_order import (
    SPSAGradientState,
    spsa_grad,
    spsa_gradient,
    value_and_spsa_grad,
)

__all__ = [
    "ACTIVITY_KINDS",
    "BATCHING",
    "DISTRIBUTIONS",
    "LAYER_PROBABILITIES",
    "PERTURB",
    "STRUCTURES",
    "Block",
    "ForwardGradientState",
    "RankOne",
    "SPSAGradientState",
    "activity_grad",
    "chain_blocks",
    "forward_grad",
    "forward_gradient",
    "rademacher",
    "random_direction",
    "spsa_grad",
    "spsa_gradient",
    "value_and_activity_grad",
    "value_and_forward_grad",
    "value_and_local_grad",
    "value_and_spsa_grad",
]
