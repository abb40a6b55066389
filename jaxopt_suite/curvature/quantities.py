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
N)^{\odot 2}` (equal, since :math:`\sum_n \hat g_n = \nabla L`) formed from the individual
gradients alone, centred, so it is never negative and a single sample's is exactly 0 (the
difference of two nearly equal float32 sums would leave rounding noise); it costs the memory
of ``grad_batch``. Whenever the individual gradients are computed (``grad_batch`` or
``variance`` asked for), ``batch_l2`` and ``sum_grad_squared`` are formed from them too.

Per parameter leaf:

.. math::
   \text{grad\_batch} = \hat g_n, \quad \text{batch\_l2} = \|\hat g_n\|^2, \quad
   \text{sum\_grad\_squared} = \sum_n \hat g_n^{\odot 2}, \quad
   \text{variance} = \tfrac{1}{N} \sum_n (\hat g_n - \bar g)^{\odot 2}, \
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
    """

    source: str
    statistic: str
    finish: Callable[[jax.Array, jax.Array, int], jax.Array] | None = None


def _variance(individual: jax.Array, grad: jax.Array, n: int) -> jax.Array:
    r"""Centred: :math:`\tfrac1N \sum_n (\hat g_n - \bar g)^{\odot 2}` from (N, *leaf)."""
    del grad  # the mean of the same individual gradients, not jax.grad's rounding of it
    g = wide(individual)
    return jnp.sum((g - jnp.sum(g, axis=0) / n) ** 2, axis=0) / n


QUANTITIES: dict[str, Quantity] = {
    "grad_batch": Quantity("grad", "individual"),
    "batch_l2": Quantity("grad", "individual_sq_norm"),
    "sum_grad_squared": Quantity("grad", "sum_sq"),
    "variance": Quantity("grad", "individual", _variance),
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
