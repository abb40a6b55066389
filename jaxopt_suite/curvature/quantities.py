r"""BackPACK's quantities, each written once as (source of cotangents, statistic, finish).

A quantity is a statistic (:data:`~jaxopt_suite.curvature.rules.STATISTICS`) of the
per-(column, sample) gradients :math:`\hat g_{k,n} = J_n^\top s_{k,n}`, where the columns
:math:`s_{k,n}` come from one of three *sources*:

* ``grad``: the single column :math:`c \nabla_f \ell_n` (so :math:`\hat g_n = c \nabla \ell_n`
  and :math:`\sum_n \hat g_n = \nabla L`),
* ``ggn_exact``: the columns of :math:`\sqrt{c} S_n` with :math:`S_n S_n^\top = \nabla_f^2
  \ell_n`,
* ``ggn_mc``: ``M`` Monte-Carlo columns :math:`\sqrt{c/M}\, \tilde s_{m,n}`,
* ``hessian``: the ``ggn_exact`` columns plus the signed eigen-columns of the model's
  nonlinearities (:mod:`~jaxopt_suite.curvature.hessian`), whose statistics add up to the
  Hessian diagonal,
* ``batch_average``: KFRA's batch-averaged Hessian backpropagated layer to layer
  (:func:`~jaxopt_suite.curvature.kfra.kfra`).

Besides the first-part statistics of :mod:`~jaxopt_suite.curvature.rules`, ``columns`` keeps
every :math:`\hat g_{k,n}` (``(K, N, *leaf)``, :mod:`~jaxopt_suite.curvature.columns`) and
``kron`` reduces them to Kronecker factors (:mod:`~jaxopt_suite.curvature.kron`).

The variance is BackPACK's :math:`\tfrac{1}{N}\text{sum\_grad\_squared} - (\nabla L /
N)^{\odot 2}`, with :math:`\nabla L = \sum_n \hat g_n` the engine's gradient, clipped at 0
(the difference of two nearly equal float32 sums leaves rounding noise of the order of
:math:`\epsilon\,\text{sum\_grad\_squared}/N`); for one sample it is exactly 0. Whenever the
individual gradients are computed anyway (``grad_batch`` asked for too), it is formed from
them alone, centred, :math:`\tfrac{1}{N} \sum_n (\hat g_n - \bar g)^{\odot 2}` (no
cancellation), and so are ``batch_l2`` and ``sum_grad_squared``. Forming them without
``grad_batch`` would cost its N × P memory, which ``sum_grad_squared``'s statistic avoids.

Per parameter leaf:

.. math::
   \text{grad\_batch} = \hat g_n, \quad \text{batch\_l2} = \|\hat g_n\|^2, \quad
   \text{sum\_grad\_squared} = \sum_n \hat g_n^{\odot 2}, \quad
   \text{variance} = \tfrac{1}{N} \sum_n (\hat g_n - \bar g)^{\odot 2}
   = \tfrac{1}{N}\text{sum\_grad\_squared} - \bar g^{\odot 2}, \
   \bar g = \tfrac{1}{N} \sum_n \hat g_n,

   \text{diag\_ggn} = \sum_{n,k} (J_n^\top s_{k,n})^{\odot 2}, \quad
   \text{diag\_ggn\_batch}_n = \sum_k (J_n^\top s_{k,n})^{\odot 2}, \quad
   \text{sqrt\_ggn} = [\hat g_{k,n}]_{k,n}, \quad
   \text{kflr, kfac, kfra} = (A, G) \text{ per kernel}, \ (G,) \text{ per bias}.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxopt_suite.curvature.rules.base import wide

SOURCES = ("grad", "ggn_exact", "ggn_mc", "hessian", "batch_average")


class Quantity(NamedTuple):
    """How one quantity is computed.

    Attributes:
      source: where the cotangent columns come from (:data:`SOURCES`).
      statistic: what is reduced from the per-(column, sample) gradients.
      finish: ``(statistic, grad, batch_size) -> result`` per leaf, or None for the identity.
      from_individual: ``(individual gradients, batch_size) -> result`` per leaf, used
        instead of ``statistic`` and ``finish`` when the source's ``individual`` statistic is
        computed anyway; None: never.
    """

    source: str
    statistic: str
    finish: Callable[[jax.Array, jax.Array, int], jax.Array] | None = None
    from_individual: Callable[[jax.Array, int], jax.Array] | None = None


def _variance(sum_grad_squared: jax.Array, grad: jax.Array, n: int) -> jax.Array:
    if n == 1:  # one sample has no spread; the formula would leave rounding noise
        return jnp.zeros_like(sum_grad_squared)
    return jnp.maximum(sum_grad_squared / n - (grad / n) ** 2, 0)


def _centred_variance(individual: jax.Array, n: int) -> jax.Array:
    g = wide(individual)
    return jnp.sum((g - jnp.sum(g, axis=0) / n) ** 2, axis=0) / n


QUANTITIES: dict[str, Quantity] = {
    "grad_batch": Quantity("grad", "individual"),
    "batch_l2": Quantity("grad", "individual_sq_norm"),
    "sum_grad_squared": Quantity("grad", "sum_sq"),
    "variance": Quantity("grad", "sum_sq", _variance, _centred_variance),
    "diag_ggn_exact": Quantity("ggn_exact", "sum_sq"),
    "diag_ggn_mc": Quantity("ggn_mc", "sum_sq"),
    "diag_ggn_exact_batch": Quantity("ggn_exact", "individual_sum_sq"),
    "diag_ggn_mc_batch": Quantity("ggn_mc", "individual_sum_sq"),
    "sqrt_ggn_exact": Quantity("ggn_exact", "columns"),
    "sqrt_ggn_mc": Quantity("ggn_mc", "columns"),
    "kflr": Quantity("ggn_exact", "kron"),
    "kfac": Quantity("ggn_mc", "kron"),
    "kfra": Quantity("batch_average", "kron"),
    "diag_h": Quantity("hessian", "sum_sq"),
    "diag_h_batch": Quantity("hessian", "individual_sum_sq"),
}


def get(names: Sequence[str]) -> dict[str, Quantity]:
    """Looks quantities up; an unknown name raises a ValueError listing the valid ones."""
    if isinstance(names, str):
        raise TypeError(f"quantities must be a sequence of names, not the string {names!r}")
    unknown = [n for n in names if n not in QUANTITIES]
    if unknown:
        raise ValueError(f"unknown quantities {unknown}; valid names: {', '.join(QUANTITIES)}")
    return {n: QUANTITIES[n] for n in tuple(names)}
